"""KFAC and EKFAC operators against independent references (float64).

References: the exact GGN (``curvkit.ggn_matrix``) where KFAC is exact, factors rebuilt from their
definitions with plain autograd and hooks, dense linear algebra on ``to_dense()``, and curvlinops'
``KFACLinearOperator`` / ``EKFACLinearOperator`` (test extra) for the conventions.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvkit
import curvkit.ops.linalg
import curvkit.quantities.kfac
from curvkit import EKFACOperator, KFACOperator
from curvkit.engines import Decline, Factor, KroneckerFactor, RuleCall, register_rule

DTYPE = torch.float64


def close(actual: Tensor, expected: Tensor) -> bool:
    """Equal to float64 rounding, relative 1e-10.

    The products, inverses and determinants here are a few small factorisations deep.
    """
    return torch.allclose(
        actual, expected, rtol=1e-10, atol=1e-12 * float(expected.detach().abs().max())
    )


@pytest.fixture(autouse=True)
def _float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    yield
    torch.set_default_dtype(default)


class MeanOverPositions(nn.Module):
    """``[N, T, D] -> [N, D]``: the reduce setting of Eschenhagen et al. (2023)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )


def pooled_sequence() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), MeanOverPositions(), nn.Linear(3, 3)
    )


def batch(name: str, n: int, loss: str = "ce", seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = {"mlp": (n, 5), "cnn": (n, 2, 6, 6), "sequence": (n, 7, 4)}[name]
    inputs = torch.randn(*shape, generator=generator)
    if loss == "ce":
        return inputs, torch.randint(0, 3, (n,), generator=generator)
    return inputs, torch.randn(n, 3, generator=generator)


MODELS = {"mlp": mlp, "cnn": cnn, "sequence": pooled_sequence}


def relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# exactness against the GGN


@pytest.mark.parametrize("separate", [True, False])
def test_single_sample_expand_equals_ggn_diagonal_blocks(separate: bool):
    """One sample, Linear layers: B (x) x x^T is the GGN's block of every layer (to 1e-10)."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    data = batch("mlp", 1)
    loss_fn = nn.CrossEntropyLoss()
    kfac = KFACOperator(model, loss_fn, data, separate_weight_and_bias=separate).to_dense()
    ggn = curvkit.ggn_matrix(model, loss_fn, data)
    sizes = [p.numel() for p in model.parameters()]
    blocks = sizes if separate else [a + b for a, b in zip(sizes[::2], sizes[1::2], strict=True)]
    start, mask = 0, torch.zeros_like(ggn, dtype=torch.bool)
    for size in blocks:
        mask[start : start + size, start : start + size] = True
        start += size
    assert torch.allclose(kfac[mask], ggn[mask], atol=1e-10, rtol=0)
    assert torch.all(kfac[~mask] == 0)


def _deep_linear(pooled: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 3)]
    if pooled:
        layers.insert(2, MeanOverPositions())
    return nn.Sequential(*layers)


@pytest.mark.parametrize(
    ("approx", "pooled"), [("expand", False), ("reduce", True)], ids=["expand", "reduce"]
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_network_mse_is_exact(approx: str, pooled: bool, reduction: str):
    """Eschenhagen et al. (2023): deep linear nets with MSE, KFAC-expand in the expand setting
    (a loss per position) and KFAC-reduce in the reduce setting (positions pooled before the
    loss) equal the GGN's layer blocks (weight and bias separately)."""
    model = _deep_linear(pooled)
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(6, 7, 4, generator=generator)
    targets = torch.randn(6, 3, generator=generator) if pooled else torch.randn(6, 7, 3)
    loss_fn = nn.MSELoss(reduction=reduction)
    kfac = KFACOperator(model, loss_fn, (inputs, targets), kfac_approx=approx).to_dense()
    ggn = curvkit.ggn_matrix(model, loss_fn, (inputs, targets))
    start = 0
    for p in model.parameters():
        stop = start + p.numel()
        assert close(kfac[start:stop, start:stop], ggn[start:stop, start:stop])
        start = stop


# ---------------------------------------------------------------------------------------------
# factors from their definitions


def _record(model: nn.Module, inputs: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The Linear layers' inputs and outputs (kept in the graph), and the model's outputs."""
    store: dict[str, Tensor] = {}
    handles = [
        module.register_forward_hook(
            lambda m, args, out, name=name: store.update({name: (args[0], out)})
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        outputs = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return store, outputs


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_factors_equal_their_definitions(fisher_type: str, reduction: str):
    """A = mean of x x^T; B = sum of the backpropagated columns' outer products, from autograd.

    The exact columns are the per-sample loss Hessian's square root (autograd Hessian, then
    eigh) scaled by the reduction; the empirical column is the per-sample gradient scaled by
    the square root of the reduction.
    """
    model = mlp()
    inputs, targets = batch("mlp", 5)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    scale = 1 / len(inputs) if reduction == "mean" else 1.0
    op = KFACOperator(model, loss_fn, (inputs, targets), fisher_type=fisher_type)
    store, outputs = _record(model, inputs)
    reference_b = {name: 0 for name in store}
    for n in range(len(inputs)):

        def per_sample(out: Tensor, n: int = n) -> Tensor:
            return nn.functional.cross_entropy(out[None], targets[n : n + 1], reduction="sum")

        if fisher_type == "exact":
            hessian = torch.autograd.functional.hessian(per_sample, outputs[n].detach())
            values, vectors = torch.linalg.eigh(hessian * scale)
            columns = vectors * values.clamp(min=0).sqrt()
        else:
            out = outputs[n].detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(per_sample(out), out)
            columns = (grad * scale**0.5)[:, None]
        for column in columns.T:
            grads = torch.autograd.grad(
                outputs[n], [o for _, o in store.values()], column, retain_graph=True
            )
            for name, g in zip(store, grads, strict=True):
                reference_b[name] = reference_b[name] + torch.outer(g[n], g[n])
    for name, (x, _) in store.items():
        block = op.factors[name]
        assert close(block.A, x.T @ x / len(x))
        assert close(block.B, reference_b[name])
        assert block.params == {"weight": 0 if name == "0" else 2, "bias": 1 if name == "0" else 3}


def test_large_factors_from_the_blocked_product_are_exact_and_exactly_symmetric(monkeypatch):
    """Factors above the size thresholds take the blocked symmetric product (made small here)."""
    monkeypatch.setattr(curvkit.ops.linalg, "GRAM_BLOCKED_MIN_COLUMNS", 20)
    monkeypatch.setattr(curvkit.ops.linalg, "GRAM_BLOCKED_MIN_ENTRIES", 600)
    monkeypatch.setattr(curvkit.ops.linalg, "GRAM_BLOCK_COLUMNS", 8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 45), nn.Tanh(), nn.Linear(45, 3))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(30, 50, generator=generator)
    targets = torch.randint(0, 3, (30,), generator=generator)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    op = KFACOperator(model, loss_fn, (inputs, targets), fisher_type="empirical")
    store, outputs = _record(model, inputs)
    x, y = store["0"]
    # With a sum, row n of the gradient at the layer's output is sample n's gradient alone.
    (grad,) = torch.autograd.grad(loss_fn(outputs, targets), y)
    block = op.factors["0"]
    assert relative(block.A, x.T @ x / len(x)) < 1e-13
    assert relative(block.B, grad.T @ grad) < 1e-13
    assert torch.equal(block.A, block.A.T) and torch.equal(block.B, block.B.T)


def test_ekfac_eigenvalues_are_the_exact_second_moments_in_the_eigenbasis():
    """diag((Q_B (x) Q_A)^T G_layer (Q_B (x) Q_A)) of the exact GGN's layer block."""
    model = pooled_sequence()
    data = batch("sequence", 8)
    loss_fn = nn.CrossEntropyLoss()
    op = EKFACOperator(model, loss_fn, data, separate_weight_and_bias=False)
    ggn = curvkit.ggn_matrix(model, loss_fn, data)
    start = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        qa, qb = op.eigenvectors[name]
        size = module.weight.numel() + module.bias.numel()
        block = ggn[start : start + size, start : start + size]
        # The flat order is [weight rows, bias]; the joint block orders [W | b] row by row.
        o, i = module.weight.shape
        order = torch.cat(
            [torch.arange(o * i).reshape(o, i), o * i + torch.arange(o)[:, None]], dim=1
        ).reshape(-1)
        block = block[order][:, order]
        basis = torch.kron(qb[0], qa[0])
        expected = (basis.T @ block @ basis).diagonal().reshape(o, i + 1)
        assert close(op.eigenvalues[name]["joint"][0], expected)
        start += size


# ---------------------------------------------------------------------------------------------
# structure: scalars, inverse, products


@pytest.fixture(params=["kfac", "ekfac", "kfac_joint"])
def operator(request) -> KFACOperator:
    model = cnn()
    data = batch("cnn", 6)
    kind = request.param
    cls = EKFACOperator if kind == "ekfac" else KFACOperator
    return cls(model, nn.CrossEntropyLoss(), data, separate_weight_and_bias=kind != "kfac_joint")


def test_scalars_match_dense_linear_algebra(operator: KFACOperator):
    dense = operator.to_dense()
    assert close(dense, dense.T)
    eye = torch.eye(dense.shape[0])
    assert close(operator.trace(), dense.trace())
    assert close(operator.frobenius_norm(), dense.norm())
    assert torch.allclose(operator.logdet(damping=0.1), torch.logdet(dense + 0.1 * eye))
    assert torch.allclose(operator.det(damping=1.0), torch.det(dense + eye))


def test_inverse_matches_dense_inverse(operator: KFACOperator):
    dense = operator.to_dense()
    eye = torch.eye(dense.shape[0])
    for method in (None, "eigen", "exact"):
        inverse = operator.inverse(damping=1e-2, method=method)
        assert close(inverse.to_dense(), torch.linalg.inv(dense + 1e-2 * eye))
    vector = torch.randn(dense.shape[0])
    assert close(operator.inverse(1e-2) @ (operator @ vector + 1e-2 * vector), vector)


def test_heuristic_damping_is_pi_damping_of_each_factor():
    model = mlp()
    op = KFACOperator(model, nn.CrossEntropyLoss(), batch("mlp", 8))
    damping = 1e-2
    dense = op.inverse(damping, heuristic_damping=True).to_dense()
    start = 0
    for block in op.factors.values():
        a, b = block.A, block.B
        pi = ((a.trace() / a.shape[0]) / (b.trace() / b.shape[0])).sqrt()
        eye_a, eye_b = torch.eye(a.shape[0]), torch.eye(b.shape[0])
        weight = torch.kron(
            torch.linalg.inv(b + damping**0.5 / pi * eye_b),
            torch.linalg.inv(a + pi * damping**0.5 * eye_a),
        )
        stop = start + weight.shape[0]
        assert close(dense[start:stop, start:stop], weight)
        bias = torch.linalg.inv(b + damping * eye_b)
        assert close(dense[stop : stop + b.shape[0], stop : stop + b.shape[0]], bias)
        start = stop + b.shape[0]
    with pytest.raises(ValueError, match="heuristic"):
        EKFACOperator(model, nn.CrossEntropyLoss(), batch("mlp", 8)).inverse(
            damping, heuristic_damping=True
        )


def test_products_on_flat_matrices_and_parameter_lists():
    model = mlp()
    op = KFACOperator(model, nn.CrossEntropyLoss(), batch("mlp", 8))
    dense = op.to_dense()
    matrix = torch.randn(dense.shape[0], 3)
    assert close(op @ matrix, dense @ matrix)
    shaped = [torch.randn(*p.shape) for p in model.parameters()]
    flat = torch.cat([s.reshape(-1) for s in shaped])
    result = op @ shaped
    assert close(torch.cat([r.reshape(-1) for r in result]), dense @ flat)


def test_grouped_convolution_has_one_factor_pair_per_group():
    """A grouped conv equals two convs on the channel halves: same blocks, stacked."""
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 16, 3))
    inputs, targets = torch.randn(5, 4, 6, 6), torch.randint(0, 3, (5,))
    op = KFACOperator(grouped, nn.CrossEntropyLoss(), (inputs, targets), params=[grouped[0].weight])
    block = op.factors["0"]
    assert block.A.shape == (2, 18, 18) and block.B.shape == (2, 2, 2)
    patches = nn.functional.unfold(inputs, 3).reshape(5, 2, 18, 16)  # [N, G, I, T]
    for g in range(2):
        x = patches[:, g].transpose(1, 2).reshape(-1, 18)
        assert close(block.A[g], x.T @ x / len(x))
    dense = op.to_dense()
    expected = torch.block_diag(*(torch.kron(block.B[g], block.A[g]) for g in range(2)))
    assert close(dense, expected)


