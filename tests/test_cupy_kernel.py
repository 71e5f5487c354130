"""The CuPy kernels derived from each rule (backends._cuda_source, backends.cupy).

Every variant below (each optimizer and option) is traced at every step it runs
(:func:`polyopt.backends._derive.program`); its distinct element programs are the
kernels under test. Without a GPU (and without cupy):

- compile: nvcc compiles ``standalone_source(key, dtype)`` (the device function, the
  elementwise kernels wrapped from the very body strings CuPy gets, the multi-tensor
  kernel) of every program, and ``multi_tensor_source(key, dtype)`` (what
  cupy.RawModule gets), for float16, bfloat16, float32 and float64. Where cupy
  imports, CuPy's own code generator also writes the exact ElementwiseKernel sources,
  which nvcc compiles with CuPy's headers, and, where CuPy's NVRTC library loads,
  NVRTC compiles them as CuPy would.
- CPU emulation: the same translation unit, with the CUDA keywords defined away and
  ``blockIdx``/``threadIdx`` as host variables, is built with g++ into a shared library;
  every block and thread of each launch runs in turn (the kernels share nothing between
  threads, so the order does not matter). Each variant runs 20 steps through the three
  launch strategies (one span, multi-tensor tables with several chunks per array and
  fewer blocks than chunks, one launch per array), in place and pure, and is compared
  with polyopt's generic NumPy path: float64 to 1e-12, float32 to 1e-5, float16 (as
  ``_Float16``) to 1e-2, as max|a - b| / max|b| per array and state entry and step.
- the module: polyopt/backends/cupy.py itself, loaded against a stand-in for cupy whose
  kernels are those CPU builds: strategy per layout, pure vs in place, flat state.

With a GPU (marked ``gpu``; skipped without cupy and a device): impl="fused" against
impl="generic" on CuPy for every variant, dtype and shape, the launch strategy each
layout takes (``polyopt.backends.cupy.LAST_PATH``), arrays of more than 2**31 elements.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

import array_api_compat
import numpy as np
import pytest

import polyopt
from polyopt import flat, schedules, testing
from polyopt._base import _at_step
from polyopt.backends import _cuda_source as src

NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
DTYPES = ("float16", "bfloat16", "float32", "float64")
STEPS = 20

#: The variants: (factory, hyperparameters): every optimizer, its options.
VARIANTS = {
    "sgd": (polyopt.sgd, dict(lr=0.05)),
    "sgd_nesterov_l2": (polyopt.sgd, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "sgdw_dampening_maximize": (
        polyopt.sgd,
        dict(
            lr=0.05,
            momentum=0.8,
            dampening=0.3,
            weight_decay=0.1,
            decoupled_weight_decay=True,
            maximize=True,
        ),
    ),
    "adagrad": (
        polyopt.adagrad,
        dict(lr=0.1, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1),
    ),
    "rmsprop_centered_momentum": (
        polyopt.rmsprop,
        dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.05),
    ),
    "adadelta": (polyopt.adadelta, dict(lr=1.0, weight_decay=0.05, maximize=True)),
    "adam": (polyopt.adam, dict(lr=0.02, betas=(0.9, 0.99))),
    "adam_l2": (polyopt.adam, dict(lr=0.02, weight_decay=0.05)),
    "adamw": (polyopt.adamw, dict(lr=0.02, weight_decay=0.1)),
    "amsgrad": (polyopt.adam, dict(lr=0.02, amsgrad=True)),
    "maximize": (polyopt.adam, dict(lr=0.02, maximize=True)),
    "amsgrad_maximize_decay": (
        polyopt.adamw,
        dict(lr=0.02, amsgrad=True, maximize=True, weight_decay=0.1),
    ),
    "amsgrad_maximize_l2": (
        polyopt.adam,
        dict(lr=0.02, amsgrad=True, maximize=True, weight_decay=0.05),
    ),
    "adamw_cosine": (polyopt.adamw, dict(lr=schedules.cosine(0.02, 15), weight_decay=0.1)),
    "nadam_l2": (polyopt.nadam, dict(lr=0.02, weight_decay=0.05)),
    "nadamw_maximize": (
        polyopt.nadam,
        dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    ),
    # β2 = 0.9: the un-rectified steps 1-2, then rectified: two programs
    "radam": (polyopt.radam, dict(lr=0.02, betas=(0.9, 0.9), weight_decay=0.05)),
    "adamax": (polyopt.adamax, dict(lr=0.02, weight_decay=0.05, maximize=True)),
    "lion": (polyopt.lion, dict(lr=0.01, weight_decay=0.1)),
    "schedule_free_adamw": (
        polyopt.schedule_free_adamw,
        dict(lr=0.01, weight_decay=0.05, warmup_steps=5),
    ),
}
#: Variants whose rule branches on the step count on the host: one program per branch.
BRANCHES = {"radam": 2}
#: Normalized error bound (max|a - b| / max|b|) of the kernels against the generic path.
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2}


@functools.cache
def programs(variant: str) -> list:
    """The element program of each of the variant's STEPS steps."""
    from polyopt.backends import _derive

    factory, hp = VARIANTS[variant]
    opt = factory(**hp, impl="generic")
    return [_derive.program(opt.rule, _at_step(opt.hyperparams, k), k + 1) for k in range(STEPS)]


@functools.cache
def all_keys() -> tuple:
    """Every distinct program key of every variant, in a fixed order."""
    keys: dict = {}
    for v in VARIANTS:
        for prog in programs(v):
            keys.setdefault(prog.key, None)
    return tuple(keys)


def combined_source(dtype: str, **kwargs) -> str:
    """One translation unit holding every program's kernels (repeated typedefs of the
    same type are valid C++; the helpers are guarded)."""
    return "\n".join(src.standalone_source(k, dtype, **kwargs) for k in all_keys())


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.size == 0:
        return 0.0
    if not np.all(np.isfinite(a)):
        return float("inf")
    scale = float(np.max(np.abs(b)))
    diff = float(np.max(np.abs(a - b)))
    return diff / scale if scale > 0 else diff


