import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from curvkit.ops.entrywise import smallest_eigenvectors
from curvkit.ops.newton import (
    newton_minimize,
    newton_step,
    newton_step_1d,
    newton_step_2d,
    newton_step_3d,
)

DTYPE = torch.float64
DIMS = range(1, 7)
BATCH_SHAPES = [(), (1,), (10,), (3, 2)]
STEP_FUNCTIONS = {1: newton_step_1d, 2: newton_step_2d, 3: newton_step_3d}


def generator(seed):
    return torch.Generator().manual_seed(seed)


def quadratic_problem(batch_shape, dim, seed=0):
    """Per item 0.5 (x - m)^T H (x - m) with H = n n^T + I; returns (H, m, x)."""
    gen = generator(seed)
    n = torch.randn(*batch_shape, dim, generator=gen, dtype=DTYPE)
    H = n.unsqueeze(-1) * n.unsqueeze(-2) + torch.eye(dim, dtype=DTYPE)
    m = torch.randn(*batch_shape, dim, generator=gen, dtype=DTYPE)
    x = 3 * torch.randn(*batch_shape, dim, generator=gen, dtype=DTYPE)
    return H, m, x


def quadratic_form(H, d):
    return 0.5 * (d.unsqueeze(-2) @ H @ d.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def indefinite_problem(batch_shape, dim, seed=0):
    """Per item 0.5 x^T A x + b^T x with A symmetric, mostly indefinite."""
    gen = generator(seed)
    A = torch.randn(*batch_shape, dim, dim, generator=gen, dtype=DTYPE)
    A = A + A.mT
    b = 2 * torch.randn(*batch_shape, dim, generator=gen, dtype=DTYPE)
    x = torch.randn(*batch_shape, dim, generator=gen, dtype=DTYPE)
    return A, b, x


def indefinite_loss(A, b, x):
    return (quadratic_form(A, x) + (b * x).sum(-1)).sum()


def expected_trust_region_step(A, b, x, trust_radius):
    """The documented semantics, item by item with torch.linalg (plain Newton step if acceptable,
    else (H + lambda I) with lambda = ||g|| / r - lambda_min(H))."""
    H = A.reshape(-1, *A.shape[-2:])
    g = ((A @ x.unsqueeze(-1)).squeeze(-1) + b).reshape(-1, x.shape[-1])
    steps = []
    for H_i, g_i in zip(H, g, strict=True):
        lambda_min = torch.linalg.eigvalsh(H_i)[0]
        step = -torch.linalg.solve(H_i, g_i)
        if not (lambda_min > 0 and step.norm() <= trust_radius):
            shift = g_i.norm() / trust_radius - lambda_min
            step = -torch.linalg.solve(H_i + shift * torch.eye(len(g_i), dtype=DTYPE), g_i)
        steps.append(step)
    return torch.stack(steps).reshape(x.shape)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_one_step_lands_on_the_mode_of_a_quadratic_with_exact_covariance(dim, batch_shape):
    H, m, x0 = quadratic_problem(batch_shape, dim, seed=dim)
    x = x0.clone().requires_grad_()
    mode, cov = newton_step(quadratic_form(H, x - m).sum(), x)
    assert mode.shape == x.shape and cov.shape == (*batch_shape, dim, dim)
    torch.testing.assert_close(mode, m, rtol=0, atol=1e-12)
    assert torch.equal(cov, cov.mT)
    identity = torch.eye(dim, dtype=DTYPE).expand_as(H)
    torch.testing.assert_close(cov @ H, identity, rtol=0, atol=1e-12)
    # The same with a trust radius that the step fits in: untouched by the trust region.
    x = x0.clone().requires_grad_()
    radius = 1.01 * (m - x0).norm(dim=-1).max().item()
    mode_tr, cov_tr = newton_step(quadratic_form(H, x - m).sum(), x, trust_radius=radius)
    torch.testing.assert_close(mode_tr, m, rtol=0, atol=1e-12)
    torch.testing.assert_close(cov_tr, cov, rtol=0, atol=1e-12)
    if dim in STEP_FUNCTIONS:
        x = x0.clone().requires_grad_()
        mode_d, cov_d = STEP_FUNCTIONS[dim](quadratic_form(H, x - m).sum(), x)
        assert torch.equal(mode_d, mode) and torch.equal(cov_d, cov)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_mode_is_differentiable_with_respect_to_the_true_mode(dim, batch_shape):
    H, m, x0 = quadratic_problem(batch_shape, dim, seed=10 + dim)
    m = m.requires_grad_()
    x = x0.clone().requires_grad_()
    mode, _ = newton_step(quadratic_form(H, x - m).sum(), x)
    flat_mode = mode.reshape(-1)
    jacobian = torch.stack(
        [
            torch.autograd.grad(flat_mode[k], m, retain_graph=True)[0].reshape(-1)
            for k in range(flat_mode.numel())
        ]
    )
    torch.testing.assert_close(
        jacobian, torch.eye(flat_mode.numel(), dtype=DTYPE), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_trust_radius_bounds_every_step_on_indefinite_hessians(dim, batch_shape):
    A, b, x0 = indefinite_problem(batch_shape, dim, seed=20 + dim)
    longest_free_step = 0.0
    for trust_radius in (None, 0.1, 1.0, 10.0):
        x = x0.clone().requires_grad_()
        mode, cov = newton_step(indefinite_loss(A, b, x), x, trust_radius=trust_radius)
        step_norm = (mode - x0).norm(dim=-1)
        assert torch.equal(cov, cov.mT)
        if trust_radius is None:
            longest_free_step = step_norm.max().item()
            continue
        assert (step_norm <= trust_radius * (1 + 1e-12)).all()
        if dim >= 2:
            expected = expected_trust_region_step(A, b, x0, trust_radius)
            torch.testing.assert_close(mode - x0, expected, rtol=1e-9, atol=1e-12)
    # Without a trust region some step is long: the bound above is not vacuous.
    assert longest_free_step > 1.0


@pytest.mark.parametrize("dim", DIMS)
def test_without_trust_radius_the_step_is_the_plain_newton_step_on_indefinite_hessians(dim):
    A, b, x0 = indefinite_problem((8,), dim, seed=110 + dim)
    if dim >= 2:
        # Zero leading entries: a zero first pivot without pivoting (LAPACK takes these items).
        A[:2, 0, 0] = 0.0
        A[:2, 0, 1] = A[:2, 1, 0] = 1.0
    x = x0.clone().requires_grad_()
    mode, cov = newton_step(indefinite_loss(A, b, x), x)
    gradient = (A @ x0.unsqueeze(-1)).squeeze(-1) + b
    if dim == 1:  # nonpositive curvature is floored in 1-d
        positive = A[:, 0, 0] > 0
        A, gradient, mode, x0, cov = (
            A[positive],
            gradient[positive],
            mode[positive],
            x0[positive],
            cov[positive],
        )
    expected = -torch.linalg.solve(A, gradient)
    torch.testing.assert_close(mode - x0, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cov, torch.linalg.inv(A), rtol=1e-9, atol=1e-10)


def test_1d_trust_region_clamps_and_floors_nonpositive_curvature():
    curvature = torch.tensor([2.0, 2.0, -1.0, 0.0, 0.5], dtype=DTYPE)
    slope = torch.tensor([1.0, -8.0, 0.5, -0.3, 0.0], dtype=DTYPE)
    x = torch.zeros(5, 1, dtype=DTYPE, requires_grad=True)
    loss = (0.5 * curvature * x[:, 0] ** 2 + slope * x[:, 0]).sum()
    mode, cov = newton_step(loss, x, trust_radius=1.0)
    # Newton step inside, clamped step, and the boundary in the descent direction.
    expected = torch.tensor([-0.5, 1.0, -1.0, 1.0, 0.0], dtype=DTYPE)
    torch.testing.assert_close(mode[:, 0], expected, rtol=0, atol=0)
    assert cov.shape == (5, 1, 1)
    torch.testing.assert_close(cov[[0, 1, 4], 0, 0], 1 / curvature[[0, 1, 4]], rtol=1e-15, atol=0)
    assert (cov[[2, 3], 0, 0] > 1e12).all()


@pytest.mark.parametrize("dim", [2, 3, 5])
def test_linear_loss_without_curvature_steps_to_the_trust_boundary(dim):
    b = torch.randn(4, dim, dtype=DTYPE, generator=generator(30))
    x = torch.zeros(4, dim, dtype=DTYPE, requires_grad=True)
    mode, cov = newton_step((b * x).sum(), x, trust_radius=0.5)
    torch.testing.assert_close(mode, -0.5 * b / b.norm(dim=-1, keepdim=True), rtol=1e-12, atol=0)
    assert torch.isfinite(cov).all()


@pytest.mark.parametrize("dim", DIMS)
def test_trust_region_gradients_are_finite_for_multiples_of_the_identity(dim):
    # Equal eigenvalues: where the textbook closed forms divide by zero.
    curvature = torch.tensor([1.0, 2.0, 0.5], dtype=DTYPE, requires_grad=True)
    x = torch.ones(3, dim, dtype=DTYPE, requires_grad=True)
    loss = (0.5 * curvature[:, None] * x.square()).sum() + x.sum()
    mode, cov = newton_step(loss, x, trust_radius=0.5)
    (grad,) = torch.autograd.grad(mode.sum() + cov.sum(), curvature)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_stationary_point_of_an_indefinite_hessian_gives_a_finite_covariance():
    # g = 0, H = diag(1, -1): Pyro's regulariser would make H + lambda I singular here.
    x = torch.zeros(2, 2, dtype=DTYPE, requires_grad=True)
    loss = (0.5 * (x[:, 0] ** 2 - x[:, 1] ** 2)).sum()
    mode, cov = newton_step(loss, x, trust_radius=1.0)
    assert torch.equal(mode, torch.zeros_like(mode))
    assert torch.isfinite(cov).all()


def test_matches_pyro_on_positive_definite_hessians_without_trust_radius():
    pyro_newton = pytest.importorskip("pyro.ops.newton")
    for dim in (1, 2, 3):
        A, b, x0 = indefinite_problem((6,), dim, seed=40 + dim)
        A = A @ A.mT + torch.eye(dim, dtype=DTYPE)  # positive definite
        results = []
        for step in (newton_step, pyro_newton.newton_step):
            x = x0.clone().requires_grad_()
            results.append(step(indefinite_loss(A, b, x), x))
        (mode, cov), (pyro_mode, pyro_cov) = results
        torch.testing.assert_close(mode, pyro_mode, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cov, pyro_cov, rtol=1e-12, atol=1e-12)


def gradcheck_function(dim, trust_radius):
    A, b, x0 = indefinite_problem((4,), dim, seed=50 + dim)
    if trust_radius is None or dim == 1:
        # Positive definite (in 1-d, floored nonpositive curvature is a constant by design).
        A = A @ A.mT + torch.eye(dim, dtype=DTYPE)

    def step(theta):
        x = x0.clone().requires_grad_()
        loss = indefinite_loss(A, b * theta, x) + (theta * F.softplus(x)).sum() + x.pow(4).sum()
        return newton_step(loss, x, trust_radius=trust_radius)

    theta = 1 + 0.1 * torch.randn(4, dim, dtype=DTYPE, generator=generator(60 + dim))
    return step, theta.requires_grad_()


@pytest.mark.parametrize("dim", range(1, 5))
@pytest.mark.parametrize("trust_radius", [None, 0.3])
def test_gradcheck_mode_and_covariance(dim, trust_radius):
    step, theta = gradcheck_function(dim, trust_radius)
    assert torch.autograd.gradcheck(step, (theta,))


def item_loss(x, theta):
    """Convex, non-quadratic: softplus(theta^T x) + 0.5 ||x - 1||^2 + 0.1 sum cosh(x)."""
    return F.softplus((theta * x).sum(-1)) + 0.5 * (x - 1).square().sum(-1) + 0.1 * x.cosh().sum(-1)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("trust_radius", [None, 0.5])
def test_newton_minimize_converges_on_a_non_quadratic_convex_loss(dim, trust_radius):
    theta = torch.randn(5, dim, dtype=DTYPE, generator=generator(70 + dim)).requires_grad_()
    x0 = 4 * torch.randn(5, dim, dtype=DTYPE, generator=generator(80 + dim))
    mode, cov = newton_minimize(lambda x: item_loss(x, theta).sum(), x0, trust_radius=trust_radius)
    # Reference: plain autograd on each item.
    for i in range(5):
        point = mode[i].detach().requires_grad_()
        (grad,) = torch.autograd.grad(item_loss(point, theta[i].detach()), point)
        assert grad.abs().max() < 1e-12
        hessian = torch.autograd.functional.hessian(
            lambda p, i=i: item_loss(p, theta[i].detach()), mode[i].detach()
        )
        torch.testing.assert_close(cov[i], torch.linalg.inv(hessian), rtol=1e-10, atol=1e-12)
    # Implicit-function derivative of the minimiser: d mode / d theta = -H^{-1} d g / d theta.
    weights = torch.randn(5, dim, dtype=DTYPE, generator=generator(90 + dim))
    (actual,) = torch.autograd.grad((mode * weights).sum(), theta)
    for i in range(5):

        def gradient_in_x(t, i=i):
            p = mode[i].detach().requires_grad_()
            return torch.autograd.grad(item_loss(p, t), p, create_graph=True)[0]

        dg_dtheta = torch.autograd.functional.jacobian(gradient_in_x, theta[i].detach())
        expected = -(weights[i] @ cov[i].detach()) @ dg_dtheta
        torch.testing.assert_close(actual[i], expected, rtol=1e-9, atol=1e-12)


def test_newton_minimize_covariance_has_the_total_derivative():
    # log det of the covariance at the mode, as a Laplace evidence uses it, vs finite differences.
    theta = torch.randn(4, 3, dtype=DTYPE, generator=generator(100)).requires_grad_()
    x0 = torch.zeros(4, 3, dtype=DTYPE)

    def log_det_cov(t):
        _, cov = newton_minimize(lambda x: item_loss(x, t).sum(), x0)
        return torch.logdet(cov).sum()

    direction = torch.randn(4, 3, dtype=DTYPE, generator=generator(101))
    (grad,) = torch.autograd.grad(log_det_cov(theta), theta)
    step = 1e-6
    with torch.no_grad():
        finite_difference = (
            log_det_cov(theta + step * direction) - log_det_cov(theta - step * direction)
        ) / (2 * step)
    torch.testing.assert_close((grad * direction).sum(), finite_difference, rtol=1e-7, atol=1e-9)


def test_newton_minimize_under_no_grad_returns_no_graph():
    theta = torch.ones(3, 2, dtype=DTYPE, requires_grad=True)
    with torch.no_grad():
        mode, cov = newton_minimize(lambda x: item_loss(x, theta).sum(), torch.zeros(3, 2))
    assert not mode.requires_grad and not cov.requires_grad
    reference, _ = newton_minimize(lambda x: item_loss(x, theta).sum(), torch.zeros(3, 2))
    torch.testing.assert_close(mode, reference.detach(), rtol=0, atol=1e-6)


def test_newton_minimize_warns_when_not_converged():
    theta = torch.ones(3, 2, dtype=DTYPE)
    x0 = torch.full((3, 2), 50.0, dtype=DTYPE)
    with pytest.warns(UserWarning, match="not converged after max_iters=1"):
        newton_minimize(lambda x: item_loss(x, theta).sum(), x0, trust_radius=0.1, max_iters=1)


def test_newton_minimize_leaves_x0_alone_and_works_in_float32():
    theta = torch.ones(3, 2)
    x0 = torch.zeros(3, 2)
    mode, cov = newton_minimize(lambda x: item_loss(x, theta).sum(), x0)
    assert mode.dtype == cov.dtype == torch.float32
    assert not x0.requires_grad and torch.equal(x0, torch.zeros(3, 2))
    reference, _ = newton_minimize(lambda x: item_loss(x, theta.double()).sum(), x0.double())
    torch.testing.assert_close(mode.double(), reference, rtol=1e-5, atol=1e-6)


def test_step_does_not_touch_x_or_its_grad():
    H, m, x0 = quadratic_problem((4,), 3)
    x = x0.clone().requires_grad_()
    newton_step(quadratic_form(H, x - m).sum(), x, trust_radius=1.0)
    assert x.grad is None and torch.equal(x, x0)


def test_warnings_name_the_non_finite_quantity():
    x = torch.tensor([[float("nan"), 1.0]], dtype=DTYPE, requires_grad=True)
    with pytest.warns(UserWarning, match="the gradient and the Hessian contain NaN"):
        newton_step((x**3).sum(), x)
    x = torch.tensor([[float("nan"), 1.0]], dtype=DTYPE, requires_grad=True)
    with pytest.warns(UserWarning, match="the gradient contains NaN") as record:
        newton_step((x**2).sum(), x)
    assert "Hessian" not in str(record[0].message)
    # |x|^1.5 at 0: finite gradient, infinite curvature.
    x = torch.zeros(2, 1, dtype=DTYPE, requires_grad=True)
    with pytest.warns(UserWarning, match="the Hessian contains NaN or Inf") as record:
        newton_step(x.abs().pow(1.5).sum(), x)
    assert "gradient" not in str(record[0].message)
    # A singular Hessian without a trust region.
    x = torch.zeros(2, 2, dtype=DTYPE, requires_grad=True)
    with pytest.warns(UserWarning, match="singular"):
        newton_step((x[:, 0] ** 2 + x[:, 1]).sum(), x)
    x = torch.zeros(2, 2, dtype=DTYPE, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        newton_step((x**2).sum(), x)


def test_errors():
    x = torch.zeros(3, 2, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="must be a scalar"):
        newton_step((x**2).sum(0), x)
    for radius in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="trust_radius must be positive"):
            newton_step((x**2).sum(), x, trust_radius=radius)
    for radius in ("1", True, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="trust_radius must be a positive number"):
            newton_step((x**2).sum(), x, trust_radius=radius)
    y = torch.zeros(3, 2, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="loss does not depend on x"):
        newton_step((y**2).sum() + (x.detach() ** 2).sum(), x)
    with pytest.raises(ValueError, match="loss does not depend on x"):
        newton_step((y**2).sum(), x)
    with pytest.raises(ValueError, match="loss does not depend on x"):
        newton_step(torch.tensor(1.0, dtype=DTYPE), x)
    with pytest.raises(ValueError, match="requires_grad_"):
        newton_step((y**2).sum(), x.detach())
    with pytest.raises(ValueError, match=r"shape \(\.\.\., D\)"):
        scalar = torch.tensor(1.0, requires_grad=True)
        newton_step(scalar**2, scalar)
    with pytest.raises(ValueError, match="rightmost size 3"):
        newton_step_3d((x**2).sum(), x)
    with pytest.raises(ValueError, match="rightmost size 1"):
        newton_step_1d((x**2).sum(), x)
    with pytest.raises(TypeError, match=r"must be torch\.Tensors"):
        newton_step(1.0, x)
    with pytest.raises(TypeError, match="callable"):
        newton_minimize(None, x)
    with pytest.raises(TypeError, match="floating-point"):
        newton_minimize(lambda z: (z**2).sum(), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="max_iters"):
        newton_minimize(lambda z: (z**2).sum(), x, max_iters=0)
    with pytest.raises(ValueError, match="tol must be positive"):
        newton_minimize(lambda z: (z**2).sum(), x, tol=0.0)


def symmetric_matrices(dim, dtype, seed):
    """Indefinite, positive definite, diagonal, a multiple of the identity, and a nearly double
    smallest eigenvalue (where Laguerre's iteration converges slowest): ``(9, D, D)``."""
    gen = generator(seed)
    A = torch.randn(4, dim, dim, generator=gen, dtype=torch.float64)
    indefinite = A + A.mT
    definite = A @ A.mT + 0.1 * torch.eye(dim, dtype=torch.float64)
    diagonal = torch.diag_embed(torch.randn(1, dim, generator=gen, dtype=torch.float64))
    identity = 3 * torch.eye(dim, dtype=torch.float64).unsqueeze(0)
    Q = torch.linalg.qr(torch.randn(1, dim, dim, generator=gen, dtype=torch.float64))[0]
    spectrum = torch.linspace(1.0, 4.0, dim, dtype=torch.float64)
    spectrum[1] = 1 + 1e-9
    nearly_double = Q @ torch.diag_embed(spectrum) @ Q.mT
    H = torch.cat([indefinite[:2], definite[2:], diagonal, identity, nearly_double])
    return ((H + H.mT) / 2).to(dtype)


def upper_entries(H):
    """``h[i][j]``: the entries of the upper triangle over the batch, the same tensor at [j][i]."""
    dim = H.shape[-1]
    return [[H[:, min(i, j), max(i, j)] for j in range(dim)] for i in range(dim)]


def rayleigh_quotients(H, v):
    return (v.unsqueeze(-2) @ H @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)


@pytest.mark.parametrize("dim", [4, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_smallest_eigenvectors_match_lapack(dim, dtype):
    H = symmetric_matrices(dim, dtype, seed=70 + dim)
    abs_sum = H.abs().sum((-2, -1))
    v = smallest_eigenvectors(upper_entries(H), torch.finfo(dtype).eps * (1 + abs_sum), 30)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(len(H), dtype=dtype))
    expected = torch.linalg.eigvalsh(H.double())[..., 0]
    error = (rayleigh_quotients(H, v).double() - expected).abs()
    assert (error <= 8 * torch.finfo(dtype).eps * abs_sum.double()).all()
    # v is the eigenvector: H v = lambda v, to the rounding of H's scale (simple eigenvalues only).
    residual = (H @ v.unsqueeze(-1)).squeeze(-1) - expected.to(dtype).unsqueeze(-1) * v
    scale = abs_sum.unsqueeze(-1)
    tolerance = 1e-6 if dtype == torch.float64 else 1e-2
    assert (residual[:-2].abs() <= tolerance * scale[:-2]).all()


def test_smallest_eigenvectors_are_nan_where_unconverged_or_not_finite():
    H = symmetric_matrices(5, DTYPE, seed=80)
    abs_sum = H.abs().sum((-2, -1))
    one_step = smallest_eigenvectors(upper_entries(H), torch.finfo(DTYPE).eps * (1 + abs_sum), 1)
    assert torch.isnan(one_step[:, 0]).any()  # one Laguerre step does not converge everywhere
    converged = ~torch.isnan(one_step[:, 0])
    torch.testing.assert_close(
        rayleigh_quotients(H[converged], one_step[converged]),
        torch.linalg.eigvalsh(H[converged])[..., 0],
        rtol=0,
        atol=1e-13,
    )
    H[1, 0, 0] = float("nan")
    H[2, 1, 2] = H[2, 2, 1] = float("inf")
    v = smallest_eigenvectors(upper_entries(H), torch.finfo(DTYPE).eps * (1 + abs_sum), 30)
    finite = torch.tensor([True, False, False, *[True] * (len(H) - 3)])
    assert torch.isnan(v[~finite]).all() and torch.isfinite(v[finite]).all()
    torch.testing.assert_close(
        rayleigh_quotients(H[finite], v[finite]),
        torch.linalg.eigvalsh(H[finite])[..., 0],
        rtol=0,
        atol=1e-13,
    )


def mixed_problem(dim, items=40, seed=120):
    """Indefinite, positive definite with short and with long steps, and zero leading pivots."""
    A, b, x0 = indefinite_problem((items,), dim, seed=seed)
    A[: items // 2] = A[: items // 2] @ A[: items // 2].mT / dim + torch.eye(dim, dtype=DTYPE)
    b[: items // 4] *= 0.01  # short steps: accepted by the trust region
    A[-2:, 0, 0] = 0.0  # a zero first pivot without pivoting
    A[-2:, 0, 1] = A[-2:, 1, 0] = 1.0
    return A, b, x0


@pytest.mark.parametrize("dim", [4, 6])
@pytest.mark.parametrize("trust_radius", [None, 1.0])
def test_chunked_solve_is_the_unchunked_one(dim, trust_radius, monkeypatch):
    # On a CPU the D >= 4 solve runs chunk by chunk; every item's arithmetic is its own.
    A, b, x0 = mixed_problem(dim)
    results = []
    for chunk_items in (1 << 14, 7):
        monkeypatch.setattr("curvkit.ops.newton._CPU_CHUNK_ITEMS", chunk_items)
        x = x0.clone().requires_grad_()
        results.append(newton_step(indefinite_loss(A, b, x), x, trust_radius=trust_radius))
    (mode, cov), (chunked_mode, chunked_cov) = results
    assert torch.equal(mode, chunked_mode) and torch.equal(cov, chunked_cov)
    if trust_radius is None:
        expected = -torch.linalg.solve(A, (A @ x0.unsqueeze(-1)).squeeze(-1) + b)
    else:
        expected = expected_trust_region_step(A, b, x0, trust_radius)
    torch.testing.assert_close(chunked_mode - x0, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dim", [5, 6])
@pytest.mark.parametrize("trust_radius", [None, 0.3])
def test_gradcheck_mode_and_covariance_beyond_closed_forms(dim, trust_radius):
    step, theta = gradcheck_function(dim, trust_radius)
    assert torch.autograd.gradcheck(step, (theta,))


@pytest.mark.parametrize("dim", [4, 5])
def test_gradgradcheck_without_trust_radius(dim):
    # The D >= 4 derivative is written in differentiable operations: it has a derivative itself.
    step, theta = gradcheck_function(dim, None)
    assert torch.autograd.gradgradcheck(step, (theta,))


@pytest.mark.parametrize("dim", [4, 5])
def test_covariance_gradient_matches_an_autograd_inverse(dim):
    # Only cov used (the step's incoming gradient is None), with a chunk boundary inside the batch.
    A, _, x0 = mixed_problem(dim, items=12)
    A = (A[:6] @ A[:6].mT + torch.eye(dim, dtype=DTYPE)).requires_grad_()
    weights = torch.randn(6, dim, dim, dtype=DTYPE, generator=generator(130))
    x = x0[:6].clone().requires_grad_()
    _, cov = newton_step(quadratic_form(A, x).sum(), x)
    (grad,) = torch.autograd.grad((cov * weights).sum(), A)
    (expected,) = torch.autograd.grad((torch.linalg.inv((A + A.mT) / 2) * weights).sum(), A)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_laplace_approximation_from_a_d_ge_4_step():
    # cov of D >= 4 is a view with the batch innermost in memory; distributions take it as it is.
    H, m, x0 = quadratic_problem((3, 2), 5, seed=140)
    x = x0.clone().requires_grad_()
    mode, cov = newton_step(quadratic_form(H, x - m).sum(), x)
    laplace = torch.distributions.MultivariateNormal(mode, cov)
    expected = torch.distributions.MultivariateNormal(m, torch.linalg.inv(H))
    point = torch.randn(3, 2, 5, dtype=DTYPE, generator=generator(141))
    torch.testing.assert_close(laplace.log_prob(point), expected.log_prob(point))


def test_warnings_name_the_non_finite_quantity_beyond_closed_forms():
    x = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]], dtype=DTYPE, requires_grad=True)
    with pytest.warns(UserWarning, match="the gradient and the Hessian contain NaN"):
        newton_step((x**3).sum(), x)
    x = torch.zeros(2, 4, dtype=DTYPE, requires_grad=True)
    with pytest.warns(UserWarning, match="the Hessian contains NaN or Inf") as record:
        newton_step(x.abs().pow(1.5).sum(), x, trust_radius=1.0)
    assert "gradient" not in str(record[0].message)
    x = torch.zeros(2, 4, dtype=DTYPE, requires_grad=True)
    with pytest.warns(UserWarning, match="singular"):
        newton_step((x[:, :3] ** 2).sum() + x[:, 3].sum(), x)
    x = torch.zeros(2, 4, dtype=DTYPE, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        newton_step((x**2).sum(), x)
        newton_step((x**2).sum() + x.sum(), x, trust_radius=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_beyond_closed_forms_low_precision_dtypes(dtype):
    A, b, x0 = mixed_problem(5, items=20)
    A, b, x0 = A[:-2], b[:-2], x0[:-2]  # no LAPACK fallback items: LAPACK has no bfloat16
    expected = {}
    for trust_radius in (None, 1.0):
        x = x0.clone().requires_grad_()
        expected[trust_radius] = newton_step(indefinite_loss(A, b, x), x, trust_radius)
        x = x0.to(dtype).requires_grad_()
        mode, cov = newton_step(indefinite_loss(A.to(dtype), b.to(dtype), x), x, trust_radius)
        assert mode.dtype == cov.dtype == dtype
        if trust_radius is not None:
            assert ((mode.double() - x0).norm(dim=-1) <= trust_radius * (1 + 1e-2)).all()
        if dtype == torch.float32:
            reference_mode, reference_cov = expected[trust_radius]
            torch.testing.assert_close(mode.double(), reference_mode, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(cov.double(), reference_cov, rtol=1e-3, atol=1e-3)
