"""GGN quantities against the plain-autograd references of curvkit.verify, on a model zoo."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator, cg, eigsh
from torch import Tensor, nn

import curvkit
from curvkit.verify import compare, reference_diag_ggn, reference_ggn

RTOL = 1e-9
ATOL = 1e-12
OUT = 3  # every model of the zoo returns [N, OUT]


# ---------------------------------------------------------------------------------------------
# model zoo: each builder returns (model, inputs of N samples), float64, eval mode


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4))
        self.head = nn.Linear(4, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(x + self.inner(x)))


class Shared(nn.Module):
    """One Linear layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.sigmoid(self.shared(torch.tanh(self.shared(x)))))


class Custom(nn.Module):
    """Parameters used directly in forward, outside any submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 5) / 2)
        self.scale = nn.Parameter(torch.randn(5))
        self.head = nn.Linear(5, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(x @ self.weight) * self.scale)


class EmbeddingBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.head = nn.Linear(4, OUT)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embedding(tokens)).mean(dim=1))


class Attention(nn.Module):
    """A small pre-norm transformer block over 3 tokens of width 4."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.attention = nn.MultiheadAttention(4, num_heads=2, batch_first=True)
        self.head = nn.Linear(12, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        # need_weights=True takes the explicit softmax path: the fused CPU kernel has no double
        # backward, which the plain-autograd reference needs.
        attended, _ = self.attention(h, h, h, need_weights=True)
        return self.head((x + attended).flatten(start_dim=1))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, OUT)
        self.b = nn.Linear(2, OUT, bias=False)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return torch.tanh(self.a(x)) + self.b(z)


def _randomize_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)


def build(name: str, n: int, seed: int = 0) -> tuple[nn.Module, Tensor | tuple[Tensor, ...]]:
    """Return the zoo model ``name`` (float64, eval mode) and inputs of ``n`` samples."""
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, OUT))
        inputs = torch.randn(n, 5)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 2, 2),
            nn.Flatten(),
            nn.Linear(2, OUT),
        )
        _randomize_batchnorm(model)
        inputs = torch.randn(n, 2, 4, 4)
    elif name == "conv1d":
        model = nn.Sequential(
            nn.Conv1d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(9, OUT)
        )
        inputs = torch.randn(n, 2, 7)
    elif name == "conv3d":
        model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(16, OUT))
        inputs = torch.randn(n, 1, 3, 3, 3)
    elif name == "residual":
        model, inputs = Residual(), torch.randn(n, 4)
    elif name == "layernorm":
        model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, OUT))
        inputs = torch.randn(n, 4)
    elif name == "embedding":
        model, inputs = EmbeddingBag(), torch.randint(0, 10, (n, 5))
    elif name == "attention":
        model, inputs = Attention(), torch.randn(n, 3, 4)
    elif name == "shared":
        model, inputs = Shared(), torch.randn(n, 4)
    elif name == "custom":
        model, inputs = Custom(), torch.randn(n, 4)
    elif name == "two_inputs":
        model, inputs = TwoInputs(), (torch.randn(n, 3), torch.randn(n, 2))
    else:
        raise KeyError(name)
    model = model.double().eval()
    if isinstance(inputs, Tensor) and inputs.is_floating_point():
        inputs = inputs.double()
    elif isinstance(inputs, tuple):
        inputs = tuple(x.double() for x in inputs)
    return model, inputs


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
    name: str, reduction: str, n: int
) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
    """Return the loss ``name`` and targets for ``n`` outputs of width ``OUT``."""
    generator = torch.Generator().manual_seed(1)
    if name == "mse":
        return nn.MSELoss(reduction=reduction), torch.randn(n, OUT, generator=generator).double()
    if name == "ce":
        return nn.CrossEntropyLoss(reduction=reduction), torch.randint(
            0, OUT, (n,), generator=generator
        )
    if name == "weighted_ce":
        weight = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
        return nn.CrossEntropyLoss(weight=weight, reduction=reduction), torch.randint(
            0, OUT, (n,), generator=generator
        )
    if name == "bce":
        targets = torch.rand(n, OUT, generator=generator).double()
        return nn.BCEWithLogitsLoss(reduction=reduction), targets
    if name == "convex":
        return ConvexLoss(reduction), torch.randn(n, OUT, generator=generator).double()
    raise KeyError(name)


MODELS = [
    "mlp",
    "cnn",
    "conv1d",
    "conv3d",
    "residual",
    "layernorm",
    "embedding",
    "attention",
    "shared",
    "custom",
    "two_inputs",
]
LOSSES = ["mse", "ce", "bce", "convex"]


def problem(model_name: str, loss_name: str, reduction: str, n: int):
    model, inputs = build(model_name, n)
    loss_fn, targets = make_loss(loss_name, reduction, n)
    return model, loss_fn, inputs, targets


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------------------------------------
# diagonal


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("model_name", MODELS)
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
    ("shared", "mse", "mean", 1),
]


@pytest.mark.parametrize(("model_name", "loss_name", "reduction", "n"), DENSE_CASES)
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
    model, loss_fn, inputs, targets = problem("layernorm", "bce", "sum", 7)
    expected = reference_ggn(model, loss_fn, inputs, targets)
    columns = dict(curvkit.ggn_columns(model, loss_fn, (inputs, targets), chunk_size=5))
    assert sorted(columns) == list(range(expected.shape[0]))
    actual = torch.stack([columns[i] for i in range(expected.shape[0])], dim=1)
    compare(actual, expected, rtol=RTOL, atol=ATOL).assert_passed()


def test_dense_quantities_on_a_subset_of_params():
    model, loss_fn, inputs, targets = problem("custom", "ce", "mean", 7)
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
