"""The command line: one argument style for every subcommand (comma lists, names matched
case-insensitively, the valid names in every "unknown" error), help on every flag, exit
codes (1 when nothing ran), tqdm progress on stderr silenced by -q, and a one-line
message naming the extra for every missing optional dependency."""

from __future__ import annotations

import argparse
import importlib.util
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import polyopt
from polyopt import _cli, conformance, testing
from polyopt.__main__ import COMMANDS, PARSERS
from polyopt.__main__ import _parser as top_parser
from polyopt.__main__ import main as cli
from polyopt.__main__ import parser as command_parser

HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="the demo's data needs scikit-learn")
# numpy float32 generic: the cheapest cells of the matrix
SMALL = ["--backend", "numpy", "--dtype", "float32", "--impl", "generic", "-q"]


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm draws at once."""

    def isatty(self) -> bool:
        return True


# -- help ------------------------------------------------------------------------------


def _walk(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield parser.prog, action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk(sub)


def test_every_flag_of_every_command_has_help():
    assert set(PARSERS) == set(COMMANDS)
    parsers = [top_parser()] + [command_parser(name) for name in COMMANDS]
    seen = 0
    for p in parsers:
        for prog, action in _walk(p):
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{prog} {name} has no help"
            assert action.help != argparse.SUPPRESS, f"{prog} {name} has hidden help"
            seen += 1
    assert seen > 30  # every command's flags were walked, not an empty parser


# -- comma lists and names -------------------------------------------------------------


def test_list_flags_take_comma_lists_and_repeats_alike():
    p = conformance.build_parser()
    comma = p.parse_args(
        ["--backend", "numpy,torch", "--optimizer", "adamw,adam", "--dtype", "float32,float64"]
        + ["--impl", "generic,fused"]
    )
    repeated = p.parse_args(
        ["--backend", "numpy", "--backend", "torch", "--optimizer", "adamw", "--optimizer"]
        + ["adam", "--dtype", "float32", "--dtype", "float64", "--impl", "generic"]
        + ["--impl", "fused"]
    )
    assert vars(comma) == vars(repeated)
    assert comma.backend == ["numpy", "torch"] and comma.optimizer == ["adamw", "adam"]
    assert comma.dtype == ["float32", "float64"] and comma.impl == ["generic", "fused"]
    mixed = p.parse_args(["--optimizer", "sgd, adam", "--optimizer", "adam,lion"])
    assert mixed.optimizer == ["sgd", "adam", "lion"]  # spaces stripped, repeats dropped
    assert p.parse_args([]).optimizer is None  # absent: every one
    assert p.parse_args(["--optimizer", "all"]).optimizer == list(testing.NAMES)


def test_class_names_are_accepted_case_insensitively():
    p = conformance.build_parser()
    args = p.parse_args(
        ["--optimizer", "AdamW,SGD,ScheduleFreeAdamW,rmsprop", "--dtype", "Float32"]
    )
    assert args.optimizer == ["adamw", "sgd", "schedule_free_adamw", "rmsprop"]
    assert args.dtype == ["float32"]
    assert p.parse_args(["--backend", "Torch-CUDA,strict"]).backend == [
        "torch-cuda",
        "array_api_strict",
    ]
    from polyopt import demo

    d = demo.build_parser().parse_args(["--optimizer", "AdamW", "--backend", "NumPy"])
    assert (d.optimizer, d.backend) == ("adamw", "numpy")


def test_conformance_runs_a_class_name_given_as_a_comma_list(capsys):
    assert cli(["conformance", "--optimizer", "AdamW,sgd", *SMALL]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("backend"))
    assert sorted(header.split()[1:]) == ["adamw", "sgd"]
    assert re.search(r"numpy +pass (\d+)/\1", out), out


def _error_line(err: str) -> str:
    """The one error line of an argparse failure (after the usage lines)."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("flag", "value", "what", "valid"),
    [
        ("--optimizer", "nope", "optimizer", testing.NAMES),
        ("--optimizer", "adamw,Nesterov", "optimizer", testing.NAMES),
        ("--backend", "numpy,pytorch", "backend", [b.label for b in testing.BACKENDS]),
        ("--dtype", "float8", "dtype", testing.DTYPES),
        ("--impl", "auto", "implementation", ("generic", "fused")),
    ],
)
def test_conformance_unknown_names_list_the_valid_ones(capsys, flag, value, what, valid):
    assert cli(["conformance", flag, value]) == 2
    line = _error_line(capsys.readouterr().err)
    bad = value.split(",")[-1]
    assert f"polyopt conformance: error: argument {flag}: unknown {what} {bad!r}" in line
    listed = line.split("choose from ", 1)[1]
    assert set(valid) <= set(re.split(r"[ ,()]+", listed)), line


