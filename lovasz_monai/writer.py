"""Lightning callback that writes ``predict`` outputs as NIfTI files in the input image's space."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import MetaTensor, decollate_batch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info

from lovasz_monai.data import save_prediction

__all__ = ["NiftiPredictionWriter"]


class NiftiPredictionWriter(BasePredictionWriter):
    """Write each predicted volume as a NIfTI file named like its input image.

    For every item of a predict batch, the prediction (``(1, *S)`` label map, or ``(R, *S)``
    0/1 regions in multi-label mode, as returned by
    :meth:`~lovasz_monai.module.LovaszSegmentationModule.predict_step`) is mapped back to the
    original image grid with the datamodule's ``invert_prediction`` (undoing orientation and
    resampling; nearest neighbour) and written with
    :func:`~lovasz_monai.data.save_prediction`: same base file name as the input, the input's
    shape and affine (qform and sform), uint8 voxels. A label map becomes a 3D file; multi-label
    regions become one 4D file ``(X, Y, Z, R)`` with the regions last, in the order of the
    model's ``class_names``. Without ``invert_prediction`` on the datamodule, the prediction is
    written on the network's grid with the affine the image has after its transforms (still
    correctly placed in world coordinates, but not the input's voxel grid).

    ``LovaszCLI`` always adds this callback (options ``--prediction_writer.output_dir`` and
    ``--prediction_writer.postfix``); it acts in ``predict`` only. With DDP every process writes
    the images of its own share (Lightning's predict sampler does not repeat images).

    Args:
        output_dir: folder for the files (created when needed); ``None``:
            ``<trainer.default_root_dir>/predictions``.
        postfix: added to the file stem, e.g. ``"_seg"`` -> ``case_000_seg.nii.gz``; default
            ``""`` keeps the input's name (the nnU-Net convention).

    Attributes:
        written: paths written by this process, in order.

    Raises:
        ValueError: in ``predict``, when a batch has no ``"image"`` ``MetaTensor`` or the number
            of predictions and images differ.

    Example:
        >>> writer = NiftiPredictionWriter("runs/demo/predictions")
        >>> trainer = pl.Trainer(callbacks=[writer])  # doctest: +SKIP
        >>> trainer.predict(model, datamodule=dm, return_predictions=False)  # doctest: +SKIP
    """

    def __init__(self, output_dir: str | None = None, postfix: str = "") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.postfix = postfix
        self.written: list[Path] = []

    def resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        """The folder predictions go to (``output_dir`` or ``<default_root_dir>/predictions``)."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.default_root_dir) / "predictions"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.written = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        image = batch.get("image") if isinstance(batch, dict) else None
        if not isinstance(image, MetaTensor):
            raise ValueError(
                "NiftiPredictionWriter needs predict batches with an 'image' MetaTensor (the "
                f"image's metadata gives the file name and affine), got {type(image).__name__}"
            )
        images = decollate_batch(image.detach().cpu())
        preds = list(torch.as_tensor(prediction).detach().cpu())
        if len(preds) != len(images):
            raise ValueError(f"got {len(preds)} predictions for a batch of {len(images)} images")
        output_dir = self.resolve_output_dir(trainer)
        invert = getattr(trainer.datamodule, "invert_prediction", None)
        for pred, img in zip(preds, images, strict=True):
            if callable(invert):
                out = invert(pred, img)
            else:
                out = MetaTensor(pred, affine=img.affine, meta=dict(img.meta))
            self.written.append(save_prediction(out, output_dir, self.postfix, dtype=np.uint8))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        where = f" (rank 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
        rank_zero_info(
            f"NiftiPredictionWriter: wrote {len(self.written)} file(s){where} to "
            f"{os.path.abspath(self.resolve_output_dir(trainer))}"
        )
