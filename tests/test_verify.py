"""The plain-autograd references against closed forms and against torch.autograd.functional."""

import copy
import re

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from curvkit.testing.verify import (
    ComparisonReport,
    compare,
    reference_diag_ggn,
    reference_factor_columns,
    reference_ggn,
    reference_hessian,
    reference_output_hessian,
    reference_per_sample_gradients,
)
from curvkit.testing.zoo import make_case

DTYPE = torch.float64
REDUCTIONS = ["mean", "sum"]
BATCH_SIZES = [1, 5]


def assert_close(actual: Tensor, expected: Tensor) -> None:
    # Independent of curvkit.compare, which is itself under test here.
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def linear_data(n: int, c: int = 3, i: int = 4):
    torch.manual_seed(n)
    model = nn.Linear(i, c).to(DTYPE)
    x = torch.randn(n, i, dtype=DTYPE)
    return model, x


def with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def linear_layout(blocks: Tensor, i: int) -> Tensor:
    """Reorder a matrix over (c, [x, 1]) pairs into curvkit's (weight, bias) layout."""
    c = blocks.shape[0] // (i + 1)
    order = [k * (i + 1) + j for k in range(c) for j in range(i)] + [
        k * (i + 1) + i for k in range(c)
    ]
    return blocks[order][:, order]


def softmax_hessians(logits: Tensor, scale: float) -> Tensor:
    p = logits.softmax(dim=1)
    return scale * (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# Closed forms: a linear model with MSE and with cross-entropy (GGN = Hessian there)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", BATCH_SIZES)
def test_linear_mse_ggn_and_hessian_closed_form(n, reduction):
    c, i = 3, 4
    model, x = linear_data(n, c, i)
    y = torch.randn(n, c, dtype=DTYPE)
    loss_fn = nn.MSELoss(reduction=reduction)
    # L = r sum_n ||W x_n + b - y_n||^2 gives, per output c, the block 2 r X~^T X~ over (w_c, b_c).
    r = 1 / (n * c) if reduction == "mean" else 1.0
    x1 = with_ones(x)
    expected = linear_layout(torch.kron(torch.eye(c, dtype=DTYPE), 2 * r * x1.T @ x1), i)

    assert_close(reference_ggn(model, loss_fn, x, y), expected)
    assert_close(reference_hessian(model, loss_fn, x, y), expected)
    diag = reference_diag_ggn(model, loss_fn, x, y)
    assert_close(diag[0], (2 * r * x.square().sum(0)).expand(c, i))
    assert_close(diag[1], torch.full((c,), 2 * r * n, dtype=DTYPE))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", BATCH_SIZES)
def test_linear_cross_entropy_ggn_and_hessian_closed_form(n, reduction):
    c, i = 3, 4
    model, x = linear_data(n, c, i)
    y = torch.randint(0, c, (n,))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    r = 1 / n if reduction == "mean" else 1.0
    with torch.no_grad():
        a = softmax_hessians(model(x), r)
    x1 = with_ones(x)
    # G = sum_n A_n (x) x~_n x~_n^T over (c, [x, 1]); linear outputs make G the Hessian.
    expected = linear_layout(sum(torch.kron(a[k], torch.outer(x1[k], x1[k])) for k in range(n)), i)

    assert_close(reference_ggn(model, loss_fn, x, y), expected)
    assert_close(reference_hessian(model, loss_fn, x, y), expected)
    assert_close(reference_output_hessian(loss_fn, model(x), y), a)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", BATCH_SIZES)
def test_linear_mse_per_sample_gradients_closed_form(n, reduction):
    c, i = 3, 4
    model, x = linear_data(n, c, i)
    y = torch.randn(n, c, dtype=DTYPE)
    # A batch of one: the mean is over the c outputs only.
    r = 1 / c if reduction == "mean" else 1.0
    with torch.no_grad():
        residual = model(x) - y
    weight, bias = reference_per_sample_gradients(model, nn.MSELoss(reduction=reduction), x, y)
    assert_close(weight, 2 * r * residual.unsqueeze(2) * x.unsqueeze(1))
    assert_close(bias, 2 * r * residual)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", BATCH_SIZES)
def test_mse_output_hessian_closed_form_multidimensional(n, reduction):
    torch.manual_seed(0)
    outputs = torch.randn(n, 2, 3, dtype=DTYPE)
    targets = torch.randn(n, 2, 3, dtype=DTYPE)
    r = 1 / (n * 6) if reduction == "mean" else 1.0
    expected = 2 * r * torch.eye(6, dtype=DTYPE).reshape(2, 3, 2, 3).expand(n, 2, 3, 2, 3)
    actual = reference_output_hessian(nn.MSELoss(reduction=reduction), outputs, targets)
    assert actual.shape == (n, 2, 3, 2, 3)
    assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------
# Nonlinear models: against J^T H J and the Hessian from torch.autograd.functional
# ---------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def conv() -> nn.Module:
    # Outputs [N, C=3, L=4]: cross-entropy over C for each of the L positions.
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Sigmoid(), nn.Conv1d(3, 3, 1)).to(DTYPE)