# -- building ---------------------------------------------------------------------------


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _check(result: subprocess.CompletedProcess, what: str, source: Path) -> None:
    assert result.returncode == 0, (
        f"{what} failed ({' '.join(result.args)}), source {source}:\n{result.stderr}"
    )


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cupy_kernel")


def _nvcc(source: str, path: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    path.write_text(source)
    cmd = [NVCC, "-c", *src.OPTIONS, "-arch=sm_80", *extra, "-o", str(path.with_suffix(".o"))]
    return _run(cmd + [str(path)])


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (CUDA toolkit)")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ is not on PATH")


# -- (a) compile checks -----------------------------------------------------------------


@needs_nvcc
@pytest.mark.parametrize("dtype", DTYPES)
def test_standalone_source_compiles_with_nvcc(dtype, build_dir):
    path = build_dir / f"standalone_{dtype}.cu"
    _check(_nvcc(combined_source(dtype), path), "nvcc", path)


@needs_nvcc
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_tensor_module_source_compiles_with_nvcc(dtype, build_dir):
    key = programs("adamw")[1].key
    path = build_dir / f"multi_tensor_{dtype}.cu"
    _check(_nvcc(src.multi_tensor_source(key, dtype), path), "nvcc", path)


def test_standalone_source_is_built_from_the_elementwise_spec_strings():
    """The wrapper nvcc compiles carries the body CuPy gets, verbatim, and every kernel;
    the element math is written once per program, and the program is the rule's."""
    key = programs("adamw")[1].key
    name = src.program_name(key)
    text = src.standalone_source(key, "float32")
    for spec in src.elementwise_specs(key, "float32"):
        assert spec.body in text and f"void {spec.name}(" in text
        assert spec.preamble in text
    assert text.count(f"__forceinline__ void {name}_element(") == 1  # math: once
    assert f"void {src.multi_tensor_name(key, 'float32')}(" in text
    assert text.count("polyopt_sqrt(") >= 3  # the rule's sqrt (and its two definitions)
    with pytest.raises(ValueError, match="dtype must be one of"):
        src.standalone_source(key, "int32")


def test_every_optimizer_has_one_program_for_all_its_steps():
    """Every optimizer is among the variants, and each variant is one program over its
    steps: the count, schedules and bias corrections enter as constants (one compilation
    per run; RAdam's un-rectified first steps are a second), and distinct options make
    distinct programs."""
    names = {polyopt.OPTIMIZERS[f][0]().rule.name for f in testing.ELEMENTWISE}
    traced = {VARIANTS[v][0]().rule.name for v in VARIANTS}
    assert names <= traced
    for v in VARIANTS:
        assert len({p.key for p in programs(v)}) == BRANCHES.get(v, 1), v
    assert programs("adamw_cosine")[0].key == programs("adamw")[0].key  # a schedule: constants


def _cupy_generated_sources(dtype: str) -> tuple[str, tuple[str, ...]]:
    """The ElementwiseKernel sources exactly as CuPy writes them for ``dtype`` arrays
    (its private code generator, no device needed) and the include options CuPy uses."""
    import cupy
    from cupy._core import _carray, _scalar, core
    from cupy._core import _kernel as K

    if dtype == "bfloat16":
        import ml_dtypes

        np_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        np_dtype = np.dtype(dtype)
    A = K._ArgInfo
    # CuPy compiles each kernel alone, after its headers; here the four share one file,
    # each in its own namespace (the headers it names are included first, once).
    headers = list(core._cupy_header_list) + ["cupy/float16.cuh"]
    headers += ["cupy/bfloat16.cuh"] if dtype == "bfloat16" else []
    parts = ["".join(f"#include <{h}>\n" for h in headers)]
    specs = [s for key in all_keys()[:4] for s in src.elementwise_specs(key, src.COMPUTE[dtype])]
    for i, spec in enumerate(specs):
        kern = cupy.ElementwiseKernel(
            spec.in_params, spec.out_params, spec.body, spec.name, preamble=spec.preamble
        )
        ins, outs = kern.in_params, kern.out_params
        in_arrays = tuple(np_dtype if p.dtype is None else None for p in ins)
        in_types, out_types, type_map = K._decide_params_type(
            ins, outs, in_arrays, tuple(np_dtype for _ in outs)
        )
        arginfos = tuple(
            A(1, cupy.ndarray, t, 1, True, True)
            if p.dtype is None
            else A(3, _scalar.CScalar, t, 0, True, True)
            for p, t in zip(ins, in_types)
        )
        arginfos += tuple(A(1, cupy.ndarray, t, 1, True, True) for t in out_types)
        arginfos += (A(2, _carray.Indexer, None, 1, True, True),)
        code = K._get_elementwise_kernel_code(
            arginfos, type_map, kern.params, spec.body, spec.name, spec.preamble
        )
        parts.append(f"namespace variant{i} {{\n{code}\n}}")
    includes = core._get_cccl_include_options() + (f"-I{core._get_header_dir_path()}",)
    return "\n".join(parts), includes


@needs_nvcc
@pytest.mark.parametrize("dtype", DTYPES)
def test_cupy_generated_elementwise_code_compiles(dtype, build_dir):
    """Needs cupy importable (not a GPU): its generator decides the placeholder types
    (P, G from the arrays; scalars typed by the compute dtype) and writes the kernels."""
    pytest.importorskip("cupy")
    if dtype == "bfloat16" and importlib.util.find_spec("ml_dtypes") is None:
        pytest.skip("CuPy has bfloat16 arrays only with ml_dtypes installed")
    try:
        code, includes = _cupy_generated_sources(dtype)
    except (AttributeError, TypeError, ImportError) as e:  # a private API that moved
        pytest.skip(f"CuPy's kernel code generator is not reachable here: {e!r}")
    assert "typedef float C;" in code or "typedef double C;" in code
    path = build_dir / f"cupy_generated_{dtype}.cu"
    _check(_nvcc(code, path, includes), "nvcc on CuPy's generated code", path)


