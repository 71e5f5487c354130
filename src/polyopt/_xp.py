"""The one place that asks array-api-compat about arrays: namespace, device, dtype.

Everything else in polyopt receives ``xp`` (an array-API namespace) from here and
passes it down. Backend detection never imports a backend: array-api-compat's
``is_*_array`` helpers look in ``sys.modules`` only.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from typing import Any

import array_api_compat as _compat
import numpy as np
from array_api_compat import device as device_of  # noqa: F401  (re-exported)

_HALF = ("float16", "bfloat16")

#: Types known to be arrays: asked of array-api-compat once per type, not per array.
_ARRAY_TYPES: set[type] = set()


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array of a library array-api-compat knows (cached per type)."""
    t = type(x)
    if t in _ARRAY_TYPES:
        return True
    if _compat.is_array_api_obj(x):
        _ARRAY_TYPES.add(t)
        return True
    return False


_BACKEND_NAMES: dict[type, str] = {}  # array type -> its library's name
_DEVICE = operator.attrgetter("device")


def backend_name(x: Any) -> str:
    """Short name of the library that owns array ``x`` (for messages and dispatch)."""
    name = _BACKEND_NAMES.get(type(x))
    if name is None:
        name = _BACKEND_NAMES[type(x)] = _backend_name(x)
    return name


def _backend_name(x: Any) -> str:
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


def namespace(arrays: list, what: str, path: Any = None) -> Any:
    """The array-API namespace shared by ``arrays``; a clear TypeError if they are mixed.

    ``what`` names the argument(s) in the message, e.g. ``"params"``; ``path(i)`` (if
    given) names element ``i`` as the user wrote it (``params['w']``).
    """
    types = set(map(type, arrays))
    if len(types) == 1:  # the common case, asked once per type
        (t,) = types
        xp = _NAMESPACES.get(t)
        if xp is None and _compat.is_array_api_obj(arrays[0]):
            xp = _NAMESPACES[t] = _compat.array_namespace(arrays[0])
        if xp is not None:
            return xp
    name = path if path is not None else (lambda i: f"{what} leaf {i}")
    for i, a in enumerate(arrays):
        if not _compat.is_array_api_obj(a):
            raise TypeError(f"{name(i)} is not an array, got {type(a).__name__}: {a!r:.80}")
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


