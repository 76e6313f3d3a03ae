"""Settings shared by the functions and the loss classes: defaults, the frozen
:class:`LovaszSettings` and their one check."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_CHUNK_ELEMENTS",
    "LovaszSettings",
    "Method",
    "check_binary",
    "check_class_weight",
    "check_finite",
    "check_lovasz_arguments",
    "check_probabilities",
    "collective_check",
    "distributed_world_size",
]

DEFAULT_CHUNK_ELEMENTS = 1 << 21
"""Default budget (elements) of the rows that the sort method processes at once."""

DEFAULT_BINS = 1024
"""Default number of error bins of the histogram method."""

Method = Literal["sort", "histogram"]

T = TypeVar("T")


@dataclass(frozen=True)
class LovaszSettings:
    """How the Lovász losses compute their class rows, checked once and then passed as one value.

    The loss classes hold one (``loss.settings``); the functions build one from their keywords.

    Attributes:
        batch: ``False``: one row per volume and class; ``True``: the batch is one set of voxels.
        method: ``"sort"`` (exact) or ``"histogram"`` (sort-free, error below
            ``max error / bins``).
        bins: positive number of histogram bins.
        chunk_elements: positive element budget of one batched sort (whole rows at a time).
        distributed: rows span the processes of ``process_group`` (needs ``batch=True`` and
            ``method="histogram"``).
        process_group: the ``torch.distributed`` group of ``distributed`` (``None``: default).

    Example:
        >>> settings = LovaszSettings(batch=True, method="histogram", bins=256)
        >>> settings.bins, settings.world_size
        (256, 1)

    Raises:
        ValueError: naming the first setting that is not valid.
    """

    batch: bool = False
    method: Method = "sort"
    bins: int = DEFAULT_BINS
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    distributed: bool = False
    process_group: object | None = None

    def __post_init__(self) -> None:
        if self.method not in ("sort", "histogram"):
            raise ValueError(f"method must be 'sort' or 'histogram', got {self.method!r}")
        if int(self.bins) < 1:
            raise ValueError(f"bins must be a positive integer, got {self.bins}")
        if int(self.chunk_elements) < 1:
            raise ValueError(
                f"chunk_elements must be a positive integer, got {self.chunk_elements}"
            )
        if self.distributed and not self.batch:
            raise ValueError(
                "distributed=True is the loss of the whole distributed batch and needs "
                "batch=True; per-volume losses (batch=False) need no communication: DDP averages "
                "them already"
            )
        if self.distributed and self.method != "histogram":
            raise ValueError(
                f"distributed=True needs method='histogram', got method={self.method!r}: the "
                "exact sort would need every process's errors (an all-gather of B x C x voxels "
                "values per step), while the histogram method all-reduces its per-(class, bin) "
                "counts and stays within max(error) / bins of the exact loss"
            )
        for name, kind in (("batch", bool), ("bins", int), ("chunk_elements", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "distributed", bool(self.distributed))

    @property
    def world_size(self) -> int:
        """Processes the rows span (see :func:`distributed_world_size`)."""
        return distributed_world_size(self.distributed, self.process_group)

    def keywords(self) -> dict[str, object]:
        """The settings as keyword arguments of the ``lovasz_*class_losses`` functions."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_lovasz_arguments(
    *,
    classes: str | Sequence[int] = "present",
    method: str = "sort",
    bins: int = DEFAULT_BINS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    batch: bool = False,
    distributed: bool = False,
) -> str | list[int]:
    """Check ``classes`` and the :class:`LovaszSettings` that the functions and the loss classes
    share, in one place.

    Args:
        classes: ``"present"``, ``"all"``, or a non-empty list of channel indices ``>= 0`` (their
            upper bound is checked against the input).
        method, bins, chunk_elements, batch, distributed: see :class:`LovaszSettings`.

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
        given = list(classes)
        classes = [c for c in map(integer_or_none, given) if c is not None]
        if len(classes) != len(given) or not classes or min(classes) < 0:
            raise ValueError(
                f"classes must be a non-empty list of integer class indices >= 0, got {given}"
            )
    LovaszSettings(batch, method, bins, chunk_elements, distributed)  # type: ignore[arg-type]
    return classes


def integer_or_none(value: object) -> int | None:
    """``value`` as an ``int`` if it is an integer (Python, numpy or 0-d integer tensor) other
    than a bool, else ``None`` (a float such as 1.7, a string, or ``True`` is no label value).

    Example:
        >>> integer_or_none(3), integer_or_none(1.7), integer_or_none(True), integer_or_none("1")
        (3, None, None, None)
    """
    if isinstance(value, bool) or (
        isinstance(value, Tensor) and (value.ndim != 0 or value.dtype == torch.bool)
    ):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum``.

    Args:
        name: the argument's name, for the message.
        value: the value given.
        minimum: the smallest value allowed (1: a positive integer, 0: a non-negative one).

    Raises:
        ValueError: ``value`` is not an integer (floats such as ``1.5`` and bools included) or
            is below ``minimum``; the message names the argument, the expectation and the value.

    Example:
        >>> check_count("batch_size", 2)
        2
        >>> check_count("num_workers", 0.5, minimum=0)
        Traceback (most recent call last):
            ...
        ValueError: num_workers must be an integer >= 0, got 0.5.
    """
    if integer_or_none(value) is None or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return int(value)


