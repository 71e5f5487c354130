"""NumPy fast path for every elementwise rule: the rule's kernel, one numba pass over memory.

One compiled call updates a whole parameter group, however many arrays it holds: each
element of params, grads and state is read once and written once, with no temporaries
the size of the parameters. The kernel is derived from the rule's own ``step``
(:mod:`polyopt.backends._derive`): the same operations in the same order and dtype
(float32 or float64), the host constants rounded from float64 once as NumPy rounds a
Python float, so the results equal the generic path's to the last bit (no
``fastmath``, hence no FMA contraction). Nothing here names an optimizer.

How a group is launched:

- The arrays are described by a table of data addresses (param, grad, each slot; for
  the functional form also the new param and slots), read from the arrays' ids inside
  numba (:mod:`polyopt.backends._ndarray`: 0.05 µs per array where Python takes 1.5).
- When params, grads and every slot each lie back to back in one buffer (see
  :mod:`polyopt.flat`; the state made by :func:`init` always does), the table
  collapses to one entry per stream ("span"): the kernel walks the 1-D spans.
- Groups of ``_derive.PARALLEL_FROM`` elements or more run in chunks on numba's
  threads, smaller ones on the calling thread (a size rule; ``numba.set_num_threads``
  sets how many).

What falls back to the generic per-array math: arrays that are not exact
``np.ndarray`` (subclasses), not C-contiguous, or read-only where the stateful form
writes; float16 (numba has no float16 type; the generic path computes it in float32);
hyperparameters that are not Python numbers, or an array step count
(:func:`polyopt.backends._derive.host_values`). Only the arrays that need it fall back;
the rest of the group stays fused. In the stateful form a group whose params overlap in
memory (the same array twice) is left to the generic path as a whole: updated in place
twice, it would differ from it.

``LAST_PATH`` records how the last group was run: "span", "pointers", "split" (part
fused, part generic or several dtypes) or "generic".
"""

from __future__ import annotations

import numpy as np

from .. import flat
from . import FastPath, _derive, _ndarray, generic, register

#: how the last group was updated: "span", "pointers", "split" or "generic"
LAST_PATH = ""

_DTYPES = _ndarray.DTYPES


def init(rule, xp, params, hp):
    """The rule's initial state as views into one flat buffer per slot and dtype."""
    cols = rule.init_slots(params, hp, np)
    by_dtype: dict = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    slots: dict = {name: [None] * len(params) for name in cols}
    for dtype, idx in by_dtype.items():
        shapes = [tuple(params[i].shape) for i in idx]
        for name, col in cols.items():
            for i, view in zip(idx, flat.empty_views(np, shapes, dtype)):
                view[...] = col[i]
                slots[name][i] = view
    return slots


def _generic(rule, xp, params, grads, slots, hp, k, idx, new_p, new_s):
    """The engine's own per-array step for the arrays ``idx``, into new_p/new_s (new
    arrays: nothing is written)."""
    engine = generic(rule)
    for i in idx:
        old = {name: arrays[i] for name, arrays in slots.items()}
        new_p[i], s = engine._step_one(xp, params[i], grads[i], old, hp, k)
        for name, a in s.items():
            new_s[name][i] = a


def _keep_layout(slots, idx, new_s):
    """In place: the new state of the arrays ``idx`` written into the old state arrays,
    so that the state keeps its flat layout for the next step."""
    for i in idx:
        for name, arrays in new_s.items():
            dst = slots[name][i]
            if type(dst) is np.ndarray and dst.flags.writeable:
                dst[...] = arrays[i]
                arrays[i] = dst


_WRITES: dict = {}


def _writes(inplace: bool, n_slots: int) -> np.ndarray:
    """Which streams (param, grad, slots...) a launch writes."""
    key = (inplace, n_slots)
    w = _WRITES.get(key)
    if w is None:
        w = _WRITES[key] = np.array([inplace, False] + [inplace] * n_slots)
    return w


