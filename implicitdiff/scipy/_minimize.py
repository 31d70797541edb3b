"""`minimize`: `scipy.optimize.minimize` with a differentiable `.x`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np
import scipy.optimize

from .. import conditions as cond
from .._backend import Backend
from .._errors import StructureError
from .._linear_solve import AbstractLinearSolver
from .._root import solve_argument
from ..backend import resolve_on_failure
from ._host import Derived, backend_of_call, host_grad, host_jac, residual_tol_of, value_of
from ._run import (
    INVALID,
    OK,
    SCIPY_FAILED,
    ArraySpec,
    Plan,
    as_args,
    check_args,
    describe_blocks,
    run,
    spec_of,
)

_JAC = {"cg", "bfgs", "newton-cg", "l-bfgs-b", "tnc", "slsqp", "dogleg", "trust-ncg",
        "trust-krylov", "trust-exact", "trust-constr"}
_HESS = {"dogleg", "trust-exact"}
_HESSP = {"newton-cg", "trust-ncg", "trust-krylov", "trust-constr"}
_AUX = {"fun": np.float64, "success": np.bool_, "status": np.int32, "nit": np.int32,
        "nfev": np.int32}


def _field(res: Any, k: str) -> Any:
    v = res.get(k, -1) if hasattr(res, "get") else -1
    return np.nan if k == "fun" and v is None else v


def _bounds(bounds: Any, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`(lb, ub)` as float arrays of length n with ±inf, or None when there are no finite
    bounds."""
    if bounds is None:
        return None
    if isinstance(bounds, scipy.optimize.Bounds):
        lb = np.broadcast_to(np.asarray(bounds.lb, dtype=np.float64), (n,)).copy()
        ub = np.broadcast_to(np.asarray(bounds.ub, dtype=np.float64), (n,)).copy()
    else:
        pairs = list(bounds)
        if len(pairs) != n:
            raise StructureError(
                f"minimize: expected {n} (min, max) pairs in bounds, one per entry of x0, got "
                f"{len(pairs)}."
            )
        lb = np.array([-np.inf if p[0] is None else float(p[0]) for p in pairs])
        ub = np.array([np.inf if p[1] is None else float(p[1]) for p in pairs])
    if not (np.isfinite(lb).any() or np.isfinite(ub).any()):
        return None
    return lb, ub


def _constraints(constraints: Any) -> list[dict]:
    if isinstance(constraints, dict):
        constraints = [constraints]
    out = []
    for i, c in enumerate(constraints or ()):
        if not isinstance(c, dict) or c.get("type") not in ("eq", "ineq") or not callable(
                c.get("fun")):
            raise StructureError(
                f"minimize: constraint {i}: expected a dict {{'type': 'eq' | 'ineq', 'fun': "
                f"callable, 'jac': optional, 'args': optional}}, got {c!r}. Write "
                "LinearConstraint / NonlinearConstraint objects in the dict form (SciPy's "
                "'ineq' means fun(x) >= 0)."
            )
        out.append(c)
    return out


