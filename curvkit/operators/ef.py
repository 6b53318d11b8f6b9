r"""The empirical Fisher as a linear operator: :class:`EFOperator`.

Its columns are the per-sample gradients (:mod:`curvkit.quantities.first_order`), scaled as
curvlinops' ``EFLinearOperator``: :math:`F u = R \sum_n g_n (g_n^\top u) = V (V^\top u)`.
"""

from __future__ import annotations

from torch import nn

from curvkit.core.data import Data
from curvkit.losses import LossFunction
from curvkit.operators.base import FactorOperator
from curvkit.quantities.context import Params, fill_argument_docs
from curvkit.quantities.first_order import ef_problem

__all__ = ["EFOperator"]


@fill_argument_docs
class EFOperator(FactorOperator):
    r"""The empirical Fisher as a linear operator, :math:`u \mapsto R \sum_n g_n g_n^\top u`.

    Scaled as curvlinops' ``EFLinearOperator`` (:mod:`curvkit.quantities.first_order`), with
    the interface of :class:`~curvkit.operators.ggn.GGNOperator`: ``op @ v``, ``op @ M``,
    ``op @ [...]``, ``op.to_dense()``, ``op.to_scipy()``. For one batch, the per-sample
    gradients' factors are formed on the first product and kept (the operator is the empirical
    Fisher at the parameters' values then); for an iterable of batches, each product is a pass
    over the data. With param groups, the operator is block diagonal, one block per group.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        progress: {progress}

    Raises:
        TypeError, ValueError: As :func:`curvkit.quantities.first_order.diag_ef`; ``ValueError``
            if ``params`` do not share one dtype and device.
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
        self._set_problem(ef_problem(model, loss_fn, data, params, "EFOperator", progress=progress))
