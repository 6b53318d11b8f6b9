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
  (LAPACK's ``eigh`` only for items where it does not converge); see :mod:`curvkit.ops.entrywise`.
  This solve runs without recording a graph, on a CPU in cache-sized chunks of the batch, and its
  derivative is written out (:math:`\bar H = a\, dx^\top - K \bar K K`,
  :math:`\bar g = a = -K \bar{dx}`, plus :math:`\lambda_{\min}`'s :math:`v v^\top` for the
  regularised items): the backward pass keeps two tensors instead of hundreds. For ``D >= 4``,
  ``cov`` is a view whose batch dimensions are innermost in memory.
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

from curvkit.ops.entrywise import (
    EntrywiseLDL,
    smallest_eigenvectors,
    stack_matrices,
    upper_indices,
)
from curvkit.ops.linalg import (
    couples_items,
    lapack_dtype,
    sym_adjugate_3x3,
    sym_eigvals_3x3,
)

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


def _warn_if_not_finite(g: Tensor, rows: list[Tensor], cov: Tensor, check: Tensor | None) -> None:
    # One host sync on the common path, on a sum that is finite unless the gradient, the Hessian
    # or the covariance is not (the D >= 4 solver sums stand-ins: see _finite_check); a false
    # alarm from overflow in the sums is sorted out by the exact checks below.
    if check is None:
        # In 1-d, cov is finite wherever the Hessian is (its curvature is floored).
        check = g.sum() if len(rows) == 1 else g.sum() + cov.sum()
        for row in rows:
            check = check + row.sum()
    if bool(torch.isfinite(check)):
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
    if couples_items(
        lambda v: torch.autograd.grad(
            g, x, v.reshape(x.shape), retain_graph=True, allow_unused=True, materialize_grads=True
        )[0],
        x.detach().reshape(-1, dim),
    ):
        raise ValueError(
            "loss couples the items of x: a Hessian-vector product along x's first item reaches "
            "the others, so the items' Hessians are not the blocks of the batch Hessian and the "
            "Newton steps would be wrong. Pass a loss that sums independent per-item terms."
        )
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


# On a CPU the D >= 4 solve runs on slices of the batch whose entries stay in the processor's
# cache across its O(D^3) elementwise passes, and whose temporaries the memory allocator recycles
# (fresh full-batch temporaries cost page faults). 32768 items measured as good as any for D = 4..8.
_CPU_CHUNK_ITEMS = 1 << 15


def _chunk_items(items: int, device: torch.device) -> int:
    # A GPU's kernels need the whole batch's parallelism.
    return _CPU_CHUNK_ITEMS if device.type == "cpu" else max(items, 1)


def _chunk_entries(rows: list[Tensor], start: int, stop: int) -> list[list[Tensor]]:
    """``h[i][j]``: entry (i, j) of the symmetrised Hessians of items ``start:stop``."""
    dim = len(rows)
    h = [[row[start:stop, i] if i == j else None for j in range(dim)] for i, row in enumerate(rows)]
    for i in range(dim):
        for j in range(i):
            h[i][j] = h[j][i] = torch.lerp(rows[i][start:stop, j], rows[j][start:stop, i], 0.5)
    return h


def _write(dx: list[Tensor], inverse: list[list[Tensor]], dx_out: Tensor, cov_out: Tensor) -> None:
    """Entries into the output slices ``dx_out`` ``(D, C)`` and ``cov_out`` ``(D * D, C)``."""
    dim = len(dx)
    for i in range(dim):
        dx_out[i].copy_(dx[i])
        for j in range(dim):
            cov_out[i * dim + j].copy_(inverse[i][j])


def _write_items(dx: Tensor, cov: Tensor, items: Tensor, dx_out: Tensor, cov_out: Tensor) -> None:
    """``dx`` ``(R, D)`` and ``cov`` ``(R, D, D)`` of the chunk's ``items`` into the slices."""
    dx_out.index_copy_(1, items, dx.T)
    cov_out.index_copy_(1, items, cov.flatten(-2).T)


def _solve_chunk_plain(
    h: list[list[Tensor]], g: list[Tensor], dx_out: Tensor, cov_out: Tensor
) -> Tensor:
    """The plain Newton step of one chunk, LAPACK for indefinite items with small pivots.

    Returns:
        A sum that is finite unless ``H`` or ``g`` has NaN or Inf entries, or ``H`` is singular.
    """
    factors = EntrywiseLDL(h)
    dx = factors.step(g)
    _write(dx, factors.inverse(), dx_out, cov_out)
    definite = factors.positive_definite()
    if bool(definite.all()):
        return _finite_check(factors, dx)
    # Without pivoting, LDL^T of an indefinite matrix is unreliable where a pivot is small.
    scale = sum(entry.abs() for row in h for entry in row)
    threshold = torch.finfo(scale.dtype).eps ** 0.5 * scale
    # NaN-safe: a NaN pivot (after a zero one) counts as small.
    small = ~functools.reduce(
        torch.logical_and, [pivot.abs() > threshold for pivot in factors.pivots]
    )
    fallback = (~definite & small).nonzero().squeeze(-1)
    if fallback.numel() == 0:
        return _finite_check(factors, dx)
    H = stack_matrices(h, fallback)
    cov = torch.linalg.inv_ex(H.to(lapack_dtype(H.dtype)))[0].to(H.dtype)
    cov = (cov + cov.mT) / 2
    dx = -(cov @ torch.stack([entry[fallback] for entry in g], -1).unsqueeze(-1)).squeeze(-1)
    _write_items(dx, cov, fallback, dx_out, cov_out)
    # The unpivoted factors of the LAPACK items may hold NaN: sum the inputs and outputs instead.
    return sum(entry.sum() for row in h for entry in row) + dx_out.sum()


def _finite_check(factors: EntrywiseLDL, dx: list[Tensor]) -> Tensor:
    # NaN or Inf in H reaches a pivot; in g, or a zero pivot (singular H), the step.
    return sum(pivot.sum() for pivot in factors.pivots) + sum(entry.sum() for entry in dx)


def _solve_chunk_trust(
    h: list[list[Tensor]], g: list[Tensor], trust_radius: float, dx_out: Tensor, cov_out: Tensor
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    r"""The trust-region step of one chunk (see the module doc).

    Returns:
        A sum that is finite unless ``H`` or ``g`` has NaN or Inf entries, and ``None`` if every
        plain step is acceptable; else the rejected items (chunk indices), the unit eigenvectors
        ``(R, D)`` of their :math:`\lambda_{\min}` (NaN for items with NaN or Inf entries) and
        where their shift depends on :math:`\|g\|` (not on the floor).
    """
    dim = len(g)
    upper = upper_indices(dim)
    factors = EntrywiseLDL(h)
    dx = factors.step(g)
    definite = factors.positive_definite()
    acceptable = definite & (sum(entry.square() for entry in dx) <= trust_radius**2)
    if bool(acceptable.all()):
        _write(dx, factors.inverse(), dx_out, cov_out)
        return _finite_check(factors, dx), None
    check = _finite_check(factors, [])
    rejected = (~acceptable).nonzero().squeeze(-1)
    # Positive definite H (a step too long): the spectrum lies above 0, Laguerre's start.
    lower_bound = torch.zeros_like(factors.pivots[0]).masked_fill_(~definite, float("-inf"))
    if rejected.numel() < acceptable.numel():
        _write(dx, factors.inverse(), dx_out, cov_out)
        taken = {(i, j): h[i][j][rejected] for i, j in upper}
        h = [[taken[min(i, j), max(i, j)] for j in range(dim)] for i in range(dim)]
        g = [entry[rejected] for entry in g]
        lower_bound = lower_bound[rejected]
    abs_sum = sum(h[i][j].abs() * (1 if i == j else 2) for i, j in upper)
    floor = _curvature_floor(abs_sum)
    v = smallest_eigenvectors(h, floor, _LAGUERRE_ITERS, lower_bound)
    unconverged = (torch.isnan(v[:, 0]) & torch.isfinite(abs_sum)).nonzero().squeeze(-1)
    if unconverged.numel() > 0:
        H = stack_matrices(h, unconverged)
        v[unconverged] = torch.linalg.eigh(H.to(lapack_dtype(H.dtype)))[1][..., 0].to(H.dtype)
    # The Rayleigh quotient at the eigenvector: lambda_min to second order in its error.
    lambda_min = sum(h[i][j] * (v[:, i] * v[:, j] * (1 if i == j else 2)) for i, j in upper)
    g_norm = sum(entry.square() for entry in g).sqrt()
    from_gradient = g_norm / trust_radius > floor
    shifted = EntrywiseLDL(h, torch.where(from_gradient, g_norm / trust_radius, floor) - lambda_min)
    dx = shifted.step(g)
    # Onto the ball what rounding leaves outside (see the module doc).
    scale = (trust_radius / sum(entry.square() for entry in dx).sqrt()).clamp(max=1)
    dx = [entry * scale for entry in dx]
    check = check + sum(entry.sum() for entry in dx)
    if rejected.numel() == acceptable.numel():
        _write(dx, shifted.inverse(), dx_out, cov_out)
    else:
        cov = stack_matrices(shifted.inverse())
        _write_items(torch.stack(dx, -1), cov, rejected, dx_out, cov_out)
    return check, (rejected, v, from_gradient)


class _SolveND(torch.autograd.Function):
    r"""The step and covariance for ``D >= 4`` without a graph, with an analytic derivative.

    Forward: chunk by chunk, the entrywise :math:`LDL^\top` of the symmetrised Hessian gives the
    plain step :math:`dx = -K g` and :math:`K = H^{-1}`; with a trust radius, the rejected items
    are solved again with :math:`K = (H + \lambda I)^{-1}`, :math:`\lambda = t - \lambda_{\min}`,
    :math:`t = \max(\|g\| / r, \epsilon_H)`. Recording hundreds of elementwise operations over the
    whole batch would keep all their outputs alive for the backward pass; this keeps two.

    Backward, with :math:`\bar{dx}, \bar K` the incoming gradients and :math:`a = -K \bar{dx}`:
    :math:`\bar g = a`, :math:`\bar H = a\, dx^\top - K \bar K K` (symmetrised), and for shifted
    items :math:`\bar\lambda = \operatorname{tr} \bar H`, which adds
    :math:`-\bar\lambda\, v v^\top` to :math:`\bar H` (:math:`\partial \lambda_{\min} / \partial H
    = v v^\top`) and :math:`\bar\lambda\, g / (r \|g\|)` to :math:`\bar g` where :math:`t` is
    :math:`\|g\| / r`. Written in differentiable operations on the saved outputs, so that it can
    be differentiated again (up to :math:`\lambda_{\min}`'s own second derivative, not kept).
    The factor that scales a step back onto the ball by rounding is taken as a constant.
    """

    @staticmethod
    def forward(ctx, trust_radius: float | None, g: Tensor, *rows: Tensor):
        dim = g.shape[-1]
        items = g.numel() // dim
        g_flat = g.reshape(items, dim)
        rows_flat = [row.reshape(items, dim) for row in rows]
        # Entry-major buffers: every chunk writes whole contiguous runs of each entry.
        dx = g.new_empty(dim, items)
        cov = g.new_empty(dim * dim, items)
        check = g.new_zeros(())
        eigenvectors = from_gradient = None
        chunk = _chunk_items(items, g.device)
        for start in range(0, items, chunk):
            stop = min(start + chunk, items)
            h = _chunk_entries(rows_flat, start, stop)
            g_chunk = list(g_flat[start:stop].unbind(-1))
            dx_out, cov_out = dx[:, start:stop], cov[:, start:stop]
            if trust_radius is None:
                check += _solve_chunk_plain(h, g_chunk, dx_out, cov_out)
            else:
                chunk_check, shifted = _solve_chunk_trust(h, g_chunk, trust_radius, dx_out, cov_out)
                check += chunk_check
                if shifted is not None:
                    if eigenvectors is None:
                        eigenvectors = g.new_zeros(items, dim)
                        from_gradient = g.new_zeros(items)
                    rejected, v, by_gradient = shifted
                    eigenvectors[start:stop].index_copy_(0, rejected, v)
                    from_gradient[start:stop].index_copy_(0, rejected, by_gradient.to(g.dtype))
        dx = dx.T.reshape(g.shape)
        cov = cov.T.unflatten(-1, (dim, dim)).reshape(*g.shape, dim)
        ctx.trust_radius = trust_radius
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(check)
        ctx.save_for_backward(g, dx, cov, eigenvectors, from_gradient)
        return dx, cov, check

    @staticmethod
    def backward(ctx, grad_dx: Tensor | None, grad_cov: Tensor | None, _: Tensor | None):
        g, dx, cov, eigenvectors, from_gradient = ctx.saved_tensors
        shape, dim = g.shape, g.shape[-1]
        if grad_dx is None and grad_cov is None:
            return None, None, *([None] * dim)
        # Batched matmul is several times faster on contiguous matrices than on the entry-major
        # layout of the forward's output or on expanded ones.
        g, dx, cov = g.reshape(-1, dim), dx.reshape(-1, dim), cov.reshape(-1, dim, dim).contiguous()
        grad_g = torch.zeros_like(g)
        grad_h = None
        if grad_dx is not None:
            grad_g = -(cov @ grad_dx.reshape(-1, dim, 1).contiguous()).squeeze(-1)
            grad_h = grad_g.unsqueeze(-1) * dx.unsqueeze(-2)
        if grad_cov is not None:
            # (An expanded incoming gradient, as from cov.sum(), would take matmul's slow path.)
            kernel = cov @ grad_cov.reshape(-1, dim, dim).contiguous() @ cov
            grad_h = -kernel if grad_dx is None else grad_h - kernel
        if eigenvectors is not None:
            grad_shift = grad_h.diagonal(dim1=-2, dim2=-1).sum(-1)
            grad_h = grad_h - grad_shift[:, None, None] * (
                eigenvectors.unsqueeze(-1) * eigenvectors.unsqueeze(-2)
            )
            g_norm = torch.linalg.vector_norm(g, dim=-1).clamp(min=torch.finfo(g.dtype).tiny)
            weight = grad_shift * from_gradient / (ctx.trust_radius * g_norm)
            grad_g = grad_g + weight.unsqueeze(-1) * g
        grad_h = (grad_h + grad_h.mT) / 2
        return None, grad_g.reshape(shape), *(grad_h[:, i].reshape(shape) for i in range(dim))


_SOLVERS = {1: _solve_1d, 2: _solve_2d, 3: _solve_3d}

# Laguerre steps before LAPACK takes an item's smallest eigenvalue (4-6 are typical for D <= 8).
_LAGUERRE_ITERS = 30


def _newton_step(
    loss: Tensor, x: Tensor, trust_radius: float | None, dim: int | None, create_graph: bool
) -> tuple[Tensor, Tensor]:
    _check_inputs(loss, x, trust_radius, dim)
    g, rows = _gradient_and_hessian_rows(loss, x, create_graph)
    if x.shape[-1] in _SOLVERS:
        dx, cov = _SOLVERS[x.shape[-1]](g, rows, trust_radius)
        check = None
    else:
        dx, cov, check = _SolveND.apply(trust_radius, g, *rows)
    _warn_if_not_finite(g, rows, cov, check)
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
        Hessian, shape ``(..., D, D)``, symmetric (for ``D >= 4`` a view whose batch dimensions
        are innermost in memory); at the minimum,
        ``MultivariateNormal(mode, cov)`` is the Laplace approximation of
        :math:`\exp(-\text{loss})`.

    Raises:
        TypeError: If ``loss`` or ``x`` is not a tensor, ``x`` is not floating point, or
            ``trust_radius`` is not a number.
        ValueError: If ``loss`` is not a scalar, ``x`` has no last dimension, ``x`` does not
            require grad, ``loss`` does not depend on ``x`` or couples its items (one
            Hessian-vector product along the first item reveals it), or ``trust_radius`` is not
            positive and finite.

    Warns:
        UserWarning: If the gradient, the Hessian or the covariance contains NaN or Inf.
    """
    return _newton_step(loss, x, trust_radius, None, create_graph=True)


_StepFunction = Callable[[Tensor, Tensor, float | None], tuple[Tensor, Tensor]]


def _fixed_dimension_step(dimension: int, closed_form: str) -> _StepFunction:
    """Pyro's ``newton_step_{dimension}d``: :func:`newton_step` for one fixed dimension."""

    def step(loss: Tensor, x: Tensor, trust_radius: float | None = None) -> tuple[Tensor, Tensor]:
        return _newton_step(loss, x, trust_radius, dimension, create_graph=True)

    step.__name__ = step.__qualname__ = f"newton_step_{dimension}d"
    step.__doc__ = f"""Newton step for ``x`` of shape ``(..., {dimension})``.

    {closed_form} See :func:`newton_step`.

    Args:
        loss: A scalar, the sum over the batch of independent per-item losses.
        x: The current point, shape ``(..., {dimension})``, with ``requires_grad=True``.
        trust_radius: If given, a positive bound on the length of each item's step.

    Returns:
        ``(mode, cov)`` of shapes ``(..., {dimension})`` and ``(..., {dimension}, {dimension})``.

    Raises:
        TypeError: See :func:`newton_step`.
        ValueError: If ``x.shape[-1] != {dimension}``, or see :func:`newton_step`.
    """
    return step


newton_step_1d = _fixed_dimension_step(
    1,
    "The curvature is floored at the dtype's machine epsilon, so a nonpositive curvature gives a "
    "very long step in the descent direction, which a trust radius clamps to :math:`\\pm r`.",
)
newton_step_2d = _fixed_dimension_step(2, "In closed form.")
newton_step_3d = _fixed_dimension_step(3, "In closed form.")


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
