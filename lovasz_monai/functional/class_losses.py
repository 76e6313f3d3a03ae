"""Lovász losses of every (volume, class) row of ``(B, C, *spatial)`` tensors, and class means.

Errors are ``|y - p|`` of probabilities, hinge margins of logits, or given errors; one batched
computation for all rows, differentiable in the source of the errors. With ``distributed=True``
the rows of ``batch=True`` span the processes of a ``torch.distributed`` group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lovasz_monai.functional.arguments import (
    DEFAULT_BINS,
    DEFAULT_CHUNK_ELEMENTS,
    LovaszSettings,
    Method,
    _check_nonempty,
    check_class_weight,
    check_lovasz_arguments,
    collective_check,
    distributed_world_size,
)
from lovasz_monai.functional.extension import known_gradient
from lovasz_monai.functional.rows import _sort_key, lovasz_class_rows, sorts_weighted_voxels_only

__all__ = [
    "ClassSelection",
    "average_class_losses",
    "class_weights",
    "lovasz_class_losses",
    "lovasz_hinge_class_losses",
    "lovasz_probability_class_losses",
    "select_classes",
]


def _as_class_rows(x: Tensor, *, batch: bool) -> Tensor:
    """``(B, C, *S)`` -> ``(B * C, 1, P)`` rows per volume, or ``(C, B, P)`` for the batch."""
    x = x.flatten(2)
    return x.transpose(0, 1) if batch else x.reshape(-1, 1, x.shape[2])


def _check_class_inputs(source: Tensor, labels: Tensor, valid: Tensor | None) -> Tensor | None:
    for name, value in (("input", source), ("labels", labels), ("valid", valid)):
        if not isinstance(value, Tensor) and not (name == "valid" and value is None):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if source.ndim < 3 or labels.shape != source.shape:
        raise ValueError(
            "input and labels must both be (B, C, *spatial) with the same shape, got "
            f"{tuple(source.shape)} and {tuple(labels.shape)}"
        )
    _check_nonempty(source.shape, "input")
    if valid is None:
        return None
    expected = (source.shape[0], 1, *source.shape[2:])
    if tuple(valid.shape) != expected:
        raise ValueError(f"valid must have shape {expected}, got {tuple(valid.shape)}")
    return valid.bool()


def _checked_class_inputs(
    source: Tensor, labels: Tensor, valid: Tensor | None, validate: bool, **keywords: object
) -> tuple[Tensor, Tensor | None, LovaszSettings]:
    """``(fg, valid, settings)``: the foreground of ``labels`` restricted to ``valid``, ``valid``
    as bool and the :class:`LovaszSettings` of ``keywords``, all checked; distributed with
    ``validate``, as a :func:`collective_check` (bad input on one process raises on every
    process, as do processes that disagree on the channels, bins or dtype that the loss
    all-reduces)."""

    def checks() -> tuple[Tensor, Tensor | None, LovaszSettings]:
        settings = LovaszSettings(**keywords)  # type: ignore[arg-type]
        checked_valid = _check_class_inputs(source, labels, valid)
        with torch.no_grad():
            fg = labels.bool() if checked_valid is None else labels.bool() & checked_valid
        return fg, checked_valid, settings

    group = keywords.get("process_group")
    if validate and distributed_world_size(bool(keywords.get("distributed")), group) > 1:
        bins = int(keywords.get("bins", DEFAULT_BINS))  # type: ignore[call-overload]
        return collective_check(source, bins, checks, process_group=group)
    return checks()


def _checked_class_losses(
    source: Tensor,
    labels: Tensor,
    valid: Tensor | None,
    key_of: KeyOf,
    wrt_source: bool,
    validate: bool,
    skip_absent: bool,
    settings: dict[str, object],
) -> tuple[Tensor, Tensor]:
    """The public ``lovasz_*class_losses``: checks (:func:`_checked_class_inputs`, with the
    :class:`LovaszSettings` keywords ``settings``), then :func:`_class_losses`."""
    fg, valid, checked = _checked_class_inputs(source, labels, valid, validate, **settings)
    return _class_losses(
        source, fg, valid, key_of, checked, wrt_source=wrt_source, skip_absent=skip_absent
    )


KeyOf = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""``key_of(source, fg, valid)``: the sort keys (errors, ``-1`` at invalid voxels) of detached
source values, masked foreground and validity of the same (broadcastable) shape; it may return
``source`` itself or write into it."""


