"""A dataset apart from its loading: :class:`DatasetDescription` and :func:`split_cases`.

:meth:`DatasetDescription.from_json` reads a Medical Segmentation Decathlon (or nnU-Net v2)
``dataset.json`` into a frozen description (like nnU-Net's ``LabelManager`` with MONAI's
``load_decathlon_datalist``): label names, the ignore label, regions, the number of image
channels and the case lists. :func:`split_cases` is the seeded train/validation split.
:class:`~lovasz_monai.data.SegmentationDataModule` builds on both; neither needs Lightning.

Layout (paths in ``dataset.json`` are relative to its folder)::

    root/
      dataset.json        "labels", "modality", "training": [{"image", "label"[, "mask"]}], "test"
      imagesTr/*.nii.gz   3D, or 4D with modalities last
      labelsTr/*.nii.gz   integer label maps (may contain the ignore label)
      imagesTs/*.nii.gz   images for prediction
"""

from __future__ import annotations

import functools
import glob
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np

from lovasz_monai.metrics import check_class_names
from lovasz_monai.synthetic import synthetic_dataset_json

__all__ = [
    "CASE_KEYS",
    "DatasetDescription",
    "check_case_headers",
    "describe_dataset",
    "find_images",
    "lateralised_labels",
    "split_cases",
]

CASE_KEYS = ("image", "label", "mask")
"""The keys of a case dict (``"label"`` and ``"mask"`` optional)."""

_T = TypeVar("_T")


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    if isinstance(value, str):
        try:
            int(value)
        except ValueError:
            return False
        return True
    return False


def _is_index(value: Any) -> bool:
    """An integer label value in a nnU-Net "labels" dict (a number, not a string)."""
    return _is_int(value) and not isinstance(value, str)


def _is_index_list(value: Any) -> bool:
    """A nnU-Net region: a non-empty list of integer label values."""
    return isinstance(value, list) and bool(value) and all(_is_index(x) for x in value)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _parse_labels(
    labels: Any, source: Path
) -> tuple[list[str], int | None, dict[str, list[int]] | None]:
    """Parse dataset.json "labels" into (names of label values 0..C-1, ignore value, regions).

    MSD form: ``{"0": "background", "1": "liver", ...}``; nnU-Net v2 form:
    ``{"background": 0, "liver": 1, ...}`` where a value may be a list of label values (a
    region, nnU-Net's region-based training). An entry named "ignore" is the ignore label.
    """
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"{source}: 'labels' must be a non-empty mapping, got {labels!r}.")
    ignore: int | None = None
    regions: dict[str, list[int]] | None = None
    pairs: list[tuple[int, str]] = []
    if all(_is_int(k) and isinstance(v, str) for k, v in labels.items()):  # MSD
        for key, name in labels.items():
            if name.strip().lower() == "ignore":
                ignore = int(key)
            else:
                pairs.append((int(key), name))
    elif all(_is_index(v) or _is_index_list(v) for v in labels.values()):  # nnU-Net v2
        for name, value in labels.items():
            if name.strip().lower() == "ignore":
                if isinstance(value, list):
                    raise ValueError(f"{source}: the 'ignore' label must be one integer.")
                ignore = int(value)
            elif not isinstance(value, list):
                pairs.append((int(value), name))
        if any(isinstance(v, list) for v in labels.values()):
            regions = {
                name: [int(x) for x in _as_list(value)]
                for name, value in labels.items()
                # the background may come as 0, [0] or [0, 0] (nnU-Net reads all as background)
                if name.strip().lower() != "ignore" and set(_as_list(value)) != {0}
            }
            values = sorted({x for r in regions.values() for x in r} | {0})
            pairs = [(v, str(v)) for v in range(max(values) + 1)]
    else:
        raise ValueError(
            f"{source}: 'labels' must map index strings to names (MSD, e.g. "
            f'{{"0": "background", "1": "tumour"}}) or names to indices (nnU-Net v2, e.g. '
            f'{{"background": 0, "tumour": 1}}), got {labels!r}.'
        )
    pairs.sort()
    indices = [i for i, _ in pairs]
    if indices != list(range(len(indices))) or len(indices) < 1:
        raise ValueError(
            f"{source}: class indices must be 0..C-1 without gaps (besides 'ignore'), got "
            f"{indices}."
        )
    if ignore is not None and 0 <= ignore < len(indices):
        raise ValueError(f"{source}: the ignore label {ignore} is also a class index.")
    names = [name for _, name in pairs] if regions is None else list(regions)
    try:
        check_class_names(names)
    except ValueError as error:
        raise ValueError(f"{source}: 'labels': {error}.") from None
    return [name for _, name in pairs], ignore, regions


