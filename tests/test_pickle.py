"""Optimizers and their state pickle and deep-copy, and the copy continues bit-identically.

Every optimizer (its SCHEDULED row, with a schedule as ``lr`` where the rule allows one), in
both forms, on NumPy, torch and JAX,
through the fused paths (flat NumPy state, packed JAX state), with per-array counts
(after a missing gradient) and complex params: N steps, copy (``pickle`` and
``copy.deepcopy``), M more steps on the original and on the copy with the same grads,
then params and every state entry are compared bit for bit. ``state_dict()`` snapshots
share nothing mutable with the optimizer.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import polyopt
from polyopt import schedules, testing

NAMES = testing.NAMES  # every optimizer the shared problems run (not Muon)


def _cfg(name, lr):
    """The optimizer's SCHEDULED row of the case table (every state slot, schedules as
    hyperparameters), with ``lr`` as this file's schedule where the rule lets ``lr`` be
    one (schedule-free AdamW's cannot: its row schedules ``weight_decay``)."""
    hp = testing.polyopt_hyperparams(testing.richest(name, testing.SCHEDULED))
    if "lr" in polyopt.OPTIMIZERS[name][0]().rule.schedulable:
        hp["lr"] = lr
    return hp


BACKENDS = ["numpy", "torch", "jax"]


def _lib(backend):
    if backend == "torch":
        return pytest.importorskip("torch")
    if backend == "jax":
        return pytest.importorskip("jax").numpy
    return np


def _arrays(backend, seed, complex_=False):
    lib = _lib(backend)
    rng = np.random.default_rng(seed)
    out = []
    for shape in [(3,), (2, 2), (5,)]:
        x = rng.standard_normal(shape).astype(np.float32)
        if complex_:
            x = (x + 1j * rng.standard_normal(shape)).astype(np.complex64)
        out.append(lib.asarray(x))
    return out


def _grads(backend, k, complex_=False):
    g = _arrays(backend, 100 + k, complex_)
    if k == 1:
        g[2] = None  # per-array counts from here on
    return g


def _same(a, b):
    assert np.array_equal(testing.to_numpy(a), testing.to_numpy(b))


def _same_state(s1, s2):
    assert int(s1.step) == int(s2.step)
    assert set(s1.slots) == set(s2.slots)
    for name in s1.slots:
        for a, b in zip(s1.slots[name], s2.slots[name], strict=True):
            if a is None or b is None:  # an array without this slot (Rule.layout)
                assert a is None and b is None, name
            else:
                _same(a, b)
    c1 = None if s1.counts is None else [int(c) for c in s1.counts]
    c2 = None if s2.counts is None else [int(c) for c in s2.counts]
    assert c1 == c2


COPIES = {"pickle": lambda x: pickle.loads(pickle.dumps(x)), "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_stateful_copy_continues_bit_identically(name, backend, how):
    cls = polyopt.OPTIMIZERS[name][1]
    complex_ = name == "adam"  # one optimizer also with complex params
    opt = cls(_arrays(backend, 0, complex_), **_cfg(name, schedules.cosine(0.05, 10)))
    for k in range(3):
        opt.step(_grads(backend, k, complex_))
    twin = COPIES[how](opt)
    assert type(twin) is type(opt) and twin.step_count == 3
    for k in range(3, 6):
        opt.step(_grads(backend, k, complex_))
        twin.step(_grads(backend, k, complex_))
    for a, b in zip(opt.params, twin.params, strict=True):
        _same(a, b)
    _same_state(opt.state, twin.state)
    if backend != "jax":  # the copy owns its arrays: stepping it leaves the original
        before = testing.to_numpy(opt.params[0]).copy()
        twin.step(_grads(backend, 9, complex_))
        assert np.array_equal(testing.to_numpy(opt.params[0]), before)


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_functional_optimizer_and_state_copy(name, backend, how):
    factory = polyopt.OPTIMIZERS[name][0]
    lr = schedules.join([schedules.linear_warmup(0.05, 2), schedules.constant(0.05)], [2])
    opt = factory(**_cfg(name, lr))
    params = _arrays(backend, 1)
    state = opt.init(params)
    for k in range(3):
        params, state = opt.update(params, _grads(backend, k), state)
    opt2, state2, params2 = COPIES[how]((opt, state, params))
    assert repr(opt2) == repr(opt)
    for k in range(3, 6):
        params, state = opt.update(params, _grads(backend, k), state)
        params2, state2 = opt2.update(params2, _grads(backend, k), state2)
    for a, b in zip(params, params2, strict=True):
        _same(a, b)
    _same_state(state, state2)


def test_the_jax_packed_state_pickles_and_stays_packed():
    jax = pytest.importorskip("jax")
    from polyopt.flat import Packed

    opt = polyopt.adamw(lr=0.01)
    params = [jax.numpy.ones(4) * i for i in range(5)]
    state = opt.init(params)
    assert isinstance(state.slots["exp_avg"], Packed)
    state2 = pickle.loads(pickle.dumps(state))
    assert isinstance(state2.slots["exp_avg"], Packed)
    p1, s1 = jax.jit(opt.update)(params, params, state)
    p2, s2 = jax.jit(opt.update)(params, params, state2)
    for a, b in zip(p1, p2, strict=True):
        _same(a, b)


@pytest.mark.parametrize("how", list(COPIES))
def test_ema_copies(how):
    w = np.ones(3)
    ema = polyopt.EMA(w, decay=0.5)
    w += 1
    ema.update(w)
    twin = COPIES[how](ema)
    w += 1
    ema.update(w)
    twin.update(w)
    _same(ema.averaged, twin.averaged)


# -- snapshots share nothing ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_state_dict_shares_nothing_mutable(backend):
    lib = _lib(backend)
    betas = [0.9, 0.99]
    tag = ["a", "b"]
    params = [lib.asarray(np.ones(3, np.float32))]
    opt = polyopt.Adam([{"params": params, "tags": tag}], lr=0.1, betas=betas)
    opt.step([lib.asarray(np.ones(3, np.float32))])
    sd = opt.state_dict()
    sd["param_groups"][0]["tags"].append("c")
    sd["param_groups"][0]["lr"] = 5.0
    arr = sd["state"][0]["exp_avg"]
    arr[...] = 123.0
    assert opt.param_groups[0]["tags"] == ["a", "b"] and opt.param_groups[0]["lr"] == 0.1
    assert float(testing.to_numpy(opt.state.slots["exp_avg"][0])[0]) != 123.0
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)  # a tuple: nothing to share
    # and a loaded dict is copied in: changing it afterwards changes nothing
    opt.load_state_dict(sd)
    arr[...] = -1.0
    assert float(testing.to_numpy(opt.state.slots["exp_avg"][0])[0]) == 123.0
