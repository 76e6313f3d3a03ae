"""Writing predictions as NIfTI files in the input image's space: :func:`save_prediction` and the
Lightning callback :class:`NiftiPredictionWriter` that uses it."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import MetaTensor, decollate_batch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info

from lovasz_monai.case_names import nifti_stem, repeated_names_root

__all__ = ["NiftiPredictionWriter", "prediction_dtype", "prediction_path", "save_prediction"]

#: integer dtypes :func:`prediction_dtype` chooses from, smallest first
_INTEGER_DTYPES = (np.uint8, np.uint16, np.int16, np.int32, np.int64)


def prediction_dtype(array: np.ndarray | torch.Tensor) -> np.dtype:
    """The NIfTI voxel dtype that holds every value of a prediction exactly.

    Integer values (of any dtype, float included) get the smallest of uint8, uint16, int16,
    int32 and int64 that holds their range: a label map with classes ``0..255`` stays uint8, a
    class 300 needs uint16. Bools become uint8. Anything else (probabilities, NaN) is floating
    point: float64 for float64 data, float32 otherwise.

    Args:
        array: the prediction, any shape.

    Returns:
        The numpy dtype.

    Example:
        >>> prediction_dtype(np.array([0, 2, 255])), prediction_dtype(np.array([0.0, 300.0]))
        (dtype('uint8'), dtype('uint16'))
        >>> prediction_dtype(np.array([-1, 4])), prediction_dtype(torch.tensor([0.0, 0.7]))
        (dtype('int16'), dtype('float32'))
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.size == 0 or array.dtype == np.bool_:
        return np.dtype(np.uint8)
    integral = array.dtype.kind in "iu"
    if array.dtype.kind == "f" and bool(np.isfinite(array).all()):
        integral = bool((array == np.round(array)).all())
    if integral:
        lo, hi = array.min(), array.max()
        for dtype in _INTEGER_DTYPES:
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dtype)
    return np.dtype(np.float64 if array.dtype == np.float64 else np.float32)


def _cast_exactly(array: np.ndarray, dtype: Any, source: str) -> np.ndarray:
    """``array`` as ``dtype``, refusing a dtype that changes a value (wrap-around, rounding,
    overflow)."""
    dtype = np.dtype(dtype)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN or inf cast to an integer
        out = array.astype(dtype)
        back = out.astype(array.dtype)
    same = (back == array) | (
        np.isnan(array) & np.isnan(back) if array.dtype.kind == "f" else False
    )
    if not bool(np.all(same)):
        value, written = array[~same].flat[0], out[~same].flat[0]  # numpy scalars: str is short
        raise ValueError(
            f"dtype {dtype.name} cannot hold the value {value!s} of the prediction of {source} "
            f"(it would be written as {written!s}); pass dtype=None to "
            f"choose one from the data ({prediction_dtype(array).name} here)."
        )
    return out


def _source(pred: torch.Tensor) -> str:
    """The file a prediction was made from (meta ``"filename_or_obj"``), else ``"prediction"``."""
    if isinstance(pred, MetaTensor):
        return str(pred.meta.get("filename_or_obj") or "prediction")
    return "prediction"


def prediction_path(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    postfix: str = "",
    data_root_dir: str | os.PathLike | None = None,
) -> Path:
    """The file :func:`save_prediction` writes for an input image ``source``.

    ``<output_dir>/<stem><postfix>.nii.gz``; with ``data_root_dir`` (as in MONAI's
    ``SaveImage``) the folders of ``source`` below ``data_root_dir`` are kept:
    ``<output_dir>/<folders>/<stem><postfix>.nii.gz``.

    Raises:
        ValueError: ``source`` is not inside ``data_root_dir``.

    Example:
        >>> str(prediction_path("k/case_1/imaging.nii.gz", "out", "_seg"))
        'out/imaging_seg.nii.gz'
        >>> str(prediction_path("k/case_1/imaging.nii.gz", "out", data_root_dir="k"))
        'out/case_1/imaging.nii.gz'
    """
    path = Path(output_dir)
    if data_root_dir is not None:
        folder = os.path.dirname(os.path.abspath(source))
        root = os.path.abspath(data_root_dir)
        if os.path.commonpath([folder, root]) != root:
            raise ValueError(
                f"{source} is not inside data_root_dir {data_root_dir}: the folders below "
                "data_root_dir are kept in the output path"
            )
        relative = os.path.relpath(folder, root)
        if relative != os.curdir:
            path = path / relative
    return path / f"{nifti_stem(source)}{postfix}.nii.gz"


