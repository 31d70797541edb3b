"""A forward solver's factorization of $\\partial_x F$, handed to the backward pass.

A solver that has just factored the Jacobian of its own condition at $x^*$ (the QP's
interior point polishes its answer on the active-set KKT system it factors) need not let the
backward pass build and factor that matrix again. While it runs, it calls `publish` with an
object that solves with $A = \\partial_x F(x^*, \\theta)$ and $A^\\top$ on the host:

    factorization.solve(b, transpose) -> (x, ok, size)

with `b` a NumPy float64 array `(B, n)` in the raveled layout of the backward solve (x*'s leaves
in tree order, each flattened after the batch dimensions; B the batch flattened), and per batch
element `ok` (the answer is trustworthy: finite, its residual at rounding, and A shown
non-singular by the solver's own checks) and `size` (the size of the terms of $Ax$, for the
residual check here). Adapters that can hand it on (PyTorch: the autograd context of the call)
run the solver inside `capture` and give what was published to `implicit_vjp`, whose linear
solve becomes `Factored`:

- the answer is checked once more against the framework's own product with $A$ (the
  backward's operator, not the factorization's): its residual must be at the direct solvers'
  accuracy, the tolerance `Dense` applies;
- where the factorization says not ok, or that check fails, for any element, the configured
  solver (`fallback`) solves the whole batch as it would have without the factorization: its
  checks (the uniqueness probe, the residual) decide then, so a factorization can make a
  backward faster but never change what it refuses.

Only a first-order derivative outside any transform takes this path (the answer is computed on
the host and is not itself differentiable); higher-order derivatives, `torch.func` transforms,
JAX (whose derivative rules are traced) and the NumPy reference backend keep the configured
solver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._array import norm
from ._diagnostics import LinearSolveInfo
from ._linear_solve import AbstractLinearSolver, _default_rtol

_SLOT: ContextVar[list | None] = ContextVar("implicitdiff_factorization", default=None)


def publish(factorization: Any) -> None:
    """Called by a solver while it runs: offer `factorization` (see the module's notes) to the
    backward pass of this call. Does nothing where no adapter is listening (`capture`)."""
    slot = _SLOT.get()
    if slot is not None:
        slot.append(factorization)


@contextlib.contextmanager
def capture() -> Iterator[list]:
    """For framework adapters: listen while the body runs the solver. The list yielded
    receives what the solver published (a factorization of $\\partial_x F$ at its answer; the
    last one counts), which goes to `implicit_vjp(..., factorization=...)` for a first-order
    derivative computed outside any transform (nothing differentiates the host answer). With
    nothing published, or elsewhere, the configured linear solver runs as always.

    ```python
    with capture_factorization() as published:
        x, aux = fn.run_solver(args, options)
    factorization = published[-1] if published else None
    ```
    """
    got: list = []
    token = _SLOT.set(got)
    try:
        yield got
    finally:
        _SLOT.reset(token)


@dataclass(frozen=True)
class Factored(AbstractLinearSolver):
    """The backward linear solve from a forward solver's `factorization`, checked against the
    operator, with `fallback` (the configured solver) wherever it is not trusted. `transpose`:
    the solve is with $A^\\top$ (a VJP)."""

    factorization: Any
    fallback: AbstractLinearSolver
    transpose: bool
    rtol: float | None = None
    atol: float = 0.0
    ridge: float = 0.0

    def __repr__(self) -> str:
        return f"Factored({self.fallback!r})"

    def _solve(self, bk: Any, xp: Any, matvec: Any, b: Any, x0: Any, rmatvec: Any,
               tags: frozenset) -> tuple[Any, LinearSolveInfo]:
        def fallback() -> tuple[Any, LinearSolveInfo]:
            return self.fallback.solve(matvec, b, x0=x0, rmatvec=rmatvec, tags=tags,
                                       backend=bk)

        N = int(b.shape[-1])
        hb = np.asarray(bk.to_host(b), dtype=np.float64).reshape(-1, N)
        with np.errstate(all="ignore"):
            got = self.factorization.solve(hb, self.transpose)
        if got is None:
            return fallback()
        sol, ok, size = got
        if sol.shape != hb.shape or not np.all(ok):
            return fallback()
        x = bk.from_host(np.asarray(sol.reshape(tuple(b.shape)), dtype=np.float64), like=b)
        x = xp.astype(x, b.dtype)
        # the residual against the backward's own operator, at the direct solvers' accuracy
        # (`Dense`'s rtol) or the rounding of the terms of Ax in b's dtype
        rn = norm(xp, matvec(x) - b)
        eps = float(xp.finfo(b.dtype).eps)
        rounding = 100.0 * eps * float(np.sqrt(N)) * np.asarray(size, dtype=np.float64)
        rnh = np.asarray(bk.to_host(rn), dtype=np.float64).reshape(-1)
        bnh = np.asarray(bk.to_host(norm(xp, b)), dtype=np.float64).reshape(-1)
        tol = np.maximum(_default_rtol(xp, b.dtype, True) * bnh, rounding)
        if not np.all(np.isfinite(rnh) & (rnh <= tol)):
            return fallback()
        rn = xp.reshape(rn, tuple(b.shape[:-1]))
        yes = xp.isfinite(rn)  # all True (checked above)
        return x, LinearSolveInfo(xp.zeros_like(rn, dtype=xp.int32), rn, yes, ~yes)