def case(name: str, n: int, reduction: str):
    torch.manual_seed(10 * n + len(name))
    if name == "mlp-ce":
        return (
            mlp(),
            nn.CrossEntropyLoss(reduction=reduction),
            torch.randn(n, 4, dtype=DTYPE),
            torch.randint(0, 3, (n,)),
        )
    if name == "mlp-mse":
        return (
            mlp(),
            nn.MSELoss(reduction=reduction),
            torch.randn(n, 4, dtype=DTYPE),
            torch.randn(n, 3, dtype=DTYPE),
        )
    if name == "mlp-bce":
        return (
            mlp(),
            nn.BCEWithLogitsLoss(reduction=reduction, pos_weight=torch.rand(3, dtype=DTYPE)),
            torch.randn(n, 4, dtype=DTYPE),
            torch.rand(n, 3, dtype=DTYPE),
        )
    assert name == "conv-ce"
    return (
        conv(),
        nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1),
        torch.randn(n, 2, 4, dtype=DTYPE),
        torch.randint(0, 3, (n, 4)),
    )


CASES = ["mlp-ce", "mlp-mse", "mlp-bce", "conv-ce"]


def as_function_of_flat_params(model: nn.Module, inputs: Tensor):
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(theta: Tensor) -> Tensor:
        split = theta.split([s.numel() for s in shapes])
        params = {k: v.reshape(s) for k, v, s in zip(names, split, shapes, strict=True)}
        return functional_call(model, params, (inputs,))

    return outputs, flat


def functional_ggn_and_hessian(model, loss_fn, x, y):
    outputs, flat = as_function_of_flat_params(model, x)
    f = outputs(flat).detach()
    j = jacobian(outputs, flat).reshape(f.numel(), flat.numel())
    h = hessian(lambda out: loss_fn(out.reshape(f.shape), y), f.reshape(-1))
    return j.T @ h @ j, hessian(lambda theta: loss_fn(outputs(theta), y), flat)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("name", CASES)
def test_ggn_and_hessian_match_autograd_functional(name, n, reduction):
    model, loss_fn, x, y = case(name, n, reduction)
    expected_ggn, expected_hessian = functional_ggn_and_hessian(model, loss_fn, x, y)

    ggn = reference_ggn(model, loss_fn, x, y)
    assert_close(ggn, expected_ggn)
    assert_close(reference_hessian(model, loss_fn, x, y), expected_hessian)
    assert_close(
        torch.cat([d.flatten() for d in reference_diag_ggn(model, loss_fn, x, y)]),
        expected_ggn.diagonal(),
    )
    assert_close(ggn, ggn.T)
    assert torch.linalg.eigvalsh(ggn).min() > -1e-12 * ggn.abs().max()


