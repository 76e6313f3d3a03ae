"""Loss comparison: train one network from a LightningCLI config with several losses and seeds.

``compare`` trains the model, data and trainer of a :class:`~lovasz_monai.cli.LovaszCLI` YAML
config (e.g. ``configs/demo.yaml``) once per (loss, seed), evaluates the final model on the
validation split, and writes a Markdown table, a JSON file with every number, and a PNG plot::

    python -m lovasz_monai.experiments compare --config configs/demo.yaml
    python -m lovasz_monai.experiments compare --config configs/demo.yaml --seeds 0 1 2 \\
        --losses ce dicece lovasz lovasz_ce ce_to_lovasz --max-epochs 20 \\
        --output experiments/compare_demo
    # any further arguments are LovaszCLI overrides, applied after the config:
    python -m lovasz_monai.experiments compare --config configs/demo.yaml --losses ce lovasz \\
        --seeds 0 --max-epochs 2 --data.num_samples 1 --trainer.precision 32
    # rewrite the table and the plot from the JSON file (no training):
    python -m lovasz_monai.experiments report experiments/compare_demo.json
    # one table from the runs of several comparisons (e.g. seeds trained on other machines):
    python -m lovasz_monai.experiments report first.json second.json --output merged

Losses (the keys of :data:`LOSSES`), all ignore-aware (the datamodule's ``mask``):

* ``ce``: ``torch.nn.CrossEntropyLoss()``; the module sets masked voxels to its
  ``ignore_index``, so this is the cross-entropy averaged over the valid voxels;
* ``dicece``: :class:`~lovasz_monai.losses.MaskedDiceCELoss`, MONAI's
  ``DiceCELoss(to_onehot_y=True, softmax=True)`` with the mask applied to both terms (equal to
  it when nothing is masked);
* ``dicece_monai``: the plain ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``, which
  takes no mask: it sees ignored voxels as background (not in the default list);
* ``lovasz``: ``LovaszSoftmaxLoss(to_onehot_y=True)``;
* ``lovasz_ce``: ``LovaszCELoss(to_onehot_y=True)`` (Lovász + cross-entropy, weights 1 and 1);
* ``ce_to_lovasz``: the module's schedule: ``warmup_loss=CrossEntropyLoss()`` for
  ``warmup_epochs`` (default half of the epochs), a linear ramp over ``ramp_epochs`` (default a
  sixth), then ``LovaszSoftmaxLoss(to_onehot_y=True)`` alone.

Every run uses the same config, network and data split; the seed (``pl.seed_everything``, also
passed as ``--seed_everything``) sets the network initialisation and the batch order. The data
augmentation stream is fixed by ``data.seed``, so two losses with the same seed see the same
batches. Runs are written to ``--runs-dir`` (default ``runs/compare/<config name>``: checkpoints,
CSV/TensorBoard logs), the results to ``<output>.md``, ``<output>.json`` and ``<output>.png``.

By default the comparison is scaled down so that 5 losses x 3 seeds run in minutes on a CPU:
``--max-epochs`` (default :data:`DEFAULT_MAX_EPOCHS`; the cosine schedule's ``T_max`` keeps its
ratio to the config's ``max_epochs``) and :data:`DEFAULT_OVERRIDES`; ``--no-scale-down`` keeps
the config's data and trainer settings (``--max-epochs`` still applies).
The table header records the exact command.

Metrics, from the same predictions of the final model (whole validation volumes, sliding window,
the trainer's precision), on voxels with ``mask == 1`` only: per-class IoU from the confusion
matrix of the whole validation split (as the module's ``val/IoU``), ``mIoU`` its mean over the
classes the module counts (foreground unless ``metric_include_background``), and ``Dice`` the
mean over volumes and those classes of the per-volume Dice ``2 |P & L| / (|P| + |L|)`` (a class
absent from both prediction and label of a volume is left out; predicted but absent gives 0).
With ``--eval-split test`` the labelled ``test`` cases of ``dataset.json`` are evaluated instead,
and every table also shows the per-case mIoU (each volume's mean IoU over the counted classes in
its label or prediction, averaged over volumes: the score medical challenges report).
Each is reported as mean +- sample standard deviation over seeds, with
the median wall time of a training step (forward, loss, backward, optimizer; the first step of
every run left out).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lovasz_monai.tools.recipes import (
    DEFAULT_LOSSES,
    DEFAULT_MAX_EPOCHS,
    DEFAULT_OVERRIDES,
    LOSSES,
    schedule_epochs,
)
from lovasz_monai.tools.report import (
    ComparisonResult,
    report,
    scaled_down_run,
    write_results,
    yaml_config,
)
from lovasz_monai.tools.runs import benchmark_steps, run_one, training_finished

__all__ = ["compare", "main", "run_order"]


def _print_flush(message: str) -> None:
    print(message, flush=True)


def run_order(losses: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, str]]:
    """``(seed, loss)`` pairs, seed by seed, the loss order rotated by one for each seed, so that
    no loss always runs first (a cold process) or last.

    Example:
        >>> run_order(["a", "b"], [0, 1])
        [(0, 'a'), (0, 'b'), (1, 'b'), (1, 'a')]

    Raises:
        TypeError: ``losses`` cannot be sliced (e.g. a set) while ``seeds`` is not empty.
    """
    order = []
    for k, seed in enumerate(seeds):
        shift = k % len(losses) if losses else 0
        order += [(seed, loss) for loss in [*losses[shift:], *losses[:shift]]]
    return order


def _repeated(**values: Sequence[object]) -> str:
    """The values given more than once, per keyword (``""`` when none is), e.g.
    ``_repeated(seeds=[0, 0])`` is ``"repeated seeds [0]: every (loss, seed) run is trained
    once"``."""
    found = {
        name: [v for v, n in Counter(given).items() if n > 1] for name, given in values.items()
    }
    return "; ".join(
        f"repeated {name} {twice}: every (loss, seed) run is trained once"
        for name, twice in found.items()
        if twice
    )


