r"""
Calibrated digits: a post-hoc Laplace approximation, checked against autograd
=============================================================================

A network trained to a point estimate :math:`\hat\theta` (the MAP) predicts with
:math:`\operatorname{softmax}(f(x, \hat\theta))` and knows nothing about how uncertain
:math:`\hat\theta` is. The **Laplace approximation** puts a Gaussian around it,

.. math::

    p(\theta \mid \mathcal D) \approx \mathcal N\big(\hat\theta,\ P^{-1}\big), \qquad
    P = \delta I + \sum_n J_n^\top \Lambda_n J_n ,

whose precision :math:`P` is the prior precision :math:`\delta` plus the curvature (GGN) of the
loss summed over the training set: the quantity curvkit computes. Linearising the network around
:math:`\hat\theta` (the *GLM predictive*) gives each test logit a Gaussian
:math:`\mathcal N(f(x, \hat\theta), J(x) P^{-1} J(x)^\top)`; the *probit* approximation turns it
into class probabilities, :math:`\operatorname{softmax}\big(f / \sqrt{1 + \tfrac{\pi}{8}
\operatorname{diag}(J P^{-1} J^\top)}\big)`, and the *marginal likelihood* of the data chooses
:math:`\delta`.

:mod:`curvkit.laplace` has laplace-torch's API by its own names. This example fits two post-hoc
Laplace approximations to an MLP on scikit-learn's handwritten digits (the data of
``curvkit demo``): Kronecker-factored (KFAC) on the last layer, and diagonal on all weights;
compares negative log-likelihood and expected calibration error with the MAP's, on the test set
and on the test set shifted by one pixel; and checks every curvature number against plain
autograd: the diagonal, the KFAC blocks, the marginal likelihood and the GLM predictive.
"""

# %%
# Data and the MAP network
# ------------------------
#
# The 8x8 digits, scaled to :math:`[0, 1]`, split 80/20. The MLP is trained to the MAP under the
# prior :math:`\mathcal N(0, \delta_0^{-1} I)` with :math:`\delta_0 = 1`: the mean cross-entropy
# plus :math:`\frac{\delta_0}{2N}\lVert\theta\rVert^2`. float64, so that the checks below can
# ask for agreement to rounding.

import math

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from curvkit.laplace import Laplace

torch.manual_seed(0)
generator = torch.Generator().manual_seed(0)
images, labels = load_digits(return_X_y=True)
inputs = torch.as_tensor(images, dtype=torch.float64) / 16
targets = torch.as_tensor(labels)
order = torch.randperm(len(targets), generator=generator)
num_train = int(0.8 * len(targets))
x_train, y_train = inputs[order[:num_train]], targets[order[:num_train]]
x_test, y_test = inputs[order[num_train:]], targets[order[num_train:]]
# The same test images moved one pixel to the right: a small shift the network never saw.
x_shifted = x_test.reshape(-1, 8, 8).roll(1, dims=2).reshape(-1, 64)

model = nn.Sequential(
    nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
).double()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
map_prior_precision = 1.0
for _ in range(60):
    for batch in torch.randperm(num_train, generator=generator).split(64):
        squared_norm = sum(p.square().sum() for p in model.parameters())
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        loss = loss + map_prior_precision / (2 * num_train) * squared_norm
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
model.eval()
print(f"{sum(p.numel() for p in model.parameters())} parameters")

# %%
# Two post-hoc Laplace approximations
# -----------------------------------
#
# ``fit`` sums the curvature over the training loader; ``optimize_prior_precision`` maximises
# the marginal likelihood over :math:`\delta` (a scalar here).

train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=128)

last_layer = Laplace(
    model, "classification", subset_of_weights="last_layer", hessian_structure="kron"
)
last_layer.fit(train_loader)
last_layer.optimize_prior_precision(method="marglik")

all_weights = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
all_weights.fit(train_loader)
all_weights.optimize_prior_precision(method="marglik")

for name, la in (("last-layer KFAC", last_layer), ("all-weights diagonal", all_weights)):
    print(
        f"{name}: prior precision {la.prior_precision.item():.3f}, "
        f"log marginal likelihood {la.log_marginal_likelihood().item():.1f}"
    )

# %%
# Calibration: negative log-likelihood and expected calibration error
# --------------------------------------------------------------------
#
# The expected calibration error (ECE) sorts the test points into ten bins by their confidence
# (the largest class probability) and averages :math:`|\text{accuracy} - \text{confidence}|`
# over the bins, weighted by the points in each.

NUM_BINS = 10


