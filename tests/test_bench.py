"""``python -m polyopt bench``: runs, prints its table, exits 0, writes a PNG when asked.

Smoke tests on tiny sizes; no timing is asserted anywhere (timings belong to the
command's output and to asv, not to pass/fail).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

import polyopt
from polyopt import backends, bench, testing


def test_cli_prints_the_table_and_writes_a_png(tmp_path):
    png = tmp_path / "bench.png"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "polyopt",
            "bench",
            "--quick",
            "--sizes",
            "1e4/10",
            "--png",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "10k params in 10 tensors" in text
    for header in ("implementation", "ms", "vs best peer", "GB/s", "% floor"):
        assert header in text
    for name, _, _ in bench.IMPLEMENTATIONS:  # every row is there, timed or with its n/a note
        line = next((ln for ln in text.splitlines() if ln.startswith(name + " ")), None)
        assert line is not None, f"no row for {name}"
    assert "28 bytes/param" in text and "floor" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_is_registered():
    from polyopt.__main__ import COMMANDS, command

    assert COMMANDS["bench"][0] == "polyopt.bench:main"
    assert command("bench") is bench.main


def test_missing_library_is_a_note_not_an_error(monkeypatch, capsys):
    def missing(pb):
        raise bench.Unavailable("n/a: pip install nothing")

    monkeypatch.setattr(
        bench,
        "IMPLEMENTATIONS",
        [
            ("polyopt numpy generic", "numpy", bench._polyopt_numpy("generic")),
            ("absent library", "numpy", missing),
        ],
    )
    assert (
        bench.main(["--sizes", "1e3/3", "--repeats", "1", "--warmup", "0", "--libs", "numpy"]) == 0
    )
    out = capsys.readouterr().out
    assert "absent library" in out and "n/a: pip install nothing" in out
    assert "polyopt numpy generic" in out


def test_libs_selects_rows(capsys):
    assert bench.main(["--quick", "--sizes", "1e3/2", "--libs", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "polyopt numpy generic" in out
    rows = [ln.split("  ")[0] for ln in out.splitlines()]
    assert not any(
        r.startswith(("torch.optim", "optax", "polyopt torch", "polyopt jax")) for r in rows
    )


def test_sequential_and_interleaved_time_the_same_rows():
    pb = bench.make_problem(2_000, 4)
    for interleave in (True, False):
        rows = bench.run_size(pb, warmup=1, repeats=2, libs=["numpy"], interleave=interleave)
        assert [r.name for r in rows] == [
            n for n, lib, _ in bench.IMPLEMENTATIONS if lib == "numpy"
        ]
        for r in rows:
            assert (r.ms is not None and len(r.times) == 2) or r.note.startswith("n/a")


def test_bad_options_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--libs", "tensorflow"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "10/100"])  # more tensors than params
    assert "more tensors" in capsys.readouterr().err


def test_parse_sizes():
    assert bench.parse_sizes("10M/100,1M/1000") == [(10_000_000, 100), (1_000_000, 1000)]
    assert bench.parse_sizes("1e4/10") == [(10_000, 10)]
    assert bench.parse_sizes("250k") == [(250_000, 1)]
    for bad in ("ten", "1.5/1", "0/1", "5/6"):
        with pytest.raises(ValueError):
            bench.parse_sizes(bad)


def test_problem_splits_the_parameters():
    pb = bench.make_problem(10_003, 10)
    assert sum(p.size for p in pb.params) == 10_003 and len(pb.params) == 10
    assert {p.size for p in pb.params} == {1000, 1001}
    assert all(p.dtype == "float32" and g.shape == p.shape for p, g in zip(pb.params, pb.grads))


def test_memory_mode(capsys):
    assert bench.main(["--memory", "--sizes", "1e5/10"]) == 0
    out = capsys.readouterr().out
    assert "bytes/param" in out and "polyopt numpy generic" in out


def test_fused_numpy_step_allocates_nothing_proportional_to_params():
    if not backends.available("adamw", "numpy"):
        pytest.skip("no NumPy fast path here (numba missing)")
    pb = bench.make_problem(200_000, 10)
    rows = {name: nbytes for name, nbytes, _ in bench.memory_rows(pb)}
    # the generic step builds new p, m, v before writing back: >= 12 bytes/param
    assert rows["polyopt numpy generic"] >= 12 * pb.n_params
    # the fused step writes in place: small tables per tensor, nothing per parameter
    assert rows["polyopt numpy fused"] < 0.1 * pb.n_params
    assert rows["polyopt numpy fused, flat"] < 0.1 * pb.n_params
    kernels = [cls.__name__ for f, cls in polyopt.OPTIMIZERS.values() if f().rule.elementwise]
    assert "AdamW" in kernels and "Lion" in kernels
    for name in kernels:  # every elementwise optimizer's kernel (a rule that reduces has none)
        assert rows[f"polyopt numpy {name} fused"] < 0.1 * pb.n_params


def test_optimizers_mode(capsys):
    """``bench --optimizers``: a table per optimizer with polyopt's fast path on each
    library and its peers, and the goal ratios; unknown names are listed."""
    args = ["--sizes", "1e3/3", "--repeats", "1", "--warmup", "0", "--libs", "numpy,jax"]
    assert bench.main(["--optimizers", "SGD,Adam", *args]) == 0
    out = capsys.readouterr().out
    assert re.search(r"polyopt numpy SGD\s+[\d.]+ ms", out)
    assert "optax twin jit" in out and "summary (ratios in the same run)" in out
    assert re.search(r"SGD\s+1k/3: numpy [\d.]+x best peer", out)
    with pytest.raises(SystemExit):
        bench.main(["--optimizers", "NoSuchOptimizer", *args])
    assert "choose from SGD, Adagrad" in capsys.readouterr().err


def test_traffic_bytes_count_each_slot():
    assert bench.traffic_bytes("SGD") == 20  # p, buf read and written; g read
    assert bench.traffic_bytes("Adam") == bench.traffic_bytes("AdamW") == 28
    assert bench.traffic_bytes("RMSprop") == 20 and bench.traffic_bytes("Adadelta") == 28


def test_torch_adapter_comparison(capsys):
    """``bench --torch``: one table per optimizer, polyopt.torch and each torch.optim
    mode timed (or n/a where torch has no such mode), ratios to torch's fastest."""
    pytest.importorskip("torch")
    args = ["--torch", "--quick", "--sizes", "1e3/3", "--repeats", "1", "--warmup", "0"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    # bench's problem is vectors: every optimizer of the shared problems (testing.NAMES)
    # on it; Muon (matrices only) on --quick's matrices, torch's class as it ships
    for fname in testing.NAMES:
        name = polyopt.OPTIMIZERS[fname][1].__name__
        assert f"polyopt.torch.{name} " in out and f"torch.optim.{name} foreach" in out
    assert "Muon, 4x256x256+2x256x1024 matrices (786432 params)" in out
    assert re.search(r"torch\.optim\.Muon\s+[\d.e+]+ ms", out)
    assert "torch.optim.RMSprop fused    n/a" in out  # torch has no fused RMSprop
    assert re.search(r"polyopt\.torch\.AdamW\s+[\d.]+ ms\s+[\d.]+x", out)


def test_measure_waits_for_the_device_after_every_timed_step():
    # benchmarks/gpu_adamw.py times GPU steps with this: each time must include a sync
    events = []
    times = bench.measure(lambda: events.append("step"), 2, 3, lambda: events.append("sync"))
    assert len(times) == 3
    assert events == ["step", "step", "sync"] + ["step", "sync"] * 3


def test_bandwidth_probe_takes_another_array_module():
    import numpy as np

    syncs = []
    gbs = bench.bandwidth(2**16, kind="update", repeats=2, xp=np, sync=lambda: syncs.append(1))
    assert gbs > 0 and len(syncs) == 3  # warm-up + 2 timed runs


def test_gpu_benchmark_builds_its_problems_with_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_adamw.py"
    spec = importlib.util.spec_from_file_location("gpu_adamw", path)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    args = gpu.parse_args(["--small-count", "3", "--small-size", "5", "--large-log2", "4"])
    small, large = gpu.problem("small", args), gpu.problem("large", args)
    ref = bench.make_problem(15, 3)
    assert [p.tolist() for p in small.params] == [p.tolist() for p in ref.params]
    assert (large.n_params, large.n_tensors) == (16, 1)
    assert gpu.BYTES_PER_PARAM == bench.traffic_bytes("AdamW")


def test_parse_matrices():
    assert bench.parse_matrices("2x3x4+1x5x6,7x8") == [
        ((3, 4), (3, 4), (5, 6)),
        ((7, 8),),
    ]
    assert bench.parse_matrices("4x1k x1k")[0] == ((1000, 1000),) * 4
    for bad in ("3", "1x2x3x4", "2x0x3", "2x3+", "ten"):
        with pytest.raises(ValueError):
            bench.parse_matrices(bad)
    assert bench.matrices_label(bench.parse_matrices(bench.DEFAULT_MATRICES)[0]) == (
        "4x1024x1024+2x1024x4096"
    )


def test_matrix_problem_and_its_traffic():
    pb = bench.make_matrix_problem(bench.parse_matrices("2x8x8+1x8x16")[0])
    assert [p.shape for p in pb.params] == [(8, 8), (8, 8), (8, 16)]
    assert pb.n_params == 256 and pb.n_tensors == 3 and pb.matrices
    assert all(p.dtype == "float32" and g.shape == p.shape for p, g in zip(pb.params, pb.grads))
    assert pb.label == "2x8x8+1x8x16 matrices (256 params)" and pb.short == "2x8x8+1x8x16"
    # Adafactor's factored moments: a row and a column per matrix, not two full slots
    assert bench.traffic_bytes("Adafactor", pb) == 4 * (3 + 2 * (2 * 16 + 24) / 256)
    assert bench.traffic_bytes("Muon", pb) == bench.traffic_bytes("Muon") == 20


def test_matrices_mode_rows(capsys):
    """``--shapes matrices``: Adafactor (factored) and Muon on 2-D params, every row:
    polyopt's functional and stateful forms on NumPy, polyopt.torch and the stateful
    form on torch tensors, torch.optim's modes (Muon: as it ships), JAX and optax where
    optax has the same algorithm (Muon; not Adafactor)."""
    pytest.importorskip("torch")
    args = ["--shapes", "matrices", "--sizes", "2x8x8+1x8x16", "--repeats", "1", "--warmup", "0"]
    assert bench.main(["--optimizers", "Adafactor,Muon", *args]) == 0
    out = capsys.readouterr().out
    assert "Adafactor, 2x8x8+1x8x16 matrices (256 params)" in out
    assert "Muon, 2x8x8+1x8x16 matrices (256 params)" in out
    timed = r"\s+[\d.e+]+ ms"
    for row in (
        "polyopt numpy Adafactor",
        "polyopt numpy adafactor functional",
        "polyopt.torch.Adafactor",
        "polyopt torch Adafactor",
        "torch.optim.Adafactor for-loop",
        "polyopt numpy Muon",
        "polyopt numpy muon functional",
        "polyopt.torch.Muon",
        "polyopt torch Muon",
        "torch.optim.Muon",
    ):
        assert re.search(re.escape(row) + timed, out), row
    assert "torch.optim.Muon foreach" not in out
    assert "n/a: optax.adafactor is another algorithm on matrices" in out
    if importlib.util.find_spec("optax") is not None:
        muon_table = out[out.index("Muon, 2x8x8") :]
        assert re.search(r"optax twin jit" + timed, muon_table)
    assert re.search(r"Adafactor 2x8x8\+1x8x16: numpy [\d.]+x best peer", out)
    assert re.search(r"Muon\s+2x8x8\+1x8x16: numpy [\d.]+x best peer", out)


def test_matrix_only_optimizers_take_matrices_on_vector_sizes(capsys):
    """Muon named with vector sizes runs on the default matrices (--quick's here)."""
    args = ["--quick", "--sizes", "1e3/3", "--repeats", "1", "--warmup", "0", "--libs", "numpy"]
    assert bench.main(["--optimizers", "SGD,Muon", *args]) == 0
    out = capsys.readouterr().out
    assert "SGD, 1k params in 3 tensors" in out
    assert "(Muon: 2-D params only, run on the matrices 4x256x256+2x256x1024)" in out
    assert re.search(r"polyopt numpy Muon\s+[\d.e+]+ ms", out)
    assert "Muon, 1k params" not in out


def test_bad_matrix_sizes_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--shapes", "matrices", "--sizes", "10/100"])
    assert e.value.code == 2
    assert "--sizes: not a count: '10/100'" in capsys.readouterr().err


def test_quick_is_one_small_size_with_a_progress_bar(capsys):
    # the CLI's promise: --quick is a smoke test (one small problem), with progress
    assert bench.QUICK_SIZES == "100k/100"
    assert bench.main(["--quick", "--libs", "numpy", "--repeats", "1", "--warmup", "0"]) == 0
    captured = capsys.readouterr()
    assert "100k params in 100 tensors" in captured.out
    assert bench.main(["--quick", "--libs", "numpy", "-q", "--repeats", "1"]) == 0
    assert "step" not in capsys.readouterr().err  # -q: no bar


def test_optimizer_names_any_case_and_functional(capsys):
    args = ["--optimizers", "adamw,Schedule_Free_AdamW", "--sizes", "1e3/2", "--libs", "numpy"]
    assert bench.main([*args, "--repeats", "1", "--warmup", "0", "-q"]) == 0
    out = capsys.readouterr().out
    assert "AdamW" in out and "ScheduleFreeAdamW" in out


def test_nothing_ran_is_exit_1(monkeypatch, capsys):
    def unavailable(pb):
        raise bench.Unavailable("n/a: not here")

    monkeypatch.setattr(
        bench, "IMPLEMENTATIONS", [(n, lib, unavailable) for n, lib, _ in bench.IMPLEMENTATIONS]
    )
    assert bench.main(["--sizes", "1e3/2", "--libs", "numpy", "-q", "--repeats", "1"]) == 1
    assert "nothing ran" in capsys.readouterr().err


def test_missing_library_names_the_extra(monkeypatch):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util, "find_spec", lambda m: None if m == "torch" else real(m)
    )
    with pytest.raises(
        bench.Unavailable, match=r"torch not installed \(pip install 'polyopt\[torch\]'\)"
    ):
        bench._need("torch")
    assert bench._install("optax") == "pip install 'polyopt[jax]'"
    assert bench._install("numba") == "pip install 'polyopt[fast]'"
