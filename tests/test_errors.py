"""Bad input: a clear exception naming the argument and the value received, raised before
anything changes (DESIGN.md, "Errors").

Every check is run in both forms (``polyopt.adamw(...)`` and ``polyopt.AdamW(params, ...)``)
for every optimizer where it applies. The atomicity tests make a stateful ``step`` or a
``load_state_dict`` fail on its *last* piece of input, then check that params (same objects,
bit-identical values), state, hyperparameters and step count are exactly as before, and
that the next good step equals that of an optimizer that never saw the bad call.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest

import polyopt
from polyopt import testing

torch = pytest.importorskip("torch")

NAMES = testing.NAMES  # every optimizer the shared problems run (not Muon)
FORMS = ("factory", "class")
NAN = float("nan")


def _having(hp: str) -> tuple[str, ...]:
    """The optimizers whose rule has hyperparameter ``hp``."""
    return tuple(n for n in NAMES if hp in polyopt.OPTIMIZERS[n][0]().rule.defaults)


WITH_EPS = _having("eps")
WITH_BETAS = _having("betas")
WITH_AMSGRAD = _having("amsgrad")
WITH_DECOUPLED = _having("decoupled_weight_decay")
WITH_MAXIMIZE = _having("maximize")  # schedule-free AdamW has none


def _schedulable(name: str) -> str:
    """The hyperparameter a schedule test drives: ``lr`` where the rule lets it be a
    schedule, else the rule's first schedulable one (schedule-free AdamW: weight_decay)."""
    schedulable = polyopt.OPTIMIZERS[name][0]().rule.schedulable
    return "lr" if "lr" in schedulable else schedulable[0]


def cfg(name: str) -> dict:
    """The optimizer's row of the case table that keeps every state slot (so that a
    wrongly committed step or load would show in the state) and uses most of its
    options, plain numbers only."""
    return testing.polyopt_hyperparams(testing.richest(name))


def _v(value) -> str:
    """The value as it appears in the message (its repr), escaped for a regex."""
    return re.escape(repr(value))


def construct(name, form, params, **hp):
    """Build the optimizer in one form; the factory form also runs ``init``."""
    factory, cls = polyopt.OPTIMIZERS[name]
    if form == "factory":
        return factory(**hp).init(params)
    return cls(params, **hp)


def run_update(name, form, params, grads, **hp):
    """One update in one form with the optimizer's test configuration."""
    factory, cls = polyopt.OPTIMIZERS[name]
    hp = {**cfg(name), **hp}
    if form == "factory":
        opt = factory(**hp)
        state = opt.init(params)
        return opt.update(params, grads, state)
    opt = cls(params, **hp)
    opt.step(grads)
    return opt


def to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


def assert_state_dict_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert a["step"] == b["step"]
    assert len(a["param_groups"]) == len(b["param_groups"])
    for ga, gb in zip(a["param_groups"], b["param_groups"], strict=True):
        assert ga == gb
    assert set(a["state"]) == set(b["state"])
    for i in a["state"]:
        assert set(a["state"][i]) == set(b["state"][i])
        for name in a["state"][i]:
            x, y = to_np(a["state"][i][name]), to_np(b["state"][i][name])
            assert x.dtype == y.dtype and x.shape == y.shape
            assert np.array_equal(x, y), (i, name)


def _ones(n, dtype=np.float64):
    return np.ones(n, dtype=dtype)


# -- hyperparameters ------------------------------------------------------------------------

