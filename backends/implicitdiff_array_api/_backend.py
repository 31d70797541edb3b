"""Backend for `array_api_strict` arrays, on the core's reference linearization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_strict
import numpy as np

from implicitdiff.backend import ReferenceBackend

# the array type (the package does not export its name) and the host device
_Array = type(array_api_strict.asarray(0.0))
_CPU = array_api_strict.asarray(0.0).device


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

    def to_host(self, tree: Any) -> Any:
        """The pytree with its arrays as NumPy arrays, moved to the CPU device first (arrays on
        array-api-strict's other devices refuse conversion, as a GPU's would)."""
        leaves, treedef = self.tree_flatten(tree)
        return self.tree_unflatten(treedef, [np.asarray(a.to_device(_CPU)) if self.owns(a) else a
                                             for a in leaves])

    def from_host(self, tree: Any, *, like: Any = None, device: Any = None) -> Any:
        """The pytree with its NumPy arrays (constants) as array_api_strict arrays on the device
        of `like` (or `device`); every other leaf unchanged. No cast: array_api_strict
        promotes dtypes by the standard's rules."""
        if device is None and self.owns(like):
            device = like.device
        leaves, treedef = self.tree_flatten(tree)
        return self.tree_unflatten(treedef, [
            array_api_strict.asarray(a, device=device) if isinstance(a, (np.ndarray, np.generic))
            else a for a in leaves])

    def host_array(self, x: Any, *, like: Any = None) -> Any:
        """`x` as a floating NumPy array (from the CPU device), dtype as in `Backend`."""
        return super().host_array(self.to_host(x), like=self.to_host(like))

    # diagnostics records and error messages get host (NumPy) values, as with other backends
    def record(self, make_record: Callable[..., Any], *data: Any) -> None:
        super().record(make_record, *self.to_host(data))

    def handle_failure(self, value: Any, ok: Any, on_failure: str, make_error: Callable[..., Any],
                       *data: Any) -> Any:
        return super().handle_failure(value, ok, on_failure, make_error, *self.to_host(data))


backend = ArrayApiStrictBackend()
"""The backend instance for array API (`array_api_strict`) arrays, registered with
implicitdiff."""
