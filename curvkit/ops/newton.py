r"""Batched Newton steps for many small independent minimisation problems, with a trust region.

The loss is a scalar that sums independent terms over a batch of variables ``x`` of shape
``(..., D)``, one small problem of dimension ``D`` per batch element: per-item MAP estimates,
Laplace approximations, inner loops of variational methods. Because the terms are independent,
the Hessian of each item is the block of the batch Hessian on its diagonal, and all of them come
from ``D`` backward passes through the gradient (one per coordinate), whatever the batch size.

**Differentiability.** The returned mode is ``x.detach() + dx`` where ``dx`` keeps its graph
through the gradient and the Hessian. At a fixed point of the iteration, :math:`g = 0` and
:math:`\partial\,\text{mode} / \partial\theta = -H^{-1} \partial g / \partial\theta`: the
implicit-function derivative of the minimiser with respect to everything the loss depends on,
although all earlier iterations were detached (Christianson, 1994).

**Trust region.** With a trust radius :math:`r`, a step never leaves the ball
:math:`\|dx\| \le r`. In one dimension the Newton step is clamped to :math:`[-r, r]` (the exact
minimiser of the quadratic model on the interval). For :math:`D \ge 2`, where the plain Newton
step is not acceptable (the Hessian is not positive definite, or the step is longer than
:math:`r`), the Hessian is regularised to :math:`H + \lambda I` with

.. math::

    \lambda = \max(\|g\| / r,\ \epsilon_H) - \lambda_{\min}(H),

whose smallest eigenvalue is :math:`\max(\|g\| / r, \epsilon_H)`, so that
:math:`\|dx\| \le \|g\| / (\|g\| / r) = r`. Here
:math:`\epsilon_H = \epsilon_{\text{dtype}} (1 + s_H)`, with :math:`s_H \ge \|H\|_2` a bound on
the spectral radius (:math:`\sum_{ij} |H_{ij}|`; in 2-d the exact eigenvalues' bound
:math:`|\text{mean}| + \text{half gap}`), is the smallest curvature the dtype resolves at the
scale of :math:`H`. Any excess of :math:`\|dx\|` over :math:`r` left by
rounding (the closed-form 3x3 eigenvalues lose accuracy where the two smallest nearly coincide) is
removed by scaling the step back onto the ball, so :math:`\|dx\| \le r` always holds.

This follows ``pyro.ops.newton`` (same signatures and shapes) with these deliberate differences:

- Pyro adds :math:`\lambda = \max(\|g\| / r - \lambda_{\min}, 10^{-8})` to *every* batch element,
  which damps steps that are already inside the trust region whenever
  :math:`\lambda_{\min} < \|g\| / r`, and perturbs the returned covariance by :math:`10^{-8} I`
  even at the optimum. Here an acceptable Newton step is taken as it is (:math:`\lambda = 0`), so
  convergence stays quadratic and ``cov`` is exactly :math:`H^{-1}` at the mode.
- At a stationary point of an indefinite Hessian (:math:`g = 0`), Pyro's regulariser makes
  :math:`H + \lambda I` singular; the floor :math:`\epsilon_H` keeps it invertible.
- Any ``D >= 1`` is supported: closed forms for ``D <= 3``; beyond, an :math:`LDL^\top`
  factorisation computed entry by entry across the whole batch (LAPACK's per-matrix calls cost
  microseconds each, too much for millions of items), with LAPACK's pivoted LU for the rare
  indefinite items whose pivots are too small. The smallest eigenvalue of the items whose step
  the trust region rejects comes from Laguerre's iteration on the same entrywise factorisation
  (LAPACK's ``eigvalsh`` only for items where it does not converge).
- The Hessian is symmetrised, so ``cov`` is exactly symmetric. Its rows come from backward passes
  of the one-hot directions expanded over the batch, rather than of ``g[..., i].sum()``, which
  saves a select-and-sum backward per pass.
- In one dimension the curvature floor is the dtype's machine epsilon rather than
  :math:`10^{-8}` (which float16 cannot hold), and a NaN step is not silently replaced by 0.
- NaN or Inf in the gradient, the Hessian or the covariance gives a warning that says which.
- :func:`newton_minimize` runs the loop, and returns a covariance whose derivative includes the
  mode's own dependence on the parameters.

References:
    Yuan, Y. (2000). A review of trust region algorithms for optimization. ICIAM 99.
    Christianson, B. (1994). Reverse accumulation and attractive fixed points. Optimization
    Methods and Software 3(4).
"""

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from curvkit.ops.linalg import sym_adjugate_3x3, sym_eigvals_3x3

__all__ = [
    "newton_minimize",
    "newton_step",
    "newton_step_1d",
    "newton_step_2d",
    "newton_step_3d",
]