# ---------------------------------------------------------------------------------------------
# Monte-Carlo


def test_monte_carlo_output_factor_is_unbiased():
    """Mean of T one-sample estimates of B within 6 standard errors of the exact B, entrywise
    (central limit theorem: a two-sided Gaussian tail of 2e-9 per entry); A is not random."""
    model = mlp()
    data = batch("mlp", 6)
    loss_fn = nn.CrossEntropyLoss()
    exact = KFACOperator(model, loss_fn, data).factors["2"]
    draws = []
    for seed in range(100):
        generator = torch.Generator().manual_seed(seed)
        op = KFACOperator(model, loss_fn, data, fisher_type="mc", generator=generator)
        block = op.factors["2"]
        assert torch.equal(block.A, exact.A)
        draws.append(block.B)
    draws = torch.stack(draws)
    error = (draws.mean(0) - exact.B).abs()
    standard_error = draws.std(0) / len(draws) ** 0.5
    assert torch.all(error <= 6 * standard_error + 1e-12)


def test_monte_carlo_operator_is_one_fixed_estimate():
    model = mlp()
    generator = torch.Generator().manual_seed(0)
    data = batch("mlp", 6)
    op = KFACOperator(
        model, nn.CrossEntropyLoss(), data, fisher_type="mc", mc_samples=3, generator=generator
    )
    again = KFACOperator(
        model,
        nn.CrossEntropyLoss(),
        data,
        fisher_type="mc",
        mc_samples=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(op.to_dense(), again.to_dense())
    ekfac = EKFACOperator(
        model,
        nn.CrossEntropyLoss(),
        data,
        fisher_type="mc",
        mc_samples=3,
        generator=torch.Generator().manual_seed(0),
    )
    # Both EKFAC passes, and the GGN operator, draw the same samples: EKFAC's eigenvalues are
    # the exact diagonal in its basis, so its trace is that Monte-Carlo GGN's.
    ggn = curvkit.GGNOperator(
        model, nn.CrossEntropyLoss(), data, mc_samples=3, generator=torch.Generator().manual_seed(0)
    )
    assert close(ekfac.trace(), ggn.to_dense().trace())


# ---------------------------------------------------------------------------------------------
# datasets, state, side effects


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dataset_of_unequal_batches_equals_one_batch(reduction: str):
    model = pooled_sequence()
    inputs, targets = batch("sequence", 9)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    loader = [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])]
    for cls in (KFACOperator, EKFACOperator):
        whole = cls(model, loss_fn, (inputs, targets), kfac_approx="reduce").to_dense()
        parts = cls(model, loss_fn, loader, kfac_approx="reduce").to_dense()
        assert close(parts, whole)


