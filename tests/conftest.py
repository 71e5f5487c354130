"""Shared by every test module: the helper modules next to the tests (``cases``, the
independent NumPy ``reference``, ``torch_maxdiff``) importable by name.

pytest runs with ``--import-mode=importlib`` (pyproject.toml), which does not put this
directory on ``sys.path``; it is put there once, here, rather than in each module."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# XLA's CPU fusion emitters (its default) compile a small program 2-3x slower than the
# classic emitters (measured: an AdamW update of 4 arrays 0.48 s vs 0.19 s), and the
# suite compiles about two thousand small programs. The tests run with the classic
# emitters, set before JAX is imported (subprocesses inherit it); what polyopt hands to
# XLA is the same either way. test_conformance.py runs a sample of the JAX cells under
# XLA's defaults in a subprocess of its own.
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


# -- what this machine cannot run: left out of the run, said once -----------------------
#
# A conformance cell that cannot exist (a dtype the library lacks, a fused path the
# optimizer does not have) is never generated (``polyopt.testing.cells``). Cells and
# tests that exist but need what this machine lacks (a CUDA device, CuPy, dask, JAX with
# x64 in this process) are not collected here; the terminal summary says what and why in
# one line instead of one SKIPPED line per reason.


def pytest_configure(config):
    # pytest -n N runs N worker processes: each takes one core, so torch (tiny arrays
    # here) runs on one thread instead of every worker's parallel regions waiting for
    # each other's threads (measured in test_torch: 65 s -> 13 s on the 2-core machine)
    if os.environ.get("PYTEST_XDIST_WORKER") and importlib.util.find_spec("torch"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a module of tiny tensors, in a serial run too: a second
    thread buys nothing, and on a busy 2-core machine each parallel region waits for a
    descheduled thread (test_torch_fused ran 5x slower). Use it with
    ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gpu_missing() -> str | None:
    """Why the tests marked ``gpu`` cannot run here (no CUDA device for torch or CuPy)."""
    from polyopt import testing

    reasons = [b.missing() for b in testing.BACKENDS if b.device == "cuda"]
    return None if None in reasons else "no CUDA device"


def pytest_collection_modifyitems(config, items):
    reason = _gpu_missing()
    if reason is None:
        return
    gone = [it for it in items if it.get_closest_marker("gpu") is not None]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = [it for it in items if it.get_closest_marker("gpu") is None]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from collections import Counter

    from polyopt import testing

    not_here = Counter()
    for cell in testing.cells():
        reason = testing.skip_reason(cell)
        if reason is not None:
            if reason.startswith("JAX x64 is off"):
                reason = "JAX x64: run by tests/test_jax.py::test_x64_subprocess"
            not_here[f"{cell.backend.label} ({reason})"] += 1
    parts = [f"{n} {what}" for what, n in sorted(not_here.items(), key=lambda kv: -kv[1])]
    gpu = _gpu_missing()
    if gpu is not None:
        parts.append(f"the tests marked gpu ({gpu})")
    if parts:
        terminalreporter.write_line(
            "not run on this machine (deselected, not skipped): conformance cells "
            + ", ".join(parts)
        )
