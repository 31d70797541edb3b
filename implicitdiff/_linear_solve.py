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
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, cast

from ._array import all_finite, dot, norm, safe_div, size, zero_int
from ._diagnostics import LinearSolveInfo
from ._errors import StructureError
from ._tags import fixed_point_form, positive_definite, symmetric

MatVec = Callable[[Any], Any]


def _default_rtol(xp: Any, dtype: Any, direct: bool) -> float:
    # Krylov defaults give >= 10 correct digits in float64 on problems with condition number
    # up to ~100; direct solves only flag numerically singular systems.
    if dtype == xp.float64:
        return 1.5e-8 if direct else 1e-12
    if dtype == xp.float32:
        return 3e-3 if direct else 1e-6
    return 3e-2 if direct else 1e-3


# ---- the default tolerance of a backward solve follows the forward ----------------------------
#
# A derivative cannot be more exact than the x* it is taken at. With r = ‖F(x*, θ)‖ / (‖A‖ ‖x*‖)
# (per problem, ‖A‖ estimated by one product), x* has relative error δ = ‖A⁻¹F(x*)‖/‖x*‖ with
# r ≤ δ ≤ cond(A) r, and a backward solve stopped at relative residual ρ has relative error
# between ρ and cond(A) ρ: both are bounded by the same amplification of their residuals. So an
# iterative backward solve with no `rtol` of its own stops at ρ = BACKWARD_SAFETY · r (its error
# bound a tenth of the forward's), at least the dtype's default (`_default_rtol`: an exact
# forward keeps it) and at most BACKWARD_RTOL_CAP (a looser answer would leave the true-residual
# check and the uniqueness probe's refusal threshold, 10 ρ/100 against ~1/√n, too close to the
# answer's own error). The uniqueness probe's condition-number test keeps the solver's own
# tolerance (see `_Iterative._verify`), so a loose forward never makes a well-conditioned but
# non-trivial A look singular. Direct solvers cost the same at any tolerance (theirs is only a
# check) and keep theirs; so does a solver given an explicit `rtol`.

BACKWARD_SAFETY = 0.1
"""The default backward rtol of an iterative solver is this times the forward's relative
residual (clipped to `[_default_rtol, BACKWARD_RTOL_CAP]`)."""

BACKWARD_RTOL_CAP = 1e-4
"""The loosest default backward rtol, whatever the forward's accuracy."""


def follows_forward(solver: Any) -> bool:
    """Whether `solver`'s tolerance is chosen from the forward's accuracy: an iterative solver
    of this module with no `rtol` of its own (`Auto` resolves to one first)."""
    return isinstance(solver, _Iterative) and solver.rtol is None


def backward_rtol(xp: Any, dtype: Any, forward_residual: Any) -> Any:
    """The default rtol of an iterative backward solve, from the forward's relative residual
    $r = \\|F(x^*)\\| / (\\|A\\|\\,\\|x^*\\|)$ (an array, one per problem): `BACKWARD_SAFETY`
    $\\cdot\\, r$, at least the dtype's default and at most `BACKWARD_RTOL_CAP` (the default
    where $r$ is not finite). The one rule, used by `implicit_jvp` and `implicit_vjp`."""
    floor = _default_rtol(xp, dtype, False)
    cap = max(floor, BACKWARD_RTOL_CAP)
    r = BACKWARD_SAFETY * xp.astype(forward_residual, dtype)
    r = xp.where(xp.isfinite(r), r, xp.full_like(r, floor))
    return xp.minimum(xp.maximum(r, xp.full_like(r, floor)), xp.full_like(r, cap))


def with_rtol(solver: AbstractLinearSolver, rtol: Any) -> AbstractLinearSolver:
    """A copy of the iterative `solver` that stops at `rtol`, an array broadcastable against
    the norms of right-hand sides (`(..., 1)`), instead of the dtype's default. Not a field:
    the solver's `repr`, equality and hash stay those of the user's configuration."""
    out = copy.copy(solver)
    object.__setattr__(out, "_rtol_forward", rtol)
    return out


def _fmax(xp: Any, a: Any, b: float) -> Any:
    """`max(a, b)` for a float `a`, elementwise for an array."""
    if isinstance(a, (int, float)):
        return max(float(a), b)
    return xp.maximum(a, xp.full_like(a, b))


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
    _needs_symmetry = False  # CG and MINRES: probe symmetry even without the tag
    # Richardson: the `residual_norm` its `_solve` reports is the true ‖b − A x‖ (measured
    # with `_measure`'s norm), so `_verify` need not compute it again
    _exact_residual = False
    # the uniqueness probe's (first) system solved in the same loop as the answer's, stacked:
    # both systems' vectors live at once (not GMRES: its Krylov basis would double)
    _stacks_probe = True
    _rtol_forward: Any = None  # set by `with_rtol` (a backward solve following the forward)

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
        impl = self._concrete(b.shape[-1], tags, size(b.shape[:-1]))
        if b.shape[-1] == 0:  # nothing to solve: the empty answer, converged
            return _empty_solve(xp, b, x0)
        A = _shifted(matvec, impl.ridge)
        AT = None if rmatvec is None else _shifted(rmatvec, impl.ridge)
        probe = None
        if (isinstance(impl, _Iterative) and impl.check_singular and x0 is None
                and impl._stacks_probe):
            stage = impl._first_probe(xp, b)
            if stage[1] == impl.atol:
                # the (first) uniqueness probe, solved by the method itself with the same atol:
                # in the same loop as the answer (the rows of a batch do not interact), sharing
                # the loop's bookkeeping instead of running a second one
                x, info, probe = impl._solve_with_probe(bk, xp, A, b, AT, tags, stage)
        if probe is None:
            x, info = impl._solve(bk, xp, A, b, x0, AT, tags)
        if impl._needs_symmetry or symmetric in tags:
            bad = _not_symmetric(xp, matvec, b)
            # Untagged, a solver that assumes symmetry (CG, MINRES) met a non-symmetric A: a
            # breakdown (its answer, or a wrong one, would depend on rounding and backend).
            brk = info.breakdown if symmetric in tags else info.breakdown | bad
            info = info._replace(converged=info.converged & ~bad, breakdown=brk,
                                 not_symmetric=bad)
        else:
            info = info._replace(not_symmetric=xp.zeros_like(info.converged))
        return impl._verify(bk, xp, A, b, x, info, AT, tags, probe)

    def _concrete(self, n: int, tags: frozenset, batch: int = 1) -> AbstractLinearSolver:
        """The solver that does the work (`Auto` picks one) for `batch` systems of size `n`."""
        return self

    def _with_rtol(self, rtol: Any) -> AbstractLinearSolver:
        """`with_rtol(self, rtol)`: for a backend that re-solves at another point (PyTorch's
        differentiable solve) and passes the tolerance the core chose, `_rtol_forward`, along
        as data (under `torch.func.vmap` it gains the mapped dimension)."""
        return with_rtol(self, rtol)

    # What every iterative answer goes through (`_verify`): Krylov methods stop on their own
    # residual estimate, which a non-symmetric A (MINRES), rounding drift (CG) or an
    # inconsistent system (NormalCG) can make lie, and from x0 = 0 they return, for a singular
    # A and a consistent b, the minimum-norm solution: one that satisfies Ax = b but is not the
    # derivative, which does not exist (x* is not locally unique). So:
    #
    # 1. the true residual ‖b − Ax‖ (one product) must meet the tolerance, up to the rounding
    #    of the product itself, 100 √n ε (‖A‖‖x‖ + ‖b‖), ‖A‖ estimated by ‖Aw‖/‖w‖;
    # 2. a uniqueness probe: the same method solves A z = A w for a fixed pseudo-random w
    #    (scaled so that ‖Aw‖ = ‖b‖), with a 100 times tighter rtol (down to 10 ε). In two
    #    stages where that is below PROBE_FIRST_RTOL/√n: first at PROBE_FIRST_RTOL/√n, in the
    #    answer's loop, tested as the tight probe of a solve at 100 times that (its threshold
    #    on ‖e‖ below then no looser, its bound on ‖Ae‖/‖e‖ no smaller); then, only where that
    #    flags a possible singularity, the tight probe, which decides. (Richardson: one stage,
    #    at its own rtol, its residual being exact, in a loop of its own that stops each
    #    element once ‖z − w‖ is below the refusal threshold, PROBE_NEAR times it:
    #    `_solve_probe`.) A
    #    non-singular A gives z = w to the probe's accuracy, ‖z − w‖ ≲ cond(A) rtol/100 ‖w‖. A
    #    singular A gives a solution that misses w's null-space component,
    #    ‖z − w‖ ≈ ‖P_N w‖ ≈ ‖w‖/√n per null direction, along a direction e = z − w that A
    #    nearly annihilates. Refused when both show: ‖e‖ > max(3·10⁻³/√n, 10 rtol/100) ‖w‖,
    #    and ‖Ae‖/‖e‖ < 10 √rtol ‖A‖ (an upper bound on the smallest singular value, so a
    #    matrix with condition number below 1/(10 √rtol) is never refused, and a larger one only
    #    where the probe's error exceeds the first bound: about cond(A) > 10¹⁰ at n = 300 in
    #    float64 at the default rtol). A singular A escapes only when w has almost no
    #    null-space component, |⟨q, w⟩| < 3·10⁻³ ‖w‖/√n for a unit null vector q: a chance of
    #    about 0.2% per null direction for a random A (w is fixed and hash-random).
    #    Krylov methods from b alone cannot see the null space at all (for a symmetric A every
    #    residual lies in range(A)): a second vector is the least it takes, a second solve.
    #    Direct solvers run the same probe as a second column of their factorization.

    def _verify(self, bk: Any, xp: Any, A: MatVec, b: Any, x: Any, info: LinearSolveInfo,
                AT: MatVec | None, tags: frozenset, probe: _Probe | None = None
                ) -> tuple[Any, LinearSolveInfo]:
        """The true-residual check and the uniqueness probe of an iterative answer (`probe`:
        what `_solve_with_probe` solved with it, else None)."""
        return x, info

    @abc.abstractmethod
    def _solve(self, bk: Any, xp: Any, matvec: MatVec, b: Any, x0: Any,
               rmatvec: MatVec | None, tags: frozenset) -> tuple[Any, LinearSolveInfo]:
        ...

    def _rtol(self, xp: Any, b: Any, direct: bool = False) -> Any:
        """The tolerance the solve stops at: `rtol`, else the one `with_rtol` set (an
        array), else the dtype's default."""
        if self.rtol is not None:
            return self.rtol
        if self._rtol_forward is not None:
            return self._rtol_forward
        return _default_rtol(xp, b.dtype, direct)

    def _tol(self, xp: Any, b: Any, direct: bool = False) -> Any:
        rtol = self._rtol(xp, b, direct)
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