def test_state_dict_restores_the_factors():
    model = mlp()
    data = batch("mlp", 8)
    for cls in (KFACOperator, EKFACOperator):
        op = cls(model, nn.CrossEntropyLoss(), data)
        state = op.state_dict()
        with torch.no_grad():
            model[0].weight.add_(1.0)  # the restored operator must not recompute
        restored = cls(model, nn.CrossEntropyLoss(), data)
        restored.load_state_dict(state)
        assert close(restored.to_dense(), op.to_dense())
        with torch.no_grad():
            model[0].weight.sub_(1.0)
    other = KFACOperator(model, nn.CrossEntropyLoss(), data, kfac_approx="reduce")
    with pytest.raises(ValueError, match="kfac_approx"):
        other.load_state_dict(KFACOperator(model, nn.CrossEntropyLoss(), data).state_dict())
    fewer = KFACOperator(model, nn.CrossEntropyLoss(), data, params=[model[0].weight])
    with pytest.raises(ValueError, match="other params"):
        fewer.load_state_dict(KFACOperator(model, nn.CrossEntropyLoss(), data).state_dict())


def test_leaves_the_model_untouched():
    model = mlp()
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    KFACOperator(model, nn.CrossEntropyLoss(), batch("mlp", 4)).to_dense()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bias_alone_uses_the_weights_output_factor():
    model = pooled_sequence()
    data = batch("sequence", 6)
    full = KFACOperator(model, nn.CrossEntropyLoss(), data)
    bias = KFACOperator(model, nn.CrossEntropyLoss(), data, params=[model[0].bias])
    assert close(bias.to_dense(), full.factors["0"].B)
    assert bias.factors["0"].A is None and bias.factors["0"].params == {"bias": 0}


