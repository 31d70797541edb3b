"""The default backward linear solver of `idf.qp.solve_qp`: `Dense`, after eliminating the rows
(or columns) of the KKT matrix that hold nothing but their diagonal entry.

The Jacobian of `kkt_condition` at a solved sample is, on $w = (x, y, z, \\text{ok})$,

$$\\begin{pmatrix} Q_s & A^\\top & G^\\top & k_1 \\\\ A & 0 & 0 & k_2 \\\\
  \\operatorname{diag}(a) G & 0 & \\operatorname{diag}(1 - a) & k_3 \\\\ 0 & 0 & 0 & -1
  \\end{pmatrix}$$

($a$ the active mask): the row of an inactive multiplier is $e_i^\\top$ (its $k_3$ entry is
$z_i = 0$ exactly) and so is the status row up to its diagonal. With $I$ such a set of indices,
whose rows hold only their diagonal $D$, and $R$ the rest,

$$M = \\begin{pmatrix} M_{RR} & M_{RI} \\\\ 0 & D \\end{pmatrix}: \\quad
  v_I = D^{-1} g_I, \\quad M_{RR} v_R = g_R - M_{RI} v_I,$$

and for the transpose (the VJP) the same with columns: $v_R = M_{RR}^{-1} g_R$,
$v_I = D^{-1}(g_I - M_{IR} v_R)$. Both are one formula,
$t = D^{-1} g_I$, $v_R = M_{RR}^{-1}(g_R - M_{RI} t)$, $v_I = t - D^{-1} M_{IR} v_R$, exact
whenever one of $M_{RI}$, $M_{IR}$ is zero. What is left is the active-set KKT matrix, of size
$n + p + |S|$ instead of $n + p + m + 1$ (about a third of the LU's work at $m = n$ with a third
of the constraints active), and it is the one that goes through `Dense`'s checks (equilibration,
residual, the uniqueness probe): since $\\det M = \\det M_{RR} \\prod D$, $M$ is singular exactly
when $M_{RR}$ is, and a singular active set (dependent active rows, a $Q$ singular on the
feasible directions) is refused as before.

Nothing here is specific to the QP but where its matrix comes from: the rows are found by
looking at the numbers (exact zeros), per sample, so a failed sample (whose matrix is the
identity) and any batch mix work. Where the matrix cannot be looked at (traced under `jit`) or
nothing can be eliminated, it is `Dense` on the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._array import device as _device
from .._array import norm
from .._linear_solve import Dense, _direct


def _gather(xp: Any, flat: Any, rows: Any, cols: Any, N: int) -> Any:
    """`M[e, rows[e, i], cols[e, j]]` for a batch of N×N matrices raveled into `flat`
    (`rows` (B, r), `cols` (B, c)): one gather of the entries wanted, `(B, r, c)`."""
    B, r, c = rows.shape[0], rows.shape[1], cols.shape[1]
    base = xp.reshape(xp.arange(B, dtype=rows.dtype, device=_device(rows)) * (N * N),
                      (B, 1, 1))
    idx = base + rows[:, :, None] * N + cols[:, None, :]
    return xp.reshape(xp.take(flat, xp.reshape(idx, (-1,)), axis=0), (B, r, c))


def _gather1(xp: Any, v: Any, idx: Any) -> Any:
    """`v[e, idx[e, i]]` for `v` (B, N), `idx` (B, r)."""
    B, N, r = v.shape[0], v.shape[1], idx.shape[1]
    base = xp.reshape(xp.arange(B, dtype=idx.dtype, device=_device(idx)) * N, (B, 1))
    return xp.reshape(xp.take(xp.reshape(v, (-1,)), xp.reshape(base + idx, (-1,)), axis=0),
                      (B, r))


def _strided(a: Any) -> bool:
    """Whether `a` is known not to be laid out contiguously (row-major): a view, such as a
    transpose, that raveling would copy. Only a layout hint (False when unknown)."""
    check = getattr(a, "is_contiguous", None)  # PyTorch
    if callable(check):
        return not check()
    flags = getattr(a, "flags", None)           # NumPy
    return flags is not None and not bool(getattr(flags, "c_contiguous", True))


def _kept_block(xp: Any, Mf: Any, p1: Any, N: int, keep: int | None) -> Any:
    """`M[e, p1[e, i], p1[e, j]]`, the block of the kept unknowns (`Mf` (B, N, N), `p1` (B, k)).
    With `keep`, the first `keep` of `p1` are `0, ..., keep - 1` in every element: that corner
    is a slice, and only the rows and columns of the other kept unknowns (the QP's active
    multipliers) are gathered, a fraction of the entries of a gather of the whole block."""
    transposed = _strided(Mf) and not _strided(xp.matrix_transpose(Mf))
    # a transposed view (the VJP's Aᵀ) is gathered from the matrix it views, and the blocks
    # transposed, instead of copying the whole matrix to ravel it
    flat = xp.reshape(xp.matrix_transpose(Mf) if transposed else Mf, (-1,))

    def block(rows: Any, cols: Any) -> Any:
        if transposed:
            return xp.matrix_transpose(_gather(xp, flat, cols, rows, N))
        return _gather(xp, flat, rows, cols, N)

    k = int(p1.shape[1])
    if keep is None or keep >= k or keep < 1:
        return block(p1, p1)
    head, tail = p1[:, :keep], p1[:, keep:]
    top = xp.concat([Mf[:, :keep, :keep], block(head, tail)], axis=-1)
    bottom = xp.concat([block(tail, head), block(tail, tail)], axis=-1)
    return xp.concat([top, bottom], axis=-2)


@dataclass(frozen=True)
class ReducedDense(Dense):
    """`Dense` that first eliminates the unknowns whose rows, or else whose columns, hold
    nothing but a nonzero diagonal entry (per batch element), and factors what is left: for the
    KKT matrix of `idf.qp.kkt_condition`, the active-set KKT system.

    **Arguments:** `rtol`, `atol`, `ridge`, `check_singular` as in `Dense`, applied to the
    reduced system; `keep`: None (default) finds the unknowns to eliminate by looking for exact
    zeros in the whole matrix; an int says that the first `keep` unknowns stay and that the
    others with a nonzero diagonal entry are the ones to eliminate (the QP's layout: x and y
    stay, the inactive multipliers and the status go), which saves those passes over the
    matrix. Either way the answer's residual against the whole matrix is checked, and where it
    is not at the solve's accuracy (a matrix without that structure) the element is solved
    again by `Dense` on the whole matrix.
    """

    keep: int | None = None

    def _solve(self, bk: Any, xp: Any, matvec: Any, b: Any, x0: Any, rmatvec: Any,
               tags: frozenset) -> Any:
        M = bk.materialize(matvec, b)  # `ridge` is in `matvec` already (`_shifted`)
        N = int(b.shape[-1])
        if M.ndim < 3 or N < 2 or bk.is_traced(M) or (self.keep is not None
                                                       and self.keep >= N):
            return _direct(bk, xp, self, xp.linalg.solve, M, M, b)
        batch = tuple(M.shape[:-2])
        Mf, bf = xp.reshape(M, (-1, N, N)), xp.reshape(xp.broadcast_to(b, (*batch, N)), (-1, N))
        d = xp.linalg.diagonal(Mf)
        if self.keep is None:
            nz = xp.astype(Mf != 0, xp.int32)
            has = d != 0
            rows = has & (xp.sum(nz, axis=-1) == 1)   # only the diagonal in the row
            cols = has & (xp.sum(nz, axis=-2) == 1)   # only the diagonal in the column
            n_rows = xp.sum(xp.astype(rows, xp.int32), axis=-1)
            n_cols = xp.sum(xp.astype(cols, xp.int32), axis=-1)
            elim = xp.where((n_rows >= n_cols)[:, None], rows, cols)
        else:
            idx = xp.arange(N, device=_device(d))
            elim = (d != 0) & (idx >= self.keep)[None, :]
        count = N - xp.sum(xp.astype(elim, xp.int32), axis=-1)
        k = max(int(xp.max(count)), 1)
        if k >= N:
            return _direct(bk, xp, self, xp.linalg.solve, M, M, b)
        # the kept unknowns first (per element; an element with fewer keeps some eliminated
        # ones in the first block, which is harmless), then the eliminated ones
        perm = xp.argsort(xp.astype(elim, xp.int32), axis=-1, stable=True)
        perm = xp.astype(perm, xp.int32)
        p1, p2 = perm[:, :k], perm[:, k:]
        inv = xp.argsort(perm, axis=-1, stable=True)
        M11 = _kept_block(xp, Mf, p1, N, self.keep)
        d2 = _gather1(xp, d, p2)
        t = _gather1(xp, bf, p2) / d2

        def scatter(first: Any, second: Any) -> Any:
            # the vector with `first` at the kept unknowns and `second` at the eliminated ones
            return _gather1(xp, xp.concat([first, second], axis=-1), inv)

        # M12 t and M21 v1 as products with the whole matrix of vectors that are zero off the
        # block: two matrix-vector products instead of gathering two (k × (N - k)) blocks
        Mt = (Mf @ scatter(xp.zeros_like(p1, dtype=t.dtype), t)[..., None])[..., 0]
        rhs = _gather1(xp, bf, p1) - _gather1(xp, Mt, p1)
        v1, info = _direct(bk, xp, self, xp.linalg.solve, M11, M11, rhs)
        Mv1 = (Mf @ scatter(v1, xp.zeros_like(t))[..., None])[..., 0]
        v2 = t - _gather1(xp, Mv1, p2) / d2
        v = scatter(v1, v2)
        # the structure holds where the whole residual is that of the reduced solve (one of
        # M12, M21 zero: then the eliminated rows are exact up to rounding)
        Mv = (Mf @ v[..., None])[..., 0]
        eps = float(xp.finfo(bf.dtype).eps)
        tol = xp.maximum(self._tol(xp, bf, direct=True),
                         (100.0 * eps) * (norm(xp, Mv) + norm(xp, bf)))
        tol = xp.maximum(tol, 10.0 * info.residual_norm[:, None])
        off = ~(norm(xp, Mv - bf) <= tol)[..., 0] & xp.all(xp.isfinite(v), axis=-1)
        if bool(xp.any(off)):  # not that structure: Dense on the whole matrix there
            vf, infof = _direct(bk, xp, self, xp.linalg.solve, Mf, Mf, bf)
            v = xp.where(off[:, None], vf, v)
            info = type(info)(*(xp.where(off, g, f) if hasattr(f, "shape") else f
                                for f, g in zip(info, infof)))
        finite = xp.all(xp.isfinite(v), axis=-1)
        info = info._replace(converged=info.converged & finite,
                             breakdown=info.breakdown | ~finite)
        info = type(info)(*(xp.reshape(f, batch) if hasattr(f, "shape") else f for f in info))
        return xp.reshape(v, (*batch, N)), info
