"""Transformers and other models with shared tensors, against dense plain-autograd references.

Every case is a tiny float64 model whose curvature is computed densely by
:mod:`curvkit.testing.verify` (:math:`J^\\top H J` from full Jacobians) and, for the directional
quantities, per sample: the GGN and gradient of sample :math:`n`'s terms of the batch loss, with
the other samples' outputs held constant. Cases: nanoGPT-style language models (positions of
``arange(T)``, a positional parameter sliced in ``forward``, a head tied through ``F.linear``,
logits flattened to ``[N T, V]`` with ignored targets), Hugging Face GPT-2 (dict batches with
padding and ``NextTokenCrossEntropyLoss``) and BERT, an encoder with a padding mask as a keyword
input, parametrized weights (``weight_norm``, ``spectral_norm`` in eval mode, a custom
parametrization), a parameter used in a forward pre-hook, attention without forward-mode
derivatives, and recurrent layers in float32 and float64.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import curvkit
from curvkit.core.model_io import call_model, output_tensor, sample_layout
from curvkit.losses import NextTokenCrossEntropyLoss
from curvkit.testing import verify

VOCAB, WIDTH, LENGTH = 11, 8, 5


class NanoGPT(nn.Module):
    """A language model in the style of nanoGPT: shared positions, optionally a tied head."""

    def __init__(self, positions: str = "embedding", tied: bool = False, flat: bool = False):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions_kind = positions
        if positions == "embedding":
            self.positions = nn.Embedding(LENGTH, WIDTH)
        else:
            self.positions = nn.Parameter(torch.randn(1, LENGTH + 2, WIDTH))
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = nn.Linear(WIDTH, WIDTH)
        self.head = None if tied else nn.Linear(WIDTH, VOCAB)
        self.flat = flat

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if self.positions_kind == "embedding":
            shared = self.positions(torch.arange(length))
        else:
            shared = self.positions[:, :length]
        x = self.tokens(tokens) + shared
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        x = x + self.attention(x, x, x, attn_mask=mask, need_weights=False)[0]
        x = x + torch.tanh(self.mlp(self.norm(x)))
        logits = F.linear(x, self.tokens.weight) if self.head is None else self.head(x)
        return logits.flatten(0, 1) if self.flat else logits.transpose(1, 2)


class Encoder(nn.Module):
    """A transformer encoder classifying padded sequences; the mask is a keyword input."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(WIDTH, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        hidden = self.layer(x, src_key_padding_mask=padding)
        kept = (~padding).unsqueeze(-1).to(x.dtype)
        return self.head((hidden * kept).sum(1) / kept.sum(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Symmetric(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.triu() + x.triu(1).T


@dataclass
class Case:
    model: nn.Module
    loss_fn: Callable[[Tensor, Any], Tensor]
    data: Any  # the batch as curvkit takes it
    inputs: Any  # the inputs as the reference takes them
    targets: Tensor
    rtol: float = 1e-9


def _tokens(n: int, ignored: bool = True) -> tuple[Tensor, Tensor]:
    tokens = torch.randint(0, VOCAB, (n, LENGTH))
    targets = torch.randint(0, VOCAB, (n, LENGTH))
    if ignored:
        targets[0, 1] = -100
    return tokens, targets


def _language_model(n: int, reduction: str, **options: Any) -> Case:
    model = NanoGPT(**options).double().eval()
    tokens, targets = _tokens(n)
    if options.get("flat"):
        targets = targets.flatten()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    return Case(model, loss_fn, (tokens, targets), tokens, targets)


def _transformers() -> Any:
    # transformers imports torchvision where one is installed; torchvision from the package
    # index fails to import beside curvkit's CPU torch, and no test needs it. Blocked before
    # transformers is first imported, which caches what it found.
    sys.modules.setdefault("torchvision", None)
    transformers = pytest.importorskip("transformers")

    transformers.logging.set_verbosity_error()
    return transformers


def _gpt2(n: int, reduction: str) -> Case:
    transformers = _transformers()
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=8, n_embd=WIDTH, n_layer=1, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config).double().eval()
    tokens, _ = _tokens(n, ignored=False)
    mask = torch.ones_like(tokens)
    mask[-1, 3:] = 0
    labels = tokens.masked_fill(mask == 0, -100)
    inputs = {"input_ids": tokens, "attention_mask": mask}
    loss_fn = NextTokenCrossEntropyLoss(reduction=reduction)
    return Case(model, loss_fn, {**inputs, "labels": labels}, inputs, labels)


def _bert(n: int, reduction: str) -> Case:
    transformers = _transformers()
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).double().eval()
    tokens, _ = _tokens(n, ignored=False)
    mask = torch.ones_like(tokens)
    mask[-1, 4:] = 0
    labels = torch.randint(0, 3, (n,))
    inputs = {"input_ids": tokens, "attention_mask": mask}
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    return Case(model, loss_fn, {**inputs, "labels": labels}, inputs, labels)


def _encoder(n: int, reduction: str) -> Case:
    model = Encoder().double().eval()
    x = torch.randn(n, LENGTH, WIDTH, dtype=torch.float64)
    padding = torch.zeros(n, LENGTH, dtype=torch.bool)
    padding[-1, 3:] = True
    targets = torch.randint(0, 3, (n,))
    inputs = {"x": x, "padding": padding}
    return Case(model, nn.CrossEntropyLoss(reduction=reduction), (inputs, targets), inputs, targets)


def _parametrized(n: int, reduction: str, kind: str) -> Case:
    first, second = nn.Linear(6, 5), nn.Linear(5, 5)
    if kind == "weight_norm":
        first = weight_norm(first)
    elif kind == "spectral_norm":
        first = spectral_norm(first)
    else:
        parametrize.register_parametrization(second, "weight", Symmetric())
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(n, 6, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    return Case(model, nn.MSELoss(reduction=reduction), (x, y), x, y)


def _hooked(n: int, reduction: str) -> Case:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    model.register_forward_pre_hook(lambda module, args: (args[0] * model[0].bias,))
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    return Case(model, nn.MSELoss(reduction=reduction), (x, y), x, y)


def _recurrent(n: int, reduction: str, cell: type[nn.Module], dtype: torch.dtype) -> Case:
    model = Recurrent(cell).to(dtype).eval()
    x, y = torch.randn(n, 6, 4, dtype=dtype), torch.randint(0, 3, (n,))
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    return Case(model, nn.CrossEntropyLoss(reduction=reduction), (x, y), x, y, rtol)


CASES: dict[str, Callable[[int, str], Case]] = {
    "nanogpt-positions": _language_model,
    "nanogpt-sliced-parameter": lambda n, r: _language_model(n, r, positions="parameter"),
    "nanogpt-tied-flat": lambda n, r: _language_model(n, r, tied=True, flat=True),
    "gpt2-dict-padded": _gpt2,
    "bert-dict-padded": _bert,
    "encoder-padding-mask": _encoder,
    "weight_norm": lambda n, r: _parametrized(n, r, "weight_norm"),
    "spectral_norm": lambda n, r: _parametrized(n, r, "spectral_norm"),
    "parametrization": lambda n, r: _parametrized(n, r, "custom"),
    "pre-hook": _hooked,
    "lstm-float32": lambda n, r: _recurrent(n, r, nn.LSTM, torch.float32),
    "lstm-float64": lambda n, r: _recurrent(n, r, nn.LSTM, torch.float64),
    "gru-float32": lambda n, r: _recurrent(n, r, nn.GRU, torch.float32),
}


def _make(name: str, n: int, reduction: str) -> Case:
    torch.manual_seed(0)
    return CASES[name](n, reduction)


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.flatten() for t in tensors])


