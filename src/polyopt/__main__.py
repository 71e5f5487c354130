"""Command line: ``python -m polyopt COMMAND [options]`` (console script ``polyopt``).

Each subcommand is a module function ``main(argv) -> exit code`` that parses its own
options; :data:`COMMANDS` maps the name to it and is imported only when the command runs,
so ``polyopt --help`` stays fast and a command's dependencies (scikit-learn, matplotlib,
a backend) are needed only by that command. To add one (``conformance``, ``bench``...),
add an entry here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

#: name -> ("module:function", one-line help). The function takes the argument list
#: after the command name and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "polyopt.demo:main",
        "train an MLP on scikit-learn's digits on any backend; plot Adam+L2 vs AdamW",
    ),
    "conformance": (
        "polyopt.conformance:main",
        "check every installed backend against the NumPy float64 reference; exit 1 on failure",
    ),
    "bench": (
        "polyopt.bench:main",
        "time one fp32 AdamW step against torch.optim, optax and the 28 bytes/param floor",
    ),
}


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    width = max(len(name) for name in COMMANDS)
    commands = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="polyopt",
        usage="polyopt [-h] [--version] COMMAND [options]",
        description="polyopt: gradient-descent optimizers written once against the "
        "Python array API standard (NumPy, CuPy, PyTorch, JAX).",
        epilog=f"commands:\n{commands}\n\n'polyopt COMMAND --help' shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"polyopt {__version__}")
    p.add_argument("command", metavar="COMMAND", choices=list(COMMANDS), help=argparse.SUPPRESS)
    return p


def command(name: str) -> Callable[[Sequence[str]], int]:
    """The function that runs subcommand ``name`` (imports its module)."""
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: dispatch ``argv[0]`` to its command; no arguments prints the help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        try:
            parser.parse_args(argv[:1])  # -h / --version, or a clear "invalid choice" error
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 0
        return 2  # pragma: no cover - parse_args exits for every non-command
    code = command(argv[0])(argv[1:])
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
