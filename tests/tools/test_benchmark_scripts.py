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
    same loss as this checkout (the first commit with the exact cut, 98f32d5, on an input the
    cut applies to): the same value, and the same gradient up to the rounding of the shared
    log-softmax that came later (a relative 3e-6 here)."""
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
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-12)
    # the training-step variants build a recipe's loss from the other package's classes
    loss = script.recipe_loss(package, "lovasz_ce_lowce_batch")
    assert type(loss).__module__.startswith("lovasz_monai_98f32d5.")
    assert (loss.lambda_ce, loss.lovasz.batch) == (0.3, True)
    for name in [name for name in sys.modules if name.startswith("lovasz_monai_98f32d5")]:
        del sys.modules[name]  # the copy lives in tmp_path, which pytest removes


def test_loss_split_times_the_lovasz_rows_inside_each_step(monkeypatch):
    """``loss_split.py`` splits the default loss's time: the wrapped row function is the one the
    loss calls, and each step records the time spent in it."""
    import lovasz_monai
    from lovasz_monai.functional import rows

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports pruned_sort
    script = _script("loss_split.py")
    monkeypatch.setattr(rows, "_class_rows_by_sort", rows._class_rows_by_sort)  # undone after
    clock = script.time_rows(lovasz_monai)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 8, 8, 8, generator=gen)
    labels = torch.randint(0, 3, (1, 1, 8, 8, 8), generator=gen)
    per_step: list[float] = []
    step = script.loss_step(LovaszCELoss(to_onehot_y=True), logits, labels, clock, per_step)
    step()
    step()
    assert len(per_step) == 2 and all(seconds > 0 for seconds in per_step)
    assert clock[0] == pytest.approx(sum(per_step))
