r"""Symmetric linear algebra for millions of small matrices, one matrix entry at a time.

A batch of ``R`` symmetric ``D x D`` matrices is held as its entries: ``h[i][j]`` is a tensor of
shape ``(R,)`` (the same tensor at ``[j][i]``). Every operation then acts on one entry across the
whole batch, :math:`O(D^3)` elementwise operations in all, which for millions of matrices beats a
loop of LAPACK calls (about a microsecond each) many times over, and runs unchanged on any device.
On a CPU, callers pass cache-sized slices of the batch, so that the entries stay in the processor's
cache across the many passes.

- :class:`EntrywiseLDL`: the :math:`LDL^\top` factorisation of :math:`H + \text{shift}\, I`, its
  solves and its inverse. No pivoting: stable for positive definite matrices; callers hand
  indefinite matrices with small pivots to LAPACK.
- :func:`smallest_eigenvectors`: unit eigenvectors of the smallest eigenvalues by Laguerre's
  iteration on :math:`\det(H - \sigma I)`, built on the same factorisation.
"""

import functools

import torch
from torch import Tensor

__all__ = ["EntrywiseLDL", "smallest_eigenvectors", "stack_matrices", "upper_indices"]


class EntrywiseLDL:
    r"""Entrywise :math:`LDL^\top` of every matrix's :math:`H + \text{shift}\, I`, batched.

    The matrix is positive definite exactly where every pivot :math:`D_{jj}` is positive.

    Args:
        h: The entries ``h[i][j]`` of the symmetric matrices (only ``j <= i`` is read).
        shift: Added to the diagonal, of the batch's shape; ``None`` for no shift.
    """

    def __init__(self, h: list[list[Tensor]], shift: Tensor | None = None) -> None:
        dim = len(h)
        self.unit_lower = [[None] * dim for _ in range(dim)]  # L[i][j], j < i
        scaled = [[None] * dim for _ in range(dim)]  # L[i][j] * D[j]
        self.pivots, self.inverse_pivots = [], []
        for j in range(dim):
            pivot = h[j][j] if shift is None else h[j][j] + shift
            for k in range(j):
                pivot = torch.addcmul(pivot, self.unit_lower[j][k], scaled[j][k], value=-1)
            inverse_pivot = pivot.reciprocal()
            self.pivots.append(pivot)
            self.inverse_pivots.append(inverse_pivot)
            for i in range(j + 1, dim):
                entry = h[i][j]
                for k in range(j):
                    entry = torch.addcmul(entry, self.unit_lower[i][k], scaled[j][k], value=-1)
                scaled[i][j] = entry
                self.unit_lower[i][j] = entry * inverse_pivot

    def positive_definite(self) -> Tensor:
        """Where every pivot is positive (``False`` where one is NaN)."""
        return functools.reduce(torch.logical_and, [pivot > 0 for pivot in self.pivots])

    def step(self, g: list[Tensor]) -> list[Tensor]:
        r"""The entries of :math:`-(H + \text{shift}\, I)^{-1} g`, by substitution."""
        dim = len(g)
        forward = []
        for i in range(dim):
            entry = g[i]
            for k in range(i):
                entry = torch.addcmul(entry, self.unit_lower[i][k], forward[k], value=-1)
            forward.append(entry)
        step = [None] * dim
        for i in reversed(range(dim)):
            entry = forward[i] * self.inverse_pivots[i]
            for k in range(i + 1, dim):
                entry = torch.addcmul(entry, self.unit_lower[k][i], step[k], value=-1)
            step[i] = entry
        return [entry.neg_() for entry in step]

    def inverse(self) -> list[list[Tensor]]:
        """``inverse[i][j]``: the entries of the inverse (the same tensor at ``[j][i]``)."""
        dim = len(self.pivots)
        # W = L^{-1} (unit lower triangular), then H^{-1} = W^T D^{-1} W.
        inverse_lower = [[None] * dim for _ in range(dim)]
        for i in range(dim):
            for j in range(i):
                entry = -self.unit_lower[i][j]
                for k in range(j + 1, i):
                    entry = torch.addcmul(
                        entry, self.unit_lower[i][k], inverse_lower[k][j], value=-1
                    )
                inverse_lower[i][j] = entry
        # weighted[k][j] = W[k][j] / D[k] for j <= k.
        weighted = [
            [inverse_lower[k][j] * self.inverse_pivots[k] for j in range(k)]
            + [self.inverse_pivots[k]]
            for k in range(dim)
        ]
        inverse = [[None] * dim for _ in range(dim)]
        for i in range(dim):
            for j in range(i, dim):
                # Sum over k >= j of W[k][i] W[k][j] / D[k], with W[j][j] = 1.
                entry = weighted[j][i]
                for k in range(j + 1, dim):
                    entry = torch.addcmul(entry, inverse_lower[k][i], weighted[k][j])
                inverse[i][j] = inverse[j][i] = entry
        return inverse


def upper_indices(dim: int) -> list[tuple[int, int]]:
    """The index pairs ``(i, j)``, ``i <= j``, of a square matrix's upper triangle, by rows."""
    return [(i, j) for i in range(dim) for j in range(i, dim)]


def stack_matrices(h: list[list[Tensor]], items: Tensor | None = None) -> Tensor:
    """The matrices ``(R, D, D)`` given by their entries, or only the ``items`` among them."""
    return torch.stack(
        [torch.stack([entry if items is None else entry[items] for entry in row], -1) for row in h],
        -2,
    )


