"""GGN quantities against the plain-autograd references of curvkit.testing.verify, on a model
zoo."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator, cg, eigsh
from torch import Tensor, nn
from zoo_params import case_params

import curvkit
from curvkit.testing.verify import compare, reference_diag_ggn, reference_ggn
from curvkit.testing.zoo import make_case, make_targets

RTOL = 1e-9
ATOL = 1e-12


class ConvexLoss(nn.Module):
    """A convex loss curvkit has no closed form for: softplus plus a quartic, mean or sum."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        residual = outputs - targets
        per_sample = (nn.functional.softplus(residual) + residual**4 / 4).sum(dim=1)
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def make_loss(
    name: str, reduction: str, outputs: Tensor
) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
    """Return the loss ``name`` and targets for it on ``outputs`` ``[N, C]``."""
    if name in ("ce", "weighted_ce"):
        weight = torch.linspace(0.5, 2.0, outputs.shape[1], dtype=torch.float64)
        loss_fn = nn.CrossEntropyLoss(
            weight=weight if name == "weighted_ce" else None, reduction=reduction
        )
    else:
        losses = {"mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss, "convex": ConvexLoss}
        loss_fn = losses[name](reduction=reduction)
    return loss_fn, make_targets(loss_fn, outputs, torch.Generator().manual_seed(1))


# Cases of curvkit.testing.zoo.
MODELS = [
    "mlp",
    "cnn",
    "cnn2d_batchnorm_eval",
    "cnn1d",
    "cnn3d",
    "residual",
    "sequence_layernorm",
    "embedding",
    "attention",
    "shared_twice_direct_param",
    "two_inputs",
]
LOSSES = ["mse", "ce", "bce", "convex"]


def build(name: str, n: int) -> tuple[nn.Module, Tensor | tuple[Tensor, ...]]:
    """The zoo's model ``name`` (float64, eval mode) and inputs of ``n`` samples.

    A single input comes as a tensor, as users pass it (and as the tests slice it).
    """
    case = make_case(name, n)
    return case.model, case.inputs[0] if len(case.inputs) == 1 else case.inputs


def problem(model_name: str, loss_name: str, reduction: str, n: int):
    model, inputs = build(model_name, n)
    with torch.no_grad():
        outputs = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    loss_fn, targets = make_loss(loss_name, reduction, outputs)
    return model, loss_fn, inputs, targets


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------------------------------------
# diagonal


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("model_name", case_params(MODELS))
def test_diag_ggn_matches_reference(model_name: str, loss_name: str, reduction: str, n: int):
    model, loss_fn, inputs, targets = problem(model_name, loss_name, reduction, n)
    diagonal = curvkit.diag_ggn(model, loss_fn, (inputs, targets))
    expected = reference_diag_ggn(model, loss_fn, inputs, targets)
    assert [d.shape for d in diagonal] == [p.shape for p in model.parameters()]
    assert flat(expected).abs().max() > 0
    compare(diagonal, expected, rtol=RTOL, atol=ATOL).assert_passed()


@pytest.mark.parametrize("loss_name", ["weighted_ce", "mse"])
def test_diag_ggn_subset_of_params_in_given_order(loss_name: str):
    model, loss_fn, inputs, targets = problem("residual", loss_name, "mean", 7)
    all_params = list(model.parameters())
    params = [all_params[-1], all_params[0]]
    diagonal = curvkit.diag_ggn(model, loss_fn, (inputs, targets), params=params)
    expected = reference_diag_ggn(model, loss_fn, inputs, targets, params=params)
    compare(diagonal, expected, rtol=RTOL, atol=ATOL).assert_passed()


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "attention"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_diag_ggn_float32(model_name: str, loss_name: str):
    model, loss_fn, inputs, targets = problem(model_name, loss_name, "mean", 7)
    expected = reference_diag_ggn(model, loss_fn, inputs, targets)
    model = model.float()
    inputs = inputs.float() if inputs.is_floating_point() else inputs
    targets = targets.float() if targets.is_floating_point() else targets
    diagonal = curvkit.diag_ggn(model, loss_fn, (inputs, targets))
    assert all(d.dtype == torch.float32 for d in diagonal)
    scale = flat(expected).abs().max().item()
    compare([d.double() for d in diagonal], expected, rtol=1e-4, atol=1e-5 * scale).assert_passed()


def test_gauss_newton_diagonal_equals_diag_ggn_and_two_r_jtj():
    for reduction in ("mean", "sum"):
        model, loss_fn, inputs, targets = problem("cnn", "mse", reduction, 7)
        gn = curvkit.gauss_newton_diagonal(model, loss_fn, inputs, targets)
        compare(gn, curvkit.diag_ggn(model, loss_fn, (inputs, targets)), rtol=RTOL).assert_passed()
        # diag(J^T J) from the plain Jacobian of all outputs: the documented factor 2 / (N C) or 2.
        params = list(model.parameters())
        outputs = model(inputs).reshape(-1)
        rows = [flat(list(torch.autograd.grad(o, params, retain_graph=True))) for o in outputs]
        jtj_diagonal = torch.stack(rows).square().sum(dim=0)
        factor = 2 / outputs.numel() if reduction == "mean" else 2.0
        compare(flat(gn), factor * jtj_diagonal, rtol=RTOL, atol=ATOL).assert_passed()


# ---------------------------------------------------------------------------------------------
# products, columns, dense matrix, operator


DENSE_CASES = [
    *[(model_name, "ce", "mean", 7) for model_name in MODELS],
    ("mlp", "mse", "sum", 1),
    ("mlp", "bce", "mean", 7),
    ("mlp", "convex", "sum", 7),
    ("cnn", "weighted_ce", "sum", 1),
    ("shared_twice_direct_param", "mse", "mean", 1),
]


@pytest.mark.parametrize(("model_name", "loss_name", "reduction", "n"), case_params(DENSE_CASES))
def test_dense_quantities_match_reference(model_name: str, loss_name: str, reduction: str, n: int):
    model, loss_fn, inputs, targets = problem(model_name, loss_name, reduction, n)
    data = (inputs, targets)
    expected = reference_ggn(model, loss_fn, inputs, targets)
    dim = expected.shape[0]
    params = list(model.parameters())

    compare(
        curvkit.ggn_matrix(model, loss_fn, data), expected, rtol=RTOL, atol=ATOL
    ).assert_passed()

    generator = torch.Generator().manual_seed(3)
    vector = torch.randn(dim, generator=generator, dtype=torch.float64)
    product = curvkit.ggn_vector_product(model, loss_fn, data, vector)
    compare(product, expected @ vector, rtol=RTOL, atol=ATOL).assert_passed()
    sizes = [p.numel() for p in params]
    blocks = [c.reshape(p.shape) for c, p in zip(vector.split(sizes), params, strict=True)]
    product_list = curvkit.ggn_vector_product(model, loss_fn, data, blocks)
    assert isinstance(product_list, list)
    assert [p.shape for p in product_list] == [p.shape for p in params]
    compare(flat(product_list), expected @ vector, rtol=RTOL, atol=ATOL).assert_passed()

    indices = [dim - 1, 0, dim // 2, 1]
    columns = list(curvkit.ggn_columns(model, loss_fn, data, indices=indices, chunk_size=3))
    assert [i for i, _ in columns] == indices
    compare(
        [c for _, c in columns], [expected[:, i] for i in indices], rtol=RTOL, atol=ATOL
    ).assert_passed()

    operator = curvkit.GGNOperator(model, loss_fn, data)
    assert operator.shape == (dim, dim)
    matrix = torch.randn(dim, 4, generator=generator, dtype=torch.float64)
    compare(operator @ matrix, expected @ matrix, rtol=RTOL, atol=ATOL).assert_passed()
    compare(operator @ vector, expected @ vector, rtol=RTOL, atol=ATOL).assert_passed()


def test_all_columns_in_many_chunks_give_the_matrix():
    model, loss_fn, inputs, targets = problem("sequence_layernorm", "bce", "sum", 7)
    expected = reference_ggn(model, loss_fn, inputs, targets)
    columns = dict(curvkit.ggn_columns(model, loss_fn, (inputs, targets), chunk_size=5))
    assert sorted(columns) == list(range(expected.shape[0]))
    actual = torch.stack([columns[i] for i in range(expected.shape[0])], dim=1)
    compare(actual, expected, rtol=RTOL, atol=ATOL).assert_passed()


def test_dense_quantities_on_a_subset_of_params():
    model, loss_fn, inputs, targets = problem("shared_twice_direct_param", "ce", "mean", 7)
    all_params = list(model.parameters())
    params = [all_params[2], all_params[0]]
    data = (inputs, targets)
    expected = reference_ggn(model, loss_fn, inputs, targets, params=params)
    actual = curvkit.ggn_matrix(model, loss_fn, data, params=params)
    compare(actual, expected, rtol=RTOL, atol=ATOL).assert_passed()
    operator = curvkit.GGNOperator(model, loss_fn, data, params=params)
    identity = torch.eye(expected.shape[0], dtype=torch.float64)
    compare(operator @ identity, expected, rtol=RTOL, atol=ATOL).assert_passed()


def test_operator_with_scipy_eigsh_and_cg():
    model, loss_fn, inputs, targets = problem("mlp", "ce", "mean", 7)
    expected = reference_ggn(model, loss_fn, inputs, targets).numpy()
    linear_operator = curvkit.GGNOperator(model, loss_fn, (inputs, targets)).to_scipy()
    assert linear_operator.shape == expected.shape
    assert linear_operator.dtype == np.float64

    eigenvalues = eigsh(linear_operator, k=3, which="LA", return_eigenvectors=False)
    reference_eigenvalues = np.linalg.eigvalsh(expected)[-3:]
    np.testing.assert_allclose(np.sort(eigenvalues), reference_eigenvalues, rtol=1e-8)

    damped = linear_operator + 0.1 * aslinearoperator(np.eye(expected.shape[0]))
    rhs = np.random.default_rng(0).standard_normal(expected.shape[0])
    solution, info = cg(damped, rhs, rtol=1e-12, maxiter=1000)
    assert info == 0
    reference = np.linalg.solve(expected + 0.1 * np.eye(expected.shape[0]), rhs)
    np.testing.assert_allclose(solution, reference, rtol=1e-7, atol=1e-9)


def test_monte_carlo_operator_is_one_fixed_matrix():
    model, loss_fn, inputs, targets = problem("mlp", "ce", "mean", 7)
    data = (inputs, targets)
    generator = torch.Generator().manual_seed(5)
    operator = curvkit.GGNOperator(model, loss_fn, data, mc_samples=2, generator=generator)
    identity = torch.eye(operator.shape[0], dtype=torch.float64)
    first = operator @ identity
    compare(operator @ identity, first, rtol=0, atol=0).assert_passed()
    compare(first, first.T, rtol=1e-12, atol=ATOL).assert_passed()
    # Same generator state, same matrix; the exact GGN differs from the sample.
    again = curvkit.GGNOperator(
        model, loss_fn, data, mc_samples=2, generator=torch.Generator().manual_seed(5)
    )
    compare(again @ identity, first, rtol=0, atol=0).assert_passed()
    exact = reference_ggn(model, loss_fn, inputs, targets)
    assert not torch.allclose(first, exact)
