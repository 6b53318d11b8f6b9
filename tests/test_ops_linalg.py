import pytest
import torch

import curvkit.ops.linalg
from curvkit.ops.linalg import (
    all_finite,
    determinant_3d,
    eig_3d,
    inv3d,
    rinverse,
    safe_sqrt,
    sym_adjugate_3x3,
    sym_eigvals_3x3,
    symmetric_gram,
    without_negligible,
)

DTYPE = torch.float64
BATCH_SHAPES = [(), (1,), (10,), (3, 2)]


def random_general(batch_shape, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch_shape, dim, dim, generator=gen, dtype=DTYPE)
    return A + 2 * dim * torch.eye(dim, dtype=DTYPE)


def random_symmetric(batch_shape, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch_shape, dim, dim, generator=gen, dtype=DTYPE)
    return A + A.mT


def assert_close(actual, expected, rtol=1e-10):
    scale = expected.abs().max().clamp(min=1)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert (actual - expected).abs().max() <= rtol * scale


@pytest.mark.parametrize("dim", range(1, 7))
@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_rinverse_matches_torch_linalg_inv(dim, batch_shape):
    M = random_general(batch_shape, dim)
    assert_close(rinverse(M), torch.linalg.inv(M))


@pytest.mark.parametrize("dim", range(1, 7))
@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_rinverse_sym_inverts_the_symmetric_part_exactly_symmetrically(dim, batch_shape):
    M = random_general(batch_shape, dim)
    inverse = rinverse(M, sym=True)
    assert torch.equal(inverse, inverse.mT)
    assert_close(inverse, torch.linalg.inv((M + M.mT) / 2))


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_inv3d_and_determinant_3d_match_torch_linalg(batch_shape):
    M = random_general(batch_shape, 3, seed=1)
    assert_close(inv3d(M), torch.linalg.inv(M))
    assert_close(determinant_3d(M), torch.linalg.det(M))
    S = random_symmetric(batch_shape, 3, seed=2) + 8 * torch.eye(3, dtype=DTYPE)
    assert_close(inv3d(S, sym=True), torch.linalg.inv(S))
    assert_close(determinant_3d(S), torch.linalg.det(S))


def test_sym_adjugate_3x3_is_det_times_inverse():
    S = random_symmetric((20,), 3, seed=3)
    c00, c11, c22, c01, c02, c12, det = sym_adjugate_3x3(
        S[..., 0, 0], S[..., 1, 1], S[..., 2, 2], S[..., 0, 1], S[..., 0, 2], S[..., 1, 2]
    )
    adjugate = torch.stack([c00, c01, c02, c01, c11, c12, c02, c12, c22], -1).unflatten(-1, (3, 3))
    assert_close(det, torch.linalg.det(S))
    assert_close(adjugate, det[..., None, None] * torch.linalg.inv(S), rtol=1e-9)


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_eig_3d_matches_eigvalsh_in_ascending_order(batch_shape):
    S = random_symmetric(batch_shape, 3, seed=4)
    actual = torch.stack(eig_3d(S), dim=-1)
    assert_close(actual, torch.linalg.eigvalsh(S), rtol=1e-12)


def test_eig_3d_uses_the_symmetric_part():
    M = random_general((7,), 3, seed=5)
    actual = torch.stack(eig_3d(M), dim=-1)
    assert_close(actual, torch.linalg.eigvalsh((M + M.mT) / 2), rtol=1e-12)


@pytest.mark.parametrize("scale", [0.0, 1.0, -2.5, 1e-12, 1e12])
def test_eig_3d_is_exact_with_finite_gradients_for_multiples_of_the_identity(scale):
    # The trigonometric formula divides by p = 0 here in its textbook form.
    H = (scale * torch.eye(3, dtype=DTYPE)).expand(4, 3, 3).clone().requires_grad_()
    eigenvalues = eig_3d(H)
    expected = torch.full((4,), scale, dtype=DTYPE)
    for value in eigenvalues:
        torch.testing.assert_close(value.detach(), expected, rtol=1e-15, atol=0)
    (sum(value.sum() for value in eigenvalues)).backward()
    assert torch.isfinite(H.grad).all()
    # d(sum of eigenvalues)/dH = d(trace)/dH = I.
    assert torch.equal(H.grad, torch.eye(3, dtype=DTYPE).expand(4, 3, 3))


