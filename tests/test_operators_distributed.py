"""torch.distributed: every operator family on two gloo ranks gives the one-process result.

Each rank holds part of the data (rank 0 one batch of 3 samples, rank 1 a list of batches of 1
and 3); the operators sum their products, factors and corrections over the ranks, so that every
rank holds the operator of all the data. The estimators on such an operator, with the same seed
on every rank, give the one-process estimate. The ranks run once per module; each family is
compared in its own test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ggn import ATOL, RTOL, problem
from torch import nn

import curvkit
from curvkit.randomized import estimators
from curvkit.testing.verify import compare

WORLD = 2
N = 7
FAMILIES = ("ggn", "ef", "hessian", "kfac", "ekfac", "estimators")


def _problem():
    return problem("mlp", "ce", "mean", N)


def _results(model: nn.Module, loss_fn: nn.Module, data) -> dict[str, list[torch.Tensor]]:
    dim = sum(p.numel() for p in model.parameters())
    columns = torch.linspace(-1, 1, dim * 3, dtype=torch.float64).reshape(dim, 3)
    ggn = curvkit.GGNOperator(model, loss_fn, data)
    kfac = curvkit.KFACOperator(model, loss_fn, data, fisher_type="empirical")
    ekfac = curvkit.EKFACOperator(model, loss_fn, data)
    return {
        "ggn": [ggn @ columns, ggn.quadratic_forms(columns)],
        "ef": [curvkit.EFOperator(model, loss_fn, data) @ columns],
        "hessian": [curvkit.HessianOperator(model, loss_fn, data) @ columns],
        "kfac": [
            *[t for block in kfac.factors.values() for t in (block.A, block.B)],
            kfac @ columns,
        ],
        "ekfac": [
            *[v for layer in ekfac.eigenvalues.values() for v in layer.values()],
            ekfac.inverse(0.1) @ columns,
        ],
        "estimators": [
            estimators.hutchinson_trace(ggn, 6, generator=torch.Generator().manual_seed(0)),
            estimators.xdiag(ggn, 8, generator=torch.Generator().manual_seed(1)),
            curvkit.lanczos_top_eigenpairs(
                ggn, 2, generator=torch.Generator().manual_seed(2)
            ).eigenvalues,
        ],
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, loss_fn, inputs, targets = _problem()
        if rank == 0:
            data = (inputs[:3], targets[:3])
        else:
            data = [(inputs[3:4], targets[3:4]), (inputs[4:], targets[4:])]
        torch.save(_results(model, loss_fn, data), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, list[torch.Tensor]]]:
    """Every family's results on each of the two ranks."""
    directory = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(directory / "init"), str(directory)), nprocs=WORLD, join=True)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def one_process() -> dict[str, list[torch.Tensor]]:
    model, loss_fn, inputs, targets = _problem()
    return _results(model, loss_fn, (inputs, targets))


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_give_the_one_process_operator(ranks, one_process, family):
    assert all(t.abs().max() > 0 for t in one_process[family])
    for results in ranks:
        compare(results[family], one_process[family], rtol=RTOL, atol=ATOL).assert_passed()
