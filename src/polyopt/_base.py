"""The engine shared by every optimizer.

An optimizer is a :class:`Rule` (its math for one array, written once with array-API
operations) plus hyperparameters. :class:`Optimizer` turns a rule into the pure
``init`` / ``update`` pair; :func:`stateful` turns an optimizer factory into the
torch-like class (``AdamW(params).step(grads)``). Both forms run the same code path.

An update is all-or-nothing. It runs in two phases: :meth:`Optimizer._prepare` checks
every input, evaluates every schedule and computes (or, for an in-place fast path,
allocates and plans) everything, and may raise; the returned commit then writes (the
stateful form) and hands back the new state, and must not fail. So a step that raises
leaves params, state and step count as they were; the stateful form runs the commit
with Ctrl-C deferred (:func:`deferred_interrupt`), so an interrupt lands either before
the step or after it.

What the engine takes, for every rule and backend:

- missing gradients: a ``None`` in ``grads`` (or a torch param whose ``.grad`` is
  None) leaves that array and its state exactly as they were. Each array counts its
  own updates, as ``torch.optim`` counts per parameter: bias corrections (Adam),
  ``lr_decay`` (Adagrad) and SGD's first-step rule use that count, schedules the
  optimizer's (:attr:`OptState.counts`). A step where no array has a gradient is a
  no-op; the step count does not move.
- complex arrays, as pairs of reals (``torch.view_as_real``): the rule runs on a real
  view with a trailing axis of 2; the state is kept complex, like the param.
- hyperparameters that are 0-d arrays (torch tensors, JAX arrays and tracers), cast to
  the compute dtype; Python and NumPy numbers keep the host float64 math.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import functools
import inspect
import math
import operator
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

from . import _tree, _validate, _xp, backends
from . import flat as _flat

IMPLS = ("auto", "generic", "fused")

#: Key set in a group's evaluated hyperparameters when one of them is an array (cast to
#: the compute dtype per array by :meth:`Optimizer.step_args`).
ARRAYS = "_arrays"
#: Key of the statistics list a group's generic step returns beside its slots, for
#: :attr:`Rule.group` (never a slot name: slots are identifiers).
_STATS = "<stats>"
_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")


@dataclass(frozen=True)
class Rule:
    """The math of one optimizer family.

    - ``defaults``: hyperparameter names and default values (torch's).
    - ``check(hp)``: raise on invalid hyperparameters (one dict, defaults merged).
    - ``slots(hp)``: names of the per-array state entries these hyperparameters need.
    - ``init(p, hp, xp)``: initial value of each slot for array ``p``.
    - ``step(p, g, s, hp, t, xp)``: one update of one array; ``s`` maps slot name to
      array, ``t`` is the 1-based count of this array's updates (a Python int, or a 0-d
      array of the compute dtype under jit). Returns ``(new_p, new_s)``. Pure.
    - ``schedulable``: hyperparameters that may be a function of the step count.
    - ``elementwise``: ``step`` works element by element (every array operation is
      arithmetic or an elementwise function), so the fast paths derived from it apply
      (:mod:`polyopt.backends._derive`); False for a rule that reduces or reshapes
      (a factored second moment, an orthogonalization).
    - ``layout(shape, hp)``: for a rule whose slots depend on the array, each slot's
      shape for a param of ``shape`` (None: the array has no such slot; Adafactor's
      factored moments). Default: every slot has the param's shape.
    - ``counted(hp, t)``: numbers torch.optim keeps as per-parameter state that this
      rule computes from the array's update count ``t`` instead (NAdam's
      ``mu_product``): ``polyopt.torch`` keeps them in ``state[p]`` as torch does, so
      state dicts move between the two.
    - ``for_dtype(hp, dtype, xp)``: hyperparameters that depend on the param's own
      (storage) dtype, resolved before the step casts to the compute dtype (Adafactor's
      ``eps=(None, ...)``: torch's "the param dtype's eps").
    - ``group(stats, shared, hp, t, xp)``: for a rule whose state includes numbers of
      the whole parameter group (SWATS's switch criterion). ``step`` may return, besides
      its slots, *statistics* of its array (entries of ``new_s`` that are not slots: 0-d
      arrays, say sums over the array); after every array of a group has stepped,
      ``group`` gets the list of their statistics (arrays without a gradient give
      none), ``shared``, the group's values of the slots named in :attr:`shared` (0-d
      slots, one copy per array, all equal), and ``t``, the group's update count; it
      returns their new values, which every array's copy takes.

    A rule whose ``step`` is built by :func:`two_part` also exposes its two halves as
    :attr:`parts`, so a fast path can run the state update over many arrays at once
    and the parameter update per array (see ``polyopt.backends.jax``).
    """

    name: str
    defaults: Mapping[str, Any]
    check: Callable[[dict], None]
    slots: Callable[[dict], tuple[str, ...]]
    step: Callable[..., tuple[Any, dict]]
    init: Callable[[Any, dict, Any], dict] | None = None
    schedulable: tuple[str, ...] = ("lr", "weight_decay")
    elementwise: bool = True
    layout: Callable[[tuple, dict], Mapping[str, tuple | None]] | None = None
    for_dtype: Callable[[dict, Any, Any], dict] | None = None
    counted: Callable[[dict, int], Mapping[str, float]] | None = None
    group: Callable[..., Mapping[str, Any]] | None = None
    shared: tuple[str, ...] = ()

    @property
    def parts(self) -> tuple[Callable, Callable] | None:
        """``(update_slots, update_param)`` if ``step`` was built by :func:`two_part`."""
        return getattr(self.step, "parts", None)

    def init_slots(self, params: list, hp: dict, xp: Any) -> dict[str, list]:
        """The initial state of a group, ``{name: one array per param}``, allocated one
        slot after another (as optax allocates), not one param after another."""
        names = self.slots(hp)
        if self.init is None:
            return {name: [xp.zeros_like(p) for p in params] for name in names}
        per = [self.init(p, hp, xp) for p in params]
        return {name: [s.get(name) for s in per] for name in names}

    def slot_shapes(self, shape: tuple, hp: dict) -> dict[str, tuple | None]:
        """Each slot's shape for a param of ``shape`` (None: no such slot there)."""
        if self.layout is None:
            return {name: shape for name in self.slots(hp)}
        return dict(self.layout(shape, hp))


class two_part:  # noqa: N801 - used like a function: step = two_part(f, g)
    """A rule's ``step`` made of two halves, the math still written once:

    - ``update_slots(p, g, s, hp, t, xp) -> new_s``: the new state, elementwise;
    - ``update_param(p, g, new_s, hp, t, xp) -> new_p``: the new parameter from the
      new state.

    The step is their composition (the generic path runs exactly that); a fast path
    may run the first half on many arrays joined into one and the second per array.
    A class rather than a closure, so that optimizers pickle.
    """

    def __init__(self, update_slots: Callable, update_param: Callable):
        self.parts = (update_slots, update_param)
        self.__doc__ = f"{update_slots.__name__}, then {update_param.__name__}."

    def __call__(self, p, g, s, hp, t, xp):
        update_slots, update_param = self.parts
        new_s = update_slots(p, g, s, hp, t, xp)
        return update_param(p, g, new_s, hp, t, xp), new_s


class OptState(NamedTuple):
    """Functional optimizer state: a pytree (JAX), a plain tuple everywhere else.

    ``step``: how many updates have been applied (a Python int, or a 0-d int32 array
    for JAX so that ``jax.jit`` does not recompile each step).
    ``slots``: ``{slot name: tuple}``, the tuple holding one state array per parameter
    array (in flattening order, across groups), or ``None`` for an array whose group
    does not use that slot (say, AMSGrad on in one group only). Names are
    ``torch.optim``'s (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``...), so the
    first moment of array ``i`` is ``state.slots["exp_avg"][i]``. One tuple per slot,
    as optax keeps them, makes the state cheap to flatten: ``jax.jit`` dispatch walks
    two tuples rather than one dict per array. A fast path may hold a slot as a
    :class:`polyopt.flat.Packed` instead: a tuple-like sequence over one buffer (JAX).
    ``counts``: ``None`` while every array has been updated at every step; after a step
    in which some array had no gradient, the number of updates each array has had (a
    tuple of ints, or a 1-D int32 array when ``step`` is an array). The rule sees an
    array's own count (``torch.optim``'s per-parameter ``step``); schedules see ``step``.
    Under ``jax.jit`` the first missing gradient changes the state's structure (one
    recompilation).

    Attributes:
        step: the number of updates applied.
        slots: ``{slot name: tuple of arrays (or None), one per parameter array}``.
        counts: None, or each array's own update count.
    """

    step: Any
    slots: dict
    counts: Any = None

    def per_array(self, n: int | None = None) -> list[dict]:
        """The state as one dict of slots per parameter array, like torch's
        ``optimizer.state[p]``.

        Args:
            n: the number of parameter arrays; needed only for an optimizer that keeps
                no state (plain SGD), whose ``slots`` is empty.

        Returns:
            list: one ``{slot name: array}`` dict per parameter array (without the
            slots its group does not use).

        Raises:
            ValueError: the slots hold different numbers of arrays, or not ``n``.
        """
        sizes = sorted({len(arrays) for arrays in self.slots.values()})
        if n is None and len(sizes) <= 1:
            n = sizes[0] if sizes else 0
        if sizes and sizes != [n]:
            want = "the same number" if n is None else n
            raise ValueError(f"state slots hold {sizes} arrays each; expected {want}")
        return [
            {name: arrays[i] for name, arrays in self.slots.items() if arrays[i] is not None}
            for i in range(n)
        ]

    @staticmethod
    def slots_from_per_array(per_array: list[Mapping]) -> dict:
        """The inverse of :meth:`per_array`: ``{name: tuple}`` from one dict per array.

        Args:
            per_array: one ``{slot name: array}`` mapping per parameter array.

        Returns:
            dict: ``{slot name: tuple}``, None where an array lacks that slot; usable
            as :attr:`slots`.
        """
        names = sorted({name for entry in per_array for name in entry})
        return {name: tuple(entry.get(name) for entry in per_array) for name in names}


def _join_slots(parts: list[tuple[int, Mapping]]) -> dict:
    """``{name: tuple}`` over all arrays from per-group ``(count, {name: sequence})``;
    ``None`` where a group lacks a slot. Keys sorted, as ``jax.jit`` rebuilds dicts."""
    names = sorted({name for _, cols in parts for name in cols})
    if len(parts) == 1:
        cols = parts[0][1]
        return {name: _column(cols[name]) for name in names}
    out = {}
    for name in names:
        columns = [cols.get(name, (None,) * n) for n, cols in parts]
        if any(isinstance(c, _flat.Packed) for c in columns):
            out[name] = _flat.Packed.join(columns)
        else:
            out[name] = tuple(chain.from_iterable(columns))
    return out


def _column(seq: Any) -> Any:
    return seq if isinstance(seq, (tuple, _flat.Packed)) else tuple(seq)


def _group_label(i: int, grouped: bool) -> str:
    return f" (param group {i})" if grouped else ""


class _Paths:
    """The path of each leaf as the user wrote it, for messages (built only on error)."""

    def __init__(self, flat: list, grouped: bool, root: str, grads_per_group: bool = True):
        self.flat, self.grouped, self.root = flat, grouped, root
        self.per_group = grads_per_group
        self._paths: list | None = None

    def __call__(self, i: int) -> str:
        if self._paths is None:
            self._paths = []
            for gi, (_, structure) in enumerate(self.flat):
                if not self.grouped:
                    prefix = self.root
                elif self.root == "params" or not self.per_group:
                    prefix = f"{self.root}[{gi}]['params']"
                else:
                    prefix = f"{self.root}[{gi}]"
                self._paths.extend(structure.paths(prefix))
        return self._paths[i]


def _defaults_of(rule: Rule) -> tuple[frozenset, frozenset]:
    """(numeric hyperparameters, tuple-valued ones) of a rule, from its defaults."""
    numeric = frozenset(
        k for k, v in rule.defaults.items() if not isinstance(v, (bool, tuple, str))
    )
    tuples = frozenset(k for k, v in rule.defaults.items() if isinstance(v, tuple))
    return numeric, tuples


class Optimizer:
    """A pure optimizer: ``state = opt.init(params)``, ``params, state = opt.update(...)``.

    Built by the factories (``polyopt.adamw(...)``); not usually constructed directly.

    Args:
        rule: the optimizer's math (a :class:`Rule`).
        hyperparams: the values that differ from the rule's defaults.
        impl: ``"auto"`` (a fast path where polyopt has one for the params' library,
            else the generic rule), ``"generic"`` (the rule as written), or ``"fused"``
            (a fast path required: ValueError at ``init`` / ``update`` without one).

    Raises:
        ValueError: an unknown ``impl`` or a hyperparameter out of range.
        TypeError: an unknown hyperparameter name, or a schedule where none is taken.
    """

    def __init__(self, rule: Rule, hyperparams: Mapping[str, Any], impl: str = "auto"):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.rule = rule
        self.impl = impl
        unknown = set(hyperparams) - set(rule.defaults)
        if unknown:
            raise TypeError(
                f"{rule.name} got unknown hyperparameter(s) {sorted(unknown)}; "
                f"known: {sorted(rule.defaults)}"
            )
        self.hyperparams = self._check({**rule.defaults, **hyperparams}, "")
        self._checked: dict = {}  # group overrides already checked -> their hyperparameters

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"polyopt.{self.rule.name}({args})"

    # -- checks -----------------------------------------------------------------------

    def _check(self, hp: dict, where: str) -> dict:
        """``hp`` normalized (NumPy numbers as floats, pairs as tuples) and checked."""
        numeric, tuples = _defaults_of(self.rule)
        out = dict(hp)
        try:
            for name, value in hp.items():
                if callable(value) and not _xp.is_array(value):
                    if name not in self.rule.schedulable:
                        raise TypeError(f"{name} cannot be a schedule, got {value!r}")
                elif name in numeric:
                    out[name] = _validate.normalize(name, value)
                elif name in tuples:
                    n = len(self.rule.defaults[name])
                    if not isinstance(value, (tuple, list)) or len(value) != n:
                        raise ValueError(f"{name} must be a tuple of {n} numbers, got {value!r}")
                    default = self.rule.defaults[name]
                    out[name] = tuple(
                        x
                        if x is None and default[i] is None  # Adafactor's eps=(None, ...)
                        else _validate.normalize(f"{name}[{i}]", x)
                        for i, x in enumerate(value)
                    )
            self.rule.check(out)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{e}{where}") from None
        return out

    def _resolve(self, rest: list[dict], grouped: bool) -> list[dict]:
        """Each group's hyperparameters (defaults merged with its overrides), checked.
        Keys that are not hyperparameters (``initial_lr``, ``param_names``...) are
        ignored, as torch ignores them. Overrides seen before (the same values: a live
        param group from one step to the next) are not checked again."""
        known = self.rule.defaults
        out = []
        for i, o in enumerate(rest):
            mine = {k: v for k, v in o.items() if k in known}
            if not mine:
                out.append(self.hyperparams)  # checked at construction
                continue
            key = _cache_key(mine)
            hp = self._checked.get(key) if key is not None else None
            if hp is None:
                hp = self._check({**self.hyperparams, **mine}, _group_label(i, grouped))
                if key is not None:
                    if len(self._checked) >= 64:
                        self._checked.clear()
                    self._checked[key] = hp
            out.append(hp)
        return out

    @staticmethod
    def _check_arrays(leaves: list, what: str, path: Callable[[int], str]) -> Any:
        if not leaves:
            raise ValueError(f"{what} must contain at least one array, got an empty structure")
        xp = _xp.namespace(leaves, what, path)
        if not _xp.is_numpy(xp):  # NumPy has one device; elsewhere compare them
            _xp.check_same_device(leaves, what, path)
        if _xp.is_dask(xp):
            for i, p in enumerate(leaves):
                if any(d is None or d != d for d in p.shape):  # None or NaN: unknown size
                    raise ValueError(
                        f"{path(i)} has unknown shape {tuple(p.shape)}; give arrays of "
                        "known shape (dask: call .compute_chunk_sizes() first)"
                    )
        for dtype in set(map(_DTYPE, leaves)):  # each distinct dtype once
            if _xp.float_kind(xp, dtype) is None:
                i = next(i for i, p in enumerate(leaves) if p.dtype == dtype)
                raise TypeError(
                    f"{path(i)} has dtype {dtype}; optimizers need floating-point arrays "
                    "(real or complex)"
                )
        return xp

    # -- the pure pair ----------------------------------------------------------------

    def init(self, params: Any) -> OptState:
        """Initial state for ``params``.

        Args:
            params: one array, a list/tuple, a dict, any pytree, or torch-style groups
                (a list of dicts with a ``"params"`` entry and per-group
                hyperparameters); arrays of one library, floating point (real or
                complex).

        Returns:
            OptState: step 0 and the zero (or initial) state of every array.

        Raises:
            ValueError: an empty structure, or a hyperparameter a group overrides out
                of range.
            TypeError: arrays that are not floating point, or of several libraries.
        """
        trees, rest, grouped = _tree.split_groups(params)
        return self._init(trees, rest, grouped)

    def _init(self, trees: list, rest: list[dict], grouped: bool) -> OptState:
        groups = self._resolve(rest, grouped)
        flat = [_tree.flatten(t) for t in trees]
        leaves = [leaf for lv, _ in flat for leaf in lv]
        path = _Paths(flat, grouped, "params")
        xp = self._check_arrays(leaves, "params", path)
        fast = backends.lookup(self.rule, _xp.backend_name(leaves[0]), self.impl)
        parts = []
        with _xp.no_grad(xp):
            for gi, (hp, (lv, _)) in enumerate(zip(groups, flat)):
                hp0 = self._at_step(hp, 0, _group_label(gi, grouped))
                _check_limits(xp, hp0, lv, _group_label(gi, grouped))
                if fast is not None and fast.init is not None:  # e.g. flat state buffers
                    cols = fast.init(self.rule, xp, lv, hp0)
                else:
                    cols = self.rule.init_slots(lv, hp0, xp)
                parts.append((len(lv), cols))
        step = xp.asarray(0, dtype=xp.int32) if _xp.is_jax(xp) else 0
        return OptState(step, _join_slots(parts))

    def update(self, params: Any, grads: Any, state: OptState) -> tuple[Any, OptState]:
        """Apply one step; returns ``(new_params, new_state)`` and mutates nothing.

        Args:
            params: the params, in the structure ``init`` was given.
            grads: the structure of ``params``, with ``None`` for an array that has no
                gradient this step (it and its state are returned unchanged); with
                parameter groups, it may be the list of per-group trees (or the group
                dicts themselves). Each gradient has its param's shape, dtype, library
                and device.
            state: the state from :meth:`init` or the previous ``update``.

        Returns:
            tuple: ``(new_params, new_state)``; ``new_params`` in the structure (and
            container types) of ``params``.

        Raises:
            ValueError: a gradient (shape, dtype, device) or state that does not fit
                the params (naming the array, e.g. ``grads['w']``), or a schedule value
                out of range; nothing is changed.
            TypeError: a gradient of another library.
        """
        params = _tree.materialize(params)
        trees, rest, grouped = _tree.split_groups(params)
        commit = self._prepare(trees, rest, grouped, grads, state)
        new_trees, new_state = commit()
        return _tree.join_groups(params, new_trees, grouped), new_state

    def _prepare(
        self,
        trees: list,
        rest: list[dict],
        grouped: bool,
        grads: Any,
        state: OptState,
        inplace: bool = False,
        resolved: list[dict] | None = None,
        torch_grads: bool = False,
        amp: tuple | None = None,
    ) -> Callable[[], tuple[list, OptState]]:
        """Everything a step does that can fail: checks, schedules, the new arrays (or,
        for an in-place fast path, its plan). Returns the commit: a function that
        writes (``inplace``: the stateful form, into the params and state arrays) and
        returns ``(new trees, new state)``, and does not fail.

        For ``polyopt.torch``: ``resolved``, the groups' hyperparameters as
        :meth:`_resolve` gave them; ``torch_grads``, the grads are the params' ``.grad``
        (torch has checked their shape, dtype and device on assignment, and the
        optimizer that no param is listed twice), so those checks are not repeated;
        ``amp``, GradScaler's ``(grad_scale, found_inf)`` for the fast path's kernel
        (``backends.AmpUnsupported`` where it cannot take them)."""
        groups = self._resolve(rest, grouped) if resolved is None else resolved
        flat = [_tree.flatten(t) for t in trees]
        leaves = [leaf for lv, _ in flat for leaf in lv]
        if torch_grads:  # one list of .grad per group, in the groups' order
            grad_leaves, per_group = [g for gs in grads for g in gs], True
        else:
            grad_leaves, per_group = self._grad_leaves(grads, grouped, flat)
        gpath = _Paths(flat, grouped, "grads", per_group)
        ppath = _Paths(flat, grouped, "params")
        xp = self._check_arrays(leaves, "params", ppath)
        if inplace:
            _check_usable(xp, leaves, ppath, writes=True, distinct=torch_grads)
        present = [g is not None for g in grad_leaves]
        everything = all(present)
        given = grad_leaves if everything else [g for g in grad_leaves if g is not None]
        if given and not torch_grads:
            gidx = range(len(leaves)) if everything else [i for i, x in enumerate(present) if x]
            self._check_grads(xp, leaves, given, gidx, gpath)
        if not inplace:  # the stateful form made its state itself (init / load_state_dict)
            self._check_state(state, groups, flat, ppath)
        k = state.step
        # every schedule evaluated (and checked) before any array is touched
        hps = [self._at_step(hp, k, _group_label(gi, grouped)) for gi, hp in enumerate(groups)]
        sizes = [len(lv) for lv, _ in flat]
        starts = [sum(sizes[:gi]) for gi in range(len(sizes))]
        for gi, (hp_k, (lv, _)) in enumerate(zip(hps, flat)):
            _check_limits(xp, hp_k, lv, _group_label(gi, grouped))
        if not given:  # no array has a gradient: nothing to do, the count stays
            return lambda: (trees, state)

        fast = backends.lookup(self.rule, _xp.backend_name(leaves[0]), self.impl)
        complex_ = (
            [_xp.float_kind(xp, p.dtype) == "complex" for p in leaves]
            if any(_xp.float_kind(xp, dt) == "complex" for dt in set(map(_DTYPE, leaves)))
            else None
        )
        counts = state.counts
        tasks: list = []  # (group index, ids or None for the whole group, thunk)
        with _xp.no_grad(xp):
            for gi, hp_k in enumerate(hps):
                a, m = starts[gi], sizes[gi]
                names = self.rule.slots(hp_k)
                whole = (
                    counts is None
                    and (everything or all(present[a : a + m]))
                    and (complex_ is None or not any(complex_[a : a + m]))
                )
                if whole:  # the common case: the group as it is (flat / packed state kept)
                    s_l = {name: state.slots[name][a : a + m] for name in names}
                    thunk = self._task(
                        fast, xp, flat[gi][0], grad_leaves[a : a + m], s_l, hp_k, k, inplace, amp
                    )
                    tasks.append((gi, None, thunk))
                    continue
                ids = [j for j in range(a, a + m) if present[j]]
                for k_j, part in _by_count(ids, counts, k):
                    views = [complex_ is not None and complex_[j] for j in part]
                    p_l = [_real(xp, leaves[j], c) for j, c in zip(part, views)]
                    g_l = [_real(xp, grad_leaves[j], c) for j, c in zip(part, views)]
                    s_l = {
                        name: [_real(xp, state.slots[name][j], c) for j, c in zip(part, views)]
                        for name in names
                    }
                    thunk = self._task(fast, xp, p_l, g_l, s_l, hp_k, k_j, inplace, amp)
                    tasks.append((gi, (part, p_l, s_l, views), thunk))

        def commit() -> tuple[list, OptState]:
            with _xp.no_grad(xp):
                return assemble()

        def assemble() -> tuple[list, OptState]:
            new_leaves = list(leaves)
            columns: list = [None] * len(sizes)
            stats: list = [[] for _ in sizes]  # Rule.group's statistics, per group
            for gi, where, thunk in tasks:
                ps, ss = thunk()
                if _STATS in ss:
                    ss = dict(ss)
                    stats[gi] += ss.pop(_STATS)
                a, m = starts[gi], sizes[gi]
                if where is None:
                    new_leaves[a : a + m] = ps
                    columns[gi] = (m, ss)
                    continue
                part, p_in, s_in, views = where
                if columns[gi] is None:  # the group's old state; present arrays replaced
                    old = {n: list(state.slots[n][a : a + m]) for n in self.rule.slots(hps[gi])}
                    columns[gi] = (m, old)
                cols = columns[gi][1]
                for pos, j in enumerate(part):
                    new_leaves[j] = _back(xp, ps[pos], p_in[pos], leaves[j], views[pos])
                    for name, col in cols.items():
                        col[j - a] = _back(
                            xp, ss[name][pos], s_in[name][pos], state.slots[name][j], views[pos]
                        )
            for gi, col in enumerate(columns):
                if col is None:  # a group where no array had a gradient: as it was
                    a, m = starts[gi], sizes[gi]
                    names = self.rule.slots(hps[gi])
                    columns[gi] = (m, {n: state.slots[n][a : a + m] for n in names})
            if self.rule.group is not None:
                for gi, st in enumerate(stats):
                    if st:
                        columns[gi] = (sizes[gi], self._shared(xp, columns[gi][1], st, hps[gi], k))
            if inplace:
                for dst, src in zip(leaves, new_leaves):
                    if dst is not src:  # a fast path may have written in place already
                        _xp.write_into(xp, dst, src)
            new_trees, start = [], 0
            for (_, structure), m in zip(flat, sizes):
                new_trees.append(_tree.unflatten(structure, new_leaves[start : start + m]))
                start += m
            new_counts = None
            if counts is not None or not everything:
                new_counts = _advance(xp, counts, k, present)
            return new_trees, OptState(k + 1, _join_slots(columns), new_counts)

        return commit

    def _task(self, fast, xp, params, grads, slots, hp, k, inplace, amp=None) -> Callable:
        """The work for one run of arrays: a thunk giving ``(params, slots)``. Pure work
        is done now (it may fail); an in-place fast path plans now and writes in the
        thunk."""
        if amp is not None:
            if fast is None or not (inplace and fast.amp):
                raise backends.AmpUnsupported(f"no fused {self.rule.name} path takes grad_scale")
            return fast.inplace(self.rule, xp, params, grads, slots, hp, k, amp=amp)
        if fast is not None:
            if inplace and fast.inplace is not None:
                return fast.inplace(self.rule, xp, params, grads, slots, hp, k)
            result = fast.pure(self.rule, xp, params, grads, slots, hp, k)
        else:
            result = self._step_group(xp, params, grads, slots, hp, k)
        return lambda: result

    def _step_group(self, xp, params, grads, slots, hp, k) -> tuple[list, dict]:
        """The generic path for one group: the rule applied to each array in turn.
        ``slots`` is ``{name: sequence}`` for the group; returns ``(params, slots)``
        in the same form (lists)."""
        names = tuple(slots)
        new_params: list = []
        new_slots: dict = {name: [] for name in names}
        stats: list = []
        for j, (p, g) in enumerate(zip(params, grads)):
            new_p, new_s = self._step_one(xp, p, g, {n: slots[n][j] for n in names}, hp, k)
            new_params.append(new_p)
            for name in names:
                new_slots[name].append(new_s[name])
            if self.rule.group is not None:
                stats.append({n: v for n, v in new_s.items() if n not in slots})
        if self.rule.group is not None:
            new_slots[_STATS] = stats
        return new_params, new_slots

    def _shared(self, xp, cols: dict, stats: list, hp: dict, k: Any) -> dict:
        """A group's slots with its shared numbers (:attr:`Rule.shared`) updated by
        :attr:`Rule.group` from the statistics of the arrays that stepped: every array
        whose state holds them takes the new values, in its own dtype."""
        first = next(a for a in cols[self.rule.shared[0]] if a is not None)
        cdt, hp, t = Optimizer.step_args(xp, first.dtype, hp, k)
        shared = {
            n: xp.astype(next(a for a in cols[n] if a is not None), cdt) for n in self.rule.shared
        }
        stats = [{n: xp.astype(v, cdt) for n, v in s.items()} for s in stats]
        new = self.rule.group(stats, shared, hp, t, xp)
        out = dict(cols)
        for name, value in new.items():
            out[name] = tuple(
                None if a is None else _xp.as_array(xp, xp.astype(value, a.dtype))
                for a in cols[name]
            )
        return out

    @staticmethod
    def step_args(xp: Any, dtype: Any, hp: dict, k: Any) -> tuple[Any, dict, Any]:
        """``(compute dtype, hp, t)`` for a rule step on arrays of ``dtype`` after ``k``
        updates of them: ``t = k + 1`` as a Python int, or for an array ``k`` (jit) in
        the compute dtype. Array hyperparameters are cast to the compute dtype, so that
        they never change the params' dtype."""
        cdt = _xp.compute_dtype(xp, dtype)
        if hp.get(ARRAYS):
            hp = {n: _cast(xp, v, cdt) for n, v in hp.items()}
        if _xp.is_python_scalar(k):
            return cdt, hp, k + 1
        # traced / array step count: bias corrections in the state's float dtype
        return cdt, hp, xp.astype(k + 1, cdt)

    def _step_one(self, xp, p, g, slots, hp, k):
        if self.rule.layout is not None:  # the rule sees this array's own slots only
            mine = {n: a for n, a in slots.items() if a is not None}
            new_p, new_s = self._step_arrays(xp, p, g, mine, hp, k)
            return new_p, {**new_s, **{n: new_s.get(n) for n in slots}}
        return self._step_arrays(xp, p, g, slots, hp, k)

    def _step_arrays(self, xp, p, g, slots, hp, k):
        if self.rule.for_dtype is not None:
            hp = self.rule.for_dtype(hp, p.dtype, xp)
        cdt, hp, t = Optimizer.step_args(xp, p.dtype, hp, k)
        if cdt != p.dtype:
            p_c, g_c = xp.astype(p, cdt), xp.astype(g, cdt)
            s_c = {n: xp.astype(v, cdt) for n, v in slots.items()}
            new_p, new_s = self.rule.step(p_c, g_c, s_c, hp, t, xp)
            new_p = xp.astype(new_p, p.dtype)
            # slots are stored in the param's dtype; statistics (Rule.group) stay exact
            new_s = {n: xp.astype(v, p.dtype) if n in slots else v for n, v in new_s.items()}
        else:
            new_p, new_s = self.rule.step(p, g, dict(slots), hp, t, xp)
        return _xp.as_array(xp, new_p), {n: _xp.as_array(xp, v) for n, v in new_s.items()}

    # -- inputs -------------------------------------------------------------------------

    def _grad_leaves(self, grads: Any, grouped: bool, flat: list) -> tuple[list, bool]:
        """The gradient leaves (None where missing), and whether they were given per
        group (``grads[i]`` names group i) rather than as the groups' dicts."""
        if grads is None:
            raise ValueError("grads must be given (an array, list, tuple or dict), got None")
        grads = _tree.materialize(grads, "grads")
        if not grouped:
            return _tree.flatten_like(grads, flat[0][1], "grads"), True
        if len(flat) == 1 and not _tree.is_groups(grads):
            # one group: grads may be its tree, or a list holding its tree (one deeper,
            # so the two readings never both match)
            try:
                return _tree.flatten_like(grads, flat[0][1], "grads[0]"), True
            except ValueError:
                if not (isinstance(grads, (list, tuple)) and len(grads) == 1):
                    raise
        as_groups = _tree.is_groups(grads)
        grad_trees = [g["params"] for g in grads] if as_groups else grads
        if not isinstance(grad_trees, (list, tuple)) or len(grad_trees) != len(flat):
            raise ValueError(
                f"grads must hold one entry per parameter group ({len(flat)}), "
                f"got {type(grads).__name__}"
                + (f" of length {len(grads)}" if isinstance(grads, (list, tuple)) else "")
            )
        out = []
        for i, (gt, (_, structure)) in enumerate(zip(grad_trees, flat)):
            what = f"grads[{i}]['params']" if as_groups else f"grads[{i}]"
            out.extend(_tree.flatten_like(gt, structure, what, f"params[{i}]['params']"))
        return out, not as_groups

    @staticmethod
    def _check_grads(xp, leaves, grads, idx, path) -> None:
        """Grads: arrays of the params' library, each with its param's shape and dtype,
        on its device, dense."""
        gx = _xp.namespace(grads, "grads", lambda i: path(idx[i]))
        if gx is not xp:
            raise TypeError(
                f"grads must be arrays of the params' library: params are "
                f"{_xp.backend_name(leaves[0])} arrays, grads are "
                f"{_xp.backend_name(grads[0])} arrays"
            )
        mine = leaves if len(grads) == len(leaves) else [leaves[i] for i in idx]
        # the common case in a few passes at C speed; the loop finds the culprit
        if list(map(_SHAPE, grads)) != list(map(_SHAPE, mine)) or list(map(_DTYPE, grads)) != list(
            map(_DTYPE, mine)
        ):
            for g, i in zip(grads, idx):
                p = leaves[i]
                if g.shape != p.shape or g.dtype != p.dtype:
                    raise ValueError(
                        f"{path(i)} has shape {tuple(g.shape)} and dtype {g.dtype}, "
                        f"expected shape {tuple(p.shape)} and dtype {p.dtype} as in params"
                    )
        if _xp.is_torch(xp) and _xp.any_sparse(grads):
            for g, i in zip(grads, idx):
                layout = _xp.sparse_layout(g)
                if layout is not None:
                    raise TypeError(
                        f"{path(i)} is a sparse tensor ({layout}); polyopt's optimizers need "
                        "dense gradients: pass grad.to_dense() (every entry then counts as "
                        "a gradient of 0 where the sparse one had none, as in dense Adam)"
                    )
        if not _xp.is_numpy(xp):
            _xp.check_same_device(
                [leaves[idx[0]], *grads],
                "params and grads",
                lambda i: "the params" if i == 0 else path(idx[i - 1]),
            )

    def _check_state(self, state: Any, groups: list, flat_params: list, path: Callable) -> None:
        if not isinstance(state, OptState):
            raise TypeError(f"state must be the OptState from init(), got {type(state).__name__}")
        n = sum(len(lv) for lv, _ in flat_params)
        _check_step(state.step, "state.step")
        _check_counts(state.counts, state.step, n)
        slots = state.slots
        if not isinstance(slots, Mapping):
            raise TypeError(
                f"state.slots must be the dict of slot tuples from init(), got "
                f"{type(slots).__name__}"
            )
        group_names = [set(self.rule.slots(hp)) for hp in groups]
        need = set().union(*group_names)
        if set(slots) != need:
            raise ValueError(
                f"state holds the slots {sorted(slots)}, the hyperparameters need "
                f"{sorted(need)} (was amsgrad/momentum/centered changed after init?)"
            )
        columns = {}
        for name, arrays in slots.items():
            if not isinstance(arrays, (tuple, list, _flat.Packed)) or len(arrays) != n:
                got = (
                    len(arrays)
                    if isinstance(arrays, (tuple, list, _flat.Packed))
                    else type(arrays).__name__
                )
                raise ValueError(
                    f"state slot {name!r} holds {got} arrays but params has {n}; "
                    "was it made by init() on these params?"
                )
            columns[name] = _flat.describe(arrays)  # shapes and dtypes, nothing sliced
        i, ordered = 0, sorted(need)
        rule = self.rule
        for hp, (lv, _) in zip(groups, flat_params):
            for p in lv:
                want = rule.slot_shapes(tuple(p.shape), hp)
                for name in ordered:
                    a, shape = columns[name][i], want.get(name)
                    if (a is None) != (shape is None):
                        mine = sorted(n for n, sh in want.items() if sh is not None)
                        raise ValueError(
                            f"state.slots[{name!r}][{i}] is "
                            + ("None" if a is None else "an array")
                            + f", but the hyperparameters of {path(i)}'s group need "
                            f"{mine} (was amsgrad/momentum/centered changed after init?)"
                        )
                    if a is not None and (a[0] != shape or a[1] != p.dtype):
                        raise ValueError(
                            f"state.slots[{name!r}][{i}] has shape {a[0]} and dtype {a[1]}, "
                            f"but {path(i)} of shape {tuple(p.shape)} and dtype {p.dtype} "
                            f"needs shape {shape}; was the state made by init() on these "
                            "params?"
                        )
                i += 1

    @staticmethod
    def _at_step(hp: dict, k: Any, where: str = "") -> dict:
        """Hyperparameters at step ``k``: schedules evaluated and checked, host-resident
        0-d arrays read as Python floats (host float64 math, as for numbers)."""
        out = dict(hp)
        arrays = False
        for name, v in hp.items():
            if callable(v) and not _xp.is_array(v):
                v = out[name] = _scheduled(name, v, k, where)
            if type(v) is float or type(v) is int or isinstance(v, (bool, str)) or v is None:
                continue
            if isinstance(v, tuple):
                vals = tuple(_host(x) for x in v)
                out[name] = vals
                arrays = arrays or any(_xp.is_array(x) for x in vals)
            elif _xp.is_array(v):
                out[name] = _host(v)
                arrays = arrays or _xp.is_array(out[name])
        if arrays:
            out[ARRAYS] = True
        return out


_at_step = Optimizer._at_step


def _cache_key(overrides: dict) -> tuple | None:
    """A key for group overrides that are plain values (numbers, flags, tuples of them,
    schedule objects), or None when some value could change without changing its
    identity (an array, a list) and must be checked again."""
    items = []
    for k, v in overrides.items():
        t = type(v)
        if t is tuple:
            if not all(type(x) in (float, int) for x in v):
                return None
        elif t not in (float, int, bool) and not (callable(v) and not _xp.is_array(v)):
            return None
        items.append((k, t, v))
    try:
        return tuple(sorted(items, key=lambda kv: kv[0]))
    except TypeError:
        return None


def _scheduled(name: str, schedule: Callable, k: Any, where: str) -> Any:
    """``schedule(k)``, checked wherever its value is concrete: a real number, finite,
    >= 0. Under ``jax.jit`` the value is traced and cannot be checked; nor can it where a
    schedule scales an array hyperparameter (``lambda k: lr * eta(k)`` with ``lr`` a
    tracer, under ``jax.vmap`` over learning rates), whatever ``k`` is."""
    value = schedule(k)
    if _xp.is_python_scalar(k) and not _xp.is_array(value):  # host float64 math
        try:
            x = value = float(_validate.normalize(name, value))
        except (TypeError, ValueError):
            raise TypeError(
                f"{name} schedule gave {value!r:.80} at step {k}{where}; "
                "it must return a real number"
            ) from None
    elif _xp.is_array(value) or _xp.is_python_scalar(value):
        x = _xp.concrete_value(value)  # None under jit
    else:
        raise TypeError(
            f"{name} schedule gave {value!r:.80} at step {_int(k)}{where}; "
            "it must return a real number or a 0-d array"
        )
    if x is not None and not (x >= 0 and math.isfinite(x)):
        raise ValueError(
            f"{name} schedule gave {x!r} at step {_int(k)}{where}; it must be finite and >= 0"
        )
    return value


def _int(k: Any) -> Any:
    v = _xp.concrete_value(k)
    return int(v) if v is not None else k


def _host(x: Any) -> Any:
    if type(x) is float or type(x) is int:
        return x
    v = _xp.host_value(x)
    return x if v is None else v


def _cast(xp: Any, v: Any, cdt: Any) -> Any:
    if type(v) is tuple:
        return tuple(_cast(xp, x, cdt) for x in v)
    if _xp.is_array(v) and not isinstance(v, bool):
        return xp.astype(v, cdt)
    return v


def _check_step(step: Any, what: str) -> None:
    if isinstance(step, bool) or step is None:
        raise TypeError(f"{what} must be an int >= 0, got {step!r}")
    if type(step) is int:
        if step < 0:
            raise ValueError(f"{what} must be an int >= 0, got {step!r}")
        return
    if not _xp.is_array(step) or tuple(step.shape) != () or "int" not in str(step.dtype):
        raise TypeError(f"{what} must be an int >= 0 (or a 0-d integer array), got {step!r:.80}")
    v = _xp.concrete_value(step)
    if v is not None and v < 0:
        raise ValueError(f"{what} must be >= 0, got {int(v)}")


def _check_counts(counts: Any, step: Any, n: int) -> None:
    if counts is None:
        return
    if isinstance(counts, (tuple, list)):
        if len(counts) != n:
            raise ValueError(f"state.counts holds {len(counts)} counts but params has {n} arrays")
        top = step if type(step) is int else None
        for i, c in enumerate(counts):
            if isinstance(c, bool) or type(c) is not int or c < 0 or (top is not None and c > top):
                raise ValueError(f"state.counts[{i}] must be an int in [0, state.step], got {c!r}")
        return
    if _xp.is_array(counts) and tuple(counts.shape) == (n,) and "int" in str(counts.dtype):
        return
    raise TypeError(
        f"state.counts must be None, a tuple of {n} ints or an integer array of shape "
        f"({n},), got {counts!r:.80}"
    )


def _by_count(ids: list, counts: Any, k: Any) -> list[tuple[Any, list]]:
    """The arrays ``ids`` in runs that share an update count: ``[(count, ids)]``."""
    if counts is None:
        return [(k, ids)] if ids else []
    if isinstance(counts, (tuple, list)):
        runs: dict = {}
        for j in ids:
            runs.setdefault(counts[j], []).append(j)
        return list(runs.items())
    return [(counts[j], [j]) for j in ids]  # an array of counts (jit): one array each


def _advance(xp: Any, counts: Any, k: Any, present: list) -> Any:
    """The counts after a step in which the arrays ``present`` were updated."""
    if _xp.is_python_scalar(k):
        old = counts if counts is not None else (k,) * len(present)
        return tuple(c + 1 if x else c for c, x in zip(old, present))
    mask = xp.asarray([1 if x else 0 for x in present], dtype=xp.int32)
    old = counts if counts is not None else xp.zeros((len(present),), dtype=xp.int32) + k
    return old + mask


def _real(xp: Any, x: Any, is_complex: bool) -> Any:
    return _xp.as_real(xp, x) if is_complex and x is not None else x


def _back(xp: Any, new: Any, given: Any, original: Any, is_complex: bool) -> Any:
    """A result for a complex array as a complex array: the original one where a fast
    path wrote in place into the real view it was given, else a new one."""
    if not is_complex or new is None:
        return new
    if new is given:
        return original
    return _xp.as_complex(xp, new, original.dtype)


@functools.lru_cache(maxsize=128)
def _limits(xp: Any, cdt: Any) -> tuple[float, float, str]:
    info = xp.finfo(cdt)
    return float(info.smallest_normal), float(info.max), _dtype_name(cdt)


def _check_limits(xp: Any, hp: dict, leaves: list, where: str) -> None:
    """Hyperparameters the compute dtype cannot hold: an eps that flushes to zero would
    silently divide by zero; a value that overflows to inf would give inf or NaN."""
    eps = hp.get("eps")
    eps = eps if type(eps) is float and eps > 0 else None
    big = None  # the largest number among the hyperparameters, and its name
    for name, v in hp.items():
        for x in v if type(v) is tuple else (v,):
            if (type(x) is float or type(x) is int) and (big is None or abs(x) > big[1]):
                big = (name, abs(x), x)
    if eps is None and (big is None or big[1] < 3.3e38):  # within every float's range
        return
    for dt in {_xp.math_dtype(xp, d) for d in set(map(_DTYPE, leaves))}:
        tiny, huge, name = _limits(xp, dt)
        if eps is not None and eps < tiny:
            raise ValueError(
                f"eps={eps!r} underflows in {name} (smallest normal number {tiny:.3g}){where}; "
                "use a larger eps or higher-precision params"
            )
        if big is not None and big[1] > huge:
            raise ValueError(
                f"{big[0]}={big[2]!r} overflows {name} (largest finite {huge:.3g}){where}"
            )


def _check_usable(
    xp: Any, leaves: list, path: Callable, writes: bool, distinct: bool = False
) -> None:
    """For the stateful form: every array once (updated in place twice, or with two
    states, it would be wrong; ``distinct``: known already), and writable where the
    step writes in place."""
    if not distinct and len(set(map(id, leaves))) != len(leaves):
        seen: dict = {}
        for i, p in enumerate(leaves):
            if id(p) in seen:
                raise ValueError(
                    f"{path(i)} is the same array as {path(seen[id(p)])}; pass each array "
                    "once (for tied weights, add up their gradients)"
                )
            seen[id(p)] = i
    if writes:
        bad = _xp.not_writable(xp, leaves)
        if bad is not None:
            raise ValueError(f"{path(bad[0])} {bad[1]}")


# -- atomic commits -----------------------------------------------------------------------


try:  # the C module under `signal`, without its enum conversions (a few µs a step)
    import _signal as _signals
except ImportError:  # pragma: no cover - another Python implementation
    _signals = signal
_SIGINT = int(signal.SIGINT)


@contextlib.contextmanager
def deferred_interrupt():
    """Hold back Ctrl-C (SIGINT) until the block is done, then deliver it: the block
    (a step's commit) runs whole or not at all. Python runs signal handlers in the main
    thread only, so elsewhere there is nothing to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _signals.getsignal(_SIGINT)
    if previous is None:  # a handler installed outside Python: leave it alone
        yield
        return
    pending: list = []
    try:
        _signals.signal(_SIGINT, lambda signum, frame: pending.append(frame))
    except (ValueError, TypeError, OSError):  # no signals here (embedded interpreter...)
        yield
        return
    try:
        yield
    finally:
        _signals.signal(_SIGINT, previous)
        if pending:
            if callable(previous):
                previous(signal.SIGINT, pending[0])
            elif previous == signal.SIG_DFL:
                signal.raise_signal(_SIGINT)


# -- the stateful (torch-like) form ---------------------------------------------------


class StatefulOptimizer:
    """Torch-like optimizer object holding params and state; built by :func:`stateful`.

    ``step(grads)`` updates NumPy / CuPy / PyTorch arrays in place (the user's own
    objects, ``nn.Parameter`` included) and holds the new arrays for JAX: read them back
    from :attr:`params`. ``param_groups`` are live: changing ``opt.param_groups[0]["lr"]``
    takes effect at the next step, as in torch; keys that are not hyperparameters
    (``initial_lr``, names...) are kept and ignored.

    ``params`` may be any structure :func:`polyopt.init` takes, and also an iterator
    (``model.parameters()``, ``model.named_parameters()``: the names are kept and written
    to checkpoints as ``param_names``). Each array may appear only once; arrays the
    optimizer cannot write into (read-only NumPy arrays, torch inference tensors) are
    refused. Steps from several threads are serialized; the object pickles and deep-copies.

    Args:
        params: the parameters: any structure the functional form takes, torch-style
            groups, or an iterator of arrays or of ``(name, array)`` pairs.
        **hyperparams: the hyperparameters of the optimizer's factory (the class's
            signature lists them), checked as the factory checks them.
    """

    _factory: Callable[..., Optimizer]

    def __init__(self, params: Any, **hyperparams: Any):
        self._opt = type(self)._factory(**hyperparams)
        trees, rest, grouped = _tree.split_groups(params)
        self._grouped = grouped
        known = self._opt.rule.defaults
        self.param_groups = []
        for gi, (t, r) in enumerate(zip(trees, rest)):
            hp = {k: v for k, v in r.items() if k in known}
            hp = self._opt._check({**self._opt.hyperparams, **hp}, _group_label(gi, grouped))
            self.param_groups.append({**r, **hp, "params": t})
        self._lock = threading.RLock()
        state = self._opt._init(trees, rest, grouped)
        self._state = state._replace(step=0)  # host step count: float64 bias corrections
        flat = [_tree.flatten(t) for t in trees]
        leaves = [leaf for lv, _ in flat for leaf in lv]
        path = _Paths(flat, grouped, "params")
        _check_usable(self._xp, leaves, path, writes=_xp.writable(self._xp))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.param_groups)} group(s), step={self.step_count})"

    # pickling / deepcopy: the lock and the namespace are rebuilt, not copied
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_xp_cache")}

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._lock = threading.RLock()

    @property
    def _xp(self) -> Any:
        xp = self.__dict__.get("_xp_cache")
        if xp is None:
            leaves = [leaf for g in self.param_groups for leaf in _tree.flatten(g["params"])[0]]
            xp = self.__dict__["_xp_cache"] = _xp.namespace(leaves, "params")
        return xp

    @property
    def params(self) -> Any:
        """The parameters, in the structure they were given (the updated arrays for JAX)."""
        if self._grouped:
            return self.param_groups
        return self.param_groups[0]["params"]

    @property
    def state(self) -> OptState:
        """The functional state (read-only view; use state_dict() for a snapshot)."""
        return self._state

    @property
    def step_count(self) -> int:
        """The number of steps taken (steps where no array had a gradient do not count)."""
        return int(self._state.step)

    def step(self, grads: Any = None) -> None:
        """One update, in place (NumPy, CuPy, torch) or into :attr:`params` (JAX).

        Args:
            grads: the structure of params (``None`` for an array with no gradient this
                step); for torch tensors it may be omitted to use each parameter's
                ``.grad`` (a parameter whose ``.grad`` is None is skipped).

        Raises:
            ValueError: a gradient that does not fit its param (shape, dtype, device;
                naming it), or a hyperparameter out of range; params, state and step
                count are left as they were.
            TypeError: a gradient of another library.
        """
        with self._lock:
            if grads is None:
                grads = self._grads_from_attribute()
            groups = self.param_groups
            trees = [g["params"] for g in groups]
            rest = [{k: v for k, v in g.items() if k != "params"} for g in groups]
            inplace = _xp.writable(self._xp)
            commit = self._opt._prepare(trees, rest, self._grouped, grads, self._state, inplace)
            with deferred_interrupt():
                new_trees, new_state = commit()
                if not inplace:
                    for g, new in zip(groups, new_trees):
                        g["params"] = new
                self._state = new_state

    def _grads_from_attribute(self) -> Any:
        out = []
        for gi, g in enumerate(self.param_groups):
            leaves, structure = _tree.flatten(g["params"])
            grads = []
            for i, p in enumerate(leaves):
                if not hasattr(p, "grad"):
                    where = structure.paths(
                        f"params[{gi}]['params']" if self._grouped else "params"
                    )
                    raise ValueError(
                        f"grads were not given and {where[i]} has no .grad; "
                        "pass grads explicitly (only torch tensors carry .grad)"
                    )
                grads.append(p.grad)  # None: no gradient, skipped
            out.append(_tree.unflatten(structure, grads))
        return out if self._grouped else out[0]

    # -- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """A snapshot: ``{"step", "state": {i: {slot: array}}, "param_groups": [...]}``.

        Arrays are copies in the params' library, and nothing else is shared with the
        live optimizer either. Leaves are numbered across groups in flattening order,
        as in torch. After a step in which some array had no gradient, each entry also
        holds that array's own update count as ``"step"`` (torch's per-param step).
        Named params (``named_parameters()``) add ``"param_names"`` to their group.

        Returns:
            dict: the snapshot, for :meth:`load_state_dict` (and ``pickle`` /
            ``torch.save``).
        """
        with self._lock:
            xp = self._xp
            groups, start = [], 0
            for g in self.param_groups:
                lv, structure = _tree.flatten(g["params"])
                n = len(lv)
                entry = {k: _snapshot(xp, v) for k, v in g.items() if k != "params"}
                if structure.kind == "named" and "param_names" not in entry:
                    entry["param_names"] = list(structure.keys)
                entry["params"] = list(range(start, start + n))
                groups.append(entry)
                start += n
            state = {}
            for i, slots in enumerate(self._state.per_array(start)):
                state[i] = {name: _xp.copy(xp, a) for name, a in slots.items()}
                if self._state.counts is not None:
                    state[i]["step"] = int(self._state.counts[i])
            return {"step": self.step_count, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore a :meth:`state_dict` snapshot; everything is checked before anything
        changes, and the arrays are copied in (so the snapshot stays independent).
        A malformed dict (hand-edited, or through JSON) gets a ValueError or TypeError
        that says what is wrong, and changes nothing.

        Args:
            state_dict: a snapshot from :meth:`state_dict` of an optimizer of the same
                kind over params of the same structure, shapes and dtypes.

        Raises:
            ValueError: structure, shapes or values that do not fit.
            TypeError: entries of the wrong type.
        """
        with self._lock:
            self._load(state_dict)

    def _load(self, state_dict: Any) -> None:
        xp = self._xp
        keys = ["param_groups", "state", "step"]
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a dict with keys {keys}, got {type(state_dict).__name__}"
            )
        if set(state_dict) != set(keys):
            raise ValueError(
                f"state_dict must be a dict with keys {keys}, got {sorted(map(str, state_dict))}"
            )
        step = state_dict["step"]
        if isinstance(step, bool) or type(step) is not int or step < 0:
            raise ValueError(f"state_dict['step'] must be an int >= 0, got {step!r}")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError(
                f"state_dict['param_groups'] must be a list of dicts, got "
                f"{type(saved_groups).__name__}"
            )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        rule, known = self._opt.rule, self._opt.rule.defaults
        new_groups, leaves, start = [], [], 0
        for gi, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            where = f"state_dict['param_groups'][{gi}]"
            if not isinstance(saved, Mapping):
                raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
            lv = _tree.flatten(mine["params"])[0]
            ids = saved.get("params")
            if not isinstance(ids, (list, tuple)) or len(ids) != len(lv):
                got = len(ids) if isinstance(ids, (list, tuple)) else repr(ids)
                raise ValueError(
                    f"{where}['params'] must list the {len(lv)} params of this optimizer's "
                    f"group {gi}, got {got}"
                )
            hp = {k: v for k, v in saved.items() if k != "params"}
            checked = self._opt._check(
                {**self._opt.hyperparams, **{k: v for k, v in hp.items() if k in known}},
                _group_label(gi, self._grouped),
            )
            new_groups.append({**hp, **{k: checked[k] for k in hp if k in known}})
            leaves.extend((p, rule.slot_shapes(tuple(p.shape), checked)) for p in lv)
            start += len(lv)
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError(
                f"state_dict['state'] must be a dict {{index: {{slot: array}}}}, got "
                f"{type(saved_state).__name__}"
            )
        bad = [k for k in saved_state if isinstance(k, bool) or type(k) is not int]
        if bad:
            raise ValueError(
                f"state_dict['state'] keys must be the ints 0..{len(leaves) - 1}, got "
                f"{bad[0]!r} (a JSON round trip turns them into strings)"
            )
        if set(saved_state) != set(range(len(leaves))):
            raise ValueError(
                f"state_dict['state'] has entries for {len(saved_state)} arrays, "
                f"expected one for each of the {len(leaves)} params"
            )
        counts: list | None = None
        for i, (p, shapes) in enumerate(leaves):
            names = sorted(n for n, sh in shapes.items() if sh is not None)
            entry = saved_state[i]
            where = f"state_dict['state'][{i}]"
            if not isinstance(entry, Mapping):
                raise TypeError(
                    f"{where} must be a dict {{slot: array}}, got {type(entry).__name__}"
                )
            slots = {k: v for k, v in entry.items() if k != "step"}
            if set(slots) != set(names):
                raise ValueError(
                    f"{where} holds {sorted(map(str, slots))}, expected {sorted(names)}"
                )
            for name, a in slots.items():
                if not _xp.is_array(a) or isinstance(a, (int, float)):
                    raise TypeError(
                        f"{where}[{name!r}] must be an array, got {type(a).__name__} "
                        "(a JSON round trip turns arrays into lists)"
                    )
                if tuple(a.shape) != shapes[name] or _dtype_name(a.dtype) != _dtype_name(p.dtype):
                    raise ValueError(
                        f"{where}[{name!r}] has shape {tuple(a.shape)} and dtype "
                        f"{a.dtype}, expected shape {shapes[name]} and dtype {p.dtype}"
                    )
            if "step" in entry:
                c = entry["step"]
                c = _xp.concrete_value(c) if _xp.is_array(c) else c
                if isinstance(c, float) and c.is_integer():
                    c = int(c)  # torch keeps per-param steps as float tensors
                if isinstance(c, bool) or type(c) is not int or not 0 <= c <= step:
                    raise ValueError(f"{where}['step'] must be an int in [0, {step}], got {c!r}")
                counts = counts if counts is not None else [step] * len(leaves)
                counts[i] = c
        slots_list = []
        for i, (p, _) in enumerate(leaves):
            dev = _xp.device_of(p)  # each slot where its param lives (a JAX sharding too)
            entry = {n: a for n, a in saved_state[i].items() if n != "step"}
            slots_list.append(
                {n: _xp.copy(xp, xp.asarray(a, device=dev)) for n, a in entry.items()}
            )
        every = sorted({n for _, shapes in leaves for n in shapes})
        columns = {n: tuple(entry.get(n) for entry in slots_list) for n in every}
        new_counts = None if counts is None or all(c == step for c in counts) else tuple(counts)
        # everything checked and copied: now commit
        with deferred_interrupt():
            for mine, new in zip(self.param_groups, new_groups):
                mine.update(new)
            self._state = OptState(step, columns, new_counts)


