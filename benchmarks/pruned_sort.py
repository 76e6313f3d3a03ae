"""The exact sort with and without leaving out the voxels that weigh 0, on the CPU.

Once the last foreground voxel of a row sorted by decreasing error is passed, every later
Lovász weight is 0, so the exact method sorts only the voxels above that cut
(``lovasz_monai.functional.rows._weighted_voxels`` and ``_sort_kept_voxels``). How many
voxels that leaves depends on the network: few early in training (the foreground errors are
all large), more once some foreground voxel is predicted with certainty (its error, and so the
cut, near 0). This script measures both, interleaved in one process, median of
``--repeats`` after ``--warmup``:

1. the loss alone (forward + backward of ``LovaszCELoss(lambda_ce=0.3)``, the default, and of
   it with ``batch=True``) against MONAI's DiceLoss and DiceCELoss, on the many-class sizes of
   ``python -m lovasz_monai.benchmark --sizes many-classes`` (its synthetic logits: a partly
   trained network; ``--no-many-classes`` skips them) and on the logits of real networks on two
   64^3 subcortical patches: at initialisation and trained (``--checkpoint``, a ``last.ckpt`` of
   ``configs/subcortical.yaml``);
2. one training step of ``configs/subcortical.yaml`` (and, with ``--parcellation``, of
   ``configs/parcellation.yaml``): Dice+CE against the default loss with and without the cut
   and the default with ``batch=True``, at initialisation and from ``--checkpoint``.

With ``--against COMMIT`` the default loss of the package at that commit (a renamed copy from
``git archive``, imported next to this checkout's) is timed in the same rounds, so that a
change of the loss is measured against the code before it in one process.

Run alone on a quiet machine::

    python benchmarks/pruned_sort.py --parcellation \
        --checkpoint runs/brain_atlas/subcortical/lovasz_ce_lowce/seed0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch
from monai.losses import DiceCELoss, DiceLoss

from lovasz_monai.functional import rows
from lovasz_monai.losses import LovaszCELoss
from lovasz_monai.precision import cpu_description
from lovasz_monai.tools.benchmark import MANY_CLASS_PRESENT, Case, make_inputs
from lovasz_monai.tools.recipes import LOSSES


@contextlib.contextmanager
def whole_sort() -> Iterator[None]:
    """Every voxel sorted, as before the cut."""
    saved = rows._PRUNED_ROW_VOXELS
    rows._PRUNED_ROW_VOXELS = 1 << 62
    try:
        yield
    finally:
        rows._PRUNED_ROW_VOXELS = saved


def interleaved(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds of each step, the steps run one after another in a rotating order."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def package_at(commit: str, folder: Path) -> ModuleType:
    """The ``lovasz_monai`` package of ``commit`` of this repository, renamed
    ``lovasz_monai_<commit>`` (every reference to the name rewritten), written into ``folder``
    and imported from there (``folder`` is put first on ``sys.path``)."""
    name = "lovasz_monai_" + re.sub(r"\W", "_", commit)
    archive = subprocess.run(
        ["git", "archive", commit, "lovasz_monai"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as files:
        # the "data" filter (no links out, no absolute paths) where this Python has it
        files.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (folder / "lovasz_monai").rename(folder / name)
    for path in (folder / name).rglob("*.py"):
        path.write_text(re.sub(r"\blovasz_monai\b", name, path.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def recipe_loss(package: ModuleType, recipe: str) -> torch.nn.Module:
    """The loss of the comparison recipe ``recipe`` (:data:`lovasz_monai.tools.recipes.LOSSES`)
    built from ``package``'s classes."""
    loss = LOSSES[recipe].model(1, 0, 0)["loss"]
    return getattr(package, loss["class_path"].rsplit(".", 1)[1])(**loss["init_args"])


def loss_steps(
    logits: torch.Tensor, labels: torch.Tensor, previous: tuple[str, ModuleType] | None = None
) -> dict[str, Callable[[], None]]:
    lovasz = LovaszCELoss(to_onehot_y=True)
    lovasz_batch = LovaszCELoss(to_onehot_y=True, batch=True)
    dice = DiceLoss(to_onehot_y=True, softmax=True)
    dicece = DiceCELoss(to_onehot_y=True, softmax=True)

    def run(loss_fn, context=contextlib.nullcontext) -> Callable[[], None]:
        def step() -> None:
            x = logits.detach().requires_grad_(True)
            with context():
                loss_fn(x, labels).backward()

        return step

    steps = {
        "exact, cut": run(lovasz),
        "exact, whole sort": run(lovasz, whole_sort),
        "exact, batch=True, cut": run(lovasz_batch),
        "DiceLoss": run(dice),
        "DiceCELoss": run(dicece),
    }
    if previous is not None:
        commit, package = previous
        steps[f"exact, cut, at {commit}"] = run(package.LovaszCELoss(to_onehot_y=True))
        steps[f"exact, batch=True, cut, at {commit}"] = run(
            package.LovaszCELoss(to_onehot_y=True, batch=True)
        )
    return steps


