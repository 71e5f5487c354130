"""Fused steps of every elementwise rule for CuPy arrays (imported on first use of CuPy arrays).

The math is the rule's own step, traced into an element program
(:func:`polyopt.backends._derive.program`) and written out as CUDA by
:mod:`polyopt.backends._cuda_source`; this module only chooses how to launch it:

(a) params, grads and every state slot are each one run of arrays back to back in one
    buffer (:func:`polyopt.flat.span`): ONE elementwise launch over the 1-D spans;
(b) otherwise, the C-contiguous arrays of one dtype, if more than one: ONE multi-tensor
    launch (tables of pointers, sizes and chunks on the device);
(c) a single array, or a non-contiguous one: one elementwise launch for it (CuPy's
    indexing handles any strides and 0-d arrays).

Zero-size arrays launch nothing. The constants are the step's host values (float64,
the rule's own arithmetic) rounded once to the compute type (float32 for
float16/bfloat16/float32 params, float64 for float64). The state made by :func:`init` is
flat: one buffer per (slot, dtype), holding the rule's initial values. In the stateful
form everything is prepared (outputs, multi-tensor kernels compiled, pointer tables on
the device) before the first launch. A step whose hyperparameters or step count are
arrays rather than Python numbers (:func:`polyopt.backends._derive.host_values`) runs
the generic rule instead (same numbers, more launches).

``LAST_PATH`` holds the launches of the last step (``("span",)``, ``("multi_tensor",)``,
``("elementwise", ...)``, ``("generic",)``); ``LAUNCHES`` counts them all.
"""

from __future__ import annotations

import collections
from typing import Any

import cupy
import numpy as np

from .. import flat
from . import FastPath, _derive, generic, register
from . import _cuda_source as src

#: Launches of the last step, in order; and a running count per kind.
LAST_PATH: tuple[str, ...] = ()
LAUNCHES: collections.Counter = collections.Counter()


def _elementwise_kernel(spec: src.ElementwiseSpec) -> cupy.ElementwiseKernel:
    return cupy.ElementwiseKernel(
        spec.in_params,
        spec.out_params,
        spec.body,
        spec.name,
        preamble=spec.preamble,
        options=src.OPTIONS,
        no_return=True,
    )


#: The elementwise kernels, built on first use: (program key, inplace, compute) ->
#: kernel. Constructing an ElementwiseKernel compiles nothing: CuPy compiles (and caches
#: on disk) at the first call for each argument-type combination.
ELEMENTWISE: dict[tuple, cupy.ElementwiseKernel] = {}


def elementwise_kernel(key: tuple, inplace: bool, compute: str) -> cupy.ElementwiseKernel:
    kernel = ELEMENTWISE.get((key, inplace, compute))
    if kernel is None:
        kernel = ELEMENTWISE[(key, inplace, compute)] = _elementwise_kernel(
            src.elementwise_spec(key, inplace, compute)
        )
    return kernel


_MULTI: dict[tuple, Any] = {}


def multi_tensor_kernel(key: tuple, dtype: str):
    """The multi-tensor kernel of the program ``key`` for ``dtype`` params, compiled (and
    cached on disk by CuPy) the first time a step asks for it."""
    kernel = _MULTI.get((key, dtype))
    if kernel is None:
        module = cupy.RawModule(code=src.multi_tensor_source(key, dtype), options=src.OPTIONS)
        kernel = _MULTI[(key, dtype)] = module.get_function(src.multi_tensor_name(key, dtype))
    return kernel


#: Device copies of multi-tensor tables, by (device, table bytes): the stateful form
#: updates the same arrays every step, so its table is uploaded once.
_TABLES: collections.OrderedDict = collections.OrderedDict()
_TABLES_MAX = 16


def _constants(prog: _derive.Program, compute: str) -> tuple:
    """The step's constants rounded once from float64 to the compute type (as NumPy
    rounds a Python float met with a float32 array)."""
    n = src.n_constants(prog.key)
    return tuple(prog.constants(np.float32 if compute == "float32" else np.float64)[:n])


def _empty_like(xp: Any, arrays: list) -> list:
    """New uninitialised arrays shaped like ``arrays``: views into one buffer per dtype."""
    out: list = [None] * len(arrays)
    by_dtype: dict[str, list[int]] = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype.name, []).append(i)
    for idx in by_dtype.values():
        first = arrays[idx[0]]
        views = flat.empty_views(
            xp, [tuple(arrays[i].shape) for i in idx], first.dtype, first.device
        )
        for i, v in zip(idx, views):
            out[i] = v
    return out


def init(rule, xp: Any, params: list, hp: dict) -> dict[str, list]:
    """The rule's initial state, flat: for each slot, one buffer per dtype holding every
    array's view."""
    slots: dict[str, list] = {}
    for name, col in rule.init_slots(params, hp, xp).items():
        slots[name] = _empty_like(xp, params)
        for view, value in zip(slots[name], col):
            view[...] = value
    return slots


def _buffers(views: list) -> list:
    """One 1-D array per run of views that :func:`flat.span` recognises (else each view)."""
    by_dtype: dict[str, list] = {}
    for v in views:
        by_dtype.setdefault(v.dtype.name, []).append(v)
    out = []
    for vs in by_dtype.values():
        whole = flat.span(vs)
        out.extend([whole] if whole is not None else vs)
    return [b for b in out if b.size > 0]


