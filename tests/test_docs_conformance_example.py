"""The copy-paste pytest file of docs/ci-conformance.md works as a user would run it.

The file is taken from the page as written, saved into an empty directory (no polyopt
test configuration around it, as in a library author's repository) and run there with
pytest in a subprocess: every test in it must pass, and there must be as many as the
page's setting promises.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "ci-conformance.md"
MARKER = "<!-- conformance-example"


def _example() -> str:
    text = PAGE.read_text(encoding="utf-8")
    assert MARKER in text, "docs/ci-conformance.md lost its example marker"
    after = text.split(MARKER, 1)[1]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match, "no python block after the marker"
    return match.group(1)


def test_the_example_runs_and_passes(tmp_path):
    pytest.importorskip("array_api_strict")  # the example's second backend
    (tmp_path / "test_polyopt_conformance.py").write_text(_example(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    summary = re.search(r"(\d+) passed", out)
    assert summary, out
    # 2 backends installed + 1 own-optimizer test + one cell per (row, backend, dtype,
    # impl that exists): well over the rows of the FULL tag
    assert int(summary.group(1)) > 50, out
    assert "failed" not in out.splitlines()[-1], out


def test_the_example_can_fail(monkeypatch):
    """With a tolerance no float32 result meets, the example's matrix test fails (run
    in this process on one cell: the subprocess above shows the file itself runs)."""
    pytest.importorskip("array_api_strict")
    from polyopt import testing

    namespace: dict = {}
    exec(compile(_example(), "test_polyopt_conformance.py", "exec"), namespace)
    cell = next(c for c in namespace["CELLS"] if c.dtype == "float32")
    namespace["test_matches_the_numpy_reference"](cell)  # passes as written
    monkeypatch.setitem(testing.TOLERANCES, "float32", 1e-30)
    with pytest.raises(AssertionError, match="tolerance 1e-30"):
        namespace["test_matches_the_numpy_reference"](cell)
