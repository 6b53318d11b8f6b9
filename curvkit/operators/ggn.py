r"""The GGN as a linear operator: :class:`GGNOperator`.

The operator multiplies by :math:`G = V V^\top` through the engine's square-root factors
(:mod:`curvkit.quantities.factor_products`): for one batch, the factors are formed on the first
product and kept, so that every later product is two contractions; for an iterable of batches, each
product is one pass over the data. ``to_scipy()`` hands it to :mod:`scipy.sparse.linalg`.
``inverse(damping)`` is the exact damped inverse through the Gram matrix when that is small
(:class:`curvkit.operators.inverse.WoodburyInverse`), conjugate gradients otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curvkit.core import data as data_utils
from curvkit.core.data import Data
from curvkit.core.validation import check_damping, check_int
from curvkit.losses import LossFunction
from curvkit.operators.base import CurvatureOperator, FactorOperator
from curvkit.operators.inverse import WoodburyInverse
from curvkit.quantities.context import Params, Problem, fill_argument_docs

__all__ = ["DEFAULT_MAX_GRAM_SIZE", "GGNOperator"]

#: The largest :math:`N C'` (columns of the square-root factor, the Gram matrix's side) for which
#: :meth:`GGNOperator.inverse` factors the Gram matrix: 4096 columns are 128 MiB in float64 and a
#: Cholesky factorisation of about 2e10 flops.
DEFAULT_MAX_GRAM_SIZE = 4096


@fill_argument_docs
class GGNOperator(FactorOperator):
    r"""The GGN as a linear operator on flat vectors, :math:`u \mapsto G u`.

    ``op @ v`` (``v`` of shape ``[D]``), ``op @ M`` (``M`` of shape ``[D, J]``) and ``op @ [...]``
    (a list shaped like the parameters) multiply by the GGN over the flat concatenation of
    ``params``; ``op.to_dense()`` is the matrix; ``op.to_scipy()`` wraps it for
    :mod:`scipy.sparse.linalg` (``eigsh``, ``cg``, ...). With param groups, the operator is the
    block-diagonal GGN, one block per group.

    For one batch (per rank), the factors are computed on the first product and kept, so that
    later products cost two contractions each: the operator is the GGN at the parameters' values
    of that first product (build a new operator after changing them). For an iterable of
    batches, each product makes a pass over the data (which must be re-iterable, e.g. a list or
    a DataLoader) at the parameters' current values.

    With ``mc_samples > 0`` the operator is one fixed Monte-Carlo estimate of the GGN: the random
    state is taken at construction and replayed on every pass, so that repeated products see
    the same matrix (this needs the batches to come in the same order on every pass: a product
    over a shuffling DataLoader is refused).

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        mc_samples: {mc_samples}
        generator: Random number generator whose current state seeds the Monte-Carlo samples; a
            seed is drawn from the global generator if ``None``.
        progress: {progress}
        max_memory: {max_memory}

    Raises:
        TypeError, ValueError: As :func:`curvkit.quantities.ggn.diag_ggn`; ``ValueError`` if
        ``params`` do
            not share one dtype and device.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Data,
        *,
        params: Params = None,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
        progress: bool | None = None,
        max_memory: int | None = None,
    ) -> None:
        problem = Problem(
            model,
            loss_fn,
            data,
            params,
            mc_samples=mc_samples,
            generator=generator,
            progress=progress,
            max_memory=max_memory,
            name="GGNOperator",
        )
        self._set_problem(problem, generator=generator)

    def __repr__(self) -> str:
        mc_samples = self._problem.mc_samples
        kind = "exact" if mc_samples == 0 else f"Monte-Carlo ({mc_samples} samples)"
        return f"GGNOperator(shape={self.shape}, dtype={self.dtype}, device={self.device}, {kind})"

    def inverse(
        self, damping: float, *, method: str | None = None, **options: Any
    ) -> CurvatureOperator:
        r"""Return :math:`(G + \delta I)^{-1}`, exactly through the Gram matrix when it is small.

        ``method="woodbury"`` (:class:`curvkit.operators.inverse.WoodburyInverse`) uses

        .. math::

            (V V^\top + \delta I)^{-1} = \frac1\delta \big(I - V (\delta I + V^\top V)^{-1}
            V^\top\big)

        per parameter group, with the :math:`N C' \times N C'` Gram matrix :math:`V^\top V`
        factored once: exact, and each product costs about two GGN products. It needs
        :math:`N C' \le` ``max_gram_size`` (:data:`DEFAULT_MAX_GRAM_SIZE`). With data of several
        batches (or several ``torch.distributed`` ranks), the batches are joined into one batch
        of all samples (:func:`curvkit.core.data.concatenate`: the dataset's loss, so the same GGN),
        whose factors are held in memory; with ``mc_samples > 0`` that would draw a different
        Monte-Carlo GGN than the operator's batch-by-batch one, so it is refused.

        ``method=None`` picks ``"woodbury"`` for one batch on one rank when
        :math:`N C' \le` ``max_gram_size``, and ``"cg"`` otherwise; ``"cg"`` and ``"neumann"``
        are as for every operator (:meth:`CurvatureOperator.inverse`).

        Args:
            damping: :math:`\delta` (``> 0`` for ``"woodbury"``).
            method: ``None``, ``"woodbury"``, ``"cg"`` or ``"neumann"``.
            **options: ``max_gram_size`` for ``"woodbury"`` (and ``None``); the options of
                ``"cg"`` and ``"neumann"`` otherwise.

        Returns:
            The inverse operator.

        Raises:
            ValueError: If ``"woodbury"`` is asked for and :math:`N C'` exceeds
                ``max_gram_size`` (use ``"cg"``), with several batches and Monte-Carlo
                samples, or with a damping that is not positive.
            TypeError: For options the chosen method does not take.
        """
        if method not in (None, "woodbury"):
            return super().inverse(damping, method=method, **options)
        max_gram_size = check_int(
            options.pop("max_gram_size", DEFAULT_MAX_GRAM_SIZE), "max_gram_size", minimum=1
        )
        problem = self._problem
        one_batch = data_utils.is_batch(problem.data) and data_utils.distributed_world() == 1
        if method is None and not one_batch:
            return super().inverse(damping, method="cg", **options)
        if options:
            raise TypeError(
                f"the Woodbury inverse{' (chosen by method=None)' if method is None else ''} "
                f"takes only max_gram_size, got {sorted(options)}; pass method='cg' for "
                "conjugate gradients with these options"
            )
        damping = check_damping(
            damping,
            positive=True,
            why=(
                "the GGN is singular whenever D > N C' (its rank is at most the number of "
                "columns of its square root), so its inverse needs a damping; pass damping > 0"
                if method is None
                else "the Woodbury inverse divides by it; pass damping > 0, or method='cg' "
                "for a positive definite GGN"
            ),
        )
        if not one_batch and problem.mc_samples > 0:
            raise ValueError(
                "method='woodbury' joins the batches into one, which would draw other "
                "Monte-Carlo samples than this operator's batch-by-batch GGN; use method='cg'"
            )
        self._replay_generator()
        inputs, targets = problem.concatenated_batch()
        _, factors = problem.factors(inputs, targets, reuse=one_batch)
        num_samples, num_columns = factors[0].num_samples, factors[0].num_columns
        size = num_samples * num_columns
        if size > max_gram_size:
            if method is None:
                return super().inverse(damping, method="cg")
            raise ValueError(
                f"the Woodbury inverse factors the Gram matrix of N*C' = {num_samples}*"
                f"{num_columns} = {size} columns, above max_gram_size={max_gram_size}; use "
                "method='cg' (or raise max_gram_size, for a Gram matrix of "
                f"{size**2 * self.dtype.itemsize / 2**30:.2g} GiB)"
            )
        return WoodburyInverse(self, problem.by_group(factors), damping)
