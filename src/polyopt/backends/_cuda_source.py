"""The CUDA kernels of a rule, generated from its element program (no cupy import).

A rule's step traced by :func:`polyopt.backends._derive.program` is an element program:
its structure (``key``: the operations in the rule's order) and this step's host
constants. From the key this module writes, for any rule:

- :func:`device_function`: ``{name}_element<C>`` (the update of one element in the
  compute type ``C``: the rule's operations in its order, each constant a parameter) and
  ``{name}_apply<P, G, C>`` (loads one element of each array in its storage type, calls
  it, stores the results). Every kernel below calls ``{name}_apply``; none writes the
  math again, and nothing here names an optimizer.
- :func:`elementwise_spec`: the ``cupy.ElementwiseKernel`` arguments (in/out parameter
  lists, body, preamble), in place or pure. ``P`` (params and state) and ``G`` (grads)
  are CuPy type placeholders; the compute type ``C`` is a typedef in the preamble (float
  for float16/bfloat16/float32 params, double for float64) and the constants are
  declared in its dtype. C cannot be a placeholder: CuPy infers placeholders from array
  arguments only (a scalar takes a placeholder's type, never gives it), and no array is
  of the compute type.
- :func:`multi_tensor_source`: one ``extern "C" __global__`` kernel per (program, param
  dtype) that updates a LIST of arrays in one launch, from device tables of pointers and
  sizes and a host-made table of (tensor, start) chunks (:func:`multi_tensor_table`).
- :func:`standalone_source`: one complete .cu file (headers, typedefs, the device
  function, ``__global__`` wrappers generated from the elementwise specs the way CuPy
  generates its kernels, and the multi-tensor kernel) so that nvcc can check it all
  without a GPU, and a host compiler can run it on the CPU (tests/test_cupy_kernel.py).

The constants are this step's host values (``Program.constants``: the rule's own Python
arithmetic in float64, rounded once to the compute type), as every derived kernel takes
them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from ._derive import element_code

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

#: Threads per block and elements per chunk of the multi-tensor kernel.
MULTI_TENSOR_BLOCK = 512
MULTI_TENSOR_CHUNK = 65536

#: The element functions a program may call, for float and double (one definition per
#: translation unit, however many programs it holds). ``maximum``/``minimum`` keep a
#: NaN, as numpy.maximum does; ``sign`` keeps a NaN and gives 0 for ±0, as numpy.sign.
HELPERS = r"""
#ifndef POLYOPT_HELPERS
#define POLYOPT_HELPERS
__device__ __forceinline__ float polyopt_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double polyopt_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float polyopt_exp(float x) { return expf(x); }
__device__ __forceinline__ double polyopt_exp(double x) { return exp(x); }
__device__ __forceinline__ float polyopt_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double polyopt_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float polyopt_log(float x) { return logf(x); }
__device__ __forceinline__ double polyopt_log(double x) { return log(x); }
__device__ __forceinline__ float polyopt_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double polyopt_abs(double x) { return fabs(x); }
__device__ __forceinline__ float polyopt_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double polyopt_pow(double x, double y) { return pow(x, y); }
template <typename T>
__device__ __forceinline__ T polyopt_sign(T x) { return x != x ? x : T((x > T(0)) - (x < T(0))); }
template <typename T>
__device__ __forceinline__ T polyopt_maximum(T a, T b) { return (a > b || a != a) ? a : b; }
template <typename T>
__device__ __forceinline__ T polyopt_minimum(T a, T b) { return (a < b || a != a) ? a : b; }
#endif
"""


def _expr(op: str, args: list[str]) -> str:
    """One operation of the element program in C (the compute type is ``C``)."""
    if op in ("+", "-", "*", "/"):
        return f"({args[0]} {op} {args[1]})"
    if op == ">":
        return f"(({args[0]} > {args[1]}) ? C(1) : C(0))"
    if op == "**":
        return f"polyopt_pow({args[0]}, {args[1]})"
    if op == "neg":
        return f"(-{args[0]})"
    if op == "float":  # the arrays' dtype: the compute type already
        return f"({args[0]})"
    return f"polyopt_{op}({', '.join(args)})"


def program_name(key: tuple) -> str:
    """A C identifier for the program ``key`` (its hash: programs differ by structure)."""
    return "polyopt_" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def _slots(key: tuple) -> int:
    return len(key[0])


def n_constants(key: tuple) -> int:
    return element_code(key, _expr)[2]


def device_function(key: tuple) -> str:
    """``{name}_element<C>`` and ``{name}_apply<P, G, C>`` for the program ``key``."""
    name = program_name(key)
    body, outs, n = element_code(key, _expr)
    s = _slots(key)
    consts = "".join(f", const C c{i}" for i in range(n))
    const_args = "".join(f", c{i}" for i in range(n))
    refs = "".join(f", C& x_{j}" for j in range(s))
    lines = [
        f"// one element of the rule's step (program {name}), in the rule's order",
        "template <typename C>",
        f"__device__ __forceinline__ void {name}_element(C& x_p, const C x_g{refs}{consts}) {{",
    ]
    lines += [f"  const C {b};" for b in body]
    targets = ["x_p", *[f"x_{j}" for j in range(s)]]
    # every output first into a temporary: an output may read an input another replaces
    lines += [f"  const C o{i} = {out};" for i, out in enumerate(outs)]
    lines += [f"  {t} = o{i};" for i, t in enumerate(targets)]
    lines.append("}")
    ins = "".join(f", const P& s{j}_in" for j in range(s))
    outs_decl = "".join(f", P& s{j}_out" for j in range(s))
    lines += [
        "// load each array's element in its storage type, update in C, store; in place the",
        "// *_out references are the *_in ones: everything is read before any write",
        "template <typename P, typename G, typename C>",
        f"__device__ __forceinline__ void {name}_apply(",
        f"    const P& p_in, const G& g_in{ins}, P& p_out{outs_decl}{consts}) {{",
        "  C x_p = static_cast<C>(p_in);",
    ]
    lines += [f"  C x_{j} = static_cast<C>(s{j}_in);" for j in range(s)]
    xs = "".join(f", x_{j}" for j in range(s))
    lines.append(f"  {name}_element<C>(x_p, static_cast<C>(g_in){xs}{const_args});")
    lines.append("  p_out = static_cast<P>(x_p);")
    lines += [f"  s{j}_out = static_cast<P>(x_{j});" for j in range(s)]
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ElementwiseSpec:
    """The arguments of one ``cupy.ElementwiseKernel``."""

    name: str
    in_params: str
    out_params: str
    body: str
    preamble: str


def elementwise_preamble(key: tuple, compute: str) -> str:
    """The preamble of the elementwise kernels of one program and compute dtype."""
    return f"typedef {CTYPES[compute]} C;\n" + HELPERS + device_function(key)


def elementwise_spec(key: tuple, inplace: bool, compute: str) -> ElementwiseSpec:
    """In place: inputs ``g`` and the constants, outputs the param and state arrays,
    updated where they are. Pure: the param and state arrays are inputs too (``*_in``)
    and the outputs are new arrays."""
    if compute not in ("float32", "float64"):
        raise ValueError(f"compute must be 'float32' or 'float64', got {compute!r}")
    name, s, n = program_name(key), _slots(key), n_constants(key)
    consts = "".join(f", {compute} c{i}" for i in range(n))
    const_args = "".join(f", c{i}" for i in range(n))
    state = [f"s{j}" for j in range(s)]
    out_params = ", ".join(f"P {x}" for x in ["p", *state])
    outs = "".join(f", {x}" for x in state)
    if inplace:
        in_params = f"G g{consts}"
        body = f"{name}_apply<P, G, C>(p, g{outs}, p{outs}{const_args})"
    else:
        in_params = "P p_in, G g" + "".join(f", P {x}_in" for x in state) + consts
        ins = "".join(f", {x}_in" for x in state)
        body = f"{name}_apply<P, G, C>(p_in, g{ins}, p{outs}{const_args})"
    kind = "inplace" if inplace else "pure"
    return ElementwiseSpec(
        f"{name}_{kind}_{compute}", in_params, out_params, body, elementwise_preamble(key, compute)
    )


def elementwise_specs(key: tuple, compute: str) -> list[ElementwiseSpec]:
    """Both variants (in place, pure) of one program and compute dtype."""
    return [elementwise_spec(key, inplace, compute) for inplace in (True, False)]


# -- the multi-tensor kernel -------------------------------------------------------------


def pointer_tables(key: tuple) -> list[tuple[str, str]]:
    """The multi-tensor kernel's pointer tables ``(name, C type)``, in argument (and
    table) order: each input stream, then each output stream."""
    s = _slots(key)
    ins = [("p_in", "const P* const*"), ("g_in", "const G* const*")]
    ins += [(f"s{j}_in", "const P* const*") for j in range(s)]
    outs = [("p_out", "P* const*")] + [(f"s{j}_out", "P* const*") for j in range(s)]
    return ins + outs


def multi_tensor_params(key: tuple) -> list[tuple[str, str]]:
    """The whole parameter list of the multi-tensor kernel: (C declaration, name)."""
    return (
        [(t, n) for n, t in pointer_tables(key)]
        + [
            ("const long long*", "sizes"),
            ("const long long*", "chunk_tensor"),
            ("const long long*", "chunk_start"),
            ("const long long", "n_chunks"),
            ("const long long", "chunk_size"),
        ]
        + [("const C", f"c{i}") for i in range(n_constants(key))]
    )


def multi_tensor_name(key: tuple, dtype: str) -> str:
    return f"{program_name(key)}_multi_tensor_{dtype}"


def _multi_tensor_kernel(key: tuple, dtype: str) -> str:
    """A list of arrays in one launch. Chunk c covers elements [chunk_start[c],
    chunk_start[c] + chunk_size) of array chunk_tensor[c]; blocks walk the chunks
    (grid-stride), threads the elements of a chunk (block-stride). 64-bit indices
    throughout. In place, the *_out tables equal the *_in tables."""
    s = _slots(key)
    params = ",\n".join(f"    {t} {n}" for t, n in multi_tensor_params(key))
    loads = [f"    const P* s{j}i = s{j}_in[t];" for j in range(s)]
    loads += [f"    P* s{j}o = s{j}_out[t];" for j in range(s)]
    ins = "".join(f", s{j}i[i]" for j in range(s))
    outs = "".join(f", s{j}o[i]" for j in range(s))
    consts = "".join(f", c{i}" for i in range(n_constants(key)))
    return (
        f'extern "C" __global__ void {multi_tensor_name(key, dtype)}(\n{params}) {{\n'
        "  for (long long c = blockIdx.x; c < n_chunks; c += gridDim.x) {\n"
        "    const long long t = chunk_tensor[c];\n"
        "    const long long start = chunk_start[c];\n"
        "    const long long end = start + chunk_size;\n"
        "    const long long stop = end < sizes[t] ? end : sizes[t];\n"
        "    const P* pi = p_in[t];\n"
        "    const G* gi = g_in[t];\n"
        "    P* po = p_out[t];\n"
        + "\n".join(loads)
        + "\n    for (long long i = start + threadIdx.x; i < stop; i += blockDim.x) {\n"
        f"      {program_name(key)}_apply<P, G, C>(pi[i], gi[i]{ins}, po[i]{outs}{consts});\n"
        "    }\n  }\n}\n"
    )


def _typedefs(dtype: str, p_ctype: str | None) -> str:
    p = p_ctype or CUDA_TYPES[dtype][0]
    return f"typedef {p} P;\ntypedef P G;\n"


def _header(dtype: str, header: str | None) -> str:
    return CUDA_TYPES[dtype][1] if header is None else header


def multi_tensor_source(key: tuple, dtype: str) -> str:
    """The ``cupy.RawModule`` source of the multi-tensor kernel for ``dtype`` params."""
    return (
        f"{_header(dtype, None)}\n{_typedefs(dtype, None)}"
        + elementwise_preamble(key, COMPUTE[dtype])  # typedef C, helpers, the device function
        + _multi_tensor_kernel(key, dtype)
    )


@dataclass(frozen=True)
class MultiTensorTable:
    """Everything the multi-tensor kernel reads besides the arrays, in one int64 array
    (one host-to-device copy): the pointer tables, sizes, chunk tensors, chunk starts.
    ``slices`` gives each of those kernel arguments' [start, stop) in ``table``."""

    table: np.ndarray
    slices: tuple[tuple[int, int], ...]
    n_chunks: int
    chunk_size: int


