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
:mod:`curvkit.quantities.gram_eigen`; in short, with :math:`L = \sum_n L_n` the batch loss split
into the samples' contributions and :math:`e_k` the selected GGN eigenvectors:

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

``data`` is one batch ``(inputs, targets)`` or an iterable of batches, and with a
:mod:`torch.distributed` process group initialised, the batches of every rank: all of them are
joined into one batch (:func:`curvkit.core.data.concatenate`), whose loss is the dataset's, exactly
as for the other curvkit quantities. The Gram matrix then grows with the total number of
samples, and every rank computes the whole result: meant for datasets of a few thousand samples.

``params`` is the same argument as for every curvkit quantity (:mod:`curvkit.quantities.context`);
the results here always come one entry per group, since each group is its own eigenproblem. The
former keyword ``param_groups=`` still works, with a :class:`DeprecationWarning`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.core.data import Data
from curvkit.core.model_io import sample_layout
from curvkit.engines import Factor
from curvkit.losses import LossFunction
from curvkit.ops.linalg import lapack_dtype
from curvkit.quantities.context import Params, Problem, fill_argument_docs
from curvkit.quantities.factor_products import normalized_products
from curvkit.quantities.gram_eigen import (
    GramDirections,
    TopK,
    damped_newton_step_coefficients,
    directional_curvatures,
    directional_gradients,
    gram_directions,
)

__all__ = [
    "damped_newton_step",
    "default_criterion",
    "directional_derivatives",
    "ggn_eigh",
    "top_k",
]

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


@fill_argument_docs
def ggn_eigh(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    params: Params = None,
    *,
    mc_samples: int = 0,
    subsampling_grad: Sequence[int] | None = None,
    subsampling_ggn: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    param_groups: Params = None,
    max_memory: int | None = None,
) -> list[tuple[Tensor, list[Tensor]]]:
    r"""Selected eigenpairs of each group's GGN block.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {directional_params}
        mc_samples: {mc_samples}
        subsampling_grad: Unused here; accepted for a signature shared with the other functions.
        subsampling_ggn: {subsampling_ggn}
        generator: {generator}
        param_groups: {param_groups}
        max_memory: {max_memory}

    Returns:
        Per group ``(evals, evecs)``: the selected eigenvalues ``[K]`` (ascending for the
        built-in criteria) and unit eigenvectors, one tensor ``[K, *p.shape]`` per parameter of
        the group. Numerically zero eigenvalues get zero vectors, with a warning.

    Raises:
        ValueError: For invalid groups, sub-sampling indices or criterion results.
        TypeError: For data that is not a batch or an iterable of batches.
    """
    problem = _GramProblem(
        _directional_problem(
            model,
            loss_fn,
            data,
            params,
            mc_samples=mc_samples,
            generator=generator,
            param_groups=param_groups,
            max_memory=max_memory,
        ),
        subsampling_grad,
        subsampling_ggn,
        gradient=False,
    )
    return [problem.eigenpairs(group, factors) for group, factors in problem.groups()]


