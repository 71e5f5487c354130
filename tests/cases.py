"""The case table lives in the package (``polyopt.testing``) so that users' CI and
``python -m polyopt conformance`` run the same rows as these tests; this module adds
what only the tests need (the independent reference's schedules)."""

from __future__ import annotations

from polyopt.testing._cases import (
    CASES as ALL_CASES,
)
from polyopt.testing._cases import (
    ELEMENTWISE,
    FULL,
    NAMES,
    OWN_PROBLEMS,
    SCHEDULED,
    SHAPES,
    Case,
    S,
    Sched,
    make_problem,
    polyopt_hyperparams,
    polyopt_schedule,
    resolve,
    resolve_hyperparams,
    richest,
    tagged,
)

__all__ = [
    "ALL_CASES",
    "CASES",
    "ELEMENTWISE",
    "CASE_IDS",
    "FULL",
    "SCHEDULED",
    "SHAPES",
    "Case",
    "S",
    "Sched",
    "make_problem",
    "polyopt_hyperparams",
    "polyopt_schedule",
    "reference_hyperparams",
    "resolve",
    "resolve_hyperparams",
    "NAMES",
    "OWN_PROBLEMS",
    "richest",
    "tagged",
]

#: Single-group rows: the per-array reference and torch comparisons. The parameter-group
#: rows run in the conformance matrix (tests/test_conformance.py) and test_structures.py.
CASES = [c for c in ALL_CASES if not c.groups]
CASE_IDS = [c.id for c in CASES]


def reference_hyperparams(case: Case) -> dict:
    try:
        from reference import make_schedule
    except ImportError:  # imported as tests.cases
        from .reference import make_schedule  # type: ignore[no-redef]
    return resolve_hyperparams(case, make_schedule)
