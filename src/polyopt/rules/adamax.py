"""Adamax (Kingma & Ba, 2015, section 7.1): Adam with the infinity norm."""

from __future__ import annotations

from typing import Any

from .. import _validate as v
from .._base import Optimizer, Rule, bias_correction, two_part
from ._common import grad_term, make

DEFAULTS = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.betas(hp["betas"])
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.flag("maximize", hp["maximize"])


def _slots(hp: dict) -> tuple[str, ...]:
    return ("exp_avg", "exp_inf")


def _moments(p, g, s, hp, t, xp):
    b1, b2 = hp["betas"]
    g = grad_term(p, g, hp)
    return {
        "exp_avg": b1 * s["exp_avg"] + (1 - b1) * g,
        "exp_inf": xp.maximum(b2 * s["exp_inf"], xp.abs(g) + hp["eps"]),
    }


def _move(p, g, s, hp, t, xp):
    b1 = hp["betas"][0]
    return p - (hp["lr"] / bias_correction(b1, t, xp)) * (s["exp_avg"] / s["exp_inf"])


ADAMAX = Rule("adamax", DEFAULTS, _check, _slots, two_part(_moments, _move))


def adamax(
    lr: float | Any = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Any = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""Adamax, as ``torch.optim.Adamax``: Adam with the second moment replaced by an
    exponentially weighted infinity norm. With g_t the gradient (plus λp, coupled)::

        m_t = β1 m_{t-1} + (1 - β1) g_t
        u_t = max(β2 u_{t-1}, |g_t| + ε)
        p_t = p_{t-1} - γ_t / (1 - β1^t) · m_t / u_t

    Defaults are torch's. ``optax.adamax`` adds ε after the maximum
    (``m̂_t / (max(β2 u, |g|) + ε)``), Keras's ``Adamax`` likewise; they differ from
    this rule only where |g| is near ε.

    State per array: ``exp_avg``, ``exp_inf``.

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        betas: (β1, β2), each in [0, 1): the decay rate of the first moment and of the
            infinity norm.
        eps: ε (>= 0) added to |g| inside the maximum.
        weight_decay: λ (>= 0), coupled L2 weight decay: ``λ·p`` is added to the gradient (0
            turns it off). A number, a 0-d array or a schedule.
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
            ``polyopt.Adamax(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.adamax(lr=0.1)
    >>> params = np.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, np.array([0.5, -0.25]), state)
    >>> np.round(params, 6)   # the first step moves each entry by about lr
    array([ 0.9, -1.9])

    Paper: https://arxiv.org/abs/1412.6980
    """
    return make(ADAMAX, locals())
