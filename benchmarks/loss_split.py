"""Where the time of the default loss goes at the many-class sizes, on the CPU.

For the default ``LovaszCELoss`` (forward + backward) on the synthetic logits of
``python -m lovasz_monai.benchmark --sizes many-classes``, this script measures in one process,
median of ``--repeats`` after ``--warmup`` (the losses interleaved):

1. the whole loss, and the part of it spent in the Lovász rows (the sort, Algorithm 1 and the
   weights written back: ``lovasz_monai.functional.rows._class_rows_by_sort``), for this code
   and, with ``--against COMMIT``, for the package at that commit (as in ``pruned_sort.py``);
2. the operators that take the rest, by self CPU time (``torch.profiler``, two rounds of this
   code's loss).

Run alone on a quiet machine::

    python benchmarks/loss_split.py --against fbc99bd
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from pruned_sort import interleaved, package_at

from lovasz_monai.losses import LovaszCELoss
from lovasz_monai.precision import cpu_description
from lovasz_monai.tools.benchmark import MANY_CLASS_PRESENT, Case, make_inputs

SIZES = ("2x84x96x96x96", "1x105x128x128x128")


def time_rows(package: ModuleType) -> list[float]:
    """Replaces ``package``'s ``_class_rows_by_sort`` in its module by a wrapper that adds the
    wall time of each call to the one-element list returned."""
    rows = importlib.import_module(f"{package.__name__}.functional.rows")
    original, seconds = rows._class_rows_by_sort, [0.0]

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - start

    rows._class_rows_by_sort = wrapper
    return seconds


def loss_step(
    loss: torch.nn.Module,
    logits: torch.Tensor,
    labels: torch.Tensor,
    rows_clock: list[float] | None = None,
    rows_per_step: list[float] | None = None,
) -> Callable[[], None]:
    """Forward + backward of ``loss``; with ``rows_clock`` (:func:`time_rows`), the time spent in
    the Lovász rows during the step is appended to ``rows_per_step``."""

    def step() -> None:
        before = rows_clock[0] if rows_clock is not None else 0.0
        x = logits.detach().requires_grad_(True)
        loss(x, labels).backward()
        if rows_clock is not None and rows_per_step is not None:
            rows_per_step.append(rows_clock[0] - before)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--against", metavar="COMMIT", default=None)
    parser.add_argument("--top", type=int, default=12, help="operators listed in the profile")
    parser.add_argument("--sizes", nargs="+", default=SIZES, metavar="BxCxDxHxW")
    args = parser.parse_args()
    packages = {"this code": importlib.import_module("lovasz_monai")}
    if args.against is not None:
        packages[f"at {args.against}"] = package_at(args.against, Path(tempfile.mkdtemp()))
    clocks = {name: time_rows(package) for name, package in packages.items()}
    print(f"# {cpu_description()}, {torch.get_num_threads()} torch threads")
    for size in args.sizes:
        b, c, *spatial = map(int, size.split("x"))
        logits, labels = make_inputs(Case(b, c, tuple(spatial)), present=MANY_CLASS_PRESENT)
        rows_per_step: dict[str, list[float]] = {name: [] for name in packages}
        steps = {
            name: loss_step(
                package.LovaszCELoss(to_onehot_y=True),
                logits,
                labels,
                clocks[name],
                rows_per_step[name],
            )
            for name, package in packages.items()
        }
        medians = interleaved(steps, args.repeats, args.warmup)
        print(f"\n## {size}, {MANY_CLASS_PRESENT} classes present, medians of {args.repeats}\n")
        print("| default LovaszCELoss | whole loss | Lovász rows | rows' share |")
        print("| --- | ---: | ---: | ---: |")
        for name, total in medians.items():
            rows = statistics.median(rows_per_step[name][args.warmup :])
            print(f"| {name} | {total * 1e3:.0f} ms | {rows * 1e3:.0f} ms | {rows / total:.0%} |")
        step = loss_step(LovaszCELoss(to_onehot_y=True), logits, labels)
        with torch.profiler.profile() as profile:
            step()
            step()
        print(f"\nthis code, self CPU time of the top {args.top} operators (2 rounds):\n")
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
