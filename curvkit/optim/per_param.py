"""One torch optimizer (and learning-rate scheduler) per parameter, created on first sight.

Each parameter name gets its own :class:`torch.optim.Optimizer`, built on a private copy of the
parameter when the name is first seen, so that parameters can appear at any time and carry their
own settings. The optimizers never hold the caller's tensors: every update copies the current
value in, steps, and hands the new value out, which is what lets the same optimizer take an
ordinary in-place step, a step whose result is not yet applied, or a differentiable step.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvkit.core.validation import check_real

OptimArgs = Mapping[str, Any] | Callable[[str], Mapping[str, Any]]
_CLIP_KEYS = frozenset({"clip_norm", "clip_value"})
_SCHEDULER_KEYS = frozenset({"optimizer", "optim_args"})


def named_tensors(params: Mapping[str, Tensor] | Iterable[Tensor]) -> dict[str, Tensor]:
    """Name the parameters: by their keys in a dict, by their position ("0", "1", ...) otherwise.

    Positions name tensors as :meth:`torch.optim.Optimizer.state_dict` does: pass them in the
    same order every time.

    Args:
        params: A dict name -> tensor, or an iterable of tensors.

    Returns:
        A dict name -> tensor.

    Raises:
        TypeError: For a single tensor, a non-string name or a value that is not a tensor.
        ValueError: If the same tensor appears twice.
    """
    if isinstance(params, Tensor):
        raise TypeError(
            "params must be a dict name -> tensor or an iterable of tensors, "
            "not a single tensor: wrap it in a list or a dict."
        )
    if isinstance(params, Mapping):
        named = dict(params)
    else:
        named = {str(index): param for index, param in enumerate(params)}
    seen: dict[int, str] = {}
    for name, param in named.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be strings, got {name!r}.")
        if not isinstance(param, Tensor):
            raise TypeError(f"parameter {name!r} must be a tensor, got {type(param).__name__}.")
        if id(param) in seen:
            raise ValueError(
                f"the same tensor is given as parameter {seen[id(param)]!r} and "
                f"{name!r}; pass every parameter once."
            )
        seen[id(param)] = name
    return named


def clip_gradient(
    grad: Tensor, clip_norm: float | None = None, clip_value: float | None = None
) -> Tensor:
    r"""Clip a gradient out of place, differentiably.

    First scaled by :math:`\min(1, c / (\lVert g \rVert_2 + 10^{-6}))` with ``clip_norm`` :math:`c`
    (the rule of :func:`torch.nn.utils.clip_grad_norm_`), then clamped entry by entry to
    ``[-clip_value, clip_value]``.

    Args:
        grad: The gradient.
        clip_norm: Bound of the gradient's Euclidean norm, or None.
        clip_value: Bound of every entry, or None.

    Returns:
        The clipped gradient (``grad`` itself when both bounds are None).
    """
    if clip_norm is not None:
        grad = grad * (clip_norm / (torch.linalg.vector_norm(grad) + 1e-6)).clamp(max=1.0)
    if clip_value is not None:
        grad = grad.clamp(-clip_value, clip_value)
    return grad


def check_clip_args(clip_args: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    """Check gradient-clipping options: a dict with ``clip_norm`` and/or ``clip_value``.

    Args:
        clip_args: The options.
        name: The parameter they are for, or None for options of every parameter.

    Returns:
        The options as a new dict.

    Raises:
        TypeError: If ``clip_args`` is not a dict.
        ValueError: For unknown keys or bounds that are not positive.
    """
    where = "clip_args" if name is None else f"clip_args for parameter {name!r}"
    if not isinstance(clip_args, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(clip_args).__name__}.")
    unknown = set(clip_args) - _CLIP_KEYS
    if unknown:
        raise ValueError(
            f"{where} has unknown keys {sorted(unknown)}; allowed are {sorted(_CLIP_KEYS)}."
        )
    for key, bound in clip_args.items():
        if bound is not None:
            check_real(bound, f"{where}: {key}", minimum=0.0, strict=True, allow_inf=True)
    return dict(clip_args)


#: Options of torch's optimizers that are numbers, and those that are pairs of numbers.
_REAL_OPTIONS = frozenset(
    {
        "lr",
        "momentum",
        "dampening",
        "weight_decay",
        "eps",
        "alpha",
        "rho",
        "lr_decay",
        "initial_accumulator_value",
        "lambd",
        "t0",
        "momentum_decay",
        "clip_norm",
        "lrd",
    }
)
_PAIR_OPTIONS = frozenset({"betas", "etas", "step_sizes"})


def check_option_values(options: Mapping[str, Any], what: str) -> None:
    """Refuse numeric optimizer options that are not numbers, before torch compares them.

    ``{"lr": "0.1"}`` would otherwise fail inside the optimizer's constructor with torch's own
    comparison error. Only the numeric options of torch's optimizers are checked (a number or a
    0-dim tensor, a pair of them for ``betas``); others go to the constructor as they are.

    Args:
        options: The optimizer's keyword options.
        what: How the message names them, e.g. ``"optim_args"``.

    Raises:
        TypeError: If such an option is not a real number (or pair of them).
        ValueError: If it is NaN.
    """
    for key, value in options.items():
        if key in _REAL_OPTIONS:
            check_real(value, f"{what}[{key!r}]", allow_inf=True)
        elif key in _PAIR_OPTIONS:
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise TypeError(f"{what}[{key!r}] must be a pair of numbers, got {value!r}")
            for item in value:
                check_real(item, f"{what}[{key!r}]", allow_inf=True)


def check_optim_args(
    optim_constructor: Any, optim_args: Any, clip_args: Any, *, callable_form: str
) -> Any:
    """Check the arguments of a per-parameter optimizer (PerParamOptim, PyroOptim).

    Args:
        optim_constructor: Must be callable.
        optim_args: A dict or a callable returning one.
        clip_args: A dict of :func:`check_clip_args`, a callable returning one, or None.
        callable_form: How the messages name the callables, e.g. "a callable name -> dict".

    Returns:
        ``clip_args``, ``{}`` for None.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``clip_args`` is a dict with unknown keys or non-positive bounds.
    """
    if not callable(optim_constructor):
        raise TypeError("optim_constructor must be callable, e.g. torch.optim.Adam.")
    if clip_args is None:
        clip_args = {}
    for what, args in (("optim_args", optim_args), ("clip_args", clip_args)):
        if not (callable(args) or isinstance(args, Mapping)):
            raise TypeError(f"{what} must be a dict or {callable_form}, got {type(args).__name__}.")
    if not callable(clip_args):
        check_clip_args(clip_args, None)
    if not callable(optim_args):
        check_option_values(optim_args, "optim_args")
    return clip_args


def resolve_args(args: OptimArgs, name: str, what: str) -> dict[str, Any]:
    """The options of parameter ``name``: ``args``, or ``args(name)`` for a callable.

    Args:
        args: A dict, or a callable name -> dict.
        name: The parameter's name.
        what: What ``args`` are, for the message.

    Returns:
        The options as a new dict.

    Raises:
        TypeError: If the callable returns no dict.
    """
    resolved = args(name) if callable(args) else args
    if not isinstance(resolved, Mapping):
        raise TypeError(
            f"{what} for parameter {name!r} must be a dict, got {type(resolved).__name__}."
        )
    check_option_values(resolved, f"{what} for parameter {name!r}")
    return dict(resolved)


def new_optimizer(
    optim_constructor: Callable[..., Optimizer], param: Tensor, options: Mapping[str, Any]
) -> Optimizer:
    """``optim_constructor([param], **options)``, checked to be a torch optimizer.

    Args:
        optim_constructor: The optimizer's constructor.
        param: The only tensor of the optimizer.
        options: Its keyword options.

    Returns:
        The optimizer.

    Raises:
        TypeError: If ``optim_constructor`` returns no :class:`torch.optim.Optimizer`.
    """
    optimizer = optim_constructor([param], **options)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            "optim_constructor must return a torch.optim.Optimizer, "
            f"got {type(optimizer).__name__}."
        )
    return optimizer


def check_scheduler_args(
    scheduler_constructor: Any, optim_args: Mapping[str, Any]
) -> tuple[Any, Any, dict[str, Any]]:
    """Check a scheduler's constructor and split its ``optim_args`` (:func:`split_scheduler_args`).

    Args:
        scheduler_constructor: Must be callable.
        optim_args: ``{"optimizer": optim_constructor, "optim_args": options,
            **scheduler_args}``; not modified.

    Returns:
        ``(optim_constructor, options, scheduler_args)``.

    Raises:
        TypeError: If ``scheduler_constructor`` is not callable or ``optim_args`` not a dict.
        ValueError: If ``optim_args`` lacks ``"optimizer"`` or ``"optim_args"``.
    """
    if not callable(scheduler_constructor):
        raise TypeError(
            "scheduler_constructor must be callable, e.g. torch.optim.lr_scheduler.StepLR."
        )
    return split_scheduler_args(optim_args)


def split_scheduler_args(optim_args: Mapping[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Split a scheduler's ``optim_args`` into the optimizer, its options and the scheduler's.

    Args:
        optim_args: ``{"optimizer": optim_constructor, "optim_args": options,
            **scheduler_args}``; not modified.

    Returns:
        ``(optim_constructor, options, scheduler_args)``.

    Raises:
        TypeError: If ``optim_args`` is not a dict.
        ValueError: If it lacks ``"optimizer"`` or ``"optim_args"``.
    """
    if not isinstance(optim_args, Mapping):
        raise TypeError(
            "optim_args must be a dict {'optimizer': ..., 'optim_args': ..., "
            f"**scheduler_args}}, got {type(optim_args).__name__}."
        )
    missing = _SCHEDULER_KEYS - set(optim_args)
    if missing:
        raise ValueError(
            f"optim_args lacks {sorted(missing)}: it must be "
            "{'optimizer': optim_constructor, 'optim_args': options, "
            "**scheduler_args}."
        )
    scheduler_args = {k: v for k, v in optim_args.items() if k not in _SCHEDULER_KEYS}
    return optim_args["optimizer"], optim_args["optim_args"], scheduler_args