# (optimizers it applies to, hyperparameters, exception, regex naming argument and value)
BAD_HP = [
    (NAMES, {"lr": -1.0}, ValueError, r"\blr\b.*" + _v(-1.0)),
    (NAMES, {"lr": NAN}, ValueError, r"\blr\b.*nan"),
    (NAMES, {"lr": -3}, ValueError, r"\blr\b.*-3"),
    (NAMES, {"lr": "0.1"}, TypeError, r"\blr\b.*" + _v("0.1")),
    (NAMES, {"lr": True}, TypeError, r"\blr\b.*True"),
    (NAMES, {"weight_decay": -0.5}, ValueError, r"weight_decay.*" + _v(-0.5)),
    (NAMES, {"weight_decay": NAN}, ValueError, r"weight_decay.*nan"),
    (WITH_MAXIMIZE, {"maximize": 1}, TypeError, r"maximize.*\b1\b"),
    (WITH_MAXIMIZE, {"maximize": "yes"}, TypeError, r"maximize.*'yes'"),
    (NAMES, {"foo": 1}, TypeError, r"\bfoo\b"),
    (NAMES, {"impl": "cuda"}, ValueError, r"impl.*'cuda'"),
    (NAMES, {"impl": None}, ValueError, r"impl.*None"),
    (WITH_EPS, {"eps": -1e-3}, ValueError, r"\beps\b.*" + _v(-1e-3)),
    (WITH_EPS, {"eps": NAN}, ValueError, r"\beps\b.*nan"),
    (WITH_BETAS, {"betas": (1.0, 0.999)}, ValueError, r"betas\[0\].*" + _v(1.0)),
    (WITH_BETAS, {"betas": (-0.1, 0.999)}, ValueError, r"betas\[0\].*" + _v(-0.1)),
    (WITH_BETAS, {"betas": (NAN, 0.999)}, ValueError, r"betas\[0\].*nan"),
    (WITH_BETAS, {"betas": (0.9, 1.0)}, ValueError, r"betas\[1\].*" + _v(1.0)),
    (WITH_BETAS, {"betas": (0.9, 1.5)}, ValueError, r"betas\[1\].*" + _v(1.5)),
    (WITH_BETAS, {"betas": (0.9, -1e-3)}, ValueError, r"betas\[1\].*" + _v(-1e-3)),
    (WITH_BETAS, {"betas": (0.9,)}, ValueError, r"betas.*" + _v((0.9,))),
    (
        WITH_BETAS,
        {"betas": (0.9, 0.99, 0.999)},
        ValueError,
        r"betas.*" + _v((0.9, 0.99, 0.999)),
    ),
    (WITH_BETAS, {"betas": 0.9}, ValueError, r"betas.*" + _v(0.9)),
    (WITH_AMSGRAD, {"amsgrad": 1}, TypeError, r"amsgrad.*\b1\b"),
    (WITH_AMSGRAD, {"amsgrad": None}, TypeError, r"amsgrad.*None"),
    (
        WITH_DECOUPLED,
        {"decoupled_weight_decay": 0},
        TypeError,
        r"decoupled_weight_decay.*\b0\b",
    ),
    (("sgd",), {"momentum": -0.9}, ValueError, r"momentum.*" + _v(-0.9)),
    (("sgd",), {"momentum": NAN}, ValueError, r"momentum.*nan"),
    (("sgd",), {"dampening": -0.1}, ValueError, r"dampening.*" + _v(-0.1)),
    (("sgd",), {"nesterov": True}, ValueError, r"nesterov.*momentum=0"),
    (
        ("sgd",),
        {"nesterov": True, "momentum": 0.9, "dampening": 0.5},
        ValueError,
        r"nesterov.*dampening=0\.5",
    ),
    (("sgd",), {"nesterov": "yes"}, TypeError, r"nesterov.*'yes'"),
    (("sgd",), {"momentum": lambda k: 0.9}, TypeError, r"momentum.*schedule"),
    (("rmsprop",), {"momentum": -0.5}, ValueError, r"momentum.*" + _v(-0.5)),
    (("rmsprop",), {"alpha": 1.5}, ValueError, r"alpha.*" + _v(1.5)),
    (("rmsprop",), {"alpha": -0.01}, ValueError, r"alpha.*" + _v(-0.01)),
    (("rmsprop",), {"alpha": NAN}, ValueError, r"alpha.*nan"),
    (("rmsprop",), {"centered": 1}, TypeError, r"centered.*\b1\b"),
    (("rmsprop",), {"alpha": lambda k: 0.9}, TypeError, r"alpha.*schedule"),
    (("adagrad",), {"lr_decay": -0.1}, ValueError, r"lr_decay.*" + _v(-0.1)),
    (("adagrad",), {"lr_decay": NAN}, ValueError, r"lr_decay.*nan"),
    (
        ("adagrad",),
        {"initial_accumulator_value": -1.0},
        ValueError,
        r"initial_accumulator_value.*" + _v(-1.0),
    ),
    (("adadelta",), {"rho": 1.01}, ValueError, r"\brho\b.*" + _v(1.01)),
    (("adadelta",), {"rho": -0.5}, ValueError, r"\brho\b.*" + _v(-0.5)),
    (("adadelta",), {"rho": NAN}, ValueError, r"\brho\b.*nan"),
]


def _id(v) -> str:
    """A test id that is the same in every process (a lambda's repr holds an address)."""
    return "schedule" if callable(v) else repr(v)


HP_CASES = [
    pytest.param(name, hp, exc, rx, id=f"{name}-{'-'.join(f'{k}={_id(v)}' for k, v in hp.items())}")
    for names, hp, exc, rx in BAD_HP
    for name in names
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("name", "hp", "exc", "rx"), HP_CASES)
def test_bad_hyperparameter(name, hp, exc, rx, form):
    with pytest.raises(exc, match=rx):
        construct(name, form, [_ones(3)], **hp)


# Edge values that are valid must be accepted (so the checks above are not simply
# rejecting everything near a boundary).
GOOD_EDGES = {
    "sgd": [dict(lr=0.0), dict(momentum=0.0, dampening=0.0), dict(momentum=1.0, nesterov=True)],
    "adagrad": [dict(lr=0.0, lr_decay=0.0, initial_accumulator_value=0.0, eps=0.0)],
    "rmsprop": [dict(alpha=0.0), dict(alpha=1.0, momentum=0.0, eps=0.0)],
    "adadelta": [dict(rho=0.0), dict(rho=1.0)],
    "adam": [dict(betas=(0.0, 0.0)), dict(betas=[0.5, 0.5], eps=0.0, weight_decay=0.0)],
    "adamw": [dict(betas=(0.0, 0.0), weight_decay=0.0, lr=0.0)],
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("name", "hp"), [(n, hp) for n, hps in GOOD_EDGES.items() for hp in hps], ids=str
)
def test_valid_edge_values_are_accepted(name, hp, form):
    opt = construct(name, form, [_ones(3)], **hp)
    assert opt is not None


# (id, optimizers it applies to, group override, exception, regex)
BAD_GROUP_HP = [
    ("lr", NAMES, {"lr": -1.0}, ValueError, r"\blr\b.*" + _v(-1.0) + r".*param group 1"),
    ("weight_decay", NAMES, {"weight_decay": NAN}, ValueError, r"weight_decay.*nan.*param group 1"),
    ("flag", WITH_MAXIMIZE, {"maximize": "no"}, TypeError, r"maximize.*'no'.*param group 1"),
    ("str", NAMES, {"lr": "0.1"}, TypeError, r"\blr\b.*str.*'0\.1'.*param group 1"),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("override", "exc", "rx", "name"),
    [
        pytest.param(override, exc, rx, name, id=f"{key}-{name}")
        for key, names, override, exc, rx in BAD_GROUP_HP
        for name in names
    ],
)
def test_bad_hyperparameter_in_param_group(name, form, override, exc, rx):
    groups = [{"params": [_ones(3)]}, {"params": [_ones(2)], **override}]
    with pytest.raises(exc, match=rx):
        construct(name, form, groups)


