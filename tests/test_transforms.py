"""Tests for lovasz_monai.transforms: IgnoreMaskd, LabelToRegionsd, CheckImageLabeld."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Orientationd,
    RandFlipd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)

from lovasz_monai.transforms import CheckImageLabeld, IgnoreMaskd, LabelToRegionsd

IGNORE = 255


def _label(shape=(1, 6, 5, 4), seed=0, ignore_fraction=0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, size=shape)
    label[rng.random(shape) < ignore_fraction] = IGNORE
    return label


def _affine() -> torch.Tensor:
    """A non-RAS affine (x and z flipped, anisotropic voxels, shifted origin)."""
    affine = torch.diag(torch.tensor([-1.5, 2.0, -1.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([10.0, -4.0, 3.0], dtype=torch.float64)
    return affine


# ------------------------------------------------------------------------------ IgnoreMaskd


@pytest.mark.parametrize("fill_value", [0, 2])
def test_ignore_mask_hand_made_tensor(fill_value):
    label_np = _label()
    roi_np = (np.random.default_rng(1).random(label_np.shape) > 0.3).astype(np.uint8)
    out = IgnoreMaskd("label", ignore_index=IGNORE, roi_mask_key="roi", fill_value=fill_value)(
        {"label": torch.from_numpy(label_np), "roi": torch.from_numpy(roi_np)}
    )
    expected_mask = ((label_np != IGNORE) & (roi_np != 0)).astype(np.float32)
    assert out["mask"].dtype == torch.float32
    assert out["mask"].shape == label_np.shape
    np.testing.assert_array_equal(out["mask"].numpy(), expected_mask)
    expected_label = np.where(label_np == IGNORE, fill_value, label_np)
    np.testing.assert_array_equal(out["label"].numpy(), expected_label)
    assert out["label"].dtype == torch.int64
    # ROI-excluded voxels keep their label (only the ignore value is replaced)
    assert out["label"].numpy()[(roi_np == 0) & (label_np != IGNORE)].tolist() == (
        label_np[(roi_np == 0) & (label_np != IGNORE)].tolist()
    )


def test_ignore_mask_numpy_in_numpy_out_and_input_not_modified():
    label = _label().astype(np.uint8)
    before = label.copy()
    out = IgnoreMaskd("label", ignore_index=IGNORE)({"label": label})
    assert isinstance(out["label"], np.ndarray) and isinstance(out["mask"], np.ndarray)
    assert out["label"].dtype == np.uint8 and out["mask"].dtype == np.float32
    np.testing.assert_array_equal(out["mask"], (before != IGNORE).astype(np.float32))
    np.testing.assert_array_equal(out["label"], np.where(before == IGNORE, 0, before))
    np.testing.assert_array_equal(label, before)  # the input array is left alone


def test_ignore_mask_all_ones_when_nothing_ignored():
    label = torch.randint(0, 3, (1, 4, 4, 4))
    for transform in (IgnoreMaskd("label"), IgnoreMaskd("label", ignore_index=IGNORE)):
        out = transform({"label": label})
        assert torch.equal(out["mask"], torch.ones(1, 4, 4, 4))
        assert torch.equal(out["label"], label)


def test_ignore_mask_roi_only_and_roi_as_mask_key():
    label = torch.randint(0, 3, (1, 3, 3, 3))
    roi = torch.zeros(1, 3, 3, 3)
    roi[0, 1:] = 7.0  # any non-zero value counts
    out = IgnoreMaskd("label", roi_mask_key="mask")({"label": label, "mask": roi})
    assert torch.equal(out["mask"], (roi != 0).float())
    assert torch.equal(out["label"], label)


def test_ignore_mask_multichannel_label_and_roi():
    label = torch.zeros(2, 3, 3)
    label[0, 0, 0] = IGNORE
    label[1, 2, 2] = IGNORE
    roi = torch.ones(2, 3, 3)
    roi[:, 1, 1] = 0  # zero in every channel: ignored
    roi[0, 0, 1] = 0  # zero in one channel only: still counts
    out = IgnoreMaskd("label", ignore_index=IGNORE, roi_mask_key="roi")(
        {"label": label, "roi": roi}
    )
    expected = torch.ones(1, 3, 3)
    expected[0, 0, 0] = expected[0, 2, 2] = expected[0, 1, 1] = 0
    assert torch.equal(out["mask"], expected)


def test_ignore_mask_metatensor_keeps_meta_independently():
    label = MetaTensor(
        torch.from_numpy(_label()).float(),
        affine=_affine(),
        meta={"filename_or_obj": "lab.nii.gz"},
    )
    out = IgnoreMaskd("label", ignore_index=IGNORE)({"label": label})
    mask = out["mask"]
    assert isinstance(mask, MetaTensor) and isinstance(out["label"], MetaTensor)
    assert torch.equal(mask.affine, _affine())
    assert torch.equal(out["label"].affine, _affine())
    assert mask.meta["filename_or_obj"] == "lab.nii.gz"
    mask.meta["filename_or_obj"] = "changed"
    mask.affine[0, 0] = 5.0
    assert out["label"].meta["filename_or_obj"] == "lab.nii.gz"
    assert out["label"].affine[0, 0] == -1.5


def test_ignore_mask_follows_spatial_transforms():
    """The mask goes through orientation, spacing, flips, pad and crop exactly like the label."""
    raw = _label(shape=(1, 7, 6, 5), seed=3)
    raw_t = torch.from_numpy(raw).float()
    data = {
        "label": MetaTensor(raw_t.clone(), affine=_affine()),
        "ref": MetaTensor(raw_t.clone(), affine=_affine()),  # untouched copy of the raw label
        "ones": MetaTensor(torch.ones_like(raw_t), affine=_affine()),  # marks non-padded voxels
    }
    keys = ["label", "mask", "ref", "ones"]
    pipeline = Compose(
        [
            IgnoreMaskd("label", ignore_index=IGNORE),
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys, pixdim=(1.0, 1.0, 0.75), mode="nearest"),
            RandFlipd(keys, prob=1.0, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            SpatialPadd(keys, spatial_size=(16, 16, 16)),
            RandSpatialCropd(keys, roi_size=(9, 10, 11), random_size=False),
        ]
    )
    pipeline.set_random_state(seed=0)
    for _ in range(3):
        out = pipeline(data)
        ref, ones = out["ref"].numpy(), out["ones"].numpy()
        assert out["mask"].shape == out["label"].shape == (1, 9, 10, 11)
        assert (ref == IGNORE).sum() > 0
        expected_mask = ((ref != IGNORE) & (ones == 1)).astype(np.float32)
        np.testing.assert_array_equal(out["mask"].numpy(), expected_mask)
        np.testing.assert_array_equal(out["label"].numpy(), np.where(ref == IGNORE, 0, ref))
        assert torch.equal(out["mask"].affine, out["label"].affine)


def test_ignore_mask_errors():
    label = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "lab.nii.gz"})
    roi = MetaTensor(torch.ones(1, 4, 4, 5), meta={"filename_or_obj": "roi.nii.gz"})
    with pytest.raises(ValueError, match=r"roi\.nii\.gz.*lab\.nii\.gz"):
        IgnoreMaskd("label", roi_mask_key="roi")({"label": label, "roi": roi})
    with pytest.raises(KeyError, match="roi"):
        IgnoreMaskd("label", roi_mask_key="roi")({"label": label})
    with pytest.raises(KeyError):
        IgnoreMaskd("label", ignore_index=IGNORE)({"image": label})
    with pytest.raises(ValueError, match="channel-first"):
        IgnoreMaskd("label", ignore_index=IGNORE)({"label": torch.zeros(4)})
    # optional ROI / label
    out = IgnoreMaskd("label", roi_mask_key="roi", allow_missing_keys=True)({"label": label})
    assert torch.equal(out["mask"].as_tensor(), torch.ones(1, 4, 4, 4))
    assert "mask" not in IgnoreMaskd("label", allow_missing_keys=True)({"image": label})


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_ignore_mask_wide_unsigned_labels(dtype):
    """uint16 labels (numpy data of many NIfTI files) used to fail with 'not implemented for
    UInt16'; the label keeps its dtype."""
    label = np.array([[[0, 1], [300, 2]]], dtype=dtype)  # 300: the ignore label
    out = IgnoreMaskd("label", ignore_index=300, fill_value=0)({"label": label})
    assert out["label"].dtype == dtype
    np.testing.assert_array_equal(out["label"], [[[0, 1], [0, 2]]])
    np.testing.assert_array_equal(out["mask"], [[[1.0, 1.0], [0.0, 1.0]]])
    tensor = IgnoreMaskd("label", ignore_index=300)({"label": torch.from_numpy(label)})
    assert tensor["label"].dtype == torch.from_numpy(label).dtype
    assert tensor["label"].to(torch.int64).tolist() == [[[0, 1], [0, 2]]]