def minimize(fun: Callable[..., Any], x0: Any, args: Any = (), method: Any = None,
             jac: Any = None, hess: Any = None, hessp: Any = None, bounds: Any = None,
             constraints: Any = (), tol: float | None = None, callback: Any = None,
             options: dict | None = None, *, residual_tol: float | None = None,
             on_failure: str | None = None, solve: AbstractLinearSolver | None = None,
             linear_solver: AbstractLinearSolver | None = None
             ) -> scipy.optimize.OptimizeResult:
    """`scipy.optimize.minimize` whose result's `x` is differentiable in `args` (and in the
    constraints' `args`), in the framework of the inputs.

    The call and the returned `OptimizeResult` are SciPy's. The derivative of
    $x^*(\\theta)$, $\\theta$ = `args`, comes from an optimality condition at the solution, never
    from SciPy's iterations:

    - no constraints, no finite bounds: stationarity $\\nabla_x f(x^*, \\theta) = 0$;
    - finite bounds only: the projected-gradient fixed point
      $x - P_{[l, u]}(x - \\nabla_x f) = 0$, exact on the active set (a variable at a bound has
      derivative 0; the free ones get the reduced-Hessian formula);
    - `constraints` (dicts, SciPy's form; `'ineq'` means `fun(x) >= 0`): the KKT conditions,
      with finite bounds as extra inequalities. The multipliers are recovered at the solution by
      a non-negative least-squares fit of the Lagrangian's stationarity on the active set
      (SciPy's methods do not all return them).

    With JAX or PyTorch inputs and no `jac` (`hess`/`hessp` for the methods that use them),
    SciPy gets exact ones from `jax.grad`/`jax.hessian` or `torch.func`. With NumPy inputs
    SciPy's behaviour is unchanged; a given `jac` is then also used for the condition (write it
    complex-safe for an exact reference).

    **Arguments:** those of `scipy.optimize.minimize`; `fun(x, *args)` written with the
    framework's ops or array-API ops. Keyword-only extras:

    - `residual_tol`: the residual check $\\max|F(x^*, \\theta)| \\le$ `residual_tol`; default
      $\\max(10^{-4}, 10\\sqrt{\\epsilon})$ (SciPy's default tolerances are loose; pass `tol=`
      for accurate derivatives).
    - `on_failure`: `"raise"` (`NonConvergenceError`), `"warn"` or `"nan"`, for a residual
      above `residual_tol` (with SciPy's message when SciPy also reported failure; for the KKT
      conditions, naming the block that is off: stationarity, equality, inequality,
      complementarity), x outside the bounds, or a constraint violated at the returned x.
      Default `None`: `idf.config.on_failure`, read at the call. SciPy's `success=False` alone
      does not fail: at a residual within `residual_tol` (BFGS "precision loss" at a tight
      `tol`) x is accepted with a `RuntimeWarning` carrying SciPy's message.
    - `solve`: the linear solver of the derivative (default `idf.Auto()`), as in
      `idf.custom_root`. `linear_solver=` is its old name, deprecated (a `DeprecationWarning`;
      removed in the next release).

    **Returns:** SciPy's `OptimizeResult` with `x` differentiable. Under JAX tracing (`jit`,
    `vmap`, `grad`) it holds `x` and the array fields `fun`, `success`, `status`, `nit`,
    `nfev` only (`message` and the others are host objects).
    """
    on_failure = resolve_on_failure(on_failure, "minimize")
    solve = solve_argument("minimize", solve, linear_solver)
    args = as_args(args)
    cons = _constraints(constraints)
    con_args = tuple(as_args(c.get("args", ())) for c in cons)
    check_args("minimize", "fun", fun, 1, args)
    for i, (c, a) in enumerate(zip(cons, con_args)):
        check_args("minimize", f"constraints[{i}]['fun']", c["fun"], 1, a)
    bk, like = backend_of_call(x0, args, con_args)
    args, con_args = bk.from_host(args, like=like), bk.from_host(con_args, like=like)
    cons = [dict(c, args=a) for c, a in zip(cons, con_args)]
    x0f = bk.host_array(x0, like=like)
    if len(x0f.shape) > 1:
        raise StructureError(f"minimize: expected a 1-d x0, got shape {tuple(x0f.shape)}.")
    x0f = x0f.reshape((-1,))
    n = int(x0f.shape[0])
    if method is None:
        method = "SLSQP" if cons else ("L-BFGS-B" if bounds is not None else "BFGS")
    meth = method.lower() if isinstance(method, str) else None
    box = _bounds(bounds, n)
    if residual_tol is None:
        residual_tol = residual_tol_of(x0f)

    # the objective: `fun` itself, so host functions compiled for it are reused across calls
    f_obj: Callable[..., Any] = Derived(value_of, fun) if jac is True else fun
    user_grad: Callable[..., Any] | None = None
    if not bk.autodiff:  # the user's gradient serves the condition (the NumPy reference)
        if callable(jac):
            user_grad = jac
        elif jac is True:
            def grad_of_fun(x: Any, *a: Any) -> Any:
                return fun(x, *a)[1]

            user_grad = grad_of_fun

    eqs = [(c, a) for c, a in zip(cons, con_args) if c["type"] == "eq"]
    ineqs = [(c, a) for c, a in zip(cons, con_args) if c["type"] == "ineq"]

    # ---- the condition --------------------------------------------------------------------
    if not cons and box is None:
        Fs = cond.stationarity(f_obj, grad=user_grad)
        F, tags, thetas = Fs, Fs.tags, args
        x_spec: Any = spec_of(x0f)
    elif not cons:
        assert box is not None
        lb_f, ub_f = bk.host_array(box[0], like=x0f), bk.host_array(box[1], like=x0f)
        g_packed = None if user_grad is None else (lambda x, a: user_grad(x, *a))
        Fp = cond.projected_gradient(lambda x, a: f_obj(x, *a), cond.projection_box,
                                     grad=g_packed)

        def F(x: Any, *a: Any) -> Any:
            return Fp(x, a, (lb_f, ub_f))

        F.__name__ = f"projected_gradient({getattr(f_obj, '__name__', 'fun')}, box)"
        tags, thetas = frozenset(), args
        x_spec = spec_of(x0f)
    else:
        F, x_spec, m_eq, m_in = _kkt_condition(bk, like, f_obj, user_grad, eqs, ineqs, box,
                                               x0f)
        tags = F.tags
        thetas = (args, tuple(a for _, a in eqs), tuple(a for _, a in ineqs))

    # ---- the host solve -------------------------------------------------------------------
    def host_solve(x0_h: Any, *th: Any) -> tuple[Any, Any, str, str, dict | None]:
        a = th[0] if cons else th
        eq_a, in_a = (th[1], th[2]) if cons else ((), ())
        kw: dict[str, Any] = {"method": method, "tol": tol, "callback": callback,
                              "options": options}
        if bounds is not None:
            kw["bounds"] = bounds
        a_fw = bk.from_host(a, like=like)
        vg = None if jac is not None or meth not in _JAC else \
            bk.host_derivative(f_obj, a_fw, "value_and_grad", like=like)
        if jac is True:
            host = bk.host_function(fun, a_fw, like=like)

            def value_and_grad_host(x: Any) -> Any:
                v, g = host(x)
                return float(np.asarray(v)), np.asarray(g, dtype=np.float64)

            fun_s: Any = value_and_grad_host
            kw["jac"] = True
        elif vg is not None:  # exact gradient from the backend's autodiff
            fun_s = vg
            kw["jac"] = True
        else:
            fun_s = bk.host_function(fun, a_fw, like=like, scalar=True)
            kw["jac"] = bk.host_function(jac, a_fw, like=like) if callable(jac) else jac
        if hess is None and hessp is None:
            if meth in _HESS:
                kw["hess"] = bk.host_derivative(f_obj, a_fw, "hessian", like=like)
            elif meth in _HESSP:
                kw["hessp"] = bk.host_derivative(f_obj, a_fw, "hessp", like=like)
        else:
            kw["hess"] = bk.host_function(hess, a_fw, like=like) if callable(hess) else hess
            kw["hessp"] = (bk.host_function(hessp, a_fw, like=like) if callable(hessp)
                           else hessp)
        if cons:
            kw["constraints"] = [_host_constraint(bk, like, c, bk.from_host(ca, like=like),
                                                  meth)
                                 for (c, _), ca in zip(eqs + ineqs, (*eq_a, *in_a))]
        res = scipy.optimize.minimize(fun_s, np.asarray(x0_h, dtype=np.float64).reshape(-1),
                                      **kw)
        status, msg = (OK if res.success else SCIPY_FAILED), str(res.message)
        z = np.asarray(res.x, dtype=np.float64)
        if not cons:
            if box is not None and (np.any(z < box[0] - residual_tol) or
                                    np.any(z > box[1] + residual_tol)):
                status, msg = INVALID, (f"the returned x is outside the bounds (SciPy said: "
                                        f"{msg}; does the method enforce bounds?).")
            return z, res, status, msg, None
        nu, mu, blocks = _multipliers(bk, like, f_obj, user_grad, z, a, eqs, eq_a, ineqs, in_a,
                                      box, m_eq, m_in)
        feas = {k: v for k, v in blocks.items() if k in ("equality", "inequality")}
        worst = max(feas, key=lambda k: feas[k], default=None)
        if worst is not None and not feas[worst] <= residual_tol:
            status, msg = INVALID, (
                f"the returned x violates the constraints: "
                f"{describe_blocks(blocks, worst, residual_tol)}. SciPy said: {msg} (does the "
                "method support constraints?)")
        x = (z, *((nu,) if eqs else ()), *((mu,) if m_in else ()))
        return x, res, status, msg, blocks

    plan = Plan("minimize", F, frozenset(tags), host_solve, thetas, x0f, x_spec, _AUX, _field)
    x, aux, holder = run(bk, like, plan, residual_tol=residual_tol, on_failure=on_failure,
                         solve=solve)
    z = x[0] if cons else x
    if holder.result is not None:
        res = scipy.optimize.OptimizeResult(holder.result)
        res["x"] = z
    else:
        res = scipy.optimize.OptimizeResult(x=z, **aux)
    if cons:
        res["kkt_multipliers"] = tuple(x[1:])
    return res


