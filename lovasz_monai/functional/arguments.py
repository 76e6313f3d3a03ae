"""Settings shared by the functions and the loss classes: defaults and their one check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.distributed as dist

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_CHUNK_ELEMENTS",
    "Method",
    "check_lovasz_arguments",
    "distributed_world_size",
]

DEFAULT_CHUNK_ELEMENTS = 1 << 21
"""Default budget (elements) of the rows that the sort method processes at once."""

DEFAULT_BINS = 1024
"""Default number of error bins of the histogram method."""

Method = Literal["sort", "histogram"]


def check_lovasz_arguments(
    *,
    classes: str | Sequence[int] = "present",
    method: str = "sort",
    bins: int = DEFAULT_BINS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    batch: bool = False,
    distributed: bool = False,
) -> str | list[int]:
    """Check the settings that the functions and the loss classes share, in one place.

    Args:
        classes: ``"present"``, ``"all"``, or a non-empty list of channel indices ``>= 0`` (their
            upper bound is checked against the input).
        method: ``"sort"`` or ``"histogram"``.
        bins: positive number of histogram bins.
        chunk_elements: positive element budget of one batched sort.
        batch, distributed: ``distributed=True`` needs ``batch=True`` and
            ``method="histogram"``.

    Returns:
        ``classes`` as given (a string) or as a list of ``int``.

    Example:
        >>> check_lovasz_arguments(classes=(1, 2), method="histogram", bins=256)
        [1, 2]

    Raises:
        ValueError: naming the first argument that is not valid.
    """
    if isinstance(classes, str):
        if classes not in ("present", "all"):
            raise ValueError(f"classes must be 'present', 'all' or a list, got {classes!r}")
    else:
        classes = [int(c) for c in classes]
        if not classes or min(classes) < 0:
            raise ValueError(f"classes must be a non-empty list of class indices, got {classes}")
    if method not in ("sort", "histogram"):
        raise ValueError(f"method must be 'sort' or 'histogram', got {method!r}")
    if int(bins) < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    if int(chunk_elements) < 1:
        raise ValueError(f"chunk_elements must be a positive integer, got {chunk_elements}")
    if distributed and not batch:
        raise ValueError(
            "distributed=True is the loss of the whole distributed batch and needs batch=True; "
            "per-volume losses (batch=False) need no communication: DDP averages them already"
        )
    if distributed and method != "histogram":
        raise ValueError(
            f"distributed=True needs method='histogram', got method={method!r}: the exact sort "
            "would need every process's errors (an all-gather of B x C x voxels values per "
            "step), while the histogram method all-reduces its per-(class, bin) counts and stays "
            "within max(error) / bins of the exact loss"
        )
    return classes


def distributed_world_size(distributed: bool, process_group: object | None = None) -> int:
    """Number of processes that a ``distributed=True`` loss spans.

    Args:
        distributed: the loss's ``distributed`` setting.
        process_group: a ``torch.distributed`` process group, ``None`` for the default group.

    Returns:
        The size of ``process_group``, or 1 when ``distributed`` is False or no process group is
        initialised: then the loss is the loss of the local batch, so that one config runs the same
        on one device and on many.

    Example:
        >>> distributed_world_size(True)  # no process group in this interpreter
        1
    """
    if not distributed or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)
