r"""
A Laplace approximation over a Hugging Face classifier's trainable parameters
=============================================================================

Fine-tuning a large model often trains a few of its parameters: a classification head, a
normalisation layer, low-rank adapters, with ``requires_grad=False`` everywhere else. A
post-hoc Laplace approximation then needs the curvature of those parameters only, through the
whole frozen network in front of them. :mod:`curvkit.laplace` covers exactly the parameters that
require grad (``subset_of_weights="all"``), takes the dict batches a tokenizer and a collator
produce, and in ``hessian_structure="kron"`` gives a LayerNorm's parameters their exact GGN block
where Kronecker factors do not exist (laplace-torch refuses normalisation layers in ``kron``).

This example builds a small BERT for sequence classification from a config (no download),
trains it on a synthetic task as a stand-in for a pretrained checkpoint, freezes all but the
last LayerNorm, the pooler and the classifier, and fits a diagonal and a Kronecker-factored
Laplace over those. The predictive is less confident than the MAP on sequences of tokens the
model never saw; the curvature is checked against a dense GGN from plain autograd.
"""

# %%
# A small BERT, and a model that takes laplace-torch's dict batches
# -----------------------------------------------------------------
#
# transformers imports torchvision where one is installed; curvkit needs none, so it is blocked
# before the first import (a torchvision wheel that does not match torch fails to import).
# As with laplace-torch, the model takes the whole batch dict and returns the logits; the
# targets stay in the dict under ``"labels"`` (laplace-torch's ``dict_key_y``).

import sys

sys.modules.setdefault("torchvision", None)

import matplotlib.pyplot as plt
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader

from curvkit.laplace import Laplace
from curvkit.testing.verify import reference_ggn

transformers.logging.set_verbosity_error()
torch.manual_seed(0)
VOCAB, LENGTH, SEEN = 30, 8, 20
config = transformers.BertConfig(
    vocab_size=VOCAB,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=LENGTH,
    num_labels=3,
)
bert = transformers.BertForSequenceClassification(config).double()


