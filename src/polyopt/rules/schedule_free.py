"""Schedule-free AdamW (Defazio et al., 2024): interpolation and averaging in place of
momentum and of a decaying learning-rate schedule."""

from __future__ import annotations

import functools
import itertools
from typing import Any

from .. import _tree, _validate, _xp
from .. import _validate as v
from .._base import Optimizer, OptState, Rule, StatefulOptimizer, bias_correction
from ._common import make, on

DEFAULTS = dict(
    lr=0.0025,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    warmup_steps=0,
    weight_lr_power=2.0,
)


def _check(hp: dict) -> None:
    v.at_least("lr", hp["lr"], 0.0, schedulable=False)
    v.betas(hp["betas"])
    b1 = _validate.value(hp["betas"][0])
    if b1 is not None and not b1 > 0:
        raise ValueError(
            f"betas[0] must be > 0 for schedule-free AdamW (the average x is recovered "
            f"as (y - (1 - b1) z) / b1), got {hp['betas'][0]!r}"
        )
    v.at_least("eps", hp["eps"], 0.0, schedulable=False)
    v.at_least("weight_decay", hp["weight_decay"], 0.0)
    w = hp["warmup_steps"]
    if not (type(w) is int or (type(w) is float and w.is_integer())):
        raise TypeError(f"warmup_steps must be an int >= 0, got {w!r}")
    if w < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {w!r}")
    v.at_least("weight_lr_power", hp["weight_lr_power"], 0.0, schedulable=False)


def _slots(hp: dict) -> tuple[str, ...]:
    return ("z", "exp_avg_sq")


def _init(p, hp, xp):
    return {"z": _xp.copy(xp, p), "exp_avg_sq": xp.zeros_like(p)}


@functools.lru_cache(maxsize=16)
def _prefix_sums(warmup: int, power: float) -> tuple[float, ...]:
    """``S[n] = sum_{i=1..n} (i / warmup)^power`` for n = 0..warmup, in float64."""
    terms = ((i / warmup) ** power for i in range(1, warmup + 1))
    return (0.0, *itertools.accumulate(terms))


def _averaging(t, warmup: int, power, xp):
    """``(c_t, γ-fraction of step t)``: the weight of z_t in the average x_t, and the
    fraction of ``lr`` that moves z at step t (1-based).

    optax's weights are ``w_i = max_lr_i^power`` with ``lr_i`` the warmup schedule at
    count i (linear from 0 to lr over ``warmup`` steps), z's step uses the schedule at
    count i - 1, and ``c_t = w_t / (w_1 + ... + w_t)``. For a constant ``lr`` after the
    warmup the schedule never decreases, so ``max_lr_i = lr · min(i, W) / W`` and ``lr``
    cancels in c_t: both numbers are functions of t alone, so no scalar state is kept.
    """
    if warmup == 0:
        return 1.0 / t, 1.0
    if _xp.is_python_scalar(t) and _xp.is_python_scalar(power):
        n = min(t, warmup)
        total = _prefix_sums(warmup, float(power))[n] + max(t - warmup, 0)
        return (n / warmup) ** power / total, min(t - 1, warmup) / warmup
    # an array count (jit) or an array power: the same sums with array operations
    ref = t if _xp.is_array(t) and not _xp.is_python_scalar(t) else power
    t = xp.zeros_like(ref) + t
    cap = xp.zeros_like(t) + warmup
    i = xp.arange(1, warmup + 1, dtype=t.dtype, device=_xp.device_of(t))
    m = (i / warmup) ** power
    total = xp.sum(xp.where(i <= t, m, xp.zeros_like(m))) + xp.maximum(t - cap, xp.zeros_like(t))
    n = xp.minimum(t, cap)
    return (n / warmup) ** power / total, xp.minimum(t - 1, cap) / warmup


def _step(p, g, s, hp, t, xp):
    b1, b2 = hp["betas"]
    wd = hp["weight_decay"]
    ck, frac = _averaging(t, int(hp["warmup_steps"]), hp["weight_lr_power"], xp)
    z = s["z"]
    v = b2 * s["exp_avg_sq"] + (1 - b2) * (g * g)
    u = g / (xp.sqrt(v / bias_correction(b2, t, xp)) + hp["eps"])
    if on(wd):
        u = u + wd * p  # decay at y, where the gradient was taken (optax, the paper)
    lr = hp["lr"] if type(frac) is float and frac == 1.0 else hp["lr"] * frac
    z_new = z - lr * u
    x = (p - (1 - b1) * z) / b1  # the average, recovered from y and z as optax does
    x = (1 - ck) * x + ck * z_new
    return b1 * x + (1 - b1) * z_new, {"z": z_new, "exp_avg_sq": v}


SCHEDULE_FREE_ADAMW = Rule(
    "schedule_free_adamw",
    DEFAULTS,
    _check,
    _slots,
    _step,
    init=_init,
    schedulable=("weight_decay",),
)