def _resolve(base: Path, path: Any, source: Path, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{source}: {what} must be a file path string, got {path!r}.")
    return os.path.normpath(base / path)


def _check_exist(files: Sequence[str], source: Path) -> None:
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        )
        raise FileNotFoundError(f"{len(missing)} file(s) listed in {source} do not exist: {shown}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(info)}.")
    return info


def _cases(
    entries: Any, field: str, need_label: bool, root: Path, source: Path
) -> tuple[dict[str, str], ...]:
    """The case dicts of a "training" or "test" list, paths joined to ``root``."""
    if not isinstance(entries, list):
        raise ValueError(f"{source}: '{field}' must be a list, got {entries!r}.")
    cases = []
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, Mapping)
            or "image" not in entry
            or (need_label and "label" not in entry)
        ):
            raise ValueError(
                f"{source}: '{field}' entry {i} must be a dict with 'image' and "
                f"'label' (and optionally 'mask'), got {entry!r}."
            )
        cases.append(
            {
                key: _resolve(root, entry[key], source, f"'{field}' {key}")
                for key in CASE_KEYS
                if key in entry
            }
        )
    return tuple(cases)


def _check_regions(
    regions: Mapping[str, Any], num_labels: int, source: Path
) -> dict[str, tuple[int, ...]]:
    """Region name -> label values (one value or a list), each in ``[0, num_labels)``."""
    checked: dict[str, tuple[int, ...]] = {}
    for name, values in dict(regions).items():
        values = [values] if _is_int(values) else list(values)
        bad = [v for v in values if not _is_int(v) or not 0 <= int(v) < num_labels]
        if not values or bad:
            raise ValueError(
                f"region '{name}' must list label values in [0, {num_labels}) "
                f"of {source}, got {values}."
            )
        checked[str(name)] = tuple(int(v) for v in values)
    if not checked:
        raise ValueError("regions is empty; use None for single-label mode.")
    return checked


