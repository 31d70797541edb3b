"""`root`, `least_squares`, `fixed_point`, `root_scalar`: SciPy's solvers with a differentiable
solution, and `wrap_solver` for any other host solver."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.optimize

from .. import conditions as cond
from .._backend import Backend, find_backend, is_host_array
from .._errors import StructureError
from .._linear_solve import AbstractLinearSolver
from .._root import Derivatives, ImplicitFunction, custom_root, solve_argument
from ..backend import resolve_on_failure
from ._host import Derived, backend_of_call, residual_tol_of, value_of
from ._run import OK, SCIPY_FAILED, Plan, as_args, check_args, run, spec_of


def _getter(res: Any, k: str) -> Any:
    if isinstance(res, dict):
        return res.get(k, -1)
    return getattr(res, k, -1)


def _setup(who: str, f: Callable[..., Any], x0: Any, args: tuple, *extra: Any
           ) -> tuple[Backend, Any, tuple]:
    """The backend of the call, its reference array, and `args` with NumPy arrays converted to
    it (constants)."""
    check_args(who, "fun", f, 1, args)
    bk, like = backend_of_call(x0, args, *extra)
    return bk, like, bk.from_host(args, like=like)


def _like(f: Callable[..., Any], x: Any, *a: Any) -> Any:
    """`f(x, *a)` with `x` an array (a NumPy scalar, as NumPy's arithmetic and SciPy's scalar
    solvers make, as a 0-d array: an array-API `f` takes arrays only), and a Python-number
    output turned into an array of x's namespace and dtype."""
    x = _array(x)
    return _out_like(x, f(x, *a))


def _like_value(f: Callable[..., Any], x: Any, *a: Any) -> Any:
    """`_like` of the value of an `f` returning `(value, derivative)` (`fprime=True`)."""
    x = _array(x)
    return _out_like(x, f(x, *a)[0])


def _out_like(x: Any, out: Any) -> Any:
    if hasattr(out, "dtype") and not isinstance(out, np.generic):
        return out
    import array_api_compat

    return array_api_compat.array_namespace(x).asarray(out, dtype=x.dtype)


def _array(x: Any) -> Any:
    """A NumPy scalar or Python number as a 0-d NumPy array; arrays unchanged."""
    if isinstance(x, (np.generic, float, int, complex)) and not isinstance(x, bool):
        return np.asarray(x)
    return x


def _with_arrays(f: Callable[..., Any], x: Any, *a: Any) -> Any:
    """`f(x, *a)` with `x` an array (see `_like`); the output as `f` returns it."""
    return f(_array(x), *a)


# ---- root --------------------------------------------------------------------------------------

_ROOT_JAC = {"hybr", "lm"}


