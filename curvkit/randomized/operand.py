"""The operator that a randomized method takes, checked once: :class:`Operand`.

Every estimator (:mod:`curvkit.randomized.estimators`) and spectral method
(:mod:`curvkit.randomized.spectral`) takes a symmetric operator: a curvkit operator, a dense
tensor, or any object with ``shape`` and ``@`` on ``[D, J]`` matrices. This module validates it,
decides the dtype and device of the random vectors, draws them, and checks every product.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from curvkit.ops.linalg import all_finite

__all__ = ["DISTRIBUTIONS", "MatrixLike", "Operand", "check_distribution"]

#: The distributions of the random vectors' entries.
DISTRIBUTIONS = ("rademacher", "normal")


class MatrixLike(Protocol):
    """An operator with ``shape`` ``(D, D)`` and ``@`` on ``[D, J]`` tensors."""

    shape: Any

    def __matmul__(self, other: Tensor) -> Tensor: ...


def check_distribution(distribution: str) -> str:
    """Return ``distribution`` after checking it is one of :data:`DISTRIBUTIONS`."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be 'rademacher' or 'normal', got {distribution!r}")
    return distribution


def _resolve(own: Any, given: Any, what: str, name: str) -> Any:
    """The operator's own dtype or device; the argument only for an operator without one."""
    if own is not None and given is not None and given != own:
        raise ValueError(
            f"{name}: {what}={given} differs from the operator's {what} {own}; the random "
            f"vectors take the operator's {what} (the argument applies to operators without "
            f"one): leave {what}=None, or convert the operator"
        )
    return own if own is not None else given


class Operand:
    """A validated square operator: its dimension, dtype and device, random vectors, products.

    The dtype and device are the operator's own; ``dtype`` and ``device`` apply to operators
    without them (else float64 on the CPU), and an argument that contradicts the operator's own
    is refused. Every product is checked for its shape and for finite entries.

    Args:
        operator: A square operator with ``shape`` and ``@`` on ``[D, J]`` tensors.
        name: The calling function's name, for error messages.
        dtype: The dtype for an operator without one.
        device: The device for an operator without one.

    Raises:
        TypeError: For an operator without ``shape`` and ``@``, or of a dtype that is not
            floating point.
        ValueError: For a non-square or empty operator, or a ``dtype``/``device`` argument that
            differs from the operator's.
    """

    def __init__(
        self,
        operator: MatrixLike,
        name: str,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        shape = getattr(operator, "shape", None)
        if shape is None or not hasattr(operator, "__matmul__"):
            raise TypeError(
                f"{name} needs an operator with `shape` and `@` (a curvkit operator, a tensor, "
                f"or any such object), got {type(operator).__name__}"
            )
        shape = tuple(shape)
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
            raise ValueError(f"{name} needs a square, non-empty operator, got shape {shape}")
        self.operator = operator
        self.name = name
        self.dim = int(shape[0])
        self.dtype = _resolve(getattr(operator, "dtype", None), dtype, "dtype", name)
        self.dtype = self.dtype or torch.float64
        own_device = getattr(operator, "device", None)
        device = None if device is None else torch.device(device)
        own_device = None if own_device is None else torch.device(own_device)
        self.device = _resolve(own_device, device, "device", name) or torch.device("cpu")
        if not self.dtype.is_floating_point:
            raise TypeError(
                f"{name} needs a floating-point operator (its random vectors and products are "
                f"real numbers), got dtype {self.dtype}: convert it, e.g. `A.to(torch.float64)`"
            )

    def check_generator(self, generator: torch.Generator | None) -> torch.Generator | None:
        """Return ``generator`` after checking it draws on the operator's device type."""
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(
                f"the generator is on {generator.device}, the random vectors on {self.device}: "
                f"pass a generator on {self.device.type}"
            )
        return generator

    def random(
        self,
        columns: int,
        distribution: str,
        generator: torch.Generator | None,
        *,
        normalized: bool = False,
    ) -> Tensor:
        r"""``columns`` random vectors ``[D, columns]`` with i.i.d. entries (unit norm if asked).

        Rademacher entries are :math:`\pm 1`, normal ones standard normal, so that
        :math:`\mathbb{E}[\omega \omega^\top] = I`.
        """
        size, options = (self.dim, columns), {"dtype": self.dtype, "device": self.device}
        if check_distribution(distribution) == "normal":
            vectors = torch.randn(size, generator=generator, **options)
        else:
            vectors = torch.randint(0, 2, size, generator=generator, **options).mul_(2).sub_(1)
        if normalized:
            vectors = vectors / torch.linalg.vector_norm(vectors, dim=0)
        return vectors

    def matmul(self, matrix: Tensor) -> Tensor:
        """``A @ matrix`` for ``matrix`` ``[D, J]``, checked to be a finite ``[D, J]`` tensor."""
        result = self.operator @ matrix
        if not isinstance(result, Tensor) or result.shape != matrix.shape:
            raise ValueError(
                f"the operator's product with a {list(matrix.shape)} matrix must be a tensor of "
                f"that shape, got {getattr(result, 'shape', type(result).__name__)}"
            )
        if not all_finite(result):
            raise ValueError(
                f"{self.name}: the operator's product has NaN or infinite entries, so nothing "
                "can be estimated from it; check the operator (its model, loss and data) for "
                "non-finite values"
            )
        return result

    def dense(self) -> Tensor:
        """The matrix :math:`A` from :math:`D` products with the identity's columns."""
        return self.matmul(torch.eye(self.dim, dtype=self.dtype, device=self.device))