def _nvrtc_reason() -> str | None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # cupy missing, or no libnvrtc for its CUDA version
        return f"NVRTC is not loadable here ({type(e).__name__}: {e})"
    return None


@pytest.mark.parametrize("dtype", DTYPES)
def test_cupy_sources_compile_with_nvrtc(dtype):
    """What CuPy itself compiles with: NVRTC (a library, no GPU needed), CuPy's include
    options, the generated elementwise code and the RawModule source, for sm_80."""
    pytest.importorskip("cupy")
    reason = _nvrtc_reason()
    if reason:
        pytest.skip(reason)
    if dtype == "bfloat16" and importlib.util.find_spec("ml_dtypes") is None:
        pytest.skip("CuPy has bfloat16 arrays only with ml_dtypes installed")
    from cupy._core import core
    from cupy.cuda import compiler

    try:
        options = core.assemble_cupy_compiler_options(src.OPTIONS)
        code, _ = _cupy_generated_sources(dtype)
    except (AttributeError, TypeError, ImportError, RuntimeError) as e:
        pytest.skip(f"CuPy's compiler setup is not reachable here: {e!r}")
    options += ("--gpu-architecture=compute_80",)
    multi = src.multi_tensor_source(programs("adamw")[1].key, dtype)
    for what, source in [("elementwise", code), ("multi-tensor", multi)]:
        try:
            ptx, _ = compiler._NVRTCProgram(source, f"{what}.cu").compile(options)
        except compiler.CompileException as e:
            pytest.fail(f"NVRTC rejects the {what} source for {dtype}:\n{e}")
        assert b".entry" in (ptx if isinstance(ptx, bytes) else ptx.encode())


def test_a_compute_placeholder_would_not_resolve_in_cupy():
    """Why C is a typedef: CuPy infers placeholders from arrays only."""
    pytest.importorskip("cupy")
    from cupy._core import _kernel as K

    ins = K._get_param_info("P g, C lr", True)
    outs = K._get_param_info("P p", False)
    with pytest.raises(KeyError):
        K._decide_params_type(ins, outs, (np.dtype("float16"), None), (np.dtype("float16"),))


# -- (b) the kernels on the CPU ----------------------------------------------------------

HOST_PRELUDE = r"""
// CPU emulation of the CUDA kernels: keywords away, launch indices as host variables.
#include <math.h>
#define __device__
#define __forceinline__ inline
#define __global__
struct polyopt_dim3 { unsigned int x, y, z; };
static polyopt_dim3 threadIdx, blockIdx, blockDim, gridDim;
"""

CTYPE = {
    "const float": ctypes.c_float,
    "const double": ctypes.c_double,
    "const int": ctypes.c_int,
    "const long long": ctypes.c_longlong,
    "const C": None,  # the compute type: resolved per dtype
}
HOST_TYPES = {"float16": "_Float16", "float32": "float", "float64": "double"}


def host_source(dtype: str) -> str:
    """standalone_source(dtype) for a host compiler, plus one launcher per kernel that
    runs every (block, thread) of a launch in turn."""
    out = [HOST_PRELUDE, combined_source(dtype, p_ctype=HOST_TYPES[dtype], header="")]
    for name, params in (k for key in all_keys() for k in src.standalone_kernels(key, dtype)):
        decls = ", ".join(f"{t} {n}" for t, n in params)
        args = ", ".join(n for _, n in params)
        out.append(
            f'extern "C" void host_{name}(unsigned int grid, unsigned int block, {decls}) {{\n'
            "  gridDim.x = grid; blockDim.x = block;\n"
            "  for (unsigned int b = 0; b < grid; ++b)\n"
            "    for (unsigned int t = 0; t < block; ++t) {\n"
            f"      blockIdx.x = b; threadIdx.x = t; {name}({args});\n"
            "    }\n}\n"
        )
    return "\n".join(out)


class HostKernels:
    """The kernels of one dtype, compiled for the CPU, called with named arguments."""

    def __init__(self, dtype: str, lib: ctypes.CDLL):
        self.dtype = dtype
        self.compute = src.COMPUTE[dtype]
        self.np_dtype = np.float16 if dtype == "float16" else np.dtype(dtype).type
        c = ctypes.c_float if self.compute == "float32" else ctypes.c_double
        self.fns, self.params = {}, {}
        kernels = [k for key in all_keys() for k in src.standalone_kernels(key, dtype)]
        for name, params in kernels:
            fn = getattr(lib, f"host_{name}")
            types = [ctypes.c_uint, ctypes.c_uint]
            for t, _ in params:
                types.append(ctypes.c_void_p if "*" in t else (CTYPE[t] or c))
            self.params[name] = params
            fn.argtypes, fn.restype = types, None
            self.fns[name] = (fn, params)

    def __call__(self, name: str, grid: int, block: int, values: dict) -> None:
        fn, params = self.fns[name]
        args = []
        for _, n in params:
            v = values[n]
            args.append(v.ctypes.data if isinstance(v, np.ndarray) else v)
        fn(grid, block, *args)


@pytest.fixture(scope="session")
def host_kernels(build_dir):
    """dtype -> HostKernels (or the reason it cannot be built), built once per session."""
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    built = {}
    for dtype in HOST_TYPES:
        cpp = build_dir / f"host_{dtype}.cpp"
        so = cpp.with_suffix(".so")
        cpp.write_text(host_source(dtype))
        flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
        r = _run([GXX, *flags, "-o", str(so), str(cpp)])
        if r.returncode != 0:
            if dtype == "float16":  # _Float16 needs GCC >= 12 on x86-64
                built[dtype] = f"g++ has no _Float16: {r.stderr[:300]}"
                continue
            _check(r, "g++ (CPU emulation)", cpp)
        built[dtype] = HostKernels(dtype, ctypes.CDLL(str(so)))
    return built


