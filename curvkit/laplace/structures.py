r"""The four structures of the posterior precision over all (trainable) parameters.

- :class:`FullLaplace`: :math:`P = c H + P_0` dense (``[P, P]``), :math:`H` the dense GGN;
- :class:`DiagLaplace`: :math:`P = c \operatorname{diag}(H) + P_0`;
- :class:`KronLaplace`: one Kronecker-factored block per parameter tensor plus its prior,
  eigendecomposed once (:class:`~curvkit.laplace.kron.KronDecomposed`);
- :class:`LowRankLaplace`: :math:`P = U \operatorname{diag}(c \lambda) U^\top + P_0` from the
  GGN's top eigenpairs, handled by the Woodbury identity.

Here :math:`c = 1/(\sigma^2 T)`. Each class provides the covariance product the GLM predictive
needs, the log-determinant, and exact samples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvkit.laplace.baselaplace import ParametricLaplace
from curvkit.laplace.curvature import Curvature
from curvkit.laplace.kron import Kron, KronDecomposed

__all__ = ["DiagLaplace", "FullLaplace", "KronLaplace", "LowRankLaplace"]


def precision_to_scale_tril(precision: Tensor) -> Tensor:
    r"""A lower-triangular :math:`L` with :math:`L L^\top = P^{-1}`.

    From the Cholesky factor of :math:`P` with its rows and columns reversed (no explicit
    inverse of :math:`P`).
    """
    reversed_chol = torch.linalg.cholesky(torch.flip(precision, (-2, -1)))
    inverse_scale = torch.flip(reversed_chol, (-2, -1)).transpose(-2, -1)
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    return torch.linalg.solve_triangular(inverse_scale, eye, upper=False)


def _randn(laplace: ParametricLaplace, *shape: int, generator: torch.Generator | None) -> Tensor:
    return torch.randn(*shape, device=laplace._device, dtype=laplace._dtype, generator=generator)


class FullLaplace(ParametricLaplace):
    """Laplace approximation with a dense posterior precision (``hessian_structure="full"``).

    The curvature is curvkit's dense GGN (:func:`curvkit.ggn_matrix`), empirical Fisher or
    Hessian. See :class:`~curvkit.laplace.baselaplace.ParametricLaplace` for the arguments.
    """

    _key = ("all", "full")

    def _init_H(self) -> None:
        self.H = torch.zeros(
            self._posterior_size, self._posterior_size, device=self._device, dtype=self._dtype
        )
        self._posterior_scale = None

    def _fit_curvature(self, curvature: Curvature, batches: Any) -> Tensor:
        return curvature.full(batches)

    def fit(self, train_loader: Any, override: bool = True, progress_bar: bool = False) -> None:  # noqa: D102
        self._posterior_scale = None
        super().fit(train_loader, override=override, progress_bar=progress_bar)

    @property
    def posterior_precision(self) -> Tensor:
        """The posterior precision ``[P, P]``."""
        self._check_H_init()
        return self._H_factor * self.H + torch.diag(self.prior_precision_diag)

    @property
    def posterior_scale(self) -> Tensor:
        r"""A lower-triangular square root of the covariance, :math:`L L^\top = P^{-1}`."""
        if self._posterior_scale is None:
            self._posterior_scale = precision_to_scale_tril(self.posterior_precision)
        return self._posterior_scale

    @property
    def posterior_covariance(self) -> Tensor:
        """The posterior covariance :math:`P^{-1}`, ``[P, P]``."""
        scale = self.posterior_scale
        return scale @ scale.T

    @property
    def posterior_variance(self) -> Tensor:
        """The diagonal of the posterior covariance, ``[P]``."""
        return self.posterior_scale.square().sum(1)

    @property
    def log_det_posterior_precision(self) -> Tensor:  # noqa: D102
        return self.posterior_precision.logdet()

    def square_norm(self, value: Tensor) -> Tensor:  # noqa: D102
        delta = value - self._posterior_mean
        return delta @ self.posterior_precision @ delta

    def _covariance_rows(self, rows: Tensor) -> Tensor:
        return rows @ self.posterior_covariance

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        draws = _randn(self, n_samples, self._posterior_size, generator=generator)
        return self._posterior_mean.reshape(1, -1) + draws @ self.posterior_scale.T


class DiagLaplace(ParametricLaplace):
    """Laplace approximation with a diagonal posterior precision (``hessian_structure="diag"``).

    The curvature is the exact GGN diagonal (:func:`curvkit.diag_ggn`; Monte-Carlo with
    ``backend_kwargs={"stochastic": True}``), the empirical Fisher's or the Hessian's.
    """

    _key = ("all", "diag")

    def _init_H(self) -> None:
        self.H = torch.zeros(self._posterior_size, device=self._device, dtype=self._dtype)

    def _fit_curvature(self, curvature: Curvature, batches: Any) -> Tensor:
        return curvature.diag(batches)

    @property
    def posterior_precision(self) -> Tensor:
        """The diagonal posterior precision ``[P]``."""
        self._check_H_init()
        return self._H_factor * self.H + self.prior_precision_diag

    @property
    def posterior_scale(self) -> Tensor:
        """The posterior standard deviations ``[P]``."""
        return 1 / self.posterior_precision.sqrt()

    @property
    def posterior_variance(self) -> Tensor:
        """The posterior variances ``[P]``."""
        return 1 / self.posterior_precision

    @property
    def posterior_covariance(self) -> Tensor:
        """The (diagonal) posterior covariance as a matrix ``[P, P]``."""
        return torch.diag(self.posterior_variance)

    @property
    def log_det_posterior_precision(self) -> Tensor:  # noqa: D102
        return self.posterior_precision.log().sum()

    def square_norm(self, value: Tensor) -> Tensor:  # noqa: D102
        delta = value - self._posterior_mean
        return delta @ (delta * self.posterior_precision)

    def _covariance_rows(self, rows: Tensor) -> Tensor:
        return rows * self.posterior_variance

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        draws = _randn(self, n_samples, self._posterior_size, generator=generator)
        return self._posterior_mean.reshape(1, -1) + draws * self.posterior_scale.reshape(1, -1)


class KronLaplace(ParametricLaplace):
    """Laplace approximation with Kronecker-factored blocks (``hessian_structure="kron"``).

    The factors are :class:`curvkit.KFACOperator`'s (laplace-torch's layout and scaling,
    :mod:`curvkit.laplace.curvature`); a parameter without Kronecker factors (LayerNorm,
    BatchNorm in eval mode, Embedding, ...) gets its exact dense block. The prior precision is a
    scalar or one value per parameter tensor.

    Args:
        damping: Add the prior to each factor (:class:`~curvkit.laplace.kron.KronDecomposed`).
        **kwargs: As :class:`~curvkit.laplace.baselaplace.ParametricLaplace`.
    """

    _key = ("all", "kron")

    def __init__(
        self, model: nn.Module, likelihood: str, *args: Any, damping: bool = False, **kwargs: Any
    ) -> None:
        self.damping = damping
        self.H_facs: Kron | None = None
        super().__init__(model, likelihood, *args, **kwargs)

    def _init_H(self) -> None:
        self.H = Kron.init_from_model(self.params, self._device, self._dtype)

    def _fit_curvature(self, curvature: Curvature, batches: Any) -> Kron:
        return curvature.kron(batches)

    def fit(self, train_loader: Any, override: bool = True, progress_bar: bool = False) -> None:  # noqa: D102
        if override:
            self.H_facs = None
        super().fit(train_loader, override=override, progress_bar=progress_bar)

    def _store_curvature(self, new: Kron, override: bool, n_old: int, n_new: int) -> None:
        if self.H_facs is None:
            self.H_facs = new
        else:
            # A is an average over the data: weigh the old and the new data by their sizes.
            total = n_old + n_new
            self.H_facs = _rescale_inputs(self.H_facs, n_old / total) + _rescale_inputs(
                new, n_new / total
            )
        self.H = self.H_facs.decompose(damping=self.damping)

    @ParametricLaplace.prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        """Set the prior precision: a scalar or one value per parameter tensor."""
        ParametricLaplace.prior_precision.fset(self, value)
        if len(self.prior_precision) not in (1, self.n_layers):
            raise ValueError("Prior precision for Kron either scalar or per-layer.")

    @property
    def posterior_precision(self) -> KronDecomposed:
        """The posterior precision as eigendecomposed Kronecker factors plus the prior."""
        self._check_H_init()
        return self.H * self._H_factor + self.prior_precision

    @property
    def posterior_variance(self) -> Tensor:
        """The diagonal of the posterior covariance, ``[P]``."""
        return self.posterior_precision.diag(exponent=-1)

    @property
    def posterior_covariance(self) -> Tensor:
        """The dense posterior covariance ``[P, P]`` (small models)."""
        return self.posterior_precision.to_matrix(exponent=-1)

    @property
    def log_det_posterior_precision(self) -> Tensor:  # noqa: D102
        return self.posterior_precision.logdet()

    def square_norm(self, value: Tensor) -> Tensor:  # noqa: D102
        delta = value - self.mean
        return delta @ self.posterior_precision.bmm(delta, exponent=1)

    def _covariance_rows(self, rows: Tensor) -> Tensor:
        return self.posterior_precision.bmm(rows, exponent=-1)

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        draws = _randn(self, n_samples, self._posterior_size, generator=generator)
        draws = self.posterior_precision.bmm(draws, exponent=-0.5)
        return self.mean.reshape(1, -1) + draws

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        state = super().state_dict()
        state["H"] = self.H_facs.kfacs
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state_dict)
        self.H_facs = Kron(state_dict["H"])
        self.H = self.H_facs.decompose(damping=self.damping)


def _rescale_inputs(kron: Kron, factor: float) -> Kron:
    """Scale the input-side factor ``A`` of every two-factor entry (a copy)."""
    return Kron(
        [[entry[0], entry[1] * factor] if len(entry) == 2 else entry for entry in kron.kfacs]
    )


class LowRankLaplace(ParametricLaplace):
    r"""Laplace approximation with a low-rank curvature (``hessian_structure="lowrank"``).

    :math:`P = U \operatorname{diag}(c\lambda) U^\top + P_0` with the top ``low_rank``
    (``backend_kwargs``, default 10) eigenpairs of the GGN, exact (:func:`curvkit.ggn_eigh`);
    eigenvalues below ``1e-6`` are dropped. laplace-torch needs the ``asdfghjkl`` package and
    an iterative Hessian eigensolver; none of that is needed here.
    """

    _key = ("all", "lowrank")

    def __init__(
        self, model: nn.Module, likelihood: str, backend: Any = None, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(model, likelihood, *args, backend=backend, **kwargs)

    def _init_H(self) -> None:
        self.H = None

    def fit(self, train_loader: Any, override: bool = True, progress_bar: bool = False) -> None:  # noqa: D102
        if not override:
            raise ValueError("LowRank LA does not support updating (override=False).")
        super().fit(train_loader, override=override, progress_bar=progress_bar)

    def _fit_curvature(self, curvature: Curvature, batches: Any) -> tuple[Tensor, Tensor]:
        return curvature.eig_lowrank(batches, self._backend_options["low_rank"])

    @property
    def posterior_precision(self) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """``((U, c * eigenvalues), prior_precision_diag)``."""
        self._check_H_init()
        return (self.H[0], self._H_factor * self.H[1]), self.prior_precision_diag

    @property
    def V(self) -> Tensor:
        r""":math:`P_0^{-1} U`."""
        (u, _), prior_diag = self.posterior_precision
        return u / prior_diag.reshape(-1, 1)

    @property
    def Kinv(self) -> Tensor:
        r""":math:`(\operatorname{diag}(c\lambda)^{-1} + U^\top P_0^{-1} U)^{-1}`."""
        (u, values), _ = self.posterior_precision
        return torch.inverse(torch.diag(1 / values) + u.T @ self.V)

    def _covariance_rows(self, rows: Tensor) -> Tensor:
        v = self.V
        return rows / self.prior_precision_diag - (rows @ v) @ self.Kinv @ v.T

    @property
    def log_det_posterior_precision(self) -> Tensor:  # noqa: D102
        (_, values), prior_diag = self.posterior_precision
        return values.log().sum() + prior_diag.log().sum() - torch.logdet(self.Kinv)

    def square_norm(self, value: Tensor) -> Tensor:  # noqa: D102
        delta = value - self.mean
        (u, values), prior_diag = self.posterior_precision
        projected = u.T @ delta
        return delta @ (prior_diag * delta) + projected @ (values * projected)

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        draws = _randn(self, self.n_params, n_samples, generator=generator)
        (u, values), prior_diag = self.posterior_precision
        # (U diag(l) U^T + D)^-1 = D^-1/2 (I + W W^T)^-1 D^-1/2 with W = D^-1/2 U diag(l)^1/2;
        # (I + W W^T)^-1/2 = I + W Q diag(g) Q^T W^T for W^T W = Q diag(s) Q^T, where
        # g = ((1 + s)^-1/2 - 1) / s, written without the division.
        d_sqrt = prior_diag.sqrt().reshape(-1, 1)
        w = u * values.sqrt() / d_sqrt
        s, q = torch.linalg.eigh(w.T @ w)
        s = s.clamp(min=0)
        g = -1 / ((1 + s).sqrt() * (1 + (1 + s).sqrt()))
        wq = w @ q
        draws = draws + wq @ (g.reshape(-1, 1) * (wq.T @ draws))
        return self.mean + (draws / d_sqrt).T