def save_prediction(
    pred: torch.Tensor,
    output_dir: str | os.PathLike,
    postfix: str = "",
    dtype: Any = None,
    data_root_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a prediction as NIfTI with its affine, named after the image it was made from.

    Use it on the output of
    :meth:`~lovasz_monai.data.SegmentationDataModule.invert_prediction`, which carries the
    input image's affine and file name, so the written file matches the input's shape and affine.
    An existing file of that name is replaced; :class:`NiftiPredictionWriter` refuses to write two
    images to one file in a run.

    Args:
        pred: ``(1, *spatial)`` label map, or ``(C, *spatial)`` (written as a 4D file with the
            channels last). A ``MetaTensor`` gives the affine and the file name (meta
            ``"filename_or_obj"``); otherwise the identity affine and ``"prediction"``.
        output_dir: folder to write to (created if needed).
        postfix: added to the input file name's stem, e.g. ``"_seg"`` -> ``case_000_seg.nii.gz``;
            by default the name equals the input's (the nnU-Net convention).
        dtype: numpy dtype of the written voxels; ``None`` (default) chooses it from the values
            (:func:`prediction_dtype`: uint8 for classes up to 255, uint16 above, float32 for
            probabilities). A dtype that cannot hold every value exactly is refused.
        data_root_dir: keep the input's folders below this folder in the output path, as
            MONAI's ``SaveImage`` does: the input ``data_root_dir/case_1/imaging.nii.gz`` is
            written to ``output_dir/case_1/imaging.nii.gz`` (:func:`prediction_path`).

    Returns:
        The path written.

    Raises:
        ValueError: ``pred`` has fewer than 2 dimensions; ``dtype`` cannot hold a value of
            ``pred`` (a class 300 or a probability 0.7 in uint8; the message names the value
            and the dtype); the input is not inside ``data_root_dir``.

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
    source = _source(pred)
    if isinstance(pred, MetaTensor):
        affine = np.asarray(pred.affine.detach().cpu().numpy(), dtype=np.float64)
    else:
        affine = np.eye(4)
    path = prediction_path(source, output_dir, postfix, data_root_dir)
    if dtype is None:  # exact by construction
        data = array.astype(prediction_dtype(array), copy=False)
    else:
        data = _cast_exactly(array, dtype, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine, dtype=data.dtype)
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
    shape and affine (qform and sform), voxels of the smallest dtype that holds the values
    (:func:`prediction_dtype`: uint8 for classes up to 255, uint16 above; a label map should
    therefore arrive as an integer or integral float tensor holding the true class values). A
    label map becomes a 3D file; multi-label regions become one 4D file ``(X, Y, Z, R)`` with the
    regions last, in the order of the model's ``class_names``. Without ``invert_prediction`` on
    the datamodule, the prediction is written on the network's grid with the affine the image has
    after its transforms (still correctly placed in world coordinates, but not the input's voxel
    grid).

    **Images with the same base name** in different folders (KiTS:
    ``case_00000/imaging.nii.gz``, ``case_00001/imaging.nii.gz``) are not written to one file:
    as in MONAI's ``SaveImage``, ``data_root_dir`` keeps each image's folders below it in the
    output path (``<output_dir>/case_00000/imaging.nii.gz``). Without ``data_root_dir``, the
    writer looks at the datamodule's ``predict_files`` when prediction starts: when base names
    repeat there, their common folder is used as ``data_root_dir``; when they are all different
    the files go flat into ``output_dir`` (the nnU-Net convention). Should two images of a run
    still map to one file (e.g. ``a.nii`` and ``a.nii.gz`` in one folder, images without a file
    name, or a datamodule without ``predict_files``), the writer raises instead of overwriting.
    Under DDP each process sees only its own share while it writes, so only the check of
    ``predict_files`` at the start covers images of different processes.

    ``LovaszCLI`` always adds this callback (options ``--prediction_writer.output_dir``,
    ``--prediction_writer.postfix`` and ``--prediction_writer.data_root_dir``); it acts in
    ``predict`` only. With DDP every process writes the images of its own share (Lightning's
    predict sampler does not repeat images).

    Args:
        output_dir: folder for the files (created when needed); ``None``:
            ``<trainer.default_root_dir>/predictions``.
        postfix: added to the file stem, e.g. ``"_seg"`` -> ``case_000_seg.nii.gz``; default
            ``""`` keeps the input's name (the nnU-Net convention).
        data_root_dir: keep the input images' folders below this folder in the output paths
            (:func:`prediction_path`); ``None``: only where base names repeat (see above).

    Attributes:
        written: paths written by this process, in order.

    Raises:
        ValueError: in ``predict``, when a batch has no ``"image"`` ``MetaTensor``, the number
            of predictions and images differ, two images of the run would be written to one
            file (the message names both images and the file), or an image is not inside
            ``data_root_dir``.

    Example:
        >>> writer = NiftiPredictionWriter("runs/demo/predictions")
        >>> trainer = pl.Trainer(callbacks=[writer])  # doctest: +SKIP
        >>> trainer.predict(model, datamodule=dm, return_predictions=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        output_dir: str | None = None,
        postfix: str = "",
        data_root_dir: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.postfix = postfix
        self.data_root_dir = data_root_dir
        self.written: list[Path] = []
        self._root: str | None = data_root_dir
        self._sources: dict[Path, str] = {}

    def resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        """The folder predictions go to (``output_dir`` or ``<default_root_dir>/predictions``)."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.default_root_dir) / "predictions"

    def _claim(self, path: Path, source: str) -> None:
        """Record that ``source`` goes to ``path``; raise if an image of this run went there
        (another one, one without a file name, or the same image listed twice)."""
        key = Path(os.path.abspath(path))
        other = self._sources.get(key)
        if other is not None:
            raise ValueError(
                f"NiftiPredictionWriter: {source} and {other} would both be written to {path}; "
                "set data_root_dir (--prediction_writer.data_root_dir) to a folder above both "
                "to keep their folders in the output paths, give them different file names, or "
                "list each image once."
            )
        self._sources[key] = source

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.written = []
        self._sources = {}
        self._root = self.data_root_dir
        files = getattr(trainer.datamodule, "predict_files", None) or []
        sources = [f.get("image") if isinstance(f, dict) else f for f in files]
        sources = [os.fspath(s) for s in sources if isinstance(s, (str, os.PathLike))]
        if self._root is None and sources:
            self._root = repeated_names_root(sources)
        # fail before predicting when two images of the run would share a file
        output_dir = self.resolve_output_dir(trainer)
        for source in sources:
            self._claim(prediction_path(source, output_dir, self.postfix, self._root), source)
        self._sources = {}

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
            source = _source(out)
            self._claim(prediction_path(source, output_dir, self.postfix, self._root), source)
            self.written.append(save_prediction(out, output_dir, self.postfix, None, self._root))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        where = f" (rank 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
        rank_zero_info(
            f"NiftiPredictionWriter: wrote {len(self.written)} file(s){where} to "
            f"{os.path.abspath(self.resolve_output_dir(trainer))}"
        )
