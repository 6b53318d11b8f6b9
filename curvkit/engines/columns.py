r"""Column sources: what the engine pushes back from a batch's outputs, in one kind of object.

Every quantity pushes columns :math:`s_{n,k}` back through the network and reads the factors
:math:`v_{k,n} = J_n^\top s_{n,k}` (:mod:`curvkit.engines.factor`). What the columns are is the
one thing that differs between them, and it is said here, once per kind:

- :class:`LossHessianSqrt`: the loss Hessian's square root, exact or Monte-Carlo
  (:func:`curvkit.losses.hessian_sqrt`): the GGN, its diagonal, products, KFAC's ``"exact"`` and
  ``"mc"`` Fisher;
- :class:`LossGradient`: the loss gradient at the outputs times a scale, one column: per-sample
  gradients, the empirical Fisher, KFAC's ``"empirical"`` Fisher;
- :class:`ZeroColumns`: one zero column, for KFAC's ``"forward-only"`` (only the inputs count);
- :class:`FixedColumns`: columns given as a tensor or built by a function of the outputs.

A source is made for one batch (it holds the targets) and handed to the engine
(:func:`curvkit.engines.iter_factors`) once. It carries its own memory plan
(:class:`~curvkit.engines.memory.MemoryPlan`): the refusal of columns beyond the budget before
they are built, and the number of columns per backward pass; and its own slicing: exact square
roots that a sum over chunks needs a slice at a time are built a slice at a time
(:class:`~curvkit.engines.memory.ColumnSlices`). The engine asks the source, never the caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvkit import losses
from curvkit.engines.memory import ColumnSlices, MemoryPlan
from curvkit.ops.linalg import without_negligible

__all__ = [
    "ColumnSource",
    "FixedColumns",
    "LossGradient",
    "LossHessianSqrt",
    "ZeroColumns",
]


class ColumnSource(ABC):
    """The columns of one batch, their memory plan and their slicing.

    Args:
        memory: The call's memory plan (``None``: no budget, no refusal).
        whole: Whether the quantity needs all columns at once (a Gram matrix, factors kept for
            several products); otherwise a sum over chunks of columns (a diagonal, a product)
            may build them a slice at a time.
    """

    #: Whether :meth:`build` can build a slice of the columns alone (cheaper than all of them).
    sliceable = False

    def __init__(self, memory: MemoryPlan | None = None, *, whole: bool = True) -> None:
        self.memory = memory
        self.whole = whole

    @abstractmethod
    def count(self, outputs: Tensor, rows: int) -> int:
        """How many columns :meth:`build` makes for outputs with ``rows`` rows per sample."""

    @abstractmethod
    def build(self, outputs: Tensor, rows: int, columns: slice | None) -> Tensor:
        """The columns ``columns`` (``None``: all), ``[K', *outputs.shape]``.

        For outputs that hold each sample in ``rows > 1`` consecutive rows
        (:mod:`curvkit.core.model_io`), the engine reads a column's restriction to a sample's
        rows as one column of that sample.
        """

    def columns(self, outputs: Tensor, num_samples: int) -> Tensor | ColumnSlices:
        """What the engine pushes back, checked against the memory plan before it is built.

        Raises:
            curvkit.engines.memory.MemoryPlanError: Before building columns beyond the plan.
        """
        rows = outputs.shape[0] // num_samples
        whole = self.whole or not self.sliceable
        if self.memory is not None:
            self.memory.check_columns(outputs, self.count(outputs, rows), whole=whole)
        if whole:
            return self.build(outputs, rows, None)

        def build(columns: slice) -> Tensor:
            return self.build(outputs, rows, columns)

        return ColumnSlices(build, self.count(outputs, rows), outputs)

    def chunk_size(self, num_columns: int, bytes_per_column: int, device: torch.device) -> int:
        """Columns per backward pass, with the engine's bytes per column (memory plan).

        Raises:
            curvkit.engines.memory.MemoryPlanError: If not even one column fits, or all columns
                are needed at once and do not fit.
        """
        if self.memory is None:
            return num_columns
        return self.memory.column_chunk_size(
            num_columns, bytes_per_column, device, whole=self.whole
        )


class LossHessianSqrt(ColumnSource):
    """The loss Hessian's square root: exact (one column per output entry) or Monte-Carlo.

    Monte-Carlo columns are independent across rows, so one column covers all positions of a
    sequence at once. Exact columns are not: each row's columns are kept apart (:math:`K T`
    columns, each nonzero at one position per sample).

    Args:
        loss_fn: The loss.
        targets: The batch's targets.
        mc_samples: ``0`` for the exact square root, else the Monte-Carlo samples.
        generator: Random number generator for the Monte-Carlo samples.
        memory: As for :class:`ColumnSource`.
        whole: As for :class:`ColumnSource`.
    """

    def __init__(
        self,
        loss_fn: losses.LossFunction,
        targets: Any,
        *,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
        memory: MemoryPlan | None = None,
        whole: bool = True,
    ) -> None:
        super().__init__(memory, whole=whole)
        self.loss_fn = loss_fn
        self.targets = targets
        self.mc_samples = mc_samples
        self.generator = generator
        self.sliceable = mc_samples == 0

    def count(self, outputs: Tensor, rows: int) -> int:  # noqa: D102
        count = losses.num_sqrt_columns(outputs, self.mc_samples)
        return count if self.mc_samples > 0 else count * rows

    def build(self, outputs: Tensor, rows: int, columns: slice | None) -> Tensor:
        """The columns, entries too small to matter set to zero.

        These columns only enter quantities as sums of squares, so
        :func:`curvkit.ops.linalg.without_negligible` applies (first-order columns keep every
        entry).
        """
        return without_negligible(
            self._square_root(outputs, rows, columns), outputs.shape[0] // rows
        )

    def _square_root(self, outputs: Tensor, rows: int, columns: slice | None) -> Tensor:
        loss_fn, targets = self.loss_fn, self.targets
        if self.mc_samples > 0:
            return losses.hessian_sqrt(
                loss_fn, outputs, targets, mc_samples=self.mc_samples, generator=self.generator
            )
        if rows == 1:
            return losses.hessian_sqrt(loss_fn, outputs, targets, columns=columns)
        start, stop, _ = (columns or slice(None)).indices(self.count(outputs, rows))
        first, last = start // rows, (stop - 1) // rows + 1
        sqrt = losses.hessian_sqrt(loss_fn, outputs, targets, columns=slice(first, last))
        per_position = sqrt.reshape(sqrt.shape[0], -1, rows, *outputs.shape[1:])
        separate = sqrt.new_zeros(sqrt.shape[0], rows, *per_position.shape[1:])
        separate.diagonal(dim1=1, dim2=3).copy_(per_position.movedim(2, -1))
        offset = first * rows
        return separate.reshape(-1, *outputs.shape)[start - offset : stop - offset]


def output_gradient(loss_fn: losses.LossFunction, outputs: Tensor, targets: Any) -> Tensor:
    r""":math:`\partial L / \partial f` of the batch loss at the outputs, shaped like them."""
    outputs = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = losses.scalar_loss(loss_fn, outputs, targets)
        (gradient,) = torch.autograd.grad(loss, outputs, allow_unused=True, materialize_grads=True)
    return gradient


class LossGradient(ColumnSource):
    r"""One column: the batch loss's gradient at the outputs times ``scale(loss_fn, f, y)``.

    One column serves every output layout: for outputs holding each sample in several rows, the
    engine reads its restriction to a sample's rows as that sample's column, whose pull-back is
    the sample's whole gradient.

    Args:
        loss_fn: The loss.
        targets: The batch's targets.
        scale: Maps ``(loss_fn, outputs, targets)`` to a 0-dim factor; ``None`` for 1.
        memory: As for :class:`ColumnSource`.
    """

    def __init__(
        self,
        loss_fn: losses.LossFunction,
        targets: Any,
        scale: Callable[[losses.LossFunction, Tensor, Any], Tensor] | None = None,
        *,
        memory: MemoryPlan | None = None,
    ) -> None:
        super().__init__(memory, whole=True)
        self.loss_fn = loss_fn
        self.targets = targets
        self.scale = scale

    def count(self, outputs: Tensor, rows: int) -> int:  # noqa: D102
        return 1

    def build(self, outputs: Tensor, rows: int, columns: slice | None) -> Tensor:  # noqa: D102
        gradient = output_gradient(self.loss_fn, outputs, self.targets)
        if self.scale is not None:
            gradient = gradient * self.scale(self.loss_fn, outputs.detach(), self.targets)
        return gradient.unsqueeze(0)[columns or slice(None)]


class ZeroColumns(ColumnSource):
    """One zero column: the backward pass is trivial, the factors' inputs are what counts."""

    def count(self, outputs: Tensor, rows: int) -> int:  # noqa: D102
        return 1

    def build(self, outputs: Tensor, rows: int, columns: slice | None) -> Tensor:  # noqa: D102
        return outputs.new_zeros(1, *outputs.shape)


class FixedColumns(ColumnSource):
    """Columns given as a tensor ``[K, *outputs.shape]`` or built by ``columns(outputs)``.

    Args:
        columns: The tensor, or a function of the detached outputs that returns it.
        memory: As for :class:`ColumnSource` (the chunks per backward pass).
        whole: As for :class:`ColumnSource`.
    """

    def __init__(
        self,
        columns: Tensor | Callable[[Tensor], Any],
        *,
        memory: MemoryPlan | None = None,
        whole: bool = True,
    ) -> None:
        super().__init__(memory, whole=whole)
        self._columns = columns

    def count(self, outputs: Tensor, rows: int) -> int:  # noqa: D102
        return self.build(outputs, rows, None).shape[0]

    def build(self, outputs: Tensor, rows: int, columns: slice | None) -> Tensor:  # noqa: D102
        built = self._columns if isinstance(self._columns, Tensor) else self._columns(outputs)
        return built if columns is None else built[columns]

    def columns(self, outputs: Tensor, num_samples: int) -> Any:
        """The given columns, as they are (no memory check: they exist already)."""
        return self.build(outputs, 1, None)
