"""Pyro's ``pyro.optim.dct_adam``: :class:`DCTAdam` with Pyro's defaults."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from curvkit.optim import dct_adam


class DCTAdam(dct_adam.DCTAdam):
    """:class:`curvkit.optim.DCTAdam` with Pyro's placement of ``eps``.

    ``eps`` is added before the bias correction (``corrected_eps=False``), so that this takes
    the steps of Pyro's ``DCTAdam``.

    Args:
        params: Tensors or dicts of parameter groups, as for any :class:`torch.optim.Optimizer`.
        lr: Learning rate before the first decay.
        betas: Decay rates of the moving averages of the gradient and of its square.
        eps: Added to the root of the second moment before the bias correction.
        clip_norm: Bound of every gradient entry.
        lrd: Factor multiplying the learning rate at every step.
        subsample_aware: Update only the subsampled entries of parameters that say which.
        corrected_eps: Add ``eps`` after the bias correction instead.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip_norm: float = 10.0,
        lrd: float = 1.0,
        subsample_aware: bool = False,
        *,
        corrected_eps: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, clip_norm, lrd, subsample_aware, corrected_eps=corrected_eps
        )
