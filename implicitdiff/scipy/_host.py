"""The host side of the SciPy drop-ins: which backend a call belongs to, and the host functions
and derivatives SciPy is handed (`jac`, `hess`, `hessp`), all asked of that backend
(`Backend.to_host`, `from_host`, `host_array`, `host_function`, `host_derivative`).

SciPy works on float64 NumPy arrays. The user's `fun` is written for the framework of the inputs
(`jnp`, `torch`, NumPy, or array-API code that runs on any of them); NumPy arrays beside JAX or
torch arrays are constants of that framework. The backend wraps `fun` into a host function
`x_np -> np` that SciPy can call; a backend without autodiff (the NumPy reference) hands SciPy
no derivative, so SciPy keeps its own behaviour (finite differences where no `jac` is given).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .._array import CENTRAL_DIFFERENCE, COMPLEX_STEP
from .._backend import Backend, first_float, get_backend
from .._root import default_residual_tol

#: The drop-ins' floor on the default `residual_tol` (SciPy's default stopping tolerances are
#: loose, e.g. `gtol=1e-5` for BFGS): `default_residual_tol(eps, floor=SCIPY_TOL_FLOOR)`.
SCIPY_TOL_FLOOR = 1e-4


class Derived:
    """`op(fn, x, *args)`: a function derived from the user's `fn` by a module-level `op`
    (take the value of a `(value, grad)` pair, flatten the output, ...), equal to, and hashing
    like, every other `Derived` of the same `op` and `fn`.

    Backends cache the host functions they compile by function (the JAX backend's `jax.jit`
    cache): a fresh closure per drop-in call would recompile at every call, eagerly and, for the
    host solve that runs at every call, under `jax.jit` too. An unhashable `fn` makes an
    unhashable `Derived` (no caching, as before)."""

    __slots__ = ("__name__", "fn", "op")

    def __init__(self, op: Callable[..., Any], fn: Any, name: str | None = None):
        self.op = op
        self.fn = fn
        self.__name__ = name or getattr(fn, "__name__", "fun")

    def __call__(self, x: Any, *args: Any) -> Any:
        return self.op(self.fn, x, *args)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Derived) and other.op is self.op and other.fn == self.fn

    def __hash__(self) -> int:
        return hash((self.op, self.fn))

    def __repr__(self) -> str:
        return f"<{self.op.__name__} of {self.fn!r}>"


def value_of(fn: Callable[..., Any], x: Any, *args: Any) -> Any:
    """`fn(x, *args)[0]`: the value of a function returning `(value, derivative)` (SciPy's
    `jac=True` / `fprime=True`)."""
    return fn(x, *args)[0]


def flat_output(fn: Callable[..., Any], x: Any, *args: Any) -> Any:
    """`fn(x, *args)` reshaped to 1-d (constraint functions, for their Jacobian)."""
    import array_api_compat

    out = fn(x, *args)
    return array_api_compat.array_namespace(out).reshape(out, (-1,))


def backend_of_call(*trees: Any) -> tuple[Backend, Any]:
    """The backend of a drop-in call's arrays and its reference array `like` (the first
    floating array of that framework, x0 first): the dtype and device that host data and
    NumPy constants take. NumPy arrays mix with the arrays of one framework."""
    bk = get_backend(*trees)
    return bk, first_float(bk, *trees)


def residual_tol_of(x: Any) -> float:
    """The drop-ins' default `residual_tol` for the unknown `x`."""
    import array_api_compat

    xp = array_api_compat.array_namespace(x)
    return default_residual_tol(float(xp.finfo(x.dtype).eps), floor=SCIPY_TOL_FLOOR)


def host_grad(bk: Backend, f: Callable[..., Any], z: np.ndarray, theta: tuple, like: Any,
              user: Callable[..., Any] | None = None) -> np.ndarray:
    """$\\nabla f(z)$ on the host: the backend's autodiff, else the user's gradient, else the
    complex step (central differences when `f` is not complex-safe)."""
    vg = bk.host_derivative(f, theta, "value_and_grad", like=like)
    if vg is not None:
        return vg(z)[1]
    if user is not None:
        return np.asarray(user(z, *theta), dtype=np.float64).reshape(z.shape)
    return np_jacobian(lambda v: np.reshape(_raw(bk, f, v, theta, like), (1,)), z)[0]


def host_jac(bk: Backend, f: Callable[..., Any], z: np.ndarray, theta: tuple, like: Any,
             user: Callable[..., Any] | None = None) -> np.ndarray:
    """The Jacobian of a vector function at `z` on the host, shape `(m, n)`: the backend's
    autodiff, else the user's `jac`, else the complex step / central differences."""
    J = bk.host_derivative(Derived(flat_output, f), theta, "jacobian", like=like)
    if J is not None:
        return J(z)
    if user is not None:
        return np.atleast_2d(np.asarray(user(z, *theta), dtype=np.float64))
    return np_jacobian(lambda v: np.reshape(_raw(bk, f, v, theta, like), (-1,)), z)


def _raw(bk: Backend, f: Callable[..., Any], v: np.ndarray, theta: tuple, like: Any) -> Any:
    """`f(v, *theta)` with `v` given to the backend as is (complex for the complex step)."""
    return np.asarray(bk.to_host(f(bk.from_host(v, like=like), *theta)))


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
                v[j] += 1j * COMPLEX_STEP
                out = np.asarray(f(v))
                if not np.iscomplexobj(out):
                    raise TypeError("dropped the imaginary part")
                cols.append(np.imag(out) / COMPLEX_STEP)
        return np.stack(cols, axis=-1) if cols else np.zeros((np.size(f(z)), 0))
    except (TypeError, ValueError, np.exceptions.ComplexWarning):
        pass
    h = CENTRAL_DIFFERENCE * np.maximum(1.0, np.abs(z))
    cols = []
    for j in range(n):
        e = np.zeros(n)
        e[j] = h[j]
        cols.append((np.asarray(f(z + e), dtype=np.float64) -
                     np.asarray(f(z - e), dtype=np.float64)) / (2 * h[j]))
    return np.stack(cols, axis=-1)


