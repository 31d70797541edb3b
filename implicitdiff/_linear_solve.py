"""Linear solvers for $A x = b$, written once against the array API.

Every solver takes a `matvec` ($v \\mapsto A v$) and a right-hand side `b` of shape `(n,)`, or
`(..., n)` for a batch of independent problems (then `matvec` must map `(..., n)` to `(..., n)`
row by row). Iterative methods loop with the backend's `while_loop`, so the same code runs eagerly
(NumPy, PyTorch) and compiled (`lax.while_loop` under JAX). Batched problems stop per element: an
element that converged is frozen while the others go on.

Solvers are frozen dataclasses: hashable, safe as defaults, static under `jax.jit`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._array import dot, norm, safe_div, zero_int
from ._diagnostics import LinearSolveInfo
from ._errors import StructureError
from ._tags import positive_definite, symmetric

MatVec = Callable[[Any], Any]


def _default_rtol(xp: Any, dtype: Any, direct: bool) -> float:
    # Krylov defaults give >= 10 correct digits in float64 on problems with condition number
    # up to ~100; direct solves only flag numerically singular systems.
    if dtype == xp.float64:
        return 1.5e-8 if direct else 1e-12
    if dtype == xp.float32:
        return 3e-3 if direct else 1e-6
    return 3e-2 if direct else 1e-3


def _sel(xp: Any, mask: Any, new: Any, old: Any) -> Any:
    return xp.where(mask, new, old)


def _selector(bk: Any, xp: Any, mask: Any) -> Callable[[Any, Any], Any]:
    """`(new, old) -> where(mask, new, old)`; just `new` when `mask` is known to be all true
    (eagerly, while every batch element is still iterating: the usual case)."""
    if bk.known_all(mask):
        return lambda new, old: new
    return lambda new, old: xp.where(mask, new, old)


class AbstractLinearSolver(abc.ABC):
    """Base class of the linear solvers.

    `solve(matvec, b, *, x0=None, rmatvec=None, tags=frozenset(), backend=None) -> (x, info)`.
    """

    rtol: float | None
    atol: float
    ridge: float

    def solve(self, matvec: MatVec, b: Any, *, x0: Any = None, rmatvec: MatVec | None = None,
              tags: frozenset = frozenset(), backend: Any = None) -> tuple[Any, LinearSolveInfo]:
        """Solve $(A + \\text{ridge}\\, I)\\, x = b$.

        **Arguments:**

        - `matvec`: $v \\mapsto A v$ on arrays shaped like `b`.
        - `b`: right-hand side, shape `(n,)` or `(..., n)` for a batch.
        - `x0`: initial guess for iterative methods (default zeros).
        - `rmatvec`: $u \\mapsto A^\\top u$, needed by `NormalCG` only.
        - `tags`: structure of $A$ (`idf.symmetric`, `idf.positive_definite`), used by `Auto`.
        - `backend`: the backend providing `while_loop`; found from `b` when omitted.

        **Returns:** `(x, info)` with `info` a `LinearSolveInfo` (iterations, residual_norm,
        converged, breakdown), arrays of the batch shape.
        """
        from ._backend import get_backend

        bk = backend if backend is not None else get_backend(b)
        xp = bk.namespace(b)
        if getattr(b, "ndim", 0) < 1:
            raise StructureError(
                f"{type(self).__name__}.solve: expected a right-hand side of shape (n,) or "
                f"(..., n), got shape {getattr(b, 'shape', ())}. Ravel the vector first."
            )
        if not xp.isdtype(b.dtype, "real floating"):
            raise StructureError(
                f"{type(self).__name__}.solve: expected a real floating right-hand side, got "
                f"dtype {b.dtype}. Cast b (and the operator) to float32 or float64."
            )
        if x0 is not None and tuple(x0.shape) != tuple(b.shape):
            raise StructureError(
                f"{type(self).__name__}.solve: expected x0 of shape {tuple(b.shape)} like b, got "
                f"{tuple(x0.shape)}."
            )
        x, info = self._solve(bk, xp, _shifted(matvec, self.ridge), b, x0,
                              None if rmatvec is None else _shifted(rmatvec, self.ridge), tags)
        if symmetric in tags:
            bad = _not_symmetric(xp, matvec, b)
            info = info._replace(converged=info.converged & ~bad, not_symmetric=bad)
        else:
            info = info._replace(not_symmetric=xp.zeros_like(info.converged))
        return x, info

    @abc.abstractmethod
    def _solve(self, bk: Any, xp: Any, matvec: MatVec, b: Any, x0: Any,
               rmatvec: MatVec | None, tags: frozenset) -> tuple[Any, LinearSolveInfo]:
        ...

    def _tol(self, xp: Any, b: Any, direct: bool = False) -> Any:
        rtol = self.rtol if self.rtol is not None else _default_rtol(xp, b.dtype, direct)
        nb = norm(xp, b)
        return xp.maximum(rtol * nb, xp.full_like(nb, self.atol))

    def _maxiter(self, n: int) -> int:
        m = getattr(self, "maxiter", None)
        return 10 * n if m is None else m


# The `symmetric` tag lets a solver use A where a VJP needs Aᵀ (and picks CG/MINRES): trusted
# blindly, a wrong tag gives A⁻¹x̄ instead of A⁻ᵀx̄, silently. One probe per solve refutes it:
# for fixed pseudo-random u, v, ⟨u, Av⟩ = ⟨v, Au⟩ when A is symmetric, and fails to hold for a
# non-symmetric A except on a set of measure zero. Two products, compared per batch element to
# 100√ε of the products' size (the products' rounding stays far below that).

def _not_symmetric(xp: Any, matvec: MatVec, b: Any) -> Any:
    """Per batch element, whether the probe shows `matvec` is not symmetric."""
    cumsum = getattr(xp, "cumulative_sum", None) or xp.cumsum
    k = cumsum(xp.ones_like(b), axis=-1)             # 1, 2, ..., n on b's device and dtype
    u, v = xp.sin(1.7 * k + 0.3), xp.cos(2.9 * k + 1.1)
    Au, Av = matvec(u), matvec(v)
    gap = xp.abs(dot(xp, u, Av) - dot(xp, v, Au))[..., 0]
    size = (norm(xp, u) * norm(xp, Av) + norm(xp, v) * norm(xp, Au))[..., 0]
    tol = 100.0 * float(xp.finfo(b.dtype).eps) ** 0.5
    return ~(gap <= tol * size)                         # NaN products fail too


def _shifted(matvec: MatVec, ridge: float) -> MatVec:
    """$v \\mapsto (A + \\text{ridge}\\, I) v$."""
    if not ridge:
        return matvec
    return lambda v: matvec(v) + ridge * v


def _check_common(obj: Any) -> None:
    name = type(obj).__name__
    if obj.rtol is not None and not obj.rtol >= 0:
        raise ValueError(f"{name}: expected rtol >= 0 or None, got {obj.rtol!r}.")
    if not obj.atol >= 0:
        raise ValueError(f"{name}: expected atol >= 0, got {obj.atol!r}.")
    if not obj.ridge >= 0:
        raise ValueError(f"{name}: expected ridge >= 0, got {obj.ridge!r}.")
    m = getattr(obj, "maxiter", None)
    if m is not None and (not isinstance(m, int) or m < 1):
        raise ValueError(f"{name}: expected maxiter a positive int or None, got {m!r}.")


def _info(xp: Any, iters: Any, rn: Any, tol: Any, brk: Any) -> LinearSolveInfo:
    brk = brk | ~xp.isfinite(rn)  # NaN/inf in the operator or right-hand side
    conv = (rn <= tol) & ~brk
    return LinearSolveInfo(iters[..., 0], rn[..., 0], conv[..., 0], brk[..., 0])


def _zeros_like_b(xp: Any, b: Any, x0: Any) -> Any:
    return xp.zeros_like(b) if x0 is None else x0


# ---- direct solvers ----------------------------------------------------------------------------

def _per_element(bk: Any, xp: Any, factor_solve: Callable[[Any, Any], Any], M: Any,
                 b: Any) -> Any:
    """`factor_solve(M, b)`; when it raises on a batch, again one element at a time, so one
    singular element (NaN) does not fail the independent others. Eager frameworks only raise."""
    try:
        return factor_solve(M, b)
    except bk.linalg_errors:
        if b.ndim == 1:
            return xp.zeros_like(b) * float("nan")
    n = b.shape[-1]
    Mf, bf = xp.reshape(M, (-1, n, n)), xp.reshape(b, (-1, n))
    return xp.reshape(xp.stack([_per_element(bk, xp, factor_solve, Mf[i, ...], bf[i, ...])
                                for i in range(bf.shape[0])]), b.shape)


def _direct_info(bk: Any, xp: Any, solver: Any, matvec: MatVec, M: Any, b: Any,
                 x: Any) -> tuple[Any, LinearSolveInfo]:
    finite = xp.all(xp.isfinite(x), axis=-1, keepdims=True)
    x = xp.where(finite, x, xp.zeros_like(x) * float("nan"))
    r = (M @ x[..., None])[..., 0] - b
    rn = norm(xp, r)
    rn = xp.where(finite, rn, xp.full_like(rn, float("inf")))
    tol = solver._tol(xp, b, direct=True)
    brk = ~finite | ~(rn <= tol)
    iters = xp.zeros_like(rn, dtype=xp.int32)
    return x, _info(xp, iters, rn, tol, brk)


@dataclass(frozen=True)
class Dense(AbstractLinearSolver):
    """Materialize $A$ (n matrix-vector products) and solve by LU factorization.

    Exact up to rounding; $O(n^3)$. Reports `breakdown` (hence a `SingularJacobianError` when
    used by the implicit rules) when the factorization fails or the solution's relative residual
    exceeds `rtol` (default $\\sqrt{\\epsilon}$ of the dtype), the mark of a numerically singular
    matrix.

    **Arguments:** `rtol`, `atol` (residual check), `ridge` (solve $(A + \\text{ridge} I)x=b$).
    """

    rtol: float | None = None
    atol: float = 0.0
    ridge: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        M = bk.materialize(matvec, b)
        x = _per_element(bk, xp, lambda M, b: xp.linalg.solve(M, b[..., None])[..., 0], M, b)
        return _direct_info(bk, xp, self, matvec, M, b, x)


@dataclass(frozen=True)
class Cholesky(AbstractLinearSolver):
    """Materialize $A$ (symmetric positive definite) and solve by Cholesky factorization.

    About twice as fast as `Dense`. Reports a breakdown when $A$ is not positive definite.

    **Arguments:** `rtol`, `atol` (residual check), `ridge`.
    """

    rtol: float | None = None
    atol: float = 0.0
    ridge: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        M = bk.materialize(matvec, b)
        S = (M + xp.matrix_transpose(M)) / 2

        def factor_solve(S: Any, b: Any) -> Any:
            L = xp.linalg.cholesky(S)
            y = bk.solve_triangular(L, b, lower=True)
            return bk.solve_triangular(xp.matrix_transpose(L), y, lower=False)

        x = _per_element(bk, xp, factor_solve, S, b)
        return _direct_info(bk, xp, self, matvec, M, b, x)


# ---- Krylov solvers ----------------------------------------------------------------------------

def _identity(v: Any) -> Any:
    return v


@dataclass(frozen=True)
class CG(AbstractLinearSolver):
    """Conjugate gradient, for symmetric positive definite $A$.

    Breaks down (reported, never silent) when it meets a direction of non-positive curvature.

    **Arguments:**

    - `rtol`, `atol`: stop when $\\|r\\| \\le \\max(\\text{atol}, \\text{rtol}\\,\\|b\\|)$; default
      rtol is $10^{-12}$ in float64, $10^{-6}$ in float32.
    - `maxiter`: default $10n$.
    - `preconditioner`: $v \\mapsto M^{-1} v$, symmetric positive definite.
    - `ridge`: solve $(A + \\text{ridge}\\, I) x = b$.
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    preconditioner: Callable[[Any], Any] | None = field(default=None, compare=True)
    ridge: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        return _cg(bk, xp, matvec, b, x0, self.preconditioner or _identity, self._tol(xp, b),
                   self._maxiter(b.shape[-1]))


