"""polyopt against its peers: optax, and hand-written Keras 3 and AdamW-paper updates.

What runs: float32, under ``jax.jit`` on both sides (one jitted step function per
optimizer, called STEPS = 100 times, the step count carried in the state as an int32
array), on the same data: fixed-seed NumPy arrays (a dict holding a 6x4, a 4 and a 1
element array) turned into JAX arrays with ``jnp.asarray``. The gradients are a fixed
sequence, not functions of the params, so both sides see identical gradients and any
difference is the update rule's, not a feedback of earlier differences.

Tolerance: ``RTOL = 1e-5`` on the normwise relative difference: per parameter array,
``max_t max|a_t - b_t| / max_t max|b_t|`` over the steps compared (all 100 unless a test
says otherwise). An elementwise rtol is too strict: an entry that crosses zero (the
1-element array does, at some step) carries the rounding error of the terms that
cancelled, about ulp(max|p|), not ulp(p). The same formula written in another order
(optax divides the moments by ``1 - β^t`` before the root, polyopt after it;
``rsqrt(v) · g`` against ``g / sqrt(v)``; ``p - lr·(u + λp)`` against
``p·(1 - lr·λ) - lr·u``) differs by a few float32 ulps per step; over 100 steps the
measured maximum is 2.4e-7, except AdamW at 1.7e-6: polyopt (like torch) multiplies p by
``1 - lr·λ`` rounded to float32, the same rounding every step, so it adds up linearly
(0.999 rounds to 1 - 0.99998713e-3: λ is effectively 1.3e-5 relative too small). On the
other side, the convention differences tested below measure 2e-2 or more (asserted
>= DIFFERS = 1e-3), and flipping one option of a matched pair (amsgrad, centered,
coupled vs decoupled decay, eps 1e-6 vs 1e-8 with small gradients) moves the result by
6e-3 or more: 1e-5 sits a factor ~6 above the largest same-formula difference and ~600
below the smallest one-option change. Printed values: ``pytest -s tests/test_peers.py``.

Expected values come from optax or from formulas written out in this file (in jnp for
the float32 jit runs, in NumPy float64 for the predicted size of a difference), never
from polyopt itself.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

optax = pytest.importorskip("optax")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import polyopt  # noqa: E402
from polyopt import schedules as S  # noqa: E402

STEPS = 100
RTOL = 1e-5
#: A convention difference must show at least this much (normwise relative).
DIFFERS = 1e-3

SHAPES = {"w": (6, 4), "b": (4,), "s": (1,)}


# -- data and runners --------------------------------------------------------------------


@functools.cache
def problem(grad_scale: float = 1.0, zero_params: bool = False, seed: int = 0):
    """``(params, grads)``: a dict of float32 jax arrays and STEPS such dicts."""
    rng = np.random.default_rng(seed)
    params = {
        k: np.zeros(s, np.float32) if zero_params else rng.standard_normal(s).astype(np.float32)
        for k, s in SHAPES.items()
    }
    grads = [
        {k: (grad_scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(STEPS)
    ]
    to_jax = functools.partial(jax.tree.map, jnp.asarray)
    return to_jax(params), [to_jax(g) for g in grads]


def np_problem(grad_scale: float = 1.0, zero_params: bool = False):
    """The same data as NumPy float64 (for the hand-computed predictions)."""
    params, grads = problem(grad_scale, zero_params)
    as64 = functools.partial(jax.tree.map, lambda a: np.asarray(a, np.float64))
    return as64(params), [as64(g) for g in grads]


def _check_dtypes(traj):
    for p in traj:
        for k, a in p.items():
            assert a.dtype == np.float32, f"{k}: {a.dtype}"


def run_polyopt(opt, grad_scale=1.0, zero_params=False, jit=True):
    """polyopt's params after each of the STEPS updates (NumPy arrays)."""
    params, grads = problem(grad_scale, zero_params)
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init(params)
    assert state.step.dtype == jnp.int32
    traj = []
    for g in grads:
        params, state = update(params, g, state)
        traj.append(params)
    assert int(state.step) == STEPS
    traj = jax.device_get(traj)
    _check_dtypes(traj)
    return traj


