"""Muon against torch.optim.Muon (float64, CPU), and its own properties.

torch's Newton–Schulz iteration (``torch.optim._muon._zeropower_via_newtonschulz``)
casts its input to bfloat16, so torch.optim.Muon's float64 trajectory carries
bfloat16 rounding (~1e-2 relative in each update). Two comparisons follow:

- ``ns_dtype="compute"`` (polyopt's default) against torch.optim.Muon whose iteration
  is swapped for one that keeps the input dtype (:func:`exact_zeropower`, written here
  with torch's own ops): everything else (momentum, Nesterov, decay, lr adjustment,
  transposition of tall matrices) is torch's code. Held at ``max|Δp| / max|p| <= 1e-9``
  every step for 120 steps, and the momentum buffers at the end.
- ``ns_dtype="bfloat16"`` against torch.optim.Muon unchanged: the measured difference
  is bounded (see :data:`BF16_RTOL`); and the default against torch unchanged, to show
  (and bound) what the bfloat16 iteration costs.

Three forms: the functional pair on NumPy, the stateful form on NumPy and on torch
tensors; and the functional form under ``jax.jit`` in float32.
"""

from __future__ import annotations

import contextlib
import math
import re

import numpy as np
import pytest

import polyopt
from polyopt import schedules
from polyopt.rules.muon import NS_COEFFICIENTS, muon

torch = pytest.importorskip("torch")
_muon = pytest.importorskip("torch.optim._muon")

Muon = polyopt.stateful(muon, "Muon")

STEPS = 120
RTOL = 1e-9
#: ns_dtype="bfloat16" vs torch unchanged, params relative to max|p|. The iteration
#: alone is torch's bit for bit on these shapes (test below), but over 120 steps a
#: float32 sum accumulated in another order (NumPy's / torch's float32 matmul vs torch's
#: bfloat16 gemm) now and then lands on the other side of a bfloat16 rounding boundary:
#: one ulp (2^-8 relative) in an entry of that step's update, ~lr · 4e-3. Measured
#: max 8.9e-7 (lr 1e-3) to 7.9e-5 (lr 0.02, 8 NS steps); bound with margin.
BF16_RTOL = 2e-4
SHAPES = ((3, 4), (5, 2), (8, 8))
LR_SCHEDULE = "cosine"  # marker: lr = schedules.cosine(LR0, STEPS), CosineAnnealingLR in torch
LR0 = 0.05

OPTION_SETS = {
    "defaults": {},
    "nesterov_off": dict(lr=0.02, nesterov=False),
    "momentum": dict(lr=0.02, momentum=0.6),
    "momentum_zero": dict(lr=0.02, momentum=0.0),
    "weight_decay": dict(lr=0.05, weight_decay=0.5),
    "no_weight_decay": dict(lr=0.02, weight_decay=0.0),
    "adjust_original": dict(lr=0.02, adjust_lr_fn="original"),
    "adjust_match_rms_adamw": dict(lr=0.02, adjust_lr_fn="match_rms_adamw"),
    "ns_steps_3": dict(lr=0.02, ns_steps=3),
    "ns_steps_8": dict(lr=0.02, ns_steps=8),
    "ns_coefficients": dict(lr=0.02, ns_coefficients=(2.0, -1.5, 0.5), eps=1e-5),
    "cosine": dict(lr=LR_SCHEDULE, weight_decay=0.2),
}

#: the largest relative difference seen per option set and form (printed with -s)
WORST: dict = {}


def exact_zeropower(grad, ns_coefficients, ns_steps, eps):
    """torch's iteration without the bfloat16 cast (the reference for float64)."""
    a, b, c = ns_coefficients
    x = grad.clone()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextlib.contextmanager
def exact_torch():
    saved = _muon._zeropower_via_newtonschulz
    _muon._zeropower_via_newtonschulz = exact_zeropower
    try:
        yield
    finally:
        _muon._zeropower_via_newtonschulz = saved


