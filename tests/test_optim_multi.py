import pytest
import torch
from optim_problems import SHAPES, CoupledQuadratic

from curvkit.optim import (
    AdagradRMSProp,
    ClippedAdam,
    MixedMultiOptimizer,
    MultiOptimizer,
    PerParamLRScheduler,
    PerParamMultiOptimizer,
    PerParamOptim,
    TorchMultiOptimizer,
)

PROBLEM = CoupledQuadratic()


class GradientDescent(MultiOptimizer):
    """A user's MultiOptimizer that implements get_step only."""

    def __init__(self, lr):
        self.lr = lr

    def get_step(self, loss, params):
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        return {name: p - self.lr * g for (name, p), g in zip(params.items(), grads, strict=True)}


def _sgd():
    return TorchMultiOptimizer(torch.optim.SGD, {"lr": 0.2, "momentum": 0.5})


MEMBERS = {
    "sgd": (_sgd, 150),
    "adam": (lambda: TorchMultiOptimizer(torch.optim.Adam, {"lr": 0.05}), 500),
    "clipped_adam": (
        lambda: PerParamMultiOptimizer(
            PerParamOptim(
                ClippedAdam, lambda name: {"lr": 0.1 if name == "a" else 0.2, "lrd": 0.995}
            )
        ),
        500,
    ),
    "adagrad_rmsprop": (lambda: TorchMultiOptimizer(AdagradRMSProp, {"eta": 2.0}), 200),
    "scheduler": (
        lambda: PerParamMultiOptimizer(
            PerParamLRScheduler(
                torch.optim.lr_scheduler.StepLR,
                {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.2}, "step_size": 1000},
            )
        ),
        250,
    ),
    "user_subclass": (lambda: GradientDescent(0.2), 250),
    "mixed": (
        lambda: MixedMultiOptimizer(
            [
                (["a"], _sgd()),
                (["b"], PerParamOptim(torch.optim.Adam, {"lr": 0.05})),
                (["c"], GradientDescent(0.2)),
            ]
        ),
        500,
    ),
    "nested_mixed": (
        lambda: MixedMultiOptimizer(
            [
                (["a", "c"], MixedMultiOptimizer([(["a"], _sgd()), (["c"], GradientDescent(0.2))])),
                (["b"], _sgd()),
            ]
        ),
        250,
    ),
}


@pytest.mark.parametrize("member", MEMBERS)
def test_converges_to_the_minimiser_of_a_coupled_quadratic(member):
    make, steps = MEMBERS[member]
    optim = make()
    params = PROBLEM.start()
    leaves = dict(params)
    initial_error = PROBLEM.error(params)
    for _ in range(steps):
        optim.step(PROBLEM.loss(params), params)
    assert initial_error > 0.5
    assert PROBLEM.error(params) < 1e-8
    for name, p in params.items():
        assert p is leaves[name] and p.grad is None and p.requires_grad
        assert p.shape == SHAPES[name]


def test_mixed_parts_are_updated_from_the_same_loss_before_any_is_applied():
    # Split in parts or not, SGD gives the same block-Jacobi step: every part sees the old point.
    whole, split = PROBLEM.start(), PROBLEM.start()
    joint = _sgd()
    mixed = MixedMultiOptimizer([(["c", "a"], _sgd()), (["b"], _sgd())])
    for _ in range(3):
        joint.step(PROBLEM.loss(whole), whole)
        mixed.step(PROBLEM.loss(split), split)
        for name in SHAPES:
            assert torch.equal(whole[name], split[name])


def test_mixed_get_step_equals_its_parts_and_leaves_parameters_alone():
    params = PROBLEM.start()
    before = {n: p.detach().clone() for n, p in params.items()}
    mixed = MixedMultiOptimizer([(["a", "b"], _sgd()), (["c"], GradientDescent(0.2))])
    updated = mixed.get_step(PROBLEM.loss(params), params)
    reference = _sgd().get_step(PROBLEM.loss(params), params)
    for name in SHAPES:
        torch.testing.assert_close(updated[name], reference[name], rtol=1e-14, atol=0)
        assert updated[name].requires_grad
        assert torch.equal(params[name], before[name]) and params[name].grad is None


def _get_step_function(make, warmup=2):
    def f(theta, a, b, c):
        optim = make()
        warm = {n: p.detach().clone().requires_grad_() for n, p in PROBLEM.start(3).items()}
        for _ in range(warmup):
            optim.step(PROBLEM.loss(warm, 0.3), warm)
        params = {"a": a, "b": b, "c": c}
        return tuple(optim.get_step(PROBLEM.loss(params, theta), params).values())

    return f


GET_STEP_MEMBERS = {
    "sgd": _sgd,
    "adam": lambda: TorchMultiOptimizer(torch.optim.Adam, {"lr": 0.05}),
    "clipped_adam": lambda: TorchMultiOptimizer(
        ClippedAdam, {"lr": 0.05, "lrd": 0.9}, {"clip_norm": 1.0}
    ),
    "adagrad_rmsprop": lambda: TorchMultiOptimizer(AdagradRMSProp, {"eta": 0.5}),
    "mixed": lambda: MixedMultiOptimizer(
        [
            (["a"], PerParamOptim(torch.optim.Adam, {"lr": 0.05})),
            (["b"], PerParamOptim(ClippedAdam, {"lr": 0.05}, {"clip_value": 0.5})),
            (["c"], GradientDescent(0.1)),
        ]
    ),
}


