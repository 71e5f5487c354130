"""polyopt against torch.optim (float64, CPU) for every case torch supports.

Schedules drive torch through torch's own LR schedulers (StepLR, ExponentialLR,
CosineAnnealingLR, CosineAnnealingWarmRestarts, LinearLR, SequentialLR); a weight-decay
schedule is written into torch's param group before each step. SGDW (decoupled decay
for SGD) has no torch.optim counterpart and is held to tests/reference.py only.

Tolerance: ``rtol = 1e-9`` elementwise, with ``atol = 1e-9 * max|torch|`` per array
(entries crossing zero carry the rounding error of the terms that cancelled). torch's
recursive schedulers (CosineAnnealingLR, LinearLR, ExponentialLR multiply the previous
lr) and its different operation order (``lerp`` for the moments, ``addcdiv``) give
differences of 1e-16 .. 1e-13 relative (run ``python tests/torch_maxdiff.py``), so 1e-9
leaves room for platform differences while any formula mismatch shows at >= 1e-4.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cases as C  # noqa: E402
import polyopt  # noqa: E402
import polyopt.torch  # noqa: E402
import reference  # noqa: E402
import torch_maxdiff as T  # noqa: E402

STEPS = 120
RTOL = 1e-9

TORCH_CASES = [c for c in C.CASES if T.torch_supports(c)]
TORCH_IDS = [c.id for c in TORCH_CASES]


# tiny tensors: torch on one thread for this module, also in a serial run (conftest)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def assert_close(actual, desired, what: str) -> float:
    """Assert within RTOL (see module docstring); return the normwise relative difference
    (:func:`torch_maxdiff.rel_diff`)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    if desired.size == 0:
        return 0.0
    scale = float(np.max(np.abs(desired)))
    with np.errstate(invalid="ignore"):  # inf - inf: left to assert_allclose
        err = np.abs(actual - desired)
        within = np.all(err <= RTOL * scale + RTOL * np.abs(desired))
    # assert_allclose's test itself is ~6 us of its ~60 us a call (a case makes ~2000):
    # where it holds everywhere (so no NaN, no inf) the call passes, so it is made only
    # where it does not, for its checks and report
    if not within:
        np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=RTOL * scale, err_msg=what)
    diff = float(np.max(err))
    return diff / scale if scale else diff


@functools.cache
def _torch_history(case_id: str) -> list:
    """torch.optim's ``(params, states)`` after each step of ``case_id`` on the shared
    problem: computed once a process for the three comparisons of the case below
    (torch_run yields copies, and the comparisons only read them)."""
    case = TORCH_CASES[TORCH_IDS.index(case_id)]
    return list(T.torch_run(case, *C.make_problem(STEPS)))


def compare_with_torch(case, steps_iter, label):
    """Compare ``(params, slots)`` per step from ``steps_iter`` with torch; return max diffs."""
    p0, grads = C.make_problem(STEPS)
    worst_p = worst_s = 0.0
    n = 0
    for k, ((params, slots), (tp, ts)) in enumerate(
        zip(steps_iter(p0, grads), _torch_history(case.id), strict=True)
    ):
        n += 1
        for i, (p, q) in enumerate(zip(params, tp, strict=True)):
            worst_p = max(
                worst_p, assert_close(p, q, f"{case.id} [{label}]: params[{i}] after step {k + 1}")
            )
        for i, (s, st) in enumerate(zip(slots, ts, strict=True)):
            torch_names = {T.SLOT_TO_TORCH[name] for name in s}
            assert torch_names == set(st), (
                f"{case.id} [{label}]: state[{i}] holds {sorted(s)}, torch's {sorted(st)}"
            )
            for name in s:
                worst_s = max(
                    worst_s,
                    assert_close(
                        s[name],
                        st[T.SLOT_TO_TORCH[name]],
                        f"{case.id} [{label}]: state[{i}][{name!r}] after step {k + 1}",
                    ),
                )
    assert n == STEPS
    print(
        f"\n{case.id} [{label}] vs torch.optim: "
        f"max rel diff params {worst_p:.1e}, state {worst_s:.1e}"
    )
    return worst_p, worst_s


@pytest.mark.parametrize("case", TORCH_CASES, ids=TORCH_IDS)
def test_numpy_functional_matches_torch(case):
    compare_with_torch(case, T.functional_run(case), "numpy")


@pytest.mark.parametrize("case", TORCH_CASES, ids=TORCH_IDS)
def test_stateful_on_torch_tensors_matches_torch(case):
    """polyopt's stateful form updating torch float64 tensors in place, grads from .grad."""
    compare_with_torch(case, T.stateful_torch_run(case), "torch tensors")


@pytest.mark.parametrize("case", TORCH_CASES, ids=TORCH_IDS)
def test_reference_matches_torch(case):
    """The reference is itself checked against torch (so test_reference.py's SGDW cases
    rest on a reference whose other paths torch confirms)."""

    def run(p0, grads):
        hist = reference.reference_run(case.name, C.reference_hyperparams(case), p0, grads)
        for params, states in hist:  # what torch's state dict holds of the counts: not here
            yield (
                params,
                [{n: v for n, v in s.items() if n not in reference.COUNTED} for s in states],
            )

    compare_with_torch(case, run, "reference")


@pytest.mark.parametrize(
    "case", [c for c in C.CASES if c.name == "sgd" and not T.torch_supports(c)], ids=lambda c: c.id
)
def test_sgdw_has_no_torch_counterpart(case):
    assert "decoupled_weight_decay" not in inspect.signature(torch.optim.SGD).parameters
    pytest.skip(
        "torch.optim.SGD has no decoupled_weight_decay; SGDW is compared to the reference only"
    )


@pytest.mark.parametrize("name", sorted(n for n in polyopt.OPTIMIZERS if T.torch_class(n)))
def test_defaults_match_torch_signature(name):
    cls = T.torch_class(name)
    sig = inspect.signature(cls).parameters
    # the hyperparameters torch's constructor lacks (SGD's decoupled_weight_decay, Muon's
    # ns_dtype): polyopt.torch adds them keyword-only, with the rule's default
    extras = getattr(polyopt.torch, cls.__name__)._extras
    mine = inspect.signature(getattr(polyopt.torch, cls.__name__)).parameters
    for hp, value in polyopt.OPTIMIZERS[name][0]().hyperparams.items():
        if hp in extras and hp not in sig:
            assert mine[hp].kind is inspect.Parameter.KEYWORD_ONLY, hp
            assert mine[hp].default == value, hp
            continue
        if hp == "decoupled_weight_decay" and hp not in sig:
            continue  # AdamW is decoupled by definition
        assert hp in sig, f"torch.optim.{cls.__name__} has no {hp}"
        assert sig[hp].default == value, (
            f"{name}.{hp}: polyopt {value!r}, torch {sig[hp].default!r}"
        )