def _dense_ggn(case: Case, loss_fn: Callable[[Tensor, Any], Tensor] | None = None) -> Tensor:
    # The math kernel: torch has no double backward of CPU flash attention.
    with sdpa_kernel(SDPBackend.MATH):
        return verify.reference_ggn(
            case.model, loss_fn or case.loss_fn, case.inputs, case.targets
        ).to(torch.float64)


def _assert_close(actual: Tensor, expected: Tensor, rtol: float, what: str) -> None:
    scale = expected.abs().max().item()
    error = (actual.to(expected.dtype) - expected).abs().max().item()
    assert error <= rtol * max(scale, 1e-300), f"{what}: relative error {error / scale:.2e}"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_linear_quantities_match_the_dense_ggn(name: str, n: int, reduction: str) -> None:
    case = _make(name, n, reduction)
    ggn = _dense_ggn(case)
    diag = _flat(curvkit.diag_ggn(case.model, case.loss_fn, case.data))
    _assert_close(diag, ggn.diagonal(), case.rtol, "diag_ggn")
    dtype = next(case.model.parameters()).dtype
    vector = torch.randn(ggn.shape[0], dtype=torch.float64)
    product = _flat(
        curvkit.ggn_vector_product(case.model, case.loss_fn, case.data, vector.to(dtype))
    )
    _assert_close(product, ggn @ vector, case.rtol, "ggn_vector_product")
    if n > 1:
        matrix = curvkit.ggn_matrix(case.model, case.loss_fn, case.data)
        _assert_close(matrix, ggn, case.rtol, "ggn_matrix")


