"""Medical Segmentation Decathlon (MSD) data as a LightningDataModule.

Layout read by :class:`SegmentationDataModule` (the MSD layout)::

    data_dir/
      dataset.json        "labels", "modality", "training": [{"image", "label"[, "mask"]}], "test"
      imagesTr/*.nii.gz   3D, or 4D with modalities last
      labelsTr/*.nii.gz   integer label maps (may contain the ignore label)
      imagesTs/*.nii.gz   images for prediction

``dataset.json`` is read by :func:`~lovasz_monai.dataset.describe_dataset` and the cases are
split by :func:`~lovasz_monai.dataset.split_cases`; the transforms are
:class:`~lovasz_monai.pipelines.SegmentationPipelines` (all without Lightning).
:func:`~lovasz_monai.synthetic.make_synthetic_dataset` writes such a folder with random volumes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor, list_data_collate
from monai.transforms import Compose

from lovasz_monai import dataset as _dataset
from lovasz_monai import synthetic as _synthetic
from lovasz_monai import writer as _writer
from lovasz_monai.dataset import check_case_headers, find_images, lateralised_labels, split_cases
from lovasz_monai.functional import check_count
from lovasz_monai.labels import LabelSemantics
from lovasz_monai.pipelines import SegmentationPipelines

__all__ = ["SegmentationDataModule"]

#: names this module re-exported in version 0.1, and their homes (importing them warns)
_FORMER_NAMES = {
    "describe_dataset": _dataset,
    "make_synthetic_dataset": _synthetic,
    "save_prediction": _writer,
}


def __getattr__(name: str) -> Any:
    if name in _FORMER_NAMES:
        home = _FORMER_NAMES[name]
        warnings.warn(
            f"lovasz_monai.data.{name} moved to {home.__name__}.{name}; the old name will be "
            "removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(home, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SegmentationDataModule(pl.LightningDataModule):
    """LightningDataModule for 3D segmentation data in the Medical Segmentation Decathlon layout.

    Reads ``data_dir/dataset.json`` (paths in it are relative to ``data_dir``) once, at
    construction (:func:`~lovasz_monai.dataset.describe_dataset`), and gives its ``CacheDataset``
    the MONAI pipelines of
    :class:`~lovasz_monai.pipelines.SegmentationPipelines` (load, ignore mask, RAS, spacing,
    intensity; training: padded random patches centred on counted voxels, regions, optional
    flips and intensity augmentation; evaluation and prediction: whole volumes with their
    metadata). With ``synthetic``, :meth:`prepare_data` writes the synthetic dataset when
    ``dataset.json`` is missing (the Trainer calls it on one process; :meth:`setup` calls it
    outside a Trainer); construction writes nothing.

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
        synthetic: if ``data_dir`` has no ``dataset.json``, :meth:`prepare_data` writes a
            synthetic dataset there with :func:`~lovasz_monai.synthetic.make_synthetic_dataset`
            (an existing one is reused).
        synthetic_kwargs: its keyword arguments.
        roi_size: training patch size ``(X, Y, Z)``; also the sliding-window size for the model.
        batch_size: volumes per training batch (each gives ``num_samples`` patches).
        num_samples: training patches cropped per volume.
        crop_sampling: where training patches are centred: ``"pos_neg"`` (default,
            ``RandCropByPosNegLabeld`` 1:1: half on foreground, half on background),
            ``"classes"`` (``RandCropByLabelClassesd``: on a class drawn uniformly from those in
            the volume, so small classes are sampled as often as large ones) or ``"random"``
            (``RandSpatialCropSamplesd``: labels not looked at). Centres are never on ignored
            voxels or padding, except with ``"random"``. See
            :class:`~lovasz_monai.pipelines.SegmentationPipelines`.
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
            (docs/guides/which_loss.md) flips on axes 1 and 2 cost 0.055 per-case mIoU and
            left-right flips 0.047 more: anatomy in a standard orientation is better learned
            unflipped, and a left-right flip of image and label puts a left structure on the
            right still labelled "left". Add axes for data without a fixed orientation; a
            warning names the lateralised labels when axis 0 is added.

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
        pipelines: the :class:`~lovasz_monai.pipelines.SegmentationPipelines`, which check
            ``roi_size``, ``spacing``, ``intensity``, ``ct_window`` and ``flip_axes``; the
            attributes of those names are its checked values (tuples).

    Raises:
        FileNotFoundError: ``dataset.json`` is missing (and ``synthetic`` is False), or a file it
            lists does not exist (all missing files are named).
        ValueError: ``dataset.json`` is not valid JSON, lacks ``"labels"`` or has malformed labels
            or entries (the message names ``dataset.json``); a region uses an unknown label value;
            an argument is out of range (``batch_size`` and ``num_samples`` must be positive
            integers, ``num_workers`` a non-negative integer). In :meth:`setup`: an unreadable
            NIfTI file or an image/label/mask shape mismatch (naming the files).

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
        crop_sampling: Literal["pos_neg", "classes", "random"] = "pos_neg",
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
        batch_size = check_count("batch_size", batch_size)
        num_samples = check_count("num_samples", num_samples)
        num_workers = check_count("num_workers", num_workers, minimum=0)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if not 0.0 <= cache_rate <= 1.0:
            raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate}.")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.num_workers = num_workers
        self.cache_rate = cache_rate
        self.val_fraction = val_fraction
        self.seed = seed
        self.predict_images = predict_images
        self.augment = augment

        self.dataset_json = self.data_dir / "dataset.json"
        description = _dataset.describe_dataset(
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

        self.synthetic = bool(synthetic)
        self.synthetic_kwargs = dict(synthetic_kwargs or {})
        self.pipelines = SegmentationPipelines(
            in_channels=self.in_channels,
            num_label_values=len(self.label_names),
            ignore_index=self.ignore_index,
            regions=self.regions,
            roi_size=roi_size,
            num_samples=self.num_samples,
            crop_sampling=crop_sampling,
            spacing=spacing,
            intensity=intensity,
            ct_window=ct_window,
            augment=self.augment,
            flip_axes=flip_axes,
            seed=self.seed,
        )  # checks crop_sampling, roi_size, spacing, intensity, ct_window and flip_axes
        self.crop_sampling = self.pipelines.crop_sampling
        self.roi_size, self.spacing = self.pipelines.roi_size, self.pipelines.spacing
        self.intensity, self.ct_window = self.pipelines.intensity, self.pipelines.ct_window
        self.flip_axes = self.pipelines.flip_axes
        sided = lateralised_labels(description.label_names)
        if augment and 0 in self.flip_axes and sided:
            warnings.warn(
                f"flip_axes={self.flip_axes} flips left and right, but labels say left or right "
                f"({', '.join(sided[:4])}{', ...' if len(sided) > 4 else ''}): a flipped left "
                "structure stays labelled left, so these classes cannot be learned. Leave axis 0 "
                "out of flip_axes (the default flips nothing).",
                stacklevel=2,
            )
        self.predict_files: list[dict[str, str]] = []  # filled by setup("predict")
        self._checked: set[str] = set()
        self.train_ds: CacheDataset | None = None
        self.val_ds: CacheDataset | None = None
        self.test_ds: CacheDataset | None = None
        self.predict_ds: CacheDataset | None = None

    # ---------------------------------------------------------------------------- files
    def _resolve_predict_files(self) -> list[dict[str, str]]:
        if self.predict_images is not None:
            return [{"image": p} for p in find_images(self.predict_images)]
        if not self._json_predict_files:
            raise FileNotFoundError(
                f"{self.dataset_json} lists no 'test' images to predict; set predict_images."
            )
        return self._json_predict_files

    # ---------------------------------------------------------------------------- transforms
    def train_transforms(self) -> Compose:
        """The training pipeline (:meth:`SegmentationPipelines.train`)."""
        return self.pipelines.train()

    def eval_transforms(self) -> Compose:
        """The validation/test pipeline (:meth:`SegmentationPipelines.evaluate`)."""
        return self.pipelines.evaluate()

    def predict_transforms(self) -> Compose:
        """The prediction pipeline (:meth:`SegmentationPipelines.predict`)."""
        return self.pipelines.predict()

    @property
    def labels(self) -> LabelSemantics:
        """The :class:`~lovasz_monai.labels.LabelSemantics` of the dataset."""
        return LabelSemantics.from_description(self.description)

    # ---------------------------------------------------------------------------- Lightning
    def _dataset(self, files: list[dict[str, str]], transform: Compose) -> CacheDataset:
        check_case_headers(files, self._checked)
        return CacheDataset(
            data=files,
            transform=transform,
            cache_rate=self.cache_rate,
            num_workers=max(1, self.num_workers),
            progress=False,
        )

    def prepare_data(self) -> None:
        """Write the synthetic dataset (``synthetic=True``) when ``dataset.json`` is missing;
        an existing dataset is reused. The Trainer calls it on one process per node."""
        if self.synthetic and not self.dataset_json.is_file():
            _synthetic.make_synthetic_dataset(self.data_dir, **self.synthetic_kwargs)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` ("fit", "validate", "test", "predict"; None: fit and
        test). Reads every NIfTI header first, then fills the cache. A synthetic dataset that
        is not written yet (no Trainer called :meth:`prepare_data`) is written first.

        Raises:
            ValueError: no training cases (fit), an unreadable NIfTI file, or mismatched
                image/label/mask shapes (naming the files).
            FileNotFoundError: nothing to predict (predict).
        """
        self.prepare_data()
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
        """Map a prediction back to the original image space (undo orientation and spacing), as
        :meth:`SegmentationPipelines.invert`; write the result with
        :func:`~lovasz_monai.writer.save_prediction`.

        Raises:
            TypeError, ValueError: as :meth:`SegmentationPipelines.invert`.
        """
        return self.pipelines.invert(pred, image, nearest)

    def __str__(self) -> str:  # Lightning's __str__ would build every dataloader
        return repr(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(data_dir='{self.data_dir}', classes={self.class_names}, "
            f"multi_label={self.multi_label}, ignore_index={self.ignore_index}, "
            f"in_channels={self.in_channels}, train={len(self.train_files)}, "
            f"val={len(self.val_files)})"
        )
