"""The host side of the SciPy drop-ins: moving arrays between a framework and NumPy, and the
derivatives SciPy is handed (`jac`, `hess`, `hessp`) from the framework's autodiff.

SciPy works on float64 NumPy arrays. The user's `fun` is written for the framework of the inputs
(`jnp`, `torch`, NumPy, or array-API code that runs on any of them); each `Framework` wraps it
into a host function `x_np -> np` that SciPy can call. JAX and torch are imported here only when
their arrays were passed (the framework is found from the arrays, and `sys.modules` already holds
it then).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _tree
from .._backend import find_backend
from .._errors import BackendNotFoundError, StructureError

_CS_H = 1e-30


def framework_name(*trees: Any) -> str:
    """`"numpy"`, `"jax"` or `"torch"`: the framework of the arrays in `trees`. NumPy arrays mix
    with the arrays of one framework (they are converted to it, as `jnp` functions would); NumPy
    when there are only NumPy arrays and Python numbers."""
    found = set()
    for tree in trees:
        for leaf in _tree.tree_flatten(tree)[0]:
            bk = find_backend(leaf)
            if bk is not None and bk.framework != "numpy":
                found.add(bk.framework)
    if len(found) > 1:
        raise BackendNotFoundError(
            f"implicitdiff.scipy: expected the arrays of one framework (NumPy arrays may mix "
            f"with them), got {sorted(found)}. Convert them to one framework first."
        )
    return found.pop() if found else "numpy"


def is_traced(x: Any) -> bool:
    """True for a JAX tracer (inside `jit`, `vmap`, `grad`)."""
    import sys

    jax = sys.modules.get("jax")
    return jax is not None and any(isinstance(leaf, jax.core.Tracer)
                                   for leaf in _tree.tree_flatten(x)[0])


class Framework:
    """Conversions and autodiff for one framework. The NumPy one hands SciPy the user's functions
    untouched (SciPy's own behaviour, finite differences where no `jac` is given)."""

    name = "numpy"

    # -- conversions ------------------------------------------------------------------------
    def to_host(self, tree: Any) -> Any:
        """Framework arrays -> NumPy (raises on a JAX tracer: the caller is then traced)."""
        return _tree.tree_map(lambda a: np.asarray(a) if hasattr(a, "dtype") else a, tree)

    def from_host(self, tree: Any) -> Any:
        """NumPy arrays -> framework arrays; Python numbers stay."""
        return tree

    def array(self, x: Any, like: Any = None) -> Any:
        """A floating framework array from host data (dtype of `like` when given)."""
        a = np.asarray(x)
        if like is not None:
            return a.astype(np.asarray(like).dtype, copy=False)
        return a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)

    def float_dtype_eps(self, x: Any) -> float:
        return float(np.finfo(np.asarray(x).dtype).eps)

    # -- host functions for SciPy -------------------------------------------------------------
    def host(self, f: Callable[..., Any], theta: tuple, *, scalar: bool = False
             ) -> Callable[..., Any]:
        """`x_np -> f(x, *theta)` as NumPy (a float when `scalar`)."""
        def h(x: Any, *extra: Any) -> Any:
            out = f(x, *extra, *theta)
            return _scalar(out) if scalar else _np_tree(out)

        return h

    def value_and_grad(self, f: Callable[..., Any], theta: tuple) -> Callable[..., Any] | None:
        return None

    def hess(self, f: Callable[..., Any], theta: tuple) -> Callable[..., Any] | None:
        return None

    def hessp(self, f: Callable[..., Any], theta: tuple) -> Callable[..., Any] | None:
        return None

    def jacobian(self, f: Callable[..., Any], theta: tuple) -> Callable[..., Any] | None:
        return None

    def derivative(self, f: Callable[..., Any], theta: tuple, order: int = 1
                   ) -> Callable[..., Any] | None:
        return None

    # -- host derivatives used by the drop-ins themselves (multipliers) ------------------------
    def grad_np(self, f: Callable[..., Any], z: np.ndarray, theta: tuple,
                user: Callable[..., Any] | None = None) -> np.ndarray:
        """$\\nabla f(z)$ on the host: the user's gradient, else complex step, else central
        differences."""
        if user is not None:
            return np.asarray(user(z, *theta), dtype=np.float64).reshape(z.shape)
        return np_jacobian(lambda v: np.reshape(f(v, *theta), (1,)), z)[0]

    def jac_np(self, f: Callable[..., Any], z: np.ndarray, theta: tuple,
               user: Callable[..., Any] | None = None) -> np.ndarray:
        """The Jacobian of a vector function at `z` on the host, shape `(m, n)`."""
        if user is not None:
            return np.atleast_2d(np.asarray(user(z, *theta), dtype=np.float64))
        return np_jacobian(lambda v: np.reshape(f(v, *theta), (-1,)), z)


def _scalar(out: Any) -> float:
    a = np.asarray(out.detach().cpu() if hasattr(out, "detach") else out)
    if a.size != 1:
        raise StructureError(f"expected fun to return a scalar, got shape {a.shape}.")
    return float(a.reshape(()))


