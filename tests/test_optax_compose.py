"""polyopt.optax composed with optax's combinators, against the same composition built
with optax's twin optimizer.

What runs: a tiny tanh MLP (a nested dict of four float32 arrays, ``{"hidden": {"w",
"b"}, "out": {"w", "b"}}``) fitted to fixed-seed random data, one mini-batch per step;
the gradients come from ``jax.grad`` of the loss at each side's *own* params, so the
runs are real training runs (a difference between the sides feeds back into later
gradients). Each side has one ``jax.jit``-ed step function (gradient, transformation,
``optax.apply_updates``) called STEPS = 100 times with the step index as an int32 array;
the runner asserts that it compiled once. Each case differs from its twin only in
``polyopt.optax.X`` against the optax optimizer configured to the same formula (the
configurations of ``tests/test_peers.py``); where optax has no such configuration, the
reference is polyopt's functional form ``polyopt.X(...).update`` called directly
(marked ``Functional`` below).

Tolerance: ``np.testing.assert_allclose(params, twin, rtol=RTOL, atol=ATOL)`` on every
entry of the params after every step (RTOL = 2e-5, ATOL = 1e-5; max|p| is about 1.5).
The same formula evaluated in another order differs by a few float32 ulps per step:
for SGD, RMSprop, Adagrad and Adadelta the sides end up within 1.5e-7 · max|p| of each
other (polyopt's updates are ``new − params``, which ``apply_updates`` adds back exactly
as long as the step is small against the param). The Adam family differs by up to
5.5e-6 · max|p|, and that is optax's rounding: optax computes the bias correction
``1 - β2**t`` in float32 from β2 = 0.999 rounded to float32 (0.99900001287), which makes
it 1.29e-5 (relative) too small for t ≪ 1000, hence each step 6.4e-6 (relative) too small
(``sqrt`` halves it); polyopt computes ``-expm1(t·log β2)`` with ``log β2`` taken in
float64. Training gradients keep their signs from step to step, so this error adds up
linearly, to at most STEPS · lr · 6.4e-6 = 6.4e-6 in absolute terms (Adam steps are
about lr): ATOL = 1e-5 covers that bound with a margin, and it is also what an entry
near zero needs (an elementwise rtol alone fails where the reference crosses zero). With
an exactly representable β2 = 1 − 2^-10 the difference falls to ~1e-7
(``test_adam_difference_is_optax_beta2_rounding``). In the other direction, changing one
option (rmsprop's eps inside the root, a weight decay 1% off) fails the comparison
(``test_tolerance_detects_one_option_changes``). Measured values: ``pytest -s``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import polyopt  # noqa: E402
import polyopt.optax as po  # noqa: E402
from polyopt import schedules as S  # noqa: E402

STEPS = 100
RTOL = 2e-5
ATOL = 1e-5

N_IN, N_HID, BATCH = 3, 8, 16


# -- the problem ------------------------------------------------------------------------


def _problem():
    rng = np.random.default_rng(0)

    def f32(a):
        return jnp.asarray(np.asarray(a, np.float32))

    params = {
        "hidden": {
            "w": f32(rng.standard_normal((N_IN, N_HID)) / math.sqrt(N_IN)),
            "b": f32(0.1 * rng.standard_normal(N_HID)),
        },
        "out": {
            "w": f32(rng.standard_normal((N_HID, 1)) / math.sqrt(N_HID)),
            "b": f32(0.1 * rng.standard_normal(1)),
        },
    }
    x = rng.standard_normal((STEPS, BATCH, N_IN))
    y = np.sin(x @ np.array([1.0, -2.0, 0.5]))[..., None] + 0.1 * rng.standard_normal(
        (STEPS, BATCH, 1)
    )
    return params, f32(x), f32(y)


PARAMS0, X, Y = _problem()
TS = [jnp.asarray(t, jnp.int32) for t in range(STEPS)]

#: Weight decay on the matrices only: as a pytree of bools, and as a function of params.
W_MASK = {"hidden": {"w": True, "b": False}, "out": {"w": True, "b": False}}
B_MASK = jax.tree.map(lambda m: not m, W_MASK)


def w_mask_fn(params):
    return jax.tree.map(lambda x: x.ndim > 1, params)


def _labels_by_ndim(params):
    return jax.tree.map(lambda x: "w" if x.ndim > 1 else "b", params)


NAN_AT = 37
IF_FINITE = f"apply_if_finite(adamw), NaN at step {NAN_AT}"


def loss(params, x, y):
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return jnp.mean((h @ params["out"]["w"] + params["out"]["b"] - y) ** 2)


def grads(params, t, nan_at=None):
    g = jax.grad(loss)(params, X[t], Y[t])
    if nan_at is not None:  # one non-finite entry at step nan_at
        b = g["out"]["b"]
        g["out"]["b"] = jnp.where(t == nan_at, b.at[0].set(jnp.nan), b)
    return g


# -- runners ----------------------------------------------------------------------------


class Functional(NamedTuple):
    """Reference without optax's optimizer: ``opt.update(params, pre(grads), state)``,
    polyopt's functional form called directly, after the stateless optax transformation
    ``pre`` (clipping)."""

    opt: polyopt.Optimizer
    pre: Any = None


class Case(NamedTuple):
    tx: Any  # the composition holding polyopt.optax's transformation
    ref: Any  # the same with optax's twin (or a Functional, or a SHARED_REFS name)
    nan_at: int | None = None
    #: ``(t, state) -> state`` before step t, for tx and for ref (hyperparameter changes)
    between_tx: Callable | None = None
    between_ref: Callable | None = None


class Run(NamedTuple):
    params: list  # NumPy params after each step
    states: list  # the (device) state after each step


def _step_fn(tx, nan_at):
    if isinstance(tx, Functional):
        pre = tx.pre or optax.identity()

        def step(params, state, t):
            g, _ = pre.update(grads(params, t, nan_at), pre.init(params), params)
            return tx.opt.update(params, g, state)

        return jax.jit(step), tx.opt.init

    def step(params, state, t):
        u, state = tx.update(grads(params, t, nan_at), state, params)
        return optax.apply_updates(params, u), state

    return jax.jit(step), tx.init


def run(tx, nan_at=None, between=None) -> Run:
    step, init = _step_fn(tx, nan_at)
    params, state = PARAMS0, init(PARAMS0)
    traj, states = [], []
    for t in range(STEPS):
        if between is not None:
            state = between(t, state)
        params, state = step(params, state, TS[t])
        traj.append(params)
        states.append(state)
    assert step._cache_size() == 1, "the step function recompiled"
    traj = jax.device_get(traj)
    for p in traj:
        assert all(a.dtype == np.float32 for a in jax.tree.leaves(p))
    return Run(traj, states)


def flat(traj) -> np.ndarray:
    """(STEPS, n) float64: every param entry after every step."""
    return np.stack(
        [np.concatenate([np.ravel(a) for a in jax.tree.leaves(p)]) for p in traj]
    ).astype(np.float64)


#: case -> (normwise max|a-b| / max|b|, the share of the tolerance used:
#: max |a-b| / (ATOL + RTOL·|b|), which must be <= 1)
MEASURED: dict[str, tuple[float, float]] = {}


def normwise(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def assert_same(traj, ref, what: str) -> None:
    a, b = flat(traj), flat(ref)
    assert np.all(np.isfinite(b)), f"{what}: the reference diverged"
    err = np.abs(a - b)
    norm = normwise(a, b)
    used = float((err / (ATOL + RTOL * np.abs(b))).max())
    MEASURED[what] = (norm, used)
    print(
        f"\n[optax-compose] {what}: max rel diff {norm:.2e} (normwise), "
        f"{used:.0%} of the tolerance used"
    )
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=what)


# -- the cases --------------------------------------------------------------------------

LR = 1e-2
WD = 0.1


def clip():
    return optax.clip_by_global_norm(1.0)


def _wc_optax():
    return optax.warmup_cosine_decay_schedule(0.0, LR, 10, STEPS, end_value=1e-4)


def _wc_polyopt():
    # optax's warmup_cosine_decay_schedule: linear 0 -> peak over 10 steps, then cosine
    # over the remaining 90 steps down to end_value (alpha = end/peak).
    return S.join([S.linear_warmup(LR, 10), S.cosine(LR, STEPS - 10, eta_min=1e-4)], [10])


def _set(name: str, changes: dict[int, float]) -> Callable:
    """``between`` hook: ``state.hyperparams[name] = value`` before the listed steps
    (float32 arrays, as inject_hyperparams holds them: no recompilation)."""

    def between(t, state):
        if t in changes:
            state.hyperparams[name] = jnp.asarray(changes[t], jnp.float32)
        return state

    return between


LR_CHANGES = {30: 3e-3, 60: 1e-3, 80: 5e-3}
WD_CHANGES = {50: 0.5}


def _both(*hooks):
    def between(t, state):
        for h in hooks:
            state = h(t, state)
        return state

    return between


#: Twins used by more than one case (run once): name -> factory.
SHARED_REFS: dict[str, Callable[[], Any]] = {
    "optax.adamw(warmup_cosine)": lambda: optax.adamw(_wc_optax(), weight_decay=WD),
}


def _adam_decay_scale(adam):
    # polyopt's updates are new - params = -lr·(Adam direction): what follows sees the
    # same updates as after optax.adam. add_decayed_weights(-1e-3) after the lr scaling
    # is a decay not scaled by the lr; scale(0.5) halves the whole step.
    # (polyopt's new - params is rounded to ulp(p), which scale() no longer cancels: the
    # one chain here where the delta round trip shows, at ~3e-7.)
    return optax.chain(clip(), adam, optax.add_decayed_weights(-1e-3), optax.scale(0.5))


CASES: dict[str, Callable[[], Case]] = {
    # -- 1. chains: clipping before, decay/scale after polyopt's transformation -----------
    "chain(clip, adamw)": lambda: Case(
        optax.chain(clip(), po.adamw(lr=LR, weight_decay=WD)),
        optax.chain(clip(), optax.adamw(LR, weight_decay=WD)),
    ),
    "chain(clip, adam, add_decayed_weights, scale)": lambda: Case(
        _adam_decay_scale(po.adam(lr=LR)), _adam_decay_scale(optax.adam(LR))
    ),
    # -- 9. each optimizer after clipping, against its exact optax twin ---------------------
    # (adamw: above and below; adagrad and plain rmsprop: in the second multi_transform
    # case; sgd with plain momentum: in the masked cases.)
    "chain(clip, adam)": lambda: Case(
        optax.chain(clip(), po.adam(lr=LR)), optax.chain(clip(), optax.adam(LR))
    ),
    "chain(clip, sgd nesterov)": lambda: Case(
        optax.chain(clip(), po.sgd(lr=5e-2, momentum=0.9, nesterov=True)),
        optax.chain(clip(), optax.sgd(5e-2, momentum=0.9, nesterov=True)),
    ),
    # torch's alpha is optax's decay; eps outside the root is optax's eps_in_sqrt=False;
    # optax's initial_scale=0 default is torch's zero start; optax's momentum holds
    # lr·(g/d) where torch's holds g/d: the same for a constant lr.
    "chain(clip, rmsprop centered momentum)": lambda: Case(
        optax.chain(clip(), po.rmsprop(lr=1e-3, eps=1e-8, momentum=0.9, centered=True)),
        optax.chain(
            clip(),
            optax.rmsprop(
                1e-3, decay=0.99, eps=1e-8, eps_in_sqrt=False, centered=True, momentum=0.9
            ),
        ),
    ),
    # optax.adadelta needs learning_rate=1.0 (its default None ascends the gradient).
    "chain(clip, adadelta coupled decay)": lambda: Case(
        optax.chain(clip(), po.adadelta(lr=1.0, weight_decay=1e-2)),
        optax.chain(clip(), optax.adadelta(learning_rate=1.0, weight_decay=1e-2)),
    ),
    # No optax configuration has torch's dampening or SGDW (decay by lr·λ before the
    # momentum step): the reference is polyopt's functional form, called directly.
    "chain(clip, sgd dampening SGDW) vs polyopt.sgd": lambda: Case(
        optax.chain(
            clip(),
            po.sgd(
                lr=5e-2, momentum=0.9, dampening=0.1, weight_decay=WD, decoupled_weight_decay=True
            ),
        ),
        Functional(
            polyopt.sgd(
                lr=5e-2, momentum=0.9, dampening=0.1, weight_decay=WD, decoupled_weight_decay=True
            ),
            clip(),
        ),
    ),
    # -- 2. gradient accumulation -----------------------------------------------------------
    "MultiSteps(adam, every_k_schedule=4)": lambda: Case(
        optax.MultiSteps(po.adam(lr=LR), every_k_schedule=4),
        optax.MultiSteps(optax.adam(LR), every_k_schedule=4),
    ),
    # -- 3. skipping a non-finite step ------------------------------------------------------
    IF_FINITE: lambda: Case(
        optax.apply_if_finite(po.adamw(lr=LR, weight_decay=WD), max_consecutive_errors=5),
        optax.apply_if_finite(optax.adamw(LR, weight_decay=WD), max_consecutive_errors=5),
        nan_at=NAN_AT,
    ),
    # -- 4. optax.masked: momentum SGD on the matrices, plain SGD on the biases -------------
    "chain(masked(sgd momentum), masked(sgd))": lambda: Case(
        optax.chain(
            optax.masked(po.sgd(lr=5e-2, momentum=0.9), W_MASK),
            optax.masked(optax.sgd(5e-2), B_MASK),
        ),
        optax.chain(
            optax.masked(optax.sgd(5e-2, momentum=0.9), W_MASK),
            optax.masked(optax.sgd(5e-2), B_MASK),
        ),
    ),
    # -- 5. optax.multi_transform: one optimizer per subtree (labels a prefix of params) ---
    "multi_transform(adamw, sgd nesterov)": lambda: Case(
        optax.multi_transform(
            {
                "a": po.adamw(lr=LR, weight_decay=WD),
                "b": po.sgd(lr=5e-2, momentum=0.9, nesterov=True),
            },
            {"hidden": "a", "out": "b"},
        ),
        optax.multi_transform(
            {
                "a": optax.adamw(LR, weight_decay=WD),
                "b": optax.sgd(5e-2, momentum=0.9, nesterov=True),
            },
            {"hidden": "a", "out": "b"},
        ),
    ),
    # labels as a function of params, after clipping. Adagrad: optax starts the
    # accumulator at 0.1 and puts eps inside the root; with the same start and eps = 0 on
    # both sides it is the same formula (polyopt.adagrad's docstring). RMSprop: eps = 0.
    "chain(clip, multi_transform(rmsprop, adagrad)), callable labels": lambda: Case(
        optax.chain(
            clip(),
            optax.multi_transform(
                {
                    "w": po.rmsprop(lr=LR, eps=0.0),
                    "b": po.adagrad(lr=0.1, initial_accumulator_value=0.1, eps=0.0),
                },
                _labels_by_ndim,
            ),
        ),
        optax.chain(
            clip(),
            optax.multi_transform(
                {
                    "w": optax.rmsprop(LR, decay=0.99, eps=0.0),
                    "b": optax.adagrad(0.1, initial_accumulator_value=0.1, eps=0.0),
                },
                _labels_by_ndim,
            ),
        ),
    ),
    # -- 8. mask= of polyopt.optax --------------------------------------------------------
    "adamw(mask=pytree)": lambda: Case(
        po.adamw(lr=LR, weight_decay=WD, mask=W_MASK),
        optax.adamw(LR, weight_decay=WD, mask=W_MASK),
    ),
    "chain(clip, adamw(mask=callable))": lambda: Case(
        optax.chain(clip(), po.adamw(lr=LR, weight_decay=WD, mask=w_mask_fn)),
        optax.chain(clip(), optax.adamw(LR, weight_decay=WD, mask=w_mask_fn)),
    ),
    # coupled L2 (torch's SGD weight_decay) is added to the gradient before the momentum,
    # so optax's twin decays first; mask= masks that decay.
    "sgd(momentum, weight_decay, mask=callable) coupled": lambda: Case(
        po.sgd(lr=5e-2, momentum=0.9, weight_decay=WD, mask=w_mask_fn),
        optax.chain(optax.add_decayed_weights(WD, mask=w_mask_fn), optax.sgd(5e-2, momentum=0.9)),
    ),
    # -- 7. schedules, and optax.inject_hyperparams ----------------------------------------
    "adamw(lr=optax warmup_cosine_decay_schedule)": lambda: Case(
        po.adamw(lr=_wc_optax(), weight_decay=WD),
        "optax.adamw(warmup_cosine)",
    ),
    # lr and weight_decay in state.hyperparams, changed between jitted steps
    "inject_hyperparams(adamw), lr/weight_decay changed": lambda: Case(
        optax.inject_hyperparams(po.adamw)(lr=LR, weight_decay=WD),
        optax.inject_hyperparams(optax.adamw)(learning_rate=LR, weight_decay=WD),
        between_tx=_both(_set("lr", LR_CHANGES), _set("weight_decay", WD_CHANGES)),
        between_ref=_both(_set("learning_rate", LR_CHANGES), _set("weight_decay", WD_CHANGES)),
    ),
    # inject_hyperparams evaluates the schedule at its own 0-based count and hands the
    # value to polyopt as a 0-d array
    "inject_hyperparams(adamw)(lr=optax schedule)": lambda: Case(
        optax.inject_hyperparams(po.adamw)(lr=_wc_optax(), weight_decay=WD),
        "optax.adamw(warmup_cosine)",
    ),
    "inject_hyperparams(adamw)(lr=polyopt cosine)": lambda: Case(
        optax.inject_hyperparams(po.adamw)(lr=S.cosine(LR, STEPS), weight_decay=WD),
        optax.adamw(optax.cosine_decay_schedule(LR, STEPS), weight_decay=WD),
    ),
    # polyopt's join(linear_warmup, cosine) is optax's warmup_cosine_decay_schedule; a
    # callable mask must be static for inject_hyperparams (which treats callables as
    # schedules), on both sides alike
    "chain(clip, inject_hyperparams(adamw, static_args=mask)(lr=polyopt join))": (
        lambda: Case(
            optax.chain(
                clip(),
                optax.inject_hyperparams(po.adamw, static_args="mask")(
                    lr=_wc_polyopt(), weight_decay=WD, mask=w_mask_fn
                ),
            ),
            optax.chain(
                clip(),
                optax.inject_hyperparams(optax.adamw, static_args="mask")(
                    learning_rate=_wc_optax(), weight_decay=WD, mask=w_mask_fn
                ),
            ),
        )
    ),
}


@functools.cache
def shared_ref(name: str) -> Run:
    return run(SHARED_REFS[name]())


@functools.cache
def runs(case: str) -> tuple[Run, Run]:
    c = CASES[case]()
    ref = shared_ref(c.ref) if isinstance(c.ref, str) else run(c.ref, c.nan_at, c.between_ref)
    return run(c.tx, c.nan_at, c.between_tx), ref


@pytest.mark.parametrize("case", list(CASES))
def test_matches_twin(case):
    ours, ref = runs(case)
    assert_same(ours.params, ref.params, case)


# -- extra checks on the combinators' own behaviour (reusing the runs above) ---------------


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_multisteps_accumulates():
    """Params move only every 4th step; polyopt's own step count is 25 after 100."""
    ours, ref = runs("MultiSteps(adam, every_k_schedule=4)")
    for t in range(STEPS):
        moved = not _leaves_equal(ours.params[t], ours.params[t - 1] if t else PARAMS0)
        assert moved == ((t + 1) % 4 == 0), t
    inner = ours.states[-1].inner_opt_state
    assert isinstance(inner, polyopt.OptState)
    assert int(inner.step) == STEPS // 4
    assert int(ref.states[-1].inner_opt_state[0].count) == STEPS // 4  # optax: the same


