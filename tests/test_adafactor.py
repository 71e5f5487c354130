"""Adafactor against torch.optim.Adafactor (float64, CPU), and its own properties.

Each step, every array is held to torch's at ``max|Δp| / max|p| <= 1e-9``; the state
(``row_var``, ``col_var``, ``variance``) the same way at the end. The problem has a
0-d array, a vector, a matrix and a 3-d array (factored over its last two axes), and
gradients with an all-zero row, a tiny vector (|g| ~ 1e-20, where the ε1 clamp acts)
and scales from 0.1 to 3. Three forms: the functional pair on NumPy, the stateful
form on NumPy and on torch tensors.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import polyopt
from polyopt import schedules
from polyopt.rules.adafactor import adafactor, layout

torch = pytest.importorskip("torch")

Adafactor = polyopt.stateful(adafactor, "Adafactor")

STEPS = 120
RTOL = 1e-9
SHAPES = ((), (7,), (3, 4), (2, 3, 5))
LR_SCHEDULE = "cosine"  # marker: lr = schedules.cosine(LR0, STEPS), CosineAnnealingLR in torch
LR0 = 0.3

OPTION_SETS = {
    "defaults": {},
    "changed": dict(lr=0.5, beta2_decay=-0.5, d=2.0, eps=(1e-8, 1e-2)),
    "weight_decay": dict(lr=0.05, weight_decay=0.1),
    "maximize": dict(maximize=True),
    "cosine": dict(lr=LR_SCHEDULE, weight_decay=0.05),
}

#: the largest relative difference seen per option set and form (printed with -s)
WORST: dict = {}


def make_problem(steps: int = STEPS, special: bool = True, seed: int = 0):
    """Initial params and the gradient of each step (float64 NumPy). ``special``: an
    all-zero row of the matrix every 7th step and a tiny gradient for the vector every
    5th (where the ε1 clamps act)."""
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s) for s in SHAPES]
    grads = []
    for k in range(steps):
        scale = 0.1 + 2.9 * (0.5 + 0.5 * math.sin(0.37 * k))
        gs = [scale * rng.standard_normal(s) for s in SHAPES]
        if special and k % 7 == 3:
            gs[2][1, :] = 0.0
        if special and k % 5 == 2:
            gs[1] = gs[1] * 1e-20
        grads.append(gs)
    return p0, grads


def _hp(options: dict) -> dict:
    hp = dict(options)
    if hp.get("lr") == LR_SCHEDULE:
        hp["lr"] = schedules.cosine(LR0, STEPS)
    return hp


def torch_run(options: dict, p0, grads, missing=frozenset()):
    """torch.optim.Adafactor's params after each step, and its final state."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch's per-param `step` in float64
    try:
        ps = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in p0]
        hp = dict(options)
        sched = None
        if hp.get("lr") == LR_SCHEDULE:
            hp["lr"] = LR0
        opt = torch.optim.Adafactor(ps, **hp)
        if options.get("lr") == LR_SCHEDULE:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
        out = []
        for k, gs in enumerate(grads):
            for i, (p, g) in enumerate(zip(ps, gs)):
                p.grad = None if (k, i) in missing else torch.tensor(g)
            opt.step()
            if sched is not None:
                sched.step()
            out.append([p.detach().numpy().copy() for p in ps])
        state = [{k: v.numpy().copy() for k, v in opt.state[p].items()} for p in ps]
        return out, state
    finally:
        torch.set_default_dtype(saved)