def test_eig_3d_near_a_double_eigenvalue():
    diagonals = torch.tensor([[1.0, 1.0, 2.0], [1.0, 2.0, 2.0], [-3.0, 5.0, 5.0]], dtype=DTYPE)
    Q = torch.linalg.qr(
        torch.randn(3, 3, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    )[0]
    S = Q @ torch.diag_embed(diagonals) @ Q.mT
    actual = torch.stack(eig_3d(S), dim=-1)
    # The formula is ill-conditioned (not the eigenvalues) at a double eigenvalue: ~sqrt(eps).
    assert_close(actual, diagonals, rtol=1e-7)


def test_eig_3d_gradient_matches_eigvalsh():
    S = random_symmetric((5,), 3, seed=7).requires_grad_()
    weights = torch.tensor([0.3, -1.1, 2.0], dtype=DTYPE)
    (grad,) = torch.autograd.grad((torch.stack(eig_3d(S), -1) * weights).sum(), S)
    (expected,) = torch.autograd.grad((torch.linalg.eigvalsh(S) * weights).sum(), S)
    # eig_3d differentiates through the symmetric part; eigvalsh returns a symmetric gradient.
    assert_close((grad + grad.mT) / 2, expected, rtol=1e-9)


def test_gradcheck_closed_forms():
    M = random_general((2,), 3, seed=8).requires_grad_()
    S = random_symmetric((2,), 3, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: rinverse(m[..., :2, :2]), (M,))
    assert torch.autograd.gradcheck(lambda m: inv3d(m, sym=True), (M,))
    assert torch.autograd.gradcheck(determinant_3d, (M,))
    assert torch.autograd.gradcheck(lambda s: torch.stack(eig_3d(s), -1), (S,))


def test_sym_eigvals_3x3_broadcasts_its_entries():
    S = random_symmetric((4,), 3, seed=10)
    entries = [S[..., 0, 0], S[..., 1, 1], S[..., 2, 2], S[..., 0, 1], S[..., 0, 2]]
    smallest, middle, largest = sym_eigvals_3x3(*entries, torch.tensor(0.0, dtype=DTYPE))
    S[..., 1, 2] = S[..., 2, 1] = 0
    assert_close(torch.stack([smallest, middle, largest], -1), torch.linalg.eigvalsh(S))


def test_safe_sqrt_value_and_zero_gradient_at_zero():
    x = torch.tensor([0.0, 4.0], dtype=DTYPE, requires_grad=True)
    y = safe_sqrt(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0], dtype=DTYPE))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 0.25], dtype=DTYPE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_tensor_is_created_on_another_device_or_dtype(dtype):
    # The meta device has no data: any tensor created on the default device would clash.
    for dim in (1, 2, 3, 5):
        M = torch.empty(4, dim, dim, device="meta", dtype=dtype)
        for sym in (False, True):
            out = rinverse(M, sym=sym)
            assert out.device.type == "meta" and out.dtype == dtype and out.shape == M.shape
    M = torch.empty(4, 3, 3, device="meta", dtype=dtype)
    for out in (*eig_3d(M), determinant_3d(M), inv3d(M), inv3d(M, sym=True)):
        assert out.device.type == "meta" and out.dtype == dtype
    values = torch.stack(eig_3d(random_symmetric((3,), 3).to(dtype)), -1)
    assert values.dtype == dtype


