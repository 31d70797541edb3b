"""Deep equilibrium layers for JAX: `deq(f, params, x)`, a pure function.

$z^* = f(\\text{params}, z^*, x)$, found by one of `implicitdiff.solvers` (Anderson by default),
differentiated by the implicit function theorem (exact, default) or by an approximate backward
mode. Works under `jax.jit`, `jax.grad`, `jax.vmap`; the solver's iterations are never
differentiated through. The backward modes are the PyTorch ones (`docs/deq.md`): exact `"ift"`
(any core linear solver), `"neumann"` ($k$ terms of the Neumann series, `NeumannSolve`),
`"phantom"` ($k$ damped steps of $f$ from $z^*$), `"jfb"` (one step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import implicitdiff as idf
from implicitdiff import solvers as _solvers
from implicitdiff._backend import get_backend
from implicitdiff._errors import StructureError
from implicitdiff._linear_solve import AbstractLinearSolver, NeumannSolve
from implicitdiff._root import _forward_error, default_residual_tol, record_forward

__all__ = ["DEQStats", "NeumannSolve", "deq"]


class DEQStats(NamedTuple):
    """The forward solve, per sample (arrays of shape `(batch,)`; traces `(batch, maxiter)`).
    `max_abs_residual` is $\\max|f(z^*, x) - z^*|$, what `residual_tol` bounds."""

    steps: Any
    converged: Any
    residual_norm: Any
    relative_residual: Any
    trace: Any
    max_abs_residual: Any


_SOLVERS: dict[str, Callable[..., Any]] = {
    "anderson": _solvers.anderson,
    "broyden": _solvers.broyden,
    "fixed_point_iteration": _solvers.fixed_point_iteration,
}


def deq(f: Callable[..., Any], params: Any, x: Any, *, z0: Any = None,
        z_shape: tuple[int, ...] | None = None, solver: str | Callable[..., Any] = "anderson",
        solver_options: dict[str, Any] | None = None, backward: str = "ift",
        solve: AbstractLinearSolver | None = None, steps: int = 5, damping: float = 1.0,
        residual_tol: float | None = None, on_failure: str = "raise") -> tuple[Any, DEQStats]:
    """The fixed point $z^* = f(\\text{params}, z^*, x)$ of a batch, and the solver's statistics.

    ```python
    def f(params, z, x):                      # (batch, hidden) -> (batch, hidden), row by row
        return jnp.tanh(z @ params["W"].T + x @ params["U"].T)

    z, stats = deq(f, params, x, z_shape=(hidden,))
    jax.grad(lambda p: loss(deq(f, p, x, z_shape=(hidden,))[0]))(params)
    ```

    **Arguments:**

    - `f`: `f(params, z, x) -> z'` acting sample by sample on the leading batch dimension.
    - `params`, `x`: pytrees; both are differentiated.
    - `z0`: initial state `(batch, *z_shape)`; default zeros of `(batch, *z_shape)` (`z_shape`
      default: the shape of `x`). A warm start is simply the previous `z` passed as `z0`.
    - `solver`: `"anderson"` (default), `"broyden"`, `"fixed_point_iteration"`, or a callable like
      those of `implicitdiff.solvers`; `solver_options` its keywords (default `maxiter=50`).
    - `backward`: `"ift"` (exact; linear solver `solve`, default `idf.BiCGStab()`),
      `"neumann"` (`steps` terms of the Neumann series), `"phantom"` (`steps` damped steps
      with `damping`), `"jfb"` (one step).
    - `residual_tol`, `on_failure`: as in `idf.custom_fixed_point`, in every backward mode: the
      forward solve is accepted when $\\max|f(z^*, x) - z^*| \\le$ `residual_tol` per sample
      (default $10\\sqrt\\epsilon$; the built-in solvers return that residual, so the check
      evaluates nothing); under `jit`, `"raise"` and `"warn"` act from a host callback, `"nan"`
      makes the failed samples NaN.

    **Returns:** `(z, stats)`: `z` of shape `(batch, *z_shape)`, `stats` a `DEQStats` (not
    differentiated).
    """
    if on_failure not in ("raise", "warn", "nan"):
        raise ValueError(f"deq: on_failure: expected 'raise', 'warn' or 'nan', got "
                         f"{on_failure!r}.")
    if residual_tol is not None and not (isinstance(residual_tol, (int, float))
                                         and residual_tol > 0):
        raise ValueError(f"deq: residual_tol: expected a positive number or None, got "
                         f"{residual_tol!r}.")
    leaf = jax.tree_util.tree_leaves(x)[0]
    if z0 is None:
        shape = leaf.shape[1:] if z_shape is None else tuple(z_shape)
        z0 = jnp.zeros((leaf.shape[0], *shape), dtype=leaf.dtype)
    batch, shape = z0.shape[0], tuple(z0.shape[1:])
    solver_fn = _SOLVERS[solver] if isinstance(solver, str) else solver
    opts = {"maxiter": 50, **(solver_options or {})}

    def T(z: Any, params: Any, x: Any) -> Any:
        out = f(params, z.reshape(batch, *shape), x)
        if tuple(out.shape) != (batch, *shape):
            raise StructureError(f"deq: expected f(params, z, x) to return the shape of z, "
                                 f"{(batch, *shape)}, got {tuple(out.shape)}.")
        return out.reshape(z.shape)

    trusted = solver_fn in _SOLVERS.values()

    def run(params: Any, x: Any, z0f: Any) -> tuple[Any, DEQStats]:
        res = solver_fn(T, z0f, params, x, **opts)
        if trusted:
            # the built-in solvers return max|f(z) - z| at their value: the residual check
            # needs no other evaluation of f
            rmax = res.max_abs_residual
        else:
            rmax = jnp.max(jnp.abs(T(res.value, params, x) - res.value), axis=-1)
        # "nan": failed samples are NaN before the implicit rule sees them (as custom_fixed_point
        # would make them); "raise"/"warn" act after the layer, on concrete values when eager
        value = _check(res.value, rmax) if on_failure == "nan" else res.value
        stats = DEQStats(res.steps, res.converged, res.residual_norm, res.relative_residual,
                         res.trace, rmax)
        return value, jax.tree_util.tree_map(jax.lax.stop_gradient, stats)

    def _check(z: Any, rmax: Any) -> Any:
        tol = residual_tol
        if tol is None:
            tol = default_residual_tol(float(jnp.finfo(z.dtype).eps))
        finite = jnp.all(jnp.isfinite(z), axis=-1)
        ok = finite & (rmax <= tol)
        bk = get_backend(z)
        record_forward(bk, "deq", rmax, tol, batched=True)
        return bk.handle_failure(z, ok, on_failure, _forward_error("deq", tol), rmax, finite)

    z0f = jax.lax.stop_gradient(z0.reshape(batch, -1))
    if backward in ("ift", "neumann"):
        lin = (solve or idf.BiCGStab()) if backward == "ift" else NeumannSolve(steps)

        def layer(params: Any, x: Any, *, z0: Any) -> tuple[Any, DEQStats]:
            return run(params, x, z0)

        layer.__name__ = "deq"
        # the residual check is run's (above); custom_fixed_point checks finiteness only
        fn = idf.custom_fixed_point(T, solve=lin, has_aux=True, batch_dims=1,
                                    residual_tol=math.inf, on_failure=on_failure)(layer)
        z, stats = fn(params, x, z0=z0f)
    elif backward in ("phantom", "jfb"):
        k, lam = (1, 1.0) if backward == "jfb" else (steps, damping)
        zs, stats = run(jax.lax.stop_gradient(params), jax.lax.stop_gradient(x), z0f)
        z = jax.lax.stop_gradient(zs)
        for _ in range(k):
            z = (1 - lam) * z + lam * T(z, params, x) if lam != 1.0 else T(z, params, x)
    else:
        raise ValueError(f"deq: backward: expected 'ift', 'neumann', 'phantom' or 'jfb', got "
                         f"{backward!r}.")
    if on_failure != "nan":
        z = _check(z, stats.max_abs_residual)
    return z.reshape(batch, *shape), stats
