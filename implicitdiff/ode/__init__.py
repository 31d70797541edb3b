"""Neural ODEs: `odeint`, explicit Runge–Kutta methods written once for NumPy, JAX and PyTorch,
with per-sample adaptive steps, per-sample statistics and a per-sample failure policy.

`grad="direct"` differentiates through the solver's accepted steps with the framework's own
autodiff; `grad="checkpoint"` gives the same gradient from $O(\\log N)$ checkpointed solver
states (`checkpointed`), `grad="backsolve"` the continuous adjoint. `make_step` and
`integrate(..., record=True)` (a `StepSchedule`) replay the forward steps exactly, for your own
analysis of them. `steady_state` is the $t \\to \\infty$ limit,
differentiated by the implicit function theorem.
"""

from ._backsolve import AdjointStats as AdjointStats
from ._backsolve import BacksolveUnsupportedError as BacksolveUnsupportedError
from ._backsolve import wrap_solver as wrap_solver
from ._checkpoint import CheckpointStats as CheckpointStats
from ._checkpoint import DerivativeNotSupportedError as DerivativeNotSupportedError
from ._checkpoint import checkpointed as checkpointed
from ._checkpoint import checkpointed_vjp as checkpointed_vjp
from ._solver import DT_UNDERFLOW as DT_UNDERFLOW
from ._solver import MAX_STEPS as MAX_STEPS
from ._solver import MIN_CHECKPOINTS as MIN_CHECKPOINTS
from ._solver import NONFINITE as NONFINITE
from ._solver import REPLAY_MISMATCH as REPLAY_MISMATCH
from ._solver import STATUS_NAMES as STATUS_NAMES
from ._solver import SUCCESS as SUCCESS
from ._solver import Integration as Integration
from ._solver import ODEFailureError as ODEFailureError
from ._solver import ODESolution as ODESolution
from ._solver import ODEStats as ODEStats
from ._solver import StepSchedule as StepSchedule
from ._solver import integrate as integrate
from ._solver import make_step as make_step
from ._solver import odeint as odeint
from ._steady import steady_state as steady_state
from ._tableaus import DOPRI5 as DOPRI5
from ._tableaus import EULER as EULER
from ._tableaus import RK4 as RK4
from ._tableaus import TABLEAUS as TABLEAUS
from ._tableaus import TSIT5 as TSIT5
from ._tableaus import ButcherTableau as ButcherTableau

__all__ = [
    "DOPRI5", "DT_UNDERFLOW", "EULER", "MAX_STEPS", "MIN_CHECKPOINTS", "NONFINITE",
    "REPLAY_MISMATCH", "RK4", "STATUS_NAMES",
    "SUCCESS", "TABLEAUS", "TSIT5", "AdjointStats", "BacksolveUnsupportedError",
    "ButcherTableau", "CheckpointStats", "DerivativeNotSupportedError", "Integration",
    "ODEFailureError", "ODESolution", "ODEStats", "StepSchedule", "checkpointed",
    "checkpointed_vjp", "integrate", "make_step", "odeint", "steady_state", "wrap_solver",
]
