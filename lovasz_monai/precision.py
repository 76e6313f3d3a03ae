"""Training precision chosen from the hardware: ``precision="auto"``.

Mixed precision is a speed-up only where the hardware computes half precision natively. On a
CPU without native bf16 kernels (e.g. AVX2-only, or AVX-512 without the BF16 extension) oneDNN
emulates bf16, and ``torch.autocast("cpu", dtype=torch.bfloat16)`` makes a 3D UNet training
step 15-46x *slower* than float32 (measured on a 2-core AMD EPYC with AVX2: MONAI UNet
16-32-64-128 on 2 x 1 x 64^3, 0.6 s in float32 against 27.5 s in bf16). ``"auto"`` resolves to:

* ``"bf16-mixed"`` on a CUDA device with bf16 support, and on a CPU with native bf16;
* ``"16-mixed"`` on a CUDA device without bf16 (e.g. V100, T4);
* ``"32-true"`` elsewhere (CPUs that emulate bf16, Apple MPS, other accelerators).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

__all__ = [
    "BF16_PRECISIONS",
    "LovaszTrainer",
    "cpu_has_native_bf16",
    "emulated_bf16_warning",
    "resolve_precision",
]

#: ``"auto"`` and the precision values that ``pytorch_lightning.Trainer`` documents
PrecisionInput = Literal[
    "auto",
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    "32",
    "16",
    "bf16",
    "64",
    32,
    16,
    64,
]

#: Lightning precision values that run bf16 kernels
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively in oneDNN (AVX-512 BF16 or AMX).

    Uses the check PyTorch's oneDNN backend itself makes, which also honours
    ``ONEDNN_MAX_CPU_ISA`` (e.g. ``ONEDNN_MAX_CPU_ISA=AVX2`` reports False on any CPU).

    Example:
        >>> isinstance(cpu_has_native_bf16(), bool)
        True
    """
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:  # oneDNN not built in
            return False
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def _device_kind(accelerator: Any) -> str:
    """``"cuda"``, ``"cpu"`` or ``"other"``: the hardware a Trainer ``accelerator`` runs on."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__
    name = (name or "auto").lower()
    if name == "auto":  # Lightning's "auto" picks CUDA, then MPS, then the CPU
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "other" if mps is not None and mps.is_available() else "cpu"
    if name == "gpu" or name.startswith("cuda"):
        return "cuda" if torch.cuda.is_available() else "other"
    return "cpu" if name.startswith("cpu") else "other"


def resolve_precision(precision: Any, accelerator: Any = "auto") -> Any:
    """The precision a Lightning ``Trainer`` should use: ``"auto"`` (or ``None``) resolved from
    the hardware that ``accelerator`` selects, any other value unchanged.

    Args:
        precision: a Lightning precision value (``"32-true"``, ``"bf16-mixed"``, ``16``, ...),
            ``"auto"`` or ``None`` (both mean "choose from the hardware").
        accelerator: the Trainer's ``accelerator`` (``"auto"``, ``"cpu"``, ``"gpu"``,
            ``"cuda"``, ``"mps"``, or an ``Accelerator`` instance).

    Returns:
        ``"bf16-mixed"``, ``"16-mixed"`` or ``"32-true"`` for ``"auto"``/``None`` (see the
        module docstring), otherwise ``precision`` as given.

    Example:
        >>> resolve_precision("16-mixed", "gpu")
        '16-mixed'
        >>> resolve_precision("auto", "cpu") in ("bf16-mixed", "32-true")
        True
    """
    if precision not in (None, "auto"):
        return precision
    kind = _device_kind(accelerator)
    if kind == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if kind == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


def emulated_bf16_warning(precision: Any, accelerator: Any = "auto") -> str | None:
    """A warning text when ``precision`` runs bf16 on a CPU that only emulates it, else None.

    Example:
        >>> emulated_bf16_warning("32-true", "cpu") is None
        True
    """
    if str(precision) not in BF16_PRECISIONS or _device_kind(accelerator) != "cpu":
        return None
    if cpu_has_native_bf16():
        return None
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    where = f" (ONEDNN_MAX_CPU_ISA={isa})" if isa else ""
    return (
        f"precision={precision!r} on a CPU without native bf16 kernels{where}: oneDNN emulates "
        "bf16 there, which made a 3D UNet training step 15-46x slower than float32 on an "
        "AVX2-only CPU (measured). Use --trainer.precision auto (picks 32-true here) or "
        "--trainer.precision 32-true."
    )


class LovaszTrainer(pl.Trainer):
    """A Lightning ``Trainer`` whose ``precision`` defaults to ``"auto"``.

    ``precision="auto"`` (or ``None``) is resolved by :func:`resolve_precision` from the
    ``accelerator``; any other value is passed on unchanged, with a warning when it runs bf16 on
    a CPU that emulates it. Every other argument is ``pytorch_lightning.Trainer``'s.

    Args:
        *args: positional arguments of ``pytorch_lightning.Trainer``.
        precision: ``"auto"`` or any Lightning precision value.
        **kwargs: keyword arguments of ``pytorch_lightning.Trainer``.

    Example:
        >>> trainer = LovaszTrainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        >>> trainer.precision == resolve_precision("auto", "cpu")
        True
    """

    def __init__(
        self,
        *args: Any,
        precision: PrecisionInput | None = "auto",
        **kwargs: Any,
    ) -> None:
        accelerator = kwargs.get("accelerator", "auto")
        precision = resolve_precision(precision, accelerator)
        message = emulated_bf16_warning(precision, accelerator)
        if message is not None:
            rank_zero_warn(message)
        super().__init__(*args, precision=precision, **kwargs)
