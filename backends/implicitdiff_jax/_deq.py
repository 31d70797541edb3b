"""Deep equilibrium layers for JAX: `deq(f, x)`, a pure function.

$z^* = f(z^*, x)$, found by one of `implicitdiff.solvers` (Anderson by default), differentiated
by the backward modes of `implicitdiff.deq` (`IFT`, `Neumann`, `Phantom`, `JFB`, the same
objects as the PyTorch `DEQ`'s). Works under `jax.jit`, `jax.grad`, `jax.vmap`; the solver's
iterations are never differentiated through. The parameters are the arrays of the pytree `f`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import implicitdiff as idf
from implicitdiff.backend import (
    NeumannSolve,
    StructureError,
    default_residual_tol,
    nan_where,
    resolve_on_failure,
)
from implicitdiff.deq import (
    IFT,
    SOLVERS,
    DEQStats,
    Neumann,
    as_backward,
    as_solver,
    check_fixed_point,
    forward_options,
    is_builtin_solver,
    samples_finite,
    zero_failed_samples,
)

from ._backend import backend as _backend

__all__ = ["DEQStats", "NeumannSolve", "deq"]

_SOLVERS = SOLVERS  # the names the layers accept (kept for `_deq_module`)


def _is_param(leaf: Any) -> bool:
    """An array leaf of the cell's pytree: a parameter (the rest are constants), as equinox's
    `is_array` decides."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def deq(f: Callable[..., Any], x: Any, *legacy: Any, z0: Any = None,
        z_shape: tuple[int, ...] | None = None, solver: str | Callable[..., Any] = "anderson",
        solver_options: dict[str, Any] | None = None, backward: Any = None,
        residual_tol: float | None = None, on_failure: str | None = None,
        solve: Any = None, steps: Any = None, damping: Any = None) -> tuple[Any, DEQStats]:
    """The fixed point $z^* = f(z^*, x)$ of a batch, and the solver's statistics.

    ```python
    import jax, jax.numpy as jnp
    from jax.tree_util import Partial
    from implicitdiff.deq import IFT, Phantom
    from implicitdiff_jax import deq

    def cell(params, z, x):                   # (batch, hidden) -> (batch, hidden), row by row
        return jnp.tanh(z @ params["W"].T + x @ params["U"].T)

    key1, key2, key3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"W": 0.3 * jax.random.normal(key1, (16, 16)) / 4,
              "U": jax.random.normal(key2, (16, 8)) / 3}
    x = jax.random.normal(key3, (32, 8))
    z, stats = deq(Partial(cell, params), x, z_shape=(16,))   # f(z, x) = cell(params, z, x)
    grads = jax.grad(lambda p: jnp.sum(deq(Partial(cell, p), x, z_shape=(16,))[0] ** 2))(params)
    z, _ = deq(Partial(cell, params), x, z_shape=(16,), backward=Phantom(steps=5))
    print(stats.summary())
    ```

    **Arguments:**

    - `f`: the cell, `f(z, x) -> z'`, acting sample by sample on the leading batch dimension.
      Its parameters are the arrays of the pytree `f` (differentiated when floating): an
      `equinox.Module`'s array fields, or the arguments bound by `jax.tree_util.Partial(cell,
      params)` for a plain function `cell(params, z, x)`. A plain Python function has none.
    - `x`: the input, a pytree of arrays with the batch as their leading dimension
      (differentiated).
    - `z0`: initial state `(batch, *z_shape)`; default zeros of `(batch, *z_shape)` (`z_shape`
      default: the shape of `x`). The warm start of every framework: the previous `z` passed as
      `z0` (only an initial guess, it never changes the gradient).
    - `solver`: `"anderson"` (default), `"broyden"`, `"fixed_point_iteration"`, or a callable like
      those of `implicitdiff.solvers`; `solver_options` its keywords (default `maxiter=50` and,
      for the named solvers, `extra_step=3`: three plain steps after the last iteration, a
      far more accurate $z^*$ and gradient; `implicitdiff.deq.forward_options`).
    - `backward`: `IFT(solve=...)` (exact, default `IFT()`: the
      fixed-point iteration with a BiCGStab fallback and the uniqueness probe), `Neumann(terms)`,
      `Phantom(steps, damping)`, `JFB()` from `implicitdiff.deq`, a linear solver (`IFT` with
      it) or one of the names `"ift"`, `"neumann"`, `"phantom"`, `"jfb"`.
    - `residual_tol`, `on_failure`: as in `idf.custom_fixed_point`, in every backward mode: the
      forward solve is accepted when $\\max|f(z^*, x) - z^*| \\le$ `residual_tol` per sample
      (default $10\\sqrt\\epsilon$; the built-in solvers return that residual, so the check
      evaluates nothing); under `jit`, `"raise"` and `"warn"` act from a host callback.
      `"nan"` makes only the failed samples NaN (a failed solve, or an input `x` not finite
      in that sample; `stats.converged` false, `stats.max_abs_residual` NaN or above
      `residual_tol`), and they contribute nothing to the gradient, in every backward mode:
      the other samples and the parameters' gradient are those of the batch without them.
      `on_failure=None` (default): `idf.config.on_failure`, read when `deq` is called (traced).
    - Deprecated: `deq(f, params, x)` with `f(params, z, x)` (use
      `deq(Partial(f, params), x)`), and `solve=`, `steps=`, `damping=` (use a backward object).

    **Returns:** `(z, stats)`: `z` of shape `(batch, *z_shape)`, `stats` a `DEQStats` (not
    differentiated).
    """
    if legacy:
        if len(legacy) != 1:
            raise TypeError(f"deq: expected deq(f, x, **options), got {2 + len(legacy)} "
                            "positional arguments.")
        warnings.warn("deq(f, params, x) with f(params, z, x) is deprecated: the cell is f(z, x) "
                      "and its parameters are the arrays of the pytree f. Use "
                      "deq(jax.tree_util.Partial(f, params), x).", DeprecationWarning,
                      stacklevel=2)
        f, x = jax.tree_util.Partial(f, x), legacy[0]
    mode = as_backward(backward, "deq", solve=solve, steps=steps, damping=damping)
    on_failure = resolve_on_failure(on_failure, "deq: on_failure")
    if residual_tol is not None and not (isinstance(residual_tol, (int, float))
                                         and residual_tol > 0):
        raise ValueError(f"deq: residual_tol: expected a positive number or None, got "
                         f"{residual_tol!r}.")
    if not callable(f):
        raise TypeError(f"deq: expected a callable cell f(z, x), got {type(f).__name__}.")
    leaf = jax.tree_util.tree_leaves(x)[0]
    warm = z0 is not None
    if z0 is None:
        shape = leaf.shape[1:] if z_shape is None else tuple(z_shape)
        z0 = jnp.zeros((leaf.shape[0], *shape), dtype=leaf.dtype)
    batch, shape = z0.shape[0], tuple(z0.shape[1:])
    bk = _backend
    # NumPy inputs are JAX arrays here (as the implicit layer would make them), so that the
    # check below sees them
    x = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a) if isinstance(a, (np.ndarray, np.generic)) else a, x)
    # a sample whose input is not finite fails; with "nan" it is solved (and differentiated)
    # at x = 0 and its z* at 0, then made NaN: nothing of it reaches what the batch shares
    inputs_ok = samples_finite(bk, x, batch)
    isolate = on_failure == "nan"
    if isolate:
        x = zero_failed_samples(bk, x, inputs_ok, batch)
    solver_fn = as_solver(solver, "deq")
    opts = forward_options(solver_fn, solver_options)
    # the parameters: the array leaves of the cell's pytree; the other leaves are constants
    f_leaves, f_def = jax.tree_util.tree_flatten(f)
    where = [i for i, v in enumerate(f_leaves) if _is_param(v)]

    def cell(params: list) -> Any:
        leaves = list(f_leaves)
        for i, p in zip(where, params):
            leaves[i] = p
        return jax.tree_util.tree_unflatten(f_def, leaves)

    def T(z: Any, params: list, x: Any) -> Any:
        out = cell(params)(z.reshape(batch, *shape), x)
        if tuple(out.shape) != (batch, *shape):
            raise StructureError(f"deq: expected f(z, x) to return the shape of z, "
                                 f"{(batch, *shape)}, got {tuple(out.shape)}.")
        return out.reshape(z.shape)

    trusted = is_builtin_solver(solver_fn)

    def run(params: list, x: Any, z0f: Any) -> tuple[Any, tuple]:
        res = solver_fn(T, z0f, params, x, **opts)
        if trusted:
            # the built-in solvers return max|f(z) - z| at their value: the residual check
            # needs no other evaluation of f
            rmax = res.max_abs_residual
        else:
            rmax = jnp.max(jnp.abs(T(res.value, params, x) - res.value), axis=-1)
        value, ok = res.value, jnp.ones((batch,), dtype=bool)
        converged = res.converged
        if isolate:
            # "nan": the failed samples are recorded, then zero for the implicit rule (its
            # products with df/dz and df/dx there are finite, and get a zero cotangent) and NaN
            # after the layer; "raise"/"warn" act after the layer, on concrete values when eager
            value, rmax = _check(value, rmax)
            ok = jnp.all(jnp.isfinite(value), axis=-1)
            value = jnp.where(ok[:, None], value, jnp.zeros_like(value))
            converged = converged & ok
        stats = (res.steps, converged, res.residual_norm, res.relative_residual,
                 res.trace, res.relative_trace, rmax, ok)
        return value, jax.tree_util.tree_map(jax.lax.stop_gradient, stats)

    def _check(z: Any, rmax: Any) -> tuple[Any, Any]:
        tol = residual_tol
        if tol is None:
            tol = default_residual_tol(float(jnp.finfo(z.dtype).eps))
        return check_fixed_point(bk, z, rmax, tol, on_failure, "deq", inputs_ok=inputs_ok,
                                 with_residual=True)

    params = [f_leaves[i] for i in where]
    z0f = jax.lax.stop_gradient(z0.reshape(batch, -1))
    if isinstance(mode, (IFT, Neumann)):  # the implicit rule with the mode's linear solver
        def layer(params: list, x: Any, *, z0: Any) -> tuple[Any, tuple]:
            return run(params, x, z0)

        layer.__name__ = "deq"
        # the residual check is run's (above); custom_fixed_point checks finiteness only; no
        # kink probe (a cell's ReLU switches take JAX's convention, as in the PyTorch DEQ)
        fn = idf.custom_fixed_point(T, solve=mode.solve, has_aux=True, batch_dims=1,
                                    residual_tol=math.inf, on_failure=on_failure,
                                    kink_probe=False)(layer)
        z, aux = fn(params, x, z0=z0f)
    else:  # Phantom, JFB: a few recorded steps of f from the detached fixed point
        zs, aux = run(jax.lax.stop_gradient(params), jax.lax.stop_gradient(x), z0f)
        z = mode.unroll(lambda z_: T(z_, params, x), jax.lax.stop_gradient(zs))
    *aux, ok = aux
    stats = DEQStats(*aux, warm_started=warm)
    if isolate:
        z = nan_where(bk, z, ok)
    else:
        z, rmax = _check(z, stats.max_abs_residual)
        stats = stats._replace(max_abs_residual=rmax)
    return z.reshape(batch, *shape), stats
