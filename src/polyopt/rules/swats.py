"""SWATS (Keskar & Socher, 2017, "Improving Generalization Performance by Switching
from Adam to SGD"): Adam until a criterion on the whole parameter group holds, then
SGD with momentum at the learning rate Adam's steps implied.

The criterion needs two sums over every array of a group (the projection of the Adam
step on the gradient), so the rule has a group part (:attr:`polyopt._base.Rule.group`):
each array's step returns its two sums, and :func:`_group` folds them into the group's
numbers. Those are kept as 0-d slots on every array of the group (``gamma_avg``,
``sgd_lr``, ``switch_step``: the same values on each), so they travel in state dicts
and checkpoints like any other state.
"""

from __future__ import annotations

from typing import Any

from .. import _tree, _xp
from .. import _validate as v
from .._base import Optimizer, OptState, Rule, StatefulOptimizer, bias_correction, scalar_sqrt
from ._common import grad_term, make

DEFAULTS = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-9,
    weight_decay=0.0,
    maximize=False,
)

#: The group's numbers, one 0-d copy per array: λ_k (the running average of the
#: projected learning rate γ, not bias-corrected), Λ (the SGD learning rate; 0 before
#: the switch) and the step at which the group switched (0 before).
SHARED = ("gamma_avg", "sgd_lr", "switch_step")
SLOTS = ("exp_avg", "exp_avg_sq", "momentum_buffer", *SHARED)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0)
    v.betas(hp["betas"])
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    v.flag("maximize", hp["maximize"])


def _slots(hp: dict) -> tuple[str, ...]:
    return SLOTS


def _layout(shape: tuple, hp: dict) -> dict:
    return {**{n: tuple(shape) for n in SLOTS[:3]}, **{n: () for n in SHARED}}


def _init(p: Any, hp: dict, xp: Any) -> dict:
    if _xp.float_kind(xp, p.dtype) == "complex":
        raise TypeError(
            f"swats does not take complex params (got an array of shape {tuple(p.shape)} "
            f"and dtype {p.dtype}): its switch criterion projects real steps on real "
            "gradients; pass the real and imaginary parts as separate real arrays"
        )
    total = xp.sum(p)  # 0-d, placed as JAX places a reduction of p
    return {
        "exp_avg": xp.zeros_like(p),
        "exp_avg_sq": xp.zeros_like(p),
        "momentum_buffer": xp.zeros_like(p),
        **{n: xp.zeros_like(total) for n in SHARED},  # distinct buffers (JAX donation)
    }


def _step(p, g, s, hp, t, xp):
    b1, b2 = hp["betas"]
    g = grad_term(p, g, hp)
    switched = _xp.host_value(s["switch_step"])  # None under jit / on a device: both
    new = dict(s)
    if switched is None or switched == 0:  # Adam, in the paper's form (ε outside √v)
        m = b1 * s["exp_avg"] + (1 - b1) * g
        a = b2 * s["exp_avg_sq"] + (1 - b2) * (g * g)
        c = hp["lr"] * scalar_sqrt(bias_correction(b2, t, xp), xp) / bias_correction(b1, t, xp)
        d = -c * (m / (xp.sqrt(a) + hp["eps"]))
        p_adam, adam = p + d, {"exp_avg": m, "exp_avg_sq": a}
        dd, dg = xp.sum(d * d), xp.sum(d * g)
    if switched is None or switched != 0:  # SGD with momentum at lr Λ
        buf = b1 * s["momentum_buffer"] + g
        p_sgd = p - ((1 - b1) * s["sgd_lr"]) * buf
    if switched == 0:
        return p_adam, {**new, **adam, "dd": dd, "dg": dg}
    if switched is not None:
        zero = xp.zeros_like(s["switch_step"])
        return p_sgd, {**new, "momentum_buffer": buf, "dd": zero, "dg": zero}
    on = s["switch_step"] > 0
    new["exp_avg"] = xp.where(on, s["exp_avg"], adam["exp_avg"])
    new["exp_avg_sq"] = xp.where(on, s["exp_avg_sq"], adam["exp_avg_sq"])
    new["momentum_buffer"] = xp.where(on, buf, s["momentum_buffer"])
    zero = xp.zeros_like(dd)
    new["dd"], new["dg"] = xp.where(on, zero, dd), xp.where(on, zero, dg)
    return xp.where(on, p_sgd, p_adam), new


