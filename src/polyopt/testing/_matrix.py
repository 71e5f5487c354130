"""The conformance matrix: case × backend × dtype × implementation.

Each cell runs a case on one backend for a few steps and compares the params **and
every state entry** after every step with the NumPy float64 reference (polyopt's generic
path on NumPy in float64, itself held to an independent reference and to torch.optim by
the test suite), started from the same inputs rounded to the cell's dtype.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import OPTIMIZERS, _tree, backends
from ._cases import CASES, Case, make_problem, polyopt_hyperparams

# -- tolerances: the one place -------------------------------------------------------

#: Largest allowed error per dtype: max |actual - reference| / max |reference|, taken per
#: array and per state entry after every step. Half precision stores params and state
#: with 8 (bfloat16) or 11 (float16) significant bits, so rounding accumulates per step.
#: Complex dtypes are pairs of reals (torch.optim's view_as_real): their parts' tolerances.
TOLERANCES = {
    "float64": 1e-10,
    "float32": 1e-4,
    "float16": 4e-2,
    "bfloat16": 6e-2,
    "complex128": 1e-10,
    "complex64": 1e-4,
}
#: Steps per cell: enough for bias corrections, momentum and schedules to matter.
STEPS = {
    "float64": 12,
    "float32": 12,
    "float16": 6,
    "bfloat16": 6,
    "complex128": 12,
    "complex64": 12,
}
DTYPES = tuple(TOLERANCES)
IMPLS = ("generic", "fused")


# -- conversion and comparison ---------------------------------------------------------


def to_numpy(x: Any) -> np.ndarray:
    """Any supported array as a float64 (complex128 if complex) NumPy array, copied off
    the device if needed.

    Args:
        x: a NumPy, CuPy, torch, JAX, array-api-strict or dask array (or anything
            ``np.asarray`` takes).

    Returns:
        np.ndarray: a float64 or complex128 copy.
    """
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        import torch

        wide = torch.complex128 if x.is_complex() else torch.float64
        return x.detach().to("cpu", wide).numpy()
    if mod == "cupy":
        x = x.get()
    elif mod == "dask":
        x = x.compute()
    elif mod == "array_api_strict":
        x = np.from_dlpack(x)
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def max_error(actual: Any, desired: Any) -> float:
    """``max |actual - desired| / max |desired|`` in float64 (0 for empty arrays).

    Args:
        actual: the array under test (any supported library).
        desired: the reference, of the same shape.

    Returns:
        float: the relative error (the absolute one where ``desired`` is all zeros;
        ``inf`` if ``actual`` holds a NaN or an infinity).

    Raises:
        AssertionError: the shapes differ.
    """
    a, d = to_numpy(actual), to_numpy(desired)
    if a.shape != d.shape:
        raise AssertionError(f"shape {a.shape} differs from the reference's {d.shape}")
    if a.size == 0:
        return 0.0
    scale = float(np.max(np.abs(d)))
    diff = float(np.max(np.abs(a - d)))
    if not np.all(np.isfinite(a)):
        return float("inf")
    return diff / scale if scale > 0 else diff


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back to float64 (bfloat16: round to nearest even).

    Args:
        x: a float64 (or complex128) NumPy array.
        dtype: a name of :data:`DTYPES`.

    Returns:
        np.ndarray: the rounded values, as float64 (complex128 for complex dtypes).
    """
    if dtype.startswith("complex"):
        return np.asarray(x, dtype=dtype).astype(np.complex128)
    if dtype == "bfloat16":
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
        return u.view(np.float32).astype(np.float64).reshape(np.shape(x))
    return np.asarray(x, dtype=dtype).astype(np.float64)