def _per_sample(case: Case) -> tuple[list[Tensor], list[Tensor]]:
    """Each sample's GGN and gradient: its terms of the batch loss, other outputs constant."""
    outputs = output_tensor(call_model(case.model, case.inputs))
    num_samples, rows = sample_layout(case.inputs, outputs)
    params = [p for p in case.model.parameters() if p.requires_grad]
    ggns, grads = [], []
    for n in range(num_samples):
        own = torch.zeros(outputs.shape[0], dtype=torch.bool)
        own[n * rows : (n + 1) * rows] = True

        def loss_n(out: Tensor, targets: Any, own: Tensor = own) -> Tensor:
            mask = own.reshape(-1, *[1] * (out.dim() - 1))
            return case.loss_fn(torch.where(mask, out, out.detach()), targets)

        ggns.append(_dense_ggn(case, loss_n))
        with sdpa_kernel(SDPBackend.MATH):
            out = output_tensor(call_model(case.model, case.inputs))
            grad = torch.autograd.grad(loss_n(out, case.targets), params, allow_unused=True)
        grads.append(
            _flat(
                [torch.zeros_like(p) if g is None else g for g, p in zip(grad, params, strict=True)]
            )
        )
    return ggns, grads


DIRECTIONAL = ["nanogpt-positions", "nanogpt-tied-flat", "gpt2-dict-padded", "weight_norm"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", DIRECTIONAL)
def test_directional_quantities_match_the_per_sample_reference(name: str, reduction: str) -> None:
    case = _make(name, 3, reduction)
    ggns, grads = _per_sample(case)
    num_samples, k, damping = len(ggns), 2, 0.5
    evals, evecs = torch.linalg.eigh(sum(ggns))
    evals, evecs = evals[-k:], evecs[:, -k:]
    gammas = num_samples * torch.stack(grads) @ evecs
    lambdas = num_samples * torch.stack([((g @ evecs) * evecs).sum(0) for g in ggns])
    step = evecs @ (-gammas.mean(0) / (lambdas.mean(0) + damping))

    group = [{"params": list(case.model.parameters()), "criterion": curvkit.top_k(k)}]
    ((got_evals, got_evecs),) = curvkit.ggn_eigh(case.model, case.loss_fn, case.data, group)
    _assert_close(got_evals, evals, case.rtol, "eigenvalues")
    flat_evecs = torch.cat([e.flatten(start_dim=1) for e in got_evecs], dim=1).T
    signs = torch.sign((flat_evecs * evecs).sum(0))
    _assert_close(flat_evecs * signs, evecs, 1e-7, "eigenvectors")
    ((got_gammas, got_lambdas),) = curvkit.directional_derivatives(
        case.model, case.loss_fn, case.data, group
    )
    _assert_close(got_gammas * signs, gammas, case.rtol, "directional gradients")
    _assert_close(got_lambdas, lambdas, case.rtol, "directional curvatures")
    damped = [{**group[0], "damping": damping}]
    (got_step,) = curvkit.damped_newton_step(case.model, case.loss_fn, case.data, damped)
    _assert_close(_flat(got_step), step, case.rtol, "damped Newton step")


def test_flattened_monte_carlo_columns_cover_a_sequence_at_once() -> None:
    """One column per sequence: K = mc_samples, unbiased for the exact GGN diagonal."""
    case = _make("nanogpt-tied-flat", 3, "mean")
    exact = _dense_ggn(case).diagonal()
    generator = torch.Generator().manual_seed(0)
    estimates = torch.stack(
        [
            _flat(
                curvkit.diag_ggn(
                    case.model, case.loss_fn, case.data, mc_samples=1, generator=generator
                )
            )
            for _ in range(400)
        ]
    )
    mean, stderr = estimates.mean(0), estimates.std(0) / 400**0.5
    assert ((mean - exact).abs() <= 5 * stderr + 1e-12).all()


def test_shared_tensors_leave_the_model_as_it_was() -> None:
    case = _make("spectral_norm", 3, "mean")
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    curvkit.diag_ggn(case.model, case.loss_fn, case.data)
    for key, value in case.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in case.model.parameters())


