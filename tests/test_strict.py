"""The generic path on array-api-strict arrays: the proof that it uses only the standard.

Every optimizer (its two richest rows of the case table), in both forms, runs 20 steps on
``array_api_strict`` float64 arrays and must equal the NumPy float64 run. Then the same
with the step count held as a 0-d array (the path ``jax.jit`` takes), the EMA, and every
schedule evaluated on 0-d integer arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

import polyopt
from polyopt import schedules, testing

xps = pytest.importorskip("array_api_strict")

STEPS = 20
# each optimizer's rows of the case table with every state slot: with numbers and with
# schedules
CASES = [
    pytest.param(c.name, testing.polyopt_hyperparams(c), id=c.id) for c in testing.CASES if c.tags
]
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}


def is_strict(x) -> bool:
    return type(x).__module__.split(".")[0] == "array_api_strict"


def from_strict(x) -> np.ndarray:
    assert is_strict(x), type(x)
    return np.array(np.from_dlpack(x), copy=True)


def numpy_tree(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def strict_tree(tree):
    return {k: xps.asarray(v) for k, v in tree.items()}


def assert_close_tree(strict, ref, rtol=1e-12):
    assert list(strict) == list(ref)
    for k in ref:
        got = from_strict(strict[k])
        assert got.dtype == np.float64 and got.shape == ref[k].shape
        np.testing.assert_allclose(got, ref[k], rtol=rtol, atol=1e-14, err_msg=k)


def _grads(k):
    return numpy_tree(100 + k)


def numpy_run(name, hp):
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**hp)
    params = numpy_tree(0)
    state = opt.init(params)
    for k in range(STEPS):
        params, state = opt.update(params, _grads(k), state)
    return params, state


@pytest.mark.parametrize(("name", "hp"), CASES)
def test_functional_on_strict_equals_numpy(name, hp):
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**hp)
    params = strict_tree(numpy_tree(0))
    state = opt.init(params)
    for k in range(STEPS):
        params, state = opt.update(params, strict_tree(_grads(k)), state)
    ref_params, ref_state = numpy_run(name, hp)
    assert_close_tree(params, ref_params)
    assert state.step == ref_state.step == STEPS
    assert set(state.slots) == set(ref_state.slots)
    for name, arrays in ref_state.slots.items():
        for s, r in zip(state.slots[name], arrays, strict=True):
            if r is None or s is None:  # an array without this slot (Rule.layout)
                assert r is None and s is None, name
                continue
            np.testing.assert_allclose(from_strict(s), r, rtol=1e-12, atol=1e-14, err_msg=name)
    # the run did move
    assert not np.allclose(ref_params["w"], numpy_tree(0)["w"])


@pytest.mark.parametrize(("name", "hp"), CASES)
def test_stateful_on_strict_equals_numpy(name, hp):
    _, cls = polyopt.OPTIMIZERS[name]
    params = strict_tree(numpy_tree(0))
    originals = dict(params)
    opt = cls(params, **hp)
    for k in range(STEPS):
        opt.step(strict_tree(_grads(k)))
    for k in params:  # written in place into the very same strict arrays
        assert opt.params[k] is originals[k]
    ref_params, ref_state = numpy_run(name, hp)
    assert_close_tree(params, ref_params)
    sd = opt.state_dict()
    assert sd["step"] == STEPS
    for i, r in enumerate(ref_state.per_array(len(SHAPES))):
        assert set(sd["state"][i]) == set(r), i
        for n in r:
            np.testing.assert_allclose(from_strict(sd["state"][i][n]), r[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("name", "hp"), CASES)
def test_stateful_checkpoint_on_strict(name, hp):
    _, cls = polyopt.OPTIMIZERS[name]
    params = strict_tree(numpy_tree(0))
    opt = cls(params, **hp)
    for k in range(5):
        opt.step(strict_tree(_grads(k)))
    sd = opt.state_dict()
    fresh_params = strict_tree({k: from_strict(v) for k, v in params.items()})
    fresh = cls(fresh_params, **hp)
    fresh.load_state_dict(sd)
    for k in range(5, 10):
        opt.step(strict_tree(_grads(k)))
        fresh.step(strict_tree(_grads(k)))
    for k in params:
        assert np.array_equal(from_strict(params[k]), from_strict(fresh_params[k]))


@pytest.mark.parametrize(("name", "hp"), CASES)
def test_array_step_count_on_strict(name, hp):
    """The step count as a 0-d int32 array (as under jax.jit): bias corrections and
    schedules then run with array-API operations on the state's dtype (float64 here)."""
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**hp)
    params = strict_tree(numpy_tree(0))
    state = opt.init(params)
    state = state._replace(step=xps.asarray(0, dtype=xps.int32))
    for k in range(STEPS):
        params, state = opt.update(params, strict_tree(_grads(k)), state)
    assert is_strict(state.step) and int(state.step) == STEPS
    ref_params, _ = numpy_run(name, hp)
    assert_close_tree(params, ref_params, rtol=1e-11)


