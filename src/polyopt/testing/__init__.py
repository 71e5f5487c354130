"""Conformance testing: hold a backend, or your own optimizer, to the NumPy reference.

For users' CI::

    python -m polyopt conformance            # every installed backend; exit 1 on failure

From Python::

    from polyopt import testing
    results = testing.run(testing.cells(["torch"], dtypes=["float32"]))
    print(testing.table(results))

To hold your own optimizer to the reference, run it on ``testing.make_problem(...)``
and compare each step with :func:`assert_close` against ``testing.reference(case,
dtype)`` (or any float64 NumPy result). ``testing.richest(name)`` is the one row of an
optimizer with every state slot (``testing.richest(name, testing.SCHEDULED)``: with
schedules):

>>> import numpy as np
>>> from polyopt import testing
>>> testing.assert_close(np.float32([1.0, 2.0]), np.array([1.0, 2.0 + 1e-7]), dtype="float32")
"""

from __future__ import annotations

from typing import Any

from ._cases import (
    ALL,
    CASES,
    ELEMENTWISE,
    FULL,
    MISSING,
    NAMES,
    OWN_PROBLEMS,
    SCHEDULED,
    Case,
    S,
    Sched,
    make_problem,
    polyopt_hyperparams,
    richest,
    tagged,
)
from ._matrix import (
    BACKENDS,
    DTYPES,
    STEPS,
    TOLERANCES,
    Backend,
    Cell,
    Result,
    cells,
    dtype_table,
    max_error,
    reference,
    round_to,
    run,
    run_cell,
    skip_reason,
    table,
    to_numpy,
)

__all__ = [
    "ALL",
    "BACKENDS",
    "CASES",
    "ELEMENTWISE",
    "FULL",
    "MISSING",
    "DTYPES",
    "STEPS",
    "TOLERANCES",
    "Backend",
    "Case",
    "Cell",
    "Result",
    "S",
    "SCHEDULED",
    "Sched",
    "assert_close",
    "cells",
    "dtype_table",
    "make_problem",
    "max_error",
    "polyopt_hyperparams",
    "reference",
    "NAMES",
    "OWN_PROBLEMS",
    "richest",
    "round_to",
    "run",
    "run_cell",
    "skip_reason",
    "table",
    "tagged",
    "to_numpy",
]


def assert_close(
    actual: Any,
    desired: Any,
    *,
    dtype: str | None = None,
    tol: float | None = None,
    what: str = "array",
) -> None:
    """Check shape, then dtype (if ``dtype`` is given), then values, in that order.

    ``actual`` may be any library's array; ``desired`` is the reference (float64).
    The error is ``max |actual - desired| / max |desired|``; the tolerance is ``tol`` or
    :data:`TOLERANCES` for ``dtype`` (float64's if neither is given).

    Args:
        actual: the array under test, of any supported library.
        desired: the reference (a float64 NumPy array, say from :func:`reference`).
        dtype: the dtype name ``actual`` must have (``"float32"``); also picks the
            tolerance. None: the dtype is not checked.
        tol: the tolerance, overriding the dtype's.
        what: the name the error message gives the array (``"params[1]"``).

    Raises:
        AssertionError: the shape, the dtype or the values differ, saying which and
            by how much.
    """
    if tuple(actual.shape) != tuple(desired.shape):
        raise AssertionError(
            f"{what}: shape {tuple(actual.shape)}, expected {tuple(desired.shape)}"
        )
    if dtype is not None and str(actual.dtype).rsplit(".", 1)[-1] != dtype:
        raise AssertionError(f"{what}: dtype {actual.dtype}, expected {dtype}")
    limit = tol if tol is not None else TOLERANCES[dtype or "float64"]
    err = max_error(actual, desired)
    if not err <= limit:
        raise AssertionError(f"{what}: error {err:.3g} exceeds tolerance {limit:g}")
