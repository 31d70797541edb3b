"""`root`, `least_squares`, `fixed_point`, `root_scalar`: SciPy's solvers with a differentiable
solution, and `wrap_solver` for any other host solver."""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.optimize

from .. import _tree
from .. import conditions as cond
from .._errors import StructureError
from .._linear_solve import AbstractLinearSolver, Auto
from .._root import Derivatives, ImplicitFunction, custom_root
from ._host import default_residual_tol, framework_name, get_framework
from ._minimize import _first_tensor
from ._run import Plan, as_args, check_args, check_on_failure, run, spec_of


def _getter(res: Any, k: str) -> Any:
    if isinstance(res, dict):
        return res.get(k, -1)
    return getattr(res, k, -1)


def _setup(who: str, f: Callable[..., Any], x0: Any, args: tuple, *extra: Any
           ) -> tuple[Any, tuple]:
    """The framework of the call, and `args` with NumPy arrays converted to it."""
    check_args(who, "fun", f, 1, args)
    name = framework_name(x0, args, *extra)
    like = x0 if name == "torch" and hasattr(x0, "detach") else _first_tensor(args)
    fw = get_framework(name, like)
    return fw, fw.from_host(args)


def _as_like(f: Callable[..., Any]) -> Callable[..., Any]:
    """`f` with a Python-number output turned into an array of x's namespace and dtype."""
    def g(x: Any, *a: Any) -> Any:
        out = f(x, *a)
        if hasattr(out, "dtype"):
            return out
        import array_api_compat

        return array_api_compat.array_namespace(x).asarray(out, dtype=x.dtype)

    g.__name__ = getattr(f, "__name__", "fun")
    return g


# ---- root --------------------------------------------------------------------------------------

_ROOT_JAC = {"hybr", "lm"}