def schedule_free_adamw(
    lr: float | Any = 0.0025,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Any = 0.0,
    warmup_steps: int | None = 0,
    weight_lr_power: float = 2.0,
    *,
    impl: str = "auto",
) -> Optimizer:
    r"""Schedule-free AdamW (Defazio et al., 2024, "The Road Less Scheduled"), as
    ``optax.contrib.schedule_free_adamw``.

    The params you hold are y, where gradients are taken. The optimizer keeps z (an
    Adam step without momentum) and the average x, which is the point to evaluate
    and to ship: read it with :func:`schedule_free_eval_params`. With g_t the gradient
    at y_{t-1}, λ = ``weight_decay``, β1 the interpolation weight (``betas[0]``)::

        v_t = β2 v_{t-1} + (1 - β2) g_t²
        z_t = z_{t-1} - γ_{t-1} (g_t / (sqrt(v_t / (1 - β2^t)) + ε) + λ y_{t-1})
        x_{t-1} = (y_{t-1} - (1 - β1) z_{t-1}) / β1
        x_t = (1 - c_t) x_{t-1} + c_t z_t
        y_t = β1 x_t + (1 - β1) z_t

    starting from z_0 = x_0 = y_0 = the initial params. Warmup: γ_i = lr · min(i, W) / W
    with W = ``warmup_steps`` (so z does not move on the first step), γ_i = lr if W = 0.
    The averaging weights are ``w_i = (lr · min(i, W) / W)^p`` with p =
    ``weight_lr_power``, ``c_t = w_t / (w_1 + ... + w_t)``: early, small-lr iterates
    count less; c_t = 1/t without warmup.

    Defaults and arguments are optax's, renamed (``learning_rate`` → ``lr``, ``b1, b2`` →
    ``betas``). ``warmup_steps=0`` (or ``None``, optax's default) means no warmup;
    optax's ``warmup_steps=0`` instead builds a warmup schedule of length 0, which
    holds the learning rate at 0 for ever. optax's ``state_dtype`` is not taken: z is
    kept in the param's dtype (the math in float32 for half precision).

    State, and design: c_t and γ_t depend on t alone (for a constant lr, after the
    warmup the schedule never decreases, so optax's running ``max_lr`` is the schedule
    itself and lr cancels in c_t), so no scalar state (optax's ``weight_sum``,
    ``max_lr``, ``step_count``) is kept, and every slot has its param's shape: ``z``
    and ``exp_avg_sq`` (optax's ``z`` and ``nu``). t is each array's own update count
    (an array skipped with a ``None`` gradient keeps its average where it was). Hence
    ``lr`` cannot be a schedule (use ``warmup_steps``; schedule-free training needs no
    decay); if you change ``lr`` between steps, z moves with the new lr but the
    averaging weights stay those of a constant lr, where optax would weight later
    iterates more after an increase. ``weight_decay`` may be a schedule.

    Complex params are pairs of reals (torch.optim's convention): v is kept per real
    and imaginary part, where optax keeps one |g|² per entry.

    Args:
        lr: learning rate (>= 0) of z: a number or a 0-d array, not a schedule (use
            ``warmup_steps``).
        betas: (β1, β2): β1 in (0, 1), the interpolation weight between the average x and z;
            β2 in [0, 1), the decay rate of the second moment.
        eps: ε (>= 0) added outside the bias-corrected square root.
        weight_decay: λ (>= 0): ``λ·y`` added to z's step. A number, a 0-d array or a
            schedule.
        warmup_steps: W, an int >= 0 (or None, the same as 0): the learning rate of z rises
            linearly over the first W steps.
        weight_lr_power: p (>= 0): the power of the warmup learning rate in the averaging
            weights.
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
            ``polyopt.ScheduleFreeAdamW(params, ...)`` is the stateful form of the same
            rule.

    Example:

    >>> import numpy as np, polyopt
    >>> opt = polyopt.schedule_free_adamw(lr=0.5, betas=(0.5, 0.999), eps=0.0)
    >>> y = np.array([1.0])
    >>> state = opt.init(y)
    >>> y, state = opt.update(y, np.array([2.0]), state)
    >>> state.slots["z"][0]   # z moves by lr; c_1 = 1 so x = z
    array([0.5])
    >>> y, polyopt.schedule_free_eval_params(state, y, optimizer=opt)   # y = (x + z) / 2
    (array([0.5]), array([0.5]))

    Paper: https://arxiv.org/abs/2405.15682
    """
    if warmup_steps is None:
        warmup_steps = 0
    return make(SCHEDULE_FREE_ADAMW, locals())


