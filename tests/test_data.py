"""Tests for lovasz_monai.data: the synthetic MSD writer and SegmentationDataModule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from monai.data import MetaTensor

from lovasz_monai.data import SegmentationDataModule
from lovasz_monai.dataset import DatasetDescription, describe_dataset
from lovasz_monai.pipelines import SegmentationPipelines
from lovasz_monai.synthetic import make_synthetic_dataset
from lovasz_monai.writer import save_prediction

IGNORE = 255
SIZE = (24, 24, 24)
ROI = (16, 16, 16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """4 labelled cases + 2 test images of 24^3, 3 classes, ignore label 255, LPS-like affine."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("tiny"), num_cases=4, num_test=2, size=SIZE, seed=1
    )


@pytest.fixture
def tiny_copy(tiny, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    return Path(shutil.copytree(tiny, tmp_path / "copy"))


def _dm(root, **kwargs) -> SegmentationDataModule:
    kwargs.setdefault("roi_size", ROI)
    return SegmentationDataModule(root, **kwargs)


def _array(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _ras(path) -> np.ndarray:
    """The file's voxels in RAS orientation, computed by nibabel (independent of MONAI)."""
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def _read_json(root) -> dict:
    return json.loads((Path(root) / "dataset.json").read_text())


def _write_json(root, info) -> None:
    (Path(root) / "dataset.json").write_text(json.dumps(info))


# ------------------------------------------------------------------------ make_synthetic_dataset


def test_synthetic_layout_and_dataset_json(tiny):
    info = _read_json(tiny)
    for key in ("name", "description", "tensorImageSize", "modality", "labels", "numTraining"):
        assert key in info
    assert info["labels"] == {"0": "background", "1": "class_1", "2": "class_2", "255": "ignore"}
    assert info["numTraining"] == len(info["training"]) == 4
    assert info["numTest"] == len(info["test"]) == 2
    assert info["tensorImageSize"] == "3D" and info["modality"] == {"0": "MRI"}
    for entry in info["training"]:
        assert entry["image"].startswith("./imagesTr/") and entry["label"].startswith("./labelsTr/")
        image, label = nib.load(tiny / entry["image"]), nib.load(tiny / entry["label"])
        assert image.shape == label.shape == SIZE
        assert image.get_data_dtype() == np.float32
        expected = np.diag([-1.5, -1.5, 2.0, 1.0])
        np.testing.assert_allclose(image.affine[:3, :3], expected[:3, :3])
        np.testing.assert_allclose(label.affine, image.affine)
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        values = np.unique(_array(tiny / entry["label"]))
        assert set(values.tolist()) <= {0, 1, 2, IGNORE}
        assert {0, IGNORE} <= set(values.tolist()) and len(values) >= 3
        # the ignored voxels form whole slices (a slab along the last axis)
        ignored = _array(tiny / entry["label"]) == IGNORE
        slices = ignored.all(axis=(0, 1))
        assert slices.any() and np.array_equal(ignored.any(axis=(0, 1)), slices)
    for path in info["test"]:
        assert nib.load(tiny / path).shape == SIZE


def test_synthetic_deterministic_and_seed_dependent(tmp_path):
    kwargs = dict(num_cases=2, num_test=1, size=(16, 16, 16))
    a = make_synthetic_dataset(tmp_path / "a", seed=3, **kwargs)
    b = make_synthetic_dataset(tmp_path / "b", seed=3, **kwargs)
    c = make_synthetic_dataset(tmp_path / "c", seed=4, **kwargs)
    assert _read_json(a) == _read_json(b)
    files = [f.relative_to(a) for f in sorted(a.rglob("*.nii.gz"))]
    assert len(files) == 5
    for rel in files:
        assert np.array_equal(_array(a / rel), _array(b / rel))
        assert np.array_equal(nib.load(a / rel).affine, nib.load(b / rel).affine)
    assert not np.array_equal(_array(a / files[0]), _array(c / files[0]))
    assert not np.array_equal(
        _array(a / "labelsTr/case_000.nii.gz"), _array(c / "labelsTr/case_000.nii.gz")
    )


def test_synthetic_options(tmp_path):
    root = make_synthetic_dataset(
        tmp_path,
        num_cases=2,
        num_test=0,
        size=(16, 12, 10),
        num_classes=2,
        num_modalities=2,
        spacing=(0.8, 1.0, 3.0),
        ignore_index=None,
        roi_masks=True,
    )
    info = _read_json(root)
    assert info["labels"] == {"0": "background", "1": "class_1"}
    assert info["tensorImageSize"] == "4D" and len(info["modality"]) == 2
    assert info["test"] == [] and info["numTest"] == 0
    entry = info["training"][0]
    assert nib.load(root / entry["image"]).shape == (16, 12, 10, 2)
    np.testing.assert_allclose(nib.load(root / entry["image"]).header.get_zooms()[:3], (0.8, 1, 3))
    assert set(np.unique(_array(root / entry["label"])).tolist()) == {0, 1}
    roi = _array(root / entry["mask"])
    assert set(np.unique(roi).tolist()) == {0, 1} and roi.shape == (16, 12, 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": (4, 16, 16)},
        {"num_classes": 1},
        {"ignore_index": 1},
        {"ignore_fraction": 1.0},
        {"num_cases": 0},
        {"spacing": (1.0, float("nan"), 1.0)},
        {"spacing": (1.0, 1.0, float("inf"))},
        {"noise": float("nan")},  # wrote images that were NaN everywhere
        {"noise": -0.1},
    ],
)
def test_synthetic_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, **kwargs)