def check_same_device(arrays: list, what: str, path: Any = None) -> None:
    """Raise ValueError naming the devices if ``arrays`` do not all live on one device."""
    if len(arrays) < 2:
        return
    if _compat.is_torch_array(arrays[0]) and len(set(map(_DEVICE, arrays))) == 1:
        return  # torch's own attribute: the common case, without a call per array
    name = path if path is not None else (lambda i: f"{what} leaf {i}")
    first = _device_key(arrays[0])
    for i, a in enumerate(arrays[1:], start=1):
        d = _device_key(a)
        if d is not None and first is not None and d != first:
            raise ValueError(
                f"{what} live on different devices: {name(0)} on {first!r}, {name(i)} on {d!r}"
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

        if torch.is_grad_enabled():
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


# -- dtypes -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def float_kind(xp: Any, dtype: Any) -> str | None:
    """The kind of floating dtype an optimizer takes: "real" or "complex", else None.
    NumPy arrays of ``ml_dtypes.bfloat16`` (what JAX hands to NumPy) count as real:
    NumPy itself does not know them (``np.isdtype`` raises). Cached per dtype."""
    if isinstance(dtype, np.dtype) and dtype.kind == "V" and dtype.name == "bfloat16":
        return "real"
    try:
        if xp.isdtype(dtype, "real floating"):
            return "real"
        if xp.isdtype(dtype, "complex floating"):
            return "complex"
    except TypeError:  # a dtype the library's isdtype does not know
        return None
    return None


@functools.lru_cache(maxsize=256)
def math_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype the math of an array of ``dtype`` runs in: the real dtype of a complex
    one, float32 for half precision (cached per dtype)."""
    return compute_dtype(xp, real_dtype(xp, dtype))


def real_dtype(xp: Any, dtype: Any) -> Any:
    """The real dtype of a complex one (complex64 -> float32), else ``dtype``."""
    name = str(dtype).rsplit(".", 1)[-1]
    real = _REAL_OF.get(name)
    return dtype if real is None else getattr(xp, real)


_REAL_OF = {"complex64": "float32", "complex128": "float64", "complex32": "float16"}


# -- complex arrays as pairs of reals (torch.optim's view_as_real) ----------------------


def as_real(xp: Any, x: Any) -> Any:
    """A complex array as a real one with a trailing axis of 2 (real, imaginary): a view
    sharing memory where the library has views (NumPy, CuPy, torch), so that writing into
    it writes into ``x``; a new array elsewhere (JAX, array-api-strict)."""
    if is_torch(xp):
        import torch

        return torch.view_as_real(x)
    if is_numpy(xp) or _compat.is_cupy_namespace(xp):
        mod = np if is_numpy(xp) else _cupy()
        if not isinstance(x, mod.ndarray):  # a NumPy scalar: no memory to view
            x = mod.asarray(x)
        re = x.real  # a view with x's strides
        half = x.dtype.itemsize // 2
        return mod.lib.stride_tricks.as_strided(
            re, shape=tuple(x.shape) + (2,), strides=tuple(re.strides) + (half,)
        )
    return xp.stack([xp.real(x), xp.imag(x)], axis=-1)


def as_complex(xp: Any, r: Any, dtype: Any) -> Any:
    """The inverse of :func:`as_real`: a new complex array of ``dtype`` from ``r[..., 0]``
    (real parts) and ``r[..., 1]`` (imaginary parts)."""
    if is_torch(xp):
        import torch

        return torch.complex(r[..., 0], r[..., 1])
    if is_jax(xp):
        import jax

        return jax.lax.complex(r[..., 0], r[..., 1])
    if is_numpy(xp) or _compat.is_cupy_namespace(xp):
        mod = np if is_numpy(xp) else _cupy()
        out = mod.empty(r.shape[:-1], dtype=dtype)
        re, im = out.real, out.imag  # views into out
        re[...] = r[..., 0]
        im[...] = r[..., 1]
        return out
    re, im = xp.astype(r[..., 0], dtype), xp.astype(r[..., 1], dtype)
    return re + im * 1j


def _cupy() -> Any:
    import cupy  # a CuPy namespace was found: cupy is imported

    return cupy


# -- what the stateful form may write into ----------------------------------------------


def not_writable(xp: Any, arrays: list) -> tuple[int, str] | None:
    """The first array the stateful form cannot write into in place, and why; None if
    it can write into all of them. (A tight loop per library: it runs every step.)"""
    if is_numpy(xp):
        if all(type(a) is np.ndarray and a.flags.writeable for a in arrays):
            return None
        for i, a in enumerate(arrays):
            if not isinstance(a, np.ndarray):
                return (
                    i,
                    f"is a NumPy scalar ({type(a).__name__}), not an array that can be updated",
                )
            if not a.flags.writeable:
                return i, (
                    "is read-only (a broadcast view, a memory map opened with mode='r', or "
                    "an array with flags.writeable = False); pass a writable copy, e.g. "
                    "np.array(x)"
                )
    elif is_torch(xp):
        import torch

        if any(map(torch.Tensor.is_inference, arrays)) and not torch.is_inference_mode_enabled():
            i = next(i for i, a in enumerate(arrays) if a.is_inference())
            return i, (
                "is an inference tensor (made under torch.inference_mode()), which cannot be "
                "updated in place outside inference mode; pass x.clone() made outside it"
            )
    return None


def any_sparse(tensors: list) -> bool:
    """Whether any of these torch tensors is sparse (one pass, no call per tensor)."""
    import torch

    strided = torch.strided
    return any(t.layout is not strided for t in tensors)


def sparse_layout(x: Any) -> str | None:
    """The layout name of a sparse torch tensor, None for a dense array."""
    if _compat.is_torch_array(x):
        import torch

        if x.layout != torch.strided:
            return str(x.layout)
    return None


# -- scalars ----------------------------------------------------------------------------


def concrete_value(x: Any) -> float | None:
    """The value of a 0-d array as a float, or None when it has no value here: a traced
    array (``jax.jit``, ``jax.vmap``, ``jax.grad``) or one a tracing compiler fakes."""
    try:
        if _compat.is_torch_array(x):
            x = x.detach()  # reading a value is not part of any graph
        return float(x)
    except Exception:  # ConcretizationTypeError, TracerBoolConversionError, ...
        return None


def host_value(x: Any) -> float | None:
    """A 0-d array whose value can be read without a device sync or losing a gradient
    (a CPU torch tensor that does not require grad, a NumPy array), as a float: the
    engine then runs the host float64 math, as for a Python number. None otherwise."""
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return float(x)
    if _compat.is_torch_array(x):
        if x.ndim == 0 and x.device.type == "cpu" and not x.requires_grad:
            return concrete_value(x)
    return None