def _empty_solve(xp: Any, b: Any, x0: Any) -> tuple[Any, LinearSolveInfo]:
    """The solve of an empty system (`n = 0`): the empty answer, converged, no iterations."""
    rn = xp.sum(b * b, axis=-1)                                 # zeros of the batch shape
    iters = xp.sum(xp.zeros_like(b, dtype=xp.int32), axis=-1, dtype=xp.int32)
    ok = rn == 0
    x = xp.zeros_like(b) if x0 is None else x0
    return x, LinearSolveInfo(iters, rn, ok, ~ok, ~ok)


def _probe_vector(xp: Any, b: Any) -> Any:
    """A fixed pseudo-random vector shaped like `b`, entries in [-1/2, 1/2) (a hash of the
    index, made on b's device and dtype): its components along any fixed direction, a constant
    gauge mode included, are of the size a random vector's would be."""
    cumsum = getattr(xp, "cumulative_sum", None) or xp.cumsum
    k = cumsum(xp.ones_like(b), axis=-1)
    t = xp.sin(12.9898 * k + 78.233) * 43758.5453
    return (t - xp.floor(t)) - 0.5


class _Probe(NamedTuple):
    """The first uniqueness probe solved with the answer (`_Iterative._solve_with_probe`): the
    vector `w`, `Aw`, the scale `c` of the right-hand side `c Aw`, the solution `z` of
    $Az = cAw$, its solve's `info`, and the stage it was solved as (`_first_probe`)."""

    w: Any
    Aw: Any
    c: Any
    z: Any
    info: LinearSolveInfo
    stage: tuple[Any, float, Any]


def _probe_scale(xp: Any, nb: Any, nAw: Any) -> Any:
    """The factor that scales the probe's right-hand side $Aw$ to the norm of b (1 where
    either is 0), so that the probe is solved at b's tolerance."""
    has = nAw > 0
    return xp.where(has & (nb > 0), safe_div(xp, nb, nAw, has), xp.ones_like(nb))


PROBE_THRESHOLD = 3e-3
"""The uniqueness probe refuses where its error ‖z − w‖/‖w‖ exceeds max(PROBE_THRESHOLD/√n,
10 × the probe's rtol) along a direction A nearly annihilates (`_looks_singular`)."""

PROBE_FIRST_RTOL = PROBE_THRESHOLD / 100
"""The first stage of an iterative solver's uniqueness probe is solved at rtol
PROBE_FIRST_RTOL/√n (or the tight stage's rtol where that is looser): a tenth of what puts
its threshold at PROBE_THRESHOLD/√n, so a well-conditioned A passes it."""


PROBE_NEAR = 0.9
"""A probe that can (Richardson, whose error ‖z − w‖ is known at every step) stops an element
once that error is PROBE_NEAR times the threshold at or below which it is never refused
(`_probe_tau`): the verdict is then known. Below 1 only for rounding: the test recomputes the
same ‖z − w‖ from the same z (it was 0.5, one step more at a contraction rate of 0.5)."""


def _probe_tau(xp: Any, n: int, prtol: Any) -> Any:
    """The probe's error ‖z − w‖/‖w‖ at or below which an element is never refused (whatever
    A does to the error's direction): max(10 × the probe's accuracy `prtol`,
    PROBE_THRESHOLD/√n), per batch element like `prtol`."""
    return xp.maximum(10.0 * prtol, xp.full_like(prtol, PROBE_THRESHOLD / max(n, 1) ** 0.5))


def _looks_singular(xp: Any, n: int, rtol: Any, prtol: Any, w: Any, z: Any, nAe: Any,
                    anorm: Any) -> Any:
    """Per batch element (shape `(..., 1)`), whether the solve `z` of $Az = Aw$ shows that A
    is singular: `z` misses `w` by more than the solver's accuracy allows, along a direction
    $e = z - w$ that A nearly annihilates (`nAe` = $\\|A e\\|$, `anorm` ≈ $\\|A\\|$)."""
    e = z - w
    ne = norm(xp, e)
    rho = ne / norm(xp, w)
    sig = safe_div(xp, nAe, ne, ne > 0)
    tau = _probe_tau(xp, n, prtol)
    unique = ~((rho > tau) & (sig < 10.0 * xp.sqrt(rtol) * anorm))
    return ~(unique & xp.isfinite(rho) & (anorm > 0))


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
                 B: Any) -> Any:
    """`factor_solve(M, B)` for right-hand sides `B` of shape `(..., n, k)`; when it raises on a
    batch, again one element at a time, so one singular element (NaN) does not fail the
    independent others. Eager frameworks only raise."""
    try:
        return factor_solve(M, B)
    except bk.linalg_errors:
        if B.ndim == 2:
            return xp.zeros_like(B) * float("nan")
    n, k = B.shape[-2], B.shape[-1]
    Mf, Bf = xp.reshape(M, (-1, n, n)), xp.reshape(B, (-1, n, k))
    return xp.reshape(xp.stack([_per_element(bk, xp, factor_solve, Mf[i, ...], Bf[i, ...])
                                for i in range(Bf.shape[0])]), B.shape)


def _equilibrate(xp: Any, F: Any, symmetric: bool) -> tuple[Any, Any]:
    """Power-of-two row and column scales `(r, c)` (shapes `(..., n)`) with $RFC$ of unit
    max-norm rows and columns: solving $(RFC)y = Rb$, $x = Cy$ is exact in rounding (powers of
    two) and makes the uniqueness probe blind to how F's rows and x's entries are scaled (a
    problem in badly matched units is not singular). `symmetric`: one scale $D = R = C$ (SPD kept).
    """
    def pow2(v: Any) -> Any:
        ok = (v > 0) & xp.isfinite(v)
        v = xp.where(ok, v, xp.ones_like(v))
        return 2.0 ** xp.round(xp.log2(v))

    a = xp.abs(F)
    if symmetric:
        d = 1.0 / pow2(xp.sqrt(xp.max(a, axis=-1)))
        return d, d
    r = 1.0 / pow2(xp.max(a, axis=-1))
    c = 1.0 / pow2(xp.max(a * r[..., None], axis=-2))
    return r, c