# ------------------------------------------------------------------------ attributes, labels


def test_attributes_from_msd_json(tiny):
    dm = _dm(tiny)
    assert dm.class_names == ["background", "class_1", "class_2"]
    assert dm.num_classes == 3 and dm.ignore_index == IGNORE and dm.in_channels == 1
    assert not dm.multi_label
    assert dm.roi_size == ROI
    assert "class_1" in repr(dm) and str(dm) == repr(dm)
    assert _dm(tiny, ignore_index=7).ignore_index == 7


def test_attributes_from_nnunet_json(tiny_copy):
    info = _read_json(tiny_copy)
    info["labels"] = {"background": 0, "liver": 1, "tumour": 2, "ignore": IGNORE}
    del info["modality"]
    info["channel_names"] = {"0": "CT", "1": "PET"}
    _write_json(tiny_copy, info)
    dm = _dm(tiny_copy)
    assert dm.class_names == ["background", "liver", "tumour"] and dm.num_classes == 3
    assert dm.ignore_index == IGNORE and dm.in_channels == 2 and not dm.multi_label


def test_nnunet_region_labels(tiny_copy):
    info = _read_json(tiny_copy)
    info["labels"] = {"background": 0, "whole": [1, 2], "core": 2, "ignore": IGNORE}
    _write_json(tiny_copy, info)
    dm = _dm(tiny_copy)
    assert dm.multi_label and dm.class_names == ["whole", "core"] and dm.num_classes == 2
    assert dm.regions == {"whole": [1, 2], "core": [2]} and dm.ignore_index == IGNORE


@pytest.mark.parametrize("background", [0, [0]])
def test_nnunet_region_labels_with_background_as_a_list(tiny_copy, background):
    """nnU-Net v2 writes the background of region datasets as [0] as well as 0: it stays the
    background, not a region (it used to become a 'background' region, channel 0)."""
    info = _read_json(tiny_copy)
    info["labels"] = {"background": background, "a": [1, 2], "b": 2, "ignore": IGNORE}
    _write_json(tiny_copy, info)
    dm = _dm(tiny_copy)
    assert dm.class_names == ["a", "b"] and dm.num_classes == 2
    assert dm.regions == {"a": [1, 2], "b": [2]} and dm.ignore_index == IGNORE


@pytest.mark.parametrize(
    "labels, match",
    [
        ({"0": "background", "2": "gap"}, "without gaps"),
        ({"background": 0, "a": "x"}, "must map index strings"),
        ({"0": "background", "1": "ignore", "2": "b"}, "without gaps"),
        ([], "non-empty mapping"),
    ],
)
def test_bad_labels_name_dataset_json(tiny_copy, labels, match):
    info = _read_json(tiny_copy)
    info["labels"] = labels
    _write_json(tiny_copy, info)
    with pytest.raises(ValueError, match=match) as err:
        _dm(tiny_copy)
    assert "dataset.json" in str(err.value)


def test_ignore_index_must_not_be_a_class(tiny):
    with pytest.raises(ValueError, match="class index"):
        _dm(tiny, ignore_index=1)


# ------------------------------------------------------------------------ split


