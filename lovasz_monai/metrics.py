"""Per-case segmentation metrics: Dice, IoU, HD95 and ASD per class, with MONAI, DDP-gathered.

The numbers medical challenges report are computed per case (one volume) and per class, then
averaged over cases. This module computes them from discrete predictions with MONAI's metric
functions (``compute_dice``, ``compute_iou``, ``compute_hausdorff_distance(percentile=95)``,
``compute_average_surface_distance(symmetric=True)``, the functions behind ``DiceMetric``,
``MeanIoU``, ``HausdorffDistanceMetric`` and ``SurfaceDistanceMetric``), gathers the per-case
values of all DDP processes with MONAI's ``evenly_divisible_all_gather`` /
``string_list_all_gather``, and writes them as a CSV table. It knows nothing of Lightning:
:class:`~lovasz_monai.module.LovaszSegmentationModule` feeds it in ``validation_step`` /
``test_step`` and logs :meth:`CaseResults.summary`.

Conventions, per case and per class:

* **Ignored voxels** (``mask == 0``) are removed from the prediction and from the label: both
  binary class masks are set to 0 there. For Dice and IoU this is exactly "leave the voxel out":
  a voxel that is 0 in both adds nothing to the intersection, to ``|P| + |L|`` or to the union.
* **Surface metrics** (HD95 and ASD, in mm: the voxel spacing of each case is used) are computed
  on the same masked segmentations, i.e. on prediction and label both restricted to the valid
  region (what MONAI's ``HausdorffDistanceMetric(ignore_index=...)`` does too: it multiplies both
  by the mask). A structure cut by the border of the valid region gets a boundary there in the
  prediction and in the label alike; where both are cut at the same place these boundary voxels
  coincide (distance 0), where only one reaches the border the distance is a real disagreement
  inside the valid region. An ignore mask that crosses structures therefore lowers HD95/ASD a
  little (more zero distances); with a region-of-interest mask that contains the structures
  nothing changes.
* **Definitions** (MONAI's): HD95 is the larger of the two directed 95th percentiles
  (``torch.quantile``, linear interpolation) of the distances from the boundary voxels of one
  segmentation to the nearest boundary voxel of the other; ASD is the mean of the distances of
  both directions together (symmetric). Boundary voxels: foreground voxels with a background
  neighbour (the volume's outside counts as background).
* **Empty classes.** A class absent from both the (masked) prediction and label of a case has
  no defined value: NaN for every metric, left out of every mean (MONAI's convention: NaN marks
  an undefined case, e.g. ``DiceMetric(ignore_empty=True)``, and MONAI's reductions skip NaN).
  A class present in only one of them is a complete miss or a pure false positive: Dice = IoU
  = 0 and HD95 = ASD = inf (so the class mean of HD95/ASD is inf too; the CSV shows the case).
  Unlike ``DiceMetric(ignore_empty=True)``, false positives on a case whose label lacks the
  class count (Dice 0 rather than NaN), as they do in the dataset-level IoU.
* **Means.** Per class: the mean over cases, NaN left out. Over classes (``mDice``, ...): the
  mean of the per-class means over the counted classes, NaN left out; the background (class 0)
  is not counted unless ``include_background`` (multi-class and binary label maps), multi-label
  regions are all counted. Surface metrics are computed for the counted classes only.

Shapes: ``pred`` and ``label`` are ``(B, 1, *S)`` integer label maps with values in
``[0, num_classes)``, or ``(B, C, *S)`` 0/1 regions with ``multi_label=True``; ``mask`` is
``(B, 1, *S)`` (non-zero = the voxel counts); ``S`` has any number of spatial dimensions.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, count
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)
from monai.utils import evenly_divisible_all_gather, string_list_all_gather
from torch import Tensor

from lovasz_monai.case_names import case_id, unique_case_names
from lovasz_monai.functional import check_finite, integer_or_none

__all__ = [
    "CaseMetrics",
    "CaseResults",
    "batch_cases",
    "case_id",
    "case_metrics",
    "counted_classes",
]

#: the metrics of a case; HD95 and ASD only with surface metrics on
METRICS = ("Dice", "IoU", "HD95", "ASD")
SURFACE_METRICS = ("HD95", "ASD")
#: the label voxels of a case and class (ignored voxels left out), stored beside the metrics
LABEL_VOXELS = "LabelVoxels"

Spacing = Sequence[float] | Sequence[Sequence[float]] | None


def metric_key(class_name: str) -> str:
    """The class's part of a logged metric name (``"IoU/<key>"``): ``/``, the separator of
    logger keys, becomes ``_``.

    Example:
        >>> metric_key("left/caudate")
        'left_caudate'
    """
    return str(class_name).replace("/", "_")


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """``class_names`` as strings, refused when two give the same metric key
    (:func:`metric_key`): their logged values and CSV columns would overwrite each other.

    Raises:
        ValueError: a repeated name, or two names that differ only by ``/`` against ``_``.

    Example:
        >>> check_class_names(["background", "liver"])
        ['background', 'liver']
    """
    names = [str(n) for n in class_names]
    seen: dict[str, str] = {}
    for name in names:
        key = metric_key(name)
        if key in seen:
            raise ValueError(
                f"class names must be distinct (also with '/' read as '_'): {seen[key]!r} and "
                f"{name!r} in {names}"
            )
        seen[key] = name
    return names


def counted_classes(num_classes: int, multi_label: bool, include_background: bool) -> list[int]:
    """The classes that enter a mean over classes (mIoU, mDice, ...): all regions in
    multi-label mode, else all but the background (class 0) unless ``include_background`` (or
    when it is the only class).

    Example:
        >>> counted_classes(3, multi_label=False, include_background=False)
        [1, 2]
        >>> counted_classes(3, multi_label=True, include_background=False)
        [0, 1, 2]
    """
    first = 0 if (multi_label or include_background or num_classes == 1) else 1
    return list(range(first, num_classes))


def batch_cases(image: Tensor) -> tuple[list[str] | None, list[tuple[float, ...]] | None]:
    """Source file names and voxel spacings of the cases of a batch image.

    Args:
        image: ``(B, C_in, *S)``; a MONAI ``MetaTensor`` (as in the validation/test batches of
            :class:`~lovasz_monai.data.SegmentationDataModule`) gives the file names (meta
            ``"filename_or_obj"``) and the spacing of its current ``affine`` (after orientation
            and resampling: the grid the metrics are computed on).

    Returns:
        ``(sources, spacings)``: ``B`` file names and ``B`` tuples of ``len(S)`` voxel sizes, or
        ``None`` for what the tensor does not carry (a plain tensor: ``(None, None)``).

    Example:
        >>> import torch
        >>> from monai.data import MetaTensor
        >>> affine = torch.diag(torch.tensor([-1.5, 1.5, 3.0, 1.0]))
        >>> meta = {"filename_or_obj": "a/case_1.nii.gz"}
        >>> img = MetaTensor(torch.zeros(1, 4, 4, 4), affine=affine, meta=meta)
        >>> batch_cases(img[None])
        (['a/case_1.nii.gz'], [(1.5, 1.5, 3.0)])
    """
    if not isinstance(image, MetaTensor):
        return None, None
    batch, dims = image.shape[0], image.ndim - 2
    affine = torch.as_tensor(image.affine).detach().cpu()
    affines = affine.expand(batch, *affine.shape) if affine.ndim == 2 else affine
    spacings = [tuple(float(s) for s in affine_to_spacing(a, r=dims)) for a in affines]
    if len(spacings) != batch:
        spacings = None
    names = image.meta.get("filename_or_obj")
    if isinstance(names, (str, os.PathLike)):
        names = [names]
    sources = [str(n) for n in names] if isinstance(names, (list, tuple)) else None
    if sources is not None and len(sources) != batch:
        sources = None
    return sources, spacings


_FEW_KERNELS = (torch.bool, torch.uint16, torch.uint32, torch.uint64)


def _class_masks(pred: Tensor, label: Tensor, mask: Tensor | None, c: int, multi_label: bool):
    if multi_label:
        p, y = pred[:, c : c + 1] != 0, label[:, c : c + 1] != 0
    else:
        p, y = pred == c, label == c
    if mask is not None:
        valid = mask != 0
        p, y = p & valid, y & valid
    return p.float(), y.float()


def _check_inputs(
    pred: Tensor, label: Tensor, mask: Tensor | None, num_classes: int, multi_label: bool
) -> None:
    if integer_or_none(num_classes) is None:
        raise TypeError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, x in (("pred", pred), ("label", label), ("mask", mask)):
        if x is not None and not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    channels = num_classes if multi_label else 1
    what = f"(B, {channels}, *S) " + ("0/1 regions" if multi_label else "label maps")
    if pred.ndim < 3 or pred.shape != label.shape or pred.shape[1] != channels:
        raise ValueError(
            f"pred and label must be {what} of the same shape, got {tuple(pred.shape)} and "
            f"{tuple(label.shape)}"
        )
    if mask is not None and (
        mask.shape[0] != pred.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != pred.shape[2:]
    ):
        raise ValueError(
            f"mask must be (B, 1, *S) = {(pred.shape[0], 1, *pred.shape[2:])}, got "
            f"{tuple(mask.shape)}"
        )
    if pred.shape[0] == 0:
        raise ValueError(f"pred and label hold no case (batch size 0): shape {tuple(pred.shape)}")
    if mask is not None and mask.is_floating_point() and mask.numel():
        check_finite(mask, "mask")  # a NaN is != 0: it would count as a valid voxel
    for name, x in (("pred", pred), ("label", label)):
        if x.numel() == 0:
            continue
        if x.is_floating_point():
            check_finite(x, name)
        if multi_label:
            bad = not bool(((x == 0) | (x == 1)).all())
            expected = "0/1 values"
        else:
            bad = bool((x < 0).any() or (x >= num_classes).any() or (x != x.round()).any())
            expected = f"integer values in [0, {num_classes})"
        if bad:
            raise ValueError(
                f"{name} must hold {expected}, got values in [{float(x.min())}, {float(x.max())}]"
            )


def _check_spacing(spacing: Spacing) -> None:
    """Refuse voxel sizes that are not finite and > 0: MONAI's distances take them as they come
    (a 0 makes every distance 0, a negative size the same distances as its absolute value).
    ``spacing`` is one number, one size per axis, or one such row per case (numpy included)."""
    if spacing is None:
        return
    try:
        sizes = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):  # not numbers, or rows of different lengths
        sizes = np.array(math.nan)
    if sizes.size == 0 or not bool(np.all(np.isfinite(sizes) & (sizes > 0))):
        raise ValueError(f"spacing must hold finite voxel sizes > 0, got {spacing}")


def case_metrics(
    pred: Tensor,
    label: Tensor,
    mask: Tensor | None = None,
    *,
    num_classes: int,
    multi_label: bool = False,
    spacing: Spacing = None,
    surface_classes: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Dice and IoU (and HD95, ASD) of each case and class, ignored voxels left out.

    See the module docstring for the conventions (masking, empty classes -> NaN, inf).

    Args:
        pred: ``(B, 1, *S)`` predicted label map (values in ``[0, num_classes)``), or
            ``(B, num_classes, *S)`` 0/1 regions with ``multi_label``; integer, bool or
            floating point holding integers.
        label: the ground truth, same shape and kind as ``pred``.
        mask: ``(B, 1, *S)``, non-zero where the voxel counts; ``None``: every voxel counts.
        num_classes: classes (label values including background) or regions.
        multi_label: ``pred``/``label`` hold one independent 0/1 channel per region.
        spacing: voxel size for the surface metrics: one size per spatial axis for all cases, or
            one such sequence per case; ``None``: 1 (distances in voxels).
        surface_classes: classes for which HD95 and ASD are computed; ``None``: no surface
            metrics.

    Returns:
        ``{"Dice": (B, C), "IoU": (B, C), "LabelVoxels": (B, C)}`` float32 on the CPU (the
        label's voxels of each class, ignored voxels left out; float32, so counts above
        2^24 = 16.8 M voxels are rounded, by at most 1 voxel in 2^24), plus
        ``"HD95"`` and ``"ASD"`` ``(B, C)`` when ``surface_classes`` is given (NaN in the other
        classes' columns).

    Raises:
        ValueError: ``pred``/``label``/``mask`` of the wrong shapes or without a case, values
            outside ``[0, num_classes)`` (label maps) or other than 0/1 (regions), a NaN or inf
            in a float ``mask``, a class of ``surface_classes`` outside ``[0, num_classes)``,
            voxel sizes in ``spacing`` that are not finite and > 0, or a ``spacing`` that does
            not fit (from MONAI).
        TypeError: ``pred``, ``label`` or ``mask`` not a tensor, or a ``num_classes`` that is
            not an integer.

    Example:
        >>> import torch
        >>> label = torch.tensor([[[[0, 1, 1, 1, 2, 2]]]])  # (B=1, 1, 1, 6): one row of voxels
        >>> pred = torch.tensor([[[[0, 1, 1, 2, 2, 0]]]])
        >>> mask = torch.tensor([[[[1, 1, 1, 1, 1, 0]]]])  # the last voxel is ignored
        >>> out = case_metrics(pred, label, mask, num_classes=3, spacing=(1.0, 2.0),
        ...                    surface_classes=[1, 2])
        >>> out["Dice"]  # class 1: 2*2/(2+3); class 2: 2*1/(2+1) (the ignored voxel left out)
        tensor([[1.0000, 0.8000, 0.6667]])
        >>> out["HD95"]  # class 1: 95th percentiles of (0, 0) and (0, 0, 2) mm -> max(0, 1.8)
        tensor([[   nan, 1.8000, 1.9000]])
    """
    # bool maps (a thresholded prediction, a binary label) count as 0/1 integer maps; wide
    # unsigned maps (uint16 NIfTI labels) lack the comparison kernels used here
    pred, label = (
        x.long() if isinstance(x, Tensor) and x.dtype in _FEW_KERNELS else x for x in (pred, label)
    )
    _check_inputs(pred, label, mask, num_classes, multi_label)
    batch = pred.shape[0]
    surface = sorted(set(surface_classes)) if surface_classes is not None else None
    if surface is not None and any(not 0 <= c < num_classes for c in surface):
        raise ValueError(f"surface_classes must lie in [0, {num_classes}), got {surface}")
    if surface:
        _check_spacing(spacing)  # only the surface metrics use it
    keys = (*(METRICS if surface is not None else METRICS[:2]), LABEL_VOXELS)
    out = {k: torch.full((batch, num_classes), math.nan, dtype=torch.float32) for k in keys}
    for c in range(num_classes):
        p, y = _class_masks(pred, label, mask, c, multi_label)
        p_any, y_any = p.flatten(1).any(1).cpu(), y.flatten(1).any(1).cpu()
        out[LABEL_VOXELS][:, c] = y.flatten(1).sum(1, dtype=torch.float64).float().cpu()
        empty, one_sided = ~(p_any | y_any), p_any ^ y_any
        values = {
            "Dice": compute_dice(p, y, include_background=True, ignore_empty=False),
            "IoU": compute_iou(p, y, include_background=True, ignore_empty=False),
        }
        if surface is not None and c in surface:
            with warnings.catch_warnings():  # empty masks (handled below), MONAI deprecations
                warnings.filterwarnings("ignore", message=".*(is all 0|always_return_as_numpy)")
                values["HD95"] = compute_hausdorff_distance(
                    p, y, include_background=True, percentile=95, spacing=spacing
                )
                values["ASD"] = compute_average_surface_distance(
                    p, y, include_background=True, symmetric=True, spacing=spacing
                )
        for key, value in values.items():
            value = value.reshape(batch).float().cpu()
            if key in SURFACE_METRICS:
                value = value.masked_fill(one_sided, math.inf)
            out[key][:, c] = value.masked_fill(empty, math.nan)
    return out