# -- EMA ----------------------------------------------------------------------------------


def _ema_closed_form(ps, d):
    n = len(ps) - 1
    return {
        k: d**n * ps[0][k] + (1 - d) * sum(d ** (n - i) * ps[i][k] for i in range(1, n + 1))
        for k in ps[0]
    }


@pytest.mark.parametrize("decay", [0.0, 0.7, 0.99])
def test_ema_on_strict(decay):
    ps = [numpy_tree(200 + i) for i in range(8)]
    params = strict_tree(ps[0])
    ema = polyopt.EMA(params, decay)
    fema = polyopt.ema(decay)
    fstate = fema.init(strict_tree(ps[0]))
    for p in ps[1:]:
        ema.update(strict_tree(p))
        fstate = fema.update(strict_tree(p), fstate)
    expected = _ema_closed_form(ps, decay)
    assert_close_tree(ema.averaged, expected)
    assert_close_tree(fstate.averaged, expected)
    assert ema.count == len(ps) - 1 and fstate.count == len(ps) - 1

    target = strict_tree(numpy_tree(999))
    originals = dict(target)
    out = ema.copy_to(target)
    assert out is target and all(target[k] is originals[k] for k in target)
    assert_close_tree(target, expected)


# -- schedules under 0-d integer arrays -------------------------------------------------------

SCHEDULES = {
    "constant": schedules.constant(0.1),
    "step_decay": schedules.step_decay(0.1, step_size=7, gamma=0.5),
    "exponential": schedules.exponential(0.1, gamma=0.9),
    "cosine": schedules.cosine(0.1, T_max=25, eta_min=0.01),
    "sgdr": schedules.cosine_warm_restarts(0.1, T_0=5, eta_min=0.001),
    "sgdr-mult2": schedules.cosine_warm_restarts(0.1, T_0=3, T_mult=2, eta_min=0.0),
    "sgdr-mult3": schedules.cosine_warm_restarts(0.2, T_0=2, T_mult=3, eta_min=0.01),
    "linear": schedules.linear(0.0, 0.1, steps=10),
    "linear_warmup": schedules.linear_warmup(0.1, 6, start_factor=0.1),
    "join": schedules.join(
        [schedules.linear_warmup(0.1, 5), schedules.cosine(0.1, 20), schedules.constant(0.001)],
        [5, 25],
    ),
}


@pytest.mark.parametrize("dtype", ["int32", "int64"])
@pytest.mark.parametrize("which", list(SCHEDULES))
def test_schedule_on_strict_int_arrays(which, dtype):
    s = SCHEDULES[which]
    ks = list(range(0, 45))
    host = np.array([s(k) for k in ks], dtype=np.float64)
    values = []
    for k in ks:
        v = s(xps.asarray(k, dtype=getattr(xps, dtype)))
        assert is_strict(v), (k, type(v))
        assert v.shape == ()
        assert xps.isdtype(v.dtype, "real floating")
        values.append(float(v))
    np.testing.assert_allclose(np.array(values), host, rtol=1e-12, atol=1e-14)
    assert len(set(np.round(host, 12))) > 1 or which == "constant"


def test_schedule_host_values_are_torch_like():
    """Spot values computed here from the formulas (so the comparison above is not
    between two wrong answers)."""
    import math

    assert SCHEDULES["step_decay"](14) == pytest.approx(0.1 * 0.25, rel=1e-15)
    assert SCHEDULES["cosine"](25) == pytest.approx(0.01, rel=1e-12)
    # SGDR with T_0 = 3, T_mult = 2: periods [0, 3), [3, 9), [9, 21); k = 6 is half-way
    assert SCHEDULES["sgdr-mult2"](6) == pytest.approx(0.05, rel=1e-12)
    assert SCHEDULES["sgdr-mult2"](9) == pytest.approx(0.1, rel=1e-12)
    assert SCHEDULES["sgdr"](7) == pytest.approx(
        0.001 + 0.099 * (1 + math.cos(math.pi * 2 / 5)) / 2
    )
    assert SCHEDULES["join"](30) == pytest.approx(0.001)
    assert SCHEDULES["linear_warmup"](0) == pytest.approx(0.01)
