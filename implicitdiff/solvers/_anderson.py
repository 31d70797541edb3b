"""Anderson acceleration (type II), safeguarded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._common import SolverResult, device, iterate, norm, residual_fn, safe_div, setup


def anderson(T: Callable[..., Any], z0: Any, *args: Any, m: int = 5, beta: float = 1.0,
             tol: float | None = None, atol: float = 0.0, maxiter: int = 100,
             regularization: float | None = None) -> SolverResult:
    """Find $z = T(z, \\theta)$ by Anderson acceleration (type II, Walker & Ni 2011), with a
    regularized least-squares step that never breaks down.

    With residuals $g_k = T(z_k) - z_k$ and the last (at most) $m$ differences
    $\\Delta g_i = g_{i+1} - g_i$, $\\Delta z_i = z_{i+1} - z_i$, each pair scaled by
    $1/\\|\\Delta g_i\\|$, the step is

    $$\\gamma = \\arg\\min_\\gamma \\|g_k - \\Delta G\\,\\gamma\\|^2 + \\lambda\\|\\gamma\\|^2,
    z_{k+1} = z_k + \\beta g_k - (\\Delta Z + \\beta\\,\\Delta G)\\,\\gamma.$$

    The columns of $\\Delta G$ have unit norm (or are zero, when $g$ did not change), so the
    Gram matrix $\\Delta G^\\top \\Delta G + \\lambda I$ has eigenvalues in
    $[\\lambda, m + \\lambda]$: repeated, parallel or vanishing directions (a constant or linear
    $T$, a stalled iteration) give a well-conditioned system, never NaN — unlike the bordered,
    unregularized form of the reference DEQ implementation. It is solved per batch element by
    LU (`linalg.solve`), and a non-finite $\\gamma$ (only from non-finite input) falls back to
    $\\gamma = 0$, a plain mixing step. The history is a ring buffer of $m$ slots;
    memory is $2m$ vectors per element.

    **Arguments:**

    - `T`: `T(z, *args) -> z'`, mapping `(..., n)` to `(..., n)` row by row.
    - `z0`: initial guess, `(n,)` or `(..., n)` (leading dimensions: a batch, each element
      stopping on its own).
    - `args`: passed to `T`.
    - `m`: history size (default 5).
    - `beta`: mixing $\\beta$ (default 1); $\\beta < 1$ damps.
    - `tol`, `atol`, `maxiter`: as in `fixed_point_iteration`.
    - `regularization`: $\\lambda$, relative to the unit-diagonal Gram matrix; default
      $\\sqrt{\\epsilon}$ of the dtype ($1.5\\cdot 10^{-8}$ in float64, $3.5\\cdot 10^{-4}$ in
      float32).

    **Returns:** a `SolverResult`.
    """
    name = "anderson"
    bk, xp = setup(name, z0, maxiter, tol, atol)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"{name}: expected m a positive int, got {m!r}.")
    if not beta > 0:
        raise ValueError(f"{name}: expected beta > 0, got {beta!r}.")
    lam = float(xp.finfo(z0.dtype).eps) ** 0.5 if regularization is None else regularization
    if not lam > 0:
        raise ValueError(f"{name}: expected regularization > 0 or None, got {regularization!r}.")
    resid = residual_fn(name, T, args, z0, xp, fixed_point=True)
    dev = device(z0)
    hist = xp.zeros((*z0.shape[:-1], m, z0.shape[-1]), dtype=z0.dtype, device=dev)
    eye = lam * xp.eye(m, dtype=z0.dtype, device=dev)
    noise = float(xp.finfo(z0.dtype).eps) ** 0.5

    written: list[Any] = [0]  # eagerly: the history length while it is the same for everyone

    def step(s: Any, z: Any, g: Any, gn: Any, active: Any):
        k, dZ, dG = s
        gram = xp.matmul(dG, xp.matrix_transpose(dG)) + eye  # (..., m, m)
        # (..., m, 1); a batched matrix-vector matmul is several times slower on CPU
        rhs = xp.sum(dG * g[..., None, :], axis=-1, keepdims=True)
        # SPD with eigenvalues in [lam, m + lam]: LU never meets a zero pivot, nothing raises
        gamma = xp.matrix_transpose(xp.linalg.solve(gram, rhs))  # (..., 1, m)
        gamma = xp.where(xp.isfinite(gamma), gamma, xp.zeros_like(gamma))
        gz, gg = xp.matmul(gamma, dZ)[..., 0, :], xp.matmul(gamma, dG)[..., 0, :]
        z_new = z + (g - gg if beta == 1 else beta * (g - gg)) - gz
        g_new, scale_new = resid(z_new)

        def update(s: Any, accept: Any, everyone: bool) -> Any:
            dg, dz = g_new - g, z_new - z
            dn = norm(xp, dg)
            # a change of g below sqrt(eps) |g| is rounding noise (T(z) - z cancels): scaled to
            # unit length it would be a random direction, so it is left out of the history
            keep = accept & (dn > noise * xp.maximum(gn, norm(xp, g_new)))
            # Elements not accepted now are done (converged, or failed: frozen for good), so
            # their history is never used again. While every element that goes on keeps its
            # step, the goers share one slot (a Python int, eagerly) and the rows of the
            # finished ones may be overwritten.
            shared = written[0] is not None and bk.known_all(keep | ~accept)
            if shared:
                slot, written[0] = written[0] % m, written[0] + 1
                scale = xp.where(keep, dn, xp.ones_like(dn))
                dgs, dzs = dg / scale, dz / scale
            else:
                written[0] = None
                slot = k % m
                dgs, dzs = safe_div(xp, dg, dn, keep), safe_div(xp, dz, dn, keep)
            dG2 = bk.ring_write(dG, slot, dgs, keep, shared)
            dZ2 = bk.ring_write(dZ, slot, dzs, keep, shared)
            return k + xp.astype(keep, xp.int32), dZ2, dG2

        return z_new, g_new, scale_new, xp.ones_like(active), update

    # two buffers (eager backends write into them in place)
    k0 = xp.zeros((*z0.shape[:-1], 1), dtype=xp.int32, device=dev)
    state = (k0, hist, xp.zeros_like(hist))
    return iterate(bk, xp, resid, z0, tol=tol, atol=atol, maxiter=maxiter, mstate=state,
                   step=step)
