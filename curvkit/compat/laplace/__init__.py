"""curvkit's backends for laplace-torch's own Laplace classes.

``laplace.Laplace(model, likelihood, ..., backend=CurvkitGGN)`` runs laplace-torch's classes on
curvkit's curvature: the ``full``, ``diag``, ``kron`` and ``lowrank`` structures, the gradients
and the Jacobians of its GLM predictive. The constructors are those of laplace-torch's
``CurvlinopsGGN``/``CurvlinopsEF``/``CurvlinopsHessian``, with two more keyword options:
``low_rank`` (the rank of ``eig_lowrank``) and ``max_memory`` (the budget of the Jacobians).

- :class:`CurvkitGGN`: the GGN (``stochastic=True``: the Monte-Carlo Fisher).
- :class:`CurvkitEF`: the empirical Fisher.
- :class:`CurvkitHessian`: the Hessian (``full`` and ``diag``).
- :class:`CurvkitKron`: laplace-torch's ``Kron`` that also holds one dense block for a parameter
  without Kronecker factors (LayerNorm, Embedding, ...).
- :class:`LowRankLaplace`: laplace-torch's ``LowRankLaplace`` without its ``asdfghjkl`` check.

This module needs laplace-torch (``pip install "curvkit[laplace]"``, then ``pip uninstall -y
torchvision`` where torchvision does not import beside your torch: see the README). ``import
curvkit`` never imports it.

laplace-torch's ``LowRankLaplace`` refuses to start unless a module named ``asdfghjkl`` imports,
although these backends do not use it, and the ``asdfghjkl==0.1a4`` it depends on installs a
module named ``asdl``: the check fails on every plain install. :class:`LowRankLaplace` here is
laplace-torch's class without that check, with ``CurvkitGGN`` as its default backend::

    from curvkit.compat.laplace import CurvkitGGN, LowRankLaplace

    la = LowRankLaplace(model, "classification", backend=CurvkitGGN,
                        backend_kwargs={"low_rank": 20})
    la.fit(train_loader)
"""

from __future__ import annotations

_EXTRA = (
    "curvkit.compat.laplace needs laplace-torch 0.3: pip install 'curvkit[laplace]' "
    "(then `pip uninstall -y torchvision` if torchvision does not import beside your torch)"
)

try:
    import laplace  # noqa: F401
except ImportError as error:
    raise ImportError(f"{_EXTRA}; importing laplace failed with: {error}") from error
except RuntimeError as error:
    # torchmetrics imports torchvision whenever it is installed, and a torchvision built for
    # another torch fails at import with a RuntimeError (`operator torchvision::nms does not
    # exist`); laplace-torch itself does not need torchvision.
    raise ImportError(
        f"laplace-torch did not import ({error}): torchvision is installed but does not match "
        "your torch. laplace-torch does not need it: `pip uninstall -y torchvision`."
    ) from error

from curvkit.compat.laplace.backends import CurvkitEF, CurvkitGGN, CurvkitHessian  # noqa: E402
from curvkit.compat.laplace.kron import CurvkitKron  # noqa: E402
from curvkit.compat.laplace.low_rank import LowRankLaplace  # noqa: E402

__all__ = ["CurvkitEF", "CurvkitGGN", "CurvkitHessian", "CurvkitKron", "LowRankLaplace"]
