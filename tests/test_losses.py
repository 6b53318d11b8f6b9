"""Tests of curvkit.losses against Hessians of the batch loss from plain torch.autograd."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvkit.losses import _categorical_draws, hessian_sqrt, normalization, sample_reduction
from curvkit.testing.verify import reference_output_hessian

DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# independent references


def full_output_hessian(loss_fn: Callable, outputs: Tensor, targets) -> Tensor:
    """Hessian of the batch loss w.r.t. all outputs, ``[N, D, N, D]``, by plain double backward."""
    outputs = outputs.detach().requires_grad_()
    num_samples = outputs.shape[0]
    (grad,) = torch.autograd.grad(loss_fn(outputs, targets), outputs, create_graph=True)
    grad = grad.flatten()
    rows = []
    for i in range(grad.numel()):
        if grad.grad_fn is None:
            rows.append(torch.zeros_like(grad))
            continue
        (row,) = torch.autograd.grad(grad[i], outputs, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(grad) if row is None else row.flatten())
    return torch.stack(rows).reshape(num_samples, -1, num_samples, grad.numel() // num_samples)


def reference_blocks(loss_fn: Callable, outputs: Tensor, targets) -> Tensor:
    """Per-sample blocks ``[N, D, D]``, after checking that the blocks between samples are zero."""
    full = full_output_hessian(loss_fn, outputs, targets)
    num_samples = full.shape[0]
    blocks = torch.stack([full[n, :, n] for n in range(num_samples)])
    off_diagonal = full.clone()
    for n in range(num_samples):
        off_diagonal[n, :, n] = 0
    assert off_diagonal.abs().max() <= 1e-14 * max(full.abs().max().item(), 1e-300)
    return blocks


def gram(sqrt: Tensor) -> Tensor:
    """``sum_k S[k, n] S[k, n]^T`` for every sample: ``[N, D, D]``."""
    flat = sqrt.reshape(*sqrt.shape[:2], -1)
    return torch.einsum("kni,knj->nij", flat, flat)


def assert_relative_close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, "a reference that is zero everywhere cannot test anything"
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"relative error {error / scale:.3g} > {rtol}"


# ---------------------------------------------------------------------------------------------
# cases: (name, loss factory(reduction), outputs shape without N, targets factory(outputs))


def class_indices(ignore: int | None = None) -> Callable[[Tensor, torch.Generator], Tensor]:
    def make(outputs: Tensor, gen: torch.Generator) -> Tensor:
        shape = outputs.shape[:1] + outputs.shape[2:]
        targets = torch.randint(0, outputs.shape[1], shape, generator=gen)
        if ignore is not None:
            targets[torch.rand(shape, generator=gen) < 0.4] = ignore
            targets.view(-1)[0] = 0  # at least one target is kept
        return targets

    return make


def probabilities(outputs: Tensor, gen: torch.Generator) -> Tensor:
    logits = torch.randn(outputs.shape, generator=gen, dtype=outputs.dtype)
    return torch.softmax(logits, dim=1)


def gaussian(outputs: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randn(outputs.shape, generator=gen, dtype=outputs.dtype)


def uniform(outputs: Tensor, gen: torch.Generator) -> Tensor:
    return torch.rand(outputs.shape, generator=gen, dtype=outputs.dtype)


def binary(outputs: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, outputs.shape, generator=gen).to(outputs.dtype)


CLASS_WEIGHT = torch.tensor([0.5, 2.0, 1.5, 0.25], dtype=DTYPE)
SPATIAL_WEIGHT = torch.tensor([0.7, 1.3, 2.0], dtype=DTYPE)

CLOSED_FORM_CASES = [
    ("mse", lambda r: nn.MSELoss(reduction=r), (3,), gaussian),
    ("mse-1d", lambda r: nn.MSELoss(reduction=r), (), gaussian),
    ("mse-spatial", lambda r: nn.MSELoss(reduction=r), (2, 3), gaussian),
    ("ce", lambda r: nn.CrossEntropyLoss(reduction=r), (4,), class_indices()),
    (
        "ce-weight",
        lambda r: nn.CrossEntropyLoss(weight=CLASS_WEIGHT, reduction=r),
        (4,),
        class_indices(),
    ),
    (
        "ce-ignore",
        lambda r: nn.CrossEntropyLoss(ignore_index=-3, reduction=r),
        (4,),
        class_indices(ignore=-3),
    ),
    (
        "ce-smoothing",
        lambda r: nn.CrossEntropyLoss(label_smoothing=0.2, reduction=r),
        (4,),
        class_indices(),
    ),
    (
        "ce-weight-ignore-smoothing",
        lambda r: nn.CrossEntropyLoss(
            weight=CLASS_WEIGHT, ignore_index=2, label_smoothing=0.3, reduction=r
        ),
        (4,),
        class_indices(ignore=2),
    ),
    (
        "ce-spatial",
        lambda r: nn.CrossEntropyLoss(
            weight=SPATIAL_WEIGHT, ignore_index=-100, label_smoothing=0.1, reduction=r
        ),
        (3, 2, 2),
        class_indices(ignore=-100),
    ),
    (
        "ce-probabilities",
        lambda r: nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.1, reduction=r),
        (4,),
        probabilities,
    ),
    (
        "ce-probabilities-spatial",
        lambda r: nn.CrossEntropyLoss(weight=SPATIAL_WEIGHT, reduction=r),
        (3, 2),
        probabilities,
    ),
    ("bce", lambda r: nn.BCEWithLogitsLoss(reduction=r), (3,), binary),
    (
        "bce-weight",
        lambda r: nn.BCEWithLogitsLoss(
            weight=torch.tensor([0.5, 1.0, 3.0], dtype=DTYPE), reduction=r
        ),
        (3,),
        uniform,
    ),
    (
        "bce-pos-weight",
        lambda r: nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor([0.2, 4.0, 1.5], dtype=DTYPE), reduction=r
        ),
        (3,),
        binary,
    ),
    (
        "bce-weight-pos-weight-spatial",
        lambda r: nn.BCEWithLogitsLoss(
            weight=torch.tensor([[2.0, 0.5, 1.0]], dtype=DTYPE),
            pos_weight=torch.tensor([3.0, 0.1, 1.0], dtype=DTYPE),
            reduction=r,
        ),
        (2, 3),
        uniform,
    ),
]
CASE_IDS = [case[0] for case in CLOSED_FORM_CASES]


def make_case(case, reduction: str, num_samples: int, spread: float = 2.0):
    _, factory, shape, make_targets = case
    gen = torch.Generator().manual_seed(0)
    outputs = spread * torch.randn(num_samples, *shape, generator=gen, dtype=DTYPE)
    return factory(reduction), outputs, make_targets(outputs, gen)


# ---------------------------------------------------------------------------------------------
# exact closed forms


@pytest.mark.parametrize("num_samples", [1, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CLOSED_FORM_CASES, ids=CASE_IDS)
def test_closed_form_square_root_is_exact(case, reduction, num_samples):
    loss_fn, outputs, targets = make_case(case, reduction, num_samples)
    sqrt = hessian_sqrt(loss_fn, outputs, targets)
    sample_numel = math.prod(outputs.shape[1:])
    assert sqrt.shape == (sample_numel, *outputs.shape)
    assert sqrt.dtype == outputs.dtype
    assert_relative_close(gram(sqrt), reference_blocks(loss_fn, outputs, targets))


def test_closed_form_agrees_with_curvkit_verify_reference():
    case = CLOSED_FORM_CASES[CASE_IDS.index("ce-spatial")]
    loss_fn, outputs, targets = make_case(case, "mean", 3)
    expected = reference_output_hessian(loss_fn, outputs, targets).reshape(3, 12, 12)
    assert_relative_close(gram(hessian_sqrt(loss_fn, outputs, targets)), expected)


def test_cross_entropy_spatial_columns_live_at_one_position():
    loss_fn = nn.CrossEntropyLoss()
    outputs = torch.randn(2, 3, 4, dtype=DTYPE)
    sqrt = hessian_sqrt(loss_fn, outputs, torch.randint(0, 3, (2, 4)))
    # column k = (class c, position j) with k = c * 4 + j is nonzero at position j only
    support = sqrt.abs().sum(dim=(1, 2)) > 0  # [K, positions]
    expected = torch.eye(4, dtype=torch.bool).repeat(3, 1)
    assert torch.equal(support, expected)


def test_outputs_graph_is_not_needed_nor_used():
    weight = torch.randn(3, 4, dtype=DTYPE, requires_grad=True)
    outputs = torch.randn(5, 3, dtype=DTYPE) @ weight
    targets = torch.randint(0, 4, (5,))
    sqrt = hessian_sqrt(nn.CrossEntropyLoss(), outputs, targets)
    assert not sqrt.requires_grad
    assert weight.grad is None


def test_float32_closed_form_and_generic():
    gen = torch.Generator().manual_seed(3)
    outputs = torch.randn(4, 5, generator=gen)
    targets = torch.randint(0, 5, (4,), generator=gen)
    for loss_fn in (nn.CrossEntropyLoss(), F.cross_entropy):
        sqrt = hessian_sqrt(loss_fn, outputs, targets)
        assert sqrt.dtype == torch.float32
        expected = reference_blocks(loss_fn, outputs.double(), targets)
        assert_relative_close(gram(sqrt.double()), expected, rtol=1e-5)


def test_cross_entropy_all_targets_ignored():
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)
    outputs = torch.randn(3, 4, dtype=DTYPE)
    targets = torch.full((3,), -1)
    assert torch.isnan(loss_fn(outputs, targets))  # torch's mean over no targets
    assert torch.equal(hessian_sqrt(loss_fn, outputs, targets), torch.zeros(4, 3, 4, dtype=DTYPE))
    assert normalization(loss_fn, outputs, targets) == 0


# ---------------------------------------------------------------------------------------------
# Monte-Carlo


def assert_unbiased(loss_fn, outputs, targets, num_draws: int = 20_000) -> None:
    """The MC columns are i.i.d.; check the mean of ``M s s^T`` over ``M`` columns against the
    exact Hessian, entry by entry, within 5 empirical standard errors of that mean.

    The standard error is trustworthy when the entries are not dominated by rare events: the
    callers keep the predicted probabilities away from 0 and 1 (moderate logits), so that the
    central limit theorem holds well at this number of draws.
    """
    gen = torch.Generator().manual_seed(1234)
    sqrt = hessian_sqrt(loss_fn, outputs, targets, mc_samples=num_draws, generator=gen)
    assert sqrt.shape == (num_draws, *outputs.shape)
    flat = sqrt.reshape(*sqrt.shape[:2], -1)
    draws = num_draws * torch.einsum("kni,knj->knij", flat, flat)  # one unbiased estimate per k
    mean, std_error = draws.mean(dim=0), draws.std(dim=0) / math.sqrt(num_draws)
    exact = reference_blocks(loss_fn, outputs, targets)
    assert torch.allclose(mean, gram(sqrt))
    tiny = 1e-12 * exact.abs().max()
    assert ((mean - exact).abs() <= 5 * std_error + tiny).all()
    # the bound is informative: the estimate is within 3% of the Hessian's scale
    assert (mean - exact).abs().max() <= 0.03 * exact.abs().max()


MC_CASE_IDS = [
    "mse-spatial",
    "ce-weight-ignore-smoothing",
    "ce-spatial",
    "ce-probabilities",
    "bce-weight-pos-weight-spatial",
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case_id", MC_CASE_IDS)
def test_monte_carlo_square_root_is_unbiased(case_id, reduction):
    case = CLOSED_FORM_CASES[CASE_IDS.index(case_id)]
    assert_unbiased(*make_case(case, reduction, 3, spread=0.5))


def test_monte_carlo_generic_sketch_is_unbiased():
    outputs = torch.randn(2, 3, dtype=DTYPE)
    assert_unbiased(lambda o, t: torch.logsumexp(o, 1).sum() + (o**4).mean(), outputs, None)


@pytest.mark.parametrize("num_classes", [1, 2, 5, 16, 37, 1000])
def test_categorical_draws_follow_the_probabilities(num_classes):
    """Pearson's chi-square over the classes drawn often enough, and never a class of mass 0.

    Class counts include squares (16, 1000 = 31 blocks of 32 plus 8) and primes (5, 37),
    so that the last block of the two-level search is both full and partial.
    """
    torch.manual_seed(0)
    prob = torch.softmax(2 * torch.randn(3, num_classes, dtype=DTYPE), dim=1)
    if num_classes > 1:
        prob[:, 1] = 0
        prob = prob / prob.sum(1, keepdim=True)
    draws = 200_000
    # classes on axis 1, two positions after them: the same probabilities at both
    drawn = _categorical_draws(
        prob[:, :, None].expand(-1, -1, 2), draws // 2, torch.Generator().manual_seed(3)
    )
    assert drawn.shape == (3, 2, draws // 2) and drawn.dtype == torch.int64
    drawn = drawn.reshape(3, draws)
    counts = torch.zeros_like(prob).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=DTYPE))
    if num_classes > 1:
        assert (counts[:, 1] == 0).all()
    expected = prob * draws
    often = expected > 20
    chi_square = ((counts - expected) ** 2 / expected)[often].sum()
    dof = max(int(often.sum()) - 3, 1)
    assert abs(float(chi_square) - dof) <= 5 * math.sqrt(2 * dof) + 5


@pytest.mark.parametrize("case_id", ["mse", "ce-spatial", "bce-pos-weight"])
def test_monte_carlo_reproducible_with_generator(case_id):
    case = CLOSED_FORM_CASES[CASE_IDS.index(case_id)]
    loss_fn, outputs, targets = make_case(case, "mean", 4)

    def draw(seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return hessian_sqrt(loss_fn, outputs, targets, mc_samples=7, generator=gen)

    assert draw(5).shape == (7, *outputs.shape)
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
    torch.manual_seed(0)
    global_draw = hessian_sqrt(loss_fn, outputs, targets, mc_samples=7)
    assert global_draw.shape == (7, *outputs.shape)


# ---------------------------------------------------------------------------------------------
# generic losses


def gaussian_nll(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.gaussian_nll_loss(outputs, targets, torch.full_like(outputs, 0.3), full=True)


def log_cosh_sum(outputs: Tensor, targets: Tensor) -> Tensor:
    """A custom convex loss with a dense per-sample Hessian (log-sum-exp couples the entries)."""
    return (
        torch.logsumexp(outputs - targets, dim=1) + torch.cosh(outputs - targets).log().sum(1)
    ).sum()


class ScaledMSE(nn.MSELoss):
    """A subclass whose ``forward`` is not MSELoss's: it must take the generic path."""

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 3 * super().forward(outputs, targets) + (outputs**4).mean()


