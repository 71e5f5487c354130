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
    return param_term(p, hp, decoupled), grad_term(p, g, hp, decoupled)


def grad_term(p: Any, g: Any, hp: dict, decoupled: bool = False) -> Any:
    """The gradient half of :func:`decay`: ``-g`` for ``maximize``, plus ``λp`` if coupled."""
    if hp["maximize"]:
        g = -g
    wd = hp["weight_decay"]
    if on(wd) and not decoupled:
        g = g + wd * p
    return g


def param_term(p: Any, hp: dict, decoupled: bool = False) -> Any:
    """The parameter half of :func:`decay`: ``p − lr·λ·p`` if decoupled, else ``p``."""
    wd = hp["weight_decay"]
    if on(wd) and decoupled:
        p = p - (hp["lr"] * wd) * p  # = p·(1 − lr·λ) without rounding 1 − lr·λ to p.dtype
    return p


def make(rule: Rule, args: dict) -> Optimizer:
    """Build the functional optimizer from a factory's ``locals()``."""
    hp = dict(args)
    impl = hp.pop("impl")
    return Optimizer(rule, hp, impl)
