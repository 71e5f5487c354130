"""examples/flax_digits.py runs, as a user runs it: in a subprocess, from the command line.

A flax nnx CNN on digits with ``optax.chain(clip_by_global_norm, polyopt.optax.adamw)``
(an optax warmup-cosine schedule, no decay on the biases) through ``nnx.Optimizer`` and
an Orbax checkpoint: ``--quick`` (3 epochs) must learn, and a run resumed from its
midway checkpoint must continue at the checkpoint's epoch and step and end with exactly
the weights of the uninterrupted run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")
ocp = pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")

import jax  # noqa: E402  (after the skips)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "flax_digits.py"
#: Test accuracy of --quick, measured on a 2-core CPU (jax 0.10.2, flax 0.12.8, optax
#: 0.2.8): 0.978 to 0.989 over seeds 0-4 (0.978 for seed 0, the one run here); chance
#: is 0.1.
QUICK_MIN_ACC = 0.95


def _run(*args: str) -> subprocess.CompletedProcess:
    """Run the script (this checkout's polyopt first on the path) on the CPU: the bitwise
    resume check below is a claim about XLA's CPU backend (on a GPU, autotuning may pick
    another convolution algorithm in each process)."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _accuracy(stdout: str) -> float:
    m = re.search(r"^test accuracy: ([0-9.]+) \((\d+)/450\)$", stdout, re.MULTILINE)
    assert m, stdout
    return float(m.group(1))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (7 to 9 s on 2 cores, imports included) shared by the tests below."""
    out = tmp_path_factory.mktemp("quick")
    return out, _run("--quick", "--out", str(out))


def test_quick_run_learns(quick):
    out, r = quick
    assert _accuracy(r.stdout) > QUICK_MIN_ACC
    assert "checkpoint: " in r.stdout and "(epoch 1, step 21)" in r.stdout
    assert "trained 3 epochs, 63 steps" in r.stdout  # 1347 // 64 = 21 full batches an epoch
    assert re.search(r"epoch \[#+\] 3/3 loss [0-9.]+  test acc", r.stderr), r.stderr
    assert (out / "checkpoint").is_dir() and (out / "model").is_dir()


def test_resume_continues_and_matches_the_uninterrupted_run(quick, tmp_path):
    out, full = quick
    checkpointer = ocp.StandardCheckpointer()
    ckpt = checkpointer.restore(out / "checkpoint")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 21)
    opt = ckpt["optimizer"]
    assert int(opt["step"]["value"]) == 21  # nnx.Optimizer's count
    # optax.chain's state: (clip_by_global_norm's EmptyState, polyopt's OptState), the
    # first with no arrays; the second holds polyopt's step count and Adam's moments.
    assert int(opt["opt_state"]["1"]["step"]["value"]) == 21
    assert set(opt["opt_state"]["1"]["slots"]) == {"exp_avg", "exp_avg_sq"}

    r = _run("--quick", "--resume", str(out / "checkpoint"), "--out", str(tmp_path))
    assert "resumed from" in r.stdout and "epoch 1, step 21" in r.stdout
    assert "trained 3 epochs, 63 steps" in r.stdout  # 21 + 42: the count went on
    assert " 1/3 " not in r.stderr and " 2/3 " in r.stderr and " 3/3 " in r.stderr
    # Bitwise equal: XLA on the CPU computes the same jitted step on the same inputs to
    # the same bits in both processes, the initial weights come from nnx.Rngs(seed),
    # each epoch's batch order from (seed, epoch), and the checkpoint restores the
    # weights, polyopt's state (step count included, which the schedule reads) and
    # nnx.Optimizer's count exactly.
    assert _accuracy(r.stdout) == _accuracy(full.stdout)
    a = checkpointer.restore(out / "model")
    b = checkpointer.restore(tmp_path / "model")
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
