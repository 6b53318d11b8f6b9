r"""
Curvature of a Hugging Face GPT-2, checked against autograd
===========================================================

curvkit takes a Hugging Face model as it is: batches are the dicts a tokenizer and a data
collator produce (``input_ids``, ``attention_mask``, ``labels``), the model returns its
``ModelOutput``, and curvkit reads the logits. The one line of adapter code is the loss:
:class:`~curvkit.losses.NextTokenCrossEntropyLoss` is the loss Hugging Face computes from
``labels`` (the logits at position :math:`t` predict the label at :math:`t + 1`, padding
labelled ``-100``), with its curvature in closed form.

For a language model, a **sample is a sequence**: the GGN is
:math:`G = \sum_n J_n^\top H_n J_n` over the sequences :math:`n`, each :math:`H_n` block-diagonal
over the positions. Monte-Carlo columns (``mc_samples=M``) are :math:`M` per sequence, each
covering all its positions at once. The positional embeddings of ``arange(T)``, shared by all
sequences, and the language-model head tied to the token embeddings enter through the chain
rule.

This example computes the GGN diagonal, a GGN-vector product and a damped Newton step of a
small random-initialised GPT-2 and checks each against plain ``torch.autograd``.
"""

# %%
# A small GPT-2 and a padded batch
# --------------------------------
#
# transformers imports torchvision where one is installed; curvkit needs none, so it is
# blocked before the first import (a torchvision wheel that does not match torch fails to
# import).

import sys

sys.modules.setdefault("torchvision", None)

import matplotlib.pyplot as plt
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvkit
from curvkit.losses import NextTokenCrossEntropyLoss
from curvkit.testing.verify import reference_ggn

transformers.logging.set_verbosity_error()
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2)
model = transformers.GPT2LMHeadModel(config).double().eval()
print(
    f"{sum(p.numel() for p in model.parameters())} parameters, head tied to the embeddings:",
    model.lm_head.weight is model.transformer.wte.weight,
)

tokens = torch.randint(0, config.vocab_size, (3, 6))
attention_mask = torch.ones_like(tokens)
attention_mask[2, 4:] = 0  # the last sequence is padded
batch = {
    "input_ids": tokens,
    "attention_mask": attention_mask,
    "labels": tokens.masked_fill(attention_mask == 0, -100),
}
loss_fn = NextTokenCrossEntropyLoss()
print(
    "loss:",
    float(loss_fn(model(**batch).logits, batch["labels"])),
    "Hugging Face's:",
    float(model(**batch).loss),
)

# %%
# The GGN diagonal, exact and Monte-Carlo
# ---------------------------------------

diag = curvkit.diag_ggn(model, loss_fn, batch)
mc_diag = curvkit.diag_ggn(
    model, loss_fn, batch, mc_samples=64, generator=torch.Generator().manual_seed(0)
)
flat = torch.cat([d.flatten() for d in diag])
mc_flat = torch.cat([d.flatten() for d in mc_diag])

# %%
# Checked against plain autograd: :math:`J^\top H J` from the full Jacobian of the logits
# (with the math attention kernel, whose double backward torch implements).

inputs = {k: v for k, v in batch.items() if k != "labels"}
with sdpa_kernel(SDPBackend.MATH):
    ggn = reference_ggn(model, loss_fn, inputs, batch["labels"])
error = (flat - ggn.diagonal()).abs().max() / ggn.diagonal().abs().max()
print(f"GGN diagonal: relative error {error:.1e}")
assert error < 1e-10

vector = torch.randn(ggn.shape[0], dtype=torch.float64)
product = torch.cat(
    [p.flatten() for p in curvkit.ggn_vector_product(model, loss_fn, batch, vector)]
)
error = (product - ggn @ vector).abs().max() / (ggn @ vector).abs().max()
print(f"GGN-vector product: relative error {error:.1e}")
assert error < 1e-10

# %%
# A damped Newton step on the top eigenspace
# ------------------------------------------
#
# :func:`curvkit.damped_newton_step` filters the GGN's top eigenvectors through its Gram
# matrix (sequences times square-root columns) and damps each direction. Checked against the
# same step built from the dense GGN: along its top :math:`k` eigenvectors :math:`e_j`, the
# step is :math:`-\sum_j \frac{g^\top e_j}{\lambda_j + \delta} e_j`.

k, damping = 4, 0.1
group = [{"params": list(model.parameters()), "criterion": curvkit.top_k(k), "damping": damping}]
(step,) = curvkit.damped_newton_step(model, loss_fn, batch, group)
step = torch.cat([s.flatten() for s in step])

with sdpa_kernel(SDPBackend.MATH):
    gradient = torch.autograd.grad(
        loss_fn(model(**inputs).logits, batch["labels"]), list(model.parameters())
    )
gradient = torch.cat([g.flatten() for g in gradient])
evals, evecs = torch.linalg.eigh(ggn)
evals, evecs = evals[-k:], evecs[:, -k:]
expected = -evecs @ ((evecs.T @ gradient) / (evals + damping))
error = (step - expected).abs().max() / expected.abs().max()
print(f"damped Newton step: relative error {error:.1e}")
assert error < 1e-8

# %%
# The picture: exact against Monte-Carlo diagonal entries, per parameter. The Monte-Carlo
# estimate is unbiased; 64 samples per sequence scatter around the exact values.

fig, ax = plt.subplots(figsize=(5, 4))
ax.loglog(flat.clamp_min(1e-12), mc_flat.abs().clamp_min(1e-12), ".", markersize=2, alpha=0.5)
limits = [1e-12, float(flat.max()) * 2]
ax.plot(limits, limits, "k--", linewidth=1)
ax.set_xlabel("exact GGN diagonal")
ax.set_ylabel("Monte-Carlo estimate (64 samples)")
ax.set_title("GPT-2: exact and Monte-Carlo GGN diagonal")
fig.tight_layout()
