r"""The engine: one forward pass, one batched backward pass, factors per parameter.

:func:`compute_factors` runs the model once with temporary hooks that record the inputs and
outputs of every module call using a requested parameter (:mod:`curvkit.engines.recording`),
asks the caller for the columns to push back (``backprop_columns(outputs)``, shape
``[K, *outputs.shape]``: the loss Hessian's square root, the loss gradient, ...), pushes all
:math:`K` of them back at once, stopping at the recorded outputs, and turns each call's inputs
and backpropagated columns into factors with a per-call rule (:mod:`curvkit.engines.rules`).
A parameter used by several calls gets the sum of their factors.

:func:`iter_factors` does the same in chunks of samples and columns, for batches whose factors
would not fit in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from curvkit.engines.embedding import EmbeddingFactor
from curvkit.engines.factor import DenseFactor, Factor, SumFactor, ZeroFactor
from curvkit.engines.kronecker import DEFAULT_CHUNK_BYTES, KroneckerFactor
from curvkit.engines.recording import ModuleCall, Recording, record_forward
from curvkit.engines.rules import factors_for_call

__all__ = ["FactorChunk", "compute_factors", "iter_factors"]

BackpropColumns = Callable[[Tensor], Tensor]


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


def _as_inputs(inputs: Tensor | Sequence[Tensor]) -> tuple[Any, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise TypeError(f"inputs must be a Tensor or a tuple of tensors, got {type(inputs).__name__}")


def _check_params(model: nn.Module, params: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(params, Tensor):
        raise TypeError("params must be a sequence of parameters, not one tensor: use [param]")
    params = list(params)
    in_model = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    for i, param in enumerate(params):
        if not isinstance(param, Tensor):
            raise TypeError(f"params[{i}] is a {type(param).__name__}, not a tensor")
        if id(param) not in in_model:
            raise ValueError(
                f"params[{i}] (shape {tuple(param.shape)}) is not a parameter of model"
            )
        if not param.requires_grad:
            raise ValueError(f"params[{i}] does not require grad")
        if id(param) in seen:
            raise ValueError(f"params[{i}] appears twice in params")
        seen.add(id(param))
    return params


def refuse_sample_mixing(model: nn.Module) -> None:
    """Raise if ``model`` holds a module known to mix samples.

    Raises:
        ValueError: For a BatchNorm layer in training mode or without running statistics.
    """
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
            raise ValueError(
                f"{type(module).__name__} `{name or 'model'}` normalises with statistics of "
                "the batch, so a sample's output depends on the other samples and per-sample "
                "curvature is undefined. Call `model.eval()` first (it then uses its running "
                "statistics)."
            )


def probe_first_sample(
    model: nn.Module, inputs: tuple[Any, ...], params: list[Tensor], outputs: Tensor
) -> dict[tuple[int, int], ModuleCall]:
    """Run the first sample alone: refuse models that mix samples, find sample axes.

    One forward pass of one sample without gradients. If the first sample's output differs
    from its output in the batch, the model mixes samples in a way no module type reveals
    (``x - x.mean(0)`` in a ``forward``, dropout in training mode). The pass is recorded like
    the batch's: the axis of a recorded tensor that shrinks from :math:`N` to 1 is its sample
    axis, even where another axis also has size :math:`N`. Skipped for a single sample or when
    an input does not hold the samples along axis 0.

    Returns:
        The recorded calls of the pass by :attr:`ModuleCall.key` (empty when skipped).

    Raises:
        ValueError: If the outputs differ beyond floating-point noise.
    """
    num_samples = outputs.shape[0]
    if num_samples == 1 or not all(
        isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == num_samples for x in inputs
    ):
        return {}
    probe = record_forward(model, tuple(x[:1].clone() for x in inputs), params, build_graph=False)
    alone = probe.outputs
    if not isinstance(alone, Tensor) or alone.shape[1:] != outputs.shape[1:]:
        return {}
    expected = outputs[:1].detach()
    tolerance = torch.finfo(expected.dtype).eps ** 0.5 if expected.is_floating_point() else 0.0
    scale = max(expected.abs().max().item(), 1.0)
    if not torch.allclose(alone, expected, rtol=0.0, atol=tolerance * scale):
        raise ValueError(
            "the model's output for a sample changes with the other samples in the batch "
            "(batch statistics, dropout, an operation across samples), so per-sample curvature "
            "is undefined. Call `model.eval()` first, and make sure no operation mixes samples."
        )
    return {call.key: call for call in probe.calls}


def _attach_probes(recording: Recording, probes: dict[tuple[int, int], ModuleCall]) -> None:
    for call in recording.calls:
        call.probe = probes.get(call.key)


def _check_outputs(outputs: Any) -> Tensor:
    if not isinstance(outputs, Tensor) or outputs.dim() == 0:
        raise TypeError(
            "the model must return one tensor whose first axis indexes the samples, got "
            f"{type(outputs).__name__}"
            + (f" of shape {tuple(outputs.shape)}" if isinstance(outputs, Tensor) else "")
        )
    return outputs


def _check_columns(columns: Any, outputs: Tensor) -> Tensor:
    if not isinstance(columns, Tensor):
        raise TypeError(f"backprop_columns must return a Tensor, got {type(columns).__name__}")
    if columns.dim() != outputs.dim() + 1 or columns.shape[1:] != outputs.shape:
        raise ValueError(
            f"backprop_columns must return a tensor of shape [K, *{tuple(outputs.shape)}] "
            f"(K columns per output), got {tuple(columns.shape)}"
        )
    if columns.shape[0] == 0:
        raise ValueError("backprop_columns returned no columns (K = 0); it must return K >= 1")
    if columns.dtype != outputs.dtype or columns.device != outputs.device:
        raise ValueError(
            f"backprop_columns returned {columns.dtype} on {columns.device}; the outputs are "
            f"{outputs.dtype} on {outputs.device}"
        )
    return columns


def _output_tensors(output: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, Tensor)]


def _combine(parts: list[Factor]) -> Factor:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, KroneckerFactor) for p in parts):
        shapes = {(p.output_grads.shape[3:], p.input_shape[2:]) for p in parts}
        if len(shapes) == 1:
            return KroneckerFactor.concatenate(parts)
    if all(isinstance(p, EmbeddingFactor) for p in parts):
        return EmbeddingFactor.concatenate(parts)
    if all(isinstance(p, DenseFactor) for p in parts):
        return DenseFactor(sum(p.columns for p in parts), parts[0].param_shape)
    return SumFactor(parts)


#: Per-column size (entries of all recorded outputs) from which the columns are pushed back
#: one at a time rather than under :func:`torch.func.vmap` (see :func:`backpropagate`).
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
) -> list[Tensor | None]:
    """All columns pushed back from ``outputs`` to ``targets``.

    Returns, per target, ``[K, *target.shape]`` (``None`` where nothing flows back). Three ways,
    chosen by measurement (CPU, torch 2.13):

    - small recorded outputs (an MLP): :func:`torch.func.vmap` over ``torch.autograd.grad``,
      one backward pass on all columns (20% faster than a loop of backward passes, as fast as
      ``is_grads_batched``);
    - large ones (convolutions; from :data:`PER_COLUMN_BACKWARD_ENTRIES` entries per column):
      one backward pass per column, which is then cheap per operator (on a small CNN 1.8x
      faster than ``vmap``, whose pooling rules copy the pooled input once per column, and
      1.3x faster than ``is_grads_batched``, which falls back to loops per operator);
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
    if len(columns) == 1 or sum(t.numel() for t in targets) >= PER_COLUMN_BACKWARD_ENTRIES:
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
        results = vmap(one_column)(columns)
    except RuntimeError:
        return _backward_per_column(outputs, targets, columns, retain_graph)
    return [None if skip else g for skip, g in zip(unused, results, strict=True)]


