"""Cross-entropy over the valid voxels only: the one masked cross-entropy of the combined
losses (softmax over classes, or binary per channel)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch import Tensor

from lovasz_monai import functional

__all__ = ["masked_cross_entropy"]


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
        target: softmax: ``(B, *spatial)`` int64 class indices in ``[0, C)`` (any value at
            ignored voxels that indexes ``weight``, e.g. 0); sigmoid: ``(B, C, *spatial)`` 0/1
            (bool or float).
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
            ``sigmoid``, or a ``weight`` count other than ``C``.
    """
    if reduction not in (LossReduction.MEAN.value, LossReduction.SUM.value):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    if sigmoid and label_smoothing:
        raise ValueError("label_smoothing applies to the softmax cross-entropy, not sigmoid=True")
    if weight is not None and weight.shape != (logits.shape[1],):
        raise ValueError(
            f"weight must have one value per input channel ({logits.shape[1]}), "
            f"got shape {tuple(weight.shape)}"
        )
    if sigmoid:
        pos_weight = None if weight is None else weight.view(-1, *([1] * (logits.ndim - 2)))
        per_voxel = F.binary_cross_entropy_with_logits(
            logits, target.to(logits.dtype), pos_weight=pos_weight, reduction="none"
        )
        if valid is not None:
            per_voxel = per_voxel * valid
            denominator = valid.sum() * logits.shape[1]
        else:
            denominator = torch.tensor(per_voxel.numel(), device=logits.device)
    else:
        per_voxel = F.cross_entropy(
            logits, target, weight=weight, reduction="none", label_smoothing=label_smoothing
        )
        voxel_weight = torch.ones_like(per_voxel) if weight is None else weight[target]
        if valid is not None:
            voxel_weight = voxel_weight * valid[:, 0]
            per_voxel = per_voxel * valid[:, 0]
        denominator = voxel_weight.sum()
    total = per_voxel.sum()
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