@fill_argument_docs
def directional_derivatives(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    params: Params = None,
    *,
    mc_samples: int = 0,
    subsampling_grad: Sequence[int] | None = None,
    subsampling_ggn: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    param_groups: Params = None,
    max_memory: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    r"""Per-sample first- and second-order derivatives along each group's GGN eigenvectors.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {directional_params}
        mc_samples: {mc_samples}
        subsampling_grad: {subsampling_grad}
        subsampling_ggn: {subsampling_ggn}
        generator: {generator}
        param_groups: {param_groups}
        max_memory: {max_memory}

    Returns:
        Per group ``(gammas, lambdas)``: :math:`\gamma_{n,k} = N \nabla L_n^\top e_k`, shape
        ``[N_grad, K]``, and :math:`\lambda_{n,k} = N e_k^\top G(L_n) e_k`, shape ``[N_ggn, K]``
        (their means over samples are :math:`\nabla L^\top e_k` and :math:`\lambda_k`).

    Raises:
        ValueError: For invalid groups, sub-sampling indices or criterion results.
        TypeError: For data that is not a batch or an iterable of batches.
    """
    problem = _GramProblem(
        _directional_problem(
            model,
            loss_fn,
            data,
            params,
            mc_samples=mc_samples,
            generator=generator,
            param_groups=param_groups,
            max_memory=max_memory,
        ),
        subsampling_grad,
        subsampling_ggn,
        gradient=True,
    )
    return [problem.derivatives(group, factors) for group, factors in problem.groups()]


@fill_argument_docs
def damped_newton_step(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Data,
    params: Params = None,
    *,
    mc_samples: int = 0,
    subsampling_grad: Sequence[int] | None = None,
    subsampling_ggn: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    param_groups: Params = None,
    max_memory: int | None = None,
) -> list[list[Tensor]]:
    r"""Directionally damped Newton step of each group, in the group's parameter shapes.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {directional_params}
        mc_samples: {mc_samples}
        subsampling_grad: {subsampling_grad}
        subsampling_ggn: {subsampling_ggn}
        generator: {generator}
        param_groups: {param_groups}
        max_memory: {max_memory}

    Returns:
        Per group, the step :math:`s` (to be added to the parameters), one tensor per parameter.

    Raises:
        ValueError: For invalid groups, sub-sampling indices, criterion results or dampings.
        TypeError: For data that is not a batch or an iterable of batches.
    """
    problem = _directional_problem(
        model,
        loss_fn,
        data,
        params,
        mc_samples=mc_samples,
        generator=generator,
        param_groups=param_groups,
        max_memory=max_memory,
    )
    return _damped_newton(problem, subsampling_grad, subsampling_ggn)[1]


def damped_newton_step_and_loss(
    model: nn.Module,
    loss_fn: LossFunction,
    batch: Data,
    params: Params,
    mc_samples: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, list[list[Tensor]]]:
    """As :func:`damped_newton_step`, also returning the batch loss (detached) at the start point.

    For optimizers (:class:`curvkit.optim.DampedNewton`): the loss comes from the same forward
    pass as the steps.

    Returns:
        ``(loss, steps)``.
    """
    return _damped_newton(
        _directional_problem(
            model,
            loss_fn,
            batch,
            params,
            mc_samples=mc_samples,
            generator=generator,
        ),
        None,
        None,
    )


def _directional_problem(
    model: nn.Module, loss_fn: LossFunction, data: Data, params: Params, **settings: Any
) -> Problem:
    """The call context of the directional quantities: their group options and defaults."""
    return Problem(model, loss_fn, data, params, options=GROUP_DEFAULTS, **settings)


def _damped_newton(
    problem: Problem,
    subsampling_grad: Sequence[int] | None,
    subsampling_ggn: Sequence[int] | None,
) -> tuple[Tensor, list[list[Tensor]]]:
    gram_problem = _GramProblem(problem, subsampling_grad, subsampling_ggn, gradient=True)
    steps = [gram_problem.step(group, factors) for group, factors in gram_problem.groups()]
    return gram_problem.loss, steps


class _GramProblem:
    r"""A validated call with its sub-sampling, and the engine's factors of the joined batch.

    The engine runs once for all groups, pushing back the square root's columns (reduced to
    their numerical rank when exact) and, with ``gradient``, the loss gradient as one more
    column, so that one Gram matrix per group holds :math:`V^\top V` and
    :math:`\nabla L_n^\top V`.
    """

    def __init__(
        self,
        problem: Problem,
        subsampling_grad: Sequence[int] | None,
        subsampling_ggn: Sequence[int] | None,
        *,
        gradient: bool,
    ) -> None:
        for index, group in enumerate(problem.groups):
            criterion = group["criterion"]
            if criterion is not None and not callable(criterion):
                raise TypeError(
                    f"'criterion' of group {index} must be None or a function evals -> indices, "
                    f"got {type(criterion).__name__}"
                )
        inputs, targets = problem.concatenated_batch()
        self.problem = problem
        self.gradient = gradient
        self.num_sqrt_columns = 0
        self.batch_size = 0
        self.loss = torch.zeros(())
        self.warned_rank = False

        def columns(outputs: Tensor) -> Tensor:
            self.batch_size = sample_layout(inputs, outputs)[0]
            sqrt = problem.columns(outputs, targets, self.batch_size)
            if problem.mc_samples == 0:
                # Per sample, not per output row: a sequence's rows share its columns.
                per_sample = sqrt.reshape(sqrt.shape[0], self.batch_size, -1)
                sqrt = drop_null_columns(per_sample).reshape(-1, *outputs.shape)
            self.num_sqrt_columns = sqrt.shape[0]
            with torch.enable_grad():
                leaf = outputs.detach().requires_grad_(True)
                loss = problem.loss_fn(leaf, targets)
                self.loss = loss.detach()
                if not gradient:
                    return sqrt
                (output_grad,) = torch.autograd.grad(loss, leaf)
            return torch.cat([sqrt, output_grad.unsqueeze(0)])

        _, factors = problem.factors(inputs, targets, columns)
        self._factors = problem.by_group(factors)
        self.subsampling_grad = _check_subsampling(
            subsampling_grad, self.batch_size, "subsampling_grad"
        )
        self.subsampling_ggn = _check_subsampling(
            subsampling_ggn, self.batch_size, "subsampling_ggn"
        )

    def groups(self) -> list[tuple[dict[str, Any], list[Factor]]]:
        """Each group with its parameters' factors."""
        return list(zip(self.problem.groups, self._factors, strict=True))

    @torch.no_grad()
    def eigenpairs(
        self, group: dict[str, Any], factors: Sequence[Factor]
    ) -> tuple[Tensor, list[Tensor]]:
        """The group's selected eigenvalues and unit eigenvectors in parameter shapes."""
        directions = self.directions_from_gram(group, _group_gram(factors))
        coefficients = self.embed(directions.evec_coefficients())
        return directions.evals, normalized_products(factors, coefficients)

    @torch.no_grad()
    def derivatives(
        self, group: dict[str, Any], factors: Sequence[Factor]
    ) -> tuple[Tensor, Tensor]:
        """The group's directional gradients and directional curvatures."""
        gram = _group_gram(factors)
        directions = self.directions_from_gram(group, gram)
        return directional_gradients(directions, self.grad_gram(gram)), directional_curvatures(
            directions
        )

    @torch.no_grad()
    def step(self, group: dict[str, Any], factors: Sequence[Factor]) -> list[Tensor]:
        """The group's damped Newton step in parameter shapes."""
        gram = _group_gram(factors)
        directions = self.directions_from_gram(group, gram)
        coefficients = damped_newton_step_coefficients(
            directions, self.grad_gram(gram), group["damping"]
        )
        coefficients = self.embed(coefficients)
        return [factor.mat(coefficients)[0] for factor in factors]

    def directions_from_gram(self, group: dict[str, Any], gram: Tensor) -> GramDirections:
        """Directions from the group's Gram matrix ``[K, N, K, N]`` (square root, gradient)."""
        sqrt_cols = slice(0, self.num_sqrt_columns)
        gram_vv = gram[sqrt_cols][:, :, sqrt_cols]
        if self.subsampling_ggn is not None:
            samples = self.subsampling_ggn.to(gram.device)
            gram_vv = gram_vv.index_select(1, samples).index_select(3, samples)
        criterion = default_criterion if group["criterion"] is None else group["criterion"]
        if isinstance(criterion, TopK):
            self.warn_rank(criterion.k, gram_vv.shape[0], gram_vv.shape[1])
        return gram_directions(gram_vv, self.batch_size, criterion)

    def warn_rank(self, k: int, num_columns: int, num_samples: int) -> None:
        r"""Warn (once per call) when ``top_k(k)`` asks for more directions than the GGN's rank.

        The GGN estimate is :math:`V V^\top` with :math:`C'` columns per sample, so its rank is
        at most :math:`C' S` for :math:`S` samples: the criterion can keep no more.
        """
        rank = num_columns * num_samples
        if k <= rank or self.warned_rank:
            return
        self.warned_rank = True
        if self.problem.mc_samples > 0:
            source = f"{num_samples} samples x {self.problem.mc_samples} Monte-Carlo columns"
            remedy = (
                f"raise mc_samples (each one adds {num_samples} to the rank), use the exact GGN "
                f"(mc_samples=0), or pass more data"
            )
        else:
            source = f"{num_samples} samples x {num_columns} columns of the exact loss Hessian"
            remedy = "pass more data"
        if self.subsampling_ggn is not None:
            remedy += ", or keep more of the samples in subsampling_ggn"
        warnings.warn(
            f"top_k({k}) asks for {k} directions, but the GGN from {source} has rank at most "
            f"{rank}, so at most {rank} directions come back. To get more, {remedy}.",
            UserWarning,
            stacklevel=5,
        )

    def grad_gram(self, gram: Tensor) -> Tensor:
        """The products of per-sample gradients and square-root columns, ``[N_grad, C', N_ggn]``."""
        cross = gram[self.num_sqrt_columns, :, : self.num_sqrt_columns]
        if self.subsampling_grad is not None:
            cross = cross.index_select(0, self.subsampling_grad.to(cross.device))
        if self.subsampling_ggn is not None:
            cross = cross.index_select(2, self.subsampling_ggn.to(cross.device))
        return cross

    def embed(self, coefficients: Tensor) -> Tensor:
        """Place Gram-space coefficients ``[C', N_ggn, J]`` into the factor's ``[K, N, J]``."""
        if self.subsampling_ggn is None and not self.gradient:
            return coefficients
        num_columns = self.num_sqrt_columns + int(self.gradient)
        full = coefficients.new_zeros(num_columns, self.batch_size, coefficients.shape[-1])
        samples = (
            slice(None)
            if self.subsampling_ggn is None
            else self.subsampling_ggn.to(coefficients.device)
        )
        full[: self.num_sqrt_columns, samples] = coefficients
        return full


def _group_gram(factors: Sequence[Factor]) -> Tensor:
    gram = factors[0].gram()
    for factor in factors[1:]:
        gram = gram + factor.gram()
    return gram


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

    Raises:
        ValueError: If every column is zero (``r = 0``): the GGN has no directions.
    """
    num_columns, num_samples = sqrt.shape[:2]
    rows = sqrt.reshape(num_columns, num_samples, -1).transpose(0, 1)
    evals, evecs = torch.linalg.eigh((rows @ rows.transpose(1, 2)).to(lapack_dtype(sqrt.dtype)))
    tolerance = num_columns * torch.finfo(sqrt.dtype).eps * evals.max()
    rank = int((evals > tolerance).sum(dim=1).max())
    if rank == 0:
        raise ValueError(
            "the loss's Hessian with respect to the outputs is zero for every sample (every "
            "target equals ignore_index? a loss linear in the outputs?), so the GGN is zero and "
            "has no directions; pass data with targets that count"
        )
    if rank == num_columns:
        return sqrt
    reduced = evecs[:, :, num_columns - rank :].transpose(1, 2).to(sqrt.dtype) @ rows
    return reduced.transpose(0, 1).reshape(rank, *sqrt.shape[1:])


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
