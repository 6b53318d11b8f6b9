r"""The GLM predictive's moments, :math:`f(x)` and :math:`J \Sigma J^\top`, under a memory budget.

For test inputs :math:`x_n` with Jacobians :math:`J_n = \partial f(x_n) / \partial \theta`
(``[C, P]``) and a posterior covariance :math:`\Sigma`, the linearised (GLM) predictive has mean
:math:`f(x_n)` and covariance :math:`J_n \Sigma J_n^\top` (``[C, C]``; across samples for
``joint``). laplace-torch materialises the Jacobian ``[B, C, P]`` in one piece; here it never
exists beyond the budget:

1. curvkit's engine (:func:`curvkit.engines.compute_factors`) pushes the ``C`` unit vectors of
   the output space back through a chunk of ``b`` samples once, and keeps the Jacobian in its
   structured per-layer form (for a Linear layer the backpropagated vectors and the layer's
   inputs, never their outer products);
2. when all ``C`` rows of ``b`` samples fit, they are materialised (``[C b, P]``), multiplied by
   the covariance, :math:`U = J \Sigma` (the structure's own product: diagonal, Kronecker,
   dense or low rank), and contracted with the rows sample by sample;
3. otherwise one sample (all samples for ``joint``) at a time, and ``k`` classes at a time: the
   rows of the chunk's classes times :math:`\Sigma`, contracted with the structured Jacobian of
   all classes (the factors' ``t_mat``), giving ``f_var[:, :, c0:c1]``.

:func:`plan_chunks` picks ``b`` and ``k`` from the budget ``max_memory`` (bytes; ``None`` for
half the memory available on the device): every chunk holds three ``[k b, P]`` tensors (rows,
their product with :math:`\Sigma`, and the contraction's scratch), so that the peak beyond the
engine's structured factors (``C`` times the activations of ``b`` samples) stays within the
budget. Work that cannot fit even one row per chunk is refused before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.core.model_io import call_model, num_input_samples, output_tensor, select_samples
from curvkit.engines import compute_factors
from curvkit.engines.memory import DEFAULT_MEMORY_FRACTION, MemoryPlanError, available_memory

__all__ = ["ChunkPlan", "glm_moments", "plan_chunks"]

#: Tensors ``[k b, P]`` alive at once in one chunk (rows, covariance times rows, scratch).
ROW_COPIES = 3

#: Samples per chunk at most (each chunk is one forward and one batched backward pass).
MAX_SAMPLES = 256

CovarianceProduct = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ChunkPlan:
    """How the GLM variance is chunked.

    Attributes:
        samples: Samples per chunk ``b``.
        classes: Output classes per chunk ``k``.
        peak_bytes: The bytes of the chunk's row tensors, ``ROW_COPIES * k * b * P * itemsize``.
        budget: The budget it was planned for.
    """

    samples: int
    classes: int
    peak_bytes: int
    budget: int


def plan_chunks(
    num_samples: int,
    num_classes: int,
    num_params: int,
    itemsize: int,
    budget: int,
    *,
    joint: bool = False,
) -> ChunkPlan:
    """Choose the chunk sizes of :func:`glm_moments` for a budget.

    Args:
        num_samples: The test samples ``B``.
        num_classes: The outputs per sample ``C``.
        num_params: The parameters of the Jacobian rows ``P``.
        itemsize: Bytes per number.
        budget: Bytes the row tensors may take.
        joint: All samples in one chunk (the covariance across samples needs them together).

    Returns:
        The plan: as many samples as fit with all their classes, else one sample (or all, for
        ``joint``) and as many classes as fit.

    Raises:
        MemoryPlanError: If not even one row per chunk fits.
    """
    row = ROW_COPIES * num_params * itemsize
    # Several samples per chunk only with all their classes: split classes, one sample a chunk
    # (the structured contraction then couples no samples).
    samples = (
        num_samples
        if joint
        else max(1, min(num_samples, MAX_SAMPLES, budget // (row * num_classes)))
    )
    classes = max(0, min(num_classes, budget // (row * samples)))
    if classes < 1:
        need = row * samples
        raise MemoryPlanError(
            f"the GLM predictive needs at least {need / 2**20:.1f} MiB for one chunk of Jacobian "
            f"rows ({samples} sample(s) x {num_params} parameters), above the budget of "
            f"{budget / 2**20:.1f} MiB: raise max_memory, predict fewer samples at once"
            + (" or use joint=False" if joint else "")
            + ", or restrict the Laplace approximation (subset_of_weights='last_layer')"
        )
    return ChunkPlan(
        samples, classes, ROW_COPIES * classes * samples * num_params * itemsize, budget
    )


def budget_for(max_memory: int | None, device: torch.device) -> int:
    """``max_memory``, or the default fraction of what is free (:mod:`curvkit.engines.memory`)."""
    if max_memory is not None:
        return max_memory
    return int(DEFAULT_MEMORY_FRACTION * available_memory(device))


def _identity_columns(outputs: Tensor) -> Tensor:
    if outputs.ndim != 2:
        raise ValueError(
            f"the GLM predictive needs model outputs [batch, outputs], got {tuple(outputs.shape)}"
        )
    n, c = outputs.shape
    eye = torch.eye(c, dtype=outputs.dtype, device=outputs.device)
    return eye[:, None, :].expand(c, n, c).contiguous()


def _rows(factors: Sequence[Any], start: int, stop: int, samples: int) -> Tensor:
    """The Jacobian rows of classes ``start:stop`` for every sample, ``[k b, P]``."""
    parts = [f.select(start, stop).dense().reshape((stop - start) * samples, -1) for f in factors]
    return torch.cat(parts, dim=1)


def _contract(factors: Sequence[Any], params: Sequence[Tensor], product: Tensor) -> Tensor:
    """:math:`J U` for all classes: ``[C, b, J]`` from ``product`` ``[J, P]``."""
    out, start = None, 0
    for factor, param in zip(factors, params, strict=True):
        piece = product[:, start : start + param.numel()].reshape(-1, *param.shape)
        start += param.numel()
        term = factor.t_mat(piece)
        out = term if out is None else out + term
    return out


def glm_moments(
    model: nn.Module,
    inputs: Any,
    params: Sequence[Tensor],
    covariance_product: CovarianceProduct,
    *,
    joint: bool = False,
    max_memory: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The GLM predictive mean and covariance without a ``[B, C, P]`` Jacobian.

    Args:
        model: The model curvkit calls.
        inputs: Its inputs for ``B`` samples.
        params: The parameters of the Jacobian (``P`` entries in all).
        covariance_product: :math:`R \mapsto R \Sigma` for rows ``[J, P]``.
        joint: Return the covariance across samples ``[B C, B C]`` (index ``n C + c``) rather
            than per sample ``[B, C, C]``.
        max_memory: The budget in bytes (module docstring); ``None`` for the default.

    Returns:
        ``(f_mu [B, C], f_var)``, detached.
    """
    with torch.no_grad():
        f_mu = output_tensor(call_model(model, inputs)).detach()
    if f_mu.ndim != 2:
        raise ValueError(
            f"the GLM predictive needs model outputs [batch, outputs], got {tuple(f_mu.shape)}"
        )
    total, classes = f_mu.shape
    num_params = sum(p.numel() for p in params)
    plan = plan_chunks(
        total,
        classes,
        num_params,
        f_mu.element_size(),
        budget_for(max_memory, f_mu.device),
        joint=joint,
    )
    samples_total = num_input_samples(inputs) or total
    blocks = []
    for start in range(0, total, plan.samples):
        chunk = slice(start, min(start + plan.samples, total))
        part = select_samples(inputs, chunk, samples_total) if plan.samples < total else inputs
        blocks.append(_chunk_variance(model, part, params, covariance_product, plan, joint))
    f_var = torch.cat(blocks, dim=0)
    return f_mu, f_var