def rel(a, b) -> float:
    """max|a - b| / max|b| (0 for empty arrays, and where both are 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    scale = float(np.max(np.abs(b)))
    diff = float(np.max(np.abs(a - b)))
    return diff / scale if scale else diff


def check_against_torch(label, ours, theirs, our_state, their_state) -> float:
    worst = 0.0
    for k, (mine, ref) in enumerate(zip(ours, theirs, strict=True)):
        for i, (a, b) in enumerate(zip(mine, ref, strict=True)):
            r = rel(a, b)
            assert r <= RTOL, f"{label}: params[{i}] (shape {b.shape}) after step {k + 1}: {r:.3g}"
            worst = max(worst, r)
    for i, (mine, ref) in enumerate(zip(our_state, their_state, strict=True)):
        assert set(mine) == set(ref) - {"step"}, (label, i, sorted(mine), sorted(ref))
        for name, a in mine.items():
            r = rel(a, ref[name])
            assert r <= RTOL, f"{label}: state[{i}][{name!r}]: {r:.3g}"
            worst = max(worst, r)
    return worst


def functional_numpy(hp, p0, grads, missing=frozenset()):
    opt = adafactor(**hp)
    params = [p.copy() for p in p0]
    state = opt.init(params)
    out = []
    for k, gs in enumerate(grads):
        gs = [None if (k, i) in missing else g for i, g in enumerate(gs)]
        params, state = opt.update(params, gs, state)
        out.append([np.asarray(p).copy() for p in params])
    return out, state.per_array(len(p0))


def stateful_numpy(hp, p0, grads, missing=frozenset()):
    params = [p.copy() for p in p0]
    opt = Adafactor(params, **hp)
    out = []
    for k, gs in enumerate(grads):
        opt.step([None if (k, i) in missing else g for i, g in enumerate(gs)])
        out.append([p.copy() for p in params])
    return out, [
        {n: np.asarray(a) for n, a in s.items()} for s in opt.state_dict()["state"].values()
    ]


def stateful_torch(hp, p0, grads, missing=frozenset()):
    params = [torch.tensor(p, dtype=torch.float64) for p in p0]
    opt = Adafactor(params, **hp)
    out = []
    for k, gs in enumerate(grads):
        opt.step([None if (k, i) in missing else torch.tensor(g) for i, g in enumerate(gs)])
        out.append([p.numpy().copy() for p in params])
    state = opt.state_dict()["state"]
    return out, [{n: a.numpy() for n, a in s.items() if n != "step"} for s in state.values()]


FORMS = {
    "functional-numpy": functional_numpy,
    "stateful-numpy": stateful_numpy,
    "stateful-torch": stateful_torch,
}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_matches_torch(name, form):
    options = OPTION_SETS[name]
    p0, grads = make_problem()
    theirs, their_state = torch_run(options, p0, grads)
    ours, our_state = FORMS[form](_hp(options), p0, grads)
    worst = check_against_torch(f"{name} [{form}]", ours, theirs, our_state, their_state)
    WORST[(name, form)] = worst
    print(f"adafactor {name:13s} {form:17s} max rel diff {worst:.3g}")


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", ["defaults", "changed", "maximize"])
def test_clamp_check_matches_torch(name, form, monkeypatch):
    """Large params skip the ε1 clamp of sqrt(V) where min(sqrt(R/r)) · min(sqrt(C))
    shows it cannot act (rules.adafactor._at_least, NumPy and CPU torch): with the size
    threshold at 0 every factored array takes the check, and both outcomes occur (an
    all-zero row of the matrix at the first step, R_i = 0, makes the clamp act; later
    steps it cannot) and match torch."""
    from polyopt.rules import adafactor as module

    seen = []
    check = module._at_least

    def spy(*args):
        seen.append(check(*args))
        return seen[-1]

    monkeypatch.setattr(module, "CHECK_CLAMP_FROM", 0)
    monkeypatch.setattr(module, "_at_least", spy)
    options = OPTION_SETS[name]
    p0, grads = make_problem(40)
    grads[0][2][1, :] = 0.0
    theirs, their_state = torch_run(options, p0, grads)
    ours, our_state = FORMS[form](_hp(options), p0, grads)
    check_against_torch(f"clamp check {name} [{form}]", ours, theirs, our_state, their_state)
    assert True in seen and False in seen


def test_missing_gradients_match_torch():
    """An array without a gradient is skipped and keeps its own step count, as torch's
    per-param ``step`` (it enters 1 - β2_t = t^τ and ρ_t)."""
    missing = frozenset({(0, 2), (1, 2), (2, 0), (5, 3), (6, 3), (7, 3), (9, 1)})
    p0, grads = make_problem(30)
    theirs, their_state = torch_run({}, p0, grads, missing)
    for form in ("functional-numpy", "stateful-torch"):
        ours, our_state = FORMS[form]({}, p0, grads, missing)
        check_against_torch(f"missing [{form}]", ours, theirs, our_state, their_state)


def test_tensor_lr_matches_torch():
    """lr as a 0-d tensor (torch accepts one too)."""
    p0, grads = make_problem(40)
    theirs, their_state = torch_run({"lr": 0.2}, p0, grads)
    ours, our_state = stateful_torch({"lr": torch.tensor(0.2, dtype=torch.float64)}, p0, grads)
    check_against_torch("tensor lr", ours, theirs, our_state, their_state)


def test_state_layout_is_torchs():
    """The slots of each array: names and shapes of torch's ``optimizer.state[p]``."""
    assert layout(()) == {"col_var": None, "row_var": None, "variance": ()}
    assert layout((7,)) == {"col_var": None, "row_var": None, "variance": (7,)}
    assert layout((3, 4)) == {"col_var": (1, 4), "row_var": (3, 1), "variance": None}
    assert layout((2, 3, 5)) == {"col_var": (2, 1, 5), "row_var": (2, 3, 1), "variance": None}
    p0, grads = make_problem(2)
    params = [torch.tensor(p) for p in p0]
    opt = Adafactor(params)
    opt.step([torch.tensor(g) for g in grads[0]])
    _, their_state = torch_run({}, p0, grads[:1])
    ours = opt.state_dict()["state"]
    for i, shape in enumerate(SHAPES):
        want = {n: s for n, s in layout(shape).items() if s is not None}
        assert {n: tuple(a.shape) for n, a in ours[i].items()} == want
        assert {n: a.shape for n, a in their_state[i].items() if n != "step"} == want


