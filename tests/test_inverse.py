"""Damped inverses against dense torch.linalg: inv @ (A v + d v) == v."""

from __future__ import annotations

import pytest
import torch
from dense_operator import DenseOperator, ggn_operator, with_spectrum

import curvkit
from curvkit.operators.inverse import (
    ConjugateGradientInverse,
    NeumannInverse,
    WoodburyInverse,
)
from curvkit.testing.zoo import make_case

DAMPING = 0.3


@pytest.fixture(scope="module")
def spd() -> DenseOperator:
    """A positive semi-definite 40 x 40 matrix of rank 30 (as a GGN is)."""
    eigenvalues = torch.cat([torch.logspace(-2, 1, 30), torch.zeros(10)]).double()
    return DenseOperator(with_spectrum(eigenvalues, seed=7))


def round_trip(operator, inverse, columns: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(operator.shape[0], columns, generator=generator, dtype=torch.float64)
    damped = operator @ vectors + inverse.damping * vectors
    return inverse @ damped, vectors


def test_cg_solves_all_columns_to_a_tight_tolerance(spd):
    inverse = spd.inverse(DAMPING, method="cg", tol=1e-13)
    assert isinstance(inverse, ConjugateGradientInverse)
    solved, vectors = round_trip(spd, inverse, columns=4)
    torch.testing.assert_close(solved, vectors, rtol=0, atol=1e-10)
    info = inverse.info
    assert info.method == "cg" and info.converged
    assert 0 < info.iterations <= 2 * spd.shape[0]
    assert info.residual_norms.shape == (4,) and (info.residual_norms <= 1e-13).all()


def test_cg_batches_only_the_running_columns(spd):
    """A zero column is solved before the first product; the rest share each product."""
    inverse = spd.inverse(DAMPING, tol=1e-12)
    operand = torch.zeros(40, 3, dtype=torch.float64)
    operand[:, 1:] = torch.randn(40, 2, generator=torch.Generator().manual_seed(1)).double()
    spd.operands.clear()
    solution = inverse @ operand
    assert (solution[:, 0] == 0).all()
    assert spd.operands[0] == (40, 2)
    assert all(shape[1] <= 2 for shape in spd.operands)
    reference = torch.linalg.solve(spd.matrix + DAMPING * torch.eye(40).double(), operand)
    torch.testing.assert_close(solution, reference, rtol=0, atol=1e-10)


def test_cg_reports_a_budget_it_ran_out_of(spd):
    inverse = spd.inverse(1e-3, tol=1e-12, max_iters=3)
    with pytest.warns(RuntimeWarning, match="max_iters=3"):
        inverse @ torch.ones(40, dtype=torch.float64)
    assert not inverse.info.converged and inverse.info.iterations == 3


def test_cg_refuses_an_indefinite_operator():
    indefinite = DenseOperator(torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="not positive definite"):
        indefinite.inverse(0.5) @ torch.ones(3, dtype=torch.float64)


def test_neumann_converges_with_its_default_scale(spd):
    inverse = spd.inverse(1.0, method="neumann", tol=1e-13, max_iters=500)
    assert isinstance(inverse, NeumannInverse)
    # The Lanczos estimate of lambda_max(A + d I) = 11: alpha = 1/11 up to the Ritz accuracy.
    assert inverse.scale == pytest.approx(1 / 11, rel=1e-6)
    solved, vectors = round_trip(spd, inverse)
    torch.testing.assert_close(solved, vectors, rtol=0, atol=1e-11)
    assert inverse.info.converged and inverse.info.iterations < 500


def test_neumann_warns_when_it_diverges(spd):
    inverse = spd.inverse(1.0, method="neumann", scale=0.5, max_iters=20)
    with pytest.warns(RuntimeWarning, match="diverges"):
        inverse @ torch.ones(40, dtype=torch.float64)
    assert not inverse.info.converged


@pytest.mark.parametrize("params", ["all", "groups"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_woodbury_is_exact_for_the_ggn(params, reduction):
    operator = ggn_operator(batch_size=7, params=params)
    if reduction == "sum":
        case = make_case("mlp", 7)
        case.loss_fn.reduction = "sum"
        groups = list(case.model.parameters())
        if params == "groups":
            groups = [{"params": groups[:2]}, {"params": groups[2:]}]
        operator = curvkit.GGNOperator(
            case.model, case.loss_fn, (case.inputs[0], case.targets), params=groups
        )
    inverse = operator.inverse(DAMPING)
    assert isinstance(inverse, WoodburyInverse)
    solved, vectors = round_trip(operator, inverse)
    torch.testing.assert_close(solved, vectors, rtol=0, atol=1e-10)
    dense = operator.to_dense()
    reference = torch.linalg.inv(dense + DAMPING * torch.eye(dense.shape[0]).double())
    torch.testing.assert_close(inverse.to_dense(), reference, rtol=0, atol=1e-10)


def test_woodbury_multiplies_parameter_shaped_lists():
    operator = ggn_operator(batch_size=5)
    inverse = operator.inverse(DAMPING)
    case = make_case("mlp", 5)
    blocks = [torch.randn_like(p) for p in case.model.parameters()]
    flat = torch.cat([b.flatten() for b in blocks])
    result = inverse @ blocks
    assert [r.shape for r in result] == [b.shape for b in blocks]
    torch.testing.assert_close(torch.cat([r.flatten() for r in result]), inverse @ flat)


def test_the_default_is_cg_when_the_gram_is_too_large():
    operator = ggn_operator(batch_size=7)
    assert isinstance(operator.inverse(DAMPING, max_gram_size=28), WoodburyInverse)
    chosen = operator.inverse(DAMPING, max_gram_size=20)
    assert isinstance(chosen, ConjugateGradientInverse)
    with pytest.raises(ValueError, match=r"N\*C' = 7\*4 = 28 columns.*method='cg'"):
        operator.inverse(DAMPING, method="woodbury", max_gram_size=20)


def test_several_batches_cg_by_default_woodbury_on_the_joined_batch():
    case = make_case("mlp", 8)
    inputs, targets = case.inputs[0], case.targets
    batches = [(inputs[:5], targets[:5]), (inputs[5:], targets[5:])]
    operator = curvkit.GGNOperator(case.model, case.loss_fn, batches)
    assert isinstance(operator.inverse(DAMPING), ConjugateGradientInverse)
    woodbury = operator.inverse(DAMPING, method="woodbury")
    solved, vectors = round_trip(operator, woodbury)
    torch.testing.assert_close(solved, vectors, rtol=0, atol=1e-10)
    sampled = curvkit.GGNOperator(
        case.model, case.loss_fn, batches, mc_samples=2, generator=torch.Generator()
    )
    with pytest.raises(ValueError, match="other Monte-Carlo samples"):
        sampled.inverse(DAMPING, method="woodbury")


def test_cg_and_neumann_work_on_the_ggn_too():
    operator = ggn_operator(batch_size=7)
    for inverse in (
        operator.inverse(DAMPING, method="cg", tol=1e-13),
        operator.inverse(DAMPING, method="neumann", tol=1e-13, max_iters=2000),
    ):
        solved, vectors = round_trip(operator, inverse)
        torch.testing.assert_close(solved, vectors, rtol=0, atol=1e-9)


def test_operands_are_not_modified(spd):
    vector = torch.randn(40, generator=torch.Generator().manual_seed(2)).double()
    copy = vector.clone()
    for method in ("cg", "neumann"):
        spd.inverse(1.0, method=method, max_iters=500) @ vector
    ggn = ggn_operator(batch_size=3)
    ggn_vector = torch.randn(ggn.shape[0], dtype=torch.float64)
    ggn_copy = ggn_vector.clone()
    ggn.inverse(DAMPING) @ ggn_vector
    assert torch.equal(vector, copy) and torch.equal(ggn_vector, ggn_copy)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda op: op.inverse(0.1, method="lu"), ValueError, "unknown method 'lu'"),
        (lambda op: op.inverse(0.1, method="woodbury"), ValueError, "needs a square-root"),
        (lambda op: op.inverse(0.1, method="cg", scale=2.0), TypeError, "takes the options"),
        (lambda op: op.inverse(-1.0), ValueError, "damping must be >= 0"),
        (
            lambda op: op.inverse(float("nan"), method="neumann"),
            ValueError,
            "damping must be a finite",
        ),
        (lambda op: op.inverse(0.1, tol=-1.0), ValueError, "tol must be >= 0"),
        (lambda op: op.inverse(0.1, max_iters=0), ValueError, "max_iters must be an integer >= 1"),
        (lambda op: op.inverse(0.1, method="neumann", scale=-1.0), ValueError, "scale must be"),
    ],
)
def test_bad_input_is_refused(spd, call, error, message):
    with pytest.raises(error, match=message):
        call(spd)


def test_ggn_woodbury_refuses_bad_input():
    operator = ggn_operator(batch_size=3)
    with pytest.raises(ValueError, match="damping > 0"):
        operator.inverse(0.0)
    with pytest.raises(TypeError, match=r"takes only max_gram_size.*method='cg'"):
        operator.inverse(0.1, tol=1e-8)