def test_split_deterministic_and_complete(tmp_path):
    root = make_synthetic_dataset(tmp_path, num_cases=10, num_test=0, size=(8, 8, 8))
    splits = {}
    for seed in range(4):
        a, b = _dm(root, seed=seed, val_fraction=0.3), _dm(root, seed=seed, val_fraction=0.3)
        assert a.val_files == b.val_files and a.train_files == b.train_files
        names = [c["image"] for c in a.train_files + a.val_files]
        assert sorted(names) == sorted(c["image"] for c in a.all_train_files)
        assert len(a.val_files) == 3 and len(set(names)) == 10
        splits[seed] = tuple(c["image"] for c in a.val_files)
    assert len(set(splits.values())) > 1  # the seed matters
    assert len(_dm(root, val_fraction=0.01).val_files) == 1  # at least one validation case
    assert _dm(root, val_fraction=0.0).val_files == []
    assert _dm(root, val_fraction=0.0).val_dataloader() == []


# ------------------------------------------------------------------------ batches


def test_train_batch_format(tiny):
    dm = _dm(tiny, batch_size=2, num_samples=3, spacing=(2.0, 2.0, 2.0))
    dm.setup("fit")
    assert len(dm.train_files) == 3 and len(dm.val_files) == 1
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "mask"}
    for key in ("image", "label", "mask"):
        assert batch[key].shape == (6, 1, *ROI)
        assert batch[key].dtype == torch.float32
        assert not isinstance(batch[key], MetaTensor)
    assert torch.isfinite(batch["image"]).all()
    assert set(batch["label"].unique().tolist()) <= {0.0, 1.0, 2.0}
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}


def test_train_whole_volume_mask_matches_ignored_voxels(tiny):
    """With a crop as large as the volume, each training sample is a whole (RAS) volume: its
    mask must be 0 exactly where the file's label is the ignore value."""
    dm = _dm(tiny, roi_size=SIZE, batch_size=1, num_samples=1, augment=False)
    dm.setup("fit")
    references = [_ras(case["label"]) for case in dm.train_files]
    seen = set()
    for batch in dm.train_dataloader():
        label, mask = batch["label"][0, 0].numpy(), batch["mask"][0, 0].numpy()
        matches = [
            i
            for i, ref in enumerate(references)
            if np.array_equal(np.where(ref == IGNORE, 0, ref), label)
        ]
        assert len(matches) == 1
        ref = references[matches[0]]
        np.testing.assert_array_equal(mask, (ref != IGNORE).astype(np.float32))
        seen.add(matches[0])
    assert seen == set(range(len(references)))


def _expected_centre_share(label: np.ndarray, crop_sampling: str) -> dict[str, float]:
    """Where a 1-voxel training patch should fall, computed from the label file (RAS)."""
    counts = {c: float((label == c).sum()) for c in (0, 1, 2)}
    counts["ignored"] = float((label == IGNORE).sum())
    if crop_sampling == "random":  # every voxel alike, ignored ones too
        return {k: n / label.size for k, n in counts.items()}
    if crop_sampling == "classes":  # each class alike, never an ignored voxel
        return {0: 1 / 3, 1: 1 / 3, 2: 1 / 3, "ignored": 0.0}
    foreground = counts[1] + counts[2]  # pos_neg: half background, half foreground voxels
    half = {c: 0.5 * counts[c] / foreground for c in (1, 2)}
    return {0: 0.5, **half, "ignored": 0.0}


@pytest.mark.parametrize("crop_sampling", ["pos_neg", "classes", "random"])
def test_crop_sampling_centres_patches_as_documented(tiny, crop_sampling):
    """With 1-voxel patches each patch is its centre: over 900 patches of one case, the share of
    centres on each class (and on ignored voxels) matches the counts in the label file."""
    dm = _dm(tiny, roi_size=(1, 1, 1), num_samples=900, augment=False, crop_sampling=crop_sampling)
    assert dm.crop_sampling == crop_sampling
    case = dm.train_files[0]
    patches = dm.pipelines.train()(dict(case))
    assert len(patches) == 900
    labels = np.array([float(p["label"].reshape(-1)[0]) for p in patches])
    masks = np.array([float(p["mask"].reshape(-1)[0]) for p in patches])
    seen = {c: float(np.mean((labels == c) & (masks == 1))) for c in (0, 1, 2)}
    seen["ignored"] = float(np.mean(masks == 0))
    expected = _expected_centre_share(_ras(case["label"]), crop_sampling)
    assert expected["ignored"] > 0 or crop_sampling != "random"  # the case has ignored voxels
    for key, share in expected.items():
        assert seen[key] == pytest.approx(share, abs=0.06), (key, seen, expected)


