"""Smoke test of the real-anatomy dataset builder (experiments/brain_tissue.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lovasz_monai.data import SegmentationDataModule

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "brain_tissue.py"


@pytest.fixture(scope="module")
def brain_tissue():
    spec = importlib.util.spec_from_file_location("brain_tissue", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_template_labels_are_brain_tissue(brain_tissue):
    t1, label, affine = brain_tissue.load_template()
    assert t1.shape == label.shape and t1.ndim == 3
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), 2.0)  # 2 mm voxels
    fractions = np.bincount(label.ravel(), minlength=4) / label.size
    assert set(np.unique(label)) == {0, 1, 2, 3}
    # inside the brain: grey matter > white matter > CSF, each a real share
    assert fractions[2] > fractions[3] > fractions[1] > 0.03
    # the image is brighter in white than in grey matter than in CSF (T1 contrast)
    means = [t1[label == c].mean() for c in (1, 2, 3)]
    assert means[0] < means[1] < means[2]


def test_build_is_deterministic_and_readable(brain_tissue, tmp_path):
    a = brain_tissue.build(tmp_path / "a", num_train=2, num_test=1, seed=3)
    b = brain_tissue.build(tmp_path / "b", num_train=2, num_test=1, seed=3)
    c = brain_tissue.build(tmp_path / "c", num_train=2, num_test=1, seed=4)
    info = json.loads((a / "dataset.json").read_text())
    assert info["labels"]["255"] == "ignore" and len(info["training"]) == 2
    first = info["training"][0]["label"]
    la, lb, lc = (np.asarray(nib.load(str(r / first)).dataobj) for r in (a, b, c))
    np.testing.assert_array_equal(la, lb)
    assert (la != lc).mean() > 0.01  # another seed, another deformation
    assert (la == 255).any() and set(np.unique(la)) <= {0, 1, 2, 3, 255}
    # two cases of one seed differ: each is its own deformation of the template
    second = np.asarray(nib.load(str(a / info["training"][1]["label"])).dataobj)
    assert (la != second).mean() > 0.01
    dm = SegmentationDataModule(a, roi_size=(32, 32, 32), val_fraction=0.5, num_workers=0)
    assert dm.class_names == list(brain_tissue.CLASSES) and dm.ignore_index == 255
    assert len(dm.test_files) == 1  # the labelled test case is used by `test`
    with pytest.raises(ValueError, match="num_train"):
        brain_tissue.build(tmp_path / "d", num_train=0)


def test_results_table_merges_comparisons(brain_tissue, tmp_path):
    def run(loss, seed, miou, csf):
        return {
            "loss": loss,
            "seed": seed,
            "miou": miou,
            "dice": miou + 0.1,
            "iou": [0.99, csf, 0.8, 0.8],
            "dice_per_class": [0.99, csf + 0.1, 0.9, 0.9],
        }

    common = {"class_names": list(brain_tissue.CLASSES), "counted_classes": [1, 2, 3]}
    runs_a = [run("dicece", s, m, c) for s, (m, c) in enumerate([(0.70, 0.50), (0.72, 0.52)])]
    runs_b = [run("lovasz_ce", s, m, c) for s, (m, c) in enumerate([(0.73, 0.56), (0.75, 0.58)])]
    (tmp_path / "a.json").write_text(json.dumps({**common, "runs": runs_a}))
    (tmp_path / "b.json").write_text(json.dumps({**common, "runs": runs_b}))
    lines = brain_tissue.results_table(tmp_path).splitlines()
    assert lines[0].startswith("| loss | seeds | mIoU | IoU CSF | IoU grey matter |")
    best, base = lines[2].split(" | "), lines[3].split(" | ")
    assert best[0] == "| lovasz_ce" and base[0] == "| dicece"
    assert best[2] == "0.740 ± 0.014"  # mean and sample std of 0.73, 0.75
    assert best[7] == "0.670 ± 0.014"  # Dice of CSF
    assert best[-2:] == ["+0.030", "+0.060 |"]  # mIoU and CSF IoU above Dice+CE
    with pytest.raises(FileNotFoundError):
        brain_tissue.results_table(tmp_path / "none")


def test_compare_groups_write_their_own_folders(brain_tissue, monkeypatch):
    commands = []
    monkeypatch.setattr(brain_tissue.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    brain_tissue.run_comparison([0, 1], 10, ["main", "long", "patch64"])

    def option(cmd, name):
        return cmd[cmd.index(name) + 1]

    main, long, patch64 = commands
    assert option(main, "--output") == "experiments/brain_tissue/main"
    assert option(main, "--max-epochs") == "10" and "--data.roi_size" not in main
    assert option(long, "--output") == "experiments/brain_tissue/2x/long"
    assert option(long, "--max-epochs") == "20"
    assert option(patch64, "--output") == "experiments/brain_tissue/patch64/patch64"
    assert option(patch64, "--data.roi_size") == "[64,64,64]"
    assert option(patch64, "--max-epochs") == "10"
    assert patch64[patch64.index("--losses") + 1 : patch64.index("--output")] == [
        "dicece",
        "lovasz_ce_lowce",
        "lovasz_ce_csf",
    ]
    assert patch64[patch64.index("--seeds") + 1 : patch64.index("--max-epochs")] == ["0", "1"]
