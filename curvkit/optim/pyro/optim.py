"""Pyro's ``pyro.optim.optim``: :class:`~curvkit.optim.PyroOptim` and Pyro's optimizer wrappers."""

from __future__ import annotations

from typing import Any

from curvkit.optim.pyro import adagrad_rmsprop, clipped_adam, dct_adam
from curvkit.optim.pyro_optim import PyroOptim, is_scheduler

__all__ = ["AdagradRMSProp", "ClippedAdam", "DCTAdam", "PyroOptim", "is_scheduler"]


def AdagradRMSProp(optim_args: dict[str, Any]) -> PyroOptim:
    """Wrap :class:`curvkit.optim.AdagradRMSProp` in a :class:`~curvkit.optim.PyroOptim`.

    Args:
        optim_args: Its options (``eta``, ``delta``, ``t``), or a callable returning them.

    Returns:
        The per-parameter optimizer.
    """
    return PyroOptim(adagrad_rmsprop.AdagradRMSProp, optim_args)


def ClippedAdam(optim_args: dict[str, Any]) -> PyroOptim:
    """Wrap :class:`curvkit.optim.pyro.clipped_adam.ClippedAdam` in a ``PyroOptim``.

    Args:
        optim_args: Its options, or a callable returning them.

    Returns:
        The per-parameter optimizer.
    """
    return PyroOptim(clipped_adam.ClippedAdam, optim_args)


def DCTAdam(optim_args: dict[str, Any]) -> PyroOptim:
    """Wrap :class:`curvkit.optim.pyro.dct_adam.DCTAdam` in a :class:`~curvkit.optim.PyroOptim`.

    Args:
        optim_args: Its options, or a callable returning them.

    Returns:
        The per-parameter optimizer.
    """
    return PyroOptim(dct_adam.DCTAdam, optim_args)