def make_problem(steps: int = STEPS, seed: int = 0):
    """Initial params and the gradient of each step (float64 NumPy); every 9th step
    the (8, 8) matrix gets a rank-one gradient and every 11th the (5, 2) one a zero
    gradient (its buffer still moves; the iteration then divides by eps)."""
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s) for s in SHAPES]
    grads = []
    for k in range(steps):
        scale = 0.1 + 2.9 * (0.5 + 0.5 * math.sin(0.37 * k))
        gs = [scale * rng.standard_normal(s) for s in SHAPES]
        if k % 9 == 4:
            gs[2] = np.outer(rng.standard_normal(8), rng.standard_normal(8))
        if k % 11 == 6:
            gs[1] = np.zeros(SHAPES[1])
        grads.append(gs)
    return p0, grads


def _hp(options: dict) -> dict:
    hp = dict(options)
    if hp.get("lr") == LR_SCHEDULE:
        hp["lr"] = schedules.cosine(LR0, STEPS)
    return hp


def torch_run(options: dict, p0, grads, exact: bool = True, missing=frozenset()):
    """torch.optim.Muon's params after each step, and its final state; ``exact``: with
    :func:`exact_zeropower` in place of torch's bfloat16 iteration. One CPU thread:
    torch's bfloat16 gemm on these small matrices is ~100x slower with several."""
    ps = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in p0]
    hp = dict(options)
    hp.pop("ns_dtype", None)
    if hp.get("lr") == LR_SCHEDULE:
        hp["lr"] = LR0
    opt = torch.optim.Muon(ps, **hp)
    sched = None
    if options.get("lr") == LR_SCHEDULE:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with exact_torch() if exact else contextlib.nullcontext():
            for k, gs in enumerate(grads):
                for i, (p, g) in enumerate(zip(ps, gs)):
                    p.grad = None if (k, i) in missing else torch.tensor(g)
                opt.step()
                if sched is not None:
                    sched.step()
                out.append([p.detach().numpy().copy() for p in ps])
    finally:
        torch.set_num_threads(threads)
    state = [{k: v.numpy().copy() for k, v in opt.state[p].items()} for p in ps]
    return out, state


_TORCH_RUNS: dict = {}


def torch_run_cached(name: str, exact: bool = True):
    """:func:`torch_run` of ``OPTION_SETS[name]`` on :func:`make_problem`, once per
    module (the forms share it)."""
    key = (name, exact)
    if key not in _TORCH_RUNS:
        _TORCH_RUNS[key] = torch_run(OPTION_SETS[name], *make_problem(), exact=exact)
    return _TORCH_RUNS[key]


def rel(a, b) -> float:
    """max|a - b| / max|b| (the difference itself where b is all zeros)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.max(np.abs(b)))
    diff = float(np.max(np.abs(a - b)))
    return diff / scale if scale else diff


def compare(label, ours, theirs, our_state, their_state, rtol=RTOL) -> float:
    worst = 0.0
    for k, (mine, ref) in enumerate(zip(ours, theirs, strict=True)):
        for i, (a, b) in enumerate(zip(mine, ref, strict=True)):
            r = rel(a, b)
            assert r <= rtol, f"{label}: params[{i}] (shape {b.shape}) after step {k + 1}: {r:.3g}"
            worst = max(worst, r)
    for i, (mine, ref) in enumerate(zip(our_state, their_state, strict=True)):
        assert set(mine) == set(ref) == {"momentum_buffer"}, (label, i, sorted(ref))
        r = rel(mine["momentum_buffer"], ref["momentum_buffer"])
        assert r <= rtol, f"{label}: state[{i}]['momentum_buffer']: {r:.3g}"
        worst = max(worst, r)
    return worst


def functional_numpy(hp, p0, grads, missing=frozenset()):
    opt = muon(**hp)
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
    opt = Muon(params, **hp)
    out = []
    for k, gs in enumerate(grads):
        opt.step([None if (k, i) in missing else g for i, g in enumerate(gs)])
        out.append([p.copy() for p in params])
    return out, [
        {n: np.asarray(a) for n, a in s.items() if n != "step"}
        for s in opt.state_dict()["state"].values()
    ]


def stateful_torch(hp, p0, grads, missing=frozenset()):
    params = [torch.tensor(p, dtype=torch.float64) for p in p0]
    opt = Muon(params, **hp)
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
    theirs, their_state = torch_run_cached(name)
    ours, our_state = FORMS[form](_hp(options), p0, grads)
    worst = compare(f"{name} [{form}]", ours, theirs, our_state, their_state)
    WORST[(name, form)] = worst
    print(f"muon {name:23s} {form:17s} max rel diff {worst:.3g}")


@pytest.mark.parametrize("form", ["functional-numpy", "stateful-torch"])
@pytest.mark.parametrize(
    "name", ["defaults", "nesterov_off", "adjust_match_rms_adamw", "ns_steps_8", "cosine"]
)
def test_bfloat16_iteration_matches_torch_unchanged(name, form):
    """ns_dtype="bfloat16": torch's own bfloat16 iteration, on float64 params."""
    options = {**OPTION_SETS[name], "ns_dtype": "bfloat16"}
    p0, grads = make_problem()
    theirs, their_state = torch_run_cached(name, exact=False)
    ours, our_state = FORMS[form](_hp(options), p0, grads)
    worst = compare(f"bf16 {name} [{form}]", ours, theirs, our_state, their_state, BF16_RTOL)
    print(f"muon bf16 {name:23s} {form:17s} max rel diff {worst:.3g}")


