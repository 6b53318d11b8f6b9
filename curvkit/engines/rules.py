r"""Per-call dispatch: turn a recorded call and the columns at its output into factors.

:func:`factors_for_call` looks up the rule registered for the exact class of the call's module
(:mod:`curvkit.engines.registry`; the built-in ones are in :mod:`curvkit.engines.layer_rules`
and registered when this module is imported), runs it and checks its factors. A call without a
rule, and a call its rule declines (a :class:`~curvkit.engines.Decline`, or factors for only
some of the call's parameters), goes to the generic :mod:`torch.func` rule
(``curvkit.engines.generic``); a decline is logged at ``DEBUG`` level on this module's logger,
``curvkit.engines.rules``.
"""

from __future__ import annotations

import logging

from torch import Tensor

from curvkit.engines.factor import DenseFactor, Factor
from curvkit.engines.generic import generic_columns
from curvkit.engines.layer_rules import BUILTIN_RULES
from curvkit.engines.recording import ModuleCall
from curvkit.engines.registry import Decline, Rule, RuleCall, register_rule, rule_for

__all__ = ["factors_for_call"]

logger = logging.getLogger(__name__)

for _module_type, _rule in BUILTIN_RULES.items():
    register_rule(_module_type, _rule)


def _rule_name(rule: Rule) -> str:
    name = getattr(rule, "__qualname__", None)
    return repr(rule) if name is None else f"{getattr(rule, '__module__', '?')}.{name}"


def _checked(rule: Rule, call: RuleCall, factors: object) -> dict[str, Factor]:
    """``factors`` if it holds a well-shaped factor for every parameter of ``call``.

    Raises:
        Decline: If factors are missing for some of the parameters.
        TypeError: If ``factors`` is not a dict of factors.
        ValueError: If a factor has the wrong parameter shape or number of columns or samples.
    """
    module_name = type(call.module).__qualname__
    if not isinstance(factors, dict):
        raise TypeError(
            f"the rule {_rule_name(rule)} for {module_name} returned {type(factors).__name__}, "
            "not a dict of factors (a rule declines by raising Decline)"
        )
    missing = [name for name in call.params if name not in factors]
    if missing:
        raise Decline(f"the rule returned no factor for {', '.join(missing)}")
    expected = (call.num_columns, call.num_samples)
    for name, param in call.params.items():
        factor = factors[name]
        if not isinstance(factor, Factor):
            raise TypeError(
                f"the rule {_rule_name(rule)} for {module_name} returned "
                f"{type(factor).__name__} for {name!r}, not a Factor"
            )
        shape = (factor.param_shape, factor.num_columns, factor.num_samples)
        if shape != (param.shape, *expected):
            raise ValueError(
                f"the rule {_rule_name(rule)} for {module_name} returned a factor for {name!r} "
                f"with param_shape {tuple(factor.param_shape)}, {factor.num_columns} columns "
                f"and {factor.num_samples} samples; expected {tuple(param.shape)}, "
                f"{expected[0]} columns and {expected[1]} samples"
            )
    return factors


def _generic_factors(
    call: ModuleCall,
    output_grads: list[Tensor | None],
    params: list[Tensor],
    num_samples: int,
    *,
    create_graph: bool,
    max_chunk_bytes: int,
) -> dict[int, Factor]:
    """The generic rule's factors, in chunks of samples bounded by ``max_chunk_bytes``."""
    named = {name: params[index] for index, name in call.params.items()}
    k = next(g for g in output_grads if g is not None).shape[0]
    per_sample_bytes = k * sum(p.numel() for p in named.values()) * params[0].element_size()
    chunk_size = max(1, max_chunk_bytes // max(per_sample_bytes, 1))
    columns = generic_columns(
        call,
        named,
        output_grads,
        num_samples,
        create_graph=create_graph,
        chunk_size=min(chunk_size, num_samples),
    )
    return {
        index: DenseFactor(columns[name], params[index].shape)
        for index, name in call.params.items()
    }


def factors_for_call(
    call: ModuleCall,
    output_grads: list[Tensor | None],
    params: list[Tensor],
    num_samples: int,
    *,
    create_graph: bool,
    max_chunk_bytes: int,
) -> dict[int, Factor]:
    """The factors one call contributes to its attributed parameters.

    Args:
        call: The recorded call; ``call.params`` names the parameters attributed to it.
        output_grads: For every tensor leaf of ``call.output``, the columns ``[K, *leaf.shape]``
            backpropagated to it, or ``None`` where nothing flows back.
        params: All requested parameters (indexed by ``call.params``).
        num_samples: The batch size :math:`N`.
        create_graph: Whether the factors must stay differentiable.
        max_chunk_bytes: Memory bound for intermediate tensors.

    Returns:
        ``parameter index -> factor``; parameters receiving nothing are left out.

    Raises:
        TypeError, ValueError: If the call's rule returns something other than a factor of the
            right shape for each of the call's parameters.
    """
    if all(g is None for g in output_grads):
        return {}
    rule = rule_for(type(call.module))
    if rule is not None:
        rule_call = RuleCall(
            module=call.module,
            args=call.args,
            kwargs=call.kwargs,
            output=call.output,
            probe=call.probe,
            output_grads=output_grads,
            params={name: params[index] for index, name in call.params.items()},
            num_samples=num_samples,
            create_graph=create_graph,
            max_chunk_bytes=max_chunk_bytes,
        )
        try:
            factors = _checked(rule, rule_call, rule(rule_call))
        except Decline as decline:
            logger.debug(
                "%s: the rule %s declines (%s); using the generic rule",
                type(call.module).__qualname__,
                _rule_name(rule),
                decline.reason,
            )
        else:
            return {index: factors[name] for index, name in call.params.items()}
    return _generic_factors(
        call,
        output_grads,
        params,
        num_samples,
        create_graph=create_graph,
        max_chunk_bytes=max_chunk_bytes,
    )