@pytest.mark.parametrize("separate", [True, False])
def test_a_frozen_weights_bias_gets_its_output_factor(separate: bool):
    """With the weight frozen, the bias's block is B (exact for a bias at one position)."""
    model = mlp()
    model[2].weight.requires_grad_(False)
    data = batch("mlp", 6)
    params = [p for p in model.parameters() if p.requires_grad]
    op = KFACOperator(model, nn.CrossEntropyLoss(), data, separate_weight_and_bias=separate)
    ggn = curvkit.ggn_matrix(model, nn.CrossEntropyLoss(), data, params=params)
    assert op.factors["2"].A is None and op.factors["2"].params == {"bias": 2}
    torch.testing.assert_close(op.to_dense()[-3:, -3:], ggn[-3:, -3:], rtol=1e-10, atol=1e-14)
    ekfac = EKFACOperator(model, nn.CrossEntropyLoss(), data)
    torch.testing.assert_close(ekfac.to_dense()[-3:, -3:], ggn[-3:, -3:], rtol=1e-10, atol=1e-14)


def test_a_parametrized_weight_gets_the_fallback_over_the_users_parameters():
    """weight_norm: the parametrization's own parameters get their exact blocks."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3))
    data = batch("mlp", 6)
    params = list(model.parameters())
    dense = KFACOperator(model, nn.CrossEntropyLoss(), data, fallback="block").to_dense()
    ggn = curvkit.ggn_matrix(model, nn.CrossEntropyLoss(), data, params=params)
    start = 0
    for param in params[:-2]:
        block = slice(start, start + param.numel())
        torch.testing.assert_close(dense[block, block], ggn[block, block], rtol=1e-10, atol=1e-14)
        start += param.numel()


def test_non_finite_loss_weights_are_refused():
    model = mlp()
    data = batch("mlp", 6)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, float("nan"), 1.0]))
    for call in (
        lambda: KFACOperator(model, loss_fn, data).to_dense(),
        lambda: curvkit.diag_ggn(model, loss_fn, data),
        lambda: curvkit.hessian_matrix(model, loss_fn, data),
        lambda: curvkit.diag_ef(model, loss_fn, data),
    ):
        with pytest.raises(ValueError, match="weight holds NaN or inf"):
            call()
    bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(ValueError, match="pos_weight holds NaN or inf"):
        KFACOperator(model, bce, (data[0], torch.zeros(6, 3))).to_dense()


# ---------------------------------------------------------------------------------------------
# layers without a Kronecker factor


def _with_layer_norm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))


def test_layers_without_kronecker_factor_are_refused_by_name():
    """Before any computation for a layer without a rule; once computed for a declined call."""
    model = _with_layer_norm()
    with pytest.raises(ValueError, match=r"'1.weight' of LayerNorm.*fallback='diagonal'"):
        KFACOperator(model, nn.CrossEntropyLoss(), batch("mlp", 4))
    with pytest.raises(ValueError, match=r"forward-only.*LayerNorm"):
        KFACOperator(
            model,
            nn.CrossEntropyLoss(),
            batch("mlp", 4),
            fisher_type="forward-only",
            fallback="block",
        )

    class DecliningLinear(nn.Linear):
        pass

    def decline(call: RuleCall) -> dict[str, Factor]:
        raise Decline("for the test")

    handle = register_rule(DecliningLinear, decline)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), DecliningLinear(4, 3))
        op = KFACOperator(model, nn.CrossEntropyLoss(), batch("mlp", 4))
        with pytest.raises(ValueError, match=r"'2.weight' of DecliningLinear has no Kronecker"):
            op.to_dense()
    finally:
        handle.remove()


@pytest.mark.parametrize("fallback", ["diagonal", "block"])
def test_fallback_is_the_exact_diagonal_or_block(fallback: str):
    model = _with_layer_norm()
    data = batch("mlp", 4)
    norm = list(model[1].parameters())
    op = KFACOperator(model, nn.CrossEntropyLoss(), data, params=norm, fallback=fallback)
    ggn = curvkit.ggn_matrix(model, nn.CrossEntropyLoss(), data, params=norm)
    dense = op.to_dense()
    sizes = [p.numel() for p in norm]
    start = 0
    for size in sizes:
        block = ggn[start : start + size, start : start + size]
        expected = block.diagonal().diag() if fallback == "diagonal" else block
        assert close(dense[start : start + size, start : start + size], expected)
        start += size
    assert torch.all(dense[: sizes[0], sizes[0] :] == 0)
    eye = torch.eye(dense.shape[0])
    assert close(op.inverse(0.1).to_dense(), torch.linalg.inv(dense + 0.1 * eye))
    assert close(op.logdet(0.1), torch.logdet(dense + 0.1 * eye))


# ---------------------------------------------------------------------------------------------
# bad input


def test_an_infeasible_exact_square_root_is_refused_before_it_is_built(monkeypatch):
    """The one memory plan refuses KFAC's exact columns, as every quantity's."""
    monkeypatch.setattr(curvkit.engines.memory, "MAX_GRADIENTS", 2)
    op = KFACOperator(mlp(), nn.CrossEntropyLoss(), batch("mlp", 64))
    with pytest.raises(curvkit.engines.memory.MemoryPlanError, match=r"3 columns per sample"):
        op.to_dense()


def test_bad_arguments_raise_clear_errors():
    model = mlp()
    data = batch("mlp", 4)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        KFACOperator(model, loss_fn, data, fisher_type="type-2")
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        EKFACOperator(model, loss_fn, data, fisher_type="forward-only")
    with pytest.raises(ValueError, match="kfac_approx must be one of"):
        KFACOperator(model, loss_fn, data, kfac_approx="mean")
    with pytest.raises(ValueError, match="fallback must be one of"):
        KFACOperator(model, loss_fn, data, fallback="skip")
    with pytest.raises(ValueError, match="fisher_type='mc' only"):
        KFACOperator(model, loss_fn, data, mc_samples=4)
    with pytest.raises(ValueError, match="mc_samples >= 1"):
        KFACOperator(model, loss_fn, data, fisher_type="mc", mc_samples=0)
    with pytest.raises(TypeError, match="separate_weight_and_bias"):
        KFACOperator(model, loss_fn, data, separate_weight_and_bias="yes")
    with pytest.raises(ValueError, match="damping"):
        KFACOperator(model, loss_fn, data).inverse(-1.0)
    with pytest.raises(TypeError, match="model"):
        KFACOperator(None, loss_fn, data)


# ---------------------------------------------------------------------------------------------
# side by side with curvlinops


def _curvlinops_dense(cls_name: str, model, loss_fn, data, **options) -> Tensor:
    curvlinops = pytest.importorskip("curvlinops")
    cls = getattr(curvlinops, cls_name)
    params = [p for p in model.parameters() if p.requires_grad]
    op = cls(model, loss_fn, params, data, check_deterministic=False, **options)
    return op @ torch.eye(sum(p.numel() for p in params))


CURVLINOPS_FISHER = {"exact": "type-2", "empirical": "empirical", "forward-only": "forward-only"}


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical", "forward-only"])
@pytest.mark.parametrize(("model_name", "n"), [("mlp", 1), ("mlp", 7), ("cnn", 3), ("sequence", 5)])
def test_kfac_matches_curvlinops(model_name, n, fisher_type, approx, separate):
    model = MODELS[model_name]()
    reduction = "sum" if n == 7 else "mean"
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    inputs, targets = batch(model_name, n)
    data = [(inputs, targets)] if n < 7 else [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])]
    options = {"kfac_approx": approx, "separate_weight_and_bias": separate}
    ours = KFACOperator(model, loss_fn, data, fisher_type=fisher_type, **options).to_dense()
    theirs = _curvlinops_dense(
        "KFACLinearOperator",
        model,
        loss_fn,
        data,
        fisher_type=CURVLINOPS_FISHER[fisher_type],
        **options,
    )
    assert relative(ours, theirs) < 1e-6


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize(
    ("model_name", "loss"), [("mlp", "mse"), ("cnn", "ce"), ("sequence", "ce")]
)
def test_ekfac_matches_curvlinops(model_name, loss, fisher_type, approx):
    """Enough samples that no factor has a repeated eigenvalue (else no unique basis)."""
    model = MODELS[model_name]()
    loss_fn = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    data = [batch(model_name, 40, loss)]
    options = {"kfac_approx": approx}
    ours = EKFACOperator(model, loss_fn, data, fisher_type=fisher_type, **options).to_dense()
    theirs = _curvlinops_dense(
        "EKFACLinearOperator",
        model,
        loss_fn,
        data,
        fisher_type=CURVLINOPS_FISHER[fisher_type],
        **options,
    )
    assert relative(ours, theirs) < 1e-6


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_per_position_loss_expand_matches_curvlinops(fisher_type):
    """A loss at every position (outputs [N, T, C]) with layers that act per position."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 7, 4, generator=generator), torch.randn(3, 7, 3, generator=generator))]
    ours = KFACOperator(model, nn.MSELoss(), data, fisher_type=fisher_type).to_dense()
    theirs = _curvlinops_dense(
        "KFACLinearOperator", model, nn.MSELoss(), data, fisher_type=CURVLINOPS_FISHER[fisher_type]
    )
    assert relative(ours, theirs) < 1e-6


