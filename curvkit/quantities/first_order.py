r"""First-order statistics: per-sample gradients, their norms and variance, the empirical Fisher.

They all come from one column per sample pushed back through the network: the gradient of the
loss with respect to the sample's outputs, :math:`\partial L / \partial f_n`. The engine turns it
into the per-sample gradients :math:`g_n = J_n^\top \partial L / \partial f_n` as structured
factors (:mod:`curvkit.engines`), one per parameter with :math:`K = 1` column per sample, so
that sums over samples never form the :math:`g_n` of a Linear or convolution weight:

- :func:`diag_ef`: :math:`\sum_n g_n \odot g_n` is the factor's diagonal, one matmul of inner
  size :math:`N` for a Linear weight;
- :class:`curvkit.operators.ef.EFOperator`: :math:`F u = V (V^\top u)`;
- :func:`batch_l2_norms`: :math:`\lVert g_n \rVert^2` from the norms of the factor's two sides
  (:math:`\lVert b_n \otimes x_n \rVert^2 = \lVert b_n \rVert^2 \lVert x_n \rVert^2`);
- :func:`gradient_variance`: the diagonal and the gradient :math:`\sum_n g_n`;
- :func:`batch_gradients`: the :math:`g_n` themselves, in chunks of samples.

Scales. For a batch loss :math:`L = \frac{1}{Z} \sum_n \ell_n` (:math:`Z = 1` for ``"sum"``,
:func:`curvkit.losses.normalization` for ``"mean"``), the per-sample gradients are those of the
batch loss, :math:`g_n = \nabla \ell_n / Z`, so that they sum to :math:`\nabla L` (BackPACK's
``BatchGrad``). The empirical Fisher is scaled as curvlinops' ``EFLinearOperator``:

.. math::

    F = \frac{1}{R} \sum_n \nabla \ell_n \nabla \ell_n^\top = R \sum_n g_n g_n^\top

with :math:`R = 1` for ``"sum"`` and, for ``"mean"``, :math:`R` = the number of output entries
for ``MSELoss`` and ``BCEWithLogitsLoss``, the number of predictions (samples times positions)
for ``CrossEntropyLoss`` (curvlinops' convention, also with class weights or ignored targets),
and :math:`R = Z` for any other loss. Over several batches, every quantity is that of the loss of
all the data (:mod:`curvkit.core.data`; per-sample quantities keep one row per sample of every
batch, in order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvkit import _moved, losses
from curvkit.core import data as data_utils
from curvkit.core.data import BatchQuantity, Data, Inputs
from curvkit.core.model_io import sample_layout
from curvkit.engines import Factor
from curvkit.losses import LossFunction
from curvkit.quantities.context import Params, Problem, fill_argument_docs

__all__ = ["batch_gradients", "batch_l2_norms", "diag_ef", "gradient_variance"]


def _output_gradient(loss_fn: LossFunction, outputs: Tensor, targets: Tensor) -> Tensor:
    r""":math:`\partial L / \partial f` of the batch loss, shape ``[1, *outputs.shape]``."""
    outputs = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = losses.scalar_loss(loss_fn, outputs, targets)
        (gradient,) = torch.autograd.grad(loss, outputs, allow_unused=True, materialize_grads=True)
    return gradient.unsqueeze(0)


def ef_scale(loss_fn: LossFunction, outputs: Tensor, targets: Tensor) -> Tensor:
    r"""The factor :math:`R` of the empirical Fisher :math:`F = R \sum_n g_n g_n^\top`.

    See the module docstring: curvlinops' convention for ``MSELoss``, ``CrossEntropyLoss`` and
    ``BCEWithLogitsLoss``, :func:`curvkit.losses.normalization` for any other loss.

    Returns:
        :math:`R` as a 0-dim tensor of the outputs' dtype and device.
    """
    reduction = getattr(loss_fn, "reduction", None)
    torch_losses = (nn.MSELoss, nn.BCEWithLogitsLoss, nn.CrossEntropyLoss)
    if isinstance(loss_fn, torch_losses) and reduction in ("mean", "sum"):
        if reduction == "sum":
            count = 1
        elif isinstance(loss_fn, nn.CrossEntropyLoss):
            count = outputs.numel() // outputs.shape[1] if outputs.dim() > 1 else 1
        else:
            count = outputs.numel()
        return torch.tensor(count, dtype=outputs.dtype, device=outputs.device)
    return losses.normalization(loss_fn, outputs, targets)


class _GradientProblem(Problem):
    """A problem whose columns are the loss gradient at the outputs, times a scale.

    ``scale(loss_fn, outputs, targets)``: :func:`ef_scale`'s square root for the empirical
    Fisher, :func:`curvkit.losses.normalization` for the gradients of the sum of the terms.
    """

    def __init__(
        self, *args: Any, scale: Callable[[LossFunction, Tensor, Tensor], Tensor], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale

    def num_columns(self, outputs: Tensor, rows: int) -> int:
        """One column, whatever the output layout (see :meth:`build_columns`)."""
        return 1

    def build_columns(
        self, outputs: Tensor, targets: Tensor, rows: int, columns: slice | None
    ) -> Tensor:
        """The scaled gradient column, ``[1, *outputs.shape]``.

        One column serves every output layout: for outputs holding each sample in several rows,
        the engine reads its restriction to a sample's rows as that sample's column, whose
        pull-back is the sample's whole gradient.
        """
        scale = self.scale(self.loss_fn, outputs, targets)
        return (_output_gradient(self.loss_fn, outputs, targets) * scale)[columns or slice(None)]


def _sqrt_ef_scale(loss_fn: LossFunction, outputs: Tensor, targets: Tensor) -> Tensor:
    return ef_scale(loss_fn, outputs, targets).sqrt()


def _sqrt_normalization(loss_fn: LossFunction, outputs: Tensor, targets: Tensor) -> Tensor:
    return losses.normalization(loss_fn, outputs, targets).sqrt()


class _EFProblem(_GradientProblem):
    r"""The empirical Fisher's problem: :math:`R` is that of all the data, not of each batch.

    With :math:`S_b = \sum_{n \in b} \nabla \ell_n \nabla \ell_n^\top` and the data's
    :math:`R = \sum_b R_b`, :math:`Z = \sum_b Z_b`, the empirical Fisher of the data's loss is
    :math:`F = R S / Z^2`, :math:`S = \sum_b S_b`. A lone batch pushes back
    :math:`\sqrt{R}\, \partial L / \partial f` (:math:`V V^\top = R S / Z^2` at once). Over
    several batches (or ranks) each batch pushes back :math:`\sqrt{Z_b}\, \partial L_b /
    \partial f` (:math:`V V^\top = S_b / Z_b`), whose reduce is :math:`S / Z`, and adds
    :math:`R_b / Z_b`, whose reduce is :math:`R / Z` (for a loss that averages; for one that
    sums :math:`R = Z = 1`); their product is :math:`F`. Averaging per-batch Fishers
    :math:`R_b S_b / Z_b^2` instead is wrong whenever :math:`R_b / Z_b` differs between
    batches (class weights, unevenly ignored targets).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, scale=_sqrt_ef_scale, **kwargs)
        if not _single_batch(self.data):
            self.scale = _sqrt_normalization

    def reduce(self, batch_quantity: BatchQuantity, *, passes: int = 1) -> list[Tensor]:
        """:meth:`Problem.reduce`, with the data's scale :math:`R / Z` applied at the end."""
        if _single_batch(self.data):
            return super().reduce(batch_quantity, passes=passes)
        reductions: list[str] = []

        def with_ratio(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
            outputs, quantity = batch_quantity(inputs, targets)
            scale = ef_scale(self.loss_fn, outputs, targets)
            normalizer = losses.normalization(self.loss_fn, outputs, targets)
            reductions.append(losses.sample_reduction(self.loss_fn, outputs, targets))
            ratio = (scale / normalizer).to(quantity[0].dtype).reshape(1)
            return outputs, [*quantity, ratio]

        *result, ratio = super().reduce(with_ratio, passes=passes)
        if reductions[0] == "sum":
            return result
        return [t * ratio[0] for t in result]


def ef_problem(
    model: nn.Module, loss_fn: LossFunction, data: Data, params: Params, name: str, **kwargs: Any
) -> _GradientProblem:
    """The call context whose columns are the empirical Fisher's (:class:`_EFProblem`)."""
    return _EFProblem(model, loss_fn, data, params, name=name, **kwargs)


@fill_argument_docs
def diag_ef(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Params = None,
    progress: bool | None = None,
    sample_chunk_size: int | None = None,
) -> list[Tensor] | list[list[Tensor]]:
    r"""The diagonal of the empirical Fisher, :math:`R \sum_n g_n \odot g_n`.

    Scaled as curvlinops' ``EFLinearOperator`` (module docstring): the same numbers after
    migrating. Computed from the per-sample gradients' structured factors: for a Linear weight
    :math:`\sum_n (b_n \odot b_n)(x_n \odot x_n)^\top`, without the per-sample gradients.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        progress: {progress}
        sample_chunk_size: {sample_chunk_size}

    Returns:
        The diagonal, one tensor per parameter shaped like it (one list per group with groups).

    Raises:
        TypeError, ValueError: As :func:`curvkit.quantities.ggn.diag_ggn`.
    """
    problem = ef_problem(
        model,
        loss_fn,
        data,
        params,
        "diag_ef",
        progress=progress,
        sample_chunk_size=sample_chunk_size,
    )
    diagonal = problem.reduce(problem.summed_over_chunks(lambda fs: [f.diag() for f in fs]))
    return problem.per_group(diagonal)


# -- per-sample quantities -------------------------------------------------------------------


def _gradient_sum(factor: Factor, param: Tensor) -> Tensor:
    r""":math:`\sum_{k,n} v_{k,n}`, shaped like the parameter."""
    ones = torch.ones(factor.num_columns, factor.num_samples, 1, dtype=param.dtype)
    return factor.mat(ones.to(param.device))[0]


def _single_batch(data: Data) -> bool:
    return data_utils.is_batch(data) and data_utils.distributed_world() == 1


def _unit_scale(loss_fn: LossFunction, outputs: Tensor, targets: Tensor) -> Tensor:
    return torch.ones((), dtype=outputs.dtype, device=outputs.device)


def _per_sample_problem(
    model: nn.Module, loss_fn: LossFunction, data: Data, params: Params, name: str, **kwargs: Any
) -> _GradientProblem:
    r"""The problem whose columns are each batch's loss gradient :math:`\partial L_b / \partial f`.

    Its factors hold each batch's per-sample gradients; :meth:`Problem.reduce` rescales them to
    those of the data's loss (:func:`curvkit.core.data.dataset_average`).
    """
    return _GradientProblem(model, loss_fn, data, params, name=name, scale=_unit_scale, **kwargs)


@fill_argument_docs
def batch_gradients(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Params = None,
    progress: bool | None = None,
    sample_chunk_size: int | None = None,
) -> list[Tensor] | list[list[Tensor]]:
    r"""The per-sample gradients :math:`g_n`, which sum to the gradient of the loss.

    As BackPACK's ``BatchGrad``: :math:`g_n = \nabla \ell_n / Z` for a loss
    :math:`L = \frac1Z \sum_n \ell_n`. Over several batches, :math:`Z` is that of all the data
    and the samples of every batch come one after the other. A Linear or convolution weight's
    :math:`g_n = \sum_t b_{n,t} \otimes x_{n,t}` is one batched contraction. Memory: the result
    holds :math:`N D` numbers; ``sample_chunk_size`` bounds everything else.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        progress: {progress}
        sample_chunk_size: {sample_chunk_size}

    Returns:
        One tensor ``[N, *param.shape]`` per parameter (one list per group with groups),
        :math:`N` the number of samples of all batches.

    Raises:
        TypeError, ValueError: As :func:`curvkit.quantities.ggn.diag_ggn`.
    """
    problem = _per_sample_problem(
        model,
        loss_fn,
        data,
        params,
        "batch_gradients",
        progress=progress,
        sample_chunk_size=sample_chunk_size,
    )
    per_sample = problem.joined_over_chunks(lambda fs: [f.dense()[0] for f in fs])
    return problem.per_group(problem.reduce(per_sample, concatenate=True))


@fill_argument_docs
def batch_l2_norms(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Params = None,
    progress: bool | None = None,
    sample_chunk_size: int | None = None,
) -> list[Tensor] | list[list[Tensor]]:
    r"""The squared norms :math:`\lVert g_n \rVert^2` of the per-sample gradients, per parameter.

    As BackPACK's ``BatchL2Grad`` (which also returns squared norms), with :math:`g_n` as in
    :func:`batch_gradients`. A Linear weight's norms are
    :math:`\lVert b_n \rVert^2 \lVert x_n \rVert^2`, without forming :math:`g_n`.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        progress: {progress}
        sample_chunk_size: {sample_chunk_size}

    Returns:
        One tensor ``[N]`` per parameter (one list per group with groups).

    Raises:
        TypeError, ValueError: As :func:`curvkit.quantities.ggn.diag_ggn`.
    """
    problem = _per_sample_problem(
        model,
        loss_fn,
        data,
        params,
        "batch_l2_norms",
        progress=progress,
        sample_chunk_size=sample_chunk_size,
    )
    per_sample = problem.joined_over_chunks(lambda fs: [f.sample_square_norms() for f in fs])
    norms = problem.reduce(per_sample, powers=[2] * len(problem.params), concatenate=True)
    return problem.per_group(norms)


@fill_argument_docs
def gradient_variance(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    *,
    params: Params = None,
    progress: bool | None = None,
    sample_chunk_size: int | None = None,
) -> list[Tensor] | list[list[Tensor]]:
    r"""The elementwise variance of the samples' gradients, as BackPACK's ``Variance``.

    With :math:`h_n` the gradient of sample :math:`n`'s loss at the loss's own scale
    (:math:`h_n = N g_n` for ``"mean"``, :math:`h_n = g_n` for ``"sum"``, :math:`N` samples),

    .. math::

        \operatorname{Var} = \frac1N \sum_n h_n \odot h_n - \bar h \odot \bar h,
        \qquad \bar h = \frac1N \sum_n h_n,

    from the factors' diagonal and the gradient: no per-sample gradient of a Linear weight.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        progress: {progress}
        sample_chunk_size: {sample_chunk_size}

    Returns:
        One tensor per parameter shaped like it (one list per group with groups).

    Raises:
        TypeError, ValueError: As :func:`curvkit.quantities.ggn.diag_ggn`.
    """
    problem = _per_sample_problem(
        model,
        loss_fn,
        data,
        params,
        "gradient_variance",
        progress=progress,
        sample_chunk_size=sample_chunk_size,
    )
    sums = problem.summed_over_chunks(
        lambda fs: [
            t
            for f, p in zip(fs, problem.params, strict=True)
            for t in (f.diag(), _gradient_sum(f, p))
        ]
    )
    reductions: list[str] = []

    def batch_sums(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        outputs, parts = sums(inputs, targets)
        reductions.append(losses.sample_reduction(loss_fn, outputs, targets))
        count = sample_layout(inputs, outputs)[0]
        return outputs, [*parts, torch.tensor(float(count), dtype=torch.float64)]

    # Squares scale with the loss squared, gradients linearly, the sample count not at all.
    *totals, count = problem.reduce(batch_sums, powers=[2, 1] * len(problem.params) + [0])
    num = count.item()
    scale = num if reductions[0] == "mean" else 1.0
    variance = [
        square_sum * (scale**2 / num) - (gradient_sum * (scale / num)).square()
        for square_sum, gradient_sum in zip(totals[::2], totals[1::2], strict=True)
    ]
    return problem.per_group(variance)


def __getattr__(name: str) -> object:
    """``EFOperator`` moved up to :mod:`curvkit.operators.ef`; its old path keeps working."""
    return _moved.moved_attribute(__name__, name)
