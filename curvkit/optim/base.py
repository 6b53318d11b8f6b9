"""The base of curvkit's element-wise torch optimizers (ClippedAdam, AdagradRMSProp, DCTAdam)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class PerTensorOptimizer(Optimizer):
    """A torch optimizer that updates every parameter tensor on its own.

    Subclasses implement :meth:`_update` for one tensor with a dense gradient, and may decay
    a group's options once per step in :meth:`_start_group`. A state saved by another
    implementation (Pyro's ClippedAdam, AdagradRMSProp, DCTAdam) or an older version may lack
    options such as ``corrected_eps`` and ``differentiable``: loading it keeps this optimizer's
    defaults for them, where :meth:`torch.optim.Optimizer.load_state_dict` alone would drop them.
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore ``state``, filling each group's missing options from ``self.defaults``.

        Args:
            state: The optimizer's ``__dict__`` entries, as :mod:`pickle` and
                :meth:`~torch.optim.Optimizer.load_state_dict` pass them.
        """
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one update of every parameter that has a gradient.

        Args:
            closure: Optional function that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or None without one.

        Raises:
            TypeError: For a sparse gradient.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.set_grad_enabled(self.defaults.get("differentiable", False)):
            for group in self.param_groups:
                self._start_group(group)
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    if param.grad.is_sparse:
                        raise TypeError(f"{type(self).__name__} does not support sparse gradients.")
                    self._update(param, group)
        return loss

    def _start_group(self, group: dict[str, Any]) -> None:
        """Change a group's options before its parameters are stepped (nothing by default)."""

    def _update(self, param: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError
