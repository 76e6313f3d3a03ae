"""Bad input gets a clear exception or the value of the definition: never a silent wrong value,
a NaN passed off as 0, or an error that names nothing useful (issue 16, items 1-9 and 15).

Each test here failed on the code before that issue; the distributed cases (2 gloo processes)
are in ``tests/losses/test_distributed_loss.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torchmetrics.classification import MulticlassJaccardIndex

from lovasz_monai import LovaszCELoss, LovaszHingeLoss, LovaszSoftmaxLoss
from lovasz_monai import functional as Fn
from lovasz_monai.deep_supervision import head_weights, resize_nearest
from lovasz_monai.losses import MaskedDiceCELoss
from lovasz_monai.metrics import case_metrics
from lovasz_monai.module import METRIC_IGNORE, LovaszSegmentationModule
from lovasz_monai.transforms import IgnoreMaskd
from tests.oracle import reference_class_losses

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(seed: int, batch: int = 2, channels: int = 3, spatial=(4, 3, 5)):
    g = _gen(seed)
    logits = 2 * torch.randn(batch, channels, *spatial, generator=g)
    labels = torch.randint(0, channels, (batch, 1, *spatial), generator=g)
    return logits, labels


ALL_LOSSES = {
    "softmax": lambda **kw: LovaszSoftmaxLoss(to_onehot_y=True, **kw),
    "hinge": lambda **kw: LovaszHingeLoss(to_onehot_y=True, **kw),
    "lovasz_ce": lambda **kw: LovaszCELoss(to_onehot_y=True, **kw),
    "masked_dice_ce": lambda **kw: MaskedDiceCELoss(**kw),
}


# -- 1. class weights: NaN/inf/all-zero refused, never a 0 with NaN gradients --------------------


@pytest.mark.parametrize(
    "weight", [[0.0, 0.0, math.nan], [1.0, math.inf, 1.0], [0.0, 0.0, 0.0], math.nan, [1.0, -1.0]]
)
@pytest.mark.parametrize("cls", [LovaszSoftmaxLoss, LovaszHingeLoss, LovaszCELoss])
def test_non_finite_negative_or_all_zero_weights_are_refused(cls, weight):
    with pytest.raises(ValueError, match=r"weight must (hold finite values >= 0|not be all zero)"):
        cls(weight=weight)


@pytest.mark.parametrize("ce_weight", [[1.0, math.nan, 1.0], [math.inf, 1.0, 1.0], [0.0, 0.0]])
def test_non_finite_ce_weight_is_refused(ce_weight):
    with pytest.raises(ValueError, match=r"ce_weight must"):
        LovaszCELoss(ce_weight=ce_weight)


def test_inverse_frequency_weights_name_the_absent_class():
    counts = torch.tensor([100.0, 20.0, 0.0])  # class 2 absent from the training set
    with pytest.raises(ValueError, match=r"bad entries at \[2\].*absent from the data"):
        LovaszSoftmaxLoss(weight=counts.sum() / counts)  # 120 / 0 = inf


@pytest.mark.parametrize("name", ["softmax", "hinge", "lovasz_ce"])
def test_weights_replaced_after_construction_are_checked_in_forward(name):
    loss = ALL_LOSSES[name](weight=[1.0, 1.0, 1.0])
    state = loss.state_dict()  # a state_dict with NaN weights
    (key,) = [k for k in state if k.endswith("class_weight")]
    loss.load_state_dict({**state, key: torch.tensor([0.0, 0.0, math.nan])})
    logits, labels = _case(1)
    with pytest.raises(ValueError, match="weight must hold finite values"):
        loss(logits, labels)


def test_lovasz_ce_weight_replaced_after_construction_is_checked_in_forward():
    loss = LovaszCELoss(to_onehot_y=True, ce_weight=[1.0, 1.0, 1.0])
    loss.ce_weight = torch.tensor([1.0, math.nan, 1.0])
    logits, labels = _case(2)
    with pytest.raises(ValueError, match="ce_weight must hold finite values"):
        loss(logits, labels)


def test_functional_class_mean_refuses_nan_weights_and_never_hides_them():
    losses = torch.tensor([[0.2, 0.4, 0.9]], requires_grad=True)
    counts = torch.tensor([[3, 1, 0]])
    nan_weight = torch.tensor([0.0, 0.0, math.nan])
    with pytest.raises(ValueError, match="finite"):
        Fn.average_class_losses(losses, counts, present_only=False, weight=nan_weight)
    # unchecked, the NaN shows in the value instead of a 0 whose gradient is NaN
    value = Fn.average_class_losses(
        losses, counts, present_only=False, weight=nan_weight, validate=False
    )
    assert torch.isnan(value).all()


def test_zero_weight_of_every_present_class_gives_zero_with_zero_gradient():
    # weights [0, 0, 1] and class 2 absent from volume 0: nothing counts there, a true 0
    logits, labels = _case(3)
    labels[0] = labels[0].clamp_max(1)
    x = logits.clone().requires_grad_(True)
    loss = LovaszSoftmaxLoss(to_onehot_y=True, weight=[0.0, 0.0, 1.0], reduction="none")
    per_class = loss(x, labels)
    assert per_class[0].abs().sum() == 0
    per_class.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0].abs().sum() == 0


# -- 3. an ignore label the label dtype cannot hold --------------------------------------------


def test_uint8_labels_with_ignore_minus_one_never_ignore_255():
    logits, labels = _case(4)
    labels8 = labels.to(torch.uint8)
    loss = LovaszSoftmaxLoss(to_onehot_y=True, ignore_index=-1)
    # no voxel can hold -1: the same value as the int64 labels, nothing ignored
    torch.testing.assert_close(loss(logits, labels8), loss(logits, labels))
    labels8[0, 0, 0, 0, 0] = 255  # not the ignore label: a bad label, not an ignored voxel
    with pytest.raises(ValueError, match=r"ignore_index=-1 \(a uint8 label map cannot hold it\)"):
        loss(logits, labels8)


@pytest.mark.parametrize(
    ("dtype", "ignore", "wrapped"), [(torch.uint8, -1, 255), (torch.int8, 300, 44)]
)
def test_label_equals_compares_numbers(dtype, ignore, wrapped):
    labels = torch.tensor([0, 1, wrapped], dtype=dtype)
    assert (labels == ignore).tolist() == [False, False, True]  # what PyTorch does
    assert Fn.label_equals(labels, ignore).tolist() == [False, False, False]
    assert Fn.label_equals(labels, wrapped).tolist() == [False, False, True]
    assert Fn.label_equals(torch.tensor([True, False]), 255).tolist() == [False, False]


def test_ignore_mask_transform_does_not_wrap_the_ignore_label():
    label = torch.tensor([0, 1, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = IgnoreMaskd("label", ignore_index=-1)({"label": label.clone()})
    assert bool(out["mask"].all())  # -1 is in no uint8 label: every voxel counts
    assert out["label"].flatten().tolist() == [0, 1, 255]


# -- 4. deep supervision: exact integer resizing, valid head weights ----------------------------


def test_resize_nearest_keeps_integer_labels_above_2_pow_24():
    big = (1 << 24) + 1  # not representable in float32
    labels = torch.arange(big, big + 6 * 5 * 4, dtype=torch.int64).view(1, 1, 6, 5, 4)
    resized = resize_nearest(labels, (3, 4, 7))
    assert resized.dtype == torch.int64
    # the same voxels as MONAI's float interpolation picks, read in float64 (exact here)
    expected = F.interpolate(labels.double(), size=(3, 4, 7), mode="nearest-exact").long()
    assert torch.equal(resized, expected)
    assert set(resized.unique().tolist()) <= set(labels.unique().tolist())
    float32_round_trip = F.interpolate(labels.float(), size=(3, 4, 7), mode="nearest-exact")
    assert not torch.equal(float32_round_trip.long(), expected)  # what the old code returned


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int16, torch.float16])
def test_resize_nearest_matches_interpolate_for_every_dtype(dtype):
    g = _gen(5)
    x = torch.randint(0, 2, (2, 3, 7, 9), generator=g).to(dtype)
    for size in [(3, 4), (14, 5), (7, 2), (1, 1)]:
        expected = F.interpolate(x.double(), size=size, mode="nearest-exact").to(dtype)
        got = resize_nearest(x, size)
        assert got.dtype == dtype and torch.equal(got, expected), size


@pytest.mark.parametrize("weights", [[1.0, -0.5], [1.0, math.nan], [math.inf, 1.0]])
def test_head_weights_refuse_negative_and_non_finite(weights):
    with pytest.raises(ValueError, match="finite and >= 0"):
        head_weights(2, weights=weights)


# -- 5. no volume or no voxel -------------------------------------------------------------------


EMPTY_SHAPES = [(0, 3, 4, 4), (2, 3, 0, 4), (1, 3, 4, 0, 2)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_empty_batch_or_spatial_size_raises_a_clear_error(name, shape, validate):
    logits = torch.zeros(shape, requires_grad=True)
    labels = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.long)
    with pytest.raises(ValueError, match=r"at least one volume, one channel and one voxel"):
        ALL_LOSSES[name](validate=validate)(logits, labels)


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_functional_losses_refuse_empty_tensors(shape):
    probs = torch.zeros(shape)
    onehot = torch.zeros(shape)
    for fn in (Fn.lovasz_softmax, Fn.lovasz_hinge):
        with pytest.raises(ValueError, match="at least one volume"):
            fn(probs, onehot)
    with pytest.raises(ValueError, match="at least one volume"):
        Fn.lovasz_class_losses(probs, onehot)


# -- 6. arguments that are not tensors ------------------------------------------------------------


NOT_TENSORS = [[[0.0]], None, "logits", np.zeros((1, 2, 4, 4), dtype=np.float32)]


@pytest.mark.parametrize("bad", NOT_TENSORS, ids=["list", "None", "str", "numpy"])
@pytest.mark.parametrize("argument", ["input", "target", "mask"])
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_non_tensor_arguments_raise_type_error_naming_the_type(name, argument, bad):
    if argument == "mask" and bad is None:
        return  # None is the documented "no mask"
    logits, labels = torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.long)
    args = {"input": logits, "target": labels, "mask": torch.ones(1, 1, 4, 4)}
    args[argument] = bad
    with pytest.raises(
        TypeError, match=rf"{argument} must be a torch.Tensor, got {type(bad).__name__}"
    ):
        ALL_LOSSES[name]()(args["input"], args["target"], args["mask"])


# -- 7. MaskedDiceCELoss checks what the Lovász losses check --------------------------------------


def test_masked_dice_ce_refuses_what_the_lovasz_losses_refuse():
    logits, labels = _case(6)
    loss = MaskedDiceCELoss()
    mask = torch.ones_like(labels)
    mask[..., 0] = 0
    bad = labels.clone()
    bad[..., 0] = 255  # under the mask, but not declared as the ignore label
    with pytest.raises(ValueError, match=r"label map values must lie in \[0, 3\)"):
        loss(logits, bad, mask)
    nan_logits = logits.clone()
    nan_logits[0, 0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        loss(nan_logits, labels)
    with pytest.raises(ValueError, match="fractional"):
        loss(logits, labels.float() + 0.5)
    with pytest.raises(TypeError, match="floating point"):
        loss(logits.long(), labels)
    with pytest.raises(ValueError, match="exactly one class per voxel"):
        loss(logits, torch.ones_like(logits))
    with pytest.raises(ValueError, match="target must be a"):
        loss(logits, labels[:, :, :2])


def test_masked_dice_ce_ignore_index_equals_the_mask_and_monai_without_one():
    logits, labels = _case(7)
    mask = torch.rand(labels.shape, generator=_gen(8)) > 0.3
    ignored = labels.masked_fill(~mask, 255)
    via_ignore = MaskedDiceCELoss(ignore_index=255)(logits, ignored)
    via_mask = MaskedDiceCELoss()(logits, labels, mask)
    torch.testing.assert_close(via_ignore, via_mask)
    monai = DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels)
    torch.testing.assert_close(MaskedDiceCELoss()(logits, labels), monai)
    onehot = F.one_hot(labels[:, 0], 3).movedim(-1, 1)
    torch.testing.assert_close(MaskedDiceCELoss()(logits, onehot), monai)
    # a masked voxel changes nothing, whatever its label
    relabelled = labels.masked_fill(~mask, 2)
    torch.testing.assert_close(MaskedDiceCELoss()(logits, relabelled, mask), via_mask)


def test_masked_dice_ce_in_half_precision_is_computed_in_float32():
    logits, labels = _case(9)
    value = MaskedDiceCELoss()(logits.to(torch.bfloat16), labels)
    expected = MaskedDiceCELoss()(logits.to(torch.bfloat16).float(), labels)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected)


# -- 8. metrics of bool maps ----------------------------------------------------------------------


def test_case_metrics_accept_bool_and_integer_maps():
    g = _gen(10)
    pred = torch.rand(2, 1, 6, 6, generator=g) > 0.5
    label = torch.rand(2, 1, 6, 6, generator=g) > 0.4
    out = case_metrics(pred, label, num_classes=2)
    as_int = case_metrics(pred.long(), label.to(torch.int16), num_classes=2)
    for key in ("Dice", "IoU"):
        torch.testing.assert_close(out[key], as_int[key])
    p, y = pred[:, 0].flatten(1), label[:, 0].flatten(1)
    iou = (p & y).sum(1) / (p | y).sum(1)
    torch.testing.assert_close(out["IoU"][:, 1], iou.float())
    regions = case_metrics(
        pred.expand(2, 2, 6, 6), label.expand(2, 2, 6, 6), num_classes=2, multi_label=True
    )
    torch.testing.assert_close(regions["IoU"][:, 0], iou.float())


# -- 9. reduction="none": one shape rule, values of the definition --------------------------------


def _expected_none(kind, logits, labels, include_background, classes, batch, weight):
    """``weight_c * loss_c`` (0 where the class does not count) of the selected channels,
    from the float64 reference, shaped ``(B or 1, N, 1, ..., 1)``, and the ``(B or 1, N)``
    weights of the classes that count (0 for the others)."""
    num_channels = logits.shape[1]
    fg = F.one_hot(labels[:, 0], num_channels).movedim(-1, 1).bool()
    x = logits.double()
    if kind == "hinge":
        errors, hinge = 1.0 - x * (2.0 * fg.double() - 1.0), True
    else:
        probs = torch.sigmoid(x) if kind == "sigmoid" else torch.softmax(x, 1)
        errors, hinge = (fg.double() - probs).abs(), False
    losses, counts = reference_class_losses(errors, fg, None, per_image=not batch, hinge=hinge)
    first = 0 if include_background else 1
    selected = list(range(first, num_channels)) if isinstance(classes, str) else list(classes)
    counted = (counts > 0).double() if classes == "present" else torch.ones_like(losses)
    w = torch.ones(num_channels, dtype=F64)
    if weight is not None:
        w[first:] = torch.tensor(weight, dtype=F64)
    weights = (counted * w)[:, selected]
    values = losses[:, selected] * weights
    return values.view(*values.shape, *([1] * (logits.ndim - 2))), weights


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "hinge"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("classes", ["present", "all", [2, 1]])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("spatial", [(5, 4), (3, 4, 2)])
def test_reduction_none_shape_rule_and_values(kind, include_background, classes, batch, spatial):
    logits, labels = _case(11, batch=3, channels=4, spatial=spatial)
    labels[0] = labels[0].clamp_max(2)  # class 3 absent from volume 0: "present" differs
    weight = [0.5, 1.0, 2.0, 3.0][(0 if include_background else 1) :]
    options = dict(
        to_onehot_y=True,
        include_background=include_background,
        classes=classes,
        batch=batch,
        weight=weight,
        reduction="none",
    )
    if kind == "hinge":
        loss = LovaszHingeLoss(**options)
    else:
        loss = LovaszSoftmaxLoss(sigmoid=kind == "sigmoid", **options)
    got = loss(logits, labels)
    num_selected = len(classes) if isinstance(classes, list) else 4 - (not include_background)
    assert got.shape == ((1 if batch else 3), num_selected, *([1] * len(spatial)))
    expected, counted = _expected_none(
        kind, logits, labels, include_background, classes, batch, weight
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # the "mean" value: per volume, the sum over channels over the sum of the counted weights
    options["reduction"] = "mean"
    mean = (
        LovaszHingeLoss(**options)
        if kind == "hinge"
        else LovaszSoftmaxLoss(sigmoid=kind == "sigmoid", **options)
    )
    rows = expected.flatten(1).sum(1) / counted.sum(1)
    torch.testing.assert_close(mean(logits, labels).double(), rows.mean(), rtol=1e-5, atol=1e-6)


# -- 15. relied on but untested ----------------------------------------------------------------


@pytest.mark.parametrize("batch", [False, True])
def test_sort_chunks_with_a_partial_last_chunk(batch):
    # 7 rows (7 classes, or 7 (volume, class) pairs) in chunks of 3 rows: 3 + 3 + 1
    g = _gen(12)
    shape = (1, 7, 5, 6) if not batch else (2, 7, 5, 3)
    errors = torch.rand(shape, generator=g, dtype=F64)
    labels = torch.rand(shape, generator=g) > 0.6
    valid = torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.2
    row = 30  # voxels per row (5 x 6, or 2 volumes x 5 x 3 in batch mode)
    whole, counts = Fn.lovasz_class_losses(errors, labels, valid, batch=batch)
    chunked, chunked_counts = Fn.lovasz_class_losses(
        errors, labels, valid, batch=batch, chunk_elements=3 * row
    )
    expected, expected_counts = reference_class_losses(errors, labels, valid, per_image=not batch)
    torch.testing.assert_close(chunked, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(chunked, whole) and torch.equal(chunked_counts, expected_counts)
    assert torch.equal(counts, chunked_counts)


def test_fp16_autocast_on_the_cpu():
    logits, labels = _case(13)
    conv = torch.nn.Conv3d(3, 3, 1)
    for name in ("softmax", "hinge", "lovasz_ce", "masked_dice_ce"):
        loss = ALL_LOSSES[name]()
        with torch.autocast("cpu", dtype=torch.float16):
            out = conv(logits)
            assert out.dtype == torch.float16
            value = loss(out, labels)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        value.backward()
        assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
        expected = loss(out.detach().float(), labels)
        torch.testing.assert_close(value.detach(), expected, rtol=1e-6, atol=1e-6)
        conv.zero_grad()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sort", "histogram"])
def test_row_of_more_than_2_pow_24_voxels(method):
    """Counts of such a row overflow float32's exact integers (its cumulative counts would stop
    at 2^24); the closed form here is exact: every background voxel (error 1) sorts before every
    foreground voxel (error 1/2), so the loss is ``J + (1 - J) / 2`` with ``J = nb / (G + nb)``
    and the gradient of the last background voxel is ``G / ((G + nb - 1) (G + nb))``."""
    num_fg, num_bg = 1 << 20, (1 << 24) + (1 << 21)
    labels = torch.zeros(1, 1, num_fg + num_bg, dtype=torch.bool)
    labels[..., ::17][..., :num_fg] = True  # foreground spread through the row
    assert int(labels.sum()) == num_fg
    errors = torch.where(labels, 0.5, 1.0).requires_grad_(True)
    value, counts = Fn.lovasz_class_losses(errors, labels, method=method, bins=4)
    jaccard = num_bg / (num_fg + num_bg)
    assert int(counts) == num_fg
    assert value.item() == pytest.approx(jaccard + (1 - jaccard) / 2, rel=1e-6)
    value.sum().backward()
    grad = errors.grad[0, 0]
    assert grad[labels[0, 0]].sum().item() == pytest.approx(1 - jaccard, rel=1e-5)
    assert grad[~labels[0, 0]].sum().item() == pytest.approx(jaccard, rel=1e-5)
    if method == "sort":  # the last background voxel in sorted order has the smallest weight
        union = num_fg + num_bg
        smallest = grad[~labels[0, 0]].min().item()
        assert smallest == pytest.approx(num_fg / ((union - 1) * union), rel=1e-4)


def test_torchmetrics_iou_of_a_class_absent_from_prediction_and_target():
    """A class in neither prediction nor target has no IoU (NaN, not 0 or 1) and mIoU leaves it
    out; a class only in the prediction scores 0."""
    metric = MulticlassJaccardIndex(
        num_classes=4, average="none", ignore_index=METRIC_IGNORE, zero_division=math.nan
    )
    pred = torch.tensor([[0, 1, 1, 3, 0, 0]])
    target = torch.tensor([[0, 1, 0, 0, 0, METRIC_IGNORE]])
    metric.update(pred, target)
    iou = metric.compute()
    assert iou[0].item() == pytest.approx(2 / 4)  # {0,4} of {0,2,3,4}
    assert iou[1].item() == pytest.approx(1 / 2)
    assert math.isnan(iou[2].item())  # absent from both
    assert iou[3].item() == 0.0  # predicted only
    module = LovaszSegmentationModule(4, unet_channels=(4, 8), unet_strides=(2,))
    module_metric = module.val_iou.clone()
    module_metric.update(pred, target)
    torch.testing.assert_close(module_metric.compute(), iou, equal_nan=True)
    assert module.mean_iou(iou).item() == pytest.approx((1 / 2 + 0.0) / 2)  # classes 1 and 3


def test_reduction_none_rule_is_the_one_stated_in_docstring_and_guide():
    """The shape rule of ``reduction="none"`` is written once in words that match the code: no
    claim that the result always broadcasts against the input (it does not for ``N < C``)."""
    from pathlib import Path

    guide = Path(__file__).resolve().parents[1] / "docs" / "guides" / "losses.md"
    doc = LovaszSoftmaxLoss.__doc__
    for text in (guide.read_text(encoding="utf-8"), " ".join(doc.split())):
        assert "(B, N, 1, ..., 1)" in text and "only when" in text
    assert "that broadcasts against the input," not in " ".join(doc.split())
    assert "the same shape rule" in " ".join(LovaszHingeLoss.__doc__.split())


def test_case_metrics_name_nan_maps():
    label = torch.zeros(1, 1, 3, 3)
    pred = label.clone()
    pred[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="pred contains NaN or inf"):
        case_metrics(pred, label, num_classes=2)


# -- review of the first fix: wide unsigned labels, devices, weights after the cast --------------


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_wide_unsigned_label_maps_equal_int64_labels(name, dtype):
    """uint16 label maps are what many NIfTI files hold; they have no min/max kernels."""
    logits, labels = _case(21)
    expected = ALL_LOSSES[name](ignore_index=2)(logits, labels)
    torch.testing.assert_close(ALL_LOSSES[name](ignore_index=2)(logits, labels.to(dtype)), expected)
    bad = labels.clone()
    bad[0, 0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"label map values must lie in \[0, 3\)"):
        ALL_LOSSES[name]()(logits, bad.to(dtype))


def test_functional_losses_take_wide_unsigned_labels_and_check_one_hot_labels():
    logits, labels = _case(22)
    probs = torch.softmax(logits, 1)
    one_hot = F.one_hot(labels[:, 0], 3).movedim(-1, 1)
    expected = Fn.lovasz_softmax(probs, labels)
    for target in (labels.to(torch.uint16), one_hot.to(torch.uint16), one_hot.bool()):
        torch.testing.assert_close(Fn.lovasz_softmax(probs, target), expected)
    with pytest.raises(ValueError, match="only 0 and 1"):  # used to be read as labels.bool()
        Fn.lovasz_softmax(probs, one_hot * 0.5)
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\) one-hot target"):
        Fn.lovasz_softmax(probs, one_hot[..., :4])
    with pytest.raises(ValueError, match=r"values must lie in \[0, 2\)"):
        Fn.lovasz_hinge(logits[:, :1], labels)  # a 0/1 map for one channel: label 2 is refused


def test_case_metrics_accept_wide_unsigned_maps():
    logits, labels = _case(23)
    pred = logits.argmax(1, keepdim=True)
    expected = case_metrics(pred, labels, num_classes=3)
    got = case_metrics(pred.to(torch.uint16), labels.to(torch.uint32), num_classes=3)
    for key in ("Dice", "IoU"):
        torch.testing.assert_close(got[key], expected[key])


@pytest.mark.parametrize("argument", ["target", "mask"])
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_target_or_mask_on_another_device_is_named(name, argument):
    logits, labels = _case(24)
    mask = torch.ones_like(labels)
    if argument == "target":
        labels = labels.to("meta")
    else:
        mask = mask.to("meta")
    with pytest.raises(ValueError, match=rf"{argument} is on meta but the input is on cpu"):
        ALL_LOSSES[name]()(logits, labels, mask=mask)


def test_weights_are_checked_in_the_dtype_they_are_used_in():
    """1e39 is a finite float64 but inf in float32, the dtype the loss keeps its weights in."""
    weight = torch.tensor([1.0, 1e39, 1.0], dtype=F64)
    assert Fn.check_class_weight(weight).isfinite().all()
    with pytest.raises(ValueError, match="finite values >= 0"):
        Fn.check_class_weight(weight, dtype=torch.float32)
    for cls in (LovaszSoftmaxLoss, LovaszHingeLoss):
        with pytest.raises(ValueError, match="finite values >= 0"):
            cls(weight=weight)
    with pytest.raises(ValueError, match="ce_weight must hold finite values >= 0"):
        LovaszCELoss(ce_weight=weight)


def test_head_weights_refuse_all_zero_weights_of_the_heads():
    with pytest.raises(ValueError, match="must not all be zero"):
        head_weights(2, weights=[0.0, 0.0, 1.0])
    assert head_weights(2, weights=[0.0, 1.0]) == [0.0, 1.0]


def test_label_outside_the_classes_under_a_mask_suggests_ignore_index():
    logits, labels = _case(25)
    labels[0, 0, 0, 0, 0] = 255
    mask = (labels != 255).to(torch.uint8)
    for name in ALL_LOSSES:
        with pytest.raises(ValueError, match="pass it as ignore_index"):
            ALL_LOSSES[name]()(logits, labels, mask=mask)
        value = ALL_LOSSES[name](ignore_index=255)(logits, labels)
        torch.testing.assert_close(value, ALL_LOSSES[name](ignore_index=255)(logits, labels, mask))


def test_weight_count_error_names_the_channels_and_the_classes_list():
    logits, labels = _case(26, channels=4)
    loss = LovaszSoftmaxLoss(to_onehot_y=True, classes=[1, 3], weight=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"one value per channel \(4\), got 2 .*listed in classes"):
        loss(logits, labels)


# -- the functional API checks what the loss classes check ---------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda p: p.index_fill(2, torch.tensor([1]), math.nan), "probs contains NaN or inf"),
        (lambda p: p.index_fill(2, torch.tensor([1]), math.inf), "probs contains NaN or inf"),
        (lambda p: 3 * p, r"probabilities in \[0, 1\], got values in \[.*\]; apply a softmax"),
        (lambda p: p - 0.5, r"probabilities in \[0, 1\]"),
    ],
    ids=["nan", "inf", "above_1", "below_0"],
)
def test_lovasz_softmax_refuses_what_is_not_a_probability(change, match):
    logits, labels = _case(27)
    probs = change(torch.softmax(logits, 1))
    with pytest.raises(ValueError, match=match):
        Fn.lovasz_softmax(probs, labels)
    # validate=False skips the checks (the caller vouches for the input), as in the classes
    value = Fn.lovasz_softmax(probs, labels, validate=False)
    assert bool(torch.isfinite(value)) == bool(torch.isfinite(probs).all())


def test_lovasz_hinge_refuses_non_finite_and_non_float_logits():
    logits = torch.randn(2, 1, 4, 3, 5, generator=_gen(28))
    labels = torch.randint(0, 2, (2, 1, 4, 3, 5), generator=_gen(29))
    assert labels.any() and not labels.all()
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="logits contains NaN or inf values"):
            Fn.lovasz_hinge(logits.index_fill(2, torch.tensor([0]), bad), labels)
    with pytest.raises(TypeError, match="logits must be a floating point tensor, got dtype"):
        Fn.lovasz_hinge(logits.long(), labels)
    # the class gives the same value as the function on valid logits
    torch.testing.assert_close(Fn.lovasz_hinge(logits, labels), LovaszHingeLoss()(logits, labels))


def test_check_finite_accepts_finite_values_whose_sum_overflows():
    huge = torch.full((4,), 3e38)  # float32: the sum is inf, every value is finite
    Fn.check_finite(huge, "x")
    with pytest.raises(ValueError, match="x contains NaN or inf values"):
        Fn.check_finite(torch.cat([huge, torch.tensor([math.nan])]), "x")


def test_extension_refuses_errors_outside_its_domain():
    labels = torch.tensor([[1, 0, 1]])
    # errors < 0 used to be clamped to 0: [-1, 0.5, 0.2] gave the value of [0, 0.5, 0.2]
    for errors, match in [
        ([[-1.0, 0.5, 0.2]], "errors must be >= 0.*got a minimum of -1"),
        ([[math.nan, 0.5, 0.2]], "errors contains NaN or inf"),
        ([[math.inf, 0.5, 0.2]], "errors contains NaN or inf"),
    ]:
        for fn in (Fn.lovasz_extension, Fn.lovasz_weights):
            with pytest.raises(ValueError, match=match):
                fn(torch.tensor(errors), labels)
    with pytest.raises(ValueError, match=r"rows with P >= 1 voxels, got shape \(2, 0\)"):
        Fn.lovasz_extension(torch.zeros(2, 0), torch.zeros(2, 0), method="histogram")
    with pytest.raises(TypeError, match="errors must be a floating point tensor"):
        Fn.lovasz_extension(torch.ones(1, 3, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="labels must be bool or hold only 0 and 1"):
        Fn.lovasz_extension(torch.rand(1, 3), 2 * labels)  # 2 used to count as foreground
    with pytest.raises(ValueError, match="valid must be bool or hold only 0 and 1"):
        Fn.lovasz_extension(torch.rand(1, 3), labels, torch.tensor([[2, 1, 0]]))
    with pytest.raises(ValueError, match="fg_sorted must be bool or hold only 0 and 1"):
        Fn.lovasz_grad(torch.tensor([2, 0, 1]))
    with pytest.raises(ValueError, match="valid_sorted must be bool or hold only 0 and 1"):
        Fn.lovasz_grad(torch.tensor([1, 0, 1]), torch.tensor([1, 3, 1]))
    # validate=False: no value check (no host synchronisation), any non-zero is 1
    Fn.lovasz_extension(torch.tensor([[-1.0, 0.5, 0.2]]), labels, validate=False)
    torch.testing.assert_close(
        Fn.lovasz_grad(torch.tensor([2, 0, 1]), validate=False),
        Fn.lovasz_grad(torch.tensor([1, 0, 1])),
    )


@pytest.mark.parametrize("name", ["lovasz_softmax", "lovasz_hinge"])
def test_functions_name_their_first_argument(name):
    argument = "probs" if name == "lovasz_softmax" else "logits"
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    with pytest.raises(TypeError, match=f"{argument} must be a torch.Tensor, got list"):
        getattr(Fn, name)([[[[0.5]]]], labels)
    with pytest.raises(ValueError, match=rf"{argument} must be \(B, C, \*spatial\)"):
        getattr(Fn, name)(torch.rand(1, 2), labels)


def test_zero_one_validity_equals_bool_validity():
    errors, labels = torch.tensor([[0.9, 0.1, 0.6, 0.3]]), torch.tensor([[1, 0, 0, 1]])
    valid = torch.tensor([[1, 1, 0, 1]])
    # the third voxel takes part in nothing: the weights of the three others, 0 for it
    expected = torch.zeros(1, 4)
    expected[:, [0, 1, 3]] = Fn.lovasz_weights(errors[:, [0, 1, 3]], labels[:, [0, 1, 3]])
    for mask in (valid, valid.bool()):
        torch.testing.assert_close(Fn.lovasz_weights(errors, labels, mask), expected)
    fg = torch.tensor([1, 0, 1, 1])
    expected = torch.zeros(4)
    expected[[0, 1, 3]] = Fn.lovasz_grad(fg[[0, 1, 3]])
    for mask in (valid[0], valid[0].bool()):
        torch.testing.assert_close(Fn.lovasz_grad(fg, mask), expected)


@pytest.mark.parametrize("ignore_index", [True, 1.5])
def test_functions_refuse_an_ignore_index_that_is_no_label_value(ignore_index):
    """``True`` ignored class 1 and ``1.5`` matched no voxel, both silently."""
    probs = torch.softmax(torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([[[0, 1, 2, 2, 1, 0, 2, 1]]])
    with pytest.raises(ValueError, match=f"ignore_index must be an integer .*got {ignore_index}"):
        Fn.lovasz_softmax(probs, labels, ignore_index=ignore_index)
    # a numpy integer is a label value: its voxels leave out as under a mask (labels 2 -> 0)
    ignored = Fn.lovasz_softmax(probs, labels, ignore_index=np.int64(2))
    masked = Fn.lovasz_softmax(probs, labels.masked_fill(labels == 2, 0), valid=labels != 2)
    torch.testing.assert_close(ignored, masked)
    assert (labels == 2).any() and ignored != Fn.lovasz_softmax(probs, labels)
