"""Brain-tissue segmentation from real anatomy: an MSD-layout dataset built from the MNI template.

The anatomy is the ICBM 2009c nonlinear symmetric MNI152 template that nilearn ships inside its
wheel (T1 image, grey- and white-matter probability maps, 1 mm; no download at run time). At
2 mm the labels are 0 background (outside the brain), 1 CSF (ventricles and sulci: the thin
structure), 2 grey matter, 3 white matter: inside the brain, the most probable of
(1 - GM - WM, GM, WM). Each case is a different, realistic-looking subject:

* a smooth random deformation (MONAI ``Rand3DElasticd``: elastic field plus rotation, scaling
  and translation), applied to image (bilinear) and label (nearest);
* intensity non-uniformity (``RandBiasFieldd``), a random contrast curve
  (``RandAdjustContrastd``) and Gaussian noise;
* partial labels: a slab of axial slices at the top or the bottom of each label (10-25 % of
  the brain's extent) is marked with the ignore label 255, as in a partly annotated scan.

Cases are written in the Medical Segmentation Decathlon layout (``dataset.json``,
``imagesTr``/``labelsTr``, ``imagesTs``/``labelsTs``) that
:class:`lovasz_monai.data.SegmentationDataModule` reads; the same ``seed`` always gives the same
files. ::

    python experiments/brain_tissue.py build --output data/brain_tissue         # 24 + 8 cases
    python experiments/brain_tissue.py build --output /tmp/bt --train 2 --test 1  # a quick look
    python experiments/brain_tissue.py compare    # every loss and variant, 3 seeds (~3 h, 2 cores)
    python experiments/brain_tissue.py table      # experiments/brain_tissue/results.md from JSON

``compare`` runs ``python -m lovasz_monai.experiments compare --config configs/brain_tissue.yaml``
once per group of losses below (same network, data, steps and seeds for all), writing
``experiments/brain_tissue/<group>.json`` (+ ``.md``, ``.png``); ``table`` merges those JSON
files into one table: mean +/- std over seeds of the foreground mIoU, the per-class IoU and the
mean Dice on the validation volumes, and each loss's difference to Dice+CE. The group ``long``
trains Dice+CE and the default recipe for twice the epochs (:data:`GROUP_EPOCH_SCALE`) into
``experiments/brain_tissue/2x/``: ``table --folder experiments/brain_tissue/2x``. The group
``patch64`` trains Dice+CE and two Lovász recipes on 64^3 instead of 48^3 patches
(:data:`GROUP_OVERRIDES`) into ``experiments/brain_tissue/patch64/``.

Needs ``nilearn`` (``pip install -e ".[experiments]"``) for its packaged template files.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandGaussianNoised,
)
from scipy import ndimage

from lovasz_monai.tools.report import aggregate, format_mean_std

CLASSES = ("background", "CSF", "grey matter", "white matter")
IGNORE = 255
SPACING = 2.0  # mm


def load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 2 mm template: T1 image (float32, in [0, 1]), label map (uint8) and affine.

    Raises:
        ModuleNotFoundError: nilearn is not installed.
        FileNotFoundError: the installed nilearn does not ship the 2009c template files.
    """
    try:
        data = importlib.resources.files("nilearn.datasets") / "data"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the brain-tissue dataset is built from the MNI template that nilearn ships: "
            'pip install nilearn (or pip install -e ".[experiments]")'
        ) from err
    arrays = {}
    for name in ("t1", "gm", "wm"):
        path = Path(str(data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"))
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed nilearn")
        image = nib.load(str(path))
        arrays[name] = np.asarray(image.dataobj, dtype=np.float32) / 255.0
        affine = image.affine
    # 1 mm -> 2 mm by 2x2x2 block means (probabilities stay probabilities)
    shape = [s // 2 * 2 for s in arrays["t1"].shape]
    for name, a in arrays.items():
        a = a[: shape[0], : shape[1], : shape[2]]
        arrays[name] = a.reshape(shape[0] // 2, 2, shape[1] // 2, 2, shape[2] // 2, 2).mean(
            axis=(1, 3, 5)
        )
    t1, gm, wm = arrays["t1"], arrays["gm"], arrays["wm"]
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0.02, iterations=2))
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    label = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    label[~brain] = 0
    # crop to the brain with a margin of 4 voxels
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(axis=0) - 4, 0)
    hi = np.minimum(idx.max(axis=0) + 5, brain.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] += affine[:3, :3] @ lo
    return t1[crop], label[crop], affine