@dataclass(frozen=True)
class DatasetDescription:
    """A segmentation dataset as ``dataset.json`` describes it (no voxel data, no Lightning).

    Make one with :meth:`from_json`. Case dicts hold absolute-or-joined paths under the keys
    ``"image"``, ``"label"`` and (optionally) ``"mask"``.

    Attributes:
        root: the folder of ``dataset.json``; its paths are relative to it.
        label_names: names of the integer label values ``0..L-1`` in the label files (without
            ``"ignore"``; for nnU-Net regions, the values as strings).
        ignore_index: the label value to ignore, or None.
        regions: multi-label mode: region name -> label values; None: single-label mode.
        in_channels: number of image channels (``"modality"`` or ``"channel_names"``; default 1).
        training: the ``"training"`` cases (each with ``"image"`` and ``"label"``).
        test: the ``"test"`` cases when all of them have labels, else empty.
        predict_images: the image of every ``"test"`` entry (labelled or not).

    Example:
        >>> import tempfile
        >>> from lovasz_monai.synthetic import make_synthetic_dataset
        >>> root = make_synthetic_dataset(tempfile.mkdtemp(), num_cases=3, size=(8, 8, 8))
        >>> desc = DatasetDescription.from_json(root / "dataset.json")
        >>> desc.class_names, desc.num_classes, desc.ignore_index, desc.multi_label
        (('background', 'class_1', 'class_2'), 3, 255, False)
        >>> len(desc.training), len(desc.test), len(desc.predict_images), desc.in_channels
        (3, 0, 2, 1)
        >>> DatasetDescription.from_json(root, regions={"fg": [1, 2]}).class_names
        ('fg',)
    """

    root: Path
    label_names: tuple[str, ...]
    ignore_index: int | None = None
    regions: Mapping[str, tuple[int, ...]] | None = None
    in_channels: int = 1
    training: tuple[dict[str, str], ...] = ()
    test: tuple[dict[str, str], ...] = ()
    predict_images: tuple[str, ...] = ()

    @property
    def multi_label(self) -> bool:
        """True when ``regions`` are used (one sigmoid output per region)."""
        return self.regions is not None

    @property
    def class_names(self) -> tuple[str, ...]:
        """The output channel names, ``label_names`` or (multi-label mode) the region names."""
        return tuple(self.regions) if self.regions is not None else self.label_names

    @property
    def num_classes(self) -> int:
        """``len(class_names)``, the number of output channels of a network."""
        return len(self.class_names)

    @classmethod
    def from_json(
        cls,
        path: str | os.PathLike,
        ignore_index: int | None = None,
        regions: Mapping[str, Sequence[int] | int] | None = None,
        check_files: bool = True,
    ) -> DatasetDescription:
        """Read ``dataset.json`` (or the ``dataset.json`` in the folder ``path``).

        ``"labels"`` may be in MSD form (``{"0": "background", "1": "liver"}``) or nnU-Net v2 form
        (``{"background": 0, "liver": 1}``, list values define regions); an entry named
        ``"ignore"`` is the ignore label and not a class. ``"training"`` entries are
        ``{"image", "label"}`` with an optional ``"mask"``; ``"test"`` entries are image paths,
        or dicts with ``"image"`` and optionally ``"label"``.

        Args:
            path: ``dataset.json`` or the folder holding it.
            ignore_index: label value to ignore; ``None`` takes the label named ``"ignore"``.
            regions: region name -> label values (multi-label mode); ``None`` uses nnU-Net
                regions from ``"labels"`` if there are any, else single-label mode.
            check_files: check that every listed file exists.

        Raises:
            FileNotFoundError: ``dataset.json`` is missing, or (``check_files``) a file it lists
                does not exist (all missing files are named).
            ValueError: ``dataset.json`` is not valid JSON, lacks ``"labels"`` or has malformed
                labels or entries (the message names ``dataset.json``); ``ignore_index`` is a
                class index; a region uses an unknown label value.
        """
        source = Path(path)
        if source.is_dir():
            source = source / "dataset.json"
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found.")
        return cls.from_dict(_read_json(source), source, ignore_index, regions, check_files)

    @classmethod
    def from_dict(
        cls,
        info: Mapping[str, Any],
        source: str | os.PathLike,
        ignore_index: int | None = None,
        regions: Mapping[str, Sequence[int] | int] | None = None,
        check_files: bool = True,
    ) -> DatasetDescription:
        """The description of the content of a ``dataset.json`` (see :meth:`from_json`) that
        lives at ``source`` (its folder is the root of the relative paths); e.g. of a dataset
        that is not written yet.

        Raises:
            FileNotFoundError, ValueError: as :meth:`from_json`.
        """
        source = Path(source)
        root = source.parent
        if "labels" not in info:
            raise ValueError(
                f"{source} has no 'labels' entry; expected e.g. "
                '"labels": {"0": "background", "1": "tumour"} (optionally "255": "ignore").'
            )

        label_names, json_ignore, json_regions = _parse_labels(info["labels"], source)
        ignore = json_ignore if ignore_index is None else int(ignore_index)
        if ignore is not None and 0 <= ignore < len(label_names):
            raise ValueError(
                f"ignore_index {ignore} is a class index of {source} "
                f"(classes 0..{len(label_names) - 1})."
            )
        regions = regions if regions is not None else json_regions
        checked = None if regions is None else _check_regions(regions, len(label_names), source)

        channels = info.get("modality", info.get("channel_names"))
        if channels is None:
            in_channels = 1
        elif isinstance(channels, Mapping) and channels:
            in_channels = len(channels)
        else:
            raise ValueError(f"{source}: 'modality' must be a non-empty mapping, got {channels!r}.")

        training = _cases(info.get("training", []), "training", True, root, source)
        test = info.get("test", [])
        labelled = bool(test) and all(isinstance(t, Mapping) and "label" in t for t in test)
        test_cases = _cases(test, "test", True, root, source) if labelled else ()
        if not isinstance(test, list):
            raise ValueError(f"{source}: 'test' must be a list, got {test!r}.")
        test_images = [t.get("image") if isinstance(t, Mapping) else t for t in test]
        predict_images = tuple(_resolve(root, p, source, "a 'test' image") for p in test_images)
        if check_files:
            _check_exist(
                [f for case in training + test_cases for f in case.values()] + list(predict_images),
                source,
            )
        return cls(
            root=root,
            label_names=tuple(label_names),
            ignore_index=ignore,
            regions=checked,
            in_channels=in_channels,
            training=training,
            test=test_cases,
            predict_images=predict_images,
        )