def _cg(bk, xp, A, b, x0, M, tol, maxiter):
    x = _zeros_like_b(xp, b, x0)
    r = b - A(x) if x0 is not None else b
    z = M(r)
    p = z
    rz = dot(xp, r, z)
    rn = norm(xp, r)
    iters = xp.zeros_like(rn, dtype=xp.int32)
    brk = xp.zeros_like(rn, dtype=xp.bool)
    k = zero_int(xp, rn)

    def cond(s):
        k, rn, brk = s[0], s[5], s[7]
        return (k < maxiter) & xp.any((rn > tol) & ~brk)

    def body(s):
        k, x, r, p, rz, rn, iters, brk = s
        active = (rn > tol) & ~brk
        Ap = A(p)
        pAp = dot(xp, p, Ap)
        bad = active & ~(pAp > 0)
        go = active & ~bad
        sel = _selector(bk, xp, go)
        alpha = safe_div(xp, rz, pAp, go)
        x = x + alpha * p
        r = sel(r - alpha * Ap, r)
        z = M(r)
        rz_new = dot(xp, r, z)
        beta = safe_div(xp, rz_new, rz, go & (rz != 0))
        p = sel(z + beta * p, p)
        rz = sel(rz_new, rz)
        rn = sel(norm(xp, r), rn)
        return (k + 1, x, r, p, rz, rn, iters + xp.astype(go, xp.int32), brk | bad)

    k, x, r, p, rz, rn, iters, brk = bk.while_loop(cond, body, (k, x, r, p, rz, rn, iters, brk))
    return x, _info(xp, iters, rn, tol, brk)


