r"""Spectra of curvature operators: densities by stochastic Lanczos quadrature, top eigenpairs.

Both functions take a symmetric operator :math:`A \in \mathbb{R}^{D \times D}`: a curvkit
operator, a dense tensor, or any object with ``shape`` and ``@`` on ``[D, J]`` matrices (dtype and
device from the operator, else float64 on the CPU or the arguments).

**Spectral density** (:func:`spectral_density`). The density
:math:`\phi(t) = \frac1D \sum_i \delta(t - \lambda_i)` is smoothed with Gaussians and estimated
by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019; Papyan 2020, Algorithm 2). For
a unit starting vector :math:`v`, :math:`K` Lanczos steps give a tridiagonal :math:`T` with
eigenpairs :math:`(\theta_k, s_k)`, and the Gauss quadrature

.. math::

    v^\top f(A) v \approx \sum_{k=1}^K \tau_k^2 f(\theta_k), \qquad \tau_k = (s_k)_1,

exact for polynomials :math:`f` of degree below :math:`2K`. As
:math:`\mathbb{E}[v^\top f(A) v] = \frac1D \operatorname{tr} f(A)` for :math:`v` uniform on the
sphere (a normalised Gaussian or Rademacher vector), the average over ``num_repeats`` vectors of

.. math::

    \hat\phi(t) = \sum_k \tau_k^2\, \mathcal{N}(t;\ \theta_k, \sigma^2)

estimates the smoothed density. The ``num_repeats`` runs share their products: each Lanczos step
is one product with a ``[D, num_repeats]`` block.

**Top eigenpairs** (:func:`lanczos_top_eigenpairs`). Lanczos with full reorthogonalisation
against all earlier vectors (twice, which keeps the basis orthonormal to working precision), run
until the :math:`k` wanted Ritz pairs have residuals below the tolerance. For the GGN, the Gram
matrix route (:func:`curvkit.ggn_eigh`) stays the exact one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from curvkit.randomized.estimators import MatrixLike

__all__ = ["LanczosEigenpairs", "SpectralDensity", "lanczos_top_eigenpairs", "spectral_density"]


class SpectralDensity(NamedTuple):
    """A spectral density on a grid: ``grid, density = spectral_density(...)``."""

    grid: Tensor
    density: Tensor


class LanczosEigenpairs(NamedTuple):
    r"""Eigenpairs from Lanczos, with their accuracy.

    ``eigenvalues`` ``[k]`` are sorted as ``which`` asks; ``eigenvectors`` ``[D, k]`` have
    orthonormal columns; ``residual_norms`` ``[k]`` are :math:`\lVert A x_i - \theta_i x_i
    \rVert`, measured with one batched product (each :math:`\theta_i` lies within this distance
    of an eigenvalue of :math:`A`); ``num_matvecs`` counts the products with :math:`A`, the
    measurement included.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residual_norms: Tensor
    num_matvecs: int


