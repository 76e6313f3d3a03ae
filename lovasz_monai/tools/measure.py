"""How the benchmark measures: forward + backward time (median after warm-up, the device
synchronised) and the peak extra memory of one step (CUDA allocator statistics; on the CPU the
torch allocator's events and the numpy/Python heap, in one time-ordered trace)."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["loss_step", "peak_memory_bytes", "synchronize", "time_fwd_bwd"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_step(loss_fn: LossFn, logits: Tensor, labels: Tensor) -> None:
    """One timed unit of work: ``loss_fn(logits, labels).backward()`` from a cleared gradient."""
    logits.grad = None
    loss_fn(logits, labels).backward()


def time_fwd_bwd(
    loss_fn: LossFn, logits: Tensor, labels: Tensor, repeats: int = 5, warmup: int = 1
) -> list[float]:
    """Wall-clock seconds of ``loss_fn(logits, labels).backward()``, one per timed run.

    The device is synchronised before and after each run (CUDA kernels are asynchronous).

    Args:
        loss_fn: maps ``(logits, labels)`` to a scalar loss.
        logits: ``(B, C, *spatial)`` leaf tensor with ``requires_grad``.
        labels: ``(B, 1, *spatial)`` label map.
        repeats: number of timed runs, >= 1.
        warmup: untimed runs before them, >= 0.

    Returns:
        ``repeats`` durations in seconds.

    Example:
        >>> logits = torch.randn(1, 2, 4, requires_grad=True)
        >>> labels = torch.tensor([[[0, 1, 1, 0]]])
        >>> loss = lambda x, y: (x.softmax(1)[:, 1] - y[:, 0]).abs().mean()
        >>> len(time_fwd_bwd(loss, logits, labels, repeats=2, warmup=0))
        2

    Raises:
        ValueError: when ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = logits.device
    for _ in range(warmup):
        loss_step(loss_fn, logits, labels)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        loss_step(loss_fn, logits, labels)
        synchronize(device)
        times.append(time.perf_counter() - start)
    logits.grad = None
    return times


_HEAP_MARKER = "lovasz_monai.benchmark heap "


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of torch CPU allocations plus the tracemalloc heap (numpy, Python) while ``fn`` runs.

    The torch profiler records each allocation and free of torch's CPU allocator. Memory that
    does not go through it (numpy arrays, e.g. a numpy sort; Python objects) is traced by
    ``tracemalloc``: at each Python call/return event (``sys.setprofile``) a profiler marker
    holding the heap's current size and its peak since the previous marker is written into the
    same trace. Replaying both in time order gives the peak of the sum (between two markers the
    largest torch total is added to the heap's peak: an upper bound, tight at this granularity).
    """
    import tracemalloc

    from torch.profiler import ProfilerActivity, profile, record_function

    previous_hook = sys.getprofile()
    started = not tracemalloc.is_tracing()
    base = [0]

    def mark(current: int, peak: int) -> None:
        with record_function(f"{_HEAP_MARKER}{current - base[0]} {peak - base[0]}"):
            pass
        tracemalloc.reset_peak()

    def hook(frame: object, event: str, arg: object) -> None:
        mark(*tracemalloc.get_traced_memory())

    # tracemalloc starts inside the profiler: starting the profiler (imports) under it is slow
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if started:
            tracemalloc.start()
        try:
            base[0] = tracemalloc.get_traced_memory()[0]
            mark(base[0], base[0])
            if previous_hook is None:  # another profiler (cProfile) keeps its hook
                sys.setprofile(hook)
            try:
                fn()
            finally:
                if previous_hook is None:
                    sys.setprofile(None)
                mark(*tracemalloc.get_traced_memory())
        finally:
            if started:
                tracemalloc.stop()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as error:  # pragma: no cover - depends on the torch version
        raise RuntimeError(
            "this torch version does not expose the profiler's memory events "
            "(prof.profiler.kineto_results); run with --skip-memory"
        ) from error
    timeline = []
    for event in events:
        name = event.name()
        if name == "[memory]" and str(event.device_type()).endswith("CPU"):
            timeline.append((event.start_ns(), 0, event.nbytes(), 0))
        elif name.startswith(_HEAP_MARKER):
            current, peak = (int(n) for n in name[len(_HEAP_MARKER) :].split())
            timeline.append((event.start_ns(), 1, current, peak))
    # The heap counts from its size at the start, floored at 0: freeing Python objects that
    # existed before (garbage of earlier work) does not offset new allocations.
    torch_now = torch_high = heap_now = peak = 0
    for _, kind, value, heap_peak in sorted(timeline):
        if kind == 0:  # a torch allocation (> 0) or free (< 0)
            torch_now += value
            torch_high = max(torch_high, torch_now)
            peak = max(peak, torch_now + heap_now)
        else:  # heap marker: the heap's peak since the last marker, then its current size
            peak = max(peak, torch_high + max(heap_peak, 0))
            heap_now, torch_high = max(value, 0), torch_now
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak memory allocated while ``fn()`` runs, beyond what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
    memory allocated before the call. CPU: ``torch.profiler`` with ``profile_memory=True``
    records every allocation and free of torch's CPU allocator with its size; their running sum
    in time order is the memory allocated since the start. Allocations outside torch (numpy
    arrays, Python objects) are traced with ``tracemalloc`` and written into the same trace as
    markers, so the peak is that of the sum of both. Memory freed during ``fn`` that was
    allocated before it counts negatively.

    Args:
        fn: the work to measure; what it returns is dropped.
        device: ``"cpu"`` or a CUDA device.

    Returns:
        Peak extra bytes (``>= 0``).

    Example:
        >>> peak_memory_bytes(lambda: torch.empty(2**20, dtype=torch.uint8)) >= 2**20
        True

    Raises:
        RuntimeError: on CPU, when the profiler does not expose memory events.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - baseline)
    return _cpu_peak_bytes(fn)