def _direct(bk: Any, xp: Any, solver: Any, factor_solve: Callable[[Any, Any], Any], M: Any,
            F: Any, b: Any, *, symmetric: bool = False) -> tuple[Any, LinearSolveInfo]:
    """Solve with the factorization `factor_solve` of `F` (`M` itself, or its symmetric part),
    equilibrated (`_equilibrate`), check the residual with `M`, and with `check_singular` run
    the uniqueness probe (see `AbstractLinearSolver._verify`) on the equilibrated system with a
    second right-hand side $M'w$: one more column of the same factorization, so nearly free."""
    def mul(v: Any) -> Any:
        return (M @ v[..., None])[..., 0]

    r, c = _equilibrate(xp, F, symmetric)
    Fe = r[..., :, None] * F * c[..., None, :]
    Me = Fe if F is M else r[..., :, None] * M * c[..., None, :]

    def mul_e(v: Any) -> Any:
        return (Me @ v[..., None])[..., 0]

    probe = solver.check_singular
    cols = [r * b]
    if probe:
        w = _probe_vector(xp, b)
        Aw = mul_e(w)
        cols.append(Aw)
    X = _per_element(bk, xp, factor_solve, Fe, xp.stack(cols, axis=-1))
    x = c * X[..., 0]
    finite = all_finite(xp, x, keepdims=True)
    x = xp.where(finite, x, xp.zeros_like(x) * float("nan"))
    rr = mul(x) - b
    rn = norm(xp, rr)
    rn = xp.where(finite, rn, xp.full_like(rn, float("inf")))
    tol = asked = solver._tol(xp, b, direct=True)
    # the residual an exact solve leaves in rounding, row by row: ε |M| |x| (a badly scaled
    # system's exact answer is not refused for the rounding of its large terms)
    absmx = (xp.abs(M) @ xp.abs(x)[..., None])[..., 0]
    rounding = 4.0 * float(xp.finfo(b.dtype).eps) * norm(xp, absmx)
    tol = xp.maximum(tol, rounding)
    brk = ~finite | ~(rn <= tol)
    if probe:
        z = X[..., 1]
        rtol = solver.rtol if solver.rtol is not None else _default_rtol(xp, b.dtype, True)
        rtol = xp.full_like(rn, max(rtol, float(xp.finfo(b.dtype).eps)))
        anorm = norm(xp, Aw) / norm(xp, w)
        prtol = xp.full_like(rn, float(xp.finfo(b.dtype).eps))  # the factorization's accuracy
        brk = brk | _looks_singular(xp, b.shape[-1], rtol, prtol, w, z,
                                    norm(xp, mul_e(z) - Aw), anorm)
        # the probe's relative error estimates the answer's (about cond(A) eps): a hundred
        # times past the relative accuracy asked for (rtol, or atol/|b|) the system is singular
        # at working precision (float64 default: cond ~1e10), and the derivative would have
        # far fewer digits than asked (loosen rtol to accept them)
        eps = float(xp.finfo(b.dtype).eps)
        digits = 100.0 * xp.maximum(safe_div(xp, asked, norm(xp, b), norm(xp, b) > 0),
                                    xp.full_like(rn, eps))
        brk = brk | ~(norm(xp, z - w) <= digits * norm(xp, w))
    iters = xp.zeros_like(rn, dtype=xp.int32)
    return x, _info(xp, iters, rn, tol, brk)


@dataclass(frozen=True)
class Dense(AbstractLinearSolver):
    """Materialize $A$ (n matrix-vector products) and solve by LU factorization.

    Exact up to rounding; $O(n^3)$. Reports `breakdown` (hence a `SingularJacobianError` when
    used by the implicit rules) when the factorization fails or the solution's relative residual
    exceeds `rtol` (default $\\sqrt{\\epsilon}$ of the dtype), the mark of a numerically singular
    matrix, or when the uniqueness probe shows $A$ singular (a second right-hand side $Aw$ of
    the same factorization must give back $w$).

    **Arguments:** `rtol`, `atol` (residual check), `ridge` (solve $(A + \\text{ridge} I)x=b$),
    `check_singular` (default True: the uniqueness probe).
    """

    rtol: float | None = None
    atol: float = 0.0
    ridge: float = 0.0
    check_singular: bool = True

    def __post_init__(self) -> None:
        _check_common(self)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        M = bk.materialize(matvec, b)
        return _direct(bk, xp, self, xp.linalg.solve, M, M, b)


@dataclass(frozen=True)
class Cholesky(AbstractLinearSolver):
    """Materialize $A$ (symmetric positive definite) and solve by Cholesky factorization.

    About twice as fast as `Dense`. Reports a breakdown when $A$ is not positive definite, and,
    as `Dense`, when the residual check or the uniqueness probe fails.

    **Arguments:** `rtol`, `atol` (residual check), `ridge`, `check_singular` (as in `Dense`).
    """

    rtol: float | None = None
    atol: float = 0.0
    ridge: float = 0.0
    check_singular: bool = True

    def __post_init__(self) -> None:
        _check_common(self)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        M = bk.materialize(matvec, b)
        S = (M + xp.matrix_transpose(M)) / 2

        def factor_solve(S: Any, B: Any) -> Any:
            L = xp.linalg.cholesky(S)
            out = []
            for j in range(B.shape[-1]):
                y = bk.solve_triangular(L, B[..., j], lower=True)
                out.append(bk.solve_triangular(xp.matrix_transpose(L), y, lower=False))
            return xp.stack(out, axis=-1)

        return _direct(bk, xp, self, factor_solve, M, S, b, symmetric=True)


# ---- Krylov solvers ----------------------------------------------------------------------------

def _identity(v: Any) -> Any:
    return v


