import math

import pytest
import torch

from curvkit.optim import ClippedAdam


def _loss(p):
    return (p**3).sum() + (p.reshape(-1)[0] * p.reshape(-1)[-1]) + 0.5 * (p**2).sum()


def _run(optimizer_cls, start, steps, **kwargs):
    p = start.clone().requires_grad_()
    optimizer = optimizer_cls([p], **kwargs)
    trajectory = []
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(p).backward()
        optimizer.step()
        trajectory.append(p.detach().clone())
    return trajectory, optimizer


@pytest.mark.parametrize("shape", [(3,), (2, 3), (1,)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_equals_torch_adam_without_clipping_and_decay(shape, weight_decay):
    start = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kwargs = {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": weight_decay}
    ours, _ = _run(ClippedAdam, start, 25, clip_norm=1e12, lrd=1.0, **kwargs)
    theirs, _ = _run(torch.optim.Adam, start, 25, **kwargs)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0.0)
    assert not torch.equal(ours[0], ours[-1])


def test_learning_rate_decays_by_lrd_every_step():
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = ClippedAdam([p], lr=0.3, lrd=0.9)
    for k in range(1, 8):
        p.grad = torch.ones_like(p)
        optimizer.step()
        assert math.isclose(optimizer.param_groups[0]["lr"], 0.3 * 0.9**k, rel_tol=1e-12)


def test_hand_computed_steps_with_clipping_decay_and_centered_variance():
    lr, lrd, betas, eps, clip = 0.1, 0.8, (0.9, 0.99), 1e-8, 0.5
    grads = [torch.tensor([2.0, -0.1, 0.3]), torch.tensor([-3.0, 0.2, 0.4])]
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = ClippedAdam(
        [p], lr=lr, betas=betas, eps=eps, clip_norm=clip, lrd=lrd, centered_variance=True
    )
    x = torch.zeros(3, dtype=torch.float64)
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    for k, g in enumerate(grads, start=1):
        g = g.double()
        p.grad = g.clone()
        optimizer.step()
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)  # .grad is never modified
        gc = g.clamp(-clip, clip)
        m = betas[0] * m + (1 - betas[0]) * gc
        v = betas[1] * v + (1 - betas[1]) * (gc - m) ** 2
        step_lr = lr * lrd**k
        x = x - step_lr / (1 - betas[0] ** k) * m / ((v / (1 - betas[1] ** k)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-14)


def test_closure_returns_loss():
    p = torch.ones(2, requires_grad=True)
    optimizer = ClippedAdam([p])

    def closure():
        optimizer.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 2.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1.0},
        {"betas": (1.0, 0.9)},
        {"betas": (0.9,)},
        {"eps": -1.0},
        {"weight_decay": -1.0},
        {"clip_norm": 0.0},
        {"lrd": -0.5},
        {"lrd": float("inf")},
    ],
)
def test_invalid_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        ClippedAdam([torch.zeros(1, requires_grad=True)], **kwargs)


def test_sparse_gradient_raises():
    p = torch.zeros(3, requires_grad=True)
    optimizer = ClippedAdam([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step()
