"""Property-based tests (hypothesis) of the Lovász losses on random small problems."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lovasz_monai import LovaszHingeLoss, LovaszSoftmaxLoss
from tests.oracle import ref_lovasz_hinge, ref_lovasz_multilabel, ref_lovasz_softmax

F64 = torch.float64
IGNORE = 255
SETTINGS = settings(max_examples=30, deadline=None, database=None)


@dataclass
class Problem:
    kind: str  # "softmax" (label map), "sigmoid" or "hinge" (multi-hot / binary target)
    batch: bool
    classes: str
    method: str
    bins: int
    logits: torch.Tensor  # float64 (B, C, *S)
    target: torch.Tensor  # softmax: (B, 1, *S) with IGNORE; else (B, C, *S) 0/1 float
    valid: torch.Tensor  # (B, 1, *S) bool
    ties: bool

    def loss(self, **kw):
        args = dict(batch=self.batch, classes=self.classes, method=self.method, bins=self.bins)
        args.update(kw)
        if self.kind == "softmax":
            return LovaszSoftmaxLoss(to_onehot_y=True, **args)
        if self.kind == "sigmoid":
            return LovaszSoftmaxLoss(sigmoid=True, **args)
        return LovaszHingeLoss(**args)

    def call(self, logits, loss=None):
        """Our loss with the ignored voxels given the natural way for the kind."""
        if self.kind == "softmax":
            return (loss or self.loss(ignore_index=IGNORE))(logits, self.target)
        return (loss or self.loss())(logits, self.target, self.valid)

    def reference(self, logits64):
        per_image = not self.batch
        if self.kind == "softmax":
            return ref_lovasz_softmax(
                torch.softmax(logits64, 1),
                self.target[:, 0],
                classes=self.classes,
                per_image=per_image,
                ignore=IGNORE,
            )
        fg = self.target.bool()
        if self.kind == "sigmoid":
            probs = torch.sigmoid(logits64)
            return ref_lovasz_multilabel(probs, fg, self.valid, per_image, self.classes)
        return ref_lovasz_hinge(logits64, fg, self.valid, per_image, self.classes)

    def max_error(self):
        """Largest valid error of any row (bounds the histogram's deviation)."""
        x = self.logits
        if self.kind == "softmax":
            labels = torch.where(self.target == IGNORE, 0, self.target)
            fg = torch.zeros_like(x).scatter_(1, labels.long(), 1.0)
            errors = (fg - torch.softmax(x, 1)).abs()
        elif self.kind == "sigmoid":
            errors = (self.target - torch.sigmoid(x)).abs()
        else:
            errors = torch.relu(1 - x * (2 * self.target - 1))
        return float((errors * self.valid).max()) if self.valid.any() else 0.0


@st.composite
def problems(draw, kinds=("softmax", "sigmoid", "hinge"), methods=("sort", "histogram")):
    kind = draw(st.sampled_from(kinds))
    num_batch = draw(st.integers(1, 2))
    num_channels = draw(st.integers(2 if kind == "softmax" else 1, 4))
    ndim = draw(st.sampled_from([2, 3]))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    seed = draw(st.integers(0, 2**31 - 1))
    ignore_p = draw(st.sampled_from([0.0, 0.0, 0.3, 0.7, 1.0]))
    scale = draw(st.sampled_from([0.3, 2.0, 6.0]))
    ties = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    shape = (num_batch, num_channels, *spatial)
    logits = torch.randn(shape, generator=g, dtype=F64) * scale
    if ties:  # few distinct values: many tied errors
        logits = (logits * 2).round() / 2
    valid = torch.rand((num_batch, 1, *spatial), generator=g) >= ignore_p
    if kind == "softmax":
        high = draw(st.integers(1, num_channels))  # some classes may be absent
        labels = torch.randint(0, high, (num_batch, 1, *spatial), generator=g)
        target = torch.where(valid, labels, torch.full_like(labels, IGNORE))
    else:
        density = draw(st.sampled_from([0.0, 0.3, 0.8]))
        target = (torch.rand(shape, generator=g) < density).to(F64)
    return Problem(
        kind=kind,
        batch=draw(st.booleans()),
        classes=draw(st.sampled_from(["present", "all"])),
        method=draw(st.sampled_from(methods)),
        bins=draw(st.sampled_from([1, 7, 64])),
        logits=logits,
        target=target,
        valid=valid,
        ties=ties,
    )


@SETTINGS
@given(problems(methods=("sort",)))
def test_matches_reference_with_finite_gradients(p):
    for dtype in (F64, torch.float32):
        x = p.logits.detach().clone().to(dtype).requires_grad_(True)
        value = p.call(x)
        value.backward()
        assert value.dtype == dtype
        assert torch.isfinite(value)
        assert torch.isfinite(x.grad).all()
        assert (x.grad * ~p.valid == 0).all()  # ignored voxels get no gradient
        if p.kind != "hinge":
            assert -1e-6 <= value.item() <= 1 + 1e-6
        x64 = p.logits.detach().clone().requires_grad_(True)
        ref = p.reference(x64)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(value.detach().to(F64), ref.detach(), **tol)
        if not p.ties:  # with tied errors the subgradient depends on the tie order
            ref.backward()
            torch.testing.assert_close(x.grad.to(F64), x64.grad, **tol)


def _permute_voxels(t, perm):
    return t.flatten(2)[..., perm].view(t.shape)


@SETTINGS
@given(problems(), st.integers(0, 2**31 - 1))
def test_voxel_permutation_leaves_loss_unchanged(p, seed):
    num_voxels = p.valid[0, 0].numel()
    perm = torch.randperm(num_voxels, generator=torch.Generator().manual_seed(seed))
    x = p.logits.float()
    before = p.call(x)
    permuted = Problem(**{**p.__dict__})
    permuted.target = _permute_voxels(p.target, perm)
    permuted.valid = _permute_voxels(p.valid, perm)
    after = permuted.call(_permute_voxels(x, perm))
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def _valid_voxels(p: Problem, x: torch.Tensor, volumes: list[int]) -> Problem | None:
    """The valid voxels of ``volumes`` alone, as one ``(1, C, N, 1)`` volume without ignored
    voxels (``None`` when there are none)."""
    keep = p.valid.flatten(2)[:, 0]  # (B, P)
    if not any(keep[b].any() for b in volumes):
        return None
    xs = torch.cat([x[b].flatten(1)[:, keep[b]] for b in volumes], 1)
    ys = torch.cat([p.target[b].flatten(1)[:, keep[b]] for b in volumes], 1)
    alone = Problem(**{**p.__dict__})
    alone.logits = xs[None, ..., None]
    alone.target = ys[None, ..., None]
    alone.valid = torch.ones_like(alone.target[:, :1], dtype=torch.bool)
    return alone


@SETTINGS
@given(problems())
def test_mask_equals_ignore_and_removal(p):
    """Every draw: ignored voxels (by mask or ignore label) are the same as removed voxels."""
    x = p.logits.float()
    value = p.call(x)
    if p.kind == "softmax":
        # the same voxels given as a mask, with arbitrary labels under it
        labels = torch.where(p.target == IGNORE, 0, p.target)
        masked = p.loss()(x, labels, p.valid)
        torch.testing.assert_close(masked, value, rtol=0, atol=1e-6)
    elif p.logits.shape[1] == 1:
        # a binary (B, 1, *S) 0/1 map with the ignore label instead of the mask
        labels = torch.where(p.valid, p.target.long(), IGNORE)
        ignored = p.loss(ignore_index=IGNORE)(x, labels)
        torch.testing.assert_close(ignored, value, rtol=0, atol=1e-6)
    # removal: the batch as one set, or each volume alone (a volume without a valid voxel
    # contributes 0), computed from the valid voxels only
    groups = [list(range(x.shape[0]))] if p.batch else [[b] for b in range(x.shape[0])]
    expected = []
    for volumes in groups:
        alone = _valid_voxels(p, x, volumes)
        expected.append(torch.zeros(()) if alone is None else alone.call(alone.logits))
    torch.testing.assert_close(value, torch.stack(expected).mean(), rtol=1e-6, atol=1e-6)


@SETTINGS
@given(problems(methods=("histogram",)))
def test_histogram_within_bound_of_sort(p):
    x = p.logits
    hist = p.call(x).item()
    exact = p.call(
        x,
        p.loss(method="sort", ignore_index=IGNORE)
        if p.kind == "softmax"
        else p.loss(method="sort"),
    ).item()
    bound = p.max_error() / p.bins
    assert -1e-9 <= exact - hist <= bound * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "hinge"])
def test_strategy_produces_the_kind(kind):
    # a guard that the composite strategy honours its arguments (keeps the tests above honest)
    @settings(max_examples=5, deadline=None, database=None)
    @given(problems(kinds=(kind,)))
    def inner(p):
        assert p.kind == kind
        assert p.logits.shape[0] == p.target.shape[0] == p.valid.shape[0]

    inner()
