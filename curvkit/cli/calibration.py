r"""The calibration step of ``curvkit demo``: a post-hoc Laplace approximation of a trained MLP.

:func:`laplace_calibration` fits a Kronecker-factored Laplace approximation over all weights
(:mod:`curvkit.laplace`, prior precision by marginal likelihood) and compares the GLM predictive
(probit) with the MAP's softmax: negative log-likelihood, expected calibration error and
accuracy, on the test set and on the test set shifted by one pixel (a shift the network never
saw in training). Two of its numbers are checked against plain autograd: the KFAC block of the
last layer's bias, which is exact (:math:`\sum_n \Lambda_n`, the summed Hessians of the
cross-entropy in the logits), and the probit predictive of a few test points, from an explicit
Jacobian and the dense posterior covariance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from curvkit.laplace import Laplace
from curvkit.testing import verify

#: Confidence bins of the expected calibration error and the reliability diagram.
NUM_BINS = 10
#: Test points whose GLM predictive is checked against an explicit Jacobian.
NUM_CHECKED_POINTS = 8
#: The Laplace approximation of the demo (laplace-torch's names).
SUBSET_OF_WEIGHTS = "all"
HESSIAN_STRUCTURE = "kron"


@dataclass
class Reliability:
    """Per confidence bin (``NUM_BINS`` equal bins of the largest class probability)."""

    confidence: list[float]
    accuracy: list[float]
    share: list[float]


def reliability(probs: Tensor, targets: Tensor) -> Reliability:
    """Mean confidence, accuracy and share of the points in each confidence bin.

    Args:
        probs: Class probabilities ``[N, C]``.
        targets: Class labels ``[N]``.

    Returns:
        The bins; an empty bin has confidence and accuracy 0 and share 0.
    """
    confidence, predicted = probs.detach().double().max(dim=1)
    correct = (predicted == targets).double()
    bins = (confidence * NUM_BINS).ceil().long().clamp(1, NUM_BINS) - 1
    counts = torch.bincount(bins, minlength=NUM_BINS)
    per_bin = counts.clamp(min=1)
    return Reliability(
        confidence=(torch.bincount(bins, confidence, minlength=NUM_BINS) / per_bin).tolist(),
        accuracy=(torch.bincount(bins, correct, minlength=NUM_BINS) / per_bin).tolist(),
        share=(counts.double() / len(targets)).tolist(),
    )


def calibration_metrics(probs: Tensor, targets: Tensor) -> dict[str, float]:
    r"""Negative log-likelihood, expected calibration error and accuracy of a classifier.

    The expected calibration error is
    :math:`\sum_b \frac{|B_b|}{N} \, |\operatorname{acc}(B_b) - \operatorname{conf}(B_b)|`
    over the confidence bins :math:`B_b` of :func:`reliability`.

    Args:
        probs: Class probabilities ``[N, C]``.
        targets: Class labels ``[N]``.

    Returns:
        ``{"nll": ..., "ece": ..., "accuracy": ...}``.
    """
    probs = probs.detach().double()
    bins = reliability(probs, targets)
    gaps = [abs(a - c) for a, c in zip(bins.accuracy, bins.confidence, strict=True)]
    return {
        "nll": -probs[torch.arange(len(targets)), targets].log().mean().item(),
        "ece": sum(s * g for s, g in zip(bins.share, gaps, strict=True)),
        "accuracy": (probs.argmax(dim=1) == targets).double().mean().item(),
    }


def shift_one_pixel(images: Tensor) -> Tensor:
    """Move flattened 8x8 images one pixel to the right (the last column wraps around)."""
    return images.reshape(-1, 8, 8).roll(1, dims=2).reshape(images.shape)


def laplace_calibration(
    model: nn.Module,
    train_inputs: Tensor,
    train_targets: Tensor,
    test_sets: dict[str, tuple[Tensor, Tensor]],
    batch_size: int,
) -> dict[str, Any]:
    """Fit the demo's Laplace approximation and compare it with the MAP on the test sets.

    Args:
        model: The trained classifier (not changed).
        train_inputs: The training inputs the curvature is summed over.
        train_targets: Their labels.
        test_sets: Name -> ``(inputs, targets)``.
        batch_size: Batch size of the training loader.

    Returns:
        ``laplace``: the structure and the fitted prior precision; ``metrics``: per test set,
        per predictive (``"MAP"``, ``"Laplace"``), :func:`calibration_metrics`;
        ``reliability``: the same keys, :class:`Reliability` as a dict; ``la``: the fitted
        Laplace object.
    """
    la = Laplace(
        model,
        "classification",
        subset_of_weights=SUBSET_OF_WEIGHTS,
        hessian_structure=HESSIAN_STRUCTURE,
    )
    la.fit(DataLoader(TensorDataset(train_inputs, train_targets), batch_size=batch_size))
    la.optimize_prior_precision(method="marglik")
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    bins: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, (inputs, targets) in test_sets.items():
        with torch.no_grad():
            predictives = {
                "MAP": model(inputs).softmax(dim=1),
                "Laplace": la(inputs, pred_type="glm", link_approx="probit"),
            }
        metrics[name] = {k: calibration_metrics(p, targets) for k, p in predictives.items()}
        bins[name] = {k: vars(reliability(p, targets)) for k, p in predictives.items()}
    laplace = {
        "subset_of_weights": SUBSET_OF_WEIGHTS,
        "hessian_structure": HESSIAN_STRUCTURE,
        "prior_precision": la.prior_precision.item(),
    }
    return {"laplace": laplace, "metrics": metrics, "reliability": bins, "la": la}


def laplace_references(
    la: Any, model: nn.Module, train: tuple[Tensor, Tensor], test_inputs: Tensor
) -> list[tuple[str, Tensor, Tensor]]:
    """The fitted Laplace's checkable numbers beside their autograd references.

    Args:
        la: The Laplace approximation of :func:`laplace_calibration` (all weights, ``kron``).
        model: Its model; the last module is the output ``Linear`` layer.
        train: The training inputs and labels it was fitted on.
        test_inputs: Inputs whose predictive is checked (the first
            :data:`NUM_CHECKED_POINTS`).

    Returns:
        ``(quantity, curvkit's, reference)`` triples.
    """
    params = dict(model.named_parameters())
    precision = la.posterior_precision.to_matrix()
    num_classes = list(params.values())[-1].numel()
    bias_block = precision[-num_classes:, -num_classes:]
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    bias_ggn = verify.reference_ggn(model, loss_fn, *train, params=[list(params.values())[-1]])
    identity = torch.eye(num_classes, dtype=bias_ggn.dtype, device=bias_ggn.device)
    expected_block = bias_ggn + la.prior_precision * identity

    inputs = test_inputs[:NUM_CHECKED_POINTS]
    detached = {name: p.detach() for name, p in params.items()}

    def logits(chosen: dict[str, Tensor], sample: Tensor) -> Tensor:
        return functional_call(model, chosen, (sample[None],))[0]

    per_param = vmap(jacrev(logits), in_dims=(None, 0))(detached, inputs)
    jacobian = torch.cat([per_param[name].flatten(start_dim=2) for name in params], dim=2)
    variance = jacobian @ torch.linalg.solve(precision, jacobian.transpose(1, 2))
    with torch.no_grad():
        mean = model(inputs)
    scale = torch.sqrt(1 + math.pi / 8 * variance.diagonal(dim1=1, dim2=2))
    predictive = la(inputs, pred_type="glm", link_approx="probit")
    return [
        ("Laplace: KFAC block of the last bias", bias_block, expected_block),
        ("Laplace: GLM predictive (probit)", predictive, (mean / scale).softmax(dim=1)),
    ]
