r"""Randomized estimators of traces, diagonals and norms from matrix products alone.

Every estimator takes a symmetric operator :math:`A \in \mathbb{R}^{D \times D}`: a curvkit
operator (:class:`~curvkit.operators.base.CurvatureOperator`), a dense tensor, or any object with
``shape`` and ``@`` on ``[D, J]`` matrices. Its probes are drawn in the operator's ``dtype`` and on
its ``device`` when it has them (else float64 on the CPU, or the ``dtype``/``device`` arguments),
from ``generator``, and multiplied in batches (``A @ M`` with ``M`` of shape ``[D, J]``), never one
vector at a time. ``num_matvecs`` is the number of products with :math:`A` each estimator spends.

Probes :math:`\omega` have i.i.d. entries, Rademacher (:math:`\pm 1`) or standard normal, so that
:math:`\mathbb{E}[\omega \omega^\top] = I`. The variances below are those of one probe; an
estimator with :math:`m` probes divides them by :math:`m`.

- :func:`hutchinson_trace`: :math:`\operatorname{tr}(A) \approx \frac1m \sum_j \omega_j^\top A
  \omega_j`, variance :math:`2 (\lVert A \rVert_F^2 - \sum_i A_{ii}^2)` (Rademacher) or
  :math:`2 \lVert A \rVert_F^2` (normal) (Hutchinson 1989).
- :func:`hutchpp_trace`: Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the exact trace on a
  sketch :math:`Q` of :math:`A`'s range plus Hutchinson on the rest; unbiased, variance at most
  :math:`2 \lVert A \rVert_F^2 / m'` for :math:`m'` residual probes.
- :func:`xtrace`: XTrace (Epperly, Tropp & Webber 2024): Hutch++ made exchangeable, every probe
  serves both in the sketch and as a residual probe; unbiased.
- :func:`hutchinson_diag`: :math:`\operatorname{diag}(A) \approx \frac1m \sum_j \omega_j \odot
  A \omega_j`, entry :math:`i` with variance :math:`\sum_{k \ne i} A_{ik}^2` (Rademacher) or
  :math:`\sum_k A_{ik}^2 + A_{ii}^2` (normal) (Bekas, Kokiopoulou & Saad 2007).
- :func:`xdiag`: XDiag (Epperly, Tropp & Webber 2024), the exchangeable diagonal estimator.
- :func:`hutchinson_squared_frobenius_norm`: :math:`\lVert A \rVert_F^2 \approx \frac1m \sum_j
  \lVert A \omega_j \rVert^2`, the Hutchinson estimate of :math:`\operatorname{tr}(A^2)`.

:func:`hutchpp_trace`, :func:`xtrace` and :func:`xdiag` are exact (up to rounding) when
``num_matvecs >= D``: they then spend :math:`D` products on the identity's columns. They are also
exact whenever the rank of :math:`A` is below the sketch size, as their sketch then spans
:math:`A`'s range.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.core.validation import check_int
from curvkit.ops.linalg import all_finite
from curvkit.randomized.operand import MatrixLike, Operand, check_distribution

__all__ = [
    "hutchinson_diag",
    "hutchinson_squared_frobenius_norm",
    "hutchinson_trace",
    "hutchpp_trace",
    "xdiag",
    "xtrace",
]

#: Entries of the ``[D, J]`` probe block one product holds, for the estimators that need no
#: more than a block of probes at a time (Hutchinson's).
PROBE_BLOCK_ELEMENTS = 2**25


class _Probe(Operand):
    """The validated operator with the estimator's probe count and distribution."""

    def __init__(
        self,
        operator: MatrixLike,
        num_matvecs: int,
        distribution: str,
        generator: torch.Generator | None,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        name: str,
        minimum: int = 1,
    ) -> None:
        super().__init__(operator, name, dtype=dtype, device=device)
        self.num_matvecs = check_int(num_matvecs, "num_matvecs", minimum=minimum)
        self.distribution = check_distribution(distribution)
        self.generator = self.check_generator(generator)

    def draw(self, num: int) -> Tensor:
        """``num`` probes as the columns of a ``[D, num]`` matrix."""
        return self.random(num, self.distribution, self.generator)

    def probe_blocks(self) -> list[int]:
        """Split the ``num_matvecs`` Hutchinson probes into blocks of bounded memory."""
        step = max(1, PROBE_BLOCK_ELEMENTS // max(self.dim, 1))
        return [min(step, self.num_matvecs - s) for s in range(0, self.num_matvecs, step)]


def _orthonormal_basis(products: Tensor) -> tuple[Tensor, Tensor, bool]:
    r"""``(Q, R, deficient)``: the sketch's thin QR, and whether it is numerically rank-deficient.

    A deficient sketch :math:`A \Omega` of a symmetric :math:`A` means that :math:`A`'s range has
    fewer dimensions than the sketch, so that :math:`Q`, which spans a superset of the sketch's
    range, spans all of :math:`A`'s range: then :math:`A = Q Q^\top A`.
    """
    q, r = torch.linalg.qr(products)
    diagonal = r.diagonal().abs()
    tolerance = 10 * r.shape[0] * torch.finfo(r.dtype).eps * diagonal.max()
    return q, r, bool((diagonal <= tolerance).any())


def hutchinson_trace(
    operator: MatrixLike,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Estimate :math:`\operatorname{tr}(A)` by Hutchinson's estimator.

    .. math::

        \operatorname{tr}(A) \approx \frac1m \sum_{j=1}^m \omega_j^\top A \omega_j,

    unbiased, with variance :math:`\frac2m (\lVert A \rVert_F^2 - \sum_i A_{ii}^2)` for
    Rademacher probes and :math:`\frac2m \lVert A \rVert_F^2` for normal ones. A curvkit
    operator computes the forms :math:`\omega_j^\top A \omega_j` by its
    :meth:`~curvkit.operators.base.CurvatureOperator.quadratic_forms` (for the GGN,
    :math:`\lVert V^\top \omega_j \rVert^2`: half a product).

    Args:
        operator: A square operator with ``shape`` and ``@`` on ``[D, J]`` tensors.
        num_matvecs: The number :math:`m` of probes (products with :math:`A`).
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: The random number generator of the probes (torch's global one if ``None``).
        dtype: The probes' dtype if the operator has none (default float64); refused if it
            differs from the operator's own.
        device: The probes' device if the operator has none (default CPU); refused if it
            differs from the operator's own.

    Returns:
        The estimate, a 0-dimensional tensor.

    Raises:
        TypeError, ValueError: For an operator without ``shape`` and ``@``, a non-square one,
            one of a dtype that is not floating point, ``num_matvecs < 1``, an unknown
            distribution, a ``dtype``/``device`` other than the operator's, or products with
            NaN or infinite entries.
    """
    probe = _Probe(
        operator, num_matvecs, distribution, generator, dtype, device, "hutchinson_trace"
    )
    # curvkit's operators give the forms omega^T A omega for less than a product (the GGN's are
    # squared norms of V^T omega); any other operator multiplies.
    forms = getattr(operator, "quadratic_forms", None)
    total = torch.zeros((), dtype=probe.dtype, device=probe.device)
    for num in probe.probe_blocks():
        omega = probe.draw(num)
        if forms is None:
            total = total + (omega * probe.matmul(omega)).sum()
        else:
            total = total + forms(omega).sum()
    if not all_finite(total):
        raise ValueError(
            "hutchinson_trace: the operator's quadratic forms have NaN or infinite entries; "
            "check the operator (its model, loss and data) for non-finite values"
        )
    return total / num_matvecs


def hutchinson_diag(
    operator: MatrixLike,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Estimate :math:`\operatorname{diag}(A)` by Hutchinson's diagonal estimator.

    .. math::

        \operatorname{diag}(A) \approx \frac1m \sum_{j=1}^m \omega_j \odot A \omega_j,

    unbiased; entry :math:`i` has variance :math:`\frac1m \sum_{k \ne i} A_{ik}^2` (Rademacher)
    or :math:`\frac1m (\sum_k A_{ik}^2 + A_{ii}^2)` (normal).

    Args:
        operator: A square operator with ``shape`` and ``@`` on ``[D, J]`` tensors.
        num_matvecs: The number :math:`m` of probes.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: The random number generator of the probes.
        dtype: The probes' dtype if the operator has none (default float64); refused if it
            differs from the operator's own.
        device: The probes' device if the operator has none (default CPU); refused if it
            differs from the operator's own.

    Returns:
        The estimate, shape ``[D]``.

    Raises:
        TypeError, ValueError: As :func:`hutchinson_trace`.
    """
    probe = _Probe(operator, num_matvecs, distribution, generator, dtype, device, "hutchinson_diag")
    total = torch.zeros(probe.dim, dtype=probe.dtype, device=probe.device)
    for num in probe.probe_blocks():
        omega = probe.draw(num)
        total = total + (omega * probe.matmul(omega)).sum(1)
    return total / num_matvecs


def hutchinson_squared_frobenius_norm(
    operator: MatrixLike,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Estimate :math:`\lVert A \rVert_F^2 = \operatorname{tr}(A^\top A)`.

    .. math::

        \lVert A \rVert_F^2 \approx \frac1m \sum_{j=1}^m \lVert A \omega_j \rVert^2,

    Hutchinson's estimator of :math:`\operatorname{tr}(B)`, :math:`B = A^\top A`: unbiased, with
    variance :math:`\frac2m (\lVert B \rVert_F^2 - \sum_i B_{ii}^2)` (Rademacher) or
    :math:`\frac2m \lVert B \rVert_F^2` (normal).

    Args:
        operator: A square operator with ``shape`` and ``@`` on ``[D, J]`` tensors.
        num_matvecs: The number :math:`m` of probes.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: The random number generator of the probes.
        dtype: The probes' dtype if the operator has none (default float64); refused if it
            differs from the operator's own.
        device: The probes' device if the operator has none (default CPU); refused if it
            differs from the operator's own.

    Returns:
        The estimate, a 0-dimensional tensor.

    Raises:
        TypeError, ValueError: As :func:`hutchinson_trace`.
    """
    probe = _Probe(
        operator,
        num_matvecs,
        distribution,
        generator,
        dtype,
        device,
        "hutchinson_squared_frobenius_norm",
    )
    total = torch.zeros((), dtype=probe.dtype, device=probe.device)
    for num in probe.probe_blocks():
        total = total + probe.matmul(probe.draw(num)).square().sum()
    return total / num_matvecs


def hutchpp_trace(
    operator: MatrixLike,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Estimate :math:`\operatorname{tr}(A)` by Hutch++ (Meyer, Musco, Musco & Woodruff 2021).

    With :math:`k = \lfloor m/3 \rfloor` sketch probes :math:`S` and :math:`m' = m - 2k`
    residual probes :math:`G`, :math:`Q = \operatorname{orth}(A S)` and
    :math:`P = I - Q Q^\top`:

    .. math::

        \operatorname{tr}(A) \approx \operatorname{tr}(Q^\top A Q)
            + \frac{1}{m'} \operatorname{tr}(G^\top P A P G),

    unbiased (the second term is Hutchinson's estimate of :math:`\operatorname{tr}(PAP)`, with
    :math:`G` independent of :math:`Q`), with variance at most :math:`2 \lVert A \rVert_F^2 / m'`
    and far less when :math:`A`'s spectrum decays. The products come in two batches:
    :math:`A S`, then :math:`A [Q, P G]`. Memory: :math:`D \times m` entries.

    Exact when ``num_matvecs >= D`` (the identity's columns) or when :math:`A`'s rank is at most
    :math:`k` (then :math:`PA = 0`).

    Args:
        operator: A square symmetric operator with ``shape`` and ``@`` on ``[D, J]`` tensors.
        num_matvecs: The number :math:`m \ge 3` of products with :math:`A`.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: The random number generator of the probes.
        dtype: The probes' dtype if the operator has none (default float64); refused if it
            differs from the operator's own.
        device: The probes' device if the operator has none (default CPU); refused if it
            differs from the operator's own.

    Returns:
        The estimate, a 0-dimensional tensor.

    Raises:
        TypeError, ValueError: As :func:`hutchinson_trace`, and for ``num_matvecs < 3``.
    """
    probe = _Probe(
        operator, num_matvecs, distribution, generator, dtype, device, "hutchpp_trace", 3
    )
    if num_matvecs >= probe.dim:
        return probe.dense().diagonal().sum()
    num_sketch = num_matvecs // 3
    sketch = probe.draw(num_sketch)
    residual = probe.draw(num_matvecs - 2 * num_sketch)
    basis = torch.linalg.qr(probe.matmul(sketch)).Q
    residual = residual - basis @ (basis.T @ residual)
    products = probe.matmul(torch.cat([basis, residual], dim=1))
    basis_products, residual_products = products.split([num_sketch, residual.shape[1]], dim=1)
    exact_part = (basis * basis_products).sum()
    residual_part = (residual * residual_products).sum() / residual.shape[1]
    return exact_part + residual_part


def xtrace(
    operator: MatrixLike,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Estimate :math:`\operatorname{tr}(A)` by XTrace (Epperly, Tropp & Webber 2024).

    With :math:`k = \lfloor m/2 \rfloor` probes :math:`\Omega = [\omega_1, \dots, \omega_k]`,
    :math:`Y = A \Omega = Q R`, and :math:`Q_i` an orthonormal basis of :math:`Y` without its
    column :math:`i`, the estimate is the mean over :math:`i` of the unbiased Hutch++ estimates

    .. math::

        t_i = \operatorname{tr}(Q_i^\top A Q_i) + \omega_i^\top P_i A P_i \omega_i,
        \qquad P_i = I - Q_i Q_i^\top.

    All :math:`k` leave-one-out bases come from one QR: :math:`Q_i Q_i^\top =
    Q (I - s_i s_i^\top) Q^\top` with :math:`s_i` the normalised column :math:`i` of
    :math:`R^{-\top}`. With :math:`H = Q^\top A Q`, :math:`w_i = Q^\top \omega_i` and
    :math:`u_i = (I - s_i s_i^\top) w_i`, and since :math:`Q^\top A \omega_i = r_i` (column
    :math:`i` of :math:`R`) for symmetric :math:`A`,

    .. math::

        t_i = \operatorname{tr} H - s_i^\top H s_i + \omega_i^\top y_i - 2 u_i^\top r_i
            + u_i^\top H u_i,

    so that all :math:`t_i` cost :math:`O(k^3)` beyond the two batched products :math:`A \Omega`
    and :math:`A Q`. Memory: :math:`D \times m` entries.

    Exact when ``num_matvecs >= D`` (the identity's columns) or when :math:`A`'s rank is below
    :math:`k` (a rank-deficient sketch: then :math:`Q` spans :math:`A`'s range and the estimate
    is :math:`\operatorname{tr} H`).

    Args:
        operator: A square symmetric operator with ``shape`` and ``@`` on ``[D, J]`` tensors.
        num_matvecs: The number :math:`m \ge 2` of products with :math:`A` (an odd one wastes
            one).
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: The random number generator of the probes.
        dtype: The probes' dtype if the operator has none (default float64); refused if it
            differs from the operator's own.
        device: The probes' device if the operator has none (default CPU); refused if it
            differs from the operator's own.

    Returns:
        The estimate, a 0-dimensional tensor.

    Raises:
        TypeError, ValueError: As :func:`hutchinson_trace`, and for ``num_matvecs < 2``.
    """
    probe = _Probe(operator, num_matvecs, distribution, generator, dtype, device, "xtrace", 2)
    if num_matvecs >= probe.dim:
        return probe.dense().diagonal().sum()
    omega = probe.draw(num_matvecs // 2)
    sketch = probe.matmul(omega)
    basis, r, deficient = _orthonormal_basis(sketch)
    projected = basis.T @ probe.matmul(basis)
    projected = (projected + projected.T) / 2
    if deficient:
        return projected.trace()
    s = torch.linalg.inv(r).T
    s = s / torch.linalg.vector_norm(s, dim=0)
    w = basis.T @ omega
    u = w - s * (s * w).sum(0)
    estimates = (
        projected.trace()
        - (s * (projected @ s)).sum(0)
        + (omega * sketch).sum(0)
        - 2 * (u * r).sum(0)
        + (u * (projected @ u)).sum(0)
    )
    return estimates.mean()


def xdiag(
    operator: MatrixLike,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Estimate :math:`\operatorname{diag}(A)` by XDiag (Epperly, Tropp & Webber 2024).

    With the notation of :func:`xtrace`, the estimate is the mean over :math:`i` of the unbiased

    .. math::

        d_i = \operatorname{diag}(Q_i Q_i^\top A) + \omega_i \odot (P_i A \omega_i),

    where :math:`\operatorname{diag}(Q_i Q_i^\top A) = \operatorname{diag}(Q Z^\top) -
    (Q s_i) \odot (Z s_i)` with :math:`Z = A Q`, and :math:`P_i A \omega_i = y_i -
    Q (r_i - s_i s_i^\top r_i)`. (For Rademacher probes, :math:`\omega_i \odot \omega_i = 1`, so
    this is also the form with the division by :math:`\omega_i \odot \omega_i` of the paper.)
    Products: :math:`A \Omega` and :math:`A Q`; memory: :math:`D \times m` entries.

    Exact when ``num_matvecs >= D`` or when :math:`A`'s rank is below :math:`k` (then the
    estimate is :math:`\operatorname{diag}(Q Z^\top)`).

    Args:
        operator: A square symmetric operator with ``shape`` and ``@`` on ``[D, J]`` tensors.
        num_matvecs: The number :math:`m \ge 2` of products with :math:`A`.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: The random number generator of the probes.
        dtype: The probes' dtype if the operator has none (default float64); refused if it
            differs from the operator's own.
        device: The probes' device if the operator has none (default CPU); refused if it
            differs from the operator's own.

    Returns:
        The estimate, shape ``[D]``.

    Raises:
        TypeError, ValueError: As :func:`hutchinson_trace`, and for ``num_matvecs < 2``.
    """
    probe = _Probe(operator, num_matvecs, distribution, generator, dtype, device, "xdiag", 2)
    if num_matvecs >= probe.dim:
        return probe.dense().diagonal().clone()
    omega = probe.draw(num_matvecs // 2)
    sketch = probe.matmul(omega)
    basis, r, deficient = _orthonormal_basis(sketch)
    products = probe.matmul(basis)
    projected_diag = (basis * products).sum(1)
    if deficient:
        return projected_diag
    s = torch.linalg.inv(r).T
    s = s / torch.linalg.vector_norm(s, dim=0)
    left_out = ((basis @ s) * (products @ s)).mean(1)
    complement = sketch - basis @ (r - s * (s * r).sum(0))
    return projected_diag - left_out + (omega * complement).mean(1)
