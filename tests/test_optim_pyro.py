"""curvkit.compat.pyro side by side with pyro.optim: same trajectories, states that round-trip."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pytest
import torch

import curvkit.compat.pyro as ours
from curvkit.optim import ClippedAdam, PerParamOptim, PyroMultiOptimizer, PyroOptim

pyro = pytest.importorskip("pyro")
import pyro.optim as theirs  # noqa: E402
import pyro.optim.multi as theirs_multi  # noqa: E402

STEPS = 12
CURVKIT_OPTIONS = {"corrected_eps", "differentiable"}
TIGHT = {"rtol": 1e-12, "atol": 1e-12}
SGD = {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1, "momentum": 0.5}}
ADAM = {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}}

OPTIMIZERS: dict[str, dict] = {
    "Adadelta": {"lr": 0.5},
    "Adagrad": {"lr": 0.1},
    "Adam": {"lr": 0.1, "amsgrad": True},
    "AdamW": {"lr": 0.1, "weight_decay": 0.1},
    "Adamax": {"lr": 0.1},
    "ASGD": {"lr": 0.1},
    "NAdam": {"lr": 0.1},
    "RAdam": {"lr": 0.1},
    "SGD": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "Rprop": {"lr": 0.1},
    "RMSprop": {"lr": 0.01, "centered": True},
    "ClippedAdam": {"lr": 0.1, "eps": 1e-2, "clip_norm": 0.5, "lrd": 0.99},
    "AdagradRMSProp": {"eta": 0.5, "t": 0.2},
    "DCTAdam": {"lr": 0.1, "eps": 1e-2, "clip_norm": 0.5},
}

SCHEDULERS: dict[str, dict] = {
    "LambdaLR": {**SGD, "lr_lambda": lambda epoch: 0.9**epoch},
    "MultiplicativeLR": {**SGD, "lr_lambda": lambda epoch: 0.95},
    "StepLR": {**SGD, "step_size": 2, "gamma": 0.5},
    "MultiStepLR": {**SGD, "milestones": [1, 3], "gamma": 0.5},
    "ConstantLR": {**SGD, "factor": 0.5, "total_iters": 2},
    "LinearLR": {**SGD, "start_factor": 0.5, "total_iters": 3},
    "ExponentialLR": {**SGD, "gamma": 0.9},
    "PolynomialLR": {**SGD, "total_iters": 5, "power": 2.0},
    "CosineAnnealingLR": {**SGD, "T_max": 4},
    "ReduceLROnPlateau": {**ADAM, "factor": 0.5, "patience": 0},
    "CyclicLR": {**SGD, "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 2},
    "CosineAnnealingWarmRestarts": {**SGD, "T_0": 2},
    "OneCycleLR": {**SGD, "max_lr": 0.1, "total_steps": 2 * STEPS},
}


def loss_of(x: torch.Tensor) -> torch.Tensor:
    """A non-quadratic loss whose gradient entries reach beyond the clipping bounds."""
    return (torch.sin(3 * x) + 0.5 * x**4 - 2 * x).sum()


def start() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, 6, dtype=torch.float64)


def trajectory(
    optim: object, x: torch.Tensor, call: Callable[[torch.Tensor], None], epoch_end=None
) -> list[torch.Tensor]:
    values = []
    for step in range(STEPS):
        x.grad = None
        loss = loss_of(x)
        loss.backward()
        call(x)
        if epoch_end is not None and step % 2 == 1:
            epoch_end(loss.item())
        values.append(x.detach().clone())
    return values


def run_both(name: str, args: dict, clip_args: dict | None = None, prepare=None):
    results = []
    for module, call in ((theirs, lambda opt, x: opt([x])), (ours, lambda opt, x: opt({"x": x}))):
        factory = getattr(module, name)
        # Pyro's schedulers consume optim_args: each side gets its own copy.
        optim = factory(dict(args)) if clip_args is None else factory(dict(args), clip_args)
        x = start().requires_grad_()
        if prepare is not None:
            prepare(x)
        epoch_end = None
        if hasattr(optim, "step"):  # a scheduler
            if name == "ReduceLROnPlateau":

                def epoch_end(metric, optim=optim):
                    optim.step(abs(metric) // 10)  # a plateau every few epochs
            else:

                def epoch_end(metric, optim=optim):
                    optim.step()

        results.append(
            trajectory(optim, x, lambda x, optim=optim, call=call: call(optim, x), epoch_end)
        )
    return results


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_wrapper_takes_pyros_steps(name):
    theirs_values, ours_values = run_both(name, OPTIMIZERS[name])
    torch.testing.assert_close(ours_values, theirs_values, **TIGHT)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_wrapper_takes_pyros_steps(name):
    theirs_values, ours_values = run_both(name, SCHEDULERS[name])
    torch.testing.assert_close(ours_values, theirs_values, **TIGHT)


def test_clipped_adam_differs_from_curvkits_own_as_documented():
    """Pyro's eps sits before the bias correction; curvkit's own class keeps torch's place."""
    args = {"lr": 0.1, "eps": 1e-2}
    _, pyro_like = run_both("ClippedAdam", args)
    optim = PerParamOptim(ClippedAdam, args)
    own = trajectory(optim, start().requires_grad_(), lambda x: optim({"x": x}))
    assert (own[-1] - pyro_like[-1]).abs().max() > 1e-3


