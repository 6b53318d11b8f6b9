"""The open rule registry: lookup by exact type, user rules, declines, checks, registration."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

import curvkit
from curvkit.engines import (
    Decline,
    DenseFactor,
    Factor,
    KroneckerFactor,
    RuleCall,
    RuleHandle,
    compute_factors,
    register_rule,
    rule_for,
)
from curvkit.engines.layer_rules import (
    BUILTIN_RULES,
    conv_rule,
    embedding_rule,
    linear_rule,
    norm_rule,
)
from curvkit.testing.verify import reference_diag_ggn, reference_ggn

LOGGER = "curvkit.engines.rules"
Register = Callable[..., RuleHandle]


class Scale(nn.Module):
    """A user's layer: ``y = x * weight + bias`` over the last axis."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))
        self.bias = nn.Parameter(torch.randn(features))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight + self.bias


def scale_columns(call: RuleCall) -> tuple[Tensor, Tensor]:
    """Per-sample, per-column gradients of ``Scale``'s weight and bias, summed over positions."""
    x = call.single_input()
    if call.input_sample_axis() != 0:
        raise Decline("samples are not on the first axis")
    b = call.output_grad()
    k, n, features = b.shape[0], call.num_samples, x.shape[-1]
    return (b * x).reshape(k, n, -1, features).sum(2), b.reshape(k, n, -1, features).sum(2)


class CountingRule:
    """A correct rule for ``Scale`` that remembers the calls it handled."""

    def __init__(self) -> None:
        self.calls: list[RuleCall] = []

    def __call__(self, call: RuleCall) -> dict[str, Factor]:
        self.calls.append(call)
        weight, bias = scale_columns(call)
        module = call.module
        return {
            "weight": DenseFactor(weight, module.weight.shape),
            "bias": DenseFactor(bias, module.bias.shape),
        }


@pytest.fixture
def register() -> Iterator[Register]:
    """``register_rule`` whose registrations are all removed when the test ends."""
    handles: list[RuleHandle] = []
    before = {module_type: rule_for(module_type) for module_type in (*BUILTIN_RULES, Scale)}

    def register_for_test(*args: object, **kwargs: object) -> RuleHandle:
        handle = register_rule(*args, **kwargs)
        handles.append(handle)
        return handle

    yield register_for_test
    for handle in reversed(handles):
        handle.remove()
    assert {module_type: rule_for(module_type) for module_type in before} == before


def scale_model(sequence: bool) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    length = 2 if sequence else 1
    model = nn.Sequential(
        nn.Linear(4, 5),
        Scale(5),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(5 * length, 3),
    ).double()
    return model, ((length, 4) if sequence else (4,))


