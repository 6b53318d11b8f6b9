r"""laplace-torch's ``Kron`` built from :class:`curvkit.KFACOperator`, with dense blocks.

laplace-torch keeps a KFAC curvature as one entry per parameter, in the order of the
parameters: ``[B, A]`` for a weight (its block is :math:`B \otimes A` in the row-major
``[out, in]`` layout) and ``[M]`` for one dense block (a bias). ``KronLaplace.fit`` adds the
entries of each batch to an initial value with two zero factors for every 2-D parameter, factor
by factor; :class:`CurvkitKron` also adds a one-factor entry (the exact block of an Embedding's
table) to a two-factor one, by forming the Kronecker product of the latter.

The scaling is that of laplace-torch's ``CurvlinopsGGN`` (which :class:`curvkit.KFACOperator`'s
factors share with curvlinops): per batch of :math:`M` of the :math:`N` data points, with the
loss summed over the batch and laplace-torch's likelihood factor :math:`c` (1 for
classification, 1/2 for the squared error),

.. math::

    \text{weight: } \big[\sqrt{c}\, B,\ \sqrt{c}\, \tfrac{M}{N} A\big], \qquad
    \text{bias: } [c\, B], \qquad \text{other parameters: } [c\, G_p],

with :math:`A = \frac{1}{M T} \sum x x^\top` (:math:`T` positions of a convolution or
sequence), :math:`B = \sum g g^\top` and :math:`G_p` the exact GGN block of the parameter
(the same Fisher type as the factors). A grouped convolution's weight gets one dense block
:math:`c \frac{M}{N} \operatorname{blockdiag}_g(B_g \otimes A_g)`, its bias
:math:`c \operatorname{blockdiag}_g B_g`.
"""

from __future__ import annotations

import math

import torch
from laplace.utils import Kron
from torch import Tensor

from curvkit import KFACOperator

__all__ = ["CurvkitKron", "kron_from_kfac"]

#: One parameter's entry: two Kronecker factors or one dense block.
Entry = list[Tensor]


def _as_matrix(factor: Tensor) -> Tensor:
    # laplace-torch's Kron also allows a diagonal factor, stored as a vector.
    return factor if factor.dim() == 2 else torch.diag(factor)


def _dense(entry: Entry) -> Tensor:
    if len(entry) == 1:
        return _as_matrix(entry[0])
    return torch.kron(_as_matrix(entry[0]), _as_matrix(entry[1]))


def _add_entries(first: Entry, second: Entry) -> Entry:
    if len(first) == len(second):
        return [a.add(b) for a, b in zip(first, second, strict=True)]
    return [_dense(first) + _dense(second)]


class CurvkitKron(Kron):
    """laplace-torch's ``Kron`` whose sum also adds a one-factor entry to a two-factor one.

    Two entries with the same number of factors add factor by factor, as in laplace-torch; a
    dense entry ``[M]`` and a Kronecker entry ``[B, A]`` add to the dense ``[M + B (x) A]``.
    """

    def __add__(self, other: Kron) -> CurvkitKron:
        """Add ``other`` entry by entry (see the class docstring)."""
        if not isinstance(other, Kron):
            raise ValueError(f"Can only add a Kron to a Kron, got {type(other).__name__}")
        if len(other.kfacs) != len(self.kfacs):
            raise ValueError(
                f"Cannot add a Kron of {len(other.kfacs)} entries to one of {len(self.kfacs)}: "
                "they must be over the same parameters"
            )
        return CurvkitKron(
            [_add_entries(a, b) for a, b in zip(self.kfacs, other.kfacs, strict=True)]
        )

    __radd__ = __add__

    def __mul__(self, scalar: float | Tensor) -> CurvkitKron:
        """Multiply by a scalar as laplace-torch does, keeping this class."""
        return CurvkitKron(super().__mul__(scalar).kfacs)


def _block_diagonal(matrices: Tensor) -> Tensor:
    return torch.block_diag(*matrices.unbind(0))


def _weight_entry(a: Tensor, b: Tensor, factor: float, fraction: float) -> Entry:
    if b.dim() == 3:
        dense = torch.block_diag(*(torch.kron(bg, ag) for bg, ag in zip(b, a, strict=True)))
        return [dense * (factor * fraction)]
    root = math.sqrt(factor)
    return [b * root, a * (fraction * root)]


def _bias_entry(b: Tensor, factor: float) -> Entry:
    return [(_block_diagonal(b) if b.dim() == 3 else b) * factor]


def kron_from_kfac(operator: KFACOperator, factor: float, fraction: float) -> CurvkitKron:
    r"""laplace-torch's entries for one batch from a KFAC operator's factors and blocks.

    Args:
        operator: A :class:`curvkit.KFACOperator` on the batch (summed loss), over the
            parameters in laplace-torch's order, with ``fallback="block"``.
        factor: laplace-torch's likelihood factor :math:`c`.
        fraction: :math:`M / N`, the batch's share of the data.

    Returns:
        One entry per parameter of ``operator``, in its order (module docstring).
    """
    entries: list[Entry | None] = [None] * len(operator.param_shapes)
    for block in operator.factors.values():
        for name, position in block.params.items():
            if name == "weight":
                entries[position] = _weight_entry(block.A, block.B, factor, fraction)
            else:
                entries[position] = _bias_entry(block.B, factor)
    for block in operator.fallback_blocks.values():
        entries[block.position] = [block.matrix * factor]
    missing = [i for i, entry in enumerate(entries) if entry is None]
    if missing:
        raise RuntimeError(f"KFACOperator gave no block for the parameters at {missing}")
    return CurvkitKron(entries)
