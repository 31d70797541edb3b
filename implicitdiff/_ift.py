"""The implicit function theorem rules, framework-neutral.

Products with $A$, $A^\\top$, $B$, $B^\\top$ come from the backend's `Linearization`; the linear
solve goes through the backend's `linear_solve` (JAX registers the transpose solve there); the
result comes back in the structure of `x` (JVP) or `args` (VJP).
"""

from __future__ import annotations

import contextvars
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._array import ON_FAILURE as ON_FAILURE
from ._array import check_on_failure
from ._array import size as _size
from ._backend import Backend, get_backend
from ._config import resolve_on_failure
from ._diagnostics import BackwardRecord, LinearSolveInfo, collecting
from ._errors import ImplicitDiffError, LinearSolveError, SingularJacobianError, StructureError
from ._factored import Factored
from ._linear_solve import (
    AbstractLinearSolver,
    Auto,
    Cholesky,
    Dense,
    _default_rtol,
    backward_rtol,
    follows_forward,
    with_rtol,
)
from ._tags import as_tags, symmetric

# ---- raveling a pytree into one vector ---------------------------------------------------------

class Raveler:
    """Vectors for the linear solvers from pytrees shaped like a reference `x`, and back.

    With `batch_dims = k`, the first `k` dimensions of every leaf of `x` index independent
    problems: a tree ravels to `(*batch, n)`, `n` the size of one problem, so the solvers stop
    each element on its own. Leaves may carry extra leading dimensions in front of those of `x`
    (several vectors at once, `(m, *batch, n)`); they are kept. Leaves of mixed dtypes ravel to
    their promoted dtype and come back in their own.
    """

    def __init__(self, bk: Backend, x: Any, batch_dims: int = 0):
        leaves, self.treedef = bk.tree_flatten(x)
        if not leaves:
            raise StructureError("expected x with at least one array leaf, got an empty pytree.")
        self.bk, self.k = bk, batch_dims
        self.xp = xp = bk.namespace(*leaves)
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.sizes = [_size(s[batch_dims:]) for s in self.shapes]
        self.dtype = xp.result_type(*self.dtypes) if len(leaves) > 1 else self.dtypes[0]
        self.n = sum(self.sizes)
        # the number of problems solved together (the product of the batch dimensions)
        self.batch = _size(self.shapes[0][:batch_dims])

    def ravel(self, tree: Any) -> Any:
        """The leaves of `tree` (structured like `x`) concatenated along a last axis."""
        xp, k = self.xp, self.k
        parts = []
        for leaf, shape, size in zip(self.bk.tree_flatten(tree)[0], self.shapes, self.sizes):
            lead = tuple(leaf.shape[:leaf.ndim - len(shape) + k])
            part = xp.reshape(leaf, (*lead, size))
            parts.append(part if part.dtype == self.dtype else xp.astype(part, self.dtype))
        return xp.concat(parts, axis=-1) if len(parts) > 1 else parts[0]

    def unravel(self, v: Any) -> Any:
        """The inverse of `ravel`: a pytree structured like `x`."""
        xp, k = self.xp, self.k
        out, start = [], 0
        for shape, size, dtype in zip(self.shapes, self.sizes, self.dtypes):
            piece = xp.reshape(v[..., start:start + size], (*v.shape[:-1], *shape[k:]))
            out.append(piece if piece.dtype == dtype else xp.astype(piece, dtype))
            start += size
        return self.bk.tree_unflatten(self.treedef, out)


def ravel(bk: Backend, tree: Any) -> tuple[Any, Callable[[Any], Any]]:
    """Concatenate the leaves of `tree` into one vector; return it and the inverse map."""
    r = Raveler(bk, tree)
    return r.ravel(tree), r.unravel


# ---- choosing and running the linear solve -----------------------------------------------------

def resolve_solver(solve: AbstractLinearSolver, n: int, tags: frozenset, batch: int = 1
                   ) -> AbstractLinearSolver:
    """The concrete solver: `Auto` resolved for size `n`, `tags` and `batch` systems solved
    together."""
    return solve.select(n, tags, batch=batch) if isinstance(solve, Auto) else solve


