"""The examples in polyopt's docstrings run, and the public API is documented.

Every module of the ``polyopt`` package is imported by name and its doctests (found by
:class:`doctest.DocTestFinder`) run, each as its own test case. A module whose optional
dependency is not installed here (``polyopt.backends.cupy`` without CuPy or a CUDA
device, ``polyopt.torch`` without torch, ``polyopt.optax`` without optax/JAX, ...) is
not collected: its examples need that library, and the import error is the whole
story. ``polyopt.__main__`` is not imported (it is the command line).

The second half holds the documentation to its contract: every public function and
class of the API reference has a Google-style ``Args:`` section naming each of its
arguments (``impl`` included) and, for functions that return something, a
``Returns:`` section (mkdocstrings renders both on the site).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import polyopt


def _modules() -> list:
    out = []
    for info in pkgutil.walk_packages(polyopt.__path__, "polyopt."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        try:
            out.append(importlib.import_module(info.name))
        except ImportError:  # an optional dependency (or device) that is not here
            continue
    return [polyopt, *out]


def _doctests() -> list:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests, seen = [], set()
    for module in _modules():
        for test in finder.find(module, module.__name__):
            if test.examples and test.name not in seen:
                seen.add(test.name)
                tests.append(test)
    return sorted(tests, key=lambda t: t.name)


DOCTESTS = _doctests()
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_doctests_are_found():
    names = {t.name for t in DOCTESTS}
    # one from each kind of module: a rule, the schedules, the EMA, the testing package
    for name in (
        "polyopt.rules.adam.adamw",
        "polyopt.schedules",
        "polyopt.ema",
        "polyopt.testing",
    ):
        assert any(n == name or n.startswith(name + ".") for n in names), name


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_example(test):
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=out.append, clear_globs=True)
    assert result.failed == 0, "".join(out)


# -- the documentation contract: Args / Returns ----------------------------------------


def _public_api() -> list[tuple[str, object]]:
    """(qualified name, function or class) for the names the API reference documents."""
    out: list[tuple[str, object]] = []
    for module_name in (
        "polyopt",
        "polyopt.schedules",
        "polyopt.ema",
        "polyopt.flat",
        "polyopt.testing",
    ):
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == module_name
        ]
        for name in names:
            obj = getattr(module, name)
            home = getattr(obj, "__module__", "") or ""
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not home.startswith("polyopt"):
                continue  # imported helpers (typing.Any, ...)
            out.append((f"{module.__name__}.{name}", obj))
    return out


def _arguments(obj: object) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) and "__init__" in vars(obj) else obj
    try:
        sig = inspect.signature(obj if not inspect.isclass(obj) else target)
    except (TypeError, ValueError):
        return []
    return [
        n
        for n, p in sig.parameters.items()
        if n not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _is_namedtuple(obj: object) -> bool:
    return inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields")


API = _public_api()


@pytest.mark.parametrize("name,obj", API, ids=[n for n, _ in API])
def test_public_docstring_has_args_and_returns(name, obj):
    doc = inspect.getdoc(obj) or ""
    args = _arguments(obj)
    if inspect.isclass(obj) and issubclass(obj, polyopt.StatefulOptimizer):
        args = [a for a in args if a != "params"]  # the class adds params; prose says so
    if args:
        # a NamedTuple's fields are its attributes (griffe reads them so)
        title = "Attributes:" if _is_namedtuple(obj) else "Args:"
        assert title in doc, f"{name} has no {title} section"
        section = doc.split(title, 1)[1]
        missing = [a for a in args if f"\n    {a}:" not in "\n" + section]
        assert not missing, f"{name}: Args lacks {missing}"
    if inspect.isfunction(obj):
        ret = inspect.signature(obj).return_annotation
        if ret not in (None, "None"):
            assert "Returns:" in doc, f"{name} has no Returns section"


# -- the API reference's signature blocks (docs/api/optimizers.md) ----------------------
#
# The stateful classes, polyopt.torch.<Name> and polyopt.optax.<name> are made at import
# time from polyopt.OPTIMIZERS, so mkdocstrings (which reads the source) cannot see their
# signatures: the page lists them in one code block per optimizer, after a marker
# ``<!-- signatures: NAME -->``. These tests hold each block to the live signatures.

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api" / "optimizers.md"


def plain_signature(qualname: str, obj: object) -> str:
    """``qualname(a=1, *, b=2)``: the signature without annotations (what users type)."""
    sig = inspect.signature(obj)
    out, star = [], False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        out.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"{qualname}({', '.join(out)})"


def signature_block(name: str) -> list[str]:
    """The documented lines for optimizer ``name``: functional, stateful, torch, optax
    (the last two only where torch / optax are installed)."""
    factory, cls = polyopt.OPTIMIZERS[name]
    lines = [
        plain_signature(f"polyopt.{name}", factory),
        plain_signature(f"polyopt.{cls.__name__}", cls),
    ]
    try:
        import polyopt.torch as pt

        lines.append(plain_signature(f"polyopt.torch.{cls.__name__}", getattr(pt, cls.__name__)))
    except ImportError:
        pass
    try:
        import polyopt.optax as po

        lines.append(plain_signature(f"polyopt.optax.{name}", getattr(po, name)))
    except ImportError:
        pass
    return lines


def _documented_block(text: str, name: str) -> list[str]:
    marker = f"<!-- signatures: {name} -->"
    assert marker in text, f"docs/api/optimizers.md has no signature block for {name}"
    after = text.split(marker, 1)[1].split("```", 2)[1]
    return [line for line in after.splitlines()[1:] if line.strip()]


@pytest.mark.parametrize("name", list(polyopt.OPTIMIZERS))
def test_api_page_lists_every_form_with_its_signature(name):
    documented = _documented_block(API_PAGE.read_text(encoding="utf-8"), name)
    for line in signature_block(name):
        if line.startswith("polyopt.torch."):
            # torch's own constructor arguments change with torch's version: the line
            # must name the class and take params first
            head = line.split("(", 1)[0] + "(params"
            assert any(d.startswith(head) for d in documented), (name, line)
        else:
            assert line in documented, f"{name}: expected\n{line}\nin\n" + "\n".join(documented)
    assert f"::: polyopt.{name}\n" in API_PAGE.read_text(encoding="utf-8")
