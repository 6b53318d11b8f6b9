r"""The losses whose gradients influence functions compare.

Influence scores use each example's own loss, :math:`\ell_x`, summed over the example's outputs
and positions: the batch loss with ``reduction="sum"``. A user's ``mean`` reduction only scales
the gradients and the curvature, and those scales cancel in kronfluence's conventions, so
:func:`summed_loss` turns every loss into its sum first: scores then do not depend on the
reduction, nor on how the data is batched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvkit import losses
from curvkit.losses import LossFunction

__all__ = ["QueryLoss", "gradient_columns", "summed_loss"]

#: ``query_loss_fn(outputs, targets)``: a scalar, the sum of the examples' measurements.
QueryLoss = Callable[[Tensor, Any], Tensor]


def summed_loss(loss_fn: LossFunction) -> LossFunction:
    """The same loss with ``reduction="sum"``, without changing ``loss_fn``.

    A ``torch.nn`` loss (or any module with a ``reduction`` attribute) is copied with its
    reduction set to ``"sum"``, so that curvkit's closed forms for it still apply; any other
    callable is multiplied by its normalisation (:func:`curvkit.losses.normalization`).

    Args:
        loss_fn: The training loss, with a ``mean`` or ``sum`` reduction.

    Returns:
        The summed loss.

    Raises:
        TypeError: If ``loss_fn`` is not callable.
        ValueError: If its reduction is neither ``"mean"`` nor ``"sum"``.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}")
    reduction = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, nn.Module) and reduction is not None:
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{type(loss_fn).__name__}(reduction={reduction!r}) does not return a scalar "
                "batch loss; use reduction='mean' or reduction='sum'"
            )
        if reduction == "sum":
            return loss_fn
        # A shallow copy shares the loss's weights; only the copy's reduction changes.
        summed = copy.copy(loss_fn)
        summed.reduction = "sum"
        return summed

    def total(outputs: Tensor, targets: Any) -> Tensor:
        return losses.normalization(loss_fn, outputs, targets) * loss_fn(outputs, targets)

    return total


def gradient_columns(loss: QueryLoss, targets: Any) -> Callable[[Tensor], Tensor]:
    """The engine's column function that pushes back the gradient of ``loss`` at the outputs.

    The engine reads each sample's rows of the column, so the factors it returns hold every
    example's own gradient: that of its term of ``loss``.

    Args:
        loss: A scalar function of the outputs and the targets, a sum over examples.
        targets: The batch's targets.

    Returns:
        ``outputs -> [1, *outputs.shape]``.
    """

    def columns(outputs: Tensor) -> Tensor:
        outputs = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            value = loss(outputs, targets)
            if not isinstance(value, Tensor) or value.dim() != 0:
                raise ValueError(
                    "the loss whose gradients are scored must return a scalar (the sum over the "
                    f"examples it is given), got {value!r:.80}"
                )
            (gradient,) = torch.autograd.grad(value, outputs, allow_unused=True)
        if gradient is None:
            gradient = torch.zeros_like(outputs)
        return gradient.detach().unsqueeze(0)

    return columns
