"""The one table of optimizer configurations that every conformance check runs.

Data only: a :class:`Case` is ``(id, name, hyperparams, groups)`` with ``name`` a key of
``polyopt.OPTIMIZERS``. A schedule is written as a :class:`Sched` spec (the name of a
``polyopt.schedules`` function and its arguments) so a test can build the same schedule
in another library (torch's LR schedulers, a hand-written reference) with
:func:`resolve_hyperparams`. :func:`make_problem` gives deterministic params and
gradient sequences. Adding an optimizer or option means adding a row here.

Tests that run one configuration per optimizer (checkpoints, errors, array
hyperparameters, the JAX, dask, strict and CuPy suites) take it from here too, by tag:
each optimizer has exactly one row tagged :data:`FULL` (every state slot its rows use,
most options, numbers only) and one tagged :data:`SCHEDULED` (every state slot, with
schedules as hyperparameters), found with :func:`richest`. A new optimizer without them
fails tests/test_case_table.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import OPTIMIZERS, schedules


@dataclass(frozen=True)
class Sched:
    """A schedule spec: ``kind`` names a polyopt.schedules function, ``args`` its kwargs.

    Args:
        kind: a name in ``polyopt.schedules`` (``"cosine"``).
        args: its keyword arguments (which may hold other specs, for ``join``).
    """

    kind: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One optimizer configuration. ``groups``: per-group overrides; when given, the
    problem's arrays are split into ``len(groups)`` torch-style parameter groups.
    ``missing``: ``(step, array)`` pairs (0-based) whose gradient is ``None``: that
    array skips that step; ``(step, ALL)`` makes every gradient of the step None.
    ``dtypes``: the dtypes the case runs in (None: all). ``tags``: :data:`FULL` or
    :data:`SCHEDULED` on the row :func:`richest` gives for its optimizer.

    Args:
        id: the row's unique name (``"adamw-amsgrad"``).
        name: the optimizer, a key of ``polyopt.OPTIMIZERS``.
        hyperparams: keyword arguments of its factory (:class:`Sched` for schedules).
        groups: per-group overrides, as above.
        missing: ``(step, array)`` pairs with no gradient, as above.
        dtypes: the dtypes the case runs in (None: all).
        tags: :data:`FULL` and/or :data:`SCHEDULED`.
    """

    id: str
    name: str
    hyperparams: dict = field(default_factory=dict)
    groups: tuple = ()
    missing: tuple = ()
    dtypes: tuple | None = None
    tags: tuple = ()

    def grads_at(self, step: int, grads: list) -> list:
        """``grads`` (one step's list) with the case's missing gradients set to None.

        Args:
            step: the 0-based step.
            grads: that step's gradients, one per array.

        Returns:
            list: the gradients, None where the case has none at ``step``.
        """
        gone = {i for k, i in self.missing if k == step}
        if ALL in gone:
            return [None] * len(grads)
        return [None if i in gone else g for i, g in enumerate(grads)]


#: Optimizers whose rule takes only some shapes, so that the shared problems (a 0-d
#: array, an empty one, a vector and a matrix: :data:`SHAPES`) cannot run them: Muon
#: orthogonalizes matrices and refuses anything else. Each is held to its reference by
#: a test module of its own (``tests/test_muon.py``); the table has no rows for them.
OWN_PROBLEMS = {"muon": "2-D params only"}


#: The optimizers of ``polyopt.OPTIMIZERS`` that the case table's rows cover: all but
#: :data:`OWN_PROBLEMS`, in ``OPTIMIZERS`` order.
NAMES = tuple(n for n in OPTIMIZERS if n not in OWN_PROBLEMS)
#: Of :data:`NAMES`, the optimizers whose rule is elementwise: those with fast paths
#: derived from the rule (the others reduce over an array and run the generic math).
ELEMENTWISE = tuple(n for n in NAMES if OPTIMIZERS[n][0]().rule.elementwise)


#: In ``Case.missing``: every array of the step.
ALL = -1

