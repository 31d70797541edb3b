"""JAX backend."""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import ad, batching, mlir
from jax.interpreters import partial_eval as pe

try:  # only the once-per-process eager-memory warning uses it; a JAX without it skips that count
    from jax.extend.core import (
        unsafe_am_i_under_a_jit_DO_NOT_USE as _under_jit,  # pyright: ignore[reportPrivateImportUsage]
    )
except ImportError:  # pragma: no cover - depends on the JAX version
    def _under_jit() -> bool:
        return True

from implicitdiff.backend import (
    Backend,
    ImplicitDiffError,
    ImplicitFunction,
    Linearization,
    StructureError,
    collecting,
    drop_failed,
    implicit_jvp,
    nan_where,
    resolve_on_failure,
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


def _forward_mode(leaves: Sequence[Any]) -> bool:
    """Whether a leaf carries a forward-mode tangent (`jax.jvp`, `jax.jacfwd`), where a
    `jax.custom_vjp` would fail with JAX's own TypeError (late, at lowering, under `jit`).
    Only the outermost differentiation counts: a `vmap` is looked through; the linearization
    behind `jax.grad` (and `jax.hessian`'s forward over reverse, which JAX gives) is not forward
    mode. A JAX without these tracer types (its internals) makes this say no, and JAX's own
    error stands."""
    try:
        from jax._src.interpreters import ad as ad_
        from jax._src.interpreters import batching as batching_
    except ImportError:  # pragma: no cover - depends on the JAX version
        return False
    jvp_t = getattr(ad_, "JVPTracer", None)
    lin_t = getattr(ad_, "LinearizeTracer", None)
    batch_t = getattr(batching_, "BatchTracer", None)
    zero_t = getattr(ad_, "Zero", None)
    if jvp_t is None:  # pragma: no cover - depends on the JAX version
        return False
    for leaf in leaves:
        t = leaf
        while is_tracer(t):
            if isinstance(t, jvp_t):
                if zero_t is None or not isinstance(getattr(t, "tangent", None), zero_t):
                    return True
                t = getattr(t, "primal", None)
            elif lin_t is not None and isinstance(t, lin_t):
                break
            elif batch_t is not None and isinstance(t, batch_t):
                t = getattr(t, "val", None)
            else:
                break
    return False


def _staged(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, list, Any, Any]:
    """`fn(*args)` traced to a jaxpr now: (the jaxpr, the values it closes over, the output
    structure, the output shapes). `_run` evaluates it with other values for those."""
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    return closed.jaxpr, list(closed.consts), jax.tree_util.tree_structure(shapes), shapes


def _run(jaxpr: Any, consts: Sequence[Any], tree: Any, args: Any) -> Any:
    """Evaluate a `_staged` jaxpr on `args` (a pytree of arrays) with `consts`."""
    from jax.core import eval_jaxpr  # pyright: ignore[reportAttributeAccessIssue]

    out = eval_jaxpr(jaxpr, list(consts), *jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(tree, out)


def _tracing() -> bool:
    """Whether a JAX transformation is active (a closure may hold its tracers although the
    arguments are concrete). A JAX without this internal says yes."""
    try:
        from jax._src import core as core_
        return not core_.trace_state_clean()
    except (ImportError, AttributeError):  # pragma: no cover - depends on the JAX version
        return True


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
        wanted = _wanted(argnums, len(self.args), "implicit_vjp")
        return tuple(o if i in wanted else None for i, o in enumerate(out))


def _wanted(argnums: Sequence[int] | None, n: int, who: str) -> frozenset[int]:
    """`argnums` as a set of indices in range(n): negative ones count from the end (as in
    Python and `jax.grad`); one outside [-n, n) is an error (it matched nothing, and every
    cotangent came back None)."""
    if argnums is None:
        return frozenset(range(n))
    out = set()
    for a in argnums:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -n <= a < n:
            raise StructureError(
                f"{who}: argnums: expected indices of the {n} positional argument(s) (from "
                f"{-n} to {n - 1}), got {a!r} in {tuple(argnums)!r}. Pass the positions of the "
                "arguments to differentiate.")
        out.add(int(a) % n)
    return frozenset(out)


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
    """`report(ok, *data)`, called only when some `ok` is false: in Python when the arrays are
    concrete (an eager call, eager `grad` or `vmap`: the library's own exception then reaches
    the caller), and in a host callback when compiled.

    Compiled, a `lax.cond` keeps the callback off the happy path. The check is one primitive
    (`_check_p`) whose Python implementation runs it directly and whose lowering is that cond:
    without it, an eager `jax.grad` evaluates the cond through XLA, and the exception reaches the
    caller as a `JaxRuntimeError`. Under `vmap` a batched predicate would turn the cond into a
    select that calls back once per element on every call; the batching rule reduces `ok` over
    the batch first, so it stays one cond and one callback. `everywhere`: when the arrays are
    sharded, call back on every device (for a `report` that raises), not on the first one only.

    The primitive declares no JAX effect (see `_check_abstract_eval`): `jax.jit` gives its
    executable the C++ fast dispatch path only when the jaxpr has no effects, and a
    `jax.debug.callback` carries one. The callback keeps XLA's side-effect flag in the lowering,
    so XLA keeps the cond; a DCE rule keeps the primitive in JAX's jaxprs."""

    def check(ok: Any, *data: Any) -> Any:
        def compiled_check(ok_: Any, *data_: Any) -> list:
            lax.cond(jnp.all(ok_), lambda *_: None,
                     lambda *a: _sharded_callback(report, a, everywhere), ok_, *data_)
            return []

        compiled = jax.make_jaxpr(compiled_check)(ok, *data)
        _check_p.bind(ok, *data, report=report, everywhere=everywhere, compiled=compiled,
                      effect=DECLARE_EFFECT)
        return jnp.zeros((), jnp.int32)

    return check


DECLARE_EFFECT = False
"""For measurement only (benchmarks/bench_jax.py): when true at trace time, the failure check
declares the debug callback's effect, as it did before, and a program holding it loses
`jax.jit`'s C++ fast dispatch path."""

_DEBUG_EFFECTS = frozenset(jax.make_jaxpr(lambda: jax.debug.callback(lambda: None))().effects)
_check_p = Primitive("implicitdiff_failure_check")
_check_p.multiple_results = True


def _check_impl(ok: Any, *data: Any, report: Callable[..., None], everywhere: bool,
                compiled: Any, effect: bool) -> list:
    # Concrete arrays (eager evaluation, including the backward pass of an eager `jax.grad`):
    # check in Python, so the library's exception is raised as itself.
    ok_ = np.asarray(ok)
    if not np.all(ok_):
        report(ok_, *(np.asarray(d) for d in data))
    return []


def _check_abstract_eval(*avals: Any, effect: bool, **params: Any) -> tuple[list, set]:
    # No effect, though the lowering holds a debug callback: in JAX 0.10 any effect of the
    # jaxpr (ordered or not) takes `jax.jit`'s executable off the C++ fast dispatch path
    # (`pjit._get_fastpath_data`), which costs 40-120 us a call. The check stays in the
    # program without one: `_check_dce` keeps it in jaxprs, and the callback's custom call
    # carries `has_side_effect` for XLA, which then keeps the cond around it.
    return [], set(_DEBUG_EFFECTS) if effect else set()


def _check_dce(used_outputs: Sequence[bool], eqn: Any) -> tuple[list[bool], Any]:
    # Never removed: it has no outputs, and what it checks is its side effect.
    return [True] * len(eqn.invars), eqn


def _check_lowering(*args: Any, compiled: Any, **params: Any) -> list:
    jaxpr_as_fun(compiled)(*args)
    return []


def _check_batch(args: Sequence[Any], dims: Sequence[Any], *, report: Callable[..., None],
                 everywhere: bool, compiled: Any, effect: bool) -> tuple[list, list]:
    ok, *data = (a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims))
    _failure_check(report, everywhere=everywhere)(jnp.all(ok), *data)
    return [], []


def _check_jvp(primals: Sequence[Any], tangents: Sequence[Any], **params: Any) -> tuple[list, list]:
    return _check_p.bind(*primals, **params), []


def _check_transpose(cts: Any, *args: Any, **params: Any) -> list:
    return [None] * len(args)


_check_p.def_impl(_check_impl)
_check_p.def_effectful_abstract_eval(_check_abstract_eval)
pe.dce_rules[_check_p] = _check_dce
mlir.register_lowering(_check_p, mlir.lower_fun(_check_lowering, multiple_results=True))
batching.primitive_batchers[_check_p] = _check_batch
ad.primitive_jvps[_check_p] = _check_jvp
ad.primitive_transposes[_check_p] = _check_transpose


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


# ---- failures inside compiled code, back as the library's exceptions ---------------------------

_RAISED: collections.deque[ImplicitDiffError] = collections.deque(maxlen=64)
"""The exceptions raised by failure callbacks (most recent last): a compiled callback's
exception reaches Python as a `JaxRuntimeError` carrying its message, and `catching` finds the
original here by that message."""

_F = TypeVar("_F", bound=Callable[..., Any])


def _original_error(e: BaseException) -> ImplicitDiffError | None:
    """The library exception whose failure callback caused the runtime error `e`, or None."""
    text = str(e)
    for err in reversed(list(_RAISED)):
        if str(err) and str(err) in text:
            return err
    return None


@contextlib.contextmanager
def _catching_block() -> Iterator[None]:
    try:
        yield
    except (jax.errors.JaxRuntimeError, ValueError) as e:
        # A call dispatched by jit's C++ fast path reports a failed callback as a ValueError
        # (the Python path as a JaxRuntimeError); either carries the message. Other errors, and
        # ValueErrors of other origins, pass through unchanged.
        err = _original_error(e)
        if err is None:
            raise
        raise err.with_traceback(None) from e


@overload
def catching() -> contextlib.AbstractContextManager[None]: ...
@overload
def catching(fn: _F) -> _F: ...
def catching(fn: Callable[..., Any] | None = None) -> Any:
    """Failures of implicitdiff checks inside `jax.jit` raised as the library's own exceptions.

    Under `jit`, a failed check (`on_failure="raise"`) raises inside a host callback, and JAX
    hands it to Python as a `jax.errors.JaxRuntimeError` (a `ValueError` for a call dispatched
    by jit's C++ fast path) that carries the message. Inside this block, or a call of a function
    wrapped by it, such an error is raised again as the original
    `ImplicitDiffError` subclass (`NonConvergenceError`, `LinearSolveError`, ...), with the same
    message, `from` the runtime error. Other errors pass through unchanged. Eager calls (no
    `jit`, including eager `jax.grad` and `jax.vmap`) raise the library's exceptions without it.

    ```python
    step = idf.jax.catching(jax.jit(jax.grad(loss)))   # a wrapped function
    try:
        g = step(theta)
    except idf.NonConvergenceError:
        ...

    with idf.jax.catching():                            # a block
        g = jax.block_until_ready(jax.jit(jax.grad(loss))(theta))
    ```

    **Arguments:**

    - `fn`: a function to wrap. The wrapper calls it and waits for its result
      (`jax.block_until_ready`), so errors of the asynchronous computation surface inside.
      Without `fn`, a context manager: wait for the results inside the block yourself.

    **Returns:** the wrapped function, or a context manager.
    """
    if fn is None:
        return _catching_block()
    fn_ = fn

    @functools.wraps(fn_)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _catching_block():
            return jax.block_until_ready(fn_(*args, **kwargs))

    return wrapper


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

    def bounded_while_loop(self, cond: Callable, body: Callable, init: Any,
                           max_steps: int) -> tuple[Any, Any]:
        # Scans (reverse-mode differentiable, unlike lax.while_loop) of lax.conds that skip the
        # body once cond is false, nested two deep (about sqrt(max_steps) each): a finished loop
        # costs one predicate per remaining outer iteration, not per remaining step. (Under
        # vmap a cond is a select: both branches run.) The body is rematerialized
        # (`jax.checkpoint`): reverse mode stores each iteration's carry, not every value the
        # body computes, and recomputes the body of the iterations that ran. Without it the
        # skipped iterations were the cost: their residuals (zeros, as large as a step's
        # intermediate values) were written and read back for every one of the max_steps
        # iterations. On a neural ODE (d = 2, batch 256, 11 steps) the gradient took 16.7 /
        # 47.9 / 314 ms at max_steps 12 / 40 / 400 without it, 8.4 / 7.6 / 9.7 ms with it.
        inner = max(1, math.isqrt(max_steps - 1) + 1)
        outer = -(-max_steps // inner)
        out_shape = jax.eval_shape(lambda s: body(s)[1], init)
        body = jax.checkpoint(body)  # see above: only the carry is stored per iteration

        def zeros(shape: Any, lead: tuple = ()) -> Any:
            return jax.tree_util.tree_map(lambda a: jnp.zeros(lead + a.shape, a.dtype), shape)

        def step(carry: Any, i: Any) -> tuple[Any, Any]:
            s, base = carry
            s, out = lax.cond(cond(s) & (base + i < max_steps), body,
                              lambda s: (s, zeros(out_shape)), s)
            return (s, base), out

        def chunk(s: Any, j: Any) -> tuple[Any, Any]:
            def run(s: Any) -> tuple[Any, Any]:
                (s, _), outs = lax.scan(step, (s, j * inner), jnp.arange(inner))
                return s, outs

            return lax.cond(cond(s) & (j * inner < max_steps), run,
                            lambda s: (s, zeros(out_shape, (inner,))), s)

        state, outs = lax.scan(chunk, init, jnp.arange(outer))
        outs = jax.tree_util.tree_map(
            lambda a: a.reshape((outer * inner, *a.shape[2:]))[:max_steps], outs)
        return state, outs

    def stop_gradient(self, x: Any) -> Any:
        return lax.stop_gradient(x)

    def known_all(self, mask: Any) -> bool:
        return False  # the solvers' loops are traced: nothing is known before they run

    def when_any(self, mask, fn, otherwise):
        return lax.cond(jnp.any(mask), fn, otherwise)

    def materialize(self, matvec: Callable, b: Any) -> Any:
        given = getattr(matvec, "materialize", None)
        if given is not None:  # `Derivatives.jacobian_x`
            return given(b)
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
        on_failure = resolve_on_failure(on_failure, "on_failure")
        if not _any_tracer((ok, data)):
            return super().handle_failure(value, ok, on_failure, make_error, *data)
        if on_failure == "nan":  # no callback in the program at all
            return nan_where(self, value, ok)

        def report(ok_: Any, *data_: Any) -> None:
            if np.all(ok_):
                return
            err = make_error(*data_)
            if on_failure == "raise":
                _RAISED.append(err)  # for `catching`, when this runs in a compiled callback
                raise err
            warnings.warn(str(err), RuntimeWarning, stacklevel=2)

        # kept by its DCE rule (no JAX effect, so jit's fast dispatch stays; see _failure_check)
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
            return check(*solver.solve(_given(mv, matvec), r, rmatvec=rmatvec, tags=tags,
                                       backend=self))

        def transpose_solve(vm: Callable, r: Any) -> Any:
            return check_transpose(*solver.solve(_given(vm, rmatvec), r, rmatvec=matvec,
                                                 tags=tags, backend=self))

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

        wanted = _wanted(argnums, len(primals), "vjp")

        def vjp_fn(cotangent: Any) -> tuple:
            grads = pullback(cotangent)
            return tuple(g if i in wanted else None for i, g in enumerate(grads))

        return out, vjp_fn

    def jacobian(self, f, primals, argnums):
        out_size = sum(np.size(leaf) for leaf in
                       jax.tree_util.tree_leaves(jax.eval_shape(f, *primals)))
        in_size = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(primals[argnums]))
        jac = jax.jacfwd if in_size <= out_size else jax.jacrev
        return jac(f, argnums=argnums)(*primals)

    def custom_vjp(self, fwd, bwd, primals, *, unsupported, jvp=None):
        # jax.custom_vjp over the dynamic leaves (arrays, Python floats); ints and other static
        # leaves are closed over. The primals travel to bwd as residuals. Forward mode through a
        # custom_vjp is JAX's own TypeError ("can't apply forward-mode autodiff (jvp) to a
        # custom_vjp function", raised late under jit), and `jvp` cannot be registered beside
        # it: forward mode is refused here, by name; second order differentiates bwd itself
        # (JAX traces it), so jax.hessian (forward over reverse) works.
        dyn, rebuild = _split_static(tuple(primals))
        if _forward_mode(dyn):
            raise unsupported("forward")
        dyn = [jnp.asarray(d) if isinstance(d, (np.ndarray, np.generic)) else d for d in dyn]
        if not self.may_differentiate(dyn):  # concrete values, no transformation: no
            return fwd(*rebuild(dyn))[0]       # derivative can be taken of the result

        def cotangents(d: Any, res: Any, out_bar: Any) -> tuple:
            cts = bwd(rebuild(d), list(res), out_bar)
            full: list[Any] = []
            for p, c in zip(primals, cts):
                n = len(jax.tree_util.tree_leaves(p))
                got = [None] * n if c is None else \
                    jax.tree_util.tree_leaves(c, is_leaf=lambda x: x is None)
                full.extend(got if len(got) == n else [None] * n)
            leaves = jax.tree_util.tree_leaves(tuple(primals))
            dyn_ct = [c for leaf, c in zip(leaves, full) if _is_dynamic(leaf)]
            return tuple(_float0_zeros_like(x) if c is None else
                         jnp.asarray(c, dtype=jnp.result_type(x)) for x, c in zip(d, dyn_ct))

        # JAX traces a custom_vjp's fwd and bwd when it differentiates, which for
        # jax.grad of a jitted function is after the jit trace ended; what they close over
        # from that trace (the core's loop constants) would be stale tracers there ("No
        # constant handler"). So both are traced now, and their closed-over values become
        # explicit inputs (constants of the derivative: the core closes over no
        # differentiated value; what the user's function closes over it lifts into the
        # primals first, `lift_closure`).
        f_jaxpr, f_consts, f_tree, f_shapes = _staged(lambda *d: fwd(*rebuild(d)), dyn)
        b_jaxpr, b_consts, b_tree, _ = _staged(cotangents, (tuple(dyn), f_shapes[1],
                                                            f_shapes[0]))

        @jax.custom_vjp
        def g(fc: tuple, bc: tuple, *d: Any) -> Any:
            return _run(f_jaxpr, fc, f_tree, d)[0]

        def g_fwd(fc: tuple, bc: tuple, *d: Any) -> tuple[Any, Any]:
            out, res = _run(f_jaxpr, fc, f_tree, d)
            return out, (fc, bc, d, res)

        def g_bwd(saved: Any, out_bar: Any) -> tuple:
            fc, bc, d, res = saved
            cts = _run(b_jaxpr, bc, b_tree, (tuple(d), res, out_bar))
            return (tuple(_float0_zeros_like(c) for c in fc),
                    tuple(_float0_zeros_like(c) for c in bc), *cts)

        g.defvjp(g_fwd, g_bwd)
        return g(tuple(f_consts), tuple(b_consts), *dyn)

    def may_differentiate(self, tree):
        return _tracing() or _any_tracer(jax.tree_util.tree_leaves(tree))

    def lift_closure(self, f, example, *, name):
        # jax.closure_convert hoists the closed-over values a derivative may perturb (tracers);
        # a custom_vjp closing over one fails with JAX's UnexpectedTracerError otherwise
        if not self.may_differentiate(example):
            return f, ()
        g, consts = jax.closure_convert(f, *example)
        if not consts:
            return f, ()

        def lifted(*a: Any) -> Any:
            return g(*a[:-1], *a[-1])

        return lifted, tuple(consts)

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
    """The dynamic leaves of `args` and a function putting new ones back. The function's
    `static_key` is the structure and the static leaves (for caches keyed on them), or None
    when a static leaf is unhashable."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    dyn_idx = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]
    dyn_set = set(dyn_idx)
    # Only the static leaves are kept: JAX's caches keep the functions closing over `rebuild`,
    # and with them, before, the user's arrays of every eager call.
    static_leaves = [None if i in dyn_set else leaf for i, leaf in enumerate(leaves)]

    def rebuild(dyn: Sequence[Any]) -> tuple:
        full = list(static_leaves)
        for i, d in zip(dyn_idx, dyn):
            full[i] = d
        return jax.tree_util.tree_unflatten(treedef, full)

    static_key: Any = (treedef, tuple((type(leaf), leaf) for i, leaf in enumerate(leaves)
                                      if i not in dyn_set))
    try:
        hash(static_key)
    except TypeError:
        static_key = None
    rebuild.static_key = static_key  # type: ignore[attr-defined]
    return [leaves[i] for i in dyn_idx], rebuild


def _shape_key(dyn: Sequence[Any], rebuild: Callable[..., Any], options: dict) -> tuple | None:
    """What the output shape of a host solver may depend on: the shapes and dtypes of the
    dynamic arguments, the static ones (Python ints, strings, the tree structure) and the
    options. None (do not cache) when a static argument is unhashable."""
    static_args = getattr(rebuild, "static_key", None)
    if static_args is None:
        return None
    shapes = tuple((tuple(np.shape(d)), str(jnp.result_type(d))) for d in dyn)
    static = tuple(sorted((k, repr(v)) for k, v in options.items() if not _is_arraylike(v)))
    arrays = tuple(sorted((k, tuple(np.shape(v)), str(v.dtype)) for k, v in options.items()
                          if _is_arraylike(v)))
    return (*shapes, static_args, static, arrays)


def _is_arraylike(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _given(mv: Callable, core_product: Any) -> Callable:
    """`mv` (the product `lax.custom_linear_solve` hands its solve) carrying the matrix the
    core's product was given (`Derivatives.jacobian_x`), if any."""
    given = getattr(core_product, "materialize", None)
    if given is None:
        return mv

    def product(v: Any) -> Any:
        return mv(v)

    product.materialize = given  # type: ignore[attr-defined]
    return product


def _external_solver(fn: ImplicitFunction, dyn: list[Any], rebuild: Callable, options: dict
                     ) -> Callable[..., Any]:
    """Wrap a solver that cannot be traced (NumPy, SciPy, C) in `jax.pure_callback`.

    The output's shape and dtype come from `fn.result_shape` when given, else from an earlier
    call with concrete arguments of the same shapes (cached on `fn`)."""
    cache = fn.__dict__.setdefault("_jax_result_shapes", {})
    key = _shape_key(dyn, rebuild, options)

    def host(*d: Any) -> Any:
        np_args = rebuild([np.asarray(a) for a in d])
        np_opts = {k: (np.asarray(v) if _is_arraylike(v) else v) for k, v in options.items()}
        out = fn.run_solver(np_args, np_opts)
        return out if fn.has_aux else out[0]

    spec = getattr(fn, "result_shape", None)
    if spec is not None:
        sds = spec(*rebuild(dyn)) if callable(spec) else spec
    elif key is not None and key in cache:
        sds = cache[key]
    elif not _any_tracer((dyn, options)):
        out = host(*dyn)
        sds = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a),
                                                                    np.asarray(a).dtype), out)
        if key is not None:
            cache[key] = sds
    else:
        raise StructureError(
            f"{fn.name}: the solver is not traceable by JAX (it calls NumPy/SciPy or other host "
            "code), so it runs through jax.pure_callback, which must know the output's shape "
            "before running. Expected result_shape=jax.ShapeDtypeStruct(...) (or a function of "
            "the arguments returning one) in idf.custom_root, or one call with concrete "
            "arguments of the same shapes, static arguments and options before jit/vmap; got "
            "neither."
        )

    def cast(out: Any) -> Any:
        return jax.tree_util.tree_map(lambda o, s: np.asarray(o, dtype=s.dtype), out, sds)

    def solver(*d: Any) -> Any:
        out = jax.pure_callback(lambda *h: cast(host(*h)), sds, *d,
                                vmap_method="sequential")
        return out if fn.has_aux else (out, None)

    return solver


