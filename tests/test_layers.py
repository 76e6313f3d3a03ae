"""The package's import graph keeps its layers: math -> losses -> data / module -> CLI -> tools."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lovasz_monai"

# layer of each top-level part of the package; a module may import only from its own or lower
# layers (the package root re-exports the losses and counts as the losses layer)
LAYERS = {
    "functional": 0,
    "case_names": 0,
    "losses": 1,
    "transforms": 1,
    "dataset": 1,
    "synthetic": 1,
    "writer": 1,
    "metrics": 1,
    "deep_supervision": 1,
    "precision": 1,
    "labels": 1,
    "objective": 1,
    "evaluation": 1,
    "pipelines": 1,
    "hparams": 1,
    "data": 2,
    "module": 2,
    "nnunet": 2,
    "cli": 3,
    "tools": 4,
    "benchmark": 5,
    "experiments": 5,
}


def module_name(path: Path) -> str:
    parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (any depth, lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def part(name: str) -> str | None:
    """``functional`` for ``lovasz_monai.functional.rows``; None for the root or other packages."""
    pieces = name.split(".")
    if pieces[0] != "lovasz_monai" or len(pieces) < 2:
        return None
    return pieces[1] if pieces[1] in LAYERS else None


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in SOURCES}
    assert parts - {"__init__"} <= set(LAYERS), parts - set(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_go_down_the_layers(path):
    own = part(module_name(path))
    if own is None:  # the package root
        return
    upward = [
        name
        for name in imports(path)
        if part(name) is not None and LAYERS[part(name)] > LAYERS[own]
    ]
    assert not upward, f"{module_name(path)} (layer {own}) imports from above: {upward}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "functional").glob("*.py")), ids=str)
def test_the_math_knows_nothing_of_monai_or_lightning(path):
    frameworks = {"monai", "pytorch_lightning", "lightning", "torchmetrics"}
    used = {name.split(".")[0] for name in imports(path)} & frameworks
    assert not used, f"{path.name} imports {used}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "losses").glob("*.py")), ids=str)
def test_the_losses_know_nothing_of_lightning(path):
    used = {name.split(".")[0] for name in imports(path)}
    assert not used & {"pytorch_lightning", "lightning", "torchmetrics"}


@pytest.mark.parametrize(
    "name", ["dataset", "labels", "objective", "evaluation", "metrics", "pipelines", "synthetic"]
)
def test_the_parts_the_module_composes_know_nothing_of_lightning(name):
    used = {n.split(".")[0] for n in imports(PACKAGE / f"{name}.py")}
    assert not used & {"pytorch_lightning", "lightning"}, name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_nnunet_is_imported_in_the_nnunet_subpackage_only(path):
    """nnunetv2 is an optional extra: the rest of the package must import without it."""
    uses = any(name.split(".")[0] == "nnunetv2" for name in imports(path))
    assert not uses or part(module_name(path)) == "nnunet", module_name(path)


@pytest.mark.parametrize("path", sorted((PACKAGE / "nnunet").rglob("*.py")), ids=str)
def test_the_nnunet_trainers_know_nothing_of_lightning(path):
    used = {name.split(".")[0] for name in imports(path)}
    assert not used & {"pytorch_lightning", "lightning", "torchmetrics"}
