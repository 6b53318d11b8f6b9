r"""The Hessian of the loss as a linear operator: :class:`HessianOperator`.

Its products are double backward passes (:mod:`curvkit.quantities.hessian`), all columns of an
operand batched into one pass per batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvkit.core.data import Data, Inputs
from curvkit.losses import LossFunction
from curvkit.operators.base import DataOperator
from curvkit.quantities.context import Params, Problem, fill_argument_docs
from curvkit.quantities.hessian import batch_hessian_products

__all__ = ["HessianOperator"]


@fill_argument_docs
class HessianOperator(DataOperator):
    r"""The Hessian as a linear operator on flat vectors, :math:`u \mapsto \nabla^2_\theta L\, u`.

    ``op @ v`` (``[D]``), ``op @ M`` (``[D, J]``, all :math:`J` products in one batched double
    backward pass per batch) and ``op @ [...]`` (a list shaped like the parameters);
    ``op.to_dense()`` and ``op.to_scipy()`` as for :class:`~curvkit.operators.ggn.GGNOperator`.
    Each product is a pass over the data at the parameters' current values (an iterable of
    batches must be re-iterable). With param groups, the operator is the block-diagonal Hessian.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        progress: {progress}

    Raises:
        TypeError, ValueError: As :func:`curvkit.quantities.hessian.hessian_vector_product`;
            ``ValueError`` if ``params`` do not share one dtype and device, and on a product
            inside ``torch.inference_mode()`` (which no double backward can run in).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Data,
        *,
        params: Params = None,
        progress: bool | None = None,
    ) -> None:
        self._set_problem(Problem(model, loss_fn, data, params, progress=progress, name="Hessian"))

    def _matmat(self, matrix: Tensor) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise ValueError(
                "HessianOperator's products are double backward passes, which cannot run inside "
                "torch.inference_mode(): multiply (or call the estimators) outside it, e.g. "
                "under torch.no_grad() instead"
            )
        return super()._matmat(matrix)

    def _batch_product(
        self, inputs: Inputs, targets: Tensor, blocks: list[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        return batch_hessian_products(self._problem, inputs, targets, list(blocks))
