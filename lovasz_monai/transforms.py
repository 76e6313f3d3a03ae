"""MONAI dictionary transforms that prepare labels for the Lovász losses.

* :class:`IgnoreMaskd` turns an ``ignore_index`` label value and/or a region-of-interest mask image
  into a float ``mask`` (1 = voxel counts, 0 = ignored) and replaces ignored label voxels by a valid
  class, so that one-hot conversion works. The mask is a ``MetaTensor`` with the label's metadata,
  so it can go through the same spatial transforms as the image and label.
* :class:`LabelToRegionsd` turns an integer label map into overlapping binary regions for
  multi-label (sigmoid) training, e.g. the BraTS tumour core / whole tumour / enhancing tumour.
* :class:`CheckImageLabeld` fails early, naming the files, when loaded image, label and mask do not
  fit together (spatial shape, channel count, label values).

All transforms expect channel-first data, ``(C, *spatial)``, as produced by
``LoadImaged`` + ``EnsureChannelFirstd``. They work on ``MetaTensor``, ``torch.Tensor`` and
``numpy.ndarray`` values and return the type they were given.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from lovasz_monai.functional import dtype_holds, integer_or_none, label_equals

__all__ = ["CheckImageLabeld", "IgnoreMaskd", "LabelToRegionsd", "region_values"]


def _as_tensor(x: Any) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of ``x`` (no metadata, no copy where possible)."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x)


def _name(x: Any, key: Hashable) -> str:
    """The file an item was loaded from (``MetaTensor`` meta ``filename_or_obj``), else its key."""
    if isinstance(x, MetaTensor):
        fname = x.meta.get("filename_or_obj")
        if fname:
            return f"'{fname}'"
    return f"key '{key}'"


#: unsigned dtypes PyTorch cannot compare with ``>=`` or ``isin`` -> a signed dtype that holds them
_WIDER = {torch.uint16: torch.int32, torch.uint32: torch.int64, torch.uint64: torch.int64}


def _comparable(lab: torch.Tensor, label: Any, key: Hashable) -> torch.Tensor:
    """``lab`` in a dtype every comparison works on: uint16 labels (numpy data of many NIfTI
    files) become int32, uint32 and uint64 labels int64 (PyTorch has no ``>=``/``isin`` for
    them); other dtypes are returned as they are.

    Raises:
        ValueError: a uint64 label holds a value above ``2**63 - 1``.
    """
    wider = _WIDER.get(lab.dtype)
    if wider is None:
        return lab
    out = lab.to(wider)
    if lab.dtype == torch.uint64 and bool((out < 0).any()):
        raise ValueError(
            f"label {_name(label, key)} (uint64) holds values above {torch.iinfo(torch.int64).max}"
        )
    return out


def _check_channel_first(x: torch.Tensor, key: Hashable, what: str) -> None:
    if x.ndim < 2:
        raise ValueError(
            f"{what} '{key}' must be channel-first (C, *spatial) with at least one spatial dim, "
            f"got shape {tuple(x.shape)}."
        )


def region_values(name: str, values: Any) -> list[int]:
    """The label values of region ``name``: one integer, or a non-empty list (or 1-D numpy
    array) of integers.

    Example:
        >>> region_values("WT", [1, 2, 3]), region_values("ET", 3)
        ([1, 2, 3], [3])

    Raises:
        ValueError: a string (``"12"`` is not ``[1, 2]``), an empty list, or a value that is not
            an integer (``2.5``, ``True``).
    """
    if integer_or_none(values) is not None:
        values = [values]
    elif isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    elif isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"region '{name}' must be an integer or a list of integers (label values), "
            f"got {values!r}."
        )
    values = list(values)
    if not values:
        raise ValueError(f"region '{name}' lists no label values.")
    bad = [v for v in values if integer_or_none(v) is None]
    if bad:
        raise ValueError(
            f"region values must be integers: region '{name}' has {bad!r} in {values!r}."
        )
    return [int(v) for v in values]


class IgnoreMaskd(MapTransform):
    """Build a voxel mask from an ignore label and/or a region-of-interest mask image.

    For every label key, voxels whose value equals ``ignore_index`` are ignored; if
    ``roi_mask_key`` is given, voxels where that image is zero (in every channel) are ignored too.
    The transform writes ``data[mask_key]``, a float32 array of shape ``(1, *spatial)`` with 1
    where the voxel counts and 0 where it is ignored, and replaces the ignored label voxels by
    ``fill_value`` so that the label is a valid class map (one-hot conversion works). The loss
    then receives the mask and gives ignored voxels no weight.

    The mask is always written, all ones when nothing is ignored, so downstream code can always
    pass it. It has the type of the label; for a ``MetaTensor`` label it is a ``MetaTensor`` with
    a copy of the label's metadata (affine, file name) and applied operations, so later spatial
    transforms (``Orientationd``, ``Spacingd`` with ``mode="nearest"``, crops, flips, pads) can be
    applied to it with the same key list as the label. Padding the mask with zeros marks padded
    voxels as ignored.

    Args:
        keys: label key(s). Each label has shape ``(C, *spatial)``, usually ``C = 1`` (a label
            map). With several keys a voxel is ignored when it is ignored in any of them.
        ignore_index: label value that marks voxels to ignore; ``None`` ignores no label value.
        mask_key: key the ``(1, *spatial)`` float32 mask is written to.
        roi_mask_key: optional key of a region-of-interest image already in the data, shape
            ``(C_roi, *spatial)``; non-zero (in any channel) = counts. It may equal ``mask_key``:
            the ROI image is then replaced by the combined mask.
        fill_value: valid class written into label voxels equal to ``ignore_index``; the
            label's dtype must hold it (e.g. not 300 for a ``uint8`` label).
        allow_missing_keys: do not raise when a label key or ``roi_mask_key`` is missing.

    Label values are compared as numbers, whatever the label's dtype: ``ignore_index=-1`` does
    not match the value 255 of a ``uint8`` label, and ``uint16``/``uint32`` labels (the numpy
    data of many NIfTI files) work.

    Raises:
        KeyError: a label key or ``roi_mask_key`` is missing and ``allow_missing_keys`` is False.
        ValueError: ``ignore_index`` or ``fill_value`` is not an integer; a label or the ROI mask
            is not channel-first (fewer than 2 dims); the ROI mask's spatial shape differs from
            the label's (the message names both files); or, with an ``ignore_index``, a label's
            dtype cannot hold ``fill_value`` (the message names the value, the dtype and the
            file).

    Example:
        >>> import torch
        >>> label = torch.tensor([[[0, 1], [255, 2]]])  # (1, 2, 2), 255 = ignore
        >>> roi = torch.tensor([[[1, 0], [1, 1]]])  # (1, 2, 2), 0 = outside the ROI
        >>> out = IgnoreMaskd("label", ignore_index=255, roi_mask_key="roi")(
        ...     {"label": label, "roi": roi}
        ... )
        >>> out["label"].tolist()
        [[[0, 1], [0, 2]]]
        >>> out["mask"].tolist()
        [[[1.0, 0.0], [0.0, 1.0]]]
        >>> out["mask"].dtype
        torch.float32
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        ignore_index: int | None = None,
        mask_key: str = "mask",
        roi_mask_key: str | None = None,
        fill_value: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if ignore_index is not None and integer_or_none(ignore_index) is None:
            raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}.")
        if integer_or_none(fill_value) is None:
            raise ValueError(f"fill_value must be an integer (a class), got {fill_value!r}.")
        self.ignore_index = ignore_index
        self.mask_key = mask_key
        self.roi_mask_key = roi_mask_key
        self.fill_value = fill_value

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        # 1. The ROI image, if one is configured and present.
        roi = None
        if self.roi_mask_key is not None:
            if self.roi_mask_key in d:
                roi = d[self.roi_mask_key]
            elif not self.allow_missing_keys:
                raise KeyError(
                    f"roi_mask_key '{self.roi_mask_key}' is not in the data (keys: {list(d)}); "
                    "set allow_missing_keys=True if the ROI mask is optional."
                )
        # 2. For each label key, the voxels that count (ANDed over the keys); the first label is
        # the reference whose type and metadata the mask takes.
        valid: torch.Tensor | None = None
        reference: Any = None
        for key in self.key_iterator(d):
            label = d[key]
            lab = _as_tensor(label)
            _check_channel_first(lab, key, "label")
            key_valid = torch.ones((1, *lab.shape[1:]), dtype=torch.bool, device=lab.device)
            # 2a. Voxels equal to ignore_index (in any channel) do not count; the label gets
            # fill_value there, so it stays a valid class map.
            if self.ignore_index is not None:
                if not dtype_holds(lab.dtype, int(self.fill_value)):
                    raise ValueError(
                        f"fill_value {self.fill_value} does not fit the dtype "
                        f"{str(lab.dtype).removeprefix('torch.')} of label {_name(label, key)}; "
                        "choose a fill_value that this dtype holds (a class, e.g. 0)."
                    )
                cmp = _comparable(lab, label, key)
                ignored = label_equals(cmp, int(self.ignore_index))
                if bool(ignored.any()):
                    key_valid &= ~ignored.any(dim=0, keepdim=True)
                    fill = torch.as_tensor(int(self.fill_value), dtype=cmp.dtype, device=cmp.device)
                    d[key], *_ = convert_to_dst_type(torch.where(ignored, fill, cmp), label)
            # 2b. Voxels outside the ROI (zero in every ROI channel) do not count.
            if roi is not None:
                roi_t = _as_tensor(roi).to(lab.device)
                _check_channel_first(roi_t, self.roi_mask_key, "ROI mask")
                if roi_t.shape[1:] != lab.shape[1:]:
                    raise ValueError(
                        f"ROI mask {_name(roi, self.roi_mask_key)} has spatial shape "
                        f"{tuple(roi_t.shape[1:])} but label {_name(label, key)} has "
                        f"{tuple(lab.shape[1:])}."
                    )
                key_valid &= (roi_t != 0).any(dim=0, keepdim=True)
            valid = key_valid if valid is None else valid & key_valid
            if reference is None:
                reference = label
        if valid is None:  # every label key missing (allow_missing_keys=True)
            return d
        # 3. Write the float32 mask with the reference label's type (and its own metadata copy).
        mask, *_ = convert_to_dst_type(valid.to(torch.float32), reference, dtype=torch.float32)
        if isinstance(mask, MetaTensor):
            # own copy of the metadata: later transforms must not alter the label's
            mask = MetaTensor(
                mask.as_tensor(),
                meta=deepcopy(reference.meta),
                applied_operations=deepcopy(reference.applied_operations),
            )
        d[self.mask_key] = mask
        return d


