"""``python -m lovasz_monai.experiments``: the loss comparison of
:mod:`lovasz_monai.tools.experiments`.

Names once importable from here still resolve, with a ``DeprecationWarning`` that names their
home, including the ``class_path`` ``lovasz_monai.experiments.MaskedDiceCELoss`` of configs and
checkpoints written before the loss moved to :mod:`lovasz_monai.losses`.
"""

from __future__ import annotations

import importlib
import warnings

_RECIPES, _REPORT, _RUNS = (f"lovasz_monai.tools.{m}" for m in ("recipes", "report", "runs"))
#: old name -> the module that defines it
_MOVED = {
    "MaskedDiceCELoss": "lovasz_monai.losses",
    **dict.fromkeys(["compare", "main", "run_order"], "lovasz_monai.tools.experiments"),
    **dict.fromkeys(
        ["DEFAULT_LOSSES", "DEFAULT_MAX_EPOCHS", "DEFAULT_OVERRIDES", "LOSSES", "schedule_epochs"],
        _RECIPES,
    ),
    **dict.fromkeys(
        [
            "ComparisonResult",
            "RunResult",
            "aggregate",
            "format_mean_std",
            "markdown_table",
            "plot_comparison",
            "report",
            "write_results",
        ],
        _REPORT,
    ),  # fmt: skip
    **dict.fromkeys(["TrainingRecorder", "benchmark_steps", "evaluate", "run_one"], _RUNS),
}


def __getattr__(name: str) -> object:
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"lovasz_monai.experiments.{name} is deprecated: import it from {home}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)


if __name__ == "__main__":
    from lovasz_monai.tools.experiments import main

    main()
