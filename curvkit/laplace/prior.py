"""Checking and expanding laplace-torch's prior precision, prior mean and observation noise.

A prior precision is a scalar, one value per parameter tensor ("per layer") or one per parameter
entry; :func:`expand_prior_precision` turns any of them into the diagonal ``[P]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

__all__ = [
    "PRIOR_STRUCTURES",
    "as_prior_mean",
    "as_prior_precision",
    "as_sigma_noise",
    "expand_prior_precision",
    "prior_precision_structure",
]

#: laplace-torch's prior structures for the marginal-likelihood optimisation.
PRIOR_STRUCTURES = ("scalar", "layerwise", "diag")


def _is_real_scalar(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def as_prior_precision(
    value: float | Tensor, n_layers: int, n_params: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """A prior precision as a 1-D tensor of length 1, ``n_layers`` or ``n_params``.

    Raises:
        ValueError: For any other length, more dimensions, or another type.
    """
    if _is_real_scalar(value):
        return torch.as_tensor([value], device=device, dtype=dtype)
    if not isinstance(value, Tensor):
        raise ValueError(
            "Prior precision either scalar or torch.Tensor up to 1-dim, got "
            f"{type(value).__name__}."
        )
    if value.ndim == 0:
        return value.reshape(-1).to(device=device, dtype=dtype)
    if value.ndim > 1:
        raise ValueError("Prior precision needs to be at most one-dimensional tensor.")
    if len(value) not in (1, n_layers, n_params):
        raise ValueError(
            f"Length of prior precision ({len(value)}) does not align with architecture: use 1 "
            f"(scalar), {n_layers} (per parameter tensor) or {n_params} (per parameter)."
        )
    return value.to(device=device, dtype=dtype)


def expand_prior_precision(precision: Tensor, sizes: Sequence[int]) -> Tensor:
    """The diagonal ``[sum(sizes)]`` of a scalar, per-tensor or per-entry prior precision."""
    total = sum(sizes)
    if len(precision) == 1:
        return precision * torch.ones(total, device=precision.device, dtype=precision.dtype)
    if len(precision) == total:
        return precision
    if len(precision) == len(sizes):
        counts = torch.as_tensor(list(sizes), device=precision.device)
        return torch.repeat_interleave(precision, counts)
    raise ValueError("Mismatch of prior and model. Diagonal, scalar, or per-layer prior.")


def prior_precision_structure(
    init: float,
    structure: str,
    n_layers: int,
    n_params: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """``init`` in the shape of ``structure``: ``"scalar"``, ``"layerwise"`` or ``"diag"``."""
    sizes = {"scalar": 1, "layerwise": n_layers, "diag": n_params}
    if structure not in sizes:
        raise ValueError(f"Invalid prior structure {structure!r}: use one of {PRIOR_STRUCTURES}")
    return torch.full((sizes[structure],), float(init), device=device, dtype=dtype)


def as_prior_mean(
    value: float | Tensor, n_params: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """A prior mean: a scalar tensor, or 1-D of length 1 or ``n_params``."""
    if _is_real_scalar(value):
        return torch.as_tensor(value, device=device, dtype=dtype)
    if not isinstance(value, Tensor):
        raise ValueError("Invalid argument type of prior mean.")
    if value.ndim == 0:
        return value.reshape(-1).to(device=device, dtype=dtype)
    if value.ndim > 1:
        raise ValueError("Prior mean has too many dimensions!")
    if len(value) not in (1, n_params):
        raise ValueError(f"Invalid length of prior mean: use 1 or {n_params}, got {len(value)}.")
    return value.to(device=device, dtype=dtype)


def as_sigma_noise(value: float | Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The observation noise as a scalar tensor (homoscedastic only)."""
    if _is_real_scalar(value):
        return torch.as_tensor(value, device=device, dtype=dtype)
    if not isinstance(value, Tensor):
        raise ValueError("Invalid type: sigma noise needs to be torch.Tensor or scalar.")
    if value.ndim == 0:
        return value.to(device=device, dtype=dtype)
    if value.ndim == 1:
        if len(value) > 1:
            raise ValueError("Only homoscedastic output noise supported.")
        return value[0].to(device=device, dtype=dtype)
    raise ValueError("Sigma noise needs to be scalar or 1-dimensional.")
