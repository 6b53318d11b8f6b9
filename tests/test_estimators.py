"""Randomized estimators against dense torch.linalg, with bounds from their variances.

Each unbiasedness test averages ``REPEATS`` independent estimates (fixed seeds) and accepts a
deviation from the exact value of at most ``Z`` standard errors (:func:`unbiased`). For
Hutchinson's estimators the standard error comes from their exact variance formulas. For
Hutch++, XTrace and XDiag, whose variances have only loose upper bounds (XDiag's,
:math:`2 \\lVert A \\rVert_F^2` per entry, exceeds the largest diagonal entry here, so that an
all-zeros estimator would pass), it is the sample's own: the standard deviation of the
``REPEATS`` estimates over :math:`\\sqrt{\\text{REPEATS}}`. Each check is shown to reject a zero
estimator and a biased variant of the estimator
(:func:`test_the_unbiasedness_check_rejects_biased_and_zero_estimators`).
"""

from __future__ import annotations

import math

import pytest
import torch
from dense_operator import DenseOperator, ggn_operator, with_spectrum

import curvkit
from curvkit.randomized import estimators
from curvkit.testing.zoo import make_case

REPEATS = 300
Z = 4.5
DISTRIBUTIONS = ["rademacher", "normal"]


@pytest.fixture(scope="module")
def matrix() -> torch.Tensor:
    """A 24 x 24 symmetric matrix with a decaying, partly negative spectrum."""
    eigenvalues = torch.tensor([3.0 * 0.7**i for i in range(22)] + [-0.5, -1.0])
    return with_spectrum(eigenvalues.double(), seed=3)


