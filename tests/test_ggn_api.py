"""GGN quantities: Monte-Carlo convergence, differentiability, no side effects, bad input."""

from __future__ import annotations

import pytest
import torch
from test_ggn import ATOL, RTOL, flat, make_loss, problem
from torch import Tensor, nn

import curvkit
from curvkit.testing.verify import compare, reference_diag_ggn, reference_ggn

# ---------------------------------------------------------------------------------------------
# Monte-Carlo


@pytest.mark.parametrize(
    ("model_name", "loss_name"), [("mlp", "ce"), ("cnn", "bce"), ("mlp", "mse")]
)
def test_monte_carlo_mean_converges_to_exact_diagonal(model_name: str, loss_name: str):
    """Mean of T single-sample estimates within 6 standard errors of the exact diagonal.

    Each entry of an MC estimate is an average of i.i.d. draws with mean diag(G). Over T draws the
    error of the mean is about std / sqrt(T) (central limit theorem): 6 standard errors bound a
    Gaussian at a two-sided tail of 2e-9 per entry. The seed is fixed, so the test is
    deterministic; the bound says it is not tuned to the seed.
    """
    model, loss_fn, inputs, targets = problem(model_name, loss_name, "mean", 7)
    exact = flat(reference_diag_ggn(model, loss_fn, inputs, targets))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            flat(
                curvkit.diag_ggn(
                    model, loss_fn, (inputs, targets), mc_samples=1, generator=generator
                )
            )
            for _ in range(300)
        ]
    )
    mean, std = draws.mean(dim=0), draws.std(dim=0)
    assert (std > 0).any()  # the estimates are random, not the exact diagonal
    standard_error = std / 300**0.5
    assert ((mean - exact).abs() <= 6 * standard_error + 1e-12).all()
    # One call with M samples averages M draws: its error shrinks like 1 / sqrt(M).
    many = flat(
        curvkit.diag_ggn(model, loss_fn, (inputs, targets), mc_samples=4000, generator=generator)
    )
    assert ((many - exact).abs() <= 6 * std / 4000**0.5 + 1e-12).all()


def test_monte_carlo_is_reproducible_with_a_generator():
    model, loss_fn, inputs, targets = problem("residual", "ce", "sum", 7)
    data = (inputs, targets)
    first = curvkit.diag_ggn(
        model, loss_fn, data, mc_samples=3, generator=torch.Generator().manual_seed(4)
    )
    second = curvkit.diag_ggn(
        model, loss_fn, data, mc_samples=3, generator=torch.Generator().manual_seed(4)
    )
    other = curvkit.diag_ggn(
        model, loss_fn, data, mc_samples=3, generator=torch.Generator().manual_seed(5)
    )
    compare(first, second, rtol=0, atol=0).assert_passed()
    assert not torch.equal(flat(first), flat(other))


# ---------------------------------------------------------------------------------------------
# gauss_newton_diagonal(create_graph=True) by finite differences


def _objective(diagonal: list[Tensor], weights: list[Tensor]) -> Tensor:
    return sum((d * w).sum() for d, w in zip(diagonal, weights, strict=True))


