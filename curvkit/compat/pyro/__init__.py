"""Pyro's ``pyro.optim`` by its own names, without Pyro: import ``curvkit.compat.pyro`` instead.

The module and its submodules (``optim``, ``lr_scheduler``, ``multi``, ``clipped_adam``,
``adagrad_rmsprop``, ``dct_adam``, ``pytorch_optimizers``) have the names, signatures and
semantics of Pyro's, so that code written for :mod:`pyro.optim` runs with its import changed:

- :class:`~curvkit.optim.PyroOptim`, :class:`~curvkit.optim.PyroLRScheduler`;
- a function per torch optimizer and scheduler (``Adam``, ``SGD``, ..., ``StepLR``,
  ``ReduceLROnPlateau``, ...) returning one of them, and ``ClippedAdam``, ``AdagradRMSProp``,
  ``DCTAdam`` wrapping the optimizer classes of the same names;
- the MultiOptimizer family of ``pyro.optim.multi``, including
  :class:`~curvkit.optim.PyroMultiOptimizer` and :class:`~curvkit.optim.Newton`.

Pyro names a parameter through its global parameter store; here a parameter is named by its key
in a dict passed to the optimizer, or by :meth:`~curvkit.optim.PyroOptim.name_params`. The
migration guide lists where the behaviour differs from Pyro's.
"""

from curvkit.compat.pyro import (
    adagrad_rmsprop,
    clipped_adam,
    dct_adam,
    lr_scheduler,
    multi,
    optim,
    pytorch_optimizers,
)
from curvkit.compat.pyro.lr_scheduler import *  # noqa: F403
from curvkit.compat.pyro.multi import *  # noqa: F403
from curvkit.compat.pyro.optim import *  # noqa: F403
from curvkit.compat.pyro.pytorch_optimizers import *  # noqa: F403 (made from torch's list)

# Pyro's names, in order: its submodules and what pyro.optim takes from them, then the wrappers.
__all__ = [
    "adagrad_rmsprop",
    "clipped_adam",
    "dct_adam",
    "lr_scheduler",
    "multi",
    "optim",
    "pytorch_optimizers",
]
__all__ += [*lr_scheduler.__all__, *multi.__all__, *optim.__all__]
__all__.sort()
__all__ += pytorch_optimizers.__all__