def _flips_seen(dm, epochs: int = 6) -> set[tuple[int, ...]]:
    """The axes along which each whole-volume training sample was flipped against its file."""
    references = [np.where(_ras(c["label"]) == IGNORE, 0, _ras(c["label"])) for c in dm.train_files]
    combos = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    seen = set()
    loader = dm.train_dataloader()
    for _ in range(epochs):
        for batch in loader:
            label = batch["label"][0, 0].numpy()
            found = {
                axes
                for ref in references
                for axes in combos
                if np.array_equal(np.flip(ref, axes) if axes else ref, label)
            }
            assert len(found) >= 1, "a training sample is no flip of any case"
            seen |= found
    return seen


def test_training_flips_follow_flip_axes(tiny):
    assert _dm(tiny).flip_axes == ()  # the default flips nothing
    dm = _dm(
        tiny, roi_size=SIZE, batch_size=1, num_samples=1, num_workers=0, seed=3, flip_axes=(1, 2)
    )
    dm.setup("fit")
    seen = _flips_seen(dm)
    assert all(0 not in axes for axes in seen), seen  # never a left-right flip
    assert {(1,), (2,), (1, 2)} & seen, seen  # ... while the other axes are flipped
    lr = _dm(tiny, roi_size=SIZE, batch_size=1, num_samples=1, num_workers=0, flip_axes=[0])
    lr.setup("fit")
    assert _flips_seen(lr) == {(), (0,)}
    none = _dm(tiny, roi_size=SIZE, batch_size=1, num_samples=1, num_workers=0, flip_axes=())
    none.setup("fit")
    assert _flips_seen(none, epochs=2) == {()}


def test_left_right_flip_of_lateralised_labels_warns(tiny_copy, recwarn):
    info = _read_json(tiny_copy)
    info["labels"] = {"0": "background", "1": "Left-Caudate", "2": "caudate_R", "255": "ignore"}
    _write_json(tiny_copy, info)
    _dm(tiny_copy)  # the default flips nothing: no warning
    _dm(tiny_copy, flip_axes=(1, 2))  # no left-right flip: no warning
    _dm(tiny_copy, flip_axes=(0, 1, 2), augment=False)  # no augmentation, no flip
    assert not [w for w in recwarn if "flips left and right" in str(w.message)]
    with pytest.warns(UserWarning, match=r"flips left and right.*Left-Caudate, caudate_R"):
        _dm(tiny_copy, flip_axes=(0, 1, 2))


@pytest.mark.parametrize("axes", [(3,), (-1,), (1, 1)])
def test_bad_flip_axes_are_refused(tiny, axes):
    with pytest.raises(ValueError, match="flip_axes must be distinct spatial axes"):
        _dm(tiny, flip_axes=axes)


def test_lateralised_label_names():
    from lovasz_monai.dataset import lateralised_labels

    names = [
        "background",
        "Left-Putamen",
        "right_thalamus",
        "kidney_l",
        "Adrenal gland R",
        "lh.insula",
        "liver",
        "colon",
        "larynx",
        "rectum",
        "brainstem",
    ]
    assert lateralised_labels(names) == names[1:6]


def test_val_batch_whole_volume_with_meta(tiny):
    dm = _dm(tiny)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert len(batches) == len(dm.val_files) == 1
    batch = batches[0]
    case = dm.val_files[0]
    ref = _ras(case["label"])
    for key in ("image", "label", "mask"):
        assert isinstance(batch[key], MetaTensor) and batch[key].shape == (1, 1, *SIZE)
        assert batch[key].dtype == torch.float32
    assert batch["image"].meta["filename_or_obj"][0] == case["image"]
    np.testing.assert_array_equal(batch["label"][0, 0].numpy(), np.where(ref == IGNORE, 0, ref))
    np.testing.assert_array_equal(batch["mask"][0, 0].numpy(), (ref != IGNORE).astype(np.float32))
    image = batch["image"][0, 0].as_tensor()
    nonzero = image[_ras(case["image"]) != 0]
    assert abs(float(nonzero.mean())) < 1e-3 and abs(float(nonzero.std()) - 1) < 1e-2  # z-score


