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
  per-sample gradient counted as :data:`MEMORY_COST`) of a contraction over pairs and of
  materialising :math:`v` a block at a time. The diagonal pairs positions,
  :math:`\sum_{n,t,s} (\sum_k b_{k,n,t} \odot b_{k,n,s}) (x_{n,t} \odot x_{n,s})^\top` in one
  matmul per chunk, or squares blocks of rows of :math:`v` while they are in the cache. The
  Gram matrix pairs samples, :math:`v_{k,n}^\top v_{l,m} = \sum_{t,s} (b_{k,n,t}^\top
  b_{l,m,s}) (x_{n,t}^\top x_{m,s})` contracted as :math:`x x^\top`, then :math:`b_m`, then
  :math:`b_n` (never :math:`b^\top b`, which costs :math:`K` times more), or sums
  :math:`v v^\top` over blocks of the weight's rows bounded by ``max_chunk_bytes``;
- :meth:`~KroneckerFactor.mat` and :meth:`~KroneckerFactor.t_mat` with :math:`J` directions
  contract through the inputs (:math:`J T O I` per sample: few directions) or through the
  per-sample gradients (:math:`K T O I`: few columns), whichever costs less.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvkit.engines.factor import DenseFactor, Factor, square_sum
from curvkit.ops.linalg import symmetric_gram

__all__ = ["DEFAULT_CHUNK_BYTES", "BiasFactor", "KroneckerFactor", "outer_sum"]

#: Raised when a tensor a factor refers to was changed in place after the factor was made.
STALE_INPUT_MESSAGE = (
    "a module input this factor refers to was changed in place after the factor was computed; "
    "compute the factors again (or change a copy of the input)"
)

#: Default bound on the bytes of an intermediate tensor a factor method materialises at once.
DEFAULT_CHUNK_BYTES = 2**28

#: Bytes of a block of per-sample products formed and used at once while in the cache (rows of
#: per-sample gradients for the diagonal, :math:`y` for the pairwise Gram matrix): the two cores'
#: L2 here; 1-2 MiB were slower on ResNet-18's layers, 8 MiB no faster.
CACHE_BYTES = 2**22

#: Bound on the bytes of the per-sample gradient rows the materialising Gram matrix forms at once.
GRAM_BLOCK_BYTES = 2**25

#: Multiply-adds that writing and reading back one entry of a per-sample gradient costs on top of
#: its :math:`T` multiply-adds (fitted on CPU to ResNet-18-sized layers with 10 columns, where the
#: pairwise diagonal wins below about 12 positions): memory traffic, which makes materialising
#: slow for few positions.
MEMORY_COST = 8


def square_pairs(b: Tensor) -> Tensor:
    r""":math:`\sum_k b_{k,n,t} \odot b_{k,n,s}` for ``b`` ``[K, n, T, G, O]``: ``[n, T, T, G, O]``.

    Elementwise per column (the contraction over :math:`K` is too short for a matmul).
    """
    out = b[0].unsqueeze(2) * b[0].unsqueeze(1)
    for column in b[1:]:
        out.addcmul_(column.unsqueeze(2), column.unsqueeze(1))
    return out


