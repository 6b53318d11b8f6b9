"""Dense references for influence scores, from plain autograd and explicit linear algebra.

Per-example gradients come from ``torch.func`` (``vmap`` over ``grad`` of one example's summed
loss); KFAC's factors from a forward hook's inputs and ``retain_grad`` output gradients of the
summed loss; every block is a dense matrix, damped and solved with ``torch.linalg.solve``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def per_example_gradients(
    model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor
) -> dict[str, Tensor]:
    """``{name: [N, *shape]}``: each example's gradient of ``loss`` on that example alone."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)


def layer_rows(
    model: nn.Module,
    loss: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    layer: nn.Linear,
) -> tuple[Tensor, Tensor]:
    """The layer's input rows (with a 1 appended for a bias) and output-gradient rows."""
    seen = {}

    def hook(module: nn.Module, args: tuple[Tensor], output: Tensor) -> None:
        seen["x"] = args[0].detach()
        output.retain_grad()
        seen["y"] = output

    handle = layer.register_forward_hook(hook)
    try:
        loss(model(inputs), targets).backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    x = seen["x"].reshape(-1, seen["x"].shape[-1])
    if layer.bias is not None:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    return x, seen["y"].grad.reshape(-1, layer.out_features)


def kron_layout(grads: dict[str, Tensor], layer_name: str, layer: nn.Linear) -> Tensor:
    """A Linear layer's per-example gradients as ``[N, O * (I + 1)]`` (bias as last column)."""
    weight = grads[f"{layer_name}.weight"]
    if layer.bias is None:
        return weight.flatten(1)
    bias = grads[f"{layer_name}.bias"].unsqueeze(-1)
    return torch.cat([weight, bias], dim=-1).flatten(1)


def kfac_block(x: Tensor, b: Tensor, per_example: Tensor, corrected: bool) -> tuple[Tensor, Tensor]:
    """``(C, eigenvalues)`` of a layer's KFAC (``corrected=False``) or EKFAC block, dense."""
    a = x.T @ x / x.shape[0]
    bb = b.T @ b / b.shape[0]
    la, qa = torch.linalg.eigh(a)
    lb, qb = torch.linalg.eigh(bb)
    q = torch.kron(qb, qa)
    if corrected:
        values = ((per_example @ q) ** 2).mean(0)
    else:
        values = torch.kron(lb, la)
    return q @ torch.diag(values) @ q.T, values


def damped_inverse(block: Tensor, values: Tensor, damping: float | None) -> Tensor:
    """``(C + d I)^{-1}`` with ``d = 0.1 * mean(values)`` for ``damping=None``."""
    d = 0.1 * values.mean() if damping is None else damping
    return torch.linalg.inv(block + d * torch.eye(block.shape[0], dtype=block.dtype))


def block_diagonal_scores(
    query: list[Tensor], train: list[Tensor], inverses: list[Tensor]
) -> Tensor:
    """``sum_b q_b P_b t_b^T`` for per-block gradients ``[n, D_b]`` and inverses ``P_b``."""
    return sum(q @ p @ t.T for q, t, p in zip(query, train, inverses, strict=True))


def flat_gradients(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    """``[N, D]``: the named parameters' per-example gradients side by side."""
    return torch.cat([grads[name].flatten(1) for name in names], dim=1)


def dense_ggn(
    model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor
) -> Tensor:
    """``sum_n J_n^T H_n J_n`` over all parameters (in ``named_parameters`` order), dense."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    total = None
    for x, y in zip(inputs, targets, strict=True):

        def outputs(p: dict[str, Tensor], x: Tensor = x) -> Tensor:
            return functional_call(model, p, (x.unsqueeze(0),)).flatten()

        out = outputs(params)
        jac = torch.func.jacrev(outputs)(params)
        j = torch.cat([jac[k].reshape(out.numel(), -1) for k in params], dim=1)
        shape = functional_call(model, params, (x.unsqueeze(0),)).shape

        def value(o: Tensor, y: Tensor = y, shape: torch.Size = shape) -> Tensor:
            return loss(o.reshape(shape), y.unsqueeze(0))

        h = torch.func.hessian(value)(out)
        term = j.T @ h @ j
        total = term if total is None else total + term
    return total
