r"""Batched linear algebra on the rightmost two dimensions, in closed form for small matrices.

Every function acts on a batch of matrices of shape ``(..., D, D)`` and works on any device and
dtype: no tensor is created on the default device. The 1x1, 2x2 and 3x3 cases use closed formulas
built from elementwise operations over the batch, which beats a loop of LAPACK calls by a wide
margin when the batch holds millions of tiny matrices.

The symmetric 3x3 eigenvalues use the trigonometric formula (Smith, 1961): with
:math:`q = \operatorname{tr}(H) / 3`, :math:`p^2 = \|H - qI\|_F^2 / 6` and
:math:`\det(H - qI) = 2 p^3 \cos(3\varphi)`, the eigenvalues are
:math:`q + 2p \cos(\varphi + 2\pi k / 3)` for :math:`k = 0, 1, 2`. The angle is taken with
``atan2`` rather than ``acos(det / (2 p^3))``, so a multiple of the identity (:math:`p = 0`) gives
exact eigenvalues and finite gradients instead of a division by zero.
"""

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "all_finite",
    "couples_items",
    "determinant_3d",
    "eig_3d",
    "inv3d",
    "lapack_dtype",
    "rinverse",
    "safe_sqrt",
    "sym_adjugate_3x3",
    "sym_eigvals_3x3",
    "symmetric_gram",
    "without_negligible",
]

#: A Gram matrix of fewer columns, or of fewer rows times columns, is one matrix product: per
#: entry, the blocked product saves multiply-adds in proportion to the rows and pays a fixed
#: cost for the mirrored copy, and narrow blocks run the products less efficiently. Measured on
#: CPU (1 thread): 512 x 4096, 2048 x 1024 and 8192 x 1152 take 20-35% less time, 512 x 1024
#: and 300 x 2048 no less.
GRAM_BLOCKED_MIN_COLUMNS = 1024
GRAM_BLOCKED_MIN_ENTRIES = 2**21
#: Columns per block of the blocked product, and the most blocks (16: 53% of the multiply-adds).
GRAM_BLOCK_COLUMNS = 256
GRAM_MAX_BLOCKS = 16


