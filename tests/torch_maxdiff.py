"""Largest relative difference of polyopt's params from torch.optim's, per case.

Run ``python tests/torch_maxdiff.py [steps]`` (default 150 steps, float64): prints a table
``case id -> max relative difference`` for every case of tests/cases.py that torch.optim
supports. The difference of one step is ``max|p_polyopt - p_torch| / max|p_torch|`` over
each parameter array (normwise, so entries that happen to cross zero do not dominate);
the figure is the largest over all arrays and steps.

Also the torch side of tests/test_torch.py: :func:`torch_run` drives ``torch.optim``
(with torch's own LR schedulers for schedule cases) over a gradient sequence. torch is
imported inside the functions, so importing this module never needs torch.
"""

from __future__ import annotations

import sys

import numpy as np

import cases as C  # noqa: E402
import reference  # noqa: E402

#: polyopt slot name -> torch optimizer.state[p] key (the same names by design).
SLOT_TO_TORCH = {
    n: n
    for n in (
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "sum",
        "square_avg",
        "grad_avg",
        "acc_delta",
        "exp_inf",
    )
}


def torch_class(name: str):
    """The torch.optim class named as polyopt's stateful class for optimizer ``name``
    (``"adamw"`` -> ``torch.optim.AdamW``), or None where torch has none (or no torch)."""
    import polyopt

    try:
        import torch
    except ImportError:
        return None
    return getattr(torch.optim, polyopt.OPTIMIZERS[name][1].__name__, None)


def functional_run(case: C.Case):
    """``run(p0, grads)``: polyopt's functional form on NumPy copies of ``p0``, yielding
    ``(params, per-array slots)`` after each step (a None grad: no gradient)."""
    import polyopt

    def run(p0, grads):
        opt = polyopt.OPTIMIZERS[case.name][0](**C.polyopt_hyperparams(case))
        params = [p.copy() for p in p0]
        state = opt.init(params)
        for g in grads:
            params, state = opt.update(params, g, state)
            yield params, state.per_array(len(params))

    return run


def stateful_torch_run(case: C.Case):
    """``run(p0, grads)``: polyopt's stateful form updating torch tensors in place, with
    the grads given through ``.grad`` (None: the tensor is skipped)."""
    import torch

    import polyopt

    def run(p0, grads):
        tensors = [torch.tensor(p) for p in p0]
        opt = polyopt.OPTIMIZERS[case.name][1](tensors, **C.polyopt_hyperparams(case))
        for gs in grads:
            for t, g in zip(tensors, gs, strict=True):
                t.grad = None if g is None else torch.tensor(g)
            opt.step()
            per_array = opt.state.per_array(len(tensors))
            slots = [{n: v.numpy() for n, v in s.items()} for s in per_array]
            yield [t.numpy() for t in tensors], slots

    return run


def torch_supports(case: C.Case) -> bool:
    """torch.optim.SGD has no decoupled weight decay (SGDW) and torch has no Lion, LAMB
    or schedule-free AdamW: those cases are held to the reference or to optax
    (tests/test_optax_jax.py). torch.optim.Adafactor divides by zero on the shared
    problem's empty array: tests/test_adafactor.py holds it to torch on its own problem."""
    if torch_class(case.name) is None or case.name == "adafactor":
        return False
    return not (case.name == "sgd" and case.hyperparams.get("decoupled_weight_decay", False))