def root(fun: Callable[..., Any], x0: Any, args: Any = (), method: str = "hybr",
         jac: Any = None, tol: float | None = None, callback: Any = None,
         options: dict | None = None, *, residual_tol: float | None = None,
         on_failure: str | None = None, solve: AbstractLinearSolver | None = None,
         linear_solver: AbstractLinearSolver | None = None) -> scipy.optimize.OptimizeResult:
    """`scipy.optimize.root` whose result's `x` is differentiable in `args`.

    The condition is `fun` itself: $F(x, \\theta) = $ `fun(x, *args)`, so
    $\\partial x^* / \\partial\\theta = -(\\partial_x F)^{-1} \\partial_\\theta F$. With
    JAX/PyTorch inputs and no `jac`, methods `hybr` and `lm` get the exact Jacobian from
    `jax.jacfwd` / `torch.func.jacfwd`. With NumPy inputs a given `jac` also serves the
    derivative (NumPy reference). Extras as in `minimize` (SciPy's `success=False` at a residual
    within `residual_tol`, e.g. hybr's "xtol too small" at the root, only warns).

    **Returns:** SciPy's `OptimizeResult`, `x` differentiable (under JAX tracing: `x`,
    `success`, `status`, `nfev`).
    """
    on_failure = resolve_on_failure(on_failure, "root")
    solve = solve_argument("root", solve, linear_solver)
    args = as_args(args)
    bk, like, args = _setup("root", fun, x0, args)
    x0f = bk.host_array(x0, like=like).reshape((-1,))
    meth = method.lower() if isinstance(method, str) else None
    if residual_tol is None:
        residual_tol = residual_tol_of(x0f)

    F: Callable[..., Any] = Derived(value_of, fun) if jac is True else fun
    derivs = None
    if not bk.autodiff and callable(jac):  # the user's Jacobian serves the reference's products
        derivs = Derivatives(jvp_x=lambda v, x, *a: np.asarray(jac(x, *a)) @ v,
                             vjp_x=lambda u, x, *a: np.asarray(jac(x, *a)).T @ u)

    def host_solve(x0_h: Any, *a: Any) -> tuple[Any, Any, str, str, None]:
        kw: dict[str, Any] = {"method": method, "tol": tol, "callback": callback,
                              "options": options}
        a_fw = bk.from_host(a, like=like)
        x0n = np.asarray(x0_h, dtype=np.float64).reshape(-1)
        if jac is True:
            host = bk.host_function(fun, a_fw, like=like)
            res = scipy.optimize.root(lambda x: tuple(np.asarray(v) for v in host(x)), x0n,
                                      jac=True, **kw)
            return res.x, res, _status(res.success), str(res.message), None
        if jac is None and meth in _ROOT_JAC:
            kw["jac"] = bk.host_derivative(F, a_fw, "jacobian", like=like)
        elif jac is not None:
            kw["jac"] = bk.host_function(jac, a_fw, like=like) if callable(jac) else jac
        res = scipy.optimize.root(bk.host_function(F, a_fw, like=like), x0n, **kw)
        return res.x, res, _status(res.success), str(res.message), None

    aux = {"success": np.bool_, "status": np.int32, "nfev": np.int32}
    plan = Plan("root", F, frozenset(), host_solve, args, x0f, spec_of(x0f), aux, _getter)
    x, aux_v, holder = run(bk, like, plan, residual_tol=residual_tol, on_failure=on_failure,
                           solve=solve, derivatives=derivs)
    return _result(holder, x, aux_v)


def _status(success: Any) -> str:
    """SciPy's flag as a host-solve status (a failure lets the condition's residual decide)."""
    return OK if bool(success) else SCIPY_FAILED


def _result(holder: Any, x: Any, aux: Any) -> scipy.optimize.OptimizeResult:
    if holder.result is not None:
        res = scipy.optimize.OptimizeResult(holder.result)
        res["x"] = x
        return res
    return scipy.optimize.OptimizeResult(x=x, **aux)


# ---- least_squares -----------------------------------------------------------------------------

