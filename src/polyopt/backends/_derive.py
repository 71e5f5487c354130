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


class Node:
    """One value of the traced step: an input, a constant or an operation."""

    __slots__ = ("args", "array", "name", "op")
    dtype = None  # xp.astype(x, x.dtype): the kernel computes in the arrays' dtype

    def __init__(self, op: str, args: tuple = (), name: str = "", array: bool | None = None):
        self.op, self.args, self.name = op, args, name
        self.array = any(isinstance(a, Node) and a.array for a in args) if array is None else array

    # arithmetic: a Python number stays a constant of the graph
    def _bin(self, op, other, swap=False):
        if not isinstance(other, (Node, int, float)) or isinstance(other, bool):
            return NotImplemented
        return Node(op, (other, self) if swap else (self, other))

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
        return Node("neg", (self,))

    def __bool__(self):
        raise TypeError("a traced value has no truth value: the rule branches on data")


class Namespace:
    """The array-API functions a rule calls, on symbols."""

    float32 = np.float32
    float64 = np.float64

    def __getattr__(self, name):  # anything else is not traceable
        raise AttributeError(f"{name} cannot be traced into a kernel")

    sqrt = staticmethod(lambda x: Node("sqrt", (x,)))
    exp = staticmethod(lambda x: Node("exp", (x,)))
    expm1 = staticmethod(lambda x: Node("expm1", (x,)))
    log = staticmethod(lambda x: Node("log", (x,)))
    abs = staticmethod(lambda x: Node("abs", (x,)))
    maximum = staticmethod(lambda a, b: Node("maximum", (a, b)))
    minimum = staticmethod(lambda a, b: Node("minimum", (a, b)))

    @staticmethod
    def astype(x, dtype, copy=True):
        return Node("float", (x,)) if isinstance(x, Node) else x


NAMESPACE = Namespace()


class Trace:
    """The traced step: the slot names and the outputs ``[new param, new slot...]``."""

    def __init__(self, names: tuple, outputs: list):
        self.names, self.outputs = names, outputs


def trace(rule, hp: dict, t: int) -> Trace:
    """Run ``rule.step`` on one symbolic element of a param, its grad and its slots,
    with the step's own hyperparameters and 1-based count ``t``."""
    names = tuple(rule.slots(hp))
    p = Node("in", name="p", array=True)
    g = Node("in", name="g", array=True)
    s = {n: Node("in", name=n, array=True) for n in names}
    new_p, new_s = rule.step(p, g, dict(s), hp, t, NAMESPACE)
    return Trace(names, [new_p, *[new_s[n] for n in names]])


# -- code generation --------------------------------------------------------------------

_NB = {
    "sqrt": "np.sqrt",
    "exp": "np.exp",
    "expm1": "np.expm1",
    "log": "np.log",
    "abs": "np.abs",
    "maximum": "np.maximum",
    "minimum": "np.minimum",
    "float": "",
}


def _emit(tr: Trace) -> tuple[list, list, list]:
    """``(body lines, output names, constants)``: each element operation once (shared
    subexpressions included), each number it uses a kernel constant ``c{i}`` (``sc[i]``,
    loaded once)."""
    body: list[str] = []
    seen: dict = {}
    consts: list[float] = []
    inputs = {"p": "x_p", "g": "x_g", **{n: f"x_{i}" for i, n in enumerate(tr.names)}}

    def elem(node) -> str:
        if not isinstance(node, Node):  # a number the rule computed on the host
            consts.append(float(node))
            return f"c{len(consts) - 1}"
        name = seen.get(id(node))
        if name is not None:
            return name
        if node.op == "in":
            name = inputs[node.name]
        else:
            args = [elem(a) for a in node.args]
            name = f"e{len(body)}"
            body.append(f"{name} = {_expr(node.op, args)}")
        seen[id(node)] = name
        return name

    outs = [elem(o) for o in tr.outputs]
    return body, outs, consts


def _expr(op: str, args: list[str]) -> str:
    if op in ("+", "-", "*", "/", "**", ">"):
        return f"({args[0]} {op} {args[1]})"
    if op == "neg":
        return f"(-{args[0]})"
    return f"{_NB[op]}({', '.join(args)})"


