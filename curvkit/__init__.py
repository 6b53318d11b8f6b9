"""curvkit: second-order curvature of PyTorch models."""

from __future__ import annotations

import importlib
from typing import Any

from curvkit import _moved, influence
from curvkit.operators.ef import EFOperator
from curvkit.operators.ggn import GGNOperator
from curvkit.operators.hessian import HessianOperator
from curvkit.operators.kfac import EKFACOperator, KFACOperator
from curvkit.quantities.directional import (
    damped_newton_step,
    default_criterion,
    directional_derivatives,
    ggn_eigh,
    top_k,
)
from curvkit.quantities.first_order import (
    batch_gradients,
    batch_l2_norms,
    diag_ef,
    gradient_variance,
)
from curvkit.quantities.ggn import (
    diag_ggn,
    gauss_newton_diagonal,
    ggn_columns,
    ggn_matrix,
    ggn_vector_product,
)
from curvkit.quantities.hessian import (
    diag_hessian,
    hessian_matrix,
    hessian_vector_product,
)
from curvkit.randomized import estimators
from curvkit.randomized.spectral import lanczos_top_eigenpairs, spectral_density

# Modules that moved keep their old import paths (``curvkit.verify``, ``curvkit.optim.pyro``).
_moved.install()

__version__ = "0.1.0"

# ViViT's BackPACK-protocol classes live in curvkit.compat.vivit, which needs the optional BackPACK
# (the ``vivit`` extra). They are imported on first access (PEP 562) so that ``import curvkit``
# works, and stays fast, without BackPACK, while ViViT users still only change their import.
_LAZY = {
    "DirectionalDampedNewtonComputation": "curvkit.compat.vivit",
    "DirectionalDerivativesComputation": "curvkit.compat.vivit",
    "EighComputation": "curvkit.compat.vivit",
    "EigvalshComputation": "curvkit.compat.vivit",
}

__all__ = [
    "DirectionalDampedNewtonComputation",
    "DirectionalDerivativesComputation",
    "EFOperator",
    "EKFACOperator",
    "EighComputation",
    "EigvalshComputation",
    "GGNOperator",
    "HessianOperator",
    "KFACOperator",
    "batch_gradients",
    "batch_l2_norms",
    "damped_newton_step",
    "default_criterion",
    "diag_ef",
    "diag_ggn",
    "diag_hessian",
    "directional_derivatives",
    "estimators",
    "gauss_newton_diagonal",
    "ggn_columns",
    "ggn_eigh",
    "ggn_matrix",
    "ggn_vector_product",
    "gradient_variance",
    "hessian_matrix",
    "hessian_vector_product",
    "influence",
    "lanczos_top_eigenpairs",
    "spectral_density",
    "top_k",
]


def __getattr__(name: str) -> Any:
    """Import ViViT's classes and moved modules (``curvkit.verify``) on first access.

    Args:
        name: The attribute looked up on :mod:`curvkit` and not found in its namespace.

    Returns:
        The class of that name from :mod:`curvkit.compat.vivit`, or the module that
        ``curvkit.<name>`` names (:mod:`curvkit._moved`).

    Raises:
        AttributeError: If ``name`` is neither a lazily imported class nor a moved module.
        ImportError: If BackPACK, which :mod:`curvkit.compat.vivit` needs, is not installed.
    """
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif f"{__name__}.{name}" in _moved.MOVED:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Cached in the namespace: later accesses are plain lookups that skip this function.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the namespace together with the lazily imported names, for completion and ``dir()``."""
    return sorted(set(globals()) | set(__all__))