def test_ignore_mask_fill_value_the_label_dtype_cannot_hold():
    """fill_value=300 on a uint8 label used to fail with PyTorch's 'value cannot be converted
    to type uint8 without overflow'; the message now names the value, the dtype and the file."""
    label = MetaTensor(torch.tensor([[[0, 1], [255, 2]]], dtype=torch.uint8))
    label.meta["filename_or_obj"] = "lab.nii.gz"
    with pytest.raises(ValueError, match=r"fill_value 300 .*uint8 .*lab\.nii\.gz"):
        IgnoreMaskd("label", ignore_index=255, fill_value=300)({"label": label})
    # a wider label holds it
    out = IgnoreMaskd("label", ignore_index=255, fill_value=300)({"label": label.long()})
    assert out["label"].as_tensor().tolist() == [[[0, 1], [300, 2]]]
    for bad in ({"fill_value": 1.5}, {"fill_value": "0"}, {"ignore_index": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            IgnoreMaskd("label", **{"ignore_index": 255, **bad})


# ------------------------------------------------------------------------------ LabelToRegionsd


def test_label_to_regions_hand_made():
    label = np.random.default_rng(0).integers(0, 4, size=(1, 5, 6, 7))
    regions = {"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]}
    out = LabelToRegionsd("label", regions)({"label": torch.from_numpy(label)})["label"]
    assert out.shape == (3, 5, 6, 7) and out.dtype == torch.float32
    for channel, values in enumerate(regions.values()):
        expected = np.isin(label[0], values).astype(np.float32)
        np.testing.assert_array_equal(out[channel].numpy(), expected)
    # the nesting of the BraTS regions holds: ET inside TC inside WT
    assert bool((out[2] <= out[0]).all()) and bool((out[0] <= out[1]).all())


def test_label_to_regions_numpy_metatensor_and_int_region():
    label = np.array([[[0, 1, 2]]], dtype=np.uint8)
    out = LabelToRegionsd("label", {"a": 1, "b": [0, 2]})({"label": label})["label"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, [[[0, 1, 0]], [[1, 0, 1]]])
    meta_label = MetaTensor(
        torch.tensor([[[[0.0, 1.0, 2.0]]]]), affine=_affine(), meta={"filename_or_obj": "l.nii"}
    )
    out = LabelToRegionsd("label", {"x": [2]}, dtype=torch.uint8)({"label": meta_label})["label"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.uint8
    assert torch.equal(out.affine, _affine()) and out.meta["filename_or_obj"] == "l.nii"
    assert out.as_tensor().tolist() == [[[[0, 0, 1]]]]


def test_label_to_regions_errors():
    with pytest.raises(ValueError, match="at least one region"):
        LabelToRegionsd("label", {})
    with pytest.raises(ValueError, match="'WT' lists no label values"):
        LabelToRegionsd("label", {"WT": []})
    with pytest.raises(ValueError, match=r"\(1, \*spatial\)"):
        LabelToRegionsd("label", {"WT": [1]})({"label": torch.zeros(2, 3, 3)})
    with pytest.raises(KeyError):
        LabelToRegionsd("label", {"WT": [1]})({"image": torch.zeros(1, 3, 3)})


def test_label_to_regions_compares_numbers_not_wrapped_values():
    """A uint8 label compared with -1 or 256 used to match 255 (wrap-around) or fail with
    'value cannot be converted to type uint8 without overflow': no voxel holds them."""
    label = np.array([[[0, 1, 255]]], dtype=np.uint8)
    out = LabelToRegionsd("label", {"neg": [-1], "big": [256], "top": 255, "one": [1, 256]})(
        {"label": label}
    )["label"]
    np.testing.assert_array_equal(out, [[[0, 0, 0]], [[0, 0, 0]], [[0, 0, 1]], [[0, 1, 0]]])


@pytest.mark.parametrize(
    "make",
    [
        lambda v: torch.tensor(v, dtype=torch.bool),
        lambda v: np.array(v, dtype=np.uint16),
        lambda v: np.array(v, dtype=np.uint32),
        lambda v: torch.from_numpy(np.array(v, dtype=np.uint16)),
        lambda v: MetaTensor(torch.tensor(v, dtype=torch.uint32)),
    ],
    ids=["bool", "np-uint16", "np-uint32", "torch-uint16", "meta-uint32"],
)
def test_label_to_regions_bool_and_wide_unsigned_labels(make):
    """bool labels used to fail in isin(); uint16/uint32 with 'not implemented for UInt16'."""
    out = LabelToRegionsd("label", {"fg": [1], "bg": 0})({"label": make([[[0, 1, 1, 0]]])})
    out = out["label"]
    assert tuple(out.shape) == (2, 1, 4) and out.dtype in (np.float32, torch.float32)
    assert np.asarray(out).tolist() == [[[0.0, 1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0, 1.0]]]


@pytest.mark.parametrize(
    "values, match",
    [
        ("12", "integer or a list of integers"),  # was read as [1, 2] (dataset.json: 12)
        ([2.5], "region values must be integers"),  # was truncated to 2
        ([1, 2.0], "region values must be integers"),
        (["1"], "region values must be integers"),
        ([True], "region values must be integers"),
        (1.0, "integer or a list of integers"),
        (None, "integer or a list of integers"),
    ],
)
def test_label_to_regions_refuses_values_that_are_not_integers(values, match):
    with pytest.raises(ValueError, match=match) as err:
        LabelToRegionsd("label", {"a": values})
    assert "'a'" in str(err.value)
    regions = {"a": np.int64(3), "b": (1, np.uint8(2)), "c": np.array([4, 5])}
    assert LabelToRegionsd("label", regions).regions == {"a": [3], "b": [1, 2], "c": [4, 5]}


# ------------------------------------------------------------------------------ CheckImageLabeld


def _meta(shape, name):
    return MetaTensor(torch.zeros(shape), meta={"filename_or_obj": name})


def test_check_image_label_shapes_and_channels():
    check = CheckImageLabeld(num_channels=2)
    ok = {"image": _meta((2, 4, 5, 6), "img.nii.gz"), "label": _meta((1, 4, 5, 6), "lab.nii.gz")}
    assert check(ok)["label"] is ok["label"]
    bad = dict(ok, mask=_meta((1, 4, 5, 7), "roi.nii.gz"))
    with pytest.raises(ValueError, match=r"img\.nii\.gz.*roi\.nii\.gz"):
        check(bad)
    bad = dict(ok, label=_meta((1, 4, 6, 5), "lab.nii.gz"))
    with pytest.raises(ValueError, match=r"img\.nii\.gz.*lab\.nii\.gz"):
        check(bad)
    with pytest.raises(ValueError, match=r"img\.nii\.gz.*1 channel.*expected 2"):
        check(dict(ok, image=_meta((1, 4, 5, 6), "img.nii.gz")))
    with pytest.raises(KeyError):
        check({"label": ok["label"]})


def test_check_image_label_values():
    check = CheckImageLabeld(num_classes=3, ignore_index=IGNORE)
    image = torch.zeros(1, 2, 2, 2)
    label = MetaTensor(torch.tensor([0.0, 1, 2, IGNORE, 0, 1, 2, 0]).reshape(1, 2, 2, 2))
    label.meta["filename_or_obj"] = "lab.nii.gz"
    check({"image": image, "label": label})
    for bad_value in (3.0, -1.0, 0.5, 254.0):
        bad = label.clone()
        bad[0, 0, 0, 0] = bad_value
        with pytest.raises(ValueError, match=rf"lab\.nii\.gz.*\[{bad_value}\]"):
            check({"image": image, "label": bad})
    with pytest.raises(ValueError, match="outside"):
        CheckImageLabeld(num_classes=3)({"image": image, "label": label})


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64, np.bool_])
def test_check_image_label_values_of_wide_unsigned_and_bool_labels(dtype):
    """uint16 labels used to fail with '"ge_cpu" not implemented for 'UInt16''."""
    image = torch.zeros(1, 2, 2)
    label = np.array([[[0, 1], [1, 0]]], dtype=dtype)
    CheckImageLabeld(num_classes=2)({"image": image, "label": label})
    if dtype is not np.bool_:
        label[0, 0, 0] = 300
        with pytest.raises(ValueError, match=r"\[300\]"):
            CheckImageLabeld(num_classes=2)({"image": image, "label": label})
        CheckImageLabeld(num_classes=2, ignore_index=300)({"image": image, "label": label})