def assert_matches_reference(
    model: nn.Module, num_samples: int, input_shape: tuple[int, ...], reduction: str
) -> None:
    """``diag_ggn`` and ``ggn_matrix`` against the plain-autograd references, in float64."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(num_samples, *input_shape, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (num_samples,), generator=generator)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    diagonal = curvkit.diag_ggn(model, loss_fn, (inputs, targets))
    expected = reference_diag_ggn(model, loss_fn, inputs, targets)
    for actual, reference in zip(diagonal, expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        curvkit.ggn_matrix(model, loss_fn, (inputs, targets)),
        reference_ggn(model, loss_fn, inputs, targets),
        rtol=1e-10,
        atol=1e-12,
    )


def test_builtin_rules_are_found_by_exact_type() -> None:
    assert rule_for(nn.Linear) is linear_rule
    assert rule_for(nn.modules.linear.NonDynamicallyQuantizableLinear) is linear_rule
    assert all(rule_for(conv) is conv_rule for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    assert rule_for(nn.Embedding) is embedding_rule
    assert all(rule_for(module_type) is rule for module_type, rule in BUILTIN_RULES.items())
    assert rule_for(nn.LayerNorm) is norm_rule
    assert rule_for(nn.InstanceNorm2d) is None


def test_subclass_goes_to_the_generic_rule_until_registered(register: Register) -> None:
    class PlainSubclass(nn.Linear):
        pass

    assert rule_for(PlainSubclass) is None
    torch.manual_seed(0)
    model = nn.Sequential(PlainSubclass(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    inputs = torch.randn(3, 4, dtype=torch.float64)
    params = list(model.parameters())
    _, generic = compute_factors(model, inputs, params, lambda out: out[None])
    assert isinstance(generic[0], DenseFactor)
    assert isinstance(generic[2], KroneckerFactor)  # the plain Linear

    register(PlainSubclass, linear_rule)
    _, structured = compute_factors(model, inputs, params, lambda out: out[None])
    assert isinstance(structured[0], KroneckerFactor)
    for fast, slow in zip(structured, generic, strict=True):
        torch.testing.assert_close(fast.dense(), slow.dense(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sequence", [False, True], ids=["flat", "sequence"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_user_rule_is_used_and_exact(
    register: Register, num_samples: int, reduction: str, sequence: bool
) -> None:
    rule = CountingRule()
    register(Scale, rule)
    model, input_shape = scale_model(sequence)
    assert_matches_reference(model, num_samples, input_shape, reduction)
    assert rule.calls, "the registered rule was not called"
    assert all(call.module is model[1] for call in rule.calls)
    assert {call.num_samples for call in rule.calls} == {num_samples}
    assert set(rule.calls[0].params) == {"weight", "bias"}


def test_rule_gets_only_the_requested_parameters(register: Register) -> None:
    rule = CountingRule()
    register(Scale, rule)
    model, _ = scale_model(sequence=False)
    inputs = torch.randn(3, 4, dtype=torch.float64)
    _, factors = compute_factors(model, inputs, [model[1].bias], lambda out: out[None])
    assert list(rule.calls[0].params) == ["bias"]
    assert rule.calls[0].params["bias"] is model[1].bias
    assert isinstance(factors[0], DenseFactor)


def test_declining_rule_is_logged_and_falls_back(
    register: Register, caplog: pytest.LogCaptureFixture
) -> None:
    def declining(call: RuleCall) -> dict[str, Factor]:
        raise Decline("this layout is not supported here")

    register(Scale, declining)
    model, input_shape = scale_model(sequence=False)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert_matches_reference(model, 3, input_shape, "mean")
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == LOGGER)
    assert "Scale" in messages[0]
    assert "declining" in messages[0]
    assert "this layout is not supported here" in messages[0]


def test_builtin_rule_declines_keyword_input(caplog: pytest.LogCaptureFixture) -> None:
    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(input=x)

    torch.manual_seed(0)
    model = KeywordCall().double()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert_matches_reference(model, 3, (4,), "sum")
    assert any(
        "Linear" in r.getMessage() and "one positional tensor" in r.getMessage()
        for r in caplog.records
        if r.name == LOGGER
    )


def test_partial_rule_is_a_decline(register: Register, caplog: pytest.LogCaptureFixture) -> None:
    def weight_only(call: RuleCall) -> dict[str, Factor]:
        weight, _ = scale_columns(call)
        return {"weight": DenseFactor(weight, call.module.weight.shape)}

    register(Scale, weight_only)
    model, input_shape = scale_model(sequence=False)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert_matches_reference(model, 3, input_shape, "sum")
    assert any("no factor for bias" in r.getMessage() for r in caplog.records if r.name == LOGGER)

    # Asked for the weight alone, the same rule is complete.
    weight_only_calls: list[RuleCall] = []

    def counted(call: RuleCall) -> dict[str, Factor]:
        weight_only_calls.append(call)
        return weight_only(call)

    register(Scale, counted, replace=True)
    inputs = torch.randn(3, 4, dtype=torch.float64)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        compute_factors(model, inputs, [model[1].weight], lambda out: out[None])
    assert weight_only_calls
    assert not [r for r in caplog.records if r.name == LOGGER]


def bad_rule(change: str) -> Callable[[RuleCall], object]:
    def rule(call: RuleCall) -> object:
        weight, bias = scale_columns(call)
        factors = {
            "weight": DenseFactor(weight, call.module.weight.shape),
            "bias": DenseFactor(bias, call.module.bias.shape),
        }
        if change == "param_shape":
            factors["bias"] = DenseFactor(bias[..., :-1], torch.Size([4]))
        elif change == "num_columns":
            factors["bias"] = DenseFactor(torch.cat([bias, bias]), call.module.bias.shape)
        elif change == "num_samples":
            factors["bias"] = DenseFactor(bias[:, :1], call.module.bias.shape)
        elif change == "not_a_factor":
            factors["bias"] = bias
        elif change == "not_a_dict":
            return None
        return factors

    return rule


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ("param_shape", ValueError, r"param_shape \(4,\).*expected \(5,\)"),
        ("num_columns", ValueError, "6 columns"),
        ("num_samples", ValueError, "1 samples"),
        ("not_a_factor", TypeError, "returned Tensor for 'bias', not a Factor"),
        ("not_a_dict", TypeError, "returned NoneType, not a dict"),
    ],
)
def test_wrong_factor_is_a_clear_error(
    register: Register, change: str, error: type[Exception], match: str
) -> None:
    register(Scale, bad_rule(change))
    model, input_shape = scale_model(sequence=False)
    inputs = torch.randn(2, *input_shape, dtype=torch.float64)
    targets = torch.tensor([0, 2])
    with pytest.raises(error, match=match) as info:
        curvkit.diag_ggn(model, nn.CrossEntropyLoss(), (inputs, targets))
    assert "bad_rule.<locals>.rule for Scale" in str(info.value)


def test_other_exceptions_propagate(register: Register) -> None:
    def broken(call: RuleCall) -> dict[str, Factor]:
        raise RuntimeError("a bug in the rule")

    register(Scale, broken)
    model, input_shape = scale_model(sequence=False)
    inputs = torch.randn(2, *input_shape, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="a bug in the rule"):
        curvkit.diag_ggn(model, nn.CrossEntropyLoss(), (inputs, torch.tensor([0, 1])))


def test_remove_restores_the_previous_rule(register: Register) -> None:
    first, second = CountingRule(), CountingRule()
    handle = register(Scale, first)
    assert rule_for(Scale) is first
    with register(Scale, second, replace=True) as replacement:
        assert rule_for(Scale) is second
    assert rule_for(Scale) is first
    replacement.remove()  # twice: nothing left to undo
    assert rule_for(Scale) is first
    handle.remove()
    assert rule_for(Scale) is None

    # Registrations form a stack per class: removing a replaced one keeps the newer active.
    linear = register(nn.Linear, first, replace=True)
    newer = register(nn.Linear, second, replace=True)
    linear.remove()
    assert rule_for(nn.Linear) is second
    newer.remove()
    assert rule_for(nn.Linear) is linear_rule
    assert "Linear" in repr(newer)


def test_registration_errors(register: Register) -> None:
    with pytest.raises(TypeError, match="must be a class"):
        register_rule(nn.Linear(2, 2), linear_rule)
    with pytest.raises(TypeError, match=r"subclass of torch\.nn\.Module"):
        register_rule(int, linear_rule)
    with pytest.raises(TypeError, match="rule must be callable"):
        register_rule(Scale, "scale_rule")
    with pytest.raises(ValueError, match="replace=True"):
        register_rule(nn.Linear, CountingRule())
    register(Scale, CountingRule())
    with pytest.raises(ValueError, match="a rule is registered for Scale already"):
        register_rule(Scale, CountingRule())
