"""Pyro's ``pyro.optim.multi``: the MultiOptimizer family, from :mod:`curvkit.optim`."""

from curvkit.optim.multi import (
    MixedMultiOptimizer,
    MultiOptimizer,
    PyroMultiOptimizer,
    TorchMultiOptimizer,
)
from curvkit.optim.newton import Newton

__all__ = [
    "MixedMultiOptimizer",
    "MultiOptimizer",
    "Newton",
    "PyroMultiOptimizer",
    "TorchMultiOptimizer",
]