def _linear_failure(name: str, mode: str, solver: AbstractLinearSolver, method: str,
                    iterations: Any, residual: Any, breakdown: Any,
                    not_symmetric: Any = None) -> ImplicitDiffError:
    import numpy as np

    it = np.max(np.asarray(iterations))
    res = np.max(np.asarray(residual))
    brk = bool(np.any(np.asarray(breakdown)))
    which = "A^T" if mode == "vjp" else "A"
    if not_symmetric is not None and bool(np.any(np.asarray(not_symmetric))):
        bad = np.argwhere(np.asarray(not_symmetric, dtype=bool).reshape(
            np.shape(not_symmetric) or (1,)))
        where = "" if np.ndim(not_symmetric) == 0 else \
            f" (batch elements {', '.join(str(tuple(int(i) for i in b)) for b in bad[:5])})"
        return StructureError(
            f"{name}: the `symmetric` tag does not hold at x*{where}: a random probe gives "
            "<u, Av> != <Au, v> for dF/dx. A solve that trusts the tag would use A where the "
            f"derivative needs {which}, a silently wrong result, so it is refused. Expected "
            "dF/dx symmetric, as the tag promises: drop idf.symmetric from tags (Auto then "
            "picks GMRES or BiCGStab), or check F."
        )
    head = (f"{name}: the {mode} linear solve with {which} = dF/dx ({solver!r}, products by "
            f"{method}) ")
    if brk:
        return SingularJacobianError(
            head + f"broke down after {it} iterations (residual {res:.3g}): dF/dx looks "
            "singular (or singular at working precision) or not of the structure the solver "
            "assumes at x*: the answer failed its true-residual check or the uniqueness probe, "
            "so x* is not locally unique and no derivative exists. Expected a non-singular "
            "Jacobian. Check that x* is an isolated root (the implicit function theorem needs "
            "it): fix the gauge (pin the invariant directions), drop tags that do not hold, "
            "regularize with a ridge, e.g. "
            f"solve={type(solver).__name__}(ridge=1e-8), or, to take the minimum-norm "
            "derivative knowingly, solve=idf.NormalCG(least_squares=True)."
        )
    return LinearSolveError(
        head + f"did not converge: residual {res:.3g} after {it} iterations. Expected it within "
        "tolerance. Raise maxiter, loosen rtol, pass a preconditioner, use Dense, or add a "
        "ridge if dF/dx is nearly singular."
    )


def _solve_checked(bk: Backend, lin: Any, solver: AbstractLinearSolver, matvec: Callable,
                   rmatvec: Callable, rhs: Any, tags: frozenset, on_failure: str, name: str,
                   mode: str, x_error: Any = None, a_norm: Any = None,
                   tol: _BackwardTol | None = None) -> Any:
    """The linear solve, recorded and checked. `x_error` (inside a diagnostics block): the
    relative error of x* implied by the forward residual, one per batch element, and `a_norm`
    an estimate of $\\|A\\|$, for the record's `derivative_error_bound`. `tol`: the
    tolerance chosen (`_backward_tol`); its solver does the solve, `solver` (the configured
    one) is what the record and the messages name."""
    used = solver if tol is None else tol.solver

    def checker(m: str) -> Callable[[Any, Any], Any]:
        # Record the solve and apply on_failure; `m` is "jvp" (solve with A) or "vjp" (A^T).
        def check(sol: Any, info: Any) -> Any:
            info = LinearSolveInfo(*info)
            data = [info.iterations, info.residual_norm, info.converged]
            if x_error is not None:
                # the solve's relative residual ||Ay - b|| / ||b||, with ||b|| ~ ||A|| ||y||
                # (b itself may be a tangent, which JAX must not see in a closure here); the
                # product is taken on the host: under torch.func.vmap `sol` lives at another
                # transform level than `a_norm`
                data += [x_error, a_norm, bk.namespace(sol).linalg.vector_norm(sol, axis=-1)]
            source, rtol_c = ("default", None) if tol is None else (tol.source, tol.rtol)
            follow = tol is not None and tol.forward is not None
            if follow:
                assert tol is not None
                data += [tol.rtol, tol.forward]  # arrays (traced under JAX): record data

            def make(it: Any, rn: Any, cv: Any, *rest: Any) -> BackwardRecord:
                rest_ = list(rest)
                bound = (_error_bound(rest_.pop(0), rn,
                                      np.asarray(rest_.pop(0)) * np.asarray(rest_.pop(0)))
                         if x_error is not None else None)
                rt, fwd = (rest_[0], rest_[1]) if follow else (rtol_c, None)
                return BackwardRecord(name, m, repr(solver), lin.method, it, rn, cv, bound,
                                      _per_problem(rt), source, _per_problem(fwd))

            bk.record(make, *data)
            if symmetric in tags and info.not_symmetric is not None:
                bad_tag = info.not_symmetric
                return bk.handle_failure(
                    sol, info.converged, on_failure,
                    lambda it, rn, brk, ns: _linear_failure(name, m, solver, lin.method, it,
                                                            rn, brk, ns),
                    info.iterations, info.residual_norm, info.breakdown, bad_tag,
                )
            return bk.handle_failure(
                sol, info.converged, on_failure,
                lambda it, rn, brk: _linear_failure(name, m, solver, lin.method, it, rn, brk),
                info.iterations, info.residual_norm, info.breakdown,
            )

        return check

    other = "vjp" if mode == "jvp" else "jvp"
    return bk.linear_solve(used, matvec, rhs, rmatvec=rmatvec, tags=tags,
                           check=checker(mode), check_transpose=checker(other),
                           linearization=lin, transpose=mode == "vjp")


