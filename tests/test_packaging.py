"""BackPACK is optional: what ``import curvkit`` loads, the ``vivit`` extra, the declared deps.

Each import check runs in a fresh interpreter, since this process has long imported everything.
A missing package is simulated with ``sys.modules[name] = None``, which makes its import fail as
if it were not installed, without touching the shared environment.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VIVIT_CLASSES = [
    "DirectionalDampedNewtonComputation",
    "DirectionalDerivativesComputation",
    "EighComputation",
    "EigvalshComputation",
]


def run_python(code: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter on this checkout, with the ``block`` packages missing."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in block)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=ROOT,  # '' leads sys.path: this checkout's curvkit, not an installed one
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def assert_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_curvkit_loads_neither_backpack_nor_torchvision():
    result = run_python(
        f"""
        import curvkit

        loaded = sorted(
            name
            for name in sys.modules
            if name.split(".")[0] in ("backpack", "torchvision", "vivit", "scipy")
            or name == "curvkit.compat.vivit"
        )
        assert not loaded, loaded
        assert curvkit.__file__.startswith({str(ROOT)!r}), curvkit.__file__
        """
    )
    assert_ran(result)


def test_vivit_classes_are_imported_on_first_access():
    result = run_python(
        f"""
        import curvkit

        names = {VIVIT_CLASSES!r}
        assert set(names) <= set(curvkit.__all__)
        assert set(names) <= set(dir(curvkit))
        assert set(curvkit.__all__) <= set(dir(curvkit))
        assert "curvkit.compat.vivit" not in sys.modules

        from curvkit import DirectionalDampedNewtonComputation
        import curvkit.compat.vivit

        assert DirectionalDampedNewtonComputation.__module__ == "curvkit.compat.vivit"
        for name in names:
            assert getattr(curvkit, name) is getattr(curvkit.compat.vivit, name), name
        assert "backpack" in sys.modules

        try:
            curvkit.no_such_name
        except AttributeError as error:
            assert "no_such_name" in str(error)
        else:
            raise AssertionError("an unknown name must raise AttributeError")
        """
    )
    assert_ran(result)


def test_missing_backpack_names_the_extra():
    result = run_python(
        """
        import torch
        from torch import nn

        import curvkit

        # The core works without BackPACK.
        model = nn.Linear(3, 2)
        batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
        curvkit.diag_ggn(model, nn.CrossEntropyLoss(), batch)

        for attempt in (
            "import curvkit.compat.vivit",
            "from curvkit import EighComputation",
            "curvkit.DirectionalDampedNewtonComputation",
        ):
            try:
                exec(attempt)
            except ImportError as error:
                assert 'pip install "curvkit[vivit]"' in str(error), (attempt, str(error))
                assert isinstance(error.__cause__, ImportError), (attempt, error.__cause__)
                assert "backpack" in str(error.__cause__), (attempt, error.__cause__)
            else:
                raise AssertionError(attempt + " must fail without BackPACK")
        assert "curvkit.compat.vivit" not in sys.modules
        """,
        block=("backpack",),
    )
    assert_ran(result)


def test_core_dependencies_and_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9._-]+", requirement).group() for requirement in requirements}

    assert names(project["dependencies"]) == {"torch", "numpy", "tqdm"}
    extras = project["optional-dependencies"]
    assert extras["vivit"] == ["backpack-for-pytorch>=1.6"]
    assert "backpack-for-pytorch" not in names(extras["demo"])
    peers = {
        "backpack-for-pytorch",
        "vivit-for-pytorch",
        "pyro-ppl",
        "torch-secorder",
        "curvlinops-for-pytorch",
        "kronfluence",
    }
    assert peers <= names(extras["test"])
    assert peers <= names(extras["bench"])
    # The docs build imports curvkit.compat.vivit (API pages) and runs its ViViT gallery example.
    assert "backpack-for-pytorch" in names(extras["docs"])


def test_to_scipy_imports_scipy_when_called_and_says_what_to_install():
    result = run_python(
        """
        import torch
        from torch import nn

        import curvkit

        model = nn.Linear(3, 2)
        batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
        operator = curvkit.GGNOperator(model, nn.CrossEntropyLoss(), batch)
        assert sys.modules["scipy"] is None  # nothing before to_scipy tried to import it
        try:
            operator.to_scipy()
        except ImportError as error:
            print(error)
        else:
            raise AssertionError("to_scipy must fail without scipy")
        """,
        block=("scipy", "scipy.sparse", "scipy.sparse.linalg"),
    )
    assert_ran(result)
    assert "pip install scipy" in result.stdout


def test_cli_imports_without_backpack():
    result = run_python(
        """
        import curvkit.cli

        assert callable(curvkit.cli.main)
        """,
        block=("backpack",),
    )
    assert_ran(result)
