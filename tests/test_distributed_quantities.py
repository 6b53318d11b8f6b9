"""torch.distributed for the first-order and Hessian quantities: two gloo ranks, one result.

Rank 0 holds one batch of 3 samples, rank 1 a list of batches of 1 and 3, with a class-weighted
cross-entropy that ignores a class: sums over ranks must give the one-process quantity of all 7
samples; per-sample quantities give each rank the rows of its own samples at the data's scale.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import curvkit

WORLD = 2
RTOL, ATOL = 1e-10, 1e-13


def _problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=1)
    inputs = torch.randn(7, 4, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    return model, loss_fn, inputs, targets


def _first_order(model: nn.Module, loss_fn: nn.Module, data) -> dict[str, list[Tensor]]:
    dim = sum(p.numel() for p in model.parameters())
    return {
        "diag_ef": curvkit.diag_ef(model, loss_fn, data),
        "EFOperator": [curvkit.EFOperator(model, loss_fn, data) @ torch.eye(dim)[:, :4].double()],
        "gradient_variance": curvkit.gradient_variance(model, loss_fn, data),
        "batch_gradients": curvkit.batch_gradients(model, loss_fn, data),
        "batch_l2_norms": curvkit.batch_l2_norms(model, loss_fn, data),
    }


def _hessian(model: nn.Module, loss_fn: nn.Module, data) -> dict[str, list[Tensor]]:
    dim = sum(p.numel() for p in model.parameters())
    vector = torch.linspace(-1, 1, dim, dtype=torch.float64)
    return {
        "hessian_matrix": [curvkit.hessian_matrix(model, loss_fn, data)],
        "hessian_vector_product": [curvkit.hessian_vector_product(model, loss_fn, data, vector)],
        "diag_hessian": curvkit.diag_hessian(model, loss_fn, data),
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
        results = _first_order(model, loss_fn, data) | _hessian(model, loss_fn, data)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, list[Tensor]]]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


PER_SAMPLE = ("batch_gradients", "batch_l2_norms")
ROWS = (slice(0, 3), slice(3, 7))


def _check(ranks: list[dict[str, list[Tensor]]], expected: dict[str, list[Tensor]]) -> None:
    for rank, results in enumerate(ranks):
        assert results.keys() == expected.keys()
        for name, wanted in expected.items():
            for actual, whole in zip(results[name], wanted, strict=True):
                want = whole[ROWS[rank]] if name in PER_SAMPLE else whole
                assert want.abs().max() > 0, name
                torch.testing.assert_close(actual, want, rtol=RTOL, atol=ATOL, msg=name)


def test_first_order_quantities_over_two_ranks(ranks):
    model, loss_fn, inputs, targets = _problem()
    expected = _first_order(model, loss_fn, (inputs, targets))
    _check([{k: r[k] for k in expected} for r in ranks], expected)


def test_hessian_quantities_over_two_ranks(ranks):
    model, loss_fn, inputs, targets = _problem()
    expected = _hessian(model, loss_fn, (inputs, targets))
    _check([{k: r[k] for k in expected} for r in ranks], expected)
