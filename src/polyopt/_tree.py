"""Flatten and rebuild the structures params and grads come in.

A *tree* is one array, or a container of trees: list, tuple, NamedTuple, dict (and its
subclasses: OrderedDict, defaultdict...), a list of ``(name, array)`` pairs (torch's
``named_parameters()``), and, once JAX is imported, any registered JAX pytree node
(flax ``nnx.State``, a dataclass registered with ``jax.tree_util``...). ``None`` is an
empty subtree, as in JAX: it holds no array, and comes back as ``None``.

Flattening gives the arrays (leaves) in a fixed order and a :class:`Structure` that
rebuilds a tree of the same shape and container types from new leaves. The order is
JAX's: dict entries in sorted-key order (``jax.jit`` hands dicts back with sorted keys,
so the order of the leaves, and of the optimizer state, must not depend on insertion
order), OrderedDict entries in insertion order, NamedTuple fields in order. Rebuilt
dicts keep the insertion order they came in. Custom JAX nodes are flattened by JAX
itself (``jax.tree_util``), whose order is theirs.

Grads are matched against the params' structure (:func:`flatten_like`); a ``None`` in
place of an array means "no gradient for this array". Error messages name the leaf by
its path, as the user wrote it: ``grads['layer1']['w']``, ``params[2]``.

Parameter groups (torch's convention) are a list of dicts with a ``"params"`` entry;
:func:`split_groups` separates them into per-group trees and the rest of each dict.
"""

from __future__ import annotations

import collections
import itertools
import sys
from collections.abc import Iterator, Mapping, ValuesView
from dataclasses import dataclass
from typing import Any

from . import _xp


@dataclass(frozen=True)
class Structure:
    """How to rebuild a tree.

    ``kind``: 'leaf', 'none', 'list', 'tuple', 'dict', 'named' (a list of (name, array)
    pairs) or 'jax' (a registered JAX pytree node, rebuilt by its treedef).
    ``cls``: the container type to rebuild (a NamedTuple, an OrderedDict...).
    """

    kind: str
    children: tuple = ()
    keys: tuple = ()  # dict keys in visiting order; names for 'named'
    order: tuple = ()  # dict keys in the order the dict had
    cls: Any = None
    treedef: Any = None  # 'jax': the treedef, with None as a leaf
    nones: tuple = ()  # 'jax': which of the treedef's leaves are None (no array)

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        if self.kind == "jax":
            return len(self.nones) - sum(self.nones)
        if self.kind == "named":
            return len(self.keys)
        return sum(c.num_leaves for c in self.children)

    def describe(self) -> str:
        if self.kind == "leaf":
            return "an array"
        if self.kind == "none":
            return "None"
        if self.kind == "dict":
            return f"{_type_name(self.cls)} with keys {sorted(map(str, self.keys))}"
        if self.kind == "named":
            return f"list of {len(self.keys)} (name, array) pairs"
        if self.kind == "jax":
            return f"JAX pytree {self.treedef}"
        return f"{_type_name(self.cls)} of length {len(self.children)}"

    def paths(self, prefix: str = "") -> list[str]:
        """The path of each leaf, in flattening order (for error messages)."""
        if self.kind == "leaf":
            return [prefix]
        if self.kind == "none":
            return []
        if self.kind == "dict":
            return [
                p for k, c in zip(self.keys, self.children) for p in c.paths(f"{prefix}[{k!r}]")
            ]
        if self.kind == "named":
            return [f"{prefix}[{i}] ({name!r})" for i, name in enumerate(self.keys)]
        if self.kind == "jax":
            return _jax_paths(self, prefix)
        return [p for i, c in enumerate(self.children) for p in c.paths(f"{prefix}[{i}]")]


def _type_name(cls: Any) -> str:
    return getattr(cls, "__name__", str(cls))


_LEAF = Structure("leaf")
_NONE = Structure("none")
_CONTAINERS = (dict, list, tuple)
_DEFAULT_CLS = {"list": list, "tuple": tuple, "dict": dict}


def flatten(tree: Any) -> tuple[list, Structure]:
    leaves: list = []
    structure = _flatten(tree, leaves)
    if _jax_loaded() and not _arrays_only(leaves):
        # some leaf is not an array: it may be a JAX pytree node (flax's Variables...)
        jax_nodes = [x for x in leaves if _is_jax_node(x)]
        if jax_nodes:
            leaves = []
            structure = _flatten(tree, leaves, jax_aware=True)
    return leaves, structure


