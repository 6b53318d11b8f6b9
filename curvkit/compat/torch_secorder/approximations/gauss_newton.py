r"""torch-secorder's ``gauss_newton_matrix_approximation``, through curvkit's engine.

torch-secorder defines the Gauss-Newton diagonal of a least-squares problem as
:math:`\operatorname{diag}(J_r^\top J_r)` for the residuals :math:`r = f(x) - y`, whatever the
reduction of the loss, and computes it with one autograd call per output entry. curvkit's
:func:`curvkit.gauss_newton_diagonal` computes the GGN of the loss as reduced, in one batched
backward pass; for ``MSELoss(reduction="sum")`` that is :math:`2 \operatorname{diag}(J^\top J)`,
so half of it is torch-secorder's quantity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvkit import gauss_newton_diagonal

__all__ = ["gauss_newton_matrix_approximation"]


def _is_mse(loss_fn: object) -> bool:
    # torch-secorder's test: an MSELoss, or a callable whose text names mse_loss or MSELoss
    # (F.mse_loss, a functools.partial of it, a subclass of MSELoss).
    return isinstance(loss_fn, nn.MSELoss) or (
        callable(loss_fn) and ("mse_loss" in str(loss_fn) or "MSELoss" in str(loss_fn.__class__))
    )


def gauss_newton_matrix_approximation(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    create_graph: bool = False,
) -> list[Tensor]:
    r"""The diagonal of the Gauss-Newton matrix :math:`J_r^\top J_r` of a least-squares loss.

    torch-secorder's function of the same name and signature:

    .. math::
        \operatorname{diag}\big(J_r^\top J_r\big)
        = \sum_{i} \Big(\frac{\partial r_i}{\partial \theta}\Big)^{\odot 2},
        \qquad r = f(x; \theta) - y,

    the sum over every entry of the outputs, unscaled by the loss's reduction (``"mean"`` and
    ``"sum"`` give the same result). It is computed as half of
    :func:`curvkit.gauss_newton_diagonal` for ``nn.MSELoss(reduction="sum")``, in one batched
    backward pass instead of one per output entry.

    Unlike torch-secorder, the parameters' ``.grad`` are left as they are (torch-secorder zeroes
    them when ``create_graph`` is False), and a parameter that the outputs do not depend on
    gets a zero diagonal (torch-secorder leaves it out of the list).

    Args:
        model: The network; ``model(inputs)`` returns the outputs with the batch dimension
            first, as for :func:`curvkit.quantities.ggn.diag_ggn`.
        loss_fn: ``nn.MSELoss`` or ``F.mse_loss`` (any reduction): it is only checked, the
            quantity does not depend on it.
        inputs: The batch's inputs.
        targets: The regression targets, shaped like the outputs.
        create_graph: Keep the result differentiable with respect to the parameters.

    Returns:
        The diagonal for every parameter of the model that requires grad, shaped like it.

    Raises:
        ValueError: If ``loss_fn`` is not MSE-based (the same error as torch-secorder's).
    """
    if not _is_mse(loss_fn):
        raise ValueError(
            "Gauss-Newton Matrix approximation is typically used with MSE-based loss functions "
            "for least-squares problems. Please use `nn.MSELoss` or `F.mse_loss`. "
            "(curvkit.diag_ggn gives the generalised Gauss-Newton diagonal of other losses.)"
        )
    diagonal = gauss_newton_diagonal(
        model, nn.MSELoss(reduction="sum"), inputs, targets, create_graph=create_graph
    )
    # Halving is exact in floating point: the result is the sum-MSE GGN's, bit for bit.
    return [torch.mul(block, 0.5) for block in diagonal]
