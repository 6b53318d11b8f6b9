r"""
Batched Laplace approximations with Newton's method
===================================================

Five hundred sites each count events at eight times. Site :math:`i` has its own Poisson
regression with an intercept and a trend, :math:`z_i = (a_i, b_i)`, counts
:math:`y_{ij} \sim \mathrm{Poisson}(e^{a_i + b_i t_j})` and a prior
:math:`z_i \sim \mathcal N(0, \sigma^2 I)`. The negative log joint density

.. math::

    L(z) = \sum_i \Big[ \sum_j \big( e^{a_i + b_i t_j} - y_{ij} (a_i + b_i t_j) \big)
    + \frac{\lVert z_i \rVert^2}{2 \sigma^2} \Big] + \text{const}

is a sum of 500 independent two-dimensional problems. :func:`curvkit.ops.newton.newton_minimize`
solves all of them at once: each Newton step takes one gradient and two more backward passes for
the 500 Hessians, and inverts them in closed form. It returns the modes and the inverse Hessians:
the Laplace approximations :math:`\mathcal N(\hat z_i, H_i^{-1})` of the posteriors.
"""

# %%
# Simulated counts
# ----------------

import math

import matplotlib.pyplot as plt
import torch

from curvkit.ops.newton import newton_minimize

torch.manual_seed(0)
dtype = torch.float64
num_sites, times = 500, torch.linspace(-1, 1, 8, dtype=dtype)
true_z = torch.stack([1.5 + 0.5 * torch.randn(num_sites), 0.8 * torch.randn(num_sites)], -1)
rates = torch.exp(true_z[:, :1].to(dtype) + true_z[:, 1:].to(dtype) * times)
counts = torch.poisson(rates)


def site_losses(z, log_sigma):
    """Negative log joint density of every site (up to constants), shape ``z.shape[:-1]``."""
    eta = z[..., :1] + z[..., 1:] * times
    likelihood = (eta.exp() - counts * eta).sum(-1)
    return likelihood + z.square().sum(-1) / (2 * torch.exp(2 * log_sigma))


# %%
# All MAP estimates and Laplace covariances at once
# -------------------------------------------------
#
# A trust radius keeps the first steps from zero safe, where :math:`e^{\eta}` is far from its
# final curvature. The prior scale is a tensor that requires grad: the returned modes carry the
# implicit-function derivative with respect to it.

log_sigma = torch.tensor(0.0, dtype=dtype, requires_grad=True)
z0 = torch.zeros(num_sites, 2, dtype=dtype)
mode, cov = newton_minimize(lambda z: site_losses(z, log_sigma).sum(), z0, trust_radius=1.0)
print(f"modes {tuple(mode.shape)}, covariances {tuple(cov.shape)}")

# %%
# Check against plain autograd on one site
# ----------------------------------------
#
# The gradient of site 7's loss vanishes at its mode, and its covariance is the inverse of the
# Hessian that :func:`torch.autograd.functional.hessian` computes for that site alone.

site = 7
point = mode[site].detach().requires_grad_()
(gradient,) = torch.autograd.grad(site_losses(point, log_sigma.detach())[site], point)
hessian = torch.autograd.functional.hessian(
    lambda z: site_losses(z, log_sigma.detach())[site], mode[site].detach()
)
print("gradient at the mode:", gradient)
assert gradient.abs().max() < 1e-10
torch.testing.assert_close(cov[site], torch.linalg.inv(hessian), rtol=1e-10, atol=1e-12)

# %%
# Differentiating through the modes
# ---------------------------------
#
# The Laplace approximation of the log evidence of site :math:`i` is
# :math:`-L_i(\hat z_i) - \sum_j \log y_{ij}! - \tfrac12 \log\det H_i - 2 \log\sigma` (the
# :math:`2\pi` factors of the prior and of the Gaussian integral cancel). Its derivative with
# respect to :math:`\log\sigma` flows through the modes and the covariances
# (:func:`~curvkit.ops.newton.newton_minimize` returns the inverse Hessian at the differentiable
# mode); a central finite difference agrees.


def laplace_log_evidence(log_sigma):
    mode, cov = newton_minimize(lambda z: site_losses(z, log_sigma).sum(), z0, trust_radius=1.0)
    log_normaliser = 0.5 * torch.logdet(cov) - 2 * log_sigma
    data_term = torch.special.gammaln(counts + 1).sum(-1)
    return (-site_losses(mode, log_sigma) - data_term + log_normaliser).sum()


evidence = laplace_log_evidence(log_sigma)
(derivative,) = torch.autograd.grad(evidence, log_sigma)
step = 1e-5
with torch.no_grad():
    finite_difference = (
        laplace_log_evidence(log_sigma + step) - laplace_log_evidence(log_sigma - step)
    ) / (2 * step)
print(
    f"d evidence / d log sigma: autograd {derivative:.6f}, "
    f"finite difference {finite_difference:.6f}"
)
assert abs(derivative - finite_difference) < 1e-5 * max(1.0, abs(finite_difference))

# %%
# The posteriors
# --------------
#
# Left: the modes of all sites, and for a few of them the 2-sigma ellipse of the Laplace
# approximation around the mode, with the true parameters as crosses. Right: one site's counts and
# its fitted rate.

modes, covs = mode.detach(), cov.detach()
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
left.scatter(modes[:, 0], modes[:, 1], s=4, alpha=0.3, label="modes")
angles = torch.linspace(0, 2 * math.pi, 100, dtype=dtype)
circle = torch.stack([angles.cos(), angles.sin()])
for i in range(0, num_sites, 50):
    ellipse = modes[i, :, None] + 2 * torch.linalg.cholesky(covs[i]) @ circle
    left.plot(ellipse[0], ellipse[1], color="C1", lw=1)
    left.plot(true_z[i, 0], true_z[i, 1], "kx")
left.set(xlabel="intercept $a_i$", ylabel="trend $b_i$", title="Laplace posteriors")
left.legend()
right.scatter(times, counts[site], label="counts")
right.plot(times, torch.exp(modes[site, 0] + modes[site, 1] * times), label="fitted rate")
right.set(xlabel="time $t_j$", ylabel="count", title=f"Site {site}")
right.legend()
fig.tight_layout()
plt.show()
