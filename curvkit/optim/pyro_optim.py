"""Pyro's per-parameter optimizer wrappers, ``PyroOptim`` and ``PyroLRScheduler``, without Pyro.

These follow :mod:`pyro.optim`'s documented API, names and attributes: a torch optimizer (or a
learning-rate scheduler around one) per parameter tensor, built on the tensor itself the first
time it is stepped, stepping from the tensor's ``.grad``. Pyro names a parameter through its
global parameter store; here a parameter is named by its key when ``params`` is a dict, or by
:meth:`PyroOptim.name_params` (for instance from ``model.named_parameters()``). Names are needed
for per-parameter options given as a callable and for :meth:`PyroOptim.get_state`.

:class:`~curvkit.optim.PerParamOptim` is curvkit's own form of the same idea, which keys
everything by name and never touches the caller's tensors or their ``.grad``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvkit.optim.per_param import (
    check_clip_args,
    check_loadable,
    check_optim_args,
    check_scheduler_args,
    check_state_dict,
    clip_gradient,
    load_state_file,
    named_tensors,
    new_optimizer,
    resolve_args,
    step_copy,
)

PyroArgs = dict[str, Any] | Callable[..., dict[str, Any]]


def is_scheduler(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a learning-rate scheduler (it has an ``optimizer``), as in Pyro.

    Args:
        optimizer: An entry of :attr:`PyroOptim.optim_objs`.

    Returns:
        True for a scheduler around a torch optimizer, False for a torch optimizer.
    """
    return hasattr(optimizer, "optimizer")


def pyro_wrapper(
    wrapped: type,
    *,
    module: str,
    per_param: type[PyroOptim] | None = None,
    options: str = "The optimizer's options, or a callable returning them.",
    clipping: bool = True,
    reference: str | None = None,
) -> Callable[..., PyroOptim]:
    """Pyro's function of the name of ``wrapped`` that wraps it in a per-parameter optimizer.

    Args:
        wrapped: A torch optimizer or scheduler class.
        module: The module the function is defined in (its ``__module__``).
        per_param: :class:`PyroOptim` (None) or :class:`PyroLRScheduler`.
        options: The documentation of the function's ``optim_args``.
        clipping: Give the function the argument ``clip_args``, as Pyro's wrappers of torch's
            optimizers have; without it the function takes ``optim_args`` only, as Pyro's
            ``ClippedAdam``, ``AdagradRMSProp`` and ``DCTAdam``.
        reference: The name its documentation links ``wrapped`` by (its module and name if None).

    Returns:
        ``X(optim_args, clip_args=None)`` (``X(optim_args)`` without ``clipping``) returning
        ``per_param(wrapped, optim_args, clip_args)``.
    """
    optim = PyroOptim if per_param is None else per_param
    if clipping:

        def wrapper(
            optim_args: PyroArgs | Mapping[str, Any], clip_args: PyroArgs | None = None
        ) -> PyroOptim:
            return optim(wrapped, optim_args, clip_args)

    else:

        def wrapper(optim_args: dict[str, Any]) -> PyroOptim:
            return optim(wrapped, optim_args)

    wrapper.__name__ = wrapper.__qualname__ = wrapped.__name__
    wrapper.__module__ = module
    clip_doc = (
        "    clip_args: Gradient clipping, as for :class:`~curvkit.optim.PyroOptim`.\n"
        if clipping
        else ""
    )
    wrapper.__doc__ = (
        f"Wrap :class:`{reference or f'{wrapped.__module__}.{wrapped.__name__}'}` in a "
        f":class:`~curvkit.optim.{optim.__name__}`.\n\n"
        f"Args:\n    optim_args: {options}\n{clip_doc}\n"
        f"Returns:\n    The per-parameter {optim.__name__}.\n"
    )
    return wrapper


def _split_name(name: str) -> tuple[str, str]:
    # Pyro's two-argument callables get (module name, parameter name); a name without a module
    # is passed as both, as Pyro does.
    module, dot, param = name.rpartition(".")
    return (module, param) if dot else (name, name)


