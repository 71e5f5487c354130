"""Hyperparameters as arrays, and as numbers of every kind.

- A 0-d array of the params' library may stand for any numeric hyperparameter: a torch
  tensor (``lr=torch.tensor(1e-3)``, as torch.optim takes it: equal to torch.optim, and
  live: ``fill_`` takes effect at the next step, torch's fused kernel still runs), a JAX
  array or tracer (``jax.jit`` with the lr as an argument, ``jax.vmap`` over a batch of
  learning rates or betas, ``jax.grad`` with respect to the lr against finite
  differences and against the closed form for SGD).
- NumPy scalars and 0-d NumPy arrays (a sweep's ``np.float64(1e-2)``) are read as Python
  floats: host float64 math, and the params' dtype never changes, on every optimizer,
  form and path.
- What is not a real number gets a TypeError/ValueError at construction naming the
  hyperparameter (``Fraction``, ``10**400``, strings, lists, complex, arrays that are not
  0-d); a value the compute dtype cannot hold (``lr=1e308`` for float32) a ValueError
  before anything changes.
"""

from __future__ import annotations

import fractions
import math

import numpy as np
import pytest

import polyopt
import torch_maxdiff as T  # noqa: E402
from polyopt import testing

NAMES = testing.NAMES  # every optimizer the shared problems run (not Muon)
TORCH_NAMES = [n for n in NAMES if T.torch_class(n)]


def _cfg(name):
    """The optimizer's row of the case table with every state slot, plain numbers only."""
    return testing.polyopt_hyperparams(testing.richest(name))


def _numeric(name, hp):
    """The hyperparameters of ``hp`` that may be arrays: not flags, and not counts (a
    hyperparameter whose default is an int, as schedule-free AdamW's ``warmup_steps``,
    is a Python int that shapes the step, as a static argument of ``jax.jit``)."""
    defaults = polyopt.OPTIMIZERS[name][0]().rule.defaults
    return {k: v for k, v in hp.items() if not isinstance(v, bool) and type(defaults[k]) is not int}


def _problem(dtype=np.float32, steps=5, seed=0):
    rng = np.random.default_rng(seed)
    p = [rng.standard_normal(s).astype(dtype) for s in [(4,), (2, 3)]]
    g = [[rng.standard_normal(x.shape).astype(dtype) for x in p] for _ in range(steps)]
    return p, g


def _as(kind, hp, module=None):
    """``hp`` with every number (and each beta) wrapped as ``kind``."""

    def wrap(x):
        if kind == "numpy-scalar":
            return np.float64(x)
        if kind == "numpy-0d":
            return np.asarray(x)
        return module.asarray(x)

    out = {}
    for k, v in hp.items():
        if isinstance(v, bool):
            out[k] = v
        elif isinstance(v, tuple):
            out[k] = tuple(wrap(x) for x in v)
        else:
            out[k] = wrap(v)
    return out


# -- NumPy numbers are numbers ----------------------------------------------------------


@pytest.mark.parametrize("impl", ["auto", "generic"])
@pytest.mark.parametrize("kind", ["numpy-scalar", "numpy-0d"])
@pytest.mark.parametrize("form", ["stateful", "functional"])
@pytest.mark.parametrize("name", NAMES)
def test_numpy_numbers_keep_the_dtype_and_equal_python_floats(name, form, kind, impl):
    factory, cls = polyopt.OPTIMIZERS[name]
    p0, gs = _problem(np.float32)
    out = {}
    for which, hp in (("float", _cfg(name)), (kind, _as(kind, _cfg(name)))):
        params = [p.copy() for p in p0]
        if form == "stateful":
            opt = cls(params, **hp, impl=impl)
            for g in gs:
                opt.step(g)
        else:
            opt = factory(**hp, impl=impl)
            state = opt.init(params)
            for g in gs:
                params, state = opt.update(params, g, state)
        assert all(p.dtype == np.float32 for p in params), which
        out[which] = params
    for a, b in zip(out["float"], out[kind], strict=True):
        assert np.array_equal(a, b)


def test_a_numpy_lr_set_on_a_live_param_group_keeps_the_dtype():
    p = [np.ones(3, np.float32)]
    opt = polyopt.SGD(p, lr=0.1)
    opt.param_groups[0]["lr"] = np.float64(0.05)  # a sweep writing its own value
    opt.step([np.ones(3, np.float32)])
    opt.step([np.ones(3, np.float32)])
    assert p[0].dtype == np.float32
    np.testing.assert_allclose(p[0], 0.9, rtol=1e-6)