EAGER_WARN_AFTER = 100
"""After this many calls of one decorated solver under a transform outside `jit`, warn (once
per process) that eager transformed calls grow memory."""
_eager_warned = False


def _note_eager_call(fn: ImplicitFunction, dyn: Sequence[Any]) -> None:
    """Count calls under `grad`/`jvp`/`vmap` outside `jit`, and warn once past the threshold.

    Each such call traces the rule again, with new functions: JAX compiles the loops in it
    again (for the backward pass, when it evaluates them) and keeps every compiled program in
    its caches, keyed on those functions, so memory grows by a few MB a call. Caching the traced
    pieces across calls here would bake in whatever `F` reads from globals or closures at the
    first call (a silently stale derivative after the user changes them), so the cost is
    documented and warned about instead; `jax.jit` traces once."""
    global _eager_warned
    if _eager_warned or not _any_tracer(dyn) or _under_jit():
        return
    count = fn.__dict__["_jax_eager_calls"] = fn.__dict__.get("_jax_eager_calls", 0) + 1
    if count >= EAGER_WARN_AFTER:
        _eager_warned = True
        warnings.warn(
            f"{fn.name}: called {count} times under jax.grad/jvp/vmap outside jax.jit. Each "
            "such call traces the implicit rule again and JAX compiles its loops anew, keeping "
            "every compiled program in its caches: memory grows by a few MB a call (about 4 MB "
            "for a 20x5 ridge problem on CPU), and each call costs a compilation. Wrap the "
            "computation in jax.jit (it compiles once), or call jax.clear_caches() now and "
            "then. (Shown once per process.)", RuntimeWarning, stacklevel=4)


def _call(bk: JaxBackend, fn: ImplicitFunction, args: tuple, options: dict) -> Any:
    # `idf.config.on_failure` when the function left it at None: read now, at call (trace) time
    on_failure = resolve_on_failure(fn.on_failure, f"{fn.name}: on_failure")
    dyn, rebuild = _split_static(args)
    dyn = [jnp.asarray(d) if isinstance(d, (np.ndarray, np.generic)) else d for d in dyn]
    _note_eager_call(fn, dyn)

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
        cond, x_lin = G, x
        if fn.batch_dims and on_failure == "nan":  # failed elements leave the derivative
            cond, x_lin, _ = drop_failed(bk, G, x, fn.batch_dims)
        x_dot = implicit_jvp(cond, x_lin, theta, theta_dot, solve=fn.solve, tags=fn.tags,
                             on_failure=on_failure, backend=bk, name=fn.name,
                             batch_dims=fn.batch_dims, kink_probe=fn.kink_probe)
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
"""The backend instance for JAX arrays, registered with implicitdiff."""
