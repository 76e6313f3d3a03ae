"""MONAI-style Lovász losses, with the argument names and tensor conventions of ``DiceLoss``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from monai.networks.utils import one_hot
from monai.utils import LossReduction, convert_to_tensor
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

from lovasz_monai import functional
from lovasz_monai.functional import DEFAULT_BINS, DEFAULT_CHUNK_ELEMENTS, Method

__all__ = ["LovaszCELoss", "LovaszHingeLoss", "LovaszSoftmaxLoss", "MaskedDiceCELoss"]


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


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
        class_weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        if class_weight is not None and (class_weight.ndim > 1 or (class_weight < 0).any()):
            raise ValueError(f"weight must be a non-negative scalar or 1-D sequence, got {weight}")
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

    # -- input checks --------------------------------------------------------------------------

    def _check_input(self, input: Tensor) -> None:
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
        if self.validate and not torch.isfinite(input.sum()) and not torch.isfinite(input).all():
            raise ValueError("input contains NaN or inf values")

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
        )

    # -- classes and reduction -----------------------------------------------------------------

    def _select_channels(self, source: Tensor, fg: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``source`` and ``fg`` restricted to the channels that enter the class mean
        (``include_background``, ``classes``), and the class weights of those channels."""
        num_channels = source.shape[1]
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
                    + f"), got {weight.numel()}"
                )
            weight = weight[[c - first for c in channels]]
        if len(channels) != num_channels:
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
        )
        present_only = self.classes == "present"
        if self.reduction == LossReduction.NONE.value:
            counted = functional.class_weights(losses, counts, present_only, weight)
            return (losses * counted).view(*losses.shape, *([1] * (source.ndim - 2)))
        per_row = functional.average_class_losses(losses, counts, present_only, weight)
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


