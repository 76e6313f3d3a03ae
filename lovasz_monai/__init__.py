"""Lovász-Softmax / Lovász-hinge losses for MONAI, and a Lightning stack to train with them."""

from lovasz_monai.losses import LovaszCELoss, LovaszHingeLoss, LovaszSoftmaxLoss

__version__ = "0.2.0"

__all__ = ["LovaszCELoss", "LovaszHingeLoss", "LovaszSoftmaxLoss", "__version__"]
