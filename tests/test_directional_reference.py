"""Plain-autograd reference for GGN eigenpairs, directional derivatives and damped Newton steps.

Dense, per-sample, and independent of curvkit's engines and Gram-space math: per-sample Jacobians
by autograd, the output Hessians from :mod:`curvkit.testing.verify` (or given square-root columns
for Monte-Carlo), the dense GGN, its eigendecomposition, then the formulas of ViViT's conventions:
gamma_{n,k} = N grad L_n^T e_k, lambda_{n,k} = N e_k^T G(L_n) e_k, and
s = -sum_k mean_n gamma_{n,k} / (mean_n lambda_{n,k} + delta_k) e_k.
This file also holds the shared test problems and comparison helpers, and tests the reference.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from curvkit.testing import verify

RTOL = 1e-8


def mlp(sizes: Sequence[int], seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def problem(loss: str, reduction: str, n: int, seed: int = 0, sizes=(4, 3, 3)):
    """A tiny model, loss and batch."""
    model = mlp(sizes, seed)
    torch.manual_seed(seed + 100)
    inputs = torch.randn(n, sizes[0], dtype=torch.float64)
    if loss == "mse":
        loss_fn = nn.MSELoss(reduction=reduction)
        targets = torch.randn(n, sizes[-1], dtype=torch.float64)
    else:
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        targets = torch.randint(0, sizes[-1], (n,))
    return model, loss_fn, inputs, targets


def jacobians(model: nn.Module, inputs: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Per-sample Jacobians of the outputs w.r.t. the flattened params, ``[N, C, D]``."""
    rows = []
    for n in range(inputs.shape[0]):
        out = model(inputs[n : n + 1]).flatten()
        sample = []
        for c in range(out.numel()):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            sample.append(
                torch.cat(
                    [
                        torch.zeros_like(p).flatten() if g is None else g.flatten()
                        for g, p in zip(grads, params, strict=True)
                    ]
                )
            )
        rows.append(torch.stack(sample))
    return torch.stack(rows)


@dataclass
class Reference:
    evals: Tensor  # [K]
    evecs: Tensor  # [D, K]
    gammas: Tensor  # [N_grad, K]
    lambdas: Tensor  # [N_ggn, K]
    step: Tensor  # [D]
    gram_evals: Tensor  # all Gram-size eigenvalues, ascending


def reference(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    params: Sequence[Tensor],
    criterion: Callable[[Tensor], Sequence[int]],
    *,
    num_sqrt_columns: int,
    damping: float | Callable = 1.0,
    sqrt_columns: Tensor | None = None,
    subsampling_grad: Sequence[int] | None = None,
    subsampling_ggn: Sequence[int] | None = None,
) -> Reference:
    """The reference for one group. ``sqrt_columns`` ``[M, N, C]`` replaces the exact Hessian."""
    params = list(params)
    n_total = inputs.shape[0]
    ggn_idx = list(range(n_total)) if subsampling_ggn is None else list(subsampling_ggn)
    grad_idx = list(range(n_total)) if subsampling_grad is None else list(subsampling_grad)
    jac = jacobians(model, inputs, params)  # [N, C, D]
    outputs = model(inputs).detach()
    if sqrt_columns is None:
        hessians = verify.reference_output_hessian(loss_fn, outputs, targets)  # [N, C, C]
    else:
        hessians = torch.einsum("knc,knd->ncd", sqrt_columns, sqrt_columns)
    per_sample_ggn = torch.einsum("nci,ncd,ndj->nij", jac, hessians, jac)
    leaf = outputs.clone().requires_grad_(True)
    (out_grad,) = torch.autograd.grad(loss_fn(leaf, targets), leaf)
    per_sample_grad = torch.einsum("nc,ncd->nd", out_grad, jac)

    ggn = n_total / len(ggn_idx) * per_sample_ggn[ggn_idx].sum(0)
    evals, evecs = torch.linalg.eigh(ggn)
    dim = ggn.shape[0]
    gram_size = num_sqrt_columns * len(ggn_idx)
    # The Gram matrix shares the GGN's largest eigenvalues; the rest of either is zero.
    if gram_size <= dim:
        gram_evals = evals[dim - gram_size :]
    else:
        gram_evals = torch.cat([evals.new_zeros(gram_size - dim), evals])
    keep = [i - gram_size + dim for i in criterion(gram_evals)]
    assert all(0 <= i < dim for i in keep), "reference cannot map the selection"
    evals, evecs = evals[keep], evecs[:, keep]

    gammas = n_total * per_sample_grad[grad_idx] @ evecs
    lambdas = n_total * torch.einsum("dk,nde,ek->nk", evecs, per_sample_ggn[ggn_idx], evecs)
    if callable(damping):
        delta = damping(evals, None, gammas, lambdas)
    else:
        delta = torch.full_like(evals, damping)
    coefficients = -gammas.mean(0) / (lambdas.mean(0) + delta)
    return Reference(evals, evecs, gammas, lambdas, evecs @ coefficients, gram_evals)


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.flatten() for t in tensors])


