"""The Hessian (curvkit.quantities.hessian) against torch.func.hessian of the loss in the flat
parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from zoo_params import case_params

import curvkit
from curvkit.operators.base import CurvatureOperator
from curvkit.quantities.elementwise import NotElementwiseError
from curvkit.testing.zoo import CASES, CheckedScaling, make_case, make_targets

#: torch.func.hessian (the reference) runs forward-mode AD, whose decompositions torch compiles
#: with torch.jit.script on first use, which warns that it is deprecated: torch's internals.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.script` is deprecated:DeprecationWarning"
)

RTOL = 1e-10
ATOL = 1e-12


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def reference_hessian(
    model: nn.Module, loss_fn: nn.Module, batches: list, params: list[Tensor] | None = None
) -> Tensor:
    """The dense Hessian of the loss of all the batches joined into one, by torch.func."""
    inputs = tuple(torch.cat(parts) for parts in zip(*(x for x, _ in batches), strict=True))
    targets = torch.cat([y for _, y in batches])
    names = {id(p): n for n, p in model.named_parameters()}
    params = list(model.parameters()) if params is None else params
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params]

    def loss(vector: Tensor) -> Tensor:
        values = dict(fixed)
        for part, p in zip(vector.split(sizes), params, strict=True):
            values[names[id(p)]] = part.reshape(p.shape)
        return loss_fn(torch.func.functional_call(model, values, inputs), targets)

    point = flat([p.detach() for p in params])
    # The fused attention kernels have neither forward-mode nor double-backward rules.
    with sdpa_kernel(SDPBackend.MATH):
        if any(isinstance(m, (nn.LayerNorm, CheckedScaling)) for m in model.modules()):
            # torch.func.hessian is wrong through LayerNorm on torch 2.13 (off by up to 1.2 on
            # sequence_layernorm, where finite differences agree with autograd to 1e-9), and
            # cannot run an autograd.Function without setup_context (CheckedScaling):
            # autograd's own dense Hessian instead, one reverse-over-reverse row at a time.
            return torch.autograd.functional.hessian(loss, point)
        return torch.func.hessian(loss)(point)


def case_with_loss(name: str, loss_name: str, reduction: str, n: int):
    case = make_case(name, n)
    with torch.no_grad():
        outputs = case.model(*case.inputs)
    losses = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}
    loss_fn = losses[loss_name](reduction=reduction)
    targets = make_targets(loss_fn, outputs, torch.Generator().manual_seed(3))
    return case.model, loss_fn, case.inputs, targets


def close(actual: Tensor, expected: Tensor) -> None:
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


# -- products, operator, dense matrix ----------------------------------------------------------


#: ``unbatchable_backward`` has no batching rule in its backward: products one vector at a time.
PRODUCT_MODELS = [
    "mlp", "cnn", "residual", "transformer", "embedding", "cnn2d_batchnorm_eval",
    "unbatchable_backward",
]  # fmt: skip


@pytest.mark.parametrize("name", case_params(PRODUCT_MODELS))
def test_hessian_matrix_and_products_match_torch_func(name: str):
    case = make_case(name, 3)
    batch = (case.inputs, case.targets)
    expected = reference_hessian(case.model, case.loss_fn, [batch])
    close(curvkit.hessian_matrix(case.model, case.loss_fn, batch), expected)
    vector = torch.randn(
        expected.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    close(
        curvkit.hessian_vector_product(case.model, case.loss_fn, batch, vector), expected @ vector
    )
    operator = curvkit.HessianOperator(case.model, case.loss_fn, batch)
    matrix = torch.randn(
        expected.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    close(operator @ matrix, expected @ matrix)


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["mse", "ce", "bce"])
def test_hessian_every_loss_and_reduction(loss_name: str, reduction: str, n: int):
    model, loss_fn, inputs, targets = case_with_loss("mlp", loss_name, reduction, n)
    expected = reference_hessian(model, loss_fn, [(inputs, targets)])
    operator = curvkit.HessianOperator(model, loss_fn, (inputs, targets))
    close(operator.to_dense(), expected)
    close(flat(curvkit.diag_hessian(model, loss_fn, (inputs, targets))), expected.diagonal())


def test_a_loss_linear_in_the_parameters_has_a_zero_hessian():
    model = nn.Linear(3, 2).double()
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))

    def linear_loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs - targets).sum()

    operator = curvkit.HessianOperator(model, linear_loss, batch)
    assert torch.equal(operator.to_dense(), torch.zeros(operator.shape, dtype=torch.float64))


def test_operator_interface_lists_and_scipy():
    model, loss_fn, inputs, targets = case_with_loss("residual", "mse", "mean", 7)
    expected = reference_hessian(model, loss_fn, [(inputs, targets)])
    operator = curvkit.HessianOperator(model, loss_fn, (inputs, targets))
    assert operator.shape == expected.shape and isinstance(operator, CurvatureOperator)
    vector = torch.randn(
        expected.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    shaped = [v.reshape(p.shape) for v, p in zip(
        vector.split([p.numel() for p in model.parameters()]), model.parameters(), strict=True
    )]  # fmt: skip
    close(flat(operator @ shaped), expected @ vector)
    close(flat(curvkit.hessian_vector_product(model, loss_fn, (inputs, targets), shaped)),
          expected @ vector)  # fmt: skip
    scipy_result = operator.to_scipy() @ vector.numpy()
    np.testing.assert_allclose(scipy_result, (expected @ vector).numpy(), rtol=1e-10, atol=1e-12)


def test_data_of_several_batches_is_the_loss_of_all_of_them():
    model, loss_fn, inputs, targets = case_with_loss("cnn", "ce", "mean", 7)
    batches = [((inputs[0][:3],), targets[:3]), ((inputs[0][3:],), targets[3:])]
    expected = reference_hessian(model, loss_fn, batches)
    close(curvkit.hessian_matrix(model, loss_fn, batches), expected)
    close(flat(curvkit.diag_hessian(model, loss_fn, batches)), expected.diagonal())


def test_param_groups_give_diagonal_blocks_per_group():
    model, loss_fn, inputs, targets = case_with_loss("residual", "ce", "sum", 7)
    params = list(model.parameters())
    groups = [{"params": [params[4], params[0]]}, {"params": params[1:3]}]
    batch = (inputs, targets)
    blocks = curvkit.hessian_matrix(model, loss_fn, batch, params=groups)
    for block, group in zip(blocks, groups, strict=True):
        close(block, reference_hessian(model, loss_fn, [batch], params=group["params"]))
    diagonal = curvkit.diag_hessian(model, loss_fn, batch, params=groups)
    for group_diagonal, block in zip(diagonal, blocks, strict=True):
        close(flat(group_diagonal), block.diagonal())
    operator = curvkit.HessianOperator(model, loss_fn, batch, params=groups)
    dense = torch.block_diag(*blocks)
    close(operator.to_dense(), dense)
    vector = [[torch.ones_like(p) for p in group["params"]] for group in groups]
    product = curvkit.hessian_vector_product(model, loss_fn, batch, vector, params=groups)
    close(
        flat([t for part in product for t in part]),
        dense @ torch.ones(dense.shape[0], dtype=torch.float64),
    )


def test_transformer_products_match_finite_differences():
    """An independent check of the LayerNorm models' reference: central differences of grads."""
    case = make_case("transformer", 3)
    batch = (case.inputs, case.targets)
    params = list(case.model.parameters())
    vector = torch.randn(
        sum(p.numel() for p in params), generator=torch.Generator().manual_seed(4),
        dtype=torch.float64,
    )  # fmt: skip

    def gradient(step: float) -> Tensor:
        moved = [
            (p.detach() + step * v.reshape(p.shape)).requires_grad_(True)
            for p, v in zip(params, vector.split([p.numel() for p in params]), strict=True)
        ]
        names = [n for n, _ in case.model.named_parameters()]
        loss = case.loss_fn(
            torch.func.functional_call(case.model, dict(zip(names, moved, strict=True)),
                                       case.inputs),
            case.targets,
        )  # fmt: skip
        return flat(list(torch.autograd.grad(loss, moved)))

    eps = 1e-5
    expected = (gradient(eps) - gradient(-eps)) / (2 * eps)
    product = curvkit.hessian_vector_product(case.model, case.loss_fn, batch, vector)
    torch.testing.assert_close(product, expected, rtol=1e-6, atol=1e-8)


