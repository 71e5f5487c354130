"""Adam, AdamW and AMSGrad: one rule; AdamW is Adam with decoupled weight decay."""

from __future__ import annotations

from typing import Any

from .. import _validate as v
from .._base import Optimizer, Rule, bias_correction, scalar_sqrt, two_part
from ._common import grad_term, make, param_term

DEFAULTS = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    amsgrad=False,
    maximize=False,
    decoupled_weight_decay=False,
)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.betas(hp["betas"])
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.flag("amsgrad", hp["amsgrad"])
    v.flag("maximize", hp["maximize"])
    v.flag("decoupled_weight_decay", hp["decoupled_weight_decay"])


def _slots(hp: dict) -> tuple[str, ...]:
    return (
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if hp["amsgrad"] else ("exp_avg", "exp_avg_sq")
    )


def _moments(p, g, s, hp, t, xp):
    """The new state: first and second moments of the (decayed) gradient."""
    b1, b2 = hp["betas"]
    g = grad_term(p, g, hp, decoupled=hp["decoupled_weight_decay"])
    out = {
        "exp_avg": b1 * s["exp_avg"] + (1 - b1) * g,
        "exp_avg_sq": b2 * s["exp_avg_sq"] + (1 - b2) * (g * g),
    }
    if hp["amsgrad"]:
        out["max_exp_avg_sq"] = xp.maximum(s["max_exp_avg_sq"], out["exp_avg_sq"])
    return out


def _move(p, g, s, hp, t, xp):
    """The new parameter from the new moments ``s``."""
    lr, eps = hp["lr"], hp["eps"]
    b1, b2 = hp["betas"]
    p = param_term(p, hp, decoupled=hp["decoupled_weight_decay"])
    v2 = s["max_exp_avg_sq"] if hp["amsgrad"] else s["exp_avg_sq"]
    bias1 = bias_correction(b1, t, xp)
    bias2_sqrt = scalar_sqrt(bias_correction(b2, t, xp), xp)
    denom = xp.sqrt(v2) / bias2_sqrt + eps
    return p - (lr / bias1) * (s["exp_avg"] / denom)


_step = two_part(_moments, _move)


ADAM = Rule("adam", DEFAULTS, _check, _slots, _step)
ADAMW = Rule(
    "adamw",
    {**DEFAULTS, "weight_decay": 1e-2, "decoupled_weight_decay": True},
    _check,
    _slots,
    _step,
)


