"""Spectral densities and Lanczos eigenpairs against dense torch.linalg.

The density's moments follow from Gauss quadrature: its mean is exactly the average of
:math:`v_r^\\top A v_r` over the unit starting vectors, and its second moment that of
:math:`v_r^\\top A^2 v_r` plus :math:`\\sigma^2` (the Gaussians' variance). For :math:`v` uniform
on the sphere, :math:`v^\\top B v` has mean :math:`\\operatorname{tr}(B)/D` and variance
:math:`\\frac{2}{D (D + 2)} (\\lVert B \\rVert_F^2 - \\operatorname{tr}(B)^2 / D)`, which sets
the tolerance of the moment checks (``Z`` standard errors, plus the grid's integration error).
"""

from __future__ import annotations

import math

import pytest
import torch
from dense_operator import DenseOperator, ggn_operator, with_spectrum

import curvkit
from curvkit.randomized.spectral import lanczos_top_eigenpairs, spectral_density

Z = 4.5


def sphere_standard_error(matrix: torch.Tensor, repeats: int) -> float:
    dim = matrix.shape[0]
    spread = float(matrix.square().sum()) - float(matrix.trace()) ** 2 / dim
    return math.sqrt(2 / (dim * (dim + 2)) * max(spread, 0.0) / repeats)


def moments(grid: torch.Tensor, density: torch.Tensor) -> list[float]:
    return [float(torch.trapezoid(density * grid**j, grid)) for j in range(3)]


def sigma(grid: torch.Tensor, margin: float, num_iters: int, kappa: float = 3.0) -> float:
    return float(grid[-1] - grid[0]) / ((num_iters - 1) * math.sqrt(8 * math.log(kappa)))


@pytest.mark.parametrize("reorthogonalize", [False, True])
def test_density_integrates_to_one_and_matches_trace_moments(reorthogonalize):
    eigenvalues = torch.cat([torch.linspace(0.1, 1.0, 45), torch.tensor([4.0, 6.0, 9.0])])
    matrix = with_spectrum(eigenvalues.double(), seed=1)
    repeats, num_iters, margin = 12, 20, 0.3
    grid, density = spectral_density(
        DenseOperator(matrix),
        num_iters=num_iters,
        num_repeats=repeats,
        margin=margin,
        num_points=4096,
        reorthogonalize=reorthogonalize,
        generator=torch.Generator().manual_seed(0),
    )
    mass, first, second = moments(grid, density)
    assert density.min() >= 0
    # A margin of 0.3 puts the grid's ends > 8 sigma beyond every node: no mass is cut off.
    assert mass == pytest.approx(1, abs=1e-8)
    dim = matrix.shape[0]
    assert abs(first - float(matrix.trace()) / dim) <= Z * sphere_standard_error(matrix, repeats)
    square = matrix @ matrix
    expected = float(square.trace()) / dim + sigma(grid, margin, num_iters) ** 2
    assert abs(second - expected) <= Z * sphere_standard_error(square, repeats)


def test_density_of_the_ggn_matches_its_trace_moments():
    operator = ggn_operator(batch_size=7)
    dense = operator.to_dense()
    repeats, num_iters, margin = 8, 30, 0.3
    grid, density = spectral_density(
        operator,
        num_iters=num_iters,
        num_repeats=repeats,
        margin=margin,
        num_points=4096,
        generator=torch.Generator().manual_seed(1),
    )
    mass, first, second = moments(grid, density)
    assert mass == pytest.approx(1, abs=1e-8)
    dim = dense.shape[0]
    assert abs(first - float(dense.trace()) / dim) <= Z * sphere_standard_error(dense, repeats)
    square = dense @ dense
    expected = float(square.trace()) / dim + sigma(grid, margin, num_iters) ** 2
    assert abs(second - expected) <= Z * sphere_standard_error(square, repeats)
    # The boundaries are the extreme Ritz values: the top one converges to lambda_max.
    top = float(torch.linalg.eigvalsh(dense)[-1])
    padding = margin * (float(grid[-1] - grid[0])) / (1 + 2 * margin)
    assert float(grid[-1]) - padding == pytest.approx(top, rel=1e-6)


