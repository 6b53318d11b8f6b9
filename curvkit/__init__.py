"""curvkit: second-order curvature of PyTorch models."""

from curvkit.directional import (
    damped_newton_step,
    default_criterion,
    directional_derivatives,
    ggn_eigh,
    top_k,
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
    "damped_newton_step",
    "default_criterion",
    "directional_derivatives",
    "ggn_eigh",
    "top_k",
]
