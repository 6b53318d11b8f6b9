"""Finding a model's last layer without copying the model.

laplace-torch wraps a deep copy of the model in a ``FeatureExtractor`` and hooks it for good; here
the last layer is found by one forward pass with temporary hooks on the user's model (removed
afterwards, also on errors): the last leaf module to run, which must be a ``torch.nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curvkit.core.model_io import call_model
from curvkit.laplace.modes import eval_mode

__all__ = ["find_last_layer", "linear_layer"]


def linear_layer(model: nn.Module, name: str) -> nn.Linear:
    """The module ``name`` of ``model``, checked to be a Linear layer."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"the model has no module named {name!r} (last_layer_name)")
    if not isinstance(modules[name], nn.Linear):
        raise ValueError(
            f"Use model with a linear last layer: {name!r} is a {type(modules[name]).__name__}."
        )
    return modules[name]


def find_last_layer(model: nn.Module, call_model_on: nn.Module, inputs: Any) -> str:
    """The name of the last leaf module ``model`` runs on ``inputs``.

    Args:
        model: The user's model (its modules are searched).
        call_model_on: The module to call (the model, or a wrapper for dict inputs).
        inputs: One batch of inputs in curvkit's form.

    Returns:
        The qualified name of the last layer.

    Raises:
        ValueError: If the model has fewer than two modules or its last leaf is not Linear.
    """
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    if len(list(model.modules())) <= 1:
        raise ValueError("The model only has one module: wrap it, or pass last_layer_name.")
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, module in leaves
    ]
    try:
        with eval_mode(model), torch.no_grad():
            call_model(call_model_on, inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ValueError("no leaf module ran in the forward pass: pass last_layer_name")
    name = order[-1]
    linear_layer(model, name)
    return name
