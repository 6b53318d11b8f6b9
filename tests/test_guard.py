"""Issue 13: how curvkit runs a user's model (curvkit.engines.guard): compiled, hooked, random."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvkit
from curvkit.testing.verify import reference_ggn

LOSS = nn.CrossEntropyLoss()


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


def _quantities(model: nn.Module, batch) -> list[torch.Tensor]:
    vector = [torch.ones_like(p) for p in model.parameters()]
    return [
        *curvkit.diag_ggn(model, LOSS, batch),
        curvkit.ggn_matrix(model, LOSS, batch),
        *curvkit.ggn_vector_product(model, LOSS, batch, vector=vector),
        *curvkit.damped_newton_step(model, LOSS, batch)[0],
    ]


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_compiled_models_give_the_uncompiled_results(how: str) -> None:
    model, batch = _mlp(), _batch()
    expected = _quantities(model, batch)
    copied = copy.deepcopy(model)
    if how == "torch.compile":
        compiled = torch.compile(copied, backend="aot_eager")
    else:
        copied.compile(backend="eager")
        compiled = copied
    compiled(batch[0])  # the user's own compiled call comes first
    for got, want in zip(_quantities(compiled, batch), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    chunked = curvkit.diag_ggn(compiled, LOSS, batch, sample_chunk_size=2)
    for got, want in zip(chunked, expected[: len(chunked)], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The compiled code stays in place for the user's own calls.
    if how == "module.compile":
        assert copied._compiled_call_impl is not None


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")
def test_backward_hooks_do_not_fire_and_forward_hooks_fire_once_per_pass() -> None:
    model, batch = _mlp(), _batch()
    backward, forward = [], []
    handles = [
        model[0].register_full_backward_hook(lambda m, gi, go: backward.append(go[0])),
        model[2].register_backward_hook(lambda m, gi, go: backward.append(go[0])),
        model[2].register_forward_hook(lambda m, i, o: forward.append(o.shape[0])),
        model[2].register_forward_pre_hook(lambda m, i: forward.append(i[0].shape[0])),
    ]
    hooks = [dict(m._backward_hooks) for m in model.modules()]
    curvkit.diag_ggn(model, LOSS, batch)
    curvkit.damped_newton_step(model, LOSS, batch)
    curvkit.ggn_vector_product(
        model, LOSS, batch, vector=[torch.ones_like(p) for p in model.parameters()]
    )
    assert backward == []
    # pre-hook and hook once per pass on the whole batch: one pass for diag_ggn and for
    # damped_newton_step, two for ggn_vector_product (J u in forward mode, then J^T H J u)
    assert forward == [5, 5] * 4
    assert [dict(m._backward_hooks) for m in model.modules()] == hooks
    # The user's own backward pass still runs them.
    batch[0].requires_grad_(True)
    LOSS(model(batch[0]), batch[1]).backward()
    assert len(backward) == 2
    for handle in handles:
        handle.remove()


def test_forward_hook_changing_the_output_runs_in_the_probe_too() -> None:
    model, batch = _mlp(), _batch()
    model[1].register_forward_hook(lambda m, i, o: 2 * o)
    # Without the hook in the probe pass, its output would differ and the call be refused.
    got = curvkit.ggn_matrix(model, LOSS, batch)
    torch.testing.assert_close(got, reference_ggn(model, LOSS, *batch))


class _RandomScale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rand_like(x)


@pytest.mark.parametrize("random_module", [nn.Dropout(0.5), nn.AlphaDropout(0.5), _RandomScale()])
@pytest.mark.parametrize("n", [1, 5])
def test_random_modules_are_refused_at_every_batch_size(random_module: nn.Module, n: int) -> None:
    model = nn.Sequential(nn.Linear(6, 8), random_module, nn.Linear(8, 3)).double().train()
    with pytest.raises(ValueError, match=r"random|from one call to the next"):
        curvkit.diag_ggn(model, LOSS, _batch(n))


@pytest.mark.parametrize(
    "spectral_norm",
    [torch.nn.utils.spectral_norm, torch.nn.utils.parametrizations.spectral_norm],
    ids=["hook", "parametrization"],
)
def test_spectral_norm_in_train_mode_is_refused_without_side_effect(spectral_norm) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(6, 8)), nn.Tanh(), nn.Linear(8, 3)).double()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"updates the buffer .*model.eval\(\)"):
        curvkit.diag_ggn(model, LOSS, _batch())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("quantity", ["diag_ggn", "ggn_vector_product", "damped_newton_step"])
def test_inference_mode_says_autograd_is_needed(quantity: str) -> None:
    model, batch = _mlp(), _batch()
    kwargs = {"vector": [torch.ones_like(p) for p in model.parameters()]}
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"outside .*inference_mode"):
        getattr(curvkit, quantity)(
            model, LOSS, batch, **(kwargs if quantity == "ggn_vector_product" else {})
        )
