"""Cross-entropy over the valid voxels only: the one masked cross-entropy of the combined
losses (softmax over classes, or binary per channel)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch import Tensor

from lovasz_monai import functional

__all__ = ["masked_cross_entropy", "masked_nll_loss"]


def masked_cross_entropy(
    logits: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    *,
    sigmoid: bool = False,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = LossReduction.MEAN.value,
) -> Tensor:
    """Cross-entropy of logits over the voxels where ``valid`` is true.

    Softmax (default): ``F.cross_entropy`` of each voxel, summed, or averaged with the weights
    of the voxels' classes as ``F.cross_entropy(weight=..., ignore_index=...)`` averages (the
    ignored voxels are those with ``valid`` false). ``sigmoid``: binary cross-entropy with
    logits of each channel, ``weight`` as its ``pos_weight``, summed or averaged over the valid
    voxels and the channels. No valid voxel gives 0 (with a zero gradient), not NaN.

    Args:
        logits: ``(B, C, *spatial)`` float logits.
        target: softmax: ``(B, *spatial)`` int64 class indices in ``[0, C)``, ignored voxels
            included (any class there, e.g. 0: it counts nowhere); sigmoid:
            ``(B, C, *spatial)`` 0/1 (bool or float).
        valid: optional ``(B, 1, *spatial)`` bool or 0/1; ``None``: every voxel counts.
        sigmoid: binary cross-entropy per channel instead of a softmax over channels.
        weight: optional ``(C,)`` class weights (softmax) or positive-class weights (sigmoid).
        label_smoothing: label smoothing of the softmax cross-entropy, in ``[0, 1)``.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        The scalar cross-entropy.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]]])  # (1, 2, 3)
        >>> labels = torch.tensor([[0, 1, 1]])
        >>> valid = torch.tensor([[[True, True, False]]])
        >>> bool(torch.isclose(
        ...     masked_cross_entropy(logits, labels, valid),
        ...     F.cross_entropy(logits, torch.tensor([[0, 1, -100]])),
        ... ))
        True

    Raises:
        ValueError: an unknown ``reduction``, ``label_smoothing`` outside ``[0, 1)`` or with
            ``sigmoid``, a ``weight`` count other than ``C``, or ``valid`` not
            ``(B, 1, *spatial)``.
    """
    _check_arguments(logits, valid, weight, label_smoothing, reduction)
    if sigmoid and label_smoothing:
        raise ValueError("label_smoothing applies to the softmax cross-entropy, not sigmoid=True")
    if not sigmoid:
        log_probs = torch.log_softmax(logits, dim=1)
        return _masked_nll(log_probs, target, valid, weight, label_smoothing, reduction)
    pos_weight = None if weight is None else _per_channel(weight, logits.ndim)
    per_voxel = F.binary_cross_entropy_with_logits(
        logits, target.to(logits.dtype), pos_weight=pos_weight, reduction="none"
    )
    if valid is not None:
        per_voxel = per_voxel * valid
        denominator = valid.sum() * logits.shape[1]
    else:
        denominator = torch.tensor(per_voxel.numel(), device=logits.device)
    return _reduce(per_voxel.sum(), denominator, reduction)


def masked_nll_loss(
    log_probs: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    *,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = LossReduction.MEAN.value,
) -> Tensor:
    """The softmax cross-entropy of :func:`masked_cross_entropy` from log-probabilities.

    For a caller that needs the class probabilities too (``log_probs.exp()``): one log-softmax
    then serves both.

    Args:
        log_probs: ``(B, C, *spatial)`` log-probabilities, ``torch.log_softmax(logits, dim=1)``.
        target, valid, weight, label_smoothing, reduction: as in :func:`masked_cross_entropy`
            (softmax).

    Returns:
        The scalar cross-entropy, ``masked_cross_entropy(logits, ...)`` up to rounding.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]]])  # (1, 2, 3)
        >>> labels, valid = torch.tensor([[0, 1, 1]]), torch.tensor([[[True, True, False]]])
        >>> bool(torch.isclose(
        ...     masked_nll_loss(torch.log_softmax(logits, dim=1), labels, valid),
        ...     masked_cross_entropy(logits, labels, valid),
        ... ))
        True

    Raises:
        ValueError: as :func:`masked_cross_entropy`.
    """
    _check_arguments(log_probs, valid, weight, label_smoothing, reduction)
    return _masked_nll(log_probs, target, valid, weight, label_smoothing, reduction)


def _masked_nll(
    log_probs: Tensor,
    target: Tensor,
    valid: Tensor | None,
    weight: Tensor | None,
    label_smoothing: float,
    reduction: str,
) -> Tensor:
    """:func:`masked_nll_loss` of checked arguments."""
    weight = None if weight is None else weight.to(log_probs)
    per_voxel = F.nll_loss(log_probs, target, weight=weight, reduction="none")
    if label_smoothing:  # as PyTorch smooths: a share of the loss spread over every class
        class_weight = 1.0 if weight is None else _per_channel(weight, log_probs.ndim)
        spread = (log_probs * class_weight).sum(dim=1).neg_() / log_probs.shape[1]
        per_voxel = (1.0 - label_smoothing) * per_voxel + label_smoothing * spread
    voxel_weight = torch.ones_like(per_voxel) if weight is None else weight[target]
    if valid is not None:
        voxel_weight = voxel_weight * valid[:, 0]
        per_voxel = per_voxel * valid[:, 0]
    return _reduce(per_voxel.sum(), voxel_weight.sum(), reduction)


def _per_channel(weight: Tensor, ndim: int) -> Tensor:
    """A ``(C,)`` weight shaped to broadcast over ``(B, C, *spatial)`` of ``ndim`` dimensions."""
    return weight.view(-1, *([1] * (ndim - 2)))


def _check_arguments(
    input: Tensor,
    valid: Tensor | None,
    weight: Tensor | None,
    label_smoothing: float,
    reduction: str,
) -> None:
    if reduction not in (LossReduction.MEAN.value, LossReduction.SUM.value):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    num_channels = input.shape[1]
    if weight is not None and weight.shape != (num_channels,):
        raise ValueError(
            f"weight must have one value per input channel ({num_channels}), "
            f"got shape {tuple(weight.shape)}"
        )
    expected = (input.shape[0], 1, *input.shape[2:])
    if valid is not None and tuple(valid.shape) != expected:
        raise ValueError(
            f"valid must have shape {expected} (B, 1, *spatial), got {tuple(valid.shape)}"
        )


def _reduce(total: Tensor, denominator: Tensor, reduction: str) -> Tensor:
    """The sum, or the mean over a denominator that may be 0 (then 0, with a zero gradient)."""
    if reduction == LossReduction.SUM.value:
        return total
    return torch.where(denominator > 0, total / denominator.clamp_min(1e-12), total * 0)


def checked_ce_weight(ce_weight: Sequence[float] | Tensor | None) -> Tensor | None:
    """``ce_weight`` as a checked float32 1-D tensor (``None`` stays ``None``).

    Raises:
        ValueError: as :func:`~lovasz_monai.functional.check_class_weight`, or not 1-D.
    """
    if ce_weight is None:
        return None
    weight = functional.check_class_weight(ce_weight, "ce_weight", dtype=torch.float32)
    if weight.ndim != 1:
        raise ValueError(f"ce_weight must be a 1-D sequence, got {ce_weight}")
    return weight


def check_ce_weight_fits(ce_weight: Tensor | None, num_channels: int, validate: bool) -> None:
    """One cross-entropy weight per input channel; with ``validate`` the values again (the
    buffer may have been replaced since construction, e.g. by ``load_state_dict``).

    Raises:
        ValueError: a count other than ``num_channels``, or (``validate``) bad values.
    """
    if ce_weight is None:
        return
    if ce_weight.numel() != num_channels:
        raise ValueError(
            f"ce_weight must have one value per input channel ({num_channels}), "
            f"got {ce_weight.numel()}"
        )
    if validate:
        functional.check_class_weight(ce_weight, "ce_weight", dtype=torch.float32)
