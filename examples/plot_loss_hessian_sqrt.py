r"""
Square roots of the loss Hessian
================================

Every GGN quantity in curvkit starts in output space. For a batch loss
:math:`L = \sum_n r\,\ell_n(f_n)` the Hessian with respect to the model outputs is block diagonal
over the samples, and :func:`curvkit.losses.hessian_sqrt` returns, for every sample, a matrix
:math:`S_n` with

.. math::

    S_n S_n^\top = \frac{\partial^2 L}{\partial f_n^2},

the reduction factor :math:`r` (``mean`` or ``sum``) folded in. This example computes :math:`S_n`
for a cross-entropy loss (closed form), for a custom loss (autodiff and an eigendecomposition) and
by Monte-Carlo sampling, and checks each against the Hessian that plain ``torch.autograd`` computes.
"""

# %%
# Cross-entropy: a closed form
# ----------------------------
#
# For logits :math:`f` with probabilities :math:`p = \mathrm{softmax}(f)` the Hessian of the
# cross-entropy is :math:`a\,r\,(\mathrm{diag}(p) - p p^\top)`, where the class weights and the
# label smoothing enter through the scalar :math:`a`. Its :math:`C` columns
# :math:`\sqrt{a r p_c}\,(e_c - p)` are an exact square root, found without any differentiation.

import matplotlib.pyplot as plt
import torch
from torch import nn

from curvkit.losses import hessian_sqrt, normalization
from curvkit.testing.verify import compare, reference_output_hessian

torch.manual_seed(0)
num_samples, num_classes = 4, 6
logits = torch.randn(num_samples, num_classes, dtype=torch.float64)
labels = torch.randint(0, num_classes, (num_samples,))

cross_entropy = nn.CrossEntropyLoss(
    weight=torch.linspace(0.5, 2.0, num_classes, dtype=torch.float64), label_smoothing=0.1
)
sqrt = hessian_sqrt(cross_entropy, logits, labels)
print("S has shape [K, N, C] =", list(sqrt.shape))


def sqrt_gram(sqrt: torch.Tensor) -> torch.Tensor:
    """Per-sample :math:`S_n S_n^T` from ``S`` of shape ``[K, N, C]``."""
    return torch.einsum("kni,knj->nij", sqrt, sqrt)


ce_hessian = reference_output_hessian(cross_entropy, logits, labels)  # plain autograd
report = compare(sqrt_gram(sqrt), ce_hessian, rtol=1e-10, atol=1e-14)
print(report)
report.assert_passed()

# %%
# :func:`curvkit.losses.normalization` says how to combine batches: :math:`Z L` is the plain sum of
# the per-sample terms, here the summed class weights of the labels (the weighted mean's
# denominator).

first, second = slice(0, 1), slice(1, None)
weights = [normalization(cross_entropy, logits[part], labels[part]) for part in (first, second)]
losses = [cross_entropy(logits[part], labels[part]) for part in (first, second)]
combined = (weights[0] * losses[0] + weights[1] * losses[1]) / (weights[0] + weights[1])
assert torch.allclose(combined, cross_entropy(logits, labels), rtol=1e-12, atol=0)

# %%
# Any other loss: autodiff and an eigendecomposition
# --------------------------------------------------
#
# A loss curvkit has no closed form for is differentiated twice: one batched Hessian-vector product
# per output dimension gives every sample's block at once (the samples are independent), and a
# symmetric eigendecomposition :math:`H_n = U \Lambda U^\top` gives
# :math:`S_n = U \Lambda^{1/2}`. Here: a Gaussian negative log-likelihood with a fixed, correlated
# precision matrix :math:`P`, averaged over the batch, whose Hessian is :math:`P / N`.

dim = 6
factor = torch.randn(dim, dim, dtype=torch.float64)
precision = factor @ factor.T / dim + 0.5 * torch.eye(dim, dtype=torch.float64)


def correlated_gaussian_nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    residual = outputs - targets
    return 0.5 * torch.einsum("ni,ij,nj->n", residual, precision, residual).mean()


predictions = torch.randn(num_samples, dim, dtype=torch.float64)
observed = torch.randn(num_samples, dim, dtype=torch.float64)
custom_sqrt = hessian_sqrt(correlated_gaussian_nll, predictions, observed)
custom_hessian = reference_output_hessian(correlated_gaussian_nll, predictions, observed)
compare(sqrt_gram(custom_sqrt), custom_hessian, rtol=1e-10, atol=1e-14).assert_passed()
assert torch.allclose(custom_hessian[0], precision / num_samples, rtol=1e-12, atol=0)
print(
    "normalization of the custom loss (a mean over 4 samples):",
    normalization(correlated_gaussian_nll, predictions, observed).item(),
)

# %%
# Monte-Carlo square roots
# ------------------------
#
# With ``mc_samples=M`` the square root has :math:`M` columns instead of :math:`C`, drawn so that
# :math:`\mathbb{E}[S_n S_n^\top]` is the Hessian: for cross-entropy, labels are sampled from the
# predicted distribution. A ``torch.Generator`` makes the draw reproducible. The error shrinks
# like :math:`1/\sqrt{M}`.

errors = {}
for mc_samples in (10, 100, 1_000, 10_000):
    generator = torch.Generator().manual_seed(1)
    estimate = sqrt_gram(
        hessian_sqrt(cross_entropy, logits, labels, mc_samples=mc_samples, generator=generator)
    )
    errors[mc_samples] = ((estimate - ce_hessian).norm() / ce_hessian.norm()).item()
    print(f"M = {mc_samples:>6}: relative error {errors[mc_samples]:.3f}")
assert errors[10_000] < 0.1 * errors[10]

# %%
# The Hessians of the first sample, from autograd and from the square roots:

panels = [
    ("cross-entropy: autograd Hessian", ce_hessian[0]),
    ("cross-entropy: $S_0 S_0^\\top$", sqrt_gram(sqrt)[0]),
    ("cross-entropy: MC, $M = 10^4$", estimate[0]),
    ("custom loss: autograd Hessian", custom_hessian[0]),
    ("custom loss: $S_0 S_0^\\top$", sqrt_gram(custom_sqrt)[0]),
]
fig, axes = plt.subplots(2, 3, figsize=(11, 7), layout="constrained")
for ax, (title, matrix) in zip(axes.flat, panels, strict=False):
    limit = matrix.abs().max().item()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("output entry")
    ax.set_ylabel("output entry")
    fig.colorbar(image, ax=ax, shrink=0.8)
axes.flat[-1].loglog(list(errors), list(errors.values()), "o-", label="cross-entropy MC")
axes.flat[-1].loglog(
    list(errors), [errors[10] * (10 / m) ** 0.5 for m in errors], "k--", label=r"$\propto M^{-1/2}$"
)
axes.flat[-1].set_xlabel("Monte-Carlo samples $M$")
axes.flat[-1].set_ylabel("relative error")
axes.flat[-1].legend()
plt.show()
