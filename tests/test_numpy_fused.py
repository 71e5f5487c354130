"""The NumPy fast path (the kernel derived from each rule, run by numba) held to the
generic path.

Every comparison runs ``impl="fused"`` and ``impl="generic"`` side by side from the same
arrays for 30 steps and compares params **and every state entry** after every step,
with ``max |fused - generic| / max |generic|`` per array. The kernel does the generic
rule's operations in the same order and dtype, so the results agree to the last bit (as
measured with numba 0.68 on x86-64: every comparison here has error 0) or nearly (an FMA
contraction would move the last bit): tolerances float64 1e-12, float32 1e-6.
The generic path is the one definition of the math, itself tested against torch.optim.
The configurations are the case table's single-group rows (``polyopt.testing``), every
optimizer and option.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("numba")

import polyopt  # noqa: E402
from polyopt import backends, flat  # noqa: E402
from polyopt.backends import _derive, _ndarray  # noqa: E402
from polyopt.testing import max_error  # noqa: E402
from polyopt.testing._cases import CASES, polyopt_hyperparams  # noqa: E402

fused = pytest.importorskip("polyopt.backends.numpy")

STEPS = 30
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6, np.dtype(np.float16): 0.0}


def _rule(name):
    return polyopt.OPTIMIZERS[name][0]().rule


#: case id -> (optimizer name, hyperparameters): the table's single-group rows (missing
#: gradients are the conformance matrix's business) of the rules that have a fused
#: kernel: the elementwise ones (``impl="fused"`` refuses the others, by design)
CONFIGS = {
    c.id: (c.name, polyopt_hyperparams(c))
    for c in CASES
    if not c.groups and not c.missing and _rule(c.name).elementwise
}
CONFIGS["schedule"] = (
    "adamw",
    {"lr": polyopt.schedules.cosine(1e-2, T_max=STEPS), "weight_decay": 0.1},
)
SHAPES = [(), (0,), (1,), (7,), (3, 5)]
CLASSES = {name: cls for name, (_, cls) in polyopt.OPTIMIZERS.items()}


#: the configurations also run on numba's threads: one per optimizer (the chunking
#: does not depend on the rule; each configuration run is one more compilation)
THREADED = {
    "sgd-nesterov",
    "adagrad-lr_decay-l2-init",
    "rmsprop-centered-momentum-l2-maximize",
    "adadelta-l2-maximize",
    "adam-amsgrad-l2-maximize",
    "adamw-default",
}


def _threads(monkeypatch, on: bool) -> None:
    """The calling thread's kernel, or chunks of 4 elements on numba's threads (so
    that arrays straddle chunks)."""
    if on:
        monkeypatch.setattr(_derive, "PARALLEL_FROM", 1)
        monkeypatch.setattr(_derive, "CHUNK", 4)
    else:
        monkeypatch.setattr(_derive, "PARALLEL_FROM", 1 << 62)


@pytest.fixture(params=["serial", "parallel"])
def kernel(request, monkeypatch):
    """A test on both kernels."""
    _threads(monkeypatch, request.param == "parallel")
    return request.param


@pytest.fixture(autouse=True)
def _serial_by_default(monkeypatch):
    _threads(monkeypatch, False)


def _problem(shapes, dtypes, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    dts = dtypes if isinstance(dtypes, list) else [dtypes] * len(shapes)
    params = [rng.standard_normal(s).astype(dt) for s, dt in zip(shapes, dts)]
    grads = [
        [rng.standard_normal(s).astype(dt) for s, dt in zip(shapes, dts)] for _ in range(steps)
    ]
    return params, grads


def _clone(arrays):
    """Copies laid out as the originals: one buffer if they share one, strided copies
    of strided arrays."""
    if flat.span(arrays) is not None:
        return flat.pack(arrays)
    out = []
    for a in arrays:
        if a.flags.c_contiguous:
            out.append(a.copy())
        else:
            b = np.empty(a.shape + (2,), a.dtype)[..., 0]
            b[...] = a
            out.append(b)
    return out


def _run(form, name, hp, impl, params, grads, paths=None):
    """Yield (params, slots) after each step, from copies of ``params``; the fast
    path's LAST_PATH of each step goes to ``paths``."""
    params = _clone(params)
    if form == "stateful":
        opt = CLASSES[name](params, **hp, impl=impl)
        for g in grads:
            fused.LAST_PATH = ""
            opt.step(g)
            if paths is not None:
                paths.append(fused.LAST_PATH)
            yield params, opt.state.slots
    else:
        opt = getattr(polyopt, name)(**hp, impl=impl)
        state = opt.init(params)
        for g in grads:
            fused.LAST_PATH = ""
            params, state = opt.update(params, g, state)
            if paths is not None:
                paths.append(fused.LAST_PATH)
            yield params, state.slots


