"""implicitdiff: exact derivatives of any solver's output by the implicit function theorem.

State the condition $F(x^*, \\theta) = 0$ that the solver's output satisfies; implicitdiff
differentiates $x^*(\\theta)$ from it, in JAX, PyTorch or the NumPy reference, never through the
solver's iterations. This package imports no framework.
"""

from ._backend import Backend as Backend
from ._backend import Linearization as Linearization
from ._backend import get_backend as get_backend
from ._backend import list_backends as list_backends
from ._backend import register_backend as register_backend
from ._config import config as config
from ._diagnostics import BackwardRecord as BackwardRecord
from ._diagnostics import Diagnostics as Diagnostics
from ._diagnostics import ForwardRecord as ForwardRecord
from ._diagnostics import LinearSolveInfo as LinearSolveInfo
from ._diagnostics import diagnostics as diagnostics
from ._errors import BackendNotFoundError as BackendNotFoundError
from ._errors import ImplicitDiffError as ImplicitDiffError
from ._errors import LinearSolveError as LinearSolveError
from ._errors import NonConvergenceError as NonConvergenceError
from ._errors import SingularJacobianError as SingularJacobianError
from ._errors import StructureError as StructureError
from ._ift import implicit_jvp as implicit_jvp
from ._ift import implicit_vjp as implicit_vjp
from ._linear_solve import CG as CG
from ._linear_solve import GMRES as GMRES
from ._linear_solve import MINRES as MINRES
from ._linear_solve import AbstractLinearSolver as AbstractLinearSolver
from ._linear_solve import Auto as Auto
from ._linear_solve import BiCGStab as BiCGStab
from ._linear_solve import Cholesky as Cholesky
from ._linear_solve import Dense as Dense
from ._linear_solve import NeumannSolve as NeumannSolve
from ._linear_solve import NormalCG as NormalCG
from ._linear_solve import Richardson as Richardson
from ._reference import DerivativeAccuracyWarning as DerivativeAccuracyWarning
from ._root import Derivatives as Derivatives
from ._root import ImplicitFunction as ImplicitFunction
from ._root import custom_fixed_point as custom_fixed_point
from ._root import custom_root as custom_root
from ._tags import Tag as Tag
from ._tags import positive_definite as positive_definite
from ._tags import symmetric as symmetric
from ._transforms import jacobian as jacobian
from ._transforms import jvp as jvp
from ._transforms import vjp as vjp

__version__ = "0.1.0"

# The public names of the package (not the lazy submodules `conditions`, `solvers`, `deq`,
# `backend`, `qp`, `cvxpy`, `ode`: `from implicitdiff import *` must not import CVXPY).
__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "AbstractLinearSolver",
    "Auto",
    "Backend",
    "BackendNotFoundError",
    "BackwardRecord",
    "BiCGStab",
    "Cholesky",
    "Dense",
    "DerivativeAccuracyWarning",
    "Derivatives",
    "Diagnostics",
    "ForwardRecord",
    "ImplicitDiffError",
    "ImplicitFunction",
    "LinearSolveError",
    "LinearSolveInfo",
    "Linearization",
    "NeumannSolve",
    "NonConvergenceError",
    "NormalCG",
    "Richardson",
    "SingularJacobianError",
    "StructureError",
    "Tag",
    "config",
    "custom_fixed_point",
    "custom_root",
    "diagnostics",
    "get_backend",
    "implicit_jvp",
    "implicit_vjp",
    "jacobian",
    "jvp",
    "list_backends",
    "positive_definite",
    "register_backend",
    "symmetric",
    "vjp",
]


def __getattr__(name: str):
    # `idf.conditions`, `idf.solvers`, `idf.deq`, `idf.backend`, `idf.qp`, `idf.cvxpy`,
    # `idf.ode` without an explicit import; none imports a framework (`idf.cvxpy` imports
    # CVXPY).
    # `idf.torch`, `idf.jax` (any registered backend's name): the backend package (and so the
    # framework), on first access only.
    import importlib

    if name in ("conditions", "solvers", "deq", "backend", "qp", "cvxpy", "ode"):
        return importlib.import_module("." + name, __name__)
    if not name.startswith("_"):
        from ._backend import backend_module

        mod = backend_module(name)  # a registered backend's package, by the backend's name
        if mod is not None:
            return mod
    raise AttributeError(f"module 'implicitdiff' has no attribute {name!r}")
