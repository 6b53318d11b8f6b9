r"""Fitting the curvature blocks of influence functions, with kronfluence's conventions.

With :math:`N` training examples, the columns :math:`v_{k,n}` of the summed training loss's
curvature (:func:`curvkit.influence.objectives.summed_loss`): the sampled gradients for
``fisher_type="mc"`` (each scaled by :math:`1/\sqrt{M}` for :math:`M` samples), the observed
gradient for ``"empirical"`` or the loss Hessian's square root for ``"exact"``, the curvature is

.. math::

    C = \frac1N \sum_{n,k} v_{k,n} v_{k,n}^\top,

the curvature of the training loss averaged over training examples. Per block:

- KFAC: :math:`A = \frac{1}{R} \sum_{n,t} x_{n,t} x_{n,t}^\top` and
  :math:`B = \frac{1}{R} \sum_{k,n,t} b_{k,n,t} b_{k,n,t}^\top`, both averaged over the
  :math:`R` rows (examples times positions) the layer saw, :math:`x` extended by a 1 for a
  bias; the eigenvalues are :math:`\lambda_B \otimes \lambda_A`.
- EKFAC: the eigenvectors of KFAC's :math:`A` and :math:`B`, eigenvalues
  :math:`\lambda = \frac1N \sum_{k,n} (Q_B^\top g_{k,n} Q_A)^{\odot 2}` with each example's
  gradient :math:`g_{k,n} = \sum_t b_{k,n,t} x_{n,t}^\top` summed over its positions (a
  second pass over the data, with the same Monte-Carlo draws).
- Diagonal: :math:`\lambda = \frac1N \sum_{k,n} v_{k,n}^{\odot 2}`.
- A parameter without Kronecker factors gets its exact block :math:`C_p` (``"dense"``) when it
  has at most :data:`MAX_DENSE_BLOCK` entries, else its diagonal, under KFAC and EKFAC alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from curvkit.core.data import Data, Inputs
from curvkit.core.model_io import sample_layout
from curvkit.engines import Factor
from curvkit.engines.memory import MemoryPlanError
from curvkit.influence.factors import BlockCurvature, InfluenceFactors
from curvkit.influence.layout import Block, block_factor, plan_blocks
from curvkit.influence.objectives import gradient_columns, summed_loss
from curvkit.losses import LossFunction
from curvkit.quantities.context import Params, Problem

__all__ = ["CURVATURES", "FISHER_TYPES", "MAX_DENSE_BLOCK", "fit_factors"]

#: The fitted curvatures (the exact ``"ggn"`` and ``"ef"`` need no factors).
CURVATURES = ("ekfac", "kfac", "diagonal", "identity")
FISHER_TYPES = ("mc", "empirical", "exact")

#: Largest parameter (in entries) without Kronecker factors that gets its exact block.
MAX_DENSE_BLOCK = 4096


def _check_settings(curvature: str, fisher_type: str, mc_samples: int) -> None:
    if curvature not in CURVATURES:
        raise ValueError(
            f"fit_factors: curvature must be one of {', '.join(map(repr, CURVATURES))}, got "
            f"{curvature!r} (the exact 'ggn' and 'ef' have no factors to fit)"
        )
    if fisher_type not in FISHER_TYPES:
        raise ValueError(
            f"fisher_type must be one of {', '.join(map(repr, FISHER_TYPES))}, got {fisher_type!r}"
        )
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    if fisher_type != "mc" and mc_samples != 1:
        raise ValueError(f"mc_samples={mc_samples} needs fisher_type='mc'; leave it at 1")


def _kind(block: Block, curvature: str) -> str:
    if curvature in ("diagonal", "identity"):
        return curvature
    if block.kronecker:
        return "kronecker"
    return "dense" if block.numel <= MAX_DENSE_BLOCK else "diagonal"


def _statistics_bytes(params: list[Tensor], curvature: str) -> int:
    """An upper bound on the bytes of the statistics, from the parameters' shapes."""
    total = 0
    for param in params:
        entries = param.numel()
        if curvature in ("kfac", "ekfac") and param.dim() >= 2:
            inputs = param[0].numel() + 1
            total += inputs * inputs + param.shape[0] ** 2 + 2 * entries
        elif curvature in ("kfac", "ekfac") and entries <= MAX_DENSE_BLOCK:
            total += entries * entries
        else:
            total += entries
    return total * params[0].element_size()


