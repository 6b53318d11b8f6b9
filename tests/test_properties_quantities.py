"""Property-based tests (issue 22) of the newer quantities against independent references.

Random small float64 models (Linear, convolution, LayerNorm, Embedding mixes), losses, reductions
and batch sizes (1 included): per-sample gradients, the empirical Fisher (diagonal and operator),
Hessian-vector products, the Hessian diagonal (on networks with elementwise nonlinearities), KFAC
and EKFAC where they are exact by definition (one layer), and the randomized estimators where
they are exact (as many products as dimensions). The references use plain autograd only: a
loop over the samples for the per-sample gradients, double backward for the Hessian
(:func:`curvkit.testing.verify.reference_hessian`), the dense GGN for KFAC's exact cases.

The CI run has a small, derandomized example budget; ``pytest -m deep`` runs many more.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import PROFILE as BASE_PROFILE
from torch import Tensor, nn

import curvkit
from curvkit.randomized import estimators
from curvkit.testing.verify import reference_ggn, reference_hessian

CLASSES = 3
VOCABULARY = 5
TOKENS = 3


class Pool(nn.Module):
    """Mean over the positions of a sequence [N, T, E] -> [N, E]."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


@dataclass
class Example:
    model: nn.Module
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor
    elementwise: bool  # only Linear layers and elementwise activations: diag_hessian is exact


def _loss(draw: st.DrawFn, num_samples: int) -> tuple[nn.Module, Tensor]:
    """Cross-entropy or squared error, mean or sum, with targets for ``num_samples``."""
    reduction = draw(st.sampled_from(["mean", "sum"]))
    if draw(st.booleans()):
        targets = torch.randint(0, CLASSES, (num_samples,))
        return nn.CrossEntropyLoss(reduction=reduction), targets
    targets = torch.randn(num_samples, CLASSES, dtype=torch.float64)
    return nn.MSELoss(reduction=reduction), targets


@st.composite
def examples(draw: st.DrawFn) -> Example:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    num_samples = draw(st.sampled_from([1, 2, 4]))
    family = draw(st.sampled_from(["linear", "conv", "layernorm", "embedding"]))
    width = draw(st.sampled_from([2, 3]))
    activation = draw(st.sampled_from([nn.Tanh, nn.Sigmoid]))
    if family == "conv":
        inputs = torch.randn(num_samples, 1, 4, 4)
        layers = [nn.Conv2d(1, 2, 3), activation(), nn.Flatten(), nn.Linear(8, width)]
    elif family == "embedding":
        inputs = torch.randint(0, VOCABULARY, (num_samples, TOKENS))
        layers = [nn.Embedding(VOCABULARY, width), activation(), Pool()]
    else:
        inputs = torch.randn(num_samples, 3)
        layers = [nn.Linear(3, width), activation()]
        if family == "layernorm":
            layers.append(nn.LayerNorm(width))
    model = nn.Sequential(*layers, nn.Linear(width, CLASSES)).double().eval()
    if inputs.is_floating_point():
        inputs = inputs.double()
    loss_fn, targets = _loss(draw, num_samples)
    return Example(model, loss_fn, inputs, targets, family == "linear")


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _close(actual: Tensor, expected: Tensor) -> None:
    scale = max(expected.abs().max().item(), 1e-300)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12 * scale)


def _per_sample_gradients(example: Example) -> Tensor:
    """``[N, D]``: the gradient of the batch loss through sample ``n``'s outputs alone."""
    params = list(example.model.parameters())
    outputs = example.model(example.inputs)
    rows = []
    for n in range(outputs.shape[0]):
        mask = torch.zeros(outputs.shape[0], *[1] * (outputs.dim() - 1), dtype=outputs.dtype)
        mask[n] = 1
        through_n = outputs * mask + outputs.detach() * (1 - mask)
        loss = example.loss_fn(through_n, example.targets)
        rows.append(_flat(list(torch.autograd.grad(loss, params, retain_graph=True))))
    return torch.stack(rows)


def _ef_scale(example: Example) -> float:
    """:math:`R` of the empirical Fisher (curvlinops' convention, see quantities.first_order)."""
    if example.loss_fn.reduction == "sum":
        return 1.0
    if isinstance(example.loss_fn, nn.MSELoss):
        return float(example.targets.numel())
    return float(example.targets.shape[0])