# -- the exact diagonal -----------------------------------------------------------------------


#: The zoo's cases whose nonlinearities are not all elementwise activations.
REFUSED = {
    "norms_prelu_transposed_conv": "normalisation",
    "sequence_layernorm": "NativeLayerNormBackward0",
    "normalisations": "NativeGroupNormBackward0",
    "attention": "NativeLayerNormBackward0",
    "attention_batch_first": "SoftmaxBackward0",
    "attention_sequence_first": "SoftmaxBackward0",
    "transformer": "NativeLayerNormBackward0",
    "transformer_sequence_first": "NativeLayerNormBackward0",
    "embedding_padding_twice": "depend on the same parameter",
    "shared_twice_direct_param": "depend on the same parameter",
    "tied_embedding": "depend on the same parameter",
    "tied_head": "depend on the same parameter",
    "in_place": "TanhBackward0 is applied in place",
    "lstm": "depend on the same parameter",
    "unbatchable_backward": "_CheckedScalingBackward",
}


@pytest.mark.parametrize("name", case_params(CASES))
def test_diag_hessian_is_exact_or_refuses_on_every_zoo_case(name: str):
    case = make_case(name, 4)
    batch = (case.inputs, case.targets)
    if name in REFUSED:
        with pytest.raises(NotElementwiseError, match="hutchinson_diag") as error:
            curvkit.diag_hessian(case.model, case.loss_fn, batch)
        assert REFUSED[name] in str(error.value)
        return
    expected = reference_hessian(case.model, case.loss_fn, [batch]).diagonal()
    diagonal = curvkit.diag_hessian(case.model, case.loss_fn, batch)
    assert [d.shape for d in diagonal] == [p.shape for p in case.model.parameters()]
    close(flat(diagonal), expected)


