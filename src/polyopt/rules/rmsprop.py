"""RMSprop (Hinton's lecture 6e), with optional momentum and centering (Graves, 2013)."""

from __future__ import annotations

from typing import Any

from .. import _validate as v
from .._base import Optimizer, Rule
from ._common import decay, make, on

DEFAULTS = dict(
    lr=1e-2,
    alpha=0.99,
    eps=1e-8,
    weight_decay=0.0,
    momentum=0.0,
    centered=False,
    maximize=False,
)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.in_range("alpha", hp["alpha"], 0.0, 1.0, closed=True)
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.at_least("momentum", hp["momentum"], 0.0, schedulable=False)
    v.flag("centered", hp["centered"])
    v.flag("maximize", hp["maximize"])


def _slots(hp: dict) -> tuple[str, ...]:
    names = ("square_avg",)
    if on(hp["momentum"]):
        names += ("momentum_buffer",)
    if hp["centered"]:
        names += ("grad_avg",)
    return names


def _step(p, g, s, hp, t, xp):
    lr, a, mu = hp["lr"], hp["alpha"], hp["momentum"]
    p, g = decay(p, g, hp)
    sq = a * s["square_avg"] + (1 - a) * (g * g)
    out = {"square_avg": sq}
    if hp["centered"]:
        ga = a * s["grad_avg"] + (1 - a) * g
        out["grad_avg"] = ga
        avg = xp.sqrt(sq - ga * ga) + hp["eps"]
    else:
        avg = xp.sqrt(sq) + hp["eps"]
    if on(mu):
        buf = mu * s["momentum_buffer"] + g / avg
        out["momentum_buffer"] = buf
        return p - lr * buf, out
    return p - lr * (g / avg), out


RMSPROP = Rule("rmsprop", DEFAULTS, _check, _slots, _step)


def rmsprop(
    lr: float | Any = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float | Any = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""RMSprop, as ``torch.optim.RMSprop``::

        g_t = g_t + λ p_{t-1}                             (skipped if λ = 0)
        v_t = α v_{t-1} + (1 - α) g_t²
        c_t = α c_{t-1} + (1 - α) g_t                     (centered only)
        d_t = sqrt(v_t - c_t²) + ε  if centered  else  sqrt(v_t) + ε
        b_t = μ b_{t-1} + g_t / d_t;  p_t = p_{t-1} - γ_t b_t     (momentum μ > 0)
        p_t = p_{t-1} - γ_t g_t / d_t                              (μ = 0)

    Conventions elsewhere: optax's ``rmsprop`` puts ε *inside* the root by default
    (``sqrt(v + ε)``, ε = 1e-8; ``eps_in_sqrt=False`` puts it outside like torch) and
    defaults to ``decay=0.9``; Keras (rho=0.9, ε=1e-7) adds ε outside like torch. Both
    optax's and Keras's momentum put the learning rate inside the velocity: the same
    trajectory for a constant lr, not once the lr changes. torch's ``alpha`` is Keras's
    ``rho`` and optax's ``decay``.

    State per array: ``square_avg``, and ``momentum_buffer`` / ``grad_avg`` when used.

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        alpha: α in [0, 1]: the decay rate of the running average of the squared gradient
            (Keras's ``rho``, optax's ``decay``).
        eps: ε (>= 0) added outside the square root, as torch and Keras do.
        weight_decay: λ (>= 0), coupled L2 weight decay: ``λ·p`` is added to the gradient (0
            turns it off). A number, a 0-d array or a schedule.
        momentum: μ (>= 0): momentum factor; 0 (default) keeps no buffer.
        centered: divide by an estimate of the gradient's variance (the running average of g
            subtracted) instead of its raw second moment.
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
            ``polyopt.RMSprop(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.rmsprop(lr=0.01, alpha=0.75, eps=0.0)
    >>> params = np.array([1.0])
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, np.array([3.0]), state)
    >>> np.round(params, 6)   # 1 - 0.01 · 3 / sqrt(0.25 · 9)
    array([0.98])

    Lecture: https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf
    """
    return make(RMSPROP, locals())
