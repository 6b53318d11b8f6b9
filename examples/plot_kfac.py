r"""
KFAC and EKFAC against the exact GGN
====================================

KFAC approximates each layer's block of the generalised Gauss-Newton matrix by a Kronecker
product :math:`B \otimes A` of two small matrices: :math:`A` from the layer's inputs,
:math:`B` from the loss Hessian's square root pushed back to the layer's output. EKFAC keeps
KFAC's eigenvectors :math:`Q_B \otimes Q_A` and re-fits the eigenvalues to the exact curvature
in that basis. Both are cheap to invert, which makes them the curvature of natural-gradient
optimizers, Laplace approximations and influence functions.

This example builds :class:`curvkit.KFACOperator` and :class:`curvkit.EKFACOperator` for a small
network, checks them against the exact GGN (:func:`curvkit.ggn_matrix`), draws the dense blocks
side by side, and takes a damped natural-gradient step with ``op.inverse``.
"""

# %%
# A model and a batch
# -------------------
#
# Float64 throughout, so that the checks hold to near machine precision.

import matplotlib.pyplot as plt
import torch
from torch import nn

import curvkit

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
loss_fn = nn.CrossEntropyLoss()
inputs = torch.randn(64, 6, dtype=torch.float64)
targets = torch.randint(0, 4, (64,))
data = (inputs, targets)
params = list(model.parameters())
print(f"{sum(p.numel() for p in params)} parameters")

# %%
# One sample: KFAC is exact
# -------------------------
#
# For a single sample, the per-sample gradient of a Linear weight is :math:`b\, x^\top`, so its
# GGN block is exactly :math:`(\sum_k b_k b_k^\top) \otimes x x^\top = B \otimes A`: KFAC's
# blocks equal the GGN's diagonal blocks.

one = (inputs[:1], targets[:1])
kfac_one = curvkit.KFACOperator(model, loss_fn, one).to_dense()
ggn_one = curvkit.ggn_matrix(model, loss_fn, one)
start = 0
for p in params:
    stop = start + p.numel()
    torch.testing.assert_close(kfac_one[start:stop, start:stop], ggn_one[start:stop, start:stop])
    start = stop
print("one sample: every KFAC block equals the GGN's block")

# %%
# A batch: EKFAC is the better fit in KFAC's eigenbasis
# ------------------------------------------------------
#
# For many samples, KFAC is an approximation. EKFAC's eigenvalues are the exact diagonal of the
# GGN block in the basis :math:`Q_B \otimes Q_A`; among all matrices diagonal in that basis, it
# is the closest to the block in the Frobenius norm, so it is at least as close as KFAC.

kfac = curvkit.KFACOperator(model, loss_fn, data)
ekfac = curvkit.EKFACOperator(model, loss_fn, data)
ggn = curvkit.ggn_matrix(model, loss_fn, data)
kfac_dense, ekfac_dense = kfac.to_dense(), ekfac.to_dense()
start = 0
for name, p in model.named_parameters():
    stop = start + p.numel()
    block = ggn[start:stop, start:stop]
    kfac_error = (kfac_dense[start:stop, start:stop] - block).norm() / block.norm()
    ekfac_error = (ekfac_dense[start:stop, start:stop] - block).norm() / block.norm()
    print(f"{name:9} relative error KFAC {kfac_error:.3f}, EKFAC {ekfac_error:.3f}")
    assert ekfac_error <= kfac_error + 1e-12
    start = stop
# EKFAC's eigenvalues re-fit the exact diagonal, so its trace is the GGN's (KFAC's is not).
torch.testing.assert_close(ekfac.trace(), ggn.trace())
print(f"trace: GGN {ggn.trace():.4f}, KFAC {kfac.trace():.4f}, EKFAC {ekfac.trace():.4f}")

# %%
# The dense blocks side by side
# -----------------------------
#
# The GGN has blocks coupling the layers; KFAC and EKFAC keep only the diagonal blocks.

fig, axes = plt.subplots(1, 3, figsize=(12, 4))
scale = ggn.abs().max().item()
for ax, (title, matrix) in zip(
    axes, [("exact GGN", ggn), ("KFAC", kfac_dense), ("EKFAC", ekfac_dense)], strict=True
):
    ax.imshow(matrix, cmap="RdBu_r", vmin=-scale, vmax=scale)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
plt.show()

# %%
# A damped natural-gradient step
# ------------------------------
#
# ``op.inverse(damping)`` applies :math:`(F + \delta I)^{-1}` through the factors'
# eigendecompositions: a few small ``eigh`` calls instead of a :math:`D \times D` solve. The step
# :math:`s = -(F + \delta I)^{-1} g` solves :math:`(F + \delta I) s = -g`; with enough damping it
# lowers the loss.

damping = 1e-1
loss = loss_fn(model(inputs), targets)
gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
step = -(kfac.inverse(damping) @ gradient)
torch.testing.assert_close(kfac @ step + damping * step, -gradient)
with torch.no_grad():
    start = 0
    for p in params:
        p.add_(step[start : start + p.numel()].reshape(p.shape))
        start += p.numel()
    new_loss = loss_fn(model(inputs), targets)
print(f"loss {loss.item():.4f} -> {new_loss.item():.4f} after one KFAC step")
assert new_loss < loss
