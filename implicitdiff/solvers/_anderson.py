"""Anderson acceleration (type II), safeguarded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._common import SolverResult, device, iterate, norm, residual_fn, safe_div, setup


def anderson(T: Callable[..., Any], z0: Any, *args: Any, m: int = 5, beta: float = 1.0,
             tol: float | None = None, atol: float = 0.0, maxiter: int = 100,
             regularization: float | None = None, extra_step: bool | int = False,
             plain_rate: float = 0.5) -> SolverResult:
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
    LU (`linalg.solve`); $\\|\\gamma\\| \\le \\sqrt m\\,\\|g_k\\|/\\lambda$, finite unless
    $\\|g_k\\|$ is within that factor of overflowing, and a step that is not finite stops its
    element, not converged, at its last finite iterate. The history is a ring buffer of $m$
    slots holding $\\Delta G$ and $\\Delta Z + \\beta\\Delta G$, with the Gram matrix updated a
    row and a column per step; memory is $2m$ vectors and $m^2$ numbers per element.

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
    - `extra_step`: plain steps $z \\leftarrow T(z)$ after the last iteration, as in
      `fixed_point_iteration` (default False: none); an accelerated solver gains the most
      from them.
    - `plain_rate`: each element takes plain (mixed) steps $z + \\beta g$, and keeps no
      history, while every step shrinks its residual at least this much,
      $\\|g_{k+1}\\| \\le$ `plain_rate` $\\|g_k\\|$; from its first slower step on, for good,
      Anderson steps (default 0.5; 0: from the first step, classic Anderson). A fast
      contraction gains little from the least-squares step, which costs several times a
      plain step's bookkeeping (in eager PyTorch, 63 tensor operations against 14): on the
      benchmark DEQ (`docs/solvers.md`) the forward takes about 45% less time, and on slowly
      contracting maps the steps and times are those of classic Anderson. Each element
      decides on its own, so its iterates stay those of its unbatched solve (an element not
      yet accelerating writes a zero pair, which gets $\\gamma = 0$).

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
    if isinstance(plain_rate, bool) or not isinstance(plain_rate, (int, float)) or not (
            0 <= plain_rate <= 1):
        raise ValueError(f"{name}: expected 0 <= plain_rate <= 1, got {plain_rate!r}.")
    resid = residual_fn(name, T, args, z0, xp, fixed_point=True)
    dev = device(z0)
    hist = xp.zeros((*z0.shape[:-1], m, z0.shape[-1]), dtype=z0.dtype, device=dev)
    eye = lam * xp.eye(m, dtype=z0.dtype, device=dev)
    noise = float(xp.finfo(z0.dtype).eps) ** 0.5

    written: list[Any] = [0]  # eagerly: the history length while it is the same for everyone
    plain = [True]  # eagerly: no element has recorded a pair yet (every history row is zero)
    # whether every element that goes on accelerates (known eagerly, for good: then `slow` is
    # no longer looked at); from the start without `plain_rate`
    accel = [not plain_rate > 0]

    def step(s: Any, z: Any, g: Any, gn: Any, active: Any):
        # dX = dZ + β dG; G = dG dGᵀ and rhs = g dGᵀ (for the current g, shape (..., 1, m)),
        # both kept up to date by `update`; k: the steps kept, per element (stale while
        # `written` counts them for everyone); slow: the element accelerates
        k, dX, dG, G, rhs, slow = s
        bg = g if beta == 1 else beta * g
        if plain[0] and not bk.is_traced(active):
            # eagerly, while nothing is in the history: γ = 0, the plain (mixed) step, without
            # the solve and the product by the empty history (a traced loop body must not take
            # this branch: its one trace serves every step)
            z_new = z + bg
        else:
            # SPD with eigenvalues in [lam, m + lam]: LU never meets a zero pivot, nothing
            # raises. |rhs| <= sqrt(m) |g| (unit rows), so |gamma| <= sqrt(m) |g| / lam:
            # finite unless |g| is within that factor of overflowing; then the step is not
            # finite, and the element stops (not converged) at its last finite iterate, as in
            # every solver
            gamma = xp.matrix_transpose(xp.linalg.solve(G + eye, xp.matrix_transpose(rhs)))
            # the step βg - (ΔZ + βΔG)γ, with ΔZ + βΔG stored as one history; (..., 1, m) as a
            # row times a matrix: the batched matrix-vector form is several times slower on CPU
            z_new = z + (bg - xp.matmul(gamma, dX)[..., 0, :])
        g_new, scale_new = resid(z_new)

        def update(s: Any, accept: Any, everyone: bool, gn_new: Any, z1: Any, g1: Any) -> Any:
            # z1, g1: what each element holds now (z_new, g_new where accepted). An element not
            # accepted adds nothing (dz = dg = 0, not kept): its rejected step may be inf, and
            # inf in the history would make inf * 0 in the products below (NaN, and NumPy's
            # "invalid value" warning), though the element is frozen for good
            # (the step itself is not kept from above: held through the update it would add
            # a vector per element to the peak memory)
            count, kk = written[0], k
            gated = not accel[0]
            if gated:
                # an element accelerates from its first step that shrinks its residual by less
                # than `plain_rate`, for good; until then its pairs are zero (a zero column of
                # ΔG gets γ = 0: the plain step) and its slots are used as if it were alone
                if plain[0] and count is not None:  # (no element is slow yet)
                    fast = gn_new <= plain_rate * gn
                    if bk.known_all(fast if everyone else fast | ~accept):
                        # eagerly, no element that goes on accelerates: every row stays zero,
                        # only the slot count moves
                        written[0] = count + 1
                        return s
                    slow2 = slow | ~fast  # (traced, this code serves every step: sticky)
                else:
                    slow2 = slow | (gn_new > plain_rate * gn)
                    if bk.known_all(slow2 | ~accept):
                        accel[0] = True  # every one that goes on is slow, from the next step
            else:
                slow2 = slow
            plain[0] = False
            dz1 = z1 - z
            dg = g1 - g
            dn = norm(xp, dg)
            # a change of g below sqrt(eps) |g| is rounding noise (T(z) - z cancels): scaled to
            # unit length it would be a random direction, so it is left out of the history
            keep = dn > noise * xp.maximum(gn, gn_new)
            # written: a pair (or, not yet accelerating, a zero pair) takes the element's slot
            write = keep | ~slow2 if gated else keep
            if gated:
                keep = keep & slow2
            # Elements not accepted now are done (converged, or failed: frozen for good), so
            # their history is never used again. While every element that goes on writes its
            # step, the goers share one slot (a Python int, eagerly) and the rows of the
            # finished ones may be overwritten.
            if everyone:
                shared = count is not None and bk.known_all(write)
            else:
                keep, write = accept & keep, accept & write
                shared = count is not None and bk.known_all(write | ~accept)
            dx = dz1 + (dg if beta == 1 else beta * dg)
            if count is not None and shared:
                slot, written[0] = count % m, count + 1
                # every element that goes on writes: no select. One reciprocal and two
                # products: a broadcast division costs 1.5-2.5 times a product on CPU
                if gated:  # zero for the elements not (yet) keeping a pair
                    inv = xp.astype(keep, dn.dtype) / xp.where(keep, dn, xp.ones_like(dn))
                else:
                    inv = xp.reciprocal(dn if everyone else xp.where(keep, dn, xp.ones_like(dn)))
                dgs, dxs = dg * inv, dx * inv
            else:
                written[0] = None
                if count:  # the steps every element kept so far, until now not counted
                    kk = xp.full_like(k, count)
                slot = kk % m
                dgs, dxs = safe_div(xp, dg, dn, keep), safe_div(xp, dx, dn, keep)
            dG2 = bk.ring_write(dG, slot, dgs, write, shared)
            dX2 = bk.ring_write(dX, slot, dxs, write, shared)
            dGT = xp.matrix_transpose(dG2)
            rhs2 = xp.matmul(g1[..., None, :], dGT)  # the next step's
            if shared:
                # one new row of dG: one new row and column of its Gram matrix (two products
                # rather than one of a stacked pair: the stack would raise the peak memory by
                # two vectors per element)
                row = xp.matmul(dgs[..., None, :], dGT)[..., 0, :]
                G2 = bk.ring_write(G, slot, row, write, True)
                G2 = xp.matrix_transpose(
                    bk.ring_write(xp.matrix_transpose(G2), slot, row, write, True))
                return kk, dX2, dG2, G2, rhs2, slow2
            return kk + xp.astype(write, xp.int32), dX2, dG2, xp.matmul(dG2, dGT), rhs2, slow2

        return z_new, g_new, scale_new, None, update

    # separate buffers (eager backends write into them in place)
    k0 = xp.zeros((*z0.shape[:-1], 1), dtype=xp.int32, device=dev)
    gram0 = xp.zeros((*z0.shape[:-1], m, m), dtype=z0.dtype, device=dev)
    rhs0 = xp.zeros((*z0.shape[:-1], 1, m), dtype=z0.dtype, device=dev)
    slow0 = xp.full(k0.shape, not plain_rate > 0, dtype=xp.bool, device=dev)
    state = (k0, hist, xp.zeros_like(hist), gram0, rhs0, slow0)
    return iterate(bk, xp, resid, z0, tol=tol, atol=atol, maxiter=maxiter, mstate=state,
                   step=step, extra_step=extra_step)