def run_optax(tx, grad_scale=1.0, zero_params=False):
    """The params after each update of an optax ``GradientTransformation``."""
    params, grads = problem(grad_scale, zero_params)

    @jax.jit
    def update(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    traj = []
    for g in grads:
        params, state = update(params, g, state)
        traj.append(params)
    traj = jax.device_get(traj)
    _check_dtypes(traj)
    return traj


def rel_diff(traj, ref, steps=slice(None)) -> float:
    """Normwise relative difference: per array, ``max_t max|a_t - b_t| / max_t max|b_t|``
    over the steps selected; the largest over the arrays."""
    traj, ref = traj[steps], ref[steps]
    assert len(traj) == len(ref) > 0
    worst = 0.0
    for k in ref[0]:
        err = scale = 0.0
        for a, b in zip(traj, ref, strict=True):
            a64, b64 = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
            err = max(err, float(np.max(np.abs(a64 - b64))))
            scale = max(scale, float(np.max(np.abs(b64))))
        worst = max(worst, err / scale)
    return worst


def report(what: str, value: float) -> float:
    print(f"\n[peers] {what}: max rel diff {value:.2e}")
    return value


def assert_same(traj, ref, what: str, steps=slice(None)) -> None:
    d = report(what, rel_diff(traj, ref, steps))
    assert d <= RTOL, f"{what}: max normwise relative difference {d:.3e} > {RTOL}"


def assert_differs(traj, ref, what: str, steps=slice(None)) -> None:
    d = report(what, rel_diff(traj, ref, steps))
    assert d >= DIFFERS, f"{what}: expected a difference >= {DIFFERS}, got {d:.3e}"


def assert_difference_is(traj, ref, predicted, what: str, rtol=1e-3) -> float:
    """``traj - ref`` equals the ``predicted`` difference (float64 trajectories): per
    array, ``max_t max|measured_t - predicted_t| <= rtol · max_t max|predicted_t|``; and
    the difference must be sizeable (>= DIFFERS relative to the params)."""
    size = worst = 0.0
    for k in predicted[0]:
        err = d_scale = p_scale = 0.0
        for a, b, d in zip(traj, ref, predicted, strict=True):
            got = np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)
            err = max(err, float(np.max(np.abs(got - d[k]))))
            d_scale = max(d_scale, float(np.max(np.abs(d[k]))))
            p_scale = max(p_scale, float(np.max(np.abs(b[k]))))
        size = max(size, d_scale / p_scale)
        worst = max(worst, err / d_scale)
    report(f"{what} (size of the difference)", size)
    report(f"{what} (measured vs predicted difference)", worst)
    assert size >= DIFFERS, f"{what}: the predicted difference is only {size:.2e}"
    assert worst <= rtol, f"{what}: measured difference is off the prediction by {worst:.2e}"
    return size


def trajectory(p0, updates):
    """Float64 trajectory ``p_t = p_{t-1} + u_t`` from per-step update dicts."""
    out, p = [], dict(p0)
    for u in updates:
        p = {k: p[k] + u[k] for k in p}
        out.append(p)
    return out


def minus(a, b):
    return [{k: x[k] - y[k] for k in x} for x, y in zip(a, b, strict=True)]


# -- 1. equivalent configurations: polyopt == optax ---------------------------------------


def _amsgrad_as_torch(lr, b1=0.9, b2=0.999):
    """optax.amsgrad configured to give torch's AMSGrad (see test_amsgrad_differs)."""

    def lr_t(count):  # lr · sqrt(1 - β2^t), t = count + 1, in float32 like both sides
        t = (count + 1).astype(jnp.float32)
        return lr * jnp.sqrt(1 - b2**t)

    return optax.amsgrad(lr_t, b1=b1, b2=b2, eps=0.0, bias_correction_nu=False)


