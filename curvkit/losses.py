r"""Output-space curvature: square roots of the loss Hessian with the reduction folded in.

For a batch of :math:`N` samples with model outputs :math:`f_n` and a batch loss
:math:`L = \sum_n r\, \ell_n(f_n)` (reduction factor :math:`r`: 1 for ``reduction="sum"``, the
inverse batch normalisation for ``"mean"``), the Hessian of :math:`L` with respect to the outputs is
block diagonal over samples, with blocks

.. math::

    H_n = \frac{\partial^2 L}{\partial f_n^2} = S_n S_n^\top,

and :func:`hessian_sqrt` returns the square roots :math:`S_n` stacked as one tensor ``S`` of shape
``[K, *outputs.shape]``: ``S[k, n]`` is the :math:`k`-th column of :math:`S_n`, shaped like one
sample's output. The engines push these :math:`K` columns back through the network to form the
square-root factor of the generalised Gauss-Newton matrix, a slice of columns at a time
(``hessian_sqrt(..., columns=slice(a, b))``, :func:`num_sqrt_columns`). Products
:math:`H u` never form a square root: :func:`hessian_product` applies :math:`H` in closed form
(or as a Hessian-vector product), in memory linear in the number of classes.

Supported losses:

- :class:`torch.nn.MSELoss`, :class:`torch.nn.CrossEntropyLoss` (``weight``, ``ignore_index``,
  ``label_smoothing``; class-index or class-probability targets; outputs ``[N, C]`` or
  ``[N, C, d_1, ...]``) and :class:`torch.nn.BCEWithLogitsLoss` (``weight``, ``pos_weight``) with
  ``reduction="mean"`` or ``"sum"``: exact closed forms, and Monte-Carlo square roots that sample
  targets from the model's predictive distribution.
- Any other callable ``loss_fn(outputs, targets) -> scalar`` (including the other ``torch.nn``
  losses) that is a sum or a mean of independent, twice-differentiable per-sample terms:
  per-sample Hessians by batched Hessian-vector products of the batch loss, then a symmetric
  eigendecomposition.
- Refused with an explanation: ``reduction="none"``; :class:`torch.nn.NLLLoss` and
  :class:`torch.nn.KLDivLoss`, which are linear in their input, so that their Hessian and hence
  their GGN is zero (put the ``log_softmax`` into the loss: use ``CrossEntropyLoss`` on logits).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvkit.core.autograd import batched_grad
from curvkit.core.validation import check_int
from curvkit.ops.linalg import couples_items

__all__ = [
    "LossFunction",
    "NextTokenCrossEntropyLoss",
    "check_loss",
    "check_mc_samples",
    "hessian_product",
    "hessian_sqrt",
    "normalization",
    "num_sqrt_columns",
    "sample_reduction",
    "scalar_loss",
]

LossFunction = Callable[[Tensor, Any], Tensor]


class NextTokenCrossEntropyLoss(nn.Module):
    r"""A causal language model's loss as Hugging Face computes it from ``labels``.

    For logits ``[N, T, V]`` and labels ``[N, T]`` (the input tokens, ``-100`` where padded), the
    logits at position :math:`t` predict the label at :math:`t + 1`:
    ``cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())``, averaged over the
    labels that are not ``ignore_index`` (or summed). This is the one line of adapter code a
    Hugging Face causal LM needs: its batches (dicts with ``labels``) and its ``ModelOutput``
    are read as they are (:mod:`curvkit.core.model_io`), and its curvature is the closed-form
    cross-entropy one, position by position.

    Args:
        ignore_index: The label of positions without a loss term.
        reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss of a batch of logits ``[N, T, V]`` and labels ``[N, T]``."""
        return nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1),
            labels[:, 1:].flatten(),
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    def cross_entropy_view(
        self, logits: Tensor, labels: Tensor
    ) -> tuple[nn.CrossEntropyLoss, Tensor, Tensor]:
        """The same loss as ``nn.CrossEntropyLoss`` on logits ``[N, V, T]`` and shifted labels.

        The labels move one position back; the last position gets ``ignore_index``.

        Raises:
            ValueError: If the shapes are not ``[N, T, V]`` and ``[N, T]``.
        """
        if logits.dim() != 3 or not isinstance(labels, Tensor) or labels.shape != logits.shape[:2]:
            raise ValueError(
                "NextTokenCrossEntropyLoss needs logits [N, T, V] and labels [N, T], got "
                f"{tuple(logits.shape)} and "
                f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
            )
        shifted = torch.cat(
            [labels[:, 1:], labels.new_full((labels.shape[0], 1), self.ignore_index)], 1
        )
        loss = nn.CrossEntropyLoss(ignore_index=self.ignore_index, reduction=self.reduction)
        return loss, logits.movedim(-1, 1), shifted


_LINEAR_IN_INPUT = (nn.NLLLoss, nn.KLDivLoss)


def hessian_sqrt(
    loss_fn: LossFunction,
    outputs: Tensor,
    targets: Any,
    *,
    mc_samples: int = 0,
    generator: torch.Generator | None = None,
    columns: slice | None = None,
) -> Tensor:
    r"""Square root of the per-sample output Hessians of a batch loss, reduction folded in.

    Returns ``S`` of shape ``[K, *outputs.shape]`` such that for every sample :math:`n`

    .. math::

        \sum_{k} S_{k,n} S_{k,n}^\top = \frac{\partial^2 L}{\partial f_n^2},
        \qquad L = \texttt{loss\_fn(outputs, targets)},

    exactly for ``mc_samples == 0`` and in expectation (unbiased) with :math:`K` = ``mc_samples``
    otherwise. Closed forms, with :math:`r` the reduction factor:

    - ``MSELoss``: :math:`H_n = 2 r I`, so :math:`S_n = \sqrt{2r}\, I` (:math:`K` = entries per
      sample; :math:`r = 1/\texttt{outputs.numel()}` for ``"mean"``).
    - ``CrossEntropyLoss`` on logits, per position :math:`j` with probabilities
      :math:`p = \mathrm{softmax}(f_{n,:,j})`: :math:`H = a\, r\, (\mathrm{diag}(p) - p p^\top)`,
      where :math:`a = (1-\varepsilon) w_{y} + \tfrac{\varepsilon}{C} \sum_c w_c` for class index
      :math:`y` (:math:`a = 0` where :math:`y` is ``ignore_index``) and
      :math:`a = \sum_c w_c \tilde q_c`, :math:`\tilde q = (1-\varepsilon) q + \varepsilon / C`, for
      class probabilities :math:`q` (:math:`w`: class weights, :math:`\varepsilon`: label
      smoothing). Since :math:`\sum_c p_c = 1`, the :math:`C` columns
      :math:`\sqrt{a r p_c}\, (e_c - p)` are an exact square root. Positions of a spatial output
      are independent, so each position gets its own :math:`C` columns, zero elsewhere:
      :math:`K = C \prod_i d_i` and ``S`` holds :math:`N C^2 (\prod_i d_i)^2` numbers. For large
      spatial outputs that is prohibitive: use ``mc_samples``, whose columns cover all positions
      at once (:math:`K` = ``mc_samples``).
    - ``BCEWithLogitsLoss``: with :math:`\sigma = \mathrm{sigmoid}(f)`, weight :math:`w` and
      positive weight :math:`w_+`, the loss
      :math:`-w [w_+ y \log\sigma + (1-y)\log(1-\sigma)]` has the diagonal Hessian
      :math:`h = r\, w\, (w_+ y + 1 - y)\, \sigma (1-\sigma)`, so
      :math:`S_n = \mathrm{diag}(\sqrt h)`.

    Monte-Carlo square roots (``mc_samples = M > 0``) sample targets from the model's predictive
    distribution: for cross-entropy :math:`\hat y \sim \mathrm{Categorical}(p)` independently per
    position and column :math:`\sqrt{a r / M}\, (p - e_{\hat y})`; for BCE
    :math:`\hat y \sim \mathrm{Bernoulli}(\sigma)` per entry and column
    :math:`\sqrt{r w (w_+ y + 1 - y) / M}\, (\hat y - \sigma)`; for MSE column
    :math:`\sqrt{2r/M}\, z` with :math:`z \sim \mathcal N(0, I)`. In each case
    :math:`\mathbb E[S_n S_n^\top] = H_n`.

    Any other loss takes the generic path: the gradient :math:`g = \partial L / \partial f` is
    differentiated once more along the :math:`D` unit vectors of one sample's output, all samples at
    once (one batched backward pass), which yields every :math:`H_n` because the per-sample terms
    are independent. Then :math:`H_n = U \Lambda U^\top` and :math:`S_n = U \Lambda_+^{1/2}`
    (:math:`K = D`); negative eigenvalues (a non-convex loss) are clamped to zero with a
    :class:`RuntimeWarning`. With ``mc_samples = M > 0`` the generic square root is sketched:
    :math:`S_n Z / \sqrt M` with a Gaussian :math:`Z \in \mathbb R^{D \times M}`, unbiased too.
    The generic path needs sample :math:`n`'s loss to depend on :math:`f_n` only, and refuses a
    loss whose Hessian-vector product along one sample reaches the others
    (:func:`curvkit.ops.linalg.couples_items`).

    Args:
        loss_fn: ``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss`` (closed forms), or any
            callable ``loss_fn(outputs, targets)`` returning the scalar batch loss.
        outputs: Model outputs, batch dimension first. Never differentiated through: the function
            detaches them.
        targets: The targets as ``loss_fn`` takes them.
        mc_samples: Number of Monte-Carlo columns; ``0`` (default) for the exact square root.
        generator: Random number generator for the Monte-Carlo samples (on the outputs' device);
            the global one if ``None``. Unused when ``mc_samples == 0``.
        columns: Only the exact columns ``S[columns]`` (a slice with step 1 of
            ``range(num_sqrt_columns(...))``), built without the others: the closed forms
            produce a slice in memory proportional to its length, so that callers can walk
            through the :math:`C \prod_i d_i` exact cross-entropy columns of a large output
            chunk by chunk. ``None`` (default) for all. Not with ``mc_samples``, whose columns
            are drawn together.

    Returns:
        ``S`` with shape ``[K, *outputs.shape]`` (``K`` the slice's length with ``columns``),
        dtype and device of ``outputs``.

    Raises:
        TypeError: If ``outputs`` is not a floating tensor, ``mc_samples`` not an integer or
            ``generator`` not a :class:`torch.Generator`.
        ValueError: For ``reduction="none"``, ``NLLLoss``/``KLDivLoss``, outputs without a batch
            dimension, targets whose shape or values do not fit the outputs, negative weights or
            probabilities (a Hessian that is not positive semi-definite), ``mc_samples < 0``, or a
            generic loss that does not return a scalar or couples samples; ``columns`` that is not
            a slice of the exact columns.
    """
    check_loss(loss_fn)
    _check_outputs(outputs)
    check_mc_samples(mc_samples, generator)
    outputs = outputs.detach()
    if isinstance(loss_fn, NextTokenCrossEntropyLoss):
        loss_fn, moved, targets = loss_fn.cross_entropy_view(outputs, targets)
        sqrt = hessian_sqrt(
            loss_fn, moved, targets, mc_samples=mc_samples, generator=generator, columns=columns
        )
        return sqrt.movedim(2, -1)
    if columns is not None:
        if mc_samples > 0:
            raise ValueError("columns= selects exact columns; Monte-Carlo columns come together")
        columns = _check_column_slice(columns, num_sqrt_columns(outputs))

    if _is_exactly(loss_fn, nn.MSELoss):
        _check_same_shape(loss_fn, outputs, targets)
        if mc_samples > 0:
            return _mse_mc_sqrt(loss_fn, outputs, mc_samples, generator)
        return _diagonal_columns(_mse_diagonal(loss_fn, outputs).sqrt(), outputs, columns)
    if _is_exactly(loss_fn, nn.BCEWithLogitsLoss):
        _check_same_shape(loss_fn, outputs, targets)
        factor = _bce_factor(loss_fn, outputs, targets.detach())
        if mc_samples > 0:
            return _bce_mc_sqrt(outputs, factor, mc_samples, generator)
        prob = torch.sigmoid(outputs)
        return _diagonal_columns((factor * prob * (1 - prob)).sqrt(), outputs, columns)
    if _is_exactly(loss_fn, nn.CrossEntropyLoss):
        scale = _cross_entropy_scale(loss_fn, outputs, targets)
        if mc_samples > 0:
            return _cross_entropy_mc_sqrt(outputs, scale, mc_samples, generator)
        return _cross_entropy_sqrt(outputs, scale, columns)
    sqrt = _generic_sqrt(loss_fn, outputs, targets, mc_samples, generator)
    return sqrt if columns is None else sqrt[columns]


def num_sqrt_columns(outputs: Tensor, mc_samples: int = 0) -> int:
    r"""The number :math:`K` of columns :func:`hessian_sqrt` returns, without computing them.

    ``mc_samples`` if positive; else the number of entries of one sample's output, for every
    loss (:math:`C \prod_i d_i` for ``CrossEntropyLoss`` on outputs ``[N, C, d_1, ...]``: one
    set of :math:`C` columns per position).

    Args:
        outputs: Model outputs, batch dimension first (only the shape is read).
        mc_samples: As for :func:`hessian_sqrt`.

    Returns:
        :math:`K`.
    """
    if mc_samples > 0:
        return mc_samples
    return math.prod(outputs.shape[1:])


def hessian_product(
    loss_fn: LossFunction, outputs: Tensor, targets: Any, vectors: Tensor
) -> Tensor:
    r"""The output Hessian of a batch loss times vectors, :math:`H u`, without a square root.

    For ``vectors`` :math:`u` of shape ``[..., *outputs.shape]`` (any leading axes: several
    vectors), returns :math:`H u` per sample, :math:`(H u)_n = H_n u_n`
    (:math:`H_n = \partial^2 L / \partial f_n^2`, the reduction folded in as for
    :func:`hessian_sqrt`), in memory linear in the outputs' size:

    - ``CrossEntropyLoss``, per position :math:`j` with :math:`p = \mathrm{softmax}(f_{n,:,j})`
      and the scale :math:`a r` of :func:`hessian_sqrt`:
      :math:`a r\, (p \odot u - p\, (p^\top u))`, never the :math:`C \times C` matrix;
    - ``MSELoss``: :math:`2 r u`;
    - ``BCEWithLogitsLoss``: :math:`h \odot u` with the diagonal :math:`h` of
      :func:`hessian_sqrt`;
    - any other loss: a Hessian-vector product by differentiating the gradient
      :math:`\partial L / \partial f` once more (double backward), which is :math:`H_n u_n` per
      sample when the per-sample terms are independent. Unlike :func:`hessian_sqrt`, which
      clamps the negative eigenvalues of a non-convex loss, this is the Hessian itself.

    Args:
        loss_fn: The loss, as for :func:`hessian_sqrt`.
        outputs: Model outputs, batch dimension first; detached.
        targets: The targets as ``loss_fn`` takes them.
        vectors: :math:`u`, shape ``[..., *outputs.shape]``, with the outputs' dtype and device.

    Returns:
        :math:`H u`, shaped like ``vectors``.

    Raises:
        TypeError: As :func:`hessian_sqrt`, or if ``vectors`` is not a tensor.
        ValueError: As :func:`hessian_sqrt`, or if ``vectors`` does not end with the outputs'
            shape.
    """
    check_loss(loss_fn)
    _check_outputs(outputs)
    if not isinstance(vectors, Tensor):
        raise TypeError(f"vectors must be a torch.Tensor, got {type(vectors).__name__}")
    if vectors.shape[vectors.dim() - outputs.dim() :] != outputs.shape:
        raise ValueError(
            f"vectors must have shape [..., *{tuple(outputs.shape)}] (the outputs' shape last), "
            f"got {tuple(vectors.shape)}"
        )
    outputs = outputs.detach()
    if isinstance(loss_fn, NextTokenCrossEntropyLoss):
        loss_fn, moved, targets = loss_fn.cross_entropy_view(outputs, targets)
        product = hessian_product(loss_fn, moved, targets, vectors.movedim(-1, -2))
        return product.movedim(-2, -1)
    if _is_exactly(loss_fn, nn.MSELoss):
        _check_same_shape(loss_fn, outputs, targets)
        return _mse_diagonal(loss_fn, outputs) * vectors
    if _is_exactly(loss_fn, nn.BCEWithLogitsLoss):
        _check_same_shape(loss_fn, outputs, targets)
        prob = torch.sigmoid(outputs)
        return _bce_factor(loss_fn, outputs, targets.detach()) * prob * (1 - prob) * vectors
    if _is_exactly(loss_fn, nn.CrossEntropyLoss):
        scale = _cross_entropy_scale(loss_fn, outputs, targets).unsqueeze(1)
        prob = torch.softmax(outputs, dim=1)
        class_axis = vectors.dim() - outputs.dim() + 1
        # p * u - p (p . u), updating the fresh p * u in place: a language model's logits are
        # the largest tensors of its product, and each temporary of their size costs time.
        product = prob * vectors
        product.addcmul_(prob, product.sum(dim=class_axis, keepdim=True), value=-1)
        return product.mul_(scale)
    return _generic_product(loss_fn, outputs, targets, vectors)


def check_mc_samples(mc_samples: int, generator: torch.Generator | None = None) -> None:
    """Raise if ``mc_samples`` is not a count of Monte-Carlo samples or ``generator`` no generator.

    Args:
        mc_samples: ``0`` (exact) or a positive number of Monte-Carlo samples.
        generator: ``None`` or a :class:`torch.Generator`.

    Raises:
        TypeError: If ``mc_samples`` is not an int or ``generator`` not a generator.
        ValueError: If ``mc_samples`` is negative.
    """
    check_int(mc_samples, "mc_samples")
    if mc_samples < 0:
        raise ValueError(
            "mc_samples must be 0 (exact) or a positive number of Monte-Carlo samples, "
            f"got {mc_samples}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def normalization(loss_fn: LossFunction, outputs: Tensor, targets: Any) -> Tensor:
    r"""The normalisation :math:`Z` that turns the batch loss into the plain sum of its terms.

    :math:`Z L` is the sum of the per-sample (per-entry, per-target) terms, so that batches
    :math:`b` combine exactly into :math:`L = \sum_b Z_b L_b / \sum_b Z_b`:

    - ``reduction="sum"``: :math:`Z = 1`;
    - ``MSELoss`` and ``BCEWithLogitsLoss`` with ``"mean"``: :math:`Z` = ``outputs.numel()``;
    - ``CrossEntropyLoss`` with ``"mean"``: the number of non-ignored targets, or, with class
      weights, the sum of the weights of the non-ignored target classes; for class-probability
      targets the number of positions :math:`N \prod_i d_i`;
    - any other loss: :math:`Z = 1` for a sum over samples and :math:`Z = N` for a mean over
      samples, as :func:`sample_reduction` finds (for the other ``torch.nn`` losses
      ``"mean"`` gives :math:`Z = N`, the mean over samples of per-sample means). A batch of one
      has :math:`Z = 1` either way.

    With ``reduction="mean"`` the loss of several batches is :math:`\sum_b Z_b L_b / \sum_b Z_b`;
    with ``"sum"`` it is :math:`\sum_b Z_b L_b` (see :func:`sample_reduction`).

    Args:
        loss_fn: The loss, as for :func:`hessian_sqrt`.
        outputs: Model outputs, batch dimension first.
        targets: The targets as ``loss_fn`` takes them.

    Returns:
        :math:`Z` as a 0-dim tensor with the outputs' dtype and device. It is 0 for a
        ``CrossEntropyLoss`` mean over a batch whose targets are all ignored.

    Raises:
        TypeError: If ``outputs`` is not a floating tensor.
        ValueError: For the losses :func:`hessian_sqrt` refuses, mismatched targets, or a generic
            loss that is neither the sum nor the mean of its single-sample values (or whose
            single-sample values are all zero, so that sum and mean cannot be told apart).
    """
    check_loss(loss_fn)
    _check_outputs(outputs)
    outputs = outputs.detach()
    if isinstance(loss_fn, NextTokenCrossEntropyLoss):
        return normalization(*loss_fn.cross_entropy_view(outputs, targets))
    reduction = getattr(loss_fn, "reduction", None)

    if _is_exactly(loss_fn, nn.MSELoss) or _is_exactly(loss_fn, nn.BCEWithLogitsLoss):
        _check_same_shape(loss_fn, outputs, targets)
        count = outputs.numel() if reduction == "mean" else 1
        return torch.tensor(count, dtype=outputs.dtype, device=outputs.device)
    if _is_exactly(loss_fn, nn.CrossEntropyLoss):
        _, total = _cross_entropy_factor(loss_fn, outputs, targets)
        if reduction == "sum":
            return torch.ones((), dtype=outputs.dtype, device=outputs.device)
        return total
    if outputs.shape[0] == 1:  # the sum and the mean of one term are the term
        return torch.ones((), dtype=outputs.dtype, device=outputs.device)
    count = outputs.shape[0] if sample_reduction(loss_fn, outputs, targets) == "mean" else 1
    return torch.tensor(count, dtype=outputs.dtype, device=outputs.device)


def sample_reduction(
    loss_fn: LossFunction, outputs: Tensor, targets: Any
) -> Literal["sum", "mean"]:
    r"""Whether the batch loss sums or averages over its samples.

    This decides how batches :math:`b` combine into the loss of all the data: for ``"mean"`` it is
    :math:`\sum_b Z_b L_b / \sum_b Z_b`, for ``"sum"`` it is :math:`\sum_b L_b`
    (:math:`Z_b` from :func:`normalization`, which is 1 for a sum). A weighted mean (class weights
    or ``ignore_index`` of ``CrossEntropyLoss``) is a ``"mean"``.

    ``torch.nn`` losses answer with their ``reduction``. Any other loss is evaluated on the whole
    batch and on each sample alone (``outputs[n:n+1]``, ``targets[n:n+1]``; a batch of one is
    duplicated first): the batch loss is either the sum or the mean of the single-sample losses.

    Args:
        loss_fn: The loss, as for :func:`hessian_sqrt`.
        outputs: Model outputs, batch dimension first.
        targets: The targets as ``loss_fn`` takes them.

    Returns:
        ``"sum"`` or ``"mean"``.

    Raises:
        TypeError: If ``outputs`` is not a floating tensor.
        ValueError: For the losses :func:`hessian_sqrt` refuses; for a loss that is not a
            ``torch.nn`` loss: targets that are not a tensor with the outputs' batch size, a batch
            loss that is neither the sum nor the mean of its single-sample values, or
            single-sample values that are all zero (sum and mean cannot be told apart).
    """
    check_loss(loss_fn)
    _check_outputs(outputs)
    reduction = getattr(loss_fn, "reduction", None)
    if _is_torch_loss(loss_fn) or isinstance(loss_fn, NextTokenCrossEntropyLoss):
        if reduction in ("sum", "mean"):
            return reduction
    return _probe_reduction(loss_fn, outputs.detach(), targets)


# ---------------------------------------------------------------------------------------------
# validation


def _is_exactly(loss_fn: LossFunction, cls: type[nn.Module]) -> bool:
    """Whether ``loss_fn`` computes ``cls``'s loss: an instance whose ``forward`` is not overridden.

    A subclass with its own ``forward`` may compute anything and takes the generic path.
    """
    return isinstance(loss_fn, cls) and type(loss_fn).forward is cls.forward


def _is_torch_loss(loss_fn: LossFunction) -> bool:
    """Whether ``loss_fn`` is one of ``torch.nn``'s own losses, which honour their ``reduction``."""
    return isinstance(loss_fn, nn.Module) and type(loss_fn).__module__.startswith("torch.nn.")


def check_loss(loss_fn: LossFunction) -> None:
    """Refuse a loss whose curvature curvkit cannot compute, before any computation.

    Args:
        loss_fn: The loss ``loss_fn(outputs, targets)``.

    Raises:
        TypeError: If it is not callable.
        ValueError: If it is linear in its input (its Hessian is zero), does not reduce to a
            scalar, or has class weights (``weight``, ``pos_weight``) that hold NaN or inf.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(loss_fn, _LINEAR_IN_INPUT):
        raise ValueError(
            f"{type(loss_fn).__name__} is linear in its input (log-probabilities), so its Hessian "
            f"and the GGN are zero. Have the model output logits and use nn.CrossEntropyLoss "
            f"(or nn.BCEWithLogitsLoss for binary targets), which contains the log-softmax."
        )
    reduction = getattr(loss_fn, "reduction", None)
    if (
        isinstance(loss_fn, nn.Module)
        and reduction is not None
        and reduction not in ("mean", "sum")
    ):
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) does not return a scalar batch "
            f"loss; use reduction='mean' or reduction='sum'."
        )
    for name in ("weight", "pos_weight"):
        weight = getattr(loss_fn, name, None) if isinstance(loss_fn, nn.Module) else None
        if isinstance(weight, Tensor) and weight.is_floating_point():
            if not bool(torch.isfinite(weight).all()):
                raise ValueError(
                    f"{type(loss_fn).__name__}'s {name} holds NaN or inf, so the loss and its "
                    "curvature are undefined; pass finite weights"
                )


def _check_outputs(outputs: Tensor) -> None:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"outputs must be a torch.Tensor, got {type(outputs).__name__}")
    if not outputs.is_floating_point():
        raise TypeError(f"outputs must be a floating-point tensor, got dtype {outputs.dtype}")
    if outputs.dim() == 0 or outputs.shape[0] == 0:
        raise ValueError(
            f"outputs must have a non-empty batch dimension first, got shape {tuple(outputs.shape)}"
        )


def _check_same_shape(loss_fn: nn.Module, outputs: Tensor, targets: Any) -> None:
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"{type(loss_fn).__name__} needs targets as a tensor, got {type(targets).__name__}"
        )
    if targets.shape != outputs.shape:
        raise ValueError(
            f"{type(loss_fn).__name__} needs targets of the outputs' shape {tuple(outputs.shape)}, "
            f"got {tuple(targets.shape)} (broadcasting targets would mix samples)"
        )


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    if len(shape) > len(target):
        return False
    trailing = target[len(target) - len(shape) :]
    return all(size in (1, goal) for size, goal in zip(shape, trailing, strict=True))


# ---------------------------------------------------------------------------------------------
# MSE


def _mse_diagonal(loss_fn: nn.MSELoss, outputs: Tensor) -> Tensor:
    """The diagonal ``2 r`` of the (diagonal) Hessian, broadcastable to the outputs."""
    scale = 2.0 / outputs.numel() if loss_fn.reduction == "mean" else 2.0
    return torch.full((), scale, dtype=outputs.dtype, device=outputs.device)


def _mse_mc_sqrt(
    loss_fn: nn.MSELoss, outputs: Tensor, mc_samples: int, generator: torch.Generator | None
) -> Tensor:
    noise = torch.randn(
        mc_samples, *outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device
    )
    return noise.mul_((_mse_diagonal(loss_fn, outputs) / mc_samples).sqrt())


def _diagonal_columns(root: Tensor, outputs: Tensor, columns: slice | None) -> Tensor:
    """The square root of a diagonal Hessian whose entries' roots are ``root``.

    Column ``k`` is ``root[n, k] e_k`` in every sample ``n`` (``root`` broadcast to the
    outputs' shape, read flat per sample); only the columns in ``columns`` are built.
    """
    num_samples, sample_shape = outputs.shape[0], outputs.shape[1:]
    dim = math.prod(sample_shape)
    chosen = torch.arange(dim, device=outputs.device)[columns or slice(None)]
    diagonal = root.expand(outputs.shape).reshape(num_samples, dim)
    sqrt = outputs.new_zeros(len(chosen), num_samples, dim)
    sqrt[torch.arange(len(chosen), device=outputs.device), :, chosen] = diagonal[:, chosen].t()
    return sqrt.reshape(len(chosen), *outputs.shape)


def _check_column_slice(columns: Any, total: int) -> slice:
    if not isinstance(columns, slice) or columns.step not in (None, 1):
        raise ValueError(f"columns must be a slice with step 1, got {columns!r}")
    return slice(*columns.indices(total)[:2])


# ---------------------------------------------------------------------------------------------
# BCE with logits


def _bce_factor(loss_fn: nn.BCEWithLogitsLoss, outputs: Tensor, targets: Tensor) -> Tensor:
    """``r w (w+ y + 1 - y)``: the Hessian's diagonal over ``sigmoid'(f)``, outputs' shape."""
    targets = targets.to(outputs.dtype)
    # d^2/df^2 of -w [w+ y log s + (1 - y) log(1 - s)] = w (w+ y + 1 - y) s (1 - s)
    factor = torch.ones_like(outputs)
    for name, weight in (("weight", loss_fn.weight), ("pos_weight", loss_fn.pos_weight)):
        if weight is not None and not _broadcasts_to(weight.shape, outputs.shape):
            raise ValueError(
                f"BCEWithLogitsLoss {name} of shape {tuple(weight.shape)} does not broadcast to "
                f"the outputs' shape {tuple(outputs.shape)}"
            )
    if loss_fn.weight is not None:
        factor = factor * loss_fn.weight.detach().to(outputs)
    if loss_fn.pos_weight is not None:
        pos_weight = loss_fn.pos_weight.detach().to(outputs)
        factor = factor * (pos_weight * targets + 1 - targets)
    if (factor < 0).any():
        raise ValueError(
            "BCEWithLogitsLoss with negative weight, pos_weight or targets outside [0, 1] has a "
            "Hessian that is not positive semi-definite; its square root does not exist."
        )
    if loss_fn.reduction == "mean":
        factor = factor / outputs.numel()
    return factor


def _bce_mc_sqrt(
    outputs: Tensor, factor: Tensor, mc_samples: int, generator: torch.Generator | None
) -> Tensor:
    prob = torch.sigmoid(outputs)
    sampled = torch.bernoulli(prob.expand(mc_samples, *outputs.shape), generator=generator)
    return (sampled - prob).mul_((factor / mc_samples).sqrt())


# ---------------------------------------------------------------------------------------------
# cross-entropy


def _cross_entropy_factor(
    loss_fn: nn.CrossEntropyLoss, outputs: Tensor, targets: Any
) -> tuple[Tensor, Tensor]:
    """Per-position Hessian scale ``a`` (shape ``[N, d...]``) and the mean's normaliser.

    The loss per position is ``a * logsumexp(f) - (linear in f)``, so its Hessian is
    ``a (diag(p) - p p^T)``.
    """
    if outputs.dim() < 2:
        raise ValueError(
            f"CrossEntropyLoss outputs must have shape [N, C] or [N, C, d1, ...], got "
            f"{tuple(outputs.shape)}; for one unbatched sample pass outputs.unsqueeze(0)"
        )
    if not isinstance(targets, Tensor):
        raise TypeError(f"CrossEntropyLoss needs targets as a tensor, got {type(targets).__name__}")
    num_classes = outputs.shape[1]
    smoothing = loss_fn.label_smoothing
    weight = loss_fn.weight
    weight = (
        torch.ones(num_classes, dtype=outputs.dtype, device=outputs.device)
        if weight is None
        else weight.detach().to(outputs)
    )
    if (weight < 0).any():
        raise ValueError(
            "CrossEntropyLoss with negative class weights has a Hessian that is not positive "
            "semi-definite; its square root does not exist."
        )
    position_shape = outputs.shape[:1] + outputs.shape[2:]

    if targets.is_floating_point():
        if targets.shape != outputs.shape:
            raise ValueError(
                f"CrossEntropyLoss with class-probability targets needs targets of the outputs' "
                f"shape {tuple(outputs.shape)}, got {tuple(targets.shape)}"
            )
        probs = targets.detach().to(outputs)
        if (probs < 0).any():
            raise ValueError(
                "CrossEntropyLoss with negative target probabilities has a Hessian that is not "
                "positive semi-definite; its square root does not exist."
            )
        smoothed = (1 - smoothing) * probs + smoothing / num_classes
        weight_view = weight.reshape(num_classes, *([1] * (outputs.dim() - 2)))
        factor = (smoothed * weight_view).sum(dim=1)
        total = torch.tensor(factor.numel(), dtype=outputs.dtype, device=outputs.device)
        return factor, total

    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(
            f"CrossEntropyLoss targets must be class indices (an integer tensor) or class "
            f"probabilities (a floating tensor), got dtype {targets.dtype}"
        )
    if targets.shape != position_shape:
        raise ValueError(
            f"CrossEntropyLoss with class-index targets needs targets of shape "
            f"{tuple(position_shape)} for outputs of shape {tuple(outputs.shape)}, got "
            f"{tuple(targets.shape)}"
        )
    targets = targets.detach().to(device=outputs.device, dtype=torch.int64)
    kept = targets != loss_fn.ignore_index
    if ((targets < 0) | (targets >= num_classes))[kept].any():
        raise ValueError(
            f"CrossEntropyLoss targets must be class indices in [0, {num_classes}) or "
            f"ignore_index={loss_fn.ignore_index}"
        )
    target_weight = torch.where(kept, weight[targets.where(kept, 0)], 0)
    factor = (1 - smoothing) * target_weight + (smoothing / num_classes) * weight.sum() * kept
    return factor, target_weight.sum()


def _cross_entropy_scale(loss_fn: nn.CrossEntropyLoss, outputs: Tensor, targets: Any) -> Tensor:
    """Per-position ``a * r``, the Hessian scale with the reduction folded in: ``[N, d...]``."""
    factor, total = _cross_entropy_factor(loss_fn, outputs, targets)
    if loss_fn.reduction == "sum":
        return factor
    # All targets ignored: torch's mean is 0/0 = nan. Zero curvature lets such a batch, weighted by
    # its normalization() of 0, contribute nothing when batches are combined.
    return factor / total if total > 0 else torch.zeros_like(factor)


def _class_last(outputs: Tensor) -> Tensor:
    """Softmax probabilities with the class axis last and positions flattened: ``[N, P, C]``."""
    prob = torch.softmax(outputs, dim=1).movedim(1, -1)
    return prob.reshape(outputs.shape[0], -1, outputs.shape[1])


def _categorical_draws(prob: Tensor, draws: int, generator: torch.Generator | None) -> Tensor:
    r"""``draws`` classes per row and position of ``prob`` ``[R, C, P]`` (classes on axis 1).

    Returns the class indices, ``[R, P, draws]``. Two-level inverse-CDF sampling: a block of
    :math:`W \approx \sqrt C` classes is drawn from the blocks' masses, then a class within
    it. Both searches run in cumulative sums of about :math:`\sqrt C` entries, so the cost is
    one pass of summing over ``prob`` in its own layout (a cumulative sum over all :math:`C`
    classes cost as much as the softmax, ``torch.multinomial`` a third of a Monte-Carlo
    diagonal at a vocabulary of 8192, and moving the classes last copies the probabilities).
    """
    rows, classes, positions = prob.shape
    width = max(1, math.isqrt(classes))
    full = classes // width
    mass = prob[:, : full * width].reshape(rows, full, width, positions).sum(2)
    if full * width < classes:
        mass = torch.cat([mass, prob[:, full * width :].sum(1, keepdim=True)], dim=1)
    mass = mass.transpose(1, 2).contiguous()  # [R, P, blocks]: small
    cumulative = mass.cumsum(-1)
    uniform = torch.rand(
        rows, positions, draws, dtype=prob.dtype, device=prob.device, generator=generator
    )
    uniform = uniform * cumulative[..., -1:]
    block = torch.searchsorted(cumulative, uniform, right=True).clamp_max(mass.shape[-1] - 1)
    below = cumulative.gather(2, block) - mass.gather(2, block)
    members = block.unsqueeze(-1) * width + torch.arange(width, device=prob.device)
    picked = members.clamp_max(classes - 1).reshape(rows, positions, -1).transpose(1, 2)
    within = prob.gather(1, picked).transpose(1, 2).reshape(rows, positions, draws, width)
    within = within.masked_fill(members >= classes, 0).cumsum(-1)
    offset = torch.searchsorted(within, (uniform - below).unsqueeze(-1), right=True)
    return (block * width + offset.squeeze(-1).clamp_max(width - 1)).clamp_max(classes - 1)


def _cross_entropy_mc_sqrt(
    outputs: Tensor, scale: Tensor, mc_samples: int, generator: torch.Generator | None
) -> Tensor:
    num_samples, num_classes = outputs.shape[:2]
    # [N, C, P] in the outputs' own layout: the classes need not be moved last.
    prob = torch.softmax(outputs, dim=1).reshape(num_samples, num_classes, -1)
    sampled = _categorical_draws(prob, mc_samples, generator)  # [N, P, M]
    root = (scale.reshape(num_samples, 1, -1) / mc_samples).sqrt()
    # The columns root * (p - e_sampled), written into one buffer without a one-hot tensor;
    # the probabilities are a fresh tensor, no longer needed once drawn from.
    columns = prob.mul_(root).expand(mc_samples, -1, -1, -1).contiguous()
    columns.scatter_add_(
        2, sampled.permute(2, 0, 1).unsqueeze(2), (-root).expand(mc_samples, -1, -1, -1)
    )
    return columns.reshape(mc_samples, *outputs.shape)


def _cross_entropy_sqrt(outputs: Tensor, scale: Tensor, columns: slice | None) -> Tensor:
    r"""Exact columns ``k = c P + j``: :math:`\sqrt{a r p_c} (e_c - p)` at position ``j`` only.

    Only the selected columns are built: memory ``len(columns) * outputs.numel()``.
    """
    num_samples, num_classes = outputs.shape[:2]
    prob = _class_last(outputs)  # [N, P, C]
    num_positions = prob.shape[1]
    scale = scale.reshape(num_samples, num_positions)
    chosen = torch.arange(num_classes * num_positions, device=outputs.device)
    chosen = chosen[columns or slice(None)]
    classes, positions = chosen // num_positions, chosen % num_positions
    local = prob[:, positions].transpose(0, 1)  # [K, N, C]: p at each column's position
    picked = local.gather(2, classes.reshape(-1, 1, 1).expand(-1, num_samples, 1))  # p_c
    root = (scale[:, positions].t().unsqueeze(-1) * picked).sqrt()  # [K, N, 1]
    local = -local * root
    local.scatter_add_(2, classes.reshape(-1, 1, 1).expand(-1, num_samples, 1), root)
    sqrt = outputs.new_zeros(len(chosen), num_samples, num_positions, num_classes)
    sqrt[torch.arange(len(chosen), device=outputs.device), :, positions] = local
    return sqrt.movedim(-1, 2).reshape(len(chosen), *outputs.shape)


# ---------------------------------------------------------------------------------------------
# any other loss


def scalar_loss(loss_fn: LossFunction, outputs: Tensor, targets: Any) -> Tensor:
    """Evaluate ``loss_fn`` and refuse anything but one number, the batch loss.

    Args:
        loss_fn: The loss ``loss_fn(outputs, targets)``.
        outputs: The model's outputs.
        targets: The targets.

    Returns:
        The loss as a 0-dim tensor.

    Raises:
        ValueError: If the loss is not a tensor with one entry (``reduction='none'``, a loss
            that returns per-sample terms).
    """
    loss = loss_fn(outputs, targets)
    per_term = getattr(loss_fn, "reduction", None) not in (None, "mean", "sum")
    if not isinstance(loss, Tensor) or loss.numel() != 1 or per_term:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            "loss_fn must return the scalar batch loss, a scalar tensor (reduction 'mean' or "
            f"'sum'), got {shape}"
        )
    return loss.reshape(())


def _per_sample_hessians(loss_fn: LossFunction, outputs: Tensor, targets: Any) -> Tensor:
    """Blocks ``d^2 L / d f_n^2``, shape ``[N, D, D]``, from ``D`` batched Hessian-vector products.

    Because sample ``n``'s term depends on ``f_n`` only, the product of the full Hessian with the
    vector that is ``e_d`` in every sample is ``H_n e_d`` in every sample.
    """
    num_samples = outputs.shape[0]
    dim = math.prod(outputs.shape[1:])
    with torch.enable_grad():
        outputs = outputs.detach().requires_grad_(True)
        loss = scalar_loss(loss_fn, outputs, targets)
        if loss.grad_fn is None:
            return outputs.new_zeros(num_samples, dim, dim)
        (grad,) = torch.autograd.grad(loss, outputs, create_graph=True)
        if grad.grad_fn is None:  # the loss is piecewise linear in the outputs
            return outputs.new_zeros(num_samples, dim, dim)
        if couples_items(
            lambda v: torch.autograd.grad(grad, outputs, v, retain_graph=True)[0], outputs
        ):
            raise ValueError(
                "loss_fn couples samples: its Hessian with respect to the outputs links the "
                "outputs of different samples (a product along sample 0 reaches the others), so "
                "the GGN is not a sum of per-sample terms. curvkit needs a loss that sums or "
                "averages independent per-sample terms, such as `((outputs - targets) ** 2)"
                ".sum()`; sums over the batch inside a square are not."
            )
        eye = torch.eye(dim, dtype=outputs.dtype, device=outputs.device)
        directions = eye.unsqueeze(1).expand(dim, num_samples, dim).reshape(dim, *outputs.shape)
        (products,) = batched_grad(grad, [outputs], [directions])
    hessians = products.detach().reshape(dim, num_samples, dim).transpose(0, 1)
    return (hessians + hessians.transpose(1, 2)) / 2


def _generic_product(
    loss_fn: LossFunction, outputs: Tensor, targets: Any, vectors: Tensor
) -> Tensor:
    """``H u`` by differentiating the gradient along ``u`` (all leading axes batched)."""
    with torch.enable_grad():
        leaf = outputs.detach().requires_grad_(True)
        loss = scalar_loss(loss_fn, leaf, targets)
        if loss.grad_fn is None:
            return torch.zeros_like(vectors)
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
        if grad.grad_fn is None:  # the loss is piecewise linear in the outputs
            return torch.zeros_like(vectors)
        (products,) = batched_grad(grad, [leaf], [vectors.reshape(-1, *outputs.shape)])
    return products.detach().reshape(vectors.shape)


def _generic_sqrt(
    loss_fn: LossFunction,
    outputs: Tensor,
    targets: Any,
    mc_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    hessians = _per_sample_hessians(loss_fn, outputs, targets)
    eigenvalues, eigenvectors = torch.linalg.eigh(hessians)
    dim = hessians.shape[-1]
    # eigh's backward error on a positive semi-definite matrix is ~ dim * eps * |H|
    tolerance = 10 * dim * torch.finfo(outputs.dtype).eps * eigenvalues.abs().amax()
    most_negative = eigenvalues.amin()
    if most_negative < -tolerance:
        warnings.warn(
            f"The loss is not convex in the outputs: its per-sample output Hessians have negative "
            f"eigenvalues (down to {most_negative.item():.3g}); they are clamped to zero, so the "
            f"square root gives the nearest positive semi-definite Hessian, not the Hessian.",
            RuntimeWarning,
            stacklevel=3,
        )
    sqrt = eigenvectors * eigenvalues.clamp(min=0).sqrt().unsqueeze(1)  # [N, D(entry), D(column)]
    if mc_samples > 0:
        sketch = torch.randn(
            dim, mc_samples, generator=generator, dtype=outputs.dtype, device=outputs.device
        )
        sqrt = sqrt @ sketch.div_(math.sqrt(mc_samples))
    return sqrt.permute(2, 0, 1).reshape(sqrt.shape[-1], *outputs.shape)


def _probe_reduction(loss_fn: LossFunction, outputs: Tensor, targets: Any) -> str:
    """Tell ``"sum"`` from ``"mean"`` by comparing the batch loss with its single-sample losses.

    A batch of one is duplicated first: a sum doubles, a mean does not.
    """
    num_samples = outputs.shape[0]
    if not isinstance(targets, Tensor) or targets.dim() == 0 or targets.shape[0] != num_samples:
        raise ValueError(
            f"curvkit tells sum from mean by evaluating the loss on single samples, which needs "
            f"targets as a tensor with the outputs' batch size {num_samples} first"
        )
    if num_samples == 1:
        outputs, targets = (
            outputs.expand(2, *outputs.shape[1:]),
            targets.expand(2, *targets.shape[1:]),
        )
        num_samples = 2
    with torch.no_grad():
        batch = scalar_loss(loss_fn, outputs, targets).to(outputs.dtype)
        singles = torch.stack(
            [
                scalar_loss(loss_fn, outputs[n : n + 1], targets[n : n + 1])
                for n in range(num_samples)
            ]
        ).to(outputs.dtype)
    scale = singles.abs().sum()
    if scale == 0:
        raise ValueError(
            "curvkit cannot tell whether the loss sums or averages over samples: every "
            "single-sample loss is zero. Evaluate it on a batch with a nonzero loss."
        )
    tolerance = math.sqrt(torch.finfo(outputs.dtype).eps) * scale
    total = singles.sum()
    if (batch - total).abs() <= tolerance:
        return "sum"
    if (batch * num_samples - total).abs() <= tolerance:
        return "mean"
    raise ValueError(
        f"The batch loss ({batch.item():.6g}) is neither the sum ({total.item():.6g}) nor the mean "
        f"({(total / num_samples).item():.6g}) of the losses of its single samples, so batches "
        f"cannot be combined exactly. curvkit needs a loss that sums or averages per-sample "
        f"terms; for a mean weighted by class (cross-entropy with class weights) pass "
        f"`nn.CrossEntropyLoss(weight=...)`, whose normalisation curvkit knows."
    )