@dataclass
class CaseResults:
    """Per-case metrics of a whole evaluation (all processes), with the class means.

    Attributes:
        cases: ``N`` case names (image file stems, or case folders where file names repeat;
            ``case_000``, ... when unknown).
        sources: ``N`` image paths (``""`` when unknown).
        values: metric name -> ``(N, C)`` float32 (``NaN``: undefined, see the module docs).
        class_names: ``C`` class names.
        counted: the classes that enter the means over classes.

    Raises:
        ValueError: ``sources`` or a metric's rows not one per case, a metric's columns not
            one per class, ``counted`` classes outside ``[0, C)``, or repeated class names.
    """

    cases: list[str]
    sources: list[str]
    values: dict[str, Tensor]
    class_names: list[str]
    counted: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.class_names = check_class_names(self.class_names)
        shape = (len(self.cases), len(self.class_names))
        if len(self.sources) != shape[0]:
            raise ValueError(f"need one source per case ({shape[0]}), got {len(self.sources)}")
        for metric, values in self.values.items():
            if tuple(values.shape) != shape:
                raise ValueError(
                    f"values[{metric!r}] must be (cases, classes) = {shape}, got "
                    f"{tuple(values.shape)}"
                )
        if any(not 0 <= c < shape[1] for c in self.counted):
            raise ValueError(f"counted must lie in [0, {shape[1]}), got {list(self.counted)}")

    def class_means(self, metric: str) -> Tensor:
        """``(C,)`` mean over cases of each class, NaN (undefined cases) left out; a class
        undefined in every case (or no cases) gives NaN.

        Raises:
            KeyError: a metric that was not computed.
        """
        values = self.values[metric]
        if values.shape[0] == 0:
            return torch.full((values.shape[1],), math.nan)
        return values.nanmean(dim=0)

    def _counted_values(self, metric: str) -> Tensor:
        """``(N, K)`` values of the counted classes (every class when none is counted)."""
        values = self.values[metric]
        return values[:, self.counted] if self.counted else values

    def case_means(self, metric: str, *, finite_only: bool = False) -> Tensor:
        """Each case's mean of ``metric`` over the counted classes (every class when none is
        counted), undefined (NaN) classes left out: the per-case score that challenges average
        over cases.

        Args:
            metric: a computed metric, e.g. ``"IoU"`` or ``"HD95"``.
            finite_only: also leave out infinite values, i.e. average a surface metric over the
                structures present in both label and prediction (a one-sided structure makes
                the plain mean ``inf``; :meth:`num_one_sided` counts them).

        Returns:
            ``(N,)`` float32; NaN for a case with no value left to average (e.g. with
            ``finite_only``, a case whose every structure is one-sided).

        Raises:
            KeyError: a metric that was not computed.

        Example:
            >>> inf, nan = float("inf"), float("nan")
            >>> r = CaseResults(["a", "b"], ["", ""], {"HD95": torch.tensor(
            ...     [[100.0, 2.0, inf], [100.0, 1.0, 3.0]])}, ["bg", "x", "y"], [1, 2])
            >>> r.case_means("HD95"), r.case_means("HD95", finite_only=True)  # bg not counted
            (tensor([inf, 2.]), tensor([2., 2.]))
        """
        values = self._counted_values(metric)
        if finite_only:
            values = values.masked_fill(values.isinf(), math.nan)
        return values.nanmean(dim=1)

    def num_one_sided(self, metric: str = "HD95") -> int:
        """How many (case, counted class) values of ``metric`` are infinite: for the surface
        metrics (HD95, ASD), the structures in only one of label and prediction (missed, or
        predicted where the label has none). Dice and IoU are never infinite.

        Args:
            metric: a computed metric.

        Returns:
            The number of infinite values among the counted classes of all cases.

        Raises:
            KeyError: a metric that was not computed.

        Example:
            >>> inf = float("inf")
            >>> r = CaseResults(["a", "b"], ["", ""], {"HD95": torch.tensor(
            ...     [[inf, 2.0, inf], [float("nan"), 1.0, 3.0]])}, ["bg", "x", "y"], [1, 2])
            >>> r.num_one_sided()  # the background is not counted
            1
        """
        values = self._counted_values(metric)
        return int(values.isinf().sum())

    def num_missed(self, metric: str = "HD95") -> int | None:
        """How many of the one-sided structures (:meth:`num_one_sided`) are in the label only:
        missed; the rest were predicted where the label has none. Needs the label voxels
        (``values["LabelVoxels"]``, as :class:`CaseMetrics` stores them).

        Returns:
            The count, or ``None`` without label voxels (a table written before they were
            stored).

        Raises:
            KeyError: a metric that was not computed.

        Example:
            >>> inf = float("inf")
            >>> r = CaseResults(["a", "b"], ["", ""], {
            ...     "HD95": torch.tensor([[inf, 2.0, inf], [float("nan"), inf, 3.0]]),
            ...     "LabelVoxels": torch.tensor([[9.0, 4.0, 0.0], [9.0, 5.0, 6.0]]),
            ... }, ["bg", "x", "y"], [1, 2])
            >>> r.num_one_sided(), r.num_missed()  # a: y predicted, not in the label; b: x missed
            (2, 1)
        """
        values = self._counted_values(metric)
        if LABEL_VOXELS not in self.values:
            return None
        in_label = self._counted_values(LABEL_VOXELS) > 0
        return int((values.isinf() & in_label).sum())

    def summary(self, metrics: Sequence[str] = ("Dice", "HD95", "ASD")) -> dict[str, Tensor]:
        """Logged values: ``"<metric>/<class>"`` (mean over cases) for every class (surface
        metrics: the counted classes) and ``"m<metric>"`` (mean over the counted classes, NaN
        left out), for those of ``metrics`` that were computed. ``/`` in class names becomes
        ``_``.

        A single structure in only one of label and prediction makes a surface metric's
        ``"m<metric>"`` inf, so each computed surface metric also gets ``"m<metric>_found"``:
        each case's mean over the structures in both (:meth:`case_means` with ``finite_only``),
        averaged over cases; and ``"num_one_sided"`` counts the (case, counted class) pairs
        that leaves out (:meth:`num_one_sided` of the first of ``metrics`` computed; HD95 and
        ASD are one-sided on the same structures), split into ``"num_missed"`` (in the label
        only) and ``"num_spurious"`` (in the prediction only) where the label voxels are
        known. ``"m<metric>_found"`` averages over each
        case's structures first, ``"m<metric>"`` over each class's cases first: the two differ
        even when nothing is one-sided.

        Example:
            >>> r = CaseResults(["a", "b"], ["", ""], {"Dice": torch.tensor(
            ...     [[1.0, 0.5, float("nan")], [1.0, 0.7, 0.2]])}, ["bg", "x", "y"], [1, 2])
            >>> {k: round(float(v), 3) for k, v in r.summary().items()}
            {'Dice/bg': 1.0, 'Dice/x': 0.6, 'Dice/y': 0.2, 'mDice': 0.4}
        """
        out: dict[str, Tensor] = {}
        for metric in metrics:
            if metric not in self.values:
                continue
            means = self.class_means(metric)
            shown = self.counted if metric in SURFACE_METRICS else range(len(self.class_names))
            for c in shown:
                out[f"{metric}/{metric_key(self.class_names[c])}"] = means[c]
            counted = means[self.counted] if self.counted else means
            out[f"m{metric}"] = counted.nanmean()
            if metric in SURFACE_METRICS:
                out[f"m{metric}_found"] = self.case_means(metric, finite_only=True).nanmean()
                if "num_one_sided" not in out:  # the first surface metric's count
                    one_sided, missed = self.num_one_sided(metric), self.num_missed(metric)
                    out["num_one_sided"] = torch.tensor(float(one_sided))
                    if missed is not None:
                        out["num_missed"] = torch.tensor(float(missed))
                        out["num_spurious"] = torch.tensor(float(one_sided - missed))
        return out

    def columns(self) -> list[tuple[str, int]]:
        """``(metric, class)`` of each value column of the table."""
        cols = []
        for metric in self.values:
            shown = self.counted if metric in SURFACE_METRICS else range(len(self.class_names))
            cols += [(metric, c) for c in shown]
        return cols

    @classmethod
    def read_csv(cls, path: str | os.PathLike, counted: Sequence[int]) -> CaseResults:
        """Read back a table of :meth:`write_csv` (e.g. ``lovasz-monai test``'s
        ``test_cases.csv``).

        Args:
            path: the CSV file.
            counted: the classes that enter the means over classes (the table does not say
                which; ``[1, ..., C - 1]`` for label maps without the background).

        Returns:
            The results, the class names taken from the ``Dice`` columns; a surface metric
            column missing for a class (not counted when it was written) reads as NaN.

        Raises:
            OSError: the file cannot be read.
            ValueError: a table without ``case``/``image``/``Dice`` columns, a column that is
                not ``<metric>/<class>`` of a known class, or a ``counted`` class outside it.

        Example:
            >>> import pathlib, tempfile
            >>> r = CaseResults(["a"], ["a.nii.gz"], {"Dice": torch.tensor([[1.0, 0.5]]),
            ...                 "HD95": torch.tensor([[float("nan"), 2.0]])}, ["bg", "x/1"], [1])
            >>> path = r.write_csv(pathlib.Path(tempfile.mkdtemp()) / "cases.csv")
            >>> back = CaseResults.read_csv(path, counted=[1])
            >>> back.class_names, back.values["HD95"]
            (['bg', 'x/1'], tensor([[nan, 2.]]))
        """
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        header = rows[0] if rows else []
        if header[:2] != ["case", "image"] or not any(h.startswith("Dice/") for h in header):
            raise ValueError(
                f"{path}: expected the columns case, image, Dice/<class>, ...; got {header[:4]}"
            )
        # metric names hold no "/", class names may
        columns = [tuple(h.split("/", 1)) for h in header[2:]]
        names = [c for m, c in columns if m == "Dice"]
        if any(len(col) != 2 or col[1] not in names for col in columns):
            raise ValueError(
                f"{path}: every column after case, image must be <metric>/<class> of a class of "
                f"the Dice columns; got {header[2:]}"
            )
        values: dict[str, Tensor] = {}
        for metric, _ in columns:
            values.setdefault(metric, torch.full((len(rows) - 1, len(names)), math.nan))
        for i, row in enumerate(rows[1:]):
            for (metric, name), cell in zip(columns, row[2:], strict=True):
                values[metric][i, names.index(name)] = float(cell)
        cases, sources = [row[0] for row in rows[1:]], [row[1] for row in rows[1:]]
        return cls(cases, sources, values, names, list(counted))

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write one row per case: ``case``, ``image``, then ``<metric>/<class>`` columns
        (``Dice`` and ``IoU`` of every class, ``HD95``/``ASD`` of the counted classes,
        ``LabelVoxels`` of every class: the label's voxels, ignored voxels left out), values
        at full float precision (``nan``, ``inf`` as Python writes them). Creates the folder.

        Returns:
            the path written.

        Raises:
            OSError: the file cannot be written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = self.columns()
        header = ["case", "image"] + [f"{m}/{self.class_names[c]}" for m, c in cols]
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i, (case, source) in enumerate(zip(self.cases, self.sources, strict=True)):
                row = [repr(float(self.values[m][i, c])) for m, c in cols]
                writer.writerow([case, source, *row])
        return path


class CaseMetrics:
    """Accumulates per-case Dice and IoU (and HD95/ASD) over an evaluation; gathers them
    across DDP processes.

    Args:
        num_classes: classes (label values including background) or regions (multi-label).
        class_names: ``num_classes`` names; ``None``: ``class_0, class_1, ...``.
        multi_label: ``pred``/``label`` are ``(B, num_classes, *S)`` 0/1 regions.
        include_background: count class 0 in the means over classes (label maps only; every
            region counts in multi-label mode).
        surface: also compute HD95 and ASD (for the counted classes): slow on a CPU.

    Attributes:
        counted: the classes that enter the means (and get surface metrics).
        metrics: the metric names computed: ``("Dice", "IoU")`` plus ``("HD95", "ASD")``,
            then ``"LabelVoxels"`` (the label's voxels of each case and class).

    Raises:
        ValueError: ``num_classes < 1`` or ``class_names`` of the wrong length; in
            :meth:`update`, as :func:`case_metrics`.

    Example:
        >>> import torch
        >>> m = CaseMetrics(3, ["background", "liver", "tumour"])
        >>> label = torch.tensor([[[[0, 1, 1, 2]]], [[[0, 1, 1, 1]]]])  # 2 cases of 1 x 4 voxels
        >>> pred = torch.tensor([[[[0, 1, 2, 2]]], [[[0, 1, 1, 1]]]])
        >>> _ = m.update(pred, label, sources=["x/c1.nii.gz", "x/c2.nii.gz"])
        >>> results = m.gather()  # all processes under DDP
        >>> results.cases, results.values["Dice"][:, 2]  # tumour absent from case 2: NaN
        (['c1', 'c2'], tensor([0.6667,    nan]))
        >>> {k: round(float(v), 4) for k, v in results.summary().items()}
        {'Dice/background': 1.0, 'Dice/liver': 0.8333, 'Dice/tumour': 0.6667, 'mDice': 0.75}
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        multi_label: bool = False,
        include_background: bool = False,
        surface: bool = False,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"need {num_classes} class_names, got {list(class_names)}")
        self.num_classes = int(num_classes)
        self.class_names = (
            [f"class_{i}" for i in range(num_classes)]
            if class_names is None
            else check_class_names(class_names)
        )
        self.multi_label = bool(multi_label)
        self.surface = bool(surface)
        self.counted = counted_classes(self.num_classes, multi_label, include_background)
        self.metrics = (*(METRICS if self.surface else METRICS[:2]), LABEL_VOXELS)
        self.reset()

    def reset(self) -> None:
        """Forget the cases added so far (this process)."""
        self._values: list[Tensor] = []
        self._sources: list[str] = []

    def __len__(self) -> int:
        """Cases added by this process."""
        return len(self._sources)

    def update(
        self,
        pred: Tensor,
        label: Tensor,
        mask: Tensor | None = None,
        spacing: Spacing = None,
        sources: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Add a batch of cases (arguments as :func:`case_metrics`; ``sources``: the ``B``
        image paths, used for the case ids and to drop the duplicates a distributed sampler
        adds). Returns the batch's ``{metric: (B, C)}`` values.

        Raises:
            ValueError: as :func:`case_metrics`, or ``len(sources) != B``.
        """
        values = case_metrics(
            pred,
            label,
            mask,
            num_classes=self.num_classes,
            multi_label=self.multi_label,
            spacing=spacing,
            surface_classes=self.counted if self.surface else None,
        )
        batch = pred.shape[0]
        if sources is not None and len(sources) != batch:
            raise ValueError(f"got {len(sources)} sources for a batch of {batch} cases")
        self._values.append(torch.stack([values[m] for m in self.metrics], dim=1))
        start = len(self._sources)
        sources = [None] * batch if sources is None else list(sources)
        # unknown sources get unique placeholders "\t<n>" (no real name holds a tab)
        self._sources.extend(
            str(s).replace("\t", " ").replace("\n", " ") if s else f"\t{start + i}"
            for i, s in enumerate(sources)
        )
        return values

    def gather(self) -> CaseResults:
        """The cases of all processes (rank order), each source path once (the first
        occurrence: a ``DistributedSampler`` repeats cases to even out the ranks; cases without
        a source are all kept). Without an initialised ``torch.distributed`` group: this
        process's cases. Under DDP every process must call it (collective).

        Cases are named after their files (:func:`~lovasz_monai.case_names.unique_case_names`:
        the file name, or the case folders where the evaluated cases' file names repeat, as in
        KiTS), cases without a source ``case_<n>`` (``<n>`` their row; ``case_<n>_<k>`` where a
        file is already named ``case_<n>``).

        Raises:
            RuntimeError: the gathered names and values do not match (inconsistent updates).
        """
        shape = (0, len(self.metrics), self.num_classes)
        local = torch.cat(self._values) if self._values else torch.zeros(shape)
        values = evenly_divisible_all_gather(local, concat=True)
        # placeholders become "\t<rank>:<n>": unique across processes
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        names = [f"\t{rank}:{s[1:]}" if s.startswith("\t") else s for s in self._sources]
        names = [n for n in string_list_all_gather(names, delimiter="\n") if n]  # "" = none
        if len(names) != values.shape[0]:
            raise RuntimeError(f"gathered {len(names)} case names for {values.shape[0]} cases")
        keep, seen = [], set()
        for i, name in enumerate(names):
            if name.startswith("\t") or name not in seen:
                keep.append(i)
                seen.add(name)
        values = values[keep].float().cpu()
        names = [names[i] for i in keep]
        sources = ["" if n.startswith("\t") else n for n in names]
        named = [i for i, s in enumerate(sources) if s]
        # strict=False: a name that even its folders cannot tell apart repeats; the table's
        # image column still does
        source_names = unique_case_names([sources[i] for i in named], strict=False)
        cases = [""] * len(sources)
        for i, name in zip(named, source_names, strict=True):
            cases[i] = name
        taken = set(source_names)
        for i, source in enumerate(sources):
            if not source:  # a real case may already be called case_<i>
                names = (f"case_{i:03d}{s}" for s in chain([""], (f"_{k}" for k in count(1))))
                cases[i] = next(name for name in names if name not in taken)
        return CaseResults(
            cases=cases,
            sources=sources,
            values={m: values[:, k] for k, m in enumerate(self.metrics)},
            class_names=list(self.class_names),
            counted=list(self.counted),
        )