def test_ggn_differs_from_hessian_for_a_nonlinear_model():
    model, loss_fn, x, y = case("mlp-ce", 5, "mean")
    ggn = reference_ggn(model, loss_fn, x, y)
    difference = (reference_hessian(model, loss_fn, x, y) - ggn).abs().max()
    assert difference > 1e-3 * ggn.abs().max()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("name", CASES)
def test_per_sample_gradients_match_single_sample_gradients(name, n, reduction):
    model, loss_fn, x, y = case(name, n, reduction)
    outputs, flat = as_function_of_flat_params(model, x)
    expected = torch.stack(
        [
            jacobian(lambda theta, k=k: loss_fn(outputs(theta)[k : k + 1], y[k : k + 1]), flat)
            for k in range(n)
        ]
    )
    actual = reference_per_sample_gradients(model, loss_fn, x, y)
    assert [g.shape for g in actual] == [(n, *p.shape) for p in model.parameters()]
    assert_close(torch.cat([g.reshape(n, -1) for g in actual], dim=1), expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", BATCH_SIZES)
def test_output_hessian_of_weighted_cross_entropy_closed_form(n, reduction):
    torch.manual_seed(3)
    logits, targets = torch.randn(n, 4, dtype=DTYPE), torch.randint(0, 4, (n,))
    weight = torch.rand(4, dtype=DTYPE) + 0.5
    loss_fn = nn.CrossEntropyLoss(weight=weight, reduction=reduction)
    # Sample n's term is w_{y_n} l_n, over the summed weights for a mean.
    scale = weight[targets] / (weight[targets].sum() if reduction == "mean" else 1.0)
    expected = scale[:, None, None] * softmax_hessians(logits, 1.0)
    assert_close(reference_output_hessian(loss_fn, logits, targets), expected)


def test_params_subset_and_order_select_blocks_of_the_full_matrices():
    model, loss_fn, x, y = case("mlp-ce", 5, "mean")
    params = list(model.parameters())
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    chosen = [2, 0]  # last layer's weight, then the first layer's weight
    index = torch.cat([torch.arange(offsets[k], offsets[k + 1]) for k in chosen])
    subset = [params[k] for k in chosen]

    full_ggn = reference_ggn(model, loss_fn, x, y)
    full_hessian = reference_hessian(model, loss_fn, x, y)
    assert_close(reference_ggn(model, loss_fn, x, y, params=subset), full_ggn[index][:, index])
    assert_close(
        reference_hessian(model, loss_fn, x, y, params=iter(subset)),
        full_hessian[index][:, index],
    )
    diag = reference_diag_ggn(model, loss_fn, x, y, params=subset)
    assert [d.shape for d in diag] == [p.shape for p in subset]
    per_sample = reference_per_sample_gradients(model, loss_fn, x, y, params=subset)
    all_per_sample = reference_per_sample_gradients(model, loss_fn, x, y)
    for actual, k in zip(per_sample, chosen, strict=True):
        assert_close(actual, all_per_sample[k])


def test_params_none_skips_frozen_parameters():
    model, loss_fn, x, y = case("mlp-ce", 3, "sum")
    model[0].bias.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert_close(
        reference_ggn(model, loss_fn, x, y), reference_ggn(model, loss_fn, x, y, trainable)
    )
    assert len(reference_per_sample_gradients(model, loss_fn, x, y)) == 3


def test_tuple_inputs_and_unused_parameters():
    case = make_case("two_inputs", 4)
    model, loss_fn, (x1, x2), y = case.model, case.loss_fn, case.inputs, case.targets

    names = [name for name, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def outputs(theta):
        split = theta.split([s.numel() for s in shapes])
        params = {k: v.reshape(s) for k, v, s in zip(names, split, shapes, strict=True)}
        return functional_call(model, params, (x1, x2))

    f = outputs(flat).detach()
    j = jacobian(outputs, flat).reshape(f.numel(), -1)
    h = hessian(lambda out: loss_fn(out.reshape(f.shape), y), f.reshape(-1))
    ggn = reference_ggn(model, loss_fn, (x1, x2), y)
    assert_close(ggn, j.T @ h @ j)
    # The unused parameter (registered first, so the first entries) has zero rows and columns.
    assert names[0] == "unused"
    unused = model.unused.numel()
    assert ggn[:unused].abs().max() == 0 and ggn[:, :unused].abs().max() == 0
    assert ggn[unused:].abs().max() > 0
    assert reference_hessian(model, loss_fn, (x1, x2), y)[:unused].abs().max() == 0
    per_sample = reference_per_sample_gradients(model, loss_fn, (x1, x2), y)
    assert per_sample[0].shape == (4, unused) and per_sample[0].abs().max() == 0
    (expected,) = torch.autograd.grad(loss_fn(model(x1[2:3], x2[2:3]), y[2:3]), model.a.weight)
    assert_close(per_sample[1][2], expected)


def test_operations_without_batching_rule_fall_back_to_a_loop():
    case = make_case("unbatchable_backward", 4)
    checked, loss_fn, (x,), y = case.model, case.loss_fn, case.inputs, case.targets
    # The same function, without the custom backward that vmap cannot batch.
    plain = copy.deepcopy(checked)
    plain[1].forward = lambda h: plain[1].factor * h
    with pytest.raises(RuntimeError):  # the reason for the fallback
        out = checked(x)
        torch.autograd.grad(
            out, x.requires_grad_(), torch.ones(2, *out.shape), is_grads_batched=True
        )
    x = x.detach()
    assert_close(reference_ggn(checked, loss_fn, x, y), reference_ggn(plain, loss_fn, x, y))
    assert_close(reference_hessian(checked, loss_fn, x, y), reference_hessian(plain, loss_fn, x, y))


def test_factor_columns_of_a_linear_layer_are_outer_products():
    model = nn.Linear(3, 2).to(DTYPE)
    x = torch.randn(5, 3, dtype=DTYPE)
    columns = torch.randn(4, 5, 2, dtype=DTYPE)
    weight, bias = reference_factor_columns(model, x, columns)
    assert_close(weight, torch.einsum("knc,ni->knci", columns, x))
    assert_close(bias, columns)
    with pytest.raises(ValueError, match=r"shape \(1, 2\), the columns .* \(4, 5, 1\)"):
        reference_factor_columns(model, x, columns[..., :1])
    with pytest.raises(ValueError, match=r"columns must be \[K, N, \*out\], got shape \(2,\)"):
        reference_factor_columns(model, x, columns[0, 0])


def test_factor_columns_from_the_loss_hessian_square_root_give_the_ggn():
    """MSE with mean reduction: S_n = sqrt(2 / (N C)) I, so V V^T is the GGN."""
    case = make_case("two_inputs", 4)
    model, inputs, targets = case.model, case.inputs, case.targets
    num_samples, num_outputs = targets.shape
    eye = torch.eye(num_outputs, dtype=DTYPE)
    columns = (2 / targets.numel()) ** 0.5 * eye[:, None, :].expand(-1, num_samples, -1)
    factor = reference_factor_columns(model, inputs, columns, create_graph=True)
    flat = torch.cat([f.reshape(num_outputs * num_samples, -1) for f in factor], dim=1)
    assert_close(flat.T @ flat, reference_ggn(model, case.loss_fn, inputs, targets))
    assert flat.requires_grad


def test_references_leave_model_parameters_and_grads_alone():
    model, loss_fn, x, y = case("mlp-ce", 3, "mean")
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = [p.detach().clone() for p in model.parameters()]
    reference_ggn(model, loss_fn, x, y)
    reference_diag_ggn(model, loss_fn, x, y)
    reference_hessian(model, loss_fn, x, y)
    reference_per_sample_gradients(model, loss_fn, x, y)
    outputs = model(x).detach()
    reference_output_hessian(loss_fn, outputs, y)
    assert not outputs.requires_grad
    assert model.training
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    assert x.grad is None and not x.requires_grad


# ---------------------------------------------------------------------------------------------
# Errors of the references
# ---------------------------------------------------------------------------------------------


REFERENCES = [reference_ggn, reference_diag_ggn, reference_hessian, reference_per_sample_gradients]


@pytest.mark.parametrize("reference", REFERENCES)
def test_bad_params_are_refused(reference):
    model, loss_fn, x, y = case("mlp-ce", 2, "mean")
    other = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="wrap a single tensor in a list"):
        reference(model, loss_fn, x, y, params=model[0].weight)
    with pytest.raises(TypeError, match=r"params\[1\] is a str, not a tensor"):
        reference(model, loss_fn, x, y, params=[model[0].weight, "bias"])
    with pytest.raises(ValueError, match=r"params\[0\] is not a parameter of the model"):
        reference(model, loss_fn, x, y, params=[other.weight])
    with pytest.raises(ValueError, match=r"params\[1\] is listed twice"):
        reference(model, loss_fn, x, y, params=[model[0].weight, model[0].weight])
    with pytest.raises(ValueError, match="params is empty"):
        reference(model, loss_fn, x, y, params=[])
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"params\[0\] does not require grad"):
        reference(model, loss_fn, x, y, params=[model[0].weight])
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        reference(model, loss_fn, x, y)


