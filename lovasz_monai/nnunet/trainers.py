"""``nnUNetTrainer`` subclasses that train with the Lovász losses.

Each trainer overrides only ``_build_loss`` (and, for the short variants, the run length in
``__init__``): nnU-Net's network, data augmentation, optimiser, schedule, validation and
prediction stay as they are. The loss follows nnU-Net's label handling (``LabelManager``):

- label maps: the ``(B, 1, *spatial)`` integer target, whose ignore label (if the dataset has
  one) is excluded from both loss terms: :class:`~lovasz_monai.losses.LovaszCELoss` with
  ``to_onehot_y=True, ignore_index=label_manager.ignore_label``, softmax over the
  ``num_segmentation_heads`` outputs;
- regions (``has_regions``): the Lovász-sigmoid loss per region on nnU-Net's multi-hot target,
  whose last channel, when the dataset has an ignore label, is the ignore mask
  (:class:`IgnoreChannelLoss`);
- deep supervision: nnU-Net's own ``DeepSupervisionWrapper`` and weights (1/2^i, the lowest
  resolution 0, normalised), as ``nnUNetTrainer._build_loss`` makes them; only the loss inside
  it is ours.
"""

from __future__ import annotations

import math
import warnings

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import Tensor, nn

from lovasz_monai.dataset import lateralised_labels
from lovasz_monai.losses import LovaszCELoss, LovaszSoftmaxLoss, default_loss

__all__ = [
    "TRAINERS",
    "IgnoreChannelLoss",
    "describe_loss",
    "lovasz_loss_for",
    "nnUNetTrainerLovasz",
    "nnUNetTrainerLovaszCE",
    "nnUNetTrainerLovaszCEBatch",
    "nnUNetTrainerLovaszCEBatch_noMirroring",
    "nnUNetTrainerLovaszCE_5epochs",
    "nnUNetTrainerLovaszCE_noMirroring",
    "nnUNetTrainerLovaszCE_tiny",
    "nnUNetTrainerLovasz_5epochs",
    "nnUNetTrainerLovasz_noMirroring",
    "nnUNetTrainerLovasz_tiny",
]


