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

    def sample_square_norms(self) -> Tensor:
        r"""Return :math:`\sum_k \lVert v_{k,n} \rVert^2` for every sample, shape ``[N]``."""
        dense = self.dense()
        return dense.reshape(*dense.shape[:2], -1).square().sum(dim=(0, 2))

    def weighted_diag(self, weights: Tensor, max_bytes: int) -> Tensor:
        r"""Return :math:`\sum_{k,n} w_{k,n}\, v_{k,n} \odot v_{k,n}` for weights ``[K, N]``.

        The weights may have any sign. The columns are materialised a chunk of at most
        ``max_bytes`` at a time.
        """
        per_column = self.num_samples * self.param_shape.numel() * weights.element_size()
        step = max(1, max_bytes // max(per_column, 1))
        out = None
        for start in range(0, self.num_columns, step):
            stop = min(start + step, self.num_columns)
            dense = self.select(start, stop).dense()
            part = torch.einsum("kn,kn...->...", weights[start:stop], dense.square())
            out = part if out is None else out + part
        return out

    # -- KFAC's view: factors of the form v = sum_t b_t (x) x_t ---------------------------------

    @property
    def kronecker_outputs(self) -> tuple[int, int] | None:
        r"""``(G, O)`` for a factor of KFAC's form, else ``None``.

        KFAC's form: :math:`v_{k,n} = \sum_t b_{k,n,t} \otimes x_{n,t}` with :math:`b`
        ``[K, N, T, G, O]`` (a bias is the case :math:`x = 1`). For any other factor the
        Kronecker methods below raise ``TypeError``.
        """
        return None

    def _not_kronecker(self) -> TypeError:
        return TypeError(f"{type(self).__name__} has no Kronecker form")

    def output_moment(self, *, expand: bool) -> Tensor:
        r"""Return KFAC's output moment ``[G, O, O]``.

        :math:`\sum_{k,n,t} b_{k,n,t} b_{k,n,t}^\top` with ``expand``, else
        :math:`\sum_{k,n} (\sum_t b_{k,n,t})(\sum_t b_{k,n,t})^\top`.
        """
        raise self._not_kronecker()

    def input_moment(
        self,
        *,
        expand: bool,
        with_ones: bool,
        scale: float = 1.0,
        input_scale: Tensor | None = None,
    ) -> Tensor:
        r"""Return ``scale`` times :math:`\sum_{n,t} x_{n,t} x_{n,t}^\top` per group, ``[G, I, I]``.

        With ``expand=False`` the inputs are first averaged over positions; ``with_ones``
        appends a constant 1 to every input (a joint weight and bias); ``input_scale`` multiplies
        the inputs (cheaper than scaling the moment when there are few of them).
        """
        raise self._not_kronecker()

    def input_count(self, *, expand: bool) -> int:
        """Return how many inputs :meth:`input_moment` sums: ``N T`` (``expand``) or ``N``."""
        raise self._not_kronecker()

    def rotated(self, qb: Tensor, qa: Tensor | None, *, with_ones: bool = False) -> Factor:
        r"""Return the factor in the basis :math:`Q_B \otimes Q_A`.

        Its columns are :math:`Q_B^\top b` and inputs :math:`Q_A^\top x` (``qb`` ``[G, O, O]``,
        ``qa`` ``[G, I, I]``; :math:`x` extended by a 1 first with ``with_ones``); ``qa=None``
        gives the bias part alone (:meth:`bias_part`) in the basis :math:`Q_B`.
        """
        raise self._not_kronecker()

    def bias_part(self) -> Factor:
        r"""Return the factor of the columns :math:`\sum_t b_{k,n,t}` (an additive bias's)."""
        raise self._not_kronecker()


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

    def sample_square_norms(self) -> Tensor:  # noqa: D102
        return self._zeros(self.num_samples)

    def weighted_diag(self, weights: Tensor, max_bytes: int) -> Tensor:  # noqa: D102
        return self.diag()

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
