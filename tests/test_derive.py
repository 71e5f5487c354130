"""Kernels derived from the rules (polyopt.backends._derive): the rule's own step,
traced and compiled with numba, equals the generic path to the last bit."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

import polyopt  # noqa: E402
from polyopt.backends import _derive  # noqa: E402

RULES = {name: factory().rule for name, (factory, _) in polyopt.OPTIMIZERS.items()}
STRUCTURES = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}),
    (
        "sgd",
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ),
    ("adagrad", {"lr_decay": 0.1, "weight_decay": 0.1, "maximize": True}),
    ("rmsprop", {}),
    ("rmsprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.1}),
    ("adadelta", {"weight_decay": 0.1, "maximize": True}),
    ("adam", {"weight_decay": 0.1}),
    ("adam", {"amsgrad": True}),
    ("adamw", {"amsgrad": True, "maximize": True}),
]


def _run_kernel(rule, hp, params, grads, slots, k):
    kernel, names, sc = _derive.numba_kernel(rule, hp, k + 1, params[0].dtype)
    columns = [params, grads, *[slots[n] for n in names]]
    tab = np.array([[a.ctypes.data for a in col] for col in columns], dtype=np.int64)
    kernel(tab, np.array([p.size for p in params]), sc)


@pytest.mark.parametrize("chunked", [False, True], ids=["serial", "chunked"])
@pytest.mark.parametrize("k", [0, 6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "overrides"), STRUCTURES, ids=lambda x: str(x))
def test_derived_kernel_equals_the_generic_rule_bit_for_bit(
    name, overrides, dtype, k, chunked, monkeypatch
):
    """Serial, and cut into chunks on numba's threads (chunks of 4 elements here, so
    that arrays straddle chunks)."""
    if chunked:
        if _derive.numba_threads() < 2:
            pytest.skip("numba has one thread here")
        monkeypatch.setattr(_derive, "CHUNK", 4)
        monkeypatch.setattr(_derive, "PARALLEL_FROM", 1)
    rule = RULES[name]
    opt = polyopt.Optimizer(rule, overrides, impl="generic")
    hp = opt.hyperparams
    rng = np.random.default_rng(0)
    shapes = [(5, 3), (7,), (1,)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    names = rule.slots(hp)
    # state as a few steps would leave it (positive where the rule takes a square root)
    slots = {n: [np.abs(rng.standard_normal(s)).astype(dtype) + 0.5 for s in shapes] for n in names}
    if "grad_avg" in slots:  # centered: a mean gradient smaller than its RMS
        slots["grad_avg"] = [0.1 * a for a in slots["grad_avg"]]
    ref = [
        opt._step_one(np, p, g, {n: slots[n][i] for n in names}, hp, k)
        for i, (p, g) in enumerate(zip(params, grads))
    ]
    _run_kernel(rule, hp, params, grads, slots, k)
    for i, (new_p, new_s) in enumerate(ref):
        np.testing.assert_array_equal(params[i], new_p)
        for n in names:
            np.testing.assert_array_equal(slots[n][i], new_s[n])


def test_host_scalars_are_folded_once():
    """What involves only numbers is computed by the rule's own Python code, on the host:
    AdamW's element program is 15 operations on 8 constants (lr·λ, lr/(1 − β1^t),
    β1, 1 − β1, β2, 1 − β2, sqrt(1 − β2^t), ε), the same program at every step."""
    rule, hp = RULES["adamw"], polyopt.adamw().hyperparams
    prog = _derive.program(rule, hp, 3)
    b1, b2 = hp["betas"]
    assert len(prog.key[1]) == 15 and len(prog.consts) == 8
    assert hp["lr"] / (1 - b1**3) in prog.consts
    assert _derive.program(rule, hp, 7).key == prog.key


def test_untraceable_rule_is_a_clear_error():
    def step(p, g, s, hp, t, xp):
        return xp.tanh(p), {}

    rule = polyopt.sgd().rule.__class__("odd", {"lr": 1.0}, lambda hp: None, lambda hp: (), step)
    with pytest.raises(AttributeError, match="tanh cannot be traced"):
        _derive.trace(rule, {"lr": 1.0}, 1)


@pytest.mark.parametrize("policy", [None, "active"])
def test_thread_pool_starts_passive_and_leaves_the_environment_as_it_was(policy):
    """The first parallel kernel call starts numba's pool under OMP_WAIT_POLICY=passive
    (unless the user chose a policy) and restores the environment (a fresh process:
    the pool starts once)."""
    import os
    import subprocess
    import sys

    script = (
        "import os, numpy as np, polyopt\n"
        "from polyopt.backends import _derive\n"
        "_derive.PARALLEL_FROM = 1\n"
        "o = polyopt.AdamW([np.zeros(1000, np.float32)], impl='fused')\n"
        "o.step([np.ones(1000, np.float32)])\n"
        "print(_derive._POOL_STARTED, os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    threads = _derive.numba_threads() >= 2
    assert out == [str(threads), str(policy)]
