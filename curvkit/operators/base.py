r"""The base classes of the linear operators: :class:`CurvatureOperator`, :class:`DataOperator`.

A :class:`CurvatureOperator` sets ``shape``, ``dtype`` and ``device`` and overrides one method,
:meth:`~CurvatureOperator._matmat` (the product with a ``[D, J]`` matrix). Everything else is
written once here: ``op @ v`` and ``op @ M`` on flat tensors or on lists shaped like the
parameters, the checks of the operand's shape, dtype and device, the dense matrix
(:meth:`~CurvatureOperator.to_dense`, in column chunks), the SciPy wrapper
(:meth:`~CurvatureOperator.to_scipy`) and the damped inverse. Structured operators (Kronecker
factors, the Gram matrix) override further methods where it pays.

A :class:`DataOperator` is a curvature of the loss of some data (the GGN, the empirical Fisher,
the Hessian): its product is a sum over batches and ``torch.distributed`` ranks. It owns that
data loop: the split of the operand into parameter-shaped blocks, the replay of the Monte-Carlo
random state (so that every product sees the same matrix), the reduce over batches and ranks
(:meth:`curvkit.quantities.context.Problem.reduce`) and the concatenation of the result. A
subclass writes only the product of one batch, :meth:`DataOperator._batch_product`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvkit.core.data import Inputs
from curvkit.quantities.context import Problem
from curvkit.quantities.factor_products import block_diagonal_matmul

__all__ = ["CurvatureOperator", "DataOperator", "FactorOperator"]

#: Builds :math:`(A + \delta I)^{-1}` by an iterative method:
#: :func:`curvkit.operators.inverse.inverse`, which hands itself over when it is imported (its
#: inverses are subclasses of :class:`CurvatureOperator`, so this module cannot import it).
#: ``curvkit.operators`` imports it, so it is set whenever this module is.
_iterative_inverse: Callable[..., CurvatureOperator] | None = None


def use_iterative_inverse(build: Callable[..., CurvatureOperator]) -> None:
    """Set the function :meth:`CurvatureOperator.inverse` hands iterative methods to."""
    global _iterative_inverse
    _iterative_inverse = build


#: Entries of the ``[D, J]`` operand :meth:`CurvatureOperator.to_dense` multiplies at once.
DENSE_CHUNK_ELEMENTS = 2**24


class CurvatureOperator(ABC):
    r"""A symmetric linear operator on the flat concatenation of some parameters.

    Subclasses set :attr:`shape` ``(D, D)``, :attr:`dtype`, :attr:`device` and
    :attr:`param_shapes` (the shapes of the parameters, in order, whose flat concatenation is
    the operator's domain), and implement :meth:`_matmat`.

    Attributes:
        shape: ``(D, D)``.
        dtype: The dtype of operands and results.
        device: The device of operands and results.
        param_shapes: The parameters' shapes, in the order of the flat vector.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    param_shapes: list[torch.Size]

    def _set_domain(self, params: Sequence[Tensor]) -> None:
        """Act on the flat concatenation of ``params``: set the shape, dtype, device and shapes.

        Raises:
            ValueError: If ``params`` do not share one dtype and device.
        """
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            raise ValueError(
                f"{type(self).__name__} acts on one flat vector, so its parameters must share "
                "one dtype and device; pass params of one dtype and device"
            )
        dim = sum(p.numel() for p in params)
        self.shape = (dim, dim)
        self.dtype = first.dtype
        self.device = first.device
        self.param_shapes = [p.shape for p in params]

    @abstractmethod
    def _matmat(self, matrix: Tensor) -> Tensor:
        """Return the product with ``matrix`` ``[D, J]`` (dtype and device checked), ``[D, J]``."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )

    def __matmul__(self, other: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Multiply by a flat vector ``[D]``, a matrix ``[D, J]``, or a list like the parameters.

        A list holds one tensor per parameter, each of the parameter's shape (one vector) or of
        shape ``[*param.shape, J]`` (``J`` vectors); the result is a list of the same shapes.
        """
        if isinstance(other, (list, tuple)):
            return self._matmul_list(list(other))
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.dim() not in (1, 2) or other.shape[0] != self.shape[1]:
            raise ValueError(
                f"{type(self).__name__} of shape {self.shape} multiplies tensors of shape "
                f"[{self.shape[1]}] or [{self.shape[1]}, J], got {tuple(other.shape)}"
            )
        self._check_operand(other)
        matrix = other if other.dim() == 2 else other.unsqueeze(1)
        result = self._matmat(matrix)
        return result if other.dim() == 2 else result.squeeze(1)

    def _checked_matrix(self, matrix: Tensor, name: str) -> Tensor:
        """``matrix`` after checking it is ``[D, J]`` of the operator's dtype and device."""
        if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != self.shape[1]:
            raise ValueError(
                f"{name} takes a [{self.shape[1]}, J] matrix, got "
                f"{tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__}"
            )
        self._check_operand(matrix)
        return matrix

    def _check_operand(self, other: Tensor) -> None:
        if other.dtype != self.dtype or other.device != self.device:
            raise ValueError(
                f"{type(self).__name__} acts on tensors of dtype {self.dtype} on {self.device}; "
                f"the operand has dtype {other.dtype} on {other.device} (convert it with "
                f"`.to({self.dtype}, device='{self.device}')`)"
            )

    def _matmul_list(self, blocks: list[Tensor]) -> list[Tensor]:
        name = type(self).__name__
        if not all(isinstance(block, Tensor) for block in blocks):
            raise TypeError(f"{name} multiplies a list of tensors shaped like the parameters")
        if len(blocks) != len(self.param_shapes):
            raise ValueError(
                f"{name} acts on {len(self.param_shapes)} parameters; got a list of "
                f"{len(blocks)} tensors"
            )
        first = blocks[0]
        single = isinstance(first, Tensor) and first.shape == self.param_shapes[0]
        columns = []
        for i, (block, shape) in enumerate(zip(blocks, self.param_shapes, strict=True)):
            expected = shape if single else (*shape, first.shape[-1])
            if tuple(block.shape) != tuple(expected):
                raise ValueError(
                    f"entry {i} of the list must have shape {tuple(expected)} (the parameter's "
                    f"shape{'' if single else ', then the number of vectors'}), "
                    f"got {tuple(block.shape)}"
                )
            self._check_operand(block)
            columns.append(block.reshape(shape.numel(), -1))
        result = self._matmat(torch.cat(columns))
        sizes = [shape.numel() for shape in self.param_shapes]
        return [
            part.reshape(shape) if single else part.reshape(*shape, -1)
            for part, shape in zip(result.split(sizes), self.param_shapes, strict=True)
        ]

    def quadratic_forms(self, matrix: Tensor) -> Tensor:
        r"""Return :math:`u_j^\top A u_j` for the columns :math:`u_j` of ``matrix`` ``[D, J]``.

        Hutchinson's trace estimator needs only these; an operator that has them for less than
        a product (the GGN: :math:`\lVert V^\top u \rVert^2`) overrides :meth:`_quadratic_forms`.

        Args:
            matrix: ``[D, J]``, of the operator's dtype and device.

        Returns:
            ``[J]``.

        Raises:
            ValueError: For an operand of another shape, dtype or device.
        """
        return self._quadratic_forms(self._checked_matrix(matrix, "quadratic_forms"))

    def _quadratic_forms(self, matrix: Tensor) -> Tensor:
        """The forms of the columns of a checked ``[D, J]`` matrix."""
        return (matrix * self._matmat(matrix)).sum(0)

    def inverse(
        self, damping: float, *, method: str | None = None, **options: Any
    ) -> CurvatureOperator:
        r"""Return the damped inverse :math:`(A + \delta I)^{-1}` as an operator.

        The result is a :class:`CurvatureOperator` on the same domain (``inv @ v``, ``inv @ M``,
        ``inv @ [...]``); after each product its ``info`` holds the iterations and residuals
        (:class:`curvkit.operators.inverse.SolveInfo`). Nothing is computed before the first
        product, except what the method needs once (Neumann's scale, a Woodbury factorisation).

        Args:
            damping: :math:`\delta`, added to the diagonal.
            method: ``"cg"`` (conjugate gradients, the default here), ``"neumann"`` (a Neumann
                series), or one an operator adds (the GGN's exact ``"woodbury"``); see
                :mod:`curvkit.operators.inverse`.
            **options: The method's options: ``tol``, ``atol``, ``max_iters`` for ``"cg"``;
                ``scale``, ``max_iters``, ``tol`` for ``"neumann"``.

        Returns:
            The inverse operator.

        Raises:
            TypeError, ValueError: For an unknown method or option, or a damping out of range.
        """
        assert _iterative_inverse is not None, "curvkit.operators.inverse was not imported"
        return _iterative_inverse(self, damping, method=method or "cg", **options)

    def to_dense(self) -> Tensor:
        """Return the ``[D, D]`` matrix, multiplying by identity columns a chunk at a time."""
        dim = self.shape[1]
        chunk = max(1, DENSE_CHUNK_ELEMENTS // max(dim, 1))
        eye = torch.eye(dim, dtype=self.dtype, device=self.device)
        return torch.cat([self._matmat(eye[:, j : j + chunk]) for j in range(0, dim, chunk)], 1)

    def to_scipy(self) -> Any:
        """Return a :class:`scipy.sparse.linalg.LinearOperator` over float64 NumPy arrays.

        Inputs are converted to the operator's dtype and device, results to float64 NumPy: the
        operator is symmetric, so ``rmatvec`` is ``matvec``.

        Raises:
            ImportError: If SciPy is not installed.
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as error:
            raise ImportError(
                f"{type(self).__name__}.to_scipy needs SciPy: pip install scipy"
            ) from error

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


class DataOperator(CurvatureOperator):
    r"""An operator that is a sum over the data: :math:`A = \sum_b A_b` over batches and ranks.

    A subclass builds its call context (:class:`~curvkit.quantities.context.Problem`), calls
    :meth:`_set_problem`, and writes :meth:`_batch_product`, the product of one batch's curvature
    with the operand's parameter-shaped blocks. :meth:`_matmat` (and :meth:`_reduce`, for other
    per-batch quantities such as the GGN's quadratic forms) run it over the data.

    The call context (model, loss, data, parameters and settings) is ``self._problem``.
    """

    _problem: Problem

    def _set_problem(self, problem: Problem, *, generator: torch.Generator | None = None) -> None:
        """Act on ``problem``'s parameters; fix the random state if it draws Monte-Carlo samples.

        Args:
            problem: The call context.
            generator: The user's generator, whose current state seeds the Monte-Carlo samples
                (a seed is drawn from the global generator if ``None``).
        """
        self._problem = problem
        self._set_domain(problem.params)
        self._random_state: Tensor | None = None
        if problem.mc_samples > 0:
            if generator is None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(int(torch.randint(2**62, ()).item()))
            self._random_state = generator.get_state()
            self._generator_device = generator.device

    def _replay_generator(self) -> None:
        """Give the problem a generator in the state taken at construction (the same samples).

        Every pass over the data draws its Monte-Carlo samples anew from this state, so that the
        operator is one matrix, whatever it multiplies and however often.
        """
        if self._random_state is None:
            return
        generator = torch.Generator(device=self._generator_device)
        generator.set_state(self._random_state)
        self._problem.generator = generator

    def _param_blocks(self, matrix: Tensor) -> list[Tensor]:
        """Split ``[D, J]`` into one ``[J, *param.shape]`` block per parameter."""
        sizes = [shape.numel() for shape in self.param_shapes]
        return [
            block.T.reshape(-1, *shape)
            for block, shape in zip(matrix.split(sizes), self.param_shapes, strict=True)
        ]

    def _reduce(
        self, batch_quantity: Callable[[Inputs, Tensor], tuple[Tensor, list[Tensor]]]
    ) -> list[Tensor]:
        """``batch_quantity`` summed over the batches and ranks, with the random state replayed.

        Operators multiply many times, so the data is read as several passes (a one-shot
        iterator is refused, and data that changes between passes too).
        """
        self._replay_generator()
        return self._problem.reduce(batch_quantity, passes=2)

    def _batch_product(self, inputs: Inputs, targets: Tensor, blocks: list[Tensor]) -> Any:
        """The product of one batch's curvature with ``blocks`` ``[J, *param.shape]``.

        Every operator whose product is a sum over batches writes this; one whose data loop
        builds something else (KFAC's factors) overrides :meth:`_matmat` instead.

        Args:
            inputs: The batch's inputs.
            targets: The batch's targets.
            blocks: The operand, one ``[J, *param.shape]`` block per parameter.

        Returns:
            ``(outputs, products)``: the batch's outputs (for the batch's weight in the average)
            and one ``[J, *param.shape]`` product per parameter.
        """
        raise NotImplementedError(f"{type(self).__name__} multiplies by its own _matmat")

    def _matmat(self, matrix: Tensor) -> Tensor:
        blocks = self._param_blocks(matrix)
        product = self._reduce(lambda inputs, targets: self._batch_product(inputs, targets, blocks))
        return torch.cat([p.reshape(p.shape[0], -1) for p in product], dim=1).T


class FactorOperator(DataOperator):
    r"""An operator :math:`V V^\top` of the call context's square-root factors, per group.

    The GGN (columns: the loss Hessian's square root) and the empirical Fisher (columns: the
    scaled gradients) differ only in the columns their call context pushes back; one batch's
    product is :math:`V (V^\top u)` and its quadratic forms are :math:`\lVert V^\top u \rVert^2`,
    block-diagonal over the parameter groups. For one batch the factors are kept after the first
    product (:meth:`curvkit.quantities.context.Problem.factors` with ``reuse``).
    """

    def _batch_product(
        self, inputs: Inputs, targets: Tensor, blocks: list[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        problem = self._problem
        outputs, factors = problem.factors(inputs, targets, reuse=True)
        return outputs, block_diagonal_matmul(problem.by_group(factors), problem.by_group(blocks))

    def _quadratic_forms(self, matrix: Tensor) -> Tensor:
        r"""The forms :math:`u_j^\top V V^\top u_j = \lVert V^\top u_j \rVert^2` of the columns.

        Half the work of a product: only :math:`V^\top U`, summed over the groups' blocks.
        """
        problem = self._problem
        blocks = self._param_blocks(matrix)

        def batch_forms(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
            outputs, factors = problem.factors(inputs, targets, reuse=True)
            forms = matrix.new_zeros(matrix.shape[1])
            for group_factors, group_blocks in zip(
                problem.by_group(factors), problem.by_group(blocks), strict=True
            ):
                coefficients = sum(
                    f.t_mat(b) for f, b in zip(group_factors, group_blocks, strict=True)
                )
                forms = forms + coefficients.square().sum((0, 1))
            return outputs, [forms]

        return self._reduce(batch_forms)[0]