class _BackwardTol:
    """The tolerance of one backward solve: `solver` (the configured one, or a copy stopping
    at the tolerance chosen), `rtol` (a float, an array of shape `(*batch, 1)` when chosen
    from the forward, or None for a solver without one), `source` ("given": the solver's own
    `rtol`; "forward": chosen from the forward's accuracy; "default": the solver's default)
    and `forward` (the forward's relative residual, `(*batch, 1)`, where it was measured)."""

    def __init__(self, solver: AbstractLinearSolver, rtol: Any, source: str,
                 forward: Any = None):
        self.solver, self.rtol, self.source, self.forward = solver, rtol, source, forward


def _backward_tol(bk: Backend, at: _AtRoot, solver: AbstractLinearSolver, matvec: Callable,
                  x_flat: Any) -> _BackwardTol:
    """The backward solve's tolerance (see the notes above `backward_rtol` in
    `_linear_solve`): an iterative solver without an `rtol` of its own stops at a tolerance
    chosen from the forward's relative residual, one per batch element."""
    given = getattr(solver, "rtol", None)
    if given is not None:
        return _BackwardTol(solver, float(given), "given")
    xp = at.rv.xp
    if not follows_forward(solver):
        direct = isinstance(solver, (Dense, Cholesky))
        return _BackwardTol(solver, _default_rtol(xp, at.rv.dtype, True) if direct else None,
                            "default")
    fwd = bk.stop_gradient(at.forward_residual(matvec, x_flat))[..., None]
    rtol = backward_rtol(xp, at.rv.dtype, fwd)
    return _BackwardTol(with_rtol(solver, rtol), rtol, "forward", fwd)


def _per_problem(v: Any) -> Any:
    """A recorded `(*batch, 1)` array as a float (one problem) or a `(*batch)` NumPy array."""
    if v is None or isinstance(v, (int, float)):
        return v
    a = np.asarray(v, dtype=np.float64)[..., 0]
    return float(a) if a.ndim == 0 else a


def _error_bound(x_error: Any, residual: Any, b_norm: Any) -> Any:
    """`derivative_error_bound` from the forward part (relative error of x*) and the backward
    solve's residual over its right-hand side; a float, or an array per batch element."""
    xe = np.asarray(x_error, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.asarray(b_norm) > 0, np.asarray(residual, dtype=np.float64) /
                       np.asarray(b_norm, dtype=np.float64), 0.0)
    out = xe + rel
    return float(out) if np.ndim(out) == 0 else out


def _check_options(solve: Any, on_failure: str | None) -> None:
    if not isinstance(solve, AbstractLinearSolver):
        raise StructureError(
            f"solve: expected a linear solver such as idf.CG() or idf.Dense(), got "
            f"{type(solve).__name__}. Note: the forward solver is the decorated function; "
            "`solve=` is the linear solver for the derivative."
        )
    if on_failure is not None:
        check_on_failure(on_failure)


def _check_tangents(bk: Backend, args: tuple, tangents: tuple) -> tuple:
    if not isinstance(tangents, (tuple, list)) or len(tangents) != len(args):
        got = len(tangents) if isinstance(tangents, (tuple, list)) else type(tangents).__name__
        raise StructureError(
            f"tangents: expected a tuple with one tangent per argument ({len(args)}), got {got}."
        )
    for i, (a, t) in enumerate(zip(args, tangents)):
        la, ta = bk.tree_flatten(a), bk.tree_flatten(t)
        if t is None:
            continue
        if la[1] != ta[1]:
            raise StructureError(
                f"tangents[{i}]: expected the structure of args[{i}] ({la[1]}), got {ta[1]}."
            )
        for (path, leaf), tl in zip(bk.tree_leaves_with_path(a, f"args[{i}]"), ta[0]):
            if bk.is_float(leaf) and not isinstance(leaf, float) and tl is not None and \
                    not isinstance(tl, (int, float)) and tuple(tl.shape) != tuple(leaf.shape):
                raise StructureError(
                    f"tangent of {path}: expected shape {tuple(leaf.shape)}, got "
                    f"{tuple(tl.shape)}."
                )
    return tuple(tangents)


# ---- checks at x*: the derivative probe and the error of x* ------------------------------------

_NO_KINK_PROBE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "implicitdiff_no_kink_probe", default=False)
"""Set while a solver decorated with `kink_probe=False` runs: the rules it reaches skip the
probe unless told otherwise."""

KINK_RTOL = 0.25
"""The probe's tolerance relative to the entry's own size, $|\\partial_x F v|_i + |CD_i|$."""
KINK_ATOL = 0.05
"""The probe's tolerance relative to the largest entry of $\\partial_x F v$ (per problem)."""