def _group(stats: list, shared: dict, hp: dict, t: Any, xp: Any) -> dict:
    """The switch criterion of the paper's Algorithm 1 over the group's arrays: with
    p_k the Adam steps and g_k the gradients, γ_k = p_kᵀp_k / (−p_kᵀg_k) when
    p_kᵀg_k ≠ 0, λ_k = β2 λ_{k-1} + (1 − β2) γ_k, and the group switches when
    k > 1 and |λ_k / (1 − β2^k) − γ_k| < ε, taking Λ = λ_k / (1 − β2^k)."""
    b2 = hp["betas"][1]
    lam, k_sw = shared["gamma_avg"], shared["switch_step"]
    dd = sum(st["dd"] for st in stats[1:]) + stats[0]["dd"]
    dg = sum(st["dg"] for st in stats[1:]) + stats[0]["dg"]
    moved = xp.logical_and(k_sw == 0, dg != 0)
    gamma = dd / xp.where(moved, -dg, xp.ones_like(dg))
    lam = xp.where(moved, b2 * lam + (1 - b2) * gamma, lam)
    lam_hat = lam / bias_correction(b2, t, xp)
    k = xp.zeros_like(k_sw) + t
    switch = xp.logical_and(moved, xp.logical_and(k > 1, xp.abs(lam_hat - gamma) < hp["eps"]))
    return {
        "gamma_avg": lam,
        "sgd_lr": xp.where(switch, lam_hat, shared["sgd_lr"]),
        "switch_step": xp.where(switch, k, k_sw),
    }


SWATS = Rule(
    "swats",
    DEFAULTS,
    _check,
    _slots,
    _step,
    init=_init,
    elementwise=False,  # the step sums over its array
    layout=_layout,
    group=_group,
    shared=SHARED,
)


def swats(
    lr: float | Any = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-9,
    weight_decay: float | Any = 0.0,
    *,
    maximize: bool = False,
    impl: str = "auto",
) -> Optimizer:
    r"""SWATS (Keskar & Socher, 2017): Adam that switches to SGD with momentum once the
    learning rate its steps imply has settled, per parameter group, as the paper's
    Algorithm 1.

    With g_k the (decayed) gradient and k the step, while in the Adam phase::

        m_k = β1 m_{k-1} + (1 - β1) g_k
        a_k = β2 a_{k-1} + (1 - β2) g_k²
        p_k = -lr_k · sqrt(1 - β2^k) / (1 - β1^k) · m_k / (sqrt(a_k) + ε)
        w_k = w_{k-1} + p_k

    and over the group's arrays (sums over all of them), if p_kᵀg_k ≠ 0::

        γ_k = p_kᵀp_k / (-p_kᵀg_k)          the step's projection on the gradient
        λ_k = β2 λ_{k-1} + (1 - β2) γ_k
        switch if k > 1 and |λ_k / (1 - β2^k) - γ_k| < ε, with Λ = λ_k / (1 - β2^k)

    From the step after the switch on, the group runs SGD with momentum β1::

        v_k = β1 v_{k-1} + g_k              (v = 0 at the switch)
        w_k = w_{k-1} - (1 - β1) Λ v_k

    which is SGD at lr Λ with torch's ``dampening=β1`` (except on its first step, where
    torch's buffer starts at g rather than (1 - β1) g).

    Read the switch from the state: ``state.slots["switch_step"][i]`` (0 before the
    switch) and ``state.slots["sgd_lr"][i]`` (Λ) for an array i of the group, the same
    on each of its arrays, or :func:`swats_switches` per group. They are kept in
    ``state_dict`` and in checkpoints like every slot; ``polyopt.torch.SWATS`` keeps them
    in each param's ``state[p]``.

    Conventions: the paper's Adam puts ε outside the uncorrected square root (the
    ``ε̂`` form of Kingma & Ba's section 2), where ``polyopt.adam`` (torch) adds ε to
    ``sqrt(v / (1 - β2^k))``; the paper uses one ε (default 1e-9) for Adam and for the
    criterion, and so does this rule. ``weight_decay`` is coupled (L2, ``g + λw``, in
    both phases; the paper has none), ``maximize`` as torch. ``lr`` may be a schedule;
    it sets the Adam phase's steps, and Λ is the SGD phase's constant learning rate (the
    paper's; scale it after the switch with a schedule on the group if you need to).
    k counts the optimizer's steps (the paper's k) in the criterion, each array's own
    updates in the Adam bias corrections; they differ only where grads were None.
    The switch is per parameter group: put each layer in a group of its own to switch
    layer by layer. Real params only.

    State per array: ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, and the group's
    numbers as 0-d arrays in the param's dtype: ``gamma_avg`` (λ_k), ``sgd_lr`` (Λ),
    ``switch_step``. (A float16 or bfloat16 param keeps them in its dtype: the step is
    exact up to 2048 or 256 there.)

    Args:
        lr: learning rate γ (>= 0): a number, a 0-d array of the params' library (a torch
            tensor, a JAX array or tracer), or a schedule, a function of the step count such
            as ``polyopt.schedules.cosine(1e-3, T_max=1000)``. It sets the Adam phase; the
            SGD phase's learning rate Λ comes from the switch criterion.
        betas: (β1, β2), each in [0, 1): Adam's moment decay rates; β2 also averages the
            criterion's γ_k, β1 is the SGD phase's momentum.
        eps: ε (>= 0): Adam's, outside the uncorrected square root, and the switch
            criterion's threshold (the paper's one ε).
        weight_decay: λ (>= 0), coupled L2 in both phases: ``λ·p`` added to the gradient. A
            number, a 0-d array or a schedule.
        maximize: ascend the objective instead of descending it (the gradient is negated).
        impl: which implementation runs the step. This rule reduces over each array, so only
            the generic path exists: ``"auto"`` (default) and ``"generic"`` run the rule as
            written (array-API operations, one array at a time); ``"fused"`` raises
            ValueError at ``init`` / ``update`` (there is no fused step to require).

    Returns:
        Optimizer: the functional form, a pure ``init`` / ``update`` pair;
            ``polyopt.SWATS(params, ...)`` is the stateful form of the same rule.

    Example: a linear loss (constant gradient g) makes every Adam step about
    -lr·sign(g), so γ is constant, the group switches at step 2 and Λ = lr·n / Σ|g|.

    >>> import numpy as np, polyopt
    >>> opt = polyopt.SWATS([np.array([1.0, -2.0])], lr=0.1)
    >>> for _ in range(5):
    ...     opt.step([np.array([2.0, -4.0])])
    >>> sw = polyopt.swats_switches(opt)[0]
    >>> sw["switch_step"], round(sw["sgd_lr"], 6)      # 0.1 * 2 / 6
    (2, 0.033333)

    Paper: https://arxiv.org/abs/1712.07628
    """
    return make(SWATS, locals())


