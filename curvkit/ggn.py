r"""The generalised Gauss-Newton matrix: diagonal, products, columns, dense matrix, operator.

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
the same across batches.

``data`` is one batch ``(inputs, targets)`` or an iterable of batches; for an iterable, every
quantity is that of the whole dataset's loss, batches weighted as :mod:`curvkit.data` explains,
and summed over ranks when a :mod:`torch.distributed` process group is initialised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from tqdm.auto import tqdm

from curvkit import data as data_utils
from curvkit import losses
from curvkit.data import Data, Inputs
from curvkit.engines import compute_factors, iter_factors
from curvkit.engines.compute import refuse_sample_mixing
from curvkit.engines.factor import Factor
from curvkit.groups import normalize_param_groups, parameter_names

__all__ = [
    "GGNOperator",
    "diag_ggn",
    "gauss_newton_diagonal",
    "ggn_columns",
    "ggn_matrix",
    "ggn_vector_product",
]

LossFunction = Callable[[Tensor, Any], Tensor]

#: Number of tensor entries a chunk of GGN columns or of dense factor rows may hold.
CHUNK_ELEMENTS = 2**23


# ---------------------------------------------------------------------------------------------
# public functions


def diag_ggn(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Iterable[Tensor] | None = None,
    mc_samples: int = 0,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    sample_chunk_size: int | None = None,
    column_chunk_size: int | None = None,
) -> list[Tensor]:
    r"""The diagonal of the GGN, exact or Monte-Carlo.

    .. math::

        \operatorname{diag} G = \sum_n \sum_k \big(J_n^\top s_{n,k}\big)^{\odot 2}

    with the :math:`s_{n,k}` the columns of the exact square root of the output Hessian
    (``mc_samples=0``) or of a Monte-Carlo one with ``mc_samples`` columns per sample, an unbiased
    estimate whose variance falls like ``1 / mc_samples``.

    Args:
        model: The network; ``model(inputs)`` (``model(*inputs)`` for a tuple) returns the outputs
            with the batch dimension first. Must be in a mode where samples do not interact
            (``model.eval()`` for BatchNorm).
        loss_fn: The loss ``loss_fn(outputs, targets)`` with reduction ``"mean"`` or ``"sum"``:
            ``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss`` or any convex per-sample loss
            (:func:`curvkit.losses.hessian_sqrt`).
        data: One batch ``(inputs, targets)`` or an iterable of batches (a DataLoader).
        params: The parameters, all of the model's parameters that require grad if ``None``.
        mc_samples: ``0`` for the exact diagonal, else the number of Monte-Carlo samples per
            data point.
        generator: Random number generator for the Monte-Carlo samples (on the model's device).
        progress: Show a progress bar over the batches; ``None`` shows one for long loops.
        sample_chunk_size: Bound the memory by running at most this many samples of a batch
            through the engine at once (``None``: all); see the module's notes on memory.
        column_chunk_size: Bound the memory by backpropagating at most this many columns of
            the loss Hessian's square root at once (``None``: all).

    Returns:
        The diagonal, one tensor per parameter shaped like it, in the order of ``params``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``params`` are not parameters of the model that require grad, or listed
            twice; ``mc_samples`` is negative; the loss or model is not supported.
    """
    params = _resolve_params(model, params)
    _check_common(model, loss_fn, mc_samples, generator)
    chunking = _check_chunking(sample_chunk_size, column_chunk_size)

    def batch_diagonal(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        return _summed_over_chunks(
            model,
            loss_fn,
            inputs,
            targets,
            params,
            mc_samples,
            generator,
            chunking,
            lambda factors: [factor.diag() for factor in factors],
        )

    return data_utils.dataset_average(
        loss_fn, data, batch_diagonal, progress=progress, description="diag_ggn"
    )


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
        model: The network, as for :func:`diag_ggn`.
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
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be a bool, got {type(create_graph).__name__}")
    params = _resolve_params(model, None)
    inputs, targets = data_utils.check_batch((inputs, targets))
    _, factors = _factors(
        model, loss_fn, inputs, targets, params, 0, None, create_graph=create_graph
    )
    return [factor.diag() for factor in factors]


def ggn_vector_product(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    vector: Tensor | Sequence[Tensor],
    *,
    params: Iterable[Tensor] | None = None,
    progress: bool | None = None,
) -> Tensor | list[Tensor]:
    r"""The GGN-vector product :math:`G u`.

    Computed per batch as :math:`\sum_n J_n^\top S_n S_n^\top J_n u`, without any per-sample
    work: one forward pass that also carries :math:`J u` (forward-mode AD; for operations
    without a forward-mode rule, the double-vjp trick instead); the output-space product with
    the loss Hessian's square root :math:`S` (:func:`curvkit.losses.hessian_sqrt`); one
    vector-Jacobian product back. For one vector this is about twice a gradient, and faster than
    forming the square-root factor :math:`V` and computing :math:`V (V^\top u)`
    (``benchmarks/bench_ggn.py``). To multiply by many vectors, use :class:`GGNOperator`
    (``op @ M``), which forms :math:`V` once per batch, or once for all products on one batch.

    Args:
        model: The network, as for :func:`diag_ggn`.
        loss_fn: The loss, as for :func:`diag_ggn`.
        data: One batch ``(inputs, targets)`` or an iterable of batches.
        vector: :math:`u`, a list of tensors shaped like ``params`` or one flat tensor over their
            concatenation (in order), with the parameters' dtype and device.
        params: The parameters, all of the model's parameters that require grad if ``None``.
        progress: Show a progress bar over the batches; ``None`` shows one for long loops.

    Returns:
        :math:`G u` in the form of ``vector``: a list shaped like ``params``, or a flat tensor.

    Raises:
        TypeError: If ``vector`` is neither a tensor nor a sequence of tensors.
        ValueError: If ``vector``'s shapes, dtype or device do not match the parameters, and
            for the errors of :func:`diag_ggn`.
    """
    params = _resolve_params(model, params)
    _check_common(model, loss_fn, 0, None)
    flat = isinstance(vector, Tensor)
    blocks = _vector_blocks(vector, params)

    def batch_product(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        return _autodiff_product(model, loss_fn, inputs, targets, params, blocks)

    product = data_utils.dataset_average(
        loss_fn, data, batch_product, progress=progress, description="ggn_vector_product"
    )
    return torch.cat([p.reshape(-1) for p in product]) if flat else product


def ggn_columns(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Iterable[Tensor] | None = None,
    indices: Iterable[int] | Tensor | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> Iterator[tuple[int, Tensor]]:
    r"""Exact columns :math:`G e_i` of the GGN, computed many at a time.

    Indices refer to the flat concatenation of ``params`` (:math:`D` entries). The columns come
    in chunks of ``chunk_size``: for each chunk :math:`E = [e_i]`, :math:`G E = V (V^\top E)`
    where :math:`V^\top E` just picks rows of :math:`V`. For one batch, the factors are computed
    once for all chunks; for an iterable of batches, each chunk makes one pass over the data.

    Args:
        model: The network, as for :func:`diag_ggn`.
        loss_fn: The loss, as for :func:`diag_ggn`.
        data: One batch or an iterable of batches (re-iterable if there is more than one chunk).
        params: The parameters, all of the model's parameters that require grad if ``None``.
        indices: The columns to compute, integers in ``[0, D)``, in the order to yield them; all
            ``D`` columns if ``None``.
        chunk_size: Columns per product; by default as many as keep a chunk of columns under
            :data:`CHUNK_ELEMENTS` entries.
        progress: Show a progress bar over the chunks; ``None`` shows one for long loops.

    Yields:
        Pairs ``(i, column)``, ``column`` the flat column :math:`G e_i` of :math:`D` entries.

    Raises:
        TypeError: If ``indices`` are not integers.
        ValueError: If an index is out of ``[0, D)`` or ``chunk_size`` is not positive, and for
            the errors of :func:`diag_ggn`.
    """
    params = _resolve_params(model, params)
    _check_common(model, loss_fn, 0, None)
    dim = sum(p.numel() for p in params)
    wanted = _check_indices(indices, dim)
    size = _check_chunk_size(chunk_size, dim)
    chunks = [wanted[start : start + size] for start in range(0, len(wanted), size)]
    show = data_utils.show_progress(progress, len(chunks))
    return _generate_columns(model, loss_fn, data, params, chunks, show)


def ggn_matrix(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Iterable[Tensor] | None = None,
    progress: bool | None = None,
    sample_chunk_size: int | None = None,
    column_chunk_size: int | None = None,
) -> Tensor:
    r"""The dense GGN :math:`G = V V^\top`, a :math:`D \times D` matrix.

    Rows and columns follow the flat concatenation of ``params``. The factors' columns are
    materialised in chunks of samples' columns (at most :data:`CHUNK_ELEMENTS` entries each), so
    the memory beyond :math:`G` stays bounded.

    Args:
        model: The network, as for :func:`diag_ggn`.
        loss_fn: The loss, as for :func:`diag_ggn`.
        data: One batch or an iterable of batches.
        params: The parameters, all of the model's parameters that require grad if ``None``.
        progress: Show a progress bar over the batches; ``None`` shows one for long loops.
        sample_chunk_size: As for :func:`diag_ggn`.
        column_chunk_size: As for :func:`diag_ggn`.

    Returns:
        :math:`G` with shape ``[D, D]``, the parameters' dtype and device.

    Raises:
        TypeError, ValueError: As :func:`diag_ggn`.
    """
    params = _resolve_params(model, params)
    _check_common(model, loss_fn, 0, None)
    chunking = _check_chunking(sample_chunk_size, column_chunk_size)

    def batch_matrix(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        return _summed_over_chunks(
            model,
            loss_fn,
            inputs,
            targets,
            params,
            0,
            None,
            chunking,
            lambda factors: [_gram_of_rows(factors, params)],
        )

    (matrix,) = data_utils.dataset_average(
        loss_fn, data, batch_matrix, progress=progress, description="ggn_matrix"
    )
    return matrix


class GGNOperator:
    r"""The GGN as a linear operator on flat vectors, :math:`u \mapsto G u`.

    ``op @ v`` (``v`` of shape ``[D]``) and ``op @ M`` (``M`` of shape ``[D, J]``) multiply by
    the GGN over the flat concatenation of ``params``; ``op.to_scipy()`` wraps it for
    :mod:`scipy.sparse.linalg` (``eigsh``, ``cg``, ...).

    For one batch (per rank), the factors are computed on the first product and kept, so that
    later products cost two contractions each: the operator is the GGN at the parameters' values
    of that first product (build a new operator after changing them). For an iterable of
    batches, each product makes a pass over the data (which must be re-iterable, e.g. a list or
    a DataLoader) at the parameters' current values.

    With ``mc_samples > 0`` the operator is one fixed Monte-Carlo estimate of the GGN: the random
    state is taken at construction and replayed on every pass, so that repeated products see
    the same matrix (this needs the batches to come in the same order on every pass: no
    shuffling DataLoader).

    Args:
        model: The network, as for :func:`diag_ggn`.
        loss_fn: The loss, as for :func:`diag_ggn`.
        data: One batch or an iterable of batches.
        params: The parameters, all of the model's parameters that require grad if ``None``.
        mc_samples: ``0`` for the exact GGN, else the number of Monte-Carlo samples per point.
        generator: Random number generator whose current state seeds the Monte-Carlo samples; a
            seed is drawn from the global generator if ``None``.
        progress: Show a progress bar over the batches; ``None`` shows one for long loops.

    Raises:
        TypeError, ValueError: As :func:`diag_ggn`; ``ValueError`` if ``params`` do not share one
            dtype and device.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Data,
        *,
        params: Iterable[Tensor] | None = None,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
        progress: bool | None = None,
    ) -> None:
        self._params = _resolve_params(model, params)
        _check_common(model, loss_fn, mc_samples, generator)
        first = self._params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in self._params):
            raise ValueError(
                "GGNOperator acts on one flat vector, so its parameters must share one dtype and "
                "device; pass params of one dtype and device"
            )
        self._model = model
        self._loss_fn = loss_fn
        self._data = data
        self._mc_samples = mc_samples
        self._progress = progress
        self._single_batch = data_utils.is_batch(data)
        self._cached: tuple[Tensor, list[Factor]] | None = None
        self._random_state: Tensor | None = None
        if mc_samples > 0:
            if generator is None:
                generator = torch.Generator(device=first.device)
                generator.manual_seed(int(torch.randint(2**62, ()).item()))
            self._random_state = generator.get_state()
            self._generator_device = generator.device
        dim = sum(p.numel() for p in self._params)
        self.shape = (dim, dim)
        self.dtype = first.dtype
        self.device = first.device

    def __repr__(self) -> str:
        kind = "exact" if self._mc_samples == 0 else f"Monte-Carlo ({self._mc_samples} samples)"
        return f"GGNOperator(shape={self.shape}, dtype={self.dtype}, device={self.device}, {kind})"

    def __matmul__(self, other: Tensor) -> Tensor:
        """Multiply by a flat vector ``[D]`` or a matrix ``[D, J]``."""
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.dim() not in (1, 2) or other.shape[0] != self.shape[1]:
            raise ValueError(
                f"GGNOperator of shape {self.shape} multiplies tensors of shape [{self.shape[1]}] "
                f"or [{self.shape[1]}, J], got {tuple(other.shape)}"
            )
        _check_like(other, self.dtype, self.device, "the operand")
        matrix = other if other.dim() == 2 else other.unsqueeze(1)
        result = self._matmat(matrix)
        return result if other.dim() == 2 else result.squeeze(1)

    def to_scipy(self) -> Any:
        """Return a :class:`scipy.sparse.linalg.LinearOperator` over float64 NumPy arrays.

        Inputs are converted to the operator's dtype and device, results to float64 NumPy: the
        operator is symmetric, so ``rmatvec`` is ``matvec``.
        """
        from scipy.sparse.linalg import LinearOperator

        def matmat(array: np.ndarray) -> np.ndarray:
            operand = torch.as_tensor(np.asarray(array), device=self.device).to(self.dtype)
            result = self @ operand.reshape(self.shape[1], -1)
            return result.detach().to("cpu", torch.float64).numpy()

        def matvec(array: np.ndarray) -> np.ndarray:
            return matmat(np.asarray(array).reshape(-1, 1)).reshape(-1)

        return LinearOperator(
            self.shape,
            matvec=matvec,
            rmatvec=matvec,
            matmat=matmat,
            rmatmat=matmat,
            dtype=np.float64,
        )

    def _generator(self) -> torch.Generator | None:
        if self._random_state is None:
            return None
        generator = torch.Generator(device=self._generator_device)
        generator.set_state(self._random_state)
        return generator

    def _matmat(self, matrix: Tensor) -> Tensor:
        blocks = [
            block.T.reshape(-1, *p.shape)
            for block, p in zip(
                matrix.split([p.numel() for p in self._params]), self._params, strict=True
            )
        ]
        generator = self._generator()

        def batch_product(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
            if self._cached is not None:
                outputs, factors = self._cached
            else:
                outputs, factors = _factors(
                    self._model,
                    self._loss_fn,
                    inputs,
                    targets,
                    self._params,
                    self._mc_samples,
                    generator,
                )
                if self._single_batch:
                    self._cached = (outputs, factors)
            return outputs, _matmul_factors(factors, blocks)

        product = data_utils.dataset_average(
            self._loss_fn,
            self._data,
            batch_product,
            progress=self._progress,
            description="GGNOperator",
            passes=2,
        )
        return torch.cat([p.reshape(p.shape[0], -1) for p in product], dim=1).T


# ---------------------------------------------------------------------------------------------
# factor algebra


def _factors(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Inputs,
    targets: Tensor,
    params: list[Tensor],
    mc_samples: int,
    generator: torch.Generator | None,
    *,
    create_graph: bool = False,
) -> tuple[Tensor, list[Factor]]:
    def backprop_columns(outputs: Tensor) -> Tensor:
        return losses.hessian_sqrt(
            loss_fn, outputs, targets, mc_samples=mc_samples, generator=generator
        )

    return compute_factors(model, inputs, params, backprop_columns, create_graph=create_graph)


def _summed_over_chunks(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Inputs,
    targets: Tensor,
    params: list[Tensor],
    mc_samples: int,
    generator: torch.Generator | None,
    chunking: tuple[int | None, int | None],
    quantity: Callable[[list[Factor]], list[Tensor]],
) -> tuple[Tensor, list[Tensor]]:
    r"""Return the outputs and ``quantity`` of the batch's factors, summed over column chunks.

    ``quantity`` must be a sum over the factors' columns (the diagonal, :math:`V V^\top`), so that
    chunks of samples and of columns add up to the whole batch's value.
    """
    sample_chunk_size, column_chunk_size = chunking
    if sample_chunk_size is None and column_chunk_size is None:
        outputs, factors = _factors(model, loss_fn, inputs, targets, params, mc_samples, generator)
        return outputs, quantity(factors)

    def backprop_columns(outputs: Tensor) -> Tensor:
        return losses.hessian_sqrt(
            loss_fn, outputs, targets, mc_samples=mc_samples, generator=generator
        )

    outputs_parts: list[Tensor] = []
    total: list[Tensor] | None = None
    for chunk in iter_factors(
        model,
        inputs,
        params,
        backprop_columns,
        sample_chunk_size=sample_chunk_size,
        column_chunk_size=column_chunk_size,
    ):
        if chunk.columns.start == 0:
            outputs_parts.append(chunk.outputs)
        part = quantity(chunk.factors)
        total = part if total is None else [a + b for a, b in zip(total, part, strict=True)]
    assert total is not None  # a batch has at least one sample and one column
    return torch.cat(outputs_parts), total


def _autodiff_product(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Inputs,
    targets: Tensor,
    params: list[Tensor],
    vector: list[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    r"""Return the outputs and :math:`J^\top S S^\top J u` for one batch, by plain autodiff.

    :math:`J u` comes from forward-mode AD in the same forward pass that records the graph for
    the final vector-Jacobian product. Where an operation has no forward-mode rule, the
    double-vjp trick computes it instead: :math:`J^\top w` is linear in :math:`w`, so its
    derivative with respect to :math:`w` along :math:`u` is :math:`J u`.
    """
    refuse_sample_mixing(model)
    with torch.enable_grad():
        try:
            outputs, jacobian_vector = _forward_mode_jvp(model, inputs, params, vector)
        except (RuntimeError, NotImplementedError):
            outputs, jacobian_vector = _double_vjp_jvp(model, inputs, params, vector)
        columns = losses.hessian_sqrt(loss_fn, outputs.detach(), targets)
        coefficients = (columns * jacobian_vector).flatten(start_dim=2).sum(dim=2)
        output_product = torch.einsum("kn,kn...->n...", coefficients, columns)
        product = torch.autograd.grad(
            outputs, params, output_product, allow_unused=True, materialize_grads=True
        )
    return outputs.detach(), list(product)


def _call(model: nn.Module, inputs: Inputs) -> Tensor:
    outputs = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    if not isinstance(outputs, Tensor) or outputs.dim() == 0:
        raise TypeError("the model must return one tensor whose first axis indexes the samples")
    return outputs


def _forward_mode_jvp(
    model: nn.Module, inputs: Inputs, params: list[Tensor], vector: list[Tensor]
) -> tuple[Tensor, Tensor]:
    names = parameter_names(model)
    with forward_ad.dual_level():
        duals = {
            names[id(p)]: forward_ad.make_dual(p, u) for p, u in zip(params, vector, strict=True)
        }
        primal, tangent = forward_ad.unpack_dual(torch.func.functional_call(model, duals, inputs))
    if not isinstance(primal, Tensor) or primal.dim() == 0:
        raise TypeError("the model must return one tensor whose first axis indexes the samples")
    return primal, torch.zeros_like(primal) if tangent is None else tangent


def _double_vjp_jvp(
    model: nn.Module, inputs: Inputs, params: list[Tensor], vector: list[Tensor]
) -> tuple[Tensor, Tensor]:
    outputs = _call(model, inputs)
    dummy = torch.zeros_like(outputs, requires_grad=True)
    transposed = torch.autograd.grad(outputs, params, dummy, create_graph=True, allow_unused=True)
    pairs = [
        (t, u) for t, u in zip(transposed, vector, strict=True) if t is not None and t.requires_grad
    ]
    jacobian_vector = None
    if pairs:
        (jacobian_vector,) = torch.autograd.grad(
            [t for t, _ in pairs], dummy, [u for _, u in pairs], allow_unused=True
        )
    return outputs, torch.zeros_like(outputs) if jacobian_vector is None else jacobian_vector


def _matmul_factors(factors: Sequence[Factor], blocks: Sequence[Tensor]) -> list[Tensor]:
    r"""Return :math:`V (V^\top M)` for ``M`` given per parameter as ``[J, *param_shape]``."""
    coefficients = factors[0].t_mat(blocks[0])
    for factor, block in zip(factors[1:], blocks[1:], strict=True):
        coefficients = coefficients + factor.t_mat(block)
    return [factor.mat(coefficients) for factor in factors]


def _gram_of_rows(factors: Sequence[Factor], params: Sequence[Tensor]) -> Tensor:
    r"""Return :math:`V V^\top` (``[D, D]``), materialising :math:`V` a few columns at a time."""
    num_columns, num_samples = factors[0].num_columns, factors[0].num_samples
    dim = sum(math.prod(f.param_shape) for f in factors)
    step = max(1, CHUNK_ELEMENTS // max(1, num_samples * dim))
    matrix = params[0].new_zeros(dim, dim)
    for start in range(0, num_columns, step):
        stop = min(start + step, num_columns)
        rows = torch.cat(
            [
                f.select(start, stop).dense().reshape((stop - start) * num_samples, -1)
                for f in factors
            ],
            dim=1,
        )
        matrix = matrix.addmm(rows.T, rows)
    return matrix


def _columns_of(factors: Sequence[Factor], params: Sequence[Tensor], chunk: Tensor) -> Tensor:
    """Return the GGN columns ``chunk`` (flat indices) as the rows of a ``[J, D]`` tensor."""
    like = params[0]
    sizes = [p.numel() for p in params]
    offsets = torch.tensor([0, *sizes], device=chunk.device).cumsum(0)
    owner = torch.searchsorted(offsets[1:], chunk, right=True)
    blocks = []
    for p, factor in enumerate(factors):
        selected = (owner == p).nonzero().squeeze(1)
        block = torch.zeros((len(chunk), sizes[p]), dtype=like.dtype, device=like.device)
        block[selected.to(block.device), (chunk[selected] - offsets[p]).to(block.device)] = 1
        blocks.append(block.reshape(len(chunk), *factor.param_shape))
    product = _matmul_factors(factors, blocks)
    return torch.cat([p.reshape(len(chunk), -1) for p in product], dim=1)


def _generate_columns(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    params: list[Tensor],
    chunks: list[Tensor],
    show: bool,
) -> Iterator[tuple[int, Tensor]]:
    # One batch: its factors serve every chunk. Several: keeping them all could exceed memory.
    reuse = data_utils.is_batch(data)
    cached: tuple[Tensor, list[Factor]] | None = None

    def factors_of(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Factor]]:
        nonlocal cached
        if cached is not None:
            return cached
        result = _factors(model, loss_fn, inputs, targets, params, 0, None)
        if reuse:
            cached = result
        return result

    for chunk in tqdm(chunks, desc="ggn_columns", disable=not show, leave=False):

        def batch_columns(
            inputs: Inputs, targets: Tensor, chunk: Tensor = chunk
        ) -> tuple[Tensor, list[Tensor]]:
            outputs, factors = factors_of(inputs, targets)
            return outputs, [_columns_of(factors, params, chunk)]

        (columns,) = data_utils.dataset_average(
            loss_fn, data, batch_columns, progress=False, passes=len(chunks)
        )
        yield from zip(chunk.tolist(), columns, strict=True)


# ---------------------------------------------------------------------------------------------
# validation


def _resolve_params(model: nn.Module, params: Iterable[Tensor] | None) -> list[Tensor]:
    """Validate ``params`` (one flat list of the model's parameters) with :mod:`curvkit.groups`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if params is not None and not isinstance(params, Tensor | Mapping):
        if isinstance(params, Iterable) and not isinstance(params, str | bytes):
            params = list(params)
            if any(isinstance(p, Mapping) for p in params):
                params = params[0]  # a dict: refused below with the same message
    if isinstance(params, Mapping):
        raise TypeError(
            "params takes the parameters themselves (an iterable of tensors), not param groups"
        )
    (group,) = normalize_param_groups(params, model, {})
    return group["params"]


def _check_common(
    model: nn.Module, loss_fn: LossFunction, mc_samples: int, generator: torch.Generator | None
) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int):
        raise TypeError(f"mc_samples must be an int, got {type(mc_samples).__name__}")
    if mc_samples < 0:
        raise ValueError(
            f"mc_samples must be 0 (exact) or a positive number of Monte-Carlo samples, "
            f"got {mc_samples}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _check_like(tensor: Tensor, dtype: torch.dtype, device: torch.device, name: str) -> None:
    if tensor.dtype != dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype}, but the parameters have {dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, but the parameters are on {device}")


def _vector_blocks(vector: Tensor | Sequence[Tensor], params: list[Tensor]) -> list[Tensor]:
    """Split ``vector`` (flat or per parameter) into blocks shaped like ``params``."""
    if isinstance(vector, Tensor):
        dim = sum(p.numel() for p in params)
        if vector.dim() != 1 or vector.numel() != dim:
            raise ValueError(
                f"a flat vector must have shape [{dim}] (the parameters' total size), "
                f"got {tuple(vector.shape)}"
            )
        _check_like(vector, params[0].dtype, params[0].device, "vector")
        return [
            chunk.reshape(p.shape)
            for chunk, p in zip(vector.split([p.numel() for p in params]), params, strict=True)
        ]
    if not isinstance(vector, Sequence) or isinstance(vector, str):
        raise TypeError(
            "vector must be one flat tensor or a list of tensors shaped like params, "
            f"got {type(vector).__name__}"
        )
    if len(vector) != len(params):
        raise ValueError(
            f"vector has {len(vector)} tensors, but there are {len(params)} parameters"
        )
    for i, (v, p) in enumerate(zip(vector, params, strict=True)):
        if not isinstance(v, Tensor):
            raise TypeError(f"vector[{i}] is a {type(v).__name__}, not a tensor")
        if v.shape != p.shape:
            raise ValueError(
                f"vector[{i}] has shape {tuple(v.shape)}, but its parameter has {tuple(p.shape)}"
            )
        _check_like(v, p.dtype, p.device, f"vector[{i}]")
    return list(vector)


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
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"indices must be integers, got {value!r}")
        if not 0 <= value < dim:
            raise ValueError(f"index {value} is out of range: the GGN has {dim} columns [0, {dim})")
    return torch.tensor(values, dtype=torch.long)


def _check_chunking(
    sample_chunk_size: int | None, column_chunk_size: int | None
) -> tuple[int | None, int | None]:
    for name, value in (
        ("sample_chunk_size", sample_chunk_size),
        ("column_chunk_size", column_chunk_size),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be a positive int or None, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    return sample_chunk_size, column_chunk_size


def _check_chunk_size(chunk_size: int | None, dim: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(1, dim))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return chunk_size
