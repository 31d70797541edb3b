"""The array-api-strict backend: the strict reference namespace of the Python array API.

`array_api_strict` has no autodiff, so this backend takes its derivatives the way the NumPy
reference does (the core's `implicitdiff._reference`): user-supplied `idf.Derivatives`, else
the complex step, else central differences (with a `DerivativeAccuracyWarning`). It exists to
prove that the core is written against the array API and nothing more: every linear solver,
forward solver and implicit rule runs on it unchanged. It registers itself through the
`implicitdiff.backends` entry point `array_api_strict`, so it is considered once
`array_api_strict` is imported.
"""

from implicitdiff.backend import ReferenceLinearization as _ReferenceLinearization

from ._backend import ArrayApiStrictBackend as ArrayApiStrictBackend
from ._backend import backend as backend

DerivativeAccuracyWarning = _ReferenceLinearization.accuracy_warning
"""The warning of a derivative that central differences served (a `UserWarning`)."""

__all__ = [
    "ArrayApiStrictBackend",
    "DerivativeAccuracyWarning",
    "backend",
]
