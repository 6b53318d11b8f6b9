"""The contractions of :class:`~curvkit.engines.KroneckerFactor` against materialised columns.

The factor picks the pairwise contractions or per-sample gradients by cost; each path is checked
here on its own (float64; one sample and several, one position and several, groups; tiny and
default bounds on chunks and cache blocks, so that every block boundary is crossed; the layouts
of a Linear layer's and a convolution's tensors), against ``einsum`` of the materialised
per-sample gradients, so that none depends on the cost model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.engines import KroneckerFactor, compute_factors, kronecker

SHAPES = [
    # (columns K, samples N, positions T, groups G, outputs O, inputs I)
    (3, 1, 2, 1, 4, 5),
    (2, 4, 7, 1, 3, 6),
    (4, 3, 5, 2, 2, 3),
    (1, 5, 3, 3, 4, 2),
    (2, 3, 1, 2, 3, 4),
    (3, 6, 4, 1, 7, 2),
]


def _factor(
    shape: tuple[int, ...], chunk_bytes: int, layout: str
) -> tuple[KroneckerFactor, torch.Tensor]:
    """A factor and its materialised columns ``[K, N, G O I]``.

    ``layout``: ``"linear"`` holds b and x contiguous as ``[K, N, T, G, O]`` and ``[N, T, G, I]``;
    ``"conv"`` as the convolution rule does, positions innermost (``[K, N, G, O, T]`` and
    ``[N, G, I, T]`` in memory).
    """
    k, n, t, g, o, i = shape
    gen = torch.Generator().manual_seed(sum(shape))
    if layout == "linear":
        b = torch.randn(k, n, t, g, o, generator=gen, dtype=torch.float64)
        x = torch.randn(n, t, g, i, generator=gen, dtype=torch.float64)
    else:
        b = torch.randn(k, n, g, o, t, generator=gen, dtype=torch.float64).permute(0, 1, 4, 2, 3)
        x = torch.randn(n, g, i, t, generator=gen, dtype=torch.float64).permute(0, 3, 1, 2)
    factor = KroneckerFactor(b, x, torch.Size([g * o, i]), max_chunk_bytes=chunk_bytes)
    dense = torch.einsum("kntgo,ntgi->kngoi", b, x).reshape(k, n, g * o * i)
    return factor, dense


@pytest.mark.parametrize("layout", ["linear", "conv"])
@pytest.mark.parametrize(("chunk_bytes", "cache_bytes"), [(64, 64), (300, 200), (2**28, 2**22)])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_contraction_matches_materialised_columns(
    shape: tuple[int, ...], chunk_bytes: int, cache_bytes: int, layout: str, monkeypatch
) -> None:
    monkeypatch.setattr(kronecker, "CACHE_BYTES", cache_bytes)
    factor, dense = _factor(shape, chunk_bytes, layout)
    k, n = shape[:2]
    diag = dense.square().sum(dim=(0, 1)).reshape(factor.param_shape)
    gram = torch.einsum("knd,lmd->knlm", dense, dense)
    x = factor.inputs

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)

    close(factor._diag_pairwise(x), diag)
    close(factor._diag_materialised(x), diag)
    close(factor.diag(), diag)
    close(factor._gram_pairs(), gram)
    close(factor._gram_materialised(), gram)
    close(factor.gram(), gram)
    close(factor.dense().reshape(k, n, -1), dense)
    gen = torch.Generator().manual_seed(1)
    mat = torch.randn(3, *factor.param_shape, generator=gen, dtype=torch.float64)
    close(factor.t_mat(mat), torch.einsum("knd,jd->knj", dense, mat.reshape(3, -1)))
    coefficients = torch.randn(k, n, 3, generator=gen, dtype=torch.float64)
    close(factor.mat(coefficients).reshape(3, -1), torch.einsum("knd,knj->jd", dense, coefficients))


@pytest.mark.parametrize("layout", ["linear", "conv"])
def test_every_contraction_is_differentiable(layout: str, monkeypatch) -> None:
    """With ``create_graph`` the factors' tensors require grad: no method may break the graph."""
    monkeypatch.setattr(kronecker, "CACHE_BYTES", 64)
    k, n, t, g, o, i = 2, 3, 3, 2, 2, 2
    factor, _ = _factor((k, n, t, g, o, i), 200, layout)
    b, x = factor.output_grads.detach(), factor.inputs.detach()
    coefficients = torch.randn(k, n, 2, dtype=torch.float64)
    directions = torch.randn(2, *factor.param_shape, dtype=torch.float64)

    def forced(order: bool, product):
        def run(f: KroneckerFactor) -> torch.Tensor:
            with monkeypatch.context() as patch:
                patch.setattr(KroneckerFactor, "_through_inputs", lambda self, j: order)
                return product(f)

        return run

    methods = {
        "diag_pairwise": lambda f: f._diag_pairwise(f.inputs),
        "diag_materialised": lambda f: f._diag_materialised(f.inputs),
        "gram_pairs": lambda f: f._gram_pairs(),
        "gram_materialised": lambda f: f._gram_materialised(),
        **{
            f"{name}, through the inputs: {order}": forced(order, product)
            for order in (True, False)
            for name, product in (
                ("mat", lambda f: f.mat(coefficients)),
                ("t_mat", lambda f: f.t_mat(directions)),
            )
        },
    }
    for name, method in methods.items():

        def function(b: torch.Tensor, x: torch.Tensor, method=method) -> torch.Tensor:
            return method(KroneckerFactor(b, x, factor.param_shape, max_chunk_bytes=200))

        inputs = (b.clone().requires_grad_(True), x.clone().requires_grad_(True))
        assert torch.autograd.gradcheck(function, inputs), name


