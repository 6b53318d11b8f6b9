"""curvkit.laplace where laplace-torch cannot be the reference: independent autograd references.

Low-rank posteriors, dict (Hugging Face style) batches, Embedding/LayerNorm/BatchNorm in
``kron``, the GLM predictive's chunking under ``max_memory``, ``override=False``, Monte-Carlo
curvature, differentiable predictives, no mutation of the model, and the errors on bad input.
"""

from __future__ import annotations

import pytest
import torch
from laplace_models import BATCH_SIZE, assert_close, loader, mlp, query_inputs
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

import curvkit.laplace as ck
from curvkit.engines.memory import MemoryPlanError
from curvkit.laplace.functional import ROW_COPIES, plan_chunks
from curvkit.testing.verify import reference_ggn


def all_batch(data):
    xs, ys = zip(*data, strict=True)
    return torch.cat(xs), torch.cat(ys)


def reference_jacobian(model, x, params):
    """``[B, C, P]`` by :func:`torch.func.jacrev` (an independent reference)."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]

    def f(values):
        return functional_call(model, dict(zip(keys, values, strict=True)), (x,))

    jac = jacrev(f)(tuple(params))
    return torch.cat(
        [j.reshape(x.shape[0], -1, p.numel()) for j, p in zip(jac, params, strict=True)], -1
    )


def test_lowrank_matches_dense_reference():
    """With the rank above the GGN's, the low-rank posterior is the dense one: compare with the
    dense GGN from autograd (reference_ggn), as laplace-torch's LowRankLaplace needs asdfghjkl."""
    data = loader("classification")
    model = mlp()
    la = ck.Laplace(
        model,
        "classification",
        "all",
        "lowrank",
        prior_precision=0.6,
        backend_kwargs={"low_rank": 40},
    )
    la.fit(data)
    x, y = all_batch(data)
    ggn = reference_ggn(model, nn.CrossEntropyLoss(reduction="sum"), x, y)
    precision = ggn + 0.6 * torch.eye(la.n_params, dtype=torch.float64)
    (u, values), _ = la.posterior_precision
    assert_close(u @ torch.diag(values) @ u.T, ggn, rtol=1e-7)
    assert_close(la.log_det_posterior_precision, torch.logdet(precision), rtol=1e-7)
    xq = query_inputs()
    J = reference_jacobian(model, xq, list(model.parameters()))
    expected = torch.einsum("ncp,pq,nkq->nck", J, torch.linalg.inv(precision), J)
    assert_close(la._glm_predictive_distribution(xq)[1], expected, rtol=1e-7)
    # Draws are S z for the sampler's square root S: recover it from more draws than parameters
    # and check S S^T = P^-1 as S^T P S = I.
    n = 2 * la.n_params
    draws = la.sample(n, generator=torch.Generator().manual_seed(0)) - la.mean
    noise = torch.randn(
        la.n_params, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    root = draws.T @ torch.linalg.pinv(noise)
    assert_close(root.T @ precision @ root, torch.eye(la.n_params, dtype=torch.float64), rtol=1e-7)


class DictModel(nn.Module):
    """A model taking one dict, as laplace-torch's Hugging Face examples do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.double()

    def forward(self, data):
        h = self.norm(self.embed(data["input_ids"]))
        mask = data["attention_mask"].unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))


def dict_batches():
    generator = torch.Generator().manual_seed(3)
    out = []
    for size in (4, 3):
        ids = torch.randint(0, 7, (size, 5), generator=generator)
        mask = torch.ones(size, 5, dtype=torch.long)
        mask[:, 3:] = torch.randint(0, 2, (size, 2), generator=generator)
        labels = torch.randint(0, 3, (size,), generator=generator)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


class Unpack(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask})


def test_dict_batches_embedding_layernorm_kron_and_diag():
    model = DictModel()
    batches = dict_batches()
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    ggn = reference_ggn(Unpack(model), nn.CrossEntropyLoss(reduction="sum"), (ids, mask), labels)
    sizes = [p.numel() for p in model.parameters()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    la = ck.Laplace(model, "classification", "all", "kron")
    la.fit(batches)
    for position in range(3):  # embedding weight, LayerNorm weight and bias: exact blocks
        s, e = starts[position], starts[position] + sizes[position]
        (block,) = la.H_facs.kfacs[position]
        assert_close(block, ggn[s:e, s:e], rtol=1e-10)
    diag = ck.Laplace(model, "classification", "all", "diag")
    diag.fit(batches)
    assert_close(diag.H, ggn.diagonal(), rtol=1e-10)
    full = ck.Laplace(model, "classification", "all", "full", prior_precision=0.5)
    full.fit(batches)
    assert_close(full.H, ggn, rtol=1e-10)
    query = {k: v[:3] for k, v in batches[0].items()}
    f_mu, f_var = full._glm_predictive_distribution(query)
    wrapped = Unpack(model)
    names = [n for n, _ in wrapped.named_parameters()]

    def f(values):
        return functional_call(
            wrapped,
            dict(zip(names, values, strict=True)),
            (query["input_ids"], query["attention_mask"]),
        )

    jac = jacrev(f)(tuple(model.parameters()))
    J = torch.cat([j.reshape(3, 3, -1) for j in jac], -1)
    expected = torch.einsum("ncp,pq,nkq->nck", J, full.posterior_covariance, J)
    assert_close(f_var, expected, rtol=1e-9)
    assert_close(f_mu, model(query))


def test_batchnorm_eval_kron_block_and_mode_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[1].running_mean.normal_()
    model.train()
    data = loader("classification")
    la = ck.Laplace(model, "classification", "all", "kron")
    la.fit(data)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    x, y = all_batch(data)
    ggn = reference_ggn(model, nn.CrossEntropyLoss(reduction="sum"), x, y)
    model.train()
    for position, start in [(2, 25), (3, 30)]:
        (block,) = la.H_facs.kfacs[position]
        assert_close(block, ggn[start : start + 5, start : start + 5], rtol=1e-10)


def test_glm_chunks_match_and_plan_fits_budget():
    """A budget forcing one class per chunk gives the same variance; the plan for the issue's
    large case (1000 classes, 10M float32 parameters) stays within 2 GB."""
    la = ck.Laplace(mlp(outputs=3), "classification", "all", "kron", prior_precision=0.5)
    la.fit(loader("classification"))
    x = query_inputs(n=4)
    whole = la._glm_predictive_distribution(x)
    la.max_memory = ROW_COPIES * la.n_params * 8  # one row of one sample per chunk
    chunked = la._glm_predictive_distribution(x)
    assert_close(chunked[1], whole[1], rtol=1e-12)
    la.max_memory = None
    joint = la._glm_predictive_distribution(x, joint=True)[1]
    la.max_memory = ROW_COPIES * la.n_params * 8 * len(x)  # one class of all samples per chunk
    assert_close(la._glm_predictive_distribution(x, joint=True)[1], joint, rtol=1e-12)
    assert_close(joint.reshape(4, 3, 4, 3).diagonal(dim1=0, dim2=2).permute(2, 0, 1), whole[1])
    assert_close(la(x, pred_type="glm", joint=False), ck.Laplace.__call__ and la(x))
    plan = plan_chunks(8, 1000, 10_000_000, 4, 2 * 2**30)
    assert plan.peak_bytes <= 2 * 2**30 and plan.classes >= 1
    with pytest.raises(MemoryPlanError, match="max_memory"):
        plan_chunks(8, 1000, 10_000_000, 4, 2**20)
    la.max_memory = 10
    with pytest.raises(MemoryPlanError):
        la(x)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_override_false_adds_data(structure):
    first = [(x, y) for x, y in loader("regression")][:2]
    second = [(x, y) for x, y in loader("regression")][2:]
    both = ck.Laplace(mlp(), "regression", "all", structure)
    both.fit(DataLoader(TensorDataset(*all_batch(first + second)), batch_size=BATCH_SIZE))
    parts = ck.Laplace(mlp(), "regression", "all", structure)
    parts.fit(DataLoader(TensorDataset(*all_batch(first)), batch_size=BATCH_SIZE))
    parts.fit(DataLoader(TensorDataset(*all_batch(second)), batch_size=BATCH_SIZE), override=False)
    assert parts.n_data == both.n_data
    assert_close(parts.log_marginal_likelihood(), both.log_marginal_likelihood(), rtol=1e-10)


def test_stochastic_curvature_is_close_to_exact():
    data = loader("classification")
    exact = ck.Laplace(mlp(), "classification", "all", "diag")
    exact.fit(data)
    torch.manual_seed(0)
    mc = ck.Laplace(
        mlp(),
        "classification",
        "all",
        "diag",
        backend_kwargs={"stochastic": True, "num_samples": 3000},
    )
    mc.fit(data)
    assert float((mc.H - exact.H).norm() / exact.H.norm()) < 0.05
    for structure in ["kron", "full"]:
        la = ck.Laplace(
            mlp(), "classification", "all", structure, backend_kwargs={"stochastic": True}
        )
        la.fit(data)
        assert torch.isfinite(la.log_marginal_likelihood())


def test_enable_backprop_predictive_is_differentiable_and_equal():
    la = ck.Laplace(mlp(), "regression", "all", "kron", enable_backprop=True)
    la.fit(loader("regression"))
    x = query_inputs().requires_grad_(True)
    f_mu, f_var = la(x)
    (f_var.sum() + f_mu.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    plain = ck.Laplace(mlp(), "regression", "all", "kron")
    plain.fit(loader("regression"))
    mine = plain(x.detach())
    assert_close(f_var.detach(), mine[1], rtol=1e-10)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_model_not_mutated(subset):
    model = mlp()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for m in model.modules()]
    la = ck.Laplace(model, "classification", subset, "kron")
    la.fit(loader("classification"))
    la(query_inputs())
    la(query_inputs(), pred_type="nn", link_approx="mc", n_samples=3)
    la.optimize_prior_precision(n_steps=2)
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not hasattr(model, "output_size")
    after = [(m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    assert [len(a) + len(b) for a, b in after] == [len(a) + len(b) for a, b in hooks]


def test_last_layer_name_and_deferred_prior():
    model = mlp()
    named = ck.Laplace(model, "classification", "last_layer", "diag", last_layer_name="2")
    found = ck.Laplace(
        model,
        "classification",
        "last_layer",
        "diag",
        prior_precision=torch.ones(18, dtype=torch.float64),
    )
    named.fit(loader("classification"))
    found.fit(loader("classification"))
    assert found._last_layer_name == "2" and found.n_params == 18
    assert_close(found.H, named.H)
    with pytest.raises(ValueError, match="linear last layer"):
        ck.Laplace(model, "classification", "last_layer", "diag", last_layer_name="1")


def bad(call, error=ValueError, match=None):
    with pytest.raises(error, match=match):
        call()


def test_bad_inputs_are_refused():
    model = mlp()
    fitted = ck.Laplace(model, "classification", "all", "diag")
    fitted.fit(loader("classification"))
    x = query_inputs()
    bad(lambda: ck.Laplace(model, "poisson", "all", "diag"), match="likelihood")
    bad(
        lambda: ck.Laplace(model, "classification", "all", "diag", sigma_noise=2.0),
        match="regression",
    )
    bad(
        lambda: ck.Laplace(model, "classification", "all", "diag", prior_precision=torch.ones(5)),
        match="align",
    )
    bad(
        lambda: ck.Laplace(model, "classification", "all", "kron", prior_precision=torch.ones(43)),
        match="per-layer",
    )
    bad(lambda: ck.Laplace(model, "classification", "subnetwork", "kron"), match="full or diagonal")
    bad(lambda: ck.Laplace(model, "classification", "all", "gp"), match="function-space")
    bad(lambda: ck.Laplace(model, "classification", "all", "sparse"), match="Unsupported")
    bad(
        lambda: ck.Laplace(model, "classification", "all", "diag", backend="newton"),
        match="backend",
    )
    bad(
        lambda: ck.Laplace(
            model,
            "classification",
            "all",
            "diag",
            backend="ef",
            backend_kwargs={"stochastic": True},
        ),
        match="GGN",
    )
    bad(
        lambda: ck.Laplace(
            nn.Linear(2, 2), "classification", "all", "diag", prior_mean=torch.ones(3)
        ),
        match="prior mean",
    )
    for indices in [torch.tensor([0, 0]), torch.tensor([100]), torch.tensor([0.5]), None]:
        bad(
            lambda indices=indices: ck.Laplace(
                model, "classification", "subnetwork", "diag", subnetwork_indices=indices
            ),
            match="Subnetwork",
        )
    bad(
        lambda: ck.Laplace(model, "classification", "all", "diag").posterior_precision,
        AttributeError,
        "fit",
    )
    bad(
        lambda: ck.Laplace(model, "classification", "all", "kron").log_marginal_likelihood(),
        AttributeError,
        "fit",
    )
    bad(lambda: fitted(x, pred_type="mean"), match="prediction types")
    bad(lambda: fitted(x, link_approx="logit"), match="link approximation")
    bad(lambda: fitted(x, pred_type="nn", link_approx="probit"), match="mc")
    bad(lambda: fitted(x, generator="seed"), match="generator")
    bad(lambda: fitted.log_marginal_likelihood(sigma_noise=torch.tensor(2.0)), match="regression")
    bad(lambda: fitted.functional_variance(torch.ones(2, 3, 5)), match="Jacobians")
    bad(lambda: fitted.optimize_prior_precision(method="gridsearch"), match="validation")
    bad(lambda: fitted.optimize_prior_precision(method="bayes"), match="method")
    regression = ck.Laplace(model, "regression", "all", "diag")
    flat = [(x, y[:, 0]) for x, y in loader("regression")]
    bad(lambda: regression.fit(flat), match="dims")
    bad(lambda: regression.fit([]), match="empty")
    bad(
        lambda: ck.Laplace(DictModel(), "classification", "all", "diag").fit(
            [{"input_ids": torch.zeros(2, 3, dtype=torch.long)}]
        ),
        match="labels",
    )
    bad(
        lambda: ck.Laplace(model, "classification", "all", "full").load_state_dict(
            fitted.state_dict()
        ),
        match="DiagLaplace",
    )
    bad(
        lambda: ck.Laplace(model, "classification", "last_layer", "diag").fit(
            loader("classification"), override=False
        ),
        match="override",
    )
    bad(
        lambda: ck.Laplace(model, "classification", "all", "lowrank").fit(
            loader("classification"), override=False
        ),
        match="updating",
    )
    bad(
        lambda: ck.Laplace(model, "classification", "all", "kron", backend="hessian").fit(
            loader("classification")
        ),
        match="Kronecker",
    )
