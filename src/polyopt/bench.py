"""``python -m polyopt bench``: one float32 AdamW step, polyopt against its peers and
against the memory-traffic floor, on the same arrays in one run.

For each size (total parameters split into a number of equal 1-D tensors) every
implementation gets the same initial params and grads (float32, from one seed) and runs
``--warmup`` untimed steps; then ``--repeats`` rounds time one step of each
implementation in turn (each synchronized: jax ``block_until_ready``), so that drifts of
a shared machine's speed hit every row alike; half the rounds build and run the
implementations in the listed order, half in reverse, because position matters (see
:func:`run_size`). ``--sequential`` times them one after the other instead, holding one
implementation's arrays at a time. Columns:

- ``ms``: median time of one step;
- ``vs best peer``: that time divided by the faster of ``torch.optim.AdamW(fused=True)``
  and ``optax.adamw`` under ``jax.jit``;
- ``GB/s``: effective bandwidth, 28 bytes per parameter (read p, g, m, v; write p, m,
  v: the least memory traffic an fp32 AdamW step can do) divided by the time;
- ``% floor``: the floor's time over the measured time, where the floor's time is
  28 bytes/param divided by this machine's memory bandwidth: the best of ``np.copyto``
  (read + write) and an in-place ``np.add(a, b, out=a)`` (2 reads + 1 write) over large
  arrays, on one thread and on all (see :func:`bandwidth` and the printed footnote).
  100 % is a step that moves its 28 bytes per parameter as fast as memory moves.

``--shapes matrices`` makes each problem a list of float32 matrices instead
(``--sizes 4x1024x1024+2x1024x4096``: COUNTxROWSxCOLS terms joined by ``+``), which
Adafactor factors; Muon takes matrices only and runs on them whatever ``--shapes`` says
(:func:`plan`).

``--memory`` measures instead the extra memory one step of polyopt's NumPy paths
allocates (``tracemalloc``: NumPy reports its allocations to it).
Missing libraries are skipped with a note; exit code 0.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import platform
import re
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _cli

#: bytes of memory traffic per parameter of an fp32 AdamW step: read p, g, m, v; write p, m, v
FLOOR_BYTES = 28
HP = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
DEFAULT_SIZES = "10M/100,1M/1000"
QUICK_SIZES = "100k/100"  # --quick: a smoke test of every row in seconds, not a measurement
#: ``--shapes matrices``: COUNTxROWSxCOLS terms joined by ``+`` make one problem
DEFAULT_MATRICES = "4x1024x1024+2x1024x4096"
QUICK_MATRICES = "4x256x256+2x256x1024"
SHAPES = ("vectors", "matrices")
PEERS = ("torch.optim fused", "optax.adamw jit")


class Unavailable(Exception):
    """An implementation that cannot run here; the message says why (shown as n/a)."""


# -- problems --------------------------------------------------------------------------


_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_count(text: str) -> int:
    """``10M`` -> 10_000_000, ``1e4`` -> 10_000, ``250k`` -> 250_000."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise ValueError(f"not a count: {text!r} (examples: 10M, 250k, 1e4)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise ValueError(f"not a positive whole count: {text!r}")
    return int(value)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"10M/100,1M/1000"`` -> [(10_000_000, 100), (1_000_000, 1000)]: total params / tensors."""
    out = []
    for part in text.split(","):
        total, _, count = part.partition("/")
        n, t = parse_count(total), parse_count(count or "1")
        if t > n:
            raise ValueError(f"{part!r}: more tensors ({t}) than parameters ({n})")
        out.append((n, t))
    if not out:
        raise ValueError("no sizes given")
    return out


def parse_matrices(text: str) -> list[tuple[tuple[int, int], ...]]:
    """``"4x1024x1024+2x1024x4096,2x8x8"`` -> [((1024, 1024),) * 4 + ((1024, 4096),) * 2,
    ((8, 8), (8, 8))]: one problem per comma-separated item, ``COUNTxROWSxCOLS`` terms
    (``ROWSxCOLS``: one matrix) joined by ``+``, counts in k/M/1e4 notation."""
    out = []
    for part in text.split(","):
        shapes: list[tuple[int, int]] = []
        for term in part.split("+"):
            dims = [parse_count(x) for x in term.lower().split("x")] if term.strip() else []
            if len(dims) == 2:
                dims = [1, *dims]
            if len(dims) != 3:
                raise ValueError(
                    f"not a matrix list: {part!r} (examples: 4x1024x1024+2x1024x4096, 64x64)"
                )
            shapes += [(dims[1], dims[2])] * dims[0]
        out.append(tuple(shapes))
    return out


def matrices_label(shapes: Sequence[tuple[int, ...]]) -> str:
    """``4x1024x1024+2x1024x4096`` for the problem's matrix shapes (runs of equal ones)."""
    terms: list[list] = []
    for shape in shapes:
        if terms and terms[-1][1] == shape:
            terms[-1][0] += 1
        else:
            terms.append([1, shape])
    return "+".join(f"{n}x" + "x".join(map(str, shape)) for n, shape in terms)


def human(n: int) -> str:
    for unit, div in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{unit}"
    return str(n)


@dataclass
class Problem:
    n_params: int
    n_tensors: int
    params: list  # float32 NumPy arrays: the initial values every implementation starts from
    grads: list
    matrices: bool = False  # 2-D arrays (make_matrix_problem), not 1-D

    @property
    def label(self) -> str:
        if self.matrices:
            shapes = [tuple(p.shape) for p in self.params]
            return f"{matrices_label(shapes)} matrices ({human(self.n_params)} params)"
        return f"{human(self.n_params)} params in {self.n_tensors} tensors"

    @property
    def short(self) -> str:
        """``10M/100`` (vectors) or ``4x1024x1024+2x1024x4096`` (matrices)."""
        if self.matrices:
            return matrices_label([tuple(p.shape) for p in self.params])
        return f"{human(self.n_params)}/{self.n_tensors}"


