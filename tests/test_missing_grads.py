"""Missing gradients: a ``None`` in ``grads`` (or a torch param whose ``.grad`` is None)
leaves that array and its state exactly as they were.

- Values: every single-group case of the table, with arrays skipping steps, against
  ``torch.optim`` (float64, rtol 1e-9) on the same pattern of ``.grad = None``, in the
  functional form (NumPy) and the stateful form (torch tensors, grads from ``.grad``).
  Each array counts its own updates as torch's per-param ``step`` does, which is what
  bias corrections, Adagrad's ``lr_decay`` and SGD's first-step rule read; schedules
  follow the optimizer's step count.
- A skipped array is bit-identical, and its state too, on every backend and path
  (generic, NumPy fused, torch fused, JAX packed state, under ``jax.jit``).
- A step where no array has a gradient is a no-op (the step count does not move); a
  group where none has one leaves that group alone.
- The counts survive checkpoints (``state_dict()[...]["step"]``) and continuing after a
  round trip is bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest

import cases as C  # noqa: E402
import polyopt
import torch_maxdiff as T  # noqa: E402
from polyopt.testing import _cases as TC

torch = pytest.importorskip("torch")

STEPS = 20
RTOL = 1e-9
TORCH_CASES = [c for c in C.CASES if T.torch_supports(c)]


def pattern(k: int) -> set:
    """Arrays (of the 4 in make_problem) with no gradient at step k: the matrix's
    pattern, repeated every 10 steps; {ALL} for a step with none at all."""
    return {i for s, i in TC.MISSING if s == k % 10}


def with_missing(grads: list) -> list:
    out = []
    for k, gs in enumerate(grads):
        gone = pattern(k)
        out.append([None if (TC.ALL in gone or i in gone) else g for i, g in enumerate(gs)])
    return out


def compare(case, run, label):
    p0, grads = C.make_problem(STEPS)
    T.assert_matches_torch(case, run, p0, with_missing(grads), label, RTOL)


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_functional_numpy_with_missing_grads_matches_torch(case):
    compare(case, T.functional_run(case), "numpy functional")


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_stateful_torch_with_none_dot_grad_matches_torch(case):
    compare(case, T.stateful_torch_run(case), "torch stateful")


# -- what is skipped is untouched, on every path ------------------------------------------


def _make(backend, x):
    if backend == "torch":
        return torch.tensor(x)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    return np.array(x)


def _np(x):
    return polyopt.testing.to_numpy(x)


PATHS = [
    ("numpy", "generic"),
    ("numpy", "fused"),
    ("torch", "generic"),
    ("torch", "fused"),
    ("jax", "generic"),
    ("jax", "fused"),
]


@pytest.mark.parametrize(("backend", "impl"), PATHS, ids=[f"{b}-{i}" for b, i in PATHS])
@pytest.mark.parametrize("form", ["stateful", "functional", "jit"])
def test_a_skipped_array_and_its_state_stay_bit_identical(backend, impl, form):
    if form == "jit" and backend != "jax":
        pytest.skip("jax.jit is for JAX arrays")
    if backend == "jax":
        pytest.importorskip("jax")
    rng = np.random.default_rng(3)
    shapes = [(5,), (2, 3), (4,), (3,)]  # small arrays: the JAX fast path packs them
    p0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    gs = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]
    hp = dict(lr=0.01, weight_decay=0.1, amsgrad=True)
    params = [_make(backend, p) for p in p0]
    if form == "stateful":
        opt = polyopt.AdamW(params, **hp, impl=impl)

        def step(g):
            opt.step(g)
            return opt.params, opt.state
    else:
        fopt = polyopt.adamw(**hp, impl=impl)
        holder = {"p": params, "s": fopt.init(params)}
        update = fopt.update
        if form == "jit":
            import jax

            update = jax.jit(fopt.update)

        def step(g):
            holder["p"], holder["s"] = update(holder["p"], g, holder["s"])
            return holder["p"], holder["s"]

    for k in range(2):
        step([_make(backend, g) for g in gs[k]])
    before_p, before_s = step([_make(backend, g) for g in gs[2]])
    before = (
        [_np(p) for p in before_p],
        {n: [_np(a) for a in col] for n, col in before_s.slots.items()},
    )
    for k in range(3, 6):  # array 1 is frozen from here on
        g = [_make(backend, x) for x in gs[k]]
        g[1] = None
        new_p, new_s = step(g)
        assert np.array_equal(_np(new_p[1]), before[0][1])
        for n, col in new_s.slots.items():
            assert np.array_equal(_np(col[1]), before[1][n][1]), n
            assert not np.array_equal(_np(col[0]), before[1][n][0])  # the others moved
        assert not np.array_equal(_np(new_p[0]), before[0][0])
        assert [int(c) for c in new_s.counts] == [k + 1, 3, k + 1, k + 1]
    assert int(new_s.step) == 6


def test_the_same_values_on_every_path():
    """Missing grads through each fast path give the generic path's numbers."""
    rng = np.random.default_rng(4)
    shapes = [(5,), (2, 3), (4,), (3,)]
    p0 = [rng.standard_normal(s) for s in shapes]
    gs = [[rng.standard_normal(s) for s in shapes] for _ in range(8)]
    for k, g in enumerate(gs):
        g[k % 3] = None
    results = {}
    for backend, impl in PATHS:
        if backend == "jax":
            continue  # float64 needs x64; held to the matrix in float32
        params = [_make(backend, p) for p in p0]
        opt = polyopt.Adam(params, lr=0.01, weight_decay=0.01, impl=impl)
        for g in gs:
            opt.step([None if x is None else _make(backend, x) for x in g])
        results[(backend, impl)] = [_np(p) for p in params]
    ref = results[("numpy", "generic")]
    for key, got in results.items():
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, err_msg=str(key))


