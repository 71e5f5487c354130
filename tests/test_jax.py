"""polyopt on JAX: jit (one trace), buffer donation, vmap, x64, sharding, stateful form.

Expected values come from eager NumPy runs of the same optimizer (a Python-int step
count and host float64 bias corrections and schedules), never from another JAX run.

Tolerance for float32: ``|jax - numpy| <= 1e-5 * (|numpy| + 1)`` elementwise. Under jit
the step count is a 0-d int32 array, so schedules and bias corrections are computed in
float32 (DESIGN.md, Numerics); ``1 - 0.999**t`` in float32 loses ~3 digits to
cancellation, which gives ~2e-6 on params after 20 AdamW steps (NumPy float32 differs
from NumPy float64 by ~2e-7). A wrong schedule, a frozen step count or a missing term
differs by >= 1e-4.

x64 and multi-device sharding need JAX flags that must be set before JAX starts, so
those tests run a short script in a subprocess (``sys.executable``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import polyopt  # noqa: E402
from polyopt import testing  # noqa: E402

STEPS = 20
RTOL = ATOL = 1e-5


NAMES = testing.NAMES  # every optimizer the shared problems run (not Muon)
SHAPES = {"w": (4, 3), "b": (5,), "s": ()}


def options(name):
    """The optimizer's row of the case table with every state slot and schedules (lr, and
    weight decay for AdamW), so the step count in the state drives the math."""
    return testing.polyopt_hyperparams(testing.richest(name, testing.SCHEDULED))


def problem(seed=1, shapes=SHAPES, steps=STEPS, batch=None):
    """float32 NumPy params dict and ``steps`` grads dicts (leading ``batch`` axis if given)."""
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    p0 = {k: rng.standard_normal(lead + s).astype(np.float32) for k, s in shapes.items()}
    gs = [
        {
            k: (10 ** rng.uniform(-1, 0.5) * rng.standard_normal(lead + s)).astype(np.float32)
            for k, s in shapes.items()
        }
        for _ in range(steps)
    ]
    return p0, gs


def numpy_run(name, p0, gs):
    """Eager NumPy float32 trajectory: [(params, slots)] after each step."""
    opt = polyopt.OPTIMIZERS[name][0](**options(name))
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    out = []
    for g in gs:
        params, state = opt.update(params, g, state)
        out.append((params, state.slots))
    assert state.step == len(gs)
    return out


def to_jax(tree):
    return {k: jnp.asarray(v) for k, v in tree.items()}


def assert_close(actual, desired, what):
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    assert a.shape == d.shape, f"{what}: shape {a.shape} != {d.shape}"
    np.testing.assert_allclose(a, d, rtol=RTOL, atol=ATOL, err_msg=what)


def assert_same_step(params, slots, ref, what):
    ref_p, ref_s = ref
    assert sorted(params) == sorted(ref_p), what
    for k in ref_p:
        assert params[k].dtype == jnp.float32, f"{what}: params[{k!r}] dtype {params[k].dtype}"
        assert_close(params[k], ref_p[k], f"{what}: params[{k!r}]")
    assert set(slots) == set(ref_s), f"{what}: state holds {sorted(slots)}, numpy {sorted(ref_s)}"
    for n, refs in ref_s.items():
        arrays = slots[n]
        assert len(arrays) == len(refs), f"{what}: state[{n!r}] holds {len(arrays)} arrays"
        for i, (a, r) in enumerate(zip(arrays, refs)):
            assert (a is None) == (r is None), f"{what}: state[{n!r}][{i}] is {a!r}, numpy {r!r}"
            if r is None:
                continue
            assert a.dtype == jnp.float32, f"{what}: state[{n!r}][{i}] dtype {a.dtype}"
            assert_close(a, r, f"{what}: state[{n!r}][{i}]")


# -- jit -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_jit_traces_once_and_matches_numpy(name):
    p0, gs = problem()
    ref = numpy_run(name, p0, gs)
    opt = polyopt.OPTIMIZERS[name][0](**options(name))
    traces = []

    def update(params, grads, state):
        traces.append(1)  # runs once per Python trace, never when the compiled code runs
        return opt.update(params, grads, state)

    jitted = jax.jit(update)
    params = to_jax(p0)
    state = opt.init(params)
    assert isinstance(state.step, jax.Array) and state.step.shape == ()
    assert state.step.dtype == jnp.int32
    for k, g in enumerate(gs):
        params, state = jitted(params, to_jax(g), state)
        assert_same_step(params, state.slots, ref[k], f"{name} jit step {k + 1}")
    assert len(traces) == 1, f"{name}: traced {len(traces)} times over {STEPS} steps"
    if hasattr(jitted, "_cache_size"):  # JAX's count of compiled versions (private API)
        assert jitted._cache_size() == 1, f"{name}: compiled {jitted._cache_size()} times"
    assert state.step.dtype == jnp.int32 and int(state.step) == STEPS
    # the run went somewhere: a no-op optimizer would fail the numpy comparison anyway
    assert not np.allclose(np.asarray(params["w"]), p0["w"], atol=1e-3)


def test_jit_schedule_really_follows_the_step_count():
    """Control: the same jitted AdamW with a constant lr gives different numbers, so the
    comparison above would catch a schedule stuck at step 0."""
    p0, gs = problem()
    ref = numpy_run("adamw", p0, gs)
    # the schedules' values at k = 0, held constant
    hp = {k: (v(0) if callable(v) else v) for k, v in options("adamw").items()}
    opt = polyopt.adamw(**hp)
    params, state = to_jax(p0), opt.init(to_jax(p0))
    jitted = jax.jit(opt.update)
    for g in gs:
        params, state = jitted(params, to_jax(g), state)
    with pytest.raises(AssertionError):
        assert_close(params["w"], ref[-1][0]["w"], "constant lr")


# -- donation --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_donated_buffers_are_reused(name):
    p0, gs = problem(steps=5)
    ref = numpy_run(name, p0, gs)
    opt = polyopt.OPTIMIZERS[name][0](**options(name))
    jitted = jax.jit(opt.update, donate_argnums=(0, 2))
    params = to_jax(p0)
    state = opt.init(params)
    for k, g in enumerate(gs):
        donated = jax.tree_util.tree_leaves((params, state))
        old_slots = state.slots
        assert any(x is state.step for x in donated)  # the step count is donated too
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params, state = jitted(params, to_jax(g), state)
            jax.block_until_ready((params, state))
        messages = [str(w.message) for w in caught]
        assert not [m for m in messages if "donated" in m.lower()], messages
        # a group's shared numbers (Rule.shared: SWATS's switch) are one value that
        # every array's 0-d copy takes, so XLA may return one buffer for all the copies
        shared = {id(x) for n in opt.rule.shared for x in old_slots[n][1:]}
        deleted = [x.is_deleted() for x in donated if id(x) not in shared]
        assert all(deleted), f"{name} step {k + 1}: donated buffers not deleted: {deleted}"
        assert_same_step(params, state.slots, ref[k], f"{name} donated step {k + 1}")


def test_donation_warning_is_detected():
    """Control: a donation JAX cannot use (no output of the input's size) warns and
    leaves the input alive, and the checks above would see both."""
    x = jnp.ones(8, jnp.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = jax.jit(lambda x: jnp.sum(x), donate_argnums=0)
        jax.block_until_ready(f(x))
    assert any("donated buffers were not usable" in str(w.message) for w in caught)
    assert not x.is_deleted()


# -- vmap ------------------------------------------------------------------------------

BATCH = 3


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_independent_problems(name):
    p0, gs = problem(seed=2, steps=8, batch=BATCH)
    # expected: each problem on its own, a Python loop of NumPy runs
    refs = [
        numpy_run(
            name, {k: v[b] for k, v in p0.items()}, [{k: v[b] for k, v in g.items()} for g in gs]
        )
        for b in range(BATCH)
    ]
    opt = polyopt.OPTIMIZERS[name][0](**options(name))
    params = to_jax(p0)
    state = jax.vmap(opt.init)(params)
    assert state.step.shape == (BATCH,)
    update = jax.jit(jax.vmap(opt.update))
    for k, g in enumerate(gs):
        params, state = update(params, to_jax(g), state)
        for b in range(BATCH):
            assert_same_step(
                {n: v[b] for n, v in params.items()},
                {
                    n: tuple(None if a is None else a[b] for a in arrays)
                    for n, arrays in state.slots.items()
                },
                refs[b][k],
                f"{name} vmap problem {b} step {k + 1}",
            )
    np.testing.assert_array_equal(np.asarray(state.step), len(gs))


@pytest.mark.parametrize("impl", ["auto", "generic"])
def test_vmap_with_shared_step_count(impl):
    """The step count may also stay unbatched (in_axes None) while slots are batched.

    The packed state of the fast path must be made inside vmap (vmap splits each
    buffer along axis 0, not each array); per-array state may also be made outside."""
    p0, gs = problem(seed=3, steps=6, batch=BATCH)
    refs = [
        numpy_run(
            "adam", {k: v[b] for k, v in p0.items()}, [{k: v[b] for k, v in g.items()} for g in gs]
        )
        for b in range(BATCH)
    ]
    opt = polyopt.adam(**options("adam"), impl=impl)
    params = to_jax(p0)
    if impl == "generic":
        state = opt.init(params)  # slots get the batch axis from params; step is 0-d
    else:
        state = jax.vmap(opt.init)(params)
        assert isinstance(state.slots["exp_avg"], polyopt.flat.Packed)
        state = state._replace(step=state.step[0])  # one step count for every problem
    axes = polyopt.OptState(None, 0)
    update = jax.jit(jax.vmap(opt.update, in_axes=(0, 0, axes), out_axes=(0, axes)))
    for g in gs:
        params, state = update(params, to_jax(g), state)
    assert state.step.shape == () and int(state.step) == len(gs)
    for b in range(BATCH):
        assert_same_step(
            {n: v[b] for n, v in params.items()},
            {n: tuple(a[b] for a in arrays) for n, arrays in state.slots.items()},
            refs[b][-1],
            f"adam vmap (shared step) problem {b}",
        )


# -- stateful form ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_stateful_holds_new_arrays_and_leaves_old_ones(name):
    p0, gs = problem(seed=4, steps=10)
    ref = numpy_run(name, p0, gs)
    cls = polyopt.OPTIMIZERS[name][1]
    params = to_jax(p0)
    opt = cls(params, **options(name))
    history = [opt.params]
    for k, g in enumerate(gs):
        before = opt.params
        before_values = {n: np.array(v) for n, v in before.items()}
        opt.step(to_jax(g))
        after = opt.params
        for n in p0:
            assert isinstance(after[n], jax.Array)
            assert after[n] is not before[n], f"{name}: params[{n!r}] is the old array"
            # the old arrays were not touched (JAX arrays are immutable; nothing rebinds them)
            np.testing.assert_array_equal(np.asarray(before[n]), before_values[n])
        assert_same_step(after, opt.state.slots, ref[k], f"{name} stateful step {k + 1}")
        history.append(after)
    assert opt.step_count == len(gs)
    # the user's original dict and arrays still hold the initial values
    assert opt.params is not params  # a new structure, not the user's dict
    for n in p0:
        np.testing.assert_array_equal(np.asarray(params[n]), p0[n])
        np.testing.assert_array_equal(np.asarray(history[0][n]), p0[n])


# -- x64 -------------------------------------------------------------------------------


@pytest.mark.skipif(
    bool(jax.config.jax_enable_x64), reason="JAX x64 is on in this process (JAX_ENABLE_X64)"
)
def test_float64_cells_skip_without_x64():
    results = testing.run(testing.cells(["jax"], dtypes=["float64"], impls=["generic"]))
    assert results
    assert all(r.status == "skip" for r in results), [r.cell.id for r in results]
    assert all("JAX_ENABLE_X64" in r.reason for r in results), {r.reason for r in results}


X64_SCRIPT = textwrap.dedent(
    """
    import json, os
    import numpy as np
    import jax, jax.numpy as jnp
    import polyopt
    from polyopt import schedules, testing

    part = os.environ["X64_PART"]
    out = {"x64": bool(jax.config.jax_enable_x64), "part": part}
    # float64: every case. float32 with x64 on (where a float64 schedule value could
    # promote float32 params): the cases with schedules or groups, and the defaults.
    f32 = [c for c in testing.CASES if c.groups or c.id.endswith("-default")
           or any(isinstance(v, testing.Sched) for v in c.hyperparams.values())]
    # complex128: the defaults and the missing-gradient cases (complex64 runs every case
    # in the main process)
    c128 = [c for c in testing.CASES if c.missing or c.id.endswith("-default")]
    if part == "float64":
        cells = testing.cells(["jax"], dtypes=["float64"], impls=["generic"])
    else:
        cells = (testing.cells(["jax"], dtypes=["complex128"], impls=["generic"], cases=c128)
                 + testing.cells(["jax"], dtypes=["float32"], impls=["generic"], cases=f32))
    res = testing.run(cells)
    out["cells"] = [[r.cell.id, r.status, r.error, r.reason] for r in res]
    if part == "float64":
        print("RESULT" + json.dumps(out))
        raise SystemExit(0)

    rng = np.random.default_rng(5)
    p0 = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(5)}
    gs = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(10)]
    hp = dict(lr=schedules.cosine(0.05, 15), weight_decay=0.1, amsgrad=True)
    opt = polyopt.adamw(**hp)
    pn, sn = {k: v.copy() for k, v in p0.items()}, None
    sn = opt.init(pn)
    pj = {k: jnp.asarray(v) for k, v in p0.items()}
    sj = opt.init(pj)
    out["init_step_dtype"] = str(sj.step.dtype)
    upd = jax.jit(opt.update)
    err = 0.0
    for g in gs:
        pn, sn = opt.update(pn, g, sn)
        pj, sj = upd(pj, {k: jnp.asarray(v) for k, v in g.items()}, sj)
        err = max([err] + [float(np.max(np.abs(np.asarray(pj[k]) - pn[k]))) for k in pn])
        err = max([err] + [float(np.max(np.abs(np.asarray(a) - b)))
                           for n in sj.slots for a, b in zip(sj.slots[n], sn.slots[n])])
    out["step_dtype"] = str(sj.step.dtype)
    out["step"] = int(sj.step)
    out["param_dtypes"] = sorted({str(v.dtype) for v in pj.values()})
    out["slot_dtypes"] = sorted({str(a.dtype) for arrays in sj.slots.values() for a in arrays})
    out["max_abs_err"] = err
    print("RESULT" + json.dumps(out))
    """
)


#: For the subprocesses: XLA's backend (LLVM) optimization level 0 compiles a small
#: program about twice as fast (the x64 script: 20 s -> 10 s of CPU for a third of its
#: cells; the sharding script 22 s -> 18 s), and these scripts compile ~150 and ~280
#: programs that run a few steps each. The HLO that polyopt hands to XLA and XLA's HLO
#: passes are the same; results move by ~1e-15 (float64 worst error 1.54e-13 ->
#: 1.51e-13 against a 1e-10 tolerance). XLA's defaults are exercised by the in-process
#: tests and by test_conformance.py's default-flags subprocess.
SUBPROCESS_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a subprocess: this process's flags (tests/conftest.py's), ``extra``,
    then :data:`SUBPROCESS_XLA_FLAGS` unless the environment already picks a level."""
    flags = [os.environ.get("XLA_FLAGS", ""), *extra]
    if "xla_backend_optimization_level" not in flags[0]:
        flags.append(SUBPROCESS_XLA_FLAGS)
    return " ".join(f for f in flags if f)