def split_cases(
    cases: Sequence[_T], val_fraction: float, seed: int = 0
) -> tuple[list[_T], list[_T]]:
    """Seeded split into (training, validation) cases, each in the input order.

    A seeded shuffle picks ``round(val_fraction * n)`` validation cases; with ``val_fraction > 0``
    and at least 2 cases there is at least one validation case and one training case. A single
    case (or ``val_fraction == 0``) gives no validation case.

    Raises:
        ValueError: ``val_fraction`` is not in [0, 1).

    Example:
        >>> split_cases(list("abcdefghij"), 0.3, seed=0)
        (['a', 'c', 'd', 'e', 'f', 'g', 'j'], ['b', 'h', 'i'])
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


_SIDE = re.compile(r"(?:^|[^a-z])(left|right|lh|rh|l|r)(?:$|[^a-z])", re.IGNORECASE)


def lateralised_labels(label_names: Sequence[str]) -> list[str]:
    """The label names that say left or right (``"left caudate"``, ``"Kidney_R"``,
    ``"lh-putamen"``): classes that a left-right flip of image and label would mislabel.

    Args:
        label_names: the names of the label values.

    Returns:
        The lateralised names, in their order.

    Example:
        >>> lateralised_labels(["background", "Left-Putamen", "kidney_r", "liver", "rh_insula"])
        ['Left-Putamen', 'kidney_r', 'rh_insula']
    """
    return [name for name in label_names if _SIDE.search(str(name))]


def _header_shape(path: str) -> tuple[int, ...]:
    """Shape from a NIfTI header (no voxel data read); raises ValueError naming the file."""
    try:
        return tuple(nib.load(path).shape)
    except Exception as err:  # nibabel raises several types (ImageFileError, OSError, ...)
        raise ValueError(f"cannot read NIfTI file '{path}': {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------------------------
# the DataModule
# --------------------------------------------------------------------------------------------


def check_case_headers(cases: Sequence[Mapping[str, str]], checked: set[str] | None = None) -> None:
    """Read every file's NIfTI header (no voxel data): readable, and the label and mask with the
    image's spatial shape.

    Args:
        cases: case dicts (``"image"``, ``"label"``, ``"mask"`` paths).
        checked: keys of the cases checked before, skipped (and updated).

    Raises:
        ValueError: an unreadable file or a shape mismatch, naming the files.
    """
    checked = set() if checked is None else checked
    for case in cases:
        key = "|".join(case.values())
        if key in checked:
            continue
        shapes = {k: _header_shape(p) for k, p in case.items()}
        image_shape = shapes["image"][:3]
        for k in ("label", "mask"):
            if k in shapes and shapes[k][:3] != image_shape:
                raise ValueError(
                    f"spatial shape mismatch: image '{case['image']}' has {image_shape} but "
                    f"{k} '{case[k]}' has {shapes[k][:3]}."
                )
        checked.add(key)


def find_images(pattern: str | os.PathLike) -> list[str]:
    """The NIfTI images of a folder (``*.nii.gz``, ``*.nii``, hidden files left out), a file, or
    a glob pattern, sorted.

    Raises:
        FileNotFoundError: nothing matches.
    """
    path = Path(pattern)
    if path.is_dir():
        found = sorted(path.glob("*.nii.gz")) + sorted(path.glob("*.nii"))
        names = [str(p) for p in found if not p.name.startswith(".")]  # e.g. macOS "._x"
    elif path.is_file():
        names = [str(path)]
    else:
        names = sorted(glob.glob(str(pattern)))
    if not names:
        raise FileNotFoundError(f"predict_images '{pattern}' matches no image files.")
    return [os.path.normpath(p) for p in names]


@functools.lru_cache(maxsize=16)
def _read_description(
    path: str, stamp: tuple[int, int], ignore_index: int | None, regions: tuple | None
) -> DatasetDescription:
    """:meth:`DatasetDescription.from_json`, read once per file version (``stamp``: its
    modification time and size) and settings: the CLI and the datamodule share the result."""
    return DatasetDescription.from_json(
        path, ignore_index=ignore_index, regions=None if regions is None else dict(regions)
    )


def describe_dataset(
    data_dir: str | os.PathLike,
    synthetic: bool = False,
    synthetic_kwargs: dict[str, Any] | None = None,
    *,
    ignore_index: int | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
) -> DatasetDescription:
    """The :class:`DatasetDescription` of ``<data_dir>/dataset.json``, or, when it is missing and
    ``synthetic``, of the synthetic dataset that
    :meth:`~lovasz_monai.data.SegmentationDataModule.prepare_data` writes there (nothing is
    written here).

    Args:
        data_dir: folder of the dataset (MSD layout).
        synthetic, synthetic_kwargs: as in :class:`~lovasz_monai.data.SegmentationDataModule`.
        ignore_index, regions: see :meth:`DatasetDescription.from_json`.

    Returns:
        The frozen description (read once per version of the file).

    Raises:
        FileNotFoundError: no ``dataset.json`` and not ``synthetic``, or a file it lists is
            missing.
        ValueError: a malformed ``dataset.json`` or ``synthetic_kwargs``.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> description = describe_dataset(
        ...     folder, synthetic=True, synthetic_kwargs={"num_cases": 2, "size": (8, 8, 8)}
        ... )
        >>> description.num_classes, description.in_channels, len(description.training)
        (3, 1, 2)
    """
    dataset_json = Path(data_dir) / "dataset.json"
    if dataset_json.is_file():
        status = dataset_json.stat()
        frozen = None if regions is None else tuple((k, tuple(v)) for k, v in regions.items())
        stamp = (status.st_mtime_ns, status.st_size)
        return _read_description(str(dataset_json.resolve()), stamp, ignore_index, frozen)
    if not synthetic:
        raise FileNotFoundError(
            f"{dataset_json} not found: data_dir must hold a Medical Segmentation Decathlon "
            "style dataset.json (or pass synthetic=True to write a synthetic dataset there)."
        )
    info = synthetic_dataset_json(**(synthetic_kwargs or {}))
    return DatasetDescription.from_dict(info, dataset_json, ignore_index, regions, False)
