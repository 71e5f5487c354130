"""Kernels derived from a rule: the rule's own ``step``, traced and compiled.

A rule's step is elementwise array-API code (``rules/*.py``). Run with symbols in place
of the arrays (param, grad, slots) and with the step's real hyperparameters and count,
it records one element's update (:func:`trace`). Python itself evaluates everything
that involves only numbers (``1 − α``, ``lr·λ``, ``lr / (1 − β1^t)``), in float64 and
with the rule's own code, exactly as the generic path does; those values enter the
graph as constants. What is left is the element program: one expression per output
(the new param and each new slot), its constants as kernel arguments.

:func:`numba_kernel` compiles the element program with numba into one call that walks a
table of raw data addresses (one row per array: param, grad, slots), so a group of
any number of arrays costs one call, each element read once and written once. The
arithmetic is the rule's, in its order and dtype, the constants rounded to the arrays'
dtype as NumPy and torch round a Python float (no ``fastmath``: no FMA contraction), so
the result equals the generic path's to the last bit. The program depends on the
rule's branches (flags such as ``centered``, which terms are zero), not on the values:
it is compiled once per distinct program and dtype, and each step only re-traces (a
few dozen Python operations) to get this step's constants.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

import numpy as np

try:
    import numba  # noqa: F401 - the kernels are compiled with it
except ImportError:  # pragma: no cover - numba is optional: no derived kernels
    HAVE_NUMBA = False
else:
    HAVE_NUMBA = True

# -- the symbols ----------------------------------------------------------------------


class Tape:
    """What a trace records: each operation once, in the order the rule runs them
    (``ops``: ``(op, args)``, an argument being an operation's index, an input's name,
    or ``-(i + 1)`` for constant ``i``), and the host numbers it used (``consts``)."""

    __slots__ = ("consts", "ops")

    def __init__(self):
        self.ops: list = []
        self.consts: list = []

    def ref(self, x) -> int | str:
        if isinstance(x, Node):
            return x.ref
        if type(x) in (int, float) or isinstance(x, (int, float, np.floating)):
            if isinstance(x, bool):
                return NotImplemented
            self.consts.append(float(x))
            return -len(self.consts)
        return NotImplemented

    def op(self, op: str, *args) -> Node:
        refs = tuple(self.ref(a) for a in args)
        if NotImplemented in refs:
            raise TypeError(f"{op} of {[type(a).__name__ for a in args]} cannot be traced")
        self.ops.append((op, refs))
        return Node(self, len(self.ops) - 1)


class Node:
    """One value of the traced step: an input or the result of an operation."""

    __slots__ = ("ref", "tape")
    dtype = None  # xp.astype(x, x.dtype): the kernel computes in the arrays' dtype

    def __init__(self, tape: Tape, ref: int | str):
        self.tape, self.ref = tape, ref

    # arithmetic: a Python number becomes a constant of the program
    def _bin(self, op, other, swap=False):
        tape = self.tape
        kind = type(other)
        if kind is Node:
            o = other.ref
        elif kind is float or kind is int:  # the common cases first: this runs per step
            tape.consts.append(float(other))
            o = -len(tape.consts)
        else:
            o = tape.ref(other)
            if o is NotImplemented:
                return NotImplemented
        ops = tape.ops
        ops.append((op, (o, self.ref) if swap else (self.ref, o)))
        return Node(tape, len(ops) - 1)

    def __add__(self, o):
        return self._bin("+", o)

    def __radd__(self, o):
        return self._bin("+", o, True)

    def __sub__(self, o):
        return self._bin("-", o)

    def __rsub__(self, o):
        return self._bin("-", o, True)

    def __mul__(self, o):
        return self._bin("*", o)

    def __rmul__(self, o):
        return self._bin("*", o, True)

    def __truediv__(self, o):
        return self._bin("/", o)

    def __rtruediv__(self, o):
        return self._bin("/", o, True)

    def __pow__(self, o):
        return self._bin("**", o)

    def __rpow__(self, o):
        return self._bin("**", o, True)

    def __gt__(self, o):
        return self._bin(">", o)

    def __neg__(self):
        return self.tape.op("neg", self)

    def __bool__(self):
        raise TypeError("a traced value has no truth value: the rule branches on data")


_FUNCTIONS = ("sqrt", "exp", "expm1", "log", "abs", "sign")


class Namespace:
    """The array-API functions a rule calls, on the symbols of one trace."""

    float32 = np.float32
    float64 = np.float64

    def __init__(self, tape: Tape):
        self._tape = tape

    def __getattr__(self, name):  # anything else is not traceable
        if name in _FUNCTIONS:
            return lambda x: self._tape.op(name, x)
        raise AttributeError(f"{name} cannot be traced into a kernel")

    def maximum(self, a, b):
        return self._tape.op("maximum", a, b)

    def minimum(self, a, b):
        return self._tape.op("minimum", a, b)

    def astype(self, x, dtype, copy=True):
        return self._tape.op("float", x) if isinstance(x, Node) else x


class Trace:
    """The traced step: the slot names, the outputs ``[new param, new slot...]`` (each an
    operation's index, an input's name or a constant) and the tape."""

    def __init__(self, names: tuple, outputs: list, tape: Tape):
        self.names, self.outputs, self.tape = names, outputs, tape


def trace(rule, hp: dict, t: int) -> Trace:
    """Run ``rule.step`` on one symbolic element of a param, its grad and its slots,
    with the step's own hyperparameters and 1-based count ``t``."""
    names = tuple(rule.slots(hp))
    tape = Tape()
    s = {n: Node(tape, n) for n in names}
    new_p, new_s = rule.step(Node(tape, "p"), Node(tape, "g"), s, hp, t, Namespace(tape))
    outputs = [tape.ref(x) for x in (new_p, *[new_s[n] for n in names])]
    return Trace(names, outputs, tape)