@pytest.mark.parametrize("member", GET_STEP_MEMBERS)
def test_get_step_is_differentiable_numerically_checked(member):
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    start = {n: p.detach().requires_grad_() for n, p in PROBLEM.start(2).items()}
    f = _get_step_function(GET_STEP_MEMBERS[member])
    assert torch.autograd.gradcheck(f, (theta, start["a"], start["b"], start["c"]))
    out = f(theta, start["a"], start["b"], start["c"])
    d_theta = torch.autograd.grad(sum(o.sum() for o in out), theta)[0]
    assert d_theta.abs() > 1e-3  # the check is not vacuous: the step depends on theta


def test_get_step_advances_state_like_step_and_keeps_no_graph_in_the_state():
    stepped, stepped_params = _sgd(), PROBLEM.start()
    got, got_params = _sgd(), PROBLEM.start()
    for _ in range(4):
        stepped.step(PROBLEM.loss(stepped_params), stepped_params)
        updated = got.get_step(PROBLEM.loss(got_params), got_params)
        with torch.no_grad():
            for name, p in got_params.items():
                p.copy_(updated[name])
        for name in SHAPES:
            torch.testing.assert_close(
                got_params[name], stepped_params[name], rtol=1e-14, atol=1e-15
            )
    for optimizer in got.optim.optimizers.values():
        for state in optimizer.state.values():
            assert not any(v.requires_grad for v in state.values() if torch.is_tensor(v))
        assert optimizer.defaults["differentiable"] is False


def test_get_step_needs_an_optimizer_with_a_differentiable_mode():
    optim = TorchMultiOptimizer(torch.optim.LBFGS, {"lr": 0.1})
    params = PROBLEM.start()
    with pytest.raises(TypeError, match="differentiable"):
        optim.get_step(PROBLEM.loss(params), params)


def test_torch_multi_optimizer_save_load_resumes_identically(tmp_path):
    def make():
        return TorchMultiOptimizer(torch.optim.Adam, {"lr": 0.05})

    uninterrupted, params = PROBLEM.start(), PROBLEM.start()
    optim = make()
    for _ in range(6):
        optim.step(PROBLEM.loss(uninterrupted), uninterrupted)
    first = make()
    for _ in range(2):
        first.step(PROBLEM.loss(params), params)
    first.optim.save(tmp_path / "state.pt")
    resumed = make()
    resumed.optim.load(tmp_path / "state.pt")
    for _ in range(4):
        resumed.step(PROBLEM.loss(params), params)
    for name in SHAPES:
        assert torch.equal(params[name], uninterrupted[name])


def test_overlapping_parts_raise():
    with pytest.raises(ValueError, match="'b' is in part 0 and in part 1"):
        MixedMultiOptimizer([(["a", "b"], _sgd()), (["b", "c"], _sgd())])


def test_mixed_errors():
    with pytest.raises(ValueError, match="empty"):
        MixedMultiOptimizer([])
    with pytest.raises(TypeError, match="pair"):
        MixedMultiOptimizer([(["a"],)])
    with pytest.raises(TypeError, match="list of strings"):
        MixedMultiOptimizer([("a", _sgd())])
    with pytest.raises(TypeError, match="list of strings"):
        MixedMultiOptimizer([([1], _sgd())])
    with pytest.raises(TypeError, match="MultiOptimizer, a PerParamOptim"):
        MixedMultiOptimizer([(["a"], torch.optim.SGD)])
    mixed = MixedMultiOptimizer([(["a", "b"], _sgd())])
    params = PROBLEM.start()
    with pytest.raises(ValueError, match=r"no part optimizes \['c'\]"):
        mixed.step(PROBLEM.loss(params), params)
    with pytest.raises(ValueError, match=r"params lacks \['b'\]"):
        mixed.get_step(PROBLEM.loss(params), {"a": params["a"]})


def test_multi_optimizer_errors():
    params = PROBLEM.start()
    optim = _sgd()
    with pytest.raises(TypeError, match="PerParamOptim"):
        PerParamMultiOptimizer(torch.optim.SGD)
    with pytest.raises(TypeError, match="loss must be a tensor"):
        optim.step(1.0, params)
    with pytest.raises(ValueError, match="scalar"):
        optim.step(params["b"].sum(0), params)
    with pytest.raises(ValueError, match="does not require grad"):
        optim.step(PROBLEM.loss(params).detach(), params)
    with pytest.raises(TypeError, match="dict name -> tensor"):
        optim.step(PROBLEM.loss(params), list(params.values()))
    with pytest.raises(TypeError, match="names"):
        optim.step(PROBLEM.loss(params), {1: params["a"]})
    extra = {**params, "d": torch.zeros(2, dtype=torch.float64, requires_grad=True)}
    with pytest.raises(ValueError, match="does not depend on parameter 'd'"):
        optim.step(PROBLEM.loss(params), extra)

    class Forgetful(MultiOptimizer):
        def get_step(self, loss, params):
            return {}

    with pytest.raises(ValueError, match=r"no update for \['a'"):
        Forgetful().step(PROBLEM.loss(params), params)
    with pytest.raises(TypeError):
        MultiOptimizer()
