"""CI: what a user with only ``pip install polyopt`` (no extras) sees.

Run with the Python of a fresh virtual environment that has polyopt installed without
extras. The core (NumPy) works; every optional feature, asked for, answers with one line
that names the extra to install (``pip install 'polyopt[torch]'``), never a traceback.
Exit code 1 if any check fails, each failure printed with what was seen.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

#: Modules this environment must not have, or the checks below prove nothing.
ABSENT = (
    "torch",
    "jax",
    "optax",
    "sklearn",
    "matplotlib",
    "numba",
    "cupy",
    "array_api_strict",
    "mlxtend",
)

#: (module, extra): importing the module raises an ImportError naming the extra.
IMPORTS = [("polyopt.torch", "torch"), ("polyopt.optax", "jax")]

#: (command arguments, extras named, must fail): the console script's output names
#: each extra as "pip install 'polyopt[extra]'", with no traceback; a command that
#: cannot do what was asked exits non-zero.
COMMANDS = [
    (["demo"], ["demo"], True),
    (["paper", "--quick"], ["paper"], True),
    (["conformance", "--backend", "torch"], ["torch"], True),
    (["conformance", "--backend", "jax"], ["jax"], True),
    (["conformance", "--backend", "cupy"], ["cupy"], True),
    (["conformance", "--backend", "array_api_strict"], ["strict"], True),
    # The NumPy rows run; the rows of the missing libraries name their extras.
    (["bench", "--quick"], ["torch", "jax", "fast"], False),
]

TIMEOUT_S = 300


def _install_hint(extra: str) -> str:
    return f"pip install 'polyopt[{extra}]'"


def check_environment() -> list[str]:
    present = [m for m in ABSENT if importlib.util.find_spec(m) is not None]
    return [f"environment: {m} is installed; this check needs a bare install" for m in present]


def check_core() -> list[str]:
    import numpy as np

    import polyopt

    params = [np.ones(3)]
    opt = polyopt.AdamW(params, lr=0.1)
    opt.step([np.ones(3)])
    if not np.all(params[0] < 1):
        return [f"core: one AdamW step on NumPy did not move the params: {params[0]}"]
    return []


def check_import(module: str, extra: str) -> list[str]:
    try:
        importlib.import_module(module)
    except ImportError as e:
        message = str(e)
        if _install_hint(extra) not in message or "\n" in message:
            return [f"import {module}: want one line with {_install_hint(extra)!r}, got {e!r}"]
        print(f"ok    import {module}: {type(e).__name__}: {message}")
        return []
    return [f"import {module}: imported without its library"]


def check_command(args: list[str], extras: list[str], must_fail: bool) -> list[str]:
    script = Path(sys.executable).with_name("polyopt")
    cmd = [str(script), *args]
    shown = "polyopt " + " ".join(args)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [f"{shown}: still running after {TIMEOUT_S} s"]
    out = r.stdout + r.stderr
    problems = []
    if "Traceback" in r.stderr:
        problems.append("a traceback in stderr")
    problems += [f"no {_install_hint(x)!r}" for x in extras if _install_hint(x) not in out]
    if must_fail and r.returncode == 0:
        problems.append("exit code 0 although it could not run")
    if problems:
        tail = "\n".join(f"      | {line}" for line in out.splitlines()[-25:])
        return [f"{shown} (exit {r.returncode}): {'; '.join(problems)}; output ends:\n{tail}"]
    lines = [line for line in out.splitlines() if "pip install 'polyopt[" in line]
    print(f"ok    {shown} (exit {r.returncode}): {lines[0].strip()}")
    return []


def main() -> int:
    problems = check_environment()
    if not problems:
        problems += check_core()
        for module, extra in IMPORTS:
            problems += check_import(module, extra)
        for args, extras, must_fail in COMMANDS:
            problems += check_command(args, extras, must_fail)
    for p in problems:
        print(f"FAIL  {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