def _host_constraint(bk: Backend, like: Any, c: dict, ca: tuple, meth: str | None) -> dict:
    out = {"type": c["type"], "fun": bk.host_function(c["fun"], ca, like=like)}
    if callable(c.get("jac")):
        out["jac"] = bk.host_function(c["jac"], ca, like=like)
    elif meth in _JAC:
        jac = bk.host_derivative(c["fun"], ca, "jacobian", like=like)
        if jac is not None:
            out["jac"] = jac
    return out


def _count(c: dict, x0f: Any, ca: tuple) -> int:
    """The number of constraint values (under tracing, from the traced output's shape)."""
    out = c["fun"](x0f, *ca)
    shape = getattr(out, "shape", None)
    return int(np.prod(shape)) if shape is not None else int(np.size(out))


def _kkt_condition(bk: Backend, like: Any, f_obj: Callable[..., Any],
                   user_grad: Callable[..., Any] | None, eqs: list, ineqs: list,
                   box: tuple | None, x0f: Any) -> tuple[Any, Any, int, int]:
    """The KKT condition for SciPy's constraint dicts (and finite bounds), `x = (z, nu, mu)`."""
    m_eq = sum(_count(c, x0f, a) for c, a in eqs)
    m_in = sum(_count(c, x0f, a) for c, a in ineqs)
    if box is not None:
        lo_i = np.flatnonzero(np.isfinite(box[0]))
        hi_i = np.flatnonzero(np.isfinite(box[1]))
        m_in += lo_i.size + hi_i.size
        lb_f = bk.host_array(box[0][lo_i], like=x0f)
        ub_f = bk.host_array(box[1][hi_i], like=x0f)
        lo_idx = bk.from_host(lo_i.astype(np.int64), like=like)
        hi_idx = bk.from_host(hi_i.astype(np.int64), like=like)

    def flat(zz: Any, v: Any) -> Any:
        ns = array_api_compat.array_namespace(zz)
        return ns.reshape(ns.asarray(v) if not hasattr(v, "dtype") else v, (-1,))

    def eq_fn(z: Any, eq_a: tuple) -> Any:
        ns = array_api_compat.array_namespace(z)
        return ns.concat([flat(z, c["fun"](z, *a)) for (c, _), a in zip(eqs, eq_a)])

    def in_fn(z: Any, in_a: tuple) -> Any:
        ns = array_api_compat.array_namespace(z)
        parts = [-flat(z, c["fun"](z, *a)) for (c, _), a in zip(ineqs, in_a)]
        if box is not None:
            parts += [lb_f - ns.take(z, lo_idx), ns.take(z, hi_idx) - ub_f]
        return ns.concat(parts)

    g_packed = None if user_grad is None else (lambda z, a: user_grad(z, *a))
    K = cond.kkt(lambda z, a: f_obj(z, *a), eq=eq_fn if eqs else None,
                 ineq=in_fn if m_in else None, grad=g_packed)

    def F(x: Any, a: tuple, eq_a: tuple, in_a: tuple) -> Any:
        return K(x, a, eq_a if eqs else None, in_a if m_in else None)

    F.__name__ = K.__name__
    F.tags = K.tags  # type: ignore[attr-defined]
    F.blocks = K.blocks  # type: ignore[attr-defined]
    z_spec = spec_of(x0f)

    x_spec = (z_spec, *((ArraySpec((m_eq,), z_spec.dtype),) if eqs else ()),
              *((ArraySpec((m_in,), z_spec.dtype),) if m_in else ()))
    return F, x_spec, m_eq, m_in


