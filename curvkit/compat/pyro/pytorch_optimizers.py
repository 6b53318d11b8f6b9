"""Pyro's ``pyro.optim.pytorch_optimizers``: every torch optimizer and scheduler, wrapped.

As in Pyro, the wrappers are made from what the installed torch provides: each torch optimizer
``X`` (but LBFGS, which needs a closure) becomes a function ``X(optim_args, clip_args=None)``
returning a :class:`~curvkit.optim.PyroOptim`, and each learning-rate scheduler a function
returning a :class:`~curvkit.optim.PyroLRScheduler`.
"""

from __future__ import annotations

from typing import Any

import torch

from curvkit.optim.pyro_optim import PyroLRScheduler, pyro_wrapper

__all__: list[str] = []


def _public_classes(module: Any, base: type) -> dict[str, type]:
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, base) and not name.startswith("_")
    }


for _name, _class in _public_classes(torch.optim, torch.optim.Optimizer).items():
    if _class not in (torch.optim.Optimizer, torch.optim.LBFGS):
        globals()[_name] = pyro_wrapper(_class, module=__name__)
        __all__.append(_name)

_schedulers = _public_classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
_schedulers["ReduceLROnPlateau"] = torch.optim.lr_scheduler.ReduceLROnPlateau
for _name, _class in _schedulers.items():
    if _class is not torch.optim.lr_scheduler.LRScheduler:
        globals()[_name] = pyro_wrapper(
            _class,
            module=__name__,
            per_param=PyroLRScheduler,
            options="``{'optimizer': optim_constructor, 'optim_args': options, "
            "**scheduler_args}``.",
        )
        __all__.append(_name)
