"""Every import path of the flat layout names the module at its new place (curvkit._moved)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from curvkit import _moved

# curvkit.compat.vivit needs BackPACK, an optional extra.
OLD_NAMES = sorted(name for name in _moved.MOVED if name != "curvkit.vivit")


@pytest.mark.parametrize("old", OLD_NAMES)
def test_old_name_is_the_new_module(old):
    assert importlib.import_module(old) is importlib.import_module(_moved.MOVED[old])


def test_submodules_of_a_moved_package_are_not_loaded_twice():
    import curvkit.optim.pyro.multi as old

    import curvkit.compat.pyro.multi as new

    assert old is new
    assert old.PyroMultiOptimizer is new.PyroMultiOptimizer


def test_attribute_access_and_from_import():
    from curvkit.verify import compare

    import curvkit

    assert curvkit.verify is importlib.import_module("curvkit.testing.verify")
    assert compare is curvkit.testing.verify.compare


def test_unknown_names_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("curvkit.no_such_module")
    with pytest.raises(AttributeError):
        import curvkit

        _ = curvkit.no_such_attribute


def test_fresh_interpreter_imports_old_paths_first():
    code = "import curvkit.problem as p, curvkit.quantities.context as c; assert p is c"
    subprocess.run([sys.executable, "-c", code], check=True)
