"""Lion (Chen et al., 2023): the sign of an interpolated momentum."""

from __future__ import annotations

from typing import Any

from .. import _validate as v
from .._base import Optimizer, Rule
from ._common import grad_term, make, param_term

DEFAULTS = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-3, maximize=False)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.betas(hp["betas"])
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.flag("maximize", hp["maximize"])


def _slots(hp: dict) -> tuple[str, ...]:
    return ("exp_avg",)


def _step(p, g, s, hp, t, xp):
    b1, b2 = hp["betas"]
    g = grad_term(p, g, hp, decoupled=True)
    m = s["exp_avg"]
    direction = xp.sign(b1 * m + (1 - b1) * g)  # from the momentum before this step
    p = param_term(p, hp, decoupled=True)
    return p - hp["lr"] * direction, {"exp_avg": b2 * m + (1 - b2) * g}


LION = Rule("lion", DEFAULTS, _check, _slots, _step)


def lion(
    lr: float | Any = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float | Any = 1e-3,
    *,
    maximize: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"), as
    ``optax.lion``. With g_t the gradient (negated if ``maximize``)::

        c_t = β1 m_{t-1} + (1 - β1) g_t
        p_t = p_{t-1} · (1 - γ_t λ) - γ_t · sign(c_t)
        m_t = β2 m_{t-1} + (1 - β2) g_t

    The weight decay is decoupled and scaled by the learning rate, as in the paper
    and optax. Defaults are optax's (β = (0.9, 0.99), λ = 1e-3) with the paper's
    learning rate 1e-4 (optax has no default; the paper suggests 3–10× smaller than
    AdamW's). Keras's ``Lion`` is the same rule. torch.optim has no Lion.

    Every entry moves by exactly γ_t (or 0 where c_t is 0), so ``lr`` sets the step
    size directly; the paper pairs it with a decay 3–10× larger than AdamW's.

    State per array: ``exp_avg`` (optax's ``mu``).

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        betas: (β1, β2), each in [0, 1): β1 interpolates the direction whose sign is taken,
            β2 is the decay rate of the kept momentum.
        weight_decay: λ (>= 0), decoupled and scaled by the learning rate, ``p ← p·(1 − γ_t
            λ)``. A number, a 0-d array or a schedule.
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
            ``polyopt.Lion(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.lion(lr=0.1, weight_decay=0.0)
    >>> params = np.array([1.0, -2.0, 3.0])
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, np.array([0.5, -0.25, 0.0]), state)
    >>> params   # sign steps of lr; zero where the gradient and momentum are
    array([ 0.9, -1.9,  3. ])

    Paper: https://arxiv.org/abs/2302.06675
    """
    return make(LION, locals())
