"""Small helpers the rules share."""

from __future__ import annotations

from typing import Any

from .. import _validate, _xp
from .._base import Optimizer, Rule


def on(x: Any) -> bool:
    """Whether a term is active: False only for a zero that is known here (a number, or
    a concrete 0-d array); a schedule or a traced array is always on."""
    if type(x) is float or type(x) is int:
        return x != 0
    v = _validate.value(x)
    return v is None or v != 0


def fill_like(p: Any, value: Any, xp: Any) -> Any:
    """An array like ``p`` holding ``value`` everywhere (a number or a 0-d array). A
    complex array is a pair of reals, so both parts hold it: ``value + value·1j``, as
    torch fills Adagrad's accumulator of a complex param."""
    cx = _xp.float_kind(xp, p.dtype) == "complex"
    if type(value) is float or type(value) is int:
        return xp.full_like(p, complex(value, value) if cx else value)
    v = xp.astype(value, p.dtype)
    return xp.zeros_like(p) + (v + v * 1j if cx else v)


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
