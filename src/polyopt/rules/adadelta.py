"""Adadelta (Zeiler, 2012)."""

from __future__ import annotations

from typing import Any

from .. import _validate as v
from .._base import Optimizer, Rule
from ._common import decay, make

DEFAULTS = dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.in_range("rho", hp["rho"], 0.0, 1.0, closed=True)
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.flag("maximize", hp["maximize"])


def _slots(hp: dict) -> tuple[str, ...]:
    return ("square_avg", "acc_delta")


def _step(p, g, s, hp, t, xp):
    lr, rho, eps = hp["lr"], hp["rho"], hp["eps"]
    p, g = decay(p, g, hp)
    sq = rho * s["square_avg"] + (1 - rho) * (g * g)
    delta = xp.sqrt(s["acc_delta"] + eps) / xp.sqrt(sq + eps) * g
    acc = rho * s["acc_delta"] + (1 - rho) * (delta * delta)
    return p - lr * delta, {"square_avg": sq, "acc_delta": acc}


ADADELTA = Rule("adadelta", DEFAULTS, _check, _slots, _step)


def adadelta(
    lr: float | Any = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float | Any = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""Adadelta, as ``torch.optim.Adadelta``::

        g_t  = g_t + λ p_{t-1}                               (skipped if λ = 0)
        v_t  = ρ v_{t-1} + (1 - ρ) g_t²
        Δ_t  = sqrt(u_{t-1} + ε) / sqrt(v_t + ε) · g_t
        u_t  = ρ u_{t-1} + (1 - ρ) Δ_t²
        p_t  = p_{t-1} - γ_t Δ_t

    The paper has no learning rate (γ = 1, torch's default). optax's ``adadelta`` is the
    same update with the same ρ = 0.9, ε = 1e-6 and coupled ``weight_decay``; pass it
    ``learning_rate=1.0``: its default ``learning_rate=None`` applies no scaling *and no
    sign flip*, so ``optax.adadelta()`` ascends the gradient (it equals
    ``adadelta(maximize=True)`` here). Keras uses the same update with other defaults
    (ρ = 0.95, ε = 1e-7, learning_rate = 0.001).

    State per array: ``square_avg`` (v), ``acc_delta`` (u).

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``. The paper has none (1.0, the
            default).
        rho: ρ in [0, 1]: the decay rate of both running averages.
        eps: ε (>= 0) added inside both square roots.
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
            ``polyopt.Adadelta(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.adadelta(rho=0.0, eps=1.0)
    >>> params = np.array([1.0])
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, np.array([0.0]), state)
    >>> params   # zero gradient, zero step
    array([1.])

    Paper: https://arxiv.org/abs/1212.5701
    """
    return make(ADADELTA, locals())