GENERIC_CASES = [  # (name, loss, reduction over samples)
    ("huber-mean", nn.HuberLoss(delta=0.7), "mean"),
    ("huber-sum", nn.HuberLoss(delta=0.7, reduction="sum"), "sum"),
    ("smooth-l1", nn.SmoothL1Loss(beta=2.0), "mean"),
    ("gaussian-nll", gaussian_nll, "mean"),
    ("custom", log_cosh_sum, "sum"),
    ("subclass", ScaledMSE(), "mean"),
    ("functional-ce", lambda o, t: F.cross_entropy(o, t.argmax(1), label_smoothing=0.1), "mean"),
]
GENERIC_IDS = [case[0] for case in GENERIC_CASES]


@pytest.mark.parametrize("num_samples", [1, 4])
@pytest.mark.parametrize(
    ("loss_fn", "reduction"), [case[1:] for case in GENERIC_CASES], ids=GENERIC_IDS
)
def test_generic_square_root_is_exact(loss_fn, reduction, num_samples):
    gen = torch.Generator().manual_seed(7)
    outputs = torch.randn(num_samples, 3, 2, generator=gen, dtype=DTYPE).flatten(1)
    targets = torch.randn(outputs.shape, generator=gen, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # convex: no warning
        sqrt = hessian_sqrt(loss_fn, outputs, targets)
    assert sqrt.shape == (6, *outputs.shape)
    assert_relative_close(gram(sqrt), reference_blocks(loss_fn, outputs, targets))


def test_generic_spatial_outputs():
    outputs = torch.randn(3, 2, 2, dtype=DTYPE)
    targets = torch.randn(3, 2, 2, dtype=DTYPE)
    sqrt = hessian_sqrt(log_cosh_sum, outputs, targets)
    assert sqrt.shape == (4, 3, 2, 2)
    assert_relative_close(gram(sqrt), reference_blocks(log_cosh_sum, outputs, targets))


def test_generic_without_batching_rule_falls_back_to_one_product_per_direction(monkeypatch):
    unbatched_grad = torch.autograd.grad

    def grad_without_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return unbatched_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad_without_batching)
    outputs = torch.randn(3, 4, dtype=DTYPE)
    targets = torch.randn(3, 4, dtype=DTYPE)
    sqrt = hessian_sqrt(log_cosh_sum, outputs, targets)
    monkeypatch.undo()
    assert_relative_close(gram(sqrt), reference_blocks(log_cosh_sum, outputs, targets))


