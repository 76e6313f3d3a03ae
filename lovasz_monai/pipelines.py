"""The MONAI transform pipelines of segmentation data: training, evaluation, prediction and the
inversion of a prediction to the original image space (no Lightning).

:class:`SegmentationPipelines` holds the settings;
:class:`~lovasz_monai.data.SegmentationDataModule` builds one and gives its datasets these
pipelines. Errors raised while loading or transforming a case name the case's files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from monai.data import MetaTensor, decollate_batch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from lovasz_monai.dataset import CASE_KEYS
from lovasz_monai.functional import check_count, integer_or_none
from lovasz_monai.transforms import (
    CheckImageLabeld,
    IgnoreMaskd,
    LabelToRegionsd,
    region_values,
)

__all__ = ["SegmentationPipelines"]

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _describe_case(data: Any) -> str:
    if not isinstance(data, Mapping):
        return "a case"
    names = []
    for key in CASE_KEYS:
        value = data.get(key)
        if isinstance(value, MetaTensor):
            value = value.meta.get("filename_or_obj", "")
        if isinstance(value, str) and value:
            names.append(f"{key}='{value}'")
    return "case " + ", ".join(names) if names else "a case"


class _CaseCompose(Compose):
    """``Compose`` whose errors name the case's files (MONAI's own message names the transform)."""

    def __call__(self, input_, *args, **kwargs):  # type: ignore[override]
        try:
            return super().__call__(input_, *args, **kwargs)
        except Exception as err:
            root = _root_cause(err)
            cls: type[Exception] = RuntimeError
            for candidate in (FileNotFoundError, ValueError):
                if isinstance(root, candidate):
                    cls = candidate
                    break
            raise cls(
                f"failed to load/transform {_describe_case(input_)}: {type(root).__name__}: {root}"
            ) from err


@dataclass(frozen=True)
class SegmentationPipelines:
    """MONAI dictionary-transform pipelines of ``{"image", "label"[, "mask"]}`` cases.

    * every stage: ``LoadImaged`` (nibabel) -> ``EnsureChannelFirstd`` -> ``CheckImageLabeld`` ->
      ``IgnoreMaskd`` (writes ``"mask"``: 0 at the ignore label and outside the case's ROI
      mask) -> ``Orientationd("RAS")`` -> ``Spacingd`` (if ``spacing``; bilinear image, nearest
      label and mask) -> intensity normalisation;
    * :meth:`train`: ``SpatialPadd(roi_size)`` (padded voxels get mask 0) -> ``num_samples``
      patches per volume, chosen by ``crop_sampling`` -> ``LabelToRegionsd`` (if ``regions``)
      -> random flips on ``flip_axes`` and intensity scale/shift (if ``augment``) -> plain
      float32 tensors;
    * :meth:`evaluate`: whole volumes, ``LabelToRegionsd`` (if ``regions``), ``MetaTensor``
      values (for sliding-window inference and :meth:`invert`);
    * :meth:`predict`: images only, whole volumes, ``MetaTensor`` values.

    The settings are checked, and the sequences stored as tuples, at construction.

    Attributes:
        in_channels: image channels (a positive integer).
        num_label_values: label values ``0..L-1`` that are classes (the ignore label aside; a
            positive integer).
        ignore_index: the label value to ignore (an integer outside ``0..L-1``), or ``None``.
        regions: multi-label mode: region name -> label values in ``0..L-1`` (stored as
            tuples); ``None``: label maps.
        roi_size: training patch size (3 positive integers).
        num_samples: patches per volume (a positive integer).
        crop_sampling: where training patches are centred. ``"pos_neg"``
            (``RandCropByPosNegLabeld``, pos:neg 1:1): half on a labelled voxel of a class other
            than 0, half on a voxel of class 0, both inside the mask (not ignored, not padding).
            ``"classes"`` (``RandCropByLabelClassesd``): on a voxel of a class drawn uniformly
            from the classes ``0..L-1`` present in the volume's mask, so a small class is the
            centre as often as a large one; a class absent from a volume is not drawn.
            ``"random"`` (``RandSpatialCropSamplesd``): anywhere in the padded volume, labels
            not looked at (a plain MONAI loop's crops).
        spacing: target voxel size in mm; ``None`` keeps each volume's own.
        intensity: ``"zscore"`` (per channel, non-zero voxels), ``"ct"`` (clip to ``ct_window``,
            scale to [0, 1]) or ``"none"``.
        ct_window: Hounsfield window of ``intensity="ct"``.
        augment: random flips (on ``flip_axes``) and intensity scale/shift in training.
        flip_axes: spatial axes flipped in training (after RAS: 0 left-right, 1
            posterior-anterior, 2 inferior-superior).
        seed: seed of the training pipeline's random state.

    Raises:
        ValueError: ``in_channels``, ``num_label_values`` or ``num_samples`` is not a positive
            integer; ``crop_sampling`` is none of the three above; ``ignore_index`` is not
            ``None`` or an integer outside ``[0, num_label_values)``; ``regions`` is empty, or
            a region lists no value or a value that is not an integer in
            ``[0, num_label_values)``; a ``roi_size``, ``spacing``, ``intensity``,
            ``ct_window`` or ``flip_axes`` other than described above (sizes must
            be positive integers, ``spacing`` finite and positive). Each message names the
            argument and the value.

    Example:
        >>> pipelines = SegmentationPipelines(in_channels=1, num_label_values=3, roi_size=(8, 8, 8))
        >>> [type(t).__name__ for t in pipelines.predict().transforms][:3]
        ['LoadImaged', 'EnsureChannelFirstd', 'CheckImageLabeld']
    """

    in_channels: int
    num_label_values: int
    ignore_index: int | None = None
    regions: Mapping[str, Sequence[int]] | None = None
    roi_size: tuple[int, ...] = (96, 96, 96)
    num_samples: int = 2
    crop_sampling: Literal["pos_neg", "classes", "random"] = "pos_neg"
    spacing: tuple[float, ...] | None = None
    intensity: Literal["zscore", "ct", "none"] = "zscore"
    ct_window: tuple[float, float] = (-175.0, 250.0)
    augment: bool = True
    flip_axes: tuple[int, ...] = ()
    seed: int = 0

    orientation: Orientationd = field(init=False, repr=False, compare=False)
    """The ``Orientationd("RAS")`` of every stage (one instance: :meth:`invert` needs it)."""
    resampling: Spacingd | None = field(init=False, repr=False, compare=False)
    """The ``Spacingd`` of every stage (``None`` without ``spacing``)."""

    def __post_init__(self) -> None:
        self._check_settings()
        orientation = Orientationd(
            keys=CASE_KEYS, axcodes="RAS", labels=_RAS_LABELS, allow_missing_keys=True
        )
        resampling = None
        if self.spacing is not None:
            resampling = Spacingd(
                keys=CASE_KEYS,
                pixdim=self.spacing,
                mode=("bilinear", "nearest", "nearest"),
                allow_missing_keys=True,
            )
        object.__setattr__(self, "orientation", orientation)
        object.__setattr__(self, "resampling", resampling)

    def _check_settings(self) -> None:
        """Check the settings and store the sequences as tuples of numbers."""
        in_channels = check_count("in_channels", self.in_channels)
        num_label_values = check_count("num_label_values", self.num_label_values)
        num_samples = check_count("num_samples", self.num_samples)
        ignore_index = self.ignore_index
        if ignore_index is not None:
            if integer_or_none(ignore_index) is None or 0 <= ignore_index < num_label_values:
                raise ValueError(
                    f"ignore_index must be None or an integer outside the class values "
                    f"[0, {num_label_values}), got {ignore_index!r}."
                )
            ignore_index = int(ignore_index)
        regions = None if self.regions is None else self._checked_regions(num_label_values)
        roi_size = tuple(map(integer_or_none, self.roi_size))
        if len(roi_size) != 3 or None in roi_size or min(roi_size) < 1:
            raise ValueError(f"roi_size must be 3 positive integers, got {tuple(self.roi_size)}.")
        spacing = self.spacing
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
                raise ValueError(
                    f"spacing must be None or 3 finite positive sizes, got {tuple(self.spacing)}."
                )
        if self.crop_sampling not in ("pos_neg", "classes", "random"):
            raise ValueError(
                f"crop_sampling must be 'pos_neg', 'classes' or 'random', "
                f"got {self.crop_sampling!r}."
            )
        if self.intensity not in ("zscore", "ct", "none"):
            raise ValueError(f"intensity must be 'zscore', 'ct' or 'none', got {self.intensity!r}.")
        ct_window = tuple(float(v) for v in self.ct_window)
        if (
            len(ct_window) != 2
            or not all(map(math.isfinite, ct_window))
            or ct_window[0] >= ct_window[1]
        ):
            raise ValueError(
                f"ct_window must be finite (min, max) with min < max, got {tuple(self.ct_window)}."
            )
        flip_axes = tuple(int(a) for a in self.flip_axes)
        if any(a not in (0, 1, 2) for a in flip_axes) or len(set(flip_axes)) != len(flip_axes):
            raise ValueError(
                f"flip_axes must be distinct spatial axes in (0, 1, 2) (0: left-right, 1: "
                f"posterior-anterior, 2: inferior-superior after RAS), got {tuple(self.flip_axes)}."
            )
        for name, value in (
            ("in_channels", in_channels),
            ("num_label_values", num_label_values),
            ("num_samples", num_samples),
            ("ignore_index", ignore_index),
            ("regions", regions),
            ("roi_size", roi_size),
            ("spacing", spacing),
            ("ct_window", ct_window),
            ("flip_axes", flip_axes),
        ):
            object.__setattr__(self, name, value)

    def _checked_regions(self, num_label_values: int) -> dict[str, tuple[int, ...]]:
        """``regions`` as name -> tuple of label values, each an integer in the class range."""
        regions = self.regions
        if not isinstance(regions, Mapping) or not regions:
            raise ValueError(
                f"regions must be None or a non-empty mapping of region name -> label values, "
                f"got {regions!r}."
            )
        checked: dict[str, tuple[int, ...]] = {}
        for name, values in regions.items():
            listed = region_values(name, values)
            bad = [v for v in listed if not 0 <= v < num_label_values]
            if bad:
                raise ValueError(
                    f"regions['{name}'] must list integer label values in "
                    f"[0, {num_label_values}), got {bad!r} in {list(listed)!r}."
                )
            checked[str(name)] = tuple(int(v) for v in listed)
        return checked

    def _common(self, keys: Sequence[str]) -> list[Any]:
        """The deterministic part of every stage."""
        xforms: list[Any] = [
            LoadImaged(keys=keys, reader="NibabelReader", image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys=keys, allow_missing_keys=True),
            CheckImageLabeld(
                keys=("label", "mask"),
                num_channels=self.in_channels,
                num_classes=self.num_label_values,
                ignore_index=self.ignore_index,
            ),
        ]
        if "label" in keys:
            xforms.append(
                IgnoreMaskd(
                    keys="label",
                    ignore_index=self.ignore_index,
                    mask_key="mask",
                    roi_mask_key="mask",
                    allow_missing_keys=True,
                )
            )
        xforms += [t for t in (self.orientation, self.resampling) if t is not None]
        if self.intensity == "zscore":
            xforms.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
        elif self.intensity == "ct":
            lo, hi = self.ct_window
            xforms.append(
                ScaleIntensityRanged(
                    keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True
                )
            )
        return xforms

    def _regions(self) -> list[Any]:
        regions = self.regions
        return [] if regions is None else [LabelToRegionsd(keys="label", regions=dict(regions))]

    def _crop(self) -> Any:
        """The transform that cuts ``num_samples`` training patches out of a padded volume."""
        if self.crop_sampling == "random":
            return RandSpatialCropSamplesd(
                keys=CASE_KEYS, roi_size=self.roi_size, num_samples=self.num_samples,
                random_size=False,
            )  # fmt: skip
        # centres only where the mask is 1: not on ignored voxels, not on padding
        inside_mask = {"image_key": "mask", "image_threshold": 0.5}
        if self.crop_sampling == "classes":
            return RandCropByLabelClassesd(
                keys=CASE_KEYS, label_key="label", spatial_size=self.roi_size,
                num_classes=self.num_label_values, num_samples=self.num_samples,
                warn=False, **inside_mask,
            )  # fmt: skip
        return RandCropByPosNegLabeld(
            keys=CASE_KEYS, label_key="label", spatial_size=self.roi_size, pos=1.0, neg=1.0,
            num_samples=self.num_samples, **inside_mask,
        )  # fmt: skip

    def train(self) -> Compose:
        """The training pipeline (random patches, augmentation), seeded with ``seed``."""
        xforms = self._common(CASE_KEYS)
        xforms += [SpatialPadd(keys=CASE_KEYS, spatial_size=self.roi_size), self._crop()]
        xforms += self._regions()
        if self.augment:
            xforms += [RandFlipd(keys=CASE_KEYS, prob=0.5, spatial_axis=a) for a in self.flip_axes]
            xforms += [
                RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            ]
        xforms.append(EnsureTyped(keys=CASE_KEYS, dtype=torch.float32, track_meta=False))
        compose = _CaseCompose(xforms)
        compose.set_random_state(seed=self.seed)
        return compose

    def evaluate(self) -> Compose:
        """The validation/test pipeline: whole volumes, ``MetaTensor`` values kept."""
        xforms = self._common(CASE_KEYS) + self._regions()
        xforms.append(EnsureTyped(keys=CASE_KEYS, dtype=torch.float32, track_meta=True))
        return _CaseCompose(xforms)

    def predict(self) -> Compose:
        """The prediction pipeline: the image only, whole volume, ``MetaTensor`` kept."""
        xforms = self._common(("image",))
        xforms.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=True))
        return _CaseCompose(xforms)

    def invert(self, pred: torch.Tensor, image: MetaTensor, nearest: bool = True) -> MetaTensor:
        """Map a prediction back to the original image space (undo orientation and spacing).

        Args:
            pred: ``(C, *S)`` or ``(1, C, *S)`` prediction on the grid of ``image``, e.g. an
                argmax label map ``(1, *S)`` or probabilities ``(C, *S)``.
            image: the ``"image"`` of an evaluation or predict batch, ``(C_in, *S)`` or
                ``(1, C_in, *S)`` (batch size 1), a ``MetaTensor`` with its applied operations.
            nearest: resample with nearest-neighbour (label maps); False uses the image's
                interpolation (probabilities).

        Returns:
            ``MetaTensor`` ``(C, *S_orig)`` on the CPU with the original file's shape and affine.

        Raises:
            TypeError: ``image`` is not a ``MetaTensor``.
            ValueError: a batch holds more than one item, or ``pred`` and ``image`` differ in
                spatial shape.
        """
        if not isinstance(image, MetaTensor):
            raise TypeError(
                f"image must be the MetaTensor of a batch (with its applied operations), got "
                f"{type(image).__name__}."
            )
        image = image.detach().cpu()
        if image.is_batch:
            items = decollate_batch(image)
            if len(items) != 1:
                raise ValueError(f"invert one case at a time, got a batch of {len(items)}.")
            image = items[0]
        pred = pred.detach().cpu()
        pred = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
        if pred.ndim == image.ndim + 1:
            if pred.shape[0] != 1:
                raise ValueError(f"invert one case at a time, got a batch of {pred.shape[0]}.")
            pred = pred[0]
        if pred.ndim != image.ndim or pred.shape[1:] != image.shape[1:]:
            raise ValueError(
                f"pred of shape {tuple(pred.shape)} does not fit image of shape "
                f"{tuple(image.shape)} (spatial shapes must match)."
            )
        inverse = [t for t in (self.orientation, self.resampling) if t is not None]
        inverter = Invertd(
            keys="pred", transform=Compose(inverse), orig_keys="image", nearest_interp=nearest
        )
        out = inverter({"pred": MetaTensor(pred), "image": image})["pred"]
        if pred.dtype != out.dtype and not pred.is_floating_point() and nearest:
            out = out.round().to(pred.dtype)
        return out