def test_default_differs_from_torch_by_bfloat16_rounding_only():
    """The default (float64 iteration) vs torch unchanged: the bfloat16 rounding in
    torch's updates, measured and bounded; and the gap is real (not 0)."""
    p0, grads = make_problem()
    theirs, _ = torch_run({"lr": 0.02}, p0, grads, exact=False)
    ours, _ = functional_numpy({"lr": 0.02}, p0, grads)
    worst = max(rel(a, b) for mine, ref in zip(ours, theirs) for a, b in zip(mine, ref))
    print(f"muon default vs torch (bfloat16 iteration) max rel diff {worst:.3g}")
    assert 1e-5 < worst < 5e-3
    # one update, relative to the update's own size: bfloat16's ~3 digits
    p = [np.asarray(x) for x in p0]
    t1, _ = torch_run({"lr": 0.02, "weight_decay": 0.0}, p, grads[:1], exact=False)
    o1, _ = functional_numpy({"lr": 0.02, "weight_decay": 0.0}, p, grads[:1])
    for a, b, x in zip(o1[0], t1[0], p):
        assert 1e-4 < rel(a - x, b - x) < 5e-2


def test_bfloat16_iteration_is_torchs_bit_for_bit():
    """The iteration alone, on float64 input: every operation rounded to bfloat16 once,
    as torch's CPU kernels (small matrices: the float32 sums agree exactly)."""
    from polyopt.rules import muon as m

    xt = pytest.importorskip("array_api_compat.torch")
    xn = pytest.importorskip("array_api_compat.numpy")
    pytest.importorskip("ml_dtypes")
    hp = {**m.DEFAULTS, "ns_dtype": "bfloat16"}
    rng = np.random.default_rng(3)
    for shape in SHAPES + ((2, 7), (7, 1)):
        g = rng.standard_normal(shape)
        ref = _muon._zeropower_via_newtonschulz(torch.tensor(g), NS_COEFFICIENTS, 5, 1e-7)
        ref = ref.double().numpy()
        np.testing.assert_array_equal(m.orthogonalize(torch.tensor(g), hp, xt).numpy(), ref)
        np.testing.assert_array_equal(m.orthogonalize(g, hp, xn), ref)


def test_missing_gradients_match_torch():
    """An array without a gradient (None) is skipped: param and buffer stay, as torch."""
    missing = frozenset({(0, 2), (1, 2), (2, 0), (5, 1), (6, 1), (9, 0)})
    p0, grads = make_problem(30)
    theirs, their_state = torch_run({"lr": 0.02}, p0, grads, missing=missing)
    for form in ("functional-numpy", "stateful-torch"):
        ours, our_state = FORMS[form]({"lr": 0.02}, p0, grads, missing)
        compare(f"missing [{form}]", ours, theirs, our_state, their_state)


def test_tensor_lr_matches_torch():
    """lr as a 0-d tensor (torch accepts one too)."""
    p0, grads = make_problem(40)
    theirs, their_state = torch_run({"lr": 0.03}, p0, grads)
    ours, our_state = stateful_torch({"lr": torch.tensor(0.03, dtype=torch.float64)}, p0, grads)
    compare("tensor lr", ours, theirs, our_state, their_state)


