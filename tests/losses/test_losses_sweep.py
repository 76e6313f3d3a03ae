"""A property-based sweep of the public losses over the inputs real pipelines produce.

The four loss classes (Lovász-Softmax, -sigmoid, hinge, Lovász + CE and the masked Dice + CE),
input dtypes (float16/bfloat16/float32/float64), label dtypes (uint8/uint16/int8/int16/int32/
int64, float16/float32, bool), one to four channels (one for the sigmoid and hinge), memory
layouts (channels-last, transposed, expanded), MONAI
``MetaTensor``, masks of several dtypes, ignore labels that the label dtype cannot hold or that
equal a real class, all-ignored volumes, single voxels, 2D and 3D, batch sizes 0, 1 and 3, bad
labels and NaN logits. For each draw the loss gives either the value of the float64 reference
of ``tests/oracle.py`` (and its gradient, for float32/float64 inputs without stride-0 views,
where ties in the errors have no chance to order the voxels differently) or the documented clear
exception: never NaN, a hang or an
unrelated error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor

from lovasz_monai import LovaszCELoss, LovaszHingeLoss, LovaszSoftmaxLoss
from lovasz_monai.losses import MaskedDiceCELoss
from tests.oracle import ref_lovasz_hinge, ref_lovasz_multilabel, reference_lovasz

F64 = torch.float64
INPUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LABEL_DTYPES = [
    torch.uint8,
    torch.uint16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.float32,
    torch.bool,
]
KINDS = ["softmax", "lovasz_ce", "masked_dice_ce", "sigmoid", "hinge"]
LABEL_MAP_KINDS = ("softmax", "lovasz_ce", "masked_dice_ce")
MASK_DTYPES = [None, torch.bool, torch.float32, torch.uint8]
LAYOUTS = ["contiguous", "channels_last", "transposed", "expanded"]
SWEEP = settings(max_examples=50, deadline=None, database=None, derandomize=True)


@dataclass
class Draw:
    kind: str  # one of KINDS: label maps for LABEL_MAP_KINDS, multi-hot targets for the others
    logits: torch.Tensor  # (B, C, *S) in the input dtype, in its layout
    target: torch.Tensor  # label map (B, 1, *S) or multi-hot (B, C, *S) in the label dtype
    mask: torch.Tensor | None
    ignore_index: int | None
    batch: bool
    classes: str
    meta: bool
    error: str | None  # the pattern of the exception this draw must raise, or None

    def loss(self) -> torch.nn.Module:
        common = {"batch": self.batch, "classes": self.classes, "ignore_index": self.ignore_index}
        if self.kind == "softmax":
            return LovaszSoftmaxLoss(to_onehot_y=True, **common)
        if self.kind == "lovasz_ce":
            return LovaszCELoss(to_onehot_y=True, lambda_ce=0.5, **common)
        if self.kind == "masked_dice_ce":
            return MaskedDiceCELoss(ignore_index=self.ignore_index)
        if self.kind == "sigmoid":
            return LovaszSoftmaxLoss(sigmoid=True, **common)
        return LovaszHingeLoss(**common)

    def valid(self) -> torch.Tensor:
        """``(B, 1, *S)`` bool: the voxels that count, from the definition."""
        shape = (self.logits.shape[0], 1, *self.logits.shape[2:])
        valid = torch.ones(shape, dtype=torch.bool)
        if self.mask is not None:
            valid &= self.mask.float() != 0
        if self.ignore_index is not None and self.target.shape[1] == 1:
            # compared as numbers: a label dtype that cannot hold the ignore label ignores none
            valid &= self.target.double() != self.ignore_index
        return valid

    def reference(self, x64: torch.Tensor) -> torch.Tensor:
        valid = self.valid()
        per_image = not self.batch
        if self.kind in LABEL_MAP_KINDS:
            labels = self.target.double().masked_fill(~valid, 0).long()
            fg = torch.zeros_like(x64, dtype=torch.bool).scatter_(1, labels, True)
            probs = torch.softmax(x64, 1)
            ce = torch.nn.functional.cross_entropy(x64, labels[:, 0], reduction="none")
            ce = (ce * valid[:, 0]).sum() / valid.sum().clamp_min(1)
            if self.kind == "masked_dice_ce":  # MONAI's Dice (smooth 1e-5) of the valid voxels
                v, y = valid.double(), fg.double()
                dims = tuple(range(2, x64.ndim))
                intersection = (probs * y * v).sum(dims)
                sizes = (probs * v).sum(dims) + (y * v).sum(dims)
                dice = 1 - (2 * intersection + 1e-5) / (sizes + 1e-5)
                return dice.mean() + ce
            errors = (fg.double() - probs).abs()
            value = reference_lovasz(errors, fg, valid, per_image, self.classes)
            if self.kind == "lovasz_ce":
                value = value + 0.5 * ce
            return value
        fg = self.target.double() != 0
        if self.kind == "sigmoid":
            return ref_lovasz_multilabel(torch.sigmoid(x64), fg, valid, per_image, self.classes)
        return ref_lovasz_hinge(x64, fg, valid, per_image, self.classes)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``x`` in another memory layout (a view where the layout is a view)."""
    if layout == "channels_last" and x.ndim in (4, 5):
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        return x.to(memory_format=fmt)
    if layout == "transposed" and x.ndim >= 4:
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "expanded" and x.shape[0] >= 1:
        return x[:1].expand_as(x) if x.shape[0] == 1 else x
    return x


