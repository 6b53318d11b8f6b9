r"""Damped inverses :math:`(A + \delta I)^{-1}` of curvature operators, as operators themselves.

:meth:`CurvatureOperator.inverse(damping, method=...)
<curvkit.operators.base.CurvatureOperator.inverse>` returns one of the operators below; each is a
:class:`~curvkit.operators.base.CurvatureOperator`, so ``inv @ v``, ``inv @ M``, ``inv @ [...]``
and ``inv.to_dense()`` work as for any operator. Write :math:`B = A + \delta I`.

- ``"cg"`` (:class:`ConjugateGradientInverse`): conjugate gradients on :math:`B x = m`, for all
  columns of ``M`` at once (one batched product per iteration, over the columns not yet
  converged). Needs :math:`B` symmetric positive definite.
- ``"neumann"`` (:class:`NeumannInverse`): the Neumann series
  :math:`B^{-1} = \alpha \sum_{k \ge 0} (I - \alpha B)^k`, which converges if and only if the
  spectral radius :math:`\rho = \max_i |1 - \alpha \mu_i|` over :math:`B`'s eigenvalues
  :math:`\mu_i` is below one, that is for symmetric positive definite :math:`B` and
  :math:`0 < \alpha < 2 / \mu_{\max}`; the error shrinks by :math:`\rho` per term, and
  :math:`\rho = 1 - \alpha \mu_{\min}` for :math:`\alpha \le 1/\mu_{\max}`.
- ``"woodbury"`` (:class:`WoodburyInverse`, the GGN's default when its Gram matrix is small):
  exact, from the square-root factor :math:`G = V V^\top`.

Every product leaves a :class:`SolveInfo` on the inverse's ``info`` attribute: the iterations and
the relative residuals of that product.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.core.validation import check_damping, check_int, check_real
from curvkit.engines import Factor
from curvkit.operators import base
from curvkit.operators.base import CurvatureOperator
from curvkit.randomized.spectral import lanczos_top_eigenpairs

__all__ = [
    "ConjugateGradientInverse",
    "InverseOperator",
    "NeumannInverse",
    "SolveInfo",
    "WoodburyInverse",
    "inverse",
]


@dataclass
class SolveInfo:
    r"""What the last product with an inverse did.

    Attributes:
        method: ``"cg"``, ``"neumann"`` or ``"woodbury"``.
        iterations: Products with the operator the solve spent (``0`` for Woodbury).
        residual_norms: Per column of the operand, :math:`\lVert m - B x \rVert /
            \lVert m \rVert` (for Neumann, that of the series without its last term, a bound
            on the returned one's when the series converges); ``None`` for Woodbury.
        converged: Whether every column met the tolerance.
    """

    method: str
    iterations: int
    residual_norms: Tensor | None
    converged: bool


#: A conjugate-gradient direction whose Rayleigh quotient is at most this many units of rounding
#: (the dtype's eps) times the largest one met is taken as a null direction of the damped
#: operator: the products cannot tell it from zero.
SINGULAR_EPS_UNITS = 10


def _refuse_non_finite(matrix: Tensor) -> None:
    """Refuse a right-hand side with NaN or inf: every comparison with NaN is false."""
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(
            "the right-hand side of the inverse's product has NaN or infinite entries; the "
            "solve would be meaningless: pass a finite operand"
        )


class InverseOperator(CurvatureOperator):
    r"""The damped inverse :math:`(A + \delta I)^{-1}` of an operator, on the same domain.

    Attributes:
        damping: :math:`\delta`.
        info: The :class:`SolveInfo` of the last product (``None`` before the first).
    """

    method = ""

    def __init__(self, like: CurvatureOperator, damping: float) -> None:
        self.shape = like.shape
        self.dtype = like.dtype
        self.device = like.device
        self.param_shapes = list(like.param_shapes)
        self.damping = damping
        self.info: SolveInfo | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, damping={self.damping}, "
            f"dtype={self.dtype}, device={self.device})"
        )


class ConjugateGradientInverse(InverseOperator):
    r""":math:`(A + \delta I)^{-1}` by conjugate gradients, batched over the operand's columns.

    Each column :math:`m_j` of ``M`` runs its own conjugate-gradient recursion (its own step sizes)
    until :math:`\lVert m_j - B x_j \rVert \le \max(\text{tol} \lVert m_j \rVert,
    \text{atol})`; every iteration multiplies :math:`A` once by the block of search directions of
    the columns still running. In exact arithmetic it ends within :math:`D` iterations; the error
    in the :math:`B`-norm shrinks at least by :math:`(\sqrt{\kappa} - 1)/(\sqrt{\kappa} + 1)` per
    iteration, :math:`\kappa` the condition number of :math:`B`.

    Args:
        operator: The symmetric positive semi-definite operator :math:`A`.
        damping: :math:`\delta \ge 0` (with :math:`A + \delta I` positive definite).
        tol: Relative tolerance on each column's residual.
        atol: Absolute tolerance on each column's residual.
        max_iters: The most iterations (``None``: :math:`\min(10 D, 1000)`); a product that
            stops there warns and reports ``info.converged = False``.

    Raises:
        ValueError: For a negative damping or tolerance, or a non-positive ``max_iters``; on a
            product, if :math:`A + \delta I` is not positive definite along a search direction.
    """

    method = "cg"

    def __init__(
        self,
        operator: CurvatureOperator,
        damping: float,
        *,
        tol: float = 1e-5,
        atol: float = 0.0,
        max_iters: int | None = None,
    ) -> None:
        super().__init__(operator, check_damping(damping))
        self.operator = operator
        self.tol = check_real(tol, "tol", minimum=0.0)
        self.atol = check_real(atol, "atol", minimum=0.0)
        default_iters = min(10 * operator.shape[0], 1000)
        self.max_iters = check_int(
            default_iters if max_iters is None else max_iters, "max_iters", minimum=1
        )

    def _apply(self, matrix: Tensor) -> Tensor:
        return self.operator @ matrix + self.damping * matrix

    def _matmat(self, matrix: Tensor) -> Tensor:
        _refuse_non_finite(matrix)
        solution = torch.zeros_like(matrix)
        residual = matrix.clone()
        rhs_norms = torch.linalg.vector_norm(matrix, dim=0)
        targets = torch.clamp(self.tol * rhs_norms, min=self.atol)
        squared = residual.square().sum(0)
        active = (squared.sqrt() > targets).nonzero().squeeze(1)
        direction = residual[:, active]
        iterations, largest = 0, 0.0
        floor = SINGULAR_EPS_UNITS * torch.finfo(matrix.dtype).eps
        while active.numel() and iterations < self.max_iters:
            product = self._apply(direction)
            curvature = (direction * product).sum(0)
            # A Rayleigh quotient at rounding level of the largest one met is a null direction:
            # dividing by it would return a solution of norm 1/eps instead of an error.
            quotients = curvature / direction.square().sum(0)
            largest = max(largest, float(quotients.abs().max()))
            if not bool((quotients > floor * largest).all()):
                raise ValueError(
                    f"conjugate gradients met a direction p with p^T (A + {self.damping} I) p "
                    "<= 0 (to rounding): the damped operator is singular or not positive "
                    "definite; give a damping > 0 (or a larger one)"
                )
            step = squared[active] / curvature
            solution[:, active] += step * direction
            residual[:, active] -= step * product
            new_squared = residual[:, active].square().sum(0)
            beta = new_squared / squared[active]
            squared[active] = new_squared
            direction = residual[:, active] + beta * direction
            running = new_squared.sqrt() > targets[active]
            active, direction = active[running], direction[:, running]
            iterations += 1
        norms = squared.sqrt() / torch.where(rhs_norms > 0, rhs_norms, 1)
        self.info = SolveInfo("cg", iterations, norms, converged=not active.numel())
        if active.numel():
            warnings.warn(
                f"conjugate gradients stopped after max_iters={self.max_iters} iterations with "
                f"{active.numel()} of {matrix.shape[1]} columns above tol={self.tol} (largest "
                f"relative residual {float(norms.max()):.3g}); raise max_iters or the damping",
                RuntimeWarning,
                stacklevel=3,
            )
        return solution


class NeumannInverse(InverseOperator):
    r""":math:`(A + \delta I)^{-1}` by the truncated Neumann series.

    .. math::

        (A + \delta I)^{-1} M \approx \alpha \sum_{k=0}^{K} (I - \alpha (A + \delta I))^k M,

    one batched product per term. The series converges if and only if :math:`B = A + \delta I`
    is positive definite and :math:`0 < \alpha < 2/\mu_{\max}(B)`; the residual after :math:`K`
    terms is :math:`(I - \alpha B)^{K+1} M`, shrinking by :math:`\rho = 1 - \alpha \mu_{\min}(B)`
    per term for :math:`\alpha \le 1/\mu_{\max}(B)`: for a positive semi-definite :math:`A`,
    about :math:`\mu_{\max}(B) / \delta` terms per digit. The default :math:`\alpha` is
    :math:`1/\theta`, :math:`\theta` the top Ritz value of :math:`B` after 20 Lanczos iterations
    (:func:`curvkit.randomized.spectral.lanczos_top_eigenpairs`), which is at most
    :math:`\mu_{\max}(B)` and in practice far above :math:`\mu_{\max}(B)/2`.

    Args:
        operator: The symmetric operator :math:`A`.
        damping: :math:`\delta \ge 0`.
        scale: :math:`\alpha` (``None``: from Lanczos, as above).
        max_iters: The most terms :math:`K`.
        tol: Stop once every column's residual :math:`\lVert (I - \alpha B)^k m_j \rVert` is at
            most ``tol`` times :math:`\lVert m_j \rVert`.

    Raises:
        ValueError: For a negative damping, a non-positive ``scale`` or ``max_iters``.
    """

    method = "neumann"

    def __init__(
        self,
        operator: CurvatureOperator,
        damping: float,
        *,
        scale: float | None = None,
        max_iters: int = 100,
        tol: float = 1e-5,
    ) -> None:
        super().__init__(operator, check_damping(damping))
        self.operator = operator
        self.max_iters = check_int(max_iters, "max_iters", minimum=1)
        self.tol = check_real(tol, "tol", minimum=0.0)
        if scale is None:
            top = lanczos_top_eigenpairs(operator, 1, max_iters=min(20, operator.shape[0]))
            scale = 1 / (float(top.eigenvalues[0]) + self.damping)
        self.scale = check_real(scale, "scale", minimum=0.0, strict=True)

    def _matmat(self, matrix: Tensor) -> Tensor:
        _refuse_non_finite(matrix)
        rhs_norms = torch.linalg.vector_norm(matrix, dim=0)
        denominators = torch.where(rhs_norms > 0, rhs_norms, 1)
        term = self.scale * matrix
        solution = term.clone()
        norms = torch.ones_like(rhs_norms)
        iterations = 0
        while iterations < self.max_iters:
            term = term - self.scale * (self.operator @ term + self.damping * term)
            iterations += 1
            # The new term is alpha times the residual of the sum so far.
            norms = torch.linalg.vector_norm(term, dim=0) / self.scale / denominators
            if bool((norms <= self.tol).all()):
                break
            solution = solution + term
        converged = bool((norms <= self.tol).all())
        self.info = SolveInfo("neumann", iterations, norms, converged)
        if not converged:
            warnings.warn(
                f"the Neumann series stopped after max_iters={self.max_iters} terms with a "
                f"relative residual of {float(norms.max()):.3g} > tol={self.tol}"
                + (
                    f"; it diverges: scale={self.scale:.3g} must be below 2 / lambda_max(A + dI)"
                    if bool((norms > 1).any())
                    else "; raise max_iters or the damping, or use method='cg'"
                ),
                RuntimeWarning,
                stacklevel=3,
            )
        return solution


class WoodburyInverse(InverseOperator):
    r"""The exact :math:`(V V^\top + \delta I)^{-1}` through the Gram matrix, per parameter group.

    For one group with square-root factor :math:`V` (:math:`D \times NC'`), the Woodbury identity
    gives

    .. math::

        (V V^\top + \delta I)^{-1}
            = \frac1\delta \big(I - V (\delta I + V^\top V)^{-1} V^\top\big),

    so that a product costs :math:`V^\top M`, a Cholesky solve with the :math:`NC' \times NC'`
    matrix :math:`\delta I + V^\top V` (factored once, at construction) and :math:`V c`. With
    param groups the GGN is block-diagonal, and so is its inverse: one Gram per group.

    Args:
        like: The operator inverted, for the shapes, dtype and device.
        factor_groups: The factors of each group's parameters, in the order of the flat vector.
        damping: :math:`\delta > 0`.

    Raises:
        ValueError: For a damping that is not positive.
    """

    method = "woodbury"

    def __init__(
        self,
        like: CurvatureOperator,
        factor_groups: Sequence[Sequence[Factor]],
        damping: float,
    ) -> None:
        super().__init__(
            like,
            check_damping(damping, positive=True, why="the Woodbury inverse divides by it"),
        )
        self._groups = [list(factors) for factors in factor_groups]
        self._choleskys = []
        for factors in self._groups:
            size = factors[0].num_columns * factors[0].num_samples
            gram = sum(f.gram() for f in factors).reshape(size, size)
            shifted = (gram + gram.T) / 2 + self.damping * torch.eye(
                size, dtype=gram.dtype, device=gram.device
            )
            self._choleskys.append(torch.linalg.cholesky(shifted))

    def _matmat(self, matrix: Tensor) -> Tensor:
        sizes = [math.prod(shape) for shape in self.param_shapes]
        blocks = iter(
            block.T.reshape(-1, *shape)
            for block, shape in zip(matrix.split(sizes), self.param_shapes, strict=True)
        )
        columns = []
        for factors, cholesky in zip(self._groups, self._choleskys, strict=True):
            group_blocks = [next(blocks) for _ in factors]
            coefficients = sum(f.t_mat(b) for f, b in zip(factors, group_blocks, strict=True))
            shape = coefficients.shape
            solved = torch.cholesky_solve(coefficients.reshape(-1, shape[-1]), cholesky)
            for factor, block in zip(factors, group_blocks, strict=True):
                corrected = (block - factor.mat(solved.reshape(shape))) / self.damping
                columns.append(corrected.reshape(corrected.shape[0], -1).T)
        self.info = SolveInfo("woodbury", 0, None, converged=True)
        return torch.cat(columns)


_METHODS: dict[str, Callable[..., InverseOperator]] = {
    "cg": ConjugateGradientInverse,
    "neumann": NeumannInverse,
}


def inverse(
    operator: CurvatureOperator, damping: float, *, method: str = "cg", **options: Any
) -> InverseOperator:
    r"""Return :math:`(A + \delta I)^{-1}` of any operator by an iterative method.

    Args:
        operator: The symmetric operator :math:`A`.
        damping: :math:`\delta`.
        method: ``"cg"`` (:class:`ConjugateGradientInverse`) or ``"neumann"``
            (:class:`NeumannInverse`).
        **options: The method's options (``tol``, ``atol``, ``max_iters`` for ``"cg"``;
            ``scale``, ``max_iters``, ``tol`` for ``"neumann"``).

    Returns:
        The inverse operator.

    Raises:
        ValueError: For an unknown method, or a method that needs the operator's structure
            (``"woodbury"`` is the GGN's).
        TypeError: For an option the method does not take.
    """
    if method not in _METHODS:
        hint = (
            "; 'woodbury' needs a square-root factor, as GGNOperator has"
            if method == "woodbury"
            else ""
        )
        raise ValueError(
            f"{type(operator).__name__}.inverse: unknown method {method!r}; choose one of "
            f"{', '.join(repr(m) for m in _METHODS)}{hint}"
        )
    allowed = {"cg": {"tol", "atol", "max_iters"}, "neumann": {"scale", "max_iters", "tol"}}
    unknown = set(options) - allowed[method]
    if unknown:
        raise TypeError(
            f"method={method!r} takes the options {sorted(allowed[method])}, got {sorted(unknown)}"
        )
    return _METHODS[method](operator, damping, **options)


base.use_iterative_inverse(inverse)
