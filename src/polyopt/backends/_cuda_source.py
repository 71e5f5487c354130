"""The fused Adam/AdamW CUDA kernels as source text, written once (no cupy import).

- :data:`DEVICE_FUNCTION`: ``polyopt_adam_element<Compute>``, the update of one element,
  the same operations in the same order as ``polyopt.rules.adam._step``; and
  ``polyopt_adam_apply<P, G, Compute>``, which loads one element of each array in its
  storage type, calls it in the compute type and stores the results. Every kernel below
  calls ``polyopt_adam_apply``; none writes the math again.
- :func:`elementwise_spec`: the ``cupy.ElementwiseKernel`` arguments (in/out parameter
  lists, body, preamble) of the four variants: in place or pure, with or without AMSGrad.
  ``P`` (params and state) and ``G`` (grads) are CuPy type placeholders; the compute type
  ``C`` is a typedef in the preamble (float for float16/bfloat16/float32 params, double
  for float64) and the scalar parameters are declared in its dtype. C cannot be a
  placeholder: CuPy infers placeholders from array arguments only (a scalar takes a
  placeholder's type, never gives it), and no array is of the compute type.
- :func:`multi_tensor_source`: one ``extern "C" __global__`` kernel per param dtype that
  updates a LIST of arrays in one launch, from device tables of pointers and sizes and a
  host-made table of (tensor, start) chunks (:func:`multi_tensor_table`).
- :func:`standalone_source`: one complete .cu file (headers, typedefs, the device
  function, ``__global__`` wrappers generated from the elementwise specs the way CuPy
  generates its kernels, and the multi-tensor kernel) so that nvcc can check it all
  without a GPU, and a host compiler can run it on the CPU (tests/test_cupy_kernel.py).
- :func:`kernel_scalars`: the host side: the scalars every kernel takes, computed in
  float64 from the hyperparameters at step ``k`` exactly as the rule computes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Options for NVRTC (CuPy) and nvcc alike. ``--fmad=false``: no fused multiply-add
#: contraction, so each ``a * b + c`` rounds twice as in the generic path's separate
#: array operations (the kernel is memory-bound: FMA would save no time).
OPTIONS = ("--std=c++17", "--fmad=false")

#: Compute dtype per param dtype: half precision computes in float32 (as the generic path).
COMPUTE = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
#: C type of a dtype name used in the parameter lists (CuPy's names for them).
CTYPES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long"}
#: Param storage types for nvcc/NVRTC outside CuPy's own headers, and their header.
CUDA_TYPES = {
    "float16": ("__half", "#include <cuda_fp16.h>"),
    "bfloat16": ("__nv_bfloat16", "#include <cuda_bf16.h>"),
    "float32": ("float", ""),
    "float64": ("double", ""),
}

#: The host-computed scalars, in kernel argument order (all in the compute type).
#: ``lr_wd`` is ``lr * weight_decay`` rounded once from float64 (the rule's ``(lr * wd)``);
#: ``one_minus_beta*`` are ``1 - beta`` in float64, rounded once (the rule's ``(1 - b1)``).
SCALARS = (
    "lr_wd",
    "weight_decay",
    "beta1",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "step_size",
    "bc2_sqrt",
    "eps",
)
#: Runtime flags (int32 0/1), in kernel argument order after the scalars. ``decay``: the
#: rule's ``on(weight_decay)``; ``decoupled``: AdamW's decay instead of L2 on the gradient.
#: AMSGrad picks the elementwise variant, and is one more flag of the multi-tensor kernel.
FLAGS = ("maximize", "decay", "decoupled")

#: Threads per block and elements per chunk of the multi-tensor kernel.
MULTI_TENSOR_BLOCK = 512
MULTI_TENSOR_CHUNK = 65536

_SCALAR_DECLS = "".join(f"    const Compute {n},\n" for n in SCALARS)

DEVICE_FUNCTION = (
    r"""
// polyopt: one Adam / AdamW element update. The math of polyopt.rules.adam._step, with
// the same operations in the same order; Compute is float or double.
__device__ __forceinline__ float polyopt_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double polyopt_sqrt(double x) { return sqrt(x); }

