r"""From the GLM predictive's moments to predictions: link approximations and samples.

For classification the predictive :math:`\int \mathrm{softmax}(f)\, \mathcal N(f; \mu, \Sigma)\,df`
is approximated by

- ``"probit"``: :math:`\mathrm{softmax}\big(\mu / \sqrt{1 + \frac{\pi}{8} \operatorname{diag}
  \Sigma}\big)`;
- ``"bridge"``: the Laplace bridge to a Dirichlet, after removing the component of the Gaussian
  along the all-ones direction (to which the softmax is invariant), and ``"bridge_norm"``, the
  same with its variance normalised;
- ``"mc"``: the average softmax of ``n_samples`` draws of :math:`f` (Cholesky factor of
  :math:`\Sigma`, or its diagonal with ``diagonal_output``).

These are laplace-torch's formulas; the draws follow its order so that, from the same random
state, the samples are the same numbers.
"""

from __future__ import annotations

from math import pi

import torch
from torch import Tensor

__all__ = ["LINK_APPROXIMATIONS", "bridge", "normal_samples", "predict_classes", "probit"]

#: The link approximations laplace-torch offers.
LINK_APPROXIMATIONS = ("mc", "probit", "bridge", "bridge_norm")


def normal_samples(
    mean: Tensor, var: Tensor, n_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    r"""Draws of :math:`\\mathcal N(\\mu_n, \\Sigma_n)` per sample, ``[n_samples, B, C]``.

    Args:
        mean: ``[B, C]``.
        var: ``[B, C]`` (a diagonal) or ``[B, C, C]``.
        n_samples: The number of draws.
        generator: The random number generator (``None``: torch's global one).

    Returns:
        The draws.
    """
    if mean.ndim != 2:
        raise ValueError(f"the mean must be [batch, outputs], got {tuple(mean.shape)}")
    noise = torch.randn(
        (mean.shape[1], n_samples), device=mean.device, dtype=mean.dtype, generator=generator
    )
    if var.shape == mean.shape:
        scaled = var.sqrt().unsqueeze(-1) * noise.unsqueeze(0)
    elif var.shape == (*mean.shape, mean.shape[1]):
        scaled = torch.linalg.cholesky(var) @ noise.unsqueeze(0)
    else:
        raise ValueError(
            f"Invalid input shapes: mean {tuple(mean.shape)}, variance {tuple(var.shape)}"
        )
    return (mean.unsqueeze(-1) + scaled).permute(2, 0, 1)


def probit(f_mu: Tensor, f_var: Tensor) -> Tensor:
    """The probit approximation of the softmax predictive."""
    kappa = 1 / torch.sqrt(1.0 + pi / 8 * f_var.diagonal(dim1=1, dim2=2))
    return torch.softmax(kappa * f_mu, dim=-1)


def bridge(f_mu: Tensor, f_var: Tensor, normalize: bool = False) -> Tensor:
    """The Laplace bridge (``normalize``: ``"bridge_norm"``); inputs are not changed."""
    total = f_var.sum(dim=(1, 2)).reshape(-1, 1)
    row_sums = f_var.sum(-1)
    f_mu = f_mu - row_sums * f_mu.sum(-1).reshape(-1, 1) / total
    f_var = f_var - torch.einsum("bi,bj->bij", row_sums, f_var.sum(-2)) / total.unsqueeze(-1)
    k = f_mu.shape[-1]
    var_diag = torch.diagonal(f_var, dim1=1, dim2=2)
    if normalize:
        mean_var = var_diag.mean(dim=1) / (k / 2) ** 0.5
        f_mu = f_mu / mean_var.sqrt().unsqueeze(-1)
        var_diag = var_diag / mean_var.unsqueeze(-1)
    sum_exp = torch.exp(-f_mu).sum(dim=1).unsqueeze(-1)
    alpha = (1 - 2 / k + f_mu.exp() / k**2 * sum_exp) / var_diag
    return torch.nan_to_num(alpha / alpha.sum(dim=1).unsqueeze(-1), nan=1.0)


def predict_classes(
    f_mu: Tensor,
    f_var: Tensor,
    link_approx: str,
    n_samples: int,
    diagonal_output: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Class probabilities ``[B, C]`` from the GLM moments by ``link_approx``."""
    if link_approx == "mc":
        var = torch.diagonal(f_var, dim1=1, dim2=2) if diagonal_output else f_var
        return torch.softmax(normal_samples(f_mu, var, n_samples, generator), dim=-1).mean(0)
    if link_approx == "probit":
        return probit(f_mu, f_var)
    if link_approx in ("bridge", "bridge_norm"):
        return bridge(f_mu, f_var, normalize=link_approx == "bridge_norm")
    raise ValueError(
        f"Unsupported link approximation {link_approx!r}: use one of {LINK_APPROXIMATIONS}"
    )
