"""``python -m lovasz_monai.experiments``: runs :mod:`lovasz_monai.tools.experiments`.

The loss comparison lives in :mod:`lovasz_monai.tools.experiments`; this module keeps the command
and the old import paths working, including the ``class_path``
``lovasz_monai.experiments.MaskedDiceCELoss`` of configs and checkpoints written before the loss
moved to :mod:`lovasz_monai.losses`.
"""

from lovasz_monai.losses import MaskedDiceCELoss
from lovasz_monai.tools.experiments import *  # noqa: F403
from lovasz_monai.tools.experiments import __all__ as _tool_names
from lovasz_monai.tools.experiments import main

__all__ = [*_tool_names, "MaskedDiceCELoss"]

if __name__ == "__main__":
    main()