def test_ct_intensity_window(tiny):
    dm = _dm(tiny, intensity="ct", ct_window=(100.0, 300.0))
    dm.setup("validate")
    image = next(iter(dm.val_dataloader()))["image"][0, 0].numpy()
    raw = _ras(dm.val_files[0]["image"])
    np.testing.assert_allclose(image, np.clip((raw - 100.0) / 200.0, 0, 1), atol=1e-5)


def test_regions_mode(tiny):
    regions = {"fg": [1, 2], "two": [2]}
    dm = _dm(tiny, regions=regions, num_samples=2)
    assert dm.multi_label and dm.class_names == ["fg", "two"] and dm.num_classes == 2
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].shape == (4, 2, *ROI) and batch["mask"].shape == (4, 1, *ROI)
    assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}
    assert bool((batch["label"][:, 1] <= batch["label"][:, 0]).all())  # "two" inside "fg"
    val = next(iter(dm.val_dataloader()))
    ref = _ras(dm.val_files[0]["label"])
    for channel, values in enumerate(regions.values()):
        expected = np.isin(ref, values).astype(np.float32)
        np.testing.assert_array_equal(val["label"][0, channel].numpy(), expected)
    np.testing.assert_array_equal(val["mask"][0, 0].numpy(), (ref != IGNORE).astype(np.float32))
    with pytest.raises(ValueError, match="label values in"):
        _dm(tiny, regions={"bad": [3]})


def test_roi_masks_and_two_modalities(tmp_path):
    root = make_synthetic_dataset(
        tmp_path, num_cases=2, num_test=0, size=(16, 16, 16), num_modalities=2, roi_masks=True
    )
    dm = _dm(root, roi_size=(8, 8, 8), val_fraction=0.5)
    assert dm.in_channels == 2
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 2, 8, 8, 8) and batch["mask"].shape == (2, 1, 8, 8, 8)
    val = next(iter(dm.val_dataloader()))
    case = dm.val_files[0]
    label, roi = _ras(case["label"]), _ras(case["mask"])
    expected = ((label != IGNORE) & (roi != 0)).astype(np.float32)
    assert (roi == 0).any() and (label == IGNORE).any()
    np.testing.assert_array_equal(val["mask"][0, 0].numpy(), expected)
    assert val["image"].shape == (1, 2, 16, 16, 16)


def test_num_workers(tiny):
    dm = _dm(tiny, num_workers=2, batch_size=1, num_samples=2, cache_rate=0.5)
    dm.setup("fit")
    shapes = [tuple(b["image"].shape) for b in dm.train_dataloader()]
    assert shapes == [(2, 1, *ROI)] * 3


# ------------------------------------------------------------------------ test / predict


def test_test_dataloader_falls_back_to_validation_split(tiny):
    dm = _dm(tiny)
    dm.setup("test")
    assert dm.test_files == []
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].meta["filename_or_obj"][0] == dm.val_files[0]["image"]


def test_test_dataloader_uses_labelled_test_cases(tiny_copy):
    info = _read_json(tiny_copy)
    info["test"] = [info["training"][3]]
    _write_json(tiny_copy, info)
    dm = _dm(tiny_copy, val_fraction=0.0)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert len(batches) == 1 and set(batches[0]) == {"image", "label", "mask"}
    assert batches[0]["label"].meta["filename_or_obj"][0] == dm.test_files[0]["label"]


def test_predict_dataloader(tiny):
    dm = _dm(tiny)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    test_images = [str(tiny / p[2:]) for p in _read_json(tiny)["test"]]
    assert [b["image"].meta["filename_or_obj"][0] for b in batches] == test_images
    for batch in batches:
        assert set(batch) == {"image"}
        assert isinstance(batch["image"], MetaTensor) and batch["image"].shape == (1, 1, *SIZE)
    # a folder, a glob pattern, or a single file instead of dataset.json "test"
    for pattern, count in [(tiny / "imagesTr", 4), (tiny / "imagesTr/case_00[01]*", 2)]:
        other = _dm(tiny, predict_images=str(pattern))
        other.setup("predict")
        assert len(other.predict_files) == len(list(other.predict_dataloader())) == count
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        _dm(tiny, predict_images=str(tiny / "nothing_here*")).setup("predict")


