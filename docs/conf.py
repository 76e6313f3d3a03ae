"""Sphinx configuration of the lovasz_monai documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``docs/build.py``
runs the same, as does the test suite).
"""

from __future__ import annotations

import re

import lovasz_monai

project = "lovasz_monai"
author = "lovasz_monai developers"
copyright = "2026, lovasz_monai developers"  # noqa: A001 (Sphinx's name)
release = lovasz_monai.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
    "sphinx_copybutton",
]

# -- sources ----------------------------------------------------------------------------------
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "build.py", "screenshots.py", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath"]
myst_heading_anchors = 3  # GitHub-style anchors, so that links like page.md#section resolve
nb_execution_mode = "off"  # the notebook page shows the outputs stored by docs/build.py

# -- API reference ----------------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Shapes", "params_style")]
napoleon_attr_annotations = True

# Broken references to this package fail the build; references to other packages' objects
# (torch, MONAI, Lightning, ...) are left as plain text: no intersphinx (no network in CI).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|monai|pytorch_lightning|lightning|torchmetrics|numpy|np|nib|nibabel)\b.*"),
    (r"py:.*", r"(Tensor|Path|Any|Callable|Sequence|Mapping|Iterator|Literal|TypeVar|T|_T)"),
    (r"py:.*", r"(collections|typing|types|os|pathlib|contextlib|dataclasses|enum)\..*"),
    (
        r"py:.*",
        r"(nn\.Module|nn\..*|Metric|LossReduction|KeysCollection|Namespace|Logger|.*Tensor)",
    ),
    (r"py:.*", r"(nnunetv2|batchgenerators|jsonargparse|yaml|statistics)\b.*"),
    (r"py:.*", r"(Module|Method|.*\.T|.*\._T|.*\._\w+)"),  # aliases, TypeVars, private bases
    (r"py:class", r"(optional|callable|default.*|sequence|int|float|str|bool|None|object)"),
]


def _resolve_short_reference(app, env, node, contnode):  # noqa: ANN001 (Sphinx's signature)
    """Resolve a reference written as a short name (``:func:`run_one``` in a sibling module) to
    the one documented object of this package whose full name ends with it; ambiguous or unknown
    names stay unresolved (and fail the build)."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    domain = env.get_domain("py")
    found = [
        name
        for name, entry in domain.objects.items()
        if name.startswith("lovasz_monai.") and (name == target or name.endswith("." + target))
    ]
    if len(found) != 1:
        return None
    node["reftarget"] = found[0]
    return domain.resolve_xref(
        env, node.get("refdoc"), app.builder, node["reftype"], found[0], node, contnode
    )


# -- HTML -------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"lovasz_monai {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# the nnU-Net section of the API reference needs the nnunet extra
try:
    import lovasz_monai.nnunet  # noqa: F401

    tags.add("nnunet")  # noqa: F821 (Sphinx's global)
    HAS_NNUNET = True
except ImportError:
    HAS_NNUNET = False

#: the ``.. only:: nnunet`` block of the API page: its indented lines and the blank ones
_NNUNET_ONLY_BLOCK = re.compile(r"^\.\. only:: nnunet\n(?:[ \t]*\n|   .*\n)*", re.MULTILINE)


def _drop_nnunet_api(app, docname: str, source: list[str]) -> None:  # noqa: ANN001
    """Without nnunetv2, take the nnU-Net autodoc directives out of the API page: ``only``
    drops them from the output, but Sphinx still runs them, and their failed imports are
    warnings (errors with -W)."""
    if docname == "api":
        source[0] = _NNUNET_ONLY_BLOCK.sub("", source[0])


def setup(app):  # noqa: ANN001, ANN201
    app.connect("missing-reference", _resolve_short_reference)
    if not HAS_NNUNET:
        app.connect("source-read", _drop_nnunet_api)
