"""The forward's factorization of the KKT system, for the backward pass (`implicitdiff._factored`).

The polish factors, once per batch, the active-set KKT system of the problem (`ActiveKKT`:
the null space of A, the Cholesky factor of Q on it, the Schur complement of the inequality
rows), whatever the active set. The derivative's linear system is the Jacobian of
`kkt_condition` at the answer, on $w = (x, y, z, \\text{ok})$; at a solved sample
($\\text{ok} = 1$), with $a$ the active mask ($z_i > 0$) and $k = 2 r$ (twice the residuals of
the three blocks at $w$, the ok column):

$$M = \\begin{pmatrix} Q & A^\\top & G^\\top & k_1 \\\\ A & 0 & 0 & k_2 \\\\
  \\operatorname{diag}(a) G & 0 & \\operatorname{diag}(1 - a) & k_3 \\\\ 0 & 0 & 0 & -1
  \\end{pmatrix},$$

and at a failed one ($\\text{ok} = 0$, $w = 0$) the identity. Both solves come down to one solve
with the active-set KKT matrix $K$ (rows $x$, $y$, $z_S$):

- $M^\\top u = g$: $K (u_x, u_y, u_S) = (g_x, g_y, g_S)$, then $u_i = g_i - G_i u_x$ off the
  active set and $u_{\\text{ok}} = k \\cdot u - g_{\\text{ok}}$;
- $M v = g$: $v_{\\text{ok}} = -g_{\\text{ok}}$, $v_i = g_i - k_{3,i} v_{\\text{ok}}$ off the
  active set, then $K (v_x, v_y, v_S) = (g_x - k_1 v_{\\text{ok}} - G_I^\\top v_I,
  g_y - k_2 v_{\\text{ok}}, (g_z - k_3 v_{\\text{ok}})_S)$.

Each solve carries a second right-hand side, the uniqueness probe: $K z = K w$ for a fixed
pseudo-random $w$ must give back $w$ to 1e-8 (a nearly singular active set, dependent active
rows, fails it and the backward's own solver, whose checks decide, takes over).
"""

from __future__ import annotations

import numpy as np

from .._linear_solve import _probe_vector
from ._ipm import ActiveKKT


class KKTFactorization:
    """`solve(b, transpose) -> (x, ok, size)` with the Jacobian of `kkt_condition` at the
    forward's answer (see the module's notes), from the polish's `ActiveKKT`.

    `fast` holds the batch's `(Q, q, A, b, G, h)` (`fast.data`: float64, flattened to one
    batch axis, Q symmetric); `w`: the answer `(x, y, z, ok)` as the framework received it
    (cast to its dtype, so the active set read here, $z_i > 0$, is the one the condition
    reads)."""

    def __init__(self, fast: ActiveKKT, w: tuple):
        self.fast = fast
        self.data = fast.data
        self.w = tuple(np.asarray(a, dtype=np.float64) for a in w)

    def _k(self) -> np.ndarray:
        """The ok column, $\\partial F / \\partial \\text{ok}$, from the condition's own
        formula (`idf.qp._ok_column`; imported here: that module imports this one)."""
        from . import _ok_column

        return np.concatenate(_ok_column(np, self.w, self.data), axis=1)

    def solve(self, rhs: np.ndarray, transpose: bool) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray] | None:
        """Solve $M^\\top u = $ `rhs` (`transpose`) or $M v = $ `rhs`, `rhs` (B, n + p + m + 1).
        None where the layout is not this problem's."""
        Q, _, A, _, G, _ = self.data
        x, _, z, ok = self.w
        B, n = x.shape
        p, m = A.shape[1], G.shape[1]
        N = n + p + m + 1
        if rhs.shape != (B, N):
            return None
        act = z > 0
        solved = ok > 0.5
        gx, gy, gz, go = rhs[:, :n], rhs[:, n:n + p], rhs[:, n + p:n + p + m], rhs[:, N - 1]
        k = self._k()
        k1, k2, k3 = k[:, :n], k[:, n:n + p], k[:, n + p:]
        if transpose:
            f, g, kk = gx, gy, gz
        else:
            vo = -go
            vI = np.where(act, 0.0, gz - k3 * vo[:, None])
            f = gx - k1 * vo[:, None] - (vI[:, None, :] @ G)[:, 0, :]
            g = gy - k2 * vo[:, None]
            kk = gz - k3 * vo[:, None]
        # the probe's right-hand side: K w for w on (x, y, z_S)
        w = _probe_vector(np, np.zeros((B, n + p + m)))
        wx, wy, wz = w[:, :n], w[:, n:n + p], np.where(act, w[:, n + p:], 0.0)
        pf = ((Q @ wx[:, :, None])[:, :, 0] + (wy[:, None, :] @ A)[:, 0, :]
              + (wz[:, None, :] @ G)[:, 0, :])
        pg = (A @ wx[:, :, None])[:, :, 0]
        pk = (G @ wx[:, :, None])[:, :, 0]
        idx = np.arange(B)
        cols = (np.stack([f, pf], axis=2), np.stack([g, pg], axis=2), np.stack([kk, pk], axis=2))
        sx, sy, sz, good, terms = self.fast.solve_many(idx, act, *cols)
        ux, uy, uS = sx[:, :, 0], sy[:, :, 0], sz[:, :, 0]
        err = np.sqrt(np.sum((sx[:, :, 1] - wx) ** 2, axis=1) + np.sum((sy[:, :, 1] - wy) ** 2,
                                                                        axis=1)
                      + np.sum((sz[:, :, 1] - wz) ** 2, axis=1))
        size_w = np.sqrt(np.sum(wx ** 2, axis=1) + np.sum(wy ** 2, axis=1)
                         + np.sum(wz ** 2, axis=1))
        unique = err <= 1e-8 * size_w
        if transpose:
            uz = np.where(act, uS, gz - (G @ ux[:, :, None])[:, :, 0])
            uo = (np.sum(k1 * ux, axis=1) + np.sum(k2 * uy, axis=1) + np.sum(k3 * uz, axis=1)
                  - go)
            out = np.concatenate([ux, uy, uz, uo[:, None]], axis=1)
        else:
            vz = np.where(act, uS, vI)
            out = np.concatenate([ux, uy, vz, vo[:, None]], axis=1)
        # a failed sample's matrix is the identity (its w and ok column are zero)
        out = np.where(solved[:, None], out, rhs)
        trusted = np.where(solved, good & unique, True)
        # the size of the terms of the product M out, per sample (for the residual check): those
        # of the active-set system, of the inactive rows (G_i u_x and u_i) and of the ok row
        aG = self.fast.absG
        ax = np.abs(out[:, :n])
        rows_i = np.max(np.where(act, 0.0, (aG @ ax[:, :, None])[:, :, 0]
                                 + np.abs(out[:, n + p:n + p + m])), axis=1, initial=0.0)
        ok_row = np.sum(np.abs(k) * np.abs(out[:, :N - 1]), axis=1) + np.abs(out[:, N - 1])
        size = np.max(np.abs(rhs), axis=1) + np.where(
            solved, np.maximum.reduce([terms[:, 0], rows_i, ok_row]), 0.0)
        return out, trusted, size