def root(fun: Callable[..., Any], x0: Any, args: Any = (), method: str = "hybr",
         jac: Any = None, tol: float | None = None, callback: Any = None,
         options: dict | None = None, *, residual_tol: float | None = None,
         on_failure: str = "raise", linear_solver: AbstractLinearSolver = Auto()
         ) -> scipy.optimize.OptimizeResult:
    """`scipy.optimize.root` whose result's `x` is differentiable in `args`.

    The condition is `fun` itself: $F(x, \\theta) = $ `fun(x, *args)`, so
    $\\partial x^* / \\partial\\theta = -(\\partial_x F)^{-1} \\partial_\\theta F$. With
    JAX/PyTorch inputs and no `jac`, methods `hybr` and `lm` get the exact Jacobian from
    `jax.jacfwd` / `torch.func.jacfwd`. With NumPy inputs a given `jac` also serves the
    derivative (NumPy reference). Extras as in `minimize`.

    **Returns:** SciPy's `OptimizeResult`, `x` differentiable (under JAX tracing: `x`,
    `success`, `status`, `nfev`).
    """
    check_on_failure(on_failure)
    args = as_args(args)
    fw, args = _setup("root", fun, x0, args)
    x0f = fw.array(x0).reshape((-1,))
    meth = method.lower() if isinstance(method, str) else None
    if residual_tol is None:
        residual_tol = default_residual_tol(fw.float_dtype_eps(x0f))

    def F(x: Any, *a: Any) -> Any:
        return fun(x, *a)[0] if jac is True else fun(x, *a)

    F.__name__ = getattr(fun, "__name__", "fun")
    derivs = None
    if fw.name == "numpy" and callable(jac):
        derivs = Derivatives(jvp_x=lambda v, x, *a: np.asarray(jac(x, *a)) @ v,
                             vjp_x=lambda u, x, *a: np.asarray(jac(x, *a)).T @ u)

    def host_solve(x0_h: Any, *a: Any) -> tuple[Any, Any, bool, str]:
        kw: dict[str, Any] = {"method": method, "tol": tol, "callback": callback,
                              "options": options}
        if fw.name == "numpy":
            res = scipy.optimize.root(fun, np.asarray(x0_h, dtype=np.float64).reshape(-1),
                                      args=a, jac=jac, **kw)
        else:
            a_fw = fw.from_host(a)
            if jac is None and meth in _ROOT_JAC:
                kw["jac"] = fw.jacobian(F, a_fw)
            elif jac is True:
                host = fw.host(fun, a_fw)
                kw["jac"] = True
                res = scipy.optimize.root(lambda x: tuple(np.asarray(v) for v in host(x)),
                                          np.asarray(x0_h, dtype=np.float64).reshape(-1),
                                          **kw)
                return res.x, res, bool(res.success), str(res.message)
            elif jac is not None:
                kw["jac"] = fw.host(jac, a_fw) if callable(jac) else jac
            res = scipy.optimize.root(fw.host(F, a_fw),
                                      np.asarray(x0_h, dtype=np.float64).reshape(-1), **kw)
        return res.x, res, bool(res.success), str(res.message)

    aux = {"success": np.bool_, "status": np.int32, "nfev": np.int32}
    plan = Plan("root", F, frozenset(), host_solve, args, x0f, spec_of(fw, x0f), aux, _getter)
    x, aux_v, holder = run(fw, plan, residual_tol=residual_tol, on_failure=on_failure,
                           linear_solver=linear_solver, derivatives=derivs)
    return _result(holder, x, aux_v)


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
                  on_failure: str = "raise", linear_solver: AbstractLinearSolver = Auto(),
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
    check_on_failure(on_failure)
    if options.get("loss", "linear") != "linear":
        raise StructureError(
            f"least_squares: expected loss='linear', got loss={options['loss']!r}. Robust "
            "losses are not supported by the drop-in; minimize the robust objective with "
            "implicitdiff.scipy.minimize instead."
        )
    args = as_args(args)
    kwargs = dict(kwargs or {})
    fw, args = _setup("least_squares", fun, x0, args)
    x0f = fw.array(x0).reshape((-1,))
    n = int(x0f.shape[0])
    if residual_tol is None:
        residual_tol = default_residual_tol(fw.float_dtype_eps(x0f))

    def r(x: Any, *a: Any) -> Any:
        return fun(x, *a, **kwargs)

    r.__name__ = getattr(fun, "__name__", "fun")
    lb = np.broadcast_to(np.asarray(bounds[0], dtype=np.float64), (n,))
    ub = np.broadcast_to(np.asarray(bounds[1], dtype=np.float64), (n,))
    boxed = bool(np.isfinite(lb).any() or np.isfinite(ub).any())
    user_jac = jac if (callable(jac) and fw.name == "numpy") else None
    if not boxed:
        if user_jac is not None:
            Fl = cond.least_squares(r, jac=lambda x, *a: user_jac(x, *a, **kwargs))
        else:
            Fl = cond.least_squares(r)
        F: Callable[..., Any] = Fl
        tags = Fl.tags
    else:
        lb_f, ub_f = fw.array(lb, like=x0f), fw.array(ub, like=x0f)

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

        F_box.__name__ = f"projected_gradient(½‖{r.__name__}‖², box)"
        F = F_box
        tags = frozenset()

    def host_solve(x0_h: Any, *a: Any) -> tuple[Any, Any, bool, str]:
        x0n = np.asarray(x0_h, dtype=np.float64).reshape(-1)
        if fw.name == "numpy":
            res = scipy.optimize.least_squares(fun, x0n, jac=jac,  # pyright: ignore[reportArgumentType]
                                               bounds=bounds, method=method, args=a,
                                               kwargs=kwargs, **options)
        else:
            a_fw = fw.from_host(a)
            if isinstance(jac, str):
                jac_s: Any = fw.jacobian(r, a_fw) if jac in ("2-point", "3-point", "cs") \
                    else jac
            else:
                jac_s = fw.host(lambda x, *aa: jac(x, *aa, **kwargs), a_fw)
            res = scipy.optimize.least_squares(fw.host(r, a_fw), x0n, jac=jac_s, bounds=bounds,
                                               method=method, **options)
        return res.x, res, bool(res.success), str(res.message)

    aux = {"cost": np.float64, "success": np.bool_, "status": np.int32, "nfev": np.int32,
           "optimality": np.float64}
    plan = Plan("least_squares", F, frozenset(tags), host_solve, args, x0f, spec_of(fw, x0f),
                aux, _getter)
    x, aux_v, holder = run(fw, plan, residual_tol=residual_tol, on_failure=on_failure,
                           linear_solver=linear_solver)
    return _result(holder, x, aux_v)


