"""One run of a loss comparison: the LovaszCLI arguments, training (one process or DDP), the
evaluation of the final model, and an interleaved timing of training steps."""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, Checkpoint, ProgressBar
from torch import Tensor

from lovasz_monai.evaluation import SegmentationMetrics
from lovasz_monai.tools.recipes import (
    LOSSES,
    class_voxel_counts,
    inverse_frequency_weights,
    schedule_epochs,
)
from lovasz_monai.tools.report import RunResult, yaml_config

__all__ = [
    "EVALUATION_FORMAT",
    "EpochCheckpoint",
    "EvaluationCache",
    "TrainingRecorder",
    "benchmark_steps",
    "cli_args",
    "cosine_t_max",
    "evaluate",
    "run_one",
    "training_finished",
]


#: file name of the :class:`EpochCheckpoint` of a :func:`run_one` run, in ``<run_dir>/checkpoints``
INTERRUPTED_CHECKPOINT = "interrupted.ckpt"

#: the layout of :func:`evaluate`'s result, incremented when it gains or changes a key, so that
#: the results :class:`EvaluationCache` stored before read as missing and are computed again
EVALUATION_FORMAT = 2


class TrainingRecorder(Callback):
    """Training-step wall times and the logged ``val/mIoU`` of every validation epoch.

    Args:
        path: optional JSON file that the global rank 0 writes at the end of ``fit``:
            ``{"step_times": [...], "val_miou": [...], "fit_seconds": ..., "resumed_at_steps":
            [...], "resumed_seconds": ...}`` (for runs in another process, e.g. ``lovasz-monai
            fit --trainer.callbacks+=...`` under DDP, and as the mark of a finished run that
            ``compare --resume`` reuses). A fit continued from a checkpoint that holds the
            recorder's state (``ckpt_path``) records the whole run: ``resumed_at_steps`` are the
            training batches done before each continuation, ``resumed_seconds`` the fit seconds
            before the last one (both included in ``step_times`` and ``fit_seconds``).

    Example:
        >>> recorder = TrainingRecorder()
        >>> recorder.step_times, recorder.val_miou
        ([], [])
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.step_times: list[float] = []
        self.val_miou: list[float] = []
        self.fit_seconds = math.nan
        self.resumed_at_steps: list[int] = []
        self.resumed_seconds = 0.0
        self._start = 0.0
        self._fit_start = 0.0

    @classmethod
    def read(cls, path: str | os.PathLike) -> TrainingRecorder:
        """The recorder that :meth:`on_fit_end` wrote to ``path``."""
        data = json.loads(Path(path).read_text())
        recorder = cls(path)
        recorder.step_times, recorder.val_miou = data["step_times"], data["val_miou"]
        recorder.fit_seconds = float(data.get("fit_seconds", math.nan))
        recorder.resumed_at_steps = list(data.get("resumed_at_steps", []))
        recorder.resumed_seconds = float(data.get("resumed_seconds", 0.0))
        return recorder

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the times and scores so far, so that a fit continued from it
        (``ckpt_path``) records the whole run."""
        return {
            "step_times": self.step_times,
            "val_miou": self.val_miou,
            "fit_seconds": self.resumed_seconds + time.perf_counter() - self._fit_start,
            "resumed_at_steps": self.resumed_at_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step_times = list(state_dict["step_times"])
        self.val_miou = list(state_dict["val_miou"])
        self.resumed_seconds = float(state_dict["fit_seconds"])
        self.resumed_at_steps = [*state_dict["resumed_at_steps"], len(self.step_times)]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

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
        self.fit_seconds = self.resumed_seconds + time.perf_counter() - self._fit_start
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = {
                "step_times": self.step_times,
                "val_miou": self.val_miou,
                "fit_seconds": self.fit_seconds,
                "resumed_at_steps": self.resumed_at_steps,
                "resumed_seconds": self.resumed_seconds,
            }
            self.path.write_text(json.dumps(record))


class EpochCheckpoint(Checkpoint):
    """The whole training state (weights, optimizer, scheduler, loop progress, callback states)
    saved to one file at the end of every training epoch, and the file removed when ``fit``
    ends: a run stopped part-way (killed, a session's end) continues from its last finished
    epoch with ``trainer.fit(..., ckpt_path=path)`` instead of starting again.

    It saves after every other callback of the epoch's end (``ModelCheckpoint``, early
    stopping), so that their state is in the file: as a ``Checkpoint`` it runs with them, after
    the others, and it moves itself to the end of the trainer's callbacks. Each save is written
    next to ``path`` and renamed onto it, so a process killed while saving leaves the previous
    file intact.

    Lightning does not keep the random generators. A continued training seeds them anew from
    the run's seed, the step it continues at and the process rank, before its data loaders are
    built: its crops and augmentation are not those an uninterrupted run would have drawn (the
    same distribution, other numbers), and not a repeat of the first epochs' either.

    Args:
        path: the checkpoint file (e.g. ``<run_dir>/checkpoints/interrupted.ckpt``).
        key: what the training must match to be continued (e.g. the run's LovaszCLI arguments:
            another ``max_epochs``, learning rate or schedule would silently mix two runs).

    Raises:
        ValueError: continuing from a file that another ``key`` wrote, or that a training on
            another number of processes wrote (the global batch, and so the steps per epoch,
            would change for the rest of the run).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "interrupted.ckpt"
        >>> callback = EpochCheckpoint(path, key=["--seed_everything", "0"])
        >>> callback.state_dict()
        {'key': ['--seed_everything', '0'], 'world_size': 1, 'global_step': 0}
    """

    def __init__(self, path: str | os.PathLike, key: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.key = [str(k) for k in key]
        self._world_size, self._rank, self._global_step = 1, 0, 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._world_size, self._rank = trainer.world_size, trainer.global_rank
        # a new list: the hook call that runs this goes on over the old one
        trainer.callbacks = [*(c for c in trainer.callbacks if c is not self), self]

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "world_size": self._world_size, "global_step": self._global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["key"]) != self.key:
            raise ValueError(
                f"{self.path} was written by a training with other arguments "
                f"({shlex.join(state_dict['key'])}); continue it with those, or delete it to "
                "train from the start"
            )
        saved = int(state_dict["world_size"])
        if saved != self._world_size:
            raise ValueError(
                f"{self.path} was written by a training on {saved} process(es); continue it on "
                f"{saved}, not {self._world_size}, or delete it to train from the start"
            )
        entropy = [torch.initial_seed(), int(state_dict["global_step"]), self._rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._global_step = trainer.global_step
        partial = self.path.with_name(self.path.name + ".partial")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        trainer.strategy.barrier("EpochCheckpoint")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.unlink(missing_ok=True)


@torch.no_grad()
def evaluate(model: Any, loader: Any, context: Callable[[], Any] | None = None) -> dict[str, Any]:
    """IoU and Dice of a trained :class:`~lovasz_monai.module.LovaszSegmentationModule` on whole
    volumes, from one set of predictions, on voxels with ``mask == 1``.

    Args:
        model: a multi-class ``LovaszSegmentationModule`` (its ``sliding_window``, ``labels``
            and ``surface_metrics``).
        loader: batches with ``"image"`` ``(B, C_in, *S)``, ``"label"`` ``(B, 1, *S)`` and
            ``"mask"`` ``(B, 1, *S)`` (e.g. the datamodule's ``val_dataloader()``).
        context: optional factory of a context manager for the forward passes (e.g. the
            trainer's ``precision_plugin.val_step_context``).

    Returns:
        A dict. ``"iou"`` and ``"dice"`` (lists of ``C``): per-class IoU from the confusion
        matrix over all volumes (dataset-level) and per-class Dice averaged over volumes (NaN
        where the class is in neither label nor prediction of any volume); ``"miou"`` and
        ``"dice_mean"``: their means over the classes ``model.labels`` counts; ``"case_iou"``
        (list of ``C``): IoU per class averaged over volumes; ``"case_miou"``: the per-case mIoU
        (each volume's mean IoU over the counted classes in its label or prediction) averaged over
        volumes, the score medical challenges report; ``"case_dice"`` and ``"case_hd95"`` the same
        for Dice and (with the module's ``surface_metrics``, else NaN) HD95 in mm, ``inf`` when
        a volume has a structure in only one of label and prediction; ``"case_hd95_found"`` the
        per-case HD95 over the structures in both, and ``"hd95_one_sided"`` the number of (volume,
        counted class) pairs left out of it (NaN without surface metrics).

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
        ... # doctest: +NORMALIZE_WHITESPACE
        (['case_dice', 'case_hd95', 'case_hd95_found', 'case_iou', 'case_miou', 'dice',
          'dice_mean', 'hd95_one_sided', 'iou', 'miou', 'num_volumes'], 3, 2)
    """
    if model.mode != "multiclass":
        raise ValueError("evaluate supports multi-class (softmax) models only")
    # the module's own metrics, fresh: torchmetrics IoU and the per-case metrics of its test
    # step (with the module's surface_metrics: HD95 too, in mm of the image's affine)
    metrics = SegmentationMetrics(model.labels, surface=model.surface_metrics).to(model.device)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if context is None:
                logits = model.sliding_window(batch["image"])
            else:
                with context():
                    logits = model.sliding_window(batch["image"])
            logits = logits.float()
            label, mask = batch["label"].to(logits.device), batch["mask"].to(logits.device)
            metrics.update(logits, label, mask, image=batch["image"])
    finally:
        model.train(was_training)
    if not len(metrics.cases):
        raise ValueError("evaluate got an empty loader")
    evaluation = metrics.compute()
    iou, cases = evaluation.iou.cpu(), evaluation.cases
    dice = cases.class_means("Dice")
    surface = "HD95" in cases.values

    def per_case_mean(name: str, finite_only: bool = False) -> float:
        if name not in cases.values:
            return math.nan
        return float(cases.case_means(name, finite_only=finite_only).nanmean())

    return {
        "iou": iou.tolist(),
        "dice": dice.tolist(),
        "miou": float(model.labels.mean(iou)),
        "dice_mean": float(model.labels.mean(dice)),
        "case_iou": cases.class_means("IoU").tolist(),
        "case_miou": per_case_mean("IoU"),
        "case_dice": per_case_mean("Dice"),
        "case_hd95": per_case_mean("HD95"),
        "case_hd95_found": per_case_mean("HD95", finite_only=True),
        "hd95_one_sided": cases.num_one_sided("HD95") if surface else math.nan,
        "num_volumes": len(cases.cases),
    }


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
        max_epochs: training epochs; a ``CosineAnnealingLR``'s ``T_max`` in the config follows
            (see :func:`cosine_t_max`).
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
        >>> args[-5:]  # doctest: +NORMALIZE_WHITESPACE
        ['--model.loss=null', '--model.loss={"class_path": "lovasz_monai.LovaszSoftmaxLoss",
        "init_args": {"to_onehot_y": true}}', '--model.warmup_loss=null',
        '--model.warmup_epochs=0', '--model.ramp_epochs=0']

    Raises:
        KeyError: an unknown loss.
        ValueError: a class-weighted recipe (``LossSpec.class_weighted``) without a
            ``data.data_dir``, or whose data :func:`inverse_frequency_weights` refuses.
    """
    if loss not in LOSSES:
        raise KeyError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    warmup, ramp = schedule_epochs(max_epochs, warmup_epochs, ramp_epochs)
    args = ["--config", str(config), *overrides]
    args += ["--seed_everything", str(seed), "--trainer.max_epochs", str(max_epochs)]
    args += ["--trainer.default_root_dir", str(run_dir), "--trainer.enable_model_summary", "false"]
    t_max = cosine_t_max(yaml_config(config), max_epochs)
    if t_max is not None:
        args += ["--lr_scheduler.init_args.T_max", str(t_max)]
    spec = LOSSES[loss]
    model = spec.model(max_epochs, warmup, ramp)
    if spec.class_weighted:
        weights = inverse_frequency_weights(_data_dir(config, overrides))
        init_args = model["loss"].setdefault("init_args", {})
        init_args.update({name: weights for name in spec.class_weighted})
    for key, value in model.items():
        if isinstance(value, Mapping):
            # reset first: jsonargparse would keep the config's init_args that the new class
            # also accepts (a config's `batch: true` would leak into every recipe)
            args.append(f"--model.{key}=null")
        args.append(f"--model.{key}={json.dumps(value)}")
    return args


def cosine_t_max(config: Mapping, max_epochs: int) -> int | None:
    """The ``T_max`` of a config's ``CosineAnnealingLR`` when the run trains ``max_epochs``.

    ``T_max`` keeps its ratio to ``trainer.max_epochs`` in the config: a config whose schedule
    ends with the training (``T_max == max_epochs``) still does, and one that stops early on
    purpose (``configs/subcortical.yaml``: 79 for 63 epochs, the learning rate ends at ~10% of
    its peak) keeps doing so at any length. Without ``trainer.max_epochs`` or ``T_max`` in the
    config, ``T_max`` is ``max_epochs``.

    Args:
        config: a parsed LightningCLI YAML.
        max_epochs: the epochs of the run.

    Returns:
        The ``T_max`` to pass, or ``None`` when the config's scheduler is not cosine.

    Example:
        >>> cfg = {"trainer": {"max_epochs": 63}, "lr_scheduler": {
        ...     "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
        ...     "init_args": {"T_max": 79}}}
        >>> cosine_t_max(cfg, 63), cosine_t_max(cfg, 12), cosine_t_max({}, 12)
        (79, 15, None)
    """
    scheduler = config.get("lr_scheduler")
    if not isinstance(scheduler, Mapping):
        return None
    if not str(scheduler.get("class_path", "")).endswith("CosineAnnealingLR"):
        return None
    config_t_max = (scheduler.get("init_args") or {}).get("T_max")
    config_epochs = (config.get("trainer") or {}).get("max_epochs")
    if not config_t_max or not config_epochs or config_epochs <= 0:
        return max_epochs
    return max(1, round(max_epochs * config_t_max / config_epochs))


def _data_dir(config: str | os.PathLike, overrides: Sequence[str]) -> str:
    """``data.data_dir`` of a run: the last ``--data.data_dir`` override, else the config's."""
    found = None
    for i, arg in enumerate(overrides):
        if arg == "--data.data_dir" and i + 1 < len(overrides):
            found = overrides[i + 1]
        elif arg.startswith("--data.data_dir="):
            found = arg.split("=", 1)[1]
    if found is None:
        found = (yaml_config(config).get("data") or {}).get("data_dir")
    if not found:
        raise ValueError(f"no data.data_dir in {config} or the overrides: class weights need it")
    return str(found)


def training_finished(run_dir: str | os.PathLike) -> bool:
    """Whether the training of a :func:`run_one` folder finished: the
    :class:`TrainingRecorder`'s ``recorder.json`` (written at the end of ``fit``) and
    ``checkpoints/last.ckpt`` are there.

    Example:
        >>> import tempfile
        >>> training_finished(tempfile.mkdtemp())
        False
    """
    run_dir = Path(run_dir)
    return (run_dir / "recorder.json").is_file() and (run_dir / "checkpoints/last.ckpt").is_file()


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
    resume: bool = False,
    eval_split: str = "val",
) -> RunResult:
    """Train and evaluate one (loss, seed) run built by :class:`~lovasz_monai.cli.LovaszCLI`.

    Args:
        config, loss, seed, max_epochs, run_dir, overrides, warmup_epochs, ramp_epochs: see
            :func:`cli_args`. ``run_dir`` is emptied first, unless ``resume`` finds a training
            there to reuse or continue.
        progress_bar: keep the config's progress bar (False removes it).
        processes: ``> 1``: train with DDP on that many processes (``lovasz-monai fit
            --trainer.strategy ddp`` in a subprocess, its output in ``<run_dir>/fit.log``; the
            step times are those of rank 0), then evaluate ``last.ckpt`` in this process.
        resume: a ``run_dir`` whose training finished (``recorder.json`` and
            ``checkpoints/last.ckpt``) is not trained again; its step times and ``wall_time``
            (the training's) come from ``recorder.json``. Its evaluation is read from
            ``evaluation-<split>.json`` when that file was written for the same checkpoint,
            arguments and package version, else evaluated again (and the file written). A
            ``run_dir`` whose training stopped part-way continues from its last finished epoch
            (``checkpoints/interrupted.ckpt``, which :class:`EpochCheckpoint` writes during
            every training), with the same arguments and number of processes; the result's
            ``resumed_at_steps`` says where. Without ``resume`` the ``run_dir`` is emptied and
            trained from the start.
        eval_split: ``"val"``: evaluate on the validation split; ``"test"``: on the labelled
            ``test`` cases of ``dataset.json`` (the validation split when there are none, as
            ``lovasz-monai test`` does; the result's ``eval_split`` says which).

    Returns:
        The :class:`RunResult`.

    Raises:
        KeyError: an unknown loss.
        ValueError: a config whose model is not multi-class, without a validation split (with
            ``eval_split="val"``), an unknown ``eval_split``, or (with ``resume``) a training
            stopped part-way that other arguments or another number of processes started
            (:class:`EpochCheckpoint`; delete its ``interrupted.ckpt`` to train it from the
            start).
        SystemExit: a LovaszCLI parse error (jsonargparse prints what is wrong).
        RuntimeError: the DDP training subprocess failed (the end of its output is included),
            e.g. refusing to continue a training as above.

    Example:
        >>> run = run_one("configs/demo.yaml", "lovasz", 0, 2, "runs/one")  # doctest: +SKIP
        >>> run.loss, run.seed, len(run.val_miou_curve)  # doctest: +SKIP
        ('lovasz', 0, 2)
    """
    from lovasz_monai.cli import LovaszCLI  # heavy import, only when a run is made

    if eval_split not in ("val", "test"):
        raise ValueError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    record, last = run_dir / "recorder.json", run_dir / "checkpoints" / "last.ckpt"
    interrupted = run_dir / "checkpoints" / INTERRUPTED_CHECKPOINT
    trained = resume and training_finished(run_dir)
    continued = resume and not trained and interrupted.is_file()
    from_checkpoint = trained or processes > 1  # else trained and evaluated in this process
    if run_dir.exists() and not trained and not continued:
        shutil.rmtree(run_dir)
    if trained:  # killed between the end of its training and the removal of the file
        interrupted.unlink(missing_ok=True)
    args = cli_args(config, loss, seed, max_epochs, run_dir, overrides, warmup_epochs, ramp_epochs)
    if trained:
        recorder = TrainingRecorder.read(record)
    elif processes > 1:
        recorder = _fit_ddp(args, run_dir, processes, interrupted, continued)
    cli_run_args = args
    if from_checkpoint:  # evaluated in this process, on one device
        cli_run_args = [
            *args,
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.logger=false",
        ]
    pl.seed_everything(seed, workers=True, verbose=False)
    cli = LovaszCLI(args=cli_run_args, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    if model.mode != "multiclass":
        raise ValueError("compare needs a multi-class (softmax) model and label maps")
    if from_checkpoint:
        checkpoint = torch.load(last, weights_only=False)
        model.load_state_dict(checkpoint["state_dict"])
        datamodule.setup("fit")
    else:
        recorder = TrainingRecorder(record)
        callbacks = list(trainer.callbacks)
        if not progress_bar:
            callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
        trainer.callbacks = [*callbacks, recorder, EpochCheckpoint(interrupted, key=args)]
        trainer.fit(model, datamodule=datamodule, ckpt_path=interrupted if continued else None)
    if eval_split == "test" and datamodule.test_files:
        datamodule.setup("test")
        loader = datamodule.test_dataloader()
    else:  # no labelled test case: the validation split, recorded as such
        eval_split = "val"
        loader = datamodule.val_dataloader()
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise ValueError("compare needs a validation split (data.val_fraction > 0)")
    cache = EvaluationCache(run_dir / f"evaluation-{eval_split}.json", last, args)
    metrics = cache.read() if trained else None
    if metrics is None:
        metrics = evaluate(model, loader, trainer.precision_plugin.val_step_context)
        cache.write(metrics)
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
        wall_time=(
            recorder.fit_seconds
            if trained
            else recorder.resumed_seconds + time.perf_counter() - start
        ),
        run_dir=str(run_dir),
        class_names=list(model.class_names),
        counted_classes=model.labels.counted_classes,
        num_val_volumes=int(metrics["num_volumes"]),
        case_miou=metrics["case_miou"],
        case_dice=metrics["case_dice"],
        case_hd95=metrics["case_hd95"],
        case_hd95_found=metrics["case_hd95_found"],
        hd95_one_sided=metrics["hd95_one_sided"],
        class_voxels=class_voxel_counts(datamodule.description),
        case_iou=metrics["case_iou"],
        eval_split=eval_split,
        resumed_at_steps=list(recorder.resumed_at_steps),
    )