def test_apply_if_finite_skips_the_nan_step():
    """At the NaN step the params and polyopt's inner state stay as they were (exactly);
    the next step counts from there."""
    k = NAN_AT
    for r in runs(IF_FINITE):
        assert _leaves_equal(r.params[k], r.params[k - 1])
        assert _leaves_equal(r.states[k].inner_state, r.states[k - 1].inner_state)
        assert int(r.states[k].notfinite_count) == 1
        assert int(r.states[k + 1].notfinite_count) == 0
        assert int(r.states[-1].total_notfinite) == 1
        assert not _leaves_equal(r.params[k + 1], r.params[k])
        assert all(np.all(np.isfinite(a)) for p in r.params for a in jax.tree.leaves(p))
    ours = runs(IF_FINITE)[0]
    assert int(ours.states[-1].inner_state.step) == STEPS - 1


def test_inject_hyperparams_state():
    """The changes landed in state.hyperparams (and compiled once: run() asserts it)."""
    ours, ref = runs("inject_hyperparams(adamw), lr/weight_decay changed")
    hp, ref_hp = ours.states[-1].hyperparams, ref.states[-1].hyperparams
    assert float(hp["lr"]) == float(ref_hp["learning_rate"]) == np.float32(5e-3)
    assert float(hp["weight_decay"]) == float(ref_hp["weight_decay"]) == np.float32(0.5)
    assert isinstance(ours.states[-1].inner_state, polyopt.OptState)
    # the schedule evaluated by inject_hyperparams is the one in the state
    sched = optax.inject_hyperparams(po.adamw)(lr=_wc_optax())
    state = sched.init(PARAMS0)
    assert float(state.hyperparams["lr"]) == 0.0  # warmup from 0 at count 0


