"""Fused Adam/AdamW for NumPy arrays: one multi-threaded numba pass over memory.

One compiled call updates a whole parameter group, however many arrays it holds:
each element of params, grads and state is read once and written once, with no
temporaries the size of the parameters. The math is :func:`polyopt.rules.adam._step`,
element by element in the same order and dtype (float32 or float64), the scalars
rounded from the host's float64 once as NumPy rounds a Python float: the results match
the generic path to the last bit (no ``fastmath``, hence no FMA contraction).

How a group is launched:

- The arrays are described by a *pointer table*: for each array the data address of its
  param, grad and state arrays, and prefix sums of the sizes. The kernel splits the
  concatenated index space into chunks of ``CHUNK`` elements and runs the chunks in
  parallel (``prange``); a chunk may cover part of one big array or many small ones,
  so the threads stay balanced whatever the sizes. Arrays are rebuilt from the
  addresses inside numba (``_ptr`` + ``numba.carray``).
- When params, grads and every slot each lie back to back in one buffer (see
  :mod:`polyopt.flat`; the state made by :func:`init` always does), the table collapses
  to one entry per stream: the kernel then walks the 1-D spans ("span" path).
- Reading 1000 data pointers in Python (``a.__array_interface__``, ``a.ctypes.data``)
  costs about 0.8 ms, more than the kernel's whole step on 1M parameters. So the table
  is filled inside numba from the ``id`` of each array, reading the fields of NumPy's
  public ``PyArrayObject`` struct (data, nd, dimensions, descr, flags: the layout every
  compiled NumPy extension relies on through ``PyArray_DATA`` & co.). The layout is
  checked at import against the Python attributes of probe arrays; if it does not
  match (another NumPy or Python build), the table is filled from Python instead
  (slower, same result).

What falls back to the generic per-array math (the engine's own ``_step_one``):
arrays that are not exact ``np.ndarray`` (subclasses), not C-contiguous, or read-only
where the stateful form writes; float16 (numba has no float16 type; the generic path
computes it in float32); hyperparameters that are not Python numbers; an array step
count. Only the arrays that need it fall back; the rest of the group stays fused. In the
stateful form a group whose params overlap in memory (the same array twice) is left
to the generic path as a whole: updated in place twice, it would differ from it.

Threads: groups under ``SERIAL_BELOW`` elements run on the calling thread; larger ones
on numba's pool or the calling thread, whichever :class:`_Chooser` has timed faster
(``THREADS`` forces either). On a small machine the step is memory-bound and a second
thread gains little, while a pool thread that must wait for a core someone else keeps
busy costs milliseconds; see also :func:`_start_threads`. ``CHUNK`` is compiled into
the kernels (changing it needs a recompile); ``SERIAL_BELOW`` and ``THREADS`` are read
at each step.

``LAST_PATH`` records how the last group was run: "span", "pointers", "split" (part
fused, part generic or several dtypes) or "generic".
"""

from __future__ import annotations

import math
import os
import time
import types as _pytypes
from itertools import chain

import numba
import numpy as np
from numba import prange

from .. import _base, flat
from ..rules import adam as _adam
from . import FastPath, register
from ._numba import _ptr

#: elements per parallel work item (~256 KiB per stream in float32)
CHUNK = 1 << 16
#: below this many elements a group runs on the calling thread: waking the pool costs
#: more than a second thread saves (measured on 2 cores: 256Ki float32 params take
#: 0.04 ms on one thread)
SERIAL_BELOW = 1 << 19

#: the thread pool for groups of SERIAL_BELOW elements or more: "auto" (time both kernels
#: and use the faster, see _Chooser), True (always) or False (never)
THREADS: bool | str = "auto"

#: how the last group was updated: "span", "pointers", "split" or "generic"
LAST_PATH = ""

_SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # dtype code = index here
_GENERIC = -1  # dtype code of an array the kernel does not take

# PyArrayObject flags (numpy/ndarraytypes.h)
_C_CONTIGUOUS = 0x0001
_WRITEABLE = 0x0400


