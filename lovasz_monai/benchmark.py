"""``python -m lovasz_monai.benchmark``: the benchmark of :mod:`lovasz_monai.tools.benchmark`.

Names once importable from here still resolve, with a ``DeprecationWarning`` that names their
home.
"""

from __future__ import annotations

import importlib
import sys
import warnings

_MEASURE = ("peak_memory_bytes", "time_fwd_bwd")


def __getattr__(name: str) -> object:
    home = "lovasz_monai.tools." + ("measure" if name in _MEASURE else "benchmark")
    module = importlib.import_module(home)
    if name.startswith("_") or not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"lovasz_monai.benchmark.{name} is deprecated: import it from {home}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)


if __name__ == "__main__":
    from lovasz_monai.tools.benchmark import main

    sys.exit(main())
