"""nnU-Net v2 trainers with the Lovász losses, found by nnU-Net's own commands.

Install with ``pip install "lovasz_monai[nnunet]"`` (nnunetv2 >= 2.8, which looks trainers up
in the folders of the ``nnUNet_extTrainer`` environment variable), then train with
``lovasz-nnunet-train DATASET 3d_fullres FOLD -tr nnUNetTrainerLovaszCE`` or, after
``export nnUNet_extTrainer="$(lovasz-nnunet-folder)"``, with ``nnUNetv2_train`` itself.

- :mod:`~lovasz_monai.nnunet.trainers`: the ``nnUNetTrainer`` subclasses and the loss each
  builds for nnU-Net's targets (label maps with an ignore label, regions with an ignore channel,
  deep supervision);
- :mod:`~lovasz_monai.nnunet.cli`: the folder to list in ``nnUNet_extTrainer`` and the
  ``lovasz-nnunet-train`` / ``lovasz-nnunet-predict`` wrappers.

nnunetv2 is imported in this subpackage only; importing it without nnunetv2 >= 2.8 raises an
``ImportError`` that names the installed version and the fix.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

#: the first nnunetv2 release that searches ``nnUNet_extTrainer`` for trainers
MIN_NNUNETV2 = "2.8"


def require_nnunetv2() -> str:
    """The installed nnunetv2 version, if it finds external trainers.

    Returns:
        The version string, e.g. ``"2.8.1"``.

    Raises:
        ImportError: nnunetv2 is missing, or older than :data:`MIN_NNUNETV2` (it would not look
            in ``nnUNet_extTrainer``); the message names the version found and the command
            that fixes it.
    """
    try:
        found = metadata.version("nnunetv2")
    except metadata.PackageNotFoundError:
        raise ImportError(
            "lovasz_monai.nnunet needs nnunetv2, which is not installed: "
            'pip install "lovasz_monai[nnunet]"'
        ) from None
    if Version(found) < Version(MIN_NNUNETV2):
        raise ImportError(
            f"lovasz_monai.nnunet needs nnunetv2 >= {MIN_NNUNETV2} (it finds trainers outside its "
            f"own source tree through nnUNet_extTrainer), found {found}: "
            f'pip install -U "nnunetv2>={MIN_NNUNETV2}"'
        )
    return found


require_nnunetv2()

from lovasz_monai.nnunet import trainers  # noqa: E402  (after the version check)
from lovasz_monai.nnunet.trainers import *  # noqa: E402, F403

__all__ = ["MIN_NNUNETV2", "require_nnunetv2", *trainers.__all__]
