"""MONAI-style Lovász losses, with the argument names and tensor conventions of ``DiceLoss``.

- :mod:`~lovasz_monai.losses.base`: the two stages of the Lovász losses, ``prepare`` (checks and
  target decoding) and ``compute`` (class mean and reduction);
- :mod:`~lovasz_monai.losses.cross_entropy`: :func:`masked_cross_entropy`, the cross-entropy over
  the valid voxels of the combined losses, and :func:`masked_nll_loss`, the same from
  log-probabilities;
- :mod:`~lovasz_monai.losses.lovasz`: :class:`LovaszSoftmaxLoss` (softmax or sigmoid) and
  :class:`LovaszHingeLoss`;
- :mod:`~lovasz_monai.losses.combined`: :class:`LovaszCELoss` (Lovász + cross-entropy),
  :class:`MaskedDiceCELoss` (MONAI's Dice + cross-entropy with an ignore mask) and
  :class:`WeightedSumLoss` (a weighted sum of losses, such as Dice + CE + Lovász) and
  :func:`default_loss` (the recommended recipe).
"""

from lovasz_monai.losses.combined import (
    DEFAULT_LOSS_LAMBDA_CE,
    LovaszCELoss,
    MaskedDiceCELoss,
    WeightedSumLoss,
    default_loss,
)
from lovasz_monai.losses.cross_entropy import masked_cross_entropy, masked_nll_loss
from lovasz_monai.losses.lovasz import LovaszHingeLoss, LovaszSoftmaxLoss

__all__ = [
    "DEFAULT_LOSS_LAMBDA_CE",
    "LovaszCELoss",
    "LovaszHingeLoss",
    "LovaszSoftmaxLoss",
    "MaskedDiceCELoss",
    "WeightedSumLoss",
    "default_loss",
    "masked_cross_entropy",
    "masked_nll_loss",
]
