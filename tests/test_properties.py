"""Properties the optimizers must have, whatever the numbers.

- lr = 0 changes nothing (params identical bit for bit), every case of the table;
- adamw(weight_decay=0) is adam exactly; adam(decoupled_weight_decay=True) is adamw
  exactly (and adamw(decoupled_weight_decay=False) is adam with L2 exactly);
- SGDW versus SGD with L2 decay (Loshchilov & Hutter 2019, sec. 2): on a zero-gradient
  problem SGDW gives p0·(1 - lr·λ)^n, SGD+L2 with momentum follows a linear recurrence
  (computed here with a matrix power) and shrinks the weights more; without momentum the
  two are the same map;
- maximize=True on g equals maximize=False on -g, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings  # noqa: E402  (in the test extra: CI runs these)
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import cases as C  # noqa: E402
import polyopt  # noqa: E402
from polyopt import schedules  # noqa: E402


def _bits(arrays):
    return [(a.dtype.str, a.shape, a.tobytes()) for a in map(np.asarray, arrays)]


def _rule(name):
    return polyopt.OPTIMIZERS[name][0]().rule


def _freezes_at_lr_zero(name):
    """lr = 0 leaves the params bit for bit where the param moves by lr·(finite) only;
    a rule whose lr is not schedulable (schedule-free AdamW: lr sets the averaging
    weights) returns an interpolation y = (1-β)z + βx, equal to p0 up to rounding."""
    return "lr" in _rule(name).schedulable


#: the rows whose optimizer takes ``maximize`` (schedule-free AdamW has none)
MAXIMIZE_CASES = [c for c in C.CASES if "maximize" in _rule(c.name).defaults]


def _run(factory, hp, p0, grads):
    opt = factory(**hp)
    params = [p.copy() for p in p0]
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    return params, state


# -- lr = 0 -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", C.CASES, ids=C.CASE_IDS)
def test_lr_zero_changes_nothing(case):
    """Every optimizer and option with lr = 0: the update is 0·(finite) = 0, and
    p - 0 == p exactly; decoupled decay is p·(1 - 0·λ) = p·1 = p exactly."""
    p0, grads = C.make_problem(20)
    hp = {**C.polyopt_hyperparams(case), "lr": 0.0}
    factory, cls = polyopt.OPTIMIZERS[case.name]
    params, state = _run(factory, hp, p0, grads)
    _assert_unchanged(case.name, params, p0)
    assert state.step == 20
    # the state still moves (lr = 0 is not "skip the step"); None: a slot this array
    # does not have (Adafactor's factored moments)
    moved = [
        np.any(v != 0)
        for arrays in state.slots.values()
        for v in arrays
        if v is not None and v.size
    ]
    if moved:
        assert any(moved), "the optimizer state should still be updated with lr = 0"

    # stateful form, in place
    mine = [p.copy() for p in p0]
    opt = cls(mine, **hp)
    for g in grads:
        opt.step(g)
    _assert_unchanged(case.name, mine, p0)


def _assert_unchanged(name, params, p0):
    if _freezes_at_lr_zero(name):
        assert _bits(params) == _bits(p0)
    else:
        assert [(a.dtype.str, a.shape) for a in params] == [(a.dtype.str, a.shape) for a in p0]
        for a, b in zip(params, p0, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)


def test_lr_zero_schedule_changes_nothing():
    p0, grads = C.make_problem(10)
    names = [n for n in C.NAMES if "lr" in _rule(n).schedulable]
    assert names
    for name in names:
        params, _ = _run(polyopt.OPTIMIZERS[name][0], dict(lr=schedules.constant(0.0)), p0, grads)
        assert _bits(params) == _bits(p0), name


_finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def _problems(draw):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4))
    p = draw(hnp.arrays(np.float64, shape, elements=_finite))
    # p - (+0.0) and p - (-0.0) are both p except for p = -0.0, whose sign IEEE
    # addition may flip; signed zeros are not what this property is about
    p = np.where(p == 0, 0.0, p)
    gs = [
        draw(hnp.arrays(np.float64, shape, elements=_finite))
        for _ in range(draw(st.integers(1, 4)))
    ]
    return p, gs


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(C.CASES), problem=_problems())
def test_lr_zero_changes_nothing_hypothesis(case, problem):
    p, gs = problem
    hp = {**C.polyopt_hyperparams(case), "lr": 0.0}
    params, _ = _run(polyopt.OPTIMIZERS[case.name][0], hp, [p], [[g] for g in gs])
    _assert_unchanged(case.name, params, [p])


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(MAXIMIZE_CASES), problem=_problems())
def test_maximize_is_minimizing_the_negated_gradient_hypothesis(case, problem):
    p, gs = problem
    hp = C.polyopt_hyperparams(case)
    factory = polyopt.OPTIMIZERS[case.name][0]
    up, us = _run(factory, {**hp, "maximize": True}, [p], [[g] for g in gs])
    down, ds = _run(factory, {**hp, "maximize": False}, [p], [[-g] for g in gs])
    assert _bits(up) == _bits(down)
    assert list(us.slots) == list(ds.slots)
    for name, arrays in us.slots.items():
        assert _bits(arrays) == _bits(ds.slots[name]), name


# -- maximize ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", MAXIMIZE_CASES, ids=[c.id for c in MAXIMIZE_CASES])
def test_maximize_is_minimizing_the_negated_gradient(case):
    """Negation is exact in IEEE arithmetic, so maximizing with g and minimizing with -g
    must agree bit for bit, params and state, weight decay included (decay still shrinks)."""
    p0, grads = C.make_problem(40)
    neg = [[-g for g in gs] for gs in grads]
    hp = C.polyopt_hyperparams(case)
    factory = polyopt.OPTIMIZERS[case.name][0]
    up, us = _run(factory, {**hp, "maximize": True}, p0, grads)
    down, ds = _run(factory, {**hp, "maximize": False}, p0, neg)
    assert _bits(up) == _bits(down)
    assert sorted(us.slots) == sorted(ds.slots)
    for name, arrays in us.slots.items():
        assert len(arrays) == len(ds.slots[name]) == len(p0), name
        assert _bits(arrays) == _bits(ds.slots[name]), name
    # and it is not a no-op: maximizing with g goes the other way from minimizing with g
    other, _ = _run(factory, {**hp, "maximize": False}, p0, grads)
    assert any(not np.array_equal(a, b) for a, b in zip(up, other, strict=True) if a.size)


# -- Adam / AdamW equivalences -------------------------------------------------------------

_ADAM_VARIANTS = [
    dict(lr=0.01),
    dict(lr=0.01, amsgrad=True, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=0.01, maximize=True),
    dict(lr=schedules.cosine(0.01, 30, 1e-4)),
    dict(
        lr=schedules.join([schedules.linear_warmup(0.01, 5), schedules.cosine(0.01, 50)], [5]),
        amsgrad=True,
    ),
]


def _assert_same_run(a, b):
    (pa, sa), (pb, sb) = a, b
    assert _bits(pa) == _bits(pb)
    assert sorted(sa.slots) == sorted(sb.slots)
    for name, arrays in sa.slots.items():
        assert len(arrays) == len(sb.slots[name]) == len(pa), name
        assert _bits(arrays) == _bits(sb.slots[name]), name


@pytest.mark.parametrize("hp", _ADAM_VARIANTS, ids=range(len(_ADAM_VARIANTS)))
def test_adamw_without_decay_is_adam(hp):
    p0, grads = C.make_problem(60)
    _assert_same_run(
        _run(polyopt.adamw, {**hp, "weight_decay": 0.0}, p0, grads),
        _run(polyopt.adam, hp, p0, grads),
    )


@pytest.mark.parametrize(
    "wd", [0.1, 1e-3, schedules.exponential(0.2, 0.95)], ids=["0.1", "1e-3", "schedule"]
)
@pytest.mark.parametrize("hp", _ADAM_VARIANTS, ids=range(len(_ADAM_VARIANTS)))
def test_adam_decoupled_is_adamw(hp, wd):
    p0, grads = C.make_problem(60)
    _assert_same_run(
        _run(polyopt.adam, {**hp, "weight_decay": wd, "decoupled_weight_decay": True}, p0, grads),
        _run(polyopt.adamw, {**hp, "weight_decay": wd}, p0, grads),
    )
    # ... and adamw with coupled decay is adam's L2
    _assert_same_run(
        _run(polyopt.adamw, {**hp, "weight_decay": wd, "decoupled_weight_decay": False}, p0, grads),
        _run(polyopt.adam, {**hp, "weight_decay": wd}, p0, grads),
    )
    # and the two decays really are different things
    coupled, _ = _run(polyopt.adam, {**hp, "weight_decay": wd}, p0, grads)
    decoupled, _ = _run(polyopt.adamw, {**hp, "weight_decay": wd}, p0, grads)
    assert not np.allclose(coupled[3], decoupled[3], rtol=1e-6, atol=0)


# -- SGDW versus SGD + L2 (the AdamW paper, section 2) ------------------------------------

N = 300


def _sgd_l2_zero_grad(p0, lr, wd, mu, tau, nesterov, n):
    """(p_n, b_n) of SGD with L2 decay λ on a zero gradient, from the linear recurrence.

    The gradient seen is g_t = λ p_{t-1}. Step one (b_1 = g_1, no dampening):
        b_1 = λ p0,   p_1 = p0 - lr·(g_1 + μ b_1 if nesterov else b_1).
    Step t > 1, with x_t = (p_t, b_t):
        b_t = (1-τ)λ p_{t-1} + μ b_{t-1}
        p_t = p_{t-1} - lr·b_t                          = (1 - lr(1-τ)λ) p - lr μ b
        p_t = p_{t-1} - lr·(λ p_{t-1} + μ b_t)         = (1 - lrλ - lrμ(1-τ)λ) p - lr μ² b
    so x_n = A^(n-1) x_1.
    """
    b1 = wd * p0
    p1 = p0 - lr * (wd * p0 + mu * b1 if nesterov else b1)
    if nesterov:
        A = np.array(
            [[1 - lr * wd - lr * mu * (1 - tau) * wd, -lr * mu * mu], [(1 - tau) * wd, mu]]
        )
    else:
        A = np.array([[1 - lr * (1 - tau) * wd, -lr * mu], [(1 - tau) * wd, mu]])
    x = np.linalg.matrix_power(A, n - 1) @ np.array([p1, b1])
    return x[0], x[1]


def _trajectory(hp, p0, n):
    opt = polyopt.sgd(**hp)
    params = np.array(p0)
    state = opt.init(params)
    out = []
    for _ in range(n):
        params, state = opt.update(params, np.zeros_like(params), state)
        out.append((params, state.per_array(1)[0]))
    return out


@pytest.mark.parametrize(
    ("mu", "tau", "nesterov"),
    [(0.9, 0.0, False), (0.9, 0.3, False), (0.8, 0.0, True), (0.5, 0.0, False)],
)
def test_sgdw_vs_sgd_l2_with_momentum_on_zero_gradient(mu, tau, nesterov):
    lr, wd = 0.01, 0.1
    p0 = np.array([1.5, -0.25, 3.0])
    l2 = _trajectory(
        dict(lr=lr, momentum=mu, dampening=tau, nesterov=nesterov, weight_decay=wd), p0, N
    )
    w = _trajectory(
        dict(
            lr=lr,
            momentum=mu,
            dampening=tau,
            nesterov=nesterov,
            weight_decay=wd,
            decoupled_weight_decay=True,
        ),
        p0,
        N,
    )
    for n in range(1, N + 1):
        p_l2, s_l2 = l2[n - 1]
        p_w, s_w = w[n - 1]
        # SGDW: the buffer only ever sees zero gradients; the weight decays geometrically.
        # pow() versus n roundings of a product: n ulps at most, 1e-13 relative
        np.testing.assert_allclose(p_w, p0 * (1 - lr * wd) ** n, rtol=1e-13, err_msg=f"SGDW n={n}")
        assert np.all(s_w["momentum_buffer"] == 0)
        # SGD + L2: the recurrence (matrix power rounds differently: ~n ulps, 1e-12)
        want_p, want_b = _sgd_l2_zero_grad(p0, lr, wd, mu, tau, nesterov, n)
        np.testing.assert_allclose(p_l2, want_p, rtol=1e-12, err_msg=f"SGD+L2 n={n}")
        np.testing.assert_allclose(
            s_l2["momentum_buffer"], want_b, rtol=1e-12, err_msg=f"buffer n={n}"
        )
        if n == 1 and not nesterov:
            np.testing.assert_allclose(p_l2, p_w, rtol=1e-15)  # b_1 = λp0: the same first step
        else:
            # the buffer accumulates the decay: L2 shrinks strictly more
            assert np.all(np.abs(p_l2) < np.abs(p_w)), f"n={n}"
    # Over many steps the buffer holds about (1-τ)/(1-μ) times the decay gradient (Nesterov,
    # τ = 0: g + μ·g/(1-μ) = g/(1-μ) too), so L2's shrink rate is amplified by that factor
    # relative to SGDW's, to first order in lr·λ; compare the log shrinkage after N steps.
    p_l2, p_w = l2[-1][0], w[-1][0]
    ratio = np.log(np.abs(p_l2[0] / p0[0])) / np.log(np.abs(p_w[0] / p0[0]))
    amp = (1 - tau) / (1 - mu)
    print(
        f"mu={mu} tau={tau} nesterov={nesterov}: L2/SGDW log-shrink ratio {ratio:.3f}, "
        f"(1-τ)/(1-μ) = {amp:.3f}"
    )
    assert 0.8 * amp < ratio < 1.25 * amp, (ratio, amp)


def test_sgdw_equals_sgd_l2_without_momentum():
    """Without momentum p - lr(g + λp) and p(1 - lrλ) - lr g are the same map (they differ
    by rounding only: ~1e-16 per step, 1e-12 after 150 steps)."""
    p0, grads = C.make_problem(150)
    for lr in (0.05, schedules.cosine(0.1, 40)):
        for maximize in (False, True):
            hp = dict(lr=lr, weight_decay=0.2, maximize=maximize)
            a = polyopt.sgd(**hp)
            b = polyopt.sgd(**hp, decoupled_weight_decay=True)
            pa, pb = [p.copy() for p in p0], [p.copy() for p in p0]
            sa, sb = a.init(pa), b.init(pb)
            for g in grads:
                pa, sa = a.update(pa, g, sa)
                pb, sb = b.update(pb, g, sb)
                for x, y in zip(pa, pb, strict=True):
                    np.testing.assert_allclose(
                        x, y, rtol=1e-12, atol=1e-12 * (np.max(np.abs(y)) if y.size else 0)
                    )
    # zero gradient: both are p0 (1 - lrλ)^n
    p = np.array([2.0, -1.0])
    for dec in (False, True):
        traj = _trajectory(dict(lr=0.05, weight_decay=0.2, decoupled_weight_decay=dec), p, 100)
        for n, (pn, _) in enumerate(traj, start=1):
            np.testing.assert_allclose(pn, p * (1 - 0.05 * 0.2) ** n, rtol=1e-13)