# -- torch tensors -------------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_torch_tensor_hyperparameters_equal_torch_optim(name):
    torch = pytest.importorskip("torch")
    cls = T.torch_class(name)
    hp = _cfg(name)
    p0, gs = _problem(np.float64, steps=8)
    ours = [torch.tensor(p) for p in p0]
    theirs = [torch.tensor(p, requires_grad=True) for p in p0]
    lr_ours, lr_theirs = torch.tensor(hp["lr"]), torch.tensor(hp["lr"])
    opt = polyopt.OPTIMIZERS[name][1](ours, **{**hp, "lr": lr_ours})
    ref = cls(theirs, **{**hp, "lr": lr_theirs})
    for k, g in enumerate(gs):
        value = hp["lr"] * (1 - 0.1 * k)  # a scheduler writing into the tensor
        lr_ours.fill_(value)
        lr_theirs.fill_(value)
        opt.step([torch.tensor(x) for x in g])
        for t, x in zip(theirs, g, strict=True):
            t.grad = torch.tensor(x)
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-9)
    assert opt.param_groups[0]["lr"] is lr_ours  # kept, not copied: live


def test_torch_tensor_lr_keeps_the_fused_kernel(monkeypatch):
    torch = pytest.importorskip("torch")
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(k), real(*a, **k)))
    p = [torch.ones(5)]
    opt = polyopt.AdamW(p, lr=torch.tensor(0.01), betas=(torch.tensor(0.9), 0.999))
    opt.step([torch.ones(5)])
    assert len(calls) == 1 and calls[0]["lr"] == pytest.approx(0.01)
    assert p[0].dtype == torch.float32


def test_torch_float64_tensor_lr_keeps_float32_params():
    torch = pytest.importorskip("torch")
    for impl in ("generic", "fused"):
        p = [torch.ones(3)]
        opt = polyopt.Adam(p, lr=torch.tensor(0.1, dtype=torch.float64), impl=impl)
        opt.step([torch.ones(3)])
        assert p[0].dtype == torch.float32


def test_torch_tensor_lr_that_requires_grad_stays_a_tensor():
    # a learned lr (meta-learning): the engine must not read it as a float
    torch = pytest.importorskip("torch")
    lr = torch.tensor(0.1, requires_grad=True)
    opt = polyopt.sgd(lr=lr)
    p = [torch.ones(3)]
    state = opt.init(p)
    with torch.enable_grad():
        new, _ = polyopt.Optimizer(opt.rule, {"lr": lr}, "generic").update(
            p, [torch.ones(3)], state
        )
    np.testing.assert_allclose(new[0].detach().numpy(), 0.9, rtol=1e-6)


# -- JAX arrays and tracers ------------------------------------------------------------------


@pytest.fixture
def jax():
    return pytest.importorskip("jax")


def _jax_problem(jnp):
    params = {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray([0.3, 0.1])}
    grads = [
        {"w": jnp.asarray([0.5, 0.1, -1.0]) * (k + 1), "b": jnp.asarray([-0.25, 2.0])}
        for k in range(3)
    ]
    return params, grads


def _train(name, hp, params, grads):
    opt = polyopt.OPTIMIZERS[name][0](**hp)
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    return params


