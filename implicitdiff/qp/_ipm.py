"""The host side of `idf.qp.solve_qp`: a batched primal-dual interior-point method in NumPy
(float64), the polish of its answer on the identified active set, and the certificates of
infeasibility and unboundedness.

Everything here takes and returns NumPy arrays with one leading batch dimension `B`:
`Q (B, n, n)`, `q (B, n)`, `A (B, p, n)`, `b (B, p)`, `G (B, m, n)`, `h (B, m)`.

The problem is  min ½xᵀQx + qᵀx  s.t.  Ax = b, Gx + s = h, s ≥ 0, with multipliers y (of
Ax = b) and z ≥ 0 (of Gx ≤ h):  Qx + q + Aᵀy + Gᵀz = 0,  z∘s = 0.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

SOLVED = 0
"""Status: solved to the tolerance (`QPStats.status`)."""
PRIMAL_INFEASIBLE = 1
"""Status: no point satisfies the constraints (a certificate of primal infeasibility)."""
DUAL_INFEASIBLE = 2
"""Status: the objective is unbounded below on the feasible set (dual infeasible)."""
MAX_ITER = 3
"""Status: the iteration limit was reached before the tolerance."""
CLOSEST = 4
"""Status: infeasible, and `infeasible="closest"` solved its closest feasible problem."""
STATUS_NAMES = {SOLVED: "solved", PRIMAL_INFEASIBLE: "primal infeasible",
                DUAL_INFEASIBLE: "dual infeasible (unbounded)", MAX_ITER: "not converged",
                CLOSEST: "infeasible, closest feasible problem solved"}
"""The status codes of `QPStats.status` by name."""



def _mv(M: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (M @ v[..., None])[..., 0]


def _mtv(M: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (v[..., None, :] @ M)[..., 0, :]


def _gtdg(G: np.ndarray, D: np.ndarray | None = None) -> np.ndarray:
    """Gᵀ diag(D) G, batched, through BLAS."""
    return np.swapaxes(G, 1, 2) @ (G if D is None else G * D[:, :, None])


def _inf(a: np.ndarray) -> np.ndarray:
    """max |a| over every axis but the first (0 for size-0 rows)."""
    if a.shape[1] == 0:
        return np.zeros(a.shape[0])
    axes = tuple(range(1, a.ndim))
    return np.maximum(np.max(a, axis=axes), -np.min(a, axis=axes))


def _max_step(v: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """The largest α ≤ 1 with v + α dv ≥ 0, per row (v > 0)."""
    if v.shape[1] == 0:
        return np.ones(v.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(dv < 0, -v / dv, np.inf)
    return np.minimum(1.0, np.min(r, axis=1))


def _solve_many(M: np.ndarray, R: np.ndarray) -> np.ndarray:
    """`_solve` for right-hand sides with a trailing column axis, `R` (B, n, c)."""
    try:
        return np.linalg.solve(M, R)
    except np.linalg.LinAlgError:
        out = np.full_like(R, np.nan)
        for i in range(M.shape[0]):
            try:
                out[i] = np.linalg.solve(M[i], R[i])
            except np.linalg.LinAlgError:
                pass
        return out


def _solve(M: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Batched `M x = r`; rows whose matrix is singular get NaN instead of failing the batch."""
    return _solve_many(M, r[..., None])[..., 0]


def _lapack() -> Any:
    """SciPy's LAPACK wrappers, or None without SciPy (an optional dependency)."""
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - SciPy is installed wherever the tests run
        return None
    return lapack


def _factor(M: np.ndarray, spd: bool = False):
    """`r -> M⁻¹ r` for a batch of matrices. `spd` (the interior point's Newton matrix
    $Q + G^\\top D G + \\text{reg}\\,I$ when there are no equality rows): one Cholesky
    factorization per sample (NumPy's batched `cholesky`: LAPACK `potrf`, looped in C),
    reused by every right-hand side of the iteration (`potrs`): at n = 75, batch 32, 0.45 ms
    to factor and 0.13 ms per right-hand side, against 1.0 ms per right-hand side for a
    batched `np.linalg.solve`, which factors again each time. Otherwise, or where a
    factorization fails (not positive definite in rounding) or without SciPy: one batched
    `np.linalg.solve` per right-hand side (SciPy's batched `lu_factor` loops in Python, which
    measured slower)."""
    lapack = _lapack() if spd and M.shape[0] else None
    if lapack is None:
        return lambda r: _solve(M, r)
    try:
        L = np.linalg.cholesky(M)  # one call for the batch (LAPACK potrf per sample, in C)
    except np.linalg.LinAlgError:
        return lambda r: _solve(M, r)
    if not np.all(np.isfinite(L)):
        return lambda r: _solve(M, r)
    U = np.swapaxes(L, 1, 2)  # Fortran-ordered views of the lower factors: no copies

    def solve(r: np.ndarray) -> np.ndarray:
        out = np.empty_like(r)
        for k in range(len(U)):
            out[k], _ = lapack.dpotrs(U[k], r[k], lower=0)
        return out

    return solve


