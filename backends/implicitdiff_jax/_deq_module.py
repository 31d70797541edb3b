"""`DEQ`: the equinox module form of `deq` (imports equinox; reached lazily through
`implicitdiff_jax.DEQ`, so that `import implicitdiff_jax` never needs equinox)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx

from implicitdiff.backend import check_on_failure
from implicitdiff.deq import BackwardMode, DEQStats, as_backward, as_solver

from ._deq import deq

__all__ = ["DEQ"]


def _hashable(name: str, value: Any) -> None:
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"DEQ: {name}: expected a hashable value (it is static configuration, "
                        f"part of the module's tree structure, compared by `jax.jit`), got "
                        f"{type(value).__name__} {value!r}. Pass a tuple instead of a list, "
                        f"or a Python number instead of an array.") from None


class DEQ(eqx.Module):
    """A deep equilibrium layer as an `equinox.Module`: the fixed point
    $z^* = f(z^*, x)$ of a batch, where the parameters live in the module `f`.

    The module form of `implicitdiff_jax.deq` (the same algorithm: `__call__` is
    `deq(self.f, x, ...)`, which differentiates the arrays of the pytree `f`), so the arrays
    of `f` get the implicit gradients of `deq` through
    `eqx.filter_grad` / `eqx.filter_value_and_grad`, under `eqx.filter_jit`, `jax.jit` and
    `jax.vmap`. Needs equinox (`pip install equinox`); `deq` itself does not.

    ```python
    import equinox as eqx, jax, jax.numpy as jnp
    from implicitdiff_jax import DEQ

    class Cell(eqx.Module):                   # f(z, x) -> z', row by row on the batch
        W: jax.Array
        U: jax.Array
        def __call__(self, z, x):
            return jnp.tanh(z @ self.W.T + x @ self.U.T)

    model = DEQ(Cell(W, U), z_shape=(64,))    # Anderson forward, exact IFT backward
    z, stats = model(x)                       # z: (batch, 64); stats: a DEQStats

    @eqx.filter_jit
    @eqx.filter_value_and_grad
    def loss(model, x):
        z, _ = model(x)
        return jnp.sum((z - 0.3) ** 2)

    value, grads = loss(model, x)             # grads.f.W, grads.f.U: exact implicit gradients
    z2, stats2 = model(x2, z0=z)              # warm start from a previous fixed point
    ```

    **Arguments:**

    - `f`: the layer, `f(z, x) -> z'` with `z` of shape `(batch, *z_shape)`, acting sample by
      sample on the leading batch dimension; typically an `equinox.Module` whose array fields
      are the parameters. Every array in the pytree `f` is passed to `deq` as a parameter
      (differentiated by `eqx.filter_grad` when it is a floating-point array); its other
      leaves (Python numbers, functions) are constants.
    - `z_shape`: per-sample shape of $z$; default: the per-sample shape of `x` (its first leaf).
    - `solver`: `"anderson"` (default), `"broyden"`, `"fixed_point_iteration"`, or a callable
      `solver(T, z0, *args, **solver_options) -> SolverResult` like those of
      `implicitdiff.solvers`; `solver_options` its keywords (`tol`, `maxiter`, `m`, ...;
      default `maxiter=50` and, for the named solvers, `extra_step=3`, as in `deq`), stored
      as a sorted tuple of `(name, value)` pairs (values must be hashable).
    - `backward`: a backward mode of `implicitdiff.deq`, as for the PyTorch `DEQ`:
      `IFT(solve=...)` (exact, default `IFT()`: the
      fixed-point iteration with a BiCGStab fallback and the uniqueness probe), `Neumann(terms)`,
      `Phantom(steps, damping)`, `JFB()`, a linear solver (`IFT` with it) or one of the names
      `"ift"`, `"neumann"`, `"phantom"`, `"jfb"`. See the backward modes in the DEQ guide.
      (`solve=`, `steps=`, `damping=` are the former spelling, deprecated.)
    - `residual_tol`, `on_failure`: the forward residual check, as in `deq`: `"raise"`,
      `"warn"` or `"nan"` (only the failed samples NaN, contributing nothing to the gradient;
      under `jit` `"raise"` and `"warn"` act from a host callback), or `None` (default):
      `idf.config.on_failure` when the module is called (traced, under `jit`).

    All but `f` are static fields (part of the tree structure): changing one makes a new
    module and, under `jit`, a new compilation.

    **Call:** `model(x, z0=None) -> (z, stats)`: `x` a batch (a pytree whose leaves have the
    batch as their leading dimension), `z0` an initial state of shape `(batch, *z_shape)`
    (default zeros). A warm start is the previous `z` passed as `z0`: the module keeps no
    state (it is a pure function of its fields and arguments), `z0` is only an initial guess
    and never changes the gradient. `stats` is a `DEQStats` of per-sample arrays (not
    differentiated). To map over an extra leading axis (an ensemble of batches),
    `jax.vmap(lambda x: model(x))`; the layer's own batch axis must stay in `x`.
    """

    f: Callable[..., Any]
    z_shape: tuple[int, ...] | None = eqx.field(static=True)
    solver: str | Callable[..., Any] = eqx.field(static=True)
    solver_options: tuple[tuple[str, Any], ...] = eqx.field(static=True)
    backward: BackwardMode = eqx.field(static=True)
    residual_tol: float | None = eqx.field(static=True)
    on_failure: str | None = eqx.field(static=True)

    def __init__(self, f: Callable[..., Any], *, z_shape: Sequence[int] | None = None,
                 solver: str | Callable[..., Any] = "anderson",
                 solver_options: Mapping[str, Any] | None = None, backward: Any = None,
                 residual_tol: float | None = None, on_failure: str | None = None,
                 solve: Any = None, steps: Any = None, damping: Any = None):
        if not callable(f):
            raise TypeError(f"DEQ: expected a callable f(z, x) -> z' (typically an "
                            f"equinox.Module), got {type(f).__name__}.")
        if z_shape is not None:
            try:
                z_shape = tuple(int(d) for d in z_shape)
            except (TypeError, ValueError):
                raise TypeError(f"DEQ: z_shape: expected a sequence of ints (the per-sample "
                                f"shape of z), got {z_shape!r}.") from None
            if any(d < 0 for d in z_shape):
                raise ValueError(f"DEQ: z_shape: expected non-negative sizes, got {z_shape}.")
        as_solver(solver, "DEQ")
        if solver_options is None:
            solver_options = {}
        if not isinstance(solver_options, Mapping):
            raise TypeError(f"DEQ: solver_options: expected a dict of the solver's keywords "
                            f"(e.g. {{'tol': 1e-6, 'maxiter': 100}}), got "
                            f"{type(solver_options).__name__}.")
        options = tuple(sorted({"maxiter": 50, **solver_options}.items()))
        _hashable("solver_options", options)
        mode = as_backward(backward, "DEQ", solve=solve, steps=steps, damping=damping)
        _hashable("backward", mode)
        if residual_tol is not None:
            if not isinstance(residual_tol, (int, float)) or not residual_tol >= 0:
                raise ValueError(f"DEQ: residual_tol: expected None or a non-negative number, "
                                 f"got {residual_tol!r}.")
            residual_tol = float(residual_tol)
        if on_failure is not None:
            check_on_failure(on_failure, "DEQ")
        self.f = f
        self.z_shape = z_shape
        self.solver = solver
        self.solver_options = options
        self.backward = mode
        self.residual_tol = residual_tol
        self.on_failure = on_failure

    def __call__(self, x: Any, z0: Any = None) -> tuple[Any, DEQStats]:
        # the arrays of the module f are its parameters: deq finds them in the pytree f
        return deq(self.f, x, z0=z0, z_shape=self.z_shape, solver=self.solver,
                   solver_options=dict(self.solver_options), backward=self.backward,
                   residual_tol=self.residual_tol, on_failure=self.on_failure)
