"""LAMB and schedule-free AdamW against their optax twins (``optax.lamb``,
``optax.contrib.schedule_free_adamw`` and ``schedule_free_eval_params``)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import polyopt
from polyopt.rules import lamb as lamb_module
from polyopt.rules import schedule_free as sf_module
from polyopt.rules.lamb import lamb
from polyopt.rules.schedule_free import schedule_free_adamw, schedule_free_eval_params

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

SHAPES = [(), (7,), (3, 4), (2, 3, 5)]
STEPS = 120

LAMB_CASES = {
    "defaults": ({}, {"learning_rate": 1e-3}),
    "options": (
        dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-4, eps_root=1e-8, weight_decay=0.1),
        dict(learning_rate=3e-2, b1=0.8, b2=0.99, eps=1e-4, eps_root=1e-8, weight_decay=0.1),
    ),
}
SF_CASES = {
    "defaults": ({}, {}),
    "options": (
        dict(
            lr=1e-2,
            betas=(0.8, 0.99),
            eps=1e-6,
            weight_decay=0.05,
            warmup_steps=10,
            weight_lr_power=1.5,
        ),
        dict(
            learning_rate=1e-2,
            warmup_steps=10,
            b1=0.8,
            b2=0.99,
            eps=1e-6,
            weight_decay=0.05,
            weight_lr_power=1.5,
        ),
    ),
}


@pytest.fixture
def x64():
    """jax in float64 for the test, restored after."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def problem(dtype, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads


def normwise(mine, ref) -> float:
    """max over arrays of max|Δ| / max|ref|."""
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
        for a, b in zip(mine, ref)
    )


