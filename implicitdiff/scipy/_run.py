"""The machinery shared by the drop-ins: run a host solve inside an `idf.custom_root`-decorated
solver and carry the solver's result object out beside the differentiable `x`.

The decorated solver is called with `has_aux=True`:

- Eager backends (NumPy, PyTorch) run it directly (torch on detached tensors); the full SciPy
  result is kept on the host side (`holder`) and returned as SciPy returned it, with `x` replaced.
- A backend that calls host code from traced code (JAX, through `jax.pure_callback`) says so with
  `Backend.callback_result_shape`; the core's external-solver path then gets `result_shape`, so
  the solve runs once. Only arrays cross a callback, so the aux is a fixed set of array fields
  (`fun`, `success`, `status`, ...). Called eagerly with concrete arrays, the full result object
  from the host is used; traced (`jit`, `vmap`, `grad`), the result holds the array fields only.

SciPy's own flag (`success=False`, or an exception such as `fixed_point`'s RuntimeError) does
not decide: SciPy also stops at a solution as exact as float64 allows (BFGS "precision loss" at
`tol=1e-12`, hybr "xtol too small"). The condition's residual at the returned x decides, on the
host: within `residual_tol`, x is accepted and SciPy's message becomes a `RuntimeWarning`;
above it, the failure carries SciPy's message and the residual (per block for the KKT
conditions): `on_failure="raise"` raises `NonConvergenceError`, `"warn"` warns, `"nan"` returns
NaN (which the core's check then lets through as NaN). The drop-ins' own checks (x outside the
bounds, constraints violated) are failures whatever SciPy says.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._array import ArraySpec as ArraySpec
from .._array import numpy_dtype
from .._backend import Backend, is_host_array
from .._errors import NonConvergenceError, StructureError
from .._linear_solve import AbstractLinearSolver
from .._root import custom_root
from ._host import residual_tol_of


@dataclass
class Holder:
    """What the host solve leaves for the Python side of the call (one per call)."""

    result: Any = None
    error: BaseException | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """One drop-in call, ready for the core.

    - `F(x, *thetas)`: the condition (`x` the framework-side unknown).
    - `host_solve(x0_np, *thetas_np) -> (x_np, result, status, message, blocks)`: `status` is
      `OK`, `SCIPY_FAILED` (SciPy's flag: the residual decides) or `INVALID` (a failure
      whatever the residual); `blocks` is `{name: max|block|}` of the condition's residual
      when the host solve computed it (the KKT blocks), else None (then `run` evaluates `F`
      on the host when SciPy's flag needs it).
    - `thetas`: the positional (differentiable) arguments of the decorated solver.
    - `x_spec`: pytree of `ArraySpec` of `x` (JAX's `result_shape`).
    - `aux_fields`: `{name: numpy dtype}` of the scalar result fields carried under JAX.
    """

    name: str
    F: Callable[..., Any]
    tags: frozenset
    host_solve: Callable[..., tuple[Any, Any, str, str, dict | None]]
    thetas: tuple
    x0: Any
    x_spec: Any
    aux_fields: dict
    get_field: Callable[[Any, str], Any]


def as_args(args: Any) -> tuple:
    """SciPy's convention: a non-tuple `args` is one argument."""
    return args if isinstance(args, tuple) else (args,)


def check_args(who: str, what: str, f: Callable[..., Any], n_lead: int, args: tuple) -> None:
    """Raise `StructureError` when `f(x, *args)` cannot bind (wrong number of `args`)."""
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):  # builtins, C functions: nothing to check
        return
    try:
        sig.bind(*([None] * n_lead), *args)
    except TypeError as e:
        raise StructureError(
            f"{who}: {what} has the signature {getattr(f, '__name__', what)}{sig}, but it is "
            f"called as {what}(x, *args) with {len(args)} args ({e}). Expected args= to hold "
            f"exactly the arguments of {what} after x (a tuple; a single non-tuple value counts "
            "as one argument)."
        ) from None


OK = "ok"
"""`host_solve` status: SciPy reported success and the drop-in's own checks passed."""
SCIPY_FAILED = "scipy-failed"
"""`host_solve` status: SciPy reported failure; the condition's residual decides."""
INVALID = "invalid"
"""`host_solve` status: a failure whatever the residual (x outside the bounds, constraints
violated, no iterate to check)."""


def run(bk: Backend, like: Any, plan: Plan, *, residual_tol: float | None, on_failure: str,
        solve: AbstractLinearSolver, derivatives: Any = None) -> tuple[Any, Any, Holder]:
    """Run the plan through `idf.custom_root`. Returns `(x, aux, holder)`: `x` differentiable in
    the thetas, `aux` the array fields when the backend calls the host through a callback (None
    otherwise), `holder.result` the host result when the call was not traced.

    `x0` is a differentiable-looking positional argument (so a traced guess reaches the host
    solve) unless it is a NumPy array (then the decorated solver takes the thetas only, as
    `implicit_function` documents)."""
    holder = Holder()
    tol = residual_tol_of(plan.x0) if residual_tol is None else residual_tol
    result_shape = bk.callback_result_shape((plan.x_spec, {
        k: ArraySpec((), dt) for k, dt in plan.aux_fields.items()}))
    via_callback = result_shape is not None
    lead = () if is_host_array(plan.x0) else (plan.x0,)

    def solver(*thetas: Any) -> Any:
        if lead:
            x0_h, thetas_h = bk.to_host(thetas[0]), bk.to_host(thetas[1:])
        else:
            x0_h, thetas_h = bk.to_host(plan.x0), bk.to_host(thetas)
        x, result, status, message, blocks = plan.host_solve(x0_h, *thetas_h)
        holder.result = result
        x = _tree_map_np_spec(x, plan.x_spec)
        if status != INVALID and (status == SCIPY_FAILED or blocks is not None):
            if blocks is None:
                blocks = host_residual(bk, like, plan.F, x, thetas_h)
            status, message = _decide(plan.name, status, message, blocks, tol)
        if status == INVALID:
            err = NonConvergenceError(
                f"{plan.name}: {message} The derivative of x* is only meaningful at a "
                "solution. Tighten SciPy's tolerance (tol=, gtol/xtol/ftol in options) or "
                "raise its iteration limit (maxiter/max_nfev), start closer, or check the "
                "problem; on_failure='warn' or 'nan' lets the result through.",
                residual_norm=max(blocks.values(), default=math.nan) if blocks else None,
                tolerance=tol,
            )
            if on_failure == "raise":
                holder.error = err
                raise err
            if on_failure == "warn":
                warnings.warn(str(err), RuntimeWarning, stacklevel=2)
            else:
                x = _tree_map_np(lambda a: np.full_like(a, np.nan), x)
        if via_callback:
            aux = {k: np.asarray(plan.get_field(result, k), dtype=dt)
                   for k, dt in plan.aux_fields.items()}
            return x, aux
        # hand the framework's arrays back ourselves (the core's conversion of a host result
        # may reshape a 0-d array)
        x = bk.from_host(x, like=like)
        return x, (result if not lead else None)

    solver.__name__ = plan.name
    if lead:
        base_F = plan.F

        def F(x: Any, x0: Any, *thetas: Any) -> Any:  # x* does not depend on the guess x0
            return base_F(x, *thetas)

        F.__name__ = getattr(base_F, "__name__", "F")
    else:
        F = plan.F
    fn = custom_root(F, solve=solve, tags=plan.tags, has_aux=True,
                     residual_tol=tol, on_failure=on_failure,
                     result_shape=result_shape, derivatives=derivatives)(solver)
    capture = _CAPTURE.get()
    if capture is not None:
        capture.append(fn)
        raise _Captured
    try:
        x, aux = fn(*lead, *plan.thetas)
    except Exception as e:  # a failure raised inside a host callback may come back wrapped
        if holder.error is not None and e is not holder.error:
            raise holder.error from e
        raise
    if bk.is_traced(x):
        holder.result = None
    return x, (aux if via_callback else None), holder


def _decide(name: str, status: str, message: str, blocks: dict, tol: float
            ) -> tuple[str, str]:
    """SciPy's flag against the condition's residual `blocks` (`{name: max|block|}`): the
    status and message after the residual check on the host."""
    worst = max(blocks, key=lambda k: _nan_last(blocks[k])) if blocks else None
    value = blocks[worst] if worst is not None else 0.0
    if worst is not None and not (value <= tol):  # NaN fails too
        said = (f"SciPy reported failure ({message.strip()}), and the" if status == SCIPY_FAILED
                else "the")
        return INVALID, (f"{said} optimality condition does not hold at the returned x: "
                         f"{describe_blocks(blocks, worst, tol)}.")
    if status == SCIPY_FAILED:
        warnings.warn(
            f"{name}: SciPy reported failure: {message} But the optimality condition holds at "
            f"the returned x to max|F(x*, θ)| = {value:.3g} <= residual_tol = {tol:.3g}, so x* "
            "and its derivative are accepted (the condition's residual decides; SciPy's flag "
            "only warns). Pass a larger tol to SciPy to stop before its own limit.",
            RuntimeWarning, stacklevel=4)
    return OK, message


def _nan_last(v: float) -> float:
    return math.inf if math.isnan(v) else v


def describe_blocks(blocks: dict, worst: str, tol: float) -> str:
    """`"the stationarity block is off: max|stationarity| = 1e-06 > residual_tol = 1e-09 (the
    others: equality 0, ...)"`, or `"max|F(x*, θ)| = 1e-06 > residual_tol = 1e-09"` for a
    condition of one block."""
    if len(blocks) == 1:
        return f"max|F(x*, θ)| = {blocks[worst]:.3g} > residual_tol = {tol:.3g}"
    rest = ", ".join(f"{k} {v:.3g}" for k, v in blocks.items() if k != worst)
    return (f"the {worst} block is off: max|{worst}| = {blocks[worst]:.3g} > residual_tol = "
            f"{tol:.3g} (the others: {rest})")


def host_residual(bk: Backend, like: Any, F: Callable[..., Any], x: Any, thetas_h: tuple
                  ) -> dict:
    """`{"F": max|F(x, *thetas)|}` evaluated on the host side (the framework's arrays built
    from the host `x` and `thetas_h`), NaN where F is not finite; one entry per block when F
    returns a tuple (named by `F.blocks`, a `Condition`'s block names, else `F[i]`)."""
    out = bk.to_host(F(bk.from_host(x, like=like), *bk.from_host(thetas_h, like=like)))
    parts = list(out) if isinstance(out, (tuple, list)) else [out]
    names = getattr(F, "blocks", None)
    if not (isinstance(names, tuple) and len(names) == len(parts)):
        names = ("F",) if len(parts) == 1 else tuple(f"F[{i}]" for i in range(len(parts)))
    blocks = {}
    for name, part in zip(names, parts):
        vals = [np.abs(np.asarray(leaf)) for leaf in _leaves(part)]
        finite = all(bool(np.all(np.isfinite(a))) for a in vals)
        blocks[name] = (max((float(np.max(a, initial=0.0)) for a in vals), default=0.0)
                        if finite else math.nan)
    return blocks


def _leaves(tree: Any) -> list:
    if isinstance(tree, (tuple, list)):
        return [leaf for t in tree for leaf in _leaves(t)]
    if isinstance(tree, dict):
        return [leaf for t in tree.values() for leaf in _leaves(t)]
    return [tree]


_CAPTURE: contextvars.ContextVar[list | None] = contextvars.ContextVar("capture", default=None)


class _Captured(Exception):
    pass


def implicit_function(drop_in: Callable[..., Any], *call_args: Any, **call_kwargs: Any
                      ) -> Any:
    """The decorated solver behind a drop-in call, for `idf.vjp` / `idf.jvp` /
    `idf.jacobian` on NumPy arrays (which differentiate decorated solvers, not compositions).

    ```python
    g = implicit_function(isc.minimize, fun, x0, args=(lam, X, y), method="L-BFGS-B",
                          bounds=bounds, tol=1e-12)
    (x, res), vjp_fn = idf.vjp(g, lam, X, y)      # g(*args) -> (x, OptimizeResult)
    dlam, dX, dy = vjp_fn(x_bar)
    ```

    `drop_in` is one of the drop-ins, called as you would call it; nothing is solved here. The
    returned `ImplicitFunction` takes the drop-in's `args` as positional arguments and returns
    `(x, result)` (`has_aux=True`; `result` is SciPy's object on NumPy). For `minimize` with
    `constraints` it takes `(args, eq_args, ineq_args)` (the `args` of the equality and of the
    inequality constraint dicts, each a tuple of tuples, in order) and `x` is
    `(z, nu, mu)` with the KKT multipliers. With JAX or PyTorch inputs there is no need for
    it: differentiate the drop-in's `.x` directly.
    """
    captured: list = []
    token = _CAPTURE.set(captured)
    try:
        drop_in(*call_args, **call_kwargs)
    except _Captured:
        pass
    finally:
        _CAPTURE.reset(token)
    if not captured:
        raise TypeError(f"implicit_function: expected one of the implicitdiff.scipy drop-ins, "
                        f"got {drop_in!r}.")
    return captured[0]


def _tree_map_np(f: Callable[[Any], Any], x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return type(x)(_tree_map_np(f, a) for a in x)
    return f(np.asarray(x))


def _tree_map_np_spec(x: Any, spec: Any) -> Any:
    """Cast the host `x` to the planned shapes and dtypes."""
    if isinstance(spec, ArraySpec):
        return np.asarray(x, dtype=spec.dtype).reshape(spec.shape)
    return type(spec)(_tree_map_np_spec(a, s) for a, s in zip(x, spec))


def spec_of(x: Any) -> ArraySpec:
    """`ArraySpec` of a framework array (its dtype's name read as a NumPy dtype)."""
    return ArraySpec(tuple(x.shape), numpy_dtype(x))