@pytest.mark.parametrize("reference", REFERENCES)
def test_non_scalar_loss_is_refused(reference):
    model, _, x, y = case("mlp-ce", 2, "mean")
    with pytest.raises(
        ValueError, match=r"scalar tensor \(reduction 'mean' or 'sum'\), got \([12],\)"
    ):
        reference(model, nn.CrossEntropyLoss(reduction="none"), x, y)


class Summed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).sum()


@pytest.mark.parametrize("reference", REFERENCES)
def test_model_without_batched_tensor_output_is_refused(reference):
    model = Summed().to(DTYPE)

    def loss_fn(outputs, targets):
        return (outputs - targets).square().sum()

    x, y = torch.randn(2, 3, dtype=DTYPE), torch.zeros(2, dtype=DTYPE)
    with pytest.raises(ValueError, match="one tensor whose first axis indexes the samples"):
        reference(model, loss_fn, x, y)


def test_per_sample_gradients_need_matching_samples():
    model, loss_fn, x, y = case("mlp-ce", 3, "mean")
    with pytest.raises(ValueError, match="share their leading"):
        reference_per_sample_gradients(model, loss_fn, x, y[:2])
    with pytest.raises(ValueError, match="share their leading"):
        reference_per_sample_gradients(model, loss_fn, (x, x[:2]), y)
    with pytest.raises(TypeError, match="targets must be a tensor"):
        reference_per_sample_gradients(model, loss_fn, x, [0, 1, 2])