def _direction(solve_m: Any, G: Any, D: Any, s: Any, ri: Any, rd: Any, rp: Any, reg: Any,
               n: int, rc: Any, refine: bool = True) -> tuple[Any, Any, Any, Any]:
    """The Newton direction `(dx, dy, dz, ds)` of the interior-point step with complementarity
    right-hand side `rc`, from the factorization `solve_m` of the reduced KKT matrix."""
    r1 = -rd - _mtv(G, D * ri - rc / s)
    d = solve_m(np.concatenate([r1, -rp], axis=1))
    if refine:
        # one step of iterative refinement against the unregularized system (the
        # regularization would otherwise stall the residuals at its own size)
        corr = np.concatenate([d[:, :n], -d[:, n:]], axis=1) * reg[:, None]
        d = d + solve_m(corr)
    dx, dy = d[:, :n], d[:, n:]
    ds = -ri - _mv(G, dx)
    dz = -D * ds - rc / s
    return dx, dy, dz, ds


def ipm(Q, q, A, b, G, h, *, tol: float, maxiter: int, keep: dict | None = None):
    """Mehrotra predictor-corrector on a batch; each problem stops on its own.

    Returns `(x, y, z, s, it, converged, scale)`; non-converged rows hold their last iterate
    (infeasible and unbounded problems overflow on their way: that is expected, hence the
    silenced floating-point warnings). `keep`: a dict that receives the null-space basis when
    that path ran (for `ActiveKKT`)."""
    with np.errstate(all="ignore"):
        if 0 < A.shape[1] < A.shape[2]:
            reduced = _ipm_null_space(Q, q, A, b, G, h, tol=tol, maxiter=maxiter, keep=keep)
            if reduced is not None:
                return reduced
        return _ipm(Q, q, A, b, G, h, tol=tol, maxiter=maxiter)


def null_space_basis(A):
    """`(Y, Z, Rp)` with $A^\\top = [Y\\ Z] [R_p; 0]$ (complete QR, batched): Y spans the row
    space of A, Z its null space. None where some sample's A is rank-deficient (a diagonal of
    $R_p$ below 1e-10 of its largest).

    The orthogonal factor is formed from LAPACK's Householder reflectors (`qr(mode="raw")`) in
    the compact WY form $H = I - V T V^\\top$, with $T^{-1}$ the strictly upper part of
    $V^\\top V$ plus $\\operatorname{diag}(1/\\tau)$: three batched products instead of
    LAPACK's `orgqr` sample by sample (1.8 against 2.9 ms at n = 100, p = 25, batch 32); the
    same matrix to rounding."""
    _, p, n = A.shape
    h, tau = np.linalg.qr(np.swapaxes(A, 1, 2), mode="raw")  # h: the reflectors, transposed
    V = np.swapaxes(h, 1, 2).copy()                         # (B, n, p)
    Rp = np.triu(V[:, :p, :])
    d = np.abs(np.diagonal(Rp, axis1=1, axis2=2))
    if not np.all(d.min(axis=1, initial=np.inf) > 1e-10 * np.maximum(d.max(axis=1, initial=0.0),
                                                                       1e-300)):
        return None
    ar = np.arange(p)
    V[:, :p, :] = np.tril(V[:, :p, :], -1)
    V[:, ar, ar] = 1.0
    Vt = np.swapaxes(V, 1, 2)
    # tau = 0 is a reflector that is the identity (a column already in place): it is left
    # out, its row and column of T zero (and of T^-1, but for a finite diagonal)
    ok = tau != 0
    both = ok[:, :, None] & ok[:, None, :]
    Tinv = np.triu(Vt @ V, 1) * both
    Tinv[:, ar, ar] = np.where(ok, 1.0 / np.where(ok, tau, 1.0), 1.0)
    T = np.linalg.inv(Tinv) * both
    H = -((V @ T) @ Vt)
    H[:, np.arange(n), np.arange(n)] += 1.0
    return H[:, :, :p], H[:, :, p:], Rp


def _ipm_null_space(Q, q, A, b, G, h, *, tol: float, maxiter: int, keep: dict | None = None):
    """The interior point on the null space of A: with $A^\\top = [Y\\ Z] R$ (QR),
    $x = x_0 + Zv$, $Ax_0 = b$, the equality constraints vanish and each Newton system has
    $n - p$ unknowns instead of $n + p$ (about $((n+p)/(n-p))^3$ times less work). None where
    some sample's A is rank-deficient (then the full system serves the whole batch); the polish
    that follows works on the original problem, so nothing downstream depends on this path."""
    B, p, n = A.shape
    basis = null_space_basis(A)
    if basis is None:
        return None
    Y, Z, Rp = basis
    Zt = np.swapaxes(Z, 1, 2)
    x0 = _mv(Y, _solve(np.swapaxes(Rp, 1, 2), b))
    Qz = Zt @ Q @ Z
    qz = _mv(Zt, _mv(Q, x0) + q)
    Gz = G @ Z
    hz = h - _mv(G, x0)
    if keep is not None:
        keep.update(Y=Y, Z=Z, Rp=Rp, Qz=Qz, Gz=Gz)
    none = np.zeros((B, 0, n - p)), np.zeros((B, 0))
    v, _, z, s, it, conv, _ = _ipm(Qz, qz, *none, Gz, hz, tol=tol, maxiter=maxiter)
    x = x0 + _mv(Z, v)
    r = _mv(Q, x) + q + _mtv(G, z)
    y = _solve(Rp, -_mtv(Y, r))  # Aᵀy = -r on range(Aᵀ)
    return x, y, z, s, it, conv, data_scale(Q, q, A, b, G, h)


