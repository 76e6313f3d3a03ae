"""The loss recipes that ``compare`` knows (:data:`LOSSES`) and the warm-up schedule."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from lovasz_monai.dataset import DatasetDescription

__all__ = [
    "DEFAULT_LOSSES",
    "DEFAULT_MAX_EPOCHS",
    "DEFAULT_OVERRIDES",
    "LOSSES",
    "LossSpec",
    "class_voxel_counts",
    "inverse_frequency_weights",
    "schedule_epochs",
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
    the LovaszCLI (``class_path`` dicts for modules). ``class_weighted`` names the ``init_args``
    of ``model["loss"]`` that receive the :func:`inverse_frequency_weights` of the training
    labels.
    """

    description: str
    model: Callable[[int, int, int], dict[str, Any]]
    class_weighted: tuple[str, ...] = ()


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
        "LovaszCELoss(to_onehot_y=True, lambda_ce=1.0): Lovász + CE with equal weights",
        lambda e, w, r: {
            "loss": _lovasz("LovaszCELoss", lambda_ce=1.0),
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
        "LovaszCELoss(to_onehot_y=True, lambda_ce=1.0, batch=True)",
        lambda e, w, r: {
            "loss": _lovasz("LovaszCELoss", lambda_ce=1.0, batch=True),
            **_NO_SCHEDULE,
        },
    ),
    "lovasz_ce_nobg": LossSpec(
        "LovaszCELoss(to_onehot_y=True, lambda_ce=1.0, include_background=False): class weight 0 "
        "on the background in the Lovász mean",
        lambda e, w, r: {
            "loss": _lovasz("LovaszCELoss", lambda_ce=1.0, include_background=False),
            **_NO_SCHEDULE,
        },
    ),
    "lovasz_ce_lowce": LossSpec(
        "LovaszCELoss(to_onehot_y=True, lambda_ce=0.3): more Lovász in the balance",
        lambda e, w, r: {"loss": _lovasz("LovaszCELoss", lambda_ce=0.3), **_NO_SCHEDULE},
    ),
    "lovasz_ce_lowce_all": LossSpec(
        'LovaszCELoss(to_onehot_y=True, lambda_ce=0.3, classes="all"): absent classes count '
        "in the Lovász mean",
        lambda e, w, r: {
            "loss": _lovasz("LovaszCELoss", lambda_ce=0.3, classes="all"),
            **_NO_SCHEDULE,
        },
    ),
    "lovasz_ce_lowce_batch": LossSpec(
        "LovaszCELoss(to_onehot_y=True, lambda_ce=0.3, batch=True): one row per class over the "
        "batch",
        lambda e, w, r: {
            "loss": _lovasz("LovaszCELoss", lambda_ce=0.3, batch=True),
            **_NO_SCHEDULE,
        },
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
    "lovasz_ce_csf3": LossSpec(
        "lovasz_ce_csf with weight=[1, 3, 1, 1]: the first foreground class counts three times",
        lambda e, w, r: {
            "loss": _lovasz("LovaszCELoss", lambda_ce=0.3, weight=[1.0, 3.0, 1.0, 1.0]),
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
    "dicece_to_lovasz_ce": LossSpec(
        "Dice+CE (MaskedDiceCELoss) for the warm-up epochs, linear ramp, then "
        "LovaszCELoss(lambda_ce=0.3): Lovász fine-tuning of the strong baseline",
        lambda e, w, r: {
            "loss": _lovasz("LovaszCELoss", lambda_ce=0.3),
            "warmup_loss": {"class_path": "lovasz_monai.losses.MaskedDiceCELoss"},
            "warmup_epochs": w,
            "ramp_epochs": r,
        },
    ),
    "dicece_lovasz": LossSpec(
        "WeightedSumLoss([MaskedDiceCELoss(), LovaszSoftmaxLoss(to_onehot_y=True)]): the three "
        "terms Dice + CE + Lovász, each weight 1",
        lambda e, w, r: {
            "loss": {
                "class_path": "lovasz_monai.losses.WeightedSumLoss",
                "init_args": {
                    "terms": [{"class_path": "lovasz_monai.losses.MaskedDiceCELoss"}, _LOVASZ],
                },
            },
            **_NO_SCHEDULE,
        },
    ),
    "lovasz_ce_invfreq": LossSpec(
        "LovaszCELoss(to_onehot_y=True, lambda_ce=0.3) with inverse-frequency class weights "
        "(weight and ce_weight) from the training labels",
        lambda e, w, r: {"loss": _lovasz("LovaszCELoss", lambda_ce=0.3), **_NO_SCHEDULE},
        class_weighted=("weight", "ce_weight"),
    ),
    "dicece_invfreq": LossSpec(
        "MaskedDiceCELoss with inverse-frequency weights in the cross-entropy (ce_weight) from "
        "the training labels",
        lambda e, w, r: {
            "loss": {"class_path": "lovasz_monai.losses.MaskedDiceCELoss"},
            **_NO_SCHEDULE,
        },
        class_weighted=("ce_weight",),
    ),
    "lovasz_ce_highce": LossSpec(
        "LovaszCELoss(to_onehot_y=True, lambda_ce=3.0): more CE in the balance",
        lambda e, w, r: {"loss": _lovasz("LovaszCELoss", lambda_ce=3.0), **_NO_SCHEDULE},
    ),
}
"""The losses ``compare`` knows, by key."""


def _row_recipes() -> dict[str, LossSpec]:
    """The rows of the Lovász loss under DDP (issue 11), alone and with 0.3 x CE. All use the
    histogram method (the distributed loss needs it), so that only the set of voxels of a class
    row differs: a patch, this process's patches, or the patches of all processes."""
    rows = {
        "": ("each patch (volume)", {}),
        "_batch": ("the patches of this process (batch=True)", {"batch": True}),
        "_global": (
            "the patches of all processes (batch=True, distributed=True)",
            {"batch": True, "distributed": True},
        ),
    }
    recipes = {}
    for suffix, (where, init) in rows.items():
        recipes[f"lovasz_hist{suffix}"] = LossSpec(
            f"LovaszSoftmaxLoss(method='histogram'), one row per class over {where}",
            lambda e, w, r, init=init: {
                "loss": _lovasz("LovaszSoftmaxLoss", method="histogram", **init),
                **_NO_SCHEDULE,
            },
        )
        recipes[f"lovasz_ce_hist{suffix}"] = LossSpec(
            f"LovaszCELoss(lambda_ce=0.3, method='histogram'), one row per class over {where}",
            lambda e, w, r, init=init: {
                "loss": _lovasz("LovaszCELoss", lambda_ce=0.3, method="histogram", **init),
                **_NO_SCHEDULE,
            },
        )
    return recipes


LOSSES.update(_row_recipes())


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


def class_voxel_counts(description: DatasetDescription) -> list[int]:
    """Voxels of each class in the label files of the ``training`` cases (the ignore label and
    other values outside the classes left out).

    Args:
        description: a dataset of label maps (not regions).

    Returns:
        One count per class of ``description``.

    Example:
        >>> import tempfile
        >>> from lovasz_monai.synthetic import make_synthetic_dataset
        >>> root = make_synthetic_dataset(tempfile.mkdtemp(), num_cases=2, size=(12, 12, 12))
        >>> counts = class_voxel_counts(DatasetDescription.from_json(root))
        >>> len(counts), sum(counts) <= 2 * 12**3
        (3, True)

    Raises:
        ValueError: a dataset in multi-label (regions) mode.
    """
    if description.multi_label:
        raise ValueError(f"{description.root}: class voxel counts need label maps, not regions")
    num_classes = description.num_classes
    counts = np.zeros(num_classes, dtype=np.int64)
    for case in description.training:
        labels = np.asarray(nib.load(case["label"]).dataobj).astype(np.int64).ravel()
        counts += np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
    return counts.tolist()


def inverse_frequency_weights(data_dir: str | os.PathLike) -> list[float]:
    """Class weights ``1 / f_c`` from the label files of the ``training`` cases, scaled to mean
    1 over the classes that occur; ``f_c`` is class ``c``'s share of the labelled voxels
    (:func:`class_voxel_counts`). A class that never occurs gets weight 0.

    Args:
        data_dir: a dataset folder (``dataset.json``, MSD layout) of label maps.

    Returns:
        One weight per class of ``dataset.json``.

    Example:
        >>> import tempfile
        >>> from lovasz_monai.synthetic import make_synthetic_dataset
        >>> root = make_synthetic_dataset(tempfile.mkdtemp(), num_cases=2, size=(12, 12, 12))
        >>> weights = inverse_frequency_weights(root)
        >>> len(weights), round(sum(weights) / len(weights), 6), weights[0] < min(weights[1:])
        (3, 1.0, True)

    Raises:
        FileNotFoundError: no ``dataset.json`` (or a listed file is missing).
        ValueError: a dataset in multi-label (regions) mode, or one without labelled voxels.
    """
    counts = np.array(class_voxel_counts(DatasetDescription.from_json(data_dir)), dtype=np.int64)
    if not counts.any():
        raise ValueError(f"{data_dir}: the training labels hold no voxel of any class")
    inverse = np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0)
    return (inverse * (counts > 0).sum() / inverse.sum()).tolist()