def _check_no_unseen_uses(
    outputs: Tensor, recording: Recording, params: list[Tensor], column: Tensor
) -> None:
    """Raise if a parameter without recorded uses still influences the outputs.

    Uses are seen through the arguments of torch functions; one hidden deeper (a tensor in a
    dict argument) would otherwise give a silently zero factor. Parameters outside the graph
    cost nothing here: the backward pass reaches none of them.
    """
    seen = {index for call in recording.calls for index in call.params}
    unseen = [i for i in range(len(params)) if i not in seen]
    if not unseen:
        return
    grads = torch.autograd.grad(
        outputs,
        [params[i] for i in unseen],
        grad_outputs=column,
        retain_graph=True,
        allow_unused=True,
    )
    for index, grad in zip(unseen, grads, strict=True):
        if grad is not None:
            raise RuntimeError(
                f"params[{index}] influences the outputs, but the engine saw no torch function "
                "receive it during the forward pass (is it hidden inside a container "
                "argument?); pass it to torch functions directly"
            )


def _factors(
    recording: Recording,
    params: list[Tensor],
    columns: Tensor,
    *,
    create_graph: bool,
    retain_graph: bool,
    max_chunk_bytes: int,
) -> list[Factor]:
    outputs = recording.outputs
    num_columns, num_samples = columns.shape[0], columns.shape[1]
    targets: dict[int, Tensor] = {}
    for call in recording.calls:
        for tensor in _output_tensors(call.output):
            if tensor.requires_grad:
                targets.setdefault(id(tensor), tensor)
    grads: dict[int, Tensor | None] = {}
    if outputs.requires_grad:
        _check_no_unseen_uses(outputs, recording, params, columns[0])
    if targets and outputs.requires_grad:
        target_list = list(targets.values())
        results = backpropagate(
            outputs,
            target_list,
            columns,
            create_graph=create_graph,
            retain_graph=retain_graph,
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
    inputs: Tensor | Sequence[Tensor],
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
    inputs = _as_inputs(inputs)
    params = _check_params(model, params)
    refuse_sample_mixing(model)
    recording = record_forward(model, inputs, params)
    outputs = _check_outputs(recording.outputs)
    _attach_probes(recording, probe_first_sample(model, inputs, params, outputs))
    columns = _check_columns(backprop_columns(outputs.detach()), outputs)
    factors = _factors(
        recording,
        params,
        columns,
        create_graph=create_graph,
        retain_graph=False,
        max_chunk_bytes=max_chunk_bytes,
    )
    return outputs.detach(), factors


def _slices(total: int, size: int | None) -> list[slice]:
    if size is None:
        return [slice(0, total)]
    if size < 1:
        raise ValueError(f"chunk sizes must be positive, got {size}")
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def iter_factors(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    params: Sequence[Tensor],
    backprop_columns: BackpropColumns,
    *,
    sample_chunk_size: int | None = None,
    column_chunk_size: int | None = None,
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
        backprop_columns: As in :func:`compute_factors`; called once, on the whole batch.
        sample_chunk_size: Samples per chunk (``None``: all at once).
        column_chunk_size: Columns per chunk (``None``: all at once).
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
    params = _check_params(model, params)
    refuse_sample_mixing(model)
    if sample_chunk_size is None:
        recording = record_forward(model, inputs, params)
        outputs = _check_outputs(recording.outputs)
        probes = probe_first_sample(model, inputs, params, outputs)
        columns = _check_columns(backprop_columns(outputs.detach()), outputs)
        sample_slices = [slice(0, outputs.shape[0])]
    else:
        with torch.no_grad():
            outputs = _check_outputs(model(*inputs))
        probes = probe_first_sample(model, inputs, params, outputs)
        columns = _check_columns(backprop_columns(outputs), outputs)
        num_samples = outputs.shape[0]
        for i, value in enumerate(inputs):
            if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != num_samples:
                raise ValueError(
                    f"chunking over samples needs every input to hold the {num_samples} "
                    f"samples along axis 0; input {i} does not"
                )
        sample_slices = _slices(num_samples, sample_chunk_size)
    column_slices = _slices(columns.shape[0], column_chunk_size)
    for samples in sample_slices:
        if sample_chunk_size is not None:
            recording = record_forward(model, tuple(x[samples] for x in inputs), params)
        _attach_probes(recording, probes)
        chunk_outputs = recording.outputs
        for j, cols in enumerate(column_slices):
            factors = _factors(
                recording,
                params,
                columns[cols, samples],
                create_graph=create_graph,
                retain_graph=j + 1 < len(column_slices),
                max_chunk_bytes=max_chunk_bytes,
            )
            yield FactorChunk(samples, cols, chunk_outputs.detach(), factors)