def _np_tree(out: Any) -> Any:
    def conv(a: Any) -> Any:
        if hasattr(a, "detach"):
            a = a.detach().cpu().numpy()
        return np.asarray(a, dtype=np.float64) if hasattr(a, "dtype") or isinstance(
            a, (float, int)) else a

    return _tree.tree_map(conv, out)


def np_jacobian(f: Callable[[np.ndarray], np.ndarray], z: np.ndarray) -> np.ndarray:
    """The `(m, n)` Jacobian of `f` at the 1-d `z`: complex step when `f` is complex-safe (exact),
    central differences otherwise."""
    z = np.asarray(z, dtype=np.float64)
    n = z.size
    try:
        cols = []
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.ComplexWarning)
            for j in range(n):
                v = z.astype(np.complex128)
                v[j] += 1j * _CS_H
                out = np.asarray(f(v))
                if not np.iscomplexobj(out):
                    raise TypeError("dropped the imaginary part")
                cols.append(np.imag(out) / _CS_H)
        return np.stack(cols, axis=-1) if cols else np.zeros((np.size(f(z)), 0))
    except (TypeError, ValueError, np.exceptions.ComplexWarning):
        pass
    h = np.cbrt(np.finfo(np.float64).eps) * np.maximum(1.0, np.abs(z))
    cols = []
    for j in range(n):
        e = np.zeros(n)
        e[j] = h[j]
        cols.append((np.asarray(f(z + e), dtype=np.float64) -
                     np.asarray(f(z - e), dtype=np.float64)) / (2 * h[j]))
    return np.stack(cols, axis=-1)


# ---- JAX --------------------------------------------------------------------------------------

_JIT_CACHE: dict[Any, Callable[..., Any]] = {}
_JIT_CACHE_SIZE = 128


