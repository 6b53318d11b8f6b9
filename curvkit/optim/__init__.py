"""Optimizers: the MultiOptimizer family, per-parameter optimizers and curvature-based steps."""

from curvkit.optim.adagrad_rmsprop import AdagradRMSProp
from curvkit.optim.clipped_adam import ClippedAdam
from curvkit.optim.multi import (
    MixedMultiOptimizer,
    MultiOptimizer,
    PerParamMultiOptimizer,
    TorchMultiOptimizer,
)
from curvkit.optim.per_param import PerParamLRScheduler, PerParamOptim

__all__ = [
    "AdagradRMSProp",
    "ClippedAdam",
    "MixedMultiOptimizer",
    "MultiOptimizer",
    "PerParamLRScheduler",
    "PerParamMultiOptimizer",
    "PerParamOptim",
    "TorchMultiOptimizer",
]