def multi_tensor_table(
    pointers: list[list[int]], sizes: list[int], chunk_size: int = MULTI_TENSOR_CHUNK
) -> MultiTensorTable:
    """The table for arrays of ``sizes`` (all > 0) from their data ``pointers`` (one
    list per pointer table, in :func:`pointer_tables` order)."""
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
    for j, ptrs in enumerate(pointers):
        if len(ptrs) != n:
            raise ValueError(f"pointer table {j}: {len(ptrs)} pointers for {n} arrays")
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
    """``"P p, float32 c0"`` -> ``[("P", "p"), ("float32", "c0")]`` as CuPy reads it: a
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


def standalone_source(
    key: tuple, dtype: str, *, p_ctype: str | None = None, header: str | None = None
) -> str:
    """A complete .cu translation unit for the program ``key`` on ``dtype`` params:
    header, typedefs, the device function, both elementwise kernels as CuPy would
    generate them (from the same spec strings) and the multi-tensor kernel.
    ``p_ctype`` / ``header`` replace the param type and its include (e.g. ``_Float16``
    and no header for a host compiler)."""
    if dtype not in COMPUTE:
        raise ValueError(f"dtype must be one of {sorted(COMPUTE)}, got {dtype!r}")
    compute = COMPUTE[dtype]
    specs = elementwise_specs(key, compute)
    return (
        f"// polyopt kernels of program {program_name(key)} for {dtype} params "
        f"(compute in {compute})\n"
        f"{_header(dtype, header)}\n{_typedefs(dtype, p_ctype)}"
        + elementwise_preamble(key, compute)
        + "\n".join(elementwise_wrapper(s) for s in specs)
        + _multi_tensor_kernel(key, dtype)
    )


def standalone_kernels(key: tuple, dtype: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """``(name, parameter list)`` of every kernel in :func:`standalone_source`."""
    specs = elementwise_specs(key, COMPUTE[dtype])
    return [(s.name, wrapper_params(s)) for s in specs] + [
        (multi_tensor_name(key, dtype), multi_tensor_params(key))
    ]