def compare(
    config: str | os.PathLike,
    losses: Sequence[str] = DEFAULT_LOSSES,
    seeds: Sequence[int] = (0, 1, 2),
    max_epochs: int = DEFAULT_MAX_EPOCHS,
    output: str | os.PathLike | None = None,
    overrides: Sequence[str] = DEFAULT_OVERRIDES,
    runs_dir: str | os.PathLike | None = None,
    warmup_epochs: int | None = None,
    ramp_epochs: int | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = _print_flush,
    bench_repeats: int = 50,
    processes: int = 1,
    resume: bool = False,
    eval_split: str = "val",
    finished_only: bool = False,
) -> ComparisonResult:
    """Train every (loss, seed) pair and write ``<output>.md``, ``.json`` and ``.png``.

    Args:
        config: LovaszCLI YAML (multi-class data with a validation split).
        losses: keys of :data:`LOSSES`; the first is the baseline of the step-time ratio.
        seeds: ``seed_everything`` values.
        max_epochs: epochs per run.
        output: path without suffix of the results (e.g. ``experiments/compare_demo``); ``None``
            writes nothing.
        overrides: LovaszCLI arguments applied after the config (e.g. ``--data.num_samples 2``).
        runs_dir: folder of the runs (``<loss>/seed<N>`` below it); default
            ``runs/compare/<config stem>``.
        warmup_epochs, ramp_epochs: schedule of ``ce_to_lovasz`` (see :func:`schedule_epochs`).
        command: the command line written in the report (default: this call's ``sys.argv``).
        log: progress printer (``None``: silent).
        bench_repeats: rounds of :func:`benchmark_steps` after the runs (0: no benchmark).
        processes: DDP processes per run (see :func:`run_one`).
        resume: reuse the runs whose training finished in ``runs_dir`` and continue those
            stopped part-way from their last finished epoch (see :func:`run_one`), e.g. after
            an interrupted comparison.
        eval_split: evaluate on ``"val"`` (the validation split) or ``"test"`` (the labelled
            test cases; see :func:`run_one`).
        finished_only: train nothing: report the (loss, seed) runs whose training finished in
            ``runs_dir`` (as ``resume`` does) and leave the others out, e.g. to write the table
            of a comparison that is still running. A loss without any finished run is left out.

    Returns:
        The :class:`ComparisonResult`.

    Raises:
        KeyError: an unknown loss.
        ValueError: no losses or seeds, a loss or seed given twice (its runs would be
            counted twice), ``max_epochs < 1``, a bad config (see :func:`run_one`), or
            ``finished_only`` without any finished run.

    Example:
        >>> result = compare(
        ...     "configs/demo.yaml", losses=["ce", "lovasz"], seeds=[0], max_epochs=2,
        ...     output="experiments/compare_small", bench_repeats=0,
        ... )  # doctest: +SKIP
        >>> [(r.loss, r.seed) for r in result.runs]  # doctest: +SKIP
        [('ce', 0), ('lovasz', 0)]
    """
    losses, seeds = list(losses), [int(s) for s in seeds]
    unknown = [loss for loss in losses if loss not in LOSSES]
    if unknown:
        raise KeyError(f"unknown loss(es) {unknown}; choose from {sorted(LOSSES)}")
    if not losses or not seeds:
        raise ValueError("compare needs at least one loss and one seed")
    repeated = _repeated(losses=losses, seeds=seeds)
    if repeated:
        raise ValueError(repeated)
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    config = str(config)
    runs_root = Path(runs_dir) if runs_dir is not None else Path("runs/compare") / Path(config).stem
    warmup, ramp = schedule_epochs(max_epochs, warmup_epochs, ramp_epochs)
    trainer_config = yaml_config(config).get("trainer") or {}
    config_epochs = trainer_config.get("max_epochs") if isinstance(trainer_config, dict) else None
    if command is None:
        command = "python -m lovasz_monai.experiments " + shlex.join(sys.argv[1:])
    result: ComparisonResult | None = None
    start = time.perf_counter()
    order = run_order(losses, seeds)
    if finished_only:
        order = [(s, loss) for s, loss in order if training_finished(runs_root / loss / f"seed{s}")]
        if not order:
            raise ValueError(f"finished_only: no finished run of {losses} x {seeds} in {runs_root}")
        losses = [loss for loss in losses if any(loss == done for _, done in order)]
    total = len(order)
    for i, (seed, loss) in enumerate(order, 1):
        run = run_one(
            config,
            loss,
            seed,
            max_epochs,
            runs_root / loss / f"seed{seed}",
            overrides,
            warmup_epochs,
            ramp_epochs,
            processes=processes,
            resume=resume or finished_only,
            eval_split=eval_split,
        )
        if result is None:
            result = ComparisonResult(
                config=config,
                losses=losses,
                seeds=seeds,
                max_epochs=int(max_epochs),
                overrides=list(overrides),
                class_names=run.class_names,
                counted_classes=run.counted_classes,
                num_val_volumes=run.num_val_volumes,
                command=command,
                warmup_epochs=warmup,
                ramp_epochs=ramp,
                torch_threads=torch.get_num_threads(),
                config_max_epochs=config_epochs,
                scaled_down=scaled_down_run(max_epochs, config_epochs, overrides),
                processes=int(processes),
            )
        result.runs.append(run)
        if log is not None:
            log(
                f"[{i}/{total}] {loss} seed {seed}: mIoU {run.miou:.3f} (per case "
                f"{run.case_miou:.3f}, logged "
                f"{run.logged_val_miou:.3f}), Dice {run.dice:.3f}, step "
                f"{1000 * run.median_step:.0f} ms, run {run.wall_time:.0f} s"
            )
    assert result is not None
    if bench_repeats > 0:
        result.bench_times = benchmark_steps(
            config, losses, runs_root / "_bench", overrides, repeats=bench_repeats
        )
        shutil.rmtree(runs_root / "_bench", ignore_errors=True)
        if log is not None:
            medians = {k: round(1000 * statistics.median(v)) for k, v in result.bench_times.items()}
            log(f"interleaved step timing (ms, median of {bench_repeats}): {medians}")
    result.total_time = time.perf_counter() - start
    if output is not None:
        write_results(result, output)
        if log is not None:
            log(f"wrote {output}.md, {output}.json, {output}.png")
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lovasz_monai.experiments",
        description="Experiments with the Lovász losses.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser(
        "compare",
        help="train one config with several losses and seeds; write a table and a plot",
        description=(
            "Train the config's model with several losses and seeds and write <output>.md/.json/"
            ".png. Unknown arguments are LovaszCLI overrides (e.g. --data.num_samples 1)."
        ),
    )
    cmp.add_argument("--config", required=True, help="LovaszCLI YAML config")
    cmp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cmp.add_argument(
        "--losses", nargs="+", default=list(DEFAULT_LOSSES), choices=sorted(LOSSES), metavar="LOSS"
    )
    cmp.add_argument("--max-epochs", type=int, default=DEFAULT_MAX_EPOCHS)
    cmp.add_argument("--warmup-epochs", type=int, default=None, help="ce_to_lovasz warm-up")
    cmp.add_argument("--ramp-epochs", type=int, default=None, help="ce_to_lovasz ramp")
    cmp.add_argument(
        "--output",
        default=None,
        help="results path without suffix (default experiments/compare_<config stem>)",
    )
    cmp.add_argument("--runs-dir", default=None, help="default runs/compare/<config stem>")
    cmp.add_argument(
        "--no-scale-down",
        action="store_true",
        help=f"do not apply the default overrides {' '.join(DEFAULT_OVERRIDES)}",
    )
    cmp.add_argument(
        "--bench-repeats",
        type=int,
        default=50,
        help="rounds of the interleaved step timing after the runs (0: skip it)",
    )
    cmp.add_argument(
        "--processes",
        type=int,
        default=1,
        help="train each run with DDP on this many processes (a `lovasz-monai fit` subprocess)",
    )
    cmp.add_argument(
        "--resume",
        action="store_true",
        help="evaluate the runs whose training finished in --runs-dir instead of training them "
        "again, and continue those stopped part-way from their last finished epoch (after an "
        "interruption)",
    )
    cmp.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: report the runs whose training finished in --runs-dir (a table of "
        "a comparison still running)",
    )
    cmp.add_argument(
        "--eval-split",
        choices=("val", "test"),
        default="val",
        help="evaluate on the validation split or on the labelled test cases",
    )
    cmp.add_argument("--verbose", action="store_true", help="keep Lightning's messages")
    rep = sub.add_parser(
        "report",
        help="rewrite the Markdown table and the plot of a comparison from its JSON file, or "
        "merge the runs of several comparisons into one",
    )
    rep.add_argument(
        "json",
        nargs="+",
        help="the <output>.json of one comparison, or of several to merge (before --output)",
    )
    rep.add_argument(
        "--output",
        default=None,
        help="path without suffix (default: the JSON's; required with several JSON files)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> ComparisonResult:
    """``python -m lovasz_monai.experiments compare|report ...`` (see the module docstring).

    Args:
        argv: arguments instead of ``sys.argv[1:]``.

    Returns:
        The :class:`ComparisonResult` of ``compare`` (or the one ``report`` read).

    Raises:
        SystemExit: on ``--help`` and argument errors.

    Example:
        >>> import pathlib, tempfile
        >>> from lovasz_monai.tools.report import ComparisonResult, RunResult, write_results
        >>> run = RunResult("ce", 0, 0.5, 0.6, [0.9, 0.5], [0.9, 0.6], [0.5, 0.2, 0.1, 0.3],
        ...                 [0.4, 0.5], 0.5, 3.0, "runs/x")
        >>> result = ComparisonResult("configs/demo.yaml", ["ce"], [0], 2, [], ["bg", "fg"],
        ...                           [1], 1, "python -m lovasz_monai.experiments", [run])
        >>> stem = pathlib.Path(tempfile.mkdtemp()) / "cmp"
        >>> _ = write_results(result, stem)
        >>> main(["report", str(stem) + ".json"]).losses
        ['ce']
        >>> main(["compare", "--config", "configs/demo.yaml", "--seeds", "0"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "report":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if len(args.json) > 1 and args.output is None:
            parser.error("merging several JSON files needs --output")
        command = "python -m lovasz_monai.experiments " + shlex.join(argv)
        return report(args.json, args.output, command=command)
    repeated = _repeated(**{"--losses": args.losses, "--seeds": args.seeds})
    if repeated:
        parser.error(repeated)
    if not args.verbose:
        for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    overrides = ([] if args.no_scale_down else list(DEFAULT_OVERRIDES)) + extra
    output = args.output or f"experiments/compare_{Path(args.config).stem}"
    return compare(
        args.config,
        losses=args.losses,
        seeds=args.seeds,
        max_epochs=args.max_epochs,
        output=output,
        overrides=overrides,
        runs_dir=args.runs_dir,
        warmup_epochs=args.warmup_epochs,
        ramp_epochs=args.ramp_epochs,
        command="python -m lovasz_monai.experiments " + shlex.join(argv),
        bench_repeats=args.bench_repeats,
        processes=args.processes,
        resume=args.resume,
        eval_split=args.eval_split,
        finished_only=args.finished_only,
    )


if __name__ == "__main__":
    main()