def _rowmax(xp: Any, a: Any) -> Any:
    """$\\max|a|$ over the last axis of a raveled `(..., n)` array, `n > 0`."""
    return xp.max(xp.abs(a), axis=-1)


class _AtRoot:
    """The checks at x* that share $F(x^*, \\theta)$: the derivative probe (autodiff backends)
    and, inside a diagnostics block, the relative error of x* from one solve $A\\,\\delta = F$.

    The probe: for one direction $v$ (random signs, entries the size of x*), compare the
    linearization's $A v$ with F's central difference $(F(x+hv) - F(x-hv))/2h$ and F's second
    difference $(F(x+hv) - 2F(x) + F(x-hv))/h$. For $F$ smooth at $x^*$ the first differs from
    $Av$ by $O(h^2)$ and the second is $O(h)$; at a kink (a switch of `abs`, `relu`, `max` at
    $x^*$) one of them is $O(1)$, so the derivative does not exist there (autodiff returns one
    one-sided choice, finite differences their average). An entry is refused where the
    mismatch exceeds the tolerance and stays the same at four times the step (a kink's stays,
    a smooth F's grows four- to sixteenfold). A switch within $h|x^*|/4$ of x* but not at
    it is taken for a kink (a float32 ReLU network with a pre-activation that close to 0):
    `kink_probe=False` skips the probe. $h = \\sqrt{\\epsilon}$ relative to
    x*: rounding ($\\epsilon/h$) and curvature ($h$) stay below the tolerances
    (`KINK_RTOL`, `KINK_ATOL`) for curvature up to ~100 times the scale of x* in float32 (far
    more in float64), and a switch nearer than $h|x^*|$ to x* but not at it (a proximal
    step's threshold with a small step size) is rarely crossed. Five evaluations of F and one
    product with A; three where no entry is beyond tolerance at h (the step 4h is then not
    needed; `Backend.when_any` skips it, compiled code too)."""

    def __init__(self, bk: Backend, F: Callable[..., Any], x: Any, args: tuple, lin: Any,
                 rv: Raveler, name: str, on_failure: str, probe: bool, collect: bool,
                 transpose: bool = False):
        self.bk, self.rv, self.name, self.on_failure = bk, rv, name, on_failure
        self.lin = lin
        self.ok: Any = None
        self.data: tuple = ()
        self.F0: Any = None
        if not (probe or collect):
            return
        self.F0 = F(x, *args)
        if probe:
            cached = getattr(lin, "_idf_kink_probe", None)
            if cached is not None:
                self.ok, self.data = cached
            else:
                self.ok, self.data = self._probe(F, x, args, lin, transpose)
                try:
                    lin._idf_kink_probe = (self.ok, self.data)
                except AttributeError:  # a linearization with __slots__: probe every time
                    pass

    def _probe(self, F: Callable[..., Any], x: Any, args: tuple, lin: Any,
               transpose: bool) -> tuple:
        bk, rv = self.bk, self.rv
        xp, k = rv.xp, rv.k
        xls, xdef = bk.tree_flatten(x)
        eps = max(float(xp.finfo(dt).eps) for dt in rv.dtypes)
        h = math.sqrt(eps)
        rng = np.random.default_rng(0)
        vs = []
        for xl in xls:
            signs = rng.choice(np.array([-1.0, 1.0]), size=tuple(xl.shape))
            z = xp.astype(bk.from_host(signs, like=xl), xl.dtype)
            axes = tuple(range(k, xl.ndim))
            if not axes:
                m = xp.abs(xl)
            elif math.prod(tuple(xl.shape)):
                m = xp.max(xp.abs(xl), axis=axes, keepdims=True)
            else:  # an empty leaf (a sum over nothing keeps the device)
                m = xp.sum(xp.abs(xl), axis=axes, keepdims=True)
            vs.append(z * xp.where(m > 0, m, xp.ones_like(m)))
        v = bk.tree_unflatten(xdef, vs)
        f0 = rv.ravel(self.F0)
        if transpose:
            # The VJP rule has reverse products only (a forward product inside some reverse
            # transforms fails): the first-order test is <u, CD> against <A^T u, v> = <u, A v>
            # for random signs u, one number per problem; the second difference stays per entry.
            us = [xp.astype(bk.from_host(rng.choice(np.array([-1.0, 1.0]),
                                                    size=tuple(xl.shape)), like=xl), xl.dtype)
                  for xl in xls]
            u = rv.ravel(bk.tree_unflatten(xdef, us))
            lin_s = xp.sum(rv.ravel(lin.AT(bk.tree_unflatten(xdef, us))) * rv.ravel(v),
                           axis=-1)
        else:
            av = rv.ravel(lin.A(v))

        def mismatch(step: float) -> tuple:
            fp, fm = (rv.ravel(F(bk.tree_unflatten(xdef, [a + s * step * b
                                                          for a, b in zip(xls, vs)]), *args))
                      for s in (1.0, -1.0))
            cd = (fp - fm) / (2 * step)
            d2 = (fp - 2 * f0 + fm) / step
            noise = 8 * eps * (xp.abs(fp) + xp.abs(fm) + 2 * xp.abs(f0)) / step
            if transpose:
                first = xp.abs(xp.sum(u * cd, axis=-1) - lin_s)
                return xp.abs(d2), cd, noise, first
            return xp.maximum(xp.abs(cd - av), xp.abs(d2)), cd, noise, None

        mis, cd, noise, first = mismatch(h)
        size = xp.abs(cd) if transpose else xp.abs(av) + xp.abs(cd)
        scale = _rowmax(xp, cd) if transpose else xp.maximum(_rowmax(xp, av), _rowmax(xp, cd))
        allowed = KINK_RTOL * size + KINK_ATOL * scale[..., None] + noise
        bad = mis > allowed
        if transpose:
            allowed_s = KINK_ATOL * scale + xp.sum(noise, axis=-1)
            bad_s = first > allowed_s
        # A kink's mismatch does not change with the step; a smooth F's grows like h or h^2
        # (a singular or degenerate dF/dx, such as (x - θ)^3 at x = θ, is left to the solve),
        # and so does that of a switch near x* but not at it (at δ of x*, crossed by both
        # steps: (1 - δ/4h) / (1 - δ/h), above 1.25 for δ > h/4). Only an entry beyond its
        # tolerance at h can be refused: where none is, the step 4h is not taken (two
        # evaluations of F fewer, the usual case; compiled too, `when_any`).
        if transpose:
            def second() -> tuple:
                mis4, _, _, first4 = mismatch(4 * h)
                return bad & (mis4 < 1.25 * mis), bad_s & (first4 < 1.25 * first)

            flagged = xp.any(bad, axis=-1) | bad_s
            bad, bad_s = bk.when_any(flagged, second, lambda: (bad, bad_s))
        else:
            bad = bk.when_any(bad, lambda: bad & (mismatch(4 * h)[0] < 1.25 * mis),
                              lambda: bad)
        ok = xp.logical_not(xp.any(bad, axis=-1))
        worst = _rowmax(xp, mis) / xp.where(scale > 0, scale, xp.ones_like(scale))
        if transpose:
            ok = ok & xp.logical_not(bad_s)
            worst = xp.maximum(worst, first / xp.where(scale > 0, scale, xp.ones_like(scale)))
        # where it disagrees most (index into the raveled x): for the message
        where = xp.argmax(xp.astype(bad, rv.dtype) * (mis - allowed), axis=-1)
        return ok, (worst, where)

    def forward_residual(self, matvec: Callable, x_flat: Any) -> Any:
        """$\\|F(x^*)\\|_2 / (\\|A\\|_2 \\|x^*\\|_2)$ per batch element ($\\|A\\|$
        estimated by one product with `matvec`, $A$ or $A^\\top$, with a vector of the size
        of x*; $\\|d\\|$ for $\\|x^*\\|$ where x* is 0): about a lower bound on x*'s
        relative error (exactly one with the exact $\\|A\\|$, which the estimate does not
        exceed), which exceeds it by at most the condition number of $A$. Infinite where the
        estimate fails (then `backward_rtol` keeps the default)."""
        xp = self.rv.xp
        f = self.rv.ravel(self.F0)
        size = _rowmax(xp, x_flat)
        # d > 0 entrywise, of the size of x* (ones where x* is 0), so never 0
        d = xp.abs(x_flat) + xp.where(size > 0, size, xp.ones_like(size))[..., None]
        nd = xp.linalg.vector_norm(d, axis=-1)
        nx = xp.linalg.vector_norm(x_flat, axis=-1)
        den = xp.linalg.vector_norm(matvec(d), axis=-1) / nd * xp.where(nx > 0, nx, nd)
        # where A annihilates d (singular) or is not finite: inf, so the default tolerance
        good = den > 0
        return xp.where(good, xp.linalg.vector_norm(f, axis=-1)
                        / xp.where(good, den, xp.ones_like(den)), xp.full_like(den, math.inf))

    def x_error(self, solver: AbstractLinearSolver, matvec: Callable, rmatvec: Callable,
                tags: frozenset, x_flat: Any) -> tuple:
        """$\\|A^{-1} F(x^*)\\|_\\infty / \\|x^*\\|_\\infty$ per batch element: to first order the
        relative error of x* (NaN where the extra solve fails); and an estimate of $\\|A\\|_2$."""
        xp = self.rv.xp

        def nan_unless_converged(sol: Any, info: Any) -> Any:
            ok = LinearSolveInfo(*info).converged[..., None]
            return xp.where(ok, sol, xp.full_like(sol, math.nan))

        # through the backend, like the derivative's own solve: under torch.func.vmap that is
        # one batched solve (the core's loops cannot branch on a vmapped tensor)
        delta = self.bk.linear_solve(solver, matvec, self.rv.ravel(self.F0), rmatvec=rmatvec,
                                     tags=tags, check=nan_unless_converged,
                                     check_transpose=nan_unless_converged,
                                     linearization=self.lin, transpose=False)
        size = _rowmax(xp, x_flat)
        err = _rowmax(xp, delta) / xp.where(size > 0, size, xp.ones_like(size))
        # ||A|| ~ ||A d|| / ||d|| with d of the size of x* (ones where x* is 0)
        d = x_flat + xp.where(size > 0, size, xp.ones_like(size))[..., None]
        a_norm = (xp.linalg.vector_norm(matvec(d), axis=-1)
                  / xp.linalg.vector_norm(d, axis=-1))
        return err, a_norm  # NaN where the extra solve failed

    def apply(self, value: Any, like: Any) -> Any:
        """`value` (a pytree shaped like x, batch dimensions first) with the probe's verdict
        applied per `on_failure`. With "nan" the failed elements are multiplied by NaN (a
        linear map, so the NaN survives JAX's transposition of the JVP)."""
        if self.ok is None:
            return value
        bk, ok = self.bk, self.ok
        if self.on_failure == "nan":
            xp = self.rv.xp
            one = xp.ones_like(ok, dtype=self.rv.dtype)
            factor = xp.where(ok, one, one * math.nan)
            leaves, tdef = bk.tree_flatten(value)
            out = []
            for leaf in leaves:
                f = xp.astype(factor, leaf.dtype)
                f = xp.reshape(f, (*tuple(f.shape), *([1] * (leaf.ndim - f.ndim))))
                out.append(leaf * f)
            return bk.tree_unflatten(tdef, out)
        return bk.handle_failure(value, ok, self.on_failure, _kink_error(self.name, self.rv),
                                 *self.data)