def make_problem(n_params: int, n_tensors: int, seed: int = 0) -> Problem:
    """``n_tensors`` 1-D float32 tensors holding ``n_params`` in all (sizes differ by <= 1)."""
    rng = np.random.default_rng(seed)
    base, extra = divmod(n_params, n_tensors)
    sizes = [base + (i < extra) for i in range(n_tensors)]
    p = rng.standard_normal(n_params, dtype=np.float32)
    g = rng.standard_normal(n_params, dtype=np.float32) * np.float32(1e-2)
    cuts = np.cumsum([0, *sizes])
    params = [p[a:b].copy() for a, b in zip(cuts, cuts[1:])]
    grads = [g[a:b].copy() for a, b in zip(cuts, cuts[1:])]
    return Problem(n_params, n_tensors, params, grads)


def make_matrix_problem(shapes: Sequence[tuple[int, int]], seed: int = 0) -> Problem:
    """float32 matrices of ``shapes`` (params N(0, 1), grads N(0, 1e-4)), in that order."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) * np.float32(1e-2) for s in shapes]
    return Problem(sum(p.size for p in params), len(params), params, grads, matrices=True)


def make_problems(sizes: Sequence, matrices: bool) -> Iterator[Problem]:
    """The problems of parsed ``--sizes``, one at a time: vectors ``(total, tensors)``
    or matrix lists."""
    for size in sizes:
        yield make_matrix_problem(size) if matrices else make_problem(*size)


def plan(names: Sequence[str], sizes: Sequence, matrices: bool, quick: bool):
    """``(problem, [names])`` in the order to run them: every size for ``names``, then,
    on vectors, the optimizers that take matrices only (Muon) on the default matrices
    (``--quick``'s with ``quick``), as ``--shapes matrices`` would run them."""
    own = [] if matrices else [n for n in names if needs_matrices(n)]
    rest = [n for n in names if n not in own]
    if rest:
        for pb in make_problems(sizes, matrices):
            yield pb, rest
    if own:
        spec = QUICK_MATRICES if quick else DEFAULT_MATRICES
        print(f"\n({', '.join(own)}: 2-D params only, run on the matrices {spec})")
        for pb in make_problems(parse_matrices(spec), True):
            yield pb, own


# -- implementations: each builds a step() closure on copies of the problem's arrays ----


#: The extra that installs each optional library a row needs.
EXTRAS = {"torch": "torch", "jax": "jax", "optax": "jax", "numba": "fast", "thinc": "thinc"}


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"n/a: {module} not installed ({_install(module)})")


def _install(module: str) -> str:
    extra = EXTRAS.get(module)
    if extra == "thinc":
        return "pip install thinc"
    return f"pip install 'polyopt[{extra}]'" if extra else f"pip install {module}"


def _polyopt_numpy(impl: str, packed: bool = False) -> Callable:
    def build(pb: Problem) -> Callable[[], None]:
        import polyopt
        from polyopt import backends, flat

        if impl == "fused" and not backends.available("adamw", "numpy"):
            if importlib.util.find_spec("numba") is None:
                raise Unavailable("n/a: numba not installed (pip install 'polyopt[fast]')")
            raise Unavailable("n/a: no NumPy fast path in this polyopt")
        if packed:
            params, grads = flat.pack(pb.params), flat.pack(pb.grads)
        else:
            params, grads = [a.copy() for a in pb.params], [a.copy() for a in pb.grads]
        opt = polyopt.AdamW(params, **HP, impl=impl)
        return lambda: opt.step(grads)

    return build


def _torch_tensors(pb: Problem):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    params = [torch.from_numpy(a).clone() for a in pb.params]
    grads = [torch.from_numpy(a).clone() for a in pb.grads]
    return torch, params, grads


def _polyopt_torch(impl: str) -> Callable:
    def build(pb: Problem) -> Callable[[], None]:
        _need("torch")
        import polyopt
        from polyopt import backends

        torch, params, grads = _torch_tensors(pb)
        if impl == "fused" and not backends.available("adamw", "torch"):
            raise Unavailable("n/a: no torch fast path in this polyopt")
        opt = polyopt.AdamW(params, **HP, impl=impl)
        return lambda: opt.step(grads)

    return build