@dataclass(frozen=True)
class NormalCG(AbstractLinearSolver):
    """CG on the normal equations $A^\\top A x = A^\\top b$, for any non-singular $A$.

    Squares the condition number, so it is never chosen automatically; needs products with
    $A^\\top$. The tolerance applies to the normal-equation residual $\\|A^\\top(b - Ax)\\|$.

    **Arguments:** `rtol`, `atol`, `maxiter`, `ridge` as in `CG`.
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    ridge: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        if rmatvec is None:
            raise StructureError(
                "NormalCG: expected rmatvec (products with A^T), got None. Pass rmatvec= or use "
                "GMRES/BiCGStab, which need only A."
            )
        bt = rmatvec(b)

        def normal(v: Any) -> Any:
            return rmatvec(matvec(v))

        return _cg(bk, xp, normal, bt, x0, _identity, self._tol(xp, bt),
                   self._maxiter(b.shape[-1]))


@dataclass(frozen=True)
class MINRES(AbstractLinearSolver):
    """Minimum residual method, for symmetric (possibly indefinite) $A$.

    **Arguments:** `rtol`, `atol`, `maxiter`, `preconditioner` (symmetric positive definite),
    `ridge`, as in `CG`. The tolerance applies to the (preconditioned) residual estimate.
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    preconditioner: Callable[[Any], Any] | None = None
    ridge: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        # Paige & Saunders (1975): Lanczos tridiagonalization with a QR factorization by Givens
        # rotations updated one column at a time; x moves along the directions w_k.
        A, M = matvec, self.preconditioner or _identity
        maxiter = self._maxiter(b.shape[-1])
        x = _zeros_like_b(xp, b, x0)
        r1 = b - A(x) if x0 is not None else b
        y = M(r1)
        b1sq = dot(xp, r1, y)
        brk = ~(b1sq >= 0)
        beta1 = xp.sqrt(xp.where(brk, xp.zeros_like(b1sq), b1sq))
        tol = self._tol(xp, b) if self.preconditioner is None else xp.maximum(
            (self.rtol if self.rtol is not None else _default_rtol(xp, b.dtype, False)) * beta1,
            xp.full_like(beta1, self.atol))
        zero = xp.zeros_like(beta1)
        one = xp.ones_like(beta1)
        w = xp.zeros_like(b)
        state = dict(k=zero_int(xp, beta1), x=x, r1=r1, r2=r1, y=y, beta=beta1,
                     oldb=zero, dbar=zero, epsln=zero, phibar=beta1, cs=-one, sn=zero, w=w,
                     w2=w, iters=xp.zeros_like(beta1, dtype=xp.int32), brk=brk)

        def cond(s):
            return (s["k"] < maxiter) & xp.any((s["phibar"] > tol) & ~s["brk"])

        def body(s):
            active = (s["phibar"] > tol) & ~s["brk"]
            beta, oldb_prev = s["beta"], s["oldb"]
            v = safe_div(xp, s["y"], beta, active & (beta > 0))
            y = A(v)
            y = y - safe_div(xp, beta, oldb_prev, active & (oldb_prev > 0)) * s["r1"]
            alfa = dot(xp, v, y)
            y = y - safe_div(xp, alfa, beta, active & (beta > 0)) * s["r2"]
            r1, r2 = s["r2"], y
            y = M(r2)
            bsq = dot(xp, r2, y)
            bad = active & ~(bsq >= 0)
            beta_new = xp.sqrt(xp.where(bsq >= 0, bsq, xp.zeros_like(bsq)))
            cs, sn, dbar, phibar = s["cs"], s["sn"], s["dbar"], s["phibar"]
            oldeps = s["epsln"]
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta_new
            dbar_new = -cs * beta_new
            gamma = xp.sqrt(gbar * gbar + beta_new * beta_new)
            singular = active & ~(gamma > 0)
            go = active & ~bad & ~singular
            sel = _selector(bk, xp, go)
            cs_new = safe_div(xp, gbar, gamma, go)
            sn_new = safe_div(xp, beta_new, gamma, go)
            phi = cs_new * phibar
            w1, w2 = s["w2"], s["w"]
            w_new = safe_div(xp, v - oldeps * w1 - delta * w2, gamma, go)
            x = s["x"] + _sel(xp, go, phi, zero) * w_new
            return dict(
                k=s["k"] + 1, x=x,
                r1=sel(r1, s["r1"]), r2=sel(r2, s["r2"]),
                y=sel(y, s["y"]), beta=sel(beta_new, beta),
                oldb=sel(beta, oldb_prev), dbar=sel(dbar_new, dbar),
                epsln=sel(epsln, oldeps), phibar=sel(sn_new * phibar, phibar),
                cs=sel(cs_new, cs), sn=sel(sn_new, sn),
                w=sel(w_new, s["w"]), w2=sel(w2, s["w2"]),
                iters=s["iters"] + xp.astype(go, xp.int32), brk=s["brk"] | bad | singular,
            )

        s = bk.while_loop(cond, body, state)
        return s["x"], _info(xp, s["iters"], s["phibar"], tol, s["brk"])


