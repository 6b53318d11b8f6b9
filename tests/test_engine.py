"""compute_factors against a plain-autograd loop over samples and columns, on a model zoo."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from zoo_params import case_params

import curvkit
from curvkit.engines import (
    DenseFactor,
    EmbeddingFactor,
    Factor,
    KroneckerFactor,
    SumFactor,
    ZeroFactor,
    backward,
    compute,
    compute_factors,
)
from curvkit.engines.recording import record_forward
from curvkit.testing.verify import reference_factor_columns, reference_ggn
from curvkit.testing.zoo import CASES, Case, make_case


def _columns_for(model: nn.Module, inputs: tuple[Tensor, ...], num_columns: int = 3):
    with torch.no_grad():
        outputs = model(*inputs)
    generator = torch.Generator().manual_seed(1)
    columns = torch.randn(num_columns, *outputs.shape, generator=generator, dtype=outputs.dtype)
    return columns


def _factors_and_references(case: Case) -> tuple[Tensor, list[Factor], list[Tensor]]:
    """Outputs and factors of ``compute_factors`` for random columns, and their references."""
    model, inputs = case.model, case.inputs
    params = list(model.parameters())
    columns = _columns_for(model, inputs)
    outputs, factors = compute_factors(model, inputs, params, lambda out: columns)
    return outputs, factors, reference_factor_columns(model, inputs, columns, params)


def _rel_error(actual: Tensor, expected: Tensor) -> float:
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return ((actual - expected).abs().max() / scale).item()


def _check_methods(factor: Factor, rtol: float) -> None:
    """Every method of ``factor`` against the same method on its dense columns."""
    dense = DenseFactor(factor.dense(), factor.param_shape)
    generator = torch.Generator().manual_seed(2)
    dtype = dense.columns.dtype
    k, n = factor.num_columns, factor.num_samples
    mat = torch.randn(3, *factor.param_shape, generator=generator, dtype=dtype)
    coefficients = torch.randn(k, n, 3, generator=generator, dtype=dtype)
    pairs = [
        (factor.diag(), dense.diag()),
        (factor.gram(), dense.gram()),
        (factor.t_mat(mat), dense.t_mat(mat)),
        (factor.mat(coefficients), dense.mat(coefficients)),
        (factor.select(1, k).dense(), dense.columns[1:k]),
    ]
    for actual, expected in pairs:
        assert actual.shape == expected.shape
        if expected.abs().max() > 0:
            assert _rel_error(actual, expected) < rtol
        else:
            assert actual.abs().max() == 0


@pytest.mark.parametrize("num_samples", [1, 7])
@pytest.mark.parametrize("name", case_params(sorted(CASES)))
def test_factors_match_per_sample_autograd(name: str, num_samples: int) -> None:
    case = make_case(name, num_samples)
    outputs, factors, expected = _factors_and_references(case)
    params = list(case.model.parameters())
    with torch.no_grad():
        assert torch.allclose(outputs, case.model(*case.inputs), rtol=1e-12, atol=1e-12)
    assert len(factors) == len(params)
    for param, factor, reference in zip(params, factors, expected, strict=True):
        assert factor.param_shape == param.shape
        assert (factor.num_columns, factor.num_samples) == (3, num_samples)
        assert factor.dense().shape == reference.shape
        assert _rel_error(factor.dense(), reference) < 1e-10
        _check_methods(factor, 1e-10)


def test_structured_rules_are_used() -> None:
    case = make_case("cnn2d_batchnorm_eval", 3)
    model, inputs = case.model, case.inputs
    _, factors = compute_factors(model, inputs, list(model.parameters()), lambda o: o[None])
    kinds = [type(f) for f in factors]
    assert kinds[0] is KroneckerFactor  # grouped conv weight
    assert kinds[1] is DenseFactor  # its bias
    assert kinds[-2] is KroneckerFactor  # linear weight
    case = make_case("shared_twice_direct_param", 3)
    model, inputs = case.model, case.inputs
    names, params = zip(*model.named_parameters(), strict=True)
    _, factors = compute_factors(model, inputs, params, lambda o: o[None])
    by_name = dict(zip(names, factors, strict=True))
    assert isinstance(by_name["shared.weight"], KroneckerFactor)
    assert by_name["shared.weight"].inputs.shape[1] == 2  # the two calls side by side
    assert isinstance(by_name["weight"], DenseFactor)  # generic rule over the top level


@pytest.mark.parametrize("name", ["mlp", "cnn2d_batchnorm_eval", "sequence_layernorm"])
def test_float32(name: str) -> None:
    case = make_case(name, 5, dtype=torch.float32)
    _, factors, expected = _factors_and_references(case)
    for factor, reference in zip(factors, expected, strict=True):
        assert factor.dense().dtype == torch.float32
        assert _rel_error(factor.dense(), reference) < 1e-5
        _check_methods(factor, 1e-4)


def test_subset_of_params_and_unreached_param() -> None:
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    model.forward = lambda x: model["used"](x)  # type: ignore[method-assign]
    x = torch.randn(4, 3, dtype=torch.float64)
    params = [model["unused"].weight, model["used"].bias]
    columns = torch.randn(2, 4, 2, dtype=torch.float64)
    _, factors = compute_factors(model, x, params, lambda out: columns)
    assert isinstance(factors[0], ZeroFactor)
    _check_methods(factors[0], 1e-12)
    assert torch.equal(factors[0].dense(), torch.zeros(2, 4, 2, 3, dtype=torch.float64))
    assert torch.allclose(factors[1].dense(), columns)


def test_param_not_reaching_outputs_through_a_called_module() -> None:
    class Detached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.side = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(x + self.side(x).detach())

    model = Detached().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    _, factors = compute_factors(model, x, list(model.parameters()), lambda o: o[None])
    assert all(isinstance(f, ZeroFactor) for f in factors[:2])
    assert factors[2].dense().abs().max() > 0


def test_sum_factor_of_mixed_parts() -> None:
    torch.manual_seed(0)
    b = torch.randn(2, 3, 4, 1, 5, dtype=torch.float64)
    x = torch.randn(3, 4, 1, 6, dtype=torch.float64)
    structured = KroneckerFactor(b, x, torch.Size([5, 6]))
    dense = DenseFactor(torch.randn(2, 3, 5, 6, dtype=torch.float64), torch.Size([5, 6]))
    total = SumFactor([structured, dense])
    assert torch.allclose(total.dense(), structured.dense() + dense.dense())
    _check_methods(total, 1e-12)
    with pytest.raises(ValueError, match="same shape"):
        SumFactor([structured, dense.select(0, 1)])
    with pytest.raises(ValueError, match="at least one"):
        SumFactor([])


@pytest.mark.parametrize(
    ("num_columns", "positions", "groups", "chunk_bytes"),
    [
        (3, 1, 1, 2**28),  # T == 1: closed forms
        (6, 2, 2, 2**28),  # pairwise contraction over positions is cheaper
        (2, 9, 1, 2**28),  # materialising per-sample gradients is cheaper
        (2, 9, 3, 256),  # ... in chunks of one sample
        (6, 2, 1, 64),  # pairwise, in chunks
    ],
)
def test_kronecker_factor_methods(
    num_columns: int, positions: int, groups: int, chunk_bytes: int
) -> None:
    torch.manual_seed(0)
    n, o, i = 4, 3, 5
    b = torch.randn(num_columns, n, positions, groups, o, dtype=torch.float64)
    x = torch.randn(n, positions, groups, i, dtype=torch.float64)
    factor = KroneckerFactor(b, x, torch.Size([groups * o, i]), max_chunk_bytes=chunk_bytes)
    expected = torch.einsum("kntgo,ntgi->kngoi", b, x).reshape(num_columns, n, groups * o, i)
    assert torch.allclose(factor.dense(), expected)
    _check_methods(factor, 1e-12)


def test_kronecker_factor_bad_shapes() -> None:
    b = torch.zeros(2, 3, 4, 1, 5)
    with pytest.raises(ValueError, match=r"\[K, N, T, G, O\]"):
        KroneckerFactor(b[0], torch.zeros(3, 4, 1, 6), torch.Size([5, 6]))
    with pytest.raises(ValueError, match="disagree"):
        KroneckerFactor(b, torch.zeros(3, 2, 1, 6), torch.Size([5, 6]))
    with pytest.raises(ValueError, match="G \\* O \\* I"):
        KroneckerFactor(b, torch.zeros(3, 4, 1, 6), torch.Size([5, 7]))


def test_columns_from_outputs_are_used() -> None:
    """``backprop_columns`` receives the detached outputs; K may be 1 (a gradient)."""
    case = make_case("mlp", 4)
    model, inputs = case.model, case.inputs
    params = list(model.parameters())
    seen: list[Tensor] = []

    def backprop_columns(outputs: Tensor) -> Tensor:
        seen.append(outputs)
        return 2 * outputs[None]

    outputs, factors = compute_factors(model, inputs, params, backprop_columns)
    assert not seen[0].requires_grad
    assert torch.equal(seen[0], outputs)
    expected = reference_factor_columns(model, inputs, 2 * outputs[None], params)
    for factor, reference in zip(factors, expected, strict=True):
        assert _rel_error(factor.dense(), reference) < 1e-10


@pytest.mark.parametrize("per_column", [True, False])
@pytest.mark.parametrize("name", ["cnn2d_batchnorm_eval", "transformer", "in_place"])
def test_both_backward_strategies(
    name: str, per_column: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-column backward loop and the vmapped backward pass give the same factors."""
    backpropagate = backward.backpropagate
    monkeypatch.setattr(backward, "PER_COLUMN_BACKWARD_ENTRIES", 0)
    monkeypatch.setattr(
        compute,
        "backpropagate",
        lambda *args, **kwargs: backpropagate(*args, **{**kwargs, "convolutional": per_column}),
    )
    case = make_case(name, 4)
    _, factors, expected = _factors_and_references(case)
    for factor, reference in zip(factors, expected, strict=True):
        assert _rel_error(factor.dense(), reference) < 1e-10


