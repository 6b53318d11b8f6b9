"""Optimizers that differentiate the loss themselves: the MultiOptimizer interface.

A :class:`MultiOptimizer` takes the loss and a dict name -> parameter, and either updates the
parameters in place (:meth:`~MultiOptimizer.step`) or returns their updated values with
autograd's graph kept (:meth:`~MultiOptimizer.get_step`), for differentiating through the
update. Second-order optimizers such as :class:`~curvkit.optim.Newton` need this interface;
first-order torch optimizers fit it through :class:`PerParamMultiOptimizer`, and
:class:`MixedMultiOptimizer` gives each parameter the optimizer that suits it.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from curvkit.optim.per_param import PerParamOptim
from curvkit.optim.pyro_optim import PyroOptim


def check_loss(loss: Tensor) -> None:
    """Check that ``loss`` is a scalar tensor that can be differentiated.

    Args:
        loss: The loss given to a :class:`MultiOptimizer`.

    Raises:
        TypeError: If ``loss`` is not a tensor.
        ValueError: If ``loss`` is not a scalar or has no graph.
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a tensor, got {type(loss).__name__}.")
    if loss.numel() != 1:
        raise ValueError(
            f"loss must be a scalar, got shape {tuple(loss.shape)}: reduce it, e.g. with .sum()."
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss does not require grad: compute it from the parameters with autograd enabled."
        )


