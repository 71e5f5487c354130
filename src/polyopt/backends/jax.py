"""JAX fast path for Adam / AdamW: the state of a group packed into one buffer per slot.

Under ``jax.jit``, XLA's CPU backend compiles an elementwise update into one loop per
output array, and does not merge loops that write different arrays. Adam on one array
writes three (``m``, ``v``, ``p``), so a model with 1000 small arrays runs 3000 loops,
each with a fixed cost of a few µs: at 1M parameters that cost, not the 28 bytes of
memory traffic per parameter, sets the step time, for polyopt's generic rule and for
optax alike (measured: both compile to 3003 loops).

Here each slot of a parameter group is one 1-D buffer, held as a
:class:`polyopt.flat.Packed` so ``state.slots["exp_avg"][i]`` is still array ``i``'s
first moment. A step runs the rule's two halves (:func:`polyopt._base.two_part`, the
same math as the generic path): the slot half once over the group's gradients joined
into one array, then the parameter half per array, reading its slice of the new
slots. 1000 arrays take ~1000 loops instead of 3000. Cost: the joined gradients are one
temporary array the size of the group's gradients (XLA does not fuse a concatenation
of more than 8 arrays into its consumer).

When the group is not packed:

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

import math
from typing import Any

import jax

from .. import _xp
from .._base import Optimizer
from ..flat import Packed, register_jax
from ..rules.adam import ADAM
from . import FastPath, register

register_jax()

#: The generic step of a group (compute dtype, 0-d handling): the fallback.
_GENERIC = Optimizer(ADAM, {}, impl="generic")
_MOMENTS, _MOVE = ADAM.parts  # adam and adamw share the rule; options are in hp


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
    return len(params) > 1 and all(p.dtype == dtype for p in params) and _one_device(params)


def init(xp: Any, params: list, names: tuple[str, ...]) -> dict:
    """Zero state: one buffer per slot for a packable group, else one array per param."""
    if not _packable(params):
        return {name: [xp.zeros_like(p) for p in params] for name in names}
    shapes = [tuple(p.shape) for p in params]
    total = sum(math.prod(s) for s in shapes)
    # placed like the params: on their device if they are committed to one, else left
    # uncommitted as they are (a mix would make jax.jit compile the step twice)
    kwargs = {}
    if _xp._device_key(params[0]) is not None and params[0].committed:  # concrete
        kwargs["device"] = _xp.device_of(params[0])
    return {
        name: Packed.run(xp.zeros((total,), dtype=params[0].dtype, **kwargs), shapes)
        for name in names
    }


def _buffer(xp: Any, column: Any, shapes: list) -> Any | None:
    """The slot's one buffer if ``column`` is packed for arrays of ``shapes``."""
    if isinstance(column, Packed):
        run = column.single_run()
        if run is not None and list(run[1]) == shapes:
            return run[0]
    return None


def step(
    xp: Any, params: list, grads: list, slots: dict, hp: dict, k: Any, inplace: bool
) -> tuple[list, dict]:
    shapes = [tuple(p.shape) for p in params]
    names = tuple(slots)
    buffers = {name: _buffer(xp, slots[name], shapes) for name in names}
    if not all(b is not None for b in buffers.values()):
        concrete = all(_xp._device_key(p) is not None for p in params)
        if not (concrete and _packable(params)):
            return _GENERIC._step_group(xp, params, grads, slots, hp, k)
        # eager, on one device: pack once (a loaded checkpoint); later steps stay packed
        buffers = {name: _join(xp, list(slots[name]), ()) for name in names}
    lead = tuple(next(iter(buffers.values())).shape[:-1])  # a vmap batch axis, if any
    dtype = params[0].dtype
    cdt, hp, t = Optimizer.step_args(xp, dtype, hp, k)

    def compute(x):
        return x if x.dtype == cdt else xp.astype(x, cdt)

    s = {name: compute(b) for name, b in buffers.items()}
    # the slot half over the whole group (under jit XLA drops the joined params when
    # the rule does not read them, as AdamW's moments do not)
    new_s = _MOMENTS(
        compute(_join(xp, params, lead)), compute(_join(xp, grads, lead)), s, hp, t, xp
    )
    new_params, lo = [], 0
    for p, g, shape in zip(params, grads, shapes):
        size = math.prod(shape[len(lead) :])
        mine = {n: xp.reshape(a[..., lo : lo + size], shape) for n, a in new_s.items()}
        new_p = _MOVE(compute(p), compute(g), mine, hp, t, xp)
        new_params.append(new_p if new_p.dtype == dtype else xp.astype(new_p, dtype))
        lo += size
    tails = tuple(shape[len(lead) :] for shape in shapes)
    return new_params, {
        name: Packed.run(a if a.dtype == dtype else xp.astype(a, dtype), tails)
        for name, a in new_s.items()
    }


def _join(xp: Any, arrays: list, lead: tuple) -> Any:
    """``arrays`` (each of shape ``lead + tail``) as one array of shape ``lead + (n,)``."""
    return xp.concat([xp.reshape(a, lead + (-1,)) for a in arrays], axis=-1)


register(("adam", "adamw"), "jax", FastPath(step, init))
