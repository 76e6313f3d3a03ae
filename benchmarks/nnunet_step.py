"""nnU-Net training step: ``nnUNetTrainerLovaszCE`` against nnU-Net's own ``nnUNetTrainer``.

Converts an MSD-layout dataset to nnU-Net's raw format (``lovasz_monai.nnunet.convert``), runs
nnU-Net's fingerprint, planning and preprocessing (``3d_fullres``) in a temporary folder, builds
both trainers on the same plans with the same network weights, and times ``train_step``
(forward, loss, backward, optimiser step; nnU-Net's own code, float32 on a CPU, autocast on a
GPU) on the same pre-loaded batches, interleaved, after warm-up, in one process. Prints the
median step of each trainer and their ratio. Needs the nnunet extra::

    python benchmarks/nnunet_step.py --source data/subcortical
    python benchmarks/nnunet_step.py --source data/subcortical --device cuda
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from nnunetv2.experiment_planning.plan_and_preprocess_api import (
    extract_fingerprints,
    plan_experiments,
    preprocess,
)
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from lovasz_monai.nnunet import nnUNetTrainerLovaszCE
from lovasz_monai.nnunet.convert import to_nnunet_raw
from lovasz_monai.precision import cpu_description

DATASET_ID = 990


def _trainers(root: Path, device: torch.device) -> list[nnUNetTrainer]:
    import json

    folder = next((root / "preprocessed").iterdir())
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    out = []
    for trainer_class in (nnUNetTrainer, nnUNetTrainerLovaszCE):
        run_plans = {**copy.deepcopy(plans), "continue_training": False}
        trainer = trainer_class(run_plans, "3d_fullres", 0, dataset_json, device=device)
        trainer.on_train_start()  # network, optimiser, loss, data loaders
        out.append(trainer)
    out[1].network.load_state_dict(out[0].network.state_dict())
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="MSD-layout dataset (dataset.json)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, reused")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {
            "nnUNet_raw": str(root / "raw"),
            "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results"),
            "nnUNet_def_n_proc": "1",
            "nnUNet_n_proc_DA": "0",
        }
        with mock.patch.dict(os.environ, env):
            to_nnunet_raw(args.source, root / "raw", DATASET_ID, name="Bench")
            os.environ["nnUNet_n_proc_DA"] = "1"  # planning refuses 0 threads
            extract_fingerprints([DATASET_ID], num_processes=1)
            plan_experiments([DATASET_ID])
            preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,))
            os.environ["nnUNet_n_proc_DA"] = "0"
            trainers = _trainers(root, device)
            batches = [next(trainers[0].dataloader_train) for _ in range(args.batches)]
            times: list[list[float]] = [[], []]
            for i in range(args.warmup + args.repeats):
                for k, trainer in enumerate(trainers):
                    batch = batches[i % len(batches)]
                    _sync(device)
                    start = time.perf_counter()
                    trainer.train_step(batch)
                    _sync(device)
                    if i >= args.warmup:
                        times[k].append(time.perf_counter() - start)
    plan = trainers[0].configuration_manager
    where = cpu_description() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"# {where}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(
        f"# {args.source}: 3d_fullres patch {plan.patch_size}, batch {plan.batch_size}, "
        f"{trainers[0].label_manager.num_segmentation_heads} outputs, deep supervision "
        f"{trainers[0].enable_deep_supervision}; medians of {args.repeats} interleaved steps "
        f"after {args.warmup} warm-up"
    )
    base, ours = (statistics.median(t) for t in times)
    print("| trainer | step (ms) | / nnUNetTrainer |")
    print("|---|---:|---:|")
    print(f"| nnUNetTrainer (Dice + CE) | {1000 * base:.0f} | 1.00 |")
    print(f"| nnUNetTrainerLovaszCE | {1000 * ours:.0f} | {ours / base:.2f} |")


if __name__ == "__main__":
    main()