def test_errors():
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        rinverse([[1.0]])
    with pytest.raises(ValueError, match=r"\(\.\.\., D, D\)"):
        rinverse(torch.ones(3))
    with pytest.raises(ValueError, match=r"\(\.\.\., D, D\)"):
        rinverse(torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least 1x1"):
        rinverse(torch.ones(2, 0, 0))
    for function in (inv3d, determinant_3d, eig_3d):
        with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
            function(torch.ones(2, 2))
        with pytest.raises(TypeError, match=r"torch\.Tensor"):
            function(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite(dtype: torch.dtype) -> None:
    """NaN, inf of either sign, and finite entries whose sum overflows."""
    x = torch.randn(10, dtype=dtype)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[3] = bad
        assert not all_finite(y)
    huge = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)
    assert not bool(torch.isfinite(huge.sum()))
    assert all_finite(huge)
    assert all_finite(torch.zeros(0, dtype=dtype))


def _gram_reference(chunks):
    return sum(z.mT @ z for z in chunks)


@pytest.mark.parametrize("blocks", [None, 1, 2, 3, 5, 8])
@pytest.mark.parametrize(
    ("groups", "rows", "columns"), [(1, 1, 1), (1, 7, 13), (1, 33, 101), (3, 1, 29), (2, 40, 17)]
)
def test_symmetric_gram_matches_the_product_and_is_exactly_symmetric(groups, rows, columns, blocks):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(groups, rows, columns, generator=gen, dtype=DTYPE)
    result = symmetric_gram(z, blocks=blocks, scale=0.25)
    assert_close(result, 0.25 * _gram_reference([z]), rtol=1e-13)
    if blocks is not None and min(blocks, columns) > 1:
        assert torch.equal(result, result.mT)


@pytest.mark.parametrize("blocks", [1, 4])
def test_symmetric_gram_sums_chunks_read_in_place(blocks):
    # Per-sample views [G, D, T] read transposed, as KFAC passes a convolution's patches.
    gen = torch.Generator().manual_seed(1)
    patches = torch.randn(5, 2, 23, 9, generator=gen, dtype=DTYPE)
    chunks = list(patches.mT)
    result = symmetric_gram(chunks, blocks=blocks)
    assert_close(result, _gram_reference(chunks), rtol=1e-13)
    assert torch.equal(result, result.mT)


def test_symmetric_gram_blocks_large_matrices_by_default(monkeypatch):
    monkeypatch.setattr(curvkit.ops.linalg, "GRAM_BLOCKED_MIN_COLUMNS", 40)
    monkeypatch.setattr(curvkit.ops.linalg, "GRAM_BLOCKED_MIN_ENTRIES", 30 * 40)
    monkeypatch.setattr(curvkit.ops.linalg, "GRAM_BLOCK_COLUMNS", 10)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(1, 30, 41, generator=gen, dtype=DTYPE)
    blocked = symmetric_gram(z)
    assert torch.equal(blocked, symmetric_gram(z, blocks=4))
    assert_close(blocked, _gram_reference([z]), rtol=1e-13)
    small = z[:, :, :39]
    assert torch.equal(symmetric_gram(small), symmetric_gram(small, blocks=1))
    assert torch.equal(symmetric_gram(z[:, :29]), symmetric_gram(z[:, :29], blocks=1))


def test_symmetric_gram_of_no_rows_is_zero_and_ignores_uninitialised_memory():
    z = torch.empty(2, 0, 6, dtype=DTYPE)
    for blocks in (1, 3):
        assert torch.equal(symmetric_gram(z, blocks=blocks), torch.zeros(2, 6, 6, dtype=DTYPE))
    assert symmetric_gram(torch.empty(1, 4, 0, dtype=DTYPE)).shape == (1, 0, 0)


def test_symmetric_gram_refuses_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        symmetric_gram([])
    with pytest.raises(ValueError, match="same G and D"):
        symmetric_gram([torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)])
    with pytest.raises(ValueError, match="same G and D"):
        symmetric_gram(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="blocks must be"):
        symmetric_gram(torch.zeros(1, 2, 3), blocks=0)


@pytest.mark.parametrize("chunk_entries", [1, 2**20])
def test_negligible_column_entries_are_set_to_zero(
    chunk_entries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below eps^2 times its sample's largest entry, or below sqrt(tiny): zero; all else kept
    (one sample per chunk, and all at once)."""
    monkeypatch.setattr(curvkit.ops.linalg, "NEGLIGIBLE_CHUNK_ENTRIES", chunk_entries)
    finfo = torch.finfo(torch.float32)
    columns = torch.tensor(
        [
            [[1.0, 1e-15, 3e-13], [1e-5, 1e-19, 1e-18], [1e-30, 1e-25, 0.0]],
            [[-2.0, -1e-14, 0.5], [1e-20, 2e-20, 5e-21], [1e-38, 3e-40, 1e-45]],
        ]
    )  # [K 2, N 3, outputs 3]
    original = columns.clone()
    kept = without_negligible(columns, 3)
    assert torch.equal(columns, original)  # the caller's tensor is not changed
    floor = (columns.abs().amax(dim=2, keepdim=True) * finfo.eps**2).clamp_min(finfo.tiny**0.5)
    small = columns.abs() < floor
    assert torch.equal(kept[~small], columns[~small])
    assert (kept[small] == 0).all()
    # the relative floor drops 1e-15 next to 1.0 but keeps 1e-18 next to 1e-5 ...
    assert kept[0, 0, 1] == 0 and kept[0, 1, 2] == 1e-18
    # ... and whole columns below sqrt(tiny) go
    assert (kept[0, 2] == 0).all() and (kept[1, 1] == 0).all() and (kept[1, 2] == 0).all()
    assert without_negligible(torch.ones(2, 3, dtype=torch.int64), 3).dtype == torch.int64
