r"""The generic rule: per-sample vector-Jacobian products of one module call with torch.func.

For a call :math:`y = m(\theta; x)` whose output receives the backpropagated columns
:math:`b_{k}` (shape of :math:`y`), the factor's columns are

.. math::

    v_{k,n} = \Big(\frac{\partial y_n}{\partial \theta}\Big)^\top b_{k,n},

the vector-Jacobian product of the module applied to sample :math:`n` alone. The rule runs
:func:`torch.func.vjp` of :func:`torch.func.functional_call` on a batch of one sample, maps it over
the :math:`K` columns and the :math:`N` samples with :func:`torch.func.vmap`, and so needs only
the module's own inputs: its memory is bounded by the module, not by the model.

The sample axis of each input and output tensor is the axis that shrinks to 1 in the engine's
probe pass of the first sample alone, or, without one, found from the shape (see
:func:`sample_axis`); tensors without it are shared by all samples. Recomputing the module on
single samples also checks it: if the outputs differ from the batched call's, the module mixes
samples (batch statistics, for instance) and is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap
from torch.utils import _pytree as pytree

from curvkit.engines.backward import batching_fallback_allowed
from curvkit.engines.factor import DenseFactor
from curvkit.engines.recording import ModuleCall

__all__ = ["generic_factors", "sample_axis"]


def sample_axis(
    tensor: Tensor, num_samples: int, batch_first: bool = True, probe: object = None
) -> int | None:
    """The axis of ``tensor`` that indexes samples, ``None`` if it is shared by all samples.

    With ``probe``, the same tensor from a forward pass of the first sample alone, the sample
    axis is the one axis that shrinks from :math:`N` to 1 (none if nothing shrinks). Without
    it, or if the shapes say nothing clear, the shape alone decides: axis 0 if it has size
    :math:`N` (axis 1 first for modules with ``batch_first=False``), otherwise the only other
    axis of size :math:`N` before the last axis (a layer normalising ``[T, N, E]`` inside a
    sequence-first transformer), otherwise none.
    """
    if isinstance(probe, Tensor) and probe.dim() == tensor.dim() and num_samples > 1:
        changed = [a for a in range(tensor.dim()) if tensor.shape[a] != probe.shape[a]]
        if not changed:
            return None
        axis = changed[0]
        if len(changed) == 1 and tensor.shape[axis] == num_samples and probe.shape[axis] == 1:
            return axis
    if not batch_first and tensor.dim() >= 3 and tensor.shape[1] == num_samples:
        return 1
    if tensor.dim() >= 1 and tensor.shape[0] == num_samples:
        return 0
    candidates = [axis for axis in range(1, tensor.dim() - 1) if tensor.shape[axis] == num_samples]
    return candidates[0] if len(candidates) == 1 else None


def _probe_leaves(tree: object, probe_tree: object, count: int) -> list[object]:
    """The leaves of ``probe_tree`` if it has the structure of ``tree``, else ``None``s."""
    leaves, spec = pytree.tree_flatten(tree)
    probe_leaves, probe_spec = pytree.tree_flatten(probe_tree)
    return probe_leaves if spec == probe_spec and len(leaves) == count else [None] * count


def _tolerance(dtype: torch.dtype) -> float:
    """Relative gap between batched and single-sample results that rounding may explain."""
    return torch.finfo(dtype).eps ** 0.5 if dtype.is_floating_point else 0.0


def generic_factors(
    call: ModuleCall,
    named_params: dict[str, Tensor],
    output_grads: list[Tensor | None],
    num_samples: int,
    *,
    create_graph: bool,
    max_chunk_bytes: int,
) -> dict[str, DenseFactor]:
    """Per-sample, per-column gradients of one module call with respect to some parameters.

    Args:
        call: The recorded call.
        named_params: The parameters, by their names relative to ``call.module``.
        output_grads: For every tensor leaf of ``call.output`` (in pytree order), the
            backpropagated columns ``[K, *leaf.shape]``, or ``None`` where nothing flows back.
        num_samples: The batch size :math:`N`.
        create_graph: Whether the result must stay differentiable.
        max_chunk_bytes: Bound on the bytes of the per-sample gradients computed at once: the
            samples are processed in chunks of this size.

    Returns:
        ``name -> factor`` with the columns ``[K, N, *param.shape]``.

    Raises:
        ValueError: If an output lacks a sample axis, or if recomputing the module on single
            samples gives outputs other than the batched call's (the module mixes samples).
    """
    num_columns = next(g for g in output_grads if g is not None).shape[0]
    sample_bytes = num_columns * sum(p.numel() * p.element_size() for p in named_params.values())
    chunk_size = min(num_samples, max(1, max_chunk_bytes // max(sample_bytes, 1)))
    batch_first = getattr(call.module, "batch_first", True) is not False
    probe = call.probe
    input_leaves, input_spec = pytree.tree_flatten((call.args, call.kwargs))
    probe_inputs = _probe_leaves(
        (call.args, call.kwargs),
        None if probe is None else (probe.args, probe.kwargs),
        len(input_leaves),
    )
    axes = [
        sample_axis(leaf, num_samples, batch_first, probe_leaf)
        if isinstance(leaf, Tensor)
        else None
        for leaf, probe_leaf in zip(input_leaves, probe_inputs, strict=True)
    ]
    batched = [i for i, axis in enumerate(axes) if axis is not None]
    input_axes = [axes[i] for i in batched]

    output_leaves = pytree.tree_leaves(call.output)
    probe_outputs = _probe_leaves(
        call.output, None if probe is None else probe.output, len(output_leaves)
    )
    tensor_positions = [i for i, leaf in enumerate(output_leaves) if isinstance(leaf, Tensor)]
    pairs = zip(tensor_positions, output_grads, strict=True)
    selected = [(pos, g) for pos, g in pairs if g is not None]
    output_axes = []
    for pos, _ in selected:
        axis = sample_axis(output_leaves[pos], num_samples, batch_first, probe_outputs[pos])
        if axis is None:
            raise ValueError(
                f"output {pos} of {type(call.module).__name__} has shape "
                f"{tuple(output_leaves[pos].shape)} without an axis of size N={num_samples}; "
                "the engine cannot split it into samples"
            )
        output_axes.append(axis)

    def detach(t: Tensor) -> Tensor:
        return t if create_graph else t.detach()

    params = {name: detach(p) for name, p in named_params.items()}
    constant_leaves = [detach(t) if isinstance(t, Tensor) else t for t in input_leaves]

    def per_sample(sample_inputs: list[Tensor], cotangents: list[Tensor], batched_columns: bool):
        leaves = list(constant_leaves)
        for i, axis, value in zip(batched, input_axes, sample_inputs, strict=True):
            leaves[i] = value.unsqueeze(axis)
        args, kwargs = pytree.tree_unflatten(leaves, input_spec)

        def run(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            out = pytree.tree_leaves(functional_call(call.module, p, args, kwargs))
            pairs = zip(selected, output_axes, strict=True)
            return tuple(out[pos].squeeze(axis) for (pos, _), axis in pairs)

        outputs, vjp_fn = vjp(run, params)
        if batched_columns:
            (grads,) = vmap(vjp_fn)(tuple(cotangents))
            return grads, outputs
        per_column = [vjp_fn(tuple(c[k] for c in cotangents))[0] for k in range(num_columns)]
        return {name: torch.stack([g[name] for g in per_column]) for name in params}, outputs

    sample_inputs = [detach(input_leaves[i]) for i in batched]
    cotangents = [detach(g) for _, g in selected]
    num_columns = cotangents[0].shape[0]

    def sample_by_sample() -> tuple[dict[str, Tensor], list[Tensor]]:
        results = [
            per_sample(
                [x.select(axis, n) for x, axis in zip(sample_inputs, input_axes, strict=True)],
                [g.select(axis + 1, n) for g, axis in zip(cotangents, output_axes, strict=True)],
                False,
            )
            for n in range(num_samples)
        ]
        grads = {name: torch.stack([r[0][name] for r in results], dim=1) for name in params}
        outputs = [
            torch.stack([r[1][j] for r in results], dim=axis) for j, axis in enumerate(output_axes)
        ]
        return grads, outputs

    # Under grad mode even without create_graph: some CPU kernels (oneDNN's LSTM in float32)
    # take an inference path without the workspace their backward needs when it is off.
    with torch.enable_grad():
        if create_graph:
            # torch.func's batching rules do not carry the derivatives of an enclosing autograd
            # graph correctly for every operator (layer_norm in torch 2.13), so loop instead.
            grads, recomputed = sample_by_sample()
        else:
            try:
                with batching_fallback_allowed():
                    grads, recomputed = vmap(
                        lambda inputs, columns: per_sample(inputs, columns, True),
                        in_dims=(input_axes, [axis + 1 for axis in output_axes]),
                        out_dims=(1, tuple(output_axes)),
                        randomness="different",
                        chunk_size=chunk_size,
                    )(sample_inputs, cotangents)
            except RuntimeError:
                # Some operators cannot be vmapped (LSTM, PReLU's backward in torch 2.13).
                grads, recomputed = sample_by_sample()

    for (pos, _), value in zip(selected, recomputed, strict=True):
        recorded = output_leaves[pos].detach()
        scale = recorded.abs().max().item() if recorded.numel() else 0.0
        if not torch.allclose(
            value.detach(), recorded, rtol=0.0, atol=_tolerance(recorded.dtype) * max(scale, 1.0)
        ):
            raise ValueError(
                f"{type(call.module).__name__} gives other outputs on single samples than on "
                "the batch: its per-sample outputs are not independent (batch statistics, "
                "dropout, ...). Call `model.eval()` first; curvature per sample needs a model "
                "whose outputs do not mix samples."
            )
    return {name: DenseFactor(detach(grads[name]), p.shape) for name, p in named_params.items()}
