"""Small models covering every kind of module call curvkit handles, with a batch and a loss each.

One registry, :data:`CASES`, serves the tests (which check every case against the plain-autograd
references of :mod:`curvkit.testing.verify`) and ``curvkit verify`` (which runs a chosen subset).
Each case is tiny, a few hundred parameters at most, so that dense references stay cheap.

To add a model, write its class here (an ``nn.Sequential`` builder does where it suffices), say in
its docstring which engine path it exercises, and add one :class:`CaseSpec` to :data:`CASES`: the
engine tests then check it against :func:`curvkit.testing.verify.reference_factor_columns`.

Example:
    >>> from curvkit.testing.zoo import make_case
    >>> case = make_case("residual", batch_size=3)
    >>> loss = case.loss_fn(case.model(*case.inputs), case.targets)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

__all__ = [
    "CASES",
    "Attention",
    "AttentionClassifier",
    "Case",
    "CaseSpec",
    "CheckedScaling",
    "EmbeddingClassifier",
    "InPlace",
    "LastStep",
    "Normalisations",
    "PaddedTwice",
    "Residual",
    "SelfAttention",
    "SequenceNorm",
    "SharedTwice",
    "Shift",
    "TiedEmbedding",
    "TiedHead",
    "Transformer",
    "TwoInputs",
    "make_case",
    "make_targets",
]

InputsBuilder = Callable[[int, torch.Generator], tuple[Tensor, ...]]


@dataclass(frozen=True)
class CaseSpec:
    """How to build one case of the zoo.

    Attributes:
        model: Builds the model; its initialisation draws from torch's global generator.
        inputs: ``inputs(batch_size, generator)``, the model's inputs on the CPU, float64 or
            integer.
        loss: Builds a loss that suits the model's outputs ``[N, C]``.
        batch_size: The number of samples when the caller asks for none.
        backpack_compatible: Whether BackPACK's ``extend`` supports the model and the loss.
    """

    model: Callable[[], nn.Module]
    inputs: InputsBuilder
    loss: Callable[[], nn.Module]
    batch_size: int = 4
    backpack_compatible: bool = False


@dataclass
class Case:
    """A model of the zoo in eval mode, a batch for it and its loss.

    Attributes:
        name: The key in :data:`CASES`.
        model: The model, called as ``model(*inputs)``.
        loss_fn: ``loss_fn(outputs, targets)``, the scalar batch loss.
        inputs: The model's inputs, the samples along dimension 0; ``(inputs, targets)`` is a
            batch for curvkit's quantities.
        targets: Targets that suit ``loss_fn``.
        backpack_compatible: Whether BackPACK's ``extend`` supports the model and the loss.
    """

    name: str
    model: nn.Module
    loss_fn: nn.Module
    inputs: tuple[Tensor, ...]
    targets: Tensor
    backpack_compatible: bool


def make_case(
    name: str,
    batch_size: int | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Case:
    """Build the case ``name`` of :data:`CASES`.

    The same seed gives the same numbers on every device (they are drawn on the CPU, in float64,
    and cast). The model's initialisation reseeds torch's global generator with ``seed``.

    Args:
        name: A key of :data:`CASES`.
        batch_size: The number of samples; ``None`` for the case's own.
        device: Where the model, its loss and the data live.
        dtype: Floating-point dtype of the parameters and of the float data.
        seed: Seed of the initialisation and of the data.

    Returns:
        The case, its model in eval mode.

    Raises:
        KeyError: If ``name`` is not in :data:`CASES`.
    """
    if name not in CASES:
        raise KeyError(f"no case {name!r} in the zoo; cases: {', '.join(CASES)}")
    spec = CASES[name]
    torch.manual_seed(seed)
    model = spec.model().to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    inputs = tuple(
        x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        for x in spec.inputs(spec.batch_size if batch_size is None else batch_size, generator)
    )
    loss_fn = spec.loss().to(device=device, dtype=dtype)
    with torch.no_grad():
        outputs = model(*inputs)
    targets = make_targets(loss_fn, outputs, generator)
    return Case(name, model, loss_fn, inputs, targets, spec.backpack_compatible)


def make_targets(loss_fn: nn.Module, outputs: Tensor, generator: torch.Generator) -> Tensor:
    """Random targets for ``loss_fn`` on ``outputs`` of shape ``[N, C]``.

    Args:
        loss_fn: Cross-entropy gets class indices, ``BCEWithLogitsLoss`` probabilities in
            :math:`[0, 1)`, any other loss standard normal values shaped like ``outputs``.
        outputs: The model's outputs.
        generator: The CPU generator the targets are drawn from.

    Returns:
        The targets, on the device of ``outputs``.
    """
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        targets = torch.randint(outputs.shape[1], outputs.shape[:1], generator=generator)
        return targets.to(outputs.device)
    shape = outputs.shape
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        targets = torch.rand(shape, generator=generator, dtype=torch.float64)
    else:
        targets = torch.randn(shape, generator=generator, dtype=torch.float64)
    return targets.to(device=outputs.device, dtype=outputs.dtype)


class Residual(nn.Module):
    """A residual MLP block with a linear head, ``head(x + outer(tanh(inner(x))))``.

    Linear layers whose outputs are summed with a skip connection: the structured Linear rule on
    columns that reach a layer along two paths.
    """

    def __init__(self, features: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.inner = nn.Linear(features, hidden)
        self.outer = nn.Linear(hidden, features)
        self.head = nn.Linear(features, outputs)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(x + self.outer(torch.tanh(self.inner(x))))


class SequenceNorm(nn.Module):
    """Linear on ``[N, T, in]``, LayerNorm, and a Linear on ``[N, T1, T2, in]``.

    The Linear rule with positions (one and two extra axes) and the normalisation rule.
    """

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        h = self.norm(torch.tanh(self.proj(x)))
        return self.out(h.reshape(h.shape[0], 2, -1, 5)).flatten(start_dim=1)


class Normalisations(nn.Module):
    """The normalisation rule in each of its layouts.

    RMSNorm, a LayerNorm over two axes without bias, one with the samples on the second axis,
    GroupNorm and BatchNorm (eval mode, random running statistics) on ``[N, C]``. The affine
    parameters are drawn at random (torch initialises them to ones and zeros).
    """

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.rms = nn.RMSNorm(6)
        self.plane = nn.LayerNorm((3, 2), bias=False)
        self.sequence_first = nn.LayerNorm(6)
        self.group = nn.GroupNorm(3, 6)
        self.batch = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)
        with torch.no_grad():
            for norm in (self.rms, self.plane, self.sequence_first, self.group, self.batch):
                for param in norm.parameters():
                    param.copy_(torch.randn_like(param))
            self.batch.running_mean.copy_(torch.randn(6))
            self.batch.running_var.copy_(torch.rand(6) + 0.5)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        h = torch.tanh(self.rms(self.proj(x)))  # [N, T, 6]
        h = self.plane(h.unflatten(-1, (3, 2))).flatten(start_dim=-2)
        h = self.sequence_first(h.transpose(0, 1)).transpose(0, 1)
        return self.out(torch.tanh(self.batch(self.group(h.mean(dim=1)))))


class EmbeddingClassifier(nn.Module):
    """Token embeddings, flattened, and a linear head: the structured Embedding rule."""

    def __init__(self, vocabulary: int, embed: int, length: int, outputs: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, embed)
        self.head = nn.Linear(embed * length, outputs)

    def forward(self, tokens: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.embedding(tokens).flatten(start_dim=1))


class PaddedTwice(nn.Module):
    """An embedding with a padding index, called twice, on tokens repeated within samples.

    The Embedding rule where rows get several contributions per sample (summed before squaring)
    and the padding row none.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(4, 3, padding_idx=1)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens: Tensor) -> Tensor:  # noqa: D102
        h = self.embedding(tokens) * self.embedding(tokens.flip(1)).sum(dim=1, keepdim=True)
        return self.head(torch.tanh(h)).flatten(start_dim=1)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` and a parameter used directly in this module's forward.

    The generic rule on a module that reads its child's parameter (``out_proj.weight``) itself,
    with the samples on the first or the second axis, and attention weights in the outputs.
    """

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attention = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        h = x if self.batch_first else x.transpose(0, 1)
        out, weights = self.attention(h, h, h)
        out = out if self.batch_first else out.transpose(0, 1)
        return (out * self.scale).sum(dim=1) + weights.sum(dim=(1, 2))[:, None]


class SelfAttention(nn.Module):
    """Single-head self-attention whose projections are raw parameters (a custom module).

    The generic rule on a user's module. Written out rather than
    :class:`torch.nn.MultiheadAttention` because the dense autograd references need double
    backward, which the fused CPU attention kernel does not implement.
    """

    def __init__(self, embed: int) -> None:
        super().__init__()
        self.projections = nn.Parameter(torch.randn(3, embed, embed) / embed**0.5)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        query, key, value = torch.einsum("nle,pfe->pnlf", x, self.projections)
        scores = query @ key.transpose(1, 2) / x.shape[-1] ** 0.5
        return scores.softmax(dim=-1) @ value


class AttentionClassifier(nn.Module):
    """Self-attention over a short sequence, residual, LayerNorm, mean pooling, linear head.

    The generic rule on a custom module, the normalisation and Linear rules.
    """

    def __init__(self, embed: int, outputs: int) -> None:
        super().__init__()
        self.attention = SelfAttention(embed)
        self.norm = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, outputs)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.norm(x + self.attention(x)).mean(dim=1))


class Transformer(nn.Module):
    """An ``nn.TransformerEncoderLayer`` on ``[N, T, E]`` inputs, mean-pooled, with a head.

    With ``batch_first=False`` the layer's Linear modules see ``[T, N, E]``: the engine must find
    the sample axis, which is not the first.
    """

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if self.batch_first:
            return self.head(self.layer(x).mean(dim=1))
        return self.head(self.layer(x.transpose(0, 1)).mean(dim=0))


class SharedTwice(nn.Module):
    """A Linear called twice, and a weight used directly in the top-level forward.

    Per-call blocks of one parameter summed (two calls side by side in one Kronecker factor), and
    the generic rule over the whole model for a parameter no submodule holds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return torch.tanh(self.shared(torch.tanh(self.shared(x)))) @ self.weight.T


class TiedEmbedding(nn.Module):
    """The embedding weight is used by its module and again in this module's forward.

    A parameter with a structured use (Embedding) and a generic one, whose blocks are summed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)

    def forward(self, tokens: Tensor) -> Tensor:  # noqa: D102
        h = torch.tanh(self.mix(self.embedding(tokens).sum(dim=1)))
        return h @ self.embedding.weight.T


class TiedHead(nn.Module):
    """A language-model head sharing its weight with the embedding (two holding modules).

    One parameter with an Embedding factor and a Linear factor, summed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:  # noqa: D102
        return self.head(torch.tanh(self.embedding(tokens))).flatten(start_dim=1)


class Shift(nn.Module):
    """``x + shift``: autograd keeps no copy of ``x``, so ``x`` may change in place later."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(size))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x + self.shift


class InPlace(nn.Module):
    """In-place operations on recorded outputs and inputs.

    The recording's copies of tensors that change in place after their module's call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.act = nn.ReLU(inplace=True)
        self.shift = Shift(5)
        self.norm = nn.LayerNorm(5)
        self.conv = nn.Conv1d(1, 2, 2)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        h = self.act(self.first(x))  # the output of `first`, changed in place
        u = h + 1.0
        g = self.shift(u)
        u.mul_(2.0)  # the input of `shift`, changed after its call
        g = self.norm(g)
        g.tanh_()  # the output of `norm`
        return self.conv(g[:, None]).flatten(start_dim=1) + u.sum(dim=1, keepdim=True)


class LastStep(nn.Module):
    """An LSTM read at its last step, and a head.

    The generic rule on a module whose per-sample function cannot be vmapped: it loops over
    samples.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.lstm(x)[0][:, -1])


class TwoInputs(nn.Module):
    """Two input tensors, and a parameter the forward never uses.

    Inputs passed as ``model(*inputs)``, and a parameter whose factor is zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.ones(3))
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(2, 3, bias=False)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:  # noqa: D102
        return torch.tanh(self.a(x)) * self.b(z)


class _CheckedScaling(torch.autograd.Function):
    """``factor * x``, with a backward that inspects values (``bool``), which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return factor * x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError("non-finite gradient")
        return ctx.factor * grad, None


class CheckedScaling(nn.Module):
    """Multiplies by ``factor`` in a custom autograd function whose backward checks its gradient.

    A backward without a batching rule: the engine pushes the columns back one at a time, and the
    references of :mod:`curvkit.testing.verify` loop over their vectors.
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return _CheckedScaling.apply(x, self.factor)


def _mlp() -> nn.Module:
    """Linear layers between elementwise activations: the structured Linear rule."""
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 4))


def _cnn() -> nn.Module:
    """Conv2d with padding and stride, then a Linear head: the structured convolution rule."""
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, kernel_size=2, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


def _cnn2d_batchnorm() -> nn.Module:
    """Grouped, strided, bias-free and reflect-padded Conv2d, BatchNorm in eval mode, pooling.

    The convolution rule's options, and the generic rule on BatchNorm with running statistics.
    """
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 2, stride=2, dilation=1, bias=False),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 2, padding="same", padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    # Non-trivial running statistics and affine parameters, so that BatchNorm is no identity.
    norm = model[1]
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 1.5)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -0.5, 0.5)
    return model


def _cnn1d() -> nn.Module:
    """Conv1d with circular and ``"same"`` padding, stride and dilation, then pooling."""
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding="same", padding_mode="circular"),
        nn.Tanh(),
        nn.Conv1d(3, 4, 2, stride=2, dilation=2, padding=1),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def _cnn3d() -> nn.Module:
    """Grouped, strided Conv3d and one with an anisotropic kernel and dilation."""
    return nn.Sequential(
        nn.Conv3d(2, 4, 2, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv3d(4, 2, (1, 2, 2), dilation=(1, 1, 2), padding="same"),
        nn.Flatten(),
    )


def _norms_prelu_transposed_conv() -> nn.Module:
    """GroupNorm (the normalisation rule), PReLU, ConvTranspose2d, affine InstanceNorm (generic)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.GroupNorm(2, 4),
        nn.PReLU(4),
        nn.ConvTranspose2d(4, 2, 2, stride=2),
        nn.InstanceNorm2d(2, affine=True),
        nn.Flatten(),
    )


def _unbatchable_backward() -> nn.Module:
    """A Linear before and after a backward without a batching rule (:class:`CheckedScaling`)."""
    return nn.Sequential(nn.Linear(3, 4), CheckedScaling(2.0), nn.Tanh(), nn.Linear(4, 2))


def _randn(*shape: int) -> InputsBuilder:
    return lambda n, generator: (torch.randn(n, *shape, generator=generator, dtype=torch.float64),)


def _tokens(vocabulary: int, length: int) -> InputsBuilder:
    return lambda n, generator: (torch.randint(vocabulary, (n, length), generator=generator),)


def _two_inputs(n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    return tuple(torch.randn(n, size, generator=generator, dtype=torch.float64) for size in (3, 2))


#: The zoo, by name; every model returns outputs ``[N, C]``.
#:
#: :meta hide-value:
CASES: dict[str, CaseSpec] = {
    "mlp": CaseSpec(_mlp, _randn(6), nn.CrossEntropyLoss, batch_size=5, backpack_compatible=True),
    "cnn": CaseSpec(_cnn, _randn(2, 6, 6), partial(nn.CrossEntropyLoss, reduction="sum")),
    "cnn2d_batchnorm_eval": CaseSpec(_cnn2d_batchnorm, _randn(2, 10, 10), nn.CrossEntropyLoss),
    "cnn1d": CaseSpec(_cnn1d, _randn(2, 8), nn.MSELoss),
    "cnn3d": CaseSpec(_cnn3d, _randn(2, 3, 4, 5), nn.MSELoss),
    "norms_prelu_transposed_conv": CaseSpec(
        _norms_prelu_transposed_conv, _randn(2, 4, 4), nn.MSELoss
    ),
    "residual": CaseSpec(partial(Residual, features=5, hidden=7, outputs=3), _randn(5), nn.MSELoss),
    "sequence_layernorm": CaseSpec(SequenceNorm, _randn(4, 4), nn.MSELoss),
    "normalisations": CaseSpec(Normalisations, _randn(3, 4), nn.CrossEntropyLoss),
    "attention": CaseSpec(
        partial(AttentionClassifier, embed=4, outputs=3),
        _randn(5, 4),
        nn.BCEWithLogitsLoss,
        batch_size=3,
    ),
    "attention_batch_first": CaseSpec(
        partial(Attention, batch_first=True), _randn(3, 4), nn.MSELoss
    ),
    "attention_sequence_first": CaseSpec(
        partial(Attention, batch_first=False), _randn(3, 4), nn.MSELoss
    ),
    "transformer": CaseSpec(
        partial(Transformer, batch_first=True), _randn(3, 4), nn.CrossEntropyLoss
    ),
    "transformer_sequence_first": CaseSpec(
        partial(Transformer, batch_first=False), _randn(3, 4), nn.CrossEntropyLoss
    ),
    "embedding": CaseSpec(
        partial(EmbeddingClassifier, vocabulary=7, embed=3, length=4, outputs=5),
        _tokens(7, 4),
        partial(nn.CrossEntropyLoss, label_smoothing=0.1),
    ),
    "embedding_padding_twice": CaseSpec(PaddedTwice, _tokens(4, 6), nn.MSELoss),
    "shared_twice_direct_param": CaseSpec(SharedTwice, _randn(4), nn.CrossEntropyLoss),
    "tied_embedding": CaseSpec(TiedEmbedding, _tokens(5, 2), nn.CrossEntropyLoss),
    "tied_head": CaseSpec(TiedHead, _tokens(5, 2), nn.MSELoss),
    "in_place": CaseSpec(InPlace, _randn(4), nn.MSELoss),
    "lstm": CaseSpec(LastStep, _randn(3, 3), nn.MSELoss),
    "two_inputs": CaseSpec(TwoInputs, _two_inputs, nn.MSELoss),
    "unbatchable_backward": CaseSpec(_unbatchable_backward, _randn(3), nn.MSELoss),
}