def test_generic_impl_is_the_same_and_fused_is_refused():
    p0, grads = make_problem(5)
    a, _ = functional_numpy({"lr": 0.02}, p0, grads)
    b, _ = functional_numpy({"lr": 0.02, "impl": "generic"}, p0, grads)
    for x, y in zip(a[-1], b[-1]):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="there is no fused muon step for numpy arrays"):
        muon(impl="fused").init([np.zeros((2, 3))])


def test_defaults_and_state_are_torchs():
    opt = muon()
    hp = opt.hyperparams
    ref = torch.optim.Muon([torch.zeros(2, 3, requires_grad=True)]).defaults
    for name, value in ref.items():
        assert hp[name] == value, name
    assert hp["ns_dtype"] == "compute"
    assert set(hp) == set(ref) | {"ns_dtype"}
    p = [np.zeros((3, 4)), np.zeros((5, 2))]
    state = opt.init(p)
    assert sorted(state.slots) == ["momentum_buffer"]
    assert [a.shape for a in state.slots["momentum_buffer"]] == [(3, 4), (5, 2)]


@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 4), (1, 1, 1, 1)])
def test_params_that_are_not_matrices_are_refused(shape):
    """torch refuses them in its constructor; polyopt at init, naming the shape and
    pointing to AdamW. Nothing is built."""
    msg = re.escape(f"muon takes only 2-D params (weight matrices), got an array of shape {shape}")
    for p in (np.zeros(shape), torch.zeros(shape, dtype=torch.float64)):
        with pytest.raises(ValueError, match=msg) as e:
            muon().init([np.zeros((2, 2)), p] if isinstance(p, np.ndarray) else [p])
        assert "polyopt.adamw" in str(e.value)
        with pytest.raises(ValueError, match=msg):
            Muon([p])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        torch.optim.Muon([torch.zeros(shape, requires_grad=True)])


