r"""The Hessian of the loss: products, the operator, the dense matrix and the exact diagonal.

For the loss :math:`L(\theta)` of the data, the Hessian :math:`\nabla^2_\theta L` is the GGN
(:mod:`curvkit.quantities.ggn`) plus the curvature of the model itself,

.. math::

    \nabla^2_\theta L = G + \sum_n \sum_c \frac{\partial L}{\partial f_{n,c}}
    \nabla^2_\theta f_{n,c},

and, unlike the GGN, it can be indefinite. Its products come from a double backward pass
(Pearlmutter's trick): :math:`H u = \nabla_\theta \langle \nabla_\theta L, u \rangle`, about the
cost of two gradients, with many vectors batched into one pass (``is_grads_batched``). The
square-root factors of the GGN play no part in them.

The diagonal (:func:`diag_hessian`) is exact for networks whose nonlinearities are elementwise
activations (:mod:`curvkit.quantities.elementwise`): the GGN's diagonal from the engine's factors,
plus, for every call :math:`a = \sigma(z)` of a smooth activation, the signed residual
:math:`\sum_{n,j} \rho_{n,j} (\partial z_{n,j} / \partial \theta)^{\odot 2}` with
:math:`\rho = \partial L / \partial a \odot \sigma''(z)`, whose columns the engine pushes back
from :math:`z` as it pushes the loss Hessian's square root back from the outputs.

With param groups, every quantity is that of the block-diagonal Hessian, one block per group.
``data`` is one batch or an iterable of batches, combined as :mod:`curvkit.core.data` explains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvkit import _moved
from curvkit.core.autograd import batched_grad
from curvkit.core.data import Data
from curvkit.core.model_io import Inputs, call_model, output_tensor, sample_layout
from curvkit.core.validation import check_finite_outputs
from curvkit.engines import DEFAULT_CHUNK_BYTES, iter_factors
from curvkit.engines.guard import model_guard
from curvkit.engines.safety import refuse_sample_mixing
from curvkit.losses import LossFunction
from curvkit.quantities import elementwise
from curvkit.quantities.context import Params, Problem, fill_argument_docs
from curvkit.quantities.factor_products import CHUNK_ELEMENTS

__all__ = ["batch_hessian_products", "diag_hessian", "hessian_matrix", "hessian_vector_product"]


def _group_products(loss: Tensor, params: list[Tensor], blocks: list[Tensor]) -> list[Tensor]:
    r"""The products of one group's Hessian block with ``blocks`` ``[J, *param.shape]``.

    One backward pass with ``create_graph`` gives :math:`\nabla L`; one more, batched over the
    :math:`J` vectors, gives :math:`\nabla \langle \nabla L, u_j \rangle`. A gradient that does
    not depend on the parameters (a loss linear in them) has a zero Hessian.
    """
    grads = torch.autograd.grad(
        loss, params, create_graph=True, allow_unused=True, materialize_grads=True
    )
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    products = [torch.zeros_like(block) for block in blocks]
    if not live:
        return products
    outputs = [grads[i] for i in live]
    vectors = [blocks[i] for i in live]
    return batched_grad(outputs, params, vectors)


def batch_hessian_products(
    problem: Problem, inputs: Inputs, targets: Tensor, blocks: list[Tensor | None]
) -> tuple[Tensor, list[Tensor]]:
    """One batch's Hessian products per parameter; groups whose blocks are ``None`` skipped.

    Args:
        problem: The call context.
        inputs: The batch's inputs.
        targets: The batch's targets.
        blocks: One ``[J, *param.shape]`` block (or ``None``) per parameter.

    Returns:
        ``(outputs, products)``, one product per parameter of the groups not skipped.
    """
    refuse_sample_mixing(problem.model)
    # The fused attention kernels have no double backward; the math kernel computes the
    # same attention with differentiable operations.
    with model_guard(problem.model), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        outputs = output_tensor(call_model(problem.model, inputs))
        check_finite_outputs(outputs)
        loss = problem.loss_fn(outputs, targets)
        products: list[Tensor] = []
        for group, group_blocks in zip(problem.groups, problem.by_group(blocks), strict=True):
            if group_blocks[0] is not None:
                products += _group_products(loss, group["params"], group_blocks)
    return outputs.detach(), [p.detach() for p in products]


def _reduce_products(problem: Problem, blocks: list[Tensor | None], passes: int) -> list[Tensor]:
    """Hessian products per parameter over the data; groups whose blocks are ``None`` skipped."""
    return problem.reduce(
        lambda inputs, targets: batch_hessian_products(problem, inputs, targets, blocks),
        passes=passes,
    )


@fill_argument_docs
def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    vector: Tensor | Sequence[Tensor] | Sequence[Sequence[Tensor]],
    *,
    params: Params = None,
    progress: bool | None = None,
) -> Tensor | list[Tensor] | list[list[Tensor]]:
    r"""The Hessian-vector product :math:`\nabla^2_\theta L\, u` by double backward.

    .. math::

        \nabla^2_\theta L\, u = \nabla_\theta \big\langle \nabla_\theta L, u \big\rangle

    per batch: one forward pass, one backward pass that keeps its graph, and one backward
    through it. With param groups, each group's diagonal block multiplies the group's part of
    :math:`u` (one double backward per group).

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        vector: :math:`u`: one flat tensor over the concatenation of the parameters (in order),
            or tensors shaped like them (with groups, one list per group), with the
            parameters' dtype and device.
        params: {params}
        progress: {progress}

    Returns:
        :math:`\nabla^2 L\, u` in the form of ``vector``.

    Raises:
        TypeError: If ``vector`` is neither a tensor nor a sequence of tensors, or an argument
            has the wrong type.
        ValueError: If ``vector``'s shapes, dtype or device do not match the parameters, or the
            parameters are not the model's.
    """
    problem = Problem(
        model, loss_fn, data, params, progress=progress, name="hessian_vector_product"
    )
    blocks = [v.unsqueeze(0) for v in problem.split_vector(vector)]
    product = [p.squeeze(0) for p in _reduce_products(problem, blocks, passes=1)]
    if isinstance(vector, Tensor):
        return torch.cat([p.reshape(-1) for p in product])
    return problem.per_group(product)


@fill_argument_docs
def hessian_matrix(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Params = None,
    progress: bool | None = None,
) -> Tensor | list[Tensor]:
    r"""The dense Hessian :math:`\nabla^2_\theta L`, a :math:`D \times D` matrix.

    Rows and columns follow the flat concatenation of ``params``. Computed as Hessian products
    with chunks of unit vectors (at most :data:`~curvkit.quantities.factor_products.CHUNK_ELEMENTS`
    entries per chunk), each chunk one batched double backward pass per batch.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data} Re-iterable if there is more than one chunk.
        params: {params}
        progress: {progress}

    Returns:
        The Hessian ``[D, D]`` with the parameters' dtype and device; with param groups, one
        diagonal block ``[D_g, D_g]`` per group, as :func:`curvkit.quantities.ggn.ggn_matrix`.

    Raises:
        TypeError, ValueError: As :func:`hessian_vector_product`.
    """
    problem = Problem(model, loss_fn, data, params, progress=progress, name="hessian_matrix")
    matrices = []
    for g, group in enumerate(problem.groups):
        group_params = group["params"]
        dim = sum(p.numel() for p in group_params)
        chunk = max(1, CHUNK_ELEMENTS // dim)
        eye = torch.eye(dim, dtype=group_params[0].dtype, device=group_params[0].device)
        rows = []
        for start in range(0, dim, chunk):
            unit = eye[start : start + chunk]
            sizes = [p.numel() for p in group_params]
            group_blocks = [
                b.reshape(-1, *p.shape)
                for b, p in zip(unit.split(sizes, dim=1), group_params, strict=True)
            ]
            blocks: list[Tensor | None] = [
                block
                for h, other in enumerate(problem.groups)
                for block in (group_blocks if h == g else [None] * len(other["params"]))
            ]
            product = _reduce_products(problem, blocks, passes=2)
            rows.append(torch.cat([p.reshape(p.shape[0], -1) for p in product], dim=1))
        matrices.append(torch.cat(rows))
    return matrices if problem.grouped else matrices[0]


class _PreActivation(nn.Module):
    """The model cut at the pre-activation of the smooth activation call at ``position``."""

    def __init__(self, model: nn.Module, position: int) -> None:
        super().__init__()
        self.model = model
        self.position = position

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Run the model; return the pre-activation."""
        return elementwise.capture_pre_activation(
            lambda: self.model(*args, **kwargs), self.position
        )


