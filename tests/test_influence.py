"""curvkit.influence against dense references from plain autograd (tests/influence_reference.py).

The comparison with kronfluence itself is in test_influence_kronfluence.py; here every curvature,
both reductions, batch sizes, the parameters kronfluence leaves out, the measurement, the
factors' state, the memory budget and the model's safety are checked against float64 autograd.
"""

from __future__ import annotations

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

from curvkit.influence import pairwise_scores, self_scores

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