def test_tolerance_detects_one_option_changes():
    """RTOL/ATOL are far from covering a convention difference: against polyopt's runs
    above, optax with eps inside the root (rmsprop's default eps_in_sqrt=True) or with a
    weight decay off by 1% fails the comparison (the weight decay by ~30 times the
    tolerance: max diff ~9e-4)."""
    flips = {
        "chain(clip, rmsprop centered momentum)": (
            "optax eps_in_sqrt=True",
            optax.chain(
                clip(),
                optax.rmsprop(1e-3, decay=0.99, eps=1e-8, centered=True, momentum=0.9),
            ),
        ),
        "chain(clip, adamw)": (
            "optax weight_decay 1% larger",
            optax.chain(clip(), optax.adamw(LR, weight_decay=1.01 * WD)),
        ),
    }
    for case, (what, ref) in flips.items():
        a, b = flat(runs(case)[0].params), flat(run(ref).params)
        print(f"\n[optax-compose] {case} vs {what}: max abs diff {np.abs(a - b).max():.2e}")
        assert not np.allclose(a, b, rtol=RTOL, atol=ATOL), f"{case}: {what} not detected"


def test_adam_difference_is_optax_beta2_rounding():
    """The Adam cases' 1.5-5.5e-6 comes from optax's float32 ``1 - β2**t`` with
    β2 = 0.999 (not representable): with β2 = 1 - 2^-10 (exact in float32) polyopt and
    optax agree as closely as the non-Adam optimizers do."""
    b2 = 1 - 2**-10
    a = flat(run(optax.chain(clip(), po.adam(lr=LR, betas=(0.9, b2)))).params)
    b = flat(run(optax.chain(clip(), optax.adam(LR, b2=b2))).params)
    exact = normwise(a, b)
    ours, ref = runs("chain(clip, adam)")  # β2 = 0.999
    rounded = normwise(flat(ours.params), flat(ref.params))
    print(
        f"\n[optax-compose] chain(clip, adam), b2 = 1 - 2^-10: max rel diff {exact:.2e} "
        f"(b2 = 0.999: {rounded:.2e})"
    )
    assert exact <= 3e-7
    assert rounded >= 10 * exact


