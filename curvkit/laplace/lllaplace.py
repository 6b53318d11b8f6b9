"""Last-layer Laplace approximations: the posterior over the last Linear layer only.

The curvature is the exact block of the last layer's parameters (curvkit's ``params``), the GLM
predictive's Jacobian that of the last layer, pushed back by curvkit's engine from the outputs
to that layer only. The rest of the network is a fixed feature map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional

from curvkit.core.model_io import call_model, output_tensor
from curvkit.laplace.baselaplace import ParametricLaplace
from curvkit.laplace.data import LaplaceData
from curvkit.laplace.lastlayer import find_last_layer, linear_layer
from curvkit.laplace.modes import eval_mode
from curvkit.laplace.structures import DiagLaplace, FullLaplace, KronLaplace

__all__ = ["DiagLLLaplace", "FullLLLaplace", "KronLLLaplace", "LLLaplace"]

FEATURE_REDUCTIONS = ("pick_first", "pick_last", "average")


class LLLaplace(ParametricLaplace):
    """Base class of the last-layer Laplace approximations.

    Args:
        model: The network; its last module to run must be a ``torch.nn.Linear``. Not copied and
            not changed.
        likelihood: As :class:`~curvkit.laplace.baselaplace.ParametricLaplace`.
        feature_reduction: Accepted for laplace-torch compatibility (``"pick_first"``,
            ``"pick_last"``, ``"average"``); the Jacobian here comes from the model itself, so
            whatever reduction the model applies is exact.
        last_layer_name: The last layer's name; ``None`` to find it on the first batch of
            :meth:`fit`.
        **kwargs: As :class:`~curvkit.laplace.baselaplace.ParametricLaplace` (positionally:
            ``sigma_noise, prior_precision, prior_mean, temperature, enable_backprop``).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: Any = None,
        last_layer_name: str | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        max_memory: int | None = None,
    ) -> None:
        if asdl_fisher_kwargs is not None:
            raise ValueError("Last-layer Laplace does not support asdl_fisher_kwargs.")
        reduction = getattr(feature_reduction, "value", feature_reduction)
        if reduction is not None and reduction not in FEATURE_REDUCTIONS:
            raise ValueError(f"feature_reduction must be None or one of {FEATURE_REDUCTIONS}")
        self._last_layer_name = last_layer_name
        self.last_layer = None if last_layer_name is None else linear_layer(model, last_layer_name)
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
            max_memory=max_memory,
        )
        self._pending_prior = (prior_precision, prior_mean)
        if self.last_layer is not None:
            self._set_prior()

    def _select_params(self) -> list[Tensor]:
        return [] if self.last_layer is None else list(self.last_layer.parameters())

    def _init_H(self) -> None:
        if self.last_layer is None:
            self.H = None
        else:
            super()._init_H()

    def _set_prior(self) -> None:
        self.params = list(self.last_layer.parameters())
        self.n_params = sum(p.numel() for p in self.params)
        self.n_layers = len(self.params)
        self.prior_precision, self.prior_mean = self._pending_prior
        self.mean = self.prior_mean
        self._init_H()

    def fit(self, train_loader: Any, override: bool = True, progress_bar: bool = False) -> None:
        """Fit on the last layer (found on the first batch if not named); ``override`` only."""
        if not override:
            raise ValueError("Last-layer Laplace approximations do not support `override=False`.")
        if self.last_layer is None:
            model, batches = LaplaceData(self.model, self.dict_key_y, self._device).loader(
                train_loader
            )
            inputs, _ = next(iter(batches))
            self._last_layer_name = find_last_layer(self.model, model, inputs)
            self.last_layer = linear_layer(self.model, self._last_layer_name)
            self._set_prior()
        super().fit(train_loader, override=override, progress_bar=progress_bar)

    def _nn_functional_samples(
        self, X: Any, n_samples: int, generator: torch.Generator | None, **model_kwargs: Any
    ) -> Tensor:
        """Features once, then the last layer with each sampled weight (if it is the output)."""
        model, inputs = LaplaceData(self.model, self.dict_key_y, self._device).inputs(X)
        seen: dict[str, Tensor] = {}

        def record(_: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            seen["features"], seen["out"] = args[0], out

        if model_kwargs:
            return super()._nn_functional_samples(X, n_samples, generator, **model_kwargs)
        handle = self.last_layer.register_forward_hook(record)
        try:
            with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
                out = output_tensor(call_model(model, inputs))
        finally:
            handle.remove()
        if "out" not in seen or seen["out"].shape != out.shape or not torch.equal(seen["out"], out):
            return super()._nn_functional_samples(X, n_samples, generator, **model_kwargs)
        features = seen["features"]
        outputs = []
        for draw in self.sample(n_samples, generator):
            weight = draw[: self.last_layer.weight.numel()].view_as(self.last_layer.weight)
            bias = None
            if self.last_layer.bias is not None:
                bias = draw[self.last_layer.weight.numel() :]
            outputs.append(functional.linear(features, weight, bias))
        return torch.stack(outputs)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        state = super().state_dict()
        state["_last_layer_name"] = self._last_layer_name
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        name = state_dict["_last_layer_name"]
        if self._last_layer_name is not None and self._last_layer_name != name:
            raise ValueError("Different `last_layer_name` detected!")
        if self.last_layer is None:
            self._last_layer_name = name
            self.last_layer = linear_layer(self.model, name)
            self._set_prior()
        super().load_state_dict(state_dict)


class FullLLLaplace(LLLaplace, FullLaplace):
    """Last-layer Laplace approximation with a dense posterior precision."""

    _key = ("last_layer", "full")


class KronLLLaplace(LLLaplace, KronLaplace):
    """Last-layer Laplace approximation with Kronecker-factored blocks.

    Args:
        damping: As :class:`~curvkit.laplace.structures.KronLaplace`.
    """

    _key = ("last_layer", "kron")

    def __init__(
        self, model: nn.Module, likelihood: str, *args: Any, damping: bool = False, **kwargs: Any
    ) -> None:
        LLLaplace.__init__(self, model, likelihood, *args, **kwargs)
        self.damping = damping


class DiagLLLaplace(LLLaplace, DiagLaplace):
    """Last-layer Laplace approximation with a diagonal posterior precision."""

    _key = ("last_layer", "diag")
