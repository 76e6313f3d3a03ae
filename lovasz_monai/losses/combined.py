"""Lovász + cross-entropy, MONAI's Dice + cross-entropy with an ignore mask, and weighted sums
of losses (e.g. Dice + CE + Lovász)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from monai.losses import MaskedDiceLoss
from monai.utils import LossReduction
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

from lovasz_monai import functional
from lovasz_monai.functional import DEFAULT_BINS, DEFAULT_CHUNK_ELEMENTS, Method
from lovasz_monai.losses.base import accepts_mask, as_loss_tensors, autocast_off, check_logits
from lovasz_monai.losses.cross_entropy import (
    check_ce_weight_fits,
    checked_ce_weight,
    masked_cross_entropy,
    masked_nll_loss,
)
from lovasz_monai.losses.lovasz import LovaszSoftmaxLoss

__all__ = [
    "DEFAULT_LOSS_LAMBDA_CE",
    "LovaszCELoss",
    "MaskedDiceCELoss",
    "WeightedSumLoss",
    "default_loss",
]

#: weight of the cross-entropy of :class:`LovaszCELoss` with a softmax over classes when none is
#: given (``lambda_ce=None``): on the real-anatomy comparison (docs/guides/which_loss.md)
#: Lovász + 0.3 CE gave the best mean IoU of 13 recipes, above Lovász + CE with equal weights and
#: Dice + CE
DEFAULT_LOSS_LAMBDA_CE = 0.3

#: state_dict keys of LovaszCELoss before it held its Lovász term as ``lovasz`` (version 0.1)
_FORMER_KEYS = {"class_weight": "lovasz.class_weight"}

#: LovaszCELoss attributes that are its Lovász term's settings (``loss.ignore_index`` reads
#: ``loss.lovasz.ignore_index``)
_LOVASZ_ATTRIBUTES = frozenset(
    {
        "include_background",
        "to_onehot_y",
        "sigmoid",
        "softmax",
        "other_act",
        "ignore_index",
        "classes",
        "validate",
        "class_weight",
        "settings",
        "batch",
        "method",
        "bins",
        "chunk_elements",
        "distributed",
        "process_group",
    }
)


class LovaszCELoss(_Loss):
    """Weighted sum of the Lovász-Softmax loss and cross-entropy, like MONAI's ``DiceCELoss``.

    ``lambda_lovasz * LovaszSoftmaxLoss + lambda_ce * CE``, where CE is the softmax cross-entropy
    on the raw logits (binary cross-entropy with logits per channel when ``sigmoid=True``),
    averaged over the valid voxels only (:func:`~lovasz_monai.losses.masked_cross_entropy`):
    the ignore label and the mask apply to both terms. The Lovász term is a
    :class:`LovaszSoftmaxLoss`, ``self.lovasz`` (its settings read through, e.g.
    ``loss.ignore_index``); the target is decoded once for both terms.

    Args:
        include_background, to_onehot_y, sigmoid, softmax, other_act: as in
            :class:`LovaszSoftmaxLoss`.
        batch, weight, ignore_index, classes, validate, method, bins, chunk_elements: as in
            :class:`LovaszSoftmaxLoss`; they configure the Lovász term (``weight`` weighs its
            class mean; the ignore label applies to both terms).
        distributed, process_group: as in :class:`LovaszSoftmaxLoss`; the cross-entropy stays
            the mean over this process's valid voxels, which DDP averages as usual.
        reduction: ``"mean"`` or ``"sum"`` (CE summed over valid voxels, Lovász over volumes).
        lambda_lovasz: weight of the Lovász term, >= 0.
        lambda_ce: weight of the cross-entropy term, >= 0. ``None`` (default): the recommended
            recipe, :data:`DEFAULT_LOSS_LAMBDA_CE` (0.3) with a softmax over classes (the best of
            the brain-tissue comparison; before version 0.2 the default was 1.0), 1.0 with
            ``sigmoid=True`` (equal weights; not compared).
        ce_weight: optional per-class weights of the cross-entropy, one per input channel (for
            ``sigmoid=True``: the positive-class weight of each channel).
        label_smoothing: label smoothing of the softmax cross-entropy, in [0, 1) (0 with
            ``sigmoid=True``).

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
        ValueError: as :class:`LovaszSoftmaxLoss`, for negative or non-finite lambdas,
            ``reduction="none"``, ``softmax=False`` with no other activation (the input would
            not be logits), ``label_smoothing`` with ``sigmoid=True``, or a NaN, inf, negative
            or all-zero ``ce_weight``.
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
        lambda_ce: float | None = None,
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
        if lambda_ce is None:
            lambda_ce = 1.0 if sigmoid else DEFAULT_LOSS_LAMBDA_CE
        if not all(math.isfinite(w) and w >= 0 for w in (lambda_lovasz, lambda_ce)):
            raise ValueError(
                "lambda_lovasz and lambda_ce must be finite and >= 0, "
                f"got {lambda_lovasz} and {lambda_ce}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if sigmoid and label_smoothing:
            raise ValueError(
                "label_smoothing applies to the softmax cross-entropy, not to sigmoid=True"
            )
        super().__init__(reduction=LossReduction(reduction).value)
        self.lovasz = LovaszSoftmaxLoss(
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
        self.register_buffer("ce_weight", checked_ce_weight(ce_weight))
        self.lambda_lovasz = float(lambda_lovasz)
        self.lambda_ce = float(lambda_ce)
        self.label_smoothing = float(label_smoothing)

    def __getattr__(self, name: str):
        if name in _LOVASZ_ATTRIBUTES and "lovasz" in self.__dict__.get("_modules", {}):
            return getattr(self._modules["lovasz"], name)
        return super().__getattr__(name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        for former, current in _FORMER_KEYS.items():
            if prefix + former in state_dict:
                state_dict[prefix + current] = state_dict.pop(prefix + former)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
            inputs = self.lovasz.prepare(
                input,
                target,
                mask,
                check=lambda x: check_ce_weight_fits(self.ce_weight, x.shape[1], self.validate),
            )
            logits = inputs.input
            if self.sigmoid:
                ce_target = inputs.fg
            elif inputs.labels is not None:
                ce_target = inputs.labels[:, 0]
            else:
                ce_target = inputs.fg.to(torch.uint8).argmax(dim=1)
            ce_weight = None if self.ce_weight is None else self.ce_weight.to(logits)
            probabilities = None
            if self.softmax and self.lambda_lovasz:
                # one normalisation of the logits for both terms instead of a softmax and a
                # log-softmax (a small gain on the CPU: benchmarks/RESULTS.md)
                log_probs = torch.log_softmax(logits, dim=1)
                probabilities = log_probs.exp()
                ce = masked_nll_loss(
                    log_probs,
                    ce_target,
                    inputs.valid,
                    weight=ce_weight,
                    label_smoothing=self.label_smoothing,
                    reduction=self.reduction,
                )
            else:
                ce = masked_cross_entropy(
                    logits,
                    ce_target,
                    inputs.valid,
                    sigmoid=self.sigmoid,
                    weight=ce_weight,
                    label_smoothing=self.label_smoothing,
                    reduction=self.reduction,
                )
            if not self.lambda_lovasz:  # a masked cross-entropy: no sort for a zero weight
                return self.lambda_ce * ce
            lovasz = self.lovasz.compute(inputs, probabilities)
            return self.lambda_lovasz * lovasz + self.lambda_ce * ce


def default_loss(sigmoid: bool = False, **kwargs) -> LovaszCELoss:
    """The loss this package recommends, and trains with when none is given.

    Label maps (softmax over classes): ``LovaszCELoss(to_onehot_y=True)``, Lovász-Softmax +
    :data:`DEFAULT_LOSS_LAMBDA_CE` (0.3) cross-entropy. Multi-label targets (``sigmoid``, e.g.
    BraTS or nnU-Net regions): ``LovaszCELoss(sigmoid=True)``, the Lovász-sigmoid loss + binary
    cross-entropy with equal weights. Both are :class:`LovaszCELoss`'s defaults.

    Args:
        sigmoid: multi-label (one sigmoid per channel, a ``(B, C, *spatial)`` multi-hot target)
            instead of a label map.
        kwargs: further :class:`LovaszCELoss` arguments, e.g. ``ignore_index``.

    Example:
        >>> loss = default_loss(ignore_index=255)
        >>> loss.to_onehot_y, loss.lambda_ce, loss.ignore_index
        (True, 0.3, 255)
        >>> default_loss(sigmoid=True).lambda_ce
        1.0

    Raises:
        ValueError: as :class:`LovaszCELoss`.
    """
    return LovaszCELoss(to_onehot_y=not sigmoid, sigmoid=sigmoid, **kwargs)


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
        lambda_ce: weight of the cross-entropy term, >= 0 (MONAI's default, 1.0).
        ce_weight: optional per-class weights of the cross-entropy, one per input channel (the
            mean is then weighted as ``F.cross_entropy(weight=...)`` weighs it).
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
        ValueError: negative or non-finite lambdas, a NaN, inf, negative or all-zero
            ``ce_weight``; in ``forward``, a single input channel, shapes that do not fit, a
            ``ce_weight`` count other than the channels, tensors without voxels, and
            (``validate``) the bad values listed above.
        TypeError: ``input``, ``target`` or ``mask`` is not a tensor, or ``input`` is not
            floating point.
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        *,
        ce_weight: Sequence[float] | Tensor | None = None,
        ignore_index: int | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if not all(math.isfinite(w) and w >= 0 for w in (lambda_dice, lambda_ce)):
            raise ValueError(
                "lambda_dice and lambda_ce must be finite and >= 0, "
                f"got {lambda_dice} and {lambda_ce}"
            )
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.ignore_index = functional.check_ignore_index(ignore_index)
        self.validate = validate
        self.dice = MaskedDiceLoss(softmax=True)
        self.register_buffer("ce_weight", checked_ce_weight(ce_weight))

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
        check_ce_weight_fits(self.ce_weight, input.shape[1], self.validate)
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
            weight = None if self.ce_weight is None else self.ce_weight.to(logits)
            ce = masked_cross_entropy(logits, labels[:, 0], valid, weight=weight)
            return self.lambda_dice * dice + self.lambda_ce * ce


class WeightedSumLoss(nn.Module):
    """``sum_i weights[i] * terms[i](input, target, mask=mask)``: losses of the same logits and
    target added up, such as the three-term Dice + CE + Lovász.

    Each term gets the same arguments, so each must take ``(input, target, mask=None)`` (all the
    losses of this package do; wrap a loss that does not take a mask before adding it).

    Args:
        terms: the losses, at least one.
        weights: one weight >= 0 per term (default 1 each), not all 0.

    Shapes:
        As the terms: ``input`` ``(B, C, *spatial)``, ``target`` a label map or one-hot, ``mask``
        optional ``(B, 1, *spatial)``.

    Example:
        >>> from lovasz_monai.losses import LovaszSoftmaxLoss
        >>> dice_ce_lovasz = WeightedSumLoss(
        ...     [MaskedDiceCELoss(), LovaszSoftmaxLoss(to_onehot_y=True)], weights=[1.0, 0.5]
        ... )
        >>> logits = torch.randn(2, 3, 8, 8, 8)
        >>> labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
        >>> terms = [term(logits, labels) for term in dice_ce_lovasz.terms]
        >>> torch.allclose(dice_ce_lovasz(logits, labels), terms[0] + 0.5 * terms[1])
        True

    Raises:
        ValueError: no terms, a weight count that differs from the term count, a negative or
            non-finite weight, or all weights 0.
        TypeError: a term that is not an ``nn.Module`` or whose ``forward`` takes no ``mask``.
    """

    def __init__(self, terms: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        terms = list(terms)
        if not terms:
            raise ValueError("terms must hold at least one loss, got none")
        for term in terms:
            if not isinstance(term, nn.Module):
                raise TypeError(f"each term must be an nn.Module, got {type(term).__name__}")
            if not accepts_mask(term):
                raise TypeError(
                    f"{type(term).__name__}.forward takes no mask: every term must accept "
                    "(input, target, mask=None)"
                )
        weights = [1.0] * len(terms) if weights is None else [float(w) for w in weights]
        if len(weights) != len(terms):
            raise ValueError(f"got {len(weights)} weights for {len(terms)} terms")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
        self.terms = nn.ModuleList(terms)
        self.weights = weights

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` logits.
            target: a label map or one-hot target, as each term takes it.
            mask: optional ``(B, 1, *spatial)``, bool or 0/1: 1 where the voxel counts.

        Returns:
            The weighted sum of the terms (a scalar for scalar terms).

        Raises:
            ValueError, TypeError: those of the terms.
        """
        total = None
        for weight, term in zip(self.weights, self.terms, strict=True):
            if weight:
                value = weight * term(input, target, mask=mask)
                total = value if total is None else total + value
        return total
