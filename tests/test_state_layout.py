"""The layout of ``OptState.slots``: ``{slot name: tuple}``, one entry per params array
(flattening order, across groups), ``None`` where an array's group has no such slot.

Groups whose options need different slots (AMSGrad in one group, momentum in another)
are checked against torch.optim with the same param groups: an independent reference
for the math, while these tests pin down where each array's state lives.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import polyopt

RNG = np.random.default_rng(7)
SHAPES = [(3,), (2, 2), ()]


def _params():
    return [RNG.standard_normal(s) for s in SHAPES]


def _grads(k):
    rng = np.random.default_rng(100 + k)
    return [rng.standard_normal(s) for s in SHAPES]


def _group_grads(k):
    """Grads for the two groups used below: arrays 0-1, and array 2."""
    g = _grads(k)
    return [g[:2], g[2:]]


def test_slots_hold_one_tuple_per_slot_name():
    params = _params()
    state = polyopt.adam(amsgrad=True).init(params)
    assert list(state.slots) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]  # sorted
    for name, arrays in state.slots.items():
        assert isinstance(arrays, tuple) and len(arrays) == len(params), name
        for a, p in zip(arrays, params):
            assert a.shape == p.shape and a.dtype == p.dtype and not np.any(a)
    assert polyopt.sgd(lr=0.1).init(params).slots == {}  # no state at all


def test_per_array_is_the_per_parameter_view():
    params = _params()
    opt = polyopt.adamw(lr=0.1)
    _, state = opt.update(params, _grads(0), opt.init(params))
    view = state.per_array()
    assert len(view) == len(params)
    for i, entry in enumerate(view):
        assert set(entry) == {"exp_avg", "exp_avg_sq"}
        for name, a in entry.items():
            assert a is state.slots[name][i]
    rebuilt = polyopt.OptState.slots_from_per_array(view)
    assert list(rebuilt) == list(state.slots)
    assert all(a is b for n in rebuilt for a, b in zip(rebuilt[n], state.slots[n], strict=True))
    assert polyopt.sgd(lr=0.1).init(params).per_array(3) == [{}, {}, {}]
    with pytest.raises(ValueError, match=re.escape("state slots hold [3] arrays each; expected 2")):
        state.per_array(2)
    uneven = state._replace(slots={**state.slots, "exp_avg": state.slots["exp_avg"][:2]})
    with pytest.raises(ValueError, match=re.escape("hold [2, 3] arrays each; expected the same")):
        uneven.per_array()


def _torch_run(torch, cls, groups_np, steps, **defaults):
    tensors = [[torch.tensor(p) for p in g["params"]] for g in groups_np]
    tgroups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": ts}
        for g, ts in zip(groups_np, tensors)
    ]
    opt = cls(tgroups, **defaults)
    flat = [t for ts in tensors for t in ts]
    for k in range(steps):
        for t, g in zip(flat, _grads(k)):
            t.grad = torch.tensor(g)
        opt.step()
    return [t.numpy() for t in flat], [opt.state[t] for t in flat]


@pytest.mark.parametrize(
    "name, torch_name, defaults, group_options, slot, has",
    [  # has: whether each group's arrays hold the slot
        ("adam", "Adam", dict(lr=0.05), ({}, {"amsgrad": True}), "max_exp_avg_sq", (0, 1)),
        ("sgd", "SGD", dict(lr=0.05), ({"momentum": 0.9}, {}), "momentum_buffer", (1, 0)),
        ("rmsprop", "RMSprop", dict(lr=0.01), ({}, {"centered": True}), "grad_avg", (0, 1)),
    ],
)
@pytest.mark.parametrize("form", ["factory", "class"])
def test_groups_with_different_slots(name, torch_name, defaults, group_options, slot, has, form):
    torch = pytest.importorskip("torch")
    p = _params()
    groups = [{"params": p[:2], **group_options[0]}, {"params": p[2:], **group_options[1]}]
    steps = 4
    factory, cls = polyopt.OPTIMIZERS[name]
    if form == "factory":
        opt = factory(**defaults)
        cur = [{**g, "params": [a.copy() for a in g["params"]]} for g in groups]
        state = opt.init(cur)
        for k in range(steps):
            cur, state = opt.update(cur, _group_grads(k), state)
        got = [a for g in cur for a in g["params"]]
    else:
        sopt = cls([{**g, "params": [a.copy() for a in g["params"]]} for g in groups], **defaults)
        for k in range(steps):
            sopt.step(_group_grads(k))
        got, state = [a for g in sopt.params for a in g["params"]], sopt.state

    column = state.slots[slot]
    owners = [0, 0, 1]  # the group of each array
    for i, a in enumerate(column):
        assert (a is not None) == bool(has[owners[i]]), (slot, i, a)
    ref_p, ref_s = _torch_run(torch, getattr(torch.optim, torch_name), groups, steps, **defaults)
    for i, (a, r) in enumerate(zip(got, ref_p)):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12, err_msg=f"params[{i}]")
    for i, (entry, r) in enumerate(zip(state.per_array(len(got)), ref_s)):
        for n, a in entry.items():
            np.testing.assert_allclose(a, r[n].numpy(), rtol=1e-10, atol=1e-12, err_msg=f"{n}[{i}]")


def test_state_dict_round_trip_with_groups_that_differ_in_slots():
    p = _params()
    groups = [{"params": p[:2]}, {"params": p[2:], "amsgrad": True}]
    opt = polyopt.Adam([{**g, "params": [a.copy() for a in g["params"]]} for g in groups], lr=0.1)
    opt.step(_group_grads(0))
    sd = opt.state_dict()
    assert [sorted(sd["state"][i]) for i in range(3)] == [
        ["exp_avg", "exp_avg_sq"],
        ["exp_avg", "exp_avg_sq"],
        ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    ]
    now = [{**g, "params": [a.copy() for a in g["params"]]} for g in opt.params]
    other = polyopt.Adam([{"params": g["params"], "amsgrad": g["amsgrad"]} for g in now])
    other.load_state_dict(sd)
    assert other.state.slots["max_exp_avg_sq"][:2] == (None, None)
    for name, arrays in opt.state.slots.items():
        for a, b in zip(arrays, other.state.slots[name]):
            assert (a is None and b is None) or np.array_equal(a, b)
    opt.step(_group_grads(1))
    other.step(_group_grads(1))
    for a, b in zip(opt.params, other.params):
        for x, y in zip(a["params"], b["params"]):
            np.testing.assert_array_equal(x, y)


def test_jax_pytree_is_one_list_per_slot():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    params = [jnp.ones(3), jnp.ones(2)]
    state = polyopt.adam(impl="generic").init(params)
    leaves = jax.tree_util.tree_leaves(state)
    # step, then every exp_avg, then every exp_avg_sq (as optax orders mu and nu)
    assert len(leaves) == 1 + 2 * len(params)
    assert leaves[1] is state.slots["exp_avg"][0] and leaves[3] is state.slots["exp_avg_sq"][0]

    # the fast path packs each slot of a group into one buffer: one leaf per slot
    packed = polyopt.adam().init(params)
    leaves = jax.tree_util.tree_leaves(packed)
    assert [tuple(a.shape) for a in leaves] == [(), (5,), (5,)]
    assert isinstance(packed.slots["exp_avg"], polyopt.flat.Packed)
    assert [tuple(a.shape) for a in packed.slots["exp_avg"]] == [(3,), (2,)]
    bumped = jax.tree_util.tree_map(lambda a: a + 1, packed)  # rebuilt from its leaves
    np.testing.assert_array_equal(np.asarray(bumped.slots["exp_avg_sq"][1]), [1.0, 1.0])

    groups = [{"params": params[:1]}, {"params": params[1:], "amsgrad": True}]
    gstate = polyopt.adam().init(groups)
    assert len(jax.tree_util.tree_leaves(gstate)) == 1 + 2 * 2 + 1  # None is no leaf
    new = jax.tree_util.tree_map(lambda a: a + 1, gstate)
    assert new.slots["max_exp_avg_sq"][0] is None
