"""The documentation: the site builds with -W, and the migration guide's code runs and agrees."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peer_warnings import BACKPACK_FULL_BACKWARD_HOOK, CURVLINOPS_JIT_SCRIPT

DOCS = Path(__file__).resolve().parents[1] / "docs"
MIGRATING = DOCS / "migrating.rst"
GETTING_STARTED = DOCS / "getting_started.rst"

#: The variables each pair of side-by-side snippets must agree on.
PAIRS = {
    "backpack-diagonal": ["diagonal"],
    "backpack-product": ["product"],
    "backpack-batchgrad": ["gradients", "diagonal"],
    "curvlinops-operators": ["product", "ef_product"],
    "curvlinops-kfac": ["product", "inverse_product"],
    "vivit-eigh": ["evals"],
    "vivit-newton": ["step"],
    "pyro-newton": ["mode", "cov"],
    "pyro-optim": ["x"],
    "secorder-diagonal": ["diagonal"],
    "kronfluence-scores": ["scores", "self_influence"],
}


def snippets(page: Path = MIGRATING) -> dict[str, str]:
    """The named python code blocks of a page, dedented, in page order."""
    text = page.read_text()
    blocks = {}
    # Blocks sit at the top level or in list-table cells ("   * - .. code-block:: python").
    pattern = re.compile(r"\.\. code-block:: python\n( +):name: (\S+)\n\n")
    for match in pattern.finditer(text):
        indent = len(match.group(1))
        lines = []
        for line in text[match.end() :].splitlines():
            if line.strip() and len(line) - len(line.lstrip()) < indent:
                break
            lines.append(line)
        blocks[match.group(2)] = textwrap.dedent("\n".join(lines))
    return blocks


def run_snippet(code: str) -> dict:
    namespace: dict = {}
    exec(compile(snippets()["setup"] + "\n" + code, "<migrating.rst>", "exec"), namespace)
    return namespace


def test_every_block_is_paired():
    names = set(snippets()) - {"setup"}
    assert names == {f"{pair}-{side}" for pair in PAIRS for side in ("peer", "curvkit")}


def flat(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1)
    return torch.cat([flat(v) for v in value])


@pytest.mark.parametrize(
    "pair",
    [
        # BackPACK's snippets and the ViViT ones (curvkit's classes) run an extended model.
        pytest.param(pair, marks=BACKPACK_FULL_BACKWARD_HOOK)
        if pair.startswith(("backpack", "vivit"))
        else pytest.param(pair, marks=CURVLINOPS_JIT_SCRIPT)
        if pair.startswith("curvlinops")
        else pair
        for pair in sorted(PAIRS)
    ],
)
def test_side_by_side_snippets_agree(pair):
    blocks = snippets()
    ours = run_snippet(blocks[f"{pair}-curvkit"])
    peer_code = blocks[f"{pair}-peer"]
    if pair.startswith("vivit"):
        # ViViT calls Tensor.symeig, removed in torch 2: run its code with the import changed,
        # which is what the guide promises works.
        peer_code = re.sub(r"from vivit\.\S+ import", "from curvkit import", peer_code)
    else:
        package = peer_code.split()[1].split(".")[0]
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    theirs = run_snippet(peer_code)
    for name in PAIRS[pair]:
        torch.testing.assert_close(flat(ours[name]), flat(theirs[name]), rtol=1e-9, atol=1e-12)


@BACKPACK_FULL_BACKWARD_HOOK  # the ViViT snippets run curvkit's classes through BackPACK
def test_vivit_snippets_match_autograd():
    """Without ViViT to compare with, the ViViT-section results are checked against autograd."""
    from curvkit.testing.verify import reference_ggn

    blocks = snippets()
    setup = run_snippet("")
    model, loss_fn = setup["model"], setup["loss_fn"]
    inputs, targets = setup["inputs"], setup["targets"]
    ggn = reference_ggn(model, loss_fn, inputs, targets)
    evals, evecs = torch.linalg.eigh(ggn)
    torch.testing.assert_close(run_snippet(blocks["vivit-eigh-curvkit"])["evals"], evals[-4:])
    loss = loss_fn(model(inputs), targets)
    gradient = flat(torch.autograd.grad(loss, list(model.parameters())))
    top = evecs[:, -4:]
    expected = top @ (-(top.T @ gradient) / (evals[-4:] + 1.0))
    torch.testing.assert_close(flat(run_snippet(blocks["vivit-newton-curvkit"])["step"]), expected)


def test_getting_started_session_runs():
    """The getting-started blocks run in order, as one session (the diagonal block asserts)."""
    namespace: dict = {}
    for name, code in snippets(GETTING_STARTED).items():
        exec(compile(code, f"<getting_started.rst:{name}>", "exec"), namespace)
    assert namespace["loss"].ndim == 0
    assert [len(p) for p in namespace["step"]] == [
        p.shape[0] for p in namespace["model"].parameters()
    ]


@pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None
        for m in ("sphinx", "sphinx_gallery", "furo", "myst_parser")
    ),
    reason="needs the docs extra (sphinx, sphinx-gallery, furo, myst-parser)",
)
def test_sphinx_build_without_warnings(tmp_path):
    """The site builds with -W; the gallery is not executed here (each example has its own test)."""
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        "-D",
        "plot_gallery=0",
        "-d",
        str(tmp_path / "doctrees"),
        str(DOCS),
        str(tmp_path / "html"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    for page in ("index", "mathematics", "migrating", "benchmarks", "getting_started"):
        assert (tmp_path / "html" / f"{page}.html").exists()