def swats_switches(optimizer: Any, state: OptState | None = None, params: Any = None) -> list:
    """Per parameter group, where SWATS switched: ``[{"switch_step": k or None,
    "sgd_lr": Λ or None}, ...]`` (None before the switch).

    ``swats_switches(opt)`` for ``polyopt.SWATS`` or ``polyopt.torch.SWATS``;
    ``swats_switches(opt, state, params)`` for the functional form (the group
    boundaries come from ``params``). Reads the state; changes nothing.

    Args:
        optimizer: a ``polyopt.SWATS`` or ``polyopt.torch.SWATS`` object, or a
            functional ``polyopt.swats(...)`` optimizer.
        state: with the functional form, its :class:`~polyopt.OptState`.
        params: with the functional form, the params the state was made for (their
            parameter groups are the groups reported).

    Returns:
        list: one dict per parameter group, ``{"switch_step": int or None, "sgd_lr":
        float or None}``.

    Raises:
        TypeError: not a SWATS optimizer, or the functional form without its state and
            params.
    """
    if isinstance(optimizer, StatefulOptimizer):
        if optimizer._opt.rule is not SWATS:
            raise TypeError(
                f"swats_switches needs a SWATS optimizer, got {type(optimizer).__name__}"
            )
        state = optimizer.state
        sizes = [len(_tree.flatten(g["params"])[0]) for g in optimizer.param_groups]
    elif isinstance(optimizer, Optimizer):
        if optimizer.rule is not SWATS:
            raise TypeError(
                f"swats_switches needs polyopt.swats, got polyopt.{optimizer.rule.name}"
            )
        if not isinstance(state, OptState) or params is None:
            raise TypeError(
                "swats_switches(opt, state, params): the functional form needs the state "
                f"and the params it was made for, got state={type(state).__name__}"
            )
        trees, _, _ = _tree.split_groups(_tree.materialize(params))
        sizes = [len(_tree.flatten(t)[0]) for t in trees]
    elif getattr(getattr(optimizer, "_polyopt", None), "rule", None) is SWATS:  # polyopt.torch
        out = []
        for g in optimizer.param_groups:
            s = next(
                (
                    optimizer.state[p]
                    for p in g["params"]
                    if "switch_step" in optimizer.state.get(p, {})
                ),
                None,
            )
            out.append(
                _entry(None if s is None else s["switch_step"], None if s is None else s["sgd_lr"])
            )
        return out
    else:
        raise TypeError(
            "swats_switches needs polyopt.SWATS, polyopt.torch.SWATS or polyopt.swats "
            f"with its state, got {type(optimizer).__name__}"
        )
    out, start = [], 0
    for n in sizes:
        ks = state.slots["switch_step"][start : start + n]
        lrs = state.slots["sgd_lr"][start : start + n]
        i = next((j for j, x in enumerate(ks) if x is not None), None)
        out.append(_entry(None if i is None else ks[i], None if i is None else lrs[i]))
        start += n
    return out


def _entry(k: Any, lr: Any) -> dict:
    k = None if k is None else int(_xp.concrete_value(k))
    return {
        "switch_step": k if k else None,
        "sgd_lr": float(_xp.concrete_value(lr)) if k else None,
    }