SHAPES = [(), (1,), (7,), (3, 5), (0,), (33,), (2, 3, 4)]


@functools.cache
def problem(dtype: str):
    """params and STEPS lists of grads, NumPy, rounded to ``dtype`` (changing scales,
    zeros, and a step where some gradients are large)."""
    rng = np.random.default_rng(7)
    p0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    gs = []
    for k in range(STEPS):
        g = [(10 ** rng.uniform(-2, 0.5) * rng.standard_normal(s)).astype(dtype) for s in SHAPES]
        if k % 5 == 2:
            g[2][::2] = 0
        gs.append(g)
    return p0, gs


@functools.cache
def generic_run(variant: str, dtype: str):
    """polyopt's generic NumPy path: [(params, slots)] after each step (slots as
    ``{name: [array per param]}``, copies)."""
    factory, hp = VARIANTS[variant]
    opt = factory(**hp, impl="generic")
    p0, gs = problem(dtype)
    params = [p.copy() for p in p0]
    state = opt.init(params)
    out = []
    for g in gs:
        params, state = opt.update(params, g, state)
        out.append(
            (
                [p.copy() for p in params],
                {n: [a.copy() for a in arrays] for n, arrays in state.slots.items()},
            )
        )
    return opt.hyperparams, opt.rule, out


def emulate(kern: HostKernels, variant: str, strategy: str, inplace: bool):
    """Run the kernels as polyopt.backends.cupy launches them; yield (params, slots) per
    step, slots as ``{name: [array per param]}``. Pure steps must leave their inputs
    untouched (checked here)."""
    hp, rule, _ = generic_run(variant, kern.dtype)
    p0, gs = problem(kern.dtype)
    names = rule.slots(hp)
    sizes = [int(np.prod(s, dtype=np.int64)) for s in SHAPES]
    dt = kern.np_dtype

    def new():  # one flat buffer and its views, like flat.empty_views
        buf = np.zeros(sum(sizes), dtype=dt)
        views, start = [], 0
        for s, n in zip(SHAPES, sizes):
            views.append(buf[start : start + n].reshape(s))
            start += n
        return buf, views

    pbuf, params = new()
    for v, p in zip(params, p0):
        v[...] = p
    if strategy != "span":  # separate arrays (not one buffer)
        params = [p.copy() for p in params]
    init = rule.init_slots([np.asarray(p, np.float64) for p in p0], hp, np)
    state = {}  # fused init: flat state, the rule's initial values
    for j, n in enumerate(names):
        buf, views = new()
        for v, x in zip(views, init[n]):
            v[...] = x
        state[f"s{j}"] = (buf, views)
    for k, g_list in enumerate(gs):
        prog = programs(variant)[k]
        assert prog.names == tuple(names)
        consts = prog.constants(np.float32 if kern.compute == "float32" else np.float64)
        values = {f"c{i}": float(c) for i, c in enumerate(consts)}
        gbuf, grads = new()
        for v, g in zip(grads, g_list):
            v[...] = g
        before = (
            [p.copy() for p in params],
            {n: b.copy() for n, (b, _) in state.items()},
        )
        if inplace:
            out_p, out_state = params, state
        else:
            out_p = new()[1] if strategy != "span" else None
            out_state = {n: new() for n in state}
        name = src.elementwise_spec(prog.key, inplace, kern.compute).name
        if strategy == "span":
            if inplace:
                arrays = {"_raw_p": pbuf, "_raw_g": gbuf} | {
                    f"_raw_{n}": b for n, (b, _) in state.items()
                }
            else:
                obuf, out_p = new()
                arrays = {"_raw_p_in": pbuf, "_raw_g": gbuf, "_raw_p": obuf}
                arrays |= {f"_raw_{n}_in": b for n, (b, _) in state.items()}
                arrays |= {f"_raw_{n}": b for n, (b, _) in out_state.items()}
            kern(name, 3, 5, values | arrays | {"_n": sum(sizes)})
        elif strategy == "elementwise":
            for i, n_el in enumerate(sizes):
                if n_el == 0:
                    continue  # zero-size: no launch
                st = {n: views[i] for n, (_, views) in state.items()}
                if inplace:
                    arrays = {"_raw_p": params[i], "_raw_g": grads[i]}
                    arrays |= {f"_raw_{n}": a for n, a in st.items()}
                else:
                    arrays = {"_raw_p_in": params[i], "_raw_g": grads[i], "_raw_p": out_p[i]}
                    arrays |= {f"_raw_{n}_in": a for n, a in st.items()}
                    arrays |= {f"_raw_{n}": out_state[n][1][i] for n in st}
                kern(name, 2, 4, values | arrays | {"_n": n_el})
        else:  # multi_tensor
            idx = [i for i, n_el in enumerate(sizes) if n_el > 0]

            def ptr(arrays, idx=idx):
                return [arrays[i].ctypes.data for i in idx]

            pointers = [ptr(params), ptr(grads), *[ptr(v) for _, v in state.values()]]
            pointers += [ptr(out_p), *[ptr(v) for _, v in out_state.values()]]
            tbl = src.multi_tensor_table(pointers, [sizes[i] for i in idx], chunk_size=5)
            params_list = src.multi_tensor_params(prog.key)
            tables = {name: tbl.table[a:b] for (_, name), (a, b) in zip(params_list, tbl.slices)}
            # (the slices are views into one table: HostKernels passes their addresses)
            values = values | tables | {"n_chunks": tbl.n_chunks, "chunk_size": tbl.chunk_size}
            assert tbl.n_chunks > 3  # fewer blocks than chunks: blocks walk the table
            kern(src.multi_tensor_name(prog.key, kern.dtype), 3, 4, values)
        if not inplace:  # pure: inputs untouched
            for a, b in zip(params, before[0]):
                np.testing.assert_array_equal(a, b)
            for n, (b, _) in state.items():
                np.testing.assert_array_equal(b, before[1][n])
            params, state = out_p, out_state
            if strategy == "span":
                pbuf = obuf
        yield (
            [p.copy() for p in params],
            {names[j]: [v.copy() for v in state[f"s{j}"][1]] for j in range(len(names))},
        )


