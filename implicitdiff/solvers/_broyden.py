"""Limited-memory "good" Broyden method with a low-rank inverse Jacobian estimate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._common import (
    SolverResult,
    backtrack,
    device,
    dot,
    iterate,
    norm,
    residual_fn,
    safe_div,
    setup,
)


def broyden(fun: Callable[..., Any], z0: Any, *args: Any, fixed_point: bool = True,
            memory: int = 20, h0: float = -1.0, line_search: bool = True,
            max_backtracks: int = 8, tol: float | None = None, atol: float = 0.0,
            maxiter: int = 100, extra_step: bool | int = False) -> SolverResult:
    """Solve $g(z) = 0$ by Broyden's "good" method with a limited-memory inverse estimate;
    $g(z) = T(z) - z$ (`fixed_point=True`, the default: `fun` is the map $T$) or $g = F$
    (`fixed_point=False`: `fun` is the residual $F$).

    The inverse Jacobian estimate is $H = h_0 I + \\sum_i u_i v_i^\\top$ with at most `memory`
    rank-one terms. A step is $z_{k+1} = z_k - \\alpha H g_k$ ($\\alpha = 1$ unless
    `line_search`), then the Sherman–Morrison form of the good Broyden update
    $H \\leftarrow H + (\\Delta z - H\\Delta g)\\,\\Delta z^\\top H / (\\Delta z^\\top H \\Delta g)$
    adds one term ($u = (\\Delta z - H\\Delta g)/(\\Delta z^\\top H\\Delta g)$,
    $v = H^\\top \\Delta z$). An update whose denominator is tiny
    ($|\\Delta z^\\top H \\Delta g| \\le
    \\sqrt\\epsilon\\,\\|H^\\top\\Delta z\\|\\,\\|\\Delta g\\|$) is skipped. When all `memory`
    slots are used the oldest term is overwritten (as in the DEQ reference code). Memory:
    $2\\,$`memory` vectors per element.

    Needs no derivatives; converges superlinearly near a root with a non-singular Jacobian, also
    where fixed-point iteration diverges (non-contractive $T$).

    **Arguments:**

    - `fun`: $T$ or $F$, `fun(z, *args)`, mapping `(..., n)` to `(..., n)` row by row.
    - `z0`: initial guess, `(n,)` or `(..., n)` (a batch, each element stopping on its own).
    - `args`: passed to `fun`.
    - `fixed_point`: whether `fun` is a map $T$ (default) or a residual $F$.
    - `memory`: the largest rank of the correction (default 20).
    - `h0`: the initial inverse estimate $H_0 = h_0 I$. The default $-1$ fits
      $g = T - z$ with a small $\\partial T$ (the first step is then a fixed-point step); for a
      residual $F$ whose Jacobian is near $+cI$, pass $h_0 = 1/c$.
    - `line_search`: backtrack on $\\|g\\|$ (at most `max_backtracks` halvings); where no trial
      decreases the residual enough, the best trial is taken anyway and the inverse estimate is
      reset to $H_0$ (the Broyden direction was not a descent direction).
    - `tol`, `atol`, `maxiter`: as in `fixed_point_iteration`; the relative residual is
      $\\|g\\|/\\|T(z)\\|$ for a fixed point and $\\|F(z)\\|/\\|F(z_0)\\|$ for a root.
    - `extra_step`: with `fixed_point=True`, after the last iteration that many plain steps
      $z \\leftarrow T(z)$ (True is 1; each one more evaluation of $T$), each kept per element
      where its residual is finite and not larger (default False; as in `anderson`). Ignored
      for a residual $F$.

    **Returns:** a `SolverResult`.
    """
    name = "broyden"
    bk, xp = setup(name, z0, maxiter, tol, atol)
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
        raise ValueError(f"{name}: expected memory a positive int, got {memory!r}.")
    if not (h0 != 0 and abs(h0) < float("inf")):
        raise ValueError(f"{name}: expected a finite non-zero h0, got {h0!r}.")
    resid = residual_fn(name, fun, args, z0, xp, fixed_point=fixed_point)
    dev = device(z0)
    m = memory
    zeros = xp.zeros((*z0.shape[:-1], m, z0.shape[-1]), dtype=z0.dtype, device=dev)
    guard = float(xp.finfo(z0.dtype).eps) ** 0.5

    # the products with the history as sums (a batched matrix-vector matmul is slower on CPU)
    def H(U: Any, V: Any, x: Any) -> Any:
        return h0 * x + xp.sum(xp.sum(V * x[..., None, :], axis=-1, keepdims=True) * U, axis=-2)

    def HT(U: Any, V: Any, x: Any) -> Any:
        return h0 * x + xp.sum(xp.sum(U * x[..., None, :], axis=-1, keepdims=True) * V, axis=-2)

    def step(s: Any, z: Any, g: Any, gn: Any, active: Any):
        k, U, V = s
        p = -H(U, V, g)
        if line_search:
            z_new, g_new, scale_new, gn_new, passed = backtrack(
                bk, xp, resid, z, p, gn, active, max_backtracks=max_backtracks)
            ok = xp.isfinite(gn_new)
            reset = ~passed
        else:
            z_new = z + p
            g_new, scale_new = resid(z_new)
            ok = xp.isfinite(norm(xp, g_new))
            reset = xp.zeros_like(ok)

        def update(s: Any, accept: Any, everyone: bool, gn_new: Any, z1: Any, g1: Any) -> Any:
            dz, dg = z_new - z, g_new - g
            Hdg = H(U, V, dg)
            v = HT(U, V, dz)
            den = dot(xp, v, dg)
            keep = accept & (xp.abs(den) > guard * norm(xp, v) * norm(xp, dg))
            u = safe_div(xp, dz - Hdg, den, keep)
            all_keep = everyone and bk.known_all(keep)
            U2 = bk.ring_write(U, k % m, u, keep, all_keep)
            V2 = bk.ring_write(V, k % m, v, keep, all_keep)
            # no decrease along the Broyden direction: the estimate is bad, start afresh
            wipe = accept & reset
            if not bk.known_all(~wipe):
                U2 = xp.where(wipe[..., None], xp.zeros_like(U2), U2)
                V2 = xp.where(wipe[..., None], xp.zeros_like(V2), V2)
            k2 = xp.where(wipe, xp.zeros_like(k), k + xp.astype(keep, xp.int32))
            return k2, U2, V2

        return z_new, g_new, scale_new, ok, update

    # two buffers (eager backends write into them in place)
    state = (xp.zeros((*z0.shape[:-1], 1), dtype=xp.int32, device=dev), zeros,
             xp.zeros_like(zeros))
    return iterate(bk, xp, resid, z0, tol=tol, atol=atol, maxiter=maxiter, mstate=state,
                   step=step, extra_step=extra_step if fixed_point else 0)