def test_generic_piecewise_linear_loss_has_zero_curvature():
    outputs = torch.randn(3, 4, dtype=DTYPE)
    sqrt = hessian_sqrt(nn.L1Loss(), outputs, torch.randn(3, 4, dtype=DTYPE))
    assert torch.equal(sqrt, torch.zeros(4, 3, 4, dtype=DTYPE))
    constant = hessian_sqrt(lambda o, t: torch.tensor(1.0, dtype=DTYPE), outputs, None)
    assert torch.equal(constant, torch.zeros(4, 3, 4, dtype=DTYPE))


def test_non_convex_loss_warns_and_clamps_negative_eigenvalues():
    outputs = torch.tensor([[0.5, 2.0, -1.0], [3.0, 0.1, -2.5]], dtype=DTYPE)

    def sine_loss(o: Tensor, t: None) -> Tensor:
        return o.sin().sum()

    with pytest.warns(RuntimeWarning, match="not convex.*clamped to zero"):
        sqrt = hessian_sqrt(sine_loss, outputs, None)
    # the Hessian is diag(-sin(o)): its positive part is what remains
    expected = torch.diag_embed((-outputs.sin()).clamp(min=0))
    assert_relative_close(gram(sqrt), expected)


# ---------------------------------------------------------------------------------------------
# normalization