class EvaluationCache:
    """The :func:`evaluate` result of one checkpoint, kept next to it as JSON.

    A stored result is valid while the checkpoint (size and modification time), the run's
    arguments, the package version and :data:`EVALUATION_FORMAT` are those it was written for;
    anything else reads as missing, so an edited config or a retrained run is evaluated again.

    Args:
        path: the JSON file (e.g. ``<run_dir>/evaluation-test.json``).
        checkpoint: the evaluated checkpoint.
        args: the run's LovaszCLI arguments (config, overrides, seed, ...).

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> checkpoint = folder / "last.ckpt"
        >>> _ = checkpoint.write_bytes(b"weights")
        >>> cache = EvaluationCache(folder / "evaluation-val.json", checkpoint, ["--seed", "0"])
        >>> cache.read() is None
        True
        >>> cache.write({"miou": 0.5})
        >>> cache.read()
        {'miou': 0.5}
        >>> EvaluationCache(folder / "evaluation-val.json", checkpoint, ["--seed", "1"]).read()
    """

    def __init__(self, path: str | os.PathLike, checkpoint: str | os.PathLike, args: Sequence[str]):
        self.path, self.checkpoint, self.args = Path(path), Path(checkpoint), list(args)

    def key(self) -> dict[str, Any] | None:
        """What the stored result must have been written for; ``None`` without a checkpoint."""
        from lovasz_monai import __version__

        if not self.checkpoint.is_file():
            return None
        stat = self.checkpoint.stat()
        return {
            "checkpoint": [stat.st_size, stat.st_mtime_ns],
            "args": self.args,
            "version": __version__,
            "format": EVALUATION_FORMAT,
        }

    def read(self) -> dict[str, Any] | None:
        """The stored result, or ``None`` when there is none or it was written for another key."""
        key = self.key()
        if key is None or not self.path.is_file():
            return None
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("key") != key:
            return None
        return stored.get("metrics")

    def write(self, metrics: Mapping[str, Any]) -> None:
        """Store ``metrics`` for the current checkpoint; nothing without a checkpoint."""
        key = self.key()
        if key is not None:
            self.path.write_text(json.dumps({"key": key, "metrics": dict(metrics)}))