def check_ignore_index(ignore_index: int | None) -> int | None:
    """``ignore_index`` as an ``int``, or ``None``.

    Example:
        >>> check_ignore_index(255), check_ignore_index(None)
        (255, None)

    Raises:
        ValueError: a value that is not ``None`` or an integer (``True`` would ignore class 1,
            ``1.5`` would match no label).
    """
    if ignore_index is None:
        return None
    index = integer_or_none(ignore_index)
    if index is None:
        raise ValueError(
            f"ignore_index must be an integer label value or None, got {ignore_index!r}"
        )
    return index


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


def check_class_weight(
    weight: Sequence[float] | float | Tensor,
    name: str = "weight",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Class weights as a float tensor, checked: a scalar or a 1-D sequence of finite,
    non-negative values that are not all zero.

    Inverse-frequency weights of a class absent from the training set come out as ``0 / 0 = NaN``
    or ``1 / 0 = inf``; such a weight would make the loss ``NaN`` (or, averaged away, 0 with
    ``NaN`` gradients), so it is refused here with the offending entries named.

    Args:
        weight: the weights (a number, a sequence or a tensor, on any device).
        name: the argument's name in the error message.
        dtype: the floating dtype the weights are used in; they are checked after the cast (a
            float64 ``1e39`` is finite, but ``inf`` in float32). ``None``: float32 unless
            ``weight`` is already floating point.

    Returns:
        ``weight`` as a tensor of ``dtype``.

    Example:
        >>> check_class_weight([1, 2.5])
        tensor([1.0000, 2.5000])

    Raises:
        ValueError: ``weight`` has more than one dimension, holds NaN, inf or negative values, or
            only zeros (every class would be weighted out).
    """
    try:
        tensor = torch.as_tensor(weight)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{name} must be a number or a sequence of numbers, got {weight!r}"
        ) from error
    if dtype is not None:
        tensor = tensor.to(dtype)
    elif not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    if tensor.ndim > 1 or tensor.numel() == 0:
        raise ValueError(
            f"{name} must be a scalar or a non-empty 1-D sequence, got shape {tuple(tensor.shape)}"
        )
    bad = ~torch.isfinite(tensor) | (tensor < 0)
    if bad.any():
        where = bad.reshape(-1).nonzero().flatten().tolist()
        raise ValueError(
            f"{name} must hold finite values >= 0, got {tensor.tolist()} (bad entries at "
            f"{where}); inverse-frequency weights of a class absent from the data give NaN or "
            "inf: give that class a finite weight, e.g. 0"
        )
    if not (tensor > 0).any():
        raise ValueError(
            f"{name} must not be all zero (no class would count), got {tensor.tolist()}"
        )
    return tensor


def check_finite(tensor: Tensor, name: str) -> None:
    """Refuse NaN and inf values (one host synchronisation, two when the sum is not finite).

    Args:
        tensor: a floating point tensor.
        name: how the error names it.

    Example:
        >>> check_finite(torch.tensor([0.5, float("nan")]), "probs")
        Traceback (most recent call last):
        ...
        ValueError: probs contains NaN or inf values

    Raises:
        ValueError: ``tensor`` holds a NaN or inf.
    """
    # A finite sum is cheap to test; only a non-finite one (which can also come from finite
    # values that overflow) needs the voxel-by-voxel test. Half precision sums in float32, whose
    # range holds any sum of fp16 values.
    total = tensor.sum(dtype=torch.promote_types(tensor.dtype, torch.float32))
    if not torch.isfinite(total) and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values")


def check_probabilities(tensor: Tensor, name: str, hint: str = "") -> None:
    """Refuse values outside [0, 1], NaN and inf (one host synchronisation on good input).

    Args:
        tensor: a floating point tensor.
        name: how the error names it.
        hint: appended to the message: what to do instead.

    Example:
        >>> check_probabilities(torch.tensor([0.5, 1.5]), "probs")
        Traceback (most recent call last):
        ...
        ValueError: probs must hold probabilities in [0, 1], got values in [0.5, 1.5]

    Raises:
        ValueError: NaN or inf (named so), or values outside [0, 1] (with their range).
    """
    if ((tensor >= 0) & (tensor <= 1)).all():  # also False for NaN and inf
        return
    check_finite(tensor, name)
    raise ValueError(
        f"{name} must hold probabilities in [0, 1], got values in "
        f"[{tensor.min().item():g}, {tensor.max().item():g}]{hint}"
    )


def check_binary(tensor: Tensor, name: str) -> None:
    """Refuse values other than 0 and 1 (a bool tensor passes unchecked).

    Args:
        tensor: indicators, bool or numbers.
        name: how the error names it.

    Example:
        >>> check_binary(torch.tensor([0, 1, 2]), "labels")
        Traceback (most recent call last):
        ...
        ValueError: labels must be bool or hold only 0 and 1

    Raises:
        ValueError: a value other than 0 and 1.
    """
    if tensor.dtype != torch.bool and not ((tensor == 0) | (tensor == 1)).all():
        raise ValueError(f"{name} must be bool or hold only 0 and 1")


def _check_nonempty(shape: Sequence[int], name: str) -> None:
    """Refuse tensors without volumes, channels or voxels (their losses have no meaning)."""
    if any(int(n) == 0 for n in shape):
        raise ValueError(
            f"{name} must have at least one volume, one channel and one voxel (every size >= 1), "
            f"got shape {tuple(int(n) for n in shape)}"
        )


def _signature_code(value: object) -> int:
    """An integer for one entry of a :func:`collective_check` signature (``None``: -1)."""
    if value is None:
        return -1
    if isinstance(value, torch.dtype):
        return _DTYPES.index(value) if value in _DTYPES else len(_DTYPES)
    return int(value)  # type: ignore[call-overload]


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _collective_device(source: object, process_group: object | None) -> torch.device:
    """Where the backend of ``process_group`` all-reduces a small tensor: the input's own
    accelerator when it is on one, else the CPU for backends that take CPU tensors (gloo, mpi),
    else this process's current CUDA device (NCCL takes no CPU tensor)."""
    if isinstance(source, Tensor) and source.device.type != "cpu":
        return source.device
    backend = str(dist.get_backend(process_group))
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def collective_check(
    source: object,
    bins: int,
    checks: Callable[[], T] | None = None,
    *,
    process_group: object | None = None,
) -> T | None:
    """Run ``checks`` on every process of a distributed loss and raise the same ``ValueError`` on
    every process when one of them failed, or when they disagree on what the loss's collectives
    exchange: the number of channels of ``source``, ``bins`` and the compute dtype.

    Every process of ``process_group`` must call it (it is a collective): one all-reduce of a few
    integers, and only when something is wrong one ``all_gather_object`` of the messages. Without
    it a process whose input checks raise before the loss's all-reduce leaves the others waiting
    in that all-reduce until the process group's timeout, and processes that all-reduce tensors
    of different sizes or dtypes hang or abort. Any exception of ``checks`` is shared, so that a
    process whose input is not even a tensor still joins the all-reduce.

    Args:
        source: ``(B, C, *S)`` network output (or errors) of this process, or whatever the caller
            was given in its place (``checks`` then raises).
        bins: the histogram bins of the loss.
        checks: the local input checks; ``None``: none.
        process_group: the ``torch.distributed`` group (``None``: the default group).

    Returns:
        What ``checks`` returns (``None`` without ``checks``).

    Example:
        >>> collective_check(torch.zeros(1, 3, 4), 64, lambda: "checked")  # no process group
        'checked'

    Raises:
        ValueError: on every process, naming the process(es) whose checks failed and the first
            message (chained to the local exception where it was raised), or each process's
            channels, bins and dtype when they differ. Without an initialised process group
            ``checks``' own exception propagates unchanged.
    """
    is_tensor = isinstance(source, Tensor)
    signature = {
        "channels": source.shape[1] if is_tensor and source.ndim >= 2 else 0,
        "bins": int(bins),
        "dtype": torch.promote_types(source.dtype, torch.float32) if is_tensor else None,
    }
    error: Exception | None = None
    result = None
    try:
        result = None if checks is None else checks()
    except Exception as local_error:  # shared below whatever it is, then re-raised
        error = local_error
    if not dist.is_available() or not dist.is_initialized():
        if error is not None:
            raise error
        return result
    codes = [_signature_code(v) for v in signature.values()]
    summary = torch.tensor(
        [int(error is not None), *codes, *(-c for c in codes)],
        dtype=torch.int64,
        device=_collective_device(source, process_group),
    )
    dist.all_reduce(summary, op=dist.ReduceOp.MAX, group=process_group)
    failed = bool(summary[0])
    highest, lowest = summary[1 : 1 + len(codes)], -summary[1 + len(codes) :]
    if not failed and torch.equal(highest, lowest):
        return result
    local = (None if error is None else f"{type(error).__name__}: {error}", dict(signature))
    gathered: list = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(gathered, local, group=process_group)
    if failed:
        bad = [(rank, message) for rank, (message, _) in enumerate(gathered) if message]
        ranks = ", ".join(str(rank) for rank, _ in bad)
        message = (
            f"the distributed loss stopped on every process: bad input on process {ranks} "
            f"(rank in the process group): {bad[0][1]}"
        )
    else:
        held = "; ".join(
            f"process {rank}: " + ", ".join(f"{k}={v}" for k, v in sig.items())
            for rank, (_, sig) in enumerate(gathered)
        )
        message = (
            "the processes of a distributed loss must hold the same number of channels, bins and "
            f"compute dtype (their counts are all-reduced), got {held}"
        )
    raise ValueError(message) from error
