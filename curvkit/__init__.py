"""curvkit: second-order curvature of PyTorch models."""

from curvkit.directional import (
    damped_newton_step,
    default_criterion,
    directional_derivatives,
    ggn_eigh,
    top_k,
)
from curvkit.ggn import (
    GGNOperator,
    diag_ggn,
    gauss_newton_diagonal,
    ggn_columns,
    ggn_matrix,
    ggn_vector_product,
)
from curvkit.vivit import (
    DirectionalDampedNewtonComputation,
    DirectionalDerivativesComputation,
    EighComputation,
    EigvalshComputation,
)

__version__ = "0.1.0"

__all__ = [
    "DirectionalDampedNewtonComputation",
    "DirectionalDerivativesComputation",
    "EighComputation",
    "EigvalshComputation",
    "GGNOperator",
    "damped_newton_step",
    "default_criterion",
    "diag_ggn",
    "directional_derivatives",
    "gauss_newton_diagonal",
    "ggn_columns",
    "ggn_eigh",
    "ggn_matrix",
    "ggn_vector_product",
    "top_k",
]
