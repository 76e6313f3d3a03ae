"""The metrics of one evaluation (validation, test, or a tool's own): dataset-level IoU with
torchmetrics and per-case Dice, IoU, HD95 and ASD with MONAI (no Lightning)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex, MultilabelJaccardIndex

from lovasz_monai.labels import IGNORED, LabelSemantics
from lovasz_monai.metrics import CaseMetrics, CaseResults, batch_cases, metric_key

__all__ = ["Evaluation", "SegmentationMetrics"]


@dataclass(frozen=True)
class Evaluation:
    """The result of an evaluation (:meth:`SegmentationMetrics.compute`).

    Attributes:
        labels: the task's labels.
        iou: ``(C,)`` dataset-level IoU per class (NaN: empty union).
        cases: each case's values (:class:`~lovasz_monai.metrics.CaseResults`).
    """

    labels: LabelSemantics
    iou: Tensor
    cases: CaseResults

    @property
    def miou(self) -> Tensor:
        """Mean dataset-level IoU over the counted classes."""
        return self.labels.mean(self.iou)

    def summary(self) -> dict[str, Tensor]:
        """``"mIoU"``, ``"IoU/<class>"`` and the per-case means (``"mDice"``, ``"Dice/<class>"``,
        ..., see :meth:`~lovasz_monai.metrics.CaseResults.summary`) as scalars."""
        values = {"mIoU": self.miou}
        for name, value in zip(self.labels.class_names, self.iou, strict=True):
            values[f"IoU/{metric_key(name)}"] = value
        values.update(self.cases.summary())
        return values


class SegmentationMetrics(nn.Module):
    """IoU and per-case metrics of the predictions of an evaluation, on voxels with ``mask == 1``.

    * IoU per class with torchmetrics (``MulticlassJaccardIndex`` / ``MultilabelJaccardIndex``,
      ``average="none"``), accumulated over all updates (a dataset-level confusion matrix,
      synchronised across DDP processes). A class that is neither in the labels nor predicted
      has an undefined IoU (NaN) and is left out of ``mIoU``, the mean over the
      :attr:`~lovasz_monai.labels.LabelSemantics.counted_classes`.
    * Per case (:class:`~lovasz_monai.metrics.CaseMetrics`): Dice and IoU of each case and class
      (and, with ``surface``, HD95 and ASD in mm from the image's affine), averaged over cases,
      the convention of medical challenges, after gathering the cases of all DDP processes.

    Args:
        labels: the task's :class:`~lovasz_monai.labels.LabelSemantics`.
        surface: also compute HD95 and ASD per case (slow on a CPU).

    Attributes:
        iou: the torchmetrics IoU metric.
        cases: the per-case metrics.

    Example:
        >>> import torch
        >>> metrics = SegmentationMetrics(LabelSemantics(("background", "a", "b")))
        >>> logits = torch.tensor([[[[4.0, 0, 0, 0]], [[0, 4.0, 4.0, 0]], [[0, 0, 0, 4.0]]]])
        >>> label = torch.tensor([[[[0, 1, 2, 2]]]])  # (1, 1, 1, 4)
        >>> metrics.update(logits, label, torch.ones_like(label))
        >>> evaluation = metrics.compute()
        >>> {k: round(float(v), 3) for k, v in evaluation.summary().items() if k[0] == "m"}
        {'mIoU': 0.5, 'mDice': 0.667}
    """

    def __init__(self, labels: LabelSemantics, surface: bool = False) -> None:
        super().__init__()
        self.labels = labels
        options = dict(
            average="none", ignore_index=IGNORED, validate_args=False, zero_division=math.nan
        )
        self.iou: Metric
        if labels.multi_label:
            self.iou = MultilabelJaccardIndex(num_labels=labels.num_classes, **options)
        else:
            self.iou = MulticlassJaccardIndex(num_classes=labels.num_classes, **options)
        self.cases = CaseMetrics(
            labels.num_classes,
            labels.class_names,
            multi_label=labels.multi_label,
            include_background=labels.metric_include_background,
            surface=surface,
        )

    @property
    def updated(self) -> bool:
        """Whether :meth:`update` was called since the last :meth:`compute` or :meth:`reset`."""
        return bool(self.iou.update_called)

    def update(
        self, logits: Tensor, label: Tensor, mask: Tensor, image: Tensor | None = None
    ) -> None:
        """Add a batch of whole-volume predictions.

        Args:
            logits: ``(B, out_channels, *S)`` logits.
            label: ``(B, 1, *S)`` label map, or ``(B, R, *S)`` 0/1 regions (multi-label).
            mask: ``(B, 1, *S)``, 1 where the voxel counts.
            image: the batch image; a MONAI ``MetaTensor`` gives the case names and the voxel
                spacing of the surface metrics (see :func:`~lovasz_monai.metrics.batch_cases`).

        Raises:
            ValueError: as :meth:`~lovasz_monai.metrics.CaseMetrics.update`.
        """
        pred = self.labels.discretize(logits)  # one argmax of the volume for both metrics
        sources, spacing = batch_cases(image) if image is not None else (None, None)
        # first: it checks the inputs, which the IoU (validate_args=False) does not
        self.cases.update(pred, label, mask, spacing=spacing, sources=sources)
        target = self.labels.metric_target(label, mask)
        self.iou.update(self.labels.metric_prediction(pred), target)

    def compute(self) -> Evaluation:
        """The :class:`Evaluation` of all processes' updates, then a reset. Under DDP every
        process must call it (collective)."""
        evaluation = Evaluation(self.labels, self.iou.compute().float(), self.cases.gather())
        self.reset()
        return evaluation

    def reset(self) -> None:
        """Forget every update."""
        self.iou.reset()
        self.cases.reset()
