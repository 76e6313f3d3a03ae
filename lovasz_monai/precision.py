"""Training precision chosen from the hardware: ``precision="auto"``.

Mixed precision is a speed-up only where the hardware computes half precision natively. On a
CPU without native bf16 instructions (AVX-512 BF16 or AMX) oneDNN emulates bf16, and
``torch.autocast("cpu", dtype=torch.bfloat16)`` makes a 3D UNet training step many times
*slower* than float32 (15-46x measured on a 2-core AMD EPYC with AVX2 only; 9-29x with oneDNN
capped at AVX2 on a CPU that has AVX-512 BF16: ``benchmarks/RESULTS.md``). ``"auto"``
resolves to:

* ``"bf16-mixed"`` on a CUDA device that computes bf16 natively (Ampere and newer), and on a
  CPU with native bf16;
* ``"16-mixed"`` on other CUDA devices (e.g. V100, T4, which only emulate bf16);
* ``"32-true"`` elsewhere (CPUs that emulate bf16, Apple MPS, other accelerators).

Probing a CUDA device's bf16 support initialises CUDA in the calling process; with a
fork-based strategy (``ddp_fork``, ``ddp_notebook``) pin the precision instead of ``"auto"``.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = [
    "BF16_PRECISIONS",
    "LovaszTrainer",
    "PrecisionInput",
    "cpu_description",
    "cpu_has_native_bf16",
    "emulated_bf16_warning",
    "resolve_and_report",
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

#: tokens of oneDNN ISA names (``ONEDNN_MAX_CPU_ISA``) whose level includes bf16 instructions
_BF16_ISA_TOKENS = ("BF16", "AMX", "FP16", "AVX10", "ALL", "DEFAULT")


def _onednn_isa_cap() -> str | None:
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: it has AVX-512 BF16 or AMX, oneDNN can run bf16,
    and ``ONEDNN_MAX_CPU_ISA`` (if set) does not cap oneDNN below those instructions.

    AVX-512 alone is not enough: oneDNN accepts bf16 there (``avx512_core``) but emulates it.

    Example:
        >>> isinstance(cpu_has_native_bf16(), bool)
        True
    """
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        if check is not None and not check():
            return False
    except RuntimeError:  # oneDNN not built in
        return False
    cap = _onednn_isa_cap()
    if cap and not any(token in cap.upper() for token in _BF16_ISA_TOKENS):
        return False
    native = (
        getattr(torch.cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return any(bool(flag) for flag in native)


def cpu_description() -> str:
    """The CPU model, torch's vector ISA, and native bf16 (with an ``ONEDNN_MAX_CPU_ISA`` cap):
    what a benchmark table must say about the CPU it ran on.

    Example:
        >>> "native bf16" in cpu_description()
        True
    """
    model = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cap = _onednn_isa_cap()
    return (
        f"{model}, {os.cpu_count()} cores, ISA {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16 {cpu_has_native_bf16()}" + (f" (ONEDNN_MAX_CPU_ISA={cap})" if cap else "")
    )


def _cuda_native_bf16() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3: no emulation is counted
        return bool(torch.cuda.is_bf16_supported())


def _device_kind(accelerator: Any) -> str:
    """``"cuda"``, ``"cpu"`` or ``"other"``: the hardware a Trainer ``accelerator`` runs on
    (a name, an ``Accelerator`` instance, or a config's ``class_path``/``init_args`` mapping)."""
    if isinstance(accelerator, str) or accelerator is None:
        name = accelerator or "auto"
    elif hasattr(accelerator, "get") and accelerator.get("class_path"):
        name = str(accelerator.get("class_path")).rpartition(".")[2]
    else:
        name = type(accelerator).__name__
    name = name.lower()
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
            ``"cuda"``, ``"mps"``, an ``Accelerator`` instance, or its config mapping).

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
        return "bf16-mixed" if _cuda_native_bf16() else "16-mixed"
    if kind == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


def emulated_bf16_warning(precision: Any, accelerator: Any = "auto") -> str | None:
    """The warning for a pinned bf16 precision on a CPU that only emulates bf16.

    Args:
        precision: the Trainer's (resolved) precision.
        accelerator: the Trainer's ``accelerator``.

    Returns:
        The warning text, or None when ``precision`` is not bf16, the accelerator is not the
        CPU, or the CPU computes bf16 natively.

    Example:
        >>> emulated_bf16_warning("32-true", "cpu") is None
        True
    """
    if str(precision) not in BF16_PRECISIONS or _device_kind(accelerator) != "cpu":
        return None
    if cpu_has_native_bf16():
        return None
    return (
        f"precision={precision!r} on a CPU without native bf16 ({cpu_description()}): oneDNN "
        "emulates bf16 there, which made a 3D UNet training step 15-46x slower than float32 "
        "on an AVX2-only CPU (measured). Use --trainer.precision auto (picks 32-true here) or "
        "--trainer.precision 32-true."
    )


def resolve_and_report(precision: Any, accelerator: Any = "auto") -> Any:
    """:func:`resolve_precision`, printing the resolution of ``"auto"`` once (rank 0) and
    warning about a pinned bf16 precision on a CPU that emulates it.

    Example:
        >>> resolve_and_report("32-true", "cpu")
        '32-true'
    """
    resolved = resolve_precision(precision, accelerator)
    if precision in (None, "auto"):
        rank_zero_info(
            f"precision 'auto' resolved to '{resolved}' (accelerator '{_device_kind(accelerator)}'"
            f"; {cpu_description()})"
        )
    message = emulated_bf16_warning(resolved, accelerator)
    if message is not None:
        rank_zero_warn(message)
    return resolved


class LovaszTrainer(pl.Trainer):
    """A Lightning ``Trainer`` whose ``precision`` defaults to ``"auto"``.

    ``precision="auto"`` (or ``None``) is resolved by :func:`resolve_precision` from the
    ``accelerator`` and printed once; any other value is passed on unchanged, with a warning
    when it runs bf16 on a CPU that emulates it. Every other argument is
    ``pytorch_lightning.Trainer``'s.

    Args:
        *args: positional arguments of ``pytorch_lightning.Trainer``.
        precision: ``"auto"`` or any Lightning precision value.
        **kwargs: keyword arguments of ``pytorch_lightning.Trainer``.

    Raises:
        ValueError: from ``pytorch_lightning.Trainer`` for an invalid argument combination.

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
        precision = resolve_and_report(precision, kwargs.get("accelerator", "auto"))
        super().__init__(*args, precision=precision, **kwargs)
