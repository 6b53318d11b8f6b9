"""Pyro's ``pyro.optim.lr_scheduler``: :class:`~curvkit.optim.PyroLRScheduler`."""

from curvkit.optim.pyro_optim import PyroLRScheduler

__all__ = ["PyroLRScheduler"]