@pytest.mark.parametrize("name", NAMES)
def test_bad_param_group_given_to_update(name):
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**cfg(name))
    a, b = _ones(3), _ones(2)
    state = opt.init([{"params": [a]}, {"params": [b]}])
    with pytest.raises(ValueError, match=r"\blr\b.*" + _v(-2.0) + r".*param group 1"):
        opt.update([{"params": [a]}, {"params": [b], "lr": -2.0}], [[a], [b]], state)


# -- params -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("empty", [[], {}, (), [[], {}], {"a": []}], ids=repr)
def test_empty_params(name, form, empty):
    with pytest.raises(ValueError, match=r"params.*empty"):
        construct(name, form, empty)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_empty_param_group(name, form):
    with pytest.raises(ValueError, match=r"params.*empty"):
        construct(name, form, [{"params": []}])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("params", "rx"),
    [
        ([_ones(3), 1.5], r"params\[1\] is not an array.*float.*1\.5"),
        ({"w": _ones(3), "b": "x"}, r"params\['b'\] is not an array.*str"),
        ("abc", r"params.*str.*'abc'"),
        ([1.0, 2.0], r"params.*float"),
        ([_ones(3), [_ones(2), object()]], r"params\[1\]\[1\] is not an array.*object"),
    ],
    ids=["float", "str-in-dict", "str", "floats", "object"],
)
def test_non_array_leaves(name, form, params, rx):
    with pytest.raises(TypeError, match=rx):
        construct(name, form, params)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "make",
    [
        lambda: [_ones(3), np.arange(3)],
        lambda: np.ones(3, dtype=np.int32),
        lambda: [torch.ones(3, dtype=torch.float64), torch.arange(3)],
        lambda: np.ones(3, dtype=bool),
    ],
    ids=["numpy-int64", "numpy-int32", "torch-int64", "numpy-bool"],
)
def test_non_floating_params(name, form, make):
    params = make()
    bad = params[-1] if isinstance(params, list) else params
    with pytest.raises(TypeError, match=r"params.*" + re.escape(str(bad.dtype).split(".")[-1])):
        construct(name, form, params)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_params_from_two_libraries(name, form):
    params = [_ones(3), torch.ones(3, dtype=torch.float64)]
    with pytest.raises(TypeError, match=r"params.*numpy.*torch"):
        construct(name, form, params)


# -- grads ------------------------------------------------------------------------------------


def _dict_params():
    return {"a": _ones(3), "b": _ones(2)}


def _list_params():
    return [_ones(3), _ones(2)]


GRAD_CASES = {
    "missing-key": (_dict_params, lambda: {"a": _ones(3)}, ValueError, r"grads.*\['a'\]"),
    "extra-key": (
        _dict_params,
        lambda: {"a": _ones(3), "b": _ones(2), "c": _ones(1)},
        ValueError,
        r"grads.*'c'",
    ),
    "list-for-dict": (_dict_params, lambda: [_ones(3), _ones(2)], ValueError, r"grads.*list"),
    "too-short": (_list_params, lambda: [_ones(3)], ValueError, r"grads.*length 1"),
    "too-long": (
        _list_params,
        lambda: [_ones(3), _ones(2), _ones(2)],
        ValueError,
        r"grads.*length 3",
    ),
    "extra-nesting": (
        _list_params,
        lambda: [[_ones(3)], _ones(2)],
        ValueError,
        r"grads\[0\].*list",
    ),
    "missing-nesting": (
        lambda: {"x": [_ones(3), _ones(2)]},
        lambda: {"x": _ones(3)},
        ValueError,
        r"grads\['x'\].*ndarray",
    ),
    "list-for-array": (lambda: _ones(3), lambda: [_ones(3)], ValueError, r"grads.*list"),
    "shape": (_list_params, lambda: [_ones(4), _ones(2)], ValueError, r"grads\[0\].*\(4,\)"),
    "shape-2d": (
        _list_params,
        lambda: [_ones(3), np.ones((2, 1))],
        ValueError,
        r"grads\[1\].*\(2, 1\)",
    ),
    "dtype": (
        _list_params,
        lambda: [_ones(3), _ones(2, np.float32)],
        ValueError,
        r"grads\[1\].*float32",
    ),
    "torch-grads": (
        _list_params,
        lambda: [torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)],
        TypeError,
        r"grads.*numpy.*torch",
    ),
    "one-torch-grad": (
        _list_params,
        lambda: [_ones(3), torch.ones(2, dtype=torch.float64)],
        TypeError,
        r"grads.*numpy.*torch",
    ),
    "float-leaf": (_list_params, lambda: [_ones(3), 2.5], TypeError, r"grads.*float.*2\.5"),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_bad_grads(name, form, case):
    make_params, make_grads, exc, rx = GRAD_CASES[case]
    with pytest.raises(exc, match=rx):
        run_update(name, form, make_params(), make_grads())


@pytest.mark.parametrize("name", NAMES)
def test_none_grads_functional(name):
    with pytest.raises(ValueError, match=r"grads.*None"):
        run_update(name, "factory", _list_params(), None)


@pytest.mark.parametrize("name", NAMES)
def test_no_grads_for_numpy_params(name):
    _, cls = polyopt.OPTIMIZERS[name]
    opt = cls(_list_params(), **cfg(name))
    with pytest.raises(ValueError, match=r"grads.*\.grad"):
        opt.step()
    with pytest.raises(ValueError, match=r"grads.*\.grad"):
        opt.step(None)
    assert opt.step_count == 0


