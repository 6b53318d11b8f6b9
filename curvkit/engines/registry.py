r"""The rule registry: which function turns a module's recorded call into factors.

A **rule** (:class:`~curvkit.engines.Rule`) is a callable
``rule(call: RuleCall) -> dict[str, Factor]``. It gets one
:class:`~curvkit.engines.RuleCall` describing a module call of the recorded forward pass (the
module, its inputs and output, the columns :math:`b_{k}` backpropagated to the output, the batch
size) and returns, for each of the module's own parameters in ``call.params``, a
:class:`~curvkit.engines.Factor` whose columns are the per-sample, per-column gradients

.. math::

    v_{k,n} = \Big(\frac{\partial y_n}{\partial \theta}\Big)^\top b_{k,n}.

Built-in rules cover ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding``
(:mod:`curvkit.engines.layer_rules`); :func:`~curvkit.engines.register_rule` adds a rule for
any other module class, a user's own layer included::

    def scale_rule(call: RuleCall) -> dict[str, Factor]:
        x = call.single_input()  # [N, F]
        if call.input_sample_axis() != 0:
            raise Decline("samples are not on the input's first axis")
        return {"weight": DenseFactor(call.output_grad() * x, call.module.weight.shape)}

    handle = register_rule(Scale, scale_rule)
    ...
    handle.remove()

Rules are looked up by the exact class of the module (``type(module)``), never through
``isinstance``: a subclass may compute something else in its ``forward`` and gets a rule only
if one is registered for it. Modules without a rule go to the generic rule
(:mod:`torch.func` per-sample vector-Jacobian products: exact for any module, but slower).

A rule that cannot handle a particular call (an input layout it does not support, an option that
changes the math) raises :class:`~curvkit.engines.Decline` with the reason; so does a helper of
:class:`~curvkit.engines.RuleCall` whose precondition fails. The engine then logs the reason at
``DEBUG`` level (logger ``curvkit.engines.rules``) and uses the generic rule for that call.
Any other exception a rule raises propagates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from curvkit.engines.factor import Factor
from curvkit.engines.generic import sample_axis
from curvkit.engines.recording import ModuleCall

__all__ = [
    "Decline",
    "Rule",
    "RuleCall",
    "RuleHandle",
    "declares_kronecker",
    "register_rule",
    "rule_for",
    "rule_name",
]


class Decline(Exception):
    """Raised by a rule that does not handle this call; the generic rule handles it instead.

    Args:
        reason: Why the rule declines, for the engine's ``DEBUG`` log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False, slots=True)
class RuleCall:
    """One module call of the recorded forward pass, as a rule sees it.

    Attributes:
        module: The module called.
        args: Its positional inputs as recorded (still attached to the autograd graph).
        kwargs: Its keyword inputs as recorded.
        output: Its output as it returned it.
        probe: The same call in a forward pass of the first sample alone (with the attributes
            ``args``, ``kwargs`` and ``output``), or ``None``. An axis that shrinks from
            :math:`N` to 1 there is a tensor's sample axis; :meth:`sample_axis` reads it.
        output_grads: For every tensor leaf of ``output`` (in ``torch.utils._pytree``
            order), the backpropagated columns ``[K, *leaf.shape]``, or ``None`` where nothing
            flows back.
        params: The parameters the engine needs factors for, by name relative to ``module``
            (``"weight"``, or ``"out_proj.weight"`` for a parameter of a submodule).
        num_samples: The batch size :math:`N`.
        num_columns: The number :math:`K` of backpropagated columns per sample.
        create_graph: Whether the factors must stay differentiable (for higher derivatives);
            if not, the rule may (and :meth:`single_input` does) detach what it keeps.
        max_chunk_bytes: Bound on the bytes of intermediate tensors the factors materialise at
            once (``KroneckerFactor(..., max_chunk_bytes=...)``).
    """

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    probe: ModuleCall | None
    output_grads: list[Tensor | None]
    params: dict[str, Tensor]
    num_samples: int
    num_columns: int
    create_graph: bool
    max_chunk_bytes: int

    def _only_input(self) -> Tensor:
        if len(self.args) != 1 or self.kwargs or not isinstance(self.args[0], Tensor):
            raise Decline("the call has other inputs than one positional tensor")
        return self.args[0]

    def single_input(self) -> Tensor:
        """The call's only input, detached unless ``create_graph``.

        Raises:
            Decline: If the call has other inputs than one positional tensor.
        """
        x = self._only_input()
        return x if self.create_graph else x.detach()

    def output_grad(self) -> Tensor:
        """The columns ``[K, *output.shape]`` backpropagated to the call's only output.

        Raises:
            Decline: If the output is not a single tensor.
        """
        if not isinstance(self.output, Tensor):
            raise Decline("the output is not a single tensor")
        grad = self.output_grads[0]
        # The engine calls no rule for a call whose outputs receive nothing.
        assert grad is not None
        return grad

    def sample_axis(self, tensor: Tensor, probe: Tensor | None = None) -> int | None:
        """The axis of ``tensor`` that indexes samples, ``None`` if all samples share it.

        Args:
            tensor: A tensor of the call (an input, the output, or a detached copy of one).
            probe: The same tensor in :attr:`probe`, the call on the first sample alone. With
                it, the sample axis is the one axis that shrinks to 1; without it, the shape
                decides: axis 0 if it has size :math:`N` (axis 1 first for a module with
                ``batch_first=False``), else the only other axis of that size before the last.
        """
        batch_first = getattr(self.module, "batch_first", True) is not False
        return sample_axis(tensor, self.num_samples, batch_first, probe=probe)

    def input_sample_axis(self) -> int:
        """The sample axis of the call's only input (read from the probe call where there is one).

        Raises:
            Decline: If the call has other inputs than one positional tensor, or if that input
                has no sample axis.
        """
        x = self._only_input()
        probe = self.probe
        probe_input = probe.args[0] if probe is not None and len(probe.args) == 1 else None
        axis = self.sample_axis(x, probe_input)
        if axis is None:
            raise Decline(f"the input of shape {tuple(x.shape)} has no sample axis")
        return axis