@pytest.mark.parametrize("name", NAMES)
def test_jit_with_array_hyperparameters_equals_numbers(jax, name):
    jnp = jax.numpy
    params, grads = _jax_problem(jnp)
    hp = _cfg(name)
    numeric = _numeric(name, hp)

    @jax.jit
    def train(values):
        return _train(name, {**hp, **values}, params, grads)

    traced = train(
        {
            k: (tuple(map(jnp.asarray, v)) if isinstance(v, tuple) else jnp.asarray(v))
            for k, v in numeric.items()
        }
    )
    plain = _train(name, hp, params, grads)
    for k in plain:
        np.testing.assert_allclose(traced[k], plain[k], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_learning_rates_equals_separate_runs(jax, name):
    jnp = jax.numpy
    params, grads = _jax_problem(jnp)
    hp = _cfg(name)
    lrs = jnp.asarray([0.5, 1.0, 2.0]) * hp["lr"]
    batched = jax.vmap(lambda lr: _train(name, {**hp, "lr": lr}, params, grads))(lrs)
    for i, lr in enumerate(lrs.tolist()):
        one = _train(name, {**hp, "lr": lr}, params, grads)
        for k in one:
            np.testing.assert_allclose(batched[k][i], one[k], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_vmap_over_a_schedule_scaled_by_a_traced_lr(jax, name):
    """``lr=lambda k: α·η(k)`` with α a vmapped tracer: the schedule's value is an array
    even where the step count is a host int (init's check), and the batched runs equal
    separate runs with ``cosine(α, T)`` (the grids of ``polyopt paper``)."""
    from polyopt import schedules

    jnp = jax.numpy
    params, grads = _jax_problem(jnp)
    eta = schedules.cosine(1.0, 4)
    alphas = jnp.asarray([0.01, 0.03, 0.1])
    kw = {"weight_decay": 0.1, **({"momentum": 0.9} if name == "sgd" else {})}
    factory = polyopt.OPTIMIZERS[name][0]

    def train(lr):
        opt = factory(lr=lr, **kw)
        p, state = params, opt.init(params)
        for g in grads:
            p, state = opt.update(p, g, state)
        return p

    batched = jax.jit(jax.vmap(lambda a: train(lambda k: a * eta(k))))(alphas)
    for i, a in enumerate(alphas.tolist()):
        one = train(schedules.cosine(a, 4))
        for k in one:
            np.testing.assert_allclose(batched[k][i], one[k], rtol=2e-6, atol=1e-7)


def test_vmap_over_betas(jax):
    jnp = jax.numpy
    params, grads = _jax_problem(jnp)
    b1s = jnp.asarray([0.5, 0.9, 0.95])
    batched = jax.vmap(lambda b1: _train("adam", {"lr": 0.1, "betas": (b1, 0.999)}, params, grads))(
        b1s
    )
    for i, b1 in enumerate(b1s.tolist()):
        one = _train("adam", {"lr": 0.1, "betas": (b1, 0.999)}, params, grads)
        np.testing.assert_allclose(batched["w"][i], one["w"], rtol=2e-6)


def test_grad_with_respect_to_lr_sgd_closed_form(jax):
    # one SGD step: p1 = p0 - lr·g, loss = |p1|²/2, d loss / d lr = -g·p1
    jnp = jax.numpy
    p0, g = jnp.asarray([1.0, -2.0, 0.5]), jnp.asarray([0.5, 0.1, -1.0])

    def loss(lr):
        opt = polyopt.sgd(lr=lr)
        p1, _ = opt.update(p0, g, opt.init(p0))
        return 0.5 * jnp.sum(p1**2)

    lr = 0.3
    expected = -float(jnp.dot(g, p0 - lr * g))
    assert float(jax.grad(loss)(lr)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adadelta", "adam"])
def test_grad_with_respect_to_lr_matches_finite_differences(jax, name):
    jnp = jax.numpy
    params, grads = _jax_problem(jnp)
    hp = _cfg(name)

    def loss(lr):
        p = _train(name, {**hp, "lr": lr}, params, grads)
        return jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)

    lr, h = hp["lr"], hp["lr"] * 1e-2
    fd = (float(loss(lr + h)) - float(loss(lr - h))) / (2 * h)
    g = float(jax.jit(jax.grad(loss))(lr))
    assert g == pytest.approx(fd, rel=2e-2, abs=1e-4)


def test_stateful_form_with_a_jax_array_lr(jax):
    jnp = jax.numpy
    params, grads = _jax_problem(jnp)
    a = polyopt.AdamW(params, lr=jnp.asarray(0.1))
    b = polyopt.AdamW(params, lr=0.1)
    for g in grads:
        a.step(g)
        b.step(g)
    np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-6)
    assert a.params["w"].dtype == jnp.float32


def test_traced_values_are_not_checked_under_jit(jax):
    # a negative lr has no value at construction under jit: no error (documented), and
    # the same value as a number is refused
    jnp = jax.numpy
    p = jnp.ones(2)

    @jax.jit
    def f(lr):
        opt = polyopt.sgd(lr=lr)
        return opt.update(p, jnp.ones(2), opt.init(p))[0]

    np.testing.assert_allclose(f(-1.0), [2.0, 2.0])
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -1\.0"):
        polyopt.sgd(lr=-1.0)
    with pytest.raises(ValueError, match=r"lr must be >= 0"):
        polyopt.sgd(lr=jnp.asarray(-1.0))  # concrete: checked


# -- what is not a real number ------------------------------------------------------------


BAD = {
    "fraction": (fractions.Fraction(1, 3), TypeError, r"lr must be a real number.*Fraction"),
    "huge-int": (10**400, ValueError, r"lr is too large for a float"),
    "str": ("0.1", TypeError, r"lr must be a real number.*str.*'0\.1'"),
    "list": ([0.1], TypeError, r"lr must be a real number.*list"),
    "complex": (1e-3 + 0j, TypeError, r"lr must be a real number.*complex"),
    "none": (None, TypeError, r"lr must be a real number.*NoneType"),
    "numpy-vector": (
        np.array([0.1, 0.2]),
        TypeError,
        r"lr must be a number or a 0-d array.*\(2,\)",
    ),
    "numpy-bool": (np.bool_(True), TypeError, r"lr must be a number"),
    "numpy-complex": (np.complex128(1), TypeError, r"lr must be a real number"),
}


@pytest.mark.parametrize("form", ["stateful", "functional"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", list(BAD))
def test_not_a_real_number_is_refused_at_construction(name, form, bad):
    value, exc, rx = BAD[bad]
    factory, cls = polyopt.OPTIMIZERS[name]
    with pytest.raises(exc, match=rx):
        if form == "stateful":
            cls([np.ones(3)], lr=value)
        else:
            factory(lr=value)


def test_other_hyperparameters_name_themselves():
    with pytest.raises(TypeError, match=r"betas\[1\] must be a real number.*str"):
        polyopt.adam(betas=(0.9, "0.999"))
    with pytest.raises(ValueError, match=r"betas must be a tuple of 2 numbers"):
        polyopt.adam(betas=(0.9,))
    with pytest.raises(TypeError, match=r"momentum must be a real number.*Fraction"):
        polyopt.sgd(momentum=fractions.Fraction(9, 10))
    with pytest.raises(ValueError, match=r"eps is too large"):
        polyopt.adam(eps=10**400)


def test_torch_tensors_that_are_not_0d_or_real_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"lr must be a number or a 0-d array.*\(2,\)"):
        polyopt.adam(lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match=r"lr must be a real number.*complex"):
        polyopt.adam(lr=torch.tensor(0.1 + 0j))
    with pytest.raises(ValueError, match=r"lr must be >= 0.*-0\.1"):
        polyopt.adam(lr=torch.tensor(-0.1))


def test_betas_given_as_a_list_are_copied():
    betas = [0.9, 0.999]
    opt = polyopt.Adam([np.ones(2)], betas=betas)
    betas[0] = 0.0  # the caller's list changes: the optimizer's must not
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    sd = opt.state_dict()
    sd["param_groups"][0]["betas"] = None  # nor the snapshot's
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


# -- values the compute dtype cannot hold ---------------------------------------------------


@pytest.mark.parametrize("impl", ["generic", "fused"])
def test_lr_that_overflows_float32_is_refused_before_anything_changes(impl):
    torch = pytest.importorskip("torch")
    for params, ones in (
        ([torch.ones(3)], lambda: [torch.ones(3)]),
        ([np.ones(3, np.float32)], lambda: [np.ones(3, np.float32)]),
    ):
        with pytest.raises(ValueError, match=r"lr=1e\+308 overflows float32"):
            polyopt.AdamW(params, lr=1e308, impl=impl)
        opt = polyopt.AdamW(params, lr=1e-3, impl=impl)
        opt.step(ones())
        before = testing.to_numpy(params[0]).copy()
        opt.param_groups[0]["lr"] = 1e308
        with pytest.raises(ValueError, match=r"lr=1e\+308 overflows float32"):
            opt.step(ones())
        assert np.array_equal(testing.to_numpy(params[0]), before)
        assert opt.step_count == 1


def test_lr_that_float64_holds_is_accepted_for_float64_params():
    opt = polyopt.sgd(lr=1e300)
    p = np.ones(1)
    p, _ = opt.update(p, np.full(1, 1e-300), opt.init(p))
    assert math.isfinite(float(p[0]))
