r"""
ViViT code on torch 2: directionally damped Newton steps
========================================================

ViViT computes damped Newton steps along the leading eigenvectors of the generalised
Gauss-Newton (GGN) matrix inside BackPACK's backward pass. It no longer runs on torch 2, since it
calls the removed ``Tensor.symeig``. curvkit provides the same classes with the same protocol, so
ViViT code keeps working with one changed line: the import. This script is ViViT's own
documentation example of :class:`~curvkit.DirectionalDampedNewtonComputation`, retold, with
exactly that change (curvkit's test suite runs it with ViViT's import, too). At the end we check
the step against plain ``torch.autograd``.

The step along the selected eigenpairs :math:`(\lambda_k, e_k)` of the GGN :math:`G`, with the
gradient :math:`g` and a damping :math:`\delta_k` per direction, is

.. math::

    s = -\sum_k \frac{g^\top e_k}{\lambda_k + \delta_k}\, e_k .
"""

# %%
# Imports: the only line that differs from ViViT code is the one importing the computation.

import torch
from backpack import backpack, extend
from torch import nn
from torch.nn.utils import parameters_to_vector

from curvkit import DirectionalDampedNewtonComputation
from curvkit.testing.verify import reference_ggn

torch.manual_seed(0)

# %%
# A toy problem
# -------------
#
# Four samples, a small ReLU network with layers of 7, 5, 5 and 3 units, and the mean squared
# error: small enough that the dense GGN fits in memory for the check at the end.

N, D_in, D_hidden, D_out = 4, 7, 5, 3
X = torch.rand(N, D_in)
y = torch.rand(N, D_out)

model = nn.Sequential(
    nn.Linear(D_in, D_hidden),
    nn.ReLU(),
    nn.Linear(D_hidden, D_hidden),
    nn.ReLU(),
    nn.Linear(D_hidden, D_out),
)
loss_function = nn.MSELoss(reduction="mean")

# %%
# BackPACK does the per-sample work, so the model and the loss are extended first; then one
# forward pass gives the loss.

model = extend(model)
loss_function = extend(loss_function)
loss = loss_function(model(X), y)

# %%
# Which directions, and how much damping
# --------------------------------------
#
# A parameter group says which parameters form a GGN block (here: all of them, the full GGN),
# which eigenvalues to use (a criterion receives all of them in ascending order and returns the
# indices to keep: here the four largest), and the damping per direction (a function of the
# eigenvalues, the Gram eigenvectors and the per-sample directional derivatives; here the
# constant 1).

TOP_K = 4
DAMPING = 1.0


def select_top_k(evals):
    """Indices of the ``TOP_K`` largest of the ascending eigenvalues."""
    return list(range(evals.numel() - TOP_K, evals.numel()))


def constant_damping(evals, evecs, gammas, lambdas):
    """The same damping along every direction."""
    return torch.full_like(evals, DAMPING)


computation = DirectionalDampedNewtonComputation()
group = {
    "params": [p for p in model.parameters() if p.requires_grad],
    "criterion": select_top_k,
    "damping": constant_damping,
}
param_groups = [group]

# %%
# One backward pass
# -----------------
#
# The computation hands BackPACK its extensions and a hook; the step is computed during the
# backward pass and is then available per group, shaped like the group's parameters.

with backpack(
    *computation.get_extensions(), extension_hook=computation.get_extension_hook(param_groups)
):
    loss.backward()

newton_step = computation.get_result(group)
for param, step in zip(group["params"], newton_step, strict=True):
    print(f"parameter {tuple(param.shape)} -> step {tuple(step.shape)}")

# %%
# Check with plain autograd
# -------------------------
#
# The gradient, the dense GGN (from GGN-vector products by autograd), its eigendecomposition,
# the four leading eigenpairs, and the step from the formula above.

params = group["params"]
gradient = parameters_to_vector(torch.autograd.grad(loss_function(model(X), y), params))
ggn = reference_ggn(model, loss_function, X, y, params)
evals, evecs = torch.linalg.eigh(ggn)
keep = select_top_k(evals)
evals, evecs = evals[keep], evecs[:, keep]

expected = torch.zeros_like(gradient)
for k in range(evals.numel()):
    expected -= (gradient @ evecs[:, k]) / (evals[k] + DAMPING) * evecs[:, k]

# Both are computed in float32, whose roundoff on entries of size 0.1 is about 1e-8 per
# operation: agreement to 1e-6 is agreement.
step_flat = parameters_to_vector(newton_step)
print("largest difference:", (step_flat - expected).abs().max().item())
assert torch.allclose(step_flat, expected, rtol=1e-5, atol=1e-6), "steps differ"
print("The damped Newton step matches autograd.")