def test_output_hessian_errors():
    loss_fn = nn.MSELoss()
    with pytest.raises(ValueError, match="leading batch dimension"):
        reference_output_hessian(loss_fn, torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="scalar tensor"):
        reference_output_hessian(nn.MSELoss(reduction="none"), torch.ones(2, 2), torch.ones(2, 2))

    def coupled(outputs, targets):
        return (outputs - targets).sum().square()

    with pytest.raises(ValueError, match="the loss couples different samples"):
        reference_output_hessian(coupled, torch.ones(3, 2, dtype=DTYPE), torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------
# compare and its report
# ---------------------------------------------------------------------------------------------


def test_compare_rule_at_its_boundaries():
    expected = torch.tensor([4.0, 0.0], dtype=DTYPE)
    actual = torch.tensor([4.5, 0.25], dtype=DTYPE)
    # |a - e| = (0.5, 0.25) against atol + rtol |e| = (atol + 4 rtol, atol).
    assert compare(actual, expected, rtol=0.0625, atol=0.25).passed
    assert not compare(actual, expected, rtol=0.0625, atol=0.24).passed
    assert not compare(actual, expected, rtol=0.06, atol=0.25).passed
    assert compare(actual, expected, rtol=0.0, atol=0.5).passed
    assert not compare(actual, expected).passed


def test_compare_agrees_with_allclose():
    torch.manual_seed(0)
    for _ in range(200):
        expected = torch.randn(3, 4, dtype=DTYPE)
        actual = expected + 10.0 ** torch.randint(-8, 0, ()).item() * torch.randn(3, 4, dtype=DTYPE)
        rtol, atol = 10.0 ** torch.randint(-8, 0, (2,)).double()
        report = compare(actual, expected, rtol=rtol.item(), atol=atol.item())
        assert report.passed == torch.allclose(actual, expected, rtol=rtol.item(), atol=atol.item())


def test_compare_errors_are_max_abs_and_max_abs_over_max_expected():
    report = compare(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 5.0]))
    (row,) = report.rows
    assert row.max_abs_error == 2.0
    assert row.max_rel_error == 0.4
    assert row.shape == (3,)
    assert row.name == "tensor"
    assert not row.passed and not report.passed


