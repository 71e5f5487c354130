"""``python -m polyopt conformance``: the conformance matrix on the installed backends.

Runs every case of :mod:`polyopt.testing` on every backend, dtype and implementation
that this machine has, prints backend × optimizer and backend × dtype tables (cells
passed / run, largest error) and exits with 1 if any cell failed. Backends, devices and
dtypes that are missing are listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence

from . import testing


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polyopt conformance",
        description="Check every installed backend against the NumPy float64 reference.",
    )
    names = sorted({b.name for b in testing.BACKENDS} | {b.label for b in testing.BACKENDS})
    p.add_argument("--backend", action="append", choices=names, help="only these (repeatable)")
    p.add_argument("--dtype", action="append", choices=testing.DTYPES, help="only these")
    p.add_argument("--optimizer", action="append", help="only these optimizer names")
    p.add_argument("--impl", action="append", choices=("generic", "fused"), help="only these")
    p.add_argument("-v", "--verbose", action="store_true", help="print every failing cell")
    return p


def _general(reason: str) -> str:
    """Skip reasons, with the per-optimizer 'no fused X path for Y' folded together."""
    if reason.startswith("no fused"):
        return "no fused path for that optimizer and backend (impl='fused')"
    return reason


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cases = [c for c in testing.CASES if not args.optimizer or c.name in args.optimizer]
    if not cases:
        print(f"no cases for optimizer(s) {args.optimizer}", file=sys.stderr)
        return 2
    cells = testing.cells(args.backend, args.dtype, args.impl or testing._matrix.IMPLS, cases)
    t0 = time.perf_counter()
    done = 0

    def progress(_r):
        nonlocal done
        done += 1
        if sys.stderr.isatty() and done % 25 == 0:
            print(f"\r{done}/{len(cells)} cells", end="", file=sys.stderr, flush=True)

    results = testing.run(cells, progress)
    if sys.stderr.isatty():
        print("\r", end="", file=sys.stderr)
    counts = Counter(r.status for r in results)
    print(
        f"polyopt conformance: {len(results)} cells, {counts['pass']} passed, "
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
    return 1 if failed else 0
