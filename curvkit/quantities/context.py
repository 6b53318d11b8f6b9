r"""The call context: one validated object per call of a curvature quantity.

Every public quantity (:mod:`curvkit.quantities.ggn`, :mod:`curvkit.operators.ggn`,
:mod:`curvkit.quantities.directional`) opens by building a :class:`Problem` from its arguments. The
problem validates them once (model, loss, data, parameters and their groups, Monte-Carlo settings,
chunking, progress) and owns the steps every quantity shares:

- :meth:`Problem.columns`: the columns to push back through the network (the loss Hessian's
  square root, exact or Monte-Carlo, :func:`curvkit.losses.hessian_sqrt`);
- :meth:`Problem.factors` and :meth:`Problem.summed_over_chunks`: the engine's square-root factors
  of one batch, whole or in chunks of samples and columns;
- :meth:`Problem.reduce`: the one reduce loop over the data (batch weights, sums over
  :mod:`torch.distributed` ranks, progress; :func:`curvkit.core.data.dataset_average`), and
  :meth:`Problem.concatenated_batch` for the quantities that are not linear in the loss;
- :meth:`Problem.per_group` and :meth:`Problem.split_vector`: results and operands in the shapes
  of the parameters, one list per group when groups were given.

``params`` follows ``torch.optim``: ``None`` (every parameter of the model that requires grad),
an iterable of tensors, or an iterable of group dicts ``{"params": [...], **options}`` with the
options the quantity defines (:mod:`curvkit.core.groups`). Groups are diagonal blocks of the GGN: a
quantity computed per group treats the GGN as block diagonal over the groups.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from curvkit import losses
from curvkit.core import data as data_utils
from curvkit.core.data import Batch, BatchQuantity, Data, Inputs
from curvkit.core.groups import normalize_param_groups
from curvkit.core.model_io import sample_layout
from curvkit.core.validation import check_int
from curvkit.engines import DEFAULT_CHUNK_BYTES, Factor, FactorChunk, iter_factors
from curvkit.engines import memory as memory_plan
from curvkit.losses import LossFunction
from curvkit.ops.linalg import without_negligible

__all__ = ["ARGUMENT_DOCS", "Params", "Problem", "fill_argument_docs"]

Params = Iterable[Tensor] | Iterable[Mapping[str, Any]] | Mapping[str, Any] | None

#: The documentation of the arguments the quantities share, filled into their docstrings by
#: :func:`fill_argument_docs` (``{name}`` in a docstring stands for ``ARGUMENT_DOCS[name]``).
ARGUMENT_DOCS: dict[str, str] = {
    "model": (
        "The network; ``model(inputs)`` (``model(*inputs)`` for a tuple) returns the outputs with "
        "the samples along the first axis. Samples must not interact: call ``model.eval()`` "
        "for BatchNorm, dropout and the like."
    ),
    "loss_fn": (
        "The loss ``loss_fn(outputs, targets)`` with reduction ``'mean'`` or ``'sum'``: "
        "``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss`` or any convex per-sample loss "
        "(:func:`curvkit.losses.hessian_sqrt`)."
    ),
    "data": (
        "One batch ``(inputs, targets)`` or an iterable of batches (a DataLoader), which is the "
        "loss of the whole dataset (:mod:`curvkit.core.data`)."
    ),
    "params": (
        "``None`` for every parameter of the model that requires grad, an iterable of them, or "
        "param-group dicts ``{'params': [...], **options}`` as for ``torch.optim`` "
        "(:mod:`curvkit.quantities.context`); with groups, the results come one list per group."
    ),
    "mc_samples": (
        "``0`` for the exact loss Hessian, else the number of Monte-Carlo samples per data point."
    ),
    "generator": "Random number generator for the Monte-Carlo samples (on the model's device).",
    "progress": "Show a progress bar over the batches; ``None`` shows one for long loops.",
    "sample_chunk_size": (
        "Bound the memory by running at most this many samples of a batch through the engine at "
        "once (``None``: all); see :func:`curvkit.engines.iter_factors`."
    ),
    "column_chunk_size": (
        "Bound the memory by backpropagating at most this many columns of the loss Hessian's "
        "square root at once (``None``: all)."
    ),
    "max_memory": (
        "Memory budget in bytes for the engine's columns; ``None`` for half the memory "
        "available on the device. Sums over columns (diagonal, dense GGN) run in chunks that "
        "fit; work that cannot fit, or exact work of more than "
        ":data:`curvkit.engines.memory.MAX_GRADIENTS` columns per sample, is refused before it is "
        "allocated (:mod:`curvkit.engines.memory`)."
    ),
    "param_groups": "Deprecated spelling of ``params``.",
    "directional_params": (
        "``None`` (all parameters, one group), parameters, or group dicts with the options "
        "``'criterion'`` and ``'damping'`` (:mod:`curvkit.quantities.directional`); results come "
        "per group."
    ),
    "subsampling_grad": (
        "Indices of the samples whose gradients give the directional gradients; ``None`` for all."
    ),
    "subsampling_ggn": "Indices of the samples forming the GGN; ``None`` for all.",
}

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)(?P<head>\w+: )\{(?P<name>\w+)\}$", re.MULTILINE)

_Function = TypeVar("_Function", bound=Callable[..., Any])


def fill_argument_docs(function: _Function) -> _Function:
    """Replace ``name: {name}`` lines of the docstring's arguments by :data:`ARGUMENT_DOCS`.

    Args:
        function: A function or class whose docstring holds such lines.

    Returns:
        ``function`` with its filled-in docstring.

    Raises:
        KeyError: If a placeholder names no shared argument.
    """

    def fill(match: re.Match[str]) -> str:
        indent, head = match.group("indent"), match.group("head")
        text = ARGUMENT_DOCS[match.group("name")]
        lines, line = [], indent + head
        for word in text.split(" "):
            if len(line) + len(word) > 96 and line.strip():
                lines.append(line.rstrip())
                line = indent + "    "
            line += word + " "
        lines.append(line.rstrip())
        return "\n".join(lines)

    if function.__doc__:
        function.__doc__ = _PLACEHOLDER.sub(fill, function.__doc__)
    return function


def _is_grouped(params: Params) -> bool:
    """Whether ``params`` are param-group dicts rather than tensors (without consuming them)."""
    if isinstance(params, Mapping):
        return True
    return isinstance(params, Sequence) and any(isinstance(p, Mapping) for p in params)


def _check_type(value: Any, name: str, expected: str, check: Callable[[Any], bool]) -> None:
    if not check(value):
        raise TypeError(f"{name} must be {expected}, got {value!r}")


def _check_chunk_size(value: int | None, name: str) -> None:
    if value is not None:
        check_int(value, name, minimum=1)


_Value = TypeVar("_Value")


class Problem:
    """One call's model, loss, data, parameter groups and settings, validated.

    Args:
        model: The network.
        loss_fn: The loss ``loss_fn(outputs, targets)``.
        data: One batch or an iterable of batches.
        params: Parameters or param groups (see the module docstring).
        options: The group options the quantity defines, with their defaults
            (:func:`curvkit.core.groups.normalize_param_groups`).
        mc_samples: ``0`` for the exact loss Hessian, else the number of Monte-Carlo samples.
        generator: Random number generator for the Monte-Carlo samples.
        progress: Progress bar switch (:func:`curvkit.core.data.show_progress`).
        sample_chunk_size: Samples per engine chunk (``None``: the whole batch).
        column_chunk_size: Columns per engine chunk (``None``: all columns).
        create_graph: Keep the factors differentiable with respect to the parameters.
        name: The quantity's name, for progress bars.
        param_groups: The deprecated spelling of ``params``.
        max_memory: Memory budget in bytes (:class:`curvkit.engines.memory.MemoryPlan`).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a value is out of range, or the parameters or groups are invalid
            (:func:`curvkit.core.groups.normalize_param_groups`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Data,
        params: Params = None,
        *,
        options: Mapping[str, Any] | None = None,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
        progress: bool | None = None,
        sample_chunk_size: int | None = None,
        column_chunk_size: int | None = None,
        create_graph: bool = False,
        name: str = "batches",
        param_groups: Params = None,
        max_memory: int | None = None,
    ) -> None:
        _check_type(model, "model", "a torch.nn.Module", lambda m: isinstance(m, nn.Module))
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}"
            )
        losses.check_loss(loss_fn)
        losses.check_mc_samples(mc_samples, generator)
        _check_type(
            progress, "progress", "True, False or None", lambda p: p is None or isinstance(p, bool)
        )
        _check_type(create_graph, "create_graph", "a bool", lambda c: isinstance(c, bool))
        _check_chunk_size(sample_chunk_size, "sample_chunk_size")
        _check_chunk_size(column_chunk_size, "column_chunk_size")
        if param_groups is not None:
            if params is not None:
                raise TypeError("pass params or its deprecated spelling param_groups, not both")
            warnings.warn(
                "param_groups= is deprecated: pass the parameters or groups as params=",
                DeprecationWarning,
                stacklevel=3,
            )
            params = param_groups
        if params is not None and not isinstance(params, Mapping | Tensor):
            params = list(params) if isinstance(params, Iterable) else params
        self.grouped = _is_grouped(params)
        self.groups = normalize_param_groups(params, model, options or {})
        self.params = [p for group in self.groups for p in group["params"]]
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.mc_samples = mc_samples
        self.generator = generator
        self.progress = progress
        self.sample_chunk_size = sample_chunk_size
        self.column_chunk_size = column_chunk_size
        self.create_graph = create_graph
        self.name = name
        self.memory = memory_plan.MemoryPlan(max_memory, mc_samples)
        self._cached_factors: tuple[Tensor, list[Factor]] | None = None
        self._first_pass: list[Tensor] | None = None

    # -- the engine ----------------------------------------------------------------------------

    def columns(self, outputs: Tensor, targets: Tensor, num_samples: int | None = None) -> Tensor:
        r"""The loss Hessian's square root ``[K, *outputs.shape]`` with the problem's settings.

        For outputs that hold each of the ``num_samples`` samples in :math:`T > 1` consecutive
        rows (:mod:`curvkit.core.model_io`), the engine reads a column's restriction to a sample's
        rows as one column of that sample. Monte-Carlo columns are independent across rows, so
        one column covers all positions of a sequence at once. Exact columns are not: each row's
        columns are kept apart (:math:`K T` columns, each nonzero at one position per sample).

        Raises:
            curvkit.engines.memory.MemoryPlanError: Before building columns beyond the memory plan.
        """
        rows = outputs.shape[0] // num_samples if num_samples else 1
        self.memory.check_columns(outputs, self.num_columns(outputs, rows), whole=True)
        return self.build_columns(outputs, targets, rows, None)

    def num_columns(self, outputs: Tensor, rows: int) -> int:
        """How many columns :meth:`build_columns` makes for outputs with ``rows`` rows a sample.

        With :meth:`build_columns`, the override point of a problem that pushes back other
        columns than the loss Hessian's square root.
        """
        count = losses.num_sqrt_columns(outputs, self.mc_samples)
        return count if self.mc_samples > 0 else count * rows

    def build_columns(
        self, outputs: Tensor, targets: Tensor, rows: int, columns: slice | None
    ) -> Tensor:
        """The columns ``columns`` (all for ``None``) of :meth:`columns`, ``[K', *outputs.shape]``.

        Args:
            outputs: The batch's outputs.
            targets: The batch's targets.
            rows: The outputs' rows per sample.
            columns: Which of the :meth:`num_columns` columns to build; ``None`` for all.

        Entries too small to matter are set to zero
        (:func:`curvkit.ops.linalg.without_negligible`): these columns only enter quantities
        as sums of squares. A subclass that pushes back first-order columns overrides this
        method and keeps every entry.
        """
        num_samples = outputs.shape[0] // rows
        return without_negligible(self._square_root(outputs, targets, rows, columns), num_samples)

    def _square_root(
        self, outputs: Tensor, targets: Tensor, rows: int, columns: slice | None
    ) -> Tensor:
        if self.mc_samples > 0:
            return losses.hessian_sqrt(
                self.loss_fn, outputs, targets, mc_samples=self.mc_samples, generator=self.generator
            )
        if rows == 1:
            return losses.hessian_sqrt(self.loss_fn, outputs, targets, columns=columns)
        total = self.num_columns(outputs, rows)
        start, stop, _ = (columns or slice(None)).indices(total)
        first, last = start // rows, (stop - 1) // rows + 1
        sqrt = losses.hessian_sqrt(self.loss_fn, outputs, targets, columns=slice(first, last))
        per_position = sqrt.reshape(sqrt.shape[0], -1, rows, *outputs.shape[1:])
        separate = sqrt.new_zeros(sqrt.shape[0], rows, *per_position.shape[1:])
        separate.diagonal(dim1=1, dim2=3).copy_(per_position.movedim(2, -1))
        offset = first * rows
        return separate.reshape(-1, *outputs.shape)[start - offset : stop - offset]

    def _column_slices(
        self, outputs: Tensor, targets: Tensor, num_samples: int
    ) -> Tensor | memory_plan.ColumnSlices:
        """The square root for sums over chunks: exact columns are built a chunk at a time."""
        if self.mc_samples > 0:
            return self.columns(outputs, targets, num_samples)
        rows = outputs.shape[0] // num_samples
        num_columns = self.num_columns(outputs, rows)
        self.memory.check_columns(outputs, num_columns, whole=False)

        def build(columns: slice) -> Tensor:
            return self.build_columns(outputs, targets, rows, columns)

        return memory_plan.ColumnSlices(build, num_columns, outputs)

    def _plan(self, device: torch.device, *, whole: bool) -> Callable[[int, int], int]:
        """The column chunks of :func:`~curvkit.engines.iter_factors` under the memory plan."""

        def plan(num_columns: int, bytes_per_column: int) -> int:
            return self.memory.column_chunk_size(num_columns, bytes_per_column, device, whole=whole)

        return plan

    def factors(
        self,
        inputs: Inputs,
        targets: Tensor,
        columns: Callable[[Tensor], Tensor] | None = None,
        *,
        reuse: bool = False,
    ) -> tuple[Tensor, list[Factor]]:
        """The outputs and square-root factors of one batch, one factor per parameter.

        Args:
            inputs: The batch's inputs.
            targets: The batch's targets.
            columns: Maps the outputs to the columns to push back; :meth:`columns` by default.
            reuse: Keep the factors of a lone batch with the default columns and hand them to
                the next call that asks for reuse (several products on one batch).

        Returns:
            ``(outputs, factors)``, the factors in the order of :attr:`params`.
        """
        reusable = reuse and columns is None and data_utils.is_batch(self.data)
        if reusable and self._cached_factors is not None:
            return self._cached_factors

        def default_columns(outputs: Tensor) -> Tensor:
            return self.columns(outputs, targets, sample_layout(inputs, outputs)[0])

        (chunk,) = iter_factors(
            self.model,
            inputs,
            self.params,
            columns or default_columns,
            column_chunk_size=self._plan(self.params[0].device, whole=True),
            create_graph=self.create_graph,
            max_chunk_bytes=DEFAULT_CHUNK_BYTES,
        )
        result = chunk.outputs, chunk.factors
        if reusable:
            self._cached_factors = result
        return result

    def _chunks(self, inputs: Inputs, targets: Tensor) -> Iterator[FactorChunk]:
        """The engine's chunks of one batch, with the problem's columns, chunk sizes and plan."""
        chunks = iter_factors(
            self.model,
            inputs,
            self.params,
            lambda outputs: self._column_slices(
                outputs, targets, sample_layout(inputs, outputs)[0]
            ),
            sample_chunk_size=self.sample_chunk_size,
            column_chunk_size=self.column_chunk_size
            or self._plan(self.params[0].device, whole=False),
            create_graph=self.create_graph,
            max_chunk_bytes=DEFAULT_CHUNK_BYTES,
        )
        return memory_plan.progress_bar(chunks, self.progress, self.name)

    def summed_over_chunks(self, quantity: Callable[[list[Factor]], list[Tensor]]) -> BatchQuantity:
        r"""The per-batch function: ``quantity`` of a batch's factors, summed over engine chunks.

        ``quantity`` must be a sum over the factors' columns (the diagonal, :math:`V V^\top`), so
        that chunks of samples and of columns add up to the whole batch's value.
        """

        def batch_quantity(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
            outputs_parts: list[Tensor] = []
            total: list[Tensor] = []
            for chunk in self._chunks(inputs, targets):
                if chunk.columns.start == 0:
                    outputs_parts.append(chunk.outputs)
                part = quantity(chunk.factors)
                total = part if not total else [a + b for a, b in zip(total, part, strict=True)]
            return torch.cat(outputs_parts), total

        return batch_quantity

    def joined_over_chunks(self, quantity: Callable[[list[Factor]], list[Tensor]]) -> BatchQuantity:
        """The per-batch function: per-sample ``quantity`` of a batch's factors, chunks joined.

        For columns that are one per sample (:meth:`num_columns` 1): ``quantity`` gives a row per
        sample of the chunk, and the chunks of samples are joined in order.
        """

        def batch_quantity(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
            outputs_parts: list[Tensor] = []
            parts: list[list[Tensor]] = []
            for chunk in self._chunks(inputs, targets):
                outputs_parts.append(chunk.outputs)
                parts.append(quantity(chunk.factors))
            joined = [torch.cat(c) if len(c) > 1 else c[0] for c in zip(*parts, strict=True)]
            return torch.cat(outputs_parts), joined

        return batch_quantity

    # -- the data ------------------------------------------------------------------------------

    def reduce(
        self,
        batch_quantity: BatchQuantity,
        *,
        passes: int = 1,
        powers: Sequence[int] | None = None,
        concatenate: bool = False,
    ) -> list[Tensor]:
        """The quantity of the whole data's loss, summed over batches and ranks.

        The one loop over the data of every quantity: per-sample quantities, joined over the
        batches, included.

        Args:
            batch_quantity: Maps a batch to its outputs and the quantity of its loss alone.
            passes: How often the caller iterates over the data in all (a one-shot iterator is
                refused for more than one).
            powers: How each entry scales with the loss (:func:`~curvkit.core.data.dataset_average`;
                ``None``: linearly).
            concatenate: Join per-sample entries over the batches instead of summing them.

        Returns:
            The quantity as :func:`curvkit.core.data.dataset_average` defines it.

        Raises:
            ValueError: If ``passes > 1`` and the data changed since the first pass (see
                :meth:`_check_same_data`).
        """
        if self.create_graph and data_utils.distributed_world() > 1:
            raise ValueError(
                "create_graph=True cannot be summed over torch.distributed ranks (the all-reduce "
                "is not differentiable); compute it outside the process group"
            )
        seen: list[Tensor] = []
        if passes > 1 and not data_utils.is_batch(self.data):

            def batch_quantity(
                inputs: Inputs, targets: Tensor, quantity: BatchQuantity = batch_quantity
            ) -> tuple[Tensor, list[Tensor]]:
                seen.append(data_utils.fingerprint(inputs, targets))
                return quantity(inputs, targets)

        result = data_utils.dataset_average(
            self.loss_fn,
            self.data,
            batch_quantity,
            progress=self.progress,
            description=self.name,
            passes=passes,
            powers=powers,
            concatenate=concatenate,
        )
        if seen:
            self._check_same_data(seen)
        return result

    def _check_same_data(self, seen: list[Tensor]) -> None:
        """Refuse data that changed between the passes of a multi-pass quantity.

        The first pass's batch fingerprints (:func:`curvkit.core.data.fingerprint`) are kept. Exact
        quantities need the same samples (their order and batching do not matter: the sums over
        all batches are compared); Monte-Carlo ones replay their random draws batch by batch, so
        they need the same batches in the same order.
        """
        if self._first_pass is None:
            self._first_pass = seen
            return
        first, now = self._first_pass, seen
        if self.mc_samples == 0:
            first, now = [torch.stack(first).sum(0)], [torch.stack(now).sum(0)]
        if len(first) != len(now) or not all(
            a.shape == b.shape and torch.allclose(a, b, rtol=1e-9, atol=0.0)
            for a, b in zip(first, now, strict=False)
        ):
            order = "" if self.mc_samples == 0 else " (or in the same order)"
            raise ValueError(
                f"{self.name} iterates over data several times, and the data changed between "
                f"passes: the batches do not hold the same samples{order} as in the first pass "
                "(a DataLoader with shuffle=True, random augmentation). Pass data that is the "
                "same on every pass: a DataLoader with shuffle=False and no random transforms, "
                "or a list of batches."
            )

    def concatenated_batch(self) -> Batch:
        """All batches of all ranks as one batch (for quantities not linear in the loss)."""
        return data_utils.concatenate(self.data)

    # -- shapes --------------------------------------------------------------------------------

    def by_group(self, per_param: Sequence[_Value]) -> list[list[_Value]]:
        """Split a list in the order of :attr:`params` into one list per group."""
        out, start = [], 0
        for group in self.groups:
            stop = start + len(group["params"])
            out.append(list(per_param[start:stop]))
            start = stop
        return out

    def per_group(self, per_param: Sequence[_Value]) -> list[_Value] | list[list[_Value]]:
        """A result per parameter, as the user asked: one list per group when groups were given."""
        return self.by_group(per_param) if self.grouped else list(per_param)

    @staticmethod
    def check_like(tensor: Tensor, like: Tensor, name: str) -> None:
        """Raise if ``tensor`` does not have the dtype and device of the parameter ``like``."""
        if tensor.dtype != like.dtype:
            raise ValueError(
                f"{name} has dtype {tensor.dtype}, but the parameters have {like.dtype}"
            )
        if tensor.device != like.device:
            raise ValueError(
                f"{name} is on {tensor.device}, but the parameters are on {like.device}"
            )

    def split_vector(self, vector: Tensor | Sequence[Any]) -> list[Tensor]:
        """Split a vector in parameter space into tensors shaped like :attr:`params`.

        Args:
            vector: One flat tensor over the concatenation of the parameters, or tensors shaped
                like them: a list of tensors, or with groups a list of such lists, one per group.

        Returns:
            One tensor per parameter, in the order of :attr:`params`.

        Raises:
            TypeError: If ``vector`` is neither a tensor nor a sequence of tensors.
            ValueError: If its shapes, dtype or device do not match the parameters.
        """
        params = self.params
        if isinstance(vector, Tensor):
            dim = sum(p.numel() for p in params)
            if vector.dim() != 1 or vector.numel() != dim:
                raise ValueError(
                    f"a flat vector must have shape [{dim}] (the parameters' total size), "
                    f"got {tuple(vector.shape)}"
                )
            self.check_like(vector, params[0], "vector")
            sizes = [p.numel() for p in params]
            return [v.reshape(p.shape) for v, p in zip(vector.split(sizes), params, strict=True)]
        if not isinstance(vector, Sequence) or isinstance(vector, str):
            raise TypeError(
                "vector must be one flat tensor or a list of tensors shaped like params, "
                f"got {type(vector).__name__}"
            )
        if self.grouped:
            if len(vector) != len(self.groups) or not all(
                isinstance(v, Sequence) and not isinstance(v, str) for v in vector
            ):
                raise TypeError(
                    f"with param groups, vector must be one flat tensor or a list of "
                    f"{len(self.groups)} lists (one per group) of tensors shaped like the "
                    "group's parameters"
                )
            vector = [v for group_vector in vector for v in group_vector]
        if len(vector) != len(params):
            raise ValueError(
                f"vector has {len(vector)} tensors, but there are {len(params)} parameters"
            )
        for i, (v, p) in enumerate(zip(vector, params, strict=True)):
            if not isinstance(v, Tensor):
                raise TypeError(f"vector[{i}] is a {type(v).__name__}, not a tensor")
            if v.shape != p.shape:
                raise ValueError(
                    f"vector[{i}] has shape {tuple(v.shape)}, but its parameter has "
                    f"{tuple(p.shape)}"
                )
            self.check_like(v, p, f"vector[{i}]")
        return list(vector)