def test_compare_against_zeros_and_empty_tensors():
    zero = torch.zeros(2)
    assert compare(zero, zero).rows[0].max_rel_error == 0.0
    assert compare(zero, zero).passed
    off = compare(torch.tensor([0.0, 1e-3]), zero)
    assert off.rows[0].max_rel_error == float("inf") and not off.passed
    empty = compare(torch.zeros(0, 3), torch.zeros(0, 3))
    assert empty.passed and empty.rows[0].max_abs_error == 0.0


def test_compare_nan_never_passes():
    nan = torch.tensor([float("nan")])
    assert not compare(nan, torch.tensor([1.0])).passed
    assert not compare(nan, nan).passed


def test_compare_mixed_dtypes_in_float64():
    expected = torch.tensor([1.0 + 1e-12], dtype=DTYPE)
    actual = torch.tensor([1.0], dtype=torch.float32)
    row = compare(actual, expected, rtol=0, atol=0).rows[0]
    assert row.max_abs_error == pytest.approx(1e-12, rel=1e-3)


def test_compare_nested_lists_default_and_given_names():
    a = [torch.ones(2), [torch.zeros(1), (torch.ones(3, 1),)]]
    e = [torch.ones(2), [torch.zeros(1), (torch.ones(3, 1) * 2,)]]
    report = compare(a, e)
    assert [row.name for row in report.rows] == ["0", "1.0", "1.1.0"]
    assert [row.passed for row in report.rows] == [True, True, False]
    assert not report.passed
    named = compare(a, e, names=["w", "b", "c"])
    assert [row.name for row in named.rows] == ["w", "b", "c"]
    with pytest.raises(ValueError, match="got 2 names for 3 tensors"):
        compare(a, e, names=["w", "b"])


def test_compare_structure_and_shape_errors():
    with pytest.raises(
        ValueError, match=re.escape("shape mismatch for '1': actual has shape (2,)")
    ):
        compare([torch.ones(1), torch.ones(2)], [torch.ones(1), torch.ones(2, 1)])
    with pytest.raises(ValueError, match=re.escape("shape mismatch for 'w'")):
        compare(torch.ones(3), torch.ones(2), names=["w"])
    with pytest.raises(
        TypeError, match="expected a sequence of length 2, actual is a sequence of length 1"
    ):
        compare([torch.ones(1)], [torch.ones(1), torch.ones(1)])
    with pytest.raises(TypeError, match="at 0: expected a tensor, actual is a float"):
        compare([1.0], [torch.ones(1)])
    with pytest.raises(TypeError, match="actual is a Tensor"):
        compare(torch.ones(2), [torch.ones(2)])
    with pytest.raises(
        TypeError, match="must be tensors or lists, tuples or dicts of them, got a float"
    ):
        compare(1.0, 1.0)
    with pytest.raises(ValueError, match="tolerances must be non-negative"):
        compare(torch.ones(1), torch.ones(1), rtol=-1.0)


def failing_report() -> ComparisonReport:
    return compare(
        [torch.tensor([1.0, 2.0, 3.0]), torch.ones(2, 2)],
        [torch.tensor([1.0, 2.0, 5.0]), torch.ones(2, 2)],
        names=["weight<0>", "b"],
    )