def kept_fraction(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the (volume, present class) voxels that the cut keeps."""
    probs = logits.float().softmax(1)
    kept = total = 0
    for volume in range(labels.shape[0]):
        for c in labels[volume].unique().tolist():
            fg = labels[volume, 0] == c
            errors = torch.where(fg, 1 - probs[volume, c], probs[volume, c])
            kept += int((errors >= errors[fg].min()).sum())
            total += errors.numel()
    return kept / total


def subcortical_patches(checkpoint: str | None) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Two 64^3 training patches of data/subcortical and the module of ``checkpoint`` (or of
    the config at initialisation)."""
    from lovasz_monai.cli import LovaszCLI
    from lovasz_monai.tools.runs import cli_args

    args = cli_args("configs/subcortical.yaml", "lovasz_ce_lowce", 0, 1, "runs/_bench_cut")
    cli = LovaszCLI(args=args, run=False)
    load_network(cli.model, checkpoint)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    labels = batch["label"].long()
    return batch["image"], labels.masked_fill(labels == 255, 0), cli.model  # no ignore label


def load_network(model, checkpoint: str | None) -> None:
    """The network weights of a trained module's checkpoint (its loss left as it is)."""
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        network = {k: v for k, v in state.items() if k.startswith("network.")}
        model.load_state_dict(network, strict=False)


def network_logits(model, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model.network(image).float()


def train_step(model, optimizer, precision, context, batch) -> Callable[[], None]:
    def step() -> None:
        with context(), precision():
            value = model.training_step(batch, 0)
        with context():
            value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_steps(
    config: str, checkpoint: str | None, previous: tuple[str, ModuleType] | None = None
) -> dict[str, Callable[[], None]]:
    """One training step (forward, loss, backward, AdamW) of Dice+CE, of the default loss with
    and without the cut and of the default with ``batch=True``, from the same network; with
    ``previous`` (commit, package), also of the default and ``batch=True`` losses of that
    package."""
    from lovasz_monai.cli import LovaszCLI
    from lovasz_monai.tools.runs import cli_args

    steps: dict[str, Callable[[], None]] = {}
    batch = None
    # (name, recipe, sort context, package whose loss replaces the recipe's, or None)
    variants = [
        ("Dice+CE", "dicece", contextlib.nullcontext, None),
        ("default, cut", "lovasz_ce_lowce", contextlib.nullcontext, None),
        ("default, whole sort", "lovasz_ce_lowce", whole_sort, None),
        ("default with batch=True, cut", "lovasz_ce_lowce_batch", contextlib.nullcontext, None),
    ]
    if previous is not None:
        commit, package = previous
        variants += [
            (f"default, cut, at {commit}", "lovasz_ce_lowce", contextlib.nullcontext, package),
            (
                f"default with batch=True, cut, at {commit}",
                "lovasz_ce_lowce_batch",
                contextlib.nullcontext,
                package,
            ),
        ]
    for name, recipe, context, package in variants:
        cli = LovaszCLI(args=cli_args(config, recipe, 0, 1, "runs/_bench_cut"), run=False)
        model = cli.model
        if package is not None:
            model.objective.loss = recipe_loss(package, recipe)
        load_network(model, checkpoint)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        precision = cli.trainer.precision_plugin.train_step_context
        if batch is None:
            cli.datamodule.setup("fit")
            batch = next(iter(cli.datamodule.train_dataloader()))

        steps[name] = train_step(model, optimizer, precision, context, batch)
    return steps


def table(title: str, medians: dict[str, float], base: str) -> None:
    print(f"\n{title}\n")
    print("| | ms | vs " + base + " |")
    print("|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {1000 * seconds:.0f} | {seconds / medians[base]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a trained subcortical last.ckpt")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--parcellation", action="store_true", help="also its training step")
    parser.add_argument(
        "--no-many-classes", action="store_true", help="skip the loss alone at the many-class sizes"
    )
    parser.add_argument(
        "--against", metavar="COMMIT", default=None, help="also time the losses of this commit"
    )
    args = parser.parse_args()
    previous = None
    if args.against is not None:
        previous = (args.against, package_at(args.against, Path(tempfile.mkdtemp())))
    print(f"# {cpu_description()}, {torch.get_num_threads()} torch threads")
    for size in () if args.no_many_classes else ("2x84x96x96x96", "1x105x128x128x128"):
        b, c, *spatial = map(int, size.split("x"))
        logits, labels = make_inputs(Case(b, c, tuple(spatial)), present=MANY_CLASS_PRESENT)
        medians = interleaved(loss_steps(logits, labels, previous), args.repeats, args.warmup)
        kept = kept_fraction(logits, labels)
        table(f"loss alone, {size}, {MANY_CLASS_PRESENT} classes present, synthetic logits "
              f"(kept {kept:.0%})", medians, "DiceLoss")  # fmt: skip
    for state in ("initialisation", "trained") if args.checkpoint else ("initialisation",):
        checkpoint = args.checkpoint if state == "trained" else None
        image, labels, model = subcortical_patches(checkpoint)
        logits = network_logits(model, image)
        medians = interleaved(loss_steps(logits, labels, previous), args.repeats, args.warmup)
        kept = kept_fraction(logits, labels)
        table(f"loss alone, subcortical 2 x 16 x 64^3, network at {state} (kept {kept:.0%})",
              medians, "DiceLoss")  # fmt: skip
        steps = training_steps("configs/subcortical.yaml", checkpoint, previous)
        medians = interleaved(steps, args.repeats, args.warmup)
        table(f"training step, configs/subcortical.yaml, network at {state}", medians, "Dice+CE")
    if args.parcellation:
        steps = training_steps("configs/parcellation.yaml", None, previous)
        medians = interleaved(steps, args.repeats, args.warmup)
        table("training step, configs/parcellation.yaml, at initialisation", medians, "Dice+CE")


if __name__ == "__main__":
    main()