def test_empty_arrays_are_left_alone():
    """A param with no elements is not changed, nor its state, and no warning is raised
    (torch.optim.Adafactor raises ZeroDivisionError for one: RMS(p) = 0/0)."""
    shapes = [(0,), (0, 4), (3, 0), (2, 0, 3)]
    p0 = [np.zeros(s) for s in shapes] + [np.array([1.0, -2.0])]
    grads = [np.ones(s) for s in shapes] + [np.array([0.5, 0.5])]
    opt = adafactor(lr=0.1)
    state = opt.init(p0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params, state = opt.update(p0, grads, state)
        params, state = opt.update(params, grads, state)
    for p, s, shape in zip(params, state.per_array(len(p0)), shapes):
        assert p.shape == shape
        want = {n: sh for n, sh in layout(shape).items() if sh is not None}
        assert {n: a.shape for n, a in s.items()} == want
        assert all(not np.any(a) for a in s.values())
    assert not np.array_equal(params[-1], p0[-1])  # the non-empty one moved
    tp = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    tp.grad = torch.ones_like(tp)
    with pytest.raises(ZeroDivisionError):
        torch.optim.Adafactor([tp]).step()


BAD = [
    (dict(lr=-1.0), "lr must be >= 0, got -1.0"),
    (dict(beta2_decay=0.5), "beta2_decay must be <= 0, got 0.5"),
    (dict(beta2_decay=float("nan")), "beta2_decay must be <= 0, got nan"),
    (dict(eps=(-1.0, 1e-3)), "eps[0] must be >= 0, got -1.0"),
    (dict(eps=(None, -1e-3)), "eps[1] must be >= 0, got -0.001"),
    (dict(eps=1e-3), "eps must be a tuple of 2 numbers, got 0.001"),
    (dict(eps=(None, "x")), "eps[1] must be a real number"),
    (dict(d=0.5), "d must be >= 1, got 0.5"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    (dict(maximize="yes"), "maximize must be True or False, got 'yes'"),
    (dict(d=lambda k: 1.0), "d cannot be a schedule"),
    (dict(beta2_decay=lambda k: -0.8), "beta2_decay cannot be a schedule"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[next(iter(b)) for b, _ in BAD])
def test_bad_hyperparameters_raise(bad, message):
    with pytest.raises((ValueError, TypeError)) as e:
        adafactor(**bad)
    assert message in str(e.value)
    with pytest.raises((ValueError, TypeError)) as e:
        Adafactor([np.zeros(3)], **bad)
    assert message in str(e.value)


def test_bad_group_override_raises_and_changes_nothing():
    params = [np.ones(3)]
    opt = Adafactor(params)
    opt.param_groups[0]["d"] = 0.0
    with pytest.raises(ValueError, match=r"d must be >= 1, got 0.0"):
        opt.step([np.ones(3)])
    assert opt.step_count == 0 and np.array_equal(params[0], np.ones(3))


def test_eps_none_is_the_param_dtypes_eps():
    """eps[0] = None: finfo(param dtype).eps, torch's default; an explicit equal value
    gives the same steps. float16 params compute in float32 but keep float16's eps."""
    assert repr(adafactor()).startswith("polyopt.adafactor(lr=0.01, beta2_decay=-0.8, ")
    assert adafactor().hyperparams["eps"] == (None, 1e-3)
    for dtype in (np.float64, np.float32, np.float16):
        p = np.array([1.0, -2.0, 0.5], dtype=dtype)
        g = np.array([1e-4, 0.0, 3.0], dtype=dtype)  # 1e-4 < float16's eps: clamped
        a, _ = adafactor().update(p, g, adafactor().init(p))
        explicit = adafactor(eps=(float(np.finfo(dtype).eps), 1e-3))
        b, _ = explicit.update(p, g, explicit.init(p))
        assert a.dtype == dtype and np.array_equal(a, b)
    tp = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float16)
    tg = torch.tensor([1e-4, 0.0, 3.0], dtype=torch.float16)
    mine = tp.clone()
    Adafactor([mine]).step([tg])
    ref = tp.clone().requires_grad_()
    ref.grad = tg
    torch.optim.Adafactor([ref]).step()
    # float32 math rounded once vs torch's float16 math: within two float16 ulps
    np.testing.assert_allclose(mine.float().numpy(), ref.detach().float().numpy(), rtol=2e-3)


def test_complex_params_are_refused():
    """torch.optim.Adafactor refuses complex params (RuntimeError at step); so does
    polyopt, at init: a factored moment of a (real, imag) pair has no meaning."""
    for p in (np.zeros((2, 3), dtype=np.complex128), torch.zeros(4, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=r"adafactor does not take complex params"):
            adafactor().init([p])
        with pytest.raises(TypeError, match=r"dtype (torch\.)?complex"):
            Adafactor([p])
    tp = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    tp.grad = torch.ones_like(tp)
    with pytest.raises(RuntimeError, match="does not support complex"):
        torch.optim.Adafactor([tp]).step()


def test_state_checks_name_the_slot():
    opt = adafactor()
    params = [np.ones((3, 4)), np.ones(2)]
    state = opt.init(params)
    bad = state._replace(slots={**state.slots, "row_var": (np.zeros((3, 4)), None)})
    with pytest.raises(
        ValueError, match=r"state.slots\['row_var'\]\[0\] has shape \(3, 4\).*needs shape \(3, 1\)"
    ):
        opt.update(params, [np.ones((3, 4)), np.ones(2)], bad)
    swapped = state._replace(slots={k: v[::-1] for k, v in state.slots.items()})
    with pytest.raises(
        ValueError,
        match=r"state.slots\['col_var'\]\[0\] is None, but the hyperparameters of params\[0\]",
    ):
        opt.update(params, [np.ones((3, 4)), np.ones(2)], swapped)


def _state_bytes(state) -> int:
    return sum(a.nbytes for arrays in state.slots.values() for a in arrays if a is not None)


def test_state_memory_vs_adam():
    """A (1024, 1024) float32 param: 1024 + 1024 numbers of state, Adam's 2 · 1024²."""
    p = np.zeros((1024, 1024), dtype=np.float32)
    ours = _state_bytes(adafactor().init([p]))
    adams = _state_bytes(polyopt.adam().init([p]))
    assert ours == 2 * 1024 * 4 and adams == 2 * 1024 * 1024 * 4
    assert adams // ours == 1024
    print(f"adafactor state {ours} B, adam {adams} B, ratio 1/{adams // ours}")


def test_jit_float32_matches_numpy_float64():
    """The functional form traces under jax.jit (t, lr: traced 0-d arrays) and stays
    within 1e-5 of the float64 NumPy run over 20 steps."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    p0, grads = make_problem(20, special=False, seed=1)
    hp = dict(lr=0.4, weight_decay=0.1, d=1.5)
    ref, _ = functional_numpy(hp, p0, grads)

    opt = adafactor(**hp)
    step = jax.jit(opt.update)
    params = [jnp.asarray(p, dtype=jnp.float32) for p in p0]
    state = opt.init(params)

    @jax.jit
    def step_traced_lr(params, grads, state, lr):  # lr traced: min(lr, 1/sqrt(t)) on arrays
        return adafactor(**{**hp, "lr": lr}).update(params, grads, state)

    params2, state2 = params, state
    for k, gs in enumerate(grads):
        gs = [jnp.asarray(g, dtype=jnp.float32) for g in gs]
        params, state = step(params, gs, state)
        params2, state2 = step_traced_lr(params2, gs, state2, jnp.float32(hp["lr"]))
        for i, (a, a2, b) in enumerate(zip(params, params2, ref[k])):
            assert a.dtype == jnp.float32
            assert rel(a, b) <= 1e-5, (k, i, rel(a, b))
            assert rel(a2, b) <= 1e-5, (k, i, rel(a2, b))
    assert tuple(state.slots["row_var"][2].shape) == (3, 1)
    assert state.slots["variance"][2] is None
