r"""
Spectral densities, traces and eigenvalues of a trained network's GGN and Hessian
=================================================================================

Curvature spectra say how a loss landscape is shaped: a few large outliers and a bulk near
zero, in most networks. Without forming the matrix, they are reached through products alone:

- traces by randomized estimators (:mod:`curvkit.randomized.estimators`): Hutchinson's, Hutch++
  and XTrace;
- the spectral density by stochastic Lanczos quadrature (:func:`curvkit.spectral_density`);
- the top eigenpairs by Lanczos (:func:`curvkit.lanczos_top_eigenpairs`);
- damped inverses (``operator.inverse(damping)``), exact through the Gram matrix for the GGN.

This example trains a small network, then checks every one of these numbers against the dense
GGN built by plain ``torch.autograd`` (:func:`curvkit.testing.verify.reference_ggn`), and compares
the GGN's spectral density with the Hessian's (:class:`curvkit.HessianOperator`, checked against
:func:`curvkit.testing.verify.reference_hessian`).
"""

# %%
# A small trained network
# -----------------------
#
# A tanh MLP on two interleaved spirals (3 classes), trained for 150 Adam steps, in
# float64 so that the comparisons below hold to many digits.

import math

import matplotlib.pyplot as plt
import torch
from torch import nn

import curvkit
from curvkit.randomized import estimators
from curvkit.testing.verify import reference_ggn, reference_hessian

torch.manual_seed(0)
samples, classes = 64, 3
labels = torch.arange(samples) % classes
radius = torch.linspace(0.2, 1.0, samples, dtype=torch.float64)
angle = 4 * radius + 2 * math.pi * labels / classes
inputs = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
inputs = inputs + 0.05 * torch.randn_like(inputs)

model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
model = model.double()
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
for _ in range(150):
    optimizer.zero_grad()
    loss = loss_fn(model(inputs), labels)
    loss.backward()
    optimizer.step()
print(f"training loss {loss.item():.3f}")

# %%
# The GGN as an operator, checked against autograd
# ------------------------------------------------
#
# :class:`curvkit.GGNOperator` multiplies by :math:`G = V V^\top` through the square-root factor
# :math:`V` (:math:`D \times N C`), computed once. Its rank is at most :math:`N (C - 1)` for
# cross-entropy: far below :math:`D` here.

data = (inputs, labels)
operator = curvkit.GGNOperator(model, loss_fn, data)
dense = reference_ggn(model, loss_fn, inputs, labels)
torch.testing.assert_close(operator.to_dense(), dense, rtol=1e-10, atol=1e-12)
eigenvalues = torch.linalg.eigvalsh(dense)
dim = dense.shape[0]
rank = int((eigenvalues > 1e-10 * eigenvalues[-1]).sum())
print(f"D = {dim} parameters, GGN rank {rank}, trace {dense.trace().item():.4f}")

# %%
# Traces by three estimators at equal cost
# ----------------------------------------
#
# Each estimator spends 24 products with :math:`G` (batched into one or two products with a
# ``[D, J]`` matrix). Hutchinson's estimate is unbiased with variance
# :math:`2 (\lVert G \rVert_F^2 - \sum_i G_{ii}^2)/m` for Rademacher probes; Hutch++ and XTrace
# first capture the top of the spectrum exactly with a sketch, and estimate only the rest.

exact_trace = dense.trace().item()
generator = torch.Generator().manual_seed(0)
runs = {
    name: torch.stack([estimator(operator, 24, generator=generator) for _ in range(100)])
    for name, estimator in [
        ("Hutchinson", estimators.hutchinson_trace),
        ("Hutch++", estimators.hutchpp_trace),
        ("XTrace", estimators.xtrace),
    ]
}
for name, estimates in runs.items():
    spread = estimates.std() / exact_trace
    print(f"{name:>10}: mean {estimates.mean():.4f}, relative spread {spread:.2%}")

variance = 2 * (dense.square().sum() - dense.diagonal().square().sum()) / 24
assert abs(runs["Hutchinson"].mean() - exact_trace) <= 4.5 * (variance / 100).sqrt()
assert runs["XTrace"].std() < runs["Hutchinson"].std()

# With a sketch wider than the rank, XTrace spans the GGN's range: the estimate is exact.
exact_by_xtrace = estimators.xtrace(operator, 2 * rank + 2, generator=generator)
torch.testing.assert_close(exact_by_xtrace.item(), exact_trace, rtol=1e-10, atol=0)

fig, ax = plt.subplots(figsize=(6, 3))
for name, estimates in runs.items():
    ax.hist(estimates.numpy(), bins=25, alpha=0.6, label=name)
ax.axvline(exact_trace, color="black", label="exact trace")
ax.set_xlabel("trace estimate (24 products)")
ax.legend()
fig.tight_layout()

# %%
# The spectral density by stochastic Lanczos quadrature
# -----------------------------------------------------
#
# Sixteen Lanczos runs of 40 steps share their products (each step multiplies a ``[D, 16]``
# block). The density's mean is the Hutchinson estimate of :math:`\operatorname{tr}(G)/D`,
# exactly (Gauss quadrature is exact for low-degree polynomials); the histogram shows the
# exact eigenvalues.

