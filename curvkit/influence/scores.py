r"""Influence scores: :func:`pairwise_scores` and :func:`self_scores`.

.. math::

    \operatorname{score}(q, t) = g_q^\top (C + \delta I)^{-1} g_t,

with :math:`g_x` the gradient of example :math:`x`'s own loss (summed over its outputs and
positions) and :math:`C` the curvature of the training loss averaged over the training examples
(:mod:`curvkit.influence.fit`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.core.data import Data, concatenate, distributed_world
from curvkit.core.groups import normalize_param_groups
from curvkit.engines import Factor
from curvkit.influence.factors import InfluenceFactors, check_damping
from curvkit.influence.fit import CURVATURES, fit_factors
from curvkit.influence.layout import (
    Block,
    block_factor,
    block_gradients,
    block_products,
    plan_blocks,
)
from curvkit.influence.objectives import QueryLoss, gradient_columns, summed_loss
from curvkit.influence.preconditioners import BlockPreconditioner, ExactPreconditioner
from curvkit.influence.streaming import ChunkPlan, example_chunks, gather_examples
from curvkit.losses import LossFunction
from curvkit.quantities.context import Params

__all__ = ["EXACT_CURVATURES", "pairwise_scores", "self_scores"]

#: Curvatures solved exactly through curvkit's operators, without fitted factors.
EXACT_CURVATURES = ("ggn", "ef")

Preconditioner = BlockPreconditioner | ExactPreconditioner
Scores = Tensor | dict[str, Tensor]


class _Setup:
    """The validated settings of a score call and its preconditioner."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFunction, train_data: Data, **kw: Any
    ) -> None:
        curvature = kw["curvature"]
        if curvature not in CURVATURES + EXACT_CURVATURES:
            choices = ", ".join(map(repr, CURVATURES + EXACT_CURVATURES))
            raise ValueError(f"curvature must be one of {choices}, got {curvature!r}")
        damping = check_damping(kw["damping"])
        self.model, self.train_data = model, train_data
        self.loss = summed_loss(loss_fn)
        groups = normalize_param_groups(kw["params"], model, {})
        self.params = [p for group in groups for p in group["params"]]
        self.chunks = ChunkPlan(self.params, kw["max_memory"])
        self.progress = kw["progress"]
        self.query_loss: QueryLoss = kw["query_loss_fn"] or self.loss
        self.per_module = kw["per_module"]
        factors = kw["factors"]
        if curvature in EXACT_CURVATURES:
            if factors is not None:
                raise ValueError(f"curvature={curvature!r} is exact and takes no factors")
            blocks = plan_blocks(model, self.params, None)
            self.preconditioner: Preconditioner = ExactPreconditioner(
                curvature,
                model,
                self.loss,
                train_data,
                self.params,
                blocks,
                damping,
                self.progress,
            )
            return
        if factors is None:
            factors = fit_factors(
                model,
                loss_fn,
                train_data,
                curvature=curvature,
                params=self.params,
                fisher_type=kw["fisher_type"],
                mc_samples=kw["mc_samples"],
                generator=kw["generator"],
                max_memory=kw["max_memory"],
                progress=self.progress,
            )
        self._check_factors(factors, curvature)
        self.preconditioner = BlockPreconditioner(factors, damping)

    def _check_factors(self, factors: InfluenceFactors, curvature: str) -> None:
        if not isinstance(factors, InfluenceFactors):
            raise TypeError(f"factors must be InfluenceFactors (fit_factors), got {factors!r}")
        if factors.curvature != curvature:
            raise ValueError(
                f"the factors were fitted with curvature={factors.curvature!r}; pass "
                f"curvature={factors.curvature!r} with them, or fit {curvature!r} factors"
            )
        covered = sorted(p for c in factors.blocks for p in c.block.positions)
        sizes = sum(c.block.numel for c in factors.blocks)
        if covered != list(range(len(self.params))) or sizes != sum(p.numel() for p in self.params):
            raise ValueError(
                "the factors were fitted for other parameters: pass the params they were "
                "fitted with (same model architecture, same order)"
            )

    @property
    def blocks(self) -> list[Block]:
        return self.preconditioner.blocks

    def combine(self, per_block: list[Tensor]) -> Scores:
        """Sum block scores into the total, or into a dict by module with ``per_module``."""
        if not self.per_module:
            return torch.stack(per_block).sum(0)
        out: dict[str, Tensor] = {}
        for block, value in zip(self.blocks, per_block, strict=True):
            out[block.module] = out[block.module] + value if block.module in out else value
        return out