class IgnoreChannelLoss(nn.Module):
    """A masked loss called on nnU-Net's region target with an ignore channel.

    nnU-Net gives region datasets with an ignore label a multi-hot target with one more channel
    than the network has outputs: channels ``0..R-1`` are the regions, channel ``R`` is 1 where
    the voxel is ignored. This module passes ``target[:, :-1]`` as the target and the complement
    of the last channel as the ``mask`` (1 where the voxel counts), without changing ``target``.

    Args:
        loss: a loss whose ``forward(input, target, mask)`` takes a ``(B, 1, *spatial)`` mask,
            such as ``LovaszCELoss(sigmoid=True)``.

    Shapes:
        input: ``(B, R, *spatial)`` logits; target: ``(B, R + 1, *spatial)``, bool or 0/1.

    Example:
        >>> import torch
        >>> from lovasz_monai.losses import LovaszSoftmaxLoss
        >>> loss = IgnoreChannelLoss(LovaszSoftmaxLoss(sigmoid=True))
        >>> logits = torch.randn(2, 3, 8, 8, 8)
        >>> target = torch.rand(2, 4, 8, 8, 8) > 0.5
        >>> bool(loss(logits, target) == LovaszSoftmaxLoss(sigmoid=True)(
        ...     logits, target[:, :3], ~target[:, 3:]))
        True

    Raises:
        ValueError: ``target`` does not have one channel more than ``input``.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if target.ndim != input.ndim or target.shape[1] != input.shape[1] + 1:
            raise ValueError(
                "a region target with an ignore channel has one channel more than the network "
                f"has outputs, got target {tuple(target.shape)} for input {tuple(input.shape)}"
            )
        ignored = target[:, -1:]
        mask = ~ignored if ignored.dtype == torch.bool else 1 - ignored
        return self.loss(input, target[:, :-1], mask)


def lovasz_loss_for(
    label_manager: LabelManager, lambda_ce: float | None = None, batch: bool = False
) -> nn.Module:
    """The Lovász loss of one output for a dataset's nnU-Net label handling.

    Args:
        label_manager: the trainer's ``LabelManager`` (regions or labels, ignore label).
        lambda_ce: weight of the cross-entropy term (binary cross-entropy for regions); 0 gives
            the Lovász loss alone; ``None`` the package's default recipe,
            :func:`~lovasz_monai.losses.default_loss` (0.3 for labels, 1 for regions), as the
            Lightning module trains by default.
        batch: one Lovász row per class over the whole batch (``batch=True`` of the losses)
            instead of one per volume and class.

    Returns:
        A module called as ``loss(output, target)`` on nnU-Net's output and target of one
        resolution: :class:`~lovasz_monai.losses.LovaszCELoss` (or
        :class:`~lovasz_monai.losses.LovaszSoftmaxLoss` when ``lambda_ce`` is 0), softmax over
        labels with the ignore label as ``ignore_index``, or sigmoid per region, wrapped in
        :class:`IgnoreChannelLoss` when regions have an ignore channel; with
        ``validate=False``: nnU-Net's transforms make the target, and a NaN or inf output gives
        a NaN loss, as nnU-Net's Dice+CE does, whose step the GradScaler skips.

    Example:
        >>> from nnunetv2.utilities.label_handling.label_handling import LabelManager
        >>> names = {"background": 0, "tumour": 1, "ignore": 2}
        >>> loss = lovasz_loss_for(LabelManager(names, regions_class_order=None))
        >>> type(loss).__name__, loss.ignore_index, loss.lambda_ce
        ('LovaszCELoss', 2, 0.3)

    Raises:
        ValueError: ``lambda_ce`` is negative.
    """
    regions = label_manager.has_regions
    # nnU-Net's transforms fix the target's form, so the value checks (one host synchronisation
    # each on a GPU) add nothing; and with fp16 autocast a non-finite output must reach the
    # GradScaler, which skips that step, instead of stopping the run with an error
    settings = {"validate": False, "batch": bool(batch)}
    if not regions:
        settings["ignore_index"] = label_manager.ignore_label
    if lambda_ce is None:
        loss = default_loss(sigmoid=regions, **settings)
    elif not (math.isfinite(lambda_ce) and lambda_ce >= 0):
        raise ValueError(f"lambda_ce must be finite and >= 0, got {lambda_ce}")
    else:
        settings.update({"sigmoid": True} if regions else {"to_onehot_y": True})
        if lambda_ce > 0:
            loss = LovaszCELoss(**settings, lambda_ce=lambda_ce)
        else:
            loss = LovaszSoftmaxLoss(**settings)
    if regions and label_manager.has_ignore_label:
        return IgnoreChannelLoss(loss)
    return loss


def describe_loss(loss: nn.Module) -> str:
    """One line naming a loss of :func:`lovasz_loss_for` and its settings, for nnU-Net's log.

    Example:
        >>> print(describe_loss(LovaszCELoss(to_onehot_y=True, lambda_ce=0.3, ignore_index=3)))
        LovaszCELoss(softmax, lambda_ce=0.3, ignore_index=3, classes=present, per volume)
    """
    inner = loss.loss if isinstance(loss, IgnoreChannelLoss) else loss
    parts = ["sigmoid" if inner.sigmoid else "softmax"]
    if isinstance(inner, LovaszCELoss):
        parts.append(f"lambda_ce={inner.lambda_ce:g}")
    if inner.ignore_index is not None:
        parts.append(f"ignore_index={inner.ignore_index}")
    if isinstance(loss, IgnoreChannelLoss):
        parts.append("last target channel = ignore mask")
    parts += [f"classes={inner.classes}", "whole batch" if inner.batch else "per volume"]
    return f"{type(inner).__name__}({', '.join(parts)})"


class nnUNetTrainerLovaszCE(nnUNetTrainer):
    """nnU-Net's trainer with the Lovász-Softmax loss + cross-entropy.

    The loss is :func:`~lovasz_monai.losses.default_loss`, the recipe the Lightning module
    trains with by default: for labels Lovász-Softmax + 0.3 CE (ignore label excluded), for
    regions the Lovász-sigmoid loss + binary cross-entropy (ignore channel as the mask). nnU-Net
    logs the loss it built. Everything else is nnU-Net's.

    Example:
        ``lovasz-nnunet-train 4 3d_fullres 0 -tr nnUNetTrainerLovaszCE``
    """

    #: the weight of the cross-entropy term; 0 gives the Lovász loss alone, None the default
    lambda_ce: float | None = None
    #: one Lovász row per class over nnU-Net's batch instead of one per volume
    batch: bool = False
    #: whether nnU-Net mirrors in training and at test time (``False`` for left/right labels)
    mirroring: bool = True

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self) -> tuple:
        """nnU-Net's augmentation settings; without :attr:`mirroring` no mirror axes in training
        and none at test time (as nnU-Net's ``nnUNetTrainerNoMirroring``). With mirroring, warns
        when label names say left or right: nnU-Net mirrors every axis, the left-right one
        included, and a mirrored left structure stays labelled left."""
        rotation, dummy_2d, patch_size, mirror_axes = (
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        if not self.mirroring:
            mirror_axes = self.inference_allowed_mirroring_axes = None
        elif mirror_axes and (sided := lateralised_labels(list(self.dataset_json["labels"]))):
            # the nearest trainer of this module with a no-mirroring twin: the same loss
            unmirrored = next(
                twin
                for cls in type(self).__mro__
                if (twin := f"{cls.__name__}_noMirroring") in globals()
            )
            message = (
                f"nnU-Net mirrors axes {tuple(mirror_axes)} in training and at test time, but "
                f"labels say left or right ({', '.join(sided[:4])}"
                f"{', ...' if len(sided) > 4 else ''}): a mirrored left structure stays "
                f"labelled left, so these classes cannot be learned. Train with "
                f"{unmirrored}."
            )
            warnings.warn(message, stacklevel=2)
            self.print_to_log_file(f"WARNING: {message}")
        return rotation, dummy_2d, patch_size, mirror_axes

    def _build_loss(self) -> nn.Module:
        # nnU-Net's own construction fixes the deep-supervision wrapper and its weights
        # (including the DDP special case); only the loss inside it is replaced
        loss = super()._build_loss()
        ours = lovasz_loss_for(self.label_manager, self.lambda_ce, self.batch)
        self.print_to_log_file(f"Lovász loss (lovasz_monai): {describe_loss(ours)}")
        if isinstance(loss, DeepSupervisionWrapper):
            loss.loss = ours
            return loss
        return ours


class nnUNetTrainerLovasz(nnUNetTrainerLovaszCE):
    """nnU-Net's trainer with the Lovász-Softmax loss alone (Lovász-sigmoid for regions)."""

    lambda_ce = 0.0


class nnUNetTrainerLovaszCEBatch(nnUNetTrainerLovaszCE):
    """:class:`nnUNetTrainerLovaszCE` with one Lovász row per class over the whole batch
    (``batch=True``): a class absent from one patch of the batch but present in another is
    still a row there, so its false positives in the first are penalised. The best recipe of
    the subcortical comparison in our own pipeline (``docs/guides/which_loss.md``); not
    compared inside nnU-Net."""

    batch = True


class nnUNetTrainerLovaszCEBatch_noMirroring(nnUNetTrainerLovaszCEBatch):
    """:class:`nnUNetTrainerLovaszCEBatch` without mirroring, in training and at test time."""

    mirroring = False


class nnUNetTrainerLovaszCE_noMirroring(nnUNetTrainerLovaszCE):
    """:class:`nnUNetTrainerLovaszCE` without mirroring, in training and at test time: for
    labels that say left or right (left/right caudate, kidneys, adrenal glands)."""

    mirroring = False


class nnUNetTrainerLovasz_noMirroring(nnUNetTrainerLovasz):
    """:class:`nnUNetTrainerLovasz` without mirroring, in training and at test time."""

    mirroring = False


class _ShortRun:
    """A shorter run than nnU-Net's 1000 epochs of 250 iterations (set by the subclasses)."""

    run_epochs: int = 1000
    run_iterations: int = 250
    run_val_iterations: int = 50

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008  (nnU-Net's signature)
    ) -> None:
        # nnU-Net saves these arguments (read from this signature) to re-create the trainer
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.run_epochs
        self.num_iterations_per_epoch = self.run_iterations
        self.num_val_iterations_per_epoch = self.run_val_iterations


class _FiveEpochs(_ShortRun):
    """Five epochs of nnU-Net's usual length: a quick look at a dataset or a plan."""

    run_epochs = 5


class _Tiny(_ShortRun):
    """Two epochs of 3 training iterations and 1 validation iteration: tests and smoke runs."""

    run_epochs, run_iterations, run_val_iterations = 2, 3, 1


class nnUNetTrainerLovaszCE_5epochs(_FiveEpochs, nnUNetTrainerLovaszCE):
    """:class:`nnUNetTrainerLovaszCE` for 5 epochs."""


class nnUNetTrainerLovaszCE_tiny(_Tiny, nnUNetTrainerLovaszCE):
    """:class:`nnUNetTrainerLovaszCE` for 2 epochs of 3 iterations."""


class nnUNetTrainerLovasz_5epochs(_FiveEpochs, nnUNetTrainerLovasz):
    """:class:`nnUNetTrainerLovasz` for 5 epochs."""


class nnUNetTrainerLovasz_tiny(_Tiny, nnUNetTrainerLovasz):
    """:class:`nnUNetTrainerLovasz` for 2 epochs of 3 iterations."""


#: every trainer of this module, in the order of the nnU-Net guide's table
TRAINERS = (
    nnUNetTrainerLovaszCE,
    nnUNetTrainerLovasz,
    nnUNetTrainerLovaszCE_5epochs,
    nnUNetTrainerLovasz_5epochs,
    nnUNetTrainerLovaszCE_tiny,
    nnUNetTrainerLovasz_tiny,
    nnUNetTrainerLovaszCE_noMirroring,
    nnUNetTrainerLovasz_noMirroring,
    nnUNetTrainerLovaszCEBatch,
    nnUNetTrainerLovaszCEBatch_noMirroring,
)
