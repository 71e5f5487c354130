"""Small helpers the rules share."""

from __future__ import annotations

from typing import Any

from .._base import Optimizer, Rule
from .._xp import is_python_scalar


def on(x: Any) -> bool:
    """Whether a term is active: False only for a plain zero (a schedule is always on)."""
    return not (is_python_scalar(x) and x == 0)


def decay(p: Any, g: Any, hp: dict, decoupled: bool = False) -> tuple[Any, Any]:
    """The prelude every rule shares: negate g for ``maximize``, then weight decay,
    coupled (L2: ``g + λp``) or decoupled (``p − lr·λ·p``, AdamW / SGDW)."""
    if hp["maximize"]:
        g = -g
    wd = hp["weight_decay"]
    if on(wd):
        if decoupled:
            p = p - (hp["lr"] * wd) * p  # = p·(1 − lr·λ) without rounding 1 − lr·λ to p.dtype
        else:
            g = g + wd * p
    return p, g


def make(rule: Rule, args: dict) -> Optimizer:
    """Build the functional optimizer from a factory's ``locals()``."""
    hp = dict(args)
    impl = hp.pop("impl")
    return Optimizer(rule, hp, impl)