def assert_batches_combine(loss_fn, outputs, targets, split: int, reduction: str) -> None:
    """``Z L`` is the plain sum of the terms, so it adds up over batches; a mean is recovered as
    ``sum_b Z_b L_b / sum_b Z_b``, i.e. the normalisations add up too."""
    parts = [(outputs[:split], targets[:split]), (outputs[split:], targets[split:])]
    weights = torch.stack([normalization(loss_fn, *part) for part in parts])
    losses = torch.stack([loss_fn(*part) for part in parts])
    whole_weight = normalization(loss_fn, outputs, targets)
    whole = loss_fn(outputs, targets)
    assert sample_reduction(loss_fn, outputs, targets) == reduction
    assert sample_reduction(loss_fn, outputs[:1], targets[:1]) == reduction
    assert torch.allclose((weights * losses).sum(), whole_weight * whole, rtol=1e-12, atol=0)
    if reduction == "mean":
        assert torch.allclose((weights * losses).sum() / weights.sum(), whole, rtol=1e-12, atol=0)
    else:
        assert (weights == 1).all() and whole_weight == 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CLOSED_FORM_CASES, ids=CASE_IDS)
def test_normalization_combines_batches_exactly(case, reduction):
    loss_fn, outputs, targets = make_case(case, reduction, 7)
    assert_batches_combine(loss_fn, outputs, targets, split=3, reduction=reduction)


