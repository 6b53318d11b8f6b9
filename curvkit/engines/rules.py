r"""Per-call rules: turn a recorded call and the columns at its output into factors.

Hand-written rules cover the hot path: ``nn.Linear`` (inputs ``[N, in]`` and ``[N, ..., in]``)
and ``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups, padding mode), whose weights get
a :class:`~curvkit.engines.kronecker.KroneckerFactor` and whose biases get the columns at the
output summed over positions; ``nn.Embedding`` (without ``max_norm`` or
``scale_grad_by_freq``) gets an :class:`~curvkit.engines.embedding.EmbeddingFactor`. Every
other call, and subclasses that override ``forward``, go to the generic :func:`torch.func` rule.
"""

from __future__ import annotations

import math
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.engines.embedding import EmbeddingFactor
from curvkit.engines.factor import DenseFactor, Factor
from curvkit.engines.generic import generic_columns, sample_axis
from curvkit.engines.kronecker import STALE_INPUT_MESSAGE, KroneckerFactor
from curvkit.engines.recording import ModuleCall

__all__ = ["factors_for_call"]

_CONV_CLASSES: tuple[type[nn.modules.conv._ConvNd], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_plain(module: nn.Module, base: type[nn.Module], *methods: str) -> bool:
    """Whether ``module`` is a ``base`` whose relevant methods are not overridden."""
    return isinstance(module, base) and all(
        getattr(type(module), name) is getattr(base, name) for name in methods
    )


def _single_input(call: ModuleCall, create_graph: bool) -> Tensor | None:
    """The call's only input; detached unless the factors must stay differentiable."""
    if len(call.args) == 1 and not call.kwargs and isinstance(call.args[0], Tensor):
        return call.args[0] if create_graph else call.args[0].detach()
    return None


def _sample_axis(call: ModuleCall, x: Tensor, num_samples: int) -> int | None:
    """The sample axis of the call's only input, from the probe pass where there is one."""
    probe = call.probe
    probe_input = probe.args[0] if probe is not None and len(probe.args) == 1 else None
    return sample_axis(x, num_samples, probe=probe_input)


def _bias_columns(output_grads: Tensor) -> Tensor:
    """A bias's columns: those at the output ``[K, N, T, G, O]`` summed over positions."""
    k, n, t = output_grads.shape[:3]
    summed = output_grads[:, :, 0] if t == 1 else output_grads.sum(dim=2)
    return summed.reshape(k, n, -1)


def _linear(
    call: ModuleCall,
    output_grad: Tensor,
    num_samples: int,
    max_chunk_bytes: int,
    create_graph: bool,
) -> dict[str, Factor] | None:
    x = _single_input(call, create_graph)
    module = call.module
    if x is None or x.dim() < 2:
        return None
    axis = _sample_axis(call, x, num_samples)
    if axis is None or axis == x.dim() - 1:
        return None
    k = output_grad.shape[0]
    x = x.movedim(axis, 0).reshape(num_samples, -1, 1, module.in_features)
    b = output_grad.movedim(axis + 1, 1).reshape(k, num_samples, -1, 1, module.out_features)
    factors: dict[str, Factor] = {
        "weight": KroneckerFactor(b, x, module.weight.shape, max_chunk_bytes=max_chunk_bytes)
    }
    if module.bias is not None:
        factors["bias"] = DenseFactor(_bias_columns(b), module.bias.shape)
    return factors


def _patches(
    x: Tensor,
    version: int,
    pads: tuple[int, ...],
    padding_mode: str,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    groups: int,
) -> Tensor:
    """The input patches a convolution multiplies with its weight, shape ``[N, T, G, I]``.

    ``T`` counts output positions, ``G`` groups, ``I = C / G * prod(kernel_size)`` in the
    order of the weight's entries. The patches are a strided view of the (padded) input, copied
    once into memory laid out as ``[N, G, I, T]`` (where one group of one sample is a matrix a
    batched matmul reads in place) and returned as a permuted view. ``F.unfold`` would be
    slower (measured 20x on CPU) and exists for 2d only.

    Raises:
        RuntimeError: If ``x`` was changed in place since its version was ``version``.
    """
    if x._version != version:
        raise RuntimeError(STALE_INPUT_MESSAGE)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if padding_mode == "zeros" else padding_mode)
    n, channels, *size = x.shape
    out_size = [
        (s - d * (k - 1) - 1) // st + 1
        for s, k, d, st in zip(size, kernel, dilation, stride, strict=True)
    ]
    spatial_strides = x.stride()[2:]
    view = x.as_strided(
        (n, channels, *kernel, *out_size),
        (
            x.stride(0),
            x.stride(1),
            *(st * d for st, d in zip(spatial_strides, dilation, strict=True)),
            *(st * s for st, s in zip(spatial_strides, stride, strict=True)),
        ),
        x.storage_offset(),
    )
    patches = view.reshape(n, groups, -1, math.prod(out_size))
    return patches.permute(0, 3, 1, 2)


