"""Adagrad (Duchi, Hazan & Singer, 2011)."""

from __future__ import annotations

from typing import Any

from .. import _validate as v
from .._base import Optimizer, Rule
from ._common import decay, fill_like, make

DEFAULTS = dict(
    lr=1e-2,
    lr_decay=0.0,
    weight_decay=0.0,
    initial_accumulator_value=0.0,
    eps=1e-10,
    maximize=False,
)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.at_least("lr_decay", hp["lr_decay"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.at_least("initial_accumulator_value", hp["initial_accumulator_value"], 0.0, schedulable=False)
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    v.flag("maximize", hp["maximize"])


def _slots(hp: dict) -> tuple[str, ...]:
    return ("sum",)


def _init(p, hp, xp):
    return {"sum": fill_like(p, hp["initial_accumulator_value"], xp)}


def _step(p, g, s, hp, t, xp):
    lr = hp["lr"]
    p, g = decay(p, g, hp)
    clr = lr / (1 + (t - 1) * hp["lr_decay"])
    acc = s["sum"] + g * g
    return p - clr * (g / (xp.sqrt(acc) + hp["eps"])), {"sum": acc}


ADAGRAD = Rule("adagrad", DEFAULTS, _check, _slots, _step, init=_init)


def adagrad(
    lr: float | Any = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float | Any = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    maximize: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""Adagrad, as ``torch.optim.Adagrad``::

        g_t  = g_t + λ p_{t-1}                          (skipped if λ = 0)
        γ̃_t  = γ_t / (1 + (t - 1) · lr_decay)
        s_t  = s_{t-1} + g_t²                           (s_0 = initial_accumulator_value)
        p_t  = p_{t-1} - γ̃_t · g_t / (sqrt(s_t) + ε)

    Conventions elsewhere: optax's ``adagrad`` starts the accumulator at 0.1 and puts
    ε *inside* the square root (``g / sqrt(s + ε)``, ε = 1e-7); Keras also starts at 0.1
    and adds ε = 1e-7 outside. To match their start use
    ``initial_accumulator_value=0.1``. ε inside the root is not reproduced exactly: it
    raises the denominator by at most ε/(2 sqrt(s)), i.e. shrinks the step by at most
    ε/(2s) *relative* (≤ 5e-7 once s ≥ 0.1, so ``initial_accumulator_value=0.1, eps=0``
    matches optax's defaults to float32 rounding; with ε = 0 on both sides they are the
    same formula). From a zero start with small gradients ε/(2s) is large.

    State per array: ``sum``.

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        lr_decay: (>= 0): the learning rate at the array's t-th update is ``γ_t / (1 + (t −
            1)·lr_decay)``.
        weight_decay: λ (>= 0), coupled L2 weight decay: ``λ·p`` is added to the gradient (0
            turns it off). A number, a 0-d array or a schedule.
        initial_accumulator_value: (>= 0): the start value of the sum of squared gradients
            (optax and Keras start at 0.1).
        eps: ε (>= 0) added outside the square root of the accumulator.
        maximize: ascend the objective instead of descending it (the gradient is negated).
        impl: which implementation runs the step. ``"auto"`` (default): the fastest path
            polyopt has for the params' library where one exists (a numba kernel for NumPy,
            torch's own fused kernels or one derived from the rule for torch, a generated
            CUDA kernel for CuPy, packed state for runs of small arrays under JAX), else the
            generic rule. ``"generic"``: the rule as written, array-API operations on one
            array at a time. ``"fused"``: a fast path is required; ``init`` / ``update``
            raise ValueError where there is none for this optimizer and library. Every fast
            path gives the generic path's numbers within the dtype's tolerance.

    Returns:
        Optimizer: the functional form, a pure ``init`` / ``update`` pair;
            ``polyopt.Adagrad(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.adagrad(lr=0.5)
    >>> params = np.array([1.0])
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, np.array([2.0]), state)
    >>> np.round(params, 6)   # 1 - 0.5 · 2 / sqrt(4)
    array([0.5])

    Paper: https://jmlr.org/papers/v12/duchi11a.html
    """
    return make(ADAGRAD, locals())