@pytest.mark.parametrize(
    ("loss_fn", "reduction"), [case[1:] for case in GENERIC_CASES], ids=GENERIC_IDS
)
def test_normalization_of_generic_losses(loss_fn, reduction):
    gen = torch.Generator().manual_seed(2)
    outputs = torch.randn(6, 4, generator=gen, dtype=DTYPE)
    targets = torch.randn(6, 4, generator=gen, dtype=DTYPE)
    assert_batches_combine(loss_fn, outputs, targets, split=2, reduction=reduction)


def test_normalization_values():
    outputs = torch.randn(6, 4, 2, dtype=DTYPE)
    gaussian_targets = torch.randn(6, 4, 2, dtype=DTYPE)
    indices = torch.tensor([[0, 1], [3, 3], [2, 2], [1, 0], [0, 0], [3, 1]])
    indices_ignored = indices.clone()
    indices_ignored[0] = -100
    assert normalization(nn.MSELoss(), outputs, gaussian_targets) == 48
    assert normalization(nn.MSELoss(reduction="sum"), outputs, gaussian_targets) == 1
    assert normalization(nn.BCEWithLogitsLoss(), outputs, gaussian_targets.sigmoid()) == 48
    assert normalization(nn.CrossEntropyLoss(), outputs, indices_ignored) == 10
    assert normalization(nn.CrossEntropyLoss(reduction="sum"), outputs, indices) == 1
    weighted = nn.CrossEntropyLoss(weight=CLASS_WEIGHT)
    assert normalization(weighted, outputs, indices_ignored) == CLASS_WEIGHT[indices[1:]].sum()
    assert normalization(weighted, outputs, outputs.softmax(1)) == 12
    assert normalization(nn.HuberLoss(), outputs, gaussian_targets) == 6
    assert normalization(log_cosh_sum, outputs[..., 0], gaussian_targets[..., 0]) == 1
    assert (
        normalization(
            lambda o, t: log_cosh_sum(o, t) / o.shape[0], outputs[..., 0], gaussian_targets[..., 0]
        )
        == 6
    )
    single = normalization(
        lambda o, t: (o - t).square().sum() / 17, outputs[:1], gaussian_targets[:1]
    )
    assert single == 1
    for loss_fn, targets in ((nn.CrossEntropyLoss(), indices), (log_cosh_sum, gaussian_targets)):
        value = normalization(
            loss_fn,
            outputs.float(),
            targets.to(outputs.float()) if targets.is_floating_point() else targets,
        )
        assert value.dim() == 0 and value.dtype == torch.float32


