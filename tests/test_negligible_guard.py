"""What the negligible-entry guard may change, and what it must not (float32).

The guard (:func:`curvkit.ops.linalg.without_negligible`) drops square-root entries whose share
of a sum of squares is below rounding. It must never change a first-order quantity, and a
GGN-vector product must stay homogeneous in its vector at every scale.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvkit
from curvkit.testing.verify import reference_per_sample_gradients

PROBABILITIES = [0.9989, 1.05e-16, 0.0011, 7.5e-6]


def _rare_class_problem(dtype: torch.dtype):
    """A linear classifier whose softmax puts 1e-16 on one class, for every sample."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4, dtype=dtype)
    with torch.no_grad():
        model.weight.mul_(1e-3)
        model.bias.copy_(torch.tensor([math.log(p) for p in PROBABILITIES], dtype=dtype))
    inputs = torch.randn(5, 3, dtype=dtype)
    targets = torch.tensor([0, 0, 2, 0, 3])
    return model, inputs, targets


def _float64_twin(model: nn.Module) -> nn.Module:
    twin = nn.Linear(3, 4, dtype=torch.float64)
    twin.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return twin


def _assert_entrywise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Entry by entry relative to itself: tiny entries count as much as large ones.
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_first_order_quantities_keep_rare_class_entries(reduction):
    model, inputs, targets = _rare_class_problem(torch.float32)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    reference = reference_per_sample_gradients(
        _float64_twin(model), loss_fn, inputs.double(), targets
    )
    scale = 1.0 if reduction == "sum" else 1.0 / len(inputs)
    expected = [scale * g for g in reference]
    gradients = curvkit.batch_gradients(model, loss_fn, (inputs, targets))
    # The rare class's bias gradient, 1e-16 * (1/N): a normal float32 number.
    assert float(expected[1][:, 1].abs().min()) > torch.finfo(torch.float32).tiny
    for actual, wanted in zip(gradients, expected, strict=True):
        _assert_entrywise(actual, wanted)
    for actual, wanted in zip(
        curvkit.diag_ef(model, loss_fn, (inputs, targets)), expected, strict=True
    ):
        _assert_entrywise(actual, (wanted**2).sum(0) / scale)


def test_ggn_vector_product_is_homogeneous_at_every_scale():
    model, inputs, targets = _rare_class_problem(torch.float32)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(1)
    vector = [torch.randn_like(p) for p in model.parameters()]
    product = curvkit.ggn_vector_product(model, loss_fn, (inputs, targets), vector)
    # Powers of two scale exactly; 2**-64 (5e-20) is below the square root of float32's
    # smallest normal number, which an absolute floor would have zeroed.
    for scale in (2.0**-64, 2.0**40):
        scaled = curvkit.ggn_vector_product(
            model, loss_fn, (inputs, targets), [scale * v for v in vector]
        )
        for actual, unscaled in zip(scaled, product, strict=True):
            assert bool(unscaled.ne(0).any())
            torch.testing.assert_close(actual / scale, unscaled, rtol=1e-6, atol=0.0)
