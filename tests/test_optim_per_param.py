import pickle

import pytest
import torch

from curvkit.optim import ClippedAdam, PerParamLRScheduler, PerParamOptim
from curvkit.optim.per_param import clip_gradient


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 2, dtype=torch.float64, generator=gen).requires_grad_(),
        "bias": torch.randn(2, dtype=torch.float64, generator=gen).requires_grad_(),
    }


def _loss(params):
    return ((params["w"] @ params["bias"]) ** 2).sum() + (params["bias"] ** 4).sum()


def _train(optim, params, steps, scheduler_step=None):
    for _ in range(steps):
        for p in params.values():
            p.grad = None
        _loss(params).backward()
        optim(params)
        if scheduler_step is not None:
            scheduler_step(optim)


def test_one_torch_optimizer_per_parameter_with_per_parameter_options():
    params = _params()
    optim = PerParamOptim(torch.optim.Adam, lambda name: {"lr": 0.1 if name == "bias" else 0.01})
    reference = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    torch_optims = {
        name: torch.optim.Adam([p], lr=0.1 if name == "bias" else 0.01)
        for name, p in reference.items()
    }
    for _ in range(5):
        for group in (params, reference):
            for p in group.values():
                p.grad = None
            _loss(group).backward()
        grads = {name: p.grad.clone() for name, p in params.items()}
        optim(params)
        for opt in torch_optims.values():
            opt.step()
        for name in params:
            torch.testing.assert_close(params[name], reference[name], rtol=1e-13, atol=0)
            assert torch.equal(params[name].grad, grads[name])  # .grad is left as it is
    assert set(optim.optimizers) == {"w", "bias"}
    assert optim.optimizers["bias"].param_groups[0]["lr"] == 0.1
    assert optim.optimizers["w"].param_groups[0]["lr"] == 0.01


def test_iterable_of_tensors_named_by_position_and_parameters_without_grad_skipped():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    optim = PerParamOptim(torch.optim.SGD, {"lr": 0.5})
    a.grad = torch.ones(2)
    optim([a, b])
    assert torch.equal(a.detach(), torch.full((2,), 0.5))
    assert torch.equal(b.detach(), torch.ones(3))
    assert set(optim.optimizers) == {"0"}


def test_parameters_seen_later_get_their_own_optimizer():
    optim = PerParamOptim(torch.optim.SGD, {"lr": 1.0})
    a = torch.zeros(1, requires_grad=True)
    a.grad = torch.ones(1)
    optim({"a": a})
    b = torch.zeros(2, requires_grad=True)
    b.grad = torch.ones(2)
    optim({"a": a, "b": b})
    assert torch.equal(a.detach(), torch.tensor([-2.0]))
    assert torch.equal(b.detach(), -torch.ones(2))


def test_clip_gradient_matches_torch_clipping_and_is_out_of_place():
    g = torch.tensor([3.0, -4.0, 0.5], dtype=torch.float64)
    expected = g.clone()
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([p], 2.0)
    torch.nn.utils.clip_grad_value_([p], 0.7)
    torch.testing.assert_close(
        clip_gradient(g, clip_norm=2.0, clip_value=0.7), p.grad, rtol=1e-14, atol=0
    )
    assert torch.equal(g, expected)
    assert clip_gradient(g) is g


def test_clip_args_dict_and_callable():
    params = {
        "x": torch.zeros(2, dtype=torch.float64, requires_grad=True),
        "y": torch.zeros(2, dtype=torch.float64, requires_grad=True),
    }
    grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    optim = PerParamOptim(
        torch.optim.SGD,
        {"lr": 1.0},
        lambda name: {"clip_norm": 1.0} if name == "x" else {"clip_value": 2.0},
    )
    for p in params.values():
        p.grad = grad.clone()
    optim(params)
    torch.testing.assert_close(
        params["x"].detach().norm(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0
    )
    assert torch.equal(params["y"].detach(), torch.tensor([-2.0, -2.0], dtype=torch.float64))
    z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    z.grad = grad.clone()
    PerParamOptim(torch.optim.SGD, {"lr": 1.0}, {"clip_value": 1.0})([z])
    assert torch.equal(z.detach(), -torch.ones(2, dtype=torch.float64))


def _state_tensors(state):
    return [
        v
        for entry in state.values()
        for s in entry["optimizer"]["state"].values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda: PerParamOptim(torch.optim.Adam, lambda n: {"lr": 0.05 if n == "w" else 0.02}),
        lambda: PerParamOptim(
            ClippedAdam, {"lr": 0.05, "lrd": 0.97, "clip_norm": 0.5}, {"clip_norm": 1.0}
        ),
        lambda: PerParamLRScheduler(
            torch.optim.lr_scheduler.StepLR,
            {
                "optimizer": torch.optim.SGD,
                "optim_args": {"lr": 0.01, "momentum": 0.9},
                "step_size": 2,
                "gamma": 0.5,
            },
        ),
    ],
)
def test_save_then_load_resumes_identically(make, tmp_path):
    def scheduler_step(optim):
        if isinstance(optim, PerParamLRScheduler):
            optim.step()

    uninterrupted = _params()
    _train(make(), uninterrupted, 8, scheduler_step)

    params = _params()
    first = make()
    _train(first, params, 3, scheduler_step)
    first.save(tmp_path / "optim.pt")
    resumed = make()
    resumed.load(tmp_path / "optim.pt")
    _train(resumed, params, 5, scheduler_step)
    for name in params:
        assert torch.equal(params[name], uninterrupted[name])
    assert _state_tensors(resumed.get_state())