# Smooth models only: finite differences across a ReLU's kink would not match the derivative.
@pytest.mark.parametrize("model_name", ["residual", "cnn1d", "shared_twice_direct_param"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gauss_newton_diagonal_is_differentiable(model_name: str, reduction: str):
    model, loss_fn, inputs, targets = problem(model_name, "mse", reduction, 5)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(2)
    weights = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]

    diagonal = curvkit.gauss_newton_diagonal(model, loss_fn, inputs, targets, create_graph=True)
    compare(
        [d.detach() for d in diagonal],
        reference_diag_ggn(model, loss_fn, inputs, targets),
        rtol=RTOL,
    ).assert_passed()
    # the last bias's diagonal is constant for least squares: its gradient is zero
    gradient = torch.autograd.grad(
        _objective(diagonal, weights), params, allow_unused=True, materialize_grads=True
    )
    directional = sum((g * d).sum() for g, d in zip(gradient, direction, strict=True))

    def objective_at(step: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(step * d)
        try:
            value = _objective(
                curvkit.gauss_newton_diagonal(model, loss_fn, inputs, targets), weights
            )
        finally:
            with torch.no_grad():
                for p, d in zip(params, direction, strict=True):
                    p.sub_(step * d)
        return value.item()

    # fourth-order central differences: truncation error O(h^4), rounding error O(eps / h)
    h = 1e-4
    finite_difference = (
        -objective_at(2 * h) + 8 * objective_at(h) - 8 * objective_at(-h) + objective_at(-2 * h)
    ) / (12 * h)
    assert abs(directional.item()) > 1e-6
    assert abs(finite_difference - directional.item()) <= 1e-8 * abs(directional.item())


def test_gauss_newton_diagonal_without_create_graph_is_detached():
    model, loss_fn, inputs, targets = problem("mlp", "mse", "mean", 3)
    assert all(
        d.grad_fn is None for d in curvkit.gauss_newton_diagonal(model, loss_fn, inputs, targets)
    )


# ---------------------------------------------------------------------------------------------
# no side effects


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def test_calls_leave_model_parameters_and_grads_untouched():
    model, loss_fn, inputs, targets = problem("cnn2d_batchnorm_eval", "ce", "mean", 4)
    data = (inputs, targets)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [torch.full_like(p, 0.5) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    attributes = [set(vars(p)) for p in model.parameters()]
    hooks = _hook_count(model)
    dim = sum(p.numel() for p in model.parameters())

    def run_all() -> list[Tensor]:
        vector = torch.ones(dim, dtype=torch.float64)
        mse, regression_targets = make_loss("mse", "sum", model(inputs))
        curvkit.diag_ggn(model, loss_fn, [data, data], mc_samples=2)
        results = [
            *curvkit.diag_ggn(model, loss_fn, data),
            curvkit.ggn_vector_product(model, loss_fn, data, vector),
            curvkit.ggn_matrix(model, loss_fn, data),
            *(c for _, c in curvkit.ggn_columns(model, loss_fn, data, indices=[0, 5])),
            curvkit.GGNOperator(model, loss_fn, [data]) @ vector,
            *curvkit.gauss_newton_diagonal(
                model, mse, inputs, regression_targets, create_graph=True
            ),
        ]
        return [r.detach() for r in results]

    first = run_all()
    assert model.training is False
    assert _hook_count(model) == hooks
    assert [set(vars(p)) for p in model.parameters()] == attributes
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is g
        assert torch.equal(g, torch.full_like(p, 0.5))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # repeated calls give the same numbers, bit for bit
    for a, b in zip(first, run_all(), strict=True):
        assert torch.equal(a, b)


def test_batchnorm_in_training_mode_is_refused():
    model, loss_fn, inputs, targets = problem("cnn2d_batchnorm_eval", "ce", "mean", 4)
    model.train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        curvkit.diag_ggn(model, loss_fn, (inputs, targets))
    vector = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        curvkit.ggn_vector_product(model, loss_fn, (inputs, targets), vector)
    assert model.training


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def mlp_problem():
    return problem("mlp", "ce", "mean", 3)


def test_bad_model_loss_and_options(mlp_problem):
    model, loss_fn, inputs, targets = mlp_problem
    data = (inputs, targets)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        curvkit.diag_ggn(lambda x: x, loss_fn, data)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        curvkit.diag_ggn(model, "ce", data)
    with pytest.raises(ValueError, match="mc_samples"):
        curvkit.diag_ggn(model, loss_fn, data, mc_samples=-1)
    with pytest.raises(TypeError, match="mc_samples"):
        curvkit.diag_ggn(model, loss_fn, data, mc_samples=1.0)
    with pytest.raises(TypeError, match="mc_samples"):
        curvkit.GGNOperator(model, loss_fn, data, mc_samples=True)
    with pytest.raises(TypeError, match="generator"):
        curvkit.diag_ggn(model, loss_fn, data, mc_samples=1, generator=0)
    with pytest.raises(ValueError, match="NLLLoss"):
        curvkit.diag_ggn(model, nn.NLLLoss(), data)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="require"):
        curvkit.diag_ggn(frozen, loss_fn, (torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)))


@pytest.mark.parametrize(
    ("make_params", "error", "message"),
    [
        (lambda m: next(m.parameters()), TypeError, "single tensor"),
        (lambda m: [nn.Parameter(torch.zeros(2))], ValueError, "not a parameter of the model"),
        (lambda m: [next(m.parameters())] * 2, ValueError, "same group"),
        (lambda m: [], ValueError, "empty"),
        (lambda m: [{"params": list(m.parameters()), "lr": 1.0}], ValueError, "unknown option"),
        (lambda m: [{"weights": list(m.parameters())}], ValueError, "no 'params' key"),
        (lambda m: ["weight"], TypeError, "not a tensor"),
    ],
)
def test_bad_params(mlp_problem, make_params, error, message):
    model, loss_fn, inputs, targets = mlp_problem
    for function in (curvkit.diag_ggn, curvkit.ggn_matrix, curvkit.GGNOperator):
        with pytest.raises(error, match=message):
            function(model, loss_fn, (inputs, targets), params=make_params(model))


def test_frozen_param_is_refused(mlp_problem):
    model, loss_fn, inputs, targets = mlp_problem
    first = next(model.parameters())
    first.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        curvkit.diag_ggn(model, loss_fn, (inputs, targets), params=[first])


def test_bad_vectors(mlp_problem):
    model, loss_fn, inputs, targets = mlp_problem
    data = (inputs, targets)
    params = list(model.parameters())
    dim = sum(p.numel() for p in params)
    product = curvkit.ggn_vector_product
    with pytest.raises(ValueError, match=rf"shape \[{dim}\]"):
        product(model, loss_fn, data, torch.zeros(dim + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"shape \[{dim}\]"):
        product(model, loss_fn, data, torch.zeros(dim, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        product(model, loss_fn, data, torch.zeros(dim))
    with pytest.raises(ValueError, match="meta"):
        product(model, loss_fn, data, torch.zeros(dim, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="3 tensors"):
        product(model, loss_fn, data, [torch.zeros_like(p) for p in params[:3]])
    with pytest.raises(ValueError, match="vector\\[1\\] has shape"):
        product(
            model,
            loss_fn,
            data,
            [torch.zeros_like(p) for p in params[:1]] + [params[0]] * (len(params) - 1),
        )
    with pytest.raises(TypeError, match="vector\\[0\\] is a float"):
        product(model, loss_fn, data, [0.0] * len(params))
    with pytest.raises(TypeError, match="one flat tensor or a list"):
        product(model, loss_fn, data, 3)


def test_bad_indices_and_chunk_size(mlp_problem):
    model, loss_fn, inputs, targets = mlp_problem
    data = (inputs, targets)
    dim = sum(p.numel() for p in model.parameters())
    columns = curvkit.ggn_columns
    with pytest.raises(ValueError, match="out of range"):
        columns(model, loss_fn, data, indices=[dim])
    with pytest.raises(ValueError, match="out of range"):
        columns(model, loss_fn, data, indices=[-1])
    with pytest.raises(TypeError, match="integers"):
        columns(model, loss_fn, data, indices=[0.0])
    with pytest.raises(TypeError, match="integers"):
        columns(model, loss_fn, data, indices=[True])
    with pytest.raises(TypeError, match="integers"):
        columns(model, loss_fn, data, indices=torch.zeros(2))
    with pytest.raises(ValueError, match="chunk_size"):
        columns(model, loss_fn, data, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        columns(model, loss_fn, data, chunk_size="2")
    # tensor indices and an empty selection are fine
    assert [i for i, _ in columns(model, loss_fn, data, indices=torch.tensor([2, 1]))] == [2, 1]
    assert list(columns(model, loss_fn, data, indices=[])) == []


def test_bad_operator_use(mlp_problem):
    model, loss_fn, inputs, targets = mlp_problem
    operator = curvkit.GGNOperator(model, loss_fn, (inputs, targets))
    dim = operator.shape[0]
    assert operator.dtype == torch.float64
    assert operator.device == torch.device("cpu")
    assert "GGNOperator" in repr(operator)
    with pytest.raises(ValueError, match="multiplies tensors of shape"):
        operator @ torch.zeros(dim + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="multiplies tensors of shape"):
        operator @ torch.zeros(dim, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        operator @ torch.zeros(dim)
    with pytest.raises(TypeError):
        operator @ [0.0] * dim
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    mixed[1].double()
    with pytest.raises(ValueError, match="one dtype and device"):
        curvkit.GGNOperator(mixed, nn.MSELoss(), (torch.zeros(1, 2), torch.zeros(1, 2)))


def test_gauss_newton_diagonal_needs_mse(mlp_problem):
    model, loss_fn, inputs, targets = mlp_problem
    with pytest.raises(ValueError, match="diag_ggn"):
        curvkit.gauss_newton_diagonal(model, loss_fn, inputs, targets)
    mse, regression_targets = make_loss("mse", "mean", model(inputs))
    with pytest.raises(TypeError, match="create_graph"):
        curvkit.gauss_newton_diagonal(model, mse, inputs, regression_targets, create_graph=1)
    with pytest.raises(TypeError, match="targets of data"):
        curvkit.gauss_newton_diagonal(model, mse, inputs, [1.0])


def test_subclass_of_mse_is_accepted_only_when_it_is_mse():
    model, _, inputs, targets = problem("mlp", "mse", "sum", 3)

    class Scaled(nn.MSELoss):
        def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
            return 3 * super().forward(outputs, targets)

    # a subclass is still least squares: the diagonal follows its own (scaled) loss
    expected = reference_diag_ggn(model, Scaled(reduction="sum"), inputs, targets)
    actual = curvkit.gauss_newton_diagonal(model, Scaled(reduction="sum"), inputs, targets)
    compare(actual, expected, rtol=RTOL, atol=ATOL).assert_passed()


class _SquareWithoutForwardMode(torch.autograd.Function):
    """x ** 2 with a backward rule only, so that forward-mode AD cannot pass through it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _NoForwardMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.second = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(_SquareWithoutForwardMode.apply(torch.tanh(self.first(x))))


def test_vector_product_without_forward_mode_rules():
    torch.manual_seed(0)
    model = _NoForwardMode().double()
    inputs = torch.randn(6, 4, dtype=torch.float64)
    loss_fn, targets = make_loss("ce", "sum", model(inputs))
    expected = reference_ggn(model, loss_fn, inputs, targets)
    vector = torch.randn(expected.shape[0], dtype=torch.float64)
    product = curvkit.ggn_vector_product(model, loss_fn, (inputs, targets), vector)
    compare(product, expected @ vector, rtol=RTOL, atol=ATOL).assert_passed()


@pytest.mark.parametrize("model_name", ["cnn", "attention", "two_inputs"])
def test_chunks_of_samples_and_columns_give_the_same_result(model_name: str):
    model, loss_fn, inputs, targets = problem(model_name, "ce", "mean", 7)
    data = (inputs, targets)
    diagonal = curvkit.diag_ggn(model, loss_fn, data)
    matrix = curvkit.ggn_matrix(model, loss_fn, data)
    for samples, columns in [(3, None), (None, 2), (2, 1)]:
        chunked = curvkit.diag_ggn(
            model, loss_fn, data, sample_chunk_size=samples, column_chunk_size=columns
        )
        compare(chunked, diagonal, rtol=RTOL, atol=ATOL).assert_passed()
        chunked_matrix = curvkit.ggn_matrix(
            model, loss_fn, data, sample_chunk_size=samples, column_chunk_size=columns
        )
        compare(chunked_matrix, matrix, rtol=RTOL, atol=ATOL).assert_passed()
    # Monte-Carlo: the columns are drawn once for the whole batch, so chunks change nothing.
    generator_state = torch.Generator().manual_seed(3).get_state()
    whole, chunked = (
        curvkit.diag_ggn(
            model,
            loss_fn,
            data,
            mc_samples=2,
            generator=torch.Generator().set_state(generator_state),
            sample_chunk_size=size,
        )
        for size in (None, 2)
    )
    compare(chunked, whole, rtol=RTOL, atol=ATOL).assert_passed()


def test_bad_chunk_sizes(mlp_problem):
    model, loss_fn, inputs, targets = mlp_problem
    data = (inputs, targets)
    with pytest.raises(ValueError, match="sample_chunk_size must be positive"):
        curvkit.diag_ggn(model, loss_fn, data, sample_chunk_size=0)
    with pytest.raises(TypeError, match="column_chunk_size"):
        curvkit.ggn_matrix(model, loss_fn, data, column_chunk_size=1.5)