def _check_inputs(loss: Tensor, x: Tensor, trust_radius: float | None, dim: int | None) -> None:
    if not isinstance(loss, Tensor) or not isinstance(x, Tensor):
        raise TypeError(
            f"loss and x must be torch.Tensors, got {type(loss).__name__} and {type(x).__name__}."
        )
    if loss.dim() != 0:
        raise ValueError(
            f"loss must be a scalar (sum the per-item losses over the batch), got shape "
            f"{tuple(loss.shape)}."
        )
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got shape {tuple(x.shape)}.")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(
            f"x must have rightmost size {dim} for newton_step_{dim}d, got shape "
            f"{tuple(x.shape)}; use newton_step for any size."
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}.")
    if not x.requires_grad:
        raise ValueError(
            "x does not require grad: call x.requires_grad_() before computing the loss from it."
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss does not depend on x (it has no autograd graph): compute it from x with "
            "gradients enabled, not under torch.no_grad()."
        )
    if trust_radius is not None:
        if isinstance(trust_radius, bool) or not isinstance(trust_radius, int | float):
            raise TypeError(
                f"trust_radius must be a positive number or None, got "
                f"{type(trust_radius).__name__}."
            )
        if not trust_radius > 0 or trust_radius == float("inf"):
            raise ValueError(
                f"trust_radius must be positive and finite (or None for no trust region), got "
                f"{trust_radius}."
            )


def _warn_if_not_finite(g: Tensor, rows: list[Tensor], cov: Tensor) -> None:
    # One reduction and one host sync on the common path; a false alarm from overflow in the
    # sums is sorted out by the exact checks below.
    # In 1-d, cov is finite wherever the Hessian is (its curvature is floored).
    total = g.sum() if len(rows) == 1 else g.sum() + cov.sum()
    for row in rows:
        total = total + row.sum()
    if bool(torch.isfinite(total)):
        return
    culprits = [
        name
        for name, parts in (("gradient", [g]), ("Hessian", rows))
        if not all(bool(torch.isfinite(part).all()) for part in parts)
    ]
    if culprits:
        warnings.warn(
            f"newton_step: the {' and the '.join(culprits)} "
            f"{'contain' if len(culprits) > 1 else 'contains'} NaN or Inf; check the loss and "
            f"the current x.",
            stacklevel=4,
        )
    elif not bool(torch.isfinite(cov).all()):
        warnings.warn(
            "newton_step: the covariance (inverse Hessian) contains NaN or Inf because the "
            "Hessian is singular for some item; pass a trust_radius to regularise it.",
            stacklevel=4,
        )


def _gradient_and_hessian_rows(
    loss: Tensor, x: Tensor, create_graph: bool
) -> tuple[Tensor, list[Tensor]]:
    r"""Gradient ``g`` of shape ``(..., D)`` and the rows of every item's Hessian.

    ``rows[i][..., j]`` is :math:`H_{ij}` of each item. Row ``i`` is the gradient of
    :math:`\sum_n g_{n,i}`: one backward pass through ``g`` per coordinate, with the one-hot
    direction ``e_i`` expanded over the batch rather than materialised.
    """
    (g,) = torch.autograd.grad(loss, x, create_graph=True, allow_unused=True)
    if g is None:
        raise ValueError(
            "loss does not depend on x: the loss's autograd graph does not contain x. Compute "
            "the loss from this very tensor x."
        )
    dim = x.shape[-1]
    if not g.requires_grad:
        # The loss is linear in x: the Hessian vanishes.
        return g, [torch.zeros_like(g) for _ in range(dim)]
    basis = torch.eye(dim, dtype=g.dtype, device=g.device)
    rows = []
    for i in range(dim):
        (row,) = torch.autograd.grad(
            g,
            x,
            basis[i].expand_as(g),
            retain_graph=create_graph or i + 1 < dim,
            create_graph=create_graph,
            allow_unused=True,
        )
        rows.append(torch.zeros_like(g) if row is None else row)
    return g, rows


def _curvature_floor(abs_sum: Tensor) -> Tensor:
    """Smallest curvature the dtype resolves at the scale ``abs_sum`` of a Hessian (a constant)."""
    return torch.finfo(abs_sum.dtype).eps * (1 + abs_sum.detach())


def _trust_shift(g: Tensor, lambda_min: Tensor, floor: Tensor, trust_radius: float) -> Tensor:
    """The regulariser lambda for items whose Newton step is rejected (see the module doc)."""
    return torch.maximum(torch.linalg.vector_norm(g, dim=-1) / trust_radius, floor) - lambda_min


def _into_ball(dx: Tensor, trust_radius: float) -> Tensor:
    """Scale steps longer than the radius (by rounding only, after regularisation) back onto it."""
    norm = torch.linalg.vector_norm(dx, dim=-1, keepdim=True)
    return torch.where(norm > trust_radius, dx * (trust_radius / norm), dx)


def _solve_1d(g: Tensor, rows: list[Tensor], trust_radius: float | None) -> tuple[Tensor, Tensor]:
    # Nonpositive curvature is floored at the machine epsilon: the step then runs to the trust
    # region's boundary (or far, without one), and the floor need only be positive and finite.
    cov = rows[0].clamp(min=torch.finfo(g.dtype).eps).reciprocal()
    dx = -g * cov
    if trust_radius is not None:
        dx = dx.clamp(min=-trust_radius, max=trust_radius)
    return dx, cov.unsqueeze(-1)