def _snapshot(xp: Any, v: Any) -> Any:
    """A value for a checkpoint that shares nothing with the optimizer's own."""
    if _xp.is_array(v) and not isinstance(v, (int, float)):
        return _xp.copy(_xp.namespace([v], "value"), v)
    if type(v) is tuple:
        return tuple(_snapshot(xp, x) for x in v)
    return _copy.deepcopy(v)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def stateful(factory: Callable[..., Optimizer], name: str) -> type:
    """Build the torch-like class for an optimizer factory (same hyperparameters).

    Args:
        factory: the functional factory (``polyopt.adamw``).
        name: the class name (``"AdamW"``).

    Returns:
        type: a :class:`StatefulOptimizer` subclass whose constructor takes ``params``
        and then the factory's arguments; its docstring is the factory's, with
        ``params`` added to the arguments and without the factory's Returns section.
    """
    sig = inspect.signature(factory)
    params = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    cls = type(
        name,
        (StatefulOptimizer,),
        {
            "_factory": staticmethod(factory),
            "__doc__": (
                f"Stateful form of :func:`polyopt.{factory.__name__}`: "
                f"``opt = polyopt.{name}(params, ...)``, ``opt.step(grads)``.\n\n"
                + _class_doc(factory.__doc__ or "")
            ),
            "__module__": "polyopt",
        },
    )
    cls.__signature__ = sig.replace(parameters=params + list(sig.parameters.values()))  # type: ignore[attr-defined]
    return cls