# raw memory access inside numba: polyopt.backends._numba._ptr


# -- the math, once ----------------------------------------------------------------------


@numba.njit(inline="always")
def _adam_elem(p, g, m, v, vmax, s, mx, dec, cpl, ams):
    """One element of rules.adam._step, in its order and in the dtype of the scalars
    ``s`` = (lr/bias1, sqrt(bias2), lr*wd, wd, b1, 1-b1, b2, 1-b2, eps), each rounded
    once from the host's float64 as NumPy rounds a Python float against an array.
    Flags: mx = maximize, dec = decoupled decay, cpl = coupled L2, ams = amsgrad."""
    ss, bc2, dwd, wd, b1, omb1, b2, omb2, eps = s
    if mx:
        g = -g
    if dec:
        p = p - dwd * p
    elif cpl:
        g = g + wd * p
    m = b1 * m + omb1 * g
    v = b2 * v + omb2 * (g * g)
    vhat = v
    if ams:
        if not (vmax >= v or vmax != vmax):  # np.maximum: a NaN wins
            vmax = v
        vhat = vmax
    denom = np.sqrt(vhat) / bc2 + eps
    p = p - ss * (m / denom)
    return p, m, v, vmax


# The scalars and flags are read into locals (a tuple is a value) before each loop:
# read from their arrays inside it, the loads could alias the stores and the loop would
# not vectorize. The loops run over range(n) from 0: with a start offset numba's
# negative-index wraparound could not be ruled out and they would not vectorize either.


@numba.njit(inline="always")
def _update_inplace(P, G, M, V, X, sc, fl):
    s = (sc[0], sc[1], sc[2], sc[3], sc[4], sc[5], sc[6], sc[7], sc[8])
    mx, dec, cpl = fl[0], fl[1], fl[2]
    if fl[3]:
        for j in range(P.shape[0]):
            p, m, v, x = _adam_elem(P[j], G[j], M[j], V[j], X[j], s, mx, dec, cpl, True)
            P[j] = p
            M[j] = m
            V[j] = v
            X[j] = x
    else:
        for j in range(P.shape[0]):
            p, m, v, _ = _adam_elem(P[j], G[j], M[j], V[j], M[j], s, mx, dec, cpl, False)
            P[j] = p
            M[j] = m
            V[j] = v


@numba.njit(inline="always")
def _update_pure(P, G, M, V, X, OP, OM, OV, OX, sc, fl):
    """Reads P..X, writes OP..OX (all of one length)."""
    s = (sc[0], sc[1], sc[2], sc[3], sc[4], sc[5], sc[6], sc[7], sc[8])
    mx, dec, cpl = fl[0], fl[1], fl[2]
    if fl[3]:
        for j in range(P.shape[0]):
            p, m, v, x = _adam_elem(P[j], G[j], M[j], V[j], X[j], s, mx, dec, cpl, True)
            OP[j] = p
            OM[j] = m
            OV[j] = v
            OX[j] = x
    else:
        for j in range(P.shape[0]):
            p, m, v, _ = _adam_elem(P[j], G[j], M[j], V[j], M[j], s, mx, dec, cpl, False)
            OP[j] = p
            OM[j] = m
            OV[j] = v


@numba.njit(inline="always")
def _chunk_inplace(tab, off, c, total, sc, fl):
    """Update elements [c*CHUNK, (c+1)*CHUNK) of the concatenated index space."""
    lo = c * CHUNK
    hi = min(lo + CHUNK, total)
    i = np.searchsorted(off, lo, side="right") - 1  # the array holding element lo
    dt = sc.dtype
    item = sc.itemsize
    while lo < hi:
        e = min(hi, off[i + 1])
        if e > lo:
            b = (lo - off[i]) * item  # byte offset of the segment in array i
            n = e - lo
            _update_inplace(
                numba.carray(_ptr(tab[0, i] + b, dt), n),
                numba.carray(_ptr(tab[1, i] + b, dt), n),
                numba.carray(_ptr(tab[2, i] + b, dt), n),
                numba.carray(_ptr(tab[3, i] + b, dt), n),
                numba.carray(_ptr(tab[4, i] + b, dt), n),
                sc,
                fl,
            )
        lo = e
        i += 1