# -- no-ops -------------------------------------------------------------------------------


#: Shapes of the two params ``w`` and ``b``: vectors, and matrices (Muon takes only
#: those; Adafactor factors them).
_NO_OP_SHAPES = {"vectors": ((3,), (2,)), "matrices": ((3, 2), (2, 2))}


def _takes(name, shapes):
    """Whether the optimizer takes params of these shapes (Muon refuses all but 2-D)."""
    try:
        polyopt.OPTIMIZERS[name][0]().init([np.ones(s) for s in shapes])
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        pytest.param(n, k, id=f"{n}-{k}" if k != "vectors" else n)
        for n in polyopt.OPTIMIZERS
        for k, shapes in _NO_OP_SHAPES.items()
        if _takes(n, shapes)
    ],
)
@pytest.mark.parametrize("form", ["stateful", "functional"])
def test_a_step_with_no_gradient_at_all_is_a_no_op(name, kind, form):
    factory, cls = polyopt.OPTIMIZERS[name]
    sw, sb = _NO_OP_SHAPES[kind]
    params = {"w": np.ones(sw), "b": np.zeros(sb)}
    grads = {"w": np.full(sw, 0.5), "b": np.full(sb, 0.5)}
    if form == "stateful":
        opt = cls(params, lr=0.1)
        opt.step(grads)
        before = opt.state
        w = params["w"].copy()
        opt.step({"w": None, "b": None})
        assert opt.state is before and opt.step_count == 1
        assert np.array_equal(params["w"], w)
    else:
        opt = factory(lr=0.1)
        state = opt.init(params)
        params, state = opt.update(params, grads, state)
        new_params, new_state = opt.update(params, {"w": None, "b": None}, state)
        assert new_state is state and new_params["w"] is params["w"]


def test_a_group_with_no_gradient_is_left_alone():
    a, b, c = np.ones(3), np.ones(2), np.ones(4)
    opt = polyopt.SGD([{"params": [a, b]}, {"params": [c], "lr": 0.5}], lr=0.1, momentum=0.9)
    opt.step([[np.ones(3), np.ones(2)], [None]])
    assert np.array_equal(c, np.ones(4)) and not np.array_equal(a, np.ones(3))
    assert opt.state.counts == (1, 1, 0) and opt.step_count == 1
    opt.step([[None, None], [np.ones(4)]])
    assert opt.state.counts == (1, 1, 1) and opt.step_count == 2
    # c's first update: torch starts the momentum buffer at g (no dampening), lr 0.5
    np.testing.assert_allclose(c, 1 - 0.5, rtol=0, atol=1e-15)


def test_counts_stay_none_while_nothing_is_missing():
    opt = polyopt.Adam([np.ones(3), np.ones(2)], lr=0.1)
    for _ in range(3):
        opt.step([np.ones(3), np.ones(2)])
    assert opt.state.counts is None
    assert "step" not in opt.state_dict()["state"][0]


# -- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_counts_round_trip_through_state_dict(backend):
    rng = np.random.default_rng(9)
    p0 = [rng.standard_normal(3), rng.standard_normal(2)]
    gs = [[rng.standard_normal(3), rng.standard_normal(2)] for _ in range(8)]
    for k in (0, 1, 4):
        gs[k][1] = None

    def fresh():
        return [_make(backend, p) for p in p0]

    params = fresh()
    opt = polyopt.Adam(params, lr=0.05)
    for g in gs[:5]:
        opt.step([None if x is None else _make(backend, x) for x in g])
    sd = opt.state_dict()
    assert [sd["state"][i]["step"] for i in (0, 1)] == [5, 2]
    params2 = [_make(backend, _np(p)) for p in params]
    opt2 = polyopt.Adam(params2, lr=0.05)
    opt2.load_state_dict(sd)
    assert opt2.state.counts == (5, 2)
    for g in gs[5:]:
        for o in (opt, opt2):
            o.step([_make(backend, x) for x in g])
    for a, b in zip(params, params2, strict=True):
        assert np.array_equal(_np(a), _np(b))


def test_jit_recompiles_once_when_a_gradient_first_goes_missing():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    opt = polyopt.adam(lr=0.1)
    params = [jnp.ones(3), jnp.ones(2)]
    state = opt.init(params)
    traces = []

    def update(p, g, s):
        traces.append(1)
        return opt.update(p, g, s)

    step = jax.jit(update)
    for _ in range(3):
        params, state = step(params, [jnp.ones(3), None], state)
    assert len(traces) == 2  # counts appear after the first call: one more trace
    assert state.counts.tolist() == [3, 0] and int(state.step) == 3
