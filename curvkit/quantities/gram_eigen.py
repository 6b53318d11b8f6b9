r"""GGN eigenpairs, directional derivatives and damped Newton steps in Gram space.

This module knows nothing of models, hooks or engines: it works on the Gram blocks of one
parameter group's square-root factor, summed over the group's parameters, and hands back
coefficients that the caller turns into parameter-space vectors with one
:meth:`~curvkit.engines.factor.Factor.mat` per parameter.

Notation. A batch of :math:`N` samples has the batch loss :math:`L = \sum_n L_n`, split into the
contributions :math:`L_n` of the samples (for a ``mean`` reduction :math:`L_n` carries the factor
:math:`1/N`). The curvature uses :math:`S` of the samples (all of them, or a sub-sample) with
:math:`C'` square-root columns :math:`v_{c,m} = J_m^\top s_{m,c}` each,
:math:`\sum_c s_{m,c} s_{m,c}^\top = \partial^2 L_m / \partial f_m^2`. The GGN estimate is

.. math::

    G = \frac{N}{S} \sum_{m} \sum_c v_{c,m} v_{c,m}^\top = \tilde V \tilde V^\top,
    \qquad \tilde V = \sqrt{N/S}\, V,

(:math:`N/S = 1` without sub-sampling), with the Gram matrix
:math:`A = \tilde V^\top \tilde V \in \mathbb{R}^{C'S \times C'S}`, which has the same nonzero
eigenvalues as :math:`G`. For an eigenpair :math:`A u_k = \lambda_k u_k`, the GGN eigenvector is

.. math::

    e_k = \tilde V u_k / \sqrt{\lambda_k}.

ViViT's conventions, which this module reproduces, scale the per-sample derivatives by :math:`N`,
so that their means over the samples are the batch quantities for every reduction:

.. math::

    \gamma_{n,k} = N \nabla_\theta L_n^\top e_k, \qquad
    \lambda_{n,k} = N\, e_k^\top G(L_n)\, e_k = S \lambda_k \sum_c (u_k)_{c,n}^2,

so :math:`\operatorname{mean}_n \gamma_{n,k} = \nabla_\theta L^\top e_k` and
:math:`\operatorname{mean}_n \lambda_{n,k} = \lambda_k`. For a ``mean`` reduction over samples,
:math:`N L_n` is the loss of sample :math:`n` alone; for ``sum``, :math:`\gamma_{n,k}` is
:math:`N` times the directional derivative of sample :math:`n`'s loss. The last identity for
:math:`\lambda_{n,k}` follows from :math:`\tilde V^\top e_k = A u_k / \sqrt{\lambda_k} =
\sqrt{\lambda_k} u_k`; it needs no further product with the Gram matrix.

The damped Newton step along the selected directions is

.. math::

    s = \sum_k \frac{-\operatorname{mean}_n \gamma_{n,k}}
        {\operatorname{mean}_n \lambda_{n,k} + \delta_k} e_k
      = \tilde V\, U \operatorname{diag}\!\Big(\frac{c_k}{\sqrt{\lambda_k}}\Big),

the Newton step on :math:`L` restricted to the selected eigenspace, with directional damping
:math:`\delta_k`.

Numerical care:

- Eigenvalues at most ``numel * eps * max|lambda|`` are *numerically zero*: their eigenvectors
  are not determined by the data (ViViT divides by :math:`\sqrt{\lambda_k} \approx 0` there).
  If selected, their directions, derivatives and step contributions are set to zero, with a
  :class:`RuntimeWarning`.
- Each Gram eigenvector's sign is fixed (its entry of largest magnitude is positive), so every
  result is a deterministic function of the Gram matrix; steps do not depend on signs anyway.
- A selection that splits a cluster of numerically equal eigenvalues (closer than
  ``4 sqrt(numel) * eps * max|lambda|``, the eigensolver's backward error) picks an arbitrary basis
  of that eigenspace: the choice is the deterministic one of the symmetric eigensolver for this
  Gram matrix, and a :class:`RuntimeWarning` says to keep or drop the whole cluster.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit.ops.linalg import lapack_dtype

__all__ = [
    "GramDirections",
    "TopK",
    "damped_newton_coefficients",
    "directional_curvatures",
    "directional_gradients",
    "gram_directions",
    "resolve_damping",
    "top_eigh",
]

Criterion = Callable[[Tensor], Sequence[int]]
Damping = float | Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

#: Gram matrices at least this large use a partial eigensolver for a :class:`TopK` criterion.
PARTIAL_EIGH_MIN_SIZE = 256
#: ... and only while the Gram matrix has at least this many rows per requested pair: measured
#: on 2 CPU cores (one thread), the block Krylov solver beat ``torch.linalg.eigh`` by 1.4-4x at
#: sizes 640-1408 with k <= size / 40, and lost by up to 1.8x for k = 20 at 640 or k = 50 at 1408.
PARTIAL_EIGH_ROWS_PER_PAIR = 40


class TopK:
    """The criterion that keeps the ``k`` largest eigenvalues.

    Calling it on ascending eigenvalues returns the indices of the last ``k`` (all of them if
    there are fewer). Being recognisable, it lets curvkit compute only those ``k`` eigenpairs with
    a block Krylov method instead of a full eigendecomposition of the Gram matrix.

    Args:
        k: Number of leading eigenvalues to keep, at least 1.

    Raises:
        ValueError: If ``k`` is not a positive integer.
    """

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"top-k criterion needs a positive integer k, got {k!r}")
        self.k = k

    def __call__(self, evals: Tensor) -> list[int]:
        """Return the indices of the ``k`` largest of the ascending ``evals``."""
        num = evals.numel()
        return list(range(max(num - self.k, 0), num))

    def __repr__(self) -> str:
        return f"TopK({self.k})"


@dataclass
class GramDirections:
    r"""Selected eigenpairs of a group's Gram matrix, ready to map to parameter space.

    Attributes:
        evals: Selected eigenvalues :math:`\lambda_k`, shape ``[K]``, in the criterion's order.
        gram_evecs: Orthonormal Gram eigenvectors :math:`u_k` as columns, shape ``[C' S, K]``.
        inv_sqrt_evals: :math:`1/\sqrt{\lambda_k}`, zero for numerically zero eigenvalues.
        scale: :math:`\sqrt{N/S}`, the sub-sampling correction of :math:`V`.
        batch_size: :math:`N`.
        num_columns: :math:`C'`.
        num_samples: :math:`S`.
    """

    evals: Tensor
    gram_evecs: Tensor
    inv_sqrt_evals: Tensor
    scale: float
    batch_size: int
    num_columns: int
    num_samples: int

    def evec_coefficients(self) -> Tensor:
        r"""Coefficients ``[C', S, K]``: :math:`V` times them gives the eigenvectors :math:`e_k`."""
        coefficients = self.scale * self.gram_evecs * self.inv_sqrt_evals
        return coefficients.reshape(self.num_columns, self.num_samples, -1)


def gram_directions(
    gram: Tensor,
    batch_size: int,
    criterion: Criterion,
    *,
    warn_below: float | None = None,
) -> GramDirections:
    r"""Eigen-decompose a group's Gram matrix and keep the directions the criterion selects.

    Args:
        gram: :math:`V^\top V` summed over the group's parameters, shape ``[C', S, C', S]``.
        batch_size: :math:`N`, the number of samples the batch loss is made of.
        criterion: ``criterion(evals) -> indices`` on all Gram eigenvalues in ascending order.
        warn_below: Warn if a selected eigenvalue's magnitude is below this value; ``None`` warns
            below :math:`\sqrt{\varepsilon}\max|\lambda|` (:math:`\varepsilon`: the dtype's
            machine epsilon), where an eigenvector's relative error can exceed
            :math:`\sqrt{\varepsilon}`.

    Returns:
        The selected directions.

    Raises:
        ValueError: If the Gram matrix has the wrong shape or the criterion returns invalid
            indices.
    """
    if gram.dim() != 4 or gram.shape[:2] != gram.shape[2:]:
        raise ValueError(f"Gram matrix must have shape [C', S, C', S], got {tuple(gram.shape)}")
    num_columns, num_samples = gram.shape[:2]
    size = num_columns * num_samples
    scale_sq = batch_size / num_samples
    dtype = gram.dtype
    # Half precisions are decomposed in float32 (torch has no eigh for them); the tolerances
    # below stay those of the Gram matrix's own dtype, and the results come back in it.
    matrix = scale_sq * gram.reshape(size, size).to(lapack_dtype(dtype))
    matrix = 0.5 * (matrix + matrix.T)

    if (
        isinstance(criterion, TopK)
        and size >= PARTIAL_EIGH_MIN_SIZE
        and criterion.k * PARTIAL_EIGH_ROWS_PER_PAIR <= size
    ):
        # One more Ritz value than requested tells whether the cut splits a cluster.
        evals, evecs = top_eigh(matrix, criterion.k + 1, num_converged=criterion.k)
        keep = list(range(1, criterion.k + 1))
        max_abs = evals[-1].abs()
    else:
        evals, evecs = torch.linalg.eigh(matrix)
        keep = _check_indices(criterion(evals), size, criterion)
        max_abs = evals.abs().max()
    _warn_split_cluster(evals, keep, max_abs, size)

    index = torch.tensor(keep, dtype=torch.long, device=evals.device)
    evals, evecs = evals[index], _fix_signs(evecs[:, index])

    eps = torch.finfo(dtype).eps
    zero_tol = size * eps * max_abs
    is_zero = evals <= zero_tol
    threshold = math.sqrt(eps) * max_abs if warn_below is None else warn_below
    small = evals.abs() < threshold
    if small.any():
        message = (
            f"{int(small.sum())} selected GGN eigenvalue(s) are small (below {float(threshold):.3g}"
            f"; largest {float(max_abs):.3g}): their eigenvectors come from a division by the "
            "square root of the eigenvalue and can be inaccurate."
        )
        if is_zero.any():
            message += (
                f" {int(is_zero.sum())} of them are numerically zero (at most "
                f"{float(zero_tol):.3g}): their directions are undefined and are returned as zero "
                "(zero eigenvector, directional derivatives and step contribution)."
            )
        warnings.warn(
            message + " Use a more restrictive criterion, e.g. curvkit.top_k(k).",
            RuntimeWarning,
            stacklevel=3,
        )
    inv_sqrt = torch.where(is_zero, torch.zeros_like(evals), evals.clamp_min(zero_tol).rsqrt())
    return GramDirections(
        evals=evals.to(dtype),
        gram_evecs=evecs.to(dtype),
        inv_sqrt_evals=inv_sqrt.to(dtype),
        scale=math.sqrt(scale_sq),
        batch_size=batch_size,
        num_columns=num_columns,
        num_samples=num_samples,
    )


def directional_gradients(directions: GramDirections, grad_gram: Tensor) -> Tensor:
    r"""Per-sample directional gradients :math:`\gamma_{n,k} = N \nabla L_n^\top e_k`.

    Args:
        directions: The selected directions.
        grad_gram: :math:`\nabla L_n^\top v_{c,m}` summed over the group's parameters, shape
            ``[S_g, C', S]`` (:math:`S_g` samples of the gradient).

    Returns:
        ``[S_g, K]``.
    """
    flat = grad_gram.reshape(grad_gram.shape[0], -1)
    return (directions.batch_size * directions.scale) * (
        flat @ directions.gram_evecs * directions.inv_sqrt_evals
    )


def directional_curvatures(directions: GramDirections) -> Tensor:
    r"""Per-sample directional curvatures :math:`\lambda_{n,k} = N e_k^\top G(L_n) e_k`.

    Returns:
        ``[S, K]``, zero along numerically zero directions.
    """
    defined = (directions.inv_sqrt_evals > 0).to(directions.evals.dtype)
    evecs = directions.gram_evecs.reshape(directions.num_columns, directions.num_samples, -1)
    weight = directions.num_samples * directions.evals * defined
    return evecs.square().sum(0) * weight


def damped_newton_coefficients(
    directions: GramDirections, gammas: Tensor, lambdas: Tensor, damping: Tensor
) -> Tensor:
    r"""Coefficients of :math:`V` whose product is the damped Newton step.

    Args:
        directions: The selected directions.
        gammas: Directional gradients ``[S_g, K]``.
        lambdas: Directional curvatures ``[S, K]``.
        damping: Directional dampings :math:`\delta_k`, shape ``[K]``, non-negative.

    Returns:
        ``[C', S, 1]``: the step is :math:`V` times these coefficients.
    """
    denominator = lambdas.mean(0) + damping
    defined = directions.inv_sqrt_evals > 0
    # Where an undefined direction meets zero damping the quotient is 0/0: it contributes nothing.
    safe = torch.where(defined, denominator, torch.ones_like(denominator))
    step_along = torch.where(defined, -gammas.mean(0) / safe, torch.zeros_like(denominator))
    coefficients = directions.evec_coefficients() @ step_along
    return coefficients.unsqueeze(-1)


def damped_newton_step_coefficients(
    directions: GramDirections, grad_gram: Tensor, damping: Damping
) -> Tensor:
    r"""Coefficients of :math:`V` for the damped Newton step, from a group's ``"damping"`` option.

    The directional derivatives (:func:`directional_gradients`, :func:`directional_curvatures`),
    the dampings they determine (:func:`resolve_damping`) and :func:`damped_newton_coefficients`
    in one call.

    Args:
        directions: The selected directions.
        grad_gram: Products of per-sample gradients and square-root columns ``[S_g, C', S]``.
        damping: A non-negative number, or ``damping(evals, evecs, gammas, lambdas)``.

    Returns:
        ``[C', S, 1]``: the step is :math:`V` times these coefficients.
    """
    gammas = directional_gradients(directions, grad_gram)
    lambdas = directional_curvatures(directions)
    value = resolve_damping(damping, directions, gammas, lambdas)
    return damped_newton_coefficients(directions, gammas, lambdas, value)


def resolve_damping(
    damping: Damping, directions: GramDirections, gammas: Tensor, lambdas: Tensor
) -> Tensor:
    """Evaluate and check a group's ``"damping"`` option: a tensor ``[K]`` of finite values >= 0.

    Args:
        damping: A non-negative number, or ``damping(evals, evecs, gammas, lambdas)``.
        directions: The selected directions.
        gammas: Directional gradients ``[N_grad, K]``.
        lambdas: Directional curvatures ``[N_ggn, K]``.

    Returns:
        The dampings ``[K]``, dtype and device of the eigenvalues.

    Raises:
        TypeError: If ``damping`` is neither a number nor a callable returning a tensor.
        ValueError: If a damping is negative or not finite, or has the wrong shape.
    """
    evals = directions.evals
    if callable(damping):
        value = damping(evals, directions.gram_evecs, gammas, lambdas)
        if not isinstance(value, Tensor):
            raise TypeError(
                f"the damping function returned a {type(value).__name__}: it must return a "
                f"tensor of shape [{evals.numel()}], one damping per direction"
            )
        if value.shape not in (torch.Size([]), evals.shape):
            raise ValueError(
                f"the damping function returned shape {tuple(value.shape)}: it must return shape "
                f"[{evals.numel()}], one damping per direction (or a scalar)"
            )
        value = value.to(device=evals.device, dtype=evals.dtype).expand(evals.shape)
    elif isinstance(damping, int | float) and not isinstance(damping, bool):
        value = torch.full_like(evals, float(damping))
    else:
        raise TypeError(
            f"'damping' must be a non-negative number or a function (evals, evecs, gammas, "
            f"lambdas) -> Tensor [K], got {type(damping).__name__}"
        )
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
        raise ValueError(
            f"dampings must be finite and non-negative, got {value.tolist()}: a negative damping "
            "can make the damped curvature vanish or change sign"
        )
    return value


def top_eigh(
    matrix: Tensor, k: int, *, num_converged: int | None = None, max_dim: int | None = None
) -> tuple[Tensor, Tensor]:
    r"""The ``k`` largest eigenpairs of a symmetric matrix by block Krylov iteration.

    Builds an orthonormal basis :math:`Q` of :math:`[X, AX, A^2X, \ldots]` from a fixed
    pseudo-random start block (so the result is deterministic) with full re-orthogonalisation,
    keeps :math:`T = Q^\top A Q` up to date block by block, and stops when the
    ``num_converged`` leading Ritz pairs have residuals
    :math:`\|A x - \theta x\| \le 4 \sqrt{n}\, \varepsilon \max|\theta|`, about the backward
    error of a dense eigensolver. If the basis would exceed ``max_dim`` (default: half the matrix
    size) first, it falls back to :func:`torch.linalg.eigh`, so the result is as accurate either
    way. The cost is a few products of the matrix with thin blocks instead of
    a full tridiagonalisation: much less than a dense eigendecomposition when :math:`k \ll n`.

    Args:
        matrix: Symmetric ``[n, n]``.
        k: Number of leading eigenpairs, ``1 <= k <= n``.
        num_converged: How many of them must meet the tolerance (default: all ``k``); the others
            are Ritz approximations (their values bound the true eigenvalues from below).
        max_dim: Largest Krylov basis before the dense fallback.

    Returns:
        Eigenvalues ``[k]`` ascending and orthonormal eigenvectors ``[n, k]`` as columns.
    """
    size = matrix.shape[0]
    if num_converged is None:
        num_converged = k
    if max_dim is None:
        max_dim = size // 2
    block = min(size, max(2 * k, k + 8))
    if 2 * block > max_dim:
        evals, evecs = torch.linalg.eigh(matrix)
        return evals[-k:], evecs[:, -k:]
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    start = torch.randn(size, block, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis, _ = torch.linalg.qr(start)
    products = matrix @ basis
    projected = basis.T @ products
    tolerance = 4 * math.sqrt(size) * torch.finfo(matrix.dtype).eps
    iteration = 0
    while True:
        iteration += 1
        exhausted = basis.shape[1] + block > max_dim
        # A Rayleigh-Ritz check costs an eigendecomposition of T: only every other step.
        if (iteration >= 3 and iteration % 2 == 1) or exhausted:
            ritz_vals, ritz_vecs = torch.linalg.eigh(0.5 * (projected + projected.T))
            ritz_vals, ritz_vecs = ritz_vals[-k:], ritz_vecs[:, -k:]
            top_vals, top_vecs = ritz_vals[k - num_converged :], ritz_vecs[:, k - num_converged :]
            residual = products @ top_vecs - basis @ (top_vecs * top_vals)
            if bool((residual.norm(dim=0) <= tolerance * top_vals.abs().max()).all()):
                return ritz_vals, basis @ ritz_vecs
        if exhausted:
            evals, evecs = torch.linalg.eigh(matrix)
            return evals[-k:], evecs[:, -k:]
        new = products[:, -block:]
        for _ in range(2):
            new = new - basis @ (basis.T @ new)
        new, _ = torch.linalg.qr(new)
        new_products = matrix @ new
        cross = basis.T @ new_products
        projected = torch.cat(
            [
                torch.cat([projected, cross], dim=1),
                torch.cat([cross.T, new.T @ new_products], dim=1),
            ]
        )
        basis = torch.cat([basis, new], dim=1)
        products = torch.cat([products, new_products], dim=1)


def _check_indices(indices: Sequence[int] | Tensor, size: int, criterion: Criterion) -> list[int]:
    if isinstance(indices, Tensor):
        if indices.dtype == torch.bool:
            raise ValueError(
                f"criterion {criterion!r} returned a boolean mask: it must return integer "
                "indices, e.g. torch.nonzero(mask).flatten().tolist()"
            )
        if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
            raise ValueError(
                f"criterion {criterion!r} returned a tensor of dtype {indices.dtype} and shape "
                f"{tuple(indices.shape)}: it must return a list of integer indices into the "
                "eigenvalues"
            )
        indices = indices.tolist()
    try:
        keep = list(indices)
    except TypeError:
        raise ValueError(
            f"criterion {criterion!r} returned a {type(indices).__name__}: it must return a list "
            "of integer indices into the eigenvalues"
        ) from None
    for index in keep:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(
                f"criterion {criterion!r} returned the index {index!r} "
                f"({type(index).__name__}): indices must be integers"
            )
        if not 0 <= index < size:
            raise ValueError(
                f"criterion {criterion!r} returned the index {index}, outside the {size} "
                f"eigenvalues: indices must lie in [0, {size})"
            )
    if len(set(keep)) != len(keep):
        raise ValueError(
            f"criterion {criterion!r} returned repeated indices {keep}: select each eigenvalue once"
        )
    return keep


def _fix_signs(evecs: Tensor) -> Tensor:
    if evecs.numel() == 0:
        return evecs
    pivot = evecs.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(evecs.gather(0, pivot))
    return evecs * torch.where(signs == 0, torch.ones_like(signs), signs)


def _warn_split_cluster(evals: Tensor, keep: list[int], max_abs: Tensor, size: int) -> None:
    if not keep or len(keep) == evals.numel():
        return
    mask = torch.zeros(evals.numel(), dtype=torch.bool, device=evals.device)
    mask[keep] = True
    kept, dropped = evals[mask], evals[~mask]
    eps = torch.finfo(evals.dtype).eps
    # Eigenvalues closer than the eigensolver's backward error cannot be told apart.
    tolerance = 4 * math.sqrt(size) * eps * max_abs
    # Clusters of numerically zero eigenvalues are handled (and reported) as zero directions.
    zero_tol = size * eps * max_abs
    gaps = (kept[:, None] - dropped[None, :]).abs()
    split = (gaps <= tolerance) & (kept[:, None] > zero_tol)
    if bool(split.any()):
        warnings.warn(
            "the criterion keeps some but not all of a cluster of (numerically) equal GGN "
            f"eigenvalues (around {float(kept[split.any(1)][0]):.6g}): the kept eigenvectors are "
            "one arbitrary, deterministic basis choice within that eigenspace (the eigensolver's "
            "for this Gram matrix). Keep or drop the whole cluster for a unique result.",
            RuntimeWarning,
            stacklevel=4,
        )
