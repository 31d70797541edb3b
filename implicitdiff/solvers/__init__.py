"""Forward solvers for fixed points $z = T(z, \\theta)$ and roots $F(z, \\theta) = 0$, written
once against the array API: NumPy, JAX (under `jit` and `vmap`) and PyTorch.

Each works on `z` of shape `(n,)` or `(..., n)` (a batch of independent problems, each stopping
on its own) and returns a `SolverResult` of arrays: the value and per-element statistics (steps,
converged, residuals, residual traces). They are not differentiated through: to differentiate
the fixed point, wrap the call in `implicitdiff.custom_fixed_point` (or `custom_root`).

```python
from implicitdiff.solvers import anderson

@idf.custom_fixed_point(T)
def layer(W, x):
    return anderson(T, zeros, W, x, tol=1e-10).value
```
"""

from ._anderson import anderson as anderson
from ._broyden import broyden as broyden
from ._common import SolverResult as SolverResult
from ._fixed_point import fixed_point_iteration as fixed_point_iteration
from ._newton import newton as newton

__all__ = ["SolverResult", "anderson", "broyden", "fixed_point_iteration", "newton"]
