"""NAdam (Dozat, 2016): Adam with Nesterov momentum and a momentum schedule."""

from __future__ import annotations

import math
from typing import Any

from .. import _validate as v
from .. import _xp
from .._base import Optimizer, Rule, bias_correction, two_part
from ._common import grad_term, make, param_term

DEFAULTS = dict(
    lr=2e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    momentum_decay=4e-3,
    decoupled_weight_decay=False,
    maximize=False,
)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.betas(hp["betas"])
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.at_least("momentum_decay", hp["momentum_decay"], 0.0, schedulable=False)
    v.flag("decoupled_weight_decay", hp["decoupled_weight_decay"])
    v.flag("maximize", hp["maximize"])


def _slots(hp: dict) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq")


def mu(beta1: Any, psi: Any, t: Any, xp: Any) -> Any:
    """The momentum schedule μ_t = β1 (1 − ½·0.96^(tψ))."""
    if _xp.is_python_scalar(t) and _xp.is_python_scalar(psi):
        return beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    return beta1 * (1.0 - 0.5 * xp.exp((t * psi) * math.log(0.96)))


#: (β1, ψ) -> [Π_{k≤t} μ_k for t = 0, 1, ...]: each step's product from the last, in
#: the order torch multiplies its ``mu_product``; extended as steps are reached.
_PRODUCTS: dict[tuple[float, float], list[float]] = {}
_TERMS = 60  # 0.5^60 / 60 < 1e-19: the series below has converged in float64


def mu_product(beta1: Any, psi: Any, t: Any, xp: Any) -> Any:
    """Π_{k=1..t} μ_k. For host numbers the running product (torch's ``mu_product``
    state, to the bit); for a traced step count (jit) or array hyperparameters the
    same number from a closed form, as a function of t: with x = 0.96^ψ,
    log Π = t·log β1 + Σ_k log(1 − x^k/2) and Σ_k log(1 − x^k/2) =
    −Σ_n (2^−n / n) · x^n (1 − x^(nt)) / (1 − x^n)."""
    if type(t) is int and _xp.is_python_scalar(beta1) and _xp.is_python_scalar(psi):
        key = (float(beta1), float(psi))
        run = _PRODUCTS.get(key) or [1.0]
        if len(run) <= t:
            run = list(run)
            while len(run) <= t:
                run.append(run[-1] * mu(beta1, psi, len(run), xp))
            _PRODUCTS[key] = run
        return run[t]
    log_x = psi * math.log(0.96)
    total = t * _f("log", beta1, xp)
    for n in range(1, _TERMS + 1):
        a = n * log_x  # log x^n
        if _xp.is_python_scalar(a):
            series = t if a == 0 else math.exp(a) * _f("expm1", t * a, xp) / math.expm1(a)
        else:  # an array ψ: the ψ = 0 limit (every x^k = 1) without dividing 0 by 0
            safe = xp.where(a == 0, -1.0, a)
            series = xp.where(a == 0, t, xp.exp(safe) * xp.expm1(t * safe) / xp.expm1(safe))
        total = total - (0.5**n / n) * series
    return _f("exp", total, xp)


def _f(name: str, x: Any, xp: Any) -> Any:
    """``math.<name>`` of a host number, else ``xp.<name>``."""
    return getattr(math, name)(x) if _xp.is_python_scalar(x) else getattr(xp, name)(x)


def _moments(p, g, s, hp, t, xp):
    b1, b2 = hp["betas"]
    g = grad_term(p, g, hp, decoupled=hp["decoupled_weight_decay"])
    return {
        "exp_avg": b1 * s["exp_avg"] + (1 - b1) * g,
        "exp_avg_sq": b2 * s["exp_avg_sq"] + (1 - b2) * (g * g),
    }


def _move(p, g, s, hp, t, xp):
    lr, eps, psi = hp["lr"], hp["eps"], hp["momentum_decay"]
    b1, b2 = hp["betas"]
    decoupled = hp["decoupled_weight_decay"]
    g = grad_term(p, g, hp, decoupled=decoupled)  # the gradient the moments took
    p = param_term(p, hp, decoupled=decoupled)
    mu_t, mu_next = mu(b1, psi, t, xp), mu(b1, psi, t + 1, xp)
    prod = mu_product(b1, psi, t, xp)
    denom = xp.sqrt(s["exp_avg_sq"] / bias_correction(b2, t, xp)) + eps
    step_g = lr * (1 - mu_t) / (1 - prod)
    step_m = lr * mu_next / (1 - prod * mu_next)
    return p - step_g * (g / denom) - step_m * (s["exp_avg"] / denom)


def _counted(hp: dict, t: int) -> dict:
    """torch's per-parameter ``mu_product`` after ``t`` updates."""
    beta1, psi = float(hp["betas"][0]), float(hp["momentum_decay"])  # 0-d tensors too
    return {"mu_product": mu_product(beta1, psi, t, None)}


NADAM = Rule("nadam", DEFAULTS, _check, _slots, two_part(_moments, _move), counted=_counted)


def nadam(
    lr: float | Any = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Any = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""NAdam (Dozat, 2016): Adam with Nesterov momentum, as ``torch.optim.NAdam``.

    With ψ = ``momentum_decay`` the momentum follows the schedule
    μ_t = β1 (1 − ½·0.96^(tψ)), and with g_t the (decayed) gradient::

        m_t = β1 m_{t-1} + (1 - β1) g_t
        v_t = β2 v_{t-1} + (1 - β2) g_t²
        d_t = sqrt(v_t / (1 - β2^t)) + ε
        p_t = p_{t-1} - γ_t (1 - μ_t) / (1 - Π_{k≤t} μ_k) · g_t / d_t
                      - γ_t μ_{t+1} / (1 - Π_{k≤t+1} μ_k) · m_t / d_t

    ``weight_decay`` is coupled (L2, ``g + λp``) unless ``decoupled_weight_decay``
    (then ``p · (1 - γ_t λ)`` first, torch's "NAdamW"). Defaults are torch's.

    torch keeps Π μ_k as per-parameter state (``mu_product``); polyopt computes it from
    each array's step count (the same running product for host numbers; under jit a
    closed form of it), and ``polyopt.torch.NAdam``'s state dicts carry it as torch's do.

    Conventions elsewhere: ``optax.nadam`` and Keras's ``Nadam`` differ. optax's is
    Adam with a Nesterov look-ahead and no momentum schedule
    (``m̂ = β1 m_t / (1-β1^{t+1}) + (1-β1) g_t / (1-β1^t)``); Keras's keeps the same μ
    schedule but puts ε outside the *uncorrected* square root. Neither equals this rule.

    State per array: ``exp_avg``, ``exp_avg_sq``.

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        betas: (β1, β2), each in [0, 1): the decay rates of the running averages of the
            gradient and of its square.
        eps: ε (>= 0) added outside the bias-corrected square root.
        weight_decay: λ (>= 0). Coupled L2 (``λ·p`` added to the gradient) unless
            ``decoupled_weight_decay``; 0 turns it off. A number, a 0-d array or a schedule.
        momentum_decay: ψ (>= 0): the rate of the momentum schedule μ_t.
        decoupled_weight_decay: decay the weight directly, ``p ← p·(1 − γ_t λ)`` (torch's
            NAdamW), instead of coupled L2.
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
            ``polyopt.NAdam(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.nadam(lr=0.1)
    >>> params = np.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, np.array([0.5, -0.25]), state)
    >>> np.round(params, 4)
    array([ 0.8944, -1.8944])

    Paper: https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ
    """
    return make(NADAM, locals())