# -- the element program ---------------------------------------------------------------


def host_values(hp: dict, k) -> bool:
    """Whether a kernel can take this step: the count and every hyperparameter are
    plain Python values (numbers, flags, tuples of them), so that the rule's own code
    folds them into host constants. An array or traced value anywhere means the
    generic path. The one predicate every derived (and torch's) kernel uses."""
    if type(k) is not int or "_arrays" in hp:  # _base.ARRAYS: the engine saw arrays
        return False
    for x in hp.values():
        t = type(x)
        if t is tuple:
            if not all(type(y) in _SCALAR for y in x):
                return False
        elif t not in _SCALAR:
            return False
    return True


_SCALAR = frozenset({int, float, bool, str, type(None)})


class Program:
    """One step of a rule as an element program: ``names`` (slot names, in the order of
    the kernel's columns), ``key`` (the program's structure: the same for every step
    whose branches are the same) and ``consts`` (this step's host constants, float64)."""

    __slots__ = ("consts", "key", "names")

    def __init__(self, names: tuple, key: tuple, consts: list):
        self.names, self.key, self.consts = names, key, consts

    def kernel(self, dtype, pure: bool = False) -> Kernel:
        """The compiled kernel of this program for arrays of ``dtype``: in place (the
        outputs overwrite the param and slot columns) or ``pure`` (they go to columns of
        their own after the inputs). Compiled on first use, then cached."""
        dtype = np.dtype(dtype)
        key = (self.key, dtype.str, pure)
        k = _CACHE.get(key)
        if k is None:
            with _LOCK:
                k = _CACHE.get(key)
                if k is None:
                    k = _CACHE[key] = Kernel(self.key, dtype, pure)
        return k

    def constants(self, dtype) -> np.ndarray:
        """This step's constants, each rounded once to ``dtype`` as NumPy rounds a Python
        float against an array of that dtype."""
        return np.array(self.consts, dtype=dtype)


def program(rule, hp: dict, t: int) -> Program:
    """Trace one step (:func:`trace`) as an element program: each operation once, in
    the order the rule ran them (shared subexpressions are shared nodes), each number
    the rule computed on the host a constant."""
    tr = trace(rule, hp, t)
    key = (tr.names, tuple(tr.tape.ops), tuple(tr.outputs))
    return Program(tr.names, key, tr.tape.consts)


# -- code generation --------------------------------------------------------------------

_NB = {
    "sqrt": "np.sqrt",
    "exp": "np.exp",
    "expm1": "np.expm1",
    "log": "np.log",
    "abs": "np.abs",
    "sign": "np.sign",
    "maximum": "np.maximum",
    "minimum": "np.minimum",
    "float": "",
}


def _expr(op: str, args: list[str]) -> str:
    if op in ("+", "-", "*", "/", "**", ">"):
        return f"({args[0]} {op} {args[1]})"
    if op == "neg":
        return f"(-{args[0]})"
    return f"{_NB[op]}({', '.join(args)})"


