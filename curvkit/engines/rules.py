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

from curvkit.engines.factor import Factor
from curvkit.engines.generic import generic_factors
from curvkit.engines.layer_rules import BUILTIN_RULES, KRONECKER_RULES
from curvkit.engines.recording import ModuleCall
from curvkit.engines.registry import Decline, Rule, RuleCall, register_rule, rule_for, rule_name

__all__ = ["factors_for_call"]

logger = logging.getLogger(__name__)

# The layer math knows nothing of the registry: the built-ins are registered where they are used.
for _module_type, _rule in BUILTIN_RULES.items():
    register_rule(_module_type, _rule, kronecker=_rule in KRONECKER_RULES)


def _checked(rule: Rule, call: RuleCall, factors: object) -> dict[str, Factor]:
    """``factors`` if it holds a well-shaped factor for every parameter of ``call``.

    Raises:
        Decline: If factors are missing for some of the parameters.
        TypeError: If ``factors`` is not a dict of factors.
        ValueError: If a factor has the wrong parameter shape or number of columns or samples.
    """
    if not isinstance(factors, dict):
        raise TypeError(
            f"the rule {rule_name(rule)} for {type(call.module).__qualname__} returned "
            f"{type(factors).__name__}, not a dict of factors (a rule declines by raising Decline)"
        )
    for name, param in call.params.items():
        factor = factors.get(name)
        if factor is None:
            missing = [name for name in call.params if name not in factors]
            raise Decline(f"the rule returned no factor for {', '.join(missing)}")
        if not isinstance(factor, Factor):
            raise TypeError(
                f"the rule {rule_name(rule)} for {type(call.module).__qualname__} returned "
                f"{type(factor).__name__} for {name!r}, not a Factor"
            )
        if (
            factor.param_shape != param.shape
            or factor.num_columns != call.num_columns
            or factor.num_samples != call.num_samples
        ):
            raise ValueError(
                f"the rule {rule_name(rule)} for {type(call.module).__qualname__} returned a "
                f"factor for {name!r} with param_shape {tuple(factor.param_shape)}, "
                f"{factor.num_columns} columns and {factor.num_samples} samples; expected "
                f"{tuple(param.shape)}, {call.num_columns} columns and {call.num_samples} samples"
            )
    return factors


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
    grad = next((g for g in output_grads if g is not None), None)
    if grad is None:
        return {}
    num_columns = grad.shape[0]
    named_params = {name: params[index] for index, name in call.params.items()}
    factors = None
    rule = rule_for(type(call.module))
    if rule is not None:
        rule_call = RuleCall(
            module=call.module,
            args=call.args,
            kwargs=call.kwargs,
            output=call.output,
            probe=call.probe,
            output_grads=output_grads,
            params=named_params,
            num_samples=num_samples,
            num_columns=num_columns,
            create_graph=create_graph,
            max_chunk_bytes=max_chunk_bytes,
        )
        try:
            factors = _checked(rule, rule_call, rule(rule_call))
        except Decline as decline:
            logger.debug(
                "%s: the rule %s declines (%s); using the generic rule",
                type(call.module).__qualname__,
                rule_name(rule),
                decline.reason,
            )
    if factors is None:
        factors = generic_factors(
            call,
            named_params,
            output_grads,
            num_samples,
            create_graph=create_graph,
            max_chunk_bytes=max_chunk_bytes,
        )
    return {index: factors[name] for index, name in call.params.items()}