def _kink_error(name: str, rv: Raveler) -> Callable[..., StructureError]:
    def make(worst: Any, where: Any) -> StructureError:
        w = np.asarray(worst)
        i = int(np.ravel(np.asarray(where))[int(np.argmax(w))]) if np.ndim(w) else int(where)
        leaf, start = 0, 0
        for j, size in enumerate(rv.sizes):
            if i < start + size:
                leaf = j
                break
            start += size
        pos = f"entry {i - start} of leaf {leaf} of x" if len(rv.sizes) > 1 else f"entry {i}"
        batch = ""
        if np.ndim(w):
            bad = np.argwhere(w == np.max(w))
            batch = f" (batch element {tuple(int(b) for b in bad[0])})"
        return StructureError(
            f"{name}: ∂F/∂x at x* disagrees with F's finite differences{batch}: F is not "
            f"differentiable at x* (a kink: abs/relu/max at x*?) or its derivative is wrong. "
            f"A random probe v gives |∂F/∂x·v − finite differences| up to "
            f"{float(np.max(w)):.3g} times the size of ∂F/∂x·v (worst at {pos}). Expected F "
            "smooth at the root (the implicit function theorem needs a derivative there): "
            "move θ off the switch, smooth F (softplus for relu, a Huber or sqrt(x²+δ²) "
            "for abs), or fix F's custom derivative. If F is smooth and the probe misfires, "
            "pass kink_probe=False."
        )

    return make