def test_a_registered_rule_with_a_kronecker_factor_is_covered():
    """A user's layer whose rule gives a KroneckerFactor gets KFAC like nn.Linear."""

    class MyLinear(nn.Module):
        def __init__(self, fan_in: int, fan_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(fan_out, fan_in))

        def forward(self, x: Tensor) -> Tensor:
            return x @ self.weight.T

    def my_rule(call: RuleCall) -> dict[str, Factor]:
        x, b = call.single_input(), call.output_grad()
        k, n = b.shape[0], call.num_samples
        factor = KroneckerFactor(
            b.reshape(k, n, 1, 1, -1), x.reshape(n, 1, 1, -1), call.module.weight.shape
        )
        return {"weight": factor}

    torch.manual_seed(0)
    custom = nn.Sequential(MyLinear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    plain = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3))
    plain.load_state_dict(custom.state_dict())
    data = batch("mlp", 6)
    expected = KFACOperator(plain, nn.CrossEntropyLoss(), data).to_dense()
    for kronecker in (None, True):
        with register_rule(MyLinear, my_rule, kronecker=kronecker):
            ours = KFACOperator(custom, nn.CrossEntropyLoss(), data).to_dense()
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    # A rule that declares no Kronecker factor is refused before anything is computed.
    with register_rule(MyLinear, my_rule, kronecker=False):
        with pytest.raises(ValueError, match=r"'0.weight' of MyLinear has no Kronecker factor"):
            KFACOperator(custom, nn.CrossEntropyLoss(), data)


