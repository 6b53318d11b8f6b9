"""Pyro's ``pyro.optim.clipped_adam``: :class:`ClippedAdam` with Pyro's defaults."""

from curvkit.compat.pyro._defaults import with_pyro_eps
from curvkit.optim import clipped_adam

ClippedAdam = with_pyro_eps(clipped_adam.ClippedAdam, __name__, positional=["centered_variance"])
