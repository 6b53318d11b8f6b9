"""curvkit.laplace against laplace-torch's own results (its default curvlinops backends), float64.

Every structure x subset x likelihood that both can do: the curvature, the loss, the marginal
likelihood, the posterior, the GLM and NN predictives with every link approximation, samples from
the same random state, prior precision shapes, prior optimisation and marglik training.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from laplace_models import assert_close, cnn, loader, mlp, query_inputs

laplace = pytest.importorskip("laplace")
import curvkit.laplace as ck  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

STRUCTURES = ["diag", "kron", "full"]


@pytest.fixture(autouse=True)
def float64_default():
    """laplace-torch's dense curvature multiplies by ``torch.eye`` of the default dtype: with
    float32 its float64 results are only float32-accurate, so compare at float64 defaults."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def fit_both(model, likelihood, subset, structure, data, **kwargs):
    theirs = laplace.Laplace(
        model, likelihood, subset_of_weights=subset, hessian_structure=structure, **kwargs
    )
    ours = ck.Laplace(
        model, likelihood, subset_of_weights=subset, hessian_structure=structure, **kwargs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.fit(data)
    ours.fit(data)
    return theirs, ours


def dense_precision(la):
    precision = la.posterior_precision
    if isinstance(precision, (laplace.utils.matrix.KronDecomposed, ck.KronDecomposed)):
        return precision.to_matrix() if hasattr(precision, "to_matrix") else None
    return precision


def their_kron_precision(la):
    eye = torch.eye(la.n_params, dtype=torch.float64)
    return la.posterior_precision.bmm(eye.unsqueeze(0), exponent=1).squeeze(0)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_fit_and_marglik_match(likelihood, subset, structure):
    kwargs = {"prior_precision": 0.7}
    if likelihood == "regression":
        kwargs["sigma_noise"] = 0.6
    theirs, ours = fit_both(mlp(), likelihood, subset, structure, loader(likelihood), **kwargs)
    assert ours.n_params == theirs.n_params and ours.n_data == theirs.n_data
    assert_close(torch.as_tensor(ours.loss), torch.as_tensor(theirs.loss))
    assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood())
    assert_close(ours.log_det_posterior_precision, theirs.log_det_posterior_precision)
    assert_close(ours.scatter, theirs.scatter)
    assert_close(ours.mean, theirs.mean)
    if structure == "kron":
        for mine, their in zip(ours.H_facs.kfacs, theirs.H_facs.kfacs, strict=True):
            for a, b in zip(mine, their, strict=True):
                assert_close(a, b)
        assert_close(ours.posterior_precision.to_matrix(), their_kron_precision(theirs))
    else:
        assert_close(ours.H, theirs.H)
        assert_close(ours.posterior_precision, theirs.posterior_precision)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_cnn_all_weights_match(structure):
    data = loader("classification", inputs=(2, 4, 4))
    theirs, ours = fit_both(cnn(), "classification", "all", structure, data)
    assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood())
    x = query_inputs((2, 4, 4))
    assert_close(ours(x, link_approx="probit"), theirs(x, link_approx="probit"))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_glm_classification_links_match(subset, structure):
    theirs, ours = fit_both(mlp(), "classification", subset, structure, loader("classification"))
    x = query_inputs()
    for link in ["probit", "bridge", "bridge_norm"]:
        assert_close(ours(x, link_approx=link), theirs(x, link_approx=link))
    f_mu, f_var = theirs._glm_predictive_distribution(x)
    g_mu, g_var = ours._glm_predictive_distribution(x)
    assert_close(g_mu, f_mu)
    assert_close(g_var, f_var)
    for diagonal in [False, True]:
        torch.manual_seed(3)
        expected = theirs(x, link_approx="mc", n_samples=7, diagonal_output=diagonal)
        torch.manual_seed(3)
        actual = ours(x, link_approx="mc", n_samples=7, diagonal_output=diagonal)
        assert_close(actual, expected)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_glm_regression_matches(subset, structure):
    kwargs = {"sigma_noise": 0.5, "prior_precision": 2.0}
    theirs, ours = fit_both(mlp(), "regression", subset, structure, loader("regression"), **kwargs)
    x = query_inputs()
    for options in [{}, {"diagonal_output": True}, {"joint": True}]:
        mine, their = ours(x, **options), theirs(x, **options)
        assert_close(mine[0], their[0])
        assert_close(mine[1], their[1])
    Js, _ = (
        theirs.backend.jacobians(x) if subset == "all" else theirs.backend.last_layer_jacobians(x)
    )
    assert_close(ours.functional_variance(Js), theirs.functional_variance(Js))
    assert_close(ours.functional_covariance(Js), theirs.functional_covariance(Js))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_samples_and_nn_predictive_match(subset, structure):
    theirs, ours = fit_both(mlp(), "classification", subset, structure, loader("classification"))
    mine = ours.sample(5, generator=torch.Generator().manual_seed(4))
    their = theirs.sample(5, generator=torch.Generator().manual_seed(4))
    assert_close(mine, their)
    x = query_inputs()
    torch.manual_seed(5)
    expected = theirs(x, pred_type="nn", link_approx="mc", n_samples=4)
    torch.manual_seed(5)
    actual = ours(x, pred_type="nn", link_approx="mc", n_samples=4)
    assert_close(actual, expected)
    generator = torch.Generator().manual_seed(6)
    expected = theirs.predictive_samples(x, pred_type="glm", n_samples=3, generator=generator)
    generator = torch.Generator().manual_seed(6)
    actual = ours.predictive_samples(x, pred_type="glm", n_samples=3, generator=generator)
    assert_close(actual, expected)


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("prior", ["scalar", "layer", "param"])
def test_prior_precision_shapes_match(structure, prior):
    model = mlp()
    n_params = sum(p.numel() for p in model.parameters())
    values = {
        "scalar": 0.3,
        "layer": torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64),
        "param": torch.linspace(0.1, 2.0, n_params, dtype=torch.float64),
    }[prior]
    theirs, ours = fit_both(
        model, "classification", "all", structure, loader("classification"), prior_precision=values
    )
    assert_close(ours.prior_precision_diag, theirs.prior_precision_diag)
    assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood())
    x = query_inputs()
    assert_close(ours(x), theirs(x))


