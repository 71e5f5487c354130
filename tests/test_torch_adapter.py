"""polyopt.torch held to torch.optim: torch's own optimizer database, torch semantics,
checkpoints both ways.

Every numeric comparison runs the same float64 problem through ``torch.optim.<Name>``
and ``polyopt.torch.<Name>`` and compares the params (rtol 1e-9). The configurations
and error inputs are torch's own (``torch.testing._internal.common_optimizers``).
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
co = pytest.importorskip("torch.testing._internal.common_optimizers")

import numpy as np  # noqa: E402

import polyopt  # noqa: E402
import polyopt.torch as pt  # noqa: E402
from polyopt import testing  # noqa: E402

NAMES = [cls.__name__ for _, cls in polyopt.OPTIMIZERS.values()]
#: The classes the shared params below (a matrix, a vector, a 3-D array) suit: all but
#: the 2-D-only ones (testing.OWN_PROBLEMS: Muon, held to torch in tests/test_muon.py).
SHARED = [polyopt.OPTIMIZERS[n][1].__name__ for n in testing.NAMES]
#: Of those, the ones torch.optim has a class of the same name for.
TORCH = [n for n in SHARED if hasattr(torch.optim, n)]
RTOL, ATOL = 1e-9, 1e-12
INFO = {info.optim_cls.__name__: info for info in co.optim_db if info.optim_cls.__name__ in TORCH}
REFUSED = ("differentiable", "capturable")  # polyopt.torch raises for these


def _params(seed=0, complex_=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (4,), (2, 2, 2)]
    out = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    if complex_:
        out.append(torch.randn(3, generator=gen, dtype=torch.complex128))
    return [torch.nn.Parameter(p) for p in out]


def _grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        gs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        if t % 4 == 2:  # a frozen array this step: skipped, keeps its own step count
            gs[1] = None
        out.append(gs)
    return out


def _train(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


def _pair(name, kwargs, seed=0, complex_=False):
    pa, pb = _params(seed, complex_), _params(seed, complex_)
    return (getattr(torch.optim, name)(pa, **kwargs), pa), (getattr(pt, name)(pb, **kwargs), pb)


# -- torch's optimizer database ------------------------------------------------------------


def _configs():
    out = []
    for name in INFO:  # torch's own configurations, of the optimizers torch has
        inputs = co._get_optim_inputs_including_global_cliquey_kwargs(
            "cpu", torch.float64, INFO[name]
        )
        for i, oi in enumerate(inputs):
            out.append(pytest.param(name, oi.kwargs, id=f"{name}-{i}-{oi.desc}"))
    return out


CONFIGS = _configs()


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_optim_db_configuration(name, kwargs):
    """Each of torch's own test configurations (with the cliquey flags torch adds on
    CPU: fused, differentiable...): 12 steps with a param skipped now and then equal
    torch.optim's, or, for a flag polyopt does not support, a RuntimeError naming it."""
    refused = [f for f in REFUSED if kwargs.get(f)]
    if refused:
        with pytest.raises(RuntimeError, match=f"does not support {refused[0]}=True"):
            getattr(pt, name)(_params(), **kwargs)
        return
    (ta, pa), (tb, pb) = _pair(name, kwargs)
    grads = _grads(pa, 12)
    _same(_train(tb, pb, grads), _train(ta, pa, grads))
    for p, q in zip(pa, pb):  # the same state, slot by slot, steps included
        assert list(ta.state[p]) == list(tb.state[q])
        for key, value in ta.state[p].items():
            torch.testing.assert_close(tb.state[q][key], value, rtol=RTOL, atol=ATOL)


def _error_inputs():
    out = []
    for name in INFO:
        for i, e in enumerate(
            INFO[name].optim_error_inputs_func(device="cpu", dtype=torch.float64)
        ):
            if name == "Adafactor" and "complex" in e.optimizer_error_input.desc:
                # polyopt refuses complex params with a TypeError when the state is made
                # (a factored moment of a pair of reals means nothing): tested in
                # tests/test_adafactor.py; torch's RuntimeError comes from its step
                continue
            out.append(pytest.param(name, e, id=f"{name}-{i}-{e.optimizer_error_input.desc}"))
    return out


@pytest.mark.parametrize(("name", "error"), _error_inputs())
def test_optim_db_error_input(name, error):
    """torch's own error inputs raise (or warn) what torch raises, with its message."""
    oi = error.optimizer_error_input
    params = oi.params if oi.params is not None else _params()

    def run():
        opt = getattr(pt, name)(params, **oi.kwargs)
        if error.error_on == co.OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            run()
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            run()