def _conv(
    call: ModuleCall,
    output_grad: Tensor,
    num_samples: int,
    max_chunk_bytes: int,
    create_graph: bool,
) -> dict[str, Factor] | None:
    x = _single_input(call, create_graph)
    module = call.module
    nd = len(module.kernel_size)
    if x is None or x.dim() != nd + 2 or _sample_axis(call, x, num_samples) != 0:
        return None
    k = output_grad.shape[0]
    groups = module.groups
    b = output_grad.reshape(k, num_samples, groups, module.out_channels // groups, -1)
    b = b.permute(0, 1, 4, 2, 3)
    # The patches are prod(kernel_size) times larger than the input: the factor builds them
    # when a method needs them and frees them afterwards.
    patches = partial(
        _patches,
        x,
        x._version,
        tuple(module._reversed_padding_repeated_twice),
        module.padding_mode,
        module.kernel_size,
        module.dilation,
        module.stride,
        groups,
    )
    input_shape = (num_samples, b.shape[2], groups, math.prod(module.weight.shape[1:]))
    factors: dict[str, Factor] = {
        "weight": KroneckerFactor(
            b,
            patches,
            module.weight.shape,
            max_chunk_bytes=max_chunk_bytes,
            input_shape=input_shape,
        )
    }
    if module.bias is not None:
        factors["bias"] = DenseFactor(_bias_columns(b), module.bias.shape)
    return factors


def _embedding(call: ModuleCall, output_grad: Tensor, num_samples: int) -> dict[str, Factor] | None:
    module = call.module
    # max_norm renormalises rows in place; scale_grad_by_freq couples the samples' gradients.
    if module.max_norm is not None or module.scale_grad_by_freq:
        return None
    tokens = _single_input(call, create_graph=False)
    if (
        tokens is None
        or tokens.is_floating_point()
        or tokens.dim() == 0
        or _sample_axis(call, tokens, num_samples) != 0
    ):
        return None
    indices = tokens.reshape(num_samples, -1).clone()
    b = output_grad.reshape(output_grad.shape[0], num_samples, -1, module.embedding_dim)
    if module.padding_idx is not None:
        b = b * (indices != module.padding_idx)[None, :, :, None]
    return {"weight": EmbeddingFactor(b, indices, module.weight.shape)}


def _structured(
    call: ModuleCall,
    output_grads: list[Tensor | None],
    num_samples: int,
    max_chunk_bytes: int,
    create_graph: bool,
) -> dict[str, Factor] | None:
    module = call.module
    if not isinstance(call.output, Tensor) or output_grads[0] is None:
        return None
    if _is_plain(module, nn.Embedding, "forward"):
        return _embedding(call, output_grads[0], num_samples)
    if _is_plain(module, nn.Linear, "forward"):
        return _linear(call, output_grads[0], num_samples, max_chunk_bytes, create_graph)
    for base in _CONV_CLASSES:
        if _is_plain(module, base, "forward", "_conv_forward"):
            return _conv(call, output_grads[0], num_samples, max_chunk_bytes, create_graph)
    return None


def factors_for_call(
    call: ModuleCall,
    output_grads: list[Tensor | None],
    params: list[Tensor],
    num_samples: int,
    *,
    create_graph: bool,
    max_chunk_bytes: int,
) -> dict[int, Factor]:
    """The factors one call contributes to its attributed parameters.

    Args:
        call: The recorded call; ``call.params`` names the parameters attributed to it.
        output_grads: For every tensor leaf of ``call.output``, the columns ``[K, *leaf.shape]``
            backpropagated to it, or ``None`` where nothing flows back.
        params: All requested parameters (indexed by ``call.params``).
        num_samples: The batch size :math:`N`.
        create_graph: Whether the factors must stay differentiable.
        max_chunk_bytes: Memory bound for intermediate tensors.

    Returns:
        ``parameter index -> factor``; parameters receiving nothing are left out.
    """
    if all(g is None for g in output_grads):
        return {}
    structured = _structured(call, output_grads, num_samples, max_chunk_bytes, create_graph)
    if structured is not None and set(call.params.values()) <= structured.keys():
        return {index: structured[name] for index, name in call.params.items()}
    named = {name: params[index] for index, name in call.params.items()}
    k = next(g for g in output_grads if g is not None).shape[0]
    per_sample_bytes = k * sum(p.numel() for p in named.values()) * params[0].element_size()
    chunk_size = max(1, max_chunk_bytes // max(per_sample_bytes, 1))
    columns = generic_columns(
        call,
        named,
        output_grads,
        num_samples,
        create_graph=create_graph,
        chunk_size=min(chunk_size, num_samples),
    )
    return {
        index: DenseFactor(columns[name], params[index].shape)
        for index, name in call.params.items()
    }
