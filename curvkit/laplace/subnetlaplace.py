"""Subnetwork Laplace approximations: the posterior over chosen entries of the parameter vector.

``subnetwork_indices`` index the flat vector of the trainable parameters (as laplace-torch's).
The curvature is the exact block of those entries: for ``"full"`` the columns of the GGN (or EF,
Hessian) at those entries from curvkit's operators, for ``"diag"`` the entries of the exact
diagonal; the GLM predictive uses the Jacobian's columns at those entries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvkit.laplace import prior
from curvkit.laplace.baselaplace import ParametricLaplace
from curvkit.laplace.curvature import Curvature
from curvkit.laplace.structures import DiagLaplace, FullLaplace

__all__ = ["DiagSubnetLaplace", "FullSubnetLaplace", "SubnetLaplace"]


def check_subnetwork_indices(indices: Any, n_params: int) -> Tensor:
    """Check ``indices``: a non-empty 1-D LongTensor of distinct entries in ``[0, n_params)``."""
    if indices is None:
        raise ValueError("Subnetwork indices cannot be None.")
    if not (
        isinstance(indices, Tensor)
        and indices.dtype == torch.long
        and indices.ndim == 1
        and indices.numel() > 0
    ):
        raise ValueError("Subnetwork indices must be non-empty 1-dimensional torch.LongTensor.")
    if bool((indices < 0).any()) or bool((indices >= n_params).any()):
        raise ValueError(f"Subnetwork indices must lie between 0 and n_params={n_params}.")
    if len(indices.unique()) != len(indices):
        raise ValueError("Subnetwork indices must not contain duplicate entries.")
    return indices


class SubnetLaplace(ParametricLaplace):
    """Base class of the subnetwork Laplace approximations (``"full"`` or ``"diag"``).

    Args:
        model: The network (not changed).
        likelihood: As :class:`~curvkit.laplace.baselaplace.ParametricLaplace`.
        subnetwork_indices: Entries of the flat trainable-parameter vector to treat as random.
        **kwargs: ``sigma_noise``, ``prior_precision`` (a scalar or one per subnetwork entry),
            ``prior_mean``, ``temperature``, ``backend``, ``backend_kwargs``, ``max_memory``.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        subnetwork_indices: Tensor,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        backend: Any = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        max_memory: int | None = None,
    ) -> None:
        if asdl_fisher_kwargs is not None:
            raise ValueError("Subnetwork Laplace does not support asdl_fisher_kwargs.")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.subnetwork_indices = check_subnetwork_indices(subnetwork_indices, n_params)
        self.n_params_subnet = len(subnetwork_indices)
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            backend=backend,
            backend_kwargs=backend_kwargs,
            max_memory=max_memory,
        )
        self.mean = torch.zeros(self.n_params, device=self._device, dtype=self._dtype)

    @property
    def _posterior_size(self) -> int:
        return self.n_params_subnet

    @property
    def _posterior_mean(self) -> Tensor:
        return self.mean_subnet

    @property
    def mean_subnet(self) -> Tensor:
        """The MAP values of the subnetwork's entries."""
        return self.mean[self.subnetwork_indices.to(self.mean.device)]

    @ParametricLaplace.prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        """Set the prior precision: a scalar or one value per subnetwork entry."""
        self._posterior_scale = None
        self._prior_precision = prior.as_prior_precision(
            value, 1, self.n_params_subnet, self._device, self._dtype
        )

    @ParametricLaplace.prior_mean.setter
    def prior_mean(self, value: float | Tensor) -> None:
        """Set the prior mean: a scalar or one value per subnetwork entry."""
        self._prior_mean = prior.as_prior_mean(
            value, self.n_params_subnet, self._device, self._dtype
        )

    @property
    def prior_precision_diag(self) -> Tensor:
        """The diagonal prior precision over the subnetwork, ``[n_params_subnet]``."""
        return prior.expand_prior_precision(self.prior_precision, [self.n_params_subnet])

    @property
    def scatter(self) -> Tensor:  # noqa: D102
        delta = self.mean_subnet - self.prior_mean
        return (delta * self.prior_precision_diag) @ delta

    def _covariance_rows_full(self, rows: Tensor) -> Tensor:
        out = torch.zeros_like(rows)
        index = self.subnetwork_indices.to(rows.device)
        out[:, index] = self._covariance_rows(rows[:, index])
        return out

    def assemble_full_samples(self, subnet_samples: Tensor) -> Tensor:
        """Full parameter vectors ``[n, n_params]``: the MAP with the subnetwork's draws."""
        full = self.mean.repeat(subnet_samples.shape[0], 1)
        full[:, self.subnetwork_indices] = subnet_samples
        return full

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Full parameter vectors ``[n_samples, n_params]`` with the subnetwork drawn."""
        return self.assemble_full_samples(super().sample(n_samples, generator))


class FullSubnetLaplace(SubnetLaplace, FullLaplace):
    """Subnetwork Laplace approximation with a dense posterior precision."""

    _key = ("subnetwork", "full")

    def _fit_curvature(self, curvature: Curvature, batches: Any) -> Tensor:
        return curvature.full_subset(batches, self.subnetwork_indices)


class DiagSubnetLaplace(SubnetLaplace, DiagLaplace):
    """Subnetwork Laplace approximation with a diagonal posterior precision."""

    _key = ("subnetwork", "diag")

    def _fit_curvature(self, curvature: Curvature, batches: Any) -> Tensor:
        return curvature.diag(batches)[self.subnetwork_indices.to(self._device)]
