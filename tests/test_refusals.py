"""Issue 13: inputs curvkit cannot handle get clear errors before any wrong result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit

LOSS = nn.CrossEntropyLoss()


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


def _loader(shuffle: bool) -> DataLoader:
    return DataLoader(TensorDataset(*_batch(24)), batch_size=8, shuffle=shuffle)


def test_monte_carlo_operator_refuses_a_shuffling_loader() -> None:
    op = curvkit.GGNOperator(_mlp(), LOSS, _loader(shuffle=True), mc_samples=2)
    vector = torch.ones(op.shape[0], dtype=torch.float64)
    op @ vector
    with pytest.raises(ValueError, match=r"data changed between passes.*shuffle=False"):
        op @ vector


@pytest.mark.parametrize(("shuffle", "mc_samples"), [(False, 2), (True, 0)])
def test_operator_over_data_that_is_the_same_on_every_pass(shuffle: bool, mc_samples: int) -> None:
    # The exact GGN does not depend on how the samples are batched; the Monte-Carlo one is
    # replayed batch by batch.
    op = curvkit.GGNOperator(_mlp(), LOSS, _loader(shuffle), mc_samples=mc_samples)
    vector = torch.ones(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ vector, op @ vector)


def test_loss_coupling_samples_is_refused() -> None:
    x, _ = _batch()
    targets = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="couples samples"):
        curvkit.diag_ggn(_mlp(), lambda o, t: ((o - t).sum(0) ** 2).sum(), (x, targets))
    # A sum of per-sample terms is fine.
    curvkit.diag_ggn(_mlp(), lambda o, t: ((o - t) ** 2).sum(), (x, targets))


def test_newton_step_refuses_coupled_items() -> None:
    from curvkit.ops.newton import newton_step

    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="couples the items"):
        newton_step((x**2).sum() + (x.sum(0) ** 2).sum(), x)
    mode, _ = newton_step(((x - 1) ** 2).sum(), x)
    torch.testing.assert_close(mode, torch.ones_like(x))


def test_weighted_cross_entropy_lambda_points_to_the_module() -> None:
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    data = [_batch(5), _batch(7)]
    with pytest.raises(ValueError, match=r"nn\.CrossEntropyLoss\(weight=\.\.\.\)"):
        curvkit.diag_ggn(
            _mlp(), lambda o, t: nn.functional.cross_entropy(o, t, weight=weight), data
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.filterwarnings("ignore:.*selected GGN eigenvalue:RuntimeWarning")
def test_damped_newton_step_in_half_precision(dtype: torch.dtype) -> None:
    # The small dense eigensolves run in float32; the step comes back in the model's dtype.
    model, (x, y) = _mlp(), _batch(8)
    expected = curvkit.damped_newton_step(
        model, LOSS, (x, y), [{"params": list(model.parameters()), "criterion": curvkit.top_k(2)}]
    )[0]
    half = copy.deepcopy(model).to(dtype)
    steps = curvkit.damped_newton_step(
        half,
        LOSS,
        (x.to(dtype), y),
        [{"params": list(half.parameters()), "criterion": curvkit.top_k(2)}],
    )[0]
    for step, want in zip(steps, expected, strict=True):
        assert step.dtype == dtype
        assert (step.double() - want).norm() <= 0.1 * want.norm()


@pytest.mark.parametrize("quantity", ["diag_ggn", "damped_newton_step"])
def test_bad_batches_get_clear_errors(quantity: str) -> None:
    x, y = _batch()
    function = getattr(curvkit, quantity)
    with pytest.raises(ValueError, match="holds no sample"):
        function(_mlp(), LOSS, (x[:0], y[:0]))
    nan = x.clone()
    nan[2, 1] = float("nan")
    with pytest.raises(ValueError, match="input 0 of data holds NaN"):
        function(_mlp(), LOSS, (nan, y))
    with pytest.raises(TypeError, match=r"targets of data must be a tensor, got list"):
        function(_mlp(), LOSS, (x, y.tolist()))


def test_non_finite_outputs_are_named() -> None:
    model = _mlp()
    with torch.no_grad():
        model[2].bias[0] = float("inf")
    with pytest.raises(ValueError, match="outputs hold NaN or inf"):
        curvkit.diag_ggn(model, LOSS, _batch())


def test_damped_newton_step_with_every_target_ignored() -> None:
    x, _ = _batch()
    with pytest.raises(ValueError, match="ignore_index"):
        curvkit.damped_newton_step(_mlp(), LOSS, (x, torch.full((5,), -100)))
