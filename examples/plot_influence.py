r"""
Influence functions: which training digits made this prediction
================================================================

An influence function asks how a model's loss on one example, the *query* :math:`q`, would
change if one training example :math:`t` were left out of training. For a model trained to a
minimum of the average training loss, the answer to first order is the score

.. math::

    s(q, t) = g_q^\top (C + \lambda I)^{-1} g_t,

where :math:`g_x` is the gradient of example :math:`x`'s own loss, :math:`C` is the curvature of
the training loss averaged over the training examples and :math:`\lambda` a damping. Leaving
:math:`t` out of :math:`N` examples moves the query's loss by about :math:`s(q, t) / N`: a
positive score marks a training example that *helps* the query (the loss rises without it), a
negative score one that *harms* it.

:func:`curvkit.influence.pairwise_scores` computes every score of a set of queries against a
training set, with an EK-FAC approximation of :math:`C` by default. This example

1. trains a small classifier of handwritten digits;
2. shows, for a few test digits, the training digits that help and harm their prediction most;
3. checks the scores against a dense reference built from plain ``torch.func`` (per-example
   gradients, the exact damped curvature, an explicit solve);
4. retrains without the top-scored training digits, and shows that this moves the query's loss
   far more than leaving out as many random ones: a small linear-datamodelling check.
"""

# %%
# A classifier of handwritten digits
# ----------------------------------
#
# scikit-learn's 8x8 digits, split 80/20 as ``curvkit demo`` splits them, and an MLP with one
# hidden layer of 16 tanh units, in float64. The training objective is the mean cross-entropy
# plus an L2 penalty :math:`\frac{\lambda}{2} \lVert \theta \rVert^2`, minimised by full-batch
# L-BFGS. The penalty's Hessian is :math:`\lambda I`, so the damping that matches this model is
# the weight decay itself.

import copy

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from curvkit import influence

WEIGHT_DECAY = 1e-2

images, labels = load_digits(return_X_y=True)
inputs = torch.as_tensor(images, dtype=torch.float64) / 16.0
targets = torch.as_tensor(labels)
order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
num_train = int(0.8 * len(targets))
train_x, train_y = inputs[order[:num_train]], targets[order[:num_train]]
test_x, test_y = inputs[order[num_train:]], targets[order[num_train:]]
loss_fn = nn.CrossEntropyLoss()


