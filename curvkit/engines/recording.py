r"""One recorded forward pass: which module calls use which parameters, with inputs and outputs.

The engine attributes every use of a requested parameter to a *module call*: the deepest call on
the call stack whose module holds the parameter (directly or in a submodule). Usually that is
the call of the parameter's own module (a ``Linear`` using its weight); a parameter used by an
enclosing module's ``forward`` (``nn.MultiheadAttention`` reading ``out_proj.weight``, a weight
tied into a custom ``forward``) is attributed to that enclosing call. Uses are seen by a
:class:`~torch.overrides.TorchFunctionMode` that watches the arguments of every torch function,
so no use goes unnoticed. A call is then kept for a parameter only if no enclosing call is kept
for it too, so that every use is counted exactly once.

Which tensors depend on the samples is tracked through the same mode: the model's input tensors
do, and so does every result of a torch function that receives one. A parameter used only
together with tensors that do not (a positional embedding of ``arange(T)``, a weight computed
by a parametrization, a slice of a parameter) yields a *shared* tensor, the same for all
samples. Such uses are not attributed to module calls. Instead, every torch function that
combines a shared tensor computed from parameters with a sample-dependent one is recorded as
a :class:`ModuleCall` of a :class:`SharedSite` (``x + pos``, ``F.linear(x, W)`` with a
parametrized ``W``): the engine finds the per-sample gradient with respect to the shared
tensor there, and the chain rule through the shared computation takes it to the parameters
(:mod:`curvkit.engines.shared`).

Inputs and outputs of calls are recorded as they are. If a recorded tensor is later changed in
place (``nn.ReLU(inplace=True)`` right after a ``Linear``), a gradient with respect to it, or a
rule reading it, would be wrong; the tensors' version counters reveal this, and the forward pass
is then run again with private copies for exactly the affected calls.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from curvkit.core.model_io import Inputs, call_model
from curvkit.engines.guard import model_guard

__all__ = ["ModuleCall", "Recording", "SharedSite", "record_forward"]


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


class SharedSite(nn.Module):
    """A torch function combining sample-dependent tensors with shared ones, as a module.

    The shared tensors (computed from parameters, the same for every sample) are its buffers
    ``shared0``, ``shared1``, ...; the other arguments are the call's positional inputs, with
    ``None`` where a shared tensor goes. :func:`torch.func.functional_call` can then replace
    the shared tensors, so that the generic rule finds the per-sample gradients with respect to
    them like those of any module's parameters.

    Args:
        func: The torch function.
        spec: The pytree spec of the function's ``(args, kwargs)``.
        positions: The leaf positions of the shared tensors.
        shared: The shared tensors.
    """

    def __init__(
        self, func: Callable[..., Any], spec: Any, positions: list[int], shared: list[Tensor]
    ) -> None:
        super().__init__()
        self.func = func
        self.spec = spec
        self.positions = positions
        for i, tensor in enumerate(shared):
            self.register_buffer(f"shared{i}", tensor, persistent=False)

    @property
    def shared(self) -> list[Tensor]:
        """The shared tensors, in the order of :attr:`positions`."""
        return [getattr(self, f"shared{i}") for i in range(len(self.positions))]

    def forward(self, *leaves: Any) -> Any:
        """Call the function with the shared tensors put back among ``leaves``."""
        values = list(leaves)
        for position, tensor in zip(self.positions, self.shared, strict=True):
            values[position] = tensor
        args, kwargs = pytree.tree_unflatten(values, self.spec)
        return self.func(*args, **kwargs)

    def extra_repr(self) -> str:  # noqa: D102
        return getattr(self.func, "__qualname__", repr(self.func))


@dataclass
class Recording:
    """The result of :func:`record_forward`.

    Attributes:
        outputs: The model's output, still attached to the autograd graph.
        calls: The calls with attributed parameters, in call order.
        num_params: The number of requested parameters.
        sites: The calls of :class:`SharedSite` modules: torch functions where a shared tensor
            computed from parameters meets the samples, in call order.
        shared_params: The indices of the parameters with uses that yield shared tensors.
        convolutional: Whether a convolution or pooling function ran on the samples.
    """

    outputs: Any
    calls: list[ModuleCall]
    num_params: int
    sites: list[ModuleCall] = field(default_factory=list)
    shared_params: set[int] = field(default_factory=set)
    convolutional: bool = False


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
        self.uses: list[tuple[int, ModuleCall]] = []
        self.sites: list[ModuleCall] = []
        self.borrowed: list[ModuleCall] = []
        self.shared_params: set[int] = set()
        self.convolutional = False
        # id -> weak reference: ids alone could be reused by later tensors.
        self.sample_dependent: dict[int, weakref.ref] = {}
        # id -> (weak reference, the call it was made in, the parameters it is computed from)
        self.from_params: dict[int, tuple[weakref.ref, ModuleCall | None, frozenset[int]]] = {}

    @staticmethod
    def _member(table: dict[int, weakref.ref], tensor: Tensor) -> bool:
        ref = table.get(id(tensor))
        return ref is not None and ref() is tensor

    @staticmethod
    def _mark(table: dict[int, weakref.ref], result: Any) -> None:
        values = result if isinstance(result, (list, tuple)) else (result,)
        for value in values:
            if isinstance(value, Tensor):
                table[id(value)] = weakref.ref(value)

    def mark_inputs(self, inputs: Any) -> None:
        """Mark the model's input tensors as the sample-dependent ones."""
        for leaf in _tensors(inputs):
            self.sample_dependent[id(leaf)] = weakref.ref(leaf)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors: list[Tensor] = []
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor):
                tensors.append(value)
            elif isinstance(value, (list, tuple)):
                tensors.extend(item for item in value if isinstance(item, Tensor))
        if not tensors:
            return func(*args, **kwargs)
        uses = [self.param_index.get(id(t)) for t in tensors]
        if any(self._member(self.sample_dependent, t) for t in tensors):
            if not self.convolutional:
                name = getattr(func, "__name__", "")
                self.convolutional = "conv" in name or "pool" in name
            if func is F.linear and self._borrowed_linear(args, kwargs):
                return self._linear_call(args, kwargs)
            # A use outside every call of a leaf module holding the parameter (in a hook, by
            # another module, or by a module with submodules) is a site of the parameter as a
            # shared tensor. A module with submodules makes every tensor derived from its
            # parameters a site (see _within); its direct uses must be sites too, or the
            # generic rule of its whole call would count the derived uses a second time.
            unheld = set()
            for index in uses:
                holder = None if index is None else self._holder(index)
                if holder is not None and next(holder.module.children(), None) is None:
                    self.uses.append((index, holder))
                elif index is not None:
                    unheld.add(index)
            shared = set()
            for tensor in tensors:
                derived = self._derived(tensor)
                if derived is None:
                    continue
                origin, indices = derived
                if self._within(origin, indices):
                    self.uses.extend((index, origin) for index in indices)
                else:
                    shared.add(id(tensor))
                    self.shared_params.update(indices)
            if unheld or shared:
                self.shared_params.update(unheld)
                result = self._site(func, args, kwargs, unheld, shared)
            else:
                result = func(*args, **kwargs)
            self._mark(self.sample_dependent, result)
            return result
        result = func(*args, **kwargs)
        indices = {index for index in uses if index is not None}
        for tensor in tensors:
            derived = self._derived(tensor)
            if derived is not None:
                indices |= derived[1]
        if indices:
            origin = self.stack[-1] if self.stack else None
            values = result if isinstance(result, (list, tuple)) else (result,)
            for value in values:
                if isinstance(value, Tensor):
                    self.from_params[id(value)] = (weakref.ref(value), origin, frozenset(indices))
        return result

    def _derived(self, tensor: Tensor) -> tuple[ModuleCall | None, frozenset[int]] | None:
        """For a tensor computed from parameters alone: the call it was made in, the parameters."""
        entry = self.from_params.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1], entry[2]

    def _within(self, origin: ModuleCall | None, indices: frozenset[int]) -> bool:
        """Whether a tensor computed from parameters in ``origin`` is used where it was made.

        ``x @ self.weight.T`` in a leaf module holding the weight: the use belongs to that
        module's call and its rule, as any other use of its parameters. A tensor leaving the
        call that made it (a positional embedding, a parametrized weight), or made in a module
        with submodules (whose generic rule would recompute them all per sample), is shared.
        """
        if origin is None or not any(call is origin for call in self.stack):
            return False
        if next(origin.module.children(), None) is not None:
            return False
        held = self.holders.get(id(origin.module), (None, {}))[1]
        return all(index in held for index in indices)

    def _borrowed_linear(self, args: tuple, kwargs: dict) -> bool:
        """Whether ``F.linear`` applies a submodule's parameter in an enclosing module's forward.

        A tied language-model head, ``F.linear(x, self.embedding.weight)``: the call then gets the
        ``nn.Linear`` rule of its own instead of the enclosing module's generic one.
        """
        if len(args) < 2 or set(kwargs) - {"bias"}:
            return False
        weight = args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        index = self.param_index.get(id(weight))
        holder = None if index is None else self._holder(index)
        return (
            holder is not None
            and "." in self.holders[id(holder.module)][1][index]
            and isinstance(args[0], Tensor)
            and self._derived(args[0]) is None
            and (bias is None or id(bias) in self.param_index)
        )

    def _linear_call(self, args: tuple, kwargs: dict) -> Tensor:
        """Run ``F.linear(x, weight, bias)`` as a recorded call of an ``nn.Linear`` sharing them."""
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        # The parameters are registered as they are: nothing is allocated or initialised.
        proxy = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(proxy)
        proxy.in_features, proxy.out_features = weight.shape[1], weight.shape[0]
        proxy.weight = weight
        proxy.bias = bias
        call = ModuleCall(proxy, 0, self.stack[-1] if self.stack else None, (x,), {})
        call.params[self.param_index[id(weight)]] = "weight"
        if bias is not None:
            call.params[self.param_index[id(bias)]] = "bias"
        call.input_versions = [x._version]
        call.output = F.linear(x, weight, bias)
        call.output_versions = [call.output._version]
        self.borrowed.append(call)
        self._mark(self.sample_dependent, call.output)
        return call.output

    def _site(
        self,
        func: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        unheld: set[int],
        shared: set[int],
    ) -> Any:
        """Run ``func`` as a recorded call of a :class:`SharedSite`.

        An in-place operation (``x += pos``, ``x.mul_(scale)``) runs in place, as the model
        wrote it; the site records a copy of ``x`` from before it and recomputes the operation
        out of place on single samples.
        """
        leaves, spec = pytree.tree_flatten((args, kwargs))
        positions = [
            i
            for i, leaf in enumerate(leaves)
            if isinstance(leaf, Tensor)
            and (id(leaf) in shared or self.param_index.get(id(leaf)) in unheld)
        ]
        out_of_place = _out_of_place(func)
        inputs = [None if i in positions else leaf for i, leaf in enumerate(leaves)]
        if out_of_place is not None:
            if 0 in positions or not isinstance(leaves[0], Tensor):
                raise ValueError(
                    f"the in-place operation {getattr(func, '__name__', func)} writes a sample-"
                    "dependent result into a tensor computed from parameters and shared by all "
                    "samples; write it out of place so that curvkit can follow the samples"
                )
            inputs[0] = leaves[0].clone()
        module = SharedSite(out_of_place or func, spec, positions, [leaves[i] for i in positions])
        parent = self.stack[-1] if self.stack else None
        call = ModuleCall(module, len(self.sites), parent, tuple(inputs), {})
        call.input_versions = [t._version for t in _tensors(call.args)]
        call.output = func(*args, **kwargs)
        call.output_versions = [t._version for t in _tensors(call.output)]
        self.sites.append(call)
        return call.output

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

    def _holder(self, index: int) -> ModuleCall | None:
        """The innermost active call whose module holds parameter ``index``, if any."""
        for call in reversed(self.stack):
            if index in self.holders.get(id(call.module), (None, {}))[1]:
                return call
        return None

    def attribute(self) -> list[ModuleCall]:
        """Attribute every use to a call; return the calls that received parameters."""
        kept: dict[int, set[ModuleCall]] = {}
        for index, holder in self.uses:
            kept.setdefault(index, set()).add(holder)
        for index, calls in kept.items():
            for call in calls:
                if not any(outer in calls for outer in call.ancestors()):
                    call.params[index] = self.holders[id(call.module)][1][index]
        return [call for call in self.calls if call.params] + self.borrowed