def element_code(key: tuple, expr: Callable[[str, list], str] = _expr) -> tuple[list, list, int]:
    """``(body lines, output names, number of constants)`` of the program ``key``:
    ``e{i} = ...`` per operation, inputs ``x_p``, ``x_g``, ``x_{j}`` (slot j), constants
    ``c{i}``. ``expr(op, args)`` writes one operation in the target language."""
    names, ops, outs = key
    inputs = {"p": "x_p", "g": "x_g", **{n: f"x_{j}" for j, n in enumerate(names)}}
    n_consts = 0

    def name(r) -> str:
        nonlocal n_consts
        if isinstance(r, str):
            return inputs[r]
        if r < 0:
            n_consts = max(n_consts, -r)
            return f"c{-r - 1}"
        return f"e{r}"

    body = [f"e{i} = {expr(op, [name(a) for a in args])}" for i, (op, args) in enumerate(ops)]
    out_names = [name(o) for o in outs]
    return body, out_names, n_consts


def _source(key: tuple, parallel: bool, pure: bool) -> str:
    """The kernel: ``kernel(tab, lo, hi, sc)`` updates elements ``lo[c]:hi[c]`` of the
    arrays in column ``c`` of ``tab`` (rows: param, grad, each slot, then, ``pure``, the
    new param and each new slot) for every chunk ``c``; in parallel, the chunks run on
    numba's threads."""
    names = key[0]
    body, outs, n_consts = element_code(key)
    width = 2 + len(names)
    loop = "numba.prange" if parallel else "range"
    lines = ["def kernel(tab, lo, hi, sc):"]
    # the constants in locals: loaded once, not from memory a store might alias
    lines += [f"    c{i} = sc[{i}]" for i in range(n_consts)]
    lines.append(f"    for c in {loop}(tab.shape[1]):")
    # each array from its chunk's first element, the loop from 0: an index numba knows
    # is not negative needs no wraparound check, and the loop vectorizes
    lines.append("        n = hi[c] - lo[c]")
    lines.append("        skip = lo[c] * size")
    columns = width + (width - 1 if pure else 0)
    for j in range(columns):
        lines.append(f"        A{j} = numba.carray(_ptr(tab[{j}, c] + skip, dt), n)")
    lines.append("        for i in range(n):")
    lines.append("            x_p = A0[i]")
    lines.append("            x_g = A1[i]")
    for j in range(len(names)):
        lines.append(f"            x_{j} = A{j + 2}[i]")
    lines += [f"            {b}" for b in body]
    if pure:
        targets = [f"A{width + j}" for j in range(width - 1)]
    else:
        targets = ["A0", *[f"A{j + 2}" for j in range(len(names))]]
    inputs = ["x_p", *[f"x_{j}" for j in range(len(names))]]
    for target, out, same in zip(targets, outs, inputs):
        if pure or out != same:  # in place, an output that is its input is left as it is
            lines.append(f"            {target}[i] = {out}")
    return "\n".join(lines) + "\n"


#: elements per parallel work item, and the group size from which numba's threads run
CHUNK = 1 << 16
PARALLEL_FROM = 1 << 19


class Kernel:
    """One compiled element program: ``kernel(tab, sizes, sc)`` runs it on the arrays
    whose data addresses are the columns of ``tab`` (rows: param, grad, each slot, and
    for a ``pure`` kernel the outputs), ``sizes`` their element counts, ``sc`` the
    constants. Groups of :data:`PARALLEL_FROM` elements or more are cut into chunks of
    :data:`CHUNK` elements that run on numba's threads (a size rule: a memory-bound
    step on fewer elements gains less from a second thread than waking it costs)."""

    def __init__(self, key: tuple, dtype: np.dtype, pure: bool):
        self.key, self._dtype, self.pure = key, dtype, pure
        self._fns: list = [None, None]

    def _fn(self, parallel: bool):
        fn = self._fns[parallel]
        if fn is None:
            fn = self._fns[parallel] = _compile(
                _source(self.key, parallel, self.pure), self._dtype, parallel
            )
        return fn

    @staticmethod
    def _parallel(sizes: np.ndarray) -> bool:
        return int(sizes.sum()) >= PARALLEL_FROM and numba_threads() >= 2

    def ready(self, sizes: np.ndarray) -> None:
        """Compile now the variant that ``sizes`` will run (a first call compiles)."""
        self._fn(self._parallel(sizes))

    def __call__(self, tab: np.ndarray, sizes: np.ndarray, sc: np.ndarray) -> None:
        if not self._parallel(sizes):
            self._fn(False)(tab, np.zeros_like(sizes), sizes, sc)
            return
        # chunk c covers elements lo[c]:hi[c] of array col[c]
        per = (sizes + CHUNK - 1) // CHUNK
        col = np.repeat(np.arange(len(sizes)), per)
        first = np.cumsum(per) - per
        lo = (np.arange(len(col)) - np.repeat(first, per)) * CHUNK
        hi = np.minimum(lo + CHUNK, sizes[col])
        fn = self._fn(True)
        args = (np.ascontiguousarray(tab[:, col]), lo, hi, sc)
        if _POOL_STARTED:
            fn(*args)
        else:
            with _passive_pool():
                fn(*args)