def test_set_state_applies_at_once_to_parameters_already_seen():
    params = _params()
    trained = PerParamOptim(torch.optim.Adam, {"lr": 0.1})
    _train(trained, params, 2)
    fresh = PerParamOptim(torch.optim.Adam, {"lr": 0.1})
    _train(fresh, _params(1), 1)
    fresh.set_state(trained.get_state())
    for name in params:
        assert int(fresh.optimizers[name].state_dict()["state"][0]["step"]) == 2


def test_get_state_keeps_states_not_yet_consumed():
    params = _params()
    trained = PerParamOptim(torch.optim.Adam, {"lr": 0.1})
    _train(trained, params, 2)
    fresh = PerParamOptim(torch.optim.Adam, {"lr": 0.1})
    fresh.set_state(trained.get_state())
    assert set(fresh.get_state()) == {"w", "bias"}


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_load_refuses_a_malicious_pickle_without_running_it(tmp_path, writer):
    # The payload is real: plain unpickling creates the marker file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "state.pt"
    state = {"w": {"optimizer": _Payload(marker)}}
    if writer == "torch":
        torch.save(state, path)
    else:
        with open(path, "wb") as file:
            pickle.dump(state, file, protocol=2)
    optim = PerParamOptim(torch.optim.Adam, {"lr": 0.1})
    with pytest.raises(ValueError, match="refusing to load"):
        optim.load(path)
    assert not marker.exists()
    assert optim.get_state() == {}


@pytest.mark.parametrize(
    "state",
    [
        [1, 2],
        {"w": {"moments": {}}},
        {"w": 3},
        {1: {"optimizer": {}}},
        {"w": {"optimizer": {}, "scheduler": {}}},
    ],
)
def test_set_state_rejects_malformed_states(state):
    with pytest.raises(ValueError):
        PerParamOptim(torch.optim.SGD, {"lr": 0.1}).set_state(state)


def test_load_time_checks_say_what_does_not_match():
    trained = PerParamOptim(torch.optim.Adam, {"lr": 0.1})
    _train(trained, _params(), 1)
    state = trained.get_state()
    other_shape = PerParamOptim(torch.optim.Adam, {"lr": 0.1})
    other_shape.updated("w", torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(3, 2\), but the parameter has shape \(4,\)"):
        other_shape.set_state({"w": state["w"]})
    other_kind = PerParamOptim(torch.optim.SGD, {"lr": 0.1})
    _train(other_kind, _params(), 1)
    with pytest.raises(ValueError, match="another kind of optimizer"):
        other_kind.set_state(state)
    # Not seen yet: the structure is checked at once, the fit when the parameter comes.
    with pytest.raises(ValueError, match="state_dict"):
        PerParamOptim(torch.optim.SGD, {"lr": 0.1}).set_state({"w": {"optimizer": {"x": 1}}})
    later = PerParamOptim(torch.optim.SGD, {"lr": 0.1})
    later.set_state(state)
    with pytest.raises(ValueError, match="another kind of optimizer"):
        _train(later, _params(), 1)


def test_scheduler_state_required_for_schedulers():
    scheduler = PerParamLRScheduler(
        torch.optim.lr_scheduler.StepLR,
        {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1}, "step_size": 1},
    )
    with pytest.raises(ValueError, match="different kind"):
        scheduler.set_state({"w": {"optimizer": {}}})


