"""The small array helpers the core's algorithms share, written once against the array API.

Row-wise products of the solvers' `(..., n)` vectors, the device of an array, a loop counter
made on the operands' device, the finite-difference step sizes of the derivative-free
backends, and the validation of `on_failure`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

ON_FAILURE = ("raise", "warn", "nan")
"""What a failed solve does: raise an `ImplicitDiffError`, warn, or return NaN where it failed."""

COMPLEX_STEP = 1e-30
"""The complex-step size (relative to the largest entry of the direction): the derivative is
$\\mathrm{Im}\\,F(x + ih v)/h$, exact to rounding for any $h$ this small."""

CENTRAL_DIFFERENCE = float(np.finfo(np.float64).eps) ** (1 / 3)
"""The central-difference step in float64 (relative to the size of the point): $\\epsilon^{1/3}$
balances truncation ($h^2$) against rounding ($\\epsilon/h$)."""


def check_on_failure(on_failure: Any, who: str = "") -> None:
    """Raise `ValueError` unless `on_failure` is one of `ON_FAILURE`; `who` prefixes the message."""
    if on_failure not in ON_FAILURE:
        head = f"{who}: " if who else ""
        raise ValueError(f"{head}on_failure: expected one of {ON_FAILURE}, got {on_failure!r}.")


def device(x: Any) -> Any:
    """The device of an array (array-API `device`, through array-api-compat)."""
    import array_api_compat

    return array_api_compat.device(x)


def size(shape: Any) -> int:
    """The number of elements of an array of shape `shape` (a tuple of ints, or a framework's
    shape object); 1 for `()`."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def norm(xp: Any, a: Any) -> Any:
    """Euclidean norm over the last axis, kept as a length-1 axis: `(..., n) -> (..., 1)`."""
    return xp.linalg.vector_norm(a, axis=-1, keepdims=True)


def dot(xp: Any, a: Any, b: Any) -> Any:
    """Row-wise inner product: `(..., n), (..., n) -> (..., 1)`."""
    return xp.sum(a * b, axis=-1, keepdims=True)


def safe_div(xp: Any, a: Any, b: Any, mask: Any) -> Any:
    """`a / b` where `mask`, 0 elsewhere, never dividing by a masked-out `b`."""
    return xp.where(mask, a / xp.where(mask, b, xp.ones_like(b)), xp.zeros_like(a))


def all_finite(xp: Any, a: Any, axis: Any = -1, keepdims: bool = False) -> Any:
    r"""Whether every entry of the floating array `a` along `axis` (an int or a tuple) is finite.

    $0 \cdot a$ is NaN exactly where `a` is NaN or infinite, and a sum of zeros is 0: three
    operations, a third of the cost of `all(isfinite(a))` on torch's CPU arrays, where
    `isfinite` is itself four. (NumPy's warning about `inf * 0` is silenced: that product is
    the test. Only for NumPy arrays: `torch.compile` would break its graph at the context.)"""
    if isinstance(a, (np.ndarray, np.generic)):
        with np.errstate(invalid="ignore"):
            zero = np.asarray(a) * 0
    else:
        zero = a * 0
    return xp.sum(zero, axis=axis, keepdims=keepdims) == 0


def zero_int(xp: Any, like: Any) -> Any:
    """A 0-d int32 zero (a loop counter) on the device of the array `like`.

    Made from `like` rather than with `device=`: arrays must not mix devices (array-api-strict
    checks it), and a sharded JAX array's device is a sharding that a scalar cannot take."""
    return xp.sum(xp.zeros_like(like, dtype=xp.int32), dtype=xp.int32)


class ArraySpec:
    """Shape and NumPy dtype of one array a host function returns: what
    `Backend.callback_result_shape` turns into its framework's shape descriptions (JAX's
    `ShapeDtypeStruct`) before a host solve runs under a transform."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape: tuple, dtype: Any):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)


def numpy_dtype(x: Any) -> np.dtype:
    """The NumPy dtype of a framework array's dtype (a framework's own dtype object, such as
    `torch.float32`, by its name); float64 for an object without a dtype."""
    dt = getattr(x, "dtype", None)
    if dt is None:
        return np.dtype(np.float64)
    try:
        return np.dtype(dt)
    except TypeError:
        return np.dtype(str(dt).rpartition(".")[2])


_CONTROLLER: list = []


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """One BLAS thread for the block, where threadpoolctl is installed (scikit-learn brings it):
    for the small and batched matrices of `idf.qp`'s host solve and of the command line's
    problems, where a multithreaded BLAS only synchronizes (beside PyTorch's threads on a busy
    2-core machine, `np.linalg.solve` of 32 125×125 systems took 10-300 ms instead of 3 ms; the
    NumPy reference of `implicitdiff check` ran ten times slower)."""
    if not _CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController

            _CONTROLLER.append(ThreadpoolController())
        except ImportError:
            _CONTROLLER.append(None)
    ctl = _CONTROLLER[0]
    if ctl is None:
        yield
        return
    with ctl.limit(limits=1, user_api="blas"):
        yield