def _multipliers(bk: Backend, like: Any, f_obj: Callable[..., Any], user_grad: Any,
                 z: np.ndarray,
                 a: tuple, eqs: list, eq_a: tuple, ineqs: list, in_a: tuple,
                 box: tuple | None, m_eq: int, m_in: int) -> tuple[Any, Any, dict]:
    """Multipliers $(\\nu, \\mu \\ge 0)$ at the solution $z$ from the Lagrangian's stationarity
    $\\nabla f + J_h^\\top \\nu + J_g^\\top \\mu = 0$, by bounded least squares on the active
    inequalities ($g_i \\ge -10^{-7}$; the others get $\\mu_i = 0$). Also the KKT residual by
    block, `{name: max|block|}`: `stationarity` $\\nabla f + J_h^\\top\\nu + J_g^\\top\\mu$,
    `equality` $h$, `inequality` $g^+$ (primal feasibility; not a block of the condition
    `conditions.kkt`, which assumes it), `complementarity` $\\mu \\odot g$."""
    a_fw = bk.from_host(a, like=like)
    grad = host_grad(bk, f_obj, z, a_fw, like, user=user_grad)
    rows_h, vals_h, rows_g, vals_g = [], [], [], []
    for (c, _), ca in zip(eqs, eq_a):
        ca_fw = bk.from_host(ca, like=like)
        vals_h.append(np.ravel(bk.host_function(c["fun"], ca_fw, like=like)(z)))
        rows_h.append(host_jac(bk, c["fun"], z, ca_fw, like, user=c.get("jac")))
    for (c, _), ca in zip(ineqs, in_a):
        ca_fw = bk.from_host(ca, like=like)
        vals_g.append(-np.ravel(bk.host_function(c["fun"], ca_fw, like=like)(z)))
        rows_g.append(-host_jac(bk, c["fun"], z, ca_fw, like, user=c.get("jac")))
    n = z.size
    if box is not None:
        eye = np.eye(n)
        lo_i = np.flatnonzero(np.isfinite(box[0]))
        hi_i = np.flatnonzero(np.isfinite(box[1]))
        vals_g += [box[0][lo_i] - z[lo_i], z[hi_i] - box[1][hi_i]]
        rows_g += [-eye[lo_i], eye[hi_i]]
    h = np.concatenate(vals_h) if vals_h else np.zeros(0)
    g = np.concatenate(vals_g) if vals_g else np.zeros(0)
    Jh = np.concatenate(rows_h).reshape(-1, n) if rows_h else np.zeros((0, n))
    Jg = np.concatenate(rows_g).reshape(-1, n) if rows_g else np.zeros((0, n))
    active = np.flatnonzero(g >= -1e-7)
    M = np.concatenate([Jh, Jg[active]]).T  # (n, m_eq + n_active)
    nu, mu = np.zeros(m_eq), np.zeros(m_in)
    if M.shape[1]:
        lo = np.concatenate([np.full(m_eq, -np.inf), np.zeros(active.size)])
        hi = np.full(M.shape[1], np.inf)
        if np.all(np.isinf(lo)):
            sol = np.linalg.lstsq(M, -grad, rcond=None)[0]
        else:
            sol = scipy.optimize.lsq_linear(M, -grad, bounds=(lo, hi), method="bvls",
                                            tol=1e-14).x
        nu = sol[:m_eq]
        mu[active] = sol[m_eq:]
    blocks = {"stationarity": _maxabs(grad + Jh.T @ nu + Jg.T @ mu)}
    if m_eq:
        blocks["equality"] = _maxabs(h)
    if m_in:
        blocks["inequality"] = _maxabs(np.maximum(g, 0.0))
        blocks["complementarity"] = _maxabs(mu * g)
    return nu, mu, blocks


def _maxabs(a: np.ndarray) -> float:
    """$\\max|a|$, NaN when `a` is not finite (so a check against it fails)."""
    a = np.abs(np.asarray(a, dtype=np.float64))
    return float(np.max(a, initial=0.0)) if np.all(np.isfinite(a)) else float("nan")
