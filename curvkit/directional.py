r"""GGN eigenpairs, per-sample directional derivatives and directionally damped Newton steps.

Every function here takes ``(model, loss_fn, data, param_groups)`` and returns one entry per
parameter group, in group order. Each group is one diagonal block of the GGN: a single group is
the full GGN, one group per layer its block-diagonal approximation. The work for all groups is one
forward pass and one batched backward pass of curvkit's engine
(:func:`curvkit.engines.compute_factors`), which pushes back the :math:`C'` columns of the loss
Hessian's square root (exact ones reduced to their numerical rank by :func:`drop_null_columns`:
:math:`C - 1` for cross-entropy) and the loss gradient together (:math:`K = C' + 1`), so that one
Gram matrix per parameter yields the GGN's Gram matrix :math:`V^\top V` and the products
:math:`\nabla L_n^\top V` at once. The mathematics and its conventions (those of ViViT) are in
:mod:`curvkit.gram_eigen`; in short, with :math:`L = \sum_n L_n` the batch loss split into the
samples' contributions and :math:`e_k` the selected GGN eigenvectors:

- ``ggn_eigh``: eigenvalues :math:`\lambda_k` and eigenvectors :math:`e_k`;
- ``directional_derivatives``: :math:`\gamma_{n,k} = N \nabla L_n^\top e_k` and
  :math:`\lambda_{n,k} = N e_k^\top G(L_n) e_k`, whose means over :math:`n` are
  :math:`\nabla L^\top e_k` and :math:`\lambda_k` for ``mean`` and ``sum`` reductions alike (for
  ``mean``, :math:`N L_n` is sample :math:`n`'s own loss; for ``sum``, :math:`\gamma_{n,k}` is
  :math:`N` times sample :math:`n`'s directional derivative);
- ``damped_newton_step``:
  :math:`s = -\sum_k \operatorname{mean}_n \gamma_{n,k} /
  (\operatorname{mean}_n \lambda_{n,k} + \delta_k)\, e_k`, the Newton step on :math:`L` in the
  selected eigenspace, damped by :math:`\delta_k` along direction :math:`k`.

Group options (besides ``"params"``):

- ``"criterion"``: ``criterion(evals) -> list[int]``, called with all Gram eigenvalues in ascending
  order, returning the indices of the directions to use (kept in the order returned). ``None``
  (default) keeps every eigenvalue above :math:`\sqrt{\varepsilon} \max_k |\lambda_k|`
  (:math:`\varepsilon`: the machine epsilon of the dtype, so :math:`1.5 \cdot 10^{-8}` relative
  in float64 and :math:`3.5 \cdot 10^{-4}` in float32), below which eigenvectors obtained through
  the Gram matrix lose accuracy, without splitting a cluster of numerically equal eigenvalues
  (:func:`default_criterion`). :func:`top_k` keeps the ``k`` largest and, being recognisable,
  computes only those (block Krylov) instead of the full eigendecomposition.
- ``"damping"``: a non-negative float :math:`\delta` (default 1.0) or
  ``damping(evals, evecs, gammas, lambdas) -> Tensor [K]``, called with the selected eigenvalues,
  the Gram eigenvectors ``[C' S, K]`` and the directional derivatives (ViViT's signature).
  Ignored by ``ggn_eigh`` and ``directional_derivatives``, so one list of groups serves all three.

Sub-sampling (ViViT's): ``subsampling_ggn`` picks the :math:`S` samples whose curvature forms the
GGN, rescaled by :math:`N/S` to estimate the batch's; ``subsampling_grad`` the samples whose
gradients give :math:`\gamma`; indices are into the batch, unique, and the rows of
:math:`\gamma`/:math:`\lambda` follow their order. Sub-sampling picks blocks of the batch's Gram
matrix: it changes the estimate (as in ViViT), not the cost. ``mc_samples > 0`` replaces the
exact loss Hessian square root by that many Monte-Carlo columns
(:func:`curvkit.losses.hessian_sqrt`).

``data`` is one batch ``(inputs, targets)`` or an iterable of batches. An iterable is concatenated
into one batch, which is exact (the loss of all the data, as for the other curvkit quantities) but
makes the Gram matrix grow with the total number of samples: meant for small datasets. Results are
computed on the calling process alone (no sum over ``torch.distributed`` ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvkit import data as data_utils
from curvkit import losses
from curvkit.engines import compute_factors
from curvkit.engines.factor import Factor
from curvkit.gram_eigen import (
    GramDirections,
    TopK,
    damped_newton_coefficients,
    directional_curvatures,
    directional_gradients,
    gram_directions,
    resolve_damping,
)
from curvkit.groups import normalize_param_groups

__all__ = [
    "damped_newton_step",
    "default_criterion",
    "directional_derivatives",
    "ggn_eigh",
    "top_k",
]

LossFunction = Callable[[Tensor, Any], Tensor]

#: The options a group may set, with their defaults.
GROUP_DEFAULTS: dict[str, Any] = {"criterion": None, "damping": 1.0}


def top_k(k: int) -> TopK:
    """Criterion keeping the ``k`` largest eigenvalues (all of them if there are fewer).

    Args:
        k: Number of leading eigenvalues, at least 1.

    Returns:
        A callable ``criterion(evals) -> list[int]`` that curvkit recognises, so that it computes
        only the ``k`` leading eigenpairs instead of all of them.
    """
    return TopK(k)


def default_criterion(evals: Tensor) -> list[int]:
    r"""Keep the eigenvalues above :math:`\sqrt{\varepsilon} \max_k |\lambda_k|` (whole clusters).

    The cut never splits a cluster of numerically equal eigenvalues (closer than the
    eigensolver's backward error :math:`4 \sqrt{n}\, \varepsilon \max_k |\lambda_k|`): a cluster
    that straddles the threshold is dropped whole, so that the result does not depend on an
    arbitrary basis of a degenerate eigenspace and every kept eigenvalue is above the threshold.

    Args:
        evals: Eigenvalues in ascending order.

    Returns:
        The indices of the kept eigenvalues, ascending.
    """
    size = evals.numel()
    if size == 0:
        return []
    eps = torch.finfo(evals.dtype).eps
    max_abs = evals.abs().max()
    above = torch.nonzero(evals > math.sqrt(eps) * max_abs).flatten()
    if above.numel() == 0:
        return []
    first = int(above[0])
    tolerance = 4 * math.sqrt(size) * eps * max_abs
    while first > 0 and first < size and bool(evals[first] - evals[first - 1] <= tolerance):
        first += 1
    return list(range(first, size))


def ggn_eigh(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    param_groups: Any = None,
    *,
    mc_samples: int = 0,
    subsampling_grad: Sequence[int] | None = None,
    subsampling_ggn: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, list[Tensor]]]:
    r"""Selected eigenpairs of each group's GGN block.

    Args:
        model: The network; ``model(inputs)`` gives the outputs. Use ``model.eval()`` if it has
            batch normalisation.
        loss_fn: ``loss_fn(outputs, targets)``, the scalar batch loss (``mean`` or ``sum``).
        data: One batch ``(inputs, targets)`` or an iterable of batches (concatenated).
        param_groups: ``None`` (all parameters, one group), parameters, or group dicts with the
            options ``"criterion"`` and ``"damping"`` (see the module docstring).
        mc_samples: ``0`` for the exact GGN, else the number of Monte-Carlo samples.
        subsampling_grad: Unused here; accepted for a signature shared with the other functions.
        subsampling_ggn: Indices of the samples forming the GGN; ``None`` for all.
        generator: Random number generator for the Monte-Carlo samples.

    Returns:
        Per group ``(evals, evecs)``: the selected eigenvalues ``[K]`` (ascending for the
        built-in criteria) and unit eigenvectors, one tensor ``[K, *p.shape]`` per parameter of
        the group. Numerically zero eigenvalues get zero vectors, with a warning.

    Raises:
        ValueError: For invalid groups, sub-sampling indices or criterion results.
        TypeError: For data that is not a batch or an iterable of batches.
    """
    problem = _Problem.build(model, loss_fn, data, param_groups, subsampling_grad, subsampling_ggn)
    _, factors = problem.factors(mc_samples, generator, False)
    return [
        _eigenpairs(problem, group, group_factors)
        for group, group_factors in zip(problem.groups, factors, strict=True)
    ]


def directional_derivatives(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    param_groups: Any = None,
    *,
    mc_samples: int = 0,
    subsampling_grad: Sequence[int] | None = None,
    subsampling_ggn: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, Tensor]]:
    r"""Per-sample first- and second-order derivatives along each group's GGN eigenvectors.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)``, the scalar batch loss (``mean`` or ``sum``).
        data: One batch ``(inputs, targets)`` or an iterable of batches (concatenated).
        param_groups: ``None`` (all parameters, one group), parameters, or group dicts.
        mc_samples: ``0`` for the exact GGN, else the number of Monte-Carlo samples.
        subsampling_grad: Indices of the samples whose gradients give ``gammas``; ``None`` for all.
        subsampling_ggn: Indices of the samples forming the GGN and ``lambdas``; ``None`` for all.
        generator: Random number generator for the Monte-Carlo samples.

    Returns:
        Per group ``(gammas, lambdas)``: :math:`\gamma_{n,k} = N \nabla L_n^\top e_k`, shape
        ``[N_grad, K]``, and :math:`\lambda_{n,k} = N e_k^\top G(L_n) e_k`, shape ``[N_ggn, K]``
        (their means over samples are :math:`\nabla L^\top e_k` and :math:`\lambda_k`).

    Raises:
        ValueError: For invalid groups, sub-sampling indices or criterion results.
        TypeError: For data that is not a batch or an iterable of batches.
    """
    problem = _Problem.build(model, loss_fn, data, param_groups, subsampling_grad, subsampling_ggn)
    _, factors = problem.factors(mc_samples, generator, True)
    return [
        _derivatives(problem, group, group_factors)[1:]
        for group, group_factors in zip(problem.groups, factors, strict=True)
    ]


def damped_newton_step(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    param_groups: Any = None,
    *,
    mc_samples: int = 0,
    subsampling_grad: Sequence[int] | None = None,
    subsampling_ggn: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[list[Tensor]]:
    r"""Directionally damped Newton step of each group, in the group's parameter shapes.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)``, the scalar batch loss (``mean`` or ``sum``).
        data: One batch ``(inputs, targets)`` or an iterable of batches (concatenated).
        param_groups: ``None`` (all parameters, one group), parameters, or group dicts with the
            options ``"criterion"`` and ``"damping"``.
        mc_samples: ``0`` for the exact GGN, else the number of Monte-Carlo samples.
        subsampling_grad: Indices of the samples estimating the gradient; ``None`` for all.
        subsampling_ggn: Indices of the samples estimating the GGN; ``None`` for all.
        generator: Random number generator for the Monte-Carlo samples.

    Returns:
        Per group, the step :math:`s` (to be added to the parameters), one tensor per parameter.

    Raises:
        ValueError: For invalid groups, sub-sampling indices, criterion results or dampings.
        TypeError: For data that is not a batch or an iterable of batches.
    """
    return damped_newton_step_and_loss(
        model,
        loss_fn,
        data,
        param_groups,
        mc_samples=mc_samples,
        subsampling_grad=subsampling_grad,
        subsampling_ggn=subsampling_ggn,
        generator=generator,
    )[1]


def damped_newton_step_and_loss(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    param_groups: Any = None,
    *,
    mc_samples: int = 0,
    subsampling_grad: Sequence[int] | None = None,
    subsampling_ggn: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[list[Tensor]]]:
    """As :func:`damped_newton_step`, also returning the batch loss (detached) at the start point.

    Returns:
        ``(loss, steps)``.
    """
    problem = _Problem.build(model, loss_fn, data, param_groups, subsampling_grad, subsampling_ggn)
    loss, factors = problem.factors(mc_samples, generator, True)
    steps = [
        _step(problem, group, group_factors)
        for group, group_factors in zip(problem.groups, factors, strict=True)
    ]
    return loss, steps


@torch.no_grad()
def _eigenpairs(
    problem: _Problem, group: dict[str, Any], factors: Sequence[Factor]
) -> tuple[Tensor, list[Tensor]]:
    directions = problem.directions_from_gram(group, _group_gram(factors))
    coefficients = problem.embed(directions.evec_coefficients(), False)
    evecs = [factor.mat(coefficients) for factor in factors]
    norms = sum(e.flatten(start_dim=1).square().sum(1) for e in evecs).sqrt()
    inv_norms = torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0)
    return directions.evals, [e * inv_norms.reshape(-1, *[1] * (e.dim() - 1)) for e in evecs]


@torch.no_grad()
def _derivatives(
    problem: _Problem, group: dict[str, Any], factors: Sequence[Factor]
) -> tuple[GramDirections, Tensor, Tensor]:
    gram = _group_gram(factors)
    directions = problem.directions_from_gram(group, gram)
    gammas = directional_gradients(directions, problem.grad_gram(gram))
    return directions, gammas, directional_curvatures(directions)


@torch.no_grad()
def _step(problem: _Problem, group: dict[str, Any], factors: Sequence[Factor]) -> list[Tensor]:
    directions, gammas, lambdas = _derivatives(problem, group, factors)
    damping = resolve_damping(group["damping"], directions, gammas, lambdas)
    coefficients = damped_newton_coefficients(directions, gammas, lambdas, damping)
    coefficients = problem.embed(coefficients, True)
    return [factor.mat(coefficients)[0] for factor in factors]


def _group_gram(factors: Sequence[Factor]) -> Tensor:
    gram = factors[0].gram()
    for factor in factors[1:]:
        gram = gram + factor.gram()
    return gram


@dataclass
class _Problem:
    """One call's model, loss, batch, groups and sub-sampling, validated."""

    model: nn.Module
    loss_fn: LossFunction
    inputs: Tensor | tuple[Tensor, ...]
    targets: Tensor
    groups: list[dict[str, Any]]
    batch_size: int
    subsampling_grad: Tensor | None
    subsampling_ggn: Tensor | None
    num_sqrt_columns: int = 0

    @classmethod
    def build(
        cls,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Any,
        param_groups: Any,
        subsampling_grad: Sequence[int] | None,
        subsampling_ggn: Sequence[int] | None,
    ) -> _Problem:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        groups = normalize_param_groups(param_groups, model, GROUP_DEFAULTS)
        for index, group in enumerate(groups):
            criterion = group["criterion"]
            if criterion is not None and not callable(criterion):
                raise TypeError(
                    f"'criterion' of group {index} must be None or a function evals -> indices, "
                    f"got {type(criterion).__name__}"
                )
        inputs, targets = _single_batch(data)
        batch_size = targets.shape[0]
        return cls(
            model=model,
            loss_fn=loss_fn,
            inputs=inputs,
            targets=targets,
            groups=groups,
            batch_size=batch_size,
            subsampling_grad=_check_subsampling(subsampling_grad, batch_size, "subsampling_grad"),
            subsampling_ggn=_check_subsampling(subsampling_ggn, batch_size, "subsampling_ggn"),
        )

    def factors(
        self, mc_samples: int, generator: torch.Generator | None, gradient: bool
    ) -> tuple[Tensor, list[list[Factor]]]:
        """Run the engine once for all groups; return the detached loss and per-group factors."""
        loss_holder: list[Tensor] = []

        def backprop_columns(outputs: Tensor) -> Tensor:
            sqrt = losses.hessian_sqrt(
                self.loss_fn, outputs, self.targets, mc_samples=mc_samples, generator=generator
            )
            if mc_samples == 0:
                sqrt = drop_null_columns(sqrt)
            self.num_sqrt_columns = sqrt.shape[0]
            with torch.enable_grad():
                leaf = outputs.detach().requires_grad_(True)
                loss = self.loss_fn(leaf, self.targets)
                loss_holder.append(loss.detach())
                if not gradient:
                    return sqrt
                (output_grad,) = torch.autograd.grad(loss, leaf)
            return torch.cat([sqrt, output_grad.unsqueeze(0)])

        params = [p for group in self.groups for p in group["params"]]
        _, factors = compute_factors(self.model, self.inputs, params, backprop_columns)
        per_group, start = [], 0
        for group in self.groups:
            stop = start + len(group["params"])
            per_group.append(factors[start:stop])
            start = stop
        return loss_holder[0], per_group

    def directions_from_gram(self, group: dict[str, Any], gram: Tensor) -> GramDirections:
        """Directions from the group's Gram matrix ``[K, N, K, N]`` (square root, gradient)."""
        sqrt_cols = slice(0, self.num_sqrt_columns)
        gram_vv = gram[sqrt_cols][:, :, sqrt_cols]
        if self.subsampling_ggn is not None:
            samples = self.subsampling_ggn.to(gram.device)
            gram_vv = gram_vv.index_select(1, samples).index_select(3, samples)
        criterion = default_criterion if group["criterion"] is None else group["criterion"]
        return gram_directions(gram_vv, self.batch_size, criterion)

    def grad_gram(self, gram: Tensor) -> Tensor:
        """The products of per-sample gradients and square-root columns, ``[N_grad, C', N_ggn]``."""
        cross = gram[self.num_sqrt_columns, :, : self.num_sqrt_columns]
        if self.subsampling_grad is not None:
            cross = cross.index_select(0, self.subsampling_grad.to(cross.device))
        if self.subsampling_ggn is not None:
            cross = cross.index_select(2, self.subsampling_ggn.to(cross.device))
        return cross

    def embed(self, coefficients: Tensor, gradient: bool) -> Tensor:
        """Place Gram-space coefficients ``[C', N_ggn, J]`` into the factor's ``[K, N, J]``."""
        if self.subsampling_ggn is None and not gradient:
            return coefficients
        num_columns = self.num_sqrt_columns + int(gradient)
        full = coefficients.new_zeros(num_columns, self.batch_size, coefficients.shape[-1])
        samples = (
            slice(None)
            if self.subsampling_ggn is None
            else self.subsampling_ggn.to(coefficients.device)
        )
        full[: self.num_sqrt_columns, samples] = coefficients
        return full


def drop_null_columns(sqrt: Tensor) -> Tensor:
    r"""Rotate each sample's square-root columns to drop the directions they do not span.

    For sample :math:`n` with columns :math:`A_n \in \mathbb{R}^{K \times C}` (rows
    :math:`s_{k,n}`) and the eigendecomposition :math:`A_n A_n^\top = U \Lambda U^\top`, the
    rows of :math:`U_r^\top A_n` (the :math:`r` leading eigenvectors) give the same Hessian
    :math:`A_n^\top A_n` with :math:`r` columns, where :math:`r` is the largest numerical rank
    over the samples (eigenvalues above :math:`K \varepsilon \max \Lambda`): dropped directions
    change the Hessian at the level of roundoff only. Cross-entropy's exact square root has
    :math:`C` columns but rank :math:`C - 1` (the softmax Hessian annihilates the all-ones
    direction), so this saves one column per class set: a smaller Gram matrix, a cheaper
    backward pass.

    Args:
        sqrt: ``[K, N, *out]``, as :func:`curvkit.losses.hessian_sqrt` returns.

    Returns:
        ``[r, N, *out]`` with ``r <= K``; ``sqrt`` itself if no column can be dropped.
    """
    num_columns, num_samples = sqrt.shape[:2]
    rows = sqrt.reshape(num_columns, num_samples, -1).transpose(0, 1)
    evals, evecs = torch.linalg.eigh(rows @ rows.transpose(1, 2))
    tolerance = num_columns * torch.finfo(sqrt.dtype).eps * evals.max()
    rank = int((evals > tolerance).sum(dim=1).max())
    if rank == num_columns:
        return sqrt
    reduced = evecs[:, :, num_columns - rank :].transpose(1, 2) @ rows
    return reduced.transpose(0, 1).reshape(rank, *sqrt.shape[1:])


def _single_batch(data: Any) -> tuple[Tensor | tuple[Tensor, ...], Tensor]:
    if data_utils.is_batch(data):
        return data_utils.check_batch(data, None)
    batches = list(data_utils.batches(data))
    inputs = [b[0] for b in batches]
    targets = torch.cat([b[1] for b in batches])
    if isinstance(inputs[0], Tensor):
        return torch.cat(inputs), targets
    return tuple(torch.cat(parts) for parts in zip(*inputs, strict=True)), targets


def _check_subsampling(indices: Iterable[int] | None, batch_size: int, name: str) -> Tensor | None:
    if indices is None:
        return None
    if isinstance(indices, Tensor):
        indices = indices.tolist()
    try:
        indices = list(indices)
    except TypeError:
        raise TypeError(
            f"{name} must be None or a list of sample indices, got {type(indices).__name__}"
        ) from None
    if not indices:
        raise ValueError(f"{name} is empty: pass None to use all samples, or some indices")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"{name} must hold integer sample indices, got {index!r}")
        if not 0 <= index < batch_size:
            raise ValueError(
                f"{name} holds the index {index}, outside the batch of {batch_size} samples"
            )
    if len(set(indices)) != len(indices):
        raise ValueError(f"{name} holds repeated indices {indices}: list each sample once")
    return torch.tensor(indices, dtype=torch.long)
