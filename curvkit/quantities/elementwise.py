r"""Elementwise activations in a forward pass: where the Hessian leaves the GGN, and by how much.

For a loss :math:`L` of outputs :math:`f`, the Hessian is the GGN plus one residual term per
nonlinear operation on the path from the parameters to :math:`f`. When every nonlinearity on that
path is an elementwise activation :math:`a = \sigma(z)` (applied once per call, to a
pre-activation :math:`z` that depends on the parameters), and every other operation is linear in
each of its differentiable operands and never multiplies two that depend on one parameter, the
diagonal of the Hessian is

.. math::

    \operatorname{diag} \nabla^2_\theta L = \operatorname{diag} G
    + \sum_{\text{calls}} \sum_{n, j} \rho_{n,j}
      \Big(\frac{\partial z_{n,j}}{\partial \theta}\Big)^{\odot 2},
    \qquad \rho = \frac{\partial L}{\partial a} \odot \sigma''(z),

because second derivatives of a linear map vanish and the products of the surviving terms along
two different parameters are off the diagonal. This module finds the calls
(:func:`record_activations`, a :class:`~torch.overrides.TorchFunctionMode` that sees ``nn.Tanh``
and ``torch.tanh`` alike), checks the autograd graph for anything else that is nonlinear
(:func:`check_diagonal_is_exact`), and computes :math:`\rho` (:func:`residual_weights`).
Piecewise-linear activations (ReLU, max-pooling, ...) have :math:`\sigma'' = 0` almost
everywhere and need no term.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "ActivationCall",
    "NotElementwiseError",
    "capture_pre_activation",
    "check_diagonal_is_exact",
    "record_activations",
    "residual_weights",
]

#: The smooth elementwise activations whose calls are recorded: ``f(z, *options)``.
SMOOTH_ACTIVATIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        torch.tanh,
        torch.sigmoid,
        torch.Tensor.tanh,
        torch.Tensor.sigmoid,
        F.tanh,
        F.sigmoid,
        F.gelu,
        F.silu,
        F.elu,
        F.selu,
        F.celu,
        F.softplus,
        F.mish,
        F.logsigmoid,
    }
)

#: Autograd nodes of the smooth activations: each must come from a recorded call.
_SMOOTH_NODES = frozenset(
    {
        "TanhBackward0",
        "SigmoidBackward0",
        "GeluBackward0",
        "SiluBackward0",
        "EluBackward0",
        "SoftplusBackward0",
        "MishBackward0",
        "LogSigmoidBackward0",
    }
)

#: Nodes linear in every differentiable operand (reshaping, indexing, sums, padding, pooling by
#: averages) or piecewise linear (second derivative zero almost everywhere).
_LINEAR_NODES = frozenset(
    {
        "AccumulateGrad",
        "AddBackward0",
        "AddBackward1",
        "SubBackward0",
        "SubBackward1",
        "RsubBackward1",
        "NegBackward0",
        "MulBackward1",
        "DivBackward1",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "AliasBackward0",
        "TBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ExpandBackward0",
        "CatBackward0",
        "StackBackward0",
        "SplitBackward0",
        "SplitWithSizesBackward0",
        "UnbindBackward0",
        "SelectBackward0",
        "SliceBackward0",
        "IndexBackward0",
        "AsStridedBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward4",
        "SumBackward0",
        "SumBackward1",
        "MeanBackward0",
        "MeanBackward1",
        "CloneBackward0",
        "ToCopyBackward0",
        "ConstantPadNdBackward0",
        "ReflectionPad1DBackward0",
        "ReflectionPad2DBackward0",
        "ReflectionPad3DBackward0",
        "ReplicationPad1DBackward0",
        "ReplicationPad2DBackward0",
        "ReplicationPad3DBackward0",
        "AvgPool2DBackward0",
        "AvgPool3DBackward0",
        "AdaptiveAvgPool2DBackward0",
        "AdaptiveAvgPool3DBackward0",
        "FlattenBackward0",
        "ReluBackward0",
        "LeakyReluBackward0",
        "HardtanhBackward0",
        "ThresholdBackward0",
        "MaxPool2DWithIndicesBackward0",
        "MaxPool3DWithIndicesBackward0",
        "AdaptiveMaxPool2DBackward0",
    }
)

#: Products of their operands: exact on the diagonal when no parameter reaches two operands.
_PRODUCT_NODES = frozenset(
    {
        "AddmmBackward0",
        "MmBackward0",
        "BmmBackward0",
        "MulBackward0",
        "ConvolutionBackward0",
        "EmbeddingBackward0",
        "NativeBatchNormBackward0",
    }
)


class NotElementwiseError(ValueError):
    """The model has a nonlinearity that is not an elementwise activation."""


@dataclass
class ActivationCall:
    """One call ``output = function(pre_activation, *args, **kwargs)`` of a smooth activation.

    ``position`` counts the smooth activation calls of the forward pass before this one,
    including those on tensors that do not require grad (which are not recorded).
    """

    position: int
    function: Callable[..., Tensor]
    pre_activation: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Tensor


class _Recorder(TorchFunctionMode):
    """Notes every call of a smooth activation on a tensor that requires grad."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[ActivationCall] = []
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func in SMOOTH_ACTIVATIONS and args and isinstance(args[0], Tensor):
            if args[0].requires_grad and isinstance(output, Tensor):
                call = ActivationCall(self.seen, func, args[0], args[1:], kwargs, output)
                self.calls.append(call)
            self.seen += 1
        return output


