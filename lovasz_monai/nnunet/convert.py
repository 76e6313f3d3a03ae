"""An MSD-layout dataset (``dataset.json`` + NIfTI, as the Lightning stack reads it) written in
nnU-Net v2's raw format, so that the same cases train with nnU-Net's commands."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from lovasz_monai.case_names import nifti_stem, unique_case_names
from lovasz_monai.dataset import DatasetDescription

__all__ = ["case_identifiers", "to_nnunet_raw"]


def _check_nifti(path: str) -> None:
    if nifti_stem(path) == Path(path).name:
        raise ValueError(f"expected a NIfTI file (.nii or .nii.gz), got {path}")


def case_identifiers(paths: Sequence[str], what: str = "files") -> list[str]:
    """Unique nnU-Net case identifiers for NIfTI files, one per path, in order
    (:func:`~lovasz_monai.case_names.unique_case_names` with NIfTI suffixes removed).

    The file name without ``.nii.gz``/``.nii`` only (``scan.v2.nii`` -> ``scan.v2``), or the
    case folders where file names repeat (KiTS).

    Args:
        paths: the files (labels of the training cases, or test images).
        what: what the files are, for the error message.

    Returns:
        One identifier per path.

    Raises:
        ValueError: a file is not NIfTI, or two paths get the same identifier even with their
            folders (e.g. ``x/seg.nii`` and ``x/seg.nii.gz``, or one file listed twice); the
            message names the colliding paths.

    Example:
        >>> case_identifiers(["labelsTr/case_0.nii.gz", "labelsTr/scan.v2.nii"])
        ['case_0', 'scan.v2']
        >>> case_identifiers(["k/case_0/segmentation.nii.gz", "k/case_1/segmentation.nii.gz"])
        ['case_0', 'case_1']
    """
    for path in paths:
        _check_nifti(path)
    try:
        return unique_case_names(paths, nifti_stem, what)
    except ValueError as err:
        raise ValueError(
            f"{err}; rename the files or list each file once in dataset.json"
        ) from None


def _write_channels(image_path: str, folder: Path, case: str, channels: int) -> None:
    """One ``<case>_<cccc>.nii.gz`` per channel (a 4D MSD image holds channels last)."""
    image = nib.load(image_path)
    found = image.shape[3] if image.ndim == 4 else 1
    if image.ndim not in (3, 4) or found != channels:
        raise ValueError(
            f"{image_path}: expected a 3D image or a 4D image with {channels} channels "
            f"(dataset.json 'modality'), got shape {image.shape}"
        )
    for c in range(channels):
        data = np.asarray(image.dataobj[..., c] if image.ndim == 4 else image.dataobj)
        out = nib.Nifti1Image(data, image.affine, image.header)
        nib.save(out, folder / f"{case}_{c:04d}.nii.gz")


def _write_label(case: dict[str, str], path: Path, ignore_in: int | None, ignore_out: int) -> bool:
    """The label map with the ignore label (and voxels outside a mask) set to ``ignore_out``;
    returns whether any voxel is ignored."""
    label = nib.load(case["label"])
    values = np.asarray(label.dataobj)
    ignored = np.zeros(values.shape, dtype=bool) if ignore_in is None else values == ignore_in
    if "mask" in case:
        mask = np.asarray(nib.load(case["mask"]).dataobj)
        if mask.shape != values.shape:
            raise ValueError(f"{case['mask']}: shape {mask.shape} differs from the label's")
        ignored |= mask == 0
    out = np.where(ignored, ignore_out, values).astype(np.uint8 if ignore_out < 255 else np.uint16)
    image = nib.Nifti1Image(out, label.affine, label.header)
    image.set_data_dtype(out.dtype)
    nib.save(image, path)
    return bool(ignored.any())


def to_nnunet_raw(
    source: str | os.PathLike,
    nnunet_raw: str | os.PathLike,
    dataset_id: int,
    name: str | None = None,
) -> Path:
    """Write an MSD-layout dataset as ``<nnunet_raw>/Dataset<ID>_<name>`` in nnU-Net's raw format.

    Images become ``imagesTr/<case>_<channel>.nii.gz`` (4D images split by channel), labels
    ``labelsTr/<case>.nii.gz`` (``<case>`` is the label's file name); the ``"test"`` images go to
    ``imagesTs`` (named after the image), their labels, where there are any, to ``labelsTs``.
    Where file names repeat in different folders (KiTS: ``case_00000/segmentation.nii.gz``, ...),
    ``<case>`` is made of the folders instead (``case_00000``; :func:`case_identifiers`), so that
    every case is written.
    nnU-Net wants its ignore label right after the classes, so the dataset's ignore label (e.g.
    255) and voxels outside a case's ``"mask"`` become label ``C`` (the number of classes),
    named ``"ignore"`` in ``dataset.json`` (v2 format). Headers and affines are kept.

    Args:
        source: MSD-layout ``dataset.json`` or its folder (read with
            :meth:`~lovasz_monai.dataset.DatasetDescription.from_json`).
        nnunet_raw: nnU-Net's raw folder (what ``nnUNet_raw`` points to).
        dataset_id: nnU-Net's dataset number, 1..999.
        name: the part after ``Dataset<ID>_``; default: the source folder's name.

    Returns:
        The dataset folder written.

    Example:
        >>> import tempfile
        >>> from lovasz_monai.synthetic import make_synthetic_dataset
        >>> msd = make_synthetic_dataset(tempfile.mkdtemp(), num_cases=2, size=(8, 8, 8))
        >>> out = to_nnunet_raw(msd, tempfile.mkdtemp(), 7, name="Demo")
        >>> out.name, sorted(p.name for p in (out / "imagesTr").iterdir())
        ('Dataset007_Demo', ['case_000_0000.nii.gz', 'case_001_0000.nii.gz'])
        >>> json.loads((out / "dataset.json").read_text())["labels"]
        {'background': 0, 'class_1': 1, 'class_2': 2, 'ignore': 3}

    Raises:
        ValueError: ``dataset_id`` outside 1..999, a multi-label (regions) dataset (write
            nnU-Net's ``regions_class_order`` by hand), an image whose channels differ from
            ``dataset.json``, a mask of another shape, a file that is not NIfTI, or training
            labels (or test images) that give no unique case identifiers even with their folders
            (:func:`case_identifiers`; checked before anything is written).
        FileExistsError: ``nnunet_raw`` holds a dataset with this id already.
        FileNotFoundError: as :meth:`~lovasz_monai.dataset.DatasetDescription.from_json`.
    """
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    description = DatasetDescription.from_json(source)
    if description.multi_label:
        raise ValueError(
            "multi-label (regions) datasets are not converted: nnU-Net needs "
            "'regions_class_order' in its dataset.json, which has no MSD counterpart"
        )
    name = name or description.root.name
    target = Path(nnunet_raw) / f"Dataset{int(dataset_id):03d}_{name}"
    taken = sorted(Path(nnunet_raw).glob(f"Dataset{int(dataset_id):03d}_*"))
    if taken:  # nnU-Net refuses two names for one id
        raise FileExistsError(f"{taken[0]} exists; remove it or choose another dataset id")
    # every case its own identifier (checked before anything is written)
    train_ids = case_identifiers([c["label"] for c in description.training], "training labels")
    test_ids = case_identifiers(description.predict_images, "test images")
    test_id = dict(zip(description.predict_images, test_ids, strict=True))
    ignore_out = description.num_classes
    any_ignored = False
    for folder in ("imagesTr", "labelsTr"):
        (target / folder).mkdir(parents=True)
    for case, stem in zip(description.training, train_ids, strict=True):
        _write_channels(case["image"], target / "imagesTr", stem, description.in_channels)
        path = target / "labelsTr" / f"{stem}.nii.gz"
        any_ignored |= _write_label(case, path, description.ignore_index, ignore_out)
    if description.predict_images:
        (target / "imagesTs").mkdir()
    for image, stem in zip(description.predict_images, test_ids, strict=True):
        _write_channels(image, target / "imagesTs", stem, description.in_channels)
    if description.test:
        (target / "labelsTs").mkdir()
    for case in description.test:
        path = target / "labelsTs" / f"{test_id[case['image']]}.nii.gz"
        any_ignored |= _write_label(case, path, description.ignore_index, ignore_out)
    raw = json.loads((description.root / "dataset.json").read_text())
    modality = raw.get("modality", raw.get("channel_names")) or {"0": "image"}
    labels = {n: i for i, n in enumerate(description.label_names)}
    if any_ignored:
        labels["ignore"] = ignore_out
    info = {
        "name": name,
        "description": raw.get("description", ""),
        "channel_names": {str(k): v for k, v in modality.items()},
        "labels": labels,
        "numTraining": len(description.training),
        "file_ending": ".nii.gz",
    }
    (target / "dataset.json").write_text(json.dumps(info, indent=2))
    return target
