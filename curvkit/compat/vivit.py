r"""ViViT-compatible computations on BackPACK: drop-in replacements that run on torch 2.

ViViT (``vivit-for-pytorch``) computes GGN eigenpairs, directional derivatives and damped Newton
steps inside BackPACK's backward pass, but calls ``Tensor.symeig``, which torch 2 removed. The
classes here keep ViViT's protocol and signatures, so that ViViT code runs with only its import
changed::

    computation = DirectionalDampedNewtonComputation()
    group = {"params": params, "criterion": select, "damping": damping}
    with backpack(*computation.get_extensions(),
                  extension_hook=computation.get_extension_hook([group])):
        loss.backward()
    step = computation.get_result(group)

BackPACK's extensions (``SqrtGGNExact``/``SqrtGGNMC`` for the GGN's square root, ``BatchGrad``
for the per-sample gradients) produce the factors; the extension hook turns each parameter's
factors into its Gram blocks as soon as BackPACK has processed the parameter, and runs a group's
computation once all its parameters are done. The mathematics is curvkit's own
(:mod:`curvkit.quantities.gram_eigen`), shared with the functional API
(:mod:`curvkit.quantities.directional`), which needs neither BackPACK nor ``extend()`` and is
faster.

As in ViViT: results are keyed by the group dict's identity, and the hook deletes the BackPACK
quantities it consumed from the parameters. Beyond ViViT: ``reduction="sum"`` works as well as
``"mean"`` (ViViT documents ``"mean"`` only; BackPACK's factors carry the reduction, and the
conventions of :mod:`curvkit.quantities.gram_eigen` hold for both, with the same results as the
functional API), ``"damping"`` may also be a number, Monte-Carlo directional derivatives accept any
number of samples, eigenvalues that are numerically zero give zero directions instead of a division
by zero, and invalid groups or criterion results raise clear errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    from backpack.extensions import BatchGrad, SqrtGGNExact, SqrtGGNMC
    from backpack.extensions.backprop_extension import BackpropExtension
except ImportError as error:
    # BackPACK is an optional extra: name the install that fixes it, and keep the original
    # error (a missing package, or a BackPACK that fails to import) as the cause.
    raise ImportError(
        "curvkit.compat.vivit (EighComputation, EigvalshComputation, "
        "DirectionalDerivativesComputation, DirectionalDampedNewtonComputation) needs BackPACK: "
        'install it with `pip install "curvkit[vivit]"` (or `pip install backpack-for-pytorch`). '
        "The rest of curvkit works without it."
    ) from error

from curvkit.core.groups import REQUIRED, normalize_param_groups
from curvkit.engines.factor import DenseFactor
from curvkit.losses import check_mc_samples
from curvkit.quantities.factor_products import normalized_products
from curvkit.quantities.gram_eigen import (
    GramDirections,
    damped_newton_step_coefficients,
    directional_curvatures,
    directional_gradients,
    gram_directions,
)

__all__ = [
    "DirectionalDampedNewtonComputation",
    "DirectionalDerivativesComputation",
    "EighComputation",
    "EigvalshComputation",
]


def _sqrt_ggn_extension(subsampling: list[int] | None, mc_samples: int) -> BackpropExtension:
    check_mc_samples(mc_samples)
    if mc_samples == 0:
        return SqrtGGNExact(subsampling=subsampling)
    return SqrtGGNMC(mc_samples=mc_samples, subsampling=subsampling)


def _check_subsampling(subsampling: Sequence[int] | None, name: str) -> list[int] | None:
    if subsampling is None:
        return None
    indices = list(subsampling)
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
        raise ValueError(
            f"{name} must be None or a non-empty list of sample indices, got {indices}"
        )
    if len(set(indices)) != len(indices):
        raise ValueError(f"{name} holds repeated indices {indices}: list each sample once")
    return indices


class _GroupsComputation:
    """Shared machinery: group validation, the per-parameter hook, group completion."""

    #: Group options each subclass requires, besides ``"params"``.
    _required_options: tuple[str, ...] = ()

    def __init__(
        self,
        subsampling_ggn: Sequence[int] | None,
        subsampling_grad: Sequence[int] | None,
        mc_samples: int,
        verbose: bool,
        warn_small_eigvals: float,
        with_gradients: bool,
    ) -> None:
        self._subsampling_ggn = _check_subsampling(subsampling_ggn, "subsampling")
        self._subsampling_grad = _check_subsampling(subsampling_grad, "subsampling_grad")
        self._sqrt_extension = _sqrt_ggn_extension(self._subsampling_ggn, mc_samples)
        self._grad_extension = BatchGrad(subsampling=self._subsampling_grad)
        self._with_gradients = with_gradients
        self._verbose = verbose
        self._warn_small_eigvals = warn_small_eigvals
        self._results: dict[int, Any] = {}

    def get_extensions(self) -> list[BackpropExtension]:
        """Return the BackPACK extensions to pass to ``with backpack(...)``.

        Returns:
            The square-root GGN extension, preceded by ``BatchGrad`` where gradients are needed.
        """
        if self._with_gradients:
            return [self._grad_extension, self._sqrt_extension]
        return [self._sqrt_extension]

    def get_extension_hook(self, param_groups: list[dict[str, Any]]) -> Callable[[nn.Module], None]:
        """Return the hook to pass as ``with backpack(..., extension_hook=hook)``.

        Args:
            param_groups: Group dicts as for ``torch.optim``; each is one diagonal GGN block.
                ``"params"`` is required, and ``"criterion"`` (a function from the ascending
                Gram eigenvalues to the indices to keep) and ``"damping"`` (a number or a
                function ``(evals, evecs, gammas, lambdas) -> Tensor [K]``) where the
                computation needs them. Other keys (an optimizer's ``"lr"``) are ignored.

        Returns:
            The extension hook. After the backward pass, :meth:`get_result` gives each group's
            result.

        Raises:
            ValueError: If a group lacks a required key, a parameter is in two groups, or a
                parameter does not require grad.
        """
        param_groups = list(param_groups)
        extra = {key: None for group in param_groups for key in group}
        extra.pop("params", None)
        defaults = {**extra, **dict.fromkeys(self._required_options, REQUIRED)}
        groups = normalize_param_groups(param_groups, None, defaults)
        pending = {
            id(user_group): {id(p) for p in group["params"]}
            for user_group, group in zip(param_groups, groups, strict=True)
        }
        group_of = {
            id(p): (id(user_group), group)
            for user_group, group in zip(param_groups, groups, strict=True)
            for p in group["params"]
        }
        partial: dict[int, dict[str, Any]] = {}
        batch_size: list[int] = []

        def extension_hook(module: nn.Module) -> None:
            if not batch_size and hasattr(module, "input0"):
                batch_size.append(module.input0.shape[0])
            for param in module.parameters(recurse=False):
                if id(param) not in group_of:
                    continue
                key, group = group_of[id(param)]
                if id(param) not in pending[key]:
                    continue
                if self._verbose:
                    print(f"curvkit: Gram blocks of parameter {tuple(param.shape)} ({module})")
                self._accumulate(partial.setdefault(key, {}), param)
                pending[key].discard(id(param))
                if not pending[key]:
                    if self._verbose:
                        print(f"curvkit: computing the result of group {key}")
                    self._results[key] = self._finish(partial.pop(key), group, batch_size[0])

        return extension_hook

    def get_result(self, group: dict[str, Any]) -> Any:
        """Return a group's result, after the backward pass.

        Args:
            group: The group dict, as passed to :meth:`get_extension_hook`.

        Returns:
            The group's result (see the subclass).

        Raises:
            KeyError: If there is no result for the group (not passed to the hook, or the
                backward pass did not reach all its parameters).
        """
        try:
            return self._results[id(group)]
        except KeyError:
            raise KeyError(
                "No results available for this group: pass it to get_extension_hook and run "
                "the backward pass inside `with backpack(...)` before asking for its result"
            ) from None

    def _accumulate(self, partial: dict[str, Any], param: Tensor) -> None:
        savefield = self._sqrt_extension.savefield
        sqrt = DenseFactor(getattr(param, savefield), param.shape)
        partial["gram"] = partial.get("gram", 0) + sqrt.gram()
        if self._keeps_factors():
            partial.setdefault("factors", {})[id(param)] = sqrt
        if self._with_gradients:
            grads = getattr(param, self._grad_extension.savefield)
            cross = sqrt.t_mat(grads).permute(2, 0, 1)
            partial["grad_gram"] = partial.get("grad_gram", 0) + cross
            delattr(param, self._grad_extension.savefield)
        delattr(param, savefield)

    def _keeps_factors(self) -> bool:
        return False

    def _directions(self, partial: dict[str, Any], group: dict[str, Any], n: int) -> GramDirections:
        return gram_directions(
            partial["gram"], n, group["criterion"], warn_below=self._warn_small_eigvals
        )

    def _finish(self, partial: dict[str, Any], group: dict[str, Any], batch_size: int) -> Any:
        raise NotImplementedError


class _SpectrumComputation(_GroupsComputation):
    """ViViT's signature for the computations of the GGN's spectrum alone (no gradients)."""

    def __init__(
        self,
        subsampling: list[int] | None = None,
        mc_samples: int = 0,
        verbose: bool = False,
        warn_small_eigvals: float = 1e-4,
    ) -> None:
        super().__init__(subsampling, None, mc_samples, verbose, warn_small_eigvals, False)

    def get_extension(self) -> BackpropExtension:
        """Return the BackPACK extension (ViViT's singular form)."""
        return self._sqrt_extension


class _DerivativesComputation(_GroupsComputation):
    """ViViT's signature for the computations that also need per-sample gradients."""

    def __init__(
        self,
        subsampling_grad: list[int] | None = None,
        subsampling_ggn: list[int] | None = None,
        mc_samples_ggn: int = 0,
        verbose: bool = False,
        warn_small_eigvals: float = 1e-4,
    ) -> None:
        super().__init__(
            subsampling_ggn, subsampling_grad, mc_samples_ggn, verbose, warn_small_eigvals, True
        )


class EigvalshComputation(_SpectrumComputation):
    """GGN eigenvalues of each group's block, ViViT's ``EigvalshComputation`` on torch 2.

    ``get_result(group)`` returns all eigenvalues of the
    group's Gram matrix (the GGN's nonzero eigenvalues and zeros), ascending.

    Args:
        subsampling: Indices of the samples forming the GGN; ``None`` for all.
        mc_samples: ``0`` for the exact GGN, else the number of Monte-Carlo samples.
        verbose: Print what happens during the backward pass.
        warn_small_eigvals: Unused (no eigenvectors); kept for ViViT's signature.
    """

    def _finish(self, partial: dict[str, Any], group: dict[str, Any], batch_size: int) -> Tensor:
        gram = partial["gram"]
        size = gram.shape[0] * gram.shape[1]
        matrix = (batch_size / gram.shape[1]) * gram.reshape(size, size)
        return torch.linalg.eigvalsh(0.5 * (matrix + matrix.T))


class EighComputation(_SpectrumComputation):
    """Selected GGN eigenpairs of each group's block, ViViT's ``EighComputation`` on torch 2.

    Groups need ``"criterion"``. ``get_result(group)``
    returns ``(evals, evecs)``: the selected eigenvalues ``[K]`` and unit eigenvectors as one
    tensor ``[K, *p.shape]`` per parameter.

    Args:
        subsampling: Indices of the samples forming the GGN; ``None`` for all.
        mc_samples: ``0`` for the exact GGN, else the number of Monte-Carlo samples.
        verbose: Print what happens during the backward pass.
        warn_small_eigvals: Warn if a selected eigenvalue's magnitude is below this value.
    """

    _required_options = ("criterion",)

    def _keeps_factors(self) -> bool:
        return True

    def _finish(
        self, partial: dict[str, Any], group: dict[str, Any], batch_size: int
    ) -> tuple[Tensor, list[Tensor]]:
        directions = self._directions(partial, group, batch_size)
        factors = [partial["factors"][id(p)] for p in group["params"]]
        return directions.evals, normalized_products(factors, directions.evec_coefficients())


class DirectionalDerivativesComputation(_DerivativesComputation):
    r"""Per-sample directional derivatives along GGN eigenvectors, ViViT's class on torch 2.

    Groups need ``"criterion"``. ``get_result(group)``
    returns ``(gammas, lambdas)``: :math:`\gamma_{n,k} = N \nabla L_n^\top e_k` ``[N_grad, K]``
    and :math:`\lambda_{n,k} = N e_k^\top G(L_n) e_k` ``[N_ggn, K]`` (see
    :mod:`curvkit.quantities.gram_eigen`).

    Args:
        subsampling_grad: Indices of the samples for the gradients; ``None`` for all.
        subsampling_ggn: Indices of the samples forming the GGN; ``None`` for all.
        mc_samples_ggn: ``0`` for the exact GGN, else the number of Monte-Carlo samples.
        verbose: Print what happens during the backward pass.
        warn_small_eigvals: Warn if a selected eigenvalue's magnitude is below this value.
    """

    _required_options = ("criterion",)

    def _finish(
        self, partial: dict[str, Any], group: dict[str, Any], batch_size: int
    ) -> tuple[Tensor, Tensor]:
        directions = self._directions(partial, group, batch_size)
        gammas = directional_gradients(directions, partial["grad_gram"])
        return gammas, directional_curvatures(directions)


class DirectionalDampedNewtonComputation(_DerivativesComputation):
    """Directionally damped Newton steps, ViViT's class on torch 2.

    Groups need ``"criterion"`` and ``"damping"``.
    ``get_result(group)`` returns the step as one tensor per parameter of the group.

    Args:
        subsampling_grad: Indices of the samples for the gradient; ``None`` for all.
        subsampling_ggn: Indices of the samples forming the GGN; ``None`` for all.
        mc_samples_ggn: ``0`` for the exact GGN, else the number of Monte-Carlo samples.
        verbose: Print what happens during the backward pass.
        warn_small_eigvals: Warn if a selected eigenvalue's magnitude is below this value.
    """

    _required_options = ("criterion", "damping")

    def _keeps_factors(self) -> bool:
        return True

    def _finish(
        self, partial: dict[str, Any], group: dict[str, Any], batch_size: int
    ) -> list[Tensor]:
        directions = self._directions(partial, group, batch_size)
        coefficients = damped_newton_step_coefficients(
            directions, partial["grad_gram"], group["damping"]
        )
        return [partial["factors"][id(p)].mat(coefficients)[0] for p in group["params"]]