def test_kron_per_layer_prior_matches():
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    theirs, ours = fit_both(
        mlp(), "classification", "all", "kron", loader("classification"), prior_precision=prior
    )
    assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood())
    assert_close(ours(query_inputs()), theirs(query_inputs()))


def test_kron_damping_is_applied():
    r"""laplace-torch drops ``damping`` when it scales the factors (a defect): compare with the
    damped precision built by hand from the factors, per entry
    :math:`(B + \sqrt{\delta} I) \otimes (A + \sqrt{\delta} I)`."""
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    la = ck.KronLaplace(mlp(), "regression", sigma_noise=0.5, prior_precision=prior, damping=True)
    la.fit(loader("regression"))
    blocks = []
    for entry, delta in zip(la.H_facs.kfacs, prior, strict=True):
        scaled = [f * la._H_factor ** (1 / len(entry)) for f in entry]
        if len(scaled) == 1:
            blocks.append(scaled[0] + delta * torch.eye(len(scaled[0])))
        else:
            b, a = (f + delta.sqrt() * torch.eye(len(f)) for f in scaled)
            blocks.append(torch.kron(b, a))
    expected = torch.block_diag(*blocks)
    assert_close(la.posterior_precision.to_matrix(), expected)
    assert_close(la.log_det_posterior_precision, torch.logdet(expected))


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_subnetwork_matches(structure):
    indices = torch.tensor([0, 3, 7, 20, 31, 40, 42], dtype=torch.long)
    theirs, ours = fit_both(
        mlp(),
        "classification",
        "subnetwork",
        structure,
        loader("classification"),
        subnetwork_indices=indices,
        prior_precision=0.4,
    )
    assert_close(ours.H, theirs.H)
    assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood())
    x = query_inputs()
    assert_close(ours(x), theirs(x))
    generator = torch.Generator().manual_seed(7)
    mine = ours.sample(3, generator=generator)
    generator = torch.Generator().manual_seed(7)
    assert_close(mine, theirs.sample(3, generator=generator))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_empirical_fisher_matches(structure):
    from laplace.curvature import CurvlinopsEF

    for likelihood in ["classification", "regression"]:
        theirs, ours = fit_both(
            mlp(), likelihood, "all", structure, loader(likelihood), backend=CurvlinopsEF
        )
        H = ours.H_facs.to_matrix() if structure == "kron" else ours.H
        expected = theirs.H_facs.to_matrix() if structure == "kron" else theirs.H
        assert_close(H, expected)


def test_full_hessian_matches():
    from laplace.curvature import CurvlinopsHessian

    theirs, ours = fit_both(
        mlp(),
        "classification",
        "all",
        "full",
        loader("classification"),
        backend=CurvlinopsHessian,
        prior_precision=20.0,
    )
    assert_close(ours.H, theirs.H)
    assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood())