def lapack_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which torch's dense solvers (``eigh``, ``qr``, ``inv``) take ``dtype``.

    LAPACK and cuSOLVER have no half precision: float16 and bfloat16 matrices are solved in
    float32 (and the results cast back by the caller).
    """
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite.

    The sum is finite unless an entry is not or the sum overflows; only then are the entries
    checked one by one. One reduction instead of the boolean tensor of :func:`torch.isfinite`,
    which took a tenth of a gradient's time on a language model's logits.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


#: Entries of the columns compared at once by :func:`without_negligible` (whole samples).
NEGLIGIBLE_CHUNK_ENTRIES = 2**20


def without_negligible(columns: Tensor, num_samples: int, *, absolute: bool = True) -> Tensor:
    r"""``columns`` ``[K, N rows, ...]`` with the entries too small to matter set to zero.

    An entry is negligible below :math:`\varepsilon^2` times the largest entry of its column
    for the same sample (:math:`\varepsilon` the dtype's machine epsilon), and, with
    ``absolute``, also below the square root of the smallest normal number (``finfo.tiny``,
    about 1e-19 in float32). A confident classifier's square-root columns hold many such entries
    (probabilities of 1e-30, and whole columns of that size where the sampled class is the
    certain one), and what is computed from them underflows into subnormal numbers, with which
    x86 CPUs compute a hundred times slower.

    What this changes, exactly: for columns :math:`s` of which a quantity is a sum of squares
    (:math:`\sum_k v_k v_k^\top` with :math:`v_k = J^\top s_k`: GGN diagonals, blocks, Gram
    matrices, Kronecker factors), a dropped entry's share of its sample's term is below
    :math:`\varepsilon^2` of that term, or below ``finfo.tiny`` in absolute value. For a vector
    that enters a product linearly (the output-space vector :math:`H J u` of a GGN-vector
    product), pass ``absolute=False``: the relative threshold scales with the vector, so the set
    of dropped entries, and the product's homogeneity, do not depend on the vector's scale.
    First-order columns (loss gradients) must never pass through here: their entries are the
    result itself.

    Args:
        columns: The columns ``[K, N rows, ...]``.
        num_samples: :math:`N`; each sample's rows are compared with that sample's largest.
        absolute: Also drop entries below the square root of ``finfo.tiny``.

    Returns:
        ``columns`` itself if nothing is negligible, else a copy with those entries zero.
    """
    if not columns.is_floating_point():
        return columns
    finfo = torch.finfo(columns.dtype)
    per_sample = columns.reshape(columns.shape[0], num_samples, -1)
    smallest, largest = torch.aminmax(per_sample, dim=2, keepdim=True)
    floor = torch.maximum(largest, -smallest) * finfo.eps**2
    if absolute:
        floor = floor.clamp_min(finfo.tiny**0.5)
    # Comparisons a chunk of samples at a time (their masks stay small), and a copy only
    # when an entry is negligible.
    step = max(1, NEGLIGIBLE_CHUNK_ENTRIES // max(per_sample[:, :1].numel(), 1))
    cleaned = None
    for start in range(0, num_samples, step):
        block, limit = per_sample[:, start : start + step], floor[:, start : start + step]
        negligible = (block < limit) & (block > -limit) & (block != 0)
        if bool(negligible.any()):
            if cleaned is None:
                cleaned = per_sample.clone()
            cleaned[:, start : start + step].masked_fill_(negligible, 0)
    return columns if cleaned is None else cleaned.reshape(columns.shape)


def couples_items(hessian_product: Callable[[Tensor], Tensor], items: Tensor) -> bool:
    r"""Whether a Hessian over ``items`` (shape ``[I, ...]``) couples different items.

    One Hessian-vector product with a vector supported on item 0 alone: a Hessian that is
    block diagonal over the items (a sum of independent per-item terms) leaves every other item
    at zero. A coupling that this one vector does not reveal would need a Hessian block orthogonal
    to a fixed, generic vector.

    Args:
        hessian_product: Maps a vector shaped like ``items`` to the Hessian's product with it.
        items: A tensor shaped like the variables, items along axis 0.

    Returns:
        ``True`` if the product reaches another item beyond floating-point noise.
    """
    if items.shape[0] < 2:
        return False
    direction = torch.zeros_like(items)
    direction[0] = torch.linspace(
        1.0, 2.0, items[0].numel(), dtype=items.dtype, device=items.device
    ).reshape(items.shape[1:])
    product = hessian_product(direction).detach().reshape(items.shape[0], -1)
    leak = product[1:].abs().max()
    scale = product.abs().max()
    return bool(leak > math.sqrt(torch.finfo(product.dtype).eps) * scale)


def _check_square(M: Tensor, name: str, size: int | None = None) -> None:
    if not isinstance(M, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}.")
    if M.dim() < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(
            f"{name} must be a batch of square matrices of shape (..., D, D), got shape "
            f"{tuple(M.shape)}."
        )
    if size is not None and M.shape[-1] != size:
        raise ValueError(
            f"{name} must have shape (..., {size}, {size}), got shape {tuple(M.shape)}."
        )


def safe_sqrt(x: Tensor) -> Tensor:
    r"""Square root of a nonnegative tensor, with gradient 0 (not inf or NaN) where ``x == 0``.

    Args:
        x: A nonnegative tensor.

    Returns:
        :math:`\sqrt{x}`, elementwise.
    """
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def determinant_3d(H: Tensor) -> Tensor:
    r"""Determinants of a batch of 3x3 matrices, by cofactor expansion along the first row.

    Args:
        H: Matrices of shape ``(..., 3, 3)``.

    Returns:
        The determinants, of shape ``H.shape[:-2]``.

    Raises:
        TypeError: If ``H`` is not a tensor.
        ValueError: If ``H`` is not of shape ``(..., 3, 3)``.
    """
    _check_square(H, "H", 3)
    return (
        H[..., 0, 0] * (H[..., 1, 1] * H[..., 2, 2] - H[..., 1, 2] * H[..., 2, 1])
        - H[..., 0, 1] * (H[..., 1, 0] * H[..., 2, 2] - H[..., 1, 2] * H[..., 2, 0])
        + H[..., 0, 2] * (H[..., 1, 0] * H[..., 2, 1] - H[..., 1, 1] * H[..., 2, 0])
    )


def sym_eigvals_3x3(
    h00: Tensor, h11: Tensor, h22: Tensor, h01: Tensor, h02: Tensor, h12: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues of symmetric 3x3 matrices given by their six distinct entries, ascending.

    The entries are broadcast against each other; this is the elementwise core of
    :func:`eig_3d`, for callers that hold the entries as separate tensors.

    Args:
        h00: Entries :math:`H_{00}`.
        h11: Entries :math:`H_{11}`.
        h22: Entries :math:`H_{22}`.
        h01: Entries :math:`H_{01} = H_{10}`.
        h02: Entries :math:`H_{02} = H_{20}`.
        h12: Entries :math:`H_{12} = H_{21}`.

    Returns:
        A tuple ``(smallest, middle, largest)``.
    """
    q = (h00 + h11 + h22) / 3
    s00, s11, s22 = h00 - q, h11 - q, h22 - q
    p2 = (s00.square() + s11.square() + s22.square() + 2 * (h01**2 + h02**2 + h12**2)) / 6
    # det(H - qI) = 2 p^3 cos(3 phi) and sqrt(4 p^6 - det^2) = 2 p^3 sin(3 phi).
    det_s = (
        s00 * (s11 * s22 - h12**2) - h01 * (h01 * s22 - h12 * h02) + h02 * (h01 * h12 - s11 * h02)
    )
    sin_part = safe_sqrt((4 * p2**3 - det_s**2).clamp(min=0))
    degenerate = (sin_part == 0) & (det_s == 0)
    cos_part = torch.where(degenerate, 1.0, det_s)
    phi = torch.atan2(sin_part, cos_part) / 3
    two_p = 2 * safe_sqrt(p2)
    largest = q + two_p * torch.cos(phi)
    smallest = q + two_p * torch.cos(phi + 2 * math.pi / 3)
    middle = 3 * q - largest - smallest
    return smallest, middle, largest


def sym_adjugate_3x3(
    h00: Tensor, h11: Tensor, h22: Tensor, h01: Tensor, h02: Tensor, h12: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Adjugate and determinant of symmetric 3x3 matrices given by their six distinct entries.

    The entries are broadcast against each other. :math:`H^{-1} = \mathrm{adj}(H) / \det H`.

    Args:
        h00: Entries :math:`H_{00}`.
        h11: Entries :math:`H_{11}`.
        h22: Entries :math:`H_{22}`.
        h01: Entries :math:`H_{01} = H_{10}`.
        h02: Entries :math:`H_{02} = H_{20}`.
        h12: Entries :math:`H_{12} = H_{21}`.

    Returns:
        ``(c00, c11, c22, c01, c02, c12, det)``: the six distinct entries of the (symmetric)
        adjugate, then the determinant.
    """
    c00 = h11 * h22 - h12 * h12
    c11 = h00 * h22 - h02 * h02
    c22 = h00 * h11 - h01 * h01
    c01 = h02 * h12 - h01 * h22
    c02 = h01 * h12 - h02 * h11
    c12 = h01 * h02 - h00 * h12
    det = h00 * c00 + h01 * c01 + h02 * c02
    return c00, c11, c22, c01, c02, c12, det


def _symmetric_entries_3x3(H: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (
        H[..., 0, 0],
        H[..., 1, 1],
        H[..., 2, 2],
        (H[..., 0, 1] + H[..., 1, 0]) / 2,
        (H[..., 0, 2] + H[..., 2, 0]) / 2,
        (H[..., 1, 2] + H[..., 2, 1]) / 2,
    )


def eig_3d(H: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Eigenvalues of a batch of symmetric 3x3 matrices, in closed form, in ascending order.

    Only the symmetric part :math:`(H + H^\top) / 2` is used. The result is exact for multiples
    of the identity; elsewhere its absolute error is a few units of rounding times
    :math:`\|H\|`, growing to about :math:`\sqrt{\epsilon}\,\|H\|` where two eigenvalues nearly
    coincide (the trigonometric formula is ill-conditioned there, the eigenvalues are not).

    Args:
        H: Symmetric matrices of shape ``(..., 3, 3)``.

    Returns:
        A tuple ``(smallest, middle, largest)`` of tensors of shape ``H.shape[:-2]``.

    Raises:
        TypeError: If ``H`` is not a tensor.
        ValueError: If ``H`` is not of shape ``(..., 3, 3)``.
    """
    _check_square(H, "H", 3)
    return sym_eigvals_3x3(*_symmetric_entries_3x3(H))


def _inverse_2d(M: Tensor, sym: bool) -> Tensor:
    m00, m11 = M[..., 0, 0], M[..., 1, 1]
    if sym:
        m01 = m10 = (M[..., 0, 1] + M[..., 1, 0]) / 2
    else:
        m01, m10 = M[..., 0, 1], M[..., 1, 0]
    det = m00 * m11 - m01 * m10
    adjugate = torch.stack([m11, -m01, -m10, m00], dim=-1)
    return (adjugate / det.unsqueeze(-1)).unflatten(-1, (2, 2))


def inv3d(H: Tensor, sym: bool = False) -> Tensor:
    r"""Inverses of a batch of 3x3 matrices: :math:`H^{-1} = \mathrm{adj}(H) / \det H`.

    Args:
        H: Matrices of shape ``(..., 3, 3)``.
        sym: If ``True``, ``H`` is taken to be symmetric: only its symmetric part
            :math:`(H + H^\top) / 2` is used and the result is exactly symmetric.

    Returns:
        The inverses, of shape ``(..., 3, 3)``; a singular matrix gives ``inf`` or ``nan``
        entries.

    Raises:
        TypeError: If ``H`` is not a tensor.
        ValueError: If ``H`` is not of shape ``(..., 3, 3)``.
    """
    _check_square(H, "H", 3)
    if sym:
        c00, c11, c22, c01, c02, c12, det = sym_adjugate_3x3(*_symmetric_entries_3x3(H))
        adjugate = torch.stack([c00, c01, c02, c01, c11, c12, c02, c12, c22], dim=-1)
        return (adjugate / det.unsqueeze(-1)).unflatten(-1, (3, 3))
    h00, h01, h02 = H[..., 0, 0], H[..., 0, 1], H[..., 0, 2]
    h10, h11, h12 = H[..., 1, 0], H[..., 1, 1], H[..., 1, 2]
    h20, h21, h22 = H[..., 2, 0], H[..., 2, 1], H[..., 2, 2]
    # Row i of the adjugate holds the cofactors of column i.
    c00, c01, c02 = h11 * h22 - h12 * h21, h02 * h21 - h01 * h22, h01 * h12 - h02 * h11
    c10, c11, c12 = h12 * h20 - h10 * h22, h00 * h22 - h02 * h20, h02 * h10 - h00 * h12
    c20, c21, c22 = h10 * h21 - h11 * h20, h01 * h20 - h00 * h21, h00 * h11 - h01 * h10
    det = h00 * c00 + h01 * c10 + h02 * c20
    adjugate = torch.stack([c00, c01, c02, c10, c11, c12, c20, c21, c22], dim=-1)
    return (adjugate / det.unsqueeze(-1)).unflatten(-1, (3, 3))


def rinverse(M: Tensor, sym: bool = False) -> Tensor:
    r"""Inverses of a batch of square matrices on the rightmost two dimensions.

    Sizes 1, 2 and 3 use closed formulas (reciprocal, adjugate); larger sizes use
    :func:`torch.linalg.inv`.

    Args:
        M: Matrices of shape ``(..., D, D)``.
        sym: If ``True``, ``M`` is taken to be symmetric: only its symmetric part
            :math:`(M + M^\top) / 2` is used and the result is exactly symmetric.

    Returns:
        The inverses, of shape ``(..., D, D)``. A singular matrix gives ``inf`` or ``nan``
        entries for ``D <= 3`` and raises :class:`torch.linalg.LinAlgError` from
        :func:`torch.linalg.inv` for ``D >= 4``.

    Raises:
        TypeError: If ``M`` is not a tensor.
        ValueError: If ``M`` is not of shape ``(..., D, D)`` or has ``D == 0``.
    """
    _check_square(M, "M")
    size = M.shape[-1]
    if size == 0:
        raise ValueError("M must hold matrices of size at least 1x1, got shape (..., 0, 0).")
    if size == 1:
        return M.reciprocal()
    if size == 2:
        return _inverse_2d(M, sym)
    if size == 3:
        return inv3d(M, sym)
    if sym:
        inverse = torch.linalg.inv((M + M.mT) / 2)
        return (inverse + inverse.mT) / 2
    return torch.linalg.inv(M)


def symmetric_gram(
    chunks: Tensor | Sequence[Tensor], *, scale: float = 1.0, blocks: int | None = None
) -> Tensor:
    r"""``scale`` times :math:`\sum_c Z_c^\top Z_c` for matrices ``Z_c`` of shape ``[G, M_c, D]``.

    torch has no symmetric rank-k update (BLAS ``syrk``), and a plain product computes every
    entry of the symmetric result twice. With ``b`` blocks of columns, block row ``i`` of the
    upper block triangle is one product :math:`Z_{:, i}^\top Z_{:, i:}`: :math:`b (b + 1) / 2` of
    the :math:`b^2` blocks, 53% of the multiply-adds for ``b = 16``. Each block row is written
    into the output in place and copied, transposed, into the block column below the diagonal;
    each diagonal block is averaged with its transpose, so the result is exactly symmetric, and
    no memory beyond the output and one diagonal block is taken. The copy costs a fixed time per
    entry, where the saving grows with the rows, so small matrices take one product, averaged
    with its transpose: a BLAS does not promise a symmetric ``Z^T Z``, and the result always is.

    Args:
        chunks: One tensor ``[G, M, D]`` or a sequence of them (views are fine: a product reads
            each block of columns in place), all with the same ``G`` and ``D``; their rows are
            summed over.
        scale: Multiplies the result (inside the products, so it costs nothing).
        blocks: Number of column blocks; ``None`` chooses by size: one (a plain product) below
            ``GRAM_BLOCKED_MIN_COLUMNS`` columns or ``GRAM_BLOCKED_MIN_ENTRIES`` rows (in all)
            times columns, else one per ``GRAM_BLOCK_COLUMNS`` columns, at most
            ``GRAM_MAX_BLOCKS``.

    Returns:
        The Gram matrices, ``[G, D, D]``.

    Raises:
        ValueError: For no chunks, a chunk that is not three-dimensional, chunks of different
            ``G`` or ``D``, or ``blocks < 1``.
    """
    parts = [chunks] if isinstance(chunks, Tensor) else list(chunks)
    if not parts:
        raise ValueError("symmetric_gram needs at least one matrix")
    groups, columns = parts[0].shape[0], parts[0].shape[-1]
    if any(z.dim() != 3 or z.shape[0] != groups or z.shape[2] != columns for z in parts):
        raise ValueError(
            "symmetric_gram takes matrices of shape [G, M, D] with the same G and D, got shapes "
            f"{[tuple(z.shape) for z in parts]}"
        )
    if blocks is None:
        rows = sum(z.shape[1] for z in parts)
        small = columns < GRAM_BLOCKED_MIN_COLUMNS or rows * columns < GRAM_BLOCKED_MIN_ENTRIES
        blocks = 1 if small else min(GRAM_MAX_BLOCKS, columns // GRAM_BLOCK_COLUMNS)
    if blocks < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    out = parts[0].new_empty(groups, columns, columns)
    blocks = min(blocks, max(columns, 1))
    if blocks == 1:
        for i, z in enumerate(parts):
            # beta=0 ignores the uninitialised output, NaNs included.
            out.baddbmm_(z.mT, z, beta=0 if i == 0 else 1, alpha=scale)
        return out.add_(out.mT.clone()).mul_(0.5)
    edges = [round(i * columns / blocks) for i in range(blocks + 1)]
    for lo, hi in itertools.pairwise(edges):
        size = hi - lo
        # The block row goes straight into the output (the products take its row stride).
        panel = out[:, lo:hi, lo:]
        for i, z in enumerate(parts):
            panel.baddbmm_(z[..., lo:hi].mT, z[..., lo:], beta=0 if i == 0 else 1, alpha=scale)
        diagonal = panel[..., :size]
        # (a + b) / 2 == (b + a) / 2 exactly: the diagonal block becomes exactly symmetric.
        diagonal.add_(diagonal.mT.clone()).mul_(0.5)
        out[:, hi:, lo:hi] = panel[..., size:].mT
    return out
