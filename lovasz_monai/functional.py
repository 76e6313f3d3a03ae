"""Tensor math of the Lovász extension of the Jaccard loss (Berman et al., CVPR 2018).

Everything here is plain PyTorch: no MONAI, no Lightning. Tensors are organised in *rows*: one row
is the set of voxels of one class in one volume (or in the whole batch). For a row with errors
``e_i >= 0``, foreground indicators ``y_i`` and validity flags ``v_i`` the Lovász extension is
``sum_i e_i * w_i`` where ``w`` is the gradient of Algorithm 1 of the paper scattered back to voxel
order. The weights are computed without autograd, so the gradient of the loss with respect to the
errors is exactly ``w`` and backward keeps a single tensor.

With ``G`` foreground voxels in a row and rows sorted by decreasing error, the weight of the
voxel at sorted position ``k`` (``F_k``/``B_k`` foreground/background voxels up to and including it)
is ``1 / (G + B_k)`` for a foreground voxel and ``(G - F_k) / ((G + B_k - 1) (G + B_k))`` for a
background voxel. These closed forms are the telescoping differences ``J_k - J_{k-1}`` of the
Jaccard loss ``J_k = 1 - (G - F_k) / (G + B_k)`` without the cancellation of subtracting two
nearly equal numbers. A row without foreground puts weight 1 on its largest valid error.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_CHUNK_ELEMENTS",
    "average_class_losses",
    "check_lovasz_arguments",
    "class_weights",
    "distributed_world_size",
    "lovasz_class_losses",
    "lovasz_extension",
    "lovasz_grad",
    "lovasz_hinge",
    "lovasz_hinge_class_losses",
    "lovasz_probability_class_losses",
    "lovasz_softmax",
    "lovasz_weights",
]

DEFAULT_CHUNK_ELEMENTS = 1 << 21
"""Default budget (elements) of the rows that the sort method processes at once."""

DEFAULT_BINS = 1024
"""Default number of error bins of the histogram method."""

Method = Literal["sort", "histogram"]


def check_lovasz_arguments(
    *,
    classes: str | Sequence[int] = "present",
    method: str = "sort",
    bins: int = DEFAULT_BINS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    batch: bool = False,
    distributed: bool = False,
) -> str | list[int]:
    """Check the settings that the functions and the loss classes share, in one place.

    Args:
        classes: ``"present"``, ``"all"``, or a non-empty list of channel indices ``>= 0`` (their
            upper bound is checked against the input).
        method: ``"sort"`` or ``"histogram"``.
        bins: positive number of histogram bins.
        chunk_elements: positive element budget of one batched sort.
        batch, distributed: ``distributed=True`` needs ``batch=True`` and
            ``method="histogram"``.

    Returns:
        ``classes`` as given (a string) or as a list of ``int``.

    Example:
        >>> check_lovasz_arguments(classes=(1, 2), method="histogram", bins=256)
        [1, 2]

    Raises:
        ValueError: naming the first argument that is not valid.
    """
    if isinstance(classes, str):
        if classes not in ("present", "all"):
            raise ValueError(f"classes must be 'present', 'all' or a list, got {classes!r}")
    else:
        classes = [int(c) for c in classes]
        if not classes or min(classes) < 0:
            raise ValueError(f"classes must be a non-empty list of class indices, got {classes}")
    if method not in ("sort", "histogram"):
        raise ValueError(f"method must be 'sort' or 'histogram', got {method!r}")
    if int(bins) < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    if int(chunk_elements) < 1:
        raise ValueError(f"chunk_elements must be a positive integer, got {chunk_elements}")
    if distributed and not batch:
        raise ValueError(
            "distributed=True is the loss of the whole distributed batch and needs batch=True; "
            "per-volume losses (batch=False) need no communication: DDP averages them already"
        )
    if distributed and method != "histogram":
        raise ValueError(
            f"distributed=True needs method='histogram', got method={method!r}: the exact sort "
            "would need every process's errors (an all-gather of B x C x voxels values per "
            "step), while the histogram method all-reduces its per-(class, bin) counts and stays "
            "within max(error) / bins of the exact loss"
        )
    return classes


def distributed_world_size(distributed: bool, process_group: object | None = None) -> int:
    """Number of processes that a ``distributed=True`` loss spans.

    Args:
        distributed: the loss's ``distributed`` setting.
        process_group: a ``torch.distributed`` process group, ``None`` for the default group.

    Returns:
        The size of ``process_group``, or 1 when ``distributed`` is False or no process group is
        initialised: then the loss is the loss of the local batch, so that one config runs the same
        on one device and on many.

    Example:
        >>> distributed_world_size(True)  # no process group in this interpreter
        1
    """
    if not distributed or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)


def lovasz_grad(
    fg_sorted: Tensor, valid_sorted: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Gradient of the Lovász extension for rows already sorted by decreasing error.

    This is Algorithm 1 of the paper, written with the closed-form increments of the Jaccard loss
    (see the module docstring), so that no two nearly equal numbers are subtracted.

    Args:
        fg_sorted: ``(..., P)`` foreground indicators (bool or 0/1) in decreasing-error order.
        valid_sorted: optional ``(..., P)`` bool, ``False`` for voxels that take part in nothing.
        dtype: floating dtype of the result.

    Returns:
        ``(..., P)`` weights ``g >= 0`` of ``dtype``. Each row sums to 1 when it has a valid
        voxel and to 0 otherwise.

    Example:
        >>> lovasz_grad(torch.tensor([1, 0, 1, 0]))
        tensor([0.5000, 0.1667, 0.3333, 0.0000])

    Raises:
        ValueError: when the shapes of ``fg_sorted`` and ``valid_sorted`` differ.
    """
    fg = fg_sorted.bool()
    if valid_sorted is not None:
        if valid_sorted.shape != fg_sorted.shape:
            raise ValueError(
                f"valid_sorted must have the shape of fg_sorted {tuple(fg_sorted.shape)}, "
                f"got {tuple(valid_sorted.shape)}"
            )
        fg = fg & valid_sorted
    weights, _ = _lovasz_grad(fg, valid_sorted, dtype)
    return weights


