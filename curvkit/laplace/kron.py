r"""Kronecker-factored curvature in laplace-torch's layout (:class:`Kron`, :class:`KronDecomposed`).

One entry per parameter tensor, in the order of the parameters: two factors ``[B, A]`` for a
weight whose block is :math:`B \otimes A` (``B`` on the output side ``[O, O]``, ``A`` on the input
side ``[I, I]``, for the row-major weight ``[O, I]``; a convolution's ``A`` covers
``in_channels * kernel`` entries), or one matrix ``[M]``, the block itself (a bias, or a
parameter without Kronecker factors such as a LayerNorm or Embedding weight, whose block curvkit
computes exactly). :class:`Kron` sums over data; :class:`KronDecomposed` holds every factor's
eigendecomposition and adds a prior precision per entry:
:math:`(\lambda_B \otimes \lambda_A + \delta)` or, with ``damping``,
:math:`(\lambda_B + \sqrt\delta) \otimes (\lambda_A + \sqrt\delta)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import prod

import torch
from torch import Tensor, nn

__all__ = ["Kron", "KronDecomposed"]


def _is_scalar(value: object) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and value.ndim <= 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entry_size(entry: list[Tensor]) -> int:
    return prod(len(f) for f in entry)


def _safe_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric PSD factor, eigenvalues clamped at zero (rounding)."""
    values, vectors = torch.linalg.eigh(matrix)
    return values.clamp(min=0.0), vectors


class Kron:
    r"""Kronecker factors of a network's curvature, one entry per parameter tensor.

    Args:
        kfacs: One list per parameter: ``[B, A]`` (block :math:`B \\otimes A`) or ``[M]``.
    """

    def __init__(self, kfacs: list[list[Tensor]]) -> None:
        self.kfacs = kfacs

    @classmethod
    def init_from_model(
        cls, model: nn.Module | Iterable[Tensor], device: torch.device, dtype: torch.dtype
    ) -> Kron:
        """Zero factors shaped for the parameters (laplace-torch's initial layout).

        Args:
            model: A module or its parameters.
            device: The factors' device.
            dtype: The factors' dtype.

        Returns:
            ``[zeros(P, P)]`` per 1-D parameter, ``[zeros(O, O), zeros(I, I)]`` per 2-D to 4-D one.

        Raises:
            ValueError: For a parameter of another dimension.
        """
        params = model.parameters() if isinstance(model, nn.Module) else model
        kfacs = []
        for p in params:
            if p.ndim == 1:
                kfacs.append([torch.zeros(p.numel(), p.numel(), device=device, dtype=dtype)])
            elif 2 <= p.ndim <= 4:
                out, rest = p.shape[0], prod(p.shape[1:])
                kfacs.append(
                    [
                        torch.zeros(out, out, device=device, dtype=dtype),
                        torch.zeros(rest, rest, device=device, dtype=dtype),
                    ]
                )
            else:
                raise ValueError(f"Invalid parameter shape {tuple(p.shape)} for Kronecker factors.")
        return cls(kfacs)

    def __add__(self, other: Kron) -> Kron:
        """Add factor by factor (an entry with another number of factors is replaced)."""
        if not isinstance(other, Kron):
            raise ValueError("Can only add Kron to Kron.")
        kfacs = []
        for mine, theirs in zip(self.kfacs, other.kfacs, strict=True):
            if len(mine) != len(theirs):
                # A zero-initialised two-factor entry meets an exact one-matrix block.
                if all(bool((f == 0).all()) for f in mine):
                    kfacs.append([f.clone() for f in theirs])
                    continue
                raise ValueError("Cannot add Kronecker entries with different numbers of factors.")
            kfacs.append([a + b for a, b in zip(mine, theirs, strict=True)])
        return Kron(kfacs)

    def __mul__(self, scalar: float | Tensor) -> Kron:
        """Scale every block by ``scalar``: each of ``k`` factors by ``scalar ** (1 / k)``."""
        if not _is_scalar(scalar):
            raise ValueError("Input not valid python or torch scalar.")
        return Kron([[pow(scalar, 1 / len(entry)) * f for f in entry] for entry in self.kfacs])

    __radd__ = __add__
    __rmul__ = __mul__

    def __len__(self) -> int:
        return len(self.kfacs)

    def decompose(self, damping: bool = False) -> KronDecomposed:
        """Eigendecompose every factor.

        Args:
            damping: Add the prior to each factor (``sqrt(delta)``) rather than to the product.

        Returns:
            The :class:`KronDecomposed` of the same blocks.
        """
        vectors, values = [], []
        for entry in self.kfacs:
            pairs = [_safe_eigh(f) for f in entry]
            values.append([v for v, _ in pairs])
            vectors.append([q for _, q in pairs])
        return KronDecomposed(vectors, values, damping=damping)

    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        """Multiply by the blocks: ``W @ K`` for ``W`` of shape ``[..., P]`` (``K`` symmetric).

        Args:
            W: ``[P]``, ``[B, P]`` or ``[B, K, P]``.
            exponent: Only ``1``; other powers need :meth:`decompose`.

        Returns:
            The product, shaped like ``W``.
        """
        if exponent != 1:
            raise ValueError("Only supported after decomposition.")
        return _apply_entries(W, [_dense_apply(entry) for entry in self.kfacs], self.kfacs)

    def logdet(self) -> Tensor:
        """The log-determinant of the block-diagonal matrix."""
        total = torch.zeros((), dtype=self.kfacs[0][0].dtype, device=self.kfacs[0][0].device)
        for entry in self.kfacs:
            size = _entry_size(entry)
            for f in entry:
                total = total + size // len(f) * torch.logdet(f)
        return total

    def diag(self) -> Tensor:
        """The diagonal of the block-diagonal matrix."""
        diags = []
        for entry in self.kfacs:
            d = entry[0].diagonal()
            for f in entry[1:]:
                d = torch.outer(d, f.diagonal()).flatten()
            diags.append(d)
        return torch.cat(diags)

    def to_matrix(self) -> Tensor:
        """The dense block-diagonal matrix (for small models and tests)."""
        blocks = []
        for entry in self.kfacs:
            block = entry[0]
            for f in entry[1:]:
                block = torch.kron(block, f)
            blocks.append(block)
        return torch.block_diag(*blocks)


