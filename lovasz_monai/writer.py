"""Writing predictions as NIfTI files in the input image's space: :func:`save_prediction` and the
Lightning callback :class:`NiftiPredictionWriter` that uses it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import MetaTensor, decollate_batch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info

from lovasz_monai.dataset import nifti_stem

__all__ = ["NiftiPredictionWriter", "save_prediction"]


def save_prediction(
    pred: torch.Tensor,
    output_dir: str | os.PathLike,
    postfix: str = "",
    dtype: Any = np.uint8,
) -> Path:
    """Write a prediction as NIfTI with its affine, named after the image it was made from.

    Use it on the output of
    :meth:`~lovasz_monai.data.SegmentationDataModule.invert_prediction`, which carries the
    input image's affine and file name, so the written file matches the input's shape and affine.

    Args:
        pred: ``(1, *spatial)`` label map, or ``(C, *spatial)`` (written as a 4D file with the
            channels last). A ``MetaTensor`` gives the affine and the file name (meta
            ``"filename_or_obj"``); otherwise the identity affine and ``"prediction"``.
        output_dir: folder to write to (created if needed).
        postfix: added to the input file name's stem, e.g. ``"_seg"`` -> ``case_000_seg.nii.gz``;
            by default the name equals the input's (the nnU-Net convention).
        dtype: numpy dtype of the written voxels (``np.float32`` for probabilities).

    Returns:
        The path written.

    Raises:
        ValueError: ``pred`` has fewer than 2 dimensions.

    Example:
        >>> import tempfile, torch
        >>> from monai.data import MetaTensor
        >>> pred = MetaTensor(torch.ones(1, 4, 4, 4), meta={"filename_or_obj": "a/ct_1.nii.gz"})
        >>> save_prediction(pred, tempfile.mkdtemp(), postfix="_seg").name
        'ct_1_seg.nii.gz'
    """
    if pred.ndim < 2:
        raise ValueError(f"pred must be (C, *spatial), got shape {tuple(pred.shape)}.")
    array = pred.detach().cpu().numpy()
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    if isinstance(pred, MetaTensor):
        affine = np.asarray(pred.affine.detach().cpu().numpy(), dtype=np.float64)
        source = str(pred.meta.get("filename_or_obj") or "prediction")
    else:
        affine, source = np.eye(4), "prediction"
    name = nifti_stem(source)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}{postfix}.nii.gz"
    image = nib.Nifti1Image(array.astype(dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


class NiftiPredictionWriter(BasePredictionWriter):
    """Write each predicted volume as a NIfTI file named like its input image.

    For every item of a predict batch, the prediction (``(1, *S)`` label map, or ``(R, *S)``
    0/1 regions in multi-label mode, as returned by
    :meth:`~lovasz_monai.module.LovaszSegmentationModule.predict_step`) is mapped back to the
    original image grid with the datamodule's ``invert_prediction`` (undoing orientation and
    resampling; nearest neighbour) and written with
    :func:`save_prediction`: same base file name as the input, the input's
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