def _error_key(errors: Tensor, fg: Tensor, valid: Tensor | None) -> Tensor:
    return _sort_key(errors, valid)


def _probability_key(probs: Tensor, fg: Tensor, valid: Tensor | None) -> Tensor:
    key = torch.rsub(probs, 1.0)
    torch.where(fg, key, probs, out=key).abs_()
    return key if valid is None else key.masked_fill_(~valid, -1.0)


def _hinge_key(logits: Tensor, fg: Tensor, valid: Tensor | None) -> Tensor:
    key = torch.where(fg, -logits, logits).add_(1.0).clamp_min_(0.0)
    return key if valid is None else key.masked_fill_(~valid, -1.0)


def _class_losses(
    source: Tensor,
    fg: Tensor,
    valid: Tensor | None,
    key_of: KeyOf,
    settings: LovaszSettings,
    *,
    wrt_source: bool,
    skip_absent: bool,
) -> tuple[Tensor, Tensor]:
    """Per (volume, class) losses, differentiable in ``source``, and foreground counts, of
    inputs checked by :func:`_checked_class_inputs` (``fg`` already masked by ``valid``).

    Distributed (see :func:`lovasz_class_losses`): the losses and counts are those of the union
    of the processes' batches, and the gradient is ``world_size`` times the derivative of those
    losses with respect to this process's ``source``. ``skip_absent`` (not distributed, not
    under ``torch.compile``): see :func:`_present_class_losses`."""
    if skip_absent and settings.world_size == 1 and not torch.compiler.is_compiling():
        return _present_class_losses(source, fg, valid, key_of, settings, wrt_source)
    weights, losses, counts = _every_row(source, fg, valid, key_of, settings, wrt_source)
    shape = (1 if settings.batch else source.shape[0], source.shape[1])
    return known_gradient(source, losses.view(shape), weights), counts.view(shape)