MAX_ERRORS: dict[tuple, float] = {}


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("strategy", ["span", "multi_tensor", "elementwise"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernels_on_cpu_match_the_generic_path(variant, dtype, strategy, inplace, host_kernels):
    kern = host_kernels[dtype]
    if isinstance(kern, str):
        pytest.skip(kern)
    _, _, expected = generic_run(variant, dtype)
    worst, where = 0.0, ""
    for k, ((gp, gsl), (ep, esl)) in enumerate(
        zip(emulate(kern, variant, strategy, inplace), expected, strict=True)
    ):
        checks = [(f"params[{i}]", a, b) for i, (a, b) in enumerate(zip(gp, ep))]
        assert set(gsl) == set(esl), (sorted(gsl), sorted(esl))
        for n, arrays in esl.items():
            assert len(gsl[n]) == len(arrays) == len(SHAPES), (n, len(gsl[n]), len(arrays))
            checks += [(f"state[{n!r}][{i}]", a, b) for i, (a, b) in enumerate(zip(gsl[n], arrays))]
        for what, a, b in checks:
            assert a.dtype == b.dtype, f"{what}: dtype {a.dtype}, expected {b.dtype}"
            e = rel_error(a, b)
            if not e <= worst:
                worst, where = e, f"{what} after step {k + 1}"
    MAX_ERRORS[(variant, dtype, strategy, inplace)] = worst
    print(
        f"\n{variant} {dtype} {strategy} {'inplace' if inplace else 'pure'}: max error {worst:.3g}"
    )
    assert worst <= TOL[dtype], f"error {worst:.3g} > {TOL[dtype]:g} at {where}"


def test_multi_tensor_table_chunks_cover_every_element_once():
    sizes = [1, 5, 11, 2**33 + 3]  # 64-bit sizes and offsets
    tbl = src.multi_tensor_table([[8, 16, 24, 32], [0, 0, 0, 0]], sizes, chunk_size=2**32)
    tensor, start, size, p_in = (tbl.table[slice(*tbl.slices[i])] for i in (3, 4, 2, 0))
    assert tensor.tolist() == [0, 1, 2, 3, 3, 3]
    assert start.tolist() == [0, 0, 0, 0, 2**32, 2**33]
    assert size.tolist() == sizes
    assert p_in.tolist() == [8, 16, 24, 32]
    with pytest.raises(ValueError, match="size > 0"):
        src.multi_tensor_table([[1, 2]], [3, 0])
    with pytest.raises(ValueError, match="2 pointers for 3 arrays"):
        src.multi_tensor_table([[1, 2]], [3, 1, 1])


# -- (b') polyopt.backends.cupy itself on the CPU ------------------------------------------
#
# The module's launch logic (which strategy, pointer tables, pure outputs, flat state)
# runs here against a stand-in for cupy: NumPy arrays that have .data.ptr and .device,
# and kernels that are the CPU builds above (called the way CuPy would call them).


class _Device:
    id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeCupyArray(np.ndarray):
    """A NumPy array with the attributes polyopt.backends.cupy reads from cupy arrays."""

    @property
    def data(self):  # cupy: a MemoryPointer with .ptr
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return _Device()


class FakeXP:
    """The array-API NumPy namespace, making FakeCupyArrays."""

    def __getattr__(self, name):
        import array_api_compat.numpy as xp

        return getattr(xp, name)

    @staticmethod
    def empty(shape, dtype=None, device=None):
        return np.empty(shape, dtype=dtype).view(FakeCupyArray)


def fake_cupy(host: dict) -> types.ModuleType:
    """cupy with ElementwiseKernel / RawModule / asarray, running the CPU builds."""

    def pointer_args(params, values):
        out = {}
        for t, n in params:
            v = values[n]
            out[n] = (
                v
                if isinstance(v, np.ndarray)
                else (int(v) if "int" in t or "long" in t else float(v))
            )
        return out

    class ElementwiseKernel:
        def __init__(self, in_params, out_params, body, name, **kwargs):
            self.ins = src.parse_params(in_params)
            self.outs = src.parse_params(out_params)
            self.name = name

        def __call__(self, *args):
            names = [n for _, n in self.ins + self.outs]
            assert len(args) == len(names), (self.name, len(args), len(names))
            arrays = {n: a for n, a in zip(names, args) if isinstance(a, np.ndarray)}
            shape = next(iter(arrays.values())).shape
            assert all(a.shape == shape for a in arrays.values())
            dtype = next(a.dtype.name for n, a in arrays.items())
            kern = host[dtype]
            # CuPy indexes any strides; the CPU build takes contiguous 1-D: copy in and out
            tmp = {n: np.array(a, order="C", copy=True) for n, a in arrays.items()}
            values = {}
            for (t, n), a in zip(self.ins + self.outs, args):
                if n in tmp:
                    values[f"_raw_{n}"] = tmp[n]
                else:
                    values[n] = float(a) if "float" in t else int(a)
            values["_n"] = int(np.prod(shape, dtype=np.int64))
            kern(self.name, 3, 5, values)
            for _, n in self.outs:
                arrays[n][...] = tmp[n]
            CALLS.append(("elementwise", self.name))

    class RawModule:
        def __init__(self, code, options=()):
            self.code = code

        def get_function(self, name):
            dtype = name.rsplit("_", 1)[-1]
            assert name in self.code

            def launch(grid, block, args):
                params = host[dtype].params[name]
                assert len(args) == len(params)
                values = {}
                for (t, n), a in zip(params, args):
                    values[n] = (
                        a if isinstance(a, np.ndarray) else (float(a) if "C" in t else int(a))
                    )
                host[dtype](name, min(grid[0], 7), block[0] // 64, values)
                CALLS.append(("multi_tensor", name))

            return launch

    mod = types.ModuleType("cupy")
    mod.ElementwiseKernel, mod.RawModule = ElementwiseKernel, RawModule
    mod.asarray = lambda a: np.array(a, copy=True)
    return mod


CALLS: list = []


@pytest.fixture(scope="module")
def cupy_on_cpu(host_kernels):
    """polyopt/backends/cupy.py loaded against the stand-in (FUSED left as it was)."""
    from polyopt import backends

    if any(isinstance(k, str) for k in host_kernels.values()):
        pytest.skip("needs the float16 CPU build too")
    path = Path(backends.__file__).with_name("cupy.py")
    saved_fused, saved_cupy = dict(backends.FUSED), sys.modules.get("cupy")
    sys.modules["cupy"] = fake_cupy(host_kernels)
    try:
        spec = importlib.util.spec_from_file_location("polyopt.backends._cupy_on_cpu", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved_cupy is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved_cupy
        backends.FUSED.clear()
        backends.FUSED.update(saved_fused)
    return module


def _fake_arrays(layout: str, dtype: str, rng) -> list:
    shapes = {
        "flat": [(3, 4), (), (0,), (5,)],
        "list": [(3, 4), (), (0,), (5,), (70,)],
        "single": [(9,)],
        "strided": [(4, 6)],
        "empty": [(0,), (2, 0)],
    }[layout]
    values = [rng.standard_normal(s).astype(dtype) for s in shapes]
    if layout == "flat":
        out = flat.empty_views(FakeXP(), shapes, np.dtype(dtype))
    elif layout == "strided":
        out = [FakeXP.empty((4, 12), np.dtype(dtype))[:, ::2]]
    else:
        out = [FakeXP.empty(s, np.dtype(dtype)) for s in shapes]
    for o, v in zip(out, values):
        o[...] = v
    return out


LAYOUT_PATH = {
    "flat": ("span",),
    "list": ("multi_tensor",),
    "single": ("span",),
    "strided": ("elementwise",),
    "empty": (),
}


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("layout", list(LAYOUT_PATH))
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize(
    "variant", ["adamw", "amsgrad_maximize_l2", "adamw_cosine", "sgd_nesterov_l2", "adagrad"]
)
def test_cupy_module_launch_logic_on_cpu(variant, dtype, layout, inplace, cupy_on_cpu):
    mod, xp = cupy_on_cpu, FakeXP()
    factory, hp0 = VARIANTS[variant]
    opt = factory(**hp0, impl="generic")
    hp, rule = opt.hyperparams, opt.rule
    rng = np.random.default_rng(11)
    params = _fake_arrays(layout, dtype, rng)
    ref_p = [np.array(p, copy=True) for p in params]
    ref_state = opt.init(ref_p)
    slots = mod.init(rule, xp, params, hp)
    assert set(slots) == set(rule.slots(hp))  # {name: one array per param}
    for name in rule.slots(hp):  # the state is flat and holds the rule's initial values
        views = slots[name]
        assert len(views) == len(params)
        assert all(isinstance(v, FakeCupyArray) for v in views)
        for v, r in zip(views, ref_state.slots[name]):
            np.testing.assert_array_equal(np.asarray(v), r)
        assert flat.span(views) is not None or not any(v.size for v in views)
    for k in range(STEPS):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        if layout == "flat":
            g_views = flat.empty_views(FakeXP(), [p.shape for p in params], np.dtype(dtype))
            for v, g in zip(g_views, grads):
                v[...] = g
            grads_in = g_views
        else:
            grads_in = [g.view(FakeCupyArray) for g in grads]
        before = (
            [np.array(p, copy=True) for p in params],
            {n: [np.array(a, copy=True) for a in arrays] for n, arrays in slots.items()},
        )
        CALLS.clear()
        new_p, new_slots = mod.step(rule, xp, params, grads_in, slots, _at_step(hp, k), k, inplace)
        path = LAYOUT_PATH[layout]
        if not inplace and k > 0 and layout == "strided":
            path = ("span",)  # the pure step's outputs are flat: the next step is one span
        assert mod.LAST_PATH == path
        assert len(CALLS) == len(path)  # the launches it says it made
        assert set(new_slots) == set(slots)
        if inplace:
            assert all(a is b for a, b in zip(new_p, params))
            for n, arrays in slots.items():
                assert len(new_slots[n]) == len(arrays)
                assert all(a is b for a, b in zip(new_slots[n], arrays))
        else:
            for a, b in zip(params, before[0]):
                np.testing.assert_array_equal(a, b)
            for n, arrays in before[1].items():
                for a, b in zip(slots[n], arrays, strict=True):
                    np.testing.assert_array_equal(a, b)
            assert all(a is not b for a, b in zip(new_p, params))
        params, slots = new_p, new_slots
        ref_p, ref_state = opt.update(ref_p, grads, ref_state)
        for i, (a, b) in enumerate(zip(params, ref_p)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert rel_error(a, b) <= TOL[dtype], f"params[{i}] step {k + 1}"
        assert set(slots) == set(ref_state.slots)
        for n, arrays in ref_state.slots.items():
            assert len(slots[n]) == len(arrays)
            for i, (a, b) in enumerate(zip(slots[n], arrays)):
                assert rel_error(a, b) <= TOL[dtype], f"state[{n}][{i}] step {k + 1}"


def test_cupy_module_falls_back_to_the_generic_rule_for_an_array_step(cupy_on_cpu):
    mod, xp = cupy_on_cpu, FakeXP()
    opt = polyopt.adam(lr=0.1, impl="generic")
    params = [FakeXP.empty((3,), np.dtype("float32"))]
    params[0][...] = 1.0
    slots = mod.init(opt.rule, xp, params, opt.hyperparams)
    grads = [np.full(3, 0.5, np.float32).view(FakeCupyArray)]
    new_p, _ = mod.step(opt.rule, xp, params, grads, slots, opt.hyperparams, np.asarray(0), False)
    assert mod.LAST_PATH == ("generic",)
    ref, _ = opt.update(
        [np.ones(3, np.float32)], [np.full(3, 0.5, np.float32)], opt.init([np.ones(3, np.float32)])
    )
    np.testing.assert_allclose(np.asarray(new_p[0]), ref[0], rtol=1e-6)


# -- the module without a GPU -------------------------------------------------------------


def test_cupy_module_imports_and_registers_without_a_gpu():
    pytest.importorskip("cupy")
    from polyopt import backends
    from polyopt.backends import cupy as fused

    for factory, _ in polyopt.OPTIMIZERS.values():  # every rule: the derived path
        assert backends.lookup(factory().rule, "cupy", "auto").init is fused.init
    assert not fused.ELEMENTWISE  # built on first use, per program


def test_benchmark_script_runs_its_help_and_refuses_without_a_gpu():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_adamw.py"
    r = _run([sys.executable, str(script), "--help"])
    assert r.returncode == 0 and "torch.optim.AdamW(fused=True)" in r.stdout, r.stderr
    if CUPY is not None:  # no GPU here: a clear message, status 2, nothing measured
        r = _run([sys.executable, str(script), "--case", "small"])
        assert r.returncode == 2 and "no GPU to benchmark on" in r.stderr, r.stderr


# -- (c) on a GPU -----------------------------------------------------------------------


def _cupy_reason() -> str | None:
    """Why CuPy cells cannot run here: the conformance matrix's own check."""
    return next(b for b in testing.BACKENDS if b.name == "cupy").missing()


CUPY = _cupy_reason()
GPU_SHAPES = [(), (0,), (1,), (7,), (1023,), (3, 5), (2**20 + 3,)]
GPU_TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2}


def _gpu_run(variant, dtype, shape, impl, form, steps=STEPS, layout="list"):
    """[(params, slots)] as NumPy after each step, slots as ``{name: [array per param]}``;
    pure form: inputs must not change."""
    import cupy as cp

    from polyopt import flat

    factory, hp = VARIANTS[variant]
    rng = np.random.default_rng(3)
    shapes = [shape, (4,), shape] if layout != "one" else [shape]
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    gs = [
        [(10 ** rng.uniform(-2, 0.5) * rng.standard_normal(s)).astype(dtype) for s in shapes]
        for _ in range(steps)
    ]
    params = [cp.asarray(p) for p in p0]
    if layout == "flat":
        params = flat.pack(params)
    out = []
    if form == "stateful":
        cls = next(c for f, c in polyopt.OPTIMIZERS.values() if f is factory)
        opt = cls(params, **hp, impl=impl)
        for g in gs:
            if layout == "flat":
                grads = flat.zeros_like(params)
                for v, x in zip(grads, g):
                    v[...] = cp.asarray(x)
            else:
                grads = [cp.asarray(x) for x in g]
            opt.step(grads)
            out.append(
                (
                    [p.get() for p in params],
                    {n: [a.get() for a in arrays] for n, arrays in opt.state.slots.items()},
                )
            )
    else:
        opt = factory(**hp, impl=impl)
        state = opt.init(params)
        for g in gs:
            grads = [cp.asarray(x) for x in g]
            before = (
                [p.get() for p in params],
                {n: [a.get() for a in arrays] for n, arrays in state.slots.items()},
            )
            new_params, new_state = opt.update(params, grads, state)
            for a, b in zip(params, before[0]):
                np.testing.assert_array_equal(a.get(), b, err_msg="pure update changed params")
            for n, arrays in before[1].items():
                for a, b in zip(state.slots[n], arrays, strict=True):
                    np.testing.assert_array_equal(a.get(), b, err_msg="pure update changed state")
            params, state = new_params, new_state
            out.append(
                (
                    [p.get() for p in params],
                    {n: [a.get() for a in arrays] for n, arrays in state.slots.items()},
                )
            )
    return out


def _compare(got, expected, tol):
    worst = 0.0
    for (gp, gsl), (ep, esl) in zip(got, expected, strict=True):
        for a, b in zip(gp, ep):
            assert a.dtype == b.dtype
            worst = max(worst, rel_error(a, b))
        assert set(gsl) == set(esl)
        for n, arrays in esl.items():
            assert len(gsl[n]) == len(arrays)
            for a, b in zip(gsl[n], arrays):
                worst = max(worst, rel_error(a, b))
    assert worst <= tol, f"error {worst:.3g} > {tol:g}"
    return worst


@pytest.mark.parametrize("form", ["stateful", "functional"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.gpu
@pytest.mark.skipif(CUPY is not None, reason=str(CUPY))
def test_gpu_fused_matches_generic(variant, dtype, shape, form):
    steps = 5 if shape == (2**20 + 3,) else STEPS
    expected = _gpu_run(variant, dtype, shape, "generic", form, steps)
    got = _gpu_run(variant, dtype, shape, "fused", form, steps)
    _compare(got, expected, GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(CUPY is not None, reason=str(CUPY))
@pytest.mark.parametrize("variant", ["adamw", "amsgrad_maximize_decay"])
def test_gpu_flat_layout_takes_one_span_launch(variant):
    from polyopt.backends import cupy as fused

    expected = _gpu_run(variant, "float32", (5, 3), "generic", "stateful", layout="flat")
    got = _gpu_run(variant, "float32", (5, 3), "fused", "stateful", layout="flat")
    assert fused.LAST_PATH == ("span",)
    _compare(got, expected, GPU_TOL["float32"])


@pytest.mark.gpu
@pytest.mark.skipif(CUPY is not None, reason=str(CUPY))
@pytest.mark.parametrize("inplace", [True, False])
def test_gpu_thousand_small_arrays_take_one_multi_tensor_launch(inplace):
    import cupy as cp

    from polyopt.backends import cupy as fused

    rng = np.random.default_rng(5)
    shapes = [
        (int(rng.integers(0, 300)),) if i % 3 else (2, int(rng.integers(1, 9))) for i in range(1000)
    ]
    shapes[10] = ()
    p0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    gs = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    results = {}
    for impl in ("generic", "fused"):
        params = [cp.asarray(p) for p in p0]
        if inplace:
            opt = polyopt.AdamW(params, lr=0.01, weight_decay=0.1, amsgrad=True, impl=impl)
            for g in gs:
                opt.step([cp.asarray(x) for x in g])
            results[impl] = ([p.get() for p in params], opt.state.slots)
        else:
            opt = polyopt.adamw(lr=0.01, weight_decay=0.1, amsgrad=True, impl=impl)
            state = opt.init(params)
            for g in gs:
                params, state = opt.update(params, [cp.asarray(x) for x in g], state)
            results[impl] = ([p.get() for p in params], state.slots)
        if impl == "fused":
            assert fused.LAST_PATH == ("multi_tensor",)
    for a, b in zip(results["fused"][0], results["generic"][0]):
        assert rel_error(a, b) <= 1e-5
    fused_slots, generic_slots = results["fused"][1], results["generic"][1]
    assert set(fused_slots) == set(generic_slots)
    for n, arrays in generic_slots.items():
        assert len(fused_slots[n]) == len(arrays) == len(shapes)
        for a, b in zip(fused_slots[n], arrays):
            assert rel_error(a.get(), b.get()) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(CUPY is not None, reason=str(CUPY))
def test_gpu_strided_and_mixed_dtype_arrays_take_per_array_launches():
    import cupy as cp

    from polyopt.backends import cupy as fused

    rng = np.random.default_rng(6)
    base = [rng.standard_normal((6, 8)).astype(np.float32), rng.standard_normal(5)]
    gs = [[rng.standard_normal(b.shape).astype(b.dtype) for b in base] for _ in range(4)]
    results = {}
    for impl in ("generic", "fused"):
        buf = cp.zeros((6, 16), dtype=cp.float32)
        strided = buf[:, ::2]
        strided[...] = cp.asarray(base[0])
        params = [strided, cp.asarray(base[1])]  # float32 strided + float64
        opt = polyopt.Adam(params, lr=0.05, impl=impl)
        for g in gs:
            opt.step([cp.asarray(x) for x in g])
        results[impl] = [p.get() for p in params]
        if impl == "fused":
            assert fused.LAST_PATH == ("elementwise", "elementwise")
            assert opt.params[0] is strided  # in place, the user's view
            assert bool(cp.all(buf[:, 1::2] == 0))  # and nothing outside it
    for a, b in zip(results["fused"], results["generic"]):
        assert rel_error(a, b) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(CUPY is not None, reason=str(CUPY))
def test_gpu_auto_uses_the_fused_path_and_array_lr_falls_back():
    import cupy as cp

    from polyopt.backends import cupy as fused

    params = [cp.ones(10, dtype=cp.float32), cp.ones(3, dtype=cp.float32)]
    opt = polyopt.AdamW(params)  # impl="auto"
    opt.step([cp.full(10, 0.5, dtype=cp.float32), cp.ones(3, dtype=cp.float32)])
    assert fused.LAST_PATH in {("span",), ("multi_tensor",)}
    # an lr that is an array is not a host float64: the fused step runs the generic rule
    hp = {**opt.param_groups[0], "lr": cp.asarray(1e-3)}
    hp.pop("params")
    grads = [cp.ones(10, dtype=cp.float32), cp.ones(3, dtype=cp.float32)]
    xp = array_api_compat.array_namespace(*params)
    ps, ss = fused.step(opt._opt.rule, xp, params, grads, opt.state.slots, hp, 1, False)
    assert fused.LAST_PATH == ("generic",) and len(ps) == 2
    assert set(ss) == {"exp_avg", "exp_avg_sq"} and all(len(a) == 2 for a in ss.values())


@pytest.mark.gpu
@pytest.mark.skipif(CUPY is not None, reason=str(CUPY))
@pytest.mark.parametrize("layout", ["one", "list"])
def test_gpu_more_than_2_31_elements(layout):
    """64-bit indices: elements past 2**31 are updated like the first ones."""
    import cupy as cp

    from polyopt.backends import cupy as fused

    n = 2**31 + 64
    need = 4 * 2 * n + (2**30)  # p, g, m, v in float16, and room
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} free")
    rng = np.random.default_rng(8)
    probe = np.r_[0:3, 2**31 - 2 : 2**31 + 2, n - 3 : n]
    bulk = 2**31 + 10  # past 2**31 and not probed: p = 1, g = 0.5 like most elements
    p_probe = rng.standard_normal(probe.size).astype(np.float16)
    g_probe = rng.standard_normal((2, probe.size)).astype(np.float16)
    p = cp.ones(n, dtype=cp.float16)
    p[cp.asarray(probe)] = cp.asarray(p_probe)
    params = [p] if layout == "one" else [p, cp.ones(3, dtype=cp.float16)]
    opt = polyopt.Adam(params, lr=0.1, weight_decay=0.01, impl="fused")
    for k in range(2):
        g = cp.full(n, 0.5, dtype=cp.float16)
        g[cp.asarray(probe)] = cp.asarray(g_probe[k])
        opt.step([g] if layout == "one" else [g, cp.ones(3, dtype=cp.float16)])
        del g
    assert fused.LAST_PATH == (("span",) if layout == "one" else ("multi_tensor",))
    ref = polyopt.adam(lr=0.1, weight_decay=0.01, impl="generic")
    rp = [np.r_[p_probe, np.float16(1.0)]]
    rs = ref.init(rp)
    for k in range(2):
        rp, rs = ref.update(rp, [np.r_[g_probe[k], np.float16(0.5)]], rs)
    got = np.r_[p[cp.asarray(probe)].get(), p[bulk : bulk + 1].get()]
    assert rel_error(got, rp[0]) <= 1e-3, (got, rp[0])
    assert got[-1] != 1.0  # the element past 2**31 moved
