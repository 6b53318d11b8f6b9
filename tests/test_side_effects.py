"""Issue 22: no public quantity changes the user's model, even when it refuses the model.

A ``spectral_norm`` layer in training mode updates its ``_u``/``_v`` buffers in every forward
pass, a BatchNorm in training mode its running statistics (without bumping their versions): each
quantity family must refuse both models and leave buffers, parameters, ``.grad``, hooks and modes
as they were.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import curvkit
from curvkit.randomized import estimators

LOSS = nn.CrossEntropyLoss()


def _spectral_norm_model() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4))
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 2)).double().train()


def _old_spectral_norm_model() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.utils.spectral_norm(nn.Linear(3, 4))
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 2)).double().train()


def _batch_norm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()


MODELS = {
    "spectral_norm": _spectral_norm_model,
    "spectral_norm (hooks)": _old_spectral_norm_model,
    "batch_norm": _batch_norm_model,
}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 2, (6,), generator=generator)


def _ones(model: nn.Module) -> torch.Tensor:
    return torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)


def _vector(model: nn.Module) -> list[torch.Tensor]:
    return [torch.ones_like(p) for p in model.parameters()]


FAMILIES: dict[str, Callable[[nn.Module, tuple], object]] = {
    "diag_ggn": lambda m, d: curvkit.diag_ggn(m, LOSS, d),
    "diag_ggn MC": lambda m, d: curvkit.diag_ggn(m, LOSS, d, mc_samples=1),
    "diag_ggn chunked": lambda m, d: curvkit.diag_ggn(m, LOSS, d, sample_chunk_size=2),
    "ggn_matrix": lambda m, d: curvkit.ggn_matrix(m, LOSS, d),
    "ggn_vector_product": lambda m, d: curvkit.ggn_vector_product(m, LOSS, d, vector=_vector(m)),
    "GGNOperator": lambda m, d: curvkit.GGNOperator(m, LOSS, d) @ _ones(m),
    "KFACOperator": lambda m, d: curvkit.KFACOperator(m, LOSS, d) @ _ones(m),
    "KFACOperator block": lambda m, d: (
        curvkit.KFACOperator(m, LOSS, d, fallback="block") @ _ones(m)
    ),
    "EKFACOperator": lambda m, d: curvkit.EKFACOperator(m, LOSS, d, fallback="block") @ _ones(m),
    "hessian_matrix": lambda m, d: curvkit.hessian_matrix(m, LOSS, d),
    "hessian_vector_product": lambda m, d: curvkit.hessian_vector_product(m, LOSS, d, _vector(m)),
    "HessianOperator": lambda m, d: curvkit.HessianOperator(m, LOSS, d) @ _ones(m),
    "diag_hessian": lambda m, d: curvkit.diag_hessian(m, LOSS, d),
    "EFOperator": lambda m, d: curvkit.EFOperator(m, LOSS, d) @ _ones(m),
    "diag_ef": lambda m, d: curvkit.diag_ef(m, LOSS, d),
    "batch_gradients": lambda m, d: curvkit.batch_gradients(m, LOSS, d),
    "gradient_variance": lambda m, d: curvkit.gradient_variance(m, LOSS, d),
    "damped_newton_step": lambda m, d: curvkit.damped_newton_step(m, LOSS, d),
    "hutchinson_trace": lambda m, d: estimators.hutchinson_trace(
        curvkit.HessianOperator(m, LOSS, d), 2, generator=torch.Generator().manual_seed(0)
    ),
}


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
        "params": [id(p) for p in model.parameters()],
        "hooks": [
            tuple(module.__dict__[name])
            for module in model.modules()
            for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
        ],
        "modes": [module.training for module in model.modules()],
    }


def _assert_same_state(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(tensor, after["tensors"][name]), name
    assert before["grads"].keys() == after["grads"].keys()
    for name, grad in before["grads"].items():
        assert torch.equal(grad, after["grads"][name]), name
    assert before["params"] == after["params"]
    assert before["hooks"] == after["hooks"]
    assert before["modes"] == after["modes"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_refused_training_mode_models_are_left_unchanged(model_name: str, family: str) -> None:
    model, data = MODELS[model_name](), _data()
    # A user's gradient and hook are in place: both must stay.
    LOSS(model(data[0]), data[1]).backward()
    model[-1].register_forward_hook(lambda module, args, output: None)
    before = _state(model)
    # Refused for the training mode, or for a layer KFAC does not cover: either way unchanged.
    with pytest.raises(ValueError):
        FAMILIES[family](model, data)
    _assert_same_state(before, _state(model))


def test_batch_norm_running_statistics_are_restored_although_their_versions_stay() -> None:
    # The kernel updates them in place without a version bump: the guard compares the values.
    model, (x, targets) = _batch_norm_model().train(), _data()
    running_mean = model[1].running_mean
    version = running_mean._version
    model(x)
    assert running_mean._version == version  # the premise: no bump
    before = _state(model)
    with pytest.raises(ValueError, match=r"running_mean|running_var|num_batches_tracked"):
        curvkit.diag_hessian(model, LOSS, (x, targets))
    _assert_same_state(before, _state(model))