def _moments(block: Block, kind: str, factor: Factor) -> list[Tensor]:
    """One batch's sums: ``[x x^T, b b^T, rows]`` for KFAC's factors, else ``[v v^T]``/``[v^2]``."""
    if kind == "kronecker":
        x = factor.inputs  # type: ignore[attr-defined]
        b = factor.output_grads  # type: ignore[attr-defined]
        rows = x.shape[0] * x.shape[1]
        a = torch.einsum("ntgi,ntgj->gij", x, x)
        return [a, torch.einsum("kntgo,kntgp->gop", b, b), a.new_tensor(float(rows))]
    if kind == "dense":
        columns = factor.dense().reshape(-1, block.numel)
        return [columns.T @ columns]
    return [factor.diag().reshape(block.shape)]


def _eigen(matrix: Tensor) -> tuple[Tensor, Tensor]:
    # In float64 whatever the factor's dtype (as kronfluence does): a float32 eigh of a factor
    # with clustered eigenvalues put the scores 1e-3 off the float64 answer, float64 1e-5.
    symmetric = (matrix + matrix.mT) / 2
    values, vectors = torch.linalg.eigh(symmetric.to(torch.float64))
    return values.to(matrix.dtype), vectors.to(matrix.dtype)


class _Fit:
    """The passes over the training data that :func:`fit_factors` makes."""

    def __init__(self, problem: Problem, curvature: str, fisher_type: str) -> None:
        self.problem = problem
        self.curvature = curvature
        self.fisher_type = fisher_type
        self.blocks: list[Block] = []
        generator = problem.generator
        self.random_state = None if generator is None else (generator.get_state(), generator.device)

    def replay(self) -> None:
        """Give the problem a generator in the state it had before the first pass."""
        if self.random_state is not None:
            state, device = self.random_state
            generator = torch.Generator(device=device)
            generator.set_state(state)
            self.problem.generator = generator

    def columns(self, targets: Tensor) -> Callable[[Tensor], Tensor] | None:
        if self.fisher_type == "empirical":
            return gradient_columns(self.problem.loss_fn, targets)
        return None

    def statistics(self) -> list[Tensor]:
        """Pass 1: the sums of every block, and the number of examples, over the data."""

        def batch_quantity(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
            outputs, factors = self.problem.factors(inputs, targets, self.columns(targets))
            if not self.blocks:
                self.blocks = plan_blocks(self.problem.model, self.problem.params, factors)
            out = [outputs.new_tensor(float(sample_layout(inputs, outputs)[0]))]
            for block in self.blocks:
                kind = _kind(block, self.curvature)
                out += _moments(block, kind, block_factor(block, factors))
            return outputs, out

        self.replay()
        return self.problem.reduce(batch_quantity, passes=2 if self.curvature == "ekfac" else 1)

    def corrections(self, layers: list[BlockCurvature]) -> list[Tensor]:
        """Pass 2 (EKFAC): the summed squares of the gradients in the Kronecker eigenbases."""

        def batch_quantity(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
            outputs, factors = self.problem.factors(inputs, targets, self.columns(targets))
            squares = [
                _squared_gradients(layer.basis_factor(block_factor(layer.block, factors)))
                for layer in layers
            ]
            return outputs, squares

        self.replay()
        return self.problem.reduce(batch_quantity, passes=2)


def _squared_gradients(factor: Factor) -> Tensor:
    r""":math:`\sum_{k,n} g_{k,n}^{\odot 2}` of a layer's per-example gradients ``[G, O, I]``.

    With one position per example this is the factor's diagonal (one matrix product); with
    several, the gradients :math:`\sum_t b_{k,n,t} x_{n,t}^\top` are formed for a chunk of
    examples at a time (at most the factor's ``max_chunk_bytes``) in one batched product.
    """
    b, x = factor.output_grads, factor.inputs  # type: ignore[attr-defined]
    columns, samples, positions, groups, outputs = b.shape
    if positions == 1:
        return factor.diag().reshape(groups, outputs, -1)
    per_sample = columns * groups * outputs * x.shape[-1] * b.element_size()
    step = max(1, factor.max_chunk_bytes // per_sample)  # type: ignore[attr-defined]
    total = b.new_zeros(groups, outputs, x.shape[-1])
    for start in range(0, samples, step):
        chunk = slice(start, start + step)
        gradients = torch.einsum("kntgo,ntgi->kngoi", b[:, chunk], x[chunk])
        total += gradients.square().sum(dim=(0, 1))
    return total


def fit_factors(
    model: nn.Module,
    loss_fn: LossFunction,
    train_data: Data,
    *,
    curvature: str = "ekfac",
    params: Params = None,
    fisher_type: str = "mc",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> InfluenceFactors:
    r"""Fit the curvature :math:`C` of the training data, block by block (kronfluence's factors).

    See :mod:`curvkit.influence.fit` for the formulas; they are kronfluence's, so that
    :func:`~curvkit.influence.scores.pairwise_scores` with these factors equals kronfluence's
    scores.
    The model is only evaluated: its parameters, buffers, hooks and modes are left as they are.

    Args:
        model: The network.
        loss_fn: The training loss ``loss_fn(outputs, targets)``, ``mean`` or ``sum`` reduction
            (the same factors either way).
        train_data: A batch ``(inputs, targets)``, a list of batches or a DataLoader (Hugging
            Face dict batches too); split over ``torch.distributed`` ranks, the factors are
            those of all ranks' data. ``"ekfac"`` reads it twice.
        curvature: ``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"identity"``.
        params: The parameters to attribute through (a list or param groups; all trainable
            parameters for ``None``). Every one gets a block.
        fisher_type: ``"mc"`` (targets sampled from the model, ``mc_samples`` per example),
            ``"empirical"`` (the observed targets; kronfluence's ``use_empirical_fisher=True``)
            or ``"exact"`` (the generalised Gauss-Newton's square root, one column per output).
        mc_samples: Monte-Carlo samples per example for ``fisher_type="mc"``.
        generator: Random number generator for the samples (the global one for ``None``).
        max_memory: Budget in bytes for the statistics and the loss Hessian's columns
            (``None``: a fraction of the free memory). One batch's activations and output
            gradients are held at once: pass smaller batches for a larger model.
        progress: Progress bars over the batches (``None``: automatic).

    Returns:
        The factors, to pass as ``factors=``.

    Raises:
        ValueError: For an unknown setting, or statistics beyond ``max_memory`` (before any
            pass over the data).
    """
    _check_settings(curvature, fisher_type, mc_samples)
    problem = Problem(
        model,
        summed_loss(loss_fn),
        train_data,
        params,
        mc_samples=mc_samples if fisher_type == "mc" else 0,
        generator=generator,
        progress=progress,
        name=f"influence factors ({curvature})",
        max_memory=max_memory,
    )
    if curvature == "identity":
        blocks = plan_blocks(model, problem.params, None)
        curvatures = [BlockCurvature(block, "identity", {}) for block in blocks]
        return InfluenceFactors(curvature, fisher_type, mc_samples, 0, curvatures)
    needed = _statistics_bytes(problem.params, curvature)
    budget = problem.memory.budget(problem.params[0].device, needed)
    if needed > budget:
        raise MemoryPlanError(
            f"the {curvature} statistics of these parameters need about {needed / 2**30:.2f} GiB, "
            f"over the budget of {budget / 2**30:.2f} GiB (max_memory); pass fewer params, "
            "curvature='diagonal', or a larger max_memory"
        )
    if fisher_type == "mc" and problem.generator is None:
        problem.generator = torch.Generator(device=problem.params[0].device)
        problem.generator.manual_seed(int(torch.randint(2**62, ()).item()))
    fit = _Fit(problem, curvature, fisher_type)
    return _finish(fit, iter(fit.statistics()), mc_samples)


def _finish(fit: _Fit, sums: Iterator[Tensor], mc_samples: int) -> InfluenceFactors:
    """Turn the sums of pass 1 into curvatures (with pass 2 for EKFAC)."""
    count = float(next(sums))
    curvatures: list[BlockCurvature] = []
    for block in fit.blocks:
        kind = _kind(block, fit.curvature)
        if kind == "kronecker":
            a, b, rows = next(sums), next(sums), float(next(sums))
            la, qa = _eigen(a / rows)
            lb, qb = _eigen(b / rows)
            tensors = {"qa": qa, "qb": qb, "values": lb.unsqueeze(-1) * la.unsqueeze(-2)}
        elif kind == "dense":
            values, vectors = _eigen(next(sums) / count)
            tensors = {"q": vectors, "values": values}
        else:
            tensors = {"values": next(sums).reshape(block.shape) / count}
        curvatures.append(BlockCurvature(block, kind, tensors))
    layers = [entry for entry in curvatures if entry.kind == "kronecker"]
    if fit.curvature == "ekfac" and layers:
        for entry, squares in zip(layers, fit.corrections(layers), strict=True):
            entry.tensors["values"] = squares / count
    return InfluenceFactors(fit.curvature, fit.fisher_type, mc_samples, int(count), curvatures)