# ---- fixed_point -------------------------------------------------------------------------------

def fixed_point(func: Callable[..., Any], x0: Any, args: Any = (), xtol: float = 1e-8,
                maxiter: int = 500, method: str = "del2", *,
                residual_tol: float | None = None, on_failure: str = "raise",
                linear_solver: AbstractLinearSolver = Auto()) -> Any:
    """`scipy.optimize.fixed_point` whose result is differentiable in `args`.

    The condition is $T(x, \\theta) - x = 0$ with $T$ = `func` (`conditions.fixed_point`), so
    $\\partial x^*/\\partial\\theta = (I - \\partial_x T)^{-1}\\partial_\\theta T$. SciPy's
    `RuntimeError` ("Failed to converge after ...") becomes `NonConvergenceError` carrying its
    message (or a warning, or NaN, by `on_failure`).

    **Returns:** the fixed point, an array of x0's shape, in the framework of the inputs.
    """
    check_on_failure(on_failure)
    args = as_args(args)
    fw, args = _setup("fixed_point", func, x0, args)
    x0f = fw.array(x0)
    if residual_tol is None:
        residual_tol = default_residual_tol(fw.float_dtype_eps(x0f))
    T = _as_like(func)
    F = cond.fixed_point(T)

    def host_solve(x0_h: Any, *a: Any) -> tuple[Any, Any, bool, str]:
        x0n = np.asarray(x0_h, dtype=np.float64)
        h = func if fw.name == "numpy" else fw.host(T, fw.from_host(a))
        sargs = a if fw.name == "numpy" else ()
        try:
            x = scipy.optimize.fixed_point(h, x0n, args=sargs, xtol=xtol, maxiter=maxiter,
                                           method=method)
        except RuntimeError as e:
            return x0n, None, False, str(e)
        return np.asarray(x), None, True, ""

    plan = Plan("fixed_point", F, F.tags, host_solve, args, x0f, spec_of(fw, x0f), {},
                _getter)
    x, _, _ = run(fw, plan, residual_tol=residual_tol, on_failure=on_failure,
                  linear_solver=linear_solver)
    return x


# ---- root_scalar -------------------------------------------------------------------------------

def root_scalar(f: Callable[..., Any], args: Any = (), method: str | None = None,
                bracket: Any = None, fprime: Any = None, fprime2: Any = None, x0: Any = None,
                x1: Any = None, xtol: float | None = None, rtol: float | None = None,
                maxiter: int | None = None, options: dict | None = None, *,
                residual_tol: float | None = None, on_failure: str = "raise",
                linear_solver: AbstractLinearSolver = Auto()) -> Any:
    """`scipy.optimize.root_scalar` whose `root` is differentiable in `args`:
    $\\partial x^*/\\partial\\theta = -\\partial_\\theta f / f'(x^*)$.

    With JAX/PyTorch inputs, `newton` (and the default choice when `x0` is given without a
    bracket) gets `fprime` from autodiff, `halley` also `fprime2`; SciPy then picks Newton where
    it would have picked the secant method.

    **Returns:** SciPy's `RootResults` with `root` a 0-d array of the framework, differentiable
    (under JAX tracing: `root`, `converged`, `iterations`, `function_calls`).
    """
    check_on_failure(on_failure)
    args = as_args(args)
    fw, args = _setup("root_scalar", f, x0 if x0 is not None else 0.0, args, bracket)
    guess = x0 if x0 is not None else (bracket[0] if bracket is not None else 0.0)
    x0f = fw.array(guess).reshape(())
    if residual_tol is None:
        residual_tol = default_residual_tol(fw.float_dtype_eps(x0f))
    F = _as_like(lambda x, *a: f(x, *a)[0] if fprime is True else f(x, *a))
    F.__name__ = getattr(f, "__name__", "f")
    F_root = F
    x_root = x0f
    if fw.name == "torch":
        # the torch backend's backward does not take a 0-d x yet: solve for shape (1,)
        def F_root(x: Any, *a: Any) -> Any:
            return F(x.reshape(()), *a).reshape((1,))

        F_root.__name__ = F.__name__
        x_root = x0f.reshape((1,))
    meth = method.lower() if isinstance(method, str) else None
    newtonish = meth in ("newton", "halley") or (meth is None and x0 is not None and
                                                  bracket is None)

    def host_solve(x0_h: Any, *a: Any) -> tuple[Any, Any, bool, str]:
        kw: dict[str, Any] = {"method": method, "bracket": _floats(bracket), "x1": x1,
                              "xtol": xtol, "rtol": rtol, "maxiter": maxiter,
                              "options": options}
        if x0 is not None:
            kw["x0"] = float(np.asarray(x0_h).reshape(()))
        if fw.name == "numpy":
            kw.update(fprime=fprime, fprime2=fprime2)
            res = scipy.optimize.root_scalar(f, args=a, **kw)
        else:
            a_fw = fw.from_host(a)
            if fprime is None and newtonish:
                kw["fprime"] = fw.derivative(F, a_fw, 1)
                if meth == "halley" and fprime2 is None:
                    kw["fprime2"] = fw.derivative(F, a_fw, 2)
            elif callable(fprime):
                kw["fprime"] = fw.host(fprime, a_fw, scalar=True)
            if callable(fprime2):
                kw["fprime2"] = fw.host(fprime2, a_fw, scalar=True)
            res = scipy.optimize.root_scalar(fw.host(F, a_fw, scalar=True), **kw)
        return np.asarray(res.root), res, bool(res.converged), str(res.flag)

    aux = {"converged": np.bool_, "iterations": np.int32, "function_calls": np.int32}
    plan = Plan("root_scalar", F_root, frozenset(), host_solve, args, x_root,
                spec_of(fw, x_root), aux, _getter)
    x, aux_v, holder = run(fw, plan, residual_tol=residual_tol, on_failure=on_failure,
                           linear_solver=linear_solver)
    x = x.reshape(())
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


