"""`implicitdiff.scipy`: SciPy's solvers as differentiable drop-ins.

```python
import implicitdiff.scipy as isc

res = isc.minimize(fun, x0, args=(theta,), method="L-BFGS-B", bounds=bounds)
res.x            # differentiable in theta: jax.grad, torch.autograd, idf.vjp (NumPy)
```

`minimize`, `root`, `least_squares`, `fixed_point`, `root_scalar` keep SciPy's call signature
and return value; the solution is differentiable in `args` in the framework of the inputs (NumPy
reference, JAX including `jit`/`vmap`, PyTorch), by the implicit function theorem applied to the
optimality condition at the solution (`implicitdiff.conditions`). `wrap_solver` does the same for
any other host solver. Importing this module imports SciPy, never jax or torch.
See `docs/scipy.md`.
"""

from ._minimize import minimize as minimize
from ._run import implicit_function as implicit_function
from ._solvers import fixed_point as fixed_point
from ._solvers import least_squares as least_squares
from ._solvers import root as root
from ._solvers import root_scalar as root_scalar
from ._solvers import to_host as to_host
from ._solvers import wrap_solver as wrap_solver

__all__ = [
    "fixed_point",
    "implicit_function",
    "least_squares",
    "minimize",
    "root",
    "root_scalar",
    "to_host",
    "wrap_solver",
]