def _flatten(tree: Any, leaves: list, jax_aware: bool = False) -> Structure:
    if type(tree) is list or type(tree) is tuple:
        if _all_leaves(tree) and not (jax_aware and any(_is_jax_node(t) for t in tree)):
            leaves.extend(tree)  # a flat list of arrays: the common case, without recursion
            kind = "list" if type(tree) is list else "tuple"
            return Structure(kind, (_LEAF,) * len(tree), cls=type(tree))
    if tree is None:
        return _NONE
    if isinstance(tree, dict):
        keys = _visit_order(tree)
        children = tuple(_flatten(tree[k], leaves, jax_aware) for k in keys)
        return Structure("dict", children, keys, tuple(tree), cls=type(tree))
    if isinstance(tree, list) and tree and all(_is_named_pair(t) for t in tree):
        names = tuple(name for name, _ in tree)
        leaves.extend(a for _, a in tree)
        return Structure("named", keys=names, cls=type(tree))
    if isinstance(tree, (list, tuple)):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return Structure(kind, tuple(_flatten(t, leaves, jax_aware) for t in tree), cls=type(tree))
    if jax_aware and _is_jax_node(tree):
        import jax

        flat, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_none)
        nones = tuple(x is None for x in flat)
        leaves.extend(x for x in flat if x is not None)
        return Structure("jax", treedef=treedef, nones=nones)
    leaves.append(tree)
    return _LEAF


def _all_leaves(seq: Any) -> bool:
    """Whether no element of ``seq`` is a container or None (by type: one C-level pass)."""
    return not any(t is _NoneType or issubclass(t, _CONTAINERS) for t in set(map(type, seq)))


_NoneType = type(None)


def _visit_order(d: dict) -> tuple:
    """JAX's order: sorted keys, except an OrderedDict's own order."""
    if isinstance(d, collections.OrderedDict):
        return tuple(d)
    try:
        return tuple(sorted(d))
    except TypeError:  # keys of mixed types cannot be sorted: insertion order
        return tuple(d)


def _is_named_pair(t: Any) -> bool:
    return type(t) is tuple and len(t) == 2 and isinstance(t[0], str) and _xp.is_array(t[1])


def _is_none(x: Any) -> bool:
    return x is None


def _arrays_only(leaves: list) -> bool:
    """Whether every leaf is an array (by type: one check per distinct type)."""
    return all(
        _xp.is_array(next(x for x in leaves if type(x) is t)) for t in set(map(type, leaves))
    )


def _jax_loaded() -> bool:
    return "jax" in sys.modules


def _is_jax_node(x: Any) -> bool:
    """Whether ``x`` is a registered JAX pytree node (not a leaf, not a plain container
    that polyopt flattens itself)."""
    if x is None or _xp.is_array(x) or isinstance(x, _CONTAINERS) or not _jax_loaded():
        return False
    import jax

    return not jax.tree_util.all_leaves([x])


def _jax_paths(s: Structure, prefix: str) -> list[str]:
    import jax

    dummy = s.treedef.unflatten([0] * len(s.nones))
    flat, _ = jax.tree_util.tree_flatten_with_path(dummy)
    paths = [prefix + jax.tree_util.keystr(path) for path, _ in flat]
    return [p for p, none in zip(paths, s.nones) if not none]


def unflatten(structure: Structure, leaves) -> Any:
    it = iter(leaves)
    return _unflatten(structure, it)


def _unflatten(s: Structure, it) -> Any:
    if s.kind == "leaf":
        return next(it)
    if s.kind == "none":
        return None
    if s.kind == "named":
        return _rebuild(s.cls, list, list(zip(s.keys, itertools.islice(it, len(s.keys)))))
    if s.kind == "jax":
        flat = [None if none else next(it) for none in s.nones]
        return s.treedef.unflatten(flat)
    if s.kind != "dict" and all(c is _LEAF for c in s.children):
        children = list(itertools.islice(it, len(s.children)))
    else:
        children = [_unflatten(c, it) for c in s.children]
    if s.kind == "dict":
        by_key = dict(zip(s.keys, children))
        return _rebuild_dict(s.cls, [(k, by_key[k]) for k in s.order])
    if s.kind == "tuple":
        if s.cls is tuple or s.cls is None:
            return tuple(children)
        if hasattr(s.cls, "_fields"):  # a NamedTuple
            return s.cls(*children)
        return _rebuild(s.cls, tuple, children)
    return children if s.cls is list or s.cls is None else _rebuild(s.cls, list, children)


def _rebuild(cls: Any, default: type, items: list) -> Any:
    if cls is default or cls is None:
        return default(items)
    try:
        return cls(items)
    except Exception:  # a subclass whose constructor takes something else
        return default(items)


def _rebuild_dict(cls: Any, pairs: list) -> Any:
    if cls is dict or cls is None:
        return dict(pairs)
    if cls is collections.defaultdict or issubclass(cls, collections.defaultdict):
        return cls(None, pairs)  # the factory is not part of the structure
    try:
        return cls(pairs)
    except Exception:
        return dict(pairs)


def flatten_like(tree: Any, structure: Structure, what: str, ref: str = "params") -> list:
    """Flatten ``tree`` and check that it has ``structure``; ValueError names the path.

    A ``None`` where ``structure`` has an array is allowed (no gradient for it) and
    comes back as ``None`` in the list."""
    leaves: list = []
    _match(tree, structure, what, ref, leaves)
    return leaves