def _solve_2d(g: Tensor, rows: list[Tensor], trust_radius: float | None) -> tuple[Tensor, Tensor]:
    h00, h11 = rows[0][..., 0], rows[1][..., 1]
    h01 = torch.lerp(rows[0][..., 1], rows[1][..., 0], 0.5)
    g0, g1 = g[..., 0], g[..., 1]
    # dx = -adj(H) g / det(H) = (n0, n1) / det.
    n0 = torch.addcmul(h01 * g1, h11, g0, value=-1)
    n1 = torch.addcmul(h01 * g0, h00, g1, value=-1)
    det = torch.addcmul(h00 * h11, h01, h01, value=-1)
    if trust_radius is not None:
        # Eigenvalues mean -/+ half_gap. The clamp (by the dtype's tiniest number, far below any
        # rounding) keeps the gradient finite for multiples of the identity.
        mean = torch.lerp(h00, h11, 0.5)
        difference = h00 - h11
        half_gap = torch.addcmul(h01 * h01, difference, difference, value=0.25)
        half_gap = half_gap.clamp(min=torch.finfo(half_gap.dtype).tiny).sqrt()
        lambda_min = mean - half_gap
        # Positive definite, and ||n|| <= r det: the plain step is acceptable.
        n_squared = torch.addcmul(n0 * n0, n1, n1)
        acceptable = (lambda_min > 0) & (n_squared <= (trust_radius * det).square())
        if not bool(acceptable.all()):
            # |mean| + half_gap bounds the spectral radius: the scale of the curvature floor.
            g_norm = torch.addcmul(g0 * g0, g1, g1).sqrt()
            target = torch.maximum(g_norm / trust_radius, _curvature_floor(mean.abs() + half_gap))
            shift = torch.where(acceptable, 0.0, target - lambda_min)
            h00, h11 = h00 + shift, h11 + shift
            n0 = torch.addcmul(n0, shift, g0, value=-1)
            n1 = torch.addcmul(n1, shift, g1, value=-1)
            # det(H + shift I) = target (target + 2 half_gap), a product of positive factors:
            # accurate even where the shifted matrix is nearly singular.
            det = torch.where(acceptable, det, target * (target + 2 * half_gap))
            inv_det = det.reciprocal()
            # Onto the ball what rounding leaves outside (see _into_ball); det > 0 here.
            step_norm = torch.addcmul(n0 * n0, n1, n1).sqrt() * inv_det
            step_scale = inv_det * (trust_radius / step_norm).clamp(max=1)
            dx = torch.stack([n0 * step_scale, n1 * step_scale], dim=-1)
            off = -h01 * inv_det
            cov = torch.stack([h11 * inv_det, off, off, h00 * inv_det], dim=-1)
            return dx, cov.unflatten(-1, (2, 2))
    inv_det = det.reciprocal()
    dx = torch.stack([n0 * inv_det, n1 * inv_det], dim=-1)
    off = -h01 * inv_det
    cov = torch.stack([h11 * inv_det, off, off, h00 * inv_det], dim=-1)
    return dx, cov.unflatten(-1, (2, 2))


def _step_3d(
    entries: tuple[Tensor, ...], g0: Tensor, g1: Tensor, g2: Tensor
) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    c00, c11, c22, c01, c02, c12, det = sym_adjugate_3x3(*entries)
    minus_inv_det = -det.reciprocal()
    dx = torch.stack(
        [
            torch.addcmul(torch.addcmul(c00 * g0, c01, g1), c02, g2) * minus_inv_det,
            torch.addcmul(torch.addcmul(c01 * g0, c11, g1), c12, g2) * minus_inv_det,
            torch.addcmul(torch.addcmul(c02 * g0, c12, g1), c22, g2) * minus_inv_det,
        ],
        dim=-1,
    )
    return dx, (c00, c11, c22, c01, c02, c12), -minus_inv_det


def _solve_3d(g: Tensor, rows: list[Tensor], trust_radius: float | None) -> tuple[Tensor, Tensor]:
    h00, h11, h22 = rows[0][..., 0], rows[1][..., 1], rows[2][..., 2]
    h01 = torch.lerp(rows[0][..., 1], rows[1][..., 0], 0.5)
    h02 = torch.lerp(rows[0][..., 2], rows[2][..., 0], 0.5)
    h12 = torch.lerp(rows[1][..., 2], rows[2][..., 1], 0.5)
    g0, g1, g2 = g[..., 0], g[..., 1], g[..., 2]
    dx, adjugate, inv_det = _step_3d((h00, h11, h22, h01, h02, h12), g0, g1, g2)
    if trust_radius is not None:
        lambda_min = sym_eigvals_3x3(h00, h11, h22, h01, h02, h12)[0]
        acceptable = (lambda_min > 0) & (dx.square().sum(-1) <= trust_radius**2)
        if not bool(acceptable.all()):
            abs_sum = h00.abs() + h11.abs() + h22.abs() + 2 * (h01.abs() + h02.abs() + h12.abs())
            shift = _trust_shift(g, lambda_min, _curvature_floor(abs_sum), trust_radius)
            shift = torch.where(acceptable, 0.0, shift)
            shifted = (h00 + shift, h11 + shift, h22 + shift, h01, h02, h12)
            dx, adjugate, inv_det = _step_3d(shifted, g0, g1, g2)
            dx = _into_ball(dx, trust_radius)
    c00, c11, c22, c01, c02, c12 = (c * inv_det for c in adjugate)
    cov = torch.stack([c00, c01, c02, c01, c11, c12, c02, c12, c22], dim=-1).unflatten(-1, (3, 3))
    return dx, cov


