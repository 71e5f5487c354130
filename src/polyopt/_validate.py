"""Hyperparameter checks: one readable line per check at the call site, the bad value in
the message (``ValueError: lr must be >= 0, got -1.0``)."""

from __future__ import annotations

import math
import numbers
from typing import Any


def number(name: str, value: Any) -> float | None:
    """``value`` as a float if it is a plain number; None for a schedule (callable)."""
    if callable(value):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a schedule, got {value!r}")
    return float(value)


def at_least(name: str, value: Any, low: float, schedulable: bool = True) -> None:
    v = _scalar(name, value, schedulable)
    if v is not None and not v >= low:  # also rejects NaN
        raise ValueError(f"{name} must be >= {low:g}, got {value!r}")


def in_range(name: str, value: Any, low: float, high: float, *, closed: bool) -> None:
    v = _scalar(name, value, schedulable=False)
    ok = low <= v <= high if closed else low <= v < high
    if not ok:
        bracket = "]" if closed else ")"
        raise ValueError(f"{name} must be in [{low:g}, {high:g}{bracket}, got {value!r}")


def flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def betas(value: Any) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {value!r}")
    in_range("betas[0]", value[0], 0.0, 1.0, closed=False)
    in_range("betas[1]", value[1], 0.0, 1.0, closed=False)


def _scalar(name: str, value: Any, schedulable: bool) -> float | None:
    if callable(value):
        if not schedulable:
            raise TypeError(f"{name} cannot be a schedule, got {value!r}")
        return None
    v = number(name, value)
    if math.isinf(v) and v > 0:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v
