"""Lovász + cross-entropy, and MONAI's Dice + cross-entropy with an ignore mask."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from monai.utils import LossReduction
from torch import Tensor, nn

from lovasz_monai import functional
from lovasz_monai.functional import DEFAULT_BINS, DEFAULT_CHUNK_ELEMENTS, Method
from lovasz_monai.losses.base import as_loss_tensors, autocast_off, check_logits
from lovasz_monai.losses.lovasz import LovaszSoftmaxLoss

__all__ = ["LovaszCELoss", "MaskedDiceCELoss"]


def _masked_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    valid: Tensor | None,
    *,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = LossReduction.MEAN.value,
) -> Tensor:
    """Softmax cross-entropy of ``(B, C, *S)`` logits and ``(B, *S)`` int64 labels over the valid
    voxels: summed, or averaged with the class weights of the voxels' labels as
    ``F.cross_entropy(weight=...)`` averages (0 when no voxel is valid)."""
    per_voxel = F.cross_entropy(
        logits, labels, weight=weight, reduction="none", label_smoothing=label_smoothing
    )
    voxel_weight = torch.ones_like(per_voxel) if weight is None else weight[labels]
    if valid is not None:
        voxel_weight = voxel_weight * valid[:, 0]
        per_voxel = per_voxel * valid[:, 0]
    total = per_voxel.sum()
    if reduction == LossReduction.SUM.value:
        return total
    denominator = voxel_weight.sum()
    return torch.where(denominator > 0, total / denominator.clamp_min(1e-12), total * 0)


class LovaszCELoss(LovaszSoftmaxLoss):
    """Weighted sum of the Lovász-Softmax loss and cross-entropy, like MONAI's ``DiceCELoss``.

    ``lambda_lovasz * LovaszSoftmaxLoss + lambda_ce * CE``, where CE is the softmax cross-entropy
    on the raw logits (binary cross-entropy with logits per channel when ``sigmoid=True``),
    averaged over the valid voxels only: the ignore label and the mask apply to both terms.

    Args:
        include_background, to_onehot_y, sigmoid, softmax, other_act, batch, weight, ignore_index,
            classes, validate, method, bins, chunk_elements, distributed, process_group: as in
            :class:`LovaszSoftmaxLoss` (they configure the Lovász term; ``weight`` weighs its
            class mean; with ``distributed`` the cross-entropy stays the mean over this
            process's valid voxels, which DDP averages as usual).
        reduction: ``"mean"`` or ``"sum"`` (CE summed over valid voxels, Lovász over volumes).
        lambda_lovasz: weight of the Lovász term, >= 0.
        lambda_ce: weight of the cross-entropy term, >= 0.
        ce_weight: optional per-class weights of the cross-entropy, one per input channel (for
            ``sigmoid=True``: the positive-class weight of each channel).
        label_smoothing: label smoothing of the softmax cross-entropy, in [0, 1).

    Shapes:
        As :class:`LovaszSoftmaxLoss`; ``input`` must be logits (cross-entropy takes logits).

    Example:
        >>> import torch
        >>> loss = LovaszCELoss(to_onehot_y=True, ignore_index=255)
        >>> logits = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (1, 1, 8, 8, 8))
        >>> labels[..., :2] = 255
        >>> loss(logits, labels).backward()

    Raises:
        ValueError: as :class:`LovaszSoftmaxLoss`, for negative lambdas, ``reduction="none"``,
            ``softmax=False`` with no other activation (the input would not be logits), or a
            NaN, inf, negative or all-zero ``ce_weight``.
        TypeError: as :class:`LovaszSoftmaxLoss`.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool | None = None,
        other_act: Callable | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
        *,
        batch: bool = False,
        weight: Sequence[float] | float | Tensor | None = None,
        ignore_index: int | None = None,
        classes: str | Sequence[int] = "present",
        lambda_lovasz: float = 1.0,
        lambda_ce: float = 1.0,
        ce_weight: Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
        validate: bool = True,
        method: Method = "sort",
        bins: int = DEFAULT_BINS,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        distributed: bool = False,
        process_group: object | None = None,
    ) -> None:
        if LossReduction(reduction) == LossReduction.NONE:
            raise ValueError('LovaszCELoss supports reduction "mean" or "sum", got "none"')
        if softmax is False and not sigmoid and other_act is None:
            raise ValueError(
                "LovaszCELoss takes logits (cross-entropy needs them): leave softmax=None/True, "
                "or pass sigmoid=True for multi-label targets"
            )
        if lambda_lovasz < 0 or lambda_ce < 0:
            raise ValueError(
                f"lambda_lovasz and lambda_ce must be >= 0, got {lambda_lovasz} and {lambda_ce}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        super().__init__(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            reduction=reduction,
            batch=batch,
            weight=weight,
            ignore_index=ignore_index,
            classes=classes,
            validate=validate,
            method=method,
            bins=bins,
            chunk_elements=chunk_elements,
            distributed=distributed,
            process_group=process_group,
        )
        ce = None
        if ce_weight is not None:
            ce = functional.check_class_weight(ce_weight, "ce_weight", dtype=torch.float32)
            if ce.ndim != 1:
                raise ValueError(f"ce_weight must be a 1-D sequence, got {ce_weight}")
        self.register_buffer("ce_weight", ce)
        self.lambda_lovasz = float(lambda_lovasz)
        self.lambda_ce = float(lambda_ce)
        self.label_smoothing = float(label_smoothing)

    def _prepare(
        self, input: Tensor, target: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """As the Lovász-Softmax's, and ``ce_weight`` checked against the input's channels."""
        prepared = super()._prepare(input, target, mask)
        ce_weight = self.ce_weight
        if ce_weight is not None and ce_weight.numel() != input.shape[1]:
            raise ValueError(
                f"ce_weight must have one value per input channel ({input.shape[1]}), "
                f"got {ce_weight.numel()}"
            )
        if ce_weight is not None and self.validate:  # the buffer may have been replaced
            functional.check_class_weight(ce_weight, "ce_weight", dtype=torch.float32)
        return prepared

    def _cross_entropy(
        self, logits: Tensor, fg: Tensor, valid: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        num_channels = logits.shape[1]
        ce_weight = self.ce_weight
        if not self.sigmoid:
            labels = fg.to(torch.uint8).argmax(dim=1) if labels is None else labels[:, 0]
            return _masked_cross_entropy(
                logits,
                labels,
                valid,
                weight=None if ce_weight is None else ce_weight.to(logits),
                label_smoothing=self.label_smoothing,
                reduction=self.reduction,
            )
        pos_weight = None
        if ce_weight is not None:
            pos_weight = ce_weight.to(logits).view(-1, *([1] * (logits.ndim - 2)))
        per_voxel = F.binary_cross_entropy_with_logits(
            logits, fg.to(logits.dtype), pos_weight=pos_weight, reduction="none"
        )
        if valid is not None:
            per_voxel = per_voxel * valid
        total = per_voxel.sum()
        if self.reduction == LossReduction.SUM.value:
            return total
        if valid is None:
            return total / per_voxel.numel()
        denominator = valid.sum() * num_channels
        return torch.where(denominator > 0, total / denominator.clamp_min(1), total * 0)

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` logits.
            target: ``(B, 1, *spatial)`` label map or ``(B, C, *spatial)`` one-hot target.
            mask: optional ``(B, 1, *spatial)``, bool or 0/1: 1 where the voxel counts.

        Returns:
            ``lambda_lovasz * lovasz + lambda_ce * ce`` (a scalar).

        Raises:
            ValueError: on shape mismatches and, with ``validate``, on bad values.
        """
        with autocast_off(input):
            logits, fg, valid, labels = self._checked_inputs(input, target, mask, self._prepare)
            lovasz = self._lovasz_softmax(logits, fg, valid)
            ce = self._cross_entropy(logits, fg, valid, labels)
            return self.lambda_lovasz * lovasz + self.lambda_ce * ce


class MaskedDiceCELoss(nn.Module):
    """MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` with an ignore mask.

    ``lambda_dice * Dice + lambda_ce * CE`` where Dice is MONAI's ``MaskedDiceLoss(softmax=True)``
    on the one-hot target (the mask zeroes probabilities and target of ignored voxels, so they are
    in no intersection or sum) and CE is the softmax cross-entropy averaged over the valid
    voxels. With no mask, or an all-ones mask, the value equals ``DiceCELoss(to_onehot_y=True,
    softmax=True, lambda_dice=..., lambda_ce=...)`` (MONAI's defaults: background included,
    ``smooth_nr = smooth_dr = 1e-5``, mean over volumes and classes). Inputs are checked as the
    Lovász losses check them, and the loss is computed in (at least) float32.

    Args:
        lambda_dice: weight of the Dice term, >= 0.
        lambda_ce: weight of the cross-entropy term, >= 0.
        ignore_index: label value of a label-map target whose voxels take part in nothing (they
            join the mask).
        validate: check values (one host synchronisation): NaN/inf logits, labels outside
            ``[0, C)`` that are not ``ignore_index``, fractional labels, non-0/1 masks and
            targets, one-hot targets without exactly one class per valid voxel.

    Shapes:
        input: ``(B, C, *spatial)`` logits, ``C >= 2``.
        target: ``(B, 1, *spatial)`` label map with values in ``[0, C)``, or ``(B, C, *spatial)``
        one-hot.
        mask: optional ``(B, 1, *spatial)``, bool or 0/1: 1 where the voxel counts.

    Example:
        >>> logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
        >>> mask = torch.ones(2, 1, 8, 8, 8)
        >>> mask[..., :2] = 0
        >>> MaskedDiceCELoss()(logits, labels, mask=mask).backward()

    Raises:
        ValueError: negative lambdas; in ``forward``, a single input channel, shapes that do not
            fit, tensors without voxels, and (``validate``) the bad values listed above.
        TypeError: ``input``, ``target`` or ``mask`` is not a tensor, or ``input`` is not
            floating point.
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        *,
        ignore_index: int | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(
                f"lambda_dice and lambda_ce must be >= 0, got {lambda_dice} and {lambda_ce}"
            )
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.ignore_index = ignore_index
        self.validate = validate
        self.dice = MaskedDiceLoss(softmax=True)

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` logits.
            target: ``(B, 1, *spatial)`` label map or ``(B, C, *spatial)`` one-hot.
            mask: optional ``(B, 1, *spatial)``, bool or 0/1: 1 where the voxel counts.

        Returns:
            The scalar loss.

        Raises:
            ValueError, TypeError: see the class docstring.
        """
        input, target, mask = as_loss_tensors(input, target, mask)
        check_logits(input, self.validate)
        if input.shape[1] < 2:
            raise ValueError(f"input must have C >= 2 softmax channels, got {input.shape[1]}")
        with autocast_off(input):
            fg, valid, labels = functional.decode_target(
                target,
                input.shape,
                mask,
                to_onehot_y=target.ndim >= 2 and target.shape[1] == 1,
                ignore_index=self.ignore_index,
                exclusive=True,
                validate=self.validate,
                device=input.device,
            )
            logits = input.to(torch.promote_types(input.dtype, torch.float32))
            if labels is None:
                labels = fg.to(torch.uint8).argmax(dim=1, keepdim=True)
            dice_mask = torch.ones_like(logits[:, :1]) if valid is None else valid.to(logits)
            dice = self.dice(logits, fg.to(logits.dtype), mask=dice_mask)
            ce = _masked_cross_entropy(logits, labels[:, 0], valid)
            return self.lambda_dice * dice + self.lambda_ce * ce
