"""Differentiable quadratic programs: `idf.qp.solve_qp`, written once for every framework.

$$\\min_x\\ \\tfrac12 x^\\top Q x + q^\\top x \\quad \\text{s.t.}\\quad Ax = b,\\ Gx \\le h$$

with any leading batch dimensions, NumPy, JAX or PyTorch arrays. The forward solve is a batched
primal-dual interior-point method on the host (float64), polished on the identified active set
so the answer is exact to rounding; the derivative is the implicit function theorem on the
active-set KKT condition (`kkt_condition`), through `idf.custom_root`, so reverse, forward and
higher-order derivatives, `jit`, `vmap` and `torch.func` work as for any decorated solver.
This module imports no framework.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .._array import ArraySpec, numpy_dtype, one_blas_thread
from .._array import device as _device
from .._backend import Backend, convert_constants, get_backend
from .._config import resolve_on_failure
from .._errors import NonConvergenceError, StructureError
from .._factored import publish
from .._linear_solve import AbstractLinearSolver
from .._root import Derivatives, ImplicitFunction, custom_root
from . import _ipm
from ._external import EXTERNAL, solve_external
from ._factorization import KKTFactorization
from ._ipm import (
    CLOSEST,
    DUAL_INFEASIBLE,
    MAX_ITER,
    PRIMAL_INFEASIBLE,
    SOLVED,
    STATUS_NAMES,
)
from ._reduced import ReducedDense as _ReducedDense

__all__ = [
    "CLOSEST",
    "DUAL_INFEASIBLE",
    "MAX_ITER",
    "PRIMAL_INFEASIBLE",
    "SOLVED",
    "STATUS_NAMES",
    "QPSolution",
    "QPStats",
    "kkt_condition",
    "qp_function",
    "solve_qp",
]


class QPStats(NamedTuple):
    """Per-sample statistics of a `solve_qp` call (NumPy arrays when called eagerly, JAX
    arrays under `jit`/`vmap`), each of the batch shape unless said.

    - `iterations`: interior-point iterations.
    - `status`: `SOLVED` (0), `PRIMAL_INFEASIBLE` (1), `DUAL_INFEASIBLE` (2, unbounded),
      `MAX_ITER` (3, not converged), `CLOSEST` (4: infeasible, and with
      `infeasible="closest"` its closest feasible problem solved). `STATUS_NAMES` maps them to
      words.
    - `primal_residual`: $\\max(|Ax - b|, (Gx - h)_+)$ at the returned x.
    - `dual_residual`: $\\max|Qx + q + A^\\top y + G^\\top z|$.
    - `gap`: $\\max|z \\circ (h - Gx)|$.
    - `active`: shape `(..., m)`, the inequality constraints the derivative holds active.
    - `degenerate`: some constraint is weakly active (active with a zero multiplier): the
      derivative there is the one documented in `solve_qp`.
    - `violated`: shape `(..., m)`; for a primal infeasible sample, the inequality rows that
      the least-squares shift to its closest feasible problem loosens (all False otherwise).
    """

    iterations: Any
    status: Any
    primal_residual: Any
    dual_residual: Any
    gap: Any
    active: Any
    degenerate: Any
    violated: Any

    def summary(self) -> str:
        """A one-paragraph account: how many samples per status, iterations, residuals."""
        st = np.asarray(self.status).reshape(-1)
        its = np.asarray(self.iterations).reshape(-1)
        parts = [f"{int(np.sum(st == k))} {STATUS_NAMES[k]}" for k in STATUS_NAMES
                 if np.any(st == k)]
        deg = int(np.sum(np.asarray(self.degenerate)))
        rp = float(np.max(np.asarray(self.primal_residual), initial=0))
        rd = float(np.max(np.asarray(self.dual_residual), initial=0))
        return (f"{st.size} QP(s): " + ", ".join(parts)
                + (f"; iterations {int(its.min())}-{int(its.max())}" if its.size else "")
                + f"; max primal residual {rp:.1e}, max dual residual {rd:.1e}"
                + (f"; {deg} degenerate" if deg else ""))


class QPSolution(NamedTuple):
    """`solve_qp(..., full_output=True)`: the primal solution `x` (..., n), the multipliers
    `y` (..., p) of $Ax = b$ and `z` (..., m) $\\ge 0$ of $Gx \\le h$ (all three
    differentiable), and the `QPStats`. Convention: $Qx + q + A^\\top y + G^\\top z = 0$."""

    x: Any
    y: Any
    z: Any
    stats: QPStats


# ---- the optimality condition, written once -----------------------------------------------------

def _mv(M: Any, v: Any) -> Any:
    """$M v$ for `M` (..., r, c) and `v` (..., c), where `v` may carry extra leading
    dimensions (many vectors at once, as when a backend builds the Jacobian column by
    column): those are folded into one matrix product, never broadcast against `M` (which
    would copy `M` once per vector)."""
    k = M.ndim - 2
    lead = v.ndim - 1 - k
    if k == 0 or lead <= 0:
        return (M @ v[..., None])[..., 0] if k else v @ _T(M)
    xp = get_backend(v).namespace(v)
    L = math.prod(v.shape[:lead])
    rest = tuple(v.shape[lead:])
    vs = xp.moveaxis(xp.reshape(v, (L, *rest)), 0, -1)          # (..., c, L)
    out = M @ vs                                                  # (..., r, L)
    out = xp.moveaxis(out, -1, 0)
    return xp.reshape(out, (*v.shape[:lead], *out.shape[1:]))


def _T(M: Any) -> Any:
    return get_backend(M).namespace(M).matrix_transpose(M)


def _mtv(M: Any, v: Any) -> Any:
    """$M^\\top v$, as `_mv`."""
    return _mv(_T(M), v)


def _qx(Q: Any, x: Any) -> Any:
    """$\\tfrac12 (Q + Q^\\top) x$: the objective sees the symmetric part of Q only."""
    return (_mv(Q, x) + _mtv(Q, x)) / 2


def _residuals(xp: Any, w: Any, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> tuple:
    x, y, z, _ = w
    r1 = _qx(Q, x) + q + _mtv(A, y) + _mtv(G, z)
    r2 = _mv(A, x) - b
    r3 = xp.where(z > 0, _mv(G, x) - h, z)
    return r1, r2, r3


def kkt_condition(w: Any, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> Any:
    """The active-set KKT condition of the QP, $F(w, \\theta) = 0$ with
    $w = (x, y, z, \\text{ok})$, in any framework. With $s = \\text{ok}^2$ and
    $c = (1 - \\text{ok})^2$:

    - $s\\,(\\tfrac12(Q + Q^\\top)x + q + A^\\top y + G^\\top z) + c\\,x$, $s\\,(Ax - b) + c\\,y$;
    - row $i$ of the inequalities: $s\\,(Gx - h)_i + c\\,z_i$ where $z_i > 0$ (active), else
      $z_i$;
    - $\\text{ok} - \\text{ok}^2$: `ok` is 1 for a solved sample (its condition is the KKT
      system) and 0 for a failed one (its condition is $w = 0$, so its derivative is zero,
      never NaN).

    The active set is read from the sign of $z$, so $\\partial_w F$ is the KKT matrix of the
    equality-constrained QP of the active constraints: the derivative treats weakly active
    constraints (held at $z_i = 0$ by the forward solve) as inactive."""
    x, y, z, ok = w
    xp = get_backend(x).namespace(x)
    r1, r2, r3 = _residuals(xp, w, Q, q, A, b, G, h)
    s, c = (ok * ok)[..., None], ((1 - ok) * (1 - ok))[..., None]
    return (s * r1 + c * x, s * r2 + c * y, s * r3 + c * z, ok - ok * ok)


def _ok_column(xp: Any, w: Any, theta: tuple) -> tuple:
    """$\\partial F / \\partial \\text{ok}$ of the three blocks:
    $2\\,\\text{ok}\\,r - 2(1 - \\text{ok})\\,w$."""
    x, y, z, ok = w
    r1, r2, r3 = _residuals(xp, w, *theta)
    o = ok[..., None]
    return (2 * o * r1 - 2 * (1 - o) * x, 2 * o * r2 - 2 * (1 - o) * y,
            2 * o * r3 - 2 * (1 - o) * z)


def _sum_to(xp: Any, g: Any, shape: tuple) -> Any:
    """Sum the broadcast dimensions of `g` away, down to `shape`."""
    extra = g.ndim - len(shape)
    if extra > 0:
        g = xp.sum(g, axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = xp.sum(g, axis=axes, keepdims=True)
    return g


def _outer(u: Any, v: Any) -> Any:
    return u[..., :, None] * v[..., None, :]


def _jvp_x(v: Any, w: Any, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> Any:
    dx, dy, dz, dok = v
    x, _, z, ok = w
    xp = get_backend(x).namespace(x)
    s, c = (ok * ok)[..., None], ((1 - ok) * (1 - ok))[..., None]
    k1, k2, k3 = _ok_column(xp, w, (Q, q, A, b, G, h))
    do = dok[..., None]
    d1 = _qx(Q, dx) + _mtv(A, dy) + _mtv(G, dz)
    d2 = _mv(A, dx)
    d3 = xp.where(z > 0, _mv(G, dx), dz)
    return (s * d1 + c * dx + do * k1, s * d2 + c * dy + do * k2, s * d3 + c * dz + do * k3,
            dok - 2 * ok * dok)


def _vjp_x(u: Any, w: Any, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> Any:
    u1, u2, u3, u4 = u
    x, _, z, ok = w
    xp = get_backend(x).namespace(x)
    s, c = (ok * ok)[..., None], ((1 - ok) * (1 - ok))[..., None]
    act = z > 0
    a1, a2, a3 = s * u1, s * u2, s * u3
    zero = xp.zeros_like(a3)
    gx = _qx(Q, a1) + _mtv(A, a2) + _mtv(G, xp.where(act, a3, zero)) + c * u1
    gy = _mv(A, a1) + c * u2
    gz = _mv(G, a1) + xp.where(act, zero, a3) + c * u3
    k1, k2, k3 = _ok_column(xp, w, (Q, q, A, b, G, h))
    gok = (xp.sum(u1 * k1, axis=-1) + xp.sum(u2 * k2, axis=-1) + xp.sum(u3 * k3, axis=-1)
           + u4 * (1 - 2 * ok))
    return (gx, gy, gz, gok)


def _jvp_args(args_dot: tuple, w: Any, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> Any:
    dQ, dq, dA, db, dG, dh = args_dot  # None: no tangent for that input
    x, y, z, ok = w
    xp = get_backend(x).namespace(x)
    s = (ok * ok)[..., None]
    d1, d2, d3 = xp.zeros_like(x), xp.zeros_like(y), xp.zeros_like(z)
    if dQ is not None:
        d1 = d1 + _qx(dQ, x)
    if dq is not None:
        d1 = d1 + dq
    if dA is not None:
        d1, d2 = d1 + _mtv(dA, y), d2 + _mv(dA, x)
    if db is not None:
        d2 = d2 - db
    if dG is not None:
        d1, d3 = d1 + _mtv(dG, z), d3 + _mv(dG, x)
    if dh is not None:
        d3 = d3 - dh
    d3 = xp.where(z > 0, d3, xp.zeros_like(z))
    return (s * d1, s * d2, s * d3, xp.zeros_like(ok))


def _vjp_args(u: Any, w: Any, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> tuple:
    u1, u2, u3, _ = u
    x, y, z, ok = w
    xp = get_backend(x).namespace(x)
    s = (ok * ok)[..., None]
    a1, a2 = s * u1, s * u2
    a3 = xp.where(z > 0, s * u3, xp.zeros_like(u3))
    gQ = _outer(a1, x)
    return (_sum_to(xp, (gQ + xp.matrix_transpose(gQ)) / 2, tuple(Q.shape)),
            _sum_to(xp, a1, tuple(q.shape)),
            _sum_to(xp, _outer(y, a1) + _outer(a2, x), tuple(A.shape)),
            _sum_to(xp, -a2, tuple(b.shape)),
            _sum_to(xp, _outer(z, a1) + _outer(a3, x), tuple(G.shape)),
            _sum_to(xp, -a3, tuple(h.shape)))


def _jacobian_x(w: Any, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> Any:
    """$\\partial_w F$ as one matrix on the raveled $w = (x, y, z, \\text{ok})$, per sample
    (`Derivatives.jacobian_x`): the dense backward solve takes it instead of building it from
    $n + p + m + 1$ products. Written block by block into one array where the framework's
    arrays take item assignment (NumPy, PyTorch: a third of the time of concatenating the
    blocks at n = 100), else (JAX) concatenated."""
    x, y, z, ok = w
    bk = get_backend(x)
    xp = bk.namespace(x)
    batch = tuple(ok.shape)
    n, p, m = int(x.shape[-1]), int(y.shape[-1]), int(z.shape[-1])
    dev = _device(x)
    s, c = (ok * ok)[..., None, None], ((1 - ok) * (1 - ok))[..., None, None]
    act = xp.astype(z > 0, x.dtype)
    k1, k2, k3 = _ok_column(xp, w, (Q, q, A, b, G, h))
    Qs = (Q + xp.matrix_transpose(Q)) / 2
    At, Gt = xp.matrix_transpose(A), xp.matrix_transpose(G)
    zdiag = s[..., 0] * (1 - act) + c[..., 0]                      # (..., m)
    if not bk.is_traced((x, Q, A, G)):
        N = n + p + m + 1
        try:
            M = xp.zeros((*batch, N, N), dtype=x.dtype, device=dev)
            M[..., :n, :n] = s * Qs
            M[..., :n, n:n + p] = s * At
            M[..., :n, n + p:n + p + m] = s * Gt
            M[..., n:n + p, :n] = s * A
            M[..., n + p:n + p + m, :n] = (s * act[..., None]) * G
            M[..., :N - 1, N - 1] = xp.concat([k1, k2, k3], axis=-1)
            i = xp.arange(n + p + m, device=dev)
            diag = xp.concat([xp.broadcast_to(c[..., 0], (*batch, n + p)), zdiag], axis=-1)
            M[..., i, i] = M[..., i, i] + diag
            M[..., N - 1, N - 1] = 1 - 2 * ok
            return M
        except (TypeError, RuntimeError):
            # immutable arrays (JAX: TypeError), or values batched by a transform that the
            # new array is not (torch.func.vmap: RuntimeError): the concatenation below
            pass

    def eye(k: int) -> Any:
        return xp.eye(k, dtype=x.dtype, device=dev)

    def zeros(r: int, c_: int) -> Any:
        return xp.zeros((*batch, r, c_), dtype=x.dtype, device=dev)

    def full(M: Any, r: int, c_: int) -> Any:
        return xp.broadcast_to(M, (*batch, r, c_))

    rows = [
        [s * full(Qs, n, n) + c * eye(n), s * full(At, n, p), s * full(Gt, n, m), k1[..., None]],
        [s * full(A, p, n), c * eye(p) + zeros(p, p), zeros(p, m), k2[..., None]],
        [s * act[..., None] * full(G, m, n), zeros(m, p),
         eye(m) * zdiag[..., None, :] + zeros(m, m), k3[..., None]],
        [zeros(1, n), zeros(1, p), zeros(1, m), (1 - 2 * ok)[..., None, None]],
    ]
    return xp.concat([xp.concat(r, axis=-1) for r in rows], axis=-2)


_DERIVATIVES = Derivatives(jvp_x=_jvp_x, vjp_x=_vjp_x, jvp_args=_jvp_args, vjp_args=_vjp_args,
                           jacobian_x=_jacobian_x)


# ---- input checks -------------------------------------------------------------------------------

def _shape(a: Any) -> tuple:
    return tuple(int(s) for s in a.shape)


def _check_inputs(bk: Backend, Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any
                  ) -> tuple[int, int, int, tuple]:
    for name, v in (("Q", Q), ("q", q), ("A", A), ("b", b), ("G", G), ("h", h)):
        if not hasattr(v, "shape") or not hasattr(v, "dtype"):
            raise StructureError(f"solve_qp: {name}: expected an array, got "
                                 f"{type(v).__name__}.")
        if not bk.is_float(v):
            raise StructureError(f"solve_qp: {name}: expected a real floating array, got dtype "
                                 f"{v.dtype}. Convert it, e.g. to float64.")
    if q.ndim < 1:
        raise StructureError(f"solve_qp: q: expected shape (..., n), got {_shape(q)}.")
    n = _shape(q)[-1]
    want = {"Q": (Q, 2, (n, n)), "A": (A, 2, (None, n)), "b": (b, 1, (None,)),
            "G": (G, 2, (None, n)), "h": (h, 1, (None,))}
    for name, (v, k, tail) in want.items():
        sh = _shape(v)
        if v.ndim < k or any(t is not None and t != s for t, s in zip(tail, sh[v.ndim - k:])):
            desc = {"Q": "(..., n, n)", "A": "(..., p, n)", "b": "(..., p)", "G": "(..., m, n)",
                    "h": "(..., m)"}[name]
            raise StructureError(f"solve_qp: {name}: expected shape {desc} with n = {n} (the "
                                 f"length of q), got {sh}.")
    p, m = _shape(A)[-2], _shape(G)[-2]
    if _shape(b)[-1] != p:
        raise StructureError(f"solve_qp: b: expected {p} entries (the rows of A), got shape "
                             f"{_shape(b)}.")
    if _shape(h)[-1] != m:
        raise StructureError(f"solve_qp: h: expected {m} entries (the rows of G), got shape "
                             f"{_shape(h)}.")
    batches = [_shape(Q)[:-2], _shape(q)[:-1], _shape(A)[:-2], _shape(b)[:-1],
               _shape(G)[:-2], _shape(h)[:-1]]
    try:
        batch = tuple(np.broadcast_shapes(*batches))
    except ValueError:
        names = ", ".join(f"{k} {s}" for k, s in zip("Q q A b G h".split(), batches))
        raise StructureError(f"solve_qp: the leading (batch) dimensions do not broadcast: "
                             f"{names}. Give every input the same batch shape, or none."
                             ) from None
    return n, p, m, batch


def _check_Q(Q: np.ndarray, batch: tuple, eps: float) -> None:
    """The symmetric part of Q positive semidefinite, sample by sample (host, float64)."""
    scale = np.maximum(_ipm._inf(Q.reshape(len(Q), -1)), 1e-300)
    n = Q.shape[1]
    shifted = Q.copy()
    shifted[:, np.arange(n), np.arange(n)] += (1e3 * eps * scale)[:, None]
    try:
        np.linalg.cholesky(shifted)
        return
    except np.linalg.LinAlgError:
        pass
    lo = np.linalg.eigvalsh(Q)[:, 0]
    bad = np.nonzero(lo < -1e3 * eps * scale)[0]
    if len(bad):
        i = int(bad[0])
        raise StructureError(
            f"solve_qp: Q is not positive semidefinite{_where(i, batch)} (smallest eigenvalue "
            f"{lo[i]:.3e}): the problem is not convex, and its KKT point need not be a minimum. "
            "Pass a positive semidefinite Q (e.g. L Lᵀ + εI).")


def _where(i: int, batch: tuple) -> str:
    return f" at batch index {np.unravel_index(i, batch)}" if batch else ""


# ---- the host solve -----------------------------------------------------------------------------

def _snap_bounds(x: np.ndarray, G: np.ndarray, h: np.ndarray, active: np.ndarray) -> None:
    """In place: where an active row of G has a single nonzero entry (a bound, such as
    $x_j \\ge 0$), $x_j$ is set to the bound itself, $h_i / G_{ij}$ (`+ 0.0`: no negative
    zero). The polished point holds it to rounding already (about 1e-17 of the data's scale);
    exactly, a mask such as `x > 0` finds the active bounds."""
    if G.shape[1] == 0 or not active.any():
        return
    single = active & (np.count_nonzero(G, axis=2) == 1)
    if not single.any():
        return
    b, i = np.nonzero(single)
    j = np.argmax(G[b, i] != 0, axis=1)
    x[b, j] = h[b, i] / G[b, i, j] + 0.0


def _host_solve(Qh: np.ndarray, qh: np.ndarray, Ah: np.ndarray, bh: np.ndarray, Gh: np.ndarray,
                hh: np.ndarray, *, tol: float, maxiter: int, check_eps: float,
                solver: str = "ipm", keep: dict | None = None) -> tuple[tuple, dict]:
    n, p, m, batch = _dims(Qh, qh, Ah, bh, Gh, hh)
    B = int(np.prod(batch)) if batch else 1

    def flat(a: Any, tail: tuple) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        return np.broadcast_to(a, batch + tail).reshape((B, *tail))

    Q, q = flat(Qh, (n, n)), flat(qh, (n,))
    Q = Q + np.swapaxes(Q, 1, 2)
    Q *= 0.5
    A, b, G, h = flat(Ah, (p, n)), flat(bh, (p,)), flat(Gh, (m, n)), flat(hh, (m,))
    finite = np.array([np.isfinite(a).reshape(B, -1).all(axis=1) for a in (Q, q, A, b, G, h)]
                      ).all(axis=0)
    if not finite.all():
        i = int(np.nonzero(~finite)[0][0])
        raise StructureError(f"solve_qp: the data hold NaN or infinity{_where(i, batch)}. "
                             "Check the inputs.")
    _check_Q(Q, batch, check_eps)
    if solver == "ipm":
        basis: dict = {}
        x, y, z, s, it, conv, scale = _ipm.ipm(Q, q, A, b, G, h, tol=tol, maxiter=maxiter,
                                               keep=basis)
        status = np.where(conv, SOLVED, MAX_ITER)
    else:
        x, y, z, s, it, status = solve_external(solver, Q, q, A, b, G, h, tol=tol,
                                                maxiter=maxiter)
        conv = status == SOLVED
        scale = _ipm.data_scale(Q, q, A, b, G, h)
        basis = {}
    xp_, yp, zp, active, pol = _ipm.polish(Q, q, A, b, G, h, x, y, z, s, scale, basis=basis,
                                           keep=keep)
    # where the polish found no consistent active set, the interior point stopped too early to
    # tell (a multiplier and its slack both still ~sqrt(tol)): solve those again, tighter
    again = np.nonzero(~pol & (status != PRIMAL_INFEASIBLE) & (status != DUAL_INFEASIBLE))[0]
    if len(again) and solver == "ipm" and tol > 1e-13:
        sub = (Q[again], q[again], A[again], b[again], G[again], h[again])
        x2, y2, z2, s2, it2, _, scale2 = _ipm.ipm(*sub, tol=1e-13, maxiter=maxiter)
        xq, yq, zq, act2, pol2 = _ipm.polish(*sub, x2, y2, z2, s2, scale2)
        fix = again[pol2]
        x[fix], y[fix], z[fix], s[fix] = x2[pol2], y2[pol2], z2[pol2], s2[pol2]
        xp_[fix], yp[fix], zp[fix], active[fix], pol[fix] = (xq[pol2], yq[pol2], zq[pol2],
                                                             act2[pol2], True)
        it[again] += it2
    # the polished point is an exact KKT point (feasible, z >= 0, residual at rounding): the
    # sample is solved, whatever the solver said about its own stopping test
    rescued = pol & (status == MAX_ITER)
    status = np.where(rescued, SOLVED, status)
    conv = conv | rescued
    # weakly active constraints (a zero multiplier): held inactive, flagged, and the point
    # solved again without them so the condition holds exactly
    weak, near = _ipm.weakly_active(Q, q, A, b, G, h, xp_, yp, zp, active)
    degenerate = (weak | near).any(axis=1) & conv
    redo = np.nonzero(weak.any(axis=1) & pol)[0]
    active = active & ~weak
    if len(redo):
        xr, yr, zr, good = _ipm._solve_active(Q[redo], q[redo], A[redo], b[redo], G[redo],
                                              h[redo], active[redo])
        xp_[redo], yp[redo] = xr, yr
        zp[redo] = np.maximum(zr, 0.0)
        pol[redo] &= good
    zp = np.where(active, zp, 0.0)
    _snap_bounds(xp_, G, h, active & pol[:, None])
    use = conv  # converged samples: the polished point (when the polish failed, the IPM's)
    x = np.where(use[:, None], np.where(pol[:, None], xp_, x), 0.0)
    y = np.where(use[:, None], np.where(pol[:, None], yp, y), 0.0)
    z = np.where(use[:, None], np.where(pol[:, None], zp, np.where(active, np.maximum(z, 0), 0)),
                 0.0)
    if (status == MAX_ITER).any():  # not converged: infeasible, unbounded, or slow?
        i = np.nonzero(status == MAX_ITER)[0]
        st, _, _ = _ipm.infeasibility(Q[i], q[i], A[i], b[i], G[i], h[i], tol=tol,
                                      maxiter=maxiter, scale=scale[i])
        status[i] = st
    rp, rd, gap = _ipm.residuals(Q, q, A, b, G, h, x, y, z)
    violated = np.zeros((B, m), dtype=bool)
    inf = np.nonzero(status == PRIMAL_INFEASIBLE)[0]
    if len(inf):  # what the closest feasible problem shifts (for infeasible="closest")
        violated[inf], _ = _ipm.closest_rows(A[inf], b[inf], G[inf], h[inf], tol=tol,
                                             maxiter=maxiter, scale=scale[inf])
    ok = (status == SOLVED).astype(np.float64)
    w = (x.reshape((*batch, n)), y.reshape((*batch, p)), z.reshape((*batch, m)),
         ok.reshape(batch))
    aux = {"iterations": it.reshape(batch).astype(np.int32),
           "status": status.reshape(batch).astype(np.int32),
           "primal_residual": rp.reshape(batch), "dual_residual": rd.reshape(batch),
           "gap": gap.reshape(batch), "active": (active & conv[:, None]).reshape((*batch, m)),
           "degenerate": degenerate.reshape(batch), "violated": violated.reshape((*batch, m))}
    return w, aux


def _failure(status: Any, batch: tuple) -> NonConvergenceError:
    st = np.asarray(status).reshape(batch)
    failed = (st != SOLVED) & (st != CLOSEST)
    bad = np.argwhere(failed) if batch else (np.zeros((1, 0), int) if failed
                                             else np.zeros((0, 0), int))
    groups: dict[int, list[str]] = {}
    for ix in bad:
        groups.setdefault(int(st[tuple(ix)]), []).append(str(tuple(int(v) for v in ix)))
    where = "; ".join(
        STATUS_NAMES[k] + (f" at batch index {', '.join(v[:8])}"
                           + (f" and {len(v) - 8} more" if len(v) > 8 else "") if batch else "")
        for k, v in sorted(groups.items()))
    more = ""
    return NonConvergenceError(
        f"solve_qp: {len(bad)} of {max(st.size, 1)} QP(s) have no solution to differentiate: "
        f"{where}{more}. Check those problems' constraints (an infeasible one has no point "
        "satisfying Ax = b, Gx <= h; an unbounded one a direction d with Qd = 0, Ad = 0, "
        "Gd <= 0, qᵀd < 0), raise maxiter for a slow one, or pass on_failure='nan' to make "
        "only those samples NaN.")


def solve_qp(Q: Any, q: Any, A: Any = None, b: Any = None, G: Any = None, h: Any = None, *,
             solver: str = "ipm", tol: float | None = None, maxiter: int | None = None,
             infeasible: str = "fail", on_failure: str | None = None,
             solve: AbstractLinearSolver | None = None, full_output: bool = False) -> Any:
    """Solve $\\min_x \\tfrac12 x^\\top Q x + q^\\top x$ s.t. $Ax = b$, $Gx \\le h$, a batch at a
    time, differentiably in every input.

    ```python
    import numpy as np
    import implicitdiff as idf

    Q, q = np.eye(2), np.array([-1.0, -1.0])
    G, h = np.array([[1.0, 1.0]]), np.array([1.0])      # x0 + x1 <= 1
    x = idf.qp.solve_qp(Q, q, G=G, h=h)                  # [0.5, 0.5]
    ```

    **Arguments:**

    - `Q` (..., n, n) positive semidefinite (only its symmetric part $(Q + Q^\\top)/2$ enters
      the objective, so that is what is solved with and differentiated: the gradient with
      respect to `Q` is symmetric), `q` (..., n); `A` (..., p, n) and `b`
      (..., p), `G` (..., m, n) and `h` (..., m), each pair optional. Leading (batch)
      dimensions broadcast against each other: a `Q` of shape (n, n) is shared by a batch of
      `q`. NumPy, JAX or PyTorch arrays (NumPy arrays beside another framework's are its
      constants), float32 or float64: the solve runs in float64 on the host, the outputs have
      the inputs' dtype.
    - `solver`: `"ipm"` (default), the built-in batched primal-dual interior-point method
      (Mehrotra predictor-corrector; each sample stops on its own); or an external solver
      where installed, run on the host one sample at a time: `"osqp"`, `"clarabel"`,
      `"proxsuite"` (ProxQP). Either way the answer is polished on its active set and
      differentiated the same way.
    - `tol`: the interior-point stopping tolerance (relative to the data's size; default
      1e-9). The answer is then polished, so it is exact to rounding whatever `tol`, once the
      active set is identified.
    - `maxiter`: interior-point iterations per sample (default 100).
    - `infeasible`: `"fail"` (default): an infeasible or unbounded sample is a failure,
      handled by `on_failure`. `"closest"`: a primal infeasible sample is replaced by its
      closest feasible problem, the one with the least-squares shift of $(b, h)$ (the
      projection of $(b, h)$ onto the data that admit a feasible point, as ProxSuite's QPLayer
      does), which is solved and differentiated, the shift included (exact where the set of
      loosened rows, `stats.violated`, and the rank of the tight rows are locally constant);
      its `stats.status` is `CLOSEST`. Unbounded samples still fail.
    - `on_failure`: `"raise"` (a `NonConvergenceError` naming the failed samples and why),
      `"warn"`, or `"nan"` (only the failed samples' outputs are NaN; the others keep exact
      values and gradients, and a failed sample adds nothing to the gradient of a shared
      input); None (default): `idf.config.on_failure`.
    - `solve`: the linear solver of the derivative. Default: an LU of each sample's
      active-set KKT matrix ($n + p + |S|$ unknowns: the rows of the inactive multipliers and
      of the status, which hold only their diagonal, are eliminated first, exactly), with
      `idf.Dense()`'s checks (equilibration, residual, the uniqueness probe that refuses a
      singular matrix); `idf.Dense()` factors the whole $(n + p + m + 1)$ matrix instead.
    - `full_output`: return `QPSolution(x, y, z, stats)` instead of `x`.

    **Derivatives** with respect to every input, by the implicit function theorem on the
    active-set KKT condition (`kkt_condition`): reverse, forward and higher order in every
    framework, under `jit`, `vmap`, `torch.func` like any `idf.custom_root` solver; NumPy inputs
    through `idf.vjp`, `idf.jvp`, `idf.jacobian` of `qp_function()` (exact hand-written
    products, no finite differences). At a degenerate point (a constraint active with a zero
    multiplier, flagged by `stats.degenerate`) the derivative is the element of the generalized
    Jacobian that treats the weakly active constraints as inactive (their multipliers held at
    zero): the one-sided derivative in the directions that move $x^*$ off the constraint. Where
    the tight constraints' rows are linearly dependent (a degenerate vertex: more constraints
    tight than their rank, as at the integral vertices OptNet's Sudoku reaches) the multipliers
    are not unique: the forward solve takes basic ones (non-negative least squares on the
    stationarity condition, whose support is linearly independent), the other tight constraints
    are weakly active, and the same rule applies (flagged in `stats.degenerate`). Where $x^*$
    itself is not unique ($Q$ singular on the feasible directions) or $A$'s rows are dependent,
    the derivative raises `SingularJacobianError`.

    **Returns:** `x` (..., n), or `QPSolution` with `full_output=True`.
    """
    if solver != "ipm" and solver not in EXTERNAL:
        raise ValueError(f"solve_qp: solver: expected 'ipm' or one of "
                         f"{', '.join(map(repr, EXTERNAL))}, got {solver!r}.")
    if infeasible not in ("fail", "closest"):
        raise ValueError(f"solve_qp: infeasible: expected 'fail' or 'closest', got "
                         f"{infeasible!r}.")
    if (A is None) != (b is None):
        raise StructureError("solve_qp: A and b go together: got "
                             f"{'A' if b is None else 'b'} without "
                             f"{'b' if b is None else 'A'}. Pass both, or neither.")
    if (G is None) != (h is None):
        raise StructureError("solve_qp: G and h go together: got "
                             f"{'G' if h is None else 'h'} without "
                             f"{'h' if h is None else 'G'}. Pass both, or neither.")
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"solve_qp: tol: expected a number in (0, 1), got {tol!r}.")
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int)
                                or maxiter < 1):
        raise ValueError(f"solve_qp: maxiter: expected a positive int, got {maxiter!r}.")
    on_failure = resolve_on_failure(on_failure, "solve_qp: on_failure")
    given = [a for a in (Q, q, A, b, G, h) if a is not None]
    bk = get_backend(*given)
    Q, q, A, b, G, h = convert_constants(bk, (Q, q, A, b, G, h))
    if not hasattr(q, "shape") or q.ndim < 1:
        raise StructureError(f"solve_qp: q: expected an array of shape (..., n), got "
                             f"{getattr(q, 'shape', type(q).__name__)}.")
    xp = bk.namespace(q)
    n = int(q.shape[-1])
    if A is None:
        A, b = xp.zeros((0, n), dtype=q.dtype), xp.zeros((0,), dtype=q.dtype)
    if G is None:
        G, h = xp.zeros((0, n), dtype=q.dtype), xp.zeros((0,), dtype=q.dtype)
    n, _p, _m, batch = _check_inputs(bk, Q, q, A, b, G, h)
    if solve is None:  # the KKT layout: x and y stay, inactive multipliers and status go
        solve = _ReducedDense(keep=n + _p)
    fn = qp_function(solver=solver, tol=tol, maxiter=maxiter, on_failure=on_failure,
                     solve=solve, batch_dims=len(batch))
    (x, y, z, ok), aux = fn(Q, q, A, b, G, h)
    if infeasible == "closest":
        (x, y, z, ok), aux = _closest(bk, fn, (Q, q, A, b, G, h), batch, aux, (x, y, z, ok))
    x, y, z = bk.handle_failure((x, y, z), ok > 0.5, on_failure,
                                lambda st: _failure(st, batch), aux["status"])
    if not full_output:
        return x
    return QPSolution(x, y, z, QPStats(**aux))


def _closest(bk: Backend, fn: ImplicitFunction, theta: tuple, batch: tuple, aux: dict,
             w: tuple) -> tuple[tuple, dict]:
    """`infeasible="closest"`: solve the primal infeasible samples' closest feasible problems.

    The closest feasible data are the projection of $(b, h)$ onto
    $\\{(Ax, Gx + \\sigma): \\sigma \\ge 0\\}$: with the rows V it loosens (found on the host,
    `stats.violated`), $C = [A; G_V]$ and $d = [b; h_V]$, the projection is $C C^+ d$ (and $h$
    unchanged off V). It is computed here in the framework's operations, so the derivative of
    the shift with respect to A, b, G, h is exact wherever V and the rank of C are locally
    constant; the shifted problem is then solved and differentiated like any other. The
    shifted problem's tight rows are dependent (its feasible set has no interior there): the
    forward solve takes basic multipliers and, since the shifted data stay consistent under
    perturbation, the derivative is that of the composed map."""
    Q, q, A, b, G, h = theta
    xp = bk.namespace(q)
    st = aux["status"]
    traced = bk.is_traced((st, q))
    if not traced and not np.any(np.asarray(st) == PRIMAL_INFEASIBLE):
        return w, aux
    n, p, m = int(q.shape[-1]), int(A.shape[-2]), int(G.shape[-2])
    if traced:
        V = xp.astype(aux["violated"], q.dtype)
        shifted = xp.astype(st == PRIMAL_INFEASIBLE, q.dtype)
    else:
        dt = numpy_dtype(q)
        V, shifted = bk.from_host((np.asarray(aux["violated"], dtype=dt),
                                   np.asarray(np.asarray(st) == PRIMAL_INFEASIBLE, dtype=dt)),
                                  like=q)
    Ab = xp.broadcast_to(A, (*batch, p, n))
    C = xp.concat([Ab, V[..., None] * xp.broadcast_to(G, (*batch, m, n))], axis=-2)
    d = xp.concat([xp.broadcast_to(b, (*batch, p)), V * xp.broadcast_to(h, (*batch, m))],
                  axis=-1)
    proj = _mv(C, _mv(xp.linalg.pinv(C), d))
    shift = shifted[..., None] * (proj - d)  # zero off V (those rows of C and d are zero)
    b2, h2 = b + shift[..., :p], h + shift[..., p:]
    w2, aux2 = fn(Q, q, A, b2, G, h2)
    aux2 = dict(aux2)
    st2 = aux2["status"]
    if traced:
        closest = (st == PRIMAL_INFEASIBLE) & (st2 == SOLVED)
        aux2["status"] = xp.where(closest, xp.full_like(st2, CLOSEST), st2)
    else:
        st2 = np.asarray(st2)
        aux2["status"] = np.where((np.asarray(st) == PRIMAL_INFEASIBLE) & (st2 == SOLVED),
                                  CLOSEST, st2).astype(st2.dtype)
    aux2["violated"] = aux["violated"]
    return w2, aux2


def _dims(Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> tuple[int, int, int, tuple]:
    n, p, m = int(q.shape[-1]), int(A.shape[-2]), int(G.shape[-2])
    batch = tuple(np.broadcast_shapes(tuple(Q.shape)[:-2], tuple(q.shape)[:-1],
                                      tuple(A.shape)[:-2], tuple(b.shape)[:-1],
                                      tuple(G.shape)[:-2], tuple(h.shape)[:-1]))
    return n, p, m, batch


def _specs(Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> tuple:
    n, p, m, batch = _dims(Q, q, A, b, G, h)
    dt = numpy_dtype(q)
    return ((ArraySpec((*batch, n), dt), ArraySpec((*batch, p), dt), ArraySpec((*batch, m), dt),
             ArraySpec(batch, dt)),
            {"iterations": ArraySpec(batch, np.int32), "status": ArraySpec(batch, np.int32),
             "primal_residual": ArraySpec(batch, dt), "dual_residual": ArraySpec(batch, dt),
             "gap": ArraySpec(batch, dt), "active": ArraySpec((*batch, m), np.bool_),
             "degenerate": ArraySpec(batch, np.bool_),
             "violated": ArraySpec((*batch, m), np.bool_)})


_FUNCTIONS: dict = {}


def qp_function(*, solver: str = "ipm", tol: float | None = None, maxiter: int | None = None,
                on_failure: str | None = None, solve: AbstractLinearSolver | None = None,
                batch_dims: int = 0) -> ImplicitFunction:
    """The `idf.custom_root` solver behind `solve_qp`, for `idf.vjp`, `idf.jvp` and
    `idf.jacobian` with NumPy arrays (which differentiate decorated solvers, not compositions).

    `f = qp_function(...)`; `f(Q, q, A, b, G, h)` returns `((x, y, z, ok), stats)`: every input
    is required (zero-row `A`, `b`, `G`, `h` for absent constraints), `ok` is 1 for a solved
    sample and 0 for a failed one (whose x, y, z are 0: `on_failure` is `solve_qp`'s business),
    `stats` a dict of the `QPStats` fields. Cotangents and tangents are 4-tuples like the
    output. `batch_dims`: the number of leading batch dimensions of the outputs (the
    broadcast batch shape of the inputs). The other options are `solve_qp`'s.

    ```python
    import numpy as np
    import implicitdiff as idf

    Q, q = np.eye(2), np.array([-1.0, -1.0])
    A, b = np.zeros((0, 2)), np.zeros(0)
    G, h = np.array([[1.0, 1.0]]), np.array([1.0])
    (w, stats), pullback = idf.vjp(idf.qp.qp_function(), Q, q, A, b, G, h)
    dQ, dq, dA, db, dG, dh = pullback((np.ones(2), np.zeros(0), np.zeros(1), np.array(0.0)))
    ```
    """
    key = (solver, tol, maxiter, on_failure, solve, batch_dims)
    try:
        hit = _FUNCTIONS.get(key)
    except TypeError:  # an unhashable linear solver
        hit, key = None, None
    if hit is not None:
        return hit
    tol_ = 1e-9 if tol is None else float(tol)
    maxiter_ = 100 if maxiter is None else maxiter
    # the backward may reuse the polish's factorization where it would solve the same system
    # with the same checks: the default solver (`implicitdiff._factored`)
    reuse = solve is None or (type(solve) is _ReducedDense and solve.rtol is None
                              and solve.atol == 0 and solve.ridge == 0 and solve.check_singular)

    def solve_qp_host(Q: Any, q: Any, A: Any, b: Any, G: Any, h: Any) -> Any:
        theta = (Q, q, A, b, G, h)
        on_host = all(isinstance(a, np.ndarray) for a in theta)
        bk = None if on_host else get_backend(*theta)
        th = theta if bk is None else tuple(bk.to_host(a) for a in theta)
        dtype = numpy_dtype(q)
        keep: dict | None = {} if reuse and bk is not None else None
        with np.errstate(all="ignore"), one_blas_thread():  # failures overflow; status says
            w, aux = _host_solve(*th, tol=tol_, maxiter=maxiter_,
                                 check_eps=float(np.finfo(dtype).eps), solver=solver, keep=keep)
        specs = _specs(*th)
        w = tuple(np.asarray(a, dtype=dtype) for a in w)
        if keep and "fast" in keep:
            B = keep["fast"].data[1].shape[0]
            publish(KKTFactorization(keep["fast"], (*(np.reshape(a, (B, -1)) for a in w[:3]),
                                                    np.reshape(w[3], (B,)))))
        aux = {k: np.asarray(v, dtype=specs[1][k].dtype) for k, v in aux.items()}
        return (w, aux) if bk is None else (bk.from_host(w, like=q), aux)

    def result_shape(*theta: Any) -> Any:
        return get_backend(*theta).callback_result_shape(_specs(*theta))

    fn = custom_root(kkt_condition, solve=_ReducedDense() if solve is None else solve,
                     has_aux=True, residual_tol=None, on_failure=on_failure,
                     derivatives=_DERIVATIVES, result_shape=result_shape,
                     batch_dims=batch_dims, kink_probe=False)(solve_qp_host)
    if key is not None:
        _FUNCTIONS[key] = fn
    return fn
