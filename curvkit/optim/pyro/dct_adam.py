"""Pyro's ``pyro.optim.dct_adam``: :class:`DCTAdam` with Pyro's defaults."""

from curvkit.optim import dct_adam
from curvkit.optim.pyro._defaults import with_pyro_eps

DCTAdam = with_pyro_eps(dct_adam.DCTAdam, __name__)
