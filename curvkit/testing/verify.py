r"""Plain-autograd references for curvature quantities, and reports comparing results to them.

Every reference here is built from ``torch.autograd.grad`` alone, independently of curvkit's
engines and loss square roots, so that it can judge them. The references follow the definitions
literally and cost :math:`D` autograd passes for :math:`D` parameters (and
:math:`N C` for an output Hessian): meant for tests, notebooks and ``curvkit verify`` on small
models, not for training.

Conventions shared by all references:

- ``inputs`` is a tensor, a tuple of tensors (``model(*inputs)``) or a dict of keyword inputs
  (``model(**inputs)``), with the samples along the leading dimension; a model returning a
  ``ModelOutput`` is read through its ``logits`` (:mod:`curvkit.core.model_io`);
  ``loss_fn(outputs, targets)`` returns the scalar batch loss, with its reduction.
- ``params=None`` means every parameter of ``model`` that requires grad, in ``model.parameters()``
  order. Dense matrices are over the concatenation of the flattened parameters, in that order.
- The model is called as it is (its train/eval mode is not changed; call ``model.eval()`` for models
  with dropout or batch normalisation); no reference writes to the model, its parameters or their
  ``.grad``.

Where the products are vectorised (``is_grads_batched=True``), an operation without a batching
rule (e.g. a custom ``torch.autograd.Function`` without ``vmap`` support) makes the reference fall
back to a plain loop over the vectors, which computes the same numbers.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvkit.core.model_io import Inputs, call_model, output_tensor
from curvkit.losses import scalar_loss

__all__ = [
    "ComparisonReport",
    "ComparisonRow",
    "compare",
    "reference_diag_ggn",
    "reference_factor_columns",
    "reference_ggn",
    "reference_hessian",
    "reference_output_hessian",
    "reference_per_sample_gradients",
]

LossFunction = Callable[[Tensor, Any], Tensor]

# Vectors pushed through one vectorised autograd call: bounds memory at
# ``_CHUNK_SIZE`` times that of a single backward pass.
_CHUNK_SIZE = 128


def reference_ggn(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Inputs,
    targets: Any,
    params: Iterable[Tensor] | None = None,
) -> Tensor:
    r"""Dense generalised Gauss-Newton matrix from GGN-vector products with unit vectors.

    With :math:`f` the model outputs on the whole batch, :math:`J = \partial f / \partial \theta`
    and :math:`H = \partial^2 L / \partial f^2` the Hessian of the batch loss with respect to the
    outputs, column :math:`i` of :math:`G = J^\top H J` is computed as

    .. math::

        u = J e_i \ \text{(double-vjp trick)}, \qquad
        w = H u \ \text{(double backward of } L\text{)}, \qquad
        G e_i = J^\top w \ \text{(vjp)}.

    Args:
        model: The network; ``model(inputs)`` gives the outputs.
        loss_fn: ``loss_fn(outputs, targets)``, the scalar batch loss.
        inputs: A tensor or a tuple of tensors (passed as ``model(*inputs)``).
        targets: Passed to ``loss_fn`` as they are.
        params: The parameters :math:`\theta`; ``None`` for all that require grad.

    Returns:
        :math:`G`, shape ``[D, D]`` with :math:`D` the total number of parameter entries.

    Raises:
        TypeError: If ``params`` is a single tensor or holds a non-tensor.
        ValueError: If a parameter is not in ``model``, does not require grad or is listed twice,
            or if ``loss_fn`` does not return a scalar.
    """
    params = _resolve_params(model, params)
    return _ggn(model, loss_fn, inputs, targets, params)


def reference_diag_ggn(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Inputs,
    targets: Any,
    params: Iterable[Tensor] | None = None,
) -> list[Tensor]:
    """Diagonal of the dense reference GGN, one tensor per parameter, shaped like it.

    Args:
        model: The network; ``model(inputs)`` gives the outputs.
        loss_fn: ``loss_fn(outputs, targets)``, the scalar batch loss.
        inputs: A tensor or a tuple of tensors (passed as ``model(*inputs)``).
        targets: Passed to ``loss_fn`` as they are.
        params: The parameters; ``None`` for all that require grad.

    Returns:
        The GGN diagonal, as a list of tensors shaped like ``params``.

    Raises:
        TypeError: If ``params`` is a single tensor or holds a non-tensor.
        ValueError: As :func:`reference_ggn`.
    """
    params = _resolve_params(model, params)
    return _unflatten(_ggn(model, loss_fn, inputs, targets, params).diagonal(), params)


def reference_hessian(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Inputs,
    targets: Any,
    params: Iterable[Tensor] | None = None,
) -> Tensor:
    r"""Dense Hessian of the batch loss with respect to the parameters.

    Row :math:`i` is :math:`\partial (e_i^\top \nabla_\theta L) / \partial \theta`, a
    Hessian-vector product by double backward.

    Args:
        model: The network; ``model(inputs)`` gives the outputs.
        loss_fn: ``loss_fn(outputs, targets)``, the scalar batch loss.
        inputs: A tensor or a tuple of tensors (passed as ``model(*inputs)``).
        targets: Passed to ``loss_fn`` as they are.
        params: The parameters; ``None`` for all that require grad.

    Returns:
        :math:`\nabla^2_\theta L`, shape ``[D, D]``.

    Raises:
        TypeError: If ``params`` is a single tensor or holds a non-tensor.
        ValueError: As :func:`reference_ggn`.
    """
    params = _resolve_params(model, params)
    loss = scalar_loss(loss_fn, _forward(model, inputs), targets)
    gradient = _flatten(_grads(loss, params, create_graph=True))
    return _unit_vector_products(gradient, params)


def reference_per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Inputs,
    targets: Tensor,
    params: Iterable[Tensor] | None = None,
) -> list[Tensor]:
    """Gradients of ``loss_fn`` on each sample alone (a batch of one), by a loop over the samples.

    For a ``mean`` reduction this is the gradient of the sample's own (mean-reduced) loss, not its
    share :math:`1/N` of the batch loss's gradient; a sample whose loss is undefined alone (an
    ignored target of ``CrossEntropyLoss(reduction="mean")``: 0/0) gets NaN, as ``loss_fn`` does.

    Args:
        model: The network; ``model(inputs)`` gives the outputs.
        loss_fn: ``loss_fn(outputs, targets)``, the scalar batch loss.
        inputs: A tensor or a tuple of tensors with the samples along dimension 0.
        targets: A tensor with the samples along dimension 0.
        params: The parameters; ``None`` for all that require grad.

    Returns:
        One tensor per parameter, shape ``[N, *p.shape]``.

    Raises:
        TypeError: If ``params`` is a single tensor or holds a non-tensor, or ``targets`` is not a
            tensor.
        ValueError: As :func:`reference_ggn`, or if inputs and targets disagree on the number of
            samples.
    """
    params = _resolve_params(model, params)
    num_samples = _num_samples(inputs, targets)
    per_sample: list[list[Tensor]] = [[] for _ in params]
    for n in range(num_samples):
        sample = (
            tuple(x[n : n + 1] for x in inputs) if isinstance(inputs, tuple) else inputs[n : n + 1]
        )
        loss = scalar_loss(loss_fn, _forward(model, sample), targets[n : n + 1])
        for collected, grad in zip(per_sample, _grads(loss, params), strict=True):
            collected.append(grad)
    return [torch.stack(collected) for collected in per_sample]


def reference_output_hessian(loss_fn: LossFunction, outputs: Tensor, targets: Any) -> Tensor:
    r"""Per-sample blocks :math:`\partial^2 L / \partial f_n^2` of the batch loss's output Hessian.

    The full Hessian of :math:`L` with respect to all :math:`N C` output entries is built from
    :math:`N C` Hessian-vector products (double backward); its diagonal blocks are returned, and
    its off-diagonal blocks are checked to be zero (a loss that is a sum or mean of independent
    per-sample terms).

    Args:
        loss_fn: ``loss_fn(outputs, targets)``, the scalar batch loss.
        outputs: Model outputs ``[N, *out]`` (their graph, if any, is not used).
        targets: Passed to ``loss_fn`` as they are.

    Returns:
        Shape ``[N, *out, *out]``.

    Raises:
        ValueError: If ``outputs`` has no batch dimension, ``loss_fn`` does not return a scalar, or
            the loss couples different samples.
    """
    if outputs.dim() == 0:
        raise ValueError("outputs must have a leading batch dimension, got a 0-dim tensor")
    outputs = outputs.detach().requires_grad_()
    num_samples, out_shape = outputs.shape[0], outputs.shape[1:]
    out_numel = out_shape.numel()
    (loss_gradient,) = _grads(scalar_loss(loss_fn, outputs, targets), [outputs], create_graph=True)
    full = _unit_vector_products(loss_gradient.flatten(), [outputs])
    full = full.reshape(num_samples, out_numel, num_samples, out_numel)
    blocks = torch.einsum("nink->nik", full)

    off_diagonal = full.clone()
    off_diagonal[range(num_samples), :, range(num_samples), :] = 0
    scale = full.abs().max() if full.numel() else full.new_zeros(())
    tolerance = 100 * torch.finfo(full.dtype).eps * scale
    if off_diagonal.numel() and off_diagonal.abs().max() > tolerance:
        raise ValueError(
            "the loss couples different samples (its Hessian with respect to the outputs has "
            f"nonzero entries between samples, up to {off_diagonal.abs().max().item():.3g}): "
            "per-sample output Hessians exist only for a sum or mean of per-sample terms"
        )
    return blocks.reshape(num_samples, *out_shape, *out_shape)


def reference_factor_columns(
    model: nn.Module,
    inputs: Inputs,
    columns: Tensor,
    params: Iterable[Tensor] | None = None,
    *,
    create_graph: bool = False,
) -> list[Tensor]:
    r"""Columns :math:`J_n^\top c_{k,n}` of a square-root factor, one sample and column at a time.

    :math:`J_n = \partial f_n / \partial \theta` is the Jacobian of sample :math:`n`'s outputs,
    from a forward pass on that sample alone, and :math:`c_{k,n}` are output-space columns. With
    the columns of the loss Hessian's square root :math:`S_n`, these are the columns of the
    GGN's square-root factor :math:`V` (:math:`G = V V^\top`), per parameter: the reference for
    the factors of :func:`curvkit.engines.compute_factors`.

    Args:
        model: The network; ``model(inputs)`` gives the outputs.
        inputs: A tensor or a tuple of tensors with the samples along dimension 0.
        columns: The columns :math:`c_{k,n}`, shape ``[K, N, *out]`` for outputs ``[N, *out]``.
        params: The parameters; ``None`` for all that require grad.
        create_graph: Keep the graph of the result, to differentiate it further.

    Returns:
        One tensor per parameter, shape ``[K, N, *p.shape]``; zeros where a sample's outputs do
        not depend on the parameter.

    Raises:
        TypeError: If ``params`` is a single tensor or holds a non-tensor.
        ValueError: As :func:`reference_ggn`, or if a sample's outputs are not shaped like its
            columns.
    """
    params = _resolve_params(model, params)
    if columns.dim() < 2:
        raise ValueError(f"columns must be [K, N, *out], got shape {tuple(columns.shape)}")
    num_columns, num_samples = columns.shape[:2]
    per_param: list[list[Tensor]] = [[] for _ in params]
    for n in range(num_samples):
        sample = (
            tuple(x[n : n + 1] for x in inputs) if isinstance(inputs, tuple) else inputs[n : n + 1]
        )
        outputs = _forward(model, sample)
        if outputs.shape != (1, *columns.shape[2:]):
            raise ValueError(
                f"the outputs of one sample have shape {tuple(outputs.shape)}, the columns "
                f"[K, N, *out] {tuple(columns.shape)}: expected [1, *out]"
            )
        for k in range(num_columns):
            grads = torch.autograd.grad(
                outputs,
                params,
                columns[k, n : n + 1],
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
            for collected, grad, p in zip(per_param, grads, params, strict=True):
                collected.append(torch.zeros_like(p) if grad is None else grad)
    return [
        torch.stack(collected).reshape(num_samples, num_columns, *p.shape).transpose(0, 1)
        for collected, p in zip(per_param, params, strict=True)
    ]


@dataclass(frozen=True)
class ComparisonRow:
    r"""The comparison of one tensor.

    Attributes:
        name: What the tensor is.
        shape: Its shape.
        max_abs_error: :math:`\max |a - e|`.
        max_rel_error: :math:`\max |a - e| / \max |e|` (0 if both are 0, ``inf`` if only
            :math:`\max |e|` is).
        passed: Whether :math:`|a - e| \le \text{atol} + \text{rtol} |e|` holds elementwise.
    """

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    passed: bool


_HEADERS = ("name", "shape", "max abs error", "max rel error", "result")


@dataclass(frozen=True)
class ComparisonReport:
    """Result of :func:`compare`: one row per tensor, a table in a terminal and in a notebook.

    A report has no truth value (``if report:`` raises), so that ``assert compare(...)`` cannot
    pass by mistake: use :attr:`passed` or :meth:`assert_passed`.

    Attributes:
        rows: One :class:`ComparisonRow` per tensor, in the order given.
        rtol: The relative tolerance.
        atol: The absolute tolerance.
    """

    rows: tuple[ComparisonRow, ...]
    rtol: float
    atol: float

    @property
    def passed(self) -> bool:
        """Whether every tensor passed."""
        return all(row.passed for row in self.rows)

    def assert_passed(self) -> None:
        """Raise if any tensor failed.

        Raises:
            AssertionError: With the report's table as message, if any tensor failed.
        """
        if not self.passed:
            raise AssertionError("\n" + str(self))

    def __bool__(self) -> bool:
        raise TypeError(
            "a ComparisonReport has no truth value: use report.passed or report.assert_passed()"
        )

    def _cells(self) -> list[tuple[str, ...]]:
        return [
            (
                row.name,
                str(row.shape),
                f"{row.max_abs_error:.3e}",
                f"{row.max_rel_error:.3e}",
                "pass" if row.passed else "FAIL",
            )
            for row in self.rows
        ]

    def _summary(self) -> tuple[str, str]:
        num_passed = sum(row.passed for row in self.rows)
        return (
            f"{num_passed}/{len(self.rows)} passed with rtol={self.rtol:g}, atol={self.atol:g}",
            "pass: |actual - expected| <= atol + rtol * |expected| elementwise; "
            "rel error = max|actual - expected| / max|expected|",
        )

    def __str__(self) -> str:
        table = [_HEADERS, *self._cells()]
        widths = [max(len(line[i]) for line in table) for i in range(len(_HEADERS))]
        # Text columns read best left-aligned, numbers right-aligned.
        align = ("<", "<", ">", ">", "<")

        def render(line: tuple[str, ...]) -> str:
            return "  ".join(
                f"{cell:{a}{w}}" for cell, a, w in zip(line, align, widths, strict=True)
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([render(_HEADERS), rule, *map(render, table[1:]), *self._summary()])

    def _repr_html_(self) -> str:
        header = "".join(f"<th>{html.escape(h)}</th>" for h in _HEADERS)
        body = []
        for row, cells in zip(self.rows, self._cells(), strict=True):
            colour = "#1a7f37" if row.passed else "#cf222e"
            tds = [f"<td>{html.escape(c)}</td>" for c in cells[:-1]]
            tds.append(f'<td style="color: {colour}"><b>{cells[-1]}</b></td>')
            body.append("<tr>" + "".join(tds) + "</tr>")
        return (
            "<table>"
            f"<thead><tr>{header}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody>"
            "<caption style='caption-side: bottom'>"
            f"{'<br>'.join(html.escape(line) for line in self._summary())}</caption>"
            "</table>"
        )


def compare(
    actual: Tensor | Sequence[Any] | Mapping[str, Any],
    expected: Tensor | Sequence[Any] | Mapping[str, Any],
    *,
    rtol: float = 1e-7,
    atol: float = 1e-12,
    names: Sequence[str] | None = None,
) -> ComparisonReport:
    r"""Compare tensors, or (nested) lists, tuples or dicts of tensors, with their expected values.

    A tensor passes if :math:`|a - e| \le \text{atol} + \text{rtol}\,|e|` holds elementwise (the
    rule of ``torch.allclose``; NaN never passes). Errors are computed in float64 on the device of
    ``expected``. The relative error reported is :math:`\max |a - e| / \max |e|`, relative to the
    largest expected entry, so that entries that are zero in exact arithmetic do not produce huge
    ratios.

    Args:
        actual: The values to check.
        expected: The reference values, with the same structure and shapes.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        names: One name per tensor, in flattened order; default: the tensor's key in a dict
            (named results, ``{"0.weight": ...}`` as from ``model.named_parameters()``, label
            their rows by name) or its position (``"0"``, ``"1.2"`` for nested lists,
            ``"tensor"`` for a single tensor).

    Returns:
        The report, one row per tensor.

    Raises:
        TypeError: If a leaf is not a tensor, or the two structures differ.
        ValueError: If shapes differ, ``names`` has the wrong length, or a tolerance is negative.
    """
    if rtol < 0 or atol < 0:
        raise ValueError(f"tolerances must be non-negative, got rtol={rtol}, atol={atol}")
    pairs = _flatten_pairs(actual, expected, "")
    if names is not None:
        names = list(names)
        if len(names) != len(pairs):
            raise ValueError(f"got {len(names)} names for {len(pairs)} tensors: give one each")
    rows = []
    for i, (position, a, e) in enumerate(pairs):
        name = names[i] if names is not None else (position or "tensor")
        if a.shape != e.shape:
            raise ValueError(
                f"shape mismatch for {name!r}: actual has shape {tuple(a.shape)}, expected "
                f"{tuple(e.shape)}"
            )
        rows.append(_compare_one(name, a, e, rtol, atol))
    return ComparisonReport(rows=tuple(rows), rtol=rtol, atol=atol)


def _compare_one(
    name: str, actual: Tensor, expected: Tensor, rtol: float, atol: float
) -> ComparisonRow:
    expected = expected.detach().to(torch.float64)
    actual = actual.detach().to(device=expected.device, dtype=torch.float64)
    error = (actual - expected).abs()
    if error.numel() == 0:
        return ComparisonRow(name, tuple(expected.shape), 0.0, 0.0, True)
    max_abs = error.max().item()
    scale = expected.abs().max().item()
    if scale > 0:
        max_rel = max_abs / scale
    else:
        max_rel = 0.0 if max_abs == 0 else float("inf")
    passed = bool((error <= atol + rtol * expected.abs()).all())
    return ComparisonRow(name, tuple(expected.shape), max_abs, max_rel, passed)


def _flatten_pairs(actual: Any, expected: Any, position: str) -> list[tuple[str, Tensor, Tensor]]:
    if isinstance(expected, Tensor):
        if not isinstance(actual, Tensor):
            raise TypeError(
                f"at {position or 'top level'}: expected a tensor, actual is a "
                f"{type(actual).__name__}"
            )
        return [(position, actual, expected)]
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping) or list(actual) != list(expected):
            found = list(actual) if isinstance(actual, Mapping) else f"a {type(actual).__name__}"
            raise TypeError(
                f"at {position or 'top level'}: expected a mapping with the keys "
                f"{list(expected)}, actual is {found}"
            )
        pairs = []
        for key, e in expected.items():
            label = f"{position}.{key}" if position else str(key)
            pairs.extend(_flatten_pairs(actual[key], e, label))
        return pairs
    if not isinstance(expected, list | tuple):
        raise TypeError(
            f"at {position or 'top level'}: expected values must be tensors or lists, tuples "
            f"or dicts of them, got a {type(expected).__name__}"
        )
    if not isinstance(actual, list | tuple) or len(actual) != len(expected):
        found = (
            f"a sequence of length {len(actual)}"
            if isinstance(actual, list | tuple)
            else f"a {type(actual).__name__}"
        )
        raise TypeError(
            f"at {position or 'top level'}: expected a sequence of length {len(expected)}, "
            f"actual is {found}"
        )
    pairs = []
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        pairs.extend(_flatten_pairs(a, e, f"{position}.{i}" if position else str(i)))
    return pairs


def _resolve_params(model: nn.Module, params: Iterable[Tensor] | None) -> list[Tensor]:
    if params is None:
        resolved = [p for p in model.parameters() if p.requires_grad]
        if not resolved:
            raise ValueError("the model has no parameters that require grad: nothing to compute")
        return resolved
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors: wrap a single tensor in a list")
    resolved = list(params)
    if not resolved:
        raise ValueError("params is empty: pass some of the model's parameters, or None for all")
    in_model = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    for i, p in enumerate(resolved):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
        if id(p) not in in_model:
            raise ValueError(f"params[{i}] is not a parameter of the model")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad")
        if id(p) in seen:
            raise ValueError(f"params[{i}] is listed twice: list each parameter once")
        seen.add(id(p))
    return resolved


def _forward(model: nn.Module, inputs: Inputs) -> Tensor:
    # The references differentiate the model twice (the double-vjp trick, the Hessian), and
    # torch's fused CPU attention kernels have no double backward: the math kernel has.
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return output_tensor(call_model(model, inputs))
    except TypeError as error:
        raise ValueError(str(error)) from None


def _num_samples(inputs: Inputs, targets: Tensor) -> int:
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor to split into samples, got {type(targets)}")
    tensors = [*(inputs if isinstance(inputs, tuple) else (inputs,)), targets]
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "inputs and targets must share their leading (sample) dimension, got shapes "
            f"{[tuple(t.shape) for t in tensors]}"
        )
    return tensors[0].shape[0]


def _grads(
    output: Tensor,
    inputs: Sequence[Tensor],
    grad_output: Tensor | None = None,
    create_graph: bool = False,
) -> list[Tensor]:
    """Vector-Jacobian product (the gradient, for a scalar), zeros where there is no dependence."""
    grads = torch.autograd.grad(
        output,
        inputs,
        grad_output,
        create_graph=create_graph,
        retain_graph=create_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


def _vjps(output: Tensor, inputs: Sequence[Tensor], vectors: Tensor) -> list[Tensor]:
    """Vector-Jacobian products of ``output`` with each of ``vectors`` ``[B, *output.shape]``.

    Returns one tensor ``[B, *x.shape]`` per input ``x``; zeros where ``output`` does not depend
    on ``x``. The graph of ``output`` is kept for later calls.
    """
    batch = vectors.shape[0]
    if output.requires_grad:
        try:
            grads = torch.autograd.grad(
                output,
                inputs,
                vectors,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError:
            # Some operation has no batching rule: the plain loop computes the same products.
            looped = [
                torch.autograd.grad(output, inputs, v, retain_graph=True, allow_unused=True)
                for v in vectors
            ]
            grads = tuple(
                None if looped[0][i] is None else torch.stack([g[i] for g in looped])
                for i in range(len(inputs))
            )
    else:
        grads = (None,) * len(inputs)
    return [
        x.new_zeros((batch, *x.shape)) if g is None else g
        for g, x in zip(grads, inputs, strict=True)
    ]


def _unit_vector_products(output: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """Jacobian of the flat vector ``output`` w.r.t. ``inputs``, one row per output entry."""
    rows = []
    eye = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
    for chunk in eye.split(_CHUNK_SIZE):
        rows.append(_flatten(_vjps(output, inputs, chunk), batched=True))
    return torch.cat(rows)


def _ggn(
    model: nn.Module, loss_fn: LossFunction, inputs: Inputs, targets: Any, params: list[Tensor]
) -> Tensor:
    outputs = _forward(model, inputs)

    # H is the Hessian of the loss in the outputs alone: a graph of its own, cut from the model.
    loss_outputs = outputs.detach().requires_grad_()
    (loss_gradient,) = _grads(
        scalar_loss(loss_fn, loss_outputs, targets), [loss_outputs], create_graph=True
    )

    # J^T w is linear in w; differentiating it with respect to w gives J v (the double-vjp trick).
    dummy = torch.zeros_like(outputs, requires_grad=True)
    transposed_jacobian_dummy = _flatten(_grads(outputs, params, dummy, create_graph=True))

    eye = torch.eye(transposed_jacobian_dummy.numel(), dtype=outputs.dtype, device=outputs.device)
    columns = []
    for unit_vectors in eye.split(_CHUNK_SIZE):
        (jvp,) = _vjps(transposed_jacobian_dummy, [dummy], unit_vectors)
        (hjvp,) = _vjps(loss_gradient, [loss_outputs], jvp)
        columns.append(_flatten(_vjps(outputs, params, hjvp), batched=True))
    # Row i is G e_i, i.e. column i of the symmetric G.
    return torch.cat(columns)


def _flatten(tensors: Sequence[Tensor], batched: bool = False) -> Tensor:
    if batched:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    sizes = [p.numel() for p in like]
    return [chunk.reshape(p.shape) for chunk, p in zip(vector.split(sizes), like, strict=True)]