# -- 6. optax.tree.map_params -------------------------------------------------------------


def _map_params_cases():
    """(polyopt chain, optax twin, {polyopt slot: optax field}); ``impl="generic"``
    keeps polyopt's state per array, so each slot is a tree shaped like params."""
    return {
        "chain(clip, adamw(mask), generic)": (
            optax.chain(clip(), po.adamw(lr=LR, weight_decay=WD, mask=W_MASK, impl="generic")),
            optax.chain(clip(), optax.adamw(LR, weight_decay=WD, mask=W_MASK)),
            {"exp_avg": "mu", "exp_avg_sq": "nu"},
        ),
        "sgd(momentum, generic)": (
            po.sgd(lr=5e-2, momentum=0.9, impl="generic"),
            optax.sgd(5e-2, momentum=0.9),
            {"momentum_buffer": "trace"},
        ),
    }


def _find(state, field):
    """The first value of ``field`` in optax's (nested tuple) state."""
    hits = optax.tree_utils.tree_get_all_with_path(state, field)
    assert hits, field
    return hits[0][1]


@pytest.mark.parametrize("case", list(_map_params_cases()))
def test_tree_map_params_equals_optax_twin(case):
    """optax.tree.map_params(tx, f, state, *rest) maps f over every params-shaped tree in
    the state: for polyopt (per-array state) those are the slots, and the result equals
    the same map over optax's twin after 100 training steps (f scales each array by a
    per-param factor from ``rest``; ``transform_non_params`` replaces everything else)."""
    tx, twin, fields = _map_params_cases()[case]
    ours, ref = run(tx), run(twin)
    scale = jax.tree.map(lambda p: jnp.full(p.shape, 1.0 + p.ndim, jnp.float32), PARAMS0)

    def f(x, s):
        return x * s

    def other(_):
        return "not params"

    a = optax.tree.map_params(tx, f, ours.states[-1], scale, transform_non_params=other)
    b = optax.tree.map_params(twin, f, ref.states[-1], scale, transform_non_params=other)
    inner = [
        x
        for x in jax.tree.leaves(a, is_leaf=lambda x: isinstance(x, polyopt.OptState))
        if isinstance(x, polyopt.OptState)
    ][0]
    assert inner.step == "not params" and inner.counts == "not params"
    for slot, field in fields.items():
        mine, theirs = inner.slots[slot], _find(b, field)
        assert jax.tree.structure(mine) == jax.tree.structure(PARAMS0)
        np.testing.assert_allclose(flat([mine]), flat([theirs]), rtol=RTOL, atol=ATOL)
    # and the unmapped slots are the param-shaped trees themselves
    raw = [
        x
        for x in jax.tree.leaves(ours.states[-1], is_leaf=lambda x: isinstance(x, polyopt.OptState))
        if isinstance(x, polyopt.OptState)
    ][0]
    for slot in fields:
        np.testing.assert_array_equal(
            flat([inner.slots[slot]]), flat([jax.tree.map(f, raw.slots[slot], scale)])
        )