def schedule_free_eval_params(
    state_or_optimizer: OptState | StatefulOptimizer,
    params: Any = None,
    *,
    optimizer: Optimizer | None = None,
) -> Any:
    """The averaged params x of :func:`schedule_free_adamw`, to evaluate (and ship) the
    model with: ``x = (y - (1 - β1) z) / β1`` per array, as
    ``optax.contrib.schedule_free_eval_params(state, params)``.

    - ``schedule_free_eval_params(opt)`` for the stateful form (``params`` defaults to
      ``opt.params``; each group's own ``betas`` is used);
    - ``schedule_free_eval_params(state, params, optimizer=opt)`` for the functional
      form: an :class:`OptState` holds no hyperparameters, so β1 comes from
      ``optimizer`` (the one that made ``state``), and from each group's ``betas`` where
      ``params`` are torch-style groups.

    Changes nothing.

    Args:
        state_or_optimizer: a stateful ``polyopt.ScheduleFreeAdamW``, or the
            :class:`~polyopt.OptState` of a functional ``polyopt.schedule_free_adamw``.
        params: the params y the state belongs to (any structure ``init`` takes); by
            default, for a stateful optimizer, ``opt.params``. Required with an
            ``OptState``.
        optimizer: the functional optimizer that made ``state`` (for its ``betas``);
            only with an ``OptState``, where it is required.

    Returns:
        The averaged params x: new arrays of the params' library, in the structure of
        ``params``.

    Raises:
        TypeError: for an optimizer that is not schedule-free AdamW, or ``optimizer``
            missing with an ``OptState`` (given with a stateful one).
        ValueError: ``params`` missing with an ``OptState``, or a state with no ``z``.
    """
    if isinstance(state_or_optimizer, StatefulOptimizer):
        opt = state_or_optimizer
        if optimizer is not None:
            raise TypeError("optimizer= is for an OptState; a stateful optimizer has its own")
        if opt._opt.rule is not SCHEDULE_FREE_ADAMW:
            raise TypeError(
                f"schedule_free_eval_params needs a schedule-free optimizer, got "
                f"{type(opt).__name__} ({opt._opt.rule.name})"
            )
        state = opt.state
        if params is None:
            params = opt.params
        hyper = opt._opt.hyperparams
        group_betas = [g.get("betas", hyper["betas"]) for g in opt.param_groups]
    elif isinstance(state_or_optimizer, OptState):
        state = state_or_optimizer
        if not isinstance(optimizer, Optimizer) or optimizer.rule is not SCHEDULE_FREE_ADAMW:
            raise TypeError(
                "schedule_free_eval_params(state, params, optimizer=opt) needs the "
                "schedule_free_adamw optimizer that made the state (an OptState holds no "
                f"hyperparameters, so not b1), got optimizer={optimizer!r:.80}"
            )
        if params is None:
            raise ValueError("params must be given with an OptState (the y the user holds)")
        hyper = optimizer.hyperparams
        group_betas = None
    else:
        raise TypeError(
            "state_or_optimizer must be the OptState of schedule_free_adamw or a stateful "
            f"schedule-free optimizer, got {type(state_or_optimizer).__name__}"
        )
    if "z" not in state.slots:
        raise ValueError(
            f"the state has no 'z' slot (slots: {sorted(state.slots)}); was it made by "
            "schedule_free_adamw?"
        )
    params = _tree.materialize(params)
    trees, rest, grouped = _tree.split_groups(params)
    if group_betas is None or len(group_betas) != len(trees):
        group_betas = [r.get("betas", hyper["betas"]) for r in rest]
    flat = [_tree.flatten(t) for t in trees]
    n = sum(len(lv) for lv, _ in flat)
    zs = state.slots["z"]
    if len(zs) != n:
        raise ValueError(f"the state holds z for {len(zs)} arrays, params has {n}")
    leaves = [leaf for lv, _ in flat for leaf in lv]
    xp = _xp.namespace(leaves, "params")
    new_trees, i = [], 0
    for (lv, structure), betas in zip(flat, group_betas):
        b1 = betas[0]
        b1 = b1 if _xp.is_python_scalar(b1) else _validate.normalize("betas[0]", b1)
        out = []
        for y in lv:
            z = zs[i]
            if tuple(z.shape) != tuple(y.shape):
                raise ValueError(
                    f"state z[{i}] has shape {tuple(z.shape)}, params' array {i} has "
                    f"shape {tuple(y.shape)}"
                )
            out.append(_eval_one(xp, y, z, b1))
            i += 1
        new_trees.append(_tree.unflatten(structure, out))
    return _tree.join_groups(params, new_trees, grouped)


def _eval_one(xp, y, z, b1):
    cdt = _xp.compute_dtype(xp, y.dtype)
    if _xp.is_array(b1) and not _xp.is_python_scalar(b1):
        b1 = xp.astype(b1, _xp.real_dtype(xp, cdt))
    if cdt != y.dtype:
        x = (xp.astype(y, cdt) - (1 - b1) * xp.astype(z, cdt)) / b1
        return xp.astype(x, y.dtype)
    return _xp.as_array(xp, (y - (1 - b1) * z) / b1)  # a 0-d array stays an array
