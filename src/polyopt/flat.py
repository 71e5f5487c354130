"""Flat layout: many arrays as views into one contiguous buffer.

A model has hundreds of parameter arrays; a fused step that runs once per array pays a
kernel launch (CuPy, torch) or a compiled-call overhead (NumPy) each time. If params,
grads and optimizer state are views into one buffer per (device, dtype), a fast path
updates them all in one pass over memory. Copying into a buffer and back every step is
not the same thing: it doubles the memory traffic. So the buffer is made once:

>>> import numpy as np
>>> from polyopt import flat
>>> params = flat.pack([np.ones((2, 3)), np.zeros(4)])    # views into one new buffer
>>> grads = flat.zeros_like(params)                        # the same layout for grads
>>> flat.span(params).shape                                # one 1-D view over all of it
(10,)

:func:`span` recognises such a run of arrays (consecutive, C-contiguous, one dtype) in
NumPy and CuPy memory; polyopt's fast paths use it, and lay their own state out flat.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _xp


def pack(arrays: list) -> list:
    """New arrays with the values of ``arrays``, as views into one buffer per dtype.

    Returns the views in the order given (use them as your model's params).
    """
    return _into_buffers(arrays, copy_values=True)


def zeros_like(arrays: list) -> list:
    """Zero arrays with the shapes and dtypes of ``arrays``, in one buffer per dtype."""
    return _into_buffers(arrays, copy_values=False)


def _into_buffers(arrays: list, copy_values: bool) -> list:
    if not arrays:
        raise ValueError("pack needs at least one array, got an empty list")
    xp = _xp.namespace(list(arrays), "arrays")
    out: list = [None] * len(arrays)
    by_dtype: dict[str, list[int]] = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(str(a.dtype), []).append(i)
    for idx in by_dtype.values():
        first = arrays[idx[0]]
        shapes = [tuple(arrays[i].shape) for i in idx]
        views = empty_views(xp, shapes, first.dtype, _xp.device_of(first))
        for i, v in zip(idx, views):
            v[...] = arrays[i] if copy_values else 0
            out[i] = v
    return out


def empty_views(xp: Any, shapes: list[tuple], dtype: Any, device: Any = None) -> list:
    """Views of ``shapes`` into one new 1-D buffer (uninitialised values)."""
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    kwargs = {"device": device} if device is not None else {}
    buf = xp.empty((sum(sizes),), dtype=dtype, **kwargs)
    views, start = [], 0
    for shape, n in zip(shapes, sizes):
        views.append(xp.reshape(buf[start : start + n], shape))
        start += n
    return views


def _address(a: Any) -> tuple[int, int] | None:
    """(pointer, bytes) of a C-contiguous NumPy or CuPy array, else None."""
    if _xp._compat.is_numpy_array(a):
        if not a.flags.c_contiguous:
            return None
        return a.__array_interface__["data"][0], a.nbytes
    if _xp._compat.is_cupy_array(a):
        if not a.flags.c_contiguous:
            return None
        return a.data.ptr, a.nbytes
    return None


def span(arrays: list) -> Any | None:
    """One 1-D view covering ``arrays`` if they lie back to back in one buffer (same
    dtype, C-contiguous, in this order); None otherwise. Writing into the view writes
    into the arrays."""
    if not arrays:
        return None
    dtype = arrays[0].dtype
    if any(a.dtype != dtype for a in arrays):
        return None
    arrays = [a for a in arrays if a.size]  # empty arrays hold no memory (any pointer)
    if not arrays:
        return None
    first = arrays[0]
    addrs = []
    for a in arrays:
        ad = _address(a)
        if ad is None:
            return None
        addrs.append(ad)
    for (p0, n0), (p1, _) in zip(addrs, addrs[1:]):
        if p0 + n0 != p1:
            return None
    total = sum(int(a.size) for a in arrays)
    if _xp._compat.is_numpy_array(first):
        base = first.base if first.base is not None else first
        # a view of the same memory, without copying
        return np.ndarray(
            (total,), dtype=dtype, buffer=_root(base), offset=addrs[0][0] - _ptr(_root(base))
        )
    import cupy  # a CuPy array was given: cupy is imported already

    return cupy.ndarray((total,), dtype=dtype, memptr=first.data)


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]
