"""Executes notebooks/quickstart.ipynb in its small setting and checks what its cells computed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
MARKER = "QUICKSTART_RESULTS="
CELL_TIMEOUT = 300  # seconds per cell; the whole small run takes well under a minute


def test_notebook_is_stored_clean_and_small():
    assert NOTEBOOK.stat().st_size < 1_000_000
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    text = "\n".join(c.source for c in nb.cells)
    for section in ("## 1.", "## 2.", "## 3.", "## 4."):
        assert section in text
    assert "LOVASZ_QUICKSTART_SMALL" in text


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[object, Path]:
    """The notebook executed with LOVASZ_QUICKSTART_SMALL=1, its files in a temporary folder."""
    workdir = tmp_path_factory.mktemp("quickstart")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this environment
        mp.setenv("LOVASZ_QUICKSTART_SMALL", "1")
        mp.setenv("LOVASZ_QUICKSTART_DIR", str(workdir / "work"))
        mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        client = nbclient.NotebookClient(
            nb,
            timeout=CELL_TIMEOUT,
            kernel_name="python3",
            resources={"metadata": {"path": str(workdir)}},  # the kernel's working directory
        )
        client.execute()  # raises CellExecutionError on the first failing cell
    return nb, workdir


def _gradient_table(nb) -> dict[str, tuple[float, float, float]]:
    """The table printed by section 2: loss -> (value, max|grad| ignored, mean|grad| valid)."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "") if output.get("output_type") == "stream" else ""
            if "mean|grad| valid" not in text:
                continue
            lines = text.splitlines()
            start = next(i for i, ln in enumerate(lines) if "mean|grad| valid" in ln) + 1
            table = {}
            for line in lines[start:]:
                name, *numbers = line.rsplit(maxsplit=3)
                if len(numbers) != 3:
                    break
                table[name.strip()] = tuple(float(x) for x in numbers)
            return table
    raise AssertionError("the notebook printed no gradient table")


def _training_log(workdir: Path) -> list[dict[str, str]]:
    (path,) = (workdir / "work" / "logs").rglob("metrics.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _results(nb) -> dict:
    for cell in reversed(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and MARKER in output.get("text", ""):
                line = next(ln for ln in output["text"].splitlines() if ln.startswith(MARKER))
                return json.loads(line[len(MARKER) :])
    raise AssertionError("the notebook printed no results line")


@pytest.mark.slow
def test_notebook_runs_without_errors(executed):
    nb, workdir = executed
    errors = [
        output
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    images = [
        output
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= 5  # surface, gradients, ignore mask, learning curves, overlays
    # everything was written below the temporary folder
    assert (workdir / "work" / "data" / "dataset.json").is_file()
    assert list((workdir / "work" / "logs").rglob("metrics.csv"))
    assert (workdir / "work" / "bundle.yaml").is_file()


@pytest.mark.slow
def test_notebook_lovasz_extension_section(executed):
    results = _results(executed[0])
    assert results["small"] is True
    # the Lovász extension equals the Jaccard loss on every corner of {0,1}^P (P = 2, 3)
    assert results["max_corner_error"] < 1e-6
    # the Lovász weights of a row are >= 0 and sum to 1
    assert results["lovasz_row_grad_sum"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_notebook_ignored_voxels_have_zero_gradient(executed):
    results = _results(executed[0])
    grads = results["ignored_grad_max"]
    assert set(grads) == {
        "label map + ignore_index",
        "one-hot + mask",
        "sigmoid multi-label + mask",
        "hinge (binary) + mask",
        "Lovász + CE, ignore_index",
    }
    assert all(value == 0.0 for value in grads.values())
    assert results["labelmap_vs_mask_diff"] < 1e-6
    # ... while the valid voxels do get a gradient (a loss without gradient fails), and the
    # measurement can see one on ignored voxels: MONAI's DiceCELoss has no mask. Measured
    # (deterministic: seeded inputs, float32), mean|grad| valid: label map and one-hot 1.25e-5,
    # sigmoid 8.79e-6, hinge 1.39e-4, Lovász + CE 7.35e-5, DiceCE 6.10e-5; DiceCE's max|grad|
    # on ignored voxels 1.22e-4; loss values 0.783, 0.783, 0.829, 2.654, 2.171, 2.196
    table = _gradient_table(executed[0])
    assert set(table) == set(grads) | {"MONAI DiceCELoss (no mask)"}
    for name, (value, ignored, valid) in table.items():
        assert value > 0.1 and valid > 1e-6, name
        assert ignored == grads.get(name, ignored), name  # the printed and the returned agree
    assert table["MONAI DiceCELoss (no mask)"][1] > 1e-5


#: the small run trains 4 steps: its network is still close to its random initialisation.
#: Measured (2-core CPU, deterministic over 3 runs): val/mIoU 0.0088 after epoch 1 and 0.0097
#: after epoch 2 (IoU class_1 0.0051, class_2 0.0143; background 0.43, so the network predicts
#: foreground in much of the volume), val/loss 2.014 -> 1.938. An all-background prediction
#: scores exactly 0 (foreground IoU 0), and an unchanged network has the same val/loss twice.
SMALL_MIN_MIOU = 0.002
SMALL_MIN_VAL_LOSS_DROP = 0.01


@pytest.mark.slow
def test_notebook_training_and_config_sections(executed):
    nb, workdir = executed
    results = _results(nb)
    assert SMALL_MIN_MIOU <= results["train_final_miou"] <= 1.0
    assert results["train_logged_steps"] == 4  # 2 epochs x 2 batches, logged every step
    rows = _training_log(workdir)
    val = [r for r in rows if r.get("val/mIoU")]
    assert [int(r["epoch"]) for r in val] == [0, 1]
    assert float(val[-1]["val/mIoU"]) == pytest.approx(results["train_final_miou"], abs=1e-6)
    # the same validation volume after 2 and after 4 steps: the updates lowered its loss
    losses = [float(r["val/loss"]) for r in val]
    assert losses[1] < losses[0] - SMALL_MIN_VAL_LOSS_DROP, losses
    steps = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(steps) == 4 and all(map(math.isfinite, steps))
    assert results["bundle_loss_matches"] is True
    assert results["cli_schedule"] == [0.0, 0.0, 0.0, 0.33, 0.67, 1.0, 1.0, 1.0]
    assert results["cli_num_classes"] == 3


def test_notebook_does_not_touch_the_repository():
    """The notebook writes only below WORKDIR (a temporary folder or LOVASZ_QUICKSTART_DIR)."""
    source = "\n".join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells)
    assert "WORKDIR" in source and "tempfile.mkdtemp" in source
    assert "os.chdir" not in source