def test_invert_prediction_round_trip(tiny, tmp_path):
    """Orientation (LPS -> RAS) and resampling to 1 mm are undone: a prediction equal to the
    transformed label maps back onto the file's label and affine."""
    dm = _dm(tiny, spacing=(1.0, 1.0, 1.0))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].shape == (1, 1, 36, 36, 47)  # 24 voxels of 1.5/1.5/2 mm at 1 mm
    case = dm.val_files[0]
    original = _array(case["label"])
    affine = nib.load(case["label"]).affine
    for pred in (batch["label"], batch["label"][0].as_tensor().long()):
        out = dm.invert_prediction(pred, batch["image"])
        assert isinstance(out, MetaTensor) and out.shape == (1, *SIZE)
        np.testing.assert_array_equal(out[0].numpy(), np.where(original == IGNORE, 0, original))
        np.testing.assert_allclose(out.affine.numpy(), affine)
    path = save_prediction(out, tmp_path, postfix="_seg")
    assert path.name == Path(case["image"]).name.replace(".nii.gz", "_seg.nii.gz")
    written = nib.load(path)
    np.testing.assert_allclose(written.affine, affine)
    np.testing.assert_array_equal(_array(path), np.where(original == IGNORE, 0, original))
    # probabilities / images: interpolated inversion keeps the original grid
    dm.setup("predict")
    image = next(iter(dm.predict_dataloader()))["image"]
    probs = torch.softmax(torch.randn(1, 3, *image.shape[2:]), dim=1)
    out = dm.invert_prediction(probs, image, nearest=False)
    assert out.shape == (3, *SIZE)
    np.testing.assert_allclose(out.affine.numpy(), nib.load(dm.predict_files[0]["image"]).affine)
    with pytest.raises(ValueError, match="spatial shapes"):
        dm.invert_prediction(probs[:, :, :-1], image)
    with pytest.raises(TypeError):
        dm.invert_prediction(probs, image.as_tensor())


# ------------------------------------------------------------------------ bad data


def test_missing_dataset_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        _dm(tmp_path)


def test_synthetic_true_writes_then_reuses(tmp_path):
    dm = _dm(tmp_path, synthetic=True, synthetic_kwargs={"num_cases": 2, "size": (8, 8, 8)})
    assert not any(tmp_path.iterdir())  # construction writes nothing: prepare_data does
    assert len(dm.all_train_files) == 2 and dm.num_classes == 3
    dm.prepare_data()
    assert (tmp_path / "dataset.json").is_file()
    assert [dict(c) for c in describe_dataset(tmp_path).training] == dm.all_train_files
    stamp = (tmp_path / "dataset.json").stat().st_mtime_ns
    again = _dm(tmp_path, synthetic=True, synthetic_kwargs={"num_cases": 5})
    again.prepare_data()
    assert (tmp_path / "dataset.json").stat().st_mtime_ns == stamp
    assert len(again.all_train_files) == 2


def test_setup_outside_a_trainer_writes_the_synthetic_data(tmp_path):
    dm = _dm(tmp_path, synthetic=True, synthetic_kwargs={"num_cases": 2, "size": (8, 8, 8)})
    dm.setup("fit")
    assert (tmp_path / "dataset.json").is_file() and dm.train_ds is not None


def test_dataset_json_is_read_once_and_shared(tmp_path, monkeypatch):
    make_synthetic_dataset(tmp_path, num_cases=2, size=(8, 8, 8))
    reads = []
    original = DatasetDescription.from_json.__func__

    def counting(cls, *args, **kwargs):
        reads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(DatasetDescription, "from_json", classmethod(counting))
    first = describe_dataset(tmp_path)
    assert _dm(tmp_path).description is first and len(reads) == 1
    (tmp_path / "dataset.json").write_text((tmp_path / "dataset.json").read_text() + "\n")
    assert describe_dataset(tmp_path) is not first and len(reads) == 2  # a new version


def test_former_data_names_warn_and_resolve():
    import lovasz_monai.data as data
    from lovasz_monai import synthetic, writer

    with pytest.warns(DeprecationWarning, match="moved to lovasz_monai.synthetic"):
        assert data.make_synthetic_dataset is synthetic.make_synthetic_dataset
    with pytest.warns(DeprecationWarning, match="lovasz_monai.writer.save_prediction"):
        assert data.save_prediction is writer.save_prediction
    with pytest.warns(DeprecationWarning, match="lovasz_monai.dataset.describe_dataset"):
        assert data.describe_dataset is describe_dataset


