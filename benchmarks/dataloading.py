"""Is the data pipeline the bottleneck? Data-loading time per training step against the step.

For each ``num_workers`` the script builds the datamodule of an experiment config, and times
(after a warm-up of one epoch, which includes the worker start-up) how long the training loop
waits for each batch, next to the compute of one training step (forward, loss, backward,
optimizer) of the config's network in float32 on the same batches. Medians over the measured
steps; everything in one process and run.

    python benchmarks/dataloading.py --config configs/demo.yaml --workers 0 1 2
    python benchmarks/dataloading.py --config configs/demo.yaml --workers 0 1 2 \\
        --size 128 128 128 --roi 64 64 64 --batch-size 2 --num-samples 1 --unet 16 32 64 128

The second line is a real-data-sized case: 2 x 64^3 patches from 128^3 volumes with the MONAI
UNet 16-32-64-128 (2 residual units) of the issue that asked for this measurement.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lovasz_monai.data import SegmentationDataModule
from lovasz_monai.module import LovaszSegmentationModule
from lovasz_monai.precision import cpu_description
from lovasz_monai.synthetic import make_synthetic_dataset


def measure(args: argparse.Namespace, workers: int, data_dir: Path) -> dict[str, float]:
    config = yaml.safe_load(Path(args.config).read_text())
    data_cfg = dict(config["data"])
    data_cfg.update(
        data_dir=str(data_dir),
        synthetic=False,
        num_workers=workers,
        roi_size=args.roi or data_cfg.get("roi_size", (96, 96, 96)),
        batch_size=args.batch_size or data_cfg.get("batch_size", 2),
        num_samples=args.num_samples or data_cfg.get("num_samples", 2),
    )
    data_cfg.pop("synthetic_kwargs", None)
    dm = SegmentationDataModule(**data_cfg)
    dm.setup("fit")
    model_cfg = {k: v for k, v in config.get("model", {}).items() if k.startswith("unet_")}
    if args.unet:
        model_cfg.update(unet_channels=args.unet, unet_strides=[2] * (len(args.unet) - 1))
        model_cfg["unet_num_res_units"] = 2
    model = LovaszSegmentationModule(
        num_classes=dm.num_classes, in_channels=dm.in_channels, roi_size=dm.roi_size, **model_cfg
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = dm.train_dataloader()
    waits, steps = [], []
    for epoch in range(args.epochs + 1):  # epoch 0: warm-up (worker start, first allocations)
        start = time.perf_counter()
        for batch in loader:
            fetched = time.perf_counter()
            loss = model.training_step(batch, 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done = time.perf_counter()
            if epoch > 0:
                waits.append(fetched - start)
                steps.append(done - fetched)
            start = time.perf_counter()
    wait, step = statistics.median(waits), statistics.median(steps)
    return {"workers": workers, "wait_ms": 1e3 * wait, "step_ms": 1e3 * step, "n": len(waits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs after warm-up")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=3, default=None, help="volume size")
    parser.add_argument("--roi", type=int, nargs=3, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--unet", type=int, nargs="+", default=None, help="UNet channels")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = yaml.safe_load(Path(args.config).read_text())
    synthetic = dict(config["data"].get("synthetic_kwargs") or {})
    synthetic.update(num_cases=args.cases, num_test=0)
    if args.size:
        synthetic["size"] = args.size
    print(
        f"# {cpu_description()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(f"# config {args.config}, synthetic {synthetic}, roi {args.roi}, unet {args.unet}")
    print("| num_workers | data wait per step (ms) | compute per step (ms) | wait / step | steps |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_synthetic_dataset(Path(tmp) / "data", **synthetic)
        for workers in args.workers:
            r = measure(args, workers, data_dir)
            print(
                f"| {r['workers']} | {r['wait_ms']:.1f} | {r['step_ms']:.1f} | "
                f"{r['wait_ms'] / r['step_ms']:.2f} | {r['n']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
