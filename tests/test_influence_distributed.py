"""torch.distributed: training data split over two gloo ranks gives the scores of all the data.

Every rank holds the same queries and part of the training examples; the factors sum over the
ranks and the scores of every rank's examples are joined in rank order, on every rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from curvkit.influence import pairwise_scores, self_scores

WORLD = 2
N = 9


def _problem():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 3))
    model = model.to(torch.float64)
    inputs = torch.randn(N + 3, 3, dtype=torch.float64)
    targets = torch.randint(3, (N + 3,))
    return model, (inputs[:N], targets[:N]), (inputs[N:], targets[N:])


def _scores(model: nn.Module, train, query) -> list[torch.Tensor]:
    loss_fn = nn.CrossEntropyLoss()
    out = []
    for curvature in ("ekfac", "ggn"):
        options = {"curvature": curvature, "fisher_type": "empirical"}
        if curvature == "ggn":
            options["damping"] = 0.1
        out.append(pairwise_scores(model, loss_fn, train, query, **options))
        out.append(self_scores(model, loss_fn, train, **options))
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, (inputs, targets), query = _problem()
        # Unequal shares: rank 0 one batch of 3 examples, rank 1 batches of 2 and 4.
        if rank == 0:
            train = (inputs[:3], targets[:3])
        else:
            train = [(inputs[3:5], targets[3:5]), (inputs[5:], targets[5:])]
        torch.save(_scores(model, train, query), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_scores_of_all_the_data(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model, train, query = _problem()
    expected = _scores(model, train, query)
    for rank in range(WORLD):
        actual = torch.load(tmp_path / f"rank{rank}.pt")
        for a, e in zip(actual, expected, strict=True):
            assert a.shape == e.shape
            assert ((a - e).abs().max() / e.abs().max()).item() < 1e-9