@dataclass(frozen=True)
class GMRES(AbstractLinearSolver):
    """Restarted GMRES, for any non-singular $A$.

    Each cycle builds an orthonormal Krylov basis of up to `restart` vectors (classical
    Gram-Schmidt applied twice), keeps the small least-squares problem triangular with Givens
    rotations, and ends early once the residual estimate is within tolerance; then it checks the
    true residual $\\|b - Ax\\|$. A cycle that does not reduce it stops the method (reported as
    not converged). All loops are the backend's `while_loop`, so under `jit` the method compiles
    once, whatever `restart` is.

    **Arguments:** `rtol`, `atol`, `maxiter` (matrix-vector products, default $10n$), `restart`
    (default 30), `preconditioner` (applied on the right), `ridge`.
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    restart: int = 30
    preconditioner: Callable[[Any], Any] | None = None
    ridge: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self)
        if not isinstance(self.restart, int) or self.restart < 1:
            raise ValueError(f"GMRES: expected restart a positive int, got {self.restart!r}.")

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        A, M = matvec, self.preconditioner or _identity
        n = b.shape[-1]
        m = min(self.restart, n)
        maxiter = self._maxiter(n)
        tol = self._tol(xp, b)
        x = _zeros_like_b(xp, b, x0)
        r = b - A(x) if x0 is not None else b
        rn = norm(xp, r)
        iters = xp.zeros_like(rn, dtype=xp.int32)
        brk = xp.zeros_like(rn, dtype=xp.bool)
        stalled = xp.zeros_like(rn, dtype=xp.bool)
        cycle = _gmres_cycle(bk, xp, A, M, b, m, tol)

        def cond(s):
            k, rn, brk, stalled = s[0], s[3], s[5], s[6]
            return (k < maxiter) & xp.any((rn > tol) & ~brk & ~stalled)

        def body(s):
            k, x, r, rn, iters, brk, stalled = s
            active = (rn > tol) & ~brk & ~stalled
            dx, steps, used = cycle(r, rn, active)
            x_new = x + M(dx)
            r_new = b - A(x_new)
            rn_new = norm(xp, r_new)
            bad = active & ~xp.isfinite(rn_new)
            improved = rn_new < rn
            go = active & ~bad & improved
            sel = _selector(bk, xp, go)
            stall = active & ~bad & ~improved
            return (k + used, sel(x_new, x), sel(r_new, r),
                    sel(rn_new, rn), iters + steps, brk | bad, stalled | stall)

        k = zero_int(xp, rn)
        s = bk.while_loop(cond, body, (k, x, r, rn, iters, brk, stalled))
        return s[1], _info(xp, s[4], s[3], tol, s[5])


def _gmres_cycle(bk: Any, xp: Any, A: MatVec, M: MatVec, b: Any, m: int, tol: Any) -> Callable:
    """One GMRES cycle of at most `m` Arnoldi steps from residual `r`, with masks instead of
    dynamic indexing so that every backend (and `jit`) runs it. Returns the update `dx`, the
    steps taken per element and the steps taken by the batch."""
    lead = (1,) * b.ndim
    idx = xp.reshape(xp.arange(m + 1, device=_dev(b)), (m + 1, *lead))  # basis / row index
    cidx = xp.reshape(xp.arange(m, device=_dev(b)), (m, *lead))  # column index
    hcol = xp.reshape(xp.arange(m, device=_dev(b)), (1, m, *lead))
    scal = (*b.shape[:-1], 1)  # a per-element scalar
    zero = zero_int(xp, b)  # the loop counters start from it

    def pick(arr: Any, index: Any, j: Any) -> Any:  # arr[j] along axis 0
        return xp.sum(xp.where(index == j, arr, xp.zeros_like(arr)), axis=0)

    def cycle(r: Any, rn: Any, active: Any) -> tuple[Any, Any, Any]:
        zeros_v = xp.zeros((m + 1, *b.shape), dtype=b.dtype, device=_dev(b))
        V = xp.where(idx == 0, safe_div(xp, r, rn, rn > 0)[None, ...], zeros_v)
        H = xp.zeros((m + 1, m, *scal), dtype=b.dtype, device=_dev(b))
        cs = xp.ones((m, *scal), dtype=b.dtype, device=_dev(b))
        sn = xp.zeros((m, *scal), dtype=b.dtype, device=_dev(b))
        g = xp.where(idx == 0, rn[None, ...], xp.zeros((m + 1, *scal), dtype=b.dtype,
                                                  device=_dev(b)))
        steps = xp.zeros_like(rn, dtype=xp.int32)
        res = rn
        j0 = zero

        def inner_cond(s):
            j, res, act = s[0], s[6], s[8]
            return (j < m) & xp.any(act & (res > tol))

        def inner_body(s):
            j, V, H, cs, sn, g, res, steps, act = s
            live = act & (res > tol)
            w = A(M(pick(V, idx, j)))
            below = idx <= j
            zero_h = 0.0 * res[None, ...]
            h = xp.where(below, xp.sum(V * w[None, ...], axis=-1, keepdims=True), zero_h)
            w = w - xp.sum(h * V, axis=0)
            h2 = xp.where(below, xp.sum(V * w[None, ...], axis=-1, keepdims=True), zero_h)
            w = w - xp.sum(h2 * V, axis=0)
            h = h + h2
            hn = norm(xp, w)
            V = xp.where((idx == j + 1) & live, safe_div(xp, w, hn, hn > 0)[None, ...], V)
            col = xp.where(idx == j + 1, hn[None, ...], h)

            def rot_cond(t):
                return t[0] < j

            def rot_body(t):  # apply rotation i to rows i, i+1 of the new column
                i, col = t
                a, c = pick(col, idx, i), pick(col, idx, i + 1)
                ci, si = pick(cs, cidx, i), pick(sn, cidx, i)
                col = xp.where(idx == i, (ci * a + si * c)[None, ...], col)
                col = xp.where(idx == i + 1, (-si * a + ci * c)[None, ...], col)
                return i + 1, col

            _, col = bk.while_loop(rot_cond, rot_body, (zero, col))
            a, c = pick(col, idx, j), pick(col, idx, j + 1)
            gamma = xp.sqrt(a * a + c * c)
            nz = gamma > 0
            cj = xp.where(nz, safe_div(xp, a, gamma, nz), xp.ones_like(gamma))
            sj = safe_div(xp, c, gamma, nz)
            col = xp.where(idx == j, gamma[None, ...], xp.where(idx == j + 1, 0.0 * col, col))
            # elements that already converged keep their state (as if they had stopped)
            H = xp.where((hcol == j) & live, col[:, None, ...], H)
            cs = xp.where((cidx == j) & live, cj[None, ...], cs)
            sn = xp.where((cidx == j) & live, sj[None, ...], sn)
            gj = pick(g, idx, j)
            g_new = xp.where(idx == j, (cj * gj)[None, ...],
                             xp.where(idx == j + 1, (-sj * gj)[None, ...], g))
            g = xp.where(live, g_new, g)
            res_new = xp.abs(pick(g, idx, j + 1))
            res = xp.where(live, res_new, res)
            return (j + 1, V, H, cs, sn, g, res, steps + xp.astype(live, xp.int32), act)

        s = bk.while_loop(inner_cond, inner_body, (j0, V, H, cs, sn, g, res, steps, active))
        used, V, H, g, steps = s[0], s[1], s[2], s[5], s[7]

        # back substitution R y = g over the columns used; unused columns of R are zero
        y = xp.zeros((m, *scal), dtype=b.dtype, device=_dev(b))

        def back_cond(t):
            return t[0] >= 0

        def back_body(t):
            k, y = t
            row = pick(H, idx[:, None, ...], k)  # (m, ...) row k of R
            rkk = pick(row, cidx, k)
            acc = pick(g, idx, k) - xp.sum(xp.where(cidx > k, row * y, 0.0 * y), axis=0)
            yk = safe_div(xp, acc, rkk, (xp.abs(rkk) > 0) & (k < used))
            return k - 1, xp.where(cidx == k, yk[None, ...], y)

        _, y = bk.while_loop(back_cond, back_body, (zero + (m - 1), y))
        dx = xp.sum(y * V[:m, ...], axis=0)
        return dx, steps, used

    return cycle


def _dev(x: Any) -> Any:
    import array_api_compat

    return array_api_compat.device(x)


@dataclass(frozen=True)
class BiCGStab(AbstractLinearSolver):
    """Stabilized bi-conjugate gradient, for any non-singular $A$; short recurrences, two
    matrix-vector products per iteration. Breakdowns ($\\rho = 0$, $\\omega = 0$) are reported.

    **Arguments:** `rtol`, `atol`, `maxiter`, `preconditioner`, `ridge`, as in `CG`.
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    preconditioner: Callable[[Any], Any] | None = None
    ridge: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        A, M = matvec, self.preconditioner or _identity
        maxiter = self._maxiter(b.shape[-1])
        tol = self._tol(xp, b)
        x = _zeros_like_b(xp, b, x0)
        r = b - A(x) if x0 is not None else b
        rn = norm(xp, r)
        one = xp.ones_like(rn)
        zeros = xp.zeros_like(b)
        state = (zero_int(xp, rn), x, r, r, zeros, zeros, one, one, one, rn,
                 xp.zeros_like(rn, dtype=xp.int32), xp.zeros_like(rn, dtype=xp.bool))

        def cond(s):
            return (s[0] < maxiter) & xp.any((s[9] > tol) & ~s[11])

        def body(s):
            k, x, r, rhat, p, v, rho, alpha, omega, rn, iters, brk = s
            active = (rn > tol) & ~brk
            rho_new = dot(xp, rhat, r)
            bad = active & ~(xp.abs(rho_new) > 0)
            go = active & ~bad
            beta = safe_div(xp, rho_new, rho, go) * safe_div(xp, alpha, omega, go)
            p_new = r + beta * (p - omega * v)
            phat = M(p_new)
            v_new = A(phat)
            rv = dot(xp, rhat, v_new)
            bad = bad | (go & ~(xp.abs(rv) > 0))
            go = active & ~bad
            alpha_new = safe_div(xp, rho_new, rv, go)
            s_vec = r - alpha_new * v_new
            sn = norm(xp, s_vec)
            sdone = go & (sn <= tol)
            shat = M(s_vec)
            t = A(shat)
            tt = dot(xp, t, t)
            omega_new = safe_div(xp, dot(xp, t, s_vec), tt, go & ~sdone & (tt > 0))
            bad = bad | (go & ~sdone & ~(xp.abs(omega_new) > 0))
            go = active & ~bad
            sel = _selector(bk, xp, go)
            x_new = x + alpha_new * phat + omega_new * shat
            r_new = s_vec - omega_new * t
            rn_new = xp.where(sdone, sn, norm(xp, r_new))
            return (k + 1, sel(x_new, x), sel(r_new, r), rhat,
                    sel(p_new, p), sel(v_new, v),
                    sel(rho_new, rho), sel(alpha_new, alpha),
                    sel(omega_new, omega), sel(rn_new, rn),
                    iters + xp.astype(go, xp.int32), brk | bad)

        s = bk.while_loop(cond, body, state)
        return s[1], _info(xp, s[10], s[9], tol, s[11])


