"""The baseline a MONAI user writes in an afternoon: the yardstick of the shipped pipeline.

A plain PyTorch loop over MONAI parts, with nothing of ``lovasz_monai`` in the training except
the masked Dice + CE (MONAI's ``DiceCELoss`` that also leaves out the unlabelled voxels, label
255; equal to ``DiceCELoss`` where nothing is ignored):

* data: every ``training`` case of ``dataset.json`` (no validation split), ``LoadImaged`` ->
  ``EnsureChannelFirstd`` -> ``Orientationd("RAS")`` -> ``NormalizeIntensityd(nonzero=True)``
  -> ``RandSpatialCropSamplesd`` (``num_samples`` random patches per volume), no augmentation;
* network: ``monai.networks.nets.UNet`` with the given channels (2 residual units);
* optimiser: ``Adam(lr=1e-3)``, constant, float32, ``steps`` steps of ``batch_size`` volumes;
* evaluation: the labelled ``test`` cases, ``sliding_window_inference`` (patch ``roi``, overlap
  0.25), argmax, per-case IoU, Dice and HD95 of :class:`lovasz_monai.metrics.CaseMetrics`
  (the numbers ``lovasz-monai test --model.surface_metrics true`` writes to
  ``test_cases.csv``), written to ``<output>/test_cases.csv`` and summarised in
  ``<output>/summary.json``. ::

    python experiments/plain_monai.py --data data/subcortical --output runs/plain/seed0 \\
        --steps 1500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandSpatialCropSamplesd,
)
from monai.utils import set_determinism

from lovasz_monai.dataset import DatasetDescription
from lovasz_monai.losses import MaskedDiceCELoss
from lovasz_monai.metrics import CaseMetrics, batch_cases

KEYS = ("image", "label")


def _loader(cases, roi, num_samples, batch_size, train: bool) -> DataLoader:
    xforms = [
        LoadImaged(keys=KEYS, image_only=True),
        EnsureChannelFirstd(keys=KEYS),
        Orientationd(keys=KEYS, axcodes="RAS"),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ]
    if train:
        xforms.append(
            RandSpatialCropSamplesd(
                keys=KEYS, roi_size=roi, num_samples=num_samples, random_size=False
            )
        )
        xforms.append(EnsureTyped(keys=KEYS, track_meta=False))
    data = CacheDataset([dict(c) for c in cases], Compose(xforms), num_workers=2)
    return DataLoader(data, batch_size=batch_size if train else 1, shuffle=train, num_workers=0)


def run(
    data: str,
    output: str,
    steps: int = 1500,
    seed: int = 0,
    roi: tuple[int, int, int] = (64, 64, 64),
    num_samples: int = 2,
    batch_size: int = 1,
    channels: tuple[int, ...] = (16, 32, 64, 128),
    surface: bool = True,
) -> dict:
    """Train, evaluate on the test cases, write ``test_cases.csv`` and ``summary.json``."""
    set_determinism(seed)
    desc = DatasetDescription.from_json(data)
    num_classes = desc.num_classes
    net = UNet(
        spatial_dims=3,
        in_channels=desc.in_channels,
        out_channels=num_classes,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
    )
    loss_fn = MaskedDiceCELoss(ignore_index=desc.ignore_index)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    train = _loader(desc.training, roi, num_samples, batch_size, train=True)
    step, start, step_times = 0, time.monotonic(), []
    net.train()
    while step < steps:
        for batch in train:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            step_times.append(time.perf_counter() - t0)
            step += 1
            if step % 100 == 0:
                print(f"step {step}: loss {loss.item():.4f}", flush=True)
            if step == steps:
                break
    train_seconds = time.monotonic() - start
    net.eval()
    metrics = CaseMetrics(num_classes, list(desc.class_names), surface=surface)
    with torch.no_grad():
        for batch in _loader(desc.test, roi, num_samples, 1, train=False):
            logits = sliding_window_inference(batch["image"], roi, 4, net, overlap=0.25)
            pred = logits.argmax(1, keepdim=True)
            label = batch["label"]
            mask = label != desc.ignore_index if desc.ignore_index is not None else None
            label = label.masked_fill(~mask, 0) if mask is not None else label
            sources, spacing = batch_cases(batch["image"])
            metrics.update(pred, label.long(), mask, spacing=spacing, sources=sources)
    results = metrics.gather()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    results.write_csv(out / "test_cases.csv")
    summary = {
        "steps": steps,
        "seed": seed,
        "train_seconds": train_seconds,
        "median_step_seconds": sorted(step_times[1:])[len(step_times[1:]) // 2],
        **{k: float(v) for k, v in results.summary(("IoU", "Dice", "HD95")).items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder holding dataset.json")
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--roi", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--num-samples", type=int, default=2)
    args = parser.parse_args()
    summary = run(args.data, args.output, args.steps, args.seed, tuple(args.roi), args.num_samples)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
