"""Medical Segmentation Decathlon (MSD) data as a LightningDataModule.

Layout read by :class:`SegmentationDataModule` (the MSD layout)::

    data_dir/
      dataset.json        "labels", "modality", "training": [{"image", "label"[, "mask"]}], "test"
      imagesTr/*.nii.gz   3D, or 4D with modalities last
      labelsTr/*.nii.gz   integer label maps (may contain the ignore label)
      imagesTs/*.nii.gz   images for prediction

``dataset.json`` is read by :meth:`~lovasz_monai.dataset.DatasetDescription.from_json` and the
cases are split by :func:`~lovasz_monai.dataset.split_cases` (both without Lightning). This module
also re-exports :func:`~lovasz_monai.synthetic.make_synthetic_dataset`, which writes such a folder
with random volumes, and :func:`~lovasz_monai.writer.save_prediction`.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import pytorch_lightning as pl
import torch
from monai.data import (
    CacheDataset,
    DataLoader,
    MetaTensor,
    decollate_batch,
    list_data_collate,
)
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from lovasz_monai.dataset import CASE_KEYS as _KEYS
from lovasz_monai.dataset import DatasetDescription, lateralised_labels, split_cases
from lovasz_monai.synthetic import make_synthetic_dataset
from lovasz_monai.transforms import CheckImageLabeld, IgnoreMaskd, LabelToRegionsd
from lovasz_monai.writer import save_prediction

__all__ = [
    "SegmentationDataModule",
    "describe_dataset",
    "make_synthetic_dataset",
    "save_prediction",
]

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


# --------------------------------------------------------------------------------------------
# case-error messages
# --------------------------------------------------------------------------------------------


def _header_shape(path: str) -> tuple[int, ...]:
    """Shape from a NIfTI header (no voxel data read); raises ValueError naming the file."""
    try:
        return tuple(nib.load(path).shape)
    except Exception as err:  # nibabel raises several types (ImageFileError, OSError, ...)
        raise ValueError(f"cannot read NIfTI file '{path}': {type(err).__name__}: {err}") from err


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _describe_case(data: Any) -> str:
    if not isinstance(data, Mapping):
        return "a case"
    names = []
    for key in _KEYS:
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


# --------------------------------------------------------------------------------------------
# the DataModule
# --------------------------------------------------------------------------------------------


def describe_dataset(
    data_dir: str | os.PathLike,
    synthetic: bool = False,
    synthetic_kwargs: dict[str, Any] | None = None,
    *,
    ignore_index: int | None = None,
    regions: dict[str, Sequence[int]] | None = None,
) -> DatasetDescription:
    """The :class:`~lovasz_monai.dataset.DatasetDescription` of ``<data_dir>/dataset.json``,
    written first by :func:`make_synthetic_dataset` when ``synthetic`` and missing.

    Args:
        data_dir: folder of the dataset (MSD layout).
        synthetic, synthetic_kwargs: as in :class:`SegmentationDataModule`.
        ignore_index, regions: see :meth:`DatasetDescription.from_json`.

    Returns:
        The frozen description.

    Raises:
        FileNotFoundError: no ``dataset.json`` and not ``synthetic``.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> description = describe_dataset(
        ...     folder, synthetic=True, synthetic_kwargs={"num_cases": 2, "size": (8, 8, 8)}
        ... )
        >>> description.num_classes, description.in_channels
        (3, 1)
    """
    dataset_json = Path(data_dir) / "dataset.json"
    if not dataset_json.is_file():
        if not synthetic:
            raise FileNotFoundError(
                f"{dataset_json} not found: data_dir must hold a Medical Segmentation Decathlon "
                "style dataset.json (or pass synthetic=True to write a synthetic dataset there)."
            )
        make_synthetic_dataset(data_dir, **(synthetic_kwargs or {}))
    return DatasetDescription.from_json(dataset_json, ignore_index=ignore_index, regions=regions)


class SegmentationDataModule(pl.LightningDataModule):
    """LightningDataModule for 3D segmentation data in the Medical Segmentation Decathlon layout.

    Reads ``data_dir/dataset.json`` (paths in it are relative to ``data_dir``) and builds MONAI
    dictionary-transform pipelines over ``CacheDataset``:

    * all stages: ``LoadImaged`` (nibabel) -> ``EnsureChannelFirstd`` -> ``CheckImageLabeld`` ->
      ``IgnoreMaskd`` (writes ``"mask"``) -> ``Orientationd("RAS")`` -> ``Spacingd`` (if
      ``spacing``; bilinear image, nearest label and mask) -> intensity normalisation;
    * training: ``SpatialPadd(roi_size)`` (padded voxels get mask 0) ->
      ``RandCropByPosNegLabeld`` (``num_samples`` patches per volume, centres on voxels with
      mask 1) -> ``LabelToRegionsd`` (if ``regions``) -> random flips on ``flip_axes`` (none by
      default) and intensity scale/shift (if ``augment``); batches of
      ``batch_size * num_samples`` patches, plain tensors;
    * validation / test: whole volumes, batch size 1, ``MetaTensor`` values (for
      ``sliding_window_inference`` and :meth:`invert_prediction`);
    * predict: images only, whole volumes, batch size 1, ``MetaTensor`` values.

    Batches are dicts:

    * ``"image"``: ``(B, in_channels, *S)`` float32;
    * ``"label"``: ``(B, 1, *S)`` float32 label map with integer values in ``[0, num_classes)``
      (ignored voxels replaced by 0), or ``(B, R, *S)`` float32 0/1 regions in multi-label mode;
    * ``"mask"``: ``(B, 1, *S)`` float32, 1 = voxel counts, 0 = ignored (ignore label, outside
      the case's ROI mask, or padding).

    Predict batches hold ``"image"`` only.

    ``dataset.json`` ``"labels"`` may be in MSD form (``{"0": "background", "1": "liver"}``) or
    nnU-Net v2 form (``{"background": 0, "liver": 1}``, list values define regions). An entry
    named ``"ignore"`` defines the ignore label and is not a class. ``"training"`` entries are
    ``{"image", "label"}`` with an optional ``"mask"`` (region-of-interest image, non-zero =
    counts). ``"test"`` entries are image paths, or dicts with ``"image"`` and optionally
    ``"label"``. The number of image channels comes from ``"modality"`` (or nnU-Net's
    ``"channel_names"``), default 1.

    The split into training and validation cases is a seeded shuffle: with ``val_fraction > 0``
    and at least 2 cases there is at least one validation case (and one training case).

    Args:
        data_dir: folder holding ``dataset.json``.
        synthetic: if True and ``data_dir`` has no ``dataset.json``, write a synthetic dataset
            there first with :func:`make_synthetic_dataset` (an existing one is reused).
        synthetic_kwargs: keyword arguments for :func:`make_synthetic_dataset`.
        roi_size: training patch size ``(X, Y, Z)``; also the sliding-window size for the model.
        batch_size: volumes per training batch (each gives ``num_samples`` patches).
        num_samples: patches cropped per volume by ``RandCropByPosNegLabeld`` (pos:neg = 1:1).
        num_workers: DataLoader worker processes (and cache-filling threads); workers are
            persistent. Default 2: on 2 CPU cores, loading in the main process made the loop
            wait 22 ms per 63 ms step of the demo, 2 workers 2 ms (``benchmarks/RESULTS.md``).
        cache_rate: fraction of cases whose deterministic transforms are cached in memory.
        val_fraction: fraction of the ``training`` cases held out for validation, in [0, 1).
        seed: seed of the split and of the training augmentation.
        spacing: target voxel size in mm; ``None`` keeps each volume's own voxel size.
        intensity: ``"zscore"`` (per channel, over non-zero voxels), ``"ct"`` (clip to
            ``ct_window`` and scale to [0, 1]) or ``"none"``.
        ct_window: Hounsfield window ``(min, max)`` for ``intensity="ct"``.
        ignore_index: label value to ignore; ``None`` takes it from a ``dataset.json`` label
            named ``"ignore"`` (if any).
        regions: multi-label mode: region name -> label values, e.g.
            ``{"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]}``; ``None`` uses nnU-Net-style regions
            from ``dataset.json`` if it has any, else single-label (softmax) mode.
        predict_images: folder (``*.nii.gz``, ``*.nii``), file or glob pattern of images to
            predict (relative to the working directory); ``None``: ``dataset.json`` ``"test"``.
        augment: random flips (on ``flip_axes``) and intensity scale/shift in training.
        flip_axes: the spatial axes that training flips (each with probability 0.5, with
            ``augment``), after ``Orientationd("RAS")``: 0 left-right, 1 posterior-anterior, 2
            inferior-superior. Default ``()``: no flips. On the subcortical atlas task
            (README) flips on axes 1 and 2 cost 0.055 per-case mIoU and left-right flips 0.047
            more: anatomy in a standard orientation is better learned unflipped, and a
            left-right flip of image and label puts a left structure on the right still
            labelled "left". Add axes for data without a fixed orientation; a warning names
            the lateralised labels when axis 0 is added.

    Attributes:
        class_names: output channel names: class names (without ``"ignore"``), or region names
            in multi-label mode.
        num_classes: ``len(class_names)``, the number of output channels of the network.
        multi_label: True when ``regions`` are used (sigmoid outputs).
        ignore_index: the ignore label value in the files, or None.
        in_channels: number of image channels (modalities).
        label_names: names of the integer label values ``0..L-1`` in the files.
        train_files, val_files, test_files: the case dicts of each split (paths joined to
            ``data_dir``); ``test_files`` is empty when ``dataset.json`` has no labelled test
            cases. ``predict_files`` is filled by ``setup("predict")``.
        description: the :class:`~lovasz_monai.dataset.DatasetDescription` read from
            ``dataset.json``; the attributes above come from it (lists instead of tuples), the
            training/validation split from :func:`~lovasz_monai.dataset.split_cases`.

    Raises:
        FileNotFoundError: ``dataset.json`` is missing (and ``synthetic`` is False), or a file it
            lists does not exist (all missing files are named).
        ValueError: ``dataset.json`` is not valid JSON, lacks ``"labels"`` or has malformed labels
            or entries (the message names ``dataset.json``); a region uses an unknown label value;
            an argument is out of range. In :meth:`setup`: an unreadable NIfTI file or an
            image/label/mask shape mismatch (naming the files).

    Example:
        >>> import tempfile
        >>> dm = SegmentationDataModule(
        ...     tempfile.mkdtemp(), synthetic=True, roi_size=(16, 16, 16),
        ...     synthetic_kwargs={"num_cases": 3, "num_test": 1, "size": (16, 16, 16)},
        ... )
        >>> dm.class_names, dm.num_classes, dm.ignore_index, dm.in_channels
        (['background', 'class_1', 'class_2'], 3, 255, 1)
        >>> len(dm.train_files), len(dm.val_files)
        (2, 1)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> [tuple(batch[k].shape) for k in ("image", "label", "mask")]
        [(4, 1, 16, 16, 16), (4, 1, 16, 16, 16), (4, 1, 16, 16, 16)]
    """

    def __init__(
        self,
        data_dir: str | os.PathLike = "data/synthetic",
        synthetic: bool = False,
        synthetic_kwargs: dict[str, Any] | None = None,
        roi_size: Sequence[int] = (96, 96, 96),
        batch_size: int = 2,
        num_samples: int = 2,
        num_workers: int = 2,
        cache_rate: float = 1.0,
        val_fraction: float = 0.2,
        seed: int = 0,
        spacing: Sequence[float] | None = None,
        intensity: Literal["zscore", "ct", "none"] = "zscore",
        ct_window: Sequence[float] = (-175.0, 250.0),
        ignore_index: int | None = None,
        regions: dict[str, list[int]] | None = None,
        predict_images: str | None = None,
        augment: bool = True,
        flip_axes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.roi_size = tuple(int(s) for s in roi_size)
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be 3 positive sizes, got {tuple(roi_size)}.")
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise ValueError(f"spacing must be None or 3 positive sizes, got {tuple(spacing)}.")
        if batch_size < 1 or num_samples < 1 or num_workers < 0:
            raise ValueError(
                f"need batch_size >= 1, num_samples >= 1, num_workers >= 0, got {batch_size}, "
                f"{num_samples}, {num_workers}."
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if not 0.0 <= cache_rate <= 1.0:
            raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate}.")
        if intensity not in ("zscore", "ct", "none"):
            raise ValueError(f"intensity must be 'zscore', 'ct' or 'none', got {intensity!r}.")
        if len(ct_window) != 2 or ct_window[0] >= ct_window[1]:
            raise ValueError(f"ct_window must be (min, max) with min < max, got {ct_window}.")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.num_workers = num_workers
        self.cache_rate = cache_rate
        self.val_fraction = val_fraction
        self.seed = seed
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.intensity = intensity
        self.ct_window = (float(ct_window[0]), float(ct_window[1]))
        self.predict_images = predict_images
        self.augment = augment
        self.flip_axes = tuple(int(a) for a in flip_axes)
        if any(a not in (0, 1, 2) for a in self.flip_axes) or len(set(self.flip_axes)) != len(
            self.flip_axes
        ):
            raise ValueError(
                f"flip_axes must be distinct spatial axes in (0, 1, 2) (0: left-right, 1: "
                f"posterior-anterior, 2: inferior-superior after RAS), got {tuple(flip_axes)}."
            )

        self.dataset_json = self.data_dir / "dataset.json"
        description = describe_dataset(
            self.data_dir, synthetic, synthetic_kwargs, ignore_index=ignore_index, regions=regions
        )
        self.description = description
        self.label_names = list(description.label_names)
        self.ignore_index: int | None = description.ignore_index
        self.regions: dict[str, list[int]] | None = (
            None
            if description.regions is None
            else {name: list(values) for name, values in description.regions.items()}
        )
        self.multi_label = description.multi_label
        sided = lateralised_labels(description.label_names)
        if augment and 0 in self.flip_axes and sided:
            warnings.warn(
                f"flip_axes={self.flip_axes} flips left and right, but labels say left or right "
                f"({', '.join(sided[:4])}{', ...' if len(sided) > 4 else ''}): a flipped left "
                "structure stays labelled left, so these classes cannot be learned. Leave axis 0 "
                "out of flip_axes (the default flips nothing).",
                stacklevel=2,
            )
        self.class_names: list[str] = list(description.class_names)
        self.num_classes = description.num_classes
        self.in_channels = description.in_channels
        self.all_train_files = [dict(case) for case in description.training]
        self.test_files = [dict(case) for case in description.test]
        self._json_predict_files = [{"image": image} for image in description.predict_images]

        if val_fraction > 0 and len(self.all_train_files) == 1:
            warnings.warn(
                f"{self.dataset_json} has a single training case: no validation split.",
                stacklevel=2,
            )
        self.train_files, self.val_files = split_cases(self.all_train_files, val_fraction, seed)

        self._orientation = Orientationd(
            keys=_KEYS, axcodes="RAS", labels=_RAS_LABELS, allow_missing_keys=True
        )
        self._spacing = (
            None
            if self.spacing is None
            else Spacingd(
                keys=_KEYS,
                pixdim=self.spacing,
                mode=("bilinear", "nearest", "nearest"),
                allow_missing_keys=True,
            )
        )
        self.predict_files: list[dict[str, str]] = []  # filled by setup("predict")
        self._checked: set[str] = set()
        self.train_ds: CacheDataset | None = None
        self.val_ds: CacheDataset | None = None
        self.test_ds: CacheDataset | None = None
        self.predict_ds: CacheDataset | None = None

    # ---------------------------------------------------------------------------- dataset.json
    def _resolve_predict_files(self) -> list[dict[str, str]]:
        if self.predict_images is None:
            files = self._json_predict_files
            if not files:
                raise FileNotFoundError(
                    f"{self.dataset_json} lists no 'test' images to predict; set predict_images."
                )
            return files
        path = Path(self.predict_images)
        if path.is_dir():
            found = sorted(path.glob("*.nii.gz")) + sorted(path.glob("*.nii"))
            names = [str(p) for p in found if not p.name.startswith(".")]  # e.g. macOS "._x"
        elif path.is_file():
            names = [str(path)]
        else:
            names = sorted(glob.glob(self.predict_images))
        if not names:
            raise FileNotFoundError(
                f"predict_images '{self.predict_images}' matches no image files."
            )
        return [{"image": os.path.normpath(p)} for p in names]

    def _check_headers(self, cases: Sequence[Mapping[str, str]]) -> None:
        """Read every file's NIfTI header (no voxel data): readable, matching spatial shapes."""
        for case in cases:
            key = "|".join(case.values())
            if key in self._checked:
                continue
            shapes = {k: _header_shape(p) for k, p in case.items()}
            image_shape = shapes["image"][:3]
            for k in ("label", "mask"):
                if k in shapes and shapes[k][:3] != image_shape:
                    raise ValueError(
                        f"spatial shape mismatch: image '{case['image']}' has {image_shape} but "
                        f"{k} '{case[k]}' has {shapes[k][:3]}."
                    )
            self._checked.add(key)

    # ---------------------------------------------------------------------------- transforms
    def _pre_transforms(self, keys: Sequence[str]) -> list[Any]:
        """Deterministic part shared by all stages (load, check, mask, orientation, spacing,
        intensity)."""
        labelled = "label" in keys
        xforms: list[Any] = [
            LoadImaged(keys=keys, reader="NibabelReader", image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys=keys, allow_missing_keys=True),
            CheckImageLabeld(
                keys=("label", "mask"),
                num_channels=self.in_channels,
                num_classes=len(self.label_names),
                ignore_index=self.ignore_index,
            ),
        ]
        if labelled:
            xforms.append(
                IgnoreMaskd(
                    keys="label",
                    ignore_index=self.ignore_index,
                    mask_key="mask",
                    roi_mask_key="mask",
                    allow_missing_keys=True,
                )
            )
        xforms.append(self._orientation)
        if self._spacing is not None:
            xforms.append(self._spacing)
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

    def _regions_transform(self) -> list[Any]:
        return [] if self.regions is None else [LabelToRegionsd(keys="label", regions=self.regions)]

    def train_transforms(self) -> Compose:
        """The training pipeline (see the class docstring)."""
        xforms = self._pre_transforms(_KEYS)
        xforms += [
            SpatialPadd(keys=_KEYS, spatial_size=self.roi_size),
            RandCropByPosNegLabeld(
                keys=_KEYS,
                label_key="label",
                spatial_size=self.roi_size,
                pos=1.0,
                neg=1.0,
                num_samples=self.num_samples,
                image_key="mask",
                image_threshold=0.5,
            ),
        ]
        xforms += self._regions_transform()
        if self.augment:
            xforms += [RandFlipd(keys=_KEYS, prob=0.5, spatial_axis=a) for a in self.flip_axes]
            xforms += [
                RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            ]
        xforms.append(EnsureTyped(keys=_KEYS, dtype=torch.float32, track_meta=False))
        compose = _CaseCompose(xforms)
        compose.set_random_state(seed=self.seed)
        return compose

    def eval_transforms(self) -> Compose:
        """Validation/test pipeline: whole volumes, ``MetaTensor`` values kept."""
        xforms = self._pre_transforms(_KEYS) + self._regions_transform()
        xforms.append(EnsureTyped(keys=_KEYS, dtype=torch.float32, track_meta=True))
        return _CaseCompose(xforms)

    def predict_transforms(self) -> Compose:
        """Prediction pipeline: image only, whole volume, ``MetaTensor`` kept."""
        xforms = self._pre_transforms(("image",))
        xforms.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=True))
        return _CaseCompose(xforms)

    # ---------------------------------------------------------------------------- Lightning
    def _dataset(self, files: list[dict[str, str]], transform: Compose) -> CacheDataset:
        self._check_headers(files)
        return CacheDataset(
            data=files,
            transform=transform,
            cache_rate=self.cache_rate,
            num_workers=max(1, self.num_workers),
            progress=False,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` ("fit", "validate", "test", "predict"; None: fit and
        test). Reads every NIfTI header first, then fills the cache.

        Raises:
            ValueError: no training cases (fit), an unreadable NIfTI file, or mismatched
                image/label/mask shapes (naming the files).
            FileNotFoundError: nothing to predict (predict).
        """
        if stage in ("fit", None):
            if not self.train_files:
                raise ValueError(f"{self.dataset_json} lists no 'training' cases.")
            if self.train_ds is None:
                self.train_ds = self._dataset(self.train_files, self.train_transforms())
        if stage in ("fit", "validate", None) and self.val_ds is None and self.val_files:
            self.val_ds = self._dataset(self.val_files, self.eval_transforms())
        if stage in ("test", None) and self.test_ds is None:
            files = self.test_files or self.val_files
            if files:
                self.test_ds = self._dataset(files, self.eval_transforms())
        if stage == "predict" and self.predict_ds is None:
            self.predict_files = self._resolve_predict_files()
            self.predict_ds = self._dataset(self.predict_files, self.predict_transforms())

    def _loader(self, dataset: CacheDataset | None, stage: str, **kwargs: Any) -> DataLoader:
        if dataset is None:
            self.setup(stage)
            dataset = {
                "fit": self.train_ds,
                "validate": self.val_ds,
                "test": self.test_ds,
                "predict": self.predict_ds,
            }[stage]
        if dataset is None:
            raise ValueError(f"no cases for stage '{stage}' in {self.dataset_json}.")
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            collate_fn=list_data_collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Patches: ``batch_size * num_samples`` per batch, shuffled, plain tensors."""
        return self._loader(self.train_ds, "fit", batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Whole validation volumes, batch size 1; ``[]`` when there is no validation split
        (``val_fraction=0`` or a single case)."""
        if not self.val_files:
            return []
        return self._loader(self.val_ds, "validate", batch_size=1, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Whole labelled volumes, batch size 1: the ``dataset.json`` ``"test"`` cases when they
        all have labels, otherwise the validation split."""
        return self._loader(self.test_ds, "test", batch_size=1, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Images only (``predict_images`` or ``dataset.json`` ``"test"``), batch size 1, with
        metadata for :meth:`invert_prediction`."""
        return self._loader(self.predict_ds, "predict", batch_size=1, shuffle=False)

    # ---------------------------------------------------------------------------- inversion
    def invert_prediction(
        self, pred: torch.Tensor, image: MetaTensor, nearest: bool = True
    ) -> MetaTensor:
        """Map a prediction back to the original image space (undo orientation and spacing).

        Args:
            pred: ``(C, *S)`` or ``(1, C, *S)`` prediction on the grid of ``image``, e.g. an
                argmax label map ``(1, *S)`` or probabilities ``(C, *S)``.
            image: the ``"image"`` of a validation, test or predict batch, ``(C_in, *S)`` or
                ``(1, C_in, *S)`` (batch size 1), a ``MetaTensor`` with its applied operations.
            nearest: resample with nearest-neighbour (label maps); False uses the image's
                interpolation (probabilities).

        Returns:
            ``MetaTensor`` ``(C, *S_orig)`` on the CPU with the original file's shape and affine;
            write it with :func:`save_prediction`.

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
        inverse = [self._orientation] + ([self._spacing] if self._spacing is not None else [])
        inverter = Invertd(
            keys="pred", transform=Compose(inverse), orig_keys="image", nearest_interp=nearest
        )
        out = inverter({"pred": MetaTensor(pred), "image": image})["pred"]
        if pred.dtype != out.dtype and not pred.is_floating_point() and nearest:
            out = out.round().to(pred.dtype)
        return out

    def __str__(self) -> str:  # Lightning's __str__ would build every dataloader
        return repr(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(data_dir='{self.data_dir}', classes={self.class_names}, "
            f"multi_label={self.multi_label}, ignore_index={self.ignore_index}, "
            f"in_channels={self.in_channels}, train={len(self.train_files)}, "
            f"val={len(self.val_files)})"
        )
