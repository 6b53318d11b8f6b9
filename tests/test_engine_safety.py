"""compute_factors leaves models alone, refuses what it cannot do, and explains bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import curvkit
from curvkit.engines import compute_factors, iter_factors
from curvkit.engines import recording as recording_module
from curvkit.testing.verify import reference_factor_columns, reference_ggn
from curvkit.testing.zoo import make_case


def _state(model: nn.Module) -> dict[str, object]:
    """Everything a call could leave behind on a model."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [p.grad for p in model.parameters()],
        "modules": [
            (
                sorted(vars(m)),
                dict(m._forward_hooks),
                dict(m._forward_pre_hooks),
                dict(m._backward_hooks),
                dict(m._forward_hooks_with_kwargs),
                m.training,
            )
            for m in model.modules()
        ],
        "params": [(sorted(vars(p)), p.requires_grad) for p in model.parameters()],
    }


def _assert_same_state(before: dict[str, object], after: dict[str, object]) -> None:
    for key, tensor in before["tensors"].items():  # type: ignore[union-attr]
        assert torch.equal(tensor, after["tensors"][key])  # type: ignore[index]
    assert before["grads"] == after["grads"]
    assert before["modules"] == after["modules"]
    assert before["params"] == after["params"]


@pytest.mark.parametrize("name", ["cnn2d_batchnorm_eval", "attention_batch_first", "in_place"])
def test_no_mutation_and_repeatable(name: str) -> None:
    case = make_case(name, 4)
    model, inputs = case.model, case.inputs
    params = list(model.parameters())
    before = _state(model)
    inputs_before = [x.clone() for x in inputs]
    first = compute_factors(model, inputs, params, lambda out: out[None].expand(2, *out.shape))
    _assert_same_state(before, _state(model))
    for x, x_before in zip(inputs, inputs_before, strict=True):
        assert torch.equal(x, x_before)
    second = compute_factors(model, inputs, params, lambda out: out[None].expand(2, *out.shape))
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a.dense(), b.dense())


class _Boom(Exception):
    pass


def test_nothing_left_behind_on_error_in_columns() -> None:
    case = make_case("attention_batch_first", 3)
    model, inputs = case.model, case.inputs
    before = _state(model)

    def backprop_columns(outputs: Tensor) -> Tensor:
        raise _Boom

    with pytest.raises(_Boom):
        compute_factors(model, inputs, list(model.parameters()), backprop_columns)
    _assert_same_state(before, _state(model))


def test_nothing_left_behind_on_error_in_forward() -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            self.inner(x)
            raise _Boom

    model = Failing()
    before = _state(model)
    with pytest.raises(_Boom):
        compute_factors(model, torch.randn(2, 3), list(model.parameters()), lambda o: o[None])
    _assert_same_state(before, _state(model))
    # The torch function mode that watches parameter uses is gone too.
    assert not torch.overrides._get_current_function_mode_stack()


def test_in_place_changes_need_the_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the version check, in-place changes of recorded tensors give wrong factors."""
    case = make_case("in_place", 5)
    model, inputs = case.model, case.inputs
    params = list(model.parameters())
    columns = torch.randn(2, 5, 8, dtype=torch.float64)
    expected = reference_factor_columns(model, inputs, columns, params)
    monkeypatch.setattr(recording_module, "_changed_in_place", lambda call: False)
    try:
        _, factors = compute_factors(model, inputs, params, lambda out: columns)
    except ValueError:
        return  # the generic rule's recomputation check noticed the stale inputs
    assert any(not torch.allclose(f.dense(), r) for f, r in zip(factors, expected, strict=True))


def test_batchnorm_in_train_mode_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        compute_factors(model, torch.randn(5, 3), list(model.parameters()), lambda o: o[None])
    model.eval()
    compute_factors(model, torch.randn(5, 3), list(model.parameters()), lambda o: o[None])
    model[1].track_running_stats = False
    model[1].running_mean = model[1].running_var = None
    with pytest.raises(ValueError, match="statistics of the batch"):
        compute_factors(model, torch.randn(5, 3), list(model.parameters()), lambda o: o[None])


def test_module_mixing_samples_is_refused() -> None:
    """The generic rule's recomputation on single samples catches a module that mixes."""

    class Centering(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x: Tensor) -> Tensor:
            return self.scale * (x - x.mean(dim=0))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)
            self.centering = Centering()

        def forward(self, x: Tensor, offset: Tensor) -> Tensor:
            return self.centering(self.linear(x) + offset)

    model = Model()
    # The shared `offset` input turns the whole-model check off: the module check remains.
    inputs = (torch.randn(4, 3), torch.randn(3))
    with pytest.raises(ValueError, match=r"Centering.*not independent.*model\.eval\(\)"):
        compute_factors(model, inputs, list(model.parameters()), lambda o: o[None])