def test_sample_reduction_of_a_batch_of_one_duplicates_it():
    outputs = torch.randn(1, 3, dtype=DTYPE)
    targets = torch.randn(1, 3, dtype=DTYPE)
    assert sample_reduction(log_cosh_sum, outputs, targets) == "sum"
    assert sample_reduction(lambda o, t: log_cosh_sum(o, t) / len(o), outputs, targets) == "mean"
    assert normalization(lambda o, t: log_cosh_sum(o, t) / len(o), outputs, targets) == 1
    with pytest.raises(ValueError, match="cannot tell"):
        sample_reduction(lambda o, t: (o - t).square().sum(), outputs, outputs.clone())


def test_normalization_refuses_a_loss_that_is_neither_sum_nor_mean():
    outputs = torch.randn(4, 3, dtype=DTYPE)
    targets = torch.randn(4, 3, dtype=DTYPE)
    for function in (normalization, sample_reduction):
        with pytest.raises(ValueError, match="neither the sum"):
            function(lambda o, t: (o - t).square().sum() / math.sqrt(len(o)), outputs, targets)


def test_normalization_refuses_all_zero_single_losses():
    outputs = torch.randn(4, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="cannot tell"):
        normalization(lambda o, t: (o - t).square().sum(), outputs, outputs.clone())


def test_normalization_needs_batched_tensor_targets_for_generic_losses():
    outputs = torch.randn(4, 3, dtype=DTYPE)
    for targets in (None, torch.randn(3, 3, dtype=DTYPE), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="batch size 4"):
            normalization(log_cosh_sum, outputs, targets)


# ---------------------------------------------------------------------------------------------
# errors


OUTPUTS = torch.randn(3, 4, dtype=DTYPE)
INDICES = torch.tensor([0, 3, 1])


@pytest.mark.parametrize("function", [hessian_sqrt, normalization, sample_reduction])
@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.MSELoss(reduction="none"),
        nn.CrossEntropyLoss(reduction="none"),
        nn.HuberLoss(reduction="none"),
    ],
)
def test_reduction_none_is_refused(function, loss_fn):
    targets = INDICES if isinstance(loss_fn, nn.CrossEntropyLoss) else OUTPUTS
    with pytest.raises(ValueError, match="reduction='none'"):
        function(loss_fn, OUTPUTS, targets)


@pytest.mark.parametrize("function", [hessian_sqrt, normalization, sample_reduction])
@pytest.mark.parametrize("loss_fn", [nn.NLLLoss(), nn.KLDivLoss(reduction="batchmean")])
def test_losses_linear_in_their_input_are_refused(function, loss_fn):
    with pytest.raises(ValueError, match=r"use nn\.CrossEntropyLoss"):
        function(loss_fn, OUTPUTS.log_softmax(1), INDICES)