def test_cost_models_pick_the_measured_faster_path() -> None:
    """On ResNet-18's layers with 10 columns (measured on CPU, 2 threads).

    The diagonal pairs positions for 3 x 3 images, not for the 4 x 4 stage; the Gram matrix
    pairs samples on the 8 x 8 and 4 x 4 stages and materialises on the 16 x 16 one.
    """

    def factor(t: int, o: int, i: int) -> KroneckerFactor:
        return KroneckerFactor(
            torch.zeros(10, 32, t, 1, o), torch.zeros(32, t, 1, i), torch.Size([o, i])
        )

    pairwise, materialise = factor(9, 512, 4608)._diag_costs()
    assert pairwise < materialise
    pairwise, materialise = factor(16, 512, 4608)._diag_costs()
    assert materialise < pairwise
    for t, o, i in [(16, 512, 4608), (64, 256, 2304)]:
        pairs, materialise = factor(t, o, i)._gram_costs()
        assert pairs < materialise
    pairs, materialise = factor(256, 128, 1152)._gram_costs()
    assert materialise < pairs


@pytest.mark.parametrize("num_samples", [1, 3])
def test_convolution_diagonal_and_gram_match_torch_func(num_samples: int) -> None:
    """A small CNN's factors (both paths taken) against per-sample ``torch.func`` columns."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 4, 2, dilation=2, padding=1),
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


@pytest.mark.parametrize("layout", ["linear", "conv"])
@pytest.mark.parametrize("through_inputs", [True, False])
@pytest.mark.parametrize("num_directions", [1, 6])
@pytest.mark.parametrize("chunk_bytes", [64, 2**28])
@pytest.mark.parametrize("shape", SHAPES)
def test_both_product_orders_match_materialised_columns(
    shape: tuple[int, ...],
    chunk_bytes: int,
    num_directions: int,
    through_inputs: bool,
    layout: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``mat`` and ``t_mat`` through the inputs and through per-sample gradients, each forced,
    across chunks of samples and blocks of rows (``chunk_bytes`` bounds both)."""
    factor, dense = _factor(shape, chunk_bytes, layout)
    k, n = shape[:2]
    monkeypatch.setattr(KroneckerFactor, "_through_inputs", lambda self, j: through_inputs)
    monkeypatch.setattr(kronecker, "GRAM_BLOCK_BYTES", chunk_bytes)
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