template <typename Compute>
__device__ __forceinline__ void polyopt_adam_element(
    Compute& p, Compute g, Compute& m, Compute& v, Compute& vmax,
"""
    + _SCALAR_DECLS
    + r"""    const bool amsgrad, const bool maximize, const bool decay, const bool decoupled) {
  if (maximize) g = -g;
  if (decay) {
    if (decoupled) p = p - lr_wd * p;            // AdamW: p * (1 - lr * wd)
    else g = g + weight_decay * p;               // Adam: L2 added to the gradient
  }
  m = beta1 * m + one_minus_beta1 * g;
  v = beta2 * v + one_minus_beta2 * (g * g);
  Compute vhat = v;
  if (amsgrad) {
    if (vmax > vhat || vmax != vmax) vhat = vmax;  // max that keeps NaN, as numpy.maximum
    vmax = vhat;
  }
  const Compute denom = polyopt_sqrt(vhat) / bc2_sqrt + eps;
  p = p - step_size * (m / denom);
}

// Load one element of each array in its storage type (P, G), update in Compute, store.
// In place, the *_out references are the *_in ones: everything is read before any write.
// vmax_in / vmax_out are only dereferenced with amsgrad.
template <typename P, typename G, typename Compute>
__device__ __forceinline__ void polyopt_adam_apply(
    const P& p_in, const G& g_in, const P& m_in, const P& v_in, const P* vmax_in,
    P& p_out, P& m_out, P& v_out, P* vmax_out,
"""
    + _SCALAR_DECLS
    + r"""    const bool amsgrad, const bool maximize, const bool decay, const bool decoupled) {
  Compute p = static_cast<Compute>(p_in);
  Compute m = static_cast<Compute>(m_in);
  Compute v = static_cast<Compute>(v_in);
  Compute vmax = amsgrad ? static_cast<Compute>(*vmax_in) : static_cast<Compute>(0);
  polyopt_adam_element<Compute>(p, static_cast<Compute>(g_in), m, v, vmax,
"""
    + "".join(f"      {n},\n" for n in SCALARS)
    + r"""      amsgrad, maximize, decay, decoupled);
  p_out = static_cast<P>(p);
  m_out = static_cast<P>(m);
  v_out = static_cast<P>(v);
  if (amsgrad) *vmax_out = static_cast<P>(vmax);
}
"""
)

_CALL_SCALARS = ", ".join(SCALARS)
_CALL_FLAGS = ", ".join(FLAGS)


@dataclass(frozen=True)
class ElementwiseSpec:
    """The arguments of one ``cupy.ElementwiseKernel``."""

    name: str
    in_params: str
    out_params: str
    body: str
    preamble: str


def elementwise_preamble(compute: str) -> str:
    """The preamble of the elementwise kernels of one compute dtype."""
    return f"typedef {CTYPES[compute]} C;\n" + DEVICE_FUNCTION


def elementwise_spec(amsgrad: bool, inplace: bool, compute: str) -> ElementwiseSpec:
    """One elementwise variant. In place: inputs ``g`` and the scalars, outputs the param
    and state arrays, updated where they are. Pure: the param and state arrays are inputs
    too (``*_in``) and the outputs are new arrays."""
    if compute not in ("float32", "float64"):
        raise ValueError(f"compute must be 'float32' or 'float64', got {compute!r}")
    state = ("m", "v", "vmax") if amsgrad else ("m", "v")
    scalars = ", ".join(f"{compute} {n}" for n in SCALARS)
    flags = ", ".join(f"int32 {n}" for n in FLAGS)
    out_params = ", ".join(f"P {n}" for n in ("p",) + state)
    if inplace:
        src = {n: n for n in ("p",) + state}
        in_params = f"G g, {scalars}, {flags}"
    else:
        src = {n: f"{n}_in" for n in ("p",) + state}
        arrays = ", ".join([f"P {src['p']}", "G g"] + [f"P {src[n]}" for n in state])
        in_params = f"{arrays}, {scalars}, {flags}"
    if amsgrad:
        vmax_in, vmax_out = f"&{src['vmax']}", "&vmax"
    else:
        vmax_in, vmax_out = "static_cast<const P*>(nullptr)", "static_cast<P*>(nullptr)"
    body = (
        f"polyopt_adam_apply<P, G, C>({src['p']}, g, {src['m']}, {src['v']}, {vmax_in}, "
        f"p, m, v, {vmax_out}, {_CALL_SCALARS}, {'true' if amsgrad else 'false'}, "
        f"{_CALL_FLAGS})"
    )
    name = "polyopt_adam_{}{}_{}".format(
        "inplace" if inplace else "pure", "_amsgrad" if amsgrad else "", compute
    )
    return ElementwiseSpec(name, in_params, out_params, body, elementwise_preamble(compute))


def elementwise_specs(compute: str) -> list[ElementwiseSpec]:
    """All four variants of one compute dtype."""
    return [elementwise_spec(a, i, compute) for i in (True, False) for a in (False, True)]


# -- the multi-tensor kernel -------------------------------------------------------------

#: Pointer tables of the multi-tensor kernel, in argument (and table) order.
POINTER_TABLES = (
    ("p_in", "const P* const*"),
    ("g_in", "const G* const*"),
    ("m_in", "const P* const*"),
    ("v_in", "const P* const*"),
    ("vmax_in", "const P* const*"),
    ("p_out", "P* const*"),
    ("m_out", "P* const*"),
    ("v_out", "P* const*"),
    ("vmax_out", "P* const*"),
)
#: The whole parameter list of the multi-tensor kernel: (C declaration, name).
MULTI_TENSOR_PARAMS = (
    [(t, n) for n, t in POINTER_TABLES]
    + [
        ("const long long*", "sizes"),
        ("const long long*", "chunk_tensor"),
        ("const long long*", "chunk_start"),
        ("const long long", "n_chunks"),
        ("const long long", "chunk_size"),
    ]
    + [("const C", n) for n in SCALARS]
    + [("const int", n) for n in ("amsgrad",) + FLAGS]
)

MULTI_TENSOR_KERNEL = r"""
// polyopt: Adam / AdamW over a list of arrays in one launch. Chunk c covers elements
// [chunk_start[c], chunk_start[c] + chunk_size) of array chunk_tensor[c]; blocks walk
// the chunks (grid-stride), threads the elements of a chunk (block-stride). 64-bit
// indices throughout. With in place updates the *_out tables equal the *_in tables.
extern "C" __global__ void {name}(
{params}) {{
  for (long long c = blockIdx.x; c < n_chunks; c += gridDim.x) {{
    const long long t = chunk_tensor[c];
    const long long start = chunk_start[c];
    const long long stop = start + chunk_size < sizes[t] ? start + chunk_size : sizes[t];
    const P* pi = p_in[t];
    const G* gi = g_in[t];
    const P* mi = m_in[t];
    const P* vi = v_in[t];
    P* po = p_out[t];
    P* mo = m_out[t];
    P* vo = v_out[t];
    const P* ai = amsgrad ? vmax_in[t] : nullptr;
    P* ao = amsgrad ? vmax_out[t] : nullptr;
    for (long long i = start + threadIdx.x; i < stop; i += blockDim.x) {{
      polyopt_adam_apply<P, G, C>(pi[i], gi[i], mi[i], vi[i], amsgrad ? ai + i : nullptr,
                                  po[i], mo[i], vo[i], amsgrad ? ao + i : nullptr,
                                  {scalars},
                                  amsgrad != 0, maximize != 0, decay != 0, decoupled != 0);
    }}
  }}
}}
"""


def multi_tensor_name(dtype: str) -> str:
    return f"polyopt_adam_multi_tensor_{dtype}"


def _typedefs(dtype: str, p_ctype: str | None) -> str:
    p = p_ctype or CUDA_TYPES[dtype][0]
    return f"typedef {p} P;\ntypedef P G;\n"


def _header(dtype: str, header: str | None) -> str:
    return CUDA_TYPES[dtype][1] if header is None else header


def _multi_tensor_kernel(dtype: str) -> str:
    params = ",\n".join(f"    {t} {n}" for t, n in MULTI_TENSOR_PARAMS)
    return MULTI_TENSOR_KERNEL.format(
        name=multi_tensor_name(dtype), params=params, scalars=_CALL_SCALARS
    )


def multi_tensor_source(dtype: str) -> str:
    """The ``cupy.RawModule`` source of the multi-tensor kernel for ``dtype`` params."""
    compute = COMPUTE[dtype]
    return (
        f"{_header(dtype, None)}\n{_typedefs(dtype, None)}"
        + elementwise_preamble(compute)  # typedef C + the device function
        + _multi_tensor_kernel(dtype)
    )


@dataclass(frozen=True)
class MultiTensorTable:
    """Everything the multi-tensor kernel reads besides the arrays, in one int64 array
    (one host-to-device copy): the pointer tables, sizes, chunk tensors, chunk starts.
    ``slices`` gives each kernel argument's [start, stop) in ``table``."""

    table: np.ndarray
    slices: tuple[tuple[int, int], ...]
    n_chunks: int
    chunk_size: int