#: In ``Case.tags``: the optimizer's one row with every state slot and most options, all
#: of them plain numbers (they can be wrapped as 0-d arrays, or given to torch.optim).
FULL = "full"
#: In ``Case.tags``: the optimizer's one row with every state slot and schedules as
#: hyperparameters, so the step count drives the math.
SCHEDULED = "scheduled"

#: Missing gradients are about which arrays move, not rounding: float64, float32 and
#: complex128 (under jax.jit each pattern of missing grads is a compilation: JAX without
#: x64 runs them in float32).
_MISSING_DTYPES = ("float64", "float32", "complex128")

#: Adafactor refuses complex params (a factored moment of a pair of reals means nothing;
#: torch refuses them too); so does SWATS (its criterion projects real steps).
_REAL_DTYPES = ("float64", "float32", "float16", "bfloat16")

#: A pattern of missing gradients over the matrix's steps (arrays: 0-d, empty, (7,),
#: (3, 4)): array 2 starts late and skips again, array 0 skips now and then, step 3 has
#: none at all. Few distinct patterns: under jax.jit each one is a compilation.
MISSING = ((0, 2), (1, 2), (2, 0), (3, ALL), (5, 2), (6, 0), (8, 2), (9, 0))


def S(kind: str, **args: Any) -> Sched:
    """Shorthand for a :class:`Sched`: ``S("cosine", lr=0.1, T_max=30)``.

    Args:
        kind: a name in ``polyopt.schedules``.
        **args: its keyword arguments.

    Returns:
        Sched: the spec.
    """
    return Sched(kind, args)


_WARMUP_COSINE = S(
    "join",
    schedules=(
        S("linear_warmup", lr=0.01, warmup_steps=10, start_factor=0.1),
        S("cosine", lr=0.01, T_max=100, eta_min=1e-4),
    ),
    boundaries=(10,),
)

