"""Speed and memory benchmark of the Lovász-Softmax loss against baselines (``python -m``).

Every method runs forward + backward together on the same tensors (one float32 logits tensor with
``requires_grad``, one integer label map): ``loss = method(logits, labels); loss.backward()``.
Each (size, method) pair gets ``--warmup`` untimed runs, then ``--repeats`` timed runs, taken in
rounds (one run of every method per round) so that load from other processes hits all methods
alike; the table reports the median and the ratio against the reference loop and MONAI
``DiceLoss`` measured in the same process, which stay comparable on a shared, noisy machine where
absolute times do not.

Methods (``--methods``, comma-separated; default: all that can run):

- ``sort``: ours, ``LovaszSoftmaxLoss(to_onehot_y=True, method="sort", batch=True)``;
- ``sort-volume``: the same with ``batch=False`` (one loss per volume);
- ``histogram``: ours, ``method="histogram"``, ``batch=True``;
- ``reference``: :func:`reference_lovasz_softmax`, a per-class loop written from Algorithm 1 of
  Berman et al. (CVPR 2018), kept here as the reference;
- ``kornia``: ``kornia.losses.lovasz_softmax_loss`` (skipped when kornia is not installed). It is
  2D only, so a ``(B, C, D1, D2, ...)`` volume is viewed as ``(B, C, D1, D2 * ...)``; the loss does
  not depend on voxel order. It scores each image on its own and averages over all classes;
- ``dice`` / ``dicece``: MONAI ``DiceLoss`` / ``DiceCELoss`` with ``to_onehot_y=True`` and
  ``softmax=True``.

Peak memory is the largest amount of memory allocated during one forward + backward beyond what
was allocated before it (the logits, the labels): on CUDA ``torch.cuda.max_memory_allocated``
after ``torch.cuda.reset_peak_memory_stats``; on CPU the allocation and free events recorded by
``torch.profiler`` with ``profile_memory=True``, summed in time order, together with the numpy and
Python heap traced by ``tracemalloc`` (numpy buffers bypass torch's allocator; see
:func:`peak_memory_bytes`). The gradient of the logits is part of it.

The value column checks correctness: methods that compute the reference's quantity (batch mode,
present classes) show their largest absolute difference to it; ``sort-volume`` and ``kornia``
are compared with the reference run per volume (``kornia`` over all classes). The run fails (exit
status 1, and a "VALUE CHECK FAILED" paragraph in the Markdown) when the sort method differs by
more than ``1e-4``.

Sizes (``--sizes``, comma-separated): an integer ``N`` is an ``N x N x N`` volume with ``--batch``
volumes and ``--classes`` classes; ``BxCxS1x...xSk`` gives batch, classes and ``k >= 1`` spatial
sizes explicitly, e.g. ``2x14x96x96x96`` or ``4x3x256x256``. The default is the CPU grid
``2x4x64x64x64,2x14x96x96x96,1x2x128x128x128``, plus ``2x14x128x128x128,1x105x128x128x128`` with
``--device cuda``.

Usage::

    python -m lovasz_monai.benchmark                       # the CPU grid, all methods
    python -m lovasz_monai.benchmark --sizes 64,96 --classes 4 --batch 2 --repeats 5
    python -m lovasz_monai.benchmark --sizes 1x3x8x8x8 --repeats 1 --warmup 0 --skip-memory
    python -m lovasz_monai.benchmark --device cuda --markdown benchmarks/RESULTS.md
    python -m lovasz_monai.benchmark --sizes 2x14x96x96x96 --methods sort --profile

``--markdown PATH`` appends a section (``--overwrite``: replaces the file) with the device, CPU/GPU
name, thread count, library versions, the git commit and a hash of the loss sources, the date and
the exact command line, then one table per size.
``--profile`` also prints a ``torch.profiler`` table (time and memory by operator) of our sort
method at the first size.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lovasz_monai.precision import cpu_description
from lovasz_monai.tools.measure import loss_step, peak_memory_bytes, synchronize, time_fwd_bwd
from lovasz_monai.tools.reference import ref_lovasz_softmax

__all__ = [
    "CPU_GRID",
    "GPU_GRID",
    "MANY_CLASS_GRID",
    "MANY_CLASS_PRESENT",
    "METHODS",
    "Case",
    "Result",
    "Settings",
    "format_table",
    "main",
    "make_inputs",
    "markdown_header",
    "parse_sizes",
    "reference_lovasz_softmax",
    "run_case",
]

CPU_GRID = "2x4x64x64x64,2x14x96x96x96,1x2x128x128x128"
"""Sizes required on CPU (batch x classes x spatial)."""

GPU_GRID = CPU_GRID + ",2x14x128x128x128,1x105x128x128x128"
"""Sizes required on a GPU."""

MANY_CLASS_GRID = "2x84x96x96x96,1x105x128x128x128"
"""``--sizes many-classes``: a brain parcellation (84 classes) and TotalSegmentator's 105."""

