"""The data addresses of NumPy arrays, read from their ids inside numba.

A kernel that updates a group of arrays in one call walks a table of their data
addresses (:mod:`polyopt.backends._derive`). Reading one address in Python
(``a.__array_interface__["data"][0]`` or ``a.ctypes.data``) costs 1.4-1.6 µs per array
(measured on the 2-core machine, NumPy 2): for 1000 arrays and four streams (params,
grads, two slots) that is 6 ms, more than the whole step on 1M parameters. Here the
table is filled inside numba from the ``id`` of each array (its address), reading the
fields of NumPy's public ``PyArrayObject`` struct (data, nd, dimensions, descr, flags:
the layout every compiled NumPy extension relies on through ``PyArray_DATA`` & co.):
about 0.05 µs per array and stream. The layout is checked at import against the
Python attributes of probe arrays; if it does not match (another NumPy or Python
build), the table is filled from Python instead (slower, same result).

:func:`table` is the entry point.
"""

from __future__ import annotations

from itertools import chain

import numba
import numpy as np

from ._numba import _ptr

#: the dtypes the kernels take (dtype code = index here)
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
GENERIC = -1  # dtype code of an array the kernel does not take
_GENERIC = GENERIC

# PyArrayObject flags (numpy/ndarraytypes.h)
_C_CONTIGUOUS = 0x0001
_WRITEABLE = 0x0400

# no nogil: the arrays are only known by address, so no other Python thread may run (and
# perhaps drop the last reference to one) while these read them
_JIT = dict(cache=True, error_model="numpy", boundscheck=False)

# -- the pointer table, from the arrays' ids -------------------------------------------

_UNKNOWN = -3  # dtype code of a descr not in the table yet (see _learn)


@numba.njit(**_JIT)
def _inspect(ids, lay, descr_ids, descr_codes, itemsizes, writes, tab, sizes, codes):
    """Fill ``tab[s, i]`` (data address), ``sizes[i]`` and ``codes[i]`` from the
    PyArrayObjects at the addresses ``ids[s, i]`` (stream s: params, grads, slots...;
    array i). ``lay``: word offsets of (ob_type, data, nd, dimensions, descr, flags) and
    the address of the ndarray type. ``writes[s]``: stream s is written in place, so it
    must be writeable. ``codes[i]``: the dtype code (index into DTYPES) when every
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
_KNOWN = [(d, c) for c, d in enumerate(DTYPES)] + [(np.dtype(np.float16), _GENERIC)]
_DESCR_IDS = np.array([id(d) for d, _ in _KNOWN], np.int64)
_DESCR_CODES = np.array([c for _, c in _KNOWN], np.int64)
_ITEMSIZES = np.array([d.itemsize for d in DTYPES], np.int64)
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
            for c, ref in enumerate(DTYPES):
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
            for dc, ref in enumerate(DTYPES):
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
    item = DTYPES[codes[0]].itemsize
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


def table(streams: list, writes: np.ndarray):
    """``(tab, sizes, codes, uniform, span)`` for ``streams`` (lists of arrays of equal
    length: params, grads, each slot...; ``writes[s]``: stream s is written in place,
    so it must be writeable):

    - ``tab[s, i]``: the data address of array i of stream s;
    - ``sizes[i]``: the element count of array i;
    - ``codes[i]``: the index into :data:`DTYPES` when every stream's array i is an
      exact, C-contiguous ndarray of that dtype and size (writeable where written),
      :data:`GENERIC` otherwise;
    - ``uniform``: every array has the same code, not GENERIC (one launch takes all);
    - ``span``: uniform, and each stream's arrays lie back to back in memory (one
      segment per stream: the kernel may walk them as one array).

    Params that overlap in memory (the same array twice) are all GENERIC when they are
    written: updated in place twice, they would differ from the generic path."""
    S, n = len(streams), len(streams[0])
    tab = np.zeros((S, n), np.int64)
    sizes = np.empty(n, np.int64)
    codes = np.empty(n, np.int64)
    if _LAYOUT is None:
        uniform, span, _ = _inspect_python(streams, writes, tab, sizes, codes)
    else:
        ids = np.fromiter(map(id, chain(*streams)), np.int64, S * n).reshape(S, n)
        uniform, span, unknown = _inspect(
            ids, _LAYOUT, _DESCR_IDS, _DESCR_CODES, _ITEMSIZES, writes, tab, sizes, codes
        )
        if unknown and _learn(streams, codes):
            uniform, span, unknown = _inspect(
                ids, _LAYOUT, _DESCR_IDS, _DESCR_CODES, _ITEMSIZES, writes, tab, sizes, codes
            )
        codes[codes == _UNKNOWN] = GENERIC
    return tab, sizes, codes, uniform, span


def overlap(ptrs: np.ndarray, nbytes: np.ndarray) -> bool:
    """Whether any two of the (non-empty) memory ranges ``ptrs[i] : ptrs[i] + nbytes[i]``
    share memory."""
    return bool(_overlap(np.ascontiguousarray(ptrs), np.ascontiguousarray(nbytes), 1))