class _Iterative(AbstractLinearSolver):
    """The iterative solvers' answer check: the true residual and the uniqueness probe (see the
    comment above `AbstractLinearSolver._verify`)."""

    check_singular: bool

    def _own_rtol(self, xp: Any, b: Any) -> float:
        """`rtol`, else the dtype's default: the solver's own tolerance, which the tests of a
        singular A that compare with the size of A (never with the answer's error) use."""
        return self.rtol if self.rtol is not None else _default_rtol(xp, b.dtype, False)

    def _check_tol(self, xp: Any, b: Any) -> Any:
        """The bound on the true residual, in the norm of `_measure`."""
        return self._tol(xp, b)

    def _measure(self, xp: Any, r: Any) -> Any:
        return norm(xp, r)

    def _refine(self, bk: Any, xp: Any, A: MatVec, b: Any, x: Any, r: Any, tol: Any,
                where: Any, AT: MatVec | None, tags: frozenset) -> tuple[Any, ...]:
        """One step of iterative refinement where `where` (shape `(..., 1)`): the correction
        $A d = r$, $r = b - Ax$ the true residual, solved by this method to the absolute
        tolerance `tol` of the original system (elsewhere its right-hand side is 0: solved at
        once). Returns `(x + d, b - A(x + d), its norm, the correction's iterations, whether it
        converged, whether it broke down)` (the last three of the batch shape, `(...)`).

        A Krylov method's recurrence residual can drift from the true one by rounding: after a
        near-breakdown (BiCGStab's ⟨r̂, v⟩ ≈ 0 makes one step, and its residual, thousands of
        times larger than b), the rounding errors of that step stay in x, and the recurrence
        goes on converging while $\\|b - Ax\\|$ stays put (measured in float32 on a DEQ whose
        $I - J$ has condition number 3: true relative residual 6e-4 at a claimed 1e-6). The
        correction starts from the true residual, with a fresh Krylov space."""
        zero = xp.zeros_like(b)
        rr = xp.where(where, r, zero)
        nr = norm(xp, rr)
        solver = with_rtol(replace(cast(Any, self), rtol=None, atol=0.0),
                           safe_div(xp, tol + xp.zeros_like(nr), nr, where & (nr > 0)))
        d, dinfo = solver._solve(bk, xp, A, rr, None, AT, tags)
        x2 = x + xp.where(where, d, zero)
        r2 = b - A(x2)
        w = where[..., 0]
        return (x2, r2, self._measure(xp, r2),
                xp.where(w, dinfo.iterations, xp.zeros_like(dinfo.iterations)),
                dinfo.converged & w, dinfo.breakdown & w)

    def _first_probe(self, xp: Any, b: Any) -> tuple[Any, float, _Iterative | None]:
        """The uniqueness probe's first stage: `(rtol, atol, tight)`, the tolerances it is
        solved at, and the solver of the tight stage (`_probe_solver`) that decides where the
        first one shows a possible singularity; `tight` is None where the first stage is the
        tight one (its rtol is at least `PROBE_FIRST_RTOL`/√n already)."""
        tight = self._probe_solver(xp, b)
        t = tight._rtol(xp, b)
        first = PROBE_FIRST_RTOL / max(b.shape[-1], 1) ** 0.5
        if isinstance(t, (int, float)) and t >= first:
            return t, tight.atol, None
        return _fmax(xp, t, first), tight.atol, tight

    def _probe_solver(self, xp: Any, b: Any) -> _Iterative:
        """The solver of the second, tight uniqueness probe, run only where the first one
        shows a possible singularity: this one, 100 times tighter (down to 10 ε), so that a
        non-singular A's error on the probe stays far below the refusal threshold."""
        rtol = self._rtol(xp, b)
        eps = float(xp.finfo(b.dtype).eps)
        if isinstance(rtol, (int, float)):
            tight = max(rtol / 100, min(rtol, 10 * eps))
            return replace(cast(Any, self), rtol=tight, atol=self.atol / 100)
        tight = xp.maximum(rtol / 100, xp.minimum(rtol, xp.full_like(rtol, 10 * eps)))
        return cast(_Iterative, with_rtol(replace(cast(Any, self), atol=self.atol / 100),
                                          tight))

    def _is_own(self, xp: Any, b: Any, rtol: Any, atol: float) -> bool:
        """Whether `rtol` and `atol` are this solver's own tolerances (known without looking
        at array values)."""
        own = self._rtol(xp, b)
        return atol == self.atol and (rtol is own or (isinstance(rtol, (int, float)) and isinstance(
            own, (int, float)) and rtol == own))

    def _at(self, xp: Any, b: Any, rtol: Any, atol: float) -> _Iterative:
        """This solver stopping at `rtol` (a float, or an array broadcastable against the
        norms of right-hand sides) and `atol`; itself where those are its own."""
        if self._is_own(xp, b, rtol, atol):
            return self
        return cast(_Iterative, with_rtol(replace(cast(Any, self), rtol=None, atol=atol), rtol))

    def _refinable(self) -> bool:
        """Whether `_refine` applies: the true residual is measured in the plain norm."""
        return (type(self)._measure is _Iterative._measure
                and type(self)._check_tol is _Iterative._check_tol)

    def _solve_probe(self, bk: Any, xp: Any, A: MatVec, bw: Any, AT: MatVec | None,
                     tags: frozenset, ws: Any, near: Any) -> tuple[Any, LinearSolveInfo]:
        """The uniqueness probe's solve of $Az = $ `bw` (whose solution, where A is
        non-singular, is `ws`) in a loop of its own. A method that can (Richardson) stops an
        element as soon as ‖z − ws‖ ≤ `near` (shape `(..., 1)`): below the error that could
        ever be refused, where no further step could change the verdict; the others solve to
        their tolerance."""
        return self._solve(bk, xp, A, bw, None, AT, tags)

    def _probe_rhs(self, xp: Any, A: MatVec, b: Any) -> tuple[Any, Any, Any, Any]:
        """The uniqueness probe's vector `w`, `A w`, and the right-hand side `c A w` scaled so
        that ‖c A w‖ = ‖b‖ (the solve of b's tolerance), with `c`."""
        w = _probe_vector(xp, b)
        Aw = A(w)
        c = _probe_scale(xp, norm(xp, b), norm(xp, Aw))
        return w, Aw, c, c * Aw

    def _solve_with_probe(self, bk: Any, xp: Any, A: MatVec, b: Any, AT: MatVec | None,
                          tags: frozenset, stage: tuple[Any, float, Any]
                          ) -> tuple[Any, LinearSolveInfo, _Probe]:
        """`_solve` of b and of the first uniqueness probe's system (`stage`, from
        `_first_probe`) in one loop: the two stacked on a new leading axis (each product still
        one call of `A` per system), each row stopping at its own tolerance."""
        w, Aw, c, bw = self._probe_rhs(xp, A, b)
        prtol, patol, _ = stage
        solver: _Iterative = self
        if not self._is_own(xp, b, prtol, patol):  # the probe at another rtol: one per row
            nb = norm(xp, b)
            solver = self._at(xp, b, xp.stack([self._rtol(xp, b) + xp.zeros_like(nb),
                                               prtol + xp.zeros_like(nb)]), patol)

        def two(op: MatVec) -> MatVec:
            return lambda V: xp.stack([op(V[0, ...]), op(V[1, ...])])

        X, info2 = solver._solve(bk, xp, two(A), xp.stack([b, bw]), None,
                                 None if AT is None else two(AT), tags)
        info = LinearSolveInfo(*(f[0, ...] for f in info2[:4]))
        pinfo = LinearSolveInfo(*(f[1, ...] for f in info2[:4]))
        return X[0, ...], info, _Probe(w, Aw, c, X[1, ...], pinfo, stage)

    def _verify(self, bk, xp, A, b, x, info, AT, tags, probe=None):
        n = b.shape[-1]
        eps = float(xp.finfo(b.dtype).eps)
        conv, brk = info.converged[..., None], info.breakdown[..., None]
        ctol = self._check_tol(xp, b)
        if self._exact_residual:
            # the iteration's residual is b - A x itself, computed by the same product
            r, rn = None, info.residual_norm[..., None]
            if not self.check_singular and bk.known_all(conv & (rn <= ctol)):
                # eagerly, every element converged by its true residual and no probe is
                # asked for: every test below would pass and change nothing
                return x, info
        else:
            r = b - A(x)
            rn = self._measure(xp, r)
        if probe is not None:
            w, Aw = probe.w, probe.Aw
        else:
            w = _probe_vector(xp, b)
            Aw = A(w)
        nb, nAw = norm(xp, b), norm(xp, Aw)
        anorm = nAw / norm(xp, w)                     # ≈ ‖A‖ (a lower estimate)

        def slack_of(x: Any) -> Any:  # the rounding of the product itself
            return (100.0 * n ** 0.5 * eps) * (anorm * norm(xp, x) + nb)

        slack = slack_of(x)
        ok = rn <= xp.maximum(ctol, slack)      # NaN fails
        refuted = conv & ~ok
        if r is not None and self._refinable():
            # Converged by the recurrence but refuted by the true residual, or broken down in
            # the method (BiCGStab's ρ = 0 or ω = 0 can meet a non-singular A), not for a
            # structure the method assumes: first, once, the correction from the true residual
            # with a fresh Krylov space (`_refine`), then the tests again. A singular A, or one
            # the method cannot handle, fails the correction as it failed the first solve.
            nsym = info.not_symmetric
            structural = xp.zeros_like(brk) if nsym is None else nsym[..., None]
            redo = (refuted | (brk & ~structural)) & (rn < math.inf)

            def refine() -> tuple:
                x2, r2, rn2, it, dconv, dbrk = self._refine(bk, xp, A, b, x, r, ctol, redo, AT,
                                                            tags)
                w = redo[..., 0]
                return (x2, r2, rn2, info.iterations + it,
                        xp.where(w, dconv, conv[..., 0]), xp.where(w, dbrk, brk[..., 0]))

            x, r, rn, iters, c2, b2 = bk.when_any(
                redo, refine, lambda: (x, r, rn, info.iterations, conv[..., 0], brk[..., 0]))
            conv, brk = c2[..., None], b2[..., None]
            # the residual reported where the correction ran: the true one of x + d
            info = info._replace(iterations=iters, residual_norm=xp.where(
                redo[..., 0], rn[..., 0], info.residual_norm))
            slack = slack_of(x)
            ok = rn <= xp.maximum(ctol, slack)
            refuted = conv & ~ok
        # converged by the iteration's estimate, refuted by the true residual (after the
        # refinement): not the structure the method assumes, or no solution at all; a
        # breakdown, never an answer.
        brk = brk | refuted
        rep = xp.where(refuted, rn, info.residual_norm[..., None])
        # stopped (stalled, or out of iterations) with the true residual at the rounding level
        # of the product, the accuracy limit of any solver: a backward stable answer.
        conv = (conv | (~brk & (rn <= slack))) & ok
        # Not converged, and "raise maxiter" would not help: a breakdown. Either the iterate
        # diverged (a true residual far beyond ‖b‖: MINRES meeting a singular A through
        # rounding), or it sits at a least-squares point, Aᵀr ≈ 0 with r ≠ 0, so b has a
        # component outside the range of A that no x reaches (a singular A, no solution).
        stuck = ~conv & ~brk

        def stuck_breaks() -> Any:
            rr = b - A(x) if r is None else r
            rn2 = norm(xp, rr)
            out = brk | (stuck & ~(rn2 <= 1e4 * nb))
            ATop = AT if AT is not None else (A if self._needs_symmetry else None)
            if ATop is not None:
                root = max(self._own_rtol(xp, b), eps) ** 0.5
                lsq = (norm(xp, ATop(rr)) <= 10.0 * root * anorm * rn2) & (rn2 > 0)
                out = out | (stuck & lsq)
            return out

        # (its products only where some element is stuck, compiled too)
        brk = bk.when_any(stuck, stuck_breaks, lambda: brk)
        if self.check_singular and not bk.known_all(~conv):
            # the probe A z = A w, scaled so that the tolerance is the one of the solve of b
            c = probe.c if probe is not None else _probe_scale(xp, nb, nAw)
            bw, ws = c * Aw, c * w
            nbw = norm(xp, bw)
            # the condition-number test with the solver's own tolerance (not one loosened to
            # follow the forward: a well-conditioned A must never look singular)
            rtol = xp.maximum(xp.full_like(nbw, max(self._own_rtol(xp, b), eps)),
                              safe_div(xp, xp.full_like(nbw, self.atol), nbw, nbw > 0))

            def accuracy(prtol: Any, patol: float) -> Any:
                # the probe's accuracy as it is solved, relative to its right-hand side
                return xp.maximum(_fmax(xp, prtol, eps) + xp.zeros_like(nbw),
                                  safe_div(xp, xp.full_like(nbw, patol), nbw, nbw > 0))

            def singular_at(rtol: Any, prtol: Any, patol: float, z: Any,
                            pinfo: LinearSolveInfo, exact: bool, rhs: Any) -> Any:
                # ‖A z − A w‖: the probe's own true residual where its solver reports that
                nAe = pinfo.residual_norm[..., None] if exact else norm(xp, A(z) - rhs)
                return _looks_singular(xp, n, rtol, accuracy(prtol, patol), ws, z, nAe, anorm)

            # the first stage (in the same loop as the answer, when `probe` is given)
            if probe is not None:
                z, pinfo, (prtol, patol, tight) = probe.z, probe.info, probe.stage
            else:
                prtol, patol, tight = self._first_probe(xp, b)
                # done where its error is below what could be refused (`_solve_probe`)
                near = PROBE_NEAR * _probe_tau(xp, n, accuracy(prtol, patol)) * norm(xp, ws)
                z, pinfo = self._at(xp, b, prtol, patol)._solve_probe(bk, xp, A, bw, AT, tags,
                                                                      ws, near)
            # Where a tight stage follows, the first is the tight probe of a solve at 100 times
            # its rtol (its test's bound on the smallest singular value from that rtol, or
            # the solver's own where larger): a singular A flags it as surely, and only a
            # flagged element is decided by the tight stage.
            rtol1 = rtol if tight is None else xp.maximum(rtol, 100 * prtol + xp.zeros_like(rtol))
            singular = conv & singular_at(rtol1, prtol, patol, z, pinfo, self._exact_residual,
                                          bw)
            if tight is not None:
                # where the first probe shows a possible singularity (an error beyond the
                # threshold along a direction A nearly annihilates), the tight probe decides
                # (elsewhere its right-hand side is 0: solved at once, no iteration), and
                # only where some element is flagged (compiled too: `when_any`)
                def decide() -> Any:
                    bw2 = xp.where(singular, bw, xp.zeros_like(bw))
                    z2, pinfo2 = tight._solve(bk, xp, A, bw2, None, AT, tags)
                    return singular & singular_at(rtol, tight._rtol(xp, b), tight.atol, z2,
                                                  pinfo2, tight._exact_residual, bw2)

                singular = bk.when_any(singular, decide, lambda: singular)
            brk = brk | singular
            conv = conv & ~singular
        return x, info._replace(residual_norm=rep[..., 0], converged=conv[..., 0],
                                breakdown=brk[..., 0])


