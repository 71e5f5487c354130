"""RAdam (Liu et al., 2020): Adam with the variance of its adaptive step rectified."""

from __future__ import annotations

from typing import Any

from .. import _validate as v
from .. import _xp
from .._base import Optimizer, Rule, bias_correction, scalar_sqrt, two_part
from ._common import make, param_term
from .nadam import _moments  # Adam's moments of the (L2-decayed) gradient, as NAdam's

DEFAULTS = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    maximize=False,
)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.betas(hp["betas"])
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.flag("decoupled_weight_decay", hp["decoupled_weight_decay"])
    v.flag("maximize", hp["maximize"])


def _slots(hp: dict) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq")


def _move(p, g, s, hp, t, xp):
    lr, eps = hp["lr"], hp["eps"]
    b1, b2 = hp["betas"]
    p = param_term(p, hp, decoupled=hp["decoupled_weight_decay"])
    bias2 = bias_correction(b2, t, xp)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * (1 - bias2) / bias2  # (1 - bias2) = β2^t
    m_hat = s["exp_avg"] / bias_correction(b1, t, xp)
    plain = p - lr * m_hat
    if _xp.is_python_scalar(rho_t) and not rho_t > 5:  # too few steps to rectify
        return plain
    # rho_t <= 5 under jit: the square root's argument may be negative; it is not used
    ok = rho_t > 5
    r2 = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    host = isinstance(ok, bool)
    rect = scalar_sqrt(r2 if host else xp.where(ok, r2, 1.0), xp)
    adaptive = scalar_sqrt(bias2, xp) / (xp.sqrt(s["exp_avg_sq"]) + eps)
    rectified = p - m_hat * lr * adaptive * rect
    return rectified if host else xp.where(ok, rectified, plain)


RADAM = Rule("radam", DEFAULTS, _check, _slots, two_part(_moments, _move))


def radam(
    lr: float | Any = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Any = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""RAdam (Liu et al., 2020), as ``torch.optim.RAdam``.

    Adam's moments m_t, v_t of the (decayed) gradient; with ρ∞ = 2/(1-β2) - 1 and
    ρ_t = ρ∞ - 2tβ2^t/(1-β2^t)::

        m̂_t = m_t / (1 - β1^t)
        if ρ_t > 5:  r_t = sqrt((ρ_t-4)(ρ_t-2)ρ∞ / ((ρ∞-4)(ρ∞-2)ρ_t))
                     p_t = p_{t-1} - γ_t m̂_t · r_t · sqrt(1-β2^t) / (sqrt(v_t) + ε)
        else:        p_t = p_{t-1} - γ_t m̂_t          (SGD with momentum, un-adapted)

    ``weight_decay`` is coupled (L2) unless ``decoupled_weight_decay`` (AdamW-style,
    ``p · (1 - γ_t λ)``). Defaults are torch's. With β2 = 0.999 the first five steps
    are un-adapted. ``optax.radam`` is the same rule with ``threshold=5`` but puts ε
    inside the bias correction (``sqrt(v̂_t) + ε``, ``v̂_t = v_t / (1-β2^t)``), which
    differs where |g| is near ε; Keras has no RAdam.

    State per array: ``exp_avg``, ``exp_avg_sq``.

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        betas: (β1, β2), each in [0, 1): the decay rates of the running averages of the
            gradient and of its square.
        eps: ε (>= 0) added outside the square root of the raw second moment.
        weight_decay: λ (>= 0). Coupled L2 (``λ·p`` added to the gradient) unless
            ``decoupled_weight_decay``; 0 turns it off. A number, a 0-d array or a schedule.
        decoupled_weight_decay: decay the weight directly, ``p ← p·(1 − γ_t λ)`` before the
            step (AdamW-style), instead of adding ``λ·p`` to the gradient.
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
            ``polyopt.RAdam(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.radam(lr=0.1)
    >>> params = np.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, np.array([0.5, -0.25]), state)
    >>> params   # step one is not adapted: p - lr · g
    array([ 0.95 , -1.975])

    Paper: https://arxiv.org/abs/1908.03265
    """
    return make(RADAM, locals())
