"""torch-secorder's names: replace ``torch_secorder`` by ``curvkit.compat.torch_secorder``.

Only what curvkit computes the same way is here:
:func:`~curvkit.compat.torch_secorder.approximations.gauss_newton.gauss_newton_matrix_approximation`.
"""

from curvkit.compat.torch_secorder.approximations import gauss_newton_matrix_approximation

__all__ = ["gauss_newton_matrix_approximation"]
