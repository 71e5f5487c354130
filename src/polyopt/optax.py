"""polyopt's optimizers as optax ``GradientTransformation``\\ s.

::

    import optax, polyopt.optax
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     polyopt.optax.adamw(lr=1e-3, weight_decay=1e-2, mask=decay_mask))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)   # optax's argument order
    params = optax.apply_updates(params, updates)

Every optimizer of :data:`polyopt.OPTIMIZERS` is here under its functional name
(``sgd``, ``adagrad``, ``rmsprop``, ``adadelta``, ``adam``, ``adamw``...), built by
:func:`transformation` from the same factory as ``polyopt.adamw``: the same
hyperparameter names and torch's defaults (note optax's ``adamw`` decays by 1e-4 by
default, torch's and polyopt's by 1e-2), the same rule and the same JAX fast path.
``update`` runs polyopt's step on ``(params, updates)`` and returns ``new − params`` as
the updates, so that ``optax.apply_updates`` gives polyopt's new params; XLA fuses the
subtraction into the step. The state is polyopt's :class:`~polyopt.OptState` (a
pytree: it jits, vmaps, donates, shards and serializes with flax and Orbax), each slot a
tree shaped like params (so ``optax.tree_map_params`` and flax nnx's sharding metadata
apply), except where the JAX fast path packs runs of small arrays into shared buffers
(``impl="auto"`` on one device; ``impl="generic"`` keeps every slot per array).

``params`` must be passed to ``update`` (polyopt's rules read them: weight decay,
the update itself). ``mask`` (for optimizers with ``weight_decay``): a pytree of bools
with the structure of params, or a function of params returning one, as for
``optax.adamw``: weight decay applies only where it is True. ``lr`` (and
``weight_decay``) may be numbers, 0-d arrays (so ``optax.inject_hyperparams`` and
``jax.vmap`` over learning rates work), polyopt schedules or optax schedules: both are
functions of the 0-based update count.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

try:
    import jax
    import optax
except ModuleNotFoundError as e:  # jax or optax itself missing, not something they import
    if e.name not in ("jax", "optax"):
        raise
    raise ImportError("polyopt.optax needs optax and JAX: pip install 'polyopt[jax]'") from None

from . import OPTIMIZERS, _base, backends
from . import flat as _flat

__all__ = ["transformation"]


def _register_serialization() -> None:
    """flax.serialization (and through it Orbax's pytree checkpoints) for the packed
    state of polyopt's JAX fast path."""
    _flat.register_jax()
    try:
        from flax import serialization
    except ImportError:  # flax is optional
        return
    if _flat.Packed in getattr(serialization, "_STATE_DICT_REGISTRY", {}):
        return

    def to_state(p: _flat.Packed) -> dict:
        return {str(i): serialization.to_state_dict(x) for i, x in enumerate(p.parts)}

    def from_state(target: _flat.Packed, state: dict) -> _flat.Packed:
        parts = [
            serialization.from_state_dict(x, state[str(i)]) for i, x in enumerate(target.parts)
        ]
        return _flat.Packed(parts, target.tails)

    serialization.register_serialization_state(_flat.Packed, to_state, from_state)


_register_serialization()


def _split(mask_leaves: list, leaves: list) -> tuple[list, list]:
    on = [x for x, m in zip(leaves, mask_leaves) if m]
    off = [x for x, m in zip(leaves, mask_leaves) if not m]
    return on, off


def _mask_leaves(mask: Any, params: Any, n: int) -> list:
    """One Python bool per params leaf. ``mask`` (or ``mask(params)``) has the structure
    of params or a prefix of it, as for ``optax.masked``: a bool stands for every array
    of its subtree."""
    m = mask(params) if callable(mask) else mask
    try:
        per_leaf = jax.tree_util.tree_map(
            lambda flag, sub: [flag] * len(jax.tree_util.tree_leaves(sub)),
            m,
            params,
            is_leaf=lambda x: isinstance(x, bool) or x is None,
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"mask must have the structure of params (or a prefix of it): {e}"
        ) from None
    leaves = [
        flag
        for flags in jax.tree_util.tree_leaves(per_leaf, is_leaf=lambda x: isinstance(x, list))
        for flag in flags
    ]
    if len(leaves) != n:
        raise ValueError(f"mask must have the structure of params ({n} arrays), got {len(leaves)}")
    out = []
    for i, x in enumerate(leaves):
        if not isinstance(x, bool):
            try:
                x = bool(x)
            except Exception:  # a traced value: the mask must be known when tracing
                raise TypeError(
                    f"mask leaf {i} must be a Python bool (known when tracing), got {x!r:.60}"
                ) from None
        out.append(x)
    return out


def _empty(params: Any) -> bool:
    """No arrays at all: a subtree optax.masked or multi_transform hands over empty.
    (Not optax.tree_map_params' placeholder, which is empty too.)"""
    return not jax.tree_util.tree_leaves(params) and not _is_placeholder(params)


_EMPTY_STATE = _base.OptState(0, {})


def _check_params(params: Any, name: str) -> None:
    if not any(hasattr(x, "shape") for x in jax.tree_util.tree_leaves(params)):
        raise TypeError(
            f"polyopt.optax.{name}.init needs params (arrays), got {type(params).__name__}"
        )


def _is_placeholder(params: Any) -> bool:
    return type(params).__name__ == "_ParamsPlaceholder"


def _placeholder_state(opt: _base.Optimizer, placeholder: Any) -> _base.OptState:
    """``init`` on ``optax.tree_map_params``' placeholder: the state's structure with
    the placeholder where each slot's params-shaped tree stands."""
    fast = backends.lookup(opt.rule, "jax", opt.impl)
    if fast is not None and fast.init is not None:
        raise TypeError(
            f"optax.tree_map_params: polyopt.optax.{opt.rule.name}(impl={opt.impl!r}) keeps "
            "the state of runs of small arrays in shared buffers (the JAX fast path), so "
            "its slots are not trees shaped like params; build it with impl='generic' "
            "for per-array state that tree_map_params (and nnx's partition specs) can read"
        )
    names = tuple(jax.eval_shape(opt.init, jax.ShapeDtypeStruct((1,), "float32")).slots)
    # counts: a leaf here matches both None and the counts array of the real state
    return _base.OptState(0, {n: placeholder for n in names}, 0)


def _shaped(state: _base.OptState, treedef: Any, order: list[int] | None) -> _base.OptState:
    """The engine's state with each per-array slot as a tree shaped like params (so
    that ``optax.tree_map_params`` finds it, and flax nnx carries each param's
    metadata over to its slots); a packed slot stays as it is. ``order``: the params
    leaf of each engine array (the masked form's two groups), None for the same order."""
    slots = {}
    for name, col in state.slots.items():
        if not isinstance(col, _flat.Packed):
            col = list(col)
            if order is not None:
                by_leaf = [None] * len(col)
                for k, i in enumerate(order):
                    by_leaf[i] = col[k]
                col = by_leaf
            col = jax.tree_util.tree_unflatten(treedef, col)
        slots[name] = col
    return state._replace(slots=slots)


def _columns(state: _base.OptState, order: list[int] | None) -> _base.OptState:
    """Inverse of :func:`_shaped`: one tuple per slot, in the engine's order."""
    slots = {}
    for name, col in state.slots.items():
        if not isinstance(col, _flat.Packed):
            leaves = jax.tree_util.tree_leaves(col, is_leaf=lambda x: x is None)
            col = tuple(leaves if order is None else (leaves[i] for i in order))
        slots[name] = col
    return state._replace(slots=slots)


#: The Args entry of ``mask`` in the generated factories' docstrings.
_MASK_ARG = (
    "mask: a pytree of bools with the structure of params, or a function of params\n"
    "    returning one (as for ``optax.adamw``): weight decay applies only where True.\n"
    "    None (default): everywhere."
)


def transformation(factory: Callable[..., _base.Optimizer]) -> Callable:
    """The optax form of one polyopt optimizer.

    Args:
        factory: the functional factory (``polyopt.adamw``).

    Returns:
        A function with the factory's hyperparameters (and ``mask`` where it has
        ``weight_decay``) returning an ``optax.GradientTransformationExtraArgs``.
    """
    sig = inspect.signature(factory)
    has_decay = "weight_decay" in sig.parameters

    def make(*args: Any, mask: Any = None, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        if mask is not None and not has_decay:
            raise TypeError(f"{factory.__name__} has no weight_decay to mask")
        opt = factory(*args, **kwargs)  # every hyperparameter checked here
        if mask is None:
            return _plain(opt)
        return _masked(opt, mask)

    params = [p for p in sig.parameters.values()]
    if has_decay:
        params.append(inspect.Parameter("mask", inspect.Parameter.KEYWORD_ONLY, default=None))
    make.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=params, return_annotation=optax.GradientTransformationExtraArgs
    )
    make.__name__ = make.__qualname__ = factory.__name__
    make.__module__ = __name__
    make.__doc__ = (
        f"optax form of :func:`polyopt.{factory.__name__}` (see :mod:`polyopt.optax`): "
        "returns an ``optax.GradientTransformationExtraArgs``.\n\n"
        + _base.adapted_doc(
            factory.__doc__ or "",
            last=_MASK_ARG if has_decay else None,
            returns=(
                "optax.GradientTransformationExtraArgs: ``init(params)`` and\n"
                "    ``update(updates, state, params)`` (params required), in optax's order."
            ),
        )
    )
    return make


def _need_params(params: Any, name: str) -> None:
    if params is None:
        raise ValueError(
            f"polyopt.optax.{name}: update(updates, state, params) needs params (the rule "
            "reads them); pass them as optax.chain passes them"
        )


def _not_params(opt: _base.Optimizer, params: Any) -> _base.OptState | None:
    """``init``'s answer for what is not params (an empty subtree, optax.tree_map_params'
    placeholder); None for params, once they are checked."""
    if _empty(params):
        return _EMPTY_STATE
    if _is_placeholder(params):
        return _placeholder_state(opt, params)
    _check_params(params, opt.rule.name)
    return None


def _delta(new: Any, old: Any) -> Any:
    return jax.tree_util.tree_map(lambda n, o: n - o, new, old)


def _plain(opt: _base.Optimizer) -> optax.GradientTransformationExtraArgs:
    def init(params: Any) -> _base.OptState:
        special = _not_params(opt, params)
        if special is not None:
            return special
        return _shaped(opt.init(params), jax.tree_util.tree_structure(params), None)

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple:
        if _empty(updates):
            return updates, state
        _need_params(params, opt.rule.name)
        new_params, new_state = opt.update(params, updates, _columns(state, None))
        treedef = jax.tree_util.tree_structure(params)
        return _delta(new_params, params), _shaped(new_state, treedef, None)

    return optax.GradientTransformationExtraArgs(init, update)


def _masked(opt: _base.Optimizer, mask: Any) -> optax.GradientTransformationExtraArgs:
    """Weight decay only where ``mask`` is True: two parameter groups, the second with
    ``weight_decay=0``, over the params' leaves in their flattening order."""

    def groups(leaves: list, m: list) -> list:
        on, off = _split(m, leaves)
        return [{"params": on}, {"params": off, "weight_decay": 0.0}]

    def order(m: list) -> list[int]:  # the params leaf of each array of the two groups
        return [i for i, x in enumerate(m) if x] + [i for i, x in enumerate(m) if not x]

    def init(params: Any) -> _base.OptState:
        special = _not_params(opt, params)
        if special is not None:
            return special
        leaves, treedef = jax.tree_util.tree_flatten(params)
        m = _mask_leaves(mask, params, len(leaves))
        return _shaped(opt.init(groups(leaves, m)), treedef, order(m))

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple:
        if _empty(updates):
            return updates, state
        _need_params(params, opt.rule.name)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        m = _mask_leaves(mask, params, len(leaves))
        g_leaves = treedef.flatten_up_to(updates)
        on_g, off_g = _split(m, g_leaves)
        at = order(m)
        new_groups, new_state = opt.update(groups(leaves, m), [on_g, off_g], _columns(state, at))
        new_on, new_off = iter(new_groups[0]["params"]), iter(new_groups[1]["params"])
        new_leaves = [next(new_on) if x else next(new_off) for x in m]
        new_params = jax.tree_util.tree_unflatten(treedef, new_leaves)
        return _delta(new_params, params), _shaped(new_state, treedef, at)

    return optax.GradientTransformationExtraArgs(init, update)


def _transformations() -> dict[str, Callable]:
    return {name: transformation(factory) for name, (factory, _) in OPTIMIZERS.items()}


globals().update(_transformations())
__all__ += sorted(OPTIMIZERS)
del functools
