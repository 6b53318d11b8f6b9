"""Issue 21: the probe verdict is cached per model; any change of the model runs it again.

The cache (:func:`curvkit.engines.safety.probe_first_sample`, keyed by
:func:`curvkit.engines.guard.model_state_key`) must never be used once the module tree, a
parameter or buffer (identity, version, dtype), a hook, a mode, a plain setting or the input
shapes changed: each test below changes one of them and checks that the probe runs again, and
where the change makes the model refusable, that it is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import curvkit
from curvkit.engines import recording, safety
from curvkit.testing.verify import reference_ggn

LOSS = nn.CrossEntropyLoss()


class _MixesWhenAsked(nn.Module):
    """Subtracts the batch mean when ``mix`` is set: a plain setting that changes the function."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0) if self.mix else x


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), _MixesWhenAsked(), nn.Dropout(0.0), nn.Tanh(), nn.Linear(5, 3)
    ).double()


def _data(n: int = 6, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=generator, dtype=dtype), torch.randint(0, 3, (n,))


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the probe passes run."""
    count: list[int] = []
    original = safety._probe

    def counting(*args, **kwargs):
        count.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(safety, "_probe", counting)
    return count


def _diag(model: nn.Module, data) -> list[torch.Tensor]:
    return curvkit.diag_ggn(model, LOSS, data)


def test_a_repeated_call_uses_the_verdict_and_stays_exact(probes: list[int]) -> None:
    model, data = _model(), _data()
    first = _diag(model, data)
    second = _diag(model, data)
    assert len(probes) == 1
    expected = reference_ggn(model, LOSS, *data).diagonal()
    for got in (first, second):
        torch.testing.assert_close(
            torch.cat([d.flatten() for d in got]), expected, rtol=1e-10, atol=1e-14
        )


def _set_mix(model: nn.Sequential) -> None:
    model[1].mix = True


def _replace_module(model: nn.Sequential) -> None:
    model[1] = _MixesWhenAsked()
    model[1].mix = True


def _instance_forward(model: nn.Sequential) -> None:
    model[1].forward = lambda x: x - x.mean(0)


def _forward_hook(model: nn.Sequential) -> None:
    model[0].register_forward_hook(lambda module, args, output: output - output.mean(0))


def _global_forward_hook(model: nn.Sequential) -> Callable[[], None]:
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: output - output.mean(0) if module is model[0] else None
    )
    return handle.remove


def _train_mode_dropout(model: nn.Sequential) -> None:
    model[2].p = 0.5
    model.train()


# Changes after which the model mixes samples or is random: a stale verdict would let it pass.
REFUSED: dict[str, Callable[[nn.Sequential], object]] = {
    "plain setting": _set_mix,
    "module replaced": _replace_module,
    "instance forward": _instance_forward,
    "forward hook": _forward_hook,
    "global forward hook": _global_forward_hook,
    "mode and setting": _train_mode_dropout,
}


@pytest.mark.parametrize("change", sorted(REFUSED))
def test_a_change_that_makes_the_model_mix_samples_is_refused(
    change: str, probes: list[int]
) -> None:
    model, data = _model(), _data()
    _diag(model, data)
    undo = REFUSED[change](model)
    try:
        with pytest.raises(ValueError, match=r"samples|random|eval"):
            _diag(model, data)
    finally:
        if callable(undo):
            undo()


def _step(model: nn.Sequential) -> None:
    with torch.no_grad():
        model[0].weight.add_(0.1)


def _new_parameter(model: nn.Sequential) -> None:
    model[0].weight = nn.Parameter(model[0].weight.detach() * 2)


def _buffer(model: nn.Sequential) -> None:
    model[1].register_buffer("offset", torch.zeros(()))


def _buffer_in_place(model: nn.Sequential) -> None:
    model[1].register_buffer("offset", torch.zeros(()))
    _diag(model, _data())
    model[1].offset.add_(1.0)


def _dtype(model: nn.Sequential) -> None:
    model.float()


def _eval_mode(model: nn.Sequential) -> None:
    model[3].train(False)


def _requires_grad(model: nn.Sequential) -> None:
    model[0].bias.requires_grad_(False)


# Changes that keep the model per-sample: the probe must run again, and the result stay exact.
RERUN: dict[str, Callable[[nn.Sequential], object]] = {
    "parameter version": _step,
    "parameter replaced": _new_parameter,
    "buffer added": _buffer,
    "buffer version": _buffer_in_place,
    "dtype": _dtype,
    "mode": _eval_mode,
    "requires_grad": _requires_grad,
}


@pytest.mark.parametrize("change", sorted(RERUN))
def test_every_change_of_the_model_runs_the_probe_again(change: str, probes: list[int]) -> None:
    model, data = _model(), _data()
    _diag(model, data)
    RERUN[change](model)
    before = len(probes)
    dtype = next(model.parameters()).dtype
    data = (data[0].to(dtype), data[1])
    params = [p for p in model.parameters() if p.requires_grad]
    got = curvkit.diag_ggn(model, LOSS, data, params=params)
    assert len(probes) == before + 1
    if dtype == torch.float64:
        expected = reference_ggn(model, LOSS, *data, params=params).diagonal()
        torch.testing.assert_close(
            torch.cat([d.flatten() for d in got]), expected, rtol=1e-10, atol=1e-14
        )


def test_other_inputs_shapes_and_dtypes_run_the_probe_again(probes: list[int]) -> None:
    model = _model()
    _diag(model, _data(6))
    _diag(model, _data(6))
    assert len(probes) == 1
    _diag(model, _data(7))
    assert len(probes) == 2
    curvkit.diag_ggn(model.float(), LOSS, _data(7, torch.float32))
    assert len(probes) == 3


def test_the_cache_keeps_no_model_alive() -> None:
    import gc
    import weakref

    model = _model()
    _diag(model, _data())
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return self.head(h.tanh_())  # changes the recorded output of `linear` in place


def test_the_calls_needing_copies_are_remembered_and_the_check_still_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model, data = _InPlace().double(), _data()
    passes: list[int] = []
    original = recording._Recorder.run

    def counting(self, forward):
        passes.append(1)
        return original(self, forward)

    monkeypatch.setattr(recording._Recorder, "run", counting)
    expected = reference_ggn(model, LOSS, *data).diagonal()
    for _ in range(3):
        before = len(passes)
        got = torch.cat([d.flatten() for d in _diag(model, data)])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    # The first call: a pass, a second one with copies, and the probe's two; later: one pass.
    assert len(passes) - before == 1
