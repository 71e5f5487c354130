"""polyopt's optimizers as real ``torch.optim.Optimizer`` classes.

::

    import polyopt.torch
    opt = polyopt.torch.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=1000)
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()

Every optimizer of :data:`polyopt.OPTIMIZERS` is here under its stateful name, built
by :func:`adapter` from the same rule as ``polyopt.adamw`` / ``polyopt.AdamW``. Where
torch has a class of that name, the adapter subclasses it and keeps everything but
``step``: the constructor (arguments, defaults, validation, the exceptions it raises),
``param_groups`` and ``defaults``, per-parameter ``state[p]`` with torch's slot names
and ``step`` counters, ``state_dict`` / ``load_state_dict`` (so checkpoints move
between torch.optim and polyopt.torch both ways), ``zero_grad``, ``add_param_group``,
hooks, ``repr``, pickling. So ``isinstance(opt, torch.optim.AdamW)`` holds, and
schedulers, ``GradScaler``, DDP, ``ZeroRedundancyOptimizer``, FSDP, Lightning and the
Hugging Face Trainer treat it as the torch class. ``step`` runs polyopt's rule through
the engine: every check first, then the writes; a parameter whose ``.grad`` is None is
skipped and keeps its own ``step`` count, as in torch.

Implementation choice: ``fused=True`` runs polyopt's fused path (an error if polyopt
has none for this optimizer on torch), ``foreach=False`` the generic per-tensor rule,
and the default (``None``) or ``foreach=True`` the fastest path polyopt has (``impl=
"auto"``). ``capturable=True`` and ``differentiable=True`` are refused with a
RuntimeError: polyopt's step reads its step counts on the host and does not build an
autograd graph through the update.

Hyperparameters polyopt has and torch's class lacks (SGD's ``decoupled_weight_decay``)
are extra keyword arguments; they enter ``defaults`` and the param groups only when
given, so a default state dict is exactly torch's.
"""

from __future__ import annotations

import inspect
import operator
import threading
import warnings
from collections.abc import Callable
from typing import Any

try:
    import torch
except ModuleNotFoundError as e:  # torch itself missing, not something torch imports
    if e.name != "torch":
        raise
    raise ImportError("polyopt.torch needs PyTorch: pip install 'polyopt[torch]'") from None

from . import OPTIMIZERS, _base
from . import backends as _backends
from ._base import OptState, deferred_interrupt
from .backends import AmpUnsupported

__all__ = ["adapter"]

#: Constructor flags of torch.optim that choose how a step runs, not what it computes.
_FLAGS = ("foreach", "fused", "capturable", "differentiable")


#: The Args entry of the generated classes for what replaces ``impl`` (see the module).
_FLAGS_ARG = (
    "foreach, fused: torch's flags choose the implementation: ``fused=True`` requires\n"
    "    polyopt's fused path (an error where there is none), ``foreach=False`` runs the\n"
    "    generic rule, the default (None) or ``foreach=True`` the fastest path polyopt\n"
    '    has (``impl="auto"``). ``capturable`` and ``differentiable`` are refused.'
)


def _impl(defaults: dict) -> str:
    if defaults.get("fused"):
        return "fused"
    if defaults.get("foreach") is False:
        return "generic"
    return "auto"