def test_tree_map_params_refused_on_packed_state():
    """The JAX fast path (impl="auto") packs the slots of runs of small arrays into
    shared buffers: no params-shaped tree to map over, so init on the
    placeholder says so and names the way out, rather than mapping f over buffers."""
    tx = optax.chain(clip(), po.adamw(lr=LR, weight_decay=WD))
    state = tx.init(PARAMS0)
    with pytest.raises(TypeError, match=r"impl='generic'"):
        optax.tree.map_params(tx, jnp.zeros_like, state)


def test_nnx_partition_specs_follow_params():
    """flax nnx copies each param's metadata to the state trees shaped like it:
    with per-array state, polyopt's slots carry the params' sharding annotations
    exactly as optax's mu and nu do."""
    nnx = pytest.importorskip("flax.nnx")
    mesh = jax.make_mesh((1,), ("model",))
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 4, kernel_init=init, rngs=rngs)
            self.b = nnx.Linear(4, 1, rngs=rngs)

    def specs(tx):
        model = Net(nnx.Rngs(0))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        state = nnx.state(opt, nnx.optimizer.OptState)
        return nnx.to_pure_dict(nnx.get_partition_spec(state))["opt_state"]

    with jax.set_mesh(mesh):
        ours = specs(po.adamw(lr=LR, impl="generic"))["slots"]
        theirs = specs(optax.adamw(LR))[0]
    assert theirs["mu"]["a"]["kernel"] == jax.P(None, "model")  # the annotation is there
    assert ours["exp_avg"] == theirs["mu"]
    assert ours["exp_avg_sq"] == theirs["nu"]


