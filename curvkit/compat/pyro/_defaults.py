"""Pyro's defaults for curvkit's Adam variants, shared by the Pyro-named modules."""

from __future__ import annotations

from typing import Any, TypeVar

from curvkit.optim.base import with_defaults

_Class = TypeVar("_Class", bound=type)


def with_pyro_eps(base: _Class, module: str, **changes: Any) -> _Class:
    """``base`` with Pyro's signature and placement of ``eps`` (before the bias correction).

    Args:
        base: curvkit's class (``ClippedAdam`` or ``DCTAdam``).
        module: The Pyro-named module the subclass is defined in.
        **changes: Further arguments of :func:`curvkit.optim.base.with_defaults`.

    Returns:
        The subclass, which takes the steps of Pyro's class of the same name.
    """
    summary = f""":class:`curvkit.optim.{base.__name__}` with the signature and defaults of Pyro's.

    ``eps`` is added before the bias correction (``corrected_eps=False``), so that this takes
    the steps of Pyro's ``{base.__name__}``.
    """
    return with_defaults(base, summary, module=module, corrected_eps=False, **changes)