def _scheduler_builder(spec: C.Sched):
    """``(base_lr, build)`` with ``build(optimizer)`` making torch's scheduler for ``spec``."""
    from torch.optim import lr_scheduler as L

    a = spec.args
    if spec.kind == "constant":
        return a["lr"], None
    if spec.kind == "step_decay":
        return a["lr"], lambda o: L.StepLR(o, step_size=a["step_size"], gamma=a.get("gamma", 0.1))
    if spec.kind == "exponential":
        return a["lr"], lambda o: L.ExponentialLR(o, gamma=a["gamma"])
    if spec.kind == "cosine":
        return a["lr"], lambda o: L.CosineAnnealingLR(
            o, T_max=a["T_max"], eta_min=a.get("eta_min", 0.0)
        )
    if spec.kind == "cosine_warm_restarts":
        return a["lr"], lambda o: L.CosineAnnealingWarmRestarts(
            o, T_0=a["T_0"], T_mult=a.get("T_mult", 1), eta_min=a.get("eta_min", 0.0)
        )
    if spec.kind == "linear":  # LinearLR's factors must be <= 1: use the larger end as base
        base = max(a["start"], a["end"])
        return base, lambda o: L.LinearLR(
            o, start_factor=a["start"] / base, end_factor=a["end"] / base, total_iters=a["steps"]
        )
    if spec.kind == "linear_warmup":
        return a["lr"], lambda o: L.LinearLR(
            o,
            start_factor=a.get("start_factor", 0.0),
            end_factor=1.0,
            total_iters=a["warmup_steps"],
        )
    if spec.kind == "join":
        parts = [_scheduler_builder(s) for s in a["schedules"]]
        bases = {b for b, _ in parts}
        if len(bases) != 1:
            raise ValueError(f"SequentialLR needs one base lr for all parts, got {sorted(bases)}")
        return bases.pop(), lambda o: L.SequentialLR(
            o, schedulers=[build(o) for _, build in parts], milestones=list(a["boundaries"])
        )
    raise ValueError(f"no torch scheduler for {spec.kind!r}")


def torch_optimizer(case: C.Case, tensors: list):
    """``(optimizer, scheduler or None, weight_decay schedule or None)`` for ``case``."""
    import torch

    hp = dict(case.hyperparams)
    lr_spec = hp.get("lr")
    build = None
    if isinstance(lr_spec, C.Sched):
        hp["lr"], build = _scheduler_builder(lr_spec)
    wd_fn = None
    if isinstance(hp.get("weight_decay"), C.Sched):
        # torch has no weight-decay scheduler: set the group's value before every step,
        # from the reference's closed form (independent of polyopt)
        wd_fn = C.resolve(hp["weight_decay"], reference.make_schedule)
        hp["weight_decay"] = wd_fn(0)
    if case.name == "sgd":
        hp.pop("decoupled_weight_decay", None)
        cls = torch.optim.SGD
    elif case.name == "adamw":
        decoupled = hp.pop("decoupled_weight_decay", True)
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        if not decoupled:
            hp.setdefault("weight_decay", 1e-2)  # polyopt.adamw's default, not Adam's 0
    else:
        cls = torch_class(case.name)
    opt = cls(tensors, **hp)
    sched = build(opt) if build is not None else None
    return opt, sched, wd_fn


class float64_scalars:  # noqa: N801 - a context manager, used like a function
    """torch keeps scalar state (NAdam's ``mu_product``) in the default dtype: float64
    inside this block, as for a user who set ``torch.set_default_dtype(torch.float64)``
    to train in float64 (the comparisons here are float64 at rtol 1e-9)."""

    def __init__(self, torch):
        self.torch = torch

    def __enter__(self):
        self.saved = self.torch.get_default_dtype()
        self.torch.set_default_dtype(self.torch.float64)

    def __exit__(self, *exc):
        self.torch.set_default_dtype(self.saved)