@pytest.mark.parametrize("name", NAMES)
def test_torch_param_without_grad_is_skipped(name):
    # as torch.optim: a param whose .grad is None is left alone (tests/test_missing_grads.py
    # holds the values to torch's)
    _, cls = polyopt.OPTIMIZERS[name]
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    w.grad = torch.ones(3, dtype=torch.float64)  # b has no .grad
    opt = cls([w, b], **cfg(name))
    opt.step()
    opt.step()  # two steps: schedule-free AdamW's warmup does not move z on the first
    assert not torch.equal(w.detach(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(b.detach(), torch.ones(2, dtype=torch.float64))


# -- state ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_state_for_fewer_params(name):
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**cfg(name))
    state = opt.init([_ones(3), _ones(2)])
    with pytest.raises(ValueError, match=r"state slot '\w+' holds 2 arrays but params has 1"):
        opt.update([_ones(3)], [_ones(3)], state)


def _same_slots(name: str, a: tuple, b: tuple) -> bool:
    """Whether params of shapes ``a`` and ``b`` have the same slots (Adafactor factors
    matrices, not vectors: a state for the other layout is a different error)."""
    opt = polyopt.OPTIMIZERS[name][0](**cfg(name))
    hp = {**opt.rule.defaults, **opt.hyperparams}
    sa, sb = opt.rule.slot_shapes(a, hp), opt.rule.slot_shapes(b, hp)
    return {k for k, v in sa.items() if v is not None} == {
        k for k, v in sb.items() if v is not None
    }


# a state made for the first shape broadcasts against params of the second: without a
# check the state would silently broadcast
_BROADCASTING = [((3,), (2, 3)), ((1, 3), (2, 3))]


@pytest.mark.parametrize(
    ("name", "made_for", "shape"),
    [
        pytest.param(n, a, b, id=f"{n}-{a}-{b}")
        for n in NAMES
        for a, b in _BROADCASTING
        if _same_slots(n, a, b)
    ],
)
def test_state_for_other_shapes(name, made_for, shape):
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**cfg(name))
    state = opt.init([np.ones(made_for)])
    hp = {**opt.rule.defaults, **opt.hyperparams}
    have, need = opt.rule.slot_shapes(made_for, hp), opt.rule.slot_shapes(shape, hp)
    wrong = {str(have[k]) for k in have if have[k] is not None and have[k] != need[k]}
    assert wrong  # the state's own shapes the message must name
    with pytest.raises(ValueError, match=r"state.*(" + "|".join(map(re.escape, wrong)) + ")"):
        opt.update([np.ones(shape)], [np.ones(shape)], state)


@pytest.mark.parametrize("name", NAMES)
def test_state_for_other_dtype(name):
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**cfg(name))
    state = opt.init([_ones(3, np.float32)])
    with pytest.raises(ValueError, match=r"state.*float32"):
        opt.update([_ones(3)], [_ones(3)], state)


@pytest.mark.parametrize(
    ("name", "init_hp", "rx"),
    [
        ("sgd", dict(momentum=0.0, nesterov=False), r"state.*momentum_buffer"),
        ("rmsprop", dict(centered=False), r"state.*grad_avg"),
        ("rmsprop", dict(momentum=0.0), r"state.*momentum_buffer"),
        ("adam", dict(amsgrad=False), r"state.*max_exp_avg_sq"),
        ("adamw", dict(amsgrad=False), r"state.*max_exp_avg_sq"),
    ],
)
def test_state_made_with_other_options(name, init_hp, rx):
    factory, _ = polyopt.OPTIMIZERS[name]
    state = factory(**{**cfg(name), **init_hp}).init([_ones(3)])
    with pytest.raises(ValueError, match=rx):
        factory(**cfg(name)).update([_ones(3)], [_ones(3)], state)


@pytest.mark.parametrize("name", NAMES)
def test_state_not_an_optstate(name):
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**cfg(name))
    with pytest.raises(TypeError, match=r"state.*dict"):
        opt.update([_ones(3)], [_ones(3)], {"step": 0, "slots": ()})


@pytest.mark.parametrize(
    ("init_amsgrad", "update_amsgrad", "rx"),
    [
        (
            (True, False),
            (True, True),
            r"state.slots\['max_exp_avg_sq'\]\[1\] is None, but the hyperparameters of "
            r"params\[1\]\['params'\]\[0\]",
        ),
        ((True, False), (False, True), r"state.slots\['max_exp_avg_sq'\]\[0\] is an array, but"),
    ],
)
def test_state_made_with_other_options_in_one_group(init_amsgrad, update_amsgrad, rx):
    """Slots used by one group only hold None for the other group's arrays."""
    opt = polyopt.adam(lr=0.01)

    def groups(amsgrad):
        return [
            {"params": [_ones(3)], "amsgrad": amsgrad[0]},
            {"params": [_ones(2)], "amsgrad": amsgrad[1]},
        ]

    state = opt.init(groups(init_amsgrad))
    assert state.slots["max_exp_avg_sq"][1] is None
    with pytest.raises(ValueError, match=rx):
        opt.update(groups(update_amsgrad), [[_ones(3)], [_ones(2)]], state)


@pytest.mark.parametrize("name", NAMES)
def test_state_in_the_per_array_layout(name):
    """A state whose slots are one dict per array (not {name: tuple}) is refused."""
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**cfg(name))
    state = opt.init([_ones(3)])
    per_array = polyopt.OptState(state.step, tuple(state.per_array(1)))
    with pytest.raises(TypeError, match=r"state\.slots.*dict.*tuple"):
        opt.update([_ones(3)], [_ones(3)], per_array)


# -- atomicity of step -----------------------------------------------------------------------

