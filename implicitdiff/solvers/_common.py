"""What the forward solvers share: the result type, tolerances, and the driver loop.

Every solver iterates on `z` of shape `(..., n)`: the last axis is the problem, the leading axes
(any number, possibly none) index independent problems of one batch. The map (`T` or `F`) must
act row by row: element `i` of its output depends on element `i` of `z` only. Each batch element
stops on its own; a stopped element is frozen (its value, residual and statistics no longer
change) while the others go on. All loops are the backend's `while_loop`, so the same code runs
eagerly (NumPy, PyTorch) and compiled (`lax.while_loop` under `jax.jit`), and memory is the
method's own state, never a record of the iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from .._array import all_finite
from .._array import device as device
from .._array import dot as dot
from .._array import norm as norm
from .._array import safe_div as safe_div
from .._array import zero_int as zero_int
from .._errors import StructureError


class SolverResult(NamedTuple):
    """What a forward solver returns: arrays only, so it passes through `jax.jit` and `vmap`.

    Shapes: `value` like `z0`, `(..., n)`; the statistics have the batch shape `(...)` (`()` for
    an unbatched problem); the traces `(..., maxiter)`.

    - `value`: the last accepted iterate $z_k$.
    - `steps`: accepted iterations per element (int32).
    - `converged`: whether the element met the tolerance (bool). False for an element that hit
      `maxiter`, or whose iteration produced NaN/inf (then `value` is its last finite iterate).
    - `residual_norm`: $\\|r(z_k)\\|_2$ with $r = T(z) - z$ (fixed point) or $r = F(z)$ (root).
    - `relative_residual`: $\\|T(z_k) - z_k\\| / \\|T(z_k)\\|$ (fixed point) or
      $\\|F(z_k)\\| / \\|F(z_0)\\|$ (root).
    - `trace`: `trace[..., j]` is the residual norm after iteration `j + 1`; NaN after the
      element stopped.
    - `relative_trace`: the same for the relative residual.
    - `max_abs_residual`: $\\max_i |r(z_k)_i|$ (shape `(...)`), the quantity the residual check
      of `custom_fixed_point`/`custom_root` bounds (`residual_tol`).
    """

    value: Any
    steps: Any
    converged: Any
    residual_norm: Any
    relative_residual: Any
    trace: Any
    relative_trace: Any
    max_abs_residual: Any


def default_tol(xp: Any, dtype: Any) -> float:
    """$\\sqrt{\\epsilon}$ of the dtype: about $1.5\\cdot 10^{-8}$ in float64, $3.5\\cdot 10^{-4}$
    in float32."""
    return float(xp.finfo(dtype).eps) ** 0.5


def finite(xp: Any, a: Any) -> Any:
    """Whether each row of `a` is finite: `(..., n) -> (..., 1)` (`all_finite`)."""
    return all_finite(xp, a, keepdims=True)


def setup(name: str, z0: Any, maxiter: Any, tol: Any, atol: Any) -> tuple[Any, Any]:
    """The backend and namespace of `z0`, after checking the arguments."""
    from .._backend import get_backend

    bk = get_backend(z0)
    xp = bk.namespace(z0)
    if getattr(z0, "ndim", 0) < 1:
        raise StructureError(
            f"{name}: expected z0 of shape (n,) or (..., n) (batch dimensions first, the "
            f"problem last), got shape {tuple(getattr(z0, 'shape', ()))}. Ravel or reshape the "
            "initial guess first."
        )
    if not xp.isdtype(z0.dtype, "real floating"):
        raise StructureError(
            f"{name}: expected a real floating z0, got dtype {z0.dtype}. Cast it to float32 or "
            "float64."
        )
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"{name}: expected maxiter a positive int, got {maxiter!r}.")
    if tol is not None and not tol >= 0:
        raise ValueError(f"{name}: expected tol >= 0 or None, got {tol!r}.")
    if not atol >= 0:
        raise ValueError(f"{name}: expected atol >= 0, got {atol!r}.")
    return bk, xp


def residual_fn(name: str, fun: Callable[..., Any], args: tuple, z0: Any, xp: Any,
                fixed_point: bool) -> Callable[[Any], tuple[Any, Any]]:
    """`z -> (r, scale)`: the residual and the norm the relative residual divides by.

    Fixed point: $r = T(z) - z$, scale $\\|T(z)\\|$. Root: $r = F(z)$, scale $\\|F(z_0)\\|$."""
    fname = getattr(fun, "__name__", "T" if fixed_point else "F")

    def check(out: Any) -> Any:
        if tuple(getattr(out, "shape", ())) != tuple(z0.shape) or out.dtype != z0.dtype:
            raise StructureError(
                f"{name}: expected {fname}(z, *args) to return an array of shape "
                f"{tuple(z0.shape)} and dtype {z0.dtype} like z, got shape "
                f"{tuple(getattr(out, 'shape', ()))} and dtype {getattr(out, 'dtype', None)}. "
                f"{fname} must map (..., n) to (..., n), row by row."
            )
        return out

    if fixed_point:
        def resid(z: Any) -> tuple[Any, Any]:
            t = check(fun(z, *args))
            return t - z, norm(xp, t)

        # finite norms of T(z) and of T(z) - z imply a finite z: `iterate` need not check it
        resid.implies_finite_z = True  # type: ignore[attr-defined]
        return resid

    scale0 = norm(xp, check(fun(z0, *args)))

    def resid_root(z: Any) -> tuple[Any, Any]:
        return check(fun(z, *args)), scale0

    return resid_root


def iterate(bk: Any, xp: Any, resid: Callable[[Any], tuple[Any, Any]], z0: Any, *,
            tol: float | None, atol: float, maxiter: int, mstate: Any,
            step: Callable[..., tuple[Any, Any, Any, Any, Any]],
            extra_step: bool | int = False) -> SolverResult:
    """The loop every solver runs.

    `step(mstate, z, r, rn, active) -> (z_new, r_new, scale_new, ok, update)` proposes the next
    iterate with its residual (`ok`: a finite, acceptable step, shape `(..., 1)`, or None when
    the method accepts every step whose residual is finite);
    `update(mstate, accept, everyone, rn_new, z, r) -> mstate` then commits the method's state
    for the accepted elements (`everyone`: a Python bool, True when every element is known to
    be accepted, so masked selects may be skipped: eagerly, while no element has stopped;
    always False under tracing; `rn_new`: the
    norm of the proposed residual, shape `(..., 1)`; `z`, `r`: the iterate and residual each
    element holds after this step, the proposed ones where accepted, the previous ones
    elsewhere: finite wherever the previous ones were).
    An element stops when its residual is within tolerance, or when it cannot make a finite step
    (then it is reported not converged), or at `maxiter`.

    `extra_step` (fixed points only: `resid` returns $T(z) - z$; True is 1): after the loop,
    that many plain steps $z \\leftarrow T(z) = z + r$ for every element, each at the cost of
    one more evaluation of $T$; an element keeps a step where its residual is finite and not
    larger, and its statistics then describe the value returned (`steps` and the traces do
    not count them).
    """
    rtol = default_tol(xp, z0.dtype) if tol is None else tol
    n_extra = _extra_steps(extra_step)
    z_checked = getattr(resid, "implies_finite_z", False)
    r0, scale0 = resid(z0)
    rn0 = norm(xp, r0)
    atol_a = xp.full_like(rn0, atol) if atol else None

    def bound(scale: Any) -> Any:  # atol = 0, the usual case: one operation less per step
        return rtol * scale if atol == 0 else xp.maximum(atol_a, rtol * scale)

    def done(rn: Any, scale: Any) -> Any:
        return rn <= bound(scale)

    def going(rn: Any, scale: Any) -> Any:  # finite norms, and not `done`
        return (bound(scale) < rn) & (rn < math.inf)  # false for NaN, and for scale = inf

    dev = device(z0)
    idx = xp.arange(maxiter, dtype=xp.int32, device=dev)
    nan_trace = xp.full((*z0.shape[:-1], maxiter), float("nan"), dtype=z0.dtype, device=dev)
    ok0 = (rn0 + scale0) < math.inf  # both norms finite (see `body`)
    if not z_checked:
        ok0 = ok0 & finite(xp, z0)
    conv0 = done(rn0, scale0) & ok0
    state = dict(
        k=zero_int(xp, rn0), z=z0, r=r0, rn=rn0, scale=scale0,
        steps=xp.zeros_like(rn0, dtype=xp.int32), conv=conv0, failed=~ok0,
        active=~conv0 & ok0, trace=nan_trace, strace=nan_trace, m=mstate,
    )

    # Eagerly, while every element is known to go on (none has converged or failed yet: the
    # usual case), one look per step is the whole bookkeeping: the step count is a Python int
    # shared by every element, and the traces' columns wait in a list (`settle` writes them
    # once, when some element stops or the loop ends). `lead["k"]` is None otherwise: from the
    # start under tracing (`known_all` is False there), and for good once an element stopped.
    lead: dict = {"k": 0 if bk.known_all(state["active"]) else None, "rows": []}

    def settle(s: dict) -> dict:
        k, rows = lead["k"], lead["rows"]
        lead["k"], lead["rows"] = None, []
        s = {**s, "k": s["k"] + k, "steps": s["steps"] + k}
        if rows:
            for key, i in (("trace", 0), ("strace", 1)):
                cols = xp.concat([row[i] for row in rows], axis=-1)
                s[key] = xp.concat([cols, s[key][..., len(rows):]], axis=-1)
        return s

    def cond(s: dict) -> Any:
        if lead["k"] is not None:
            return lead["k"] < maxiter
        return (s["k"] < maxiter) & xp.any(s["active"])

    def body(s: dict) -> dict:
        active = s["active"]
        z_new, r_new, scale_new, ok_step, update = step(s["m"], s["z"], s["r"], s["rn"], active)
        rn_new = norm(xp, r_new)
        if lead["k"] is not None:
            # every element was active: it goes on if its step is good and not yet converged
            on = going(rn_new, scale_new)
            on = on if ok_step is None else on & ok_step
            if not z_checked:
                on = on & finite(xp, z_new)
            if bk.known_all(on):
                lead["k"] += 1
                lead["rows"].append((rn_new, scale_new))
                return {**s, "z": z_new, "r": r_new, "rn": rn_new, "scale": scale_new,
                        "m": update(s["m"], on, True, rn_new, z_new, r_new)}
            s = settle(s)
        # both norms finite (they are >= 0, or NaN: their sum is finite exactly then, and
        # below inf exactly then: one comparison instead of `isfinite`'s several operations)
        finite_norms = (rn_new + scale_new) < math.inf
        ok = finite_norms if ok_step is None else ok_step & finite_norms
        if not z_checked:
            ok = ok & finite(xp, z_new)
        # Here some element has stopped or stops now (eagerly, the lead shortcut above covers
        # every step before), or the loop is traced: the masked selects
        accept = active & ok
        z, r, rn, scale = (xp.where(accept, new, old) for new, old in (
            (z_new, s["z"]), (r_new, s["r"]), (rn_new, s["rn"]), (scale_new, s["scale"])))
        at_k = (idx == s["k"]) & accept
        conv = s["conv"] | (accept & done(rn_new, scale_new))
        failed = s["failed"] | (active & ~ok)
        return dict(
            k=s["k"] + 1, z=z, r=r, rn=rn, scale=scale,
            steps=s["steps"] + xp.astype(accept, xp.int32), conv=conv, failed=failed,
            active=~conv & ~failed,
            trace=xp.where(at_k, rn_new, s["trace"]),
            strace=xp.where(at_k, scale_new, s["strace"]),
            m=update(s["m"], accept, False, rn_new, z, r),
        )

    s = bk.while_loop(cond, body, state)
    if lead["k"] is not None:
        s = settle(s)
    for _ in range(n_extra):
        s = _extra_step(bk, xp, resid, s, done, z_checked)
    rel = safe_div(xp, s["rn"], s["scale"], s["scale"] > 0)
    # the relative trace from the scales, once (NaN where the element had stopped)
    rtrace = xp.where(s["strace"] > 0, s["trace"] / s["strace"], xp.zeros_like(s["trace"]))
    rtrace = xp.where(xp.isnan(s["trace"]), s["trace"], rtrace)
    return SolverResult(s["z"], s["steps"][..., 0], s["conv"][..., 0], s["rn"][..., 0],
                        rel[..., 0], s["trace"], rtrace, xp.max(xp.abs(s["r"]), axis=-1))


def _extra_steps(extra_step: Any) -> int:
    """The number of extra steps from `extra_step` (a bool, or an int >= 0)."""
    if isinstance(extra_step, bool):
        return int(extra_step)
    if not isinstance(extra_step, int) or extra_step < 0:
        raise ValueError(f"expected extra_step a bool or an int >= 0, got {extra_step!r}.")
    return extra_step


def _extra_step(bk: Any, xp: Any, resid: Callable[[Any], tuple[Any, Any]], s: dict,
                done: Callable[[Any, Any], Any], z_checked: bool) -> dict:
    """`iterate`'s final step $z \\leftarrow z + r = T(z)$, kept per element where its
    residual is finite and not larger than the last one."""
    z_new = s["z"] + s["r"]
    r_new, scale_new = resid(z_new)
    rn_new = norm(xp, r_new)
    better = ((rn_new + scale_new) < math.inf) & (rn_new <= s["rn"])
    if not z_checked:
        better = better & finite(xp, z_new)
    if bk.known_all(better):
        z, r, rn, scale = z_new, r_new, rn_new, scale_new
    else:
        z, r, rn, scale = (xp.where(better, new, old) for new, old in (
            (z_new, s["z"]), (r_new, s["r"]), (rn_new, s["rn"]), (scale_new, s["scale"])))
    conv = s["conv"] | (better & done(rn_new, scale_new))
    return {**s, "z": z, "r": r, "rn": rn, "scale": scale, "conv": conv}


def backtrack(bk: Any, xp: Any, resid: Callable[[Any], tuple[Any, Any]], z: Any, p: Any,
              rn: Any, active: Any, *, max_backtracks: int, shrink: float = 0.5,
              c: float = 1e-4) -> tuple[Any, Any, Any, Any, Any]:
    """Backtracking line search on the residual norm along `p`, per element.

    Tries $\\alpha = 1, \\rho, \\rho^2, \\dots$ ($\\rho$ = `shrink`, `max_backtracks + 1` trials at
    most) and stops, per element, at the first with $\\|r(z + \\alpha p)\\| \\le (1 - c\\alpha)
    \\|r(z)\\|$. Returns `(z_new, r_new, scale_new, rn_new)` of that trial, or, where none passed,
    of the trial with the smallest finite residual (`rn_new` = inf where every trial was NaN/inf;
    then `z_new` is `z`)."""
    inf = xp.full_like(rn, float("inf"))
    found0 = ~active
    one = xp.ones_like(rn)

    def cond(s: tuple) -> Any:
        j, found = s[0], s[6]
        return (j <= max_backtracks) & xp.any(~found)

    def body(s: tuple) -> tuple:
        j, alpha, zb, rb, sb, nb, found = s
        zt = z + alpha * p
        rt, st = resid(zt)
        nt = norm(xp, rt)
        good = ~found & xp.isfinite(nt) & finite(xp, zt) & xp.isfinite(st)
        passed = good & (nt <= (1 - c * alpha) * rn)
        better = good & (passed | (nt < nb))
        return (j + 1, alpha * shrink, xp.where(better, zt, zb), xp.where(better, rt, rb),
                xp.where(better, st, sb), xp.where(better, nt, nb), found | passed)

    r0 = xp.zeros_like(z)
    s = bk.while_loop(cond, body, (zero_int(xp, rn), one, z, r0, inf, inf, found0))
    return s[2], s[3], s[4], s[5], s[6] & active