def reliability(probs, y):
    """Per confidence bin: mean confidence, accuracy, share of the points."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == y).double()
    bins = (confidence * NUM_BINS).ceil().long().clamp(1, NUM_BINS) - 1
    share = torch.bincount(bins, minlength=NUM_BINS).double() / len(y)
    count = torch.bincount(bins, minlength=NUM_BINS).clamp(min=1)
    mean_confidence = torch.bincount(bins, confidence, minlength=NUM_BINS) / count
    accuracy = torch.bincount(bins, correct, minlength=NUM_BINS) / count
    return mean_confidence, accuracy, share


def metrics(probs, y):
    mean_confidence, accuracy, share = reliability(probs, y)
    return {
        "NLL": -probs[torch.arange(len(y)), y].log().mean().item(),
        "ECE": (share * (accuracy - mean_confidence).abs()).sum().item(),
        "accuracy": (probs.argmax(dim=1) == y).double().mean().item(),
    }


def predict_all(x):
    with torch.no_grad():
        map_probs = model(x).softmax(dim=1)
    return {
        "MAP": map_probs,
        "Laplace, last-layer KFAC": last_layer(x, pred_type="glm", link_approx="probit"),
        "Laplace, all-weights diagonal": all_weights(x, pred_type="glm", link_approx="probit"),
    }


predictions = {"test set": predict_all(x_test), "shifted by a pixel": predict_all(x_shifted)}
print(f"{'':32}{'':20}   NLL    ECE  accuracy")
for data_name, by_method in predictions.items():
    for method, probs in by_method.items():
        row = metrics(probs, y_test)
        print(
            f"{method:32}{data_name:20}{row['NLL']:6.3f} {row['ECE']:6.3f} "
            f"{100 * row['accuracy']:8.1f}%"
        )

# %%
# On the test set the MAP, trained with its prior, is already well calibrated, and the Laplace
# predictive is a little underconfident. On the shifted digits the MAP keeps its confidence while
# its accuracy drops; the Laplace predictives widen where the inputs leave the training data, and
# both their negative log-likelihood and their calibration error fall below the MAP's.
#
# The reliability diagram shows the same per confidence bin (a calibrated model lies on the
# diagonal; the bars show how many test points fall in each bin).

colours = ["0.3", "#d1495b", "#00798c"]
figure, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
for ax, (data_name, by_method) in zip(axes, predictions.items(), strict=True):
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    for (method, probs), colour in zip(by_method.items(), colours, strict=True):
        mean_confidence, accuracy, share = reliability(probs, y_test)
        shown = share > 0
        ece = metrics(probs, y_test)["ECE"]
        label = f"{method} (ECE {ece:.3f})"
        ax.plot(mean_confidence[shown], accuracy[shown], "o-", color=colour, label=label)
        centres = (torch.arange(NUM_BINS) + 0.5) / NUM_BINS
        ax.bar(centres, share, width=1 / NUM_BINS, color=colour, alpha=0.12)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (largest class probability)")
    ax.set_title(f"digits, {data_name}")
    ax.legend(fontsize=8, loc="upper left")
axes[0].set_ylabel("accuracy in the bin (bars: share of the points)")
figure.tight_layout()

# %%
# Checked against autograd: the diagonal
# --------------------------------------
#
# The references are built from per-sample Jacobians of the logits by ``torch.func``, nothing
# else: with :math:`\Lambda_n = \operatorname{diag}(p_n) - p_n p_n^\top` the Hessian of the
# cross-entropy in the logits, the GGN of the summed loss is
# :math:`\sum_n J_n^\top \Lambda_n J_n`, and its diagonal
# :math:`\sum_n \sum_{ij} [J_n]_{ip} [\Lambda_n]_{ij} [J_n]_{jp}`.

params = dict(model.named_parameters())


def jacobians(x, names):
    """Per-sample Jacobians of the logits w.r.t. the named parameters, flattened: [N, C, P]."""

    def logits(chosen, sample):
        return functional_call(model, {**params, **chosen}, (sample[None],))[0]

    chosen = {name: params[name].detach() for name in names}
    per_name = vmap(jacrev(logits), in_dims=(None, 0))(chosen, x)
    return torch.cat([per_name[name].flatten(start_dim=2) for name in names], dim=2)


def logit_hessians(x):
    with torch.no_grad():
        p = model(x).softmax(dim=1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


reference_diagonal = 0
for x in x_train.split(256):
    jacobian = jacobians(x, list(params))
    reference_diagonal += torch.einsum("ncp,ncd,ndp->p", jacobian, logit_hessians(x), jacobian)
error = relative_error(all_weights.H, reference_diagonal)
print(f"all-weights GGN diagonal: relative error {error:.1e}")
assert error < 1e-10
precision_error = relative_error(
    all_weights.posterior_precision, reference_diagonal + all_weights.prior_precision
)
print(f"diagonal posterior precision: relative error {precision_error:.1e}")
assert precision_error < 1e-10

# %%
# The last layer's KFAC blocks, from their definition
# ---------------------------------------------------
#
# The last layer maps the features :math:`h_n` (the output of the second ``Tanh``) to the logits
# as :math:`W h_n + b`, so its Jacobian is :math:`h_n^\top` per row and the backpropagated
# curvature is :math:`\Lambda_n` itself. KFAC approximates the weight's GGN block
# :math:`\sum_n \Lambda_n \otimes h_n h_n^\top` by :math:`B \otimes A` with
# :math:`B = \sum_n \Lambda_n` and :math:`A = \frac1N \sum_n h_n h_n^\top` (laplace-torch's
# scaling: the factors of the summed loss); the bias block is exactly :math:`B`.

with torch.no_grad():
    features = model[:-1](x_train)
factor_b = logit_hessians(x_train).sum(dim=0)
factor_a = features.T @ features / num_train
reference_kfac = torch.block_diag(torch.kron(factor_b, factor_a), factor_b)
error = relative_error(last_layer.H.to_matrix(), reference_kfac)
print(f"last-layer KFAC (weight and bias blocks): relative error {error:.1e}")
assert error < 1e-10
delta = last_layer.prior_precision
reference_precision = reference_kfac + delta * torch.eye(len(reference_kfac), dtype=torch.float64)
error = relative_error(last_layer.posterior_precision.to_matrix(), reference_precision)
print(f"last-layer posterior precision: relative error {error:.1e}")
assert error < 1e-10

# %%
# The marginal likelihood from the dense posterior precision
# ----------------------------------------------------------
#
# For a Gaussian prior :math:`\mathcal N(0, \delta^{-1} I)` over :math:`P` parameters, the
# Laplace approximation of the log marginal likelihood is
# :math:`\log p(\mathcal D \mid \hat\theta) - \tfrac12 \big(\log\det P - P \log \delta\big)
# - \tfrac{\delta}{2} \lVert\hat\theta\rVert^2`.


def reference_log_marglik(precision_logdet, delta, theta):
    with torch.no_grad():
        log_likelihood = -nn.functional.cross_entropy(model(x_train), y_train, reduction="sum")
    log_det_ratio = precision_logdet - theta.numel() * delta.log()
    return log_likelihood - 0.5 * (log_det_ratio + delta * theta.square().sum())


last_weights = torch.cat([model[-1].weight.flatten(), model[-1].bias]).detach()
expected = reference_log_marglik(torch.logdet(reference_precision), delta, last_weights)
error = relative_error(last_layer.log_marginal_likelihood().detach(), expected)
print(f"last-layer log marginal likelihood: relative error {error:.1e}")
assert error < 1e-10

all_params = torch.cat([p.detach().flatten() for p in model.parameters()])
delta_all = all_weights.prior_precision
diagonal_precision = reference_diagonal + delta_all
expected = reference_log_marglik(diagonal_precision.log().sum(), delta_all, all_params)
error = relative_error(all_weights.log_marginal_likelihood().detach(), expected)
print(f"all-weights log marginal likelihood: relative error {error:.1e}")
assert error < 1e-10

# %%
# The GLM predictive from an explicit Jacobian
# --------------------------------------------
#
# On five test points: the logits' variance :math:`J \Sigma J^\top` with the dense posterior
# covariance :math:`\Sigma = P^{-1}`, and the probit probabilities built from it.

x_few = x_test[:5]
cases = [
    (last_layer, ["4.weight", "4.bias"], torch.linalg.inv(reference_precision)),
    (all_weights, list(params), torch.diag(1 / diagonal_precision)),
]
for la, names, covariance in cases:
    jacobian = jacobians(x_few, names)
    variance = jacobian @ covariance @ jacobian.transpose(1, 2)
    with torch.no_grad():
        mean = model(x_few)
    scale = torch.sqrt(1 + math.pi / 8 * variance.diagonal(dim1=1, dim2=2))
    expected_probs = (mean / scale).softmax(dim=1)
    variance_error = relative_error(la.functional_variance(jacobian), variance)
    probs_error = relative_error(la(x_few, pred_type="glm", link_approx="probit"), expected_probs)
    print(
        f"{la.__class__.__name__}: logit variance relative error {variance_error:.1e}, "
        f"probit probabilities {probs_error:.1e}"
    )
    assert variance_error < 1e-10 and probs_error < 1e-10