def _symmetric_entries(rows: list[Tensor]) -> list[list[Tensor]]:
    """``h[i][j]``: entry (i, j) of every item's symmetrised Hessian, a tensor of batch shape."""
    dim = len(rows)
    # One transposing copy per row: the entries are then contiguous, whereas every strided read
    # of an entry would pull in the whole row.
    columns = [row.movedim(-1, 0).contiguous() for row in rows]
    h = [[columns[i][i] if i == j else None for j in range(dim)] for i in range(dim)]
    for i in range(dim):
        for j in range(i):
            h[i][j] = h[j][i] = torch.lerp(columns[i][j], columns[j][i], 0.5)
    return h


class _LDL:
    r"""Entrywise :math:`LDL^\top` of every item's :math:`H + \text{shift}\, I`, batched.

    Every operation acts on one matrix entry across the whole batch (:math:`O(D^3)` elementwise
    operations, each over the batch), which for millions of small matrices beats a loop of LAPACK
    calls many times over. No pivoting: stable for positive definite matrices; the callers fall
    back to LAPACK for indefinite items with small pivots. The matrix is positive definite
    exactly where every pivot :math:`D_{jj}` is positive.
    """

    def __init__(self, h: list[list[Tensor]], shift: Tensor | None = None) -> None:
        dim = len(h)
        self.unit_lower = [[None] * dim for _ in range(dim)]  # L[i][j], j < i
        scaled = [[None] * dim for _ in range(dim)]  # L[i][j] * D[j]
        self.pivots, self.inverse_pivots = [], []
        for j in range(dim):
            pivot = h[j][j] if shift is None else h[j][j] + shift
            for k in range(j):
                pivot = torch.addcmul(pivot, self.unit_lower[j][k], scaled[j][k], value=-1)
            inverse_pivot = pivot.reciprocal()
            self.pivots.append(pivot)
            self.inverse_pivots.append(inverse_pivot)
            for i in range(j + 1, dim):
                entry = h[i][j]
                for k in range(j):
                    entry = torch.addcmul(entry, self.unit_lower[i][k], scaled[j][k], value=-1)
                scaled[i][j] = entry
                self.unit_lower[i][j] = entry * inverse_pivot

    def step(self, g: list[Tensor]) -> Tensor:
        r"""The step :math:`-(H + \text{shift}\, I)^{-1} g`, ``(..., D)``, by substitution."""
        dim = len(g)
        forward = []
        for i in range(dim):
            entry = g[i]
            for k in range(i):
                entry = torch.addcmul(entry, self.unit_lower[i][k], forward[k], value=-1)
            forward.append(entry)
        step = [None] * dim
        for i in reversed(range(dim)):
            entry = forward[i] * self.inverse_pivots[i]
            for k in range(i + 1, dim):
                entry = torch.addcmul(entry, self.unit_lower[k][i], step[k], value=-1)
            step[i] = entry
        return -torch.stack(step, dim=-1)

    def inverse(self) -> list[list[Tensor]]:
        """``inverse[i][j]``: the entries of the inverse (the same tensor at ``[j][i]``)."""
        dim = len(self.pivots)
        # W = L^{-1} (unit lower triangular), then H^{-1} = W^T D^{-1} W.
        inverse_lower = [[None] * dim for _ in range(dim)]
        for i in range(dim):
            for j in range(i):
                entry = -self.unit_lower[i][j]
                for k in range(j + 1, i):
                    entry = torch.addcmul(
                        entry, self.unit_lower[i][k], inverse_lower[k][j], value=-1
                    )
                inverse_lower[i][j] = entry
        # weighted[k][j] = W[k][j] / D[k] for j <= k.
        weighted = [
            [inverse_lower[k][j] * self.inverse_pivots[k] for j in range(k)]
            + [self.inverse_pivots[k]]
            for k in range(dim)
        ]
        inverse = [[None] * dim for _ in range(dim)]
        for i in range(dim):
            for j in range(i, dim):
                # Sum over k >= j of W[k][i] W[k][j] / D[k], with W[j][j] = 1.
                entry = weighted[j][i]
                for k in range(j + 1, dim):
                    entry = torch.addcmul(entry, inverse_lower[k][i], weighted[k][j])
                inverse[i][j] = inverse[j][i] = entry
        return inverse

    def covariance(self) -> Tensor:
        """The inverse as matrices ``(..., D, D)``."""
        inverse = self.inverse()
        return torch.stack([entry for row in inverse for entry in row], dim=-1).unflatten(
            -1, (len(inverse), len(inverse))
        )


