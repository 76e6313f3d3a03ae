"""What the Lovász loss classes share: input checks and target decoding (stage one, ``prepare``),
the class mean and reduction (stage two, ``compute``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from monai.utils import LossReduction, convert_to_tensor
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

from lovasz_monai import functional
from lovasz_monai.functional import LovaszSettings


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
    if validate:
        functional.check_finite(input, "input")


class LossInputs(NamedTuple):
    """A Lovász loss's checked inputs: what :meth:`~LovaszLoss.prepare` hands to the terms."""

    input: Tensor
    """``(B, C, *spatial)`` network output in (at least) float32."""
    fg: Tensor
    """``(B, C, *spatial)`` bool foreground of each channel, ``False`` at ignored voxels."""
    valid: Tensor | None
    """``(B, 1, *spatial)`` bool, ``False`` at ignored voxels; ``None``: every voxel counts."""
    labels: Tensor | None
    """``(B, 1, *spatial)`` int64 label map when the target was one (ignored voxels hold 0)."""


class LovaszLoss(_Loss):
    """The base of the Lovász loss classes, and the stages they share: :meth:`prepare` checks
    and decodes the inputs, :meth:`compute` gives the loss of prepared inputs; ``forward`` is the
    two in a row.

    The method settings are one frozen :class:`~lovasz_monai.functional.LovaszSettings`
    (``self.settings``; ``batch``, ``method``, ... read from it); the class selection and its
    weights are :func:`~lovasz_monai.functional.select_classes`'.
    """

    def __init__(
        self,
        *,
        include_background: bool,
        to_onehot_y: bool,
        reduction: LossReduction | str,
        weight: Sequence[float] | float | Tensor | None,
        ignore_index: int | None,
        classes: str | Sequence[int],
        validate: bool,
        settings: LovaszSettings,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        classes = functional.check_lovasz_arguments(classes=classes)
        if not include_background and not isinstance(classes, str) and 0 in classes:
            raise ValueError("classes lists class 0 but include_background=False excludes it")
        class_weight = None
        if weight is not None:
            class_weight = functional.check_class_weight(weight, dtype=torch.float32)
        self.register_buffer("class_weight", class_weight)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.ignore_index = functional.check_ignore_index(ignore_index)
        self.classes = classes
        self.validate = validate
        self.settings = settings

    batch = property(lambda self: self.settings.batch, doc="See ``settings``.")
    method = property(lambda self: self.settings.method, doc="See ``settings``.")
    bins = property(lambda self: self.settings.bins, doc="See ``settings``.")
    chunk_elements = property(lambda self: self.settings.chunk_elements, doc="See ``settings``.")
    distributed = property(lambda self: self.settings.distributed, doc="See ``settings``.")
    process_group = property(lambda self: self.settings.process_group, doc="See ``settings``.")

    #: a ``C``-channel target must hold exactly one class per valid voxel (softmax)
    exclusive_target = False

    def _check_input(self, input: Tensor) -> None:
        """Checks of the network output beyond :func:`check_logits` (subclasses)."""

    def prepare(
        self,
        input: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        *,
        check: Callable[[Tensor], None] | None = None,
    ) -> LossInputs:
        """Check the arguments of ``forward`` and decode the target: stage one of the loss.

        With ``distributed`` and ``validate`` on several processes this is a
        :func:`~lovasz_monai.functional.collective_check`: bad input on one process, or
        processes that disagree on channels, bins or dtype, raise the same ``ValueError`` on
        every process instead of leaving the others waiting in the loss's all-reduce.

        Args:
            input, target, mask: as ``forward`` takes them.
            check: a further check of the input tensor, run with the others (e.g. a term's
                per-channel weights).

        Returns:
            The :class:`LossInputs`.

        Raises:
            ValueError, TypeError: as ``forward``.
        """

        def checks() -> LossInputs:
            logits, target_, mask_ = as_loss_tensors(input, target, mask)
            check_logits(logits, self.validate)
            self._check_input(logits)
            fg, valid, labels = functional.decode_target(
                target_,
                logits.shape,
                mask_,
                to_onehot_y=self.to_onehot_y,
                ignore_index=self.ignore_index,
                exclusive=self.exclusive_target,
                validate=self.validate,
                device=logits.device,
            )
            self._selection(logits.shape[1])  # ``classes`` and ``weight`` fit C
            if check is not None:
                check(logits)
            dtype = torch.promote_types(logits.dtype, torch.float32)
            return LossInputs(logits.to(dtype), fg, valid, labels)

        if not self.validate or self.settings.world_size == 1:
            return checks()
        return functional.collective_check(
            input, self.settings.bins, checks, process_group=self.settings.process_group
        )

    def _selection(self, num_channels: int) -> functional.ClassSelection:
        return functional.select_classes(
            num_channels, self.classes, self.include_background, self.class_weight
        )

    def _class_mean(
        self,
        class_losses: Callable[..., tuple[Tensor, Tensor]],
        source: Tensor,
        fg: Tensor,
        valid: Tensor | None,
    ) -> Tensor:
        """``class_losses`` (a ``functional.lovasz_*class_losses``) of the selected channels of
        ``source``, averaged over classes and reduced over volumes."""
        channels, weight, present_only = self._selection(source.shape[1])
        if len(channels) != source.shape[1]:
            source, fg = source[:, channels], fg[:, channels]
        # absent rows are found with one host synchronisation: skip them on an accelerator only
        # where validate synchronises anyway
        losses, counts = class_losses(
            source,
            fg,
            valid,
            **self.settings.keywords(),
            validate=False,  # the processes' agreement is checked with the input (prepare)
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

    def compute(self, inputs: LossInputs) -> Tensor:
        """The loss of :meth:`prepare`'s output, reduced as ``reduction`` says: stage two."""
        raise NotImplementedError

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` logits (or probabilities with ``softmax=False``).
            target: ``(B, 1, *spatial)`` label map or ``(B, C, *spatial)`` one-hot target.
            mask: optional ``(B, 1, *spatial)``, bool or 0/1: 1 where the voxel counts.

        Returns:
            The loss, reduced as set by ``reduction``.

        Raises:
            ValueError: on shape mismatches and, with ``validate``, on bad values.
        """
        with autocast_off(input):
            return self.compute(self.prepare(input, target, mask))


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
