"""Optimizers: the MultiOptimizer family, per-parameter optimizers and curvature-based steps."""

from curvkit.optim.adagrad_rmsprop import AdagradRMSProp
from curvkit.optim.clipped_adam import ClippedAdam
from curvkit.optim.damped_newton import DampedNewton
from curvkit.optim.multi import (
    MixedMultiOptimizer,
    MultiOptimizer,
    PerParamMultiOptimizer,
    TorchMultiOptimizer,
)
from curvkit.optim.newton import Newton
from curvkit.optim.per_param import PerParamLRScheduler, PerParamOptim

__all__ = [
    "AdagradRMSProp",
    "ClippedAdam",
    "DampedNewton",
    "MixedMultiOptimizer",
    "MultiOptimizer",
    "Newton",
    "PerParamLRScheduler",
    "PerParamMultiOptimizer",
    "PerParamOptim",
    "TorchMultiOptimizer",
]