def _stacked_items(rows: list[Tensor], items: Tensor) -> Tensor:
    """Symmetrised Hessians ``(len(items), D, D)`` of the given flat item indices."""
    dim = len(rows)
    H = torch.stack([row.reshape(-1, dim)[items] for row in rows], dim=-2)
    return (H + H.mT) / 2


_EIGEN_CHUNK = 1 << 15


def _smallest_eigenvectors(packed: Tensor, tolerance: Tensor, max_iters: int) -> Tensor:
    r"""Unit eigenvectors ``(R, D)`` of the smallest eigenvalues; NaN where unconverged.

    See :func:`_smallest_eigenvalue`; ``packed`` ``(D (D + 1) / 2, R)`` holds the upper
    triangles' entries row by row, ``tolerance`` the rounding of each matrix's scale.
    """
    dim = round(((8 * packed.shape[0] + 1) ** 0.5 - 1) / 2)
    upper = [(i, j) for i in range(dim) for j in range(i, dim)]

    def entries(items: Tensor | None) -> list[list[Tensor]]:
        rows = packed if items is None else packed.index_select(1, items)
        by_index = dict(zip(upper, rows.unbind(0), strict=True))
        return [[by_index[min(i, j), max(i, j)] for j in range(dim)] for i in range(dim)]

    h = entries(None)
    # Strictly below the spectrum also where Gershgorin's bound is attained (diagonal H).
    sigma = functools.reduce(
        torch.minimum,
        [h[i][i] + h[i][i].abs() - sum(entry.abs() for entry in h[i]) for i in range(dim)],
    )
    sigma = sigma - tolerance
    # Items with NaN or Inf entries do not iterate (the caller warns about them).
    active = torch.isfinite(sigma)
    retreated = torch.zeros_like(active)
    members = active.nonzero().squeeze(-1)  # the items factorised in each step
    h = entries(members)
    for _ in range(max_iters):
        live = active[members]
        count = int(live.sum())
        if count == 0:
            break
        if 2 * count <= members.numel():
            # Most items are done: compact the batch to the others.
            members = members[live]
            h = entries(members)
            live = active[members]
        current, margin, pulled_back = sigma[members], tolerance[members], retreated[members]
        factors = _LDL(h, -current)
        inverse, pivots = factors.inverse(), factors.pivots
        definite = functools.reduce(torch.logical_and, [pivot > 0 for pivot in pivots])
        trace = sum(inverse[i][i] for i in range(dim))
        frobenius = sum(inverse[i][j].square() * (1 if i == j else 2) for i, j in upper)
        spread = ((dim - 1) * (dim * frobenius - trace.square())).clamp(min=0).sqrt()
        step = dim / (trace + spread)
        # Done where the next step is within rounding, or after a retreat.
        moving = live & ~(definite & (pulled_back | (step <= 2 * margin)))
        # The cubic convergence can land on lambda_min to within rounding, where A is no longer
        # numerically definite: such items step back by a rounding margin.
        sigma[members] = torch.where(
            moving, torch.where(definite, current + step, current - 2 * margin), current
        )
        retreated[members] = pulled_back | (live & ~definite)
        active[members] = moving
    # One more factorisation, at every item's final sigma, gives the eigenvectors.
    inverse = _LDL(entries(None), -sigma).inverse()
    # Elementwise selection of the column with the largest diagonal entry: reductions across
    # the rows of the batch would run over strided memory.
    largest, column = inverse[0][0], [inverse[i][0] for i in range(dim)]
    for j in range(1, dim):
        larger = inverse[j][j] > largest
        largest = torch.where(larger, inverse[j][j], largest)
        column = [torch.where(larger, inverse[i][j], column[i]) for i in range(dim)]
    # NaN marks the items still iterating (unconverged).
    scale = torch.where(active, float("nan"), sum(entry.square() for entry in column).rsqrt())
    return torch.stack([entry * scale for entry in column], dim=-1)