_EMPTY: dict = {}
_GRAD, _SPARSE = operator.attrgetter("grad"), operator.attrgetter("is_sparse")


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps ``step`` counters in (float32, or float64 when that
    is torch's default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _Adapter(torch.optim.Optimizer):
    """What every polyopt.torch class adds to its torch base: ``step`` runs the rule."""

    _factory: Callable[..., _base.Optimizer]
    _extras: tuple[str, ...] = ()  # rule hyperparameters torch's constructor lacks
    _counted: bool = True  # keeps torch's per-param "step" (SGD: no, as in torch)

    # -- the engine, rebuilt lazily (torch's __getstate__ keeps only the three fields) --

    @property
    def _polyopt(self) -> _base.Optimizer:
        engine = self.__dict__.get("_polyopt_engine")
        key = (_impl(self.defaults), id(self.defaults))
        if engine is None or self.__dict__.get("_polyopt_key") != key:
            known = type(self)._factory().rule.defaults
            hp = {k: v for k, v in self.defaults.items() if k in known}
            engine = type(self)._factory(impl=_impl(self.defaults), **hp)
            self.__dict__["_polyopt_engine"], self.__dict__["_polyopt_key"] = engine, key
        return engine

    @property
    def _polyopt_lock(self) -> threading.RLock:
        return self.__dict__.setdefault("_polyopt_lock_", threading.RLock())

    def _check_flags(self) -> None:
        name = type(self).__name__
        for flag in ("capturable", "differentiable"):
            if self.defaults.get(flag):
                raise RuntimeError(
                    f"polyopt.torch.{name} does not support {flag}=True (its step reads "
                    f"step counts on the host and builds no autograd graph); use "
                    f"torch.optim.{name}({flag}=True) for that"
                )
        if self.defaults.get("fused"):
            rule = type(self)._factory().rule.name
            if not _backends.available(rule, "torch"):
                raise RuntimeError(
                    f"polyopt.torch.{name}: fused=True, but polyopt has no fused {rule} "
                    "step for torch tensors; leave fused unset (the fastest path polyopt "
                    "has) or pass foreach=False (the generic rule)"
                )

    def __getstate__(self) -> dict:
        return {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups}

    # -- the step ------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a ``.grad``; returns ``closure()``'s
        loss if a closure is given (it is called with grad enabled, as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            _compiled_warning(type(self).__name__)
        _run(self, getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        return loss


_WARNED: set = set()


@torch._dynamo.disable
def _compiled_warning(name: str) -> None:
    if name in _WARNED:
        return
    _WARNED.add(name)
    warnings.warn(
        f"polyopt.torch.{name}.step runs eagerly under torch.compile (a graph break): "
        "the rest of the compiled function is compiled as usual",
        stacklevel=3,
    )


class _Steps:
    """torch.optim's per-param ``step`` counters, kept as 0-d views into one buffer.

    torch.optim reads and increments one 0-d tensor per param (``_foreach_add_`` over
    them costs ~2 µs per tensor on CPU: 2 ms a step for 1000 tensors, as much as the
    fused kernel). Here the counters a step sees are views of one buffer, so reading them
    is one ``tolist`` and incrementing them one ``add_``. They are still the 0-d
    float tensors torch keeps in ``state[p]["step"]``, so state dicts keep torch's
    format. Counters put there by anyone else (a loaded torch.optim checkpoint) are read
    one by one and joined into a new buffer at the next commit.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.ids: list = []

    def read(self, steps: list) -> tuple[list, bool]:
        """The counts as ints, and whether ``steps`` are this buffer's views."""
        if not steps:
            return [], False
        if self.buffer is not None and list(map(id, steps)) == self.ids:
            return self.buffer.to(torch.int64).tolist(), True
        try:
            return torch.stack(steps).to(torch.int64).tolist(), False
        except RuntimeError:  # counters on several devices
            return [int(t) for t in steps], False

    def advance(
        self, views: list, present: list, counts: list, mine: bool, found_inf: Any = None
    ) -> None:
        """Add one to the counter of every param updated (``present``); ``views`` are the
        state dicts (those without a counter are skipped). ``found_inf``: GradScaler's
        0-d tensor, nonzero when the step was skipped (then nothing moves; read on the
        device, without a host sync)."""
        rows = [(v, x, c) for v, x, c in zip(views, present, counts) if "step" in v]
        if not (mine and self.buffer is not None):
            first = rows[0][0]["step"]
            if any(
                v["step"].device != first.device or v["step"].dtype != first.dtype
                for v, _, _ in rows
            ):  # counters on several devices: one by one, as torch does
                steps = [v["step"] for v, x, _ in rows if x]
                torch._foreach_add_(steps, 1)
                if found_inf is not None:
                    torch._foreach_sub_(steps, [found_inf.to(s.device, s.dtype) for s in steps])
                self.buffer, self.ids = None, []
                return
            # join the counters into a new buffer, at their values before this step
            self.buffer = torch.tensor(
                [float(c) for _, _, c in rows], dtype=first.dtype, device=first.device
            )
            for (v, _, _), t in zip(rows, self.buffer.unbind()):
                v["step"] = t
            self.ids = [id(v["step"]) for v, _, _ in rows]
        buf = self.buffer
        if all(x for _, x, _ in rows):
            inc = 1 if found_inf is None else 1 - found_inf.to(buf.device, buf.dtype)
        else:
            inc = torch.tensor([1.0 if x else 0.0 for _, x, _ in rows], dtype=buf.dtype)
            inc = inc.to(buf.device)
            if found_inf is not None:
                inc = inc * (1 - found_inf.to(buf.device, buf.dtype))
        buf.add_(inc)


def _steps(opt: _Adapter) -> _Steps:
    return opt.__dict__.setdefault("_polyopt_steps", _Steps())


@torch._dynamo.disable
def _run(opt: _Adapter, grad_scale: Any, found_inf: Any) -> None:
    with opt._polyopt_lock, torch.no_grad():
        engine = opt._polyopt
        rule, known, counted = engine.rule, engine.rule.defaults, type(opt)._counted
        groups = opt.param_groups
        trees = [g["params"] for g in groups]
        grads = [list(map(_GRAD, ps)) for ps in trees]
        if all(g is None for gs in grads for g in gs):
            return  # nothing has a gradient: nothing happens, no counter moves
        if any(any(map(_SPARSE, [g for g in gs if g is not None])) for gs in grads):
            raise RuntimeError(
                f"polyopt.torch.{type(opt).__name__} does not support sparse gradients"
            )
        rests = [{k: g[k] for k in g if k in known} for g in groups]
        hps = engine._resolve(rests, True)  # checked here: errors name the group
        # each param's state as the engine will see it; params stepped for the first
        # time get the rule's initial state, which joins opt.state only at the commit.
        # One pass, one state lookup per param: this loop is the adapter's cost per tensor.
        get = opt.state.get
        views: list = []
        names_of: list = []
        hp_of: list = []  # each param's group hyperparameters (for rule.counted)
        present: list = []
        fresh: list = []
        buffered: list = []  # SGD: 1 where a momentum buffer exists (updated before)
        for ps, gs, hp in zip(trees, grads, hps):
            names = rule.slots(hp)  # numbers or tensors here: torch takes no schedules
            need = frozenset(names + ("step",) if counted else names)
            missing = []
            for p, g in zip(ps, gs):
                s = get(p)
                if not counted:
                    buffered.append(1 if s and "momentum_buffer" in s else 0)
                if g is None:
                    present.append(False)
                    views.append(s or _EMPTY)
                    continue
                present.append(True)
                if s is None or not need <= s.keys():
                    missing.append((len(views), p, s or _EMPTY))
                views.append(s)
            names_of += [names] * len(ps)
            hp_of += [hp] * len(ps)
            if missing:
                xp = _namespace([missing[0][1]])
                hp0 = engine._at_step(hp, 0)
                for i, p, s in missing:
                    # one param's slots after another, as torch allocates them: a
                    # kernel that walks param i reads its slots from nearby memory
                    # (measured: slot after slot for all params ran torch's fused
                    # kernels 4-5 % slower at 10M params in 100 tensors)
                    init = rule.init_slots([p], hp0, xp)
                    entry = {"step": _new_step(opt, p)} if counted and "step" not in s else {}
                    if rule.counted is not None:  # torch's order: right after "step"
                        entry.update(
                            {
                                n: torch.tensor(v, dtype=_scalar_dtype())
                                for n, v in rule.counted(hp0, 0).items()
                                if n not in s
                            }
                        )
                    entry.update(s)
                    # the array's own slots (Adafactor's layout: None where it has none)
                    entry.update(
                        {n: init[n][0] for n in names if n not in s and init[n][0] is not None}
                    )
                    views[i] = entry
                    fresh.append((p, entry))
        if len(groups) == 1:  # the common case: one column per slot
            slots = {name: tuple([v.get(name) for v in views]) for name in sorted(names_of[0])}
        else:
            slots = {
                name: tuple([v.get(name) if name in ns else None for v, ns in zip(views, names_of)])
                for name in sorted({n for ns in names_of for n in ns})
            }
        if counted:  # torch's per-param "step" counters
            read, mine = _steps(opt).read([v["step"] for v in views if "step" in v])
            read = iter(read)
            counts = [next(read) if "step" in v else 0 for v in views]
        else:  # SGD keeps no counter: a momentum buffer exists once a param was updated
            counts = buffered
        k = max(counts)
        state = OptState(k, slots, None if min(counts) == k else tuple(counts))
        commit, on_device = None, False
        if grad_scale is not None or found_inf is not None:
            try:  # GradScaler's route for fused kernels: they unscale and skip themselves
                commit = engine._prepare(
                    trees,
                    rests,
                    True,
                    grads,
                    state,
                    inplace=True,
                    resolved=hps,
                    torch_grads=True,
                    amp=(grad_scale, found_inf),
                )
                on_device = True
            except AmpUnsupported:  # tensors the kernel does not take: on the host
                if found_inf is not None and bool(found_inf.item()):
                    return  # an inf/NaN gradient: the step is skipped, counters too
                if grad_scale is not None:
                    inv = 1.0 / grad_scale.double().item()
                    grads = [[None if g is None else g * inv for g in gs] for gs in grads]
        if commit is None:
            commit = engine._prepare(
                trees, rests, True, grads, state, inplace=True, resolved=hps, torch_grads=True
            )
        with deferred_interrupt():
            if grad_scale is not None and not on_device:  # unscaled, as the kernel leaves them
                for ps, gs in zip(trees, grads):
                    for p, g in zip(ps, gs):
                        if g is not None:
                            p.grad.copy_(g)
            _, new_state = commit()
            shared = rule.shared  # a group's numbers: every param with state takes them
            for name, column in new_state.slots.items():
                mine = name in shared
                for v, x, new in zip(views, present, column):
                    if (
                        (x or mine and v is not _EMPTY)
                        and new is not None
                        and v.get(name) is not new
                    ):
                        v[name] = new  # the param's state dict (or its new entry)
            if counted:
                skipped = found_inf if on_device else None
                _steps(opt).advance(views, present, counts, mine and not fresh, skipped)
            if rule.counted is not None and not on_device:
                _keep_counted(rule, views, present, counts, hp_of)
            for p, entry in fresh:
                opt.state[p].update(entry)


def _keep_counted(rule, views: list, present: list, counts: list, hps: list) -> None:
    """The per-param numbers torch keeps and the rule computes from the count (NAdam's
    ``mu_product``), after the step, as 0-d tensors of torch's scalar dtype."""
    for v, x, k, hp in zip(views, present, counts, hps):
        if x:
            at = _base.Optimizer._at_step(hp, k)
            for name, value in rule.counted(at, k + 1).items():
                v[name] = torch.tensor(value, dtype=_scalar_dtype())


def _namespace(tensors: list) -> Any:
    from . import _xp

    return _xp.namespace(tensors[:1], "params")


def _new_step(opt: _Adapter, p: torch.Tensor) -> torch.Tensor:
    """A fresh ``step`` counter where torch.optim would make it."""
    if opt.defaults.get("fused") or opt.defaults.get("capturable"):
        return torch.zeros((), dtype=_scalar_dtype(), device=p.device)
    return torch.tensor(0.0, dtype=_scalar_dtype())


def adapter(name: str, factory: Callable[..., _base.Optimizer], base: type | None = None) -> type:
    """The ``torch.optim.Optimizer`` class for one polyopt optimizer.

    Args:
        name: the class name (``"AdamW"``).
        factory: the functional factory (``polyopt.adamw``); its rule is the math.
        base: the torch class to subclass; by default ``torch.optim.<name>`` where torch
            has one. Without one, the constructor takes the factory's hyperparameters
            (same names and defaults) and checks them as the functional form does.

    Returns:
        A subclass of ``base`` (or of ``torch.optim.Optimizer``) whose ``step`` runs the
        rule.
    """
    if base is None:
        found = getattr(torch.optim, name, None)
        base = (
            found if isinstance(found, type) and issubclass(found, torch.optim.Optimizer) else None
        )
    rule = factory().rule
    doc = (
        f"``torch.optim.Optimizer`` form of :func:`polyopt.{factory.__name__}` "
        f"(see :mod:`polyopt.torch`).\n\n"
        + _base.adapted_doc(
            factory.__doc__ or "",
            first=_base._PARAMS_ARG,
            drop=("impl",),
            last=_FLAGS_ARG,
            returns=None,
        )
    )
    if base is not None:
        torch_args = set(inspect.signature(base.__init__).parameters)
        torch_args |= set(base([torch.zeros(1, 1)]).defaults)  # AdamW: decoupled_weight_decay
        extras = tuple(k for k in rule.defaults if k not in torch_args)

        def __init__(self, params, *args, **kwargs):  # noqa: N807
            extra = {k: kwargs.pop(k) for k in extras if k in kwargs}
            if extra:  # checked as the functional form checks them, before anything
                factory(**extra)
            base.__init__(self, params, *args, **kwargs)
            for k, v in extra.items():
                self.defaults[k] = v
                for group in self.param_groups:
                    group.setdefault(k, v)
            self._check_flags()
            self._polyopt  # noqa: B018 - build (and so check) the engine now

        sig = inspect.signature(base.__init__)
        extra_params = [
            inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=rule.defaults[k])
            for k in extras
        ]
        __init__.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=list(sig.parameters.values()) + extra_params
        )
        bases: tuple = (_Adapter, base)
        counted = name not in ("SGD", "Muon")  # torch keeps no step counter for these
    else:
        extras = ()
        fsig = inspect.signature(factory)

        def __init__(self, params, *args, foreach=None, fused=None, **kwargs):  # noqa: N807
            bound = fsig.bind(*args, **kwargs)
            hp = {k: v for k, v in bound.arguments.items() if k != "impl"}
            engine = factory(**hp)  # checks every hyperparameter: ValueError / TypeError
            defaults = {**engine.hyperparams, "foreach": foreach, "fused": fused}
            torch.optim.Optimizer.__init__(self, params, defaults)
            self._check_flags()
            self._polyopt  # noqa: B018

        pars = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        pars.append(inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD))
        pars += [p for n, p in fsig.parameters.items() if n != "impl"]
        for flag in ("foreach", "fused"):
            pars.append(inspect.Parameter(flag, inspect.Parameter.KEYWORD_ONLY, default=None))
        __init__.__signature__ = inspect.Signature(pars)  # type: ignore[attr-defined]
        bases = (_Adapter, torch.optim.Optimizer)
        counted = True
    return type(
        name,
        bases,
        {
            "__init__": __init__,
            "__doc__": doc,
            "__module__": __name__,
            "__qualname__": name,
            "_factory": staticmethod(factory),
            "_extras": extras,
            "_counted": counted,
        },
    )


def _classes() -> dict[str, type]:
    out = {}
    for factory, stateful_cls in OPTIMIZERS.values():
        out[stateful_cls.__name__] = adapter(stateful_cls.__name__, factory)
    return out


globals().update(_classes())
__all__ += sorted(cls.__name__ for _, cls in OPTIMIZERS.values())
