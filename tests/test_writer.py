"""Tests for lovasz_monai.writer: save_prediction's voxel dtype and output paths, and
NiftiPredictionWriter with images that share a base name (KiTS layout)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate

from lovasz_monai.writer import (
    NiftiPredictionWriter,
    prediction_dtype,
    prediction_path,
    save_prediction,
)

AFFINE = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))


def _pred(values, source="a/ct_1.nii.gz") -> MetaTensor:
    """A ``(1, 2, 2, 1)`` prediction of ``values`` made from the image ``source``."""
    data = torch.as_tensor(values).reshape(1, 2, 2, 1)
    return MetaTensor(data, affine=AFFINE, meta={"filename_or_obj": source})


def _read(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# ------------------------------------------------------------------------------ voxel dtype


@pytest.mark.parametrize(
    "values, dtype",
    [
        ([0, 1, 2, 255], np.uint8),  # the usual label map: unchanged
        ([0.0, 1.0, 2.0, 3.0], np.uint8),  # float tensors holding classes
        ([True, False, True, True], np.uint8),
        ([0, 1, 300, 2], np.uint16),  # used to be written as 44
        ([0, 1, 70000, 2], np.int32),
        ([-1, 0, 1, 2], np.int16),
        ([0.0, 0.7, 0.2, 1.0], np.float32),  # probabilities: used to be written as 0
    ],
)
def test_the_voxel_dtype_holds_every_value(tmp_path, values, dtype):
    path = save_prediction(_pred(values), tmp_path)
    image = nib.load(path)
    assert image.get_data_dtype() == dtype
    np.testing.assert_array_equal(_read(path).ravel(), np.asarray(values, dtype=dtype))
    assert prediction_dtype(torch.as_tensor(values)) == dtype


@pytest.mark.parametrize(
    "values, dtype, match",
    [
        ([0, 1, 300, 2], np.uint8, r"uint8 cannot hold the value 300 .*ct_1\.nii\.gz"),
        ([0.0, 0.7, 0.2, 1.0], np.uint8, r"uint8 cannot hold the value 0\.7"),
        ([0, 1, 70000, 2], np.int16, r"int16 cannot hold the value 70000"),
        ([-1, 0, 1, 2], np.uint16, r"uint16 cannot hold the value -1"),
        ([float("nan"), 0.0, 1.0, 2.0], np.int16, r"int16 cannot hold the value nan"),
        ([2**24 + 1, 0, 1, 2], np.float32, r"float32 cannot hold the value 16777217"),
    ],
)
def test_an_explicit_dtype_that_cannot_hold_the_values_is_refused(tmp_path, values, dtype, match):
    with pytest.raises(ValueError, match=match):
        save_prediction(_pred(values), tmp_path, dtype=dtype)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_an_explicit_dtype_that_holds_the_values_is_used(tmp_path):
    path = save_prediction(_pred([0.0, 0.7, 0.25, 1.0]), tmp_path, dtype=np.float32)
    assert nib.load(path).get_data_dtype() == np.float32
    path = save_prediction(_pred([0, 1, 2, 3]), tmp_path, dtype=np.int16, postfix="_i")
    assert nib.load(path).get_data_dtype() == np.int16 and path.name == "ct_1_i.nii.gz"
    np.testing.assert_allclose(nib.load(path).affine, AFFINE.numpy())


# ------------------------------------------------------------------------------ output paths


def test_data_root_dir_keeps_the_folders_below_it(tmp_path):
    root = tmp_path / "kits"
    source = str(root / "case_00001" / "imaging.nii.gz")
    path = save_prediction(_pred([0, 1, 2, 3], source), tmp_path / "out", data_root_dir=root)
    assert path == tmp_path / "out" / "case_00001" / "imaging.nii.gz" and path.is_file()
    assert prediction_path(source, "o", "_seg", root) == Path("o/case_00001/imaging_seg.nii.gz")
    assert prediction_path(source, "o", "", root / "case_00001") == Path("o/imaging.nii.gz")
    with pytest.raises(ValueError, match=r"imaging\.nii\.gz is not inside data_root_dir"):
        prediction_path(source, "o", "", tmp_path / "elsewhere")


# ------------------------------------------------------------------------------ the callback


def _kits_sources(tmp_path, cases=2) -> list[str]:
    return [str(tmp_path / "kits" / f"case_{i:05d}" / "imaging.nii.gz") for i in range(cases)]


def _trainer(tmp_path, predict_files=None) -> SimpleNamespace:
    """What the writer reads of a Trainer: no ``invert_prediction`` (the prediction is written
    on the image's grid) and, optionally, the datamodule's ``predict_files``."""
    datamodule = SimpleNamespace()
    if predict_files is not None:
        datamodule.predict_files = [{"image": f} for f in predict_files]
    return SimpleNamespace(datamodule=datamodule, default_root_dir=str(tmp_path), world_size=1)


def _predict(writer, trainer, sources) -> None:
    """Run the writer's hooks over one batch per source; case i predicts class 10 * i + 1."""
    writer.on_predict_start(trainer, None)
    for i, source in enumerate(sources):
        image = MetaTensor(torch.zeros(1, 2, 2, 1), affine=AFFINE)
        image.meta["filename_or_obj"] = source
        batch = list_data_collate([{"image": image}])
        prediction = torch.full((1, 1, 2, 2, 1), 10 * i + 1, dtype=torch.int64)
        writer.write_on_batch_end(trainer, None, prediction, [i], batch, i)
    writer.on_predict_end(trainer, None)


def test_images_with_one_base_name_keep_their_folders(tmp_path):
    """KiTS layout: ``case_0/imaging.nii.gz`` and ``case_1/imaging.nii.gz`` used to both go to
    ``out/imaging.nii.gz`` (the second overwrote the first, "wrote 2 file(s)")."""
    sources = _kits_sources(tmp_path, 3)
    writer = NiftiPredictionWriter(str(tmp_path / "out"))
    _predict(writer, _trainer(tmp_path, sources), sources)
    expected = [tmp_path / "out" / f"case_{i:05d}" / "imaging.nii.gz" for i in range(3)]
    assert writer.written == expected
    for i, path in enumerate(expected):
        assert (_read(path) == 10 * i + 1).all()
    # an explicit data_root_dir is used as given
    writer = NiftiPredictionWriter(str(tmp_path / "out2"), data_root_dir=str(tmp_path))
    _predict(writer, _trainer(tmp_path, sources), sources)
    assert writer.written[0] == tmp_path / "out2" / "kits" / "case_00000" / "imaging.nii.gz"


def test_distinct_base_names_stay_flat(tmp_path):
    sources = [str(tmp_path / "imagesTs" / f"test_{i:03d}.nii.gz") for i in range(2)]
    writer = NiftiPredictionWriter(str(tmp_path / "out"), postfix="_seg")
    _predict(writer, _trainer(tmp_path, sources), sources)
    assert [p.name for p in writer.written] == ["test_000_seg.nii.gz", "test_001_seg.nii.gz"]
    assert all(p.parent == tmp_path / "out" for p in writer.written)


def test_two_images_to_one_file_are_refused_not_overwritten(tmp_path):
    sources = _kits_sources(tmp_path)
    # no predict_files known in advance: the second image is refused, the first file is kept
    writer = NiftiPredictionWriter(str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"case_00001.*case_00000.*data_root_dir") as err:
        _predict(writer, _trainer(tmp_path), sources)
    assert "imaging.nii.gz" in str(err.value)
    assert writer.written == [tmp_path / "out" / "imaging.nii.gz"]
    assert (_read(writer.written[0]) == 1).all()
    # names that stay equal in one folder: refused before anything is predicted
    same = [str(tmp_path / "a.nii"), str(tmp_path / "a.nii.gz")]
    writer = NiftiPredictionWriter(str(tmp_path / "out3"))
    with pytest.raises(ValueError, match=r"a\.nii\.gz and .*a\.nii would both be written"):
        writer.on_predict_start(_trainer(tmp_path, same), None)
    assert not (tmp_path / "out3").exists()


def test_images_without_a_file_name_or_listed_twice_are_refused(tmp_path):
    """Both used to go silently to one file (images without a name are all "prediction")."""
    writer = NiftiPredictionWriter(str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"prediction and prediction would both be written"):
        _predict(writer, _trainer(tmp_path), ["", ""])
    assert writer.written == [tmp_path / "out" / "prediction.nii.gz"]
    twice = _kits_sources(tmp_path, 1) * 2
    writer = NiftiPredictionWriter(str(tmp_path / "out2"))
    with pytest.raises(ValueError, match=r"list each image once"):
        writer.on_predict_start(_trainer(tmp_path, twice), None)