def _dense_apply(entry: list[Tensor]):
    if len(entry) == 1:
        return lambda rows: rows @ entry[0].T
    b, a = entry
    return lambda rows: (b @ rows.reshape(-1, len(b), len(a)) @ a.T).reshape(rows.shape[0], -1)


def _apply_entries(W: Tensor, appliers: list, entries: list[list[Tensor]]) -> Tensor:
    """Apply one map per entry to the matching columns of ``W`` (``[..., P]``)."""
    shape = W.shape
    rows = W.reshape(-1, shape[-1])
    out, start = [], 0
    for apply, entry in zip(appliers, entries, strict=True):
        size = _entry_size(entry)
        out.append(apply(rows[:, start : start + size]))
        start += size
    if start != shape[-1]:
        raise ValueError(f"W has {shape[-1]} parameters, the factors cover {start}.")
    return torch.cat(out, dim=1).reshape(shape)


class KronDecomposed:
    r"""Eigendecomposed Kronecker factors with a prior precision ``deltas`` per entry.

    Args:
        eigenvectors: Per entry, the factors' eigenvectors.
        eigenvalues: Per entry, the factors' eigenvalues.
        deltas: Per entry (or one for all), added to the eigenvalues' products.
        damping: Add :math:`\sqrt\delta` to each factor's eigenvalues instead.
    """

    def __init__(
        self,
        eigenvectors: list[list[Tensor]],
        eigenvalues: list[list[Tensor]],
        deltas: Tensor | None = None,
        damping: bool = False,
    ) -> None:
        self.eigenvectors = eigenvectors
        self.eigenvalues = eigenvalues
        ref = eigenvalues[0][0]
        if deltas is None:
            deltas = torch.zeros(len(eigenvalues), dtype=ref.dtype, device=ref.device)
        self._check_deltas(deltas)
        self.deltas = deltas
        self.damping = damping

    def _check_deltas(self, deltas: Tensor) -> None:
        if not isinstance(deltas, Tensor):
            raise ValueError("Can only add torch.Tensor to KronDecomposed.")
        if deltas.ndim == 0 or (deltas.ndim == 1 and len(deltas) in (1, len(self))):
            return
        raise ValueError(
            f"Invalid shape {tuple(deltas.shape)} of delta added to KronDecomposed: use a scalar "
            f"or one value per entry ({len(self)})."
        )

    def detach(self) -> KronDecomposed:
        """Detach the deltas (in place) and return ``self``."""
        self.deltas = self.deltas.detach()
        return self

    def __len__(self) -> int:
        return len(self.eigenvalues)

    def __add__(self, deltas: Tensor) -> KronDecomposed:
        """Add a prior precision, one value or one per entry."""
        self._check_deltas(deltas)
        return KronDecomposed(
            self.eigenvectors, self.eigenvalues, self.deltas + deltas, self.damping
        )

    def __mul__(self, scalar: float | Tensor) -> KronDecomposed:
        """Scale every block (each of ``k`` factors' eigenvalues by ``scalar ** (1 / k)``)."""
        if not _is_scalar(scalar):
            raise ValueError("Invalid argument, can only multiply Kron with scalar.")
        values = [[pow(scalar, 1 / len(ls)) * v for v in ls] for ls in self.eigenvalues]
        return KronDecomposed(self.eigenvectors, values, self.deltas, self.damping)

    def _entry_values(self, values: list[Tensor], delta: Tensor) -> Tensor:
        """The eigenvalues of one entry with its delta, flattened in the block's order."""
        if len(values) == 1:
            return values[0] + delta
        if self.damping:
            return torch.outer(values[0] + delta.sqrt(), values[1] + delta.sqrt()).flatten()
        return (torch.outer(values[0], values[1]) + delta).flatten()

    def _deltas(self) -> Tensor:
        return self.deltas.reshape(-1).expand(len(self))

    def logdet(self) -> Tensor:
        r""":math:`\\log\\det` of the block-diagonal matrix with its deltas."""
        return sum(
            self._entry_values(ls, d).log().sum()
            for ls, d in zip(self.eigenvalues, self._deltas(), strict=True)
        )

    def _power_apply(self, vectors: list[Tensor], values: Tensor, exponent: float):
        scale = values.pow(exponent)
        if len(vectors) == 1:
            (q,) = vectors
            return lambda rows: ((rows @ q) * scale) @ q.T
        q_b, q_a = vectors

        def apply(rows: Tensor) -> Tensor:
            w = rows.reshape(-1, len(q_b), len(q_a))
            w = (q_b.T @ w @ q_a) * scale.reshape(len(q_b), len(q_a))
            return (q_b @ w @ q_a.T).reshape(rows.shape[0], -1)

        return apply

    def bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        """Multiply by a power of the matrix: ``W @ K ** exponent`` for ``W`` ``[..., P]``.

        Args:
            W: ``[P]``, ``[B, P]`` or ``[B, K, P]``.
            exponent: The power (``-1``: the covariance, ``-0.5``: a square root of it).

        Returns:
            The product, shaped like ``W``.
        """
        appliers = [
            self._power_apply(qs, self._entry_values(ls, d), exponent)
            for qs, ls, d in zip(self.eigenvectors, self.eigenvalues, self._deltas(), strict=True)
        ]
        return _apply_entries(W, appliers, self.eigenvalues)

    def inv_square_form(self, W: Tensor) -> Tensor:
        r""":math:`W K^{-1} W^\\top` per batch entry, for ``W`` ``[B, K, P]``."""
        return torch.bmm(W, self.bmm(W, exponent=-1).transpose(1, 2))

    def diag(self, exponent: float = 1) -> Tensor:
        """The diagonal of ``K ** exponent``."""
        diags = []
        for qs, ls, d in zip(self.eigenvectors, self.eigenvalues, self._deltas(), strict=True):
            scale = self._entry_values(ls, d).pow(exponent)
            if len(qs) == 1:
                diags.append((qs[0].square() * scale).sum(1))
            else:
                q_b, q_a = qs
                grid = scale.reshape(len(q_b), len(q_a))
                diags.append((q_b.square() @ grid @ q_a.square().T).flatten())
        return torch.cat(diags)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """The dense block-diagonal ``K ** exponent`` (for small models and tests)."""
        size = sum(_entry_size(ls) for ls in self.eigenvalues)
        eye = torch.eye(size, dtype=self.deltas.dtype, device=self.deltas.device)
        return self.bmm(eye, exponent=exponent)