AMS_B2 = 0.95

# id -> (polyopt optimizer, optax transformation, gradient scale)
SAME = {
    "adam": lambda: (polyopt.adam(lr=1e-2), optax.adam(1e-2), 1.0),
    "adam betas/eps, small grads": lambda: (
        polyopt.adam(lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
        optax.adam(3e-3, b1=0.8, b2=0.99, eps=1e-6),
        1e-5,  # |g| ~ eps: eps outside the bias-corrected root is visible
    ),
    "adamw": lambda: (
        polyopt.adamw(lr=1e-2, weight_decay=0.1),
        optax.adamw(1e-2, weight_decay=0.1),
        1.0,
    ),
    "adamw cosine": lambda: (
        polyopt.adamw(lr=S.cosine(1e-2, STEPS), weight_decay=0.1),
        optax.adamw(optax.cosine_decay_schedule(1e-2, STEPS), weight_decay=0.1),
        1.0,
    ),
    "adamw cosine eta_min": lambda: (
        polyopt.adamw(lr=S.cosine(1e-2, STEPS, eta_min=1e-3), weight_decay=0.1),
        optax.adamw(optax.cosine_decay_schedule(1e-2, STEPS, alpha=0.1), weight_decay=0.1),
        1.0,
    ),
    # optax holds alpha·lr after decay_steps; torch's cosine rises again: join to hold.
    "adamw cosine T_max=60 held by join": lambda: (
        polyopt.adamw(
            lr=S.join([S.cosine(1e-2, 60, eta_min=1e-3), S.constant(1e-3)], [60]),
            weight_decay=0.1,
        ),
        optax.adamw(optax.cosine_decay_schedule(1e-2, 60, alpha=0.1), weight_decay=0.1),
        1.0,
    ),
    # torch's coupled L2 adds λp to the gradient before the moments: decay first.
    "adam coupled L2": lambda: (
        polyopt.adam(lr=1e-2, weight_decay=0.1),
        optax.chain(optax.add_decayed_weights(0.1), optax.scale_by_adam(), optax.scale(-1e-2)),
        1.0,
    ),
    # ... while decay after the moments, then scaled by lr, is AdamW.
    "adamw as chain(scale_by_adam, add_decayed_weights)": lambda: (
        polyopt.adamw(lr=1e-2, weight_decay=0.1),
        optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.1), optax.scale(-1e-2)),
        1.0,
    ),
    # β2 = 0.95 so that v follows the recent g² and falls: the running max binds often
    # (with β2 = 0.999 and these i.i.d. gradients v mostly grows and AMSGrad is Adam to 1e-5).
    "amsgrad (optax bias_correction_nu=False, lr·sqrt(1-b2^t), eps=0)": lambda: (
        polyopt.adam(lr=1e-2, betas=(0.9, AMS_B2), eps=0.0, amsgrad=True),
        _amsgrad_as_torch(1e-2, b2=AMS_B2),
        1.0,
    ),
    "sgd": lambda: (polyopt.sgd(lr=1e-2), optax.sgd(1e-2), 1.0),
    "sgd momentum": lambda: (
        polyopt.sgd(lr=1e-2, momentum=0.9),
        optax.sgd(1e-2, momentum=0.9),
        1.0,
    ),
    "sgd nesterov": lambda: (
        polyopt.sgd(lr=1e-2, momentum=0.9, nesterov=True),
        optax.sgd(1e-2, momentum=0.9, nesterov=True),
        1.0,
    ),
    # optax's trace runs before the lr scaling: the buffer holds no lr, as torch's.
    "sgd momentum step schedule": lambda: (
        polyopt.sgd(lr=S.step_decay(5e-2, 30, 0.1), momentum=0.9),
        optax.sgd(
            optax.exponential_decay(5e-2, transition_steps=30, decay_rate=0.1, staircase=True),
            momentum=0.9,
        ),
        1.0,
    ),
    "rmsprop eps=0": lambda: (
        polyopt.rmsprop(lr=1e-2, eps=0.0),
        optax.rmsprop(1e-2, decay=0.99, eps=0.0),
        1.0,
    ),
    "rmsprop eps_in_sqrt=False, small grads": lambda: (
        polyopt.rmsprop(lr=1e-2, eps=1e-8),
        optax.rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False),
        1e-6,  # |g| ~ 100 eps: the eps term is visible
    ),
    "rmsprop momentum eps=0": lambda: (
        polyopt.rmsprop(lr=1e-2, eps=0.0, momentum=0.9),
        optax.rmsprop(1e-2, decay=0.99, eps=0.0, momentum=0.9),
        1.0,
    ),
    "rmsprop centered eps=0": lambda: (
        polyopt.rmsprop(lr=1e-2, eps=0.0, centered=True),
        optax.rmsprop(1e-2, decay=0.99, eps=0.0, centered=True),
        1.0,
    ),
    "adagrad init 0.1, eps=0": lambda: (
        polyopt.adagrad(lr=0.1, initial_accumulator_value=0.1, eps=0.0),
        optax.adagrad(0.1, initial_accumulator_value=0.1, eps=0.0),
        1.0,
    ),
    # optax's default eps=1e-7 inside the root with s >= 0.1: at most 5e-7 relative
    "adagrad init 0.1, eps=0 vs optax defaults": lambda: (
        polyopt.adagrad(lr=0.1, initial_accumulator_value=0.1, eps=0.0),
        optax.adagrad(0.1),
        1.0,
    ),
    "adadelta defaults (optax learning_rate=1)": lambda: (
        polyopt.adadelta(),
        optax.adadelta(learning_rate=1.0),
        1.0,
    ),
    "adadelta rho/eps/coupled weight decay": lambda: (
        polyopt.adadelta(lr=0.5, rho=0.95, eps=1e-7, weight_decay=0.1),
        optax.adadelta(0.5, rho=0.95, eps=1e-7, weight_decay=0.1),
        1.0,
    ),
    # optax.adadelta's default learning_rate=None applies no scaling and no sign flip:
    # its updates go *up* the gradient, i.e. polyopt with maximize=True (Δ is odd in g).
    "adadelta optax default learning_rate=None == maximize": lambda: (
        polyopt.adadelta(maximize=True),
        optax.adadelta(),
        1.0,
    ),
}