def step_copy(
    optimizer: Optimizer, param: Tensor, value: Tensor, grad: Tensor, *, differentiable: bool
) -> Tensor:
    """Step ``optimizer``, built on the single tensor ``param``, from ``value`` and ``grad``.

    The optimizer steps a clone of ``value`` in place of ``param``: its state moves to the
    clone for the step and comes back detached, so that no graph outlives the step, and
    ``param`` is not touched (a graph that saved it stays usable).

    Args:
        optimizer: A torch optimizer with ``param`` as its only parameter.
        param: The tensor the optimizer was built on.
        value: The value to step from.
        grad: The gradient at ``value``.
        differentiable: Run the optimizer in its ``differentiable`` mode, so that the result
            keeps autograd's graph to ``value`` and ``grad``.

    Returns:
        The new value (with graph if ``differentiable``, else detached).

    Raises:
        TypeError: If ``differentiable`` and the optimizer has no ``differentiable`` option.
    """
    group = optimizer.param_groups[0]
    if differentiable and "differentiable" not in group:
        raise TypeError(
            f"{type(optimizer).__name__} has no 'differentiable' option, so its step cannot "
            "be differentiated: use step() instead of get_step(), or an optimizer that "
            "supports differentiable=True (torch.optim.SGD, Adam, RMSprop, ..., ClippedAdam, "
            "AdagradRMSProp)."
        )
    proxy = value.clone() if differentiable else value.detach().clone()
    flags = optimizer.defaults.get("differentiable"), group.get("differentiable")
    state = optimizer.state.pop(param, None)
    group["params"] = [proxy]
    if state is not None:
        optimizer.state[proxy] = state
    try:
        if differentiable:
            optimizer.defaults["differentiable"] = group["differentiable"] = True
        proxy.grad = grad if differentiable else grad.detach()
        optimizer.step()
    finally:
        if differentiable:
            optimizer.defaults["differentiable"], group["differentiable"] = flags
        group["params"] = [param]
        new_state = optimizer.state.pop(proxy, None)
        if new_state is not None:
            optimizer.state[param] = {
                key: entry.detach() if isinstance(entry, Tensor) else entry
                for key, entry in new_state.items()
            }
        proxy.grad = None
    return proxy


