"""Dense, differentiable Jacobians for the GLM predictive with ``enable_backprop=True``.

The memory-bounded path of :mod:`curvkit.laplace.functional` detaches its result; when the
predictive must be differentiable in the inputs (Bayesian optimisation), the Jacobian
``[B, C, P]`` is built with :func:`torch.func.jacrev` instead, after checking it fits the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from curvkit.core.model_io import output_tensor
from curvkit.engines.memory import MemoryPlanError
from curvkit.laplace.functional import budget_for

__all__ = ["dense_jacobians"]


def dense_jacobians(
    model: nn.Module, inputs: Any, params: Sequence[Tensor], max_memory: int | None
) -> tuple[Tensor, Tensor]:
    """``(Js [B, C, P], f [B, C])``, both differentiable in the inputs."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    keys = [names[id(p)] for p in params]

    def outputs(values: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        args = () if isinstance(inputs, Mapping) else (inputs,)
        kwargs = dict(inputs) if isinstance(inputs, Mapping) else {}
        out = output_tensor(
            functional_call(model, dict(zip(keys, values, strict=True)), args, kwargs)
        )
        return out, out

    with_probe = output_tensor(model(**inputs) if isinstance(inputs, Mapping) else model(inputs))
    need = with_probe.numel() * sum(p.numel() for p in params) * with_probe.element_size()
    budget = budget_for(max_memory, with_probe.device)
    if need > budget:
        raise MemoryPlanError(
            f"enable_backprop=True needs the dense Jacobian ({need / 2**20:.1f} MiB), above the "
            f"budget of {budget / 2**20:.1f} MiB: predict fewer samples at once or raise max_memory"
        )
    jac, f = jacrev(outputs, has_aux=True)(tuple(params))
    flat = [j.reshape(*f.shape, -1) for j in jac]
    return torch.cat(flat, dim=-1), f