def test_bad_inputs_get_clear_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    params = list(model.parameters())
    x = torch.randn(4, 3)
    ok = lambda o: o[None]  # noqa: E731
    with pytest.raises(ValueError, match="not a parameter of the model"):
        compute_factors(model, x, [nn.Parameter(torch.zeros(2))], ok)
    with pytest.raises(ValueError, match="list each parameter once"):
        compute_factors(model, x, [params[0], params[0]], ok)
    frozen = copy.deepcopy(model)
    frozen[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        compute_factors(frozen, x, list(frozen.parameters()), ok)
    with pytest.raises(TypeError, match="sequence of parameters"):
        compute_factors(model, x, params[0], ok)
    with pytest.raises(TypeError, match="not a tensor"):
        compute_factors(model, x, [1.0], ok)
    with pytest.raises(TypeError, match="inputs must be"):
        compute_factors(model, 3.0, params, ok)
    with pytest.raises(ValueError, match=r"shape \[K, \*\(4, 2\)\]"):
        compute_factors(model, x, params, lambda o: o)
    with pytest.raises(ValueError, match=r"shape \[K, \*\(4, 2\)\]"):
        compute_factors(model, x, params, lambda o: torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="K >= 1"):
        compute_factors(model, x, params, lambda o: o[None][:0])
    with pytest.raises(ValueError, match="float64"):
        compute_factors(model, x, params, lambda o: o[None].double())
    with pytest.raises(TypeError, match="must return a Tensor"):
        compute_factors(model, x, params, lambda o: [o])
    tuple_model = nn.MultiheadAttention(2, 1, batch_first=True)
    y = torch.randn(4, 3, 2)
    with pytest.raises(TypeError, match="one tensor"):
        compute_factors(tuple_model, (y, y, y), list(tuple_model.parameters()), ok)


@pytest.mark.parametrize(
    "name", ["sequence_layernorm", "attention_batch_first", "cnn1d", "cnn2d_batchnorm_eval"]
)
def test_create_graph_keeps_factors_differentiable(name: str) -> None:
    case = make_case(name, 3)
    model, inputs = case.model, case.inputs
    params = list(model.parameters())
    with torch.no_grad():
        columns = torch.randn(2, *model(*inputs).shape, dtype=torch.float64)
    _, factors = compute_factors(model, inputs, params, lambda out: columns, create_graph=True)
    expected = reference_factor_columns(model, inputs, columns, params, create_graph=True)
    weights = [torch.randn_like(r) for r in expected]
    ours = sum((f.dense() * w).sum() for f, w in zip(factors, weights, strict=True))
    theirs = sum((r * w).sum() for r, w in zip(expected, weights, strict=True))
    grads = torch.autograd.grad(ours, params, allow_unused=True)
    reference = torch.autograd.grad(theirs, params, allow_unused=True, materialize_grads=True)
    for g, r in zip(grads, reference, strict=True):
        g = torch.zeros_like(r) if g is None else g
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)
    assert any(g.abs().max() > 0 for g in reference)
    _, plain = compute_factors(model, inputs, params, lambda out: columns)
    assert not any(f.dense().requires_grad for f in plain)


def _gram_like(factors: list) -> list[Tensor]:
    """Quantities that add up over chunks of columns: diagonal and V V^T M."""
    out = []
    for f in factors:
        probe = torch.ones(1, *f.param_shape, dtype=torch.float64)
        out += [f.diag(), f.mat(f.t_mat(probe))]
    return out


@pytest.mark.parametrize(
    ("sample_chunk_size", "column_chunk_size"), [(None, 2), (3, None), (2, 1), (None, None)]
)
def test_iter_factors_chunks_add_up(
    sample_chunk_size: int | None, column_chunk_size: int | None
) -> None:
    case = make_case("cnn1d", 7)
    model, inputs = case.model, case.inputs
    params = list(model.parameters())
    columns = torch.randn(3, 7, 2, dtype=torch.float64)
    _, factors = compute_factors(model, inputs, params, lambda out: columns)
    expected = _gram_like(factors)
    total = [torch.zeros_like(e) for e in expected]
    covered = torch.zeros(3, 7)
    calls = []
    for chunk in iter_factors(
        model,
        inputs,
        params,
        lambda out: calls.append(out) or columns,
        sample_chunk_size=sample_chunk_size,
        column_chunk_size=column_chunk_size,
    ):
        covered[chunk.columns, chunk.samples] += 1
        assert chunk.outputs.shape[0] == chunk.factors[0].num_samples
        for f in chunk.factors:
            dense = f.dense()
            assert dense.shape[:2] == columns[chunk.columns, chunk.samples].shape[:2]
        total = [t + c for t, c in zip(total, _gram_like(chunk.factors), strict=True)]
    assert len(calls) == 1 and calls[0].shape[0] == 7  # columns from the whole batch, once
    assert torch.equal(covered, torch.ones(3, 7))
    for t, e in zip(total, expected, strict=True):
        assert torch.allclose(t, e, rtol=1e-10, atol=1e-14)


