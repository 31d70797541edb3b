"""The NumPy reference backend: no autodiff, obviously correct, slow.

Products with $\\partial_x F$ and $\\partial_\\theta F$ come, in this order of preference, from
user-supplied `idf.Derivatives`, the complex step (exact to rounding for `F` written with
complex-safe NumPy), then central differences (per-coordinate steps, with a
`DerivativeAccuracyWarning` that states their estimated accuracy). A kink of `F` at the point is
refused. Transposed products build the Jacobian column by column. Which source served is in
`Linearization.method` and in the diagnostics.
"""

from ._backend import NumpyBackend as NumpyBackend
from ._backend import NumpyLinearization as NumpyLinearization
from ._backend import backend as backend

DerivativeAccuracyWarning = NumpyLinearization.accuracy_warning
"""The warning of a derivative that central differences served (a `UserWarning`)."""

__all__ = [
    "DerivativeAccuracyWarning",
    "NumpyBackend",
    "NumpyLinearization",
    "backend",
]