def least_squares(fun: Callable[..., Any], x0: Any, jac: Any = "2-point",
                  bounds: Any = (-np.inf, np.inf), method: str = "trf", *, args: Any = (),
                  kwargs: dict | None = None, residual_tol: float | None = None,
                  on_failure: str | None = None, solve: AbstractLinearSolver | None = None,
                  linear_solver: AbstractLinearSolver | None = None,
                  **options: Any) -> scipy.optimize.OptimizeResult:
    """`scipy.optimize.least_squares` (linear loss) whose result's `x` is differentiable in
    `args`.

    The condition is the normal equations $J_r^\\top r = 0$ (`conditions.least_squares`, with the
    exact Hessian of $\\tfrac12\\|r\\|^2$ in the derivative); with finite `bounds`, the
    projected-gradient fixed point of $\\tfrac12\\|r\\|^2$ on the box (exact on the active set).
    With JAX/PyTorch inputs and the default `jac` (finite differences), SciPy gets the exact
    Jacobian from `jax.jacfwd` / `torch.func.jacfwd`. Other SciPy keywords (`ftol`, `xtol`,
    `gtol`, `max_nfev`, `x_scale`, ...) pass through; `loss` must be `"linear"`. Extras as in
    `minimize`.

    **Returns:** SciPy's `OptimizeResult`, `x` differentiable (under JAX tracing: `x`, `cost`,
    `success`, `status`, `nfev`, `optimality`).
    """
    on_failure = resolve_on_failure(on_failure, "least_squares")
    solve = solve_argument("least_squares", solve, linear_solver)
    if options.get("loss", "linear") != "linear":
        raise StructureError(
            f"least_squares: expected loss='linear', got loss={options['loss']!r}. Robust "
            "losses are not supported by the drop-in; minimize the robust objective with "
            "implicitdiff.scipy.minimize instead."
        )
    args = as_args(args)
    kwargs = dict(kwargs or {})
    bk, like, args = _setup("least_squares", fun, x0, args)
    x0f = bk.host_array(x0, like=like).reshape((-1,))
    n = int(x0f.shape[0])
    if residual_tol is None:
        residual_tol = residual_tol_of(x0f)

    if kwargs:
        def r(x: Any, *a: Any) -> Any:
            return fun(x, *a, **kwargs)

        r.__name__ = getattr(fun, "__name__", "fun")
    else:  # `fun` itself: host functions compiled for it are reused across calls
        r = fun  # type: ignore[assignment]
    r_name = getattr(r, "__name__", "fun")
    lb = np.broadcast_to(np.asarray(bounds[0], dtype=np.float64), (n,))
    ub = np.broadcast_to(np.asarray(bounds[1], dtype=np.float64), (n,))
    boxed = bool(np.isfinite(lb).any() or np.isfinite(ub).any())
    # the user's Jacobian serves the condition where the backend has no autodiff (NumPy)
    user_jac = jac if (callable(jac) and not bk.autodiff) else None
    if not boxed:
        if user_jac is not None:
            Fl = cond.least_squares(r, jac=lambda x, *a: user_jac(x, *a, **kwargs))
        else:
            Fl = cond.least_squares(r)
        F: Callable[..., Any] = Fl
        tags = Fl.tags
    else:
        lb_f, ub_f = bk.host_array(lb, like=x0f), bk.host_array(ub, like=x0f)

        def half_sq(x: Any, a: tuple) -> Any:
            v = r(x, *a)
            return 0.5 * (v * v).sum()

        grad: Callable[..., Any] | None = None
        if user_jac is not None:
            def grad_half_sq(x: Any, a: tuple) -> Any:
                return np.asarray(user_jac(x, *a, **kwargs)).T @ r(x, *a)

            grad = grad_half_sq
        Fp = cond.projected_gradient(half_sq, cond.projection_box, grad=grad)

        def F_box(x: Any, *a: Any) -> Any:
            return Fp(x, a, (lb_f, ub_f))

        F_box.__name__ = f"projected_gradient(½‖{r_name}‖², box)"
        F = F_box
        tags = frozenset()

    def host_solve(x0_h: Any, *a: Any) -> tuple[Any, Any, str, str, None]:
        x0n = np.asarray(x0_h, dtype=np.float64).reshape(-1)
        a_fw = bk.from_host(a, like=like)
        jac_s: Any = jac
        if isinstance(jac, str):
            if jac in ("2-point", "3-point", "cs"):  # exact from autodiff, else SciPy's own
                jac_s = bk.host_derivative(r, a_fw, "jacobian", like=like) or jac
        else:
            jac_s = bk.host_function(lambda x, *aa: jac(x, *aa, **kwargs), a_fw, like=like)
        res = scipy.optimize.least_squares(bk.host_function(r, a_fw, like=like), x0n,
                                           jac=jac_s, bounds=bounds, method=method, **options)
        return res.x, res, _status(res.success), str(res.message), None

    aux = {"cost": np.float64, "success": np.bool_, "status": np.int32, "nfev": np.int32,
           "optimality": np.float64}
    plan = Plan("least_squares", F, frozenset(tags), host_solve, args, x0f, spec_of(x0f),
                aux, _getter)
    x, aux_v, holder = run(bk, like, plan, residual_tol=residual_tol, on_failure=on_failure,
                           solve=solve)
    return _result(holder, x, aux_v)


# ---- fixed_point -------------------------------------------------------------------------------

def fixed_point(func: Callable[..., Any], x0: Any, args: Any = (), xtol: float = 1e-8,
                maxiter: int = 500, method: str = "del2", *,
                residual_tol: float | None = None, on_failure: str | None = None,
                solve: AbstractLinearSolver | None = None,
                linear_solver: AbstractLinearSolver | None = None) -> Any:
    """`scipy.optimize.fixed_point` whose result is differentiable in `args`.

    The condition is $T(x, \\theta) - x = 0$ with $T$ = `func` (`conditions.fixed_point`), so
    $\\partial x^*/\\partial\\theta = (I - \\partial_x T)^{-1}\\partial_\\theta T$. SciPy's
    `RuntimeError` ("Failed to converge after ...") leaves no iterate: the residual is checked at
    `x0`, and the `NonConvergenceError` (or warning, or NaN, by `on_failure`) carries SciPy's
    message.

    **Returns:** the fixed point, an array of x0's shape, in the framework of the inputs.
    """
    on_failure = resolve_on_failure(on_failure, "fixed_point")
    solve = solve_argument("fixed_point", solve, linear_solver)
    args = as_args(args)
    bk, like, args = _setup("fixed_point", func, x0, args)
    x0f = bk.host_array(x0, like=like)
    if residual_tol is None:
        residual_tol = residual_tol_of(x0f)
    T = Derived(_like, func)
    F = cond.fixed_point(T)

    def host_solve(x0_h: Any, *a: Any) -> tuple[Any, Any, str, str, None]:
        x0n = np.asarray(x0_h, dtype=np.float64)
        h = bk.host_function(T, bk.from_host(a, like=like), like=like)
        try:
            x = scipy.optimize.fixed_point(h, x0n, xtol=xtol, maxiter=maxiter, method=method)
        except RuntimeError as e:
            return x0n, None, SCIPY_FAILED, str(e), None
        return np.asarray(x), None, OK, "", None

    plan = Plan("fixed_point", F, F.tags, host_solve, args, x0f, spec_of(x0f), {},
                _getter)
    x, _, _ = run(bk, like, plan, residual_tol=residual_tol, on_failure=on_failure,
                  solve=solve)
    return x