@dataclass(frozen=True)
class CG(_Iterative):
    """Conjugate gradient, for symmetric positive definite $A$.

    Breaks down (reported, never silent) when it meets a direction of non-positive curvature,
    or when a probe shows $A$ is not symmetric (two products per solve). Like every iterative
    solver here, its answer is then checked (see the module notes): the true residual
    $\\|b - Ax\\|$ must meet the tolerance (up to the rounding of the product), and a
    uniqueness probe (a second system, $Az = Aw$ for a fixed pseudo-random $w$, solved in the
    same loop as the answer, and again 100 times tighter only where it shows a possible
    singularity) refuses a singular $A$, for which the method would return the minimum-norm
    solution of a consistent system instead of failing.

    **Arguments:**

    - `rtol`, `atol`: stop when $\\|r\\| \\le \\max(\\text{atol}, \\text{rtol}\\,\\|b\\|)$; default
      rtol is $10^{-12}$ in float64, $10^{-6}$ in float32; in a derivative, looser where the
      forward's $x^*$ is less accurate (`backward_rtol`; docs/linear-solvers.md).
    - `maxiter`: default $10n$.
    - `preconditioner`: $v \\mapsto M^{-1} v$, symmetric positive definite.
    - `ridge`: solve $(A + \\text{ridge}\\, I) x = b$.
    - `check_singular`: default True, the uniqueness probe; False skips it (half the cost)
      when $A$ is known to be non-singular.
    """

    _needs_symmetry = True

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    preconditioner: Callable[[Any], Any] | None = field(default=None, compare=True)
    ridge: float = 0.0
    check_singular: bool = True

    def __post_init__(self) -> None:
        _check_common(self)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        return _cg(bk, xp, matvec, b, x0, self.preconditioner or _identity, self._tol(xp, b),
                   self._maxiter(b.shape[-1]))


def _cg(bk, xp, A, b, x0, M, tol, maxiter):
    plain = M is _identity
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
        # unpreconditioned, r·z is ‖r‖²: its square root saves a reduction per step
        rn = sel(xp.sqrt(rz_new) if plain else norm(xp, r), rn)
        return (k + 1, x, r, p, rz, rn, iters + xp.astype(go, xp.int32), brk | bad)

    k, x, r, p, rz, rn, iters, brk = bk.while_loop(cond, body, (k, x, r, p, rz, rn, iters, brk))
    return x, _info(xp, iters, rn, tol, brk)