_NO_KINK_PROBE_F: weakref.WeakSet = weakref.WeakSet()
"""Conditions `F` of solvers decorated with `kink_probe=False`, for the rules that run outside
the decorated call (PyTorch's backward pass) and receive that `F`."""


def no_kink_probe(F: Callable[..., Any]) -> None:
    """Mark the condition `F` as not to be probed for kinks (`kink_probe=False`)."""
    try:
        _NO_KINK_PROBE_F.add(F)
    except TypeError:  # not weakly referable: the context variable still serves JAX
        pass


def kink_probe_on(F: Callable[..., Any], kink_probe: bool | None) -> bool:
    """Whether kinks of `F` are refused: `kink_probe` when given, else unless switched off by
    the decorated solver being called (`kink_probe=False`) or marked for its condition `F`."""
    if kink_probe is not None:
        return bool(kink_probe)
    try:
        marked = F in _NO_KINK_PROBE_F
    except TypeError:
        marked = False
    return not (_NO_KINK_PROBE.get() or marked)


def _probe_wanted(bk: Backend, F: Callable[..., Any], kink_probe: bool | None) -> bool:
    """Whether the rules probe for kinks: autodiff backends only (the reference backends'
    products are finite differences already, with their own kink test), as `kink_probe_on`."""
    return kink_probe_on(F, kink_probe) and bool(getattr(bk, "autodiff", False))


