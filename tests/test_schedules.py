"""polyopt.schedules against torch's LR schedulers, independent closed forms, array step
counts (NumPy 0-d, JAX int32 eager and under jit/vmap) and argument checks.

Convention: ``schedule(k)`` is the lr torch's scheduler gives after k ``scheduler.step()``
calls (the lr the (k+1)-th optimizer step uses), for k = 0 .. 300.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import cases as C  # noqa: E402
from polyopt import schedules  # noqa: E402

K = 301  # k = 0 .. 300


def _sgdr(lr, T_0, T_mult, eta_min):
    """SGDR closed form: find the period by summing period lengths with integers."""

    def f(k):
        n_start, length = 0, T_0
        while n_start + length <= k:
            n_start += length
            length *= T_mult
        return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * (k - n_start) / length)) / 2

    return f


def _cos(lr, T, eta_min=0.0):
    return lambda k: eta_min + (lr - eta_min) * (1 + math.cos(math.pi * k / T)) / 2


# (id, spec, closed form, torch closed-form?)  -- the spec is built by polyopt and by torch
CONFIGS = [
    ("constant", C.S("constant", lr=0.1), lambda k: 0.1, True),
    (
        "step",
        C.S("step_decay", lr=0.1, step_size=7, gamma=0.5),
        lambda k: 0.1 * 0.5 ** (k // 7),
        False,
    ),
    (
        "step-every",
        C.S("step_decay", lr=0.3, step_size=1, gamma=0.97),
        lambda k: 0.3 * 0.97**k,
        False,
    ),
    ("exponential", C.S("exponential", lr=0.1, gamma=0.99), lambda k: 0.1 * 0.99**k, False),
    ("cosine", C.S("cosine", lr=0.1, T_max=300), _cos(0.1, 300), False),
    (
        "cosine-eta_min-periodic",
        C.S("cosine", lr=0.1, T_max=50, eta_min=1e-3),
        _cos(0.1, 50, 1e-3),
        False,
    ),
    ("warm-restarts", C.S("cosine_warm_restarts", lr=0.1, T_0=10), _sgdr(0.1, 10, 1, 0.0), True),
    (
        "warm-restarts-mult2",
        C.S("cosine_warm_restarts", lr=0.1, T_0=3, T_mult=2, eta_min=1e-3),
        _sgdr(0.1, 3, 2, 1e-3),
        True,
    ),
    (
        "warm-restarts-mult3",
        C.S("cosine_warm_restarts", lr=0.05, T_0=1, T_mult=3),
        _sgdr(0.05, 1, 3, 0.0),
        True,
    ),
    (
        "linear-down",
        C.S("linear", start=1.0, end=0.1, steps=80),
        lambda k: 1.0 - 0.9 * min(k, 80) / 80,
        False,
    ),
    (
        "linear-up",
        C.S("linear", start=0.01, end=0.1, steps=50),
        lambda k: 0.01 + 0.09 * min(k, 50) / 50,
        False,
    ),
    (
        "warmup",
        C.S("linear_warmup", lr=0.1, warmup_steps=20, start_factor=0.25),
        lambda k: 0.1 * (0.25 + 0.75 * min(k, 20) / 20),
        False,
    ),
    (
        "join-warmup-cosine",
        C.S(
            "join",
            schedules=(
                C.S("linear_warmup", lr=0.1, warmup_steps=10, start_factor=0.1),
                C.S("cosine", lr=0.1, T_max=100, eta_min=1e-3),
            ),
            boundaries=(10,),
        ),
        lambda k: 0.1 * (0.1 + 0.9 * k / 10) if k < 10 else _cos(0.1, 100, 1e-3)(k - 10),
        False,
    ),
    (
        "join-three",
        C.S(
            "join",
            schedules=(
                C.S("linear_warmup", lr=0.1, warmup_steps=5, start_factor=0.2),
                C.S("cosine", lr=0.1, T_max=30),
                C.S("exponential", lr=0.1, gamma=0.98),
            ),
            boundaries=(5, 35),
        ),
        lambda k: (
            0.1 * (0.2 + 0.8 * k / 5)
            if k < 5
            else (_cos(0.1, 30)(k - 5) if k < 35 else 0.1 * 0.98 ** (k - 35))
        ),
        False,
    ),
]
IDS = [c[0] for c in CONFIGS]


def _lr_max(closed):
    return max(abs(closed(k)) for k in range(K))


@pytest.mark.parametrize(("spec", "closed"), [(c[1], c[2]) for c in CONFIGS], ids=IDS)
def test_matches_closed_form(spec, closed):
    """Host (Python int k) values against the closed form written above. Both are the same
    formula evaluated in float64, so 1e-13 relative; ``atol`` 1e-15·max for values at 0."""
    sched = C.polyopt_hyperparams(C.Case("x", "sgd", {"lr": spec}))["lr"]
    got = np.array([sched(k) for k in range(K)])
    want = np.array([closed(k) for k in range(K)])
    assert all(isinstance(sched(k), float) for k in (0, 1, 150))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15 * _lr_max(closed))


@pytest.mark.parametrize(("spec", "closed_form_in_torch"), [(c[1], c[3]) for c in CONFIGS], ids=IDS)
def test_matches_torch_scheduler(spec, closed_form_in_torch):
    """torch's lr after k scheduler.step() calls equals schedule(k).

    Where torch computes the value in closed form (CosineAnnealingWarmRestarts from T_cur,
    no scheduler for constant) we ask for 1e-12 relative. StepLR, ExponentialLR, LinearLR
    and CosineAnnealingLR are *recursive* in torch (each lr is the previous lr times a
    factor), so rounding accumulates over up to 300 multiplications (~300 ulp ≈ 3e-14) and
    CosineAnnealingLR's ratio of cosines loses relative accuracy where the lr passes near
    eta_min: there we allow rtol 1e-12 plus atol 1e-12·max lr.
    """
    torch = pytest.importorskip("torch")
    import torch_maxdiff as T

    base, build = T._scheduler_builder(spec)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = build(opt) if build is not None else None
        torch_lrs = []
        for _ in range(K):
            torch_lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched is not None:
                sched.step()
    mine = C.polyopt_hyperparams(C.Case("x", "sgd", {"lr": spec}))["lr"]
    got = np.array([mine(k) for k in range(K)])
    atol = 0.0 if closed_form_in_torch else 1e-12 * max(torch_lrs)
    np.testing.assert_allclose(got, np.array(torch_lrs), rtol=1e-12, atol=atol)


@pytest.mark.parametrize("spec", [c[1] for c in CONFIGS], ids=IDS)
def test_numpy_0d_step_count_gives_the_same_values(spec):
    """A 0-d NumPy int array k goes through the array-API path (float64): same values as
    the host path to 1e-12 (the warm-restart period is found with log() there)."""
    sched = C.polyopt_hyperparams(C.Case("x", "sgd", {"lr": spec}))["lr"]
    host = np.array([sched(k) for k in range(K)])
    for dtype in (np.int64, np.int32):
        arr = np.array([float(np.asarray(sched(np.asarray(k, dtype=dtype)))) for k in range(K)])
        np.testing.assert_allclose(
            arr, host, rtol=1e-12, atol=1e-15 * np.max(host), err_msg=str(dtype)
        )


@pytest.mark.parametrize("spec", [c[1] for c in CONFIGS], ids=IDS)
def test_jax_int32_step_count_gives_the_same_values(spec):
    """A 0-d jax int32 k (JAX's default x32: float32 math), under jit+vmap for every k and
    eagerly for a few. float32 tolerance: cos() and the float32 rounding of gamma (0.99 in
    float32 is off by ~1e-8 relative, ^300 -> ~3e-6) give up to a few 1e-6 relative; we
    allow rtol 2e-5 and atol 2e-6·max lr (values at or near 0)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    sched = C.polyopt_hyperparams(C.Case("x", "sgd", {"lr": spec}))["lr"]
    host = np.array([sched(k) for k in range(K)])
    tol = dict(rtol=2e-5, atol=2e-6 * np.max(host))
    ks = jnp.arange(K, dtype=jnp.int32)
    vals = np.asarray(jax.jit(jax.vmap(sched))(ks))
    assert vals.shape == (K,)
    np.testing.assert_allclose(vals, host, **tol)
    for k in (0, 1, 2, 3, 9, 10, 11, 20, 21, 30, 35, 93, 94, 121, 300):
        v = sched(jnp.asarray(k, dtype=jnp.int32))
        assert v.shape == ()
        np.testing.assert_allclose(float(v), host[k], err_msg=f"k={k}", **tol)


# -- bad arguments: ValueError naming the argument and the value --------------------------

_a, _b = schedules.constant(0.1), schedules.cosine(0.1, 10)

BAD = [
    ("T_0=0", lambda: schedules.cosine_warm_restarts(0.1, T_0=0), "T_0", "0"),
    ("T_0=-3", lambda: schedules.cosine_warm_restarts(0.1, T_0=-3), "T_0", "-3"),
    ("T_0=2.5", lambda: schedules.cosine_warm_restarts(0.1, T_0=2.5), "T_0", "2.5"),
    ("T_mult=0", lambda: schedules.cosine_warm_restarts(0.1, T_0=10, T_mult=0), "T_mult", "0"),
    (
        "warm eta_min<0",
        lambda: schedules.cosine_warm_restarts(0.1, T_0=10, eta_min=-1.0),
        "eta_min",
        "-1.0",
    ),
    ("step_size=0", lambda: schedules.step_decay(0.1, step_size=0), "step_size", "0"),
    ("step gamma<0", lambda: schedules.step_decay(0.1, step_size=3, gamma=-0.5), "gamma", "-0.5"),
    ("T_max=0", lambda: schedules.cosine(0.1, T_max=0), "T_max", "0"),
    ("T_max=True", lambda: schedules.cosine(0.1, T_max=True), "T_max", "True"),
    ("cosine lr<0", lambda: schedules.cosine(-0.1, T_max=10), "lr", "-0.1"),
    ("cosine lr=nan", lambda: schedules.cosine(float("nan"), T_max=10), "lr", "nan"),
    ("exponential gamma<0", lambda: schedules.exponential(0.1, gamma=-1.0), "gamma", "-1.0"),
    ("constant lr<0", lambda: schedules.constant(-2.0), "lr", "-2.0"),
    ("linear steps=0", lambda: schedules.linear(0.1, 0.2, steps=0), "steps", "0"),
    ("linear end<0", lambda: schedules.linear(0.1, -0.2, steps=5), "end", "-0.2"),
    ("warmup steps=0", lambda: schedules.linear_warmup(0.1, 0), "steps", "0"),
    (
        "warmup start_factor<0",
        lambda: schedules.linear_warmup(0.1, 10, start_factor=-0.5),
        "start_factor",
        "-0.5",
    ),
    (
        "join too many boundaries",
        lambda: schedules.join([_a, _b], [5, 10]),
        "boundaries",
        "[5, 10]",
    ),
    ("join too few boundaries", lambda: schedules.join([_a, _b, _a], [5]), "boundaries", "[5]"),
    ("join decreasing", lambda: schedules.join([_a, _b, _a], [10, 5]), "boundaries", "[10, 5]"),
    ("join negative", lambda: schedules.join([_a, _b], [-1]), "boundaries", "[-1]"),
    ("k=1.5", lambda: _b(1.5), "k", "1.5"),
    (
        "nwd batch_size=0",
        lambda: schedules.normalized_weight_decay(0.05, 0, 100, 10),
        "batch_size",
        "0",
    ),
]


@pytest.mark.parametrize(("make", "name", "value"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_raise_value_error_naming_them(make, name, value):
    with pytest.raises(ValueError) as info:
        make()
    msg = str(info.value)
    assert name in msg and value in msg, f"message should name {name} and {value}: {msg!r}"


def test_normalized_weight_decay_closed_form():
    # λ = λ_norm · sqrt(b / (B · T)), Loshchilov & Hutter 2019, appendix B.1
    assert schedules.normalized_weight_decay(0.05, 128, 50_000, 100) == pytest.approx(
        0.05 * math.sqrt(128 / 5_000_000), rel=1e-15
    )


# -- known bug: linear_warmup's errors name linear()'s arguments -----------------------------

_WARMUP_BAD = [
    (
        "warmup_steps=0",
        lambda: schedules.linear_warmup(0.1, warmup_steps=0),
        r"\bwarmup_steps\b",
        "0",
    ),
    ("lr=-1", lambda: schedules.linear_warmup(-1.0, 10), r"\blr\b", "-1.0"),
    (
        "lr=-1,start_factor=0.5",
        lambda: schedules.linear_warmup(-1.0, 10, start_factor=0.5),
        r"\blr\b",
        "-1.0",
    ),
]


@pytest.mark.parametrize(
    ("make", "name", "value"), [b[1:] for b in _WARMUP_BAD], ids=[b[0] for b in _WARMUP_BAD]
)
def test_linear_warmup_errors_name_its_own_arguments(make, name, value):
    import re

    with pytest.raises(ValueError) as info:
        make()
    msg = str(info.value)
    assert re.search(name, msg) and value in msg, msg