@pytest.mark.parametrize("function", [hessian_sqrt, normalization])
@pytest.mark.parametrize(
    ("loss_fn", "targets", "message"),
    [
        (nn.MSELoss(), torch.randn(3, 1, dtype=DTYPE), "targets of the outputs' shape"),
        (nn.MSELoss(), torch.randn(4, dtype=DTYPE), "targets of the outputs' shape"),
        (nn.BCEWithLogitsLoss(), torch.rand(3, 4, 1, dtype=DTYPE), "targets of the outputs' shape"),
        (nn.CrossEntropyLoss(), torch.tensor([0, 1]), "class-index targets needs targets of shape"),
        (nn.CrossEntropyLoss(), torch.rand(3, 5, dtype=DTYPE), "class-probability targets"),
        (nn.CrossEntropyLoss(), torch.tensor([0, 4, 1]), r"class indices in \[0, 4\)"),
        (nn.CrossEntropyLoss(), torch.tensor([0, -100, -1]), r"class indices in \[0, 4\)"),
        (
            nn.CrossEntropyLoss(weight=torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=DTYPE)),
            INDICES,
            "negative class weights",
        ),
        (nn.CrossEntropyLoss(), -OUTPUTS.softmax(1), "negative target probabilities"),
    ],
)
def test_targets_that_do_not_fit_are_refused(function, loss_fn, targets, message):
    with pytest.raises(ValueError, match=message):
        function(loss_fn, OUTPUTS, targets)


@pytest.mark.parametrize(
    ("loss_fn", "targets", "message"),
    [
        (
            nn.BCEWithLogitsLoss(weight=torch.tensor([1.0, -1.0, 1.0, 1.0])),
            OUTPUTS.sigmoid(),
            "negative",
        ),
        (
            nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0)),
            -OUTPUTS.sigmoid() - 1,
            r"outside \[0, 1\]",
        ),
        (
            nn.BCEWithLogitsLoss(pos_weight=torch.ones(2, 3, 4)),
            OUTPUTS.sigmoid(),
            "does not broadcast",
        ),
        (nn.BCEWithLogitsLoss(weight=torch.ones(5)), OUTPUTS.sigmoid(), "does not broadcast"),
    ],
)
def test_bce_weights_that_do_not_fit_are_refused(loss_fn, targets, message):
    with pytest.raises(ValueError, match=message):
        hessian_sqrt(loss_fn, OUTPUTS, targets)


@pytest.mark.parametrize(
    ("loss_fn", "targets", "error"),
    [
        (nn.MSELoss(), [1.0, 2.0], TypeError),
        (nn.CrossEntropyLoss(), [0, 1, 2], TypeError),
        (nn.CrossEntropyLoss(), torch.tensor([True, False, True]), TypeError),
    ],
)
def test_targets_of_the_wrong_type_are_refused(loss_fn, targets, error):
    with pytest.raises(error, match="targets"):
        hessian_sqrt(loss_fn, OUTPUTS, targets)


def test_cross_entropy_needs_a_batch_dimension():
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        hessian_sqrt(nn.CrossEntropyLoss(), torch.randn(4, dtype=DTYPE), torch.tensor(1))


@pytest.mark.parametrize("function", [hessian_sqrt, normalization, sample_reduction])
def test_bad_outputs_are_refused(function):
    with pytest.raises(TypeError, match="floating-point"):
        function(nn.MSELoss(), torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 2))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        function(nn.MSELoss(), [1.0, 2.0], torch.ones(2))
    with pytest.raises(ValueError, match="batch dimension"):
        function(nn.MSELoss(), torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="batch dimension"):
        function(nn.MSELoss(), torch.ones(0, 3), torch.ones(0, 3))
    with pytest.raises(TypeError, match="callable"):
        function("mse", OUTPUTS, OUTPUTS)


def test_bad_monte_carlo_arguments_are_refused():
    with pytest.raises(ValueError, match="mc_samples must be 0"):
        hessian_sqrt(nn.MSELoss(), OUTPUTS, OUTPUTS, mc_samples=-1)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match="mc_samples must be an int"):
            hessian_sqrt(nn.MSELoss(), OUTPUTS, OUTPUTS, mc_samples=bad)
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        hessian_sqrt(nn.MSELoss(), OUTPUTS, OUTPUTS, mc_samples=2, generator=0)


@pytest.mark.parametrize("function", [hessian_sqrt, normalization, sample_reduction])
def test_generic_loss_must_return_a_scalar(function):
    with pytest.raises(ValueError, match="scalar batch loss"):
        function(lambda o, t: (o - t).square(), OUTPUTS, OUTPUTS)
    with pytest.raises(ValueError, match="scalar batch loss"):
        function(lambda o, t: 1.0, OUTPUTS, OUTPUTS)
