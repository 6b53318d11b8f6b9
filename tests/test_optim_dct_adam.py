"""curvkit.optim.DCTAdam and its transforms (the side-by-side with Pyro is in test_optim_pyro)."""

from __future__ import annotations

import pytest
import torch

from curvkit.optim import ClippedAdam, DCTAdam
from curvkit.optim.dct_adam import (
    dct_matrix,
    from_time_and_frequency,
    next_fast_len,
    to_time_and_frequency,
)


def test_next_fast_len():
    assert [next_fast_len(n) for n in (1, 6, 7, 11, 13, 17, 97)] == [1, 6, 8, 12, 15, 18, 100]
    for bad in (0, -3):
        with pytest.raises(ValueError, match=r"size must be an integer >= 1"):
            next_fast_len(bad)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match="size must be an integer"):
            next_fast_len(bad)


@pytest.mark.parametrize("size", [1, 2, 5, 8])
def test_dct_matrix_is_orthonormal_dct_ii(size):
    matrix = dct_matrix(size, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(size, dtype=torch.float64))
    scipy_fft = pytest.importorskip("scipy.fft")
    expected = scipy_fft.dct(torch.eye(size).numpy(), type=2, norm="ortho", axis=0)
    torch.testing.assert_close(matrix, torch.from_numpy(expected).double())


def test_time_and_frequency_round_trip_is_twice_the_identity():
    """The inverse is the transpose: time part plus the inverse DCT of the frequency part."""
    x = torch.randn(3, 7, 2, dtype=torch.float64)
    both = to_time_and_frequency(x, dim=1)
    assert both.shape == (3, 7 + 8, 2)
    torch.testing.assert_close(from_time_and_frequency(both, 1, 7), 2 * x)


def run(optimizer_class, steps=10, time_dim=None, **options):
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    if time_dim is not None:
        x._pyro_dct_dim = time_dim
    optimizer = optimizer_class([x], **options)
    for _ in range(steps):
        optimizer.zero_grad()
        (torch.sin(3 * x) + x**4).sum().backward()
        optimizer.step()
    return x.detach()


@pytest.mark.parametrize("corrected_eps", [True, False])
def test_without_a_time_dimension_it_is_clipped_adam(corrected_eps):
    options = {"lr": 0.1, "eps": 1e-2, "clip_norm": 2.0, "lrd": 0.95}
    torch.testing.assert_close(
        run(DCTAdam, corrected_eps=corrected_eps, **options),
        run(ClippedAdam, corrected_eps=corrected_eps, **options),
        rtol=1e-13,
        atol=1e-13,
    )


def test_a_time_dimension_changes_the_steps_and_keeps_them_finite():
    plain = run(DCTAdam, lr=0.1)
    in_time = run(DCTAdam, lr=0.1, time_dim=-1)
    assert torch.isfinite(in_time).all() and not torch.allclose(plain, in_time)


def test_subsample_with_a_time_dimension_is_refused():
    x = torch.zeros(3, 4, requires_grad=True)
    x._pyro_dct_dim, x._pyro_subsample = -1, {-2: torch.tensor([0])}
    x.grad = torch.ones_like(x)
    with pytest.raises(ValueError, match="time dimension"):
        DCTAdam([x], subsample_aware=True).step()


@pytest.mark.parametrize(
    "options", [{"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": -1.0}, {"clip_norm": 0.0}, {"lrd": -1}]
)
def test_invalid_hyperparameters_raise(options):
    with pytest.raises(ValueError):
        DCTAdam([torch.zeros(1, requires_grad=True)], **options)
