"""Independent oracles for `idf.qp.solve_qp`: plain NumPy, no implicitdiff code at all.

- `make_qp` builds a convex QP  min ½xᵀQx + qᵀx  s.t.  Ax = b, Gx ≤ h  whose solution and active
  set are KNOWN by construction: pick x*, y*, the active rows S and z*_S ≥ 0.1 (zero off S), then
  b = Ax*, h = Gx* + slack (slack 0 on S, ≥ 0.1 off S) and q = −Qx* − Aᵀy* − Gᵀz*. The KKT
  conditions (multiplier convention Qx + q + Aᵀy + Gᵀz = 0, z ≥ 0, z∘(h − Gx) = 0) then hold
  at (x*, y*, z*) with strict complementarity, and x* is the unique minimizer when the KKT
  matrix below is nonsingular (checked). Weakly active rows (tight, zero multiplier) on request.
- `kkt_jvp` / `kkt_vjp`: the closed-form derivative on the strongly active set S,
      K = [[Q, Aᵀ, G_Sᵀ], [A, 0, 0], [G_S, 0, 0]],
      d(x, y, z_S) = −K⁻¹ (dQ x + dq + dAᵀy + dG_Sᵀ z_S,  dA x − db,  dG_S x − dh_S),
  dz = 0 off S. Reverse mode: u = K⁻ᵀ (x̄, ȳ, z̄_S) and
      Q̄ = −u₁xᵀ, q̄ = −u₁, Ā = −(y u₁ᵀ + u₂xᵀ), b̄ = u₂, Ḡ_S = −(z_S u₁ᵀ + u₃xᵀ), h̄_S = u₃
  (zero on the rows off S). Q̄ is the gradient of Q *as it appears in Qx* (not symmetrized);
  its symmetric part is the derivative along symmetric directions, whatever the convention.
- `active_set_solve`: the equality-constrained QP on a given active set, by one dense KKT solve —
  an independent forward solver, exact for perturbations small enough to keep S (used to test
  the oracle itself by finite differences).

This module must not import `implicitdiff` or any backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NAMES = ("Q", "q", "A", "b", "G", "h")


@dataclass
class KnownQP:
    """A QP with its solution (x, y, z) and the strongly active rows `active` (bool, (m,)).
    `weak` marks rows that are tight with zero multiplier (degenerate)."""

    Q: np.ndarray
    q: np.ndarray
    A: np.ndarray
    b: np.ndarray
    G: np.ndarray
    h: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    active: np.ndarray
    weak: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    # the scalings of a badly scaled draw (natural units: x = D x̃, y = c ỹ / R_A, z = c z̃ / R_G)
    D: np.ndarray | None = None
    RA: np.ndarray | None = None
    RG: np.ndarray | None = None
    c: float = 1.0

    def kkt_scale(self, S: np.ndarray) -> np.ndarray:
        """T with K = T K̃ T (K̃ the KKT matrix of the unscaled draw, up to the objective
        scale): the oracle solves with the equilibrated K̃, so its accuracy does not depend on
        the scaling."""
        D = np.ones(self.n) if self.D is None else self.D
        RA = np.ones(self.p) if self.RA is None else self.RA
        RG = np.ones(self.m) if self.RG is None else self.RG
        return np.concatenate([1.0 / D, RA, RG[S]])

    @property
    def n(self) -> int:
        return self.Q.shape[-1]

    @property
    def p(self) -> int:
        return self.A.shape[-2]

    @property
    def m(self) -> int:
        return self.G.shape[-2]

    def inputs(self) -> tuple:
        return (self.Q, self.q, self.A, self.b, self.G, self.h)


def spd(rng: np.random.Generator, n: int, lo: float = 1.0, hi: float = 4.0,
        rank: int | None = None) -> np.ndarray:
    """A symmetric matrix with eigenvalues in [lo, hi] (the last n − rank of them 0)."""
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    ev = rng.uniform(lo, hi, n)
    if rank is not None:
        ev[rank:] = 0.0
    Q = V @ np.diag(ev) @ V.T
    return (Q + Q.T) / 2


def kkt_matrix(Q: np.ndarray, A: np.ndarray, G: np.ndarray, S: np.ndarray) -> np.ndarray:
    """K = [[Q, Aᵀ, G_Sᵀ], [A, 0, 0], [G_S, 0, 0]]."""
    n, p = Q.shape[0], A.shape[0]
    GS = G[S]
    k = GS.shape[0]
    K = np.zeros((n + p + k, n + p + k))
    K[:n, :n] = Q
    K[:n, n:n + p] = A.T
    K[:n, n + p:] = GS.T
    K[n:n + p, :n] = A
    K[n + p:, :n] = GS
    return K


def make_qp(rng: np.random.Generator, n: int, p: int, m: int, n_active: int, *, n_weak: int = 0,
            rank: int | None = None, var_scale: np.ndarray | None = None,
            row_scale_A: np.ndarray | None = None, row_scale_G: np.ndarray | None = None,
            obj_scale: float = 1.0, max_cond: float = 1e3, Q: np.ndarray | None = None) -> KnownQP:
    """A QP with known solution and strongly active set (`n_active` rows, z ≥ 0.1, the other rows
    slack ≥ 0.1, except `n_weak` further rows tight with zero multiplier). Requires
    p + n_active + n_weak ≤ n (LICQ). The optional scalings make a badly scaled but equivalent
    problem: x = D x̃ (D = var_scale), rows of A and G scaled by row_scale_A/G, objective by
    obj_scale; the conditioning of the unscaled KKT matrix is kept below `max_cond`. A given `Q`
    (symmetric PSD) is used as is (for batches with a shared Q)."""
    Q_given = Q
    assert p + n_active + n_weak <= n and n_active + n_weak <= m
    for _ in range(200):
        Q = spd(rng, n, rank=rank) if Q_given is None else np.array(Q_given, dtype=float)
        A = rng.standard_normal((p, n))
        G = rng.standard_normal((m, n))
        rows = rng.permutation(m)
        S = np.zeros(m, bool)
        S[rows[:n_active]] = True
        W = np.zeros(m, bool)
        W[rows[n_active:n_active + n_weak]] = True
        K = kkt_matrix(Q, A, G, S | W)
        if np.linalg.cond(K) < max_cond:
            break
    else:  # pragma: no cover - the draw is generic
        raise AssertionError("could not draw a well-conditioned KKT matrix")
    x = rng.standard_normal(n)
    y = rng.standard_normal(p)
    z = np.where(S, rng.uniform(0.1, 2.0, m), 0.0)
    slack = np.where(S | W, 0.0, rng.uniform(0.1, 2.0, m))
    # the scalings: x = D x̃, A -> R_A A D⁻¹, G -> R_G G D⁻¹, Q -> c D⁻¹ Q D⁻¹
    D = np.ones(n) if var_scale is None else np.asarray(var_scale, float)
    RA = np.ones(p) if row_scale_A is None else np.asarray(row_scale_A, float)
    RG = np.ones(m) if row_scale_G is None else np.asarray(row_scale_G, float)
    c = float(obj_scale)
    Q = c * Q / D[:, None] / D[None, :]
    Q = (Q + Q.T) / 2
    A = RA[:, None] * A / D[None, :]
    G = RG[:, None] * G / D[None, :]
    x = D * x
    y = c * y / RA
    z = c * z / RG
    slack = RG * slack
    b = A @ x
    h = G @ x + slack
    q = -(Q @ x + A.T @ y + G.T @ z)
    scaled = var_scale is not None or row_scale_A is not None or row_scale_G is not None
    return KnownQP(Q, q, A, b, G, h, x, y, z, S, W, *((D, RA, RG, c) if scaled or c != 1.0
                                                      else (None, None, None, 1.0)))


def active_set_solve(Q, q, A, b, G, h, S) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve the KKT system on the active set S: an exact forward solver for small
    perturbations of a strictly complementary problem."""
    n, p, m = Q.shape[0], A.shape[0], G.shape[0]
    K = kkt_matrix(Q, A, G, S)
    w = np.linalg.solve(K, np.concatenate([-q, b, h[S]]))
    z = np.zeros(m)
    z[S] = w[n + p:]
    return w[:n], w[n:n + p], z


