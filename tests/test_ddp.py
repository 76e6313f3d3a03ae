"""DDP with 2 CPU processes (gloo) through the CLI: metrics are synchronised across ranks, and
``configs/demo_ddp.yaml`` trains with the global-batch Lovász loss."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from lovasz_monai import LovaszSoftmaxLoss
from lovasz_monai.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
DEMO_DDP = ROOT / "configs" / "demo_ddp.yaml"
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
    # the repository root on the path: the runs may use callbacks defined in this module
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
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


class FirstLossCall(Callback):
    """Saves, on every rank, the inputs and the value of the first call of the module's loss."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.saved = False

    def on_train_start(self, trainer, pl_module) -> None:
        def hook(module, args, kwargs, output):
            if not self.saved:
                self.saved = True
                record = {
                    "logits": args[0].detach(),
                    "label": args[1].detach(),
                    "mask": kwargs["mask"].detach(),
                    "value": output.detach(),
                }
                torch.save(record, self.folder / f"rank{trainer.global_rank}.pt")

        pl_module.loss.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_demo_ddp_config_trains_with_the_global_loss(tmp_path):
    """``configs/demo_ddp.yaml`` on 2 CPU processes for a few steps: the loss that each rank
    computes at the first step is the Lovász loss of the union of both ranks' patches (plus
    0.3 x its own cross-entropy), and training completes with a checkpoint."""
    data = make_synthetic_dataset(tmp_path / "data", num_cases=6, num_test=1, size=(24, 24, 24))
    callback = {
        "class_path": f"{__name__}.FirstLossCall",
        "init_args": {"folder": str(tmp_path)},
    }
    root = tmp_path / "runs"
    output = run_cli(
        "fit",
        "--config",
        str(DEMO_DDP),
        f"--data.data_dir={data}",
        "--data.roi_size=[16,16,16]",
        "--model.unet_channels=[4,8]",
        "--model.unet_strides=[2]",
        "--trainer.precision=32",
        "--trainer.max_steps=3",
        f"--trainer.callbacks=[{json.dumps(callback)}]",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        cwd=tmp_path,
    )
    assert "MEMBER: 2/2" in output
    assert (root / "checkpoints" / "last.ckpt").is_file()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert not torch.equal(ranks[0]["label"], ranks[1]["label"])  # each rank its own patches
    union = {
        key: torch.cat([r[key] for r in ranks]) for key in ("logits", "label", "mask")
    }  # same patch size on both ranks: batch=True sees the concatenation as one set
    lovasz = LovaszSoftmaxLoss(to_onehot_y=True, batch=True, method="histogram", bins=1024)
    global_value = lovasz(union["logits"], union["label"], mask=union["mask"])
    for r in ranks:
        target = r["label"][:, 0].long().masked_fill(r["mask"][:, 0] == 0, -100)
        ce = F.cross_entropy(r["logits"], target, ignore_index=-100)
        torch.testing.assert_close(r["value"], global_value + 0.3 * ce, rtol=1e-5, atol=1e-6)
    local = lovasz(ranks[0]["logits"], ranks[0]["label"], mask=ranks[0]["mask"])
    assert abs(local.item() - global_value.item()) > 1e-4  # the union differs from rank 0 alone
