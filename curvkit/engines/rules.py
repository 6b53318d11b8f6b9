r"""Per-call rules: turn a recorded call and the columns at its output into factors.

Hand-written rules cover the hot path: ``nn.Linear`` (inputs ``[N, in]`` and ``[N, ..., in]``)
and ``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups, padding mode), whose weights get
a :class:`~curvkit.engines.kronecker.KroneckerFactor` and whose biases get the columns at the
output summed over positions. Every other call, and subclasses that override ``forward``, go to
the generic :func:`torch.func` rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.engines.factor import DenseFactor, Factor
from curvkit.engines.generic import generic_columns
from curvkit.engines.kronecker import KroneckerFactor
from curvkit.engines.recording import ModuleCall

__all__ = ["factors_for_call"]

_CONV_CLASSES: tuple[type[nn.modules.conv._ConvNd], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_plain(module: nn.Module, base: type[nn.Module], *methods: str) -> bool:
    """Whether ``module`` is a ``base`` whose relevant methods are not overridden."""
    return isinstance(module, base) and all(
        getattr(type(module), name) is getattr(base, name) for name in methods
    )


def _single_input(call: ModuleCall) -> Tensor | None:
    if len(call.args) == 1 and not call.kwargs and isinstance(call.args[0], Tensor):
        return call.args[0]
    return None


def _linear(
    call: ModuleCall, output_grad: Tensor, num_samples: int, max_chunk_bytes: int
) -> dict[str, Factor] | None:
    x = _single_input(call)
    module = call.module
    if x is None or x.dim() < 2:
        return None
    leading = [axis for axis in range(x.dim() - 1) if x.shape[axis] == num_samples]
    if not leading:
        return None
    axis = leading[0]
    k = output_grad.shape[0]
    x = x.movedim(axis, 0).reshape(num_samples, -1, 1, module.in_features)
    b = output_grad.movedim(axis + 1, 1).reshape(k, num_samples, -1, 1, module.out_features)
    factors: dict[str, Factor] = {
        "weight": KroneckerFactor(b, x, module.weight.shape, max_chunk_bytes=max_chunk_bytes)
    }
    if module.bias is not None:
        factors["bias"] = DenseFactor(b.sum(dim=2).reshape(k, num_samples, -1), module.bias.shape)
    return factors


def _unfold(x: Tensor, module: nn.modules.conv._ConvNd) -> Tensor:
    """The patches a convolution multiplies with its weight, shape ``[N, C * kernel, T]``."""
    pads = module._reversed_padding_repeated_twice
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    nd = len(module.kernel_size)
    if nd == 1:
        return F.unfold(
            x.unsqueeze(2),
            (1, *module.kernel_size),
            dilation=(1, *module.dilation),
            stride=(1, *module.stride),
        )
    if nd == 2:
        return F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    # No unfold for 3d: a grouped convolution with one-hot kernels extracts the patches.
    channels = x.shape[1]
    kernel_volume = math.prod(module.kernel_size)
    eye = torch.eye(kernel_volume, dtype=x.dtype, device=x.device)
    one_hot = eye.reshape(kernel_volume, 1, *module.kernel_size).repeat(channels, 1, 1, 1, 1)
    patches = F.conv3d(x, one_hot, stride=module.stride, dilation=module.dilation, groups=channels)
    return patches.flatten(start_dim=2)


def _conv(
    call: ModuleCall, output_grad: Tensor, num_samples: int, max_chunk_bytes: int
) -> dict[str, Factor] | None:
    x = _single_input(call)
    module = call.module
    nd = len(module.kernel_size)
    if x is None or x.dim() != nd + 2 or x.shape[0] != num_samples:
        return None
    k = output_grad.shape[0]
    groups = module.groups
    patches = _unfold(x, module)  # [N, C * kernel, T]
    patches = patches.reshape(num_samples, groups, -1, patches.shape[-1]).permute(0, 3, 1, 2)
    b = output_grad.reshape(k, num_samples, groups, module.out_channels // groups, -1)
    b = b.permute(0, 1, 4, 2, 3)
    if b.shape[2] != patches.shape[1]:
        raise RuntimeError(
            f"unfolded input has {patches.shape[1]} positions, the output {b.shape[2]}"
        )
    factors: dict[str, Factor] = {
        "weight": KroneckerFactor(b, patches, module.weight.shape, max_chunk_bytes=max_chunk_bytes)
    }
    if module.bias is not None:
        factors["bias"] = DenseFactor(b.sum(dim=2).reshape(k, num_samples, -1), module.bias.shape)
    return factors


def _structured(
    call: ModuleCall, output_grads: list[Tensor | None], num_samples: int, max_chunk_bytes: int
) -> dict[str, Factor] | None:
    module = call.module
    if not isinstance(call.output, Tensor) or output_grads[0] is None:
        return None
    if _is_plain(module, nn.Linear, "forward"):
        return _linear(call, output_grads[0], num_samples, max_chunk_bytes)
    for base in _CONV_CLASSES:
        if _is_plain(module, base, "forward", "_conv_forward"):
            return _conv(call, output_grads[0], num_samples, max_chunk_bytes)
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
    structured = _structured(call, output_grads, num_samples, max_chunk_bytes)
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
