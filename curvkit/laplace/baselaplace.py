r"""laplace-torch's parametric Laplace approximations on curvkit: the shared machinery.

A Laplace approximation is the Gaussian :math:`\mathcal N(\theta_\text{MAP}, P^{-1})` around the
trained parameters with the posterior precision

.. math::

    P = \frac{1}{\sigma^2 T}\, H + P_0,

:math:`H` the curvature of the summed negative log likelihood (:mod:`curvkit.laplace.curvature`),
:math:`\sigma` the observation noise (regression), :math:`T` the temperature and :math:`P_0` the
diagonal prior precision. :class:`ParametricLaplace` holds everything that does not depend on the
structure of :math:`H`; the structures are in :mod:`curvkit.laplace.structures`.

Differences from laplace-torch (all deliberate):

- the model is never changed: no ``model.eval()`` left behind (eval mode only during the calls),
  no ``output_size`` attribute, no parameters overwritten by the ``"nn"`` predictive (it calls the
  model functionally with each sample);
- the GLM predictive never builds a ``[B, C, P]`` Jacobian beyond ``max_memory``
  (:mod:`curvkit.laplace.functional`);
- ``generator`` is honoured by every sampling path (laplace-torch drops it in the GLM Monte-Carlo
  link and the ``"nn"`` classification predictive);
- the grid search resets its metric for every grid point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from math import log, pi, sqrt
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

from curvkit.core.model_io import call_model, output_tensor
from curvkit.laplace import prior, tuning
from curvkit.laplace.curvature import Curvature, resolve_backend
from curvkit.laplace.data import LaplaceData, dataset_size
from curvkit.laplace.functional import glm_moments
from curvkit.laplace.likelihood import check_likelihood, curvature_likelihood
from curvkit.laplace.links import LINK_APPROXIMATIONS, normal_samples, predict_classes
from curvkit.laplace.modes import eval_mode

__all__ = ["BaseLaplace", "ParametricLaplace"]

PRED_TYPES = ("glm", "nn")


def _name(value: Any) -> Any:
    """The string behind an enum member (laplace-torch's enums are ``str`` enums)."""
    return getattr(value, "value", value)


class ParametricLaplace:
    r"""Base class of the weight-space Laplace approximations (laplace-torch's interface).

    Args:
        model: The trained network (``model(X)`` gives ``[batch, outputs]``). It is not changed.
        likelihood: ``"classification"``, ``"regression"`` or ``"reward_modeling"``.
        sigma_noise: Observation noise :math:`\sigma` (regression only; else it must be 1).
        prior_precision: :math:`P_0`: a scalar, one value per parameter tensor, or one per entry.
        prior_mean: The prior mean: a scalar or one value per parameter entry.
        temperature: :math:`T`, scaling the likelihood by :math:`1/T`.
        enable_backprop: Keep the GLM predictive differentiable in the inputs (it then uses
            dense Jacobians, for small models).
        dict_key_x: Kept for laplace-torch compatibility (the model gets the whole dict).
        dict_key_y: The key of the targets in dict batches.
        backend: Which curvature: ``None``/``"ggn"``, ``"ef"``, ``"hessian"``, or a laplace-torch
            backend class (read by name, :func:`curvkit.laplace.curvature.resolve_backend`).
        backend_kwargs: ``stochastic``, ``num_samples``, ``low_rank``, ``kfac_approx``.
        asdl_fisher_kwargs: Accepted for compatibility; ``kfac_approx`` is read from it too.
        max_memory: Memory budget in bytes for the curvature's columns and the GLM predictive's
            Jacobian rows; ``None`` for half the memory available.
    """

    _key: tuple[str, str]

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: Any = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        max_memory: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.likelihood = check_likelihood(likelihood)
        self.model = model
        self.params = self._select_params()
        self.is_subset_params = len(self.params) < len(list(model.parameters()))
        self.n_params = sum(p.numel() for p in self.params)
        self.n_layers = len(self.params)
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        if _name(self.likelihood) != "regression" and not _equals_one(sigma_noise):
            raise ValueError("Sigma noise != 1 only available for regression.")
        self.sigma_noise = sigma_noise
        self.temperature = temperature
        self.enable_backprop = enable_backprop
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        options = dict(asdl_fisher_kwargs or {})
        options.update(backend_kwargs or {})
        self._backend_options = resolve_backend(backend, options)
        self._backend_cls = backend
        self.max_memory = max_memory
        self.loss: float | Tensor = 0.0
        self.n_outputs = 0
        self.n_data = 0
        self._init_H()
        self.mean: Tensor = self.prior_mean

    # -- parameters and hyperparameters -------------------------------------------------------

    def _select_params(self) -> list[Tensor]:
        """The parameters of the approximation: every one that requires grad."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def prior_precision(self) -> Tensor:
        """The prior precision as a 1-D tensor (length 1, ``n_layers`` or ``n_params``)."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._posterior_scale = None
        self._prior_precision = prior.as_prior_precision(
            value, self.n_layers, self.n_params, self._device, self._dtype
        )

    @property
    def prior_mean(self) -> Tensor:
        """The prior mean (a scalar tensor, or length 1 or ``n_params``)."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float | Tensor) -> None:
        self._prior_mean = prior.as_prior_mean(value, self.n_params, self._device, self._dtype)

    @property
    def sigma_noise(self) -> Tensor:
        r"""The observation noise :math:`\\sigma` (a scalar tensor)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        self._posterior_scale = None
        self._sigma_noise = prior.as_sigma_noise(value, self._device, self._dtype)

    @property
    def _posterior_size(self) -> int:
        """The dimension of the Gaussian (``n_params``; the subnetwork's size for subnetworks)."""
        return self.n_params

    @property
    def _posterior_mean(self) -> Tensor:
        """The mean of the Gaussian, ``[_posterior_size]``."""
        return self.mean

    @property
    def _param_sizes(self) -> list[int]:
        return [p.numel() for p in self.params]

    @property
    def prior_precision_diag(self) -> Tensor:
        """The diagonal ``[n_params]`` of the prior precision :math:`P_0`."""
        return prior.expand_prior_precision(self.prior_precision, self._param_sizes)

    @property
    def _H_factor(self) -> Tensor:
        return 1 / self.sigma_noise.square() / self.temperature

    # -- fitting ------------------------------------------------------------------------------

    def _init_H(self) -> None:
        raise NotImplementedError

    def _check_H_init(self) -> None:
        if not getattr(self, "_fitted", False):
            raise AttributeError("Laplace not fitted. Run fit() first.")

    def _curvature(self, model: nn.Module, progress: bool | None) -> Curvature:
        opts = self._backend_options
        return Curvature(
            model=model,
            likelihood=curvature_likelihood(self.likelihood),
            params=self.params,
            kind=opts["kind"],
            mc_samples=opts["mc_samples"],
            kfac_approx=opts["kfac_approx"],
            progress=progress,
            max_memory=self.max_memory,
        )

    def _fit_curvature(self, curvature: Curvature, batches: Any) -> Any:
        """The structure's curvature of the summed loss over ``batches``."""
        raise NotImplementedError

    def _store_curvature(self, new: Any, override: bool, n_old: int, n_new: int) -> None:
        """Keep the new curvature, or add it to the current one (``override=False``)."""
        self.H = new if override else self.H + new

    def _prepare_fit(self, train_loader: Iterable[Any]) -> tuple[nn.Module, Any]:
        """Check the first batch, record ``n_outputs``, and return the model and batches."""
        data = LaplaceData(self.model, self.dict_key_y, self._device)
        model, batches = data.loader(train_loader)
        inputs, targets = next(iter(batches))
        with torch.no_grad():
            out = output_tensor(call_model(model, inputs))
        if curvature_likelihood(self.likelihood) == "regression" and targets.ndim != out.ndim:
            raise ValueError(
                f"The model's output has {out.ndim} dims but the target has {targets.ndim} dims: "
                "regression targets must be shaped like the outputs, e.g. y.reshape(-1, 1)."
            )
        self.n_outputs = out.shape[-1]
        return model, batches

    def fit(
        self, train_loader: Iterable[Any], override: bool = True, progress_bar: bool = False
    ) -> None:
        """Fit the Laplace approximation at the model's current parameters.

        Args:
            train_loader: The training data: batches ``(X, y)`` or dicts with the targets under
                ``dict_key_y``; :math:`N` is ``len(train_loader.dataset)`` where it exists.
            override: Start afresh (``True``) or add this data's curvature to the current one.
            progress_bar: Show a progress bar; ``False`` still shows one on long fits.
        """
        if override:
            self._init_H()
            self.loss = 0.0
            self.n_data = 0
        with eval_mode(self.model):
            model, batches = self._prepare_fit(train_loader)
            curvature = self._curvature(model, True if progress_bar else None)
            loss, count = curvature.loss(batches)
            new = self._fit_curvature(curvature, batches)
        n_new = dataset_size(train_loader, count)
        self._store_curvature(new, override, self.n_data, n_new)
        self._fitted = True
        self.loss = self.loss + loss
        self.n_data += n_new
        self.mean = parameters_to_vector(self.params)
        if not self.enable_backprop:
            self.mean = self.mean.detach()

    # -- marginal likelihood ------------------------------------------------------------------

    @property
    def log_likelihood(self) -> Tensor:
        """The log likelihood of the training data at the MAP (after :meth:`fit`)."""
        value = -self._H_factor * self.loss
        if curvature_likelihood(self.likelihood) == "regression":
            value = value - self.n_data * self.n_outputs * torch.log(
                self.sigma_noise * sqrt(2 * pi)
            )
        return value

    @property
    def scatter(self) -> Tensor:
        r""":math:`(\theta_\text{MAP} - \mu_0)^\top P_0 (\theta_\text{MAP} - \mu_0)`."""
        delta = self.mean - self.prior_mean
        return (delta * self.prior_precision_diag) @ delta

    @property
    def log_det_prior_precision(self) -> Tensor:
        r""":math:`\log\det P_0`."""
        return self.prior_precision_diag.log().sum()

    @property
    def log_det_posterior_precision(self) -> Tensor:
        r""":math:`\log\det P`."""
        raise NotImplementedError

    @property
    def log_det_ratio(self) -> Tensor:
        r""":math:`\log\det P - \log\det P_0`."""
        return self.log_det_posterior_precision - self.log_det_prior_precision

    def square_norm(self, value: Tensor) -> Tensor:
        r""":math:`\Delta^\top P \Delta` with :math:`\Delta` = ``value - mean``."""
        raise NotImplementedError

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """The log density of the approximate posterior at ``value`` (``[n_params]``)."""
        if not normalized:
            return -self.square_norm(value) / 2
        const = -self._posterior_size / 2 * log(2 * pi) + self.log_det_posterior_precision / 2
        return const - self.square_norm(value) / 2

    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        r"""The Laplace approximation of the log marginal likelihood.

        .. math::

            \log p(\mathcal D) \approx \log p(\mathcal D \mid \theta_\text{MAP})
            - \tfrac12 \big(\log\det P - \log\det P_0 + \text{scatter}\big)

        Differentiable in ``prior_precision`` and ``sigma_noise``.

        Args:
            prior_precision: Set the prior precision first.
            sigma_noise: Set the observation noise first (regression only).

        Returns:
            The scalar log marginal likelihood.
        """
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            if curvature_likelihood(self.likelihood) != "regression":
                raise ValueError("Can only change sigma_noise for regression.")
            self.sigma_noise = sigma_noise
        return self.log_likelihood - 0.5 * (self.log_det_ratio + self.scatter)

    # -- covariance ---------------------------------------------------------------------------

    @property
    def posterior_precision(self) -> Any:
        """The posterior precision :math:`P` in the structure's form."""
        raise NotImplementedError

    def _covariance_rows(self, rows: Tensor) -> Tensor:
        r"""``rows @ P^{-1}`` for rows ``[J, n_params]`` (the structure's product)."""
        raise NotImplementedError

    def _check_jacobians(self, Js: Tensor) -> None:
        if not isinstance(Js, Tensor) or Js.ndim != 3:
            raise ValueError("Jacobians have to be a torch.Tensor [batch, outputs, parameters].")
        if Js.device != self._device:
            raise ValueError("Jacobians need to be on the same device as Laplace.")
        if Js.shape[-1] != self._posterior_size:
            raise ValueError(
                f"Invalid Jacobians shape {tuple(Js.shape)}: the last axis must have "
                f"{self._posterior_size} parameters."
            )

    def functional_variance(self, Js: Tensor) -> Tensor:
        r""":math:`J_n P^{-1} J_n^\top` per sample, ``[B, C, C]``, for Jacobians ``[B, C, P]``."""
        self._check_jacobians(Js)
        product = self._covariance_rows(Js.reshape(-1, Js.shape[-1])).reshape(Js.shape)
        return torch.einsum("ncp,nkp->nck", Js, product)

    def functional_covariance(self, Js: Tensor) -> Tensor:
        r""":math:`J P^{-1} J^\top` across samples, ``[B C, B C]``, for Jacobians ``[B, C, P]``."""
        self._check_jacobians(Js)
        rows = Js.reshape(-1, Js.shape[-1])
        return rows @ self._covariance_rows(rows).T

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        r"""Draws :math:`\theta \sim \mathcal N(\theta_\text{MAP}, P^{-1})`, ``[n_samples, P]``."""
        raise NotImplementedError

    # -- predictive ---------------------------------------------------------------------------

    def _predictive_likelihood(self, fitting: bool) -> str:
        if self.likelihood == "reward_modeling":
            return "classification" if fitting else "regression"
        return self.likelihood

    def _glm_predictive_distribution(
        self, X: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The GLM predictive's mean and (co)variance on inputs ``X``."""
        self._check_H_init()
        model, inputs = LaplaceData(self.model, self.dict_key_y, self._device).inputs(X)
        with eval_mode(self.model):
            if self.enable_backprop:
                from curvkit.laplace.jacobians import dense_jacobians

                Js, f_mu = dense_jacobians(model, inputs, self.params, self.max_memory)
                f_var = self.functional_covariance(Js) if joint else self.functional_variance(Js)
                f_mu = f_mu.flatten() if joint else f_mu
            else:
                f_mu, f_var = glm_moments(
                    model,
                    inputs,
                    self._jacobian_params,
                    self._covariance_rows_full,
                    joint=joint,
                    max_memory=self.max_memory,
                )
                f_mu = f_mu.flatten() if joint else f_mu
        if diagonal_output and not joint:
            f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
        return f_mu, f_var

    @property
    def _jacobian_params(self) -> list[Tensor]:
        """The parameters whose Jacobian the GLM predictive needs."""
        return self.params

    def _covariance_rows_full(self, rows: Tensor) -> Tensor:
        """:meth:`_covariance_rows` on rows over :attr:`_jacobian_params`."""
        return self._covariance_rows(rows)

    def __call__(
        self,
        x: Any,
        pred_type: str = "glm",
        joint: bool = False,
        link_approx: str = "probit",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The posterior predictive on inputs ``x``.

        Args:
            x: Inputs ``[batch, ...]`` or a dict of them.
            pred_type: ``"glm"`` (linearised model) or ``"nn"`` (sampled networks).
            joint: For regression with ``"glm"``: the covariance across all outputs of all
                samples ``[B C, B C]`` and the flattened mean.
            link_approx: ``"probit"``, ``"bridge"``, ``"bridge_norm"`` or ``"mc"`` (classification;
                ``"nn"`` needs ``"mc"``).
            n_samples: Samples for ``"mc"`` and ``"nn"``.
            diagonal_output: Use only the outputs' variances (``"glm"``).
            generator: Random numbers for the samples.
            fitting: For reward modeling: predict as classification (``True``) or regression.
            **model_kwargs: Passed to the model in the ``"nn"`` predictive.

        Returns:
            Class probabilities ``[B, C]``, or for regression ``(mean, variance)``.
        """
        pred_type, link_approx = _name(pred_type), _name(link_approx)
        if pred_type not in PRED_TYPES:
            raise ValueError(f"Only glm and nn supported as prediction types, got {pred_type!r}.")
        if link_approx not in LINK_APPROXIMATIONS:
            raise ValueError(f"Unsupported link approximation {link_approx!r}.")
        if pred_type == "nn" and link_approx != "mc":
            raise ValueError("Only mc link approximation is supported for nn prediction type.")
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device != self._device
        ):
            raise ValueError("Invalid random generator (check type and device).")
        likelihood = self._predictive_likelihood(fitting)
        if pred_type == "glm":
            return self._glm_forward(
                x, likelihood, joint, link_approx, n_samples, diagonal_output, generator
            )
        samples = self._nn_functional_samples(x, n_samples, generator, **model_kwargs)
        if likelihood == "regression":
            return samples.mean(dim=0), samples.var(dim=0)
        return torch.softmax(samples, dim=-1).mean(dim=0)

    def _glm_forward(
        self,
        x: Any,
        likelihood: str,
        joint: bool,
        link_approx: str,
        n_samples: int,
        diagonal_output: bool,
        generator: torch.Generator | None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        f_mu, f_var = self._glm_predictive_distribution(
            x, joint=joint and likelihood == "regression"
        )
        if likelihood == "regression":
            if diagonal_output and not joint:
                f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
            return f_mu, f_var
        return predict_classes(f_mu, f_var, link_approx, n_samples, diagonal_output, generator)

    def predictive(
        self, x: Any, pred_type: str, link_approx: str, n_samples: int
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The posterior predictive (:meth:`__call__` with these arguments)."""
        return self(x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples)

    def functional_samples(
        self,
        x: Any,
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples of the function values ``[n_samples, B, C]`` on inputs ``x``."""
        pred_type = _name(pred_type)
        if pred_type not in PRED_TYPES:
            raise ValueError("Only glm and nn supported as prediction types.")
        if pred_type == "nn":
            return self._nn_functional_samples(x, n_samples, generator)
        f_mu, f_var = self._glm_predictive_distribution(x)
        if diagonal_output:
            f_var = torch.diagonal(f_var, dim1=1, dim2=2)
        return normal_samples(f_mu, f_var, n_samples, generator)

    def predictive_samples(
        self,
        x: Any,
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples of the predictive ``[n_samples, B, C]``.

        The softmax of function samples for classification, the function samples for regression.
        """
        samples = self.functional_samples(x, pred_type, n_samples, diagonal_output, generator)
        if self._predictive_likelihood(fitting=False) == "regression":
            return samples
        return torch.softmax(samples, dim=-1)

    def _nn_functional_samples(
        self, X: Any, n_samples: int, generator: torch.Generator | None, **model_kwargs: Any
    ) -> Tensor:
        """The model's outputs at ``n_samples`` posterior draws, called functionally."""
        model, inputs = LaplaceData(self.model, self.dict_key_y, self._device).inputs(X)
        names = _param_names(model, self._sample_params)
        outputs = []
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            for draw in self.sample(n_samples, generator):
                values = _unflatten(draw, self._sample_params)
                args = (inputs,) if not isinstance(inputs, Mapping) else ()
                kwargs = dict(inputs) if isinstance(inputs, Mapping) else {}
                out = functional_call(
                    model, dict(zip(names, values, strict=False)), args, {**kwargs, **model_kwargs}
                )
                outputs.append(getattr(out, "logits", out))
        return torch.stack(outputs)

    @property
    def _sample_params(self) -> list[Tensor]:
        """The parameters that :meth:`sample` draws, in its order."""
        return self.params

    # -- hyperparameters ----------------------------------------------------------------------

    def optimize_prior_precision(
        self,
        pred_type: str = "glm",
        method: str = "marglik",
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: str = "scalar",
        val_loader: Iterable[Any] | None = None,
        loss: Any = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: str = "probit",
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Choose the prior precision by marginal likelihood or by a grid search.

        Args:
            pred_type: The predictive for the grid search, ``"glm"`` or ``"nn"``.
            method: ``"marglik"`` (Adam on the log prior precision) or ``"gridsearch"``.
            n_steps: Adam steps (``"marglik"``).
            lr: Adam's learning rate.
            init_prior_prec: The initial value (``"marglik"``).
            prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diag"`` for a scalar initial value.
            val_loader: Validation data (``"gridsearch"``).
            loss: The validation loss (:mod:`curvkit.laplace.tuning`); ``None`` for NLL/MSE.
            log_prior_prec_min: Lowest exponent of the grid.
            log_prior_prec_max: Highest exponent of the grid.
            grid_size: Grid points.
            link_approx: The link approximation of the grid search's predictions.
            n_samples: Samples for ``"mc"``/``"nn"`` predictions.
            verbose: Print the result.
            progress_bar: Show a progress bar.
            log_prior_prec_base: The base of the grid's exponents.
        """
        method, pred_type = _name(method), _name(pred_type)
        if pred_type not in PRED_TYPES:
            raise ValueError(f"pred_type must be one of {PRED_TYPES}, got {pred_type!r}")
        if method == "marglik":
            init = torch.as_tensor(init_prior_prec, device=self._device, dtype=self._dtype)
            self.prior_precision = init
            if len(self.prior_precision) == 1 and _name(prior_structure) != "scalar":
                self.prior_precision = prior.prior_precision_structure(
                    self.prior_precision.item(),
                    _name(prior_structure),
                    self.n_layers,
                    self.n_params,
                    self._device,
                    self._dtype,
                )
            self.prior_precision = tuning.optimize_marglik(
                self, self.prior_precision, n_steps, lr, progress_bar
            )
        elif method == "gridsearch":
            if val_loader is None:
                raise ValueError("gridsearch requires a validation set DataLoader")
            grid = torch.logspace(
                log_prior_prec_min, log_prior_prec_max, grid_size, base=log_prior_prec_base
            )

            def predict(x: Any) -> Any:
                return self(
                    x,
                    pred_type=pred_type,
                    link_approx=link_approx,
                    n_samples=n_samples,
                    fitting=True,
                )

            self.prior_precision = tuning.gridsearch(
                self, grid, val_loader, loss, predict, progress_bar
            )
        else:
            raise ValueError(f"method must be 'marglik' or 'gridsearch', got {method!r}")
        if verbose:
            print(f"Optimized prior precision is {self.prior_precision}.")

    # -- persistence --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The fitted state (laplace-torch's keys), for :meth:`load_state_dict`."""
        self._check_H_init()
        return {
            "mean": self.mean,
            "H": self.H,
            "loss": self.loss,
            "prior_mean": self.prior_mean,
            "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise,
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "likelihood": self.likelihood,
            "temperature": self.temperature,
            "enable_backprop": self.enable_backprop,
            "cls_name": type(self).__name__,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted state from :meth:`state_dict`.

        Raises:
            ValueError: For another class, another number of parameters or another likelihood.
        """
        if type(self).__name__ != state_dict["cls_name"]:
            raise ValueError(
                f"Loading a {state_dict['cls_name']} state into a {type(self).__name__}: make sure "
                "`subset_of_weights` and `hessian_structure` are the same."
            )
        if len(state_dict["mean"]) != self.n_params:
            raise ValueError(
                f"The state has {len(state_dict['mean'])} parameters, this approximation "
                f"{self.n_params}: use the same subset_of_weights and requires_grad switches."
            )
        if self.likelihood != state_dict["likelihood"]:
            raise ValueError("Different likelihoods detected!")
        for key in ("mean", "H", "loss", "n_data", "n_outputs", "temperature", "enable_backprop"):
            setattr(self, key, state_dict[key])
        self.prior_mean = state_dict["prior_mean"]
        self.prior_precision = state_dict["prior_precision"]
        self.sigma_noise = state_dict["sigma_noise"]
        self._fitted = True


BaseLaplace = ParametricLaplace


def _equals_one(value: float | Tensor) -> bool:
    return bool(torch.all(torch.as_tensor(value) == 1))


def _param_names(model: nn.Module, params: list[Tensor]) -> list[str]:
    """The qualified names of ``params`` in ``model`` (for :func:`torch.func.functional_call`)."""
    by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    return [by_id[id(p)] for p in params]


def _unflatten(vector: Tensor, params: list[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for p in params:
        out.append(vector[start : start + p.numel()].view_as(p))
        start += p.numel()
    return out