def _source(names: tuple, body: list, outs: list, n_consts: int, parallel: bool) -> str:
    """The kernel: ``kernel(tab, lo, hi, sc)`` updates elements ``lo[c]:hi[c]`` of the
    arrays in row ``c`` of ``tab`` for every chunk ``c``; in parallel, the chunks run on
    numba's threads."""
    loop = "numba.prange" if parallel else "range"
    lines = ["def kernel(tab, lo, hi, sc):"]
    # the constants in locals: loaded once, not from memory a store might alias
    lines += [f"    c{i} = sc[{i}]" for i in range(n_consts)]
    lines.append(f"    for c in {loop}(tab.shape[0]):")
    # each array from its chunk's first element, the loop from 0: an index numba knows
    # is not negative needs no wraparound check, and the loop vectorizes
    lines.append("        n = hi[c] - lo[c]")
    lines.append("        skip = lo[c] * size")
    for j in range(2 + len(names)):
        lines.append(f"        A{j} = numba.carray(_ptr(tab[c, {j}] + skip, dt), n)")
    lines.append("        for i in range(n):")
    lines.append("            x_p = A0[i]")
    lines.append("            x_g = A1[i]")
    for j in range(len(names)):
        lines.append(f"            x_{j} = A{j + 2}[i]")
    lines += [f"            {b}" for b in body]
    targets = ["A0", *[f"A{j + 2}" for j in range(len(names))]]
    inputs = ["x_p", *[f"x_{j}" for j in range(len(names))]]
    for target, out, same in zip(targets, outs, inputs):
        if out != same:  # an output that is its input is left as it is
            lines.append(f"            {target}[i] = {out}")
    return "\n".join(lines) + "\n"


#: elements per parallel work item, and the group size from which numba's threads run
CHUNK = 1 << 16
PARALLEL_FROM = 1 << 19


class Kernel:
    """One compiled element program: ``kernel(tab, sizes, sc)`` updates in place the
    arrays whose data addresses are the rows of ``tab`` (param, grad, then each slot),
    ``sizes`` their element counts, ``sc`` the constants. Groups of
    :data:`PARALLEL_FROM` elements or more are cut into chunks of :data:`CHUNK`
    elements that run on numba's threads."""

    def __init__(self, src_serial: str, src_parallel: str, dtype: np.dtype):
        self._src, self._dtype = (src_serial, src_parallel), dtype
        self._fns: list = [None, None]

    def _fn(self, parallel: bool):
        fn = self._fns[parallel]
        if fn is None:
            fn = self._fns[parallel] = _compile(self._src[parallel], self._dtype, parallel)
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
        # chunk c covers elements lo[c]:hi[c] of array row[c]
        per = (sizes + CHUNK - 1) // CHUNK
        row = np.repeat(np.arange(len(sizes)), per)
        first = np.cumsum(per) - per
        lo = (np.arange(len(row)) - np.repeat(first, per)) * CHUNK
        hi = np.minimum(lo + CHUNK, sizes[row])
        self._fn(True)(tab[row], lo, hi, sc)


def numba_threads() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS


_LOCK = threading.Lock()
_CACHE: dict = {}  # (kernel source, dtype) -> Kernel


def numba_kernel(rule, hp: dict, t: int, dtype) -> tuple[Kernel, tuple, np.ndarray]:
    """``(kernel, names, constants)`` for one step of ``rule`` at ``hp`` and 1-based
    count ``t`` on arrays of ``dtype``: ``kernel(tab, sizes, constants)`` (a
    :class:`Kernel`) runs it on the arrays in ``tab``, whose rows hold the data
    addresses of param, grad, then each slot of ``names``."""
    tr = trace(rule, hp, t)
    body, outs, consts = _emit(tr)
    dtype = np.dtype(dtype)
    key = (_source(tr.names, body, outs, len(consts), False), dtype.str)
    kernel = _CACHE.get(key)
    if kernel is None:
        with _LOCK:
            kernel = _CACHE.get(key)
            if kernel is None:
                kernel = Kernel(key[0], _source(tr.names, body, outs, len(consts), True), dtype)
                _CACHE[key] = kernel
    return kernel, tr.names, np.array(consts, dtype=dtype)


def _compile(src: str, dtype: np.dtype, parallel: bool) -> Callable:
    import numba

    from ._numba import _ptr

    scope = {"numba": numba, "np": np, "_ptr": _ptr, "dt": dtype.type, "size": dtype.itemsize}
    exec(src, scope)  # noqa: S102 - source generated from the rule's trace
    return numba.njit(nogil=True, parallel=parallel, error_model="numpy")(scope["kernel"])
