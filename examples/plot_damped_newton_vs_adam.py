r"""
Directionally damped Newton against Adam on a digit classifier
==============================================================

:class:`curvkit.optim.DampedNewton` moves the parameters along the leading eigenvectors
:math:`e_k` of the generalised Gauss-Newton (GGN) matrix of each mini-batch, with a Newton step
damped per direction,

.. math::

    \theta \leftarrow \theta - \eta \sum_k \frac{g^\top e_k}{\lambda_k + \delta}\, e_k ,

where :math:`g` is the gradient, :math:`\lambda_k` the eigenvalue and :math:`\delta` the damping
(ViViT's method). The eigenpairs come from the small Gram matrix of the GGN's square-root factor,
never from the GGN itself. We first check one step against plain ``torch.autograd``, then train a
small network on scikit-learn's 8x8 digits with it and with Adam.
"""

# %%
# Data and model
# --------------

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.utils import parameters_to_vector

import curvkit
from curvkit.optim import DampedNewton

digits = load_digits()
inputs = torch.tensor(digits.data, dtype=torch.float32) / 16
targets = torch.tensor(digits.target)
loss_fn = nn.CrossEntropyLoss()


def make_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


# %%
# One step, checked with autograd
# -------------------------------
#
# In float64 on 16 samples. Plain autograd gives the Jacobian :math:`J` of the 160 outputs with
# respect to the parameters and the Hessian :math:`H` of the loss with respect to the outputs, so
# the GGN is :math:`J^\top H J`; its ten leading eigenpairs and the formula above must give the
# optimizer's update.

model = make_model().double()
x, y = inputs[:16].double(), targets[:16]
params = list(model.parameters())
damping, lr = 0.5, 0.8

outputs = model(x)
rows = [torch.autograd.grad(o, params, retain_graph=True) for o in outputs.flatten()]
jacobian = torch.stack([parameters_to_vector(row) for row in rows])
hessian = torch.autograd.functional.hessian(lambda f: loss_fn(f, y), outputs.detach())
hessian = hessian.reshape(outputs.numel(), outputs.numel())
gradient = parameters_to_vector(torch.autograd.grad(loss_fn(outputs, y), params))
evals, evecs = torch.linalg.eigh(jacobian.T @ hessian @ jacobian)
evals, evecs = evals[-10:], evecs[:, -10:]
expected = -lr * evecs @ ((evecs.T @ gradient) / (evals + damping))

before = parameters_to_vector(params).detach().clone()
optimizer = DampedNewton(model, loss_fn, lr=lr, damping=damping, criterion=curvkit.top_k(10))
optimizer.step((x, y))
update = parameters_to_vector(params).detach() - before
print("largest difference to autograd:", (update - expected).abs().max().item())
assert torch.allclose(update, expected, rtol=1e-8, atol=1e-12)

# %%
# Training
# --------
#
# Both optimizers see the same shuffled mini-batches of 64 images, for two epochs.
# DampedNewton uses every direction of each batch's GGN whose eigenvalue is resolved (the default
# criterion, :func:`curvkit.default_criterion`) and a damping of 0.3; Adam a learning rate of
# 0.01 (both tuned a little for this problem). Keeping only a few leading directions
# (:func:`curvkit.top_k`) is cheaper per step but leaves the gradient outside them unused.

BATCH_SIZE, EPOCHS = 64, 2


def accuracy(model):
    with torch.no_grad():
        return (model(inputs).argmax(dim=1) == targets).float().mean().item()


def train(make_optimizer, take_step):
    model = make_model()
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(0)
    history = {"loss": [], "accuracy": []}
    for _ in range(EPOCHS):
        for index in torch.randperm(len(targets), generator=generator).split(BATCH_SIZE):
            history["loss"].append(take_step(model, optimizer, inputs[index], targets[index]))
            history["accuracy"].append(accuracy(model))
    return history


def newton_step(model, optimizer, x, y):
    return optimizer.step((x, y)).item()


def adam_step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


histories = {
    "DampedNewton (damping 0.3)": train(
        lambda m: DampedNewton(m, loss_fn, damping=0.3), newton_step
    ),
    "Adam (lr 0.01)": train(lambda m: torch.optim.Adam(m.parameters(), lr=0.01), adam_step),
}
for name, history in histories.items():
    print(f"{name}: final batch loss {history['loss'][-1]:.3f}, "
          f"training accuracy {history['accuracy'][-1]:.3f}")  # fmt: skip

# %%
# Training loss and accuracy per step
# -----------------------------------

fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
for name, history in histories.items():
    ax_loss.plot(history["loss"], label=name)
    ax_acc.plot(history["accuracy"], label=name)
ax_loss.set_xlabel("step (mini-batch of 64)")
ax_loss.set_ylabel("mini-batch cross-entropy loss")
ax_loss.set_yscale("log")
ax_acc.set_xlabel("step (mini-batch of 64)")
ax_acc.set_ylabel("accuracy on the whole training set")
ax_loss.legend()
fig.tight_layout()
plt.show()