class LovaszSoftmaxLoss(_LovaszLoss):
    """Lovász-Softmax loss (Berman et al., CVPR 2018), a convex surrogate of the Jaccard/IoU loss.

    For each class ``c`` (and each volume, unless ``batch=True``) the errors ``|y_c - p_c|`` of the
    valid voxels are sorted and weighted by the gradient of the Lovász extension of the Jaccard
    loss. Per-class losses are averaged over the selected classes of each volume, then over
    volumes. With ``sigmoid=True`` the channels are independent probabilities (multi-label,
    overlapping regions such as BraTS TC/WT/ET): the Lovász-sigmoid loss.

    Args:
        include_background: if False, channel 0 is left out of the average (its voxels still count
            as background for the other classes).
        to_onehot_y: convert a ``(B, 1, *spatial)`` label map target to one-hot.
        sigmoid: per-channel sigmoid activation (multi-label).
        softmax: softmax over channels. ``None`` (default): softmax unless ``sigmoid`` or
            ``other_act`` is given; ``False`` with no other activation: ``input`` holds
            probabilities in [0, 1].
        other_act: any other activation applied to ``input``, e.g. ``torch.tanh``.
        reduction: ``"mean"`` (mean over volumes of the per-volume class mean), ``"sum"`` (sum
            over volumes of the per-volume class mean) or ``"none"``: a ``(B, C', 1, ...)`` tensor
            (``(1, C', 1, ...)`` when ``batch``) that broadcasts against the input, holding
            ``weight_c * loss_c`` for the classes that are averaged and 0 for the others.
        batch: False: one loss per volume (the reference's ``per_image=True``); True: the whole
            batch is one set of voxels (``per_image=False``).
        weight: per-class weights of the class mean, one per channel left after
            ``include_background`` (or a scalar).
        ignore_index: label value whose voxels take part in nothing (label-map targets).
        classes: ``"present"`` (classes with foreground in the volume, default), ``"all"``, or a
            list of channel indices.
        validate: check target and input values (one host synchronisation); ``False`` keeps the
            computation free of data-dependent control flow.
        method: ``"sort"`` (exact) or ``"histogram"`` (sort-free, error below ``max error / bins``).
        bins: number of histogram bins.
        chunk_elements: element budget of one batched sort (whole rows at a time).
        distributed: with ``batch=True`` and ``method="histogram"``, the loss of the union of the
            batches of all processes of ``process_group`` (DDP): the per-class rows are the union,
            ``classes="present"`` and ``weight`` follow the union's counts, and the value is the
            same on every process. Its backward gives this process's input ``world_size`` times
            its derivative, so that the gradient DDP averages over the processes is the gradient
            of the union's loss (the gradient that one process training on the whole batch would
            get). Every process must call the loss at each step (a collective). Without an
            initialised process group, or with one process, the option changes nothing.
        process_group: the ``torch.distributed`` group of ``distributed`` (``None``: the default
            group).

    Shapes:
        input: ``(B, C, *spatial)`` logits (or probabilities, see ``softmax``), float16/bfloat16/
        float32/float64; the loss is computed in at least float32.
        target: ``(B, 1, *spatial)`` label map (integer or float holding integers) or
        ``(B, C, *spatial)`` one-hot / multi-hot.
        mask: optional ``(B, 1, *spatial)`` bool or 0/1, 1 where the voxel counts.

    Example:
        >>> import torch
        >>> loss = LovaszSoftmaxLoss(to_onehot_y=True)
        >>> logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
        >>> value = loss(logits, labels)
        >>> value.backward()
        >>> bool(0 <= value <= 1)
        True

    Raises:
        ValueError: on contradictory activation flags, an unknown reduction/method/classes, or in
            ``forward`` on shape mismatches and (with ``validate``) bad values: NaN/inf input,
            labels outside ``[0, C)`` that are not ``ignore_index``, targets that are not
            one-hot, probabilities outside [0, 1].
        TypeError: when ``input`` is not a floating point tensor.
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
        validate: bool = True,
        method: Method = "sort",
        bins: int = DEFAULT_BINS,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        distributed: bool = False,
        process_group: object | None = None,
    ) -> None:
        super().__init__(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
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
        self.sigmoid, self.softmax = _resolve_activation(sigmoid, softmax, other_act)
        self.other_act = other_act

    def _probabilities(self, input: Tensor) -> Tensor:
        if self.softmax:
            if input.shape[1] == 1:
                raise ValueError(
                    "softmax over a single channel is constant: for a binary problem with one "
                    "output channel pass sigmoid=True, or use LovaszHingeLoss"
                )
            return torch.softmax(input, dim=1)
        if self.sigmoid:
            return torch.sigmoid(input)
        if self.other_act is not None:
            return self.other_act(input)
        if self.validate and not ((input >= 0) & (input <= 1)).all():
            raise ValueError(
                "with softmax=False and no other activation the input must hold probabilities "
                "in [0, 1]; pass softmax=True (or leave it None) for logits"
            )
        return input

    def _prepare(
        self, input: Tensor, target: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Checked float32+ input, then what :meth:`_prepare_target` returns."""
        self._check_input(input)
        fg, valid, labels = self._prepare_target(input, target, mask, one_hot_target=self.softmax)
        dtype = torch.promote_types(input.dtype, torch.float32)
        return input.to(dtype), fg, valid, labels

    def _lovasz_softmax(self, input: Tensor, fg: Tensor, valid: Tensor | None) -> Tensor:
        probs, fg, weight = self._select_channels(self._probabilities(input), fg)
        if self.softmax or self.sigmoid:
            return self._lovasz(
                functional.lovasz_probability_class_losses, probs, fg, valid, weight
            )
        # another activation may leave [0, 1]: differentiate through the errors |y - p|
        errors = (fg.to(probs.dtype) - probs).abs()
        return self._lovasz(functional.lovasz_class_losses, errors, fg, valid, weight)

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` logits (or probabilities with ``softmax=False``).
            target: ``(B, 1, *spatial)`` label map or ``(B, C, *spatial)`` one-hot target.
            mask: optional ``(B, 1, *spatial)``, nonzero where the voxel counts.

        Returns:
            The loss, reduced as set by ``reduction``.

        Raises:
            ValueError: on shape mismatches and, with ``validate``, on bad values.
        """
        input, target, mask = (
            convert_to_tensor(x, track_meta=False) for x in (input, target, mask)
        )
        with torch.autocast(device_type=input.device.type, enabled=False):
            input, fg, valid, _ = self._prepare(input, target, mask)
            return self._lovasz_softmax(input, fg, valid)


class LovaszHingeLoss(_LovaszLoss):
    """Lovász hinge loss on logits: binary (one channel) or multi-label (each channel binary).

    The errors are the hinge margins ``relu(1 - logit * (2 y - 1))`` of each channel, weighted by
    the Lovász extension of the channel's Jaccard loss. Channels are averaged, then volumes.

    Args:
        include_background: if False and there is more than one channel, channel 0 is left out.
        to_onehot_y: convert a ``(B, 1, *spatial)`` label map to one-hot (multi-channel input).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``, as in :class:`LovaszSoftmaxLoss`.
        batch: False: one loss per volume (the reference's ``per_image=True``, its default for
            the hinge); True: the batch is one set of voxels.
        weight: per-channel weights of the channel mean (or a scalar).
        ignore_index: label value whose voxels take part in nothing (label-map targets).
        classes: ``"all"`` (default; an empty channel still penalises false positives, as in the
            reference), ``"present"``, or a list of channel indices.
        validate, method, bins, chunk_elements, distributed, process_group: as in
            :class:`LovaszSoftmaxLoss`.

    Shapes:
        input: ``(B, C, *spatial)`` logits, ``C >= 1``.
        target: ``(B, C, *spatial)`` binary, or ``(B, 1, *spatial)`` 0/1 map when ``C == 1``, or a
        label map with ``to_onehot_y=True``.
        mask: optional ``(B, 1, *spatial)`` bool or 0/1.

    Example:
        >>> import torch
        >>> loss = LovaszHingeLoss()
        >>> logits = torch.randn(2, 1, 16, 16, requires_grad=True)
        >>> value = loss(logits, (torch.rand(2, 1, 16, 16) > 0.5).float())
        >>> value.backward()
        >>> value.ndim
        0

    Raises:
        ValueError: on an unknown reduction/method/classes, and in ``forward`` on shape
            mismatches and (with ``validate``) bad values.
        TypeError: when ``input`` is not a floating point tensor.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        reduction: LossReduction | str = LossReduction.MEAN,
        *,
        batch: bool = False,
        weight: Sequence[float] | float | Tensor | None = None,
        ignore_index: int | None = None,
        classes: str | Sequence[int] = "all",
        validate: bool = True,
        method: Method = "sort",
        bins: int = DEFAULT_BINS,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        distributed: bool = False,
        process_group: object | None = None,
    ) -> None:
        super().__init__(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
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

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` logits.
            target: binary ``(B, C, *spatial)`` target or ``(B, 1, *spatial)`` label map.
            mask: optional ``(B, 1, *spatial)``, nonzero where the voxel counts.

        Returns:
            The loss, reduced as set by ``reduction``.

        Raises:
            ValueError: on shape mismatches and, with ``validate``, on bad values.
        """
        input, target, mask = (
            convert_to_tensor(x, track_meta=False) for x in (input, target, mask)
        )
        with torch.autocast(device_type=input.device.type, enabled=False):
            self._check_input(input)
            fg, valid, _ = self._prepare_target(input, target, mask, one_hot_target=False)
            logits = input.to(torch.promote_types(input.dtype, torch.float32))
            logits, fg, weight = self._select_channels(logits, fg)
            return self._lovasz(functional.lovasz_hinge_class_losses, logits, fg, valid, weight)


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
            or ``softmax=False`` with no other activation (the input would not be logits).
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
        ce = None if ce_weight is None else torch.as_tensor(ce_weight, dtype=torch.float32)
        if ce is not None and (ce.ndim != 1 or (ce < 0).any()):
            raise ValueError(
                f"ce_weight must be a 1-D sequence of non-negative values, got {ce_weight}"
            )
        self.register_buffer("ce_weight", ce)
        self.lambda_lovasz = float(lambda_lovasz)
        self.lambda_ce = float(lambda_ce)
        self.label_smoothing = float(label_smoothing)

    def _cross_entropy(
        self, logits: Tensor, fg: Tensor, valid: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        num_channels = logits.shape[1]
        ce_weight = self.ce_weight
        if ce_weight is not None and ce_weight.numel() != num_channels:
            raise ValueError(
                f"ce_weight must have one value per input channel ({num_channels}), "
                f"got {ce_weight.numel()}"
            )
        if self.sigmoid:
            pos_weight = None
            if ce_weight is not None:
                pos_weight = ce_weight.to(logits).view(-1, *([1] * (logits.ndim - 2)))
            per_voxel = F.binary_cross_entropy_with_logits(
                logits, fg.to(logits.dtype), pos_weight=pos_weight, reduction="none"
            )
            voxel_weight = torch.ones_like(per_voxel[:, :1]) * num_channels
        else:
            labels = fg.to(torch.uint8).argmax(dim=1) if labels is None else labels[:, 0]
            weight = None if ce_weight is None else ce_weight.to(logits)
            per_voxel = F.cross_entropy(
                logits,
                labels,
                weight=weight,
                reduction="none",
                label_smoothing=self.label_smoothing,
            ).unsqueeze(1)
            voxel_weight = (
                torch.ones_like(per_voxel) if weight is None else weight[labels].unsqueeze(1)
            )
        if valid is not None:
            voxel_weight = voxel_weight * valid
            per_voxel = per_voxel * valid
        total = per_voxel.sum()
        if self.reduction == LossReduction.SUM.value:
            return total
        denominator = voxel_weight.sum()
        return torch.where(denominator > 0, total / denominator.clamp_min(1e-12), total * 0)

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` logits.
            target: ``(B, 1, *spatial)`` label map or ``(B, C, *spatial)`` one-hot target.
            mask: optional ``(B, 1, *spatial)``, nonzero where the voxel counts.

        Returns:
            ``lambda_lovasz * lovasz + lambda_ce * ce`` (a scalar).

        Raises:
            ValueError: on shape mismatches and, with ``validate``, on bad values.
        """
        input, target, mask = (
            convert_to_tensor(x, track_meta=False) for x in (input, target, mask)
        )
        with torch.autocast(device_type=input.device.type, enabled=False):
            logits, fg, valid, labels = self._prepare(input, target, mask)
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
    ``smooth_nr = smooth_dr = 1e-5``, mean over volumes and classes).

    Args:
        lambda_dice: weight of the Dice term, >= 0.
        lambda_ce: weight of the cross-entropy term, >= 0.

    Shapes:
        input: ``(B, C, *spatial)`` logits, ``C >= 2``.
        target: ``(B, 1, *spatial)`` label map with values in ``[0, C)``, or ``(B, C, *spatial)``
        one-hot.
        mask: optional ``(B, 1, *spatial)``, nonzero where the voxel counts.

    Example:
        >>> logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
        >>> mask = torch.ones(2, 1, 8, 8, 8)
        >>> mask[..., :2] = 0
        >>> MaskedDiceCELoss()(logits, labels, mask=mask).backward()

    Raises:
        ValueError: negative lambdas; in ``forward``, a single input channel or a target whose
            channel count is neither 1 nor ``C``.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(
                f"lambda_dice and lambda_ce must be >= 0, got {lambda_dice} and {lambda_ce}"
            )
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.dice = MaskedDiceLoss(softmax=True)

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` logits.
            target: ``(B, 1, *spatial)`` label map or ``(B, C, *spatial)`` one-hot.
            mask: optional ``(B, 1, *spatial)``.

        Returns:
            The scalar loss.

        Raises:
            ValueError: see the class docstring.
        """
        num_classes = input.shape[1]
        if num_classes < 2:
            raise ValueError(f"input must have C >= 2 softmax channels, got {input.shape[1]}")
        if target.shape[1] == 1:
            labels = target[:, 0].long()
            onehot = one_hot(target, num_classes=num_classes)
        elif target.shape[1] == num_classes:
            labels = target.argmax(dim=1)
            onehot = target
        else:
            raise ValueError(
                f"target must have 1 (label map) or {num_classes} (one-hot) channels, got "
                f"shape {tuple(target.shape)}"
            )
        ce_per_voxel = F.cross_entropy(input, labels, reduction="none")
        if mask is None:
            mask = torch.ones_like(ce_per_voxel).unsqueeze(1)
        valid = (mask[:, 0] != 0).to(ce_per_voxel.dtype)
        dice = self.dice(input, onehot, mask=mask)
        ce = (ce_per_voxel * valid).sum() / valid.sum().clamp_min(1.0)
        return self.lambda_dice * dice + self.lambda_ce * ce