class _Operator:
    """The validated operator: dimension, dtype, device, and checked products."""

    def __init__(
        self,
        operator: MatrixLike,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        name: str,
    ) -> None:
        shape = getattr(operator, "shape", None)
        if shape is None or not hasattr(operator, "__matmul__"):
            raise TypeError(
                f"{name} needs an operator with `shape` and `@` (a curvkit operator, a tensor, "
                f"or any such object), got {type(operator).__name__}"
            )
        shape = tuple(shape)
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
            raise ValueError(f"{name} needs a square, non-empty operator, got shape {shape}")
        self.operator = operator
        self.dim = int(shape[0])
        self.dtype = dtype or getattr(operator, "dtype", None) or torch.float64
        self.device = torch.device(device or getattr(operator, "device", None) or "cpu")

    def matmul(self, matrix: Tensor) -> Tensor:
        result = self.operator @ matrix
        if not isinstance(result, Tensor) or result.shape != matrix.shape:
            raise ValueError(
                f"the operator's product with a {list(matrix.shape)} matrix must be a tensor of "
                f"that shape, got {getattr(result, 'shape', type(result).__name__)}"
            )
        return result

    def random(self, columns: int, distribution: str, generator: torch.Generator | None) -> Tensor:
        size, options = (self.dim, columns), {"dtype": self.dtype, "device": self.device}
        if distribution == "normal":
            vectors = torch.randn(size, generator=generator, **options)
        elif distribution == "rademacher":
            vectors = torch.randint(0, 2, size, generator=generator, **options).mul_(2).sub_(1)
        else:
            raise ValueError(f"distribution must be 'rademacher' or 'normal', got {distribution!r}")
        return vectors / torch.linalg.vector_norm(vectors, dim=0)


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _lanczos_quadrature(
    op: _Operator, start: Tensor, num_iters: int, reorthogonalize: bool
) -> tuple[Tensor, Tensor]:
    r"""Nodes and weights ``[R, K]`` of the Lanczos quadratures of the ``R`` columns of ``start``.

    The three-term recurrence runs for all columns at once. A column whose Krylov space is
    exhausted (:math:`\beta` at most :math:`\epsilon^{3/4}` times the largest :math:`|\alpha|`
    or :math:`\beta` so far: dropping such a coupling moves no node by more) continues with a
    zero vector: its tridiagonal gains a decoupled zero block, whose nodes carry zero weight.
    """
    repeats = start.shape[1]
    alphas = start.new_zeros(num_iters, repeats)
    betas = start.new_zeros(num_iters - 1, repeats)
    eps = torch.finfo(start.dtype).eps
    vector, previous = start, torch.zeros_like(start)
    basis = [start] if reorthogonalize else []
    scale = start.new_zeros(repeats)
    for step in range(num_iters):
        work = op.matmul(vector)
        if step:
            work = work - betas[step - 1] * previous
        alphas[step] = (work * vector).sum(0)
        work = work - alphas[step] * vector
        if reorthogonalize:
            stacked = torch.stack(basis)
            for _ in range(2):
                work = work - (stacked * (stacked * work).sum(1, keepdim=True)).sum(0)
        if step == num_iters - 1:
            break
        norm = torch.linalg.vector_norm(work, dim=0)
        scale = torch.maximum(scale, torch.maximum(alphas[step].abs(), norm))
        alive = norm > eps**0.75 * scale
        betas[step] = torch.where(alive, norm, 0)
        previous, vector = vector, torch.where(alive, work / norm.clamp_min(eps), 0)
        if reorthogonalize:
            basis.append(vector)
    tridiagonal = torch.diag_embed(alphas.T)
    tridiagonal = tridiagonal + torch.diag_embed(betas.T, 1) + torch.diag_embed(betas.T, -1)
    nodes, vectors = torch.linalg.eigh(tridiagonal)
    return nodes, vectors[:, 0, :].square()


