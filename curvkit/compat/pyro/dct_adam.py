"""Pyro's ``pyro.optim.dct_adam``: :class:`DCTAdam` with Pyro's defaults."""

from curvkit.compat.pyro._defaults import with_pyro_eps
from curvkit.optim import dct_adam

DCTAdam = with_pyro_eps(dct_adam.DCTAdam, __name__)
