"""Pyro's ``pyro.optim.adagrad_rmsprop``: curvkit's :class:`AdagradRMSProp` (Pyro's steps)."""

from curvkit.optim.adagrad_rmsprop import AdagradRMSProp

__all__ = ["AdagradRMSProp"]
