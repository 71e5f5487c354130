"""Fast paths: optional accelerations of the generic math, one module per library.

A fast path is registered for an (optimizer rule name, backend name) pair and replaces
the generic per-array loop of one parameter group. It must give the generic path's
numbers within the dtype's tolerance; the conformance matrix holds it to that.

A :class:`FastPath` has

- ``pure(xp, params, grads, slots, hp, k) -> (params, slots)``: one update of a run of
  arrays of one group, leaving its inputs untouched. ``params`` and ``grads`` are
  sequences of arrays, ``slots`` is ``{slot name: sequence}`` (one array per param, as
  in ``OptState.slots``: a tuple, list or :class:`polyopt.flat.Packed`); the new slots
  come back in that form. ``hp`` are the group's hyperparameters at this step (numbers
  where they were numbers or host-resident 0-d arrays; the key ``_base.ARRAYS`` is set
  when some are arrays), ``k`` the number of updates these arrays have had so far (a
  Python int, or a 0-d array under ``jax.jit``).
- ``inplace(xp, params, grads, slots, hp, k) -> commit`` (optional; the stateful form
  on libraries with mutable arrays): plan an update that writes into ``params`` and
  ``slots``. Everything that can fail (checks, allocations, compiling, the generic math
  for arrays the kernel does not take) happens here, and nothing is written; the
  returned ``commit()`` then writes and returns ``(params, slots)`` like ``pure``, and
  must not fail, so that a step is all-or-nothing across groups. Without it the engine
  runs ``pure`` and writes the results itself.
- ``amp``: whether ``inplace`` also takes ``amp=(grad_scale, found_inf)`` (torch's
  GradScaler; see :class:`AmpUnsupported`).
- ``init(xp, params, names) -> slots`` (optional): the state of a group as
  ``{name: sequence}``, e.g. views into one flat buffer per slot so that one kernel
  launch can update them all, or (JAX, whose arrays cannot be views) a
  :class:`polyopt.flat.Packed` over one buffer per slot.

Complex arrays reach a fast path as real views with a trailing axis of 2 (see
``polyopt._xp.as_real``), so a kernel written for real arrays serves them too.

The dispatch point is :func:`lookup`, called once per update by the engine:
``impl="generic"`` never uses a fast path, ``"fused"`` requires one (a clear error
otherwise), ``"auto"`` uses one where registered.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class FastPath:
    pure: Callable
    inplace: Callable | None = None
    init: Callable | None = None
    amp: bool = False  # inplace takes amp=(grad_scale, found_inf): see AmpUnsupported


class AmpUnsupported(Exception):
    """Raised by an in-place fast path asked to take ``amp=(grad_scale, found_inf)``
    (``torch.amp.GradScaler``'s route for fused optimizers: the kernel divides the
    grads by ``grad_scale`` and leaves everything as it was where ``found_inf`` is
    nonzero, on the device, without a host sync) for arrays or hyperparameters its
    kernel cannot take. Nothing has changed; the caller takes another route."""


#: (rule name, backend name) -> fast path. Filled by the backend modules, which are
#: imported on first use of their library (see _MODULES), never before.
FUSED: dict[tuple[str, str], FastPath] = {}
_MODULES = {
    "cupy": "polyopt.backends.cupy",
    "jax": "polyopt.backends.jax",
    "numpy": "polyopt.backends.numpy",
    "torch": "polyopt.backends.torch",
}


def register(rules: tuple[str, ...], backend: str, path: FastPath) -> None:
    for rule in rules:
        FUSED[(rule, backend)] = path


def _load(backend: str) -> None:
    module = _MODULES.pop(backend, None)  # import once
    if module is not None:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            # an optional library the fast path needs (numba...) is absent: generic only.
            # A missing polyopt module is a bug and must not pass silently.
            if e.name and e.name.startswith("polyopt") and e.name != module:
                raise


def lookup(rule: str, backend: str, impl: str) -> FastPath | None:
    """The fast path to use, or None for the generic math."""
    if impl == "generic":
        return None
    _load(backend)
    fn = FUSED.get((rule, backend))
    if fn is None and impl == "fused":
        have = sorted(f"{r} on {b}" for r, b in FUSED) or ["none"]
        raise ValueError(
            f"impl='fused': there is no fused {rule} step for {backend} arrays "
            f"(fused paths: {', '.join(have)}); use impl='auto' or 'generic'"
        )
    return fn


def available(rule: str, backend: str) -> bool:
    _load(backend)
    return (rule, backend) in FUSED
