"""SGD with momentum, Nesterov momentum, coupled L2 or decoupled (SGDW) weight decay."""

from __future__ import annotations

from typing import Any

from .. import _validate as v
from .._base import Optimizer, Rule, after_first
from ._common import decay, make, on

DEFAULTS = dict(
    lr=1e-3,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    maximize=False,
    decoupled_weight_decay=False,
)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.at_least("momentum", hp["momentum"], 0.0, schedulable=False)
    v.at_least("dampening", hp["dampening"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.flag("nesterov", hp["nesterov"])
    v.flag("maximize", hp["maximize"])
    v.flag("decoupled_weight_decay", hp["decoupled_weight_decay"])
    mu, tau = v.value(hp["momentum"]), v.value(hp["dampening"])
    if hp["nesterov"] and ((mu is not None and mu <= 0) or (tau is not None and tau != 0)):
        raise ValueError(
            "nesterov needs momentum > 0 and dampening = 0, "
            f"got momentum={hp['momentum']!r}, dampening={hp['dampening']!r}"
        )


def _slots(hp: dict) -> tuple[str, ...]:
    return ("momentum_buffer",) if on(hp["momentum"]) else ()


def _step(p, g, s, hp, t, xp):
    lr, mu = hp["lr"], hp["momentum"]
    p, g = decay(p, g, hp, decoupled=hp["decoupled_weight_decay"])
    out = {}
    if on(mu):
        # torch starts the buffer at g (no dampening on step one); the buffer starts at
        # zero here, so step one uses coefficient 1 instead of (1 - dampening).
        buf = mu * s["momentum_buffer"] + (1 - hp["dampening"] * after_first(t, xp)) * g
        out["momentum_buffer"] = buf
        g = g + mu * buf if hp["nesterov"] else buf
    return p - lr * g, out


SGD_RULE = Rule("sgd", DEFAULTS, _check, _slots, _step)


def sgd(
    lr: float | Any = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float | Any = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""Stochastic gradient descent with (Nesterov) momentum, as ``torch.optim.SGD``.

    With γ_t the learning rate, μ = ``momentum``, τ = ``dampening``, λ = ``weight_decay``::

        g_t = g_t + λ p_{t-1}                      (coupled L2; skipped if λ = 0)
        b_t = μ b_{t-1} + (1 - τ) g_t              (b_1 = g_1; only if μ ≠ 0)
        d_t = g_t + μ b_t if nesterov else b_t     (d_t = g_t if μ = 0)
        p_t = p_{t-1} - γ_t d_t

    ``decoupled_weight_decay=True`` is SGDW from the AdamW paper: instead of adding
    λp to the gradient (where momentum then carries it), the weight is decayed directly,
    ``p ← p (1 - γ_t λ)``, before the step. With momentum the two differ: L2 decay is
    accumulated in the buffer and amplified by up to 1/(1 - μ); SGDW's is not.

    Conventions elsewhere: Keras puts the learning rate inside the velocity
    (``v ← μ v - γ g; p ← p + v``); with a constant lr this is the same trajectory, with a
    changing lr it is not. optax's ``sgd`` (``trace``) has no dampening and starts the
    buffer at zero, which with τ = 0 is the same as torch, Nesterov included; it scales
    by the lr after the trace, so it matches with a schedule too.

    State per array: ``momentum_buffer`` (only if momentum ≠ 0).

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``.
        momentum: μ (>= 0): momentum factor; 0 (default) keeps no buffer.
        dampening: τ (>= 0): dampening of the momentum, ``b ← μ b + (1 − τ) g``.
        weight_decay: λ (>= 0). Coupled L2 (``λ·p`` added to the gradient) unless
            ``decoupled_weight_decay``; 0 turns it off. A number, a 0-d array or a schedule.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        maximize: ascend the objective instead of descending it (the gradient is negated).
        decoupled_weight_decay: SGDW: decay the weight directly, ``p ← p·(1 − γ_t λ)``
            before the step, instead of adding ``λ·p`` to the gradient.
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
            ``polyopt.SGD(params, ...)`` is the stateful form of the same rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.sgd(lr=0.1, momentum=0.9)
    >>> params = {"w": np.array([1.0, -2.0])}
    >>> state = opt.init(params)
    >>> params, state = opt.update(params, {"w": np.array([0.5, 0.5])}, state)
    >>> params["w"]
    array([ 0.95, -2.05])
    """
    return make(SGD_RULE, locals())
