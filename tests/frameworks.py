"""Which frameworks the cross-framework tests run on: NumPy and JAX always (the test modules
skip without JAX), PyTorch when it and its backend import."""

from __future__ import annotations

try:
    import torch

    import implicitdiff_torch

    HAVE_TORCH = hasattr(implicitdiff_torch, "backend")
except ImportError:  # pragma: no cover - torch is optional
    torch = None
    HAVE_TORCH = False

FRAMEWORKS = ["numpy", "jax", *(["torch"] if HAVE_TORCH else [])]