def _fit_ddp(
    args: list[str], run_dir: Path, processes: int, interrupted: Path, continued: bool
) -> TrainingRecorder:
    """``lovasz-monai fit`` of ``args`` with DDP on ``processes`` processes, in a subprocess
    (the config's callbacks replaced by a :class:`TrainingRecorder` and an
    :class:`EpochCheckpoint` saving to ``interrupted``, no progress bar; ``continued``: from
    ``interrupted``); the step times and logged ``val/mIoU`` that rank 0 recorded."""
    record = run_dir / "recorder.json"
    callbacks = [
        {"class_path": f"{__name__}.TrainingRecorder", "init_args": {"path": str(record)}},
        {
            "class_path": f"{__name__}.EpochCheckpoint",
            "init_args": {"path": str(interrupted), "key": args},
        },
    ]
    command = [sys.executable, "-m", "lovasz_monai.cli", "fit", *args]
    command += ["--trainer.strategy=ddp", f"--trainer.devices={processes}"]
    command += [f"--trainer.callbacks={json.dumps(callbacks)}"]
    if continued:
        command += [f"--ckpt_path={interrupted}"]
    command += ["--trainer.enable_progress_bar=false"]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    with open(run_dir / "fit.log", "a") as log:  # a continued training adds to the log
        log.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(
            f"DDP training failed ({shlex.join(command)}):\n{(done.stdout + done.stderr)[-4000:]}"
        )
    return TrainingRecorder.read(record)


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
    meaningful on a shared machine where the times of whole runs are not. Fine-tuning recipes
    (``ce_to_lovasz``, ``dicece_to_lovasz_ce``) are timed in their final phase.

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
        model.objective.warmup_loss = None  # a fine-tuning recipe is timed in its final phase
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
