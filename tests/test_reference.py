"""polyopt (NumPy float64, functional and stateful forms) against tests/reference.py.

Every case of tests/cases.py runs 120 steps; params AND every state entry are compared
after every step.

Tolerance: the reference evaluates the same formulas in a different order (for Adam,
``lr * m_hat / (sqrt(v_hat) + eps)`` with bias-corrected moments instead of torch's
``(lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)``; SGDW ``p*(1 - lr*wd)`` ...), so they
differ by rounding only. Measured: at most ~2e-14 of the array's scale over 120 steps.
We allow ``rtol = 1e-12`` elementwise plus ``atol = 1e-12 * max|reference|``: entries that
cancel towards zero (a parameter crossing 0) carry an absolute rounding error of the size
of the terms that cancelled, not of their own size. Any formula error (a missing bias
correction, dampening on step one, eps inside the root, wrong decay placement) shows up
at 1e-3 or more within a few steps.
"""

from __future__ import annotations

import numpy as np
import pytest

import cases as C  # noqa: E402
import polyopt  # noqa: E402
import reference  # noqa: E402

STEPS = 120
RTOL = 1e-12


def assert_close(actual, desired, what: str, rtol: float = RTOL) -> None:
    actual = np.asarray(actual)
    desired = np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    assert actual.dtype == np.float64, f"{what}: dtype {actual.dtype}, expected float64"
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    # assert_allclose's test itself, |a - d| <= atol + rtol * |d|, takes ~6 us of its ~60 us
    # a call (a case makes ~2000 calls). Where that holds everywhere (so no NaN, no inf)
    # the call passes; it is made only where it does not, for its checks and report.
    with np.errstate(invalid="ignore"):  # inf - inf: left to assert_allclose
        within = np.all(np.abs(actual - desired) <= rtol * scale + rtol * np.abs(desired))
    if not within:
        np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=what)


@pytest.fixture(scope="module")
def problem():
    return C.make_problem(STEPS)


def _reference(case, problem):
    params, grads = problem
    return reference.reference_run(case.name, C.reference_hyperparams(case), params, grads)


def _compare_step(case, k, params, slots, ref_params, ref_states):
    for i, (p, rp) in enumerate(zip(params, ref_params, strict=True)):
        assert_close(p, rp, f"{case.id}: params[{i}] after step {k + 1}")
    for i, (s, rs) in enumerate(zip(slots, ref_states, strict=True)):
        kept = set(rs) - reference.COUNTED
        assert set(s) == kept, f"{case.id}: state[{i}] holds {sorted(s)}, the reference {kept}"
        for name in kept:
            assert_close(s[name], rs[name], f"{case.id}: state[{i}][{name!r}] after step {k + 1}")


@pytest.mark.parametrize("case", C.CASES, ids=C.CASE_IDS)
def test_functional_matches_reference(case, problem):
    p0, grads = problem
    ref = _reference(case, problem)
    factory = polyopt.OPTIMIZERS[case.name][0]
    opt = factory(**C.polyopt_hyperparams(case))
    params = [p.copy() for p in p0]
    state = opt.init(params)
    assert state.step == 0
    for k in range(STEPS):
        before = [p.copy() for p in params]
        new_params, state = opt.update(params, grads[k], state)
        # pure: the inputs are left as they were
        for b, p in zip(before, params, strict=True):
            if not np.array_equal(p, b, equal_nan=True):  # assert_array_equal's test
                np.testing.assert_array_equal(p, b, err_msg=f"{case.id}: step {k + 1} wrote params")
        params = new_params
        assert state.step == k + 1
        _compare_step(case, k, params, state.per_array(len(params)), *ref[k])


@pytest.mark.parametrize("case", C.CASES, ids=C.CASE_IDS)
def test_stateful_matches_reference(case, problem):
    p0, grads = problem
    ref = _reference(case, problem)
    cls = polyopt.OPTIMIZERS[case.name][1]
    mine = [p.copy() for p in p0]
    opt = cls(mine, **C.polyopt_hyperparams(case))
    for k in range(STEPS):
        opt.step(grads[k])
        assert opt.step_count == k + 1
        # in place: the very arrays handed to the constructor hold the new values
        assert all(a is b for a, b in zip(opt.params, mine, strict=True))
        sd = opt.state_dict()
        slots = [sd["state"][i] for i in range(len(mine))]
        _compare_step(case, k, mine, slots, *ref[k])


# -- the table covers everything --------------------------------------------------------


def test_every_optimizer_is_in_the_table_and_vice_versa():
    in_table = {c.name for c in C.CASES}
    exported = set(C.NAMES)  # Muon: tests/test_muon.py, on matrices
    assert exported - in_table == set(), f"optimizers with no case: {sorted(exported - in_table)}"
    assert in_table - exported == set(), (
        f"cases for unknown optimizers: {sorted(in_table - exported)}"
    )
    implemented = set(reference.STEPS) | set(reference.GROUP_STEPS)
    assert implemented == exported, "the reference must implement every optimizer"