class InPlaceShared(nn.Module):
    """In-place updates with shared tensors, one through an alias (BERT's ``x += pos``)."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = nn.Embedding(LENGTH, 3)
        self.scale = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.tanh(x)
        alias = hidden
        hidden += self.positions(torch.arange(x.shape[1])) * self.scale.exp()
        return self.head(alias).sum(1)


def test_in_place_updates_with_shared_tensors_keep_their_meaning() -> None:
    torch.manual_seed(0)
    model = InPlaceShared().double()
    x = torch.randn(4, LENGTH, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    diag = _flat(curvkit.diag_ggn(model, nn.MSELoss(), (x, y)))
    expected = verify.reference_ggn(model, nn.MSELoss(), x, y).diagonal()
    _assert_close(diag, expected, 1e-10, "diag_ggn")


def test_a_shared_site_changed_in_place_again_is_refused() -> None:
    class Twice(InPlaceShared):
        def forward(self, x: Tensor) -> Tensor:
            hidden = torch.tanh(x)
            hidden += self.positions(torch.arange(x.shape[1]))
            hidden.mul_(self.scale.exp())
            return self.head(hidden).sum(1)

    model = Twice().double()
    batch = (torch.randn(4, LENGTH, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="changed in place later"):
        curvkit.diag_ggn(model, nn.MSELoss(), batch)


def test_in_place_write_into_a_shared_tensor_is_refused_with_advice() -> None:
    class IntoShared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.positions = nn.Embedding(LENGTH, 3)

        def forward(self, x: Tensor) -> Tensor:
            shared = self.positions(torch.arange(x.shape[1]))
            return shared.add_(x[0]).sum(0, keepdim=True)

    model = nn.Sequential(IntoShared(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="out of place"):
        curvkit.diag_ggn(model, nn.MSELoss(), (torch.randn(1, LENGTH, 3), torch.randn(1, 2)))


def test_a_transformed_parameter_used_in_its_own_leaf_module_takes_its_rule() -> None:
    """``x @ self.weight.T`` stays with the module's call (a registered rule sees it)."""

    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            return x @ self.weight.T

    model = nn.Sequential(Transposed(), nn.Tanh(), nn.Linear(2, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    from curvkit.engines.recording import record_forward

    recording = record_forward(model, (x,), list(model.parameters()))
    assert not recording.sites and type(recording.calls[0].module) is Transposed
    diag = _flat(curvkit.diag_ggn(model, nn.MSELoss(), (x, y)))
    expected = verify.reference_ggn(model, nn.MSELoss(), x, y).diagonal()
    _assert_close(diag, expected, 1e-10, "diag_ggn")


@pytest.mark.parametrize("num_columns", [1, 3])
def test_a_head_tied_as_a_module_keeps_its_factors_structured(num_columns: int) -> None:
    """An ``nn.Linear`` head sharing the embedding table (Hugging Face's tie): exact diagonal
    through the lookup's and the head's factors and their cross term, no dense columns."""
    from curvkit.engines import compute_factors
    from curvkit.engines.embedding import TiedEmbeddingFactor

    torch.manual_seed(0)
    model = NanoGPT().double().eval()
    model.head = nn.Linear(WIDTH, VOCAB, bias=False).double()
    model.head.weight = model.tokens.weight
    tokens, targets = _tokens(3)
    tokens[0, :2] = 4  # a token looked up twice in one sample
    data = (tokens, targets)
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    columns = torch.randn(num_columns, 3, VOCAB, LENGTH, dtype=torch.float64)
    _, factors = compute_factors(model, tokens, params, lambda out: columns)
    tied = factors[0]
    assert isinstance(tied, TiedEmbeddingFactor)
    torch.testing.assert_close(tied.diag(), tied.dense().square().sum(dim=(0, 1)))
    dense = tied.dense().flatten(start_dim=2)
    expected_gram = torch.einsum("knd,lmd->knlm", dense, dense)
    torch.testing.assert_close(tied.gram(), expected_gram, rtol=1e-12, atol=1e-12)
    tied.linear.max_chunk_bytes = 1  # the cross term one sample at a time
    torch.testing.assert_close(tied.gram(), expected_gram, rtol=1e-12, atol=1e-12)
    diag = _flat(curvkit.diag_ggn(model, loss_fn, data))
    expected = _dense_ggn(Case(model, loss_fn, data, tokens, targets)).diagonal()
    _assert_close(diag, expected, 1e-9, "diag_ggn")
