"""Fast paths: optional accelerations of the generic math, one module per library.

A fast path is registered for an (optimizer rule name, backend name) pair and replaces
the generic per-array loop of one parameter group. It must give the generic path's
numbers within the dtype's tolerance; the conformance matrix holds it to that.

A :class:`FastPath` has (each receives the optimizer's :class:`polyopt.Rule`: a fast
path derived from the rule serves every rule, and names none)

- ``pure(rule, xp, params, grads, slots, hp, k) -> (params, slots)``: one update of a run of
  arrays of one group, leaving its inputs untouched. ``params`` and ``grads`` are
  sequences of arrays, ``slots`` is ``{slot name: sequence}`` (one array per param, as
  in ``OptState.slots``: a tuple, list or :class:`polyopt.flat.Packed`); the new slots
  come back in that form. ``hp`` are the group's hyperparameters at this step (numbers
  where they were numbers or host-resident 0-d arrays; the key ``_base.ARRAYS`` is set
  when some are arrays), ``k`` the number of updates these arrays have had so far (a
  Python int, or a 0-d array under ``jax.jit``).
- ``inplace(rule, xp, params, grads, slots, hp, k) -> commit`` (optional; the stateful form
  on libraries with mutable arrays): plan an update that writes into ``params`` and
  ``slots``. Everything that can fail (checks, allocations, compiling, the generic math
  for arrays the kernel does not take) happens here, and nothing is written; the
  returned ``commit()`` then writes and returns ``(params, slots)`` like ``pure``, and
  must not fail, so that a step is all-or-nothing across groups. Without it the engine
  runs ``pure`` and writes the results itself.
- ``amp``: whether ``inplace`` also takes ``amp=(grad_scale, found_inf)`` (torch's
  GradScaler; see :class:`AmpUnsupported`).
- ``init(rule, xp, params, hp) -> slots`` (optional): the initial state of a group
  (the rule's values, ``rule.init_slots``) as ``{name: sequence}``, laid out for the
  fast path: e.g. views into one flat buffer per slot so that one kernel launch can
  update them all, or (JAX, whose arrays cannot be views) a
  :class:`polyopt.flat.Packed` over one buffer per slot.

Complex arrays reach a fast path as real views with a trailing axis of 2 (see
``polyopt._xp.as_real``), so a kernel written for real arrays serves them too.

A path is registered for named rules (a backend's own kernels: torch's
``_fused_adamw_``) or, with ``rules=None``, for every elementwise rule (a path derived
from the rule: :mod:`polyopt.backends._derive`); a rule's own registration wins.

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


#: (rule name, backend name) -> fast path, and backend name -> the path for every
#: elementwise rule. Filled by the backend modules, which are imported on first use of
#: their library (see _MODULES), never before.
FUSED: dict[tuple[str, str], FastPath] = {}
EVERY: dict[str, FastPath] = {}
_MODULES = {
    "cupy": "polyopt.backends.cupy",
    "jax": "polyopt.backends.jax",
    "numpy": "polyopt.backends.numpy",
    "torch": "polyopt.backends.torch",
}


def register(rules: tuple[str, ...] | None, backend: str, path: FastPath) -> None:
    """``path`` for the rules named (None: every elementwise rule) on ``backend``."""
    if rules is None:
        EVERY[backend] = path
        return
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


def _find(rule, backend: str) -> FastPath | None:
    name = rule if isinstance(rule, str) else rule.name
    fn = FUSED.get((name, backend))
    if fn is None and getattr(rule, "elementwise", True):
        fn = EVERY.get(backend)
    return fn


def lookup(rule, backend: str, impl: str) -> FastPath | None:
    """The fast path for ``rule`` (a :class:`polyopt.Rule`, or a rule's name) on
    ``backend`` arrays, or None for the generic math."""
    if impl == "generic":
        return None
    _load(backend)
    fn = _find(rule, backend)
    if fn is None and impl == "fused":
        name = rule if isinstance(rule, str) else rule.name
        have = sorted(f"{r} on {b}" for r, b in FUSED)
        have += [f"every elementwise rule on {b}" for b in sorted(EVERY)]
        raise ValueError(
            f"impl='fused': there is no fused {name} step for {backend} arrays "
            f"(fused paths: {', '.join(have) or 'none'}); use impl='auto' or 'generic'"
        )
    return fn


_GENERIC: dict = {}


def generic(rule):
    """The generic optimizer of ``rule`` (no hyperparameters of its own): what a fast
    path runs for the arrays or hyperparameters its kernel does not take
    (``generic(rule)._step_group(...)`` / ``._step_one(...)``: compute dtype, 0-d
    arrays, the rule as the generic path runs it)."""
    from .._base import Optimizer  # the engine imports this module first

    opt = _GENERIC.get(rule.name)
    if opt is None or opt.rule is not rule:
        opt = _GENERIC[rule.name] = Optimizer(rule, {}, impl="generic")
    return opt


#: The libraries with fast paths: each has one for every elementwise rule (where its
#: optional dependencies are installed: numba for NumPy), and none for other rules.
FAST_BACKENDS = tuple(_MODULES)


def exists(rule, backend: str) -> bool:
    """Whether ``rule`` has a fused path on ``backend`` where the library's optional
    dependencies are installed (a static fact: nothing is imported). :func:`available`
    says whether it is there in this process."""
    return backend in FAST_BACKENDS and getattr(rule, "elementwise", True)


def available(rule, backend: str) -> bool:
    _load(backend)
    return _find(rule, backend) is not None
