"""The engine shared by every optimizer.

An optimizer is a :class:`Rule` (its math for one array, written once with array-API
operations) plus hyperparameters. :class:`Optimizer` turns a rule into the pure
``init`` / ``update`` pair; :func:`stateful` turns an optimizer factory into the
torch-like class (``AdamW(params).step(grads)``). Both forms run the same code path:
the stateful form calls ``update`` and then writes the results back.

An update is all-or-nothing: every input is checked and every new array computed
before anything is handed back or written, so a step that raises leaves params,
state and step count as they were.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

from . import _tree, _xp, backends
from . import flat as _flat

IMPLS = ("auto", "generic", "fused")


@dataclass(frozen=True)
class Rule:
    """The math of one optimizer family.

    - ``defaults``: hyperparameter names and default values (torch's).
    - ``check(hp)``: raise on invalid hyperparameters (one dict, defaults merged).
    - ``slots(hp)``: names of the per-array state entries these hyperparameters need.
    - ``init(p, hp, xp)``: initial value of each slot for array ``p``.
    - ``step(p, g, s, hp, t, xp)``: one update of one array; ``s`` maps slot name to
      array, ``t`` is the 1-based step count (a Python int, or a 0-d array of the
      compute dtype under jit). Returns ``(new_p, new_s)``. Pure: never mutates.
    - ``schedulable``: hyperparameters that may be a function of the step count.

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
        return {name: [s[name] for s in per] for name in names}


def two_part(update_slots: Callable, update_param: Callable) -> Callable:
    """A rule's ``step`` made of two halves, the math still written once:

    - ``update_slots(p, g, s, hp, t, xp) -> new_s``: the new state, elementwise;
    - ``update_param(p, g, new_s, hp, t, xp) -> new_p``: the new parameter from the
      new state.

    The step is their composition (the generic path runs exactly that); a fast path
    may run the first half on many arrays joined into one and the second per array.
    """

    def step(p, g, s, hp, t, xp):
        new_s = update_slots(p, g, s, hp, t, xp)
        return update_param(p, g, new_s, hp, t, xp), new_s

    step.parts = (update_slots, update_param)  # type: ignore[attr-defined]
    step.__doc__ = f"{update_slots.__name__}, then {update_param.__name__}."
    return step


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
    """

    step: Any
    slots: dict

    def per_array(self, n: int | None = None) -> list[dict]:
        """The state as one dict of slots per parameter array, like torch's
        ``optimizer.state[p]``. ``n``: the number of parameter arrays; needed only
        for an optimizer that keeps no state (plain SGD), whose ``slots`` is empty."""
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
        """The inverse of :meth:`per_array`: ``{name: tuple}`` from one dict per array."""
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


class Optimizer:
    """A pure optimizer: ``state = opt.init(params)``, ``params, state = opt.update(...)``.

    Built by the factories (``polyopt.adamw(...)``); not usually constructed directly.
    """

    def __init__(self, rule: Rule, hyperparams: Mapping[str, Any], impl: str = "auto"):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.rule = rule
        self.impl = impl
        self.hyperparams = {**rule.defaults, **hyperparams}
        self._check(self.hyperparams, "")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"polyopt.{self.rule.name}({args})"

    # -- checks -----------------------------------------------------------------------

    def _check(self, hp: dict, where: str) -> None:
        unknown = set(hp) - set(self.rule.defaults)
        if unknown:
            raise TypeError(
                f"{self.rule.name} got unknown hyperparameter(s) {sorted(unknown)}{where}; "
                f"known: {sorted(self.rule.defaults)}"
            )
        for name, value in hp.items():
            if callable(value) and name not in self.rule.schedulable:
                raise TypeError(f"{name} cannot be a schedule{where}, got {value!r}")
        try:
            self.rule.check(hp)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{e}{where}") from None

    def _resolve(self, overrides: list[dict], grouped: bool) -> list[dict]:
        """Each group's hyperparameters (defaults merged with its overrides), checked."""
        groups = []
        for i, o in enumerate(overrides):
            hp = {**self.hyperparams, **o}
            self._check(hp, _group_label(i, grouped))
            groups.append(hp)
        return groups

    @staticmethod
    def _check_arrays(leaves: list, what: str) -> Any:
        if not leaves:
            raise ValueError(f"{what} must contain at least one array, got an empty structure")
        xp = _xp.namespace(leaves, what)
        if not _xp.is_numpy(xp):  # NumPy has one device; elsewhere compare them
            _xp.check_same_device(leaves, what)
        if _xp.is_dask(xp):
            for i, p in enumerate(leaves):
                if any(d is None or d != d for d in p.shape):  # None or NaN: unknown size
                    raise ValueError(
                        f"{what} leaf {i} has unknown shape {tuple(p.shape)}; give arrays of "
                        "known shape (dask: call .compute_chunk_sizes() first)"
                    )
        for dtype in {p.dtype for p in leaves}:  # each distinct dtype once
            if not xp.isdtype(dtype, "real floating"):
                i = next(i for i, p in enumerate(leaves) if p.dtype == dtype)
                raise TypeError(
                    f"{what} leaf {i} has dtype {dtype}; optimizers need floating-point arrays"
                )
        return xp

    # -- the pure pair ----------------------------------------------------------------

    def init(self, params: Any) -> OptState:
        """Initial state for ``params`` (one array, a list/tuple, a dict, or groups)."""
        trees, overrides = _tree.split_groups(params)
        return self._init(trees, overrides, _tree.is_groups(params))

    def _init(self, trees: list, overrides: list[dict], grouped: bool) -> OptState:
        groups = self._resolve(overrides, grouped)
        flat = [_tree.flatten(t) for t in trees]
        leaves = [leaf for lv, _ in flat for leaf in lv]
        xp = self._check_arrays(leaves, "params")
        fast = backends.lookup(self.rule.name, _xp.backend_name(leaves[0]), self.impl)
        parts = []
        with _xp.no_grad(xp):
            for gi, (hp, (lv, _)) in enumerate(zip(groups, flat)):
                _check_eps(xp, hp, lv, _group_label(gi, grouped))
                hp0 = _at_step(hp, 0, self.rule.schedulable)
                names = self.rule.slots(hp0)
                if fast is not None and fast.init is not None:  # e.g. flat state buffers
                    cols = fast.init(xp, lv, names)
                else:
                    cols = self.rule.init_slots(lv, hp0, xp)
                parts.append((len(lv), cols))
        step = xp.asarray(0, dtype=xp.int32) if _xp.is_jax(xp) else 0
        return OptState(step, _join_slots(parts))

    def update(self, params: Any, grads: Any, state: OptState) -> tuple[Any, OptState]:
        """Apply one step; returns ``(new_params, new_state)`` and mutates nothing.

        ``grads`` has the structure of ``params``; with parameter groups, it may be the
        list of per-group trees (or the group dicts themselves).
        """
        trees, overrides = _tree.split_groups(params)
        new_trees, new_state = self._apply(trees, overrides, _tree.is_groups(params), grads, state)
        return _tree.join_groups(params, new_trees), new_state

    def _apply(
        self,
        trees: list,
        overrides: list[dict],
        grouped: bool,
        grads: Any,
        state: OptState,
        inplace: bool = False,
    ) -> tuple[list, OptState]:
        """``update`` on per-group trees: returns the new trees and state. ``inplace``
        (the stateful form, after every check has passed) lets a fast path write into
        the params and state arrays instead of allocating new ones."""
        groups = self._resolve(overrides, grouped)
        flat = [_tree.flatten(t) for t in trees]
        leaves = [leaf for lv, _ in flat for leaf in lv]
        grad_leaves = self._grad_leaves(grads, grouped, flat)
        xp = self._check_arrays(leaves + grad_leaves, "params and grads")
        for i, (p, g) in enumerate(zip(leaves, grad_leaves)):
            if g.shape != p.shape or g.dtype != p.dtype:
                raise ValueError(
                    f"grads leaf {i} has shape {tuple(g.shape)} and dtype {g.dtype}, "
                    f"expected shape {tuple(p.shape)} and dtype {p.dtype} as in params"
                )
        if not inplace:  # the stateful form made its state itself (init / load_state_dict)
            self._check_state(state, groups, flat)
        for gi, (hp, (lv, _)) in enumerate(zip(groups, flat)):
            _check_eps(xp, hp, lv, _group_label(gi, grouped))

        fast = backends.lookup(self.rule.name, _xp.backend_name(leaves[0]), self.impl)
        k = state.step
        # every schedule evaluated (and checked) before any array is touched
        hps = [_at_step(hp, k, self.rule.schedulable) for hp in groups]
        new_leaves, parts = [], []
        with _xp.no_grad(xp):
            i = 0
            for hp_k, (lv, _) in zip(hps, flat):
                m = len(lv)
                g_lv = grad_leaves[i : i + m]
                s_lv = {name: state.slots[name][i : i + m] for name in self.rule.slots(hp_k)}
                if fast is not None:  # a fused group step: same math, fewer passes
                    ps, ss = fast.step(xp, lv, g_lv, s_lv, hp_k, k, inplace)
                else:
                    ps, ss = self._step_group(xp, lv, g_lv, s_lv, hp_k, k)
                new_leaves.extend(ps)
                parts.append((m, ss))
                i += m

        new_trees, start = [], 0
        for lv, structure in flat:
            new_trees.append(_tree.unflatten(structure, new_leaves[start : start + len(lv)]))
            start += len(lv)
        return new_trees, OptState(k + 1, _join_slots(parts))

    def _step_group(self, xp, params, grads, slots, hp, k) -> tuple[list, dict]:
        """The generic path for one group: the rule applied to each array in turn.
        ``slots`` is ``{name: sequence}`` for the group; returns ``(params, slots)``
        in the same form (lists)."""
        names = tuple(slots)
        new_params: list = []
        new_slots: dict = {name: [] for name in names}
        for j, (p, g) in enumerate(zip(params, grads)):
            new_p, new_s = self._step_one(xp, p, g, {n: slots[n][j] for n in names}, hp, k)
            new_params.append(new_p)
            for name in names:
                new_slots[name].append(new_s[name])
        return new_params, new_slots

    @staticmethod
    def step_args(xp: Any, dtype: Any, hp: dict, k: Any) -> tuple[Any, dict, Any]:
        """``(compute dtype, hp, t)`` for a rule step on arrays of ``dtype`` at the
        0-based step ``k``: ``t = k + 1`` as a Python int, or for an array ``k`` (jit)
        in the compute dtype, with array hyperparameters cast to it as well."""
        cdt = _xp.compute_dtype(xp, dtype)
        if _xp.is_python_scalar(k):
            return cdt, hp, k + 1
        # traced / array step count: bias corrections in the state's float dtype
        hp = {n: xp.astype(v, cdt) if _xp.is_array(v) else v for n, v in hp.items()}
        return cdt, hp, xp.astype(k + 1, cdt)

    def _step_one(self, xp, p, g, slots, hp, k):
        cdt, hp, t = Optimizer.step_args(xp, p.dtype, hp, k)
        if cdt != p.dtype:
            p_c, g_c = xp.astype(p, cdt), xp.astype(g, cdt)
            s_c = {n: xp.astype(v, cdt) for n, v in slots.items()}
            new_p, new_s = self.rule.step(p_c, g_c, s_c, hp, t, xp)
            new_p = xp.astype(new_p, p.dtype)
            new_s = {n: xp.astype(v, p.dtype) for n, v in new_s.items()}
        else:
            new_p, new_s = self.rule.step(p, g, dict(slots), hp, t, xp)
        return _xp.as_array(xp, new_p), {n: _xp.as_array(xp, v) for n, v in new_s.items()}

    def _grad_leaves(self, grads: Any, grouped: bool, flat: list) -> list:
        if grads is None:
            raise ValueError("grads must be given (an array, list, tuple or dict), got None")
        if not grouped:
            return _tree.flatten_like(grads, flat[0][1], "grads")
        if len(flat) == 1 and not _tree.is_groups(grads):
            # one group: grads may be its tree, or a list holding its tree (one deeper,
            # so the two readings never both match)
            try:
                return _tree.flatten_like(grads, flat[0][1], "grads")
            except ValueError:
                if not (isinstance(grads, (list, tuple)) and len(grads) == 1):
                    raise
        grad_trees, _ = _tree.split_groups(grads) if _tree.is_groups(grads) else (grads, None)
        if not isinstance(grad_trees, (list, tuple)) or len(grad_trees) != len(flat):
            raise ValueError(
                f"grads must hold one entry per parameter group ({len(flat)}), "
                f"got {type(grads).__name__}"
                + (f" of length {len(grads)}" if isinstance(grads, (list, tuple)) else "")
            )
        out = []
        for i, (gt, (_, structure)) in enumerate(zip(grad_trees, flat)):
            out.extend(_tree.flatten_like(gt, structure, f"grads[{i}]", f"params group {i}"))
        return out

    def _check_state(self, state: Any, groups: list, flat_params: list) -> None:
        if not isinstance(state, OptState):
            raise TypeError(f"state must be the OptState from init(), got {type(state).__name__}")
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
        n = sum(len(lv) for lv, _ in flat_params)
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
        for names, (lv, _) in zip(group_names, flat_params):
            for p in lv:
                for name in ordered:
                    a = columns[name][i]
                    if (a is None) == (name in names):
                        raise ValueError(
                            f"state for params leaf {i} "
                            + ("lacks" if a is None else "holds")
                            + f" {name!r}, its group's hyperparameters need {sorted(names)} "
                            "(was amsgrad/momentum/centered changed after init?)"
                        )
                    if a is not None and (a[0] != tuple(p.shape) or a[1] != p.dtype):
                        raise ValueError(
                            f"state for params leaf {i} has {name!r} of shape {a[0]} "
                            f"and dtype {a[1]}, expected {tuple(p.shape)} and {p.dtype}; "
                            "was it made by init() on these params?"
                        )
                i += 1


def _check_eps(xp: Any, hp: dict, leaves: list, where: str) -> None:
    """eps that flushes to zero in the compute dtype would silently divide by zero."""
    eps = hp.get("eps")
    if not eps:
        return
    for dt in {_xp.compute_dtype(xp, dtype) for dtype in {p.dtype for p in leaves}}:
        tiny = float(xp.finfo(dt).smallest_normal)
        if eps < tiny:
            raise ValueError(
                f"eps={eps!r} underflows in {dt} (smallest normal number {tiny:.3g}){where}; "
                "use a larger eps or higher-precision params"
            )


def _at_step(hp: dict, k: Any, schedulable: tuple) -> dict:
    """Hyperparameters at step ``k``: schedules evaluated, Python numbers kept as they are."""
    out = dict(hp)
    for name in schedulable:
        v = hp.get(name)
        if callable(v):
            value = v(k)
            if _xp.is_python_scalar(k):
                value = float(value)  # host step count: keep host float64 math
            if _xp.is_python_scalar(value) and not value >= 0:
                raise ValueError(f"{name} schedule gave {value!r} at step {k}; it must be >= 0")
            out[name] = value
    return out


# -- the stateful (torch-like) form ---------------------------------------------------


class StatefulOptimizer:
    """Torch-like optimizer object holding params and state; built by :func:`stateful`.

    ``step(grads)`` updates NumPy / CuPy / PyTorch arrays in place (the user's own
    objects, ``nn.Parameter`` included) and holds the new arrays for JAX: read them back
    from :attr:`params`. ``param_groups`` are live: changing ``opt.param_groups[0]["lr"]``
    takes effect at the next step, as in torch.
    """

    _factory: Callable[..., Optimizer]

    def __init__(self, params: Any, **hyperparams: Any):
        self._opt = type(self)._factory(**hyperparams)
        trees, overrides = _tree.split_groups(params)
        self._grouped = _tree.is_groups(params)
        self.param_groups = [
            {**self._opt.hyperparams, **o, "params": t} for t, o in zip(trees, overrides)
        ]
        state = self._opt._init(trees, overrides, self._grouped)
        self._state = state._replace(step=0)  # host step count: float64 bias corrections
        leaves = [leaf for g in self.param_groups for leaf in _tree.flatten(g["params"])[0]]
        self._xp = _xp.namespace(leaves, "params")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.param_groups)} group(s), step={self.step_count})"

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
        return int(self._state.step)

    def step(self, grads: Any = None) -> None:
        """One update. ``grads`` has the structure of params; for torch tensors it may be
        omitted to use each parameter's ``.grad``."""
        if grads is None:
            grads = self._grads_from_attribute()
        groups = self.param_groups
        trees = [g["params"] for g in groups]
        overrides = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        new_trees, new_state = self._opt._apply(
            trees, overrides, self._grouped, grads, self._state, inplace=_xp.writable(self._xp)
        )
        xp = self._xp
        if _xp.writable(xp):
            with _xp.no_grad(xp):
                for old, new in zip(trees, new_trees):
                    for dst, src in zip(_tree.flatten(old)[0], _tree.flatten(new)[0]):
                        if dst is not src:  # a fast path may have written in place already
                            _xp.write_into(xp, dst, src)
        else:
            for g, new in zip(groups, new_trees):
                g["params"] = new
        self._state = new_state

    def _grads_from_attribute(self) -> Any:
        out = []
        for gi, g in enumerate(self.param_groups):
            leaves, structure = _tree.flatten(g["params"])
            grads = []
            for i, p in enumerate(leaves):
                grad = getattr(p, "grad", None)
                if grad is None:
                    raise ValueError(
                        f"grads were not given and params group {gi} leaf {i} has no .grad; "
                        "pass grads explicitly (only torch tensors carry .grad)"
                    )
                grads.append(grad)
            out.append(_tree.unflatten(structure, grads))
        return out if self._grouped else out[0]

    # -- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """A snapshot: ``{"step", "state": {i: {slot: array}}, "param_groups": [...]}``.

        Arrays are copies in the params' library; nothing aliases the live state.
        Leaves are numbered across groups in flattening order, as in torch.
        """
        xp = self._xp
        groups, start = [], 0
        for g in self.param_groups:
            n = len(_tree.flatten(g["params"])[0])
            groups.append(
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": list(range(start, start + n)),
                }
            )
            start += n
        return {
            "step": self.step_count,
            "state": {
                i: {name: _xp.copy(xp, a) for name, a in slots.items()}
                for i, slots in enumerate(self._state.per_array(start))
            },
            "param_groups": groups,
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore a :meth:`state_dict` snapshot; everything is checked before anything
        changes, and the arrays are copied in (so the snapshot stays independent)."""
        xp = self._xp
        if not isinstance(state_dict, Mapping) or set(state_dict) != {
            "step",
            "state",
            "param_groups",
        }:
            raise ValueError(
                "state_dict must be a dict with keys ['param_groups', 'state', 'step'], got "
                + (
                    repr(sorted(state_dict))
                    if isinstance(state_dict, Mapping)
                    else type(state_dict).__name__
                )
            )
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict['step'] must be an int >= 0, got {step!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        new_groups, leaves = [], []
        for gi, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            lv = _tree.flatten(mine["params"])[0]
            if len(saved.get("params", ())) != len(lv):
                raise ValueError(
                    f"state_dict['param_groups'][{gi}] has {len(saved.get('params', ()))} "
                    f"params, this optimizer's group has {len(lv)}"
                )
            hp = {k: v for k, v in saved.items() if k != "params"}
            self._opt._check({**self._opt.hyperparams, **hp}, _group_label(gi, self._grouped))
            new_groups.append({**mine, **hp})
            leaves.extend((p, self._opt.rule.slots({**self._opt.hyperparams, **hp})) for p in lv)
        saved_state = state_dict["state"]
        if set(saved_state) != set(range(len(leaves))):
            raise ValueError(
                f"state_dict['state'] has entries for {len(saved_state)} arrays, "
                f"expected one for each of the {len(leaves)} params"
            )
        slots = []
        for i, (p, names) in enumerate(leaves):
            entry = saved_state[i]
            if set(entry) != set(names):
                raise ValueError(
                    f"state_dict['state'][{i}] holds {sorted(entry)}, expected {sorted(names)}"
                )
            for name, a in entry.items():
                if tuple(a.shape) != tuple(p.shape) or _dtype_name(a.dtype) != _dtype_name(p.dtype):
                    raise ValueError(
                        f"state_dict['state'][{i}][{name!r}] has shape {tuple(a.shape)} and dtype "
                        f"{a.dtype}, expected shape {tuple(p.shape)} and dtype {p.dtype}"
                    )
        for i, (p, _) in enumerate(leaves):
            dev = _xp.device_of(p)  # each slot where its param lives (a JAX sharding too)
            slots.append(
                {n: _xp.copy(xp, xp.asarray(a, device=dev)) for n, a in saved_state[i].items()}
            )
        columns = OptState.slots_from_per_array(slots)
        # everything checked and copied: now commit
        for mine, new in zip(self.param_groups, new_groups):
            mine.update(new)
        self._state = OptState(step, columns)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def stateful(factory: Callable[..., Optimizer], name: str) -> type:
    """Build the torch-like class for an optimizer factory (same hyperparameters)."""
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
                + (factory.__doc__ or "")
            ),
            "__module__": "polyopt",
        },
    )
    cls.__signature__ = sig.replace(parameters=params + list(sig.parameters.values()))  # type: ignore[attr-defined]
    return cls


def scalar_sqrt(x: Any, xp: Any) -> Any:
    """sqrt of a host float or of a 0-d array (jit path)."""
    return math.sqrt(x) if _xp.is_python_scalar(x) else xp.sqrt(x)


def bias_correction(beta: float, t: Any, xp: Any) -> Any:
    """``1 - beta**t``: float64 on the host for an int step; for an array step (jit) as
    ``-expm1(t·log(beta))`` with log(beta) taken in float64, which keeps float32's
    relative accuracy where ``1 - beta**t`` would cancel (beta = 0.999, small t)."""
    if _xp.is_python_scalar(t) or beta == 0:  # log(0) is undefined; 1 - 0**t = 1
        return 1 - beta**t
    return -xp.expm1(t * math.log(beta))


def after_first(t: Any, xp: Any) -> Any:
    """0 on the first step (t == 1), 1 after: lets a rule special-case step one under jit."""
    if _xp.is_python_scalar(t):
        return 0.0 if t == 1 else 1.0
    return xp.astype(t > 1, t.dtype)
