r"""Structured factor of an embedding table: one-hot rows, never a dense table per sample.

An embedding :math:`y_{n,t} = W[i_{n,t}]` looked up at positions :math:`t` has per-sample
gradients

.. math::

    v_{k,n} = \sum_t e_{i_{n,t}} \otimes b_{k,n,t},

nonzero only in the rows of the tokens sample :math:`n` uses. :class:`EmbeddingFactor` keeps the
indices :math:`i` (``[N, T]``) and :math:`b` (``[K, N, T, E]``); a dense factor would hold
:math:`K N V E` numbers for a vocabulary of :math:`V` tokens. Positions looking up the same
token in the same sample add up before anything is squared.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.engines.factor import Factor, SumFactor
from curvkit.engines.kronecker import KroneckerFactor

__all__ = ["EmbeddingFactor", "TiedEmbeddingFactor"]


class EmbeddingFactor(Factor):
    r"""The factor :math:`v_{k,n} = \sum_t e_{i_{n,t}} \otimes b_{k,n,t}` of an embedding table.

    Args:
        output_grads: :math:`b`, shape ``[K, N, T, E]`` (zero where the padding index is
            looked up, whose row gets no gradient).
        indices: :math:`i`, integer tensor ``[N, T]``.
        param_shape: The table's shape ``[V, E]``.

    Raises:
        ValueError: If the shapes do not fit together.
    """

    def __init__(self, output_grads: Tensor, indices: Tensor, param_shape: torch.Size) -> None:
        if output_grads.dim() != 4 or indices.dim() != 2:
            raise ValueError("output_grads must be [K, N, T, E] and indices [N, T]")
        if output_grads.shape[1:3] != indices.shape or len(param_shape) != 2:
            raise ValueError(
                f"output_grads {tuple(output_grads.shape)}, indices {tuple(indices.shape)} and "
                f"param_shape {tuple(param_shape)} do not fit [K, N, T, E], [N, T], [V, E]"
            )
        if output_grads.shape[3] != param_shape[1]:
            raise ValueError("the embedding dimension of output_grads and param_shape differ")
        super().__init__(param_shape, output_grads.shape[0], output_grads.shape[1])
        self.output_grads = output_grads
        self.indices = indices

    def _per_sample_rows(self) -> tuple[Tensor, Tensor]:
        """The distinct (sample, token) pairs and the summed columns of each.

        Returns:
            ``(tokens [P], rows [K, P, E])``: pair ``p`` is token ``tokens[p]`` of some sample;
            ``rows[:, p]`` sums :math:`b_{k,n,t}` over the positions of that token in it.
        """
        k, n, t, e = self.output_grads.shape
        vocabulary = self.param_shape[0]
        samples = torch.arange(n, device=self.indices.device)[:, None]
        pair_ids = (samples * vocabulary + self.indices).flatten()
        unique, inverse = torch.unique(pair_ids, return_inverse=True)
        rows = self.output_grads.new_zeros(k, unique.numel(), e)
        rows.index_add_(1, inverse, self.output_grads.reshape(k, n * t, e))
        return unique % vocabulary, rows

    def diag(self) -> Tensor:  # noqa: D102
        tokens, rows = self._per_sample_rows()
        out = rows.new_zeros(self.param_shape)
        return out.index_add_(0, tokens, rows.square().sum(dim=0))

    def gram(self) -> Tensor:  # noqa: D102
        k, n, t, _ = self.output_grads.shape
        flat = self.indices.flatten()
        same_token = (flat[:, None] == flat[None, :]).to(self.output_grads.dtype)
        b = self.output_grads.reshape(k, n * t, -1)
        products = torch.einsum("kae,lbe->kalb", b, b)  # all pairs of (column, position)
        masked = products * same_token[None, :, None, :]
        return masked.reshape(k, n, t, k, n, t).sum(dim=(2, 5))

    def t_mat(self, mat: Tensor) -> Tensor:  # noqa: D102
        looked_up = mat[:, self.indices]  # [J, N, T, E]
        return torch.einsum("knte,jnte->knj", self.output_grads, looked_up)

    def mat(self, coefficients: Tensor) -> Tensor:  # noqa: D102
        weighted = torch.einsum("knj,knte->jnte", coefficients, self.output_grads)
        out = weighted.new_zeros(coefficients.shape[-1], *self.param_shape)
        return out.index_add_(1, self.indices.flatten(), weighted.flatten(1, 2))

    def dense(self) -> Tensor:  # noqa: D102
        k, n, t, e = self.output_grads.shape
        out = self.output_grads.new_zeros(k, n, *self.param_shape)
        rows = (torch.arange(n, device=self.indices.device)[:, None] * self.param_shape[0]) + (
            self.indices
        )
        flat = out.view(k, n * self.param_shape[0], e)
        flat.index_add_(1, rows.flatten(), self.output_grads.reshape(k, n * t, e))
        return out

    @classmethod
    def concatenate(cls, factors: list[EmbeddingFactor]) -> EmbeddingFactor:
        """The factor of a table used by several calls: positions of all calls side by side."""
        return cls(
            torch.cat([f.output_grads for f in factors], dim=2),
            torch.cat([f.indices for f in factors], dim=1),
            factors[0].param_shape,
        )

    def select(self, start: int, stop: int) -> EmbeddingFactor:  # noqa: D102
        return EmbeddingFactor(self.output_grads[start:stop], self.indices, self.param_shape)


class TiedEmbeddingFactor(SumFactor):
    r"""An embedding table that is also a Linear layer's weight: a language model's tied head.

    :math:`v_{k,n} = \sum_t e_{i_{n,t}} \otimes b_{k,n,t} + \sum_s g_{k,n,s} \otimes x_{n,s}`
    (the lookup's columns, then the head's). Its diagonal is the parts' diagonals plus twice
    their cross term, which lives in the rows of the looked-up tokens:

    .. math::

        \sum_{k,n} v^{E}_{k,n} \odot v^{L}_{k,n}
        = \sum_{k,n,t} e_{i_{n,t}} \otimes \Big(b_{k,n,t} \odot
          \sum_s g_{k,n,s}[i_{n,t}]\, x_{n,s}\Big),

    without the dense :math:`K N V E` columns a plain :class:`SumFactor` would form.

    Args:
        embedding: The lookup's factor, ``[V, E]``.
        linear: The head's factor, one group, weight ``[V, E]``.
    """

    def __init__(self, embedding: EmbeddingFactor, linear: KroneckerFactor) -> None:
        super().__init__([embedding, linear])
        self.embedding = embedding
        self.linear = linear

    @staticmethod
    def applies(parts: list[Factor]) -> bool:
        """Whether ``parts`` are one embedding lookup and one one-group Linear on its table."""
        if len(parts) != 2:
            return False
        embedding = next((p for p in parts if isinstance(p, EmbeddingFactor)), None)
        linear = next((p for p in parts if isinstance(p, KroneckerFactor)), None)
        return (
            embedding is not None
            and linear is not None
            and linear.output_grads.shape[3] == 1
            and tuple(linear.output_grads.shape[4:]) == (embedding.param_shape[0],)
            and linear.input_shape[-1] == embedding.param_shape[1]
        )

    @classmethod
    def of(cls, parts: list[Factor]) -> TiedEmbeddingFactor:
        """The factor of ``parts`` (see :meth:`applies`), in either order."""
        embedding = next(p for p in parts if isinstance(p, EmbeddingFactor))
        linear = next(p for p in parts if isinstance(p, KroneckerFactor))
        return cls(embedding, linear)

    def gram(self) -> Tensor:
        r"""The parts' Gram matrices plus their cross terms, without the dense columns.

        The cross term pairs the lookup's column :math:`(k, n)` with the head's :math:`(l, m)`:

        .. math::

            (v^{E}_{k,n})^\top v^{L}_{l,m}
            = \sum_{t,s} (b_{k,n,t}^\top x_{m,s})\; g_{l,m,s}[i_{n,t}],

        the products of the looked-up positions' columns with the head's inputs, weighted by
        the head's columns at the looked-up tokens: :math:`K N T \cdot N S` numbers per chunk
        of samples instead of :math:`K N V E`.
        """
        cross = self._cross_gram()
        gram = self.embedding.gram() + self.linear.gram()
        return gram + cross + cross.permute(2, 3, 0, 1)

    def _cross_gram(self) -> Tensor:
        """``[K, N, K, N]``: the lookup's columns (first pair) against the head's (second)."""
        indices = self.embedding.indices  # [N, T]
        b = self.embedding.output_grads  # [K, N, T, E]
        g = self.linear.output_grads[:, :, :, 0]  # [K, N, S, V]
        x = self.linear.inputs[:, :, 0]  # [N, S, E]
        k, n, t, e = b.shape
        s = g.shape[2]
        inputs = x.reshape(n * s, e)
        out = b.new_zeros(k, n, k, n)
        step = max(1, min(n, self.linear.max_chunk_bytes // (b.element_size() * 2 * k * t * n * s)))
        for start in range(0, n, step):
            chunk = slice(start, min(start + step, n))
            c = chunk.stop - chunk.start
            products = (b[:, chunk].reshape(-1, e) @ inputs.T).reshape(k, c, t, n, s)
            picked = g.index_select(3, indices[chunk].flatten()).reshape(k, n, s, c, t)
            out[:, chunk] = torch.einsum("kctms,lmsct->kclm", products, picked)
        return out

    def diag(self) -> Tensor:  # noqa: D102
        out = self.embedding.diag() + self.linear.diag()
        indices = self.embedding.indices  # [N, T]
        g = self.linear.output_grads[:, :, :, 0]  # [K, N, S, V]
        x = self.linear.inputs[:, :, 0]  # [N, S, E]
        k, n, s, _ = g.shape
        t = indices.shape[1]
        # g_{k,n,s}[i_{n,t}]: [K, N, S, T]
        picked = torch.gather(g, 3, indices[None, :, None, :].expand(k, n, s, t))
        head_rows = torch.einsum("knst,nse->knte", picked, x)
        cross = (self.embedding.output_grads * head_rows).sum(dim=0)  # [N, T, E]
        return out.index_add_(0, indices.flatten(), 2 * cross.reshape(n * t, -1))
