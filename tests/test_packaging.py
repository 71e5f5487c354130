"""Packaging is a contract with users: the extras install what backends/*.txt say each
backend needs, and an optional dependency that is missing says which extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]

#: backends/<file> -> the extra that installs it ("" for the core dependencies).
BACKEND_EXTRA = {
    "numpy.txt": "",
    "torch.txt": "torch",
    "jax.txt": "jax",
    "cupy.txt": "cupy",
    "numba.txt": "fast",
    "strict.txt": "strict",
    "torch-stack.txt": None,  # polyopt's own torch tests only (Lightning, HF Trainer)
}
#: Packages a backends file lists only for polyopt's own tests: not in the user's extra.
TEST_ONLY = {
    "jax.txt": {"flax", "orbax-checkpoint"},
    "torch-stack.txt": {"expecttest", "lightning", "transformers", "accelerate"},
}


def _requirements(lines) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in lines]
    out = {canonicalize_name(r.name): r for r in reqs}
    assert len(out) == len(reqs), f"a requirement is listed twice in {lines}"
    return out


def _backend_file(name: str) -> dict[str, Requirement]:
    text = (ROOT / "backends" / name).read_text()
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return _requirements([line for line in lines if line])


def _extra(name: str) -> dict[str, Requirement]:
    return _requirements(PROJECT["dependencies"] if name == "" else EXTRAS[name])


def test_every_backend_file_has_an_extra():
    files = sorted(p.name for p in (ROOT / "backends").glob("*.txt"))
    assert files == sorted(BACKEND_EXTRA), "a backends/*.txt file without an extra, or gone"


@pytest.mark.parametrize("filename", sorted(BACKEND_EXTRA))
def test_extra_matches_backend_file(filename):
    wanted = _backend_file(filename)
    test_only = {canonicalize_name(n) for n in TEST_ONLY.get(filename, ())}
    assert test_only <= set(wanted), f"backends/{filename} no longer lists {test_only}"
    extra = BACKEND_EXTRA[filename]
    if extra is None:
        assert set(wanted) == test_only, f"backends/{filename} holds more than test packages"
        return
    have = _extra(extra)
    user = {n: r for n, r in wanted.items() if n not in test_only}
    label = f"[{extra}]" if extra else "the core dependencies"
    missing = sorted(set(user) - set(have))
    assert not missing, f"backends/{filename} lists {missing}, {label} lacks them"
    if extra:  # the core dependencies may hold more than NumPy needs (tqdm)
        extra_only = sorted(set(have) - set(user))
        assert not extra_only, f"{label} has {extra_only}, backends/{filename} does not"
    for name, req in user.items():  # same versions: torch pinned identically
        assert have[name].specifier == req.specifier, (
            f"{name}: backends/{filename} says {req}, {label} says {have[name]}"
        )
        assert have[name].marker == req.marker, f"{name}: environment markers differ"


def test_torch_pinned_exactly():
    (spec,) = _extra("torch")["torch"].specifier
    assert spec.operator == "==", f"torch must be pinned exactly, got {spec}"


def test_all_extra_is_every_cpu_extra():
    (req,) = EXTRAS["all"]
    req = Requirement(req)
    assert canonicalize_name(req.name) == "polyopt"
    assert req.extras == set(EXTRAS) - {"all", "cupy"}, "a CPU extra missing from [all]"


def test_core_dependencies_and_metadata():
    core = _extra("")
    assert set(core) == {"numpy", "array-api-compat", "tqdm"}
    assert str(core["tqdm"].specifier) == ">=4.60"
    assert PROJECT["license"] == "BSD-3-Clause"
    for f in PROJECT["license-files"]:
        assert "BSD 3-Clause" in (ROOT / f).read_text()
    urls = PROJECT["urls"]
    assert set(urls) == {"Homepage", "Documentation", "Source", "Issues"}
    assert urls["Source"] == "https://github.com/polyopt/polyopt"
    assert urls["Issues"] == urls["Source"] + "/issues"
    assert urls["Documentation"] == "https://polyopt.readthedocs.io"


def _import_with(blocked: list[str], module: str, fake: dict[str, str] | None = None):
    """Import ``module`` in a fresh interpreter with ``blocked`` modules absent (None in
    sys.modules) and ``fake`` modules (name -> source) importable from a temp dir."""
    code = textwrap.dedent(
        f"""
        import sys, tempfile, pathlib
        for name in {blocked!r}:
            sys.modules[name] = None
        tmp = pathlib.Path(tempfile.mkdtemp())
        for name, src in {fake or {}!r}.items():
            (tmp / (name + ".py")).write_text(src)
        sys.path.insert(0, str(tmp))
        try:
            import {module}
        except ImportError as e:
            print(type(e).__name__ + ": " + str(e))
        else:
            print("imported")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


TORCH_MSG = "ImportError: polyopt.torch needs PyTorch: pip install 'polyopt[torch]'"
OPTAX_MSG = "ImportError: polyopt.optax needs optax and JAX: pip install 'polyopt[jax]'"


@pytest.mark.parametrize(
    "blocked, module, message",
    [
        (["torch"], "polyopt.torch", TORCH_MSG),
        (["optax"], "polyopt.optax", OPTAX_MSG),
        (["jax"], "polyopt.optax", OPTAX_MSG),
        (["jax", "optax"], "polyopt.optax", OPTAX_MSG),
    ],
)
def test_adapter_without_its_library_names_the_extra(blocked, module, message):
    assert _import_with(blocked, module) == message


@pytest.mark.parametrize("lib, module", [("torch", "polyopt.torch"), ("optax", "polyopt.optax")])
def test_adapter_reports_a_broken_install_as_it_is(lib, module):
    """A library that is installed but lacks one of its own dependencies is not reported as
    missing: the user sees the real missing module."""
    fake = {lib: "import polyopt_absent_dependency\n"}
    if lib == "optax":
        pytest.importorskip("jax")
    out = _import_with([], module, fake)
    assert out == "ModuleNotFoundError: No module named 'polyopt_absent_dependency'"


def test_core_imports_neither_adapter_library():
    out = _import_with(["torch", "jax", "optax"], "polyopt")
    assert out == "imported"
