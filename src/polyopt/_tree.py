"""Flatten and rebuild the structures params and grads come in.

A *tree* is one array, or a list / tuple / dict whose entries are trees. Flattening
gives the arrays (leaves) in a fixed order and a ``Structure`` that rebuilds a tree of
the same shape from new leaves. Dict entries are visited in sorted-key order, as JAX
does (``jax.jit`` hands dicts back with sorted keys: the order of the leaves, and so of
the optimizer state, must not depend on insertion order); rebuilt dicts keep the
insertion order they came in. Two dicts match when they have the same keys.

Parameter groups (torch's convention) are a list of dicts with a ``"params"`` entry;
``split_groups`` separates them into per-group trees and hyperparameter overrides.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Structure:
    """How to rebuild a tree: ``kind`` is 'leaf', 'list', 'tuple' or 'dict'."""

    kind: str
    children: tuple = ()
    keys: tuple = ()  # dict keys in visiting (sorted) order
    order: tuple = ()  # dict keys in the order the dict had

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(c.num_leaves for c in self.children)

    def describe(self) -> str:
        if self.kind == "leaf":
            return "array"
        if self.kind == "dict":
            return f"dict with keys {sorted(map(str, self.keys))}"
        return f"{self.kind} of length {len(self.children)}"


def flatten(tree: Any) -> tuple[list, Structure]:
    leaves: list = []
    structure = _flatten(tree, leaves)
    return leaves, structure


_LEAF = Structure("leaf")
_CONTAINERS = (dict, list, tuple)


def _flatten(tree: Any, leaves: list) -> Structure:
    if isinstance(tree, (list, tuple)) and not any(isinstance(t, _CONTAINERS) for t in tree):
        leaves.extend(tree)  # a flat list of arrays: the common case, without recursion
        return Structure("tuple" if isinstance(tree, tuple) else "list", (_LEAF,) * len(tree))
    if isinstance(tree, dict):
        keys = _sorted_keys(tree)
        return Structure("dict", tuple(_flatten(tree[k], leaves) for k in keys), keys, tuple(tree))
    if isinstance(tree, (list, tuple)):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return Structure(kind, tuple(_flatten(t, leaves) for t in tree))
    leaves.append(tree)
    return _LEAF


def _sorted_keys(d: dict) -> tuple:
    try:
        return tuple(sorted(d))
    except TypeError:  # keys of mixed types cannot be sorted: insertion order
        return tuple(d)


def unflatten(structure: Structure, leaves) -> Any:
    it = iter(leaves)
    return _unflatten(structure, it)


def _unflatten(s: Structure, it) -> Any:
    if s.kind == "leaf":
        return next(it)
    if s.kind != "dict" and all(c is _LEAF for c in s.children):
        children = list(itertools.islice(it, len(s.children)))
        return tuple(children) if s.kind == "tuple" else children
    children = [_unflatten(c, it) for c in s.children]
    if s.kind == "dict":
        by_key = dict(zip(s.keys, children))
        return {k: by_key[k] for k in s.order}
    return tuple(children) if s.kind == "tuple" else children


def flatten_like(tree: Any, structure: Structure, what: str, ref: str = "params") -> list:
    """Flatten ``tree`` and check that it has ``structure``; ValueError names the path."""
    leaves: list = []
    _match(tree, structure, what, ref, leaves)
    return leaves


def _match(tree: Any, s: Structure, path: str, ref: str, leaves: list) -> None:
    if (
        s.kind in ("list", "tuple")
        and isinstance(tree, (list, tuple))
        and len(tree) == len(s.children)
        and all(c is _LEAF for c in s.children)
        and not any(isinstance(t, _CONTAINERS) for t in tree)
    ):
        leaves.extend(tree)  # flat list against flat list: nothing deeper to check
        return
    if s.kind == "leaf":
        if isinstance(tree, (dict, list, tuple)):
            raise ValueError(
                f"{path} does not match the structure of {ref}: expected an array, "
                f"got {type(tree).__name__}"
            )
        leaves.append(tree)
        return
    if s.kind == "dict":
        if not isinstance(tree, dict) or set(tree) != set(s.keys):
            got = (
                f"dict with keys {sorted(map(str, tree))}"
                if isinstance(tree, dict)
                else type(tree).__name__
            )
            raise ValueError(
                f"{path} does not match the structure of {ref}: expected {s.describe()}, got {got}"
            )
        for k, child in zip(s.keys, s.children):
            _match(tree[k], child, f"{path}[{k!r}]", ref, leaves)
        return
    if not isinstance(tree, (list, tuple)) or len(tree) != len(s.children):
        got = (
            f"{type(tree).__name__} of length {len(tree)}"
            if isinstance(tree, (list, tuple))
            else type(tree).__name__
        )
        raise ValueError(
            f"{path} does not match the structure of {ref}: expected {s.describe()}, got {got}"
        )
    for i, (t, child) in enumerate(zip(tree, s.children)):
        _match(t, child, f"{path}[{i}]", ref, leaves)


def is_groups(params: Any) -> bool:
    """True for torch-style parameter groups: a non-empty list of dicts with 'params'."""
    return (
        isinstance(params, (list, tuple))
        and len(params) > 0
        and all(isinstance(g, dict) and "params" in g for g in params)
    )


def split_groups(params: Any) -> tuple[list, list[dict]]:
    """``(trees, overrides)``: one params tree and one hyperparameter dict per group.

    A plain tree (no groups) is one group with no overrides.
    """
    if is_groups(params):
        trees = [g["params"] for g in params]
        overrides = [{k: v for k, v in g.items() if k != "params"} for g in params]
        return trees, overrides
    return [params], [{}]


def join_groups(params: Any, new_trees: list) -> Any:
    """Put new per-group trees back in the form ``params`` came in."""
    if is_groups(params):
        return type(params)({**g, "params": t} for g, t in zip(params, new_trees))
    return new_trees[0]