def test_iter_factors_bad_chunks() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="positive"):
        list(
            iter_factors(model, x, list(model.parameters()), lambda o: o[None], column_chunk_size=0)
        )

    class WithShared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x: Tensor, offset: Tensor) -> Tensor:
            return self.linear(x) + offset

    shared = WithShared()
    with pytest.raises(ValueError, match="along axis 0"):
        list(
            iter_factors(
                shared,
                (x, torch.ones(2)),
                list(shared.parameters()),
                lambda o: o[None],
                sample_chunk_size=2,
            )
        )


def test_param_used_outside_every_holding_call_goes_through_the_chain_rule() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    model.register_forward_pre_hook(lambda module, args: (args[0] * model[0].bias,))
    inputs, targets = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    diag = curvkit.diag_ggn(model, nn.MSELoss(), (inputs, targets))
    expected = reference_ggn(model, nn.MSELoss(), inputs, targets).diagonal()
    torch.testing.assert_close(torch.cat([d.flatten() for d in diag]), expected)
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_recorded_output_changed_through_a_kept_reference_is_refused() -> None:
    class KeepsOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.last: Tensor | None = None

        def forward(self, x: Tensor) -> Tensor:
            self.last = x * self.scale
            return self.last

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.child = KeepsOutput()

        def forward(self, x: Tensor) -> Tensor:
            y = self.child(x)
            self.child.last.mul_(2.0)  # the recorded output itself, not the copy handed on
            return y * 1.0

    model = Parent()
    with pytest.raises(RuntimeError, match="changed in place"):
        compute_factors(model, torch.randn(4, 3), list(model.parameters()), lambda o: o[None])


def test_user_hook_changing_an_output_in_place() -> None:
    """A user's forward hook that changes a recorded output in place sees a copy instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    handle = model[0].register_forward_hook(lambda module, args, output: output.tanh_())
    x = torch.randn(5, 3, dtype=torch.float64)
    params = list(model.parameters())
    columns = torch.randn(2, 5, 2, dtype=torch.float64)
    _, factors = compute_factors(model, x, params, lambda out: columns)
    expected = reference_factor_columns(model, (x,), columns, params)
    for factor, reference in zip(factors, expected, strict=True):
        assert torch.allclose(factor.dense(), reference, rtol=1e-10, atol=1e-12)
    assert list(model[0]._forward_hooks) == [handle.id]


def test_param_use_hidden_from_the_tracker_is_refused() -> None:
    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(2, 3))

        def forward(self, x: Tensor) -> Tensor:
            with torch._C.DisableTorchFunction():  # hides the use from torch function modes
                return x @ self.weight.T

    model = Hidden()
    with pytest.raises(RuntimeError, match="saw no torch function receive it"):
        compute_factors(model, torch.randn(4, 3), list(model.parameters()), lambda o: o[None])


@pytest.mark.parametrize(
    "mixing",
    [
        lambda x: x - x.mean(dim=0),  # an operation across samples in a forward
        nn.Dropout(0.5).train(),  # randomness: the output of a sample is not a function
    ],
)
def test_parameter_free_sample_mixing_is_refused(mixing) -> None:
    class Mixing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(3, 4)
            self.second = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.second(mixing(self.first(x)))

    model = Mixing()
    before = _state(model)
    with pytest.raises(ValueError, match=r"changes with the other samples.*model\.eval\(\)"):
        compute_factors(model, torch.randn(6, 3), list(model.parameters()), lambda o: o[None])
    _assert_same_state(before, _state(model))


@pytest.mark.parametrize("first", [nn.Linear(4, 3), nn.Conv1d(1, 3, 2)])
def test_factor_of_an_input_changed_in_place_afterwards_refuses(first: nn.Module) -> None:
    model = nn.Sequential(first, nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(5, 4) if isinstance(first, nn.Linear) else torch.randn(5, 1, 4)
    model(x)  # materialise the lazy layer
    _, factors = compute_factors(model, x, list(model.parameters()), lambda o: o[None])
    factors[0].diag()
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match="changed in place after the factor was computed"):
        factors[0].diag()
