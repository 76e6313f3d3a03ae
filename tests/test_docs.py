"""The documentation site builds without a warning, its API reference has every public name,
the notebook page is the notebook, and the README's links lead to the pages that moved."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import lovasz_monai

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
pytest.importorskip("sphinx", reason="the docs extra")
pytest.importorskip("myst_nb", reason="the docs extra")


def public_modules() -> list[str]:
    """Every module of the package with an ``__all__`` (nnunet only with nnunetv2 installed)."""
    names = []
    for info in pkgutil.walk_packages(lovasz_monai.__path__, "lovasz_monai."):
        if ".nnunet" in info.name:
            try:
                importlib.import_module("lovasz_monai.nnunet")
            except ImportError:
                continue
        if info.name.endswith("nnunet.extension") or ".extension." in info.name:
            continue
        module = importlib.import_module(info.name)
        if hasattr(module, "__all__"):
            names.append(info.name)
    return ["lovasz_monai", *names]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """``docs/build.py``'s build (warnings are errors) into a temporary folder."""
    output = tmp_path_factory.mktemp("html")
    done = subprocess.run(
        [sys.executable, str(DOCS / "build.py"), "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (
        f"the docs build failed:\n{done.stdout[-4000:]}{done.stderr[-8000:]}"
    )
    return output


def inventory(built: Path) -> set[str]:
    from sphinx.util.inventory import InventoryFile

    with open(built / "objects.inv", "rb") as stream:
        data = InventoryFile.load(stream, "", lambda base, uri: uri)
    return {name for kind, entries in data.items() if kind.startswith("py:") for name in entries}


@pytest.mark.slow
def test_the_site_builds_without_warnings_and_has_its_pages(built):
    for page in ["index", "getting_started", "quickstart", "api", "changelog"]:
        assert (built / f"{page}.html").is_file(), page
    guides = sorted(p.stem for p in (DOCS / "guides").glob("*.md"))
    assert len(guides) >= 8
    for guide in guides:
        assert (built / "guides" / f"{guide}.html").is_file(), guide
    notebook = (built / "quickstart.html").read_text(encoding="utf-8")
    assert "<img" in notebook, "the notebook page shows no figure"


@pytest.mark.slow
@pytest.mark.parametrize("module_name", public_modules())
def test_every_public_name_is_in_the_api_reference(built, module_name):
    """Each name of ``__all__`` is documented under some path of the package that holds the
    same object (a package documents the names it gathers from its modules)."""
    documented = inventory(built)
    module = importlib.import_module(module_name)

    def resolve(path: str) -> object:
        owner, _, attribute = path.rpartition(".")
        try:
            return getattr(importlib.import_module(owner), attribute)
        except (ImportError, AttributeError):
            return None

    missing = []
    for name in module.__all__:
        if name == "__version__":
            continue
        obj = getattr(module, name)
        paths = [d for d in documented if d.rpartition(".")[2] == name]
        if not any(resolve(path) is obj for path in paths):
            missing.append(name)
    assert not missing, f"{module_name}: not in the API reference: {missing}"


@pytest.mark.parametrize("module_name", public_modules())
def test_every_public_name_has_a_docstring(module_name):
    module = importlib.import_module(module_name)
    assert inspect.getdoc(module), f"{module_name} has no module docstring"
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__ and obj.__doc__.strip(), f"{module_name}.{name} has no docstring"


def _code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def test_the_notebook_page_is_the_notebook_with_outputs():
    """``docs/quickstart.ipynb`` is ``notebooks/quickstart.ipynb`` executed by
    ``python docs/build.py --notebook``: the same code, with outputs."""
    page, source = DOCS / "quickstart.ipynb", ROOT / "notebooks" / "quickstart.ipynb"
    assert _code_cells(page) == _code_cells(source), "run: python docs/build.py --notebook"
    cells = json.loads(page.read_text(encoding="utf-8"))["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    # no stderr (warnings name the machine's paths): nothing machine-specific in the repo
    assert not [o for o in outputs if o.get("name") == "stderr"]


def test_the_readme_is_a_front_page_that_links_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme) < 12_000, "the README is a front page: the rest belongs in docs/"
    assert readme.split("```bash\n", 1)[1].startswith("# 1. install, then train the demo")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not link.startswith("http")]
    broken = [link for link in local if not (ROOT / link).exists()]
    assert not broken, f"README links to missing files: {broken}"
    pages = {f"docs/guides/{p.name}" for p in (DOCS / "guides").glob("*.md")}
    pages.add("docs/getting_started.md")
    assert pages <= set(local), f"pages not linked from the README: {pages - set(local)}"


def test_docs_links_between_pages_resolve():
    """Relative Markdown links of the pages point at files that exist (Sphinx checks the
    anchors; this also holds for readers of the Markdown files on a forge)."""
    for page in [*DOCS.glob("*.md"), *(DOCS / "guides").glob("*.md")]:
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / link).exists(), f"{page.name}: broken link {link}"


def _conf(monkeypatch, nnunet_importable: bool) -> dict:
    """``docs/conf.py``'s namespace, with ``lovasz_monai.nnunet`` importable or not."""
    import runpy

    module = types.ModuleType("lovasz_monai.nnunet") if nnunet_importable else None
    monkeypatch.setitem(sys.modules, "lovasz_monai.nnunet", module)  # None: ImportError
    tags = types.SimpleNamespace(add=lambda tag: None)
    return runpy.run_path(str(DOCS / "conf.py"), init_globals={"tags": tags})


@pytest.mark.parametrize("nnunet_importable", [False, True])
def test_without_nnunetv2_the_api_page_keeps_no_nnunet_autodoc(monkeypatch, nnunet_importable):
    """Where nnunetv2 is missing, ``conf.py`` takes the nnU-Net autodoc directives out of the API
    page before Sphinx runs them (their imports would fail the build) and keeps the note that
    says how to get them; other pages and the rest of the API page are left as they are. Where
    it is installed, the page is read as it is."""
    conf = _conf(monkeypatch, nnunet_importable)
    events = []
    conf["setup"](types.SimpleNamespace(connect=lambda event, fn: events.append((event, fn))))
    hooks = [fn for event, fn in events if event == "source-read"]
    assert conf["HAS_NNUNET"] is nnunet_importable
    if nnunet_importable:
        assert hooks == []
        return
    assert hooks == [conf["_drop_nnunet_api"]]
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    block = api.index(".. only:: nnunet")
    assert "automodule:: lovasz_monai.nnunet" in api[block:]
    source = [api]
    hooks[0](None, "api", source)
    assert source[0] == api[:block] + api[api.index(".. only:: not nnunet") :]
    assert "lovasz_monai.nnunet" not in source[0]
    other = [api]
    hooks[0](None, "guides/nnunet", other)
    assert other == [api]