def test_sparse_adam_takes_pyros_steps():
    values = []
    for module, call in ((theirs, lambda opt, x: opt([x])), (ours, lambda opt, x: opt({"x": x}))):
        optim = module.SparseAdam({"lr": 0.1})
        x = start().requires_grad_()
        rows = []
        for step in range(STEPS):
            x.grad = None
            picked = torch.tensor([step % 4, (step + 1) % 4])
            loss_of(torch.nn.functional.embedding(picked, x, sparse=True)).backward()
            call(optim, x)
            rows.append(x.detach().clone())
        values.append(rows)
    torch.testing.assert_close(values[1], values[0], **TIGHT)


def test_dct_adam_with_a_time_dimension_takes_pyros_steps():
    def with_time_dim(x):
        x._pyro_dct_dim = -1  # 6 is not a fast length: the DCT runs on 8 padded entries

    theirs_values, ours_values = run_both("DCTAdam", {"lr": 0.1}, prepare=with_time_dim)
    torch.testing.assert_close(ours_values, theirs_values, **TIGHT)


def test_dct_adam_subsample_aware_takes_pyros_steps():
    indices = torch.tensor([0, 2])

    def subsampled(x):
        x._pyro_subsample = {-2: indices}

    theirs_values, ours_values = run_both(
        "DCTAdam", {"lr": 0.1, "subsample_aware": True}, prepare=subsampled
    )
    torch.testing.assert_close(ours_values, theirs_values, **TIGHT)
    assert torch.equal(ours_values[-1][1], start()[1])  # outside the subsample: unchanged


@pytest.mark.parametrize(
    "clip_args", [{"clip_norm": 2.0}, {"clip_value": 0.5}, {"clip_norm": 3.0, "clip_value": 0.3}]
)
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_clip_args_clip_as_pyro_does(name, clip_args):
    theirs_values, ours_values = run_both(name, {"lr": 0.1}, clip_args)
    torch.testing.assert_close(ours_values, theirs_values, **TIGHT)


def test_clip_args_clip_grad_in_place_as_pyro_does():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optim = ours.SGD({"lr": 1.0}, {"clip_value": 0.5})
    x.grad = torch.tensor([2.0, -0.1, -3.0], dtype=torch.float64)
    optim([x])
    assert torch.equal(x.grad, torch.tensor([0.5, -0.1, -0.5], dtype=torch.float64))
    optim.optim_objs[x].zero_grad()
    assert x.grad is None


def test_callable_optim_args_get_the_names():
    seen = []

    def per_param(name):
        seen.append(name)
        return {"lr": 0.0 if name == "frozen" else 0.1}

    optim = ours.Adam(per_param)
    frozen, free = (torch.ones(2, requires_grad=True) for _ in range(2))
    (frozen.sum() + free.sum()).backward()
    optim({"frozen": frozen, "free": free})
    assert seen == ["frozen", "free"]
    assert torch.equal(frozen, torch.ones(2)) and not torch.equal(free, torch.ones(2))


def test_name_registry_from_named_parameters_and_pyro_two_argument_callables():
    model = torch.nn.Linear(2, 1)
    calls = []
    optim = ours.SGD(lambda module, param: calls.append((module, param)) or {"lr": 0.1})
    optim.name_params(("layer." + name, p) for name, p in model.named_parameters())
    model(torch.ones(1, 2)).sum().backward()
    optim(model.parameters())
    assert calls == [("layer", "weight"), ("layer", "bias")]
    assert set(optim.get_state()) == {"layer.weight", "layer.bias"}


