"""curvkit: second-order curvature of PyTorch models."""

from __future__ import annotations

import importlib
from typing import Any

from curvkit import estimators, influence
from curvkit.directional import (
    damped_newton_step,
    default_criterion,
    directional_derivatives,
    ggn_eigh,
    top_k,
)
from curvkit.first_order import (
    EFOperator,
    batch_gradients,
    batch_l2_norms,
    diag_ef,
    gradient_variance,
)
from curvkit.ggn import (
    GGNOperator,
    diag_ggn,
    gauss_newton_diagonal,
    ggn_columns,
    ggn_matrix,
    ggn_vector_product,
)
from curvkit.hessian import (
    HessianOperator,
    diag_hessian,
    hessian_matrix,
    hessian_vector_product,
)
from curvkit.kfac_operator import EKFACOperator, KFACOperator
from curvkit.spectral import lanczos_top_eigenpairs, spectral_density

__version__ = "0.1.0"

# ViViT's BackPACK-protocol classes live in curvkit.vivit, which needs the optional BackPACK
# (the ``vivit`` extra). They are imported on first access (PEP 562) so that ``import curvkit``
# works, and stays fast, without BackPACK, while ViViT users still only change their import.
_LAZY = {
    "DirectionalDampedNewtonComputation": "curvkit.vivit",
    "DirectionalDerivativesComputation": "curvkit.vivit",
    "EighComputation": "curvkit.vivit",
    "EigvalshComputation": "curvkit.vivit",
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
    """Import ViViT's classes from :mod:`curvkit.vivit` on first access.

    Args:
        name: The attribute looked up on :mod:`curvkit` and not found in its namespace.

    Returns:
        The class of that name from :mod:`curvkit.vivit`.

    Raises:
        AttributeError: If ``name`` is not one of curvkit's lazily imported names.
        ImportError: If BackPACK, which :mod:`curvkit.vivit` needs, is not installed.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    # Cached in the namespace: later accesses are plain lookups that skip this function.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the namespace together with the lazily imported names, for completion and ``dir()``."""
    return sorted(set(globals()) | set(__all__))