def _launch(prog, tab, sizes, dtype, span, out_shapes=None):
    """One kernel call over the arrays of ``tab`` (in place); with ``out_shapes`` (the
    functional form) into new flat buffers, returned as ``(new params, new slots)``
    views with those shapes."""
    total = int(sizes.sum())
    if span:  # one segment per stream: the concatenated arrays are one array
        first = int(np.argmax(sizes > 0))  # 0 if all are empty
        tab = np.ascontiguousarray(tab[:, first : first + 1])
        run_sizes = np.array([total], np.int64)
    else:
        run_sizes = sizes
    pure = out_shapes is not None
    kernel = prog.kernel(dtype, pure)
    sc = prog.constants(dtype)
    if not pure:
        kernel(tab, run_sizes, sc)
        return None
    outs = [np.empty(total, dtype) for _ in range(1 + len(prog.names))]
    if span:
        out_tab = np.array([[b.ctypes.data] for b in outs], np.int64)
    else:
        starts = np.zeros(len(sizes), np.int64)
        np.cumsum(sizes[:-1] * dtype.itemsize, out=starts[1:])
        out_tab = np.array([b.ctypes.data for b in outs], np.int64)[:, None] + starts
    kernel(np.concatenate([tab, out_tab]), run_sizes, sc)
    offsets = np.zeros(len(out_shapes), np.int64)
    np.cumsum(sizes[:-1] * dtype.itemsize, out=offsets[1:])
    views = [
        [np.ndarray(sh, dtype, b, o) for sh, o in zip(out_shapes, offsets.tolist())] for b in outs
    ]
    return views[0], dict(zip(prog.names, views[1:]))


def _plan(rule, xp, params, grads, slots, hp, k, inplace: bool):
    """Everything a group's update needs but the writes; returns the commit, which
    launches the kernel (in place: into params and slots) and returns the results.
    The generic math for arrays the kernel does not take is computed here, into new
    arrays, so that a failure leaves nothing written."""
    global LAST_PATH
    n = len(params)
    new_p: list = [None] * n
    new_s: dict = {name: [None] * n for name in slots}
    if not _derive.host_values(hp, k):
        LAST_PATH = "generic"
        _generic(rule, xp, params, grads, slots, hp, k, range(n), new_p, new_s)

        def commit_generic():
            if inplace:
                _keep_layout(slots, range(n), new_s)
            return new_p, new_s

        return commit_generic
    prog = _derive.program(rule, hp, k + 1)
    names = prog.names
    streams = [params, grads, *[slots[nm] for nm in names]]
    tab, sizes, codes, uniform, span = _ndarray.table(streams, _writes(inplace, len(names)))

    if uniform:  # the common case: one launch for the whole group
        LAST_PATH = "span" if span else "pointers"
        dtype = _DTYPES[codes[0]]
        if inplace:
            prog.kernel(dtype).ready(sizes)  # compiled now: the commit must not fail

            def commit_one():
                _launch(prog, tab, sizes, dtype, span)
                return list(params), slots

            return commit_one
        result = _launch(prog, tab, sizes, dtype, span, [p.shape for p in params])
        return lambda: result

    # several dtypes, or arrays the kernel cannot take: one launch per dtype, and the
    # generic math for the rest
    if inplace and (codes >= 0).any():
        ok = np.flatnonzero(codes >= 0)
        nbytes = sizes[ok] * np.array([d.itemsize for d in _DTYPES])[codes[ok]]
        if _ndarray.overlap(tab[0, ok], nbytes):  # see _ndarray.table
            codes[:] = _ndarray.GENERIC
    LAST_PATH = "split" if (codes >= 0).any() else "generic"
    launches = []
    for code in np.unique(codes[codes >= 0]).tolist():
        idx = np.flatnonzero(codes == code)
        sub = np.ascontiguousarray(tab[:, idx])
        if inplace:
            prog.kernel(_DTYPES[code]).ready(sizes[idx])
        launches.append((sub, sizes[idx], _DTYPES[code], idx.tolist()))
    rest = np.flatnonzero(codes < 0).tolist()
    _generic(rule, xp, params, grads, slots, hp, k, rest, new_p, new_s)

    def commit_split():
        for sub, sz, dtype, idx in launches:
            if inplace:
                _launch(prog, sub, sz, dtype, False)
                for i in idx:
                    new_p[i] = params[i]
                    for name in names:
                        new_s[name][i] = slots[name][i]
            else:
                ps, ss = _launch(prog, sub, sz, dtype, False, [params[i].shape for i in idx])
                for j, i in enumerate(idx):
                    new_p[i] = ps[j]
                    for name in names:
                        new_s[name][i] = ss[name][j]
        if inplace:
            _keep_layout(slots, rest, new_s)
        return new_p, new_s

    if inplace:
        return commit_split
    result = commit_split()
    return lambda: result


def pure(rule, xp, params, grads, slots, hp, k):
    return _plan(rule, xp, params, grads, slots, hp, k, False)()


def inplace(rule, xp, params, grads, slots, hp, k):
    return _plan(rule, xp, params, grads, slots, hp, k, True)


if _derive.HAVE_NUMBA:
    register(None, "numpy", FastPath(pure, inplace, init))
