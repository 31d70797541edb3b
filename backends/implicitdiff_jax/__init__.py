"""The JAX backend: implicit derivatives as a `jax.custom_jvp` whose tangent solve goes through
`lax.custom_linear_solve`, so forward mode, reverse mode (by transposition) and higher order all
come from one rule, under `jit`, `vmap` and every other transform."""

from ._backend import JaxBackend as JaxBackend
from ._backend import JaxLinearization as JaxLinearization
from ._backend import backend as backend
from ._deq import DEQStats as DEQStats
from ._deq import NeumannSolve as NeumannSolve
from ._deq import deq as deq