# -- torch semantics -----------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCH)
def test_classes_are_the_torch_classes(name):
    opt = getattr(pt, name)(_params())
    assert isinstance(opt, getattr(torch.optim, name))
    assert type(opt).__module__ == "polyopt.torch"
    ref = getattr(torch.optim, name)(_params())
    assert opt.defaults == ref.defaults
    assert repr(opt) == repr(ref)  # torch's repr: class name and every group's keys


def test_positional_arguments_as_torch():
    (ta, pa), (tb, pb) = _pair("SGD", {})
    ta, tb = torch.optim.SGD(pa, 0.1, 0.9), pt.SGD(pb, 0.1, 0.9)
    assert tb.defaults["lr"] == 0.1 and tb.defaults["momentum"] == 0.9
    grads = _grads(pa, 5)
    _same(_train(tb, pb, grads), _train(ta, pa, grads))


def test_skipped_params_keep_their_own_count():
    (ta, pa), (tb, pb) = _pair("Adam", {"lr": 0.1})
    grads = _grads(pa, 9)
    _same(_train(tb, pb, grads), _train(ta, pa, grads))
    assert [float(tb.state[p]["step"]) for p in pb] == [9.0, 7.0, 9.0]
    assert [float(ta.state[p]["step"]) for p in pa] == [9.0, 7.0, 9.0]


def test_frozen_param_has_no_state_and_is_untouched():
    params = _params()
    before = params[1].detach().clone()
    opt = pt.AdamW(params, lr=0.1)
    for p in params:
        p.grad = None if p is params[1] else torch.ones_like(p)
    opt.step()
    assert torch.equal(params[1].detach(), before)
    assert params[1] not in opt.state and params[0] in opt.state


def test_zero_grad_closure_and_return_value():
    params = _params()
    opt = pt.Adam(params, lr=0.1)
    calls = []

    def closure():
        opt.zero_grad()
        loss = sum((p.abs() ** 2).sum() for p in params)
        loss.backward()
        calls.append(torch.is_grad_enabled())
        return loss

    with torch.no_grad():  # the closure still runs with grad enabled, as in torch
        loss = opt.step(closure)
    assert calls == [True] and float(loss.detach()) > 0
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    opt.step()  # no grads: nothing happens, no counter moves
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)


def test_failed_step_leaves_no_trace():
    """A step that fails after the new state was planned (here: an eps that float32
    cannot hold, found by the engine) adds no state entry."""
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = pt.Adam(params, eps=1e-60)
    params[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="eps"):
        opt.step()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}


def test_add_param_group_and_extra_keys():
    (ta, pa), (tb, pb) = _pair("SGD", {"lr": 0.1, "momentum": 0.9})
    extra_a, extra_b = _params(5)[:1], _params(5)[:1]
    ta.add_param_group({"params": extra_a, "lr": 0.01, "note": "head"})
    tb.add_param_group({"params": extra_b, "lr": 0.01, "note": "head"})
    assert tb.param_groups[1]["note"] == "head" and tb.param_groups[1]["momentum"] == 0.9
    grads = _grads(pa + extra_a, 6)
    _same(_train(tb, pb + extra_b, grads), _train(ta, pa + extra_a, grads))


def test_named_parameters():
    model_a, model_b = (torch.nn.Linear(3, 2).double() for _ in range(2))
    model_b.load_state_dict(model_a.state_dict())
    ta = torch.optim.AdamW(model_a.named_parameters(), lr=0.1)
    tb = pt.AdamW(model_b.named_parameters(), lr=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)
    for opt, model in ((ta, model_a), (tb, model_b)):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    _same(list(model_b.parameters()), list(model_a.parameters()))
    assert tb.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    assert tb.state_dict()["param_groups"] == ta.state_dict()["param_groups"]


def test_step_hooks_run():
    opt = pt.RMSprop(_params())
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert seen == ["pre", "post"]


@pytest.mark.parametrize("name", SHARED)
def test_deepcopy_and_pickle_continue_identically(name):
    params = _params()
    opt = getattr(pt, name)(params)
    grads = _grads(params, 8)
    _train(opt, params, grads[:4])
    twin = copy.deepcopy({"opt": opt, "params": params})  # the optimizer refers to params
    pickled = pickle.loads(pickle.dumps({"opt": opt, "params": params}))
    a = _train(opt, params, grads[4:])
    _same(_train(twin["opt"], twin["params"], grads[4:]), a)
    _same(_train(pickled["opt"], pickled["params"], grads[4:]), a)