# The budget of the other property tests, smaller: each example runs several references.
PROFILE = settings(BASE_PROFILE, max_examples=12)


def _check_first_order(example: Example) -> None:
    data = (example.inputs, example.targets)
    gradients = _per_sample_gradients(example)
    got = curvkit.batch_gradients(example.model, example.loss_fn, data)
    _close(torch.cat([g.reshape(g.shape[0], -1) for g in got], dim=1), gradients)
    fisher = _ef_scale(example) * gradients.T @ gradients
    _close(_flat(curvkit.diag_ef(example.model, example.loss_fn, data)), fisher.diagonal())
    operator = curvkit.EFOperator(example.model, example.loss_fn, data)
    identity = torch.eye(fisher.shape[0], dtype=torch.float64)
    _close(operator @ identity, fisher)


def _check_hessian(example: Example) -> None:
    data = (example.inputs, example.targets)
    hessian = reference_hessian(example.model, example.loss_fn, *data)
    vector = torch.randn(hessian.shape[0], dtype=torch.float64)
    product = curvkit.hessian_vector_product(example.model, example.loss_fn, data, vector)
    _close(_flat(product) if isinstance(product, list) else product, hessian @ vector)
    operator = curvkit.HessianOperator(example.model, example.loss_fn, data)
    _close(operator @ torch.eye(hessian.shape[0], dtype=torch.float64), hessian)
    if example.elementwise:
        diagonal = curvkit.diag_hessian(example.model, example.loss_fn, data)
        _close(_flat(diagonal), hessian.diagonal())


@PROFILE
@given(examples())
def test_first_order_quantities_match_per_sample_autograd(example: Example) -> None:
    _check_first_order(example)


@PROFILE
@given(examples())
def test_hessian_quantities_match_double_backward(example: Example) -> None:
    _check_hessian(example)


@st.composite
def one_layer(draw: st.DrawFn) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """A single Linear layer (no bias) on one sample, or on samples with the same input."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    num_samples = draw(st.sampled_from([1, 3]))
    model = nn.Sequential(nn.Linear(draw(st.sampled_from([2, 4])), CLASSES, bias=False))
    model = model.double().eval()
    inputs = torch.randn(1, model[0].in_features, dtype=torch.float64).expand(num_samples, -1)
    loss_fn, targets = _loss(draw, num_samples)
    return model, loss_fn, inputs.contiguous(), targets


@PROFILE
@given(one_layer())
def test_kfac_and_ekfac_of_one_layer_are_its_ggn_where_exact_by_definition(case) -> None:
    r"""One layer, every sample with the same input :math:`x`: the GGN block is
    :math:`\sum_n H_n \otimes x x^\top`, which is KFAC's :math:`B \otimes A` exactly."""
    model, loss_fn, inputs, targets = case
    data = (inputs, targets)
    ggn = reference_ggn(model, loss_fn, inputs, targets)
    identity = torch.eye(ggn.shape[0], dtype=torch.float64)
    _close(curvkit.KFACOperator(model, loss_fn, data) @ identity, ggn)
    _close(curvkit.EKFACOperator(model, loss_fn, data) @ identity, ggn)


@PROFILE
@given(examples(), st.sampled_from(["hutchpp_trace", "xtrace", "xdiag"]))
def test_estimators_are_exact_with_as_many_products_as_dimensions(
    example: Example, name: str
) -> None:
    data = (example.inputs, example.targets)
    ggn = reference_ggn(example.model, example.loss_fn, *data)
    operator = curvkit.GGNOperator(example.model, example.loss_fn, data)
    generator = torch.Generator().manual_seed(0)
    estimate = getattr(estimators, name)(operator, ggn.shape[0] + 3, generator=generator)
    expected = ggn.diagonal() if name == "xdiag" else ggn.trace()
    scale = ggn.abs().max().item()
    torch.testing.assert_close(estimate, expected, rtol=1e-8, atol=1e-10 * scale)


@pytest.mark.deep
@settings(PROFILE, max_examples=200)
@given(examples())
def test_first_order_and_hessian_deep(example: Example) -> None:
    _check_first_order(example)
    _check_hessian(example)