class Smooth(nn.Module):
    """Functional and module activations with options, a skip connection, a shared module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)
        self.act = nn.Softplus(beta=2.0)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.gelu(self.a(x) / torch.full((6,), 2.0, dtype=x.dtype), approximate="tanh")
        h = h + nn.functional.elu(self.b(h), alpha=0.5)
        return self.c(self.act(torch.sigmoid(h).mul(2.0)) + nn.functional.silu(h))


def test_diag_hessian_smooth_activations_with_options_and_skips():
    torch.manual_seed(0)
    model = Smooth().double()
    inputs = torch.randn(7, 4, dtype=torch.float64)
    targets = torch.randn(7, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    expected = reference_hessian(model, loss_fn, [((inputs,), targets)]).diagonal()
    ggn = flat(curvkit.diag_ggn(model, loss_fn, (inputs, targets)))
    assert (ggn - expected).abs().max() > 1e-3  # the residual terms matter here
    close(flat(curvkit.diag_hessian(model, loss_fn, (inputs, targets))), expected)


class Divided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) / (1 + self.b(x).square())


def test_diag_hessian_refuses_a_computed_denominator():
    inputs, targets = torch.randn(5, 3).double(), torch.randn(5, 2).double()
    with pytest.raises(NotElementwiseError, match="computed denominator"):
        curvkit.diag_hessian(Divided().double(), nn.MSELoss(), (inputs, targets))


def test_diag_hessian_refuses_an_unrecorded_in_place_activation():
    class InPlaceTanh(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x).tanh_()

    inputs, targets = torch.randn(5, 3).double(), torch.randn(5, 2).double()
    with pytest.raises(NotElementwiseError, match="TanhBackward0"):
        curvkit.diag_hessian(InPlaceTanh().double(), nn.MSELoss(), (inputs, targets))


# -- bad input and side effects ---------------------------------------------------------------


def test_bad_vectors_give_clear_errors():
    case = make_case("mlp", 3)
    batch = (case.inputs, case.targets)
    dim = sum(p.numel() for p in case.model.parameters())
    with pytest.raises(ValueError, match=rf"shape \[{dim}\]"):
        curvkit.hessian_vector_product(case.model, case.loss_fn, batch, torch.ones(dim + 1))
    with pytest.raises(ValueError, match="dtype"):
        curvkit.hessian_vector_product(
            case.model, case.loss_fn, batch, torch.ones(dim, dtype=torch.float32)
        )
    operator = curvkit.HessianOperator(case.model, case.loss_fn, batch)
    with pytest.raises(ValueError, match="multiplies tensors of shape"):
        operator @ torch.ones(dim, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        curvkit.diag_hessian(case.model, case.loss_fn, batch, params=[torch.ones(2)])
    with pytest.raises(TypeError, match="model must be"):
        curvkit.HessianOperator(lambda x: x, case.loss_fn, batch)


def test_operator_refuses_one_shot_iterators():
    case = make_case("mlp", 4)
    batches = (b for b in [(case.inputs, case.targets)])
    operator = curvkit.HessianOperator(case.model, case.loss_fn, batches)
    with pytest.raises(TypeError, match="one-shot iterator"):
        operator @ torch.ones(operator.shape[1], dtype=torch.float64)


def test_calls_leave_the_model_as_it_was():
    case = make_case("cnn", 4)
    model = case.model
    batch = (case.inputs, case.targets)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    curvkit.diag_hessian(model, case.loss_fn, batch)
    curvkit.HessianOperator(model, case.loss_fn, batch).to_dense()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


def test_keyword_inputs_and_outputs_flattened_over_positions():
    class TokenModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.hidden = nn.Linear(4, 6)
            self.head = nn.Linear(6, 5)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(torch.tanh(self.hidden(self.embed(tokens)))).flatten(end_dim=1)

    torch.manual_seed(0)
    model = TokenModel().double()
    tokens, targets = torch.randint(5, (7, 3)), torch.randint(5, (21,))
    loss_fn = nn.CrossEntropyLoss()
    expected = reference_hessian(model, loss_fn, [((tokens,), targets)])
    batch = ({"tokens": tokens}, targets)
    close(curvkit.hessian_matrix(model, loss_fn, batch), expected)
    close(flat(curvkit.diag_hessian(model, loss_fn, batch)), expected.diagonal())


def _small_problem() -> tuple[nn.Module, nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    return model, nn.MSELoss(), batch


def test_non_finite_parameters_are_refused_like_the_ggn():
    """A NaN weight: every Hessian and GGN product refuses it with the engine's message."""
    model, loss_fn, batch = _small_problem()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    ones = torch.ones(26, dtype=torch.float64)
    calls = [
        lambda: curvkit.hessian_matrix(model, loss_fn, batch),
        lambda: curvkit.hessian_vector_product(model, loss_fn, batch, ones),
        lambda: curvkit.HessianOperator(model, loss_fn, batch) @ ones,
        lambda: curvkit.ggn_vector_product(model, loss_fn, batch, ones),
        lambda: curvkit.diag_ggn(model, loss_fn, batch),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="outputs hold NaN or inf"):
            call()


