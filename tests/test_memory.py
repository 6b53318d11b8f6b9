"""The memory plan: automatic column chunks, refusals before allocating, progress on long calls.

Chunked results are checked against a dense ``torch.func`` GGN (float64, mean and sum, one sample
and several); refusals are checked to come before the square root is built or anything is
pushed back.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvkit
from curvkit import losses
from curvkit.engines import compute, memory
from curvkit.engines.memory import MemoryPlan, MemoryPlanError

# torch compiles its forward-mode decompositions with torch.jit.script on first use, which
# warns that it is deprecated: torch's internals, used by the forward-mode reference here.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.script` is deprecated:DeprecationWarning"
)

DTYPE = torch.float64


def reference_ggn(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """``J^T H J`` with the Jacobian and the output Hessian formed densely by ``torch.func``."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def outputs(flat: Tensor) -> Tensor:
        chunks = flat.split([p.numel() for p in params.values()])
        values = {n: c.reshape(p.shape) for (n, p), c in zip(params.items(), chunks, strict=True)}
        return torch.func.functional_call(model, values, (inputs,))

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    out = outputs(flat)
    jacobian = torch.func.jacrev(outputs)(flat).reshape(out.numel(), -1)
    hessian = torch.func.hessian(lambda f: loss_fn(f, targets))(out.detach())
    return jacobian.T @ hessian.reshape(out.numel(), out.numel()) @ jacobian


def _problem(num_samples: int, reduction: str):
    torch.manual_seed(num_samples)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 1)).to(
        DTYPE
    )  # outputs [N, C=4, T=5]: 20 exact columns per sample
    inputs = torch.randn(num_samples, 2, 5, dtype=DTYPE)
    targets = torch.randint(0, 4, (num_samples, 5))
    return model, nn.CrossEntropyLoss(reduction=reduction), inputs, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_small_budget_chunks_the_columns_with_the_same_result(num_samples: int, reduction: str):
    model, loss_fn, inputs, targets = _problem(num_samples, reduction)
    expected = reference_ggn(model, loss_fn, inputs, targets)
    slices: list[slice] = []
    build = losses.hessian_sqrt

    def recording_build(*args, columns=None, **kwargs):
        slices.append(columns)
        return build(*args, columns=columns, **kwargs)

    # the engine holds 2 x (3 + 4) x 5 entries per sample and column: 560 bytes for one sample
    budget = 3 * 2 * 35 * num_samples * 8
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(losses, "hessian_sqrt", recording_build)
        diagonal = curvkit.diag_ggn(model, loss_fn, (inputs, targets), max_memory=budget)
        matrix = curvkit.ggn_matrix(model, loss_fn, (inputs, targets), max_memory=budget)
    assert slices[:7] == [slice(start, min(start + 3, 20)) for start in range(0, 20, 3)]
    torch.testing.assert_close(
        torch.cat([d.reshape(-1) for d in diagonal]), expected.diagonal(), rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(matrix, expected, rtol=1e-10, atol=1e-14)


def test_column_chunk_size_from_the_budget():
    plan = MemoryPlan(1000, mc_samples=0)
    cpu = torch.device("cpu")
    assert plan.column_chunk_size(10, 100, cpu, whole=False) == 10
    assert plan.column_chunk_size(30, 100, cpu, whole=False) == 10
    with pytest.raises(MemoryPlanError, match="One column"):
        plan.column_chunk_size(30, 2000, cpu, whole=False)
    with pytest.raises(MemoryPlanError, match="all columns at once"):
        plan.column_chunk_size(30, 100, cpu, whole=True)
    default = MemoryPlan(None, mc_samples=0).budget(cpu)
    assert 0 < default <= memory.available_memory(cpu)


def _fail(*args, **kwargs):
    raise AssertionError("allocated before the memory plan refused")


def test_exact_work_beyond_the_limit_is_refused_before_any_column_is_built(monkeypatch):
    """A language-model-like output: 64 classes x 200 positions is 12800 columns per sample."""
    model = nn.Conv1d(3, 64, 1).to(DTYPE)
    inputs = torch.randn(2, 3, 200, dtype=DTYPE)
    targets = torch.randint(0, 64, (2, 200))
    monkeypatch.setattr(losses, "hessian_sqrt", _fail)
    monkeypatch.setattr(compute, "backpropagate", _fail)
    data = (inputs, targets)
    for call in [
        lambda: curvkit.diag_ggn(model, nn.CrossEntropyLoss(), data),
        lambda: curvkit.ggn_matrix(model, nn.CrossEntropyLoss(), data),
        lambda: curvkit.damped_newton_step(model, nn.CrossEntropyLoss(), data),
    ]:
        with pytest.raises(MemoryPlanError) as error:
            call()
        message = str(error.value)
        assert "12800 columns per sample" in message
        assert "12800 gradients' worth of time" in message
        assert "GiB" in message
        assert "mc_samples=1" in message


def test_all_columns_at_once_over_the_budget_are_refused_before_the_backward_pass(monkeypatch):
    model, loss_fn, inputs, targets = _problem(3, "mean")
    monkeypatch.setattr(compute, "backpropagate", _fail)
    with pytest.raises(MemoryPlanError, match=r"all columns at once.*max_memory"):
        curvkit.damped_newton_step(model, loss_fn, (inputs, targets), max_memory=20_000)


def test_monte_carlo_within_the_budget_runs(monkeypatch):
    model, loss_fn, inputs, targets = _problem(3, "sum")
    gen = torch.Generator().manual_seed(0)
    diagonal = curvkit.diag_ggn(
        model, loss_fn, (inputs, targets), mc_samples=2, generator=gen, max_memory=2**20
    )
    assert all(torch.isfinite(d).all() for d in diagonal)


@pytest.mark.parametrize(("progress", "shown"), [(True, True), (False, False)])
def test_progress_over_column_chunks(capsys, progress: bool, shown: bool):
    model, loss_fn, inputs, targets = _problem(1, "sum")
    curvkit.diag_ggn(model, loss_fn, (inputs, targets), max_memory=600, progress=progress)
    assert ("diag_ggn" in capsys.readouterr().err) == shown


@pytest.mark.parametrize(
    ("value", "error"), [("1GB", TypeError), (True, TypeError), (0, ValueError), (-5, ValueError)]
)
def test_max_memory_is_validated(value, error):
    model, loss_fn, inputs, targets = _problem(1, "sum")
    with pytest.raises(error, match="max_memory"):
        curvkit.diag_ggn(model, loss_fn, (inputs, targets), max_memory=value)


def test_operator_and_columns_take_the_budget_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 50)).double()
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 50, (8,)))
    vector = torch.ones(250, dtype=torch.float64)
    with pytest.raises(MemoryPlanError, match="50 columns per sample"):
        curvkit.GGNOperator(model, nn.CrossEntropyLoss(), batch, max_memory=1000) @ vector
    with pytest.raises(MemoryPlanError, match="50 columns per sample"):
        next(iter(curvkit.ggn_columns(model, nn.CrossEntropyLoss(), batch, max_memory=1000)))
    roomy = curvkit.GGNOperator(model, nn.CrossEntropyLoss(), batch, max_memory=2**30)
    expected = curvkit.ggn_matrix(model, nn.CrossEntropyLoss(), batch) @ vector
    torch.testing.assert_close(roomy @ vector, expected)