def flat_evecs(evecs: Sequence[Tensor]) -> Tensor:
    """``[K, *p.shape]`` per parameter -> ``[D, K]``."""
    return torch.cat([e.flatten(start_dim=1) for e in evecs], dim=1).T


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    scale = expected.abs().max() if expected.numel() else torch.tensor(0.0)
    error = (actual - expected).abs().max() if expected.numel() else torch.tensor(0.0)
    assert error <= rtol * max(float(scale), 1e-300), (
        f"{what}: max abs error {float(error):.3e}, relative {float(error / scale):.3e}"
    )


def signs(evecs: Tensor, ref_evecs: Tensor) -> Tensor:
    """Per-direction signs aligning ``evecs`` [D, K] with ``ref_evecs``."""
    return torch.sign((evecs * ref_evecs).sum(0))


def test_reference_means_are_batch_quantities():
    """mean_n gamma = g^T e_k and mean_n lambda = lambda_k, for mean and sum reductions."""
    for reduction in ("mean", "sum"):
        model, loss_fn, inputs, targets = problem("ce", reduction, 5)
        params = list(model.parameters())
        ref = reference(
            model,
            loss_fn,
            inputs,
            targets,
            params,
            lambda e: [len(e) - 2, len(e) - 1],
            num_sqrt_columns=3,
        )
        grad = flat(torch.autograd.grad(loss_fn(model(inputs), targets), params))
        assert_close(ref.gammas.mean(0), grad @ ref.evecs, what="mean gammas")
        assert_close(ref.lambdas.mean(0), ref.evals, what="mean lambdas")
        ggn = verify.reference_ggn(model, loss_fn, inputs, targets, params)
        assert_close(ggn @ ref.evecs, ref.evecs * ref.evals, what="eigenpairs")


def test_reference_step_is_damped_newton_in_eigenspace():
    model, loss_fn, inputs, targets = problem("mse", "mean", 3)
    params = list(model.parameters())
    ref = reference(
        model,
        loss_fn,
        inputs,
        targets,
        params,
        lambda e: list(range(len(e) - 3, len(e))),
        num_sqrt_columns=3,
        damping=0.5,
    )
    ggn = verify.reference_ggn(model, loss_fn, inputs, targets, params)
    grad = flat(torch.autograd.grad(loss_fn(model(inputs), targets), params))
    projector = ref.evecs @ ref.evecs.T
    damped = projector @ ggn @ projector + 0.5 * projector
    # The step solves the damped Newton system inside the eigenspace.
    assert_close(damped @ ref.step, -projector @ grad, what="Newton system")


@pytest.mark.parametrize("n", [1, 3])
def test_reference_jacobians_give_the_dense_ggn(n):
    model, loss_fn, inputs, targets = problem("ce", "sum", n)
    params = list(model.parameters())
    jac = jacobians(model, inputs, params)
    hess = verify.reference_output_hessian(loss_fn, model(inputs).detach(), targets)
    ggn = torch.einsum("nci,ncd,ndj->ij", jac, hess, jac)
    assert_close(ggn, verify.reference_ggn(model, loss_fn, inputs, targets, params), 1e-12)