#: Augmented assignments and their out-of-place forms (see ``_Recorder._site``).
_AUGMENTED: dict[Callable[..., Any], Callable[..., Any]] = {
    Tensor.__iadd__: Tensor.__add__,
    Tensor.__isub__: Tensor.__sub__,
    Tensor.__imul__: Tensor.__mul__,
    Tensor.__itruediv__: Tensor.__truediv__,
}


def _out_of_place(func: Callable[..., Any]) -> Callable[..., Any] | None:
    """The out-of-place form of an in-place torch function (``add_`` -> ``add``), else ``None``.

    Raises:
        ValueError: For an in-place function without an out-of-place form.
    """
    if func in _AUGMENTED:
        return _AUGMENTED[func]
    name = getattr(func, "__name__", "")
    if not name.endswith("_") or name.endswith("__"):
        return None
    counterpart = getattr(Tensor, name[:-1], None)
    if counterpart is None:
        raise ValueError(
            f"the in-place operation {name} combines a sample-dependent tensor with a tensor "
            "computed from parameters and shared by all samples; write it out of place so that "
            "curvkit can follow the samples through it"
        )
    return counterpart


def _changed_in_place(call: ModuleCall) -> bool:
    inputs = [t._version for t in _tensors((call.args, call.kwargs))]
    outputs = [t._version for t in _tensors(call.output)]
    return inputs != call.input_versions or outputs != call.output_versions


