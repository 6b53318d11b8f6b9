"""The checks of scalar arguments that every public function shares.

One place decides what counts as an integer (``int`` or a NumPy integer, never ``bool``), a real
number (also a 0-dim real tensor, read with ``.item()``) and a damping, and words the error the
same way everywhere: the argument's name, what it must be, and what it got.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["check_bytes", "check_damping", "check_int", "check_real"]


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(value: object, name: str, *, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int`` after checking it is an integer of at least ``minimum``.

    Args:
        value: The argument as given.
        name: Its name, for the error message.
        minimum: The smallest value allowed, or ``None`` for any integer.

    Returns:
        ``value`` as a Python ``int``.

    Raises:
        TypeError: If ``value`` is a ``bool`` or not an integer.
        ValueError: If ``value`` is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_real(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    strict: bool = False,
    allow_inf: bool = False,
) -> float:
    """Return ``value`` as a ``float`` after checking it is a real number in range.

    Args:
        value: The argument as given: a Python or NumPy number, or a 0-dim real tensor.
        name: Its name, for the error message.
        minimum: The bound below, or ``None`` for none.
        strict: Whether ``value`` must be strictly greater than ``minimum``.
        allow_inf: Whether ``+inf`` is allowed. NaN never is.

    Returns:
        ``value`` as a Python ``float``.

    Raises:
        TypeError: If ``value`` is a ``bool``, not a real number, or a tensor with more than one
            element or of a complex dtype.
        ValueError: If ``value`` is NaN, infinite where not allowed, or out of range.
    """
    if isinstance(value, torch.Tensor):
        if (
            value.numel() != 1
            or value.dim() != 0
            or value.is_complex()
            or value.dtype == torch.bool
        ):
            raise TypeError(
                f"{name} must be a real number or a 0-dim real tensor, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not (allow_inf and number > 0)):
        raise ValueError(f"{name} must be a finite number, got {number}")
    if minimum is not None and (number <= minimum if strict else number < minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {number}")
    return number


def check_damping(value: object, *, positive: bool = False, why: str = "") -> float:
    """Return a damping as a ``float`` after checking it is a non-negative (or positive) number.

    Args:
        value: The damping as given (a number or a 0-dim tensor).
        positive: Whether zero is refused, for a computation that divides by the damping.
        why: Appended to the error when ``positive`` refuses zero: what needs it positive and
            what to do instead.

    Returns:
        The damping as a Python ``float``.

    Raises:
        TypeError: If the damping is not a real number.
        ValueError: If it is negative, NaN or infinite, or zero where ``positive``.
    """
    damping = check_real(value, "damping", minimum=0.0)
    if positive and damping == 0.0:
        raise ValueError("damping must be > 0" + (f": {why}" if why else ""))
    return damping


def check_bytes(value: object, name: str = "max_memory") -> int | None:
    """Return a memory size in bytes as an ``int`` (or ``None``), accepting integral floats.

    Args:
        value: ``None`` (no bound) or a positive number of bytes such as ``2**30`` or ``2e9``.
        name: The argument's name, for the error message.

    Returns:
        ``None`` or the number of bytes.

    Raises:
        TypeError: If ``value`` is not a number.
        ValueError: If it is not positive, not finite, or not a whole number of bytes.
    """
    if value is None:
        return None
    number = check_real(value, name, minimum=0.0, strict=True)
    if not number.is_integer():
        raise ValueError(f"{name} must be a whole number of bytes, got {number}")
    return int(number)


def check_finite_outputs(outputs: torch.Tensor) -> None:
    """Refuse model outputs that hold NaN or inf: their curvature is undefined.

    Every quantity calls this on the outputs of the user's model before any curvature is
    computed, so that non-finite parameters or an overflow give one error everywhere.

    Raises:
        ValueError: If a floating-point ``outputs`` holds NaN or inf.
    """
    if outputs.is_floating_point() and not bool(torch.isfinite(outputs).all()):
        raise ValueError(
            "the model's outputs hold NaN or inf although its inputs are finite (an overflow, "
            "a log of 0, non-finite parameters?), so their curvature is undefined"
        )
