"""The functional API (ggn_eigh, directional_derivatives, damped_newton_step) vs the reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from peer_warnings import BACKPACK_FULL_BACKWARD_HOOK
from test_directional_reference import (
    assert_close,
    flat,
    flat_evecs,
    problem,
    reference,
    signs,
)
from torch import nn

import curvkit
from curvkit import losses


def run_all(model, loss_fn, batch, groups, **kwargs):
    steps = curvkit.damped_newton_step(model, loss_fn, batch, groups, **kwargs)
    derivatives = curvkit.directional_derivatives(model, loss_fn, batch, groups, **kwargs)
    eigh = curvkit.ggn_eigh(model, loss_fn, batch, groups, **kwargs)
    return steps, derivatives, eigh


def check_against_reference(model, loss_fn, inputs, targets, groups, num_sqrt_columns, **kwargs):
    generator_seed = kwargs.pop("generator_seed", None)
    sqrt_columns = None
    extra = {}
    if generator_seed is not None:
        extra = {"generator": torch.Generator().manual_seed(generator_seed)}
        sqrt_columns = losses.hessian_sqrt(
            loss_fn,
            model(inputs).detach(),
            targets,
            mc_samples=kwargs["mc_samples"],
            generator=torch.Generator().manual_seed(generator_seed),
        )
    results = {}
    for name, fn in [
        ("steps", curvkit.damped_newton_step),
        ("derivatives", curvkit.directional_derivatives),
        ("eigh", curvkit.ggn_eigh),
    ]:
        if generator_seed is not None:
            extra = {"generator": torch.Generator().manual_seed(generator_seed)}
        results[name] = fn(model, loss_fn, (inputs, targets), groups, **kwargs, **extra)
    for index, group in enumerate(groups):
        criterion = group.get("criterion") or curvkit.default_criterion
        ref = reference(
            model,
            loss_fn,
            inputs,
            targets,
            group["params"],
            criterion,
            num_sqrt_columns=num_sqrt_columns,
            damping=group.get("damping", 1.0),
            sqrt_columns=sqrt_columns,
            subsampling_grad=kwargs.get("subsampling_grad"),
            subsampling_ggn=kwargs.get("subsampling_ggn"),
        )
        step = results["steps"][index]
        gammas, lambdas = results["derivatives"][index]
        evals, evecs = results["eigh"][index]
        assert [s.shape for s in step] == [p.shape for p in group["params"]]
        assert [e.shape[1:] for e in evecs] == [p.shape for p in group["params"]]
        assert_close(flat(step), ref.step, what="step")
        assert_close(evals, ref.evals, what="evals")
        evecs = flat_evecs(evecs)
        sign = signs(evecs, ref.evecs)
        assert_close(evecs * sign, ref.evecs, what="evecs")
        assert_close(gammas * sign, ref.gammas, what="gammas")
        assert_close(lambdas, ref.lambdas, what="lambdas")


def linear_groups(model, **options):
    return [
        {"params": list(layer.parameters()), **options}
        for layer in model
        if isinstance(layer, nn.Linear)
    ]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize(
    ("loss", "per_layer", "k"), [("mse", False, 3), ("ce", False, 2), ("ce", True, 2)]
)
def test_matches_reference(loss, reduction, n, per_layer, k):
    model, loss_fn, inputs, targets = problem(loss, reduction, n)
    options = {"criterion": curvkit.top_k(k), "damping": 0.7}
    if per_layer:
        groups = linear_groups(model, **options)
    else:
        groups = [{"params": list(model.parameters()), **options}]
    columns = 3 if loss == "mse" else 2  # cross-entropy's square root has rank C - 1
    check_against_reference(model, loss_fn, inputs, targets, groups, num_sqrt_columns=columns)


def _callable_damping(evals, evecs, gammas, lambdas):
    # Noise-aware, as ViViT's dampings; the reference passes no Gram eigenvectors.
    assert evecs is None or evecs.shape[1] == evals.numel()
    return 0.1 + evals.abs() + gammas.var(0, correction=0) + lambdas.mean(0)


@pytest.mark.parametrize(
    ("criterion", "damping"),
    [
        (curvkit.top_k(1), 1.0),
        (lambda evals: [len(evals) - 1, len(evals) - 4, len(evals) - 2], 0.0),
        (None, _callable_damping),
        (curvkit.top_k(3), _callable_damping),
    ],
    ids=["top1-constant", "custom-order-undamped", "default-callable", "top3-callable"],
)
def test_criteria_and_dampings(criterion, damping):
    model, loss_fn, inputs, targets = problem("ce", "mean", 3, seed=1)
    groups = [{"params": list(model.parameters()), "criterion": criterion, "damping": damping}]
    check_against_reference(model, loss_fn, inputs, targets, groups, num_sqrt_columns=2)


def test_default_criterion_keeps_eigenvalues_above_relative_threshold():
    evals = torch.tensor([-1e-17, 1e-12, 1e-6, 0.5, 1.0], dtype=torch.float64)
    assert curvkit.default_criterion(evals) == [2, 3, 4]
    assert curvkit.default_criterion(evals.float()) == [3, 4]
    assert curvkit.default_criterion(torch.zeros(0)) == []
    # The cut does not split a cluster of numerically equal eigenvalues.
    threshold = torch.finfo(torch.float64).eps ** 0.5
    above = threshold + 5e-17
    evals = torch.tensor([0.0, above - 1e-16, above, 0.5, 1.0], dtype=torch.float64)
    assert curvkit.default_criterion(evals) == [3, 4]
    evals = torch.tensor([0.0, above - 1e-9, above, 0.5, 1.0], dtype=torch.float64)
    assert curvkit.default_criterion(evals) == [2, 3, 4]


def test_custom_criterion_order_is_kept():
    model, loss_fn, inputs, targets = problem("mse", "mean", 3)
    groups = [{"params": list(model.parameters()), "criterion": lambda e: [len(e) - 1, 0]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # index 0 is numerically zero here
        ((evals, _),) = curvkit.ggn_eigh(model, loss_fn, (inputs, targets), groups)
    assert evals[0] > evals[1]


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_monte_carlo_matches_reference_on_the_same_columns(loss):
    model, loss_fn, inputs, targets = problem(loss, "mean", 3)
    groups = linear_groups(model, criterion=curvkit.top_k(2), damping=0.5)
    check_against_reference(
        model, loss_fn, inputs, targets, groups, num_sqrt_columns=2, mc_samples=2, generator_seed=3
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_subsampling_matches_reference(reduction):
    model, loss_fn, inputs, targets = problem("ce", reduction, 5)
    groups = [{"params": list(model.parameters()), "criterion": curvkit.top_k(3), "damping": 1.0}]
    check_against_reference(
        model,
        loss_fn,
        inputs,
        targets,
        groups,
        num_sqrt_columns=2,
        subsampling_grad=[4, 0, 2],
        subsampling_ggn=[3, 1],
    )


@BACKPACK_FULL_BACKWARD_HOOK  # the drop-ins run through BackPACK on an extended model
def test_vivit_drop_ins_agree_with_functional_api():
    from backpack import backpack, extend

    model, loss_fn, inputs, targets = problem("ce", "mean", 4)
    criterion, damping = curvkit.top_k(2), 0.3
    groups = linear_groups(model, criterion=criterion, damping=damping)
    steps = curvkit.damped_newton_step(model, loss_fn, (inputs, targets), groups)
    computation = curvkit.DirectionalDampedNewtonComputation()
    loss = extend(loss_fn)(extend(model)(inputs), targets)
    with backpack(
        *computation.get_extensions(), extension_hook=computation.get_extension_hook(groups)
    ):
        loss.backward()
    for group, step in zip(groups, steps, strict=True):
        assert_close(flat(computation.get_result(group)), flat(step), what="drop-in vs functional")


def test_step_is_invariant_to_eigenvector_signs():
    from curvkit.quantities import gram_eigen

    torch.manual_seed(0)
    factor = torch.randn(3, 4, 10, dtype=torch.float64)  # [C', N, D]
    gram = torch.einsum("cnd,kmd->cnkm", factor, factor)
    grad_gram = torch.randn(4, 3, 4, dtype=torch.float64)
    directions = gram_eigen.gram_directions(gram, 4, curvkit.top_k(3))
    flipped = gram_eigen.GramDirections(
        **{**directions.__dict__, "gram_evecs": directions.gram_evecs * torch.tensor([-1, 1, -1])}
    )
    steps = []
    for d in (directions, flipped):
        gammas = gram_eigen.directional_gradients(d, grad_gram)
        lambdas = gram_eigen.directional_curvatures(d)
        coefficients = gram_eigen.damped_newton_coefficients(d, gammas, lambdas, d.evals * 0 + 1)
        steps.append(torch.einsum("cnd,cnj->jd", factor, coefficients))
    assert_close(steps[1], steps[0], 1e-14, what="sign-flipped step")
    # Signs are fixed deterministically: the largest entry of each Gram eigenvector is positive.
    pivot = directions.gram_evecs.abs().argmax(0)
    assert (directions.gram_evecs[pivot, torch.arange(3)] > 0).all()


def test_rank_deficient_gram_gives_finite_results_and_a_warning():
    """Duplicated samples and N C > D: zero Gram eigenvalues, where ViViT divides by ~0."""
    torch.manual_seed(0)
    model = nn.Linear(2, 3).double()  # D = 9 < N C = 15
    inputs = torch.randn(5, 2, dtype=torch.float64)
    inputs[3] = inputs[1]
    targets = torch.randn(5, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    every = {"params": list(model.parameters()), "criterion": lambda e: list(range(len(e)))}
    with pytest.warns(RuntimeWarning, match="numerically zero"):
        steps, derivatives, eigh = run_all(model, loss_fn, (inputs, targets), [every])
    (step,), ((gammas, lambdas),), ((evals, evecs),) = steps, derivatives, eigh
    assert all(torch.isfinite(t).all() for t in [*step, gammas, lambdas, evals, *evecs])
    zero = evals.abs() <= 15 * torch.finfo(evals.dtype).eps * evals.abs().max()
    assert int(zero.sum()) == 15 - 9
    assert (gammas[:, zero] == 0).all() and (lambdas[:, zero] == 0).all()
    assert all((e[zero] == 0).all() for e in evecs)
    # The nonzero directions span the whole parameter space: the full damped Newton step.
    ref = reference(
        model, loss_fn, inputs, targets, every["params"], curvkit.top_k(9), num_sqrt_columns=3
    )
    assert_close(flat(step), ref.step, what="rank-deficient step")


def test_partial_eigensolver_matches_dense():
    from curvkit.quantities.gram_eigen import top_eigh

    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    spectrum = torch.cat([torch.logspace(-3, 0, 290, dtype=torch.float64), torch.arange(2.0, 12)])
    matrix = (basis * spectrum) @ basis.T
    evals, evecs = top_eigh(matrix, 6)
    dense_evals, dense_evecs = torch.linalg.eigh(matrix)
    assert_close(evals, dense_evals[-6:], 1e-12, what="top evals")
    assert_close(evecs * signs(evecs, dense_evecs[:, -6:]), dense_evecs[:, -6:], 1e-10, "evecs")
    # A basis too small to converge falls back to the dense solver.
    evals, _ = top_eigh(matrix, 6, max_dim=30)
    assert_close(evals, dense_evals[-6:], 1e-12, what="fallback evals")


def test_top_k_partial_path_matches_full_path():
    model, loss_fn, inputs, targets = problem("ce", "mean", 90)  # Gram 270 x 270
    params = list(model.parameters())
    batch = (inputs, targets)
    fast = curvkit.damped_newton_step(
        model, loss_fn, batch, [{"params": params, "criterion": curvkit.top_k(3)}]
    )
    dense = curvkit.damped_newton_step(
        model,
        loss_fn,
        batch,
        [{"params": params, "criterion": lambda e: [len(e) - 3, len(e) - 2, len(e) - 1]}],
    )
    assert_close(flat(fast[0]), flat(dense[0]), 1e-9, what="partial vs full eigensolver")


def test_iterable_of_batches_is_concatenated():
    model, loss_fn, inputs, targets = problem("ce", "mean", 4)
    groups = [{"params": list(model.parameters()), "criterion": curvkit.top_k(2)}]
    whole = curvkit.damped_newton_step(model, loss_fn, (inputs, targets), groups)
    parts = [(inputs[:1], targets[:1]), (inputs[1:], targets[1:])]
    split = curvkit.damped_newton_step(model, loss_fn, parts, groups)
    assert_close(flat(split[0]), flat(whole[0]), 1e-12, what="concatenated batches")


def test_leaves_model_untouched():
    model, loss_fn, inputs, targets = problem("mse", "sum", 3)
    before = [p.detach().clone() for p in model.parameters()]
    run_all(model, loss_fn, (inputs, targets), None)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b) and p.grad is None
    assert not model._forward_hooks and not model[0]._forward_hooks


def _small():
    return problem("mse", "mean", 3)


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        (lambda m: [{"criterion": curvkit.top_k(1)}], ValueError, "no 'params'"),
        (lambda m: [{"params": [m[0].weight]}, {"params": [m[0].weight]}], ValueError, "one group"),
        (
            lambda m: [{"params": list(m.parameters()), "criterion": lambda e: [len(e)]}],
            ValueError,
            "outside",
        ),
        (
            lambda m: [{"params": list(m.parameters()), "criterion": lambda e: [-1]}],
            ValueError,
            "outside",
        ),
        (
            lambda m: [{"params": list(m.parameters()), "criterion": lambda e: [1, 1]}],
            ValueError,
            "repeated",
        ),
        (
            lambda m: [{"params": list(m.parameters()), "criterion": lambda e: [0.5]}],
            ValueError,
            "integers",
        ),
        (
            lambda m: [{"params": list(m.parameters()), "criterion": lambda e: e > 0}],
            ValueError,
            "mask",
        ),
        (
            lambda m: [{"params": list(m.parameters()), "criterion": lambda e: e[-1:]}],
            ValueError,
            "dtype",
        ),
        (
            lambda m: [{"params": list(m.parameters()), "criterion": lambda e: None}],
            ValueError,
            "list",
        ),
        (lambda m: [{"params": list(m.parameters()), "criterion": "top"}], TypeError, "criterion"),
        (lambda m: [{"params": list(m.parameters()), "damping": -1.0}], ValueError, "non-negative"),
        (lambda m: [{"params": list(m.parameters()), "damping": "1"}], TypeError, "damping"),
        (
            lambda m: [
                {
                    "params": list(m.parameters()),
                    "criterion": curvkit.top_k(2),
                    "damping": lambda *a: torch.ones(3),
                }
            ],
            ValueError,
            "shape",
        ),
        (
            lambda m: [{"params": list(m.parameters()), "damping": lambda *a: -a[0]}],
            ValueError,
            "non-negative",
        ),
        (
            lambda m: [{"params": list(m.parameters()), "damping": lambda *a: 1.0}],
            TypeError,
            "tensor",
        ),
        (lambda m: [{"params": list(m.parameters()), "lr": 0.1}], ValueError, "unknown option"),
    ],
)
def test_bad_groups_raise_clear_errors(groups, error, match):
    model, loss_fn, inputs, targets = _small()
    with pytest.raises(error, match=match):
        curvkit.damped_newton_step(model, loss_fn, (inputs, targets), groups(model))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"subsampling_ggn": [0, 0]}, ValueError, "repeated"),
        ({"subsampling_ggn": [3]}, ValueError, "outside"),
        ({"subsampling_grad": []}, ValueError, "empty"),
        ({"subsampling_grad": [0.0]}, TypeError, "integer"),
        ({"subsampling_grad": 3}, TypeError, "list"),
    ],
)
def test_bad_subsampling_raises(kwargs, error, match):
    model, loss_fn, inputs, targets = _small()
    with pytest.raises(error, match=match):
        curvkit.directional_derivatives(model, loss_fn, (inputs, targets), **kwargs)


def test_bad_model_data_gram_and_top_k_raise():
    model, loss_fn, inputs, targets = _small()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        curvkit.ggn_eigh(lambda x: x, loss_fn, (inputs, targets))
    with pytest.raises(TypeError, match="batch"):
        curvkit.ggn_eigh(model, loss_fn, 3)
    from curvkit.quantities.gram_eigen import gram_directions

    with pytest.raises(ValueError, match=r"\[C', S, C', S\]"):
        gram_directions(torch.eye(4), 2, curvkit.top_k(1))
    with pytest.raises(ValueError, match="positive integer"):
        curvkit.top_k(0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_null_columns_of_the_square_root_are_dropped_exactly(reduction):
    from curvkit.quantities.directional import drop_null_columns

    torch.manual_seed(0)
    outputs = torch.randn(5, 4, dtype=torch.float64)
    targets = torch.randint(0, 4, (5,))
    sqrt = losses.hessian_sqrt(nn.CrossEntropyLoss(reduction=reduction), outputs, targets)
    reduced = drop_null_columns(sqrt)
    assert reduced.shape == (3, 5, 4)
    hessians = torch.einsum("knc,knd->ncd", sqrt, sqrt)
    assert_close(torch.einsum("knc,knd->ncd", reduced, reduced), hessians, 1e-13, "Hessians")
    mse = losses.hessian_sqrt(nn.MSELoss(), outputs, torch.randn(5, 4, dtype=torch.float64))
    assert drop_null_columns(mse) is mse


@pytest.mark.parametrize("mc_samples", [0, 2])
@pytest.mark.filterwarnings("ignore:.*selected GGN eigenvalue:RuntimeWarning")
def test_top_k_beyond_the_rank_warns_once_with_the_rank_and_remedies(mc_samples: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = (torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 2]))
    groups = [
        {"params": list(model[0].parameters()), "criterion": curvkit.top_k(20)},
        {"params": list(model[2].parameters()), "criterion": curvkit.top_k(20)},
    ]
    # exact cross-entropy: C - 1 = 2 columns per sample after dropping the null direction
    columns = mc_samples or 2
    with pytest.warns(UserWarning, match=rf"top_k\(20\).*rank at most {2 * columns}") as caught:
        steps = curvkit.damped_newton_step(
            model, nn.CrossEntropyLoss(), batch, groups, mc_samples=mc_samples
        )
    rank_warnings = [w for w in caught if "top_k(20)" in str(w.message)]
    assert len(rank_warnings) == 1  # once per call, not per group
    message = str(rank_warnings[0].message)
    assert ("mc_samples" in message) == (mc_samples > 0)
    assert "more data" in message
    assert len(steps) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = [{"params": list(model.parameters()), "criterion": curvkit.top_k(1)}]
        curvkit.damped_newton_step(
            model, nn.CrossEntropyLoss(), batch, groups, mc_samples=mc_samples
        )
