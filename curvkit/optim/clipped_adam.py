"""Adam with element-wise gradient clipping and a learning rate that decays every step."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from curvkit.optim.base import PerTensorOptimizer, fill_optimizer_docs


@fill_optimizer_docs
class ClippedAdam(PerTensorOptimizer):
    r"""Adam whose gradient entries are clipped and whose learning rate decays geometrically.

    At step :math:`k` every group's learning rate is first multiplied by ``lrd``, so after
    :math:`k` steps it is :math:`\mathrm{lr}\cdot\mathrm{lrd}^k`. The gradient is clamped entry by
    entry to :math:`[-c, c]` with :math:`c` = ``clip_norm`` (the name is Pyro's; the clipping is
    element-wise, not of the norm), the L2 penalty added, and then Adam's update of Kingma and Ba
    (Algorithm 1) follows:

    .. math::
        m_k = \beta_1 m_{k-1} + (1-\beta_1) g_k, \quad
        v_k = \beta_2 v_{k-1} + (1-\beta_2) u_k^2, \quad
        x_k = x_{k-1} - \frac{\mathrm{lr}_k}{1-\beta_1^k}
              \frac{m_k}{\sqrt{v_k} / \sqrt{1-\beta_2^k} + \epsilon}

    with :math:`u_k = g_k`, or :math:`u_k = g_k - m_k` for ``centered_variance=True``. With
    ``lrd=1`` and a ``clip_norm`` larger than every gradient entry this is exactly
    :class:`torch.optim.Adam`. The gradient in ``.grad`` is never modified.

    ``corrected_eps=False`` adds :math:`\epsilon` before the bias correction instead, as Pyro's
    ``ClippedAdam`` does (the efficient form of Kingma and Ba's Section 2):

    .. math::
        x_k = x_{k-1} - \mathrm{lr}_k \frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k}
              \frac{m_k}{\sqrt{v_k} + \epsilon},

    which is the update above with :math:`\epsilon / \sqrt{1-\beta_2^k}` in place of
    :math:`\epsilon`: a larger effective :math:`\epsilon` in the first steps.

    Args:
        params: {params}
        lr: {lr}
        betas: Decay rates :math:`(\beta_1, \beta_2)` of the moving averages of the gradient and
            of its square.
        eps: :math:`\epsilon`, added to the denominator for numerical stability.
        weight_decay: Coefficient of the L2 penalty added to the gradient.
        clip_norm: {clip_norm}
        lrd: Factor :math:`\ge 0` multiplying the learning rate at every step (above 1 the
            learning rate grows).
        centered_variance: Average the squared deviation of the gradient from its moving mean
            instead of the squared gradient.
        corrected_eps: Add :math:`\epsilon` to the bias-corrected root of the second moment
            (as :class:`torch.optim.Adam`); False adds it before the correction (as Pyro).
        differentiable: {differentiable}

    Raises:
        ValueError: If ``lr``, ``betas``, ``eps``, ``weight_decay``, ``clip_norm`` or ``lrd`` is
            out of its range.
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
        *,
        centered_variance: bool = False,
        corrected_eps: bool = True,
        differentiable: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}.")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}.")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        if not clip_norm > 0.0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}.")
        if not 0.0 <= lrd < math.inf:
            raise ValueError(f"lrd must be a finite number >= 0, got {lrd}.")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "clip_norm": clip_norm,
            "lrd": lrd,
            "centered_variance": centered_variance,
            "corrected_eps": corrected_eps,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults)

    def _start_group(self, group: dict[str, Any]) -> None:
        group["lr"] *= group["lrd"]

    def _update(self, param: Tensor, group: dict[str, Any]) -> None:
        grad = param.grad.clamp(-group["clip_norm"], group["clip_norm"])
        if group["weight_decay"] != 0.0:
            grad = grad + group["weight_decay"] * param
        state = self.state[param]
        if not state:
            state["step"] = 0
        param.sub_(adam_direction(state, grad, group))


def adam_direction(state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
    """Advance Adam's moments in ``state`` by ``grad`` and return the step to subtract.

    Args:
        state: ``step`` (advanced by one; a number, or a tensor of per-entry counts shaped like
            ``grad``) and, after the first call, ``exp_avg`` and ``exp_avg_sq`` shaped like
            ``grad`` (replaced, not modified in place).
        grad: The (clipped) gradient.
        group: The parameter group: ``lr``, ``betas``, ``eps``, ``corrected_eps`` and
            optionally ``centered_variance``.

    Returns:
        The step, shaped like ``grad``.
    """
    beta1, beta2 = group["betas"]
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    state["step"] += 1
    step = state["step"]
    exp_avg = state["exp_avg"].lerp(grad, 1.0 - beta1)
    deviation = grad - exp_avg if group.get("centered_variance", False) else grad
    exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul(deviation, deviation, value=1.0 - beta2)
    state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
    sqrt = torch.sqrt if isinstance(step, Tensor) else math.sqrt
    if group["corrected_eps"]:
        denominator = (exp_avg_sq.sqrt() / sqrt(1.0 - beta2**step)).add(group["eps"])
        return exp_avg / denominator * (group["lr"] / (1.0 - beta1**step))
    step_size = group["lr"] * sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    return exp_avg / exp_avg_sq.sqrt().add(group["eps"]) * step_size
