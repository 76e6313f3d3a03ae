"""LightningModule template for 3D segmentation with the Lovász losses.

:class:`LovaszSegmentationModule` composes a network (default: a MONAI ``UNet``), the training
objective (:class:`~lovasz_monai.objective.ScheduledLoss`: a loss, default
:class:`~lovasz_monai.losses.LovaszCELoss`, and an optional cross-entropy -> Lovász schedule),
the task's labels (:class:`~lovasz_monai.labels.LabelSemantics`), MONAI
``sliding_window_inference`` on whole volumes, and the evaluation metrics
(:class:`~lovasz_monai.evaluation.SegmentationMetrics`: torchmetrics IoU and per-case
Dice/HD95). It expects the batches of :class:`~lovasz_monai.data.SegmentationDataModule`: dicts
with ``"image"`` ``(B, C_in, *S)``, ``"label"`` ``(B, 1, *S)`` label map (or ``(B, R, *S)``
binary regions in multi-label mode) and ``"mask"`` ``(B, 1, *S)``, 1 where the voxel counts.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
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

from lovasz_monai import hparams as _hparams
from lovasz_monai.deep_supervision import deep_supervision_loss, head_weights, split_heads
from lovasz_monai.evaluation import SegmentationMetrics
from lovasz_monai.functional import integer_or_none
from lovasz_monai.labels import IGNORED, LabelSemantics
from lovasz_monai.losses import default_loss
from lovasz_monai.objective import ScheduledLoss

__all__ = ["LovaszSegmentationModule"]


def __getattr__(name: str) -> object:
    if name == "modules_from_config":  # its home before version 0.2
        warnings.warn(
            "lovasz_monai.module.modules_from_config moved to lovasz_monai.hparams",
            DeprecationWarning,
            stacklevel=2,
        )
        return _hparams.modules_from_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: target value given to masked (ignored) voxels for the torchmetrics IoU (the name of version
#: 0.1 of :data:`lovasz_monai.labels.IGNORED`)
METRIC_IGNORE = IGNORED
#: file name of the per-case test metrics, written in ``trainer.log_dir``
CASES_CSV = "test_cases.csv"
#: the default UNet's ``(unet_channels, unet_strides, unet_num_res_units)``
_DEFAULT_UNET = ((16, 32, 64, 128), (2, 2, 2), 2)


class LovaszSegmentationModule(pl.LightningModule):
    """3D segmentation with a Lovász loss, sliding-window evaluation and IoU metrics.

    It composes four parts, each documented where it lives: ``labels``
    (:class:`~lovasz_monai.labels.LabelSemantics`: the output mode, chosen from ``multi_label``
    and the number of outputs, how logits become a segmentation, which classes count);
    ``objective`` (:class:`~lovasz_monai.objective.ScheduledLoss`: the loss, called with the
    ignore mask where it takes one, in float32, and the optional CE -> Lovász schedule, its
    weight logged as ``train/lovasz_weight``; ``finetune_lr_scale`` scales the learning rates
    once when the Lovász phase starts); the network, whose several heads in training (deep
    supervision, :mod:`lovasz_monai.deep_supervision`) each get the objective, weighted as
    ``monai.losses.DeepSupervisionLoss`` weighs them, while evaluation runs the full-resolution
    head by ``sliding_window_inference``; and ``val_metrics`` / ``test_metrics``
    (:class:`~lovasz_monai.evaluation.SegmentationMetrics`: dataset-level IoU and per-case Dice,
    HD95 and ASD in ``test`` with ``surface_metrics``), logged as ``val/mIoU``,
    ``val/IoU/<class>``, ``val/mDice``, ... and written per case to ``test_cases.csv`` in
    ``trainer.log_dir`` (see the evaluation guide).

    It expects the batches of :class:`~lovasz_monai.data.SegmentationDataModule`: ``"image"``
    ``(B, C_in, *S)``, ``"label"`` ``(B, 1, *S)`` (or ``(B, R, *S)`` regions) and ``"mask"``
    ``(B, 1, *S)``. Under :class:`~lovasz_monai.cli.LovaszCLI` the ``optimizer`` /
    ``lr_scheduler`` sections configure the optimizer; without them (or outside the CLI)
    :meth:`configure_optimizers` uses ``AdamW(lr=1e-3, weight_decay=1e-5)``.

    The properties ``mode`` (``labels.mode``; ``multi_label``, ``binary`` and
    ``sigmoid_outputs`` derive from it), ``loss`` and ``warmup_loss`` (the objective's),
    ``val_iou``, ``test_iou``, ``val_cases`` and ``test_cases`` (the metrics' parts) keep the
    names of version 0.1.

    Args:
        num_classes: output classes: label values including background (multi-class/binary),
            or regions (multi-label). Linked from the datamodule by the CLI.
        network: any ``nn.Module`` mapping ``(B, in_channels, *S)`` to ``(B, out_channels, *S)``
            logits, or to several heads in training (deep supervision); ``None`` builds a MONAI
            ``UNet(spatial_dims=3, in_channels, out_channels, channels=unet_channels,
            strides=unet_strides, num_res_units=unet_num_res_units)``.
        loss: training/validation loss taking ``(logits, label[, mask])``; ``None``:
            :func:`~lovasz_monai.losses.default_loss`, ``LovaszCELoss(to_onehot_y=True)``
            (Lovász-Softmax + 0.3 CE, the best recipe of the real-anatomy comparison in
            docs/guides/which_loss.md) or ``LovaszCELoss(sigmoid=True)`` (multi-label and
            1-channel binary).
        in_channels: image channels (modalities).
        class_names: one name per class/region, used in the logged metric names; ``None``:
            ``class_0, class_1, ...``.
        multi_label: independent sigmoid channels (overlapping regions).
        out_channels: network outputs; ``None`` = ``num_classes``. 1 with ``num_classes=2``
            selects the binary one-channel mode.
        unet_channels, unet_strides, unet_num_res_units: the default UNet's configuration
            (with a ``network`` they are ignored, with a warning when they are set).
        roi_size: sliding-window size ``(X, Y, Z)`` (linked from ``data.roi_size`` by the CLI).
        sw_batch_size: windows per network call in sliding-window inference.
        overlap: sliding-window overlap in [0, 1).
        sw_mode: window blending, ``"gaussian"`` or ``"constant"``.
        warmup_loss, warmup_epochs, ramp_epochs: the schedule (see
            :class:`~lovasz_monai.objective.ScheduledLoss`), e.g. ``torch.nn.CrossEntropyLoss``
            or ``LovaszCELoss(to_onehot_y=True, lambda_lovasz=0)`` (a masked cross-entropy);
            ``None``: no schedule.
        finetune_lr_scale: factor applied to the learning rates when the Lovász phase starts
            (with a ``warmup_loss`` only), > 0.
        deep_supervision_weight_mode: head weights, as ``DeepSupervisionLoss``'s ``weight_mode``:
            ``"exp"`` (1, 0.5, 0.25, ...), ``"same"`` or ``"two"`` (1, 0.5, 0.5, ...).
        deep_supervision_weights: explicit head weights (full resolution first), at least one
            per head; they replace ``deep_supervision_weight_mode``.
        metric_include_background: include class 0 in ``mIoU`` and ``mDice`` (multi-class and
            binary modes; every region counts in multi-label mode).
        surface_metrics: also compute HD95 and ASD per case in ``test`` (slow on a CPU). Not
            saved in the checkpoint's hyperparameters: give it when testing.

    Attributes:
        network: the network.
        labels, objective, val_metrics, test_metrics: the parts above.

    Shapes:
        forward: ``(B, in_channels, *S)`` -> ``(B, out_channels, *S)`` logits.
        predict_step: returns ``(B, 1, *S)`` uint8 (int16 above 256 classes) label maps, or
            ``(B, R, *S)`` uint8 0/1 in multi-label mode, on the CPU.

    Raises:
        ValueError: invalid sizes or counts (``num_classes < 1``, ``out_channels`` other than
            ``num_classes`` or the binary 1, ``class_names`` of the wrong length, negative
            epochs, ``warmup_epochs > 0`` without ``warmup_loss``, overlap outside [0, 1), an
            unknown ``deep_supervision_weight_mode`` or ``sw_mode``, a ``roi_size`` or
            ``sw_batch_size`` that is not a positive integer, ``torch.nn.CrossEntropyLoss`` as a
            loss of sigmoid outputs); in the steps: a batch whose image
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
        unet_channels: Sequence[int] = _DEFAULT_UNET[0],
        unet_strides: Sequence[int] = _DEFAULT_UNET[1],
        unet_num_res_units: int = _DEFAULT_UNET[2],
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
        frame = inspect.currentframe()
        _hparams.save_hyperparameters(
            self.save_hyperparameters, frame, network=network, loss=loss, warmup_loss=warmup_loss
        )
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not (math.isfinite(finetune_lr_scale) and finetune_lr_scale > 0):
            raise ValueError(f"finetune_lr_scale must be finite and > 0, got {finetune_lr_scale}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
        if integer_or_none(sw_batch_size) is None or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be an integer >= 1, got {sw_batch_size}")
        if sw_mode not in ("gaussian", "constant"):
            raise ValueError(f"sw_mode must be 'gaussian' or 'constant', got {sw_mode!r}")
        # MONAI's sliding window reads a size <= 0 as "the whole image": on a CT volume that is
        # one window of the whole volume, not the patch size asked for
        if not roi_size or any(integer_or_none(s) is None or s < 1 for s in roi_size):
            raise ValueError(f"roi_size must be positive integer sizes, got {tuple(roi_size)}")
        head_weights(1, deep_supervision_weight_mode)  # validates the mode
        self.labels = LabelSemantics.from_outputs(
            num_classes, out_channels, multi_label, class_names, metric_include_background
        )
        self.num_classes = self.labels.num_classes
        self.out_channels = self.labels.out_channels
        self.class_names = list(self.labels.class_names)
        self.metric_include_background = self.labels.metric_include_background
        self.in_channels = int(in_channels)
        self.roi_size = tuple(int(s) for s in roi_size)
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        self.sw_mode = sw_mode
        self.finetune_lr_scale = float(finetune_lr_scale)
        self.deep_supervision_weight_mode = deep_supervision_weight_mode
        self.deep_supervision_weights = (
            None
            if deep_supervision_weights is None
            else [float(w) for w in deep_supervision_weights]
        )
        unet = (tuple(unet_channels), tuple(unet_strides), int(unet_num_res_units))
        if network is not None and unet != _DEFAULT_UNET:
            warnings.warn(
                f"unet_channels/unet_strides/unet_num_res_units {unet} configure the default UNet "
                f"only; they are ignored with the given network ({type(network).__name__})",
                stacklevel=2,
            )
        if network is None:
            network = UNet(
                spatial_dims=3,
                in_channels=self.in_channels,
                out_channels=self.out_channels,
                channels=tuple(unet_channels),
                strides=tuple(unet_strides),
                num_res_units=unet_num_res_units,
            )
        self.network = network
        self.objective = ScheduledLoss(
            default_loss(sigmoid=self.sigmoid_outputs) if loss is None else loss,
            warmup_loss,
            warmup_epochs,
            ramp_epochs,
            sigmoid_outputs=self.sigmoid_outputs,
        )
        # an evaluation switch, not saved: LightningCLI would let a checkpoint's value override
        # `test --ckpt_path ... --model.surface_metrics true`
        self.hparams.pop("surface_metrics", None)
        self.surface_metrics = bool(surface_metrics)
        self.val_metrics = SegmentationMetrics(self.labels)
        self.test_metrics = SegmentationMetrics(self.labels, surface=self.surface_metrics)

    # -- the parts' names of version 0.1 ------------------------------------------------------

    mode = property(lambda self: self.labels.mode, doc="``labels.mode``.")
    multi_label = property(lambda self: self.labels.multi_label, doc="Multi-label mode.")
    binary = property(lambda self: self.labels.mode == "binary", doc="One-channel binary mode.")
    sigmoid_outputs = property(
        lambda self: self.labels.sigmoid_outputs, doc="Sigmoid outputs (binary, multi-label)."
    )
    loss = property(lambda self: self.objective.loss, doc="The objective's loss.")
    warmup_loss = property(lambda self: self.objective.warmup_loss, doc="Its warm-up loss.")
    warmup_epochs = property(lambda self: self.objective.warmup_epochs, doc="Warm-up epochs.")
    ramp_epochs = property(lambda self: self.objective.ramp_epochs, doc="Ramp epochs.")
    val_iou = property(lambda self: self.val_metrics.iou, doc="Validation IoU metric.")
    test_iou = property(lambda self: self.test_metrics.iou, doc="Test IoU metric.")
    val_cases = property(lambda self: self.val_metrics.cases, doc="Validation per-case metrics.")
    test_cases = property(lambda self: self.test_metrics.cases, doc="Test per-case metrics.")

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("loss", "warmup_loss") and "objective" in self.__dict__.get("_modules", {}):
            setattr(self.objective, name, value)  # e.g. ``model.warmup_loss = None``
            return
        super().__setattr__(name, value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        for key in [
            k for k in state_dict if k.startswith((prefix + "loss.", prefix + "warmup_loss."))
        ]:
            state_dict[prefix + "objective." + key[len(prefix) :]] = state_dict.pop(key)  # 0.1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- core -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Network logits ``(B, out_channels, *S)`` for an image batch ``(B, in_channels, *S)``:
        the full-resolution head of a deep-supervision network."""
        return split_heads(self.network(x), spatial_dims=x.ndim - 2)[0]

    def lovasz_weight(self, epoch: int) -> float:
        """Weight ``w`` of ``loss`` in the training objective at ``epoch`` (1 without warm-up);
        see :meth:`~lovasz_monai.objective.ScheduledLoss.weight`."""
        return self.objective.weight(epoch)

    def discretize(self, logits: Tensor) -> Tensor:
        """Predicted classes, as :meth:`~lovasz_monai.labels.LabelSemantics.discretize`."""
        return self.labels.discretize(logits)

    def update_metric(self, metric: Metric, logits: Tensor, label: Tensor, mask: Tensor) -> None:
        """Add a batch to an IoU metric: ``logits`` ``(B, C, *S)``, ``label`` and ``mask`` as in
        the batch; voxels with ``mask == 0`` are left out."""
        pred = self.labels.metric_prediction(self.labels.discretize(logits))
        metric.update(pred, self.labels.metric_target(label, mask))

    def mean_iou(self, per_class: Tensor) -> Tensor:
        """Mean over the counted classes, as :meth:`~lovasz_monai.labels.LabelSemantics.mean`."""
        return self.labels.mean(per_class)

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
        epoch = self.current_epoch
        if len(heads) == 1:
            loss = self.objective(heads[0], label, mask, epoch)
        else:
            weights = head_weights(
                len(heads), self.deep_supervision_weight_mode, self.deep_supervision_weights
            )
            loss = deep_supervision_loss(
                heads, label, mask, lambda *args: self.objective(*args, epoch), weights
            )
        size = image.shape[0]
        if self._trainer is None:  # called outside a Trainer (e.g. a unit test): nothing to log
            return loss
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        if self.warmup_loss is not None:
            weight = self.objective.weight(epoch)
            self.log("train/lovasz_weight", weight, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _evaluate(
        self, batch: dict[str, Tensor], stage: str, metrics: SegmentationMetrics
    ) -> Tensor:
        label, mask = (convert_to_tensor(batch[k], track_meta=False) for k in ("label", "mask"))
        logits = self.sliding_window(batch["image"])
        loss = self.objective(logits, label, mask)
        metrics.update(logits, label, mask, image=batch["image"])
        if self._trainer is not None:
            size = logits.shape[0]
            self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=size, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Sliding-window logits of whole volumes; updates ``val/`` loss, IoU and Dice."""
        return self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """As :meth:`validation_step`, logging under ``test/``."""
        return self._evaluate(batch, "test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: SegmentationMetrics) -> None:
        if not metrics.updated:
            return
        evaluation = metrics.compute()  # the same on every process
        values = {f"{stage}/{key}": value for key, value in evaluation.summary().items()}
        miou = values.pop(f"{stage}/mIoU")
        # the values are already reduced over processes (identical on every rank): no sync_dist
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            self.log(f"{stage}/mIoU", miou, prog_bar=True, sync_dist=False)
            self.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)
        if stage == "test":
            folder = self.trainer.log_dir or self.trainer.default_root_dir  # a DDP broadcast
            if self.trainer.is_global_zero:
                path = evaluation.cases.write_csv(Path(folder) / CASES_CSV)
                rank_zero_info(
                    f"per-case test metrics of {len(evaluation.cases.cases)} cases: {path}"
                )

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
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Discrete prediction of whole volumes: ``(B, 1, *S)`` (or ``(B, R, *S)``) uint8, CPU;
        int16 label maps above 256 classes, where uint8 would wrap the class indices."""
        logits = self.sliding_window(batch["image"])
        dtype = torch.uint8 if self.num_classes <= 256 else torch.int16
        return self.discretize(logits).to(dtype).cpu()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Default optimizer when the CLI's ``optimizer`` section is not given:
        ``AdamW(lr=1e-3, weight_decay=1e-5)``."""
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-5)