def adam(
    lr: float | Any = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Any = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""Adam (Kingma & Ba, 2015), with coupled L2 weight decay and optional AMSGrad.

    With :math:`g_t` the gradient (negated if ``maximize``), :math:`\gamma_t` the learning
    rate (``lr``, or ``lr(k)`` for a schedule) and :math:`\lambda` = ``weight_decay``::

        g_t  = g_t + λ p_{t-1}                      (coupled L2; skipped if λ = 0)
        m_t  = β1 m_{t-1} + (1 - β1) g_t
        v_t  = β2 v_{t-1} + (1 - β2) g_t²
        v̂_t  = max(v̂_{t-1}, v_t) if amsgrad else v_t
        p_t  = p_{t-1} - γ_t / (1 - β1^t) · m_t / (sqrt(v̂_t) / sqrt(1 - β2^t) + ε)

    This is ``torch.optim.Adam`` exactly (defaults included). With
    ``decoupled_weight_decay=True`` the decay is applied as in :func:`adamw` instead.

    Conventions elsewhere: optax's ``adam`` puts ε outside the bias-corrected square
    root the same way (``eps_root=0``) and has no coupled decay (chain
    ``optax.add_decayed_weights`` *before* ``scale_by_adam`` to get it). Keras adds
    ``epsilon`` to the *uncorrected* ``sqrt(v_t)`` with default 1e-7; to reproduce Keras
    use ``eps=keras_eps / sqrt(1 - β2^t)``, which is step-dependent: a constant
    ``eps = keras_eps / sqrt(1 - β2)`` matches Keras's first step exactly (with 1 - β2 as
    the compute dtype rounds it: 9.9998713e-4 for β2 = 0.999 in float32), after which
    Keras's effective ε shrinks towards ``keras_eps`` and the two drift apart where
    |g| is not much larger than ε.

    AMSGrad: torch (and polyopt) keep the running maximum of the raw v_t and divide it
    by (1 - β2^t); optax's ``amsgrad`` keeps the maximum of the bias-corrected
    v_s / (1 - β2^s), which is never smaller, so its steps are never larger (the first
    step is the same). ``optax.amsgrad(lambda c: lr * sqrt(1 - β2^(c+1)), eps=0,
    bias_correction_nu=False)`` is this rule with ``eps=0``.

    State per array: ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad).

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        betas: (β1, β2), each in [0, 1): the decay rates of the running averages of the
            gradient and of its square.
        eps: ε (>= 0) added outside the bias-corrected square root.
        weight_decay: λ (>= 0). Coupled L2 (``λ·p`` added to the gradient) unless
            ``decoupled_weight_decay``; 0 turns it off. A number, a 0-d array or a schedule.
        amsgrad: use the running maximum of the second moment (AMSGrad).
        maximize: ascend the objective instead of descending it (the gradient is negated).
        decoupled_weight_decay: decay the weight directly, ``p ← p·(1 − γ_t λ)`` before the
            step (AdamW-style), instead of adding ``λ·p`` to the gradient.
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
            ``polyopt.Adam(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.adam(lr=0.1)
    >>> params = np.array([1.0, -2.0])
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, np.array([0.5, -0.25]), state)
    >>> np.round(params, 6)   # the first Adam step moves each entry by about lr
    array([ 0.9, -1.9])

    Paper: https://arxiv.org/abs/1412.6980 ; AMSGrad: https://openreview.net/forum?id=ryQu7f-RZ
    """
    return make(ADAM, locals())


def adamw(
    lr: float | Any = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Any = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = True,
    impl: str = "auto",
) -> Optimizer:
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay.

    The weight is decayed before the Adam step, by the current learning rate::

        p_{t-1} ← p_{t-1} · (1 - γ_t λ)
        (then the Adam update of :func:`adam`, with no λ added to the gradient)

    With a schedule ``lr = polyopt.schedules.cosine(α, T)``, γ_t = α·η_t, so the decay
    follows the schedule multiplier η_t as the paper requires. This equals
    ``torch.optim.AdamW`` and ``optax.adamw`` (both scale the decay by the learning rate),
    and Keras's ``AdamW``. The paper writes the decay as ``η_t λ' p`` with λ' not
    multiplied by α: to use a paper value λ', pass ``weight_decay = λ' / α``.
    :func:`polyopt.schedules.normalized_weight_decay` gives the paper's normalized λ.

    ``weight_decay=0`` gives exactly :func:`adam`. Default ``weight_decay`` is torch's
    1e-2 (optax's is 1e-4).

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        betas: (β1, β2), each in [0, 1): the decay rates of the running averages of the
            gradient and of its square.
        eps: ε (>= 0) added outside the bias-corrected square root.
        weight_decay: λ (>= 0), decoupled: ``p ← p·(1 − γ_t λ)`` before the Adam step
            (torch's default 1e-2). A number, a 0-d array or a schedule.
        amsgrad: use the running maximum of the second moment (AMSGrad).
        maximize: ascend the objective instead of descending it (the gradient is negated).
        decoupled_weight_decay: True (default) for AdamW; False makes the decay coupled L2,
            i.e. :func:`adam`.
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
            ``polyopt.AdamW(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.adamw(lr=0.1, weight_decay=0.5)
    >>> params = {"w": np.array([2.0])}
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, {"w": np.array([0.0])}, state)
    >>> params["w"]   # zero gradient: only the decay acts, 2 · (1 - 0.1 · 0.5)
    array([1.9])

    Paper: https://arxiv.org/abs/1711.05101
    """
    return make(ADAMW, locals())