BACKENDS = ("numpy", "torch")
SHAPES = [(3,), (2, 2), (4,)]


def _array(backend, x):
    return torch.tensor(x) if backend == "torch" else np.array(x)


def _params(backend, seed=0):
    rng = np.random.default_rng(seed)
    return [_array(backend, rng.standard_normal(s)) for s in SHAPES]


def _grads(backend, k):
    rng = np.random.default_rng(100 + k)
    return [_array(backend, rng.standard_normal(s)) for s in SHAPES]


def _other(backend, x):
    return np.array(x) if backend == "torch" else torch.tensor(x)


def _bad_last(kind, backend, grads):
    last = to_np(grads[-1])
    *first, _ = grads
    return {
        "shape": first + [_array(backend, np.ones(5))],
        "dtype": first + [_array(backend, last.astype(np.float32))],
        "int-dtype": first + [_array(backend, np.ones(4, dtype=np.int64))],
        "other-library": first + [_other(backend, last)],
        "nested": first + [[grads[-1]]],
        "non-array": first + [3.0],
        "too-long": grads + [_array(backend, np.ones(4))],
    }[kind]


BAD_LAST_KINDS = (
    "shape",
    "dtype",
    "int-dtype",
    "other-library",
    "nested",
    "non-array",
    "too-long",
)


def _snapshot(opt, params):
    return [to_np(p) for p in params], opt.state_dict(), opt.step_count


def _assert_unchanged(opt, params, snap):
    values, sd, count = snap
    assert opt.step_count == count
    current = opt.params
    if isinstance(current[0], dict):  # param groups
        current = [p for g in current for p in g["params"]]
    assert len(current) == len(params)
    for mine, orig, v in zip(current, params, values, strict=True):
        assert mine is orig  # the user's very objects, not replaced
        got = to_np(orig)
        assert got.dtype == v.dtype and np.array_equal(got, v)  # bit-identical
    assert_state_dict_equal(opt.state_dict(), sd)


