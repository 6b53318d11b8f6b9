"""curvkit's ViViT drop-ins (BackPACK protocol) against the plain-autograd reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import SqrtGGNMC
from peer_warnings import BACKPACK_FULL_BACKWARD_HOOK
from test_directional_reference import (
    assert_close,
    flat,
    flat_evecs,
    problem,
    reference,
    signs,
)

import curvkit
from curvkit import (
    DirectionalDampedNewtonComputation,
    DirectionalDerivativesComputation,
    EighComputation,
    EigvalshComputation,
)

# Every test here runs backward through a BackPACK-extended model.
pytestmark = BACKPACK_FULL_BACKWARD_HOOK


def top(k):
    return lambda evals: list(range(evals.numel() - k, evals.numel()))


def backward_with(computation, groups, model, loss_fn, inputs, targets):
    model, loss_fn = extend(model), extend(loss_fn)
    loss = loss_fn(model(inputs), targets)
    hook = computation.get_extension_hook(groups)
    with backpack(*computation.get_extensions(), extension_hook=hook):
        loss.backward()
    return [computation.get_result(group) for group in groups]


def layer_groups(model, criterion, damping=1.0):
    return [
        {"params": list(layer.parameters()), "criterion": criterion, "damping": damping}
        for layer in model
        if isinstance(layer, torch.nn.Linear)
    ]


# Per-layer MSE blocks of the last layer have C-fold eigenvalues: see the degenerate test.
@pytest.mark.parametrize(("loss", "per_layer"), [("mse", False), ("ce", False), ("ce", True)])
@pytest.mark.parametrize("n", [1, 4])
def test_damped_newton_and_derivatives_match_reference(loss, n, per_layer):
    model, loss_fn, inputs, targets = problem(loss, "mean", n)
    criterion = top(3 if loss == "mse" else 2)
    damping = lambda evals, evecs, gammas, lambdas: 0.5 + evals.abs()  # noqa: E731
    if per_layer:
        groups = layer_groups(model, criterion, damping)
    else:
        groups = [{"params": list(model.parameters()), "criterion": criterion, "damping": damping}]
    steps = backward_with(
        DirectionalDampedNewtonComputation(), groups, model, loss_fn, inputs, targets
    )
    derivatives = backward_with(
        DirectionalDerivativesComputation(), groups, model, loss_fn, inputs, targets
    )
    evals_evecs = backward_with(EighComputation(), groups, model, loss_fn, inputs, targets)
    all_evals = backward_with(EigvalshComputation(), groups, model, loss_fn, inputs, targets)
    for group, step, (gammas, lambdas), (evals, evecs), gram_evals in zip(
        groups, steps, derivatives, evals_evecs, all_evals, strict=True
    ):
        ref = reference(
            model,
            loss_fn,
            inputs,
            targets,
            group["params"],
            criterion,
            num_sqrt_columns=3,
            damping=damping,
        )
        assert_close(flat(step), ref.step, what="step")
        assert_close(evals, ref.evals, what="evals")
        assert_close(gram_evals, ref.gram_evals, what="all evals")
        evecs = flat_evecs(evecs)
        sign = signs(evecs, ref.evecs)
        assert_close(evecs * sign, ref.evecs, what="evecs")
        assert_close(gammas * sign, ref.gammas, what="gammas")
        assert_close(lambdas, ref.lambdas, what="lambdas")


def test_subsampling_matches_reference():
    model, loss_fn, inputs, targets = problem("ce", "mean", 5)
    group = {"params": list(model.parameters()), "criterion": top(3), "damping": 1.0}
    sub_grad, sub_ggn = [4, 0, 2], [3, 1]
    computation = DirectionalDerivativesComputation(
        subsampling_grad=sub_grad, subsampling_ggn=sub_ggn
    )
    ((gammas, lambdas),) = backward_with(computation, [group], model, loss_fn, inputs, targets)
    newton = DirectionalDampedNewtonComputation(subsampling_grad=sub_grad, subsampling_ggn=sub_ggn)
    (step,) = backward_with(newton, [group], model, loss_fn, inputs, targets)
    ref = reference(
        model,
        loss_fn,
        inputs,
        targets,
        group["params"],
        top(3),
        num_sqrt_columns=3,
        subsampling_grad=sub_grad,
        subsampling_ggn=sub_ggn,
    )
    eigh = EighComputation(subsampling=sub_ggn)
    ((evals, evecs),) = backward_with(eigh, [group], model, loss_fn, inputs, targets)
    sign = signs(flat_evecs(evecs), ref.evecs)
    assert_close(evals, ref.evals, what="evals")
    assert_close(gammas * sign, ref.gammas, what="gammas")
    assert_close(lambdas, ref.lambdas, what="lambdas")
    assert_close(flat(step), ref.step, what="step")


def test_monte_carlo_matches_reference_on_backpack_columns():
    model, loss_fn, inputs, targets = problem("ce", "mean", 3)
    group = {"params": list(model.parameters()), "criterion": top(2), "damping": 1.0}
    torch.manual_seed(7)
    newton = DirectionalDampedNewtonComputation(mc_samples_ggn=2)
    (step,) = backward_with(newton, [group], model, loss_fn, inputs, targets)

    # The same draw of BackPACK's MC square root; at the last bias it is the output-space one.
    probe = extend(copy.deepcopy(model))
    torch.manual_seed(7)
    loss = extend(copy.deepcopy(loss_fn))(probe(inputs), targets)
    with backpack(SqrtGGNMC(mc_samples=2)):
        loss.backward()
    sqrt_columns = probe[-1].bias.sqrt_ggn_mc
    ref = reference(
        model,
        loss_fn,
        inputs,
        targets,
        group["params"],
        top(2),
        num_sqrt_columns=2,
        sqrt_columns=sqrt_columns,
    )
    assert_close(flat(step), ref.step, what="MC step")


def test_groups_need_criterion_and_damping():
    model = problem("mse", "mean", 2)[0]
    params = list(model.parameters())
    with pytest.raises(ValueError, match="'criterion'"):
        DirectionalDerivativesComputation().get_extension_hook([{"params": params}])
    with pytest.raises(ValueError, match="'damping'"):
        DirectionalDampedNewtonComputation().get_extension_hook(
            [{"params": params, "criterion": top(1)}]
        )
    with pytest.raises(ValueError, match="group"):
        EighComputation().get_extension_hook(
            [{"params": params, "criterion": top(1)}, {"params": params[:1], "criterion": top(1)}]
        )
    # Keys of an optimizer's groups are ignored, as in ViViT.
    EigvalshComputation().get_extension_hook([{"params": params, "lr": 0.1}])


def test_result_of_unknown_group_is_a_key_error():
    with pytest.raises(KeyError, match="No results available"):
        EighComputation().get_result({"params": []})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"subsampling": [0, 0]}, "repeated"),
        ({"subsampling": [-1]}, "indices"),
        ({"mc_samples": -1}, "mc_samples"),
    ],
)
def test_invalid_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EighComputation(**kwargs)


def test_hook_deletes_consumed_backpack_quantities():
    model, loss_fn, inputs, targets = problem("mse", "mean", 2)
    group = {"params": list(model.parameters()), "criterion": top(1), "damping": 1.0}
    backward_with(DirectionalDampedNewtonComputation(), [group], model, loss_fn, inputs, targets)
    for param in group["params"]:
        assert not hasattr(param, "sqrt_ggn_exact")
        assert not hasattr(param, "grad_batch")


def test_degenerate_cluster_kept_whole_gives_the_unique_step():
    """MSE makes the last layer's eigenvalues C-fold: keeping a whole cluster is well defined."""
    model, loss_fn, inputs, targets = problem("mse", "mean", 4)
    group = {"params": list(model[-1].parameters()), "criterion": top(3), "damping": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (step,) = backward_with(
            DirectionalDampedNewtonComputation(), [group], model, loss_fn, inputs, targets
        )
        ((evals, evecs),) = backward_with(
            EighComputation(), [group], model, loss_fn, inputs, targets
        )
    ref = reference(model, loss_fn, inputs, targets, group["params"], top(3), num_sqrt_columns=3)
    assert_close(evals, ref.evals, what="evals")
    evecs = flat_evecs(evecs)
    assert_close(evecs @ evecs.T, ref.evecs @ ref.evecs.T, what="eigenspace projector")
    assert_close(flat(step), ref.step, what="step")

    group["criterion"] = top(2)
    with pytest.warns(RuntimeWarning, match="cluster"):
        backward_with(EighComputation(), [group], model, loss_fn, inputs, targets)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_sum_reduction_matches_functional_api_and_reference(loss):
    model, loss_fn, inputs, targets = problem(loss, "sum", 4)
    group = {"params": list(model.parameters()), "criterion": top(2), "damping": 0.5}
    (step,) = backward_with(
        DirectionalDampedNewtonComputation(), [group], model, loss_fn, inputs, targets
    )
    ((gammas, lambdas),) = backward_with(
        DirectionalDerivativesComputation(), [group], model, loss_fn, inputs, targets
    )
    (functional,) = curvkit.damped_newton_step(model, loss_fn, (inputs, targets), [group])
    assert_close(flat(step), flat(functional), what="drop-in vs functional")
    ref = reference(
        model, loss_fn, inputs, targets, group["params"], top(2), num_sqrt_columns=3, damping=0.5
    )
    assert_close(flat(step), ref.step, what="step")
    assert_close(lambdas, ref.lambdas, what="lambdas")
    assert_close(gammas.abs(), ref.gammas.abs(), what="gammas up to sign")


def test_verbose_mode_reports_progress(capsys):
    model, loss_fn, inputs, targets = problem("mse", "mean", 2)
    group = {"params": list(model.parameters()), "criterion": top(1)}
    backward_with(EighComputation(verbose=True), [group], model, loss_fn, inputs, targets)
    assert "computing the result of group" in capsys.readouterr().out
