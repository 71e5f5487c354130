"""polyopt's generic path on dask arrays (array-api-compat's dask namespace).

What works: the functional form (lazy: init/update build a graph, nothing is computed),
the stateful form (which holds the new arrays in ``opt.params``, as for JAX: dask's
``x[...] = y`` would keep both histories and grow the graph quadratically with the
steps), checkpoints, schedules, parameter groups, mixed chunkings, and polyopt's input
checks (mixed libraries, dtypes, shapes) with the same errors as NumPy. Arrays with
unknown chunk sizes (shape ``(nan,)``) get a clear error. Expected values come from
NumPy runs of the same optimizers.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import polyopt  # noqa: E402
from polyopt import testing  # noqa: E402

STEPS = 20
NAMES = testing.NAMES  # every optimizer the shared problems run (not Muon)
SHAPES = {"w": (6, 4), "b": (5,), "s": (), "e": (0,)}
TOL = {"float64": 1e-12, "float32": 1e-6}


def options(name):
    """The optimizer's row of the case table with every state slot and schedules (AdamW's
    on the weight decay too)."""
    return testing.polyopt_hyperparams(testing.richest(name, testing.SCHEDULED))


def problem(dtype, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    p0 = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    gs = [
        {
            k: (10 ** rng.uniform(-1, 0.5) * rng.standard_normal(s)).astype(dtype)
            for k, s in SHAPES.items()
        }
        for _ in range(steps)
    ]
    return p0, gs


def to_dask(tree, chunks=2):
    return {k: da.from_array(v, chunks=chunks if v.ndim else ()) for k, v in tree.items()}


def numpy_run(name, p0, gs):
    opt = polyopt.OPTIMIZERS[name][0](**options(name))
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in gs:
        params, state = opt.update(params, g, state)
    return params, state


def assert_close(actual, desired, dtype, what):
    # dask computes a 0-d array to a NumPy scalar
    assert isinstance(actual, (np.ndarray, np.generic)), f"{what}: {type(actual).__name__}"
    actual = np.asarray(actual)
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype}"
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(
        actual, desired, rtol=TOL[dtype], atol=TOL[dtype] * scale, err_msg=what
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_functional_form_matches_numpy(name, dtype):
    p0, gs = problem(dtype)
    ref_p, ref_s = numpy_run(name, p0, gs)
    opt = polyopt.OPTIMIZERS[name][0](**options(name))
    params = to_dask(p0)
    state = opt.init(params)
    for g in gs:
        params, state = opt.update(params, to_dask(g, chunks=3), state)  # other chunking
    # lazy all the way: dask arrays out, nothing computed yet
    assert all(isinstance(v, da.Array) for v in params.values())
    assert all(isinstance(a, da.Array) for arrays in state.slots.values() for a in arrays)
    assert state.step == STEPS
    got_p, got_s = dask.compute(params, {n: list(a) for n, a in state.slots.items()})
    for k in p0:
        assert_close(got_p[k], ref_p[k], dtype, f"{name} params[{k!r}]")
    assert set(got_s) == set(ref_s.slots)
    for n, refs in ref_s.slots.items():
        assert len(got_s[n]) == len(refs)
        for i, (a, r) in enumerate(zip(got_s[n], refs)):
            assert_close(a, r, dtype, f"{name} state[{n!r}][{i}]")


def test_functional_form_does_not_mutate_inputs():
    p0, gs = problem("float64", steps=3)
    opt = polyopt.adamw(**options("adamw"))
    params = to_dask(p0)
    graphs = {k: v.name for k, v in params.items()}
    state = opt.init(params)
    new, _ = opt.update(params, to_dask(gs[0]), state)
    assert {k: v.name for k, v in params.items()} == graphs
    for k in p0:
        np.testing.assert_array_equal(params[k].compute(), p0[k])
        assert new[k] is not params[k]


@pytest.mark.parametrize("name", NAMES)
def test_stateful_form_holds_new_arrays(name):
    p0, gs = problem("float64", seed=1, steps=10)
    ref_p, ref_s = numpy_run(name, p0, gs)
    cls = polyopt.OPTIMIZERS[name][1]
    params = to_dask(p0)
    originals = dict(params)
    opt = cls(params, **options(name))
    for g in gs:
        opt.step(to_dask(g))
    assert opt.step_count == len(gs)
    for k in p0:
        assert opt.params[k] is not originals[k]  # new arrays; the user's are unchanged
        np.testing.assert_array_equal(originals[k].compute(), p0[k])
        assert_close(opt.params[k].compute(), ref_p[k], "float64", f"{name} params[{k!r}]")
    for n, refs in ref_s.slots.items():
        for i, (a, r) in enumerate(zip(opt.state.slots[n], refs)):
            assert_close(a.compute(), r, "float64", f"{name} state[{n!r}][{i}]")


def test_stateful_checkpoint_round_trip_and_groups():
    p0, gs = problem("float64", seed=2, steps=8)
    groups_np = [
        {"params": {"w": p0["w"].copy(), "b": p0["b"].copy()}},
        {"params": {"s": p0["s"].copy()}, "weight_decay": 0.0},
    ]
    groups_da = [
        {"params": to_dask({"w": p0["w"], "b": p0["b"]})},
        {"params": to_dask({"s": p0["s"]}), "weight_decay": 0.0},
    ]
    ref = polyopt.AdamW(groups_np, lr=0.05, weight_decay=0.1)
    opt = polyopt.AdamW(groups_da, lr=0.05, weight_decay=0.1)

    def grads(g):
        return [{"w": g["w"], "b": g["b"]}, {"s": g["s"]}]

    for g in gs[:4]:
        ref.step(grads(g))
        opt.step([{k: da.from_array(v) for k, v in t.items()} for t in grads(g)])
    sd = opt.state_dict()
    assert isinstance(sd["state"][0]["exp_avg"], da.Array)
    again = polyopt.AdamW(
        [
            {"params": dict(g["params"]), **{k: v for k, v in g.items() if k != "params"}}
            for g in opt.params  # the arrays at the checkpoint (held, not written in place)
        ],
        lr=0.05,
        weight_decay=0.1,
    )
    again.load_state_dict(sd)
    assert again.step_count == 4
    for g in gs[4:]:
        ref.step(grads(g))
        again.step([{k: da.from_array(v) for k, v in t.items()} for t in grads(g)])
    for gr, gd in zip(ref.params, again.params):
        for k in gr["params"]:
            assert_close(gd["params"][k].compute(), gr["params"][k], "float64", f"params[{k!r}]")


# -- the conformance matrix ------------------------------------------------------------

#: The whole dask column (96 cells) passes but takes minutes: each cell computes every
#: array after every step from a graph that holds the whole history. A sample here.
MATRIX_SAMPLE = {
    "float64": ["sgd-nesterov", "adamw-groups-no-decay"],
    "float32": ["adagrad-lr_decay"],
}


@pytest.mark.parametrize("dtype", list(MATRIX_SAMPLE))
def test_matrix_cells_pass(dtype):
    cases = [c for c in testing.CASES if c.id in MATRIX_SAMPLE[dtype]]
    assert len(cases) == len(MATRIX_SAMPLE[dtype])
    results = testing.run(testing.cells(["dask"], dtypes=[dtype], cases=cases))
    ran = [r for r in results if r.status != "skip"]
    assert len(ran) == len(cases)  # the generic cells; no fused dask path exists
    assert all(r.status == "pass" for r in ran), [(r.cell.id, r.reason) for r in ran]
    assert all(r.reason.startswith("no fused") for r in results if r.status == "skip")


def test_matrix_has_no_half_precision_dask_cells():
    # dask (NumPy chunks) has no bfloat16 and the strict dtypes only: no such cells
    assert testing.cells(["dask"], dtypes=["float16", "bfloat16"]) == []


# -- errors: the same clear ones as for NumPy --------------------------------------------


def test_mixing_dask_and_numpy_is_a_clear_error():
    x = np.arange(6.0)
    opt = polyopt.adam(lr=0.1)
    for params, grads, rx in [
        (da.from_array(x), x, "params are dask arrays, grads are numpy"),
        (x, da.from_array(x), "params are numpy arrays, grads are dask"),
    ]:
        with pytest.raises(TypeError, match=rf"grads must be arrays of the params' library: {rx}"):
            opt.update(params, grads, opt.init(params))
    sopt = polyopt.Adam([da.from_array(x)], lr=0.1)
    with pytest.raises(TypeError, match="grads must be arrays of the params' library"):
        sopt.step([x])
    assert sopt.step_count == 0


def test_bad_inputs_are_clear_errors_and_change_nothing():
    x = da.from_array(np.arange(6.0), chunks=3)
    with pytest.raises(TypeError, match="params has dtype int64; optimizers need floating"):
        polyopt.adam().init(da.from_array(np.arange(3)))
    opt = polyopt.Adam([x], lr=0.1)
    opt.step([da.ones(6, chunks=2)])
    before = opt.params[0].compute(), opt.state.slots["exp_avg"][0].compute()
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(3,\).*expected shape \(6,\)"):
        opt.step([da.ones(3)])
    with pytest.raises(ValueError, match=r"dtype float32.*expected shape \(6,\) and dtype float64"):
        opt.step([da.ones(6, dtype="float32")])
    assert opt.step_count == 1
    np.testing.assert_array_equal(opt.params[0].compute(), before[0])
    np.testing.assert_array_equal(opt.state.slots["exp_avg"][0].compute(), before[1])


def test_unknown_chunk_sizes_work_or_get_a_clear_error():
    x = np.arange(8.0)
    p = da.from_array(x, chunks=4)
    p = p[p > 2]  # boolean indexing: shape (nan,)
    assert np.isnan(p.shape[0])
    opt = polyopt.adam(lr=0.1)
    try:
        new, _ = opt.update(p, p * 0.5, opt.init(p))
    except ValueError as e:
        msg = str(e)
        assert re.search(r"unknown|compute_chunk_sizes", msg), f"unclear error: {msg}"
    else:  # or it works
        kept = x[x > 2]
        expected, _ = opt.update(kept, kept * 0.5, opt.init(kept))
        np.testing.assert_allclose(new.compute(), expected, rtol=1e-12)


# -- graph size: what each step adds ------------------------------------------------------


def _graph_sizes(step, checkpoints):
    sizes = {}
    for k in range(1, max(checkpoints) + 1):
        arr = step(k)
        if k in checkpoints:
            sizes[k] = len(arr.__dask_graph__())
    return sizes


def test_functional_graph_grows_linearly():
    x = np.arange(6.0)
    opt = polyopt.adam(lr=0.1)
    holder = {"p": da.from_array(x, chunks=3)}
    holder["s"] = opt.init(holder["p"])

    def step(k):
        holder["p"], holder["s"] = opt.update(
            holder["p"], da.from_array(np.sin(x + k), chunks=3), holder["s"]
        )
        return holder["p"]

    sizes = _graph_sizes(step, (10, 20, 40))
    # each step adds the same number of tasks
    assert sizes[40] - sizes[20] == 2 * (sizes[20] - sizes[10]), sizes


def test_stateful_graph_grows_linearly():
    x = np.arange(6.0)
    p = da.from_array(x, chunks=3)
    opt = polyopt.Adam([p], lr=0.1)

    def step(k):
        opt.step([da.from_array(np.sin(x + k), chunks=3)])
        return opt.params[0]

    sizes = _graph_sizes(step, (10, 20, 40))
    assert sizes[40] - sizes[20] <= 2 * (sizes[20] - sizes[10]) * 1.1, sizes