def test_case_ids_are_unique():
    assert len(C.CASE_IDS) == len(set(C.CASE_IDS))


@pytest.mark.parametrize("name", sorted(C.NAMES))
def test_every_hyperparameter_is_exercised_with_a_non_default_value(name):
    defaults = polyopt.OPTIMIZERS[name][0]().hyperparams
    missing = [
        hp
        for hp, default in defaults.items()
        if not any(
            c.name == name and hp in c.hyperparams and c.hyperparams[hp] != default for c in C.CASES
        )
    ]
    assert missing == [], f"{name}: no case sets {missing} to a non-default value"


def test_every_schedule_kind_is_in_the_table():
    kinds = set()

    def walk(v):
        if isinstance(v, C.Sched):
            kinds.add(v.kind)
            for a in v.args.values():
                walk(a)
        elif isinstance(v, tuple):
            for a in v:
                walk(a)

    for c in C.CASES:
        for v in c.hyperparams.values():
            walk(v)
    wanted = {
        "constant",
        "step_decay",
        "exponential",
        "cosine",
        "cosine_warm_restarts",
        "linear",
        "linear_warmup",
        "join",
    }
    assert wanted <= kinds, f"schedules missing from the table: {sorted(wanted - kinds)}"
    assert any(isinstance(c.hyperparams.get("weight_decay"), C.Sched) for c in C.CASES)


@pytest.mark.parametrize("name", sorted(C.NAMES))
def test_defaults_are_torchs(name):
    """polyopt's defaults equal the reference's (torch.optim's documented defaults)."""
    assert polyopt.OPTIMIZERS[name][0]().hyperparams == reference.DEFAULTS[name]


# -- the reference itself, against values worked out by hand ----------------------------


def test_reference_sgd_momentum_dampening_by_hand():
    # b1 = g1 = 1 (no dampening on step one); b2 = 0.9*1 + 0.5*2 = 1.9
    hist = reference.reference_run(
        "sgd",
        dict(lr=0.1, momentum=0.9, dampening=0.5),
        [np.array([1.0])],
        [[np.array([1.0])], [np.array([2.0])]],
    )
    np.testing.assert_allclose(hist[0][0][0], [0.9], rtol=1e-15)
    np.testing.assert_allclose(hist[1][1][0]["momentum_buffer"], [1.9], rtol=1e-15)
    np.testing.assert_allclose(hist[1][0][0], [0.9 - 0.19], rtol=1e-15)


def test_reference_adam_first_step_by_hand():
    # step one: m_hat = g, v_hat = g^2, so the move is lr * g / (|g| + eps)
    hist = reference.reference_run(
        "adam", dict(lr=0.1, eps=0.0), [np.array([1.0, 1.0])], [[np.array([3.0, -0.5])]]
    )
    np.testing.assert_allclose(hist[0][0][0], [0.9, 1.1], rtol=1e-15)
    np.testing.assert_allclose(hist[0][1][0]["exp_avg"], [0.3, -0.05], rtol=1e-14)
    np.testing.assert_allclose(hist[0][1][0]["exp_avg_sq"], [0.009, 0.00025], rtol=1e-12)


def test_reference_adamw_decay_by_hand():
    # zero gradient: m = v = 0, only the decay acts: 2 * (1 - 0.1 * 0.5)
    hist = reference.reference_run(
        "adamw", dict(lr=0.1, weight_decay=0.5), [np.array([2.0])], [[np.array([0.0])]]
    )
    np.testing.assert_allclose(hist[0][0][0], [1.9], rtol=1e-15)


def test_reference_schedules_by_hand():
    cos = reference.make_schedule("cosine", lr=1.0, T_max=4)
    assert [round(cos(k), 12) for k in range(5)] == [
        1.0,
        round((1 + 0.5**0.5) / 2, 12),
        0.5,
        round((1 - 0.5**0.5) / 2, 12),
        0.0,
    ]
    warm = reference.make_schedule("cosine_warm_restarts", lr=1.0, T_0=2, T_mult=2)
    # periods: [0, 2), [2, 6), [6, 14): restarts (value 1) at 0, 2, 6
    assert [round(warm(k), 12) for k in (0, 1, 2, 4, 6, 10)] == [1.0, 0.5, 1.0, 0.5, 1.0, 0.5]
    j = reference.make_schedule(
        "join",
        schedules=(
            reference.make_schedule("linear_warmup", lr=1.0, warmup_steps=4),
            reference.make_schedule("constant", lr=0.3),
        ),
        boundaries=(4,),
    )
    assert [j(k) for k in range(6)] == [0.0, 0.25, 0.5, 0.75, 0.3, 0.3]
