"""``python -m lovasz_monai.experiments``: the loss comparison of
:mod:`lovasz_monai.tools.experiments`.

Names once importable from here still resolve, with a ``DeprecationWarning`` that names their
home, including the ``class_path`` ``lovasz_monai.experiments.MaskedDiceCELoss`` of configs and
checkpoints written before the loss moved to :mod:`lovasz_monai.losses`.
"""

from __future__ import annotations

import importlib
import warnings

#: where the names once importable from here live now
_HOMES = tuple(
    f"lovasz_monai.{m}"
    for m in ("losses", "tools.experiments", "tools.recipes", "tools.report", "tools.runs")
)


def __getattr__(name: str) -> object:
    for home in _HOMES:
        module = importlib.import_module(home)
        if name in module.__all__:
            warnings.warn(
                f"lovasz_monai.experiments.{name} is deprecated: import it from {home}",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from lovasz_monai.tools.experiments import main

    main()
