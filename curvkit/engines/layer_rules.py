r"""The built-in rules: the layer math of the engine's hot path.

- ``nn.Linear`` (inputs ``[N, in]`` and ``[N, ..., in]``, samples on any axis but the last):
  the weight gets a :class:`~curvkit.engines.KroneckerFactor` of the columns at the output and
  the input, the bias the columns at the output summed over positions;
- ``nn.Conv1d/2d/3d`` (batched input; any stride, padding, dilation, groups, padding mode): the
  same, with the input's patches in place of the input;
- ``nn.Embedding`` (integer indices, samples on the first axis, without ``max_norm`` or
  ``scale_grad_by_freq``): an :class:`~curvkit.engines.EmbeddingFactor`;
- ``nn.LayerNorm``, ``nn.RMSNorm`` (samples on any axis before the normalised ones),
  ``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d`` in eval mode (samples on the first axis,
  BatchNorm normalising with its running statistics): the columns of the elementwise affine
  parameters, :math:`\sum_t b_{k,n,t} \odot \hat x_{n,t}` for the weight and
  :math:`\sum_t b_{k,n,t}` for the bias, with the normalised input :math:`\hat x` recomputed
  by the same torch function without the affine part.

Each rule declines (:class:`~curvkit.engines.Decline`) the calls outside these cases, which then
go to the generic rule. :data:`BUILTIN_RULES` maps torch's classes to them, by exact type:
subclasses (which may override ``forward``) are not covered.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.engines.embedding import EmbeddingFactor
from curvkit.engines.factor import DenseFactor, Factor
from curvkit.engines.kronecker import STALE_INPUT_MESSAGE, BiasFactor, KroneckerFactor
from curvkit.engines.registry import Decline, Rule, RuleCall

__all__ = [
    "BUILTIN_RULES",
    "KRONECKER_RULES",
    "conv_rule",
    "embedding_rule",
    "linear_rule",
    "norm_rule",
]


def linear_rule(call: RuleCall) -> dict[str, Factor]:
    """Factors of ``nn.Linear``: a Kronecker factor for the weight, dense columns for the bias.

    Raises:
        Decline: If the input is not one tensor with at least two axes whose sample axis is not
            the last one.
    """
    x = call.single_input()
    output_grad = call.output_grad()
    module = call.module
    if x.dim() < 2:
        raise Decline("the input has fewer than two axes")
    axis = call.input_sample_axis()
    if axis == x.dim() - 1:
        raise Decline("the input's sample axis is its feature axis")
    k = output_grad.shape[0]
    n = call.num_samples
    x = x.movedim(axis, 0).reshape(n, -1, 1, module.in_features)
    b = output_grad.movedim(axis + 1, 1).reshape(k, n, -1, 1, module.out_features)
    factors: dict[str, Factor] = {
        "weight": KroneckerFactor(b, x, module.weight.shape, max_chunk_bytes=call.max_chunk_bytes)
    }
    if module.bias is not None:
        factors["bias"] = BiasFactor(b, module.bias.shape)
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


def conv_rule(call: RuleCall) -> dict[str, Factor]:
    """Factors of ``nn.Conv1d/2d/3d``: a Kronecker factor of the patches for the weight.

    Raises:
        Decline: If the input is not one batched tensor with the samples on its first axis.
    """
    x = call.single_input()
    output_grad = call.output_grad()
    module = call.module
    nd = len(module.kernel_size)
    if x.dim() != nd + 2:
        raise Decline(f"the input has {x.dim()} axes, not {nd + 2} (an unbatched input)")
    if call.input_sample_axis() != 0:
        raise Decline("the samples are not on the input's first axis")
    k = output_grad.shape[0]
    n = call.num_samples
    groups = module.groups
    b = output_grad.reshape(k, n, groups, module.out_channels // groups, -1)
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
    input_shape = (n, b.shape[2], groups, math.prod(module.weight.shape[1:]))
    factors: dict[str, Factor] = {
        "weight": KroneckerFactor(
            b,
            patches,
            module.weight.shape,
            max_chunk_bytes=call.max_chunk_bytes,
            input_shape=input_shape,
        )
    }
    if module.bias is not None:
        factors["bias"] = BiasFactor(b, module.bias.shape)
    return factors


def embedding_rule(call: RuleCall) -> dict[str, Factor]:
    """Factors of ``nn.Embedding``: one-hot rows of the looked-up tokens.

    Raises:
        Decline: If ``max_norm`` or ``scale_grad_by_freq`` is set, or if the input is not one
            tensor of indices with the samples on its first axis.
    """
    module = call.module
    if module.max_norm is not None:
        raise Decline("max_norm renormalises the looked-up rows in place")
    if module.scale_grad_by_freq:
        raise Decline("scale_grad_by_freq couples the samples' gradients")
    tokens = call.single_input()
    output_grad = call.output_grad()
    if tokens.is_floating_point():
        raise Decline("the input is not a tensor of indices")
    if call.input_sample_axis() != 0:
        raise Decline("the samples are not on the input's first axis")
    n = call.num_samples
    indices = tokens.reshape(n, -1).clone()
    b = output_grad.reshape(output_grad.shape[0], n, -1, module.embedding_dim)
    if module.padding_idx is not None:
        b = b * (indices != module.padding_idx)[None, :, :, None]
    return {"weight": EmbeddingFactor(b, indices, module.weight.shape)}


#: Normalisation layers whose weight is per channel (axis 1), the other axes its positions.
_CHANNEL_NORMS = (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _normalised(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """The input normalised without the affine part, and how many trailing axes a weight spans.

    Raises:
        Decline: For an input without a channel axis, or a BatchNorm that normalises with the
            batch's statistics (in training mode or without running statistics).
    """
    if isinstance(module, _CHANNEL_NORMS) and x.dim() < 2:
        raise Decline("the input has no channel axis")
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps), x.dim() - 1
    if isinstance(module, _CHANNEL_NORMS):
        if module.training or module.running_mean is None:
            raise Decline("the layer normalises with the batch's statistics")
        normalised = F.batch_norm(
            x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps
        )
        return normalised, x.dim() - 1
    shape = tuple(module.normalized_shape)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, shape, None, None, module.eps), len(shape)
    return F.rms_norm(x, shape, None, module.eps), len(shape)


def norm_rule(call: RuleCall) -> dict[str, Factor]:
    r"""Factors of LayerNorm, RMSNorm, GroupNorm and BatchNorm (eval mode): dense columns.

    The output is :math:`y = \hat x \odot w + \beta`, so the weight's columns are
    :math:`\sum_t b_{k,n,t} \odot \hat x_{n,t}` and the bias's :math:`\sum_t b_{k,n,t}`, summed
    over the positions :math:`t` the parameters broadcast over (GroupNorm's and BatchNorm's
    weight is per channel: the positions are the axes after it; BatchNorm normalises with its
    running statistics). Formed a chunk of columns at a time.

    Raises:
        Decline: If the input is not one tensor whose sample axis lies before the axes the
            parameters span (GroupNorm, BatchNorm: its first axis), or a BatchNorm uses the
            batch's statistics.
    """
    x = call.single_input()
    output_grad = call.output_grad()
    module = call.module
    normalised, spanned = _normalised(module, x)
    axis = call.input_sample_axis()
    if isinstance(module, _CHANNEL_NORMS):
        if axis != 0:
            raise Decline("the samples are not on the input's first axis")
        # [N, C, *positions]: the channel is the parameter axis.
        normalised = normalised.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        b = output_grad.reshape(*output_grad.shape[:3], -1).transpose(2, 3)
    else:
        if axis >= x.dim() - spanned:
            raise Decline("the input's sample axis is one the parameters span")
        param_shape = x.shape[x.dim() - spanned :]
        normalised = normalised.movedim(axis, 0).reshape(call.num_samples, -1, *param_shape)
        b = output_grad.movedim(axis + 1, 1)
        b = b.reshape(b.shape[0], call.num_samples, -1, *param_shape)
    factors: dict[str, Factor] = {}
    if "weight" in call.params:
        step = max(1, call.max_chunk_bytes // max(normalised.numel() * b.element_size(), 1))
        columns = torch.cat(
            [(b[k : k + step] * normalised).sum(dim=2) for k in range(0, b.shape[0], step)]
        )
        factors["weight"] = DenseFactor(columns, module.weight.shape)
    if "bias" in call.params:
        factors["bias"] = DenseFactor(b.sum(dim=2), module.bias.shape)
    return factors


#: The built-in rules by exact module class. ``NonDynamicallyQuantizableLinear`` is the
#: ``out_proj`` of ``nn.MultiheadAttention``, a ``Linear`` with the same ``forward``.
BUILTIN_RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: linear_rule,
    nn.modules.linear.NonDynamicallyQuantizableLinear: linear_rule,
    nn.Conv1d: conv_rule,
    nn.Conv2d: conv_rule,
    nn.Conv3d: conv_rule,
    nn.Embedding: embedding_rule,
    nn.LayerNorm: norm_rule,
    nn.RMSNorm: norm_rule,
    nn.GroupNorm: norm_rule,
    nn.BatchNorm1d: norm_rule,
    nn.BatchNorm2d: norm_rule,
    nn.BatchNorm3d: norm_rule,
}

#: The built-in rules whose weight factor has KFAC's form (registered with ``kronecker=True``;
#: the others with ``kronecker=False``).
KRONECKER_RULES: frozenset[Rule] = frozenset({linear_rule, conv_rule})
