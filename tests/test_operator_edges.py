"""Operators, inverses and randomized methods at their edges: a right answer or a clear error.

Each test here failed before the fix it checks (issue 22): a silent wrong answer (conjugate
gradients on NaN, the undamped inverse of a singular KFAC), an error that did not help, or a
state loaded into the wrong operator.
"""

from __future__ import annotations

import ast
import importlib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from dense_operator import DenseOperator, ggn_operator, with_spectrum
from torch import nn

import curvkit
from curvkit import EKFACOperator, HessianOperator, KFACOperator
from curvkit.randomized import estimators
from curvkit.randomized.spectral import lanczos_top_eigenpairs, spectral_density


def _mlp(names: tuple[str, str] = ("0", "2"), dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    first, second = nn.Linear(5, 4), nn.Linear(4, 3)
    layers = OrderedDict([(names[0], first), ("act", nn.Tanh()), (names[1], second)])
    return nn.Sequential(layers).to(dtype)


def _data(n: int = 6, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(n, 5, generator=generator, dtype=torch.float64).to(dtype)
    return inputs, torch.randint(0, 3, (n,), generator=generator)


def _kfac(cls: type[KFACOperator] = KFACOperator, **kwargs) -> KFACOperator:
    return cls(
        _mlp(**kwargs), nn.CrossEntropyLoss(), _data(dtype=kwargs.get("dtype", torch.float64))
    )


@pytest.fixture
def singular() -> DenseOperator:
    """A positive semi-definite 12 x 12 matrix of rank 9."""
    eigenvalues = torch.cat([torch.linspace(0.5, 3.0, 9), torch.zeros(3)]).double()
    return DenseOperator(with_spectrum(eigenvalues, seed=7))


# -- inverses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cg", "neumann"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_inverse_refuses_a_non_finite_right_hand_side(method, value):
    operator = DenseOperator(with_spectrum(torch.linspace(1, 2, 10).double()))
    rhs = torch.ones(10, 2, dtype=torch.float64)
    rhs[3, 1] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        options = {"scale": 0.3} if method == "neumann" else {}
        operator.inverse(0.1, method=method, **options) @ rhs


def test_cg_refuses_the_undamped_inverse_of_a_singular_operator(singular):
    rhs = torch.linspace(-1, 1, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"singular or not positive definite.*damping > 0"):
        singular.inverse(0.0, method="cg") @ rhs
    # With a damping, the same operator is solved to the tolerance.
    solution = singular.inverse(0.1, method="cg", tol=1e-12) @ rhs
    expected = torch.linalg.solve(singular.matrix + 0.1 * torch.eye(12, dtype=torch.float64), rhs)
    torch.testing.assert_close(solution, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_the_undamped_inverse_of_a_singular_kfac_is_refused(cls):
    """Cross-entropy's output factor B always has the null vector of ones."""
    operator = _kfac(cls)
    with pytest.raises(ValueError, match=r"singular.*pass damping > 0"):
        operator.inverse()
    dense = operator.to_dense()
    eye = torch.eye(dense.shape[0], dtype=dense.dtype)
    torch.testing.assert_close(
        operator.inverse(1e-3).to_dense(), torch.linalg.inv(dense + 1e-3 * eye), rtol=1e-8, atol=0
    )


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_logdet_and_det_of_a_singular_kfac_are_minus_inf_and_zero(cls):
    operator = _kfac(cls)
    assert operator.logdet() == -float("inf")
    assert operator.det() == 0
    dense = operator.to_dense()
    eye = torch.eye(dense.shape[0], dtype=dense.dtype)
    torch.testing.assert_close(
        operator.logdet(0.1), torch.logdet(dense + 0.1 * eye), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize(
    ("make", "method_options"),
    [
        (lambda: _kfac(), {}),
        (lambda: ggn_operator(batch_size=5), {}),
        (lambda: DenseOperator(with_spectrum(torch.linspace(1, 2, 10).double())), {"tol": 1e-12}),
    ],
)
def test_a_0_dim_tensor_damping_is_the_same_as_a_float(make, method_options):
    operator = make()
    vector = torch.linspace(-1, 1, operator.shape[0], dtype=torch.float64)
    by_float = operator.inverse(0.5, **method_options)
    by_tensor = operator.inverse(torch.tensor(0.5), **method_options)
    torch.testing.assert_close(by_tensor @ vector, by_float @ vector, rtol=0, atol=0)
    by_float = by_float @ vector
    cg = operator.inverse(torch.tensor(0.5), method="cg", tol=1e-12) @ vector
    torch.testing.assert_close(cg, by_float, rtol=1e-8, atol=0)


def test_the_ggn_inverse_without_damping_is_explained_in_the_users_terms():
    with pytest.raises(ValueError, match="damping must be > 0") as error:
        ggn_operator(batch_size=3).inverse(0.0)
    assert "Woodbury" not in str(error.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_half_precision_kfac_inverts_through_a_lapack_dtype(cls, dtype):
    """The inverse and log-determinant of the half-precision operator's own matrix."""
    operator = _kfac(cls, dtype=dtype)
    vector = torch.linspace(-1, 1, operator.shape[0])
    result = operator.inverse(0.1) @ vector.to(dtype)
    assert result.dtype == dtype
    shifted = operator.to_dense().double() + 0.1 * torch.eye(operator.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(shifted, vector.double())
    # Half precision's rounding of the factors, amplified by the condition number.
    eps = torch.finfo(dtype).eps * float(torch.linalg.cond(shifted))
    torch.testing.assert_close(
        result.double(), expected, rtol=0, atol=10 * eps * float(expected.abs().max())
    )
    logdet = operator.logdet(0.1)
    assert logdet.dtype == dtype
    assert float(logdet) == pytest.approx(
        float(torch.logdet(shifted)), abs=10 * eps * shifted.shape[0]
    )


# -- state -----------------------------------------------------------------------------------


def test_a_state_of_another_models_layers_is_refused():
    state = _kfac().state_dict()
    other = KFACOperator(_mlp(names=("first", "second")), nn.CrossEntropyLoss(), _data())
    with pytest.raises(ValueError, match="another model or other params"):
        other.load_state_dict(state)


def test_ekfac_refuses_a_kfac_state_and_stays_whole():
    ekfac = _kfac(EKFACOperator)
    expected = ekfac.to_dense()
    fresh = _kfac(EKFACOperator)
    with pytest.raises(ValueError, match="lacks 'eigenvectors', 'corrections'"):
        fresh.load_state_dict(_kfac().state_dict())
    torch.testing.assert_close(fresh.to_dense(), expected, rtol=0, atol=0)


def test_a_state_of_another_dtype_is_refused_at_load():
    state = _kfac(dtype=torch.float32).state_dict()
    with pytest.raises(ValueError, match=r"dtype torch\.float32, this operator torch\.float64"):
        _kfac().load_state_dict(state)


# -- randomized methods ----------------------------------------------------------------------


def test_an_integer_operator_is_refused_clearly():
    matrix = torch.eye(6, dtype=torch.int64)
    for call in (
        lambda: lanczos_top_eigenpairs(matrix, 1),
        lambda: estimators.xtrace(matrix, 4),
        lambda: spectral_density(matrix, num_iters=4),
    ):
        with pytest.raises(TypeError, match=r"floating-point operator.*torch.int64"):
            call()


def test_a_nan_operator_is_refused_clearly():
    matrix = torch.eye(6, dtype=torch.float64)
    matrix[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        lanczos_top_eigenpairs(matrix, 1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        estimators.hutchinson_trace(DenseOperator(matrix), 3)


def test_the_estimators_dtype_applies_only_to_an_operator_without_one():
    class Plain:
        shape = (5, 5)

        def __matmul__(self, other):
            return 2 * other

    estimate = estimators.hutchinson_diag(Plain(), 3, dtype=torch.float32)
    assert estimate.dtype == torch.float32
    torch.testing.assert_close(estimate, torch.full((5,), 2.0))
    operator = DenseOperator(torch.eye(5, dtype=torch.float64))
    same = estimators.hutchinson_diag(operator, 3, dtype=torch.float64)
    torch.testing.assert_close(same, torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"differs from the operator's dtype.*leave dtype=None"):
        estimators.hutchinson_diag(operator, 3, dtype=torch.float32)


@pytest.mark.parametrize(("log_spectrum", "num_iters"), [(False, 10), (True, 30)])
def test_the_density_of_a_rank_deficient_ggn_integrates_to_one(log_spectrum, num_iters):
    """Most of the GGN's eigenvalues are zero, at the spectrum's edge: none of it is cut off."""
    grid, density = spectral_density(
        ggn_operator(batch_size=7),
        num_iters=num_iters,
        num_repeats=4,
        num_points=8192,
        log_spectrum=log_spectrum,
        generator=torch.Generator().manual_seed(0),
    )
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1, abs=1e-4)


def test_hutchinson_of_the_hessian_in_inference_mode_says_what_to_do():
    operator = HessianOperator(_mlp(), nn.CrossEntropyLoss(), _data())
    with torch.inference_mode(), pytest.raises(ValueError, match="outside it"):
        estimators.hutchinson_trace(operator, 2)


# -- layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "name", "place"),
    [
        ("curvkit.quantities.first_order", "EFOperator", "curvkit.operators.ef"),
        ("curvkit.quantities.hessian", "HessianOperator", "curvkit.operators.hessian"),
        ("curvkit.quantities.ggn", "GGNOperator", "curvkit.operators.ggn"),
        ("curvkit.first_order", "EFOperator", "curvkit.operators.ef"),
        ("curvkit.hessian", "HessianOperator", "curvkit.operators.hessian"),
    ],
)
def test_operators_keep_their_old_import_paths(module, name, place):
    old = getattr(importlib.import_module(module), name)
    assert old is getattr(importlib.import_module(place), name) is getattr(curvkit, name)
    with pytest.raises(AttributeError):
        _ = importlib.import_module(module).NoSuchOperator


def test_the_layers_below_the_operators_do_not_import_them():
    """Quantities, engines, core and the randomized methods import no operator module."""
    root = Path(curvkit.__file__).parent
    below = [*root.glob("quantities/*.py"), *root.glob("engines/*.py"), *root.glob("core/*.py")]
    for path in [*below, *root.glob("randomized/*.py"), root / "losses.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("curvkit.operators"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("curvkit.operators") for a in node.names), path


def test_base_does_not_import_the_inverses():
    """The inverses subclass the base; the base reaches them through the package, not an import."""
    source = (Path(curvkit.__file__).parent / "operators" / "base.py").read_text()
    assert "curvkit.operators.inverse" not in {
        node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
    }
