"""Output-space products and chunked square roots against dense ``torch.func`` Hessians.

:func:`curvkit.losses.hessian_product` must equal the dense per-sample Hessian of the batch loss
(from :func:`torch.func.hessian`) applied to vectors, and :func:`curvkit.losses.hessian_sqrt`
with ``columns=`` must return exactly the slice of the full square root; the GGN-vector product
must stay linear in the number of classes in memory.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import curvkit
from curvkit.losses import hessian_product, hessian_sqrt, num_sqrt_columns

# torch compiles its forward-mode decompositions with torch.jit.script on first use, which
# warns that it is deprecated: torch's internals, used by the forward-mode references here.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.script` is deprecated:DeprecationWarning"
)

DTYPE = torch.float64


def dense_hessian(loss_fn: Callable, outputs: Tensor, targets) -> Tensor:
    """The Hessian of the batch loss w.r.t. all outputs, ``[*outputs.shape, *outputs.shape]``."""
    return torch.func.hessian(lambda f: loss_fn(f, targets))(outputs.detach())


def reference_product(loss_fn: Callable, outputs: Tensor, targets, vectors: Tensor) -> Tensor:
    """``H u`` with the dense Hessian, for every leading index of ``vectors``."""
    hessian = dense_hessian(loss_fn, outputs, targets).reshape(outputs.numel(), outputs.numel())
    flat = vectors.reshape(-1, outputs.numel())
    return (flat @ hessian.T).reshape(vectors.shape)


def convex_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """A loss with no closed form: log-sum-exp couples one sample's entries; mean over samples."""
    return (torch.logsumexp(outputs, dim=1) + (outputs - targets).pow(4).sum(dim=1)).mean()


def _cases() -> dict[str, tuple[Callable, Callable[[int], tuple[Tensor, object]]]]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    def labels(high: int, *shape: int) -> Tensor:
        return torch.randint(0, high, shape, generator=gen)

    def ignored(high: int, *shape: int) -> Tensor:
        y = labels(high, *shape)
        y.view(-1)[::3] = -100
        return y

    weight = torch.rand(5, generator=gen, dtype=DTYPE) + 0.1
    return {
        "ce": (lambda r: nn.CrossEntropyLoss(reduction=r), lambda n: (randn(n, 5), labels(5, n))),
        "ce-spatial-weighted-ignore-smoothing": (
            lambda r: nn.CrossEntropyLoss(weight=weight, label_smoothing=0.2, reduction=r),
            lambda n: (randn(n, 5, 3, 2), ignored(5, n, 3, 2)),
        ),
        "ce-probabilities": (
            lambda r: nn.CrossEntropyLoss(label_smoothing=0.1, reduction=r),
            lambda n: (randn(n, 5, 2), randn(n, 5, 2).softmax(dim=1)),
        ),
        "mse": (lambda r: nn.MSELoss(reduction=r), lambda n: (randn(n, 3, 2), randn(n, 3, 2))),
        "bce": (
            lambda r: nn.BCEWithLogitsLoss(
                weight=torch.rand(4, dtype=DTYPE) + 0.5,
                pos_weight=torch.rand(4, dtype=DTYPE) + 0.5,
                reduction=r,
            ),
            lambda n: (randn(n, 4), torch.rand(n, 4, generator=gen, dtype=DTYPE)),
        ),
        "generic": (lambda r: convex_loss, lambda n: (randn(n, 4), randn(n, 4))),
    }