CASES: list[Case] = [
    # -- SGD -------------------------------------------------------------------------
    Case("sgd-plain", "sgd", dict(lr=0.05)),
    Case("sgd-default", "sgd", dict()),
    Case("sgd-momentum", "sgd", dict(lr=0.05, momentum=0.9)),
    Case("sgd-dampening", "sgd", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    Case("sgd-nesterov", "sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
    Case("sgd-l2-momentum", "sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
    Case("sgd-maximize", "sgd", dict(lr=0.05, maximize=True)),
    Case(
        "sgd-nesterov-l2-maximize",
        "sgd",
        dict(lr=0.02, momentum=0.8, nesterov=True, weight_decay=0.05, maximize=True),
        tags=(FULL,),
    ),
    Case("sgdw", "sgd", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    Case(
        "sgdw-momentum-dampening",
        "sgd",
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.1, decoupled_weight_decay=True),
    ),
    Case(
        "sgdw-nesterov-maximize-cosine",
        "sgd",
        dict(
            lr=S("cosine", lr=0.05, T_max=40),
            momentum=0.7,
            nesterov=True,
            weight_decay=0.2,
            maximize=True,
            decoupled_weight_decay=True,
        ),
        tags=(SCHEDULED,),
    ),
    Case("sgd-cosine", "sgd", dict(lr=S("cosine", lr=0.1, T_max=50, eta_min=1e-3), momentum=0.9)),
    Case(
        "sgd-steplr",
        "sgd",
        dict(lr=S("step_decay", lr=0.1, step_size=30, gamma=0.5), momentum=0.5, dampening=0.5),
    ),
    Case("sgd-constant-schedule", "sgd", dict(lr=S("constant", lr=0.02), weight_decay=0.01)),
    # -- Adagrad ---------------------------------------------------------------------
    Case("adagrad-default", "adagrad", dict()),
    Case("adagrad-lr_decay", "adagrad", dict(lr=0.1, lr_decay=0.01)),
    Case(
        "adagrad-lr_decay-l2-init",
        "adagrad",
        dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.5),
        tags=(FULL,),
    ),
    Case(
        "adagrad-eps-maximize-l2",
        "adagrad",
        dict(lr=0.1, eps=1e-3, weight_decay=0.05, maximize=True),
    ),
    Case(
        "adagrad-exponential",
        "adagrad",
        dict(lr=S("exponential", lr=0.1, gamma=0.98), lr_decay=0.005),
        tags=(SCHEDULED,),
    ),
    # -- RMSprop ---------------------------------------------------------------------
    Case("rmsprop-default", "rmsprop", dict()),
    Case("rmsprop-alpha-eps", "rmsprop", dict(lr=0.01, alpha=0.9, eps=1e-4)),
    Case("rmsprop-momentum", "rmsprop", dict(lr=0.005, momentum=0.9)),
    Case("rmsprop-centered", "rmsprop", dict(lr=0.005, centered=True)),
    Case(
        "rmsprop-centered-momentum-l2-maximize",
        "rmsprop",
        dict(lr=0.005, centered=True, momentum=0.5, weight_decay=0.1, maximize=True),
        tags=(FULL,),
    ),
    Case(
        "rmsprop-centered-warm-restarts",
        "rmsprop",
        dict(
            lr=S("cosine_warm_restarts", lr=0.01, T_0=10, T_mult=2, eta_min=1e-4),
            momentum=0.3,
            centered=True,
        ),
        tags=(SCHEDULED,),
    ),
    # -- Adadelta --------------------------------------------------------------------
    Case("adadelta-default", "adadelta", dict()),
    Case("adadelta-lr-rho-eps", "adadelta", dict(lr=0.5, rho=0.5, eps=1e-4), tags=(FULL,)),
    Case("adadelta-l2-maximize", "adadelta", dict(weight_decay=0.1, maximize=True)),
    Case(
        "adadelta-linear",
        "adadelta",
        dict(lr=S("linear", start=1.0, end=0.1, steps=80)),
        tags=(SCHEDULED,),
    ),
    # -- Adam ------------------------------------------------------------------------
    Case("adam-default", "adam", dict()),
    Case("adam-betas-eps", "adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6)),
    Case("adam-l2", "adam", dict(lr=0.01, weight_decay=0.1)),
    Case("adam-amsgrad", "adam", dict(lr=0.01, amsgrad=True)),
    Case(
        "adam-amsgrad-l2-maximize",
        "adam",
        dict(lr=0.01, amsgrad=True, weight_decay=0.05, maximize=True),
        tags=(FULL,),
    ),
    Case("adam-decoupled", "adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    Case(
        "adam-amsgrad-l2-warmup-cosine",
        "adam",
        dict(lr=_WARMUP_COSINE, amsgrad=True, weight_decay=0.01),
        tags=(SCHEDULED,),
    ),
    Case(
        "adam-l2-wd-schedule",
        "adam",
        dict(lr=0.01, weight_decay=S("step_decay", lr=0.1, step_size=40, gamma=0.5)),
    ),
    # -- AdamW -----------------------------------------------------------------------
    Case("adamw-default", "adamw", dict()),
    Case("adamw-wd", "adamw", dict(lr=0.01, weight_decay=0.1)),
    Case(
        "adamw-amsgrad-maximize-betas-eps",
        "adamw",
        dict(
            lr=0.01, betas=(0.85, 0.995), eps=1e-6, weight_decay=0.05, amsgrad=True, maximize=True
        ),
        tags=(FULL,),
    ),
    Case("adamw-coupled", "adamw", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=False)),
    Case("adamw-cosine", "adamw", dict(lr=S("cosine", lr=0.01, T_max=100), weight_decay=0.1)),
    Case(
        "adamw-warm-restarts",
        "adamw",
        dict(lr=S("cosine_warm_restarts", lr=0.01, T_0=20), weight_decay=0.05),
    ),
    Case("adamw-warmup-cosine", "adamw", dict(lr=_WARMUP_COSINE, weight_decay=0.1)),
    Case(
        "adamw-amsgrad-wd-schedule",
        "adamw",
        dict(
            lr=S("cosine", lr=0.01, T_max=60, eta_min=1e-3),
            weight_decay=S("exponential", lr=0.2, gamma=0.97),
            amsgrad=True,
        ),
        tags=(SCHEDULED,),
    ),
]

CASES += [
    # -- NAdam -----------------------------------------------------------------------
    Case("nadam-default", "nadam", dict()),
    Case("nadam-l2-momentum_decay", "nadam", dict(lr=0.01, weight_decay=0.1, momentum_decay=0.01)),
    Case(
        "nadamw-betas-eps-maximize",
        "nadam",
        dict(
            lr=0.01,
            betas=(0.8, 0.99),
            eps=1e-6,
            weight_decay=0.05,
            decoupled_weight_decay=True,
            maximize=True,
        ),
        tags=(FULL,),
    ),
    Case(
        "nadam-cosine",
        "nadam",
        dict(lr=S("cosine", lr=0.01, T_max=60), momentum_decay=0.1),
        tags=(SCHEDULED,),
    ),
    # -- RAdam -----------------------------------------------------------------------
    Case("radam-default", "radam", dict()),
    # β2 = 0.9: ρ∞ = 19, the rectified steps start at step 3
    Case(
        "radam-betas-l2", "radam", dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1), tags=(FULL,)
    ),
    Case(
        "radamw-maximize-eps",
        "radam",
        dict(lr=0.01, eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    ),
    Case(
        "radam-warmup-cosine",
        "radam",
        dict(lr=_WARMUP_COSINE, betas=(0.9, 0.95)),
        tags=(SCHEDULED,),
    ),
    # -- Adamax ----------------------------------------------------------------------
    Case("adamax-default", "adamax", dict()),
    Case(
        "adamax-betas-eps-l2",
        "adamax",
        dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1),
        tags=(FULL,),
    ),
    Case(
        "adamax-maximize-steplr",
        "adamax",
        dict(lr=S("step_decay", lr=0.01, step_size=20, gamma=0.5), maximize=True),
        tags=(SCHEDULED,),
    ),
    # -- Adafactor -------------------------------------------------------------------
    Case("adafactor-default", "adafactor", dict(), dtypes=_REAL_DTYPES),
    Case(
        "adafactor-lr-decay-d-eps",
        "adafactor",
        dict(lr=0.05, beta2_decay=-0.5, d=2.0, eps=(1e-8, 1e-2)),
        dtypes=_REAL_DTYPES,
    ),
    Case(
        "adafactor-wd-maximize",
        "adafactor",
        dict(lr=0.02, weight_decay=0.1, maximize=True),
        tags=(FULL,),
        dtypes=_REAL_DTYPES,
    ),
    Case(
        "adafactor-cosine-wd-schedule",
        "adafactor",
        dict(
            lr=S("cosine", lr=0.05, T_max=40),
            weight_decay=S("exponential", lr=0.1, gamma=0.97),
        ),
        tags=(SCHEDULED,),
        dtypes=_REAL_DTYPES,
    ),
    # -- LAMB ------------------------------------------------------------------------
    Case("lamb-default", "lamb", dict()),
    Case(
        "lamb-betas-eps-wd",
        "lamb",
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-4, eps_root=1e-8, weight_decay=0.1),
        tags=(FULL,),
    ),
    Case(
        "lamb-maximize-cosine-wd",
        "lamb",
        dict(lr=S("cosine", lr=0.01, T_max=30), weight_decay=0.05, maximize=True),
        tags=(SCHEDULED,),
    ),
    # -- schedule-free AdamW (its lr is not a schedule: the warmup is built in) ---------
    Case("schedule_free_adamw-default", "schedule_free_adamw", dict()),
    Case(
        "schedule_free_adamw-warmup-power-wd",
        "schedule_free_adamw",
        dict(
            lr=0.01,
            betas=(0.8, 0.99),
            eps=1e-6,
            weight_decay=0.05,
            warmup_steps=5,
            weight_lr_power=1.5,
        ),
        tags=(FULL,),
    ),
    Case(
        "schedule_free_adamw-wd-schedule",
        "schedule_free_adamw",
        dict(lr=0.01, weight_decay=S("cosine", lr=0.1, T_max=30), warmup_steps=3),
        tags=(SCHEDULED,),
    ),
    # -- SWATS (switches on these gradients: at step 88, 5, 38; the default never) -----
    Case("swats-default", "swats", dict(), dtypes=_REAL_DTYPES),
    Case(
        "swats-betas-wd-maximize",
        "swats",
        dict(lr=0.02, betas=(0.8, 0.99), eps=1.5e-2, weight_decay=0.05, maximize=True),
        tags=(FULL,),
        dtypes=_REAL_DTYPES,
    ),
    Case(
        "swats-cosine-wd-schedule",
        "swats",
        dict(
            lr=S("cosine", lr=0.01, T_max=30),
            eps=2.5e-3,
            weight_decay=S("cosine", lr=0.05, T_max=30),
        ),
        tags=(SCHEDULED,),
        dtypes=_REAL_DTYPES,
    ),
    Case("swats-switch", "swats", dict(lr=0.01, eps=1e-3), dtypes=_REAL_DTYPES),
    Case(
        "swats-groups",
        "swats",
        dict(lr=0.01, eps=1e-3),
        groups=(dict(), dict(eps=1e-9)),
        dtypes=("float64", "float32"),  # a group of one scalar: λ cancels towards 0
    ),
    # -- Lion ------------------------------------------------------------------------
    Case("lion-default", "lion", dict()),
    Case("lion-betas-wd", "lion", dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1), tags=(FULL,)),
    Case(
        "lion-maximize-cosine",
        "lion",
        dict(lr=S("cosine", lr=3e-3, T_max=40), weight_decay=0.0, maximize=True),
        tags=(SCHEDULED,),
    ),
]