def test_report_text_table_has_the_numbers_aligned():
    text = str(failing_report())
    lines = text.splitlines()
    header, rule, first, second, summary, rule_text = lines
    for column in ("name", "shape", "max abs error", "max rel error", "result"):
        assert column in header
    assert "weight<0>" in first and "(3,)" in first and "2.000e+00" in first
    assert "4.000e-01" in first and "FAIL" in first
    assert "(2, 2)" in second and "0.000e+00" in second and "pass" in second
    # Columns line up: each cell starts where its header does (numbers end where theirs do).
    assert first.index("(3,)") == second.index("(2, 2)") == header.index("shape")
    assert first.index("FAIL") == second.index("pass") == header.index("result")
    end = header.index("max abs error") + len("max abs error")
    assert first.index("2.000e+00") + 9 == second.index("0.000e+00") + 9 == end
    assert set(rule) == {"-", " "}
    assert summary == "1/2 passed with rtol=1e-07, atol=1e-12"
    assert "|actual - expected| <= atol + rtol * |expected|" in rule_text


def test_report_html_table_has_the_numbers_escaped():
    page = failing_report()._repr_html_()
    assert page.startswith("<table>") and page.endswith("</table>")
    assert page.count("<tr>") == 3
    assert "weight&lt;0&gt;" in page and "weight<0>" not in page
    for number in ("2.000e+00", "4.000e-01", "0.000e+00", "(3,)", "(2, 2)", "FAIL", "pass"):
        assert number in page
    assert "1/2 passed with rtol=1e-07, atol=1e-12" in page
    assert "&lt;= atol + rtol" in page


def test_assert_passed_raises_with_the_table_and_truthiness_is_refused():
    report = failing_report()
    with pytest.raises(AssertionError) as error:
        report.assert_passed()
    assert str(report) in str(error.value)
    compare(torch.ones(2), torch.ones(2)).assert_passed()
    with pytest.raises(TypeError, match=r"use report\.passed or report\.assert_passed\(\)"):
        bool(report)


def test_results_do_not_depend_on_the_chunking_of_unit_vectors(monkeypatch):
    import curvkit.testing.verify

    model, loss_fn, x, y = case("mlp-ce", 5, "mean")
    outputs = model(x)
    whole = [
        reference_ggn(model, loss_fn, x, y),
        reference_hessian(model, loss_fn, x, y),
        reference_output_hessian(loss_fn, outputs, y),
    ]
    monkeypatch.setattr(curvkit.testing.verify, "_CHUNK_SIZE", 7)  # 43 parameters, 15 outputs
    chunked = [
        reference_ggn(model, loss_fn, x, y),
        reference_hessian(model, loss_fn, x, y),
        reference_output_hessian(loss_fn, outputs, y),
    ]
    for a, b in zip(chunked, whole, strict=True):
        assert_close(a, b)


def test_references_follow_the_model_dtype():
    model, loss_fn, x, y = case("mlp-mse", 3, "mean")
    ggn64 = reference_ggn(model, loss_fn, x, y)
    model32, x32, y32 = model.float(), x.float(), y.float()
    ggn32 = reference_ggn(model32, loss_fn, x32, y32)
    assert ggn32.dtype == torch.float32
    assert reference_hessian(model32, loss_fn, x32, y32).dtype == torch.float32
    assert reference_output_hessian(loss_fn, model32(x32), y32).dtype == torch.float32
    torch.testing.assert_close(ggn32.double(), ggn64, rtol=1e-5, atol=1e-6)


def test_compare_labels_rows_of_named_results_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
    named = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = compare(named, {name: t.clone() for name, t in named.items()})
    assert [row.name for row in report.rows] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert report.passed
    nested = compare([named], [named])
    assert nested.rows[0].name == "0.0.weight"
    with pytest.raises(TypeError, match="keys"):
        compare({"a": torch.ones(1)}, {"b": torch.ones(1)})