@pytest.mark.parametrize("case", list(SAME))
def test_matches_optax(case):
    opt, tx, scale = SAME[case]()
    assert_same(run_polyopt(opt, scale), run_optax(tx, scale), f"{case} vs optax")


# -- schedules -------------------------------------------------------------------------


def _jit_values(schedule, ks):
    f = jax.jit(schedule)
    return np.array([float(f(jnp.asarray(k, jnp.int32))) for k in ks])


def test_cosine_matches_optax_up_to_T_max_then_not():
    lr, T, eta_min = 1e-2, 80, 1e-3
    ours = S.cosine(lr, T, eta_min=eta_min)
    theirs = optax.cosine_decay_schedule(lr, T, alpha=eta_min / lr)
    ks = range(T + 1)
    d = report(
        "cosine(k) vs optax.cosine_decay_schedule, k <= T_max (jit, float32)",
        float(np.max(np.abs(_jit_values(ours, ks) - _jit_values(theirs, ks)))) / lr,
    )
    assert d <= 1e-6
    # Past T_max torch's (and polyopt's) curve rises again; optax holds eta_min.
    past = range(T + 1, 2 * T + 1)
    assert np.allclose(_jit_values(theirs, past), eta_min, rtol=1e-6)
    assert _jit_values(ours, [T + T // 2])[0] == pytest.approx((lr + eta_min) / 2, rel=1e-6)
    held = S.join([ours, S.constant(eta_min)], [T])
    assert np.allclose(
        _jit_values(held, range(2 * T + 1)),
        _jit_values(theirs, range(2 * T + 1)),
        rtol=0,
        atol=1e-6 * lr,
    )


def test_step_decay_matches_optax_staircase():
    ks = range(STEPS)
    ours = _jit_values(S.step_decay(5e-2, 30, 0.1), ks)
    theirs = _jit_values(optax.exponential_decay(5e-2, 30, 0.1, staircase=True), ks)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


# -- 2. where optax differs: the difference, measured and predicted ------------------------


def _np_amsgrad_updates(grads, lr, b1, b2, eps, max_of_corrected):
    """Per-step AMSGrad updates in float64. torch: v̂ = max_s v_s, denominator
    sqrt(v̂)/sqrt(1-β2^t) + ε. optax: v̂ = max_s v_s/(1-β2^s), denominator sqrt(v̂) + ε."""
    m = {k: np.zeros_like(g) for k, g in grads[0].items()}
    v, vmax = dict(m), dict(m)
    out = []
    for t, g in enumerate(grads, start=1):
        u = {}
        for k in g:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mhat = m[k] / (1 - b1**t)
            if max_of_corrected:
                vmax[k] = np.maximum(vmax[k], v[k] / (1 - b2**t))
                den = np.sqrt(vmax[k]) + eps
            else:
                vmax[k] = np.maximum(vmax[k], v[k])
                den = np.sqrt(vmax[k]) / math.sqrt(1 - b2**t) + eps
            u[k] = -lr * mhat / den
        out.append(u)
    return out


def test_amsgrad_differs_from_optax_default():
    """optax.amsgrad takes the running max of the *bias-corrected* v̂_s = v_s/(1-β2^s);
    torch (and polyopt) take the max of the raw v_s and then divide by (1-β2^t). optax's
    denominator is never smaller (1-β2^s <= 1-β2^t for s <= t), so its steps are never
    larger; the first step is the same. The exact match is in SAME (bias_correction_nu=
    False with the correction folded into the learning rate, eps=0)."""
    lr = 1e-2
    ours = run_polyopt(polyopt.adam(lr=lr, betas=(0.9, AMS_B2), amsgrad=True))
    theirs = run_optax(optax.amsgrad(lr, b2=AMS_B2))
    assert_same(ours, theirs, "amsgrad vs optax.amsgrad, first step", steps=slice(0, 1))
    p0, grads = np_problem()
    predicted = minus(
        trajectory(p0, _np_amsgrad_updates(grads, lr, 0.9, AMS_B2, 1e-8, False)),
        trajectory(p0, _np_amsgrad_updates(grads, lr, 0.9, AMS_B2, 1e-8, True)),
    )
    assert_difference_is(ours, theirs, predicted, "amsgrad - optax.amsgrad (default)")


def _np_rms_updates(grads, lr, alpha, eps, inside, init=0.0, adagrad=False):
    """Per-step RMSprop (or Adagrad: s += g²) updates in float64, ε inside or outside."""
    s = {k: np.full_like(g, init) for k, g in grads[0].items()}
    out = []
    for g in grads:
        u = {}
        for k in g:
            s[k] = s[k] + g[k] ** 2 if adagrad else alpha * s[k] + (1 - alpha) * g[k] ** 2
            den = np.sqrt(s[k] + eps) if inside else np.sqrt(s[k]) + eps
            u[k] = -lr * g[k] / den
        out.append(u)
    return out


def test_rmsprop_eps_inside_sqrt_differs_as_predicted():
    """optax.rmsprop's default eps_in_sqrt=True: g/sqrt(v+ε) against torch's g/(sqrt(v)+ε).
    With |g| ~ 1e-3 (v ~ 1e-6 .. 1e-8 early) the default ε = 1e-8 inside the root moves
    each step by up to ε/(2v), a few percent; outside, by ε/sqrt(v) ~ 1e-5."""
    lr, scale = 1e-2, 1e-3
    ours = run_polyopt(polyopt.rmsprop(lr=lr, eps=1e-8), scale)
    theirs = run_optax(optax.rmsprop(lr, decay=0.99, eps=1e-8), scale)
    p0, grads = np_problem(scale)
    predicted = minus(
        trajectory(p0, _np_rms_updates(grads, lr, 0.99, 1e-8, inside=False)),
        trajectory(p0, _np_rms_updates(grads, lr, 0.99, 1e-8, inside=True)),
    )
    assert_difference_is(ours, theirs, predicted, "rmsprop - optax.rmsprop (eps=1e-8 in sqrt)")


def test_rmsprop_momentum_with_schedule_differs_from_optax():
    """optax.rmsprop applies the learning rate *before* its momentum trace (lr inside the
    velocity, as Keras): equal to torch's for a constant lr, not once the lr changes."""
    sched = S.step_decay(1e-2, 30, 0.1)
    ours = run_polyopt(polyopt.rmsprop(lr=sched, eps=0.0, momentum=0.9))
    theirs = run_optax(
        optax.rmsprop(
            optax.exponential_decay(1e-2, 30, 0.1, staircase=True),
            decay=0.99,
            eps=0.0,
            momentum=0.9,
        )
    )
    assert_same(ours, theirs, "rmsprop momentum step schedule, steps before the drop", slice(0, 30))
    assert_differs(ours, theirs, "rmsprop momentum step schedule, after the drop", slice(30, None))


def test_adagrad_eps_inside_sqrt_differs_as_predicted():
    """optax's ε sits inside the root: g/sqrt(s+ε) against g/(sqrt(s)+ε). Starting both
    accumulators at 0 with |g| ~ 2e-3 (s ~ 4e-6), optax's ε = 1e-7 changes the step by
    about ε/(2s) (1% on step one); polyopt's (here 0) by nothing."""
    lr, scale = 0.1, 2e-3
    ours = run_polyopt(polyopt.adagrad(lr=lr, eps=0.0), scale)
    theirs = run_optax(optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-7), scale)
    p0, grads = np_problem(scale)
    predicted = minus(
        trajectory(p0, _np_rms_updates(grads, lr, None, 0.0, False, adagrad=True)),
        trajectory(p0, _np_rms_updates(grads, lr, None, 1e-7, True, adagrad=True)),
    )
    assert_difference_is(ours, theirs, predicted, "adagrad - optax.adagrad (init 0, eps=1e-7)")


def test_adagrad_defaults_differ_as_predicted():
    """Defaults: polyopt/torch start at 0 with ε = 1e-10 outside the root, optax at 0.1 with
    ε = 1e-7 inside. The first step is lr·sign(g) for torch and lr·g/sqrt(0.1+g²) for optax."""
    lr = 0.1
    ours = run_polyopt(polyopt.adagrad(lr=lr))
    theirs = run_optax(optax.adagrad(lr))
    p0, grads = np_problem()
    predicted = minus(
        trajectory(p0, _np_rms_updates(grads, lr, None, 1e-10, False, adagrad=True)),
        trajectory(p0, _np_rms_updates(grads, lr, None, 1e-7, True, init=0.1, adagrad=True)),
    )
    assert_difference_is(ours, theirs, predicted, "adagrad - optax.adagrad (both defaults)")


# -- 3. Keras 3 conventions, written out by hand (keras is not installed) ------------------


def keras_adam(lr, b1=0.9, b2=0.999, eps=1e-7):
    """Keras 3 ``Adam.update_step``: lr_t = lr·sqrt(1-β2^t)/(1-β1^t), m, v uncorrected,
    ``p -= lr_t · m / (sqrt(v) + ε)``."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return (jnp.zeros((), jnp.int32), zeros, zeros)

    def update(grads, state, params=None):
        count, m, v = state
        t = (count + 1).astype(jnp.float32)
        lr_t = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        m = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), m, grads)
        v = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - b2), v, grads)
        u = jax.tree.map(lambda m, v: -lr_t * m / (jnp.sqrt(v) + eps), m, v)
        return u, (count + 1, m, v)

    return optax.GradientTransformation(init, update)


def keras_sgd_momentum(schedule, mu):
    """Keras 3 ``SGD`` with momentum: ``v = μ v - lr_t g; p += v`` (lr inside v)."""

    def init(params):
        return (jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        count, vel = state
        lr_t = schedule(count)
        vel = jax.tree.map(lambda v, g: mu * v - lr_t * g, vel, grads)
        return vel, (count + 1, vel)

    return optax.GradientTransformation(init, update)


KERAS_EPS, B2 = 1e-7, 0.999
#: 1 - β2 as float32 computes it (both sides raise the float32 β2 = 0.99900001 to the
#: power t): 9.9998713e-4, not 1e-3. The exact recipe must use it, or the eps term is off
#: by the 1.3e-5 relative representation error of β2, amplified by 1/(1 - β2).
B2_F32 = float(np.float32(B2))
KERAS_SCALE = 1e-4  # |g| ~ 1e-4: Keras's effective ε (up to 3e-6) is a visible few percent


def test_keras_adam_same_eps_differs_by_the_predicted_amount():
    """Keras adds ε to the uncorrected sqrt(v): at t = 1 its step is
    lr·g/(|g| + ε/sqrt(1-β2)), polyopt's lr·g/(|g| + ε)."""
    lr = 1e-3
    ours = run_polyopt(polyopt.adam(lr=lr, eps=KERAS_EPS), KERAS_SCALE, zero_params=True)
    keras = run_optax(keras_adam(lr, eps=KERAS_EPS), KERAS_SCALE, zero_params=True)
    assert_differs(ours, keras, "keras Adam vs polyopt, same eps, step 1", slice(0, 1))
    _, grads = np_problem(KERAS_SCALE, zero_params=True)
    ratio = {  # keras step / polyopt step at t = 1
        k: (np.abs(g) + KERAS_EPS) / (np.abs(g) + KERAS_EPS / math.sqrt(1 - B2))
        for k, g in grads[0].items()
    }
    for k in ratio:
        predicted = ours[0][k].astype(np.float64) * ratio[k]
        np.testing.assert_allclose(keras[0][k], predicted, rtol=1e-5, err_msg=k)


def test_keras_adam_eps_conversion_exact_at_step_one_only():
    """The adam docstring's recipe: ``eps = ε_keras / sqrt(1 - β2^t)`` matches Keras exactly
    at t = 1; a constant eps cannot follow the step-dependent factor afterwards."""
    lr = 1e-3
    eps1 = KERAS_EPS / math.sqrt(1 - B2)
    ours = run_polyopt(polyopt.adam(lr=lr, eps=eps1), KERAS_SCALE, zero_params=True)
    keras = run_optax(keras_adam(lr, eps=KERAS_EPS), KERAS_SCALE, zero_params=True)
    # zero params: the first step is the update itself, compared elementwise. polyopt's
    # bias correction uses the exact β2 (expm1(t·log β2) with log β2 in float64); the
    # float32 Keras formula uses β2 rounded to float32, whose 1 − β2 is 1.3e-5 smaller.
    for k in ours[0]:
        np.testing.assert_allclose(ours[0][k], keras[0][k], rtol=2e-5, err_msg=k)
    assert_same(ours, keras, "keras Adam vs polyopt eps=eps_k/sqrt(1-b2), step 1", slice(0, 1))
    assert_differs(
        ours, keras, "keras Adam vs polyopt eps=eps_k/sqrt(1-b2), steps 2-100", slice(1, None)
    )


def test_keras_adam_with_eps_changed_every_step():
    """... and with ``eps_t = ε_keras / sqrt(1 - β2^t)`` set anew each step (a new polyopt
    optimizer per step sharing the state; eps is not schedulable, so eagerly, not jit)
    polyopt follows Keras over all 100 steps."""
    lr = 1e-3
    params, grads = problem(KERAS_SCALE, zero_params=True)
    state = polyopt.adam(lr=lr).init(params)
    ours = []
    for t, g in enumerate(grads, start=1):
        opt = polyopt.adam(lr=lr, eps=KERAS_EPS / math.sqrt(1 - B2_F32**t))
        params, state = opt.update(params, g, state)
        ours.append(params)
    ours = jax.device_get(ours)
    keras = run_optax(keras_adam(lr, eps=KERAS_EPS), KERAS_SCALE, zero_params=True)
    assert_same(ours, keras, "keras Adam vs polyopt with eps_t = eps_k/sqrt(1-b2^t)")


def test_keras_sgd_momentum_constant_lr_is_the_same():
    lr, mu = 5e-2, 0.9
    ours = run_polyopt(polyopt.sgd(lr=lr, momentum=mu))
    keras = run_optax(keras_sgd_momentum(lambda k: lr, mu))
    assert_same(ours, keras, "keras SGD momentum vs polyopt, constant lr")


def test_keras_sgd_momentum_changing_lr_differs():
    """Keras's velocity keeps the lr it was built with: after the lr drops at step 30 the
    old velocity still moves at the old lr; torch's buffer is rescaled by the new lr."""
    mu = 0.9
    sched = S.step_decay(5e-2, 30, 0.1)
    ours = run_polyopt(polyopt.sgd(lr=sched, momentum=mu))
    keras = run_optax(keras_sgd_momentum(sched, mu))  # the same schedule, jnp under jit
    assert_same(
        ours, keras, "keras SGD momentum vs polyopt, step schedule, steps 1-30", slice(0, 30)
    )
    assert_differs(
        ours, keras, "keras SGD momentum vs polyopt, step schedule, steps 31-100", slice(30, None)
    )


# -- 4. the AdamW paper's convention (Loshchilov & Hutter, Alg. 2) ------------------------


def paper_adamw(alpha, lam, T, b1=0.9, b2=0.999, eps=1e-8):
    """Alg. 2: ``p ← p − η_t (α · m̂/(sqrt(v̂)+ε) + λ p)``, η_t the cosine multiplier
    (1 + cos(π k/T))/2 of step k = t - 1: λ is scaled by η_t only, not by α."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return (jnp.zeros((), jnp.int32), zeros, zeros)

    def update(grads, state, params):
        count, m, v = state
        t = (count + 1).astype(jnp.float32)
        eta = 0.5 * (1 + jnp.cos(jnp.pi * count.astype(jnp.float32) / T))
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)

        def step(m, v, p):
            mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
            return -eta * (alpha * mhat / (jnp.sqrt(vhat) + eps) + lam * p)

        return jax.tree.map(step, m, v, params), (count + 1, m, v)

    return optax.GradientTransformation(init, update)


def test_adamw_paper_convention():
    alpha, lam = 1e-2, 1e-2
    paper = run_optax(paper_adamw(alpha, lam, STEPS))
    ours = run_polyopt(polyopt.adamw(lr=S.cosine(alpha, STEPS), weight_decay=lam / alpha))
    assert_same(ours, paper, "AdamW paper Alg. 2 vs polyopt weight_decay=lambda/alpha")
    # passing the paper's λ unchanged decays α = 100x too little
    naive = run_polyopt(polyopt.adamw(lr=S.cosine(alpha, STEPS), weight_decay=lam))
    assert_differs(naive, paper, "AdamW paper Alg. 2 vs polyopt weight_decay=lambda")