def test_state_maps_with_jax_tree_map():
    """polyopt's state is a plain pytree, packed or not: ``jax.tree.map`` over it keeps
    its structure, inside a composition too, and the result steps."""
    tx = optax.chain(clip(), po.adamw(lr=LR, weight_decay=WD, mask=W_MASK))
    state = tx.init(PARAMS0)
    zeroed = jax.tree.map(jnp.zeros_like, state)
    assert jax.tree.structure(zeroed) == jax.tree.structure(state)
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, PARAMS0), zeroed, PARAMS0)
    assert jax.tree.structure(u) == jax.tree.structure(PARAMS0)


@pytest.mark.parametrize("how", ["multi_transform, unused label", "masked, all False"])
def test_empty_subtree(how):
    """optax hands an empty tree to the transformation of a label no param carries, and
    to one masked by an all-False mask: the state is empty, the updates pass through."""
    if how == "masked, all False":
        tx = optax.masked(po.sgd(lr=5e-2, momentum=0.9), jax.tree.map(lambda _: False, W_MASK))
    else:
        tx = optax.multi_transform(
            {"a": po.adamw(lr=LR), "unused": po.sgd(lr=5e-2)}, {"hidden": "a", "out": "a"}
        )
    state = tx.init(PARAMS0)
    u, _ = tx.update(jax.tree.map(jnp.ones_like, PARAMS0), state, PARAMS0)
    assert jax.tree.structure(u) == jax.tree.structure(PARAMS0)


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, W_MASK])
def test_update_without_params_is_a_value_error(mask):
    tx = po.adamw(lr=LR, mask=mask)
    g = jax.tree.map(jnp.ones_like, PARAMS0)
    state = tx.init(PARAMS0)
    with pytest.raises(ValueError, match=r"polyopt\.optax\.adamw: .*needs params"):
        tx.update(g, state)
    chained = optax.chain(clip(), tx)  # chain passes params=None on to polyopt's update
    with pytest.raises(ValueError, match="needs params"):
        chained.update(g, chained.init(PARAMS0))


def test_mask_without_weight_decay_is_a_type_error():
    # All six optimizers have weight_decay (so all accept mask=); the TypeError is for a
    # factory without one, wrapped by polyopt.optax.transformation.
    assert all(
        "mask" in po.transformation(f).__signature__.parameters
        for f, _ in polyopt.OPTIMIZERS.values()
    )

    def plain_sgd(lr: float = 1e-3, momentum: float = 0.0) -> polyopt.Optimizer:
        return polyopt.sgd(lr=lr, momentum=momentum)

    make = po.transformation(plain_sgd)
    assert "mask" not in make.__signature__.parameters
    make(lr=0.1)  # fine without a mask
    with pytest.raises(TypeError, match="no weight_decay to mask"):
        make(lr=0.1, mask=W_MASK)


def test_mask_structure_mismatch_is_a_value_error():
    # "hidden" lacks "b": neither params' structure nor a prefix of it
    tx = po.adamw(lr=LR, mask={"hidden": {"w": True}, "out": False})
    with pytest.raises(ValueError, match="mask must have the structure of params"):
        tx.init(PARAMS0)
