"""The model zoo builds every case reproducibly, with a loss its targets suit."""

from __future__ import annotations

import pytest
import torch
from zoo_params import case_params

from curvkit.testing.zoo import CASES, make_case


@pytest.mark.parametrize("name", case_params(sorted(CASES)))
def test_case_has_a_batch_and_a_scalar_loss(name: str) -> None:
    case = make_case(name, 3)
    assert case.name == name and not case.model.training
    assert all(len(x) == 3 for x in case.inputs) and len(case.targets) == 3
    loss = case.loss_fn(case.model(*case.inputs), case.targets)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_same_seed_same_numbers_in_every_dtype() -> None:
    double = make_case("embedding", dtype=torch.float64, seed=3)
    single = make_case("embedding", dtype=torch.float32, seed=3)
    assert len(double.targets) == CASES["embedding"].batch_size
    assert torch.equal(double.inputs[0], single.inputs[0])
    assert torch.equal(double.targets, single.targets)
    for p, q in zip(double.model.parameters(), single.model.parameters(), strict=True):
        assert q.dtype == torch.float32 and torch.equal(p.float(), q)
    other = make_case("embedding", seed=4)
    assert not torch.equal(double.model.head.weight, other.model.head.weight)


def test_unknown_case() -> None:
    with pytest.raises(KeyError, match="no case 'nope' in the zoo; cases: mlp, cnn"):
        make_case("nope")
