r"""The base class of curvkit's linear operators: :class:`CurvatureOperator`.

A subclass sets ``shape``, ``dtype`` and ``device`` and overrides one method, :meth:`_matmat`
(the product with a ``[D, J]`` matrix). Everything else is written once here: ``op @ v`` and
``op @ M`` on flat tensors or on lists shaped like the parameters, the dense matrix
(:meth:`to_dense`, in column chunks), and the SciPy wrapper (:meth:`to_scipy`). Structured
operators (Kronecker factors, the Gram matrix) override further methods where it pays.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["CurvatureOperator"]

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

    def _fix_random_state(self, generator: torch.Generator | None) -> None:
        """Take the random state now, so that every pass draws the same Monte-Carlo samples.

        Args:
            generator: The user's generator (its current state is taken), or ``None`` for a
                seed drawn from the global generator.
        """
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(torch.randint(2**62, ()).item()))
        self._random_state: Tensor | None = generator.get_state()
        self._generator_device = generator.device

    def _replayed_generator(self) -> torch.Generator | None:
        """A generator in the state :meth:`_fix_random_state` took (``None`` if it was not)."""
        state = getattr(self, "_random_state", None)
        if state is None:
            return None
        generator = torch.Generator(device=self._generator_device)
        generator.set_state(state)
        return generator

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
        name = type(self).__name__
        if other.dim() not in (1, 2) or other.shape[0] != self.shape[1]:
            raise ValueError(
                f"{name} of shape {self.shape} multiplies tensors of shape [{self.shape[1]}] "
                f"or [{self.shape[1]}, J], got {tuple(other.shape)}"
            )
        self._check_operand(other)
        matrix = other if other.dim() == 2 else other.unsqueeze(1)
        result = self._matmat(matrix)
        return result if other.dim() == 2 else result.squeeze(1)

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
        a product (the GGN: :math:`\lVert V^\top u \rVert^2`) overrides this method.
        """
        return (matrix * (self @ matrix)).sum(0)

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
        # Imported here: curvkit.operators.inverse defines subclasses of this class.
        from curvkit.operators.inverse import inverse

        return inverse(self, damping, method=method or "cg", **options)

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
