"""Reference-style functional losses: ``lovasz_softmax`` and ``lovasz_hinge``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor

from lovasz_monai.functional.arguments import DEFAULT_BINS, Method, check_lovasz_arguments
from lovasz_monai.functional.class_losses import (
    average_class_losses,
    lovasz_hinge_class_losses,
    lovasz_probability_class_losses,
)

__all__ = ["lovasz_hinge", "lovasz_softmax"]


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
        >>> import torch
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
        >>> import torch
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
