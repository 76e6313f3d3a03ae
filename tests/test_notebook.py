"""Executes notebooks/quickstart.ipynb in its small setting and checks what its cells computed."""

from __future__ import annotations

import json
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


@pytest.mark.slow
def test_notebook_training_and_config_sections(executed):
    results = _results(executed[0])
    assert 0.0 <= results["train_final_miou"] <= 1.0
    assert results["train_logged_steps"] == 4  # 2 epochs x 2 batches, logged every step
    assert results["bundle_loss_matches"] is True
    assert results["cli_schedule"] == [0.0, 0.0, 0.0, 0.33, 0.67, 1.0, 1.0, 1.0]
    assert results["cli_num_classes"] == 3


def test_notebook_does_not_touch_the_repository():
    """The notebook writes only below WORKDIR (a temporary folder or LOVASZ_QUICKSTART_DIR)."""
    source = "\n".join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells)
    assert "WORKDIR" in source and "tempfile.mkdtemp" in source
    assert "os.chdir" not in source
