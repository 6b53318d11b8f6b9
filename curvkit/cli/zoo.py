"""The model zoo of ``curvkit verify``: small models that cover the engine's per-module rules.

Each case is tiny (a few hundred parameters at most) so that the dense autograd references stay
cheap, and has a batch of a few samples, a loss with one of the reductions, and float64 or float32
data on the requested device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Case:
    """A model, its loss and a batch, and whether BackPACK's ``extend`` supports the pair."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor
    backpack_compatible: bool = False


class Residual(nn.Module):
    """A residual MLP block with a linear head: ``head(x + W2 tanh(W1 x))``."""

    def __init__(self, features: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.inner = nn.Linear(features, hidden)
        self.outer = nn.Linear(hidden, features)
        self.head = nn.Linear(features, outputs)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(x + self.outer(torch.tanh(self.inner(x))))


class SelfAttention(nn.Module):
    """Single-head self-attention whose projections are raw parameters (a custom module).

    Written out rather than :class:`torch.nn.MultiheadAttention` because the dense autograd
    references need double backward, which the fused CPU attention kernel does not implement.
    """

    def __init__(self, embed: int) -> None:
        super().__init__()
        self.projections = nn.Parameter(torch.randn(3, embed, embed) / embed**0.5)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        query, key, value = torch.einsum("nle,pfe->pnlf", x, self.projections)
        scores = query @ key.transpose(1, 2) / x.shape[-1] ** 0.5
        return scores.softmax(dim=-1) @ value


class AttentionClassifier(nn.Module):
    """Self-attention over a short sequence, residual, LayerNorm, mean pooling, linear head."""

    def __init__(self, embed: int, outputs: int) -> None:
        super().__init__()
        self.attention = SelfAttention(embed)
        self.norm = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, outputs)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.norm(x + self.attention(x)).mean(dim=1))


class EmbeddingClassifier(nn.Module):
    """Token embeddings, flattened, and a linear head."""

    def __init__(self, vocabulary: int, embed: int, length: int, outputs: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, embed)
        self.head = nn.Linear(embed * length, outputs)

    def forward(self, tokens: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.embedding(tokens).flatten(start_dim=1))


def _mlp(generator: torch.Generator, **like: Any) -> Case:
    model = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 4)
    )
    inputs = torch.randn(5, 6, generator=generator).to(**like)
    targets = torch.randint(4, (5,), generator=generator).to(like["device"])
    return Case("MLP", model, nn.CrossEntropyLoss(), inputs, targets, backpack_compatible=True)


def _cnn(generator: torch.Generator, **like: Any) -> Case:
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, kernel_size=2, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    inputs = torch.randn(4, 2, 6, 6, generator=generator).to(**like)
    targets = torch.randint(3, (4,), generator=generator).to(like["device"])
    return Case("CNN", model, nn.CrossEntropyLoss(reduction="sum"), inputs, targets)


def _residual(generator: torch.Generator, **like: Any) -> Case:
    model = Residual(5, 7, 3)
    inputs = torch.randn(4, 5, generator=generator).to(**like)
    targets = torch.randn(4, 3, generator=generator).to(**like)
    return Case("residual", model, nn.MSELoss(), inputs, targets)


def _attention(generator: torch.Generator, **like: Any) -> Case:
    model = AttentionClassifier(embed=4, outputs=3)
    inputs = torch.randn(3, 5, 4, generator=generator).to(**like)
    targets = (torch.rand(3, 3, generator=generator) < 0.5).to(**like)
    return Case("LayerNorm + attention", model, nn.BCEWithLogitsLoss(), inputs, targets)


def _embedding(generator: torch.Generator, **like: Any) -> Case:
    model = EmbeddingClassifier(vocabulary=7, embed=3, length=4, outputs=5)
    inputs = torch.randint(7, (4, 4), generator=generator).to(like["device"])
    targets = torch.randint(5, (4,), generator=generator).to(like["device"])
    return Case("embedding", model, nn.CrossEntropyLoss(label_smoothing=0.1), inputs, targets)


BUILDERS: tuple[Callable[..., Case], ...] = (_mlp, _cnn, _residual, _attention, _embedding)


def model_zoo(device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[Case]:
    """Build every case of the zoo.

    Args:
        device: Where models and data live.
        dtype: Floating-point dtype of the parameters and of the float data.
        seed: Seed of the initialisation and the data.

    Returns:
        The cases, models in eval mode.
    """
    cases = []
    for index, build in enumerate(BUILDERS):
        torch.manual_seed(seed + index)
        generator = torch.Generator().manual_seed(seed + index)
        case = build(generator, device=device, dtype=dtype)
        case.model.to(device=device, dtype=dtype).eval()
        cases.append(case)
    return cases
