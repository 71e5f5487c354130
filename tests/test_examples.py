"""The scripts in examples/ run, as a user runs them: in a subprocess, from the command line.

examples/torch_digits.py (a CNN on digits with polyopt.torch.AdamW, OneCycleLR, bf16
autocast, GradScaler and a checkpoint): ``--quick`` (3 epochs) must learn, and a run
resumed from its midway checkpoint must continue at the checkpoint's epoch and step and
end with exactly the weights of the uninterrupted run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "torch_digits.py"
#: Test accuracy of --quick, measured on a 2-core CPU (torch 2.13): 0.976 to 0.989 over
#: seeds 0-4 (0.978 for seed 0, the one run here); chance is 0.1.
QUICK_MIN_ACC = 0.95


def _run(*args: str) -> subprocess.CompletedProcess:
    """Run the script (this checkout's polyopt first on the path)."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _accuracy(stdout: str) -> float:
    m = re.search(r"^test accuracy: ([0-9.]+) \((\d+)/450\)$", stdout, re.MULTILINE)
    assert m, stdout
    return float(m.group(1))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (about 7 s on 2 cores) shared by the tests below."""
    out = tmp_path_factory.mktemp("quick")
    return out, _run("--quick", "--out", str(out))


def test_quick_run_learns(quick):
    out, r = quick
    assert _accuracy(r.stdout) > QUICK_MIN_ACC
    assert "checkpoint: " in r.stdout and "(epoch 1, step 22)" in r.stdout
    assert "trained 3 epochs, 66 steps" in r.stdout
    assert re.search(r"epoch \[#+\] 3/3 loss [0-9.]+  test acc", r.stderr), r.stderr
    assert (out / "checkpoint.pt").exists() and (out / "model.pt").exists()


def test_resume_continues_and_matches_the_uninterrupted_run(quick, tmp_path):
    out, full = quick
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 22)
    assert float(ckpt["optimizer"]["state"][0]["step"]) == 22  # torch's per-param count
    assert ckpt["scheduler"]["last_epoch"] == 22

    r = _run("--quick", "--resume", str(out / "checkpoint.pt"), "--out", str(tmp_path))
    assert "resumed from" in r.stdout and "epoch 1, step 22" in r.stdout
    assert "trained 3 epochs, 66 steps" in r.stdout  # 22 + 44: the count went on
    assert " 1/3 " not in r.stderr and " 2/3 " in r.stderr and " 3/3 " in r.stderr
    # Bitwise equal, bf16 autocast included: both processes run one thread, draw all
    # their random numbers (the initial weights) before training and take each epoch's
    # batch order from (seed, epoch), so the resumed steps are the same operations on
    # the same numbers, and the checkpoint restores optimizer, scheduler (lr and the
    # betas OneCycleLR cycles) and scaler exactly.
    assert _accuracy(r.stdout) == _accuracy(full.stdout)
    a = torch.load(out / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
