import math

import pytest
import torch
from optim_problems import SHAPES, CoupledQuadratic

from curvkit.optim import (
    ClippedAdam,
    MixedMultiOptimizer,
    Newton,
    PerParamOptim,
    TorchMultiOptimizer,
)

COUPLED = CoupledQuadratic()
UNCOUPLED = CoupledQuadratic(coupling=0.0)


def test_one_step_lands_on_the_minimiser_of_uncoupled_quadratics():
    params = UNCOUPLED.start()
    assert UNCOUPLED.error(params) > 0.5
    Newton().step(UNCOUPLED.loss(params), params)
    assert UNCOUPLED.error(params) < 1e-12


@pytest.mark.parametrize(
    ("make", "steps"),
    [
        (lambda: Newton(), 25),
        (lambda: Newton(trust_radii={"b": 0.3, "c": 0.5}), 40),
        (
            lambda: MixedMultiOptimizer(
                [(["b", "c"], Newton()), (["a"], TorchMultiOptimizer(torch.optim.SGD, {"lr": 0.2}))]
            ),
            150,
        ),
        (
            lambda: MixedMultiOptimizer(
                [
                    (["a", "c"], Newton(trust_radii={"a": 1.0})),
                    (["b"], PerParamOptim(ClippedAdam, {"lr": 0.2, "lrd": 0.995})),
                ]
            ),
            500,
        ),
    ],
    ids=["newton", "trust_region", "mixed_sgd", "mixed_clipped_adam"],
)
def test_converges_on_a_coupled_quadratic(make, steps):
    optim = make()
    params = COUPLED.start()
    for _ in range(steps):
        optim.step(COUPLED.loss(params), params)
    assert COUPLED.error(params) < 1e-8


def test_trust_radius_bounds_every_items_step():
    radius = 0.2
    params = {name: 10 * p.detach() for name, p in UNCOUPLED.start().items()}
    params = {name: p.requires_grad_() for name, p in params.items()}
    before = {name: p.detach().clone() for name, p in params.items()}
    plain = Newton().get_step(UNCOUPLED.loss(params), params)
    bounded = Newton(trust_radii=dict.fromkeys(SHAPES, radius)).get_step(
        UNCOUPLED.loss(params), params
    )
    for name in SHAPES:
        plain_length = (plain[name] - before[name]).norm(dim=-1)
        bounded_length = (bounded[name] - before[name]).norm(dim=-1)
        assert plain_length.min() > radius  # without the trust region the steps are longer
        assert bounded_length.max() <= radius * (1 + 1e-12)


def test_get_step_is_differentiable_numerically_checked():
    def f(theta, a):
        fixed = {n: p.detach().requires_grad_() for n, p in COUPLED.start(2).items()}
        params = {**fixed, "a": a}
        optim = MixedMultiOptimizer(
            [
                (["b", "c"], Newton(trust_radii={"c": 0.5})),
                (["a"], PerParamOptim(torch.optim.Adam, {"lr": 0.1})),
            ]
        )
        return tuple(optim.get_step(COUPLED.loss(params, theta), params).values())

    theta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    a = COUPLED.start(2)["a"].detach().requires_grad_()
    assert torch.autograd.gradcheck(f, (theta, a))
    out = f(theta, a)
    d_theta = torch.autograd.grad(out[0].sum() + out[1].sum(), theta)[0]
    assert d_theta.abs() > 1e-3


def _converged(theta, steps=30):
    params = UNCOUPLED.start()
    optim = Newton()
    for _ in range(steps):
        optim.step(UNCOUPLED.loss(params, theta), params)
    return params, optim


def test_converged_mode_has_the_implicit_function_derivative():
    theta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    params, optim = _converged(theta.detach())
    mode = optim.get_step(UNCOUPLED.loss(params, theta), params)
    h = 1e-6
    plus, _ = _converged(theta.detach() + h)
    minus, _ = _converged(theta.detach() - h)
    for name in SHAPES:
        derivative = torch.stack(
            [torch.autograd.grad(m, theta, retain_graph=True)[0] for m in mode[name].reshape(-1)]
        ).reshape(mode[name].shape)
        numerical = (plus[name] - minus[name]).detach() / (2 * h)
        torch.testing.assert_close(derivative, numerical, rtol=1e-7, atol=1e-9)
        assert derivative.abs().max() > 1e-2


@pytest.mark.parametrize(
    ("trust_radii", "error"),
    [
        ([1.0], TypeError),
        ({1: 1.0}, TypeError),
        ({"a": True}, TypeError),
        ({"a": "1"}, TypeError),
        ({"a": 0.0}, ValueError),
        ({"a": -1.0}, ValueError),
        ({"a": math.inf}, ValueError),
        ({"a": math.nan}, ValueError),
    ],
)
def test_invalid_trust_radii_raise(trust_radii, error):
    with pytest.raises(error):
        Newton(trust_radii=trust_radii)


def test_loss_errors():
    params = COUPLED.start()
    with pytest.raises(ValueError, match=r"trust_radii names \['bb'\]"):
        Newton(trust_radii={"bb": 1.0}).step(COUPLED.loss(params), params)
    with pytest.raises(ValueError, match="scalar"):
        Newton().step(params["b"].sum(0), params)
    with pytest.raises(TypeError, match="dict name -> tensor"):
        Newton().step(COUPLED.loss(params), list(params.values()))
