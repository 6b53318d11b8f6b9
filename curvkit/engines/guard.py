r"""How curvkit runs a model: eagerly, without the user's backward hooks, without side effects.

Every forward pass curvkit makes goes through :func:`model_guard` (the engine's recorded passes,
its probe passes and :mod:`curvkit.engines.autodiff`'s products), which, for the duration of the
pass only, and restoring everything on exit, also when an error is raised:

- **runs compiled models eagerly**: ``torch.compile(model)`` and ``model.compile()`` (and compiled
  submodules) run their original Python code, since the engine's hooks and
  :func:`torch.func.vmap` need it; the results are those of the uncompiled model, and the
  compiled code is kept for the user's own calls;
- **leaves the user's backward hooks out**: module backward hooks and backward pre-hooks
  (``register_full_backward_hook``, ``register_backward_hook``, the global ones of
  :mod:`torch.nn.modules.module`) never fire in curvkit's backward passes, which push columns of
  the loss Hessian's square root (batched under :func:`torch.func.vmap`), not the user's
  gradient. (Hooks a user's forward hook puts on tensors do fire.)
- **runs the user's forward hooks once per pass over the data**: forward pre-hooks and forward
  hooks (module and global) are part of the model's function and run in every forward pass over
  a batch, as in ``model(inputs)``: once per batch (with ``sample_chunk_size``, once on the
  whole batch and once per chunk; a pass that changes recorded tensors in place runs twice;
  :func:`curvkit.ggn_vector_product` runs two passes per batch, one for :math:`J u` in forward
  mode and the one it differentiates). The
  engine's extra checking passes (:func:`curvkit.engines.safety.probe_first_sample`) run
  without them, unless the model's outputs differ without them;
- **refuses side effects on buffers**: a module in training mode that updates a buffer in its
  forward pass (``spectral_norm``'s power iteration, running statistics) gets the buffer
  restored and an error that names it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.modules.module as torch_module
from torch import nn

__all__ = ["check_autograd", "has_forward_hooks", "model_guard"]

_BACKWARD_HOOKS = ("_backward_hooks", "_backward_pre_hooks")
_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")


def check_autograd() -> None:
    """Raise inside ``torch.inference_mode()``, where autograd, and so curvkit, cannot work.

    Raises:
        RuntimeError: Saying to call curvkit outside it.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "curvkit needs autograd, which torch.inference_mode() turns off; call curvkit "
            "outside `with torch.inference_mode():`"
        )


def _eager() -> Any:
    # torch.compiler.set_stance exists from torch 2.6; before, dynamo's `disable` flag does it.
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None:
        return set_stance("force_eager")
    return torch._dynamo.config.patch(disable=True)


@contextmanager
def _without_hooks(model: nn.Module, names: tuple[str, ...]) -> Iterator[None]:
    """Swap the hook dicts ``names`` of every module (and the global ones) for empty ones."""
    saved: list[tuple[nn.Module, str, Any]] = []
    global_saved: list[tuple[OrderedDict, list[tuple[int, Any]]]] = []
    try:
        for module in model.modules():
            for name in names:
                hooks = module.__dict__[name]
                if hooks:
                    saved.append((module, name, hooks))
                    module.__dict__[name] = OrderedDict()
        for name in names:
            hooks = getattr(torch_module, "_global" + name)
            if hooks:
                global_saved.append((hooks, list(hooks.items())))
                hooks.clear()
        yield
    finally:
        for module, name, hooks in saved:
            module.__dict__[name] = hooks
        for hooks, items in global_saved:
            hooks.clear()
            hooks.update(items)


def has_forward_hooks(model: nn.Module) -> bool:
    """Whether the user put forward hooks on ``model``'s modules (or global ones)."""
    return any(getattr(torch_module, "_global" + name) for name in _FORWARD_HOOKS) or any(
        module.__dict__[name] for module in model.modules() for name in _FORWARD_HOOKS
    )


@contextmanager
def _buffers_unchanged(model: nn.Module) -> Iterator[None]:
    """Restore, and refuse, buffers that training-mode modules change during the pass."""
    saved = [
        (f"{name}.{buffer_name}" if name else buffer_name, buffer, buffer._version, buffer.clone())
        for name, module in model.named_modules()
        if module.training
        for buffer_name, buffer in module.named_buffers(recurse=False)
        if buffer is not None
    ]
    try:
        yield
    finally:
        changed = [name for name, buffer, version, _ in saved if buffer._version != version]
        with torch.no_grad():
            for _, buffer, version, copy in saved:
                if buffer._version != version:
                    buffer.copy_(copy)
    if changed:
        raise ValueError(
            f"the model's forward pass in training mode updates the buffer `{changed[0]}` "
            "(spectral_norm's power iteration, running statistics), so each call would change "
            "the model and its curvature; curvkit restored it. Call `model.eval()` first."
        )


@contextmanager
def model_guard(model: nn.Module, *, forward_hooks: bool = True) -> Iterator[None]:
    """Run ``model`` as curvkit needs it for the duration of the block (module docstring).

    Args:
        model: The user's model; left as it was on exit, also when an error is raised.
        forward_hooks: Whether the user's forward hooks run (``False`` for checking passes).

    Raises:
        RuntimeError: Inside ``torch.inference_mode()``.
        ValueError: If a training-mode module updated a buffer (restored first).
    """
    check_autograd()
    names = _BACKWARD_HOOKS if forward_hooks else _BACKWARD_HOOKS + _FORWARD_HOOKS
    with _eager(), _without_hooks(model, names), _buffers_unchanged(model):
        yield