def _compare(form, name, hp, params, grads):
    """Run both impls; assert they agree after every step. Returns the fused paths."""
    paths: list = []
    runs = zip(
        _run(form, name, hp, "fused", params, grads, paths),
        _run(form, name, hp, "generic", params, grads),
    )
    for k, ((pf, sf), (pg, sg)) in enumerate(runs):
        for i, (a, b) in enumerate(zip(pf, pg)):
            assert a.dtype == b.dtype and a.shape == b.shape
            err = max_error(a, b)
            assert err <= TOL[b.dtype], f"step {k} param {i}: error {err:.3g}"
        assert set(sf) == set(sg)
        for slot, arrays in sg.items():
            assert len(sf[slot]) == len(arrays)
            for i, (a, b) in enumerate(zip(sf[slot], arrays)):
                assert (a is None) == (b is None), f"step {k} {slot}[{i}]"
                if b is None:
                    continue
                err = max_error(a, b)
                assert err <= TOL[b.dtype], f"step {k} {slot}[{i}]: error {err:.3g}"
    return paths


@pytest.mark.parametrize("form", ["functional", "stateful"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    ("config", "threads"),
    [(c, False) for c in CONFIGS] + [(c, True) for c in sorted(THREADED)],
    ids=lambda x: {False: "serial", True: "parallel"}.get(x, x) if isinstance(x, bool) else x,
)
def test_fused_matches_generic(config, dtype, form, threads, monkeypatch):
    _threads(monkeypatch, threads)
    name, hp = CONFIGS[config]
    params, grads = _problem(SHAPES, dtype)
    paths = _compare(form, name, hp, params, grads)
    # separate param and grad arrays (the state is flat): the pointer table
    assert set(paths) == {"pointers"}


@pytest.mark.parametrize("form", ["functional", "stateful"])
def test_many_small_arrays_use_the_pointer_table(form, kernel):
    # 1000 arrays of 0..300 elements: several parallel chunks that cut through arrays
    rng = np.random.default_rng(1)
    shapes = [(int(n),) for n in rng.integers(0, 300, 1000)]
    shapes[5] = (0, 4)
    shapes[17] = ()
    params, grads = _problem(shapes, np.float32, steps=5)
    paths = _compare(form, "adamw", {"lr": 1e-2, "amsgrad": True}, params, grads)
    assert paths[0] == "pointers"


@pytest.mark.parametrize("form", ["functional", "stateful"])
def test_flat_params_and_grads_use_the_span(form, kernel):
    rng = np.random.default_rng(2)
    shapes = [(0,), (3, 4), (), (300, 300), (0, 2), (7,)]  # > one chunk, empties inside
    params = flat.pack([rng.standard_normal(s) for s in shapes])
    grads = []
    for _ in range(5):
        g = flat.zeros_like(params)
        for a in g:
            a[...] = rng.standard_normal(a.shape)
        grads.append(g)
    paths = _compare(form, "adamw", {"lr": 1e-2}, params, grads)
    assert set(paths) == {"span"}


def test_state_is_flat_from_init():
    params = [np.ones((2, 3), np.float32), np.ones(4), np.ones(5, np.float32)]
    state = polyopt.adamw(amsgrad=True, impl="fused").init(params)
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        f32 = [state.slots[name][0], state.slots[name][2]]
        assert flat.span(f32) is not None and flat.span(f32).size == 11
        assert all(np.all(a == 0) for a in state.slots[name])


@pytest.mark.parametrize("form", ["functional", "stateful"])
def test_non_contiguous_arrays_fall_back_for_those_arrays_only(form, kernel):
    rng = np.random.default_rng(3)
    big = rng.standard_normal((6, 10))
    params = [rng.standard_normal(5), big[:, ::2], rng.standard_normal((2, 2))]
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(STEPS)]
    grads[3][0] = rng.standard_normal((5, 2))[:, 0]  # a non-contiguous grad on one step
    assert not params[1].flags.c_contiguous and not _clone(params)[1].flags.c_contiguous
    paths = _compare(form, "adamw", {"lr": 1e-2, "weight_decay": 0.1}, params, grads)
    assert paths[0] == "split" and paths[3] == "split"


