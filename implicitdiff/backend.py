"""The backend contract: everything a framework adapter needs from the core, and nothing else.

A backend is one package implementing `Backend` (and its `Linearization`) for one framework.
The built-in ones (`implicitdiff_numpy`, `implicitdiff_jax`, `implicitdiff_torch`,
`implicitdiff_array_api`) import the core only through this module and `implicitdiff` itself,
and a third-party backend does the same: the names here are the supported, typed surface, and
the test suite checks that no adapter reaches for a private module.

What the contract asks of an adapter, in short:

- `Backend.owns`, `Backend.linearize` (a `Linearization`: products with $A$, $A^\\top$, $B$,
  $B^\\top$) and `Backend.call` (register the implicit rule where the framework's autodiff finds
  it; the rule itself is `implicit_jvp`/`implicit_vjp`, never assembled by an adapter).
- optionally `Backend.linear_solve` (wrap the core's solve in the framework's own differentiable
  solve, as JAX does with `lax.custom_linear_solve` and PyTorch with an `autograd.Function`),
  control flow (`while_loop`), failure handling under tracing (`handle_failure`, `record`), the
  autodiff and host-conversion services, pytrees.
- registration: `register_backend`, or an entry point in the group `ENTRY_POINT_GROUP`.
"""

from __future__ import annotations

from ._array import ON_FAILURE as ON_FAILURE
from ._array import check_on_failure as check_on_failure
from ._backend import ENTRY_POINT_GROUP as ENTRY_POINT_GROUP
from ._backend import Backend as Backend
from ._backend import Linearization as Linearization
from ._backend import find_backend as find_backend
from ._backend import get_backend as get_backend
from ._backend import host_scalar as host_scalar
from ._backend import list_backends as list_backends
from ._backend import nan_where as nan_where
from ._backend import register_backend as register_backend
from ._config import resolve_on_failure as resolve_on_failure
from ._diagnostics import BackwardRecord as BackwardRecord
from ._diagnostics import ForwardRecord as ForwardRecord
from ._diagnostics import LinearSolveInfo as LinearSolveInfo
from ._diagnostics import _emit as emit
from ._diagnostics import _emitter as emitter
from ._diagnostics import collecting as collecting
from ._errors import BackendNotFoundError as BackendNotFoundError
from ._errors import ImplicitDiffError as ImplicitDiffError
from ._errors import LinearSolveError as LinearSolveError
from ._errors import NonConvergenceError as NonConvergenceError
from ._errors import SingularJacobianError as SingularJacobianError
from ._errors import StructureError as StructureError
from ._factored import capture as capture_factorization
from ._ift import Raveler as Raveler
from ._ift import implicit_jvp as implicit_jvp
from ._ift import implicit_vjp as implicit_vjp
from ._ift import resolve_solver as resolve_solver
from ._linear_solve import AbstractLinearSolver as AbstractLinearSolver
from ._linear_solve import NeumannSolve as NeumannSolve
from ._reference import DerivativeAccuracyWarning as DerivativeAccuracyWarning
from ._reference import ReferenceBackend as ReferenceBackend
from ._reference import ReferenceLinearization as ReferenceLinearization
from ._root import Derivatives as Derivatives
from ._root import ImplicitFunction as ImplicitFunction
from ._root import _forward_error as forward_error
from ._root import default_residual_tol as default_residual_tol
from ._root import drop_failed as drop_failed
from ._root import record_forward as record_forward
from ._tags import positive_definite as positive_definite
from ._tags import symmetric as symmetric
from ._tree import TreeDef as TreeDef
from ._tree import tree_flatten as tree_flatten
from ._tree import tree_leaves_with_path as tree_leaves_with_path
from ._tree import tree_map as tree_map
from ._tree import tree_unflatten as tree_unflatten

__all__ = [
    "ENTRY_POINT_GROUP",
    "ON_FAILURE",
    "AbstractLinearSolver",
    "Backend",
    "BackendNotFoundError",
    "BackwardRecord",
    "DerivativeAccuracyWarning",
    "Derivatives",
    "ForwardRecord",
    "ImplicitDiffError",
    "ImplicitFunction",
    "LinearSolveError",
    "LinearSolveInfo",
    "Linearization",
    "NeumannSolve",
    "NonConvergenceError",
    "Raveler",
    "ReferenceBackend",
    "ReferenceLinearization",
    "SingularJacobianError",
    "StructureError",
    "TreeDef",
    "capture_factorization",
    "check_on_failure",
    "collecting",
    "default_residual_tol",
    "drop_failed",
    "emit",
    "emitter",
    "find_backend",
    "forward_error",
    "get_backend",
    "host_scalar",
    "implicit_jvp",
    "implicit_vjp",
    "list_backends",
    "nan_where",
    "positive_definite",
    "record_forward",
    "register_backend",
    "resolve_on_failure",
    "resolve_solver",
    "symmetric",
    "tree_flatten",
    "tree_leaves_with_path",
    "tree_map",
    "tree_unflatten",
]
