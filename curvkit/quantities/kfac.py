r"""Kronecker factors of Linear and convolution layers from the engine's inputs and columns.

For a layer :math:`y_{n,t} = W x_{n,t}` (+ bias) applied at positions :math:`t < T` (a sequence,
the patches of a convolution), the engine's :class:`~curvkit.engines.KroneckerFactor` holds the
inputs :math:`x_{n,t}` and the columns :math:`b_{k,n,t}` pushed back to the output: the loss
Hessian's square root (``fisher_type="exact"``), its Monte-Carlo version (``"mc"``), or the loss
gradient (``"empirical"``), all with the reduction factor :math:`r` folded in as
:math:`\sqrt r` (:func:`curvkit.losses.hessian_sqrt`). KFAC approximates the layer's block of the
curvature by :math:`B \otimes A` in the weight's row-major layout ``[out, in]``, with
(Eschenhagen et al., 2023)

.. math::

    \text{expand:}\quad A = \frac{1}{N T} \sum_{n,t} x_{n,t} x_{n,t}^\top,
    \qquad B = \sum_{k,n,t} b_{k,n,t} b_{k,n,t}^\top;

    \text{reduce:}\quad A = \frac{1}{N} \sum_n \bar x_n \bar x_n^\top,
    \quad \bar x_n = \frac1T \sum_t x_{n,t},
    \qquad B = \sum_{k,n} \Big(\sum_t b_{k,n,t}\Big)\Big(\sum_t b_{k,n,t}\Big)^\top,

where :math:`N` counts the samples of all batches (and ranks). These are the conventions of
curvlinops' ``KFACLinearOperator``: for a ``mean`` reduction over :math:`Z` loss terms
:math:`B` is :math:`1/Z` times the sum of the unscaled outer products. The bias shares
:math:`B` (its block is :math:`B` itself); with ``separate_weight_and_bias=False`` weight and
bias form one block, :math:`x` extended by a constant 1. ``"forward-only"`` sets :math:`B = I`.

Batches combine exactly (:meth:`curvkit.quantities.context.Problem.reduce`): :math:`B` is linear in
the loss, and :math:`A` is returned as a sum and a count, each divided by the batch's normalisation,
so that their ratio is the average over all samples whatever the batch sizes. A grouped
convolution gets one pair of factors per group (a leading axis ``G``).

Parameters that no Kronecker factor covers (LayerNorm, embeddings, a weight shared by layers
of different shapes) get their exact block (``fallback="block"``, :math:`D_p \times D_p`) or
its diagonal (``fallback="diagonal"``) of the same curvature, or are refused
(``fallback="error"``).

EKFAC (George et al., 2018) keeps the eigenvectors :math:`Q_A, Q_B` and replaces the
eigenvalues :math:`\lambda_B \otimes \lambda_A` by the second moments of the per-sample
gradients :math:`g_{k,n} = \sum_t b_{k,n,t} x_{n,t}^\top` in that basis,
:math:`s = \sum_{k,n} (Q_B^\top g_{k,n} Q_A)^{\odot 2}` (:func:`eigenvalue_corrections`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from curvkit import losses
from curvkit.core.data import Inputs, distributed_world, is_batch
from curvkit.engines import Factor, ZeroFactor
from curvkit.engines.registry import declares_kronecker
from curvkit.quantities.context import Problem

__all__ = [
    "FALLBACKS",
    "FISHER_TYPES",
    "KFAC_APPROXIMATIONS",
    "Fallback",
    "FallbackBlock",
    "FisherType",
    "KFACApprox",
    "KroneckerBlock",
    "LayerPlan",
    "check_coverage",
    "compute_kfac_blocks",
    "eigenvalue_corrections",
    "grouped",
    "plan_layers",
]

#: The curvature whose Kronecker factors are computed, see :class:`curvkit.KFACOperator`.
FisherType = Literal["exact", "mc", "empirical", "forward-only"]
#: How weight sharing over positions is approximated (Eschenhagen et al., 2023).
KFACApprox = Literal["expand", "reduce"]
#: What covers parameters without a Kronecker factor.
Fallback = Literal["diagonal", "block", "error"]

FISHER_TYPES = ("exact", "mc", "empirical", "forward-only")
KFAC_APPROXIMATIONS = ("expand", "reduce")
FALLBACKS = ("diagonal", "block", "error")

#: The modules whose ``bias`` adds to every output position, so that it shares the weight's
#: output factor :math:`B`. A bias of any other module goes to the fallback.
ADDITIVE_BIAS_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Largest fallback block (bytes) built without refusal; larger ones should use the diagonal.
MAX_FALLBACK_BLOCK_BYTES = 2**30


@dataclass
class KroneckerBlock:
    r"""The Kronecker factors of one layer: its curvature block is :math:`B \otimes A`.

    Attributes:
        module: The layer's qualified name in the model.
        params: ``"weight"`` and/or ``"bias"`` mapped to the parameter's position in the
            operator's flat parameter list.
        A: The input-side factor ``[I, I]`` (``[I + 1, I + 1]`` for a joint weight and bias,
            ``[G, I, I]`` for a convolution with ``G > 1`` groups); ``None`` when only the bias
            is covered.
        B: The output-side factor ``[O, O]`` (``[G, O, O]`` with groups).
        joint: Whether weight and bias form one block (``separate_weight_and_bias=False``).
    """

    module: str
    params: dict[str, int]
    A: Tensor | None
    B: Tensor
    joint: bool = False


@dataclass
class FallbackBlock:
    """The exact block, or its diagonal, of a parameter no Kronecker factor covers.

    Attributes:
        name: The parameter's qualified name in the model.
        position: Its position in the operator's flat parameter list.
        kind: ``"diagonal"`` (``matrix`` is the diagonal, ``[D_p]``) or ``"block"``
            (``matrix`` is ``[D_p, D_p]``).
        matrix: The diagonal or the block.
    """

    name: str
    position: int
    kind: str
    matrix: Tensor


@dataclass
class LayerPlan:
    """Which requested parameters belong to which layer, found from the model's modules.

    Attributes:
        module: The qualified name of the module that owns the parameters.
        weight: Position of the parameter whose factor supplies the layer's columns: the
            weight's, or for a bias alone the bias's (``None``: neither).
        bias: Position of an additive bias among the user's parameters (``None``: none).
        weight_requested: Whether the weight is one of the user's parameters (else ``weight``
            is the bias's position).
        others: ``(position, name)`` of the user's parameters of this module that are neither.
    """

    module: str
    weight: int | None = None
    bias: int | None = None
    weight_requested: bool = False
    others: list[tuple[int, str]] = field(default_factory=list)


def plan_layers(model: nn.Module, params: list[Tensor]) -> tuple[list[LayerPlan], list[Tensor]]:
    """Group the parameters by the module owning them.

    Args:
        model: The network.
        params: The user's parameters, in the operator's order.

    Returns:
        ``(plans, engine_params)``: one plan per owning module, and the parameters to ask the
        engine for (``params`` themselves: a bias's own factor gives its output factor).
    """
    positions = {id(p): i for i, p in enumerate(params)}
    engine_params = list(params)
    plans: list[LayerPlan] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        plan = LayerPlan(module_name)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or id(param) not in positions:
                continue
            seen.add(id(param))
            position = positions[id(param)]
            if name == "weight":
                plan.weight, plan.weight_requested = position, True
            elif name == "bias" and isinstance(module, ADDITIVE_BIAS_MODULES):
                plan.bias = position
            else:
                plan.others.append((position, f"{module_name}.{name}".lstrip(".")))
        if plan.bias is not None and plan.weight is None:
            # The bias alone (its weight frozen, computed by a parametrization, or left out):
            # its own factor holds the output columns.
            plan.weight = plan.bias
        if plan.weight is not None or plan.bias is not None or plan.others:
            plans.append(plan)
    return plans, engine_params


def empirical_columns(loss_fn: losses.LossFunction, targets: Tensor) -> Callable[[Tensor], Tensor]:
    r"""The loss gradient at the observed targets as one column, scaled like a square root.

    The batch loss :math:`L = r \sum_n \ell_n` has output gradients :math:`r \nabla \ell_n`;
    the column :math:`\sqrt r\, \nabla \ell_n = \nabla_{f_n} L / \sqrt r` (with
    :math:`r = 1 / Z`, :func:`curvkit.losses.normalization`) makes :math:`b b^\top` carry
    :math:`r` once, like the loss Hessian's square root does.
    """

    def columns(outputs: Tensor) -> Tensor:
        outputs = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(outputs, targets)
        (grad,) = torch.autograd.grad(loss, outputs)
        scale = losses.normalization(loss_fn, outputs.detach(), targets).sqrt()
        return (grad * scale).unsqueeze(0)

    return columns


def _columns_for(
    problem: Problem, fisher_type: str, targets: Tensor
) -> Callable[[Tensor], Tensor] | None:
    if fisher_type == "empirical":
        return empirical_columns(problem.loss_fn, targets)
    if fisher_type == "forward-only":
        # The output factor is the identity: one zero column keeps the backward pass trivial.
        return lambda outputs: outputs.new_zeros(1, *outputs.shape)
    if fisher_type == "mc":
        return None

    def exact_columns(outputs: Tensor) -> Tensor:
        # The call context's memory plan refuses columns beyond the budget before building them.
        return problem.columns(outputs, targets)

    return exact_columns


def grouped(tensor: Tensor) -> Tensor:
    """``[G, m, m]`` from a factor stored as ``[m, m]`` (one group) or ``[G, m, m]``."""
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor


def _stored(tensor: Tensor) -> Tensor:
    """The factor as stored: ``[m, m]`` for one group, else ``[G, m, m]``."""
    return tensor[0] if tensor.shape[0] == 1 else tensor


def _layer_moments(
    factor: Factor,
    plan: LayerPlan,
    approx: str,
    joint: bool,
    forward_only: bool,
    weight: Tensor | None,
) -> list[Tensor]:
    """``[sum of x x^T, count, sum of b b^T]`` of one batch (no ``B`` for forward-only).

    The first two are divided by the batch's ``weight`` (:func:`curvkit.losses.normalization`).
    With ``weight=None`` (a lone batch, where it would cancel) the first is the average over the
    inputs instead and the count is left out.
    """
    expand = approx == "expand"
    out: list[Tensor] = []
    if plan.weight_requested:
        count = factor.input_count(expand=expand)
        if weight is None:
            # Dividing inside the product spares a pass over the I x I moment.
            out.append(factor.input_moment(expand=expand, with_ones=joint, scale=1.0 / count))
        else:
            # Scaling the N T inputs costs less than scaling their I x I moment.
            total = factor.input_moment(expand=expand, with_ones=joint, input_scale=weight.rsqrt())
            out += [total, total.new_tensor(float(count)) / weight]
    if not forward_only:
        out.append(factor.output_moment(expand=expand))
    return out


def _fallback_moment(factor: Factor, kind: str) -> Tensor:
    if kind == "diagonal":
        return factor.diag().reshape(-1)
    size = factor.param_shape.numel()
    flat = factor.dense().reshape(-1, size)
    return flat.T @ flat


def _refuse_uncovered(kind: str, name: str, module: nn.Module, fisher_type: str) -> None:
    """Raise for a parameter without a Kronecker factor that the settings cannot cover."""
    what = f"{name!r} of {type(module).__name__}"
    if kind == "error":
        raise ValueError(
            f"the parameter {what} has no Kronecker factor (its layer has no Kronecker rule); "
            "pass fallback='diagonal' or fallback='block' to cover it with the exact diagonal or "
            "block of the same curvature, or leave it out of params"
        )
    if fisher_type == "forward-only":
        raise ValueError(
            f"fisher_type='forward-only' has no output factor to cover the parameter {what}, "
            "which has no Kronecker factor: leave it out of params"
        )


def check_coverage(
    model: nn.Module, plans: list[LayerPlan], *, fallback: str, fisher_type: str
) -> None:
    """Refuse, before any computation, parameters that certainly get no Kronecker factor.

    Those are the parameters of modules without a registered rule or whose rule declares that it
    gives no Kronecker factor (:func:`curvkit.engines.registry.declares_kronecker`: embeddings,
    normalisation layers), and those other than a weight and an additive bias. (A rule may
    still decline a call, and an undeclared rule may give another factor; that shows only when
    the factors are computed.)

    Raises:
        ValueError: As the computation would, naming the parameter and its module.
    """
    for plan in plans:
        module = model.get_submodule(plan.module)
        uncovered = list(plan.others)
        if declares_kronecker(type(module)) is False:
            for position, part in ((plan.weight, "weight"), (plan.bias, "bias")):
                if position is not None and (part == "bias" or plan.weight_requested):
                    uncovered.append((position, f"{plan.module}.{part}".lstrip(".")))
        for _, name in sorted(uncovered):
            _refuse_uncovered(fallback, name, module, fisher_type)


def _check_fallback(
    kind: str, name: str, module: nn.Module, factor: Factor, fisher_type: str, itemsize: int
) -> None:
    _refuse_uncovered(kind, name, module, fisher_type)
    size = factor.param_shape.numel()
    needed = size * size * itemsize
    if kind == "block" and needed > MAX_FALLBACK_BLOCK_BYTES:
        raise ValueError(
            f"the fallback block of {name!r} ({size} entries) would take "
            f"{needed / 2**30:.1f} GiB; use fallback='diagonal' for it"
        )


@dataclass
class _Layout:
    """Which parts the first batch found: Kronecker layers and fallback parameters."""

    kronecker: list[tuple[LayerPlan, bool, int, int]]  # (plan, joint, groups G, outputs O)
    fallback: list[tuple[int, str, str]]  # (position, name, kind)


def _layout(
    model: nn.Module,
    plans: list[LayerPlan],
    factors: list[Factor],
    *,
    separate_weight_and_bias: bool,
    fallback: str,
    fisher_type: str,
    itemsize: int,
) -> _Layout:
    kronecker, fallback_parts = [], []
    for plan in plans:
        module = model.get_submodule(plan.module)
        loose = list(plan.others)
        weight_factor = factors[plan.weight] if plan.weight is not None else None
        if weight_factor is not None and weight_factor.kronecker_outputs is not None:
            joint = not separate_weight_and_bias and plan.weight_requested and plan.bias is not None
            groups, outputs = weight_factor.kronecker_outputs
            kronecker.append((plan, joint, groups, outputs))
        else:
            if plan.weight is not None and plan.weight_requested:
                loose.append((plan.weight, f"{plan.module}.weight".lstrip(".")))
            if plan.bias is not None:
                loose.append((plan.bias, f"{plan.module}.bias".lstrip(".")))
        for position, name in sorted(loose):
            factor = factors[position]
            if isinstance(factor, ZeroFactor):
                # The parameter does not influence the outputs: its block is exactly zero.
                fallback_parts.append((position, name, "diagonal"))
                continue
            _check_fallback(fallback, name, module, factor, fisher_type, itemsize)
            fallback_parts.append((position, name, fallback))
    return _Layout(kronecker, fallback_parts)


def compute_kfac_blocks(
    problem: Problem,
    plans: list[LayerPlan],
    *,
    fisher_type: str,
    kfac_approx: str,
    separate_weight_and_bias: bool,
    fallback: str,
) -> tuple[list[KroneckerBlock], list[FallbackBlock]]:
    """KFAC's factors of every layer and the fallback blocks, over the problem's data.

    Args:
        problem: The call context, with the engine's parameters (:func:`plan_layers`) and, for
            ``fisher_type="mc"``, its Monte-Carlo settings.
        plans: The layers, from :func:`plan_layers`.
        fisher_type: ``"exact"``, ``"mc"``, ``"empirical"`` or ``"forward-only"``.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        separate_weight_and_bias: Whether a layer's weight and bias get separate blocks.
        fallback: ``"diagonal"``, ``"block"`` or ``"error"`` for parameters without a Kronecker
            factor.

    Returns:
        ``(kronecker_blocks, fallback_blocks)``.

    Raises:
        ValueError: For a parameter without a Kronecker factor and ``fallback="error"`` (or
            ``fisher_type="forward-only"``), or a fallback block too large to build.
    """
    forward_only = fisher_type == "forward-only"
    lone_batch = is_batch(problem.data) and distributed_world() == 1
    layouts: list[_Layout] = []

    def batch_quantity(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        columns = _columns_for(problem, fisher_type, targets)
        outputs, factors = problem.factors(inputs, targets, columns)
        if not layouts:
            layouts.append(
                _layout(
                    problem.model,
                    plans,
                    factors,
                    separate_weight_and_bias=separate_weight_and_bias,
                    fallback=fallback,
                    fisher_type=fisher_type,
                    itemsize=outputs.element_size(),
                )
            )
        layout = layouts[0]
        weight = None if lone_batch else losses.normalization(problem.loss_fn, outputs, targets)
        out: list[Tensor] = []
        for plan, joint, _, _ in layout.kronecker:
            factor = factors[plan.weight]
            if factor.kronecker_outputs is None:
                raise ValueError(
                    f"the layer {plan.module!r} has a Kronecker factor in one batch but not in "
                    "another; its calls must be alike in every batch"
                )
            out += _layer_moments(factor, plan, kfac_approx, joint, forward_only, weight)
        out += [_fallback_moment(factors[p], kind) for p, _, kind in layout.fallback]
        return outputs, out

    reduced = iter(problem.reduce(batch_quantity))
    layout = layouts[0]
    kronecker_blocks = []
    for plan, joint, groups, outputs in layout.kronecker:
        a = None
        if plan.weight_requested:
            a = next(reduced) if lone_batch else next(reduced).div_(next(reduced))
        if forward_only:
            like = problem.params[plan.weight]
            eye = torch.eye(outputs, dtype=like.dtype, device=like.device)
            b = eye.expand(groups, outputs, outputs).clone()
        else:
            b = next(reduced)
        params = {}
        if plan.weight_requested:
            params["weight"] = plan.weight
        if plan.bias is not None:
            params["bias"] = plan.bias
        kronecker_blocks.append(
            KroneckerBlock(
                plan.module, params, None if a is None else _stored(a), _stored(b), joint
            )
        )
    fallback_blocks = [
        FallbackBlock(name, position, kind, next(reduced))
        for position, name, kind in layout.fallback
    ]
    return kronecker_blocks, fallback_blocks


def eigenvalue_corrections(
    problem: Problem,
    blocks: list[KroneckerBlock],
    weights: list[int],
    eigenvectors: list[tuple[Tensor | None, Tensor]],
    *,
    fisher_type: str,
) -> list[dict[str, Tensor]]:
    r"""EKFAC's eigenvalues: second moments of the per-sample gradients in the Kronecker basis.

    For a weight, :math:`s = \sum_{k,n} (Q_B^\top g_{k,n} Q_A)^{\odot 2}` with the per-sample
    gradient :math:`g_{k,n} = \sum_t b_{k,n,t} x_{n,t}^\top` (``[G, O, I]``); for a bias,
    :math:`s = \sum_{k,n} (Q_B^\top \sum_t b_{k,n,t})^{\odot 2}` (``[G, O]``); for a joint
    block, the weight's with :math:`x` extended by a constant 1 (``[G, O, I + 1]``). These are
    the exact diagonal of the curvature in that basis, whatever ``kfac_approx`` was.

    Args:
        problem: The call context of :func:`compute_kfac_blocks` (same data, same random
            state for ``"mc"``).
        blocks: The layers' KFAC factors.
        weights: Per block, the position of its weight among the problem's parameters (the
            factor that supplies :math:`x` and :math:`b`).
        eigenvectors: ``(Q_A, Q_B)`` per block, each ``[G, m, m]`` (``Q_A`` ``None`` without
            a weight).
        fisher_type: ``"exact"``, ``"mc"`` or ``"empirical"``.

    Returns:
        Per block, ``{"weight": s, "bias": s}`` (the parameters it covers) or ``{"joint": s}``.
    """

    def batch_quantity(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        columns = _columns_for(problem, fisher_type, targets)
        outputs, factors = problem.factors(inputs, targets, columns)
        out: list[Tensor] = []
        for block, weight, (qa, qb) in zip(blocks, weights, eigenvectors, strict=True):
            factor = factors[weight]
            if factor.kronecker_outputs is None:
                raise ValueError(
                    f"the layer {block.module!r} has a Kronecker factor in one batch but not in "
                    "another; its calls must be alike in every batch"
                )
            rotated = factor.rotated(qb, qa, with_ones=block.joint)
            if qa is not None:
                out.append(rotated.diag())
            if "bias" in block.params and not block.joint:
                out.append(rotated.bias_part().diag().reshape(qb.shape[0], -1))
        return outputs, out

    reduced = iter(problem.reduce(batch_quantity))
    corrections = []
    for block, (qa, _) in zip(blocks, eigenvectors, strict=True):
        if block.joint:
            corrections.append({"joint": next(reduced)})
            continue
        part = {}
        if qa is not None:
            part["weight"] = next(reduced)
        if "bias" in block.params:
            part["bias"] = next(reduced)
        corrections.append(part)
    return corrections
