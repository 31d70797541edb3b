"""Newton's method with a backtracking line search and a dense or Krylov inner solve."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._linear_solve import AbstractLinearSolver
from .._root import solve_argument
from ._common import SolverResult, backtrack, finite, iterate, norm, residual_fn, setup


def newton(F: Callable[..., Any], z0: Any, *args: Any, fixed_point: bool = False,
           jvp: Callable[..., Any] | str | None = None,
           solve: AbstractLinearSolver | None = None, line_search: bool = True,
           max_backtracks: int = 10, tol: float | None = None, atol: float = 0.0,
           maxiter: int = 50, linear_solver: AbstractLinearSolver | None = None
           ) -> SolverResult:
    """Solve $g(z) = 0$ by Newton's method, $J\\,p = -g(z_k)$, $z_{k+1} = z_k + \\alpha p$, with
    $g = F$ (default) or $g = T(z) - z$ (`fixed_point=True`, `F` is then the map $T$).

    The Newton system is solved by `solve`, one of the core's linear solvers, from
    products $v \\mapsto J v$: `Dense()` materializes $J$ ($n$ products) and factorizes it,
    `GMRES()`/`BiCGStab()` need a few products per iteration (an inexact Newton method; pass a
    loose `rtol`, e.g. `GMRES(rtol=1e-4)`, to save products). The default `Auto()` is `Dense`
    for $n \\le 256$, `GMRES` above.

    The products come from `jvp`:

    - `None` (default): forward differences, $J v \\approx (g(z + h v) - g(z))/h$ with
      $h = \\sqrt\\epsilon\\,\\max(1, \\|z\\|)/\\|v\\|$ per element: framework-free, one evaluation
      per product, relative accuracy about $\\sqrt\\epsilon$ ($10^{-8}$ in float64, $3\\cdot
      10^{-4}$ in float32, times the curvature of $g$). Newton then converges linearly with a
      tiny rate instead of quadratically; the reachable residual is unaffected.
    - `"autodiff"`: the backend's forward mode (`jax.jvp`, `torch.func.jvp`); not available
      with NumPy arrays.
    - a callable `jvp(z, v, *args)` returning $\\partial_z \\text{fun}(z, \\text{args})\\, v$ of
      the user's function (`F`, or `T` when `fixed_point`).

    With `line_search` (default), steps $\\alpha = 1, 1/2, \\dots$ (at most
    `max_backtracks` halvings) until $\\|g(z + \\alpha p)\\| \\le (1 - 10^{-4}\\alpha)\\|g(z)\\|$;
    where no trial decreases the residual at all, the element stops, reported not converged
    (a singular Jacobian or a local minimum of $\\|g\\|$ that is not a root).

    **Arguments:** `F`, `z0` (`(n,)` or `(..., n)`, a batch of independent problems), `args`,
    and the options above (`linear_solver=` is the deprecated old name of `solve=`: a
    `DeprecationWarning`, removed in the next release); `tol`, `atol`, `maxiter` as in
    `fixed_point_iteration` (default `maxiter` 50), the relative residual being
    $\\|F(z)\\|/\\|F(z_0)\\|$ for a root, $\\|T(z) - z\\|/\\|T(z)\\|$ for a fixed point.

    **Returns:** a `SolverResult`.
    """
    name = "newton"
    bk, xp = setup(name, z0, maxiter, tol, atol)
    linear_solver = solve_argument(name, solve, linear_solver)
    if not isinstance(linear_solver, AbstractLinearSolver):
        raise TypeError(f"{name}: expected solve= an implicitdiff linear solver "
                        f"(idf.Dense(), idf.GMRES(), ...), got {linear_solver!r}.")
    if isinstance(max_backtracks, bool) or not isinstance(max_backtracks, int) \
            or max_backtracks < 0:
        raise ValueError(f"{name}: expected max_backtracks a non-negative int, got "
                         f"{max_backtracks!r}.")
    resid = residual_fn(name, F, args, z0, xp, fixed_point=fixed_point)
    eps_h = float(xp.finfo(z0.dtype).eps) ** 0.5

    if jvp is None:
        def product(z: Any, g: Any) -> Callable[[Any], Any]:
            base = eps_h * xp.maximum(norm(xp, z), xp.ones_like(g[..., :1]))

            def matvec(v: Any) -> Any:
                vn = norm(xp, v)
                nz = vn > 0
                h = xp.where(nz, base / xp.where(nz, vn, xp.ones_like(vn)), xp.ones_like(vn))
                gh, _ = resid(z + h * v)
                return xp.where(nz, (gh - g) / h, xp.zeros_like(v))

            return matvec
    else:
        if jvp == "autodiff":
            def fun_jvp(z: Any, v: Any) -> Any:
                return bk.jvp(lambda z_: F(z_, *args), (z,), (v,))[1]
        elif callable(jvp):
            def fun_jvp(z: Any, v: Any) -> Any:
                return jvp(z, v, *args)
        else:
            raise ValueError(f"{name}: expected jvp None, 'autodiff' or a callable "
                             f"jvp(z, v, *args), got {jvp!r}.")

        def product(z: Any, g: Any) -> Callable[[Any], Any]:
            if fixed_point:
                return lambda v: fun_jvp(z, v) - v
            return lambda v: fun_jvp(z, v)

    def step(s: Any, z: Any, g: Any, gn: Any, active: Any):
        p, _ = linear_solver.solve(product(z, g), -g, backend=bk)
        p = xp.where(active & finite(xp, p), p, xp.zeros_like(p))
        if line_search:
            z_new, g_new, scale_new, gn_new, _ = backtrack(
                bk, xp, resid, z, p, gn, active, max_backtracks=max_backtracks)
            ok = xp.isfinite(gn_new) & (gn_new < gn)
        else:
            z_new = z + p
            g_new, scale_new = resid(z_new)
            ok = xp.isfinite(norm(xp, g_new))
        return z_new, g_new, scale_new, ok, _keep

    return iterate(bk, xp, resid, z0, tol=tol, atol=atol, maxiter=maxiter, mstate=(), step=step)


def _keep(m: Any, accept: Any, everyone: bool, rn_new: Any, z: Any, r: Any) -> Any:
    return m
