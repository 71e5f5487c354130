"""The one place that asks array-api-compat about arrays: namespace, device, dtype.

Everything else in polyopt receives ``xp`` (an array-API namespace) from here and
passes it down. Backend detection never imports a backend: array-api-compat's
``is_*_array`` helpers look in ``sys.modules`` only.
"""

from __future__ import annotations

import contextlib
from typing import Any

import array_api_compat as _compat
import numpy as np
from array_api_compat import device as device_of  # noqa: F401  (re-exported)
from array_api_compat import is_array_api_obj as is_array  # noqa: F401

_HALF = ("float16", "bfloat16")


def backend_name(x: Any) -> str:
    """Short name of the library that owns array ``x`` (for messages and dispatch)."""
    if _compat.is_numpy_array(x):
        return "numpy"
    if _compat.is_cupy_array(x):
        return "cupy"
    if _compat.is_torch_array(x):
        return "torch"
    if _compat.is_jax_array(x):
        return "jax"
    if _compat.is_dask_array(x):
        return "dask"
    module = type(x).__module__.split(".")[0]
    return module


_NAMESPACES: dict[type, Any] = {}  # array type -> namespace (the same for every instance)


def namespace(arrays: list, what: str) -> Any:
    """The array-API namespace shared by ``arrays``; a clear TypeError if they are mixed.

    ``what`` names the argument(s) in the message, e.g. ``"params and grads"``.
    """
    types = set(map(type, arrays))
    if len(types) == 1:  # the common case, asked once per type
        (t,) = types
        xp = _NAMESPACES.get(t)
        if xp is None and _compat.is_array_api_obj(arrays[0]):
            xp = _NAMESPACES[t] = _compat.array_namespace(arrays[0])
        if xp is not None:
            return xp
    for i, a in enumerate(arrays):
        if not _compat.is_array_api_obj(a):
            raise TypeError(f"{what}: leaf {i} is not an array, got {type(a).__name__}: {a!r:.80}")
    try:
        return _compat.array_namespace(*arrays)
    except TypeError:
        kinds = sorted({f"{backend_name(a)} ({type(a).__name__})" for a in arrays})
        raise TypeError(
            f"{what} mix arrays from different libraries: {', '.join(kinds)}; "
            "use one library per optimizer"
        ) from None


def _device_key(x: Any) -> Any:
    """What must match across arrays: the device; for JAX the set of devices an array
    lives on (a sharded and a replicated array on one mesh go together)."""
    if _compat.is_jax_array(x):
        try:
            return frozenset(x.devices())
        except Exception:  # a tracer under jit: placement is XLA's business
            return None
    return _compat.device(x)


def check_same_device(arrays: list, what: str) -> None:
    """Raise ValueError naming the devices if ``arrays`` do not all live on one device."""
    if len(arrays) < 2:
        return
    if _compat.is_torch_array(arrays[0]) and len({a.device for a in arrays}) == 1:
        return  # torch's own attribute: the common case, without a call per array
    first = _device_key(arrays[0])
    for i, a in enumerate(arrays[1:], start=1):
        d = _device_key(a)
        if d is not None and first is not None and d != first:
            raise ValueError(
                f"{what} live on different devices: leaf 0 on {first!r}, leaf {i} on {d!r}"
            )


def is_half(dtype: Any) -> bool:
    """True for float16 / bfloat16 (whatever library the dtype belongs to)."""
    return any(name in str(dtype) for name in _HALF)


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype the math runs in: float32 for half-precision params, else the param's."""
    return xp.float32 if is_half(dtype) else dtype


def is_jax(xp: Any) -> bool:
    return _compat.is_jax_namespace(xp)


def is_torch(xp: Any) -> bool:
    return _compat.is_torch_namespace(xp)


def is_numpy(xp: Any) -> bool:
    return _compat.is_numpy_namespace(xp)


def is_dask(xp: Any) -> bool:
    return _compat.is_dask_namespace(xp)


def no_grad(xp: Any):
    """A context in which the library records no gradients (torch), else a no-op."""
    if is_torch(xp):
        import torch  # already imported: a torch namespace was found

        return torch.no_grad()
    return contextlib.nullcontext()


def writable(xp: Any) -> bool:
    """Whether the stateful form should write into the user's arrays. JAX arrays are
    immutable; dask's ``x[...] = y`` keeps the old graph inside the new one, so its
    graph would grow quadratically with the steps: both hold the new arrays instead."""
    return not (is_jax(xp) or is_dask(xp))


def write_into(xp: Any, dst: Any, src: Any) -> None:
    """Copy ``src`` into the existing array ``dst`` in place (caller holds ``no_grad``)."""
    if is_torch(xp):
        dst.copy_(src)
    else:
        dst[...] = src


def as_array(xp: Any, x: Any) -> Any:
    """NumPy turns 0-d results into scalars; give them back as 0-d arrays."""
    if is_numpy(xp) and not isinstance(x, np.ndarray):
        return np.asarray(x)
    return x


def copy(xp: Any, x: Any) -> Any:
    """A copy of ``x`` that shares no memory with it, in the same library and device."""
    if is_jax(xp):
        return x  # JAX arrays are immutable: sharing is a snapshot already
    if is_torch(xp):
        return x.detach().clone()
    return xp.asarray(x, copy=True)


def is_python_scalar(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
