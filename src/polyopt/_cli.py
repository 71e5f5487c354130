"""The conventions every ``polyopt`` subcommand shares, kept in one place.

- **Names.** A flag that takes names (``--backend``, ``--optimizer``, ``--dtype``,
  ``--impl``) matches them case-insensitively, with aliases (an optimizer's class name:
  ``AdamW`` is ``adamw``). An unknown name is a usage error (argparse, exit code 2) that
  lists the valid ones: :class:`Names`.
- **Lists.** A list-valued flag takes a comma-separated list and may be repeated, the
  two forms adding up: ``--backend numpy,torch`` is ``--backend numpy --backend torch``
  (:func:`add_list`). ``all`` selects every name where the flag allows it.
- **Missing optional dependencies** are one line naming the extra that installs them,
  ``polyopt demo needs scikit-learn: pip install 'polyopt[demo]'``, and exit code 2,
  never a traceback: :func:`require` raises :class:`MissingDependency`, the command's
  ``main`` prints it.
- **Progress** goes to stderr through tqdm (:func:`progress`); every command's
  ``-q/--quiet`` turns it off.

Nothing here imports an optional dependency; tqdm is imported when a bar is made.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

__all__ = [
    "EXTRAS",
    "MissingDependency",
    "Names",
    "add_list",
    "missing_message",
    "progress",
    "require",
]

#: Top-level import name -> (what to install, the command that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "pip install 'polyopt[demo]'"),
    "matplotlib": ("matplotlib", "pip install 'polyopt[demo]'"),
    "torch": ("torch", "pip install 'polyopt[torch]'"),
    "jax": ("jax", "pip install 'polyopt[jax]'"),
    "optax": ("optax", "pip install 'polyopt[jax]'"),
    "cupy": ("cupy", "pip install 'polyopt[cupy]'"),
    "numba": ("numba", "pip install 'polyopt[fast]'"),
    "array_api_strict": ("array-api-strict", "pip install 'polyopt[strict]'"),
    "dask": ("dask", "pip install 'dask[array]'"),
    "mlxtend": ("mlxtend", "pip install 'polyopt[paper]'"),
}


class MissingDependency(ImportError):
    """An optional dependency that a command needs is not installed.

    ``str(error)`` is the whole one-line message for the user, naming the extra to
    install; a command's ``main`` prints it and returns exit code 2.
    """


def missing_message(module: str, command: str, error: ImportError | None = None) -> str:
    """The one-line message for ``command`` lacking ``module`` (an import name).

    Args:
        module: the module that failed to import (``"sklearn.datasets"``, ``"jax"``).
        command: what needs it, as the user typed it (``"polyopt demo --backend torch"``).
        error: the ImportError raised, if any: when the module itself is installed but
            one of *its* imports failed, the message says which.

    Returns:
        ``"<command> needs <distribution>: <install command>"``.
    """
    top = module.split(".")[0]
    dist, install = EXTRAS.get(top, (top, f"pip install {top}"))
    broken = error is not None and error.name is not None and error.name.split(".")[0] != top
    why = f", which failed to import ({error})" if broken else ""
    return f"{command} needs {dist}{why}: {install}"


def require(module: str, command: str) -> ModuleType:
    """Import ``module`` for ``command``, or raise :class:`MissingDependency`.

    Args:
        module: the import name (``"sklearn.datasets"``).
        command: the command line that needs it, for the message.

    Returns:
        The imported module.

    Raises:
        MissingDependency: the module (or something it imports) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(missing_message(module, command, e), name=module) from None


def _fold(name: str) -> str:
    return name.lower().replace("-", "_")


class Names:
    """The valid names of a flag, as an argparse ``type``.

    Matching ignores case and treats ``-`` as ``_``; ``aliases`` map other spellings
    (an optimizer's class name) to a canonical name. Calling the object on one name
    returns the canonical name; :meth:`list` parses a comma list. An unknown name
    raises :class:`argparse.ArgumentTypeError` listing the valid names, which argparse
    prints as ``argument --optimizer: unknown optimizer 'x'; choose from ...`` and
    exits with 2.

    Args:
        what: what a name names, for messages (``"optimizer"``).
        names: the canonical names, in the order the error lists them.
        aliases: other spellings -> canonical name.
        allow_all: whether ``all`` selects every name (in :meth:`list`).
        unavailable: names that exist but cannot be chosen here -> why (the message
            says so instead of calling them unknown).
    """

    def __init__(
        self,
        what: str,
        names: Iterable[str],
        aliases: Mapping[str, str] | None = None,
        *,
        allow_all: bool = False,
        unavailable: Mapping[str, str] | None = None,
    ):
        self.what = what
        self.names = list(dict.fromkeys(names))
        self.allow_all = allow_all
        self.unavailable = {_fold(k): v for k, v in (unavailable or {}).items()}
        self._lookup = {_fold(n): n for n in self.names}
        for alias, name in (aliases or {}).items():
            if name in self.names:
                self._lookup.setdefault(_fold(alias), name)
        self.__name__ = what  # argparse names the type in some messages

    def choices(self) -> str:
        """The valid names as the error messages list them."""
        return ", ".join(self.names) + (" (or all)" if self.allow_all else "")

    def __call__(self, text: str) -> str:
        name = self._lookup.get(_fold(text.strip()))
        if name is not None:
            return name
        why = self.unavailable.get(_fold(text.strip()))
        if why:
            raise argparse.ArgumentTypeError(f"{self.what} {text.strip()!r} {why}")
        raise argparse.ArgumentTypeError(
            f"unknown {self.what} {text.strip()!r}; choose from {self.choices()}"
        )

    def list(self, text: str) -> list[str]:
        """Parse ``"a,b,c"`` into canonical names (``all``: every name, where allowed)."""
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(
                f"expected one or more {self.what} names, comma-separated; got {text!r}"
            )
        out: list[str] = []
        for item in items:
            chosen = self.names if self.allow_all and item.lower() == "all" else [self(item)]
            out.extend(n for n in chosen if n not in out)
        return out


class _Extend(argparse.Action):
    """Append a parsed comma list to the flag's list, each name once."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.extend(v for v in values if v not in items)
        setattr(namespace, self.dest, items)


def add_list(
    parser: argparse.ArgumentParser | Any, flag: str, names: Names, help: str, **kwargs: Any
) -> argparse.Action:
    """Add a list-valued ``flag`` taking comma lists of ``names``, repeatable.

    The parsed value is the list of canonical names in the order given (repeats
    dropped), or ``None`` when the flag is absent (the command's "every one"). The help
    text gets the valid names appended.
    """
    return parser.add_argument(
        flag,
        action=_Extend,
        type=names.list,
        metavar=kwargs.pop("metavar", "NAME[,NAME...]"),
        help=f"{help}; comma-separated or repeated, from: {names.choices()}",
        **kwargs,
    )


def progress(total: int, desc: str, *, enabled: bool = True, unit: str = "it", **kwargs: Any):
    """A tqdm progress bar on stderr (``enabled=False``: a bar that draws nothing).

    On a terminal it redraws in place; elsewhere (logs, CI) it first shows after two
    seconds and then at most every ten, so a log gets a line now and then for the long
    runs and nothing for the short ones. (``delay`` needs tqdm >= 4.58.)
    """
    from tqdm import tqdm

    stream = sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        disable=not enabled,
        mininterval=0.1 if tty else 10.0,
        delay=0.0 if tty else 2.0,
        dynamic_ncols=True,
        **kwargs,
    )
