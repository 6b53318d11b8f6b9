r"""Likelihood names and the summed losses behind them, with laplace-torch's scaling.

laplace-torch writes a log likelihood :math:`\\log p(y \\mid f)` as ``-factor * loss`` of a loss
summed over the samples: cross-entropy with ``factor = 1`` for ``"classification"``, the squared
error with ``factor = 1/2`` for ``"regression"`` (a Gaussian of unit variance; the noise
``sigma_noise`` enters later, as :math:`1/\\sigma^2`). The curvature is that of ``factor * loss``:
for regression the GGN :math:`J^\\top J`. ``"reward_modeling"`` fits as classification (pairs of
responses) and predicts as regression.
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "LIKELIHOODS",
    "check_likelihood",
    "curvature_likelihood",
    "summed_loss",
]

#: The likelihood names laplace-torch accepts.
LIKELIHOODS = ("classification", "regression", "reward_modeling")


def check_likelihood(likelihood: str) -> str:
    """Return ``likelihood`` as a plain string after checking that it is known.

    Args:
        likelihood: ``"classification"``, ``"regression"`` or ``"reward_modeling"`` (an enum
            member of laplace-torch's ``Likelihood`` works too).

    Returns:
        The name.

    Raises:
        ValueError: For any other value.
    """
    name = getattr(likelihood, "value", likelihood)
    if name not in LIKELIHOODS:
        raise ValueError(f"Invalid likelihood type {likelihood!r}: use one of {LIKELIHOODS}")
    return str(name)


def curvature_likelihood(likelihood: str) -> str:
    """The likelihood whose curvature a fit uses: reward modeling fits as classification."""
    return "classification" if likelihood == "reward_modeling" else likelihood


def summed_loss(likelihood: str) -> tuple[nn.Module, float]:
    """The summed loss and the factor that turns it into a negative log likelihood.

    Args:
        likelihood: ``"classification"`` or ``"regression"`` (after
            :func:`curvature_likelihood`).

    Returns:
        ``(loss_fn, factor)``: ``CrossEntropyLoss(reduction="sum")`` and ``1``, or
        ``MSELoss(reduction="sum")`` and ``1/2``.
    """
    if likelihood == "regression":
        return nn.MSELoss(reduction="sum"), 0.5
    return nn.CrossEntropyLoss(reduction="sum"), 1.0
