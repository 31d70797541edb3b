"""A minimal pytree: tuples, lists, dicts, namedtuples and None are nodes; the rest are leaves.

The NumPy and PyTorch backends use it; the JAX backend uses `jax.tree_util` instead so that
registered nodes (equinox modules, ...) work. Dict keys are sorted, as in JAX, so the order of
leaves does not depend on insertion order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TreeDef:
    """The structure of a pytree: `kind` is "leaf", "none", "tuple", "list", "dict" or a
    namedtuple class; `meta` holds dict keys; `children` the sub-structures."""

    kind: Any
    meta: tuple = ()
    children: tuple[TreeDef, ...] = ()

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(c.num_leaves for c in self.children)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        if self.kind == "leaf":
            return "*"
        if self.kind == "none":
            return "None"
        inner = ", ".join(repr(c) for c in self.children)
        if self.kind == "dict":
            inner = ", ".join(f"{k!r}: {c!r}" for k, c in zip(self.meta, self.children))
            return "{" + inner + "}"
        if self.kind == "list":
            return "[" + inner + "]"
        if self.kind == "tuple":
            return "(" + inner + ("," if len(self.children) == 1 else "") + ")"
        return f"{self.kind.__name__}({inner})"


_LEAF = TreeDef("leaf")
_NONE = TreeDef("none")


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _children(tree: Any) -> tuple[Any, tuple, list] | None:
    if tree is None:
        return "none", (), []
    if _is_namedtuple(tree):
        return type(tree), (), list(tree)
    if type(tree) is tuple:
        return "tuple", (), list(tree)
    if type(tree) is list:
        return "list", (), list(tree)
    if type(tree) is dict:
        keys = tuple(sorted(tree, key=repr))
        return "dict", keys, [tree[k] for k in keys]
    return None


# The recursions are module-level functions, not closures: a nested function that calls itself
# is a reference cycle, which would keep every flattened leaf (tensors included) alive until the
# cyclic garbage collector runs.

def _flatten_into(t: Any, leaves: list[Any]) -> TreeDef:
    node = _children(t)
    if node is None:
        leaves.append(t)
        return _LEAF
    kind, meta, kids = node
    if kind == "none":
        return _NONE
    return TreeDef(kind, meta, tuple(_flatten_into(k, leaves) for k in kids))


def tree_flatten(tree: Any) -> tuple[list[Any], TreeDef]:
    """Flatten `tree` into its leaves (left to right) and its structure."""
    leaves: list[Any] = []
    treedef = _flatten_into(tree, leaves)
    return leaves, treedef


def _unflatten_from(td: TreeDef, it: Iterator[Any]) -> Any:
    if td.kind == "leaf":
        return next(it)
    if td.kind == "none":
        return None
    kids = [_unflatten_from(c, it) for c in td.children]
    if td.kind == "tuple":
        return tuple(kids)
    if td.kind == "list":
        return kids
    if td.kind == "dict":
        return dict(zip(td.meta, kids))
    return td.kind(*kids)


def tree_unflatten(treedef: TreeDef, leaves: list[Any] | tuple[Any, ...]) -> Any:
    """Rebuild a pytree of structure `treedef` from `leaves`."""
    it = iter(leaves)
    out = _unflatten_from(treedef, it)
    rest = list(it)
    if rest:
        raise ValueError(f"tree_unflatten: {len(rest)} leaves too many for {treedef!r}")
    return out


def _paths(tree: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    node = _children(tree)
    if node is None:
        yield prefix, tree
        return
    kind, meta, kids = node
    if kind == "dict":
        for k, c in zip(meta, kids):
            yield from _paths(c, f"{prefix}[{k!r}]")
    elif kind in ("tuple", "list"):
        for i, c in enumerate(kids):
            yield from _paths(c, f"{prefix}[{i}]")
    elif kind != "none":
        for name, c in zip(kind._fields, kids):
            yield from _paths(c, f"{prefix}.{name}")


def tree_leaves_with_path(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """The leaves of `tree` with a readable key path each, such as `x[0]['w']`."""
    return list(_paths(tree, prefix))


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply `fn` leaf-wise to `tree` and trees of the same structure."""
    leaves, treedef = tree_flatten(tree)
    others = [tree_flatten(r)[0] for r in rest]
    return tree_unflatten(treedef, [fn(*xs) for xs in zip(leaves, *others)])
