"""Per-sample gradients and the empirical Fisher (curvkit.quantities.first_order) against
torch.func.vmap."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn
from zoo_params import case_params

import curvkit
from curvkit.testing.zoo import make_case, make_targets

#: Importing curvlinops and running its products uses forward-mode AD, whose decompositions
#: torch compiles with torch.jit.script on first use, which warns that it is deprecated.
JIT_SCRIPT_DEPRECATED = r"`torch\.jit\.script` is deprecated"

RTOL = 1e-10
ATOL = 1e-12


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def close(actual: Tensor, expected: Tensor) -> None:
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def term_gradients(model: nn.Module, loss_fn: nn.Module, inputs: tuple, targets: Tensor) -> list:
    """The gradients of the loss's sum-reduced terms of each sample, ``[N, *param.shape]``.

    ``vmap(grad)`` of the loss of one sample with ``reduction="sum"``: :math:`\\nabla \\ell_n`.
    """
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(values: dict, *sample: Tensor) -> Tensor:
        *x, y = sample
        outputs = torch.func.functional_call(model, values, tuple(t.unsqueeze(0) for t in x))
        return summed(outputs, y.unsqueeze(0))

    in_dims = (None, *([0] * len(inputs)), 0)
    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=in_dims)(params, *inputs, targets)
    return [grads[n] for n in params]


def normalization(loss_fn: nn.Module, outputs: Tensor) -> float:
    """Z of a plain (unweighted) torch loss: the count its mean divides by."""
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return outputs.numel() / outputs.shape[1]
    return float(outputs.numel())


def case_with_loss(name: str, loss_name: str, reduction: str, n: int):
    case = make_case(name, n)
    with torch.no_grad():
        outputs = case.model(*case.inputs)
    losses = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}
    loss_fn = losses[loss_name](reduction=reduction)
    targets = make_targets(loss_fn, outputs, torch.Generator().manual_seed(3))
    return case.model, loss_fn, case.inputs, targets, outputs


def curvlinops_ef(model: nn.Module, loss_fn: nn.Module, batches: list) -> Tensor:
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", JIT_SCRIPT_DEPRECATED, DeprecationWarning)
        from curvlinops import EFLinearOperator

        operator = EFLinearOperator(
            model, loss_fn, params, [(x[0], y) for x, y in batches], check_deterministic=False
        )
        dim = sum(p.numel() for p in params)
        return operator @ torch.eye(dim, dtype=torch.float64)


# -- per-sample gradients and their statistics ------------------------------------------------


MODELS = ["mlp", "cnn", "residual", "cnn1d", "transformer", "embedding", "sequence_layernorm"]


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("name", case_params(MODELS))
def test_per_sample_quantities_match_vmap_grad(name: str):
    case = make_case(name, 7)
    model, loss_fn = case.model, case.loss_fn
    batch = (case.inputs, case.targets)
    with torch.no_grad():
        outputs = model(*case.inputs)
    scale = 1 / curvkit.losses.normalization(loss_fn, outputs, case.targets).item()
    expected = [g * scale for g in term_gradients(model, loss_fn, case.inputs, case.targets)]
    gradients = curvkit.batch_gradients(model, loss_fn, batch)
    for actual, reference in zip(gradients, expected, strict=True):
        close(actual, reference)
    norms = curvkit.batch_l2_norms(model, loss_fn, batch)
    for actual, reference in zip(norms, expected, strict=True):
        close(actual, reference.flatten(start_dim=1).square().sum(dim=1))
    # BackPACK's Variance: of h_n = N g_n for a mean, g_n for a sum.
    factor = 7 if loss_fn.reduction == "mean" else 1
    variance = curvkit.gradient_variance(model, loss_fn, batch)
    for actual, reference in zip(variance, expected, strict=True):
        close(actual, (factor * reference).var(dim=0, unbiased=False))


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["mse", "ce", "bce"])
def test_every_loss_and_reduction(loss_name: str, reduction: str, n: int):
    model, loss_fn, inputs, targets, outputs = case_with_loss("mlp", loss_name, reduction, n)
    batch = (inputs, targets)
    terms = term_gradients(model, loss_fn, inputs, targets)
    z = normalization(loss_fn, outputs)
    gradients = curvkit.batch_gradients(model, loss_fn, batch)
    total = torch.autograd.grad(loss_fn(model(*inputs), targets), list(model.parameters()))
    for actual, term, gradient in zip(gradients, terms, total, strict=True):
        close(actual, term / z)
        close(actual.sum(dim=0), gradient)
    # curvlinops' EF: (1/R) sum_n grad l_n grad l_n^T, R = Z for these unweighted losses.
    ef = torch.einsum("ni,nj->ij", flat_samples(terms), flat_samples(terms)) / z
    close(curvlinops_ef(model, loss_fn, [batch]), ef)
    close(flat(curvkit.diag_ef(model, loss_fn, batch)), ef.diagonal())
    close(curvkit.EFOperator(model, loss_fn, batch).to_dense(), ef)


def flat_samples(per_param: list[Tensor]) -> Tensor:
    return torch.cat([t.flatten(start_dim=1) for t in per_param], dim=1)


@pytest.mark.parametrize(
    "name", case_params(["cnn", "residual", "embedding", "cnn2d_batchnorm_eval"])
)
def test_empirical_fisher_matches_curvlinops(name: str):
    case = make_case(name, 7)
    batch = (case.inputs, case.targets)
    expected = curvlinops_ef(case.model, case.loss_fn, [batch])
    close(flat(curvkit.diag_ef(case.model, case.loss_fn, batch)), expected.diagonal())
    operator = curvkit.EFOperator(case.model, case.loss_fn, batch)
    vector = torch.randn(
        expected.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    close(operator @ vector, expected @ vector)
    close(operator.to_dense(), expected)


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_data_of_several_batches(loss_name: str):
    model, loss_fn, inputs, targets, _ = case_with_loss("cnn", loss_name, "mean", 7)
    whole = (inputs, targets)
    batches = [((inputs[0][:3],), targets[:3]), ((inputs[0][3:],), targets[3:])]
    close(
        torch.cat([g.flatten(1) for g in curvkit.batch_gradients(model, loss_fn, batches)], 1),
        torch.cat([g.flatten(1) for g in curvkit.batch_gradients(model, loss_fn, whole)], 1),
    )
    close(flat(curvkit.batch_l2_norms(model, loss_fn, batches)),
          flat(curvkit.batch_l2_norms(model, loss_fn, whole)))  # fmt: skip
    close(flat(curvkit.gradient_variance(model, loss_fn, batches)),
          flat(curvkit.gradient_variance(model, loss_fn, whole)))  # fmt: skip
    expected = curvlinops_ef(model, loss_fn, batches)
    close(curvlinops_ef(model, loss_fn, [whole]), expected)
    close(flat(curvkit.diag_ef(model, loss_fn, batches)), expected.diagonal())
    close(curvkit.EFOperator(model, loss_fn, batches).to_dense(), expected)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(weight=torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)),
        nn.CrossEntropyLoss(ignore_index=1),
        nn.CrossEntropyLoss(
            weight=torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64), ignore_index=1
        ),
    ],
    ids=["weights", "ignore_index", "both"],
)
def test_several_batches_with_class_weights_are_the_loss_of_all_data(loss_fn: nn.Module):
    """Uneven batches whose R_b / Z_b differ: every quantity is that of the one batch of all.

    Reference: F = R / Z^2 sum_n grad l_n grad l_n^T from vmap(grad) of the terms, R the number
    of predictions, Z the loss's weighted count (curvlinops' scale for the whole data).
    """
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs = torch.randn(11, 4, dtype=torch.float64)
    targets = torch.tensor([1, 1, 0, 1, 2, 2, 0, 1, 2, 0, 2])
    batches = [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])]
    whole = (inputs, targets)
    terms = torch.cat([g.flatten(1) for g in term_gradients(model, loss_fn, (inputs,), targets)], 1)
    weight = torch.ones(3, dtype=torch.float64) if loss_fn.weight is None else loss_fn.weight
    kept = targets != loss_fn.ignore_index
    z = weight[targets][kept].sum()
    expected = len(targets) / z**2 * terms.T @ terms
    close(flat(curvkit.diag_ef(model, loss_fn, batches)), expected.diagonal())
    close(curvkit.EFOperator(model, loss_fn, batches).to_dense(), expected)
    close(curvkit.EFOperator(model, loss_fn, whole).to_dense(), expected)
    close(torch.cat([g.flatten(1) for g in curvkit.batch_gradients(model, loss_fn, batches)], 1),
          terms / z)  # fmt: skip
    close(flat(curvkit.gradient_variance(model, loss_fn, batches)),
          flat(curvkit.gradient_variance(model, loss_fn, whole)))  # fmt: skip


def test_sample_chunks_give_the_same_results():
    case = make_case("cnn", 7)
    batch = (case.inputs, case.targets)
    functions = (
        curvkit.batch_gradients, curvkit.batch_l2_norms, curvkit.gradient_variance,
        curvkit.diag_ef,
    )  # fmt: skip
    for function in functions:
        whole = function(case.model, case.loss_fn, batch)
        chunked = function(case.model, case.loss_fn, batch, sample_chunk_size=3)
        close(flat(chunked), flat(whole))


class Positions(nn.Module):
    """A Linear layer at two positions per sample: the pairwise route of the per-sample norms."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(x)).flatten(start_dim=1))


