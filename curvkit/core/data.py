r"""Data handling shared by the curvature quantities: batches, datasets, ranks, progress.

A quantity's ``data`` argument is either one batch ``(inputs, targets)`` (``inputs`` a tensor, a
tuple of tensors or a dict of keyword inputs, :mod:`curvkit.core.model_io`; ``targets`` a tensor)
or any iterable of such batches, such as a :class:`torch.utils.data.DataLoader`. A batch may also
be a dict holding the targets under ``"labels"`` (what a Hugging Face tokenizer and data collator
produce): its other entries are the keyword inputs. For an iterable, a quantity is the curvature of
the whole dataset's loss, the loss of one batch made of all the data. For a loss that sums over
samples (``reduction="sum"``) that is :math:`L = \sum_b L_b`. For a loss that averages, with
:math:`Z_b` the normalization of batch :math:`b` (:func:`curvkit.losses.normalization`: the
factor that turns the reduced batch loss :math:`L_b` into the plain sum of its per-sample terms),

.. math::

    L = \frac{\sum_b Z_b L_b}{\sum_b Z_b},
    \qquad
    Q(L) = \frac{\sum_b Z_b\, Q(L_b)}{\sum_b Z_b}

for every quantity :math:`Q` that is linear in the loss (GGN diagonal, products, columns, dense
matrix), batches of unequal size and weighted cross-entropy alike. When a
:mod:`torch.distributed` process group is initialised, the sums over batches run over the
batches of every rank (the quantities and normalizations are summed with ``all_reduce`` before
dividing), so that each rank gets the quantity of all ranks' data.

The helpers here are written for any quantity computed batch by batch:
:func:`dataset_average` does the loop, the weighting, the all-reduce and the progress bar; its
cost is one pass over the data and one ``all_reduce`` of the quantity per call.

Quantities that are not linear in the loss (the GGN's eigenpairs, directional derivatives, damped
Newton steps: :mod:`curvkit.quantities.directional`) take the same dataset loss through
:func:`concatenate`: every batch of every rank joined into one batch, which each rank then
processes whole. That is exact, but its memory and time grow with the total number of samples on
every rank (an ``all_gather`` of the data, no speed-up from more ranks): meant for the few
thousand samples a Gram matrix can hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from curvkit import losses
from curvkit.core.model_io import Inputs, input_tensors
from curvkit.ops.linalg import all_finite

__all__ = [
    "Batch",
    "Data",
    "Inputs",
    "all_reduce_sum_",
    "batches",
    "check_batch",
    "concatenate",
    "dataset_average",
    "distributed_world",
    "is_batch",
    "num_batches",
    "show_progress",
]

#: The key under which a dict batch holds its targets (Hugging Face's convention).
LABELS_KEY = "labels"

Batch: TypeAlias = tuple[Inputs, Tensor]
Data: TypeAlias = Batch | Iterable[Batch]

#: With ``progress=None``, a progress bar is shown for loops over at least this many batches.
AUTO_PROGRESS_MIN_BATCHES = 20


def is_batch(data: Any) -> bool:
    """Return whether ``data`` is one batch ``(inputs, targets)`` rather than a collection of them.

    A batch is a tuple or list of length two whose second entry is a tensor and whose first entry
    is a tensor, a tuple (or list, as a DataLoader collates tuples) of tensors or a dict of
    keyword inputs; or a dict of tensors holding the targets under ``"labels"``. A pair whose
    first entry is a tensor is taken for a batch whatever its second entry (a collection of
    batches never starts with a tensor), so that :func:`check_batch` can say what is wrong with
    its targets.
    """
    if _is_labelled_dict(data):
        return True
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        return False
    inputs, targets = data
    return isinstance(inputs, Tensor) or (isinstance(targets, Tensor) and _is_inputs(inputs))


def _is_labelled_dict(data: Any) -> bool:
    return (
        isinstance(data, Mapping)
        and isinstance(data.get(LABELS_KEY), Tensor)
        and all(isinstance(key, str) for key in data)
    )


def _is_inputs(inputs: Any) -> bool:
    if isinstance(inputs, Tensor):
        return True
    if isinstance(inputs, Mapping):
        return len(inputs) > 0 and all(isinstance(key, str) for key in inputs)
    return (
        isinstance(inputs, (tuple, list))
        and len(inputs) > 0
        and all(isinstance(x, Tensor) for x in inputs)
    )


def check_batch(batch: Any, position: int | None = None) -> Batch:
    """Check one batch ``(inputs, targets)`` and return it with list inputs made a tuple.

    Args:
        batch: The batch to check.
        position: Its position in the data, for the error message; ``None`` for lone batches.

    Returns:
        ``(inputs, targets)``.

    Raises:
        TypeError: If ``batch`` is not a pair of inputs (a tensor or a tuple of tensors) and a
            targets tensor.
        ValueError: If it holds no sample, or NaN or inf in floating inputs or targets.
    """
    where = "data" if position is None else f"batch {position} of data"
    if _is_labelled_dict(batch):
        inputs = {k: v for k, v in batch.items() if k != LABELS_KEY}
        return _check_values(inputs, batch[LABELS_KEY], where)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"{where} must be a pair (inputs, targets), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "; pass one batch (inputs, targets) or an iterable of such batches"
        )
    inputs, targets = batch
    if not _is_inputs(inputs):
        raise TypeError(
            f"inputs of {where} must be a tensor, a non-empty tuple of tensors or a dict of "
            f"keyword inputs, got {type(inputs).__name__}"
        )
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"targets of {where} must be a tensor, got {type(targets).__name__}; pass "
            "`torch.as_tensor(targets)`"
        )
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    return _check_values(inputs, targets, where)


def _check_values(inputs: Inputs, targets: Tensor, where: str) -> Batch:
    """Refuse a batch without samples, or with NaN or inf, before any work on it."""
    named = [(f"input {i}", t) for i, t in enumerate(input_tensors(inputs))]
    named.append(("targets", targets))
    if any(t.dim() > 0 and t.shape[0] == 0 for _, t in named):
        raise ValueError(f"{where} holds no sample (a tensor with 0 rows); pass a non-empty batch")
    for name, t in named:
        if t.is_floating_point() and not all_finite(t):
            raise ValueError(
                f"{name} of {where} holds NaN or inf, so the loss and its curvature are not "
                "finite; clean the data first"
            )
    return inputs, targets


def num_batches(data: Data) -> int | None:
    """Return the number of batches in ``data``, or ``None`` when it has no length."""
    if is_batch(data):
        return 1
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def batches(data: Data, *, passes: int = 1) -> Iterator[Batch]:
    """Iterate over the batches of ``data``, checking each one.

    Args:
        data: One batch ``(inputs, targets)`` or an iterable of batches.
        passes: How many times the caller will iterate over ``data``. For more than one pass, a
            one-shot iterator (such as a generator) is refused, since its second pass would be
            silently empty.

    Yields:
        The batches ``(inputs, targets)``; list inputs are turned into tuples.

    Raises:
        TypeError: If ``data`` is not a batch or an iterable of batches, or is a one-shot
            iterator while ``passes > 1``.
        ValueError: If ``data`` holds no batch.
    """
    if is_batch(data):
        yield check_batch(data, None)
        return
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be one batch (inputs, targets) or an iterable of such batches "
            f"(a list, a DataLoader), got {type(data).__name__}"
        )
    if passes > 1 and isinstance(data, Iterator):
        raise TypeError(
            "this computation iterates over data several times, but data is a one-shot iterator "
            f"({type(data).__name__}); pass a list of batches or a DataLoader instead"
        )
    empty = True
    for position, batch in enumerate(data):
        empty = False
        yield check_batch(batch, position)
    if empty:
        raise ValueError("data holds no batch; pass at least one batch (inputs, targets)")


def concatenate(data: Data) -> Batch:
    """Join every batch of ``data``, and of every rank's data, into one batch.

    The loss of the joined batch is the dataset's loss (:func:`dataset_average`): a ``mean``
    averages over all samples, with the normalization of all targets. Ranks contribute their
    batches in rank order; each rank returns the same joined batch, on its own device.

    Args:
        data: One batch ``(inputs, targets)`` or an iterable of batches.

    Returns:
        ``(inputs, targets)``.

    Raises:
        TypeError: For data that is not a batch or an iterable of batches, or batches whose
            inputs do not have the same structure.
        ValueError: If ``data`` holds no batch.
    """
    parts = list(batches(data))
    if distributed_world() > 1:
        device = parts[0][1].device
        local = [(_to(inputs, "cpu"), targets.cpu()) for inputs, targets in parts]
        gathered: list[Any] = [None] * distributed_world()
        dist.all_gather_object(gathered, local)
        parts = [
            (_to(inputs, device), targets.to(device))
            for rank in gathered
            for inputs, targets in rank
        ]
    if len(parts) == 1:
        return parts[0]
    targets = torch.cat([t for _, t in parts])
    leaves = [pytree.tree_flatten(inputs) for inputs, _ in parts]
    if any(spec != leaves[0][1] for _, spec in leaves):
        raise TypeError(
            "the batches' inputs differ in structure (a tensor in one, a tuple in another, "
            "tuples of different lengths, dicts with other keys), so they cannot be joined "
            "into one batch"
        )
    joined = [
        torch.cat(column) if isinstance(column[0], Tensor) else column[0]
        for column in zip(*(values for values, _ in leaves), strict=True)
    ]
    return pytree.tree_unflatten(joined, leaves[0][1]), targets


def _to(inputs: Inputs, device: torch.device | str) -> Inputs:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, inputs)


def fingerprint(inputs: Inputs, targets: Tensor) -> Tensor:
    """A cheap summary of a batch that changes when its data does: sums and sums of squares.

    Returns:
        ``[2 * (number of tensors)]`` in float64 on the CPU.
    """
    with torch.no_grad():
        sums = [
            torch.stack([t.double().sum(), t.double().square().sum()]).cpu()
            for t in [*input_tensors(inputs), targets]
        ]
    return torch.cat(sums)


def distributed_world() -> int:
    """Return the number of ranks of the default process group, 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` in place across the ranks of the default process group, if there is one.

    All tensors travel in one flat buffer per dtype and device, so a call costs one collective per
    dtype/device pair. Every rank must call this with tensors of the same shapes, in the same order.
    """
    if distributed_world() == 1 or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        buffer = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        for tensor, chunk in zip(group, buffer.split([t.numel() for t in group]), strict=True):
            tensor.copy_(chunk.view_as(tensor))


def show_progress(progress: bool | None, total: int | None) -> bool:
    """Decide whether to show a progress bar.

    Args:
        progress: The user's switch: ``True``, ``False`` or ``None`` for automatic (a bar for
            loops of at least :data:`AUTO_PROGRESS_MIN_BATCHES` steps, only on rank 0).
        total: The number of steps of the loop, ``None`` when unknown.

    Returns:
        Whether to show the bar.

    Raises:
        TypeError: If ``progress`` is not a bool or ``None``.
    """
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if distributed_world() > 1 and dist.get_rank() != 0:
        return False
    if progress is None:
        return total is not None and total >= AUTO_PROGRESS_MIN_BATCHES
    return progress


BatchQuantity: TypeAlias = Callable[[Inputs, Tensor], tuple[Tensor, list[Tensor]]]


def dataset_average(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Data,
    batch_quantity: BatchQuantity,
    *,
    progress: bool | None = None,
    description: str = "batches",
    passes: int = 1,
    powers: Sequence[int] | None = None,
    concatenate: bool = False,
) -> list[Tensor]:
    r"""Compute a quantity of the whole dataset's loss from its batches, across ranks.

    For one batch and no process group, this is ``batch_quantity(inputs, targets)``'s list.
    Otherwise, entry :math:`i` is :math:`\sum_b Z_b^{p_i} Q_{b,i} / Z^{p_i}` with :math:`Z_b`
    from :func:`curvkit.losses.normalization`, :math:`Z = \sum_b Z_b` for a loss that averages
    over samples and :math:`Z = 1` for one that sums (:func:`curvkit.losses.sample_reduction`),
    the sums running over the batches of every rank: the quantity of the loss of one batch made
    of all the data. The power :math:`p_i` is 1 for a quantity linear in the loss (GGN,
    gradient), 2 for one quadratic in it (the empirical Fisher, squared gradients), 0 for a
    count. With ``concatenate``, the per-sample results :math:`Z_b^{p_i} Q_{b,i} / Z^{p_i}` of
    this rank's batches are joined along the first axis instead of summed (one row per sample
    of every batch, in order).

    Args:
        loss_fn: The loss, as passed to the quantity.
        data: One batch or an iterable of batches.
        batch_quantity: Maps a batch ``(inputs, targets)`` to ``(outputs, quantity)``: the model's
            outputs on the batch (to compute its normalization) and a list of tensors, the
            quantity for the batch's loss alone.
        progress: Progress bar switch, see :func:`show_progress`.
        description: Label of the progress bar.
        passes: Passed to :func:`batches`: how often the caller iterates over ``data`` in all.
        powers: The power :math:`p_i` of each entry (``None``: 1 for all).
        concatenate: Join per-sample entries over batches instead of summing them.

    Returns:
        The quantity of the dataset's loss, a list of tensors like ``batch_quantity``'s.

    Raises:
        ValueError: If the total normalization of a mean is zero (every target ignored), or the
            batches return quantities of different shapes.
    """
    if is_batch(data) and distributed_world() == 1:
        inputs, targets = check_batch(data, None)
        return batch_quantity(inputs, targets)[1]
    parts, normalizer, reduction = _weighted_batches(
        loss_fn, data, batch_quantity, progress, description, passes, powers
    )
    if concatenate:
        totals = [torch.cat(column) for column in zip(*parts, strict=True)]
    else:
        # Copies: the in-place sum over ranks must not change a batch's own tensors.
        totals = [t.clone() for t in _summed(parts)] if distributed_world() > 1 else _summed(parts)
    normalizer = _normalizer_over_ranks(normalizer, reduction, totals if not concatenate else [])
    if normalizer is None:
        return totals
    powers = [1] * len(totals) if powers is None else powers
    return [t / normalizer**p if p else t for t, p in zip(totals, powers, strict=True)]


def _weighted_batches(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Data,
    batch_quantity: BatchQuantity,
    progress: bool | None,
    description: str,
    passes: int,
    powers: Sequence[int] | None,
) -> tuple[list[list[Tensor]], Tensor, str]:
    """Every batch's quantity times :math:`Z_b^{p_i}`, the sum of the :math:`Z_b`, the reduction."""
    total_batches = num_batches(data)
    show = show_progress(progress, total_batches)
    parts: list[list[Tensor]] = []
    normalizer: Tensor | None = None
    reduction = ""
    for inputs, targets in tqdm(
        batches(data, passes=passes),
        total=total_batches,
        desc=description,
        disable=not show,
        leave=False,
    ):
        outputs, quantity = batch_quantity(inputs, targets)
        weight = losses.normalization(loss_fn, outputs, targets).detach()
        reduction = reduction or losses.sample_reduction(loss_fn, outputs, targets)
        exponents = [1] * len(quantity) if powers is None else powers
        parts.append(
            [
                q if p == 0 else weight.to(q.dtype) ** p * q
                for q, p in zip(quantity, exponents, strict=True)
            ]
        )
        weight = weight.to(device=quantity[0].device, dtype=torch.float64)
        normalizer = weight if normalizer is None else normalizer + weight
    assert normalizer is not None  # batches() raises on empty data
    return parts, normalizer, reduction


def _summed(parts: list[list[Tensor]]) -> list[Tensor]:
    """The entries of every batch summed, refusing batches whose entries differ in shape."""
    totals = parts[0]
    for quantity in parts[1:]:
        if [q.shape for q in quantity] != [a.shape for a in totals]:
            raise ValueError(
                "batches gave quantities of different shapes "
                f"({[tuple(a.shape) for a in totals]} vs {[tuple(q.shape) for q in quantity]})"
            )
        totals = [a + q for a, q in zip(totals, quantity, strict=True)]
    return totals


def _normalizer_over_ranks(
    normalizer: Tensor, reduction: str, totals: list[Tensor]
) -> float | None:
    """Sum ``totals`` (in place) and the normalization over ranks; ``None`` for a summing loss.

    Raises:
        ValueError: If the ranks disagree on the reduction, or a mean's normalization is zero.
    """
    # [normalizer, ranks whose loss sums, ranks whose loss averages], summed over ranks.
    flags = torch.stack(
        [
            normalizer,
            torch.tensor(reduction == "sum", dtype=normalizer.dtype, device=normalizer.device),
            torch.tensor(reduction == "mean", dtype=normalizer.dtype, device=normalizer.device),
        ]
    )
    all_reduce_sum_([*totals, flags])
    total, summing, averaging = flags.tolist()
    if summing and averaging:
        raise ValueError("the ranks disagree on whether loss_fn sums or averages over samples")
    if summing:
        return None
    if total == 0:
        raise ValueError(
            "the loss normalization of the data sums to zero (every target ignored?); "
            "the dataset's loss is undefined"
        )
    return total