def repeat(estimator, operator, num_matvecs: int, distribution: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(
        [
            estimator(operator, num_matvecs, distribution=distribution, generator=generator)
            for _ in range(REPEATS)
        ]
    )


def unbiased(estimates: torch.Tensor, exact: torch.Tensor, errors: torch.Tensor | float) -> bool:
    """Whether the mean of ``estimates`` is within ``Z`` standard errors of ``exact``, entrywise."""
    return bool(((estimates.mean(0) - exact).abs() <= Z * torch.as_tensor(errors)).all())


def sample_errors(estimates: torch.Tensor) -> torch.Tensor:
    """The standard error of the mean of ``estimates``, from their own spread."""
    return estimates.std(0) / math.sqrt(estimates.shape[0])


def hutchinson_variance(matrix: torch.Tensor, distribution: str) -> float:
    """The variance of one Hutchinson probe's estimate of tr(matrix)."""
    frobenius = float(matrix.square().sum())
    if distribution == "normal":
        return 2 * frobenius
    return 2 * (frobenius - float(matrix.diagonal().square().sum()))


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_hutchinson_trace_is_unbiased(matrix, distribution):
    num_matvecs = 4
    estimates = repeat(estimators.hutchinson_trace, matrix, num_matvecs, distribution)
    error = math.sqrt(hutchinson_variance(matrix, distribution) / num_matvecs / REPEATS)
    assert unbiased(estimates, matrix.trace(), error)
    # The spread itself matches the variance formula (a chi-square band for 300 samples).
    ratio = float(estimates.var()) / (hutchinson_variance(matrix, distribution) / num_matvecs)
    assert 0.7 < ratio < 1.3


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_hutchpp_trace_is_unbiased(matrix, distribution):
    num_matvecs = 9
    estimates = repeat(estimators.hutchpp_trace, matrix, num_matvecs, distribution)
    assert unbiased(estimates, matrix.trace(), sample_errors(estimates))
    # The spread is within the bound of the docstring, 2 ||A||_F^2 / m'.
    assert float(estimates.var()) <= 2 * float(matrix.square().sum()) / 3


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_xtrace_is_unbiased(matrix, distribution):
    estimates = repeat(estimators.xtrace, matrix, 8, distribution)
    assert unbiased(estimates, matrix.trace(), sample_errors(estimates))
    assert float(estimates.var()) <= 2 * float(matrix.square().sum())


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_hutchinson_diag_is_unbiased(matrix, distribution):
    num_matvecs = 3
    estimates = repeat(estimators.hutchinson_diag, matrix, num_matvecs, distribution)
    rows = matrix.square().sum(1)
    diagonal = matrix.diagonal()
    variances = rows + diagonal.square() if distribution == "normal" else rows - diagonal.square()
    errors = (variances / num_matvecs / REPEATS).sqrt()
    assert unbiased(estimates, diagonal, errors)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_xdiag_is_unbiased(matrix, distribution):
    """The full-rank branch (rank 24 > the sketch's 4 columns), entry by entry."""
    estimates = repeat(estimators.xdiag, matrix, 8, distribution)
    assert unbiased(estimates, matrix.diagonal(), sample_errors(estimates))
    assert (estimates.var(0) <= 2 * float(matrix.square().sum())).all()


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_squared_frobenius_norm_is_unbiased(matrix, distribution):
    num_matvecs = 4
    estimates = repeat(
        estimators.hutchinson_squared_frobenius_norm, matrix, num_matvecs, distribution
    )
    square = matrix @ matrix
    error = math.sqrt(hutchinson_variance(square, distribution) / num_matvecs / REPEATS)
    assert unbiased(estimates, square.trace(), error)


def _sketch(operator: torch.Tensor, num_matvecs: int, *, distribution: str, generator):
    """The orthonormal basis of A Omega for num_matvecs // 2 Rademacher or normal probes."""
    probes = estimators._Probe(operator, num_matvecs, distribution, generator, None, None, "")
    return torch.linalg.qr(operator @ probes.draw(num_matvecs // 2)).Q


def _sketch_trace_only(operator, num_matvecs, **options):
    """Biased Hutch++/XTrace: the trace on the sketch's range, without the residual's."""
    basis = _sketch(operator, num_matvecs, **options)
    return (basis * (operator @ basis)).sum()


def _projected_diagonal_only(operator, num_matvecs, **options):
    """Biased XDiag: diag(Q Q^T A) alone, without the leave-one-out correction."""
    basis = _sketch(operator, num_matvecs, **options)
    return (basis * (operator @ basis)).sum(1)


def _zeros(operator, num_matvecs, **options):
    return torch.zeros(operator.shape[0], dtype=operator.dtype)


@pytest.mark.parametrize(
    ("wrong", "num_matvecs", "exact", "errors"),
    [
        (_zeros, 4, "trace", "hutchinson"),
        (_sketch_trace_only, 9, "trace", "sample"),
        (lambda a, m, **o: _zeros(a, m).sum(), 8, "trace", "sample"),
        (_zeros, 3, "diagonal", "hutchinson_diag"),
        (_projected_diagonal_only, 8, "diagonal", "sample"),
        (_zeros, 8, "diagonal", "sample"),
    ],
)
def test_the_unbiasedness_check_rejects_biased_and_zero_estimators(
    matrix, wrong, num_matvecs, exact, errors
):
    """The checks above, run on deliberately wrong estimators, fail."""
    estimates = repeat(wrong, matrix, num_matvecs, "rademacher")
    if exact == "trace":
        estimates, target = estimates.sum(-1) if estimates.dim() > 1 else estimates, matrix.trace()
    else:
        target = matrix.diagonal()
    if errors == "hutchinson":
        errors = math.sqrt(hutchinson_variance(matrix, "rademacher") / num_matvecs / REPEATS)
    elif errors == "hutchinson_diag":
        rows = matrix.square().sum(1)
        errors = ((rows - target.square()) / num_matvecs / REPEATS).sqrt()
    else:
        errors = sample_errors(estimates)
    assert not unbiased(estimates, target, errors)


def test_xtrace_and_hutchpp_beat_hutchinson_on_a_decaying_spectrum(matrix):
    """The point of the sketch: at equal products, a far smaller spread than Hutchinson's."""
    positive = with_spectrum(torch.tensor([0.5**i for i in range(24)]).double(), seed=4)
    spreads = {
        estimator: float(repeat(estimator, positive, 12, "rademacher").std())
        for estimator in (estimators.hutchinson_trace, estimators.hutchpp_trace, estimators.xtrace)
    }
    assert spreads[estimators.hutchpp_trace] < spreads[estimators.hutchinson_trace] / 3
    assert spreads[estimators.xtrace] < spreads[estimators.hutchinson_trace] / 3


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_sketching_estimators_are_exact_with_d_products(matrix, distribution):
    dim = matrix.shape[0]
    generator = torch.Generator().manual_seed(0)
    options = {"distribution": distribution, "generator": generator}
    exact = matrix.trace()
    for num_matvecs in (dim, dim + 5):
        torch.testing.assert_close(estimators.hutchpp_trace(matrix, num_matvecs, **options), exact)
        torch.testing.assert_close(estimators.xtrace(matrix, num_matvecs, **options), exact)
        torch.testing.assert_close(
            estimators.xdiag(matrix, num_matvecs, **options), matrix.diagonal()
        )


@pytest.mark.parametrize("params", ["all", "groups"])
def test_sketching_estimators_are_exact_on_a_low_rank_ggn(params):
    """The MLP's GGN on 2 samples has rank <= 2 * 4 per group: the sketches span its range."""
    operator = ggn_operator(batch_size=2, params=params)
    dense = operator.to_dense()
    generator = torch.Generator().manual_seed(1)
    torch.testing.assert_close(
        estimators.xtrace(operator, 40, generator=generator), dense.trace(), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(
        estimators.hutchpp_trace(operator, 60, generator=generator),
        dense.trace(),
        rtol=1e-10,
        atol=0,
    )
    torch.testing.assert_close(
        estimators.xdiag(operator, 40, generator=generator),
        dense.diagonal(),
        rtol=1e-10,
        atol=1e-14,
    )


def test_hutchinson_on_the_ggn_operator_is_unbiased():
    operator = ggn_operator(batch_size=7)
    dense = operator.to_dense()
    num_matvecs = 50
    generator = torch.Generator().manual_seed(2)
    estimates = torch.stack(
        [estimators.hutchinson_trace(operator, num_matvecs, generator=generator) for _ in range(8)]
    )
    error = math.sqrt(hutchinson_variance(dense, "rademacher") / num_matvecs / 8)
    assert abs(float(estimates.mean() - dense.trace())) <= Z * error
    diagonal = estimators.hutchinson_diag(operator, 400, generator=generator)
    variances = dense.square().sum(1) - dense.diagonal().square()
    assert ((diagonal - dense.diagonal()).abs() <= Z * (variances / 400).sqrt() + 1e-15).all()


def test_products_are_batched():
    operator = DenseOperator(with_spectrum(torch.linspace(1, 2, 30).double()))
    estimators.hutchinson_trace(operator, 10)
    estimators.hutchinson_diag(operator, 7)
    estimators.hutchinson_squared_frobenius_norm(operator, 5)
    assert operator.operands == [(30, 10), (30, 7), (30, 5)]
    operator.operands.clear()
    estimators.hutchpp_trace(operator, 10)
    assert operator.operands == [(30, 3), (30, 7)]
    operator.operands.clear()
    estimators.xtrace(operator, 10)
    estimators.xdiag(operator, 10)
    assert operator.operands == [(30, 5), (30, 5)] * 2


def test_same_seed_same_estimate_and_any_matmul_object():
    """A plain object with ``shape`` and ``@`` (no dtype: float64 on the CPU) works too."""
    dense = with_spectrum(torch.linspace(1, 2, 12).double())

    class Plain:
        shape = (12, 12)

        def __matmul__(self, other):
            return dense @ other

    first = estimators.xtrace(Plain(), 6, generator=torch.Generator().manual_seed(5))
    second = estimators.xtrace(dense, 6, generator=torch.Generator().manual_seed(5))
    assert first.dtype == torch.float64
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    single = estimators.hutchinson_trace(dense.float(), 3)
    assert single.dtype == torch.float32


def test_inputs_are_not_modified():
    dense = with_spectrum(torch.linspace(1, 2, 12).double())
    copy = dense.clone()
    estimators.xdiag(dense, 6)
    estimators.hutchpp_trace(dense, 6)
    assert torch.equal(dense, copy)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: estimators.hutchinson_trace(object(), 3), TypeError, "`shape` and `@`"),
        (lambda: estimators.xtrace(torch.ones(3, 4), 2), ValueError, "square"),
        (
            lambda: estimators.hutchinson_diag(torch.eye(3), 0),
            ValueError,
            "num_matvecs must be an integer >= 1",
        ),
        (
            lambda: estimators.hutchpp_trace(torch.eye(5), 2),
            ValueError,
            "num_matvecs must be an integer >= 3",
        ),
        (
            lambda: estimators.xdiag(torch.eye(5), 1),
            ValueError,
            "num_matvecs must be an integer >= 2",
        ),
        (lambda: estimators.xtrace(torch.eye(5), 2.0), TypeError, "must be an int"),
        (
            lambda: estimators.hutchinson_trace(torch.eye(3), 2, distribution="uniform"),
            ValueError,
            "'rademacher' or 'normal'",
        ),
        (
            lambda: estimators.hutchinson_trace(
                curvkit.GGNOperator.__new__(curvkit.GGNOperator), 2
            ),
            TypeError,
            "`shape` and `@`",
        ),
    ],
)
def test_bad_input_is_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_product_of_the_wrong_shape_is_refused():
    class Wrong:
        shape = (4, 4)

        def __matmul__(self, other):
            return other[:2]

    with pytest.raises(ValueError, match="must be a tensor of that shape"):
        estimators.hutchinson_trace(Wrong(), 2)


@pytest.mark.parametrize("params", ["all", "groups"])
def test_ggn_quadratic_forms_match_the_dense_matrix(params):
    """The GGN's forms ||V^T u||^2, which Hutchinson's trace uses, on one batch and on several."""
    operator = ggn_operator(batch_size=7, params=params)
    dense = operator.to_dense()
    vectors = torch.randn(dense.shape[0], 5, generator=torch.Generator().manual_seed(3)).double()
    expected = (vectors * (dense @ vectors)).sum(0)
    torch.testing.assert_close(operator.quadratic_forms(vectors), expected, rtol=1e-10, atol=0)
    case = make_case("mlp", 7)
    batches = [(case.inputs[0][:3], case.targets[:3]), (case.inputs[0][3:], case.targets[3:])]
    parameters = list(case.model.parameters())
    groups = [{"params": parameters[:2]}, {"params": parameters[2:]}]
    joined = curvkit.GGNOperator(
        case.model, case.loss_fn, batches, params=groups if params == "groups" else None
    )
    torch.testing.assert_close(joined.quadratic_forms(vectors), expected, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="takes a"):
        operator.quadratic_forms(vectors[:-1])


@pytest.mark.parametrize("name", ["EFOperator", "HessianOperator"])
def test_quadratic_forms_of_every_operator_match_its_dense_matrix(name):
    """EF's from ||V^T u||^2 (its gradient columns), the Hessian's from products."""
    case = make_case("mlp", 7)
    operator = getattr(curvkit, name)(case.model, case.loss_fn, (case.inputs[0], case.targets))
    vectors = torch.randn(operator.shape[0], 5, generator=torch.Generator().manual_seed(3))
    vectors = vectors.double()
    expected = (vectors * (operator.to_dense() @ vectors)).sum(0)
    torch.testing.assert_close(operator.quadratic_forms(vectors), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["HessianOperator", "EFOperator"])
def test_estimators_and_inverses_work_on_every_curvkit_operator(name):
    case = make_case("mlp", 3)
    operator = getattr(curvkit, name)(case.model, case.loss_fn, (case.inputs[0], case.targets))
    dense = operator.to_dense()
    generator = torch.Generator().manual_seed(4)
    exact = estimators.xtrace(operator, operator.shape[0], generator=generator)
    torch.testing.assert_close(exact, dense.trace(), rtol=1e-10, atol=1e-12)
    forms = operator.quadratic_forms(torch.eye(operator.shape[0], dtype=torch.float64)[:, :4])
    torch.testing.assert_close(forms, dense.diagonal()[:4])
    # A damping above the most negative eigenvalue makes A + d I positive definite for cg.
    damping = 1.0 - min(0.0, float(torch.linalg.eigvalsh(dense)[0]))
    inverse = operator.inverse(damping, method="cg", tol=1e-13)
    vector = torch.randn(operator.shape[0], generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        inverse @ (dense @ vector + damping * vector), vector, rtol=0, atol=1e-10
    )