def test_unnamed_parameter_with_callable_args_is_refused():
    optim = ours.Adam(lambda name: {"lr": 0.1})
    x = torch.ones(2, requires_grad=True)
    x.sum().backward()
    with pytest.raises(ValueError, match="name_params"):
        optim([x])


def test_pyro_attributes():
    optim = ours.Adam({"lr": 0.1})
    assert optim.pt_optim_constructor is torch.optim.Adam and optim.pt_optim_args == {"lr": 0.1}
    config = {**SGD, "gamma": 0.5}
    scheduler = ours.ExponentialLR(config)
    assert scheduler.pt_scheduler_constructor is torch.optim.lr_scheduler.ExponentialLR
    assert scheduler.pt_optim_constructor is torch.optim.SGD and scheduler.kwargs == {"gamma": 0.5}
    assert set(config) == {"optimizer", "optim_args", "gamma"}  # not consumed, unlike Pyro
    for factory in (ours.Adam, ours.ClippedAdam, ours.DCTAdam, ours.AdagradRMSProp, ours.SGD):
        assert factory({}).pt_optim_constructor.__name__ == factory.__name__
    assert ours.is_scheduler(
        scheduler.pt_scheduler_constructor(torch.optim.SGD([start()], 0.1), 0.5)
    )


def without_curvkit_options(state: dict) -> dict:
    """``state`` without the options that curvkit's optimizer classes add to Pyro's."""
    if "param_groups" not in state:
        return {
            key: without_curvkit_options(value) if isinstance(value, dict) else value
            for key, value in state.items()
        }
    groups = [
        {key: value for key, value in group.items() if key not in CURVKIT_OPTIONS}
        for group in state["param_groups"]
    ]
    return {**state, "param_groups": groups}


@pytest.mark.parametrize(
    "name, args",
    [("Adam", {"lr": 0.1}), ("ClippedAdam", {"lr": 0.1}), ("StepLR", {**SGD, "step_size": 1})],
)
def test_state_round_trips_between_pyro_and_curvkit(name, args, tmp_path):
    """Pyro's state continues in curvkit and curvkit's in Pyro, in memory and through files."""
    pyro.clear_param_store()
    x_theirs = pyro.param("x", start()).unconstrained()
    theirs_optim = getattr(theirs, name)(dict(args))
    ours_optim = getattr(ours, name)(args)
    x_ours = start().requires_grad_()
    for x, call in (
        (x_theirs, lambda: theirs_optim([x_theirs])),
        (x_ours, lambda: ours_optim({"x": x_ours})),
    ):
        for _ in range(3):
            x.grad = None
            loss_of(x).backward()
            call()
    torch.testing.assert_close(
        without_curvkit_options(ours_optim.get_state()),
        without_curvkit_options(theirs_optim.get_state()),
        check_dtype=False,  # Pyro's ClippedAdam defaults weight_decay to the int 0
        **TIGHT,
    )

    # Pyro's file into curvkit, curvkit's file into Pyro: both continue alike.
    theirs_optim.save(tmp_path / "pyro.pt")
    ours_optim.save(tmp_path / "curvkit.pt")
    resumed_ours = getattr(ours, name)(args)
    resumed_ours.load(tmp_path / "pyro.pt")
    resumed_theirs = getattr(theirs, name)(dict(args))
    resumed_theirs.load(tmp_path / "curvkit.pt")
    x_ours = x_theirs.detach().clone().requires_grad_()
    for x, call in (
        (x_theirs, lambda: resumed_theirs([x_theirs])),
        (x_ours, lambda: resumed_ours({"x": x_ours})),
    ):
        x.grad = None
        loss_of(x).backward()
        call()
    torch.testing.assert_close(x_ours, x_theirs, **TIGHT)
    pyro.clear_param_store()


def test_set_state_applies_at_once_to_parameters_already_stepped():
    x = start().requires_grad_()
    donor = ours.Adam({"lr": 0.1})
    for _ in range(2):
        x.grad = None
        loss_of(x).backward()
        donor({"x": x})
    optim = ours.Adam({"lr": 0.1})
    y = start().requires_grad_()
    optim({"x": y})  # no grad yet: the optimizer exists, with no state
    optim.set_state(donor.get_state())
    assert optim.get_state()["x"]["state"][0]["step"] == 2


