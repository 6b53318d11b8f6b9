"""curvkit.influence against dense references from plain autograd (tests/influence_reference.py).

The comparison with kronfluence itself is in test_influence_kronfluence.py; here every curvature,
both reductions, batch sizes, the parameters kronfluence leaves out, the measurement, the
factors' state, the memory budget and the model's safety are checked against float64 autograd.
"""

from __future__ import annotations

import io

import pytest
import torch
from influence_reference import (
    block_diagonal_scores,
    damped_inverse,
    dense_ggn,
    flat_gradients,
    kfac_block,
    kron_layout,
    layer_rows,
    per_example_gradients,
)
from torch import Tensor, nn

from curvkit.engines.memory import MemoryPlanError
from curvkit.influence import InfluenceFactors, fit_factors, pairwise_scores, self_scores

RTOL = 1e-10
FLOAT = torch.float64
N_TRAIN, N_QUERY = 10, 4


def _close(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max()
    assert scale > 0
    assert ((actual - expected).abs().max() / scale).item() < rtol


def _mlp(loss: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(FLOAT)
    inputs = torch.randn(N_TRAIN + N_QUERY, 4, dtype=FLOAT)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), inputs, torch.randint(3, (N_TRAIN + N_QUERY,))
    return model, nn.MSELoss(), inputs, torch.randn(N_TRAIN + N_QUERY, 3, dtype=FLOAT)


def _summed(loss_fn: nn.Module) -> nn.Module:
    return type(loss_fn)(reduction="sum")


def _layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _reference(model, loss_fn, train, query, curvature: str, damping=None) -> Tensor:
    """Dense scores of an all-Linear model with one block per layer (kronfluence's layout)."""
    loss = _summed(loss_fn)
    gt = per_example_gradients(model, loss, *train)
    gq = per_example_gradients(model, loss, *query)
    train_blocks, query_blocks, inverses = [], [], []
    for name, layer in _layers(model):
        t, q = kron_layout(gt, name, layer), kron_layout(gq, name, layer)
        train_blocks.append(t)
        query_blocks.append(q)
        if curvature == "identity":
            inverses.append(torch.eye(t.shape[1], dtype=FLOAT))
        elif curvature == "diagonal":
            values = (t**2).mean(0)
            inverses.append(damped_inverse(torch.diag(values), values, damping))
        else:
            x, b = layer_rows(model, loss, *train, layer)
            block, values = kfac_block(x, b, t, corrected=curvature == "ekfac")
            inverses.append(damped_inverse(block, values, damping))
    return block_diagonal_scores(query_blocks, train_blocks, inverses)


def _split(inputs: Tensor, targets: Tensor):
    return (inputs[:N_TRAIN], targets[:N_TRAIN]), (inputs[N_TRAIN:], targets[N_TRAIN:])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "diagonal", "identity"])
def test_pairwise_and_self_scores_match_dense_reference(curvature: str, loss: str, reduction: str):
    model, loss_fn, inputs, targets = _mlp(loss)
    loss_fn = type(loss_fn)(reduction=reduction)
    train, query = _split(inputs, targets)
    expected = _reference(model, loss_fn, train, query, curvature)
    batches = [
        (train[0][:1], train[1][:1]),
        (train[0][1:6], train[1][1:6]),
        (train[0][6:], train[1][6:]),
    ]
    actual = pairwise_scores(
        model, loss_fn, batches, query, curvature=curvature, fisher_type="empirical"
    )
    _close(actual, expected)
    diagonal = _reference(model, loss_fn, train, train, curvature).diagonal()
    _close(
        self_scores(model, loss_fn, train, curvature=curvature, fisher_type="empirical"), diagonal
    )


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_exact_curvatures_match_dense_solves(curvature: str):
    model, loss_fn, inputs, targets = _mlp("ce")
    train, query = _split(inputs, targets)
    loss = _summed(loss_fn)
    names = [name for name, _ in model.named_parameters()]
    gt = flat_gradients(per_example_gradients(model, loss, *train), names)
    gq = flat_gradients(per_example_gradients(model, loss, *query), names)
    matrix = dense_ggn(model, loss, *train) if curvature == "ggn" else gt.T @ gt
    matrix = matrix / N_TRAIN
    for damping in (0.05, None):
        d = 0.1 * matrix.trace() / matrix.shape[0] if damping is None else damping
        inverse = torch.linalg.inv(matrix + d * torch.eye(matrix.shape[0], dtype=FLOAT))
        for data in (train, [(train[0][:4], train[1][:4]), (train[0][4:], train[1][4:])]):
            actual = pairwise_scores(
                model, loss_fn, data, query, curvature=curvature, damping=damping
            )
            _close(actual, gq @ inverse @ gt.T, rtol=1e-8)
        actual = self_scores(model, loss_fn, train, curvature=curvature, damping=damping)
        _close(actual, ((gt @ inverse) * gt).sum(1), rtol=1e-8)