def run_optax(tx, params, grads, jit=True):
    """optax's trajectory; returns (params, state)."""

    def step(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    p = [jnp.asarray(x) for x in params]
    s = tx.init(p)
    for g in grads:
        p, s = step(p, [jnp.asarray(x) for x in g], s)
    return p, s


def run_jit(opt, params, grads):
    update = jax.jit(opt.update)
    p = [jnp.asarray(x) for x in params]
    s = opt.init(p)
    for g in grads:
        p, s = update(p, [jnp.asarray(x) for x in g], s)
    return p, s


def run_numpy(opt, params, grads):
    p, s = [x.copy() for x in params], opt.init(params)
    for g in grads:
        p, s = opt.update(p, g, s)
    return p, s


def run_stateful(factory, hp, params, grads, wrap):
    opt = polyopt.stateful(factory, "Opt")([wrap(x.copy()) for x in params], **hp)
    for g in grads:
        opt.step([wrap(x) for x in g])
    return opt


def assert_close(mine, ref, rtol, atol):
    for a, b in zip(mine, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def optax_sf_float64_warmup(learning_rate, warmup_steps, b1, b2, eps, weight_decay, power):
    """``optax.contrib.schedule_free_adamw`` built from the same optax parts, with the
    warmup schedule in float64 (optax's own computes ``count / warmup`` in float32 from
    an int32 count, even with x64 on, which caps agreement at ~1e-8)."""

    def schedule(count):
        c = jnp.clip(jnp.asarray(count, jnp.float64), 0, warmup_steps)
        return learning_rate * c / warmup_steps

    base = optax.chain(
        optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    return optax.contrib.schedule_free(base, schedule, b1=b1, weight_lr_power=power)


# -- float32 under jax.jit, both sides --------------------------------------------------


@pytest.mark.parametrize("case", sorted(LAMB_CASES))
def test_lamb_matches_optax_jit_float32(case):
    hp, ref_hp = LAMB_CASES[case]
    params, grads = problem(np.float32)
    mine, _ = run_jit(lamb(**hp), params, grads)
    ref, _ = run_optax(optax.lamb(**ref_hp), params, grads)
    assert all(a.dtype == jnp.float32 for a in mine)
    assert_close(mine, ref, rtol=2e-5, atol=1e-5)
    assert normwise(mine, ref) < 2e-6


@pytest.mark.parametrize("case", sorted(SF_CASES))
def test_schedule_free_matches_optax_jit_float32(case):
    hp, ref_hp = SF_CASES[case]
    params, grads = problem(np.float32)
    opt = schedule_free_adamw(**hp)
    mine, state = run_jit(opt, params, grads)
    ref, ref_state = run_optax(optax.contrib.schedule_free_adamw(**ref_hp), params, grads)
    assert_close(mine, ref, rtol=2e-5, atol=1e-5)
    assert normwise(mine, ref) < 5e-6
    assert_close(state.slots["z"], ref_state.z, rtol=2e-5, atol=1e-5)
    x = jax.jit(lambda s, p: schedule_free_eval_params(s, p, optimizer=opt))(state, mine)
    x_ref = optax.contrib.schedule_free_eval_params(ref_state, ref)
    assert_close(x, x_ref, rtol=2e-5, atol=1e-5)
    assert not any(np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(x, mine) if a.size > 1)


def test_schedule_free_lr_traced_under_jit():
    """``lr`` as a traced 0-d array (the averaging weights then take the array path)."""
    hp, ref_hp = SF_CASES["options"]
    params, grads = problem(np.float32, steps=30)
    opt = schedule_free_adamw(**{**hp, "lr": 0.0})

    @jax.jit
    def step(lr, p, g, s):
        return schedule_free_adamw(**{**hp, "lr": lr}).update(p, g, s)

    p = [jnp.asarray(x) for x in params]
    s = opt.init(p)
    for g in grads:
        p, s = step(jnp.float32(1e-2), p, [jnp.asarray(x) for x in g], s)
    ref, _ = run_optax(optax.contrib.schedule_free_adamw(**ref_hp), params, grads)
    assert_close(p, ref, rtol=2e-5, atol=1e-5)


# -- float64: NumPy (functional) and NumPy / torch (stateful) against optax in x64 -------


@pytest.mark.parametrize("impl", ["generic", "auto"])
@pytest.mark.parametrize("case", sorted(LAMB_CASES))
def test_lamb_float64_matches_optax(x64, case, impl):
    torch = pytest.importorskip("torch")
    hp, ref_hp = LAMB_CASES[case]
    params, grads = problem(np.float64)
    ref, _ = run_optax(optax.lamb(**ref_hp), params, grads)
    mine, _ = run_numpy(lamb(**hp, impl=impl), params, grads)
    assert all(a.dtype == np.float64 for a in mine)
    assert_close(mine, ref, rtol=1e-9, atol=0)
    for wrap in (np.asarray, torch.from_numpy):
        opt = run_stateful(lamb, {**hp, "impl": impl}, params, grads, wrap)
        got = [np.asarray(a) for a in opt.params]
        assert_close(got, ref, rtol=1e-9, atol=0)


@pytest.mark.parametrize("impl", ["generic", "auto"])
@pytest.mark.parametrize("case", sorted(SF_CASES))
def test_schedule_free_float64_matches_optax(x64, case, impl):
    torch = pytest.importorskip("torch")
    hp, ref_hp = SF_CASES[case]
    params, grads = problem(np.float64)
    if hp.get("warmup_steps"):
        r = ref_hp
        tx = optax_sf_float64_warmup(
            r["learning_rate"], r["warmup_steps"], r["b1"], r["b2"], r["eps"],
            r["weight_decay"], r["weight_lr_power"],
        )  # fmt: skip
    else:
        tx = optax.contrib.schedule_free_adamw(**ref_hp)
    ref, ref_state = run_optax(tx, params, grads)
    x_ref = optax.contrib.schedule_free_eval_params(ref_state, ref)
    opt = schedule_free_adamw(**hp, impl=impl)
    mine, state = run_numpy(opt, params, grads)
    assert_close(mine, ref, rtol=1e-9, atol=0)
    assert_close(state.slots["z"], ref_state.z, rtol=1e-9, atol=0)
    assert_close(schedule_free_eval_params(state, mine, optimizer=opt), x_ref, rtol=1e-9, atol=0)
    for wrap in (np.asarray, torch.from_numpy):
        s_opt = run_stateful(schedule_free_adamw, {**hp, "impl": impl}, params, grads, wrap)
        assert_close([np.asarray(a) for a in s_opt.params], ref, rtol=1e-9, atol=0)
        x = schedule_free_eval_params(s_opt)
        assert type(x[0]) is type(s_opt.params[0])
        assert_close([np.asarray(a) for a in x], x_ref, rtol=1e-9, atol=0)


def test_schedule_free_float64_optax_own_warmup_is_float32(x64):
    """Against optax's own schedule_free_adamw with a warmup: its float32 schedule
    limits agreement in float64 to ~1e-8 (the float64-warmup twin above agrees to 1e-9)."""
    hp, ref_hp = SF_CASES["options"]
    params, grads = problem(np.float64)
    ref, _ = run_optax(optax.contrib.schedule_free_adamw(**ref_hp), params, grads)
    mine, _ = run_numpy(schedule_free_adamw(**hp), params, grads)
    assert_close(mine, ref, rtol=1e-6, atol=0)
    assert normwise(mine, ref) > 1e-12  # the float32 schedule shows


def test_schedule_free_array_power_matches_number():
    """A 0-d torch tensor ``weight_lr_power`` takes the array path of the weights."""
    torch = pytest.importorskip("torch")
    hp = dict(SF_CASES["options"][0])
    params, grads = problem(np.float64, steps=25)
    a = run_stateful(schedule_free_adamw, hp, params, grads, torch.from_numpy)
    hp["weight_lr_power"] = torch.tensor(1.5, dtype=torch.float64)
    b = run_stateful(schedule_free_adamw, hp, params, grads, torch.from_numpy)
    assert_close([x.numpy() for x in b.params], [x.numpy() for x in a.params], 1e-12, 0)


# -- behaviour ---------------------------------------------------------------------------


def test_lamb_trust_ratio_is_one_where_a_norm_is_zero(x64):
    opt = lamb(lr=0.1)
    p = [np.zeros(3), np.array([3.0, 4.0])]
    g = [np.array([1.0, -1.0, 2.0]), np.zeros(2)]
    new, _ = opt.update(p, g, opt.init(p))
    u = g[0] / (np.abs(g[0]) + 1e-6)  # the first Adam direction, with ||p|| = 0: ratio 1
    np.testing.assert_allclose(new[0], -0.1 * u, rtol=1e-12)
    np.testing.assert_array_equal(new[1], p[1])  # zero direction: no move, no NaN
    ref, _ = run_optax(optax.lamb(0.1), p, [g])
    assert_close(new, ref, rtol=1e-12, atol=0)


def test_lamb_trust_ratio_per_array():
    """Each array gets its own ratio ||p|| / ||u||: a 10x larger array steps 10x more."""
    opt = lamb(lr=0.01)
    p = [np.array([3.0, 4.0]), np.array([30.0, 40.0])]
    g = [np.array([1.0, 2.0]), np.array([1.0, 2.0])]
    new, _ = opt.update(p, g, opt.init(p))
    np.testing.assert_allclose(p[1] - new[1], 10 * (p[0] - new[0]), rtol=1e-12)


def test_lamb_maximize_is_negated_gradient():
    params, grads = problem(np.float64, steps=10)
    a, _ = run_numpy(lamb(lr=0.01, weight_decay=0.1, maximize=True), params, grads)
    neg = [[-x for x in g] for g in grads]
    b, _ = run_numpy(lamb(lr=0.01, weight_decay=0.1), params, neg)
    assert_close(a, b, rtol=0, atol=0)


def test_schedule_free_warmup_none_is_no_warmup():
    params, grads = problem(np.float64, steps=5)
    a, _ = run_numpy(schedule_free_adamw(warmup_steps=None), params, grads)
    b, _ = run_numpy(schedule_free_adamw(), params, grads)
    assert_close(a, b, rtol=0, atol=0)


def test_schedule_free_first_warmup_step_does_not_move():
    opt = schedule_free_adamw(warmup_steps=5)
    p = [np.array([1.0, 2.0])]
    new, state = opt.update(p, [np.array([0.3, -0.7])], opt.init(p))
    np.testing.assert_array_equal(new[0], p[0])
    np.testing.assert_array_equal(state.slots["z"][0], p[0])
    np.testing.assert_allclose(state.slots["exp_avg_sq"][0], 1e-3 * np.array([0.09, 0.49]))


def test_schedule_free_state_and_slots():
    p = {"w": np.ones((2, 3)), "b": np.zeros(3)}
    opt = schedule_free_adamw()
    state = opt.init(p)
    assert sorted(state.slots) == ["exp_avg_sq", "z"]
    for z, leaf in zip(state.slots["z"], [p["b"], p["w"]]):
        assert z.shape == leaf.shape and z is not leaf
        np.testing.assert_array_equal(z, leaf)
    assert [s.shape for s in lamb().init(p).slots["exp_avg"]] == [(3,), (2, 3)]
    assert not lamb_module.LAMB.elementwise
    assert sf_module.SCHEDULE_FREE_ADAMW.elementwise  # every slot has its param's shape


def test_schedule_free_eval_params_groups_use_their_own_b1():
    torch = pytest.importorskip("torch")
    params, grads = problem(np.float64, steps=20)
    groups = [
        {"params": [torch.from_numpy(params[0].copy()), torch.from_numpy(params[1].copy())]},
        {"params": [torch.from_numpy(params[2].copy())], "betas": (0.5, 0.99)},
    ]
    opt = polyopt.stateful(schedule_free_adamw, "SF")(groups, lr=0.01)
    for g in grads:
        opt.step([[torch.from_numpy(g[0]), torch.from_numpy(g[1])], [torch.from_numpy(g[2])]])
    x = schedule_free_eval_params(opt)
    z = opt.state.slots["z"]
    ys = [opt.param_groups[0]["params"][0], opt.param_groups[1]["params"][0]]
    cases = [(x[0]["params"][0], ys[0], z[0], 0.9), (x[1]["params"][0], ys[1], z[2], 0.5)]
    for xi, yi, zi, b1 in cases:
        np.testing.assert_allclose(xi.numpy(), ((yi - (1 - b1) * zi) / b1).numpy(), rtol=1e-15)
    assert x[1]["betas"] == (0.5, 0.99)


def test_complex_params_are_pairs_of_reals():
    """A complex array steps as its real view (torch.optim's convention), for both."""
    rng = np.random.default_rng(3)
    pc = rng.standard_normal((3, 2)) + 1j * rng.standard_normal((3, 2))
    gs = [rng.standard_normal((3, 2)) + 1j * rng.standard_normal((3, 2)) for _ in range(6)]
    as_real = lambda c: np.stack([c.real, c.imag], axis=-1)  # noqa: E731
    for opt in (lamb(lr=0.05, weight_decay=0.1), schedule_free_adamw(lr=0.05, warmup_steps=2)):
        a, sa = run_numpy(opt, [pc], [[g] for g in gs])
        b, _ = run_numpy(opt, [as_real(pc)], [[as_real(g)] for g in gs])
        assert a[0].dtype == np.complex128
        np.testing.assert_allclose(as_real(a[0]), b[0], rtol=1e-13, atol=1e-15)
    x = schedule_free_eval_params(sa, a, optimizer=opt)
    assert x[0].dtype == np.complex128


def test_doctests():
    for module in (lamb_module, sf_module):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lr": -1.0}, ValueError, "lr must be >= 0, got -1.0"),
        ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
        ({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\] must be in \[0, 1\), got -0.1"),
        ({"betas": 0.9}, ValueError, "betas must be a tuple of 2 numbers, got 0.9"),
        ({"eps": -1e-6}, ValueError, "eps must be >= 0, got -1e-06"),
        ({"eps_root": -1.0}, ValueError, "eps_root must be >= 0, got -1.0"),
        ({"weight_decay": float("nan")}, ValueError, "weight_decay must be >= 0, got nan"),
        ({"maximize": 1}, TypeError, "maximize must be True or False, got 1"),
        ({"eps": lambda k: 1e-6}, TypeError, "eps cannot be a schedule"),
        ({"amsgrad": True}, TypeError, "unexpected keyword argument 'amsgrad'"),
    ],
)
def test_lamb_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        lamb(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lr": -1.0}, ValueError, "lr must be >= 0, got -1.0"),
        ({"lr": lambda k: 1e-3}, TypeError, "lr cannot be a schedule"),
        ({"betas": (0.0, 0.999)}, ValueError, r"betas\[0\] must be > 0 .*got 0.0"),
        ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0, 1\), got 1.0"),
        ({"eps": -1.0}, ValueError, "eps must be >= 0, got -1.0"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay must be >= 0, got -0.1"),
        ({"warmup_steps": -3}, ValueError, "warmup_steps must be >= 0, got -3"),
        ({"warmup_steps": 2.5}, TypeError, "warmup_steps must be an int >= 0, got 2.5"),
        ({"warmup_steps": "10"}, TypeError, "warmup_steps must be a real number"),
        ({"weight_lr_power": -2.0}, ValueError, "weight_lr_power must be >= 0, got -2.0"),
        ({"weight_lr_power": float("inf")}, ValueError, "weight_lr_power must be finite"),
        ({"maximize": True}, TypeError, "unexpected keyword argument 'maximize'"),
    ],
)
def test_schedule_free_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        schedule_free_adamw(**kwargs)


def test_bad_group_hyperparameter_changes_nothing():
    p = [np.ones(3)]
    opt = polyopt.stateful(schedule_free_adamw, "SF")(p)
    opt.step([np.ones(3)])
    before = [a.copy() for a in opt.params], opt.state_dict()
    opt.param_groups[0]["betas"] = (0.0, 0.999)
    with pytest.raises(ValueError, match=r"betas\[0\] must be > 0"):
        opt.step([np.ones(3)])
    np.testing.assert_array_equal(opt.params[0], before[0][0])
    assert opt.step_count == 1


def test_eval_params_errors():
    p = [np.ones(3)]
    opt = schedule_free_adamw()
    state = opt.init(p)
    with pytest.raises(TypeError, match="needs the schedule_free_adamw optimizer"):
        schedule_free_eval_params(state, p)
    with pytest.raises(ValueError, match="params must be given"):
        schedule_free_eval_params(state, optimizer=opt)
    with pytest.raises(ValueError, match="no 'z' slot"):
        schedule_free_eval_params(lamb().init(p), p, optimizer=opt)
    with pytest.raises(TypeError, match="state_or_optimizer must be"):
        schedule_free_eval_params({"z": p}, p)
    with pytest.raises(TypeError, match="needs a schedule-free optimizer"):
        schedule_free_eval_params(polyopt.stateful(lamb, "L")(p))