@pytest.mark.parametrize("form", ["functional", "stateful"])
def test_mixed_dtypes_in_one_group(form, kernel):
    dts = [np.float32, np.float64, np.float16, np.float32, np.float64]
    params, grads = _problem([(4,), (3, 2), (5,), (), (0,)], dts)
    paths = _compare(
        form, "adam", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}, params, grads
    )
    assert set(paths) == {"split"}  # a launch per dtype, float16 generic


def test_float16_alone_is_generic():
    params, grads = _problem([(4,), (3,)], np.float16, steps=3)
    assert set(_compare("stateful", "adamw", {"lr": 1e-2}, params, grads)) == {"generic"}


def test_functional_form_mutates_nothing():
    params, grads = _problem([(3, 4), (), (5,)], np.float32, steps=3)
    opt = polyopt.adamw(lr=1e-2, amsgrad=True, impl="fused")
    state = opt.init(params)
    for g in grads:
        before = (
            [p.copy() for p in params],
            [x.copy() for x in g],
            {n: [a.copy() for a in arrays] for n, arrays in state.slots.items()},
        )
        new_params, new_state = opt.update(params, g, state)
        assert all(np.array_equal(a, b) for a, b in zip(params, before[0]))
        assert all(np.array_equal(a, b) for a, b in zip(g, before[1]))
        for n, arrays0 in before[2].items():
            assert all(np.array_equal(a, a0) for a, a0 in zip(state.slots[n], arrays0))
        assert not any(np.shares_memory(a, b) for a in new_params for b in params)
        params, state = new_params, new_state


def test_stateful_form_updates_in_place():
    params, grads = _problem([(3, 4), (5,)], np.float32, steps=2)
    opt = polyopt.AdamW(params, lr=1e-2, impl="fused")
    slots0 = opt.state.slots
    before = [p.copy() for p in params]
    opt.step(grads[0])
    assert opt.params[0] is params[0] and not np.array_equal(params[0], before[0])
    assert opt.state.slots["exp_avg"][0] is slots0["exp_avg"][0]


def test_auto_uses_the_fused_path():
    for factory, _ in polyopt.OPTIMIZERS.values():
        rule = factory().rule
        path = backends.lookup(rule, "numpy", "auto")
        if rule.elementwise:
            assert path.inplace is fused.inplace
        else:  # a rule that reduces over an array runs the generic math
            assert path is None
    fused.LAST_PATH = ""
    opt = polyopt.AdamW([np.ones(3), np.ones(2)])
    opt.step([np.ones(3), np.ones(2)])
    assert fused.LAST_PATH == "pointers"


def test_numpy_scalar_hyperparameters_are_numbers_and_take_the_fused_path():
    # NumPy scalars (a sweep's np.float64) are read as Python floats at construction:
    # host float64 math, the params' dtype kept, and the fused kernel can take them
    params, grads = _problem([(4,)], np.float32, steps=3)
    hp = {"lr": np.float64(1e-2), "betas": (np.float32(0.9), 0.999)}
    paths = _compare("functional", "adamw", hp, params, grads)
    assert set(paths) == {"span"}
    opt = polyopt.adamw(**hp)
    assert type(opt.hyperparams["lr"]) is float and type(opt.hyperparams["betas"][0]) is float


def test_python_table_matches_the_struct_reader(monkeypatch):
    if _ndarray._LAYOUT is None:
        pytest.skip("struct layout not recognised: the Python table is in use")
    params, grads = _problem(SHAPES + [(4, 4)], np.float32, steps=4)
    params[-1] = np.ones((4, 8), np.float32)[:, ::2]
    for inplace in (True, False):
        for n_slots in (1, 2, 3):
            streams = [params, *grads[: 1 + n_slots]]
            outs = []
            for layout in (_ndarray._LAYOUT, None):
                monkeypatch.setattr(_ndarray, "_LAYOUT", layout)
                tab, sizes, codes, uniform, span = _ndarray.table(
                    streams, fused._writes(inplace, n_slots)
                )
                tab[:, codes < 0] = 0
                outs.append((tab, sizes, codes, uniform, span))
            for a, b in zip(*outs):
                assert np.array_equal(a, b)
            assert list(outs[0][2]) == [0] * len(SHAPES) + [-1]


def test_python_table_runs_the_same_steps(monkeypatch):
    monkeypatch.setattr(_ndarray, "_LAYOUT", None)
    params, grads = _problem(SHAPES, np.float32, steps=5)
    paths = _compare("stateful", "adam", {"lr": 1e-2, "amsgrad": True}, params, grads)
    assert set(paths) == {"pointers"}