class PyroOptim:
    """A torch optimizer per parameter tensor, created the first time the tensor is stepped.

    Pyro's ``pyro.optim.PyroOptim``: calling the object clips each given tensor's ``.grad`` in
    place (if ``clip_args`` asks for it) and steps the tensor's own torch optimizer, which is
    built on the tensor itself, so that ``optim_objs[p].zero_grad()`` clears ``p.grad``.

    Example:
        >>> optim = PyroOptim(torch.optim.Adam, lambda name: {"lr": 0.1 if "bias" in name
        ...                                                    else 0.01})
        >>> loss.backward()
        >>> optim(dict(model.named_parameters()))

    Attributes:
        pt_optim_constructor: The torch optimizer's constructor.
        pt_optim_args: The options, as given.
        pt_clip_args: The clipping options, as given (``{}`` for None).
        optim_objs: The torch optimizer (or scheduler) of every tensor stepped so far, keyed
            by the tensor.
        grad_clip: The clipping options of every tensor stepped so far (None for none).
        param_names: The name of every named tensor, keyed by the tensor.

    Args:
        optim_constructor: Builds a torch optimizer from a list of tensors and keyword options,
            e.g. ``torch.optim.Adam``.
        optim_args: The options, as a dict, or a callable ``name -> dict`` (or, as in Pyro,
            ``(module_name, param_name) -> dict``) for per-parameter options.
        clip_args: Gradient clipping before every step: a dict with ``clip_norm`` (the
            parameter's gradient norm, as :func:`torch.nn.utils.clip_grad_norm_`) and/or
            ``clip_value`` (every entry, as :func:`torch.nn.utils.clip_grad_value_`), a
            callable returning such a dict, or None.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``clip_args`` has unknown keys or bounds that are not positive.
    """

    def __init__(
        self,
        optim_constructor: Callable[..., Optimizer],
        optim_args: PyroArgs,
        clip_args: PyroArgs | None = None,
    ) -> None:
        clip_args = check_optim_args(
            optim_constructor, optim_args, clip_args, callable_form="a callable returning one"
        )
        self.pt_optim_constructor = optim_constructor
        self.pt_optim_args = optim_args
        self.pt_clip_args = clip_args
        self.optim_objs: dict[Tensor, Any] = {}
        self.grad_clip: dict[Tensor, dict[str, Any] | None] = {}
        self.param_names: dict[Tensor, str] = {}
        self._pending: dict[str, Any] = {}

    def name_params(self, params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
        """Name parameter tensors, as Pyro's parameter store does.

        Args:
            params: A dict name -> tensor, or ``(name, tensor)`` pairs such as
                ``model.named_parameters()``.

        Raises:
            TypeError: If a name is not a string or a value not a tensor.
            ValueError: If a tensor already has another name, or a name is given to two
                tensors.
        """
        named = named_tensors(params if isinstance(params, Mapping) else dict(params))
        taken = {name: param for param, name in self.param_names.items()}
        for name, param in named.items():
            known = self.param_names.get(param)
            if known is not None and known != name:
                raise ValueError(
                    f"a tensor named {known!r} is now given the name {name!r}: "
                    "a parameter keeps its name."
                )
            if taken.get(name, param) is not param:
                raise ValueError(f"the name {name!r} is already another tensor's.")
            self.param_names[param] = name

    def __call__(
        self, params: Mapping[str, Tensor] | Iterable[Tensor], *args: Any, **kwargs: Any
    ) -> None:
        """Clip the gradients and step every given tensor's optimizer, in place.

        Args:
            params: Tensors with ``.grad``, as an iterable, or a dict name -> tensor (which
                also names them, see :meth:`name_params`).
            *args: Passed to each optimizer's ``step``.
            **kwargs: Passed to each optimizer's ``step``.

        Raises:
            TypeError: If ``params`` is a single tensor or holds something else than tensors.
            ValueError: If per-parameter options need the name of an unnamed tensor.
        """
        if isinstance(params, Mapping):
            self.name_params(params)
            params = params.values()
        elif isinstance(params, Tensor):
            raise TypeError(
                "params must be an iterable of tensors or a dict name -> tensor, not a single "
                "tensor: wrap it in a list."
            )
        for param in params:
            if not isinstance(param, Tensor):
                raise TypeError(f"params must hold tensors, got {type(param).__name__}.")
            optimizer = self._optimizer(param)
            clip = self.grad_clip[param]
            if clip and param.grad is not None:
                with torch.no_grad():
                    param.grad.copy_(clip_gradient(param.grad, **clip))
            (optimizer.optimizer if is_scheduler(optimizer) else optimizer).step(*args, **kwargs)

    def updated(
        self, name: str, param: Tensor, grad: Tensor, *, differentiable: bool = False
    ) -> Tensor:
        """One step of ``param``'s optimizer with gradient ``grad``, without modifying ``param``.

        The optimizer's state advances. This is what
        :class:`~curvkit.optim.PyroMultiOptimizer` uses; ``param.grad`` is not read or written,
        and the gradient is clipped out of place.

        Args:
            name: The parameter's name.
            param: The parameter tensor (the key of its optimizer).
            grad: The gradient of the loss at ``param``.
            differentiable: Run the optimizer in its ``differentiable`` mode, so that the result
                keeps autograd's graph to ``param`` and ``grad``.

        Returns:
            The parameter's new value (detached unless ``differentiable``).

        Raises:
            TypeError: If ``differentiable`` and the optimizer has no ``differentiable`` option.
        """
        self.name_params({name: param})
        optimizer = self._optimizer(param)
        grad = clip_gradient(grad, **(self.grad_clip[param] or {}))
        torch_optimizer = optimizer.optimizer if is_scheduler(optimizer) else optimizer
        return step_copy(torch_optimizer, param, param, grad, differentiable=differentiable)

    def get_state(self) -> dict[str, Any]:
        """The state of every optimizer, by parameter name, in Pyro's format.

        A plain optimizer's entry is its ``state_dict()``; a scheduler's is
        ``{"scheduler": ..., "optimizer": ...}``. States loaded for parameters not stepped yet
        are included.

        Returns:
            A dict name -> state.

        Raises:
            ValueError: If a stepped tensor has no name (see :meth:`name_params`).
        """
        state = dict(self._pending)
        for param, optimizer in self.optim_objs.items():
            state[self._name(param, "get_state")] = (
                {
                    "scheduler": optimizer.state_dict(),
                    "optimizer": optimizer.optimizer.state_dict(),
                }
                if is_scheduler(optimizer)
                else optimizer.state_dict()
            )
        return state

    def set_state(self, state_dict: Mapping[str, Any]) -> None:
        """Restore states from :meth:`get_state` (curvkit's or Pyro's).

        Parameters already stepped get theirs at once, the others when they are first stepped.

        Args:
            state_dict: A dict name -> state, as returned by :meth:`get_state`.

        Raises:
            ValueError: If ``state_dict`` is not shaped like the result of :meth:`get_state`
                of this kind of optimizer, or does not fit a parameter already stepped.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"state must be a dict name -> optimizer state, got {type(state_dict).__name__}."
            )
        for name, entry in state_dict.items():
            if not isinstance(name, str):
                raise ValueError(f"state names must be strings, got {name!r}.")
            self._check_entry(entry, name)
        by_name = {self.param_names.get(param): param for param in self.optim_objs}
        for name, entry in state_dict.items():
            if name in by_name:
                self._load(by_name[name], name, entry)
            else:
                self._pending[name] = entry

    def save(self, filename: str | PathLike[str]) -> None:
        """Save :meth:`get_state` to ``filename`` with :func:`torch.save`.

        Args:
            filename: The file to write.
        """
        torch.save(self.get_state(), filename)

    def load(
        self,
        filename: str | PathLike[str],
        map_location: str | torch.device | Callable[..., Any] | Mapping[str, str] | None = None,
    ) -> None:
        """Restore the state saved by :meth:`save` (here or by Pyro).

        Only tensors and plain containers are read (``torch.load(..., weights_only=True)``):
        a file that would need arbitrary objects unpickled is refused without running them.

        Args:
            filename: The file to read.
            map_location: Where to put the tensors, as for :func:`torch.load`.

        Raises:
            ValueError: If the file holds anything but a plain optimizer state.
        """
        self.set_state(load_state_file(filename, map_location, "optimizer state"))

    def _name(self, param: Tensor, why: str) -> str:
        name = self.param_names.get(param)
        if name is None:
            raise ValueError(
                f"{why} needs the parameter's name, but a tensor of shape {tuple(param.shape)} "
                "was given without one: pass params as a dict name -> tensor, or call "
                "name_params(model.named_parameters()) first."
            )
        return name

    def _resolve(self, args: PyroArgs, param: Tensor, what: str) -> dict[str, Any]:
        if not callable(args):
            return dict(args)
        name = self._name(param, f"{what} given as a callable")
        if len(inspect.signature(args).parameters) == 1:
            return resolve_args(args, name, what)
        return resolve_args(lambda full: args(*_split_name(full)), name, what)

    def _create(self, param: Tensor, options: dict[str, Any]) -> Any:
        return new_optimizer(self.pt_optim_constructor, param, options)

    def _optimizer(self, param: Tensor) -> Any:
        optimizer = self.optim_objs.get(param)
        if optimizer is not None:
            return optimizer
        clip = self._resolve(self.pt_clip_args, param, "clip_args")
        name = self.param_names.get(param)
        self.grad_clip[param] = check_clip_args(clip, name) or None
        optimizer = self._create(param, self._resolve(self.pt_optim_args, param, "optim_args"))
        self.optim_objs[param] = optimizer
        if name in self._pending:
            self._load(param, name, self._pending.pop(name))
        return optimizer

    def _check_entry(self, entry: Any, name: str) -> None:
        if isinstance(entry, Mapping) and set(entry) == {"scheduler", "optimizer"}:
            raise ValueError(
                f"the state of parameter {name!r} was saved by a PyroLRScheduler; load it into one."
            )
        check_state_dict(entry, name)

    def _load(self, param: Tensor, name: str, entry: Any) -> None:
        check_loadable(self.optim_objs[param], param, entry, name)
        self.optim_objs[param].load_state_dict(entry)


class PyroLRScheduler(PyroOptim):
    """A torch learning-rate scheduler per parameter tensor, each around its own optimizer.

    Pyro's ``pyro.optim.PyroLRScheduler``: calling the object steps the optimizers as
    :class:`PyroOptim` does; :meth:`step` steps every scheduler.

    Example:
        >>> scheduler = PyroLRScheduler(torch.optim.lr_scheduler.ExponentialLR,
        ...     {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.01}, "gamma": 0.1})
        >>> scheduler(dict(model.named_parameters()))  # after loss.backward()
        >>> scheduler.step()                           # once per epoch

    Attributes:
        pt_scheduler_constructor: The scheduler's constructor.
        kwargs: The scheduler's own options.

    Args:
        scheduler_constructor: Builds a scheduler from a torch optimizer and keyword options,
            e.g. ``torch.optim.lr_scheduler.StepLR``.
        optim_args: ``{"optimizer": optim_constructor, "optim_args": options,
            **scheduler_args}``, ``options`` as for :class:`PyroOptim`. Not modified (Pyro
            removes ``optimizer`` and ``optim_args`` from it).
        clip_args: Gradient clipping, as for :class:`PyroOptim`.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``optim_args`` lacks ``"optimizer"`` or ``"optim_args"``.
    """

    def __init__(
        self,
        scheduler_constructor: Callable[..., Any],
        optim_args: Mapping[str, Any],
        clip_args: PyroArgs | None = None,
    ) -> None:
        optim_constructor, options, self.kwargs = check_scheduler_args(
            scheduler_constructor, optim_args
        )
        super().__init__(optim_constructor, options, clip_args)
        self.pt_scheduler_constructor = scheduler_constructor

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step every parameter's scheduler.

        Args:
            *args: Passed to each scheduler's ``step``, e.g. the metric of
                :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau`.
            **kwargs: Passed to each scheduler's ``step``.
        """
        for scheduler in self.optim_objs.values():
            scheduler.step(*args, **kwargs)

    def _create(self, param: Tensor, options: dict[str, Any]) -> Any:
        return self.pt_scheduler_constructor(super()._create(param, options), **self.kwargs)

    def _check_entry(self, entry: Any, name: str) -> None:
        if not (
            isinstance(entry, Mapping)
            and set(entry) == {"scheduler", "optimizer"}
            and isinstance(entry["scheduler"], Mapping)
        ):
            raise ValueError(
                f"the state of parameter {name!r} is not a scheduler state "
                "{'scheduler': ..., 'optimizer': ...} saved by a PyroLRScheduler."
            )
        check_state_dict(entry["optimizer"], name)

    def _load(self, param: Tensor, name: str, entry: Any) -> None:
        scheduler = self.optim_objs[param]
        check_loadable(scheduler.optimizer, param, entry["optimizer"], name)
        scheduler.load_state_dict(entry["scheduler"])
        scheduler.optimizer.load_state_dict(entry["optimizer"])
