"""polyopt on CUDA: torch CUDA tensors and CuPy arrays.

Every test is marked ``gpu`` and skips, with the reason, where there is no CUDA device
(torch without CUDA, CuPy not installed or no device). Expected values come from
torch.optim on the same device, from polyopt's run on CPU tensors, and from NumPy runs.

Tolerances:
- float32 vs torch.optim.AdamW on CUDA and vs the CPU run: ``rtol = 1e-5`` elementwise
  with ``atol = 1e-5 * max|expected|`` per array (torch's foreach/lerp/addcdiv operation
  order and fused multiply-adds differ from the generic path's in the last bits).
- bfloat16: polyopt computes in float32 and stores bfloat16, torch.optim computes and
  stores its state in bfloat16, so the two are held to the conformance matrix's
  bfloat16 tolerance (``testing.TOLERANCES``, normwise); the CPU run of polyopt does the
  same math, so it must agree to about one bfloat16 rounding (1e-2 normwise).
"""

from __future__ import annotations

import numpy as np
import pytest

import polyopt
from polyopt import schedules, testing


def _torch_cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__})"
    return None


def _cupy_reason() -> str | None:
    """Why CuPy cells cannot run here: the conformance matrix's own check."""
    return next(b for b in testing.BACKENDS if b.name == "cupy").missing()


TORCH_CUDA = _torch_cuda_reason()
CUPY = _cupy_reason()
needs_torch_cuda = pytest.mark.skipif(TORCH_CUDA is not None, reason=str(TORCH_CUDA))
needs_cupy = pytest.mark.skipif(CUPY is not None, reason=str(CUPY))
pytestmark = pytest.mark.gpu

STEPS = 20
SHAPES = [(64, 33), (33,), (), (5, 4, 3)]
RTOL = 1e-5


def problem(seed=0, steps=STEPS):
    """float64 NumPy params and ``steps`` lists of gradients (changing scale, some zeros)."""
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s) for s in SHAPES]
    gs = []
    for k in range(steps):
        g = [10 ** rng.uniform(-1, 0.5) * rng.standard_normal(s) for s in SHAPES]
        if k % 7 == 3:
            g[1][::3] = 0.0
        gs.append(g)
    return p0, gs


def assert_close_f32(actual, desired, what):
    a, d = testing.to_numpy(actual), testing.to_numpy(desired)
    assert a.shape == d.shape, f"{what}: shape {a.shape} != {d.shape}"
    scale = float(np.max(np.abs(d))) if d.size else 0.0
    np.testing.assert_allclose(a, d, rtol=RTOL, atol=RTOL * scale, err_msg=what)


# -- torch CUDA ------------------------------------------------------------------------

ADAMW = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
SLOTS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


def polyopt_torch_run(device, dtype, p0, gs):
    """polyopt.AdamW (stateful, in place) on torch tensors: [(params, slots)] per step,
    slots as one dict per param (``OptState.per_array``), like torch.optim's state. Both
    are cloned: the fused path updates the state tensors in place, step after step."""
    import torch

    params = [torch.tensor(p, dtype=dtype, device=device) for p in p0]
    originals = list(params)
    opt = polyopt.AdamW(params, **ADAMW)
    out = []
    for g in gs:
        opt.step([torch.tensor(x, dtype=dtype, device=device) for x in g])
        slots = opt.state.per_array(len(params))
        out.append(
            ([p.clone() for p in params], [{n: a.clone() for n, a in s.items()} for s in slots])
        )
    # in place: the user's tensors were updated, on their device, in their dtype
    assert all(a is b for a, b in zip(opt.params, originals))
    for p in params:
        assert p.device.type == torch.device(device).type and p.dtype == dtype
    return out


