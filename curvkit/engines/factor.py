r"""Square-root factors of one parameter's GGN block: the interface between engines and quantities.

For a parameter :math:`\theta_p` with :math:`D_p` entries, a batch of :math:`N` samples and
:math:`K` backpropagated columns per sample (the columns of the loss Hessian's square root,
or the loss gradient), the factor is the matrix

.. math::

    V_p = \big[ v_{k,n} \big]_{k < K,\, n < N} \in \mathbb{R}^{D_p \times K N},
    \qquad v_{k,n} = J_{\theta_p} f_n^\top s_{n,k},

so that the parameter's GGN block is :math:`V_p V_p^\top`. Engines hand out factors; quantities
(``ggn``, ``directional``) only ever call the methods below, so a structured factor (a Linear
layer's Kronecker form) and a materialised one are interchangeable.

Shape conventions, used by every implementation:

- column coefficients and products with :math:`V_p^\top` have shape ``[K, N, J]``;
- vectors in parameter space are stacked along a leading axis: ``[J, *param_shape]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def square_sum(tensor: Tensor) -> Tensor:
    """``tensor.square().sum(dim=0)``, for a few rows without holding all squares at once."""
    if not 0 < tensor.shape[0] <= 32:
        return tensor.square().sum(dim=0)
    out = tensor[0].square()
    for row in tensor[1:]:
        out.addcmul_(row, row)
    return out


class Factor(ABC):
    """The square-root factor :math:`V_p` of one parameter, with columns indexed by ``(k, n)``."""

    def __init__(self, param_shape: torch.Size, num_columns: int, num_samples: int) -> None:
        self.param_shape = torch.Size(param_shape)
        self.num_columns = num_columns
        self.num_samples = num_samples

    @abstractmethod
    def diag(self) -> Tensor:
        r"""Return :math:`\sum_{k,n} v_{k,n} \odot v_{k,n}`, shaped like the parameter."""

    @abstractmethod
    def gram(self) -> Tensor:
        r"""Return :math:`V_p^\top V_p` with shape ``[K, N, K, N]``."""

    @abstractmethod
    def t_mat(self, mat: Tensor) -> Tensor:
        r"""Return :math:`V_p^\top M` for ``mat`` ``[J, *param_shape]``, shape ``[K, N, J]``."""

    @abstractmethod
    def mat(self, coefficients: Tensor) -> Tensor:
        r"""Return :math:`V_p c` for ``coefficients`` ``[K, N, J]``, shape ``[J, *param_shape]``."""

    @abstractmethod
    def dense(self) -> Tensor:
        """Return the materialised columns, shape ``[K, N, *param_shape]``."""

    @abstractmethod
    def select(self, start: int, stop: int) -> Factor:
        """Return the factor made of the columns ``start <= k < stop`` (all samples)."""


class DenseFactor(Factor):
    """A factor whose columns are held in memory as one tensor ``[K, N, *param_shape]``.

    The generic per-module rule, shared parameters and the BackPACK engine produce these.
    """

    def __init__(self, columns: Tensor, param_shape: torch.Size) -> None:
        param_shape = torch.Size(param_shape)
        if columns.dim() < 2 or columns.shape[2:] != param_shape:
            raise ValueError(
                f"columns must have shape [K, N, *{tuple(param_shape)}], got {tuple(columns.shape)}"
            )
        super().__init__(param_shape, columns.shape[0], columns.shape[1])
        self.columns = columns

    def _flat(self) -> Tensor:
        return self.columns.flatten(start_dim=2)

    def diag(self) -> Tensor:  # noqa: D102
        return square_sum(self.columns).sum(dim=0)

    def gram(self) -> Tensor:  # noqa: D102
        flat = self._flat()
        return torch.einsum("knd,lmd->knlm", flat, flat)

    def t_mat(self, mat: Tensor) -> Tensor:  # noqa: D102
        return torch.einsum("knd,jd->knj", self._flat(), mat.flatten(start_dim=1))

    def mat(self, coefficients: Tensor) -> Tensor:  # noqa: D102
        out = torch.einsum("knd,knj->jd", self._flat(), coefficients)
        return out.reshape(coefficients.shape[-1], *self.param_shape)

    def dense(self) -> Tensor:  # noqa: D102
        return self.columns

    def select(self, start: int, stop: int) -> DenseFactor:  # noqa: D102
        return DenseFactor(self.columns[start:stop], self.param_shape)


class ZeroFactor(Factor):
    """A factor whose columns are all zero: the parameter does not influence the outputs.

    Nothing of size ``K N D_p`` is held; :meth:`dense` materialises zeros on demand.
    """

    def __init__(
        self,
        param_shape: torch.Size,
        num_columns: int,
        num_samples: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(param_shape, num_columns, num_samples)
        self.dtype = dtype
        self.device = device

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def diag(self) -> Tensor:  # noqa: D102
        return self._zeros(*self.param_shape)

    def gram(self) -> Tensor:  # noqa: D102
        k, n = self.num_columns, self.num_samples
        return self._zeros(k, n, k, n)

    def t_mat(self, mat: Tensor) -> Tensor:  # noqa: D102
        return self._zeros(self.num_columns, self.num_samples, mat.shape[0])

    def mat(self, coefficients: Tensor) -> Tensor:  # noqa: D102
        return self._zeros(coefficients.shape[-1], *self.param_shape)

    def dense(self) -> Tensor:  # noqa: D102
        return self._zeros(self.num_columns, self.num_samples, *self.param_shape)

    def select(self, start: int, stop: int) -> ZeroFactor:  # noqa: D102
        num_columns = len(range(self.num_columns)[start:stop])
        return ZeroFactor(
            self.param_shape, num_columns, self.num_samples, dtype=self.dtype, device=self.device
        )


class SumFactor(Factor):
    r"""The factor :math:`V_p = \sum_u V_p^{(u)}` of a parameter used several times.

    Each use :math:`u` (a module called twice, a weight shared by two modules) contributes its
    own factor; the columns add up *before* anything is squared. The linear methods
    (:meth:`t_mat`, :meth:`mat`) add the parts' results; the quadratic ones (:meth:`diag`,
    :meth:`gram`) go through the summed dense columns.
    """

    def __init__(self, parts: list[Factor]) -> None:
        if not parts:
            raise ValueError("SumFactor needs at least one part")
        first = parts[0]
        for part in parts[1:]:
            if (part.param_shape, part.num_columns, part.num_samples) != (
                first.param_shape,
                first.num_columns,
                first.num_samples,
            ):
                raise ValueError("all parts of a SumFactor must have the same shape")
        super().__init__(first.param_shape, first.num_columns, first.num_samples)
        self.parts = parts

    def diag(self) -> Tensor:  # noqa: D102
        return self.dense().square().sum(dim=(0, 1))

    def gram(self) -> Tensor:  # noqa: D102
        return DenseFactor(self.dense(), self.param_shape).gram()

    def t_mat(self, mat: Tensor) -> Tensor:  # noqa: D102
        return sum(part.t_mat(mat) for part in self.parts[1:]) + self.parts[0].t_mat(mat)

    def mat(self, coefficients: Tensor) -> Tensor:  # noqa: D102
        return sum(part.mat(coefficients) for part in self.parts[1:]) + self.parts[0].mat(
            coefficients
        )

    def dense(self) -> Tensor:  # noqa: D102
        return sum(part.dense() for part in self.parts[1:]) + self.parts[0].dense()

    def select(self, start: int, stop: int) -> SumFactor:  # noqa: D102
        return SumFactor([part.select(start, stop) for part in self.parts])