def torch_run(case: C.Case, p0: list, grads: list):
    """Yield ``(params, states)`` as NumPy arrays after each torch.optim step.

    ``p0`` may be float64 or complex128; a ``None`` in ``grads[k]`` leaves that tensor's
    ``.grad`` None for step k (torch skips it). A step where every grad is None changes
    nothing in torch; the LR scheduler is not stepped after it either, as polyopt's step
    count (which drives its schedules) does not move on such a step. A tensor torch
    holds no state for yet yields ``{}``."""
    import warnings

    import torch

    tensors = [torch.tensor(p, requires_grad=True) for p in p0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler construction warnings are not ours
        opt, sched, wd_fn = torch_optimizer(case, tensors)
    k = 0  # polyopt's step count: steps that updated something
    for gs in grads:
        if wd_fn is not None:
            for group in opt.param_groups:
                group["weight_decay"] = wd_fn(k)
        for t, g in zip(tensors, gs, strict=True):
            t.grad = None if g is None else torch.tensor(g)
        with float64_scalars(torch):
            opt.step()
        params = [t.detach().numpy().copy() for t in tensors]
        states = [
            {
                n: v.detach().numpy().copy()
                for n, v in opt.state[t].items()
                if n not in reference.COUNTED
            }
            for t in tensors
        ]
        yield params, states
        if all(g is None for g in gs):
            continue
        k += 1
        if sched is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sched.step()


def assert_matches_torch(case: C.Case, run, p0: list, grads: list, label: str, rtol=1e-9):
    """Run ``run(p0, grads)`` (yielding ``(params, per-array slots)`` after each step)
    beside :func:`torch_run` and assert every param and state entry within ``rtol``
    (``atol = rtol * max|torch|`` per array). An array torch holds no state for yet (it
    never had a gradient) must still hold polyopt's initial state."""
    import polyopt

    init = polyopt.OPTIMIZERS[case.name][0](**C.polyopt_hyperparams(case)).init(
        [np.array(p) for p in p0]
    )
    n = 0
    for k, ((params, slots), (tp, ts)) in enumerate(
        zip(run(p0, grads), torch_run(case, p0, grads), strict=True)
    ):
        n += 1
        for i, (p, q) in enumerate(zip(params, tp, strict=True)):
            _close(p, q, rtol, f"{case.id} [{label}] params[{i}] after step {k + 1}")
        for i, (s, st) in enumerate(zip(slots, ts, strict=True)):
            if not st:
                for name, a in s.items():
                    _close(a, init.slots[name][i], rtol, f"{case.id} [{label}] state[{i}][{name}]")
                continue
            assert set(s) == set(st), f"{case.id}: slots {sorted(s)} vs torch's {sorted(st)}"
            for name in s:
                what = f"{case.id} [{label}] state[{i}][{name}] after step {k + 1}"
                _close(s[name], st[name], rtol, what)
    assert n == len(grads)


def _close(actual, desired, rtol, what):
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    assert actual.dtype == desired.dtype, f"{what}: dtype {actual.dtype} != {desired.dtype}"
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    # assert_allclose's test itself, |a - d| <= atol + rtol * |d|, is ~6 us of its ~60 us
    # a call (a run of 120 steps makes ~2000): where it holds everywhere (so no NaN, no
    # inf) the call passes, so it is made only where it does not, for its checks and report
    with np.errstate(invalid="ignore"):  # inf - inf: left to assert_allclose
        within = np.all(np.abs(actual - desired) <= rtol * scale + rtol * np.abs(desired))
    if not within:
        np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=what)


def rel_diff(a, b) -> float:
    """Normwise relative difference ``max|a - b| / max|b|`` (0 for empty arrays)."""
    a, b = np.asarray(a), np.asarray(b)
    if b.size == 0:
        return 0.0
    scale = float(np.max(np.abs(b)))
    diff = float(np.max(np.abs(a - b)))
    return diff / scale if scale else diff


def max_param_diff(case: C.Case, steps: int = 150) -> float:
    """Largest :func:`rel_diff` of polyopt's (NumPy float64) params from torch's."""
    import polyopt

    p0, grads = C.make_problem(steps)
    opt = polyopt.OPTIMIZERS[case.name][0](**C.polyopt_hyperparams(case))
    params = [p.copy() for p in p0]
    state = opt.init(params)
    worst = 0.0
    for k, (tp, _) in enumerate(torch_run(case, p0, grads)):
        params, state = opt.update(params, grads[k], state)
        worst = max(worst, *(rel_diff(p, q) for p, q in zip(params, tp, strict=True)))
    return worst


def main(argv: list[str]) -> int:
    try:
        import torch
    except ImportError:
        print("torch is not installed: pip install -r backends/torch.txt", file=sys.stderr)
        return 2

    steps = int(argv[1]) if len(argv) > 1 else 150
    print(
        f"polyopt vs torch.optim {torch.__version__}: "
        f"max relative difference of params, float64, {steps} steps"
    )
    print(f"{'case':40s} max rel diff")
    for case in C.CASES:
        if torch_supports(case):
            print(f"{case.id:40s} {max_param_diff(case, steps):.1e}")
        else:
            print(f"{case.id:40s} n/a (torch.optim.SGD has no decoupled weight decay)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