# ---- the rules ---------------------------------------------------------------------------------
#
# Let x*(θ) satisfy F(x*(θ), θ) = 0 for θ near θ₀, with A = ∂ₓF(x*, θ) invertible. Differentiating
# the identity in θ along a direction θ̇ gives
#
#     A ẋ + B θ̇ = 0,        B = ∂_θF(x*, θ),        so        ẋ = −A⁻¹ (B θ̇).          (JVP)
#
# The map θ̇ ↦ ẋ is linear, J = −A⁻¹B. Its transpose applied to a cotangent x̄ is
#
#     θ̄ = Jᵀ x̄ = −Bᵀ A⁻ᵀ x̄ = −Bᵀ u,   where   Aᵀ u = x̄.                              (VJP)
#
# So a JVP costs one product with B and one solve with A; a VJP one solve with Aᵀ and one product
# with Bᵀ. Neither looks at the solver that produced x*, hence constant memory in its iterations.
# For a fixed point x = T(x, θ), F = T − x and A = ∂ₓT − I; for stationarity ∇ₓf = 0, A is the
# Hessian of f (symmetric, so Aᵀ = A and CG/MINRES apply).

def implicit_jvp(F: Callable[..., Any], x_star: Any, args: Sequence[Any], tangents: Sequence[Any],
                 *, solve: AbstractLinearSolver = Auto(), tags: Any = None,
                 derivatives: Any = None, on_failure: str | None = None,
                 backend: Backend | None = None, name: str | None = None,
                 linearization: Any = None, batch_dims: int = 0,
                 kink_probe: bool | None = None) -> Any:
    """Forward-mode implicit derivative: $\\dot x = -A^{-1} (B \\dot\\theta)$.

    **Arguments:**

    - `F`: the condition, `F(x, *args)` returning a residual shaped like `x`.
    - `x_star`: a root, $F(x^*, \\theta) = 0$ (a pytree of arrays).
    - `args`: the tuple $\\theta$ of arguments of `F` after `x`.
    - `tangents`: a tuple with one tangent per argument (None or zeros for no perturbation).
    - `solve`: the linear solver for $A$ (default `Auto()`).
    - `tags`: structure of $A$, e.g. `{idf.symmetric}`.
    - `derivatives`: optional `idf.Derivatives` with hand-written products (NumPy reference;
      its `jacobian_x`, when given, serves the dense linear solvers of every backend).
    - `on_failure`: "raise", "warn" or "nan" when the linear solve (or the kink probe) fails;
      None (default): `idf.config.on_failure`.
    - `backend`, `name`, `linearization`: the backend (default: found from the arrays), a name
      for messages, and a `Linearization` to reuse across calls at the same point.
    - `batch_dims`: the first `batch_dims` dimensions of every leaf of `x_star` index independent
      problems ($A$ block diagonal): one linear solve per element, each stopping on its own.
    - `kink_probe`: with autodiff backends, compare $A v$ with F's finite differences in one
      random direction (five evaluations of F) and refuse where F has a kink at x*
      (`StructureError` naming it, or per `on_failure`). None (default): on, unless the
      decorated solver being called was given `kink_probe=False`.

    A size-0 `x_star` gives a size-0 $\\dot x$ (no solve). Inside an `idf.diagnostics()` block
    the record carries `derivative_error_bound` (one more solve with $A$).

    **Returns:** $\\dot x$, shaped like `x_star`.
    """
    on_failure = resolve_on_failure(on_failure, "implicit_jvp")
    _check_options(solve, on_failure)
    tags = as_tags(tags)
    args = tuple(args)
    bk = backend or get_backend(x_star, args, tangents)
    tangents = _check_tangents(bk, args, tuple(tangents))
    name = name or str(getattr(F, "__name__", "F"))
    r = Raveler(bk, x_star, batch_dims)
    if r.n == 0:  # nothing to solve for: an empty derivative
        return r.unravel(r.ravel(x_star) * 0)
    lin = linearization or bk.linearize(F, x_star, args, derivatives=derivatives, tags=tags)
    collect = collecting()
    solver = resolve_solver(solve, r.n, tags, r.batch)
    at = _AtRoot(bk, F, x_star, args, lin, r, name, on_failure,
                 _probe_wanted(bk, F, kink_probe), collect or follows_forward(solver))
    rhs = r.ravel(lin.B(tangents))

    def matvec(v: Any) -> Any:
        return r.ravel(lin.A(r.unravel(v)))

    def rmatvec(u: Any) -> Any:
        return r.ravel(lin.AT(r.unravel(u)))

    _given_matrix(derivatives, solver, x_star, args, matvec, rmatvec)
    tol = _backward_tol(bk, at, solver, matvec, r.ravel(x_star))
    x_error, a_norm = (at.x_error(tol.solver, matvec, rmatvec, tags, r.ravel(x_star))
                       if collect else (None, None))
    sol = _solve_checked(bk, lin, solver, matvec, rmatvec, -rhs, tags, on_failure, name, "jvp",
                         x_error, a_norm, tol)
    return at.apply(r.unravel(sol), x_star)


