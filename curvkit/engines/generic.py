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

from dataclasses import dataclass

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


@dataclass
class _Layout:
    """Where a call's samples are: its input and output leaves and their sample axes."""

    input_leaves: list[object]
    input_spec: pytree.TreeSpec
    batched: list[int]  # positions of the input leaves that hold samples
    input_axes: list[int]  # their sample axes
    output_leaves: list[object]
    selected: list[tuple[int, Tensor]]  # (output leaf position, its columns) receiving columns
    output_axes: list[int]  # their sample axes


def _layout(
    call: ModuleCall, output_grads: list[Tensor | None], num_samples: int, batch_first: bool
) -> _Layout:
    """Find the sample axes of the call's inputs and of the outputs that receive columns.

    Raises:
        ValueError: If such an output has no sample axis.
    """
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
    input_axes = [axes[i] for i in batched]
    return _Layout(
        input_leaves, input_spec, batched, input_axes, output_leaves, selected, output_axes
    )


class _SampleVJP:
    """The vector-Jacobian products of one module call, sample by sample or under ``vmap``."""

    def __init__(
        self, call: ModuleCall, layout: _Layout, params: dict[str, Tensor], create_graph: bool
    ) -> None:
        self.module = call.module
        self.layout = layout
        self.create_graph = create_graph
        self.params = {name: self.detach(p) for name, p in params.items()}
        self.constant_leaves = [
            self.detach(t) if isinstance(t, Tensor) else t for t in layout.input_leaves
        ]
        self.inputs = [self.detach(layout.input_leaves[i]) for i in layout.batched]
        self.cotangents = [self.detach(g) for _, g in layout.selected]
        self.num_columns = self.cotangents[0].shape[0]

    def detach(self, tensor: Tensor) -> Tensor:
        return tensor if self.create_graph else tensor.detach()

    def one_sample(self, inputs: list[Tensor], cotangents: list[Tensor], batched_columns: bool):
        """The gradients of one sample's columns and its recomputed outputs."""
        layout = self.layout
        leaves = list(self.constant_leaves)
        for i, axis, value in zip(layout.batched, layout.input_axes, inputs, strict=True):
            leaves[i] = value.unsqueeze(axis)
        args, kwargs = pytree.tree_unflatten(leaves, layout.input_spec)

        def run(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            out = pytree.tree_leaves(functional_call(self.module, p, args, kwargs))
            pairs = zip(layout.selected, layout.output_axes, strict=True)
            return tuple(out[pos].squeeze(axis) for (pos, _), axis in pairs)

        outputs, vjp_fn = vjp(run, self.params)
        if batched_columns:
            (grads,) = vmap(vjp_fn)(tuple(cotangents))
            return grads, outputs
        columns = [vjp_fn(tuple(c[k] for c in cotangents))[0] for k in range(self.num_columns)]
        return {name: torch.stack([g[name] for g in columns]) for name in self.params}, outputs

    def sample_by_sample(self, num_samples: int) -> tuple[dict[str, Tensor], list[Tensor]]:
        """All samples in a loop, each column in a loop."""
        layout = self.layout
        results = [
            self.one_sample(
                [x.select(a, n) for x, a in zip(self.inputs, layout.input_axes, strict=True)],
                [
                    g.select(a + 1, n)
                    for g, a in zip(self.cotangents, layout.output_axes, strict=True)
                ],
                False,
            )
            for n in range(num_samples)
        ]
        grads = {name: torch.stack([r[0][name] for r in results], dim=1) for name in self.params}
        outputs = [
            torch.stack([r[1][j] for r in results], dim=axis)
            for j, axis in enumerate(layout.output_axes)
        ]
        return grads, outputs

    def vmapped(self, chunk_size: int) -> tuple[dict[str, Tensor], list[Tensor]]:
        """All samples and columns under ``vmap``, ``chunk_size`` samples at a time."""
        layout = self.layout
        with batching_fallback_allowed():
            return vmap(
                lambda inputs, columns: self.one_sample(inputs, columns, True),
                in_dims=(layout.input_axes, [axis + 1 for axis in layout.output_axes]),
                out_dims=(1, tuple(layout.output_axes)),
                randomness="different",
                chunk_size=chunk_size,
            )(self.inputs, self.cotangents)


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
    layout = _layout(call, output_grads, num_samples, batch_first)
    products = _SampleVJP(call, layout, named_params, create_graph)
    # Under grad mode even without create_graph: some CPU kernels (oneDNN's LSTM in float32)
    # take an inference path without the workspace their backward needs when it is off.
    with torch.enable_grad():
        if create_graph:
            # torch.func's batching rules do not carry the derivatives of an enclosing autograd
            # graph correctly for every operator (layer_norm in torch 2.13), so loop instead.
            grads, recomputed = products.sample_by_sample(num_samples)
        else:
            try:
                grads, recomputed = products.vmapped(chunk_size)
            except RuntimeError:
                # Some operators cannot be vmapped (LSTM, PReLU's backward in torch 2.13).
                grads, recomputed = products.sample_by_sample(num_samples)
    _check_recomputed(call, layout, recomputed)
    return {
        name: DenseFactor(products.detach(grads[name]), p.shape) for name, p in named_params.items()
    }


def _check_recomputed(call: ModuleCall, layout: _Layout, recomputed: list[Tensor]) -> None:
    """Refuse a module whose outputs on single samples differ from the batched call's.

    Raises:
        ValueError: If they differ beyond rounding.
    """
    for (pos, _), value in zip(layout.selected, recomputed, strict=True):
        recorded = layout.output_leaves[pos].detach()
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
