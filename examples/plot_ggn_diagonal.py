r"""
The GGN diagonal of a CNN, exact and Monte-Carlo
================================================

The generalised Gauss-Newton matrix of a batch loss is
:math:`G = \sum_n J_n^\top H_n J_n`, with :math:`J_n` the Jacobian of sample :math:`n`'s output
with respect to the parameters and :math:`H_n` the loss Hessian in output space. Its diagonal is
the curvature estimate behind diagonal preconditioners, pruning scores and Laplace
approximations. :func:`curvkit.diag_ggn` computes it exactly, or as an unbiased Monte-Carlo
estimate, in one forward and one batched backward pass, with no ``extend()`` and no
``nn.Sequential`` requirement.

This example computes the diagonal of a small CNN (convolutions, BatchNorm in eval mode,
max-pooling), checks it against plain ``torch.autograd``, looks at how Monte-Carlo estimates
converge, extracts a few exact GGN columns, and plots the diagonal's magnitudes layer by layer.
"""

# %%
# A model and a batch
# -------------------
#
# Everything runs in float64 so that curvkit and the autograd reference can be compared to
# near machine precision.

import matplotlib.pyplot as plt
import torch
from torch import nn

import curvkit
from curvkit.testing.verify import compare, reference_ggn

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 4, 3, padding=1),
    nn.BatchNorm2d(4),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(4, 4, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(4, 5),
).double()
model.eval()  # BatchNorm uses its running statistics: samples stay independent
inputs = torch.randn(12, 3, 4, 4, dtype=torch.float64)
targets = torch.randint(0, 5, (12,))
loss_fn = nn.CrossEntropyLoss()
data = (inputs, targets)
names = [name for name, _ in model.named_parameters()]
print(f"{sum(p.numel() for p in model.parameters())} parameters in {len(names)} tensors")

# %%
# The exact diagonal, checked against autograd
# --------------------------------------------
#
# :func:`curvkit.testing.verify.reference_ggn` builds the whole GGN column by column from
# Jacobian-vector products of plain ``torch.autograd``: slow, but independent of curvkit's engine.

diagonal = curvkit.diag_ggn(model, loss_fn, data)
dense = reference_ggn(model, loss_fn, inputs, targets)
params = list(model.parameters())
entries = dense.diagonal().split([p.numel() for p in params])
expected = [d.reshape(p.shape) for d, p in zip(entries, params, strict=True)]
report = compare(diagonal, expected, names=names)
print(report)
report.assert_passed()

# %%
# Monte-Carlo estimates
# ---------------------
#
# With ``mc_samples=M``, the loss Hessian's square root is replaced by :math:`M` columns built
# from targets sampled from the model's predictive distribution. The estimate is unbiased, and
# its error falls like :math:`1/\sqrt{M}`.


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


exact = flat(diagonal)
generator = torch.Generator().manual_seed(1)
sample_counts = [1, 4, 16, 64, 256]
errors = []
for mc_samples in sample_counts:
    estimate = flat(
        curvkit.diag_ggn(model, loss_fn, data, mc_samples=mc_samples, generator=generator)
    )
    errors.append(((estimate - exact).norm() / exact.norm()).item())
    print(f"M = {mc_samples:5d}: relative error {errors[-1]:.3f}")
# 256 samples average 256 single-sample estimates: about 1/16 of their error.
assert errors[-1] < errors[0] / 4

# %%
# Exact GGN columns
# -----------------
#
# :func:`curvkit.ggn_columns` yields exact columns :math:`G e_i` of the GGN over the flattened
# parameters, many per backward pass. Here: the first and the last entry of every parameter.

indices = []
start = 0
for p in params:
    indices += [start, start + p.numel() - 1]
    start += p.numel()
columns = dict(curvkit.ggn_columns(model, loss_fn, data, indices=indices))
compare(
    [columns[i] for i in indices], [dense[:, i] for i in indices], names=[str(i) for i in indices]
).assert_passed()
print(f"{len(indices)} columns match the autograd GGN")

# %%
# Layer by layer
# --------------
#
# The diagonal's entries span several orders of magnitude across layers: the last layer and the
# BatchNorm affine parameters carry most of the curvature in this network.

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
jitter = torch.Generator().manual_seed(2)
for row, entries in enumerate(diagonal):
    # Exact zeros (e.g. weights of dead inputs) have no place on a log axis: leave them out.
    values = entries.reshape(-1)
    values = values[values > 0]
    offsets = 0.3 * (torch.rand(values.numel(), generator=jitter) - 0.5)
    left.scatter(values.numpy(), (row + offsets).numpy(), s=6, alpha=0.6)
left.set_yticks(range(len(names)), names)
left.set_xscale("log")
left.set_xlabel("exact GGN diagonal entry")
left.set_title("Per-parameter diagonal magnitudes")
right.loglog(sample_counts, errors, "o-", label="Monte-Carlo")
right.loglog(
    sample_counts, [errors[0] / m**0.5 for m in sample_counts], "k--", label=r"$1/\sqrt{M}$"
)
right.set_xlabel("Monte-Carlo samples M")
right.set_ylabel("relative error of the diagonal")
right.legend()
right.set_title("Monte-Carlo convergence")
fig.tight_layout()
plt.show()