def run_script(script: str, env: dict, tmp_path) -> dict:
    full_env = {**os.environ, "XLA_FLAGS": xla_flags(), **env}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=full_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        # a guard against a hang, not a speed check: the x64 script's float64 part runs
        # ~90 conformance cells (one jit compilation each), ~1 minute on two busy cores
        timeout=600,
    )
    assert proc.returncode == 0, f"script failed:\n{proc.stdout}\n{proc.stderr}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stdout + proc.stderr
    return json.loads(line[-1][len("RESULT") :])


@pytest.mark.parametrize("part", ["float64", "complex128+float32"])
def test_x64_subprocess(tmp_path, part):
    """The script in two processes that run side by side under xdist: every float64
    cell; then the complex128 and float32 cells and the jitted functional form."""
    out = run_script(X64_SCRIPT, {"JAX_ENABLE_X64": "1", "X64_PART": part}, tmp_path)
    assert out["x64"] is True and out["part"] == part
    cells = out["cells"]
    f64 = [c for c in cells if "-float64-" in c[0]]
    f32 = [c for c in cells if "-float32-" in c[0]]
    c128 = [c for c in cells if "-complex128-" in c[0]]
    bad = [c for c in cells if c[1] != "pass"]
    assert not bad, bad
    if part == "float64":
        assert len(f64) == len(cells) == len(testing.CASES)
        assert max(c[2] for c in f64) <= testing.TOLERANCES["float64"]
        return
    assert not f64 and len(c128) >= 12 and len(f32) >= 20 and len(cells) == len(c128) + len(f32)
    assert max(c[2] for c in c128) <= testing.TOLERANCES["float64"]
    # the functional form under jit with float64 params: int step, float64 results
    assert out["init_step_dtype"] in ("int32", "int64")
    assert out["step_dtype"] in ("int32", "int64") and out["step"] == 10
    assert out["param_dtypes"] == ["float64"] and out["slot_dtypes"] == ["float64"]
    assert out["max_abs_err"] < 1e-12, out["max_abs_err"]


