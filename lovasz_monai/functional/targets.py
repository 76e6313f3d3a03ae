"""Decoding of loss targets: label maps, one-hot targets, ignore labels and masks.

One function, :func:`decode_target`, turns what a user passes (a ``(B, 1, *S)`` label map with an
optional ignore label, or a ``(B, C, *S)`` one-hot/multi-hot target, and an optional mask) into
what the Lovász functions take: a bool foreground ``(B, C, *S)`` and a bool validity
``(B, 1, *S)``. The loss classes and :func:`~lovasz_monai.functional.lovasz_softmax` both use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lovasz_monai.functional.arguments import (
    _check_nonempty,
    check_binary,
    check_finite,
    check_ignore_index,
)

__all__ = ["decode_target", "dtype_holds", "label_equals"]


def label_equals(labels: Tensor, value: int) -> Tensor:
    """``labels == value`` compared as numbers, not in the dtype of ``labels``.

    PyTorch casts a Python number to the tensor's dtype before comparing, so ``uint8`` labels
    compared with ``-1`` match ``255`` (and ``int8`` labels compared with ``300`` match ``44``).
    A value that ``labels``' dtype cannot hold matches no voxel here.

    Args:
        labels: a tensor of labels of any dtype (integer, bool or floating point).
        value: the label value, e.g. an ignore label.

    Returns:
        A bool tensor of the shape of ``labels``.

    Example:
        >>> labels = torch.tensor([0, 1, 255], dtype=torch.uint8)
        >>> label_equals(labels, -1), labels == -1
        (tensor([False, False, False]), tensor([False, False,  True]))
    """
    if not dtype_holds(labels.dtype, value):
        return torch.zeros_like(labels, dtype=torch.bool)
    return labels == value


def dtype_holds(dtype: torch.dtype, value: int) -> bool:
    """Whether ``dtype`` represents the integer ``value`` exactly.

    Example:
        >>> dtype_holds(torch.uint8, 255), dtype_holds(torch.uint8, -1), dtype_holds(torch.bool, 2)
        (True, False, False)
    """
    if dtype == torch.bool:
        return value in (0, 1)
    if dtype.is_floating_point:
        return float(torch.tensor(value, dtype=torch.float64).to(dtype)) == value
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def _check_device(name: str, value: Tensor, device: torch.device | None) -> None:
    if device is not None and value.device != torch.device(device):
        raise ValueError(
            f"{name} is on {value.device} but the input is on {torch.device(device)}: move both "
            "to the same device"
        )


def _check_target_shape(target: Tensor, input_shape: tuple[int, ...]) -> None:
    num_batch, num_channels, *spatial = input_shape
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    _check_nonempty(input_shape, "input")
    if (
        target.ndim != len(input_shape)
        or target.shape[0] != num_batch
        or list(target.shape[2:]) != spatial
        or target.shape[1] not in (1, num_channels)
    ):
        raise ValueError(
            f"target must be a (B, 1, *spatial) label map {(num_batch, 1, *spatial)} or a "
            f"(B, C, *spatial) one-hot target {(num_batch, num_channels, *spatial)}, got shape "
            f"{tuple(target.shape)}"
        )


def _mask_to_valid(mask: Tensor, expected: tuple[int, ...], validate: bool) -> Tensor:
    """The ``(B, 1, *S)`` mask as bool validity."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must have shape (B, 1, *spatial) = {expected}, got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if validate:
        check_binary(mask, "mask")
    return mask != 0


# unsigned integer dtypes wider than uint8 (NIfTI label maps are often uint16) have few kernels
# (no min/max, where or scatter): their values are read as int64
_WIDE_UNSIGNED = tuple(
    getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)
)


def _label_map(
    target: Tensor, num_labels: int, ignore_index: int | None, validate: bool
) -> tuple[Tensor, Tensor | None]:
    """Integer labels ``(B, 1, *S)`` with ignored voxels set to 0, and their validity."""
    valid = None
    if target.dtype in _WIDE_UNSIGNED:
        if target.dtype == _WIDE_UNSIGNED[-1] and validate:
            # uint64 has no comparison kernels either; values above int64's range would wrap
            as_float = target.to(torch.float64)
            if (as_float >= 2.0**63).any():
                raise ValueError("uint64 label map holds values beyond the int64 range")
        target = target.to(torch.int64)
    if ignore_index is not None:
        valid = ~label_equals(target, ignore_index)
        target = torch.where(valid, target, torch.zeros_like(target))
    if validate:
        if target.is_floating_point():
            check_finite(target, "label map")
        if target.is_floating_point() and not torch.equal(target, target.round()):
            raise ValueError("label map must hold integer class indices, got fractional values")
        if target.dtype == torch.bool:
            target = target.long()
        low, high = target.min().item(), target.max().item()
        if low < 0 or high >= num_labels:
            ignored = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
            if ignore_index is not None and not dtype_holds(target.dtype, ignore_index):
                ignored += (
                    f" (a {str(target.dtype).replace('torch.', '')} label map cannot hold it)"
                )
            hint = ""
            if ignore_index is None:
                hint = (
                    "; labels are checked under a mask too: if a value marks unlabelled voxels, "
                    "pass it as ignore_index"
                )
            raise ValueError(
                f"label map values must lie in [0, {num_labels}){ignored}, got values in "
                f"[{low:g}, {high:g}]{hint}"
            )
    return target.long(), valid


