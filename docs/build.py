"""Build the documentation site, or refresh the notebook page.

    python docs/build.py               # HTML in docs/_build/html; any warning fails the build
    python docs/build.py --notebook    # notebooks/quickstart.ipynb executed into docs/

The notebook page is a copy of ``notebooks/quickstart.ipynb`` with its outputs (the source is
stored without outputs); ``tests/test_docs.py`` checks that its code is the source's.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
NOTEBOOK_PAGE = DOCS / "quickstart.ipynb"

HOW_TO_RUN = """\
This page is `notebooks/quickstart.ipynb`, executed by `python docs/build.py --notebook` on a
2-core CPU. Run it yourself:

```bash
pip install -e ".[notebook]" && jupyter lab notebooks/quickstart.ipynb  # a few minutes, CPU
LOVASZ_QUICKSTART_SMALL=1 jupyter execute notebooks/quickstart.ipynb     # the tests' tiny run
```

Files go to a temporary folder (set `LOVASZ_QUICKSTART_DIR` to keep them). The test suite executes
the notebook (`tests/test_notebook.py`) and checks the values it computes.
"""


def build(output: Path = DOCS / "_build" / "html", builder: str = "html") -> int:
    """``sphinx-build -E -W --keep-going`` of ``docs/`` (a fresh environment, so that no page
    keeps an old sidebar); returns its exit code."""
    command = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", builder]
    return subprocess.call([*command, str(DOCS), str(output)], cwd=ROOT)


def execute_notebook(timeout: int = 1800) -> Path:
    """Execute the quick-start notebook (full setting) and write the page's copy."""
    import nbformat
    from nbclient import NotebookClient

    source = nbformat.read(NOTEBOOK, as_version=4)
    notebook = copy.deepcopy(source)
    with tempfile.TemporaryDirectory() as workdir:
        env = {"LOVASZ_QUICKSTART_DIR": workdir}
        previous = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            NotebookClient(
                notebook, timeout=timeout, resources={"metadata": {"path": str(ROOT)}}
            ).execute()
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    title = notebook.cells[0]
    notebook.cells.insert(1, nbformat.v4.new_markdown_cell(HOW_TO_RUN))
    assert title.cell_type == "markdown"
    for cell in notebook.cells:
        cell.get("metadata", {}).pop("execution", None)
        # warnings on stderr name this machine's paths and say nothing about the package
        outputs = cell.get("outputs", [])
        cell["outputs"] = [o for o in outputs if o.get("name") != "stderr"] if outputs else outputs
    nbformat.write(notebook, NOTEBOOK_PAGE)
    return NOTEBOOK_PAGE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notebook", action="store_true", help="refresh docs/quickstart.ipynb")
    parser.add_argument("--output", default=str(DOCS / "_build" / "html"))
    args = parser.parse_args()
    if args.notebook:
        print(execute_notebook())
        return
    code = build(Path(args.output))
    if code == 0:
        print(f"built {args.output}/index.html")
    sys.exit(code)


if __name__ == "__main__":
    main()
