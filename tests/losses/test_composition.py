"""LovaszCELoss built from its parts, its defaults, the masked cross-entropy and the settings
object and class selection that the functions and classes share."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lovasz_monai import LovaszCELoss, LovaszSoftmaxLoss
from lovasz_monai.functional import LovaszSettings, select_classes
from lovasz_monai.losses import (
    DEFAULT_LOSS_LAMBDA_CE,
    default_loss,
    masked_cross_entropy,
    masked_nll_loss,
)

IGNORE = 255


def _case(seed: int = 0, channels: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, channels, 6, 5, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, channels, (2, 1, 6, 5, 4), generator=g)
    labels[:, :, :2] = IGNORE
    return logits, labels


def test_defaults_are_the_recommended_recipe():
    assert LovaszCELoss(to_onehot_y=True).lambda_ce == DEFAULT_LOSS_LAMBDA_CE == 0.3
    assert LovaszCELoss(sigmoid=True).lambda_ce == 1.0
    assert LovaszCELoss(to_onehot_y=True, lambda_ce=1.0).lambda_ce == 1.0
    assert default_loss().lambda_ce == LovaszCELoss().lambda_ce


def test_value_is_lovasz_term_plus_cross_entropy_of_torch():
    logits, labels = _case(1)
    loss = LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, lambda_lovasz=0.7)
    lovasz = LovaszSoftmaxLoss(to_onehot_y=True, ignore_index=IGNORE)(logits, labels)
    ce = F.cross_entropy(logits, labels[:, 0].masked_fill(labels[:, 0] == IGNORE, -100))
    torch.testing.assert_close(loss(logits, labels), 0.7 * lovasz + 0.3 * ce)
    assert isinstance(loss.lovasz, LovaszSoftmaxLoss)


SHARED_LOG_SOFTMAX_CASES = {
    "defaults": ({}, "labels", False),
    "weights and smoothing": (
        {"ce_weight": [1.0, 2.0, 0.5, 3.0], "label_smoothing": 0.1, "weight": [1.0, 0.5, 2.0, 1.0]},
        "labels",
        False,
    ),
    "sum, batch, all classes": (
        {"reduction": "sum", "batch": True, "classes": "all"},
        "labels",
        False,
    ),
    "mask": ({}, "labels", True),
    "one-hot target and mask": ({}, "one-hot", True),
    "no cross-entropy": ({"lambda_ce": 0.0}, "labels", False),
    "other activation": ({"other_act": torch.sigmoid}, "labels", True),
}


@pytest.mark.parametrize(
    ("kwargs", "target_kind", "with_mask"),
    SHARED_LOG_SOFTMAX_CASES.values(),
    ids=SHARED_LOG_SOFTMAX_CASES.keys(),
)
def test_value_and_gradient_are_those_of_the_two_terms_computed_apart(
    kwargs, target_kind, with_mask
):
    # LovaszCELoss shares one log-softmax between its terms (softmax over classes); each term on
    # its own normalises the logits itself (softmax for the Lovász term, F.cross_entropy for CE)
    logits, labels = _case(7)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(labels.shape, generator=g) > 0.3 if with_mask else None
    valid = (labels != IGNORE) & (True if mask is None else mask)
    if target_kind == "one-hot":
        target = F.one_hot(labels[:, 0].masked_fill(labels[:, 0] == IGNORE, 0), 4)
        target, terms = target.movedim(-1, 1).double(), {"to_onehot_y": False}
        mask = valid  # a one-hot target has no ignore label: the mask carries it
    else:
        target, terms = labels, {"to_onehot_y": True, "ignore_index": IGNORE}
    ce_only = {"ce_weight", "label_smoothing", "lambda_ce"}
    lovasz_term = LovaszSoftmaxLoss(
        **terms, **{k: v for k, v in kwargs.items() if k not in ce_only}
    )
    ce_weight = kwargs.get("ce_weight")
    ce_term = torch.nn.CrossEntropyLoss(
        weight=None if ce_weight is None else torch.tensor(ce_weight, dtype=torch.float64),
        reduction=kwargs.get("reduction", "mean"),
        label_smoothing=kwargs.get("label_smoothing", 0.0),
    )
    lambda_ce = kwargs.get("lambda_ce", 0.3)
    loss = LovaszCELoss(**terms, lambda_lovasz=0.7, **kwargs)
    shared = logits.clone().requires_grad_(True)
    apart = logits.clone().requires_grad_(True)
    value = loss(shared, target, mask)
    ce_labels = labels[:, 0].masked_fill(~valid[:, 0], -100)
    expected = 0.7 * lovasz_term(apart, target, mask) + lambda_ce * ce_term(apart, ce_labels)
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    torch.testing.assert_close(shared.grad, apart.grad)


def _normalisations(loss, logits, target) -> list[str]:
    """The softmax and log-softmax kernels one forward and backward of ``loss`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss(logits.clone().requires_grad_(True), target).backward()
    kernels = ("aten::_softmax", "aten::_log_softmax")
    return sorted(e.name for e in profile.events() if e.name in kernels)


def test_the_softmax_terms_share_one_normalisation_of_the_logits():
    logits, labels = _case(8)
    shared = LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE)
    assert _normalisations(shared, logits, labels) == ["aten::_log_softmax"]
    # the probe sees F.cross_entropy's own log-softmax and a softmax of the Lovász term apart
    lovasz = LovaszSoftmaxLoss(to_onehot_y=True, ignore_index=IGNORE)

    def apart(x, target):
        ce_labels = target[:, 0].masked_fill(target[:, 0] == IGNORE, -100)
        return lovasz(x, target) + F.cross_entropy(x, ce_labels)

    assert _normalisations(apart, logits, labels) == ["aten::_log_softmax", "aten::_softmax"]


def test_gradcheck_of_the_shared_log_softmax():
    logits, labels = _case(9, channels=3)
    logits = logits[:, :, :3, :2, :2].clone().requires_grad_(True)
    labels = labels[:, :, 2:5, :2, :2] % 3
    loss = LovaszCELoss(to_onehot_y=True, label_smoothing=0.1, ce_weight=[1.0, 2.0, 0.5])
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (logits,))


def test_settings_read_through_to_the_lovasz_term():
    loss = LovaszCELoss(
        to_onehot_y=True, ignore_index=IGNORE, batch=True, method="histogram", bins=64
    )
    read = (loss.ignore_index, loss.batch, loss.method, loss.bins)
    assert read == (IGNORE, True, "histogram", 64)
    assert loss.settings is loss.lovasz.settings
    with pytest.raises(AttributeError):
        loss.not_a_setting  # noqa: B018


def test_state_dict_of_version_0_1_loads():
    loss = LovaszCELoss(to_onehot_y=True, weight=[1.0, 2.0, 3.0, 4.0], ce_weight=[1.0] * 4)
    assert set(loss.state_dict()) == {"lovasz.class_weight", "ce_weight"}
    former = {"class_weight": torch.tensor([4.0, 3.0, 2.0, 1.0]), "ce_weight": torch.ones(4)}
    loss.load_state_dict(former)
    torch.testing.assert_close(loss.class_weight, torch.tensor([4.0, 3.0, 2.0, 1.0]))


def test_zero_lovasz_weight_skips_the_lovasz_term(monkeypatch):
    logits, labels = _case(2)
    loss = LovaszCELoss(to_onehot_y=True, ignore_index=IGNORE, lambda_lovasz=0.0)
    monkeypatch.setattr(loss.lovasz, "compute", lambda *a, **k: pytest.fail("Lovász computed"))
    loss(logits, labels)


def test_label_smoothing_with_sigmoid_is_refused():
    with pytest.raises(ValueError, match="label_smoothing.*sigmoid"):
        LovaszCELoss(sigmoid=True, label_smoothing=0.1)


@pytest.mark.parametrize("weight", [None, [1.0, 2.0, 0.5, 3.0]])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_masked_cross_entropy_is_torch_cross_entropy_with_ignore_index(
    weight, label_smoothing, reduction
):
    logits, labels = _case(3)
    valid = labels != IGNORE
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    expected = F.cross_entropy(
        logits,
        labels[:, 0].masked_fill(~valid[:, 0], -100),
        weight=w,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    target = labels[:, 0].masked_fill(~valid[:, 0], 3)  # counts nowhere (weight 3.0)
    kwargs = {"weight": w, "label_smoothing": label_smoothing, "reduction": reduction}
    value = masked_cross_entropy(logits, target, valid, **kwargs)
    torch.testing.assert_close(value, expected)
    from_log_probs = masked_nll_loss(torch.log_softmax(logits, 1), target, valid, **kwargs)
    torch.testing.assert_close(from_log_probs, expected)


def test_masked_cross_entropy_sigmoid_is_bce_over_valid_voxels():
    logits, labels = _case(4)
    valid = labels != IGNORE
    target = (torch.rand(logits.shape, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    pos_weight = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    per_voxel = F.binary_cross_entropy_with_logits(
        logits, target, pos_weight=pos_weight.view(-1, 1, 1, 1), reduction="none"
    )
    expected = per_voxel[valid.expand_as(per_voxel)].mean()
    value = masked_cross_entropy(logits, target, valid, sigmoid=True, weight=pos_weight)
    torch.testing.assert_close(value, expected)


def test_masked_cross_entropy_without_valid_voxels_is_zero_with_zero_gradient():
    logits, labels = _case(5)
    logits.requires_grad_(True)
    value = masked_cross_entropy(logits, labels[:, 0] % 4, torch.zeros_like(labels, dtype=bool))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(logits.grad).all() and not logits.grad.any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduction": "none"}, "reduction"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"weight": torch.ones(3, dtype=torch.float64)}, "one value per input channel"),
        # a (B, *spatial) mask would broadcast against the wrong axes
        ({"valid": torch.ones(2, 6, 5, 4, dtype=torch.bool)}, r"valid must have shape \(2, 1, 6"),
    ],
)
def test_masked_cross_entropy_refuses_bad_arguments(kwargs, match):
    logits, labels = _case(6)
    with pytest.raises(ValueError, match=match):
        masked_cross_entropy(logits, labels[:, 0] % 4, **kwargs)
    with pytest.raises(ValueError, match=match):
        masked_nll_loss(torch.log_softmax(logits, 1), labels[:, 0] % 4, **kwargs)


def test_settings_are_frozen_and_checked_once():
    settings = LovaszSettings(batch=True, method="histogram", bins=32, distributed=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.bins = 8  # type: ignore[misc]
    assert settings.keywords()["bins"] == 32 and settings.world_size == 1
    for bad, match in [
        ({"method": "exact"}, "method"),
        ({"bins": 0}, "bins"),
        ({"chunk_elements": 0}, "chunk_elements"),
        ({"distributed": True}, "batch=True"),
        ({"distributed": True, "batch": True}, "histogram"),
    ]:
        with pytest.raises(ValueError, match=match):
            LovaszSettings(**bad)
    assert LovaszSoftmaxLoss(method="histogram", bins=16).settings == LovaszSettings(
        method="histogram", bins=16
    )


@pytest.mark.parametrize(
    ("args", "channels", "weight", "present_only"),
    [
        ((3,), [0, 1, 2], None, True),
        ((3, "all", False), [1, 2], None, False),
        ((1, "present", False), [0], None, True),  # one channel keeps it
        ((4, [3, 1], False, torch.tensor([1.0, 2.0, 3.0])), [3, 1], [3.0, 1.0], False),
        ((4, "present", True, torch.tensor(2.0)), [0, 1, 2, 3], [2.0] * 4, True),
    ],
)
def test_select_classes(args, channels, weight, present_only):
    selection = select_classes(*args)
    assert selection.channels == channels and selection.present_only == present_only
    if weight is None:
        assert selection.weight is None
    else:
        assert selection.weight.tolist() == weight


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((3, [3]), "out of range"),
        ((3, [0, 1], False), "class 0"),
        ((3, "all", False, torch.ones(3)), "background excluded"),
        ((3, "some"), "classes must be"),
    ],
)
def test_select_classes_refuses(args, match):
    with pytest.raises(ValueError, match=match):
        select_classes(*args)
