"""Pyro's ``pyro.optim.clipped_adam``: :class:`ClippedAdam` with Pyro's defaults."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from curvkit.optim import clipped_adam


class ClippedAdam(clipped_adam.ClippedAdam):
    """:class:`curvkit.optim.ClippedAdam` with Pyro's signature and placement of ``eps``.

    ``eps`` is added before the bias correction (``corrected_eps=False``), so that this takes
    the steps of Pyro's ``ClippedAdam``.

    Args:
        params: Tensors or dicts of parameter groups, as for any :class:`torch.optim.Optimizer`.
        lr: Learning rate before the first decay.
        betas: Decay rates of the moving averages of the gradient and of its square.
        eps: Added to the root of the second moment before the bias correction.
        weight_decay: Coefficient of the L2 penalty added to the gradient.
        clip_norm: Bound of every gradient entry.
        lrd: Factor multiplying the learning rate at every step.
        centered_variance: Average the squared deviation of the gradient from its moving mean.
        corrected_eps: Add ``eps`` after the bias correction instead, as
            :class:`torch.optim.Adam` does.
        differentiable: Keep the update in autograd's graph.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip_norm: float = 10.0,
        lrd: float = 1.0,
        centered_variance: bool = False,
        *,
        corrected_eps: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            clip_norm,
            lrd,
            centered_variance=centered_variance,
            corrected_eps=corrected_eps,
            differentiable=differentiable,
        )