@dataclass(frozen=True)
class Richardson(AbstractLinearSolver):
    """Richardson iteration $x \\leftarrow x + \\omega\\,(b - A x)$: two vectors of state, one
    matrix-vector product per iteration.

    Converges when the spectral radius of $I - \\omega A$ is below 1. For a fixed point
    $x = T(x, \\theta)$, $A = \\partial_x T - I$ and `omega=-1` gives the iteration
    $u \\leftarrow \\partial_x T^\\top u - \\bar x$, the "fixed-point backward" of deep equilibrium
    models, which converges whenever $T$ is a contraction, with the least memory of any solver.
    A diverging iteration is reported as a breakdown.

    **Arguments:** `omega` (default 1), `rtol`, `atol`, `maxiter` (default $10n$), `ridge`.
    """

    omega: float = 1.0
    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    ridge: float = 0.0

    def __post_init__(self) -> None:
        _check_common(self)
        if not self.omega:
            raise ValueError(f"Richardson: expected a non-zero omega, got {self.omega!r}.")

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        maxiter = self._maxiter(b.shape[-1])
        tol = self._tol(xp, b)
        omega = self.omega
        x = _zeros_like_b(xp, b, x0)
        r = b - matvec(x) if x0 is not None else b
        rn = norm(xp, r)
        rn0 = rn
        state = (zero_int(xp, rn), x, r, rn, xp.zeros_like(rn, dtype=xp.int32),
                 xp.zeros_like(rn, dtype=xp.bool))

        def cond(s):
            return (s[0] < maxiter) & xp.any((s[3] > tol) & ~s[5])

        def body(s):
            k, x, r, rn, iters, brk = s
            go = (rn > tol) & ~brk
            x_new = x + omega * r
            r_new = b - matvec(x_new)
            rn_new = norm(xp, r_new)
            # growing far beyond the start, or non-finite: the iteration diverges
            bad = go & ~(rn_new <= 1e4 * xp.maximum(rn0, tol))
            go = go & ~bad
            sel = _selector(bk, xp, go)
            return (k + 1, sel(x_new, x), sel(r_new, r),
                    sel(rn_new, rn), iters + xp.astype(go, xp.int32), brk | bad)

        s = bk.while_loop(cond, body, state)
        return s[1], _info(xp, s[4], s[3], tol, s[5])