def _check_one_hot(target: Tensor, valid: Tensor | None, exclusive: bool) -> None:
    check_binary(target, "one-hot target")
    if exclusive:
        per_voxel = target.sum(1, keepdim=True)
        ok = per_voxel == 1 if valid is None else (per_voxel == 1) | ~valid
        if not ok.all():
            raise ValueError(
                "one-hot target must have exactly one class per voxel (the channels sum to 1); "
                "for overlapping regions use sigmoid=True"
            )


def decode_target(
    target: Tensor,
    input_shape: Sequence[int],
    mask: Tensor | None = None,
    *,
    to_onehot_y: bool = False,
    ignore_index: int | None = None,
    exclusive: bool = True,
    validate: bool = True,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Foreground, validity and labels of a target for an input of ``input_shape``.

    Args:
        target: ``(B, 1, *S)`` label map (integer, or float holding integers) or ``(B, C, *S)``
            one-hot (multi-hot when not ``exclusive``) target, 0/1 or bool.
        input_shape: ``(B, C, *S)`` of the network output the target belongs to.
        mask: optional ``(B, 1, *S)``, bool or 0/1; 0 marks voxels that take part in nothing.
        to_onehot_y: a label map is one-hot encoded to ``C`` channels (needed for ``C > 1``).
            With ``C == 1`` a label map is a 0/1 map.
        ignore_index: label value of a label map whose voxels take part in nothing (joins the
            mask); not allowed with a one-hot target (use ``mask``).
        exclusive: a ``C``-channel target must have exactly one class per valid voxel (softmax);
            ``False`` allows overlapping regions (sigmoid, hinge).
        validate: check values (one host synchronisation): label range, integer labels, 0/1
            targets and masks, exclusivity. Shapes are always checked.
        device: the input's device: ``target`` and ``mask`` must be on it (``None``: not
            checked).

    Returns:
        ``(fg, valid, labels)``: bool ``(B, C, *S)`` foreground (at ignored voxels as if their
        label were 0), bool ``(B, 1, *S)`` validity or ``None`` when every voxel counts, and the
        ``(B, 1, *S)`` int64 label map (ignored voxels 0) or ``None`` for a one-hot target.

    Example:
        >>> labels = torch.tensor([[[0, 2, 255, 1]]])  # (B, 1, S)
        >>> fg, valid, _ = decode_target(labels, (1, 3, 4), to_onehot_y=True, ignore_index=255)
        >>> fg.int()
        tensor([[[1, 0, 1, 0],
                 [0, 0, 0, 1],
                 [0, 1, 0, 0]]], dtype=torch.int32)
        >>> valid
        tensor([[[ True,  True, False,  True]]])

    Raises:
        TypeError: ``target`` or ``mask`` is not a tensor.
        ValueError: shapes that do not fit ``input_shape``, or an ``input_shape`` with a zero
            size (no volume, channel or voxel); an ``ignore_index`` that is not an integer;
            ``target`` or ``mask`` not on ``device``; a
            label map for ``C > 1`` channels without ``to_onehot_y``; ``to_onehot_y`` or
            ``ignore_index`` with a one-hot target;
            with ``validate``: labels outside ``[0, max(C, 2))`` that are not ``ignore_index``,
            fractional labels, non-0/1 targets or masks, non-exclusive one-hot targets.
    """
    ignore_index = check_ignore_index(ignore_index)
    input_shape = tuple(int(n) for n in input_shape)
    num_batch, num_channels = input_shape[:2]
    _check_target_shape(target, input_shape)
    _check_device("target", target, device)
    valid = None
    if mask is not None:
        if isinstance(mask, Tensor):
            _check_device("mask", mask, device)
        valid = _mask_to_valid(mask, (num_batch, 1, *input_shape[2:]), validate)

    if target.shape[1] == 1:  # a label map (or the 0/1 map of a single channel)
        if num_channels > 1 and not to_onehot_y:
            raise ValueError(
                f"target is a label map with 1 channel but input has {num_channels} channels: "
                "pass to_onehot_y=True, or give a one-hot target"
            )
        labels, label_valid = _label_map(target, max(num_channels, 2), ignore_index, validate)
        if label_valid is not None:
            valid = label_valid if valid is None else valid & label_valid
        if num_channels == 1:
            return labels.bool(), valid, labels
        fg = torch.zeros(input_shape, dtype=torch.bool, device=target.device)
        return fg.scatter_(1, labels, True), valid, labels

    if to_onehot_y:
        raise ValueError(
            f"to_onehot_y=True expects a label map with 1 channel, got a target with "
            f"{target.shape[1]} channels; pass to_onehot_y=False for one-hot targets"
        )
    if ignore_index is not None:
        raise ValueError(
            "ignore_index applies to label-map targets; for a one-hot target mark the ignored "
            "voxels with the mask argument instead"
        )
    if validate:
        _check_one_hot(target, valid, exclusive)
    return target.bool(), valid, None