def _takes_complex(name: str) -> bool:
    factory = next(f for f, c in polyopt.OPTIMIZERS.values() if c.__name__ == name)
    try:
        factory().init([np.zeros(2, np.complex128)])
    except TypeError:  # Adafactor: a factored moment of a pair of reals means nothing
        return False
    return True


@pytest.mark.parametrize("name", [n for n in TORCH if _takes_complex(n)])
def test_complex_params_equal_torch(name):
    (ta, pa), (tb, pb) = _pair(name, {}, complex_=True)
    grads = _grads(pa, 10)
    _same(_train(tb, pb, grads), _train(ta, pa, grads))


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW"])
def test_tensor_lr_equals_torch(name):
    """A float64 0-d tensor lr. (With a float32 one, torch's Adam rounds lr / (1 − β1^t)
    to float32 and polyopt does not: they differ by up to 3e-9 relative.)"""
    (ta, pa), (tb, pb) = _pair(name, {"lr": torch.tensor(0.01, dtype=torch.float64)})
    grads = _grads(pa, 6)
    _same(_train(tb, pb, grads), _train(ta, pa, grads))


def test_bad_values_set_later_fail_before_anything_changes():
    params = _params()
    opt = pt.Adam(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -1.0"):
        opt.step()
    _same([p.detach() for p in params], before)
    assert float(opt.state[params[0]]["step"]) == float(state["state"][0]["step"])


def test_sparse_gradients_refused():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = pt.SGD([p], lr=0.1)
    p.grad = torch.zeros(4, dtype=torch.float64).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_flags_refused_or_mapped(monkeypatch):
    for flag in REFUSED:
        with pytest.raises(RuntimeError, match=f"does not support {flag}=True"):
            pt.Adam(_params(), **{flag: True})
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        pt.Adam(_params(), foreach=True, fused=True)  # torch's own check
    assert pt.AdamW(_params(), fused=True)._polyopt.impl == "fused"
    assert pt.AdamW(_params(), foreach=False)._polyopt.impl == "generic"
    assert pt.AdamW(_params())._polyopt.impl == "auto"
    # fused=True where polyopt has no fused path: a clear error, not a silent fallback
    from polyopt import backends

    monkeypatch.delitem(backends.FUSED, ("sgd", "torch"))
    monkeypatch.delitem(backends.EVERY, "torch")  # and no kernel derived from the rule
    with pytest.raises(RuntimeError, match="polyopt has no fused sgd step for torch tensors"):
        pt.SGD(_params(), fused=True)


def test_polyopt_only_hyperparameter():
    """SGD's decoupled_weight_decay (SGDW) is polyopt's: a keyword, kept in the groups,
    checked like the rest, absent from the groups unless given."""
    assert "decoupled_weight_decay" not in pt.SGD(_params()).param_groups[0]
    params = _params()
    opt = pt.SGD(params, lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    for p in params:
        p.grad = torch.zeros_like(p)
    before = params[0].detach().clone()
    opt.step()
    torch.testing.assert_close(params[0].detach(), before * (1 - 0.1 * 0.5), rtol=1e-15, atol=0)
    with pytest.raises(TypeError, match="decoupled_weight_decay must be True or False"):
        pt.SGD(_params(), decoupled_weight_decay="yes")
    # AdamW's is torch's own (fixed to True): not an argument there, as in torch
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        pt.AdamW(_params(), decoupled_weight_decay=False)


def test_generated_without_a_torch_class():
    """An optimizer torch does not have gets a constructor from the rule's own
    signature and checks (what later optimizers such as Lion will use)."""
    cls = pt.adapter("SGDW", polyopt.sgd, base=None)
    assert issubclass(cls, torch.optim.Optimizer) and not issubclass(cls, torch.optim.SGD)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        cls(_params(), lr=-1.0)
    params_a, params_b = _params(), _params()
    ref = torch.optim.SGD(params_a, lr=0.1, momentum=0.9)
    opt = cls(params_b, 0.1, momentum=0.9)
    grads = _grads(params_a, 6)
    _same(_train(opt, params_b, grads), _train(ref, params_a, grads))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == 0.1 and "step" in sd["state"][0]


# -- checkpoints, interchangeable with torch.optim -------------------------------------------


KWARGS = {
    "SGD": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "Adagrad": {"lr": 0.1, "lr_decay": 0.01},
    "RMSprop": {"lr": 0.01, "centered": True, "momentum": 0.5},
    "Adadelta": {"weight_decay": 0.1},
    "Adam": {"lr": 0.01, "amsgrad": True},
    "AdamW": {"lr": 0.01},
    "NAdam": {"lr": 0.01, "momentum_decay": 0.01},
    "RAdam": {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    "Adamax": {"lr": 0.01, "weight_decay": 0.1},
    "Adafactor": {"lr": 0.05, "weight_decay": 0.1},
}


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _same_format(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert list(a["state"]) == list(b["state"])
    for i in a["state"]:
        assert list(a["state"][i]) == list(b["state"][i])  # the same keys in the same order
        for key in a["state"][i]:
            x, y = a["state"][i][key], b["state"][i][key]
            assert (x.dtype, x.shape, x.device) == (y.dtype, y.shape, y.device), key


@pytest.mark.parametrize("direction", ["torch->polyopt", "polyopt->torch"])
@pytest.mark.parametrize("name", TORCH)
def test_checkpoints_move_between_torch_and_polyopt(name, direction):
    kwargs = {**KWARGS[name], "foreach": False}
    (ta, pa), (tb, pb) = _pair(name, kwargs)
    grads = _grads(pa, 10)
    _same(_train(tb, pb, grads[:5]), _train(ta, pa, grads[:5]))
    _same_format(tb.state_dict(), ta.state_dict())
    src, (dst_cls, dst_params) = (
        ((ta, pa), (pt, _params()))
        if direction == "torch->polyopt"
        else ((tb, pb), (torch.optim, _params()))
    )
    with torch.no_grad():
        for q, p in zip(dst_params, src[1]):
            q.copy_(p)
    dst = getattr(dst_cls, name)(dst_params, **kwargs)
    dst.load_state_dict(_roundtrip(src[0].state_dict()))
    uninterrupted = _train(ta, pa, grads[5:])
    _same(_train(dst, dst_params, grads[5:]), uninterrupted)


# -- lr schedulers ---------------------------------------------------------------------------

S = torch.optim.lr_scheduler
SCHEDULERS = {
    "LambdaLR": lambda o: S.LambdaLR(o, lambda e: 0.9**e),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda e: 0.95),
    "StepLR": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.2, total_iters=6),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=6, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, 0.1, total_iters=3), S.ExponentialLR(o, 0.8)], milestones=[3]
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler(
        [S.ConstantLR(o, 0.5, total_iters=3), S.ExponentialLR(o, 0.9)]
    ),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=1, factor=0.5),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=12),
}