def _dominant_column(inverse: list[list[Tensor]]) -> list[Tensor]:
    """Each matrix's column with the largest diagonal entry, normalised to unit length."""
    dim = len(inverse)
    # Elementwise selection: reductions across the rows of the batch would run over strided
    # memory.
    largest, column = inverse[0][0], [inverse[i][0] for i in range(dim)]
    for j in range(1, dim):
        larger = inverse[j][j] > largest
        largest = torch.where(larger, inverse[j][j], largest)
        column = [torch.where(larger, inverse[i][j], column[i]) for i in range(dim)]
    scale = sum(entry.square() for entry in column).rsqrt()
    return [entry * scale for entry in column]


def smallest_eigenvectors(
    h: list[list[Tensor]], tolerance: Tensor, max_iters: int, lower_bound: Tensor | None = None
) -> Tensor:
    r"""Unit eigenvectors ``(R, D)`` of the smallest eigenvalues; NaN where unconverged.

    Laguerre's iteration on the characteristic polynomial :math:`p(\sigma) = \det(H - \sigma I)`
    runs across the batch on the :class:`EntrywiseLDL` inverse of :math:`A = H - \sigma I`, whose
    trace :math:`\sum_i 1 / (\lambda_i - \sigma)` and squared Frobenius norm
    :math:`\sum_i 1 / (\lambda_i - \sigma)^2` are all Laguerre's step needs. Started below the
    spectrum (Gershgorin's bound, or ``lower_bound`` where that is higher), it rises monotonically
    towards :math:`\lambda_{\min}` without overshooting (all roots are real) and converges
    cubically, and :math:`A` stays positive definite, where :math:`LDL^\top` needs no pivoting.
    Each matrix stops once its next step is within ``tolerance`` (the rounding of its scale) and
    drops out of the batch; matrices not done in ``max_iters`` steps come back as NaN, for the
    caller to hand to LAPACK, as do matrices with NaN or Inf entries.

    At the last :math:`\sigma`, :math:`A^{-1}` is dominated by :math:`v v^\top / (\lambda_{\min}
    - \sigma)`: its column with the largest diagonal entry is the eigenvector :math:`v` to working
    precision (one step of inverse iteration), taken from the last step's inverse.

    Args:
        h: The entries ``h[i][j]`` of the symmetric matrices, each of shape ``(R,)``, without a
            graph.
        tolerance: ``(R,)``, the rounding of each matrix's scale.
        max_iters: The most Laguerre steps per matrix.
        lower_bound: ``(R,)``, optional: values strictly below each smallest eigenvalue, such as
            0 for matrices known to be positive definite; ``-inf`` where none is known.

    Returns:
        ``(R, D)``: the unit eigenvectors, NaN in the rows of unconverged matrices.
    """
    dim = len(h)
    upper = upper_indices(dim)
    packed = torch.stack([h[i][j] for i, j in upper])

    def unpack(rows: Tensor) -> list[list[Tensor]]:
        by_index = dict(zip(upper, rows.unbind(0), strict=True))
        return [[by_index[min(i, j), max(i, j)] for j in range(dim)] for i in range(dim)]

    # Strictly below the spectrum also where Gershgorin's bound is attained (diagonal H).
    sigma = functools.reduce(
        torch.minimum,
        [h[i][i] + h[i][i].abs() - sum(entry.abs() for entry in h[i]) for i in range(dim)],
    )
    sigma = sigma - tolerance
    if lower_bound is not None:
        sigma = torch.maximum(sigma, lower_bound)
    # The state of the matrices still iterating, compacted as they finish; each finished matrix
    # leaves the (packed upper triangle of the) inverse at its final sigma in `final_inverse`.
    members = torch.isfinite(sigma).nonzero().squeeze(-1)
    sigma, margin = sigma[members], tolerance[members]
    retreated = torch.zeros_like(sigma, dtype=torch.bool)
    h_members = unpack(packed.index_select(1, members))
    final_inverse = torch.full_like(packed.T, float("nan"))  # item-major: rows written whole
    for _ in range(max_iters):
        if members.numel() == 0:
            break
        factors = EntrywiseLDL(h_members, -sigma)
        inverse = factors.inverse()
        definite = factors.positive_definite()
        trace = sum(inverse[i][i] for i in range(dim))
        frobenius = sum(inverse[i][j].square() * (1 if i == j else 2) for i, j in upper)
        spread = ((dim - 1) * (dim * frobenius - trace.square())).clamp(min=0).sqrt()
        step = dim / (trace + spread)
        # Done where the next step is within rounding, or after a retreat: this step's inverse
        # is then taken at the final sigma.
        done = definite & (retreated | (step <= 2 * margin))
        # The cubic convergence can land on lambda_min to within rounding, where A is no longer
        # numerically definite: such matrices step back by a rounding margin.
        sigma = torch.where(definite, sigma + step, sigma - 2 * margin)
        retreated = ~definite
        finished = done.nonzero().squeeze(-1)
        if finished.numel() == 0:
            continue
        final_inverse.index_copy_(
            0,
            members[finished],
            torch.stack([inverse[i][j] for i, j in upper], -1).index_select(0, finished),
        )
        # Compaction copies the remaining entries, less than factorising the finished ones.
        remaining = (~done).nonzero().squeeze(-1)
        members, sigma, margin, retreated = (
            members[remaining],
            sigma[remaining],
            margin[remaining],
            retreated[remaining],
        )
        h_members = unpack(packed.index_select(1, members))
    # NaN (unconverged, or not finite) stays NaN through the column selection.
    return torch.stack(_dominant_column(unpack(final_inverse.T)), -1)