def _factors(setup: _Setup, factors: list[Factor]) -> list[Factor]:
    """Per block, the factor of the chunk's columns in the preconditioner's basis."""
    return [
        setup.preconditioner.train_factor(i, block_factor(block, factors))
        for i, block in enumerate(setup.blocks)
    ]


def _columns(loss: QueryLoss) -> Callable[[Any], Callable[[Tensor], Tensor]]:
    return lambda targets: gradient_columns(loss, targets)


def _train_scores(setup: _Setup, queries: list[Tensor]) -> list[Tensor]:
    """Per block, ``[Q, n_train]``: the preconditioned queries times every training gradient."""
    parts: list[list[Tensor]] = [[] for _ in setup.blocks]
    chunks = example_chunks(
        setup.model,
        setup.train_data,
        setup.params,
        _columns(setup.loss),
        setup.chunks.train_chunk,
        progress=setup.progress,
        description="influence: training",
    )
    for factors in chunks:
        for part, factor, query in zip(parts, _factors(setup, factors), queries, strict=True):
            part.append(block_products(factor, query)[0].T)
    return [gather_examples(torch.cat(part, dim=1)) for part in parts]


def _quadratic_forms(
    setup: _Setup, data: Data, columns: Callable[[Any], Callable[[Tensor], Tensor]]
) -> list[list[Tensor]]:
    r"""Per block, the chunks' :math:`m_t^\top (C + \delta I)^{-1} g_t` (``[n]`` each).

    ``columns`` pushes back :math:`g_t` and, as a second column if it gives one, :math:`m_t`.
    """
    parts: list[list[Tensor]] = [[] for _ in setup.blocks]
    chunks = example_chunks(
        setup.model,
        data,
        setup.params,
        columns,
        setup.chunks.train_chunk,
        progress=setup.progress,
        description="influence: self-scores",
    )
    for chunk in chunks:
        gradients = [
            block_gradients(b, f) for b, f in zip(setup.blocks, _factors(setup, chunk), strict=True)
        ]
        right = [g[0] for g in gradients]
        left = [g[1] for g in gradients] if gradients[0].shape[0] > 1 else right
        for part, value in zip(parts, setup.preconditioner.quadratic(left, right), strict=True):
            part.append(value)
    return parts


def _concat(scores: list[Scores]) -> Scores:
    if isinstance(scores[0], Tensor):
        return torch.cat(scores)  # type: ignore[arg-type]
    return {key: torch.cat([s[key] for s in scores]) for key in scores[0]}  # type: ignore[index]