def _smallest_eigenvalue(h: list[list[Tensor]], abs_sum: Tensor, max_iters: int = 30) -> Tensor:
    r"""Smallest eigenvalues of symmetric matrices given by their entries ``h[i][j]`` ``(R,)``.

    LAPACK's ``eigvalsh`` costs about a microsecond per matrix; here Laguerre's iteration on the
    characteristic polynomial :math:`p(\sigma) = \det(H - \sigma I)` runs across the batch on
    the entrywise :math:`LDL^\top` inverse of :math:`A = H - \sigma I`, whose trace
    :math:`\sum_i 1 / (\lambda_i - \sigma)` and squared Frobenius norm
    :math:`\sum_i 1 / (\lambda_i - \sigma)^2` are all Laguerre's step needs. Started below the
    spectrum (Gershgorin's bound), it rises monotonically towards :math:`\lambda_{\min}` without
    overshooting (all roots are real) and converges cubically, and :math:`A` stays positive
    definite, where :math:`LDL^\top` needs no pivoting. Each item stops once its next step is
    within the rounding of :math:`H` (``abs_sum`` bounds its scale) and drops out of the batch;
    items not done in ``max_iters`` steps go to LAPACK. The batch is taken in chunks whose
    entries stay in the processor's cache across the many elementwise passes.

    Near :math:`\lambda_{\min}`, :math:`A^{-1}` is dominated by :math:`v v^\top / (\lambda_{\min}
    - \sigma)`: its column with the largest diagonal entry is the eigenvector :math:`v` to working
    precision (one step of inverse iteration). The eigenvalue returned is the Rayleigh quotient
    :math:`v^\top H v` at that detached unit :math:`v`: exact to second order in the error of
    :math:`v`, and with the eigenvalue's derivative :math:`v v^\top` in ``H``.
    """
    dim = len(h)
    upper = [(i, j) for i in range(dim) for j in range(i, dim)]
    with torch.no_grad():
        tolerance = _curvature_floor(abs_sum)
        packed = torch.stack([h[i][j].detach() for i, j in upper])
        vectors = torch.cat(
            [
                _smallest_eigenvectors(chunk.contiguous(), chunk_tolerance, max_iters)
                for chunk, chunk_tolerance in zip(
                    packed.split(_EIGEN_CHUNK, dim=1),
                    tolerance.split(_EIGEN_CHUNK),
                    strict=True,
                )
            ]
        )
        unconverged = torch.isnan(vectors[:, 0]) & torch.isfinite(abs_sum)
        # Zero, not NaN, where LAPACK takes over: NaN would leak into the derivative.
        v = vectors.masked_fill(unconverged.unsqueeze(-1), 0.0).T.contiguous()
    rayleigh = sum(h[i][j] * (v[i] * v[j] * (1 if i == j else 2)) for i, j in upper)
    unconverged = unconverged.nonzero().squeeze(-1)
    if unconverged.numel() == 0:
        return rayleigh
    H = torch.stack([torch.stack([entry[unconverged] for entry in row], -1) for row in h], -2)
    return rayleigh.index_put((unconverged,), torch.linalg.eigvalsh(H)[..., 0])


def _solve_nd(g: Tensor, rows: list[Tensor], trust_radius: float | None) -> tuple[Tensor, Tensor]:
    dim, batch_shape = g.shape[-1], g.shape[:-1]
    h = _symmetric_entries(rows)
    # Contiguous copies: each is read D times, and a strided read pulls in all of g.
    g_entries = g.movedim(-1, 0).contiguous().unbind(0)
    factors = _LDL(h)
    dx = factors.step(g_entries)
    positive_definite = functools.reduce(torch.logical_and, [pivot > 0 for pivot in factors.pivots])
    if trust_radius is None:
        cov = factors.covariance()
        if bool(positive_definite.all()):
            return dx, cov
        # Without pivoting, LDL^T of an indefinite matrix is unreliable where a pivot is small:
        # LAPACK's pivoted LU takes those items.
        with torch.no_grad():
            scale = sum(row.abs().sum(-1) for row in rows)
            threshold = torch.finfo(g.dtype).eps ** 0.5 * scale
            # NaN-safe: a NaN pivot (after a zero one) counts as small.
            small = ~functools.reduce(
                torch.logical_and, [pivot.abs() > threshold for pivot in factors.pivots]
            )
        fallback = (~positive_definite & small).reshape(-1).nonzero().squeeze(-1)
        if fallback.numel() == 0:
            return dx, cov
        cov_fallback = torch.linalg.inv_ex(_stacked_items(rows, fallback))[0]
        cov_fallback = (cov_fallback + cov_fallback.mT) / 2
        dx_fallback = -(cov_fallback @ g.reshape(-1, dim)[fallback].unsqueeze(-1)).squeeze(-1)
        cov = cov.reshape(-1, dim, dim).index_put((fallback,), cov_fallback)
        dx = dx.reshape(-1, dim).index_put((fallback,), dx_fallback)
        return dx.reshape(g.shape), cov.reshape(*batch_shape, dim, dim)
    acceptable = positive_definite & (torch.linalg.vector_norm(dx, dim=-1) <= trust_radius)
    if bool(acceptable.all()):
        return dx, factors.covariance()
    # Smallest eigenvalues, the regularised factorisation and its inverse only for the items
    # whose step is rejected; the accepted items' inverse only where there are any.
    rejected = (~acceptable).reshape(-1).nonzero().squeeze(-1)
    everything = rejected.numel() == batch_shape.numel()
    upper = {
        (i, j): h[i][j].reshape(-1) if everything else h[i][j].reshape(-1)[rejected]
        for i in range(dim)
        for j in range(i, dim)
    }
    h_rejected = [[upper[min(i, j), max(i, j)] for j in range(dim)] for i in range(dim)]
    with torch.no_grad():
        abs_sum = sum(entry.abs() * (1 if i == j else 2) for (i, j), entry in upper.items())
    lambda_min = _smallest_eigenvalue(h_rejected, abs_sum)
    g_rejected = g.reshape(-1, dim) if everything else g.reshape(-1, dim)[rejected]
    shift = _trust_shift(g_rejected, lambda_min, _curvature_floor(abs_sum), trust_radius)
    if everything:
        shifted = _LDL(h, shift.reshape(batch_shape))
        return _into_ball(shifted.step(g_entries), trust_radius), shifted.covariance()
    shifted = _LDL(h_rejected, shift)
    dx_rejected = _into_ball(shifted.step(g_rejected.unbind(-1)), trust_radius)
    dx = dx.reshape(-1, dim).index_put((rejected,), dx_rejected)
    cov = factors.covariance().reshape(-1, dim, dim).index_put((rejected,), shifted.covariance())
    return dx.reshape(g.shape), cov.reshape(*batch_shape, dim, dim)


