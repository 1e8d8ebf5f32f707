"""Checks of numeric options shared by the public functions: wrong types fail with the option's name, up front."""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_number(
    name: str, value: Any, *, integer: bool = False, minimum: float | None = None, strict: bool = False
) -> float | int:
    """Return ``value`` as ``int`` / ``float`` after checking its type, finiteness and lower bound.

    NaN and infinite values are refused with a :class:`ValueError`.

    Parameters
    ----------
    name
        The option's name, for the message (e.g. ``"rotation_step"``).
    value
        The value given.
    integer
        Require an integer (``True`` / ``False`` are refused).
    minimum
        Lower bound; `None` for none.
    strict
        ``value > minimum`` instead of ``value >= minimum``.
    """
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        msg = f"`{name}` must be {'an integer' if integer else 'a number'}, got {value!r} ({type(value).__name__})."
        raise TypeError(msg)
    out = int(value) if integer else float(value)
    if not math.isfinite(out):
        msg = f"`{name}` must be a finite number, got {value!r}."
        raise ValueError(msg)
    if minimum is not None and (out <= minimum if strict else out < minimum):
        msg = f"`{name}` must be {'>' if strict else '>='} {minimum:g}, got {value!r}."
        raise ValueError(msg)
    return out


def check_method_option(
    method: str,
    name: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float | None = None,
    strict: bool = False,
) -> float | int:
    """:func:`check_number` for an entry of ``method_kwargs``: the message starts with ``method '<method>':``."""
    try:
        return check_number(name, value, integer=integer, minimum=minimum, strict=strict)
    except (TypeError, ValueError) as e:
        msg = f"method {method!r}: {e}"
        raise type(e)(msg) from None
