"""Pyro's ``pyro.optim.clipped_adam``: :class:`ClippedAdam` with Pyro's defaults."""

from __future__ import annotations

from typing import Any, TypeVar

from curvkit.optim import clipped_adam
from curvkit.optim.base import with_defaults

_Class = TypeVar("_Class", bound=type)


def _with_pyro_eps(base: _Class, module: str, **changes: Any) -> _Class:
    # Pyro's ClippedAdam and DCTAdam add eps before the bias correction.
    summary = f""":class:`curvkit.optim.{base.__name__}` with the signature and defaults of Pyro's.

    ``eps`` is added before the bias correction (``corrected_eps=False``), so that this takes
    the steps of Pyro's ``{base.__name__}``.
    """
    return with_defaults(base, summary, module=module, corrected_eps=False, **changes)


ClippedAdam = _with_pyro_eps(clipped_adam.ClippedAdam, __name__, positional=["centered_variance"])
