"""What the labels of a segmentation task mean, in one object (no Lightning, no MONAI).

:class:`LabelSemantics` holds the class (or region) names, the output mode, the number of network
outputs, how logits become a segmentation, which classes count in a mean over classes, and the
data's ignore label and regions. The datamodule builds one from ``dataset.json``
(:meth:`LabelSemantics.from_description`), the module from its arguments
(:meth:`LabelSemantics.from_outputs`); the module, its metrics and the evaluation tools use it.

"Ignored" is one thing spelled by role: a label value in a label map is ``ignore_index`` (MONAI's
and ``torch.nn.CrossEntropyLoss``'s name), a tensor of voxels that count is ``mask`` (1 counts;
MONAI's ``MaskedDiceLoss`` name), and the metric target of an ignored voxel is :data:`IGNORED`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from lovasz_monai.metrics import check_class_names, counted_classes

if TYPE_CHECKING:
    from lovasz_monai.dataset import DatasetDescription

__all__ = ["IGNORED", "LabelSemantics", "Mode"]

#: metric target value of ignored voxels (torchmetrics' ``ignore_index`` of the IoU metrics)
IGNORED = -1

Mode = Literal["multiclass", "binary", "multilabel"]
"""The output modes (see :class:`LabelSemantics`)."""


@dataclass(frozen=True)
class LabelSemantics:
    """The labels of a task: names, output mode, outputs, discretisation and counted classes.

    Three output modes:

    * ``"multiclass"``: one softmax channel per class; prediction = argmax; the label is a
      ``(B, 1, *S)`` label map.
    * ``"binary"``: two classes (background, foreground) and one output channel; prediction =
      ``logit > 0`` (``sigmoid > 0.5``); the label is the 2-class label map.
    * ``"multilabel"``: one independent sigmoid channel per region (overlapping regions, e.g.
      BraTS TC/WT/ET); prediction = ``logit > 0`` per channel; the label is ``(B, R, *S)`` 0/1.

    Attributes:
        class_names: one name per class (label value) or region.
        mode: the output mode.
        metric_include_background: class 0 counts in means over classes (multi-class and binary;
            every region counts in multi-label mode).
        ignore_index: the label value of the data that takes part in nothing (``None``: none);
            the datamodule turns it into the ``mask``.
        regions: multi-label mode: region name -> label values of the label files.

    Example:
        >>> import torch
        >>> labels = LabelSemantics(("background", "liver", "tumour"))
        >>> labels.num_classes, labels.out_channels, labels.counted_classes
        (3, 3, [1, 2])
        >>> logits = torch.tensor([[[[0.1, 2.0]], [[1.0, 0.0]], [[0.0, 0.5]]]])  # (1, 3, 1, 2)
        >>> labels.discretize(logits).tolist()
        [[[[1, 0]]]]
        >>> labels.mean(torch.tensor([0.9, 0.6, float("nan")]))  # NaN: an empty union
        tensor(0.6000)

    Raises:
        ValueError: no class names, an unknown mode, or a binary mode without exactly 2 names.
    """

    class_names: tuple[str, ...]
    mode: Mode = "multiclass"
    metric_include_background: bool = False
    ignore_index: int | None = None
    regions: Mapping[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(check_class_names(self.class_names)))
        if not self.class_names:
            raise ValueError("a task needs at least one class name, got none")
        if self.mode not in ("multiclass", "binary", "multilabel"):
            raise ValueError(
                f"mode must be 'multiclass', 'binary' or 'multilabel', got {self.mode!r}"
            )
        if self.mode == "binary" and len(self.class_names) != 2:
            raise ValueError(
                f"the binary mode has 2 classes (background, foreground), got {self.class_names}"
            )

    @classmethod
    def from_outputs(
        cls,
        num_classes: int,
        out_channels: int | None = None,
        multi_label: bool = False,
        class_names: Sequence[str] | None = None,
        metric_include_background: bool = False,
    ) -> LabelSemantics:
        """The labels of a model with ``num_classes`` classes and ``out_channels`` outputs.

        Args:
            num_classes: classes (label values including background) or regions.
            out_channels: network outputs; ``None``: ``num_classes``; 1 with ``num_classes=2``
                (not multi-label) is the binary mode.
            multi_label: independent sigmoid channels (regions).
            class_names: ``num_classes`` names; ``None``: ``class_0, class_1, ...``.
            metric_include_background: see the class.

        Example:
            >>> LabelSemantics.from_outputs(2, out_channels=1).mode
            'binary'

        Raises:
            ValueError: ``num_classes < 1``, ``out_channels`` other than ``num_classes`` or the
                binary 1, or ``class_names`` of another length.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
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
        names = [f"class_{i}" for i in range(num_classes)] if class_names is None else class_names
        mode: Mode = "multilabel" if multi_label else "binary" if binary else "multiclass"
        return cls(tuple(names), mode, bool(metric_include_background))

    @classmethod
    def from_description(
        cls,
        description: DatasetDescription,
        out_channels: int | None = None,
        metric_include_background: bool = False,
    ) -> LabelSemantics:
        """The labels of a dataset (:class:`~lovasz_monai.dataset.DatasetDescription`), with
        its ignore label and regions.

        Raises:
            ValueError: as :meth:`from_outputs`.
        """
        labels = cls.from_outputs(
            description.num_classes,
            out_channels,
            description.multi_label,
            description.class_names,
            metric_include_background,
        )
        return cls(
            labels.class_names,
            labels.mode,
            labels.metric_include_background,
            description.ignore_index,
            description.regions,
        )

    @property
    def num_classes(self) -> int:
        """Classes (label values including background) or regions."""
        return len(self.class_names)

    @property
    def out_channels(self) -> int:
        """The number of network outputs, 1 in the binary mode, else :attr:`num_classes`."""
        return 1 if self.mode == "binary" else self.num_classes

    @property
    def multi_label(self) -> bool:
        """One independent sigmoid channel per region."""
        return self.mode == "multilabel"

    @property
    def sigmoid_outputs(self) -> bool:
        """The outputs are sigmoid logits (binary and multi-label modes)."""
        return self.mode != "multiclass"

    @property
    def counted_classes(self) -> list[int]:
        """The classes that enter a mean over classes (see
        :func:`~lovasz_monai.metrics.counted_classes`)."""
        return counted_classes(self.num_classes, self.multi_label, self.metric_include_background)

    def discretize(self, logits: Tensor) -> Tensor:
        """Predicted classes of ``(B, out_channels, *S)`` logits: a ``(B, 1, *S)`` label map
        (argmax, or ``logit > 0`` for one binary channel), or ``(B, R, *S)`` 0/1 regions
        (``sigmoid > 0.5``) in multi-label mode; int64."""
        if self.sigmoid_outputs:
            return (logits > 0).long()  # sigmoid(x) > 0.5  <=>  x > 0
        return logits.argmax(dim=1, keepdim=True)

    def metric_target(self, label: Tensor, mask: Tensor) -> Tensor:
        """The integer target of the IoU metrics: ``(B, *S)`` (label maps) or ``(B, R, *S)``
        (regions), :data:`IGNORED` where ``mask == 0``."""
        ignored = mask == 0
        if self.multi_label:
            return label.long().masked_fill(ignored.expand_as(label), IGNORED)
        return label[:, 0].long().masked_fill(ignored[:, 0], IGNORED)

    def metric_prediction(self, pred: Tensor) -> Tensor:
        """A :meth:`discretize` prediction shaped as :meth:`metric_target`, for the IoU metrics."""
        return pred if self.multi_label else pred[:, 0]

    def mean(self, per_class: Tensor) -> Tensor:
        """Mean of ``(C,)`` per-class values over :attr:`counted_classes`, ignoring NaN (a class
        with an empty union); NaN when no counted class has a value."""
        counted = per_class[self.counted_classes]
        return counted.nanmean() if counted.numel() else per_class.new_tensor(math.nan)
