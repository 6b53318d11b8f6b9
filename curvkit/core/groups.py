"""Parameter groups, normalised and validated up front as ``torch.optim`` does.

A parameter group is a dict ``{"params": [...], **options}``. Every curvkit entry point that takes
``param_groups`` passes them through :func:`normalize_param_groups`, so that a mistake is reported
once, early, with a message that says what to change, instead of as a wrong result later.

Accepted forms of ``param_groups``:

- ``None``: one group with every parameter of the model that requires grad;
- an iterable of tensors (e.g. ``model.parameters()``, a generator is fine): one group;
- an iterable of dicts, as for ``torch.optim`` optimizers: one group each;
- a single dict: one group (unambiguous, so accepted, unlike in ``torch.optim``).

Inside a group, ``"params"`` may be one tensor or an iterable of tensors (not a set, whose order is
not reproducible). Parameters are identified by identity, not by value.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, Final

from torch import Tensor, nn

__all__ = ["REQUIRED", "check_params", "normalize_param_groups", "parameter_names"]


class _Required:
    """Type of :data:`REQUIRED`."""

    _instance: _Required | None = None

    def __new__(cls) -> _Required:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<required option>"

    def __reduce__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()
"""Default of an option that every group must set itself (as ``torch.optim``'s ``required``)."""


def normalize_param_groups(
    param_groups: Iterable[Tensor] | Iterable[Mapping[str, Any]] | Mapping[str, Any] | None,
    model: nn.Module | None,
    defaults: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Turn user-given parameter groups into validated dicts with every option filled in.

    Args:
        param_groups: ``None``, an iterable of tensors, an iterable of dicts
            ``{"params": ..., **options}``, or one such dict (see the module docstring).
        model: The model the parameters must belong to; ``None`` skips that check (for code that
            knows no model, such as optimizers), and then ``param_groups`` must be given.
        defaults: Every option a group may set, mapped to its default, or to :data:`REQUIRED` if
            each group must set it. Options not listed here are refused.

    Returns:
        One new dict per group, in the order given: ``"params"`` (a list of tensors, in the order
        given), then the group's own options, then the defaults it did not set. The user's dicts
        are not modified; option values are not copied.

    Raises:
        TypeError: If ``param_groups`` or a group's ``"params"`` has the wrong type, or an element
            of ``"params"`` is not a tensor.
        ValueError: If there are no groups, a group has no or empty ``"params"``, a parameter is
            in two groups or twice in one, is not in ``model`` or does not require grad, or if a
            group sets an unknown option or misses a required one.
    """
    defaults = dict(defaults or {})
    if "params" in defaults:
        raise ValueError("defaults must not contain 'params': it holds the options only")

    groups = _as_group_dicts(param_groups, model)
    names = parameter_names(model) if model is not None else {}
    in_model = set(names) if model is not None else None

    normalized: list[dict[str, Any]] = []
    seen: dict[int, tuple[int, int]] = {}  # id(param) -> (group, position) of its first listing
    for g, group in enumerate(groups):
        params = _group_params(group, g)
        for i, p in enumerate(params):
            where = f"parameter at position {i} of group {g}"
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"{where} is a {type(p).__name__}, not a tensor: 'params' must hold tensors "
                    "such as those of model.parameters()"
                )
            if id(p) in names:
                where += f" ({names[id(p)]!r})"
            if in_model is not None and id(p) not in in_model:
                raise ValueError(
                    f"{where}, of shape {tuple(p.shape)}, is not a parameter of the model "
                    f"({type(model).__name__}): pass tensors from model.parameters()"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"{where} does not require grad: leave it out, or set requires_grad=True"
                )
            if id(p) in seen:
                first_group, first_position = seen[id(p)]
                if first_group == g:
                    raise ValueError(
                        f"{where} is also at position {first_position} of the same group: "
                        "list each parameter once"
                    )
                raise ValueError(
                    f"{where} is also in group {first_group} (at position {first_position}): "
                    "a parameter may belong to one group only"
                )
            seen[id(p)] = (g, i)

        options = {key: value for key, value in group.items() if key != "params"}
        _check_options(options, defaults, g)
        normalized_group: dict[str, Any] = {"params": params, **options}
        for key, default in defaults.items():
            normalized_group.setdefault(key, default)
        normalized.append(normalized_group)
    return normalized


def check_params(params: Iterable[Tensor], model: nn.Module) -> list[Tensor]:
    """Validate a flat list of parameters of ``model`` (one group, no options).

    Args:
        params: The parameters, an iterable of tensors.
        model: The model they must belong to.

    Returns:
        The parameters as a list, in the order given.

    Raises:
        TypeError, ValueError: As :func:`normalize_param_groups`, and a ``TypeError`` for one
            tensor or a group dict in place of the list.
    """
    if isinstance(params, Tensor | Mapping):
        raise TypeError(
            f"params must be a sequence of parameters, not one {type(params).__name__}: "
            "use [param] or model.parameters()"
        )
    (group,) = normalize_param_groups([{"params": params}], model)
    return group["params"]


def parameter_names(model: nn.Module) -> dict[int, str]:
    """Map each parameter of ``model``, by ``id``, to its qualified name, for messages.

    A parameter shared by several modules gets the first name ``model.named_parameters()`` gives.

    Args:
        model: The model.

    Returns:
        ``{id(parameter): name}``.
    """
    return {id(p): name for name, p in model.named_parameters()}


def _as_group_dicts(
    param_groups: Iterable[Tensor] | Iterable[Mapping[str, Any]] | Mapping[str, Any] | None,
    model: nn.Module | None,
) -> list[Mapping[str, Any]]:
    if param_groups is None:
        if model is None:
            raise ValueError("param_groups is None and there is no model: pass the parameters")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"the model ({type(model).__name__}) has no parameters that require grad: "
                "set requires_grad=True on the parameters to use, or pass them as param_groups"
            )
        return [{"params": params}]
    if isinstance(param_groups, Tensor):
        raise TypeError(
            "param_groups is a single tensor: pass an iterable of tensors, e.g. [tensor], "
            "or of dicts {'params': ..., **options}"
        )
    if isinstance(param_groups, Mapping):
        return [param_groups]
    if isinstance(param_groups, str | bytes) or not isinstance(param_groups, Iterable):
        raise TypeError(
            "param_groups must be None, an iterable of tensors or an iterable of dicts "
            f"{{'params': ..., **options}}, got a {type(param_groups).__name__}"
        )
    entries = list(param_groups)
    if not entries:
        raise ValueError(
            "param_groups is empty: pass the parameters to use (or None for all of the model's)"
        )
    if all(isinstance(entry, Mapping) for entry in entries):
        return entries
    if any(isinstance(entry, Mapping) for entry in entries):
        raise TypeError(
            "param_groups mixes dicts and other entries: pass either tensors (one group) or "
            "dicts {'params': ..., **options} (one group each)"
        )
    if isinstance(entries[0], tuple) and len(entries[0]) == 2 and isinstance(entries[0][0], str):
        raise TypeError(
            "param_groups holds (name, tensor) pairs: pass model.parameters() instead of "
            "model.named_parameters()"
        )
    return [{"params": entries}]


def _group_params(group: Mapping[str, Any], g: int) -> list[Any]:
    if "params" not in group:
        raise ValueError(
            f"group {g} has no 'params' key: each group is a dict {{'params': [...], **options}}"
        )
    params = group["params"]
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, set | frozenset):
        raise TypeError(
            f"'params' of group {g} is a set, whose order is not reproducible: pass a list"
        )
    if isinstance(params, str | bytes | Mapping) or not isinstance(params, Iterable):
        raise TypeError(
            f"'params' of group {g} must be a tensor or an iterable of tensors, got a "
            f"{type(params).__name__}"
        )
    params = list(params)
    if not params:
        raise ValueError(f"'params' of group {g} is empty: give each group at least one tensor")
    return params


def _check_options(options: Mapping[str, Any], defaults: Mapping[str, Any], g: int) -> None:
    for key in options:
        if key not in defaults:
            known = ", ".join(repr(k) for k in defaults) or "none"
            close = difflib.get_close_matches(str(key), [str(k) for k in defaults], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"group {g} sets the unknown option {key!r} (known options: {known}).{hint}"
            )
    for key, default in defaults.items():
        if default is REQUIRED and key not in options:
            raise ValueError(
                f"group {g} does not set the option {key!r}, which has no default: "
                f"add {key!r}: ... to the group"
            )
