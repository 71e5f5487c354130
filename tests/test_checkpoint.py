"""Checkpoints of the stateful optimizers: ``state_dict()`` / ``load_state_dict()``.

- ``state_dict()`` is a snapshot: it shares no memory with the live optimizer, in
  either direction, and neither does a loaded dict afterwards.
- Resuming is exact: N steps, save, M more steps, versus a fresh optimizer on fresh
  arrays (copies of the checkpoint-time params) that loads the checkpoint and runs the
  same M steps: bit-identical params and state, for every optimizer and several options,
  on NumPy and torch, directly and through pickle.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import polyopt
from polyopt import testing

torch = pytest.importorskip("torch")

BACKENDS = ("numpy", "torch")
NAMES = testing.NAMES  # every optimizer the shared problems run (not Muon)

# each optimizer's rows of the case table with every state slot: with numbers, and with
# schedules (step-count dependence)
CASES = [
    pytest.param(c.name, testing.polyopt_hyperparams(c), id=c.id) for c in testing.CASES if c.tags
]


def _stateful_cfg(name):
    """A configuration with every state slot, for the snapshot tests."""
    return testing.polyopt_hyperparams(testing.richest(name))


SHAPES = {"w": (3, 4), "b": (4,), "z": (2,)}


def _array(backend, x):
    return torch.tensor(x) if backend == "torch" else np.array(x)


def to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


def make_params(backend, seed=0):
    rng = np.random.default_rng(seed)
    return {k: _array(backend, rng.standard_normal(s)) for k, s in SHAPES.items()}


def make_grads(backend, k):
    rng = np.random.default_rng(1000 + k)
    return {key: _array(backend, rng.standard_normal(s)) for key, s in SHAPES.items()}


def copy_params(params, backend):
    return {k: _array(backend, to_np(v)) for k, v in params.items()}


def state_arrays(sd):
    return {(i, n): to_np(a) for i, slots in sd["state"].items() for n, a in slots.items()}


def assert_sd_equal(a, b):
    assert a["step"] == b["step"]
    assert a["param_groups"] == b["param_groups"]
    sa, sb = state_arrays(a), state_arrays(b)
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype
        assert np.array_equal(sa[key], sb[key]), key


def deep_copy_sd(sd):
    return copy.deepcopy(sd)


# -- snapshot semantics -------------------------------------------------------------------


def _fill(x, value):
    if isinstance(x, torch.Tensor):
        x.fill_(value)
    else:
        x[...] = value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_not_changed_by_the_optimizer(name, backend):
    _, cls = polyopt.OPTIMIZERS[name]
    opt = cls(make_params(backend), **_stateful_cfg(name))
    for k in range(3):
        opt.step(make_grads(backend, k))
    sd = opt.state_dict()
    frozen = state_arrays(sd)
    groups = copy.deepcopy(sd["param_groups"])
    assert frozen, "this configuration must have state"

    # mutate the live state in place, change hyperparameters, keep stepping
    for arrays in opt.state.slots.values():
        for a in arrays:
            if a is not None:  # None: an array without this slot (Rule.layout)
                _fill(a, 0.5)
    opt.param_groups[0]["lr"] = 0.5
    for k in range(3, 5):
        opt.step(make_grads(backend, k))

    assert sd["step"] == 3
    assert sd["param_groups"] == groups
    now = state_arrays(sd)
    for key in frozen:
        assert np.array_equal(now[key], frozen[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_modifying_the_state_dict_does_not_change_the_optimizer(name, backend):
    _, cls = polyopt.OPTIMIZERS[name]
    opt = cls(make_params(backend), **_stateful_cfg(name))
    for k in range(2):
        opt.step(make_grads(backend, k))
    reference = deep_copy_sd(opt.state_dict())

    sd = opt.state_dict()
    for slots in sd["state"].values():
        for a in slots.values():
            _fill(a, -7.0)
    sd["param_groups"][0]["lr"] = 9.0
    sd["step"] = 99
    assert_sd_equal(opt.state_dict(), reference)
    assert opt.param_groups[0]["lr"] == reference["param_groups"][0]["lr"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_loaded_dict_stays_independent(name, backend):
    _, cls = polyopt.OPTIMIZERS[name]
    donor = cls(make_params(backend), **_stateful_cfg(name))
    for k in range(2):
        donor.step(make_grads(backend, k))
    sd = donor.state_dict()
    opt = cls(make_params(backend, seed=1), **_stateful_cfg(name))
    opt.load_state_dict(sd)
    loaded = deep_copy_sd(opt.state_dict())

    for slots in sd["state"].values():  # the dict that was loaded, changed afterwards
        for a in slots.values():
            _fill(a, 5.0)
    sd["param_groups"][0]["lr"] = 3.0
    assert_sd_equal(opt.state_dict(), loaded)

    opt.step(make_grads(backend, 2))  # stepping the loader does not change the dict
    for slots in sd["state"].values():
        for a in slots.values():
            assert np.all(to_np(a) == 5.0)


# -- exact resume ----------------------------------------------------------------------------

N, M = 3, 4


def _run_and_resume(name, hp, backend, via_pickle=False):
    _, cls = polyopt.OPTIMIZERS[name]
    params = make_params(backend)
    opt = cls(params, **hp)
    for k in range(N):
        opt.step(make_grads(backend, k))
    sd = opt.state_dict()
    at_checkpoint = copy_params(params, backend)
    if via_pickle:
        sd = pickle.loads(pickle.dumps(sd))

    continued = []
    for k in range(N, N + M):
        opt.step(make_grads(backend, k))
        continued.append({key: to_np(v) for key, v in params.items()})

    # a fresh optimizer, built with other hyperparameter values on purpose: the state dict
    # must bring back the saved ones
    fresh_params = at_checkpoint
    fresh = cls(fresh_params, **{**hp, "lr": 0.123})
    fresh.load_state_dict(sd)
    assert fresh.step_count == N
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    resumed = []
    for k in range(N, N + M):
        fresh.step(make_grads(backend, k))
        resumed.append({key: to_np(v) for key, v in fresh_params.items()})

    for k, (a, b) in enumerate(zip(continued, resumed, strict=True)):
        for key in a:
            assert a[key].dtype == b[key].dtype
            assert np.array_equal(a[key], b[key]), (k, key)
    assert_sd_equal(opt.state_dict(), fresh.state_dict())
    return continued


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "hp"), CASES)
def test_resume_is_bit_identical(name, hp, backend):
    continued = _run_and_resume(name, hp, backend)
    # the run actually moved the params (a checkpoint test on a frozen model proves nothing)
    assert not np.array_equal(continued[0]["w"], continued[-1]["w"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "hp"), CASES)
def test_resume_through_pickle(name, hp, backend):
    _run_and_resume(name, hp, backend, via_pickle=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_resume_needs_the_step_count(name, backend):
    """Control: dropping the step count from the checkpoint changes the trajectory for
    optimizers whose update depends on it (bias correction / first-step momentum), so the
    resume test above can tell a restored step count from a lost one."""
    _, cls = polyopt.OPTIMIZERS[name]
    hp = dict(lr=0.1, momentum=0.9, dampening=0.5) if name == "sgd" else dict(lr=0.01)
    params = make_params(backend)
    opt = cls(params, **hp)
    for k in range(N):
        opt.step(make_grads(backend, k))
    sd = opt.state_dict()
    fresh_params = copy_params(params, backend)
    opt.step(make_grads(backend, N))
    sd["step"] = 0
    fresh = cls(fresh_params, **hp)
    fresh.load_state_dict(sd)
    fresh.step(make_grads(backend, N))
    assert not np.array_equal(to_np(params["w"]), to_np(fresh_params["w"]))


def _groups(backend, seed=0):
    p = make_params(backend, seed)
    return [
        {"params": {"w": p["w"]}, "weight_decay": 0.2},
        {"params": [p["b"], p["z"]], "weight_decay": 0.0, "lr": 0.02},
    ]


def _group_grads(backend, k):
    g = make_grads(backend, k)
    return [{"w": g["w"]}, [g["b"], g["z"]]]


def _group_values(groups):
    return [to_np(groups[0]["params"]["w"]), *(to_np(x) for x in groups[1]["params"])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_param_group_hyperparameters_are_restored(name, backend):
    _, cls = polyopt.OPTIMIZERS[name]
    groups = _groups(backend)
    opt = cls(groups, **_stateful_cfg(name))
    for k in range(N):
        opt.step(_group_grads(backend, k))
    opt.param_groups[0]["lr"] = 0.05  # changed live, as a scheduler would
    opt.param_groups[1]["weight_decay"] = 0.3
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    fresh_groups = _groups(backend)
    for mine, theirs in zip(
        fresh_groups, groups, strict=True
    ):  # fresh arrays with the checkpoint values
        if isinstance(mine["params"], dict):
            mine["params"] = {k: _array(backend, to_np(v)) for k, v in theirs["params"].items()}
        else:
            mine["params"] = [_array(backend, to_np(v)) for v in theirs["params"]]

    fresh = cls(fresh_groups, **_stateful_cfg(name))  # group 0's lr is the default here
    assert fresh.param_groups[0]["lr"] != 0.05
    fresh.load_state_dict(sd)
    for g_fresh, g_saved in zip(fresh.param_groups, opt.param_groups, strict=True):
        assert {k: v for k, v in g_fresh.items() if k != "params"} == {
            k: v for k, v in g_saved.items() if k != "params"
        }
    # the params in the groups are still the fresh optimizer's own arrays
    assert fresh.param_groups[0]["params"]["w"] is fresh_groups[0]["params"]["w"]

    for k in range(N, N + M):
        opt.step(_group_grads(backend, k))
        fresh.step(_group_grads(backend, k))
    for a, b in zip(_group_values(groups), _group_values(fresh_groups), strict=True):
        assert np.array_equal(a, b)
    assert_sd_equal(opt.state_dict(), fresh.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_layout(backend):
    """torch's layout: leaves numbered across groups; group entries list their indices."""
    opt = polyopt.AdamW(_groups(backend), lr=0.01)
    opt.step(_group_grads(backend, 0))
    sd = opt.state_dict()
    assert sd["step"] == 1 and isinstance(sd["step"], int)
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1, 2]]
    assert sd["param_groups"][0]["weight_decay"] == 0.2
    assert sd["param_groups"][1]["lr"] == 0.02
    assert set(sd["state"]) == {0, 1, 2}
    assert set(sd["state"][1]) == {"exp_avg", "exp_avg_sq"}
    # the first moment after one step is (1 - beta1) g
    g = _group_grads(backend, 0)[1][0]
    np.testing.assert_allclose(to_np(sd["state"][1]["exp_avg"]), 0.1 * to_np(g), rtol=1e-12)
    kind = torch.Tensor if backend == "torch" else np.ndarray
    assert all(isinstance(a, kind) for s in sd["state"].values() for a in s.values())


def test_torch_checkpoint_loads_into_numpy_optimizer():
    """A checkpoint is just arrays: one saved from torch tensors restores a NumPy optimizer
    to the same trajectory (float64 everywhere)."""
    hp = dict(lr=0.01, amsgrad=True)
    tp = make_params("torch")
    t_opt = polyopt.Adam(tp, **hp)
    for k in range(N):
        t_opt.step(make_grads("torch", k))
    sd = t_opt.state_dict()
    sd_np = {
        **sd,
        "state": {i: {n: to_np(a) for n, a in s.items()} for i, s in sd["state"].items()},
    }
    np_params = {k: to_np(v) for k, v in tp.items()}
    n_opt = polyopt.Adam(np_params, **hp)
    n_opt.load_state_dict(sd_np)
    for k in range(N, N + M):
        t_opt.step(make_grads("torch", k))
        n_opt.step(make_grads("numpy", k))
    for key in SHAPES:
        np.testing.assert_allclose(np_params[key], to_np(tp[key]), rtol=1e-13, atol=1e-15)
