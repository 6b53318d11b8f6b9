r"""Structured factors of Linear and convolution weights: sums of outer products.

A Linear layer :math:`y_t = W x_t` applied at positions :math:`t` (a sequence axis, the pixels of
an unfolded convolution, or several calls of a shared layer) has per-sample gradients

.. math::

    v_{k,n} = \sum_t b_{k,n,t} \otimes x_{n,t},

with :math:`b_{k,n,t}` the backpropagated column at the output and :math:`x_{n,t}` the input.
A grouped convolution is one such layer per group :math:`g`. :class:`KroneckerFactor` keeps
:math:`b` (``[K, N, T, G, O]``) and :math:`x` (``[N, T, G, I]``) and evaluates the
:class:`~curvkit.engines.factor.Factor` methods without forming :math:`v` where that is cheaper:

- ``T == 1``: :math:`\operatorname{diag} = \sum_n (\sum_k b_{k,n}^2) \otimes x_n^2`, one
  matmul of inner size :math:`N`; Gram :math:`= (B B^\top) \odot (X X^\top)`;
- ``T > 1``: per method, the cheaper (in multiply-adds, with the memory traffic of writing a
  per-sample gradient counted as :data:`MEMORY_COST`) of the structured contraction over pairs
  of positions :math:`(t, s)` (one matmul per chunk: the diagonal as
  :math:`\sum_{n,t,s} (\sum_k b_{k,n,t} \odot b_{k,n,s}) (x_{n,t} \odot x_{n,s})^\top`, the
  Gram matrix from :math:`b^\top b` and :math:`x^\top x` over blocks of positions) and of
  materialising :math:`v` in chunks of samples whose size is bounded by ``max_chunk_bytes``;
- :meth:`~KroneckerFactor.t_mat` and :meth:`~KroneckerFactor.mat` are single contractions
  (:func:`torch.einsum` picks the order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvkit.engines.factor import Factor, square_sum

__all__ = ["DEFAULT_CHUNK_BYTES", "KroneckerFactor"]

#: Raised when a tensor a factor refers to was changed in place after the factor was made.
STALE_INPUT_MESSAGE = (
    "a module input this factor refers to was changed in place after the factor was computed; "
    "compute the factors again (or change a copy of the input)"
)

#: Default bound on the bytes of an intermediate tensor a factor method materialises at once.
DEFAULT_CHUNK_BYTES = 2**28

#: Multiply-adds that writing and reading back one entry of a per-sample gradient costs on top of
#: its :math:`T` multiply-adds (measured on CPU, ResNet-18 layers): memory traffic, which makes
#: materialising slow for few positions.
MEMORY_COST = 32


def square_pairs(b: Tensor) -> Tensor:
    r""":math:`\sum_k b_{k,n,t} \odot b_{k,n,s}` for ``b`` ``[K, n, T, G, O]``: ``[n, T, T, G, O]``.

    Elementwise per column (the contraction over :math:`K` is too short for a matmul).
    """
    out = b[0].unsqueeze(2) * b[0].unsqueeze(1)
    for column in b[1:]:
        out.addcmul_(column.unsqueeze(2), column.unsqueeze(1))
    return out


class KroneckerFactor(Factor):
    r"""The factor :math:`v_{k,n} = \sum_t b_{k,n,t} \otimes x_{n,t}` of a (grouped) weight.

    Args:
        output_grads: :math:`b`, shape ``[K, N, T, G, O]``.
        inputs: :math:`x`, shape ``[N, T, G, I]``, or a function returning it. A function
            (with ``input_shape``) keeps only what it needs to build :math:`x`: a convolution's
            input instead of its ``prod(kernel_size)`` times larger patches, which every method
            then builds anew and frees when done.
        param_shape: The weight's shape; it has ``G * O * I`` entries, laid out as ``[G, O, I]``.
        max_chunk_bytes: Bound on the bytes of the per-sample gradients or pairwise products
            materialised at once.
        input_shape: The shape of :math:`x` when ``inputs`` is a function.

    Raises:
        ValueError: If the shapes do not fit together.
    """

    def __init__(
        self,
        output_grads: Tensor,
        inputs: Tensor | Callable[[], Tensor],
        param_shape: torch.Size,
        *,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        if isinstance(inputs, Tensor):
            input_shape = inputs.shape
        elif input_shape is None:
            raise ValueError("input_shape is needed when inputs is a function")
        self.input_shape = torch.Size(input_shape)
        if output_grads.dim() != 5 or len(self.input_shape) != 4:
            raise ValueError("output_grads must be [K, N, T, G, O] and inputs [N, T, G, I]")
        if output_grads.shape[1:4] != self.input_shape[:3]:
            raise ValueError(
                f"output_grads {tuple(output_grads.shape)} and inputs {tuple(self.input_shape)} "
                "disagree on [N, T, G]"
            )
        k, n, _, g, o = output_grads.shape
        if torch.Size(param_shape).numel() != g * o * self.input_shape[-1]:
            raise ValueError(f"param_shape {tuple(param_shape)} does not hold G * O * I entries")
        super().__init__(param_shape, k, n)
        self.output_grads = output_grads
        self._inputs = inputs
        self._version = inputs._version if isinstance(inputs, Tensor) else None
        self.max_chunk_bytes = max_chunk_bytes

    @property
    def inputs(self) -> Tensor:
        """:math:`x`, shape ``[N, T, G, I]`` (built on each access if given as a function).

        Raises:
            RuntimeError: If :math:`x` was changed in place since the factor was made.
        """
        if not isinstance(self._inputs, Tensor):
            return self._inputs()
        if self._inputs._version != self._version:
            raise RuntimeError(STALE_INPUT_MESSAGE)
        return self._inputs

    @classmethod
    def concatenate(cls, factors: list[KroneckerFactor]) -> KroneckerFactor:
        """The factor of a weight used by several calls: positions of all calls side by side."""
        first = factors[0]
        return cls(
            torch.cat([f.output_grads for f in factors], dim=2),
            torch.cat([f.inputs for f in factors], dim=1),
            first.param_shape,
            max_chunk_bytes=min(f.max_chunk_bytes for f in factors),
        )

    @property
    def _sizes(self) -> tuple[int, int, int, int, int, int]:
        k, n, t, g, o = self.output_grads.shape
        return k, n, t, g, o, self.input_shape[-1]

    def _sample_chunks(self, bytes_per_sample: int) -> list[slice]:
        n = self.num_samples
        step = max(1, min(n, self.max_chunk_bytes // max(bytes_per_sample, 1)))
        return [slice(start, min(start + step, n)) for start in range(0, n, step)]

    def _per_sample(self, x: Tensor, column: int, samples: slice) -> Tensor:
        """:math:`v_{k,n}` for one column :math:`k` and the given samples, ``[n, G, O, I]``.

        One column at a time: the engine's :math:`b` is laid out ``[K, N, G, O, T]`` in memory
        and a convolution's patches ``[N, G, I, T]``, so that one column is a batch of
        ``[O, T] @ [T, I]`` products a batched matmul reads in place (an einsum over all
        columns, or over the ``[N, T, G, *]`` views, copies its operands first).
        """
        b = self.output_grads[column, samples].permute(0, 2, 3, 1)  # [n, G, O, T]
        return torch.matmul(b, x[samples].permute(0, 2, 1, 3))  # [n, G, T, I]

    def _diag_costs(self) -> tuple[int, int]:
        """Per-sample costs (multiply-adds) of the pairwise and the materialising diagonal."""
        k, _, t, g, o, i = self._sizes
        pairwise = t * t * g * (k * o + o * i)
        materialise = k * g * o * i * (t + MEMORY_COST)
        return pairwise, materialise

    def diag(self) -> Tensor:  # noqa: D102
        t = self.output_grads.shape[2]
        b, x = self.output_grads, self.inputs
        if t == 1:
            out = torch.einsum("ngo,ngi->goi", square_sum(b[:, :, 0]), x[:, 0].square())
            return out.reshape(self.param_shape)
        pairwise, materialise = self._diag_costs()
        if pairwise < materialise:
            return self._diag_pairwise(x)
        return self._diag_materialised(x)

    def _diag_pairwise(self, x: Tensor) -> Tensor:
        r"""The diagonal as one matmul over pairs of positions.

        :math:`\sum_{k,n} (\sum_t b_{k,n,t} x_{n,t}^\top)^{\odot 2}
        = \sum_{n,t,s} (\sum_k b_{k,n,t} \odot b_{k,n,s}) (x_{n,t} \odot x_{n,s})^\top`:
        a ``[O, N T^2] @ [N T^2, I]`` product per group, cheaper than materialising when
        :math:`T` is small next to :math:`K` plus the cost of writing a per-sample gradient.
        """
        _, _, t, g, o, i = self._sizes
        b = self.output_grads
        out = b.new_zeros(g, o, i)
        for s in self._sample_chunks(b.element_size() * t * t * g * (o + i)):
            bb = square_pairs(b[:, s])  # [n, t, s, G, O], summed over columns
            xx = x[s].unsqueeze(2) * x[s].unsqueeze(1)  # [n, t, s, G, I]
            rows = bb.reshape(-1, g, o).permute(1, 2, 0)  # [G, O, n t s]
            out.baddbmm_(rows, xx.reshape(-1, g, i).transpose(0, 1))
        return out.reshape(self.param_shape)

    def _diag_materialised(self, x: Tensor) -> Tensor:
        """The diagonal from per-sample gradients, one column and a chunk of samples at a time."""
        k, _, _, g, o, i = self._sizes
        out = self.output_grads.new_zeros(g, o, i)
        for s in self._sample_chunks(self.output_grads.element_size() * g * o * i):
            for column in range(k):
                # One fused multiply-add per sample: an einsum over the sample axis runs as
                # G O I dot products of length n (measured 2-7x slower).
                for gradient in self._per_sample(x, column, s):
                    out.addcmul_(gradient, gradient)
        return out.reshape(self.param_shape)

    def gram(self) -> Tensor:  # noqa: D102
        k, n, t, g, o, i = self._sizes
        pairwise_cost = (k * n * t) ** 2 * g * o + (n * t) ** 2 * g * i + (k * n * t) ** 2 * g
        materialise_cost = k * n * t * g * o * i + (k * n) ** 2 * g * o * i
        if pairwise_cost <= materialise_cost:
            return self._gram_pairwise()
        flat = self.dense().flatten(start_dim=2)
        return torch.einsum("knd,lmd->knlm", flat, flat)

    def _gram_pairwise(self) -> Tensor:
        r"""The Gram matrix from products over pairs of positions, in blocks of positions.

        :math:`v_{k,n}^\top v_{l,m} = \sum_{g,t,s} (b_{k,n,t,g}^\top b_{l,m,s,g})
        (x_{n,t,g}^\top x_{m,s,g})`: one matmul ``[G, K N T_b, O] @ [G, O, K N T]`` and one
        of the inputs per block of positions :math:`t` (sized by ``max_chunk_bytes``), then a
        weighted sum over the pairs.
        """
        k, n, t, g, o, i = self._sizes
        b = self.output_grads.permute(3, 0, 1, 2, 4)  # [G, K, N, T, O]
        x = self.inputs.permute(2, 0, 1, 3)  # [G, N, T, I]
        all_columns = b.reshape(g, k * n * t, o).transpose(1, 2)  # [G, O, K N T]
        all_inputs = x.reshape(g, n * t, i).transpose(1, 2)  # [G, I, N T]
        # the block's two pairwise products, and their product before the sum
        bytes_per_position = b.element_size() * g * (2 * (k * n) ** 2 * t + n * n * t)
        step = max(1, min(t, self.max_chunk_bytes // bytes_per_position))
        out = b.new_zeros(k, n, k, n)
        for start in range(0, t, step):
            block = slice(start, min(start + step, t))
            size = block.stop - block.start
            bb = torch.matmul(b[:, :, :, block].reshape(g, -1, o), all_columns)
            xx = torch.matmul(x[:, :, block].reshape(g, -1, i), all_inputs)
            bb = bb.reshape(g, k, n, size, k, n, t) * xx.reshape(g, 1, n, size, 1, n, t)
            out += bb.sum(dim=(0, 3, 6))
        return out

    def _through_inputs(self, num_directions: int) -> bool:
        r"""Whether products with :math:`J` directions are cheaper through the inputs.

        Per sample and group, contracting each direction with the inputs costs
        :math:`J T O I` (plus :math:`K T O J` with the columns); materialising the per-sample
        gradients costs :math:`K T O I` (plus writing them, and :math:`K J O I` with the
        directions). So few directions go through the inputs, few columns through the per-sample
        gradients (``einsum`` picked the former whatever the sizes: 20 times slower for ten
        directions on a language-model head).
        """
        k, _, t, _, o, i = self._sizes
        through_inputs = num_directions * t * o * i + k * t * o * num_directions
        materialise = k * (t + MEMORY_COST) * o * i + k * num_directions * o * i
        return through_inputs <= materialise

    def t_mat(self, mat: Tensor) -> Tensor:  # noqa: D102
        k, _, t, g, o, i = self._sizes
        j = mat.shape[0]
        m = mat.reshape(j, g, o, i)
        b, x = self.output_grads, self.inputs
        parts = []
        if self._through_inputs(j):
            directions = m.permute(1, 3, 0, 2).reshape(g, i, j * o)  # [G, I, J O]
            for s in self._sample_chunks(b.element_size() * t * g * (j + k) * o):
                size = s.stop - s.start
                xm = torch.matmul(x[s].permute(2, 0, 1, 3).reshape(g, size * t, i), directions)
                xm = xm.reshape(g, size, t, j, o).permute(1, 0, 2, 4, 3).reshape(size, -1, j)
                bs = b[:, s].permute(1, 0, 3, 2, 4).reshape(size, k, -1)  # [n, K, G T O]
                parts.append(torch.bmm(bs, xm).transpose(0, 1))
        else:
            flat = m.reshape(j, -1)
            for s in self._sample_chunks(b.element_size() * g * o * i):
                parts.append(
                    torch.stack(
                        [
                            self._per_sample(x, column, s).flatten(start_dim=1) @ flat.T
                            for column in range(k)
                        ]
                    )
                )
        return torch.cat(parts, dim=1)

    def mat(self, coefficients: Tensor) -> Tensor:  # noqa: D102
        k, _, t, g, o, i = self._sizes
        j = coefficients.shape[-1]
        b, x = self.output_grads, self.inputs
        if self._through_inputs(j):
            out = b.new_zeros(g, j * o, i)
            for s in self._sample_chunks(b.element_size() * t * g * (j + k) * o):
                size = s.stop - s.start
                # the columns combined per sample, [n, J, T G O], then laid out [G, J O, n T]
                combined = torch.bmm(
                    coefficients[:, s].permute(1, 2, 0),
                    b[:, s].transpose(0, 1).reshape(size, k, -1),
                )
                combined = combined.reshape(size, j, t, g, o).permute(3, 1, 4, 0, 2)
                inputs = x[s].permute(2, 0, 1, 3).reshape(g, size * t, i)
                out = out.baddbmm(combined.reshape(g, j * o, size * t), inputs)
            out = out.reshape(g, j, o, i).transpose(0, 1)
        else:
            out = b.new_zeros(j, g * o * i)
            for s in self._sample_chunks(b.element_size() * g * o * i):
                for column in range(k):
                    per_sample = self._per_sample(x, column, s).flatten(start_dim=1)
                    out = out.addmm(coefficients[column, s].T, per_sample)
        return out.reshape(j, *self.param_shape)

    def dense(self) -> Tensor:  # noqa: D102
        per_sample = torch.einsum("kntgo,ntgi->kngoi", self.output_grads, self.inputs)
        return per_sample.reshape(self.num_columns, self.num_samples, *self.param_shape)

    def select(self, start: int, stop: int) -> KroneckerFactor:  # noqa: D102
        return KroneckerFactor(
            self.output_grads[start:stop],
            self._inputs,
            self.param_shape,
            max_chunk_bytes=self.max_chunk_bytes,
            input_shape=self.input_shape,
        )
