"""A small random segmentation dataset in the Medical Segmentation Decathlon layout.

:func:`make_synthetic_dataset` writes a folder that
:class:`~lovasz_monai.data.SegmentationDataModule` and
:meth:`~lovasz_monai.dataset.DatasetDescription.from_json` read, so that everything can be tried
without downloading data (like MONAI's ``monai/data/synthetic.py``).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import create_test_image_3d

__all__ = ["make_synthetic_dataset", "synthetic_dataset_json"]


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI file atomically (temporary name, then rename), so that parallel writers
    (e.g. several DDP ranks) never leave a half-written file behind."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    tmp = path.with_name(f".{path.name[: -len('.nii.gz')]}.{os.getpid()}.tmp.nii.gz")
    nib.save(image, tmp)
    os.replace(tmp, path)


def _synthetic_case(
    rs: np.random.RandomState,
    size: Sequence[int],
    num_classes: int,
    num_modalities: int,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One random volume: image (*size[, M]) float32 and label (*size) int64 in [0, C)."""
    rad_max = max(2, min(size) // 5)
    rad_min = max(1, rad_max // 3)
    base, label = create_test_image_3d(
        *size,
        num_objs=8,
        rad_max=rad_max,
        rad_min=rad_min,
        noise_max=0.0,
        num_seg_classes=num_classes - 1,
        random_state=rs,
    )
    # create_test_image_3d labels objects 1..num_seg_classes (0 = background).
    label = np.clip(label, 0, num_classes - 1).astype(np.int64)
    channels = [base]
    for m in range(1, num_modalities):  # other modalities: another intensity per class
        channels.append(((label + m) % num_classes) / max(1, num_classes - 1))
    image = np.stack(channels, axis=-1)
    image = 100.0 + 400.0 * (image + noise * rs.standard_normal(image.shape))
    image = image.astype(np.float32)
    return (image[..., 0] if num_modalities == 1 else image), label


def _check_arguments(
    num_cases: int,
    num_test: int,
    size: Sequence[int],
    num_classes: int,
    num_modalities: int,
    spacing: Sequence[float],
    ignore_index: int | None,
    ignore_fraction: float,
    noise: float,
    **_: Any,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The checks of :func:`make_synthetic_dataset`; ``size`` and ``spacing`` as tuples."""
    size = tuple(int(s) for s in size)
    spacing = tuple(float(s) for s in spacing)
    if len(size) != 3 or min(size) < 8:
        raise ValueError(f"size must be 3 spatial sizes, each >= 8, got {size}.")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive voxel sizes, got {spacing}.")
    if num_cases < 1 or num_test < 0:
        raise ValueError(f"need num_cases >= 1 and num_test >= 0, got {num_cases}, {num_test}.")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}.")
    if num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}.")
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        raise ValueError(
            f"ignore_index {ignore_index} is a class index; use a value >= num_classes "
            f"({num_classes}) or None."
        )
    if not 0.0 <= ignore_fraction < 1.0:
        raise ValueError(f"ignore_fraction must be in [0, 1), got {ignore_fraction}.")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be finite and >= 0, got {noise}.")

    return size, spacing


def make_synthetic_dataset(
    root: str | os.PathLike,
    num_cases: int = 8,
    num_test: int = 2,
    size: Sequence[int] = (48, 48, 48),
    num_classes: int = 3,
    num_modalities: int = 1,
    spacing: Sequence[float] = (1.5, 1.5, 2.0),
    ignore_index: int | None = 255,
    ignore_fraction: float = 0.1,
    roi_masks: bool = False,
    noise: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write a small random segmentation dataset in the Medical Segmentation Decathlon layout.

    Volumes come from ``monai.data.create_test_image_3d`` (random spheres, one class each) with
    Gaussian noise added. The affine has voxel size ``spacing``, flipped first two axes (an
    "LPS"-like orientation, as NIfTI files converted from DICOM often have) and the volume centre
    at the origin, so orientation and spacing handling is exercised. In every training label a
    slab of slices along the last axis is set to ``ignore_index`` (a partially annotated volume).

    Written files::

        root/dataset.json
        root/imagesTr/case_XXX.nii.gz   float32, shape size (or (*size, num_modalities))
        root/labelsTr/case_XXX.nii.gz   uint8 (int16 if a value exceeds 255), shape size
        root/masksTr/case_XXX.nii.gz    uint8 0/1 region-of-interest masks (if roi_masks)
        root/imagesTs/test_XXX.nii.gz   images without labels

    dataset.json uses the MSD keys (``name``, ``description``, ``tensorImageSize``, ``modality``,
    ``labels`` as index string -> name, with the ignore value named ``"ignore"``,
    ``numTraining``, ``numTest``, ``training``, ``test``). The data arrays depend only on the
    arguments (case ``i`` uses the random stream ``(seed, i)``); files are written under a
    temporary name and renamed, ``dataset.json`` last, so an existing ``dataset.json`` means a
    complete dataset. Existing files are overwritten.

    Args:
        root: output folder (created if needed).
        num_cases: number of labelled training cases (>= 1).
        num_test: number of unlabelled test images (>= 0).
        size: spatial shape ``(X, Y, Z)`` of every volume, each >= 8.
        num_classes: number of classes including background (>= 2); labels are 0..C-1.
        num_modalities: image channels; more than one writes 4D images (modalities last).
        spacing: voxel size in mm, stored in the affine.
        ignore_index: label value of ignored voxels; ``None`` writes no ignored voxels. Must not
            be a class index (i.e. ``>= num_classes``).
        ignore_fraction: fraction of the slices (last axis) set to ``ignore_index`` in each label,
            one contiguous slab at a random position; 0 disables it.
        roi_masks: also write region-of-interest masks (``"mask"`` entries in ``training``);
            each excludes a random slab along the first axis.
        noise: standard deviation of the Gaussian noise, relative to the class contrast.
        seed: random seed.

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: an argument is out of range (size, counts, classes, ignore_index, fraction,
            a NaN or negative noise).

    Example:
        >>> import json, tempfile
        >>> root = make_synthetic_dataset(tempfile.mkdtemp(), num_cases=2, size=(16, 16, 16))
        >>> info = json.loads((root / "dataset.json").read_text())
        >>> info["labels"], info["numTraining"], info["training"][0]
        ({'0': 'background', '1': 'class_1', '2': 'class_2', '255': 'ignore'}, 2, \
{'image': './imagesTr/case_000.nii.gz', 'label': './labelsTr/case_000.nii.gz'})
    """
    size, spacing = _check_arguments(
        num_cases,
        num_test,
        size,
        num_classes,
        num_modalities,
        spacing,
        ignore_index,
        ignore_fraction,
        noise,
    )

    root = Path(root)
    for sub in ("imagesTr", "labelsTr", "imagesTs") + (("masksTr",) if roi_masks else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * (size[0] - 1) / 2, spacing[1] * (size[1] - 1) / 2, 0.0]
    affine[2, 3] = -spacing[2] * (size[2] - 1) / 2
    max_label = max(num_classes - 1, ignore_index if ignore_index is not None else 0)
    label_dtype = np.uint8 if 0 <= max_label <= 255 else np.int16

    for i in range(num_cases):
        rs = np.random.RandomState([seed, 0, i])
        image, label = _synthetic_case(rs, size, num_classes, num_modalities, noise)
        thickness = round(ignore_fraction * size[2])
        if ignore_index is not None and thickness > 0:
            start = rs.randint(0, size[2] - thickness + 1)
            label[..., start : start + thickness] = ignore_index
        name = _case_name(i)
        _save_nifti(image, affine, root / "imagesTr" / name)
        _save_nifti(label.astype(label_dtype), affine, root / "labelsTr" / name)
        if roi_masks:
            roi = np.ones(size, dtype=np.uint8)
            width = max(1, size[0] // 4)
            start = rs.randint(0, size[0] - width + 1)
            roi[start : start + width] = 0
            _save_nifti(roi, affine, root / "masksTr" / name)

    for i in range(num_test):
        image, _ = _synthetic_case(
            np.random.RandomState([seed, 1, i]), size, num_classes, num_modalities, noise
        )
        _save_nifti(image, affine, root / "imagesTs" / _test_name(i))

    info = _dataset_json(num_cases, num_test, num_classes, num_modalities, ignore_index, roi_masks)
    tmp = root / f".dataset.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, root / "dataset.json")
    return root


def _case_name(i: int) -> str:
    return f"case_{i:03d}.nii.gz"


def _test_name(i: int) -> str:
    return f"test_{i:03d}.nii.gz"


def _dataset_json(
    num_cases: int,
    num_test: int,
    num_classes: int,
    num_modalities: int,
    ignore_index: int | None,
    roi_masks: bool,
) -> dict[str, Any]:
    """The ``dataset.json`` of :func:`make_synthetic_dataset` (its file names)."""
    training = []
    for i in range(num_cases):
        entry = {"image": f"./imagesTr/{_case_name(i)}", "label": f"./labelsTr/{_case_name(i)}"}
        if roi_masks:
            entry["mask"] = f"./masksTr/{_case_name(i)}"
        training.append(entry)
    test = [f"./imagesTs/{_test_name(i)}" for i in range(num_test)]
    labels = {"0": "background", **{str(c): f"class_{c}" for c in range(1, num_classes)}}
    if ignore_index is not None:
        labels[str(ignore_index)] = "ignore"
    info = {
        "name": "Synthetic",
        "description": "Random spheres from monai.data.create_test_image_3d (lovasz_monai)",
        "reference": "lovasz_monai.synthetic.make_synthetic_dataset",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "3D" if num_modalities == 1 else "4D",
        "modality": {str(m): "MRI" if m == 0 else f"MRI_{m}" for m in range(num_modalities)},
        "labels": labels,
        "numTraining": num_cases,
        "numTest": num_test,
        "training": training,
        "test": test,
    }
    return info


def synthetic_dataset_json(**kwargs: Any) -> dict[str, Any]:
    """The ``dataset.json`` content that ``make_synthetic_dataset(root, **kwargs)`` writes, without
    writing anything (e.g. to describe the dataset before ``prepare_data`` writes it).

    Example:
        >>> info = synthetic_dataset_json(num_cases=2, num_classes=2, ignore_index=None)
        >>> info["labels"], info["training"][1]["label"]
        ({'0': 'background', '1': 'class_1'}, './labelsTr/case_001.nii.gz')

    Raises:
        TypeError: an argument that :func:`make_synthetic_dataset` does not take.
        ValueError: as :func:`make_synthetic_dataset`.
    """
    bound = inspect.signature(make_synthetic_dataset).bind(None, **kwargs)
    bound.apply_defaults()
    args = bound.arguments
    _check_arguments(**{k: v for k, v in args.items() if k != "root"})
    return _dataset_json(
        args["num_cases"],
        args["num_test"],
        args["num_classes"],
        args["num_modalities"],
        args["ignore_index"],
        args["roi_masks"],
    )
