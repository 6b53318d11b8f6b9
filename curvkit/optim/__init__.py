"""Optimizers: the MultiOptimizer family, per-parameter optimizers and curvature-based steps.

:mod:`curvkit.compat.pyro` is Pyro's ``pyro.optim`` by its own names (``Adam({"lr": ...})``,
``ClippedAdam(optim_args)``, ...); its classes ``PyroOptim``, ``PyroLRScheduler`` and
``PyroMultiOptimizer`` are also here. Where a Pyro name would clash with curvkit's (``ClippedAdam``,
``AdagradRMSProp`` and ``DCTAdam`` are torch optimizer classes here), this module keeps
curvkit's.
"""

from curvkit.optim.adagrad_rmsprop import AdagradRMSProp
from curvkit.optim.clipped_adam import ClippedAdam
from curvkit.optim.damped_newton import DampedNewton
from curvkit.optim.dct_adam import DCTAdam
from curvkit.optim.multi import (
    MixedMultiOptimizer,
    MultiOptimizer,
    PerParamMultiOptimizer,
    PyroMultiOptimizer,
    TorchMultiOptimizer,
)
from curvkit.optim.newton import Newton
from curvkit.optim.per_param import PerParamLRScheduler, PerParamOptim
from curvkit.optim.pyro_optim import PyroLRScheduler, PyroOptim

__all__ = [
    "AdagradRMSProp",
    "ClippedAdam",
    "DCTAdam",
    "DampedNewton",
    "MixedMultiOptimizer",
    "MultiOptimizer",
    "Newton",
    "PerParamLRScheduler",
    "PerParamMultiOptimizer",
    "PerParamOptim",
    "PyroLRScheduler",
    "PyroMultiOptimizer",
    "PyroOptim",
    "TorchMultiOptimizer",
]
