"""Tests of the scripts in benchmarks/ that the recorded results depend on."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lovasz_monai.losses import LovaszCELoss

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has_commit(commit: str) -> bool:
    done = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True
    )
    return done.returncode == 0


@pytest.mark.skipif(not _has_commit("98f32d5"), reason="needs the repository's git history")
def test_package_at_a_commit_imports_beside_this_checkout(tmp_path, monkeypatch):
    """``pruned_sort.py --against COMMIT`` times the package of another commit in the same
    process: a renamed copy that imports its own modules, not this checkout's, and computes the
    same loss as this checkout where the loss has not changed (the first commit with the
    exact cut, 98f32d5, on an input the cut applies to)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [name for name in sys.modules if name.startswith("lovasz_monai_98f32d5")]:
        monkeypatch.delitem(sys.modules, name)  # a copy left by an earlier call
    script = _script("pruned_sort.py")
    package = script.package_at("98f32d5", tmp_path)
    assert sys.path[0] == str(tmp_path)
    assert package.__name__ == "lovasz_monai_98f32d5"
    assert Path(package.__file__).parent.name == "lovasz_monai_98f32d5"
    assert package.functional.rows.__name__ == "lovasz_monai_98f32d5.functional.rows"
    assert "lovasz_monai_98f32d5" in sys.modules and "lovasz_monai" in sys.modules
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 12, 32, 32, 32, generator=gen)
    labels = torch.randint(0, 9, (2, 1, 32, 32, 32), generator=gen)
    for kwargs in ({}, {"batch": True}):
        ours, theirs = (logits.clone().requires_grad_(True) for _ in range(2))
        value = LovaszCELoss(to_onehot_y=True, **kwargs)(ours, labels)
        value.backward()
        expected = package.LovaszCELoss(to_onehot_y=True, **kwargs)(theirs, labels)
        expected.backward()
        assert value.item() == expected.item()
        assert torch.equal(ours.grad, theirs.grad)
    # the training-step variants build a recipe's loss from the other package's classes
    loss = script.recipe_loss(package, "lovasz_ce_lowce_batch")
    assert type(loss).__module__.startswith("lovasz_monai_98f32d5.")
    assert (loss.lambda_ce, loss.lovasz.batch) == (0.3, True)
    for name in [name for name in sys.modules if name.startswith("lovasz_monai_98f32d5")]:
        del sys.modules[name]  # the copy lives in tmp_path, which pytest removes
