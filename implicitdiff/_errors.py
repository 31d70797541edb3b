"""The exceptions of implicitdiff: one base class, one subclass per way things go wrong.

Every message says what was expected, what was got (by key path into the pytree where there is
one) and what to do about it.
"""

from __future__ import annotations


class ImplicitDiffError(Exception):
    """Base class of every error raised by implicitdiff."""


class StructureError(ImplicitDiffError, ValueError):
    """An input or output has the wrong pytree structure, shape or dtype.

    Raised, for instance, when `F(x, *args)` returns a residual whose structure, shape or dtype
    differs from `x`, or when a linear solver gets a right-hand side of the wrong shape.
    """


class NonConvergenceError(ImplicitDiffError, RuntimeError):
    """The forward solve did not reach $F(x^*, \\theta) \\approx 0$.

    A derivative computed at a point that is not a root is meaningless, so implicitdiff checks the
    residual after every forward solve. This error carries `residual_norm` and `tolerance`.
    """

    def __init__(self, message: str, *, residual_norm: float | None = None,
                 tolerance: float | None = None):
        super().__init__(message)
        self.residual_norm = residual_norm
        self.tolerance = tolerance


class LinearSolveError(ImplicitDiffError, RuntimeError):
    """The linear solve with $A = \\partial_x F$ (or $A^\\top$) did not converge or broke down.

    Carries the solver's diagnostics as `info` (iterations, residual norm, converged).
    """

    def __init__(self, message: str, *, info: object = None):
        super().__init__(message)
        self.info = info


class SingularJacobianError(LinearSolveError):
    """$A = \\partial_x F(x^*, \\theta)$ is singular (or numerically so) at the solution.

    The implicit function theorem does not apply there: the root is not locally unique. Adding a
    small `ridge` to the linear solver (`idf.CG(ridge=1e-8)`) regularizes the solve.
    """


class BackendNotFoundError(ImplicitDiffError, TypeError):
    """No registered backend owns the arrays that were passed."""
