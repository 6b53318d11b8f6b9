"""Choosing the prior precision: marginal likelihood (Adam on its log) or a grid on validation data.

Both follow laplace-torch's ``optimize_prior_precision``. The grid search's default losses are the
average negative log likelihood of the labels (classification) and the mean squared error summed
over the outputs (regression), computed here without torchmetrics; a user's ``loss`` may be a
callable ``loss(predictions, targets)`` (or ``loss(means, variances, targets)``) evaluated on the
whole validation set, or an object with ``update``/``compute`` (a torchmetrics metric).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["gridsearch", "optimize_marglik", "validation_loss"]


def optimize_marglik(
    laplace: Any, init: Tensor, n_steps: int, lr: float, progress_bar: bool
) -> Tensor:
    """Maximise the log marginal likelihood over the log prior precision with Adam.

    Args:
        laplace: A fitted Laplace approximation.
        init: The initial prior precision (its shape is kept).
        n_steps: Adam steps.
        lr: Adam's learning rate.
        progress_bar: Show a progress bar.

    Returns:
        The optimised prior precision, detached.
    """
    log_prior = init.detach().log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([log_prior], lr=lr)
    steps = tqdm(range(n_steps), disable=not progress_bar, desc="[Optimizing marginal likelihood]")
    for _ in steps:
        optimizer.zero_grad()
        (-laplace.log_marginal_likelihood(prior_precision=log_prior.exp())).backward()
        optimizer.step()
    return log_prior.detach().exp()


def _targets(laplace: Any, batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, Mapping):
        return batch, batch[laplace.dict_key_y].to(laplace._device)
    x, y = batch
    return x, y.to(laplace._device)


class _DefaultLoss:
    """Running NLL (classification) or MSE summed over outputs (regression)."""

    def __init__(self, regression: bool) -> None:
        self.regression = regression
        self.total = 0.0
        self.count = 0

    def update(self, prediction: Tensor, targets: Tensor) -> None:
        if self.regression:
            residual = prediction - targets.reshape(prediction.shape)
            self.total += float(residual.square().sum())
            self.count += prediction.shape[0]
        else:
            probs = prediction.reshape(-1, prediction.shape[-1])
            self.total -= float(probs.log().gather(1, targets.reshape(-1, 1)).sum())
            self.count += probs.shape[0]

    def compute(self) -> float:
        return self.total / self.count


@torch.no_grad()
def validation_loss(
    laplace: Any, loader: Iterable[Any], loss: Any, predict: Callable[[Any], Any]
) -> float:
    """The loss of ``laplace``'s predictions on ``loader`` (laplace-torch's ``validate``)."""
    online = hasattr(loss, "update") and hasattr(loss, "compute")
    if online and hasattr(loss, "reset"):
        loss.reset()
    outputs, targets = [], []
    for batch in loader:
        x, y = _targets(laplace, batch)
        out = predict(x)
        if online:
            try:
                loss.update(*(out if isinstance(out, tuple) else (out,)), y)
            except TypeError:
                loss.update(out[0], y)
        else:
            outputs.append(out)
            targets.append(y)
    if online:
        return float(torch.as_tensor(loss.compute()).sum())
    y = torch.cat(targets)
    if isinstance(outputs[0], tuple):
        return float(loss(*(torch.cat(part) for part in zip(*outputs, strict=True)), y))
    return float(loss(torch.cat(outputs), y))


def gridsearch(
    laplace: Any,
    grid: Tensor,
    loader: Iterable[Any],
    loss: Any,
    predict: Callable[[Any], Any],
    progress_bar: bool,
) -> Tensor:
    """The prior precision of ``grid`` with the lowest validation loss.

    A prior precision whose posterior is not positive definite counts as an infinite loss.
    """
    if loss is None:
        loss = _DefaultLoss(regression=laplace._predictive_likelihood(fitting=True) == "regression")
    results = []
    for value in tqdm(grid, disable=not progress_bar, desc="[Grid search]"):
        laplace.prior_precision = value
        try:
            results.append(validation_loss(laplace, loader, loss, predict))
        except torch.linalg.LinAlgError:
            results.append(float("inf"))
        if isinstance(loss, _DefaultLoss):
            loss.total, loss.count = 0.0, 0
    return grid[int(torch.as_tensor(results).argmin())]
