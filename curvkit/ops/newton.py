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
:math:`\epsilon_H = \epsilon_{\text{dtype}} (1 + \sum_{ij} |H_{ij}|)` is the smallest curvature
the dtype resolves at the scale of :math:`H`. Any excess of :math:`\|dx\|` over :math:`r` left by
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
- Any ``D >= 1`` is supported: closed forms for ``D <= 3``, batched LAPACK beyond.
- The Hessian is symmetrised, so ``cov`` is exactly symmetric.
- NaN or Inf in the gradient, the Hessian or the covariance gives a warning that says which.

References:
    Yuan, Y. (2000). A review of trust region algorithms for optimization. ICIAM 99.
    Christianson, B. (1994). Reverse accumulation and attractive fixed points. Optimization
    Methods and Software 3(4).
"""

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from curvkit.ops.linalg import eig_3d, rinverse

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
            "gradients enabled."
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


def _warn_if_not_finite(value: Tensor, name: str, advice: str) -> None:
    if not bool(torch.isfinite(value).all()):
        warnings.warn(f"newton_step: the {name} contains NaN or Inf; {advice}", stacklevel=4)


def _gradient_and_hessian(loss: Tensor, x: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    r"""Gradient ``(..., D)`` and per-item Hessian ``(..., D, D)`` of a loss summed over the batch.

    Row ``i`` of every item's Hessian is the gradient of :math:`\sum_n g_{n,i}`, obtained with one
    backward pass of the one-hot direction ``e_i`` (expanded, not materialised) through ``g``.
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
        return g, g.new_zeros(*g.shape, dim)
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
    return g, torch.stack(rows, dim=-2)


def _curvature_floor(H: Tensor) -> Tensor:
    """Smallest curvature the dtype resolves at the scale of each ``H``, as a constant."""
    with torch.no_grad():
        scale = 1 + H.abs().sum(dim=(-2, -1))
    return torch.finfo(H.dtype).eps * scale


def _smallest_eigenvalue(H: Tensor) -> Tensor:
    dim = H.shape[-1]
    if dim == 2:
        mean = (H[..., 0, 0] + H[..., 1, 1]) / 2
        radius = torch.linalg.vector_norm(
            torch.stack([(H[..., 0, 0] - H[..., 1, 1]) / 2, H[..., 0, 1]], dim=-1), dim=-1
        )
        return mean - radius
    if dim == 3:
        return eig_3d(H)[0]
    return torch.linalg.eigvalsh(H)[..., 0]


def _symmetric_inverse(H: Tensor) -> Tensor:
    if H.shape[-1] <= 3:
        return rinverse(H, sym=True)
    # inv_ex: a singular matrix must give a warning below, not stop the whole batch.
    inverse = torch.linalg.inv_ex(H)[0]
    return (inverse + inverse.mT) / 2


def _solve_1d(g: Tensor, H: Tensor, trust_radius: float | None) -> tuple[Tensor, Tensor]:
    # Nonpositive curvature is floored: the step then runs to the trust region's boundary.
    cov = H.clamp(min=_curvature_floor(H)[..., None, None]).reciprocal()
    dx = -g * cov.squeeze(-1)
    if trust_radius is not None:
        dx = dx.clamp(min=-trust_radius, max=trust_radius)
    return dx, cov


def _solve(g: Tensor, H: Tensor, trust_radius: float | None) -> tuple[Tensor, Tensor]:
    """Step ``dx`` and covariance ``cov`` from the gradient and the symmetric Hessian, D >= 2."""
    cov = _symmetric_inverse(H)
    dx = -(cov @ g.unsqueeze(-1)).squeeze(-1)
    if trust_radius is None:
        return dx, cov
    lambda_min = _smallest_eigenvalue(H)
    acceptable = (lambda_min > 0) & (torch.linalg.vector_norm(dx, dim=-1) <= trust_radius)
    if bool(acceptable.all()):
        return dx, cov
    target = torch.maximum(torch.linalg.vector_norm(g, dim=-1) / trust_radius, _curvature_floor(H))
    shift = torch.where(acceptable, 0.0, target - lambda_min)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    cov = _symmetric_inverse(H + shift[..., None, None] * eye)
    dx = -(cov @ g.unsqueeze(-1)).squeeze(-1)
    # Rounding in lambda_min can leave ||dx|| a hair above the radius: scale it back.
    norm = torch.linalg.vector_norm(dx, dim=-1, keepdim=True)
    dx = torch.where(norm > trust_radius, dx * (trust_radius / norm), dx)
    return dx, cov


def _newton_step(
    loss: Tensor, x: Tensor, trust_radius: float | None, dim: int | None, create_graph: bool
) -> tuple[Tensor, Tensor]:
    _check_inputs(loss, x, trust_radius, dim)
    g, H = _gradient_and_hessian(loss, x, create_graph)
    _warn_if_not_finite(g, "gradient", "check the loss and the current x.")
    _warn_if_not_finite(H, "Hessian", "check the loss and the current x.")
    if x.shape[-1] == 1:
        dx, cov = _solve_1d(g, H, trust_radius)
    else:
        dx, cov = _solve(g, (H + H.mT) / 2, trust_radius)
    _warn_if_not_finite(
        cov,
        "covariance (inverse Hessian)",
        "the Hessian is singular for some item; pass a trust_radius to regularise it.",
    )
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
    :func:`newton_step_3d` or, for ``D >= 4``, to batched LAPACK routines.

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

    The curvature is floored at :math:`\epsilon_H > 0`, so a nonpositive curvature gives a very
    long step in the descent direction, which a trust radius clamps to :math:`\pm r`.

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
    tensor ``loss_fn`` depends on.

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
            f"newton_minimize: not converged after max_iters={max_iters} steps (relative step "
            f"tolerance {tol:g}); raise max_iters, or check that every item's loss has a "
            f"minimum.",
            stacklevel=2,
        )
    x_var = x.clone().requires_grad_()
    return _newton_step(loss_fn(x_var), x_var, trust_radius, None, create_graph=True)
