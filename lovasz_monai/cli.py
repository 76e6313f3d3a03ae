"""``lovasz-monai``: the LightningCLI for :class:`~lovasz_monai.module.LovaszSegmentationModule`.

Usage (see ``lovasz-monai fit --help`` for every option)::

    lovasz-monai fit --config configs/demo.yaml
    lovasz-monai fit --config configs/demo.yaml --ckpt_path last --trainer.max_epochs 40
    lovasz-monai validate --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/best.ckpt
    lovasz-monai test --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/best.ckpt
    lovasz-monai predict --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/best.ckpt \\
        --prediction_writer.output_dir runs/demo/predictions

What the CLI adds to a plain ``LightningCLI(LovaszSegmentationModule, SegmentationDataModule)``:

* ``trainer.precision: auto`` (the default): ``bf16-mixed`` on CUDA with bf16 and on CPUs
  with native bf16, ``16-mixed`` on other CUDA devices, ``32-true`` elsewhere
  (:mod:`lovasz_monai.precision`); printed once and saved in the run's ``config.yaml``. A
  pinned bf16 precision on a CPU that emulates bf16 gets a warning;
* links: ``data.num_classes``, ``data.class_names``, ``data.in_channels`` and
  ``data.multi_label`` (read from ``dataset.json`` when the datamodule is built) ->
  ``model.*``; ``data.roi_size`` -> ``model.roi_size`` (the sliding-window size);
* a ``model.network`` given by ``class_path`` (e.g. ``configs/networks/dynunet.yaml``) gets
  ``in_channels`` and ``out_channels`` from the dataset (``out_channels`` from
  ``model.out_channels`` when set, e.g. 1 for the binary hinge), so one network file serves
  every dataset;
* ``checkpoint`` (a ``ModelCheckpoint``, always present): best ``val/mIoU`` (mode max) as
  ``best.ckpt`` plus ``last.ckpt``, in ``<trainer.default_root_dir>/checkpoints`` unless
  ``--checkpoint.dirpath`` is given; a fixed folder, so ``--ckpt_path last`` resumes;
* ``prediction_writer`` (a :class:`~lovasz_monai.writer.NiftiPredictionWriter`, always present):
  ``predict`` writes one NIfTI file per input image, named after it; images of the same file
  name in different folders keep their folders (``--prediction_writer.data_root_dir`` sets the
  root explicitly);
* loggers: with ``trainer.logger`` left at its default, a ``CSVLogger``
  (``<default_root_dir>/csv/version_N/metrics.csv``) and, when ``tensorboard`` is importable, a
  ``TensorBoardLogger`` (``<default_root_dir>/tensorboard/version_N``). Loggers listed in a
  config are used as given, except that a ``TensorBoardLogger`` is dropped, with a warning, when
  tensorboard is not installed;
* ``predict`` does not keep the predictions in memory (``--return_predictions`` defaults to
  false): the writer has written them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import warnings
from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn

from lovasz_monai.data import SegmentationDataModule
from lovasz_monai.dataset import describe_dataset
from lovasz_monai.hparams import modules_from_config
from lovasz_monai.module import LovaszSegmentationModule
from lovasz_monai.precision import LovaszTrainer, resolve_and_report
from lovasz_monai.writer import NiftiPredictionWriter

__all__ = ["LovaszCLI", "default_loggers", "main"]


def _tensorboard_available() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def default_loggers(save_dir: str | os.PathLike) -> list[Logger]:
    """The CLI's default loggers: CSV always, TensorBoard when tensorboard is importable.

    Args:
        save_dir: root folder; logs go to ``save_dir/csv/version_N`` and
            ``save_dir/tensorboard/version_N``.

    Example:
        >>> [type(lg).__name__ for lg in default_loggers("runs/x")][0]
        'CSVLogger'
    """
    loggers: list[Logger] = [CSVLogger(save_dir=save_dir, name="csv")]
    if _tensorboard_available():
        loggers.append(TensorBoardLogger(save_dir=save_dir, name="tensorboard"))
    return loggers


def _is_tensorboard(value: Any) -> bool:
    path = value.get("class_path", "") if isinstance(value, (Namespace, dict)) else ""
    return isinstance(path, str) and path.endswith("TensorBoardLogger")


def _set_network_channels(config: Namespace) -> None:
    """Give a ``model.network`` configured by ``class_path`` the dataset's channels.

    ``in_channels`` = the dataset's image channels, ``out_channels`` = ``model.out_channels``
    or the dataset's classes/regions, from the :func:`~lovasz_monai.dataset.describe_dataset` of
    ``config.data``; each is set only when the network's constructor has a parameter of that
    name. (A Lightning instantiation link into ``model.network.init_args`` would fail whenever
    ``model.network`` is left unset.)

    Raises:
        FileNotFoundError, ValueError: a missing or malformed ``dataset.json``, as the
            datamodule would raise them a moment later.
    """
    network = config.model.get("network")
    if not isinstance(network, Namespace) or network.get("class_path") is None:
        return
    module_name, _, class_name = str(network.class_path).rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module_name), class_name)).parameters
    wanted = {"in_channels", "out_channels"} & set(params)
    if not wanted:
        return
    data = config.data
    description = describe_dataset(
        data.data_dir,
        data.get("synthetic", False),
        data.get("synthetic_kwargs"),
        ignore_index=data.get("ignore_index"),
        regions=data.get("regions"),
    )
    if network.get("init_args") is None:
        network.init_args = Namespace()
    channels = {
        "in_channels": description.in_channels,
        "out_channels": config.model.get("out_channels") or description.num_classes,
    }
    for name in wanted:
        network.init_args[name] = channels[name]


class LovaszCLI(LightningCLI):
    """LightningCLI over :class:`LovaszSegmentationModule` and :class:`SegmentationDataModule`.

    Subcommands ``fit``, ``validate``, ``test`` and ``predict``; see the module docstring for
    the argument links, the checkpoint, writer and logger defaults.

    Args:
        args: arguments to parse instead of ``sys.argv[1:]`` (a list of strings, or a dict).
        run: run the subcommand (False: only instantiate model, data and trainer).
        **kwargs: further ``LightningCLI`` arguments (e.g. ``save_config_kwargs``).

    Raises:
        SystemExit: on ``--help``, ``--print_config`` and parse errors (jsonargparse).

    Example:
        >>> LovaszCLI(["fit", "--config", "configs/demo.yaml"])  # doctest: +SKIP
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": "Lovász-loss 3D segmentation"})
        kwargs.setdefault("trainer_class", LovaszTrainer)
        super().__init__(
            LovaszSegmentationModule,
            SegmentationDataModule,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/mIoU",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(NiftiPredictionWriter, "prediction_writer")
        parser.link_arguments("data.roi_size", "model.roi_size")
        for name in ("num_classes", "class_names", "in_channels", "multi_label"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        precision = config.trainer.get("precision")
        if precision in (None, "auto"):  # resolved here, so the saved config.yaml holds it
            config.trainer.precision = resolve_and_report(precision, config.trainer.accelerator)
        _set_network_channels(config)
        root = config.trainer.get("default_root_dir") or os.getcwd()
        if config.checkpoint.get("dirpath") is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        logger = config.trainer.get("logger")
        if not _tensorboard_available() and logger not in (None, True, False):
            entries = logger if isinstance(logger, list) else [logger]
            kept = [e for e in entries if not _is_tensorboard(e)]
            if len(kept) != len(entries):
                rank_zero_warn("tensorboard is not installed: TensorBoardLogger dropped")
                config.trainer.logger = kept or False
        # the CLI's optimizer section replaces the module's default configure_optimizers
        warnings.filterwarnings("ignore", message=".*configure_optimizers` will be overridden.*")

    def instantiate_classes(self) -> None:
        """LightningCLI's instantiation, with the model keeping its configured ``network`` and
        losses (``class_path`` dicts) in its hparams
        (:func:`~lovasz_monai.hparams.modules_from_config`)."""
        with modules_from_config():
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """LightningCLI's Trainer, given the default loggers when ``trainer.logger`` is left
        unset; with ``trainer.enable_checkpointing: false`` the ``checkpoint`` callback is
        replaced by a no-op callback (the Trainer rejects a ``ModelCheckpoint`` then)."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = {**config.get("trainer", {}), **kwargs}
        if trainer.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(trainer.get("default_root_dir") or os.getcwd())
        if trainer.get("enable_checkpointing") is False:
            config["checkpoint"] = Callback()
        return super().instantiate_trainer(**kwargs)

    def predict(self, model: Any, datamodule: Any = None, **kwargs: Any) -> Any:
        """``trainer.predict`` with ``return_predictions=False`` unless asked for."""
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        return self.trainer.predict(model, datamodule=datamodule, **kwargs)


def main(args: Any = None) -> None:
    """Console entry point ``lovasz-monai``.

    Args:
        args: arguments instead of ``sys.argv[1:]``.

    Example:
        >>> main(["fit", "--config", "configs/demo.yaml"])  # doctest: +SKIP

    Raises:
        SystemExit: on ``--help``, ``--print_config`` and parse errors (jsonargparse), e.g. a
            missing subcommand or config file. Errors of the run itself (building the data
            module, training) propagate unchanged.
    """
    LovaszCLI(args=args)


if __name__ == "__main__":
    main()
