"""curvkit's backends inside laplace-torch, against plain autograd and laplace-torch's curvlinops.

Every number in float64: the curvature blocks against :mod:`curvkit.testing.verify`'s autograd
references (the GGN, the Hessian, per-sample gradients) scaled as laplace-torch scales them (the
loss summed over the batch, times its likelihood factor: 1 for the cross-entropy, 1/2 for the
squared error), and the Kronecker entries and whole fits against laplace-torch's own
``CurvlinopsGGN``/``CurvlinopsEF``. laplace-torch's ``full`` through curvlinops multiplies with a
float32 identity, so it is only accurate to about 1e-8: ``full`` is checked against autograd.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("laplace")

from laplace import Laplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from laplace.utils import Kron
from peer_warnings import CURVLINOPS_JIT_SCRIPT

import curvkit
from curvkit.compat.laplace import (
    CurvkitEF,
    CurvkitGGN,
    CurvkitHessian,
    CurvkitKron,
    LowRankLaplace,
)
from curvkit.engines.memory import MemoryPlanError
from curvkit.testing.verify import (
    reference_ggn,
    reference_hessian,
    reference_per_sample_gradients,
)

pytestmark = CURVLINOPS_JIT_SCRIPT

RTOL = 1e-8
NUM_CLASSES = 3


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_CLASSES))


def _conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, NUM_CLASSES)
    )


def _layer_norm() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, NUM_CLASSES))


def _embedding() -> nn.Module:
    return nn.Sequential(nn.Embedding(6, 2), nn.Flatten(), nn.Tanh(), nn.Linear(4, NUM_CLASSES))


MODELS = {"mlp": _mlp, "conv": _conv, "layernorm": _layer_norm, "embedding": _embedding}


def _model(name: str) -> nn.Module:
    torch.manual_seed(3)
    model = MODELS[name]().double()
    if name == "layernorm":
        # Away from LayerNorm's initial weight 1 and bias 0, so that a wrong block shows.
        with torch.no_grad():
            model[1].weight.add_(torch.rand(5, dtype=torch.float64))
            model[1].bias.add_(torch.randn(5, dtype=torch.float64))
    return model


def _data(name: str, likelihood: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    if name == "conv":
        x = torch.randn(n, 2, 5, 5, generator=generator, dtype=torch.float64)
    elif name == "embedding":
        x = torch.randint(0, 6, (n, 2), generator=generator)
    else:
        x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    else:
        y = torch.randn(n, NUM_CLASSES, generator=generator, dtype=torch.float64)
    return x, y


def _loss_and_factor(likelihood: str) -> tuple[nn.Module, float]:
    if likelihood == "classification":
        return nn.CrossEntropyLoss(reduction="sum"), 1.0
    return nn.MSELoss(reduction="sum"), 0.5


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _reference_ef(model: nn.Module, loss_fn: nn.Module, x, y) -> torch.Tensor:
    grads = reference_per_sample_gradients(model, loss_fn, x, y)
    flat = torch.cat([g.flatten(1) for g in grads], dim=1)
    return flat.T @ flat


def _glm(la, x: torch.Tensor) -> torch.Tensor:
    """The GLM predictive: probabilities, or the mean and variance side by side (regression)."""
    prediction = la(x, pred_type="glm")
    if isinstance(prediction, tuple):
        mean, var = prediction
        return torch.cat([mean.flatten(1), var.flatten(1)], dim=1)
    return prediction


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    scale = expected.abs().max().clamp_min(1e-300)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=rtol)


def _assert_kron_equal(actual: Kron, expected: Kron) -> None:
    assert len(actual.kfacs) == len(expected.kfacs)
    for ours, theirs in zip(actual.kfacs, expected.kfacs, strict=True):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _close(a, b)


# -- one batch: every structure against autograd ---------------------------------------------


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("name", ["mlp", "conv", "layernorm", "embedding"])
def test_full_and_diag_match_autograd(name: str, likelihood: str, n: int) -> None:
    model = _model(name)
    x, y = _data(name, likelihood, n)
    loss_fn, factor = _loss_and_factor(likelihood)
    ggn = factor * reference_ggn(model, loss_fn, x, y)
    ef = factor * _reference_ef(model, loss_fn, x, y)
    expected_loss = factor * loss_fn(model(x), y).detach()
    for backend, reference in ((CurvkitGGN, ggn), (CurvkitEF, ef)):
        interface = backend(model, likelihood)
        loss, full = interface.full(x, y)
        _close(full, reference)
        _close(loss, expected_loss)
        loss, diagonal = interface.diag(x, y)
        _close(diagonal, reference.diagonal())
        _close(loss, expected_loss)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_hessian_backend_matches_autograd(likelihood: str) -> None:
    model = _model("mlp")
    x, y = _data("mlp", likelihood, 4)
    loss_fn, factor = _loss_and_factor(likelihood)
    hessian = factor * reference_hessian(model, loss_fn, x, y)
    interface = CurvkitHessian(model, likelihood)
    _close(interface.full(x, y)[1], hessian)
    _close(interface.diag(x, y)[1], hessian.diagonal())


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("name", ["mlp", "conv", "embedding"])
def test_gradients_and_jacobians_match_autograd(name: str, n: int) -> None:
    model = _model(name)
    x, y = _data(name, "classification", n)
    loss_fn, _ = _loss_and_factor("classification")
    interface = CurvkitGGN(model, "classification")
    grads, loss = interface.gradients(x, y)
    expected = reference_per_sample_gradients(model, loss_fn, x, y)
    _close(grads, torch.cat([g.flatten(1) for g in expected], dim=1))
    _close(loss, loss_fn(model(x), y).detach())

    js, outputs = interface.jacobians(x)
    params = _params(model)
    rows = []
    for i in range(n):
        for c in range(NUM_CLASSES):
            rows.append(torch.autograd.grad(model(x[i : i + 1])[0, c], params))
    reference = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])
    _close(js.reshape(n * NUM_CLASSES, -1), reference)
    _close(outputs, model(x).detach())


def test_jacobians_beyond_the_budget_are_refused_with_the_estimate() -> None:
    model = _model("mlp")
    x, _ = _data("mlp", "classification", 8)
    interface = CurvkitGGN(model, "classification", max_memory=1000)
    with pytest.raises(MemoryPlanError, match=r"\[8, 3, 43\] tensor of about .* GiB"):
        interface.jacobians(x)
    with pytest.raises(MemoryPlanError, match="max_memory"):
        interface.jacobians(x, enable_backprop=True)


# -- Kronecker entries against laplace-torch's CurvlinopsGGN / CurvlinopsEF ---------------


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_kron_entries_match_curvlinops(name: str, likelihood: str, n: int) -> None:
    model = _model(name)
    x, y = _data(name, likelihood, n)
    for ours, theirs in ((CurvkitGGN, CurvlinopsGGN), (CurvkitEF, CurvlinopsEF)):
        loss, kron = ours(model, likelihood).kron(x, y, N=3 * n)
        expected_loss, expected = theirs(model, likelihood).kron(x, y, N=3 * n)
        _assert_kron_equal(kron, expected)
        _close(loss, expected_loss)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("name", ["layernorm", "embedding"])
def test_kron_gives_the_exact_block_where_there_are_no_kronecker_factors(
    name: str, likelihood: str
) -> None:
    model = _model(name)
    x, y = _data(name, likelihood, 9)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    la = Laplace(
        model, likelihood, subset_of_weights="all", hessian_structure="kron", backend=CurvkitGGN
    )
    la.fit(loader)
    loss_fn, factor = _loss_and_factor(likelihood)
    ggn = factor * reference_ggn(model, loss_fn, x, y)
    sizes = [p.numel() for p in _params(model)]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    dense_positions = [1, 2] if name == "layernorm" else [0]
    for position in dense_positions:
        (block,) = la.H_facs.kfacs[position]
        start, stop = offsets[position], offsets[position + 1]
        _close(block, ggn[start:stop, start:stop])
    # The Linear layers keep laplace-torch's two Kronecker factors.
    for position, entry in enumerate(la.H_facs.kfacs):
        if position not in dense_positions:
            assert len(entry) == (2 if _params(model)[position].dim() == 2 else 1)
    assert torch.isfinite(la.log_marginal_likelihood())
    prediction = _glm(la, x[:2])
    assert prediction.shape[0] == 2
    assert torch.isfinite(prediction).all()


def test_kron_addition_forms_the_dense_sum_of_mixed_entries() -> None:
    b = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.5], [0.5, 4.0]], dtype=torch.float64)
    dense = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    total = Kron([[b, a]]) + CurvkitKron([[dense]])
    assert isinstance(total, CurvkitKron)
    (entry,) = total.kfacs
    _close(entry[0], dense + torch.kron(b, a))
    (same,) = (CurvkitKron([[b, a]]) + Kron([[b, a]])).kfacs
    _close(same[0], 2 * b)
    _close(same[1], 2 * a)
    with pytest.raises(ValueError, match="same parameters"):
        CurvkitKron([[dense]]) + Kron([[b, a], [b]])


# -- whole fits inside laplace-torch ------------------------------------------------------


def _fit(model, likelihood, structure, subset, backend, loader, **kwargs):
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend,
        **kwargs,
    )
    la.fit(loader)
    return la


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_fits_match_curvlinops(structure: str, likelihood: str, subset: str) -> None:
    x, y = _data("mlp", likelihood, 11)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    for ours, theirs in ((CurvkitGGN, CurvlinopsGGN), (CurvkitEF, CurvlinopsEF)):
        if theirs is CurvlinopsEF and structure == "diag" and subset == "last_layer":
            # laplace-torch's per-sample gradients miss the last layer's parameters (they
            # look them up by their names in the last layer on the whole model): zeros.
            continue
        la = _fit(_model("mlp"), likelihood, structure, subset, ours, loader)
        ref = _fit(_model("mlp"), likelihood, structure, subset, theirs, loader)
        _close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
        _close(_glm(la, x[:3]), _glm(ref, x[:3]))


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_full_fit_is_the_summed_losses_curvature(likelihood: str, batch_size: int) -> None:
    # laplace-torch sums the loss over the data; a mean-reduced loss's GGN times N is the same.
    x, y = _data("mlp", likelihood, 7)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    for backend in (CurvkitGGN, CurvkitEF):
        model = _model("mlp")
        la = _fit(model, likelihood, "full", "all", backend, loader)
        loss_fn, factor = _loss_and_factor(likelihood)
        if backend is CurvkitGGN:
            mean_loss = nn.CrossEntropyLoss() if likelihood == "classification" else nn.MSELoss()
            mean_scale = 7 * (NUM_CLASSES if likelihood == "regression" else 1)
            expected = factor * mean_scale * reference_ggn(model, mean_loss, x, y)
        else:
            expected = factor * _reference_ef(model, loss_fn, x, y)
        _close(la.H, expected)
        _close(la.loss, factor * loss_fn(model(x), y).detach())


def test_subnetwork_full_matches_autograd() -> None:
    model = _model("mlp")
    x, y = _data("mlp", "classification", 6)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    indices = torch.tensor([0, 3, 7, 21, 30, 41])
    la = Laplace(
        model,
        "classification",
        subset_of_weights="subnetwork",
        hessian_structure="full",
        subnetwork_indices=indices,
        backend=CurvkitGGN,
    )
    la.fit(loader)
    loss_fn, _ = _loss_and_factor("classification")
    ggn = reference_ggn(model, loss_fn, x, y)
    _close(la.H, ggn[indices][:, indices])


def test_stochastic_diag_is_curvkits_monte_carlo_diagonal() -> None:
    model = _model("mlp")
    x, y = _data("mlp", "classification", 5)
    loss_fn, _ = _loss_and_factor("classification")
    torch.manual_seed(11)
    _, diagonal = CurvkitGGN(model, "classification", stochastic=True).diag(x, y)
    torch.manual_seed(11)
    expected = curvkit.diag_ggn(model, loss_fn, (x, y), mc_samples=1)
    _close(diagonal, torch.cat([d.flatten() for d in expected]))
    exact = reference_ggn(model, loss_fn, x, y).diagonal()
    assert not torch.allclose(diagonal, exact)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_low_rank_laplace_gets_the_top_eigenpairs(likelihood: str) -> None:
    model = _model("mlp")
    x, y = _data("mlp", likelihood, 9)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    la = LowRankLaplace(model, likelihood, backend=CurvkitGGN, backend_kwargs={"low_rank": 3})
    la.fit(loader)
    vectors, values = la.H
    loss_fn, factor = _loss_and_factor(likelihood)
    ggn = factor * reference_ggn(model, loss_fn, x, y)
    evals, evecs = torch.linalg.eigh(ggn)
    _close(values, evals[-3:])
    _close(
        vectors @ torch.diag(values) @ vectors.T,
        evecs[:, -3:] @ torch.diag(evals[-3:]) @ evecs[:, -3:].T,
    )
    _close(la.loss, factor * loss_fn(model(x), y).detach())
    assert torch.isfinite(la.log_marginal_likelihood())


def test_import_curvkit_does_not_import_laplace_and_a_missing_laplace_names_the_extra() -> None:
    code = (
        "import sys, curvkit, curvkit.compat\n"
        "assert 'laplace' not in sys.modules\n"
        "sys.modules['laplace'] = None\n"
        "try:\n"
        "    import curvkit.compat.laplace\n"
        "except ImportError as error:\n"
        "    assert 'curvkit[laplace]' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_laplace_extra_and_ci_remove_torchvision_after_installing() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["laplace"] == ["laplace-torch==0.3"]
    for extra in ("test", "bench"):
        assert {"laplace-torch==0.3", "kronfluence==1.0.1"} <= set(extras[extra])
    script = (root / ".ci" / "run").read_text()
    install = script.index('-e ".[test]"')
    assert script.index("python -m pip uninstall -y torchvision") > install


class _DictModel(nn.Module):
    """A model that takes laplace-torch's dict batch as one positional input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.net = model

    def forward(self, data):
        return self.net(data["features"])


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_dict_batches_give_the_tensor_batches_numbers(structure: str) -> None:
    x, y = _data("mlp", "classification", 6)
    samples = [{"features": x[i], "labels": y[i]} for i in range(6)]
    loader = DataLoader(samples, batch_size=3)
    la = _fit(
        _DictModel(_model("mlp")),
        "classification",
        structure,
        "all",
        CurvkitGGN,
        loader,
        dict_key_x="features",
    )
    ref = _fit(
        _model("mlp"),
        "classification",
        structure,
        "all",
        CurvkitGGN,
        DataLoader(TensorDataset(x, y), batch_size=3),
    )
    _close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    _close(la({"features": x[:2]}, pred_type="glm"), ref(x[:2], pred_type="glm"))
    with pytest.raises(KeyError):
        CurvkitGGN(_DictModel(_model("mlp")), "classification").diag(next(iter(loader)), y[:3])
