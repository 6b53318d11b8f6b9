r"""The Jacobians laplace-torch's GLM predictive asks for, planned against a memory budget.

laplace-torch's GLM predictive multiplies the posterior covariance with the Jacobians
:math:`J \in \mathbb R^{B \times C \times P}` of the :math:`C` outputs of :math:`B` inputs with
respect to the :math:`P` parameters; its interface returns them whole. :func:`jacobians` checks
their size against the budget before anything is allocated (a model with 1000 classes and 10M
parameters asks for 40 GB per input in float32) and refuses with the estimate, and otherwise
computes them with curvkit's engine: the identity pushed back as square-root columns,
:math:`v_{n,c} = J_n^\top e_c`, a chunk of output columns per backward pass under the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.engines import iter_factors
from curvkit.engines.memory import MemoryPlan, MemoryPlanError

__all__ = ["check_jacobians", "jacobians"]


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.3g} GiB"


def check_jacobians(
    outputs: Tensor, num_params: int, max_memory: int | None, *, hint: str = ""
) -> None:
    """Refuse a ``[B, C, P]`` Jacobian that does not fit the budget, before allocating it.

    Args:
        outputs: The model's outputs ``[B, C]`` on the inputs (shape, dtype, device are read).
        num_params: :math:`P`.
        max_memory: The budget in bytes (``None``: curvkit's default, half the available
            memory; :mod:`curvkit.engines.memory`).
        hint: What the caller can do instead, appended to the message.

    Raises:
        MemoryPlanError: If the Jacobians (and the engine's columns) exceed the budget.
    """
    num_bytes = outputs.numel() * num_params * outputs.element_size()
    budget = MemoryPlan(max_memory, 0).budget(outputs.device, num_bytes)
    if num_bytes > budget:
        raise MemoryPlanError(
            f"laplace-torch asks for the Jacobians of {outputs.shape[-1]} outputs of "
            f"{outputs.shape[0]} inputs with respect to {num_params} parameters, a "
            f"[{outputs.shape[0]}, {outputs.shape[-1]}, {num_params}] tensor of about "
            f"{_gib(num_bytes)}, over the budget of {_gib(budget)} (max_memory). Pass fewer "
            f"inputs at a time or a larger max_memory in backend_kwargs{hint}."
        )


class _IdentityColumns:
    """The columns :math:`e_c` for every sample, ``[C, B, C]``, built a slice at a time."""

    def __init__(self, outputs: Tensor) -> None:
        self.outputs = outputs
        self.shape = torch.Size((outputs.shape[-1], *outputs.shape))

    def __getitem__(self, index: tuple[slice, slice]) -> Tensor:
        columns, samples = index
        num_outputs = self.outputs.shape[-1]
        eye = torch.eye(num_outputs, dtype=self.outputs.dtype, device=self.outputs.device)
        num_samples = len(range(*samples.indices(self.outputs.shape[0])))
        return eye[columns].unsqueeze(1).expand(-1, num_samples, -1).contiguous()


def jacobians(
    model: nn.Module,
    inputs: Tensor | tuple | Mapping[str, Any],
    params: Sequence[Tensor],
    max_memory: int | None,
) -> tuple[Tensor, Tensor]:
    """The Jacobians ``[B, C, P]`` of the model's outputs and the outputs ``[B, C]``.

    Args:
        model: The model; its outputs must be ``[B, C]``.
        inputs: Its input tensor, a tuple of positional inputs or a dict of keyword inputs.
        params: The parameters, in the order of the Jacobians' last axis.
        max_memory: The budget in bytes (``None``: curvkit's default).

    Returns:
        ``(Js, f)``, both detached.

    Raises:
        ValueError: If the outputs are not ``[B, C]``.
        MemoryPlanError: If the Jacobians do not fit the budget (:func:`check_jacobians`).
    """
    if isinstance(inputs, Mapping):
        engine_inputs: Any = dict(inputs)
        with torch.no_grad():
            outputs = model(**inputs)
    else:
        engine_inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        with torch.no_grad():
            outputs = model(*engine_inputs)
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        raise ValueError(
            "laplace-torch's Jacobians need outputs of shape [batch, outputs], got "
            f"{getattr(outputs, 'shape', type(outputs).__name__)}"
        )
    num_params = sum(p.numel() for p in params)
    check_jacobians(outputs, num_params, max_memory)
    plan = MemoryPlan(max_memory, 0)
    js = outputs.new_empty(outputs.shape[1], outputs.shape[0], num_params)
    chunks = iter_factors(
        model,
        engine_inputs,
        list(params),
        lambda _: _IdentityColumns(outputs),
        column_chunk_size=lambda k, b: plan.column_chunk_size(k, b, outputs.device, whole=False),
    )
    for chunk in chunks:
        start = 0
        for factor in chunk.factors:
            size = factor.param_shape.numel()
            block = js[chunk.columns, chunk.samples, start : start + size]
            block.copy_(factor.dense().reshape(block.shape))
            start += size
    return js.transpose(0, 1), outputs