def _scratch(tensors: Sequence[Tensor], numel: int) -> Tensor | None:
    """A buffer that the products of a method's loop are written into, or ``None``.

    Reusing one buffer spares a fresh allocation per product: with thousands of products of a
    few MiB each, returning the memory to the system and faulting it in again cost more than the
    products (ResNet-18's exact diagonal: 13-16 s instead of 9.4 s under the benchmarks'
    ``MALLOC_MMAP_THRESHOLD_=65536``). When autograd records (a factor made with
    ``create_graph``) the products must be new tensors (``out=`` is not differentiable): then
    ``None``.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return tensors[0].new_empty(numel)


def _matmul(a: Tensor, b: Tensor, scratch: Tensor | None) -> Tensor:
    """``a @ b`` (2-d or batched 3-d), written into the front of ``scratch`` if given."""
    if scratch is None:
        return a @ b
    out = scratch[: a.shape[:-1].numel() * b.shape[-1]].view(*a.shape[:-1], b.shape[-1])
    return torch.matmul(a, b, out=out)


def outer_sum(z: Tensor, scale: float = 1.0) -> Tensor:
    r"""``scale`` times :math:`\sum_{m,t} z_{m,t} z_{m,t}^\top` per group, ``[M, T, G, D]``.

    Returns ``[G, D, D]``, exactly symmetric where :func:`~curvkit.ops.linalg.symmetric_gram`
    computes only the upper block triangle (large factors: a language-model head's ``B``, the
    input factors of deep convolutions).
    """
    m, t, g, d = z.shape
    rows = z.permute(0, 2, 3, 1)
    if t >= d and rows.is_contiguous():
        # A convolution's patches and output columns lie as [M, G, D, T]: a batched matmul per
        # sample reads them in place, where one matmul over (m, t) would first copy them. Only
        # for t >= d: with fewer positions, each product would be bound by writing its D x D.
        return symmetric_gram(list(rows.mT), scale=scale)
    return symmetric_gram(z.reshape(m * t, g, d).transpose(0, 1), scale=scale)


def _output_moment(b: Tensor, expand: bool) -> Tensor:
    bs = b.flatten(0, 1)
    return outer_sum(bs if expand else bs.sum(dim=1, keepdim=True))


class BiasFactor(DenseFactor):
    r"""The factor of an additive bias: :math:`v_{k,n} = \sum_t b_{k,n,t}`, KFAC's :math:`x = 1`.

    A :class:`~curvkit.engines.factor.DenseFactor` of the summed columns that keeps the columns
    :math:`b` ``[K, N, T, G, O]`` per position, so that KFAC gets the bias's output factor
    from the bias alone (a frozen or parametrized weight has no factor to give it).
    """

    def __init__(self, output_grads: Tensor, param_shape: torch.Size) -> None:
        k, n, t = output_grads.shape[:3]
        summed = output_grads[:, :, 0] if t == 1 else output_grads.sum(dim=2)
        super().__init__(summed.reshape(k, n, *param_shape), param_shape)
        self.output_grads = output_grads

    @classmethod
    def concatenate(cls, factors: list[BiasFactor]) -> BiasFactor:
        """The factor of a bias used by several calls: positions of all calls side by side."""
        return cls(torch.cat([f.output_grads for f in factors], dim=2), factors[0].param_shape)

    def select(self, start: int, stop: int) -> BiasFactor:  # noqa: D102
        return BiasFactor(self.output_grads[start:stop], self.param_shape)

    @property
    def kronecker_outputs(self) -> tuple[int, int]:  # noqa: D102
        return tuple(self.output_grads.shape[3:])

    def output_moment(self, *, expand: bool) -> Tensor:  # noqa: D102
        return _output_moment(self.output_grads, expand)

    def rotated(self, qb: Tensor, qa: Tensor | None, *, with_ones: bool = False) -> Factor:  # noqa: D102
        if qa is not None:
            raise self._not_kronecker()
        b = torch.einsum("kntgo,gop->kntgp", self.output_grads, qb)
        return BiasFactor(b, self.param_shape)

    def bias_part(self) -> Factor:  # noqa: D102
        return self


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

    def _row_blocks(self, bytes_per_row: int, limit: int) -> list[slice]:
        """Blocks of the output rows ``O`` with at most ``limit`` bytes (at least one row)."""
        o = self.output_grads.shape[-1]
        step = max(1, min(o, limit // max(bytes_per_row, 1)))
        return [slice(start, min(start + step, o)) for start in range(0, o, step)]

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
        """The diagonal from per-sample gradients, a block of rows of one gradient at a time.

        Each block (``[rows, T] @ [T, I]``, at most :data:`CACHE_BYTES`) is squared into the
        sum while it is still in the cache: materialising whole per-sample gradients first and
        squaring them afterwards ran at the speed of main memory (2-4x slower on ResNet-18's
        8 x 8 and 4 x 4 stages).
        """
        k, n, _, g, o, i = self._sizes
        b = self.output_grads
        out = b.new_zeros(g, o, i)
        blocks = self._row_blocks(b.element_size() * i, CACHE_BYTES)
        scratch = _scratch([b, x], (blocks[0].stop - blocks[0].start) * i)
        for group in range(g):
            for rows in blocks:
                block = out[group, rows]
                for sample in range(n):
                    inputs = x[sample, :, group]  # [T, I]
                    for column in range(k):
                        gradient = _matmul(b[column, sample, :, group, rows].T, inputs, scratch)
                        block.addcmul_(gradient, gradient)
        return out.reshape(self.param_shape)

    def _gram_costs(self) -> tuple[int, int]:
        """Costs (multiply-adds) of the Gram matrix over pairs of samples and by materialising."""
        k, n, t, g, o, i = self._sizes
        pairs = n * (n + 1) // 2 * g * (t * t * (i + k * o) + t * o * k * k)
        materialise = k * n * g * o * i * (t + MEMORY_COST) + (k * n) ** 2 * g * o * i
        return pairs, materialise

    def gram(self) -> Tensor:  # noqa: D102
        if self.output_grads.shape[2] == 1:
            b, x = self.output_grads[:, :, 0], self.inputs[:, 0]
            bb = torch.einsum("kngo,lmgo->gknlm", b, b)
            xx = torch.einsum("ngi,mgi->gnm", x, x)
            return (bb * xx[:, None, :, None]).sum(dim=0)
        pairs, materialise = self._gram_costs()
        if pairs < materialise:
            return self._gram_pairs()
        return self._gram_materialised()

    def _gram_pairs(self) -> Tensor:
        r"""The Gram matrix from products of inputs over pairs of samples.

        :math:`v_{k,n}^\top v_{l,m} = \sum_{g,t} b_{k,n,t,g}^\top y_{l,m,n,t,g}` with
        :math:`y_{l,m,n,t,g} = \sum_s (x_{n,t,g}^\top x_{m,s,g})\, b_{l,m,s,g}`, for the pairs
        :math:`n \leq m` only (the others are their transposes): per group, sample :math:`m`
        and block of samples :math:`n` (sized by :data:`CACHE_BYTES`, so that :math:`y` is
        used while in the cache: formed for all pairs at once it made the method memory-bound,
        3-5x slower), one matmul for the inputs' products, one for :math:`y` and one batched
        over :math:`n`. Cheaper than materialising when few positions meet large inputs
        (ResNet-18's 8 x 8 and 4 x 4 stages).
        """
        k, n, t, g, o, i = self._sizes
        b = self.output_grads
        x = self.inputs.permute(2, 0, 1, 3).reshape(g, n, t, i)
        # b of sample m as a [T, O K] matrix, and of sample n as a [K, T O] one
        right = b.permute(3, 1, 2, 4, 0).reshape(g, n, t, o * k)
        left = b.permute(3, 1, 0, 2, 4).reshape(g, n, k, t * o)
        out = b.new_zeros(n, k, n, k)
        step = max(1, min(n, CACHE_BYTES // (b.element_size() * t * o * k)))
        products_scratch = _scratch([b, x], step * t * t)
        y_scratch = _scratch([b, x], step * t * o * k)
        for group in range(g):
            for m in range(n):
                for start in range(0, m + 1, step):
                    block = slice(start, min(start + step, m + 1))
                    products = _matmul(  # [n T, s]
                        x[group, block].reshape(-1, i), x[group, m].T, products_scratch
                    )
                    y = _matmul(products, right[group, m], y_scratch).view(-1, t * o, k)
                    out[block, :, m] += torch.bmm(left[group, block], y)
        below = torch.ones(n, n, dtype=torch.bool, device=b.device).tril(-1)
        out = torch.where(below[:, None, :, None], out.permute(2, 3, 0, 1), out)
        return out.permute(1, 0, 3, 2)

    def _gram_materialised(self) -> Tensor:
        """The Gram matrix from per-sample gradients, a block of their rows at a time.

        Summing over blocks of the weight's rows (each ``K N`` gradients of ``rows x I``,
        bounded by ``max_chunk_bytes``) needs no gradient twice; each block is one batched
        matmul ``[N, K rows, T] @ [N, T, I]`` that reads the inputs in place (after a copy of
        the block of :math:`b`, much smaller) and one ``[N K, rows I]`` product with its
        transpose.
        """
        k, n, t, g, _, i = self._sizes
        b, x = self.output_grads, self.inputs
        out = b.new_zeros(n * k, n * k)
        row_bytes = b.element_size() * k * n * i
        blocks = self._row_blocks(row_bytes, min(self.max_chunk_bytes, GRAM_BLOCK_BYTES))
        scratch = _scratch([b, x], (blocks[0].stop - blocks[0].start) * k * n * i)
        for group in range(g):
            inputs = x[:, :, group]  # [N, T, I]
            for rows in blocks:
                block = b[:, :, :, group, rows].permute(1, 0, 3, 2).reshape(n, -1, t)
                gradients = _matmul(block, inputs, scratch).view(n * k, -1)
                out.addmm_(gradients, gradients.T)
        return out.view(n, k, n, k).permute(1, 0, 3, 2)

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
        k, n, t, g, o, i = self._sizes
        j = mat.shape[0]
        m = mat.reshape(j, g, o, i)
        b, x = self.output_grads, self.inputs
        out = b.new_zeros(n, k, j)
        if self._through_inputs(j):
            # Per group and chunk of samples: the inputs times every direction, [n, T, J O],
            # then one product per sample with the columns.
            for group in range(g):
                directions = m[:, group].permute(2, 0, 1).reshape(i, j * o)
                for s in self._sample_chunks(b.element_size() * t * j * o):
                    size = s.stop - s.start
                    projected = torch.matmul(x[s, :, group], directions)
                    projected = projected.view(size, t, j, o).transpose(2, 3).reshape(size, -1, j)
                    columns = b[:, s, :, group].transpose(0, 1).reshape(size, k, t * o)
                    out[s] += torch.bmm(columns, projected)
            return out.transpose(0, 1)
        # Per group and block of the weight's rows: the per-sample gradients, then their
        # products with the directions.
        row_bytes = b.element_size() * k * n * i
        blocks = self._row_blocks(row_bytes, min(self.max_chunk_bytes, GRAM_BLOCK_BYTES))
        scratch = _scratch([b, x, mat], (blocks[0].stop - blocks[0].start) * k * n * i)
        for group in range(g):
            inputs = x[:, :, group]  # [N, T, I]
            for rows in blocks:
                block = b[:, :, :, group, rows].permute(1, 0, 3, 2).reshape(n, -1, t)
                gradients = _matmul(block, inputs, scratch).view(n * k, -1)
                directions = m[:, group, rows].reshape(j, -1)
                out += (gradients @ directions.T).view(n, k, j)
        return out.transpose(0, 1)

    def mat(self, coefficients: Tensor) -> Tensor:  # noqa: D102
        k, n, t, g, o, i = self._sizes
        j = coefficients.shape[-1]
        b, x = self.output_grads, self.inputs
        if not self._through_inputs(j):
            # Per group and block of the weight's rows: the per-sample gradients, combined.
            out = b.new_zeros(j, g, o, i)
            weights = coefficients.transpose(0, 1).reshape(n * k, j)
            row_bytes = b.element_size() * k * n * i
            blocks = self._row_blocks(row_bytes, min(self.max_chunk_bytes, GRAM_BLOCK_BYTES))
            scratch = _scratch([b, x, coefficients], (blocks[0].stop - blocks[0].start) * k * n * i)
            for group in range(g):
                inputs = x[:, :, group]  # [N, T, I]
                for rows in blocks:
                    block = b[:, :, :, group, rows].permute(1, 0, 3, 2).reshape(n, -1, t)
                    gradients = _matmul(block, inputs, scratch).view(n * k, -1)
                    out[:, group, rows] = (weights.T @ gradients).view(j, -1, i)
            return out.reshape(j, *self.param_shape)
        # Columns first (J K N T G O multiply-adds), then one product with the inputs, each in
        # the layout the inputs lie in.
        if x.stride(0) == t * x.stride(1):
            # A Linear's inputs [N, T, G, I]: the combined columns [N T, J O] per group, so that
            # the product reads both in place (for one direction, no copy at all; laying them
            # out [J O, N T] instead copied the columns, a third of a language model's step).
            summed = torch.einsum("knj,kntgo->ntgjo", coefficients, b)
            out = torch.stack(
                [
                    x[:, :, group].reshape(n * t, i).T @ summed[:, :, group].reshape(n * t, -1)
                    for group in range(g)
                ]
            )
            out = out.view(g, i, j, o).permute(2, 0, 3, 1)
            return out.reshape(j, *self.param_shape)
        summed = torch.einsum("knj,kntgo->ngjot", coefficients, b)
        summed = summed.reshape(n, g, j * o, t)
        out = summed.new_zeros(g, j * o, i)
        for group in range(g):
            # A convolution's patches [N, G, I, T]: one product per sample reads them in place,
            # where merging samples and positions would copy them.
            inputs = x[:, :, group]  # [N, T, I]
            for sample in range(n):
                out[group].addmm_(summed[sample, group], inputs[sample])
        out = out.view(g, j, o, i).transpose(0, 1)
        return out.reshape(j, *self.param_shape)

    # -- KFAC's view -----------------------------------------------------------------------------

    @property
    def kronecker_outputs(self) -> tuple[int, int]:  # noqa: D102
        return tuple(self.output_grads.shape[3:])

    def output_moment(self, *, expand: bool) -> Tensor:  # noqa: D102
        return _output_moment(self.output_grads, expand)

    def _kfac_inputs(self, expand: bool, with_ones: bool) -> Tensor:
        x = self.inputs if expand else self.inputs.mean(dim=1, keepdim=True)
        return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1) if with_ones else x

    def input_moment(  # noqa: D102
        self,
        *,
        expand: bool,
        with_ones: bool,
        scale: float = 1.0,
        input_scale: Tensor | None = None,
    ) -> Tensor:
        x = self._kfac_inputs(expand, with_ones)
        return outer_sum(x if input_scale is None else x * input_scale, scale=scale)

    def input_count(self, *, expand: bool) -> int:  # noqa: D102
        n, t = self.input_shape[:2]
        return n * t if expand else n

    def rotated(self, qb: Tensor, qa: Tensor | None, *, with_ones: bool = False) -> Factor:  # noqa: D102
        b = torch.einsum("kntgo,gop->kntgp", self.output_grads, qb)
        if qa is None:
            return BiasFactor(b, torch.Size([b.shape[3] * b.shape[4]]))
        x = torch.einsum("ntgi,gij->ntgj", self._kfac_inputs(True, with_ones), qa)
        g, o, i = b.shape[3], b.shape[4], x.shape[3]
        shape = torch.Size([g, o, i])
        return KroneckerFactor(b, x, shape, max_chunk_bytes=self.max_chunk_bytes)

    def bias_part(self) -> Factor:  # noqa: D102
        b = self.output_grads
        return BiasFactor(b, torch.Size([b.shape[3] * b.shape[4]]))

    def sample_square_norms(self) -> Tensor:
        r"""The per-sample square norms, without forming the gradients where that is cheaper.

        :math:`\lVert \sum_t b_t \otimes x_t \rVert^2 = \sum_{t,s} (b_t \cdot b_s)(x_t \cdot
        x_s)`, or the formed gradients; either way a chunk of samples at a time, under
        ``max_chunk_bytes``.
        """
        b, x = self.output_grads, self.inputs
        k, _, t, g, o, i = self._sizes
        if t == 1:
            return torch.einsum("kngo,ngi->n", b[:, :, 0].square(), x[:, 0].square())
        pairwise = t * (o + i) < o * i
        per_sample = t * t * g * (k + 1) if pairwise else k * g * o * i
        parts = []
        for s in self._sample_chunks(b.element_size() * per_sample):
            bs, xs = b[:, s], x[s]
            if pairwise:
                bb = torch.einsum("kntgo,knsgo->ntsg", bs, bs)
                parts.append(torch.einsum("ntsg,ntgi,nsgi->n", bb, xs, xs))
            else:
                gradients = torch.einsum("kntgo,ntgi->kngoi", bs, xs)
                parts.append(gradients.square().sum(dim=(0, 2, 3, 4)))
        return torch.cat(parts)

    def weighted_diag(self, weights: Tensor, max_bytes: int) -> Tensor:
        r"""At one position, one contraction over :math:`(k, n)` without forming :math:`v`."""
        if self.output_grads.shape[2] != 1:
            return super().weighted_diag(weights, max_bytes)
        b, x = self.output_grads[:, :, 0], self.inputs[:, 0]
        out = torch.einsum("kn,kngo,ngi->goi", weights.to(b.dtype), b.square(), x.square())
        return out.reshape(self.param_shape)

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