def check_state_dict(entry: Any, name: str) -> None:
    """Check that ``entry`` has the shape of a torch optimizer's ``state_dict()``.

    Args:
        entry: The saved state of one parameter's optimizer.
        name: The parameter's name, for the message.

    Raises:
        ValueError: If ``entry`` is not a dict with ``"state"`` and ``"param_groups"``.
    """
    if not (
        isinstance(entry, Mapping)
        and isinstance(entry.get("state"), Mapping)
        and isinstance(entry.get("param_groups"), list)
        and all(isinstance(group, Mapping) and "params" in group for group in entry["param_groups"])
    ):
        raise ValueError(
            f"the saved optimizer state of parameter {name!r} is not a torch optimizer "
            "state_dict() (a dict with 'state' and 'param_groups')."
        )


def check_loadable(
    optimizer: Optimizer, param: Tensor, entry: Mapping[str, Any], name: str
) -> None:
    """Check that ``optimizer``, built on ``param``, can load the state dict ``entry``.

    Caught here rather than at the next step: a state of another kind of optimizer (options
    the optimizer does not have) and state tensors of another shape than the parameter.

    Args:
        optimizer: The parameter's torch optimizer.
        param: The tensor it was built for.
        entry: A torch optimizer ``state_dict()``.
        name: The parameter's name, for the messages.

    Raises:
        ValueError: If the state does not match the optimizer or the parameter.
    """
    check_state_dict(entry, name)
    kind = type(optimizer).__name__
    if len(entry["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the saved state of parameter {name!r} has {len(entry['param_groups'])} "
            f"parameter groups, its {kind} has {len(optimizer.param_groups)}."
        )
    for saved, group in zip(entry["param_groups"], optimizer.param_groups, strict=True):
        # A newer torch may add options: only options this optimizer lacks mark another kind.
        foreign = set(saved) - set(group) - {"initial_lr"}
        if foreign:
            raise ValueError(
                f"the saved state of parameter {name!r} has options {sorted(foreign)} that "
                f"its {kind} does not have: it was saved by another kind of optimizer."
            )
    # DCTAdam keeps frequency-domain moments along the parameter's time dimension.
    free = getattr(param, "_pyro_dct_dim", None)
    for per_param in entry["state"].values():
        if not isinstance(per_param, Mapping):
            raise ValueError(f"the saved state of parameter {name!r} is malformed.")
        for key, tensor in per_param.items():
            if not isinstance(tensor, Tensor) or tensor.dim() == 0:
                continue
            shape = list(tensor.shape)
            expected = list(param.shape)
            if free is not None and len(shape) == len(expected):
                shape[free] = expected[free] = -1
            if shape != expected:
                raise ValueError(
                    f"the saved state {key!r} of parameter {name!r} has shape "
                    f"{tuple(tensor.shape)}, but the parameter has shape "
                    f"{tuple(param.shape)}: the state belongs to another parameter."
                )


def load_state_file(
    path: str | PathLike[str], map_location: str | torch.device | None, what: str
) -> Any:
    """Read a file written by ``torch.save``, refusing anything but tensors and containers.

    Args:
        path: The file to read.
        map_location: Where to put the tensors, as for :func:`torch.load`.
        what: What the file should hold, for the message.

    Returns:
        The loaded object.

    Raises:
        ValueError: If reading the file would unpickle other objects (they are not run).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors and plain "
            f"containers, so it is no {what} ({error})."
        ) from error


class PerParamOptim:
    """One torch optimizer per parameter, created when the parameter is first seen.

    Calling the object steps, in place, every given parameter that has a ``.grad``, as a torch
    optimizer would (``.grad`` itself is left as it is). :meth:`updated` computes one
    parameter's next value without touching it, differentiably if asked; that is what
    :class:`~curvkit.optim.PerParamMultiOptimizer` uses.

    Example:
        >>> optim = PerParamOptim(torch.optim.Adam, lambda name: {"lr": 0.1 if "bias" in name
        ...                                                        else 0.01})
        >>> loss.backward()
        >>> optim(dict(model.named_parameters()))

    Args:
        optim_constructor: Builds a torch optimizer from a list of tensors and keyword options,
            e.g. ``torch.optim.Adam``.
        optim_args: The options, as a dict, or a callable name -> dict for per-parameter options.
        clip_args: Gradient clipping before every step: a dict with ``clip_norm`` and/or
            ``clip_value`` (see :func:`clip_gradient`), a callable name -> such a dict, or None.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``clip_args`` has unknown keys or non-positive bounds.
    """

    _with_schedulers = False

    def __init__(
        self,
        optim_constructor: Callable[..., Optimizer],
        optim_args: OptimArgs,
        clip_args: OptimArgs | None = None,
    ) -> None:
        clip_args = check_optim_args(
            optim_constructor, optim_args, clip_args, callable_form="a callable name -> dict"
        )
        self.optim_constructor = optim_constructor
        self.optim_args = optim_args
        self.clip_args = clip_args
        self._holders: dict[str, Tensor] = {}
        self._optimizers: dict[str, Optimizer] = {}
        self._clips: dict[str, dict[str, Any]] = {}
        self._schedulers: dict[str, Any] = {}
        self._pending: dict[str, dict[str, Any]] = {}

    @property
    def optimizers(self) -> dict[str, Optimizer]:
        """The torch optimizer of every parameter seen so far, by name."""
        return dict(self._optimizers)

    def __call__(self, params: Mapping[str, Tensor] | Iterable[Tensor]) -> None:
        """Step every parameter that has a gradient, in place, from its ``.grad``.

        Args:
            params: A dict name -> tensor, or an iterable of tensors (named by position).

        Raises:
            ValueError: If a parameter's shape, dtype or device differs from the one its
                optimizer was created for.
        """
        for name, param in named_tensors(params).items():
            if param.grad is not None:
                value = self.updated(name, param.detach(), param.grad.detach())
                with torch.no_grad():
                    param.copy_(value)

    def updated(
        self, name: str, value: Tensor, grad: Tensor, *, differentiable: bool = False
    ) -> Tensor:
        """One step of ``name``'s optimizer from ``value`` with gradient ``grad``.

        The optimizer's state advances; ``value`` and ``grad`` are not modified.

        Args:
            name: The parameter's name (its optimizer is created if it is new).
            value: The parameter's current value.
            grad: The gradient of the loss at ``value``.
            differentiable: Run the optimizer in its ``differentiable`` mode, so that the result
                keeps autograd's graph to ``value`` and ``grad`` (the state from earlier steps is
                detached).

        Returns:
            The parameter's new value (detached unless ``differentiable``).

        Raises:
            TypeError: If ``differentiable`` and the optimizer has no ``differentiable`` option.
            ValueError: If ``value`` differs in shape, dtype or device from the parameter the
                optimizer was created for, or ``grad`` from ``value``.
        """
        if grad.shape != value.shape:
            raise ValueError(
                f"gradient of parameter {name!r} has shape {tuple(grad.shape)}, "
                f"but the parameter has shape {tuple(value.shape)}."
            )
        optimizer = self._optimizer(name, value)
        grad = clip_gradient(grad, **self._clips[name])
        holder = self._holders[name]
        if differentiable:
            return step_copy(optimizer, holder, value, grad, differentiable=True)
        with torch.no_grad():
            holder.copy_(value)
        holder.grad = grad.detach()
        try:
            optimizer.step()
        finally:
            holder.grad = None
        return holder.detach().clone()

    def get_state(self) -> dict[str, dict[str, Any]]:
        """The state of every per-parameter optimizer (and scheduler), by parameter name.

        States loaded for parameters not seen yet are included.

        Returns:
            A dict name -> ``{"optimizer": state_dict, "scheduler": state_dict}`` (the
            scheduler entry only for :class:`PerParamLRScheduler`).
        """
        state = dict(self._pending)
        for name, optimizer in self._optimizers.items():
            state[name] = {"optimizer": optimizer.state_dict()}
            if name in self._schedulers:
                state[name]["scheduler"] = self._schedulers[name].state_dict()
        return state

    def set_state(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore states from :meth:`get_state`.

        Parameters already seen get theirs at once, the others when they are first seen.

        Args:
            state: A dict as returned by :meth:`get_state`.

        Raises:
            ValueError: If ``state`` is not shaped like the result of :meth:`get_state`.
        """
        if not isinstance(state, Mapping):
            raise ValueError(
                f"state must be a dict name -> optimizer state, got {type(state).__name__}."
            )
        for name, entry in state.items():
            if not (
                isinstance(name, str)
                and isinstance(entry, Mapping)
                and "optimizer" in entry
                and set(entry) <= {"optimizer", "scheduler"}
            ):
                raise ValueError(
                    f"state entry {name!r} is not an optimizer state saved by "
                    "PerParamOptim.get_state."
                )
            if ("scheduler" in entry) != self._with_schedulers:
                raise ValueError(
                    f"state entry {name!r} was saved by a different kind of "
                    "optimizer (with a scheduler state where none is expected, or "
                    "without one where one is)."
                )
            check_state_dict(entry["optimizer"], name)
        for name, entry in state.items():
            if name in self._optimizers:
                self._load(name, entry)
            else:
                self._pending[name] = dict(entry)

    def save(self, path: str | PathLike[str]) -> None:
        """Save :meth:`get_state` to ``path`` with :func:`torch.save`.

        Args:
            path: The file to write.
        """
        torch.save(self.get_state(), path)

    def load(
        self, path: str | PathLike[str], map_location: str | torch.device | None = None
    ) -> None:
        """Restore the state saved by :meth:`save`.

        Only tensors and plain containers are read (``torch.load(..., weights_only=True)``):
        a file that would need arbitrary objects unpickled is refused without running them.

        Args:
            path: The file to read.
            map_location: Where to put the tensors, as for :func:`torch.load`.

        Raises:
            ValueError: If the file holds anything but a plain optimizer state.
        """
        state = load_state_file(path, map_location, "optimizer state saved by PerParamOptim.save")
        self.set_state(state)

    def _create(self, name: str, holder: Tensor) -> Optimizer:
        options = resolve_args(self.optim_args, name, "optim_args")
        return new_optimizer(self.optim_constructor, holder, options)

    def _optimizer(self, name: str, value: Tensor) -> Optimizer:
        holder = self._holders.get(name)
        if holder is None:
            if not value.is_floating_point() and not value.is_complex():
                raise TypeError(
                    f"parameter {name!r} must be a floating-point tensor, got dtype {value.dtype}."
                )
            clip = (
                resolve_args(self.clip_args, name, "clip_args")
                if callable(self.clip_args)
                else self.clip_args
            )
            self._clips[name] = check_clip_args(clip, name)
            holder = value.detach().clone().requires_grad_(True)
            self._optimizers[name] = self._create(name, holder)
            self._holders[name] = holder
            pending = self._pending.pop(name, None)
            if pending is not None:
                self._load(name, pending)
        elif (holder.shape, holder.dtype, holder.device) != (
            value.shape,
            value.dtype,
            value.device,
        ):
            raise ValueError(
                f"parameter {name!r} has shape {tuple(value.shape)}, dtype {value.dtype} and "
                f"device {value.device}, but its optimizer was created for shape "
                f"{tuple(holder.shape)}, dtype {holder.dtype} and device {holder.device}; "
                "use a new name or a new optimizer for a changed parameter."
            )
        return self._optimizers[name]

    def _load(self, name: str, entry: Mapping[str, Any]) -> None:
        check_loadable(self._optimizers[name], self._holders[name], entry["optimizer"], name)
        self._optimizers[name].load_state_dict(entry["optimizer"])
        if "scheduler" in entry:
            self._schedulers[name].load_state_dict(entry["scheduler"])