class LabelToRegionsd(MapTransform):
    """Turn an integer label map into overlapping binary regions (multi-label / sigmoid training).

    Region ``r`` is 1 where the label is any of ``regions[r]``. Channels follow the dict order.
    For the BraTS tumour regions on the Medical Segmentation Decathlon Task01 labels
    (1 = edema, 2 = non-enhancing tumour, 3 = enhancing tumour) use
    ``{"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]}``.

    Apply it after :class:`IgnoreMaskd` (ignored voxels are then background in every region and
    zero in the mask). The output has the input's type; a ``MetaTensor`` keeps its metadata.

    Args:
        keys: label key(s); each label has shape ``(1, *spatial)`` with integer values.
        regions: region name -> label values that belong to it, e.g. ``{"WT": [1, 2, 3]}``;
            a single integer is a one-value region. Values must be integers (not strings, floats
            or bools).
        dtype: output dtype (default float32, the dtype sigmoid losses expect).
        allow_missing_keys: do not raise when a key is missing.

    Output shape: ``(R, *spatial)`` with ``R = len(regions)``, values 0/1. Label values are
    compared as numbers, whatever the label's dtype (integer of any width, bool or float): a
    value the label's dtype cannot hold (``-1`` or ``256`` for a ``uint8`` label) matches no
    voxel instead of wrapping around.

    Raises:
        ValueError: ``regions`` is empty, a region has no label values or a value that is not an
            integer, or a label does not have exactly one channel.
        KeyError: a key is missing and ``allow_missing_keys`` is False.

    Example:
        >>> import torch
        >>> label = torch.tensor([[[0, 1, 2, 3]]])  # (1, 1, 4)
        >>> regions = {"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]}
        >>> out = LabelToRegionsd("label", regions)({"label": label})["label"]
        >>> out.shape
        torch.Size([3, 1, 4])
        >>> out[:, 0].tolist()
        [[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    """

    def __init__(
        self,
        keys: KeysCollection,
        regions: Mapping[str, Sequence[int]],
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not regions:
            raise ValueError("regions must name at least one region, got an empty mapping.")
        self.regions = {str(name): region_values(name, values) for name, values in regions.items()}
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            lab = _as_tensor(label)
            if lab.ndim < 2 or lab.shape[0] != 1:
                raise ValueError(
                    f"LabelToRegionsd expects a label map of shape (1, *spatial) for "
                    f"{_name(label, key)}, got shape {tuple(lab.shape)}."
                )
            cmp = _comparable(lab, label, key)[0]
            channels = []
            for values in self.regions.values():
                channel = label_equals(cmp, values[0])
                for value in values[1:]:
                    channel |= label_equals(cmp, value)
                channels.append(channel)
            out = torch.stack(channels).to(self.dtype)
            d[key], *_ = convert_to_dst_type(out, label, dtype=self.dtype)
        return d


class CheckImageLabeld(MapTransform):
    """Check that loaded image, label and mask fit together; raise naming the files if not.

    Checks, on channel-first data:

    * every key in ``keys`` (e.g. label, ROI mask) has the image's spatial shape;
    * the image has ``num_channels`` channels (if given);
    * the label at ``label_key`` holds only integers in ``[0, num_classes)`` or ``ignore_index``
      (if ``num_classes`` is given).

    File names come from the ``MetaTensor`` meta ``"filename_or_obj"`` (set by ``LoadImaged``).
    The data pass through unchanged.

    Args:
        keys: keys compared with the image, each ``(C_k, *spatial)``. Missing keys are skipped
            when ``allow_missing_keys`` is True (the default here, for optional masks).
        image_key: key of the image, ``(C, *spatial)``.
        label_key: key of the integer label map whose values are checked; ``None`` skips it.
        num_channels: expected number of image channels (modalities); ``None`` skips the check.
        num_classes: number of label classes; ``None`` skips the value check.
        ignore_index: label value allowed besides ``[0, num_classes)``.
        allow_missing_keys: skip missing keys instead of raising ``KeyError``.

    Raises:
        ValueError: a spatial shape differs from the image's (the message names both files), the
            image channel count is not ``num_channels``, or the label holds values outside
            ``[0, num_classes)`` that are not ``ignore_index``.
        KeyError: ``image_key`` or a key is missing (and ``allow_missing_keys`` is False).

    Example:
        >>> import torch
        >>> check = CheckImageLabeld(keys="label", num_channels=1, num_classes=3)
        >>> ok = check({"image": torch.zeros(1, 4, 4, 4), "label": torch.zeros(1, 4, 4, 4)})
        >>> check({"image": torch.zeros(1, 4, 4, 4), "label": torch.zeros(1, 4, 4, 5)})
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: spatial shape mismatch: image key 'image' has (4, 4, 4) but key 'label' ...
    """

    def __init__(
        self,
        keys: KeysCollection = ("label", "mask"),
        image_key: str = "image",
        label_key: str | None = "label",
        num_channels: int | None = None,
        num_classes: int | None = None,
        ignore_index: int | None = None,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.label_key = label_key
        self.num_channels = num_channels
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.image_key not in d:
            raise KeyError(f"image key '{self.image_key}' is not in the data (keys: {list(d)}).")
        image = d[self.image_key]
        img = _as_tensor(image)
        _check_channel_first(img, self.image_key, "image")
        if self.num_channels is not None and img.shape[0] != self.num_channels:
            raise ValueError(
                f"image {_name(image, self.image_key)} has {img.shape[0]} channel(s) "
                f"(shape {tuple(img.shape)}), expected {self.num_channels} (one per modality)."
            )
        for key in self.key_iterator(d):
            other = d[key]
            oth = _as_tensor(other)
            _check_channel_first(oth, key, "item")
            if oth.shape[1:] != img.shape[1:]:
                raise ValueError(
                    f"spatial shape mismatch: image {_name(image, self.image_key)} has "
                    f"{tuple(img.shape[1:])} but {_name(other, key)} has {tuple(oth.shape[1:])}."
                )
        if self.num_classes is not None and self.label_key is not None and self.label_key in d:
            label = d[self.label_key]
            lab = _comparable(_as_tensor(label), label, self.label_key)
            ok = (lab >= 0) & (lab < self.num_classes)
            if lab.is_floating_point():
                ok &= lab == torch.round(lab)
            if self.ignore_index is not None:
                ok |= label_equals(lab, self.ignore_index)
            if not bool(ok.all()):
                bad = torch.unique(lab[~ok])[:10].tolist()
                raise ValueError(
                    f"label {_name(label, self.label_key)} holds values {bad} outside "
                    f"[0, {self.num_classes}) that are not the ignore label "
                    f"({self.ignore_index})."
                )
        return d
