"""Tensor math of the Lovász extension of the Jaccard loss (Berman et al., CVPR 2018).

Everything here is plain PyTorch: no MONAI, no Lightning. Tensors are organised in *rows*: one row
is the set of voxels of one class in one volume (or in the whole batch). For a row with errors
``e_i >= 0``, foreground indicators ``y_i`` and validity flags ``v_i`` the Lovász extension is
``sum_i e_i * w_i`` where ``w`` is the gradient of Algorithm 1 of the paper scattered back to voxel
order. The weights are computed without autograd, so the gradient of the loss with respect to the
errors is exactly ``w`` and backward keeps a single tensor.

Modules, from the inside out:

- :mod:`~lovasz_monai.functional.arguments`: defaults and :class:`LovaszSettings`, the one check
  of the shared settings;
- :mod:`~lovasz_monai.functional.targets`: label maps, one-hot targets, ignore labels and masks
  to foreground and validity;
- :mod:`~lovasz_monai.functional.rows`: Algorithm 1 and the weights of class rows by sorting or
  from a histogram (all-reduced across processes with ``distributed=True``);
- :mod:`~lovasz_monai.functional.extension`: the extension of ``(N, P)`` rows of errors;
- :mod:`~lovasz_monai.functional.class_losses`: per (volume, class) losses of ``(B, C, *S)``
  tensors, the class selection and the class means;
- :mod:`~lovasz_monai.functional.lovasz`: ``lovasz_softmax`` and ``lovasz_hinge``.
"""

from lovasz_monai.functional.arguments import (
    DEFAULT_BINS,
    DEFAULT_CHUNK_ELEMENTS,
    LovaszSettings,
    Method,
    check_binary,
    check_class_weight,
    check_count,
    check_finite,
    check_ignore_index,
    check_lovasz_arguments,
    check_probabilities,
    collective_check,
    distributed_world_size,
    integer_or_none,
)
from lovasz_monai.functional.class_losses import (
    ClassSelection,
    average_class_losses,
    class_weights,
    lovasz_class_losses,
    lovasz_hinge_class_losses,
    lovasz_probability_class_losses,
    select_classes,
)
from lovasz_monai.functional.extension import lovasz_extension, lovasz_weights
from lovasz_monai.functional.lovasz import lovasz_hinge, lovasz_softmax
from lovasz_monai.functional.rows import lovasz_grad
from lovasz_monai.functional.targets import decode_target, dtype_holds, label_equals

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_CHUNK_ELEMENTS",
    "ClassSelection",
    "LovaszSettings",
    "Method",
    "average_class_losses",
    "check_binary",
    "check_class_weight",
    "check_count",
    "check_finite",
    "check_ignore_index",
    "check_lovasz_arguments",
    "check_probabilities",
    "class_weights",
    "collective_check",
    "decode_target",
    "distributed_world_size",
    "dtype_holds",
    "integer_or_none",
    "label_equals",
    "lovasz_class_losses",
    "lovasz_extension",
    "lovasz_grad",
    "lovasz_hinge",
    "lovasz_hinge_class_losses",
    "lovasz_probability_class_losses",
    "lovasz_softmax",
    "lovasz_weights",
    "select_classes",
]
