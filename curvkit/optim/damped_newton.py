r"""An optimizer taking directionally damped Newton steps along GGN eigenvectors (ViViT's method).

Each step computes, per parameter group, the step of :func:`curvkit.damped_newton_step`

.. math::

    s = -\sum_k \frac{\nabla L^\top e_k}{\lambda_k + \delta_k} e_k

on the current batch (:math:`e_k`, :math:`\lambda_k`: the GGN eigenpairs that the group's
criterion selects; :math:`\delta_k`: its damping) and moves the group's parameters by
:math:`\eta s` with the group's learning rate :math:`\eta`. The curvature work is done by
:mod:`curvkit.quantities.directional`; this class only holds the options and applies the update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.core.groups import normalize_param_groups
from curvkit.losses import check_mc_samples
from curvkit.quantities.directional import GROUP_DEFAULTS, damped_newton_step_and_loss

__all__ = ["DampedNewton"]


class DampedNewton(torch.optim.Optimizer):
    r"""Directionally damped Newton steps on a model, with ``torch.optim``-style param groups.

    Example:
        >>> optimizer = DampedNewton(model, nn.CrossEntropyLoss(), criterion=curvkit.top_k(10))
        >>> for inputs, targets in loader:
        ...     loss = optimizer.step((inputs, targets))

    Each group is one diagonal block of the GGN (one group: the full GGN; one per layer: its
    block-diagonal approximation) and may set ``"lr"``, ``"damping"`` and ``"criterion"``; the
    keyword arguments are the defaults for groups that do not.

    Args:
        model: The network; use ``model.eval()`` if it has batch normalisation.
        loss_fn: ``loss_fn(outputs, targets)``, the scalar batch loss (``mean`` or ``sum``).
        param_groups: ``None`` (every parameter requiring grad, one group), parameters, or dicts
            ``{"params": ..., "lr": ..., "damping": ..., "criterion": ...}``.
        lr: Learning rate :math:`\eta`, positive: the update is :math:`\eta s`.
        damping: A non-negative number, or ``damping(evals, evecs, gammas, lambdas) -> Tensor
            [K]`` (see :mod:`curvkit.quantities.directional`).
        criterion: ``criterion(evals) -> list[int]`` selecting the directions; ``None`` keeps the
            eigenvalues above a relative threshold (:func:`curvkit.default_criterion`).
            :func:`curvkit.top_k` is the usual choice and the fastest.
        mc_samples: ``0`` for the exact GGN, else the number of Monte-Carlo samples of the loss
            Hessian per sample.

    Raises:
        TypeError: If ``model`` is not a module or ``mc_samples`` not an int.
        ValueError: For a non-positive or non-finite learning rate, a negative ``mc_samples``, or
            invalid groups (see :func:`curvkit.core.groups.normalize_param_groups`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        param_groups: Any = None,
        *,
        lr: float = 1.0,
        damping: float | Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = 1.0,
        criterion: Callable[[Tensor], Sequence[int]] | None = None,
        mc_samples: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_mc_samples(mc_samples)
        defaults = {**GROUP_DEFAULTS, "lr": lr, "damping": damping, "criterion": criterion}
        groups = normalize_param_groups(param_groups, model, defaults)
        for index, group in enumerate(groups):
            _check_lr(group["lr"], index)
        super().__init__(groups, defaults)
        self.model = model
        self.loss_fn = loss_fn
        self.mc_samples = mc_samples

    def step(  # type: ignore[override]
        self, batch: tuple[Any, Tensor], *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Take one damped Newton step on a batch; update the parameters in place.

        Args:
            batch: ``(inputs, targets)``.
            generator: Random number generator for the Monte-Carlo samples.

        Returns:
            The batch loss before the step (detached).
        """
        for index, group in enumerate(self.param_groups):
            _check_lr(group["lr"], index)
        groups = [
            {"params": g["params"], "criterion": g["criterion"], "damping": g["damping"]}
            for g in self.param_groups
        ]
        loss, steps = damped_newton_step_and_loss(
            self.model, self.loss_fn, batch, groups, self.mc_samples, generator
        )
        with torch.no_grad():
            for group, group_step in zip(self.param_groups, steps, strict=True):
                for param, update in zip(group["params"], group_step, strict=True):
                    param.add_(update, alpha=group["lr"])
        return loss


def _check_lr(lr: Any, index: int) -> None:
    if (
        isinstance(lr, bool)
        or not isinstance(lr, int | float)
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise ValueError(f"'lr' of group {index} must be a positive finite number, got {lr!r}")