def _assert_same_params(params_a, params_b):
    for a, b in zip(params_a, params_b, strict=True):
        assert np.array_equal(to_np(a), to_np(b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", BAD_LAST_KINDS)
def test_failed_step_changes_nothing(name, backend, kind):
    _, cls = polyopt.OPTIMIZERS[name]
    params, ref_params = _params(backend), _params(backend)
    opt, ref = cls(params, **cfg(name)), cls(ref_params, **cfg(name))
    for k in range(3):
        opt.step(_grads(backend, k))
        ref.step(_grads(backend, k))
    snap = _snapshot(opt, params)

    with pytest.raises((ValueError, TypeError), match=r"grads"):
        opt.step(_bad_last(kind, backend, _grads(backend, 3)))

    _assert_unchanged(opt, params, snap)
    opt.step(_grads(backend, 3))
    ref.step(_grads(backend, 3))
    _assert_same_params(params, ref_params)
    assert_state_dict_equal(opt.state_dict(), ref.state_dict())


def _group_params(backend, seed=0):
    a, b, c = _params(backend, seed)
    return [{"params": [a, b]}, {"params": [c], "lr": 0.05}]


def _flat(groups):
    return [p for g in groups for p in g["params"]]


def _group_grads(backend, k):
    ga, gb, gc = _grads(backend, k)
    return [[ga, gb], [gc]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_failed_step_bad_live_group_hyperparameter(name, backend):
    _, cls = polyopt.OPTIMIZERS[name]
    groups, ref_groups = _group_params(backend), _group_params(backend)
    opt, ref = cls(groups, **cfg(name)), cls(ref_groups, **cfg(name))
    for k in range(2):
        opt.step(_group_grads(backend, k))
        ref.step(_group_grads(backend, k))
    params = _flat(groups)
    snap = _snapshot(opt, params)

    opt.param_groups[1]["lr"] = -0.5  # the last group is bad; group 0 would be updated first
    with pytest.raises(ValueError, match=r"\blr\b.*" + _v(-0.5) + r".*param group 1"):
        opt.step(_group_grads(backend, 2))
    opt.param_groups[1]["lr"] = 0.05

    _assert_unchanged(opt, params, snap)
    opt.step(_group_grads(backend, 2))
    ref.step(_group_grads(backend, 2))
    _assert_same_params(params, _flat(ref_groups))
    assert_state_dict_equal(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_failed_step_schedule_goes_negative_in_last_group(name, backend):
    """A schedule of the last group gives a negative lr at step 2: group 0 has already been
    computed when the error is found; nothing may be written."""
    _, cls = polyopt.OPTIMIZERS[name]
    hp = _schedulable(name)

    def bad_after_two(k):
        return 0.05 if k < 2 else -0.25

    groups = _group_params(backend)
    groups[1][hp] = bad_after_two
    ref_groups = _group_params(backend)  # same as groups up to step 2, hp constant 0.05
    ref_groups[1][hp] = 0.05
    opt, ref = cls(groups, **cfg(name)), cls(ref_groups, **cfg(name))
    for k in range(2):
        opt.step(_group_grads(backend, k))
        ref.step(_group_grads(backend, k))
    params = _flat(groups)
    snap = _snapshot(opt, params)

    with pytest.raises(ValueError, match=rf"\b{hp}\b.*" + _v(-0.25)):
        opt.step(_group_grads(backend, 2))

    _assert_unchanged(opt, params, snap)
    opt.param_groups[1][hp] = 0.05
    opt.step(_group_grads(backend, 2))
    ref.step(_group_grads(backend, 2))
    _assert_same_params(params, _flat(ref_groups))


@pytest.mark.parametrize("name", NAMES)
def test_failed_update_does_not_touch_inputs(name):
    factory, _ = polyopt.OPTIMIZERS[name]
    opt = factory(**cfg(name))
    params = _params("numpy")
    state = opt.init(params)
    params, state = opt.update(params, _grads("numpy", 0), state)
    before_p = [p.copy() for p in params]
    # None: an array without this slot (Rule.layout)
    before_s = {
        name: [None if v is None else v.copy() for v in arrays]
        for name, arrays in state.slots.items()
    }
    with pytest.raises(ValueError):
        opt.update(params, _bad_last("shape", "numpy", _grads("numpy", 1)), state)
    for p, q in zip(params, before_p, strict=True):
        assert np.array_equal(p, q)
    assert set(state.slots) == set(before_s)
    for name, arrays in state.slots.items():
        for a, b in zip(arrays, before_s[name], strict=True):
            assert (a is None and b is None) if a is None or b is None else np.array_equal(a, b)
    assert state.step == 1


# -- atomicity of load_state_dict ----------------------------------------------------------


def _last_slot(sd):
    last = max(sd["state"])
    return last, sorted(sd["state"][last])[0]


def _bad_shape(sd):
    i, s = _last_slot(sd)
    sd["state"][i][s] = sd["state"][i][s][:2]  # (4,) -> (2,)


def _bad_dtype(sd):
    i, s = _last_slot(sd)
    x = sd["state"][i][s]
    sd["state"][i][s] = x.to(torch.float32) if isinstance(x, torch.Tensor) else x.astype(np.float32)


def _missing_slot(sd):
    i, s = _last_slot(sd)
    del sd["state"][i][s]


def _extra_slot(sd):
    i, s = _last_slot(sd)
    sd["state"][i]["bogus"] = sd["state"][i][s]


def _missing_entry(sd):
    del sd["state"][max(sd["state"])]


def _extra_entry(sd):
    sd["state"][max(sd["state"]) + 1] = sd["state"][0]


def _assign(path, value):
    def f(sd):
        d = sd
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value

    return f


def _delete(key):
    def f(sd):
        del sd[key]

    return f


BAD_LOADS = {
    "wrong-shape": (_bad_shape, ValueError, r"state_dict\['state'\]\[2\].*\(2,\)"),
    "wrong-dtype": (_bad_dtype, ValueError, r"state_dict\['state'\]\[2\].*float32"),
    "missing-slot": (_missing_slot, ValueError, r"state_dict\['state'\]\[2\]"),
    "extra-slot": (_extra_slot, ValueError, r"state_dict\['state'\]\[2\].*bogus"),
    "missing-entry": (_missing_entry, ValueError, r"state_dict\['state'\].*\b2\b"),
    "extra-entry": (_extra_entry, ValueError, r"state_dict\['state'\].*\b4\b"),
    "missing-step": (_delete("step"), ValueError, r"state_dict.*keys"),
    "missing-state": (_delete("state"), ValueError, r"state_dict.*keys"),
    "extra-key": (_assign(["bogus"], 1), ValueError, r"state_dict.*bogus"),
    "negative-step": (_assign(["step"], -1), ValueError, r"step.*-1"),
    "float-step": (_assign(["step"], 2.5), ValueError, r"step.*2\.5"),
    "one-group": (lambda sd: sd["param_groups"].pop(), ValueError, r"state_dict.*\b1 param group"),
    "three-groups": (
        lambda sd: sd["param_groups"].append(dict(sd["param_groups"][1])),
        ValueError,
        r"state_dict.*\b3 param group",
    ),
    "group-size": (
        _assign(["param_groups", 0, "params"], [0]),
        ValueError,
        r"param_groups'\]\[0\]\['params'\] must list the 2 params.*got 1",
    ),
    "bad-hyperparameter": (
        _assign(["param_groups", 1, "lr"], -1.0),
        ValueError,
        r"\blr\b.*" + _v(-1.0),
    ),
    "str-hyperparameter": (_assign(["param_groups", 1, "lr"], "0.1"), TypeError, r"\blr\b.*str"),
    "not-a-dict": (lambda sd: None, TypeError, r"state_dict must be a dict.*got list"),
    # what a JSON round trip (or a hand edit) does to a checkpoint
    "string-keys": (
        lambda sd: sd.update(state={str(k): v for k, v in sd["state"].items()}),
        ValueError,
        r"state_dict\['state'\] keys must be the ints 0\.\.2, got '0'.*JSON",
    ),
    "lists-for-arrays": (
        lambda sd: sd["state"][1].update({n: to_np(a).tolist() for n, a in sd["state"][1].items()}),
        TypeError,
        r"state_dict\['state'\]\[1\]\['\w+'\] must be an array, got list",
    ),
    "group-not-a-dict": (
        _assign(["param_groups", 1], [2]),
        TypeError,
        r"state_dict\['param_groups'\]\[1\] must be a dict, got list",
    ),
    "groups-not-a-list": (
        _assign(["param_groups"], "groups"),
        TypeError,
        r"state_dict\['param_groups'\] must be a list of dicts, got str",
    ),
    "state-not-a-dict": (
        _assign(["state"], [1, 2, 3]),
        TypeError,
        r"state_dict\['state'\] must be a dict",
    ),
    "entry-not-a-dict": (
        _assign(["state", 0], 3.0),
        TypeError,
        r"state_dict\['state'\]\[0\] must be a dict",
    ),
    "bad-param-step": (
        _assign(["state", 0, "step"], 99),
        ValueError,
        r"state_dict\['state'\]\[0\]\['step'\] must be an int in \[0, 5\], got 99",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", list(BAD_LOADS))
def test_failed_load_state_dict_changes_nothing(name, backend, bad):
    _, cls = polyopt.OPTIMIZERS[name]
    groups, ref_groups = _group_params(backend), _group_params(backend)
    opt, ref = cls(groups, **cfg(name)), cls(ref_groups, **cfg(name))
    for k in range(2):
        opt.step(_group_grads(backend, k))
        ref.step(_group_grads(backend, k))

    # a donor whose state, step and group-0 lr all differ: a partial load would show
    donor = cls(_group_params(backend, seed=7), **cfg(name))
    for k in range(5):
        donor.step(_group_grads(backend, 10 + k))
    donor.param_groups[0]["lr"] = 0.2
    sd = copy.deepcopy(donor.state_dict())
    corrupt, exc, rx = BAD_LOADS[bad]
    if bad == "not-a-dict":
        sd = [sd]
    else:
        corrupt(sd)

    params = _flat(groups)
    snap = _snapshot(opt, params)
    lr0 = opt.param_groups[0]["lr"]
    with pytest.raises(exc, match=rx):
        opt.load_state_dict(sd)

    _assert_unchanged(opt, params, snap)
    assert opt.param_groups[0]["lr"] == lr0
    opt.step(_group_grads(backend, 2))
    ref.step(_group_grads(backend, 2))
    _assert_same_params(params, _flat(ref_groups))
    assert_state_dict_equal(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_good_load_does_change_things(name, backend):
    """Control for the test above: the uncorrupted donor dict does load (so each failure
    above comes from its corruption)."""
    _, cls = polyopt.OPTIMIZERS[name]
    groups = _group_params(backend)
    opt = cls(groups, **cfg(name))
    opt.step(_group_grads(backend, 0))
    donor = cls(_group_params(backend, seed=7), **cfg(name))
    for k in range(5):
        donor.step(_group_grads(backend, 10 + k))
    donor.param_groups[0]["lr"] = 0.2
    opt.load_state_dict(copy.deepcopy(donor.state_dict()))
    assert opt.step_count == 5
    assert opt.param_groups[0]["lr"] == 0.2
    assert_state_dict_equal(opt.state_dict(), donor.state_dict())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_infinite_lr(name, form):
    # -inf is as bad as a negative number; +inf is not a usable learning rate either
    with pytest.raises(ValueError, match=r"\blr\b.*-inf"):
        construct(name, form, [_ones(3)], lr=-math.inf)
    with pytest.raises(ValueError, match=r"\blr\b.*inf"):
        construct(name, form, [_ones(3)], lr=math.inf)


# -- schedules that misbehave ---------------------------------------------------------------

BAD_SCHEDULE_VALUES = {
    "inf": (math.inf, ValueError, r"lr schedule gave inf at step 2.*finite and >= 0"),
    "nan": (NAN, ValueError, r"lr schedule gave nan at step 2"),
    "negative": (-0.5, ValueError, r"lr schedule gave -0\.5 at step 2"),
    "str": ("0.1", TypeError, r"lr schedule gave '0\.1' at step 2.*real number"),
    "None": (None, TypeError, r"lr schedule gave None at step 2"),
    "list": ([0.1], TypeError, r"lr schedule gave \[0\.1\] at step 2"),
}


def _bad_at_two(value):
    return lambda k: value if k == 2 else 0.01


# the JAX step-count path is the same for every optimizer: two of them run it
_SCHEDULE_RUNS = [(n, b) for n in NAMES for b in ("numpy", "torch")] + [
    ("sgd", "jax-eager"),
    ("adam", "jax-eager"),
]


@pytest.mark.parametrize(("name", "backend"), _SCHEDULE_RUNS)
@pytest.mark.parametrize("bad", list(BAD_SCHEDULE_VALUES))
def test_a_schedule_that_gives_a_bad_value(name, backend, bad):
    value, exc, rx = BAD_SCHEDULE_VALUES[bad]
    factory, cls = polyopt.OPTIMIZERS[name]
    if backend == "jax-eager":  # the functional form: the step count is a JAX array
        jnp = pytest.importorskip("jax").numpy
        if bad in ("str", "None", "list"):
            rx = rx.replace("real number", "real number or a 0-d array")

        def sched(k):
            return value if int(k) == 2 else 0.01

        opt = factory(lr=sched)
        params = [jnp.ones(3)]
        state = opt.init(params)
        for _ in range(2):
            params, state = opt.update(params, [jnp.ones(3)], state)
        with pytest.raises(exc, match=rx):
            opt.update(params, [jnp.ones(3)], state)
        return
    lib = torch if backend == "torch" else np
    params = [lib.ones(3, dtype=lib.float64)]
    hp = _schedulable(name)  # the message names it
    rx = rx.replace("lr schedule", f"{hp} schedule")
    opt = cls(params, **{hp: _bad_at_two(value)})
    for _ in range(2):
        opt.step([lib.ones(3, dtype=lib.float64)])
    before = to_np(params[0])
    with pytest.raises(exc, match=rx):
        opt.step([lib.ones(3, dtype=lib.float64)])
    assert np.array_equal(to_np(params[0]), before) and opt.step_count == 2


def test_a_schedule_that_gives_nan_under_jit_gives_nan():
    # under jax.jit the value is traced: nothing can be checked (as in optax); documented
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    opt = polyopt.sgd(lr=lambda k: jnp.where(k == 1, jnp.nan, 0.1))
    params = [jnp.ones(2)]
    state = opt.init(params)
    step = jax.jit(opt.update)
    params, state = step(params, [jnp.ones(2)], state)
    params, state = step(params, [jnp.ones(2)], state)
    assert bool(jnp.isnan(params[0]).all())


# -- OptState.step and counts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "exc", "rx"),
    [
        (-1, ValueError, r"state\.step must be an int >= 0, got -1"),
        (True, TypeError, r"state\.step must be an int >= 0, got True"),
        (1.5, TypeError, r"state\.step must be an int >= 0.*1\.5"),
        (None, TypeError, r"state\.step must be an int >= 0, got None"),
        ("3", TypeError, r"state\.step must be an int >= 0.*'3'"),
        (np.asarray(-2), ValueError, r"state\.step must be >= 0, got -2"),
        (np.asarray(1.0), TypeError, r"state\.step must be an int"),
    ],
    ids=["negative", "bool", "float", "None", "str", "negative-array", "float-array"],
)
@pytest.mark.parametrize("name", NAMES)
def test_functional_step_count_is_validated(name, step, exc, rx):
    opt = polyopt.OPTIMIZERS[name][0]()
    state = opt.init([_ones(3)])
    with pytest.raises(exc, match=rx):
        opt.update([_ones(3)], [_ones(3)], state._replace(step=step))


@pytest.mark.parametrize(
    ("counts", "exc", "rx"),
    [
        ((1,), ValueError, r"state\.counts holds 1 counts but params has 2"),
        ((1, 9), ValueError, r"state\.counts\[1\] must be an int in \[0, state\.step\], got 9"),
        ((1, -1), ValueError, r"state\.counts\[1\].*-1"),
        ((1, 1.0), ValueError, r"state\.counts\[1\].*1\.0"),
        ("11", TypeError, r"state\.counts must be None, a tuple of 2 ints"),
    ],
    ids=["short", "above-step", "negative", "float", "str"],
)
def test_functional_counts_are_validated(counts, exc, rx):
    opt = polyopt.adam()
    params = [_ones(3), _ones(2)]
    state = opt.init(params)
    params, state = opt.update(params, [_ones(3), _ones(2)], state)
    with pytest.raises(exc, match=rx):
        opt.update(params, [_ones(3), _ones(2)], state._replace(counts=counts))


# -- sparse gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["explicit", "dot-grad"])
@pytest.mark.parametrize("name", NAMES)
def test_sparse_torch_grads_are_a_clear_error(name, how):
    w = torch.nn.Parameter(torch.ones(4, 2, dtype=torch.float64))
    sparse = torch.sparse_coo_tensor(
        [[0, 2]], torch.ones(2, 2, dtype=torch.float64), (4, 2), check_invariants=True
    )
    opt = polyopt.OPTIMIZERS[name][1]([w], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\]|grads\[0\] is a sparse tensor.*sparse_coo"):
        if how == "explicit":
            opt.step([sparse])
        else:
            w.grad = sparse
            opt.step()
    assert torch.equal(w.detach(), torch.ones(4, 2, dtype=torch.float64))
    # and the way out the message gives works
    opt.step([sparse.to_dense()])


def test_an_embedding_with_sparse_grads():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = polyopt.SGD(emb.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"grads\[0\] is a sparse tensor.*to_dense\(\)"):
        opt.step()


# -- NumPy bfloat16 (ml_dtypes) ---------------------------------------------------------------


@pytest.mark.parametrize("impl", ["auto", "generic"])
@pytest.mark.parametrize("name", NAMES)
def test_numpy_bfloat16_params_compute_in_float32_like_torch_bfloat16(name, impl):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(6).astype(np.float32)
    gs = [rng.standard_normal(6).astype(np.float32) for _ in range(5)]
    mine = p0.astype(bf16)
    ref = torch.tensor(p0).to(torch.bfloat16)
    opt = polyopt.OPTIMIZERS[name][1]([mine], **cfg(name), impl=impl)
    theirs = polyopt.OPTIMIZERS[name][1]([ref], **cfg(name), impl="generic")
    for g in gs:
        opt.step([g.astype(bf16)])
        theirs.step([torch.tensor(g).to(torch.bfloat16)])
    assert mine.dtype == bf16
    # both compute in float32 and round to bfloat16 (to nearest even): the same bits
    assert np.array_equal(mine.astype(np.float32), ref.float().numpy())


def test_other_ml_dtypes_are_a_clear_error():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    p = np.ones(3, dtype=ml_dtypes.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"params has dtype float8_e4m3fn; optimizers need float"):
        polyopt.Adam(p)


# -- errors name the argument as it was written ------------------------------------------------


@pytest.mark.parametrize(
    ("params", "grads", "rx"),
    [
        ([_ones(3), _ones(2)], [_ones(3), _ones(4)], r"^grads\[1\] has shape \(4,\)"),
        (
            {"enc": {"w": _ones(3), "b": _ones(2)}},
            {"enc": {"w": _ones(3), "b": _ones(1)}},
            r"^grads\['enc'\]\['b'\] has shape \(1,\)",
        ),
        (
            [{"params": [_ones(3)]}, {"params": [_ones(2), _ones(4)]}],
            [[_ones(3)], [_ones(2), _ones(5)]],
            r"^grads\[1\]\[1\] has shape \(5,\)",
        ),
        (
            [{"params": [_ones(3)]}, {"params": [_ones(2)]}],
            [{"params": [_ones(3)]}, {"params": [_ones(1)]}],
            r"^grads\[1\]\['params'\]\[0\] has shape \(1,\)",
        ),
        (
            [{"params": [_ones(3)]}, {"params": [_ones(2), np.arange(3)]}],
            [[_ones(3)], [_ones(2), _ones(3)]],
            r"^params\[1\]\['params'\]\[1\] has dtype int64",
        ),
    ],
    ids=["list", "nested-dict", "groups", "group-dicts", "params-in-group"],
)
@pytest.mark.parametrize("form", FORMS)
def test_errors_name_the_leaf_by_its_path(params, grads, rx, form):
    with pytest.raises((ValueError, TypeError), match=rx):
        run_update("adam", form, params, grads)
