"""Hyperparameter checks: one readable line per check at the call site, the bad value in
the message (``ValueError: lr must be >= 0, got -1.0``).

A numeric hyperparameter is a real number (a Python ``int``/``float``, or a NumPy
scalar, kept as a Python float so that it never changes the params' dtype), a 0-d array
of the params' library (a torch tensor, a JAX array, or a JAX tracer under ``jit`` /
``vmap`` / ``grad``), or, where allowed, a schedule (a function of the step count).
Values are checked wherever they are known: a traced array has no value at
construction, so its checks are skipped (under ``jax.jit`` a bad value gives NaN or
inf, as in optax).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _xp


def normalize(name: str, value: Any) -> Any:
    """``value`` in the form the engine keeps: Python numbers as they are, NumPy scalars
    and 0-d NumPy arrays as Python floats, 0-d arrays of other libraries as they are,
    schedules as they are. TypeError / ValueError for anything else."""
    if callable(value) and not _xp.is_array(value):
        return value
    t = type(value)
    if t is float:
        return value
    if t is int:
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"{name} is too large for a float, got {_short(value)}") from None
        return value
    if isinstance(value, bool) or isinstance(value, np.bool_):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if isinstance(value, (np.floating, np.integer)):
        return float(value)
    if _xp.is_array(value):
        shape = tuple(getattr(value, "shape", ()))
        if shape != ():
            raise TypeError(
                f"{name} must be a number or a 0-d array, got an array of shape {shape}"
            )
        dtype = value.dtype
        if isinstance(value, np.ndarray):
            if dtype.kind not in "fiu":
                raise TypeError(f"{name} must be a real number, got an array of dtype {dtype}")
            return float(value)
        if not _is_real_dtype(value):
            raise TypeError(f"{name} must be a real number, got an array of dtype {dtype}")
        return value
    raise TypeError(
        f"{name} must be a real number (int or float), a 0-d array or a schedule, "
        f"got {type(value).__name__}: {_short(value)}"
    )


def _is_real_dtype(a: Any) -> bool:
    name = str(a.dtype).rsplit(".", 1)[-1]
    return name.startswith(("float", "bfloat", "int", "uint"))


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def value(x: Any) -> float | None:
    """The value to check: a float, or None when it is not known here (a schedule, a
    traced array)."""
    if type(x) is float or type(x) is int:
        return float(x)
    if callable(x) and not _xp.is_array(x):
        return None
    return _xp.concrete_value(x)


def number(name: str, value_: Any) -> float | None:
    """``value_`` as a float if it is a plain number; None for a schedule or a traced
    array. TypeError for what is not a number."""
    return value(normalize(name, value_))


def at_least(name: str, value_: Any, low: float, schedulable: bool = True) -> None:
    v = _scalar(name, value_, schedulable)
    if v is not None and not v >= low:  # also rejects NaN
        raise ValueError(f"{name} must be >= {low:g}, got {value_!r}")


def in_range(name: str, value_: Any, low: float, high: float, *, closed: bool) -> None:
    v = _scalar(name, value_, schedulable=False)
    if v is None:
        return
    ok = low <= v <= high if closed else low <= v < high
    if not ok:
        bracket = "]" if closed else ")"
        raise ValueError(f"{name} must be in [{low:g}, {high:g}{bracket}, got {value_!r}")


def flag(name: str, value_: Any) -> None:
    if not isinstance(value_, bool):
        raise TypeError(f"{name} must be True or False, got {value_!r}")


def betas(value_: Any) -> None:
    if not (isinstance(value_, (tuple, list)) and len(value_) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {value_!r}")
    in_range("betas[0]", value_[0], 0.0, 1.0, closed=False)
    in_range("betas[1]", value_[1], 0.0, 1.0, closed=False)


def _scalar(name: str, value_: Any, schedulable: bool) -> float | None:
    if callable(value_) and not _xp.is_array(value_):
        if not schedulable:
            raise TypeError(f"{name} cannot be a schedule, got {value_!r}")
        return None
    v = number(name, value_)
    if v is not None and math.isinf(v) and v > 0:
        raise ValueError(f"{name} must be finite, got {value_!r}")
    return v