@pytest.mark.parametrize(
    ("name", "convolutional"),
    [("cnn", True), ("cnn1d", True), ("transformer", False), ("mlp", False)],
)
def test_recording_notes_convolutions_and_pooling(name: str, convolutional: bool) -> None:
    """What picks the backward strategy: a convolution or pooling on the samples."""
    case = make_case(name, 3)
    recording = record_forward(case.model, case.inputs, list(case.model.parameters()))
    assert recording.convolutional is convolutional


@pytest.mark.parametrize(
    "name", ["cnn2d_batchnorm_eval", "sequence_layernorm", "attention_batch_first"]
)
def test_tiny_memory_budget_gives_the_same_factors(name: str) -> None:
    """One sample at a time in the generic rule and in materialising factor methods."""
    case = make_case(name, 5)
    model, inputs = case.model, case.inputs
    params = list(model.parameters())
    columns = _columns_for(model, inputs)
    _, chunked = compute_factors(model, inputs, params, lambda out: columns, max_chunk_bytes=1)
    _, whole = compute_factors(model, inputs, params, lambda out: columns)
    for a, b in zip(chunked, whole, strict=True):
        assert torch.allclose(a.dense(), b.dense(), rtol=1e-12, atol=1e-14)
        assert torch.allclose(a.diag(), b.diag(), rtol=1e-12, atol=1e-14)