@dataclass(frozen=True)
class NormalCG(_Iterative):
    """CG on the normal equations $A^\\top A x = A^\\top b$, for any non-singular $A$.

    Squares the condition number, so it is never chosen automatically; needs products with
    $A^\\top$. The iteration stops on the normal-equation residual
    $\\|A^\\top(b - Ax)\\| \\le \\max(\\text{atol}, \\text{rtol}\\,\\|A^\\top b\\|)$, which is what
    `residual_norm` reports. A least-squares solution of a system that has no solution makes
    that residual small too, so the answer must then also satisfy $A x = b$: its true residual
    $\\|b - Ax\\|$ must be within $\\max(\\text{atol}, \\sqrt{\\text{rtol}}\\,\\|b\\|)$ (the
    normal equations lose up to half the digits), else the solve is reported as a breakdown; and
    the uniqueness probe refuses a singular $A$, as for the other solvers.

    **Arguments:** `rtol`, `atol`, `maxiter`, `ridge`, `check_singular` as in `CG`;
    `least_squares` (default False): True asks, explicitly, for the minimum-norm least-squares
    solution $A^+ b$ (what CG on the normal equations from $x_0 = 0$ converges to): no true
    residual check, no uniqueness probe. For a singular $\\partial_x F$ that is a choice of
    derivative (the one of the minimum-norm root), not the derivative, which does not exist.
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    ridge: float = 0.0
    check_singular: bool = True
    least_squares: bool = False

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

    def _check_tol(self, xp: Any, b: Any) -> Any:
        rtol = _fmax(xp, self._rtol(xp, b), float(xp.finfo(b.dtype).eps))
        nb = norm(xp, b)
        return xp.maximum(rtol ** 0.5 * nb, xp.full_like(nb, self.atol))

    def _verify(self, bk, xp, A, b, x, info, AT, tags, probe=None):
        if self.least_squares:
            return x, info
        return super()._verify(bk, xp, A, b, x, info, AT, tags, probe)


@dataclass(frozen=True)
class MINRES(_Iterative):
    """Minimum residual method, for symmetric (possibly indefinite) $A$.

    MINRES's residual estimate holds only for a symmetric $A$, so every solve first probes the
    symmetry (two products, as for the `symmetric` tag): a non-symmetric $A$ is a breakdown on
    every backend, never an answer. The answer is then checked as for `CG`.

    **Arguments:** `rtol`, `atol`, `maxiter`, `preconditioner` (symmetric positive definite),
    `ridge`, `check_singular`, as in `CG`. The tolerance applies to the (preconditioned)
    residual, $\\sqrt{r^\\top M^{-1} r}$ with a preconditioner $M^{-1}$.
    """

    _needs_symmetry = True

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    preconditioner: Callable[[Any], Any] | None = None
    ridge: float = 0.0
    check_singular: bool = True

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
            self._rtol(xp, b) * beta1,
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

    def _measure(self, xp: Any, r: Any) -> Any:
        if self.preconditioner is None:
            return norm(xp, r)
        rr = dot(xp, r, self.preconditioner(r))
        return xp.sqrt(xp.where(rr >= 0, rr, xp.full_like(rr, float("nan"))))

    def _check_tol(self, xp: Any, b: Any) -> Any:
        if self.preconditioner is None:
            return self._tol(xp, b)
        nb = self._measure(xp, b)
        return xp.maximum(self._rtol(xp, b) * nb, xp.full_like(nb, self.atol))


@dataclass(frozen=True)
class GMRES(_Iterative):
    """Restarted GMRES, for any non-singular $A$.

    Each cycle builds an orthonormal Krylov basis of up to `restart` vectors (classical
    Gram-Schmidt applied twice), keeps the small least-squares problem triangular with Givens
    rotations, and ends early once the residual estimate is within tolerance; then it checks the
    true residual $\\|b - Ax\\|$. A cycle that does not reduce it stops the method (reported as
    not converged). All loops are the backend's `while_loop`, so under `jit` the method compiles
    once, whatever `restart` is.

    **Arguments:** `rtol`, `atol`, `maxiter` (matrix-vector products, default $10n$), `restart`
    (default 30), `preconditioner` (applied on the right), `ridge`, `check_singular` (as in
    `CG`: on a singular $A$ with a consistent right-hand side GMRES would return a minimum-norm
    solution; the uniqueness probe refuses it).
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    restart: int = 30
    preconditioner: Callable[[Any], Any] | None = None
    ridge: float = 0.0
    check_singular: bool = True

    _stacks_probe = False  # its basis, restart + 1 vectors per system, would double

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
    steps taken per element and the steps taken by the batch.

    The basis is stored batch first, `(..., m + 1, n)`, so that its products (the projections,
    reading row j, the update) are batched matrix products and one-row writes
    (`Backend.ring_write`, in place on eager backends), whose cost does not grow with the
    unused rows; the small arrays of the least-squares problem (`H`, the rotations, `g`) keep
    the row index first."""
    lead = (1,) * b.ndim
    idx = xp.reshape(xp.arange(m + 1, device=_dev(b)), (m + 1, *lead))  # row index (small)
    cidx = xp.reshape(xp.arange(m, device=_dev(b)), (m, *lead))  # column index
    hcol = xp.reshape(xp.arange(m, device=_dev(b)), (1, m, *lead))
    brow = xp.reshape(xp.arange(m + 1, device=_dev(b)), (m + 1, 1))  # basis row, batch first
    bcol = xp.reshape(brow, (1, m + 1))
    scal = (*b.shape[:-1], 1)  # a per-element scalar
    zero = zero_int(xp, b)  # the loop counters start from it

    def pick(arr: Any, index: Any, j: Any) -> Any:  # arr[j] along axis 0
        return xp.sum(xp.where(index == j, arr, xp.zeros_like(arr)), axis=0)

    def basis_row(V: Any, j: Any) -> Any:  # V[..., j, :], as a product with a one-hot row
        return xp.matmul(xp.astype(bcol == j, V.dtype), V)[..., 0, :]

    def cycle(r: Any, rn: Any, active: Any) -> tuple[Any, Any, Any]:
        V = xp.zeros((*b.shape[:-1], m + 1, b.shape[-1]), dtype=b.dtype, device=_dev(b))
        everyone = xp.ones_like(rn, dtype=xp.bool)
        V = bk.ring_write(V, 0, safe_div(xp, r, rn, rn > 0), everyone, True)
        H = xp.zeros((m + 1, m, *scal), dtype=b.dtype, device=_dev(b))
        Q = xp.astype(brow == bcol, b.dtype)                      # the identity
        Q = Q + xp.zeros((*b.shape[:-1], m + 1, m + 1), dtype=b.dtype, device=_dev(b))
        g = xp.where(idx == 0, rn[None, ...], xp.zeros((m + 1, *scal), dtype=b.dtype,
                                                  device=_dev(b)))
        steps = xp.zeros_like(rn, dtype=xp.int32)
        res = rn
        j0 = zero

        def inner_cond(s):
            j, res, act = s[0], s[5], s[7]
            return (j < m) & xp.any(act & (res > tol))

        # (products as a row times a matrix: the batched matrix-vector form is several times
        # slower on CPU)
        def project(V: Any, w: Any, below: Any) -> tuple[Any, Any]:
            """w minus its components along the basis rows <= j, and those components (a row,
            `(..., 1, m + 1)`)."""
            h = xp.matmul(w[..., None, :], xp.matrix_transpose(V))
            h = xp.where(below, h, xp.zeros_like(h))
            return w - xp.matmul(h, V)[..., 0, :], h

        def inner_body(s):
            j, V, H, Q, g, res, steps, act = s
            live = act & (res > tol)
            w = A(M(basis_row(V, j)))
            below = bcol <= j
            w, h1 = project(V, w, below)
            w, h2 = project(V, w, below)
            hn = norm(xp, w)
            slot = xp.zeros_like(steps) + (j + 1)
            V = bk.ring_write(V, slot, safe_div(xp, w, hn, hn > 0), live, False)
            # the new column of the Hessenberg matrix (as a row), rotated by Q, the product of
            # the rotations so far: one product instead of j rotations in turn
            at_j, at_j1 = bcol == j, bcol == j + 1
            e_j, e_j1 = xp.astype(at_j, b.dtype), xp.astype(at_j1, b.dtype)   # (1, m + 1)
            col = xp.matmul(h1 + h2 + e_j1 * hn[..., None], xp.matrix_transpose(Q))
            a = xp.sum(e_j * col, axis=-1)                      # (..., 1)
            c = xp.sum(e_j1 * col, axis=-1)
            gamma = xp.sqrt(a * a + c * c)
            nz = gamma > 0
            cj = xp.where(nz, safe_div(xp, a, gamma, nz), xp.ones_like(gamma))
            sj = safe_div(xp, c, gamma, nz)
            col = xp.where(at_j, gamma[..., None], xp.where(at_j1, xp.zeros_like(col), col))
            # rows j and j + 1 of Q take the new rotation
            qj, qj1 = xp.matmul(e_j, Q), xp.matmul(e_j1, Q)     # (..., 1, m + 1)
            cjb, sjb = cj[..., None], sj[..., None]
            Q_new = xp.where(brow == j, cjb * qj + sjb * qj1,
                             xp.where(brow == j + 1, cjb * qj1 - sjb * qj, Q))
            Q = xp.where(live[..., None], Q_new, Q)
            col = xp.moveaxis(col, -1, 0)                       # (m + 1, ..., 1), like H
            # elements that already converged keep their state (as if they had stopped)
            H = xp.where((hcol == j) & live, col[:, None, ...], H)
            gj = pick(g, idx, j)
            g_new = xp.where(idx == j, (cj * gj)[None, ...],
                             xp.where(idx == j + 1, (-sj * gj)[None, ...], g))
            g = xp.where(live, g_new, g)
            res_new = xp.abs(pick(g, idx, j + 1))
            res = xp.where(live, res_new, res)
            return (j + 1, V, H, Q, g, res, steps + xp.astype(live, xp.int32), act)

        s = bk.while_loop(inner_cond, inner_body, (j0, V, H, Q, g, res, steps, active))
        used, V, H, g, steps = s[0], s[1], s[2], s[4], s[6]

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

        _, y = bk.while_loop(back_cond, back_body, (used - 1, y))
        # dx = sum_k y_k V[..., k, :]: (..., 1, m) @ (..., m, n)
        yb = xp.matrix_transpose(xp.moveaxis(y, 0, -2))
        dx = xp.matmul(yb, V[..., :m, :])[..., 0, :]
        return dx, steps, used

    return cycle


def _dev(x: Any) -> Any:
    import array_api_compat

    return array_api_compat.device(x)


@dataclass(frozen=True)
class BiCGStab(_Iterative):
    """Stabilized bi-conjugate gradient, for any non-singular $A$; short recurrences, two
    matrix-vector products per iteration. Breakdowns ($\\rho = 0$, $\\omega = 0$) are reported.

    **Arguments:** `rtol`, `atol`, `maxiter`, `preconditioner`, `ridge`, `check_singular`, as
    in `CG`.
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    preconditioner: Callable[[Any], Any] | None = None
    ridge: float = 0.0
    check_singular: bool = True

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
class Richardson(_Iterative):
    """Richardson iteration $x \\leftarrow x + \\omega\\,(b - A x)$: two vectors of state, one
    matrix-vector product per iteration.

    Converges when the spectral radius of $I - \\omega A$ is below 1. For a fixed point
    $x = T(x, \\theta)$, $A = \\partial_x T - I$ and `omega=-1` gives the iteration
    $u \\leftarrow \\partial_x T^\\top u - \\bar x$, the "fixed-point backward" of deep equilibrium
    models, which converges whenever $T$ is a contraction, with the least memory of any solver.
    A diverging iteration is reported as a breakdown; the answer is checked as for `CG`.

    With a `fallback` (`BiCGStab` or `GMRES`), an element whose iteration is slow or diverges
    is handed to it instead: every `RICHARDSON_WINDOW` steps each element must have cut its
    residual by `RICHARDSON_MIN_GAIN`, and a residual growing beyond $10^4$ times the start
    hands it over too (only a non-finite one is a breakdown). The fallback starts from the last
    iterate and stops at the same tolerance (its own `rtol`, `atol` and `check_singular` are not
    used: Richardson's tolerance and checks apply; its `maxiter`, `restart` and
    `preconditioner` are); then the true residual of every answer is measured
    once more (one product, only where the fallback ran: eagerly, not at all when nothing was
    handed over). So a contraction costs what plain Richardson costs, and a map that does not
    contract, or contracts slowly, gets a Krylov method instead of thousands of iterations or a
    failure.

    **Arguments:** `omega` (default 1), `rtol`, `atol`, `maxiter` (default $10n$), `ridge`,
    `check_singular`, `fallback` (default None: none).
    """

    omega: float = 1.0
    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    ridge: float = 0.0
    check_singular: bool = True
    fallback: AbstractLinearSolver | None = None

    def __post_init__(self) -> None:
        _check_common(self)
        if not self.omega:
            raise ValueError(f"Richardson: expected a non-zero omega, got {self.omega!r}.")
        if self.fallback is not None and not isinstance(self.fallback, (BiCGStab, GMRES)):
            raise TypeError(
                "Richardson: fallback: expected None, idf.BiCGStab() or idf.GMRES() (a method "
                "for any non-singular A that starts from Richardson's iterate), got "
                f"{self.fallback!r}.")

    _exact_residual = True  # r = b - A x is what each step computes (and the fallback's is
    # measured again)

    # The probe in a loop of its own, not stacked with the answer: its error is known at
    # every step (x − w), so it stops as soon as that is below what could be refused, usually
    # long before the answer's tolerance (`_solve_probe`); stacked, it would cost a product
    # per step until the answer is done.
    _stacks_probe = False

    def _first_probe(self, xp: Any, b: Any) -> tuple[Any, float, _Iterative | None]:
        # its residual is the true one: a tighter tolerance may be out of reach, so the
        # probe is solved at its own tolerance, in one stage (no tight one follows)
        return self._rtol(xp, b), self.atol, None

    def _solve_probe(self, bk, xp, A, bw, AT, tags, ws, near):
        return self._solve(bk, xp, A, bw, None, AT, tags, near=(ws, near))

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags, near=None):
        # near: None, or (target, distance): an element also stops once its iterate is within
        # the distance of the target (the uniqueness probe, `_solve_probe`)
        maxiter = self._maxiter(b.shape[-1])
        tol = self._tol(xp, b)
        omega = self.omega
        fb = self.fallback
        x = _zeros_like_b(xp, b, x0)
        r = b - matvec(x) if x0 is not None else b
        rn = norm(xp, r)
        # growing far beyond the start, or non-finite: the iteration diverges
        limit = 1e4 * xp.maximum(rn, tol)
        none = xp.zeros_like(rn, dtype=xp.bool)
        # (k, x, r, rn, iterations, breakdown, handed over, the residual at the last check,
        # whether the element still iterates, and with `near`: whether the iterate is within
        # the distance of the target). An element that stops (converged, broken down, handed
        # over, near) stands still from then on, so "still iterates" only ever turns false.
        state = (zero_int(xp, rn), x, r, rn, xp.zeros_like(rn, dtype=xp.int32), none, none,
                 rn, rn > tol) + ((none,) if near is not None else ())
        # eagerly (the body runs once per step, with values): the steps made, and whether
        # every element still iterates (known from the last step's look, one per step): then
        # no select, no count per element and no test before the step are needed
        eager = {"steps": 0, "all": not bk.is_traced(rn) and bk.known_all(state[8])}

        def cond(s):
            if bk.is_traced(s[3]):
                return (s[0] < maxiter) & xp.any(s[8])
            if eager["steps"] >= maxiter:
                return False
            return eager["all"] or bool(xp.any(s[8]))

        def body(s):
            k, x, r, rn, iters, brk, handed, rck, go = s[:9]
            traced = bk.is_traced(rn)
            everyone = eager["all"] and not traced
            x_new = x - r if omega == -1 else x + omega * r
            r_new = b - matvec(x_new)
            rn_new = norm(xp, r_new)
            fine = rn_new <= limit      # false: growing far beyond the start, or not finite
            going = None                # eagerly: known that every element goes on
            dist = None if near is None else norm(xp, x_new - near[0])
            if everyone:
                # the usual case: every element iterates, none diverged, none converged (or
                # got near the target) now: one look for all
                going = fine & (rn_new > tol)
                if near is not None:
                    going = going & (dist > near[1])
                if not bk.known_all(going):
                    going = None
            if going is not None or (not traced and bk.known_all(fine)):
                bad = None              # eagerly, nothing diverged (the usual case)
            else:
                bad = go & ~fine
            slow = None   # the elements handed over as slow at this step (None: none)
            if fb is not None and bad is not None:
                # divergence hands the element over; only a non-finite residual breaks down
                grown = bad & (rn_new < math.inf)
                bad = bad & ~grown
                handed = handed | grown
                go = go & ~grown
            if fb is not None:
                if traced:   # compiled: the check every step, masked
                    check = (k + 1) % RICHARDSON_WINDOW == 0
                    slow = go & check & ~(rn_new <= RICHARDSON_MIN_GAIN * rck)
                    rck = xp.where(check, rn_new, rck)
                elif (eager["steps"] + 1) % RICHARDSON_WINDOW == 0:   # only where it falls
                    slow = go & ~(rn_new <= RICHARDSON_MIN_GAIN * rck)
                    rck = rn_new
                if slow is not None:
                    if bad is not None:
                        slow = slow & ~bad
                    slow = slow & (rn_new > tol)
                    handed = handed | slow
            if bad is not None:
                go = go & ~bad
                brk = brk | bad
                everyone = False
            # go: the elements that made this step (eagerly, the counter is `eager["steps"]`)
            k = k + 1 if traced else k
            if everyone:
                out = (k, x_new, r_new, rn_new, iters + 1)
            else:
                out = (k, xp.where(go, x_new, x), xp.where(go, r_new, r),
                       xp.where(go, rn_new, rn), iters + xp.astype(go, xp.int32))
            if going is not None and slow is None:
                nxt = going             # every element goes on
            else:
                nxt = go & (rn_new > tol)   # (an element handed over before stood still)
                going = None
            if slow is not None:
                nxt = nxt & ~slow
            out += (brk, handed, rck)
            if near is not None and going is not None:
                out += (nxt, s[9])      # none got near
            elif near is not None:
                hit = go & (dist <= near[1])
                out += (nxt & ~hit, s[9] | hit)
            else:
                out += (nxt,)
            if not traced:
                eager["steps"] += 1
                eager["all"] = going is not None or bk.known_all(out[8])
            return out

        s = bk.while_loop(cond, body, state)
        x, rn, iters, brk = s[1], s[3], s[4], s[5]
        if fb is not None:
            # handed over, or stopped by maxiter: the fallback from where Richardson stopped
            # (not where the iterate is near the target: done)
            need = (s[6] | (rn > tol)) & ~brk
            if near is not None:
                need = need & ~s[9]
            def fall_back() -> tuple:
                solver = with_rtol(replace(cast(Any, fb), rtol=None, atol=self.atol),
                                   self._rtol(xp, b))
                # the others get the system 0 from 0, solved at once (where the fallback runs
                # for every element, compiled under `vmap`, an element stopped near the
                # probe's target, its residual above the tolerance, is not iterated for
                # nothing)
                zero = xp.zeros_like(b)
                x_fb, info = solver._solve(bk, xp, matvec, xp.where(need, b, zero), xp.where(
                    need, x, zero), rmatvec, tags)
                x2 = xp.where(need, x_fb, x)
                # the true residual, as Richardson's own (the same where x is unchanged)
                r2 = b - matvec(x2)
                rn2 = norm(xp, r2)
                iters2 = iters + xp.where(need, info.iterations[..., None],
                                          xp.zeros_like(iters))
                # the fallback's answer not within the tolerance by its true residual (its
                # recurrence drifted by rounding, or it broke down): corrected once from the
                # true residual (`_refine`)
                fb_brk = need & info.breakdown[..., None]
                drift = need & (tol < rn2) & (rn2 < math.inf)

                def refine() -> tuple:
                    x3, _, rn3, it, _, dbrk = cast(_Iterative, solver)._refine(
                        bk, xp, matvec, b, x2, r2, tol, drift, rmatvec, tags)
                    return (x3, rn3, iters2 + it[..., None],
                            xp.where(drift, dbrk[..., None], fb_brk))

                x2, rn2, iters2, fb_brk = bk.when_any(
                    drift, refine, lambda: (x2, rn2, iters2, fb_brk))
                return x2, rn2, iters2, brk | fb_brk

            # only where some element needs it (compiled too: `when_any`)
            x, rn, iters, brk = bk.when_any(need, fall_back, lambda: (x, rn, iters, brk))
        return x, _info(xp, iters, rn, tol, brk)


