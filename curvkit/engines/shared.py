r"""Parameters that reach the samples through shared tensors: the chain rule on the shared tensor.

A tensor computed from parameters alone is the same for every sample: a positional embedding
of ``arange(T)`` broadcast over the batch, a weight computed by a parametrization
(``weight_norm``, ``spectral_norm``, any ``register_parametrization``), a slice of a parameter.
Its per-sample gradient cannot be read off the batched backward pass, which sums over the
samples where the tensor is broadcast. It can be read off the torch function where it meets
the samples, a recorded :class:`~curvkit.engines.recording.SharedSite`: for the column
:math:`b_{k,n}` at the site's output,

.. math::

    c_{k,n} = \Big(\frac{\partial y_n}{\partial s}\Big)^\top b_{k,n},

by the generic rule on that one function. Summed over the sites of each shared tensor
:math:`s = g(\theta)`, the chain rule gives the parameters' columns
:math:`v_{k,n} = J_g^\top c_{k,n}`: one backward pass through the shared computation (not
through the model), batched over the :math:`K N` columns. The factors are dense:
:math:`K N` times the parameters' size.

A shared tensor may also have been expanded over the batch (BERT's token-type embeddings of
``zeros(N, T)``): its axis that shrinks from :math:`N` to 1 in the engine's probe pass of the
first sample alone is a sample axis, along which each sample uses its own slice. Its per-sample
columns are the batched backward pass's columns at the tensor, cut into the samples' slices.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vmap

from curvkit.engines.backward import batching_fallback_allowed
from curvkit.engines.factor import DenseFactor
from curvkit.engines.generic import generic_factors, sample_axis
from curvkit.engines.recording import ModuleCall, Recording, SharedSite

__all__ = ["batched_shared", "shared_factors"]


def batched_shared(site: ModuleCall, num_samples: int) -> dict[int, int]:
    """The shared tensors of ``site`` expanded over the batch: ``position -> sample axis``.

    Read off the site's twin in the probe pass of the first sample alone (without one, a shared
    tensor has no sample axis).
    """
    probe = site.probe
    if probe is None:
        return {}
    axes = {}
    for position, tensor, twin in zip(
        site.module.positions, site.module.shared, probe.module.shared, strict=True
    ):
        axis = sample_axis(tensor, num_samples, probe=twin)
        if axis is not None and twin.shape[axis] == 1 and tensor.shape[axis] == num_samples:
            axes[position] = axis
    return axes


def _without(site: ModuleCall, batched: dict[int, int]) -> ModuleCall:
    """``site`` with the shared tensors at the positions ``batched`` moved to its inputs."""

    def split(call: ModuleCall) -> ModuleCall:
        module = call.module
        leaves = list(call.args)
        kept = []
        for position, tensor in zip(module.positions, module.shared, strict=True):
            if position in batched:
                leaves[position] = tensor
            else:
                kept.append((position, tensor))
        shared = SharedSite(module.func, module.spec, [p for p, _ in kept], [t for _, t in kept])
        return ModuleCall(shared, call.index, call.parent, tuple(leaves), {}, output=call.output)

    result = split(site)
    result.probe = None if site.probe is None else split(site.probe)
    return result


def _site_cotangents(
    sites: list[ModuleCall],
    grads: dict[int, Tensor | None],
    output_tensors: list[list[Tensor]],
    num_samples: int,
    *,
    create_graph: bool,
    max_chunk_bytes: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """The shared tensors and their per-sample columns ``[K, N, *shape]``, summed over sites."""
    shared: dict[int, Tensor] = {}
    cotangents: dict[int, Tensor] = {}

    def add(tensor: Tensor, columns: Tensor) -> None:
        key = id(tensor)
        shared[key] = tensor
        cotangents[key] = columns if key not in cotangents else cotangents[key] + columns

    for site, outputs in zip(sites, output_tensors, strict=True):
        output_grads = [grads.get(id(t)) for t in outputs]
        if all(g is None for g in output_grads):
            continue
        batched = batched_shared(site, num_samples)
        for position, axis in batched.items():
            tensor = site.module.shared[site.module.positions.index(position)]
            grad = grads.get(id(tensor))
            if grad is not None and id(tensor) not in shared:
                add(tensor, _slices_by_sample(grad, axis))
        call = _without(site, batched) if batched else site
        named = {
            f"shared{i}": tensor
            for i, tensor in enumerate(call.module.shared)
            if tensor.requires_grad
        }
        if not named:
            continue
        factors = generic_factors(
            call,
            named,
            output_grads,
            num_samples,
            create_graph=create_graph,
            max_chunk_bytes=max_chunk_bytes,
        )
        for name, tensor in named.items():
            add(tensor, factors[name].columns)
    return list(shared.values()), list(cotangents.values())


def _slices_by_sample(grad: Tensor, axis: int) -> Tensor:
    """Columns ``[K, *shape]`` cut into per-sample columns ``[K, N, *shape]``, zero elsewhere."""
    num_samples = grad.shape[axis + 1]
    mask = torch.eye(num_samples, dtype=grad.dtype, device=grad.device)
    shape = [1] * (grad.dim() + 1)
    shape[1] = shape[axis + 2] = num_samples
    return grad.unsqueeze(1) * mask.reshape(shape)


def _backward_batched(
    outputs: list[Tensor], inputs: list[Tensor], columns: list[Tensor], create_graph: bool
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` batched over the leading axis of ``columns``."""
    if create_graph:
        return torch.autograd.grad(
            outputs,
            inputs,
            columns,
            retain_graph=True,
            create_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    unused: list[bool] = []

    def one(*column: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(outputs, inputs, column, retain_graph=True, allow_unused=True)
        unused[:] = [g is None for g in grads]
        return tuple(column[0].new_zeros(()) if g is None else g for g in grads)

    try:
        with batching_fallback_allowed():
            results = vmap(one)(*columns)
        return tuple(None if skip else g for skip, g in zip(unused, results, strict=True))
    except RuntimeError:
        # A shared computation without batching rules: one backward pass per column.
        per_column = [
            torch.autograd.grad(
                outputs, inputs, [c[j] for c in columns], retain_graph=True, allow_unused=True
            )
            for j in range(columns[0].shape[0])
        ]
        return tuple(
            None if per_column[0][i] is None else torch.stack([g[i] for g in per_column])
            for i in range(len(inputs))
        )


def shared_factors(
    recording: Recording,
    params: list[Tensor],
    grads: dict[int, Tensor | None],
    site_outputs: list[list[Tensor]],
    num_columns: int,
    num_samples: int,
    *,
    create_graph: bool,
    max_chunk_bytes: int,
) -> dict[int, DenseFactor]:
    """The factors the parameters receive through shared tensors (see the module docstring).

    Args:
        recording: The recorded forward pass with its sites.
        params: All requested parameters.
        grads: The columns backpropagated to the recorded tensors, by ``id``.
        site_outputs: The output tensors of each site, in the order of ``recording.sites``.
        num_columns: :math:`K`.
        num_samples: :math:`N`.
        create_graph: Whether the factors must stay differentiable.
        max_chunk_bytes: Bound on the per-sample tensors the generic rule forms at once.

    Returns:
        ``parameter index -> factor`` for the parameters with shared uses that reach a site.
    """
    indices = sorted(i for i in recording.shared_params if params[i].requires_grad)
    if not indices or not recording.sites:
        return {}
    shared, cotangents = _site_cotangents(
        recording.sites,
        grads,
        site_outputs,
        num_samples,
        create_graph=create_graph,
        max_chunk_bytes=max_chunk_bytes,
    )
    if not shared:
        return {}
    with torch.enable_grad():
        results = _backward_batched(
            shared,
            [params[i] for i in indices],
            [c.flatten(0, 1) for c in cotangents],
            create_graph,
        )
    return {
        i: DenseFactor(g.reshape(num_columns, num_samples, *params[i].shape), params[i].shape)
        for i, g in zip(indices, results, strict=True)
        if g is not None
    }
