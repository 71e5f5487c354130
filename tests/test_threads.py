"""Threads: one optimizer stepped from several threads at once is serialized (no step
lost, no torn params); different optimizers in different threads do not wait on each
other and give the results they give alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import polyopt
from polyopt import testing

STEPS = 25


def _shapes(name, mixed):
    """``mixed`` for the optimizers of the shared problems; the 2-D-only ones
    (:data:`polyopt.testing.OWN_PROBLEMS`: Muon) get matrices of the same sizes."""
    if name in testing.NAMES:
        return mixed
    return [s if len(s) == 2 else (int(np.prod(s)) // 8 or 1, 8) for s in mixed]


def _run_threads(n, target):
    barrier = threading.Barrier(n)
    errors = []

    def body(i):
        try:
            barrier.wait()
            target(i)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("impl", ["generic", "auto"])
@pytest.mark.parametrize("name", list(polyopt.OPTIMIZERS))
def test_one_optimizer_from_four_threads_loses_no_step(name, impl, backend):
    lib = pytest.importorskip("torch") if backend == "torch" else np
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(s) for s in _shapes(name, [(50,), (7, 3), ()])]
    g = [lib.asarray(rng.standard_normal(p.shape)) for p in p0]  # the same every step

    def fresh():
        return [lib.asarray(p.copy()) for p in p0]

    shared = fresh()
    opt = polyopt.OPTIMIZERS[name][1](shared, lr=0.01, impl=impl)
    _run_threads(4, lambda i: [opt.step(g) for _ in range(STEPS)])
    alone = fresh()
    ref = polyopt.OPTIMIZERS[name][1](alone, lr=0.01, impl=impl)
    for _ in range(4 * STEPS):
        ref.step(g)
    assert opt.step_count == 4 * STEPS
    for a, b in zip(shared, alone, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_steps_and_checkpoints_from_two_threads():
    opt = polyopt.Adam([np.ones(100)], lr=0.01)
    snaps = []

    def work(i):
        for _ in range(STEPS):
            if i == 0:
                opt.step([np.ones(100)])
            else:
                snaps.append(opt.state_dict())

    _run_threads(2, work)
    for sd in snaps:  # each snapshot is one whole step: m and v agree with its count
        t = sd["step"]
        if t:
            m = sd["state"][0]["exp_avg"]
            np.testing.assert_allclose(m, 1 - 0.9**t, rtol=1e-12)


def test_different_optimizers_do_not_wait_on_each_other():
    a = polyopt.SGD([np.ones(3)], lr=0.1)
    b = polyopt.SGD([np.ones(3)], lr=0.1)
    done = threading.Event()
    with a._lock:  # a is busy (held by this thread): b must still step in another thread
        t = threading.Thread(target=lambda: (b.step([np.ones(3)]), done.set()))
        t.start()
        assert done.wait(10), "stepping b waited on a's lock"
        t.join()
    assert b.step_count == 1 and a.step_count == 0


def test_different_optimizers_in_parallel_equal_each_alone():
    rng = np.random.default_rng(1)
    gs = [rng.standard_normal(64) for _ in range(STEPS)]
    names = list(polyopt.OPTIMIZERS)
    shape = {n: _shapes(n, [(64,)])[0] for n in names}
    params = {n: [np.ones(shape[n])] for n in names}
    opts = {n: polyopt.OPTIMIZERS[n][1](params[n], lr=0.01) for n in names}
    _run_threads(
        len(names), lambda i: [opts[names[i]].step([g.reshape(shape[names[i]])]) for g in gs]
    )
    for n in names:
        alone = [np.ones(shape[n])]
        ref = polyopt.OPTIMIZERS[n][1](alone, lr=0.01)
        for g in gs:
            ref.step([g.reshape(shape[n])])
        assert np.array_equal(params[n][0], alone[0]), n
