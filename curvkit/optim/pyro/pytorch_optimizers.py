"""Pyro's ``pyro.optim.pytorch_optimizers``: every torch optimizer and scheduler, wrapped.

As in Pyro, the wrappers are made from what the installed torch provides: each torch optimizer
``X`` (but LBFGS, which needs a closure) becomes a function ``X(optim_args, clip_args=None)``
returning a :class:`~curvkit.optim.PyroOptim`, and each learning-rate scheduler a function
returning a :class:`~curvkit.optim.PyroLRScheduler`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from curvkit.optim.pyro_optim import PyroArgs, PyroLRScheduler, PyroOptim

__all__: list[str] = []


def _wrapper(wrapped: type, per_param: type[PyroOptim], what: str) -> Callable[..., PyroOptim]:
    def wrapper(
        optim_args: PyroArgs | Mapping[str, Any], clip_args: PyroArgs | None = None
    ) -> PyroOptim:
        return per_param(wrapped, optim_args, clip_args)

    wrapper.__name__ = wrapper.__qualname__ = wrapped.__name__
    wrapper.__module__ = __name__
    wrapper.__doc__ = (
        f"Wrap :class:`{wrapped.__module__}.{wrapped.__name__}` in a "
        f":class:`~curvkit.optim.{per_param.__name__}`.\n\n"
        f"Args:\n    optim_args: {what}\n"
        "    clip_args: Gradient clipping, as for :class:`~curvkit.optim.PyroOptim`.\n\n"
        f"Returns:\n    The per-parameter {per_param.__name__}.\n"
    )
    return wrapper


def _public_classes(module: Any, base: type) -> dict[str, type]:
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, base) and not name.startswith("_")
    }


for _name, _class in _public_classes(torch.optim, torch.optim.Optimizer).items():
    if _class not in (torch.optim.Optimizer, torch.optim.LBFGS):
        globals()[_name] = _wrapper(
            _class, PyroOptim, "The optimizer's options, or a callable returning them."
        )
        __all__.append(_name)

_schedulers = _public_classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
_schedulers["ReduceLROnPlateau"] = torch.optim.lr_scheduler.ReduceLROnPlateau
for _name, _class in _schedulers.items():
    if _class is not torch.optim.lr_scheduler.LRScheduler:
        globals()[_name] = _wrapper(
            _class,
            PyroLRScheduler,
            "``{'optimizer': optim_constructor, 'optim_args': options, **scheduler_args}``.",
        )
        __all__.append(_name)