_SOLVERS = {1: _solve_1d, 2: _solve_2d, 3: _solve_3d}


def _newton_step(
    loss: Tensor, x: Tensor, trust_radius: float | None, dim: int | None, create_graph: bool
) -> tuple[Tensor, Tensor]:
    _check_inputs(loss, x, trust_radius, dim)
    g, rows = _gradient_and_hessian_rows(loss, x, create_graph)
    dx, cov = _SOLVERS.get(x.shape[-1], _solve_nd)(g, rows, trust_radius)
    _warn_if_not_finite(g, rows, cov)
    return x.detach() + dx, cov


def newton_step(
    loss: Tensor, x: Tensor, trust_radius: float | None = None
) -> tuple[Tensor, Tensor]:
    r"""One Newton step on a batch of independent small problems, optionally in a trust region.

    With the per-item gradient :math:`g` and Hessian :math:`H` of ``loss`` with respect to ``x``,
    the step is :math:`dx = -H^{-1} g` (regularised as described in :mod:`curvkit.ops.newton`
    when ``trust_radius`` is given). The mode is ``x.detach() + dx`` with ``dx`` differentiable
    through :math:`g` and :math:`H`; in a loop, detach ``x`` between steps (or use
    :func:`newton_minimize`), and the final mode is still differentiable.

    Dispatches on ``D = x.shape[-1]`` to :func:`newton_step_1d`, :func:`newton_step_2d`,
    :func:`newton_step_3d` or, for ``D >= 4``, to a batched :math:`LDL^\top` solve.

    Args:
        loss: A scalar, the sum over the batch of independent per-item losses, each a
            twice-differentiable function of one item ``x[i]`` of size ``D``.
        x: The current point, shape ``(..., D)``, with ``requires_grad=True``; ``loss`` must
            have been computed from it.
        trust_radius: If given, a positive bound on the Euclidean length of each item's step.

    Returns:
        ``(mode, cov)``: the new point, shape ``(..., D)``, and the inverse of the (regularised)
        Hessian, shape ``(..., D, D)``, symmetric; at the minimum,
        ``MultivariateNormal(mode, cov)`` is the Laplace approximation of
        :math:`\exp(-\text{loss})`.

    Raises:
        TypeError: If ``loss`` or ``x`` is not a tensor, ``x`` is not floating point, or
            ``trust_radius`` is not a number.
        ValueError: If ``loss`` is not a scalar, ``x`` has no last dimension, ``x`` does not
            require grad, ``loss`` does not depend on ``x``, or ``trust_radius`` is not positive
            and finite.

    Warns:
        UserWarning: If the gradient, the Hessian or the covariance contains NaN or Inf.
    """
    return _newton_step(loss, x, trust_radius, None, create_graph=True)


def newton_step_1d(
    loss: Tensor, x: Tensor, trust_radius: float | None = None
) -> tuple[Tensor, Tensor]:
    r"""Newton step for ``x`` of shape ``(..., 1)``; see :func:`newton_step`.

    The curvature is floored at the dtype's machine epsilon, so a nonpositive curvature gives a
    very long step in the descent direction, which a trust radius clamps to :math:`\pm r`.

    Args:
        loss: A scalar, the sum over the batch of independent per-item losses.
        x: The current point, shape ``(..., 1)``, with ``requires_grad=True``.
        trust_radius: If given, each step is clamped to :math:`[-r, r]`.

    Returns:
        ``(mode, cov)`` of shapes ``(..., 1)`` and ``(..., 1, 1)``.

    Raises:
        TypeError: See :func:`newton_step`.
        ValueError: If ``x.shape[-1] != 1``, or see :func:`newton_step`.
    """
    return _newton_step(loss, x, trust_radius, 1, create_graph=True)


