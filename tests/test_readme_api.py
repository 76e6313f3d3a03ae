"""The README's API table names what the package has, and the public functions are in it."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import lovasz_monai
from lovasz_monai import evaluation, functional, labels, losses, objective

README = Path(__file__).resolve().parents[1] / "README.md"


def api_table_names() -> list[str]:
    """The backticked names of the first column of the ``## API`` table (commands left out)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        names += [n for n in re.findall(r"`([^`]+)`", first_cell) if " " not in n and "-" not in n]
    return names


def resolve(name: str) -> object:
    """``lovasz_monai.<name>``: a module, or an attribute of one (``module.Class.method``)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(["lovasz_monai", *parts[:cut]]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    obj = lovasz_monai
    for attribute in parts:
        obj = getattr(obj, attribute)
    return obj


def test_the_table_is_found():
    names = api_table_names()
    assert len(names) > 30
    assert "functional.decode_target" in names and "LovaszSoftmaxLoss" in names


@pytest.mark.parametrize("name", api_table_names())
def test_every_name_in_the_table_exists(name):
    if name.startswith("nnunet."):
        pytest.importorskip("nnunetv2", reason="the nnunet extra")
    assert resolve(name) is not None


def test_every_public_nnunet_name_is_in_the_table():
    pytest.importorskip("nnunetv2", reason="the nnunet extra")
    from lovasz_monai import nnunet

    names = set(api_table_names())
    # the short variants (_5epochs, _tiny) are listed in the README's nnU-Net section
    public = [
        n for n in nnunet.__all__ if not n.isupper() and not n.endswith(("_5epochs", "_tiny"))
    ]
    missing = [n for n in public if f"nnunet.{n}" not in names]
    assert not missing, f"public names missing from the README's API table: {missing}"


@pytest.mark.parametrize(
    ("module", "prefix"),
    [
        (functional, "functional."),
        (losses, ""),
        (lovasz_monai, ""),
        (labels, "labels."),
        (objective, "objective."),
        (evaluation, "evaluation."),
    ],
)
def test_every_public_name_is_in_the_table(module, prefix):
    names = set(api_table_names())
    constants = {n for n in module.__all__ if n.isupper() or n in ("Method", "__version__")}
    missing = [n for n in module.__all__ if n not in constants and f"{prefix}{n}" not in names]
    missing = [n for n in missing if f"losses.{n}" not in names]
    assert not missing, f"public names missing from the README's API table: {missing}"
