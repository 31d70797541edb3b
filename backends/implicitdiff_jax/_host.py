"""The JAX backend's host side: NumPy conversion, and host functions for SciPy from `jax.grad`,
`jax.hessian`, `jax.jacfwd`, compiled with `jax.jit` and cached per (function, argument
structure, static arguments), so repeated drop-in calls with new values of $\\theta$ do not
recompile."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from implicitdiff.backend import host_scalar

_JIT_CACHE: dict[Any, Callable[..., Any]] = {}
_JIT_CACHE_SIZE = 128


def is_tracer(x: Any) -> bool:
    """Whether `x` is a JAX tracer (a value being traced by `jit`, `vmap`, `grad`)."""
    return isinstance(x, jax.core.Tracer)  # pyright: ignore[reportAttributeAccessIssue]


def to_host(tree: Any) -> Any:
    """JAX arrays as NumPy; a tracer raises `TracerArrayConversionError` (the core's cue for
    `jax.pure_callback`)."""
    def conv(a: Any) -> Any:
        if is_tracer(a):
            raise jax.errors.TracerArrayConversionError(a)
        return np.asarray(a) if hasattr(a, "dtype") else a

    return jax.tree_util.tree_map(conv, tree)


def from_host(tree: Any, device: Any = None) -> Any:
    """NumPy leaves as JAX arrays (JAX promotes dtypes itself: no cast)."""
    def conv(a: Any) -> Any:
        if not isinstance(a, (np.ndarray, np.generic)):
            return a
        arr = jnp.asarray(a)
        return arr if device is None else jax.device_put(arr, device)

    return jax.tree_util.tree_map(conv, tree)


def host_array(x: Any, like: Any = None) -> Any:
    a = jnp.asarray(x)
    if like is not None and hasattr(like, "dtype") and jnp.issubdtype(like.dtype, jnp.floating):
        return a.astype(like.dtype)
    return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.result_type(float))


def _np_tree(out: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a: np.asarray(a, dtype=np.float64) if hasattr(a, "dtype") or isinstance(
            a, (float, int)) else a, out)


def _compiled(kind: str, f: Callable[..., Any], theta: tuple,
              make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[..., Any]:
    """`make(g)` jitted, with g(x, *extra, dyn) = f(x, *extra, *theta) and the array leaves
    of theta (`dyn`) as traced arguments."""
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    is_dyn = [isinstance(a, (np.ndarray, np.generic, float, jax.Array)) and
              not isinstance(a, bool) for a in leaves]
    dyn = [a for a, d in zip(leaves, is_dyn) if d]
    static = tuple(None if d else a for a, d in zip(leaves, is_dyn))

    def build() -> Callable[..., Any]:
        def g(x: Any, *rest: Any) -> Any:
            *extra, dyn_ = rest
            it = iter(dyn_)
            full = [next(it) if d else s for s, d in zip(static, is_dyn)]
            return f(x, *extra, *jax.tree_util.tree_unflatten(treedef, full))

        return jax.jit(make(g))

    try:
        key: Any = (kind, f, treedef, tuple(is_dyn), static)
        hash(key)
    except TypeError:
        key = None
    if key is None:
        fn = build()
    else:
        fn = _JIT_CACHE.get(key)
        if fn is None:
            if len(_JIT_CACHE) >= _JIT_CACHE_SIZE:
                _JIT_CACHE.pop(next(iter(_JIT_CACHE)))
            fn = _JIT_CACHE[key] = build()
    dyn_j = [jnp.asarray(a) for a in dyn]
    return lambda x, *extra: fn(jnp.asarray(x), *extra, dyn_j)


def host_function(f: Callable[..., Any], theta: tuple, scalar: bool) -> Callable[..., Any]:
    fn = _compiled("value", f, theta, lambda g: g)

    def h(x: Any, *extra: Any) -> Any:
        out = fn(x, *[jnp.asarray(e) for e in extra])
        return host_scalar(out) if scalar else _np_tree(out)

    return h


def host_derivative(f: Callable[..., Any], theta: tuple, kind: str) -> Callable[..., Any] | None:
    if kind == "value_and_grad":
        fn = _compiled("vg", f, theta, lambda g: jax.value_and_grad(g))

        def vg(x: Any) -> tuple[float, np.ndarray]:
            v, gr = fn(x)
            return float(v), np.asarray(gr, dtype=np.float64)

        return vg
    if kind == "hessian":
        fh = _compiled("hess", f, theta, lambda g: jax.hessian(g))
        return lambda x: np.asarray(fh(x), dtype=np.float64)
    if kind == "hessp":
        def make(g: Callable[..., Any]) -> Callable[..., Any]:
            def hvp(x: Any, p: Any, dyn: Any) -> Any:
                return jax.jvp(lambda z: jax.grad(g)(z, dyn), (x,), (p,))[1]

            return hvp

        fp = _compiled("hessp", f, theta, make)
        return lambda x, p: np.asarray(fp(x, jnp.asarray(p, dtype=jnp.asarray(x).dtype)),
                                       dtype=np.float64)
    if kind == "jacobian":
        fj = _compiled("jac", f, theta, lambda g: jax.jacfwd(g))
        return lambda x: np.atleast_2d(np.asarray(fj(x), dtype=np.float64))
    if kind in ("derivative", "second_derivative"):
        order = 1 if kind == "derivative" else 2
        make_d = (lambda g: jax.grad(g)) if order == 1 else (lambda g: jax.grad(jax.grad(g)))
        fd = _compiled(f"d{order}", f, theta, make_d)
        return lambda x: float(fd(jnp.asarray(x, dtype=jnp.result_type(float))))
    raise ValueError(f"host_derivative: unknown kind {kind!r}.")


@contextlib.contextmanager
def float64_mode() -> Iterator[None]:
    """JAX's 64-bit mode for the block (restored afterwards)."""
    before = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)
