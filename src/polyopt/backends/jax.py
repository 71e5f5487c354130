"""JAX fast path for every elementwise rule: runs of small arrays keep each slot in one buffer.

Under ``jax.jit``, XLA's CPU backend compiles an elementwise update into one loop per
output array, and does not merge loops that write different arrays. Adam on one array
writes three (``m``, ``v``, ``p``), so a model with 1000 small arrays runs 3000 loops,
each with a fixed cost of a few µs: at 1M parameters that cost, not the 28 bytes of
memory traffic per parameter, sets the step time, for polyopt's generic rule and for
optax alike (measured: both compile to 3003 loops).

Here each run of consecutive small arrays in a group (:data:`SMALL`, :data:`RUN`) keeps
each slot in one 1-D buffer; the slot column is a :class:`polyopt.flat.Packed`, so
``state.slots["exp_avg"][i]`` is still array ``i``'s first moment. A step runs the
rule's own step, in two halves: the new slots once over the run's arrays joined into
one, then the new param per array. A rule built by :func:`polyopt._base.two_part`
(Adam) gives the halves, and the param half reads its slice of the new slots; for any
other rule the param half is the whole step on the array and its slices of the old
slots, of which XLA keeps only the new param (the slot arithmetic is recomputed inside
that one loop, not stored). The same math as the generic path, either way; other
arrays take the generic rule. 1000 arrays of 1000 elements: 1011 loops instead of
3003. Cost: the joined gradients are one temporary the size of the run's gradients
(XLA does not fuse a concatenation of more than 8 arrays into its consumer).

When nothing in the group is packed:

- one array, or arrays of different dtypes: the generic rule;
- params spread over several devices (a sharded model): the generic rule, so every
  slot keeps its param's sharding. This is decided where placement is visible, on
  concrete arrays (``init``, a stateful step); under ``jax.jit`` a group whose state
  is not packed already stays per array;
- state given as tuples (``load_state_dict``, a state built by hand): packed on the
  first step outside ``jit``, left per array inside it.

A state packed by ``opt.init`` on params that carry a batch axis cannot be split by
``jax.vmap(..., in_axes=0)`` (vmap would split the buffer, not each array): build it
inside vmap, ``jax.vmap(opt.init)(params)``, or use ``impl="generic"``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax

from .. import _xp
from .._base import Optimizer
from ..flat import Packed, register_jax
from . import FastPath, generic, register

register_jax()


def _one_device(params: list) -> bool:
    """False if a param lives on more than one device, or two live on different ones.
    Concrete arrays tell their devices; a tracer tells its mesh only under explicit
    sharding, and otherwise (placement left to XLA) counts as one device."""
    keys = set()
    for p in params:
        key = _xp._device_key(p)
        if key is None:  # a tracer
            mesh = getattr(jax.typeof(p), "sharding", None)
            mesh = getattr(mesh, "mesh", None)
            if mesh is not None and not mesh.empty and mesh.size > 1:
                return False
        else:
            keys.add(key)
    return len(keys) <= 1 and all(len(k) == 1 for k in keys)


def _packable(params: list) -> bool:
    dtype = params[0].dtype
    return (
        len(params) > 1
        and jax.numpy.issubdtype(dtype, jax.numpy.floating)  # complex params: per array
        and all(p.dtype == dtype for p in params)
        and _one_device(params)
    )


#: Arrays of up to SMALL elements are packed, RUN elements per buffer at most. Packing
#: pays where the loops' fixed cost is large next to their work; a big array in one
#: loop gains nothing, and one loop over a huge buffer is slower than many over its
#: pieces (XLA runs one loop on one thread; independent loops run side by side).
SMALL = 1 << 14
RUN = 1 << 18


@functools.lru_cache(maxsize=64)
def _plan(shapes: tuple) -> tuple[tuple[tuple[int, int], ...], tuple]:
    """The group's arrays as segments ``(start, stop)`` (a run of two or more
    consecutive small arrays shares a buffer; any other array is a segment of its own),
    and the ``Packed.tails`` of a state laid out that way. Cached: the same every step."""
    sizes = [math.prod(s) for s in shapes]
    segments, i = [], 0
    while i < len(sizes):
        j, total = i, 0
        while j < len(sizes) and sizes[j] <= SMALL and total + sizes[j] <= RUN:
            total += sizes[j]
            j += 1
        stop = j if j - i >= 2 else i + 1
        segments.append((i, stop))
        i = stop
    tails = tuple(None if b - a == 1 else shapes[a:b] for a, b in segments)
    return tuple(segments), tails


def init(rule, xp: Any, params: list, hp: dict) -> dict:
    """The rule's initial state, runs of small arrays packed (a plain list if nothing
    is)."""
    shapes = tuple(tuple(p.shape) for p in params)
    plan, tails = _plan(shapes)
    if len(plan) == len(params) or not _packable(params):
        return rule.init_slots(params, hp, xp)
    if rule.init is not None:  # not zeros: the rule's values, joined per run
        cols = rule.init_slots(params, hp, xp)
        return {
            name: Packed(
                [col[a] if b - a == 1 else _join(xp, list(col[a:b])) for a, b in plan], tails
            )
            for name, col in cols.items()
        }
    names = rule.slots(hp)
    # placed like the params: on their device if they are committed to one, else left
    # uncommitted as they are (a mix would make jax.jit compile the step twice)
    kwargs = {}
    if _xp._device_key(params[0]) is not None and params[0].committed:  # concrete
        kwargs["device"] = _xp.device_of(params[0])
    dtype = params[0].dtype

    def zeros(a, b):
        if b - a == 1:
            return xp.zeros_like(params[a])
        return xp.zeros((sum(math.prod(s) for s in shapes[a:b]),), dtype=dtype, **kwargs)

    return {name: Packed([zeros(a, b) for a, b in plan], tails) for name in names}


def step(rule, xp: Any, params: list, grads: list, slots: dict, hp: dict, k: Any):
    fallback = generic(rule)
    shapes = tuple(tuple(p.shape) for p in params)
    plan, tails = _plan(shapes)
    if len(plan) == len(params):  # nothing to pack
        return fallback._step_group(xp, params, grads, slots, hp, k)
    names = tuple(slots)
    if all(isinstance(c, Packed) and c.tails == tails for c in slots.values()):
        parts = {name: c.parts for name, c in slots.items()}
    else:
        concrete = all(_xp._device_key(p) is not None for p in params)
        if not (concrete and _packable(params)):
            return fallback._step_group(xp, params, grads, slots, hp, k)
        # eager, on one device: pack once (a loaded checkpoint); later steps stay packed
        parts = {
            name: [c[a] if b - a == 1 else _join(xp, list(c[a:b])) for a, b in plan]
            for name, c in slots.items()
        }
    new_params: list = []
    new_parts: dict = {name: [] for name in names}
    for j, (a, b) in enumerate(plan):
        mine = {name: parts[name][j] for name in names}
        if b - a == 1:  # an array of its own: the rule as the generic path runs it
            ps, ss = fallback._step_group(
                xp, params[a:b], grads[a:b], {n: [x] for n, x in mine.items()}, hp, k
            )
            ss = {n: x[0] for n, x in ss.items()}
        else:
            ps, ss = _run_step(rule, xp, params[a:b], grads[a:b], mine, hp, k)
        new_params.extend(ps)
        for name in names:
            new_parts[name].append(ss[name])
    return new_params, {name: Packed(new_parts[name], tails) for name in names}


def _halves(rule):
    """``(update_slots, update_param, reads_new)``: the rule's own halves, or the whole
    step twice (keeping the slots, then the param, which reads the old slots)."""
    if rule.parts is not None:
        return (*rule.parts, True)

    def update_slots(p, g, s, hp, t, xp):
        return rule.step(p, g, s, hp, t, xp)[1]

    def update_param(p, g, s, hp, t, xp):
        return rule.step(p, g, s, hp, t, xp)[0]

    return update_slots, update_param, False


def _run_step(rule, xp: Any, params: list, grads: list, buffers: dict, hp: dict, k: Any):
    """One run of arrays whose slots are ``buffers``: the slot half of the rule once
    over the joined arrays, the param half per array on its slice of the slots."""
    update_slots, update_param, reads_new = _halves(rule)
    dtype = params[0].dtype
    cdt, hp, t = Optimizer.step_args(xp, dtype, hp, k)

    def compute(x):
        return x if x.dtype == cdt else xp.astype(x, cdt)

    s = {name: compute(b) for name, b in buffers.items()}
    # (under jit XLA drops the joined params when the rule does not read them, as
    # AdamW's moments do not)
    new_s = update_slots(compute(_join(xp, params)), compute(_join(xp, grads)), dict(s), hp, t, xp)
    read = new_s if reads_new else s
    new_params, lo = [], 0
    for p, g in zip(params, grads):
        size = math.prod(p.shape)
        mine = {n: xp.reshape(a[lo : lo + size], p.shape) for n, a in read.items()}
        new_p = update_param(compute(p), compute(g), mine, hp, t, xp)
        new_params.append(new_p if new_p.dtype == dtype else xp.astype(new_p, dtype))
        lo += size
    return new_params, {
        name: a if a.dtype == dtype else xp.astype(a, dtype) for name, a in new_s.items()
    }


def _join(xp: Any, arrays: list) -> Any:
    """``arrays`` as one 1-D array."""
    return xp.concat([xp.reshape(a, (-1,)) for a in arrays])


register(None, "jax", FastPath(pure=step, init=init))
