"""``precision="auto"``: resolution from the hardware, the emulated-bf16 warning, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lovasz_monai import precision as precision_module
from lovasz_monai.cli import LovaszCLI
from lovasz_monai.precision import (
    LovaszTrainer,
    cpu_has_native_bf16,
    emulated_bf16_warning,
    resolve_precision,
)
from lovasz_monai.synthetic import make_synthetic_dataset

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def patch_hardware(monkeypatch, *, cuda: bool, cuda_bf16: bool = False, cpu_bf16: bool = False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        # like torch >= 2.3 on a V100/T4: True when emulation counts, whatever the chip
        return True if including_emulation else cuda_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: cpu_bf16)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("cuda", "cuda_bf16", "cpu_bf16", "accelerator", "expected"),
    [
        (True, True, False, "auto", "bf16-mixed"),
        (True, False, True, "auto", "16-mixed"),
        (True, True, False, "gpu", "bf16-mixed"),
        (True, False, False, "cuda", "16-mixed"),
        (False, False, True, "auto", "bf16-mixed"),
        (False, False, False, "auto", "32-true"),
        (True, True, True, "cpu", "bf16-mixed"),
        (True, True, False, "cpu", "32-true"),
        (False, False, True, "cpu", "bf16-mixed"),
        (False, False, False, "cpu", "32-true"),
        (False, False, True, "mps", "32-true"),
    ],
)
def test_auto_resolves_from_the_hardware(
    monkeypatch, cuda, cuda_bf16, cpu_bf16, accelerator, expected
):
    patch_hardware(monkeypatch, cuda=cuda, cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16)
    assert resolve_precision("auto", accelerator) == expected
    assert resolve_precision(None, accelerator) == expected


@pytest.mark.parametrize("pinned", ["32-true", "16-mixed", "bf16-mixed", 16, "64-true"])
def test_a_pinned_precision_is_kept(monkeypatch, pinned):
    patch_hardware(monkeypatch, cuda=False)
    assert resolve_precision(pinned, "cpu") == pinned


def test_accelerator_given_as_a_config_mapping(monkeypatch):
    patch_hardware(monkeypatch, cuda=True, cuda_bf16=False)
    spec = {"class_path": "pytorch_lightning.accelerators.CUDAAccelerator"}
    assert resolve_precision("auto", spec) == "16-mixed"
    spec = {"class_path": "pytorch_lightning.accelerators.CPUAccelerator"}
    assert resolve_precision("auto", spec) == "32-true"


@pytest.mark.parametrize(
    ("onednn_bf16", "avx512_bf16", "amx", "cap", "expected"),
    [
        (True, True, False, None, True),  # AVX-512 BF16 (Cooper Lake, Zen 4/5)
        (True, False, True, None, True),  # AMX (Sapphire Rapids and newer)
        (True, False, False, None, False),  # AVX-512 without BF16: oneDNN runs bf16, emulated
        (False, False, False, None, False),  # AVX2 only
        (True, True, False, "AVX512_CORE", False),  # oneDNN capped below its bf16 instructions
        (True, True, False, "AVX512_CORE_BF16", True),
        (False, True, False, "AVX2", False),  # what the capability check reports under the cap
    ],
)
def test_native_bf16_needs_the_bf16_instructions(
    monkeypatch, onednn_bf16, avx512_bf16, amx, cap, expected
):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert cpu_has_native_bf16() is expected
    assert resolve_precision("auto", "cpu") == ("bf16-mixed" if expected else "32-true")


def test_onednn_isa_limit_turns_native_bf16_off():
    """The capability check is the one oneDNN makes: capping oneDNN at AVX2 (what a CPU without
    AVX-512 BF16 has) reports no native bf16, whatever this CPU is."""
    code = "from lovasz_monai.precision import cpu_has_native_bf16; print(cpu_has_native_bf16())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    assert isinstance(cpu_has_native_bf16(), bool)


def test_warning_fires_for_emulated_bf16_only(monkeypatch):
    patch_hardware(monkeypatch, cuda=False, cpu_bf16=False)
    message = emulated_bf16_warning("bf16-mixed", "cpu")
    assert message is not None and "32-true" in message and "15-46x" in message
    assert "native bf16" in message  # names the CPU it ran on
    with pytest.warns(UserWarning, match="without native bf16"):
        trainer = LovaszTrainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    assert trainer.precision == "bf16-mixed"  # warned, not overridden
    assert emulated_bf16_warning("32-true", "cpu") is None
    assert emulated_bf16_warning("16-mixed", "gpu") is None

    patch_hardware(monkeypatch, cuda=False, cpu_bf16=True)
    assert emulated_bf16_warning("bf16-mixed", "cpu") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(GPU|TPU|HPU|bfloat16|litlogger).*")
        trainer = LovaszTrainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    assert trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_trainer_default_is_auto(monkeypatch, cpu_bf16):
    patch_hardware(monkeypatch, cuda=False, cpu_bf16=cpu_bf16)
    trainer = LovaszTrainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert trainer.precision == ("bf16-mixed" if cpu_bf16 else "32-true")


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_cli_resolves_auto_prints_it_and_saves_it_in_the_config(
    monkeypatch, tmp_path, caplog, cpu_bf16
):
    patch_hardware(monkeypatch, cuda=False, cpu_bf16=cpu_bf16)
    data = make_synthetic_dataset(tmp_path / "data", num_cases=2, num_test=0, size=(16, 16, 16))
    monkeypatch.setattr(sys, "argv", ["lovasz-monai"])
    expected = "bf16-mixed" if cpu_bf16 else "32-true"
    with caplog.at_level("INFO"):
        cli = LovaszCLI(
            args=[
                "fit",
                "--config",
                str(DEMO),
                f"--data.data_dir={data}",
                "--data.roi_size=[16,16,16]",
                "--data.num_samples=1",
                "--data.val_fraction=0.5",
                "--model.unet_channels=[4,8]",
                "--model.unet_strides=[2]",
                "--trainer.max_steps=1",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--trainer.callbacks=[]",
                f"--trainer.default_root_dir={tmp_path / 'runs'}",
            ]
        )
    assert cli.trainer.precision == expected
    resolved = [m for m in caplog.messages if m.startswith("precision 'auto' resolved to")]
    assert len(resolved) == 1, caplog.messages
    assert resolved[0].startswith(f"precision 'auto' resolved to '{expected}' (accelerator 'cpu';")
    (saved,) = (tmp_path / "runs").rglob("config.yaml")
    assert yaml.safe_load(saved.read_text())["trainer"]["precision"] == expected


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_every_subcommand_resolves_auto(monkeypatch, tmp_path, subcommand):
    patch_hardware(monkeypatch, cuda=False, cpu_bf16=False)
    data = make_synthetic_dataset(tmp_path / "data", num_cases=2, num_test=1, size=(16, 16, 16))
    monkeypatch.setattr(sys, "argv", ["lovasz-monai"])
    cli = LovaszCLI(
        args=[
            subcommand,
            "--config",
            str(DEMO),
            f"--data.data_dir={data}",
            "--data.roi_size=[16,16,16]",
            "--model.unet_channels=[4,8]",
            "--model.unet_strides=[2]",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
        ]
    )
    assert cli.trainer.state.finished
    assert cli.trainer.precision == "32-true"
    assert cli.config[subcommand].trainer.precision == "32-true"