def fit(start: nn.Module, keep: torch.Tensor, tolerance: float) -> nn.Module:
    """Minimise the penalised training loss on the examples ``keep`` selects, from ``start``."""
    model = copy.deepcopy(start)
    params = list(model.parameters())
    optimizer = torch.optim.LBFGS(
        params,
        max_iter=5000,
        tolerance_grad=tolerance,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    x, y = train_x[keep], train_y[keep]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        penalty = sum((p**2).sum() for p in params)
        loss = loss_fn(model(x), y) + WEIGHT_DECAY / 2 * penalty
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


torch.manual_seed(0)
initial = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
everything = torch.ones(num_train, dtype=torch.bool)
model = fit(initial, everything, tolerance=1e-6)
with torch.no_grad():
    predictions = model(test_x).argmax(dim=1)
accuracy = (predictions == test_y).double().mean().item()
print(f"{num_train} training digits, test accuracy {100 * accuracy:.1f}%")
assert accuracy > 0.9

# %%
# Scores of three test digits against every training digit
# --------------------------------------------------------
#
# Two correctly classified test digits and the first misclassified one are the queries. With
# the default ``curvature="ekfac"``, the curvature is EK-FAC's approximation of the Fisher with
# one sampled label per example (``fisher_type="mc"``); the generator makes the sample
# repeatable.

wrong = (predictions != test_y).nonzero().flatten()
queries = torch.cat([torch.tensor([0, 1]), wrong[:1]])
query_x, query_y = test_x[queries], test_y[queries]
scores = influence.pairwise_scores(
    model,
    loss_fn,
    (train_x, train_y),
    (query_x, query_y),
    damping=WEIGHT_DECAY,
    generator=torch.Generator().manual_seed(0),
)
print(f"scores: {tuple(scores.shape)} (queries x training examples)")
assert scores.shape == (len(queries), num_train)

# %%
# The most helpful and the most harmful training digits
# -----------------------------------------------------
#
# Each row shows a query, then the five training digits with the largest scores (they support
# the query's label) and the five with the smallest (they pull the prediction elsewhere). The
# misclassified query's most harmful examples tend to look like it but carry the label it was
# mistaken for.

num_shown = 5
fig, axes = plt.subplots(len(queries), 2 * num_shown + 1, figsize=(13, 1.6 * len(queries) + 0.6))
for row, (query, query_scores) in enumerate(zip(queries.tolist(), scores, strict=True)):
    ranked = query_scores.argsort(descending=True)
    shown = [("query", test_x[query], f"label {test_y[query]}, pred {predictions[query]}")]
    for kind, index in [("helpful", i) for i in ranked[:num_shown]] + [
        ("harmful", i) for i in ranked.flip(0)[:num_shown]
    ]:
        shown.append((kind, train_x[index], f"{train_y[index]}: {query_scores[index]:.2g}"))
    for ax, (kind, image, title) in zip(axes[row], shown, strict=True):
        ax.imshow(image.reshape(8, 8), cmap="gray_r")
        ax.set_title(f"{kind}\n{title}" if row == 0 else title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
fig.suptitle("training digits that help (label: score > 0) and harm (score < 0) each query")
fig.tight_layout()
plt.show()

# %%
# A check against a dense reference
# ---------------------------------
#
# On a subset of 300 training digits, ``curvature="ggn"`` uses the exact generalised Gauss-Newton
# matrix :math:`C = \frac{1}{N} \sum_n J_n^\top H_n J_n` (without forming it). The reference
# forms it from plain ``torch.func``: each example's Jacobian :math:`J_n` of the logits, the
# softmax cross-entropy's Hessian :math:`H_n = \operatorname{diag}(p_n) - p_n p_n^\top`, each
# example's gradient, and one dense solve. ``curvature="identity"`` is the plain dot product of
# the gradients.

subset_x, subset_y = train_x[:300], train_y[:300]
params = {name: p.detach() for name, p in model.named_parameters()}


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example tensors ``{name: [N, *shape]}`` as one ``[N, D]`` matrix."""
    return torch.cat([t.flatten(start_dim=1) for t in tensors.values()], dim=1)


def example_loss(p, x, y):
    return loss_fn(functional_call(model, p, (x[None],)), y[None])


def example_logits(p, x):
    return functional_call(model, p, (x[None],))[0]


gradients = flat(vmap(grad(example_loss), in_dims=(None, 0, 0))(params, subset_x, subset_y))
query_gradients = flat(vmap(grad(example_loss), in_dims=(None, 0, 0))(params, query_x, query_y))
jacobians = vmap(jacrev(example_logits), in_dims=(None, 0))(params, subset_x)
jacobians = torch.cat([j.flatten(start_dim=2) for j in jacobians.values()], dim=2)
with torch.no_grad():
    probabilities = model(subset_x).softmax(dim=1)
loss_hessians = torch.diag_embed(probabilities) - probabilities[:, :, None] * probabilities[:, None]
ggn = torch.einsum("nci,ncd,ndj->ij", jacobians, loss_hessians, jacobians) / len(subset_y)
damped = ggn + WEIGHT_DECAY * torch.eye(len(ggn), dtype=ggn.dtype)
reference = query_gradients @ torch.linalg.solve(damped, gradients.T)

subset, query = (subset_x, subset_y), (query_x, query_y)
exact = influence.pairwise_scores(
    model, loss_fn, subset, query, curvature="ggn", damping=WEIGHT_DECAY
)
torch.testing.assert_close(exact, reference, rtol=1e-8, atol=1e-10 * reference.abs().max())
dot_products = influence.pairwise_scores(model, loss_fn, subset, query, curvature="identity")
torch.testing.assert_close(dot_products, query_gradients @ gradients.T)
print(f"exact GGN scores agree with the dense reference ({reference.numel()} scores)")

# EK-FAC approximates the exact scores: how well, on this subset.
approximate = influence.pairwise_scores(
    model,
    loss_fn,
    subset,
    query,
    damping=WEIGHT_DECAY,
    generator=torch.Generator().manual_seed(0),
)
for row, (ekfac_row, exact_row) in enumerate(zip(approximate, exact, strict=True)):
    correlation = torch.corrcoef(torch.stack([ekfac_row, exact_row]))[0, 1].item()
    print(f"query {row}: correlation of EK-FAC and exact scores {correlation:.3f}")

# %%
# Leaving out the top-scored digits
# ---------------------------------
#
# For each query, retrain without the 20 training digits of largest score, and without 20
# random digits (five draws). Retraining starts from the trained weights, so it is deterministic
# and stays in the same basin, which is the change that influence functions describe. The
# predicted change of the query's loss is the sum of the removed examples' scores over
# :math:`N`.

num_removed, num_draws = 20, 5


def query_losses(trained: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(trained(query_x), query_y, reduction="none")


def change_without(removed: torch.Tensor) -> torch.Tensor:
    keep = everything.clone()
    keep[removed] = False
    return query_losses(fit(model, keep, tolerance=1e-5)) - query_losses(model)


random_sets = [
    torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))[:num_removed]
    for seed in range(num_draws)
]
random_changes = torch.stack([change_without(removed) for removed in random_sets])
predicted_random = torch.stack([scores[:, removed].sum(dim=1) for removed in random_sets])
print("query | loss change without the top 20 (predicted) | without 20 random ones (largest)")
for row in range(len(queries)):
    top = scores[row].topk(num_removed).indices
    actual = change_without(top)[row].item()
    predicted = scores[row, top].sum().item() / num_train
    largest_random = random_changes[:, row].abs().max().item()
    print(f"{row:5} | {actual:+.4f} ({predicted:+.4f}) | {largest_random:.4f}")
    assert actual > 0, "leaving out the most helpful examples should raise the query's loss"
    assert actual > largest_random
print(
    f"random removals: predicted {(predicted_random / num_train).flatten().abs().max():.1e}"
    f" at most, actual {random_changes.abs().max():.1e} at most"
)
