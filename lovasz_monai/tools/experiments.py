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
``--max-epochs`` (default :data:`DEFAULT_MAX_EPOCHS`, the cosine schedule's ``T_max`` follows it)
and :data:`DEFAULT_OVERRIDES`; ``--no-scale-down`` keeps the config's data and trainer settings
(``--max-epochs`` still applies). The table header records the exact command.

Metrics, from the same predictions of the final model (whole validation volumes, sliding window,
the trainer's precision), on voxels with ``mask == 1`` only: per-class IoU from the confusion
matrix of the whole validation split (as the module's ``val/IoU``), ``mIoU`` its mean over the
classes the module counts (foreground unless ``metric_include_background``), and ``Dice`` the
mean over volumes and those classes of the per-volume Dice ``2 |P & L| / (|P| + |L|)`` (a class
absent from both prediction and label of a volume is left out; predicted but absent gives 0).
Each is reported as mean +- sample standard deviation over seeds, with
the median wall time of a training step (forward, loss, backward, optimizer; the first step of
every run left out).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback, ProgressBar
from torch import Tensor

__all__ = [
    "DEFAULT_LOSSES",
    "DEFAULT_MAX_EPOCHS",
    "DEFAULT_OVERRIDES",
    "LOSSES",
    "ComparisonResult",
    "RunResult",
    "TrainingRecorder",
    "aggregate",
    "benchmark_steps",
    "compare",
    "evaluate",
    "format_mean_std",
    "main",
    "markdown_table",
    "plot_comparison",
    "report",
    "run_one",
    "run_order",
    "schedule_epochs",
    "write_results",
]

DEFAULT_LOSSES = ("ce", "dicece", "lovasz", "lovasz_ce", "ce_to_lovasz")
"""Losses compared when ``--losses`` is not given."""

DEFAULT_MAX_EPOCHS = 20
"""Epochs per run when ``--max-epochs`` is not given."""

DEFAULT_OVERRIDES = ("--data.num_samples", "2")
"""LovaszCLI overrides applied before the user's (unless ``--no-scale-down``): 2 patches per
volume instead of the demo's 4, which halves the cost of a step."""

_CE = {"class_path": "torch.nn.CrossEntropyLoss"}
_LOVASZ = {"class_path": "lovasz_monai.LovaszSoftmaxLoss", "init_args": {"to_onehot_y": True}}
_NO_SCHEDULE = {"warmup_loss": None, "warmup_epochs": 0, "ramp_epochs": 0}


def _lovasz(name: str, **init_args: Any) -> dict[str, Any]:
    """``class_path`` dict of ``lovasz_monai.<name>(to_onehot_y=True, **init_args)``."""
    return {"class_path": f"lovasz_monai.{name}", "init_args": {"to_onehot_y": True, **init_args}}


@dataclass(frozen=True)
class LossSpec:
    """One entry of :data:`LOSSES`: a description and the model arguments it sets.

    ``model`` maps ``(max_epochs, warmup_epochs, ramp_epochs)`` to ``model.*`` values given to
    the LovaszCLI (``class_path`` dicts for modules).
    """

    description: str
    model: Callable[[int, int, int], dict[str, Any]]


LOSSES: dict[str, LossSpec] = {
    "ce": LossSpec(
        "torch.nn.CrossEntropyLoss (masked voxels -> ignore_index)",
        lambda e, w, r: {"loss": _CE, **_NO_SCHEDULE},
    ),
    "dicece": LossSpec(
        "DiceCELoss(to_onehot_y, softmax) with the mask (MaskedDiceCELoss)",
        lambda e, w, r: {
            "loss": {"class_path": "lovasz_monai.losses.MaskedDiceCELoss"},
            **_NO_SCHEDULE,
        },
    ),
    "dicece_monai": LossSpec(
        "monai.losses.DiceCELoss(to_onehot_y, softmax), no mask (ignored voxels = background)",
        lambda e, w, r: {
            "loss": {
                "class_path": "monai.losses.DiceCELoss",
                "init_args": {"to_onehot_y": True, "softmax": True},
            },
            **_NO_SCHEDULE,
        },
    ),
    "lovasz": LossSpec(
        "LovaszSoftmaxLoss(to_onehot_y=True)",
        lambda e, w, r: {"loss": _LOVASZ, **_NO_SCHEDULE},
    ),
    "lovasz_ce": LossSpec(
        "LovaszCELoss(to_onehot_y=True): Lovász + CE",
        lambda e, w, r: {
            "loss": {"class_path": "lovasz_monai.LovaszCELoss", "init_args": {"to_onehot_y": True}},
            **_NO_SCHEDULE,
        },
    ),
    "ce_to_lovasz": LossSpec(
        "CE for the warm-up epochs, linear ramp, then LovaszSoftmaxLoss",
        lambda e, w, r: {
            "loss": _LOVASZ,
            "warmup_loss": _CE,
            "warmup_epochs": w,
            "ramp_epochs": r,
        },
    ),
    # Lovász variants (issue 9: which settings matter on real anatomy)
    "ce_to_lovasz_lr01": LossSpec(
        "ce_to_lovasz with the learning rates scaled by 0.1 when the Lovász phase starts",
        lambda e, w, r: {
            "loss": _LOVASZ,
            "warmup_loss": _CE,
            "warmup_epochs": w,
            "ramp_epochs": r,
            "finetune_lr_scale": 0.1,
        },
    ),
    "lovasz_batch": LossSpec(
        "LovaszSoftmaxLoss(to_onehot_y=True, batch=True): the batch as one set of voxels",
        lambda e, w, r: {"loss": _lovasz("LovaszSoftmaxLoss", batch=True), **_NO_SCHEDULE},
    ),
    "lovasz_all": LossSpec(
        'LovaszSoftmaxLoss(to_onehot_y=True, classes="all")',
        lambda e, w, r: {"loss": _lovasz("LovaszSoftmaxLoss", classes="all"), **_NO_SCHEDULE},
    ),
    "lovasz_ce_batch": LossSpec(
        "LovaszCELoss(to_onehot_y=True, batch=True)",
        lambda e, w, r: {"loss": _lovasz("LovaszCELoss", batch=True), **_NO_SCHEDULE},
    ),
    "lovasz_ce_nobg": LossSpec(
        "LovaszCELoss(to_onehot_y=True, include_background=False): class weight 0 on the "
        "background in the Lovász mean",
        lambda e, w, r: {
            "loss": _lovasz("LovaszCELoss", include_background=False),
            **_NO_SCHEDULE,
        },
    ),
    "lovasz_ce_lowce": LossSpec(
        "LovaszCELoss(to_onehot_y=True, lambda_ce=0.3): more Lovász in the balance",
        lambda e, w, r: {"loss": _lovasz("LovaszCELoss", lambda_ce=0.3), **_NO_SCHEDULE},
    ),
    "lovasz_ce_mince": LossSpec(
        "LovaszCELoss(to_onehot_y=True, lambda_ce=0.1): mostly Lovász",
        lambda e, w, r: {"loss": _lovasz("LovaszCELoss", lambda_ce=0.1), **_NO_SCHEDULE},
    ),
    "lovasz_ce_csf": LossSpec(
        "LovaszCELoss(to_onehot_y=True, lambda_ce=0.3, weight=[1, 2, 1, 1]): the first foreground "
        "class (CSF in the brain-tissue task) counts twice in the Lovász class mean",
        lambda e, w, r: {
            "loss": _lovasz("LovaszCELoss", lambda_ce=0.3, weight=[1.0, 2.0, 1.0, 1.0]),
            **_NO_SCHEDULE,
        },
    ),
    "lovasz_ce_csf_ce": LossSpec(
        "lovasz_ce_csf with the same class weights in the cross-entropy (ce_weight)",
        lambda e, w, r: {
            "loss": _lovasz(
                "LovaszCELoss",
                lambda_ce=0.3,
                weight=[1.0, 2.0, 1.0, 1.0],
                ce_weight=[1.0, 2.0, 1.0, 1.0],
            ),
            **_NO_SCHEDULE,
        },
    ),
    "lovasz_ce_highce": LossSpec(
        "LovaszCELoss(to_onehot_y=True, lambda_ce=3.0): more CE in the balance",
        lambda e, w, r: {"loss": _lovasz("LovaszCELoss", lambda_ce=3.0), **_NO_SCHEDULE},
    ),
}
# Issue 11: the rows of the Lovász loss under DDP. All histogram (the distributed loss needs it),
# so that only the set of voxels of a class row differs: a patch, this process's patches, or
# the patches of all processes.
_ROWS = {
    "": ("each patch (volume)", {}),
    "_batch": ("the patches of this process (batch=True)", {"batch": True}),
    "_global": (
        "the patches of all processes (batch=True, distributed=True)",
        {"batch": True, "distributed": True},
    ),
}
for _suffix, (_rows, _init) in _ROWS.items():
    LOSSES[f"lovasz_hist{_suffix}"] = LossSpec(
        f"LovaszSoftmaxLoss(method='histogram'), one row per class over {_rows}",
        lambda e, w, r, _init=_init: {
            "loss": _lovasz("LovaszSoftmaxLoss", method="histogram", **_init),
            **_NO_SCHEDULE,
        },
    )
    LOSSES[f"lovasz_ce_hist{_suffix}"] = LossSpec(
        f"LovaszCELoss(lambda_ce=0.3, method='histogram'), one row per class over {_rows}",
        lambda e, w, r, _init=_init: {
            "loss": _lovasz("LovaszCELoss", lambda_ce=0.3, method="histogram", **_init),
            **_NO_SCHEDULE,
        },
    )
"""The losses ``compare`` knows, by key."""


def schedule_epochs(
    max_epochs: int, warmup_epochs: int | None = None, ramp_epochs: int | None = None
) -> tuple[int, int]:
    """Warm-up and ramp epochs of ``ce_to_lovasz``: by default half and a sixth of the epochs.

    Args:
        max_epochs: epochs of the run.
        warmup_epochs: warm-up epochs; ``None``: ``max_epochs // 2``.
        ramp_epochs: ramp epochs; ``None``: ``max_epochs // 6``.

    Returns:
        ``(warmup, ramp)`` as integers (not checked against ``max_epochs``).

    Example:
        >>> schedule_epochs(12), schedule_epochs(1), schedule_epochs(12, 4, 0)
        ((6, 2), (0, 0), (4, 0))
    """
    warmup = max_epochs // 2 if warmup_epochs is None else int(warmup_epochs)
    ramp = max_epochs // 6 if ramp_epochs is None else int(ramp_epochs)
    return warmup, ramp


# --------------------------------------------------------------------------------------------
# aggregation and formatting
# --------------------------------------------------------------------------------------------


def aggregate(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of the finite values.

    NaN values (e.g. the IoU of a class absent from labels and predictions) are left out. One
    value has standard deviation 0; none gives ``(nan, nan)``.

    Args:
        values: numbers, one per seed.

    Returns:
        ``(mean, std)``.

    Example:
        >>> aggregate([0.5, 0.7, 0.9])
        (0.7, 0.2)
        >>> aggregate([0.4, float("nan")])
        (0.4, 0.0)

    Raises:
        ValueError: a value ``float()`` cannot parse (e.g. the string ``"a"``).
        TypeError: a value ``float()`` does not accept (e.g. ``None``).
    """
    finite = [float(v) for v in values if not math.isnan(float(v))]
    if not finite:
        return math.nan, math.nan
    mean = statistics.fmean(finite)
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return round(mean, 12), round(std, 12)


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± std"`` of :func:`aggregate`, or ``"n/a"`` without finite values.

    Example:
        >>> format_mean_std([0.5, 0.7, 0.9])
        '0.700 ± 0.200'
        >>> format_mean_std([float("nan")])
        'n/a'

    Raises:
        ValueError: a negative ``digits``, or a value ``float()`` cannot parse (see
            :func:`aggregate`).
        TypeError: a value ``float()`` does not accept (see :func:`aggregate`).
    """
    mean, std = aggregate(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """Outcome of one (loss, seed) run; IoU/Dice lists are per class (NaN where undefined).

    Args:
        loss, seed: the run's key of :data:`LOSSES` and seed.
        miou, dice: mIoU and mean Dice of the final model (see :func:`evaluate`).
        iou, dice_per_class: per-class values, ``C`` each.
        step_times: wall-clock seconds of every training step.
        val_miou_curve: logged ``val/mIoU`` of every validation epoch.
        logged_val_miou: the last of them (NaN without one).
        wall_time: seconds of the whole run.
        run_dir: the run's ``default_root_dir``.
        class_names, counted_classes, num_val_volumes: as in :class:`ComparisonResult`.

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

    @property
    def median_step(self) -> float:
        """Median training-step time in seconds, the first step left out when there are more."""
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return statistics.median(times) if times else math.nan


class TrainingRecorder(Callback):
    """Training-step wall times and the logged ``val/mIoU`` of every validation epoch.

    Args:
        path: optional JSON file that the global rank 0 writes at the end of ``fit``:
            ``{"step_times": [...], "val_miou": [...]}`` (for runs in another process, e.g.
            ``lovasz-monai fit --trainer.callbacks+=...`` under DDP).

    Example:
        >>> recorder = TrainingRecorder()
        >>> recorder.step_times, recorder.val_miou
        ([], [])
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.step_times: list[float] = []
        self.val_miou: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step_times.append(time.perf_counter() - self._start)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/mIoU")
        self.val_miou.append(math.nan if value is None else float(value))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = {"step_times": self.step_times, "val_miou": self.val_miou}
            self.path.write_text(json.dumps(record))


@torch.no_grad()
def evaluate(model: Any, loader: Any, context: Callable[[], Any] | None = None) -> dict[str, Any]:
    """IoU and Dice of a trained :class:`~lovasz_monai.module.LovaszSegmentationModule` on whole
    volumes, from one set of predictions, on voxels with ``mask == 1``.

    Args:
        model: a multi-class ``LovaszSegmentationModule`` (``sliding_window``, ``discretize``,
            ``mean_iou``, ``num_classes``).
        loader: batches with ``"image"`` ``(B, C_in, *S)``, ``"label"`` ``(B, 1, *S)`` and
            ``"mask"`` ``(B, 1, *S)`` (e.g. the datamodule's ``val_dataloader()``).
        context: optional factory of a context manager for the forward passes (e.g. the
            trainer's ``precision_plugin.val_step_context``).

    Returns:
        ``{"iou": [C], "dice": [C], "miou": float, "dice_mean": float, "num_volumes": int}``:
        per-class IoU from the confusion matrix over all volumes, per-class Dice averaged over
        volumes (NaN where the class is in neither label nor prediction of any volume), and
        their means over the classes ``model.mean_iou`` counts.

    Raises:
        ValueError: a multi-label or one-channel binary model, or an empty loader.

    Example:
        >>> from torch import nn
        >>> from lovasz_monai.module import LovaszSegmentationModule
        >>> model = LovaszSegmentationModule(3, network=nn.Conv3d(1, 3, 1), roi_size=(4, 4, 4))
        >>> batch = {
        ...     "image": torch.randn(2, 1, 4, 4, 4),
        ...     "label": torch.randint(0, 3, (2, 1, 4, 4, 4)),
        ...     "mask": torch.ones(2, 1, 4, 4, 4),
        ... }
        >>> metrics = evaluate(model, [batch])
        >>> sorted(metrics), len(metrics["iou"]), metrics["num_volumes"]
        (['dice', 'dice_mean', 'iou', 'miou', 'num_volumes'], 3, 2)
    """
    if model.mode != "multiclass":
        raise ValueError("evaluate supports multi-class (softmax) models only")
    # fresh copies of the module's own metrics: torchmetrics IoU and the per-case Dice
    iou_metric = model.val_iou.clone()
    iou_metric.reset()
    cases = copy.deepcopy(model.val_cases)
    cases.reset()
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if context is None:
                logits = model.sliding_window(batch["image"])
            else:
                with context():
                    logits = model.sliding_window(batch["image"])
            label, mask = batch["label"].to(logits.device), batch["mask"].to(logits.device)
            model.update_metric(iou_metric, logits.float(), label, mask)
            cases.update(model.discretize(logits.float()), label, mask)
    finally:
        model.train(was_training)
    if not len(cases):
        raise ValueError("evaluate got an empty loader")
    iou = iou_metric.compute().float().cpu()
    dice = cases.gather().values["Dice"].nanmean(0)
    return {
        "iou": iou.tolist(),
        "dice": dice.tolist(),
        "miou": float(model.mean_iou(iou)),
        "dice_mean": float(model.mean_iou(dice)),
        "num_volumes": len(cases),
    }


def _yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a YAML mapping, got {type(config).__name__}")
    return config


def cli_args(
    config: str | os.PathLike,
    loss: str,
    seed: int,
    max_epochs: int,
    run_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    warmup_epochs: int | None = None,
    ramp_epochs: int | None = None,
) -> list[str]:
    """The LovaszCLI arguments of one run: config, overrides, then the run's own settings.

    Args:
        config: LightningCLI YAML.
        loss: a key of :data:`LOSSES`.
        seed: ``seed_everything`` value.
        max_epochs: training epochs; a ``CosineAnnealingLR``'s ``T_max`` in the config follows.
        run_dir: ``trainer.default_root_dir`` of the run.
        overrides: further ``--key value`` arguments (applied after the config).
        warmup_epochs, ramp_epochs: schedule of ``ce_to_lovasz`` (see :func:`schedule_epochs`).

    Returns:
        A list of strings for ``LovaszCLI(args=..., run=False)``.

    Example:
        >>> import pathlib, tempfile
        >>> config = pathlib.Path(tempfile.mkdtemp()) / "exp.yaml"
        >>> _ = config.write_text("lr_scheduler: {class_path: CosineAnnealingLR}")
        >>> args = cli_args(config, "lovasz", 1, 3, "runs/x")
        >>> args[args.index("--seed_everything") + 1], args[args.index("--trainer.max_epochs") + 1]
        ('1', '3')
        >>> args[args.index("--lr_scheduler.init_args.T_max") + 1]
        '3'
        >>> args[-4:]  # doctest: +NORMALIZE_WHITESPACE
        ['--model.loss={"class_path": "lovasz_monai.LovaszSoftmaxLoss", "init_args":
        {"to_onehot_y": true}}', '--model.warmup_loss=null', '--model.warmup_epochs=0',
        '--model.ramp_epochs=0']

    Raises:
        KeyError: an unknown loss.
    """
    if loss not in LOSSES:
        raise KeyError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    warmup, ramp = schedule_epochs(max_epochs, warmup_epochs, ramp_epochs)
    args = ["--config", str(config), *overrides]
    args += ["--seed_everything", str(seed), "--trainer.max_epochs", str(max_epochs)]
    args += ["--trainer.default_root_dir", str(run_dir), "--trainer.enable_model_summary", "false"]
    scheduler = _yaml_config(config).get("lr_scheduler")
    if isinstance(scheduler, Mapping) and str(scheduler.get("class_path", "")).endswith(
        "CosineAnnealingLR"
    ):
        args += ["--lr_scheduler.init_args.T_max", str(max_epochs)]
    for key, value in LOSSES[loss].model(max_epochs, warmup, ramp).items():
        args.append(f"--model.{key}={json.dumps(value)}")
    return args


def run_one(
    config: str | os.PathLike,
    loss: str,
    seed: int,
    max_epochs: int,
    run_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    warmup_epochs: int | None = None,
    ramp_epochs: int | None = None,
    progress_bar: bool = False,
    processes: int = 1,
) -> RunResult:
    """Train and evaluate one (loss, seed) run built by :class:`~lovasz_monai.cli.LovaszCLI`.

    Args:
        config, loss, seed, max_epochs, run_dir, overrides, warmup_epochs, ramp_epochs: see
            :func:`cli_args`. ``run_dir`` is emptied first.
        progress_bar: keep the config's progress bar (False removes it).
        processes: ``> 1``: train with DDP on that many processes (``lovasz-monai fit
            --trainer.strategy ddp`` in a subprocess, its output in ``<run_dir>/fit.log``; the
            step times are those of rank 0), then evaluate ``last.ckpt`` in this process.

    Returns:
        The :class:`RunResult`.

    Raises:
        KeyError: an unknown loss.
        ValueError: a config whose model is not multi-class, or without a validation split.
        SystemExit: a LovaszCLI parse error (jsonargparse prints what is wrong).
        RuntimeError: the DDP training subprocess failed (the end of its output is included).

    Example:
        >>> run = run_one("configs/demo.yaml", "lovasz", 0, 2, "runs/one")  # doctest: +SKIP
        >>> run.loss, run.seed, len(run.val_miou_curve)  # doctest: +SKIP
        ('lovasz', 0, 2)
    """
    from lovasz_monai.cli import LovaszCLI  # heavy import, only when a run is made

    start = time.perf_counter()
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    args = cli_args(config, loss, seed, max_epochs, run_dir, overrides, warmup_epochs, ramp_epochs)
    if processes > 1:
        recorder = _fit_ddp(args, run_dir, processes)
        args += ["--trainer.devices=1", "--trainer.strategy=auto", "--trainer.logger=false"]
    pl.seed_everything(seed, workers=True, verbose=False)
    cli = LovaszCLI(args=args, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    if model.mode != "multiclass":
        raise ValueError("compare needs a multi-class (softmax) model and label maps")
    if processes > 1:
        checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        model.load_state_dict(checkpoint["state_dict"])
        datamodule.setup("fit")
    else:
        recorder = TrainingRecorder()
        callbacks = list(trainer.callbacks)
        if not progress_bar:
            callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
        trainer.callbacks = [*callbacks, recorder]
        trainer.fit(model, datamodule=datamodule)
    loader = datamodule.val_dataloader()
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise ValueError("compare needs a validation split (data.val_fraction > 0)")
    metrics = evaluate(model, loader, trainer.precision_plugin.val_step_context)
    logged = recorder.val_miou[-1] if recorder.val_miou else math.nan
    return RunResult(
        loss=loss,
        seed=int(seed),
        miou=metrics["miou"],
        dice=metrics["dice_mean"],
        iou=metrics["iou"],
        dice_per_class=metrics["dice"],
        step_times=recorder.step_times,
        val_miou_curve=recorder.val_miou,
        logged_val_miou=logged,
        wall_time=time.perf_counter() - start,
        run_dir=str(run_dir),
        class_names=list(model.class_names),
        counted_classes=_counted_classes(model),
        num_val_volumes=int(metrics["num_volumes"]),
    )


def _fit_ddp(args: list[str], run_dir: Path, processes: int) -> TrainingRecorder:
    """``lovasz-monai fit`` of ``args`` with DDP on ``processes`` processes, in a subprocess;
    the step times and logged ``val/mIoU`` that rank 0 recorded."""
    record = run_dir / "recorder.json"
    callback = {"class_path": f"{__name__}.TrainingRecorder", "init_args": {"path": str(record)}}
    command = [sys.executable, "-m", "lovasz_monai.cli", "fit", *args]
    command += ["--trainer.strategy=ddp", f"--trainer.devices={processes}"]
    command += [f"--trainer.callbacks=[{json.dumps(callback)}]"]
    command += ["--trainer.enable_progress_bar=false"]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    (run_dir / "fit.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(
            f"DDP training failed ({shlex.join(command)}):\n{(done.stdout + done.stderr)[-4000:]}"
        )
    recorder = TrainingRecorder()
    data = json.loads(record.read_text())
    recorder.step_times, recorder.val_miou = data["step_times"], data["val_miou"]
    return recorder


def _counted_classes(model: Any) -> list[int]:
    """Indices of the classes that ``model.mean_iou`` averages."""
    first = 0 if model.metric_include_background else 1
    return list(range(first if model.num_classes > first else 0, model.num_classes))


def benchmark_steps(
    config: str | os.PathLike,
    losses: Sequence[str],
    run_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    repeats: int = 50,
    warmup: int = 5,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Interleaved timing of one training step per loss, on one batch, in one process.

    Builds the config's model once per loss (same seed, so the same initial network), takes one
    training batch, and times ``training_step`` (in the trainer's precision context) +
    ``backward`` + an AdamW step, loss after loss in a rotating order, ``warmup + repeats``
    rounds. Interleaving exposes every loss to the same machine load, so the ratios stay
    meaningful on a shared machine where the times of whole runs are not. ``ce_to_lovasz`` is
    timed in its final phase (the Lovász loss alone).

    Args:
        config, overrides: as in :func:`cli_args`.
        losses: keys of :data:`LOSSES`.
        run_dir: scratch ``default_root_dir`` (nothing is written there by the timing itself).
        repeats: timed rounds.
        warmup: untimed rounds first.
        seed: ``seed_everything`` value.

    Returns:
        Seconds per step, ``repeats`` values per loss.

    Example:
        >>> times = benchmark_steps(
        ...     "configs/demo.yaml", ["ce", "lovasz"], "runs/bench", repeats=3, warmup=1
        ... )  # doctest: +SKIP
        >>> {loss: len(t) for loss, t in times.items()}  # doctest: +SKIP
        {'ce': 3, 'lovasz': 3}

    Raises:
        KeyError: an unknown loss.
    """
    from lovasz_monai.cli import LovaszCLI

    models: dict[str, tuple[Any, torch.optim.Optimizer, Callable[[], Any]]] = {}
    batch: dict[str, Tensor] | None = None
    for loss in losses:
        args = cli_args(config, loss, seed, 1, Path(run_dir) / loss, overrides)
        cli = LovaszCLI(args=args, run=False)
        model = cli.model
        if loss == "ce_to_lovasz":
            model.warmup_loss = None  # the final phase: the Lovász loss alone
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        models[loss] = (model, optimizer, cli.trainer.precision_plugin.train_step_context)
        if batch is None:
            cli.datamodule.setup("fit")
            batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch is not None
    times: dict[str, list[float]] = {loss: [] for loss in losses}
    for round_ in range(warmup + repeats):
        shift = round_ % len(losses)
        for loss in [*losses[shift:], *losses[:shift]]:
            model, optimizer, context = models[loss]
            start = time.perf_counter()
            with context():
                value = model.training_step(batch, 0)
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_ >= warmup:
                times[loss].append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------


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

    def by_loss(self, loss: str) -> list[RunResult]:
        """The runs of one loss, in seed order."""
        return sorted((r for r in self.runs if r.loss == loss), key=lambda r: r.seed)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN written as null)."""
        data = asdict(self)
        return json.loads(json.dumps(data, default=str).replace("NaN", "null"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ComparisonResult:
        """Rebuild a result from :meth:`to_json` output (null read back as NaN).

        Raises:
            TypeError: a key that is not a field.
        """

        def nan(value: Any) -> Any:
            if value is None:
                return math.nan
            if isinstance(value, list):
                return [nan(v) for v in value]
            return value

        fields = dict(data)
        runs = []
        for run in fields.pop("runs", []):
            run = dict(run)
            for key in ("miou", "dice", "iou", "dice_per_class", "val_miou_curve"):
                run[key] = nan(run.get(key))
            run["logged_val_miou"] = nan(run.get("logged_val_miou"))
            runs.append(RunResult(**run))
        return cls(**fields, runs=runs)


def markdown_table(result: ComparisonResult) -> str:
    """The Markdown report: header (command, settings, how metrics are computed) and the table.

    Columns: loss, mIoU, IoU of every class, Dice (``mean ± std`` over seeds), the median
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
        >>> print(next(line for line in lines if line.startswith("| `ce`")))
        | `ce` | 0.500 ± 0.000 | 0.900 ± 0.000 | 0.500 ± 0.000 | 0.600 ± 0.000 | 200 | n/a | n/a |
    """
    names = result.class_names
    counted = ", ".join(names[i] for i in result.counted_classes)
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
        f"Settings: {len(result.seeds)} seed(s) ({', '.join(map(str, result.seeds))}), "
        f"{result.max_epochs} epochs per run ({config_epochs}the cosine `T_max` follows), "
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
    header = ["loss", "mIoU", *[f"IoU {n}" for n in names], "Dice"]
    header += ["train step (ms)", "timed step (ms)", "ratio"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    bench = {k: statistics.median(v) for k, v in result.bench_times.items() if v}
    base = bench.get(result.losses[0])
    for loss in result.losses:
        runs = result.by_loss(loss)
        if not runs:
            raise ValueError(f"no runs for loss {loss!r}")
        step = statistics.median([r.median_step for r in runs])
        cells = [f"`{loss}`", format_mean_std([r.miou for r in runs])]
        cells += [format_mean_std([r.iou[c] for r in runs]) for c in range(len(names))]
        cells += [format_mean_std([r.dice for r in runs]), f"{1000 * step:.0f}"]
        timed = bench.get(loss)
        cells.append("n/a" if timed is None else f"{1000 * timed:.0f}")
        cells.append("n/a" if timed is None or not base else f"{timed / base:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Losses:", ""]
    lines += [f"- `{loss}`: {LOSSES[loss].description}" for loss in result.losses]
    lines += [
        "",
        f"Total time: {result.total_time / 60:.1f} min. Per-run numbers: the JSON file next to "
        "this one.",
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
    ax_bar.set_ylabel("validation score (final model)")
    ax_bar.set_title(f"mean ± std over {len(result.seeds)} seed(s)")
    ax_bar.legend(loc="upper center", ncol=2, fontsize=8)
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


def _scaled_down(max_epochs: int, config_epochs: int | None, overrides: Sequence[str]) -> bool:
    """Whether a comparison runs fewer epochs than the config or with the default overrides."""
    n = len(DEFAULT_OVERRIDES)
    with_defaults = any(
        tuple(overrides[i : i + n]) == DEFAULT_OVERRIDES for i in range(len(overrides))
    )
    return with_defaults or (config_epochs is not None and max_epochs < config_epochs)


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

    Returns:
        The :class:`ComparisonResult`.

    Raises:
        KeyError: an unknown loss.
        ValueError: no losses or seeds, ``max_epochs < 1``, or a bad config (see
            :func:`run_one`).

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
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    config = str(config)
    runs_root = Path(runs_dir) if runs_dir is not None else Path("runs/compare") / Path(config).stem
    warmup, ramp = schedule_epochs(max_epochs, warmup_epochs, ramp_epochs)
    trainer_config = _yaml_config(config).get("trainer") or {}
    config_epochs = trainer_config.get("max_epochs") if isinstance(trainer_config, dict) else None
    if command is None:
        command = "python -m lovasz_monai.experiments " + shlex.join(sys.argv[1:])
    result: ComparisonResult | None = None
    start = time.perf_counter()
    total = len(losses) * len(seeds)
    for i, (seed, loss) in enumerate(run_order(losses, seeds), 1):
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
                scaled_down=_scaled_down(max_epochs, config_epochs, overrides),
                processes=int(processes),
            )
        result.runs.append(run)
        if log is not None:
            log(
                f"[{i}/{total}] {loss} seed {seed}: mIoU {run.miou:.3f} (logged "
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


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


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
    cmp.add_argument("--verbose", action="store_true", help="keep Lightning's messages")
    rep = sub.add_parser(
        "report",
        help="rewrite the Markdown table and the plot of a comparison from its JSON file",
    )
    rep.add_argument("json", help="the <output>.json of a comparison")
    rep.add_argument("--output", default=None, help="path without suffix (default: the JSON's)")
    return parser


def report(path: str | os.PathLike, output: str | os.PathLike | None = None) -> ComparisonResult:
    """Rewrite ``<output>.md`` and ``<output>.png`` from a comparison's JSON file (no training).

    Args:
        path: the ``<output>.json`` written by :func:`compare`.
        output: path without suffix of the files to write; default: ``path`` without ``.json``.

    Returns:
        The :class:`ComparisonResult` read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TypeError: the JSON holds keys that are not fields of :class:`ComparisonResult`.

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
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    # files written before these fields existed: derive them from the config
    if "config_max_epochs" not in data and Path(data.get("config", "")).is_file():
        trainer_config = _yaml_config(data["config"]).get("trainer") or {}
        data["config_max_epochs"] = trainer_config.get("max_epochs")
    if "scaled_down" not in data:
        data["scaled_down"] = _scaled_down(
            data["max_epochs"], data.get("config_max_epochs"), data.get("overrides", [])
        )
    result = ComparisonResult.from_json(data)
    stem = Path(output) if output is not None else path.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".md").write_text(markdown_table(result), encoding="utf-8")
    plot_comparison(result, stem.with_name(stem.name + ".png"))
    return result


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
        return report(args.json, args.output)
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
    )


if __name__ == "__main__":
    main()