# ---- root_scalar -------------------------------------------------------------------------------

def root_scalar(f: Callable[..., Any], args: Any = (), method: str | None = None,
                bracket: Any = None, fprime: Any = None, fprime2: Any = None, x0: Any = None,
                x1: Any = None, xtol: float | None = None, rtol: float | None = None,
                maxiter: int | None = None, options: dict | None = None, *,
                residual_tol: float | None = None, on_failure: str | None = None,
                solve: AbstractLinearSolver | None = None,
                linear_solver: AbstractLinearSolver | None = None) -> Any:
    """`scipy.optimize.root_scalar` whose `root` is differentiable in `args`:
    $\\partial x^*/\\partial\\theta = -\\partial_\\theta f / f'(x^*)$.

    With JAX/PyTorch inputs, `newton` (and the default choice when `x0` is given without a
    bracket) gets `fprime` from autodiff, `halley` also `fprime2`; SciPy then picks Newton where
    it would have picked the secant method. `f`, `fprime` and `fprime2` are always given
    arrays (0-d on NumPy; never Python floats or NumPy scalars), so they may be written with
    array-API code.

    **Returns:** SciPy's `RootResults` with `root` a 0-d array of the framework, differentiable
    (under JAX tracing: `root`, `converged`, `iterations`, `function_calls`).
    """
    on_failure = resolve_on_failure(on_failure, "root_scalar")
    solve = solve_argument("root_scalar", solve, linear_solver)
    args = as_args(args)
    bk, like, args = _setup("root_scalar", f, x0 if x0 is not None else 0.0, args, bracket)
    guess = x0 if x0 is not None else (bracket[0] if bracket is not None else 0.0)
    x0f = _reshape(bk.host_array(guess, like=like), ())
    if residual_tol is None:
        residual_tol = residual_tol_of(x0f)
    # `f` itself behind a wrapper equal for equal `f` (compiled host functions are reused)
    F: Callable[..., Any] = Derived(_like_value if fprime is True else _like, f)
    F_root = F
    x_root = x0f
    if not is_host_array(x0f):
        # a framework's unknown is solved for with shape (1,) (the torch backend's backward
        # does not take a 0-d x); the NumPy reference keeps the 0-d x of implicit_function
        def F_root(x: Any, *a: Any) -> Any:
            return _reshape(F(_reshape(x, ()), *a), (1,))

        F_root.__name__ = F.__name__
        x_root = _reshape(x0f, (1,))
    meth = method.lower() if isinstance(method, str) else None
    newtonish = meth in ("newton", "halley") or (meth is None and x0 is not None and
                                                  bracket is None)

    def host_solve(x0_h: Any, *a: Any) -> tuple[Any, Any, str, str, None]:
        kw: dict[str, Any] = {"method": method, "bracket": _floats(bracket), "x1": x1,
                              "xtol": xtol, "rtol": rtol, "maxiter": maxiter,
                              "options": options}
        if x0 is not None:
            kw["x0"] = float(np.asarray(x0_h).reshape(()))
        a_fw = bk.from_host(a, like=like)
        fun_h = bk.host_function(F, a_fw, like=like, scalar=True)
        if fprime is True:  # f returns (f, f'): SciPy splits it
            host = bk.host_function(Derived(_with_arrays, f), a_fw, like=like)
            kw["fprime"] = True
            fun_h = lambda x: tuple(float(np.asarray(v)) for v in host(x))  # noqa: E731
        elif fprime is None and newtonish:  # autodiff's derivative where the backend has one
            kw["fprime"] = bk.host_derivative(F, a_fw, "derivative", like=like)
        elif callable(fprime):
            kw["fprime"] = bk.host_function(Derived(_with_arrays, fprime), a_fw, like=like,
                                            scalar=True)
        if meth == "halley" and fprime2 is None and fprime is not True:
            kw["fprime2"] = bk.host_derivative(F, a_fw, "second_derivative", like=like)
        elif callable(fprime2):
            kw["fprime2"] = bk.host_function(Derived(_with_arrays, fprime2), a_fw, like=like,
                                             scalar=True)
        elif fprime2 is not None:
            kw["fprime2"] = fprime2
        res = scipy.optimize.root_scalar(fun_h, **kw)
        return np.asarray(res.root), res, _status(res.converged), str(res.flag), None

    aux = {"converged": np.bool_, "iterations": np.int32, "function_calls": np.int32}
    plan = Plan("root_scalar", F_root, frozenset(), host_solve, args, x_root,
                spec_of(x_root), aux, _getter)
    x, aux_v, holder = run(bk, like, plan, residual_tol=residual_tol, on_failure=on_failure,
                           solve=solve)
    x = _reshape(x, ())
    if holder.result is not None:
        out = copy.copy(holder.result)
        out.root = x
        return out
    out = scipy.optimize.RootResults(root=None, iterations=-1, function_calls=-1, flag=0,
                                     method=method)
    out.root = x
    for k, v in aux_v.items():
        setattr(out, k, v)
    out.flag = None  # pyright: ignore[reportAttributeAccessIssue]
    return out


