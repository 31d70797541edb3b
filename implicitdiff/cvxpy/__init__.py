"""`implicitdiff.cvxpy`: CVXPY problems as differentiable layers.

```python
import cvxpy as cp
import implicitdiff.cvxpy as icp

layer = icp.Layer(problem, parameters=[q, G, h], variables=[x])
(x_star,) = layer(q_value, G_value, h_value)   # NumPy, torch or JAX arrays
```

`Layer` keeps cvxpylayers' call convention. The problem (DPP) is canonicalized once by CVXPY;
each call solves the cone program with CVXPY's interface to Clarabel (default), SCS or ECOS,
polishes the solution, and differentiates it by the implicit function theorem through
`idf.conditions.cone_program`. Importing this module imports CVXPY, never jax or torch.
"""

from ._layer import Layer as Layer
from ._layer import UnsupportedConeError as UnsupportedConeError

__all__ = ["Layer", "UnsupportedConeError"]