def torch_optim_run(device, dtype, p0, gs):
    import torch

    params = [torch.tensor(p, dtype=dtype, device=device, requires_grad=True) for p in p0]
    opt = torch.optim.AdamW(params, **ADAMW)
    out = []
    for g in gs:
        for p, x in zip(params, g):
            p.grad = torch.tensor(x, dtype=dtype, device=device)
        opt.step()
        out.append(
            (
                [p.detach().clone() for p in params],
                [{n: opt.state[p][n].clone() for n in SLOTS} for p in params],
            )
        )
    return out


def compare_runs(got, expected, check, label):
    for k, ((gp, gs_), (ep, es)) in enumerate(zip(got, expected, strict=True)):
        for i, (a, d) in enumerate(zip(gp, ep, strict=True)):
            check(a, d, f"{label}: params[{i}] after step {k + 1}")
        for i, (sa, sd) in enumerate(zip(gs_, es, strict=True)):
            for n in SLOTS:
                check(sa[n], sd[n], f"{label}: state[{i}][{n!r}] after step {k + 1}")


def check_bf16(tol):
    def check(a, d, what):
        err = testing.max_error(a, d)
        assert err <= tol, f"{what}: error {err:.3g} > {tol:g}"

    return check


@needs_torch_cuda
def test_torch_cuda_float32_adamw_matches_torch_optim_and_cpu():
    import torch

    p0, gs = problem(1)
    got = polyopt_torch_run("cuda", torch.float32, p0, gs)
    for _, slots in got:
        assert all(a.is_cuda for s in slots for a in s.values())
    compare_runs(
        got,
        torch_optim_run("cuda", torch.float32, p0, gs),
        assert_close_f32,
        "float32 cuda vs torch.optim.AdamW cuda",
    )
    compare_runs(
        got,
        polyopt_torch_run("cpu", torch.float32, p0, gs),
        assert_close_f32,
        "float32 cuda vs polyopt on cpu",
    )


@needs_torch_cuda
def test_torch_cuda_bfloat16_adamw_matches_torch_optim_and_cpu():
    import torch

    p0, gs = problem(2, steps=testing.STEPS["bfloat16"])
    p0 = [testing.round_to(p, "bfloat16") for p in p0]
    gs = [[testing.round_to(g, "bfloat16") for g in step] for step in gs]
    got = polyopt_torch_run("cuda", torch.bfloat16, p0, gs)
    for params, slots in got:
        assert all(p.dtype == torch.bfloat16 for p in params)
        assert all(a.dtype == torch.bfloat16 for s in slots for a in s.values())
    compare_runs(
        got,
        torch_optim_run("cuda", torch.bfloat16, p0, gs),
        check_bf16(testing.TOLERANCES["bfloat16"]),
        "bfloat16 cuda vs torch.optim.AdamW cuda",
    )
    compare_runs(
        got,
        polyopt_torch_run("cpu", torch.bfloat16, p0, gs),
        check_bf16(1e-2),
        "bfloat16 cuda vs polyopt on cpu",
    )


@needs_torch_cuda
def test_torch_cuda_schedule_and_groups_match_torch_optim():
    """A cosine schedule (torch: CosineAnnealingLR) and a no-decay group on CUDA."""
    import torch

    p0, gs = problem(3)
    T = 15

    def groups(params):
        return [
            {"params": params[:2]},
            {"params": params[2:], "weight_decay": 0.0},
        ]

    params = [torch.tensor(p, dtype=torch.float32, device="cuda") for p in p0]
    opt = polyopt.AdamW(groups(params), lr=schedules.cosine(0.01, T), weight_decay=0.1)
    tparams = [torch.tensor(p, dtype=torch.float32, device="cuda", requires_grad=True) for p in p0]
    topt = torch.optim.AdamW(groups(tparams), lr=0.01, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=T)
    for k, g in enumerate(gs):
        tg = [torch.tensor(x, dtype=torch.float32, device="cuda") for x in g]
        opt.step([tg[:2], tg[2:]])
        for p, x in zip(tparams, tg):
            p.grad = x.clone()
        topt.step()
        sched.step()
        for i, (a, d) in enumerate(zip(params, tparams)):
            assert_close_f32(a, d.detach(), f"params[{i}] after step {k + 1}")


