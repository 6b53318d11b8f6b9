"""One params convention: tensors or torch.optim-style groups, for every quantity.

With groups, the GGN quantities are those of the block-diagonal GGN (one block per group),
checked against the diagonal blocks of the plain-autograd dense GGN of ``curvkit.testing.verify``.
"""

from __future__ import annotations

import pytest
import torch
from test_ggn import ATOL, RTOL, flat, problem

import curvkit
from curvkit.testing.verify import compare, reference_diag_ggn, reference_ggn

CASES = [
    ("mlp", "ce", "mean", 1),
    ("mlp", "mse", "sum", 5),
    ("residual", "bce", "mean", 4),
    ("cnn", "convex", "sum", 3),
]


def _groups(model):
    """Three groups that split the parameters unevenly, out of the model's order."""
    params = list(model.parameters())
    return [{"params": params[1:2]}, {"params": params[2:]}, {"params": params[:1]}]


def _blocks(model, loss_fn, inputs, targets, groups):
    """The diagonal blocks of the reference GGN, one per group."""
    return [
        reference_ggn(model, loss_fn, inputs, targets, params=group["params"]) for group in groups
    ]


@pytest.mark.parametrize(("model_name", "loss_name", "reduction", "n"), CASES)
def test_group_results_are_the_block_diagonal_ggn(model_name, loss_name, reduction, n):
    model, loss_fn, inputs, targets = problem(model_name, loss_name, reduction, n)
    data = (inputs, targets)
    groups = _groups(model)
    blocks = _blocks(model, loss_fn, inputs, targets, groups)
    generator = torch.Generator().manual_seed(0)
    vectors = [
        [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in group["params"]]
        for group in groups
    ]

    diagonal = curvkit.diag_ggn(model, loss_fn, data, params=groups)
    expected_diagonal = [
        reference_diag_ggn(model, loss_fn, inputs, targets, params=g["params"]) for g in groups
    ]
    compare(diagonal, expected_diagonal, rtol=RTOL, atol=ATOL).assert_passed()

    matrices = curvkit.ggn_matrix(model, loss_fn, data, params=groups)
    compare(matrices, blocks, rtol=RTOL, atol=ATOL).assert_passed()

    product = curvkit.ggn_vector_product(model, loss_fn, data, vectors, params=groups)
    expected_product = [block @ flat(v) for block, v in zip(blocks, vectors, strict=True)]
    compare([flat(p) for p in product], expected_product, rtol=RTOL, atol=ATOL).assert_passed()

    block_diagonal = torch.block_diag(*blocks)
    flat_vector = torch.cat([flat(v) for v in vectors])
    flat_product = curvkit.ggn_vector_product(model, loss_fn, data, flat_vector, params=groups)
    compare(flat_product, block_diagonal @ flat_vector, rtol=RTOL, atol=ATOL).assert_passed()

    operator = curvkit.GGNOperator(model, loss_fn, data, params=groups)
    eye = torch.eye(operator.shape[0], dtype=torch.float64)
    compare(operator @ eye, block_diagonal, rtol=RTOL, atol=ATOL).assert_passed()

    columns = curvkit.ggn_columns(model, loss_fn, data, params=groups, chunk_size=7)
    compare(
        torch.stack([c for _, c in columns], dim=1), block_diagonal, rtol=RTOL, atol=ATOL
    ).assert_passed()


def test_tensors_give_flat_results_and_groups_nested_ones():
    model, loss_fn, inputs, targets = problem("mlp", "ce", "mean", 3)
    params = list(model.parameters())
    flat_result = curvkit.diag_ggn(model, loss_fn, (inputs, targets), params=params)
    assert [d.shape for d in flat_result] == [p.shape for p in params]
    (nested,) = curvkit.diag_ggn(model, loss_fn, (inputs, targets), params=[{"params": params}])
    compare(nested, flat_result, rtol=0, atol=0).assert_passed()
    single = curvkit.diag_ggn(model, loss_fn, (inputs, targets), params={"params": params})
    compare(single, [flat_result], rtol=0, atol=0).assert_passed()


def test_directional_params_keyword_and_deprecated_spelling_agree():
    model, loss_fn, inputs, targets = problem("mlp", "ce", "mean", 4)
    groups = [{"params": list(model.parameters()), "criterion": curvkit.top_k(2)}]
    data = (inputs, targets)
    positional = curvkit.damped_newton_step(model, loss_fn, data, groups)
    keyword = curvkit.damped_newton_step(model, loss_fn, data, params=groups)
    with pytest.warns(DeprecationWarning, match="param_groups= is deprecated"):
        deprecated = curvkit.damped_newton_step(model, loss_fn, data, param_groups=groups)
    compare(keyword, positional, rtol=0, atol=0).assert_passed()
    compare(deprecated, positional, rtol=0, atol=0).assert_passed()
    with pytest.raises(TypeError, match="not both"):
        curvkit.ggn_eigh(model, loss_fn, data, groups, param_groups=groups)


def test_group_vector_of_the_wrong_form_is_refused():
    model, loss_fn, inputs, targets = problem("mlp", "ce", "mean", 2)
    groups = _groups(model)
    vector = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(TypeError, match="3 lists"):
        curvkit.ggn_vector_product(model, loss_fn, (inputs, targets), vector, params=groups)


def test_group_options_are_checked_per_quantity():
    model, loss_fn, inputs, targets = problem("mlp", "ce", "mean", 2)
    groups = [{"params": list(model.parameters()), "damping": 1.0}]
    with pytest.raises(ValueError, match="unknown option 'damping'"):
        curvkit.diag_ggn(model, loss_fn, (inputs, targets), params=groups)
    with pytest.raises(ValueError, match="unknown option 'lr'"):
        curvkit.ggn_eigh(model, loss_fn, (inputs, targets), [{**groups[0], "lr": 1.0}])