def _reshape(x: Any, shape: tuple) -> Any:
    """`reshape` of x's namespace (array-API arrays have no `.reshape` method)."""
    import array_api_compat

    return array_api_compat.array_namespace(x).reshape(x, shape)


def _floats(bracket: Any) -> Any:
    if bracket is None:
        return None
    return [float(np.asarray(to_host(b))) for b in bracket]


# ---- any host solver ---------------------------------------------------------------------------

def to_host(tree: Any) -> Any:
    """A pytree of framework arrays as NumPy arrays (torch detached; a JAX tracer raises the
    error that sends the core to `jax.pure_callback`): `Backend.to_host` of the arrays'
    backend."""
    bk = find_backend(tree)
    if bk is None:
        return tree
    return bk.to_host(tree)


def wrap_solver(F: Callable[..., Any], *, result_shape: Any = None, tags: Any = None,
                has_aux: bool = False, residual_tol: float | None = None,
                on_failure: str | None = None, solve: AbstractLinearSolver | None = None,
                linear_solver: AbstractLinearSolver | None = None
                ) -> Callable[[Callable[..., Any]], ImplicitFunction]:
    """Make any host solver (a C library, CVXPY, scikit-learn, OR-tools) differentiable.

    ```python
    @implicitdiff.scipy.wrap_solver(F, result_shape=jax.ShapeDtypeStruct((n,), jnp.float64))
    def solve(theta, data):          # receives NumPy arrays, returns a NumPy x*
        ...
    ```

    The same as `idf.custom_root` (all options mean the same; `linear_solver=` is the
    deprecated name of `solve=`; `on_failure=None` reads `idf.config.on_failure` at each
    call), with the positional arguments converted to NumPy before the
    solver sees them: torch tensors detached, JAX arrays as host arrays (under `jit`/`vmap`/
    `grad` the solver runs through `jax.pure_callback`, which needs `result_shape`, or one
    earlier call with concrete arrays of the same shapes). `F` is written with the framework's
    ops (or array-API ops) and gives the derivative.

    **Returns:** a decorator turning `solver(*args, **options) -> x` into an `ImplicitFunction`.
    """
    if on_failure is not None:
        resolve_on_failure(on_failure, "wrap_solver")  # validates; None: the config, per call
    solve = solve_argument("wrap_solver", solve, linear_solver)

    def decorate(host_solver: Callable[..., Any]) -> ImplicitFunction:
        @functools.wraps(host_solver)
        def solver(*args: Any, **opts: Any) -> Any:
            return host_solver(*to_host(args), **opts)

        return custom_root(F, solve=solve, tags=tags, has_aux=has_aux,
                           residual_tol=residual_tol, on_failure=on_failure,
                           result_shape=result_shape)(solver)

    return decorate
