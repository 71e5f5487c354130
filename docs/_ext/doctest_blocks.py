"""A griffe extension for the docs build: doctest examples as code blocks.

polyopt's docstrings carry their examples as bare doctests (``>>>`` lines and their
output, which pytest runs: tests/test_docstrings.py). Markdown would render them as a
paragraph, and read ``[0]`` in an output as a link; this wraps each run of doctest
lines (from a ``>>>`` line to the next blank line) in a ``pycon`` code fence before
mkdocstrings renders the docstring. It also renders the reST roles the docstrings use
(``:func:`adam```, ``:math:`g_t```, ``:class:`~polyopt.OptState```) as inline code, as
``help()`` readers see them. The source is not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    out: list[str] = []
    in_example = False
    in_fence = False
    for line in text.split("\n"):
        stripped = line.lstrip()
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and not in_example and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
            in_example = True
        elif in_example and not stripped:
            out.append(f"{indent}```")
            in_example = False
        out.append(line)
    if in_example:
        out.append(f"{indent}```")
    return "\n".join(out)


_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|math|obj|exc):`~?([^`]+)`")


def plain_roles(text: str) -> str:
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(fence_doctests(obj.docstring.value))