def test_inference_mode_says_what_to_do():
    model, loss_fn, batch = _small_problem()
    ones = torch.ones(26, dtype=torch.float64)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="outside `with torch"):
            curvkit.hessian_vector_product(model, loss_fn, batch, ones)
        with pytest.raises(RuntimeError, match="outside `with torch"):
            curvkit.hessian_matrix(model, loss_fn, batch)


def test_hessian_products_run_the_model_under_the_guard():
    """As the GGN's products: the user's backward hooks do not fire, buffers stay."""
    model, loss_fn, batch = _small_problem()
    ones = torch.ones(26, dtype=torch.float64)
    expected = torch.func.hessian(
        lambda *p: loss_fn(torch.func.functional_call(model, dict(zip(
            [n for n, _ in model.named_parameters()], p, strict=True)), batch[0]), batch[1]),
        argnums=(0, 1, 2, 3),
    )(*[p.detach() for p in model.parameters()])  # fmt: skip
    sizes = [p.numel() for p in model.parameters()]
    dense = torch.cat([torch.cat([b.reshape(s, -1) for b in row], 1)
                       for row, s in zip(expected, sizes, strict=True)])  # fmt: skip
    fired = []
    model[0].register_full_backward_hook(lambda *args: fired.append(1))
    product = curvkit.hessian_vector_product(model, loss_fn, batch, ones)
    torch.testing.assert_close(product, dense @ ones, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(curvkit.hessian_matrix(model, loss_fn, batch), dense,
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    assert fired == []