def test_load_refuses_a_malicious_pickle_unexecuted(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as file:
        # torch.save's protocol: torch's unpickler then refuses the payload, not the format.
        pickle.dump({"x": Evil()}, file, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        ours.Adam({"lr": 0.1}).load(path)
    assert not marker.exists()


def stepped(optim: PyroOptim, x: torch.Tensor) -> PyroOptim:
    x.grad = None
    loss_of(x).backward()
    optim({"x": x})
    return optim


def test_load_time_checks_say_what_does_not_match():
    state = stepped(ours.Adam({"lr": 0.1}), start().requires_grad_()).get_state()
    wrong_shape = stepped(ours.Adam({"lr": 0.1}), torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="shape"):
        wrong_shape.set_state(state)
    other_kind = stepped(ours.SGD({"lr": 0.1}), start().requires_grad_())
    with pytest.raises(ValueError, match="another kind of optimizer"):
        other_kind.set_state(state)
    with pytest.raises(ValueError, match="state_dict"):
        ours.Adam({"lr": 0.1}).set_state({"x": {"step": 1}})
    with pytest.raises(ValueError, match="PyroLRScheduler"):
        ours.Adam({"lr": 0.1}).set_state({"x": {"scheduler": {}, "optimizer": {}}})
    with pytest.raises(ValueError, match="scheduler state"):
        ours.StepLR({**SGD, "step_size": 1}).set_state(state)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(TypeError, match="optim_args"):
        PyroOptim(torch.optim.Adam, 0.1)
    with pytest.raises(ValueError, match="unknown keys"):
        PyroOptim(torch.optim.Adam, {}, {"clip": 1.0})
    with pytest.raises(ValueError, match="optim_args"):
        ours.StepLR({"optimizer": torch.optim.SGD, "step_size": 1})
    with pytest.raises(TypeError, match="single tensor"):
        ours.Adam({})(torch.ones(1))
    with pytest.raises(TypeError, match="PyroOptim"):
        PyroMultiOptimizer(PerParamOptim(torch.optim.Adam, {}))


def separable_problem(x, y, z, loc):
    return ((x - loc) ** 4).sum() + ((y - loc) ** 2).sum() + (torch.cosh(z - loc)).sum()


@pytest.mark.parametrize(
    "parts",
    [
        lambda m, o: [(["y"], o.Adam({"lr": 0.05})), (["x", "z"], m.Newton())],
        lambda m, o: [(["y"], m.PyroMultiOptimizer(o.SGD({"lr": 0.1}))), (["x", "z"], m.Newton())],
        lambda m, o: [(["x", "y", "z"], m.TorchMultiOptimizer(torch.optim.Adam, {"lr": 0.05}))],
    ],
)
def test_mixed_multi_optimizer_with_pyro_optim_and_newton(parts):
    loc = torch.tensor([-0.5, 0.5], dtype=torch.float64)
    values = []
    for multi, module in ((theirs_multi, theirs), (ours, ours)):
        optim = multi.MixedMultiOptimizer(parts(multi, module))
        torch.manual_seed(1)
        params = {
            "x": torch.randn(2, dtype=torch.float64),
            "y": torch.randn(3, 2, dtype=torch.float64),
            "z": torch.randn(4, 2, dtype=torch.float64),
        }
        for value in params.values():
            value.requires_grad_()
        trajectory = []
        for _ in range(STEPS):
            optim.step(separable_problem(**params, loc=loc), params)
            trajectory.append({k: v.detach().clone() for k, v in params.items()})
        values.append(trajectory)
    torch.testing.assert_close(values[1], values[0], **TIGHT)


def test_pyro_multi_optimizer_get_step_is_differentiable():
    x = start().requires_grad_()
    optim = PyroMultiOptimizer(ours.SGD({"lr": 0.1}))
    updated = optim.get_step(loss_of(x), {"x": x})["x"]
    (jacobian_row,) = torch.autograd.grad(updated[0, 0], x)
    expected = torch.zeros_like(x)
    expected[0, 0] = 1 - 0.1 * (-9 * torch.sin(3 * x[0, 0]) + 6 * x[0, 0] ** 2).item()
    torch.testing.assert_close(jacobian_row, expected)
    assert x.grad is None
