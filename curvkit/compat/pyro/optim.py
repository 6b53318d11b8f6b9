"""Pyro's ``pyro.optim.optim``: :class:`~curvkit.optim.PyroOptim` and Pyro's optimizer wrappers."""

from curvkit.compat.pyro import adagrad_rmsprop, clipped_adam, dct_adam
from curvkit.optim.pyro_optim import PyroOptim, is_scheduler, pyro_wrapper

__all__ = ["AdagradRMSProp", "ClippedAdam", "DCTAdam", "PyroOptim", "is_scheduler"]

AdagradRMSProp = pyro_wrapper(
    adagrad_rmsprop.AdagradRMSProp,
    module=__name__,
    options="Its options (``eta``, ``delta``, ``t``), or a callable returning them.",
    clipping=False,
    reference="curvkit.optim.AdagradRMSProp",
)
ClippedAdam = pyro_wrapper(clipped_adam.ClippedAdam, module=__name__, clipping=False)
DCTAdam = pyro_wrapper(dct_adam.DCTAdam, module=__name__, clipping=False)