# ---------------------------------------------------------------------------------------------
# torch.distributed


def _distributed_operators(data) -> list[Tensor]:
    model = pooled_sequence()
    weight = torch.linspace(0.5, 2.0, 3)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    return [
        KFACOperator(model, loss_fn, data).to_dense(),
        KFACOperator(model, loss_fn, data, kfac_approx="reduce").to_dense(),
        EKFACOperator(model, loss_fn, data, fisher_type="empirical").to_dense(),
    ]


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.set_default_dtype(DTYPE)
        inputs, targets = batch("sequence", 7)
        # Unequal halves: rank 0 one batch of 3 samples, rank 1 batches of 1 and 3.
        data = (
            (inputs[:3], targets[:3])
            if rank == 0
            else [(inputs[3:4], targets[3:4]), (inputs[4:], targets[4:])]
        )
        torch.save(_distributed_operators(data), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_single_process_factors(tmp_path):
    """Weighted cross-entropy: ranks and batches of unequal size combine exactly."""
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = _distributed_operators(batch("sequence", 7))
    for rank in range(2):
        for actual, wanted in zip(torch.load(tmp_path / f"rank{rank}.pt"), expected, strict=True):
            assert close(actual, wanted)


def test_a_layer_called_twice_counts_its_calls_as_positions():
    """A shared layer: both calls' inputs in A (as positions), gradients summed before squaring."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            hidden = torch.tanh(self.fc(x))
            return self.out(torch.tanh(self.fc(hidden)))

    torch.manual_seed(0)
    model = Twice()
    inputs, targets = torch.randn(6, 4), torch.randint(0, 3, (6,))
    data = (inputs, targets)
    block = KFACOperator(model, nn.CrossEntropyLoss(), data).factors["fc"]
    with torch.no_grad():
        calls = torch.cat([inputs, torch.tanh(model.fc(inputs))])
    assert close(block.A, calls.T @ calls / len(calls))
    ggn = curvkit.ggn_matrix(model, nn.CrossEntropyLoss(), data)
    assert close(EKFACOperator(model, nn.CrossEntropyLoss(), data).trace(), ggn.trace())
