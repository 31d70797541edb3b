"""The implicit function theorem rules, framework-neutral.

Products with $A$, $A^\\top$, $B$, $B^\\top$ come from the backend's `Linearization`; the linear
solve goes through the backend's `linear_solve` (JAX registers the transpose solve there); the
result comes back in the structure of `x` (JVP) or `args` (VJP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._array import ON_FAILURE as ON_FAILURE
from ._array import check_on_failure
from ._backend import Backend, get_backend
from ._diagnostics import BackwardRecord, LinearSolveInfo
from ._errors import ImplicitDiffError, LinearSolveError, SingularJacobianError, StructureError
from ._linear_solve import AbstractLinearSolver, Auto
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


def _size(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---- choosing and running the linear solve -----------------------------------------------------

def resolve_solver(solve: AbstractLinearSolver, n: int, tags: frozenset) -> AbstractLinearSolver:
    """The concrete solver: `Auto` resolved for size `n` and `tags`."""
    return solve.select(n, tags) if isinstance(solve, Auto) else solve


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
            "singular or not of the structure the solver assumes at x*. Expected a non-singular "
            "Jacobian. Check that x* is an isolated root (the implicit function theorem needs "
            "it), drop tags that do not hold, or regularize with a ridge, e.g. "
            f"solve={type(solver).__name__}(ridge=1e-8)."
        )
    return LinearSolveError(
        head + f"did not converge: residual {res:.3g} after {it} iterations. Expected it within "
        "tolerance. Raise maxiter, loosen rtol, pass a preconditioner, use Dense, or add a "
        "ridge if dF/dx is nearly singular."
    )


def _solve_checked(bk: Backend, lin: Any, solver: AbstractLinearSolver, matvec: Callable,
                   rmatvec: Callable, rhs: Any, tags: frozenset, on_failure: str, name: str,
                   mode: str) -> Any:
    def checker(m: str) -> Callable[[Any, Any], Any]:
        # Record the solve and apply on_failure; `m` is "jvp" (solve with A) or "vjp" (A^T).
        def check(sol: Any, info: Any) -> Any:
            info = LinearSolveInfo(*info)
            bk.record(lambda it, rn, cv: BackwardRecord(name, m, repr(solver), lin.method, it,
                                                        rn, cv),
                      info.iterations, info.residual_norm, info.converged)
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
    return bk.linear_solve(solver, matvec, rhs, rmatvec=rmatvec, tags=tags,
                           check=checker(mode), check_transpose=checker(other),
                           linearization=lin, transpose=mode == "vjp")


def _check_options(solve: Any, on_failure: str) -> None:
    if not isinstance(solve, AbstractLinearSolver):
        raise StructureError(
            f"solve: expected a linear solver such as idf.CG() or idf.Dense(), got "
            f"{type(solve).__name__}. Note: the forward solver is the decorated function; "
            "`solve=` is the linear solver for the derivative."
        )
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
                 derivatives: Any = None, on_failure: str = "raise",
                 backend: Backend | None = None, name: str | None = None,
                 linearization: Any = None, batch_dims: int = 0) -> Any:
    """Forward-mode implicit derivative: $\\dot x = -A^{-1} (B \\dot\\theta)$.

    **Arguments:**

    - `F`: the condition, `F(x, *args)` returning a residual shaped like `x`.
    - `x_star`: a root, $F(x^*, \\theta) = 0$ (a pytree of arrays).
    - `args`: the tuple $\\theta$ of arguments of `F` after `x`.
    - `tangents`: a tuple with one tangent per argument (None or zeros for no perturbation).
    - `solve`: the linear solver for $A$ (default `Auto()`).
    - `tags`: structure of $A$, e.g. `{idf.symmetric}`.
    - `derivatives`: optional `idf.Derivatives` with hand-written products (NumPy reference).
    - `on_failure`: "raise", "warn" or "nan" when the linear solve fails.
    - `backend`, `name`, `linearization`: the backend (default: found from the arrays), a name
      for messages, and a `Linearization` to reuse across calls at the same point.
    - `batch_dims`: the first `batch_dims` dimensions of every leaf of `x_star` index independent
      problems ($A$ block diagonal): one linear solve per element, each stopping on its own.

    **Returns:** $\\dot x$, shaped like `x_star`.
    """
    _check_options(solve, on_failure)
    tags = as_tags(tags)
    args = tuple(args)
    bk = backend or get_backend(x_star, args, tangents)
    tangents = _check_tangents(bk, args, tuple(tangents))
    name = name or str(getattr(F, "__name__", "F"))
    lin = linearization or bk.linearize(F, x_star, args, derivatives=derivatives, tags=tags)
    r = Raveler(bk, x_star, batch_dims)
    rhs = r.ravel(lin.B(tangents))
    solver = resolve_solver(solve, r.n, tags)

    def matvec(v: Any) -> Any:
        return r.ravel(lin.A(r.unravel(v)))

    def rmatvec(u: Any) -> Any:
        return r.ravel(lin.AT(r.unravel(u)))

    sol = _solve_checked(bk, lin, solver, matvec, rmatvec, -rhs, tags, on_failure, name, "jvp")
    return r.unravel(sol)


def implicit_vjp(F: Callable[..., Any], x_star: Any, args: Sequence[Any], cotangent: Any, *,
                 solve: AbstractLinearSolver = Auto(), tags: Any = None, derivatives: Any = None,
                 on_failure: str = "raise", argnums: Sequence[int] | None = None,
                 backend: Backend | None = None, name: str | None = None,
                 linearization: Any = None, batch_dims: int = 0) -> tuple:
    """Reverse-mode implicit derivative: $\\bar\\theta = -B^\\top u$ with $A^\\top u = \\bar x$.

    **Arguments:**

    - `F`, `x_star`, `args`, `solve`, `tags`, `derivatives`, `on_failure`: as in `implicit_jvp`.
    - `cotangent`: $\\bar x$, shaped like `x_star`.
    - `argnums`: indices of `args` to differentiate (default all); the others get None.
    - `backend`, `name`, `linearization`, `batch_dims`: as in `implicit_jvp`.

    **Returns:** a tuple with one cotangent per argument, shaped like it; None for integer and
    boolean leaves and for arguments outside `argnums`.
    """
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
    solver = resolve_solver(solve, r.n, tags)

    def matvec(u: Any) -> Any:
        return r.ravel(lin.AT(r.unravel(u)))

    def rmatvec(v: Any) -> Any:
        return r.ravel(lin.A(r.unravel(v)))

    u = _solve_checked(bk, lin, solver, matvec, rmatvec, rhs, tags, on_failure, name, "vjp")
    return lin.BT(r.unravel(-u), argnums)