_ARGUMENTS = r"""
    Args:
        model: The network; only evaluated (never wrapped, frozen or changed: its parameters,
            buffers, ``.grad``, hooks and modes stay as they are).
        loss_fn: The training loss ``loss_fn(outputs, targets)`` with a ``mean`` or ``sum``
            reduction (the scores are the same: the loss is summed first).
        train_data: The training examples: a batch ``(inputs, targets)``, a list of batches or
            a DataLoader (Hugging Face dict batches too), read in order (no shuffling). Split
            over ``torch.distributed`` ranks, the scores cover all ranks' examples in rank
            order, on every rank (exact self-scores join the ranks' examples on every rank,
            since each solve is a collective).
        curvature: ``"ekfac"``, ``"kfac"``, ``"diagonal"``, ``"identity"`` (the plain dot
            product, ``damping`` ignored), or the exact ``"ggn"`` and ``"ef"`` (empirical
            Fisher), solved through :class:`curvkit.GGNOperator` / :class:`curvkit.EFOperator`'s
            inverses (Woodbury or conjugate gradients), never formed.
        damping: :math:`\delta`; ``None`` is kronfluence's heuristic, a tenth of the mean
            eigenvalue of each block (for ``"ggn"``/``"ef"``: of the whole :math:`C`).
        params: The parameters to attribute through (list or param groups; ``None``: all
            trainable ones). Every one gets a block: a Linear or convolution layer's weight and
            bias one Kronecker block, every other parameter its exact block (at most
            :data:`curvkit.influence.fit.MAX_DENSE_BLOCK` entries) or its diagonal.
        fisher_type: The curvature's columns: ``"mc"`` (``mc_samples`` targets sampled from the
            model per example), ``"empirical"`` (the observed targets; kronfluence's
            ``use_empirical_fisher=True``) or ``"exact"`` (the GGN's square root).
        mc_samples: Monte-Carlo samples per example for ``fisher_type="mc"``.
        generator: Random number generator of the samples (the global one for ``None``).
            ``fisher_type``, ``mc_samples`` and ``generator`` only serve the fit: with
            ``factors=`` the factors' own settings hold.
        query_loss_fn: ``query_loss_fn(outputs, targets)``, the sum over the examples it is
            given of a measurement (a logit margin, a log-probability), whose gradient replaces
            the query's loss gradient (kronfluence's ``compute_measurement``); ``None``: the
            training loss.
        factors: Factors from :func:`curvkit.influence.fit.fit_factors` (or loaded with
            :meth:`~curvkit.influence.factors.InfluenceFactors.load_state_dict`), fitted with this
            ``curvature`` and ``params``; ``None`` fits them on ``train_data``.
        per_module: Return a dict of module name (``""`` for the model's own parameters) to
            that module's part of the scores, which add up to the scores.
        max_memory: Budget in bytes for the gradients held at once (``None``: a fraction of
            the free memory): half for preconditioned query gradients, half for chunks of
            training examples.
        progress: Progress bars over the batches (``None``: automatic).
"""

_CONVENTIONS = r"""
    Conventions (kronfluence 1.0.1's, so that scores are comparable; with the same settings
    the scores agree to about 1e-6 relative in float64):

    - a Linear or convolution layer's weight ``[O, I]`` (``[O, C, *kernel]`` flattened) and
      bias form one block ``[O, I + 1]``, the bias as a last input column (the input extended
      by a constant 1);
    - KFAC's factors :math:`A` (inputs) and :math:`B` (output gradients of the summed loss)
      are both averaged over rows, examples times positions;
    - EKFAC's eigenvalues are averaged over examples, each example's gradient summed over its
      positions first, in the eigenbases of :math:`A` and :math:`B`;
    - ``damping=None``: :math:`\delta = 0.1` times the mean eigenvalue, per block;
    - training gradients use the observed targets; only the curvature uses sampled ones
      (with ``fisher_type="mc"``, EKFAC's second pass reuses the first pass's samples where
      kronfluence draws new ones, so Monte-Carlo scores agree in distribution only).
"""


def _doc(function: Callable[..., Any]) -> Callable[..., Any]:
    function.__doc__ = (function.__doc__ or "").replace("    {arguments}", _ARGUMENTS.strip("\n"))
    function.__doc__ = function.__doc__.replace("    {conventions}", _CONVENTIONS.strip("\n"))
    return function