@dataclass(frozen=True)
class NeumannSolve(AbstractLinearSolver):
    """$k$ terms of the Neumann series for a fixed point's $A = J - I$ ($J = \\partial_z T$):
    $A^{-1} b = -(I - J)^{-1} b \\approx -\\sum_{j<k} J^j b$.

    This is Richardson's iteration with $\\omega = -1$ from $x_0 = 0$, stopped after exactly
    `terms` steps ($k - 1$ products with $A$) whatever the residual: an **approximation**, whose
    relative error is about $\\|J\\|^k$ for a contraction. It always reports `converged=True`
    (unless the result is not finite), so the implicit rule accepts it; `residual_norm` is that
    of the last computed residual (before the last term).

    **Arguments:** `terms` (default 5, at least 1).
    """

    terms: int = 5
    rtol: float | None = None
    atol: float = 0.0
    ridge: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.terms, bool) or not isinstance(self.terms, int) or self.terms < 1:
            raise ValueError(f"NeumannSolve: expected terms a positive int, got {self.terms!r}.")

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        # Richardson x <- x + ω (b - A x), ω = -1: x_1 = -b, x_{j+1} = J x_j - b, so
        # x_k = -(I + J + ... + J^{k-1}) b; the first term needs no product.
        x = -b
        r = b - matvec(x) if self.terms > 1 else b
        for j in range(1, self.terms):
            x = x - r
            if j < self.terms - 1:
                r = b - matvec(x)
        rn = xp.sqrt(xp.sum(r * r, axis=-1))
        finite = xp.isfinite(rn) & xp.all(xp.isfinite(x), axis=-1)
        iters = xp.zeros_like(rn, dtype=xp.int32) + (self.terms - 1)
        return x, LinearSolveInfo(iters, rn, finite, ~finite)


