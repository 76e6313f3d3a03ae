"""What the Lovász loss classes share: settings, input checks, target decoding, class
selection and reduction."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from monai.utils import LossReduction, convert_to_tensor
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

from lovasz_monai import functional
from lovasz_monai.functional import Method

T = TypeVar("T")


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def as_loss_tensors(
    input: Tensor, target: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The arguments of a loss's ``forward`` as plain tensors (a MONAI ``MetaTensor`` loses its
    metadata), after checking that they are tensors: a numpy array, list or ``None`` is refused
    rather than converted, as ``torch.nn`` losses do.

    Raises:
        TypeError: naming the argument that is not a ``torch.Tensor`` and its type.
    """
    for name, value in (("input", input), ("target", target), ("mask", mask)):
        if not isinstance(value, Tensor) and not (name == "mask" and value is None):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return tuple(convert_to_tensor(x, track_meta=False) for x in (input, target, mask))


def accepts_mask(loss: nn.Module) -> bool:
    """Whether ``loss.forward`` takes a ``mask`` argument (like ``MaskedDiceLoss`` and the Lovász
    losses).

    Example:
        >>> from monai.losses import DiceLoss, MaskedDiceLoss
        >>> accepts_mask(MaskedDiceLoss()), accepts_mask(DiceLoss())
        (True, False)
    """
    try:
        params = inspect.signature(loss.forward).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return "mask" in params


def autocast_off(input: Tensor) -> torch.autocast:
    """A context without autocast on ``input``'s device: the losses compute in float32+."""
    device_type = input.device.type if isinstance(input, Tensor) else "cpu"
    return torch.autocast(device_type=device_type, enabled=False)