def _holds(dtype: torch.dtype, value: int) -> bool:
    return torch.tensor(value, dtype=F64).to(dtype).to(F64).item() == value


@st.composite
def draws(draw, label_dtypes=tuple(LABEL_DTYPES), kinds=tuple(KINDS)) -> Draw:
    kind = draw(st.sampled_from(kinds))
    batch_size = draw(st.sampled_from([0, 1, 1, 3, 3]))
    label_map = kind in LABEL_MAP_KINDS
    channels = draw(st.integers(2 if label_map else 1, 4))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.sampled_from([2, 3]))))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    input_dtype = draw(st.sampled_from(INPUT_DTYPES))
    label_dtype = draw(st.sampled_from(label_dtypes))
    logits = (3 * torch.randn(batch_size, channels, *spatial, generator=g)).to(input_dtype)
    map_shape = (batch_size, 1, *spatial)
    error = None
    if label_map:
        # an ignore label: none, one the dtype may not hold, or a real class (voxels ignored)
        candidates = [None, 255, -1, 0, channels - 1]
        unholdable = [v for v in (255, -1) if not _holds(label_dtype, v)]  # drawn more often
        ignore_index = draw(st.sampled_from(candidates + 3 * unholdable))
        target = torch.randint(0, channels, map_shape, generator=g)
        if ignore_index is not None:
            ignored = torch.rand(map_shape, generator=g) < draw(st.sampled_from([0.0, 0.4, 1.0]))
            if not _holds(label_dtype, ignore_index):
                # a label dtype that cannot hold the ignore label (-1 in uint8, 255 in int8): the
                # ignored voxels hold what the value wraps to (255, -1), a label out of range
                wrapped = torch.tensor(ignore_index).to(label_dtype).item()
                target = target.masked_fill(ignored, wrapped)
                if ignored.any() and not 0 <= wrapped < channels:
                    error = r"label map values must lie in"
            else:
                target = target.masked_fill(ignored, ignore_index)
        if draw(st.booleans()) and batch_size > 0 and target.numel() > 0:
            bad = draw(st.sampled_from([channels, -1, 255]))
            if bad != ignore_index and _holds(label_dtype, bad):
                target.view(-1)[0] = bad
                error = r"label map values must lie in"
        target = target.to(label_dtype)
    else:
        ignore_index = None
        density = draw(st.sampled_from([0.0, 0.3, 0.8]))
        target = (torch.rand(batch_size, channels, *spatial, generator=g) < density).to(label_dtype)
    mask_dtype = draw(st.sampled_from(MASK_DTYPES))
    mask = None
    if mask_dtype is not None:
        mask = (torch.rand(map_shape, generator=g) > draw(st.sampled_from([0.2, 1.0]))).to(
            mask_dtype
        )
    if draw(st.booleans()) and batch_size > 0 and draw(st.booleans()):
        logits.view(-1)[-1] = math.nan
        error = r"input contains NaN or inf"
    if batch_size == 0:
        error = r"at least one volume, one channel and one voxel"
    layout = draw(st.sampled_from(LAYOUTS))
    return Draw(
        kind=kind,
        logits=_layout(logits, layout),
        target=_layout(target, draw(st.sampled_from(LAYOUTS))),
        mask=mask,
        ignore_index=ignore_index,
        batch=draw(st.booleans()),
        classes=draw(st.sampled_from(["present", "all"])),
        meta=draw(st.booleans()),
        error=error,
    )


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
def test_value_of_the_definition_or_a_clear_exception(label_dtype):
    SWEEP(given(draws(label_dtypes=(label_dtype,)))(_check_draw))()