def test_unpickled_arrays_are_recognised():
    # an unpickled array has its own dtype object, not NumPy's shared float32 one
    params, grads = _problem([(3,), (4, 2)], np.float32, steps=3)
    params = pickle.loads(pickle.dumps(params))
    grads = pickle.loads(pickle.dumps(grads))
    assert params[0].dtype is not np.dtype(np.float32)
    assert set(_compare("stateful", "adamw", {"lr": 1e-2}, params, grads)) == {"pointers"}


def test_loaded_state_is_not_flat_and_still_fused():
    params, grads = _problem([(3,), (4, 2), ()], np.float64, steps=6)
    a = polyopt.AdamW([p.copy() for p in params], lr=1e-2, impl="fused")
    b = polyopt.AdamW([p.copy() for p in params], lr=1e-2, impl="generic")
    for g in grads[:3]:
        a.step(g)
        b.step(g)
    c = polyopt.AdamW([p.copy() for p in a.params], lr=1e-2, impl="fused")
    c.load_state_dict(a.state_dict())
    for g in grads[3:]:
        fused.LAST_PATH = ""
        c.step(g)
        assert fused.LAST_PATH == "pointers"
        b.step(g)
    for x, y in zip(c.params, b.params):
        assert max_error(x, y) <= 1e-12


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_non_finite_values_as_in_generic(config):
    name, hp = CONFIGS[config]
    params, grads = _problem([(6,), (2, 3)], np.float32, steps=4)
    params[0][1], params[0][2] = np.inf, -np.inf
    grads[1][1][0, 1] = np.nan
    grads[2][0][3] = np.inf
    runs = [_run("stateful", name, hp, impl, params, grads) for impl in ("fused", "generic")]
    with np.errstate(all="ignore"):
        for (pf, sf), (pg, sg) in zip(*runs):
            for a, b in zip(pf, pg):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, equal_nan=True)
            assert set(sf) == set(sg)
            for slot, arrays in sg.items():
                for a, b in zip(sf[slot], arrays):
                    np.testing.assert_allclose(a, b, rtol=1e-6, equal_nan=True)


def test_span_with_empty_arrays_from_elsewhere():
    # empty arrays hold no memory: a span may skip them, wherever they point
    rng = np.random.default_rng(4)
    values = [rng.standard_normal(s) for s in [(3,), (2, 2)]]
    grads = [rng.standard_normal(v.shape) for v in values]

    def make():
        p = flat.pack(values)
        g = flat.pack(grads)
        return [np.zeros(0), p[0], np.zeros((2, 0)), p[1]], [
            np.zeros(0),
            g[0],
            np.zeros((2, 0)),
            g[1],
        ]

    pf, gf = make()
    pg, gg = make()
    opt_f = polyopt.AdamW(pf, lr=1e-2, impl="fused")
    opt_g = polyopt.AdamW(pg, lr=1e-2, impl="generic")
    for _ in range(3):
        fused.LAST_PATH = ""
        opt_f.step(gf)
        opt_g.step(gg)
        assert fused.LAST_PATH == "span"
    for a, b in zip(pf, pg):
        assert max_error(a, b) <= 1e-12


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("layout", ["struct", "python"])
def test_overlapping_params_are_updated_as_generic_does(layout, split, monkeypatch):
    # (the same array object twice is refused by the engine: tests/test_atomic.py)
    if layout == "python":
        monkeypatch.setattr(_ndarray, "_LAYOUT", None)
    rng = np.random.default_rng(5)
    w = rng.standard_normal(4)
    buf = rng.standard_normal(10)
    grads = [
        [
            rng.standard_normal(4),
            rng.standard_normal(3),
            rng.standard_normal(6),
            rng.standard_normal(6),
        ]
        for _ in range(3)
    ]
    out = {}
    for impl in ("fused", "generic"):
        b = buf.copy()
        wc = w.copy()
        params = [wc, rng.standard_normal(3) * 0 + 1, b[:6], b[4:]]  # overlapping views
        if split:  # and a strided array: the others are fused, if they can be
            params[1] = np.ones((3, 2))[:, 0]
        opt = polyopt.AdamW(params, lr=1e-2, impl=impl)
        for g in grads:
            fused.LAST_PATH = ""
            opt.step(g)
            if impl == "fused":
                assert fused.LAST_PATH == "generic"
        out[impl] = [p.copy() for p in params]
    for a, b in zip(out["fused"], out["generic"]):
        assert max_error(a, b) <= 1e-12