def _chunk_variance(
    model: nn.Module,
    inputs: Any,
    params: Sequence[Tensor],
    covariance_product: CovarianceProduct,
    plan: ChunkPlan,
    joint: bool,
) -> Tensor:
    """``f_var`` of one chunk of samples: ``[b, C, C]`` (or ``[b C, b C]`` for ``joint``)."""
    outputs, factors = compute_factors(model, inputs, list(params), _identity_columns)
    b, c = outputs.shape
    if plan.classes == c:
        # All rows of the chunk at once: contract them with their products directly.
        with torch.no_grad():
            rows = _rows(factors, 0, c, b)
            product = covariance_product(rows).view(c, b, -1)
            rows = rows.view(c, b, -1)
            if joint:
                rows, product = rows.transpose(0, 1), product.transpose(0, 1)
                return rows.reshape(b * c, -1) @ product.reshape(b * c, -1).T
            return torch.einsum("cnp,knp->nck", rows, product)
    f_var = outputs.new_zeros(c, b, c, b)  # [c', n', c, n]
    for start in range(0, c, plan.classes):
        stop = min(start + plan.classes, c)
        with torch.no_grad():
            product = covariance_product(_rows(factors, start, stop, b))
            f_var[:, :, start:stop] = _contract(factors, params, product).reshape(
                c, b, stop - start, b
            )
    if joint:
        return f_var.permute(1, 0, 3, 2).reshape(b * c, b * c)
    return f_var.diagonal(dim1=1, dim2=3).permute(2, 0, 1)
