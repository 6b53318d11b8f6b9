r"""How the parameters split into the blocks that influence functions precondition separately.

Like kronfluence, a Linear or convolution layer (any module whose rule gives a
:class:`~curvkit.engines.KroneckerFactor`) is one block: its weight, reshaped to
``[G, O, I]`` (``G`` groups, ``O`` outputs, ``I`` inputs per output), and its bias form one
matrix ``[G, O, I + 1]``, the bias as the last input column (the layer's input extended by a
constant 1). Every other parameter the user asks for (an embedding table, a normalisation
layer's scale, attention's packed projections, a custom layer's weight) is a block of its own,
its gradient flattened to ``[D_p]``: kronfluence leaves these out, curvkit keeps them.

A block's per-example gradients come from the engine as a :class:`~curvkit.engines.Factor` whose
columns are the gradients (:func:`block_factor`): so scores contract a layer's gradients through
its inputs and output gradients without forming them where that is cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvkit.engines import Factor, KroneckerFactor
from curvkit.quantities.kfac import plan_layers

__all__ = ["Block", "block_factor", "plan_blocks"]


@dataclass(frozen=True)
class Block:
    """One preconditioned block of the parameters.

    Attributes:
        module: The qualified name of the module that owns the block's parameters (``""`` for
            the model itself); the key of per-module scores.
        name: The block's name: the module's for a layer, the parameter's otherwise.
        kronecker: Whether the block is a layer's ``[G, O, I(+1)]`` matrix.
        positions: The positions of its parameters in the flat parameter list: the weight, then
            the bias if the block has one.
        shape: The shape of one example's gradient in the block's layout.
    """

    module: str
    name: str
    kronecker: bool
    positions: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """The number of parameters in the block."""
        return int(torch.Size(self.shape).numel())

    @property
    def joint(self) -> bool:
        """Whether the layer's bias is the last input column of the block."""
        return self.kronecker and len(self.positions) == 2


def plan_blocks(
    model: nn.Module, params: list[Tensor], factors: list[Factor] | None
) -> list[Block]:
    """Split ``params`` into blocks, from a batch's factors (``None``: one block a parameter).

    Args:
        model: The network.
        params: The parameters, in the order of the engine's factors.
        factors: One factor per parameter from any batch (only their kinds are read), or
            ``None`` to make every parameter a block of its own.

    Returns:
        The blocks, in the order of the modules.
    """
    plans, _ = plan_layers(model, params)
    blocks: list[Block] = []
    for plan in plans:
        loose = list(plan.others)
        weight = plan.weight if plan.weight_requested else None
        factor = None if factors is None or weight is None else factors[weight]
        if isinstance(factor, KroneckerFactor):
            g, o = factor.output_grads.shape[3:]
            inputs = factor.input_shape[-1]
            positions = (weight,) if plan.bias is None else (weight, plan.bias)
            shape = (g, o, inputs + len(positions) - 1)
            blocks.append(Block(plan.module, plan.module, True, positions, shape))  # type: ignore[arg-type]
        else:
            prefix = f"{plan.module}." if plan.module else ""
            if weight is not None:
                loose.append((weight, f"{prefix}weight"))
            if plan.bias is not None:
                loose.append((plan.bias, f"{prefix}bias"))
        for position, name in sorted(loose):
            shape = (params[position].numel(),)
            blocks.append(Block(plan.module, name, False, (position,), shape))
    return blocks


def block_factor(block: Block, factors: list[Factor]) -> Factor:
    """The factor of one block: its columns are the block's per-example columns.

    Args:
        block: The block.
        factors: One factor per parameter, from the engine.

    Returns:
        A factor whose ``param_shape`` is the block's shape for a layer, and the parameter's
        own shape otherwise (its methods flatten it where :attr:`Block.shape` is used).
    """
    factor = factors[block.positions[0]]
    if not block.kronecker:
        return factor
    assert isinstance(factor, KroneckerFactor)
    inputs = factor.inputs
    if block.joint:
        inputs = torch.cat([inputs, inputs.new_ones(*inputs.shape[:-1], 1)], dim=-1)
    return KroneckerFactor(
        factor.output_grads,
        inputs,
        torch.Size(block.shape),
        max_chunk_bytes=factor.max_chunk_bytes,
    )


def block_gradients(block: Block, factor: Factor) -> Tensor:
    """The factor's columns in the block's layout, ``[K, N, *block.shape]``."""
    columns = factor.dense()
    return columns.reshape(columns.shape[0], columns.shape[1], *block.shape)


def block_products(factor: Factor, directions: Tensor) -> Tensor:
    """The columns' products with ``directions`` ``[J, *block.shape]``, ``[K, N, J]``."""
    return factor.t_mat(directions.reshape(directions.shape[0], *factor.param_shape))


def split_flat(blocks: list[Block], params: list[Tensor], vectors: Tensor) -> list[Tensor]:
    """Blocks ``[J, *block.shape]`` from ``vectors`` ``[J, D]`` in the parameters' flat order."""
    pieces = vectors.split([p.numel() for p in params], dim=1)
    out = []
    for block in blocks:
        parts = [pieces[i] for i in block.positions]
        if block.kronecker:
            g, o, i = block.shape
            weight = parts[0].reshape(-1, g, o, i - len(parts) + 1)
            if block.joint:
                weight = torch.cat([weight, parts[1].reshape(-1, g, o, 1)], dim=-1)
            out.append(weight)
        else:
            out.append(parts[0])
    return out


def join_flat(blocks: list[Block], params: list[Tensor], parts: list[Tensor]) -> Tensor:
    """The inverse of :func:`split_flat`: ``[J, D]`` in the parameters' flat order."""
    pieces: list[Tensor | None] = [None] * len(params)
    for block, part in zip(blocks, parts, strict=True):
        count = part.shape[0]
        if block.joint:
            pieces[block.positions[0]] = part[..., :-1].reshape(count, -1)
            pieces[block.positions[1]] = part[..., -1].reshape(count, -1)
        else:
            pieces[block.positions[0]] = part.reshape(count, -1)
    return torch.cat(pieces, dim=1)  # type: ignore[arg-type]
