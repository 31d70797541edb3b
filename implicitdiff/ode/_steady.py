"""`steady_state`: the $t \\to \\infty$ limit of an autonomous ODE, differentiated by the implicit
function theorem on $f(y^*, \\theta) = 0$ (through `idf.custom_root`), never through the flow."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._backend import convert_constants, get_backend
from .._config import resolve_on_failure
from .._errors import StructureError
from .._linear_solve import AbstractLinearSolver, Auto, Dense
from .._root import custom_root
from ..solvers import newton
from ._solver import odeint


def _time_like(xp: Any, y: Any) -> Any:
    """The time `f` receives: one per sample, `(..., 1)`, or 0-d for a `y` of shape `(d,)`
    (`odeint`'s convention)."""
    shape = (*y.shape[:-1], 1) if y.ndim > 1 else ()
    return xp.zeros(shape, dtype=y.dtype, device=getattr(y, "device", None))


def _sample_norm(xp: Any, a: Any) -> Any:
    return xp.max(xp.abs(a), axis=-1) if a.ndim > 1 else xp.max(xp.abs(a))


def steady_state(f: Callable[..., Any], y0: Any, *args: Any, method: str = "tsit5",
                 rtol: float = 1e-8, atol: float = 1e-8, horizon: float = 10.0,
                 max_horizons: int = 20, newton_steps: int = 3, tol: float | None = None,
                 max_steps: int = 4096, solve: AbstractLinearSolver | None = None,
                 on_failure: str | None = None) -> Any:
    """The steady state $y^* = \\lim_{t\\to\\infty} y(t)$ of the autonomous ODE
    $y' = f(t, y, \\theta)$, $y(0) = y_0$, with its derivative in $\\theta$ by the implicit
    function theorem on $f(0, y^*, \\theta) = 0$: the derivative never goes through the flow,
    so memory does not grow with the time it took to get there.

    ```python
    import numpy as np
    from implicitdiff import ode

    def relax(t, y, a, b):           # y' = a - b y: y* = a / b
        return a - b * y

    y = ode.steady_state(relax, np.zeros(3), np.array([1.0, 2.0, 3.0]), 2.0)
    np.testing.assert_allclose(y, [0.5, 1.0, 1.5], rtol=1e-10)
    ```

    **Forward:** `odeint` over windows of length `horizon` (at most `max_horizons` of them)
    until every sample's $\\max|f| \\le \\sqrt{\\text{tol}}$ (the flow's own accuracy stops at
    its tolerance), then at most `newton_steps` Newton steps on $f(0, y, \\theta) = 0$ polish
    $y^*$ to
    rounding, so the derivative is exact (`idf.solvers.newton`, Jacobian products by forward
    differences; its line search only accepts steps that decrease $|f|$, and it starts where
    the flow has nearly settled, so it does not jump to another equilibrium).

    **Arguments:**

    - `f`: the vector field `f(t, y, *args)` as for `odeint` (row by row over samples). It
      must not depend on `t` for a steady state to exist: the condition evaluates it at
      $t = 0$.
    - `y0`: `(d,)` or `(..., d)` (leading axes are independent samples).
    - `args`: the differentiated parameters $\\theta$.
    - `method`, `rtol`, `atol`, `max_steps`: `odeint`'s, for each window (defaults 1e-8).
    - `horizon`, `max_horizons`: the window length and the most windows.
    - `tol`: the residual $\\max|f(0, y^*, \\theta)|$ accepted per sample (default: the
      dtype's `idf.custom_root` default); a sample above it after the polish is a failure
      (no steady state reached: a limit cycle, a blow-up, too short a horizon), handled by
      `on_failure` (`"raise"`: a `NonConvergenceError` naming it; `"warn"`; `"nan"`: that
      sample NaN). Default: `idf.config.on_failure`.
    - `solve`: the linear solver of the derivative (default: `idf.custom_root`'s).

    **Returns:** $y^*$, shaped like `y0`. Reverse, forward and higher order derivatives like
    any `idf.custom_root` solver.
    """
    on_failure = resolve_on_failure(on_failure, "steady_state: on_failure")
    bk = get_backend(y0, *args)
    y0, args = convert_constants(bk, (y0, tuple(args)), y0)
    if not hasattr(y0, "ndim") or y0.ndim < 1:
        raise StructureError(f"steady_state: y0: expected an array of shape (d,) or (..., d), "
                             f"got {getattr(y0, 'shape', type(y0).__name__)}.")
    for name, v in (("horizon", horizon), ("max_horizons", max_horizons),
                    ("newton_steps", newton_steps + 1)):  # newton_steps may be 0
        if isinstance(v, bool) or not v > 0:
            raise ValueError(f"steady_state: {name}: expected a positive number, got {v!r}.")
    xp = bk.namespace(y0)
    batch_dims = y0.ndim - 1

    def F(y: Any, *theta: Any) -> Any:
        return f(_time_like(xp, y), y, *theta)

    eps = float(xp.finfo(y0.dtype).eps)
    flow_tol = (tol if tol is not None else 1e3 * eps) ** 0.5

    def steady_state(*theta: Any, y0: Any) -> Any:  # the name errors carry
        ts = xp.asarray([0.0, float(horizon)], dtype=y0.dtype,
                        device=getattr(y0, "device", None))

        def scale(y: Any) -> Any:
            return 1.0 + _sample_norm(xp, y)

        def cond(state: tuple) -> Any:
            y, k = state
            far = _sample_norm(xp, F(y, *theta)) > flow_tol * scale(y)
            return xp.any(far & xp.all(xp.isfinite(y), axis=-1)) & (k < max_horizons)

        def body(state: tuple) -> tuple:
            y, k = state
            y = odeint(f, y, ts, *theta, method=method, rtol=rtol, atol=atol,
                       max_steps=max_steps, on_failure="nan")[-1]
            return y, k + 1

        y, _ = bk.while_loop(cond, body, (y0, xp.asarray(0)))
        if newton_steps:
            # only where the flow has settled: Newton from anywhere else could land on another
            # equilibrium (the centre of a rotation, an unstable point), which the residual
            # check would then accept; an unsettled sample keeps its state and fails that check
            settled = _sample_norm(xp, F(y, *theta)) <= flow_tol * scale(y)
            # products by forward differences (every framework, NumPy included): each step
            # gains about eight digits, so a few reach rounding
            polished = newton(F, y, *theta, solve=Dense(), maxiter=newton_steps,
                              tol=float(xp.finfo(y0.dtype).eps)).value
            y = xp.where(settled[..., None] if y.ndim > 1 else settled, polished, y)
        return y

    fn = custom_root(F, solve=Auto() if solve is None else solve, residual_tol=tol,
                     on_failure=on_failure, batch_dims=batch_dims)(steady_state)
    return fn(*args, y0=y0)