def test_complex_params_are_refused():
    """torch.optim.Muon refuses complex params (RuntimeError at step); polyopt at init:
    orthogonalizing the (real, imag) view has no meaning."""
    for p in (np.zeros((2, 3), dtype=np.complex128), torch.zeros(2, 3, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=r"muon does not take complex params"):
            muon().init([p])
        with pytest.raises(TypeError, match=r"dtype (torch\.)?complex"):
            Muon([p])
    tp = torch.zeros(2, 3, dtype=torch.complex64, requires_grad=True)
    tp.grad = torch.ones_like(tp)
    with pytest.raises(RuntimeError, match="does not support complex"):
        torch.optim.Muon([tp]).step()


BAD = [
    (dict(lr=-1.0), "lr must be >= 0, got -1.0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    (dict(momentum=-0.5), "momentum must be >= 0, got -0.5"),
    (dict(momentum=lambda k: 0.9), "momentum cannot be a schedule"),
    (dict(nesterov=1), "nesterov must be True or False, got 1"),
    (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients must be a tuple of 3 numbers"),
    (dict(ns_coefficients=(1.0, "b", 2.0)), "ns_coefficients[1] must be a real number"),
    (dict(ns_coefficients=(1.0, 2.0, math.inf)), "ns_coefficients[2] must be finite, got inf"),
    (dict(eps=-1e-7), "eps must be >= 0, got -1e-07"),
    (dict(ns_steps=100), "ns_steps must be an int in [0, 100), got 100"),
    (dict(ns_steps=-1), "ns_steps must be an int in [0, 100), got -1"),
    (dict(ns_steps=2.5), "ns_steps must be an int in [0, 100), got 2.5"),
    (dict(ns_steps=lambda k: 5), "ns_steps cannot be a schedule"),
    (dict(adjust_lr_fn="spectral"), "adjust_lr_fn must be one of (None, 'original', "),
    (dict(ns_dtype="float16"), "ns_dtype must be one of ('compute', 'float32', 'bfloat16')"),
    (dict(ns_dtype=None), "ns_dtype must be one of"),
]


@pytest.mark.parametrize(
    "bad, message", BAD, ids=[f"{next(iter(b))}-{i}" for i, (b, _) in enumerate(BAD)]
)
def test_bad_hyperparameters_raise(bad, message):
    with pytest.raises((ValueError, TypeError)) as e:
        muon(**bad)
    assert message in str(e.value)
    with pytest.raises((ValueError, TypeError)) as e:
        Muon([np.zeros((2, 3))], **bad)
    assert message in str(e.value)


def test_integer_valued_ns_steps_are_taken():
    """A NumPy integer arrives as a float; 5.0 steps are 5 steps."""
    p, g = np.eye(3)[:2], np.ones((2, 3))
    a, _ = muon(ns_steps=np.int64(5)).update(p, g, muon().init(p))
    b, _ = muon().update(p, g, muon().init(p))
    np.testing.assert_array_equal(a, b)


def test_bad_group_override_raises_and_changes_nothing():
    params = [np.ones((2, 3))]
    opt = Muon(params)
    opt.param_groups[0]["adjust_lr_fn"] = "nope"
    with pytest.raises(ValueError, match=r"adjust_lr_fn must be one of .* got 'nope'"):
        opt.step([np.ones((2, 3))])
    assert opt.step_count == 0 and np.array_equal(params[0], np.ones((2, 3)))
    assert not np.any(opt.state.slots["momentum_buffer"][0])


def test_torch_state_dict_loads_into_polyopt():
    """torch's state_dict entries are {'momentum_buffer': tensor} (no per-param step):
    loaded into polyopt's stateful form, the next steps are torch's."""
    p0, grads = make_problem(12)
    ps = [torch.tensor(p, requires_grad=True) for p in p0]
    ref = torch.optim.Muon(ps, lr=0.02)
    with exact_torch():
        for gs in grads[:6]:
            for p, g in zip(ps, gs):
                p.grad = torch.tensor(g)
            ref.step()
        sd = ref.state_dict()
        assert [sorted(s) for s in sd["state"].values()] == [["momentum_buffer"]] * 3
        mine = [p.detach().clone() for p in ps]
        opt = Muon(mine, lr=0.02)
        opt.load_state_dict(
            {
                "step": 6,
                "state": {i: dict(s) for i, s in sd["state"].items()},
                "param_groups": [
                    {k: v for k, v in g.items() if k in opt.param_groups[0] or k == "params"}
                    for g in sd["param_groups"]
                ],
            }
        )
        for gs in grads[6:]:
            for p, g in zip(ps, gs):
                p.grad = torch.tensor(g)
            ref.step()
            opt.step([torch.tensor(g) for g in gs])
    for a, b in zip(mine, ps):
        assert rel(a.numpy(), b.detach().numpy()) <= RTOL


def test_jit_float32_matches_numpy_float64():
    """The functional form traces under jax.jit (lr traced too) and stays within 1e-5
    of the float64 NumPy run over 10 steps; bfloat16 iteration traces as well."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    p0, grads = make_problem(10, seed=1)
    hp = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref, _ = functional_numpy(hp, p0, grads)
    ref16, _ = functional_numpy({**hp, "ns_dtype": "bfloat16"}, p0, grads)

    step = jax.jit(muon(**hp).update)
    step16 = jax.jit(muon(**hp, ns_dtype="bfloat16").update)

    @jax.jit
    def step_traced_lr(params, grads, state, lr):
        return muon(**{**hp, "lr": lr}).update(params, grads, state)

    params = [jnp.asarray(p, dtype=jnp.float32) for p in p0]
    state = muon(**hp).init(params)
    params2, state2, params3, state3 = params, state, params, state
    worst = worst16 = 0.0
    for k, gs in enumerate(grads):
        gs = [jnp.asarray(g, dtype=jnp.float32) for g in gs]
        params, state = step(params, gs, state)
        params2, state2 = step_traced_lr(params2, gs, state2, jnp.float32(hp["lr"]))
        params3, state3 = step16(params3, gs, state3)
        for i, (a, a2, a3) in enumerate(zip(params, params2, params3)):
            assert a.dtype == a3.dtype == jnp.float32 and a.shape == SHAPES[i]
            worst = max(worst, rel(a, ref[k][i]), rel(a2, ref[k][i]))
            worst16 = max(worst16, rel(a3, ref16[k][i]))
    print(f"muon jit float32 vs numpy float64: {worst:.3g}; bfloat16 iteration {worst16:.3g}")
    assert worst <= 1e-5
    assert worst16 <= 1e-3  # float32 vs float64 inputs to the bfloat16 rounding
    assert state.slots["momentum_buffer"][1].shape == SHAPES[1]