def record_forward(
    model: nn.Module,
    inputs: Inputs,
    params: list[Tensor],
    *,
    build_graph: bool = True,
    forward_hooks: bool = True,
) -> Recording:
    """Run the model on ``inputs`` once, recording the calls that use ``params``.

    If a recorded input or output is changed in place later in the forward pass, the pass is
    run a second time with private copies for the affected calls (see the module docstring).
    The model runs under :func:`curvkit.engines.guard.model_guard`: eagerly, without the user's
    backward hooks, and with its forward hooks only if ``forward_hooks``.

    Args:
        model: The model.
        inputs: The model's inputs (see :func:`curvkit.core.model_io.call_model`).
        params: The requested parameters (each one in ``model``).
        build_graph: Whether to record the autograd graph (a probe pass needs none).
        forward_hooks: Whether the user's forward hooks run (not in checking passes).

    Returns:
        The recording.

    Raises:
        RuntimeError: If a recorded tensor is changed in place even in the second pass.
    """
    holders = _holders(model, params)
    copy_calls: set[tuple[int, int]] = set()
    for attempt in range(2):
        recorder = _Recorder(params, holders, copy_calls)
        recorder.mark_inputs(inputs)
        with torch.set_grad_enabled(build_graph), model_guard(model, forward_hooks=forward_hooks):
            outputs = recorder.run(lambda: call_model(model, inputs))
        calls = recorder.attribute()
        changed = {call.key for call in calls if _changed_in_place(call)}
        if any(_changed_in_place(site) for site in recorder.sites):
            raise RuntimeError(
                "a tensor where a shared tensor computed from parameters meets the samples "
                "was changed in place later in the forward pass; write that operation out of "
                "place"
            )
        if not changed:
            return Recording(
                outputs,
                calls,
                len(params),
                recorder.sites,
                recorder.shared_params,
                recorder.convolutional,
            )
        if attempt == 1:
            raise RuntimeError(
                "tensors recorded by the engine were changed in place even in private copies; "
                "avoid in-place operations on module inputs and outputs"
            )
        copy_calls = changed
    raise AssertionError("unreachable")
