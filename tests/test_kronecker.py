"""Both contractions of :class:`~curvkit.engines.KroneckerFactor` against materialised columns.

The factor picks the pairwise contraction or per-sample gradients by cost; each path is checked
here on its own (float64, one sample and several, tiny and default chunk bounds), against
``einsum`` of the materialised per-sample gradients, so that neither depends on the cost model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.engines import KroneckerFactor, compute_factors
from curvkit.engines.kronecker import MEMORY_COST

SHAPES = [
    # (columns K, samples N, positions T, groups G, outputs O, inputs I)
    (3, 1, 2, 1, 4, 5),
    (2, 4, 7, 1, 3, 6),
    (4, 3, 5, 2, 2, 3),
    (1, 5, 3, 3, 4, 2),
]


def _factor(shape: tuple[int, ...], chunk_bytes: int) -> tuple[KroneckerFactor, torch.Tensor]:
    k, n, t, g, o, i = shape
    gen = torch.Generator().manual_seed(sum(shape))
    b = torch.randn(k, n, t, g, o, generator=gen, dtype=torch.float64)
    x = torch.randn(n, t, g, i, generator=gen, dtype=torch.float64)
    factor = KroneckerFactor(b, x, torch.Size([g * o, i]), max_chunk_bytes=chunk_bytes)
    dense = torch.einsum("kntgo,ntgi->kngoi", b, x).reshape(k, n, g * o * i)
    return factor, dense


@pytest.mark.parametrize("chunk_bytes", [64, 2**28])
@pytest.mark.parametrize("shape", SHAPES)
def test_both_diagonals_and_the_pairwise_gram_match_materialised_columns(
    shape: tuple[int, ...], chunk_bytes: int
) -> None:
    factor, dense = _factor(shape, chunk_bytes)
    diag = dense.square().sum(dim=(0, 1)).reshape(factor.param_shape)
    gram = torch.einsum("knd,lmd->knlm", dense, dense)
    x = factor.inputs
    torch.testing.assert_close(factor._diag_pairwise(x), diag, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factor._diag_materialised(x), diag, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factor.diag(), diag, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factor._gram_pairwise(), gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factor.gram(), gram, rtol=1e-12, atol=1e-12)


def test_diagonal_cost_model_prefers_pairs_for_few_positions_and_many_columns() -> None:
    """ResNet-18's last stage (4 x 4 pixels, 512 channels) pairs; its first (32 x 32) does not."""
    b = torch.zeros(10, 1, 16, 1, 512)
    late = KroneckerFactor(b, torch.zeros(1, 16, 1, 4608), torch.Size([512, 4608]))
    pairwise, materialise = late._diag_costs()
    assert pairwise < materialise
    early = KroneckerFactor(
        torch.zeros(10, 1, 1024, 1, 64), torch.zeros(1, 1024, 1, 576), torch.Size([64, 576])
    )
    pairwise, materialise = early._diag_costs()
    assert materialise < pairwise
    assert MEMORY_COST > 0


@pytest.mark.parametrize("num_samples", [1, 3])
def test_convolution_diagonal_and_gram_match_torch_func(num_samples: int) -> None:
    """A small CNN's factors (both paths taken) against per-sample ``torch.func`` columns."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).double()
    x = torch.randn(num_samples, 2, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (num_samples,))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    params = dict(model.named_parameters())
    columns = curvkit.losses.hessian_sqrt(loss_fn, model(x).detach(), y)

    def output(p: dict, sample: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (sample.unsqueeze(0),))[0]

    jacobians = torch.func.vmap(torch.func.jacrev(output), in_dims=(None, 0))(params, x)
    _, factors = compute_factors(model, x, list(params.values()), lambda o: columns)
    for name, factor in zip(params, factors, strict=True):
        jacobian = jacobians[name].flatten(start_dim=2)  # [N, C, D]
        expected = torch.einsum("knc,ncd->knd", columns, jacobian)
        torch.testing.assert_close(
            factor.diag().flatten(), expected.square().sum(dim=(0, 1)), rtol=1e-10, atol=1e-14
        )
        torch.testing.assert_close(
            factor.gram(), torch.einsum("knd,lmd->knlm", expected, expected), rtol=1e-10, atol=1e-14
        )


@pytest.mark.parametrize("through_inputs", [True, False])
@pytest.mark.parametrize("num_directions", [1, 6])
@pytest.mark.parametrize("chunk_bytes", [64, 2**28])
@pytest.mark.parametrize("shape", SHAPES)
def test_both_product_orders_match_materialised_columns(
    shape: tuple[int, ...],
    chunk_bytes: int,
    num_directions: int,
    through_inputs: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``mat`` and ``t_mat`` through the inputs and through per-sample gradients, each forced."""
    factor, dense = _factor(shape, chunk_bytes)
    k, n = shape[:2]
    monkeypatch.setattr(KroneckerFactor, "_through_inputs", lambda self, j: through_inputs)
    gen = torch.Generator().manual_seed(7)
    directions = torch.randn(num_directions, *factor.param_shape, generator=gen, dtype=dense.dtype)
    coefficients = torch.randn(k, n, num_directions, generator=gen, dtype=dense.dtype)
    expected_t_mat = torch.einsum("knd,jd->knj", dense, directions.flatten(start_dim=1))
    expected_mat = torch.einsum("knj,knd->jd", coefficients, dense)
    torch.testing.assert_close(factor.t_mat(directions), expected_t_mat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        factor.mat(coefficients).flatten(start_dim=1), expected_mat, rtol=1e-12, atol=1e-12
    )


def test_product_order_follows_the_cost() -> None:
    """A language-model head: one direction goes through the inputs, ten through the gradients."""
    head = KroneckerFactor(
        torch.zeros(3, 2, 128, 1, 8192), torch.zeros(2, 128, 1, 256), torch.Size([8192, 256])
    )
    assert head._through_inputs(1)
    assert not head._through_inputs(10)