class Classifier(nn.Module):
    """The logits of a Hugging Face classifier for a batch dict."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits


model = Classifier(bert)

# %%
# A synthetic task: which third of the first 20 tokens dominates a padded sequence. Tokens 20 to
# 29 never occur in training; sequences made of them are the out-of-distribution inputs.

generator = torch.Generator().manual_seed(0)


def sequences(num, low=0, high=SEEN):
    tokens = torch.randint(low, high, (num, LENGTH), generator=generator)
    lengths = torch.randint(4, LENGTH + 1, (num,), generator=generator)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    third = (tokens - low) * 3 // (high - low)
    counts = torch.stack([((third == c) & (mask == 1)).sum(dim=1) for c in range(3)], dim=1)
    return {"input_ids": tokens * mask, "attention_mask": mask, "labels": counts.argmax(dim=1)}


train, test, unseen = sequences(256), sequences(128), sequences(128, SEEN, VOCAB)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
for _ in range(400):
    chosen = torch.randint(0, 256, (32,), generator=generator)
    batch = {key: value[chosen] for key, value in train.items()}
    loss = nn.functional.cross_entropy(model(batch), batch["labels"])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()

# %%
# Only a few parameters trainable
# -------------------------------
#
# The last LayerNorm, the pooler and the classifier: the rest of the network is frozen.

trainable = ("encoder.layer.1.output.LayerNorm", "pooler", "classifier")
for name, parameter in model.named_parameters():
    parameter.requires_grad_(any(part in name for part in trainable))
names = [name for name, p in model.named_parameters() if p.requires_grad]
print(
    f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} of "
    f"{sum(p.numel() for p in model.parameters())} parameters trainable: {', '.join(names)}"
)

# %%
# Diagonal and Kronecker-factored Laplace, fitted on dict batches
# ---------------------------------------------------------------
#
# A ``DataLoader`` over sample dicts yields batch dicts; the prior precision comes from the marginal
# likelihood.

samples = [{key: value[i] for key, value in train.items()} for i in range(len(train["labels"]))]
train_loader = DataLoader(samples, batch_size=64)  # collates the sample dicts into batch dicts
laplaces = {}
for structure in ("diag", "kron"):
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    laplaces[structure] = la
    print(f"{structure}: prior precision {la.prior_precision.item():.3f}")

# %%
# Predictive uncertainty
# ----------------------
#
# The GLM predictive with the probit approximation, against the MAP's softmax: on held-out
# sequences of the training tokens and on sequences of unseen tokens.


def confidence(probs):
    return probs.max(dim=1).values


with torch.no_grad():
    map_probs = {"test": model(test).softmax(dim=1), "unseen tokens": model(unseen).softmax(dim=1)}
probs = {
    structure: {
        "test": la(test, pred_type="glm", link_approx="probit"),
        "unseen tokens": la(unseen, pred_type="glm", link_approx="probit"),
    }
    for structure, la in laplaces.items()
}
print(f"{'':18}{'test NLL':>9}{'test conf.':>12}{'unseen conf.':>14}")
for method, by_data in [("MAP", map_probs)] + [(f"Laplace, {s}", p) for s, p in probs.items()]:
    nll = nn.functional.nll_loss(by_data["test"].log(), test["labels"]).item()
    print(
        f"{method:18}{nll:9.3f}{confidence(by_data['test']).mean().item():12.3f}"
        f"{confidence(by_data['unseen tokens']).mean().item():14.3f}"
    )
for by_data in probs.values():
    assert (
        confidence(by_data["unseen tokens"]).mean() < confidence(map_probs["unseen tokens"]).mean()
    )

figure, ax = plt.subplots(figsize=(6, 3.8))
bins = torch.linspace(1 / 3, 1, 21)
for (method, by_data), colour in zip(
    [("MAP", map_probs), ("Laplace, kron", probs["kron"])], ["0.3", "#d1495b"], strict=True
):
    for data_name, style in (("test", "-"), ("unseen tokens", "--")):
        ax.hist(
            confidence(by_data[data_name]), bins=bins, histtype="step", linestyle=style,
            color=colour, linewidth=1.8, label=f"{method}, {data_name}",
        )  # fmt: skip
ax.set_xlabel("confidence (largest class probability)")
ax.set_ylabel("sequences")
ax.set_title("Tiny BERT, Laplace over 3 trainable modules")
ax.legend(fontsize=8, loc="upper left")
figure.tight_layout()

# %%
# Checked against autograd
# ------------------------
#
# One dense GGN of the summed cross-entropy over the training set, with respect to the trainable
# parameters only, from plain autograd (:func:`curvkit.testing.verify.reference_ggn` calls the
# Hugging Face model on the dict inputs). Its diagonal is the diagonal Laplace's curvature; its
# blocks for the LayerNorm's weight and bias are the ``kron`` Laplace's dense blocks, exactly.

params = [p for p in bert.parameters() if p.requires_grad]
inputs = {key: value for key, value in train.items() if key != "labels"}
ggn = reference_ggn(bert, nn.CrossEntropyLoss(reduction="sum"), inputs, train["labels"], params)


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


error = relative_error(laplaces["diag"].H, ggn.diagonal())
print(f"diagonal Laplace's GGN diagonal: relative error {error:.1e}")
assert error < 1e-10

# %%
# The ``kron`` curvature, one block per parameter tensor: the LayerNorm's blocks are dense and
# exact; each Linear weight's block is :math:`B \otimes A`, built here from its definition with
# per-sample quantities: :math:`A = \frac1N\sum_n x_n x_n^\top` over the layer's inputs, and
# :math:`B = \sum_n J_n^\top \Lambda_n J_n` with :math:`J_n` the Jacobian of the logits in the
# layer's outputs and :math:`\Lambda_n` the cross-entropy's Hessian in the logits; each bias's
# block is :math:`B`.

pooler, classifier = bert.bert.pooler.dense, bert.classifier
recorded = {}
hooks = [
    module.register_forward_hook(
        lambda m, args, out, key=key: recorded.update({key: (args[0], out)})
    )
    for key, module in (("pooler", pooler), ("classifier", classifier))
]
with torch.no_grad():
    logits = model(train)
for hook in hooks:
    hook.remove()
probs_train = logits.softmax(dim=1)
hessians = torch.diag_embed(probs_train) - probs_train[:, :, None] * probs_train[:, None, :]
pooler_inputs = recorded["pooler"][0]  # the first token's hidden state
pooler_outputs = recorded["pooler"][1]
# logits = W_c tanh(z) + b_c, so d logits / d z = W_c diag(1 - tanh(z)^2)
jacobian_z = classifier.weight * (1 - pooler_outputs.tanh().square())[:, None, :]
num_train = len(train["labels"])
factors = {
    "pooler": (
        torch.einsum("nci,ncd,ndj->ij", jacobian_z, hessians, jacobian_z).contiguous(),
        pooler_inputs.T @ pooler_inputs / num_train,
    ),
    "classifier": (
        hessians.sum(dim=0),
        recorded["classifier"][0].T @ recorded["classifier"][0] / num_train,
    ),
}
sizes = [p.numel() for p in params]
ggn_blocks = ggn.split(sizes, dim=0)
start = [sum(sizes[:i]) for i in range(len(sizes))]
exact = [block[:, s : s + n] for block, s, n in zip(ggn_blocks, start, sizes, strict=True)]
reference = torch.block_diag(
    exact[0],  # LayerNorm weight
    exact[1],  # LayerNorm bias
    torch.kron(*factors["pooler"]),
    factors["pooler"][0],
    torch.kron(*factors["classifier"]),
    factors["classifier"][0],
)
error = relative_error(laplaces["kron"].H.to_matrix(), reference)
print(f"kron Laplace's curvature (dense LayerNorm blocks, KFAC Linear blocks): {error:.1e}")
assert error < 1e-10