def data_scale(Q, q, A, b, G, h) -> np.ndarray:
    """1 + the largest entry of each sample's data: the scale of the tolerances."""
    B = q.shape[0]
    return 1.0 + np.maximum.reduce([_inf(q), _inf(b), _inf(h), _inf(Q.reshape(B, -1)),
                                    _inf(A.reshape(B, -1)), _inf(G.reshape(B, -1))])


def _ipm(Q, q, A, b, G, h, *, tol: float, maxiter: int):
    B, n = q.shape
    p, m = b.shape[1], h.shape[1]
    scale = data_scale(Q, q, A, b, G, h)
    reg = 1e-9 * scale
    # start: the equality-constrained least-squares point of Q + GᵀG
    eye_n = np.eye(n)
    K0 = np.zeros((B, n + p, n + p))
    K0[:, :n, :n] = Q + _gtdg(G) + reg[:, None, None] * eye_n
    K0[:, :n, n:] = np.swapaxes(A, 1, 2)
    K0[:, n:, :n] = A
    K0[:, n:, n:] = -reg[:, None, None] * np.eye(p)
    # (without equality rows K0 is positive definite: a Cholesky factorization, half an LU)
    w = _factor(K0, spd=not p)(np.concatenate([-q + _mtv(G, h), b], axis=1))
    w = np.where(np.isfinite(w), w, 0.0)
    x, y = w[:, :n], w[:, n:]
    s = h - _mv(G, x)
    if m:
        shift = np.maximum(0.0, 1.0 - np.min(s, axis=1))
        s = s + shift[:, None]
    z = np.ones((B, m))
    it = np.zeros(B, dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    diag_n = np.arange(n)
    KK = np.zeros((B, n + p, n + p))
    KK[:, :n, n:] = np.swapaxes(A, 1, 2)
    KK[:, n:, :n] = A
    KK[:, n:, n:] = -reg[:, None, None] * np.eye(p)
    for k in range(maxiter + 1):
        rd = _mv(Q, x) + q + _mtv(A, y) + _mtv(G, z)
        rp = _mv(A, x) - b
        ri = _mv(G, x) + s - h
        mu = (np.sum(s * z, axis=1) / m) if m else np.zeros(B)
        ok = ((_inf(rd) <= tol * scale) & (_inf(rp) <= tol * scale) & (_inf(ri) <= tol * scale)
              & (mu <= tol * scale))
        done |= ok | ~np.isfinite(mu) | ~np.isfinite(_inf(rd))
        # complementarity collapsed while the residuals stall: no further progress possible
        done |= (mu < 1e-6 * tol * scale) & ~ok & (k > 0)
        # diverging multipliers or iterate: the mark of an infeasible or unbounded problem
        # (`infeasibility` then decides which)
        done |= np.maximum.reduce([_inf(x), _inf(y), _inf(z)]) > 1e9 * scale
        if k == maxiter or done.all():
            break
        i = np.nonzero(~done)[0]
        it[i] += 1
        every = len(i) == B  # no copies of the matrices while every sample runs
        Qi, Gi = (Q, G) if every else (Q[i], G[i])
        si, zi = s[i], z[i]
        D = zi / si
        H = _gtdg(Gi, D)
        H += Qi
        H[:, diag_n, diag_n] += reg[i, None]
        if p:
            M = KK[i]  # a copy (fancy indexing)
            M[:, :n, :n] = H
        else:
            M = H

        solve_m = _factor(M, spd=not p)

        direction = functools.partial(_direction, solve_m, Gi, D, si, ri[i], rd[i], rp[i],
                                      reg[i], n)

        dx, dy, dz, ds = direction(si * zi, refine=not m)  # the predictor: only for sigma
        if m:
            a_aff = np.minimum(_max_step(si, ds), _max_step(zi, dz))
            mu_i = mu[i]
            mu_aff = np.sum((si + a_aff[:, None] * ds) * (zi + a_aff[:, None] * dz), axis=1) / m
            sigma = np.clip(mu_aff / np.maximum(mu_i, 1e-300), 0.0, 1.0) ** 3
            # the refinement removes the regularization's error (1e-9 of the data's scale): a
            # looser tolerance does not see it, and the polish makes the answer exact anyway
            dx, dy, dz, ds = direction(si * zi + ds * dz - (sigma * mu_i)[:, None],
                                       refine=tol < 1e-7)
            alpha = np.minimum(1.0, 0.99 * np.minimum(_max_step(si, ds), _max_step(zi, dz)))
        else:
            alpha = np.ones(len(i))
        a = alpha[:, None]
        x[i] += a * dx
        y[i] += a * dy
        z[i] += a * dz
        s[i] += a * ds
    conv = np.zeros(B, dtype=bool)
    rd = _mv(Q, x) + q + _mtv(A, y) + _mtv(G, z)
    conv = ((_inf(rd) <= tol * scale) & (_inf(_mv(A, x) - b) <= tol * scale)
            & (_inf(_mv(G, x) + s - h) <= tol * scale)
            & (((np.sum(s * z, axis=1) / m) if m else np.zeros(B)) <= tol * scale))
    return x, y, z, s, it, conv, scale


def kkt_matrix(Q, A, G, active):
    """The symmetric active-set KKT matrix, inactive rows reduced to the identity on z_i."""
    B, n = Q.shape[0], Q.shape[1]
    p, m = A.shape[1], G.shape[1]
    N = n + p + m
    K = np.zeros((B, N, N))
    act = active.astype(np.float64)
    K[:, :n, :n] = Q
    K[:, :n, n:n + p] = np.swapaxes(A, 1, 2)
    K[:, n:n + p, :n] = A
    GA = G * act[:, :, None]
    K[:, :n, n + p:] = np.swapaxes(GA, 1, 2)
    K[:, n + p:, :n] = GA
    idx = np.arange(m)
    K[:, n + p + idx, n + p + idx] = 1.0 - act
    return K


def _solve_active(Q, q, A, b, G, h, active):
    """The KKT point of the equality-constrained QP of `active`, and whether the solve is
    trustworthy (finite, and its residual at rounding relative to |K||w| + |rhs|)."""
    n, p = q.shape[1], b.shape[1]
    K = kkt_matrix(Q, A, G, active)
    rhs = np.concatenate([-q, b, np.where(active, h, 0.0)], axis=1)
    w = _solve(K, rhs)
    good = np.all(np.isfinite(w), axis=1)
    wf = np.where(np.isfinite(w), w, 0.0)
    size = _inf(_mv(np.abs(K), np.abs(wf))) + _inf(rhs)
    good &= _inf(_mv(K, wf) - rhs) <= 1e-8 * np.maximum(size, 1e-300)
    return wf[:, :n], wf[:, n:n + p], wf[:, n + p:], good


def _lower_inverse(L: np.ndarray) -> np.ndarray:
    """The inverses of a batch of lower triangular matrices: LAPACK `trtri` per sample (a
    third of the work of the LU `np.linalg.inv` does), or `np.linalg.inv` without SciPy."""
    lapack = _lapack()
    if lapack is None or not np.all(np.isfinite(L)):
        return np.linalg.inv(L)
    out = np.empty_like(L)
    for k, Lk in enumerate(L):
        inv, info = lapack.dtrtri(Lk, lower=1)
        if info != 0:
            return np.linalg.inv(L)
        out[k] = inv
    return out


class ActiveKKT:
    """Repeated solves of the active-set KKT system of one batch, for the polish's rounds.

    With $A^\\top = Y R$ (QR; $Z$ spans the null space of A), $Q_Z = Z^\\top Q Z = LL^\\top$
    (Cholesky) and $W = L^{-1} (GZ)^\\top$, the system
    $[[Q, A^\\top, G_S^\\top], [A, 0, 0], [G_S, 0, 0]]\\,(x, y, z_S) = (f, g, k_S)$ reduces to the
    Schur complement $(W^\\top W)_{SS} z_S = \\ldots$ on the active rows (formed from W's
    columns of those rows at each solve): the O(n³) work is done once per batch (and the
    interior point's null-space basis is reused), and each active set costs one |S| × |S|
    solve instead of an LU of the whole (n + p + m) system per round. One step of iterative
    refinement against the original system brings the answer to rounding where it is not
    there already.
    `ok` is False where this does not apply (Q not positive definite on the null space of A, A
    rank-deficient, no constraint rows): `_solve_active` serves those batches."""

    def __init__(self, Q, q, A, b, G, h, basis: dict | None = None):
        n, p = q.shape[1], b.shape[1]
        self.data = (Q, q, A, b, G, h)
        self.ok = False
        self.Y = self.Z = self.Rinv = None
        if G.shape[1] == 0 or p >= n:
            return
        try:
            if p and basis:  # the interior point's null-space basis, for this very batch
                self.Y, self.Z = basis["Y"], basis["Z"]
                self.Rinv = np.linalg.inv(basis["Rp"])
                Qz, Gz = basis["Qz"], basis["Gz"]
            elif p:
                own = null_space_basis(A)
                if own is None:
                    return
                self.Y, self.Z, Rp = own
                self.Rinv = np.linalg.inv(Rp)
                Qz = np.swapaxes(self.Z, 1, 2) @ Q @ self.Z
                Gz = G @ self.Z
            else:
                Qz, Gz = Q, G
            L = np.linalg.cholesky(Qz)
            self.Linv = _lower_inverse(L)
        except np.linalg.LinAlgError:
            return
        if not np.all(np.isfinite(self.Linv)):
            return
        self.p = p
        self.W = self.Linv @ np.swapaxes(Gz, 1, 2)  # (B, n - p, m)
        self.absQ, self.absA, self.absG = np.abs(Q), np.abs(A), np.abs(G)
        self.ok = True

    def _take(self, a, i):
        return a if len(i) == a.shape[0] else a[i]  # `i` is sorted and unique: all = no copy

    def _raw(self, i, act, f, g, k):
        """One solve of the system for samples `i` with active mask `act` (rows off the
        active set: z_i = 0), for right-hand sides with a trailing column axis:
        `f` (b, n, c), `g` (b, p, c), `k` (b, m, c)."""
        Q, _, _, _, G, _ = self.data
        Qi, Gi = self._take(Q, i), self._take(G, i)
        Y, Z, Rinv = (self._take(a, i) if self.p else None for a in (self.Y, self.Z, self.Rinv))
        if Y is not None and Z is not None and Rinv is not None:
            x0 = Y @ (np.swapaxes(Rinv, 1, 2) @ g)  # A x0 = g  (A = Rpᵀ Yᵀ)
            fz = np.swapaxes(Z, 1, 2) @ (f - Qi @ x0)
        else:
            x0, fz = np.zeros_like(f), f
        kz = np.where(act[:, :, None], k - Gi @ x0, 0.0)
        Linv, W = self._take(self.Linv, i), self._take(self.W, i)
        c = Linv @ fz
        # the Schur system on the active rows only: each sample's active rows first, padded to
        # the batch's largest active set with identity rows
        z = np.zeros_like(kz)
        k_max = int(act.sum(axis=1).max(initial=0))
        if k_max:
            order = np.argsort(~act, axis=1, kind="stable")[:, :k_max]
            a = np.take_along_axis(act, order, 1).astype(np.float64)
            # W's columns of the active rows (zero in the padding): the Schur complement
            # (W^T W)_SS is formed for them alone
            Wa = np.take_along_axis(W, order[:, None, :], 2) * a[:, None, :]
            Wat = np.swapaxes(Wa, 1, 2)
            S = Wat @ Wa
            S[:, np.arange(k_max), np.arange(k_max)] += 1.0 - a
            rhs = (Wat @ c - np.take_along_axis(kz, order[:, :, None], 1)) * a[:, :, None]
            sol = _solve_many(S, rhs) * a[:, :, None]
            np.put_along_axis(z, order[:, :, None], sol, 1)
            c = c - Wa @ sol
        v = np.swapaxes(Linv, 1, 2) @ c
        if Y is not None and Z is not None and Rinv is not None:
            x = x0 + Z @ v
            y = Rinv @ (np.swapaxes(Y, 1, 2) @ (f - Qi @ x - np.swapaxes(Gi, 1, 2) @ z))
        else:
            x, y = v, np.zeros((len(i), 0, f.shape[2]))
        return x, y, z

    def solve(self, i, active):
        """`_solve_active` for samples `i`: `(x, y, z, good)`."""
        _, q, _, b, _, h = (self._take(a, i) for a in self.data)
        x, y, z, good, _ = self.solve_many(i, active, -q[:, :, None], b[:, :, None],
                                           np.where(active, h, 0.0)[:, :, None])
        return x[:, :, 0], y[:, :, 0], z[:, :, 0], good

    def solve_many(self, i, active, f, g, k):
        """The system $[[Q, A^\\top, G_S^\\top], [A, 0, 0], [G_S, 0, 0]]\\,(x, y, z_S) =
        (f, g, k_S)$ for samples `i` (active mask `active`; $z$ is 0 off it) and right-hand
        sides with a trailing column axis (`f` (b, n, c), `g` (b, p, c), `k` (b, m, c)), with
        one step of iterative refinement against the original system where the first answer's
        residual is not yet at rounding (8 ε of the size of the terms). Returns
        `(x, y, z, good, size)`: `good` per sample, all its columns finite and their residuals
        at rounding (1e-8 of `size`, the size of the terms of the system and of its right-hand
        side, per sample and column)."""
        Q, _, A, _, G, _ = (self._take(a, i) for a in self.data)
        act = active[:, :, None]
        aQ, aA, aG = (self._take(a, i) for a in (self.absQ, self.absA, self.absG))
        aAt, aGt = np.swapaxes(aA, 1, 2), np.swapaxes(aG, 1, 2)

        def big(a):  # per sample and column: the largest entry
            return np.max(np.abs(a), axis=1, initial=0.0)

        rhs_size = np.maximum.reduce([big(f), big(g), big(k)])

        def measure(x, y, z):
            r1, r2, r3 = self._residual(Q, A, G, act, x, y, z, f, g, k)
            fin = (np.isfinite(x).all(axis=(1, 2)) & np.isfinite(y).all(axis=(1, 2))
                   & np.isfinite(z).all(axis=(1, 2)))
            x, y, z = (np.where(np.isfinite(a), a, 0.0) for a in (x, y, z))
            ax, za = np.abs(x), np.abs(z)
            size = np.maximum.reduce([big(aQ @ ax + aAt @ np.abs(y) + aGt @ za), big(aA @ ax),
                                      big(np.where(act, aG @ ax, za))]) + rhs_size
            res = np.maximum.reduce([big(r1), big(r2), big(r3)])
            return (x, y, z), (r1, r2, r3), fin, size, res

        (x, y, z), r, fin, size, res = measure(*self._raw(i, active, f, g, k))
        eps = float(np.finfo(np.float64).eps)
        if not np.all(~fin[:, None] | (res <= 8 * eps * size)):
            dx, dy, dz = self._raw(i, active, *r)
            (x, y, z), r, fin, size, res = measure(x + dx, y + dy, z + dz)
        good = fin & np.all(res <= 1e-8 * np.maximum(size, 1e-300), axis=1)
        return x, y, z, good, size

    @staticmethod
    def _residual(Q, A, G, act, x, y, z, f, g, k):
        r1 = f - (Q @ x + np.swapaxes(A, 1, 2) @ y + np.swapaxes(G, 1, 2) @ z)
        r2 = g - A @ x
        r3 = np.where(act, k - G @ x, -z)
        return r1, r2, r3


def row_scales(Q, q, A, G, h, x, y, z, gn=None):
    """Scale-invariant yardsticks: per inequality row, the size of its primal terms
    ($|h_i| + \\|G_i\\|_\\infty \\|x\\|_\\infty$) and of its force in the stationarity
    condition ($z_i \\|G_i\\|_\\infty$), and per sample the size of the stationarity terms.
    `gn`: the rows' $\\|G_i\\|_\\infty$ when already known."""
    if gn is None:
        gn = np.max(np.abs(G), axis=2) if G.shape[2] else np.zeros(G.shape[:2])
    primal = np.abs(h) + gn * _inf(x)[:, None]
    force = np.abs(z) * gn
    stat = np.maximum.reduce([_inf(_mv(Q, x)), _inf(q), _inf(_mtv(A, y)),
                              np.max(force, axis=1, initial=0.0)])
    return primal, force, np.maximum(stat, 1e-300)


def polish(Q, q, A, b, G, h, x, y, z, s, scale, *, rounds: int = 6, tol: float = 1e-9,
           basis: dict | None = None, keep: dict | None = None):
    """Solve the equality-constrained QP of the identified active set exactly (to rounding).

    Starts from `z > s` and repairs the set (adds violated constraints, drops negative
    multipliers; both measured row by row, relative to the row's own terms, so the scaling of
    a row does not matter) for a few rounds. Returns `(x, y, z, active, ok)`; rows where no
    consistent active set was found keep the interior-point answer (`ok` False). `basis`:
    `ipm`'s `keep` for this batch (saves refactoring A). `keep`: a dict that receives the
    batch's `ActiveKKT` (key "fast") where it applies, for the backward pass."""
    B = q.shape[0]
    active = z > s
    xo, yo, zo = x.copy(), y.copy(), np.where(active, np.maximum(z, 0.0), 0.0)
    ok = np.zeros(B, dtype=bool)
    todo = np.ones(B, dtype=bool)
    fast = ActiveKKT(Q, q, A, b, G, h, basis)
    if keep is not None and fast.ok:
        keep["fast"] = fast
    absG = fast.absG if fast.ok else np.abs(G)
    gn = np.max(absG, axis=2) if G.shape[2] else np.zeros(G.shape[:2])
    for _ in range(rounds):
        i = np.nonzero(todo)[0]
        if len(i) == 0:
            break
        Qi, qi, Ai, bi, Gi, hi = (a if len(i) == B else a[i] for a in (Q, q, A, b, G, h))
        if fast.ok:
            xi, yi, zi, good = fast.solve(i, active[i])
        else:
            xi, yi, zi, good = _solve_active(Qi, qi, Ai, bi, Gi, hi, active[i])
        primal, force, stat = row_scales(Qi, qi, Ai, Gi, hi, xi, yi, zi, gn[i])
        viol = (_mv(Gi, xi) - hi) > tol * primal
        neg = active[i] & (zi < 0) & (force > tol * stat[:, None])
        fine = good & ~viol.any(axis=1) & ~neg.any(axis=1)
        j = i[fine]
        xo[j], yo[j] = xi[fine], yi[fine]
        zo[j] = np.where(active[j], np.maximum(zi[fine], 0.0), 0.0)
        ok[j] = True
        todo[j] = False
        rep = i[good & ~fine]
        if len(rep):
            a = active[rep] | viol[good & ~fine]
            a &= ~neg[good & ~fine]
            if np.array_equal(a, active[rep]):
                todo[rep] = False
            active[rep] = a
        todo[i[~good]] = False
    # Linearly dependent active constraints (a degenerate vertex: more constraints active than
    # their rank, as at every integral vertex of a polytope): the active-set KKT matrix is
    # singular and the multipliers are not unique. Take basic ones: non-negative multipliers of
    # the nearly tight constraints by NNLS on the stationarity condition (with A's range
    # projected out), whose support is linearly independent; the other tight constraints are
    # then weakly active (zero multiplier). x* is the same point. Also where a round's solve
    # was accepted with more active rows (equalities included) than unknowns: its residual
    # test passes on such a consistent singular system by rounding, and the derivative's
    # solve would then meet a singular matrix (kept as it is where NNLS finds no basic set).
    crowded = ok & (active.sum(axis=1) + A.shape[1] > q.shape[1])
    ok &= ~crowded
    for k in np.nonzero(~ok)[0]:
        basic = _basic_active(Q[k], q[k], A[k], G[k], h[k], x[k], z[k], s[k], tol)
        if basic is None:
            continue
        xi, yi, zi, good = _solve_active(Q[k:k + 1], q[k:k + 1], A[k:k + 1], b[k:k + 1],
                                         G[k:k + 1], h[k:k + 1], basic[None])
        primal, force, stat = row_scales(Q[k:k + 1], q[k:k + 1], A[k:k + 1], G[k:k + 1],
                                         h[k:k + 1], xi, yi, zi)
        viol = (_mv(G[k:k + 1], xi) - h[k:k + 1]) > tol * primal
        neg = basic[None] & (zi < 0) & (force > tol * stat[:, None])
        if good[0] and not viol.any() and not neg.any():
            xo[k], yo[k] = xi[0], yi[0]
            zo[k] = np.where(basic, np.maximum(zi[0], 0.0), 0.0)
            active[k], ok[k] = basic, True
    ok |= crowded
    return xo, yo, zo, active, ok


def _basic_active(Q, q, A, G, h, x, z, s, tol):
    """The support of basic multipliers (one sample; see `polish`), or None without SciPy."""
    try:
        from scipy.optimize import nnls
    except ImportError:
        return None
    gn = np.max(np.abs(G), axis=1) if G.shape[1] else np.zeros(G.shape[0])
    primal = np.abs(h) + gn * np.max(np.abs(x), initial=0.0)
    # candidates: the constraints the interior point holds active, or nearly tight at x
    cand = np.nonzero((z > s) | (s <= np.sqrt(tol) * np.maximum(primal, 1e-300)))[0]
    if len(cand) == 0:
        return None
    r = Q @ x + q
    if A.shape[0]:
        # project out range(Aᵀ) (least squares: A may be rank-deficient)
        P = np.eye(len(r)) - np.linalg.pinv(A) @ A
    else:
        P = np.eye(len(r))
    try:
        zs, _ = nnls(P @ G[cand].T, -P @ r, maxiter=50 * len(cand) + 100)
    except (RuntimeError, ValueError):
        return None
    keep = np.zeros(G.shape[0], dtype=bool)
    pos = zs > 1e-12 * (1.0 + zs.max(initial=0.0))
    keep[_independent_rows(A, G, cand[pos][np.argsort(-zs[pos], kind="stable")])] = True
    return keep


def _independent_rows(A, G, order, rtol: float = 1e-10):
    """The rows of `G` in `order` (largest multiplier first) that, added one by one to A's
    rows, each raise their numerical rank (smallest singular value of the row-normalized
    stack above `rtol` times its largest, relative to what A's rows had). NNLS's support is
    linearly independent in exact arithmetic; in floating point a column that rounding
    makes look independent can enter it (three tight rows of a plane through a point of
    ℝ³, measured at rank three), and then the active-set KKT matrix is singular."""
    def rank(M):
        if M.shape[0] == 0:
            return 0
        M = M / np.maximum(np.linalg.norm(M, axis=1, keepdims=True), 1e-300)
        sv = np.linalg.svd(M, compute_uv=False)
        return int(np.sum(sv > rtol * sv[0])) if len(sv) and sv[0] > 0 else 0

    rows = [A[i] for i in range(A.shape[0])]
    r = rank(np.array(rows).reshape(len(rows), G.shape[1]))
    chosen = []
    for i in order:
        trial = np.array([*rows, G[i]])
        r2 = rank(trial)
        if r2 > r:
            rows.append(G[i])
            chosen.append(i)
            r = r2
    return np.array(chosen, dtype=int)


def weakly_active(Q, q, A, b, G, h, x, y, z, active, *, tol: float = 1e-9):
    """Per row: active with a multiplier whose force $z_i\\|G_i\\|$ is at rounding level
    against the stationarity terms (`weak`), and inactive with a slack at rounding level
    against the row's terms (`near`)."""
    primal, force, stat = row_scales(Q, q, A, G, h, x, y, z)
    weak = active & (force <= tol * stat[:, None])
    near = ~active & ((h - _mv(G, x)) <= tol * primal)
    return weak, near


def residuals(Q, q, A, b, G, h, x, y, z):
    """(primal, dual, gap) residuals per row."""
    rd = _inf(_mv(Q, x) + q + _mtv(A, y) + _mtv(G, z))
    sl = h - _mv(G, x)
    rp = np.maximum(_inf(_mv(A, x) - b), np.max(np.maximum(-sl, 0.0), axis=1) if sl.shape[1]
                    else np.zeros(len(q)))
    gap = _inf(z * sl)
    return rp, rd, gap


def closest_shift(A, b, G, h, *, tol: float, maxiter: int):
    """The least-squares shift (u, t) making  Ax = b + u, Gx ≤ h + t  feasible:
    min ½‖u‖² + ½‖t‖² over (x, u, t) (always feasible and bounded). Returns `(u, t, x)`."""
    B, p, n = A.shape
    m = G.shape[1]
    N = n + p + m
    Q1 = np.zeros((B, N, N))
    idx = np.arange(n, N)
    Q1[:, idx, idx] = 1.0
    Q1[:, :n, :n] = 1e-10 * np.eye(n)  # x only fixes the shift; keep the steps defined
    q1 = np.zeros((B, N))
    A1 = np.concatenate([A, -np.eye(p)[None].repeat(B, 0), np.zeros((B, p, m))], axis=2)
    G1 = np.concatenate([G, np.zeros((B, m, p)), -np.eye(m)[None].repeat(B, 0)], axis=2)
    x1, *_ = ipm(Q1, q1, A1, b, G1, h, tol=max(tol, 1e-9), maxiter=maxiter)
    return x1[:, n:n + p], x1[:, n + p:], x1[:, :n]


def infeasibility(Q, q, A, b, G, h, *, tol: float, maxiter: int, scale):
    """For problems the interior-point method did not solve: PRIMAL_INFEASIBLE where the
    least-squares shift making them feasible is not zero, DUAL_INFEASIBLE where a feasible
    problem has a direction d with Qd = 0, Ad = 0, Gd ≤ 0, qᵀd < 0 (searched in the box
    |d| ≤ 1), else MAX_ITER. Returns `(status, shift_b, shift_h)`."""
    B, n = q.shape
    p, m = b.shape[1], h.shape[1]
    u, t, _ = closest_shift(A, b, G, h, tol=min(tol, 1e-10), maxiter=maxiter)
    size = np.maximum(_inf(u), _inf(t))
    status = np.full(B, MAX_ITER)
    infeas = size > 1e-6 * scale
    status[infeas] = PRIMAL_INFEASIBLE
    rest = np.nonzero(~infeas)[0]
    if len(rest):
        # a descent direction of the recession cone: min qᵀd s.t. Qd = 0, Ad = 0, Gd ≤ 0, -1 ≤ d ≤ 1
        r = rest
        eye = np.eye(n)[None].repeat(len(r), 0)
        A2 = np.concatenate([Q[r], A[r]], axis=1)
        G2 = np.concatenate([G[r], eye, -eye], axis=1)
        h2 = np.concatenate([np.zeros((len(r), m)), np.ones((len(r), 2 * n))], axis=1)
        d, _, _, _, _, _, _ = ipm(1e-10 * eye, q[r], A2, np.zeros((len(r), n + p)), G2, h2,
                                  tol=1e-10, maxiter=maxiter)
        unb = np.sum(q[r] * d, axis=1) < -1e-6 * scale[r]
        status[r[unb]] = DUAL_INFEASIBLE
    return status, u, t


def closest_rows(A, b, G, h, *, tol: float, maxiter: int, scale, rounds: int = 8):
    """For primal infeasible problems: the inequality rows V that the least-squares shift
    (`closest_shift`) loosens, exactly. With $C = [A; G_V]$, $d = [b; h_V]$ and $\\hat x$ a
    least-squares solution of $Cx = d$, the shift is $C\\hat x - d$; V is right when that
    shift is $\\ge 0$ on V and $G\\hat x \\le h$ off V (the optimality conditions of the
    projection of (b, h) onto $\\{(Ax, Gx + \\sigma): \\sigma \\ge 0\\}$). Starts from the
    interior point's shift and repairs V for a few rounds (adds violated rows, drops rows whose
    shift is negative). Returns `(V, ok)`; `ok` False where no consistent V was found."""
    B = G.shape[0]
    _, t, x = closest_shift(A, b, G, h, tol=min(tol, 1e-10), maxiter=maxiter)
    V = t > 1e-8 * scale[:, None]
    ok = np.zeros(B, dtype=bool)
    for k in range(B):
        v = V[k]
        for _ in range(rounds):
            C = np.concatenate([A[k], G[k][v]])
            d = np.concatenate([b[k], h[k][v]])
            # the least-squares solution of C x = d nearest the interior point's x (they are
            # not unique; the rows off V must hold at one of them)
            xh = x[k] + (np.linalg.lstsq(C, d - C @ x[k], rcond=None)[0] if len(C) else 0.0)
            sl = G[k] @ xh - h[k]  # the shift on V; the violation off V
            tiny = 1e-9 * scale[k]
            viol = ~v & (sl > tiny)
            neg = v & (sl < -tiny)
            if not viol.any() and not neg.any():
                ok[k] = True
                break
            v = (v | viol) & ~neg
        V[k] = v
    return V & ok[:, None], ok