class _Scale(nn.Module):
    """A user's layer without a built-in rule (the engine's generic rule covers it)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim, dtype=FLOAT))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class _Transpose(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class _Keywords(nn.Module):
    """Takes its tokens as ``input_ids=``, as a Hugging Face model does."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.body(input_ids)


def _sequence_model() -> tuple[nn.Module, Tensor, Tensor]:
    """Embedding, a custom layer, LayerNorm and a Linear at every position of a sequence."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Embedding(7, 4), _Scale(4), nn.LayerNorm(4), nn.Linear(4, 3), _Transpose()
    ).to(FLOAT)
    tokens = torch.randint(7, (N_TRAIN + N_QUERY, 5))
    return model, tokens, torch.randint(3, (N_TRAIN + N_QUERY, 5))


def _every_block_reference(model, train, query, dense_limit: int) -> dict[str, Tensor]:
    """EKFAC scores per module: the Linear's Kronecker block, exact blocks (or diagonals) else."""
    loss = nn.CrossEntropyLoss(reduction="sum")
    gt = per_example_gradients(model, loss, *train)
    gq = per_example_gradients(model, loss, *query)
    layer = model[3]
    t, q = kron_layout(gt, "3", layer), kron_layout(gq, "3", layer)
    x, b = layer_rows(model, loss, *train, layer)
    block, values = kfac_block(x, b, t, corrected=True)
    out = {"3": block_diagonal_scores([q], [t], [damped_inverse(block, values, None)])}
    for name, param in model.named_parameters():
        if name.startswith("3."):
            continue
        t, q = gt[name].flatten(1), gq[name].flatten(1)
        if param.numel() <= dense_limit:
            block = t.T @ t / t.shape[0]
            values = torch.linalg.eigvalsh(block)
        else:
            values = (t**2).mean(0)
            block = torch.diag(values)
        score = block_diagonal_scores([q], [t], [damped_inverse(block, values, None)])
        module = name.rsplit(".", 1)[0]
        out[module] = out[module] + score if module in out else score
    return out