def case_transform() -> Compose:
    """The random deformation and intensity changes that make one template into a case."""
    return Compose(
        [
            EnsureChannelFirstd(keys=("image", "label"), channel_dim="no_channel"),
            Rand3DElasticd(
                keys=("image", "label"),
                sigma_range=(6.0, 9.0),
                magnitude_range=(60.0, 140.0),
                prob=1.0,
                rotate_range=(0.15, 0.15, 0.15),
                scale_range=(0.08, 0.08, 0.08),
                translate_range=(3.0, 3.0, 3.0),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandBiasFieldd(keys="image", degree=3, coeff_range=(0.15, 0.35), prob=1.0),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=1.0),
            RandGaussianNoised(keys="image", mean=0.0, std=0.04, prob=1.0),
        ]
    )


def make_case(
    t1: np.ndarray, label: np.ndarray, rs: np.random.RandomState, ignore_slab: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One deformed, intensity-changed case from the template, ``(image float32, label uint8)``."""
    transform = case_transform()
    transform.set_random_state(state=rs)
    out = transform({"image": torch.from_numpy(t1.copy()), "label": torch.from_numpy(label)})
    image = np.asarray(out["image"])[0].astype(np.float32)
    seg = np.rint(np.asarray(out["label"])[0]).astype(np.uint8)
    if ignore_slab:
        rows = np.flatnonzero(seg.any(axis=(0, 1)))
        if rows.size:
            extent = rows[-1] - rows[0] + 1
            thick = int(round(rs.uniform(0.10, 0.25) * extent))
            if rs.rand() < 0.5:
                seg[..., rows[0] : rows[0] + thick] = IGNORE
            else:
                seg[..., rows[-1] - thick + 1 : rows[-1] + 1] = IGNORE
    return 1000.0 * image, seg


def write_cases(
    root: Path,
    prefix: str,
    t1: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    rs: np.random.RandomState,
    num_train: int,
    num_test: int,
) -> dict[str, list]:
    """Write ``num_train`` training cases (with an unlabelled slab) and ``num_test`` fully
    labelled test cases made by :func:`make_case` into ``root`` (MSD layout); return the
    ``"training"`` and ``"test"`` entries of ``dataset.json``."""
    entries: dict[str, list] = {"training": [], "test": []}
    for split, count, folder in (("training", num_train, "Tr"), ("test", num_test, "Ts")):
        (root / f"images{folder}").mkdir(parents=True, exist_ok=True)
        (root / f"labels{folder}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"{prefix}_{split[:2]}{i:03d}.nii.gz"
            image, seg = make_case(t1, label, rs, ignore_slab=split == "training")
            for kind, array in (("images", image), ("labels", seg)):
                img = nib.Nifti1Image(array, affine)
                img.set_qform(affine, code=1)
                img.set_sform(affine, code=1)
                img.header.set_xyzt_units("mm")
                nib.save(img, root / f"{kind}{folder}" / name)
            entries[split].append(
                {"image": f"./images{folder}/{name}", "label": f"./labels{folder}/{name}"}
            )
    return entries


def build(output: str | Path, num_train: int = 24, num_test: int = 8, seed: int = 0) -> Path:
    """Write the dataset into ``output`` (MSD layout) and return the folder.

    Args:
        output: target folder (created; existing case files are overwritten).
        num_train: labelled training cases (``imagesTr``/``labelsTr``).
        num_test: labelled test cases (``imagesTs``/``labelsTs``; ``test`` uses them).
        seed: the only source of randomness: the same seed writes the same arrays.

    Raises:
        ValueError: ``num_train < 1`` or ``num_test < 0``.

    Example:
        >>> build("/tmp/bt", num_train=2, num_test=1)  # doctest: +SKIP
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    root = Path(output)
    t1, label, affine = load_template()
    rs = np.random.RandomState(seed)
    entries = write_cases(root, "brain", t1, label, affine, rs, num_train, num_test)
    info = {
        "name": "BrainTissueMNI",
        "description": (
            "CSF / grey matter / white matter on deformed copies of the ICBM 2009c MNI152 "
            f"template (2 mm), seed {seed}; label {IGNORE} marks unlabelled slabs"
        ),
        "reference": "Fonov et al., NeuroImage 2011 (ICBM 2009c); files shipped with nilearn",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": {**{str(i): n for i, n in enumerate(CLASSES)}, str(IGNORE): "ignore"},
        "numTraining": num_train,
        "numTest": num_test,
        **entries,
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2))
    return root


