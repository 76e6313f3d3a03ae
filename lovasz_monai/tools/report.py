"""Results of a loss comparison: run records, mean +/- std, the Markdown table and the plot."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import reprlib
import shlex
import statistics
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lovasz_monai.tools.recipes import DEFAULT_OVERRIDES, LOSSES

__all__ = [
    "MERGED_SETTINGS",
    "PER_CLASS_COLUMNS",
    "SMALLEST",
    "ComparisonResult",
    "RunResult",
    "aggregate",
    "format_mean_std",
    "markdown_table",
    "merge_results",
    "plot_comparison",
    "read_results",
    "report",
    "scaled_down_run",
    "write_results",
    "yaml_config",
]


def yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping in ``path`` (an empty file gives ``{}``).

    Raises:
        ValueError: the file holds something other than a mapping.
    """
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a YAML mapping, got {type(config).__name__}")
    return config


def aggregate(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of the values that are not NaN.

    NaN values (e.g. the IoU of a class absent from labels and predictions) are left out. One
    value has standard deviation 0; none gives ``(nan, nan)``. With an infinite value (e.g. the
    HD95 of a missed structure) the mean is that infinity (NaN when both ``inf`` and ``-inf``
    are there) and the standard deviation of several values NaN: it is not defined.

    Args:
        values: numbers, one per seed.

    Returns:
        ``(mean, std)``.

    Example:
        >>> aggregate([0.5, 0.7, 0.9])
        (0.7, 0.2)
        >>> aggregate([0.4, float("nan")])
        (0.4, 0.0)
        >>> aggregate([float("inf"), 2.0])
        (inf, nan)

    Raises:
        ValueError: a value ``float()`` cannot parse (e.g. the string ``"a"``).
        TypeError: a value ``float()`` does not accept (e.g. ``None``).
    """
    kept = [v for v in map(float, values) if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    infinite = {v for v in kept if math.isinf(v)}
    if infinite:  # statistics.fmean/stdev fail on them
        mean = infinite.pop() if len(infinite) == 1 else math.nan
        return mean, 0.0 if len(kept) == 1 else math.nan
    mean = statistics.fmean(kept)
    std = statistics.stdev(kept) if len(kept) > 1 else 0.0
    return round(mean, 12), round(std, 12)


def _mean_std_text(mean: float, std: float, spec: str) -> str:
    """``"mean ± std"`` in the format ``spec``: ``"n/a"`` for an undefined mean, ``"inf ± n/a"``
    for an infinite one with an undefined standard deviation."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{spec}} ± {'n/a' if math.isnan(std) else format(std, spec.lstrip('+'))}"


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± std"`` of :func:`aggregate`: ``"n/a"`` when the mean is undefined (no value
    but NaN, or both ``inf`` and ``-inf``), ``"n/a"`` for the standard deviation when it is
    undefined (an infinite value among several).

    Example:
        >>> format_mean_std([0.5, 0.7, 0.9])
        '0.700 ± 0.200'
        >>> format_mean_std([float("nan")])
        'n/a'
        >>> format_mean_std([float("inf"), 2.0])
        'inf ± n/a'

    Raises:
        ValueError: a negative ``digits``, or a value ``float()`` cannot parse (see
            :func:`aggregate`).
        TypeError: a value ``float()`` does not accept (see :func:`aggregate`).
    """
    if digits < 0:
        raise ValueError(f"digits must be >= 0, got {digits}")
    return _mean_std_text(*aggregate(values), f".{digits}f")


@dataclass
class RunResult:
    """Outcome of one (loss, seed) run; IoU/Dice lists are per class (NaN where undefined).

    Args:
        loss, seed: the run's key of :data:`LOSSES` and seed.
        miou, dice: mIoU and mean Dice of the final model (see
            :func:`~lovasz_monai.tools.runs.evaluate`).
        iou, dice_per_class: per-class values, ``C`` each.
        step_times: wall-clock seconds of every training step.
        val_miou_curve: logged ``val/mIoU`` of every validation epoch.
        logged_val_miou: the last of them (NaN without one).
        wall_time: seconds of the whole run (of a run continued after a stop: its training
            over all parts).
        run_dir: the run's ``default_root_dir``.
        class_names, counted_classes, num_val_volumes: as in :class:`ComparisonResult`.
        case_miou: per-case mIoU averaged over the evaluated volumes (see
            :func:`~lovasz_monai.tools.runs.evaluate`).
        case_iou: per-class IoU averaged over the volumes, ``C``.
        eval_split: the evaluated split, ``"val"`` or ``"test"``.
        case_dice, case_hd95: per-case mean Dice and HD95 (mm; NaN without surface metrics)
            averaged over the volumes; ``case_hd95`` is ``inf`` when a volume has a structure
            in only one of label and prediction.
        class_voxels: voxels of each class in the training labels (``C``; the report's
            "smallest" classes).
        resumed_at_steps: the training batches done before each continuation of the run from
            an epoch checkpoint after it had stopped (empty: trained in one go).
        case_hd95_found: the per-case HD95 over the structures in both label and prediction
            (NaN without surface metrics).
        hd95_one_sided: how many (volume, counted class) pairs have a structure in only one of
            label and prediction (missed, or predicted where the label has none), which
            ``case_hd95_found`` leaves out; a count, stored as a float so that NaN can say
            "not computed".

    Results stored before the last two fields existed get them from a finite ``case_hd95``
    (nothing was one-sided: the same value and 0); after an infinite one they stay NaN.

    Example:
        >>> run = RunResult("ce", 0, 0.5, 0.6, [0.9, 0.5], [0.9, 0.6], [0.5, 0.2, 0.1, 0.3],
        ...                 [0.4, 0.5], 0.5, 3.0, "runs/x")
        >>> run.median_step  # the first step left out
        0.2
    """

    loss: str
    seed: int
    miou: float
    dice: float
    iou: list[float]
    dice_per_class: list[float]
    step_times: list[float]
    val_miou_curve: list[float]
    logged_val_miou: float
    wall_time: float
    run_dir: str
    class_names: list[str] = field(default_factory=list)
    counted_classes: list[int] = field(default_factory=list)
    num_val_volumes: int = 0
    case_miou: float = math.nan
    case_iou: list[float] = field(default_factory=list)
    eval_split: str = "val"
    case_dice: float = math.nan
    case_hd95: float = math.nan
    class_voxels: list[int] = field(default_factory=list)
    resumed_at_steps: list[int] = field(default_factory=list)
    case_hd95_found: float = math.nan
    hd95_one_sided: float = math.nan

    def __post_init__(self) -> None:
        """Fill ``case_hd95_found`` and ``hd95_one_sided`` of older results (see above)."""
        if math.isnan(self.case_hd95_found) and math.isfinite(self.case_hd95):
            # a finite mean has no one-sided structure (results written before these fields)
            self.case_hd95_found, self.hd95_one_sided = self.case_hd95, 0

    @property
    def median_step(self) -> float:
        """Median training-step time in seconds, the first step left out when there are more."""
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return statistics.median(times) if times else math.nan


@dataclass
class ComparisonResult:
    """All runs of a comparison and what is needed to describe it.

    Args:
        config, losses, seeds, max_epochs, overrides: the settings of :func:`compare`.
        class_names: one name per class (``C``).
        counted_classes: indices of the classes the means count.
        num_val_volumes: validation volumes evaluated.
        command: the command line written in the report.
        runs: one :class:`RunResult` per (loss, seed).
        warmup_epochs, ramp_epochs: schedule of ``ce_to_lovasz``.
        torch_threads: ``torch.get_num_threads()`` of the runs.
        total_time: seconds of the whole comparison.
        bench_times: :func:`benchmark_steps` times per loss.
        config_max_epochs: the config's ``trainer.max_epochs`` (``None`` when unset).
        scaled_down: whether the runs were scaled down from the config.
        processes: DDP processes of each run (1: no DDP).
        sources: the commands of the comparisons whose runs :func:`merge_results` put together
            (empty for a single comparison).

    Example:
        >>> run = RunResult("ce", 0, 0.5, 0.6, [0.9, 0.5], [0.9, 0.6], [0.5, 0.2, 0.1, 0.3],
        ...                 [0.4, 0.5], 0.5, 3.0, "runs/x")
        >>> result = ComparisonResult("configs/demo.yaml", ["ce"], [0], 2, [], ["bg", "fg"],
        ...                           [1], 1, "python -m lovasz_monai.experiments", [run])
        >>> [r.seed for r in result.by_loss("ce")]
        [0]
        >>> ComparisonResult.from_json(result.to_json()) == result
        True
    """

    config: str
    losses: list[str]
    seeds: list[int]
    max_epochs: int
    overrides: list[str]
    class_names: list[str]
    counted_classes: list[int]
    num_val_volumes: int
    command: str
    runs: list[RunResult] = field(default_factory=list)
    warmup_epochs: int = 0
    ramp_epochs: int = 0
    torch_threads: int = 1
    total_time: float = 0.0
    bench_times: dict[str, list[float]] = field(default_factory=dict)
    config_max_epochs: int | None = None
    scaled_down: bool = True
    processes: int = 1
    sources: list[str] = field(default_factory=list)

    def by_loss(self, loss: str) -> list[RunResult]:
        """The runs of one loss, in seed order."""
        return sorted((r for r in self.runs if r.loss == loss), key=lambda r: r.seed)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict: every NaN float (in lists and dicts too) as ``None``, which
        JSON writes as null; ``inf`` and ``-inf`` stay floats (JSON files hold them as Python's
        ``Infinity``, which ``json.loads`` reads back); strings are kept as they are."""

        def null_nan(value: Any) -> Any:
            if isinstance(value, np.generic):  # NumPy scalars as Python numbers
                value = value.item()
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {key: null_nan(v) for key, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [null_nan(v) for v in value]
            return value

        return json.loads(json.dumps(null_nan(asdict(self)), default=str))

    @classmethod
    def from_json(cls, data: Any) -> ComparisonResult:
        """Rebuild a result from :meth:`to_json` output (null read back as NaN), checking it.

        Every field must have its annotated type (an integer is a float, a boolean is not a
        number; float fields may be null). Fields added after a file was written may be
        missing (their defaults, see :class:`RunResult`). Each run's loss must be one of
        ``losses`` (a loss that is not a key of :data:`LOSSES`, a recipe renamed or removed
        since, only warns), ``counted_classes`` (of the comparison and of its runs) indices of
        ``class_names``, and the per-class lists of every run (``iou``, ``dice_per_class``,
        ``case_iou`` and ``class_voxels``, the last two may be empty) one value per class.

        Raises:
            ValueError: ``data`` that is not such a result; the message names the field (e.g.
                ``runs[2].miou``), what it should be and what it is.
        """
        result = _from_json(data, cls, "")
        n = len(result.class_names)
        problems = [] if result.losses else [("losses", "at least one loss", "[]")]
        unknown = sorted({loss for loss in result.losses if loss not in LOSSES})
        if unknown:  # a recipe renamed or removed since: its results still count
            warnings.warn(
                f"losses {unknown} are not recipes of this version (LOSSES); they are reported "
                "without their description",
                stacklevel=2,
            )
        problems += [
            (f"runs[{i}].loss", f"one of losses {result.losses}", repr(run.loss))
            for i, run in enumerate(result.runs)
            if run.loss not in result.losses
        ]
        owners = [("", result), *((f"runs[{i}].", run) for i, run in enumerate(result.runs))]
        for prefix, owner in owners:
            wrong = [c for c in owner.counted_classes if not 0 <= c < n]
            if wrong:
                expected = f"indices 0 to {n - 1} of class_names"
                problems.append((f"{prefix}counted_classes", expected, f"{wrong}"))
        for i, run in enumerate(result.runs):
            for key in ("iou", "dice_per_class", "case_iou", "class_voxels"):
                values = getattr(run, key)  # the last two empty in results without them
                if len(values) != n and (values or key in ("iou", "dice_per_class")):
                    expected = f"{n} values (one per class of class_names)"
                    problems.append((f"runs[{i}].{key}", expected, f"{len(values)}"))
        if problems:
            where, expected, got = problems[0]
            raise ValueError(f"{where}: expected {expected}, got {got}")
        return result


def _from_json(value: Any, hint: Any, where: str) -> Any:
    """``value`` read from JSON as type ``hint``: a dataclass from a dict of its fields (those
    with defaults may be missing), ``list[...]``, ``dict[...]``, unions, ``None``, ``str``,
    ``bool``, ``int`` (not a bool) and ``float`` (an int too; null read as NaN).

    Raises:
        ValueError: ``value`` is not of that type; names ``where`` (the field; empty: the
            whole), the type and what ``value`` is.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    at = f"{where}: expected" if where else "expected"
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        hints = typing.get_type_hints(hint)
        required = {
            f.name
            for f in dataclasses.fields(hint)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing, unknown = sorted(required - set(value)), sorted(set(value) - set(hints))
        if missing or unknown:
            raise ValueError(
                f"{at} the fields of {hint.__name__}"
                + (f", missing {missing}" if missing else "")
                + (f", unknown {unknown}" if unknown else "")
            )
        prefix = f"{where}." if where else ""
        return hint(**{k: _from_json(v, hints[k], prefix + k) for k, v in value.items()})
    if origin is list and isinstance(value, list):
        return [_from_json(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {k: _from_json(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            with contextlib.suppress(ValueError):
                return _from_json(value, arg, where)
    elif origin is None:  # float, int, str, bool, None
        if hint is float and value is None:
            return math.nan
        if hint in (int, float):
            number = (int, float) if hint is float else int
            ok = isinstance(value, number) and not isinstance(value, bool)
        else:
            ok = isinstance(value, hint)
        if ok:
            return value
    if dataclasses.is_dataclass(hint):
        expected = f"a JSON object of {hint.__name__} fields"
    else:
        expected = _type_name(hint)
    raise ValueError(f"{at} {expected}, got {type(value).__name__} {reprlib.repr(value)}")


def _type_name(hint: Any) -> str:
    """``hint`` as written in the annotations, e.g. ``list[RunResult]`` or ``int | None``."""
    args = [_type_name(arg) for arg in typing.get_args(hint)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(args)}]"
    return "None" if hint is type(None) else hint.__name__


#: the settings of :class:`ComparisonResult` that every merged comparison must share: they
#: decide what a run trained and how it was scored (``config_max_epochs`` may be unknown,
#: ``None``, in files written before it was recorded)
MERGED_SETTINGS = (
    "config",
    "max_epochs",
    "overrides",
    "class_names",
    "counted_classes",
    "num_val_volumes",
    "warmup_epochs",
    "ramp_epochs",
    "config_max_epochs",
    "scaled_down",
    "processes",
)


def merge_results(results: Sequence[ComparisonResult], command: str) -> ComparisonResult:
    """One comparison from the runs of several, e.g. seeds trained on different machines or in
    sessions whose run folders are gone (the JSON files hold every number of every run).

    The comparisons must share :data:`MERGED_SETTINGS` and the evaluated split. Losses keep
    the order in which they first appear, so the first comparison's first loss is the baseline
    of the paired columns (put the comparison with the baseline first); ``losses`` and
    ``seeds`` are those of the runs (a loss listed without runs is left out). A (loss, seed)
    run found more than once is taken from the last comparison that has it (e.g. a run trained
    again). The interleaved step timing (``bench_times``) is kept when at most one comparison
    has one: timings of different processes are not comparable; ``torch_threads`` is the first
    comparison's.

    Args:
        results: the comparisons, at least one.
        command: the command line that merges them, written in the report; the commands of the
            comparisons are kept in ``sources`` (theirs, for comparisons merged before).

    Returns:
        A new :class:`ComparisonResult`; ``total_time`` is the sum of theirs.

    Raises:
        ValueError: no comparison, a setting or the evaluated split that differs, or more than
            one interleaved timing.

    Warns:
        UserWarning: a run found more than once, or different ``torch_threads``.

    Example:
        >>> run = RunResult("ce", 0, 0.5, 0.6, [0.9, 0.5], [0.9, 0.6], [0.5, 0.2, 0.1, 0.3],
        ...                 [0.4, 0.5], 0.5, 3.0, "runs/x")
        >>> first = ComparisonResult("configs/demo.yaml", ["ce"], [0], 2, [], ["bg", "fg"],
        ...                          [1], 1, "compare --seeds 0", [run])
        >>> second = ComparisonResult.from_json(first.to_json())
        >>> second.command, second.seeds, second.runs[0].seed = "compare --seeds 1", [1], 1
        >>> merged = merge_results([first, second], "report a.json b.json")
        >>> merged.seeds, merged.sources
        ([0, 1], ['compare --seeds 0', 'compare --seeds 1'])
    """
    if not results:
        raise ValueError("merge_results needs at least one comparison")
    first = results[0]
    settings = {name: getattr(first, name) for name in MERGED_SETTINGS}
    known = [r.config_max_epochs for r in results if r.config_max_epochs is not None]
    settings["config_max_epochs"] = known[0] if known else None
    for other in results[1:]:
        for name, mine in settings.items():
            theirs = getattr(other, name)
            if name == "config_max_epochs" and theirs is None:
                continue
            if mine != theirs:
                raise ValueError(
                    f"cannot merge comparisons with different {name}: {mine!r} ({first.command}) "
                    f"against {theirs!r} ({other.command})"
                )
    splits = {run.eval_split for result in results for run in result.runs}
    if len(splits) > 1:
        raise ValueError(f"cannot merge runs evaluated on different splits: {sorted(splits)}")
    timed = [result for result in results if result.bench_times]
    if len(timed) > 1:
        raise ValueError(
            "cannot merge more than one interleaved step timing (bench_times): they come from "
            f"different processes; found one in {[result.command for result in timed]}"
        )
    threads = {result.torch_threads for result in results}
    if len(threads) > 1:
        warnings.warn(
            f"the comparisons ran with different torch threads {sorted(threads)}: their step "
            "times do not compare",
            stacklevel=2,
        )
    runs: dict[tuple[str, int], RunResult] = {}
    for result in results:
        for run in result.runs:
            key = (run.loss, run.seed)
            if key in runs:
                warnings.warn(
                    f"{run.loss} seed {run.seed} is found more than once; the run of "
                    f"{result.command!r} is kept",
                    stacklevel=2,
                )
            runs[key] = run
    losses = list(dict.fromkeys(loss for result in results for loss in result.losses))
    sources = [source for r in results for source in (r.sources or [r.command])]
    return ComparisonResult(
        **settings,
        losses=[loss for loss in losses if any(run_loss == loss for run_loss, _ in runs)],
        seeds=sorted({seed for _, seed in runs}),
        command=command,
        runs=list(runs.values()),
        torch_threads=first.torch_threads,
        total_time=sum(result.total_time for result in results),
        bench_times=dict(timed[0].bench_times) if timed else {},
        sources=list(dict.fromkeys(sources)),
    )


PER_CLASS_COLUMNS = 16
"""Classes up to which :func:`markdown_table` has one IoU column per class."""

SMALLEST = 5
"""Smallest classes :func:`markdown_table` averages in a column of their own."""


def _smallest_classes(result: ComparisonResult) -> list[int]:
    """The :data:`SMALLEST` counted classes with the fewest training voxels (none when the runs
    do not record the counts or there are no more counted classes than that)."""
    voxels = next((r.class_voxels for r in result.runs if r.class_voxels), None)
    counted = list(result.counted_classes)
    if voxels is None or len(counted) <= SMALLEST:
        return []
    return sorted(counted, key=lambda c: voxels[c])[:SMALLEST]


def _source_lines(sources: Sequence[str]) -> list[str]:
    """The report's lines naming the comparisons a merged one was made of."""
    if not sources:
        return []
    return [
        "The runs of these comparisons, merged (their `train step` times come from different "
        "processes, perhaps machines: compare the scores, not those times):",
        "",
        "```bash",
        *sources,
        "```",
        "",
    ]


def markdown_table(result: ComparisonResult) -> str:
    """The Markdown report: header (command, settings, how metrics are computed) and the table.

    Columns: loss; when the runs have them, the per-case mIoU, the mean per-case IoU of the
    :data:`SMALLEST` smallest classes, the per-case Dice and HD95 (over the structures found,
    with the count of one-sided ones when there are any); mIoU, IoU of every class (up
    to :data:`PER_CLASS_COLUMNS` classes), Dice (``mean ± std`` over seeds), the median
    training-step time of the runs, the median of the interleaved timing
    (:func:`benchmark_steps`, ``n/a`` without one) and its ratio to the first loss.

    Args:
        result: a :class:`ComparisonResult` with at least one run per loss.

    Returns:
        The Markdown text.

    Raises:
        ValueError: a loss without runs.

    Example:
        >>> run = RunResult("ce", 0, 0.5, 0.6, [0.9, 0.5], [0.9, 0.6], [0.5, 0.2, 0.1, 0.3],
        ...                 [0.4, 0.5], 0.5, 3.0, "runs/x")
        >>> result = ComparisonResult("configs/demo.yaml", ["ce"], [0], 2, [], ["bg", "fg"],
        ...                           [1], 1, "python -m lovasz_monai.experiments", [run])
        >>> lines = markdown_table(result).splitlines()
        >>> print(lines[0])
        # Loss comparison on `configs/demo.yaml`
        >>> print(next(line for line in lines if line.startswith("| `ce`"))[:60])
        | `ce` | 1 | 0.500 ± 0.000 | 0.900 ± 0.000 | 0.500 ± 0.000 |
    """
    names = result.class_names
    counted = ", ".join(names[i] for i in result.counted_classes)
    if len(result.counted_classes) > PER_CLASS_COLUMNS:  # a list too long to read
        left_out = [n for i, n in enumerate(names) if i not in set(result.counted_classes)]
        counted = f"the {len(result.counted_classes)} counted classes" + (
            f" (all but {', '.join(left_out)})" if left_out else ""
        )
    warm = ""
    if "ce_to_lovasz" in result.losses:
        warm = (
            f" `ce_to_lovasz`: CE for {result.warmup_epochs} epochs, a linear ramp over "
            f"{result.ramp_epochs}, then Lovász-Softmax alone."
        )
    config_epochs = ""
    if result.config_max_epochs is not None:
        config_epochs = f"the config has {result.config_max_epochs}; "
    scaled = ""
    if result.scaled_down:
        scaled = (
            " Scaled down from the config so that the whole comparison runs on a CPU in "
            "minutes; the numbers are not those of a full training."
        )
    lines = [
        f"# Loss comparison on `{result.config}`",
        "",
        "```bash",
        result.command,
        "```",
        "",
        *_source_lines(result.sources),
        f"Settings: {len(result.seeds)} seed(s) ({', '.join(map(str, result.seeds))}), "
        f"{result.max_epochs} epochs per run ({config_epochs}the cosine `T_max` keeps its ratio "
        "to them), "
        f"overrides applied after the config: `{' '.join(result.overrides) or 'none'}`.{scaled}"
        f"{warm}",
        "",
        f"Evaluation: the final model on the {result.num_val_volumes} validation volume(s) "
        "(whole volumes, sliding window), voxels with mask = 1 only (the ignore label left "
        "out). IoU per class from the confusion matrix of the whole validation split; mIoU = "
        f"mean over {counted}; Dice = per-volume Dice 2·TP/(2·TP + FP + FN) averaged "
        f"over volumes and over {counted}. Cells: mean ± sample std over seeds.",
        "",
        "Time: `train step` is the median wall time of a training step during the runs "
        "(forward, loss, backward, optimizer; median over the runs' medians, the first step of "
        "each run left out); `timed step` the median of an interleaved timing of the same step "
        "on one batch, loss after loss in the same process, and `ratio` its ratio to "
        f"`{result.losses[0]}`. CPU, {result.torch_threads} torch threads, a shared machine: "
        "the run times also carry the load of other processes; the interleaved ratio does not "
        "(as much).",
        "",
    ]
    if result.processes > 1:
        lines[-1:-1] = [
            "",
            f"DDP: every run trained on {result.processes} processes (`lovasz-monai fit "
            "--trainer.strategy ddp`), each with its share of the batches; `train step` is "
            "rank 0's, collectives included; the final `last.ckpt` is evaluated in one process.",
        ]
    per_case = any(math.isfinite(r.case_miou) for r in result.runs)
    split = result.runs[0].eval_split if result.runs else "val"
    if split == "test":
        evaluated = f"the {result.num_val_volumes} labelled test volume(s)"
        lines = [
            line.replace(f"the {result.num_val_volumes} validation volume(s)", evaluated).replace(
                "the whole validation split", "all evaluated volumes"
            )
            for line in lines
        ]
    if per_case:
        lines[-1:-1] = [
            "",
            "`per-case mIoU`: each volume's mean IoU over the counted classes present in its "
            "label or prediction, averaged over volumes (the per-case score of medical "
            "challenges); `mIoU` and the IoU columns are dataset-level.",
        ]
    smallest = _smallest_classes(result) if per_case else []
    if smallest:
        lines[-1:-1] = [
            "",
            f"`{len(smallest)} smallest`: the per-case IoU (averaged over volumes) of the "
            f"{len(smallest)} counted classes with the fewest training voxels ("
            + ", ".join(names[c] for c in smallest)
            + "), averaged.",
        ]
    case_dice = per_case and any(math.isfinite(r.case_dice) for r in result.runs)
    case_hd95 = per_case and any(math.isfinite(r.case_hd95_found) for r in result.runs)
    one_sided = per_case and any(r.hd95_one_sided > 0 for r in result.runs)
    if one_sided:
        lines[-1:-1] = [
            "",
            "`HD95 found`: each volume's mean HD95 over the counted structures present in both "
            "its label and its prediction, averaged over volumes; `one-sided`: the (volume, "
            "structure) pairs it leaves out, where a structure is in only one of label and "
            "prediction (missed, or predicted where the label has none: HD95 undefined, "
            f"infinite in the per-case CSV), summed over the {result.num_val_volumes} volumes.",
        ]
    per_class = len(names) <= PER_CLASS_COLUMNS
    base_loss = result.losses[0]
    paired = per_case and len(result.losses) > 1
    if paired:
        lines[-1:-1] = [
            "",
            f"`- {base_loss}`: the difference to `{base_loss}` run by run, on the seeds both "
            "losses have (mean ± sample std of the differences; their number in brackets). "
            "`seeds`: the runs of each loss.",
        ]
    header = ["loss", "seeds", *(["per-case mIoU"] if per_case else [])]
    header += [f"- {base_loss}"] if paired else []
    header += [f"{len(smallest)} smallest"] if smallest else []
    header += [f"- {base_loss}"] if paired and smallest else []
    header += ["per-case Dice"] if case_dice else []
    if one_sided:
        header += ["HD95 found (mm)", "one-sided"]
    elif case_hd95:
        header += ["HD95 (mm)"]
    header += ["mIoU", *([f"IoU {n}" for n in names] if per_class else []), "Dice"]
    header += ["train step (ms)", "timed step (ms)", "ratio"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    bench = {k: statistics.median(v) for k, v in result.bench_times.items() if v}
    base = bench.get(result.losses[0])

    def smallest_iou(run: RunResult) -> float:
        return float(np.nanmean([run.case_iou[c] for c in smallest]))

    def case_miou(run: RunResult) -> float:
        return run.case_miou

    def difference(runs: list[RunResult], score: Callable[[RunResult], float]) -> str:
        base = {r.seed: score(r) for r in result.by_loss(base_loss)}
        values = [score(r) - base[r.seed] for r in runs if r.seed in base]
        text = _mean_std_text(*aggregate(values), "+.3f")
        return text if text == "n/a" else f"{text} ({len(values)})"

    for loss in result.losses:
        runs = result.by_loss(loss)
        if not runs:
            raise ValueError(f"no runs for loss {loss!r}")
        step = statistics.median([r.median_step for r in runs])
        cells = [f"`{loss}`", str(len(runs))]
        if per_case:
            cells.append(format_mean_std([r.case_miou for r in runs]))
        if paired:
            cells.append(difference(runs, case_miou))
        if smallest:
            cells.append(format_mean_std([smallest_iou(r) for r in runs]))
        if paired and smallest:
            cells.append(difference(runs, smallest_iou))
        if case_dice:
            cells.append(format_mean_std([r.case_dice for r in runs]))
        if case_hd95 or one_sided:
            cells.append(format_mean_std([r.case_hd95_found for r in runs]))
        if one_sided:
            cells.append(format_mean_std([r.hd95_one_sided for r in runs], digits=1))
        cells.append(format_mean_std([r.miou for r in runs]))
        if per_class:
            cells += [format_mean_std([r.iou[c] for r in runs]) for c in range(len(names))]
        cells += [format_mean_std([r.dice for r in runs]), f"{1000 * step:.0f}"]
        timed = bench.get(loss)
        cells.append("n/a" if timed is None else f"{1000 * timed:.0f}")
        cells.append("n/a" if timed is None or not base else f"{timed / base:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Losses:", ""]
    lines += [
        f"- `{loss}`: "
        + (LOSSES[loss].description if loss in LOSSES else "(not a recipe of this version)")
        for loss in result.losses
    ]
    continued = [r for r in result.runs if r.resumed_at_steps]
    if continued:
        lines += [
            "",
            "Runs continued from an epoch checkpoint after they had stopped (their "
            "random draws after that step differ from an uninterrupted run's):",
            "",
        ]
        lines += [
            f"- `{r.loss}` seed {r.seed}: at step(s) {', '.join(map(str, r.resumed_at_steps))}"
            for r in continued
        ]
    run_minutes = sum(r.wall_time for r in result.runs) / 60
    lines += [
        "",
        f"Total time: {result.total_time / 60:.1f} min in the comparison processes; the runs' "
        f"own wall times, each over all its parts when it was continued, add up to "
        f"{run_minutes:.1f} min. Per-run numbers: the JSON file next to this one.",
        "",
    ]
    return "\n".join(lines)


def plot_comparison(result: ComparisonResult, path: str | os.PathLike) -> Path:
    """Bar chart of mIoU and Dice (mean ± std over seeds) per loss, and the validation mIoU
    curves (mean over seeds, ± std band) per epoch.

    Args:
        result: the comparison.
        path: PNG file to write.

    Returns:
        ``Path(path)``.

    Example:
        >>> import pathlib, tempfile
        >>> run = RunResult("ce", 0, 0.5, 0.6, [0.9, 0.5], [0.9, 0.6], [0.5, 0.2, 0.1, 0.3],
        ...                 [0.4, 0.5], 0.5, 3.0, "runs/x")
        >>> result = ComparisonResult("configs/demo.yaml", ["ce"], [0], 2, [], ["bg", "fg"],
        ...                           [1], 1, "python -m lovasz_monai.experiments", [run])
        >>> png = plot_comparison(result, pathlib.Path(tempfile.mkdtemp()) / "cmp.png")
        >>> png.name, png.stat().st_size > 0
        ('cmp.png', True)

    Raises:
        ImportError: matplotlib is not installed (it is a ``test`` extra).
        OSError: the folder of ``path`` cannot be created or the file cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    losses = result.losses
    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(losses))
    width = 0.38
    for offset, key, label in ((-width / 2, "miou", "mIoU"), (width / 2, "dice", "Dice")):
        stats = [aggregate([getattr(r, key) for r in result.by_loss(loss)]) for loss in losses]
        means = [m for m, _ in stats]
        stds = [s for _, s in stats]
        bars = ax_bar.bar(x + offset, means, width, yerr=stds, capsize=3, label=label)
        ax_bar.bar_label(bars, labels=[f"{m:.3f}" for m in means], fontsize=7, padding=2)
    ax_bar.set_xticks(x, losses, rotation=20)
    ax_bar.set_ylim(0, 1.18)
    ax_bar.set_yticks(np.linspace(0, 1, 6))
    split = result.runs[0].eval_split if result.runs else "val"
    ax_bar.set_ylabel(f"score of the final model ({'test' if split == 'test' else 'validation'})")
    seeds = sorted({len(result.by_loss(loss)) for loss in losses})
    over = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    ax_bar.set_title(f"mean ± std over {over} seed(s) per loss")
    ax_bar.legend(loc="upper center", ncol=2, fontsize=8)
    if not any(r.val_miou_curve for r in result.runs):
        _plot_runs(ax_curve, result)
    for loss in losses:
        curves = [r.val_miou_curve for r in result.by_loss(loss) if r.val_miou_curve]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        arr = np.array([c[:length] for c in curves], dtype=float)
        epochs = np.arange(1, length + 1)
        mean = np.nanmean(arr, axis=0)
        (line,) = ax_curve.plot(epochs, mean, marker="o", markersize=3, label=loss)
        if arr.shape[0] > 1:
            std = np.nanstd(arr, axis=0, ddof=1)
            ax_curve.fill_between(
                epochs, mean - std, mean + std, alpha=0.15, color=line.get_color()
            )
    if any(r.val_miou_curve for r in result.runs):
        ax_curve.xaxis.get_major_locator().set_params(integer=True)
        ax_curve.set_xlabel("epoch")
        ax_curve.set_ylabel("val/mIoU")
        ax_curve.set_ylim(0, 1.0)
        ax_curve.set_title("validation mIoU during training")
        ax_curve.legend(fontsize=8)
    fig.suptitle(f"Loss comparison: {result.config}, {result.max_epochs} epochs")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_runs(ax: Any, result: ComparisonResult) -> None:
    """Without validation curves (no validation split): the score of every run, one marker
    per seed, so that the seed-to-seed spread and the paired differences can be seen."""
    per_case = any(math.isfinite(r.case_miou) for r in result.runs)
    markers = "osD^v<>ph*"
    for k, seed in enumerate(sorted({r.seed for r in result.runs})):
        points = [
            (i, r.case_miou if per_case else r.miou)
            for i, loss in enumerate(result.losses)
            for r in result.by_loss(loss)
            if r.seed == seed
        ]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, markers[k % len(markers)], label=f"seed {seed}", alpha=0.8)
    ax.set_xticks(np.arange(len(result.losses)), result.losses, rotation=20)
    ax.set_xlim(-0.5, len(result.losses) - 0.5)
    ax.set_ylabel("per-case mIoU" if per_case else "mIoU")
    ax.set_title("every run (no validation curves)")
    ax.legend(fontsize=8)


def scaled_down_run(max_epochs: int, config_epochs: int | None, overrides: Sequence[str]) -> bool:
    """Whether a comparison runs fewer epochs than the config or with the default overrides."""
    n = len(DEFAULT_OVERRIDES)
    with_defaults = any(
        tuple(overrides[i : i + n]) == DEFAULT_OVERRIDES for i in range(len(overrides))
    )
    return with_defaults or (config_epochs is not None and max_epochs < config_epochs)


def write_results(result: ComparisonResult, output: str | os.PathLike) -> list[Path]:
    """Write ``<output>.md`` (:func:`markdown_table`), ``<output>.json`` and ``<output>.png``.

    Args:
        result: the comparison (at least one run per loss).
        output: path without suffix; its folder is created.

    Returns:
        The three paths.

    Example:
        >>> import pathlib, tempfile
        >>> run = RunResult("ce", 0, 0.5, 0.6, [0.9, 0.5], [0.9, 0.6], [0.5, 0.2, 0.1, 0.3],
        ...                 [0.4, 0.5], 0.5, 3.0, "runs/x")
        >>> result = ComparisonResult("configs/demo.yaml", ["ce"], [0], 2, [], ["bg", "fg"],
        ...                           [1], 1, "python -m lovasz_monai.experiments", [run])
        >>> paths = write_results(result, pathlib.Path(tempfile.mkdtemp()) / "cmp")
        >>> [p.name for p in paths]
        ['cmp.md', 'cmp.json', 'cmp.png']

    Raises:
        ValueError: a loss without runs (see :func:`markdown_table`).
        ImportError: matplotlib is not installed (see :func:`plot_comparison`).
        OSError: the files cannot be written.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    md, js, png = (output.with_name(output.name + ext) for ext in (".md", ".json", ".png"))
    md.write_text(markdown_table(result), encoding="utf-8")
    js.write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
    plot_comparison(result, png)
    return [md, js, png]


def read_results(path: str | os.PathLike) -> ComparisonResult:
    """A comparison from its ``<output>.json``; files written before ``config_max_epochs`` and
    ``scaled_down`` existed get them from the config (when its path exists from here).

    Args:
        path: the ``<output>.json`` written by :func:`compare` or :func:`report`.

    Returns:
        The :class:`ComparisonResult`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not JSON, or not a comparison (see
            :meth:`ComparisonResult.from_json`); the message starts with ``path``.

    Example:
        >>> import pathlib, tempfile
        >>> run = RunResult("ce", 0, 0.5, 0.6, [0.9, 0.5], [0.9, 0.6], [0.5, 0.2, 0.1, 0.3],
        ...                 [0.4, 0.5], 0.5, 3.0, "runs/x")
        >>> result = ComparisonResult("configs/demo.yaml", ["ce"], [0], 2, [], ["bg", "fg"],
        ...                           [1], 1, "python -m lovasz_monai.experiments", [run])
        >>> path = write_results(result, pathlib.Path(tempfile.mkdtemp()) / "cmp")[1]
        >>> read_results(path) == result
        True
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        result = ComparisonResult.from_json(data)
    except ValueError as error:  # json.JSONDecodeError too
        raise ValueError(f"{path}: {error}") from error
    if "config_max_epochs" not in data and Path(result.config).is_file():
        trainer_config = yaml_config(result.config).get("trainer") or {}
        result.config_max_epochs = trainer_config.get("max_epochs")
    if "scaled_down" not in data:
        result.scaled_down = scaled_down_run(
            result.max_epochs, result.config_max_epochs, result.overrides
        )
    return result


def report(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    command: str | None = None,
) -> ComparisonResult:
    """Rewrite the table and the plot of a comparison from its JSON file (no training), or write
    one comparison from the JSON files of several (:func:`merge_results`).

    Args:
        paths: one ``<output>.json`` written by :func:`compare`, or several.
        output: path without suffix of the files to write. One JSON file: default that path
            without ``.json``; ``<output>.md`` and ``.png`` are written (the JSON and its
            command stay as they are). Several: required, not one of the inputs;
            ``<output>.json`` is written too.
        command: the merging command line written in the report (several files; default: a
            ``report`` command of these paths).

    Returns:
        The :class:`ComparisonResult` read or merged.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: no file, a file that is not a comparison (see :func:`read_results`),
            several files without ``output`` or with an ``output`` that would overwrite one of
            them, or comparisons that cannot be merged (see :func:`merge_results`).

    Example:
        >>> import pathlib, tempfile
        >>> run = RunResult("ce", 0, 0.5, 0.6, [0.9, 0.5], [0.9, 0.6], [0.5, 0.2, 0.1, 0.3],
        ...                 [0.4, 0.5], 0.5, 3.0, "runs/x")
        >>> result = ComparisonResult("configs/demo.yaml", ["ce"], [0], 2, [], ["bg", "fg"],
        ...                           [1], 1, "python -m lovasz_monai.experiments", [run])
        >>> stem = pathlib.Path(tempfile.mkdtemp()) / "cmp"
        >>> _ = write_results(result, stem)
        >>> report(stem.with_suffix(".json")).runs[0].miou
        0.5
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if len(paths) > 1:
        if output is None:
            raise ValueError(f"merging {len(paths)} comparisons needs an output path")
        merged_json = Path(output).with_name(Path(output).name + ".json").resolve()
        if any(Path(path).resolve() == merged_json for path in paths):
            raise ValueError(f"the merged {merged_json} would overwrite one of the inputs")
        if command is None:
            command = "python -m lovasz_monai.experiments report " + shlex.join(
                [*map(str, paths), "--output", str(output)]
            )
        merged = merge_results([read_results(path) for path in paths], command)
        write_results(merged, output)
        return merged
    if not paths:
        raise ValueError("report needs at least one JSON file")
    result = read_results(paths[0])
    stem = Path(output) if output is not None else Path(paths[0]).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".md").write_text(markdown_table(result), encoding="utf-8")
    plot_comparison(result, stem.with_name(stem.name + ".png"))
    return result
