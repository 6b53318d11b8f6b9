"""ClippedAdam with a second, frequency-domain view of time-series parameters (Pyro's DCTAdam)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from curvkit.core.validation import check_int
from curvkit.optim.base import fill_optimizer_docs
from curvkit.optim.clipped_adam import ClippedAdam, adam_direction


def next_fast_len(size: int) -> int:
    """The smallest ``n >= size`` whose only prime factors are 2, 3 and 5.

    Args:
        size: A positive length.

    Returns:
        The length.

    Raises:
        TypeError: If ``size`` is not an integer.
        ValueError: If it is below 1.
    """
    candidate = check_int(size, "size", minimum=1)
    while True:
        rest = candidate
        for factor in (2, 3, 5):
            while rest % factor == 0:
                rest //= factor
        if rest == 1:
            return candidate
        candidate += 1


def dct_matrix(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""The orthonormal DCT-II matrix :math:`C`, with :math:`C^{-1} = C^\top`.

    .. math::
        C_{kn} = s_k \cos\frac{\pi (2n+1) k}{2 M}, \qquad
        s_0 = \sqrt{1/M},\ s_{k>0} = \sqrt{2/M}.

    Args:
        size: :math:`M`.
        dtype: The result's dtype.
        device: The result's device.

    Returns:
        The ``size x size`` matrix.
    """
    k = torch.arange(size, dtype=torch.float64, device=device)
    matrix = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * size))
    matrix *= math.sqrt(2.0 / size)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(dtype)


def _along(x: Tensor, dim: int, matrix: Tensor) -> Tensor:
    return torch.movedim(torch.movedim(x, dim, -1) @ matrix, -1, dim)


def to_time_and_frequency(x: Tensor, dim: int) -> Tensor:
    """``x`` followed, along ``dim``, by the DCT of ``x`` zero-padded to a fast length.

    Args:
        x: A tensor with a time dimension ``dim``.
        dim: The time dimension.

    Returns:
        A tensor ``T + next_fast_len(T)`` long along ``dim`` (``T = x.shape[dim]``).
    """
    duration = x.shape[dim]
    size = next_fast_len(duration)
    matrix = dct_matrix(size, x.dtype, x.device)
    # Zero padding contributes nothing, so only the first T columns of C are needed.
    frequency = _along(x, dim, matrix[:, :duration].T)
    return torch.cat([x, frequency], dim=dim)


def from_time_and_frequency(x: Tensor, dim: int, duration: int) -> Tensor:
    """Invert :func:`to_time_and_frequency` as a sum: the time part plus the inverse DCT's.

    Args:
        x: A tensor ``duration + next_fast_len(duration)`` long along ``dim``.
        dim: The time dimension.
        duration: The length ``T`` of the time part.

    Returns:
        A tensor ``T`` long along ``dim``.
    """
    size = next_fast_len(duration)
    matrix = dct_matrix(size, x.dtype, x.device)
    time, frequency = torch.split(x, [duration, size], dim=dim)
    return time + _along(frequency, dim, matrix[:, :duration])


def subsample_mask(param: Tensor, subsample: Mapping[int, Tensor]) -> Tensor:
    """The entries of ``param`` whose index along every subsampled dimension is in the subsample.

    Args:
        param: The parameter.
        subsample: A dict dimension -> indices along it.

    Returns:
        A boolean tensor shaped like ``param``.
    """
    mask = torch.ones(param.shape, dtype=torch.bool, device=param.device)
    for dim, indices in subsample.items():
        member = torch.zeros(param.shape[dim], dtype=torch.bool, device=param.device)
        member[indices] = True
        shape = [1] * param.dim()
        shape[dim] = -1
        mask &= member.reshape(shape)
    return mask


@fill_optimizer_docs
class DCTAdam(ClippedAdam):
    r"""ClippedAdam that also adapts to a parameter's frequency content along a time dimension.

    Pyro's ``DCTAdam``. A parameter with an attribute ``_pyro_dct_dim`` (a time dimension of
    length :math:`T`) is optimised in a redundant basis: Adam's moments (of
    :class:`~curvkit.optim.ClippedAdam`, without weight decay) are kept for the clipped
    gradient followed by its orthonormal DCT-II (:func:`to_time_and_frequency`), and the step
    is mapped back by the transpose (:func:`from_time_and_frequency`). Other parameters take
    ClippedAdam's step.

    With ``subsample_aware=True``, a parameter with an attribute ``_pyro_subsample`` (a dict
    dimension -> indices, as Pyro's subsampling plates set it) updates only the entries in the
    subsample, each with its own step count.

    Args:
        params: {params}
        lr: {lr}
        betas: Decay rates of the moving averages of the gradient and of its square.
        eps: Added to the denominator for numerical stability.
        clip_norm: {clip_norm}
        lrd: Factor :math:`\ge 0` multiplying the learning rate at every step.
        subsample_aware: Update only the subsampled entries of parameters that say which.
        corrected_eps: Add ``eps`` after Adam's bias correction (as :class:`torch.optim.Adam`);
            False adds it before (as Pyro); see :class:`~curvkit.optim.ClippedAdam`.

    Raises:
        ValueError: If ``lr``, ``betas``, ``eps``, ``clip_norm`` or ``lrd`` is out of its range.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip_norm: float = 10.0,
        lrd: float = 1.0,
        subsample_aware: bool = False,
        *,
        corrected_eps: bool = True,
    ) -> None:
        super().__init__(params, lr, betas, eps, 0.0, clip_norm, lrd, corrected_eps=corrected_eps)
        self.defaults["subsample_aware"] = subsample_aware
        for group in self.param_groups:
            group.setdefault("subsample_aware", subsample_aware)

    def _update(self, param: Tensor, group: dict[str, Any]) -> None:
        subsample = getattr(param, "_pyro_subsample", None)
        time_dim = getattr(param, "_pyro_dct_dim", None)
        if subsample and group["subsample_aware"]:
            self._subsampled_update(param, group, subsample)
        elif time_dim is None:
            super()._update(param, group)
        else:
            grad = param.grad.clamp(-group["clip_norm"], group["clip_norm"])
            state = self.state[param]
            state.setdefault("step", 0)
            direction = adam_direction(state, to_time_and_frequency(grad, time_dim), group)
            param.sub_(from_time_and_frequency(direction, time_dim, param.shape[time_dim]))

    def _subsampled_update(
        self, param: Tensor, group: dict[str, Any], subsample: Mapping[int, Tensor]
    ) -> None:
        if getattr(param, "_pyro_dct_dim", None) is not None:
            raise ValueError(
                "DCTAdam cannot update a subsample of a parameter with a time dimension "
                "(_pyro_dct_dim); use subsample_aware=False for it."
            )
        mask = subsample_mask(param, subsample)
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros_like(param)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        selected = {key: entry[mask] for key, entry in state.items()}
        grad = param.grad[mask].clamp(-group["clip_norm"], group["clip_norm"])
        direction = adam_direction(selected, grad, group)
        for key, entry in selected.items():
            state[key][mask] = entry
        param[mask] -= direction
