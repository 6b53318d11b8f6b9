r"""``marglik_training``: train a network and its prior precision (and noise) by marglik.

Immer et al. (2021): each epoch takes optimiser steps on the regularised loss

.. math::

    \frac1B \sum_{n \in \text{batch}} \ell_n + \frac{T}{2 N c}\, \theta^\top P_0 \theta

(:math:`c = T` for classification, :math:`T / (2\sigma^2)` for regression), then every
``marglik_frequency`` epochs after ``n_epochs_burnin`` fits a Laplace approximation of all weights
and takes ``n_hypersteps`` Adam steps on the negative log marginal likelihood in the log prior
precision (and log noise); the network of the best marginal likelihood is kept. This is
laplace-torch's ``marglik_training`` by its name and arguments, on curvkit's Laplace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from copy import deepcopy
from math import log
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector
from tqdm.auto import trange

from curvkit.laplace import prior
from curvkit.laplace.baselaplace import ParametricLaplace
from curvkit.laplace.data import dataset_size
from curvkit.laplace.laplace import Laplace

__all__ = ["marglik_training"]


def _hyperparameters(
    likelihood: str, structure: str, init: tuple[float, float, float], model: nn.Module
) -> tuple[Tensor, Tensor | None]:
    prior_prec_init, sigma_noise_init, temperature = init
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref = trainable[0]
    log_prior = prior.prior_precision_structure(
        log(temperature * prior_prec_init),
        structure,
        len(trainable),
        sum(p.numel() for p in trainable),
        ref.device,
        ref.dtype,
    ).requires_grad_(True)
    log_sigma = None
    if likelihood == "regression":
        log_sigma = torch.full((1,), log(sigma_noise_init), device=ref.device, dtype=ref.dtype)
        log_sigma.requires_grad_(True)
    return log_prior, log_sigma


def _train_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    penalty: tuple[Tensor, float, int],
    options: dict[str, Any],
) -> float:
    """One epoch of the regularised loss; returns the summed loss over the data."""
    prior_prec, crit_factor, n_data = penalty
    criterion = options["criterion"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in trainable]
    total = 0.0
    for batch in loader:
        if isinstance(batch, Mapping):
            x, y = batch, batch[options["dict_key_y"]]
        else:
            x, y = batch
            x = x.to(options["device"])
        y = y.to(options["device"])
        optimizer.zero_grad()
        theta = parameters_to_vector(trainable)
        delta = prior.expand_prior_precision(prior_prec, sizes)
        loss = criterion(model(x), y) + 0.5 * (delta * theta) @ theta / n_data / crit_factor
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        if scheduler is not None:
            scheduler.step()
    return total


def _hyper_steps(
    la: ParametricLaplace,
    hypers: tuple[Tensor, Tensor | None],
    optimizer: torch.optim.Optimizer,
    steps: int,
    margliks: list[float],
) -> tuple[Tensor, Tensor | None]:
    """Adam steps on the negative log marginal likelihood.

    Returns the hyperparameters at which the last recorded value was evaluated (those a best
    model is saved with).
    """
    log_prior, log_sigma = hypers
    prior_prec, noise = torch.exp(log_prior), None
    for _ in range(steps):
        optimizer.zero_grad()
        prior_prec = torch.exp(log_prior)
        noise = None if log_sigma is None else torch.exp(log_sigma)
        neg = -la.log_marginal_likelihood(prior_prec, noise)
        neg.backward()
        optimizer.step()
        margliks.append(neg.item())
    return prior_prec.detach(), None if noise is None else noise.detach()


def marglik_training(
    model: nn.Module,
    train_loader: Iterable[Any],
    likelihood: str = "classification",
    hessian_structure: str = "kron",
    backend: Any = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    scheduler_cls: Any = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    n_epochs: int = 300,
    lr_hyp: float = 1e-1,
    prior_structure: str = "layerwise",
    n_epochs_burnin: int = 0,
    n_hypersteps: int = 10,
    marglik_frequency: int = 1,
    prior_prec_init: float = 1.0,
    sigma_noise_init: float = 1.0,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    enable_backprop: bool = False,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
) -> tuple[ParametricLaplace, nn.Module, list[float], list[float]]:
    """Train ``model`` and its hyperparameters by the marginal likelihood (module docstring).

    Args:
        model: The network, trained in place (as in laplace-torch).
        train_loader: The training data (``len(train_loader.dataset)`` is :math:`N`).
        likelihood: ``"classification"`` or ``"regression"``.
        hessian_structure: The Laplace structure of the marginal likelihood (all weights).
        backend: The curvature (``None``: the GGN; see :class:`~curvkit.laplace.Laplace`).
        optimizer_cls: The network's optimiser class.
        optimizer_kwargs: Its options (``weight_decay`` is set to 0: the prior is learnt).
        scheduler_cls: An optional learning-rate scheduler class.
        scheduler_kwargs: Its options.
        n_epochs: Training epochs.
        lr_hyp: Adam's learning rate on the hyperparameters.
        prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diag"``.
        n_epochs_burnin: Epochs before the first hyperparameter update.
        n_hypersteps: Hyperparameter steps per update.
        marglik_frequency: Epochs between updates.
        prior_prec_init: Initial prior precision.
        sigma_noise_init: Initial observation noise (regression).
        temperature: The likelihood's temperature.
        fix_sigma_noise: Keep the noise at ``sigma_noise_init``.
        progress_bar: Show a progress bar over the epochs.
        enable_backprop: Passed to the final Laplace approximation.
        dict_key_x: As :class:`~curvkit.laplace.baselaplace.ParametricLaplace`.
        dict_key_y: As :class:`~curvkit.laplace.baselaplace.ParametricLaplace`.

    Returns:
        ``(laplace, model, margliks, losses)``: the Laplace approximation fitted at the best
        network, the network, the negative log marginal likelihoods, the epochs' mean losses.
    """
    optimizer_kwargs = dict(optimizer_kwargs or {})
    if "weight_decay" in optimizer_kwargs:
        optimizer_kwargs["weight_decay"] = 0.0
    device = next(model.parameters()).device
    log_prior, log_sigma = _hyperparameters(
        likelihood, prior_structure, (prior_prec_init, sigma_noise_init, temperature), model
    )
    criterion = nn.MSELoss() if likelihood == "regression" else nn.CrossEntropyLoss()
    optimizer = optimizer_cls(model.parameters(), **optimizer_kwargs)
    scheduler = (
        None if scheduler_cls is None else scheduler_cls(optimizer, **(scheduler_kwargs or {}))
    )
    hyper = torch.optim.Adam(
        [log_prior] + ([log_sigma] if log_sigma is not None else []), lr=lr_hyp
    )
    n_data = dataset_size(train_loader, 0) or sum(1 for _ in train_loader)
    options = {"criterion": criterion, "dict_key_y": dict_key_y, "device": device}
    learn_sigma = likelihood == "regression" and not fix_sigma_noise
    fixed_noise = sigma_noise_init if likelihood == "regression" else 1.0
    laplace_options = {
        "hessian_structure": hessian_structure,
        "temperature": temperature,
        "backend": backend,
        "dict_key_x": dict_key_x,
        "dict_key_y": dict_key_y,
    }
    best: tuple[float, Any, Any, Any] = (float("inf"), None, None, None)
    margliks: list[float] = []
    losses: list[float] = []
    for epoch in trange(1, n_epochs + 1, disable=not progress_bar, desc="[Training]"):
        sigma = torch.exp(log_sigma).detach() if learn_sigma else sigma_noise_init
        crit_factor = temperature / (2 * sigma**2) if likelihood == "regression" else temperature
        penalty = (torch.exp(log_prior).detach(), crit_factor, n_data)
        epoch_loss = _train_epoch(model, train_loader, optimizer, scheduler, penalty, options)
        losses.append(epoch_loss / n_data)
        if epoch % marglik_frequency != 0 or epoch < n_epochs_burnin:
            continue
        noise = torch.exp(log_sigma).detach() if learn_sigma else fixed_noise
        la = Laplace(
            model,
            likelihood,
            subset_of_weights="all",
            sigma_noise=noise,
            prior_precision=torch.exp(log_prior).detach(),
            **laplace_options,
        )
        la.fit(train_loader)
        hypers = (log_prior, log_sigma if learn_sigma else None)
        prior_prec, noise = _hyper_steps(la, hypers, hyper, n_hypersteps, margliks)
        if margliks[-1] < best[0]:
            noise = fixed_noise if noise is None else noise
            best = (margliks[-1], deepcopy(model.state_dict()), prior_prec, noise)
    prior_prec = torch.exp(log_prior).detach()
    sigma_noise = torch.exp(log_sigma).detach() if learn_sigma else fixed_noise
    if best[1] is not None:
        model.load_state_dict(best[1])
        prior_prec, sigma_noise = best[2], best[3]
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        sigma_noise=sigma_noise,
        prior_precision=prior_prec,
        enable_backprop=enable_backprop,
        **laplace_options,
    )
    la.fit(train_loader)
    return la, model, margliks, losses