def kkt_jvp(P: KnownQP, dQ, dq, dA, db, dG, dh, S=None):
    """(dx, dy, dz) of the solution along the input direction, by the active-set KKT system."""
    S = P.active if S is None else S
    n, p, m = P.n, P.p, P.m
    K = kkt_matrix(P.Q, P.A, P.G, S)
    T = P.kkt_scale(S)
    x, y, z = P.x, P.y, P.z
    r1 = dQ @ x + dq + dA.T @ y + dG[S].T @ z[S]
    r2 = dA @ x - db
    r3 = dG[S] @ x - dh[S]
    r = np.concatenate([r1, r2, r3])
    w = -np.linalg.solve(K / T[:, None] / T[None, :], r / T) / T
    dz = np.zeros(m)
    dz[S] = w[n + p:]
    return w[:n], w[n:n + p], dz


def kkt_vjp(P: KnownQP, cx, cy, cz, S=None) -> dict:
    """The gradient of ⟨cx, x⟩ + ⟨cy, y⟩ + ⟨cz, z⟩ w.r.t. every input (Q as it appears in Qx,
    not symmetrized)."""
    S = P.active if S is None else S
    n, p, m = P.n, P.p, P.m
    K = kkt_matrix(P.Q, P.A, P.G, S)
    T = P.kkt_scale(S)
    c = np.concatenate([cx, cy, cz[S]])
    u = np.linalg.solve((K / T[:, None] / T[None, :]).T, c / T) / T
    u1, u2, u3 = u[:n], u[n:n + p], u[n + p:]
    x, y, z = P.x, P.y, P.z
    gG = np.zeros((m, n))
    gG[S] = -(np.outer(z[S], u1) + np.outer(u3, x))
    gh = np.zeros(m)
    gh[S] = u3
    return {"Q": -np.outer(u1, x), "q": -u1, "A": -(np.outer(y, u1) + np.outer(u2, x)),
            "b": u2, "G": gG, "h": gh}


