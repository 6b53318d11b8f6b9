"""curvkit.compat.torch_secorder side by side with torch-secorder's Gauss-Newton diagonal."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit.compat.torch_secorder import gauss_newton_matrix_approximation as ours
from curvkit.compat.torch_secorder.approximations.gauss_newton import (
    gauss_newton_matrix_approximation,
)

secorder = pytest.importorskip("torch_secorder")
theirs = secorder.gauss_newton_matrix_approximation

TIGHT = {"rtol": 1e-12, "atol": 1e-14}


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    return model, torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)
    ).double()
    return model, torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randn(4, 2).double()


LOSSES = {
    "MSELoss mean": nn.MSELoss(),
    "MSELoss sum": nn.MSELoss(reduction="sum"),
    "F.mse_loss": F.mse_loss,
    "partial F.mse_loss sum": functools.partial(F.mse_loss, reduction="sum"),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("problem", [mlp, cnn])
def test_identical_diagonals(problem, loss):
    model, inputs, targets = problem()
    expected = theirs(model, LOSSES[loss], inputs, targets)
    torch.testing.assert_close(ours(model, LOSSES[loss], inputs, targets), expected, **TIGHT)


def test_module_path_and_top_level_name_are_the_same_function():
    assert ours is gauss_newton_matrix_approximation


def test_create_graph_is_differentiable_like_torch_secorder():
    model, inputs, targets = mlp()
    params = list(model.parameters())
    ours_diag = ours(model, nn.MSELoss(), inputs, targets, create_graph=True)
    theirs_diag = theirs(model, nn.MSELoss(), inputs, targets, create_graph=True)
    ours_grad = torch.autograd.grad(sum(d.sum() for d in ours_diag), params, materialize_grads=True)
    theirs_grad = torch.autograd.grad(
        sum(d.sum() for d in theirs_diag), params, materialize_grads=True
    )
    torch.testing.assert_close(ours_grad, theirs_grad, **TIGHT)


def test_other_losses_get_torch_secorders_value_error():
    model, inputs, targets = mlp()
    for module in (ours, secorder):
        function = getattr(module, "gauss_newton_matrix_approximation", module)
        with pytest.raises(ValueError, match="MSE-based loss functions"):
            function(model, nn.L1Loss(), inputs, targets)


def test_grads_are_left_alone():
    model, inputs, targets = mlp()
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    ours(model, nn.MSELoss(), inputs, targets)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
