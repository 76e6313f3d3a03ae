"""DDP with 2 CPU processes (gloo) through the CLI: metrics are synchronised across ranks."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from lovasz_monai.data import make_synthetic_dataset

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
KEYS = (
    "val/mIoU",
    "val/loss",
    "val/IoU/background",
    "val/IoU/class_1",
    "val/IoU/class_2",
    "val/mDice",
    "val/Dice/class_1",
    "val/Dice/class_2",
)


def run_cli(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "lovasz_monai.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lovasz-monai {' '.join(args)} failed:\n{output[-6000:]}"
    return output


def last_values(root: Path) -> dict[str, float]:
    versions = sorted((root / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(versions[-1] / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows if r.get(k)][-1] for k in KEYS}


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ddp_two_cpu_processes_sync_metrics(tmp_path):
    """Fit 1 epoch with ``--trainer.strategy ddp --trainer.devices 2`` on CPU. The 2 validation
    volumes are split over the 2 ranks (one each), so the logged IoU equals the single-process
    IoU of the saved model over both volumes only if the metric state was synchronised."""
    data = make_synthetic_dataset(tmp_path / "data", num_cases=4, num_test=1, size=(24, 24, 24))
    common = [
        "--config",
        str(DEMO),
        f"--data.data_dir={data}",
        "--data.roi_size=[16,16,16]",
        "--data.val_fraction=0.5",
        "--data.num_samples=1",
        "--model.unet_channels=[4,8]",
        "--model.unet_strides=[2]",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32",
        "--trainer.max_epochs=1",
        "--trainer.callbacks=[]",
        "--trainer.enable_progress_bar=false",
    ]
    ddp_root = tmp_path / "ddp"
    output = run_cli(
        "fit",
        *common,
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        f"--trainer.default_root_dir={ddp_root}",
        cwd=tmp_path,
    )
    assert "MEMBER: 2/2" in output  # rank 1 ran
    logged = last_values(ddp_root)

    ckpt = ddp_root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    single_root = tmp_path / "single"
    run_cli(
        "validate",
        *common,
        "--trainer.devices=1",
        f"--trainer.default_root_dir={single_root}",
        f"--ckpt_path={ckpt}",
        cwd=tmp_path,
    )
    single = last_values(single_root)
    for key in KEYS:
        assert logged[key] == pytest.approx(single[key], abs=1e-5), key