def sym(M: np.ndarray) -> np.ndarray:
    """The symmetric part over the last two axes."""
    return (M + np.swapaxes(M, -1, -2)) / 2


def random_directions(rng: np.random.Generator, P: KnownQP, symmetric_Q: bool = True) -> tuple:
    """A random direction in every input (dQ symmetric unless asked otherwise)."""
    d = [rng.standard_normal(np.shape(a)) for a in P.inputs()]
    if symmetric_Q:
        d[0] = sym(d[0])
    return tuple(d)


def stack(problems: list[KnownQP]) -> KnownQP:
    """The problems stacked along a leading batch axis (same n, p, m)."""
    f = {k: np.stack([getattr(P, k) for P in problems])
         for k in ("Q", "q", "A", "b", "G", "h", "x", "y", "z", "active", "weak")}
    return KnownQP(**f)


def unstack(P: KnownQP, i: int) -> KnownQP:
    """Sample i of a stacked (unscaled) batch."""
    return KnownQP(P.Q[i], P.q[i], P.A[i], P.b[i], P.G[i], P.h[i], P.x[i], P.y[i], P.z[i],
                   P.active[i], P.weak[i])


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ (absolute when b = 0), flattening and concatenating sequences."""
    if isinstance(a, (tuple, list)):
        a = np.concatenate([np.ravel(np.asarray(t, dtype=np.float64)) for t in a])
        b = np.concatenate([np.ravel(np.asarray(t, dtype=np.float64)) for t in b])
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / (nb if nb > 0 else 1.0)
