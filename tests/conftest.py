"""Shared by every test module: the helper modules next to the tests (``cases``, the
independent NumPy ``reference``, ``torch_maxdiff``) importable by name.

pytest runs with ``--import-mode=importlib`` (pyproject.toml), which does not put this
directory on ``sys.path``; it is put there once, here, rather than in each module."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