#: whether numba's thread pool has been started (by the first parallel kernel call)
_POOL_STARTED = False


@contextlib.contextmanager
def _passive_pool():
    """Around the first parallel call, which starts numba's thread pool:
    ``OMP_WAIT_POLICY=passive`` unless the user set a policy. GNU OpenMP (numba's
    ``omp`` layer) reads it when the pool starts; by default its idle workers spin, and
    when another process keeps a core busy a spinning worker gets that core only at the
    scheduler's next time slice. Measured on the 2-core machine, AdamW on 4M float32
    params, 300 steps with a busy loop on the other core: p90 step time 5.6-8.0 ms
    with the default policy, 2.2 ms passive (medians 1.5-1.7 and 1.9-2.0 ms); on a quiet
    machine the two are equal (median 1.9-2.3 against 1.7-2.0 ms, two runs). The
    environment is restored right after; with another threading layer (tbb,
    workqueue) or a pool already started, this changes nothing."""
    global _POOL_STARTED
    with _LOCK:
        set_here = "OMP_WAIT_POLICY" not in os.environ
        if set_here:
            os.environ["OMP_WAIT_POLICY"] = "passive"
        try:
            yield
        finally:
            _POOL_STARTED = True
            if set_here:
                del os.environ["OMP_WAIT_POLICY"]


def numba_threads() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS


_LOCK = threading.Lock()
_CACHE: dict = {}  # (program key, dtype, pure) -> Kernel


def numba_kernel(rule, hp: dict, t: int, dtype, pure: bool = False):
    """``(kernel, names, constants)`` for one step of ``rule`` at ``hp`` and 1-based
    count ``t`` on arrays of ``dtype`` (:func:`program`, then :meth:`Program.kernel`)."""
    prog = program(rule, hp, t)
    return prog.kernel(dtype, pure), prog.names, prog.constants(dtype)


def _compile(src: str, dtype: np.dtype, parallel: bool) -> Callable:
    """The kernel of ``src`` compiled by numba for ``dtype``. The source is written to a
    module in the kernel cache (:func:`cache_dir`), so that numba caches the machine
    code next to it and a later process loads it instead of compiling again (compiling
    one kernel takes about 0.5 s, loading it about 10 ms); where no cache directory can
    be written, the kernel is compiled in memory each time."""
    import numba

    from ._numba import _ptr

    header = (
        "import numba\nimport numpy as np\n"
        "from polyopt.backends._numba import _ptr\n"
        f"dt = np.{dtype.name}\nsize = {dtype.itemsize}\n\n"
    )
    text = header + src
    options = dict(nogil=True, parallel=parallel, error_model="numpy")
    module = _cached_module(text)
    if module is not None:
        return numba.njit(cache=True, **options)(module.kernel)
    scope = {"numba": numba, "np": np, "_ptr": _ptr, "dt": dtype.type, "size": dtype.itemsize}
    exec(src, scope)  # noqa: S102 - source generated from the rule's trace
    return numba.njit(**options)(scope["kernel"])


def cache_dir() -> str | None:
    """Where generated kernels (and numba's machine code for them) are kept:
    ``$POLYOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/polyopt`` or ``~/.cache/polyopt``;
    ``POLYOPT_CACHE_DIR=""`` turns the cache off."""
    import os

    d = os.environ.get("POLYOPT_CACHE_DIR")
    if d is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "polyopt", "kernels")
    return d or None


def _cached_module(text: str):
    """The module holding ``text``, written once into :func:`cache_dir` under a name
    that is its hash; None if the directory cannot be written."""
    import hashlib
    import importlib.util
    import os
    import sys

    d = cache_dir()
    if d is None:
        return None
    name = "polyopt_kernel_" + hashlib.sha256(text.encode()).hexdigest()[:24]
    path = os.path.join(d, name + ".py")
    try:
        if not os.path.exists(path):
            os.makedirs(d, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)  # atomic: another process may be writing it too
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            # by name, as numba's cache finds a kernel's globals when it loads one
            sys.modules[name] = module
    except OSError:
        return None
    return module
