"""EMA of parameters against the closed form computed here:

    avg_0 = p_0,    avg_n = d^n p_0 + (1 - d) Σ_{i=1..n} d^(n-i) p_i

plus in-place ``copy_to`` (NumPy, torch), purity of the functional ``ema``, the decay
check, and state_dict round trips.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import polyopt

torch = pytest.importorskip("torch")

SHAPES = {"w": (3, 2), "b": (2,)}


def to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


def _array(backend, x):
    return torch.tensor(x) if backend == "torch" else np.array(x)


def snapshots(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(n + 1)]


def closed_form(ps, d):
    n = len(ps) - 1
    out = {}
    for k in ps[0]:
        acc = d**n * ps[0][k]
        for i in range(1, n + 1):
            acc = acc + (1 - d) * d ** (n - i) * ps[i][k]
        out[k] = acc
    return out


def as_backend(tree, backend):
    return {k: _array(backend, v) for k, v in tree.items()}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("decay", [0.0, 0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("n", [1, 7])
def test_stateful_ema_closed_form(decay, n, backend):
    ps = snapshots(n)
    params = as_backend(ps[0], backend)
    ema = polyopt.EMA(params, decay=decay)
    assert ema.count == 0 and ema.decay == decay
    for p in ps[1:]:
        for k in params:  # the model's arrays change in place between updates, as in training
            if backend == "torch":
                params[k].copy_(torch.tensor(p[k]))
            else:
                params[k][...] = p[k]
        ema.update(params)
    assert ema.count == n
    expected = closed_form(ps, decay)
    for k in SHAPES:
        got = to_np(ema.averaged[k])
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, expected[k], rtol=1e-12, atol=1e-14)


def test_ema_starts_as_a_copy():
    w = np.array([1.0, 2.0])
    ema = polyopt.EMA(w, decay=0.5)
    w[...] = 100.0  # the model moves; the average must not have moved with it
    assert np.array_equal(ema.averaged, [1.0, 2.0])
    ema.update(w)
    np.testing.assert_allclose(ema.averaged, [50.5, 51.0], rtol=1e-15)


def test_ema_of_list_and_nested_structures():
    ps = snapshots(4, seed=3)
    trees = [[p["w"], {"b": p["b"]}] for p in ps]
    t0 = trees[0]
    ema = polyopt.EMA([t0[0].copy(), {"b": t0[1]["b"].copy()}], 0.8)
    for t in trees[1:]:
        ema.update(t)
    avg = ema.averaged
    assert isinstance(avg, list) and isinstance(avg[1], dict) and list(avg[1]) == ["b"]
    expected = closed_form(ps, 0.8)
    np.testing.assert_allclose(avg[0], expected["w"], rtol=1e-12)
    np.testing.assert_allclose(avg[1]["b"], expected["b"], rtol=1e-12)


def test_ema_float32_stays_float32():
    ps = snapshots(5, seed=4)
    ps32 = [{k: v.astype(np.float32) for k, v in p.items()} for p in ps]
    ema = polyopt.EMA({k: v.copy() for k, v in ps32[0].items()}, 0.9)
    for p in ps32[1:]:
        ema.update(p)
    expected = closed_form([{k: v.astype(np.float64) for k, v in p.items()} for p in ps32], 0.9)
    for k in SHAPES:
        assert ema.averaged[k].dtype == np.float32
        np.testing.assert_allclose(ema.averaged[k], expected[k], rtol=2e-6, atol=1e-6)


# -- functional ------------------------------------------------------------------------------


def test_functional_ema_is_pure_and_matches_closed_form():
    ps = snapshots(6, seed=1)
    e = polyopt.ema(0.75)
    first = {k: v.copy() for k, v in ps[0].items()}
    state = e.init(first)
    assert state.count == 0
    # init copies: changing the params does not change the state
    first["w"][...] = 0.0
    np.testing.assert_array_equal(state.averaged["w"], ps[0]["w"])

    states = [state]
    for p in ps[1:]:
        p_copy = {k: v.copy() for k, v in p.items()}
        before = {k: v.copy() for k, v in states[-1].averaged.items()}
        new = e.update(p_copy, states[-1])
        for k in p:  # inputs untouched
            np.testing.assert_array_equal(p_copy[k], p[k])
            np.testing.assert_array_equal(states[-1].averaged[k], before[k])
            assert new.averaged[k] is not states[-1].averaged[k]
            assert not np.shares_memory(new.averaged[k], p_copy[k])
        states.append(new)
    assert [s.count for s in states] == list(range(len(ps)))
    for j, s in enumerate(states):  # every intermediate state has its own closed form
        expected = closed_form(ps[: j + 1], 0.75)
        for k in SHAPES:
            np.testing.assert_allclose(s.averaged[k], expected[k], rtol=1e-12, atol=1e-14)


def test_functional_ema_torch_is_pure():
    ps = snapshots(2, seed=2)
    e = polyopt.ema(0.5)
    p0 = {k: torch.tensor(v) for k, v in ps[0].items()}
    state = e.init(p0)
    p1 = {k: torch.tensor(v) for k, v in ps[1].items()}
    new = e.update(p1, state)
    for k in SHAPES:
        assert torch.equal(state.averaged[k], torch.tensor(ps[0][k]))
        assert torch.equal(p1[k], torch.tensor(ps[1][k]))
        np.testing.assert_allclose(
            to_np(new.averaged[k]), 0.5 * ps[0][k] + 0.5 * ps[1][k], rtol=1e-15
        )
        assert state.averaged[k].data_ptr() != p0[k].data_ptr()


def test_ema_update_with_other_structure_raises():
    ema = polyopt.EMA({"w": np.ones(3)}, 0.9)
    with pytest.raises(ValueError, match=r"params.*\['v'\]"):
        ema.update({"v": np.ones(3)})
    with pytest.raises(ValueError, match=r"params\['w'\] has shape \(4,\)"):
        ema.update({"w": np.ones(4)})
    assert ema.count == 0


# -- copy_to -----------------------------------------------------------------------------------


def test_copy_to_numpy_in_place():
    ps = snapshots(3, seed=5)
    model = {k: v.copy() for k, v in ps[0].items()}
    ema = polyopt.EMA(model, 0.6)
    for p in ps[1:]:
        ema.update(p)
    ids = {k: id(v) for k, v in model.items()}
    out = ema.copy_to(model)
    assert out is model
    assert {k: id(v) for k, v in model.items()} == ids
    expected = closed_form(ps, 0.6)
    for k in SHAPES:
        np.testing.assert_allclose(model[k], expected[k], rtol=1e-12)
        assert not np.shares_memory(model[k], ema.averaged[k])
    # the average is not aliased into the model: changing the model leaves the EMA alone
    model["w"][...] = 0.0
    np.testing.assert_allclose(ema.averaged["w"], expected["w"], rtol=1e-12)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_copy_to_torch_in_place(requires_grad):
    ps = snapshots(3, seed=6)

    def tensor(x):
        t = torch.tensor(x)
        return torch.nn.Parameter(t) if requires_grad else t

    model = {k: tensor(v) for k, v in ps[0].items()}
    ema = polyopt.EMA(model, 0.6)
    for p in ps[1:]:
        ema.update({k: torch.tensor(v) for k, v in p.items()})
    objs = dict(model)
    out = ema.copy_to(model)
    assert out is model
    expected = closed_form(ps, 0.6)
    for k in SHAPES:
        assert model[k] is objs[k]
        assert model[k].requires_grad is requires_grad
        assert model[k].grad_fn is None
        np.testing.assert_allclose(to_np(model[k]), expected[k], rtol=1e-12)
        assert model[k].data_ptr() != ema.averaged[k].data_ptr()


# -- decay -------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [-0.1, 1.5, 1.0000001, float("nan")])
@pytest.mark.parametrize("form", ["EMA", "ema"])
def test_decay_outside_unit_interval(decay, form):
    rx = r"decay.*" + ("nan" if decay != decay else repr(decay).replace(".", r"\."))
    with pytest.raises(ValueError, match=rx):
        if form == "EMA":
            polyopt.EMA(np.ones(2), decay)
        else:
            polyopt.ema(decay)


@pytest.mark.parametrize("decay", ["0.9", None, True])
def test_decay_not_a_number(decay):
    with pytest.raises(TypeError, match=r"decay.*" + repr(decay).replace(".", r"\.")):
        polyopt.EMA(np.ones(2), decay)


# -- state_dict -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("via_pickle", [False, True])
def test_state_dict_round_trip(backend, via_pickle):
    ps = snapshots(8, seed=7)
    ema = polyopt.EMA(as_backend(ps[0], backend), 0.8)
    for p in ps[1:5]:
        ema.update(as_backend(p, backend))
    sd = ema.state_dict()
    if via_pickle:
        sd = pickle.loads(pickle.dumps(sd))
    saved = copy.deepcopy(sd)

    other = polyopt.EMA(as_backend(snapshots(0, seed=99)[0], backend), 0.1)
    other.load_state_dict(sd)
    assert other.decay == 0.8 and other.count == 4
    for p in ps[5:]:
        ema.update(as_backend(p, backend))
        other.update(as_backend(p, backend))
    expected = closed_form(ps, 0.8)
    for k in SHAPES:
        assert np.array_equal(to_np(other.averaged[k]), to_np(ema.averaged[k]))
        np.testing.assert_allclose(to_np(other.averaged[k]), expected[k], rtol=1e-12)
    assert other.count == ema.count == 8
    # the loaded dict was copied in: nothing the EMA did since changed it
    for a, b in zip(sd["averaged"], saved["averaged"], strict=True):
        assert np.array_equal(to_np(a), to_np(b))


def test_state_dict_is_a_snapshot():
    ema = polyopt.EMA({"w": np.zeros(2)}, 0.5)
    sd = ema.state_dict()
    ema.update({"w": np.ones(2)})
    assert sd["count"] == 0
    np.testing.assert_array_equal(sd["averaged"][0], [0.0, 0.0])
    sd["averaged"][0][...] = 7.0
    np.testing.assert_array_equal(ema.averaged["w"], [0.5, 0.5])


def test_load_state_dict_bad_decay_raises_naming_decay():
    ema = polyopt.EMA({"w": np.zeros(2)}, 0.5)
    sd = ema.state_dict()
    sd["decay"] = 2.0
    with pytest.raises(ValueError, match=r"decay.*2\.0"):
        ema.load_state_dict(sd)
    assert ema.decay == 0.5


def test_load_state_dict_wrong_shape_raises():
    ema = polyopt.EMA({"w": np.zeros(2)}, 0.5)
    sd = ema.state_dict()
    sd["averaged"] = [np.zeros(3)]
    with pytest.raises(ValueError, match=r"averaged.*\(3,\)"):
        ema.load_state_dict(sd)
    np.testing.assert_array_equal(ema.averaged["w"], [0.0, 0.0])


def test_load_state_dict_bad_count_changes_nothing():
    ema = polyopt.EMA({"w": np.zeros(2)}, 0.5)
    sd = ema.state_dict()
    sd["decay"] = 0.9
    sd["count"] = "three"
    with pytest.raises(ValueError, match=r"count.*'three'"):
        ema.load_state_dict(sd)
    assert ema.decay == 0.5 and ema.count == 0


def test_load_state_dict_negative_count_raises():
    ema = polyopt.EMA({"w": np.zeros(2)}, 0.5)
    sd = ema.state_dict()
    sd["count"] = -5
    with pytest.raises(ValueError, match=r"count.*-5"):
        ema.load_state_dict(sd)
    assert ema.count == 0
