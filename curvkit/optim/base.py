"""The base of curvkit's element-wise torch optimizers (ClippedAdam, AdagradRMSProp, DCTAdam)."""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

_Class = TypeVar("_Class", bound=type)

#: The documentation of the arguments curvkit's torch optimizers share, filled into their
#: docstrings by :func:`fill_optimizer_docs`.
OPTIMIZER_DOCS: dict[str, str] = {
    "params": "Tensors or dicts of parameter groups, as for any :class:`torch.optim.Optimizer`.",
    "lr": "Learning rate before the first decay.",
    "clip_norm": r"Bound :math:`c > 0` of every gradient entry.",
    "differentiable": (
        "Keep the update in autograd's graph, so that the new parameter values are "
        "differentiable with respect to the gradient (parameters must then not be leaves that "
        "require grad)."
    ),
}

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)(?P<name>\w+): \{(?P=name)\}$", re.MULTILINE)


def fill_optimizer_docs(cls: _Class) -> _Class:
    """Replace every docstring line ``name: {name}`` by ``name:`` and ``OPTIMIZER_DOCS[name]``.

    Args:
        cls: A class whose docstring holds such lines.

    Returns:
        ``cls`` with its filled-in docstring.

    Raises:
        KeyError: If a placeholder names no shared argument.
    """

    def fill(match: re.Match[str]) -> str:
        indent, name = match["indent"], match["name"]
        return textwrap.fill(
            OPTIMIZER_DOCS[name],
            width=96,
            initial_indent=f"{indent}{name}: ",
            subsequent_indent=f"{indent}    ",
            break_long_words=False,
            break_on_hyphens=False,
        )

    if cls.__doc__:
        cls.__doc__ = _PLACEHOLDER.sub(fill, cls.__doc__)
    return cls


class PerTensorOptimizer(Optimizer):
    """A torch optimizer that updates every parameter tensor on its own.

    Subclasses implement :meth:`_update` for one tensor with a dense gradient, and may decay
    a group's options once per step in :meth:`_start_group`. A state saved by another
    implementation (Pyro's ClippedAdam, AdagradRMSProp, DCTAdam) or an older version may lack
    options such as ``corrected_eps`` and ``differentiable``: loading it keeps this optimizer's
    defaults for them, where :meth:`torch.optim.Optimizer.load_state_dict` alone would drop them.
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore ``state``, filling each group's missing options from ``self.defaults``.

        Args:
            state: The optimizer's ``__dict__`` entries, as :mod:`pickle` and
                :meth:`~torch.optim.Optimizer.load_state_dict` pass them.
        """
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one update of every parameter that has a gradient.

        Args:
            closure: Optional function that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or None without one.

        Raises:
            TypeError: For a sparse gradient.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.set_grad_enabled(self.defaults.get("differentiable", False)):
            for group in self.param_groups:
                self._start_group(group)
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    if param.grad.is_sparse:
                        raise TypeError(f"{type(self).__name__} does not support sparse gradients.")
                    self._update(param, group)
        return loss

    def _start_group(self, group: dict[str, Any]) -> None:
        """Change a group's options before its parameters are stepped (nothing by default)."""

    def _update(self, param: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError


def with_defaults(
    base: _Class, summary: str, *, module: str, positional: Collection[str] = (), **defaults: Any
) -> _Class:
    """A subclass of ``base`` of the same name whose constructor has other defaults.

    The subclass's ``__init__`` has ``base``'s signature (as :func:`inspect.signature` and the
    documentation show it) with the given ``defaults``, and the keyword-only parameters named in
    ``positional`` made positional (after the others); it passes every argument on to
    ``base.__init__`` by keyword. Its docstring is ``summary`` followed by the ``Args:`` section
    (and what follows it) of ``base``'s docstring.

    Args:
        base: The class; its ``__init__`` takes no ``*args`` or ``**kwargs``.
        summary: The subclass's docstring up to its arguments.
        module: The module the subclass is defined in (its ``__module__``).
        positional: Keyword-only parameters of ``base`` to take by position too.
        **defaults: New default values, by parameter name.

    Returns:
        The subclass.

    Raises:
        ValueError: If a name in ``positional`` or ``defaults`` is no parameter of ``base``.
    """
    signature = inspect.signature(base.__init__)
    unknown = (set(positional) | set(defaults)) - set(signature.parameters)
    if unknown:
        raise ValueError(f"{base.__name__} has no parameters {sorted(unknown)}.")
    parameters = [
        parameter.replace(
            default=defaults.get(name, parameter.default),
            kind=inspect.Parameter.POSITIONAL_OR_KEYWORD if name in positional else parameter.kind,
        )
        for name, parameter in signature.parameters.items()
    ]
    # A stable sort by kind puts the parameters made positional after the positional ones.
    signature = signature.replace(parameters=sorted(parameters, key=lambda p: p.kind))

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments[next(iter(signature.parameters))]
        base.__init__(self, **arguments)

    name = base.__name__
    __init__.__signature__ = signature
    __init__.__qualname__ = f"{name}.__init__"
    __init__.__module__ = module
    doc = base.__doc__ or ""
    args = doc.find("\n    Args:\n")
    namespace = {
        "__init__": __init__,
        "__doc__": summary.rstrip() + "\n" + (doc[args:] if args >= 0 else ""),
        "__module__": module,
        "__qualname__": name,
    }
    return type(base)(name, (base,), namespace)
