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
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from curvkit.core.model_io import call_model

__all__ = [
    "check_autograd",
    "guarded_call",
    "has_forward_hooks",
    "model_guard",
    "model_state_key",
    "refuse_inference_tensors",
]

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


def refuse_inference_tensors(inputs: Any, params: list[Tensor]) -> None:
    """Raise if an input or a parameter was made inside ``torch.inference_mode()``.

    Such tensors have no version counter (which curvkit reads to notice in-place changes) and
    cannot be saved for a backward pass.

    Raises:
        ValueError: Naming the tensor and saying what to do.
    """
    leaves = pytree.tree_leaves(inputs)
    if any(isinstance(leaf, Tensor) and leaf.is_inference() for leaf in leaves):
        raise ValueError(
            "the inputs are inference tensors (made inside `torch.inference_mode()`), which "
            "autograd, and so curvkit, cannot differentiate through; make them outside "
            "`torch.inference_mode()`, or pass copies made outside it (`x.clone()`)"
        )
    for position, param in enumerate(params):
        if param.is_inference():
            raise ValueError(
                f"parameter {position} is an inference tensor (made inside "
                "`torch.inference_mode()`), which autograd, and so curvkit, cannot "
                "differentiate through; build or load the model outside "
                "`torch.inference_mode()`"
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


def _same_values(tensor: Tensor, copy: Tensor) -> bool:
    if tensor.is_floating_point() or tensor.is_complex():
        return torch.allclose(tensor, copy, rtol=0.0, atol=0.0, equal_nan=True)
    return torch.equal(tensor, copy)


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
        # BatchNorm's kernel updates its running statistics without bumping their versions.
        changed = [
            name
            for name, buffer, version, copy in saved
            if buffer._version != version or not _same_values(buffer, copy)
        ]
        with torch.no_grad():
            for _, buffer, _, copy in saved:
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


_PLAIN = (bool, int, float, str, type(None))


def _tensor_state(tensor: Tensor) -> tuple[Any, ...]:
    """What a cached verdict may depend on in a tensor: identity, version, layout, dtype."""
    return (
        id(tensor),
        tensor._version,
        tuple(tensor.shape),
        tensor.dtype,
        tensor.device,
        tensor.requires_grad,
    )


def _module_state(module: nn.Module) -> tuple[Any, ...]:
    state = module.__dict__
    return (
        id(module),
        type(module),
        module.training,
        id(state.get("forward")),
        tuple(
            (name, None if p is None else _tensor_state(p))
            for name, p in state["_parameters"].items()
        ),
        tuple(
            (name, None if b is None else _tensor_state(b)) for name, b in state["_buffers"].items()
        ),
        tuple(tuple(state[name]) for name in _FORWARD_HOOKS + _BACKWARD_HOOKS),
        # Plain settings (a dropout's p, a normalisation's eps) change the function too.
        tuple((key, value) for key, value in state.items() if isinstance(value, _PLAIN)),
    )


def model_state_key(model: nn.Module, inputs: Any, params: list[Tensor]) -> tuple[Any, ...] | None:
    """A key that changes whenever a model's forward pass on ``inputs`` may behave differently.

    It holds the module tree (each module's identity, class, training mode, an instance-level
    ``forward``, its plain settings such as a dropout's ``p``), every parameter's and buffer's
    identity, version counter (bumped by every in-place change, an optimizer's step included),
    shape, dtype, device and ``requires_grad``, the hooks of every module and the global ones,
    the requested parameters, the inputs' structure, shapes, dtypes and devices (their values
    are not part of it), and the global modes that change a forward pass (gradient mode,
    autocast, the default dtype). Verdicts of checks that depend only on these (a probe pass's
    sample axes, which calls change their inputs in place) can be cached under it.

    Returns:
        The key, or ``None`` when the state cannot be read (inference tensors have no version
        counter; an input leaf that is neither a tensor nor a plain value): nothing is cached.
    """
    leaves, spec = pytree.tree_flatten(inputs)
    if not all(isinstance(leaf, (Tensor, *_PLAIN)) for leaf in leaves):
        return None
    input_state = tuple(
        (tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad)
        if isinstance(leaf, Tensor)
        else (type(leaf), leaf)
        for leaf in leaves
    )
    try:
        return (
            tuple(_module_state(module) for module in model.modules()),
            tuple(id(p) for p in params),
            str(spec),
            input_state,
            tuple(
                tuple(getattr(torch_module, "_global" + name))
                for name in _FORWARD_HOOKS + _BACKWARD_HOOKS
            ),
            torch.is_grad_enabled(),
            torch.is_autocast_enabled(),
            torch.get_default_dtype(),
        )
    except RuntimeError:  # an inference tensor's version counter
        return None


def guarded_call(model: nn.Module, inputs: Any) -> Any:
    """``call_model(model, inputs)`` under :func:`model_guard`: for paths outside the engine.

    Raises:
        RuntimeError: Inside ``torch.inference_mode()``.
        ValueError: If an input or parameter is an inference tensor, or a training-mode module
            updated a buffer (restored first).
    """
    refuse_inference_tensors(inputs, list(model.parameters()))
    with model_guard(model):
        return call_model(model, inputs)