CASES += [
    # -- parameter groups (torch convention): per-group overrides ----------------------
    Case(
        "adamw-groups-no-decay",
        "adamw",
        dict(lr=0.01, weight_decay=0.1),
        groups=(dict(), dict(weight_decay=0.0)),
    ),
    Case(
        "sgd-groups-lr-momentum",
        "sgd",
        dict(lr=0.05, momentum=0.9),
        groups=(dict(lr=0.01), dict(nesterov=True)),
    ),
    Case(
        "rmsprop-groups-centered",
        "rmsprop",
        dict(lr=0.005),
        groups=(dict(centered=True), dict(momentum=0.5, lr=S("cosine", lr=0.01, T_max=30))),
    ),
]

CASES += [
    # -- missing gradients: each array counts its own updates (torch's per-param step) --
    Case(
        "sgd-dampening-missing",
        "sgd",
        dict(lr=0.05, momentum=0.9, dampening=0.3),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "adagrad-lr_decay-missing",
        "adagrad",
        dict(lr=0.1, lr_decay=0.01),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "rmsprop-centered-missing",
        "rmsprop",
        dict(lr=0.005, centered=True, momentum=0.5),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "adadelta-missing",
        "adadelta",
        dict(weight_decay=0.1),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "adam-amsgrad-missing",
        "adam",
        dict(lr=0.01, amsgrad=True),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "adamw-cosine-missing",
        "adamw",
        dict(lr=S("cosine", lr=0.01, T_max=20), weight_decay=0.1),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "nadam-missing",
        "nadam",
        dict(lr=0.01, weight_decay=0.1),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "radam-missing",
        "radam",
        dict(lr=0.01, betas=(0.8, 0.9)),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "adamax-missing",
        "adamax",
        dict(lr=0.01, weight_decay=0.05),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "lion-missing",
        "lion",
        dict(lr=1e-3, weight_decay=0.1),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "adafactor-missing",
        "adafactor",
        dict(lr=0.02, weight_decay=0.05),
        missing=MISSING,
        dtypes=("float64", "float32"),
    ),
    Case(
        "lamb-missing",
        "lamb",
        dict(lr=0.01, weight_decay=0.05),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "schedule_free_adamw-missing",
        "schedule_free_adamw",
        dict(lr=0.01, warmup_steps=3),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
    Case(
        "swats-missing",
        "swats",
        dict(lr=0.01, eps=1e-3),
        missing=MISSING,
        dtypes=("float64", "float32"),
    ),
    Case(
        "adamw-groups-missing",
        "adamw",
        dict(lr=0.01, weight_decay=0.1),
        groups=(dict(), dict(weight_decay=0.0)),
        missing=MISSING,
        dtypes=_MISSING_DTYPES,
    ),
]

CASE_IDS = [c.id for c in CASES]


def tagged(tag: str) -> list[Case]:
    """The rows carrying ``tag`` (:data:`FULL`, :data:`SCHEDULED`), in table order.

    Args:
        tag: :data:`FULL` or :data:`SCHEDULED`.

    Returns:
        list: the :class:`Case` rows.
    """
    return [c for c in CASES if tag in c.tags]


def richest(name: str, tag: str = FULL) -> Case:
    """The one row of optimizer ``name`` tagged ``tag``: the configuration a test that
    runs one per optimizer uses.

    Args:
        name: a key of ``polyopt.OPTIMIZERS`` that :data:`NAMES` holds.
        tag: :data:`FULL` (plain numbers) or :data:`SCHEDULED` (schedules).

    Returns:
        Case: the row.

    Raises:
        LookupError: the table has no such row (or several), naming the optimizer.
    """
    rows = [c for c in tagged(tag) if c.name == name]
    if len(rows) != 1:
        ids = [c.id for c in rows]
        raise LookupError(
            f"the case table needs exactly one {name!r} row tagged {tag!r}, has {ids}"
        )
    return rows[0]


def resolve(value: Any, build: Callable[..., Any]) -> Any:
    """Turn every :class:`Sched` inside ``value`` into ``build(kind, **args)``."""
    if isinstance(value, Sched):
        return build(value.kind, **{k: resolve(v, build) for k, v in value.args.items()})
    if isinstance(value, tuple) and any(isinstance(v, Sched) for v in value):
        return tuple(resolve(v, build) for v in value)
    return value


def resolve_hyperparams(case: Case, build: Callable[..., Any]) -> dict:
    return {k: resolve(v, build) for k, v in case.hyperparams.items()}


def polyopt_schedule(kind: str, **args: Any) -> Any:
    """Build a polyopt schedule from a spec."""
    return getattr(schedules, kind)(**args)


def polyopt_hyperparams(case: Case) -> dict:
    """The case's hyperparameters with every :class:`Sched` built as a polyopt schedule.

    Args:
        case: a row of the case table.

    Returns:
        dict: keyword arguments for the optimizer's factory.
    """
    return resolve_hyperparams(case, polyopt_schedule)


# --------------------------------------------------------------------------------------
# Deterministic problems
# --------------------------------------------------------------------------------------

SHAPES: tuple[tuple[int, ...], ...] = ((), (0,), (7,), (3, 4))


def make_problem(
    steps: int, seed: int = 20240607, shapes=SHAPES, complex: bool = False
) -> tuple[list, list]:
    """``(params, grads)``: float64 arrays of ``shapes`` and ``steps`` lists of gradients.

    Gradients vary in scale from step to step (0.1 to ~3) and the (7,)-array gets exact
    zero entries on some steps, so zero gradients and changing magnitudes are exercised.
    All are ``np.ndarray`` (0-d arrays included), from a fixed-seed Generator.
    ``complex=True``: complex128 arrays, real and imaginary parts drawn independently
    (the real parts are the float64 problem's).

    Args:
        steps: the number of gradient lists to make.
        seed: the Generator's seed (the same seed gives the same problem).
        shapes: the arrays' shapes (by default a 0-d array, an empty one, a vector of
            7 and a 3 × 4 matrix).
        complex: make complex128 arrays.

    Returns:
        tuple: ``(params, grads)``: a list of arrays, and ``steps`` lists of gradients
        of the same shapes.
    """
    if complex:
        re_p, re_g = make_problem(steps, seed, shapes)
        im_p, im_g = make_problem(steps, seed + 1, shapes)
        params = [np.asarray(a + 1j * b) for a, b in zip(re_p, im_p)]
        grads = [[np.asarray(a + 1j * b) for a, b in zip(ra, ia)] for ra, ia in zip(re_g, im_g)]
        return params, grads
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), dtype=np.float64) for s in shapes]
    grads = []
    for k in range(steps):
        scale = 10.0 ** rng.uniform(-1.0, 0.5)
        gs = [np.asarray(scale * rng.standard_normal(s), dtype=np.float64) for s in shapes]
        if k % 10 == 3:
            for g in gs:
                if g.ndim == 1 and g.size:
                    g[::3] = 0.0
        grads.append(gs)
    return params, grads