def test_embedding_factor_bad_shapes() -> None:
    b = torch.zeros(2, 3, 4, 5)
    indices = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[K, N, T, E\]"):
        EmbeddingFactor(b[0], indices, torch.Size([7, 5]))
    with pytest.raises(ValueError, match="do not fit"):
        EmbeddingFactor(b, indices[:, :2], torch.Size([7, 5]))
    with pytest.raises(ValueError, match="embedding dimension"):
        EmbeddingFactor(b, indices, torch.Size([7, 6]))


@pytest.mark.parametrize("name", ["transformer_sequence_first", "attention_sequence_first"])
def test_sample_axis_when_sequence_length_equals_batch_size(name: str) -> None:
    """Tensors ``[T, N, E]`` with ``T == N``: the probe pass of one sample tells the axes."""
    case = make_case(name, 3)  # the zoo's sequences have length 3
    assert case.inputs[0].shape[:2] == (3, 3)
    _, factors, expected = _factors_and_references(case)
    for factor, reference in zip(factors, expected, strict=True):
        assert _rel_error(factor.dense(), reference) < 1e-10


def test_saturated_softmax_gives_the_curvature_without_subnormal_slowdown() -> None:
    """A classifier so confident that its probabilities underflow: the exact GGN diagonal and
    the closed-form product still hold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 40))
    with torch.no_grad():
        model[2].weight.mul_(40.0)  # logit gaps of hundreds: probabilities of 1e-30 and below
    inputs = torch.randn(7, 6)
    targets = torch.randint(0, 40, (7,))
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        prob = torch.softmax(model(inputs), dim=1)
    assert ((prob > 0) & (prob < 1e-20)).any()
    ggn = reference_ggn(copy.deepcopy(model).double(), loss_fn, inputs.double(), targets)
    expected = ggn.diagonal().float()
    actual = torch.cat([d.flatten() for d in curvkit.diag_ggn(model, loss_fn, (inputs, targets))])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6 * expected.max())
    vector = torch.randn(ggn.shape[0], dtype=torch.float64)
    product = curvkit.ggn_vector_product(model, loss_fn, (inputs, targets), vector.float())
    expected_product = (ggn @ vector).float()
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in product]),
        expected_product,
        rtol=1e-4,
        atol=1e-5 * expected_product.abs().max(),
    )