@numba.njit(inline="always")
def _chunk_pure(tab, off, c, total, sc, fl, OP, OM, OV, OX):
    lo = c * CHUNK
    hi = min(lo + CHUNK, total)
    i = np.searchsorted(off, lo, side="right") - 1
    dt = sc.dtype
    item = sc.itemsize
    while lo < hi:
        e = min(hi, off[i + 1])
        if e > lo:
            b = (lo - off[i]) * item
            n = e - lo
            _update_pure(
                numba.carray(_ptr(tab[0, i] + b, dt), n),
                numba.carray(_ptr(tab[1, i] + b, dt), n),
                numba.carray(_ptr(tab[2, i] + b, dt), n),
                numba.carray(_ptr(tab[3, i] + b, dt), n),
                numba.carray(_ptr(tab[4, i] + b, dt), n),
                OP[lo:e],
                OM[lo:e],
                OV[lo:e],
                OX[lo:e],
                sc,
                fl,
            )
        lo = e
        i += 1


# no nogil: the arrays are only known by address, so no other Python thread may run (and
# perhaps drop the last reference to one) while a kernel reads them
_JIT = dict(cache=True, error_model="numpy", boundscheck=False)


@numba.njit(parallel=True, **_JIT)
def _kernel_inplace(tab, off, sc, fl):
    total = off[off.shape[0] - 1]
    for c in prange((total + CHUNK - 1) // CHUNK):
        _chunk_inplace(tab, off, c, total, sc, fl)


@numba.njit(**_JIT)
def _kernel_inplace_serial(tab, off, sc, fl):
    total = off[off.shape[0] - 1]
    for c in range((total + CHUNK - 1) // CHUNK):
        _chunk_inplace(tab, off, c, total, sc, fl)


@numba.njit(parallel=True, **_JIT)
def _kernel_pure(tab, off, sc, fl, OP, OM, OV, OX):
    total = off[off.shape[0] - 1]
    for c in prange((total + CHUNK - 1) // CHUNK):
        _chunk_pure(tab, off, c, total, sc, fl, OP, OM, OV, OX)


@numba.njit(**_JIT)
def _kernel_pure_serial(tab, off, sc, fl, OP, OM, OV, OX):
    total = off[off.shape[0] - 1]
    for c in range((total + CHUNK - 1) // CHUNK):
        _chunk_pure(tab, off, c, total, sc, fl, OP, OM, OV, OX)


# -- the pointer table, from the arrays' ids -------------------------------------------

_UNKNOWN = -3  # dtype code of a descr not in the table yet (see _learn)


@numba.njit(**_JIT)
def _inspect(ids, lay, descr_ids, descr_codes, itemsizes, writes, tab, sizes, codes):
    """Fill ``tab[s, i]`` (data address), ``sizes[i]`` and ``codes[i]`` from the
    PyArrayObjects at the addresses ``ids[s, i]`` (stream s: params, grads, slots...;
    array i). ``lay``: word offsets of (ob_type, data, nd, dimensions, descr, flags) and
    the address of the ndarray type. ``writes[s]``: stream s is written in place, so it
    must be writeable. ``codes[i]``: the dtype code (index into _DTYPES) when every
    stream of array i is an exact, C-contiguous ndarray of that dtype and of one size;
    _GENERIC otherwise; _UNKNOWN if a descr is not in the table.
    Returns (all codes equal and >= 0, all streams back to back, some code _UNKNOWN)."""
    S, n = ids.shape
    w_type, w_data, w_nd, w_dims, w_descr, w_flags, nd_type = lay
    uniform = n > 0
    unknown = False
    for i in range(n):
        code = 0
        size = 0
        for s in range(S):
            # ob_type first: every object has it; the other fields only an exact ndarray
            head = numba.carray(_ptr(ids[s, i], np.int64), w_type + 1)
            if head[w_type] != nd_type:
                code = _GENERIC
                continue
            obj = numba.carray(_ptr(ids[s, i], np.int64), w_flags + 1)
            tab[s, i] = obj[w_data]
            nd = obj[w_nd] & 0xFFFFFFFF
            dims = numba.carray(_ptr(obj[w_dims], np.int64), nd)
            sz = 1
            for d in range(nd):
                sz *= dims[d]
            c = _UNKNOWN
            for dc in range(descr_ids.shape[0]):
                if obj[w_descr] == descr_ids[dc]:
                    c = descr_codes[dc]
            flags = obj[w_flags] & 0xFFFFFFFF
            if (flags & _C_CONTIGUOUS) == 0 or (writes[s] and (flags & _WRITEABLE) == 0):
                c = _GENERIC
            if s == 0:
                size = sz
                if code != _GENERIC:
                    code = c
            elif sz != size or c == _GENERIC:
                code = _GENERIC
            elif code != _GENERIC and c != code:
                code = _UNKNOWN if (c == _UNKNOWN or code == _UNKNOWN) else _GENERIC
        codes[i] = code
        sizes[i] = size
        if code == _UNKNOWN:
            unknown = True
        if code < 0 or code != codes[0]:
            uniform = False
    if not uniform:
        return False, False, unknown
    # back to back in every stream? (empty arrays hold no memory and are skipped)
    item = itemsizes[codes[0]]
    span = True
    for s in range(S):
        nxt = -1
        for i in range(n):
            if sizes[i] == 0:
                continue
            if nxt != -1 and tab[s, i] != nxt:
                span = False
            nxt = tab[s, i] + sizes[i] * item
    if writes[0] and not span and _overlap(tab[0], sizes, item):
        # the same param twice (or overlapping views): updated twice in place, where the
        # generic path updates it once from its old value. Leave it to the generic path.
        codes[:] = _GENERIC
        return False, False, False
    return True, span, False


@numba.njit(**_JIT)
def _overlap(ptrs, sizes, item):
    """Whether any two of the non-empty arrays at ``ptrs`` share memory."""
    end = -1
    for i in range(ptrs.shape[0]):  # arrays made one after another: often in order
        if sizes[i] == 0:
            continue
        if ptrs[i] < end:
            break
        end = ptrs[i] + sizes[i] * item
    else:
        return False
    order = np.argsort(ptrs, kind="mergesort")
    end = -1
    for i in order:
        if sizes[i] == 0:
            continue
        if ptrs[i] < end:
            return True
        end = max(end, ptrs[i] + sizes[i] * item)
    return False


#: descr address -> dtype code, for the dtypes seen so far. NumPy hands out one descr
#: per builtin dtype, but not always (an unpickled array has its own): _learn adds
#: those, and keeps them alive so that their address stays theirs.
_KNOWN = [(d, c) for c, d in enumerate(_DTYPES)] + [(np.dtype(np.float16), _GENERIC)]
_DESCR_IDS = np.array([id(d) for d, _ in _KNOWN], np.int64)
_DESCR_CODES = np.array([c for _, c in _KNOWN], np.int64)
_ITEMSIZES = np.array([d.itemsize for d in _DTYPES], np.int64)
_MAX_KNOWN = 256


def _learn(streams: list, codes: np.ndarray) -> bool:
    """Add the descrs of the arrays coded _UNKNOWN to the table; True if any was new."""
    global _DESCR_IDS, _DESCR_CODES
    seen = set(_DESCR_IDS.tolist())
    added = False
    for i in np.flatnonzero(codes == _UNKNOWN):
        for arrays in streams:
            d = getattr(arrays[i], "dtype", None)
            if not isinstance(d, np.dtype) or id(d) in seen or len(_KNOWN) >= _MAX_KNOWN:
                continue
            code = _GENERIC
            for c, ref in enumerate(_DTYPES):
                if d == ref and d.isnative:
                    code = c
            _KNOWN.append((d, code))
            seen.add(id(d))
            added = True
    if added:
        _DESCR_IDS = np.array([id(d) for d, _ in _KNOWN], np.int64)
        _DESCR_CODES = np.array([c for _, c in _KNOWN], np.int64)
    return added


def _inspect_python(streams, writes, tab, sizes, codes):
    """_inspect from Python attributes, for a build whose struct layout is unexpected:
    the same outputs, about 1 µs per array and stream."""
    n = len(streams[0])
    for i in range(n):
        code, size = 0, 0
        for s, arrays in enumerate(streams):
            a = arrays[i]
            if type(a) is not np.ndarray:
                code = _GENERIC
                continue
            tab[s, i] = a.__array_interface__["data"][0]
            c = _GENERIC
            for dc, ref in enumerate(_DTYPES):
                if a.dtype == ref and a.dtype.isnative:
                    c = dc
            if not a.flags.c_contiguous or (writes[s] and not a.flags.writeable):
                c = _GENERIC
            if s == 0:
                size = a.size
                if code != _GENERIC:
                    code = c
            elif a.size != size or c != code:
                code = _GENERIC
        codes[i] = code
        sizes[i] = size
    if n == 0 or (codes < 0).any() or (codes != codes[0]).any():
        return False, False, False
    item = _DTYPES[codes[0]].itemsize
    span = True
    for s in range(len(streams)):
        nxt = -1
        for i in range(n):
            if sizes[i]:
                if nxt != -1 and tab[s, i] != nxt:
                    span = False
                nxt = tab[s, i] + sizes[i] * item
    if writes[0] and not span and _overlap(tab[0], sizes, item):
        codes[:] = _GENERIC
        return False, False, False
    return True, span, False


def _layout() -> np.ndarray | None:
    """Word offsets of the PyArrayObject fields (PyObject header, then data, nd,
    dimensions, strides, base, descr, flags), checked against the Python attributes
    of probe arrays; None if they do not match (then _inspect_python is used)."""
    head = object.__basicsize__ // 8  # ob_type is the header's last word
    lay = np.array(
        [head - 1, head, head + 1, head + 2, head + 5, head + 6, id(np.ndarray)], np.int64
    )
    base = np.arange(24.0, dtype=np.float32).reshape(4, 6)
    ro = np.zeros(3)
    ro.flags.writeable = False
    probes = [base, base[:, ::2], base[1], np.ones(()), np.zeros((0, 3)), ro, np.float32(1)]
    try:
        for a in probes:
            ids = np.array([[id(a)]], np.int64)
            tab = np.zeros((1, 1), np.int64)
            sizes = np.zeros(1, np.int64)
            codes = np.zeros(1, np.int64)
            nd = isinstance(a, np.ndarray)
            _inspect(
                ids,
                lay,
                np.array([id(a.dtype)]),
                np.zeros(1, np.int64),
                _ITEMSIZES,
                np.ones(1, np.bool_),
                tab,
                sizes,
                codes,
            )
            want = 0 if nd and a.flags.c_contiguous and a.flags.writeable else _GENERIC
            if codes[0] != want or (
                nd and (tab[0, 0] != a.__array_interface__["data"][0] or sizes[0] != a.size)
            ):
                return None
    except Exception:  # pragma: no cover - an unexpected build
        return None
    return lay


_LAYOUT = _layout()
_WRITES = {
    (True, 4): np.array([True, False, True, True]),
    (True, 5): np.array([True, False, True, True, True]),
    (False, 4): np.zeros(4, np.bool_),
    (False, 5): np.zeros(5, np.bool_),
}


def _streams(params, grads, slots, names) -> list:
    return [params, grads] + [slots[nm] for nm in names]


def _table(params, grads, slots, names, inplace: bool):
    """(tab, sizes, codes, uniform, span) for params, grads and the slots ``names``."""
    S, n = 2 + len(names), len(params)
    tab = np.zeros((5, n), np.int64)
    sizes = np.empty(n, np.int64)
    codes = np.empty(n, np.int64)
    writes = _WRITES[(inplace, S)]
    if _LAYOUT is None:
        streams = _streams(params, grads, slots, names)
        uniform, span, _ = _inspect_python(streams, writes, tab[:S], sizes, codes)
    else:
        every = chain(params, grads, *(slots[nm] for nm in names))
        ids = np.fromiter(map(id, every), np.int64, S * n).reshape(S, n)
        args = (_LAYOUT, _DESCR_IDS, _DESCR_CODES, _ITEMSIZES, writes, tab[:S], sizes, codes)
        uniform, span, unknown = _inspect(ids, *args)
        if unknown and _learn(_streams(params, grads, slots, names), codes):
            args = (_LAYOUT, _DESCR_IDS, _DESCR_CODES, _ITEMSIZES, writes, tab[:S], sizes, codes)
            uniform, span, unknown = _inspect(ids, *args)
        codes[codes == _UNKNOWN] = _GENERIC
    if S == 4:
        tab[4] = tab[2]  # no max_exp_avg_sq: never read, any valid address will do
    return tab, sizes, codes, uniform, span


# -- the fast path -------------------------------------------------------------------


def init(xp, params, names):
    """Zero state as views into one flat buffer per slot name and dtype."""
    by_dtype: dict = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    slots: dict = {name: [None] * len(params) for name in names}
    for dtype, idx in by_dtype.items():
        shapes = [tuple(params[i].shape) for i in idx]
        for name in names:
            for i, view in zip(idx, flat.empty_views(np, shapes, dtype)):
                view.fill(0)
                slots[name][i] = view
    return slots


_ENGINE = _pytypes.SimpleNamespace(rule=_adam.ADAM)  # ADAM and ADAMW share one _step


def _generic(xp, params, grads, slots, hp, k, idx, new_p, new_s):
    """The engine's own per-array step for the arrays ``idx``, into new_p/new_s (new
    arrays: nothing is written)."""
    for i in idx:
        old = {name: arrays[i] for name, arrays in slots.items()}
        new_p[i], s = _base.Optimizer._step_one(_ENGINE, xp, params[i], grads[i], old, hp, k)
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


def _is_number(x) -> bool:
    t = type(x)
    return t is float or t is int


def _scalars(hp, k):
    """The scalars of rules.adam._step, formed on the host in float64 as it forms them,
    and the flags; None when the hyperparameters are not plain Python numbers (a NumPy
    scalar is not weakly typed: the generic path would compute in its dtype)."""
    lr, wd, eps = hp["lr"], hp["weight_decay"], hp["eps"]
    b1, b2 = hp["betas"]
    if not (
        type(k) is int
        and _is_number(lr)
        and _is_number(wd)
        and _is_number(eps)
        and _is_number(b1)
        and _is_number(b2)
    ):
        return None
    t = k + 1
    bias1 = 1 - b1**t
    bias2_sqrt = math.sqrt(1 - b2**t)
    on = wd != 0  # rules._common.on
    decoupled = on and bool(hp["decoupled_weight_decay"])
    coupled = on and not decoupled
    sc = (lr / bias1, bias2_sqrt, lr * wd, wd, b1, 1 - b1, b2, 1 - b2, eps)
    fl = np.array([bool(hp["maximize"]), decoupled, coupled, bool(hp["amsgrad"])])
    return sc, fl


_THREADS_STARTED = False


def _start_threads() -> None:
    """Start numba's thread pool with ``OMP_WAIT_POLICY=passive`` unless the user set a
    policy. GNU OpenMP's default lets idle workers spin: when another process (or
    thread) keeps a core busy, a spinning worker only gets that core at the scheduler's
    next time slice, and each parallel launch then waits milliseconds (measured here:
    about 8 ms per step instead of 0.1 ms). A sleeping worker is woken at once. libgomp
    reads the variable when it is loaded, i.e. at numba's first parallel launch: later
    (or with the TBB or workqueue layer) this changes nothing. The environment is
    restored right after."""
    global _THREADS_STARTED
    _THREADS_STARTED = True
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "passive"
    try:  # an empty launch starts the pool
        _kernel_inplace(
            np.zeros((5, 1), np.int64), np.zeros(1, np.int64), np.ones(9), np.zeros(4, np.bool_)
        )
    finally:
        del os.environ["OMP_WAIT_POLICY"]


class _Chooser:
    """Picks the thread pool or the calling thread for each launch, by timing both.

    Per (form, size class: total.bit_length()) it keeps the seconds per element of each
    kernel (a moving average for the one in use), tries each once (after its first
    call, which may compile), then uses the faster and times the slower again after
    ``probe`` launches, doubling that interval each time the slower stays slower (up to
    ``max_probe``).
    The outputs do not depend on the choice: every element is computed the same way.
    Why time rather than decide once: a second thread barely helps a memory-bound step
    on a small machine, and when another process keeps a core busy it costs a wait for
    that core (with a spinning OpenMP pool: ~8 ms per launch, for ~0.2 ms of work)."""

    def __init__(self, probe: int = 16, max_probe: int = 1024, alpha: float = 0.3):
        self.probe, self.max_probe, self.alpha = probe, max_probe, alpha
        self.stats: dict = {}  # key -> [avg serial, avg parallel, countdown, interval]
        self.warm: set = set()

    def pick(self, key) -> bool:
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = [None, None, self.probe, self.probe]
        if st[1] is None:
            return True
        if st[0] is None:
            return False
        best = st[1] < st[0]
        st[2] -= 1
        if st[2] <= 0:  # time the other one again
            return not best
        return best

    def record(self, key, kernel, parallel: bool, seconds: float, total: int) -> None:
        if kernel not in self.warm:  # its first call: compiling, or loading the cache
            self.warm.add(kernel)
            return
        st = self.stats[key]
        per = seconds / max(total, 1)
        i = int(parallel)
        was_best = None if st[0] is None or st[1] is None else st[1] < st[0]
        probe = st[2] <= 0
        if st[i] is None or probe:  # a probe replaces an estimate that may be old
            st[i] = per
        else:
            st[i] = (1 - self.alpha) * st[i] + self.alpha * per
        if probe:
            if was_best is not None and (st[1] < st[0]) == was_best:
                st[3] = min(2 * st[3], self.max_probe)  # the other is still slower
            else:
                st[3] = self.probe
            st[2] = st[3]


_CHOOSER = _Chooser()


def _launch(tab, off, sc, fl, dtype, outs=None):
    total = int(off[-1])
    scv = np.array(sc, dtype=dtype)  # each rounded once, as NumPy rounds a Python float
    pure = outs is not None
    key = (pure, total.bit_length())
    timed = False
    if total < SERIAL_BELOW or THREADS is False or numba.get_num_threads() == 1:
        parallel = False
    elif THREADS is True:
        parallel = True
    else:
        parallel, timed = _CHOOSER.pick(key), True
    if parallel and not _THREADS_STARTED:
        _start_threads()
    if pure:
        kern = _kernel_pure if parallel else _kernel_pure_serial
        t = time.perf_counter()
        kern(tab, off, scv, fl, *outs)
    else:
        kern = _kernel_inplace if parallel else _kernel_inplace_serial
        t = time.perf_counter()
        kern(tab, off, scv, fl)
    if timed:
        _CHOOSER.record(key, (kern, dtype), parallel, time.perf_counter() - t, total)


def _run(tab, off, sizes, sc, fl, dtype, span, pure_params=None, names=()):
    """One launch over arrays laid out by ``tab``/``off``; for the pure form, the new
    params and slots (views into new flat buffers), else None."""
    if span:  # one segment per stream: the concatenated arrays are one array
        first = int(np.argmax(sizes > 0))  # 0 if all are empty
        tab = np.ascontiguousarray(tab[:, first : first + 1])
        run_off = np.array([0, off[-1]], np.int64)
    else:
        run_off = off
    if pure_params is None:
        _launch(tab, run_off, sc, fl, dtype)
        return None
    total = int(off[-1])
    bufs = [np.empty(total, dtype) for _ in range(1 + len(names))]
    _launch(tab, run_off, sc, fl, dtype, bufs + [bufs[1]] * (4 - len(bufs)))
    starts = (off[:-1] * dtype.itemsize).tolist()
    shapes = [p.shape for p in pure_params]
    views = [[np.ndarray(sh, dtype, b, o) for sh, o in zip(shapes, starts)] for b in bufs]
    return views[0], dict(zip(names, views[1:]))


def _plan(xp, params, grads, slots, hp, k, inplace: bool):
    """Everything a group's update needs but the writes; returns the commit, which
    launches the kernels (in place: into params and slots) and returns the results.
    The generic math for arrays the kernel does not take is computed here, into new
    arrays, so that a failure leaves nothing written."""
    global LAST_PATH
    n = len(params)
    new_p: list = [None] * n
    new_s: dict = {name: [None] * n for name in slots}
    got = _scalars(hp, k)
    if got is None:
        LAST_PATH = "generic"
        _generic(xp, params, grads, slots, hp, k, range(n), new_p, new_s)

        def commit_generic():
            if inplace:
                _keep_layout(slots, range(n), new_s)
            return new_p, new_s

        return commit_generic
    sc, fl = got
    names = _SLOTS if fl[3] else _SLOTS[:2]
    tab, sizes, codes, uniform, span = _table(params, grads, slots, names, inplace)

    if uniform:  # the common case: one launch for the whole group
        LAST_PATH = "span" if span else "pointers"
        off = np.zeros(n + 1, np.int64)
        np.cumsum(sizes, out=off[1:])
        dtype = _DTYPES[codes[0]]
        if inplace:

            def commit_one():
                _run(tab, off, sizes, sc, fl, dtype, span)
                return list(params), slots

            return commit_one
        result = _run(tab, off, sizes, sc, fl, dtype, span, params, names)
        return lambda: result

    # several dtypes, or arrays the kernel cannot take: one launch per dtype, and the
    # generic math for the rest
    if inplace and (codes >= 0).any():
        ok = np.flatnonzero(codes >= 0)
        nbytes = sizes[ok] * _ITEMSIZES[codes[ok]]
        if _overlap(np.ascontiguousarray(tab[0, ok]), nbytes, 1):  # see _inspect
            codes[:] = _GENERIC
    LAST_PATH = "split" if (codes >= 0).any() else "generic"
    launches = []
    for code in np.unique(codes[codes >= 0]).tolist():
        idx = np.flatnonzero(codes == code)
        off = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(sizes[idx], out=off[1:])
        launches.append((np.ascontiguousarray(tab[:, idx]), off, sizes[idx], code, idx.tolist()))
    rest = np.flatnonzero(codes < 0).tolist()
    _generic(xp, params, grads, slots, hp, k, rest, new_p, new_s)

    def commit_split():
        for sub, off, sz, code, idx in launches:
            if inplace:
                _run(sub, off, sz, sc, fl, _DTYPES[code], False)
                for i in idx:
                    new_p[i] = params[i]
                    for name in names:
                        new_s[name][i] = slots[name][i]
            else:
                ps, ss = _run(
                    sub, off, sz, sc, fl, _DTYPES[code], False, [params[i] for i in idx], names
                )
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


def pure(xp, params, grads, slots, hp, k):
    return _plan(xp, params, grads, slots, hp, k, False)()


def inplace(xp, params, grads, slots, hp, k):
    return _plan(xp, params, grads, slots, hp, k, True)


register(("adam", "adamw"), "numpy", FastPath(pure, inplace, init))
