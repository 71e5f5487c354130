"""Small helpers the rules share."""

from __future__ import annotations

from typing import Any

from .._base import Optimizer, Rule
from .._xp import is_python_scalar


def on(x: Any) -> bool:
    """Whether a term is active: False only for a plain zero (a schedule is always on)."""
    return not (is_python_scalar(x) and x == 0)


def make(rule: Rule, args: dict) -> Optimizer:
    """Build the functional optimizer from a factory's ``locals()``."""
    hp = dict(args)
    impl = hp.pop("impl")
    return Optimizer(rule, hp, impl)