def test_missing_file_listed(tiny_copy):
    (tiny_copy / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"labelsTr/case_002\.nii\.gz"):
        _dm(tiny_copy)


def test_missing_labels_entry(tiny_copy):
    info = _read_json(tiny_copy)
    del info["labels"]
    _write_json(tiny_copy, info)
    with pytest.raises(ValueError, match=r"dataset\.json.*'labels'"):
        _dm(tiny_copy)


def test_invalid_json(tiny_copy):
    (tiny_copy / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"dataset\.json is not valid JSON"):
        _dm(tiny_copy)


def test_unreadable_nifti(tiny_copy):
    (tiny_copy / "imagesTr" / "case_001.nii.gz").write_bytes(b"this is not a NIfTI file")
    dm = _dm(tiny_copy, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"imagesTr/case_001\.nii\.gz"):
        dm.setup("fit")


def test_truncated_nifti(tiny_copy):
    path = tiny_copy / "imagesTr" / "case_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header readable, voxel data cut off
    dm = _dm(tiny_copy, val_fraction=0.0)
    with pytest.raises(RuntimeError, match=r"imagesTr/case_001\.nii\.gz"):
        dm.setup("fit")


def test_shape_mismatch(tiny_copy):
    path = tiny_copy / "labelsTr" / "case_003.nii.gz"
    label = nib.load(path)
    nib.save(nib.Nifti1Image(_array(path)[:, :, :20], label.affine), path)
    dm = _dm(tiny_copy, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"imagesTr/case_003\.nii\.gz.*labelsTr/case_003\.nii\.gz"):
        dm.setup("fit")


def test_label_value_out_of_range(tiny_copy):
    path = tiny_copy / "labelsTr" / "case_000.nii.gz"
    array = _array(path).copy()
    array[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(array, nib.load(path).affine), path)
    dm = _dm(tiny_copy, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"labelsTr/case_000\.nii\.gz.*\[9\.0\]"):
        dm.setup("fit")


def test_bad_arguments(tiny):
    for kwargs in (
        {"roi_size": (16, 16)},
        {"val_fraction": 1.0},
        {"intensity": "minmax"},
        {"batch_size": 0},
        {"spacing": (1.0, 0.0, 1.0)},
        {"spacing": (float("nan"), 1.0, 1.0)},
        {"ct_window": (float("nan"), 250.0)},  # nan >= 250 is False: used to pass
        {"ct_window": (250.0, -175.0)},
        {"flip_axes": (0, 0)},
        {"flip_axes": (3,)},
        {"crop_sampling": "centre"},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            _dm(tiny, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 1.5}, r"batch_size must be a positive integer, got 1\.5"),
        ({"batch_size": True}, r"batch_size must be a positive integer, got True"),
        ({"num_samples": 0}, r"num_samples must be a positive integer, got 0"),
        ({"num_samples": 2.0}, r"num_samples must be a positive integer, got 2\.0"),
        ({"num_workers": 0.5}, r"num_workers must be an integer >= 0, got 0\.5"),
        ({"num_workers": -1}, r"num_workers must be an integer >= 0, got -1"),
        ({"roi_size": (16, 16.5, 16)}, r"roi_size must be 3 positive integers"),
    ],
)
def test_counts_must_be_integers(tiny, kwargs, match):
    """batch_size=1.5 and num_workers=0.5 used to be accepted and fail later in the DataLoader
    (roi_size 16.5 was truncated to 16)."""
    with pytest.raises(ValueError, match=match):
        _dm(tiny, **kwargs)