# -- sharding --------------------------------------------------------------------------

SHARDING_SCRIPT = textwrap.dedent(
    """
    import contextlib, json
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import polyopt
    from polyopt import testing

    rng = np.random.default_rng(6)
    SHAPES = {"w": (8, 6), "v": (12,), "u": (8,), "r": (3,)}
    host = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
             for _ in range(5)]
    def opts(name):  # in the runs: a missing row fails that optimizer's entries only
        return testing.polyopt_hyperparams(testing.richest(name, testing.SCHEDULED))
    MESHES = {
        # jax.make_mesh's default (Explicit axes) needs the mesh set as context for jit
        "explicit": jax.make_mesh((4,), ("x",), axis_types=(AxisType.Explicit,)),
        "auto": jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,)),
    }

    def layout(mesh, keys):
        return {k: NamedSharding(mesh, P() if k == "r" else P("x")) for k in keys}

    def put(tree, shard):
        return {k: jax.device_put(tree[k], shard[k]) for k in shard}

    REFS = {}  # (name, keys): the NumPy run, shared by the layouts with the same keys

    def numpy_run(name, keys):
        key = (name, tuple(sorted(keys)))
        if key not in REFS:
            opt = polyopt.OPTIMIZERS[name][0](**opts(name))
            p = {k: host[k].copy() for k in keys}
            s = opt.init(p)
            for g in grads:
                p, s = opt.update(p, {k: g[k] for k in keys}, s)
            REFS[key] = p, s.slots
        return REFS[key]

    def report(params, slots, shard, ref):
        keys = sorted(params)  # each slot's arrays: sorted-key order, as params are flattened
        bad = []
        for k in keys:
            if not params[k].sharding.is_equivalent_to(shard[k], params[k].ndim):
                bad.append(f"params[{k}]: {params[k].sharding}")
        for n, arrays in slots.items():
            if len(arrays) != len(keys):
                bad.append(f"state[{n}]: {len(arrays)} arrays for {len(keys)} params")
            for k, a in zip(keys, arrays):
                if a is None:  # a slot this array lacks (Adafactor: Rule.layout)
                    continue
                if a.shape == params[k].shape:  # a slot shaped as its param: its sharding
                    if not a.sharding.is_equivalent_to(shard[k], a.ndim):
                        bad.append(f"state[{n}][{k}]: {a.sharding}")
                elif a.sharding.device_set != shard[k].device_set:  # reduced: its devices
                    bad.append(f"state[{n}][{k}]: {a.sharding}")
        rp, rs = ref
        err = max(float(np.max(np.abs(np.asarray(params[k]) - rp[k]) / (np.abs(rp[k]) + 1)))
                  for k in keys)
        err = max([err] + [float(np.max(np.abs(np.asarray(a) - b) / (np.abs(b) + 1)))
                           for n in slots for a, b in zip(slots[n], rs[n]) if b is not None])
        nslots = sum(a is not None for arrays in slots.values() for a in arrays)
        return {"bad_shardings": bad, "err": err, "nslots": nslots}

    JITTED = {}  # (name, layout): one optimizer and jitted update for both inits

    def jitted(name, shard, init_jitted):
        # the two inits on one layout share the jitted update: JAX compiles it again
        # for a state whose shardings or structure differ, and reuses it otherwise
        key = (name, id(shard))
        if key not in JITTED:
            opt = polyopt.OPTIMIZERS[name][0](**opts(name))
            JITTED[key] = opt, jax.jit(opt.update)
        opt, upd = JITTED[key]
        p = put(host, shard)
        s = jax.jit(opt.init)(p) if init_jitted else opt.init(p)
        for g in grads:
            p, s = upd(p, put(g, shard), s)
        return {**report(p, s.slots, shard, numpy_run(name, shard)), "step": int(s.step)}

    def stateful(name, shard):
        p = put(host, shard)
        opt = polyopt.OPTIMIZERS[name][1](p, **opts(name))
        for g in grads:
            opt.step(put(g, shard))
        unchanged = all(np.array_equal(np.asarray(p[k]), host[k]) for k in shard)
        return {**report(opt.params, opt.state.slots, shard, numpy_run(name, shard)),
                "old_unchanged": unchanged, "step": opt.step_count}

    def attempt(fn, *args):
        try:
            return {"error": None, **fn(*args)}
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"}

    mixed = layout(MESHES["explicit"], ["w", "v", "r"])  # split over x + one replicated
    split2d = layout(MESHES["explicit"], ["w", "v"])  # all split, a 2-D array among them
    split1d = layout(MESHES["explicit"], ["v", "u"])  # all split, 1-D only
    auto_split = layout(MESHES["auto"], ["w", "v"])
    auto_mixed = layout(MESHES["auto"], ["w", "v", "r"])
    out = {"devices": len(jax.devices())}
    for name in testing.NAMES:  # the optimizers the shared problems run (not Muon)
        res = out[name] = {}
        with jax.set_mesh(MESHES["explicit"]):
            res["explicit_jit_init_jitted"] = attempt(jitted, name, mixed, True)
            res["explicit_jit_init_eager"] = attempt(jitted, name, mixed, False)
            res["explicit_stateful_mixed"] = attempt(stateful, name, mixed)
            res["explicit_stateful_split2d"] = attempt(stateful, name, split2d)
            res["explicit_stateful_split1d"] = attempt(stateful, name, split1d)
        res["auto_jit_init_eager"] = attempt(jitted, name, auto_split, False)
        res["auto_stateful_split"] = attempt(stateful, name, auto_split)
        res["auto_stateful_mixed"] = attempt(stateful, name, auto_mixed)
    print("RESULT" + json.dumps(out))
    """
)

