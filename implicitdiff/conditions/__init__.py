"""`implicitdiff.conditions`: the optimality conditions of the common problem classes, ready for
`idf.custom_root`.

```python
import implicitdiff as idf
import implicitdiff.conditions as cond

F = cond.proximal_gradient(lambda x, data: 0.5 * ((data[0] @ x - data[1]) ** 2).sum(),
                           cond.prox_l1)

@idf.custom_root(F, tags=F.tags)
def lasso(data, lam):
    ...  # any solver: returns x* with F(x*, data, lam) = 0
```

Each builder returns a `Condition`, a callable `F(x, *args)` with the structure tags of
$\\partial_x F$ in `F.tags`. The library of proximal operators and projections is written
against the array API and runs on NumPy, JAX and PyTorch. See `docs/conditions.md` for the
mathematics and for which conditions are exact and which need care at kinks.
"""

from . import _conditions, _cone, _prox
from ._conditions import Condition as Condition
from ._conditions import fixed_point as fixed_point
from ._conditions import kkt as kkt
from ._conditions import least_squares as least_squares
from ._conditions import mirror_descent as mirror_descent
from ._conditions import projected_gradient as projected_gradient
from ._conditions import proximal_gradient as proximal_gradient
from ._conditions import stationarity as stationarity
from ._cone import ConeProgram as ConeProgram
from ._cone import Cones as Cones
from ._cone import cone_program as cone_program
from ._cone import projection_cone as projection_cone
from ._prox import projection_affine as projection_affine
from ._prox import projection_box as projection_box
from ._prox import projection_l2_ball as projection_l2_ball
from ._prox import projection_nonnegative as projection_nonnegative
from ._prox import projection_simplex as projection_simplex
from ._prox import prox_box as prox_box
from ._prox import prox_elastic_net as prox_elastic_net
from ._prox import prox_group_lasso as prox_group_lasso
from ._prox import prox_l1 as prox_l1
from ._prox import prox_l2_ball as prox_l2_ball
from ._prox import prox_none as prox_none
from ._prox import prox_nonnegative as prox_nonnegative
from ._prox import prox_simplex as prox_simplex

# the public names of the two modules, kept in one place each
__all__: list[str] = []
__all__ += _conditions.__all__
__all__ += _prox.__all__
__all__ += _cone.__all__
