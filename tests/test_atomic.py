"""A step is all-or-nothing, including the in-place fast paths and Ctrl-C.

- Arrays the stateful form cannot write into (read-only NumPy arrays, broadcast views,
  ``np.memmap(mode='r')``, NumPy scalars, torch inference tensors) are refused with a
  clear error, at construction and at a step, before anything is written.
- The same array passed twice is refused (updated in place twice, or with two states,
  it would be wrong), naming both places.
- A failure while a step is prepared (a MemoryError in the generic math of a later
  group, next to a fused group that would be written in place) leaves params, state and
  step count bit-identical.
- An interrupt at any point of a step: SIGINT is raised at every n-th line executed in
  polyopt during a step (a tracer stands in for the user's Ctrl-C); afterwards the
  optimizer is exactly as before the step or exactly as after it, and the
  KeyboardInterrupt still reaches the caller. The same for ``load_state_dict``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import numpy as np
import pytest

import polyopt
from polyopt import testing

NAMES = testing.NAMES  # every optimizer the shared problems run (not Muon)
POLYOPT_DIR = os.path.dirname(polyopt.__file__)


def _np(x):
    return testing.to_numpy(x)


def _snapshot(opt):
    leaves = []
    for g in opt.param_groups:
        p = g["params"]
        leaves.extend(p if isinstance(p, list) else [p])
    state = opt.state
    slots = {n: [None if a is None else _np(a) for a in col] for n, col in state.slots.items()}
    return [_np(p) for p in leaves], slots, state.step, state.counts


def _equal(a, b):
    pa, sa, ka, ca = a
    pb, sb, kb, cb = b
    if ka != kb or ca != cb or set(sa) != set(sb):
        return False
    if not all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True)):
        return False
    return all(
        (x is None and y is None) or np.array_equal(x, y)
        for n in sa
        for x, y in zip(sa[n], sb[n], strict=True)
    )


# -- arrays that cannot be written ----------------------------------------------------------


def _readonly():
    a = np.ones(3)
    a.flags.writeable = False
    return a


def _memmap(tmp_path):
    path = tmp_path / "w.dat"
    np.ones(3).tofile(path)
    return np.memmap(path, dtype=np.float64, mode="r", shape=(3,))


NOT_WRITABLE = {
    "read-only": (lambda tmp: _readonly(), r"params\[1\] is read-only"),
    "broadcast": (lambda tmp: np.broadcast_to(np.ones(1), (3,)), r"params\[1\] is read-only"),
    "memmap-r": (_memmap, r"params\[1\] is read-only.*memory map"),
    "numpy-scalar": (lambda tmp: np.float64(1.0), r"params\[1\] is a NumPy scalar"),
}


@pytest.mark.parametrize("impl", ["generic", "auto"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", list(NOT_WRITABLE))
def test_arrays_that_cannot_be_written_are_refused_at_construction(kind, name, impl, tmp_path):
    make, rx = NOT_WRITABLE[kind]
    with pytest.raises(ValueError, match=rx):
        polyopt.OPTIMIZERS[name][1]([np.ones(2), make(tmp_path)], impl=impl)


@pytest.mark.parametrize("impl", ["generic", "auto"])
@pytest.mark.parametrize("name", NAMES)
def test_an_array_made_read_only_later_is_refused_before_anything_changes(name, impl):
    params = [np.ones(4), np.ones(3)]
    opt = polyopt.OPTIMIZERS[name][1](params, lr=0.1, impl=impl)
    opt.step([np.ones(4), np.ones(3)])
    before = _snapshot(opt)
    params[1].flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[1\] is read-only"):
        opt.step([np.ones(4), np.ones(3)])
    assert _equal(_snapshot(opt), before)


def test_torch_inference_tensors_are_refused():
    torch = pytest.importorskip("torch")
    with torch.inference_mode():
        frozen = torch.ones(3)
    with pytest.raises(ValueError, match=r"params\[0\] is an inference tensor"):
        polyopt.AdamW([frozen, torch.ones(2)])


def test_the_functional_form_takes_read_only_arrays():
    # pure: nothing is written, so read-only inputs are fine
    p = _readonly()
    opt = polyopt.adamw(lr=0.1)
    new, _ = opt.update(p, np.ones(3), opt.init(p))
    assert new is not p and np.array_equal(p, np.ones(3))


# -- the same array twice ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("name", NAMES)
def test_the_same_array_twice_is_refused(name, backend):
    if backend == "torch":
        lib = pytest.importorskip("torch")
    elif backend == "jax":
        lib = pytest.importorskip("jax").numpy
    else:
        lib = np
    w = lib.asarray(np.ones(3))
    cls = polyopt.OPTIMIZERS[name][1]
    with pytest.raises(
        ValueError, match=r"params\['tied'\] is the same array as params\['embed'\]"
    ):
        cls({"embed": w, "tied": w, "b": lib.asarray(np.ones(2))})
    with pytest.raises(ValueError, match=r"params\[1\]\['params'\]\[0\] is the same array as "):
        cls([{"params": [w]}, {"params": [w]}])


def test_the_same_array_twice_in_the_functional_form_is_updated_once_per_place():
    w = np.ones(3)
    opt = polyopt.sgd(lr=0.1)
    new, _ = opt.update([w, w], [np.ones(3), 2 * np.ones(3)], opt.init([w, w]))
    np.testing.assert_allclose(new[0], 0.9)
    np.testing.assert_allclose(new[1], 0.8)
    assert np.array_equal(w, np.ones(3))


# -- failures while preparing -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_a_failure_in_a_later_group_leaves_an_earlier_fused_group_unwritten(
    name, backend, monkeypatch
):
    """Group 0 takes the in-place fused kernel; group 1's float16 arrays take the generic
    math, which runs out of memory. Before the prepare/commit split, group 0 was written
    by then."""
    lib = pytest.importorskip("torch") if backend == "torch" else np

    def arr(x, dt):
        return lib.asarray(np.asarray(x, dtype=dt))

    groups = [
        {"params": [arr(np.ones(5), "float32"), arr(np.ones(3), "float32")]},
        {"params": [arr(np.ones(4), "float16")], "lr": 0.01},
    ]
    if backend == "torch":  # torch's kernel takes float16: make it a strided one instead
        groups[1]["params"] = [lib.ones(8, dtype=lib.float32)[::2]]
    opt = polyopt.OPTIMIZERS[name][1](groups, lr=0.1)

    def grads():
        return [[lib.ones_like(p) for p in g["params"]] for g in groups]

    opt.step(grads())
    before = _snapshot(opt)
    real = polyopt.Optimizer._step_one

    def fail_in_group_1(self, xp, p, g, slots, hp, k):
        if hp["lr"] == 0.01:
            raise MemoryError("out of memory (injected)")
        return real(self, xp, p, g, slots, hp, k)

    monkeypatch.setattr(polyopt.Optimizer, "_step_one", fail_in_group_1)
    with pytest.raises(MemoryError, match="injected"):
        opt.step(grads())
    assert _equal(_snapshot(opt), before)
    monkeypatch.setattr(polyopt.Optimizer, "_step_one", real)
    opt.step(grads())  # and it goes on
    assert opt.step_count == 2


# -- interrupts -------------------------------------------------------------------------------


def _interrupt_at(n, action):
    """Run ``action()`` raising SIGINT at the n-th line polyopt executes (0: count them).
    Returns (lines seen, whether KeyboardInterrupt came out)."""
    seen = [0]

    def tracer(frame, event, arg):
        if frame.f_code.co_filename.startswith(POLYOPT_DIR):
            if event == "line":
                seen[0] += 1
                if seen[0] == n:
                    signal.raise_signal(signal.SIGINT)
            return tracer
        return None

    interrupted = False
    # Python's own Ctrl-C handler, whatever another test or library installed in this
    # process (the test is about polyopt holding back KeyboardInterrupt, not about them)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # and SIGINT not blocked in this thread (a library may have blocked it)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    sys.settrace(tracer)
    try:
        action()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sys.settrace(None)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if previous is not None:  # None: a handler installed outside Python, not restorable
            signal.signal(signal.SIGINT, previous)
    return seen[0], interrupted


def _positions(total, samples=60):
    """Every line in the last stretch (the commit), a spread over the rest."""
    tail = range(max(1, total - 120), total + 1)
    spread = np.unique(np.linspace(1, total, samples).astype(int)).tolist()
    return sorted(set(spread) | set(tail))


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals: main thread"
)
@pytest.mark.parametrize(
    ("backend", "impl"), [("numpy", "auto"), ("numpy", "generic"), ("torch", "auto")]
)
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_an_interrupt_leaves_the_step_done_or_not_done(name, backend, impl):
    lib = pytest.importorskip("torch") if backend == "torch" else np
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in [(4,), (3,), (2, 2)]]
    g = [lib.asarray(rng.standard_normal(p.shape).astype(np.float32)) for p in p0]
    cfg = dict(lr=0.1, momentum=0.9) if name == "sgd" else dict(lr=0.1, amsgrad=True)

    def fresh():
        groups = [
            {"params": [lib.asarray(p0[0].copy()), lib.asarray(p0[1].copy())]},
            {"params": [lib.asarray(p0[2].copy())], "lr": 0.05},
        ]
        opt = polyopt.OPTIMIZERS[name][1](groups, **cfg, impl=impl)
        opt.step([[g[0], g[1]], [g[2]]])
        return opt

    def step(opt):
        return lambda: opt.step([[g[0], None], [g[2]]])  # a missing grad: counts change too

    ref = fresh()
    before = _snapshot(ref)
    total, _ = _interrupt_at(0, step(ref))
    after = _snapshot(ref)
    assert not _equal(before, after) and total > 50
    outcomes = {"before": 0, "after": 0}
    for n in _positions(total):
        opt = fresh()
        _, interrupted = _interrupt_at(n, step(opt))
        assert interrupted, f"the interrupt at line {n} of {total} was swallowed"
        now = _snapshot(opt)
        if _equal(now, before):
            outcomes["before"] += 1
        elif _equal(now, after):
            outcomes["after"] += 1
        else:
            pytest.fail(f"an interrupt at line {n} of {total} left a half-written step")
    assert outcomes["before"] > 0 and outcomes["after"] > 0, outcomes


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals: main thread"
)
def test_an_interrupt_leaves_load_state_dict_done_or_not_done():
    def fresh(seed):
        opt = polyopt.Adam([{"params": [np.ones(3)]}, {"params": [np.ones(2)], "lr": 0.2}])
        rng = np.random.default_rng(seed)
        for _ in range(seed + 1):
            opt.step([[rng.standard_normal(3)], [rng.standard_normal(2)]])
        return opt

    sd = fresh(3).state_dict()
    ref = fresh(1)
    before = _snapshot(ref), [dict(g, params=None) for g in ref.param_groups]
    total, _ = _interrupt_at(0, lambda: ref.load_state_dict(sd))
    after = _snapshot(ref), [dict(g, params=None) for g in ref.param_groups]
    for n in _positions(total, samples=30):
        opt = fresh(1)
        _interrupt_at(n, lambda opt=opt: opt.load_state_dict(sd))
        now = _snapshot(opt), [dict(g, params=None) for g in opt.param_groups]
        ok = any(_equal(now[0], x[0]) and now[1] == x[1] for x in (before, after))
        assert ok, f"an interrupt at line {n} of {total} left a half-loaded state"


def test_the_previous_sigint_handler_is_restored():
    before = signal.getsignal(signal.SIGINT)
    opt = polyopt.SGD([np.ones(2)], lr=0.1)
    opt.step([np.ones(2)])
    assert signal.getsignal(signal.SIGINT) is before
