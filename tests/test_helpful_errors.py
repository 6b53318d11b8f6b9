"""Issue 22: errors that say what was wrong and what to do (each was a bare message before)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.core.model_io import mapping_call
from curvkit.optim import PerParamOptim, PyroOptim
from curvkit.testing.verify import reference_ggn

LOSS = nn.CrossEntropyLoss()


def _targets(n: int = 5) -> torch.Tensor:
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(2))


def _x(n: int = 5, width: int = 4, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(1), dtype=dtype)


class _TakesTheDict(nn.Module):
    """curvlinops' convention: ``forward(self, batch)`` reads the inputs from the dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3).double()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(batch["x"]) * batch["scale"]


class _TakesKeywords(_TakesTheDict):
    """Hugging Face's convention: ``model(**batch)``."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.linear(x) * scale


class _TakesNeither(_TakesTheDict):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.linear(a) + b


def _batch() -> dict[str, torch.Tensor]:
    return {"x": _x(), "scale": torch.full((5, 1), 2.0, dtype=torch.float64)}


class _Scaled(nn.Module):
    """The same function on plain tensor inputs, for the reference."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2.0


def test_a_forward_taking_the_dict_gets_it_whole_and_keywords_still_work() -> None:
    whole, keywords = _TakesTheDict(), _TakesKeywords()
    assert mapping_call(whole, _batch()) == "whole"
    assert mapping_call(keywords, _batch()) == "keywords"
    expected = reference_ggn(_Scaled(whole.linear), LOSS, _x(), _targets()).diagonal()
    for model in (whole, keywords):
        got = curvkit.diag_ggn(model, LOSS, (_batch(), _targets()))
        torch.testing.assert_close(
            torch.cat([d.flatten() for d in got]), expected, rtol=1e-10, atol=1e-14
        )


def test_a_forward_taking_neither_names_both_conventions() -> None:
    with pytest.raises(TypeError, match=r"model\(\*\*batch\).*model\(batch\)"):
        curvkit.diag_ggn(_TakesNeither(), LOSS, (_batch(), _targets()))


@pytest.mark.parametrize("inputs", [_x(width=5), _x(dtype=torch.float32)], ids=["width", "dtype"])
def test_an_error_inside_the_model_says_it_ran_the_users_model_on_the_batch(
    inputs: torch.Tensor,
) -> None:
    model = nn.Sequential(nn.Linear(4, 3)).double()
    with pytest.raises(RuntimeError, match="while running the model on the batch") as info:
        curvkit.diag_ggn(model, LOSS, (inputs, _targets()))
    assert str(list(inputs.shape)) in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error, chained


@pytest.mark.parametrize(
    "quantity",
    [
        lambda m, d: curvkit.diag_ggn(m, LOSS, d),
        lambda m, d: curvkit.hessian_matrix(m, LOSS, d),
        lambda m, d: curvkit.batch_gradients(m, LOSS, d),
    ],
    ids=["diag_ggn", "hessian_matrix", "batch_gradients"],
)
def test_inference_tensors_are_refused_with_what_to_do(quantity) -> None:
    model = nn.Sequential(nn.Linear(4, 3)).double()
    with torch.inference_mode():
        inputs = _x()
    with pytest.raises(ValueError, match=r"inference_mode.*clone"):
        quantity(model, (inputs, _targets()))
    # Following the advice works.
    quantity(model, (inputs.clone(), _targets()))


def test_max_memory_accepts_a_float_number_of_bytes() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).double()
    data = (_x(), _targets())
    got = curvkit.diag_ggn(model, LOSS, data, max_memory=2e9)
    for a, b in zip(got, curvkit.diag_ggn(model, LOSS, data), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
    with pytest.raises(ValueError, match="whole number of bytes"):
        curvkit.diag_ggn(model, LOSS, data, max_memory=2.5)


def test_optimizer_options_that_are_not_numbers_are_refused_up_front() -> None:
    with pytest.raises(TypeError, match=r"optim_args\['lr'\] must be a real number.*'0.1'"):
        PyroOptim(torch.optim.Adam, {"lr": "0.1"})
    with pytest.raises(TypeError, match=r"optim_args\['betas'\]"):
        PerParamOptim(torch.optim.Adam, {"betas": (0.9, "0.999")})
    # A callable's options are checked when a parameter's optimizer is built.
    optim = PerParamOptim(torch.optim.SGD, lambda name: {"lr": "0.1"})
    weight = torch.zeros(2)
    with pytest.raises(TypeError, match=r"optim_args for parameter 'w'\['lr'\]"):
        optim.updated("w", weight, torch.ones(2))
    with pytest.raises(TypeError, match=r"clip_norm"):
        PyroOptim(torch.optim.Adam, {"lr": 0.1}, {"clip_norm": "1"})
