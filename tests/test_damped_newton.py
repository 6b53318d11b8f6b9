"""curvkit.optim.DampedNewton: one step against the plain-autograd reference, groups, errors."""

from __future__ import annotations

import pytest
import torch
from test_directional_reference import assert_close, flat, problem, reference
from torch import nn

import curvkit
from curvkit.optim import DampedNewton


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_step_matches_reference_per_group(reduction):
    model, loss_fn, inputs, targets = problem("ce", reduction, 4)
    first, last = model[0], model[-1]  # Linear, Tanh, Linear
    groups = [
        {"params": list(first.parameters()), "lr": 0.5},
        {"params": list(last.parameters()), "damping": 0.25, "criterion": curvkit.top_k(1)},
    ]
    before = [p.detach().clone() for p in model.parameters()]
    expected_loss = loss_fn(model(inputs), targets).detach()
    refs = [
        reference(
            model, loss_fn, inputs, targets, group["params"], criterion,
            num_sqrt_columns=2, damping=damping,
        )
        for group, criterion, damping in [
            (groups[0], curvkit.top_k(2), 1.0),
            (groups[1], curvkit.top_k(1), 0.25),
        ]
    ]  # fmt: skip
    optimizer = DampedNewton(model, loss_fn, groups, criterion=curvkit.top_k(2))
    loss = optimizer.step((inputs, targets))
    assert_close(loss, expected_loss, 1e-14, what="loss")
    updates = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
    assert_close(flat(updates[:2]), 0.5 * refs[0].step, what="first group update")
    assert_close(flat(updates[2:]), refs[1].step, what="last group update")
    assert all(p.grad is None and p.is_leaf for p in model.parameters())


def test_training_reduces_the_loss():
    model, loss_fn, inputs, targets = problem("ce", "mean", 16, sizes=(4, 6, 3))
    optimizer = DampedNewton(model, loss_fn, lr=1.0, damping=0.1, criterion=curvkit.top_k(8))
    losses = [float(optimizer.step((inputs, targets))) for _ in range(10)]
    assert losses[-1] < 0.7 * losses[0]


def test_monte_carlo_steps_use_the_generator():
    model, loss_fn, inputs, targets = problem("ce", "mean", 4)
    steps = []
    for _ in range(2):
        copy = problem("ce", "mean", 4)[0]
        optimizer = DampedNewton(copy, loss_fn, mc_samples=1, criterion=curvkit.top_k(2))
        optimizer.step((inputs, targets), generator=torch.Generator().manual_seed(5))
        steps.append(flat([p.detach() for p in copy.parameters()]))
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-12, atol=1e-300)
    assert not torch.equal(steps[0], flat([p.detach() for p in model.parameters()]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": 0.0}, ValueError, "'lr'"),
        ({"lr": float("nan")}, ValueError, "'lr'"),
        ({"param_groups": [{"params": [], "lr": 1.0}]}, ValueError, "empty"),
        ({"mc_samples": -1}, ValueError, "mc_samples"),
        ({"param_groups": [{"params": None, "momentum": 0.9}]}, ValueError, "unknown option"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    model, loss_fn, _, _ = problem("mse", "mean", 2)
    if "param_groups" in kwargs and kwargs["param_groups"][0]["params"] is None:
        kwargs["param_groups"][0]["params"] = list(model.parameters())
    with pytest.raises(error, match=match):
        DampedNewton(model, loss_fn, **kwargs)
    with pytest.raises(TypeError, match="Module"):
        DampedNewton(lambda x: x, loss_fn)


def test_lr_changed_in_a_group_is_checked_at_step():
    model, loss_fn, inputs, targets = problem("mse", "mean", 2)
    optimizer = DampedNewton(model, loss_fn, criterion=curvkit.top_k(1))
    optimizer.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="'lr'"):
        optimizer.step((inputs, targets))


def test_is_a_torch_optimizer_with_group_options():
    model, loss_fn, _, _ = problem("mse", "mean", 2)
    optimizer = DampedNewton(model, loss_fn, [{"params": model[0].parameters()}], lr=0.3)
    assert isinstance(optimizer, torch.optim.Optimizer)
    (group,) = optimizer.param_groups
    assert group["lr"] == 0.3 and group["damping"] == 1.0 and group["criterion"] is None
    assert isinstance(model[0], nn.Linear) and group["params"][0] is model[0].weight
