"""The JAX backend: implicit derivatives as a `jax.custom_jvp` whose tangent solve goes through
`lax.custom_linear_solve`, so forward mode, reverse mode (by transposition) and higher order all
come from one rule, under `jit`, `vmap` and every other transform."""

from typing import TYPE_CHECKING, Any

from ._backend import JaxBackend as JaxBackend
from ._backend import JaxLinearization as JaxLinearization
from ._backend import backend as backend
from ._backend import catching as catching
from ._deq import DEQStats as DEQStats
from ._deq import NeumannSolve as NeumannSolve
from ._deq import deq as deq

# `DEQ` is public too but needs equinox (optional): left out so that `import *` never needs it.
__all__ = [
    "DEQStats",
    "JaxBackend",
    "JaxLinearization",
    "NeumannSolve",
    "backend",
    "catching",
    "deq",
]

if TYPE_CHECKING:  # `DEQ` needs equinox, an optional dependency: imported on first use
    from ._deq_module import DEQ as DEQ


def __getattr__(name: str) -> Any:
    if name == "DEQ":
        try:
            import equinox  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"implicitdiff_jax.DEQ: expected equinox installed (DEQ is an equinox.Module), "
                f"got {type(e).__name__}: {e}. Install it with `pip install equinox`, or use the "
                f"pure function implicitdiff_jax.deq(f, params, x), which does not need it."
            ) from e
        from ._deq_module import DEQ

        return DEQ
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "DEQ"})
