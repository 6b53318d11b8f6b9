"""Small models covering every kind of module call the engine handles, and a plain reference.

The reference computes ``J_theta(f_n)^T columns[k, n]`` one sample and one column at a time
with ``torch.autograd.grad`` on a batch of one sample: nothing of the engine is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def reference_columns(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    params: list[Tensor],
    columns: Tensor,
    *,
    create_graph: bool = False,
) -> list[Tensor]:
    """``[K, N, *p.shape]`` per parameter by a loop over samples and columns."""
    num_columns, num_samples = columns.shape[:2]
    per_param: list[list[list[Tensor]]] = [[[] for _ in range(num_samples)] for _ in params]
    for n in range(num_samples):
        output = model(*(x[n : n + 1] for x in inputs))
        for k in range(num_columns):
            grads = torch.autograd.grad(
                output,
                params,
                columns[k, n : n + 1],
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                per_param[i][n].append(torch.zeros_like(p) if g is None else g)
    return [torch.stack([torch.stack(cols) for cols in samples], dim=1) for samples in per_param]


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + self.inner(x))


class SequenceNorm(nn.Module):
    """Linear on ``[N, T, in]``, LayerNorm, and a Linear on ``[N, T1, T2, in]``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(torch.tanh(self.proj(x)))
        return self.out(h.reshape(h.shape[0], 2, -1, 5)).flatten(start_dim=1)


class EmbeddingBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embedding(tokens)).mean(dim=1))


class PaddedTwice(nn.Module):
    """An embedding with a padding index, called twice, on tokens repeated within samples."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(4, 3, padding_idx=1)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embedding(tokens) * self.embedding(tokens.flip(1)).sum(dim=1, keepdim=True)
        return self.head(torch.tanh(h)).flatten(start_dim=1)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (it reads ``out_proj.weight`` itself) and a direct parameter."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attention = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.batch_first else x.transpose(0, 1)
        out, weights = self.attention(h, h, h)
        out = out if self.batch_first else out.transpose(0, 1)
        return (out * self.scale).sum(dim=1) + weights.sum(dim=(1, 2))[:, None]


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(dim=1))


class SequenceFirstTransformer(nn.Module):
    """Linear layers see ``[T, N, E]``: the samples are not on the first axis."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x.transpose(0, 1)).mean(dim=0))


class SharedTwice(nn.Module):
    """A Linear called twice, and a weight used directly in the top-level forward."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.shared(torch.tanh(self.shared(x)))) @ self.weight.T


class TiedEmbedding(nn.Module):
    """The embedding weight is used by its module and again in this module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.embedding(tokens).sum(dim=1)))
        return h @ self.embedding.weight.T


class Shift(nn.Module):
    """``x + shift``: autograd keeps no copy of ``x``, so ``x`` may change in place later."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(size))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift


class TiedHead(nn.Module):
    """A language-model head sharing its weight with the embedding (two holding modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embedding(tokens))).flatten(start_dim=1)


class InPlace(nn.Module):
    """In-place operations on recorded outputs and inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.act = nn.ReLU(inplace=True)
        self.shift = Shift(5)
        self.norm = nn.LayerNorm(5)
        self.conv = nn.Conv1d(1, 2, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.first(x))  # the output of `first`, changed in place
        u = h + 1.0
        g = self.shift(u)
        u.mul_(2.0)  # the input of `shift`, changed after its call
        g = self.norm(g)
        g.tanh_()  # the output of `norm`
        return self.conv(g[:, None]).flatten(start_dim=1) + u.sum(dim=1, keepdim=True)


class LastStep(nn.Module):
    """An LSTM (its per-sample rule cannot be vmapped: the generic rule loops over samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _norms_and_transposed() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.GroupNorm(2, 4),
        nn.PReLU(4),
        nn.ConvTranspose2d(4, 2, 2, stride=2),
        nn.InstanceNorm2d(2, affine=True),
        nn.Flatten(),
    )


def _cnn2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 2, stride=2, dilation=1, bias=False),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 2, padding="same", padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def _cnn1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding="same", padding_mode="circular"),
        nn.Tanh(),
        nn.Conv1d(3, 4, 2, stride=2, dilation=2, padding=1),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def _cnn3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 4, 2, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv3d(4, 2, (1, 2, 2), dilation=(1, 1, 2), padding="same"),
        nn.Flatten(),
    )


def _warm_batchnorm(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine parameters."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model


ModelCase = tuple[Callable[[], nn.Module], Callable[[int, torch.dtype], tuple[Tensor, ...]]]


def _randn(*shape: int) -> Callable[[int, torch.dtype], tuple[Tensor, ...]]:
    return lambda n, dtype: (torch.randn(n, *shape, dtype=dtype),)


def _tokens(vocabulary: int, length: int) -> Callable[[int, torch.dtype], tuple[Tensor, ...]]:
    return lambda n, dtype: (torch.randint(0, vocabulary, (n, length)),)


ZOO: dict[str, ModelCase] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)), _randn(5)),
    "cnn2d_batchnorm_eval": (lambda: _warm_batchnorm(_cnn2d()), _randn(2, 10, 10)),
    "cnn1d": (_cnn1d, _randn(2, 8)),
    "cnn3d": (_cnn3d, _randn(2, 3, 4, 5)),
    "residual": (Residual, _randn(4)),
    "sequence_layernorm": (SequenceNorm, _randn(4, 4)),
    "embedding": (EmbeddingBag, _tokens(11, 3)),
    "embedding_padding_twice": (PaddedTwice, _tokens(4, 6)),
    "attention_batch_first": (lambda: Attention(True), _randn(3, 4)),
    "attention_sequence_first": (lambda: Attention(False), _randn(3, 4)),
    "transformer": (Transformer, _randn(3, 4)),
    "transformer_sequence_first": (SequenceFirstTransformer, _randn(3, 4)),
    "shared_twice_direct_param": (SharedTwice, _randn(4)),
    "tied_embedding": (TiedEmbedding, _tokens(5, 2)),
    "tied_head": (TiedHead, _tokens(5, 2)),
    "in_place": (InPlace, _randn(4)),
    "lstm": (LastStep, _randn(3, 3)),
    "norms_prelu_transposed_conv": (_norms_and_transposed, _randn(2, 4, 4)),
}


def make_case(
    name: str, num_samples: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The zoo's model ``name`` in eval mode, and inputs with ``num_samples`` samples."""
    make_model, make_inputs = ZOO[name]
    torch.manual_seed(seed)
    model = make_model().to(dtype).eval()
    return model, make_inputs(num_samples, dtype)