@torch.no_grad()
def _every_row(
    source: Tensor,
    fg: Tensor,
    valid: Tensor | None,
    key_of: KeyOf,
    settings: LovaszSettings,
    wrt_source: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights, losses, counts)`` of every row, without autograd: the weights have the shape
    of ``source``, the losses and counts are flat (``B * C``, or ``C`` with ``settings.batch``)."""
    batch = settings.batch
    detached = source.detach()
    key = key_of(detached, fg, valid)
    weights, losses, counts = lovasz_class_rows(
        _as_class_rows(key, batch=batch),
        _as_class_rows(fg, batch=batch),
        settings,
        wrt_source=wrt_source,
        overwrite_key=key is not detached,  # the source itself is never overwritten
    )
    weights = weights.transpose(0, 1) if batch else weights
    weights = weights.reshape(source.shape)
    if settings.world_size > 1:  # DDP's mean of the processes' gradients is then the global one
        weights.mul_(settings.world_size)
    return weights, losses, counts


def _present_class_losses(
    source: Tensor,
    fg: Tensor,
    valid: Tensor | None,
    key_of: KeyOf,
    settings: LovaszSettings,
    wrt_source: bool,
) -> tuple[Tensor, Tensor]:
    """:func:`_class_losses` of the rows with foreground only: every other row gets loss 0,
    count 0 and no gradient. With dozens of classes most are absent from a volume, and copying
    out the present rows skips the keys and sorts of the others (at the price of one host
    synchronisation to find the present rows). When most rows are present, every row is
    computed in place and the absent ones are then cleared: the exact sort on the CPU keeps one
    voxel of a row without foreground, so an absent row costs less than copying a present one
    out and back."""
    num_batch, num_classes = source.shape[:2]
    batch = settings.batch
    shape = (1 if batch else num_batch, num_classes)
    with torch.no_grad():
        flat_fg = fg.flatten(2)  # (B, C, P)
        present = flat_fg.any(dim=-1)
        if batch:  # one row per class over the batch
            present = present.any(dim=0, keepdim=True)
        rows = present.view(-1).nonzero().view(-1)
        if _computes_every_row(rows.numel(), present.numel(), source, settings):
            weights, losses, counts = _every_row(source, fg, valid, key_of, settings, wrt_source)
            if rows.numel() < present.numel():  # clear the absent rows (their counts are 0)
                absent = ~present.view(-1, num_classes, 1)  # broadcast over B with batch
                weights.view(num_batch, num_classes, -1).masked_fill_(absent, 0.0)
                losses.masked_fill_(absent.view(-1), 0.0)
        else:
            weights, losses, counts = _present_rows(
                source, flat_fg, valid, rows, key_of, settings, wrt_source
            )
    losses = known_gradient(source, losses.view(shape), weights.view(source.shape))
    return losses, counts.view(shape)


@torch.no_grad()
def _present_rows(
    source: Tensor,
    flat_fg: Tensor,
    valid: Tensor | None,
    rows: Tensor,
    key_of: KeyOf,
    settings: LovaszSettings,
    wrt_source: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights, losses, counts)`` as :func:`_every_row` returns them, computed on copies of
    the present ``rows`` (flat indices into the losses) of the ``(B, C, P)`` foreground
    ``flat_fg``; 0 elsewhere."""
    values = source.detach().flatten(2)  # (B, C, P)
    weights = torch.zeros(values.shape, dtype=values.dtype, device=values.device)
    num_rows = source.shape[1] if settings.batch else source.shape[0] * source.shape[1]
    losses = torch.zeros(num_rows, dtype=values.dtype, device=values.device)
    counts = torch.zeros(num_rows, dtype=torch.int64, device=values.device)
    if not rows.numel():
        return weights, losses, counts
    num_classes, num_voxels = values.shape[1:]
    batch = settings.batch
    if batch:  # (B, n, P) copies, keyed, and seen as (n, B, P) rows
        row_fg = flat_fg.index_select(1, rows)
        row_valid = None if valid is None else valid.flatten(2)
        key = key_of(values.index_select(1, rows), row_fg, row_valid)
        key_rows, fg_rows = key.transpose(0, 1), row_fg.transpose(0, 1)
    else:  # (n, P) copies of the (volume, class) rows, seen as (n, 1, P)
        row_fg = flat_fg.reshape(-1, num_voxels).index_select(0, rows)
        row_valid = None
        if valid is not None:
            row_valid = valid.flatten(2)[:, 0].index_select(0, rows // num_classes)
        key = key_of(values.reshape(-1, num_voxels).index_select(0, rows), row_fg, row_valid)
        key_rows, fg_rows = key.unsqueeze(1), row_fg.unsqueeze(1)
    row_weights, row_losses, row_counts = lovasz_class_rows(
        key_rows, fg_rows, settings, wrt_source=wrt_source, overwrite_key=True
    )
    if batch:
        weights.index_copy_(1, rows, row_weights.transpose(0, 1))
    else:
        weights.view(-1, num_voxels).index_copy_(0, rows, row_weights.view(-1, num_voxels))
    losses.index_copy_(0, rows, row_losses)
    counts.index_copy_(0, rows, row_counts)
    return weights, losses, counts


def _computes_every_row(
    num_present: int, num_rows: int, source: Tensor, settings: LovaszSettings
) -> bool:
    """Whether :func:`_present_class_losses` computes every row in place: when every row is
    present, or when at least half are and the exact sort leaves out the voxels of the absent
    rows (:func:`~lovasz_monai.functional.rows.sorts_weighted_voxels_only`)."""
    if num_present == num_rows:
        return True
    row_size = source[0, 0].numel() * (source.shape[0] if settings.batch else 1)
    return (
        2 * num_present >= num_rows
        # a strided source can give strided rows, which are sorted whole, absent ones included
        and source.is_contiguous()
        and sorts_weighted_voxels_only(source.device, source.dtype, row_size, settings)
    )


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
    validate: bool = True,
    skip_absent: bool = False,
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
        validate: with ``distributed`` and more than one process, run the checks of the settings
            and shapes on every process and share the outcome, with a check that every process
            holds the same number of classes, bins and dtype (one all-reduce of a few integers),
            so that each raises the same ``ValueError``; ``False``: a process whose check fails
            or that disagrees leaves the others waiting in the all-reduce until the process
            group's timeout.
        skip_absent: rows without valid foreground are not computed: their loss is 0 and they
            get no gradient, which is all that ``classes="present"`` (:func:`class_weights`)
            takes of them. With many classes, most absent from a volume, this saves most of the
            work (one host synchronisation finds the rows). Distributed rows are always
            computed (a row may have foreground on another process).

    Returns:
        ``(losses, fg_counts)``, each ``(B, C)`` (``(1, C)`` when ``batch``): the extension of each
        row, differentiable in ``errors``, and its number of valid foreground voxels.

    Example:
        >>> errors = torch.tensor([[[0.9, 0.1], [0.1, 0.9]]])
        >>> losses, counts = lovasz_class_losses(errors, torch.tensor([[[0, 1], [1, 0]]]))
        >>> losses, counts
        (tensor([[0.5000, 0.5000]]), tensor([[1, 1]]))

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: when the shapes do not match or hold no voxel, ``distributed`` without
            ``batch=True`` and ``method="histogram"``, or (``validate``) distributed processes
            that disagree on classes, bins or dtype.
    """
    settings = dict(batch=batch, method=method, bins=bins, chunk_elements=chunk_elements)
    settings.update(distributed=distributed, process_group=process_group)
    return _checked_class_losses(
        errors, labels, valid, _error_key, False, validate, skip_absent, settings
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
    validate: bool = True,
    skip_absent: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`lovasz_class_losses` of the errors ``|y - p|``, differentiable in ``probs``.

    The errors are never part of the autograd graph: backward keeps one tensor, the derivative
    of each row's loss with respect to ``probs``.

    Args:
        probs: ``(B, C, *spatial)`` probabilities in [0, 1] (softmax or per-channel sigmoid).
        labels: ``(B, C, *spatial)`` one-hot or multi-hot targets (bool or 0/1).
        valid, batch, method, bins, chunk_elements: see :func:`lovasz_class_losses`.
        distributed, process_group, validate, skip_absent: see :func:`lovasz_class_losses`.

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
    settings = dict(batch=batch, method=method, bins=bins, chunk_elements=chunk_elements)
    settings.update(distributed=distributed, process_group=process_group)
    return _checked_class_losses(
        probs, labels, valid, _probability_key, True, validate, skip_absent, settings
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
    validate: bool = True,
    skip_absent: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`lovasz_class_losses` of the hinge errors ``relu(1 - x (2 y - 1))``.

    Args:
        logits: ``(B, C, *spatial)`` raw scores; each channel is a binary problem.
        labels: ``(B, C, *spatial)`` binary targets (bool or 0/1).
        valid, batch, method, bins, chunk_elements: see :func:`lovasz_class_losses`.
        distributed, process_group, validate, skip_absent: see :func:`lovasz_class_losses`.

    Returns:
        ``(losses, fg_counts)`` as :func:`lovasz_class_losses`, differentiable in ``logits``.

    Example:
        >>> logits = torch.tensor([[[2.0, -1.0, 0.5, -0.5]]])
        >>> lovasz_hinge_class_losses(logits, torch.tensor([[[1, 0, 0, 1]]]))[0]
        tensor([[1.]])

    Raises:
        ValueError: as :func:`lovasz_class_losses`.
    """
    settings = dict(batch=batch, method=method, bins=bins, chunk_elements=chunk_elements)
    settings.update(distributed=distributed, process_group=process_group)
    return _checked_class_losses(
        logits, labels, valid, _hinge_key, True, validate, skip_absent, settings
    )


class ClassSelection(NamedTuple):
    """The classes that enter a class mean: see :func:`select_classes`."""

    channels: list[int]
    """Input channels that enter the mean, in order."""
    weight: Tensor | None
    """``(len(channels),)`` class weights of those channels, or ``None``."""
    present_only: bool
    """Only the channels with foreground in a row count (``classes="present"``)."""


def select_classes(
    num_channels: int,
    classes: str | Sequence[int] = "present",
    include_background: bool = True,
    weight: Tensor | None = None,
) -> ClassSelection:
    """Choose the channels of a ``num_channels``-channel input that enter the class mean, and
    their weights: the one class selection of the functions and the loss classes.

    Args:
        num_channels: ``C`` of the input.
        classes: ``"present"``, ``"all"`` (every channel, the background as
            ``include_background`` says), or a list of channel indices.
        include_background: ``False`` leaves channel 0 out (when ``C > 1``).
        weight: optional scalar (every selected channel) or one weight per channel left after
            ``include_background``; a ``classes`` list picks its channels' weights from those.

    Returns:
        The :class:`ClassSelection`.

    Example:
        >>> select_classes(4, "present", include_background=False)
        ClassSelection(channels=[1, 2, 3], weight=None, present_only=True)
        >>> weight = torch.tensor([1.0, 2.0, 3.0])  # channels 1, 2, 3
        >>> select_classes(4, [3, 1], include_background=False, weight=weight)
        ClassSelection(channels=[3, 1], weight=tensor([3., 1.]), present_only=False)

    Raises:
        ValueError: an invalid ``classes``, a listed channel ``>= num_channels`` (or 0 without
            the background), or a weight count other than the channels.
    """
    classes = check_lovasz_arguments(classes=classes)
    first = 0 if include_background or num_channels == 1 else 1
    if isinstance(classes, str):
        channels = list(range(first, num_channels))
    else:
        if first and 0 in classes:
            raise ValueError("classes lists class 0 but include_background=False excludes it")
        bad = [c for c in classes if c >= num_channels]
        if bad:
            raise ValueError(
                f"classes {bad} out of range for an input with {num_channels} channels"
            )
        channels = classes
    if weight is not None and weight.ndim == 0:
        weight = weight.expand(len(channels))
    elif weight is not None:
        if weight.numel() != num_channels - first:
            raise ValueError(
                f"weight must have one value per channel ({num_channels - first}"
                + ("" if first == 0 else ", background excluded")
                + f"), got {weight.numel()} for an input with {num_channels} channels"
                + (
                    ""
                    if isinstance(classes, str)
                    else " (the weights of the channels listed in classes are picked from them)"
                )
            )
        weight = weight[[c - first for c in channels]]
    return ClassSelection(channels, weight, classes == "present")


def class_weights(
    losses: Tensor,
    fg_counts: Tensor,
    present_only: bool = True,
    weight: Tensor | None = None,
    *,
    validate: bool = True,
) -> Tensor:
    """Weight of each (row, class) loss in the class mean of its row.

    Args:
        losses: ``(R, C)`` per-class losses (their dtype and device are used).
        fg_counts: ``(R, C)`` foreground voxel counts of the same rows.
        present_only: classes without foreground in a row get weight 0.
        weight: optional ``(C,)`` finite, non-negative class weights, not all zero.
        validate: check ``weight`` (see :func:`check_class_weight`; one host synchronisation).

    Returns:
        ``(R, C)`` weights: ``weight_c`` (or 1) for the classes that count, 0 for the others.

    Example:
        >>> counts = torch.tensor([[3, 1, 0]])
        >>> class_weights(torch.zeros(1, 3), counts, weight=torch.tensor([1.0, 2.0, 3.0]))
        tensor([[1., 2., 0.]])

    Raises:
        ValueError: when shapes do not match; with ``validate``, a NaN, inf or negative weight,
            or weights that are all zero.
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
    if validate:
        check_class_weight(weight, dtype=losses.dtype)
    return counted * weight.to(losses)


def average_class_losses(
    losses: Tensor,
    fg_counts: Tensor,
    present_only: bool = True,
    weight: Tensor | None = None,
    *,
    validate: bool = True,
) -> Tensor:
    """Weighted mean over classes of each row of ``losses``.

    Args:
        losses: ``(R, C)`` per-class losses (``R`` volumes, or 1 for a whole batch).
        fg_counts: ``(R, C)`` foreground voxel counts of the same rows.
        present_only: average only over the classes with foreground in that row (the paper's
            ``classes="present"``); a row without any contributes 0.
        weight: optional ``(C,)`` finite, non-negative class weights, not all zero.
        validate: check ``weight`` (see :func:`class_weights`).

    Returns:
        ``(R,)`` per-row means.

    Example:
        >>> average_class_losses(torch.tensor([[0.2, 0.4, 0.9]]), torch.tensor([[3, 1, 0]]))
        tensor([0.3000])

    Raises:
        ValueError: as :func:`class_weights`.
    """
    counted = class_weights(losses, fg_counts, present_only, weight, validate=validate)
    total = counted.sum(-1)
    mean = (losses * counted).sum(-1) / total.clamp_min(torch.finfo(losses.dtype).tiny)
    # only a total of exactly 0 means "no class counts"; a NaN total (unchecked NaN weights)
    # must stay visible in the value, not become 0 while the gradient is NaN
    return torch.where(total == 0, torch.zeros_like(mean), mean)