_PARAMS_ARG = (
    "params: the parameters (any structure the functional form takes, torch-style\n"
    "    groups, or an iterator such as ``model.parameters()``)."
)


def _class_doc(doc: str) -> str:
    """A factory's docstring for its stateful class: ``params`` first among the
    arguments, no Returns section (the class returns an instance)."""
    return adapted_doc(doc, first=_PARAMS_ARG, returns=None)


def adapted_doc(
    doc: str,
    *,
    first: str | None = None,
    drop: tuple[str, ...] = (),
    last: str | None = None,
    returns: str | None = None,
) -> str:
    """A factory's docstring (cleaned of its indentation) for another form of it: the
    Google-style Args section gets ``first`` before its items and ``last`` after them,
    loses the items named in ``drop``; the Returns section is replaced by ``returns``
    (dropped if None). ``first``, ``last`` and ``returns`` are Args / Returns items,
    their continuation lines indented by 4."""
    lines = inspect.cleandoc(doc).split("\n")

    def section(title: str) -> tuple[int, int] | None:
        if title not in lines:
            return None
        a = lines.index(title) + 1
        b = a
        while b < len(lines) and (lines[b].startswith(" ") or not lines[b].strip()):
            b += 1
        while b > a and not lines[b - 1].strip():  # keep the blank line after it
            b -= 1
        return a, b

    def indent(item: str) -> list[str]:
        return ["    " + line for line in item.split("\n")]

    where = section("Args:")
    if where is not None:
        a, b = where
        items: list[list[str]] = []
        for line in lines[a:b]:
            if line.startswith("    ") and not line.startswith("     "):
                items.append([line])
            elif items:
                items[-1].append(line)
        kept = [it for it in items if it[0].strip().split(":", 1)[0] not in drop]
        body = (indent(first) if first else []) + [x for it in kept for x in it]
        body += indent(last) if last else []
        lines[a:b] = body
    where = section("Returns:")
    if where is not None:
        a, b = where
        if returns is None:
            del lines[a - 1 : b + 1]  # the title, the items and the blank line after
        else:
            lines[a:b] = indent(returns)
    return "\n".join(lines)


def scalar_sqrt(x: Any, xp: Any) -> Any:
    """sqrt of a host float or of a 0-d array (jit path)."""
    return math.sqrt(x) if _xp.is_python_scalar(x) else xp.sqrt(x)


def bias_correction(beta: Any, t: Any, xp: Any) -> Any:
    """``1 - beta**t``: float64 on the host for an int step and a number beta; else
    as ``-expm1(t·log(beta))``, which keeps the compute dtype's relative accuracy where
    ``1 - beta**t`` would cancel (beta = 0.999, small t)."""
    if _xp.is_python_scalar(beta):
        if _xp.is_python_scalar(t) or beta == 0:  # log(0) is undefined; 1 - 0**t = 1
            return 1 - beta**t
        return -xp.expm1(t * math.log(beta))
    return -xp.expm1(t * xp.log(beta))  # an array beta (vmap over betas, ...)


def after_first(t: Any, xp: Any) -> Any:
    """0 on the first step (t == 1), 1 after: lets a rule special-case step one under jit."""
    if _xp.is_python_scalar(t):
        return 0.0 if t == 1 else 1.0
    return xp.astype(t > 1, t.dtype)
