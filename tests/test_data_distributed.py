"""torch.distributed: two gloo ranks with half of the data each give the one-process result.

The linear quantities sum over ranks; the directional ones (eigenpairs, directional derivatives,
damped Newton steps) join the ranks' batches, in rank order, into the one batch of all data.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ggn import ATOL, RTOL, problem
from torch import nn

import curvkit
from curvkit.testing.verify import compare

WORLD = 2
N = 7


def _problem():
    return problem("mlp", "weighted_ce", "mean", N)


def _quantities(model: nn.Module, loss_fn: nn.Module, data) -> list[torch.Tensor]:
    dim = sum(p.numel() for p in model.parameters())
    vector = torch.linspace(-1, 1, dim, dtype=torch.float64)
    operator = curvkit.GGNOperator(model, loss_fn, data)
    groups = [
        {"params": [model[0].weight], "criterion": curvkit.top_k(3), "damping": 0.5},
        {"params": [model[0].bias, *list(model.parameters())[2:]], "criterion": None},
    ]
    eigenpairs = curvkit.ggn_eigh(model, loss_fn, data, groups)
    derivatives = curvkit.directional_derivatives(model, loss_fn, data, groups)
    steps = curvkit.damped_newton_step(model, loss_fn, data, groups)
    return [
        *[t for evals, evecs in eigenpairs for t in (evals, *evecs)],
        *[t for pair in derivatives for t in pair],
        *[t for step in steps for t in step],
        *curvkit.diag_ggn(model, loss_fn, data),
        curvkit.ggn_matrix(model, loss_fn, data),
        curvkit.ggn_vector_product(model, loss_fn, data, vector),
        torch.stack([c for _, c in curvkit.ggn_columns(model, loss_fn, data, chunk_size=16)]),
        operator @ torch.eye(dim, dtype=torch.float64)[:, :5],
    ]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, loss_fn, inputs, targets = _problem()
        # Unequal halves: rank 0 holds one batch of 3 samples, rank 1 a list of batches of 1 and 3.
        if rank == 0:
            data = (inputs[:3], targets[:3])
        else:
            data = [(inputs[3:4], targets[3:4]), (inputs[4:], targets[4:])]
        torch.save(_quantities(model, loss_fn, data), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_sum_to_the_single_process_result(tmp_path: Path):
    init_file = tmp_path / "init"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=True)
    model, loss_fn, inputs, targets = _problem()
    expected = _quantities(model, loss_fn, (inputs, targets))
    for rank in range(WORLD):
        actual = torch.load(tmp_path / f"rank{rank}.pt")
        compare(actual, expected, rtol=RTOL, atol=ATOL).assert_passed()
