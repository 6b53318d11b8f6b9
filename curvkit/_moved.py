"""Old import paths of moved modules: ``curvkit.ggn`` is ``curvkit.quantities.ggn``.

curvkit's modules live in subpackages by layer (:mod:`curvkit.core`, :mod:`curvkit.engines`,
:mod:`curvkit.quantities`, :mod:`curvkit.operators`, :mod:`curvkit.randomized`,
:mod:`curvkit.compat`, :mod:`curvkit.testing`). Code written against the earlier flat layout
(``from curvkit.verify import compare``, ``import curvkit.optim.pyro as optim``) keeps running:
a finder at the front of :data:`sys.meta_path` answers an old name, and the names below it, with
the module object at the new place, so both names give one module (one set of globals, the same
classes, and ``unittest.mock.patch`` on either name patches both). It must come before the
ordinary finders: they would load ``curvkit.optim.pyro.multi`` a second time, from the moved
package's folder, as a separate module. It answers only names in :data:`MOVED`, whose files are
gone, so it hides no real module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

#: Old module name -> its place now. A name below an old package moves with it.
MOVED: dict[str, str] = {
    "curvkit.autodiff": "curvkit.engines.autodiff",
    "curvkit.data": "curvkit.core.data",
    "curvkit.directional": "curvkit.quantities.directional",
    "curvkit.elementwise": "curvkit.quantities.elementwise",
    "curvkit.estimators": "curvkit.randomized.estimators",
    "curvkit.factor_products": "curvkit.quantities.factor_products",
    "curvkit.first_order": "curvkit.quantities.first_order",
    "curvkit.ggn": "curvkit.quantities.ggn",
    "curvkit.gram_eigen": "curvkit.quantities.gram_eigen",
    "curvkit.groups": "curvkit.core.groups",
    "curvkit.hessian": "curvkit.quantities.hessian",
    "curvkit.inverse": "curvkit.operators.inverse",
    "curvkit.kfac": "curvkit.quantities.kfac",
    "curvkit.kfac_operator": "curvkit.operators.kfac",
    "curvkit.linear_operator": "curvkit.operators.base",
    "curvkit.memory": "curvkit.engines.memory",
    "curvkit.model_io": "curvkit.core.model_io",
    "curvkit.operator": "curvkit.operators.ggn",
    "curvkit.optim.pyro": "curvkit.compat.pyro",
    "curvkit.problem": "curvkit.quantities.context",
    "curvkit.spectral": "curvkit.randomized.spectral",
    "curvkit.verify": "curvkit.testing.verify",
    "curvkit.vivit": "curvkit.compat.vivit",
    "curvkit.zoo": "curvkit.testing.zoo",
}


#: Module -> {attribute: the module it moved to}: classes that moved up a layer. The old module
#: answers them through its ``__getattr__`` (:func:`moved_attribute`), so that it does not import
#: the layer above it.
MOVED_ATTRIBUTES: dict[str, dict[str, str]] = {
    "curvkit.quantities.first_order": {"EFOperator": "curvkit.operators.ef"},
    "curvkit.quantities.ggn": {"GGNOperator": "curvkit.operators.ggn"},
    "curvkit.quantities.hessian": {"HessianOperator": "curvkit.operators.hessian"},
}


def moved_attribute(module: str, name: str) -> object:
    """The attribute ``name`` of ``module`` that moved to another module (PEP 562).

    Args:
        module: The old module's name.
        name: The attribute looked up on it and not found.

    Returns:
        The attribute, imported from its new module.

    Raises:
        AttributeError: If ``name`` did not move from ``module``.
    """
    place = MOVED_ATTRIBUTES.get(module, {}).get(name)
    if place is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return getattr(importlib.import_module(place), name)


def new_name(name: str) -> str | None:
    """The current name of a module imported by its old name, or ``None`` if it did not move.

    Args:
        name: A dotted module name such as ``"curvkit.optim.pyro.multi"``.

    Returns:
        The name it has now (``"curvkit.compat.pyro.multi"``), or ``None``.
    """
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a moved module by its old name and loads it as the module at its new place."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        """A spec for an old name, or ``None`` for every other name.

        Args:
            fullname: The module name being imported.
            path: The parent package's search path (unused).
            target: The module being reloaded, if any (unused).

        Returns:
            A spec whose loader imports the module under its new name.
        """
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        """Import the module under its new name; the import system files it under the old one too.

        Args:
            spec: The spec :meth:`find_spec` returned.

        Returns:
            The module at its new place.
        """
        return importlib.import_module(new_name(spec.name))

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module ran when it was imported under its new name.

        Args:
            module: The module :meth:`create_module` returned.
        """


def install() -> None:
    """Put the finder at the front of :data:`sys.meta_path`, once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