def test_step_lr_per_parameter():
    params = _params()
    optim_args = {
        "optimizer": torch.optim.SGD,
        "optim_args": lambda name: {"lr": 1.0 if name == "w" else 0.1},
        "step_size": 2,
        "gamma": 0.5,
    }
    given = dict(optim_args)
    scheduler = PerParamLRScheduler(torch.optim.lr_scheduler.StepLR, optim_args)
    assert optim_args == given  # the user's dict is not consumed
    for epoch in range(1, 6):
        _train(scheduler, params, 1)
        scheduler.step()
        for name, base in (("w", 1.0), ("bias", 0.1)):
            lr = scheduler.optimizers[name].param_groups[0]["lr"]
            assert lr == pytest.approx(base * 0.5 ** (epoch // 2), rel=1e-12)
    assert set(scheduler.schedulers) == {"w", "bias"}


def test_reduce_lr_on_plateau_receives_the_metric():
    params = _params()
    scheduler = PerParamLRScheduler(
        torch.optim.lr_scheduler.ReduceLROnPlateau,
        {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1}, "patience": 1, "factor": 0.5},
    )
    _train(scheduler, params, 1)
    lrs = []
    for metric in [1.0, 0.5, 0.6, 0.7, 0.8, 0.1]:
        scheduler.step(metric)
        lrs.append({n: opt.param_groups[0]["lr"] for n, opt in scheduler.optimizers.items()})
    expected = [0.1, 0.1, 0.1, 0.05, 0.05, 0.05]
    for step_lrs, lr in zip(lrs, expected, strict=True):
        assert step_lrs == {"w": pytest.approx(lr), "bias": pytest.approx(lr)}


def test_errors():
    sgd = {"lr": 0.1}
    with pytest.raises(TypeError, match="callable"):
        PerParamOptim("adam", sgd)
    with pytest.raises(TypeError, match="optim_args"):
        PerParamOptim(torch.optim.SGD, [0.1])
    with pytest.raises(ValueError, match="unknown keys"):
        PerParamOptim(torch.optim.SGD, sgd, {"clip": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        PerParamOptim(torch.optim.SGD, sgd, {"clip_norm": 0.0})
    with pytest.raises(TypeError, match="dict"):
        PerParamOptim(torch.optim.SGD, sgd, [1.0])
    x = torch.zeros(2, requires_grad=True)
    x.grad = torch.ones(2)
    with pytest.raises(TypeError, match="single tensor"):
        PerParamOptim(torch.optim.SGD, sgd)(x)
    with pytest.raises(TypeError, match="names must be strings"):
        PerParamOptim(torch.optim.SGD, sgd)({1: x})
    with pytest.raises(TypeError, match="must be a tensor"):
        PerParamOptim(torch.optim.SGD, sgd)({"x": [1.0]})
    with pytest.raises(ValueError, match="same tensor"):
        PerParamOptim(torch.optim.SGD, sgd)({"x": x, "y": x})
    with pytest.raises(TypeError, match="must be a dict"):
        PerParamOptim(torch.optim.SGD, lambda name: 0.1)({"x": x})
    with pytest.raises(ValueError, match="unknown keys"):
        PerParamOptim(torch.optim.SGD, sgd, lambda name: {"norm": 1.0})({"x": x})
    with pytest.raises(TypeError, match="must return a torch"):
        PerParamOptim(lambda params, **kw: object(), sgd)({"x": x})
    n = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating-point"):
        PerParamOptim(torch.optim.SGD, sgd).updated("n", n, torch.zeros(2, dtype=torch.int64))
    optim = PerParamOptim(torch.optim.SGD, sgd)
    optim({"x": x})
    y = torch.zeros(3, requires_grad=True)
    y.grad = torch.ones(3)
    with pytest.raises(ValueError, match="was created for shape"):
        optim({"x": y})
    with pytest.raises(ValueError, match="gradient of parameter"):
        optim.updated("x", x.detach(), torch.ones(3))


def test_scheduler_errors():
    step = torch.optim.lr_scheduler.StepLR
    with pytest.raises(TypeError, match="callable"):
        PerParamLRScheduler("steplr", {"optimizer": torch.optim.SGD, "optim_args": {}})
    with pytest.raises(TypeError, match="must be a dict"):
        PerParamLRScheduler(step, [torch.optim.SGD])
    with pytest.raises(ValueError, match="lacks"):
        PerParamLRScheduler(step, {"optimizer": torch.optim.SGD, "step_size": 1})


def test_state_of_a_parameter_not_yet_seen_is_checked_when_it_comes():
    # Issue 13: a saved (3,) state loaded before its parameter is seen, which then has shape (4,).
    saved = PerParamOptim(torch.optim.Adam, {"lr": 0.1})
    saved.updated("w", torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    loader = PerParamOptim(torch.optim.Adam, {"lr": 0.1})
    loader.set_state(saved.get_state())
    with pytest.raises(ValueError, match=r"shape \(3,\), but the parameter has shape \(4,\)"):
        loader.updated("w", torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
