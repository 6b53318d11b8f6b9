r"""The memory plan: estimates from shapes, chunk sizes under a budget, refusals before allocating.

Every quantity that pushes the loss Hessian's square root back through the network holds, per
column, the backpropagated column at the output of every recorded module call (the factors'
:math:`b`) plus the transient gradients of the backward pass. With :math:`K` columns (the
entries of one sample's output for an exact square root, ``mc_samples`` for a Monte-Carlo one)
and :math:`R` recorded output entries for the batch (all calls, all samples), the engine's peak
is estimated as

.. math::

    \text{bytes} \approx K \cdot 2 R \cdot \text{itemsize},

and its time as about :math:`K` gradients (one backward pass per column, and the factor
arithmetic). :class:`MemoryPlan` turns this into decisions, before anything of that size is
allocated:

- sums over columns (the diagonal, the dense GGN) run in chunks of columns that fit the budget
  (:meth:`MemoryPlan.column_chunk_size`), with a progress bar on calls longer than
  :data:`PROGRESS_DELAY` seconds (:func:`progress_bar`);
- quantities that need all columns at once (Gram matrices, cached factors) are refused when they
  do not fit;
- exact work beyond :data:`MAX_GRADIENTS` gradients is refused outright
  (:meth:`MemoryPlan.check_columns`): an exact cross-entropy over a language model's
  vocabulary :math:`V` at :math:`T` positions has :math:`V T` columns per sequence, about a
  million. The error states the estimate and the Monte-Carlo alternative (``mc_samples=1``:
  one column per sequence, all positions at once).

The budget is ``max_memory`` bytes, by default :data:`DEFAULT_MEMORY_FRACTION` of the memory
available on the outputs' device when the call starts (:func:`available_memory`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from curvkit.core import data as data_utils
from curvkit.core.validation import check_bytes

__all__ = [
    "DEFAULT_MEMORY_FRACTION",
    "MAX_GRADIENTS",
    "PROGRESS_DELAY",
    "ColumnSlices",
    "MemoryPlan",
    "MemoryPlanError",
    "available_memory",
    "progress_bar",
]

#: The default budget: this fraction of the memory available when a call starts.
DEFAULT_MEMORY_FRACTION = 0.5

#: Exact work is refused beyond this many gradients' worth of time (columns per sample); change
#: ``curvkit.engines.memory.MAX_GRADIENTS`` to allow more.
MAX_GRADIENTS = 10_000

#: Seconds after which a call that runs in chunks shows a progress bar (``progress=None``).
PROGRESS_DELAY = 3.0

#: Where the available memory cannot be read: assume this many bytes.
FALLBACK_AVAILABLE = 8 * 2**30

_Item = TypeVar("_Item")


class ColumnSlices:
    """Exact square-root columns, built a slice at a time.

    :func:`~curvkit.engines.iter_factors` indexes them as ``columns[column_slice, sample_slice]``.

    Args:
        build: Maps a slice of columns to those columns for the whole batch,
            ``[len, *outputs.shape]`` (:func:`curvkit.losses.hessian_sqrt` with ``columns=``).
        num_columns: :math:`K`.
        outputs: The batch's outputs.
    """

    def __init__(self, build: Callable[[slice], Tensor], num_columns: int, outputs: Tensor) -> None:
        self.build = build
        self.shape = torch.Size([num_columns, *outputs.shape])

    def __getitem__(self, index: tuple[slice, slice]) -> Tensor:
        columns, samples = index
        return self.build(columns)[:, samples]


class MemoryPlanError(ValueError):
    """Work that does not fit the memory budget or time limit, refused before it is allocated."""


def available_memory(device: torch.device) -> int:
    """Bytes available on ``device`` now: free CUDA memory, or ``MemAvailable`` on Linux CPUs.

    Args:
        device: The device the quantity computes on.

    Returns:
        The available bytes, or :data:`FALLBACK_AVAILABLE` where the system does not say.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    free = _free_memory()
    return FALLBACK_AVAILABLE if free is None else free


