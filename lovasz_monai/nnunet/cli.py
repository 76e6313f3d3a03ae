"""Commands that run nnU-Net's own entry points with the Lovász trainers findable.

- ``lovasz-nnunet-folder`` prints the folder to list in ``nnUNet_extTrainer``::

      export nnUNet_extTrainer="$(lovasz-nnunet-folder)"

- ``lovasz-nnunet-train`` and ``lovasz-nnunet-predict`` put that folder in front of the
  folders already listed in ``nnUNet_extTrainer`` (keeping them) and call ``nnUNetv2_train`` /
  ``nnUNetv2_predict`` with the arguments unchanged::

      lovasz-nnunet-train 4 3d_fullres 0 -tr nnUNetTrainerLovaszCE
      lovasz-nnunet-predict -i imagesTs -o predictions -d 4 -c 3d_fullres -f 0 \\
          -tr nnUNetTrainerLovaszCE

- ``lovasz-nnunet-convert`` writes an MSD-layout dataset (the Lightning stack's) in nnU-Net's
  raw format under ``$nnUNet_raw`` (:func:`~lovasz_monai.nnunet.convert.to_nnunet_raw`)::

      lovasz-nnunet-convert data/brain_tissue --id 501
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lovasz_monai import nnunet  # noqa: F401  (checks the nnunetv2 version first)

__all__ = [
    "check_trainer_lookup",
    "convert_main",
    "ext_trainer_value",
    "folder_main",
    "predict_main",
    "train_main",
    "trainer_folder",
]

#: the environment variable in which nnunetv2 >= 2.8 looks for trainer folders
EXT_TRAINER = "nnUNet_extTrainer"


def trainer_folder() -> Path:
    """The folder that holds the module nnU-Net imports to find the Lovász trainers.

    Example:
        >>> (trainer_folder() / "lovasz_monai_nnunet_trainers.py").is_file()
        True
    """
    return Path(__file__).resolve().parent / "extension"


def ext_trainer_value(environ: Mapping[str, str] = os.environ) -> str:
    """``nnUNet_extTrainer`` with :func:`trainer_folder` first and the folders already listed
    after it (once each, empty entries dropped).

    Args:
        environ: the environment to read (default: this process's).

    Example:
        >>> value = ext_trainer_value({"nnUNet_extTrainer": "/opt/my_trainers"})
        >>> value.split(os.pathsep) == [str(trainer_folder()), "/opt/my_trainers"]
        True
    """
    ours = str(trainer_folder())
    listed = [p for p in environ.get(EXT_TRAINER, "").split(os.pathsep) if p and p != ours]
    return os.pathsep.join([ours, *listed])


def check_trainer_lookup() -> None:
    """Check that nnU-Net's trainer lookup can run here.

    Before it looks in ``nnUNet_extTrainer``, nnU-Net imports every module of its own trainer
    folder; one of them (Primus) imports timm, which imports torchvision. A missing torchvision,
    or one built for another torch (PyPI's CUDA wheels next to a CPU torch), stops the lookup of
    any trainer that is not nnU-Net's own.

    Raises:
        SystemExit: torchvision does not import; the message says why and how to fix it.
    """
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # a broken build raises RuntimeError, not ImportError
        raise SystemExit(
            "nnU-Net's trainer lookup imports torchvision (through timm), which fails here: "
            f"{type(err).__name__}: {err}. Install the torchvision build of your torch, from "
            "the same index as torch (for a CPU torch: pip install torchvision --index-url "
            "https://download.pytorch.org/whl/cpu)."
        ) from err


def _run(entry_point: Callable[[], object]) -> None:
    check_trainer_lookup()
    os.environ[EXT_TRAINER] = ext_trainer_value()
    entry_point()


def folder_main() -> None:
    """``lovasz-nnunet-folder``: print :func:`trainer_folder`."""
    print(trainer_folder())


def train_main() -> None:
    """``lovasz-nnunet-train``: ``nnUNetv2_train`` with the Lovász trainers findable."""
    from nnunetv2.run.run_training import run_training_entry

    _run(run_training_entry)


def predict_main() -> None:
    """``lovasz-nnunet-predict``: ``nnUNetv2_predict`` with the Lovász trainers findable."""
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    _run(predict_entry_point)


def convert_main(argv: Sequence[str] | None = None) -> None:
    """``lovasz-nnunet-convert``: an MSD-layout dataset into nnU-Net's raw folder."""
    from lovasz_monai.nnunet.convert import to_nnunet_raw

    parser = argparse.ArgumentParser(prog="lovasz-nnunet-convert", description=__doc__)
    parser.add_argument("source", help="MSD-layout dataset.json or its folder")
    parser.add_argument("--id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    parser.add_argument("--name", help="dataset name (default: the source folder's name)")
    parser.add_argument(
        "--raw",
        default=os.environ.get("nnUNet_raw"),
        help="nnU-Net's raw folder (default: $nnUNet_raw)",
    )
    args = parser.parse_args(argv)
    if not args.raw:
        parser.error("set nnUNet_raw or pass --raw")
    print(to_nnunet_raw(args.source, args.raw, args.id, args.name))
