"""Reference-style functional losses: ``lovasz_softmax`` and ``lovasz_hinge``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

from torch import Tensor

from lovasz_monai.functional.arguments import (
    DEFAULT_BINS,
    DEFAULT_CHUNK_ELEMENTS,
    LovaszSettings,
    Method,
    check_finite,
    check_probabilities,
    collective_check,
)
from lovasz_monai.functional.class_losses import (
    average_class_losses,
    lovasz_hinge_class_losses,
    lovasz_probability_class_losses,
    select_classes,
)
from lovasz_monai.functional.targets import decode_target

__all__ = ["lovasz_hinge", "lovasz_softmax"]


_PER_VOLUME_DEPRECATION = (
    "per_volume is deprecated: use batch (batch=not per_volume), which means what it means in "
    "the loss classes; per_volume will be removed"
)


def _checked_inputs(
    name: str,
    source: Tensor,
    labels: Tensor,
    valid: Tensor | None,
    ignore_index: int | None,
    classes: str | Sequence[int],
    validate: bool,
    probabilities: bool,
) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """``(source, fg, valid, present_only)``: the labels (a ``(B, 1, *S)`` label map for ``C > 1``
    channels, or one-hot/multi-hot) decoded by :func:`decode_target` and both restricted to the
    channels of ``classes``. ``name`` is the argument ``source`` came as (for the messages);
    with ``probabilities`` it must hold values in [0, 1], else any finite values (both checked
    only with ``validate``)."""
    if not isinstance(source, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(source).__name__}")
    if not source.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {source.dtype}")
    if source.ndim < 3:
        raise ValueError(
            f"{name} must be (B, C, *spatial) with at least one spatial dimension, got shape "
            f"{tuple(source.shape)}"
        )
    if validate and source.numel():
        if probabilities:
            check_probabilities(source, name, "; apply a softmax (or a sigmoid) to logits first")
        else:
            check_finite(source, name)
    label_map = isinstance(labels, Tensor) and labels.ndim >= 2 and labels.shape[1] == 1
    fg, valid, _ = decode_target(
        labels,
        source.shape,
        valid,
        to_onehot_y=label_map and source.shape[1] > 1,
        ignore_index=ignore_index,
        exclusive=False,
        validate=validate,
        device=source.device,
    )
    selection = select_classes(source.shape[1], classes)
    if len(selection.channels) != source.shape[1]:
        source, fg = source[:, selection.channels], fg[:, selection.channels]
    return source, fg, valid, selection.present_only


def _class_mean(
    class_losses: Callable[..., tuple[Tensor, Tensor]],
    name: str,
    source: Tensor,
    labels: Tensor,
    valid: Tensor | None,
    ignore_index: int | None,
    classes: str | Sequence[int],
    settings: LovaszSettings,
    validate: bool,
    probabilities: bool,
) -> Tensor:
    """The inputs checked by :func:`_checked_inputs` (distributed with ``validate``, as a
    :func:`collective_check`: a bad input on one process raises on every process instead of
    leaving them waiting), then ``class_losses`` averaged over the classes and the volumes."""

    def checks() -> tuple[Tensor, Tensor, Tensor | None, bool]:
        return _checked_inputs(
            name, source, labels, valid, ignore_index, classes, validate, probabilities
        )

    if validate and settings.world_size > 1:
        checked = collective_check(
            source, settings.bins, checks, process_group=settings.process_group
        )
    else:
        checked = checks()
    source, fg, valid, present_only = checked
    losses, counts = class_losses(
        source,
        fg,
        valid,
        **settings.keywords(),
        validate=False,  # checked above, on every process
        skip_absent=present_only and (validate or source.device.type == "cpu"),
    )
    return average_class_losses(losses, counts, present_only).mean()


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
    ignore_index: int | None = None,
    distributed: bool = False,
    process_group: object | None = None,
    validate: bool = True,
    per_volume: bool | None = None,
) -> Tensor:
    """Lovász-Softmax loss from probabilities and a label map or one-hot (multi-hot) labels.

    The same arguments give the same value as :class:`~lovasz_monai.losses.LovaszSoftmaxLoss`
    with ``softmax=False`` on these probabilities and labels.

    Args:
        probs: ``(B, C, *spatial)`` class probabilities (softmax, or per-channel sigmoid).
        labels: ``(B, 1, *spatial)`` label map (one-hot encoded to ``C`` classes), or
            ``(B, C, *spatial)`` one-hot or multi-hot targets (bool or 0/1).
        valid: optional ``(B, 1, *spatial)`` bool, ``False`` for ignored voxels.
        ignore_index: label value of a label map whose voxels take part in nothing (the
            reference's ``ignore``); it joins ``valid``.
        classes: ``"present"`` (classes with foreground in the row), ``"all"``, or a list.
        batch: ``False`` (default, as the loss classes): mean over volumes of the per-volume
            loss (the reference's ``per_image=True``); ``True``: the batch is one set of voxels.
        method, bins: see :func:`lovasz_weights`.
        distributed, process_group: the loss of the union of all processes' batches (see
            :func:`lovasz_class_losses`; needs ``batch=True`` and ``method="histogram"``).
        validate: check label values and that ``probs`` are probabilities in [0, 1] (a few host
            synchronisations); distributed, the outcome is shared by every process (see
            :func:`collective_check`).
        per_volume: deprecated spelling of ``not batch`` (warns).

    Returns:
        Scalar loss.

    Example:
        >>> import torch
        >>> probs = torch.tensor([[[0.8, 0.3], [0.2, 0.7]]])
        >>> labels = torch.tensor([[[1, 0], [0, 1]]])
        >>> lovasz_softmax(probs, labels)
        tensor(0.2750)
        >>> lovasz_softmax(probs, torch.tensor([[[0, 1]]]))  # the same labels as a label map
        tensor(0.2750)

    Raises:
        TypeError: ``probs`` or ``labels`` is not a tensor, or ``probs`` is not floating point.
        ValueError: on shape mismatches, tensors without voxels, an invalid ``classes``,
            (``validate``) ``probs`` with NaN, inf or values outside [0, 1], label-map values
            outside ``[0, C)`` that are not ``ignore_index``, ``distributed``
            without ``batch=True`` and ``method="histogram"``, or (distributed, ``validate``)
            bad input on any process or processes that disagree on channels, bins or dtype.
    """
    settings = LovaszSettings(
        _batch_from_per_volume(batch, per_volume),
        method,
        bins,
        DEFAULT_CHUNK_ELEMENTS,
        distributed,
        process_group,
    )
    return _class_mean(
        lovasz_probability_class_losses,
        "probs",
        probs,
        labels,
        valid,
        ignore_index,
        classes,
        settings,
        validate,
        probabilities=True,
    )


def lovasz_hinge(
    logits: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    batch: bool = False,
    method: Method = "sort",
    bins: int = DEFAULT_BINS,
    *,
    ignore_index: int | None = None,
    distributed: bool = False,
    process_group: object | None = None,
    validate: bool = True,
    per_volume: bool | None = None,
) -> Tensor:
    """Lovász hinge loss of binary (or per-channel multi-label) logits.

    The same arguments give the same value as :class:`~lovasz_monai.losses.LovaszHingeLoss`.

    The errors are the hinge margins ``relu(1 - logit * (2 * label - 1))``; each channel is its
    own binary problem and channels are averaged.

    Args:
        logits: ``(B, C, *spatial)`` raw scores.
        labels: ``(B, C, *spatial)`` binary targets (bool or 0/1), or a ``(B, 1, *spatial)`` 0/1
            map (one channel) or label map (one-hot encoded to ``C`` channels).
        valid: optional ``(B, 1, *spatial)`` bool, ``False`` for ignored voxels.
        ignore_index: label value of a label map whose voxels take part in nothing; it joins
            ``valid``.
        batch: ``False`` (default, as the loss classes and the reference): mean over volumes of
            the per-volume loss; ``True`` treats the batch as one set of voxels.
        method, bins: see :func:`lovasz_weights`.
        distributed, process_group: the loss of the union of all processes' batches (see
            :func:`lovasz_class_losses`; needs ``batch=True`` and ``method="histogram"``).
        validate: check label values and that the logits are finite (a few host
            synchronisations); distributed, the outcome is shared by every process (see
            :func:`collective_check`).
        per_volume: deprecated spelling of ``not batch`` (warns).

    Returns:
        Scalar loss.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[2.0, -1.0, 0.5, -0.5]]])
        >>> lovasz_hinge(logits, torch.tensor([[[1, 0, 0, 1]]]))
        tensor(1.)

    Raises:
        TypeError: ``logits`` or ``labels`` is not a tensor, or ``logits`` is not floating point.
        ValueError: on shape mismatches, tensors without voxels, (``validate``) NaN or inf
            logits or labels other than 0/1 (or label-map values outside ``[0, C)``),
            ``distributed`` without
            ``batch=True`` and ``method="histogram"``, or (distributed, ``validate``) bad input
            on any process or processes that disagree on channels, bins or dtype.
    """
    settings = LovaszSettings(
        _batch_from_per_volume(batch, per_volume),
        method,
        bins,
        DEFAULT_CHUNK_ELEMENTS,
        distributed,
        process_group,
    )
    return _class_mean(
        lovasz_hinge_class_losses,
        "logits",
        logits,
        labels,
        valid,
        ignore_index,
        "all",
        settings,
        validate,
        probabilities=False,
    )