@contextmanager
def record_activations() -> Iterator[list[ActivationCall]]:
    """Record the smooth elementwise activation calls of the code run inside, in order."""
    recorder = _Recorder()
    with recorder:
        yield recorder.calls


class _Capture(TorchFunctionMode):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.seen = 0
        self.value: Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SMOOTH_ACTIVATIONS and args and isinstance(args[0], Tensor):
            if self.seen == self.index:
                self.value = args[0]
            self.seen += 1
        return func(*args, **kwargs)


def capture_pre_activation(forward: Callable[[], Any], position: int) -> Tensor:
    """Run ``forward`` and return the pre-activation of the call at ``position``.

    Raises:
        RuntimeError: If the forward pass makes fewer calls than in the recorded pass.
    """
    capture = _Capture(position)
    with capture:
        forward()
    if capture.value is None:
        raise RuntimeError(
            "the model made fewer activation calls than in its first forward pass; "
            "diag_hessian needs a forward pass that does the same on every call"
        )
    return capture.value


def _parameters_behind(root: Any) -> dict[int, frozenset[int]]:
    """For every node of the graph below ``root``: the parameters (leaf nodes) it depends on."""
    behind: dict[int, frozenset[int]] = {}
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in behind:
            continue
        operands = [fn for fn, _ in node.next_functions if fn is not None]
        if type(node).__name__ == "AccumulateGrad":
            behind[id(node)] = frozenset({id(node)})
        elif expanded:
            behind[id(node)] = frozenset().union(*(behind[id(op)] for op in operands))
        else:
            stack.append((node, True))
            stack.extend((op, False) for op in operands if id(op) not in behind)
    return behind


def _refuse(reason: str) -> NotElementwiseError:
    return NotElementwiseError(
        f"diag_hessian is exact only for networks whose nonlinearities are elementwise "
        f"activations, and {reason}. Estimate the diagonal instead with "
        "curvkit.randomized.estimators.hutchinson_diag or curvkit.randomized.estimators.xdiag "
        "(Hessian-vector products through curvkit.HessianOperator)."
    )


def check_diagonal_is_exact(outputs: Tensor, calls: list[ActivationCall]) -> None:
    """Raise unless the GGN and the calls' residuals give the Hessian's exact diagonal.

    Walks the autograd graph from ``outputs`` to the parameters.

    Raises:
        NotElementwiseError: For any other nonlinear operation, a smooth activation applied
            outside the recorded calls, or a product of two tensors that depend on one
            parameter (a weight tied to one it multiplies, attention's queries and keys).
    """
    if outputs.grad_fn is None:
        return
    recorded = {id(call.output.grad_fn) for call in calls}
    behind = _parameters_behind(outputs.grad_fn)
    seen: set[int] = set()
    stack = [outputs.grad_fn]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        operands = [fn for fn, _ in node.next_functions if fn is not None]
        if name in _SMOOTH_NODES:
            if id(node) not in recorded:
                raise _refuse(
                    f"{name} is applied in place, or by a function curvkit does not record"
                )
        elif name == "DivBackward0":
            # Linear in the numerator only: a computed denominator has a second derivative.
            if node.next_functions[1][0] is not None:
                raise _refuse("a division has a computed denominator")
        elif name in _PRODUCT_NODES:
            if name == "NativeBatchNormBackward0" and getattr(node, "_saved_training", True):
                raise _refuse(
                    "a normalisation (BatchNorm in training mode, InstanceNorm, GroupNorm) "
                    "divides by statistics of its input"
                )
            # A product is linear along one parameter coordinate when no parameter reaches
            # two of its operands: its second derivatives are then all off the diagonal.
            reached: set[int] = set()
            for operand in operands:
                if reached & behind[id(operand)]:
                    raise _refuse(
                        f"{name[: -len('Backward0')]} multiplies two tensors that depend on the "
                        "same parameter"
                    )
                reached |= behind[id(operand)]
        elif name not in _LINEAR_NODES:
            raise _refuse(f"the model applies the nonlinear operation {name}")
        stack.extend(operands)


def residual_weights(loss: Tensor, calls: list[ActivationCall]) -> list[Tensor]:
    r"""The weights :math:`\rho = \partial L / \partial a \odot \sigma''(z)` of every call.

    The second derivative is that of the call's own function with its options (``approximate``
    of GELU, ``beta`` of Softplus, ...), by differentiating its first derivative's sum: for an
    elementwise function that is the elementwise second derivative.
    """
    if not calls:
        return []
    output_grads = torch.autograd.grad(
        loss, [call.output for call in calls], retain_graph=True, allow_unused=True
    )
    weights = []
    for call, output_grad in zip(calls, output_grads, strict=True):
        z = call.pre_activation.detach().requires_grad_(True)
        with torch.enable_grad():
            (first,) = torch.autograd.grad(
                call.function(z, *call.args, **call.kwargs).sum(), z, create_graph=True
            )
            (second,) = torch.autograd.grad(first.sum(), z, allow_unused=True)
        if output_grad is None or second is None:
            weights.append(torch.zeros_like(z.detach()))
        else:
            weights.append(output_grad * second)
    return weights