_SHARDING: dict = {}


@pytest.fixture(scope="module")
def sharding_results(tmp_path_factory):
    """The sharding script's results, run once a session: under pytest-xdist the first
    worker to take the lock runs it and leaves the results for the others."""
    if _SHARDING:
        return _SHARDING
    env = {
        "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4"),
        "JAX_PLATFORMS": "cpu",
    }
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        _SHARDING.update(run_script(SHARDING_SCRIPT, env, tmp_path_factory.mktemp("sharding")))
        return _SHARDING
    from filelock import FileLock  # a dependency of torch and of jax's test tools

    root = tmp_path_factory.getbasetemp().parent
    done = root / "jax_sharding.json"
    with FileLock(str(root / "jax_sharding.lock")):
        if not done.exists():
            res = run_script(SHARDING_SCRIPT, env, tmp_path_factory.mktemp("sharding"))
            done.write_text(json.dumps(res))
    _SHARDING.update(json.loads(done.read_text()))
    return _SHARDING


def check_sharded(entry, what, steps=5):
    assert entry["error"] is None, f"{what}: {entry['error']}"
    assert not entry["bad_shardings"], f"{what}: shardings changed: {entry['bad_shardings']}"
    assert entry["err"] <= RTOL, f"{what}: differs from the unsharded NumPy run by {entry['err']}"
    assert entry["step"] == steps
    assert entry["nslots"] >= 2  # every configuration in the script has state slots
    if "old_unchanged" in entry:
        assert entry["old_unchanged"], f"{what}: the arrays given to the optimizer changed"