@pytest.mark.parametrize("dense_limit", [4096, 5])
def test_every_parameter_gets_a_block(dense_limit: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("curvkit.influence.fit.MAX_DENSE_BLOCK", dense_limit)
    model, tokens, targets = _sequence_model()
    train, query = _split(tokens, targets)
    expected = _every_block_reference(model, train, query, dense_limit)
    actual = pairwise_scores(
        model,
        nn.CrossEntropyLoss(),
        train,
        query,
        fisher_type="empirical",
        per_module=True,
    )
    assert sorted(actual) == sorted(expected) == ["0", "1", "2", "3"]
    for name, scores in expected.items():
        _close(actual[name], scores)
    total = pairwise_scores(model, nn.CrossEntropyLoss(), train, query, fisher_type="empirical")
    _close(total, sum(expected.values()))


def test_hugging_face_dict_batches_give_the_same_scores():
    model, tokens, targets = _sequence_model()
    train, query = _split(tokens, targets)
    keyword_model = _Keywords(model)
    expected = pairwise_scores(model, nn.CrossEntropyLoss(), train, query, fisher_type="empirical")
    as_dicts = [
        {"input_ids": train[0][:6], "labels": train[1][:6]},
        {"input_ids": train[0][6:], "labels": train[1][6:]},
    ]
    actual = pairwise_scores(
        keyword_model,
        nn.CrossEntropyLoss(),
        as_dicts,
        {"input_ids": query[0], "labels": query[1]},
        fisher_type="empirical",
    )
    _close(actual, expected)


def _margin(outputs: Tensor, targets: Tensor) -> Tensor:
    """A measurement: the target logit minus the largest other one, summed over examples."""
    target = outputs.gather(1, targets.unsqueeze(1)).squeeze(1)
    others = outputs.scatter(1, targets.unsqueeze(1), float("-inf")).amax(1)
    return (target - others).sum()


@pytest.mark.parametrize("curvature", ["kfac", "identity"])
def test_query_loss_fn_replaces_the_query_gradient(curvature: str):
    model, loss_fn, inputs, targets = _mlp("ce")
    train, query = _split(inputs, targets)
    loss = _summed(loss_fn)
    gt = per_example_gradients(model, loss, *train)
    gq = per_example_gradients(model, _margin, *query)
    gm = per_example_gradients(model, _margin, *train)
    train_blocks, query_blocks, measured, inverses = [], [], [], []
    for name, layer in _layers(model):
        t = kron_layout(gt, name, layer)
        train_blocks.append(t)
        query_blocks.append(kron_layout(gq, name, layer))
        measured.append(kron_layout(gm, name, layer))
        if curvature == "identity":
            inverses.append(torch.eye(t.shape[1], dtype=FLOAT))
        else:
            x, b = layer_rows(model, loss, *train, layer)
            inverses.append(damped_inverse(*kfac_block(x, b, t, corrected=False), None))
    options = {"curvature": curvature, "fisher_type": "empirical", "query_loss_fn": _margin}
    actual = pairwise_scores(model, loss_fn, train, query, **options)
    _close(actual, block_diagonal_scores(query_blocks, train_blocks, inverses))
    actual = self_scores(model, loss_fn, train, **options)
    _close(actual, block_diagonal_scores(measured, train_blocks, inverses).diagonal())


def test_factors_are_reusable_and_their_state_loads_with_weights_only():
    model, loss_fn, inputs, targets = _mlp("ce")
    train, query = _split(inputs, targets)
    generator = torch.Generator().manual_seed(3)
    factors = fit_factors(model, loss_fn, train, generator=generator)
    expected = pairwise_scores(model, loss_fn, train, query, factors=factors)
    buffer = io.BytesIO()
    torch.save(factors.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = InfluenceFactors.from_state_dict(state)
    _close(pairwise_scores(model, loss_fn, train, query, factors=restored), expected, 1e-15)
    other = fit_factors(model, loss_fn, train, curvature="diagonal")
    other.load_state_dict(state)
    _close(
        self_scores(model, loss_fn, train, factors=other),
        self_scores(model, loss_fn, train, factors=factors),
        1e-15,
    )
    with pytest.raises(ValueError, match="not a state"):
        other.load_state_dict({"blocks": []})


def test_monte_carlo_fisher_is_reproducible_with_a_generator():
    model, loss_fn, inputs, targets = _mlp("ce")
    train, query = _split(inputs, targets)

    def scores(seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        return pairwise_scores(model, loss_fn, train, query, mc_samples=3, generator=generator)

    assert torch.equal(scores(0), scores(0))
    assert not torch.allclose(scores(0), scores(1))


def test_exact_fisher_type_uses_the_ggn():
    model, loss_fn, inputs, targets = _mlp("ce")
    train, query = _split(inputs, targets)
    loss = _summed(loss_fn)
    names = [name for name, _ in model.named_parameters()]
    diagonal = dense_ggn(model, loss, *train).diagonal() / N_TRAIN
    pieces = dict(zip(names, diagonal.split([p.numel() for p in model.parameters()]), strict=True))
    gt = per_example_gradients(model, loss, *train)
    gq = per_example_gradients(model, loss, *query)
    train_blocks, query_blocks, inverses = [], [], []
    for name, layer in _layers(model):
        weight = pieces[f"{name}.weight"].reshape(layer.out_features, -1)
        values = torch.cat([weight, pieces[f"{name}.bias"].unsqueeze(1)], dim=1).flatten()
        inverses.append(damped_inverse(torch.diag(values), values, None))
        train_blocks.append(kron_layout(gt, name, layer))
        query_blocks.append(kron_layout(gq, name, layer))
    expected = block_diagonal_scores(query_blocks, train_blocks, inverses)
    actual = pairwise_scores(
        model, loss_fn, train, query, curvature="diagonal", fisher_type="exact"
    )
    _close(actual, expected)


def _model_state(model: nn.Module) -> list:
    return [
        [(n, p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()],
        [
            (type(m), m.training, len(m._forward_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        [b.clone() for b in model.buffers()],
    ]


def test_the_model_is_never_changed():
    model, tokens, targets = _sequence_model()
    model[2].eval()
    train, query = _split(tokens, targets)
    before = _model_state(model)
    for curvature in ("ekfac", "kfac", "diagonal", "identity", "ggn", "ef"):
        pairwise_scores(
            model, nn.CrossEntropyLoss(), train, query, curvature=curvature, damping=0.1
        )
        self_scores(model, nn.CrossEntropyLoss(), train, curvature=curvature, damping=0.1)
    after = _model_state(model)
    for (n, p, grad_flag, grad), (n2, p2, grad_flag2, grad2) in zip(
        before[0], after[0], strict=True
    ):
        assert (n, grad_flag, grad) == (n2, grad_flag2, grad2)
        assert torch.equal(p, p2)
    assert before[1] == after[1]
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2], strict=True))


def test_a_small_budget_chunks_without_changing_the_scores():
    model, loss_fn, inputs, targets = _mlp("ce")
    train = (inputs[:N_TRAIN], targets[:N_TRAIN])
    query = (torch.randn(9, 4, dtype=FLOAT), torch.randint(3, (9,)))
    expected = pairwise_scores(model, loss_fn, train, query, fisher_type="empirical")
    example_bytes = sum(p.numel() for p in model.parameters()) * 8
    # Room for 4 query gradients and a training chunk of one example.
    budget = 8 * example_bytes + 100
    actual = pairwise_scores(
        model, loss_fn, train, query, fisher_type="empirical", max_memory=budget
    )
    _close(actual, expected)
    _close(
        self_scores(model, loss_fn, train, fisher_type="empirical", max_memory=budget),
        self_scores(model, loss_fn, train, fisher_type="empirical"),
    )
    with pytest.raises(MemoryPlanError, match="max_memory"):
        pairwise_scores(model, loss_fn, train, query, max_memory=example_bytes)
    with pytest.raises(MemoryPlanError, match="statistics"):
        fit_factors(model, loss_fn, train, max_memory=example_bytes)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"curvature": "newton"}, "curvature must be one of"),
        ({"damping": -1.0}, "damping must be"),
        ({"fisher_type": "type-2"}, "fisher_type must be one of"),
        ({"fisher_type": "empirical", "mc_samples": 2}, "mc_samples"),
        ({"curvature": "ggn", "damping": 0.0}, "positive damping"),
    ],
)
def test_bad_settings_are_refused(options: dict, match: str):
    model, loss_fn, inputs, targets = _mlp("ce")
    train, query = _split(inputs, targets)
    with pytest.raises(ValueError, match=match):
        pairwise_scores(model, loss_fn, train, query, **options)


def test_factors_must_fit_the_call():
    model, loss_fn, inputs, targets = _mlp("ce")
    train, query = _split(inputs, targets)
    factors = fit_factors(model, loss_fn, train, curvature="kfac")
    with pytest.raises(ValueError, match="curvature='kfac'"):
        pairwise_scores(model, loss_fn, train, query, factors=factors)
    with pytest.raises(ValueError, match="other parameters"):
        pairwise_scores(
            model,
            loss_fn,
            train,
            query,
            curvature="kfac",
            factors=factors,
            params=[model[0].weight],
        )
    with pytest.raises(ValueError, match="reduction"):
        pairwise_scores(model, nn.CrossEntropyLoss(reduction="none"), train, query)