CASES = _cases()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_hessian_product_matches_dense_hessian(case: str, num_samples: int, reduction: str):
    make_loss, make_data = CASES[case]
    loss_fn = make_loss(reduction)
    outputs, targets = make_data(num_samples)
    for lead in [(), (2,)]:
        vectors = torch.randn(*lead, *outputs.shape, dtype=DTYPE)
        expected = reference_product(loss_fn, outputs, targets, vectors)
        actual = hessian_product(loss_fn, outputs, targets, vectors)
        assert actual.shape == vectors.shape
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["ce", "ce-spatial-weighted-ignore-smoothing", "mse", "bce"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_square_root_slices_are_the_full_square_roots_columns(case: str, num_samples: int):
    make_loss, make_data = CASES[case]
    loss_fn = make_loss("mean")
    outputs, targets = make_data(num_samples)
    full = hessian_sqrt(loss_fn, outputs, targets)
    total = num_sqrt_columns(outputs)
    assert full.shape[0] == total
    # the square root is one: S S^T is the dense per-sample Hessian
    dim = outputs[0].numel()
    hessian = dense_hessian(loss_fn, outputs, targets).reshape(num_samples, dim, num_samples, dim)
    blocks = torch.stack([hessian[n, :, n] for n in range(num_samples)])
    flat = full.flatten(start_dim=2)
    torch.testing.assert_close(
        torch.einsum("kni,knj->nij", flat, flat), blocks, rtol=1e-10, atol=1e-14
    )
    for columns in [slice(0, 1), slice(1, total - 1), slice(total - 2, None), slice(3, 3)]:
        assert torch.equal(hessian_sqrt(loss_fn, outputs, targets, columns=columns), full[columns])


def test_square_root_slice_is_refused_for_monte_carlo_and_steps():
    outputs, targets = torch.randn(2, 3, dtype=DTYPE), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="Monte-Carlo"):
        hessian_sqrt(nn.CrossEntropyLoss(), outputs, targets, mc_samples=2, columns=slice(0, 1))
    with pytest.raises(ValueError, match="step 1"):
        hessian_sqrt(nn.CrossEntropyLoss(), outputs, targets, columns=slice(0, 3, 2))


def test_hessian_product_refuses_vectors_of_another_shape():
    outputs, targets = torch.randn(2, 3, dtype=DTYPE), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"\[\.\.\., \*\(2, 3\)\]"):
        hessian_product(nn.CrossEntropyLoss(), outputs, targets, torch.randn(3, 2, dtype=DTYPE))


class PeakLiveBytes(TorchDispatchMode):
    """The peak of the bytes held by live tensors that torch operations created, deterministic.

    Each operation's outputs are counted by storage (views share one) until the last Python or
    autograd reference to a tensor on that storage dies.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, live tensors]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self.live:
                self.live[key] = [storage.nbytes(), 0]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.live[key][1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def test_exact_product_memory_is_linear_in_the_number_of_classes():
    """4096 classes: one dense output Hessian would be 128 MiB in float64, the bound is 2 MiB."""
    torch.manual_seed(0)
    num_samples, num_classes = 4, 4096
    model = nn.Linear(16, num_classes).to(DTYPE)
    inputs = torch.randn(num_samples, 16, dtype=DTYPE)
    targets = torch.randint(0, num_classes, (num_samples,))
    loss_fn = nn.CrossEntropyLoss()
    vector = [torch.randn_like(p) for p in model.parameters()]
    with PeakLiveBytes() as memory:
        product = curvkit.ggn_vector_product(model, loss_fn, (inputs, targets), vector)
    outputs_bytes = num_samples * num_classes * 8
    # outputs, tangents, probabilities and the product's few output-shaped temporaries
    assert memory.peak <= 16 * outputs_bytes

    # the same product from the dense per-sample Hessians
    outputs = model(inputs).detach()
    jvp = torch.func.jvp(
        lambda w, b: nn.functional.linear(inputs, w, b), tuple(model.parameters()), tuple(vector)
    )[1]
    hessian_jvp = torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda f, n=n: loss_fn(f, targets[n : n + 1]) / num_samples,
                outputs[n : n + 1],
                vectorize=True,
            )[0, :, 0]
            @ jvp[n]
            for n in range(num_samples)
        ]
    )
    expected = torch.autograd.grad(
        model(inputs), list(model.parameters()), hessian_jvp, allow_unused=True
    )
    for actual, reference in zip(product, expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-14)
