"""ViViT's damped-Newton example runs on torch 2 with only its import changed to curvkit.

The example script is written against ViViT's API; its one curvkit-specific line is the import of
``DirectionalDampedNewtonComputation``. Run as it is, it must pass its own autograd check. With
that line replaced by ViViT's import, ViViT fails on torch 2 (``Tensor.symeig`` only raises
"removed"); with a temporary ``symeig`` shim it runs and computes the same step as curvkit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peer_warnings import BACKPACK_FULL_BACKWARD_HOOK

EXAMPLE = Path(__file__).parents[1] / "examples" / "plot_vivit_directional_damped_newton.py"
CURVKIT_IMPORT = "from curvkit import DirectionalDampedNewtonComputation"
VIVIT_IMPORT = (
    "from vivit.optim.directional_damped_newton import DirectionalDampedNewtonComputation"
)


def run(text: str) -> dict:
    namespace: dict = {"__name__": "example"}
    exec(compile(text, str(EXAMPLE), "exec"), namespace)
    return namespace


def _symeig(self, eigenvectors=False, upper=True):
    uplo = "U" if upper else "L"
    if eigenvectors:
        return torch.linalg.eigh(self, UPLO=uplo)
    return torch.linalg.eigvalsh(self, UPLO=uplo), torch.empty(0)


@BACKPACK_FULL_BACKWARD_HOOK  # the example (and ViViT's version of it) extends the model
def test_example_runs_with_curvkit_and_matches_vivit(monkeypatch):
    text = EXAMPLE.read_text()
    assert text.count(CURVKIT_IMPORT) == 1
    assert "vivit" not in text.replace("ViViT", "").replace("curvkit.compat.vivit", "")

    ours = run(text)  # includes the example's own assert against autograd
    assert ours["DirectionalDampedNewtonComputation"].__module__ == "curvkit.compat.vivit"

    pytest.importorskip("vivit", reason="the comparison with ViViT needs vivit-for-pytorch")
    vivit_text = text.replace(CURVKIT_IMPORT, VIVIT_IMPORT)
    with pytest.raises(RuntimeError, match="symeig"):
        run(vivit_text)

    monkeypatch.setattr(torch.Tensor, "symeig", _symeig)
    theirs = run(vivit_text)
    assert theirs["DirectionalDampedNewtonComputation"].__module__.startswith("vivit")
    for a, b in zip(ours["newton_step"], theirs["newton_step"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