def _lovasz_grad(
    fg: Tensor,
    valid: Tensor | None,
    dtype: torch.dtype,
    *,
    negate_foreground: bool = False,
    has_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(weights, fg_counts)``: :func:`lovasz_grad` of rows whose foreground is already
    masked, and the ``(..., 1)`` int64 foreground count of each row.

    ``negate_foreground``: the weights of foreground voxels are negated (the sign of the
    derivative of their error with respect to the probability or logit). ``has_valid``:
    ``(..., 1)``, False for rows (with ``valid=None``) that have no valid voxel at all."""
    # Counts are exact in float32 up to 2**24 voxels a row; longer rows count in float64.
    count_dtype = torch.float64 if fg.shape[-1] > 1 << 24 else dtype
    if valid is None:
        count = torch.arange(1, fg.shape[-1] + 1, dtype=count_dtype, device=fg.device)
    else:
        count = valid.cumsum(-1, dtype=count_dtype)
    fg_cum = fg.cumsum(-1, dtype=count_dtype)
    num_fg = fg_cum[..., -1:].clone()
    # union u_k = G + B_k >= 1 at every valid position, and G - F_k = u_k - k
    union = torch.sub(count, fg_cum).add_(num_fg)
    grad = union.reciprocal()  # foreground: 1 / u_k
    bg_grad = torch.sub(union, count, out=fg_cum).mul_(grad).div_(union.sub_(1))
    torch.where(fg, grad.neg_() if negate_foreground else grad, bg_grad, out=grad)
    # A row without foreground: J jumps from 0 to 1 at its first valid voxel (the formula
    # above gives 0/0 there).
    no_fg = num_fg == 0
    if valid is None:
        grad[..., :1].masked_fill_(no_fg if has_valid is None else no_fg & has_valid, 1.0)
        if has_valid is not None:
            grad[..., :1].masked_fill_(~has_valid, 0.0)
    else:
        grad.masked_fill_(no_fg & (count == 1) & valid, 1.0)
        grad.masked_fill_(~valid, 0.0)
    return grad.to(dtype), num_fg.to(torch.int64)


def _check_rows(errors: Tensor, labels: Tensor, valid: Tensor | None) -> None:
    if errors.ndim != 2:
        raise ValueError(f"errors must be (N, P) rows, got shape {tuple(errors.shape)}")
    if labels.shape != errors.shape:
        raise ValueError(
            f"labels must have the shape of errors {tuple(errors.shape)}, got {tuple(labels.shape)}"
        )
    if valid is not None and (
        valid.ndim != 2
        or valid.shape[0] not in (1, errors.shape[0])
        or valid.shape[1] != errors.shape[1]
    ):
        raise ValueError(
            f"valid must broadcast to errors {tuple(errors.shape)}, got {tuple(valid.shape)}"
        )


# Sort keys: the errors, with ignored voxels set to -1, below every valid (non-negative) error.
# Ignored voxels then sort last and change no earlier weight, and all shapes stay static.
#
# The row functions below take rows as ``(R, S, P)`` views: row ``r`` is the ``S * P`` voxels
# ``[r, :, :]``. One row per (volume, class) is a ``(B * C, 1, P)`` view of a ``(B, C, P)``
# tensor; one row per class over the whole batch is its ``(C, B, P)`` transpose, so that no
# batch-sized transposed copy is ever made.


def _sort_key(errors: Tensor, valid: Tensor | None) -> Tensor:
    return errors if valid is None else torch.where(valid, errors, -1.0)


def _key_and_foreground(
    errors: Tensor, labels: Tensor, valid: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Sort key of ``errors`` (no autograd) and the foreground restricted to valid voxels."""
    with torch.no_grad():
        fg = labels.bool() if valid is None else labels.bool() & valid
        return _sort_key(errors.detach(), valid), fg


def _sort_rows_torch(key: Tensor, fg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(order, fg_sorted, errors_sorted, has_valid)`` of ``(n, S, P)`` rows sorted by
    decreasing key; ``errors_sorted`` is 0 at ignored voxels, ``has_valid`` is ``(n, 1)``."""
    key_sorted, order = torch.sort(key.reshape(key.shape[0], -1), dim=-1, descending=True)
    has_valid = key_sorted[:, :1] >= 0
    return order, fg.reshape(order.shape).gather(-1, order), key_sorted.clamp_min_(0), has_valid


_ERROR_BITS_MAX = 0x7F800000  # bit pattern of +inf: non-negative float32 bits are ordered
_IGNORED = _ERROR_BITS_MAX + 1
_INDEX_MASK = 0x7FFFFFFF


def _sort_rows_numpy(key: Tensor, fg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same as :func:`_sort_rows_torch` for float32 CPU rows, several times faster.

    Each voxel becomes one int64: the inverted error bits (a value past them for ignored voxels)
    in the high word, the foreground bit and the voxel index in the low word. numpy's vectorised
    sort of these integers alone yields the order, the sorted labels and the sorted errors.
    """
    num_rows, segments, num_voxels = key.shape
    key_np = key.numpy()
    packed = key_np.view(np.int32).astype(np.int64)
    np.bitwise_and(packed, _INDEX_MASK, out=packed)  # the sign bit of -0.0
    np.subtract(_ERROR_BITS_MAX, packed, out=packed)  # ascending order == descending error
    np.copyto(packed, _IGNORED, where=key_np < 0)
    packed <<= 1
    packed |= fg.numpy()
    packed <<= 31
    packed |= np.arange(segments * num_voxels, dtype=np.int64).reshape(segments, num_voxels)
    packed = packed.reshape(num_rows, segments * num_voxels)
    packed.sort(axis=-1)
    packed_t = torch.from_numpy(packed)
    # little-endian: low word first (flattened first: a size-1 row may carry any stride)
    words = packed_t.reshape(-1).view(torch.int32).view(num_rows, -1)
    fg_sorted = words[:, 0::2] < 0
    error_bits = torch.sub(_ERROR_BITS_MAX, words[:, 1::2]).clamp_min_(0)  # ignored: 0.0
    has_valid = words[:, 1:2] != _IGNORED
    return packed_t.bitwise_and_(_INDEX_MASK), fg_sorted, error_bits.view(torch.float32), has_valid


def _use_numpy_sort(key: Tensor) -> bool:
    return (
        key.device.type == "cpu"
        and key.dtype == torch.float32
        and key.shape[-1] * key.shape[-2] <= _INDEX_MASK
        and key.stride(-1) == 1
        and sys.byteorder == "little"
        and not torch.compiler.is_compiling()
    )


def _class_rows_by_sort(
    key: Tensor, fg: Tensor, *, chunk_elements: int, wrt_source: bool, overwrite_key: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact per-voxel weights (layout of ``key``), row losses and foreground counts of
    ``(R, S, P)`` class rows. ``wrt_source``, ``overwrite_key``: see :func:`_lovasz_class_rows`;
    with ``overwrite_key`` each chunk of rows is read in full before its weights are written.
    """
    num_rows, segments, num_voxels = key.shape
    row_size = segments * num_voxels
    sort_rows = _sort_rows_numpy if _use_numpy_sort(key) else _sort_rows_torch
    # Outputs: the weights (possibly in the key's own memory), one loss and one count per row.
    weights = key if overwrite_key else torch.empty_like(key)
    losses = torch.empty(num_rows, dtype=key.dtype, device=key.device)
    counts = torch.empty(num_rows, 1, dtype=torch.int64, device=key.device)
    # Whole rows, as many as fit the element budget (at least one), are sorted at once.
    rows_per_chunk = max(1, chunk_elements // max(row_size, 1))
    for start in range(0, num_rows, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, num_rows))
        # 1. Sort each row by decreasing error, carrying the foreground along.
        order, fg_sorted, errors_sorted, has_valid = sort_rows(key[rows], fg[rows])
        # 2. Algorithm 1 on the sorted rows. Ignored voxels sort last and are background: they
        # get weight 0 (and so does the first voxel of a row where every voxel is ignored).
        grad, counts[rows] = _lovasz_grad(
            fg_sorted, None, key.dtype, negate_foreground=wrt_source, has_valid=has_valid
        )
        # 3. The loss of each row: sum of error * weight (the weights' sign undone by abs).
        weighted = torch.mul(errors_sorted, grad)
        losses[rows] = (weighted.abs_() if wrt_source else weighted).sum(-1)  # pairwise summation
        if wrt_source:  # the subgradient autograd takes where the error is 0 (abs, relu)
            grad.masked_fill_(errors_sorted <= 0, 0.0)
        # 4. Scatter the weights back from sorted order to voxel order.
        out = weights[rows]
        if out.is_contiguous():
            out.view(order.shape).scatter_(-1, order, grad)
        else:
            out.copy_(torch.empty_like(grad).scatter_(-1, order, grad).view(out.shape))
    return weights, losses, counts.view(-1)


def _class_rows_by_histogram(
    key: Tensor,
    fg: Tensor,
    *,
    bins: int,
    wrt_source: bool,
    world_size: int = 1,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sort-free weights, row losses and foreground counts of ``(R, S, P)`` class rows from
    per-bin counts (DESIGN.md). ``wrt_source``: see :func:`_lovasz_class_rows`.

    With ``world_size > 1`` each row is the union of the same row on every process of
    ``process_group``: the row maxima and the per-slot counts and error sums are all-reduced, so
    the losses and counts are those of the union (equal on every process) and the weights are
    those of the union at this process's voxels."""
    num_rows, segments, num_voxels = key.shape
    dtype = key.dtype
    slots_per_row = 2 * (bins + 1)  # (foreground, background) per bin, and a bin for ignored
    if num_rows * slots_per_row >= 2**31:
        raise ValueError(f"too many rows x bins for the histogram method: {num_rows} x {bins}")
    # 1. Slot of each voxel: (row, error bin, foreground or background), one flat index.
    e_max = key.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    if world_size > 1:  # every process bins alike
        dist.all_reduce(e_max, op=dist.ReduceOp.MAX, group=process_group)
    # bin 0 holds the largest errors, bin bins - 1 the errors down to 0
    slot = key.mul(-bins / e_max).add_(bins).clamp_(0, bins - 1).to(torch.int32)
    slot.masked_fill_(key < 0, bins)  # ignored voxels: the extra bin, whose weights are 0
    slot.mul_(2).add_(~fg)  # inside a bin: foreground first, then background
    slot += torch.arange(
        0, num_rows * slots_per_row, slots_per_row, dtype=torch.int32, device=key.device
    ).view(-1, 1, 1)
    # Elementwise results keep the memory layout of ``key``: flatten in memory order (a view,
    # also for the transposed rows of batch mode) and restore the row view at the end.
    memory_order = sorted(range(3), key=lambda dim: -slot.stride(dim))
    flat_slot = slot.permute(memory_order).reshape(-1)
    # 2. Voxel count and error sum of every slot (of the union of the processes' rows, whose
    # size is unknown here: counted in float64, exact up to 2**53).
    count_dtype = (
        torch.float64 if world_size > 1 or segments * num_voxels > 1 << 24 else dtype
    )  # exact counts
    slot_sums = torch.zeros(2, num_rows * slots_per_row, dtype=count_dtype, device=key.device)
    counts, error_sums = slot_sums.unbind(0)
    ones = torch.ones((), dtype=count_dtype, device=key.device).expand_as(flat_slot)
    counts.index_add_(0, flat_slot, ones)
    flat_key = key.permute(memory_order).reshape(-1).to(count_dtype)
    error_sums.index_add_(0, flat_slot, flat_key)
    if world_size > 1:  # one all-reduce for both
        dist.all_reduce(slot_sums, op=dist.ReduceOp.SUM, group=process_group)
    # 3. Weight of a foreground and of a background voxel in each bin (Algorithm 1 on bins).
    n_fg, n_bg = counts.view(num_rows, bins + 1, 2)[:, :bins].unbind(-1)
    fg_before = n_fg.cumsum(-1) - n_fg
    bg_before = n_bg.cumsum(-1) - n_bg
    num_fg = n_fg.sum(-1, keepdim=True)
    union = num_fg + bg_before
    w_fg = union.clamp_min(1).reciprocal()
    # each background voxel of bin k carries J(F + nf, B + nb) - J(F + nf, B) divided by nb
    w_bg = torch.where(
        num_fg > 0,
        (num_fg - fg_before - n_fg) / (union.clamp_min(1) * (union + n_bg)),
        ((bg_before == 0) & (n_bg > 0)).to(count_dtype) / n_bg.clamp_min(1),
    )
    # 4. Loss of each row from the per-slot error sums, then each voxel's weight read back.
    table = torch.stack([w_fg, w_bg], dim=-1).view(num_rows, 2 * bins)
    table = torch.cat([table, table.new_zeros(num_rows, 2)], dim=1)  # the ignored bin
    losses = (table * error_sums.view(num_rows, -1)).sum(-1).to(dtype)
    if wrt_source:
        table[:, 0::2] *= -1  # foreground slots
    weights = table.to(dtype).view(-1).index_select(0, flat_slot)
    weights = weights.view([slot.shape[dim] for dim in memory_order])
    weights = weights.permute([memory_order.index(dim) for dim in range(3)])
    if wrt_source:  # the subgradient autograd takes where the error is 0 (abs, relu)
        weights.masked_fill_(key <= 0, 0.0)
    return weights, losses, num_fg.view(-1).to(torch.int64)


def _lovasz_class_rows(
    key: Tensor,
    fg: Tensor,
    method: Method,
    bins: int,
    chunk_elements: int,
    *,
    wrt_source: bool = False,
    overwrite_key: bool = False,
    world_size: int = 1,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights, losses, fg_counts)`` of ``(R, S, P)`` class rows (see above) from sort keys
    and masked labels. ``wrt_source``: the weights are the derivatives with respect to the
    source of the errors, ``|y - p|`` (probabilities) or ``relu(1 - x (2y - 1))`` (logits), not
    with respect to the errors. ``overwrite_key``: ``key`` may be overwritten (it then holds the
    weights). ``world_size > 1``: rows span the processes of ``process_group`` (histogram
    method only)."""
    check_lovasz_arguments(
        method=method,
        bins=bins,
        chunk_elements=chunk_elements,
        batch=True,
        distributed=world_size > 1,
    )
    if method == "sort":
        return _class_rows_by_sort(
            key,
            fg,
            chunk_elements=int(chunk_elements),
            wrt_source=wrt_source,
            overwrite_key=overwrite_key,
        )
    return _class_rows_by_histogram(
        key,
        fg,
        bins=int(bins),
        wrt_source=wrt_source,
        world_size=world_size,
        process_group=process_group,
    )


class _KnownGradient(torch.autograd.Function):
    """Returns ``value`` (per row); backward gives ``source`` the gradient ``grad_source``
    scaled per row. Saves nothing but ``grad_source``."""

    @staticmethod
    def forward(ctx, source: Tensor, value: Tensor, grad_source: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grad_source)
        return value

    @staticmethod
    def backward(ctx, grad_value: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (grad_source,) = ctx.saved_tensors
        scale = grad_value.reshape(*grad_value.shape, *([1] * (grad_source.ndim - grad_value.ndim)))
        return grad_source * scale, None, None


def _extension_rows(
    errors: Tensor,
    labels: Tensor,
    valid: Tensor | None,
    method: Method,
    bins: int,
    chunk_elements: int,
) -> tuple[Tensor, Tensor]:
    """``(weights (N, P), losses (N,))`` of checked ``(N, P)`` rows, without autograd."""
    _check_rows(errors, labels, valid)
    key, fg = _key_and_foreground(errors, labels, valid)
    with torch.no_grad():
        weights, losses, _ = _lovasz_class_rows(
            key[:, None], fg[:, None], method, bins, chunk_elements
        )
    return weights[:, 0], losses


def lovasz_weights(
    errors: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    method: Method = "sort",
    bins: int = DEFAULT_BINS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Per-voxel Lovász weights ``w``: the extension of each row is ``(errors * w).sum(-1)``.

    Computed without autograd: the weights are constants of the loss.

    Args:
        errors: ``(N, P)`` non-negative errors, one row per (volume, class).
        labels: ``(N, P)`` foreground indicators (bool or 0/1).
        valid: optional bool mask broadcastable to ``(N, P)`` (e.g. ``(1, P)``); ``False`` voxels
            take part in nothing and get weight 0.
        method: ``"sort"`` (exact, one batched sort) or ``"histogram"`` (sort-free, ``O(P)``; the
            extension under an order that is exact up to ties within a bin: ``0 <= exact - value <
            max(errors) / bins`` for each row).
        bins: number of error bins of the histogram method.
        chunk_elements: the sort method processes at most this many elements at once (whole rows,
            at least one row), which bounds its temporaries.

    Returns:
        ``(N, P)`` weights with the dtype of ``errors``.

    Example:
        >>> errors = torch.tensor([[0.9, 0.1, 0.6, 0.3]])
        >>> labels = torch.tensor([[1, 0, 0, 1]])
        >>> lovasz_weights(errors, labels)
        tensor([[0.5000, 0.0000, 0.1667, 0.3333]])

    Raises:
        ValueError: on shape mismatches, an unknown ``method`` or non-positive ``bins``.
    """
    weights, _ = _extension_rows(errors, labels, valid, method, bins, chunk_elements)
    return weights


def lovasz_extension(
    errors: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    method: Method = "sort",
    bins: int = DEFAULT_BINS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Lovász extension of the Jaccard loss of each row, differentiable in ``errors``.

    Args:
        errors: ``(N, P)`` non-negative errors.
        labels: ``(N, P)`` foreground indicators (bool or 0/1).
        valid: optional bool mask broadcastable to ``(N, P)``.
        method, bins, chunk_elements: see :func:`lovasz_weights`.

    Returns:
        ``(N,)`` losses; the gradient with respect to ``errors`` is the weights.

    Example:
        >>> errors = torch.tensor([[0.9, 0.1, 0.6, 0.3]], requires_grad=True)
        >>> loss = lovasz_extension(errors, torch.tensor([[1, 0, 0, 1]]))
        >>> round(loss.item(), 4)
        0.65
        >>> loss.backward(); errors.grad
        tensor([[0.5000, 0.0000, 0.1667, 0.3333]])

    Raises:
        ValueError: see :func:`lovasz_weights`.
    """
    weights, losses = _extension_rows(errors, labels, valid, method, bins, chunk_elements)
    return _KnownGradient.apply(errors, losses, weights)


def _as_class_rows(x: Tensor, *, batch: bool) -> Tensor:
    """``(B, C, *S)`` -> ``(B * C, 1, P)`` rows per volume, or ``(C, B, P)`` for the batch."""
    x = x.flatten(2)
    return x.transpose(0, 1) if batch else x.reshape(-1, 1, x.shape[2])


def _check_class_inputs(source: Tensor, labels: Tensor, valid: Tensor | None) -> Tensor | None:
    if source.ndim < 3 or labels.shape != source.shape:
        raise ValueError(
            "input and labels must both be (B, C, *spatial) with the same shape, got "
            f"{tuple(source.shape)} and {tuple(labels.shape)}"
        )
    if valid is None:
        return None
    expected = (source.shape[0], 1, *source.shape[2:])
    if tuple(valid.shape) != expected:
        raise ValueError(f"valid must have shape {expected}, got {tuple(valid.shape)}")
    return valid.bool()


def _class_losses(
    source: Tensor,
    key: Tensor,
    fg: Tensor,
    batch: bool,
    method: Method,
    bins: int,
    chunk_elements: int,
    *,
    wrt_source: bool,
    overwrite_key: bool,
    distributed: bool,
    process_group: object | None,
) -> tuple[Tensor, Tensor]:
    """Per (volume, class) losses, differentiable in ``source``, and foreground counts.

    Distributed (see :func:`lovasz_class_losses`): the losses and counts are those of the union
    of the processes' batches, and the gradient is ``world_size`` times the derivative of those
    losses with respect to this process's ``source``."""
    check_lovasz_arguments(method=method, batch=batch, distributed=distributed)
    world_size = distributed_world_size(distributed, process_group)
    num_batch, num_classes = key.shape[:2]
    with torch.no_grad():
        weights, losses, counts = _lovasz_class_rows(
            _as_class_rows(key, batch=batch),
            _as_class_rows(fg, batch=batch),
            method,
            bins,
            chunk_elements,
            wrt_source=wrt_source,
            overwrite_key=overwrite_key,
            world_size=world_size,
            process_group=process_group,
        )
        weights = weights.transpose(0, 1) if batch else weights
        weights = weights.reshape(source.shape)
        if world_size > 1:  # DDP's mean of the processes' gradients is then the global one
            weights.mul_(world_size)
    shape = (1 if batch else num_batch, num_classes)
    return _KnownGradient.apply(source, losses.view(shape), weights), counts.view(shape)


def lovasz_class_losses(
    errors: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    batch: bool = False,
    method: Method = "sort",
    bins: int = DEFAULT_BINS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    *,
    distributed: bool = False,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor]:
    """Lovász extension of every (volume, class) pair of a batch, in one batched computation.

    Args:
        errors: ``(B, C, *spatial)`` non-negative errors, any number of spatial dimensions.
        labels: ``(B, C, *spatial)`` foreground indicators (bool or 0/1).
        valid: optional ``(B, 1, *spatial)`` bool; ``False`` voxels take part in nothing.
        batch: ``False``: one row per volume and class; ``True``: the batch is one set of voxels.
        method, bins, chunk_elements: see :func:`lovasz_weights`.
        distributed: with ``batch=True`` and ``method="histogram"``, each class row is the union
            of the batches of all processes of ``process_group`` (a collective call: every process
            must call it). Returned losses and counts are those of the union, the same on every
            process; backward gives this process's ``errors`` ``world_size`` times their
            derivative, so that DDP's mean of the processes' gradients is the gradient of the
            union's loss. Without an initialised process group (or with one process) nothing
            changes.
        process_group: the ``torch.distributed`` group (``None``: the default group).

    Returns:
        ``(losses, fg_counts)``, each ``(B, C)`` (``(1, C)`` when ``batch``): the extension of each
        row, differentiable in ``errors``, and its number of valid foreground voxels.

    Example:
        >>> errors = torch.tensor([[[0.9, 0.1], [0.1, 0.9]]])
        >>> losses, counts = lovasz_class_losses(errors, torch.tensor([[[0, 1], [1, 0]]]))
        >>> losses, counts
        (tensor([[0.5000, 0.5000]]), tensor([[1, 1]]))

    Raises:
        ValueError: when the shapes do not match, or ``distributed`` without ``batch=True`` and
            ``method="histogram"``.
    """
    valid = _check_class_inputs(errors, labels, valid)
    key, fg = _key_and_foreground(errors, labels, valid)
    # a key made by _sort_key may be overwritten; the errors themselves may not
    return _class_losses(
        errors,
        key,
        fg,
        batch,
        method,
        bins,
        chunk_elements,
        wrt_source=False,
        overwrite_key=valid is not None,
        distributed=distributed,
        process_group=process_group,
    )


def lovasz_probability_class_losses(
    probs: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    batch: bool = False,
    method: Method = "sort",
    bins: int = DEFAULT_BINS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    *,
    distributed: bool = False,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`lovasz_class_losses` of the errors ``|y - p|``, differentiable in ``probs``.

    The errors are never part of the autograd graph: backward keeps one tensor, the derivative
    of each row's loss with respect to ``probs``.

    Args:
        probs: ``(B, C, *spatial)`` probabilities in [0, 1] (softmax or per-channel sigmoid).
        labels: ``(B, C, *spatial)`` one-hot or multi-hot targets (bool or 0/1).
        valid, batch, method, bins, chunk_elements, distributed, process_group: see
            :func:`lovasz_class_losses`.

    Returns:
        ``(losses, fg_counts)`` as :func:`lovasz_class_losses`.

    Example:
        >>> probs = torch.tensor([[[0.8, 0.3], [0.2, 0.7]]])
        >>> labels = torch.tensor([[[1, 0], [0, 1]]])
        >>> lovasz_probability_class_losses(probs, labels)[0]
        tensor([[0.2500, 0.3000]])

    Raises:
        ValueError: as :func:`lovasz_class_losses`.
    """
    valid = _check_class_inputs(probs, labels, valid)
    with torch.no_grad():
        fg = labels.bool() if valid is None else labels.bool() & valid
        detached = probs.detach()
        key = torch.rsub(detached, 1.0)
        torch.where(fg, key, detached, out=key).abs_()
        if valid is not None:
            key.masked_fill_(~valid, -1.0)
    return _class_losses(
        probs,
        key,
        fg,
        batch,
        method,
        bins,
        chunk_elements,
        wrt_source=True,
        overwrite_key=True,
        distributed=distributed,
        process_group=process_group,
    )


def lovasz_hinge_class_losses(
    logits: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    batch: bool = False,
    method: Method = "sort",
    bins: int = DEFAULT_BINS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    *,
    distributed: bool = False,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`lovasz_class_losses` of the hinge errors ``relu(1 - x (2 y - 1))``.

    Args:
        logits: ``(B, C, *spatial)`` raw scores; each channel is a binary problem.
        labels: ``(B, C, *spatial)`` binary targets (bool or 0/1).
        valid, batch, method, bins, chunk_elements, distributed, process_group: see
            :func:`lovasz_class_losses`.

    Returns:
        ``(losses, fg_counts)`` as :func:`lovasz_class_losses`, differentiable in ``logits``.

    Example:
        >>> logits = torch.tensor([[[2.0, -1.0, 0.5, -0.5]]])
        >>> lovasz_hinge_class_losses(logits, torch.tensor([[[1, 0, 0, 1]]]))[0]
        tensor([[1.]])

    Raises:
        ValueError: as :func:`lovasz_class_losses`.
    """
    valid = _check_class_inputs(logits, labels, valid)
    with torch.no_grad():
        fg = labels.bool() if valid is None else labels.bool() & valid
        detached = logits.detach()
        key = torch.where(labels.bool(), -detached, detached).add_(1.0).clamp_min_(0.0)
        if valid is not None:
            key.masked_fill_(~valid, -1.0)
    return _class_losses(
        logits,
        key,
        fg,
        batch,
        method,
        bins,
        chunk_elements,
        wrt_source=True,
        overwrite_key=True,
        distributed=distributed,
        process_group=process_group,
    )


def class_weights(
    losses: Tensor,
    fg_counts: Tensor,
    present_only: bool = True,
    weight: Tensor | None = None,
) -> Tensor:
    """Weight of each (row, class) loss in the class mean of its row.

    Args:
        losses: ``(R, C)`` per-class losses (their dtype and device are used).
        fg_counts: ``(R, C)`` foreground voxel counts of the same rows.
        present_only: classes without foreground in a row get weight 0.
        weight: optional ``(C,)`` non-negative class weights.

    Returns:
        ``(R, C)`` weights: ``weight_c`` (or 1) for the classes that count, 0 for the others.

    Example:
        >>> counts = torch.tensor([[3, 1, 0]])
        >>> class_weights(torch.zeros(1, 3), counts, weight=torch.tensor([1.0, 2.0, 3.0]))
        tensor([[1., 2., 0.]])

    Raises:
        ValueError: when shapes do not match.
    """
    if losses.shape != fg_counts.shape or losses.ndim != 2:
        raise ValueError(
            f"losses and fg_counts must be (R, C) of the same shape, got {tuple(losses.shape)} "
            f"and {tuple(fg_counts.shape)}"
        )
    counted = (fg_counts > 0).to(losses.dtype) if present_only else torch.ones_like(losses)
    if weight is None:
        return counted
    if weight.shape != (losses.shape[1],):
        raise ValueError(
            f"weight must have one value per class ({losses.shape[1]}), got {tuple(weight.shape)}"
        )
    return counted * weight.to(losses)


def average_class_losses(
    losses: Tensor,
    fg_counts: Tensor,
    present_only: bool = True,
    weight: Tensor | None = None,
) -> Tensor:
    """Weighted mean over classes of each row of ``losses``.

    Args:
        losses: ``(R, C)`` per-class losses (``R`` volumes, or 1 for a whole batch).
        fg_counts: ``(R, C)`` foreground voxel counts of the same rows.
        present_only: average only over the classes with foreground in that row (the paper's
            ``classes="present"``); a row without any contributes 0.
        weight: optional ``(C,)`` non-negative class weights.

    Returns:
        ``(R,)`` per-row means.

    Example:
        >>> average_class_losses(torch.tensor([[0.2, 0.4, 0.9]]), torch.tensor([[3, 1, 0]]))
        tensor([0.3000])

    Raises:
        ValueError: when shapes do not match.
    """
    counted = class_weights(losses, fg_counts, present_only, weight)
    total = counted.sum(-1)
    mean = (losses * counted).sum(-1) / total.clamp_min(torch.finfo(losses.dtype).tiny)
    return torch.where(total > 0, mean, torch.zeros_like(mean))


def _class_selection(num_classes: int, classes: str | Sequence[int]) -> tuple[bool, list[int]]:
    """``(present_only, selected channels)`` of a ``classes`` argument for ``num_classes``."""
    classes = check_lovasz_arguments(classes=classes)
    if isinstance(classes, str):
        return classes == "present", list(range(num_classes))
    bad = [c for c in classes if c >= num_classes]
    if bad:
        raise ValueError(f"classes {bad} out of range for an input with {num_classes} channels")
    return False, classes


_PER_VOLUME_DEPRECATION = (
    "per_volume is deprecated: use batch (batch=not per_volume), which means what it means in "
    "the loss classes; per_volume will be removed"
)


def _batch_from_per_volume(batch: bool, per_volume: bool | None) -> bool:
    """``batch``, or ``not per_volume`` (with a deprecation warning) when that is given."""
    if per_volume is None:
        return batch
    warnings.warn(_PER_VOLUME_DEPRECATION, DeprecationWarning, stacklevel=3)
    return not per_volume


def lovasz_softmax(
    probs: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    classes: str | Sequence[int] = "present",
    batch: bool = False,
    method: Method = "sort",
    bins: int = DEFAULT_BINS,
    *,
    distributed: bool = False,
    process_group: object | None = None,
    per_volume: bool | None = None,
) -> Tensor:
    """Lovász-Softmax loss from probabilities and one-hot (or multi-hot) labels.

    The same arguments give the same value as :class:`~lovasz_monai.losses.LovaszSoftmaxLoss`
    with ``softmax=False`` on these probabilities and labels.

    Args:
        probs: ``(B, C, *spatial)`` class probabilities (softmax, or per-channel sigmoid).
        labels: ``(B, C, *spatial)`` one-hot or multi-hot targets (bool or 0/1).
        valid: optional ``(B, 1, *spatial)`` bool, ``False`` for ignored voxels.
        classes: ``"present"`` (classes with foreground in the row), ``"all"``, or a list.
        batch: ``False`` (default, as the loss classes): mean over volumes of the per-volume
            loss (the reference's ``per_image=True``); ``True``: the batch is one set of voxels.
        method, bins: see :func:`lovasz_weights`.
        distributed, process_group: the loss of the union of all processes' batches (see
            :func:`lovasz_class_losses`; needs ``batch=True`` and ``method="histogram"``).
        per_volume: deprecated spelling of ``not batch`` (warns).

    Returns:
        Scalar loss.

    Example:
        >>> probs = torch.tensor([[[0.8, 0.3], [0.2, 0.7]]])
        >>> labels = torch.tensor([[[1, 0], [0, 1]]])
        >>> lovasz_softmax(probs, labels)
        tensor(0.2750)

    Raises:
        ValueError: on shape mismatches, an invalid ``classes``, or ``distributed`` without
            ``batch=True`` and ``method="histogram"``.
    """
    batch = _batch_from_per_volume(batch, per_volume)
    present_only, selected = _class_selection(probs.shape[1], classes)
    if len(selected) != probs.shape[1]:
        probs, labels = probs[:, selected], labels[:, selected]
    losses, counts = lovasz_probability_class_losses(
        probs,
        labels,
        valid,
        batch,
        method,
        bins,
        distributed=distributed,
        process_group=process_group,
    )
    return average_class_losses(losses, counts, present_only).mean()


def lovasz_hinge(
    logits: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    batch: bool = False,
    method: Method = "sort",
    bins: int = DEFAULT_BINS,
    *,
    distributed: bool = False,
    process_group: object | None = None,
    per_volume: bool | None = None,
) -> Tensor:
    """Lovász hinge loss of binary (or per-channel multi-label) logits.

    The same arguments give the same value as :class:`~lovasz_monai.losses.LovaszHingeLoss`.

    The errors are the hinge margins ``relu(1 - logit * (2 * label - 1))``; each channel is its
    own binary problem and channels are averaged.

    Args:
        logits: ``(B, C, *spatial)`` raw scores.
        labels: ``(B, C, *spatial)`` binary targets (bool or 0/1).
        valid: optional ``(B, 1, *spatial)`` bool, ``False`` for ignored voxels.
        batch: ``False`` (default, as the loss classes and the reference): mean over volumes of
            the per-volume loss; ``True`` treats the batch as one set of voxels.
        method, bins: see :func:`lovasz_weights`.
        distributed, process_group: the loss of the union of all processes' batches (see
            :func:`lovasz_class_losses`; needs ``batch=True`` and ``method="histogram"``).
        per_volume: deprecated spelling of ``not batch`` (warns).

    Returns:
        Scalar loss.

    Example:
        >>> logits = torch.tensor([[[2.0, -1.0, 0.5, -0.5]]])
        >>> lovasz_hinge(logits, torch.tensor([[[1, 0, 0, 1]]]))
        tensor(1.)

    Raises:
        ValueError: on shape mismatches, or ``distributed`` without ``batch=True`` and
            ``method="histogram"``.
    """
    batch = _batch_from_per_volume(batch, per_volume)
    losses, counts = lovasz_hinge_class_losses(
        logits,
        labels,
        valid,
        batch,
        method,
        bins,
        distributed=distributed,
        process_group=process_group,
    )
    return average_class_losses(losses, counts, present_only=False).mean()