def _torch_optim(mode: str) -> Callable:
    def build(pb: Problem) -> Callable[[], None]:
        _need("torch")
        torch, params, grads = _torch_tensors(pb)
        params = [torch.nn.Parameter(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        flags = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        try:
            opt = torch.optim.AdamW(params, **HP, **flags[mode])
        except (RuntimeError, ValueError) as e:
            raise Unavailable(f"n/a: {e}") from None
        return opt.step

    return build


def _jax_arrays(pb: Problem):
    import jax
    import jax.numpy as jnp

    return jax, [jnp.asarray(a) for a in pb.params], [jnp.asarray(a) for a in pb.grads]


def _optax(pb: Problem) -> Callable[[], None]:
    _need("jax")
    _need("optax")
    import optax

    jax, params, grads = _jax_arrays(pb)
    b1, b2 = HP["betas"]
    tx = optax.adamw(HP["lr"], b1=b1, b2=b2, eps=HP["eps"], weight_decay=HP["weight_decay"])
    return _optax_step(jax, optax, tx, params, grads)


def _optax_step(jax, optax, tx, params, grads) -> Callable[[], None]:
    """One jitted step of the optax transformation ``tx`` (params and state donated)."""

    def update(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    update = jax.jit(update, donate_argnums=(0, 2))
    box = [params, tx.init(params)]

    def step():
        box[0], box[1] = update(box[0], grads, box[1])
        jax.block_until_ready(box[0])

    return step


def _polyopt_jax(impl: str) -> Callable:
    def build(pb: Problem) -> Callable[[], None]:
        _need("jax")
        import polyopt
        from polyopt import backends

        jax, params, grads = _jax_arrays(pb)
        if impl == "fused" and not backends.available("adamw", "jax"):
            raise Unavailable("n/a: no jax fast path in this polyopt")
        return _jax_step(jax, polyopt.adamw(**HP, impl=impl), params, grads)

    return build


def _jax_step(jax, opt, params, grads) -> Callable[[], None]:
    """One step of polyopt's functional ``opt`` under ``jax.jit`` (params and state
    donated)."""
    update = jax.jit(opt.update, donate_argnums=(0, 2))
    box = [params, opt.init(params)]

    def step():
        box[0], box[1] = update(box[0], grads, box[1])
        jax.block_until_ready(box[0])

    return step


def _optax_chain(polyopt_twin: bool) -> Callable:
    """``optax.chain(clip_by_global_norm(1.0), adamw)`` with optax's adamw or polyopt's
    (``polyopt.optax.adamw``), jitted with donation: the cost of the adapter in a chain."""

    def build(pb: Problem) -> Callable[[], None]:
        _need("jax")
        _need("optax")
        import optax

        jax, params, grads = _jax_arrays(pb)
        b1, b2 = HP["betas"]
        if polyopt_twin:
            import polyopt.optax

            inner = polyopt.optax.adamw(**HP)
        else:
            inner = optax.adamw(
                HP["lr"], b1=b1, b2=b2, eps=HP["eps"], weight_decay=HP["weight_decay"]
            )
        tx = optax.chain(optax.clip_by_global_norm(1.0), inner)
        return _optax_step(jax, optax, tx, params, grads)

    return build


#: ``--torch``: each optimizer's hyperparameters (torch's defaults but for SGD's momentum)
TORCH_HP = {
    "SGD": {"lr": 1e-3, "momentum": 0.9},
    "Adagrad": {},
    "RMSprop": {},
    "Adadelta": {},
    "Adam": {},
    "AdamW": {},
    "NAdam": {},
    "RAdam": {},
    "Adamax": {},
    "Lion": {},
    "Adafactor": {},
    "Lamb": {},
    "ScheduleFreeAdamW": {},
    "Muon": {},
    "SWATS": {},
}
TORCH_MODES = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "for-loop": {"foreach": False},
}
#: torch.optim classes without foreach / fused flags: one row, the class as it ships
TORCH_AS_SHIPPED = {"Muon"}


def torch_modes(name: str) -> dict[str, dict]:
    """The modes torch.optim.<name> is timed in (``""``: as it ships, no flag)."""
    return {"": {}} if name in TORCH_AS_SHIPPED else TORCH_MODES


def torch_row(name: str, mode: str) -> str:
    return f"torch.optim.{name} {mode}".rstrip()


def needs_matrices(name: str) -> bool:
    """Whether the optimizer of class ``name`` takes 2-D params only (Muon)."""
    from polyopt.testing import OWN_PROBLEMS

    return functional_name(name) in OWN_PROBLEMS


def _torch_params(pb: Problem):
    torch, params, grads = _torch_tensors(pb)
    params = [torch.nn.Parameter(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    return torch, params


def _adapter(name: str) -> Callable:
    def build(pb: Problem) -> Callable[[], None]:
        _need("torch")
        import polyopt.torch

        _, params = _torch_params(pb)
        return getattr(polyopt.torch, name)(params, **TORCH_HP[name]).step

    return build


def _torch_class(name: str, mode: str) -> Callable:
    def build(pb: Problem) -> Callable[[], None]:
        _need("torch")
        torch, params = _torch_params(pb)
        if not hasattr(torch.optim, name):
            raise Unavailable(f"n/a: torch.optim has no {name}")
        try:
            opt = getattr(torch.optim, name)(params, **TORCH_HP[name], **torch_modes(name)[mode])
        except (RuntimeError, ValueError, TypeError) as e:
            raise Unavailable(f"n/a: {e}") from None
        return opt.step

    return build


def torch_implementations(name: str) -> list[tuple[str, str, Callable]]:
    """``--torch``: polyopt.torch.<name> and torch.optim.<name> in each of its modes."""
    rows = [(f"polyopt.torch.{name}", "torch", _adapter(name))]
    rows += [(torch_row(name, m), "torch", _torch_class(name, m)) for m in torch_modes(name)]
    return rows


def _torch_table(pb: Problem, name: str, rows: list[Row], peers=("torch.optim",)) -> str:
    timed = [r for r in rows if r.ms is not None and r.name.startswith(peers)]
    best = min(timed, key=lambda r: r.ms) if timed else None
    out = []
    w = max(28, *(len(r.name) for r in rows))
    for r in rows:
        if r.ms is None:
            out.append(f"  {r.name:<{w}} {r.note}")
            continue
        ratio = f"{r.ms / best.ms:.2f}x" if best else "-"
        out.append(f"  {r.name:<{w}} {r.ms:>9.3g} ms  {ratio:>6}")
    head = f"{name}, {pb.label}: time / the fastest peer ({best.name if best else '-'})"
    return "\n".join([head, *out])


# -- --optimizers: every optimizer against its peers ------------------------------------

#: optax's transformation computing (up to where eps sits) each optimizer at TORCH_HP
OPTAX_TWINS = {
    "SGD": lambda optax: optax.sgd(1e-3, momentum=0.9),
    "Adagrad": lambda optax: optax.adagrad(1e-2, initial_accumulator_value=0.0, eps=1e-10),
    "RMSprop": lambda optax: optax.rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False),
    "Adadelta": lambda optax: optax.adadelta(1.0, rho=0.9, eps=1e-6),
    "Adam": lambda optax: optax.adam(1e-3),
    "AdamW": lambda optax: optax.adamw(1e-3, weight_decay=1e-2),
    # the same work per element, not the same numbers: optax's NAdam has no momentum
    # schedule, its RAdam and Adamax put eps elsewhere, its Adafactor factors the two
    # largest axes of matrices of at least 128 x 128
    "NAdam": lambda optax: optax.nadam(2e-3),
    "RAdam": lambda optax: optax.radam(1e-3),
    "Adamax": lambda optax: optax.adamax(2e-3),
    "Lion": lambda optax: optax.lion(1e-4, weight_decay=1e-3),
    "Adafactor": lambda optax: optax.adafactor(1e-2),
    "Lamb": lambda optax: optax.lamb(1e-3),
    "ScheduleFreeAdamW": lambda optax: optax.contrib.schedule_free_adamw(2.5e-3),
    # torch's Muon at its defaults (lr 1e-3, decoupled decay 0.1 scaled by lr, momentum
    # 0.95 Nesterov, 5 quintic Newton-Schulz steps on the wide orientation): the same
    # matmuls; optax bias-corrects the EMA, adds eps to the norm, and scales by
    # sqrt(max(1, cols / rows)) where torch takes sqrt(max(1, rows / cols))
    "Muon": lambda optax: optax.contrib.muon(1e-3, weight_decay=0.1),
}
#: no optax twin on matrices: optax.adafactor is another algorithm there (it factors
#: the two largest axes when both are >= 128, adds eps 1e-30 to g^2, clips the update
#: at RMS 1 before scaling and decays beta2 as 1 - t^-0.8 from step 0); on vectors both
#: are an unfactored second moment, the same work per element
NO_TWIN_ON_MATRICES = {
    "Adafactor": "n/a: optax.adafactor is another algorithm on matrices (see bench.py)"
}


def functional_name(name: str) -> str:
    """The functional name of the optimizer whose class is ``name`` (``"AdamW"`` ->
    ``"adamw"``)."""
    import polyopt

    for fname, (_, cls) in polyopt.OPTIMIZERS.items():
        if cls.__name__ == name:
            return fname
    raise KeyError(name)


def traffic_bytes(name: str, pb: Problem | None = None) -> float:
    """Bytes per float32 parameter an in-place step of ``name`` (at TORCH_HP) must move:
    read and write the param and each slot, read the grad. With ``pb``, slots counted
    at their size for its arrays (the rule's ``layout``: Adafactor's factored moments
    of a matrix are a row and a column); without, every slot the param's size."""
    import polyopt

    cls = getattr(polyopt, name)
    shape = (2, 2) if needs_matrices(name) else (1,)
    probe = cls([np.zeros(shape, np.float32)], **TORCH_HP[name], impl="generic")
    names = list(probe.state.slots)
    rule = polyopt.OPTIMIZERS[functional_name(name)][0]().rule
    if pb is None or rule.layout is None:
        return 4 * (3 + 2 * len(names))
    hp = {**rule.defaults, **TORCH_HP[name]}
    slot_elems = 0
    for p in pb.params:
        shapes = rule.layout(tuple(p.shape), hp)
        slot_elems += sum(math.prod(s) for s in shapes.values() if s is not None)
    return 4 * (3 + 2 * slot_elems / pb.n_params)


def _polyopt_class_numpy(name: str) -> Callable:
    def build(pb: Problem) -> Callable[[], None]:
        import polyopt
        from polyopt import backends

        rule = polyopt.OPTIMIZERS[functional_name(name)][0]().rule
        if rule.elementwise and not backends.available(rule, "numpy"):
            raise Unavailable("n/a: numba not installed (pip install 'polyopt[fast]')")
        params, grads = [a.copy() for a in pb.params], [a.copy() for a in pb.grads]
        impl = "fused" if rule.elementwise else "generic"  # a rule that reduces: generic
        opt = getattr(polyopt, name)(params, **TORCH_HP[name], impl=impl)
        return lambda: opt.step(grads)

    return build


def _polyopt_functional_numpy(name: str) -> Callable:
    """polyopt's functional form on NumPy (new arrays each step), the stateful rows'
    implementation choice."""

    def build(pb: Problem) -> Callable[[], None]:
        import polyopt
        from polyopt import backends

        factory = polyopt.OPTIMIZERS[functional_name(name)][0]
        rule = factory().rule
        if rule.elementwise and not backends.available(rule, "numpy"):
            raise Unavailable("n/a: numba not installed (pip install 'polyopt[fast]')")
        impl = "fused" if rule.elementwise else "generic"
        opt = factory(**TORCH_HP[name], impl=impl)
        grads = [a.copy() for a in pb.grads]
        box = [[a.copy() for a in pb.params], None]
        box[1] = opt.init(box[0])

        def step():
            box[0], box[1] = opt.update(box[0], grads, box[1])

        return step

    return build


def _polyopt_class_torch(name: str) -> Callable:
    """polyopt's stateful form (``polyopt.<Name>``) on torch tensors, grads passed."""

    def build(pb: Problem) -> Callable[[], None]:
        _need("torch")
        import polyopt

        _, params, grads = _torch_tensors(pb)
        opt = getattr(polyopt, name)(params, **TORCH_HP[name])
        return lambda: opt.step(grads)

    return build


def _polyopt_functional_jax(name: str) -> Callable:
    def build(pb: Problem) -> Callable[[], None]:
        _need("jax")
        import polyopt

        jax, params, grads = _jax_arrays(pb)
        factory = polyopt.OPTIMIZERS[functional_name(name)][0]
        return _jax_step(jax, factory(**TORCH_HP[name]), params, grads)

    return build


def _optax_twin(name: str) -> Callable:
    def build(pb: Problem) -> Callable[[], None]:
        _need("jax")
        _need("optax")
        import optax

        if name not in OPTAX_TWINS:
            raise Unavailable(f"n/a: optax has no {name}")
        if pb.matrices and name in NO_TWIN_ON_MATRICES:
            raise Unavailable(NO_TWIN_ON_MATRICES[name])
        jax, params, grads = _jax_arrays(pb)
        return _optax_step(jax, optax, OPTAX_TWINS[name](optax), params, grads)

    return build


def _thinc_adam(pb: Problem) -> Callable[[], None]:
    """thinc's ``NumpyOps.adam`` on one flat float32 buffer per stream (its own layout:
    one call per step), torch's Adam hyperparameters."""
    _need("thinc")
    from thinc.api import NumpyOps

    ops = NumpyOps()
    w = np.concatenate(pb.params)
    g = np.concatenate(pb.grads)
    m, v = np.zeros_like(w), np.zeros_like(w)
    return lambda: ops.adam(w, g, m, v, 0.9, 0.999, 1e-8, 1e-3)


def optimizer_implementations(name: str) -> list[tuple[str, str, Callable]]:
    """``--optimizers``: polyopt's fast path for ``name`` on each library (stateful and
    functional on NumPy; polyopt.torch and the stateful form on torch tensors; jitted
    on JAX), and its peers."""
    fname = functional_name(name)
    rows = [
        (f"polyopt numpy {name}", "numpy", _polyopt_class_numpy(name)),
        (f"polyopt numpy {fname} functional", "numpy", _polyopt_functional_numpy(name)),
    ]
    if name == "Adam":
        rows.append(("thinc NumpyOps.adam (flat)", "numpy", _thinc_adam))
    rows.append((f"polyopt.torch.{name}", "torch", _adapter(name)))
    rows.append((f"polyopt torch {name}", "torch", _polyopt_class_torch(name)))
    rows += [(torch_row(name, m), "torch", _torch_class(name, m)) for m in torch_modes(name)]
    rows.append((f"polyopt jax {fname} jit", "jax", _polyopt_functional_jax(name)))
    rows.append(("optax twin jit", "jax", _optax_twin(name)))
    return rows


def optimizer_summary(name: str, rows: list[Row], pb: Problem, update_gbs: float) -> list[str]:
    """The goal ratios of one optimizer at one size: NumPy ÷ best peer, polyopt.torch ÷
    torch's fastest, JAX ÷ optax, and NumPy's share of the in-place stream bandwidth."""
    ms = {r.name: r.ms for r in rows if r.ms is not None}
    torch_best = min((v for k, v in ms.items() if k.startswith("torch.optim")), default=None)
    peers = [v for k, v in ms.items() if k.startswith(("torch.optim", "optax", "thinc"))]
    out = []
    mine = ms.get(f"polyopt numpy {name}")
    if mine and peers:
        gbs = traffic_bytes(name, pb) * pb.n_params / (mine * 1e-3) / 1e9
        vs_torch = f" ({mine / torch_best:.2f}x torch's fastest)" if torch_best else ""
        out.append(
            f"numpy {mine / min(peers):.2f}x best peer{vs_torch}, {gbs:.3g} GB/s = "
            f"{100 * gbs / update_gbs:.0f}% of the in-place stream"
        )
    if ms.get(f"polyopt.torch.{name}") and torch_best:
        out.append(f"torch {ms[f'polyopt.torch.{name}'] / torch_best:.2f}x torch's fastest")
    jx, twin = ms.get(f"polyopt jax {functional_name(name)} jit"), ms.get("optax twin jit")
    if jx and twin:
        out.append(f"jax {jx / twin:.2f}x optax")
    return out


def _main_optimizers(
    names, sizes, warmup, repeats, libs, sequential, matrices=False, quick=False
) -> int:
    threads = os.cpu_count() or 1
    update_gbs = max(bandwidth(256 * 2**20, t, "update") for t in sorted({1, threads}))
    print(
        "polyopt bench --optimizers: one float32 step of each optimizer (torch's defaults, "
        "SGD with momentum 0.9), polyopt's fast path on each library against its peers"
    )
    print(f"machine: {platform.machine()}, {threads} CPUs; libraries: {_versions()}")
    print(f"in-place stream (np.add(a, b, out=a), 256 MiB float32): {update_gbs:.3g} GB/s")
    summary = []
    for pb, todo in plan(names, sizes, matrices, quick):
        for name in todo:
            impls = optimizer_implementations(name)
            n_impls = sum(lib in libs for _, lib, _ in impls)
            interleave = not sequential and fits_interleaved(pb, n_impls)
            rows = run_size(pb, warmup, repeats, libs, interleave, impls)
            print()
            print(_torch_table(pb, name, rows, peers=("torch.optim", "optax", "thinc")))
            line = optimizer_summary(name, rows, pb, update_gbs)
            print("  " + "; ".join(line))
            summary.append(f"{name:<9} {pb.short}: " + "; ".join(line))
            sys.stdout.flush()
    print("\nsummary (ratios in the same run):")
    print("\n".join("  " + x for x in summary))
    print(
        f"\nms: median of {repeats} steps after {warmup} warm-up steps, "
        + ("one implementation after another" if sequential else "in interleaved rounds")
        + "; ratio: time / the fastest peer (torch.optim's modes, optax under jax.jit with "
        "donation, thinc for Adam). GB/s: the least traffic of the step (read and write "
        "param and slots, read grad) / time."
    )
    return 0


#: (name, library key for --libs, builder). Order = rows of the table.
IMPLEMENTATIONS: list[tuple[str, str, Callable]] = [
    ("polyopt numpy generic", "numpy", _polyopt_numpy("generic")),
    ("polyopt numpy fused", "numpy", _polyopt_numpy("fused")),
    ("polyopt numpy fused, flat", "numpy", _polyopt_numpy("fused", packed=True)),
    ("polyopt torch generic", "torch", _polyopt_torch("generic")),
    ("polyopt torch fused", "torch", _polyopt_torch("fused")),
    ("torch.optim for-loop", "torch", _torch_optim("loop")),
    ("torch.optim foreach", "torch", _torch_optim("foreach")),
    ("torch.optim fused", "torch", _torch_optim("fused")),
    ("optax.adamw jit", "jax", _optax),
    ("polyopt jax generic jit", "jax", _polyopt_jax("generic")),
    ("polyopt jax fused jit", "jax", _polyopt_jax("fused")),
    ("optax chain(clip, optax.adamw)", "jax", _optax_chain(False)),
    ("optax chain(clip, polyopt.optax.adamw)", "jax", _optax_chain(True)),
]
#: rows compared with each other under the table: (polyopt's, its peer)
CHAIN_ROWS = ("optax chain(clip, polyopt.optax.adamw)", "optax chain(clip, optax.adamw)")
LIBS = ("numpy", "torch", "jax")


# -- measuring -------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    ms: float | None = None  # median; None if unavailable
    note: str = ""
    times: list[float] = field(default_factory=list)


def bandwidth(
    nbytes: int,
    threads: int = 1,
    kind: str = "copy",
    repeats: int = 10,
    xp: Any = np,
    sync: Callable[[], None] | None = None,
) -> float:
    """GB/s moved by a stream over float32 arrays of ``nbytes`` each.

    ``kind="copy"``: ``copyto(dst, src)``, counted as read + write (2 × nbytes).
    ``kind="update"``: ``add(a, b, out=a)``, an in-place update like an optimizer
    step's, counted as 2 reads + 1 write (3 × nbytes). With ``threads`` > 1 the arrays
    are cut into that many slices processed at once (NumPy releases the GIL). The best
    of ``repeats`` runs: what the machine can do, the floor's premise. ``xp`` and
    ``sync``: another NumPy-like module and its device synchronisation (CuPy on a GPU,
    as ``benchmarks/gpu_adamw.py`` measures the device's bandwidth with this probe).
    """
    from concurrent.futures import ThreadPoolExecutor

    n = max(nbytes // 4, threads)
    a = xp.ones(n, dtype=xp.float32)
    b = xp.zeros(n, dtype=xp.float32)
    if kind == "copy":
        op, moved = (lambda x, y: xp.copyto(y, x)), 2
    elif kind == "update":
        op, moved = (lambda x, y: xp.add(x, y, out=x)), 3
    else:
        raise ValueError(f"kind must be 'copy' or 'update', got {kind!r}")
    cuts = np.linspace(0, n, threads + 1).astype(int)
    pairs = [(a[i:j], b[i:j]) for i, j in zip(cuts, cuts[1:])]
    with ThreadPoolExecutor(threads) as pool:

        def run():
            if threads == 1:
                op(a, b)
            else:
                list(pool.map(lambda xy: op(*xy), pairs))

        times = measure(run, 1, repeats, sync)  # warm-up: page faults are not bandwidth
    return moved * n * 4 / min(times) / 1e9


def measure(
    step: Callable[[], None], warmup: int, repeats: int, sync: Callable[[], None] | None = None
) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``step`` after ``warmup`` untimed
    ones; with ``sync`` (a device synchronisation) each time includes the step's work
    on the device, not only its launch."""
    done = sync or (lambda: None)
    for _ in range(warmup):
        step()
    done()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        done()
        times.append(time.perf_counter() - t0)
    return times


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def fits_interleaved(pb: Problem, n_impls: int) -> bool:
    """Whether every implementation's params, grads and two moments (16 bytes per float32
    parameter each) fit in half the free memory at once."""
    free = _available_memory()
    return free is None or 16 * pb.n_params * n_impls < free // 2


def run_size(
    pb: Problem,
    warmup: int,
    repeats: int,
    libs: Sequence[str],
    interleave: bool = True,
    implementations: Sequence[tuple[str, str, Callable]] | None = None,
) -> list[Row]:
    """Time every implementation in ``libs`` on ``pb``.

    ``interleave``: build (and warm up) all of them first, then time them in rounds of
    one step each, so that a machine whose speed drifts (other work, a noisy neighbour's
    memory traffic) slows every row alike; otherwise one after the other, holding one
    implementation's arrays at a time.

    Interleaved, this happens twice, building and running in the listed order and then
    in reverse, half the rounds each: the order matters. Measured with two
    ``jax.jit`` programs over 1000 arrays, the one compiled first ran up to 1.3x faster
    than an identical program compiled after it, in the same process; building both
    ways gives every row half its samples in each position.
    """
    impls = IMPLEMENTATIONS if implementations is None else implementations
    todo = [(name, build) for name, lib, build in impls if lib in libs]
    _freeze_heap()
    rows = [Row(name) for name, _ in todo]
    first = (repeats + 1) // 2
    passes = [(range(len(todo)), first), (range(len(todo))[::-1], repeats - first)]
    total = len(todo) * (repeats + (2 if interleave else 1))
    with (
        warnings.catch_warnings(),
        _cli.progress(total, pb.label, enabled=PROGRESS["on"], unit="step") as bar,
    ):
        warnings.simplefilter("ignore")  # e.g. JAX on a backend without donation
        if not interleave:
            for row, (_, build) in zip(rows, todo):
                step = _build(row, build, pb, warmup)
                bar.update(1)
                if step is not None:
                    row.times = measure(step, 0, repeats)
                bar.update(repeats)
                del step
                gc.collect()
        for order, rounds in passes if interleave else ():
            steps: dict[int, Callable[[], None]] = {}
            for i in order:
                step = None if rows[i].note else _build(rows[i], todo[i][1], pb, warmup)
                if step is not None:
                    steps[i] = step
                bar.update(1)
                gc.collect()
            for _ in range(rounds):
                for i in order:
                    if i not in steps:
                        continue
                    t0 = time.perf_counter()
                    steps[i]()
                    rows[i].times.append(time.perf_counter() - t0)
                bar.update(len(order))
            steps.clear()
            gc.collect()
    for row in rows:
        if row.times:
            row.ms = 1e3 * statistics.median(row.times)
            TIMED["rows"] += 1
    return rows


#: Whether run_size draws a progress bar (stderr); ``-q`` turns it off.
PROGRESS = {"on": True}
#: Rows run_size timed since main started (none: main exits 1).
TIMED = {"rows": 0}


def _freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's view (``gc.freeze``),
    so that the ``gc.collect()`` between implementations frees their arrays without
    walking the heap of torch, JAX and numba modules each time (measured: 0.43 s a
    collection in a process that imported them, 146 collections in ``bench --torch``)."""
    gc.freeze()


def _build(row: Row, build: Callable, pb: Problem, warmup: int) -> Callable[[], None] | None:
    """``build(pb)`` warmed up, or None with ``row.note`` saying why it cannot run."""
    try:
        step = build(pb)
        measure(step, warmup, 0)
        return step
    except Unavailable as e:
        row.note = str(e)
    except ImportError as e:
        row.note = f"n/a: {e}"
    return None


def _table(pb: Problem, rows: list[Row], copy_gbs: float) -> str:
    floor_ms = FLOOR_BYTES * pb.n_params / (copy_gbs * 1e9) * 1e3
    peers = [r.ms for r in rows if r.name in PEERS and r.ms is not None]
    best = min(peers) if peers else None
    head = ("implementation", "ms", "vs best peer", "GB/s", "% floor")
    lines = [f"{pb.label}  (floor {floor_ms:.3g} ms)", ""]
    body = []
    for r in rows:
        if r.ms is None:
            body.append((r.name, r.note, "", "", ""))
            continue
        ratio = f"{r.ms / best:.2f}x" if best else "-"
        gbs = FLOOR_BYTES * pb.n_params / (r.ms * 1e-3) / 1e9
        body.append((r.name, f"{r.ms:.3g}", ratio, f"{gbs:.3g}", f"{100 * floor_ms / r.ms:.0f}%"))
    w0 = max(len(head[0]), *(len(b[0]) for b in body))
    fmt = f"{{:<{w0}}}  {{:>9}}  {{:>12}}  {{:>7}}  {{:>7}}"
    lines.append(fmt.format(*head))
    lines.append(fmt.format("-" * w0, "-" * 9, "-" * 12, "-" * 7, "-" * 7))
    for b in body:
        if b[2] == "" and b[1].startswith("n/a"):
            lines.append(f"{b[0]:<{w0}}  {b[1]}")
        else:
            lines.append(fmt.format(*b))
    return "\n".join(lines)


def _versions() -> str:
    out = [f"numpy {np.__version__}"]
    for mod in ("numba", "torch", "jax", "optax"):
        if importlib.util.find_spec(mod) is None:
            out.append(f"{mod} not installed")
            continue
        try:
            m = __import__(mod)
            out.append(f"{mod} {m.__version__}")
        except Exception as e:  # pragma: no cover - a broken install
            out.append(f"{mod} broken ({type(e).__name__})")
    return ", ".join(out)


FOOTNOTE = """\
ms: median of {repeats} steps after {warmup} warm-up steps (first calls compile: numba, jax.jit);
  {order}.
vs best peer: time / the faster of torch.optim fused and optax.adamw jit (lower is better).
GB/s: 28 bytes/param / time. 28 bytes is the floor of an fp32 AdamW step: read p, g, m, v
  (16 B), write p, m, v (12 B); nothing can move less memory.
% floor: the floor's time / the measured time (100% = moving the 28 bytes as fast as this
  machine moves memory). The floor's time is 28 bytes/param divided by the best of four
  NumPy streams over {copy_mib} MiB float32 arrays, on 1 and on {threads} threads (slices,
  NumPy releases the GIL): np.copyto(dst, src) counted as read + write, and the in-place
  np.add(a, b, out=a) counted as 2 reads + 1 write. The second matters: a copy into
  another array also reads each destination line before writing it (write-allocate),
  traffic the read + write count does not see, while an in-place update writes lines it
  has just read, as an optimizer step does; on the copy alone, fused steps score over
  100%. Sizes that fit in cache can still beat the floor.
torch threads: {threads}. polyopt rows use the stateful form (in place) except jax (jit with
  donated params and state); torch.optim rows use .grad."""


def _png(path: str, results: list[tuple[Problem, list[Row], float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1,
        len(results),
        figsize=(6 * len(results), 0.45 * len(IMPLEMENTATIONS) + 1.6),
        squeeze=False,
    )
    from matplotlib.ticker import NullFormatter

    for ax, (pb, rows, copy_gbs) in zip(axes[0], results):
        floor_ms = FLOOR_BYTES * pb.n_params / (copy_gbs * 1e9) * 1e3
        timed = [r.ms for r in rows if r.ms is not None] or [floor_ms]
        left = min(floor_ms, *timed) / 2  # log scale: bars start here
        ax.set_xscale("log")
        ax.set_xlim(left, max(timed) * 3)
        for y, r in enumerate(rows[::-1]):
            if r.ms is None:
                ax.text(left, y, "  " + r.note, va="center", fontsize=8)
                continue
            color = (
                "#555555"
                if r.name in PEERS
                else ("#1f77b4" if r.name.startswith("polyopt") else "#aaaaaa")
            )
            ax.barh(y, r.ms - left, left=left, color=color)
            ax.text(r.ms, y, f" {r.ms:.3g}", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), [r.name for r in rows][::-1])
        ax.axvline(
            floor_ms, color="k", ls="--", lw=1, label=f"28 B/param floor ({floor_ms:.3g} ms)"
        )
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ms per fp32 AdamW step (log scale, lower is better)")
        ax.set_title(pb.label)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- memory mode -----------------------------------------------------------------------


def memory_rows(pb: Problem) -> list[tuple[str, int | None, str]]:
    """(name, extra bytes at peak during one step, note) for polyopt's NumPy paths:
    AdamW's generic and fused rows, then every optimizer's fused step."""
    out: list[tuple[str, int | None, str]] = []
    rows = [(name, build) for name, lib, build in IMPLEMENTATIONS if lib == "numpy"]
    rows += [
        (f"polyopt numpy {n} fused", _polyopt_class_numpy(n))
        for n in TORCH_HP
        if pb.matrices or not needs_matrices(n)  # Muon takes matrices only
    ]
    _freeze_heap()
    for name, build in rows:
        try:
            step = build(pb)
        except Unavailable as e:
            out.append((name, None, str(e)))
            continue
        step()  # warm-up: compilation and lazy imports are not the step's memory
        gc.collect()
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            step()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        out.append((name, peak - before, ""))
        TIMED["rows"] += 1
        step = None
        gc.collect()
    return out


def _memory_table(pb: Problem, rows) -> str:
    lines = [f"{pb.label}: extra memory allocated by one step (tracemalloc peak)", ""]
    w0 = max(len(r[0]) for r in rows)
    lines.append(f"{'implementation':<{w0}}  {'bytes':>12}  {'bytes/param':>11}")
    lines.append(f"{'-' * w0}  {'-' * 12}  {'-' * 11}")
    for name, nbytes, note in rows:
        if nbytes is None:
            lines.append(f"{name:<{w0}}  {note}")
        else:
            lines.append(f"{name:<{w0}}  {nbytes:>12,}  {nbytes / pb.n_params:>11.3g}")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polyopt bench",
        description="Time one float32 AdamW step: polyopt (NumPy, torch, JAX; generic and "
        "fused) against torch.optim.AdamW and optax.adamw, on the same arrays, and against "
        "the 28 bytes/param memory floor.",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help=f"vectors: TOTAL/TENSORS[,...] (default {DEFAULT_SIZES}; --quick: {QUICK_SIZES}); "
        "--shapes matrices: COUNTxROWSxCOLS[+...][,...] (default "
        f"{DEFAULT_MATRICES}; --quick: {QUICK_MATRICES}); counts take k, M, G or 1e4 notation",
    )
    p.add_argument(
        "--shapes",
        choices=SHAPES,
        default="vectors",
        help="the params: 1-D vectors (default) or 2-D matrices, which exercise Adafactor's "
        "factored moments; optimizers that take matrices only (Muon) run on matrices "
        "either way",
    )
    p.add_argument(
        "--quick", action="store_true", help="one small size, fewer repeats: a smoke test"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 10; quick 3)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 3; quick 1)"
    )
    p.add_argument(
        "--libs",
        default=",".join(LIBS),
        help=f"comma-separated subset of {','.join(LIBS)} (default all)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="time implementations one after the other (less memory) instead of in rounds",
    )
    p.add_argument("--png", metavar="PATH", help="also write a bar chart")
    p.add_argument(
        "--torch",
        action="store_true",
        help="instead: polyopt.torch.<Name> against torch.optim.<Name> (fused, foreach, "
        "for-loop) for every optimizer, float32, torch's .grad interface",
    )
    p.add_argument(
        "--optimizers",
        metavar="NAMES",
        help="instead: each optimizer's fast path on NumPy, torch and JAX against its peers "
        "(torch.optim's modes, optax, thinc for Adam); comma-separated class names or 'all'",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="instead of timing: extra bytes one step of polyopt's NumPy paths allocates",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``polyopt bench [options]``; the exit code: 0, or 1 if no row could run."""
    TIMED["rows"] = 0
    code = _main(argv)
    if code == 0 and TIMED["rows"] == 0:
        print(
            "polyopt bench: nothing ran: every row was n/a (see the notes above)", file=sys.stderr
        )
        return 1
    return code


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    PROGRESS["on"] = not args.quiet
    matrices = args.shapes == "matrices"
    try:
        if matrices:
            sizes = parse_matrices(
                args.sizes or (QUICK_MATRICES if args.quick else DEFAULT_MATRICES)
            )
        else:
            sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    except ValueError as e:
        _parser().error(f"--sizes: {e}")
    libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    bad = sorted(set(libs) - set(LIBS))
    if bad:
        _parser().error(f"--libs: unknown {bad}; choose from {', '.join(LIBS)}")
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    if args.memory:
        print("polyopt bench --memory: float32 AdamW, stateful form, after one warm-up step")
        for pb in make_problems(sizes, matrices):
            print()
            print(_memory_table(pb, memory_rows(pb)))
        print(
            "\nbytes: tracemalloc's peak during the step minus what was allocated before it "
            "(NumPy reports its array allocations to tracemalloc; a fused path should allocate "
            "nothing proportional to the parameter count)."
        )
        return 0

    if args.torch:
        return _main_torch(sizes, warmup, repeats, args.sequential, matrices, args.quick)
    if args.optimizers:
        known = {**{n.lower(): n for n in TORCH_HP}, **{functional_name(n): n for n in TORCH_HP}}
        given = [x.strip() for x in args.optimizers.split(",") if x.strip()]
        names = list(TORCH_HP) if given == ["all"] else [known.get(x.lower(), x) for x in given]
        bad = [x for x in names if x not in TORCH_HP]
        if bad:
            _parser().error(f"--optimizers: unknown {bad}; choose from {', '.join(TORCH_HP)}")
        return _main_optimizers(
            names, sizes, warmup, repeats, libs, args.sequential, matrices, args.quick
        )

    copy_bytes = (8 if args.quick else 256) * 2**20
    threads = os.cpu_count() or 1
    bw = {
        (kind, t): bandwidth(copy_bytes, t, kind)
        for kind in ("copy", "update")
        for t in sorted({1, threads})
    }
    copy_gbs = max(bw.values())
    print(
        f"polyopt bench: one float32 AdamW step (lr={HP['lr']:g}, weight_decay="
        f"{HP['weight_decay']:g}), same arrays for every implementation"
    )
    print(f"machine: {platform.machine()}, {threads} CPUs, Python {platform.python_version()}")
    print(f"libraries: {_versions()}")
    print(
        f"memory bandwidth (GB/s, float32 arrays of {copy_bytes // 2**20} MiB): "
        + ", ".join(f"{kind} {t} thread{'s' * (t > 1)} {v:.3g}" for (kind, t), v in bw.items())
        + f"; floor at the best, {copy_gbs:.3g} GB/s"
    )
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average before the run: {load} (other work on the machine skews timings)")
    except OSError:  # pragma: no cover - not on this platform
        pass
    results = []
    for pb in make_problems(sizes, matrices):
        n_impls = sum(lib in libs for _, lib, _ in IMPLEMENTATIONS)
        interleave = not args.sequential and fits_interleaved(pb, n_impls)
        if not args.sequential and not interleave:
            print(f"\n(not enough free memory to hold {n_impls} copies: timing one at a time)")
        rows = run_size(pb, warmup, repeats, libs, interleave)
        results.append((pb, rows, copy_gbs))
        print()
        print(_table(pb, rows, copy_gbs))
        ms = {r.name: r.ms for r in rows}
        if all(ms.get(n) for n in CHAIN_ROWS):
            print(
                f"in an optax chain with clipping: polyopt.optax.adamw "
                f"{ms[CHAIN_ROWS[0]] / ms[CHAIN_ROWS[1]]:.2f}x of optax.adamw"
            )
        sys.stdout.flush()
    print()
    print(
        FOOTNOTE.format(
            repeats=repeats,
            warmup=warmup,
            copy_mib=copy_bytes // 2**20,
            copy_gbs=copy_gbs,
            threads=threads,
            order="timed one implementation after another"
            if args.sequential
            else "timed in rounds of one step of each implementation, so that drifts of the\n"
            "  machine's speed (other work, memory traffic of neighbours) hit every row alike;\n"
            "  half the rounds with the implementations built and run in the listed order,\n"
            "  half in reverse (the order matters: a jax.jit program compiled first runs faster)",
        )
    )
    if args.png:
        _png(args.png, results)
        print(f"\nwrote {args.png}")
    return 0


def _main_torch(
    sizes, warmup: int, repeats: int, sequential: bool, matrices=False, quick=False
) -> int:
    print(
        "polyopt bench --torch: one float32 step of polyopt.torch.<Name> and of "
        "torch.optim.<Name>, same arrays, .grad set once"
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; libraries: {_versions()}")
    for pb, todo in plan(list(TORCH_HP), sizes, matrices, quick):
        for name in todo:
            impls = torch_implementations(name)
            rows = run_size(pb, warmup, repeats, ["torch"], not sequential, impls)
            print()
            print(_torch_table(pb, name, rows))
            sys.stdout.flush()
    print(
        f"\nms: median of {repeats} steps after {warmup} warm-up steps, "
        + ("one implementation after another" if sequential else "in interleaved rounds")
        + f"; hyperparameters {TORCH_HP} (else torch's defaults)."
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
