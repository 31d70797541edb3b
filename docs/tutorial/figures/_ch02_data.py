"""Chapter 2's layer data, shared by its figure scripts (not run by the docs build: the name
starts with `_`): the NumPy data of the chapter's first block, same seed, same draws."""

from __future__ import annotations

import numpy as np

HIDDEN, D_IN, BATCH = 64, 16, 32


def problem() -> tuple[np.ndarray, ...]:
    """`(W, U, b, x)`: W symmetric with eigenvalues spread over [-0.9, 0.9], U, b = 0, and a
    batch of inputs x."""
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((HIDDEN, HIDDEN)))[0]
    W = Q @ np.diag(np.linspace(-0.9, 0.9, HIDDEN)) @ Q.T
    U = rng.standard_normal((HIDDEN, D_IN)) / np.sqrt(D_IN)
    b = np.zeros(HIDDEN)
    x = rng.standard_normal((BATCH, D_IN))
    return W, U, b, x
