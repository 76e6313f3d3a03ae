"""Lovász weights of class rows: Algorithm 1 on sorted rows, the sort and histogram methods.

With ``G`` foreground voxels in a row and rows sorted by decreasing error, the weight of the
voxel at sorted position ``k`` (``F_k``/``B_k`` foreground/background voxels up to and including it)
is ``1 / (G + B_k)`` for a foreground voxel and ``(G - F_k) / ((G + B_k - 1) (G + B_k))`` for a
background voxel. These closed forms are the telescoping differences ``J_k - J_{k-1}`` of the
Jaccard loss ``J_k = 1 - (G - F_k) / (G + B_k)`` without the cancellation of subtracting two
nearly equal numbers. A row without foreground puts weight 1 on its largest valid error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lovasz_monai.functional.arguments import LovaszSettings, check_binary, check_finite

__all__ = ["lovasz_grad"]


def lovasz_grad(
    fg_sorted: Tensor,
    valid_sorted: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    validate: bool = True,
) -> Tensor:
    """Gradient of the Lovász extension for rows already sorted by decreasing error.

    This is Algorithm 1 of the paper, written with the closed-form increments of the Jaccard loss
    (see the module docstring), so that no two nearly equal numbers are subtracted.

    Args:
        fg_sorted: ``(..., P)`` foreground indicators (bool or 0/1) in decreasing-error order.
        valid_sorted: optional ``(..., P)`` bool or 0/1, ``False`` (0) for voxels that take part
            in nothing.
        dtype: floating dtype of the result.
        validate: check that ``fg_sorted`` and ``valid_sorted`` hold only 0 and 1 (a host
            synchronisation each); ``False`` reads any non-zero value as 1.

    Returns:
        ``(..., P)`` weights ``g >= 0`` of ``dtype``. Each row sums to 1 when it has a valid
        voxel and to 0 otherwise.

    Example:
        >>> lovasz_grad(torch.tensor([1, 0, 1, 0]))
        tensor([0.5000, 0.1667, 0.3333, 0.0000])

    Raises:
        ValueError: when the shapes of ``fg_sorted`` and ``valid_sorted`` differ, or
            (``validate``) either holds a value other than 0 and 1.
    """
    if validate:
        check_binary(fg_sorted, "fg_sorted")
    fg = fg_sorted.bool()
    if valid_sorted is not None:
        if valid_sorted.shape != fg_sorted.shape:
            raise ValueError(
                f"valid_sorted must have the shape of fg_sorted {tuple(fg_sorted.shape)}, "
                f"got {tuple(valid_sorted.shape)}"
            )
        if validate:
            check_binary(valid_sorted, "valid_sorted")
        valid_sorted = valid_sorted.bool()
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


def _check_rows(errors: Tensor, labels: Tensor, valid: Tensor | None, validate: bool) -> None:
    """Shapes (and, with ``validate``, values) of the rows of
    :func:`~lovasz_monai.functional.lovasz_extension`."""
    if not errors.is_floating_point():
        raise TypeError(f"errors must be a floating point tensor, got dtype {errors.dtype}")
    if errors.ndim != 2 or errors.shape[1] == 0:
        raise ValueError(
            f"errors must be (N, P) rows with P >= 1 voxels, got shape {tuple(errors.shape)}"
        )
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
    if not validate:
        return
    # ignored voxels sort below every valid error with the key -1 (see below)
    if errors.numel() and (~torch.isfinite(errors) | (errors < 0)).any():
        check_finite(errors, "errors")
        raise ValueError(
            "errors must be >= 0 (e.g. 1 - probability of the true class, or a hinge "
            f"margin), got a minimum of {errors.min().item():g}"
        )
    check_binary(labels, "labels")
    if valid is not None:
        check_binary(valid, "valid")


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
# below this many voxels per call, starting threads costs more than it saves
_THREADED_SORT_ELEMENTS = 1 << 20
# rows of at least this many voxels sort only the voxels that can carry weight (shorter rows
# cost less to sort whole than to sort in a Python loop, row by row)
_PRUNED_ROW_VOXELS = 1 << 14
# above this share of kept voxels, gathering them costs more than sorting the rest (measured:
# a 64^3 row with 91% kept sorts as fast gathered as whole)
_PRUNED_FRACTION = 0.8


def _row_shares(num_rows: int, elements: int) -> list[slice]:
    """Shares of the rows for ``torch.get_num_threads()`` threads (one share for small inputs)."""
    workers = min(torch.get_num_threads(), num_rows)
    if workers <= 1 or elements < _THREADED_SORT_ELEMENTS:
        return [slice(None)]
    bounds = np.linspace(0, num_rows, workers + 1).astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _each_share(work: Callable[[slice], None], shares: list[slice]) -> None:
    """``work`` on every share, in threads when there are several (numpy releases the GIL)."""
    if len(shares) == 1:
        work(shares[0])
        return
    with ThreadPoolExecutor(len(shares)) as pool:
        list(pool.map(work, shares))


def _weighted_voxels(key: Tensor, fg: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, kept)``: the voxels of ``(R, S, P)`` float32 CPU rows that can carry a weight
    (bool, the shape of ``key``) and their number in each row (int64 ``(R,)``).

    Sorted by decreasing error, a row's Jaccard loss reaches 1 at its last foreground voxel and
    stays there, so every later weight is 0: only the voxels whose error is at least the
    smallest foreground error can weigh (ties included: they sort before that voxel). A row
    without foreground weighs its first largest error only (the first in voxel order: ties sort
    by voxel index), so it keeps that one voxel, ties at its error or not. Ignored voxels never
    weigh. A row that keeps more than :data:`_PRUNED_FRACTION` of its voxels counts as kept
    whole.
    """
    key_np, fg_np = key.numpy(), fg.numpy()
    keep = np.empty(key_np.shape, dtype=bool)
    kept = np.empty(key_np.shape[0], dtype=np.int64)

    def find(rows: slice) -> None:
        rows_key, rows_fg, rows_keep = key_np[rows], fg_np[rows], keep[rows]
        cut = rows_key.min(axis=(1, 2), where=rows_fg, initial=np.inf)
        np.greater_equal(rows_key, cut[:, None, None], out=rows_keep)
        for row in np.flatnonzero(~rows_fg.any(axis=(1, 2))):
            rows_keep[row] = False
            first_largest = np.argmax(rows_key[row])  # flat index in voxel order
            if rows_key[row].flat[first_largest] >= 0:  # not when every voxel is ignored
                rows_keep[row].flat[first_largest] = True
        counts = np.count_nonzero(rows_keep.reshape(len(cut), -1), axis=-1)
        # a row that keeps most of its voxels is cheaper to sort whole than to gather first
        whole = counts > _PRUNED_FRACTION * counts.dtype.type(keep[0].size)
        kept[rows] = np.where(whole, keep[0].size, counts)

    _each_share(find, _row_shares(key_np.shape[0], key_np.size))
    return keep, kept


