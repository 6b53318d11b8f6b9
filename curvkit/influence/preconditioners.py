r"""The damped inverse :math:`(C + \delta I)^{-1}` applied to gradients given block by block.

:class:`BlockPreconditioner` uses fitted
:class:`~curvkit.influence.factors.InfluenceFactors`, one block at a time with each block's own
damping. :class:`ExactPreconditioner` solves with the exact GGN
or empirical Fisher of the training data through the operators' inverses
(:meth:`curvkit.GGNOperator.inverse`: Woodbury through the Gram matrix when it is small, else
conjugate gradients), never forming :math:`C`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvkit.core import data as data_utils
from curvkit.core.data import Data
from curvkit.core.model_io import num_input_samples
from curvkit.engines import Factor
from curvkit.influence.factors import HEURISTIC_DAMPING, InfluenceFactors
from curvkit.influence.layout import Block, join_flat, split_flat
from curvkit.losses import LossFunction
from curvkit.operators.ef import EFOperator
from curvkit.operators.ggn import GGNOperator
from curvkit.quantities.first_order import diag_ef
from curvkit.quantities.ggn import diag_ggn

__all__ = ["CG_TOLERANCE", "BlockPreconditioner", "ExactPreconditioner", "count_examples"]

#: Relative residual at which the conjugate-gradient solves of the exact curvatures stop.
CG_TOLERANCE = 1e-10


class BlockPreconditioner:
    """Fitted factors with a damping: the inverse block by block."""

    def __init__(self, factors: InfluenceFactors, damping: float | None) -> None:
        self.curvatures = factors.blocks
        self.blocks = [c.block for c in factors.blocks]
        self.dampings = [c.damping(damping) for c in factors.blocks]

    def queries(self, gradients: list[Tensor]) -> list[Tensor]:
        """Per block, the preconditioned gradients ``[J, *block.shape]``, given in the basis."""
        return [
            c.scale(g, d) for c, g, d in zip(self.curvatures, gradients, self.dampings, strict=True)
        ]

    def train_factor(self, index: int, factor: Factor) -> Factor:
        """Block ``index``'s columns in the basis its curvature is scaled in."""
        return self.curvatures[index].basis_factor(factor)

    def quadratic(self, left: list[Tensor], right: list[Tensor]) -> list[Tensor]:
        r""":math:`l_j^\top (C + \delta I)^{-1} r_j` per block, each ``[J]``, both in the basis."""
        return [
            (a * c.scale(b, d)).flatten(1).sum(1)
            for c, a, b, d in zip(self.curvatures, left, right, self.dampings, strict=True)
        ]


def count_examples(data: Data) -> int:
    """The number of examples in ``data``, over every ``torch.distributed`` rank."""
    total = 0
    for inputs, _ in data_utils.batches(data):
        total += num_input_samples(inputs) or 1
    count = torch.tensor([float(total)], dtype=torch.float64)
    data_utils.all_reduce_sum_([count])
    return int(count.item())


class ExactPreconditioner:
    r"""The exact :math:`(C + \delta I)^{-1}`, :math:`C = \frac1N` (GGN or EF of the summed loss).

    ``damping=None`` is one damping for all parameters, a tenth of :math:`C`'s mean eigenvalue
    :math:`\operatorname{tr} C / D` (from the exact diagonal): per-block dampings would not be a
    multiple of the identity, which the exact solve needs.
    """

    def __init__(
        self,
        curvature: str,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Data,
        params: list[Tensor],
        blocks: list[Block],
        damping: float | None,
        progress: bool | None,
    ) -> None:
        self.blocks, self.params = blocks, params
        count = count_examples(data)
        if curvature == "ggn":
            operator = GGNOperator(model, loss_fn, data, params=params, progress=progress)
            diagonal = diag_ggn if damping is None else None
        else:
            operator = EFOperator(model, loss_fn, data, params=params, progress=progress)
            diagonal = diag_ef if damping is None else None
        if diagonal is not None:
            trace = sum(d.sum() for d in diagonal(model, loss_fn, data, params=params))
            damping = HEURISTIC_DAMPING * float(trace) / (count * sum(p.numel() for p in params))
        if not damping:
            raise ValueError(
                f"curvature={curvature!r} needs a positive damping: the exact curvature of "
                "the training data is singular when there are fewer examples than parameters"
            )
        # (G / N + d I)^-1 = N (G + N d I)^-1 with G the summed loss's curvature.
        # The GGN's exact Woodbury inverse needs one batch; otherwise conjugate gradients.
        woodbury = curvature == "ggn" and data_utils.is_batch(data)
        woodbury = woodbury and data_utils.distributed_world() == 1
        options = {} if woodbury else {"method": "cg", "tol": CG_TOLERANCE}
        self.inverse = operator.inverse(count * damping, **options)
        self.scale = float(count)

    def queries(self, gradients: list[Tensor]) -> list[Tensor]:
        """``[J, *block.shape]`` per block: the preconditioned gradients."""
        flat = join_flat(self.blocks, self.params, gradients)
        solved = (self.inverse @ flat.T.contiguous()).T * self.scale
        return split_flat(self.blocks, self.params, solved)

    def train_factor(self, index: int, factor: Factor) -> Factor:
        """The training columns as they are (the solve works in the parameters' basis)."""
        return factor

    def quadratic(self, left: list[Tensor], right: list[Tensor]) -> list[Tensor]:
        r""":math:`l_j^\top (C + \delta I)^{-1} r_j`, split over the blocks, each ``[J]``."""
        solved = self.queries(right)
        return [(a * s).flatten(1).sum(1) for a, s in zip(left, solved, strict=True)]
