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

import functools
import math
import operator
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _xp


def pack(arrays: list) -> list:
    """New arrays with the values of ``arrays``, as views into one buffer per dtype.

    Args:
        arrays: arrays of one library that can be written into (NumPy, CuPy, torch).

    Returns:
        list: the views, in the order given, with the values of ``arrays`` (use them as
        your model's params); :func:`span` of a run of them of one dtype is one view.
    """
    return _into_buffers(arrays, copy_values=True)


def zeros_like(arrays: list) -> list:
    """Zero arrays with the shapes and dtypes of ``arrays``, in one buffer per dtype.

    Args:
        arrays: the arrays whose layout to copy (say, params made by :func:`pack`).

    Returns:
        list: new zero arrays, views into one buffer per dtype, in the order given.
    """
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
    """Views of ``shapes`` into one new 1-D buffer (uninitialised values).

    Args:
        xp: the array namespace (``numpy``, ``cupy``, an array-api-compat namespace).
        shapes: the shape of each view.
        dtype: the buffer's dtype.
        device: the buffer's device (None: the library's default).

    Returns:
        list: one view per shape, back to back in the buffer.
    """
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
    into the arrays.

    Args:
        arrays: NumPy or CuPy arrays (other libraries always give None).

    Returns:
        The 1-D view, or None.
    """
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


# -- packed sequences: the flat layout for arrays that cannot be views (JAX) ------------


class Packed(Sequence):
    """A read-only sequence of arrays held back to back in 1-D buffers.

    JAX arrays cannot be views into a shared buffer, so for JAX the flat layout is a
    container: ``Packed`` behaves like the tuple of arrays it stands for (``len``,
    indexing, iteration, slicing), so ``state.slots["exp_avg"][i]`` is still the first
    moment of parameter array ``i``, while a fast path reads and writes the one buffer.
    It is a JAX pytree whose leaves are the buffers, so ``jax.jit`` passes (and donates)
    one array per slot rather than one per parameter array.

    ``parts[j]`` is either one element as it is (an array, or ``None``; then
    ``tails[j]`` is ``None``) or a buffer of shape ``lead + (total,)`` holding the
    elements whose shapes (without ``lead``) are listed in ``tails[j]``, in order.
    ``lead`` is normally ``()``; ``jax.vmap`` gives the buffer a leading batch axis,
    which the elements then get too.

    Args:
        parts: the buffers (and elements kept as they are), as above.
        tails: for each part, the shapes of the elements in it, or None.

    >>> import numpy as np
    >>> s = Packed((np.arange(7.0),), (((2, 3), (1,)),))
    >>> len(s), s[0].shape, s[1]
    (2, (2, 3), array([6.]))
    """

    __slots__ = ("parts", "tails")

    def __init__(self, parts: Any, tails: Any):
        # O(1): jax.jit rebuilds the state from its leaves on every call
        self.parts = tuple(parts)
        self.tails = tuple(tails)

    @classmethod
    def run(cls, buffer: Any, shapes: Any) -> Packed:
        """One buffer holding arrays of ``shapes``, back to back.

        Args:
            buffer: a 1-D array (or ``lead + (total,)`` under vmap) of the total size.
            shapes: the elements' shapes, in order.

        Returns:
            Packed: the sequence of the elements.
        """
        return cls((buffer,), (tuple(tuple(s) for s in shapes),))

    @classmethod
    def join(cls, sequences: Any) -> Packed:
        """The concatenation of ``sequences`` (Packed, tuples or lists), without copying.

        Args:
            sequences: the sequences to join, in order.

        Returns:
            Packed: one sequence whose parts are theirs.
        """
        parts: list = []
        tails: list = []
        for seq in sequences:
            if isinstance(seq, Packed):
                parts.extend(seq.parts)
                tails.extend(seq.tails)
            else:
                parts.extend(seq)
                tails.extend([None] * len(seq))
        return cls(parts, tails)

    def __len__(self) -> int:
        return _layout(self.tails)[0]

    def __getitem__(self, index: Any) -> Any:
        n, where, _ = _layout(self.tails)
        if isinstance(index, slice):
            return self._slice(*index.indices(n))
        i = operator.index(index)
        if not -n <= i < n:
            raise IndexError(f"Packed index {index} out of range for {n} arrays")
        j, lo, size, shape = where[i % n]
        part = self.parts[j]
        if lo is None or part is None:
            return part
        xp = _xp.namespace([part], "Packed buffer")
        lead = tuple(part.shape[:-1])
        return xp.reshape(part[..., lo : lo + size], lead + shape)

    def _slice(self, start: int, stop: int, step: int) -> Packed:
        if step != 1:
            return Packed.join([tuple(self[i] for i in range(start, stop, step))])
        if (start, stop) == (0, len(self)):
            return self
        _, where, first = _layout(self.tails)
        parts: list = []
        tails: list = []
        i = start
        while i < stop:
            j = where[i][0]
            tail = self.tails[j]
            if tail is None:
                parts.append(self.parts[j])
                tails.append(None)
                i += 1
            elif first[j] == i and i + len(tail) <= stop:  # a whole buffer: keep it
                parts.append(self.parts[j])
                tails.append(tail)
                i += len(tail)
            else:  # part of a buffer: its elements, copied out
                parts.append(self[i])
                tails.append(None)
                i += 1
        return Packed(parts, tails)

    def describe(self) -> list:
        """``(shape, dtype)`` of each element (None for None), without slicing.

        Returns:
            list: one ``(shape, dtype)`` tuple or None per element.
        """
        _, where, _ = _layout(self.tails)
        out = []
        for j, lo, _, shape in where:
            part = self.parts[j]
            if part is None:
                out.append(None)
            elif lo is None:
                out.append((tuple(part.shape), part.dtype))
            else:
                out.append((tuple(part.shape[:-1]) + shape, part.dtype))
        return out

    def __repr__(self) -> str:
        runs = sum(t is not None for t in self.tails)
        return f"Packed({len(self)} arrays, {runs} buffer(s))"

    def __reduce__(self):
        return _unpickle, (self.parts, self.tails)


def _unpickle(parts: Any, tails: Any) -> Packed:
    if "jax" in sys.modules:  # a state loaded before polyopt has met a JAX array
        register_jax()
    return Packed(parts, tails)


def describe(seq: Any) -> list:
    """``(shape, dtype)`` or None for each element of a Packed, tuple or list.

    Args:
        seq: a :class:`Packed`, tuple or list of arrays (or None).

    Returns:
        list: one ``(shape, dtype)`` tuple or None per element.
    """
    if isinstance(seq, Packed):
        return seq.describe()
    return [None if a is None else (tuple(a.shape), a.dtype) for a in seq]


@functools.lru_cache(maxsize=256)
def _layout(tails: tuple) -> tuple[int, tuple, dict]:
    """For ``tails``: the element count, each element's ``(part, offset, size, shape)``
    (offset None for a part that is one element as it is), and each buffer's first
    element index. Cached: a state's layout is the same every step."""
    where: list = []
    first: dict = {}
    for j, tail in enumerate(tails):
        if tail is None:
            where.append((j, None, 1, None))
            continue
        first[j] = len(where)
        lo = 0
        for shape in tail:
            size = math.prod(shape)
            where.append((j, lo, size, shape))
            lo += size
    return len(where), tuple(where), first


def register_jax() -> None:
    """Make :class:`Packed` a JAX pytree (its leaves are its parts). Called by the JAX
    fast path when it is imported, which is before any Packed holds JAX arrays."""
    global _REGISTERED
    if _REGISTERED:
        return
    import jax

    jax.tree_util.register_pytree_node(
        Packed, lambda s: (s.parts, s.tails), lambda tails, parts: Packed(parts, tails)
    )
    _REGISTERED = True


_REGISTERED = False
