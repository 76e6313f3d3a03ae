"""The training objective: a loss, called with the ignore mask where it takes one, and an
optional cross-entropy -> Lovász schedule (no Lightning)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lovasz_monai.losses.base import accepts_mask

__all__ = ["ScheduledLoss", "call_loss"]


def call_loss(
    loss: nn.Module, logits: Tensor, label: Tensor, mask: Tensor, sigmoid_outputs: bool = False
) -> Tensor:
    """``loss`` of float32 ``logits`` with the ignored voxels (``mask == 0``) left out where the
    loss can be told.

    A loss whose ``forward`` takes ``mask`` gets it. ``torch.nn.CrossEntropyLoss`` (softmax
    outputs) gets the label map without its channel axis, with the ignored voxels set to its
    ``ignore_index``. Any other loss (e.g. ``monai.losses.DiceCELoss``) gets
    ``(logits, label)``: it sees the ignored voxels as they are labelled.

    Args:
        loss: the loss module.
        logits: ``(B, C, *S)`` logits (cast to float32).
        label: ``(B, 1, *S)`` label map or ``(B, R, *S)`` regions.
        mask: ``(B, 1, *S)``, 1 where the voxel counts.
        sigmoid_outputs: the outputs are sigmoid logits (no label map for cross-entropy).

    Returns:
        The loss value.

    Raises:
        ValueError: ``torch.nn.CrossEntropyLoss`` with ``sigmoid_outputs``
            (see ``check_loss_fits_outputs``).

    Example:
        >>> import torch
        >>> logits, label = torch.zeros(1, 2, 4), torch.tensor([[[0, 1, 1, 1]]])
        >>> mask = torch.tensor([[[1, 1, 0, 0]]])
        >>> call_loss(torch.nn.CrossEntropyLoss(), logits, label, mask)  # 2 voxels count
        tensor(0.6931)
    """
    check_loss_fits_outputs(loss, sigmoid_outputs)
    logits = logits.float()
    if accepts_mask(loss):
        return loss(logits, label, mask=mask)
    if isinstance(loss, nn.CrossEntropyLoss):
        target = label[:, 0].long().masked_fill(mask[:, 0] == 0, loss.ignore_index)
        return loss(logits, target)
    return loss(logits, label)


def check_loss_fits_outputs(loss: nn.Module, sigmoid_outputs: bool) -> None:
    """Refuse ``torch.nn.CrossEntropyLoss`` (a softmax over the channels) for sigmoid outputs:
    on one foreground channel its value is always 0 (nothing is learnt), and on several regions
    it treats overlapping regions as exclusive classes.

    Raises:
        ValueError: ``loss`` is a ``torch.nn.CrossEntropyLoss`` and ``sigmoid_outputs`` is true.
    """
    if sigmoid_outputs and isinstance(loss, nn.CrossEntropyLoss):
        raise ValueError(
            "torch.nn.CrossEntropyLoss is a softmax over the channels and does not fit sigmoid "
            "outputs (one foreground channel or overlapping regions): use "
            "torch.nn.BCEWithLogitsLoss, or LovaszCELoss(sigmoid=True, lambda_lovasz=0.0) for "
            "a cross-entropy that leaves the ignored voxels out"
        )


class ScheduledLoss(nn.Module):
    """``w * loss + (1 - w) * warmup_loss`` with a weight ``w`` that depends on the epoch: the
    paper's recipe of training with cross-entropy, then fine-tuning with the Lovász loss.

    ``w = weight(e)`` is 0 for ``e < warmup_epochs``, then ``(e - warmup_epochs + 1) /
    (ramp_epochs + 1)`` capped at 1: ``ramp_epochs`` epochs of a linear mix, then ``loss`` alone
    (``ramp_epochs=0``: a hard switch). Without a ``warmup_loss``, ``w`` is always 1. Each loss
    is called by :func:`call_loss`; a term whose weight is 0 is not computed.

    Args:
        loss: the main (Lovász) loss.
        warmup_loss: the loss of the warm-up phase (e.g. ``torch.nn.CrossEntropyLoss``), or
            ``None``: no schedule.
        warmup_epochs: epochs trained with ``warmup_loss`` only, >= 0.
        ramp_epochs: epochs of linear mixing after the warm-up, >= 0.
        sigmoid_outputs: the logits are sigmoid outputs (see :func:`call_loss`).

    Example:
        >>> schedule = ScheduledLoss(nn.Identity(), nn.CrossEntropyLoss(), 2, 3)
        >>> [round(schedule.weight(e), 2) for e in range(7)]
        [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]

    Raises:
        ValueError: negative epochs, epochs > 0 without a ``warmup_loss``, or a
            ``torch.nn.CrossEntropyLoss`` with ``sigmoid_outputs``.
    """

    def __init__(
        self,
        loss: nn.Module,
        warmup_loss: nn.Module | None = None,
        warmup_epochs: int = 0,
        ramp_epochs: int = 0,
        sigmoid_outputs: bool = False,
    ) -> None:
        super().__init__()
        if warmup_epochs < 0 or ramp_epochs < 0:
            raise ValueError(
                f"warmup_epochs and ramp_epochs must be >= 0, got {warmup_epochs}, {ramp_epochs}"
            )
        if warmup_loss is None and (warmup_epochs > 0 or ramp_epochs > 0):
            raise ValueError(
                "warmup_epochs/ramp_epochs > 0 need a warmup_loss (e.g. torch.nn.CrossEntropyLoss)"
            )
        for term in (loss, warmup_loss):
            check_loss_fits_outputs(term, sigmoid_outputs)
        self.loss = loss
        self.warmup_loss = warmup_loss
        self.warmup_epochs = int(warmup_epochs)
        self.ramp_epochs = int(ramp_epochs)
        self.sigmoid_outputs = bool(sigmoid_outputs)

    def weight(self, epoch: int) -> float:
        """Weight ``w`` of ``loss`` at ``epoch`` (1 without a warm-up loss)."""
        if self.warmup_loss is None:
            return 1.0
        if epoch < self.warmup_epochs:
            return 0.0
        return min(1.0, (epoch - self.warmup_epochs + 1) / (self.ramp_epochs + 1))

    def forward(
        self, logits: Tensor, label: Tensor, mask: Tensor, epoch: int | None = None
    ) -> Tensor:
        """
        Args:
            logits: ``(B, C, *S)`` logits.
            label: ``(B, 1, *S)`` label map or ``(B, R, *S)`` regions.
            mask: ``(B, 1, *S)``, 1 where the voxel counts.
            epoch: the training epoch; ``None``: ``loss`` alone (evaluation).

        Returns:
            The scheduled loss (a float32 scalar).
        """
        weight = 1.0 if epoch is None else self.weight(epoch)
        total = logits.new_zeros((), dtype=torch.float32)
        if weight > 0:
            total = total + weight * call_loss(self.loss, logits, label, mask, self.sigmoid_outputs)
        if weight < 1:
            assert self.warmup_loss is not None
            warm = call_loss(self.warmup_loss, logits, label, mask, self.sigmoid_outputs)
            total = total + (1.0 - weight) * warm
        return total