def _mismatch(path: str, ref: str, s: Structure, tree: Any) -> ValueError:
    if isinstance(tree, Mapping):
        got = f"{type(tree).__name__} with keys {sorted(map(str, tree))}"
    elif isinstance(tree, (list, tuple)):
        got = f"{type(tree).__name__} of length {len(tree)}"
    else:
        got = type(tree).__name__
    return ValueError(
        f"{path} does not match the structure of {ref}: expected {s.describe()}, got {got}"
    )


def _match(tree: Any, s: Structure, path: str, ref: str, leaves: list) -> None:
    if (
        s.kind in ("list", "tuple")
        and isinstance(tree, (list, tuple))
        and len(tree) == len(s.children)
        and all(c is _LEAF for c in s.children)
        and not any(issubclass(t, _CONTAINERS) for t in set(map(type, tree)))
    ):
        leaves.extend(tree)  # flat list against flat list: nothing deeper to check
        return
    if s.kind == "leaf":
        if isinstance(tree, _CONTAINERS) or _is_jax_node(tree):
            raise ValueError(
                f"{path} does not match the structure of {ref}: expected an array, "
                f"got {type(tree).__name__}"
            )
        leaves.append(tree)
        return
    if s.kind == "none":
        if tree is not None:
            raise _mismatch(path, ref, s, tree)
        return
    if s.kind == "dict":
        if not isinstance(tree, Mapping) or set(tree) != set(s.keys):
            raise _mismatch(path, ref, s, tree)
        for k, child in zip(s.keys, s.children):
            _match(tree[k], child, f"{path}[{k!r}]", ref, leaves)
        return
    if s.kind == "named":
        if not isinstance(tree, (list, tuple)) or len(tree) != len(s.keys):
            raise _mismatch(path, ref, s, tree)
        for i, (name, t) in enumerate(zip(s.keys, tree)):
            if _is_named_pair(t) or (type(t) is tuple and len(t) == 2 and t[1] is None):
                if t[0] != name:
                    raise ValueError(f"{path}[{i}] is named {t[0]!r}, but {ref}[{i}] is {name!r}")
                t = t[1]
            _match(t, _LEAF, f"{path}[{i}] ({name!r})", ref, leaves)
        return
    if s.kind == "jax":
        _match_jax(tree, s, path, ref, leaves)
        return
    if not isinstance(tree, (list, tuple)) or len(tree) != len(s.children):
        raise _mismatch(path, ref, s, tree)
    for i, (t, child) in enumerate(zip(tree, s.children)):
        _match(t, child, f"{path}[{i}]", ref, leaves)


def _match_jax(tree: Any, s: Structure, path: str, ref: str, leaves: list) -> None:
    import jax

    flat, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_none)
    if treedef != s.treedef:
        raise ValueError(
            f"{path} does not match the structure of {ref}: expected {s.treedef}, got {treedef}"
        )
    for x, none in zip(flat, s.nones):
        if not none:
            leaves.append(x)


# -- parameter groups -----------------------------------------------------------------


def is_groups(params: Any) -> bool:
    """True for torch-style parameter groups: a non-empty list of dicts with 'params'."""
    return (
        isinstance(params, (list, tuple))
        and len(params) > 0
        and all(isinstance(g, dict) and "params" in g for g in params)
    )


def materialize(params: Any, what: str = "params") -> Any:
    """An iterator (``model.parameters()``, ``model.named_parameters()``, a generator)
    as a list, so that it can be read more than once; anything else as it is. Sets are
    refused: their order, and so the state's, would change from run to run."""
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            f"{what} must be an ordered collection (a list, tuple or dict) or an iterator, "
            f"got a {type(params).__name__}: the order of a set changes from run to run"
        )
    if isinstance(params, (Iterator, ValuesView)) and not _xp.is_array(params):
        return list(params)
    return params


def split_groups(params: Any) -> tuple[list, list[dict], bool]:
    """``(trees, rest, grouped)``: one params tree and one dict of the other entries per
    group (hyperparameter overrides, and whatever else the group holds: ``initial_lr``,
    ``param_names``...), and whether ``params`` was given as groups. A plain tree is one
    group with nothing else."""
    params = materialize(params)
    if is_groups(params):
        trees = [materialize(g["params"], f"params[{i}]['params']") for i, g in enumerate(params)]
        rest = [{k: v for k, v in g.items() if k != "params"} for g in params]
        return trees, rest, True
    return [params], [{}], False


def join_groups(params: Any, new_trees: list, grouped: bool) -> Any:
    """Put new per-group trees back in the form ``params`` (materialized) came in."""
    if grouped:
        return type(params)({**g, "params": t} for g, t in zip(params, new_trees))
    return new_trees[0]
