"""Command line: ``python -m polyopt COMMAND [options]`` (console script ``polyopt``).

Each subcommand is a module function ``main(argv) -> exit code`` that parses its own
options; :data:`COMMANDS` maps the name to it and is imported only when the command runs,
so ``polyopt --help`` stays fast and a command's dependencies (scikit-learn, matplotlib,
a backend) are needed only by that command. To add one, add an entry to
:data:`COMMANDS` and to :data:`PARSERS`.

The conventions every command follows (comma lists, names listed in every "unknown"
error, missing dependencies as one line naming the extra, tqdm progress on stderr
silenced by ``-q``) live in :mod:`polyopt._cli`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import _cli

#: name -> ("module:function", one-line help). The function takes the argument list
#: after the command name and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "polyopt.demo:main",
        "train an MLP on scikit-learn's digits on any backend; plot Adam+L2 vs AdamW",
    ),
    "conformance": (
        "polyopt.conformance:main",
        "check every installed backend against the NumPy float64 reference; "
        "exit 1 on a failure or when nothing ran",
    ),
    "bench": (
        "polyopt.bench:main",
        "time one fp32 AdamW step against torch.optim, optax and the 28 bytes/param floor",
    ),
    "paper": (
        "polyopt.paper:main",
        "re-measure the AdamW paper's findings on an MNIST subset: lr x decay landscapes, "
        "warm restarts, normalized weight decay",
    ),
}


#: name -> "module:function" returning the command's argparse parser (for its help and
#: for the test that every flag of every command has help text).
PARSERS: dict[str, str] = {
    "demo": "polyopt.demo:build_parser",
    "conformance": "polyopt.conformance:build_parser",
    "bench": "polyopt.bench:_parser",
    "paper": "polyopt.paper:build_parser",
}


def _load(target: str) -> Any:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of subcommand ``name`` (imports its module)."""
    return _load(PARSERS[name])()


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
    p.add_argument(
        "--version",
        action="version",
        version=f"polyopt {__version__}",
        help="print polyopt's version and exit",
    )
    p.add_argument(
        "command",
        metavar="COMMAND",
        choices=list(COMMANDS),
        help=f"the command to run: {', '.join(COMMANDS)} (see below)",
    )
    return p


def command(name: str) -> Callable[[Sequence[str]], int]:
    """The function that runs subcommand ``name`` (imports its module)."""
    return _load(COMMANDS[name][0])


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
    try:
        code = command(argv[0])(argv[1:])
        sys.stdout.flush()  # a closed pipe fails here, not at exit
    except SystemExit as e:  # a command's argparse: --help (0) or a usage error (2)
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except _cli.MissingDependency as e:  # one line naming the extra, never a traceback
        print(e, file=sys.stderr)
        return 2
    except BrokenPipeError:  # piped into `head` and the like, which stopped reading
        _discard_stdout()
        return 1
    return int(code or 0)


def _discard_stdout() -> None:
    """Point stdout at the null device, so that the flush at exit cannot fail again
    (Python's documented recipe for SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
