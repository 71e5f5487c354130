"""Fuzzing the engine's contract with hypothesis.

Random optimizers and hyperparameters, random arrays (0-d, empty, up to 3-D, some of
them strided views; float32, float64, complex64, complex128; NumPy or torch; generic or
fused), parameter groups,
missing gradients, and at random steps an injected failure: a bad gradient (shape,
dtype, a different library), a schedule turning negative, a MemoryError inside the
math of a random array, an array made read-only. Checked, bit for bit:

- a failed step changes nothing (params, state, counts, step count);
- the good steps give exactly what an optimizer that never saw the failures gives
  (which also runs through a different form: functional on copies);
- a skipped array and its state do not move.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import polyopt
from polyopt import testing

torch = pytest.importorskip("torch")

NAMES = testing.NAMES  # every optimizer the shared problems run (not Muon)
DTYPES = ["float32", "float64", "complex64", "complex128"]


def _rule(name):
    return polyopt.OPTIMIZERS[name][0]().rule


def _takes_complex(name):
    """Whether the optimizer takes complex params (Adafactor refuses them at init)."""
    try:
        polyopt.OPTIMIZERS[name][0]().init([np.ones(1, np.complex128)])
    except TypeError:
        return False
    return True


#: Each optimizer's dtypes: those it takes.
NAME_DTYPES = {
    n: [d for d in DTYPES if _takes_complex(n) or not d.startswith("complex")] for n in NAMES
}


def _scheduled(name):
    """The hyperparameter the "schedule" failure turns negative: ``lr`` where the rule
    lets it be a schedule, else its first schedulable one (schedule-free AdamW's
    weight_decay)."""
    schedulable = _rule(name).schedulable
    return "lr" if "lr" in schedulable else schedulable[0]


FAILURES = ["none", "shape", "dtype", "library", "schedule", "memory", "memory", "read-only"]


def _hyperparams(draw, name):
    lr = draw(st.sampled_from([1e-3, 1e-2, 0.1]))
    hp = {"lr": lr, "weight_decay": draw(st.sampled_from([0.0, 1e-2, 0.1]))}
    if name == "sgd":
        mu = draw(st.sampled_from([0.0, 0.5, 0.9]))
        hp.update(momentum=mu)
        if mu:
            hp["nesterov"] = draw(st.booleans())
            if not hp["nesterov"]:
                hp["dampening"] = draw(st.sampled_from([0.0, 0.3]))
    elif name == "adagrad":
        hp.update(lr_decay=draw(st.sampled_from([0.0, 0.01])))
    elif name == "rmsprop":
        hp.update(momentum=draw(st.sampled_from([0.0, 0.5])), centered=draw(st.booleans()))
    elif name in ("adam", "adamw"):
        hp.update(amsgrad=draw(st.booleans()), betas=(draw(st.sampled_from([0.8, 0.9])), 0.99))
    if "maximize" in _rule(name).defaults:  # schedule-free AdamW has none
        hp["maximize"] = draw(st.booleans())
    return hp


@st.composite
def scenarios(draw):
    name = draw(st.sampled_from([*NAMES, "adam", "adamw"]))  # those have fast paths: twice
    backend = draw(st.sampled_from(["numpy", "torch"]))
    dtype = draw(st.sampled_from(NAME_DTYPES[name]))
    impl = draw(st.sampled_from(["auto", "generic"]))
    n = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))) for _ in range(n)]
    split = draw(st.integers(0, n - 1)) if n > 1 else 0  # groups: [0, split), [split, n)
    steps = draw(st.integers(2, 6))
    missing = [
        [draw(st.booleans()) and draw(st.booleans()) for _ in range(n)] for _ in range(steps)
    ]
    failures = [draw(st.sampled_from(FAILURES)) for _ in range(steps)]
    victim = [draw(st.integers(0, n - 1)) for _ in range(steps)]
    strided = [draw(st.booleans()) for _ in range(n)]
    return dict(
        strided=strided,
        name=name,
        backend=backend,
        dtype=dtype,
        impl=impl,
        shapes=shapes,
        split=split,
        hp=_hyperparams(draw, name),
        missing=missing,
        failures=failures,
        victim=victim,
        seed=draw(st.integers(0, 2**16)),
    )


def _lib(backend):
    return torch if backend == "torch" else np


def _make(backend, x):
    if backend == "torch":
        return torch.tensor(x)
    return np.array(x)


def _values(backend, dtype, shapes, rng):
    out = []
    for s in shapes:
        x = rng.standard_normal(s)
        if dtype.startswith("complex"):
            x = x + 1j * rng.standard_normal(s)
        out.append(_make(backend, np.asarray(x).astype(dtype)))
    return out


def _strided(backend, a):
    """``a``'s values in a non-contiguous view (the fast paths leave those to the generic
    math: a run of arrays half fused, half not)."""
    if a.ndim == 0 or a.shape[-1] == 0:
        return a
    shape = tuple(a.shape[:-1]) + (2 * a.shape[-1],)
    buf = torch.zeros(shape, dtype=a.dtype) if backend == "torch" else np.zeros(shape, a.dtype)
    view = buf[..., ::2]
    view[...] = a
    return view


def _snapshot(opt):
    leaves = [p for g in opt.param_groups for p in g["params"]]
    st_ = opt.state
    slots = {
        n: [None if a is None else testing.to_numpy(a) for a in c] for n, c in st_.slots.items()
    }
    return [testing.to_numpy(p) for p in leaves], slots, st_.step, st_.counts


def _same(a, b):
    pa, sa, ka, ca = a
    pb, sb, kb, cb = b
    assert ka == kb and ca == cb and set(sa) == set(sb)
    for x, y in zip(pa, pb, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)
    for n in sa:
        for x, y in zip(sa[n], sb[n], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                assert np.array_equal(x, y, equal_nan=True)


def _LATER_GROUP_FAILS(backend):  # noqa: N802 - a constant per backend
    """Found rare by chance, so given outright: a fused group updated in place, then a
    strided array of the next group whose generic math runs out of memory."""
    return dict(
        name="adamw",
        backend=backend,
        dtype="float32",
        impl="auto",
        shapes=[(3,), (4,)],
        split=1,
        hp=dict(lr=0.1, weight_decay=0.01, amsgrad=True, betas=(0.9, 0.99), maximize=False),
        missing=[[False, False]] * 3,
        failures=["none", "memory", "none"],
        victim=[0, 0, 0],
        seed=1,
        strided=[False, True],
    )


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sc=scenarios())
@example(sc=_LATER_GROUP_FAILS("numpy"))
@example(sc=_LATER_GROUP_FAILS("torch"))
def test_failed_steps_change_nothing_and_good_steps_match_a_clean_run(sc, monkeypatch_session):
    rng = np.random.default_rng(sc["seed"])
    backend, dtype, shapes = sc["backend"], sc["dtype"], sc["shapes"]
    p0 = _values(backend, dtype, shapes, rng)
    p0 = [_strided(backend, p) if s else p for p, s in zip(p0, sc["strided"], strict=True)]
    grads = [_values(backend, dtype, shapes, rng) for _ in sc["missing"]]
    cls = polyopt.OPTIMIZERS[sc["name"]][1]
    factory = polyopt.OPTIMIZERS[sc["name"]][0]
    split = sc["split"]

    def groups(arrays):
        if split == 0:
            return [{"params": list(arrays)}]
        return [{"params": list(arrays[:split])}, {"params": list(arrays[split:]), "lr": 0.05}]

    def per_group(g):
        return [g] if split == 0 else [g[:split], g[split:]]

    copy = [_make(backend, testing.to_numpy(p).astype(dtype)) for p in p0]
    hp = dict(sc["hp"])
    key = _scheduled(sc["name"])  # the hyperparameter the "schedule" failure breaks
    value = hp.pop(key)
    flip = {"on": False}
    sched = {key: lambda k: -1.0 if flip["on"] else value}
    opt = cls(groups(p0), **sched, **hp, impl=sc["impl"])
    clean = factory(**{key: value}, **hp, impl="generic")
    clean_params = groups(copy)
    clean_state = clean.init(clean_params)

    for g, miss, failure, victim in zip(
        grads, sc["missing"], sc["failures"], sc["victim"], strict=True
    ):
        g = [None if m else x for x, m in zip(g, miss, strict=True)]
        if failure != "none":
            before = _snapshot(opt)
            bad = list(g)
            undo = None
            if failure == "shape":
                bad[victim] = _make(backend, np.ones((5, 5), dtype))
            elif failure == "dtype":
                other = "float16" if dtype != "float16" else "float32"
                bad[victim] = _make(backend, np.ones(shapes[victim], other))
            elif failure == "library":
                bad[victim] = (
                    np.ones(shapes[victim], dtype)
                    if backend == "torch"
                    else torch.ones(shapes[victim])
                )
            elif failure == "schedule":
                flip["on"] = True

                def undo():
                    flip["on"] = False
            elif failure == "memory":
                real = polyopt.Optimizer._step_one
                calls = {"n": 0}

                def boom(self, *a, real=real, calls=calls, victim=victim):
                    # in the second group (after a first group that a fused kernel may
                    # update in place), or at the victim-th array the generic math meets
                    calls["n"] += 1
                    if a[4]["lr"] == 0.05 or calls["n"] > victim:
                        raise MemoryError("injected")
                    return real(self, *a)

                monkeypatch_session.setattr(polyopt.Optimizer, "_step_one", boom)

                def undo(real=real):
                    monkeypatch_session.setattr(polyopt.Optimizer, "_step_one", real)
            elif failure == "read-only":
                if backend != "numpy":
                    continue
                target = opt.param_groups[0]["params"][0]
                target.flags.writeable = False

                def undo(target=target):
                    target.flags.writeable = True

            try:
                opt.step(per_group(bad))
                raised = False
            except (ValueError, TypeError, MemoryError):
                raised = True
            finally:
                if undo is not None:
                    undo()
            if raised:
                _same(_snapshot(opt), before)
            else:
                # only a MemoryError that no array reached (all grads missing, or the
                # fused kernel took every array) may let the step through: then it is a
                # good step, and the clean run takes it too
                assert failure == "memory", failure
                clean_params, clean_state = clean.update(clean_params, per_group(g), clean_state)
                continue
        before = _snapshot(opt)
        opt.step(per_group(g))
        clean_params, clean_state = clean.update(clean_params, per_group(g), clean_state)
        after = _snapshot(opt)
        for i, m in enumerate(miss):
            if m:  # a skipped array did not move
                assert np.array_equal(after[0][i], before[0][i], equal_nan=True)
        mine = [testing.to_numpy(p) for p in after[0]]
        theirs = [testing.to_numpy(p) for grp in clean_params for p in grp["params"]]
        # the NumPy kernel gives the generic path's bits; torch's fused kernel rounds a few
        # operations differently (lerp, the decay factor): a dtype-sized tolerance
        rtol = 1e-5 if dtype in ("float32", "complex64") else 1e-11
        for a, b in zip(mine, theirs, strict=True):
            scale = float(np.max(np.abs(b))) if b.size else 0.0
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