def _residual_diag(problem: Problem, inputs: tuple, position: int, weight: Tensor) -> list[Tensor]:
    r"""The call's :math:`\sum_{n,j} \rho_{n,j} (\partial z_{n,j} / \partial\theta)^{\odot 2}`.

    The engine pushes the unit columns :math:`e_j` back from the pre-activation :math:`z`
    (an expanded view: nothing of size :math:`K N K` is allocated at once), in chunks of
    columns bounded by the problem's chunk bytes.
    """
    num_samples = weight.shape[0]
    width = weight[0].numel()
    eye = torch.eye(width, dtype=weight.dtype, device=weight.device)
    columns = eye.reshape(width, 1, *weight.shape[1:]).expand(width, *weight.shape)
    chunk = max(1, DEFAULT_CHUNK_BYTES // (num_samples * width * weight.element_size()))
    weights = weight.reshape(num_samples, width).T
    total: list[Tensor] | None = None
    for part in iter_factors(
        _PreActivation(problem.model, position),
        inputs,
        problem.params,
        lambda _: columns,
        column_chunk_size=chunk,
        max_chunk_bytes=DEFAULT_CHUNK_BYTES,
    ):
        diag = [f.weighted_diag(weights[part.columns], DEFAULT_CHUNK_BYTES) for f in part.factors]
        total = diag if total is None else [a + b for a, b in zip(total, diag, strict=True)]
    assert total is not None
    return total


@fill_argument_docs
def diag_hessian(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Params = None,
    progress: bool | None = None,
) -> list[Tensor] | list[list[Tensor]]:
    r"""The exact diagonal of the Hessian, for networks with elementwise nonlinearities.

    .. math::

        \operatorname{diag} \nabla^2_\theta L = \operatorname{diag} G
        + \sum_{\text{activation calls}} \sum_{n,j}
        \frac{\partial L}{\partial a_{n,j}}\, \sigma''(z_{n,j})
        \Big(\frac{\partial z_{n,j}}{\partial \theta}\Big)^{\odot 2}

    (:mod:`curvkit.quantities.elementwise`): the GGN's diagonal, and for every call :math:`a =
    \sigma(z)` of a smooth elementwise activation (``nn.Tanh`` or ``torch.tanh``, sigmoid, GELU,
    SiLU, ELU, SELU, CELU, Softplus, Mish, LogSigmoid) one more pass of the engine, from :math:`z`,
    with :math:`z`'s size per sample in columns. ReLU-like activations and pooling add nothing.
    Any graph is fine (skip connections, several inputs, convolutions, BatchNorm in eval mode)
    as long as every other operation is linear in each operand and no product has two operands
    that depend on one parameter; anything else (LayerNorm, attention, a tied weight, ``x * x``
    of a computed tensor) is refused with a pointer to the stochastic estimators.

    Cost: an activation with :math:`W` entries per sample costs an engine pass with :math:`W`
    columns per sample (in chunks of columns under the chunk budget): cheap for the hidden
    layers of an MLP, as for BackPACK's ``DiagHessian``, but slow for a smooth activation on a
    large convolutional feature map, where the estimators are the better tool.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        progress: {progress}

    Returns:
        The diagonal, one tensor per parameter shaped like it (one list per group with groups).

    Raises:
        curvkit.quantities.elementwise.NotElementwiseError: A ``ValueError`` for a model outside
        that
            class; use :func:`curvkit.randomized.estimators.hutchinson_diag` or
            :func:`curvkit.randomized.estimators.xdiag` with
            :class:`curvkit.operators.hessian.HessianOperator` instead.
        TypeError, ValueError: As :func:`curvkit.quantities.ggn.diag_ggn`.
    """
    problem = Problem(model, loss_fn, data, params, progress=progress, name="diag_hessian")

    def batch_diag(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        with torch.enable_grad(), elementwise.record_activations() as calls:
            outputs = output_tensor(call_model(model, inputs))
        elementwise.check_diagonal_is_exact(outputs, calls)
        num_samples = sample_layout(inputs, outputs)[0]
        for call in calls:
            if call.pre_activation.dim() == 0 or call.pre_activation.shape[0] != num_samples:
                raise elementwise.NotElementwiseError(
                    "diag_hessian needs every activation's input to hold the samples along its "
                    f"first axis; {call.function.__name__} got shape "
                    f"{tuple(call.pre_activation.shape)} for {num_samples} samples"
                )
        with torch.enable_grad():
            weights = elementwise.residual_weights(problem.loss_fn(outputs, targets), calls)
        _, factors = problem.factors(inputs, targets)
        diagonal = [f.diag() for f in factors]
        for call, weight in zip(calls, weights, strict=True):
            if weight.any():
                residual = _residual_diag(problem, inputs, call.position, weight)
                diagonal = [a + b for a, b in zip(diagonal, residual, strict=True)]
        return outputs.detach(), diagonal

    return problem.per_group(problem.reduce(batch_diag))


def __getattr__(name: str) -> object:
    """``HessianOperator`` moved up to :mod:`curvkit.operators.hessian`; its old path works."""
    return _moved.moved_attribute(__name__, name)
