"""``python -m polyopt conformance``: the conformance matrix on the installed backends.

Runs every case of :mod:`polyopt.testing` on every backend, dtype and implementation
that this machine has, prints backend × optimizer and backend × dtype tables (cells
passed / run, largest error) and exits with 1 if any cell failed. Backends, devices and
dtypes that are missing are listed as skipped, with the reason.

Exit codes: 0 every cell that ran passed; 1 a cell failed, or nothing ran (every cell
selected was skipped: the reasons are printed); 2 a usage error, or a backend named
with ``--backend`` is not installed (the message names the extra to install).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence

import polyopt

from . import _cli, testing

PROG = "polyopt conformance"


def _backend_names() -> _cli.Names:
    names = list(dict.fromkeys(n for b in testing.BACKENDS for n in (b.name, b.label)))
    return _cli.Names("backend", names, {"strict": "array_api_strict"})


def _optimizer_names() -> _cli.Names:
    classes = {cls.__name__: name for name, (_, cls) in polyopt.OPTIMIZERS.items()}
    own = {}  # optimizers the case table leaves to their own tests (Muon: 2-D only)
    for spelling, name in (*classes.items(), *((n, n) for n in polyopt.OPTIMIZERS)):
        if name in testing.OWN_PROBLEMS:
            why = testing.OWN_PROBLEMS[name]
            own[spelling] = f"has no conformance cases ({why}; its own tests check it)"
    return _cli.Names("optimizer", testing.NAMES, classes, allow_all=True, unavailable=own)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``polyopt conformance``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Check every installed backend against the NumPy float64 reference: "
        "every case x backend x dtype x implementation. Exit code 0: every cell that ran "
        "passed; 1: a cell failed or nothing ran; 2: bad arguments or a backend asked for "
        "is not installed.",
    )
    _cli.add_list(
        p,
        "--backend",
        _backend_names(),
        "only these backends (a name runs all its devices: torch is torch and torch-cuda); "
        "default every one, the missing ones listed as skipped",
    )
    _cli.add_list(
        p,
        "--optimizer",
        _optimizer_names(),
        "only these optimizers (class names such as AdamW are accepted); default all",
    )
    _cli.add_list(p, "--dtype", _cli.Names("dtype", testing.DTYPES), "only these dtypes")
    _cli.add_list(
        p,
        "--impl",
        _cli.Names("implementation", testing._matrix.IMPLS),
        "only these implementations (fused: cells without a fast path are skipped)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print every failing cell")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    return p


def _general(reason: str) -> str:
    """Skip reasons, with the per-optimizer 'no fused X path for Y' folded together."""
    if reason.startswith("no fused"):
        return "no fused path for that optimizer and backend (impl='fused')"
    return reason


def _why_no_cell(args: argparse.Namespace, names: Sequence[str]) -> str:
    """Why the selection holds no cell: the matrix has only cells that can exist."""
    dtypes = args.dtype or testing.DTYPES
    chosen = [
        b for b in testing.BACKENDS if not args.backend or {b.name, b.label} & set(args.backend)
    ]
    for b in chosen:
        if not set(dtypes) & set(b.dtypes):
            return f"{b.label} has no {', '.join(dtypes)} (it has {', '.join(b.dtypes)})"
    if args.impl == ["fused"]:
        return (
            f"no fused path for {', '.join(names)} on {', '.join(b.label for b in chosen)} "
            "(fast paths exist for elementwise rules on numpy, torch, jax and cupy)"
        )
    return f"no case of {', '.join(names)} runs in {', '.join(dtypes)}"


def _require_backends(names: Sequence[str]) -> None:
    """Every backend the user named must be importable (else exit 2 naming the extra)."""
    for name in names:
        modules = dict.fromkeys(b.module for b in testing.BACKENDS if name in (b.name, b.label))
        for module in modules:
            _cli.require(module, f"{PROG} --backend {name}")


def main(argv: Sequence[str] | None = None) -> int:
    """``polyopt conformance [options]``; returns the exit code (see the module doc)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), as a return value
        return e.code if isinstance(e.code, int) else 0
    try:
        if args.backend:
            _require_backends(args.backend)
    except _cli.MissingDependency as e:
        print(e, file=sys.stderr)
        return 2
    names = args.optimizer or list(testing.NAMES)
    cases = [c for c in testing.CASES if c.name in names]
    cells = testing.cells(args.backend, args.dtype, args.impl or testing._matrix.IMPLS, cases)
    if not cells:
        print(f"{PROG}: nothing to run: {_why_no_cell(args, names)}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    failures = 0
    with _cli.progress(len(cells), "conformance", enabled=not args.quiet, unit="cell") as bar:

        def step(r: testing.Result) -> None:
            nonlocal failures
            if r.status == "fail":
                failures += 1
                bar.set_postfix_str(f"{failures} failed", refresh=False)
            bar.update(1)

        results = testing.run(cells, step)
    counts = Counter(r.status for r in results)
    print(
        f"{PROG}: {len(results)} cells, {counts['pass']} passed, "
        f"{counts['fail']} failed, {counts['skip']} skipped ({time.perf_counter() - t0:.1f} s)"
    )
    print("error = max |x - reference| / max |reference| over params and every state entry,")
    print("after every step; reference = NumPy float64 from the same rounded inputs\n")
    print(testing.table(results))
    print()
    print(testing.dtype_table(results))
    reasons = Counter(_general(r.reason) for r in results if r.status == "skip")
    if reasons:
        print("\nskipped:")
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {n:5d}  {reason}")
    failed = [r for r in results if r.status == "fail"]
    if failed:
        print(f"\nFAILED ({len(failed)} cells):")
        for r in failed if args.verbose else failed[:20]:
            print(f"  {r.cell.id}: {r.reason}")
        if len(failed) > 20 and not args.verbose:
            print(f"  ... {len(failed) - 20} more (use -v)")
        return 1
    if not counts["pass"]:
        why = "; ".join(f"{reason} ({n})" for reason, n in reasons.most_common())
        print(
            f"{PROG}: nothing ran: all {len(results)} cells selected were skipped: {why}",
            file=sys.stderr,
        )
        return 1
    return 0