def _plan(rule, xp: Any, params: list, grads: list, slots: dict, hp: dict, k: Any, inplace: bool):
    """One fused update of a run of arrays (see the module docstring): outputs
    allocated, kernels compiled and tables uploaded now; the returned commit launches
    (in place: into params and slots) and returns ``(params, slots)``."""
    if not _derive.host_values(hp, k):  # an array hyperparameter or count: the generic rule
        result = generic(rule)._step_group(xp, params, grads, slots, hp, k)

        def commit_generic():
            global LAST_PATH
            LAST_PATH = ("generic",)
            LAUNCHES["generic"] += 1
            return result

        return commit_generic

    prog = _derive.program(rule, hp, k + 1)
    names = prog.names
    state = [list(slots[n]) for n in names]  # one list per slot name
    if inplace:
        out_p, out_s = list(params), state
    else:
        # Pure: new arrays for everything the step writes, flat (one buffer per dtype);
        # the kernels read the inputs and write these, so inputs stay untouched and the
        # traffic is the in-place step's (no copy first).
        out_p = _empty_like(xp, params)
        out_s = [_empty_like(xp, s) for s in state]

    with params[0].device:
        launch = _span_launch(prog, params, grads, state, out_p, out_s, inplace)
        if launch is None:
            launch = _list_launches(prog, params, grads, state, out_p, out_s, inplace)

    def commit():
        global LAST_PATH
        with params[0].device:
            launches = launch()
        LAST_PATH = tuple(launches)
        LAUNCHES.update(launches)
        return out_p, dict(zip(names, out_s))

    return commit


def step(rule, xp: Any, params: list, grads: list, slots: dict, hp: dict, k: Any, inplace: bool):
    """One update, planned and committed at once (``inplace``: into params and slots)."""
    return _plan(rule, xp, params, grads, slots, hp, k, inplace)()


def pure(rule, xp, params, grads, slots, hp, k):
    return _plan(rule, xp, params, grads, slots, hp, k, False)()


def inplace(rule, xp, params, grads, slots, hp, k):
    return _plan(rule, xp, params, grads, slots, hp, k, True)


def _span_launch(prog, params, grads, state, out_p, out_s, inplace):
    """Strategy (a): one elementwise launch over 1-D spans, as a thunk that launches and
    returns the launch names; None if not applicable."""
    groups = [params, grads, *state] + ([] if inplace else [out_p, *out_s])
    spans = []
    for g in groups:
        s = flat.span(g)
        if s is None or s.dtype != params[0].dtype:
            return None
        spans.append(s)
    n = len(state)
    p, g, st = spans[0], spans[1], spans[2 : 2 + n]
    if p.size == 0:
        return lambda: []  # nothing to update: no launch
    if inplace:
        call = _elementwise(prog, p, g, st, p, st, True)
    else:
        call = _elementwise(prog, p, g, st, spans[2 + n], spans[3 + n :], False)

    def launch():
        call()
        return ["span"]

    return launch


def _elementwise(prog, p, g, st, po, so, inplace):
    """The elementwise launch for one array (or span), as a thunk."""
    compute = src.COMPUTE[p.dtype.name]
    kernel = elementwise_kernel(prog.key, inplace, compute)
    args = _constants(prog, compute)
    if inplace:
        return lambda: kernel(g, *args, p, *st)
    return lambda: kernel(p, g, *st, *args, po, *so)


def _list_launches(prog, params, grads, state, out_p, out_s, inplace):
    """Strategies (b) and (c), as a thunk that launches and returns the launch names."""
    calls, launches = [], []
    buckets: dict[str, list[int]] = {}
    singles: list[int] = []
    for i, p in enumerate(params):
        if p.size == 0:
            continue
        arrays = [p, grads[i], *(s[i] for s in state)]
        if not inplace:
            arrays += [out_p[i], *(s[i] for s in out_s)]
        if all(a.flags.c_contiguous for a in arrays):
            buckets.setdefault(p.dtype.name, []).append(i)
        else:
            singles.append(i)
    for idx in buckets.values():
        if len(idx) == 1:
            singles.extend(idx)
            continue
        calls.append(_multi_tensor(prog, params, grads, state, out_p, out_s, idx))
        launches.append("multi_tensor")
    for i in sorted(singles):
        st = [s[i] for s in state]
        calls.append(
            _elementwise(prog, params[i], grads[i], st, out_p[i], [s[i] for s in out_s], inplace)
        )
        launches.append("elementwise")

    def launch():
        for call in calls:
            call()
        return launches

    return launch


def _multi_tensor(prog, params, grads, state, out_p, out_s, idx):
    """Strategy (b): one launch for the arrays ``idx`` (one dtype, all C-contiguous), as
    a thunk; the kernel is compiled and the tables are on the device before it runs.
    Pure or in place only differs in the output pointer tables."""

    def ptrs(arrays):
        return [arrays[i].data.ptr for i in idx]

    pointers = [ptrs(params), ptrs(grads), *[ptrs(s) for s in state]]
    pointers += [ptrs(out_p), *[ptrs(s) for s in out_s]]
    sizes = [int(params[i].size) for i in idx]
    tbl = src.multi_tensor_table(pointers, sizes)
    device_id = params[idx[0]].device.id
    key = (device_id, tbl.table.tobytes())
    device_args = _TABLES.get(key)
    if device_args is None:
        table = cupy.asarray(tbl.table)
        device_args = tuple(table[a:b] for a, b in tbl.slices)
        _TABLES[key] = device_args
        while len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    dtype = params[idx[0]].dtype.name
    args = (
        device_args
        + (np.int64(tbl.n_chunks), np.int64(tbl.chunk_size))
        + _constants(prog, src.COMPUTE[dtype])
    )
    grid = min(tbl.n_chunks, 2**31 - 1)
    kernel = multi_tensor_kernel(prog.key, dtype)
    return lambda: kernel((grid,), (src.MULTI_TENSOR_BLOCK,), args)


register(None, "cupy", FastPath(pure=pure, inplace=inplace, init=init))
