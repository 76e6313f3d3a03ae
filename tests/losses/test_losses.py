"""Tests of the MONAI-style loss classes against the float64 reference of tests/oracle.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.utils import one_hot
from monai.transforms import AsDiscrete

from lovasz_monai import LovaszCELoss, LovaszHingeLoss, LovaszSoftmaxLoss
from lovasz_monai.losses import MaskedDiceCELoss
from tests.oracle import (
    ref_lovasz_hinge,
    ref_lovasz_multilabel,
    ref_lovasz_softmax,
    reference_class_losses,
)

F64 = torch.float64
IGNORE = 255


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_case(seed, batch=2, channels=3, spatial=(4, 3, 5), ignore_frac=0.3, dtype=torch.float32):
    """Logits, a (B, 1, *S) label map holding IGNORE at ignored voxels, and the validity mask.

    The last class is absent from volume 0 (so "present" and "all" differ).
    """
    g = _gen(seed)
    logits = (torch.randn(batch, channels, *spatial, generator=g) * 2).to(dtype)
    labels = torch.randint(0, channels, (batch, 1, *spatial), generator=g)
    if channels > 2:
        labels[0][labels[0] == channels - 1] = 0
    valid = torch.rand(batch, 1, *spatial, generator=g) >= ignore_frac
    valid.view(batch, -1)[:, 0] = True  # every volume keeps a voxel
    labels_ignored = torch.where(valid, labels, torch.full_like(labels, IGNORE))
    return logits, labels, labels_ignored, valid


def multilabel_case(seed, batch=2, channels=3, spatial=(3, 5, 2), dtype=torch.float32):
    """Logits and an overlapping multi-hot target (nested regions, like BraTS TC/WT/ET)."""
    g = _gen(seed)
    logits = (torch.randn(batch, channels, *spatial, generator=g) * 2).to(dtype)
    score = torch.rand(batch, 1, *spatial, generator=g)
    thresholds = torch.linspace(0.3, 0.8, channels).view(1, channels, *[1] * len(spatial))
    target = (score > thresholds).float()  # channel c contains channel c + 1
    target[0, -1] = 0  # an empty channel in volume 0
    valid = torch.rand(batch, 1, *spatial, generator=g) > 0.25
    valid.view(batch, -1)[:, 0] = True
    return logits, target, valid


def compare_value_and_grad(loss_fn, ref_fn, logits, rtol=None, atol=None):
    """Our loss (autograd) vs the float64 reference (autograd through its sort)."""
    x = logits.detach().clone().requires_grad_(True)
    value = loss_fn(x)
    value.backward()
    x64 = logits.detach().to(F64).requires_grad_(True)
    ref = ref_fn(x64)
    ref.backward()
    if rtol is None:
        rtol, atol = (1e-5, 1e-6) if logits.dtype == torch.float32 else (1e-10, 1e-12)
    assert value.dtype == (F64 if logits.dtype == F64 else torch.float32)
    assert value.shape == ()
    torch.testing.assert_close(value.detach().to(F64), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.to(F64), x64.grad, rtol=rtol, atol=atol)
    return value.detach(), x.grad


# --------------------------------------------------------------------------------------------
# against the reference: values and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("classes", ["present", "all", [0, 2], [1]])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_softmax_vs_reference(batch, classes, ignore, dtype):
    logits, labels, labels_ignored, _ = make_case(1, dtype=dtype)
    target = labels_ignored if ignore else labels
    loss = LovaszSoftmaxLoss(
        to_onehot_y=True, batch=batch, classes=classes, ignore_index=IGNORE if ignore else None
    )

    def ref(x):
        return ref_lovasz_softmax(
            torch.softmax(x, 1),
            target[:, 0],
            classes=classes,
            per_image=not batch,
            ignore=IGNORE if ignore else None,
        )

    value, grad = compare_value_and_grad(lambda x: loss(x, target), ref, logits)
    assert 0 <= value <= 1
    if ignore:  # ignored voxels get no gradient at all
        assert (grad.masked_select(target == IGNORE) == 0).all()


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("classes", ["present", "all"])
def test_softmax_include_background_false_vs_reference(batch, classes):
    logits, _, labels_ignored, _ = make_case(2, channels=4)
    loss = LovaszSoftmaxLoss(
        to_onehot_y=True,
        include_background=False,
        batch=batch,
        classes=classes,
        ignore_index=IGNORE,
    )

    # channel 0 out of the average, but its voxels are background for classes 1..3 and the
    # softmax runs over all four channels
    def ref(x):
        return ref_lovasz_softmax(
            torch.softmax(x, 1),
            labels_ignored[:, 0],
            classes=classes,
            per_image=not batch,
            ignore=IGNORE,
            channels=[1, 2, 3],
        )

    compare_value_and_grad(lambda x: loss(x, labels_ignored), ref, logits)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("classes", ["present", "all"])
def test_softmax_class_weights_vs_reference(batch, include_background, classes):
    logits, _, labels_ignored, _ = make_case(3, channels=4)
    weight = [0.5, 2.0, 1.0, 3.0] if include_background else [2.0, 1.0, 3.0]
    per_channel = weight if include_background else [0.0, *weight]
    loss = LovaszSoftmaxLoss(
        to_onehot_y=True,
        include_background=include_background,
        batch=batch,
        classes=classes,
        weight=weight,
        ignore_index=IGNORE,
    )

    def ref(x):
        return ref_lovasz_softmax(
            torch.softmax(x, 1),
            labels_ignored[:, 0],
            classes=classes,
            per_image=not batch,
            ignore=IGNORE,
            channels=range(0 if include_background else 1, 4),
            weight=per_channel,
        )

    compare_value_and_grad(lambda x: loss(x, labels_ignored), ref, logits)
    # a scalar weight changes nothing
    torch.testing.assert_close(
        LovaszSoftmaxLoss(to_onehot_y=True, weight=2.5, ignore_index=IGNORE)(
            logits, labels_ignored
        ),
        LovaszSoftmaxLoss(to_onehot_y=True, ignore_index=IGNORE)(logits, labels_ignored),
    )


def test_softmax_weight_with_class_list_selects_weights_of_listed_channels():
    logits, _, labels_ignored, _ = make_case(4, channels=4)
    loss = LovaszSoftmaxLoss(
        to_onehot_y=True,
        include_background=False,
        classes=[1, 3],
        weight=[2.0, 5.0, 3.0],  # channels 1, 2, 3
        ignore_index=IGNORE,
    )

    def ref(x):
        return ref_lovasz_softmax(
            torch.softmax(x, 1),
            labels_ignored[:, 0],
            classes=[1, 3],
            per_image=True,
            ignore=IGNORE,
            weight=[0.0, 2.0, 5.0, 3.0],
        )

    compare_value_and_grad(lambda x: loss(x, labels_ignored), ref, logits)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("classes", ["present", "all", [1, 2]])
@pytest.mark.parametrize("use_mask", [False, True])
def test_sigmoid_multilabel_vs_reference(batch, classes, use_mask):
    logits, target, valid = multilabel_case(5)
    mask = valid if use_mask else None
    loss = LovaszSoftmaxLoss(sigmoid=True, batch=batch, classes=classes)

    def ref(x):
        return ref_lovasz_multilabel(
            torch.sigmoid(x), target, mask, per_image=not batch, classes=classes
        )

    value, _ = compare_value_and_grad(lambda x: loss(x, target, mask), ref, logits)
    assert 0 <= value <= 1


def test_sigmoid_single_channel_binary_vs_reference():
    g = _gen(6)
    logits = torch.randn(2, 1, 5, 6, generator=g)
    target = (torch.rand(2, 1, 5, 6, generator=g) > 0.6).to(torch.int64)
    loss = LovaszSoftmaxLoss(sigmoid=True)
    ref = lambda x: ref_lovasz_multilabel(torch.sigmoid(x), target, per_image=True)  # noqa: E731
    compare_value_and_grad(lambda x: loss(x, target), ref, logits)
    # other_act=torch.sigmoid is the same loss
    torch.testing.assert_close(
        LovaszSoftmaxLoss(other_act=torch.sigmoid)(logits, target), loss(logits, target)
    )
    # softmax=False: the input holds probabilities
    torch.testing.assert_close(
        LovaszSoftmaxLoss(softmax=False)(torch.sigmoid(logits), target), loss(logits, target)
    )


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.int64, torch.uint8, torch.bool])
def test_hinge_binary_vs_reference(batch, target_dtype):
    g = _gen(7)
    logits = torch.randn(3, 1, 4, 6, generator=g) * 2
    target = torch.rand(3, 1, 4, 6, generator=g) > 0.6
    target[1] = False  # an empty volume: its false positives still cost (classes="all")
    mask = torch.rand(3, 1, 4, 6, generator=g) > 0.2
    loss = LovaszHingeLoss(batch=batch)
    ref = lambda x: ref_lovasz_hinge(x, target, mask, per_image=not batch)  # noqa: E731
    compare_value_and_grad(lambda x: loss(x, target.to(target_dtype), mask), ref, logits)
    if target_dtype == torch.bool:
        return
    # the same with the ignore label instead of the mask
    labels = torch.where(
        mask, target.to(torch.uint8), torch.full_like(target, 7, dtype=torch.uint8)
    )
    loss_ignore = LovaszHingeLoss(batch=batch, ignore_index=7)
    compare_value_and_grad(lambda x: loss_ignore(x, labels.to(target_dtype)), ref, logits)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("classes", ["all", "present", [0, 2]])
def test_hinge_multilabel_vs_reference(batch, classes):
    logits, target, valid = multilabel_case(8)
    loss = LovaszHingeLoss(batch=batch, classes=classes)
    ref = lambda x: ref_lovasz_hinge(  # noqa: E731
        x, target, valid, per_image=not batch, classes=classes
    )
    compare_value_and_grad(lambda x: loss(x, target, valid), ref, logits)


def test_hinge_label_map_with_to_onehot_y_vs_reference():
    logits, _, labels_ignored, valid = make_case(9)
    loss = LovaszHingeLoss(to_onehot_y=True, ignore_index=IGNORE)
    fg = one_hot(torch.where(valid, labels_ignored, 0), 3, dim=1).bool()
    ref = lambda x: ref_lovasz_hinge(x, fg, valid, per_image=True)  # noqa: E731
    compare_value_and_grad(lambda x: loss(x, labels_ignored), ref, logits)


def test_hinge_include_background_false():
    logits, target, valid = multilabel_case(10)
    loss = LovaszHingeLoss(include_background=False)
    ref = lambda x: ref_lovasz_hinge(x, target, valid, channels=[1, 2])  # noqa: E731
    compare_value_and_grad(lambda x: loss(x, target, valid), ref, logits)
    # with a single channel, include_background=False keeps it
    single = LovaszHingeLoss(include_background=False)
    torch.testing.assert_close(
        single(logits[:, :1], target[:, :1]), LovaszHingeLoss()(logits[:, :1], target[:, :1])
    )


def _ref_ce(x, labels_ignored, ce_weight=None, label_smoothing=0.0, reduction="mean"):
    return F.cross_entropy(
        x,
        labels_ignored[:, 0].long(),
        weight=None if ce_weight is None else torch.tensor(ce_weight, dtype=x.dtype),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("lambda_lovasz", "lambda_ce", "ce_weight", "label_smoothing"),
    [(1.0, 1.0, None, 0.0), (0.7, 2.0, [1.0, 3.0, 0.5], 0.0), (1.0, 0.5, [2.0, 1.0, 1.0], 0.1)],
)
def test_lovasz_ce_vs_reference(
    batch, reduction, lambda_lovasz, lambda_ce, ce_weight, label_smoothing
):
    logits, _, labels_ignored, _ = make_case(11)
    loss = LovaszCELoss(
        to_onehot_y=True,
        batch=batch,
        reduction=reduction,
        ignore_index=IGNORE,
        lambda_lovasz=lambda_lovasz,
        lambda_ce=lambda_ce,
        ce_weight=ce_weight,
        label_smoothing=label_smoothing,
    )

    def ref(x):
        lovasz = ref_lovasz_softmax(
            torch.softmax(x, 1), labels_ignored[:, 0], per_image=not batch, ignore=IGNORE
        )
        if reduction == "sum" and not batch:
            lovasz = lovasz * x.shape[0]  # sum over volumes of the per-volume class mean
        ce = _ref_ce(x, labels_ignored, ce_weight, label_smoothing, reduction)
        return lambda_lovasz * lovasz + lambda_ce * ce

    compare_value_and_grad(lambda x: loss(x, labels_ignored), ref, logits, rtol=1e-5, atol=1e-5)


def test_lovasz_ce_parts_and_include_background():
    logits, _, labels_ignored, _ = make_case(12)
    ce_only = LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, lambda_lovasz=0.0, lambda_ce=1.0)
    torch.testing.assert_close(
        ce_only(logits, labels_ignored), _ref_ce(logits, labels_ignored), rtol=1e-6, atol=1e-6
    )
    lovasz_only = LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, lambda_ce=0.0)
    torch.testing.assert_close(
        lovasz_only(logits, labels_ignored),
        LovaszSoftmaxLoss(to_onehot_y=True, ignore_index=IGNORE)(logits, labels_ignored),
    )
    # include_background configures the Lovász term only; CE keeps every channel (and its
    # weight is the default, 0.3)
    nobg = LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, include_background=False)
    expected = LovaszSoftmaxLoss(to_onehot_y=True, ignore_index=IGNORE, include_background=False)(
        logits, labels_ignored
    ) + 0.3 * _ref_ce(logits, labels_ignored)
    torch.testing.assert_close(nobg(logits, labels_ignored), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ce_weight", [None, [1.0, 2.0, 0.5]])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lovasz_ce_sigmoid_vs_reference(ce_weight, reduction):
    logits, target, valid = multilabel_case(13)
    loss = LovaszCELoss(sigmoid=True, ce_weight=ce_weight, reduction=reduction)

    def ref(x):
        lovasz = ref_lovasz_multilabel(torch.sigmoid(x), target, valid, per_image=True)
        if reduction == "sum":
            lovasz = lovasz * x.shape[0]
        rows = x.movedim(1, -1)[valid[:, 0]]  # (N_valid, C) by boolean indexing
        rows_t = target.to(x.dtype).movedim(1, -1)[valid[:, 0]]
        pos_weight = None if ce_weight is None else torch.tensor(ce_weight, dtype=x.dtype)
        bce = F.binary_cross_entropy_with_logits(
            rows, rows_t, pos_weight=pos_weight, reduction=reduction
        )
        return lovasz + bce

    compare_value_and_grad(lambda x: loss(x, target, valid), ref, logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# gradcheck in float64 (distinct errors, no hinge kink nearby)
# --------------------------------------------------------------------------------------------


def _distinct_logits(seed, shape):
    g = _gen(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


@pytest.mark.parametrize("batch", [False, True])
def test_gradcheck_softmax(batch):
    x = _distinct_logits(20, (2, 3, 3, 4)).requires_grad_()
    labels = torch.randint(0, 3, (2, 1, 3, 4), generator=_gen(21))
    labels[0, 0, 0, :2] = IGNORE
    loss = LovaszSoftmaxLoss(to_onehot_y=True, batch=batch, ignore_index=IGNORE)
    assert torch.autograd.gradcheck(lambda t: loss(t, labels), (x,))


def test_gradcheck_sigmoid():
    x = _distinct_logits(22, (2, 2, 3, 4)).requires_grad_()
    target = (torch.rand(2, 2, 3, 4, generator=_gen(23)) > 0.5).float()
    loss = LovaszSoftmaxLoss(sigmoid=True, classes="all")
    assert torch.autograd.gradcheck(lambda t: loss(t, target), (x,))


@pytest.mark.parametrize("channels", [1, 2])
def test_gradcheck_hinge(channels):
    g = _gen(24)
    shape = (2, channels, 3, 4)
    # |x| in [0.1, 0.8] or [1.2, 2]: every margin 1 -/+ |x| stays >= 0.2 away from the relu kink
    magnitude = torch.rand(*shape, generator=g, dtype=F64) * 0.7 + 0.1
    magnitude = torch.where(torch.rand(*shape, generator=g) > 0.5, magnitude + 1.1, magnitude)
    x = (magnitude * torch.sign(torch.randn(*shape, generator=g, dtype=F64))).requires_grad_()
    target = (torch.rand(*shape, generator=g) > 0.5).float()
    loss = LovaszHingeLoss()
    assert torch.autograd.gradcheck(lambda t: loss(t, target), (x,))


@pytest.mark.parametrize("sigmoid", [False, True])
def test_gradcheck_lovasz_ce(sigmoid):
    x = _distinct_logits(25, (2, 3, 3, 4)).requires_grad_()
    if sigmoid:
        target = (torch.rand(2, 3, 3, 4, generator=_gen(26)) > 0.5).float()
        loss = LovaszCELoss(sigmoid=True, ce_weight=[1.0, 2.0, 0.5])
    else:
        target = torch.randint(0, 3, (2, 1, 3, 4), generator=_gen(26))
        target[1, 0, 0, 0] = IGNORE
        loss = LovaszCELoss(
            to_onehot_y=True, ignore_index=IGNORE, ce_weight=[1.0, 2.0, 0.5], label_smoothing=0.1
        )
    assert torch.autograd.gradcheck(lambda t: loss(t, target), (x,))


# --------------------------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------------------------


def _hand_probs():
    # one volume, 2 classes, 4 voxels; class 1 is foreground at voxels 0 and 2
    p1 = torch.tensor([0.9, 0.6, 0.3, 0.2], dtype=F64)
    probs = torch.stack([1 - p1, p1]).unsqueeze(0)  # (1, 2, 4)
    labels = torch.tensor([[[1, 0, 1, 0]]])
    return probs, labels


def test_hand_computed_softmax_on_probabilities():
    probs, labels = _hand_probs()
    # class 1: errors |y - p| = 0.1 (fg), 0.6 (bg), 0.7 (fg), 0.2 (bg); G = 2.
    #   sorted 0.7 fg: J = 1 - 1/2 = 1/2 -> w 1/2; 0.6 bg: J = 1 - 1/3 -> w 1/6;
    #   0.2 bg: J = 1 - 1/4 -> w 1/12; 0.1 fg: J = 1 -> w 1/4
    #   loss_1 = 0.7/2 + 0.6/6 + 0.2/12 + 0.1/4 = 59/120
    # class 0: errors 0.1 (bg), 0.6 (fg), 0.7 (bg), 0.2 (fg); G = 2.
    #   sorted 0.7 bg: J = 1 - 2/3 -> w 1/3; 0.6 fg: J = 1 - 1/3 -> w 1/3; 0.2 fg: J = 1 -> 1/3
    #   loss_0 = (0.7 + 0.6 + 0.2) / 3 = 1/2
    x = probs.clone().requires_grad_()
    loss = LovaszSoftmaxLoss(softmax=False, to_onehot_y=True)(x, labels)
    assert loss.item() == pytest.approx((60 + 59) / 240, abs=1e-15)
    loss.backward()
    # d|y - p|/dp = -1 on foreground, +1 on background; times w, times 1/2 (class mean)
    expected = 0.5 * torch.tensor(
        [[[0.0, -1 / 3, 1 / 3, -1 / 3], [-1 / 4, 1 / 6, -1 / 2, 1 / 12]]], dtype=F64
    )
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-15)
    # include_background=False: class 1 alone
    nobg = LovaszSoftmaxLoss(softmax=False, to_onehot_y=True, include_background=False)
    assert nobg(probs, labels).item() == pytest.approx(59 / 120, abs=1e-15)
    # weights [1, 3]: (1 * 1/2 + 3 * 59/120) / 4 = 237/480
    weighted = LovaszSoftmaxLoss(softmax=False, to_onehot_y=True, weight=[1.0, 3.0])
    assert weighted(probs, labels).item() == pytest.approx(237 / 480, abs=1e-15)
    none = LovaszSoftmaxLoss(softmax=False, to_onehot_y=True, reduction="none")(probs, labels)
    torch.testing.assert_close(none, torch.tensor([[[0.5], [59 / 120]]], dtype=F64))
    # the same as a one-hot target and as a 2D volume
    onehot = torch.stack([1 - labels[:, 0], labels[:, 0]], 1)
    as_2d = LovaszSoftmaxLoss(softmax=False)(probs.view(1, 2, 2, 2), onehot.view(1, 2, 2, 2))
    assert as_2d.item() == pytest.approx((60 + 59) / 240, abs=1e-15)


def test_hand_computed_hinge():
    # margins 1 - x (2y - 1): [1 - 3, 1 - 0.5, 1 - 2, 1 + 0.2] -> errors [0, 0.5, 0, 1.2], G = 2
    # sorted: 1.2 bg (J = 1 - 2/3 = 1/3), 0.5 fg (J = 1 - 1/3 = 2/3, +1/3) -> (1.2 + 0.5) / 3
    x = torch.tensor([[[3.0, 0.5, -2.0, 0.2]]], dtype=F64, requires_grad=True)
    y = torch.tensor([[[1, 1, 0, 0]]])
    loss = LovaszHingeLoss()(x, y)
    assert loss.item() == pytest.approx(1.7 / 3, abs=1e-15)
    loss.backward()
    # d margin / dx = -(2y - 1) on the two active voxels
    torch.testing.assert_close(x.grad, torch.tensor([[[0.0, -1 / 3, 0.0, 1 / 3]]], dtype=F64))
    # an all-background volume: the largest margin costs 1 (G = 0): 1 + 0.5 = 1.5
    x0 = torch.tensor([[[0.5, -2.0, -0.1]]], dtype=F64)
    assert LovaszHingeLoss()(x0, torch.zeros(1, 1, 3)).item() == pytest.approx(1.5)
    # classes="present" drops the empty channel: nothing to average -> 0
    assert LovaszHingeLoss(classes="present")(x0, torch.zeros(1, 1, 3)).item() == 0


def test_hand_computed_lovasz_ce():
    probs, labels = _hand_probs()
    logits = probs.log()  # softmax(log p) = p
    ce = -(probs[0, labels[0, 0], torch.arange(4)]).log().mean()
    loss = LovaszCELoss(to_onehot_y=True, lambda_lovasz=2.0, lambda_ce=0.5)(logits, labels)
    assert loss.item() == pytest.approx(2.0 * 119 / 240 + 0.5 * ce.item(), abs=1e-12)


# --------------------------------------------------------------------------------------------
# equivalences
# --------------------------------------------------------------------------------------------


def _removed(x, labels, valid, images):
    """The valid voxels of ``images`` as one (1, C, N, 1) volume (the loss ignores voxel order)."""
    xs = torch.cat([x[b].flatten(1)[:, valid[b].flatten()] for b in images], 1)
    ys = torch.cat([labels[b].flatten(1)[:, valid[b].flatten()] for b in images], 1)
    return xs[None, ..., None], ys[None, ..., None]


LOSSES = {
    "softmax": lambda **kw: LovaszSoftmaxLoss(to_onehot_y=True, **kw),
    "softmax_all": lambda **kw: LovaszSoftmaxLoss(to_onehot_y=True, classes="all", **kw),
    "softmax_nobg": lambda **kw: LovaszSoftmaxLoss(
        to_onehot_y=True, include_background=False, **kw
    ),
    "histogram": lambda **kw: LovaszSoftmaxLoss(to_onehot_y=True, method="histogram", bins=8, **kw),
    "hinge": lambda **kw: LovaszHingeLoss(to_onehot_y=True, **kw),
    "hinge_histogram": lambda **kw: LovaszHingeLoss(
        to_onehot_y=True, method="histogram", bins=8, **kw
    ),
    "ce": lambda **kw: LovaszCELoss(to_onehot_y=True, **kw),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("batch", [False, True])
def test_ignore_index_equals_removing_the_voxels(name, batch):
    logits, _, labels_ignored, valid = make_case(30)
    x = logits.clone().requires_grad_()
    value = LOSSES[name](batch=batch, ignore_index=IGNORE)(x, labels_ignored)
    value.backward()
    assert (x.grad.masked_select(~valid) == 0).all()

    x2 = logits.clone().requires_grad_()
    plain = LOSSES[name]()
    if batch:  # one set of voxels (for CE too: it averages over all valid voxels)
        expected = plain(*_removed(x2, labels_ignored, valid, range(2)))
    else:
        parts = [plain(*_removed(x2, labels_ignored, valid, [b])) for b in range(2)]
        expected = torch.stack(parts).mean()
        if name == "ce":  # the CE term averages over all valid voxels of the batch, not per volume
            ce = LovaszCELoss(to_onehot_y=True, lambda_lovasz=0.0)
            lov = LovaszCELoss(to_onehot_y=True, lambda_ce=0.0)
            parts = [lov(*_removed(x2, labels_ignored, valid, [b])) for b in range(2)]
            expected = torch.stack(parts).mean() + ce(*_removed(x2, labels_ignored, valid, [0, 1]))
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
def test_mask_equals_ignore_index(name, batch, mask_dtype):
    logits, labels, labels_ignored, valid = make_case(31)
    g = _gen(32)
    # the masked voxels hold arbitrary (valid) labels
    scrambled = torch.where(valid, labels, torch.randint(0, 3, labels.shape, generator=g))
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    a = LOSSES[name](batch=batch, ignore_index=IGNORE)(x1, labels_ignored)
    b = LOSSES[name](batch=batch)(x2, scrambled, valid.to(mask_dtype))
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-8)
    # mask and ignore_index together: the union of both is left out
    extra = torch.rand(labels.shape, generator=g) > 0.3
    c = LOSSES[name](batch=batch, ignore_index=IGNORE)(logits, labels_ignored, extra.to(mask_dtype))
    both = torch.where(extra, labels_ignored, torch.full_like(labels, IGNORE))
    d = LOSSES[name](batch=batch, ignore_index=IGNORE)(logits, both)
    torch.testing.assert_close(c, d, rtol=0, atol=1e-7)


@pytest.mark.parametrize("batch", [False, True])
def test_one_hot_target_equals_label_map(batch):
    logits, labels, labels_ignored, valid = make_case(33)
    for loss_type, kw in (
        (LovaszSoftmaxLoss, {}),
        (LovaszHingeLoss, {}),
        (LovaszCELoss, {"ce_weight": [1.0, 2.0, 3.0]}),
    ):
        from_map = loss_type(to_onehot_y=True, batch=batch, **kw)(logits, labels)
        onehot = one_hot(labels, 3, dim=1)
        from_onehot = loss_type(batch=batch, **kw)(logits, onehot)
        torch.testing.assert_close(from_map, from_onehot, rtol=0, atol=1e-7)
        # AsDiscrete(to_onehot=C) on each channel-first label map
        as_discrete = torch.stack([AsDiscrete(to_onehot=3)(labels[b]) for b in range(2)])
        from_transform = loss_type(batch=batch, **kw)(logits, torch.as_tensor(as_discrete))
        torch.testing.assert_close(from_map, from_transform, rtol=0, atol=1e-7)
        # a one-hot target with all-zero (masked) voxels + mask == label map + ignore_index
        masked_onehot = onehot * valid
        a = loss_type(batch=batch, **kw)(logits, masked_onehot, valid)
        b = loss_type(to_onehot_y=True, batch=batch, ignore_index=IGNORE, **kw)(
            logits, labels_ignored
        )
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.int16, torch.float32, F64]
)
def test_label_map_dtypes(dtype):
    logits, _, labels_ignored, _ = make_case(34)
    for loss_type in (LovaszSoftmaxLoss, LovaszCELoss, LovaszHingeLoss):
        expected = loss_type(to_onehot_y=True, ignore_index=IGNORE)(logits, labels_ignored)
        got = loss_type(to_onehot_y=True, ignore_index=IGNORE)(logits, labels_ignored.to(dtype))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_per_volume_mode_is_mean_of_each_volume_alone(name):
    logits, _, labels_ignored, _ = make_case(35, batch=3)
    loss = LOSSES[name](ignore_index=IGNORE)
    got = loss(logits, labels_ignored)
    if name == "ce":
        loss = LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, lambda_ce=0.0)
        got = got - LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, lambda_lovasz=0.0)(
            logits, labels_ignored
        )
    alone = torch.stack([loss(logits[b : b + 1], labels_ignored[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(got, alone.mean(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("batch", [False, True])
def test_2d_equals_3d_with_depth_one(name, batch):
    logits, _, labels_ignored, _ = make_case(36, spatial=(5, 6))
    loss = LOSSES[name](batch=batch, ignore_index=IGNORE)
    got2d = loss(logits, labels_ignored)
    got3d = loss(logits.unsqueeze(-1), labels_ignored.unsqueeze(-1))
    torch.testing.assert_close(got2d, got3d, rtol=0, atol=1e-7)
    # and 1D: the loss does not depend on the spatial layout
    got1d = loss(logits.flatten(2), labels_ignored.flatten(2))
    torch.testing.assert_close(got2d, got1d, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("classes", ["present", "all"])
@pytest.mark.parametrize("weighted", [False, True])
def test_reduction_none_shape_and_contents(batch, include_background, classes, weighted):
    logits, _, labels_ignored, valid = make_case(40, channels=4)
    weight = None
    if weighted:
        weight = [0.5, 2.0, 1.0, 3.0] if include_background else [2.0, 1.0, 3.0]
    kw = dict(
        to_onehot_y=True,
        include_background=include_background,
        batch=batch,
        classes=classes,
        weight=weight,
        ignore_index=IGNORE,
    )
    out = LovaszSoftmaxLoss(reduction="none", **kw)(logits, labels_ignored)
    channels = list(range(0 if include_background else 1, 4))
    rows = 1 if batch else 2
    assert out.shape == (rows, len(channels), 1, 1, 1)
    assert torch.broadcast_shapes(out.shape, logits[:, channels].shape) == logits[:, channels].shape

    fg = one_hot(torch.where(valid, labels_ignored, 0), 4, dim=1).bool()
    errors = (fg.to(F64) - torch.softmax(logits.to(F64), 1)).abs()
    ref, counts = reference_class_losses(errors, fg, valid, per_image=not batch)
    w = torch.ones(len(channels), dtype=F64) if weight is None else torch.tensor(weight, dtype=F64)
    counted = (counts[:, channels] > 0).to(F64) if classes == "present" else 1.0
    expected = ref[:, channels] * counted * w
    torch.testing.assert_close(out.view(rows, -1).to(F64), expected, rtol=1e-5, atol=1e-6)
    # "mean" is the weighted class mean of those rows, averaged over volumes
    mean = LovaszSoftmaxLoss(reduction="mean", **kw)(logits, labels_ignored)
    den = (counted * w).sum(-1) if classes == "present" else w.sum().expand(rows)
    per_row = torch.where(den > 0, expected.sum(-1) / den.clamp_min(1e-300), 0.0)
    torch.testing.assert_close(mean.to(F64), per_row.mean(), rtol=1e-5, atol=1e-6)
    total = LovaszSoftmaxLoss(reduction="sum", **kw)(logits, labels_ignored)
    torch.testing.assert_close(total.to(F64), per_row.sum(), rtol=1e-5, atol=1e-6)


def test_reduction_none_for_hinge_and_2d():
    logits, target, valid = multilabel_case(41, spatial=(4, 5))
    out = LovaszHingeLoss(reduction="none")(logits, target, valid)
    assert out.shape == (2, 3, 1, 1)
    per_volume = out.sum(1).view(-1) / 3
    torch.testing.assert_close(
        per_volume.mean(), LovaszHingeLoss()(logits, target, valid), rtol=1e-6, atol=1e-7
    )
    out = LovaszHingeLoss(reduction="none", batch=True)(logits, target, valid)
    assert out.shape == (1, 3, 1, 1)
    # the (1, C, 1, 1) tensor multiplies a per-voxel map of the input shape (DiceLoss convention)
    assert (out * logits).shape == logits.shape


def test_reduction_sum_and_mean():
    logits, _, labels_ignored, _ = make_case(42, batch=3)
    kw = dict(to_onehot_y=True, ignore_index=IGNORE)
    mean = LovaszSoftmaxLoss(**kw)(logits, labels_ignored)
    total = LovaszSoftmaxLoss(reduction="sum", **kw)(logits, labels_ignored)
    torch.testing.assert_close(total, 3 * mean)
    # with batch=True there is one row: sum == mean
    mean_b = LovaszSoftmaxLoss(batch=True, **kw)(logits, labels_ignored)
    sum_b = LovaszSoftmaxLoss(batch=True, reduction="sum", **kw)(logits, labels_ignored)
    torch.testing.assert_close(sum_b, mean_b)


# --------------------------------------------------------------------------------------------
# volumes without any valid voxel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*LOSSES, "sigmoid"])
def test_volume_without_valid_voxel_contributes_zero(name):
    logits, _, labels_ignored, _ = make_case(50)
    labels_ignored[1] = IGNORE
    if name == "sigmoid":
        loss = LovaszSoftmaxLoss(to_onehot_y=True, sigmoid=True, ignore_index=IGNORE)
    else:
        loss = LOSSES[name](ignore_index=IGNORE)
    x = logits.clone().requires_grad_()
    value = loss(x, labels_ignored)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[1] == 0).all()
    alone = loss(logits[:1], labels_ignored[:1])
    if name == "ce":  # the CE term averages over the valid voxels of the whole batch
        torch.testing.assert_close(
            value,
            LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, lambda_ce=0.0)(
                logits[:1], labels_ignored[:1]
            )
            / 2
            + LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, lambda_lovasz=0.0)(
                logits[:1], labels_ignored[:1]
            ),
        )
    else:
        torch.testing.assert_close(value, alone / 2)
    if name in LOSSES and name != "ce":  # LovaszCELoss has no reduction="none"
        none = LOSSES[name](ignore_index=IGNORE, reduction="none")(logits, labels_ignored)
        assert (none[1] == 0).all()
        assert (none[0] != 0).any()


@pytest.mark.parametrize("name", [*LOSSES, "sigmoid"])
@pytest.mark.parametrize("batch", [False, True])
def test_batch_without_valid_voxel_gives_zero_and_zero_gradient(name, batch):
    logits, _, labels_ignored, _ = make_case(51)
    labels_ignored[:] = IGNORE
    if name == "sigmoid":
        loss = LovaszSoftmaxLoss(to_onehot_y=True, sigmoid=True, batch=batch, ignore_index=IGNORE)
    else:
        loss = LOSSES[name](batch=batch, ignore_index=IGNORE)
    x = logits.clone().requires_grad_()
    value = loss(x, labels_ignored)
    value.backward()
    assert value.item() == 0
    assert torch.isfinite(x.grad).all()
    assert (x.grad == 0).all()
    # the same through an all-zero mask
    x = logits.clone().requires_grad_()
    value = LOSSES["softmax"](batch=batch)(
        x, torch.zeros_like(labels_ignored), torch.zeros_like(labels_ignored, dtype=torch.bool)
    )
    value.backward()
    assert value.item() == 0
    assert (x.grad == 0).all()


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(60)).to(dtype)


def _labels(*shape, high=3):
    return torch.randint(0, high, shape, generator=_gen(61))


def _onehot(b=2, c=3, *spatial):
    return one_hot(_labels(b, 1, *spatial, high=c), c, dim=1)


BAD_FORWARD = [
    # (loss factory, input, target, mask, exception, match)
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 5),
        None,
        ValueError,
        r"\(2, 1, 4, 4\).*got shape \(2, 1, 4, 5\)",
        id="target-spatial-shape",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4),
        _labels(1, 1, 4, 4),
        None,
        ValueError,
        r"got shape \(1, 1, 4, 4\)",
        id="target-batch",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(),
        _x(2, 3, 4, 4),
        _onehot(2, 2, 4, 4),
        None,
        ValueError,
        r"one-hot target \(2, 3, 4, 4\), got shape \(2, 2, 4, 4\)",
        id="channel-count",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4),
        _labels(2, 4, 4),
        None,
        ValueError,
        r"got shape \(2, 4, 4\)",
        id="target-without-channel-dim",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        None,
        ValueError,
        r"label map.*3 channels.*to_onehot_y=True",
        id="label-map-without-to_onehot_y",
    ),
    pytest.param(
        lambda: LovaszHingeLoss(),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        None,
        ValueError,
        r"to_onehot_y",
        id="hinge-label-map-without-to_onehot_y",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4),
        _onehot(2, 3, 4, 4),
        None,
        ValueError,
        r"to_onehot_y=True expects a label map with 1 channel, got a target with 3 channels",
        id="to_onehot_y-with-one-hot",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4, high=4),
        None,
        ValueError,
        r"\[0, 3\).*got values in \[0, 3\]",
        id="label-too-large",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True, ignore_index=255),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4) - 1,
        None,
        ValueError,
        r"\[0, 3\) or equal ignore_index=255, got values in \[-1, 1\]",
        id="negative-label",
    ),
    pytest.param(
        lambda: LovaszHingeLoss(),
        _x(2, 1, 4, 4),
        _labels(2, 1, 4, 4),
        None,
        ValueError,
        r"\[0, 2\)",
        id="hinge-binary-label-2",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4).float() + 0.5,
        None,
        ValueError,
        r"fractional",
        id="fractional-labels",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4).index_put_((torch.tensor([0]),), torch.tensor(float("nan"))),
        _labels(2, 1, 4, 4),
        None,
        ValueError,
        r"NaN or inf",
        id="nan-input",
    ),
    pytest.param(
        lambda: LovaszHingeLoss(),
        _x(2, 1, 4, 4).index_put_((torch.tensor([1]),), torch.tensor(float("inf"))),
        _labels(2, 1, 4, 4, high=2),
        None,
        ValueError,
        r"NaN or inf",
        id="inf-input-hinge",
    ),
    pytest.param(
        lambda: LovaszCELoss(to_onehot_y=True),
        _x(2, 3, 4, 4).index_put_((torch.tensor([1]),), torch.tensor(-float("inf"))),
        _labels(2, 1, 4, 4),
        None,
        ValueError,
        r"NaN or inf",
        id="inf-input-ce",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(),
        _x(2, 3, 4, 4),
        (_onehot(2, 3, 4, 4) + torch.eye(3)[0].view(1, 3, 1, 1)).clamp(max=1),
        None,
        ValueError,
        r"exactly one class per voxel",
        id="multi-hot-with-softmax",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(),
        _x(2, 3, 4, 4),
        torch.zeros(2, 3, 4, 4),
        None,
        ValueError,
        r"exactly one class per voxel",
        id="empty-one-hot-with-softmax",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(sigmoid=True),
        _x(2, 3, 4, 4),
        _onehot(2, 3, 4, 4) * 2,
        None,
        ValueError,
        r"only 0 and 1",
        id="one-hot-values",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        torch.ones(2, 3, 4, 4),
        ValueError,
        r"mask must have shape \(B, 1, \*spatial\) = \(2, 1, 4, 4\), got \(2, 3, 4, 4\)",
        id="mask-shape",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        torch.full((2, 1, 4, 4), 2.0),
        ValueError,
        r"mask must be bool or hold only 0 and 1",
        id="mask-values",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        [[1.0]],
        TypeError,
        r"mask must be a torch.Tensor, got list",
        id="mask-type",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _labels(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        None,
        TypeError,
        r"floating point.*torch.int64",
        id="integer-input",
    ),
    pytest.param(
        lambda: LovaszHingeLoss(),
        _labels(2, 1, 4, 4, high=2),
        _labels(2, 1, 4, 4, high=2),
        None,
        TypeError,
        r"floating point",
        id="integer-input-hinge",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4).tolist(),
        None,
        TypeError,
        r"target must be a torch.Tensor",
        id="target-type",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True),
        _x(2, 3),
        _labels(2, 1),
        None,
        ValueError,
        r"at least one spatial dimension, got shape \(2, 3\)",
        id="no-spatial-dim",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(),
        _x(2, 1, 4, 4),
        _labels(2, 1, 4, 4, high=2),
        None,
        ValueError,
        r"single channel.*sigmoid=True",
        id="softmax-one-channel",
    ),
    pytest.param(
        lambda: LovaszCELoss(),
        _x(2, 1, 4, 4),
        _labels(2, 1, 4, 4, high=2),
        None,
        ValueError,
        r"single channel",
        id="ce-softmax-one-channel",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(softmax=False, to_onehot_y=True),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        None,
        ValueError,
        r"probabilities in \[0, 1\]",
        id="probabilities-out-of-range",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True, weight=[1.0, 2.0]),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        None,
        ValueError,
        r"weight must have one value per channel \(3\), got 2",
        id="weight-length",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True, include_background=False, weight=[1.0] * 3),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        None,
        ValueError,
        r"weight must have one value per channel \(2, background excluded\), got 3",
        id="weight-length-no-background",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(to_onehot_y=True, classes=[0, 5]),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        None,
        ValueError,
        r"classes \[5\] out of range.*3 channels",
        id="classes-out-of-range",
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(ignore_index=255),
        _x(2, 3, 4, 4),
        _onehot(2, 3, 4, 4),
        None,
        ValueError,
        r"ignore_index applies to label-map targets.*mask",
        id="ignore_index-with-one-hot",
    ),
    pytest.param(
        lambda: LovaszCELoss(to_onehot_y=True, ce_weight=[1.0, 2.0]),
        _x(2, 3, 4, 4),
        _labels(2, 1, 4, 4),
        None,
        ValueError,
        r"ce_weight must have one value per input channel \(3\), got 2",
        id="ce_weight-length",
    ),
]


@pytest.mark.parametrize(("factory", "x", "target", "mask", "exc", "match"), BAD_FORWARD)
def test_bad_forward_input(factory, x, target, mask, exc, match):
    with pytest.raises(exc, match=match):
        factory()(x, target, mask)


BAD_INIT = [
    pytest.param(lambda: LovaszSoftmaxLoss(sigmoid=True, softmax=True), r"mutually exclusive"),
    pytest.param(
        lambda: LovaszSoftmaxLoss(sigmoid=True, other_act=torch.tanh), r"other_act cannot"
    ),
    pytest.param(
        lambda: LovaszSoftmaxLoss(softmax=True, other_act=torch.tanh), r"other_act cannot"
    ),
    pytest.param(lambda: LovaszSoftmaxLoss(reduction="avg"), r"avg"),
    pytest.param(lambda: LovaszHingeLoss(reduction="avg"), r"avg"),
    pytest.param(lambda: LovaszSoftmaxLoss(method="fast"), r"method must be .*'fast'"),
    pytest.param(lambda: LovaszHingeLoss(method="fast"), r"method"),
    pytest.param(lambda: LovaszSoftmaxLoss(classes="some"), r"classes must be .*'some'"),
    pytest.param(lambda: LovaszSoftmaxLoss(classes=[]), r"classes"),
    pytest.param(lambda: LovaszSoftmaxLoss(classes=[-1, 1]), r"classes"),
    pytest.param(
        lambda: LovaszSoftmaxLoss(classes=[0, 1], include_background=False),
        r"include_background",
    ),
    pytest.param(lambda: LovaszSoftmaxLoss(bins=0), r"bins must be a positive integer, got 0"),
    pytest.param(lambda: LovaszSoftmaxLoss(chunk_elements=0), r"chunk_elements"),
    pytest.param(
        lambda: LovaszSoftmaxLoss(weight=[1.0, -1.0]), r"weight must hold finite values >= 0"
    ),
    pytest.param(lambda: LovaszSoftmaxLoss(weight=[[1.0, 1.0]]), r"weight"),
    pytest.param(lambda: LovaszCELoss(reduction="none"), r"none"),
    pytest.param(lambda: LovaszCELoss(softmax=False), r"logits"),
    pytest.param(lambda: LovaszCELoss(lambda_ce=-1.0), r"lambda_lovasz and lambda_ce"),
    pytest.param(lambda: LovaszCELoss(lambda_lovasz=-0.5), r"lambda"),
    # NaN or inf weights would make every loss value NaN or inf
    pytest.param(lambda: LovaszCELoss(lambda_ce=math.nan), r"finite and >= 0, got 1.0 and nan"),
    pytest.param(lambda: LovaszCELoss(lambda_lovasz=math.inf), r"finite and >= 0, got inf"),
    pytest.param(lambda: MaskedDiceCELoss(lambda_dice=math.nan), r"lambda_dice and lambda_ce"),
    pytest.param(lambda: MaskedDiceCELoss(lambda_ce=-1.0), r"lambda_dice and lambda_ce"),
    pytest.param(lambda: LovaszCELoss(label_smoothing=1.0), r"label_smoothing"),
    pytest.param(lambda: LovaszCELoss(ce_weight=[[1.0, 2.0]]), r"ce_weight"),
    pytest.param(lambda: LovaszCELoss(ce_weight=[1.0, -2.0]), r"ce_weight"),
    # read as class 1 before: a float index is no class, True is no label value
    pytest.param(lambda: LovaszSoftmaxLoss(classes=[1.7]), r"integer class indices >= 0"),
    pytest.param(lambda: LovaszSoftmaxLoss(classes=[True]), r"integer class indices >= 0"),
    pytest.param(lambda: LovaszSoftmaxLoss(ignore_index=True), r"ignore_index must be an integer"),
    pytest.param(lambda: LovaszCELoss(ignore_index=1.5), r"ignore_index must be an integer"),
    pytest.param(lambda: LovaszHingeLoss(ignore_index=True), r"ignore_index must be an integer"),
    pytest.param(lambda: MaskedDiceCELoss(ignore_index=2.5), r"ignore_index must be an integer"),
]


@pytest.mark.parametrize(("factory", "match"), BAD_INIT)
def test_bad_constructor_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_other_act_must_be_callable():
    with pytest.raises(TypeError, match="callable"):
        LovaszSoftmaxLoss(other_act="tanh")


def test_validate_false_same_value_on_valid_input():
    logits, labels, labels_ignored, valid = make_case(62)
    target, mtarget, mvalid = multilabel_case(63)
    cases = [
        (
            LovaszSoftmaxLoss,
            dict(to_onehot_y=True, ignore_index=IGNORE),
            logits,
            labels_ignored,
            None,
        ),
        (LovaszSoftmaxLoss, dict(to_onehot_y=True), logits, labels, valid.float()),
        (LovaszSoftmaxLoss, dict(), logits, one_hot(labels, 3, dim=1), valid),
        (LovaszSoftmaxLoss, dict(sigmoid=True), target, mtarget, mvalid),
        (LovaszHingeLoss, dict(), target, mtarget, mvalid),
        (LovaszCELoss, dict(to_onehot_y=True, ignore_index=IGNORE), logits, labels_ignored, None),
        (LovaszCELoss, dict(to_onehot_y=True), logits, labels.float(), valid),
    ]
    for loss_type, kw, x, y, mask in cases:
        checked = loss_type(validate=True, **kw)(x, y, mask)
        unchecked = loss_type(validate=False, **kw)(x, y, mask)
        torch.testing.assert_close(unchecked, checked, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# mixed precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["softmax", "hinge", "ce", "histogram"])
def test_autocast_bf16(name):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 4, 4, 4).bfloat16()
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    labels[0, 0, 0] = IGNORE
    loss = LOSSES[name](ignore_index=IGNORE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        value = loss(logits, labels)
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(conv.weight.grad).all()
    assert conv.weight.grad.abs().sum() > 0
    # the fp32 loss of the same, bf16-rounded, logits
    fp32 = loss(logits.detach().float(), labels)
    torch.testing.assert_close(value.detach(), fp32, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_without_autocast(dtype):
    logits, _, labels_ignored, _ = make_case(64, dtype=dtype)
    x = logits.clone().requires_grad_()
    value = LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE)(x, labels_ignored)
    assert value.dtype == torch.float32
    value.backward()
    assert x.grad.dtype == dtype
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(
        value.detach(),
        LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE)(logits.float(), labels_ignored),
    )


# --------------------------------------------------------------------------------------------
# histogram method inside the losses, module plumbing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [4, 32, 1024])
@pytest.mark.parametrize("batch", [False, True])
def test_histogram_loss_within_bound_of_sort(bins, batch):
    logits, _, labels_ignored, _ = make_case(70, spatial=(6, 6, 4))
    kw = dict(to_onehot_y=True, ignore_index=IGNORE, batch=batch)
    exact = LovaszSoftmaxLoss(**kw)(logits, labels_ignored).item()
    approx = LovaszSoftmaxLoss(method="histogram", bins=bins, **kw)(logits, labels_ignored).item()
    # softmax errors are at most 1: each row is within max(error) / bins <= 1 / bins
    assert -1e-6 <= exact - approx <= 1 / bins + 1e-6


def test_weight_is_a_buffer_and_module_moves():
    loss = LovaszSoftmaxLoss(to_onehot_y=True, weight=[1.0, 2.0, 3.0])
    assert "class_weight" in dict(loss.named_buffers())
    logits, labels, _, _ = make_case(71, dtype=F64)
    expected = loss(logits, labels)
    loss = loss.to(F64)  # Lightning moves the module with the network
    assert loss.class_weight.dtype == F64
    value = loss(logits, labels)
    assert value.dtype == F64
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("batch", [False, True])
def test_memory_layout_and_chunking_do_not_change_the_loss(name, batch):
    logits, _, labels_ignored, _ = make_case(72)
    loss = LOSSES[name](ignore_index=IGNORE, batch=batch)
    expected = loss(logits, labels_ignored)
    channels_last = logits.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(loss(channels_last, labels_ignored), expected, rtol=0, atol=1e-7)
    wide = torch.randn(2, 3, 4, 3, 10, generator=_gen(73))
    wide[..., ::2] = logits  # a strided, non-contiguous view
    torch.testing.assert_close(loss(wide[..., ::2], labels_ignored), expected, rtol=0, atol=1e-7)
    chunked = LOSSES[name](ignore_index=IGNORE, batch=batch, chunk_elements=1)
    torch.testing.assert_close(chunked(logits, labels_ignored), expected, rtol=0, atol=1e-7)


def _value_and_grad(loss, logits, labels):
    x = logits.detach().requires_grad_(True)  # keeps the layout of ``logits``
    value = loss(x, labels)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("batch", [False, True])
def test_non_contiguous_layouts_give_the_contiguous_value(name, batch):
    """channels-last, transposed and expanded (stride 0) views of the same values give the
    value and gradient of their contiguous copies."""
    logits, _, labels_ignored, _ = make_case(75)
    loss = LOSSES[name](ignore_index=IGNORE, batch=batch)
    layouts = {
        "channels_last": logits.to(memory_format=torch.channels_last_3d),
        "transposed": logits.transpose(2, 4).contiguous().transpose(2, 4),
        "expanded_batch": logits[:1].expand(2, -1, -1, -1, -1),
        "expanded_spatial": logits[..., :1].expand(-1, -1, -1, -1, 5),
    }
    for layout, view in layouts.items():
        assert not view.is_contiguous(), layout
        contiguous = view.contiguous()
        expected, expected_grad = _value_and_grad(loss, contiguous, labels_ignored)
        value, grad = _value_and_grad(loss, view, labels_ignored)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7, msg=layout)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-7, msg=layout)
    # and the label map may be a non-contiguous view too
    labels_view = labels_ignored.transpose(2, 4).contiguous().transpose(2, 4)
    torch.testing.assert_close(
        loss(logits, labels_view), loss(logits, labels_ignored), rtol=0, atol=1e-7
    )


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("batch", [False, True])
def test_single_voxel_volumes(name, batch):
    # (B, C, 1, 1): the flattened batch rows are a strided view
    logits, _, labels_ignored, _ = make_case(74, spatial=(1, 1), ignore_frac=0.0)
    loss = LOSSES[name](ignore_index=IGNORE, batch=batch)
    value = loss(logits, labels_ignored)
    assert torch.isfinite(value)
    if batch:  # the same voxels as one volume
        joined = LOSSES[name]()(
            logits.permute(1, 0, 2, 3).reshape(1, 3, 2, 1).contiguous(),
            labels_ignored.permute(1, 0, 2, 3).reshape(1, 1, 2, 1),
        )
        torch.testing.assert_close(value, joined, rtol=1e-6, atol=1e-7)
    else:  # the mean of the volumes' own losses
        alone = [loss(logits[b : b + 1], labels_ignored[b : b + 1]) for b in range(2)]
        torch.testing.assert_close(value, torch.stack(alone).mean(), rtol=1e-6, atol=1e-7)