def test_integer_counts_are_plain_ints(tiny):
    dm = _dm(tiny, batch_size=np.int64(3), num_workers=0, num_samples=1)
    assert (dm.batch_size, dm.num_workers, dm.num_samples) == (3, 0, 1)
    assert type(dm.batch_size) is int


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_channels": 0}, r"in_channels must be a positive integer, got 0"),
        ({"in_channels": 1.5}, r"in_channels must be a positive integer, got 1\.5"),
        ({"num_label_values": 0}, r"num_label_values must be a positive integer, got 0"),
        ({"num_samples": 0}, r"num_samples must be a positive integer, got 0"),
        ({"ignore_index": 2}, r"ignore_index .*outside .*\[0, 3\), got 2"),
        ({"ignore_index": 0}, r"ignore_index .*outside .*\[0, 3\), got 0"),
        ({"ignore_index": 255.5}, r"ignore_index .*got 255\.5"),
        ({"regions": {}}, r"regions must be None or a non-empty mapping"),
        ({"regions": {"a": []}}, r"region 'a' lists no label values"),
        ({"regions": {"a": "12"}}, r"region 'a' must be an integer or a list .*got '12'"),
        ({"regions": {"a": [1, 3]}}, r"regions\['a'\] .*\[0, 3\), got \[3\]"),
        ({"regions": {"a": [-1]}}, r"regions\['a'\] .*\[0, 3\), got \[-1\]"),
        ({"regions": {"a": [2.5]}}, r"region values must be integers: region 'a' has \[2\.5\]"),
    ],
)
def test_pipelines_check_counts_ignore_index_and_regions(kwargs, match):
    """in_channels=0, num_label_values=0, num_samples=0, an ignore_index among the classes and
    region values out of range used to be accepted."""
    settings = {"in_channels": 1, "num_label_values": 3, "roi_size": (8, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        SegmentationPipelines(**settings)


def test_pipelines_store_checked_regions_and_ignore_index():
    ok = SegmentationPipelines(
        in_channels=np.int64(2), num_label_values=3, ignore_index=-1,
        regions={"a": [1, np.int64(2)], "b": 2}, roi_size=(8, 8, 8),
    )  # fmt: skip
    assert ok.regions == {"a": (1, 2), "b": (2,)} and ok.ignore_index == -1
    assert type(ok.in_channels) is int and ok.in_channels == 2
    assert SegmentationPipelines(1, 3, ignore_index=255, roi_size=(8, 8, 8)).ignore_index == 255


def test_pipelines_check_their_settings_without_a_datamodule():
    ok = SegmentationPipelines(
        in_channels=1, num_label_values=3, roi_size=[8, 8, 8], spacing=[1, 2, 3], flip_axes=[1]
    )
    assert (ok.roi_size, ok.spacing, ok.ct_window, ok.flip_axes) == (
        (8, 8, 8),
        (1.0, 2.0, 3.0),
        (-175.0, 250.0),
        (1,),
    )
    for kwargs in (
        {"roi_size": (8, 8)},
        {"roi_size": (8, 0, 8)},
        {"spacing": (1.0, float("inf"), 1.0)},
        {"spacing": (1.0, -1.0, 1.0)},
        {"intensity": "minmax"},
        {"ct_window": (0.0, float("nan"))},
        {"flip_axes": (1, 1)},
        {"crop_sampling": "foreground"},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SegmentationPipelines(in_channels=1, num_label_values=3, **kwargs)


# ------------------------------------------------------------------------ Lightning


class _TinyModule(pl.LightningModule):
    """A 1x1x1 convolution trained with a masked cross-entropy: enough to drive every loop."""

    def __init__(self, dm: SegmentationDataModule) -> None:
        super().__init__()
        self.dm = dm
        self.net = torch.nn.Conv3d(dm.in_channels, dm.num_classes, kernel_size=1)
        self.predicted: list[MetaTensor] = []

    def _loss(self, batch):
        logits = self.net(batch["image"])
        ce = torch.nn.functional.cross_entropy(
            logits, batch["label"][:, 0].long(), reduction="none"
        )
        return (ce * batch["mask"][:, 0]).sum() / batch["mask"].sum().clamp_min(1)

    def training_step(self, batch, batch_idx):
        assert batch["image"].shape[1:] == (1, *ROI)
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), batch_size=1)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch), batch_size=1)

    def predict_step(self, batch, batch_idx):
        pred = self.net(batch["image"]).argmax(dim=1, keepdim=True)
        out = self.dm.invert_prediction(pred, batch["image"])
        self.predicted.append(out)
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_loops(tiny, tmp_path):
    dm = _dm(tiny, batch_size=2, num_samples=1)
    module = _TinyModule(dm)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2  # 3 training cases, batches of 2
    assert "val_loss" in trainer.callback_metrics
    trainer.test(module, datamodule=dm, verbose=False)
    assert torch.isfinite(trainer.callback_metrics["test_loss"])
    trainer.predict(module, datamodule=dm)
    assert len(module.predicted) == 2
    for out, case in zip(module.predicted, dm.predict_files, strict=True):
        assert out.shape == (1, *SIZE)
        np.testing.assert_allclose(out.affine.numpy(), nib.load(case["image"]).affine)
