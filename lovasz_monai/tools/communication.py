"""Communication of the global-batch Lovász loss under DDP (``distributed=True``), per step.

The histogram method's weights depend on per-(class, bin) counts only, which add up across
processes. The distributed loss therefore moves, per step and for ``C`` class rows and ``K``
bins, one all-reduce (max) of ``C`` float32 row maxima and one all-reduce (sum) of
``2 x C x 2 (K + 1)`` float64 counts and error sums, whatever the size of the volumes. An exact
global loss by sorting would need every voxel's error and label from every process: an
all-gather of ``B x voxels x (4 C + 1)`` bytes per process (float32 errors of ``C`` classes and
a uint8 label map).

``python -m lovasz_monai.benchmark --communication`` prints (and with ``--markdown`` appends):

- a computed table for the GPU grid (:data:`~lovasz_monai.tools.benchmark.GPU_GRID`, the batch
  of a size being the batch of one process) and 2 to 8 processes: bytes that each process
  receives with the all-reduces (ring algorithm: ``2 (W - 1) / W`` times the payload) and with
  the all-gather (``(W - 1)`` times the other processes' errors and labels);
- a measured table with ``--processes`` CPU processes (gloo) for the sizes of ``--sizes``
  (default: the CPU grid): the median time of the two all-reduces, of an all-gather of the
  errors and labels, and of one forward + backward of the distributed loss against the
  per-process (``batch=True``) histogram loss on the same inputs.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lovasz_monai.losses import LovaszSoftmaxLoss

__all__ = ["CommunicationVolume", "communication_volume", "computed_table", "measured_table"]


@dataclass(frozen=True)
class CommunicationVolume:
    """Bytes that one process receives per step, for ``world_size`` processes.

    Args:
        allreduce_payload: size of the tensors all-reduced by the distributed loss.
        allreduce_received: what ring all-reduce moves per process, ``2 (W - 1) / W`` payloads.
        allgather_received: what an all-gather of the other processes' errors and labels moves
            into each process.

    Example:
        >>> volume = communication_volume(batch=2, classes=4, voxels=64**3, bins=1024,
        ...                               world_size=2)
        >>> volume.allreduce_payload, volume.allgather_received
        (131216, 8912896)
    """

    allreduce_payload: int
    allreduce_received: float
    allgather_received: int

    @property
    def ratio(self) -> float:
        """All-gather bytes over all-reduce bytes."""
        return self.allgather_received / self.allreduce_received


def communication_volume(
    batch: int, classes: int, voxels: int, bins: int, world_size: int
) -> CommunicationVolume:
    """Per-process communication of the distributed histogram loss and of an exact all-gather.

    Args:
        batch: volumes per process.
        classes: class rows ``C``.
        voxels: voxels per volume.
        bins: histogram bins ``K``.
        world_size: processes ``W >= 2``.

    Returns:
        The :class:`CommunicationVolume`.

    Raises:
        ValueError: ``world_size < 2`` or a non-positive size.
    """
    if world_size < 2 or min(batch, classes, voxels, bins) < 1:
        raise ValueError(
            f"need world_size >= 2 and positive sizes, got world_size={world_size}, "
            f"batch={batch}, classes={classes}, voxels={voxels}, bins={bins}"
        )
    payload = 4 * classes + 8 * 2 * classes * 2 * (bins + 1)
    received = 2 * (world_size - 1) / world_size * payload
    gathered = (world_size - 1) * batch * voxels * (4 * classes + 1)
    return CommunicationVolume(payload, received, gathered)


def _megabytes(n: float) -> str:
    return f"{n / 1e6:,.3f}" if n < 1e6 else f"{n / 1e6:,.1f}"


def computed_table(
    sizes: Sequence[tuple[int, int, int]], bins: int, worlds: Sequence[int] = (2, 4, 8)
) -> str:
    """Markdown table of :func:`communication_volume` for ``(batch, classes, voxels)`` sizes.

    Example:
        >>> print(computed_table([(1, 2, 8)], bins=4, worlds=[2]).splitlines()[2])
        | 1 x 2 x 8 voxels | 2 | 0.000 | 0.000 | 0.000 | 0.2x |
    """
    lines = [
        "| B x C x voxels (per process) | processes | all-reduce payload (MB) | "
        "all-reduce received (MB) | all-gather received (MB) | all-gather / all-reduce |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for batch, classes, voxels in sizes:
        for world in worlds:
            v = communication_volume(batch, classes, voxels, bins, world)
            lines.append(
                f"| {batch} x {classes} x {voxels:,} voxels | {world} | "
                f"{_megabytes(v.allreduce_payload)} | {_megabytes(v.allreduce_received)} | "
                f"{_megabytes(v.allgather_received)} | {v.ratio:,.1f}x |"
            )
    return "\n".join(lines)


# -- measured with CPU processes ---------------------------------------------------------------


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    # the slowest process sets the pace of a collective step
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def _measure_size(
    rank: int,
    world: int,
    size: tuple[int, int, tuple[int, ...]],
    bins: int,
    repeats: int,
    warmup: int,
) -> dict:
    """Median step times of the collectives and of the two losses at one size."""
    batch, classes, spatial = size
    g = torch.Generator().manual_seed(rank)
    labels = torch.randint(0, classes, (batch, 1, *spatial), generator=g)
    logits = torch.randn(batch, classes, *spatial, generator=g)
    logits.scatter_add_(1, labels, torch.full_like(logits[:, :1], 2.0))
    logits.requires_grad_(True)
    common = {"to_onehot_y": True, "batch": True, "method": "histogram", "bins": bins}

    def step(loss: LovaszSoftmaxLoss) -> Callable[[], None]:
        def run() -> None:
            logits.grad = None
            loss(logits, labels).backward()

        return run

    # the two all-reduces of the distributed loss, on tensors of their sizes
    maxima = torch.zeros(classes)
    sums = torch.zeros(2, classes * 2 * (bins + 1), dtype=torch.float64)

    def all_reduces() -> None:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        dist.all_reduce(sums)

    # what an exact (sorted) global loss would need: every process's errors and labels
    errors = torch.rand(batch, classes, *spatial)
    label_bytes = labels.to(torch.uint8)
    gathered_errors = [torch.empty_like(errors) for _ in range(world)]
    gathered_labels = [torch.empty_like(label_bytes) for _ in range(world)]

    def all_gather() -> None:
        dist.all_gather(gathered_errors, errors)
        dist.all_gather(gathered_labels, label_bytes)

    return {
        "size": size,
        "all_reduces": _median_seconds(all_reduces, repeats, warmup),
        "all_gather": _median_seconds(all_gather, repeats, warmup),
        "local": _median_seconds(step(LovaszSoftmaxLoss(**common)), repeats, warmup),
        "global": _median_seconds(
            step(LovaszSoftmaxLoss(**common, distributed=True)), repeats, warmup
        ),
    }


def _measure_worker(
    rank: int,
    world: int,
    port: int,
    sizes: list[tuple[int, int, tuple[int, ...]]],
    bins: int,
    repeats: int,
    warmup: int,
    out: str,
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        rows = [_measure_size(rank, world, size, bins, repeats, warmup) for size in sizes]
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured_table(
    sizes: Sequence[tuple[int, int, tuple[int, ...]]],
    bins: int = 1024,
    processes: int = 2,
    repeats: int = 5,
    warmup: int = 1,
) -> str:
    """Markdown table of times measured with ``processes`` CPU processes (gloo).

    Args:
        sizes: ``(batch, classes, spatial)`` per process.
        bins: histogram bins.
        processes: CPU processes (``>= 2``); each uses ``cpu_count // processes`` threads.
        repeats, warmup: timed and untimed steps; each step's time is the slowest process's.

    Returns:
        The table of medians in ms of the two all-reduces, of an all-gather of the errors and
        labels, and of forward + backward of the per-process and of the distributed loss.

    Raises:
        ValueError: ``processes < 2`` or gloo unavailable.
    """
    if processes < 2:
        raise ValueError(f"processes must be >= 2, got {processes}")
    if not dist.is_available() or not dist.is_gloo_available():
        raise ValueError("the measurement needs torch.distributed with the gloo backend")
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.pt")
        args = (processes, _free_port(), list(sizes), bins, repeats, warmup, out)
        mp.spawn(_measure_worker, args=args, nprocs=processes, join=True)
        rows = torch.load(out, weights_only=False)
    lines = [
        "| B x C x spatial (per process) | all-reduces (ms) | all-gather of errors + labels (ms) "
        "| loss fwd+bwd, per process (ms) | loss fwd+bwd, global (ms) | global / per process |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        batch, classes, spatial = row["size"]
        name = "x".join(str(n) for n in (batch, classes, *spatial))
        lines.append(
            f"| {name} | {1000 * row['all_reduces']:.2f} | {1000 * row['all_gather']:.1f} | "
            f"{1000 * row['local']:.1f} | {1000 * row['global']:.1f} | "
            f"{row['global'] / row['local']:.2f}x |"
        )
    return "\n".join(lines)
