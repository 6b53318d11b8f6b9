"""The step-size sequence of ADVI: an Adagrad/RMSProp mix (Kucukelbir et al., 2017)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from curvkit.optim.base import PerTensorOptimizer, fill_optimizer_docs


@fill_optimizer_docs
class AdagradRMSProp(PerTensorOptimizer):
    r"""The adaptive step size of equations 10 and 11 of Kucukelbir et al. (2017).

    With gradient :math:`g_k` at step :math:`k = 1, 2, \dots`, a moving average of its square

    .. math::
        s_1 = g_1^2, \qquad s_k = t\, g_k^2 + (1 - t)\, s_{k-1},

    scales the step of every entry:

    .. math::
        x_k = x_{k-1} - \eta\, k^{-1/2 + \delta} \frac{g_k}{1 + \sqrt{s_k}}.

    Reference: A. Kucukelbir, D. Tran, R. Ranganath, A. Gelman, D. M. Blei, "Automatic
    Differentiation Variational Inference", JMLR 18, 2017.

    Args:
        params: {params}
        eta: Scale :math:`\eta > 0` of the step size.
        delta: Small :math:`\delta \ge 0` in the exponent of the step-size decay.
        t: Weight :math:`t \in (0, 1]` of the newest squared gradient in the moving average.
        differentiable: {differentiable}

    Raises:
        ValueError: If ``eta``, ``delta`` or ``t`` is out of its range.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        eta: float = 1.0,
        delta: float = 1e-16,
        t: float = 0.1,
        *,
        differentiable: bool = False,
    ) -> None:
        if not eta > 0.0:
            raise ValueError(f"eta must be > 0, got {eta}.")
        if not delta >= 0.0:
            raise ValueError(f"delta must be >= 0, got {delta}.")
        if not 0.0 < t <= 1.0:
            raise ValueError(f"t must be in (0, 1], got {t}.")
        defaults = {"eta": eta, "delta": delta, "t": t, "differentiable": differentiable}
        super().__init__(params, defaults)

    def _update(self, param: Tensor, group: dict[str, Any]) -> None:
        grad = param.grad
        state = self.state[param]
        state["step"] = state.get("step", 0) + 1
        step = state["step"]
        squared = grad * grad
        if step == 1:
            state["sum"] = squared
        else:
            state["sum"] = group["t"] * squared + (1.0 - group["t"]) * state["sum"]
        step_size = group["eta"] * step ** (-0.5 + group["delta"])
        param.addcdiv_(grad, 1.0 + state["sum"].sqrt(), value=-step_size)
