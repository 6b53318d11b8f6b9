r"""The generalised Gauss-Newton matrix: diagonal, products, columns and dense matrix.

For a batch of :math:`N` samples with model outputs :math:`f_n`, the GGN of the batch loss
:math:`L` with respect to the parameters :math:`\theta` is

.. math::

    G = \sum_n J_n^\top H_n J_n = V V^\top,
    \qquad H_n = \frac{\partial^2 L}{\partial f_n^2} = S_n S_n^\top,
    \qquad V = \big[J_n^\top s_{n,k}\big]_{n,k},

with :math:`J_n` the Jacobian of :math:`f_n` with respect to :math:`\theta` and :math:`S_n`
the square root of the loss Hessian in output space (:func:`curvkit.losses.hessian_sqrt`, the
reduction folded in). The engine (:func:`curvkit.engines.compute_factors`) runs the model forward
once and pushes all columns of :math:`S` back in one batched backward pass; it hands out
:math:`V` per parameter as structured :class:`~curvkit.engines.factor.Factor` blocks, and every
function here is a cheap function of those blocks:

- diagonal: :math:`\operatorname{diag} G = \sum_{n,k} v_{n,k} \odot v_{n,k}`;
- products: :math:`G u = V (V^\top u)`, and :math:`G M = V (V^\top M)` for many vectors at once;
- columns: :math:`G e_i` for a chunk of unit vectors :math:`e_i` per product;
- dense matrix: :math:`V V^\top`.

With ``mc_samples = M > 0``, :math:`S_n` is replaced by a Monte-Carlo square root with
:math:`M` columns and :math:`\mathbb E[S_n S_n^\top] = H_n`: an unbiased estimate of the GGN
(the "Monte-Carlo GGN", for the losses of exponential families the empirical-free Fisher).

Memory: the engine holds, per batch, the inputs of the layers and the backpropagated columns
(:math:`K` per sample: the number of classes for cross-entropy, ``mc_samples`` for Monte-Carlo);
per-sample intermediates are bounded by :data:`curvkit.engines.DEFAULT_CHUNK_BYTES`. For sums
over the columns of :math:`V` (:func:`diag_ggn`, :func:`ggn_matrix`), ``sample_chunk_size`` and
``column_chunk_size`` split a batch into chunks that run one after the other
(:func:`curvkit.engines.iter_factors`), with the same result; smaller batches in ``data`` do
the same across batches. Without them, the columns come in chunks that fit ``max_memory``, and
work that cannot fit is refused before it starts (:mod:`curvkit.engines.memory`).

``data`` is one batch ``(inputs, targets)`` or an iterable of batches; for an iterable, every
quantity is that of the whole dataset's loss, batches weighted as :mod:`curvkit.core.data` explains,
and summed over ranks when a :mod:`torch.distributed` process group is initialised.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from curvkit import _moved
from curvkit.core import data as data_utils
from curvkit.core.data import Data, Inputs
from curvkit.core.validation import check_int
from curvkit.engines import Factor
from curvkit.engines.autodiff import ggn_product
from curvkit.losses import LossFunction
from curvkit.quantities.context import Params, Problem, fill_argument_docs
from curvkit.quantities.factor_products import (
    CHUNK_ELEMENTS,
    block_diagonal_matmul,
    gram_of_rows,
    unit_blocks,
)

__all__ = [
    "diag_ggn",
    "gauss_newton_diagonal",
    "ggn_columns",
    "ggn_matrix",
    "ggn_vector_product",
]


@fill_argument_docs
def diag_ggn(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Params = None,
    mc_samples: int = 0,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    sample_chunk_size: int | None = None,
    column_chunk_size: int | None = None,
    max_memory: int | None = None,
) -> list[Tensor] | list[list[Tensor]]:
    r"""The diagonal of the GGN, exact or Monte-Carlo.

    .. math::

        \operatorname{diag} G = \sum_n \sum_k \big(J_n^\top s_{n,k}\big)^{\odot 2}

    with the :math:`s_{n,k}` the columns of the exact square root of the output Hessian
    (``mc_samples=0``) or of a Monte-Carlo one with ``mc_samples`` columns per sample, an unbiased
    estimate whose variance falls like ``1 / mc_samples``.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        mc_samples: {mc_samples}
        generator: {generator}
        progress: {progress}
        sample_chunk_size: {sample_chunk_size}
        column_chunk_size: {column_chunk_size}
        max_memory: {max_memory}

    Returns:
        The diagonal, one tensor per parameter shaped like it, in the order of ``params`` (one
        list per group when ``params`` are groups).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``params`` are not parameters of the model that require grad, or listed
            twice; ``mc_samples`` is negative; the loss or model is not supported.
    """
    problem = Problem(
        model,
        loss_fn,
        data,
        params,
        mc_samples=mc_samples,
        generator=generator,
        progress=progress,
        sample_chunk_size=sample_chunk_size,
        column_chunk_size=column_chunk_size,
        max_memory=max_memory,
        name="diag_ggn",
    )
    diagonal = problem.reduce(problem.summed_over_chunks(lambda fs: [f.diag() for f in fs]))
    return problem.per_group(diagonal)


@fill_argument_docs
def gauss_newton_diagonal(
    model: nn.Module,
    loss_fn: nn.MSELoss,
    inputs: Inputs,
    targets: Tensor,
    *,
    create_graph: bool = False,
) -> list[Tensor]:
    r"""The Gauss-Newton diagonal of a least-squares loss, optionally differentiable.

    For :class:`torch.nn.MSELoss` the output Hessian is :math:`2 r I` (:math:`r = 1/(N C)` for
    ``reduction="mean"`` with :math:`N C` = ``outputs.numel()``, :math:`r = 1` for ``"sum"``), so

    .. math::

        \operatorname{diag} G = 2 r \operatorname{diag}\big(J^\top J\big)
        = 2 r \sum_n \sum_c \Big(\frac{\partial f_{n,c}}{\partial \theta}\Big)^{\odot 2}.

    Tools that call :math:`\operatorname{diag}(J^\top J)` "the Gauss-Newton diagonal" differ from
    this result by the factor :math:`2 / (N C)` for ``"mean"`` and :math:`2` for ``"sum"``: divide
    by it to get theirs. The result equals :func:`diag_ggn` for this loss.

    Args:
        model: {model}
        loss_fn: A :class:`torch.nn.MSELoss` with reduction ``"mean"`` or ``"sum"``.
        inputs: The batch's inputs, a tensor or a tuple of tensors.
        targets: The regression targets, shaped like the outputs.
        create_graph: Keep the result differentiable with respect to the parameters (to
            optimise a function of the curvature, for instance).

    Returns:
        The diagonal for all of the model's parameters that require grad, one tensor per
        parameter shaped like it.

    Raises:
        ValueError: If ``loss_fn`` is not an ``MSELoss`` (use :func:`diag_ggn`, which supports
            any convex loss), or the model has no parameter requiring grad.
        TypeError: If ``create_graph`` is not a bool.
    """
    if not isinstance(loss_fn, nn.MSELoss):
        raise ValueError(
            "gauss_newton_diagonal is the least-squares Gauss-Newton diagonal and needs an "
            f"nn.MSELoss, got {type(loss_fn).__name__}; use curvkit.diag_ggn for other losses"
        )
    batch = data_utils.check_batch((inputs, targets))
    problem = Problem(model, loss_fn, batch, create_graph=create_graph)
    return problem.reduce(problem.summed_over_chunks(lambda fs: [f.diag() for f in fs]))


@fill_argument_docs
def ggn_vector_product(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    vector: Tensor | Sequence[Tensor] | Sequence[Sequence[Tensor]],
    *,
    params: Params = None,
    progress: bool | None = None,
) -> Tensor | list[Tensor] | list[list[Tensor]]:
    r"""The GGN-vector product :math:`G u`.

    Computed per batch as :math:`\sum_n J_n^\top S_n S_n^\top J_n u`, without any per-sample
    work (:mod:`curvkit.engines.autodiff`): one forward pass that also carries :math:`J u`, the
    output-space product with the loss Hessian's square root, one vector-Jacobian product back.
    For one vector this is about twice a gradient, and faster than forming the square-root
    factor :math:`V` and computing :math:`V (V^\top u)` (``benchmarks/bench_ggn.py``). To
    multiply by many vectors, use :class:`~curvkit.operators.ggn.GGNOperator` (``op @ M``), which
    forms :math:`V` once per batch, or once for all products on one batch. With param groups,
    each group's diagonal block multiplies the group's part of :math:`u` (one pass per group).

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        vector: :math:`u`: one flat tensor over the concatenation of the parameters (in order),
            or tensors shaped like them (with groups, one list per group), with the
            parameters' dtype and device.
        params: {params}
        progress: {progress}

    Returns:
        :math:`G u` in the form of ``vector``.

    Raises:
        TypeError: If ``vector`` is neither a tensor nor a sequence of tensors.
        ValueError: If ``vector``'s shapes, dtype or device do not match the parameters, and
            for the errors of :func:`diag_ggn`.
    """
    problem = Problem(model, loss_fn, data, params, progress=progress, name="ggn_vector_product")
    blocks = problem.by_group(problem.split_vector(vector))

    def batch_product(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        products = [
            ggn_product(model, loss_fn, inputs, targets, group["params"], group_blocks)
            for group, group_blocks in zip(problem.groups, blocks, strict=True)
        ]
        return products[0][0], [p for _, group_products in products for p in group_products]

    product = problem.reduce(batch_product)
    if isinstance(vector, Tensor):
        return torch.cat([p.reshape(-1) for p in product])
    return problem.per_group(product)


@fill_argument_docs
def ggn_columns(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Params = None,
    indices: Iterable[int] | Tensor | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_memory: int | None = None,
) -> Iterator[tuple[int, Tensor]]:
    r"""Exact columns :math:`G e_i` of the GGN, computed many at a time.

    Indices refer to the flat concatenation of ``params`` (:math:`D` entries). The columns come
    in chunks of ``chunk_size``: for each chunk :math:`E = [e_i]`, :math:`G E = V (V^\top E)`
    where :math:`V^\top E` just picks rows of :math:`V`. For one batch, the factors are computed
    once for all chunks; for an iterable of batches, each chunk makes one pass over the data.
    With param groups, the columns are those of the block-diagonal GGN (zero outside the
    column's group).

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data} Re-iterable if there is more than one chunk.
        params: {params}
        indices: The columns to compute, integers in ``[0, D)``, in the order to yield them; all
            ``D`` columns if ``None``.
        chunk_size: Columns per product; by default as many as keep a chunk of columns under
            :data:`~curvkit.quantities.factor_products.CHUNK_ELEMENTS` entries.
        progress: Show a progress bar over the chunks; ``None`` shows one for long loops.
        max_memory: {max_memory}

    Yields:
        Pairs ``(i, column)``, ``column`` the flat column :math:`G e_i` of :math:`D` entries.

    Raises:
        TypeError: If ``indices`` are not integers.
        ValueError: If an index is out of ``[0, D)`` or ``chunk_size`` is not positive, and for
            the errors of :func:`diag_ggn`.
    """
    problem = Problem(model, loss_fn, data, params, max_memory=max_memory, name="ggn_columns")
    dim = sum(p.numel() for p in problem.params)
    wanted = _check_indices(indices, dim)
    size = _check_columns_chunk_size(chunk_size, dim)
    chunks = [wanted[start : start + size] for start in range(0, len(wanted), size)]
    show = data_utils.show_progress(progress, len(chunks))
    return _generate_columns(problem, chunks, show)


@fill_argument_docs
def ggn_matrix(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Params = None,
    progress: bool | None = None,
    sample_chunk_size: int | None = None,
    column_chunk_size: int | None = None,
    max_memory: int | None = None,
) -> Tensor | list[Tensor]:
    r"""The dense GGN :math:`G = V V^\top`, a :math:`D \times D` matrix.

    Rows and columns follow the flat concatenation of ``params``. The factors' columns are
    materialised in chunks of samples' columns (at most
    :data:`~curvkit.quantities.factor_products.CHUNK_ELEMENTS` entries each), so the memory beyond
    :math:`G` stays bounded.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        progress: {progress}
        sample_chunk_size: {sample_chunk_size}
        column_chunk_size: {column_chunk_size}
        max_memory: {max_memory}

    Returns:
        :math:`G` with shape ``[D, D]``, the parameters' dtype and device; with param groups,
        one diagonal block ``[D_g, D_g]`` per group.

    Raises:
        TypeError, ValueError: As :func:`diag_ggn`.
    """
    problem = Problem(
        model,
        loss_fn,
        data,
        params,
        progress=progress,
        sample_chunk_size=sample_chunk_size,
        column_chunk_size=column_chunk_size,
        max_memory=max_memory,
        name="ggn_matrix",
    )
    blocks = problem.reduce(
        problem.summed_over_chunks(lambda fs: [gram_of_rows(g) for g in problem.by_group(fs)])
    )
    return blocks if problem.grouped else blocks[0]


def _columns_of(problem: Problem, factors: list[Factor], chunk: Tensor) -> Tensor:
    """The GGN columns ``chunk`` (flat indices) as the rows of a ``[J, D]`` tensor."""
    blocks = unit_blocks([p.shape for p in problem.params], chunk, problem.params[0])
    product = block_diagonal_matmul(problem.by_group(factors), problem.by_group(blocks))
    return torch.cat([p.reshape(len(chunk), -1) for p in product], dim=1)


def _generate_columns(
    problem: Problem, chunks: list[Tensor], show: bool
) -> Iterator[tuple[int, Tensor]]:
    for chunk in tqdm(chunks, desc="ggn_columns", disable=not show, leave=False):

        def batch_columns(
            inputs: Inputs, targets: Tensor, chunk: Tensor = chunk
        ) -> tuple[Tensor, list[Tensor]]:
            outputs, factors = problem.factors(inputs, targets, reuse=True)
            return outputs, [_columns_of(problem, factors, chunk)]

        (columns,) = problem.reduce(batch_columns, passes=len(chunks))
        yield from zip(chunk.tolist(), columns, strict=True)


def _check_indices(indices: Iterable[int] | Tensor | None, dim: int) -> Tensor:
    if indices is None:
        return torch.arange(dim)
    if isinstance(indices, Tensor):
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be integers, got a tensor of {indices.dtype}")
        values = indices.detach().reshape(-1).cpu().tolist()
    else:
        values = list(indices)
    for value in values:
        check_int(value, "indices")
        if not 0 <= value < dim:
            raise ValueError(f"index {value} is out of range: the GGN has {dim} columns [0, {dim})")
    return torch.tensor(values, dtype=torch.long)


def _check_columns_chunk_size(chunk_size: int | None, dim: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(1, dim))
    return check_int(chunk_size, "chunk_size", minimum=1)


def __getattr__(name: str) -> object:
    """``GGNOperator`` lives in :mod:`curvkit.operators.ggn`; its old path keeps working."""
    return _moved.moved_attribute(__name__, name)
