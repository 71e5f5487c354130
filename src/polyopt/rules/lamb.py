"""LAMB (You et al., 2020): Adam's direction, rescaled per array by a trust ratio."""

from __future__ import annotations

from typing import Any

from .. import _validate as v
from .._base import Optimizer, Rule, bias_correction
from ._common import make, on

DEFAULTS = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-6,
    eps_root=0.0,
    weight_decay=0.0,
    maximize=False,
)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.betas(hp["betas"])
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    v.at_least("eps_root", hp["eps_root"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.flag("maximize", hp["maximize"])


def _slots(hp: dict) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq")


def _norm(x, xp):
    return xp.sqrt(xp.sum(x * x))


def _step(p, g, s, hp, t, xp):
    b1, b2 = hp["betas"]
    wd, eps_root = hp["weight_decay"], hp["eps_root"]
    if hp["maximize"]:
        g = -g
    m = b1 * s["exp_avg"] + (1 - b1) * g
    v = b2 * s["exp_avg_sq"] + (1 - b2) * (g * g)
    v_hat = v / bias_correction(b2, t, xp)
    if on(eps_root):
        v_hat = v_hat + eps_root
    u = (m / bias_correction(b1, t, xp)) / (xp.sqrt(v_hat) + hp["eps"])
    if on(wd):
        u = u + wd * p  # decay joins the direction before the trust ratio, as in optax
    p_norm, u_norm = _norm(p, xp), _norm(u, xp)
    ok = (p_norm > 0) & (u_norm > 0)
    one = xp.ones_like(p_norm)
    ratio = xp.where(ok, p_norm / xp.where(ok, u_norm, one), one)  # 1 where a norm is 0
    return p - hp["lr"] * (ratio * u), {"exp_avg": m, "exp_avg_sq": v}


LAMB = Rule("lamb", DEFAULTS, _check, _slots, _step, elementwise=False)


def lamb(
    lr: float | Any = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float | Any = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training
    BERT in 76 minutes"), as ``optax.lamb``. With g_t the gradient (negated if
    ``maximize``), γ_t the learning rate and λ = ``weight_decay``, for each array::

        m_t = β1 m_{t-1} + (1 - β1) g_t
        v_t = β2 v_{t-1} + (1 - β2) g_t²
        u_t = m_t / (1 - β1^t) / (sqrt(v_t / (1 - β2^t) + ε_root) + ε) + λ p_{t-1}
        r_t = ||p_{t-1}|| / ||u_t||        (1 where either norm is 0)
        p_t = p_{t-1} - γ_t r_t u_t

    The norms are Euclidean over the whole array (a layer's weight matrix, its bias
    vector: each gets its own r_t). This is ``optax.lamb(lr, b1, b2, eps, eps_root,
    weight_decay)`` exactly, defaults included (optax's learning rate has no default;
    1e-3 here). The weight decay is added to the direction *before* the trust ratio and
    is not multiplied by the learning rate on its own (the paper's and optax's choice);
    a ``weight_decay`` schedule is evaluated at the optimizer's step count, as optax
    evaluates it at its own count. ``lr`` and ``weight_decay`` may be schedules.

    Conventions elsewhere: the paper writes r_t = φ(||p||) / ||u_t|| with a scaling
    function φ; φ is the identity here and in optax. NVIDIA apex's ``FusedLAMB`` and
    timm's ``Lamb`` also clip the gradients by their global norm first (clip them
    yourself, or chain ``optax.clip_by_global_norm`` before the optax adapter) and can
    skip the trust ratio for arrays without weight decay; TensorFlow Addons' ``LAMB``
    excludes arrays from adaptation by name. torch.optim has no LAMB.

    Complex params are pairs of reals, as everywhere in polyopt (torch.optim's
    convention): m and v are kept per real and imaginary part, and the norms of the
    trust ratio are the complex arrays' norms. optax instead keeps v_t of |g|² (one
    value for both parts of an entry), so the two differ on complex params.

    State per array: ``exp_avg``, ``exp_avg_sq``, each of the param's shape (optax's
    ``mu``, ``nu``).

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        betas: (β1, β2), each in [0, 1): the decay rates of the running averages of the
            gradient and of its square.
        eps: ε (>= 0) added outside the square root.
        eps_root: ε_root (>= 0) added inside the square root (optax's ``eps_root``).
        weight_decay: λ (>= 0): ``λ·p`` added to the direction before the trust ratio (not
            multiplied by lr on its own). A number, a 0-d array or a schedule (evaluated at
            the optimizer's step count).
        maximize: ascend the objective instead of descending it (the gradient is negated).
        impl: which implementation runs the step. This rule reduces over each array, so only
            the generic path exists: ``"auto"`` (default) and ``"generic"`` run the rule as
            written (array-API operations, one array at a time); ``"fused"`` raises
            ValueError at ``init`` / ``update`` (there is no fused step to require).

    Returns:
        Optimizer: the functional form, a pure ``init`` / ``update`` pair;
            ``polyopt.Lamb(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.lamb(lr=0.1)
    >>> params = np.array([3.0, 4.0])
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, np.array([1.0, 1.0]), state)
    >>> np.round(params, 4)   # u ≈ (1, 1); r = ||p|| / ||u|| = 5 / sqrt(2)
    array([2.6464, 3.6464])

    Paper: https://arxiv.org/abs/1904.00962
    """
    return make(LAMB, locals())
