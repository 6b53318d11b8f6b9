r"""Safety probes: refuse what per-sample curvature cannot be computed for, before it is wrong.

The engine calls these around its forward and backward pass: modules known to mix samples
(:func:`refuse_sample_mixing`), a forward pass of the first sample alone that reveals any other
mixing and the sample axes of recorded tensors (:func:`probe_first_sample`), the shape of the
columns the caller hands over (:func:`check_columns`) and parameter uses the recording did not
see (:func:`check_no_unseen_uses`). Quantities that do not use the engine
(:mod:`curvkit.engines.autodiff`) call them too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils import _pytree as pytree

from curvkit.core.model_io import Inputs, input_tensors, output_tensor
from curvkit.core.validation import check_finite_outputs
from curvkit.engines.guard import has_forward_hooks
from curvkit.engines.recording import ModuleCall, Recording, record_forward

__all__ = [
    "attach_probes",
    "check_columns",
    "check_no_unseen_uses",
    "probe_first_sample",
    "refuse_sample_mixing",
]


def refuse_sample_mixing(model: nn.Module) -> None:
    """Raise if ``model`` holds a module known to mix samples or to be random.

    Raises:
        ValueError: For a BatchNorm layer in training mode or without running statistics, or
            a dropout layer with ``p > 0`` in training mode.
    """
    for name, module in model.named_modules():
        if isinstance(module, _DropoutNd) and module.training and module.p > 0:
            raise ValueError(
                f"{type(module).__name__} `{name or 'model'}` is random in training mode, so "
                "the model's outputs, and their curvature, change from call to call. Call "
                "`model.eval()` first."
            )
        if isinstance(module, _BatchNorm) and (module.training or module.running_mean is None):
            raise ValueError(
                f"{type(module).__name__} `{name or 'model'}` normalises with statistics of "
                "the batch, so a sample's output depends on the other samples and per-sample "
                "curvature is undefined. Call `model.eval()` first (it then uses its running "
                "statistics)."
            )


def probe_first_sample(
    model: nn.Module, inputs: Inputs, params: list[Tensor], outputs: Tensor, num_samples: int
) -> dict[tuple[Any, int], ModuleCall]:
    """Run the first sample alone: refuse models that mix samples or are random, find sample axes.

    One forward pass of one sample without gradients. If the first sample's output differs
    from its output in the batch, the model mixes samples in a way no module type reveals
    (``x - x.mean(0)`` in a ``forward``) or is random (dropout in training mode); with a single
    sample, the pass runs it again, which reveals the latter. The pass is recorded like the
    batch's: the axis of a recorded tensor that shrinks from :math:`N` to 1 is its sample axis,
    even where another axis also has size :math:`N`. The user's forward hooks do not run in it
    (:mod:`curvkit.engines.guard`), unless the output differs without them. Skipped when an
    input does not hold the samples along axis 0.

    Returns:
        The recorded calls of the pass by :attr:`ModuleCall.key` (empty when skipped, or for a
        single sample).

    Raises:
        ValueError: If the batch's outputs are not finite, or the outputs differ beyond
            floating-point noise.
    """
    check_finite_outputs(outputs)
    tensors = input_tensors(inputs)
    if not all(x.dim() > 0 and x.shape[0] == num_samples for x in tensors):
        return {}
    first = pytree.tree_map(
        lambda x: x[:1].clone() if isinstance(x, Tensor) else x,
        inputs,
    )
    expected = outputs[: outputs.shape[0] // num_samples].detach()
    probe = record_forward(model, first, params, build_graph=False, forward_hooks=False)
    if not _same_output(probe.outputs, expected) and has_forward_hooks(model):
        # A forward hook that changes a module's output is part of the model's function.
        probe = record_forward(model, first, params, build_graph=False)
    if not _same_output(probe.outputs, expected):
        raise ValueError(
            "the model's output for a sample changes with the other samples in the batch or "
            "from one call to the next (batch statistics, dropout, an operation across "
            "samples), so per-sample curvature is undefined. Call `model.eval()` first, and "
            "make sure no operation mixes samples or draws random numbers."
        )
    if num_samples == 1:
        return {}
    return {call.key: call for call in probe.calls} | {
        ("site", site.index): site for site in probe.sites
    }


def _same_output(outputs: Any, expected: Tensor) -> bool:
    """Whether the probe's ``outputs`` are ``expected`` up to floating-point noise.

    Outputs that cannot be compared (no tensor, another shape: the samples are not along their
    first axis) count as the same: there is nothing to check.
    """
    try:
        alone = output_tensor(outputs)
    except TypeError:
        return True
    if alone.shape != expected.shape:
        return True
    tolerance = torch.finfo(expected.dtype).eps ** 0.5 if expected.is_floating_point() else 0.0
    scale = max(expected.abs().max().item(), 1.0)
    return torch.allclose(alone, expected, rtol=0.0, atol=tolerance * scale)


def attach_probes(recording: Recording, probes: dict[tuple[int, int], ModuleCall]) -> None:
    """Give each recorded call its probe-pass twin (:func:`probe_first_sample`), if any."""
    for call in recording.calls:
        call.probe = probes.get(call.key)
    for site in recording.sites:
        twin = probes.get(("site", site.index))
        site.probe = twin if twin is not None and twin.module.func is site.module.func else None


def check_columns(columns: Any, outputs: Tensor) -> Tensor:
    """Return ``columns`` if they are ``[K, *outputs.shape]`` like the outputs, else raise."""
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


def check_no_unseen_uses(
    outputs: Tensor, recording: Recording, params: list[Tensor], column: Tensor
) -> None:
    """Raise if a parameter without recorded uses still influences the outputs.

    Uses are seen through the arguments of torch functions; one hidden deeper (a tensor in a
    dict argument) would otherwise give a silently zero factor. Parameters outside the graph
    cost nothing here: the backward pass reaches none of them.
    """
    seen = {index for call in recording.calls for index in call.params} | recording.shared_params
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
