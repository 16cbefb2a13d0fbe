"""Argument checks shared by every layer: errors that state the rule, what arrived and the fix.

Raise, never assert: these run on user input, and ``python -O`` strips asserts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def normalize_name(name: str) -> str:
    """Lower-case a user-facing name and accept ``-`` for ``_`` (``He-Uniform`` -> ``he_uniform``)."""
    return name.strip().lower().replace("-", "_")


def check_choice(what: str, value: str, accepted: Iterable[str], hint: str = "") -> str:
    """Return ``normalize_name(value)`` if it is one of ``accepted``, else raise a ValueError listing them."""
    accepted = list(accepted)
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, one of {', '.join(accepted)}; got {type(value).__name__}.")
    key = normalize_name(value)
    if key not in accepted:
        message = f"Unknown {what} {value!r}. Accepted: {', '.join(accepted)}."
        raise ValueError(f"{message} {hint}".rstrip())
    return key


def check_positive(what: str, value: float, *, allow_zero: bool = False) -> float:
    """Raise a ValueError unless ``value`` is a finite number > 0 (or >= 0 with ``allow_zero``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number; got {value!r}.") from None
    ok = math.isfinite(number) and (number >= 0 if allow_zero else number > 0)
    if not ok:
        rule = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{what} must be {rule}; got {value!r}.")
    return number