@pytest.mark.parametrize("kind", KINDS)
def test_each_loss_alone(kind):
    """Per loss, more draws that reach the value and gradient comparison (the mixed sweep above
    spends most draws of some losses on error cases)."""
    settings(SWEEP, max_examples=100)(given(draws(kinds=(kind,)))(_check_draw))()


def _check_draw(d: Draw) -> None:
    x = d.logits.detach().clone() if d.logits.is_contiguous() else d.logits.detach()
    x.requires_grad_(True)
    target, mask = d.target, d.mask
    inputs = MetaTensor(x) if d.meta else x
    if d.meta:
        target = MetaTensor(target)
    loss = d.loss()
    if d.error is not None:
        with pytest.raises(ValueError, match=d.error):
            loss(inputs, target, mask)
        return
    value = loss(inputs, target, mask)
    assert type(value) is torch.Tensor and value.ndim == 0  # no MetaTensor leaks out
    assert value.dtype == torch.promote_types(x.dtype, torch.float32)
    assert torch.isfinite(value), value
    value.backward()
    grad = x.grad
    assert grad is not None and torch.isfinite(grad).all()
    valid = d.valid()
    if d.logits.is_contiguous():  # expanded views accumulate the gradients of several voxels
        assert (grad.float() * ~valid == 0).all()  # ignored voxels learn nothing
    x64 = d.logits.detach().to(F64).contiguous().requires_grad_(True)
    expected = d.reference(x64)
    tol = 1e-9 if x.dtype == F64 else 2e-5
    torch.testing.assert_close(value.detach().to(F64), expected.detach(), rtol=tol, atol=tol)
    if x.dtype in (torch.float32, F64) and 0 not in d.logits.stride():
        expected.backward()
        tol = 1e-9 if x.dtype == F64 else 1e-5
        torch.testing.assert_close(grad.to(F64), x64.grad, rtol=tol, atol=tol)


def test_the_sweep_draws_every_kind_of_input():
    """The strategy does reach the cases it is for (keeps the sweep above honest)."""
    seen: dict[str, set] = {k: set() for k in ("kind", "error", "dtype", "labels", "batch")}

    @settings(max_examples=300, deadline=None, database=None)
    @given(draws())
    def collect(d: Draw):
        seen["kind"].add(d.kind)
        seen["error"].add(d.error is not None and d.error.split()[0])
        seen["dtype"].add(d.logits.dtype)
        seen["labels"].add(d.target.dtype)
        seen["batch"].add(d.logits.shape[0])

    collect()
    assert seen["kind"] == set(KINDS)
    assert seen["error"] >= {False, "label", "input", "at"}
    assert seen["dtype"] == set(INPUT_DTYPES)
    assert seen["labels"] == set(LABEL_DTYPES)
    assert seen["batch"] == {0, 1, 3}
