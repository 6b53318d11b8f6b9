"""A parameter used several times in one forward pass, directly and through derived tensors.

``h = tanh(x @ w)`` then ``h = tanh(h @ w.T)`` inside a module that also calls a submodule (the
head): the direct use and the transposed one must each count once. Every quantity that goes
through the engine is checked against independent plain-autograd references in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.testing.verify import (
    reference_diag_ggn,
    reference_ggn,
    reference_per_sample_gradients,
)


class ReusedWeight(nn.Module):
    """A square weight applied twice, the second time transposed or scaled, before a head."""

    def __init__(self, second_use: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, dtype=torch.float64) / 2)
        self.head = nn.Linear(4, 3, dtype=torch.float64)
        self.second_use = second_use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.weight)
        second = {"plain": self.weight, "transposed": self.weight.T, "scaled": 2 * self.weight}
        h = torch.tanh(h @ second[self.second_use])
        return self.head(h)


CASES = [
    (second_use, loss_fn, n)
    for second_use in ("plain", "transposed", "scaled")
    for loss_fn in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"))
    for n in (1, 5)
]


def _problem(second_use: str, loss_fn: nn.Module, n: int):
    torch.manual_seed(0)
    model = ReusedWeight(second_use)
    inputs = torch.randn(n, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (n,))
    return model, loss_fn, inputs, targets


@pytest.mark.parametrize(("second_use", "loss_fn", "n"), CASES)
def test_diag_ggn_and_matrix(second_use, loss_fn, n):
    model, loss_fn, inputs, targets = _problem(second_use, loss_fn, n)
    diagonal = curvkit.diag_ggn(model, loss_fn, (inputs, targets))
    for actual, expected in zip(
        diagonal, reference_diag_ggn(model, loss_fn, inputs, targets), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        curvkit.ggn_matrix(model, loss_fn, (inputs, targets)),
        reference_ggn(model, loss_fn, inputs, targets),
        rtol=1e-10,
        atol=1e-14,
    )


@pytest.mark.parametrize(("second_use", "loss_fn", "n"), CASES)
def test_per_sample_gradients(second_use, loss_fn, n):
    model, loss_fn, inputs, targets = _problem(second_use, loss_fn, n)
    actual = curvkit.batch_gradients(model, loss_fn, (inputs, targets))
    expected = reference_per_sample_gradients(model, loss_fn, inputs, targets)
    scale = 1.0 if loss_fn.reduction == "sum" else 1.0 / n
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, scale * e, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("second_use", "loss_fn", "n"), CASES[:4])
def test_empirical_fisher_and_kfac_block(second_use, loss_fn, n):
    model, loss_fn, inputs, targets = _problem(second_use, loss_fn, n)
    gradients = reference_per_sample_gradients(model, loss_fn, inputs, targets)
    flat = torch.cat([g.reshape(n, -1) for g in gradients], dim=1)
    scale = 1.0 if loss_fn.reduction == "sum" else 1.0 / n
    expected_fisher = scale * flat.T @ flat
    fisher = curvkit.EFOperator(model, loss_fn, (inputs, targets)).to_dense()
    torch.testing.assert_close(fisher, expected_fisher, rtol=1e-10, atol=1e-14)
    # The reused weight has no Kronecker factor: its block is the exact GGN block.
    operator = curvkit.KFACOperator(
        model, loss_fn, (inputs, targets), params=[model.weight], fallback="block"
    )
    expected_block = reference_ggn(model, loss_fn, inputs, targets, params=[model.weight])
    torch.testing.assert_close(operator.to_dense(), expected_block, rtol=1e-10, atol=1e-14)