@pytest.mark.parametrize("chunk_bytes", [None, 64])
def test_per_sample_norms_of_a_weight_used_at_several_positions(monkeypatch, chunk_bytes):
    if chunk_bytes is not None:
        monkeypatch.setattr(curvkit.quantities.context, "DEFAULT_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    model = Positions().double()
    inputs = torch.randn(7, 2, 8, dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss()
    targets = torch.randint(3, (7,))
    expected = [g / 7 for g in term_gradients(model, loss_fn, (inputs,), targets)]
    norms = curvkit.batch_l2_norms(model, loss_fn, (inputs, targets))
    for actual, reference in zip(norms, expected, strict=True):
        close(actual, reference.flatten(start_dim=1).square().sum(dim=1))
    diagonal = curvkit.diag_ef(model, loss_fn, (inputs, targets))
    close(flat(diagonal), 7 * flat([r.square().sum(dim=0) for r in expected]))


def test_param_groups_give_results_per_group():
    model, loss_fn, inputs, targets, _ = case_with_loss("residual", "ce", "sum", 7)
    params = list(model.parameters())
    groups = [{"params": [params[4], params[0]]}, {"params": params[1:3]}]
    batch = (inputs, targets)
    terms = dict(zip(map(id, params), term_gradients(model, loss_fn, inputs, targets), strict=True))
    gradients = curvkit.batch_gradients(model, loss_fn, batch, params=groups)
    norms = curvkit.batch_l2_norms(model, loss_fn, batch, params=groups)
    diagonal = curvkit.diag_ef(model, loss_fn, batch, params=groups)
    assert len(gradients) == len(norms) == len(diagonal) == 2
    for g, group in enumerate(groups):
        expected = [terms[id(p)] for p in group["params"]]
        for actual, reference in zip(gradients[g], expected, strict=True):
            close(actual, reference)
        for actual, reference in zip(norms[g], expected, strict=True):
            close(actual, reference.flatten(1).square().sum(1))
        close(flat(diagonal[g]), flat([r.square().sum(0) for r in expected]))
    ef = torch.block_diag(*[
        flat_samples([terms[id(p)] for p in group["params"]]).T
        @ flat_samples([terms[id(p)] for p in group["params"]])
        for group in groups
    ])  # fmt: skip
    close(curvkit.EFOperator(model, loss_fn, batch, params=groups).to_dense(), ef)


# -- bad input and side effects ---------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    case = make_case("mlp", 3)
    batch = (case.inputs, case.targets)
    with pytest.raises(ValueError, match="reduction='mean' or reduction='sum'"):
        curvkit.batch_gradients(case.model, nn.CrossEntropyLoss(reduction="none"), batch)
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        curvkit.diag_ef(case.model, case.loss_fn, batch, params=[torch.ones(2)])
    with pytest.raises(ValueError, match="sample_chunk_size must be positive"):
        curvkit.batch_l2_norms(case.model, case.loss_fn, batch, sample_chunk_size=0)
    operator = curvkit.EFOperator(case.model, case.loss_fn, batch)
    with pytest.raises(ValueError, match="dtype"):
        operator @ torch.ones(operator.shape[1], dtype=torch.float32)


def test_calls_leave_the_model_as_it_was():
    case = make_case("cnn", 4)
    model = case.model
    before = {n: t.clone() for n, t in model.state_dict().items()}
    batch = (case.inputs, case.targets)
    curvkit.batch_gradients(model, case.loss_fn, batch)
    curvkit.gradient_variance(model, case.loss_fn, batch)
    curvkit.EFOperator(model, case.loss_fn, batch).to_dense()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class TokenModel(nn.Module):
    """Keyword inputs and logits flattened over positions, ``[N T, V]``, as language models."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.hidden = nn.Linear(4, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        logits = self.head(torch.tanh(self.hidden(self.embed(tokens))))
        return logits.flatten(end_dim=1)


def test_keyword_inputs_and_outputs_flattened_over_positions():
    torch.manual_seed(0)
    model = TokenModel().double()
    tokens = torch.randint(5, (7, 3))
    targets = torch.randint(5, (21,))
    loss_fn = nn.CrossEntropyLoss()
    batch = ({"tokens": tokens}, targets)
    summed = nn.CrossEntropyLoss(reduction="sum")
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(values: dict, sample_tokens: Tensor, sample_targets: Tensor) -> Tensor:
        logits = torch.func.functional_call(model, values, (sample_tokens[None],))
        return summed(logits, sample_targets)

    terms = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(
        params, tokens, targets.reshape(7, 3)
    )
    expected = [terms[n] / 21 for n in params]
    gradients = curvkit.batch_gradients(model, loss_fn, batch)
    for actual, reference in zip(gradients, expected, strict=True):
        close(actual, reference)
    # curvlinops' R for cross-entropy: the number of predictions, N T.
    diagonal = curvkit.diag_ef(model, loss_fn, batch)
    close(flat(diagonal), 21 * flat([r.square().sum(dim=0) for r in expected]))
    variance = curvkit.gradient_variance(model, loss_fn, batch)
    close(flat(variance), flat([(7 * r).var(dim=0, unbiased=False) for r in expected]))
