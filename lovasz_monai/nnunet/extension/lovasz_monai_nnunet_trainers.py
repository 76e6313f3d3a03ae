"""The Lovász trainers, for nnU-Net's search of the ``nnUNet_extTrainer`` folders."""

from lovasz_monai.nnunet.trainers import *  # noqa: F403
from lovasz_monai.nnunet.trainers import __all__  # noqa: F401