grid, density = curvkit.spectral_density(
    operator, num_iters=40, num_repeats=16, generator=torch.Generator().manual_seed(1)
)
mass = torch.trapezoid(density, grid).item()
mean = torch.trapezoid(density * grid, grid).item()
print(f"density: mass {mass:.4f}, mean {mean:.5f} (exact tr(G)/D = {exact_trace / dim:.5f})")
assert abs(mass - 1) < 0.01
sphere_variance = 2 / (dim * (dim + 2)) * (dense.square().sum() - exact_trace**2 / dim) / 16
assert abs(mean - exact_trace / dim) <= 4.5 * sphere_variance.sqrt() + 0.01 * exact_trace / dim

fig, (linear, logarithmic) = plt.subplots(1, 2, figsize=(9, 3))
linear.hist(eigenvalues.numpy(), bins=80, density=True, alpha=0.4, label="exact eigenvalues")
linear.plot(grid.numpy(), density.numpy(), label="SLQ density")
linear.set_yscale("log")
linear.set_ylim(1e-3, None)
linear.set_xlabel(r"$\lambda$")
linear.legend()

# %%
# On a log scale, the log spectrum (the density of :math:`\log(|\lambda| + \epsilon)`) resolves
# the bulk; the GGN's null space shows up at :math:`\epsilon`.

log_grid, log_density = curvkit.spectral_density(
    operator,
    num_iters=40,
    num_repeats=16,
    log_spectrum=True,
    epsilon=1e-8,
    generator=torch.Generator().manual_seed(1),
)
logarithmic.hist(
    (eigenvalues.abs() + 1e-8).log10().numpy(), bins=60, density=True, alpha=0.4, label="exact"
)
# The density per unit of log10(x) is x ln(10) times the density per unit of x.
logarithmic.plot(
    log_grid.log10().numpy(), (log_density * log_grid * math.log(10)).numpy(), label="SLQ"
)
logarithmic.set_xlabel(r"$\log_{10}(|\lambda| + \epsilon)$")
logarithmic.legend()
fig.tight_layout()

# %%
# Top eigenpairs and a damped inverse
# -----------------------------------
#
# Lanczos with full reorthogonalisation finds the outliers in a few dozen products; each
# eigenvalue lies within its reported residual norm of an exact one.

top = curvkit.lanczos_top_eigenpairs(operator, 5, tol=1e-10)
print("Lanczos:", top.eigenvalues.numpy().round(6), f"({top.num_matvecs} products)")
print("exact:  ", eigenvalues.flip(0)[:5].numpy().round(6))
torch.testing.assert_close(top.eigenvalues, eigenvalues.flip(0)[:5], rtol=1e-8, atol=0)

# For the GGN of one batch, the damped inverse defaults to the Woodbury identity through the
# N C x N C Gram matrix: exact, at about the cost of two products.
damping = 1e-3
inverse = operator.inverse(damping)
vector = torch.randn(dim, dtype=torch.float64)
solution = inverse @ vector
reference = torch.linalg.solve(dense + damping * torch.eye(dim, dtype=torch.float64), vector)
torch.testing.assert_close(solution, reference, rtol=1e-9, atol=1e-9)
print(f"{type(inverse).__name__}: max error {(solution - reference).abs().max():.1e}")

# %%
# The Hessian's spectral density beside the GGN's
# -----------------------------------------------
#
# The Hessian is the GGN plus the curvature of the network itself, weighted by the loss's
# gradient: near a minimum the two are close, but the Hessian has negative eigenvalues, which
# the positive semi-definite GGN cannot have. :class:`curvkit.HessianOperator` multiplies by
# double backward; the same estimators and SLQ apply to it unchanged.

hessian = curvkit.HessianOperator(model, loss_fn, data)
dense_hessian = reference_hessian(model, loss_fn, inputs, labels)
torch.testing.assert_close(hessian.to_dense(), dense_hessian, rtol=1e-10, atol=1e-12)
hessian_eigenvalues = torch.linalg.eigvalsh(dense_hessian)
print(
    f"Hessian: trace {dense_hessian.trace().item():.4f}, "
    f"{int((hessian_eigenvalues < -1e-8).sum())} negative eigenvalues "
    f"(smallest {hessian_eigenvalues[0].item():.2e})"
)
hessian_trace = estimators.xtrace(hessian, 60, generator=torch.Generator().manual_seed(2))
print(f"XTrace (60 products): {hessian_trace.item():.4f}, exact {dense_hessian.trace().item():.4f}")

hessian_grid, hessian_density = curvkit.spectral_density(
    hessian, num_iters=40, num_repeats=16, generator=torch.Generator().manual_seed(1)
)
hessian_mass = torch.trapezoid(hessian_density, hessian_grid).item()
assert abs(hessian_mass - 1) < 0.01
if (hessian_eigenvalues < -1e-8).any():
    assert hessian_grid.min() < 0  # the density reaches the negative eigenvalues

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(grid.numpy(), density.numpy(), label="GGN")
ax.plot(hessian_grid.numpy(), hessian_density.numpy(), label="Hessian")
ax.set_yscale("log")
ax.set_ylim(1e-3, None)
ax.set_xlabel(r"$\lambda$")
ax.legend()
fig.tight_layout()
