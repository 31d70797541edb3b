"""Backend for `array_api_strict` arrays, on the core's reference linearization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_strict
import numpy as np

from implicitdiff._reference import ReferenceBackend

# the array type (the package does not export its name)
_Array = type(array_api_strict.asarray(0.0))


class ArrayApiStrictBackend(ReferenceBackend):
    """The reference backend for `array_api_strict` arrays (no autodiff)."""

    name = "array_api_strict"
    framework = "array_api_strict"
    display_name = "array-api-strict"
    # array_api_strict.linalg computes with NumPy and lets NumPy's errors through
    linalg_errors = (np.linalg.LinAlgError,)

    def owns(self, x: Any) -> bool:
        return isinstance(x, _Array)

    def namespace(self, *arrays: Any) -> Any:
        return array_api_strict

    def record(self, make_record: Callable[..., Any], *data: Any) -> None:
        # diagnostics records hold host (NumPy) values, as with every other backend
        super().record(make_record, *(np.asarray(d) if self.owns(d) else d for d in data))


backend = ArrayApiStrictBackend()
