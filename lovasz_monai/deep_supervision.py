"""Deep supervision: a loss on every output head of a network, against resized labels and masks.

Networks trained nnU-Net style return several outputs in training: MONAI's
``DynUNet(..., deep_supervision=True)`` a stacked ``(B, heads, C, *S)`` tensor (its lower heads
already upsampled to the full size), other networks a list or tuple of ``(B, C, *S_l)`` tensors
at decreasing resolution. Each head ``l`` gets ``loss(head_l, label_l, mask_l)``, where
``label_l`` and ``mask_l`` are the label and the ignore mask resized to the head's size with
nearest-neighbour interpolation (``"nearest-exact"``, as ``monai.losses.DeepSupervisionLoss``),
and the heads are summed with the weights of ``DeepSupervisionLoss.get_weights`` (``weight_mode``
``"exp"``: 1, 0.5, 0.25, ...; ``"same"``; ``"two"``; or explicit ``weights``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss
from torch import Tensor, nn

__all__ = ["deep_supervision_loss", "head_weights", "resize_nearest", "split_heads"]


def split_heads(output: Any, spatial_dims: int) -> list[Tensor]:
    """The output heads of a network, full resolution first.

    Args:
        output: a ``(B, C, *S)`` tensor (one head), a stacked ``(B, heads, C, *S)`` tensor (MONAI
            ``DynUNet`` with deep supervision, in training), or a list/tuple of ``(B, C, *S_l)``
            tensors (the first one at full resolution).
        spatial_dims: number of spatial dimensions of the input image (3 for volumes).

    Returns:
        The heads as a list of ``(B, C, *S_l)`` tensors.

    Raises:
        TypeError: ``output`` is neither a tensor nor a non-empty list/tuple of tensors.
        ValueError: a head has the wrong number of dimensions.

    Example:
        >>> heads = split_heads(torch.zeros(2, 3, 4, 8, 8, 8), spatial_dims=3)
        >>> len(heads), tuple(heads[1].shape)
        (3, (2, 4, 8, 8, 8))
    """
    if isinstance(output, Tensor):
        if output.ndim == spatial_dims + 3:
            return list(output.unbind(dim=1))
        heads = [output]
    elif (
        isinstance(output, (list, tuple)) and output and all(isinstance(h, Tensor) for h in output)
    ):
        heads = list(output)
    else:
        raise TypeError(
            "the network must return a (B, C, *spatial) tensor of logits, a stacked "
            "(B, heads, C, *spatial) tensor or a list/tuple of such tensors, got "
            f"{type(output).__name__}"
        )
    for i, head in enumerate(heads):
        if head.ndim != spatial_dims + 2:
            raise ValueError(
                f"output head {i} must be (B, C, *spatial) with {spatial_dims} spatial "
                f"dimensions, got shape {tuple(head.shape)}"
            )
    return heads


def head_weights(
    num_heads: int, weight_mode: str = "exp", weights: Sequence[float] | None = None
) -> list[float]:
    """Weights of the heads, exactly as ``monai.losses.DeepSupervisionLoss`` computes them.

    Args:
        num_heads: number of output heads.
        weight_mode: ``"exp"`` (1, 0.5, 0.25, ..., at least 0.0625), ``"same"`` (all 1) or
            ``"two"`` (1, 0.5, 0.5, ...).
        weights: explicit weights, at least one per head (the first ``num_heads`` are used);
            they replace ``weight_mode``.

    Raises:
        ValueError: unknown ``weight_mode``, fewer ``weights`` than heads (MONAI would fall back
            to ``weight_mode`` silently), a negative, NaN or inf weight, or weights of the heads
            that are all zero.

    Example:
        >>> head_weights(4)
        [1.0, 0.5, 0.25, 0.125]
    """
    if weight_mode not in ("exp", "same", "two"):
        raise ValueError(f"weight_mode must be 'exp', 'same' or 'two', got {weight_mode!r}")
    if weights is not None and len(weights) < num_heads:
        raise ValueError(
            f"deep supervision weights {list(weights)} cover {len(weights)} heads, the network "
            f"returned {num_heads}"
        )
    if weights is not None and not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"deep supervision weights must be finite and >= 0, got {list(weights)}")
    if weights is not None and not any(w > 0 for w in list(weights)[:num_heads]):
        raise ValueError(
            f"deep supervision weights of the {num_heads} heads must not all be zero (no head "
            f"would be trained), got {list(weights)}"
        )
    helper = DeepSupervisionLoss(
        nn.Identity(), weight_mode=weight_mode, weights=None if weights is None else list(weights)
    )
    return [float(w) for w in helper.get_weights(num_heads)]


def resize_nearest(x: Tensor, size: Sequence[int]) -> Tensor:
    """``x`` resized by nearest-neighbour (``"nearest-exact"``) interpolation, values and dtype
    kept exactly.

    The voxels are picked by index, one spatial axis at a time, with the indices that
    ``F.interpolate(mode="nearest-exact")`` picks: the result equals MONAI's resizing of the same
    labels, without their round trip through float32 (which changes integer labels above 2^24).

    Args:
        x: ``(B, C, *S)`` label map, regions or mask (any dtype).
        size: the new spatial size ``S'`` (as many values as ``x`` has spatial dimensions).

    Returns:
        ``(B, C, *S')`` of ``x``'s dtype; ``x`` itself when ``S' == S``.

    Raises:
        ValueError: ``size`` has another number of dimensions than ``x``'s spatial shape, or a
            size below 1.

    Example:
        >>> resize_nearest(torch.arange(4).view(1, 1, 4), (2,)).tolist()
        [[[1, 3]]]
    """
    if len(size) != x.ndim - 2:
        raise ValueError(f"size {tuple(size)} does not fit the spatial shape {tuple(x.shape[2:])}")
    if any(int(n) < 1 for n in size):
        raise ValueError(f"size must be positive, got {tuple(size)}")
    if tuple(x.shape[2:]) == tuple(size):
        return x
    for axis, (old, new) in enumerate(zip(x.shape[2:], size, strict=True), start=2):
        if old != new:
            x = x.index_select(axis, _nearest_exact_indices(old, int(new), x.device))
    return x


def _nearest_exact_indices(old: int, new: int, device: torch.device) -> Tensor:
    """The source index of each of ``new`` positions, as ``"nearest-exact"`` picks it (computed
    by interpolating the indices themselves: exact in float32 below 2^24 voxels per axis)."""
    positions = torch.arange(old, dtype=torch.float32, device=device).view(1, 1, old)
    picked = F.interpolate(positions, size=new, mode="nearest-exact")
    return picked.view(new).round().long()


def deep_supervision_loss(
    heads: Sequence[Tensor],
    label: Tensor,
    mask: Tensor,
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    weights: Sequence[float],
) -> Tensor:
    """``sum_l weights[l] * loss_fn(heads[l], label_l, mask_l)`` with ``label_l``/``mask_l``
    resized to head ``l``'s spatial size by :func:`resize_nearest`.

    Args:
        heads: ``(B, C, *S_l)`` logits, full resolution first (see :func:`split_heads`).
        label: ``(B, 1 or C, *S)`` label map or regions.
        mask: ``(B, 1, *S)`` mask, 1 where the voxel counts.
        loss_fn: ``(logits, label, mask) -> scalar``.
        weights: one weight per head (see :func:`head_weights`).

    Raises:
        ValueError: fewer weights than heads.

    Example:
        >>> fn = lambda x, y, m: (x * m).mean()
        >>> heads = [torch.ones(1, 2, 8, 8, 8), torch.ones(1, 2, 4, 4, 4)]
        >>> y, m = torch.zeros(1, 1, 8, 8, 8), torch.ones(1, 1, 8, 8, 8)
        >>> float(deep_supervision_loss(heads, y, m, fn, [1.0, 0.5]))
        1.5
    """
    if len(weights) < len(heads):
        raise ValueError(f"need one weight per head: {len(heads)} heads, {len(weights)} weights")
    total = heads[0].new_zeros((), dtype=torch.float32)
    for head, weight in zip(heads, weights, strict=False):
        size = head.shape[2:]
        total = total + weight * loss_fn(
            head, resize_nearest(label, size), resize_nearest(mask, size)
        )
    return total