class JaxFramework(Framework):
    """Host functions from `jax.grad`, `jax.hessian`, `jax.jacfwd`, compiled with `jax.jit` and
    cached per (function, argument structure, static arguments), so repeated drop-in calls with new
    values of $\\theta$ do not recompile."""

    name = "jax"

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp

    def to_host(self, tree: Any) -> Any:
        jax = self.jax

        def conv(a: Any) -> Any:
            if isinstance(a, jax.core.Tracer):
                # lets the core fall back to jax.pure_callback
                raise jax.errors.TracerArrayConversionError(a)
            return np.asarray(a) if hasattr(a, "dtype") else a

        return jax.tree_util.tree_map(conv, tree)

    def from_host(self, tree: Any) -> Any:
        jnp = self.jnp
        return self.jax.tree_util.tree_map(
            lambda a: jnp.asarray(a) if isinstance(a, (np.ndarray, np.generic)) else a, tree)

    def array(self, x: Any, like: Any = None) -> Any:
        jnp = self.jnp
        a = jnp.asarray(x)
        if like is not None:
            return a.astype(jnp.asarray(like).dtype)
        return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.result_type(float))

    def float_dtype_eps(self, x: Any) -> float:
        return float(self.jnp.finfo(self.jnp.asarray(x).dtype).eps)

    def _compiled(self, kind: str, f: Callable[..., Any], theta: tuple,
                  make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[..., Any]:
        """`make(g)` jitted, with g(x, *extra, dyn) = f(x, *extra, *theta) and the array leaves
        of theta (`dyn`) as traced arguments."""
        jax = self.jax
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
        dyn_j = [self.jnp.asarray(a) for a in dyn]
        return lambda x, *extra: fn(self.jnp.asarray(x), *extra, dyn_j)

    def host(self, f, theta, *, scalar=False):
        fn = self._compiled("value", f, theta, lambda g: g)

        def h(x: Any, *extra: Any) -> Any:
            out = fn(x, *[self.jnp.asarray(e) for e in extra])
            return _scalar(out) if scalar else _np_tree(out)

        return h

    def value_and_grad(self, f, theta):
        fn = self._compiled("vg", f, theta, lambda g: self.jax.value_and_grad(g))

        def h(x: Any) -> tuple[float, np.ndarray]:
            v, g = fn(x)
            return float(v), np.asarray(g, dtype=np.float64)

        return h

    def hess(self, f, theta):
        fn = self._compiled("hess", f, theta, lambda g: self.jax.hessian(g))
        return lambda x: np.asarray(fn(x), dtype=np.float64)

    def hessp(self, f, theta):
        jax = self.jax

        def make(g: Callable[..., Any]) -> Callable[..., Any]:
            def hvp(x: Any, p: Any, dyn: Any) -> Any:
                return jax.jvp(lambda z: jax.grad(g)(z, dyn), (x,), (p,))[1]

            return hvp

        fn = self._compiled("hessp", f, theta, make)
        return lambda x, p: np.asarray(fn(x, self.jnp.asarray(p, dtype=self.jnp.asarray(
            x).dtype)), dtype=np.float64)

    def jacobian(self, f, theta):
        fn = self._compiled("jac", f, theta, lambda g: self.jax.jacfwd(g))
        return lambda x: np.atleast_2d(np.asarray(fn(x), dtype=np.float64))

    def derivative(self, f, theta, order=1):
        jax = self.jax
        make = (lambda g: jax.grad(g)) if order == 1 else (lambda g: jax.grad(jax.grad(g)))
        fn = self._compiled(f"d{order}", f, theta, make)
        return lambda x: float(fn(self.jnp.asarray(x, dtype=self.jnp.result_type(float))))

    def grad_np(self, f, z, theta, user=None):
        return self.value_and_grad(f, theta)(z)[1]

    def jac_np(self, f, z, theta, user=None):
        return self.jacobian(lambda x, *a: self.jnp.reshape(f(x, *a), (-1,)), theta)(z)


# ---- PyTorch ----------------------------------------------------------------------------------

class TorchFramework(Framework):
    """Host functions from `torch.func.grad_and_value`, `torch.func.hessian`, `torch.func.jacfwd`,
    on tensors of the dtype and device of `x0`."""

    name = "torch"

    def __init__(self, like: Any) -> None:
        import torch
        import torch.func

        self.torch = torch
        self.device = getattr(like, "device", None)
        dtype = getattr(like, "dtype", None)
        self.dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float64

    def to_host(self, tree: Any) -> Any:
        torch = self.torch

        def conv(a: Any) -> Any:
            if isinstance(a, torch.Tensor):
                return a.detach().cpu().numpy()
            return np.asarray(a) if hasattr(a, "dtype") else a

        return _tree.tree_map(conv, tree)

    def from_host(self, tree: Any) -> Any:
        torch = self.torch

        def conv(a: Any) -> Any:
            if isinstance(a, (np.ndarray, np.generic)):
                t = torch.as_tensor(np.array(a), device=self.device)
                return t.to(self.dtype) if t.is_floating_point() else t
            return a

        return _tree.tree_map(conv, tree)

    def array(self, x: Any, like: Any = None) -> Any:
        torch = self.torch
        if isinstance(x, torch.Tensor):
            t = x.detach()
        else:
            t = torch.as_tensor(np.array(x), device=self.device)
        dtype = like.dtype if like is not None else self.dtype
        return t.to(dtype=dtype)

    def float_dtype_eps(self, x: Any) -> float:
        return float(self.torch.finfo(self.dtype).eps)

    def _t(self, x: Any) -> Any:
        return self.torch.as_tensor(np.array(x), dtype=self.dtype, device=self.device)

    def host(self, f, theta, *, scalar=False):
        def h(x: Any, *extra: Any) -> Any:
            with self.torch.no_grad():
                out = f(self._t(x), *[self._t(e) for e in extra], *theta)
            return _scalar(out) if scalar else _np_tree(out)

        return h

    def value_and_grad(self, f, theta):
        gv = self.torch.func.grad_and_value(lambda x: f(x, *theta))

        def h(x: Any) -> tuple[float, np.ndarray]:
            g, v = gv(self._t(x))
            return float(v), g.detach().cpu().numpy().astype(np.float64)

        return h

    def hess(self, f, theta):
        H = self.torch.func.hessian(lambda x: f(x, *theta))
        return lambda x: H(self._t(x)).detach().cpu().numpy().astype(np.float64)

    def hessp(self, f, theta):
        func = self.torch.func
        grad = func.grad(lambda x: f(x, *theta))

        def h(x: Any, p: Any) -> np.ndarray:
            return func.jvp(grad, (self._t(x),), (self._t(p),))[1].detach().cpu().numpy(
            ).astype(np.float64)

        return h

    def jacobian(self, f, theta):
        J = self.torch.func.jacfwd(lambda x: f(x, *theta))
        return lambda x: np.atleast_2d(J(self._t(x)).detach().cpu().numpy().astype(np.float64))

    def derivative(self, f, theta, order=1):
        func = self.torch.func
        d = func.grad(lambda x: f(x, *theta))
        if order == 2:
            d = func.grad(d)
        return lambda x: float(d(self._t(x)))

    def grad_np(self, f, z, theta, user=None):
        return self.value_and_grad(f, theta)(z)[1]

    def jac_np(self, f, z, theta, user=None):
        return self.jacobian(lambda x, *a: self.torch.reshape(f(x, *a), (-1,)), theta)(z)


def get_framework(name: str, like: Any = None) -> Framework:
    if name == "jax":
        return JaxFramework()
    if name == "torch":
        return TorchFramework(like)
    if name == "numpy":
        return Framework()
    raise StructureError(
        f"implicitdiff.scipy: expected NumPy, JAX or PyTorch arrays, got arrays of the framework "
        f"{name!r}."
    )


def default_residual_tol(eps: float) -> float:
    """The drop-ins' default `residual_tol`: $\\max(10^{-4}, 10\\sqrt{\\epsilon})$, compatible
    with SciPy's default stopping tolerances (e.g. `gtol=1e-5` for BFGS)."""
    return max(1e-4, 10.0 * math.sqrt(eps))