def spectral_density(
    operator: MatrixLike,
    *,
    num_iters: int = 100,
    num_repeats: int = 1,
    num_points: int | None = None,
    grid: Tensor | None = None,
    kappa: float | None = None,
    margin: float = 0.05,
    boundaries: tuple[float, float] | None = None,
    log_spectrum: bool = False,
    epsilon: float = 1e-5,
    reorthogonalize: bool = False,
    distribution: str = "normal",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SpectralDensity:
    r"""Estimate the smoothed spectral density of a symmetric operator by Lanczos quadrature.

    The spectrum's interval :math:`[\lambda_{\min}, \lambda_{\max}]` (``boundaries``, by default
    the extreme Ritz values of the runs themselves, which converge first and cost no extra
    product) is widened by ``margin`` times its width on each side, giving
    :math:`[a, b]`. Papyan's width parameter :math:`\kappa > 1` sets the Gaussians' standard
    deviation to :math:`\sigma = \frac{b - a}{2} \cdot \frac{2}{(K - 1)\sqrt{8 \ln \kappa}}`
    (:math:`K` = ``num_iters``), so that it need not be retuned for the operator's scale.

    With ``log_spectrum=True``, the density is that of :math:`\log(|\lambda| + \epsilon)`
    (Papyan 2020, Section C.7), for positive (semi-)definite operators whose eigenvalues span
    decades: the nodes become :math:`\log(|\theta_k| + \epsilon)`, ``boundaries`` are those of
    :math:`|\lambda|`, and the returned grid holds the values :math:`x = |\lambda| + \epsilon`
    (log-spaced) with the density with respect to :math:`x`,
    :math:`\hat\phi_{\log}(\log x) / x`, so that it too integrates to one over the grid.

    Accuracy: the quadrature is exact for polynomial moments below degree :math:`2K`, so the
    density's mean is the Hutchinson estimate :math:`\frac1R \sum_r v_r^\top A v_r` of
    :math:`\operatorname{tr}(A)/D` and its second moment that of :math:`\operatorname{tr}(A^2)/D`
    plus :math:`\sigma^2`; their standard errors shrink as :math:`1/\sqrt{R D}`. Without
    reorthogonalisation (Papyan's choice, three vectors per run), rounding makes converged Ritz
    values reappear as copies whose weights add up to the original's, which leaves the
    quadrature valid; ``reorthogonalize=True`` keeps all :math:`K` vectors per run
    (:math:`D K R` entries) to avoid them.

    Args:
        operator: A symmetric operator with ``shape`` and ``@`` on ``[D, J]`` tensors.
        num_iters: Lanczos steps :math:`K` per run (curvlinops' ``ncv``), at most :math:`D`.
        num_repeats: Runs :math:`R` averaged over, their products batched.
        num_points: Grid points (default 1024), evenly spaced on :math:`[a, b]` (on a log scale
            with ``log_spectrum``); not with ``grid``.
        grid: Points at which to evaluate the density instead (1-D tensor, values of
            :math:`\lambda`, or of :math:`|\lambda| + \epsilon` with ``log_spectrum``).
        kappa: Papyan's width parameter, :math:`> 1` (default 3, and 1.04 with ``log_spectrum``,
            curvlinops' defaults).
        margin: Relative margin around the boundaries, :math:`\ge 0`.
        boundaries: ``(lambda_min, lambda_max)`` (of :math:`|\lambda|` with ``log_spectrum``)
            if known.
        log_spectrum: Estimate the density of :math:`\log(|\lambda| + \epsilon)`.
        epsilon: The shift :math:`\epsilon > 0` of the log spectrum.
        reorthogonalize: Reorthogonalise each Lanczos vector against all earlier ones.
        distribution: The starting vectors' entries, ``"normal"`` or ``"rademacher"``
            (normalised to unit length).
        generator: The random number generator of the starting vectors.
        dtype: The dtype if the operator has none (default float64).
        device: The device if the operator has none (default CPU).

    Returns:
        ``(grid, density)``, two tensors of the grid's length.

    Raises:
        TypeError, ValueError: For an operator without ``shape`` and ``@``, ``num_iters`` outside
            ``[2, D]``, ``kappa <= 1``, negative ``margin``, non-positive ``epsilon``, both
            ``grid`` and ``num_points``, or boundaries with ``lambda_min > lambda_max``.
    """
    op = _Operator(operator, dtype, device, "spectral_density")
    _check_positive_int(num_repeats, "num_repeats")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or not 2 <= num_iters:
        raise ValueError(f"num_iters must be an int >= 2, got {num_iters!r}")
    if num_iters > op.dim:
        raise ValueError(
            f"num_iters={num_iters} exceeds the dimension D={op.dim}: Lanczos spans the whole "
            f"space after D steps; pass num_iters <= {op.dim}"
        )
    kappa = kappa if kappa is not None else (1.04 if log_spectrum else 3.0)
    if not kappa > 1:
        raise ValueError(f"kappa must be > 1, got {kappa}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if log_spectrum and not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 for the log spectrum, got {epsilon}")
    if grid is not None and num_points is not None:
        raise ValueError("pass grid or num_points, not both")
    if grid is not None and (not isinstance(grid, Tensor) or grid.dim() != 1):
        raise ValueError("grid must be a 1-D tensor of points")
    if boundaries is not None and not boundaries[0] <= boundaries[1]:
        raise ValueError(f"boundaries must be (lambda_min, lambda_max), got {boundaries}")

    start = op.random(num_repeats, distribution, generator)
    nodes, weights = _lanczos_quadrature(op, start, num_iters, reorthogonalize)
    if log_spectrum:
        nodes = nodes.abs()
    if boundaries is None:
        # Nodes of exhausted Krylov spaces (weight zero) say nothing about the spectrum.
        carried = nodes[weights > torch.finfo(weights.dtype).eps]
        boundaries = (float(carried.min()), float(carried.max()))
    low, high = boundaries
    if log_spectrum:
        nodes = torch.log(nodes + epsilon)
        low, high = math.log(low + epsilon), math.log(high + epsilon)
    width = high - low
    if width == 0:
        # A single eigenvalue: give the interval the node's own scale.
        width = max(abs(high), 1.0)
    low, high = low - margin * width, high + margin * width
    sigma = (high - low) / ((num_iters - 1) * math.sqrt(8 * math.log(kappa)))
    if grid is None:
        points = torch.linspace(low, high, num_points or 1024, dtype=op.dtype, device=op.device)
        out_grid = points.exp() if log_spectrum else points
    else:
        out_grid = grid.to(device=op.device, dtype=op.dtype)
        points = out_grid.log() if log_spectrum else out_grid
    bumps = torch.exp(-0.5 * ((points - nodes.unsqueeze(-1)) / sigma).square())
    density = (weights.unsqueeze(-1) * bumps).sum((0, 1)) / (num_repeats * sigma)
    density = density / math.sqrt(2 * math.pi)
    if log_spectrum:
        density = density / out_grid
    return SpectralDensity(out_grid, density)


def lanczos_top_eigenpairs(
    operator: MatrixLike,
    k: int,
    *,
    which: str = "largest",
    tol: float | None = None,
    max_iters: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LanczosEigenpairs:
    r"""The top :math:`k` eigenpairs of a symmetric operator by fully reorthogonalised Lanczos.

    The Krylov basis grows one product at a time; every vector is orthogonalised twice against
    all earlier ones, so that the Ritz pairs are those of an orthonormal basis and carry no
    spurious copies. Every few steps the Ritz pairs are checked: Lanczos stops once the
    :math:`k` wanted ones have :math:`|\beta_m (s_i)_m| \le \text{tol} \cdot \max_j |\theta_j|`
    (the residual norm :math:`\lVert A x_i - \theta_i x_i \rVert` in exact arithmetic), or
    after ``max_iters`` steps. When the Krylov space is exhausted (an invariant subspace, as for
    a low-rank GGN), it restarts from a fresh random vector orthogonal to the basis, so that
    eigenvalues of multiplicity above one, and zero eigenvalues, are found too.

    Accuracy: each returned :math:`\theta_i` lies within ``residual_norms[i]`` of an eigenvalue
    of :math:`A`, and within ``residual_norms[i]**2 / gap`` of it when the gap to the rest of the
    spectrum is known; eigenvectors are accurate to ``residual_norms[i] / gap`` in angle.
    Lanczos finds the extremes of the spectrum first: the top eigenvalues of an operator whose
    largest eigenvalues are well separated converge in a few dozen steps; clusters need more.
    Memory: :math:`D` times the number of steps.

    Args:
        operator: A symmetric operator with ``shape`` and ``@`` on ``[D, J]`` tensors.
        k: The number of eigenpairs, :math:`1 \le k \le D`.
        which: ``"largest"`` (algebraically) or ``"magnitude"`` (largest :math:`|\lambda|`).
        tol: The relative residual to stop at (default :math:`\sqrt{\epsilon}` of the dtype).
        max_iters: The most Lanczos steps (default :math:`\min(D, \max(10k, 50))`).
        generator: The random number generator of the starting vectors.
        dtype: The dtype if the operator has none (default float64).
        device: The device if the operator has none (default CPU).

    Returns:
        :class:`LanczosEigenpairs`: eigenvalues (sorted by ``which``), eigenvectors,
        measured residual norms and the number of products.

    Raises:
        TypeError, ValueError: For an operator without ``shape`` and ``@``, ``k`` outside
            ``[1, D]``, ``max_iters < k``, or an unknown ``which``.
    """
    op = _Operator(operator, dtype, device, "lanczos_top_eigenpairs")
    _check_positive_int(k, "k")
    if k > op.dim:
        raise ValueError(f"k={k} exceeds the dimension D={op.dim}")
    if which not in ("largest", "magnitude"):
        raise ValueError(f"which must be 'largest' or 'magnitude', got {which!r}")
    if max_iters is None:
        max_iters = min(op.dim, max(10 * k, 50))
    _check_positive_int(max_iters, "max_iters")
    if max_iters < k:
        raise ValueError(f"max_iters={max_iters} must be at least k={k}")
    max_iters = min(max_iters, op.dim)
    eps = torch.finfo(op.dtype).eps
    tol = math.sqrt(eps) if tol is None else tol

    basis = torch.zeros(max_iters, op.dim, dtype=op.dtype, device=op.device)
    alphas = torch.zeros(max_iters, dtype=op.dtype, device=op.device)
    betas = torch.zeros(max_iters, dtype=op.dtype, device=op.device)
    basis[0] = op.random(1, "normal", generator)[:, 0]
    steps = 0
    check_every = max(1, k // 2)

    def ritz(size: int) -> tuple[Tensor, Tensor]:
        tridiagonal = torch.diag(alphas[:size])
        if size > 1:
            tridiagonal = tridiagonal + torch.diag(betas[: size - 1], 1)
            tridiagonal = tridiagonal + torch.diag(betas[: size - 1], -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        key = values.abs() if which == "magnitude" else values
        order = key.argsort(descending=True)[:k]
        return values[order], vectors[:, order]

    while steps < max_iters:
        work = op.matmul(basis[steps].unsqueeze(1))[:, 0]
        alphas[steps] = work @ basis[steps]
        previous = basis[: steps + 1]
        for _ in range(2):
            work = work - previous.T @ (previous @ work)
        steps += 1
        norm = torch.linalg.vector_norm(work)
        scale = float(alphas[:steps].abs().max().clamp_min(norm))
        if steps == max_iters:
            betas[steps - 1] = norm
            break
        if float(norm) <= eps**0.75 * max(scale, eps):
            # An invariant subspace (to eps^(3/4) of the scale): restart orthogonally; beta = 0
            # decouples T, and the residuals measured at the end include the dropped coupling.
            betas[steps - 1] = 0
            fresh = op.random(1, "normal", generator)[:, 0]
            for _ in range(2):
                fresh = fresh - previous.T @ (previous @ fresh)
            basis[steps] = fresh / torch.linalg.vector_norm(fresh)
            continue
        betas[steps - 1] = norm
        basis[steps] = work / norm
        if steps >= k and steps % check_every == 0:
            values, vectors = ritz(steps)
            bounds = (norm * vectors[-1]).abs()
            if bool((bounds <= tol * values.abs().max().clamp_min(eps)).all()):
                break

    values, vectors = ritz(steps)
    eigenvectors = basis[:steps].T @ vectors
    eigenvectors = eigenvectors / torch.linalg.vector_norm(eigenvectors, dim=0)
    residuals = torch.linalg.vector_norm(op.matmul(eigenvectors) - eigenvectors * values, dim=0)
    return LanczosEigenpairs(values, eigenvectors, residuals, steps + k)
