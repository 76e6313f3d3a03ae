"""LightningModule template for 3D segmentation with the Lovász losses.

:class:`LovaszSegmentationModule` composes a network (default: a MONAI ``UNet``), a loss (default:
:class:`~lovasz_monai.losses.LovaszCELoss`), an optional cross-entropy -> Lovász schedule,
MONAI ``sliding_window_inference`` on whole volumes, and torchmetrics IoU (synchronised across
DDP processes). It expects the batches of :class:`~lovasz_monai.data.SegmentationDataModule`:
dicts with ``"image"`` ``(B, C_in, *S)``, ``"label"`` ``(B, 1, *S)`` label map (or ``(B, R, *S)``
binary regions in multi-label mode) and ``"mask"`` ``(B, 1, *S)``, 1 where the voxel counts.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from monai.utils import convert_to_tensor
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex, MultilabelJaccardIndex

from lovasz_monai.deep_supervision import (
    deep_supervision_loss,
    head_weights,
    split_heads,
)
from lovasz_monai.losses import default_loss
from lovasz_monai.losses.base import accepts_mask
from lovasz_monai.metrics import CaseMetrics, batch_cases, counted_classes

__all__ = ["LovaszSegmentationModule", "modules_from_config"]

_MODULES_FROM_CONFIG: ContextVar[bool] = ContextVar("lovasz_modules_from_config", default=False)


@contextmanager
def modules_from_config() -> Iterator[None]:
    """Within this context the module keeps ``network``/``loss``/``warmup_loss`` in its hparams.

    :class:`~lovasz_monai.cli.LovaszCLI` instantiates its classes inside it: LightningCLI then
    gives ``save_hyperparameters`` the parsed config, where these arguments are ``class_path``
    dicts, so a checkpoint can rebuild a custom network or loss. Outside it, a module passed as
    a Python object is left out of the hparams (its weights are in the ``state_dict``).

    Example:
        >>> with modules_from_config():
        ...     _MODULES_FROM_CONFIG.get()
        True
    """
    token = _MODULES_FROM_CONFIG.set(True)
    try:
        yield
    finally:
        _MODULES_FROM_CONFIG.reset(token)


#: target value given to masked (ignored) voxels for the torchmetrics IoU
METRIC_IGNORE = -1
#: file name of the per-case test metrics, written in ``trainer.log_dir``
CASES_CSV = "test_cases.csv"


class LovaszSegmentationModule(pl.LightningModule):
    """3D segmentation with a Lovász loss, sliding-window evaluation and IoU metrics.

    Three output modes, chosen from ``multi_label`` and the number of network outputs:

    * multi-class (default): ``out_channels == num_classes`` softmax channels; prediction =
      argmax; ``label`` is a ``(B, 1, *S)`` label map.
    * binary with one output channel: ``num_classes == 2``, ``out_channels == 1`` (e.g. with
      :class:`~lovasz_monai.losses.LovaszHingeLoss`); prediction = ``sigmoid(logit) > 0.5``
      (logit > 0); label and metrics are the 2-class label map (background, foreground).
    * multi-label (``multi_label=True``): ``num_classes`` independent sigmoid channels
      (overlapping regions, e.g. BraTS TC/WT/ET); prediction = ``sigmoid > 0.5`` per channel;
      ``label`` is ``(B, R, *S)`` binary.

    **Loss and mask.** The loss is called as ``loss(logits, label, mask=mask)`` when its
    ``forward`` has a ``mask`` argument (checked once here), so ignored voxels (ignore label,
    outside a region-of-interest mask, padding) take part in nothing. ``torch.nn.CrossEntropyLoss``
    gets the label map without its channel axis, with ignored voxels set to its ``ignore_index``.
    Any other loss (e.g. ``monai.losses.DiceCELoss``) is called as ``loss(logits, label)``: it
    sees the ignored voxels as labelled background (the datamodule writes 0 there). Logits are
    cast to float32 before the loss, so losses run in float32 under ``bf16-mixed``/``16-mixed``.

    **Deep supervision.** A network may return several heads in training: MONAI
    ``DynUNet(..., deep_supervision=True)``'s stacked ``(B, heads, C, *S)`` tensor, or a
    list/tuple of ``(B, C, *S_l)`` tensors at decreasing resolution (full resolution first). Each
    head gets the training objective against the label and the mask resized to its size by
    nearest-neighbour interpolation, and the heads are summed with the weights of
    ``monai.losses.DeepSupervisionLoss`` (``deep_supervision_weight_mode``, or explicit
    ``deep_supervision_weights``); see :mod:`lovasz_monai.deep_supervision`. Validation,
    test and prediction use the full-resolution head only.

    **CE -> Lovász schedule** (the paper's recipe: train with cross-entropy, then fine-tune with
    Lovász). With a ``warmup_loss`` the training objective at epoch ``e`` is
    ``w * loss + (1 - w) * warmup_loss`` with ``w = lovasz_weight(e)``: 0 for
    ``e < warmup_epochs``, then ``(e - warmup_epochs + 1) / (ramp_epochs + 1)`` capped at 1, i.e.
    ``ramp_epochs`` epochs with a linear mix, then the Lovász loss alone (``ramp_epochs=0``: a
    hard switch). ``w`` is logged as ``train/lovasz_weight``. Validation always reports ``loss``.
    ``finetune_lr_scale`` multiplies every learning rate once, at the first epoch with
    ``w > 0`` (a learning-rate scheduler then continues from the scaled rates).

    **Metrics.** IoU per class with torchmetrics (``MulticlassJaccardIndex`` /
    ``MultilabelJaccardIndex``, ``average="none"``), accumulated over the whole epoch (a
    dataset-level confusion matrix, synchronised across DDP processes) and computed on voxels
    with ``mask == 1`` only. Logged per epoch: ``val/mIoU``, ``val/IoU/<class name>``,
    ``val/loss`` (and ``test/...``), ``train/loss`` (epoch mean), ``train/loss_step``.
    A class that is neither in the labels nor predicted has an undefined IoU (logged as NaN) and
    is left out of the mean. ``metric_include_background=False`` (default) leaves class 0
    (background) out of ``mIoU`` in the multi-class and binary modes; its IoU is still logged.
    Multi-label regions have no background channel: every region enters the mean.

    **Per-case metrics** (:mod:`lovasz_monai.metrics`, MONAI's metrics): the Dice of each case
    and class (ignored voxels left out), averaged over cases, the convention of medical
    challenges: ``val/Dice/<class name>`` and ``val/mDice`` (same class rule as ``mIoU``; and
    ``test/...``). A class absent from both the prediction and the label of a case is NaN there
    and left out of the means. The cases of all DDP processes are gathered first. With
    ``surface_metrics``, ``test`` also logs the 95th-percentile Hausdorff distance and the
    average symmetric surface distance in mm (voxel size from the image's affine), on the
    masked prediction and label: ``test/HD95/<class>``, ``test/mHD95``, ``test/ASD/<class>``,
    ``test/mASD``. ``test`` writes each case's values (Dice, IoU, HD95, ASD) to
    ``test_cases.csv`` in ``trainer.log_dir`` (the CSVLogger's ``version_N`` folder, next to
    ``metrics.csv``; ``default_root_dir`` without a logger), on rank 0.

    **Optimizer.** Under :class:`~lovasz_monai.cli.LovaszCLI` the ``optimizer`` /
    ``lr_scheduler`` sections configure it; without them (or outside the CLI)
    :meth:`configure_optimizers` uses ``AdamW(lr=1e-3, weight_decay=1e-5)``.

    Args:
        num_classes: output classes: label values including background (multi-class/binary),
            or regions (multi-label). Linked from the datamodule by the CLI.
        network: any ``nn.Module`` mapping ``(B, in_channels, *S)`` to ``(B, out_channels, *S)``
            logits, or to several heads in training (deep supervision, see above); ``None``
            builds a MONAI ``UNet(spatial_dims=3, in_channels, out_channels,
            channels=unet_channels, strides=unet_strides, num_res_units=unet_num_res_units)``.
        loss: training/validation loss taking ``(logits, label[, mask])``; ``None``:
            :func:`~lovasz_monai.losses.default_loss`, ``LovaszCELoss(to_onehot_y=True,
            lambda_ce=0.3)`` (multi-class: the best recipe of the real-anatomy comparison in the
            README) or ``LovaszCELoss(sigmoid=True)`` (multi-label and 1-channel binary).
        in_channels: image channels (modalities).
        class_names: one name per class/region, used in the logged metric names; ``None``:
            ``class_0, class_1, ...``.
        multi_label: independent sigmoid channels (overlapping regions).
        out_channels: network outputs; ``None`` = ``num_classes``. 1 with ``num_classes=2``
            selects the binary one-channel mode.
        unet_channels, unet_strides, unet_num_res_units: the default UNet's configuration.
        roi_size: sliding-window size ``(X, Y, Z)`` (linked from ``data.roi_size`` by the CLI).
        sw_batch_size: windows per network call in sliding-window inference.
        overlap: sliding-window overlap in [0, 1).
        sw_mode: window blending, ``"gaussian"`` or ``"constant"``.
        warmup_loss: loss of the warm-up phase, e.g. ``torch.nn.CrossEntropyLoss`` or
            ``LovaszCELoss(to_onehot_y=True, lambda_lovasz=0)`` (a masked cross-entropy);
            ``None``: no schedule.
        warmup_epochs: epochs trained with ``warmup_loss`` only.
        ramp_epochs: epochs of linear mixing after the warm-up (0 = hard switch).
        finetune_lr_scale: factor applied to the learning rates when the Lovász phase starts
            (with a ``warmup_loss`` only), > 0.
        deep_supervision_weight_mode: head weights, as ``DeepSupervisionLoss``'s ``weight_mode``:
            ``"exp"`` (1, 0.5, 0.25, ...), ``"same"`` or ``"two"`` (1, 0.5, 0.5, ...).
        deep_supervision_weights: explicit head weights (full resolution first), at least one
            per head; they replace ``deep_supervision_weight_mode``.
        metric_include_background: include class 0 in ``mIoU`` (multi-class/binary modes).
        surface_metrics: also compute HD95 and ASD per case in ``test`` (slow on a CPU). Not
            saved in the checkpoint's hyperparameters: give it when testing.

    Attributes:
        network, loss, warmup_loss: the modules in use.
        mode: ``"multiclass"``, ``"binary"`` (one output channel) or ``"multilabel"``, set once
            from ``multi_label``, ``num_classes`` and ``out_channels``; the read-only properties
            ``multi_label``, ``binary`` and ``sigmoid_outputs`` derive from it.
        val_iou, test_iou: the torchmetrics IoU metrics (per class, ``average="none"``).
        val_cases, test_cases: the per-case metrics (:class:`~lovasz_monai.metrics.CaseMetrics`).

    Shapes:
        forward: ``(B, in_channels, *S)`` -> ``(B, out_channels, *S)`` logits.
        predict_step: returns ``(B, 1, *S)`` uint8 label maps, or ``(B, R, *S)`` uint8 0/1 in
        multi-label mode, on the CPU.

    Raises:
        ValueError: invalid sizes or counts (``num_classes < 1``, ``out_channels`` other than
            ``num_classes`` or the binary 1, ``class_names`` of the wrong length, negative
            epochs, ``warmup_epochs > 0`` without ``warmup_loss``, overlap outside [0, 1), an
            unknown ``deep_supervision_weight_mode``); in the steps: a batch whose image
            channels or network outputs do not match, a first output head that is not at the
            image's resolution, fewer ``deep_supervision_weights`` than heads.
        TypeError: a network output that is not a tensor or a list/tuple of tensors.

    Example:
        >>> import torch
        >>> from monai.networks.nets import UNet
        >>> net = UNet(3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,))
        >>> model = LovaszSegmentationModule(num_classes=3, network=net, roi_size=(16, 16, 16))
        >>> batch = {
        ...     "image": torch.randn(2, 1, 16, 16, 16),
        ...     "label": torch.randint(0, 3, (2, 1, 16, 16, 16)).float(),
        ...     "mask": torch.ones(2, 1, 16, 16, 16),
        ... }
        >>> loss = model.training_step(batch, 0)
        >>> bool(torch.isfinite(loss))
        True
        >>> model.predict_step({"image": batch["image"]}, 0).shape
        torch.Size([2, 1, 16, 16, 16])
    """

    def __init__(
        self,
        num_classes: int,
        network: nn.Module | None = None,
        loss: nn.Module | None = None,
        in_channels: int = 1,
        class_names: list[str] | None = None,
        multi_label: bool = False,
        out_channels: int | None = None,
        unet_channels: Sequence[int] = (16, 32, 64, 128),
        unet_strides: Sequence[int] = (2, 2, 2),
        unet_num_res_units: int = 2,
        roi_size: Sequence[int] = (96, 96, 96),
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        sw_mode: Literal["gaussian", "constant"] = "gaussian",
        warmup_loss: nn.Module | None = None,
        warmup_epochs: int = 0,
        ramp_epochs: int = 0,
        finetune_lr_scale: float = 1.0,
        deep_supervision_weight_mode: Literal["exp", "same", "two"] = "exp",
        deep_supervision_weights: list[float] | None = None,
        metric_include_background: bool = False,
        surface_metrics: bool = False,
    ) -> None:
        super().__init__()
        self._save_hparams(network=network, loss=loss, warmup_loss=warmup_loss)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        out_channels = num_classes if out_channels is None else int(out_channels)
        binary = out_channels == 1 and num_classes == 2 and not multi_label
        if out_channels != num_classes and not binary:
            raise ValueError(
                f"out_channels must equal num_classes ({num_classes}), or be 1 for a binary "
                f"problem (num_classes=2, multi_label=False); got out_channels={out_channels}"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names must have num_classes={num_classes} names, got {list(class_names)}"
            )
        if warmup_epochs < 0 or ramp_epochs < 0:
            raise ValueError(
                f"warmup_epochs and ramp_epochs must be >= 0, got {warmup_epochs}, {ramp_epochs}"
            )
        if warmup_loss is None and (warmup_epochs > 0 or ramp_epochs > 0):
            raise ValueError(
                "warmup_epochs/ramp_epochs > 0 need a warmup_loss (e.g. torch.nn.CrossEntropyLoss)"
            )
        if finetune_lr_scale <= 0:
            raise ValueError(f"finetune_lr_scale must be > 0, got {finetune_lr_scale}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        head_weights(1, deep_supervision_weight_mode)  # validates the mode

        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.out_channels = out_channels
        #: "multiclass" (softmax), "binary" (one logit) or "multilabel" (independent sigmoids)
        self.mode: Literal["multiclass", "binary", "multilabel"] = (
            "multilabel" if multi_label else "binary" if binary else "multiclass"
        )
        self.class_names = (
            [f"class_{i}" for i in range(num_classes)]
            if class_names is None
            else [str(n) for n in class_names]
        )
        self.roi_size = tuple(int(s) for s in roi_size)
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        self.sw_mode = sw_mode
        self.warmup_epochs = int(warmup_epochs)
        self.ramp_epochs = int(ramp_epochs)
        self.finetune_lr_scale = float(finetune_lr_scale)
        self.metric_include_background = bool(metric_include_background)
        self.deep_supervision_weight_mode = deep_supervision_weight_mode
        self.deep_supervision_weights = (
            None
            if deep_supervision_weights is None
            else [float(w) for w in deep_supervision_weights]
        )

        if network is None:
            network = UNet(
                spatial_dims=3,
                in_channels=self.in_channels,
                out_channels=out_channels,
                channels=tuple(unet_channels),
                strides=tuple(unet_strides),
                num_res_units=unet_num_res_units,
            )
        if loss is None:
            loss = default_loss(sigmoid=self.sigmoid_outputs)
        self.network = network
        self.loss = loss
        self.warmup_loss = warmup_loss
        self._loss_mask = accepts_mask(loss)
        self._warmup_mask = warmup_loss is not None and accepts_mask(warmup_loss)

        self.val_iou = self._make_metric()
        self.test_iou = self._make_metric()
        # an evaluation switch, not saved: LightningCLI would let a checkpoint's value override
        # `test --ckpt_path ... --model.surface_metrics true`
        self.hparams.pop("surface_metrics", None)
        self.surface_metrics = bool(surface_metrics)
        cases = dict(
            class_names=self.class_names,
            multi_label=self.multi_label,
            include_background=self.metric_include_background,
        )
        self.val_cases = CaseMetrics(self.num_classes, **cases)
        self.test_cases = CaseMetrics(self.num_classes, surface=self.surface_metrics, **cases)

    @property
    def multi_label(self) -> bool:
        """True in the multi-label mode (independent sigmoid channels)."""
        return self.mode == "multilabel"

    @property
    def binary(self) -> bool:
        """True in the one-channel binary mode."""
        return self.mode == "binary"

    @property
    def sigmoid_outputs(self) -> bool:
        """Whether the outputs are sigmoid logits (binary and multi-label modes)."""
        return self.mode != "multiclass"

    # -- construction helpers ---------------------------------------------------------------

    def _save_hparams(self, **modules: nn.Module | None) -> None:
        """Save the init arguments; ``nn.Module`` values only when the CLI gave them as config.

        Under :class:`~lovasz_monai.cli.LovaszCLI` (:func:`modules_from_config`) the
        hyperparameters are the parsed config (``class_path`` dicts), so ``load_from_checkpoint``
        can rebuild a custom network or loss. Objects passed in Python are left out (their
        weights are in the ``state_dict``; pass them again when loading).
        """
        from_config = _MODULES_FROM_CONFIG.get()
        ignore = [] if from_config else [k for k, v in modules.items() if v is not None]
        self.save_hyperparameters(ignore=ignore, frame=inspect.currentframe().f_back)

    def _make_metric(self) -> Metric:
        options = dict(
            average="none", ignore_index=METRIC_IGNORE, validate_args=False, zero_division=math.nan
        )
        if self.multi_label:
            return MultilabelJaccardIndex(num_labels=self.num_classes, **options)
        return MulticlassJaccardIndex(num_classes=self.num_classes, **options)

    # -- core -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Network logits ``(B, out_channels, *S)`` for an image batch ``(B, in_channels, *S)``:
        the full-resolution head of a deep-supervision network."""
        return split_heads(self.network(x), spatial_dims=x.ndim - 2)[0]

    def lovasz_weight(self, epoch: int) -> float:
        """Weight ``w`` of ``loss`` in the training objective at ``epoch`` (1 without warm-up).

        Example:
            >>> m = LovaszSegmentationModule(
            ...     2, warmup_loss=torch.nn.CrossEntropyLoss(), warmup_epochs=2, ramp_epochs=3,
            ...     unet_channels=(4, 8), unet_strides=(2,))
            >>> [round(m.lovasz_weight(e), 2) for e in range(7)]
            [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
        """
        if self.warmup_loss is None:
            return 1.0
        if epoch < self.warmup_epochs:
            return 0.0
        return min(1.0, (epoch - self.warmup_epochs + 1) / (self.ramp_epochs + 1))

    def _check(self, image: Tensor, logits: Tensor | None = None) -> None:
        if image.shape[1] != self.in_channels:
            raise ValueError(
                f"batch image has {image.shape[1]} channels, the model expects "
                f"in_channels={self.in_channels} (image shape {tuple(image.shape)})"
            )
        if logits is not None and logits.shape[1] != self.out_channels:
            raise ValueError(
                f"the network returned {logits.shape[1]} channels, expected "
                f"out_channels={self.out_channels} (logits shape {tuple(logits.shape)})"
            )

    def _call_loss(
        self, fn: nn.Module, takes_mask: bool, logits: Tensor, label: Tensor, mask: Tensor
    ) -> Tensor:
        logits = logits.float()
        if takes_mask:
            return fn(logits, label, mask=mask)
        if isinstance(fn, nn.CrossEntropyLoss) and not self.sigmoid_outputs:
            target = label[:, 0].long().masked_fill(mask[:, 0] == 0, fn.ignore_index)
            return fn(logits, target)
        return fn(logits, label)

    def discretize(self, logits: Tensor) -> Tensor:
        """Predicted classes: ``(B, 1, *S)`` label map (argmax, or ``logit > 0`` for one binary
        channel), or ``(B, R, *S)`` 0/1 regions (``sigmoid > 0.5``) in multi-label mode; int64.
        """
        if self.sigmoid_outputs:
            return (logits > 0).long()  # sigmoid(x) > 0.5  <=>  x > 0
        return logits.argmax(dim=1, keepdim=True)

    def _metric_target(self, label: Tensor, mask: Tensor) -> Tensor:
        """Integer target with masked voxels set to :data:`METRIC_IGNORE`."""
        ignored = mask == 0
        if self.multi_label:
            return label.long().masked_fill(ignored.expand_as(label), METRIC_IGNORE)
        return label[:, 0].long().masked_fill(ignored[:, 0], METRIC_IGNORE)

    def update_metric(self, metric: Metric, logits: Tensor, label: Tensor, mask: Tensor) -> None:
        """Add a batch to an IoU metric: ``logits`` ``(B, C, *S)``, ``label`` and ``mask`` as in
        the batch; voxels with ``mask == 0`` are left out."""
        pred = self.discretize(logits)
        pred = pred if self.multi_label else pred[:, 0]
        metric.update(pred, self._metric_target(label, mask))

    def mean_iou(self, per_class: Tensor) -> Tensor:
        """Mean over the counted classes (background left out unless
        ``metric_include_background`` in the multi-class/binary modes), ignoring NaN (classes
        with an empty union)."""
        counted = counted_classes(
            per_class.numel(), self.multi_label, self.metric_include_background
        )
        return per_class[counted].nanmean()

    def sliding_window(self, image: Tensor) -> Tensor:
        """Logits of whole volumes ``(B, C_in, *S)`` -> ``(B, out_channels, *S)`` float32, by
        ``sliding_window_inference`` with ``roi_size``, ``sw_batch_size``, ``overlap`` and
        ``sw_mode`` blending."""
        image = convert_to_tensor(image, track_meta=False).float()
        self._check(image)
        logits = sliding_window_inference(
            image,
            roi_size=self.roi_size,
            sw_batch_size=self.sw_batch_size,
            predictor=self,
            overlap=self.overlap,
            mode=self.sw_mode,
        )
        logits = convert_to_tensor(logits, track_meta=False).float()
        self._check(image, logits)
        return logits

    # -- Lightning hooks --------------------------------------------------------------------

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Loss on a batch of patches (``image``, ``label``, ``mask``), with the schedule."""
        image, label, mask = (
            convert_to_tensor(batch[key], track_meta=False) for key in ("image", "label", "mask")
        )
        self._check(image)
        heads = split_heads(self.network(image), spatial_dims=image.ndim - 2)
        for head in heads:
            self._check(image, head)
        if heads[0].shape[2:] != image.shape[2:]:
            raise ValueError(
                f"the first output head must have the image's spatial size {tuple(image.shape[2:])}"
                f" (full resolution first), got {tuple(heads[0].shape[2:])}"
            )
        weight = self.lovasz_weight(self.current_epoch)

        def objective(logits: Tensor, label: Tensor, mask: Tensor) -> Tensor:
            loss = logits.new_zeros((), dtype=torch.float32)
            if weight > 0:
                loss = loss + weight * self._call_loss(
                    self.loss, self._loss_mask, logits, label, mask
                )
            if weight < 1:
                assert self.warmup_loss is not None
                warm = self._call_loss(self.warmup_loss, self._warmup_mask, logits, label, mask)
                loss = loss + (1.0 - weight) * warm
            return loss

        if len(heads) == 1:
            loss = objective(heads[0], label, mask)
        else:
            weights = head_weights(
                len(heads), self.deep_supervision_weight_mode, self.deep_supervision_weights
            )
            loss = deep_supervision_loss(heads, label, mask, objective, weights)
        size = image.shape[0]
        if self._trainer is None:  # called outside a Trainer (e.g. a unit test): nothing to log
            return loss
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        if self.warmup_loss is not None:
            self.log("train/lovasz_weight", weight, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _evaluate(
        self, batch: dict[str, Tensor], stage: str, metric: Metric, cases: CaseMetrics
    ) -> Tensor:
        label, mask = (convert_to_tensor(batch[k], track_meta=False) for k in ("label", "mask"))
        logits = self.sliding_window(batch["image"])
        loss = self._call_loss(self.loss, self._loss_mask, logits, label, mask)
        self.update_metric(metric, logits, label, mask)
        sources, spacing = batch_cases(batch["image"])
        cases.update(self.discretize(logits), label, mask, spacing=spacing, sources=sources)
        if self._trainer is None:
            return loss
        self.log(
            f"{stage}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            batch_size=logits.shape[0],
            sync_dist=True,
        )
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Sliding-window logits of whole volumes; updates ``val/`` loss, IoU and Dice."""
        return self._evaluate(batch, "val", self.val_iou, self.val_cases)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """As :meth:`validation_step`, logging under ``test/``."""
        return self._evaluate(batch, "test", self.test_iou, self.test_cases)

    def _log_metrics(self, stage: str, metric: Metric, cases: CaseMetrics) -> None:
        if not metric.update_called:
            return
        per_class = metric.compute()  # synchronised over processes
        metric.reset()
        results = cases.gather()  # the cases of all processes
        cases.reset()
        values = {
            f"{stage}/IoU/{name.replace('/', '_')}": value
            for name, value in zip(self.class_names, per_class, strict=True)
        }
        values.update({f"{stage}/{key}": value for key, value in results.summary().items()})
        # the values are already reduced over processes (identical on every rank): no sync_dist
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            self.log(f"{stage}/mIoU", self.mean_iou(per_class), prog_bar=True, sync_dist=False)
            self.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)
        if stage == "test":
            folder = self.trainer.log_dir or self.trainer.default_root_dir  # a DDP broadcast
            if self.trainer.is_global_zero:
                path = results.write_csv(Path(folder) / CASES_CSV)
                rank_zero_info(f"per-case test metrics of {len(results.cases)} cases: {path}")

    def on_train_epoch_start(self) -> None:
        """Scale the learning rates by ``finetune_lr_scale`` when the Lovász phase starts."""
        start = self.warmup_epochs
        if self.warmup_loss is None or self.finetune_lr_scale == 1.0 or self.current_epoch != start:
            return
        optimizers = self.optimizers(use_pl_optimizer=False)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] *= self.finetune_lr_scale

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_iou, self.val_cases)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_iou, self.test_cases)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Discrete prediction of whole volumes: ``(B, 1, *S)`` (or ``(B, R, *S)``) uint8, CPU."""
        logits = self.sliding_window(batch["image"])
        return self.discretize(logits).to(torch.uint8).cpu()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Default optimizer when the CLI's ``optimizer`` section is not given:
        ``AdamW(lr=1e-3, weight_decay=1e-5)``."""
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-5)