class Rule(Protocol):
    """What :func:`register_rule` takes: any callable ``rule(call: RuleCall) -> dict[str, Factor]``.

    A function, a bound method or an object with ``__call__``. It returns ``{name: factor}``
    with, for every name in ``call.params``, a factor of that parameter's shape with
    ``call.num_columns`` columns and ``call.num_samples`` samples; entries for other names are
    ignored. It raises :class:`Decline` if it does not handle the call (factors for only some of
    the names count as a decline, too); the generic rule then handles the call. Anything but a
    dict of factors is a ``TypeError``, a factor of another shape a ``ValueError``.
    """

    def __call__(self, call: RuleCall) -> dict[str, Factor]:
        """Return the factors of the call's parameters, by name relative to ``call.module``."""


#: Every registration per module class, the active one last.
_registrations: dict[type[nn.Module], list[RuleHandle]] = {}
#: The active rule per module class: the engine's lookup, one dict access per call.
_active: dict[type[nn.Module], Rule] = {}


class RuleHandle:
    """A registration made by :func:`register_rule`; :meth:`remove` undoes it.

    Also a context manager that removes the registration on exit.

    Attributes:
        module_type: The module class the rule is registered for.
        rule: The rule.
        kronecker: What the rule declared about its weight's factor (:func:`register_rule`).
    """

    def __init__(self, module_type: type[nn.Module], rule: Rule, kronecker: bool | None) -> None:
        self.module_type = module_type
        self.rule = rule
        self.kronecker = kronecker

    def remove(self) -> None:
        """Undo the registration: the rule registered before it (if any) is active again.

        Removing a registration twice, or one that a later registration replaced, is allowed:
        registrations are a stack per module class, and each removes only itself.
        """
        stack = _registrations.get(self.module_type, [])
        if self not in stack:
            return
        stack.remove(self)
        if stack:
            _active[self.module_type] = stack[-1].rule
        else:
            del _registrations[self.module_type]
            del _active[self.module_type]

    def __enter__(self) -> RuleHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"RuleHandle({self.module_type.__qualname__}, {rule_name(self.rule)})"


def register_rule(
    module_type: type[nn.Module],
    rule: Rule,
    *,
    replace: bool = False,
    kronecker: bool | None = None,
) -> RuleHandle:
    """Use ``rule`` for every call of a module whose class is exactly ``module_type``.

    Args:
        module_type: A subclass of :class:`torch.nn.Module`. Its subclasses are not covered:
            register them separately.
        rule: The :class:`Rule`, called as ``rule(call: RuleCall) -> dict[str, Factor]``.
        replace: Allow replacing a rule already registered for ``module_type`` (a built-in
            one included); the handle's :meth:`~RuleHandle.remove` brings it back.
        kronecker: Declares the kind of factor the rule gives the module's ``weight``: ``True``
            for a factor of KFAC's form (:attr:`~curvkit.engines.Factor.kronecker_outputs`,
            a :class:`~curvkit.engines.KroneckerFactor`), ``False`` for none, ``None`` (not
            declared) to decide from the factors when they are computed. KFAC covers the
            weight of a module whose rule declares ``True`` and refuses, before computing
            anything, one whose rule declares ``False`` (:func:`declares_kronecker`).

    Returns:
        A handle whose :meth:`~RuleHandle.remove` undoes the registration.

    Raises:
        TypeError: If ``module_type`` is not a subclass of :class:`torch.nn.Module`, or if
            ``rule`` is not callable.
        ValueError: If a rule is registered for ``module_type`` already and ``replace`` is
            false.
    """
    if not isinstance(module_type, type):
        raise TypeError(
            f"module_type must be a class (a subclass of torch.nn.Module), got {module_type!r}"
        )
    if not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type must be a subclass of torch.nn.Module, got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable as rule(call) -> dict[str, Factor], got {rule!r}")
    if module_type in _active and not replace:
        raise ValueError(
            f"a rule is registered for {module_type.__qualname__} already "
            f"({rule_name(_active[module_type])}); pass replace=True to replace it"
        )
    if kronecker is not None and not isinstance(kronecker, bool):
        raise TypeError(f"kronecker must be True, False or None, got {kronecker!r}")
    handle = RuleHandle(module_type, rule, kronecker)
    _registrations.setdefault(module_type, []).append(handle)
    _active[module_type] = rule
    return handle


def rule_for(module_type: type[nn.Module]) -> Rule | None:
    """The rule registered for exactly ``module_type`` (not for a base class), or ``None``."""
    return _active.get(module_type)


def declares_kronecker(module_type: type[nn.Module]) -> bool | None:
    """What the active rule for exactly ``module_type`` declares about its weight's factor.

    Returns:
        ``True`` (a factor of KFAC's form), ``False`` (none, or no rule registered) or ``None``
        (a rule that did not declare it: its factors decide when they are computed).
    """
    stack = _registrations.get(module_type)
    return stack[-1].kronecker if stack else False


def rule_name(rule: Rule) -> str:
    """The rule's qualified name (``module.function``) for messages, its ``repr`` if it has none."""
    name = getattr(rule, "__qualname__", None)
    return repr(rule) if name is None else f"{getattr(rule, '__module__', '?')}.{name}"
