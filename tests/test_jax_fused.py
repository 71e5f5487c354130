"""The JAX fast path (packed Adam/AdamW state) held to the generic path.

Each comparison runs ``impl="fused"`` and ``impl="generic"`` under ``jax.jit`` from the
same arrays and compares params and every state entry after every step, as
``max |fused - generic| / max |generic|`` per array. Both run the same rule operations
(the fused path runs the rule's two halves, the generic path their composition) in
the same dtype; XLA compiles them into different loops, so the last bit may differ:
tolerance 1e-6 in float32, 1e-2 in bfloat16 (its epsilon is 7.8e-3). The generic
path is held to the NumPy float64 reference and torch.optim elsewhere.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import polyopt  # noqa: E402
from polyopt import flat, testing  # noqa: E402
from polyopt.testing import max_error  # noqa: E402

STEPS = 12
TOL = {"float32": 1e-6, "bfloat16": 1e-2}
#: Every elementwise optimizer (the path packs the state of any elementwise rule; a rule
#: that reduces over an array has no fused path, ``impl="fused"`` refuses it) in each
#: dtype: its row of the case table with every state slot, with schedules in float32 and
#: numbers in bfloat16.
CONFIGS = [
    pytest.param(c, dtype, id=f"{c.id}-{dtype}")
    for tag, dtype in ((testing.SCHEDULED, "float32"), (testing.FULL, "bfloat16"))
    for c in testing.tagged(tag)
    if polyopt.OPTIMIZERS[c.name][0]().rule.elementwise
]
SHAPES = [(3, 5), (), (0,), (1,), (7,)] + [(4,)] * 15


def _problem(dtype="float32", shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    params = [jnp.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    grads = [
        [jnp.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes] for _ in range(STEPS)
    ]
    return params, grads


def _assert_same(got, want, tol, what):
    gp, gs = got
    wp, ws = want
    for i, (a, b) in enumerate(zip(gp, wp)):
        assert a.dtype == b.dtype, f"{what}: params[{i}] dtype {a.dtype}"
        assert max_error(a, b) <= tol, f"{what}: params[{i}] error {max_error(a, b):.3g}"
    assert set(gs) == set(ws)
    for n in ws:
        assert len(gs[n]) == len(ws[n])
        for i, (a, b) in enumerate(zip(gs[n], ws[n])):
            assert (a is None) == (b is None), f"{what}: slots[{n!r}][{i}]"
            if b is not None:
                assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: slots[{n!r}][{i}]"
                assert max_error(a, b) <= tol, f"{what}: slots[{n!r}][{i}]"


def _run(opt, params, grads, jit=True):
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init(params)
    out = []
    for g in grads:
        params, state = update(params, g, state)
        out.append((params, state.slots))
    return out, state


@pytest.mark.parametrize(("case", "dtype"), CONFIGS)
def test_fused_equals_generic_under_jit(case, dtype):
    factory, name = polyopt.OPTIMIZERS[case.name][0], case.id
    hp = testing.polyopt_hyperparams(case)
    params, grads = _problem(dtype)
    fused, state = _run(factory(**hp, impl="fused"), params, grads)
    generic, _ = _run(factory(**hp, impl="generic"), params, grads)
    assert all(isinstance(c, flat.Packed) for c in state.slots.values())
    for k, (a, b) in enumerate(zip(fused, generic)):
        _assert_same(a, b, TOL[dtype], f"{name} {dtype} step {k + 1}")


def test_eager_functional_form_equals_jit():
    params, grads = _problem()
    opt = polyopt.adamw(lr=1e-2, impl="fused")
    eager, _ = _run(opt, params, grads[:4], jit=False)
    jitted, _ = _run(opt, params, grads[:4])
    # eager bias corrections are float64 on the host, jit's float32 on the device
    _assert_same(eager[-1], jitted[-1], 1e-5, "eager vs jit")


def test_state_is_one_buffer_per_slot_and_donation_reuses_it():
    params, grads = _problem()
    opt = polyopt.adamw()
    state = opt.init(params)
    n = sum(int(np.prod(s)) for s in SHAPES)
    assert [tuple(a.shape) for a in jax.tree_util.tree_leaves(state.slots)] == [(n,), (n,)]
    update = jax.jit(opt.update, donate_argnums=(0, 2))
    old = jax.tree_util.tree_leaves(state.slots)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "donated buffers were not usable" would raise
        params, state = update(params, grads[0], state)
        params, state = update(params, grads[1], state)
    assert all(a.is_deleted() for a in old)


def test_compiled_step_is_about_one_loop_per_array():
    """What the layout is for: XLA runs the moments of all arrays in one loop each
    and one loop per array for the params (optax's and the generic step: three loops
    per array). The price is one temporary the size of the grads (the joined grads)."""
    shapes = [(4, 8)] * 40
    params, grads = _problem(shapes=shapes)
    opt = polyopt.adamw()
    update = jax.jit(opt.update, donate_argnums=(0, 2))
    compiled = update.lower(params, grads[0], opt.init(params)).compile()
    loops = compiled.as_text().count(" fusion(")
    assert 0 < loops <= len(shapes) + 8, loops
    grad_bytes = sum(g.nbytes for g in grads[0])
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= grad_bytes + 1024, (temp, grad_bytes)


def test_groups_pack_separately_with_none_for_a_slot_one_group_lacks():
    params, grads = _problem(shapes=[(3,), (2, 2), (5,), (1,), (6,)])
    groups = [{"params": params[:3]}, {"params": params[3:], "amsgrad": True}]
    gg = [[g[:3], g[3:]] for g in grads]
    results = {}
    for impl in ("fused", "generic"):
        opt = polyopt.adamw(lr=1e-2, impl=impl)
        state = opt.init(groups)

        def update(p, g, s, opt=opt):  # group options stay Python values under jit
            new, s = opt.update([{"params": p[0]}, {"params": p[1], "amsgrad": True}], g, s)
            return [grp["params"] for grp in new], s

        update = jax.jit(update)
        p = [grp["params"] for grp in groups]
        for g in gg:
            p, state = update(p, g, state)
        results[impl] = (p[0] + p[1], state.slots)
    slots = results["fused"][1]
    assert [c is None for c in slots["max_exp_avg_sq"]] == [True] * 3 + [False] * 2
    assert len(jax.tree_util.tree_leaves(slots["exp_avg"])) == 2  # one buffer per group
    _assert_same(results["fused"], results["generic"], 1e-6, "groups")


@pytest.mark.parametrize(
    "shapes, dtypes",
    [([(3,)], ["float32"]), ([(3,), (2,)], ["float32", "bfloat16"])],
    ids=["one-array", "mixed-dtypes"],
)
def test_groups_it_cannot_pack_keep_per_array_state(shapes, dtypes):
    rng = np.random.default_rng(1)
    params = [jnp.asarray(rng.standard_normal(s), dtype=d) for s, d in zip(shapes, dtypes)]
    grads = [[jnp.ones_like(p) for p in params] for _ in range(3)]
    fused, state = _run(polyopt.adam(impl="fused"), params, grads)
    generic, _ = _run(polyopt.adam(impl="generic"), params, grads)
    assert all(type(c) is tuple for c in state.slots.values())
    _assert_same(fused[-1], generic[-1], 0.0, "unpacked")


def test_tuple_state_under_jit_stays_per_array():
    """A hand-made (tuple) state is not repacked under jit: jit cannot see where the
    arrays live, and a changed state structure would compile the step again."""
    params, grads = _problem()
    opt = polyopt.adamw(impl="fused")
    packed = opt.init(params)
    tuples = polyopt.OptState(
        packed.step, polyopt.OptState.slots_from_per_array(packed.per_array())
    )
    assert all(type(c) is tuple for c in tuples.slots.values())
    update = jax.jit(opt.update)
    p1, s1 = update(params, grads[0], tuples)
    p2, s2 = update(params, grads[0], packed)
    assert all(type(c) is tuple for c in s1.slots.values())
    _assert_same((p1, s1.slots), (p2, s2.slots), 1e-6, "tuple state")


def test_stateful_checkpoint_round_trip_packs_again():
    params, grads = _problem()
    a = polyopt.AdamW(params, lr=1e-2)
    for g in grads[:3]:
        a.step(g)
    sd = pickle.loads(pickle.dumps(a.state_dict()))
    b = polyopt.AdamW([p + 0 for p in params], lr=1e-2)
    b.load_state_dict(sd)
    b.param_groups[0]["params"] = list(a.params)
    assert all(type(c) is tuple for c in b.state.slots.values())  # as loaded
    for g in grads[3:6]:
        a.step(g)
        b.step(g)
    assert all(isinstance(c, flat.Packed) for c in b.state.slots.values())  # packed again
    _assert_same((b.params, b.state.slots), (a.params, a.state.slots), 0.0, "resumed")


def test_state_for_other_params_is_rejected_before_anything_changes():
    params, grads = _problem()
    opt = polyopt.adamw()
    state = opt.init(params)
    other = [jnp.zeros((2,) + tuple(p.shape)) for p in params]
    with pytest.raises(ValueError, match=r"state.slots\['exp_avg'\]\[0\] has shape"):
        opt.update(other, other, state)


def test_packed_state_pickles():
    params, grads = _problem()
    opt = polyopt.adamw()
    state = jax.jit(opt.update)(params, grads[0], opt.init(params))[1]
    back = pickle.loads(pickle.dumps(state))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_big_arrays_keep_their_own_state_and_runs_of_small_ones_are_packed(monkeypatch):
    """Layout: runs of two or more consecutive small arrays share a buffer (at most
    RUN elements each); a big array, or a small one between big ones, is kept as it is."""
    from polyopt.backends import jax as fast

    monkeypatch.setattr(fast, "SMALL", 10)
    monkeypatch.setattr(fast, "RUN", 12)
    fast._plan.cache_clear()
    try:
        shapes = [(11,), (3,), (4,), (5,), (2, 3), (11,), (5,)]
        # (11,) big | (3,) (4,) (5,): 12 elements, full | (2, 3): no small neighbour left
        # before the big (11,) | (5,): alone at the end
        params, grads = _problem(shapes=shapes)
        fused, state = _run(polyopt.adamw(lr=1e-2, impl="fused"), params, grads)
        generic, _ = _run(polyopt.adamw(lr=1e-2, impl="generic"), params, grads)
        col = state.slots["exp_avg"]
        assert col.tails == (None, ((3,), (4,), (5,)), None, None, None)
        assert [tuple(a.shape) for a in col] == shapes
        for k, (a, b) in enumerate(zip(fused, generic)):
            _assert_same(a, b, 1e-6, f"mixed layout step {k + 1}")
    finally:
        fast._plan.cache_clear()
