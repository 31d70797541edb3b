"""`idf.cvxpy.Layer`: a CVXPY problem as a differentiable layer (NumPy, PyTorch, JAX).

The problem is canonicalized once, at construction, by CVXPY itself
(`problem.get_problem_data(solver)`, which requires DPP): the result is a cone program

$$\\min_x \\tfrac12 x^\\top P x + c^\\top x \\quad\\text{s.t.}\\quad A x + s = b,\\ s \\in K$$

whose data $(A, b, c, P)$ are affine in the parameters. From CVXPY's parameter-to-data tensors
the layer builds, once, a gather plan; at each call it forms the data with a few gathers in the
framework of the parameters (so the framework differentiates that step itself), solves with
CVXPY's interface to the chosen conic solver (Clarabel by default, SCS, ECOS) on the host,
polishes the answer with semismooth Newton steps on the optimality condition (so the derivative
is exact to rounding, not to the solver's tolerance), and differentiates the solution through
`idf.conditions.cone_program` by the implicit function theorem (`idf.custom_root`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from .._array import ArraySpec
from .._backend import get_backend, is_host_array
from .._config import resolve_on_failure
from .._errors import ImplicitDiffError, NonConvergenceError, StructureError
from .._linear_solve import AbstractLinearSolver, Auto
from .._root import ImplicitFunction, custom_root
from ..conditions._cone import Cones, cone_program, newton_refine

__all__ = ["Layer", "UnsupportedConeError"]


class UnsupportedConeError(StructureError, NotImplementedError):
    """The problem needs a cone the layer cannot differentiate (exponential or power cones), or
    a construct it does not support (variables with `diag`/`sparsity` attributes, parameters
    with `symmetric`/`diag`/`sparsity` attributes, variable bounds passed to the solver)."""


_SOLVERS = ("CLARABEL", "SCS", "ECOS")
_FAILED = ("infeasible", "unbounded", "infeasible_inaccurate", "unbounded_inaccurate",
           "infeasible_or_unbounded")


@dataclass(frozen=True)
class _Affine:
    """A linear map $\\theta_{aug} \\mapsto$ an array of `shape` (C order), from CVXPY's
    tensor: `value = take(concat(vals, 0), index)` with `vals = sum(V * theta[J], -1)` (one
    row of `J`, `V` per data entry that depends on anything), and `L` the same map as a SciPy
    sparse matrix (for the NumPy chain rule)."""

    shape: tuple
    J: np.ndarray
    V: np.ndarray
    index: np.ndarray
    L: Any
    rows: np.ndarray  # C-order flat positions that may be nonzero (the sparsity pattern)

    @staticmethod
    def build(pos: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple,
              ncols: int) -> _Affine:
        import scipy.sparse as sp

        size = int(np.prod(shape))
        keep = vals != 0
        pos, cols, vals = pos[keep], cols[keep], vals[keep]
        order = np.lexsort((cols, pos))
        pos, cols, vals = pos[order], cols[order], vals[order]
        upos, start, counts = np.unique(pos, return_index=True, return_counts=True)
        k = int(counts.max()) if counts.size else 1
        J = np.zeros((upos.size, k), dtype=np.int64)
        V = np.zeros((upos.size, k))
        slot = np.arange(pos.size) - np.repeat(start, counts)
        row = np.repeat(np.arange(upos.size), counts)
        J[row, slot] = cols
        V[row, slot] = vals
        index = np.full(size, upos.size, dtype=np.int64)
        index[upos] = np.arange(upos.size)
        L = sp.csr_array((vals, (pos, cols)), shape=(size, ncols))
        return _Affine(tuple(shape), J, V, index, L, upos)

    def apply(self, xp: Any, theta: Any) -> Any:
        dev = array_api_compat.device(theta)
        batch = theta.shape[:-1]
        if self.J.shape[0] == 0:
            return xp.zeros((*batch, *self.shape), dtype=theta.dtype, device=dev)
        J = xp.asarray(self.J.reshape(-1), device=dev)
        V = xp.asarray(self.V, dtype=theta.dtype, device=dev)
        g = xp.reshape(xp.take(theta, J, axis=theta.ndim - 1), (*batch, *self.J.shape))
        vals = xp.sum(g * V, axis=-1)
        vals = xp.concat([vals, xp.zeros((*batch, 1), dtype=theta.dtype, device=dev)], axis=-1)
        out = xp.take(vals, xp.asarray(self.index, device=dev), axis=vals.ndim - 1)
        return xp.reshape(out, (*batch, *self.shape))


def _pick(a: Any, nd: int, k: int | None) -> Any:
    """Sample `k` of a host array with `nd` dimensions per sample (shared ones as they are)."""
    if a is None or k is None or a.ndim == nd:
        return a
    return a[k]


def _split_positions(T: Any, nrows_flat: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    coo = T.tocoo()
    return (np.asarray(coo.row, dtype=np.int64), np.asarray(coo.col, dtype=np.int64),
            np.asarray(coo.data, dtype=np.float64))


class Layer:
    """A CVXPY problem as a differentiable layer: `layer(*param_values)` returns the tuple of
    the `variables`' values at the solution, differentiable in the parameter values, in the
    framework of those values (NumPy, PyTorch, JAX). cvxpylayers' call convention.

    ```python
    import cvxpy as cp, torch
    import implicitdiff.cvxpy as icp

    x = cp.Variable(n); q = cp.Parameter(n); G = cp.Parameter((m, n)); h = cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [G @ x <= h])
    layer = icp.Layer(prob, parameters=[q, G, h], variables=[x])
    (x_star,) = layer(q_t, G_t, h_t)     # torch tensors in: a torch tensor out
    x_star.sum().backward()
    ```

    **Arguments:**

    - `problem`: a `cvxpy.Problem` satisfying DPP (`problem.is_dpp()`).
    - `parameters`: every `cvxpy.Parameter` of the problem, in the order of the call's
      arguments.
    - `variables`: the `cvxpy.Variable`s whose values the call returns, in order.
    - `solver`: (keyword) `"CLARABEL"` (default), `"SCS"` or `"ECOS"` (ECOS: no PSD cones);
      CVXPY's own interface to it is used.
    - `solver_args`: (keyword) options for the solver (as `problem.solve(**solver_args)`
      would pass them). By default the solver runs at tight tolerances (Clarabel: `1e-10`).
    - `refine`: (keyword) polish each solution with semismooth Newton steps on the optimality
      condition, to rounding level (default True; dense, skipped above `refine_max` unknowns).
    - `solve`: (keyword) the backward linear solver (default `idf.Auto()`).
    - `on_failure`: (keyword) what an infeasible, unbounded or inaccurately solved sample does:
      `"raise"` (names the sample), `"warn"`, `"nan"` (only that sample becomes NaN); None:
      `idf.config.on_failure`.
    - `residual_tol`: (keyword) the forward residual check of `idf.custom_root` (default: the
      relative check).

    **Calling:** `layer(*values)` with one value per parameter, shaped like the parameter, or
    with one leading batch dimension (the same size for every batched value; unbatched values
    are shared). Each sample is solved on its own. Returns a tuple with one array per variable
    (with the batch dimension when any value had it). On NumPy, where there is no autodiff,
    `layer.vjp(*values)` and `layer.jvp(values, tangents)` give the derivatives.
    """

    def __init__(self, problem: Any, parameters: Any, variables: Any, *,
                 solver: str = "CLARABEL", solver_args: dict | None = None,
                 refine: bool = True, refine_max: int = 3000,
                 solve: AbstractLinearSolver = Auto(), on_failure: str | None = None,
                 residual_tol: float | None = None):
        import cvxpy as cp

        if not isinstance(problem, cp.Problem):  # pyright: ignore[reportAttributeAccessIssue]
            raise TypeError(f"Layer: expected problem to be a cvxpy.Problem, got "
                            f"{type(problem).__name__}.")
        parameters, variables = list(parameters), list(variables)
        self._check_leaves(problem, parameters, variables)
        if not problem.is_dpp():
            raise StructureError(
                "Layer: the problem is not DPP (disciplined parametrized programming), so CVXPY "
                "cannot canonicalize it once for all parameter values. Expected "
                "problem.is_dpp() to be True. Rewrite it so parameters enter affinely (e.g. "
                "replace a product of two parameters by one parameter, or move a parameter out "
                "of a nonlinear atom); see CVXPY's DPP documentation.")
        name = str(solver).upper()
        if name not in _SOLVERS:
            raise ValueError(f"Layer: expected solver to be one of {_SOLVERS}, got {solver!r}.")
        if name not in cp.installed_solvers():  # pyright: ignore[reportAttributeAccessIssue]
            raise ImportError(f"Layer: the solver {name} is not installed. Install it "
                              f"(pip install {name.lower()}) or pass another solver=.")
        resolve_on_failure(on_failure, "Layer: on_failure") if on_failure is not None else None
        self.problem, self.parameters, self.variables = problem, parameters, variables
        self.solver_name = name
        self.refine, self.refine_max = bool(refine), int(refine_max)
        opts = {"CLARABEL": dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10,
                                 tol_ktratio=1e-8, max_iter=500),
                "SCS": dict(eps_abs=1e-10, eps_rel=1e-10, max_iters=100000),
                "ECOS": dict(abstol=1e-10, reltol=1e-10, feastol=1e-10)}[name]
        opts.update(solver_args or {})
        self.solver_args = opts

        from cvxpy.error import SolverError

        try:
            data, chain, inverse = problem.get_problem_data(
                solver=name, solver_opts={"use_quad_obj": True} if name != "ECOS" else None)
        except SolverError as e:
            raise UnsupportedConeError(
                f"Layer: CVXPY cannot pass this problem to {name}: {e} The layer supports "
                "the zero cone, the non-negative orthant, second-order cones and PSD cones "
                "(ECOS: no PSD cones); pick another solver= or reformulate.") from e
        import cvxpy.settings as s

        pp = data[s.PARAM_PROB]
        self._solver: Any = getattr(chain, "solver", None)
        self._check_cones(pp.cone_dims, name)
        if getattr(pp, "lb_tensor", None) is not None or getattr(pp, "ub_tensor", None) is not None:
            raise UnsupportedConeError(
                "Layer: the problem passes variable bounds to the solver, which the layer "
                "does not differentiate. Write the bounds as constraints (x >= l) instead of "
                "the bounds= attribute.")
        self.cones = Cones.from_cvxpy(pp.cone_dims,
                                      psd_triangle="lower" if name == "SCS" else "upper")
        self._dims = pp.cone_dims
        self.condition = cone_program(self.cones)
        n, m = int(pp.x.size), int(self.cones.size)
        self.n, self.m = n, m
        self._ntheta = int(pp.total_param_size) + 1
        if m == 0 and name == "SCS":
            raise StructureError(
                "Layer: the problem has no constraints in CVXPY's conic form, which SCS does "
                "not accept (it needs m > 0). Use solver='CLARABEL' (the default).")

        # parameters: where each sits in the parameter vector (CVXPY's column-major vec)
        self._param_cols = []
        for p in parameters:
            if p.id not in pp.param_id_to_col:
                raise UnsupportedConeError(
                    f"Layer: the parameter {p.name()} (shape {p.shape}) has an attribute "
                    f"({', '.join(k for k, v in p.attributes.items() if v)}) that CVXPY "
                    "replaces by a reduced parameter; declare a plain cp.Parameter instead.")
            self._param_cols.append(int(pp.param_id_to_col[p.id]))

        # the data maps: A (solver sign: A_s = -A_cvxpy), b, c, P
        T_A = pp.reduced_A.matrix_data
        r, col, val = _split_positions(T_A, m * (n + 1))
        i, j = r % m, r // m
        inA = j < n
        self._A = _Affine.build(i[inA] * n + j[inA], col[inA], -val[inA], (m, n), self._ntheta)
        self._b = _Affine.build(i[~inA], col[~inA], val[~inA], (m,), self._ntheta)
        r, col, val = _split_positions(pp.q, n + 1)
        inc = r < n
        self._c = _Affine.build(r[inc], col[inc], val[inc], (n,), self._ntheta)
        self._P: _Affine | None = None
        if pp.P is not None and name != "ECOS":
            r, col, val = _split_positions(pp.reduced_P.matrix_data, n * n)
            i, j = r % n, r // n
            self._P = _Affine.build(i * n + j, col, val, (n, n), self._ntheta)
            if self._P.J.shape[0] == 0:
                self._P = None

        # variables: a gather index into x per variable (C order of the variable's shape)
        self._var_index = [self._variable_index(v, pp, chain, inverse) for v in variables]

        self._on_failure = on_failure
        self._residual_tol = residual_tol
        self._linear_solve = solve
        self._fns: dict[int, ImplicitFunction] = {}
        self._holder: dict = {}

    # -- construction helpers -----------------------------------------------------------------
    @staticmethod
    def _check_leaves(problem: Any, parameters: list, variables: list) -> None:
        import cvxpy as cp

        for k, p in enumerate(parameters):
            if not isinstance(p, cp.Parameter):  # pyright: ignore[reportAttributeAccessIssue]
                raise TypeError(f"Layer: parameters[{k}] is a {type(p).__name__}, expected a "
                                "cvxpy.Parameter.")
        for k, v in enumerate(variables):
            if not isinstance(v, cp.Variable):  # pyright: ignore[reportAttributeAccessIssue]
                raise TypeError(f"Layer: variables[{k}] is a {type(v).__name__}, expected a "
                                "cvxpy.Variable.")
        in_prob = {p.id: p for p in problem.parameters()}
        ids = [p.id for p in parameters]
        if len(set(ids)) != len(ids):
            raise StructureError("Layer: a parameter is listed twice in parameters=. List each "
                                 "parameter of the problem once.")
        for k, p in enumerate(parameters):
            if p.id not in in_prob:
                raise StructureError(
                    f"Layer: parameters[{k}] ({p.name()}, shape {p.shape}) is not a parameter "
                    "of the problem. Pass the cp.Parameter objects the problem was built from.")
        missing = [p for pid, p in in_prob.items() if pid not in set(ids)]
        if missing:
            raise StructureError(
                "Layer: the problem's parameters "
                f"{', '.join(f'{p.name()} (shape {p.shape})' for p in missing)} are not in "
                "parameters=. List every parameter of the problem (its value comes from the "
                "call).")
        var_ids = {v.id for v in problem.variables()}
        for k, v in enumerate(variables):
            if v.id not in var_ids:
                raise StructureError(
                    f"Layer: variables[{k}] ({v.name()}, shape {v.shape}) is not a variable of "
                    "the problem. Pass cp.Variable objects that appear in the problem.")

    @staticmethod
    def _check_cones(dims: Any, name: str) -> None:
        for attr, what in (("exp", "exponential cone"), ("p3d", "3-d power cone"),
                           ("pnd", "n-d power cone")):
            v = getattr(dims, attr, 0)
            if (len(v) if isinstance(v, (list, tuple)) else int(v or 0)):
                raise UnsupportedConeError(
                    f"Layer: CVXPY's canonical form of the problem (for {name}) has the {what} "
                    "(from atoms such as exp, log, entr, log_sum_exp, power, geo_mean, ...), "
                    "which idf.cvxpy.Layer does not support yet: it differentiates the zero "
                    "cone, the non-negative orthant, second-order cones and PSD cones. "
                    "Reformulate without it, or use cvxpylayers for this problem.")

    def _variable_index(self, v: Any, pp: Any, chain: Any, inverse: Any) -> np.ndarray:
        from cvxpy.reductions.cvx_attr2constr import CvxAttr2Constr

        shape = tuple(v.shape)
        size = int(np.prod(shape)) if shape else 1
        sym = any(v.attributes.get(k) for k in ("symmetric", "PSD", "NSD"))
        target = v
        for red, inv in zip(chain.reductions, inverse):
            if isinstance(red, CvxAttr2Constr) and inv:
                id2new = inv[0]
                if v.id in id2new:
                    target = id2new[v.id]
        if target.id not in pp.var_id_to_col:
            raise StructureError(f"Layer: the variable {v.name()} has no column in CVXPY's "
                                 "canonical form (it was eliminated).")
        off = int(pp.var_id_to_col[target.id])
        if sym and len(shape) == 2:
            d = shape[0]
            iu = np.triu_indices(d)
            pos = np.full((d, d), -1, dtype=np.int64)
            pos[iu] = np.arange(iu[0].size)
            pos = np.where(pos >= 0, pos, pos.T)
            return off + pos.reshape(-1)
        if any(v.attributes.get(k) for k in ("diag", "sparsity")) or target.size != size:
            raise UnsupportedConeError(
                f"Layer: the variable {v.name()} has a diag or sparsity attribute, which the "
                "layer does not support. Declare a plain variable (and add constraints).")
        return off + np.arange(size).reshape(shape or (1,), order="F").reshape(-1)

    # -- the call -----------------------------------------------------------------------------
    @property
    def on_failure(self) -> str:
        """The effective `on_failure` (the layer's, or `idf.config.on_failure`)."""
        return resolve_on_failure(self._on_failure, "Layer: on_failure")

    def __call__(self, *values: Any) -> tuple:
        bk, xp, theta, batched = self._theta(values)
        A, b, c, P = self._data(xp, theta)
        x, _ = self._solve_data(bk, A, b, c, P, batched)
        return self._outputs(xp, x)

    def check_problem(self, *values: Any) -> tuple[ImplicitFunction, tuple]:
        """`(solver, args)` for `implicitdiff check`: the layer's decorated cone-program solver
        and its data $(A, b, c[, P])$ at the parameter `values` (NumPy, one sample), so the
        check compares the layer's derivatives across frameworks and with finite differences.
        The parameters-to-data map in front of it is affine, differentiated by the framework.

        ```python
        def make():            # in problems.py; then: implicitdiff check problems:make
            return layer.check_problem(q_value, G_value, h_value)
        ```
        """
        _, xp, theta, batched = self._theta(tuple(np.asarray(v, dtype=np.float64)
                                                  for v in values))
        if batched:
            raise StructureError("Layer.check_problem: expected the values of one sample, got a "
                                 "batch. Pass one sample's parameter values.")
        data = tuple(np.asarray(a) for a in self._data(xp, theta) if a is not None)
        return self._implicit(0), data

    def _theta(self, values: tuple) -> tuple[Any, Any, Any, bool]:
        if len(values) != len(self.parameters):
            raise StructureError(
                f"Layer: expected {len(self.parameters)} parameter values "
                f"({', '.join(p.name() for p in self.parameters)}), got {len(values)}.")
        arrays = [v for v in values if hasattr(v, "shape") and not is_host_array(v)]
        bk = get_backend(*(arrays or [np.asarray(v, dtype=float) for v in values]))
        vals = []
        like = arrays[0] if arrays else None
        for v in values:
            if not hasattr(v, "shape") or is_host_array(v):
                a = np.asarray(v, dtype=np.float64)
                v = bk.from_host(a, like=like) if like is not None else a
            vals.append(v)
        xp = bk.namespace(*vals)
        dtype = None
        for v in vals:
            if xp.isdtype(v.dtype, "real floating"):
                dtype = v.dtype if dtype is None else xp.result_type(dtype, v.dtype)
        dtype = dtype or xp.float64
        batch = None
        for p, v in zip(self.parameters, vals):
            shp = tuple(p.shape)
            vs = tuple(v.shape)
            if vs == shp:
                continue
            if len(vs) == len(shp) + 1 and vs[1:] == shp:
                if batch is not None and vs[0] != batch:
                    raise StructureError(
                        f"Layer: the value of parameter {p.name()} has batch size {vs[0]}, "
                        f"another value has {batch}. Give every batched value the same "
                        "leading dimension.")
                batch = vs[0]
                continue
            raise StructureError(
                f"Layer: the value of parameter {p.name()} has shape {vs}, expected {shp} "
                f"(or (batch, {', '.join(map(str, shp))}) for a batch). Pass a value of the "
                "parameter's shape.")
        B = () if batch is None else (batch,)
        dev = array_api_compat.device(vals[0])
        cols: list = [None] * len(vals)
        for k, (p, v, col) in enumerate(zip(self.parameters, vals, self._param_cols)):
            v = xp.astype(v, dtype)
            shp = tuple(p.shape)
            nd = len(shp)
            lead = v.ndim - nd
            if nd > 1:
                v = xp.permute_dims(v, (*range(lead), *range(v.ndim - 1, lead - 1, -1)))
            size = int(np.prod(shp)) if shp else 1
            v = xp.reshape(v, (*v.shape[:lead], size))
            if B and not lead:
                v = xp.broadcast_to(v, (*B, size))
            cols[k] = (col, v)
        cols.sort(key=lambda t: t[0])
        theta = xp.concat([v for _, v in cols] + [xp.ones((*B, 1), dtype=dtype, device=dev)],
                          axis=-1)
        return bk, xp, theta, bool(B)

    def _data(self, xp: Any, theta: Any) -> tuple:
        P = None if self._P is None else self._P.apply(xp, theta)
        return self._A.apply(xp, theta), self._b.apply(xp, theta), self._c.apply(xp, theta), P

    def _solve_data(self, bk: Any, A: Any, b: Any, c: Any, P: Any, batched: bool) -> tuple:
        fn = self._implicit(1 if batched else 0)
        args = (A, b, c) if P is None else (A, b, c, P)
        self._holder = holder = {}
        try:
            return fn(*args)
        except Exception as e:  # a failure raised inside a host callback may come back wrapped
            err = holder.get("error")
            if err is not None and e is not err:
                raise err from e
            raise

    def _outputs(self, xp: Any, x: Any) -> tuple:
        outs = []
        dev = array_api_compat.device(x)
        for v, idx in zip(self.variables, self._var_index):
            val = xp.take(x, xp.asarray(idx, device=dev), axis=x.ndim - 1)
            outs.append(xp.reshape(val, (*x.shape[:-1], *v.shape)))
        return tuple(outs)

    # -- the implicit function ----------------------------------------------------------------
    def _implicit(self, batch_dims: int) -> ImplicitFunction:
        fn = self._fns.get(batch_dims)
        if fn is not None:
            return fn
        n, m = self.n, self.m

        def result_shape(A: Any, *rest: Any) -> Any:
            bk = get_backend(A)
            lead = tuple(A.shape[:-2])
            dt = np.dtype(str(A.dtype).rpartition(".")[2])
            return bk.callback_result_shape((ArraySpec((*lead, n), dt), ArraySpec((*lead, m), dt)))

        def cvxpy_layer(A: Any, b: Any, c: Any, P: Any = None) -> Any:
            return self._host_solve(A, b, c, P, batch_dims)

        cvxpy_layer.__name__ = f"idf.cvxpy.Layer ({self.solver_name})"
        fn = custom_root(self.condition, solve=self._linear_solve,
                         residual_tol=self._residual_tol, on_failure=self._on_failure,
                         derivatives=self.condition.derivatives, result_shape=result_shape,
                         batch_dims=batch_dims, kink_probe=False)(cvxpy_layer)
        self._fns[batch_dims] = fn
        return fn

    def _host_solve(self, A: Any, b: Any, c: Any, P: Any, batch_dims: int) -> Any:
        bk = get_backend(A)
        like = A
        h = [None if a is None else np.asarray(bk.to_host(a), dtype=np.float64)
             for a in (A, b, c, P)]
        Ah, bh, ch, Ph = h
        assert Ah is not None
        B = Ah.shape[0] if batch_dims else None
        samples = range(B) if B is not None else [None]
        xs, ws = [], []
        on_failure = self.on_failure
        for k in samples:
            x, w, err = self._solve_one(_pick(Ah, 2, k), _pick(bh, 1, k), _pick(ch, 1, k),
                                        _pick(Ph, 2, k), k)
            if err is not None:
                if on_failure == "raise":
                    self._holder["error"] = err
                    raise err
                if on_failure == "warn":
                    warnings.warn(str(err), RuntimeWarning, stacklevel=3)
                x = np.full(self.n, np.nan)
                w = np.full(self.m, np.nan)
            xs.append(x)
            ws.append(w)
        if B is None:
            xo, wo = xs[0], ws[0]
        else:
            xo, wo = np.stack(xs), np.stack(ws)
        dt = np.dtype(str(A.dtype).rpartition(".")[2])
        xo, wo = xo.astype(dt), wo.astype(dt)
        return bk.from_host((xo, wo), like=like)

    def _solve_one(self, A: np.ndarray, b: np.ndarray, c: np.ndarray, P: np.ndarray | None,
                   k: int | None) -> tuple[np.ndarray, np.ndarray, ImplicitDiffError | None]:
        import cvxpy.settings as s
        import scipy.sparse as sp
        from cvxpy.reductions.solvers.conic_solvers.conic_solver import ConicSolver

        n, m = self.n, self.m
        pa = self._A.rows
        ra, ca = pa // n, pa % n
        A_s = sp.csc_array((A[ra, ca], (ra, ca)), shape=(m, n))
        f = self.cones.zero
        name = self.solver_name
        data: dict = {ConicSolver.DIMS: self._dims, s.C: c}
        if name == "ECOS":
            data[s.A] = A_s[:f] if f else None
            data[s.B] = b[:f] if f else None
            data[s.G] = A_s[f:] if m > f else None
            data[s.H] = b[f:] if m > f else None
        else:
            data[s.A], data[s.B] = A_s, b
            if P is not None:
                pp_ = self._P.rows  # type: ignore[union-attr]
                rp, cp_ = pp_ // n, pp_ % n
                data[s.P] = sp.csc_array((P[rp, cp_], (rp, cp_)), shape=(n, n))
        who = f"idf.cvxpy.Layer ({name})" + ("" if k is None else f", batch element {k}")
        try:
            raw = self._solver.solve_via_data(data, False, False, dict(self.solver_args))
        except Exception as e:  # the solver's own error (bad data, numerical failure)
            return self._nan(), self._nan_w(), NonConvergenceError(
                f"{who}: the solver raised {type(e).__name__}: {e}. Check the parameter values "
                "of this sample.")
        x, y, slack, status = self._parse(raw)
        if status in _FAILED or x is None:
            return self._nan(), self._nan_w(), NonConvergenceError(
                f"{who}: the solver reports the problem {status}; it has no solution to "
                "differentiate. Check the parameter values of this sample, or pass "
                "on_failure='nan' to get NaN for such samples.")
        w = y - slack
        if self.refine and n + m <= self.refine_max:
            x, w, _ = newton_refine(self.condition, x, w, A, b, c, P)
        return x, w, None

    def _nan(self) -> np.ndarray:
        return np.full(self.n, np.nan)

    def _nan_w(self) -> np.ndarray:
        return np.full(self.m, np.nan)

    def _parse(self, raw: Any) -> tuple:
        """`(x, y, s, status)` from the solver's raw result, y the dual and s the slack of the
        whole cone, status CVXPY's status string."""
        name = self.solver_name
        st = self._solver.STATUS_MAP
        f = self.cones.zero
        if name == "CLARABEL":
            status = st.get(str(raw.status), "solver_error")
            if raw.x is None or raw.z is None:
                return None, None, None, status
            return (np.asarray(raw.x, dtype=np.float64), np.asarray(raw.z, dtype=np.float64),
                    np.asarray(raw.s, dtype=np.float64), status)
        if name == "SCS":
            status = st.get(raw["info"]["status_val"], "solver_error")
            return (np.asarray(raw["x"], dtype=np.float64), np.asarray(raw["y"], dtype=np.float64),
                    np.asarray(raw["s"], dtype=np.float64), status)
        status = st.get(raw["info"]["exitFlag"], "solver_error")
        y = np.concatenate([np.asarray(raw["y"], dtype=np.float64).reshape(-1)[:f],
                            np.asarray(raw["z"], dtype=np.float64).reshape(-1)])
        sl = np.concatenate([np.zeros(f), np.asarray(raw["s"], dtype=np.float64).reshape(-1)])
        return np.asarray(raw["x"], dtype=np.float64), y, sl, status

    # -- NumPy: derivatives by the chain rule -------------------------------------------------
    def vjp(self, *values: Any) -> tuple[tuple, Any]:
        """`(outputs, vjp_fn)` for NumPy values: `vjp_fn(*cotangents)` (one per variable) returns
        one gradient per parameter value. (JAX and PyTorch: use the framework's autodiff.)"""
        from .. import _transforms

        _, xp, theta, batched = self._theta(values)
        A, b, c, P = self._data(xp, theta)
        fn = self._implicit(1 if batched else 0)
        args = (A, b, c) if P is None else (A, b, c, P)
        (x, w), inner = _transforms.vjp(fn, *args)
        outs = self._outputs(xp, x)

        def vjp_fn(*cots: Any) -> tuple:
            if len(cots) != len(self.variables):
                raise StructureError(f"Layer.vjp: expected {len(self.variables)} cotangents "
                                     f"(one per variable), got {len(cots)}.")
            xshape = tuple(np.shape(x))
            gx2 = np.zeros((int(np.prod(xshape[:-1])), self.n))
            for v, idx, g in zip(self.variables, self._var_index, cots):
                g = np.broadcast_to(np.asarray(g, dtype=np.float64), (*xshape[:-1], *v.shape))
                np.add.at(gx2.T, idx, g.reshape(gx2.shape[0], -1).T)  # symmetric: twice
            gx = gx2.reshape(xshape).astype(np.asarray(x).dtype)
            grads = inner((gx, np.zeros_like(np.asarray(w))))
            gt = np.zeros((*theta.shape[:-1], self._ntheta))
            maps = [mp for mp in (self._A, self._b, self._c, self._P) if mp is not None]
            for mp, g in zip(maps, grads):
                if g is None:
                    continue
                g = np.asarray(g).reshape(*theta.shape[:-1], -1)
                gt = gt + (mp.L.T @ g.reshape(-1, g.shape[-1]).T).T.reshape(gt.shape)
            return self._split_theta(gt, values)

        return outs, vjp_fn

    def jvp(self, values: Any, tangents: Any) -> tuple[tuple, tuple]:
        """`(outputs, output tangents)` for NumPy values and tangents (one per parameter)."""
        from .. import _transforms

        values, tangents = tuple(values), tuple(tangents)
        _, xp, theta, batched = self._theta(values)
        A, b, c, P = self._data(xp, theta)
        dtheta = self._theta_dot(tangents, values, theta)
        d = [self._lin(mp, dtheta) for mp in (self._A, self._b, self._c)]
        args, targs = (A, b, c), tuple(d)
        if P is not None:
            assert self._P is not None
            args, targs = (*args, P), (*targs, self._lin(self._P, dtheta))
        fn = self._implicit(1 if batched else 0)
        (x, _), (dx, _) = _transforms.jvp(fn, args, targs)
        return self._outputs(xp, x), self._outputs(xp, dx)

    def _lin(self, mp: Any, dtheta: np.ndarray) -> np.ndarray:
        flat = dtheta.reshape(-1, dtheta.shape[-1])
        out = (mp.L @ flat.T).T
        return out.reshape(*dtheta.shape[:-1], *mp.shape)

    def _theta_dot(self, tangents: tuple, values: tuple, theta: Any) -> np.ndarray:
        if len(tangents) != len(values):
            raise StructureError(f"Layer.jvp: expected {len(values)} tangents, got "
                                 f"{len(tangents)}.")
        dt = np.zeros(theta.shape)
        for p, col, t, v in zip(self.parameters, self._param_cols, tangents, values):
            shp = tuple(p.shape)
            size = int(np.prod(shp)) if shp else 1
            t = np.asarray(t, dtype=np.float64)
            t = np.broadcast_to(t, np.shape(v))
            lead = t.ndim - len(shp)
            flat = np.moveaxis(t, range(lead, t.ndim), range(t.ndim - 1, lead - 1, -1)) \
                if len(shp) > 1 else t
            flat = flat.reshape(*t.shape[:lead], size)
            dt[..., col:col + size] = flat
        return dt

    def _split_theta(self, gt: np.ndarray, values: tuple) -> tuple:
        out = []
        for p, col, v in zip(self.parameters, self._param_cols, values):
            shp = tuple(p.shape)
            size = int(np.prod(shp)) if shp else 1
            g = gt[..., col:col + size]
            vs = np.shape(v)
            if len(vs) == len(shp):  # shared: sum over the batch
                g = g.reshape(-1, size).sum(axis=0) if g.ndim > 1 else g
                out.append(g.reshape(shp, order="F") if shp else g.reshape(()))
            else:
                out.append(g.reshape((vs[0], *shp[::-1])).transpose(
                    (0, *range(len(shp), 0, -1))) if len(shp) > 1 else g.reshape(vs))
        return tuple(out)

    def __repr__(self) -> str:
        return (f"<idf.cvxpy.Layer {self.solver_name}: {len(self.parameters)} parameters, "
                f"{len(self.variables)} variables, cone program n={self.n}, m={self.m}>")



