"""JAX backend."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from implicitdiff.backend import (
    Backend,
    ImplicitDiffError,
    ImplicitFunction,
    Linearization,
    StructureError,
    collecting,
    implicit_jvp,
    nan_where,
    symmetric,
)
from implicitdiff.backend import emit as _emit
from implicitdiff.backend import emitter as _emitter

from . import _host
from ._host import is_tracer

_TRACE_ERRORS = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                 jax.errors.TracerIntegerConversionError, jax.errors.TracerBoolConversionError)


def _any_tracer(data: Sequence[Any]) -> bool:
    return any(is_tracer(leaf) for leaf in jax.tree_util.tree_leaves(data))


def _float0_zeros_like(x: Any) -> Any:
    """A zero tangent for `x`: float0 for integer/bool leaves."""
    x = jnp.asarray(x) if not hasattr(x, "dtype") else x
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


class JaxLinearization(Linearization):
    """Products with $\\partial_x F$ (by `jax.linearize` and its transpose) and
    $\\partial_\\theta F$ (by `jax.jvp` / `jax.vjp`)."""

    method = "autodiff"

    def __init__(self, F: Callable[..., Any], x: Any, args: tuple):
        self.F, self.x, self.args = F, x, args
        _, self._jvp_x = jax.linearize(lambda x_: F(x_, *args), x)
        self._vjp_x: Callable[[Any], Any] | None = None

    def A(self, v: Any) -> Any:
        return self._jvp_x(v)

    def AT(self, u: Any) -> Any:
        vjp = self._vjp_x
        if vjp is None:
            vjp = self._vjp_x = jax.linear_transpose(self._jvp_x, self.x)
        return vjp(u)[0]

    def B(self, args_dot: tuple) -> Any:
        tangents = tuple(
            jax.tree_util.tree_map(_float0_zeros_like, a) if t is None else
            jax.tree_util.tree_map(
                lambda p, tt: _float0_zeros_like(p) if not _inexact(p) else
                jnp.asarray(tt, dtype=jnp.result_type(p)), a, t)
            for a, t in zip(self.args, args_dot))
        return jax.jvp(lambda *a: self.F(self.x, *a), self.args, tangents)[1]

    def BT(self, u: Any, argnums: Sequence[int] | None = None) -> tuple:
        _, pullback = jax.vjp(lambda *a: self.F(self.x, *a), *self.args)
        out = pullback(u)
        wanted = range(len(self.args)) if argnums is None else argnums
        return tuple(o if i in wanted else None for i, o in enumerate(out))


def _inexact(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, float)
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _is_dynamic(leaf: Any) -> bool:
    """Array leaves and Python floats travel through the custom_jvp; Python ints, bools and
    other objects are closed over as static values."""
    if isinstance(leaf, (bool, int)) or leaf is None:
        return False
    return isinstance(leaf, (float, jax.Array, np.ndarray, np.generic)) or is_tracer(leaf)


def _failure_check(report: Callable[..., None], *, everywhere: bool = False
                   ) -> Callable[..., Any]:
    """`report(ok, *data)` in a host callback that runs only when some `ok` is false.

    A `lax.cond` keeps the callback off the happy path. Under `vmap` a batched predicate would
    turn the cond into a select that calls back once per element on every call; the custom
    batching rule reduces `ok` over the batch first, so it stays one cond and one callback.
    `everywhere`: when the arrays are sharded, call back on every device (for a `report` that
    raises), not on the first one only."""

    @jax.custom_batching.custom_vmap
    def check(ok: Any, *data: Any) -> Any:
        lax.cond(jnp.all(ok), lambda *_: None,
                 lambda *a: _sharded_callback(report, a, everywhere), ok, *data)
        return jnp.zeros((), jnp.int32)

    @check.def_vmap
    def _rule(axis_size: int, in_batched: Any, ok: Any, *data: Any) -> Any:
        check(jnp.all(ok), *data)
        return jnp.zeros((), jnp.int32), False

    return check


def _sharded_callback(report: Callable[..., None], data: tuple, everywhere: bool) -> None:
    """`jax.debug.callback(report, *data)` for arrays sharded over a mesh (`jit` with
    `NamedSharding`), inside the failure branch of `_failure_check`.

    A plain debug callback runs once, on device 0 (XLA moves the sharded data there, warning
    "involuntary full rematerialization" at compile time); a `report` that raises there stops
    device 0 alone while the other devices wait for it at their next collective, and XLA aborts
    the whole process after 40 s. Here the data are replicated over the mesh inside the branch
    (the optimization barrier keeps XLA from hoisting that all-gather out of the branch, onto
    every call) and, with `everywhere`, every device calls back with the whole data, so every
    device raises the same error, naming the failed elements by their place in the batch."""
    mesh = _auto_mesh(data)
    if mesh is None:  # not sharded (or a JAX too old to tell): as before
        jax.debug.callback(report, *data)
        return
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = tuple(lax.with_sharding_constraint(d, rep) for d in lax.optimization_barrier(data))
    jax.debug.callback(report, *data, partitioned=everywhere)


def _auto_mesh(data: Sequence[Any]) -> Any:
    """The mesh the traced `data` are sharded over by `jit`'s automatic partitioning, or None
    (no mesh, explicit or manual axes, or a JAX without `jax.typeof`)."""
    typeof, auto = getattr(jax, "typeof", None), getattr(jax.sharding, "AxisType", None)
    if typeof is None or auto is None:
        return None
    for leaf in jax.tree_util.tree_leaves(data):
        mesh = getattr(getattr(typeof(leaf), "sharding", None), "mesh", None)
        if mesh is not None and not mesh.empty:
            return mesh if all(t == auto.Auto for t in mesh.axis_types) else None
    return None


class JaxBackend(Backend):
    """The backend for `jax.Array`s and tracers."""

    name = "jax"
    framework = "jax"

    def owns(self, x: Any) -> bool:
        return isinstance(x, jax.Array) or is_tracer(x)

    def namespace(self, *arrays: Any) -> Any:
        return jnp

    def is_float(self, x: Any) -> bool:
        if isinstance(x, (bool, int)):
            return False
        if isinstance(x, float):
            return True
        dtype = getattr(x, "dtype", None)
        return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))

    # ---- pytrees: JAX's own, so registered nodes (equinox modules, ...) work ------------------
    def tree_flatten(self, tree: Any) -> tuple[list[Any], Any]:
        return jax.tree_util.tree_flatten(tree)

    def tree_unflatten(self, treedef: Any, leaves: Sequence[Any]) -> Any:
        return jax.tree_util.tree_unflatten(treedef, list(leaves))

    def tree_leaves_with_path(self, tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
        return [(prefix + jax.tree_util.keystr(p), leaf)
                for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]

    # ---- loops and dense algebra -------------------------------------------------------------
    def while_loop(self, cond: Callable, body: Callable, init: Any) -> Any:
        return lax.while_loop(cond, body, init)

    def known_all(self, mask: Any) -> bool:
        return False  # the solvers' loops are traced: nothing is known before they run

    def materialize(self, matvec: Callable, b: Any) -> Any:
        n = b.shape[-1]
        # A data dependency on b (hence on x*) makes XLA factor this matrix after the forward
        # solve, never beside it: two batched LU factorizations running at once deadlock
        # XLA:CPU's thread pool on small machines (seen with vmap of a Dense backward).
        eye = jnp.eye(n, dtype=b.dtype) + 0.0 * jnp.sum(b)
        return jax.vmap(lambda e: matvec(jnp.broadcast_to(e, b.shape)), out_axes=-1)(eye)

    def solve_triangular(self, L: Any, b: Any, *, lower: bool) -> Any:
        return jax.scipy.linalg.solve_triangular(L, b[..., None], lower=lower)[..., 0]

    # ---- failures and diagnostics: host callbacks when traced --------------------------------
    def handle_failure(self, value, ok, on_failure, make_error, *data):
        if not _any_tracer((ok, data)):
            return super().handle_failure(value, ok, on_failure, make_error, *data)
        if on_failure == "nan":
            return nan_where(self, value, ok)

        def report(ok_: Any, *data_: Any) -> None:
            if np.all(ok_):
                return
            err = make_error(*data_)
            if on_failure == "raise":
                raise err
            warnings.warn(str(err), RuntimeWarning, stacklevel=2)

        # kept by the callback's effect
        _failure_check(report, everywhere=on_failure == "raise")(ok, *data)
        return value

    def record(self, make_record: Callable[..., Any], *data: Any) -> None:
        # Only functions traced inside an `idf.diagnostics()` block report, so compiled code
        # outside one pays nothing.
        if not collecting():
            return
        if not _any_tracer(data):
            _emit(make_record(*data))
            return
        emit = _emitter()  # the callback may run on another thread than this one
        jax.debug.callback(lambda *d: emit(make_record(*d)), *data)

    # ---- differentiation ---------------------------------------------------------------------
    def linearize(self, F, x, args, *, derivatives=None, tags=frozenset()):
        return JaxLinearization(F, x, tuple(args))

    def linear_solve(self, solver, matvec, b, *, rmatvec, tags, check, check_transpose,
                     linearization=None, transpose=False):
        # The tangent solve is a custom_linear_solve: reverse mode transposes it into a solve
        # with A^T (transpose_solve), higher order differentiates it again.
        def solve(mv: Callable, r: Any) -> Any:
            return check(*solver.solve(mv, r, rmatvec=rmatvec, tags=tags, backend=self))

        def transpose_solve(vm: Callable, r: Any) -> Any:
            return check_transpose(*solver.solve(vm, r, rmatvec=matvec, tags=tags, backend=self))

        return lax.custom_linear_solve(matvec, b, solve, transpose_solve=transpose_solve,
                                       symmetric=symmetric in tags)

    def call(self, fn: ImplicitFunction, args: tuple, options: dict) -> Any:
        return _call(self, fn, tuple(args), options)

    def jvp(self, f, primals, tangents):
        return jax.jvp(f, tuple(primals), tuple(tangents))

    def vjp(self, f, primals, argnums):
        out, pullback = jax.vjp(f, *primals)
        if argnums is None:
            return out, pullback

        def vjp_fn(cotangent: Any) -> tuple:
            grads = pullback(cotangent)
            return tuple(g if i in argnums else None for i, g in enumerate(grads))

        return out, vjp_fn

    def jacobian(self, f, primals, argnums):
        out_size = sum(np.size(leaf) for leaf in
                       jax.tree_util.tree_leaves(jax.eval_shape(f, *primals)))
        in_size = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(primals[argnums]))
        jac = jax.jacfwd if in_size <= out_size else jax.jacrev
        return jac(f, argnums=argnums)(*primals)

    # ---- autodiff of user functions, host arrays (see implicitdiff.Backend) ------------------
    autodiff = True

    def grad(self, f, x, args, *, who="grad"):
        return jax.grad(f)(x, *args)

    def residual_grad(self, fun, x, args, *, who="residual_grad"):
        r, pullback = jax.vjp(lambda z: fun(z, *args), x)
        return pullback(r)[0]

    def to_host(self, tree):
        return _host.to_host(tree)

    def from_host(self, tree, *, like=None, device=None):
        # JAX promotes dtypes and places constants where the computation runs: `like` unused
        return _host.from_host(tree, device)

    def host_array(self, x, *, like=None):
        return _host.host_array(x, like)

    def is_traced(self, tree):
        return _any_tracer(tree)

    def callback_result_shape(self, specs):
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), specs,
                                      is_leaf=lambda s: hasattr(s, "shape"))

    def host_function(self, f, theta, *, like=None, scalar=False):
        return _host.host_function(f, theta, scalar)

    def host_derivative(self, f, theta, kind, *, like=None):
        return _host.host_derivative(f, theta, kind)

    def flattens(self, x):
        return not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))

    def synchronize(self, tree):
        jax.block_until_ready(tree)
        jax.effects_barrier()

    def enable_float64(self):
        return _host.float64_mode()


# ---- the implicit rule -------------------------------------------------------------------------

def _split_static(args: tuple) -> tuple[list[Any], Callable[[Sequence[Any]], tuple]]:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    dyn_idx = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]

    def rebuild(dyn: Sequence[Any]) -> tuple:
        full = list(leaves)
        for i, d in zip(dyn_idx, dyn):
            full[i] = d
        return jax.tree_util.tree_unflatten(treedef, full)

    return [leaves[i] for i in dyn_idx], rebuild


def _shape_key(dyn: Sequence[Any], options: dict) -> tuple:
    shapes = tuple((tuple(np.shape(d)), str(jnp.result_type(d))) for d in dyn)
    static = tuple(sorted((k, repr(v)) for k, v in options.items() if not _is_arraylike(v)))
    return (*shapes, static)


def _is_arraylike(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _external_solver(fn: ImplicitFunction, dyn: list[Any], rebuild: Callable, options: dict
                     ) -> Callable[..., Any]:
    """Wrap a solver that cannot be traced (NumPy, SciPy, C) in `jax.pure_callback`.

    The output's shape and dtype come from `fn.result_shape` when given, else from an earlier
    call with concrete arguments of the same shapes (cached on `fn`)."""
    cache = fn.__dict__.setdefault("_jax_result_shapes", {})
    key = _shape_key(dyn, options)

    def host(*d: Any) -> Any:
        np_args = rebuild([np.asarray(a) for a in d])
        np_opts = {k: (np.asarray(v) if _is_arraylike(v) else v) for k, v in options.items()}
        out = fn.run_solver(np_args, np_opts)
        return out if fn.has_aux else out[0]

    spec = getattr(fn, "result_shape", None)
    if spec is not None:
        sds = spec(*rebuild(dyn)) if callable(spec) else spec
    elif key in cache:
        sds = cache[key]
    elif not _any_tracer(dyn):
        out = host(*dyn)
        sds = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a),
                                                                    np.asarray(a).dtype), out)
        cache[key] = sds
    else:
        raise StructureError(
            f"{fn.name}: the solver is not traceable by JAX (it calls NumPy/SciPy or other host "
            "code), so it runs through jax.pure_callback, which must know the output's shape "
            "before running. Expected result_shape=jax.ShapeDtypeStruct(...) (or a function of "
            "the arguments returning one) in idf.custom_root, or one call with concrete "
            "arguments of the same shapes before jit/vmap; got neither."
        )

    def cast(out: Any) -> Any:
        return jax.tree_util.tree_map(lambda o, s: np.asarray(o, dtype=s.dtype), out, sds)

    def solver(*d: Any) -> Any:
        out = jax.pure_callback(lambda *h: cast(host(*h)), sds, *d,
                                vmap_method="sequential")
        return out if fn.has_aux else (out, None)

    return solver


def _call(bk: JaxBackend, fn: ImplicitFunction, args: tuple, options: dict) -> Any:
    dyn, rebuild = _split_static(args)
    dyn = [jnp.asarray(d) if isinstance(d, (np.ndarray, np.generic)) else d for d in dyn]

    aux_static: dict[str, Any] = {}

    def run(*d: Any) -> Any:
        x, aux = fn.run_solver(rebuild(d), options)
        if not fn.has_aux:
            return x, aux
        # aux passes through untouched: array leaves as outputs, other leaves (strings,
        # objects) kept aside at trace time and put back after the call.
        leaves, treedef = jax.tree_util.tree_flatten(aux)
        keep = [isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or is_tracer(leaf)
                for leaf in leaves]
        aux_static.update(treedef=treedef, keep=keep,
                          static=[None if k else leaf for leaf, k in zip(leaves, keep)])
        return x, [leaf for leaf, k in zip(leaves, keep) if k]

    # 1. The solver: traceable JAX code, or host code through pure_callback.
    try:
        out_sds = jax.eval_shape(run, *dyn)
        solver: Callable[..., Any] = run
    except _TRACE_ERRORS:
        solver = _external_solver(fn, dyn, rebuild, options)
        out_sds = jax.eval_shape(solver, *dyn)
    x_sds = out_sds[0]

    # 2. Closure conversion: values F or the solver close over become explicit inputs, so
    #    derivatives reach them (F's) or are correctly zero (the solver's, by the theorem).
    def F_dyn(x: Any, *d: Any) -> Any:
        return fn.F(x, *rebuild(d))

    try:
        F_conv, F_consts = jax.closure_convert(F_dyn, x_sds, *dyn)
        S_conv, S_consts = jax.closure_convert(solver, *dyn)
    except _TRACE_ERRORS as e:
        raise ImplicitDiffError(
            f"{fn.name}: F could not be traced by JAX ({type(e).__name__}). Expected F written "
            "with jax.numpy or array-API operations on its inputs; positional arguments are "
            "traced arrays, so pass values used as Python numbers (sizes, counts) as keyword "
            "options of the solver or close over them."
        ) from e
    nd, nf = len(dyn), len(F_consts)

    def G(x: Any, *theta: Any) -> Any:  # the condition in terms of (dyn, F's constants)
        return F_conv(x, *theta)

    G.__name__ = getattr(fn.F, "__name__", "F")

    @jax.custom_jvp
    def sol(*flat: Any) -> Any:
        d, fc, sc = flat[:nd], flat[nd:nd + nf], flat[nd + nf:]
        x, aux = S_conv(*d, *sc)
        x = fn.check(bk, x, (*d, *fc), F=G)
        return x, aux

    @sol.defjvp
    def sol_jvp(primals: tuple, tangents: tuple) -> Any:
        x, aux = sol(*primals)
        theta, theta_dot = primals[:nd + nf], tangents[:nd + nf]
        x_dot = implicit_jvp(G, x, theta, theta_dot, solve=fn.solve, tags=fn.tags,
                             on_failure=fn.on_failure, backend=bk, name=fn.name,
                             batch_dims=fn.batch_dims)
        return (x, aux), (x_dot, jax.tree_util.tree_map(_float0_zeros_like, aux))

    x, aux = sol(*dyn, *F_consts, *S_consts)
    if not fn.has_aux:
        return x
    if aux_static:  # a traceable solver: rebuild aux with its non-array leaves
        it = iter(aux)
        leaves = [next(it) if k else leaf
                  for leaf, k in zip(aux_static["static"], aux_static["keep"])]
        aux = jax.tree_util.tree_unflatten(aux_static["treedef"], leaves)
    return x, aux


backend = JaxBackend()
