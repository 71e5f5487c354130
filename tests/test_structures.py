"""The structures params come in, and who owns the arrays.

- params as one array, list, tuple, nested dict, dict with a list inside: the output has
  the structure of the input (types, keys and key order) and the expected values,
  computed here by hand for each leaf.
- the functional form mutates nothing; the stateful form writes into the user's own
  NumPy arrays and torch tensors (``nn.Parameter`` included, with no autograd graph) and
  holds new arrays for JAX.
- ``opt.step()`` with no grads reads torch's ``.grad``, checked against ``torch.optim``.
- parameter groups: per-group overrides equal separate optimizers; live ``param_groups``
  edits take effect at the next step; grads per group as trees or as group dicts.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import polyopt
from polyopt import testing

torch = pytest.importorskip("torch")

NAMES = testing.NAMES  # every optimizer the shared problems run (not Muon)
BACKENDS = ("numpy", "torch")


def _hp(name: str) -> dict:
    """The optimizer's case-table row with every state slot (numbers only)."""
    return testing.polyopt_hyperparams(testing.richest(name))


def to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


def _array(backend, x):
    return torch.tensor(x) if backend == "torch" else np.array(x)


class Maker:
    """Deterministic arrays of a backend, in the order they are asked for."""

    def __init__(self, backend, seed):
        self.backend, self.rng = backend, np.random.default_rng(seed)

    def __call__(self, *shape):
        return _array(self.backend, self.rng.standard_normal(shape))


STRUCTS = {
    "array": lambda mk: mk(3),
    "list": lambda mk: [mk(3), mk(2, 2)],
    "tuple": lambda mk: (mk(3), mk(2)),
    "nested-dict": lambda mk: {
        "layer2": {"w": mk(2, 3), "b": mk(2)},
        "layer1": {"w": mk(3, 3), "b": mk(3)},
    },
    "dict-with-list": lambda mk: {"blocks": [mk(2), mk(3)], "head": mk(1)},
    "list-of-mixed": lambda mk: [(mk(2), mk(1)), {"z": mk(2), "a": [mk(3)]}],
    "int-keys": lambda mk: {10: mk(2), 2: mk(3), 1: mk(1)},
}


def build(struct, backend, seed):
    return STRUCTS[struct](Maker(backend, seed))