def _given_matrix(derivatives: Any, solver: AbstractLinearSolver, x_star: Any, args: tuple,
                  a_matvec: Any, at_matvec: Any, lazy: bool = False) -> None:
    """With `derivatives.jacobian_x` and a dense solver, let the solver take $A$ (and
    $A^\\top$) from it instead of building it from n products: `Backend.materialize` reads a
    product's `materialize` attribute. Computed here, where `x_star` and `args` live (a
    `torch.func` level); with `lazy` (a first-order solve outside any transform, which a
    forward factorization may answer without it), when the solver first asks."""
    jac = getattr(derivatives, "jacobian_x", None)
    if jac is None or not isinstance(solver, (Dense, Cholesky)):
        return
    got: list = []

    def matrix() -> Any:
        if not got:
            M = jac(x_star, *args)
            got.extend([M, get_backend(M).namespace(M).matrix_transpose(M)])
        return got

    if not lazy:
        matrix()
    a_matvec.materialize = lambda b: matrix()[0]
    at_matvec.materialize = lambda b: matrix()[1]


def implicit_vjp(F: Callable[..., Any], x_star: Any, args: Sequence[Any], cotangent: Any, *,
                 solve: AbstractLinearSolver = Auto(), tags: Any = None, derivatives: Any = None,
                 on_failure: str | None = None, argnums: Sequence[int] | None = None,
                 backend: Backend | None = None, name: str | None = None,
                 linearization: Any = None, batch_dims: int = 0,
                 kink_probe: bool | None = None, factorization: Any = None) -> tuple:
    """Reverse-mode implicit derivative: $\\bar\\theta = -B^\\top u$ with $A^\\top u = \\bar x$.

    **Arguments:**

    - `F`, `x_star`, `args`, `solve`, `tags`, `derivatives`, `on_failure`: as in `implicit_jvp`.
    - `cotangent`: $\\bar x$, shaped like `x_star`.
    - `argnums`: indices of `args` to differentiate (default all); the others get None.
    - `backend`, `name`, `linearization`, `batch_dims`, `kink_probe`: as in `implicit_jvp`.
    - `factorization`: what the forward solver published (`idf._factored`), for a first-order
      derivative outside any transform: it solves with $A^\\top$ where it can, checked, and
      the configured solver does the rest.

    **Returns:** a tuple with one cotangent per argument, shaped like it; None for integer and
    boolean leaves and for arguments outside `argnums`.
    """
    on_failure = resolve_on_failure(on_failure, "implicit_vjp")
    _check_options(solve, on_failure)
    tags = as_tags(tags)
    args = tuple(args)
    bk = backend or get_backend(x_star, args, cotangent)
    name = name or str(getattr(F, "__name__", "F"))
    xs, xdef = bk.tree_flatten(x_star)
    cs, cdef = bk.tree_flatten(cotangent)
    if xdef != cdef or any(tuple(a.shape) != tuple(c.shape) for a, c in zip(xs, cs)):
        raise StructureError(
            f"cotangent: expected the structure and shapes of x ({xdef}, "
            f"{[tuple(a.shape) for a in xs]}), got {cdef}, "
            f"{[tuple(getattr(c, 'shape', ())) for c in cs]}."
        )
    lin = linearization or bk.linearize(F, x_star, args, derivatives=derivatives, tags=tags)
    r = Raveler(bk, x_star, batch_dims)
    rhs = r.ravel(cotangent)
    if r.n == 0:  # nothing to solve for: B^T of an empty cotangent, zeros (None for ints)
        return lin.BT(r.unravel(rhs * 0), argnums)
    collect = collecting()
    solver = resolve_solver(solve, r.n, tags, r.batch)
    at = _AtRoot(bk, F, x_star, args, lin, r, name, on_failure,
                 _probe_wanted(bk, F, kink_probe), collect or follows_forward(solver),
                 transpose=True)

    def matvec(u: Any) -> Any:
        return r.ravel(lin.AT(r.unravel(u)))

    def rmatvec(v: Any) -> Any:
        return r.ravel(lin.A(r.unravel(v)))

    _given_matrix(derivatives, solver, x_star, args, rmatvec, matvec,
                  lazy=factorization is not None)

    tol = _backward_tol(bk, at, solver, matvec, r.ravel(x_star))
    x_error, a_norm = (at.x_error(tol.solver, rmatvec, matvec, tags, r.ravel(x_star))
                       if collect else (None, None))
    if factorization is not None and not tol.solver.ridge:
        # the solve with Aᵀ only (x_error above solves with A)
        tol.solver = Factored(factorization, tol.solver, transpose=True)
    u = _solve_checked(bk, lin, solver, matvec, rmatvec, rhs, tags, on_failure, name, "vjp",
                       x_error, a_norm, tol)
    return lin.BT(at.apply(r.unravel(-u), x_star), argnums)
