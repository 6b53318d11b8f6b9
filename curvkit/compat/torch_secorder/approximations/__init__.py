"""torch-secorder's ``torch_secorder.approximations``, as far as curvkit provides it."""

from curvkit.compat.torch_secorder.approximations.gauss_newton import (
    gauss_newton_matrix_approximation,
)

__all__ = ["gauss_newton_matrix_approximation"]
