"""What a user can read after a call: forward residuals and backward linear-solve statistics.

```python
with idf.diagnostics() as d:
    x, vjp_fn = idf.vjp(ridge, 0.1, A, b)
    vjp_fn(np.ones_like(x))
print(d.forward[-1].residual_norm, d.backward[-1].iterations)
```
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class LinearSolveInfo(NamedTuple):
    """What a linear solver reports. Arrays with the batch shape of the right-hand side (0-d for
    a single problem), so the tuple passes through `jit` and `vmap`.

    - `iterations`: matrix-vector products' iterations used (0 for direct solvers).
    - `residual_norm`: $\\|A x - b\\|_2$ (the solver's own estimate for Krylov methods).
    - `converged`: residual within tolerance and no breakdown.
    - `breakdown`: the method broke down (singular or indefinite operator, division by zero).
    - `not_symmetric`: with the `symmetric` tag, True where a random probe showed that $A$ is
      not symmetric (the solve is then refused: `converged` is False); False without the tag.
    """

    iterations: Any
    residual_norm: Any
    converged: Any
    breakdown: Any
    not_symmetric: Any = None


@dataclass(frozen=True)
class ForwardRecord:
    """One forward solve: $\\max|F(x^*, \\theta)|$ against the tolerance.

    With `batch_dims > 0`, `residual_norm` and `ok` cover the whole batch and `per_element`
    holds the residual of each batch element (a NumPy array of the batch shape); else None.

    `relative_residual`: with the default tolerance (`residual_tol=None`), the residual
    relative to the size of $F$'s terms near $x^*$, $\\max|F| / \\max|\\partial_x F\\, d|$ with
    $d \\sim x^*$, leaf by leaf (the largest over leaves and batch elements); to first order the
    relative error of $x^*$ when $\\partial_x F$ is well conditioned. The check accepts
    `relative_residual <= residual_tol` (then relative, $10\\sqrt{\\epsilon}$ of each leaf's
    dtype; the strictest shown). None with an explicit `residual_tol` (absolute: `ok` is
    `residual_norm <= residual_tol`).
    """

    function: str
    residual_norm: float
    residual_tol: float
    ok: bool
    per_element: Any = None
    relative_residual: float | None = None


@dataclass(frozen=True)
class BackwardRecord:
    """One derivative computation (`mode` "jvp" or "vjp") and its linear solve.

    `derivative_error_bound`: the relative error of the derivative implied, to first order, by
    the forward residual and the backward solve: $\\|A^{-1} F(x^*, \\theta)\\|_\\infty /
    \\|x^*\\|_\\infty$ (the relative error of $x^*$, from one extra linear solve with $A$)
    plus the backward solve's relative residual $\\|A y - b\\| / (\\|A\\| \\|y\\|)$ ($\\|A\\|$
    estimated by one product). The derivative
    moves with $x^*$ by its own relative sensitivity (of order 1 where $F$ is nonlinear on the
    scale of $x^*$; 0 where the derivative does not depend on $x^*$), and the backward term
    grows with the condition number of $A$: an estimate of the order of the error, not a
    guarantee. Computed only inside an `idf.diagnostics()` block (the extra solve costs about
    as much as the derivative's own); NaN where the extra solve failed. One per batch element
    (an array) with `batch_dims`.

    `rtol`: the relative tolerance the linear solve stopped at (iterative solvers) or checked
    its answer against (`Dense`, `Cholesky`); None for a solver without one. `rtol_source`
    says where it came from: `"given"`, the solver's own `rtol=`; `"forward"`, chosen from the
    forward's accuracy (an iterative solver without `rtol=`: 0.1 times
    `forward_residual`, at least the dtype's default, $10^{-12}$ in float64 and $10^{-6}$ in
    float32, which an exact forward keeps, and at most $10^{-4}$; one per batch element);
    `"default"`, the solver's default (direct solvers, whose cost does not depend on it).
    `forward_residual`: with `"forward"`, $\\|F(x^*, \\theta)\\|_2 / (\\|A\\|_2\\,
    \\|x^*\\|_2)$ ($\\|A\\|$ estimated by one product), about a lower bound on the relative
    error of $x^*$ (which exceeds it by at most the condition number of $A$, as the backward
    solve's error exceeds its `rtol`); else None. See docs/linear-solvers.md.
    """

    function: str
    mode: str
    solver: str
    derivative_method: str
    iterations: Any
    residual_norm: Any
    converged: Any
    derivative_error_bound: Any = None
    rtol: Any = None
    rtol_source: str = "default"
    forward_residual: Any = None


@dataclass
class Diagnostics:
    """Records collected inside an `idf.diagnostics()` block, in call order."""

    forward: list[ForwardRecord] = field(default_factory=list)
    backward: list[BackwardRecord] = field(default_factory=list)
    _open: bool = field(default=True, repr=False, compare=False)

    def _add(self, rec: Any) -> None:
        if isinstance(rec, ForwardRecord):
            self.forward.append(rec)
        else:
            self.backward.append(rec)


_state = threading.local()


def _active() -> list[Diagnostics]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def _emit(rec: Any) -> None:
    """Hand a record to the `idf.diagnostics()` blocks active in this thread."""
    for d in _active():
        d._add(rec)


def _foreign_thread() -> bool:
    """Whether this thread was started outside Python's `threading` (a runtime's own worker,
    such as the host-callback thread of an accelerator), so no user code runs on it."""
    return isinstance(threading.current_thread(), threading._DummyThread)  # type: ignore[attr-defined]


def _emitter() -> Callable[[Any], None]:
    """`_emit` for a record that arrives later, maybe on another thread (a host callback of
    compiled code).

    Compiled code traced once may run again from any thread, so the record goes to the blocks
    of the thread it arrives on: JAX runs a CPU computation, and its callbacks, on the thread
    that called it. A callback on a runtime's own worker thread (a GPU's host-callback thread,
    where no user code runs) cannot tell which caller it serves: its record goes to the blocks
    that were active where the function was traced, while they stay open."""
    captured = list(_active())

    def emit(rec: Any) -> None:
        if _foreign_thread():
            targets = [d for d in captured if d._open]
        else:
            targets = list(_active())
        for d in targets:
            d._add(rec)

    return emit


def collecting() -> bool:
    """Whether an `idf.diagnostics()` block is active in this thread."""
    return bool(_active())


@contextlib.contextmanager
def diagnostics() -> Iterator[Diagnostics]:
    """Collect the forward residual and backward linear-solve statistics of every implicit
    derivative computed inside the block (this thread only; nested blocks each get a copy).

    **Returns:** a `Diagnostics` with lists `forward` (`ForwardRecord`: function, residual_norm,
    residual_tol, ok) and `backward` (`BackwardRecord`: function, mode, solver,
    derivative_method, iterations, residual_norm, converged, the tolerance the solve used,
    `rtol`, and where it came from, `rtol_source`).

    Under `jax.jit` records arrive when the compiled function runs, through a host callback,
    to the blocks active in the thread that runs it (JAX on the CPU runs a computation and its
    callbacks on the calling thread, so two threads calling one compiled function each get
    their own records). A callback on a runtime's own worker thread goes to the blocks that
    were active where the function was traced, while they are open. Only functions traced
    inside a block report; compiled code traced outside one pays nothing.
    """
    d = Diagnostics()
    stack = _active()
    stack.append(d)
    try:
        yield d
    finally:
        d._open = False
        stack.remove(d)
