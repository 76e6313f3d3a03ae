"""float32 against bf16 autocast on the CPU: one forward + backward of a MONAI 3D UNet.

Prints the CPU model, whether oneDNN computes bf16 natively here, and the median time of a
training step (forward, Lovász + CE loss, backward) in float32 and under
``torch.autocast("cpu", dtype=torch.bfloat16)``, after warm-up, interleaved, in one process.
Run it a second time with oneDNN capped at AVX2 to see a CPU without native bf16::

    python benchmarks/precision.py
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/precision.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets import UNet

from lovasz_monai.losses import LovaszCELoss
from lovasz_monai.precision import cpu_description, resolve_precision

# (name, batch, patch, UNet channels, residual units): the demo's network and batch, and a
# real-data-sized one (MONAI UNet 16-32-64-128 on 2 patches of 64^3)
CASES = [
    ("demo UNet 8-16-32, 8 x 1 x 32^3", 8, 32, (8, 16, 32), 1),
    ("UNet 16-32-64-128, 2 x 1 x 64^3", 2, 64, (16, 32, 64, 128), 2),
]


def step_time(net, loss_fn, image, label, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = net(image)
    loss = loss_fn(logits.float(), label)
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(
        f"# {cpu_description()}, {torch.get_num_threads()} torch threads, "
        f"precision auto -> {resolve_precision('auto', 'cpu')}"
    )
    print("| network, batch | float32 (ms) | bf16 autocast (ms) | bf16 / float32 |")
    print("|---|---:|---:|---:|")
    loss_fn = LovaszCELoss(to_onehot_y=True)
    for name, batch, patch, channels, res_units in CASES:
        torch.manual_seed(0)
        net = UNet(
            3, 1, 3, channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=res_units
        )
        image = torch.randn(batch, 1, patch, patch, patch)
        label = torch.randint(0, 3, (batch, 1, patch, patch, patch))
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.warmup + args.repeats):
            for bf16 in (False, True) if i % 2 == 0 else (True, False):
                t = step_time(net, loss_fn, image, label, bf16)
                if i >= args.warmup:
                    times[bf16].append(t)
        fp32, bf16 = (1e3 * statistics.median(times[k]) for k in (False, True))
        print(f"| {name} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
