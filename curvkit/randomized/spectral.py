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

from curvkit.core.validation import check_int, check_real
from curvkit.randomized.operand import MatrixLike, Operand, check_distribution

__all__ = ["LanczosEigenpairs", "SpectralDensity", "lanczos_top_eigenpairs", "spectral_density"]

#: Standard deviations of each node's Gaussian that :func:`spectral_density`'s grid holds beyond
#: the outermost nodes (the mass beyond them is below 1e-9 of the node's weight).
TAIL_SIGMAS = 6.0


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


def _lanczos_quadrature(
    op: Operand, start: Tensor, num_iters: int, reorthogonalize: bool
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
    op = Operand(operator, "spectral_density", dtype=dtype, device=device)
    kappa = _checked_kappa(
        op,
        num_iters,
        num_repeats,
        num_points,
        grid,
        kappa,
        margin,
        boundaries,
        log_spectrum,
        epsilon,
    )
    check_distribution(distribution)
    start = op.random(num_repeats, distribution, op.check_generator(generator), normalized=True)
    nodes, weights = _lanczos_quadrature(op, start, num_iters, reorthogonalize)
    if log_spectrum:
        nodes = nodes.abs()
    # Nodes of exhausted Krylov spaces (weight zero) say nothing about the spectrum.
    carried = nodes[weights > torch.finfo(weights.dtype).eps]
    low, high = boundaries or (float(carried.min()), float(carried.max()))
    if log_spectrum:
        nodes, carried = torch.log(nodes + epsilon), torch.log(carried + epsilon)
        low, high = math.log(low + epsilon), math.log(high + epsilon)
    width = high - low
    if width == 0:
        # A single eigenvalue: give the interval the node's own scale.
        width = max(abs(high), 1.0)
    low, high = low - margin * width, high + margin * width
    sigma = (high - low) / ((num_iters - 1) * math.sqrt(8 * math.log(kappa)))
    # The grid holds every carried node's Gaussian to TAIL_SIGMAS deviations, so that the
    # density integrates to one over it even where the margin is narrower than the bumps (a
    # crowded spectrum edge, such as a rank-deficient GGN's zeros).
    low = min(low, float(carried.min()) - TAIL_SIGMAS * sigma)
    high = max(high, float(carried.max()) + TAIL_SIGMAS * sigma)
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


def _checked_kappa(
    op: Operand,
    num_iters: int,
    num_repeats: int,
    num_points: int | None,
    grid: Tensor | None,
    kappa: float | None,
    margin: float,
    boundaries: tuple[float, float] | None,
    log_spectrum: bool,
    epsilon: float,
) -> float:
    """Check :func:`spectral_density`'s options; return ``kappa`` with its default filled in."""
    check_int(num_repeats, "num_repeats", minimum=1)
    check_int(num_iters, "num_iters", minimum=2)
    if num_iters > op.dim:
        raise ValueError(
            f"num_iters={num_iters} exceeds the dimension D={op.dim}: Lanczos spans the "
            f"whole space after D steps; pass num_iters <= {op.dim}"
        )
    kappa = kappa if kappa is not None else (1.04 if log_spectrum else 3.0)
    check_real(kappa, "kappa", minimum=1.0, strict=True)
    check_real(margin, "margin", minimum=0.0)
    if log_spectrum:
        check_real(epsilon, "epsilon", minimum=0.0, strict=True)
    if grid is not None and num_points is not None:
        raise ValueError("pass grid or num_points, not both")
    if num_points is not None:
        check_int(num_points, "num_points", minimum=2)
    if grid is not None and (not isinstance(grid, Tensor) or grid.dim() != 1):
        raise ValueError("grid must be a 1-D tensor of points")
    if boundaries is not None and not boundaries[0] <= boundaries[1]:
        raise ValueError(f"boundaries must be (lambda_min, lambda_max), got {boundaries}")
    return float(kappa)


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
    op = Operand(operator, "lanczos_top_eigenpairs", dtype=dtype, device=device)
    check_int(k, "k", minimum=1)
    if k > op.dim:
        raise ValueError(f"k={k} exceeds the dimension D={op.dim}")
    if which not in ("largest", "magnitude"):
        raise ValueError(f"which must be 'largest' or 'magnitude', got {which!r}")
    if max_iters is None:
        max_iters = min(op.dim, max(10 * k, 50))
    check_int(max_iters, "max_iters", minimum=1)
    if max_iters < k:
        raise ValueError(f"max_iters={max_iters} must be at least k={k}")
    eps = torch.finfo(op.dtype).eps
    tol = math.sqrt(eps) if tol is None else check_real(tol, "tol", minimum=0.0)
    lanczos = _Lanczos(op, min(max_iters, op.dim), k, which, op.check_generator(generator))
    steps = lanczos.run(tol)
    values, vectors = lanczos.ritz(steps)
    eigenvectors = lanczos.basis[:steps].T @ vectors
    eigenvectors = eigenvectors / torch.linalg.vector_norm(eigenvectors, dim=0)
    residuals = torch.linalg.vector_norm(op.matmul(eigenvectors) - eigenvectors * values, dim=0)
    return LanczosEigenpairs(values, eigenvectors, residuals, steps + k)


class _Lanczos:
    """Fully reorthogonalised Lanczos, restarted on an exhausted Krylov space."""

    def __init__(
        self,
        op: Operand,
        max_iters: int,
        k: int,
        which: str,
        generator: torch.Generator | None,
    ) -> None:
        self.op, self.max_iters, self.k, self.which, self.generator = (
            op,
            max_iters,
            k,
            which,
            generator,
        )
        options = {"dtype": op.dtype, "device": op.device}
        self.basis = torch.zeros(max_iters, op.dim, **options)
        self.alphas = torch.zeros(max_iters, **options)
        self.betas = torch.zeros(max_iters, **options)

    def ritz(self, size: int) -> tuple[Tensor, Tensor]:
        """The ``k`` wanted Ritz values and their vectors in the basis of the first ``size``."""
        tridiagonal = torch.diag(self.alphas[:size])
        if size > 1:
            tridiagonal = tridiagonal + torch.diag(self.betas[: size - 1], 1)
            tridiagonal = tridiagonal + torch.diag(self.betas[: size - 1], -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        key = values.abs() if self.which == "magnitude" else values
        order = key.argsort(descending=True)[: self.k]
        return values[order], vectors[:, order]

    def _fresh(self, previous: Tensor) -> Tensor:
        """A random unit vector orthogonal to ``previous``'s rows."""
        fresh = self.op.random(1, "normal", self.generator, normalized=True)[:, 0]
        for _ in range(2):
            fresh = fresh - previous.T @ (previous @ fresh)
        return fresh / torch.linalg.vector_norm(fresh)

    def run(self, tol: float) -> int:
        """Grow the basis until the wanted Ritz pairs converge; return the number of steps."""
        basis, alphas, betas = self.basis, self.alphas, self.betas
        eps = torch.finfo(self.op.dtype).eps
        basis[0] = self.op.random(1, "normal", self.generator, normalized=True)[:, 0]
        check_every = max(1, self.k // 2)
        steps = 0
        while steps < self.max_iters:
            work = self.op.matmul(basis[steps].unsqueeze(1))[:, 0]
            alphas[steps] = work @ basis[steps]
            previous = basis[: steps + 1]
            for _ in range(2):
                work = work - previous.T @ (previous @ work)
            steps += 1
            norm = torch.linalg.vector_norm(work)
            scale = float(alphas[:steps].abs().max().clamp_min(norm))
            if steps == self.max_iters:
                betas[steps - 1] = norm
                break
            if float(norm) <= eps**0.75 * max(scale, eps):
                # An invariant subspace (to eps^(3/4) of the scale): restart orthogonally;
                # beta = 0 decouples T, and the residuals measured at the end include the
                # dropped coupling.
                betas[steps - 1] = 0
                basis[steps] = self._fresh(previous)
                continue
            betas[steps - 1] = norm
            basis[steps] = work / norm
            if steps >= self.k and steps % check_every == 0:
                values, vectors = self.ritz(steps)
                bounds = (norm * vectors[-1]).abs()
                if bool((bounds <= tol * values.abs().max().clamp_min(eps)).all()):
                    break
        return steps