def newton_step_2d(
    loss: Tensor, x: Tensor, trust_radius: float | None = None
) -> tuple[Tensor, Tensor]:
    """Newton step for ``x`` of shape ``(..., 2)`` in closed form; see :func:`newton_step`.

    Args:
        loss: A scalar, the sum over the batch of independent per-item losses.
        x: The current point, shape ``(..., 2)``, with ``requires_grad=True``.
        trust_radius: If given, a positive bound on the length of each item's step.

    Returns:
        ``(mode, cov)`` of shapes ``(..., 2)`` and ``(..., 2, 2)``.

    Raises:
        TypeError: See :func:`newton_step`.
        ValueError: If ``x.shape[-1] != 2``, or see :func:`newton_step`.
    """
    return _newton_step(loss, x, trust_radius, 2, create_graph=True)


def newton_step_3d(
    loss: Tensor, x: Tensor, trust_radius: float | None = None
) -> tuple[Tensor, Tensor]:
    """Newton step for ``x`` of shape ``(..., 3)`` in closed form; see :func:`newton_step`.

    Args:
        loss: A scalar, the sum over the batch of independent per-item losses.
        x: The current point, shape ``(..., 3)``, with ``requires_grad=True``.
        trust_radius: If given, a positive bound on the length of each item's step.

    Returns:
        ``(mode, cov)`` of shapes ``(..., 3)`` and ``(..., 3, 3)``.

    Raises:
        TypeError: See :func:`newton_step`.
        ValueError: If ``x.shape[-1] != 3``, or see :func:`newton_step`.
    """
    return _newton_step(loss, x, trust_radius, 3, create_graph=True)


def newton_minimize(
    loss_fn: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    trust_radius: float | None = None,
    max_iters: int = 100,
    tol: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Minimise a batch of independent small problems by Newton's method, differentiably.

    Iterates detached Newton steps (cheaper: no graph is kept for the Hessian) from ``x0`` until
    every item's step satisfies :math:`\|dx\|_\infty \le \text{tol}\,(1 + \|x\|_\infty)`, then
    takes one more step with the full graph, so that the returned mode carries the
    implicit-function derivative :math:`-H^{-1} \partial g / \partial\theta` with respect to every
    tensor :math:`\theta` that ``loss_fn`` depends on. The covariance is the inverse Hessian
    evaluated at that differentiable mode, so its derivative is the total one (through the mode
    as well), as a Laplace evidence :math:`-\tfrac12 \log\det H` needs; :func:`newton_step`'s
    ``cov`` is differentiated at a fixed ``x`` instead. Works under :func:`torch.no_grad`
    (the result then has no graph).

    Example::

        mode, cov = newton_minimize(lambda x: neg_log_joint(x, data).sum(), torch.zeros(N, 2))
        laplace = torch.distributions.MultivariateNormal(mode, cov)

    Args:
        loss_fn: Maps ``x`` of shape ``(..., D)`` to a scalar: the sum over the batch of
            independent per-item losses.
        x0: Starting point, shape ``(..., D)`` (its graph, if any, is not used).
        trust_radius: If given, a positive bound on the length of each item's step (see
            :func:`newton_step`).
        max_iters: Maximum number of detached steps before the final one.
        tol: Relative step size that counts as converged; ``None`` means
            :math:`\sqrt{\epsilon}` of the dtype.

    Returns:
        ``(mode, cov)`` as in :func:`newton_step`, from the final step.

    Raises:
        TypeError: If ``loss_fn`` is not callable or ``x0`` is not a floating-point tensor.
        ValueError: If ``max_iters < 1``, ``tol <= 0``, or see :func:`newton_step`.

    Warns:
        UserWarning: If some items have not converged after ``max_iters`` steps.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError("x0 must be a floating-point torch.Tensor of shape (..., D).")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}.")
    if tol is None:
        tol = torch.finfo(x0.dtype).eps ** 0.5
    elif not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}.")

    # Derivatives are needed even under torch.no_grad(); the result keeps a graph only if the
    # caller records one.
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x = x0.detach()
        for _ in range(max_iters):
            x_var = x.requires_grad_()
            mode, _ = _newton_step(loss_fn(x_var), x_var, trust_radius, None, create_graph=False)
            x, previous = mode.detach(), x.detach()
            step = (x - previous).abs().amax(dim=-1)
            if bool((step <= tol * (1 + previous.abs().amax(dim=-1))).all()):
                break
        else:
            warnings.warn(
                f"newton_minimize: not converged after max_iters={max_iters} steps (relative "
                f"step tolerance {tol:g}); raise max_iters, or check that every item's loss has "
                f"a minimum.",
                stacklevel=2,
            )
        x_var = x.clone().requires_grad_()
        mode, cov = _newton_step(loss_fn(x_var), x_var, trust_radius, None, keep_graph)
        if not keep_graph:
            return mode.detach(), cov.detach()
        # That cov is H(x)^{-1} at the detached x: its derivative misses the mode's own
        # dependence on the parameters. The Hessian at the differentiable mode has it all.
        _, cov = _newton_step(loss_fn(mode), mode, trust_radius, None, create_graph=True)
    return mode, cov