# -- backends --------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """How the matrix makes arrays of one library on one device.

    ``form``: "stateful" runs ``polyopt.<Class>(params).step`` (in place: the path NumPy,
    CuPy and torch users take); "jit" runs the functional form under ``jax.jit``;
    "functional" runs it eagerly.

    Args:
        name: the library's name (``"torch"``).
        module: the module to import (``"array_api_strict"``).
        device: ``"cpu"`` or ``"cuda"``.
        dtypes: the dtypes the library has.
        form: ``"stateful"``, ``"jit"`` or ``"functional"``, as above.
        strided: whether the library has non-contiguous views to test.
    """

    name: str
    module: str
    device: str
    dtypes: tuple[str, ...]
    form: str
    strided: bool  # whether the library has non-contiguous views to test

    @property
    def label(self) -> str:
        """The name, with the device unless it is the CPU (``"torch-cuda"``)."""
        return self.name if self.device == "cpu" else f"{self.name}-{self.device}"

    def missing(self) -> str | None:
        """Why this backend cannot run here, or None.

        Returns:
            The reason (the library is not installed, with what to install; no CUDA
            device), or None.
        """
        if importlib.util.find_spec(self.module) is None:
            if self.name == "dask":
                return 'dask is not installed (pip install "dask[array]")'
            req = {"array_api_strict": "strict"}.get(self.name, self.name)
            return f"{self.module} is not installed (pip install 'polyopt[{req}]')"
        if self.device == "cuda":
            if self.name == "torch":
                import torch

                if not torch.cuda.is_available():
                    return "no CUDA device"
            if self.name == "cupy":
                try:
                    import cupy

                    if cupy.cuda.runtime.getDeviceCount() < 1:
                        return "no CUDA device"
                except Exception as e:  # no driver / runtime
                    return f"no CUDA device ({type(e).__name__})"
        return None

    def dtype_missing(self, dtype: str) -> str | None:
        """Why ``dtype`` cannot run on this backend, or None.

        Args:
            dtype: a name of :data:`DTYPES`.

        Returns:
            The reason (the library has no such dtype; JAX's x64 mode is off), or None.
        """
        if dtype not in self.dtypes:
            return f"{self.name} has no {dtype}"
        if self.name == "jax" and dtype in ("float64", "complex128"):
            import jax

            if not jax.config.jax_enable_x64:
                return f"JAX x64 is off: {dtype} would run at half width (set JAX_ENABLE_X64=1)"
        return None

    def array(self, x: np.ndarray, dtype: str, strided: bool) -> Any:
        """``x`` (float64, already rounded to ``dtype``) as this library's array: a new
        buffer (torch.asarray would share the NumPy buffer, and steps write in place).

        Args:
            x: the values, a float64 NumPy array.
            dtype: a name of :data:`DTYPES`.
            strided: make a non-contiguous view (for libraries that have them).

        Returns:
            The array, on this backend's device.
        """
        mod = importlib.import_module(self.module)
        x = np.array(x, copy=True)
        if self.name in ("numpy", "cupy"):
            out = mod.asarray(x.astype(dtype))
            return _strided(mod, out) if strided else out
        if self.name == "torch":
            t = mod.asarray(x, dtype=getattr(mod, dtype), device=self.device)
            return _strided(mod, t) if strided else t
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(
                x.astype(np.float32 if dtype == "bfloat16" else dtype), dtype=getattr(jnp, dtype)
            )
        if self.name == "array_api_strict":
            return mod.asarray(x.astype(dtype), dtype=getattr(mod, dtype))
        if self.name == "dask":
            import dask.array as da

            return da.from_array(x.astype(dtype), chunks=max(1, x.shape[0] // 2) if x.ndim else ())
        raise ValueError(f"unknown backend {self.name!r}")


def _strided(mod: Any, a: Any) -> Any:
    """A non-contiguous view holding ``a``'s values (every other element of a buffer)."""
    if a.ndim == 0 or a.shape[-1] == 0:
        return a
    shape = tuple(a.shape[:-1]) + (2 * a.shape[-1],)
    if mod.__name__ == "torch":
        buf = mod.zeros(shape, dtype=a.dtype, device=a.device)
    else:
        buf = mod.zeros(shape, dtype=a.dtype)
    view = buf[..., ::2]
    view[...] = a
    return view


_NUMPY_DTYPES = ("float64", "float32", "float16", "complex128", "complex64")
_STRICT_DTYPES = ("float64", "float32", "complex128", "complex64")

BACKENDS: tuple[Backend, ...] = (
    Backend("numpy", "numpy", "cpu", _NUMPY_DTYPES, "stateful", True),
    Backend("torch", "torch", "cpu", DTYPES, "stateful", True),
    Backend("torch", "torch", "cuda", DTYPES, "stateful", True),
    Backend("jax", "jax", "cpu", DTYPES, "jit", False),
    Backend("cupy", "cupy", "cuda", _NUMPY_DTYPES, "stateful", True),
    Backend("array_api_strict", "array_api_strict", "cpu", _STRICT_DTYPES, "stateful", False),
    Backend("dask", "dask", "cpu", _STRICT_DTYPES, "functional", False),
)


# -- cells -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix.

    Args:
        case: the row of the case table.
        backend: the library and device.
        dtype: a name of :data:`DTYPES`.
        impl: ``"generic"`` or ``"fused"``.
    """

    case: Case
    backend: Backend
    dtype: str
    impl: str

    @property
    def id(self) -> str:
        """``case-backend-dtype-impl``, for test ids and reports."""
        return f"{self.case.id}-{self.backend.label}-{self.dtype}-{self.impl}"


@dataclass
class Result:
    """The outcome of one cell.

    Args:
        cell: the cell.
        status: ``"pass"``, ``"fail"`` or ``"skip"``.
        error: the largest error seen (see :data:`TOLERANCES`).
        where: which array, state entry and step gave it.
        reason: why the cell was skipped or failed.
    """

    cell: Cell
    status: str  # "pass" | "fail" | "skip"
    error: float = 0.0  # largest error seen (see TOLERANCES)
    where: str = ""  # which array / state entry / step gave it
    reason: str = ""  # why skipped or failed


def cells(
    backends_: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
    impls: Iterable[str] = IMPLS,
    cases: Iterable[Case] | None = None,
) -> list[Cell]:
    """Every cell of the matrix (filtered by backend labels/names, dtypes, impls).

    Args:
        backends_: backend names or labels (``["numpy", "torch-cuda"]``); None: all of
            :data:`BACKENDS`.
        dtypes: dtype names; None: all of :data:`DTYPES` (each case's own dtypes
            only).
        impls: ``"generic"`` and/or ``"fused"``.
        cases: rows of the case table; None: all of :data:`CASES`.

    Returns:
        list: the :class:`Cell` objects that exist: the dtypes each library has, the
        fused impl only where the optimizer has a fused path on that library
        (:func:`polyopt.backends.exists`). Whether each can run here (library, device,
        optional dependency installed) is :func:`skip_reason`'s answer.
    """
    chosen = [
        b for b in BACKENDS if backends_ is None or b.name in backends_ or b.label in backends_
    ]
    rows = CASES if cases is None else list(cases)
    rules = {name: OPTIMIZERS[name][0]().rule for name in {c.name for c in rows}}
    return [
        Cell(c, b, d, i)
        for c in rows
        for b in chosen
        for d in (DTYPES if dtypes is None else dtypes)
        if (c.dtypes is None or d in c.dtypes) and d in b.dtypes
        for i in impls
        if i == "generic" or backends.exists(rules[c.name], b.name)
    ]


def _grouped(case: Case, leaves: list) -> Any:
    """The params as the case gives them: a list, or torch-style groups."""
    if not case.groups:
        return list(leaves)
    n = len(case.groups)
    cut = [round(i * len(leaves) / n) for i in range(n + 1)]
    return [
        {"params": list(leaves[cut[i] : cut[i + 1]]), **_resolve(o)}
        for i, o in enumerate(case.groups)
    ]


def _resolve(overrides: dict) -> dict:
    from ._cases import polyopt_schedule, resolve

    return {k: resolve(v, polyopt_schedule) for k, v in overrides.items()}


def _grad_tree(case: Case, grads: list) -> Any:
    params_form = _grouped(case, grads)
    return [g["params"] for g in params_form] if case.groups else params_form


@functools.cache
def _problem(dtype: str) -> tuple[list, list]:
    p0, gs = make_problem(max(STEPS.values()), complex=dtype.startswith("complex"))
    return [round_to(p, dtype) for p in p0], [[round_to(g, dtype) for g in step] for step in gs]


_REFERENCES: dict[tuple[str, str], list] = {}


def reference(case: Case, dtype: str) -> list[tuple[list, dict, Any]]:
    """The NumPy float64 (complex128) trajectory for ``case`` from inputs rounded to
    ``dtype``: ``[(params, slots, counts)]`` after each step (slots and counts as in
    ``OptState``). Cached.

    Args:
        case: a row of the case table.
        dtype: a name of :data:`DTYPES`: the inputs are rounded to it.

    Returns:
        list: one ``(params, slots, counts)`` tuple per step (:data:`STEPS`).
    """
    key = (case.id, dtype)
    if key not in _REFERENCES:
        _REFERENCES[key] = _reference(case, dtype)
    return _REFERENCES[key]


def _reference(case: Case, dtype: str) -> list[tuple[list, dict]]:
    factory = OPTIMIZERS[case.name][0]
    opt = factory(**polyopt_hyperparams(case), impl="generic")
    p0, gs = _problem(dtype)
    params = _grouped(case, [p.copy() for p in p0])
    state = opt.init(params)
    out = []
    for k in range(STEPS[dtype]):
        params, state = opt.update(params, _grad_tree(case, case.grads_at(k, gs[k])), state)
        out.append((_leaves(case, params), state.slots, state.counts))
    return out


def _static_groups(update: Callable, groups: list) -> Callable:
    """Under jit, group hyperparameters must stay Python values: close over them and
    pass only the arrays (what a JAX user with parameter groups writes)."""
    overrides = [{k: v for k, v in g.items() if k != "params"} for g in groups]

    def update_arrays(params, grads, state):
        trees = [g["params"] for g in params]
        new, state = update([{"params": t, **o} for t, o in zip(trees, overrides)], grads, state)
        return [{"params": g["params"]} for g in new], state

    return update_arrays


def _leaves(case: Case, params: Any) -> list:
    trees = [g["params"] for g in params] if case.groups else [params]
    return [leaf for t in trees for leaf in _tree.flatten(t)[0]]


def skip_reason(cell: Cell) -> str | None:
    """Why ``cell`` cannot run here, or None.

    Args:
        cell: a cell of the matrix.

    Returns:
        The reason (library or device missing, no such dtype, no fused path for this
        optimizer on this library), or None.
    """
    b = cell.backend
    reason = b.missing() or b.dtype_missing(cell.dtype)
    if reason:
        return reason
    if cell.impl == "fused":
        rule = OPTIMIZERS[cell.case.name][0]().rule
        if not backends.available(rule, b.name):
            return f"no fused {rule.name} path for {b.name}"
    return None


def run_cell(cell: Cell) -> Result:
    """Run one cell; never raises for a failing comparison (the Result says so).

    Args:
        cell: a cell of the matrix.

    Returns:
        Result: ``"skip"`` with the reason, ``"pass"``, or ``"fail"`` with the error,
        where it was seen, and (for a crash) the exception.
    """
    reason = skip_reason(cell)
    if reason:
        return Result(cell, "skip", reason=reason)
    try:
        return _run(cell)
    except Exception as e:  # a crash is a failure of the cell, reported with its cause
        return Result(cell, "fail", float("inf"), reason=f"{type(e).__name__}: {e}")


def _run(cell: Cell) -> Result:
    case, b, dtype = cell.case, cell.backend, cell.dtype
    factory, cls = OPTIMIZERS[case.name]
    hp = polyopt_hyperparams(case)
    p0, gs = _problem(dtype)
    leaves = [b.array(p, dtype, strided=b.strided and p.ndim == 2) for p in p0]
    params = _grouped(case, leaves)
    step: Callable
    if b.form == "stateful":
        opt = cls(params, **hp, impl=cell.impl)

        def step(g):
            opt.step(g)
            return _leaves(case, opt.params), opt.state.slots, opt.state.counts
    else:
        fopt = factory(**hp, impl=cell.impl)
        update = fopt.update
        if b.form == "jit":
            import jax

            update = jax.jit(_static_groups(fopt.update, params) if case.groups else update)
        holder = {"params": params, "state": fopt.init(params)}
        if b.form == "jit" and case.groups:
            holder["params"] = [{"params": g["params"]} for g in params]

        def step(g):
            holder["params"], holder["state"] = update(holder["params"], g, holder["state"])
            if b.name == "dask":  # what a dask user does each step: keep the graph short
                import dask

                holder["params"], holder["state"] = dask.persist(holder["params"], holder["state"])
            state = holder["state"]
            return _leaves(case, holder["params"]), state.slots, state.counts

    tol, worst, where = TOLERANCES[dtype], 0.0, ""
    ref = reference(case, dtype)
    for k in range(STEPS[dtype]):
        grads = [b.array(g, dtype, strided=False) for g in gs[k]]
        got_p, got_s, got_c = step(_grad_tree(case, case.grads_at(k, grads)))
        ref_p, ref_s, ref_c = ref[k]
        if (got_c is None) != (ref_c is None) or (
            ref_c is not None and not np.array_equal(to_numpy(_counts(got_c)), ref_c)
        ):
            raise AssertionError(f"state.counts {got_c!r} after step {k + 1}, reference {ref_c!r}")
        checks = [(f"params[{i}]", a, r) for i, (a, r) in enumerate(zip(got_p, ref_p))]
        if set(got_s) != set(ref_s):
            raise AssertionError(f"state holds slots {sorted(got_s)}, reference {sorted(ref_s)}")
        for n, column in ref_s.items():
            if len(got_s[n]) != len(column):
                raise AssertionError(
                    f"state slot {n!r} holds {len(got_s[n])} arrays, reference {len(column)}"
                )
            for i, (a, r) in enumerate(zip(got_s[n], column)):
                if (a is None) != (r is None):
                    raise AssertionError(f"state.slots[{n!r}][{i}] is {a!r}, reference {r!r}")
                if r is not None:
                    checks.append((f"state.slots[{n!r}][{i}]", a, r))
        for i, (a, before) in enumerate(zip(got_p, leaves)):
            if str(a.dtype) != str(before.dtype):
                return Result(cell, "fail", float("inf"), f"params[{i}]", f"dtype became {a.dtype}")
        for what, a, r in checks:
            e = max_error(a, r)
            if not e <= worst:
                worst, where = e, f"{what} after step {k + 1}"
    status = "pass" if worst <= tol else "fail"
    reason = "" if status == "pass" else f"error {worst:.3g} > tolerance {tol:g} at {where}"
    return Result(cell, status, worst, where, reason)


def _counts(c: Any) -> Any:
    """Counts as an array (a tuple of ints, or an integer array under jit)."""
    return np.asarray(c) if isinstance(c, tuple) else c


def run(cells_: Iterable[Cell], progress: Callable[[Result], None] | None = None) -> list[Result]:
    """Run cells one after another.

    Args:
        cells_: the cells (from :func:`cells`).
        progress: called with each :class:`Result` as it comes.

    Returns:
        list: the results, in the order of the cells.
    """
    out = []
    for c in cells_:
        r = run_cell(c)
        if progress:
            progress(r)
        out.append(r)
    return out


# -- reports ---------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    """backend × optimizer: passed / failed / skipped cells and the largest error.

    Args:
        results: results from :func:`run`.

    Returns:
        str: the table, plain text.
    """
    names = sorted({r.cell.case.name for r in results}, key=list(OPTIMIZERS).index)
    labels = list(dict.fromkeys(r.cell.backend.label for r in results))
    rows = [["backend", *names]]
    for lab in labels:
        row = [lab]
        for n in names:
            rs = [r for r in results if r.cell.backend.label == lab and r.cell.case.name == n]
            row.append(_summary(rs))
        rows.append(row)
    return _format(rows)


def dtype_table(results: list[Result]) -> str:
    """backend × dtype: cells run, failures, largest error and its tolerance.

    Args:
        results: results from :func:`run`.

    Returns:
        str: the table, plain text.
    """
    labels = list(dict.fromkeys(r.cell.backend.label for r in results))
    dtypes = [d for d in DTYPES if any(r.cell.dtype == d for r in results)]
    rows = [["backend", *[f"{d} (tol {TOLERANCES[d]:g})" for d in dtypes]]]
    for lab in labels:
        row = [lab]
        for d in dtypes:
            rs = [r for r in results if r.cell.backend.label == lab and r.cell.dtype == d]
            row.append(_summary(rs))
        rows.append(row)
    return _format(rows)


def _summary(rs: list[Result]) -> str:
    ran = [r for r in rs if r.status != "skip"]
    if not ran:
        return "skipped"
    failed = sum(r.status == "fail" for r in ran)
    err = max(r.error for r in ran)
    mark = "FAIL" if failed else "pass"
    return f"{mark} {len(ran) - failed}/{len(ran)} {err:.1e}"


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