#: the comparison: group name -> losses (keys of lovasz_monai.tools.recipes.LOSSES)
GROUPS = {
    "main": ["dicece", "lovasz_ce", "lovasz", "ce", "ce_to_lovasz"],
    "lovasz_ce_batch": ["lovasz_ce_batch"],
    "lovasz_ce_nobg": ["lovasz_ce_nobg"],
    "lovasz_ce_lowce": ["lovasz_ce_lowce"],
    "lovasz_ce_mince": ["lovasz_ce_mince"],
    "lovasz_ce_highce": ["lovasz_ce_highce"],
    "lovasz_batch": ["lovasz_batch"],
    "lovasz_all": ["lovasz_all"],
    "ce_to_lovasz_lr01": ["ce_to_lovasz_lr01"],
    "lovasz_ce_csf": ["lovasz_ce_csf", "lovasz_ce_csf_ce"],
    "lovasz_ce_csf3": ["lovasz_ce_csf3"],
    "long": ["dicece", "lovasz_ce_lowce"],
    "dicece_to_lovasz_ce": ["dicece_to_lovasz_ce"],
    "patch64": ["dicece", "lovasz_ce_lowce", "lovasz_ce_csf"],
}
#: groups trained for a multiple of ``--max-epochs``; their results go to ``<RESULTS>/<n>x/``
GROUP_EPOCH_SCALE = {"long": 2}
#: groups with a setup of their own (LovaszCLI overrides); results in ``<RESULTS>/<group>/``
GROUP_OVERRIDES = {"patch64": ["--data.roi_size", "[64,64,64]"]}
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "brain_tissue"
CONFIG = ROOT / "configs" / "brain_tissue.yaml"


def run_comparison(seeds: list[int], epochs: int, groups: list[str]) -> None:
    """Run ``lovasz_monai.experiments compare`` for each group (see :data:`GROUPS`)."""
    for group in groups:
        scale = GROUP_EPOCH_SCALE.get(group, 1)
        if group in GROUP_OVERRIDES:
            output = RESULTS / group / group
        elif scale != 1:
            output = RESULTS / f"{scale}x" / group
        else:
            output = RESULTS / group
        cmd = [sys.executable, "-m", "lovasz_monai.experiments", "compare"]
        cmd += ["--config", str(CONFIG.relative_to(ROOT)), "--seeds", *map(str, seeds)]
        cmd += ["--max-epochs", str(epochs * scale), "--losses", *GROUPS[group]]
        cmd += ["--output", str(output.relative_to(ROOT))]
        cmd += ["--runs-dir", f"runs/brain_tissue/{group}"]
        cmd += ["--bench-repeats", "20" if group == "main" else "0"]
        cmd += GROUP_OVERRIDES.get(group, [])
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)  # relative paths in the written results


def results_table(folder: str | Path = RESULTS, baseline: str = "dicece") -> str:
    """One Markdown table from every comparison JSON in ``folder``: per loss, mean +/- std over
    seeds of mIoU (foreground), IoU per class, mean Dice, Dice per class, and the differences of
    the mean mIoU and of the first counted class's mean IoU to ``baseline``.

    Raises:
        FileNotFoundError: no ``*.json`` in ``folder``.
    """
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no comparison JSON files in {folder}")
    runs: dict[str, list[dict]] = {}
    names: list[str] = []
    counted: list[int] = []
    for path in files:
        data = json.loads(path.read_text())
        names, counted = data["class_names"], data["counted_classes"]
        for run in data["runs"]:
            runs.setdefault(run["loss"], []).append(run)
    per_class = [names[c] for c in counted]
    head = ["loss", "seeds", "mIoU", *[f"IoU {n}" for n in per_class], "Dice"]
    head += [f"Dice {n}" for n in per_class]
    head += [f"mIoU - {baseline}", f"IoU {per_class[0]} - {baseline}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = runs.get(baseline, [])
    base_miou = aggregate([r["miou"] for r in base])[0]
    base_first = aggregate([r["iou"][counted[0]] for r in base])[0]
    order = sorted(runs, key=lambda k: -aggregate([r["miou"] for r in runs[k]])[0])
    for loss in order:
        rs = runs[loss]
        cells = [loss, str(len(rs))]
        for values in (
            [r["miou"] for r in rs],
            *[[r["iou"][c] for r in rs] for c in counted],
            [r["dice"] for r in rs],
            *[[r["dice_per_class"][c] for r in rs] for c in counted],
        ):
            cells.append(format_mean_std(values))
        cells.append(f"{aggregate([r['miou'] for r in rs])[0] - base_miou:+.3f}")
        cells.append(f"{aggregate([r['iou'][counted[0]] for r in rs])[0] - base_first:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the dataset")
    b.add_argument("--output", default="data/brain_tissue")
    b.add_argument("--train", type=int, default=24)
    b.add_argument("--test", type=int, default=8)
    b.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("compare", help="run the loss comparison (after build)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--max-epochs", type=int, default=56)
    c.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    t = sub.add_parser("table", help="merge the comparison JSON files into results.md")
    t.add_argument("--folder", default=str(RESULTS))
    args = parser.parse_args()
    if args.command == "build":
        root = build(args.output, args.train, args.test, args.seed)
        print(f"wrote {args.train} training and {args.test} test cases to {root}")
    elif args.command == "compare":
        run_comparison(args.seeds, args.max_epochs, args.groups)
    else:
        text = results_table(args.folder)
        (Path(args.folder) / "results.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
