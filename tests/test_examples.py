"""Every example runs as a script and passes its own checks; each is also a valid notebook."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(
    path for pattern in ("plot_*.py", "example_*.py") for path in EXAMPLES_DIR.glob(pattern)
)


def test_there_are_examples():
    assert EXAMPLES, f"no plot_*.py or example_*.py in {EXAMPLES_DIR}"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs(example, tmp_path):
    """Run in a fresh interpreter, in an empty directory, drawing off-screen."""
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(example)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{example.name} failed:\n{result.stderr[-5000:]}"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_is_a_gallery_page_that_checks_itself(example):
    text = example.read_text()
    docstring = re.match(r'^[rR]?"""\n?(.+?)\n(=+)\n', text)
    assert docstring, f"{example.name} must open with a docstring whose title is underlined by ==="
    assert len(docstring.group(2)) >= len(docstring.group(1).strip())
    assert "# %%" in text, f"{example.name} must use percent-format cells"
    assert re.search(r"\bassert\b|assert_passed\(|assert_close\(", text), (
        f"{example.name} must check its numbers (assert) against autograd"
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_converts_to_a_notebook(example):
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    notebook = jupytext.reads(example.read_text(), fmt="py:percent")
    nbformat.validate(notebook)
    assert sum(cell.cell_type == "code" for cell in notebook.cells) >= 2
