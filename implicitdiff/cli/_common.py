"""What the `implicitdiff` command needs of the frameworks: which are installed, float64 for a
block, host copies, waiting for asynchronous work; and the small pytree helpers of `check`.

Frameworks are imported only when a subcommand needs them, through their backends.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import numpy as np

from .. import _gallery
from .._backend import _BUILTINS, Backend, _table, backend_named, find_backend, get_backend

FRAMEWORKS = tuple(_BUILTINS)
"""The names of the built-in backends, NumPy first: the frameworks the command runs by default
where installed (`installed_backends`)."""


def backend_status(name: str) -> str | None:
    """None when framework `name` and its implicitdiff backend are importable; else why not."""
    if name not in FRAMEWORKS:
        return f"unknown framework (expected one of {', '.join(FRAMEWORKS)})"
    framework, spec = _table[name]
    if importlib.util.find_spec(framework) is None:
        return f"{framework} is not installed"
    # The backend first: importing a framework whose backend is unusable would make the core
    # consider that backend for every call.
    modname, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if modname:
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # a broken backend is reported, not fatal to the other frameworks
            return f"{modname} failed to import ({type(e).__name__}: {e})"
        if not isinstance(getattr(mod, attr, None), Backend):
            return f"{modname} does not expose a `{attr}`"
    try:
        importlib.import_module(framework)
    except ImportError as e:
        return f"{framework} failed to import ({e})"
    return None


def installed_backends() -> list[str]:
    """The frameworks whose framework and implicitdiff backend both import (numpy always)."""
    return [name for name in FRAMEWORKS if backend_status(name) is None]


def _select_backends(spec: str | None, out: TextIO) -> list[str] | None:
    """The frameworks to run: the requested ones (all must be usable) or every installed one."""
    if spec is None:
        chosen = []
        for name in FRAMEWORKS:
            why = backend_status(name)
            if why is None:
                chosen.append(name)
            else:
                print(f"note: skipping {name}: {why}", file=out)
        return chosen
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [(name, backend_status(name)) for name in chosen]
    bad = [(name, why) for name, why in bad if why is not None]
    if bad or not chosen:
        for name, why in bad:
            print(f"error: backend {name!r} is not usable: {why}", file=sys.stderr)
        if not chosen:
            print("error: --backends expects a comma-separated list such as numpy,jax,torch",
                  file=sys.stderr)
        return None
    return list(dict.fromkeys(chosen))


@contextlib.contextmanager
def _float64(frameworks: Sequence[str]) -> Iterator[None]:
    """float64 arrays in every framework of `frameworks` for the block (`Backend.enable_float64`:
    JAX's 64-bit mode), restored afterwards."""
    with contextlib.ExitStack() as stack:
        for name in frameworks:
            stack.enter_context(backend_named(name).enable_float64())
        yield


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy of an array of any registered framework (`Backend.to_host`)."""
    bk = find_backend(a)
    return np.asarray(a if bk is None else bk.to_host(a))


def _sync(framework: str, tree: Any) -> None:
    """Wait for asynchronous work (and the framework's diagnostics callbacks) to finish."""
    backend_named(framework).synchronize(tree)


def _reference() -> str:
    """The name of the NumPy reference backend (the owner of NumPy arrays)."""
    return get_backend(np.zeros(())).name



# ---- pytrees of arguments (None is a leaf here, so gradients with None line up with the arguments)

def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [y for k in sorted(tree) for y in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [y for t in tree for y in _leaves(t)]
    return [tree]


def _rebuild(tree: Any, leaves: Sequence[Any]) -> Any:
    it = iter(leaves)

    def walk(t: Any) -> Any:
        if isinstance(t, dict):
            new = {k: walk(t[k]) for k in sorted(t)}
            return {k: new[k] for k in t}
        if isinstance(t, (list, tuple)):
            kids = [walk(c) for c in t]
            if isinstance(t, list):
                return kids
            return type(t)(*kids) if hasattr(type(t), "_fields") else tuple(kids)
        return next(it)

    return walk(tree)


def _is_floating_np(leaf: Any) -> bool:
    return isinstance(leaf, np.ndarray) and np.issubdtype(leaf.dtype, np.floating)


def _numpy_args(args: Any) -> Any:
    """User arguments as NumPy float64 (floating leaves), other leaves unchanged."""
    def conv(leaf: Any) -> Any:
        if isinstance(leaf, bool) or leaf is None:
            return leaf
        if isinstance(leaf, (float, np.floating)):
            return np.asarray(leaf, dtype=np.float64)
        if hasattr(leaf, "detach") or hasattr(leaf, "__array__"):
            arr = to_numpy(leaf)
            return arr.astype(np.float64) if np.issubdtype(arr.dtype, np.floating) else arr
        return leaf

    return _rebuild(args, [conv(leaf) for leaf in _leaves(args)])


def _to_framework(tree: Any, framework: str) -> Any:
    """Floating NumPy leaves to float64 arrays of `framework`; integer/bool arrays converted with
    their dtype; every other leaf unchanged."""
    leaves = _leaves(tree)
    out = [_gallery.to_framework(leaf, framework) if isinstance(leaf, (np.ndarray, np.generic))
           else leaf for leaf in leaves]
    return _rebuild(tree, out)


def _vec(tree: Any) -> np.ndarray:
    parts = [to_numpy(leaf).astype(np.float64).ravel() for leaf in _leaves(tree)
             if leaf is not None]
    return np.concatenate(parts) if parts else np.zeros(0)