def _free_memory() -> int | None:
    """Free bytes of physical memory (without the page cache), or ``None`` if not known."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.3g} GiB"


class MemoryPlan:
    """The memory budget of one call and the decisions made from it.

    Args:
        max_memory: Budget in bytes; ``None`` for :data:`DEFAULT_MEMORY_FRACTION` of
            :func:`available_memory` on the device of the first outputs planned for.
        mc_samples: The call's Monte-Carlo samples (``0``: exact), for the messages.

    Raises:
        TypeError: If ``max_memory`` is not a positive int or ``None``.
        ValueError: If it is not positive.
    """

    def __init__(self, max_memory: int | None, mc_samples: int) -> None:
        self.max_memory = check_bytes(max_memory)
        self.mc_samples = mc_samples

    def budget(self, device: torch.device, needed: int | None = None) -> int:
        """The budget in bytes for work on ``device``.

        With ``needed``, a CPU budget from the free memory alone (one system call) is returned
        when it already covers ``needed`` bytes: reading ``MemAvailable``, which also counts the
        reclaimable page cache, takes 0.2 ms, a twentieth of a small model's quantity.
        """
        if self.max_memory is not None:
            return self.max_memory
        if needed is not None and device.type == "cpu":
            free = _free_memory()
            if free is not None and DEFAULT_MEMORY_FRACTION * free >= needed:
                return int(DEFAULT_MEMORY_FRACTION * free)
        return int(DEFAULT_MEMORY_FRACTION * available_memory(device))

    def _refuse(self, what: str, num_columns: int, num_bytes: float, budget: int | None) -> None:
        if budget is None:
            limit = f", over the limit of curvkit.engines.memory.MAX_GRADIENTS = {MAX_GRADIENTS}"
            remedy = "or raise curvkit.engines.memory.MAX_GRADIENTS if you mean it"
        else:
            limit = f", over the budget of {_gib(budget)} (max_memory)"
            remedy = "or pass smaller batches (sample_chunk_size) or a larger max_memory"
        alternative = (
            "Use mc_samples=1 (one Monte-Carlo column per sample, all outputs at once: an "
            "unbiased estimate at about one gradient's cost)"
            if self.mc_samples == 0
            else "Use fewer mc_samples"
        )
        raise MemoryPlanError(
            f"{what} needs {num_columns} columns per sample: about {_gib(num_bytes)} and "
            f"{num_columns} gradients' worth of time{limit}. {alternative}, {remedy}."
        )

    def check_columns(self, outputs: Tensor, num_columns: int, *, whole: bool) -> None:
        """Refuse ``num_columns`` columns per sample before they are built.

        Args:
            outputs: The batch's outputs (their shape, dtype and device are read).
            num_columns: :math:`K`, the square root's columns per sample.
            whole: Whether the ``[K, *outputs.shape]`` columns are built at once (else a slice
                at a time).

        Raises:
            MemoryPlanError: If :math:`K` exceeds :data:`MAX_GRADIENTS`, or the columns built at
                once exceed the budget.
        """
        num_bytes = num_columns * outputs.numel() * outputs.element_size()
        if num_columns > MAX_GRADIENTS:
            self._refuse("The exact loss Hessian", num_columns, num_bytes, None)
        if not whole:
            return
        budget = self.budget(outputs.device, num_bytes)
        if num_bytes > budget:
            self._refuse("The loss Hessian's square root", num_columns, num_bytes, budget)

    def column_chunk_size(
        self, num_columns: int, bytes_per_column: int, device: torch.device, *, whole: bool
    ) -> int:
        """Columns per backward pass so that the engine's estimated peak fits the budget.

        Args:
            num_columns: :math:`K`.
            bytes_per_column: The engine's bytes per column: twice the recorded outputs.
            device: The device the engine computes on.
            whole: Whether all columns are needed at once (a Gram matrix, cached factors).

        Returns:
            The chunk size, ``num_columns`` if everything fits.

        Raises:
            MemoryPlanError: If not even one column fits, or ``whole`` and not all of them.
        """
        budget = self.budget(device, num_columns * bytes_per_column)
        fitting = budget // max(bytes_per_column, 1)
        if fitting >= num_columns:
            return num_columns
        if whole or fitting < 1:
            what = "This quantity (all columns at once)" if whole else "One column"
            self._refuse(what, num_columns, num_columns * bytes_per_column, budget)
        return int(fitting)


def progress_bar(
    items: Iterable[_Item], progress: bool | None, description: str
) -> Iterator[_Item]:
    """``items`` with a progress bar for one call's chunks.

    Always for ``progress=True``, never for ``False``, and for ``None`` once the loop has run
    :data:`PROGRESS_DELAY` seconds; on rank 0 only, as :func:`curvkit.core.data.show_progress`
    decides.

    Args:
        items: The chunks of one call.
        progress: The call's ``progress`` option.
        description: The bar's label.

    Yields:
        The items.
    """
    show = progress is not False and data_utils.show_progress(True, None)
    delay = 0.0 if progress else PROGRESS_DELAY
    yield from tqdm(items, desc=description, disable=not show, delay=delay, leave=False)