def leaves(tree, path=()):
    """{path: leaf}, independent of polyopt's own flattening."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(leaves(v, (*path, k)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(leaves(v, (*path, i)))
        return out
    return {path: tree}


def assert_same_structure(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)  # same keys, same order
        for k in a:
            assert_same_structure(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_structure(x, y)
    else:
        assert tuple(a.shape) == tuple(b.shape)
        assert a.dtype == b.dtype


# -- structures ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("struct", list(STRUCTS))
def test_functional_output_structure_and_values_sgd(struct, backend):
    """Two SGD-momentum steps, expected values by hand per leaf."""
    lr, mu = 0.1, 0.9
    opt = polyopt.sgd(lr=lr, momentum=mu)
    params = build(struct, backend, 0)
    g1, g2 = build(struct, backend, 1), build(struct, backend, 2)
    state = opt.init(params)
    p1, state = opt.update(params, g1, state)
    p2, state = opt.update(p1, g2, state)
    assert_same_structure(p1, params)
    assert_same_structure(p2, params)
    P0, G1, G2, P2 = leaves(params), leaves(g1), leaves(g2), leaves(p2)
    assert set(P2) == set(P0)
    for path in P0:
        b1 = to_np(G1[path])
        b2 = mu * b1 + to_np(G2[path])
        expected = to_np(P0[path]) - lr * b1 - lr * b2
        np.testing.assert_allclose(to_np(P2[path]), expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("struct", list(STRUCTS))
def test_functional_output_structure_and_values_adamw(struct, backend):
    """One AdamW step: m̂ = g, v̂ = g², p ← p(1 - lr λ) - lr g / (|g| + ε)."""
    lr, wd, eps = 0.01, 0.1, 1e-8
    opt = polyopt.adamw(lr=lr, weight_decay=wd, eps=eps)
    params, grads = build(struct, backend, 0), build(struct, backend, 1)
    new, state = opt.update(params, grads, opt.init(params))
    assert_same_structure(new, params)
    P, G, N = leaves(params), leaves(grads), leaves(new)
    for path in P:
        p, g = to_np(P[path]), to_np(G[path])
        expected = p * (1 - lr * wd) - lr * g / (np.abs(g) + eps)
        np.testing.assert_allclose(to_np(N[path]), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("struct", list(STRUCTS))
def test_stateful_params_keep_structure(struct, backend):
    params = build(struct, backend, 0)
    opt = polyopt.SGD(params, lr=0.1)
    opt.step(build(struct, backend, 1))
    assert_same_structure(opt.params, build(struct, backend, 0))


@pytest.mark.parametrize("struct", list(STRUCTS))
def test_grads_dict_in_other_key_order(struct):
    params = build(struct, "numpy", 0)
    grads = build(struct, "numpy", 1)

    def reverse(t):
        if isinstance(t, dict):
            return {k: reverse(t[k]) for k in reversed(list(t))}
        if isinstance(t, (list, tuple)):
            return type(t)(reverse(x) for x in t)
        return t

    opt = polyopt.adam(lr=0.1)
    a, _ = opt.update(params, grads, opt.init(params))
    b, _ = opt.update(params, reverse(grads), opt.init(params))
    A, B = leaves(a), leaves(b)
    assert set(A) == set(B)
    for path in A:
        assert np.array_equal(A[path], B[path])


# -- ownership --------------------------------------------------------------------------------


def _deep_values(tree):
    return {path: to_np(x) for path, x in leaves(tree).items()}


def _assert_values(tree, values):
    now = _deep_values(tree)
    assert set(now) == set(values)
    for path in now:
        assert np.array_equal(now[path], values[path]), path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_functional_form_mutates_nothing(name, backend):
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**_hp(name))
    params = build("dict-with-list", backend, 0)
    state = opt.init(params)
    params, state = opt.update(params, build("dict-with-list", backend, 1), state)  # state != 0

    grads = build("dict-with-list", backend, 2)
    p_before, g_before = _deep_values(params), _deep_values(grads)
    s_before = {name: [to_np(v) for v in arrays] for name, arrays in state.slots.items()}
    step_before = state.step
    ids_before = {path: id(x) for path, x in leaves(params).items()}

    new, new_state = opt.update(params, grads, state)

    _assert_values(params, p_before)
    _assert_values(grads, g_before)
    assert state.step == step_before and new_state.step == step_before + 1
    assert set(state.slots) == set(s_before)
    for name, arrays in state.slots.items():
        for i, (v, before) in enumerate(zip(arrays, s_before[name], strict=True)):
            assert np.array_equal(to_np(v), before), (name, i)
    assert {path: id(x) for path, x in leaves(params).items()} == ids_before
    old_leaves, new_leaves = leaves(params), leaves(new)
    for path in old_leaves:
        assert new_leaves[path] is not old_leaves[path]
        if backend == "numpy":
            assert not np.shares_memory(new_leaves[path], old_leaves[path])
        else:
            assert new_leaves[path].data_ptr() != old_leaves[path].data_ptr()
    # and the update did something, so "unchanged" above is not vacuous
    assert any(not np.array_equal(to_np(new_leaves[p]), p_before[p]) for p in p_before)


@pytest.mark.parametrize("name", NAMES)
def test_functional_form_leaves_group_dicts_alone(name):
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**_hp(name))
    w, b = np.ones((2, 2)), np.ones(2)
    groups = [{"params": {"w": w}, "lr": 0.05}, {"params": [b], "weight_decay": 0.0}]
    snapshot = copy.deepcopy(groups)
    new, _ = opt.update(groups, [{"w": np.ones((2, 2))}, [np.ones(2)]], opt.init(groups))
    assert groups[0]["params"]["w"] is w and groups[1]["params"][0] is b
    assert [{k: v for k, v in g.items() if k != "params"} for g in groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in snapshot
    ]
    assert np.array_equal(w, np.ones((2, 2)))
    # the output keeps the group form, with the overrides
    assert isinstance(new, list) and new[0]["lr"] == 0.05 and new[1]["weight_decay"] == 0.0
    assert new[0]["params"]["w"] is not w


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("struct", ["list", "nested-dict", "dict-with-list", "array"])
def test_stateful_numpy_updates_in_place(name, struct):
    factory, cls = polyopt.OPTIMIZERS[name]
    params = build(struct, "numpy", 0)
    ids = {path: id(x) for path, x in leaves(params).items()}
    originals = leaves(params)
    ref = build(struct, "numpy", 0)
    fopt = factory(**_hp(name))
    fstate = fopt.init(ref)

    opt = cls(params, **_hp(name))
    for k in (1, 2, 3):
        grads = build(struct, "numpy", k)
        opt.step(grads)
        ref, fstate = fopt.update(ref, grads, fstate)

    assert opt.params is params
    assert {path: id(x) for path, x in leaves(opt.params).items()} == ids
    R = leaves(ref)
    for path, x in originals.items():
        assert np.array_equal(x, R[path])  # the user's array holds the new values
    first = next(iter(originals))
    assert not np.array_equal(originals[first], leaves(build(struct, "numpy", 0))[first])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_stateful_torch_updates_in_place(name, requires_grad):
    factory, cls = polyopt.OPTIMIZERS[name]
    rng = np.random.default_rng(0)
    w0, b0 = rng.standard_normal((3, 2)), rng.standard_normal(2)
    if requires_grad:
        w, b = torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(b0))
    else:
        w, b = torch.tensor(w0), torch.tensor(b0)
    opt = cls({"w": w, "b": b}, **_hp(name))
    fopt = factory(**_hp(name))
    ref = {"w": torch.tensor(w0), "b": torch.tensor(b0)}
    fstate = fopt.init(ref)
    for _ in range(3):
        g = {
            "w": torch.tensor(rng.standard_normal((3, 2))),
            "b": torch.tensor(rng.standard_normal(2)),
        }
        opt.step(g)
        ref, fstate = fopt.update(ref, g, fstate)

    assert opt.params["w"] is w and opt.params["b"] is b
    for t, r, t0 in ((w, ref["w"], w0), (b, ref["b"], b0)):
        assert t.grad_fn is None
        assert t.requires_grad is requires_grad
        assert t.is_leaf
        assert np.array_equal(to_np(t), to_np(r))
        assert not np.array_equal(to_np(t), t0)
    if requires_grad:
        assert isinstance(w, torch.nn.Parameter)
        (w.sum() * 2).backward()  # still a usable leaf of a new graph
        assert torch.equal(w.grad, torch.full_like(w, 2.0))


def test_jax_stateful_holds_new_arrays():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((3, 2)).astype(np.float32)
    b0 = rng.standard_normal(2).astype(np.float32)
    params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
    user_w = params["w"]
    opt = polyopt.AdamW(params, lr=0.1, weight_decay=0.1)
    np_opt = polyopt.AdamW({"w": w0.copy(), "b": b0.copy()}, lr=0.1, weight_decay=0.1)
    for _ in range(3):
        gw = rng.standard_normal((3, 2)).astype(np.float32)
        gb = rng.standard_normal(2).astype(np.float32)
        opt.step({"w": jnp.asarray(gw), "b": jnp.asarray(gb)})
        np_opt.step({"w": gw, "b": gb})

    new = opt.params
    assert isinstance(new, dict) and list(new) == ["w", "b"]
    assert isinstance(new["w"], jax.Array)
    assert new["w"] is not user_w
    assert np.array_equal(np.asarray(user_w), w0)  # JAX arrays are immutable: the old one stays
    assert opt.step_count == 3
    for k in ("w", "b"):
        assert np.asarray(new[k]).dtype == np.float32
        np.testing.assert_allclose(np.asarray(new[k]), np_opt.params[k], rtol=1e-5, atol=1e-6)


def test_jax_functional_matches_numpy():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(1)
    p0 = [rng.standard_normal(4).astype(np.float32), rng.standard_normal((2, 2)).astype(np.float32)]
    gs = [[rng.standard_normal(x.shape).astype(np.float32) for x in p0] for _ in range(3)]
    opt = polyopt.adam(lr=0.05, amsgrad=True)
    jp, js = [jnp.asarray(x) for x in p0], opt.init([jnp.asarray(x) for x in p0])
    npp, nps = [x.copy() for x in p0], opt.init([x.copy() for x in p0])
    for g in gs:
        jp, js = opt.update(jp, [jnp.asarray(x) for x in g], js)
        npp, nps = opt.update(npp, g, nps)
    assert isinstance(jp, list)
    for a, b in zip(jp, npp, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


# -- torch .grad ----------------------------------------------------------------------------


def _linear_models(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3).double()
    twin = copy.deepcopy(model)
    return model, twin


def _batches(n=5):
    gen = torch.Generator().manual_seed(123)
    return [
        (
            torch.randn(8, 4, generator=gen, dtype=torch.float64),
            torch.randn(8, 3, generator=gen, dtype=torch.float64),
        )
        for _ in range(n)
    ]


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


TORCH_PAIRS = {
    "adamw": (polyopt.AdamW, torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
    "sgd": (
        polyopt.SGD,
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01),
    ),
}


def _assert_models_close(a, b):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        np.testing.assert_allclose(to_np(p), to_np(q), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", list(TORCH_PAIRS))
def test_step_without_grads_uses_dot_grad(which):
    ours_cls, theirs_cls, hp = TORCH_PAIRS[which]
    model, twin = _linear_models()
    ours = ours_cls(list(model.parameters()), **hp)
    theirs = theirs_cls(twin.parameters(), **hp)
    start = to_np(model.weight)
    for x, y in _batches():
        for p in model.parameters():
            p.grad = None
        theirs.zero_grad()
        _loss(model, x, y).backward()
        _loss(twin, x, y).backward()
        ours.step()
        theirs.step()
    _assert_models_close(model, twin)
    assert not np.allclose(to_np(model.weight), start)


def test_step_without_grads_single_tensor():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    w.grad = torch.full((3,), 2.0, dtype=torch.float64)
    polyopt.SGD(w, lr=0.25).step()
    assert torch.equal(w.detach(), torch.full((3,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("which", list(TORCH_PAIRS))
def test_step_with_dot_grad_in_param_groups(which):
    """With two groups (no decay on the bias) ``step()`` reads ``.grad``; torch.optim with the
    same groups is the reference."""
    ours_cls, theirs_cls, hp = TORCH_PAIRS[which]
    model, twin = _linear_models()
    ours = ours_cls(
        [{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}], **hp
    )
    theirs = theirs_cls(
        [{"params": [twin.weight]}, {"params": [twin.bias], "weight_decay": 0.0}], **hp
    )
    for x, y in _batches():
        for p in model.parameters():
            p.grad = None
        theirs.zero_grad()
        _loss(model, x, y).backward()
        _loss(twin, x, y).backward()
        ours.step()
        theirs.step()
    _assert_models_close(model, twin)
    assert model.weight.requires_grad and model.weight.grad_fn is None


@pytest.mark.parametrize("which", list(TORCH_PAIRS))
def test_training_with_explicit_grads_matches_torch(which):
    ours_cls, theirs_cls, hp = TORCH_PAIRS[which]
    model, twin = _linear_models()
    params = list(model.parameters())
    ours = ours_cls(params, **hp)
    theirs = theirs_cls(twin.parameters(), **hp)
    start = [to_np(p) for p in params]
    for x, y in _batches():
        for p in params:
            p.grad = None
        theirs.zero_grad()
        _loss(model, x, y).backward()
        _loss(twin, x, y).backward()
        ours.step([p.grad for p in params])
        theirs.step()
    _assert_models_close(model, twin)
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    assert not np.allclose(to_np(params[0]), start[0])


# -- parameter groups ---------------------------------------------------------------------


def _split_setup(backend, seed=0):
    mk = Maker(backend, seed)
    return {"w": mk(3, 2)}, [mk(2), mk(1)]


GROUP_HP = ({"weight_decay": 0.1}, {"weight_decay": 0.0, "lr": 0.02})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grads_form", ["trees", "group-dicts"])
def test_groups_equal_separate_optimizers_stateful(name, backend, grads_form):
    _, cls = polyopt.OPTIMIZERS[name]
    tree_a, tree_b = _split_setup(backend)
    sep_a, sep_b = _split_setup(backend)
    opt = cls([{"params": tree_a, **GROUP_HP[0]}, {"params": tree_b, **GROUP_HP[1]}], **_hp(name))
    opt_a = cls(sep_a, **{**_hp(name), **GROUP_HP[0]})
    opt_b = cls(sep_b, **{**_hp(name), **GROUP_HP[1]})
    for k in range(1, 4):
        ga, gb = _split_setup(backend, seed=k)
        grads = [ga, gb] if grads_form == "trees" else [{"params": ga}, {"params": gb, "lr": 9.0}]
        opt.step(grads)
        opt_a.step(ga)
        opt_b.step(gb)
    assert opt.param_groups[1]["lr"] == 0.02
    for x, y in zip([tree_a["w"], *tree_b], [sep_a["w"], *sep_b], strict=True):
        assert np.array_equal(to_np(x), to_np(y))
    assert not np.array_equal(to_np(tree_a["w"]), to_np(_split_setup(backend)[0]["w"]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grads_form", ["trees", "group-dicts"])
def test_groups_equal_separate_optimizers_functional(name, grads_form):
    factory, _ = polyopt.OPTIMIZERS[name]
    tree_a, tree_b = _split_setup("numpy")
    groups = [{"params": tree_a, **GROUP_HP[0]}, {"params": tree_b, **GROUP_HP[1]}]
    opt = factory(**_hp(name))
    fa, fb = factory(**{**_hp(name), **GROUP_HP[0]}), factory(**{**_hp(name), **GROUP_HP[1]})
    state, sa, sb = opt.init(groups), fa.init(tree_a), fb.init(tree_b)
    pa, pb = tree_a, tree_b
    for k in range(1, 4):
        ga, gb = _split_setup("numpy", seed=k)
        grads = [ga, gb] if grads_form == "trees" else [{"params": ga}, {"params": gb}]
        groups, state = opt.update(groups, grads, state)
        pa, sa = fa.update(pa, ga, sa)
        pb, sb = fb.update(pb, gb, sb)
    assert np.array_equal(groups[0]["params"]["w"], pa["w"])
    for x, y in zip(groups[1]["params"], pb, strict=True):
        assert np.array_equal(x, y)


def test_group_overrides_matter():
    """Control for the two tests above: a group's override changes its result."""
    tree_a, tree_b = _split_setup("numpy")
    same_a, _ = _split_setup("numpy")
    ga, gb = _split_setup("numpy", seed=1)
    polyopt.AdamW([{"params": tree_a, "weight_decay": 0.5}, {"params": tree_b}], lr=0.1).step(
        [ga, gb]
    )
    polyopt.AdamW([{"params": same_a}, {"params": _split_setup("numpy")[1]}], lr=0.1).step([ga, gb])
    assert not np.array_equal(tree_a["w"], same_a["w"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_group_lr_takes_effect_next_step(backend):
    tree_a, tree_b = _split_setup(backend)
    a0, b0 = to_np(tree_a["w"]), [to_np(x) for x in tree_b]
    opt = polyopt.SGD([{"params": tree_a}, {"params": tree_b}], lr=0.1)
    g1, g2 = _split_setup(backend, 1), _split_setup(backend, 2)
    opt.step(list(g1))
    opt.param_groups[0]["lr"] = 0.5
    opt.step(list(g2))
    expected_a = a0 - 0.1 * to_np(g1[0]["w"]) - 0.5 * to_np(g2[0]["w"])
    np.testing.assert_allclose(to_np(tree_a["w"]), expected_a, rtol=1e-14, atol=1e-15)
    for x, x0, h1, h2 in zip(tree_b, b0, g1[1], g2[1], strict=True):  # group 1 keeps lr = 0.1
        np.testing.assert_allclose(
            to_np(x), x0 - 0.1 * to_np(h1) - 0.1 * to_np(h2), rtol=1e-14, atol=1e-15
        )


def test_changing_lr_without_groups_takes_effect_next_step():
    w = np.array([1.0, 2.0])
    opt = polyopt.SGD(w, lr=0.1)
    opt.step(np.array([1.0, 1.0]))
    opt.param_groups[0]["lr"] = 0.25
    opt.param_groups[0]["weight_decay"] = 0.5
    opt.step(np.array([1.0, 1.0]))
    p1 = np.array([0.9, 1.9])
    np.testing.assert_allclose(w, p1 - 0.25 * (1.0 + 0.5 * p1), rtol=1e-15)


def test_single_group_grads_as_list_of_trees():
    w, b = np.ones(3), np.ones(2)
    opt = polyopt.sgd(lr=0.5)
    groups = [{"params": [w, b]}]
    new, _ = opt.update(groups, [[np.ones(3), np.ones(2)]], opt.init(groups))
    assert np.array_equal(new[0]["params"][0], np.full(3, 0.5))


def test_single_group_grads_as_plain_tree_and_group_dict():
    w, b = np.ones(3), np.ones(2)
    opt = polyopt.sgd(lr=0.5)
    groups = [{"params": [w, b]}]
    a, _ = opt.update(groups, [np.ones(3), np.ones(2)], opt.init(groups))
    c, _ = opt.update(groups, [{"params": [np.ones(3), np.ones(2)]}], opt.init(groups))
    for out in (a, c):
        assert np.array_equal(out[0]["params"][0], np.full(3, 0.5))
        assert np.array_equal(out[0]["params"][1], np.full(2, 0.5))
