"""The Lovász-Softmax (and Lovász-sigmoid) loss and the Lovász hinge loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.utils import LossReduction
from torch import Tensor

from lovasz_monai import functional
from lovasz_monai.functional import DEFAULT_BINS, DEFAULT_CHUNK_ELEMENTS, LovaszSettings, Method
from lovasz_monai.losses.base import LossInputs, LovaszLoss, _resolve_activation

__all__ = ["LovaszHingeLoss", "LovaszSoftmaxLoss"]


class LovaszSoftmaxLoss(LovaszLoss):
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
            over volumes of the per-volume class mean) or ``"none"``: as MONAI's
            ``DiceLoss(reduction="none")``, a ``(B, N, 1, ..., 1)`` tensor (one 1 per spatial
            dimension; ``(1, N, 1, ...)`` when ``batch``, where MONAI returns ``(N, 1, ...)``)
            where ``N`` is the number of selected channels in their order: ``C``, ``C - 1``
            (channels ``1..C-1``) with ``include_background=False``, or ``len(classes)`` for a
            ``classes`` list. It
            broadcasts against the input only when ``N == C``. Entry ``[b, j]`` holds
            ``weight_c * loss_c`` of the ``j``-th selected channel ``c`` when that class counts
            (``"present"``: it has foreground) and 0 otherwise.
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
        ValueError: on contradictory activation flags, an unknown reduction/method/classes, a
            NaN, inf, negative or all-zero ``weight``, or in ``forward`` on shape mismatches,
            tensors without voxels (batch size or a spatial size 0) and (with ``validate``) bad
            values: NaN/inf input, labels outside ``[0, C)`` that are not ``ignore_index``,
            targets that are not one-hot, probabilities outside [0, 1]; with ``distributed`` and
            ``validate``, on every process when any process's input is bad or the processes
            disagree on channels, bins or dtype.
        TypeError: when ``input``, ``target`` or ``mask`` is not a tensor (numpy arrays and
            lists are refused, not converted) or ``input`` is not floating point.
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
            weight=weight,
            ignore_index=ignore_index,
            classes=classes,
            validate=validate,
            settings=LovaszSettings(
                batch, method, bins, chunk_elements, distributed, process_group
            ),
        )
        self.sigmoid, self.softmax = _resolve_activation(sigmoid, softmax, other_act)
        self.other_act = other_act

    def _probabilities(self, input: Tensor) -> Tensor:
        if self.softmax:
            return torch.softmax(input, dim=1)
        if self.sigmoid:
            return torch.sigmoid(input)
        if self.other_act is not None:
            return self.other_act(input)
        return input  # probabilities, checked in _check_input

    @property
    def exclusive_target(self) -> bool:  # type: ignore[override]
        return bool(self.softmax)

    def _check_input(self, input: Tensor) -> None:
        if self.softmax and input.shape[1] == 1:
            raise ValueError(
                "softmax over a single channel is constant: for a binary problem with one "
                "output channel pass sigmoid=True, or use LovaszHingeLoss"
            )
        takes_probabilities = not (self.softmax or self.sigmoid or self.other_act is not None)
        if takes_probabilities and self.validate:
            functional.check_probabilities(
                input,
                "input",
                "; with softmax=False and no other activation the loss takes probabilities: "
                "pass softmax=True (or leave it None) for logits",
            )

    def compute(self, inputs: LossInputs, probabilities: Tensor | None = None) -> Tensor:
        """The Lovász-Softmax (sigmoid) loss of :meth:`prepare`'s output, reduced.

        Args:
            inputs: :meth:`prepare`'s output.
            probabilities: ``(B, C, *spatial)``, the activation of ``inputs.input`` (in its
                dtype) when the caller has it already, e.g. ``exp()`` of a log-softmax that
                :class:`~lovasz_monai.losses.LovaszCELoss` shares with its cross-entropy; not
                checked. ``None``: computed here.

        Returns:
            The loss, reduced as ``reduction`` says.

        Example:
            >>> import torch
            >>> loss = LovaszSoftmaxLoss(to_onehot_y=True)
            >>> logits, labels = torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 1, 4, 4))
            >>> bool(loss.compute(loss.prepare(logits, labels)) == loss(logits, labels))
            True
        """
        probs = self._probabilities(inputs.input) if probabilities is None else probabilities
        if self.softmax or self.sigmoid:
            return self._class_mean(
                functional.lovasz_probability_class_losses, probs, inputs.fg, inputs.valid
            )
        # another activation may leave [0, 1]: differentiate through the errors |y - p|
        errors = (inputs.fg.to(probs.dtype) - probs).abs()
        return self._class_mean(functional.lovasz_class_losses, errors, inputs.fg, inputs.valid)


class LovaszHingeLoss(LovaszLoss):
    """Lovász hinge loss on logits: binary (one channel) or multi-label (each channel binary).

    The errors are the hinge margins ``relu(1 - logit * (2 y - 1))`` of each channel, weighted by
    the Lovász extension of the channel's Jaccard loss. Channels are averaged, then volumes.

    Args:
        include_background: if False and there is more than one channel, channel 0 is left out.
        to_onehot_y: convert a ``(B, 1, *spatial)`` label map to one-hot (multi-channel input).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``, as in :class:`LovaszSoftmaxLoss` (the
            same shape rule: one entry per selected channel).
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
        ValueError: on an unknown reduction/method/classes or a bad ``weight``, and in
            ``forward`` as :class:`LovaszSoftmaxLoss`.
        TypeError: as :class:`LovaszSoftmaxLoss`.
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
            weight=weight,
            ignore_index=ignore_index,
            classes=classes,
            validate=validate,
            settings=LovaszSettings(
                batch, method, bins, chunk_elements, distributed, process_group
            ),
        )

    def compute(self, inputs: LossInputs) -> Tensor:
        """The Lovász hinge loss of :meth:`prepare`'s output, reduced."""
        return self._class_mean(
            functional.lovasz_hinge_class_losses, inputs.input, inputs.fg, inputs.valid
        )