#: What the sharding script runs for each optimizer (mesh: "explicit" is jax.make_mesh's
#: default, used inside jax.set_mesh; "auto" is the classic GSPMD mesh, no context).
#: "mixed" = a (8, 6) and a (12,) array split over x plus a replicated (3,) array;
#: "split" = all arrays split over x. Eager runs check that polyopt's one-device check
#: accepts arrays sharded differently over one mesh (it compares device sets), and that
#: a 2-D array whose sharding turns from P('x') into the equivalent P('x', None) after an
#: eager step still goes with grads put with P('x').
SHARDED_RUNS = [
    pytest.param("explicit_jit_init_jitted", id="explicit-mixed-jit-init+jit"),
    pytest.param("explicit_jit_init_eager", id="explicit-mixed-eager-init+jit"),
    pytest.param("explicit_stateful_mixed", id="explicit-mixed-stateful"),
    pytest.param("explicit_stateful_split2d", id="explicit-split2d-stateful"),
    pytest.param("explicit_stateful_split1d", id="explicit-split1d-stateful"),
    pytest.param("auto_jit_init_eager", id="auto-split-eager-init+jit"),
    pytest.param("auto_stateful_split", id="auto-split-stateful"),
    pytest.param("auto_stateful_mixed", id="auto-mixed-stateful"),
]


@pytest.mark.parametrize("run", SHARDED_RUNS)
@pytest.mark.parametrize("name", NAMES)
def test_sharded_params_and_state_keep_their_sharding(sharding_results, name, run):
    """Params on a 4-device mesh: after init and 5 updates, params and every state slot
    keep each input param's sharding, and the values equal the unsharded NumPy run."""
    assert sharding_results["devices"] == 4
    check_sharded(sharding_results[name][run], f"{name} {run}")
