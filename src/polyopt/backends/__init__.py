"""Fast paths: optional accelerations of the generic math, one module per library.

A fast path is registered for an (optimizer rule name, backend name) pair and replaces
the generic per-array loop of one parameter group. It must give the generic path's
numbers within the dtype's tolerance; the conformance matrix holds it to that.

The dispatch point is :func:`lookup`, called once per update by the engine:
``impl="generic"`` never uses a fast path, ``"fused"`` requires one (a clear error
otherwise), ``"auto"`` uses one where registered.
"""

from __future__ import annotations

from collections.abc import Callable

#: (rule name, backend name) -> fast group step. Filled by the backend modules.
FUSED: dict[tuple[str, str], Callable] = {}


def register(rule: str, backend: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        FUSED[(rule, backend)] = fn
        return fn

    return deco


def lookup(rule: str, backend: str, impl: str) -> Callable | None:
    """The fast path to use, or None for the generic math."""
    if impl == "generic":
        return None
    fn = FUSED.get((rule, backend))
    if fn is None and impl == "fused":
        have = sorted(f"{r} on {b}" for r, b in FUSED) or ["none"]
        raise ValueError(
            f"impl='fused': there is no fused {rule} step for {backend} arrays "
            f"(fused paths: {', '.join(have)}); use impl='auto' or 'generic'"
        )
    return fn


def available(rule: str, backend: str) -> bool:
    return (rule, backend) in FUSED
