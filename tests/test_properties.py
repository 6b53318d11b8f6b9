"""Property-based guard (issue 13): random small models, every public quantity against references.

Models are drawn from a small grammar (Linear, convolution, norms in eval mode, activations,
residual blocks, self-attention, embeddings, a weight shared by two calls; optionally wrapped
by ``torch.compile``), with a loss (MSE, cross-entropy, BCE), a reduction, a dtype and a batch
size (1 included). Each example checks the GGN diagonal, its Monte-Carlo variant's shapes, a
GGN-vector product, the dense GGN, the GGN eigenvalues and a damped Newton step against the
plain-autograd references of :mod:`curvkit.testing.verify`, and that the calls left the model
exactly as they found it (parameters, buffers, ``.grad``, hooks, modes).

The CI run has a fixed, derandomized example budget; ``pytest -m deep tests/test_properties.py``
runs many more examples.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import curvkit
from curvkit.testing.verify import reference_ggn

FEATURES = 4
CLASSES = 3
TOKENS = 3
VOCABULARY = 5


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.linear(x))


class SharedTwice(nn.Module):
    """One Linear weight used by two calls."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(torch.tanh(self.linear(x)))


class SelfAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, 1, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


class Pool(nn.Module):
    """Mean over the positions of a sequence [N, T, E] -> [N, E]."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def _vector_block(kind: str, width: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, width)
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "batchnorm":
        return nn.BatchNorm1d(width)
    if kind == "residual":
        return Residual(width)
    if kind == "shared":
        return SharedTwice(width)
    return ACTIVATIONS[kind]()


VECTOR_BLOCKS = ["linear", "layernorm", "batchnorm", "residual", "shared", *ACTIVATIONS]
SEQUENCE_BLOCKS = ["linear", "layernorm", "attention", "tanh", "gelu"]


@dataclass
class Example:
    model: nn.Module
    compiled: nn.Module
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor


@st.composite
def examples(draw: st.DrawFn) -> Example:
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    num_samples = draw(st.sampled_from([1, 2, 3, 5]))
    family = draw(st.sampled_from(["vector", "sequence", "image"]))
    width = draw(st.sampled_from([3, 4]))
    layers: list[nn.Module] = []
    if family == "vector":
        inputs = torch.randn(num_samples, FEATURES)
        layers.append(nn.Linear(FEATURES, width))
        for kind in draw(st.lists(st.sampled_from(VECTOR_BLOCKS), max_size=3)):
            layers.append(_vector_block(kind, width))
    elif family == "sequence":
        if draw(st.booleans()):
            inputs = torch.randint(0, VOCABULARY, (num_samples, TOKENS))
            layers.append(nn.Embedding(VOCABULARY, width))
        else:
            inputs = torch.randn(num_samples, TOKENS, FEATURES)
            layers.append(nn.Linear(FEATURES, width))
        for kind in draw(st.lists(st.sampled_from(SEQUENCE_BLOCKS), max_size=2)):
            layers.append(
                SelfAttention(width) if kind == "attention" else _vector_block(kind, width)
            )
        layers.append(Pool())
    else:
        inputs = torch.randn(num_samples, 1, 5, 5)
        layers.append(nn.Conv2d(1, 2, 3))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(2))
        layers += [ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))](), nn.Flatten()]
        layers.append(nn.Linear(2 * 3 * 3, width))
    model = nn.Sequential(*layers, nn.Linear(width, CLASSES)).to(dtype)
    # Norms in eval mode, with running statistics that are not the identity.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    reduction = draw(st.sampled_from(["mean", "sum"]))
    loss = draw(st.sampled_from(["mse", "ce", "bce"]))
    if loss == "mse":
        loss_fn: nn.Module = nn.MSELoss(reduction=reduction)
        targets = torch.randn(num_samples, CLASSES, dtype=dtype)
    elif loss == "ce":
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        targets = torch.randint(0, CLASSES, (num_samples,))
    else:
        loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
        targets = torch.randint(0, 2, (num_samples, CLASSES)).to(dtype)
    # torch.compile's wrapper shares the model's parameters; curvkit must run it eagerly.
    compiled = torch.compile(model, backend="eager") if draw(st.booleans()) else model
    return Example(model, compiled, loss_fn, inputs, targets)


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything a call could change on a model."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [p.grad for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "modules": [
            (
                sorted(vars(m)),
                m.training,
                *(
                    dict(getattr(m, hooks))
                    for hooks in (
                        "_forward_hooks",
                        "_forward_pre_hooks",
                        "_backward_hooks",
                        "_backward_pre_hooks",
                    )
                ),
            )
            for m in model.modules()
        ],
    }


def _assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, tensor in before["tensors"].items():
        assert torch.equal(tensor, after["tensors"][key]), key
    assert all(a is b for a, b in zip(before["grads"], after["grads"], strict=True))
    assert before["requires_grad"] == after["requires_grad"]
    assert before["modules"] == after["modules"]


def _close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    """Close relative to the largest expected entry (entries that are zero exactly stay so)."""
    rtol = 1e-7 if dtype == torch.float64 else 2e-3
    scale = max(expected.abs().max().item(), 1e-30)
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rtol * scale + (1e-12 if dtype == torch.float64 else 1e-6), (error, scale)


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _check(example: Example) -> None:
    model, compiled, loss_fn = example.model, example.compiled, example.loss_fn
    batch = (example.inputs, example.targets)
    params = list(model.parameters())
    dtype = params[0].dtype
    ggn = reference_ggn(model, loss_fn, *batch)
    before = _state(model)

    diagonal = curvkit.diag_ggn(compiled, loss_fn, batch)
    _close(_flat(diagonal), ggn.diagonal(), dtype)
    generator = torch.Generator().manual_seed(0)
    sampled = curvkit.diag_ggn(compiled, loss_fn, batch, mc_samples=2, generator=generator)
    assert [d.shape for d in sampled] == [p.shape for p in params]

    vector = torch.randn(ggn.shape[0], dtype=dtype, generator=generator)
    product = curvkit.ggn_vector_product(compiled, loss_fn, batch, vector=vector)
    _close(_flat(product), ggn @ vector, dtype)
    _close(curvkit.ggn_matrix(compiled, loss_fn, batch), ggn, dtype)

    if dtype == torch.float64:
        _check_directions(example, params, ggn)
    _assert_same_state(before, _state(model))


def _check_directions(example: Example, params: list[Tensor], ggn: Tensor) -> None:
    """ggn_eigh's eigenvalues and damped_newton_step against the dense GGN's eigenpairs."""
    loss_fn, batch = example.loss_fn, (example.inputs, example.targets)
    evals, evecs = torch.linalg.eigh(ggn)
    largest = evals.abs().max().item()
    if largest == 0:
        return
    # Eigenvalues well above the default criterion's cut, and well apart from the rest, so
    # that the selection does not depend on rounding.
    threshold = math.sqrt(torch.finfo(ggn.dtype).eps) * largest
    kept = evals > threshold
    gap = evals[kept].min() - evals[~kept].max() if (~kept).any() else evals[kept].min()
    if kept.sum() == 0 or gap < 1e-3 * largest or evals[kept].min() < 10 * threshold:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ((got, _),) = curvkit.ggn_eigh(example.compiled, loss_fn, batch)
        (step,) = curvkit.damped_newton_step(example.compiled, loss_fn, batch)
    torch.testing.assert_close(got, evals[kept], rtol=1e-6, atol=1e-10 * largest)
    gradient = _flat(torch.autograd.grad(loss_fn(example.model(batch[0]), batch[1]), params))
    directions = evecs[:, kept]
    expected = -directions @ ((directions.T @ gradient) / (evals[kept] + 1.0))
    _close(_flat(step), expected, torch.float64)


PROFILE = settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@PROFILE
@given(examples())
def test_every_quantity_matches_the_references_and_leaves_the_model_alone(
    example: Example,
) -> None:
    _check(example)


@pytest.mark.deep
@settings(PROFILE, max_examples=300)
@given(examples())
def test_every_quantity_deep(example: Example) -> None:
    _check(example)