@dataclass(frozen=True)
class Auto(AbstractLinearSolver):
    """Pick a solver from the structure tags and the size $n$.

    $n \\le$ `dense_max`: `Cholesky` if tagged symmetric and positive definite, else `Dense`.
    Larger: `CG` if symmetric positive definite, `MINRES` if symmetric, else `GMRES`. Never
    normal-equation CG. The tolerances and `maxiter` are passed on.
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    ridge: float = 0.0
    dense_max: int = 256

    def __post_init__(self) -> None:
        _check_common(self)

    def select(self, n: int, tags: frozenset) -> AbstractLinearSolver:
        """The concrete solver used for a system of size `n` with structure `tags`."""
        spd = symmetric in tags and positive_definite in tags
        rtol, atol, ridge, maxiter = self.rtol, self.atol, self.ridge, self.maxiter
        if n <= self.dense_max:
            if spd:
                return Cholesky(rtol=rtol, atol=atol, ridge=ridge)
            return Dense(rtol=rtol, atol=atol, ridge=ridge)
        if spd:
            return CG(rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge)
        if symmetric in tags:
            return MINRES(rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge)
        return GMRES(rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        chosen = self.select(b.shape[-1], tags)
        return chosen._solve(bk, xp, matvec, b, x0, rmatvec, tags)
