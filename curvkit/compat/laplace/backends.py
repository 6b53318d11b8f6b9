r"""CurvkitGGN, CurvkitEF, CurvkitHessian: laplace-torch's curvature backends on curvkit.

laplace-torch asks its backend, per batch ``(x, y)`` of :math:`M` of the :math:`N` data points,
for ``(loss, H)`` with the loss summed over the batch and both multiplied by its likelihood
factor :math:`c` (1 for classification with the cross-entropy, 1/2 for regression with the
squared error, so that :math:`c\,\ell` is the negative log-likelihood of a unit Gaussian):

- ``full``: the dense curvature :math:`c\, G` of the batch (:func:`curvkit.ggn_matrix`; the
  Monte-Carlo Fisher through :class:`curvkit.GGNOperator` with ``stochastic=True``);
- ``diag``: its diagonal (:func:`curvkit.diag_ggn`, exact or Monte-Carlo);
- ``kron``: laplace-torch's ``Kron`` from :class:`curvkit.KFACOperator`
  (:mod:`curvkit.compat.laplace.kron`), with the exact block of every parameter that has no
  Kronecker factors;
- ``gradients``: the per-sample gradients ``[M, P]`` (:func:`curvkit.batch_gradients`);
- ``jacobians``: ``[M, C, P]`` under a memory budget (:mod:`curvkit.compat.laplace.jacobians`);
- ``eig_lowrank``: the top ``low_rank`` eigenpairs of the whole data's GGN
  (:func:`curvkit.ggn_eigh`), eigenvalues above laplace-torch's threshold ``1e-6``.

With ``last_layer=True`` laplace-torch hands a ``FeatureExtractor`` and the curvature is over
the last layer's parameters; with ``subnetwork_indices`` it is the sub-matrix over those entries
of the flat parameter vector.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import torch
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils import Likelihood
from torch import Tensor, nn

import curvkit
from curvkit.compat.laplace.jacobians import check_jacobians, jacobians
from curvkit.compat.laplace.kron import CurvkitKron, kron_from_kfac

__all__ = ["CurvkitEF", "CurvkitGGN", "CurvkitHessian"]

#: laplace-torch's threshold on the eigenvalues kept by ``eig_lowrank``.
LOW_RANK_EPS = 1e-6

Inputs = Tensor | MutableMapping[str, Any]


def _flat(tensors: Iterable[Tensor], leading: int = 0) -> Tensor:
    return torch.cat([t.reshape(*t.shape[:leading], -1) for t in tensors], dim=-1)


class _MappingInput(nn.Module):
    """Calls the wrapped model with its keyword inputs as one dict, as laplace-torch does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> Any:
        """Return ``model(inputs)``."""
        return self.model(inputs)