@_doc
def pairwise_scores(
    model: nn.Module,
    loss_fn: LossFunction,
    train_data: Data,
    query_data: Data,
    *,
    curvature: str = "ekfac",
    damping: float | None = None,
    params: Params = None,
    fisher_type: str = "mc",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    query_loss_fn: QueryLoss | None = None,
    factors: InfluenceFactors | None = None,
    per_module: bool = False,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> Scores:
    r"""Influence of every training example on every query: ``[n_query, n_train]``.

    .. math::

        S_{q,t} = g_q^\top (C + \delta I)^{-1} g_t,

    :math:`g_x` the gradient of example :math:`x`'s own loss (its ``query_loss_fn`` for a
    query), :math:`C` the curvature of the training loss averaged over the training examples.
    The query gradients are preconditioned once (in chunks under ``max_memory``, one pass over
    the training data per chunk) and multiplied by the training gradients chunk by chunk,
    through a layer's inputs and output gradients where that is cheaper than forming them.

    {conventions}

    {arguments}
        query_data: The query examples, as ``train_data`` (the same on every rank).

    Returns:
        The scores ``[n_query, n_train]`` (a dict of them by module with ``per_module``).

    Raises:
        ValueError, TypeError: For an unknown setting, factors of another curvature or other
            parameters, or a budget that cannot hold one example's gradients (before any
            large allocation, with what the stage needs).
    """
    setup = _Setup(
        model,
        loss_fn,
        train_data,
        curvature=curvature,
        damping=damping,
        params=params,
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        generator=generator,
        query_loss_fn=query_loss_fn,
        factors=factors,
        per_module=per_module,
        max_memory=max_memory,
        progress=progress,
    )
    rows: list[Scores] = []
    held: list[list[Tensor]] = [[] for _ in setup.blocks]
    count = 0
    chunks = example_chunks(
        model,
        query_data,
        setup.params,
        _columns(setup.query_loss),
        setup.chunks.query_chunk,
        progress=progress,
        description="influence: queries",
    )
    for chunk in chunks:
        gradients = [
            block_gradients(b, f)[0]
            for b, f in zip(setup.blocks, _factors(setup, chunk), strict=True)
        ]
        for part, g in zip(held, setup.preconditioner.queries(gradients), strict=True):
            part.append(g)
        count += gradients[0].shape[0]
        if count >= setup.chunks.query_chunk:
            rows.append(setup.combine(_train_scores(setup, [torch.cat(p) for p in held])))
            held, count = [[] for _ in setup.blocks], 0
    if count:
        rows.append(setup.combine(_train_scores(setup, [torch.cat(p) for p in held])))
    return _concat(rows)


@_doc
def self_scores(
    model: nn.Module,
    loss_fn: LossFunction,
    train_data: Data,
    *,
    curvature: str = "ekfac",
    damping: float | None = None,
    params: Params = None,
    fisher_type: str = "mc",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    query_loss_fn: QueryLoss | None = None,
    factors: InfluenceFactors | None = None,
    per_module: bool = False,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> Scores:
    r"""Self-influence of every training example: ``[n_train]``.

    .. math::

        s_t = m_t^\top (C + \delta I)^{-1} g_t,

    with :math:`m_t = g_t` (or the gradient of ``query_loss_fn`` on example :math:`t`, as
    kronfluence's ``use_measurement_for_self_influence=True``). Training examples are
    streamed in chunks under ``max_memory``; for Kronecker blocks the quadratic form is taken
    in the eigenbasis (two rotations per example instead of four).

    {conventions}

    {arguments}

    Returns:
        The self-influence scores ``[n_train]`` (a dict of them by module with
        ``per_module``).

    Raises:
        ValueError, TypeError: As :func:`pairwise_scores`.
    """
    setup = _Setup(
        model,
        loss_fn,
        train_data,
        curvature=curvature,
        damping=damping,
        params=params,
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        generator=generator,
        query_loss_fn=query_loss_fn,
        factors=factors,
        per_module=per_module,
        max_memory=max_memory,
        progress=progress,
    )
    measured = query_loss_fn is not None

    def columns(targets: Any) -> Callable[[Tensor], Tensor]:
        loss = gradient_columns(setup.loss, targets)
        if not measured:
            return loss
        measurement = gradient_columns(setup.query_loss, targets)
        return lambda outputs: torch.cat([loss(outputs), measurement(outputs)])

    # An exact solve is a collective over the ranks' data: every rank solves for all examples
    # (the ranks' batches joined), so that the solves run in step.
    joined = curvature in EXACT_CURVATURES and distributed_world() > 1
    parts = _quadratic_forms(setup, concatenate(train_data) if joined else train_data, columns)
    gather = (lambda scores: scores) if joined else gather_examples
    return setup.combine([gather(torch.cat(part)) for part in parts])
