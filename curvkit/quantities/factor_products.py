r"""Products of the square-root factors :math:`V` of one or more parameters: the GGN's algebra.

Each function takes the factors of a list of parameters (:class:`curvkit.engines.Factor`, one
per parameter, with the same columns :math:`(k, n)`), which together form
:math:`V = [V_1; \dots; V_P]`, and operands in parameter space given per parameter as
``[J, *param_shape]`` (:math:`J` vectors at once). A list of such lists is a block-diagonal GGN
(one block per parameter group).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from curvkit.engines import Factor

__all__ = [
    "CHUNK_ELEMENTS",
    "block_diagonal_matmul",
    "gram_of_rows",
    "matmul",
    "normalized_products",
    "unit_blocks",
]

#: Number of tensor entries a chunk of GGN columns or of dense factor rows may hold.
CHUNK_ELEMENTS = 2**23


def matmul(factors: Sequence[Factor], blocks: Sequence[Tensor]) -> list[Tensor]:
    r"""Return :math:`V (V^\top M)` for ``M`` given per parameter as ``[J, *param_shape]``."""
    coefficients = factors[0].t_mat(blocks[0])
    for factor, block in zip(factors[1:], blocks[1:], strict=True):
        coefficients = coefficients + factor.t_mat(block)
    return [factor.mat(coefficients) for factor in factors]


def normalized_products(factors: Sequence[Factor], coefficients: Tensor) -> list[Tensor]:
    r"""Return the :math:`J` vectors :math:`V c_j / \lVert V c_j \rVert` per parameter.

    Eigenvectors :math:`e_k = V u_k / \sqrt{\lambda_k}` from Gram-space coefficients: normalising
    the products themselves keeps them unit vectors to the last digit. A zero product stays zero.

    Args:
        factors: The factors of the parameters that together span the vectors.
        coefficients: ``[K, N, J]``.

    Returns:
        One tensor ``[J, *param_shape]`` per parameter.
    """
    products = [factor.mat(coefficients) for factor in factors]
    norms = sum(p.flatten(start_dim=1).square().sum(1) for p in products).sqrt()
    inv_norms = torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0)
    return [p * inv_norms.reshape(-1, *[1] * (p.dim() - 1)) for p in products]


def block_diagonal_matmul(
    factor_groups: Sequence[Sequence[Factor]], block_groups: Sequence[Sequence[Tensor]]
) -> list[Tensor]:
    r"""Return :math:`V_g (V_g^\top M_g)` for every group :math:`g`, concatenated per parameter."""
    return [
        product
        for factors, blocks in zip(factor_groups, block_groups, strict=True)
        for product in matmul(factors, blocks)
    ]


def gram_of_rows(factors: Sequence[Factor]) -> Tensor:
    r"""Return :math:`V V^\top` (``[D, D]``), materialising :math:`V` a few columns at a time."""
    num_columns, num_samples = factors[0].num_columns, factors[0].num_samples
    dim = sum(math.prod(f.param_shape) for f in factors)
    step = max(1, CHUNK_ELEMENTS // max(1, num_samples * dim))
    matrix: Tensor | None = None
    for start in range(0, num_columns, step):
        stop = min(start + step, num_columns)
        rows = torch.cat(
            [
                f.select(start, stop).dense().reshape((stop - start) * num_samples, -1)
                for f in factors
            ],
            dim=1,
        )
        matrix = rows.T @ rows if matrix is None else matrix.addmm(rows.T, rows)
    assert matrix is not None  # a factor has at least one column
    return matrix


def unit_blocks(shapes: Sequence[torch.Size], indices: Tensor, like: Tensor) -> list[Tensor]:
    """The unit vectors :math:`e_i` of flat ``indices``, per parameter as ``[J, *shape]``.

    Args:
        shapes: The parameters' shapes; flat indices run over their concatenation.
        indices: ``J`` flat indices.
        like: A tensor with the dtype and device of the result.

    Returns:
        One tensor per parameter, zero except for a one at each index it owns.
    """
    sizes = [math.prod(shape) for shape in shapes]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    indices = indices.cpu()
    owner = torch.searchsorted(offsets[1:], indices, right=True)
    blocks = []
    for p, shape in enumerate(shapes):
        selected = (owner == p).nonzero().squeeze(1)
        block = torch.zeros((len(indices), sizes[p]), dtype=like.dtype, device=like.device)
        block[selected.to(block.device), (indices[selected] - offsets[p]).to(block.device)] = 1
        blocks.append(block.reshape(len(indices), *shape))
    return blocks
