"""Pyro's ``pyro.optim.dct_adam``: :class:`DCTAdam` with Pyro's defaults."""

from curvkit.optim import dct_adam
from curvkit.optim.pyro.clipped_adam import _with_pyro_eps

DCTAdam = _with_pyro_eps(dct_adam.DCTAdam, __name__)