def check_params(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Check that ``params`` is a dict name -> tensor.

    Args:
        params: The parameters given to a :class:`MultiOptimizer`.

    Returns:
        ``params`` as a dict.

    Raises:
        TypeError: If ``params`` is not a mapping of strings to tensors.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> tensor, got {type(params).__name__}.")
    for name, value in params.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise TypeError(
                f"params must map names (str) to tensors, got {name!r} -> {type(value).__name__}."
            )
    return dict(params)


def gradients(loss: Tensor, params: Mapping[str, Tensor], *, create_graph: bool) -> list[Tensor]:
    """Gradients of ``loss`` with respect to each parameter, leaving the loss's graph intact.

    Args:
        loss: A scalar loss.
        params: A dict name -> tensor that the loss depends on.
        create_graph: Keep the gradients differentiable.

    Returns:
        One gradient per parameter, in the order of ``params``.

    Raises:
        ValueError: If the loss does not depend on one of the parameters.
    """
    grads = torch.autograd.grad(
        loss, list(params.values()), create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    for name, grad in zip(params, grads, strict=True):
        if grad is None:
            raise ValueError(
                f"the loss does not depend on parameter {name!r}: leave it out of "
                "params, or compute the loss from it."
            )
    return list(grads)


class MultiOptimizer(ABC):
    """Base class of optimizers that differentiate the loss themselves.

    Subclasses implement :meth:`get_step`. They may also override :meth:`updated_values` when
    they can compute detached updates more cheaply than differentiable ones.

    Example:
        >>> params = {"w": w, "b": b}
        >>> loss = model_loss(w, b)
        >>> optim.step(loss, params)  # w and b are updated in place
    """

    def step(self, loss: Tensor, params: Mapping[str, Tensor]) -> None:
        """Update the parameters in place, from one differentiable loss.

        Every update is computed before any parameter changes. The new values are detached:
        they carry no graph.

        Args:
            loss: A scalar loss to minimise; some optimizers differentiate it several times.
            params: A dict name -> tensor, updated in place.

        Raises:
            ValueError: If the optimizer does not return a value for every parameter.
        """
        params = check_params(params)
        updated = self.updated_values(loss, params)
        missing = set(params) - set(updated)
        if missing:
            raise ValueError(f"{type(self).__name__} returned no update for {sorted(missing)}.")
        with torch.no_grad():
            for name, value in params.items():
                value.copy_(updated[name])

    @abstractmethod
    def get_step(self, loss: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Compute the updated parameters, differentiably; nothing is modified in place.

        Args:
            loss: A scalar loss to minimise; some optimizers differentiate it several times.
            params: A dict name -> tensor.

        Returns:
            A dict name -> updated value that keeps autograd's graph to everything the loss and
            the parameters depend on.
        """

    def updated_values(self, loss: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Compute the updated parameters, detached; nothing is modified in place.

        Optimizer state (moments, step counts) advances as in :meth:`step`, which applies
        these values.

        Args:
            loss: A scalar loss to minimise.
            params: A dict name -> tensor.

        Returns:
            A dict name -> updated value without graph.
        """
        return {name: value.detach() for name, value in self.get_step(loss, params).items()}


class PerParamMultiOptimizer(MultiOptimizer):
    """A :class:`PerParamOptim` behind the :class:`MultiOptimizer` interface.

    :meth:`get_step` runs each parameter's torch optimizer in its ``differentiable`` mode on the
    gradient taken with ``create_graph=True``: the updated values are differentiable through
    this step (the optimizer state from earlier steps is constant). It needs optimizers with a
    ``differentiable`` option (SGD, Adam, RMSprop, ... of torch; ClippedAdam, AdagradRMSProp).
    :meth:`step` works with any optimizer that needs no closure. Neither touches ``.grad``.

    Args:
        optim: The per-parameter optimizer (or :class:`PerParamLRScheduler`).

    Raises:
        TypeError: If ``optim`` is not a :class:`PerParamOptim`.
    """

    _accepts: type = PerParamOptim

    def __init__(self, optim: PerParamOptim) -> None:
        if not isinstance(optim, self._accepts):
            raise TypeError(
                f"optim must be a {self._accepts.__name__}, got {type(optim).__name__}."
            )
        self.optim = optim

    def get_step(self, loss: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Compute the updated parameters, differentiably, advancing the optimizers' state.

        Args:
            loss: A scalar loss to minimise.
            params: A dict name -> tensor.

        Returns:
            A dict name -> updated value, differentiable through the gradient and the values.
        """
        return self._updates(loss, check_params(params), differentiable=True)

    def updated_values(self, loss: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Compute the updated parameters, detached, advancing the optimizers' state.

        Args:
            loss: A scalar loss to minimise.
            params: A dict name -> tensor.

        Returns:
            A dict name -> updated value without graph.
        """
        return self._updates(loss, check_params(params), differentiable=False)

    def _updates(
        self, loss: Tensor, params: dict[str, Tensor], *, differentiable: bool
    ) -> dict[str, Tensor]:
        check_loss(loss)
        grads = gradients(loss, params, create_graph=differentiable)
        return {
            name: self.optim.updated(name, value, grad, differentiable=differentiable)
            for (name, value), grad in zip(params.items(), grads, strict=True)
        }


class PyroMultiOptimizer(PerParamMultiOptimizer):
    """A :class:`~curvkit.optim.PyroOptim` behind the :class:`MultiOptimizer` interface.

    Pyro's ``pyro.optim.multi.PyroMultiOptimizer``. Each parameter's torch optimizer steps
    from the gradient of the loss; unlike Pyro, the parameters' ``.grad`` are not set, and
    :meth:`get_step` is differentiable as for :class:`PerParamMultiOptimizer`.

    Args:
        optim: The per-parameter optimizer (or :class:`~curvkit.optim.PyroLRScheduler`).

    Raises:
        TypeError: If ``optim`` is not a :class:`~curvkit.optim.PyroOptim`.
    """

    _accepts = PyroOptim


class TorchMultiOptimizer(PerParamMultiOptimizer):
    """A torch optimizer per parameter behind the :class:`MultiOptimizer` interface.

    Shorthand for ``PerParamMultiOptimizer(PerParamOptim(optim_constructor, optim_args,
    clip_args))``; its per-parameter optimizers are in ``self.optim``.

    Args:
        optim_constructor: Builds a torch optimizer, e.g. ``torch.optim.Adam``.
        optim_args: Its options: a dict, or a callable name -> dict.
        clip_args: Gradient clipping as for :class:`PerParamOptim`, or None.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(PerParamOptim(*args, **kwargs))

    # It takes PerParamOptim's arguments, and inspect.signature and the documentation say so.
    __init__.__signature__ = inspect.signature(PerParamOptim.__init__)


class MixedMultiOptimizer(MultiOptimizer):
    """Different optimizers for different parameters, all updated from the same loss.

    Every part computes its update from the loss as given, before any parameter changes, so
    that coupled parameters see a consistent point (a block-Jacobi rather than Gauss-Seidel
    sweep).

    Example:
        >>> optim = MixedMultiOptimizer([
        ...     (["loc"], Newton(trust_radii={"loc": 1.0})),
        ...     (["scale", "weights"], TorchMultiOptimizer(torch.optim.Adam, {"lr": 0.01})),
        ... ])
        >>> optim.step(loss, params)

    Args:
        parts: ``(names, optim)`` pairs: a list of parameter names and the
            :class:`MultiOptimizer`, :class:`PerParamOptim` or
            :class:`~curvkit.optim.PyroOptim` that updates them.

    Raises:
        TypeError: If a part is not a pair of a list of names and an optimizer.
        ValueError: If a name is in two parts, or there are no parts.
    """

    def __init__(
        self, parts: Iterable[tuple[Sequence[str], MultiOptimizer | PerParamOptim]]
    ) -> None:
        self.parts: list[tuple[tuple[str, ...], MultiOptimizer]] = []
        owner: dict[str, int] = {}
        for index, part in enumerate(parts):
            if not (isinstance(part, tuple | list) and len(part) == 2):
                raise TypeError(f"part {index} must be a pair (names, optim), got {part!r}.")
            names, optim = part
            if isinstance(names, str) or not all(isinstance(name, str) for name in names):
                raise TypeError(
                    f"the names of part {index} must be a list of strings, got "
                    f"{names!r} (write ['x'] for one name)."
                )
            if isinstance(optim, PerParamOptim):
                optim = PerParamMultiOptimizer(optim)
            elif isinstance(optim, PyroOptim):
                optim = PyroMultiOptimizer(optim)
            elif not isinstance(optim, MultiOptimizer):
                raise TypeError(
                    f"the optimizer of part {index} must be a MultiOptimizer, a "
                    f"PerParamOptim or a PyroOptim, got {type(optim).__name__}."
                )
            for name in names:
                if name in owner:
                    raise ValueError(
                        f"parameter {name!r} is in part {owner[name]} and in part "
                        f"{index}: every parameter must have one optimizer."
                    )
                owner[name] = index
            self.parts.append((tuple(names), optim))
        if not self.parts:
            raise ValueError("parts is empty: give at least one (names, optim) pair.")
        self._owner = owner

    def get_step(self, loss: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Compute every part's updated parameters, differentiably, from the same loss.

        Args:
            loss: A scalar loss to minimise.
            params: A dict name -> tensor with exactly the names of the parts.

        Returns:
            A dict name -> updated value.
        """
        return self._merge(params, lambda optim, part: optim.get_step(loss, part))

    def updated_values(self, loss: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Compute every part's updated parameters, detached, from the same loss.

        Args:
            loss: A scalar loss to minimise.
            params: A dict name -> tensor with exactly the names of the parts.

        Returns:
            A dict name -> updated value without graph.
        """
        return self._merge(params, lambda optim, part: optim.updated_values(loss, part))

    def _merge(
        self,
        params: Mapping[str, Tensor],
        update: Callable[[MultiOptimizer, dict[str, Tensor]], dict[str, Any]],
    ) -> dict[str, Tensor]:
        params = check_params(params)
        unknown = set(params) - set(self._owner)
        if unknown:
            raise ValueError(
                f"no part optimizes {sorted(unknown)}: add them to a part or "
                "leave them out of params."
            )
        missing = set(self._owner) - set(params)
        if missing:
            raise ValueError(
                f"params lacks {sorted(missing)}, which parts of this MixedMultiOptimizer optimize."
            )
        updated: dict[str, Tensor] = {}
        for names, optim in self.parts:
            updated.update(update(optim, {name: params[name] for name in names}))
        return updated
