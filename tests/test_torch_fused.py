"""The torch fast path (torch's fused Adam/AdamW kernels) held to the generic path.

Every comparison runs ``impl="fused"`` and ``impl="generic"`` side by side from the same
tensors for 30 steps and compares params **and every state entry** after every step.
Error: ``max |fused - generic| / max |generic|`` over the tensors of one dtype, for the
params and for each state entry.
Tolerances: float64 1e-10, float32 1e-5. Measured on torch 2.13 CPU: at most 2.3e-15
(float64) and 1e-6 (float32), from the kernel's ``lerp`` for the first moment and, for
AdamW, its ``p·(1 − lr·λ)`` with the factor rounded to float32 where the generic rule
computes ``p − (lr·λ)·p`` (see polyopt/backends/torch.py: over 30 steps of pure decay
at lr = 1e-3, λ = 1e-2 the params differ by 1.6e-6 in float32, 2.4e-15 in float64).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import polyopt  # noqa: E402
from polyopt import backends  # noqa: E402
from polyopt.testing import max_error  # noqa: E402

STEPS = 30
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

#: name -> (factory name, hyperparameters)
CONFIGS = {
    "adam": ("adam", {"lr": 1e-2}),
    "adam_l2": ("adam", {"lr": 1e-2, "weight_decay": 0.1}),
    "adamw": ("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
    "amsgrad": ("adamw", {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}),
    "maximize": ("adam", {"lr": 1e-2, "weight_decay": 0.1, "maximize": True}),
    "schedule": ("adamw", {"lr": polyopt.schedules.cosine(1e-2, T_max=STEPS)}),
}


# tiny tensors: torch on one thread for this module, also in a serial run (conftest)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


LAYOUTS = {
    "small": [(), (0,), (7,), (3, 5)],
    "200_tensors": [((i % 13) + 1, (i % 3) + 1) for i in range(200)],
}


def _problem(shapes, dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dts = dtypes if isinstance(dtypes, list) else [dtypes] * len(shapes)
    params = [torch.randn(s, generator=gen, dtype=dt) for s, dt in zip(shapes, dts)]
    grads = [
        [torch.randn(s, generator=gen, dtype=dt) for s, dt in zip(shapes, dts)]
        for _ in range(STEPS)
    ]
    return params, grads


def _run(form, name, hp, impl, params, grads):
    """Yield (params, slots) after each step; ``params`` are cloned first."""
    params = [p.clone() for p in params]
    if form == "stateful":
        cls = polyopt.OPTIMIZERS[name][1]
        opt = cls(params, **hp, impl=impl)
        for g in grads:
            opt.step(g)
            yield params, opt.state.slots
    else:
        opt = getattr(polyopt, name)(**hp, impl=impl)
        state = opt.init(params)
        for g in grads:
            params, state = opt.update(params, g, state)
            yield params, state.slots


def _error(actual: list, desired: list) -> dict:
    """Largest normalized error per dtype: ``max |a - d|`` over the tensors of that dtype
    divided by their largest ``|d|`` (a one-element moment can pass through zero, where
    its own scale measures the cancellation, not the kernel)."""
    by_dtype: dict = {}
    for a, d in zip(actual, desired):
        assert a.dtype == d.dtype and a.shape == d.shape
        by_dtype.setdefault(d.dtype, ([], []))
        by_dtype[d.dtype][0].append(a.reshape(-1))
        by_dtype[d.dtype][1].append(d.reshape(-1))
    out = {}
    for dt, (a_list, d_list) in by_dtype.items():
        a, d = torch.cat(a_list), torch.cat(d_list)
        if d.numel() == 0:
            continue
        assert bool(torch.isfinite(a).all())
        diff, scale = float((a - d).abs().max()), float(d.abs().max())
        out[dt] = diff / scale if scale else diff
    return out


def _compare(form, name, hp, params, grads):
    worst = 0.0
    runs = zip(
        _run(form, name, hp, "fused", params, grads),
        _run(form, name, hp, "generic", params, grads),
    )
    for k, ((fp, fs), (gp, gs)) in enumerate(runs):
        entries = {"params": (fp, gp)}
        assert set(fs) == set(gs)
        for n, arrays in gs.items():
            assert len(fs[n]) == len(arrays)
            entries[n] = (list(fs[n]), list(arrays))
        for what, (a, b) in entries.items():
            for dt, err in _error(a, b).items():
                assert err <= TOL[dt], f"{what} ({dt}) after step {k + 1}: {err:.3g}"
                worst = max(worst, err)
    return worst


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("form", ["stateful", "functional"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fused_matches_generic(config, form, dtype, layout):
    name, hp = CONFIGS[config]
    params, grads = _problem(LAYOUTS[layout], dtype)
    _compare(form, name, hp, params, grads)


@pytest.mark.parametrize("form", ["stateful", "functional"])
def test_mixed_dtypes_in_one_group(form):
    shapes = [(4, 3), (5,), (), (2, 2), (0,)]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.float32]
    params, grads = _problem(shapes, dtypes)
    _compare(form, "adamw", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}, params, grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_within_conformance_tolerance(dtype):
    # the kernel computes in float32 and stores in the param's dtype, as the generic path
    # does; rounding order differs, so compare at the conformance matrix's tolerances
    from polyopt.testing import TOLERANCES

    params, grads = _problem([(7,), (3, 5)], dtype)
    runs = zip(
        _run("stateful", "adamw", {"lr": 1e-2}, "fused", params, grads[:6]),
        _run("stateful", "adamw", {"lr": 1e-2}, "generic", params, grads[:6]),
    )
    for (fp, _), (gp, _) in runs:
        for a, b in zip(fp, gp):
            assert a.dtype == dtype
            assert max_error(a, b) <= TOLERANCES[str(dtype).split(".")[-1]]


def test_pure_form_does_not_mutate_inputs():
    params, grads = _problem(LAYOUTS["small"] + [(6, 4)], torch.float32)
    opt = polyopt.adamw(lr=0.1, weight_decay=0.1, amsgrad=True, maximize=True, impl="fused")
    state = opt.init(params)
    state = opt.update(params, grads[0], state)[1]  # non-zero state
    before = (
        [p.clone() for p in params],
        [g.clone() for g in grads[1]],
        {n: [a.clone() for a in arrays] for n, arrays in state.slots.items()},
    )
    new_params, new_state = opt.update(params, grads[1], state)
    for a, b in zip(params, before[0]):
        assert torch.equal(a, b)
    for a, b in zip(grads[1], before[1]):
        assert torch.equal(a, b)
    for n, arrays in before[2].items():
        assert all(torch.equal(a, b) for a, b in zip(state.slots[n], arrays))
    for p, q in zip(params, new_params):
        assert q is not p
    for n, arrays in state.slots.items():
        assert all(t is not s for s, t in zip(arrays, new_state.slots[n]))
    assert any(not torch.equal(p, q) for p, q in zip(params, new_params))


def test_stateful_form_updates_parameters_in_place_and_leaves_grads():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    params = list(model.parameters())
    ids = [id(p) for p in params]
    ptrs = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    opt = polyopt.AdamW(params, lr=0.1, impl="fused")
    model(torch.randn(8, 4)).sum().backward()
    grads_before = [p.grad.clone() for p in params]
    opt.step()
    for p, i, ptr, b, gb in zip(model.parameters(), ids, ptrs, before, grads_before):
        assert id(p) == i and isinstance(p, torch.nn.Parameter) and p.requires_grad
        assert p.data_ptr() == ptr
        assert not torch.equal(p.detach(), b)
        assert torch.equal(p.grad, gb)


def test_non_contiguous_params_take_the_generic_rule_and_stay_inside_their_view():
    # torch's CPU kernel ignores strides; a strided view must not reach it
    buf = torch.zeros(3, 8, dtype=torch.float64)
    view = buf[:, ::2]
    view.copy_(torch.arange(12.0, dtype=torch.float64).reshape(3, 4))
    ref = view.clone()
    grads = [torch.ones(3, 4, dtype=torch.float64).t().contiguous().t()]  # strided grad too
    fused = polyopt.AdamW([view], lr=0.1, impl="fused")
    generic = polyopt.AdamW([ref], lr=0.1, impl="generic")
    for _ in range(3):
        fused.step(grads)
        generic.step(grads)
    assert torch.equal(buf[:, 1::2], torch.zeros(3, 4, dtype=torch.float64))
    assert max_error(view, ref) <= 1e-15


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_auto_uses_the_fused_kernel(name, monkeypatch):
    assert backends.lookup(name, "torch", "auto") is backends.FUSED[(name, "torch")]
    kernel = "_fused_adamw_" if name == "adamw" else "_fused_adam_"
    calls = []
    real = getattr(torch, kernel)

    def spy(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, kernel, spy)
    params = [torch.randn(5), torch.randn(2, 3), torch.randn(4, dtype=torch.float64)]
    cls = polyopt.OPTIMIZERS[name][1]
    cls(params, weight_decay=0.1).step([torch.ones_like(p) for p in params])
    assert sorted(calls) == [1, 2]  # one call per (device, dtype): float32 ×2, float64 ×1
    calls.clear()
    cls(params, impl="generic").step([torch.ones_like(p) for p in params])
    assert calls == []


def test_step_count_reaches_the_kernel_as_one_based_t(monkeypatch):
    seen = []
    real = torch._fused_adamw_

    def spy(params, grads, m, v, vmax, steps, **kwargs):
        seen.append({float(t) for t in steps})
        return real(params, grads, m, v, vmax, steps, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    p = [torch.randn(3)]
    opt = polyopt.AdamW(p, impl="fused")
    for _ in range(3):
        opt.step([torch.ones(3)])
    assert seen == [{1.0}, {2.0}, {3.0}]


@pytest.mark.parametrize(
    ("lr", "weight_decay", "in_kernel"),
    [(1e-3, 1e-2, True), (1e-4, 1e-2, False), (1e-3, 1e-4, False)],
)
def test_small_decoupled_decay_is_applied_as_the_rule_does(
    lr, weight_decay, in_kernel, monkeypatch
):
    # the kernel's float32 factor 1 - lr·λ is off by up to 3e-8: 0.14 % of the decay at
    # lr·λ = 1e-5 (left to the kernel), 1.3 % at 1e-6 and 19 % at 1e-7 (done exactly)
    seen = []
    real = torch._fused_adamw_

    def spy(*args, **kwargs):
        seen.append(kwargs["weight_decay"])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    p0 = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    fused, generic = p0.clone(), p0.clone()
    zero = [torch.zeros(1000)]  # only the decay acts
    opt_f = polyopt.AdamW([fused], lr=lr, weight_decay=weight_decay, impl="fused")
    opt_g = polyopt.AdamW([generic], lr=lr, weight_decay=weight_decay, impl="generic")
    for _ in range(100):
        opt_f.step(zero)
        opt_g.step(zero)
    assert set(seen) == {weight_decay if in_kernel else 0.0}
    err = max_error(fused, generic)
    if in_kernel:  # the kernel's bias: about 100 steps × 1.4e-8
        assert 0 < err < 1e-5
    else:
        assert err == 0.0  # the same operations as the generic rule


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("rmsprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.1}),
        ("adadelta", {}),
        ("sgd", {"momentum": 0.9, "nesterov": True}),  # the derived kernel where
        ("adagrad", {"lr_decay": 0.01}),  # torch has one too (DERIVED_ON_CPU)
        ("adamw", {"amsgrad": True}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_derived_kernel_on_torch_equals_generic_bit_for_bit(name, hp, dtype, monkeypatch):
    """RMSprop and Adadelta have no torch kernel: their fast path is the numba kernel
    compiled from the rule itself (polyopt.backends._derive), run on the tensors' memory.
    It is used, and gives the generic path's numbers to the last bit: NumPy's generic
    path, that is. torch's own vectorized sqrt is not correctly rounded (measured: it
    differs from IEEE sqrt by 1 ulp on some inputs), so against torch's generic path
    the kernel agrees within the fused-path tolerance (float32: 4e-7 measured)."""
    pytest.importorskip("numba")
    from polyopt.backends import _derive
    from polyopt.backends import torch as torch_backend

    monkeypatch.setattr(torch_backend, "DERIVED_ON_CPU", True)
    calls = []
    real = _derive.numba_kernel
    monkeypatch.setattr(_derive, "numba_kernel", lambda *a: (calls.append(1), real(*a))[1])
    params, grads = _problem(LAYOUTS["small"], dtype)
    cls = polyopt.OPTIMIZERS[name][1]
    fused = cls([p.clone() for p in params], **hp)
    on_numpy = cls([p.numpy().copy() for p in params], **hp, impl="generic")
    on_torch = cls([p.clone() for p in params], **hp, impl="generic")
    for g in grads:
        fused.step(g)
        on_numpy.step([x.numpy() for x in g])
        on_torch.step(g)
    assert calls  # the derived kernel ran
    for a, b, c in zip(fused.params, on_numpy.params, on_torch.params):
        np.testing.assert_array_equal(a.numpy(), b)
        torch.testing.assert_close(a, c, rtol=TOL[dtype], atol=0)
    for n, arrays in fused.state.slots.items():
        for a, b in zip(arrays, on_numpy.state.slots[n]):
            np.testing.assert_array_equal(a.numpy(), b)