MANY_CLASS_PRESENT = 20
"""Classes present per volume of ``--sizes many-classes`` unless ``--present`` is given."""

SORT_TOLERANCE = 1e-4
"""Largest accepted difference between our sort method and the reference loop."""

LossFn = Callable[[Tensor, Tensor], Tensor]


# -- sizes and inputs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark size: ``batch`` volumes of ``classes`` channels and ``spatial`` voxels.

    The inputs of a case are logits ``(batch, classes, *spatial)`` and labels
    ``(batch, 1, *spatial)`` (see :func:`make_inputs`). The fields are not checked here;
    :func:`parse_sizes` validates the ``--sizes`` syntax.

    Args:
        batch: number of volumes ``B``.
        classes: number of classes ``C``.
        spatial: spatial sizes ``(S1, ..., Sk)``.

    Example:
        >>> case = Case(1, 2, (4, 4, 4))
        >>> case.name, case.voxels
        ('1x2x4x4x4', 64)
    """

    batch: int
    classes: int
    spatial: tuple[int, ...]

    @property
    def name(self) -> str:
        """``BxCxS1x...xSk``, the syntax of ``--sizes``."""
        return "x".join(str(n) for n in (self.batch, self.classes, *self.spatial))

    @property
    def voxels(self) -> int:
        """Voxels per volume."""
        count = 1
        for n in self.spatial:
            count *= n
        return count


def parse_sizes(text: str, batch: int = 2, classes: int = 4) -> list[Case]:
    """Parse the ``--sizes`` syntax.

    Args:
        text: comma-separated items; ``N`` is an ``N x N x N`` cube with ``batch`` volumes and
            ``classes`` classes, ``BxCxS1x...xSk`` (``k >= 1``) is explicit.
        batch: number of volumes of a cube item.
        classes: number of classes of a cube item.

    Returns:
        The cases in the given order.

    Example:
        >>> parse_sizes("64,1x3x8x8", batch=2, classes=4)
        [Case(batch=2, classes=4, spatial=(64, 64, 64)), Case(batch=1, classes=3, spatial=(8, 8))]

    Raises:
        ValueError: on an empty list, a malformed item, a size below 1 or fewer than 2 classes
            (softmax over one channel is constant).
    """
    cases = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        try:
            numbers = [int(part) for part in item.lower().split("x")]
        except ValueError:
            raise ValueError(
                f"size {item!r} is neither an integer N (an N^3 cube) nor BxCxS1x...xSk"
            ) from None
        if len(numbers) == 1:
            case = Case(batch, classes, (numbers[0],) * 3)
        elif len(numbers) >= 3:
            case = Case(numbers[0], numbers[1], tuple(numbers[2:]))
        else:
            raise ValueError(
                f"size {item!r} needs batch, classes and at least one spatial size (BxCxS1...)"
            )
        if min(case.batch, *case.spatial) < 1 or case.classes < 2:
            raise ValueError(f"size {item!r}: sizes must be >= 1 and classes >= 2")
        cases.append(case)
    if not cases:
        raise ValueError(f"no sizes given in {text!r}")
    return cases


def make_inputs(
    case: Case, device: torch.device | str = "cpu", seed: int = 0, present: int | None = None
) -> tuple[Tensor, Tensor]:
    """Logits and a label map of a partly trained network, reproducible from ``seed``.

    Labels are uniform in ``[0, C)`` (with ``present``: in ``present`` classes drawn for each
    volume, as in a patch of a many-class task); logits are ``N(0, 1)`` plus 2 on the true class.

    Args:
        case: the size.
        device: where the tensors are made (generated on CPU, then moved).
        seed: random seed.
        present: classes that occur in each volume (``None``: all ``C``).

    Returns:
        ``(logits, labels)``: float32 ``(B, C, *spatial)`` leaf with ``requires_grad`` and int64
        ``(B, 1, *spatial)``.

    Example:
        >>> logits, labels = make_inputs(Case(1, 3, (4, 4)))
        >>> tuple(logits.shape), tuple(labels.shape), logits.requires_grad
        ((1, 3, 4, 4), (1, 1, 4, 4), True)
        >>> _, labels = make_inputs(Case(2, 10, (8, 8)), present=3)
        >>> [len(volume.unique()) for volume in labels]
        [3, 3]

    Raises:
        ValueError: ``present`` is not in ``[1, C]``.
        RuntimeError: when ``device`` is not available.
    """
    generator = torch.Generator().manual_seed(seed)
    if present is None:
        labels = torch.randint(0, case.classes, (case.batch, 1, *case.spatial), generator=generator)
    else:
        if not 1 <= present <= case.classes:
            raise ValueError(f"present must be in [1, {case.classes}], got {present}")
        picks = torch.randint(0, present, (case.batch, 1, *case.spatial), generator=generator)
        chosen = [torch.randperm(case.classes, generator=generator)[:present] for _ in picks]
        labels = torch.stack([classes[pick] for classes, pick in zip(chosen, picks, strict=True)])
    logits = torch.randn(case.batch, case.classes, *case.spatial, generator=generator)
    logits.scatter_add_(1, labels, torch.full(labels.shape, 2.0))
    logits = logits.to(device).requires_grad_(True)
    return logits, labels.to(device)


# -- the reference -----------------------------------------------------------------------------


def reference_lovasz_softmax(
    logits: Tensor, labels: Tensor, per_volume: bool = False, classes: str = "present"
) -> Tensor:
    """Plain per-class Lovász-Softmax loss, written from Algorithm 1 of Berman et al. (2018).

    Softmax over channels, then :func:`lovasz_monai.tools.reference.ref_lovasz_softmax` (the
    reference the tests use too): for each class, errors ``|fg - p|``, one descending sort, the
    Jaccard-loss increments from cumulative sums, and the dot product of sorted errors and
    increments (autograd goes through the sort). Class losses are averaged (``"present"``: over
    classes with foreground, 0 if none).

    Args:
        logits: ``(B, C, *spatial)`` float logits.
        labels: ``(B, 1, *spatial)`` integer label map in ``[0, C)``.
        per_volume: ``False``: the batch is one set of voxels; ``True``: mean over volumes of
            the per-volume loss.
        classes: ``"present"`` or ``"all"``.

    Returns:
        Scalar loss (float32 or float64, as promoted from ``logits``).

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
        >>> reference_lovasz_softmax(logits, torch.tensor([[[0, 1]]]))
        tensor(0.2315)

    Raises:
        ValueError: on mismatched shapes or an unknown ``classes``.
    """
    if logits.ndim < 3 or labels.shape != (logits.shape[0], 1, *logits.shape[2:]):
        raise ValueError(
            f"expected logits (B, C, *spatial) and labels (B, 1, *spatial), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if classes not in ("present", "all"):
        raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
    return ref_lovasz_softmax(probs, labels[:, 0], classes, per_image=per_volume)


# -- methods -----------------------------------------------------------------------------------


def _kornia_loss() -> LossFn:
    from kornia.losses import lovasz_softmax_loss

    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        batch, channels, first = logits.shape[:3]
        return lovasz_softmax_loss(
            logits.reshape(batch, channels, first, -1), labels.reshape(batch, first, -1)
        )

    return loss


def _ours(method: str, batch: bool, bins: int, chunk_elements: int | None) -> LossFn:
    from lovasz_monai.losses import LovaszSoftmaxLoss

    extra = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    return LovaszSoftmaxLoss(to_onehot_y=True, method=method, batch=batch, bins=bins, **extra)


def _monai(name: str) -> LossFn:
    from monai import losses

    return getattr(losses, name)(to_onehot_y=True, softmax=True)


def _reference(per_volume: bool = False, classes: str = "present") -> LossFn:
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        return reference_lovasz_softmax(logits, labels, per_volume, classes)

    return loss


@dataclass(frozen=True)
class Settings:
    """How each size is measured: the options of :func:`main` that :func:`run_case` uses.

    Args:
        repeats: timed runs per method (the median is reported).
        warmup: untimed runs before timing.
        skip_memory: do not measure peak memory.
        bins: bins of our histogram method.
        chunk_elements: ``chunk_elements`` of our sort method (``None``: the loss's default).
        seed: random seed of the inputs.
        present: classes that occur in each volume (``None``: all; see :func:`make_inputs`).

    Example:
        >>> Settings(repeats=1, warmup=0).skip_memory
        False
    """

    repeats: int = 5
    warmup: int = 1
    skip_memory: bool = False
    bins: int = 1024
    chunk_elements: int | None = None
    seed: int = 0
    present: int | None = None


@dataclass(frozen=True)
class _Method:
    label: str
    make: Callable[[Settings], LossFn]
    check: tuple[bool, str] | None  # reference (per_volume, classes) of the same quantity


METHODS: dict[str, _Method] = {
    "sort": _Method(
        "ours sort (batch)",
        lambda a: _ours("sort", True, a.bins, a.chunk_elements),
        (False, "present"),
    ),
    "sort-volume": _Method(
        "ours sort (per volume)",
        lambda a: _ours("sort", False, a.bins, a.chunk_elements),
        (True, "present"),
    ),
    "histogram": _Method(
        "ours histogram (batch)",
        lambda a: _ours("histogram", True, a.bins, a.chunk_elements),
        (False, "present"),
    ),
    "reference": _Method("reference loop (Alg. 1)", lambda a: _reference(), (False, "present")),
    "kornia": _Method("kornia lovasz_softmax_loss", lambda a: _kornia_loss(), (True, "all")),
    "dice": _Method("MONAI DiceLoss", lambda a: _monai("DiceLoss"), None),
    "dicece": _Method("MONAI DiceCELoss", lambda a: _monai("DiceCELoss"), None),
}
"""Benchmarked methods by ``--methods`` name: row label, factory, quantity for the value check."""


def _kornia_available() -> bool:
    try:
        import kornia.losses  # noqa: F401
    except ImportError:
        return False
    return True


# -- one size ----------------------------------------------------------------------------------


@dataclass
class Result:
    """Measurements of one method at one size (times in seconds, memory in bytes).

    Args:
        name: key in :data:`METHODS`.
        label: row label of the table.
        times: wall-clock seconds of the timed forward + backward runs.
        peak_bytes: peak extra memory, ``None`` when not measured.
        value: the loss value.
        diff: absolute difference to the reference loop, ``None`` when not compared.
        notes: free-form remarks.

    Example:
        >>> result = Result("sort", "ours sort (batch)", [0.003, 0.001, 0.002])
        >>> result.median
        0.002

    Raises:
        statistics.StatisticsError: from :attr:`median` when ``times`` is empty.
    """

    name: str
    label: str
    times: list[float]
    peak_bytes: int | None = None
    value: float = float("nan")
    diff: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median time in seconds."""
        return statistics.median(self.times)


def run_case(
    case: Case,
    methods: Sequence[str],
    settings: Settings,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Time (and measure the memory of) each method on one size.

    Args:
        case: the size.
        methods: names in :data:`METHODS`.
        settings: repeats, warm-up, memory, method options and seed.
        device: where to run.
        log: progress messages.

    Returns:
        One :class:`Result` per method, in order.

    Example:
        >>> settings = Settings(repeats=1, warmup=0, skip_memory=True)
        >>> results = run_case(
        ...     Case(1, 2, (4, 4, 4)), ["sort", "reference"], settings, torch.device("cpu"),
        ...     log=lambda message: None,
        ... )
        >>> [(r.name, len(r.times), r.peak_bytes) for r in results]
        [('sort', 1, None), ('reference', 1, None)]
        >>> results[0].diff < 1e-4
        True

    Raises:
        KeyError: on an unknown method name.
    """
    logits, labels = make_inputs(case, device, settings.seed, settings.present)
    references: dict[tuple[bool, str], float] = {}
    results, loss_fns = [], []
    for name in methods:
        spec = METHODS[name]
        loss_fn = spec.make(settings)
        log(f"  {case.name}: {spec.label}: value check and warm-up")
        with torch.no_grad():
            value = float(loss_fn(logits, labels))
            diff = None
            if spec.check is not None:
                if spec.check not in references:
                    references[spec.check] = float(
                        reference_lovasz_softmax(logits, labels, *spec.check)
                    )
                diff = abs(value - references[spec.check])
        for _ in range(settings.warmup):
            loss_step(loss_fn, logits, labels)
        logits.grad = None
        results.append(Result(name, spec.label, [], None, value, diff))
        loss_fns.append(loss_fn)
    # Interleaved: a burst of load from other processes slows all methods alike.
    for repeat in range(settings.repeats):
        log(f"  {case.name}: timed round {repeat + 1}/{settings.repeats}")
        for result, loss_fn in zip(results, loss_fns, strict=True):
            result.times += time_fwd_bwd(loss_fn, logits, labels, repeats=1, warmup=0)
    if not settings.skip_memory:
        log(f"  {case.name}: peak memory")
        for result, loss_fn in zip(results, loss_fns, strict=True):
            result.peak_bytes = peak_memory_bytes(
                lambda fn=loss_fn: loss_step(fn, logits, labels), device
            )
            logits.grad = None
    return results


# -- report ------------------------------------------------------------------------------------


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base <= 0:
        return "-"
    return f"{value / base:.2f}"


def _diff_text(result: Result) -> str:
    if result.diff is None:
        return "-"
    reference = {"sort-volume": " (per vol.)", "kornia": " (per vol., all cl.)"}
    return f"{result.diff:.1e}{reference.get(result.name, '')}"


def format_table(results: Sequence[Result], markdown: bool = False) -> str:
    """Table of one size: times, memory and ratios against the reference loop and DiceLoss.

    Args:
        results: the results of one :func:`run_case` call.
        markdown: a Markdown table instead of aligned text.

    Returns:
        The table, one line per method after the header.

    Example:
        >>> ref = Result("reference", "ref", [0.004, 0.002, 0.003], 2**20, 0.25, 0.0)
        >>> ours = Result("sort", "sort", [0.001, 0.002], 2**19, 0.25, 1e-7)
        >>> format_table([ref, ours]).splitlines()[3].split()
        ['sort', '1.5', '1.0-2.0', '0.50', '-', '0.5', '0.50', '-', '0.250000', '1.0e-07']
        >>> print(format_table([ref, ours], markdown=True).splitlines()[2])
        | ref | 3.0 | 2.0-4.0 | 1.00 | - | 1.0 | 1.00 | - | 0.250000 | 0.0e+00 |

    Raises:
        statistics.StatisticsError: when a result has no times.
    """
    by_name = {r.name: r for r in results}
    ref, dice = by_name.get("reference"), by_name.get("dice")

    def mem(r: Result | None) -> float | None:
        return None if r is None or r.peak_bytes is None else float(r.peak_bytes)

    header = [
        "method",
        "median ms",
        "min-max ms",
        "x ref loop",
        "x DiceLoss",
        "peak extra MB",
        "mem x ref loop",
        "mem x DiceLoss",
        "loss value",
        "abs diff vs ref",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r.label,
                f"{r.median * 1e3:.1f}",
                f"{min(r.times) * 1e3:.1f}-{max(r.times) * 1e3:.1f}",
                _ratio(r.median, ref.median if ref else None),
                _ratio(r.median, dice.median if dice else None),
                "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}",
                _ratio(mem(r), mem(ref)),
                _ratio(mem(r), mem(dice)),
                f"{r.value:.6f}",
                _diff_text(r),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(w) for text, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(text.ljust(w) for text, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _versions() -> str:
    import monai

    parts = [f"torch {torch.__version__}", f"monai {monai.__version__}"]
    try:
        import kornia

        parts.append(f"kornia {kornia.__version__}")
    except ImportError:
        parts.append("kornia not installed")
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def _source_version() -> str:
    """Git commit of the checkout (``+modified`` when the loss sources differ from it) and a
    short hash of the ``functional`` and ``losses`` packages: which code a table measured."""
    import hashlib
    import subprocess
    from pathlib import Path

    package = Path(__file__).resolve().parents[1]
    sources = sorted((package / "functional").glob("*.py")) + sorted(
        (package / "losses").glob("*.py")
    )
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources))
    text = f"functional/+losses/ sha256 {digest.hexdigest()[:12]}"

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=package, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", *map(str, sources))
    except (OSError, subprocess.SubprocessError):
        return text
    return f"git {commit}{' +modified' if dirty else ''}, {text}"


def markdown_header(device: torch.device, command: str, settings: Settings) -> str:
    """Markdown heading and list describing one run: device, versions, threads, date, command.

    Args:
        device: the device the run uses.
        command: the exact command line.
        settings: the measurement settings of the run.

    Returns:
        Markdown text ending with a blank line.

    Example:
        >>> settings = Settings(repeats=1, warmup=0, skip_memory=True)
        >>> text = markdown_header(
        ...     torch.device("cpu"), "python -m lovasz_monai.benchmark", settings
        ... )
        >>> text.splitlines()[:3]  # doctest: +ELLIPSIS
        ['## Benchmark ... UTC, cpu', '', '- command: `python -m lovasz_monai.benchmark`']

    Raises:
        RuntimeError: when ``device`` is CUDA and no GPU is visible.
    """
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = f"cpu ({cpu_description()})"
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)}; host CPU {cpu_description()})"
    memory = (
        "not measured (--skip-memory)"
        if settings.skip_memory
        else (
            "torch.cuda.max_memory_allocated minus the allocation before the run"
            if device.type == "cuda"
            else "allocator events of torch.profiler(profile_memory=True), running sum in time "
            "order, with numpy/Python heap (tracemalloc) markers in the same trace; maximum"
        )
    )
    return "\n".join(
        [
            f"## Benchmark {now}, {device.type}",
            "",
            f"- command: `{command}`",
            f"- device: {where}",
            f"- torch threads: {torch.get_num_threads()}",
            f"- versions: {_versions()}",
            f"- lovasz_monai source: {_source_version()}",
            f"- timing: forward + backward, median of {settings.repeats} runs after "
            f"{settings.warmup} warm-up run(s); ratios are against rows of the same run",
            f"- peak extra memory: {memory}",
            "- inputs: float32 logits N(0, 1) + 2 on the true class, int64 label map uniform in "
            + (
                "[0, C)"
                if settings.present is None
                else f"{settings.present} classes drawn per volume (the others absent)"
            ),
            "",
        ]
    )


# -- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lovasz_monai.benchmark",
        description="Time forward+backward and peak memory of the Lovász-Softmax loss against "
        "a reference loop, kornia and MONAI Dice losses.",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated sizes: N (an N^3 volume with --batch and --classes) or "
        f"BxCxS1x...xSk (default: {CPU_GRID}; on cuda also 2x14x128x128x128,1x105x128x128x128), "
        f"or many-classes ({MANY_CLASS_GRID} with --present {MANY_CLASS_PRESENT} unless given)",
    )
    parser.add_argument("--classes", type=int, default=4, help="classes of N sizes (default 4)")
    parser.add_argument("--batch", type=int, default=2, help="volumes of N sizes (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: all; kornia only when "
        "installed)",
    )
    parser.add_argument("--markdown", metavar="PATH", help="append the tables as Markdown")
    parser.add_argument(
        "--overwrite", action="store_true", help="with --markdown: replace the file"
    )
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before running")
    parser.add_argument("--bins", type=int, default=1024, help="bins of the histogram method")
    parser.add_argument(
        "--chunk-elements", type=int, default=None, help="chunk_elements of our sort method"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    parser.add_argument(
        "--present",
        type=int,
        default=None,
        help="classes that occur in each volume (default: all); the rest are absent, as in "
        "a patch of a many-class task",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print a torch.profiler table of our sort method at the first size",
    )
    parser.add_argument(
        "--communication",
        action="store_true",
        help="instead of the loss grid: the communication of the distributed (global-batch) "
        "loss per step, computed for the GPU grid and measured with --processes CPU processes",
    )
    parser.add_argument(
        "--processes", type=int, default=2, help="CPU processes of --communication (default 2)"
    )
    return parser


def _methods(text: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [name for name in text.replace(" ", "").split(",") if name]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        parser.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    explicit = text != parser.get_default("methods")
    if "kornia" in names and not _kornia_available():
        if explicit:
            parser.error("--methods kornia: kornia is not installed (pip install kornia)")
        names.remove("kornia")
    return names


def _profile(case: Case, settings: Settings, device: torch.device) -> str:
    from torch.profiler import ProfilerActivity, profile, record_function

    logits, labels = make_inputs(case, device, settings.seed, settings.present)
    loss_fn = METHODS["sort"].make(settings)
    loss_step(loss_fn, logits, labels)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    logits.grad = None
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        with record_function("forward (total)"):
            loss = loss_fn(logits, labels)
        with record_function("backward (total)"):
            loss.backward()
        synchronize(device)
    averages = prof.key_averages()
    time_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    memory_key = "self_cuda_memory_usage" if device.type == "cuda" else "self_cpu_memory_usage"
    return "\n".join(
        [
            f"profile of {METHODS['sort'].label} at {case.name}, by self time:",
            averages.table(sort_by=time_key, row_limit=20),
            "by self memory:",
            averages.table(sort_by=memory_key, row_limit=12),
        ]
    )


def _communication(cases: list[Case], bins: int, processes: int, repeats: int, warmup: int) -> str:
    """The ``--communication`` section: computed for the GPU grid, measured for ``cases``."""
    from lovasz_monai.tools.communication import computed_table, measured_table

    grid = [(c.batch, c.classes, c.voxels) for c in parse_sizes(GPU_GRID)]
    measured = [(c.batch, c.classes, c.spatial) for c in cases]
    return "\n".join(
        [
            f"### Communication of the distributed loss per step ({bins} bins)",
            "",
            "Computed, per process, for the GPU grid (the batch of a size is one process's):",
            "",
            computed_table(grid, bins),
            "",
            f"Measured with {processes} CPU processes (gloo) on this machine, median of "
            f"{repeats} steps after {warmup} (each step's time is the slowest "
            "process's):",
            "",
            measured_table(measured, bins, processes, repeats, warmup),
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line (see the module docstring).

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success; 1 when our sort method disagrees with the reference loop.

    Example:
        >>> import contextlib, io
        >>> out = io.StringIO()
        >>> with contextlib.redirect_stdout(out):  # the header and the table go to stdout
        ...     status = main(
        ...         ["--sizes", "1x2x4x4x4", "--repeats", "1", "--warmup", "0", "--skip-memory",
        ...          "--methods", "sort,reference"]
        ...     )
        >>> status, "ours sort (batch)" in out.getvalue()
        (0, True)

    Raises:
        SystemExit: on invalid arguments (argparse).
        OSError: when the ``--markdown`` file cannot be written.
    """
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.communication and args.processes < 2:
        parser.error(f"--processes must be >= 2 for --communication, got {args.processes}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        sizes = args.sizes or (GPU_GRID if args.device == "cuda" else CPU_GRID)
        if sizes == "many-classes":
            sizes = MANY_CLASS_GRID
            args.present = MANY_CLASS_PRESENT if args.present is None else args.present
        cases = parse_sizes(sizes, args.batch, args.classes)
    except ValueError as error:
        parser.error(f"--sizes: {error}")
    methods = _methods(args.methods, parser)
    device = torch.device(args.device)
    settings = Settings(
        repeats=args.repeats,
        warmup=args.warmup,
        skip_memory=args.skip_memory,
        bins=args.bins,
        chunk_elements=args.chunk_elements,
        seed=args.seed,
        present=args.present,
    )
    if args.present is not None and not all(1 <= args.present <= c.classes for c in cases):
        parser.error(f"--present {args.present}: must be in [1, C] for every size")
    command = shlex.join(["python", "-m", "lovasz_monai.benchmark", *argv])
    header = markdown_header(device, command, settings)
    print(header)
    sections = [header]
    if args.communication:
        sections.append(_communication(cases, args.bins, args.processes, args.repeats, args.warmup))
        print(sections[-1])
        cases = []
    failures = []
    for case in cases:
        results = run_case(case, methods, settings, device, log=lambda m: print(m, file=sys.stderr))
        title = f"B x C x spatial = {case.name} ({case.batch * case.voxels:,} voxels per class)"
        if settings.present is not None:
            title += f", {settings.present} of the {case.classes} classes in each volume"
        print(f"{title}\n{format_table(results)}\n", flush=True)
        sections.append(f"### {title}\n\n{format_table(results, markdown=True)}\n")
        failures += [
            f"{case.name}: {r.label} differs from the reference loop by {r.diff:.2e}"
            for r in results
            if r.name in ("sort", "sort-volume") and not r.diff <= SORT_TOLERANCE
        ]
    if args.profile:
        print(_profile(cases[0], settings, device))
    if failures:
        message = f"VALUE CHECK FAILED (tolerance {SORT_TOLERANCE:g}):\n" + "\n".join(failures)
        print(message, file=sys.stderr)
        items = "\n".join(f"- {failure}" for failure in failures)
        sections.append(f"**VALUE CHECK FAILED** (tolerance {SORT_TOLERANCE:g}):\n\n{items}\n")
    if args.markdown:
        mode = "w" if args.overwrite else "a"
        with open(args.markdown, mode, encoding="utf-8") as out:
            out.write("\n".join(sections) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