def check_logits(input: Tensor, validate: bool) -> None:
    """Check a ``(B, C, *spatial)`` floating point network output (NaN/inf only if ``validate``);
    a zero size is refused with the target, by :func:`~lovasz_monai.functional.decode_target`.

    Raises:
        TypeError: ``input`` is not a floating point tensor.
        ValueError: fewer than 3 dimensions, or (``validate``) NaN/inf values.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating point tensor, got dtype {input.dtype}")
    if input.ndim < 3:
        raise ValueError(
            f"input must be (B, C, *spatial) with at least one spatial dimension, "
            f"got shape {_shape(input)}"
        )
    # A non-finite sum is cheap to test; only then look for NaN/inf voxel by voxel (a sum can
    # also overflow for huge finite values).
    if validate and not torch.isfinite(input.sum()) and not torch.isfinite(input).all():
        raise ValueError("input contains NaN or inf values")


class _LovaszLoss(_Loss):
    """Target preparation, class selection and reduction shared by the Lovász losses."""

    def __init__(
        self,
        *,
        include_background: bool,
        to_onehot_y: bool,
        reduction: LossReduction | str,
        batch: bool,
        weight: Sequence[float] | float | Tensor | None,
        ignore_index: int | None,
        classes: str | Sequence[int],
        validate: bool,
        method: Method,
        bins: int,
        chunk_elements: int,
        distributed: bool,
        process_group: object | None,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        classes = functional.check_lovasz_arguments(
            classes=classes,
            method=method,
            bins=bins,
            chunk_elements=chunk_elements,
            batch=batch,
            distributed=distributed,
        )
        if not include_background and not isinstance(classes, str) and 0 in classes:
            raise ValueError("classes lists class 0 but include_background=False excludes it")
        class_weight = None
        if weight is not None:
            class_weight = functional.check_class_weight(weight, dtype=torch.float32)
        self.register_buffer("class_weight", class_weight)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.batch = batch
        self.ignore_index = ignore_index
        self.classes = classes
        self.validate = validate
        self.method = method
        self.bins = int(bins)
        self.chunk_elements = int(chunk_elements)
        self.distributed = bool(distributed)
        self.process_group = process_group

    # -- input checks ------------------------------------------------------------------------

    def _check_input(self, input: Tensor) -> None:
        check_logits(input, self.validate)

    def _checked_inputs(
        self,
        input: Tensor,
        target: Tensor,
        mask: Tensor | None,
        prepare: Callable[[Tensor, Tensor, Tensor | None], T],
    ) -> T:
        """``prepare`` of the arguments checked by :func:`as_loss_tensors`; with ``distributed``
        and ``validate`` on several processes, as a
        :func:`~lovasz_monai.functional.collective_check`: bad input on one process, or processes
        that disagree on channels, bins or dtype, raise the same ``ValueError`` on every process
        instead of leaving the others waiting in the loss's all-reduce."""

        def checks() -> T:
            prepared = prepare(*as_loss_tensors(input, target, mask))
            self._channels_and_weight(input.shape[1])  # ``classes`` and ``weight`` fit C
            return prepared

        if (
            not self.validate
            or functional.distributed_world_size(self.distributed, self.process_group) == 1
        ):
            return checks()
        return functional.collective_check(
            input, self.bins, checks, process_group=self.process_group
        )

    def _prepare_target(
        self, input: Tensor, target: Tensor, mask: Tensor | None, one_hot_target: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """:func:`~lovasz_monai.functional.decode_target` with this loss's settings;
        ``one_hot_target``: a C-channel target must have exactly one class per valid voxel."""
        return functional.decode_target(
            target,
            input.shape,
            mask,
            to_onehot_y=self.to_onehot_y,
            ignore_index=self.ignore_index,
            exclusive=one_hot_target,
            validate=self.validate,
            device=input.device,
        )

    # -- classes and reduction -----------------------------------------------------------------

    def _channels_and_weight(self, num_channels: int) -> tuple[list[int], Tensor | None]:
        """The channels that enter the class mean (``include_background``, ``classes``) of an
        input with ``num_channels`` channels, and their class weights."""
        first = 0 if self.include_background or num_channels == 1 else 1
        if isinstance(self.classes, str):
            channels = list(range(first, num_channels))
        else:
            bad = [c for c in self.classes if c >= num_channels]
            if bad:
                raise ValueError(
                    f"classes {bad} out of range for an input with {num_channels} channels"
                )
            channels = list(self.classes)
        weight = self.class_weight
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
                        if isinstance(self.classes, str)
                        else " (the weights of the channels listed in classes are picked from them)"
                    )
                )
            weight = weight[[c - first for c in channels]]
        return channels, weight

    def _select_channels(self, source: Tensor, fg: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``source`` and ``fg`` restricted to the channels that enter the class mean, and the
        class weights of those channels (see :meth:`_channels_and_weight`)."""
        channels, weight = self._channels_and_weight(source.shape[1])
        if len(channels) != source.shape[1]:
            source, fg = source[:, channels], fg[:, channels]
        return source, fg, weight

    def _lovasz(
        self,
        class_losses: Callable[..., tuple[Tensor, Tensor]],
        source: Tensor,
        fg: Tensor,
        valid: Tensor | None,
        weight: Tensor | None,
    ) -> Tensor:
        """``class_losses`` (a ``functional.lovasz_*class_losses``) of ``source``, averaged over
        classes and reduced over volumes."""
        present_only = self.classes == "present"
        # absent rows are found with one host synchronisation: skip them on an accelerator only
        # where validate synchronises anyway
        losses, counts = class_losses(
            source,
            fg,
            valid,
            self.batch,
            self.method,
            self.bins,
            self.chunk_elements,
            distributed=self.distributed,
            process_group=self.process_group,
            validate=False,  # the processes' agreement is checked with the input (forward)
            skip_absent=present_only and (self.validate or source.device.type == "cpu"),
        )
        if self.reduction == LossReduction.NONE.value:
            counted = functional.class_weights(
                losses, counts, present_only, weight, validate=self.validate
            )
            return (losses * counted).view(*losses.shape, *([1] * (source.ndim - 2)))
        per_row = functional.average_class_losses(
            losses, counts, present_only, weight, validate=self.validate
        )
        if self.reduction == LossReduction.SUM.value:
            return per_row.sum()
        return per_row.mean()


def _resolve_activation(
    sigmoid: bool, softmax: bool | None, other_act: Callable | None
) -> tuple[bool, bool]:
    """Resolve the activation flags; ``softmax=None`` means softmax unless another is chosen."""
    if other_act is not None and not callable(other_act):
        raise TypeError(f"other_act must be callable, got {type(other_act).__name__}")
    if sigmoid and softmax:
        raise ValueError("sigmoid=True and softmax=True are mutually exclusive: choose one")
    if other_act is not None and (sigmoid or softmax):
        raise ValueError("other_act cannot be combined with sigmoid=True or softmax=True")
    if softmax is None:
        softmax = not sigmoid and other_act is None
    return sigmoid, softmax
