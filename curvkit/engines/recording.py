r"""One recorded forward pass: which module calls use which parameters, with inputs and outputs.

The engine attributes every use of a requested parameter to a *module call*: the deepest call on
the call stack whose module holds the parameter (directly or in a submodule). Usually that is
the call of the parameter's own module (a ``Linear`` using its weight); a parameter used by an
enclosing module's ``forward`` (``nn.MultiheadAttention`` reading ``out_proj.weight``, a weight
tied into a custom ``forward``) is attributed to that enclosing call. Uses are seen by a
:class:`~torch.overrides.TorchFunctionMode` that watches the arguments of every torch function,
so no use goes unnoticed. A call is then kept for a parameter only if no enclosing call is kept
for it too, so that every use is counted exactly once.

Inputs and outputs of calls are recorded as they are. If a recorded tensor is later changed in
place (``nn.ReLU(inplace=True)`` right after a ``Linear``), a gradient with respect to it, or a
rule reading it, would be wrong; the tensors' version counters reveal this, and the forward pass
is then run again with private copies for exactly the affected calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

__all__ = ["ModuleCall", "Recording", "record_forward"]


@dataclass(eq=False)
class ModuleCall:
    """One call of a module during the recorded forward pass.

    Attributes:
        module: The module called.
        index: How many calls of the same module came before this one.
        parent: The innermost enclosing recorded call, ``None`` for the outermost.
        args: Positional inputs as recorded (private copies where the forward pass changed them).
        kwargs: Keyword inputs as recorded.
        output: The output as the module returned it.
        params: Parameters attributed to this call: parameter index -> name relative to
            ``module`` (for :func:`torch.func.functional_call`).
        input_versions: Version counters of the recorded input tensors when they were recorded.
        output_versions: Version counters of the output tensors when they were recorded.
        probe: The same call in a forward pass of the first sample alone (when there is one):
            the axis that shrinks from :math:`N` to 1 there is a tensor's sample axis.
    """

    module: nn.Module
    index: int
    parent: ModuleCall | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None
    params: dict[int, str] = field(default_factory=dict)
    input_versions: list[int] = field(default_factory=list)
    output_versions: list[int] = field(default_factory=list)
    probe: ModuleCall | None = None

    @property
    def key(self) -> tuple[int, int]:
        """Identifies the call across repeated forward passes of the same model."""
        return id(self.module), self.index

    def ancestors(self) -> Iterator[ModuleCall]:
        """The enclosing calls, innermost first."""
        call = self.parent
        while call is not None:
            yield call
            call = call.parent


@dataclass
class Recording:
    """The result of :func:`record_forward`.

    Attributes:
        outputs: The model's output, still attached to the autograd graph.
        calls: The calls with attributed parameters, in call order.
        num_params: The number of requested parameters.
    """

    outputs: Any
    calls: list[ModuleCall]
    num_params: int


def _tensors(tree: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]


def _clone_tensors(tree: Any) -> Any:
    return pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, Tensor) else leaf, tree)


def _holders(model: nn.Module, params: list[Tensor]) -> dict[int, tuple[nn.Module, dict[int, str]]]:
    """Every module holding a requested parameter (directly or below), with relative names.

    Returns:
        ``id(module) -> (module, {parameter index: name relative to module})``.
    """
    param_index = {id(p): i for i, p in enumerate(params)}
    holders: dict[int, tuple[nn.Module, dict[int, str]]] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for full_name, param in model.named_parameters(remove_duplicate=False):
        index = param_index.get(id(param))
        if index is None:
            continue
        parts = full_name.split(".")
        for depth in range(len(parts)):
            module = modules[".".join(parts[:depth])]
            entry = holders.setdefault(id(module), (module, {}))
            entry[1].setdefault(index, ".".join(parts[depth:]))
    return holders


class _Recorder(TorchFunctionMode):
    """Hooks that record every call of a holding module, and the tracker of parameter uses.

    As a :class:`~torch.overrides.TorchFunctionMode` it sees the arguments of every torch
    function run inside the forward pass and notes, for every requested parameter among them,
    the innermost active call.
    """

    def __init__(
        self,
        params: list[Tensor],
        holders: dict[int, tuple[nn.Module, dict[int, str]]],
        copy_calls: set[tuple[int, int]],
    ) -> None:
        super().__init__()
        self.param_index = {id(p): i for i, p in enumerate(params)}
        self.holders = holders
        self.copy_calls = copy_calls
        self.calls: list[ModuleCall] = []
        self.stack: list[ModuleCall] = []
        self.counts: dict[int, int] = {}
        self.uses: list[tuple[int, ModuleCall | None]] = []

    def _note(self, value: Tensor) -> None:
        index = self.param_index.get(id(value))
        if index is not None:
            self.uses.append((index, self.stack[-1] if self.stack else None))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor):
                self._note(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, Tensor):
                        self._note(item)
        return func(*args, **kwargs)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Open a call: record its inputs."""
        index = self.counts.get(id(module), 0)
        self.counts[id(module)] = index + 1
        call = ModuleCall(module, index, self.stack[-1] if self.stack else None, args, kwargs)
        if call.key in self.copy_calls:
            # The forward pass changes these inputs in place later: keep private copies.
            call.args, call.kwargs = _clone_tensors(args), _clone_tensors(kwargs)
        call.input_versions = [t._version for t in _tensors((call.args, call.kwargs))]
        self.stack.append(call)
        self.calls.append(call)

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Close a call: record its output."""
        call = self.stack.pop()
        call.output = output
        call.output_versions = [t._version for t in _tensors(output)]
        if call.key in self.copy_calls:
            # Later in-place operations then change the copy, not the recorded output.
            return _clone_tensors(output)
        return None

    def run(self, forward: Callable[[], Any]) -> Any:
        """Run ``forward`` with the hooks and the tracker in place; remove them afterwards."""
        handles = []
        try:
            for module, _ in self.holders.values():
                handles.append(module.register_forward_pre_hook(self.pre_hook, with_kwargs=True))
                # First among the forward hooks: a user's hook changing the output in place
                # then changes the copy handed on, not the recorded output.
                handles.append(
                    module.register_forward_hook(self.post_hook, with_kwargs=True, prepend=True)
                )
            with self:
                return forward()
        finally:
            for handle in handles:
                handle.remove()

    def attribute(self) -> list[ModuleCall]:
        """Attribute every use to a call; return the calls that received parameters."""
        kept: dict[int, set[ModuleCall]] = {}
        for index, innermost in self.uses:
            chain = [] if innermost is None else [innermost, *innermost.ancestors()]
            holder = next(
                (c for c in chain if index in self.holders.get(id(c.module), (None, {}))[1]), None
            )
            if holder is None:
                raise ValueError(
                    f"parameter {index} of `params` is used outside the forward pass of every "
                    "module holding it; the engine cannot attribute that use to a module call"
                )
            kept.setdefault(index, set()).add(holder)
        for index, calls in kept.items():
            for call in calls:
                if not any(outer in calls for outer in call.ancestors()):
                    call.params[index] = self.holders[id(call.module)][1][index]
        return [call for call in self.calls if call.params]


def _changed_in_place(call: ModuleCall) -> bool:
    inputs = [t._version for t in _tensors((call.args, call.kwargs))]
    outputs = [t._version for t in _tensors(call.output)]
    return inputs != call.input_versions or outputs != call.output_versions


def record_forward(
    model: nn.Module, inputs: tuple[Any, ...], params: list[Tensor], *, build_graph: bool = True
) -> Recording:
    """Run ``model(*inputs)`` once, recording the calls that use ``params``.

    If a recorded input or output is changed in place later in the forward pass, the pass is
    run a second time with private copies for the affected calls (see the module docstring).

    Args:
        model: The model.
        inputs: Positional inputs of the model.
        params: The requested parameters (each one in ``model``).
        build_graph: Whether to record the autograd graph (a probe pass needs none).

    Returns:
        The recording.

    Raises:
        RuntimeError: If a recorded tensor is changed in place even in the second pass.
        ValueError: If a parameter is used outside the forward pass of every module holding it.
    """
    holders = _holders(model, params)
    copy_calls: set[tuple[int, int]] = set()
    for attempt in range(2):
        recorder = _Recorder(params, holders, copy_calls)
        with torch.set_grad_enabled(build_graph):
            outputs = recorder.run(lambda: model(*inputs))
        calls = recorder.attribute()
        changed = {call.key for call in calls if _changed_in_place(call)}
        if not changed:
            return Recording(outputs, calls, len(params))
        if attempt == 1:
            raise RuntimeError(
                "tensors recorded by the engine were changed in place even in private copies; "
                "avoid in-place operations on module inputs and outputs"
            )
        copy_calls = changed
    raise AssertionError("unreachable")
