"""The README is a contract with new users: its examples run, and CI runs its test command."""

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _host(x):
    """A NumPy copy of an array of any library (CuPy refuses implicit conversion)."""
    return np.asarray(x.get() if type(x).__module__.startswith("cupy") else x)


@pytest.mark.parametrize("code", _blocks("python"), ids=lambda c: c.split("\n")[1][:30])
def test_readme_example_runs(code):
    for lib in ("torch", "jax", "optax", "cupy"):
        if re.search(rf"^import {lib}\b", code, flags=re.M):
            pytest.importorskip(lib)
    if "import cupy" in code:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() == 0:  # pragma: no cover - CUDA machines only
            pytest.skip("CuPy example: no CUDA device")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    if "params" in scope and isinstance(scope["params"], dict):  # the examples converge
        b = _host(scope["params"]["b"])
        assert np.all(np.abs(b - 1) < np.abs(0 - 1)), "the README example should move b towards 1"


#: Markdown inline links and images ``[text](target)``, reference definitions
#: ``[label]: target``, and HTML ``href=`` / ``src=`` attributes.
_LINKS = (
    r"\]\(\s*<?([^)\s>]+)",
    r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)",
    r"""(?:href|src)\s*=\s*["']([^"']+)""",
)
DOCS_SITE = "https://polyopt.readthedocs.io/en/latest/"
REPO_FILES = "https://github.com/polyopt/polyopt/blob/main/"


def _links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return [m for pattern in _LINKS for m in re.findall(pattern, text, flags=re.M)]


def test_link_finder_sees_every_kind_of_link():
    text = '[a](docs/x.md) ![i](img.png "t")\n[r]: ../y.md\n<a href="#top">t</a>\n'
    text += "```\n[not](a-link)\n```\n"
    assert _links(text) == ["docs/x.md", "img.png", "../y.md", "#top"]


def test_readme_links_are_absolute():
    """The README is also the package index's project page, where a relative link
    (``docs/torch.md``, ``#section``) is broken."""
    links = _links(README)
    assert links, "no links found: the link pattern is broken"
    relative = [link for link in links if not re.match(r"https://[^/]+", link)]
    assert not relative, f"relative (or non-https) links in README.md: {relative}"


def test_readme_links_into_the_project_exist():
    """Links to the docs site name a page of docs/, links to repository files a file."""
    for link in _links(README):
        if link.startswith(DOCS_SITE):
            page = link.removeprefix(DOCS_SITE).split("#")[0].strip("/")
            candidates = [ROOT / "docs" / f"{page}.md", ROOT / "docs" / page / "index.md"]
            assert any(c.is_file() for c in candidates), f"{link}: no page docs/{page}(.md)"
        elif link.startswith(REPO_FILES):
            path = link.removeprefix(REPO_FILES).split("#")[0]
            assert (ROOT / path).exists(), f"{link}: no {path} in the repository"
        elif link.startswith("https://polyopt.readthedocs.io"):
            raise AssertionError(f"{link}: docs links go through {DOCS_SITE}")


def test_ci_runs_the_readme_test_command():
    commands = [line for block in _blocks("bash") for line in block.splitlines()]
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_has_demo_command():
    assert any("python -m polyopt demo" in b for b in _blocks("bash"))