# -- CuPy ------------------------------------------------------------------------------


def cupy_options(name):
    """The optimizer's row of the case table with every state slot and schedules."""
    return testing.polyopt_hyperparams(testing.richest(name, testing.SCHEDULED))


def numpy_trajectory(name, dtype, p0, gs):
    opt = polyopt.OPTIMIZERS[name][0](**cupy_options(name), impl="generic")
    params = [p.astype(dtype) for p in p0]
    state = opt.init(params)
    out = []
    for g in gs:
        params, state = opt.update(params, [x.astype(dtype) for x in g], state)
        out.append((params, state.slots))
    return out


@needs_cupy
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(polyopt.OPTIMIZERS))
def test_cupy_generic_path_matches_numpy(name, dtype):
    import cupy as cp

    tol = 1e-12 if dtype == "float64" else RTOL
    p0, gs = problem(4, steps=10)
    ref = numpy_trajectory(name, dtype, p0, gs)
    factory, cls = polyopt.OPTIMIZERS[name]

    def check(a, d, what):
        assert isinstance(a, cp.ndarray), f"{what}: got {type(a).__name__}, not a CuPy array"
        assert str(a.dtype) == dtype, f"{what}: dtype {a.dtype}"
        a, d = testing.to_numpy(a), np.asarray(d, dtype=np.float64)
        scale = float(np.max(np.abs(d))) if d.size else 0.0
        np.testing.assert_allclose(a, d, rtol=tol, atol=tol * scale, err_msg=what)

    # functional form
    opt = factory(**cupy_options(name), impl="generic")
    params = [cp.asarray(p.astype(dtype)) for p in p0]
    state = opt.init(params)
    for k, g in enumerate(gs):
        params, state = opt.update(params, [cp.asarray(x.astype(dtype)) for x in g], state)
        rp, rs = ref[k]
        for i, (a, d) in enumerate(zip(params, rp)):
            check(a, d, f"{name} functional params[{i}] step {k + 1}")
        assert set(state.slots) == set(rs)
        for n, arrays in rs.items():
            assert len(state.slots[n]) == len(arrays)
            for i, (a, d) in enumerate(zip(state.slots[n], arrays)):
                check(a, d, f"{name} functional state[{n!r}][{i}] step {k + 1}")

    # stateful form: in place, the user's arrays
    params = [cp.asarray(p.astype(dtype)) for p in p0]
    originals = list(params)
    sopt = cls(params, **cupy_options(name), impl="generic")
    for k, g in enumerate(gs):
        sopt.step([cp.asarray(x.astype(dtype)) for x in g])
        for i, (a, d) in enumerate(zip(originals, ref[k][0])):
            check(a, d, f"{name} stateful params[{i}] step {k + 1}")
    assert all(a is b for a, b in zip(sopt.params, originals))


# -- the conformance matrix ------------------------------------------------------------


@pytest.mark.parametrize(
    "label, reason",
    [
        pytest.param("torch-cuda", TORCH_CUDA, marks=needs_torch_cuda, id="torch-cuda"),
        pytest.param("cupy", CUPY, marks=needs_cupy, id="cupy"),
    ],
)
def test_matrix_cells_pass(label, reason):
    assert reason is None
    backend = next(b for b in testing.BACKENDS if label in (b.name, b.label))
    results = testing.run(testing.cells([label], dtypes=backend.dtypes))
    assert results
    print("\n" + testing.table(results) + "\n" + testing.dtype_table(results))
    failed = [(r.cell.id, r.reason) for r in results if r.status == "fail"]
    assert not failed, failed
    ran = [r for r in results if r.status == "pass"]
    # every dtype the backend has runs (only fused cells without a fused path may skip)
    assert {r.cell.dtype for r in ran} == set(backend.dtypes)
    skipped = {r.reason for r in results if r.status == "skip"}
    assert all(s.startswith("no fused") for s in skipped), skipped
