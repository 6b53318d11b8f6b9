"""Small float64 models and data shared by the curvkit.laplace tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_DATA = 14
BATCH_SIZE = 5  # unequal batches: 5, 5, 4


def mlp(outputs: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs)).double()


def cnn(outputs: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, outputs),
    ).double()


def loader(
    likelihood: str, inputs: tuple[int, ...] = (4,), outputs: int = 3, seed: int = 1
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N_DATA, *inputs, generator=generator, dtype=torch.float64)
    if likelihood == "regression":
        y = torch.randn(N_DATA, outputs, generator=generator, dtype=torch.float64)
    else:
        y = torch.randint(0, outputs, (N_DATA,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE)


def query_inputs(inputs: tuple[int, ...] = (4,), n: int = 3, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *inputs, generator=generator, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-8) -> None:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-12)
    assert float((actual - expected).abs().max()) <= rtol * float(scale), (
        float((actual - expected).abs().max()),
        float(scale),
    )