def _scheduled_run(cls, name, sched, grads):
    params = _params()
    opt = getattr(cls, name)(params, **KWARGS[name])
    try:
        scheduler = SCHEDULERS[sched](opt)
    except (ValueError, KeyError, TypeError) as e:  # e.g. cycle_momentum without momentum
        return type(e), str(e)
    seen = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        opt.step()
        if sched == "ReduceLROnPlateau":
            scheduler.step(float(sum(p.detach().abs().sum() for p in params)))
        else:
            scheduler.step()
        seen.append({k: v for k, v in opt.param_groups[0].items() if k != "params"})
    return [p.detach().clone() for p in params], seen


#: Schedulers that also cycle β1 (``cycle_momentum``): NAdam's running product Π μ_k is
#: computed from the step count and today's β1 (polyopt's state keeps no history of
#: β1), so with a β1 that changes between steps it differs from torch's running
#: product; documented in docs/optimizers.md.
_MOVES_BETA1 = ("CyclicLR", "OneCycleLR")


@pytest.mark.parametrize(
    ("name", "sched"),
    [
        (n, s)
        for n in TORCH
        for s in SCHEDULERS
        if not (s in _MOVES_BETA1 and pt.__dict__[n]._factory().rule.counted is not None)
    ],
)
def test_lr_scheduler_matches_torch(name, sched):
    """Every torch.optim.lr_scheduler class on every optimizer: the same params and the
    same hyperparameters at each step (OneCycleLR and CyclicLR cycle momentum or
    betas), or the same error where torch refuses the pair."""
    grads = _grads(_params(), 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own scheduler warnings
        ref = _scheduled_run(torch.optim, name, sched, grads)
        got = _scheduled_run(pt, name, sched, grads)
    if isinstance(ref[0], type):  # torch refuses this pair: so does polyopt, in the same words
        assert got[0] is ref[0] and got[1] == ref[1].replace("torch.optim", "polyopt.torch")
        return
    _same(got[0], ref[0])
    assert got[1] == ref[1]


# -- AMP -------------------------------------------------------------------------------------


def _amp_run(cls, name, kwargs, inf_at=3, steps=8):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = getattr(cls, name)(model.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    clip = kwargs.get("fused") is None
    for t in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        if t == inf_at:  # an overflow: the step is skipped and the scale backs off
            next(model.parameters()).grad[0, 0] = float("inf")
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
    state = [opt.state[p].get("step") for p in model.parameters()]
    return [p.detach().clone() for p in model.parameters()], scaler.get_scale(), state


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("AdamW", {"lr": 0.01}),
        ("SGD", {"lr": 0.1, "momentum": 0.9}),
        ("RMSprop", {}),
        ("AdamW", {"lr": 0.01, "fused": True}),
        ("Adam", {"lr": 0.01, "fused": True}),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "fused": True}),
        ("Adagrad", {"fused": True}),
    ],
    ids=["AdamW", "SGD", "RMSprop", "AdamW-fused", "Adam-fused", "SGD-fused", "Adagrad-fused"],
)
def test_grad_scaler_bf16_autocast_matches_torch(name, kwargs, monkeypatch):
    """GradScaler with bf16 autocast: unscale_ + clip_grad_norm_ (the generic route) or,
    with fused=True, GradScaler's route for optimizers that take grad_scale/found_inf;
    an inf step is skipped (step counters included). float32 params: the same
    arithmetic in both, so rtol 1e-6."""
    ref = _amp_run(torch.optim, name, kwargs)
    scaled = []  # with fused=True: torch's kernel gets grad_scale / found_inf itself
    for kernel in ("_fused_adam_", "_fused_adamw_", "_fused_sgd_", "_fused_adagrad_"):
        real = getattr(torch, kernel)

        def spy(*a, _real=real, **k):
            scaled.append(k.get("grad_scale") is not None and k.get("found_inf") is not None)
            return _real(*a, **k)

        monkeypatch.setattr(torch, kernel, spy)
    got = _amp_run(pt, name, kwargs)
    if kwargs.get("fused"):
        assert getattr(pt, name)(_params(), **kwargs)._step_supports_amp_scaling
        assert scaled and all(scaled)  # no host sync, no extra pass over the grads
    for a, b in zip(got[0], ref[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert got[1] == ref[1]
    assert [None if s is None else float(s) for s in got[2]] == [
        None if s is None else float(s) for s in ref[2]
    ]
    if ref[2][0] is not None:
        assert float(ref[2][0]) == 7.0  # one of the 8 steps was skipped


# -- torch.compile ---------------------------------------------------------------------------


def test_compiled_training_step():
    """A compiled training step (forward, backward, step): the step runs eagerly behind a
    graph break with a warning; no recompilation after the first call; the same params
    as eager torch.optim. The ``eager`` backend: what is tested is dynamo's capture."""
    dynamo = pytest.importorskip("torch._dynamo")
    results = []
    for cls in (torch.optim, pt):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2).double()
        opt = cls.AdamW(model.parameters(), lr=0.1)
        x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

        def train_step(opt=opt, model=model, x=x):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            return loss

        if cls is pt:
            dynamo.reset()
            pt._WARNED.clear()
            step = torch.compile(train_step, backend="eager")
            with pytest.warns(UserWarning, match="runs eagerly under torch.compile"):
                step()
            frames = dict(dynamo.utils.counters["stats"])
            for _ in range(4):
                step()
            assert dict(dynamo.utils.counters["stats"]).get("unique_graphs") == frames.get(
                "unique_graphs"
            )  # no new graphs: no recompilation per step
        else:
            for _ in range(5):
                train_step()
        results.append([p.detach().clone() for p in model.parameters()])
    _same(results[1], results[0])


def test_error_message_names_the_group():
    params = _params()
    opt = pt.Adam([{"params": params[:1]}, {"params": params[1:], "lr": 0.1}])
    opt.param_groups[1]["betas"] = (1.5, 0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=re.escape("(param group 1)")):
        opt.step()


def test_grad_scaler_fused_route_falls_back_on_the_host():
    """fused=True with a tensor torch's kernel cannot take (a strided param): GradScaler
    still hands grad_scale / found_inf to step; polyopt unscales and skips on the host
    instead, and the run equals torch.optim's non-fused one (float32, rtol 1e-6)."""
    results = []
    for cls, kwargs in ((pt, {"fused": True}), (torch.optim, {"foreach": False})):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3).t())  # 3x4, not contiguous
        b = torch.nn.Parameter(torch.zeros(4))
        opt = cls.Adam([w, b], lr=0.01, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
        for t in range(5):
            opt.zero_grad()
            scaler.scale((x @ w + b).square().mean()).backward()
            if t == 2:
                b.grad[0] = float("nan")  # skipped
            scaler.step(opt)
            scaler.update()
        results.append((w.detach().clone(), b.detach().clone(), float(opt.state[b]["step"])))
    for a, c in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
    assert results[0][2] == results[1][2] == 4.0