RICHARDSON_WINDOW = 5
"""`Richardson(fallback=...)`: every this many steps, each element's residual is compared with
the one at the previous check."""

RICHARDSON_MIN_GAIN = 0.25
"""`Richardson(fallback=...)`: the factor by which each element's residual must have fallen
over `RICHARDSON_WINDOW` steps (a rate of 0.76 per step), else it is handed to the fallback: a
slower rate would need more products than a Krylov method. The fixed points measured in
`benchmarks/` contract at 0.4-0.64 per step (never handed over); a fixed point whose Jacobian
has a real spectrum up to 0.98 is handed over at the first check, for a tenth of plain
Richardson's products (46 against 543 with BiCGStab, 37 with GMRES, n = 60, rtol 1e-10)."""


@dataclass(frozen=True)
class NeumannSolve(AbstractLinearSolver):
    """$k$ terms of the Neumann series for a fixed point's $A = J - I$ ($J = \\partial_z T$):
    $A^{-1} b = -(I - J)^{-1} b \\approx -\\sum_{j<k} J^j b$.

    This is Richardson's iteration with $\\omega = -1$ from $x_0 = 0$, stopped after exactly
    `terms` steps ($k - 1$ products with $A$) whatever the residual: an **approximation**, whose
    relative error is about $\\|J\\|^k$ for a contraction. One more product gives the true
    residual of the answer, $\\|b - Ax\\| = \\|J^k b\\|$, which `residual_norm` reports. It
    reports `converged=True`, so the implicit rule accepts the approximation, unless the result
    is not finite or the residual grew beyond $10^4 \\|b\\|$ (T is not a contraction at $x^*$:
    a breakdown), or, where `rtol` or `atol` is given, the residual misses
    $\\max(\\text{atol}, \\text{rtol}\\,\\|b\\|)$. It has no uniqueness probe: an eigenvalue 1 of
    $J$ (a singular $A$) is not detected; use `Richardson(omega=-1.0)` or `GMRES` for a checked
    solve.

    **Arguments:** `terms` (default 5, at least 1), `rtol`, `atol` (default: no tolerance, the
    series is an approximation by choice), `ridge`.
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
        rn = norm(xp, b - matvec(x))                  # the true residual of the answer
        nb = norm(xp, b)
        finite = xp.isfinite(rn) & all_finite(xp, x, keepdims=True)
        brk = ~finite | ~(rn <= 1e4 * nb)
        conv = ~brk
        if self.rtol is not None or self.atol > 0:
            conv = conv & (rn <= xp.maximum((self.rtol or 0.0) * nb, xp.full_like(nb, self.atol)))
        iters = xp.zeros_like(rn, dtype=xp.int32) + (self.terms - 1)
        return x, LinearSolveInfo(iters[..., 0], rn[..., 0], conv[..., 0], brk[..., 0])


@dataclass(frozen=True)
class Auto(AbstractLinearSolver):
    """Pick a solver from the structure tags, the size $n$ and the number of systems solved
    together (a batch).

    $n \\le$ `dense_max`: `Cholesky` if tagged symmetric and positive definite, else `Dense`.
    Larger: `CG` if symmetric positive definite, `MINRES` if symmetric, else `GMRES`. Never
    normal-equation CG. The condition of a fixed point (`custom_fixed_point`:
    $A = \\partial_x T - I$, not tagged symmetric) solved for a batch whose total size
    (batch × $n$) exceeds `dense_max`: `Richardson(omega=-1.0, fallback=GMRES())`, the
    fixed-point iteration $u \\leftarrow J^\\top u + \\bar x$ (one product a step; a batch of
    $n = 64$ materialized per element costs more than the iteration, and 6.6× more at
    $n = 256$), which hands an element whose iteration is slow or diverges to GMRES; an
    unbatched one keeps `Dense` up to `dense_max`. The tolerances, `maxiter` and
    `check_singular` are passed on, so every path refuses a singular $A$ (a
    `SingularJacobianError` in the implicit rules), the iterative ones included.
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    ridge: float = 0.0
    dense_max: int = 256
    check_singular: bool = True

    def __post_init__(self) -> None:
        _check_common(self)

    def select(self, n: int, tags: frozenset, *, batch: int = 1) -> AbstractLinearSolver:
        """The concrete solver used for `batch` systems of size `n` with structure `tags`."""
        spd = symmetric in tags and positive_definite in tags
        rtol, atol, ridge, maxiter = self.rtol, self.atol, self.ridge, self.maxiter
        chk = self.check_singular
        if (fixed_point_form in tags and symmetric not in tags
                and max(batch, 1) * n > self.dense_max):
            return Richardson(omega=-1.0, rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge,
                              check_singular=chk, fallback=GMRES())
        if n <= self.dense_max:
            if spd:
                return Cholesky(rtol=rtol, atol=atol, ridge=ridge, check_singular=chk)
            return Dense(rtol=rtol, atol=atol, ridge=ridge, check_singular=chk)
        if spd:
            return CG(rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge, check_singular=chk)
        if symmetric in tags:
            return MINRES(rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge, check_singular=chk)
        return GMRES(rtol=rtol, atol=atol, maxiter=maxiter, ridge=ridge, check_singular=chk)

    def _concrete(self, n: int, tags: frozenset, batch: int = 1) -> AbstractLinearSolver:
        return self.select(n, tags, batch=batch)

    def _solve(self, bk, xp, matvec, b, x0, rmatvec, tags):
        chosen = self.select(b.shape[-1], tags, batch=size(b.shape[:-1]))
        return chosen._solve(bk, xp, matvec, b, x0, rmatvec, tags)