def _pack_voxels(
    out: np.ndarray, errors: np.ndarray, fg_bit: np.ndarray, voxel: np.ndarray
) -> None:
    """Writes into the int64 ``out`` one sort key per voxel: the inverted error bits (a value
    past them for ignored voxels) in the high word, the foreground bit and the voxel index in
    the low word. Ascending order of the keys is decreasing error, background first at equal
    error, then the voxel index."""
    np.copyto(out, errors.view(np.int32))
    np.bitwise_and(out, _INDEX_MASK, out=out)  # the sign bit of -0.0
    np.subtract(_ERROR_BITS_MAX, out, out=out)  # ascending order == descending error
    np.copyto(out, _IGNORED, where=errors < 0)
    out <<= 1
    out |= fg_bit
    out <<= 31
    out |= voxel


def _unpack_sorted(packed: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(order, fg_sorted, errors_sorted, has_valid)`` of rows of sorted :func:`_pack_voxels`
    keys, as :func:`_sort_rows_torch` returns them."""
    packed_t = torch.from_numpy(packed)
    # little-endian: low word first (flattened first: a size-1 row may carry any stride)
    words = packed_t.reshape(-1).view(torch.int32).view(packed.shape[0], -1)
    fg_sorted = words[:, 0::2] < 0
    error_bits = torch.sub(_ERROR_BITS_MAX, words[:, 1::2]).clamp_min_(0)  # ignored: 0.0
    has_valid = words[:, 1:2] != _IGNORED
    return packed_t.bitwise_and_(_INDEX_MASK), fg_sorted, error_bits.view(torch.float32), has_valid


def _sort_rows_numpy(key: Tensor, fg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same as :func:`_sort_rows_torch` for float32 CPU rows, several times faster.

    Each voxel becomes one int64 (:func:`_pack_voxels`); numpy's vectorised sort of these
    integers alone yields the order, the sorted labels and the sorted errors. Rows are packed
    and sorted in ``torch.get_num_threads()`` threads, a share of the rows each.
    """
    num_rows, segments, num_voxels = key.shape
    key_np, fg_np = key.numpy(), fg.numpy()
    index = np.arange(segments * num_voxels, dtype=np.int64).reshape(segments, num_voxels)
    packed = np.empty((num_rows, segments * num_voxels), dtype=np.int64)

    def pack_and_sort(rows: slice) -> None:
        _pack_voxels(
            packed[rows].reshape(-1, segments, num_voxels), key_np[rows], fg_np[rows], index
        )
        packed[rows].sort(axis=-1)

    _each_share(pack_and_sort, _row_shares(num_rows, packed.size))
    return _unpack_sorted(packed)


def _sort_kept_voxels(
    key: np.ndarray, fg: np.ndarray, keep: np.ndarray, kept: np.ndarray, rows: np.ndarray
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sorts the voxels that can weigh only (``keep`` and ``kept`` of :func:`_weighted_voxels`),
    packed as in :func:`_sort_rows_numpy`, for the ``rows`` (indices) of the ``(R, S, P)``
    arrays ``key`` and ``fg``, which are read in place; returns as :func:`_sort_rows_torch`.

    Each output row holds its row's kept voxels, sorted, then ignored entries (weight 0) up to
    the longest kept row of ``rows``: the weights, losses and counts of its first ``kept[row]``
    entries are those of the whole sort; the index of the padding means nothing.
    """
    segments, num_voxels = key.shape[1:]
    row_size = segments * num_voxels
    packed = np.empty((len(rows), max(1, int(kept[rows].max()))), dtype=np.int64)
    index = np.arange(row_size, dtype=np.int64).reshape(segments, num_voxels)

    def pack_and_sort(share: slice) -> None:
        for out, row in zip(packed[share], rows[share], strict=True):
            count = kept[row]
            if count == row_size:  # sorted whole
                _pack_voxels(out.reshape(segments, num_voxels), key[row], fg[row], index)
            else:
                voxels = np.flatnonzero(keep[row])
                at = np.divmod(voxels, num_voxels)
                _pack_voxels(out[:count], key[row][at], fg[row][at], voxels)
                out[count:] = _IGNORED << 32
            out[:count].sort()

    _each_share(pack_and_sort, _row_shares(len(rows), packed.size))
    return _unpack_sorted(packed)


def _write_kept_weights(
    weights: np.ndarray, rows: np.ndarray, kept: np.ndarray, order: Tensor, grad: Tensor
) -> None:
    """Writes the ``rows`` of the ``(R, S, P)`` array ``weights``: the sorted weights ``grad``
    of :func:`_sort_kept_voxels` at their voxels (``order``), 0 at the voxels left out."""
    num_voxels = weights.shape[2]
    order_np, grad_np = order.numpy(), grad.numpy()

    def write(share: slice) -> None:
        for voxels, values, row in zip(order_np[share], grad_np[share], rows[share], strict=True):
            count = kept[row]
            if count < weights[row].size:
                weights[row].fill(0.0)
            weights[row][np.divmod(voxels[:count], num_voxels)] = values[:count]

    _each_share(write, _row_shares(len(rows), weights[0].size * len(rows)))


def _chunks_by_length(kept: np.ndarray, chunk_elements: int) -> list[np.ndarray]:
    """Row indices in chunks of similar kept lengths, longest first, each chunk within
    ``chunk_elements`` once padded to its longest row (at least one row a chunk)."""
    order = np.argsort(-kept, kind="stable")
    chunks, start = [], 0
    while start < len(order):
        size = max(1, chunk_elements // max(int(kept[order[start]]), 1))
        chunks.append(order[start : start + size])
        start += size
    return chunks


def _sorts_with_numpy(device: torch.device, dtype: torch.dtype, row_size: int) -> bool:
    """Whether rows of ``row_size`` voxels of this device and dtype can be sorted by
    :func:`_sort_rows_numpy` (given a unit stride along the voxels)."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and row_size <= _INDEX_MASK
        and sys.byteorder == "little"
        and not torch.compiler.is_compiling()
    )


def _use_numpy_sort(key: Tensor) -> bool:
    """Whether the ``(R, S, P)`` rows ``key`` are sorted by :func:`_sort_rows_numpy`."""
    row_size = key.shape[-1] * key.shape[-2]
    return _sorts_with_numpy(key.device, key.dtype, row_size) and key.stride(-1) == 1


def sorts_weighted_voxels_only(
    device: torch.device, dtype: torch.dtype, row_size: int, settings: LovaszSettings
) -> bool:
    """Whether class rows of ``row_size`` voxels of this device and dtype, with a unit stride
    along the voxels, sort only the voxels that can weigh (:func:`_weighted_voxels`): the exact
    method on the CPU, float32 rows of at least :data:`_PRUNED_ROW_VOXELS`. A row without
    foreground then keeps one voxel."""
    return (
        settings.method == "sort"
        and row_size >= _PRUNED_ROW_VOXELS
        and _sorts_with_numpy(device, dtype, row_size)
    )


def _sorted_row_weights(
    fg_sorted: Tensor,
    errors_sorted: Tensor,
    has_valid: Tensor,
    dtype: torch.dtype,
    wrt_source: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights, losses, counts)`` of rows sorted by decreasing error (ignored voxels last, as
    background with error 0): Algorithm 1, then each row's loss, sum of error x weight."""
    # Ignored voxels get weight 0 (and so does the first voxel of a row where every voxel is
    # ignored).
    grad, counts = _lovasz_grad(
        fg_sorted, None, dtype, negate_foreground=wrt_source, has_valid=has_valid
    )
    weighted = torch.mul(errors_sorted, grad)
    losses = (weighted.abs_() if wrt_source else weighted).sum(-1)  # pairwise summation
    if wrt_source:  # the subgradient autograd takes where the error is 0 (abs, relu)
        grad.masked_fill_(errors_sorted <= 0, 0.0)
    return grad, losses, counts


def _class_rows_by_sort(
    key: Tensor, fg: Tensor, *, chunk_elements: int, wrt_source: bool, overwrite_key: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact per-voxel weights (layout of ``key``), row losses and foreground counts of
    ``(R, S, P)`` class rows. ``wrt_source``, ``overwrite_key``: see :func:`lovasz_class_rows`;
    with ``overwrite_key`` each chunk of rows is read in full before its weights are written.
    """
    num_rows, segments, num_voxels = key.shape
    row_size = segments * num_voxels
    # Outputs: the weights (possibly in the key's own memory), one loss and one count per row.
    weights = key if overwrite_key else torch.empty_like(key)
    losses = torch.empty(num_rows, dtype=key.dtype, device=key.device)
    counts = torch.empty(num_rows, 1, dtype=torch.int64, device=key.device)
    if _use_numpy_sort(key) and row_size >= _PRUNED_ROW_VOXELS:
        keep, kept = _weighted_voxels(key, fg)
        if not (kept == row_size).all():
            # Only the voxels that can weigh are sorted; rows of similar lengths share a chunk.
            key_np, fg_np, weights_np = key.numpy(), fg.numpy(), weights.numpy()
            for rows in _chunks_by_length(kept, chunk_elements):
                order, fg_sorted, errors_sorted, has_valid = _sort_kept_voxels(
                    key_np, fg_np, keep, kept, rows
                )
                grad, row_losses, row_counts = _sorted_row_weights(
                    fg_sorted, errors_sorted, has_valid, key.dtype, wrt_source
                )
                index = torch.from_numpy(rows)
                losses[index], counts[index] = row_losses, row_counts
                _write_kept_weights(weights_np, rows, kept, order, grad)
            return weights, losses, counts.view(-1)
    # Whole rows, as many as fit the element budget (at least one), are sorted at once.
    rows_per_chunk = max(1, chunk_elements // max(row_size, 1))
    sort_rows = _sort_rows_numpy if _use_numpy_sort(key) else _sort_rows_torch
    for start in range(0, num_rows, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, num_rows))
        # 1. Sort each row by decreasing error, carrying the foreground along (the rows are
        # read in full before their weights are written).
        order, fg_sorted, errors_sorted, has_valid = sort_rows(key[rows], fg[rows])
        # 2. Algorithm 1 on the sorted rows, and the loss of each row.
        grad, losses[rows], counts[rows] = _sorted_row_weights(
            fg_sorted, errors_sorted, has_valid, key.dtype, wrt_source
        )
        # 3. Scatter the weights back from sorted order to voxel order.
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
    per-bin counts (DESIGN.md). ``wrt_source``: see :func:`lovasz_class_rows`.

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
    # 2. Voxel count and error sum of every slot.
    count_dtype = torch.float64 if segments * num_voxels > 1 << 24 else dtype  # exact counts
    slot_sums = torch.zeros(2, num_rows * slots_per_row, dtype=count_dtype, device=key.device)
    counts, error_sums = slot_sums.unbind(0)
    ones = torch.ones((), dtype=count_dtype, device=key.device).expand_as(flat_slot)
    counts.index_add_(0, flat_slot, ones)
    flat_key = key.permute(memory_order).reshape(-1).to(count_dtype)
    error_sums.index_add_(0, flat_slot, flat_key)
    if world_size > 1:  # summed over the processes in float64 (exact counts of any union size)
        slot_sums = slot_sums.to(torch.float64)
        dist.all_reduce(slot_sums, op=dist.ReduceOp.SUM, group=process_group)
        count_dtype = torch.float64
        counts, error_sums = slot_sums.unbind(0)
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


def lovasz_class_rows(
    key: Tensor,
    fg: Tensor,
    settings: LovaszSettings,
    *,
    wrt_source: bool = False,
    overwrite_key: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights, losses, fg_counts)`` of ``(R, S, P)`` class rows (see above) from sort keys
    and masked labels, by the method of ``settings`` (its ``batch`` is the caller's layout of
    the rows). ``wrt_source``: the weights are the derivatives with respect to the source of the
    errors, ``|y - p|`` (probabilities) or ``relu(1 - x (2y - 1))`` (logits), not with respect
    to the errors. ``overwrite_key``: ``key`` may be overwritten (it then holds the weights).
    With ``settings.world_size > 1`` the rows span the processes of its group (the histogram
    method, which :class:`LovaszSettings` requires for ``distributed``)."""
    if settings.method == "sort":
        return _class_rows_by_sort(
            key,
            fg,
            chunk_elements=settings.chunk_elements,
            wrt_source=wrt_source,
            overwrite_key=overwrite_key,
        )
    return _class_rows_by_histogram(
        key,
        fg,
        bins=settings.bins,
        wrt_source=wrt_source,
        world_size=settings.world_size,
        process_group=settings.process_group,
    )
