"""The README is a contract with new users: its examples run, and CI runs its test command."""

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("code", _blocks("python"), ids=lambda c: c.split("\n")[1][:30])
def test_readme_example_runs(code):
    for lib in ("torch", "jax"):
        if f"import {lib}" in code:
            pytest.importorskip(lib)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    if "params" in scope and isinstance(scope["params"], dict):  # the examples converge
        b = np.asarray(scope["params"]["b"])
        assert np.all(np.abs(b - 1) < np.abs(0 - 1)), "the README example should move b towards 1"


def test_ci_runs_the_readme_test_command():
    commands = [line for block in _blocks("bash") for line in block.splitlines()]
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_has_demo_command():
    assert any("python -m polyopt demo" in b for b in _blocks("bash"))