def _log_density(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return spectral_density(
        matrix,
        num_iters=25,
        num_repeats=4,
        log_spectrum=True,
        kappa=3.0,
        margin=0.3,
        num_points=4096,
        generator=torch.Generator().manual_seed(0),
    )


def test_log_spectrum_integrates_to_one_over_its_grid():
    eigenvalues = torch.logspace(-4, 1, 40).double()
    matrix = with_spectrum(eigenvalues, seed=2)
    grid, density = _log_density(matrix)
    assert (grid > 0).all() and (grid[1:] > grid[:-1]).all()
    # Evenly spaced in log(x): the ratio of neighbours is constant.
    torch.testing.assert_close(grid[1:] / grid[:-1], (grid[1] / grid[0]).expand(4095))
    # The trapezoid rule in x on a log-spaced grid is accurate to about 1e-5 here.
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1, abs=1e-4)
    # The mean of log(x) is the quadrature of v^T log(A + eps) v for the same starting vectors
    # (the Gaussians, symmetric in log(x), keep it): exact for polynomials of degree < 50, and
    # within 0.07 (measured) for the logarithm over five decades. The tolerance 0.1 rejects the
    # density of 2 A, whose log-mean is log(2) = 0.69 higher.
    starts = torch.randn((40, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    starts = starts / torch.linalg.vector_norm(starts, dim=0)
    values, vectors = torch.linalg.eigh(matrix)
    log_matrix = (vectors * (values.abs() + 1e-5).log()) @ vectors.T
    exact = float((starts * (log_matrix @ starts)).sum(0).mean())
    assert float(torch.trapezoid(density * grid.log(), grid)) == pytest.approx(exact, abs=0.1)
    grid, density = _log_density(2 * matrix)
    assert float(torch.trapezoid(density * grid.log(), grid)) != pytest.approx(exact, abs=0.1)


def test_a_given_grid_evaluates_the_same_density():
    matrix = with_spectrum(torch.linspace(0, 1, 30).double())
    grid, density = spectral_density(
        matrix, num_iters=10, num_points=64, generator=torch.Generator().manual_seed(3)
    )
    again = spectral_density(
        matrix, num_iters=10, grid=grid[::3], generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(again.grid, grid[::3])
    torch.testing.assert_close(again.density, density[::3])


def test_repeats_share_batched_products():
    operator = DenseOperator(with_spectrum(torch.linspace(0, 1, 30).double()))
    spectral_density(operator, num_iters=6, num_repeats=5)
    assert operator.operands == [(30, 5)] * 6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_iters": 31}, "exceeds the dimension"),
        ({"num_iters": 1}, "num_iters must be an integer >= 2"),
        ({"kappa": 1.0}, "kappa must be > 1"),
        ({"margin": -0.1}, "margin must be >= 0"),
        ({"num_points": 10, "grid": torch.zeros(3)}, "grid or num_points"),
        ({"boundaries": (1.0, 0.0)}, "lambda_min, lambda_max"),
        ({"log_spectrum": True, "epsilon": 0.0}, "epsilon must be > 0"),
        ({"num_repeats": 0}, "num_repeats must be an integer >= 1"),
        ({"distribution": "uniform"}, "'rademacher' or 'normal'"),
    ],
)
def test_bad_density_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        spectral_density(torch.eye(30, dtype=torch.float64), **{"num_iters": 10, **options})


def test_top_eigenpairs_of_a_dense_matrix():
    eigenvalues = torch.cat([torch.linspace(-1, 1, 57), torch.tensor([3.0, 5.0, 8.0])])
    matrix = with_spectrum(eigenvalues.double(), seed=5)
    result = lanczos_top_eigenpairs(DenseOperator(matrix), 3, tol=1e-12)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([8.0, 5.0, 3.0]).double())
    exact = torch.linalg.eigh(matrix).eigenvectors[:, [-1, -2, -3]]
    overlaps = (exact * result.eigenvectors).sum(0).abs()
    torch.testing.assert_close(overlaps, torch.ones(3, dtype=torch.float64), atol=1e-9, rtol=0)
    measured = torch.linalg.vector_norm(
        matrix @ result.eigenvectors - result.eigenvectors * result.eigenvalues, dim=0
    )
    torch.testing.assert_close(result.residual_norms, measured)
    assert (result.residual_norms < 1e-10).all()
    assert result.num_matvecs < 60


def test_top_eigenpairs_by_magnitude_of_an_indefinite_matrix():
    eigenvalues = torch.cat([torch.linspace(-1, 1, 37), torch.tensor([-9.0, 4.0, 6.0])])
    matrix = with_spectrum(eigenvalues.double(), seed=6)
    result = lanczos_top_eigenpairs(matrix, 2, which="magnitude", tol=1e-12)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([-9.0, 6.0]).double())
    largest = lanczos_top_eigenpairs(matrix, 2, tol=1e-12)
    torch.testing.assert_close(largest.eigenvalues, torch.tensor([6.0, 4.0]).double())


def test_top_eigenpairs_of_a_low_rank_ggn_with_restarts():
    """Rank 21 of D = 164: Lanczos exhausts the Krylov space and restarts, finding the zeros."""
    operator = ggn_operator(batch_size=7)
    exact = torch.linalg.eigvalsh(operator.to_dense()).flip(0)
    result = lanczos_top_eigenpairs(operator, 25, generator=torch.Generator().manual_seed(0))
    scale = float(exact[0])
    torch.testing.assert_close(result.eigenvalues, exact[:25], atol=1e-10 * scale, rtol=0)
    assert (result.residual_norms <= 1e-7 * scale).all()
    gram = result.eigenvectors.T @ result.eigenvectors
    torch.testing.assert_close(gram, torch.eye(25, dtype=torch.float64), atol=1e-10, rtol=0)


def test_top_eigenpairs_refuse_bad_input():
    with pytest.raises(ValueError, match="exceeds the dimension"):
        lanczos_top_eigenpairs(torch.eye(4, dtype=torch.float64), 5)
    with pytest.raises(ValueError, match="'largest' or 'magnitude'"):
        lanczos_top_eigenpairs(torch.eye(4, dtype=torch.float64), 1, which="smallest")
    with pytest.raises(ValueError, match="at least k"):
        lanczos_top_eigenpairs(torch.eye(4, dtype=torch.float64), 3, max_iters=2)
    with pytest.raises(TypeError, match="`shape` and `@`"):
        lanczos_top_eigenpairs([[1.0]], 1)


def test_top_level_names():
    assert curvkit.spectral_density is spectral_density
    assert curvkit.lanczos_top_eigenpairs is lanczos_top_eigenpairs
