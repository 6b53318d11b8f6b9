"""Pushing many columns back through a recorded graph at once (see :func:`backpropagate`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.func import vmap

__all__ = ["PER_COLUMN_BACKWARD_ENTRIES", "backpropagate", "batching_fallback_allowed"]


@contextmanager
def batching_fallback_allowed() -> Iterator[None]:
    """Silence torch's notice that an operator without a batching rule runs in a loop.

    Under :func:`torch.func.vmap`, such an operator (CPU flash attention and its backward in
    torch 2.13) is evaluated once per batch entry: still exact, and no slower than the loops
    the engine would otherwise fall back to, so the notice tells a curvkit user nothing.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because")
        yield


#: Per-column size (entries of all recorded outputs) from which the columns of a convolutional
#: graph are pushed back one at a time rather than under :func:`torch.func.vmap` (see
#: :func:`backpropagate`).
PER_COLUMN_BACKWARD_ENTRIES = 2**18


def _backward_per_column(
    outputs: Tensor, targets: list[Tensor], columns: Tensor, retain_graph: bool
) -> list[Tensor | None]:
    if len(columns) == 1:
        grads = torch.autograd.grad(
            outputs, targets, grad_outputs=columns[0], retain_graph=retain_graph, allow_unused=True
        )
        return [None if g is None else g.unsqueeze(0) for g in grads]
    # Each column's results go straight into one buffer per target: stacking the columns at
    # the end would hold every result twice.
    buffers: list[Tensor | None] = []
    for k, column in enumerate(columns):
        grads = torch.autograd.grad(
            outputs,
            targets,
            grad_outputs=column,
            retain_graph=retain_graph or k + 1 < len(columns),
            allow_unused=True,
        )
        if k == 0:
            buffers = [None if g is None else g.new_empty(len(columns), *g.shape) for g in grads]
        for buffer, grad in zip(buffers, grads, strict=True):
            if buffer is not None:
                buffer[k] = grad
    return buffers


def backpropagate(
    outputs: Tensor,
    targets: list[Tensor],
    columns: Tensor,
    *,
    create_graph: bool,
    retain_graph: bool,
    convolutional: bool = False,
) -> list[Tensor | None]:
    """All columns pushed back from ``outputs`` to ``targets``.

    Returns, per target, ``[K, *target.shape]`` (``None`` where nothing flows back). Three ways,
    chosen by measurement (figures in docs/benchmarks.md, "The engine's design measurements"):

    - by default: :func:`torch.func.vmap` over ``torch.autograd.grad``, one backward pass on
      all columns (faster than a loop of backward passes, whose results would also be copied
      into one buffer per target, and as fast as ``is_grads_batched``);
    - ``convolutional`` graphs (a convolution or pooling ran on the samples) with large
      recorded outputs (from :data:`PER_COLUMN_BACKWARD_ENTRIES` entries per column): one
      backward pass per column, which is then cheap per operator (``vmap``'s pooling rules
      copy the pooled input once per column, and ``is_grads_batched`` falls back to loops per
      operator);
    - ``create_graph``: ``is_grads_batched``, whose results stay correctly differentiable.

    A backward pass that cannot be batched (data-dependent control flow in a custom
    ``autograd.Function``) is run once per column. With ``retain_graph=False`` the graph's
    buffers are freed by the last backward pass of the per-column way (the other ways keep them
    until the recording goes).
    """
    if create_graph:
        return list(
            torch.autograd.grad(
                outputs,
                targets,
                grad_outputs=columns,
                retain_graph=True,
                create_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
    large = sum(t.numel() for t in targets) >= PER_COLUMN_BACKWARD_ENTRIES
    if len(columns) == 1 or (convolutional and large):
        return _backward_per_column(outputs, targets, columns, retain_graph)
    unused: list[bool] = []

    def one_column(column: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(
            outputs, targets, grad_outputs=column, retain_graph=True, allow_unused=True
        )
        unused[:] = [g is None for g in grads]
        # vmap returns tensors only: a scalar stands in where nothing flows back.
        return tuple(column.new_zeros(()) if g is None else g for g in grads)

    try:
        with batching_fallback_allowed():
            results = vmap(one_column)(columns)
    except RuntimeError:
        return _backward_per_column(outputs, targets, columns, retain_graph)
    return [None if skip else g for skip, g in zip(unused, results, strict=True)]
