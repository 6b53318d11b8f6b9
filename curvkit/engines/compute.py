r"""The engine: one forward pass, one batched backward pass, factors per parameter.

:func:`iter_factors` runs the model once with temporary hooks that record the inputs and
outputs of every module call using a requested parameter (:mod:`curvkit.engines.recording`),
asks the caller for the columns to push back (``backprop_columns(outputs)``, shape
``[K, *outputs.shape]``: the loss Hessian's square root, the loss gradient, ...), pushes them
back (:mod:`curvkit.engines.backward`), stopping at the recorded outputs, and turns each call's
inputs and backpropagated columns into factors with the rule registered for its module type
(:mod:`curvkit.engines.rules`). A parameter used by several calls gets the sum of their factors.
It does so in chunks of samples and columns, for batches whose factors would not fit in memory
at once; :func:`compute_factors` is its single chunk. The safety probes around the passes live in
:mod:`curvkit.engines.safety`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from curvkit.core.groups import check_params
from curvkit.core.model_io import (
    Inputs,
    call_model,
    input_tensors,
    output_tensor,
    sample_layout,
    select_samples,
)
from curvkit.engines.backward import backpropagate
from curvkit.engines.embedding import EmbeddingFactor, TiedEmbeddingFactor
from curvkit.engines.factor import DenseFactor, Factor, SumFactor, ZeroFactor
from curvkit.engines.guard import model_guard
from curvkit.engines.kronecker import DEFAULT_CHUNK_BYTES, BiasFactor, KroneckerFactor
from curvkit.engines.recording import Recording, record_forward
from curvkit.engines.rules import factors_for_call
from curvkit.engines.safety import (
    attach_probes,
    check_columns,
    check_no_unseen_uses,
    probe_first_sample,
    refuse_sample_mixing,
)
from curvkit.engines.shared import batched_shared, shared_factors

__all__ = ["FactorChunk", "compute_factors", "iter_factors"]

BackpropColumns = Callable[[Tensor], Tensor]

#: Maps the number of columns and the bytes the engine holds per column (twice the recorded
#: outputs' bytes) to the columns per backward pass (:mod:`curvkit.engines.memory`).
ColumnPlan = Callable[[int, int], int]


@dataclass
class FactorChunk:
    """The factors of a chunk of samples and columns (see :func:`iter_factors`).

    Attributes:
        samples: The samples of the batch this chunk covers.
        columns: The columns (of ``backprop_columns``' result) this chunk covers.
        outputs: The model's outputs on the chunk's samples (detached).
        factors: One factor per parameter, with ``columns`` columns and ``samples`` samples.
    """

    samples: slice
    columns: slice
    outputs: Tensor
    factors: list[Factor]


def _as_inputs(inputs: Inputs | list[Any]) -> tuple[Any, ...] | Mapping[str, Any]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    if isinstance(inputs, Mapping):
        return inputs
    raise TypeError(
        "inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(inputs).__name__}"
    )


def _output_tensors(output: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, Tensor)]


def _combine(parts: list[Factor]) -> Factor:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, KroneckerFactor) for p in parts):
        shapes = {(p.output_grads.shape[3:], p.input_shape[2:]) for p in parts}
        if len(shapes) == 1:
            return KroneckerFactor.concatenate(parts)
    if all(isinstance(p, BiasFactor) for p in parts):
        if len({p.output_grads.shape[3:] for p in parts}) == 1:
            return BiasFactor.concatenate(parts)
    if all(isinstance(p, EmbeddingFactor) for p in parts):
        return EmbeddingFactor.concatenate(parts)
    if TiedEmbeddingFactor.applies(parts):
        return TiedEmbeddingFactor.of(parts)
    if all(isinstance(p, DenseFactor) for p in parts):
        return DenseFactor(sum(p.columns for p in parts), parts[0].param_shape)
    return SumFactor(parts)


def _factors(
    recording: Recording,
    params: list[Tensor],
    columns: Tensor,
    num_samples: int,
    *,
    create_graph: bool,
    retain_graph: bool,
    max_chunk_bytes: int,
) -> list[Factor]:
    outputs = output_tensor(recording.outputs)
    num_columns = columns.shape[0]
    targets: dict[int, Tensor] = {}
    site_outputs = [_output_tensors(site.output) for site in recording.sites]
    # Shared tensors expanded over the batch: the batched backward pass separates the samples.
    expanded = [
        [
            site.module.shared[site.module.positions.index(p)]
            for p in batched_shared(site, num_samples)
        ]
        for site in recording.sites
    ]
    for tensors in (
        [_output_tensors(call.output) for call in recording.calls] + site_outputs + expanded
    ):
        for tensor in tensors:
            if tensor.requires_grad:
                targets.setdefault(id(tensor), tensor)
    grads: dict[int, Tensor | None] = {}
    if outputs.requires_grad:
        check_no_unseen_uses(outputs, recording, params, columns[0])
    if targets and outputs.requires_grad:
        target_list = list(targets.values())
        results = backpropagate(
            outputs,
            target_list,
            columns,
            create_graph=create_graph,
            # The chain rule through shared tensors needs the graph once more.
            retain_graph=retain_graph or bool(recording.sites),
            convolutional=recording.convolutional,
        )
        grads = {id(t): g for t, g in zip(target_list, results, strict=True)}

    parts: list[list[Factor]] = [[] for _ in params]
    with torch.set_grad_enabled(create_graph):
        for call in recording.calls:
            output_grads = [grads.get(id(t)) for t in _output_tensors(call.output)]
            contributions = factors_for_call(
                call,
                output_grads,
                params,
                num_samples,
                create_graph=create_graph,
                max_chunk_bytes=max_chunk_bytes,
            )
            for index, factor in contributions.items():
                parts[index].append(factor)
        through_shared = shared_factors(
            recording,
            params,
            grads,
            site_outputs,
            num_columns,
            num_samples,
            create_graph=create_graph,
            max_chunk_bytes=max_chunk_bytes,
        )
        for index, factor in through_shared.items():
            parts[index].append(factor)
    return [
        _combine(factor_parts)
        if factor_parts
        else ZeroFactor(
            p.shape, num_columns, num_samples, dtype=columns.dtype, device=columns.device
        )
        for p, factor_parts in zip(params, parts, strict=True)
    ]


def compute_factors(
    model: nn.Module,
    inputs: Inputs,
    params: Sequence[Tensor],
    backprop_columns: BackpropColumns,
    *,
    create_graph: bool = False,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[Tensor, list[Factor]]:
    r"""Square-root factors :math:`V_p` of every parameter for one batch.

    Runs ``outputs = model(*inputs)`` once, calls ``columns = backprop_columns(outputs)`` on the
    detached outputs, pushes all :math:`K` columns back in one batched backward pass and
    returns, for every parameter :math:`\theta_p`, a factor with

    .. math::

        \texttt{factor.dense()}[k, n] = J_{\theta_p}(f_n)^\top\, \texttt{columns}[k, n].

    Linear and convolution weights get structured factors (nothing per-sample is formed where
    it can be avoided); every other module owning a parameter goes through a generic
    :mod:`torch.func` rule. The model is left as it was: no hooks, attributes or ``.grad``
    remain, also when an error is raised.

    Args:
        model: Any module whose outputs for different samples are independent (in eval mode).
        inputs: The model's input: one tensor or a tuple of positional inputs.
        params: The parameters to compute factors for, each a parameter of ``model``.
        backprop_columns: Maps the detached outputs ``[N, ...]`` to the columns
            ``[K, N, ...]`` to backpropagate.
        create_graph: Keep the factors differentiable with respect to the parameters.
        max_chunk_bytes: Bound (bytes) on the intermediate per-sample tensors that factor
            methods and the generic rule materialise at once. The factors themselves, the
            backpropagated columns and the recorded inputs are held in full; to bound those,
            use :func:`iter_factors`.

    Returns:
        ``(outputs.detach(), factors)`` with one factor per parameter, in the order of
        ``params``.

    Raises:
        TypeError: If ``inputs``, ``params``, the model's output or the columns have the wrong
            type.
        ValueError: If a parameter is not in ``model``, repeated or frozen, if the columns have
            the wrong shape, or if the model mixes samples: BatchNorm in training mode, a
            first sample whose output changes when run alone, a generic module whose outputs
            change when recomputed sample by sample (call ``model.eval()``).
        RuntimeError: If a parameter influences the outputs through a use the engine could
            not see, or a recorded tensor is changed in place even in private copies.
    """
    (chunk,) = iter_factors(
        model,
        inputs,
        params,
        backprop_columns,
        create_graph=create_graph,
        max_chunk_bytes=max_chunk_bytes,
    )
    return chunk.outputs, chunk.factors


def _checked(columns: Any, outputs: Tensor) -> Any:
    """Columns checked against the outputs: a tensor, or columns built by slice on indexing.

    Columns built by slice (``columns[column_slice, sample_slice]``) are checked by their
    ``shape`` here and by :func:`check_columns` once built.
    """
    lazy = not isinstance(columns, Tensor) and hasattr(columns, "__getitem__")
    if lazy and tuple(getattr(columns, "shape", ()))[1:] == tuple(outputs.shape):
        return columns
    return check_columns(columns, outputs)


def _recorded_bytes(recording: Recording) -> int:
    """Bytes of the recorded outputs the columns are pushed back to (one column's worth)."""
    targets = {
        id(t): t
        for call in recording.calls
        for t in _output_tensors(call.output)
        if t.requires_grad
    }
    return sum(t.numel() * t.element_size() for t in targets.values())


def _slices(total: int, size: int | None) -> list[slice]:
    if size is None:
        return [slice(0, total)]
    if size < 1:
        raise ValueError(f"chunk sizes must be positive, got {size}")
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def iter_factors(
    model: nn.Module,
    inputs: Inputs,
    params: Sequence[Tensor],
    backprop_columns: BackpropColumns,
    *,
    sample_chunk_size: int | None = None,
    column_chunk_size: int | ColumnPlan | None = None,
    create_graph: bool = False,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[FactorChunk]:
    r"""Factors in chunks of samples and columns, to bound memory.

    The chunks partition the columns :math:`(k, n)` of every :math:`V_p`, so everything that is
    a sum over columns adds up over chunks: the GGN diagonal, :math:`V V^\top`, GGN-vector
    products :math:`V (V^\top u)`. (The Gram matrix :math:`V^\top V` does not: it has blocks
    coupling chunks.)

    With ``sample_chunk_size``, the outputs of the whole batch are first computed without
    gradient tracking so that ``backprop_columns`` sees the whole batch (a ``mean`` reduction
    stays exact), then each chunk of samples is run forward again with hooks (every input
    tensor must hold the samples along axis 0). With ``column_chunk_size``, each forward pass
    is followed by one batched backward pass per chunk of columns.

    Args:
        model: As in :func:`compute_factors`.
        inputs: As in :func:`compute_factors`.
        params: As in :func:`compute_factors`.
        backprop_columns: As in :func:`compute_factors`; called once, on the whole batch. It may
            also return an object with ``shape`` (``[K, *outputs.shape]``) whose
            ``[columns, samples]`` (two slices) builds that chunk of columns only.
        sample_chunk_size: Samples per chunk (``None``: all at once).
        column_chunk_size: Columns per chunk (``None``: all at once), or a plan
            ``plan(K, bytes_per_column)`` asked once per chunk of samples, after its forward
            pass and before its backward passes, with the bytes the engine holds per column.
        create_graph: As in :func:`compute_factors`.
        max_chunk_bytes: As in :func:`compute_factors`.

    Yields:
        :class:`FactorChunk` objects, samples outermost.

    Raises:
        TypeError: As :func:`compute_factors`.
        ValueError: As :func:`compute_factors`, for a chunk size below 1, or for inputs whose
            first axis is not the samples' when chunking over samples.
    """
    inputs = _as_inputs(inputs)
    params = check_params(params, model)
    refuse_sample_mixing(model)
    if sample_chunk_size is None:
        recording = record_forward(model, inputs, params)
        outputs = output_tensor(recording.outputs)
    else:
        with torch.no_grad(), model_guard(model):
            outputs = output_tensor(call_model(model, inputs))
    num_samples, rows = sample_layout(inputs, outputs)
    probes = probe_first_sample(model, inputs, params, outputs, num_samples)
    columns = _checked(backprop_columns(outputs.detach()), outputs)
    if sample_chunk_size is None:
        sample_slices = [slice(0, num_samples)]
    else:
        if any(x.dim() == 0 or x.shape[0] != num_samples for x in input_tensors(inputs)):
            raise ValueError(
                f"chunking over samples needs every input tensor to hold the {num_samples} "
                "samples along axis 0; pass sample_chunk_size=None, or give the shared inputs "
                "to the model another way"
            )
        sample_slices = _slices(num_samples, sample_chunk_size)
    for samples in sample_slices:
        if sample_chunk_size is not None:
            chunk_inputs = select_samples(inputs, samples, num_samples)
            recording = record_forward(model, chunk_inputs, params)
        attach_probes(recording, probes)
        chunk_size = column_chunk_size
        if callable(chunk_size):
            chunk_size = chunk_size(columns.shape[0], 2 * _recorded_bytes(recording))
        column_slices = _slices(columns.shape[0], chunk_size)
        chunk_outputs = output_tensor(recording.outputs)
        output_rows = slice(samples.start * rows, samples.stop * rows)
        for j, cols in enumerate(column_slices):
            block = columns[cols, output_rows]
            if not isinstance(columns, Tensor):
                block = check_columns(block, chunk_outputs)
            factors = _factors(
                recording,
                params,
                block,
                samples.stop - samples.start,
                create_graph=create_graph,
                retain_graph=j + 1 < len(column_slices),
                max_chunk_bytes=max_chunk_bytes,
            )
            yield FactorChunk(samples, cols, chunk_outputs.detach(), factors)