def test_frozen_parameters_excluded_match():
    model = mlp()
    model[0].bias.requires_grad_(False)
    for structure in ["diag", "full"]:
        theirs, ours = fit_both(model, "classification", "all", structure, loader("classification"))
        assert (
            ours.n_params
            == theirs.n_params
            == sum(p.numel() for p in model.parameters() if p.requires_grad)
        )
        assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood())
        assert_close(ours(query_inputs()), theirs(query_inputs()))


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_reward_modeling_matches(structure):
    class Reward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
            ).double()

        def forward(self, x):
            out = self.net(x)
            return out.squeeze(-1) if x.ndim == 3 else out

    generator = torch.Generator().manual_seed(8)
    x = torch.randn(10, 2, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=generator)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    theirs, ours = fit_both(Reward(), "reward_modeling", "all", structure, data)
    assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood())
    mine, their = ours(query_inputs()), theirs(query_inputs())
    assert_close(mine[0], their[0])
    assert_close(mine[1], their[1])


def test_optimize_prior_precision_marglik_matches():
    for structure, prior_structure in [("diag", "diag"), ("kron", "layerwise"), ("full", "scalar")]:
        theirs, ours = fit_both(mlp(), "classification", "all", structure, loader("classification"))
        options = {"method": "marglik", "n_steps": 15, "prior_structure": prior_structure}
        theirs.optimize_prior_precision(**options)
        ours.optimize_prior_precision(**options)
        assert_close(ours.prior_precision, theirs.prior_precision, rtol=1e-7)


def test_optimize_prior_precision_gridsearch_matches_with_callable_loss():
    theirs, ours = fit_both(mlp(), "regression", "all", "diag", loader("regression"))

    def loss(means, variances, targets):
        variances = variances.diagonal(dim1=-2, dim2=-1)
        return (0.5 * (means - targets) ** 2 / variances + 0.5 * variances.log()).mean()

    options = {"method": "gridsearch", "val_loader": loader("regression", seed=9), "grid_size": 9}
    theirs.optimize_prior_precision(loss=loss, **options)
    ours.optimize_prior_precision(loss=loss, **options)
    assert_close(ours.prior_precision, theirs.prior_precision.reshape(-1))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_log_marginal_likelihood_gradients(structure):
    """The gradient in the prior precision matches laplace-torch's; the one in the noise is
    checked by central differences (laplace-torch's ``kron`` loses the log-determinant's
    dependence on the noise: its factor scaling goes through ``math.pow``)."""
    theirs, ours = fit_both(mlp(), "regression", "all", structure, loader("regression"))
    grads = []
    for la in (theirs, ours):
        prior = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        noise = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        value = la.log_marginal_likelihood(prior, noise)
        grads.append(torch.autograd.grad(value, [prior, noise]))
    assert_close(grads[1][0], grads[0][0])
    step = 1e-6
    up = ours.log_marginal_likelihood(torch.tensor(0.8), torch.tensor(0.7 + step))
    down = ours.log_marginal_likelihood(torch.tensor(0.8), torch.tensor(0.7 - step))
    assert_close(grads[1][1], ((up - down) / (2 * step)).detach(), rtol=1e-6)


def test_marglik_training_matches():
    from laplace.curvature import CurvlinopsGGN

    results = []
    for module, backend in [(laplace, CurvlinopsGGN), (ck, None)]:
        model = mlp()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la, model, margliks, losses = module.marglik_training(
                model,
                loader("regression"),
                likelihood="regression",
                hessian_structure="diag",
                backend=backend,
                n_epochs=3,
                n_hypersteps=3,
                optimizer_kwargs={"lr": 1e-2},
            )
        results.append((la, model, margliks, losses))
    (la0, m0, ml0, l0), (la1, m1, ml1, l1) = results
    assert_close(torch.tensor(ml1), torch.tensor(ml0))
    assert_close(torch.tensor(l1), torch.tensor(l0))
    assert_close(la1.prior_precision, la0.prior_precision)
    assert_close(la1.sigma_noise, la0.sigma_noise)
    for p, q in zip(m1.parameters(), m0.parameters(), strict=True):
        assert_close(p, q)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_state_dict_round_trip(subset, structure):
    model = mlp()
    la = ck.Laplace(model, "regression", subset, structure, sigma_noise=0.3, prior_precision=2.0)
    la.fit(loader("regression"))
    state = copy.deepcopy(la.state_dict())
    fresh = ck.Laplace(model, "regression", subset, structure)
    fresh.load_state_dict(state)
    assert_close(fresh.log_marginal_likelihood(), la.log_marginal_likelihood())
    x = query_inputs()
    assert_close(fresh(x)[1], la(x)[1])