class _CurvkitInterface(CurvatureInterface):
    """What the three backends share: the batch, the parameters, the loss and the Jacobians."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        *,
        low_rank: int = 10,
        max_memory: int | None = None,
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        if isinstance(low_rank, bool) or not isinstance(low_rank, int) or low_rank < 1:
            raise ValueError(f"low_rank must be a positive int, got {low_rank!r}")
        self.low_rank = low_rank
        self.max_memory = max_memory

    def _args(self, x: Inputs, y: Tensor) -> tuple[nn.Module, nn.Module, tuple[Any, Tensor]]:
        """``(model, loss_fn, (inputs, targets))`` for curvkit's functions on one batch.

        laplace-torch calls ``model(x)`` with a dict batch as one positional input, and reads
        its inputs under ``dict_key_x`` (a ``KeyError`` where they are not); curvkit takes a
        dict as keyword inputs, hence the adapter.
        """
        if isinstance(x, MutableMapping):
            x[self.dict_key_x]
            return _MappingInput(self.model), self.lossfunc, (dict(x), y)
        return self.model, self.lossfunc, (x, y)

    def _loss(self, x: Inputs, y: Tensor) -> Tensor:
        with torch.no_grad():
            return self.factor * self.lossfunc(self.model(x), y)

    def _select(self, flat: Tensor) -> Tensor:
        """The subnetwork's entries of a flat vector, rows or matrix (last axis)."""
        if self.subnetwork_indices is None:
            return flat
        return flat[..., self.subnetwork_indices]

    def _dense_subnetwork(self, x: Inputs, y: Tensor) -> Tensor:
        """The GGN's rows and columns at the subnetwork's indices, column by column."""
        indices = self.subnetwork_indices.tolist()
        columns = curvkit.ggn_columns(*self._args(x, y), params=self.params, indices=indices)
        return torch.stack([column for _, column in columns], dim=1)[indices]

    def jacobians(self, x: Inputs, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Jacobians ``[B, C, P]`` of the outputs and the outputs ``[B, C]``, under the budget.

        Args:
            x: The inputs.
            enable_backprop: Keep the graph to the inputs (through laplace-torch's
                :mod:`torch.func` path, after the same memory check).

        Returns:
            ``(Js, f)``.

        Raises:
            MemoryPlanError: If the Jacobians exceed ``max_memory`` (the message gives the
                estimate), checked before they are allocated.
        """
        if enable_backprop or self.subnetwork_indices is not None:
            with torch.no_grad():
                outputs = self.model(x)
            num_params = (
                len(self.subnetwork_indices)
                if self.subnetwork_indices is not None
                else sum(p.numel() for p in self.params)
            )
            check_jacobians(outputs, num_params, self.max_memory)
            return super().jacobians(x, enable_backprop=enable_backprop)
        model, _, (inputs, _) = self._args(x, torch.empty(0))
        return jacobians(model, inputs, self.params, self.max_memory)

    def last_layer_jacobians(
        self, x: Inputs, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """laplace-torch's closed-form last-layer Jacobians, after the memory check.

        Args:
            x: The inputs.
            enable_backprop: Keep the graph to the inputs.

        Returns:
            ``(Js, f)``, ``Js`` of shape ``[B, C, P_last]``.
        """
        with torch.no_grad():
            outputs = self.model(x)
        num_params = sum(p.numel() for p in self.model.last_layer.parameters())
        check_jacobians(outputs, num_params, self.max_memory)
        return super().last_layer_jacobians(x, enable_backprop=enable_backprop)

    def gradients(self, x: Inputs, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gradients ``[B, P]`` of the summed loss and the loss (without factor).

        Args:
            x: The inputs.
            y: The targets.

        Returns:
            ``(Gs, loss)``.
        """
        grads = curvkit.batch_gradients(*self._args(x, y), params=self.params)
        with torch.no_grad():
            loss = self.lossfunc(self.model(x), y)
        return self._select(_flat(grads, leading=1)), loss

    def _kfac(self, x: Inputs, y: Tensor, N: int, fisher_type: str, **kwargs: Any) -> CurvkitKron:
        operator = curvkit.KFACOperator(
            *self._args(x, y),
            params=self.params,
            fisher_type=fisher_type,
            fallback="block",
            **kwargs,
        )
        return kron_from_kfac(operator, self.factor, len(y) / N)


def _kfac_options(kwargs: dict[str, Any], stochastic: bool) -> dict[str, Any]:
    """The options of ``kron`` that :class:`curvkit.KFACOperator` takes (laplace-torch's)."""
    options = {k: v for k, v in kwargs.items() if k in ("mc_samples", "kfac_approx")}
    if not stochastic:
        options.pop("mc_samples", None)
    return options


class CurvkitGGN(_CurvkitInterface, GGNInterface):
    """The GGN (``stochastic=True``: the Monte-Carlo Fisher) for laplace-torch, from curvkit.

    Args:
        model: The model (laplace-torch's ``FeatureExtractor`` for last-layer Laplace).
        likelihood: ``"classification"`` or ``"regression"``.
        last_layer: Only the last layer's parameters.
        subnetwork_indices: Entries of the flat parameter vector to restrict to.
        dict_key_x: The inputs' key in a dict batch.
        dict_key_y: The targets' key in a dict batch.
        stochastic: Monte-Carlo Fisher (``num_samples`` targets per input) instead of the GGN.
        low_rank: The number of eigenpairs of ``eig_lowrank`` (for ``LowRankLaplace``).
        max_memory: Budget in bytes of the Jacobians, the diagonal, the dense GGN and the
            eigenpairs (``None``: half the available memory, :mod:`curvkit.engines.memory`).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        *,
        num_samples: int = 1,
        low_rank: int = 10,
        max_memory: int | None = None,
    ) -> None:
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            low_rank=low_rank,
            max_memory=max_memory,
        )
        self.stochastic = stochastic
        self.num_samples = num_samples

    @property
    def _mc_samples(self) -> int:
        return self.num_samples if self.stochastic else 0

    def full(self, x: Inputs, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(c * loss, c * G)`` of the batch, ``G`` ``[P, P]`` (sub-matrix for a subnetwork)."""
        args = self._args(x, y)
        if self.stochastic:
            operator = curvkit.GGNOperator(*args, params=self.params, mc_samples=self.num_samples)
            ggn = self._select(self._select(operator.to_dense()).T)
        elif self.subnetwork_indices is not None:
            ggn = self._dense_subnetwork(x, y)
        else:
            ggn = curvkit.ggn_matrix(*args, params=self.params, max_memory=self.max_memory)
        return self._loss(x, y), self.factor * ggn

    def diag(self, x: Inputs, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(c * loss, c * diag G)`` of the batch (Monte-Carlo with ``stochastic=True``)."""
        diagonal = curvkit.diag_ggn(
            *self._args(x, y),
            params=self.params,
            mc_samples=self._mc_samples,
            max_memory=self.max_memory,
        )
        return self._loss(x, y), self.factor * self._select(_flat(diagonal))

    def kron(self, x: Inputs, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, CurvkitKron]:
        """``(c * loss, Kron)`` of the batch in laplace-torch's layout and scaling.

        ``kwargs`` may hold ``mc_samples`` (with ``stochastic=True``) and ``kfac_approx``
        (``"expand"`` or ``"reduce"``), as laplace-torch's ``asdl_fisher_kwargs`` pass them.
        """
        fisher_type = "mc" if self.stochastic else "exact"
        kron = self._kfac(x, y, N, fisher_type, **_kfac_options(kwargs, self.stochastic))
        return self._loss(x, y), kron

    def eig_lowrank(self, data_loader: Iterable[Any]) -> tuple[Tensor, Tensor, Tensor]:
        """The top ``low_rank`` eigenpairs of the data's GGN (times ``c``) and ``c * loss``.

        Args:
            data_loader: The training batches ``(x, y)``.

        Returns:
            ``(eigenvectors [P, K], c * eigenvalues [K], c * loss)``, eigenvalues ascending and
            above ``1e-6`` (laplace-torch's threshold).
        """
        device = next(self.model.parameters()).device
        batches = [(x.to(device), y.to(device)) for x, y in data_loader]
        groups = [{"params": self.params, "criterion": curvkit.top_k(self.low_rank)}]
        ((values, vectors),) = curvkit.ggn_eigh(
            self.model,
            self.lossfunc,
            batches,
            groups,
            mc_samples=self._mc_samples,
            max_memory=self.max_memory,
        )
        keep = values > LOW_RANK_EPS
        vectors = _flat(vectors, leading=1).T[:, keep]
        loss = sum(self._loss(x, y) for x, y in batches)
        return vectors, self.factor * values[keep], loss


class CurvkitEF(_CurvkitInterface, EFInterface):
    """The empirical Fisher for laplace-torch, from curvkit (``CurvlinopsEF``'s constructor)."""

    def full(self, x: Inputs, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(c * loss, c * sum_n g_n g_n^T)`` of the batch."""
        grads, _ = self.gradients(x, y)
        return self._loss(x, y), self.factor * (grads.T @ grads)

    def diag(self, x: Inputs, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(c * loss, c * sum_n g_n^2)`` of the batch."""
        if self.subnetwork_indices is not None:
            grads, _ = self.gradients(x, y)
            return self._loss(x, y), self.factor * grads.square().sum(0)
        diagonal = curvkit.diag_ef(*self._args(x, y), params=self.params)
        return self._loss(x, y), self.factor * _flat(diagonal)

    def kron(self, x: Inputs, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, CurvkitKron]:
        """``(c * loss, Kron)`` of the empirical Fisher's KFAC, in laplace-torch's scaling."""
        kron = self._kfac(x, y, N, "empirical", **_kfac_options(kwargs, False))
        return self._loss(x, y), kron


class CurvkitHessian(_CurvkitInterface):
    """The Hessian for laplace-torch, from curvkit (``CurvlinopsHessian``'s constructor)."""

    def full(self, x: Inputs, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(c * loss, c * H)`` of the batch."""
        hessian = curvkit.hessian_matrix(*self._args(x, y), params=self.params)
        hessian = self._select(self._select(hessian).T)
        return self._loss(x, y), self.factor * hessian

    def diag(self, x: Inputs, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(c * loss, c * diag H)`` of the batch."""
        diagonal = curvkit.diag_hessian(*self._args(x, y), params=self.params)
        return self._loss(x, y), self.factor * self._select(_flat(diagonal))
