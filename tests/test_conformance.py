"""The conformance matrix: every case × backend × dtype × implementation.

Each cell compares params and every state entry after every step with the NumPy
float64 reference (polyopt.testing); tolerances per dtype live in
``polyopt.testing.TOLERANCES``. Only cells that exist are generated (the dtypes each
library has; the fused impl where the optimizer has a fused path), and of those the
ones this machine can run are collected; the terminal summary names the rest.
"""

from __future__ import annotations

import array_api_strict
import numpy as np
import pytest

import polyopt
from polyopt import testing
from polyopt.__main__ import main as cli

#: The cells this machine can run; the others (no CUDA device, CuPy or dask not
#: installed, JAX float64 cells that need x64 and run in test_jax's subprocess) are
#: named in one line of the terminal summary (conftest.py).
CELLS = [c for c in testing.cells() if testing.skip_reason(c) is None]


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_cell(cell):
    result = testing.run_cell(cell)
    assert result.status == "pass", result.reason
    assert result.error <= testing.TOLERANCES[cell.dtype]


def test_matrix_covers_every_optimizer_and_the_shapes_that_break_things():
    assert {c.name for c in testing.CASES} == set(testing.NAMES)
    assert any(c.groups for c in testing.CASES)
    # missing gradients for every optimizer, and with groups; complex dtypes
    assert {c.name for c in testing.CASES if c.missing} == set(testing.NAMES)
    assert any(c.missing and c.groups for c in testing.CASES)
    assert {"complex64", "complex128"} <= set(testing.DTYPES)
    shapes = [p.shape for p in testing.make_problem(1)[0]]
    assert () in shapes and any(0 in s for s in shapes) and any(len(s) == 2 for s in shapes)


def test_strided_views_are_what_the_matrix_claims():
    numpy = next(b for b in testing.BACKENDS if b.name == "numpy")
    a = numpy.array(np.arange(12.0).reshape(3, 4), "float64", strided=True)
    assert not a.flags["C_CONTIGUOUS"] and np.array_equal(a, np.arange(12.0).reshape(3, 4))


def test_a_wrong_result_fails_its_cell(monkeypatch):
    """The matrix can fail: corrupt the reference and the cell must report it."""
    case = next(c for c in testing.CASES if c.id == "adam-default")
    numpy = next(b for b in testing.BACKENDS if b.name == "numpy")
    cell = testing.Cell(case, numpy, "float64", "generic")
    good = testing.reference(case, "float64")
    bad = [([p * (1 + 1e-6) for p in params], slots, counts) for params, slots, counts in good]
    monkeypatch.setitem(testing._matrix._REFERENCES, (case.id, "float64"), bad)
    result = testing.run_cell(cell)
    assert result.status == "fail" and "params" in result.where


def test_cli_prints_the_table_and_exits_zero(capsys):
    assert cli(["conformance", "--backend", "numpy", "--optimizer", "adamw"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "adamw" in out and "pass" in out and "0 failed" in out


def test_cli_exits_nonzero_on_a_failure(monkeypatch, capsys):
    monkeypatch.setitem(testing.TOLERANCES, "float32", 0.0)
    assert (
        cli(["conformance", "--backend", "numpy", "--optimizer", "sgd", "--dtype", "float32"]) == 1
    )
    assert "FAIL" in capsys.readouterr().out


def test_assert_close_checks_shape_dtype_then_values():
    ref = np.array([1.0, 2.0])
    testing.assert_close(np.float32([1.0, 2.0]), ref, dtype="float32")
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_close(np.ones(3), ref)
    with pytest.raises(AssertionError, match="dtype"):
        testing.assert_close(np.ones(2), ref, dtype="float32")
    with pytest.raises(AssertionError, match="tolerance"):
        testing.assert_close(np.array([1.0, 2.1]), ref)


def test_fused_without_a_fast_path_is_a_clear_error():
    import dataclasses

    # a rule that is not elementwise gets no derived fast path
    reducing = dataclasses.replace(polyopt.sgd().rule, name="reducing", elementwise=False)
    with pytest.raises(ValueError, match="impl='fused'.*no fused reducing step for numpy"):
        polyopt.Optimizer(reducing, {}, impl="fused").init([np.ones(3)])
    with pytest.raises(ValueError, match="impl='fused'.*no fused rmsprop step for array_api"):
        polyopt.rmsprop(impl="fused").init([array_api_strict.asarray([1.0])])
    with pytest.raises(ValueError, match="impl must be one of"):
        polyopt.sgd(impl="fast")


def test_jax_cells_under_xla_default_compiler_flags():
    """conftest.py compiles with XLA's classic CPU emitters (faster to compile); every
    optimizer's richest row, generic and fused, in float32, passes under
    XLA's default flags too."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_cpu_use_fusion_emitters=false", "")
    script = (
        "import json; from polyopt import testing\n"
        "rows = testing.tagged(testing.FULL)\n"
        "cells = testing.cells(['jax'], ['float32'], cases=rows)\n"
        "print(json.dumps([[r.cell.id, r.status, r.reason] for r in testing.run(cells)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.splitlines()[-1])
    assert len(results) >= len(testing.NAMES)
    assert [r for r in results if r[1] != "pass"] == []
