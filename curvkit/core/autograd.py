"""Vector-Jacobian products for many vectors at once, with a loop where torch cannot batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["batched_grad"]


def batched_grad(
    outputs: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    vectors: Sequence[Tensor],
) -> list[Tensor]:
    r"""The products :math:`J^\top v_j` of ``outputs``' Jacobian with stacked vectors.

    One backward pass batched over the :math:`J` vectors (``is_grads_batched``); an operation
    without a batching rule for it falls back to one pass per vector. The graph is kept, and an
    input the outputs do not depend on gets zeros.

    Args:
        outputs: A tensor or tensors that depend on ``inputs``.
        inputs: The tensors to differentiate with respect to.
        vectors: One ``[J, *output.shape]`` per output.

    Returns:
        One ``[J, *input.shape]`` per input.
    """
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    num = vectors[0].shape[0]
    if num == 1:
        return [g.unsqueeze(0) for g in _grads(outputs, inputs, [v[0] for v in vectors])]
    try:
        parts = torch.autograd.grad(
            outputs,
            inputs,
            list(vectors),
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=True,
        )
    except RuntimeError:
        columns = [_grads(outputs, inputs, [v[j] for v in vectors]) for j in range(num)]
        return [torch.stack(parts) for parts in zip(*columns, strict=True)]
    # Materialised zeros of an input the outputs do not depend on lack the batch axis.
    return [
        part if part.shape == (num, *x.shape) else x.new_zeros(num, *x.shape)
        for part, x in zip(parts, inputs, strict=True)
    ]


def _grads(outputs: list[Tensor], inputs: Sequence[Tensor], vectors: list[Tensor]) -> tuple:
    return torch.autograd.grad(
        outputs, inputs, vectors, retain_graph=True, allow_unused=True, materialize_grads=True
    )