class PerParamLRScheduler(PerParamOptim):
    """A torch learning-rate scheduler per parameter, each around its own torch optimizer.

    Calling the object steps the parameters as :class:`PerParamOptim` does; :meth:`step` steps
    every parameter's scheduler.

    Example:
        >>> scheduler = PerParamLRScheduler(torch.optim.lr_scheduler.ReduceLROnPlateau,
        ...     {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1}, "patience": 2})
        >>> scheduler(params)                # after loss.backward()
        >>> scheduler.step(validation_loss)  # once per epoch

    Args:
        scheduler_constructor: Builds a scheduler from a torch optimizer and keyword options,
            e.g. ``torch.optim.lr_scheduler.StepLR``.
        optim_args: ``{"optimizer": optim_constructor, "optim_args": options, **scheduler_args}``
            where ``options`` is a dict or a callable name -> dict as for :class:`PerParamOptim`
            and ``scheduler_args`` are the scheduler's keyword options. Not modified.
        clip_args: Gradient clipping, as for :class:`PerParamOptim`.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``optim_args`` lacks ``"optimizer"`` or ``"optim_args"``.
    """

    _with_schedulers = True

    def __init__(
        self,
        scheduler_constructor: Callable[..., Any],
        optim_args: Mapping[str, Any],
        clip_args: OptimArgs | None = None,
    ) -> None:
        optim_constructor, options, self.scheduler_args = check_scheduler_args(
            scheduler_constructor, optim_args
        )
        super().__init__(optim_constructor, options, clip_args)
        self.scheduler_constructor = scheduler_constructor

    @property
    def schedulers(self) -> dict[str, Any]:
        """The scheduler of every parameter seen so far, by name."""
        return dict(self._schedulers)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step every parameter's scheduler.

        Args:
            *args: Passed to each scheduler's ``step``, e.g. the metric of
                :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau`.
            **kwargs: Passed to each scheduler's ``step``.
        """
        for scheduler in self._schedulers.values():
            scheduler.step(*args, **kwargs)

    def _create(self, name: str, holder: Tensor) -> Optimizer:
        optimizer = super()._create(name, holder)
        self._schedulers[name] = self.scheduler_constructor(optimizer, **self.scheduler_args)
        return optimizer