def _floats(bracket: Any) -> Any:
    if bracket is None:
        return None
    return [float(np.asarray(b.detach().cpu() if hasattr(b, "detach") else b))
            for b in bracket]


# ---- any host solver ---------------------------------------------------------------------------

def to_host(tree: Any) -> Any:
    """A pytree of framework arrays as NumPy arrays (torch detached; a JAX tracer raises the
    error that sends the core to `jax.pure_callback`)."""
    jax = sys.modules.get("jax")

    def conv(a: Any) -> Any:
        if jax is not None and isinstance(a, jax.core.Tracer):
            raise jax.errors.TracerArrayConversionError(a)
        if hasattr(a, "detach"):
            return a.detach().cpu().numpy()
        return np.asarray(a) if hasattr(a, "dtype") else a

    if jax is not None:
        return jax.tree_util.tree_map(conv, tree)
    return _tree.tree_map(conv, tree)


def wrap_solver(F: Callable[..., Any], *, result_shape: Any = None, tags: Any = None,
                has_aux: bool = False, residual_tol: float | None = None,
                on_failure: str = "raise", linear_solver: AbstractLinearSolver = Auto()
                ) -> Callable[[Callable[..., Any]], ImplicitFunction]:
    """Make any host solver (a C library, CVXPY, scikit-learn, OR-tools) differentiable.

    ```python
    @implicitdiff.scipy.wrap_solver(F, result_shape=jax.ShapeDtypeStruct((n,), jnp.float64))
    def solve(theta, data):          # receives NumPy arrays, returns a NumPy x*
        ...
    ```

    The same as `idf.custom_root` (all options mean the same; `linear_solver` is its `solve`),
    with the positional arguments converted to NumPy before the solver sees them: torch tensors
    detached, JAX arrays as host arrays (under `jit`/`vmap`/`grad` the solver runs through
    `jax.pure_callback`, which needs `result_shape`, or one earlier call with concrete arrays of
    the same shapes). `F` is written with the framework's ops (or array-API ops) and gives the
    derivative.

    **Returns:** a decorator turning `solver(*args, **options) -> x` into an `ImplicitFunction`.
    """
    check_on_failure(on_failure)

    def decorate(host_solver: Callable[..., Any]) -> ImplicitFunction:
        @functools.wraps(host_solver)
        def solver(*args: Any, **opts: Any) -> Any:
            return host_solver(*to_host(args), **opts)

        return custom_root(F, solve=linear_solver, tags=tags, has_aux=has_aux,
                           residual_tol=residual_tol, on_failure=on_failure,
                           result_shape=result_shape)(solver)

    return decorate
