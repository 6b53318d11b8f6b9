"""Sphinx configuration of the curvkit documentation."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Document this checkout, not whichever curvkit is installed: the path goes in before the import.
sys.path.insert(0, str(ROOT))

import curvkit  # noqa: E402

# Examples run while the gallery builds: render their figures off-screen.
os.environ.setdefault("MPLBACKEND", "Agg")

project = "curvkit"
author = "curvkit developers"
copyright = "2026, curvkit developers"
release = curvkit.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "gallery/*.ipynb", "gallery/*.py", "**/*.zip", "**/*.md5"]
templates_path: list[str] = []

# Google-style docstrings only; keep the signature readable and move the types to the text.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}

myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "gallery",
    # Every example in the gallery is executed (and so checked by its own asserts).
    "filename_pattern": r"[\\/](plot|example)_",
    "ignore_pattern": r"__init__\.py",
    "download_all_examples": True,
    "abort_on_example_error": True,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
}

html_theme = "furo"
html_title = f"curvkit {release}"


def _vendored_mathjax() -> Path:
    """MathJax's single-file SVG build from the installed ``django-static-mathjax`` package.

    The site then carries its own copy (``_static/tex-svg.js``): formulas render without a
    network connection, and the build needs none either. No fallback to a CDN: a missing
    package is an error, not a site whose formulas silently need the internet.
    """
    spec = importlib.util.find_spec("mathjax")
    locations = [] if spec is None else list(spec.submodule_search_locations or [])
    for location in locations:
        script = Path(location) / "static" / "mathjax" / "es5" / "tex-svg.js"
        if script.is_file():
            return script
    raise RuntimeError(
        "the documentation bundles MathJax from the django-static-mathjax package; install "
        "the docs extra: pip install -e '.[docs]'"
    )


html_static_path = [str(_vendored_mathjax())]
mathjax_path = "tex-svg.js"
