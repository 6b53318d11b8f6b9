"""Per-example gradients streamed over the data in chunks of examples, under a memory budget."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from curvkit.core import data as data_utils
from curvkit.core.data import Data
from curvkit.core.model_io import num_input_samples
from curvkit.engines import Factor, iter_factors
from curvkit.engines.memory import MemoryPlan, MemoryPlanError

__all__ = ["ChunkPlan", "example_chunks", "gather_examples"]

#: Copies of one example's gradient a chunk of training examples may hold at once: the
#: gradient, its rotation into an eigenbasis, the preconditioned gradient and the engine's
#: recorded inputs and output gradients.
GRADIENT_COPIES = 4


class ChunkPlan:
    """How many examples' gradients a stage holds at once, from ``max_memory``.

    Half the budget goes to the preconditioned query gradients that pairwise scores keep, the
    other half to a chunk of training examples.

    Args:
        params: The parameters attributed through.
        max_memory: The budget in bytes (``None``: a fraction of the free memory).

    Raises:
        MemoryPlanError: If not even one example fits, with what a stage needs.
    """

    def __init__(self, params: list[Tensor], max_memory: int | None) -> None:
        self.example_bytes = sum(p.numel() for p in params) * params[0].element_size()
        needed = 2 * GRADIENT_COPIES * self.example_bytes
        self.budget = MemoryPlan(max_memory, 0).budget(params[0].device, needed)
        if needed > self.budget:
            raise MemoryPlanError(
                f"one example's gradient over these parameters takes {_gib(self.example_bytes)}; "
                f"scoring holds about {2 * GRADIENT_COPIES} such copies at once "
                f"({_gib(needed)}), over the budget of {_gib(self.budget)} (max_memory). "
                "Pass fewer params or a larger max_memory."
            )
        self.train_chunk = max(1, self.budget // 2 // (GRADIENT_COPIES * self.example_bytes))
        self.query_chunk = max(1, self.budget // 2 // self.example_bytes)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.3g} GiB"


def example_chunks(
    model: nn.Module,
    data: Data,
    params: list[Tensor],
    columns: Callable[[Any], Callable[[Tensor], Tensor]],
    chunk_size: int,
    *,
    progress: bool | None,
    description: str,
) -> Iterator[list[Factor]]:
    """The engine's factors of every chunk of at most ``chunk_size`` examples, in data order.

    Args:
        model: The network.
        data: A batch or an iterable of batches.
        params: The parameters.
        columns: Maps a batch's targets to the engine's column function.
        chunk_size: The most examples per chunk.
        progress: Progress bar switch (:func:`curvkit.core.data.show_progress`).
        description: The bar's label.

    Yields:
        One factor per parameter for each chunk.
    """
    total = data_utils.num_batches(data)
    show = data_utils.show_progress(progress, total)
    for inputs, targets in tqdm(
        data_utils.batches(data), total=total, desc=description, disable=not show, leave=False
    ):
        size = num_input_samples(inputs) or 1
        chunks = iter_factors(
            model,
            inputs,
            params,
            columns(targets),
            sample_chunk_size=chunk_size if chunk_size < size else None,
        )
        for chunk in chunks:
            yield chunk.factors


def gather_examples(scores: Tensor) -> Tensor:
    """Join the ranks' scores along the last axis (training examples), in rank order."""
    world = data_utils.distributed_world()
    if world == 1:
        return scores
    count = torch.tensor([scores.shape[-1]], device=scores.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = scores.new_zeros(*scores.shape[:-1], max(sizes))
    padded[..., : scores.shape[-1]] = scores
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[..., :size] for part, size in zip(parts, sizes, strict=True)], dim=-1)
