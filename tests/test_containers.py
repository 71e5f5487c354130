"""Params in whatever container the user has, returned in the same type.

- Iterators: ``model.parameters()`` and ``model.named_parameters()`` (names kept for
  checkpoints as ``param_names``), generators, ``dict.values()``; sets are refused
  (their order changes from run to run).
- NamedTuple, OrderedDict (its own key order, as JAX), defaultdict: the same type back,
  with the values of the plain dict / tuple form.
- ``None`` is an empty subtree, as in JAX.
- For JAX arrays, any registered pytree: flax ``nnx.State``, a dataclass registered
  with ``jax.tree_util``, a custom node, optax's ``MaskedNode``; eagerly and under
  ``jax.jit``.
- Parameter groups keep keys that are not hyperparameters (``initial_lr``, ``max_lr``,
  names) and the math ignores them.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import numpy as np
import pytest

import polyopt


class Pair(NamedTuple):
    w: np.ndarray
    b: np.ndarray


def _sgd_step(p, g, lr=0.1):
    return p - lr * g


# -- iterators -------------------------------------------------------------------------------


def test_model_parameters_generator():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    ref = torch.nn.Linear(3, 2).double()
    ref.load_state_dict(model.state_dict())
    opt = polyopt.AdamW(model.parameters(), lr=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    x = torch.randn(8, 3, dtype=torch.float64)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            m.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_named_parameters_keep_their_names():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = polyopt.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3)
    model(x).sum().backward()
    w0 = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(model[0].weight.detach(), w0)  # the module's own tensors
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    assert [name for name, _ in opt.params] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    # a grad missing in a named list names the param
    bad = [(n, p.grad) for n, p in model.named_parameters()]
    bad[1] = ("0.bias", torch.ones(7))
    with pytest.raises(ValueError, match=r"grads\[1\] \('0\.bias'\) has shape \(7,\)"):
        opt.step(bad)


def test_named_parameters_in_groups():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    decay = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [(n, p) for n, p in model.named_parameters() if n.endswith("bias")]
    opt = polyopt.AdamW(
        [{"params": iter(decay)}, {"params": iter(no_decay), "weight_decay": 0.0}], lr=0.1
    )
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    groups = opt.state_dict()["param_groups"]
    assert groups[0]["param_names"] == ["weight"] and groups[1]["param_names"] == ["bias"]
    assert groups[1]["weight_decay"] == 0.0


def test_generators_and_dict_values():
    def gen():
        yield np.ones(3)
        yield np.zeros(2)

    opt = polyopt.SGD(gen(), lr=0.1)
    opt.step([np.ones(3), np.ones(2)])
    np.testing.assert_allclose(opt.params[1], -0.1)
    d = {"a": np.ones(2), "b": np.ones(1)}
    opt2 = polyopt.SGD(d.values(), lr=0.5)
    opt2.step([np.ones(2), np.ones(1)])
    np.testing.assert_allclose(d["a"], 0.5)  # the dict's own arrays, in place
    f = polyopt.sgd(lr=0.1)
    state = f.init(x for x in [np.ones(2)])
    new, _ = f.update([np.ones(2)], (g for g in [np.ones(2)]), state)
    np.testing.assert_allclose(new[0], 0.9)


@pytest.mark.parametrize("form", ["stateful", "functional"])
def test_sets_are_refused(form):
    params = {np.float64(1.0)}  # any set: the order would change from run to run
    with pytest.raises(TypeError, match=r"params must be an ordered collection.*set"):
        if form == "stateful":
            polyopt.SGD(params)
        else:
            polyopt.sgd().init(params)


# -- container types -------------------------------------------------------------------------

CONTAINERS = {
    "namedtuple": lambda a, b: Pair(a, b),
    "ordereddict": lambda a, b: collections.OrderedDict([("z", a), ("a", b)]),
    "defaultdict": lambda a, b: collections.defaultdict(list, {"z": a, "a": b}),
    "nested": lambda a, b: {"layer": Pair(a, b), "extra": None},
}


@pytest.mark.parametrize("kind", list(CONTAINERS))
def test_the_same_container_type_comes_back(kind):
    make = CONTAINERS[kind]
    p = make(np.array([1.0, 2.0]), np.array([3.0]))
    g = make(np.array([0.5, 0.5]), np.array([1.0]))
    opt = polyopt.sgd(lr=0.1)
    new, state = opt.update(p, g, opt.init(p))
    assert type(new) is type(p)
    if kind == "ordereddict":
        assert list(new) == ["z", "a"]  # its own order, kept
    if kind == "nested":
        assert type(new["layer"]) is Pair and new["extra"] is None
        new_w = new["layer"].w
    else:
        new_w = new[0] if kind == "namedtuple" else new["z"]
    np.testing.assert_allclose(new_w, [0.95, 1.95])
    # stateful: the user's arrays updated in place, the structure kept
    s = polyopt.SGD(p, lr=0.1)
    s.step(g)
    assert s.params is p


def test_ordereddict_leaves_follow_its_own_order_like_jax():
    jax = pytest.importorskip("jax")
    od = collections.OrderedDict([("z", np.ones(2)), ("a", np.ones(3))])
    opt = polyopt.adam()
    state = opt.init(od)
    order = [x.shape for x in jax.tree_util.tree_leaves(od)]
    assert [a.shape for a in state.slots["exp_avg"]] == order == [(2,), (3,)]


def test_none_is_an_empty_subtree():
    p = {"w": np.ones(2), "b": None}
    opt = polyopt.adam(lr=0.1)
    state = opt.init(p)
    assert len(state.slots["exp_avg"]) == 1
    new, _ = opt.update(p, {"w": np.ones(2), "b": None}, state)
    assert new["b"] is None and new["w"].shape == (2,)
    with pytest.raises(ValueError, match=r"grads\['b'\] does not match.*expected None"):
        opt.update(p, {"w": np.ones(2), "b": np.ones(1)}, state)


# -- JAX pytrees ------------------------------------------------------------------------------


@pytest.fixture
def jax():
    return pytest.importorskip("jax")


def _jax_trees(jax):
    jnp = jax.numpy

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Layer:
        w: jax.Array
        b: jax.Array

    class Box:  # a custom node, registered by hand
        def __init__(self, x, label):
            self.x, self.label = x, label

    jax.tree_util.register_pytree_node(
        Box, lambda b: ((b.x,), b.label), lambda label, kids: Box(kids[0], label)
    )
    optax = pytest.importorskip("optax")
    trees = {
        "dataclass": lambda a, b: Layer(a, b),
        "custom-node": lambda a, b: [Box(a, "first"), Box(b, "second")],
        "masked-node": lambda a, b: {"w": a, "b": b, "frozen": optax.MaskedNode()},
        "dict-of-dataclass": lambda a, b: {"layer": Layer(a, b)},
    }
    return trees, jnp


@pytest.mark.parametrize("kind", ["dataclass", "custom-node", "masked-node", "dict-of-dataclass"])
@pytest.mark.parametrize("jit", [False, True])
def test_registered_jax_pytrees(jax, kind, jit):
    trees, jnp = _jax_trees(jax)
    make = trees[kind]
    a, b = jnp.asarray([1.0, 2.0]), jnp.asarray([3.0])
    p, g = make(a, b), make(jnp.full(2, 0.5), jnp.ones(1))
    opt = polyopt.sgd(lr=0.1, momentum=0.9)
    update = jax.jit(opt.update) if jit else opt.update
    new, state = update(p, g, opt.init(p))
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(p)
    leaves = jax.tree_util.tree_leaves(new)
    expected = [
        _sgd_step(x, y)
        for x, y in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(g), strict=True)
    ]
    for x, y in zip(leaves, expected, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    # the stateful form holds the new tree, same type
    s = polyopt.SGD(p, lr=0.1)
    s.step(g)
    assert type(s.params) is type(p)


def test_flax_nnx_state(jax):
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree_util.tree_map(lambda x: x * 0 + 1.0, params)
    opt = polyopt.adamw(lr=0.1, weight_decay=0.0)
    new, state = jax.jit(opt.update)(params, grads, opt.init(params))
    assert type(new) is type(params)
    kernel = jax.tree_util.tree_leaves(new)[1]
    np.testing.assert_allclose(kernel, jax.tree_util.tree_leaves(params)[1] - 0.1, rtol=1e-5)
    nnx.update(model, new)  # and it goes back into the model
    np.testing.assert_allclose(np.asarray(model.kernel[...]), kernel)


def test_grads_that_do_not_match_a_jax_pytree(jax):
    trees, jnp = _jax_trees(jax)
    p = trees["dataclass"](jnp.ones(2), jnp.ones(1))
    opt = polyopt.sgd()
    with pytest.raises(ValueError, match=r"grads does not match the structure of params"):
        opt.update(p, {"w": jnp.ones(2), "b": jnp.ones(1)}, opt.init(p))


def test_a_missing_grad_inside_a_jax_pytree(jax):
    trees, jnp = _jax_trees(jax)
    p = trees["dataclass"](jnp.ones(2), jnp.ones(1))
    g = trees["dataclass"](jnp.ones(2), None)
    opt = polyopt.adam(lr=0.1)
    new, state = opt.update(p, g, opt.init(p))
    np.testing.assert_array_equal(new.b, p.b)
    assert state.counts.tolist() == [1, 0] or list(state.counts) == [1, 0]


# -- param groups' own keys ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["stateful", "functional"])
def test_param_groups_keep_keys_that_are_not_hyperparameters(form):
    a, b = np.ones(3), np.ones(2)
    extra = {"initial_lr": 0.1, "max_lr": 1.0, "name": "head", "lr": 0.1}
    groups = [{"params": [a]}, {"params": [b], **extra}]
    grads = [[np.ones(3)], [np.ones(2)]]
    if form == "stateful":
        opt = polyopt.SGD(groups, lr=0.1)
        opt.step(grads)
        assert {k: opt.param_groups[1][k] for k in extra} == extra
        sd = opt.state_dict()
        assert sd["param_groups"][1]["name"] == "head"
        opt.load_state_dict(sd)
        assert opt.param_groups[1]["max_lr"] == 1.0
        out = b
    else:
        opt = polyopt.sgd(lr=0.1)
        new, _ = opt.update(groups, grads, opt.init(groups))
        assert {k: new[1][k] for k in extra} == extra
        out = new[1]["params"][0]
    np.testing.assert_allclose(out, 0.9)  # the extra keys changed nothing


def test_a_typo_in_the_factory_is_still_an_error():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'weight_decy'"):
        polyopt.adamw(weight_decy=0.1)
