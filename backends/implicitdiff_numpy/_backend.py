"""NumPy reference backend: dense Jacobians, explicit jvp/vjp, no autodiff.

The linearization and the transforms are the core's reference implementation
(`implicitdiff._reference`), written once against the array API; this module adds what is
NumPy's own: which arrays it owns, in-place history writes and SciPy's triangular solve.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from implicitdiff.backend import ReferenceBackend, ReferenceLinearization


def _is_float_leaf(leaf: Any) -> bool:
    if isinstance(leaf, bool) or isinstance(leaf, (int, np.integer)):
        return False
    if type(leaf) is float:
        return True
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and np.issubdtype(dtype, np.floating)


class NumpyLinearization(ReferenceLinearization):
    """Products with the Jacobians of `F` at `(x, args)` without autodiff (NumPy arrays)."""


class NumpyBackend(ReferenceBackend):
    """The reference backend for NumPy arrays (and Python scalars)."""

    name = "numpy"
    framework = "numpy"
    display_name = "NumPy"
    linalg_errors = (np.linalg.LinAlgError,)
    linearization_class = NumpyLinearization

    def owns(self, x: Any) -> bool:
        return isinstance(x, (np.ndarray, np.generic))

    def is_float(self, x: Any) -> bool:
        return _is_float_leaf(x)

    def scalar_cotangent(self, g: Any) -> Any:
        return np.float64(g)

    def ring_write(self, hist: Any, slot: Any, row: Any, mask: Any, everyone: bool) -> Any:
        # in place: a write of one row per batch element, not a select over the whole buffer
        if isinstance(slot, int):
            hist[..., slot, :] = row if everyone else np.where(mask, row, hist[..., slot, :])
            return hist
        idx = np.broadcast_to(slot.astype(np.intp)[..., None], (*row.shape[:-1], 1, row.shape[-1]))
        new = row[..., None, :]
        if not everyone:
            new = np.where(mask[..., None], new, np.take_along_axis(hist, idx, axis=-2))
        np.put_along_axis(hist, idx, new, axis=-2)
        return hist

    def solve_triangular(self, L: Any, b: Any, *, lower: bool) -> Any:
        try:
            from scipy.linalg import solve_triangular
        except ImportError:  # pragma: no cover - scipy is optional
            return super().solve_triangular(L, b, lower=lower)
        if L.ndim == 2:
            return solve_triangular(L, b.T, lower=lower, check_finite=False).T
        return super().solve_triangular(L, b, lower=lower)


backend = NumpyBackend()
"""The backend instance for NumPy arrays (the reference), registered with implicitdiff."""