def multi_tensor_table(
    pointers: dict[str, list[int]], sizes: list[int], chunk_size: int = MULTI_TENSOR_CHUNK
) -> MultiTensorTable:
    """Build the table for arrays of ``sizes`` (all > 0) from their data ``pointers``
    (one list per name of :data:`POINTER_TABLES`; ``vmax_*`` may be missing: zeros)."""
    n = len(sizes)
    sz = np.asarray(sizes, dtype=np.int64)
    if n == 0 or np.any(sz <= 0) or chunk_size <= 0:
        raise ValueError("multi_tensor_table needs arrays of size > 0 and chunk_size > 0")
    counts = (sz + chunk_size - 1) // chunk_size
    n_chunks = int(counts.sum())
    chunk_tensor = np.repeat(np.arange(n, dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)  # index of each tensor's chunk 0
    chunk_start = (np.arange(n_chunks, dtype=np.int64) - first) * chunk_size
    rows = []
    for name, _ in POINTER_TABLES:
        ptrs = pointers.get(name)
        if ptrs is None:
            rows.append(np.zeros(n, dtype=np.int64))
        else:
            if len(ptrs) != n:
                raise ValueError(f"{name}: {len(ptrs)} pointers for {n} arrays")
            rows.append(np.asarray(ptrs, dtype=np.uint64).view(np.int64))
    rows += [sz, chunk_tensor, chunk_start]
    table = np.concatenate(rows)
    slices, start = [], 0
    for r in rows:
        slices.append((start, start + len(r)))
        start += len(r)
    return MultiTensorTable(table, tuple(slices), n_chunks, int(chunk_size))


# -- the standalone translation unit -----------------------------------------------------

_PARAM = re.compile(r"^\s*(\S+)\s+(\w+)\s*$")


def parse_params(params: str) -> list[tuple[str, str]]:
    """``"P p, float32 lr"`` -> ``[("P", "p"), ("float32", "lr")]`` as CuPy reads it: a
    one-letter type is a placeholder (an array here), any other a dtype (a scalar here)."""
    out = []
    for item in params.split(","):
        m = _PARAM.match(item)
        if m is None:
            raise ValueError(f"cannot parse kernel parameter {item!r}")
        out.append((m.group(1), m.group(2)))
    return out


def wrapper_params(spec: ElementwiseSpec) -> list[tuple[str, str]]:
    """The parameter list ``(declaration, name)`` of the standalone ``__global__`` wrapper
    of ``spec``: arrays as pointers, scalars by value, and the element count ``_n``."""
    out = []
    for kind, params in (("in", spec.in_params), ("out", spec.out_params)):
        for t, n in parse_params(params):
            if len(t) == 1:  # a placeholder: an array
                out.append((f"const {t}*" if kind == "in" else f"{t}*", f"_raw_{n}"))
            else:
                out.append((f"const {CTYPES.get(t, t)}", n))
    out.append(("const long long", "_n"))
    return out


def elementwise_wrapper(spec: ElementwiseSpec) -> str:
    """A ``__global__`` function doing what CuPy generates for ``spec`` on 1-D contiguous
    arrays: a grid-stride loop that binds each array parameter to its element (inputs as
    const references, outputs as references) and runs the body."""
    binds = []
    for kind, params in (("in", spec.in_params), ("out", spec.out_params)):
        for t, n in parse_params(params):
            if len(t) == 1:
                const = "const " if kind == "in" else ""
                binds.append(f"      {const}{t} &{n} = _raw_{n}[i];")
    params = ",\n".join(f"    {t} {n}" for t, n in wrapper_params(spec))
    return (
        f'extern "C" __global__ void {spec.name}(\n{params}) {{\n'
        "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < _n;\n"
        "       i += (long long)blockDim.x * gridDim.x) {\n"
        + "\n".join(binds)
        + f"\n      {spec.body};\n  }}\n}}\n"
    )


def standalone_source(dtype: str, *, p_ctype: str | None = None, header: str | None = None) -> str:
    """A complete .cu translation unit for ``dtype`` params: header, typedefs, the device
    function, the four elementwise kernels as CuPy would generate them (from the same
    spec strings) and the multi-tensor kernel. ``p_ctype`` / ``header`` replace the
    param type and its include (e.g. ``_Float16`` and no header for a host compiler)."""
    if dtype not in COMPUTE:
        raise ValueError(f"dtype must be one of {sorted(COMPUTE)}, got {dtype!r}")
    compute = COMPUTE[dtype]
    specs = elementwise_specs(compute)
    return (
        f"// polyopt fused Adam/AdamW kernels for {dtype} params (compute in {compute})\n"
        f"{_header(dtype, header)}\n{_typedefs(dtype, p_ctype)}"
        + elementwise_preamble(compute)
        + "\n".join(elementwise_wrapper(s) for s in specs)
        + _multi_tensor_kernel(dtype)
    )


def standalone_kernels(dtype: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """``(name, parameter list)`` of every kernel in :func:`standalone_source`."""
    specs = elementwise_specs(COMPUTE[dtype])
    return [(s.name, wrapper_params(s)) for s in specs] + [
        (multi_tensor_name(dtype), list(MULTI_TENSOR_PARAMS))
    ]


# -- the host side -----------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def kernel_scalars(hp: dict, k: Any) -> tuple[tuple[float, ...], tuple[int, ...]] | None:
    """The kernels' scalars (:data:`SCALARS`, float64) and flags (:data:`FLAGS`) for the
    hyperparameters ``hp`` at the 0-based step ``k``, computed on the host as the rule
    computes them (bias corrections ``1 - beta**t`` in float64). None when ``k`` or a
    hyperparameter is not a Python number (an array: the generic path handles it)."""
    from .._base import bias_correction, scalar_sqrt  # the rule's own helpers

    lr, wd = hp["lr"], hp["weight_decay"]
    numbers = (k, lr, wd, hp["eps"], *hp["betas"])
    if not (isinstance(k, int) and all(_is_number(x) for x in numbers)):
        return None
    b1, b2 = (float(b) for b in hp["betas"])
    lr, wd, eps = float(lr), float(wd), float(hp["eps"])
    t = k + 1
    values = {
        "lr_wd": lr * wd,
        "weight_decay": wd,
        "beta1": b1,
        "one_minus_beta1": 1 - b1,
        "beta2": b2,
        "one_minus_beta2": 1 - b2,
        "step_size": lr / bias_correction(b1, t, None),
        "bc2_sqrt": scalar_sqrt(bias_correction(b2, t, None), None),
        "eps": eps,
    }
    flags = {
        "maximize": bool(hp["maximize"]),
        "decay": wd != 0,
        "decoupled": bool(hp["decoupled_weight_decay"]),
    }
    return tuple(float(values[n]) for n in SCALARS), tuple(int(flags[n]) for n in FLAGS)