def test_conformance_optimizer_adamw_lists_names_starting_with_sgd(capsys):
    assert cli(["conformance", "--optimizer", "AdamWW"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "choose from sgd, adagrad, rmsprop, adadelta, adam, adamw" in line


def test_an_optimizer_without_cases_says_why(capsys):
    assert cli(["conformance", "--optimizer", "Muon"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "optimizer 'Muon' has no conformance cases (2-D params only" in line


def test_an_empty_list_is_a_usage_error(capsys):
    assert cli(["conformance", "--backend", ","]) == 2
    assert "argument --backend: expected one or more backend names" in _error_line(
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("flag", "value", "valid"),
    [
        ("--optimizer", "adamm", list(polyopt.OPTIMIZERS)),
        ("--backend", "tensorflow", ["numpy", "torch", "jax", "cupy", "array_api_strict"]),
        ("--dtype", "float16", ["float32", "float64"]),
        ("--schedule", "linear", ["cosine", "constant"]),
    ],
)
def test_demo_unknown_names_list_the_valid_ones(capsys, flag, value, valid):
    assert cli(["demo", flag, value]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"argument {flag}: unknown " in line and repr(value) in line
    assert line.endswith("choose from " + ", ".join(valid)), line


# -- exit codes ------------------------------------------------------------------------


def test_nothing_ran_is_exit_1_with_the_reason(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the torch-cuda cells run")
    args = ["conformance", "--backend", "torch-cuda", "--optimizer", "sgd", "-q"]
    assert cli(args) == 1
    captured = capsys.readouterr()
    assert "0 passed, 0 failed" in captured.out
    (line,) = [x for x in captured.err.splitlines() if "nothing ran" in x]
    assert line.startswith("polyopt conformance: nothing ran: all ")
    assert "were skipped: no CUDA device" in line


def test_a_cell_that_cannot_exist_is_not_a_cell(capsys):
    # NumPy has no bfloat16: the matrix has no such cells (not skipped ones)
    assert cli(["conformance", "--backend", "numpy", "--dtype", "bfloat16", "-q"]) == 1
    err = capsys.readouterr().err
    assert "nothing to run: numpy has no bfloat16 (it has float64, float32" in err
    assert cli(["conformance", "--optimizer", "lamb", "--impl", "fused", "-q"]) == 1
    assert "nothing to run: no fused path for lamb" in capsys.readouterr().err


def test_no_cell_at_all_is_exit_1(capsys):
    # Adafactor's rows are real-valued only: no cell exists for it in complex64
    assert cli(["conformance", "--optimizer", "adafactor", "--dtype", "complex64", "-q"]) == 1
    err = capsys.readouterr().err
    assert "nothing to run: no case of adafactor runs in complex64" in err


def test_output_piped_into_head_is_not_a_traceback():
    # `polyopt conformance ... | head -1`: the reader is gone before the output comes
    cmd = [sys.executable, "-m", "polyopt", "conformance", "--optimizer", "sgd", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_help_exits_zero(capsys):
    for name in COMMANDS:
        assert cli([name, "--help"]) == 0
        assert f"usage: polyopt {name}" in capsys.readouterr().out


# -- progress --------------------------------------------------------------------------


def test_conformance_shows_one_tqdm_bar_over_the_cells(monkeypatch, capsys):
    case = testing.CASES[0].name
    rows = [c for c in testing.CASES if c.name == case]
    n = len(testing.cells(["numpy"], ["float32"], ["generic"], rows))
    args = ["conformance", "--optimizer", case, *SMALL[:-1]]
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert cli(args) == 0
    err = sys.stderr.getvalue()
    assert "conformance: 100%|" in err and f"{n}/{n}" in err, err
    assert err.count("\n") <= 1  # one bar, redrawn in place
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert cli([*args, "-q"]) == 0
    assert sys.stderr.getvalue() == ""


@needs_sklearn
def test_demo_progress_is_tqdm_on_stderr_and_q_silences_it(monkeypatch, capsys):
    args = ["demo", "--epochs", "2", "--no-compare"]
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert cli(args) == 0
    err = sys.stderr.getvalue()
    assert "adamw: 100%|" in err and "2/2" in err and "epoch/s" in err, err
    assert "test acc" in err and "[#" not in err
    assert "test accuracy" in capsys.readouterr().out  # results on stdout, not stderr
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert cli([*args, "-q"]) == 0
    assert sys.stderr.getvalue() == ""


def test_progress_off_a_terminal_waits_before_drawing():
    stream = io.StringIO()  # a log file: short runs write nothing, long ones now and then
    old, sys.stderr = sys.stderr, stream
    try:
        with _cli.progress(3, "x") as bar:
            bar.update(3)
    finally:
        sys.stderr = old
    assert stream.getvalue() == ""


# -- missing optional dependencies -----------------------------------------------------

_BLOCKED = """
import importlib.abc, runpy, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

for name in list(sys.modules):
    if name.split(".")[0] in {blocked!r}:
        del sys.modules[name]
sys.meta_path.insert(0, Blocked())
sys.argv = ["polyopt", *{argv!r}]
runpy.run_module("polyopt", run_name="__main__", alter_sys=True)
"""


def _without(blocked: set[str], *argv: str) -> subprocess.CompletedProcess:
    """``python -m polyopt ARGV`` in a fresh interpreter where ``blocked`` cannot be
    imported, as on an install without them."""
    code = textwrap.dedent(_BLOCKED.format(blocked=blocked, argv=list(argv)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_demo_without_scikit_learn_names_the_extra():
    r = _without({"sklearn"}, "demo")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "polyopt demo needs scikit-learn: pip install 'polyopt[demo]'"
    assert r.stdout == ""


@needs_sklearn
def test_demo_without_matplotlib_names_the_extra_and_runs_with_no_plot():
    r = _without({"matplotlib"}, "demo")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "polyopt demo needs matplotlib: pip install 'polyopt[demo]' (or pass --no-plot)"
    )
    r = _without({"matplotlib"}, "demo", "--epochs", "1", "--no-compare", "-q")
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout


@needs_sklearn
@pytest.mark.parametrize(("backend", "extra"), [("torch", "torch"), ("jax", "jax")])
def test_demo_backend_without_its_library_names_the_extra(backend, extra):
    r = _without({backend}, "demo", "--backend", backend)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(
        f"polyopt demo --backend {backend} needs {backend}: pip install 'polyopt[{extra}]'"
    )
    assert f"backends/{backend}.txt" in line


def test_conformance_backend_without_its_library_names_the_extra():
    r = _without({"jax"}, "conformance", "--backend", "numpy,jax")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "polyopt conformance --backend jax needs jax: pip install 'polyopt[jax]'"
    )
    assert r.stdout == ""


def test_missing_dependency_in_process(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jax", None)  # import jax -> ImportError
    monkeypatch.setitem(sys.modules, "jax.numpy", None)  # even if imported before
    assert cli(["conformance", "--backend", "jax"]) == 2
    assert capsys.readouterr().err == (
        "polyopt conformance --backend jax needs jax: pip install 'polyopt[jax]'\n"
    )
    with pytest.raises(
        _cli.MissingDependency, match=r"^x needs jax: pip install 'polyopt\[jax\]'$"
    ):
        _cli.require("jax.numpy", "x")


def test_a_broken_dependency_says_what_failed():
    err = ModuleNotFoundError("No module named 'scipy'", name="scipy")
    msg = _cli.missing_message("sklearn.datasets", "polyopt demo", err)
    assert msg == (
        "polyopt demo needs scikit-learn, which failed to import (No module named 'scipy'): "
        "pip install 'polyopt[demo]'"
    )


def test_every_extra_named_exists_in_the_package_metadata():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not run from a polyopt checkout")
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for module, (dist, install) in _cli.EXTRAS.items():
        m = re.fullmatch(r"pip install 'polyopt\[(\w+)\]'", install)
        if m is None:  # installed from elsewhere (dask's own extra)
            continue
        deps = " ".join(extras.get(m[1], []))
        assert m[1] in extras, f"{module}: the message names polyopt[{m[1]}], not in pyproject"
        assert dist.lower() in deps.lower(), f"polyopt[{m[1]}] does not install {dist}: {deps}"
