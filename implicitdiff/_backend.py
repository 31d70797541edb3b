"""The backend protocol and the registry that picks a backend from the type of the arrays.

A backend tells the core how to flatten pytrees, run loops (`while_loop`), linearize $F$ with
its framework's autodiff, register the implicit rule where its framework finds it, and report
failures. Lookup never imports a framework: a backend is considered only when its framework's
top-level module is already in `sys.modules`.
"""

from __future__ import annotations

import abc
import importlib
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import _tree
from ._array import device as _device
from ._errors import BackendNotFoundError, ImplicitDiffError, StructureError

# name -> (framework module that must already be imported, "module:attribute" of the backend)
_BUILTINS: dict[str, tuple[str, str]] = {
    "numpy": ("numpy", "implicitdiff_numpy:backend"),
    "jax": ("jax", "implicitdiff_jax:backend"),
    "torch": ("torch", "implicitdiff_torch:backend"),
}
ENTRY_POINT_GROUP = "implicitdiff.backends"
"""The entry-point group under which third-party packages register a `Backend` (see
`register_backend`)."""

_lock = threading.Lock()
_table: dict[str, tuple[str, str | Backend]] = dict(_BUILTINS)
_loaded: dict[str, Backend] = {}
_entry_points_read = False


class Linearization(abc.ABC):
    """Products with $A = \\partial_x F(x^*, \\theta)$, $A^\\top$, $B = \\partial_\\theta F$ and
    $B^\\top$ at one point, on pytrees shaped like `x` (for $A$, $A^\\top$, the output of $B$) and
    like `args` (the input of $B$, the output of $B^\\top$).

    `method` names where the products come from ("autodiff", "user", "complex-step",
    "central-difference"), for the diagnostics.
    """

    method: str = "autodiff"

    @abc.abstractmethod
    def A(self, v: Any) -> Any:
        """$\\partial_x F \\, v$."""

    @abc.abstractmethod
    def AT(self, u: Any) -> Any:
        """$\\partial_x F^\\top u$."""

    @abc.abstractmethod
    def B(self, args_dot: tuple) -> Any:
        """$\\partial_\\theta F \\, \\dot\\theta$, `args_dot` a tuple like `args`."""

    @abc.abstractmethod
    def BT(self, u: Any, argnums: Sequence[int] | None = None) -> tuple:
        """$\\partial_\\theta F^\\top u$, a tuple like `args` (None where no gradient)."""


class Backend(abc.ABC):
    """What a framework provides to the core. Subclass it to add a framework.

    Required: `name`, `framework`, `owns`, `linearize`, `call`. The rest has working defaults for
    eager frameworks (Python loops, the core's own pytrees).
    """

    name: str = ""
    framework: str = ""
    linalg_errors: tuple[type[BaseException], ...] = ()

    # ---- arrays -------------------------------------------------------------------------------
    @abc.abstractmethod
    def owns(self, x: Any) -> bool:
        """Whether `x` is an array of this backend's framework."""

    def namespace(self, *arrays: Any) -> Any:
        """The array-API namespace for `arrays`."""
        import array_api_compat

        return array_api_compat.array_namespace(*arrays)

    def is_float(self, x: Any) -> bool:
        """Whether leaf `x` is a real floating array or Python float (gets a derivative)."""
        if isinstance(x, bool) or isinstance(x, int):
            return False
        if isinstance(x, float):
            return True
        dtype = getattr(x, "dtype", None)
        if dtype is None:
            return False
        try:
            xp = self.namespace(x)
            return bool(xp.isdtype(dtype, "real floating"))
        except (TypeError, ValueError):
            return False

    # ---- pytrees ------------------------------------------------------------------------------
    def tree_flatten(self, tree: Any) -> tuple[list[Any], Any]:
        """Leaves and structure of a pytree."""
        return _tree.tree_flatten(tree)

    def tree_unflatten(self, treedef: Any, leaves: Sequence[Any]) -> Any:
        """Inverse of `tree_flatten`."""
        return _tree.tree_unflatten(treedef, list(leaves))

    def tree_leaves_with_path(self, tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
        """Leaves with readable key paths, for error messages."""
        return _tree.tree_leaves_with_path(tree, prefix)

    # ---- control flow -------------------------------------------------------------------------
    def while_loop(self, cond: Callable[[Any], Any], body: Callable[[Any], Any], init: Any) -> Any:
        """`while cond(state): state = body(state)`; `lax.while_loop` under JAX."""
        state = init
        while bool(cond(state)):
            state = body(state)
        return state

    def bounded_while_loop(self, cond: Callable[[Any], Any],
                           body: Callable[[Any], tuple[Any, Any]], init: Any,
                           max_steps: int) -> tuple[Any, Any]:
        """`while cond(state)` (at most `max_steps` times): `state, out = body(state)`, with the
        framework's autodiff recording every iteration (reverse mode included: unlike
        `while_loop`, JAX can differentiate it, as a `lax.scan` of `max_steps` iterations that
        skip their work once `cond` is false).

        **Returns:** `(state, outs)`: `outs` is None when `body` returns None as `out` or the
        loop ran no iteration; else the `out`s (pytrees of arrays) stacked on a new leading
        axis, one row per iteration run (eager backends) or `max_steps` rows, zeros after the
        loop stopped (JAX). This default is a Python loop."""
        state, outs = init, []
        for _ in range(max_steps):
            if not bool(cond(state)):
                break
            state, out = body(state)
            outs.append(out)
        if not outs or outs[0] is None:
            return state, None
        leaves = [self.tree_flatten(o)[0] for o in outs]
        treedef = self.tree_flatten(outs[0])[1]
        xp = self.namespace(leaves[0][0])
        return state, self.tree_unflatten(
            treedef, [xp.stack([row[i] for row in leaves]) for i in range(len(leaves[0]))])

    def stop_gradient(self, x: Any) -> Any:
        """The array `x` as a constant of the framework's autodiff (`lax.stop_gradient`,
        `Tensor.detach`): derivatives do not flow through the result. Default: `x` (no
        autodiff)."""
        return x

    def known_all(self, mask: Any) -> bool:
        """Whether every entry of the boolean array `mask` is known, now, to be true.

        Eager backends look (one host synchronization); tracing backends (JAX) return False.
        The solvers use it to skip masked selects that would be the identity: a False answer
        is always safe, it only costs the select."""
        return bool(self.namespace(mask).all(mask))

    def when_any(self, mask: Any, fn: Callable[[], Any], otherwise: Callable[[], Any]) -> Any:
        """`fn()` where some entry of the boolean array `mask` may be true, else `otherwise()`.

        For work that changes nothing where `mask` is all false (a fallback solve for the
        elements that need it, a second test of the entries a first one flagged): `otherwise()`
        must return what `fn()` would there, with the same structure, so running `fn` is always
        correct and skipping it only saves its cost. Eager default: `fn()` unless `known_all`
        shows no entry is true. JAX: `lax.cond` on `any(mask)`, so a compiled loop skips it
        at run time (under `vmap`, a select: both run)."""
        if self.known_all(self.namespace(mask).logical_not(mask)):
            return otherwise()
        return fn()

    def ring_write(self, hist: Any, slot: Any, row: Any, mask: Any, everyone: bool) -> Any:
        """A solver's history buffer with `hist[..., slot, :] = row` for the batch elements where
        `mask`; returns the new buffer. Shapes: `hist` `(..., m, n)`, `slot` `(..., 1)` (an
        integer array) or a Python int (the same slot for every element), `row` `(..., n)`,
        `mask` `(..., 1)`; `everyone`: `mask` is known to be all true.

        This default is functional, a masked select over the whole buffer (what JAX compiles
        into an in-place update). Eager backends may write into `hist` in place instead: the
        solvers own their buffers and never read an old version after the write."""
        xp = self.namespace(hist)
        m = hist.shape[-2]
        slots = xp.reshape(xp.arange(m, device=_device(hist)), (m, 1))
        at = slots == (slot if isinstance(slot, int) else xp.astype(slot, slots.dtype)[..., None])
        if not everyone:
            at = at & mask[..., None]
        return xp.where(at, row[..., None, :], hist)

    def materialize(self, matvec: Callable[[Any], Any], b: Any) -> Any:
        """The matrix $M$ with $M e_j$ = `matvec(e_j)`, batched like `b` (shape `(..., n, n)`);
        `matvec.materialize(b)` when the product carries one (`Derivatives.jacobian_x`)."""
        given = getattr(matvec, "materialize", None)
        if given is not None:
            return given(b)
        xp = self.namespace(b)
        n = b.shape[-1]
        eye = xp.eye(n, dtype=b.dtype, device=_device(b))
        cols = [matvec(xp.broadcast_to(eye[j, :], b.shape)) for j in range(n)]
        return xp.stack(cols, axis=-1)

    def solve_triangular(self, L: Any, b: Any, *, lower: bool) -> Any:
        """Solve $L x = b$ for triangular `L` (`b` of shape `(..., n)`)."""
        xp = self.namespace(L, b)
        return xp.linalg.solve(L, b[..., None])[..., 0]

    # ---- failures and diagnostics --------------------------------------------------------------
    def handle_failure(self, value: Any, ok: Any, on_failure: str,
                       make_error: Callable[..., ImplicitDiffError], *data: Any) -> Any:
        """Apply `on_failure` where `ok` is false: raise `make_error(*data)`, warn, or fill the
        failed entries of `value` with NaN. `ok` is a boolean array (one flag per batch element)."""
        xp = self.namespace(ok)
        if bool(xp.all(ok)):
            return value
        if on_failure == "raise":
            raise make_error(*data)
        if on_failure == "warn":
            warnings.warn(str(make_error(*data)), RuntimeWarning, stacklevel=4)
            return value
        return nan_where(self, value, ok)

    def record(self, make_record: Callable[..., Any], *data: Any) -> None:
        """Hand a diagnostics record to the active `idf.diagnostics()` collectors."""
        from ._diagnostics import _emit

        _emit(make_record(*data))

    # ---- differentiation ---------------------------------------------------------------------
    @abc.abstractmethod
    def linearize(self, F: Callable[..., Any], x: Any, args: tuple, *,
                  derivatives: Any = None, tags: frozenset = frozenset()) -> Linearization:
        """Products with $\\partial_x F$ and $\\partial_\\theta F$ at `(x, args)`."""

    @abc.abstractmethod
    def call(self, fn: Any, args: tuple, options: dict) -> Any:
        """Call the decorated solver `fn` (an `ImplicitFunction`) so that this framework's autodiff
        sees the implicit rule."""

    def linear_solve(self, solver: Any, matvec: Callable, b: Any, *, rmatvec: Callable | None,
                     tags: frozenset, check: Callable[[Any, Any], Any],
                     check_transpose: Callable[[Any, Any], Any],
                     linearization: Linearization | None = None,
                     transpose: bool = False) -> Any:
        """Solve $A x = b$ with `solver` and return `check(x, info)`.

        `check` records the diagnostics and applies `on_failure`; `check_transpose` does the same
        for a solve with $A^\\top$, for backends (JAX) that register the transpose solve so
        reverse mode can run it later. `linearization` is the `Linearization` whose products
        `matvec` and `rmatvec` are, and `transpose` says whether `matvec` is the product with
        $A^\\top$ (a VJP) rather than $A$ (a JVP): backends whose autodiff differentiates the
        solve itself (PyTorch) rebuild the products from it at other points.
        """
        return check(*solver.solve(matvec, b, rmatvec=rmatvec, tags=tags, backend=self))

    def jvp(self, f: Callable, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        """Forward-mode derivative of `f` (see `implicitdiff.jvp`)."""
        raise NotImplementedError(f"backend {self.name!r} does not implement jvp")

    def vjp(self, f: Callable, primals: tuple, argnums: Sequence[int] | None) -> tuple[Any, Any]:
        """Reverse-mode derivative of `f` (see `implicitdiff.vjp`)."""
        raise NotImplementedError(f"backend {self.name!r} does not implement vjp")

    def jacobian(self, f: Callable, primals: tuple, argnums: int) -> Any:
        """Jacobian of `f` in argument `argnums` (see `implicitdiff.jacobian`)."""
        raise NotImplementedError(f"backend {self.name!r} does not implement jacobian")

    def custom_vjp(self, fwd: Callable[..., tuple[Any, Any]],
                   bwd: Callable[[tuple, Any, Any], tuple], primals: tuple, *,
                   unsupported: Callable[[str], ImplicitDiffError],
                   jvp: Callable[[tuple, tuple], Any] | None = None) -> Any:
        """Call a function whose reverse-mode derivative is written by hand, registered where
        this framework's autodiff finds it (`torch.autograd.Function`, `jax.custom_vjp`): how
        the core's layers that are not implicit (`idf.ode.checkpointed`) register their rule.

        **Arguments:**

        - `fwd`: `fwd(*primals) -> (out, residuals)`: the output (a pytree of this
          framework's arrays) and what `bwd` needs (a list of pytrees of arrays). Run without
          recording a tape.
        - `bwd`: `bwd(primals, residuals, out_bar) -> cotangents`: one cotangent per primal,
          a pytree like it, or None (no gradient; also None at leaves). The `residuals` list
          may be consumed (popped) by `bwd`: eager backends hand over their only reference,
          so what `bwd` pops is freed as it goes; `bwd` must then recompute what it lacks on
          a second call.
        - `primals`: a tuple of pytrees; array leaves are differentiated, other leaves are
          passed through as they are.
        - `unsupported`: (keyword) `unsupported(kind)` is the error to raise when a
          derivative the rule does not give is asked for (`kind` "forward" for forward mode,
          "second" for a derivative of `bwd`, "vmap" for `torch.func.vmap` over the rule),
          where the framework lets the backend tell.
        - `jvp`: (keyword) the forward mode, where the framework lets a reverse-mode rule have
          one (PyTorch's `autograd.Function.jvp`; not JAX, whose `custom_vjp` has none):
          `jvp(primals, tangents) -> out_tangent`, the tangents shaped like the primals
          (zeros where none was given), the result a pytree like `out`. None (and always in
          JAX: `jax.jvp`, `jax.jacfwd`): forward mode raises `unsupported("forward")`.

        **Returns:** `out`. This default (no autodiff, the NumPy reference) calls `fwd` and
        drops the residuals."""
        return fwd(*primals)[0]

    def may_differentiate(self, tree: Any) -> bool:
        """Whether a derivative of what is computed now from `tree` may be asked for: False
        only where it certainly will not be (PyTorch: no transform or forward AD active, and
        no tensor of `tree` requires grad with grad mode on; JAX: concrete arrays and no
        transformation active). A rule that saves for a derivative (`odeint(grad=
        "checkpoint")`'s replay) skips that work where it is False. Default (no autodiff, the
        NumPy reference): False."""
        return False

    def lift_closure(self, f: Callable[..., Any], example: tuple, *, name: str
                     ) -> tuple[Callable[..., Any], tuple]:
        """The arrays `f` reads from its closure (a module's parameters, a captured tensor or
        tracer) that a derivative may be asked of, made explicit, for a hand-written
        reverse-mode rule (`custom_vjp`), which returns cotangents for its inputs only and
        would otherwise give them a silently missing derivative.

        **Arguments:**

        - `f`: the function, called as `f(*example)`.
        - `example`: (a tuple) arguments `f` is called with, for a trial evaluation.
        - `name`: (keyword) used in error messages.

        **Returns:** `(g, values)`: `values` a tuple of the closed-over arrays (empty: `g` is
        `f`), and `g(*call, values_like)` computes `f(*call)` reading `values_like` where `f`
        reads `values`. Raises a `StructureError` where `f` reads a differentiated array it
        holds somewhere this cannot find (a silently wrong derivative otherwise). Default
        (no autodiff, the NumPy reference): `(f, ())`."""
        return f, ()

    def loop_vjp(self, f: Callable[..., Any], primals: tuple) -> tuple[Any, Any]:
        """`vjp(f, primals, None)` for one iteration of a loop the core runs itself (one step
        of `idf.ode.checkpointed`'s backward pass, thousands of times): the same result;
        backends may take a cheaper path when no transform records the call (PyTorch:
        `torch.autograd.grad` instead of `torch.func.vjp`). Default: `vjp`."""
        return self.vjp(f, primals, None)

    # ---- autodiff of user functions (the conditions catalogue) --------------------------------
    def grad(self, f: Callable[..., Any], x: Any, args: tuple, *, who: str = "grad") -> Any:
        """$\\nabla_x f(x, *args)$ for a scalar-valued `f`, shaped like `x` (a pytree).

        The conditions catalogue (`implicitdiff.conditions`) asks this of the backend of `x`.
        Autodiff backends use their framework (`jax.grad`, `torch.func.grad`). This default is
        the NumPy reference's: the complex step on NumPy arrays (exact to rounding for
        complex-safe `f`); for arrays of another framework it raises `StructureError` asking for
        an explicit `grad=`. `who` names the caller in error messages.
        """
        if not _all_host(x):
            raise StructureError(
                f"{who}: no automatic gradient for arrays of the backend {self.name!r}. Pass "
                "grad= (a function (x, *args) -> ∇ₓf shaped like x)."
            )
        from .conditions._grad import complex_step_grad

        return complex_step_grad(f, x, args, who=who)

    def residual_grad(self, fun: Callable[..., Any], x: Any, args: tuple, *,
                      who: str = "residual_grad") -> Any:
        """$J^\\top r$ with $r$ = `fun(x, *args)` and $J = \\partial_x$ `fun`: the gradient of
        $\\tfrac12\\|r\\|^2$, shaped like `x` (used by `conditions.least_squares`).

        Autodiff backends take one reverse-mode product. This default is the complex-step
        gradient of $\\tfrac12\\|r\\|^2$ on NumPy arrays, and `StructureError` (asking for
        `jac=`) for arrays of another framework.
        """
        if not _all_host(x):
            raise StructureError(
                f"{who}: no automatic Jacobian for arrays of the backend {self.name!r}. Pass "
                "jac= (a function (x, *args) -> the Jacobian matrix of the residual)."
            )
        from .conditions._grad import complex_step_grad

        def half_sq(z: Any, *a: Any) -> Any:
            r = fun(z, *a)
            import numpy as np

            return 0.5 * sum(np.sum(leaf * leaf) for leaf in _tree.tree_flatten(r)[0])

        return complex_step_grad(half_sq, x, args, who=who)

    # ---- host arrays: NumPy data and external solvers ----------------------------------------
    #: Whether `grad`, `residual_grad` and `host_derivative` come from the framework's autodiff
    #: (JAX, PyTorch). The NumPy reference (False) prefers a user's hand-written derivative.
    autodiff: bool = False

    def to_host(self, tree: Any) -> Any:
        """The pytree with this framework's arrays as NumPy arrays (detached, on the CPU).

        A traced array that has no value yet (a JAX tracer) raises the framework's own error,
        which sends the core to its host-callback path. Default: `np.asarray` on every leaf
        with a dtype."""
        import numpy as np

        return _tree.tree_map(lambda a: np.asarray(a) if hasattr(a, "dtype") else a, tree)

    def from_host(self, tree: Any, *, like: Any = None, device: Any = None) -> Any:
        """The pytree with its NumPy arrays (constants, never differentiated) as arrays of this
        framework; every other leaf unchanged.

        **Arguments:**

        - `tree`: a pytree.
        - `like`: (keyword) an array of this framework the constants join: they go to its
          device, and backends whose operations do not promote dtypes (PyTorch) cast floating
          constants to its floating dtype.
        - `device`: (keyword) the device, instead of `like`'s.

        The default keeps NumPy arrays the backend owns (the NumPy reference) and raises
        `BackendNotFoundError` for a backend that owns other arrays and does not implement it.
        """
        leaves = self.tree_flatten(tree)[0]
        if all(self.owns(leaf) for leaf in leaves if is_host_array(leaf)):
            return tree
        raise BackendNotFoundError(
            f"backend {self.name!r}: expected NumPy arrays only beside arrays this backend can "
            "take in, got NumPy arrays and no from_host method to convert them. Convert them "
            "to the framework's arrays first, or implement Backend.from_host."
        )

    def host_array(self, x: Any, *, like: Any = None) -> Any:
        """A floating array of this framework from `x` (host data, or an array of this
        framework, detached): with the dtype of `like` when it is a floating array, else `x`'s
        own floating dtype (the default floating dtype for integer data). Default: NumPy."""
        import numpy as np

        if hasattr(x, "detach"):
            x = x.detach()
        a = np.asarray(x)
        if like is not None and hasattr(like, "dtype") and np.issubdtype(np.asarray(like).dtype,
                                                                         np.floating):
            return a.astype(np.asarray(like).dtype, copy=False)
        return a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)

    def is_traced(self, tree: Any) -> bool:
        """Whether a leaf of `tree` is being traced (a JAX tracer inside `jit`, `vmap`, `grad`)
        and so has no value yet. Default: False (eager frameworks)."""
        return False

    def callback_result_shape(self, specs: Any) -> Any:
        """The `result_shape` that `custom_root` needs to call a host solver from this
        framework's traced code, built from `specs`, a pytree whose leaves have `shape` and a
        NumPy `dtype`; None when host solvers are called directly (eager frameworks, the
        default). With a result shape, a host solver's outputs must be arrays."""
        return None

    def host_function(self, f: Callable[..., Any], theta: tuple, *, like: Any = None,
                      scalar: bool = False) -> Callable[..., Any]:
        """`f` as a function of NumPy arrays, for SciPy and other host code:
        `h(x, *extra) = to_host(f(x, *extra, *theta))` with `x` and `extra` converted from the
        host (`from_host`, like `like`), the output as float64 NumPy (complex stays complex),
        a Python float when `scalar`. `theta` holds this framework's arrays."""
        def h(x: Any, *extra: Any) -> Any:
            xs = self.from_host(tuple(_host_float(e) for e in (x, *extra)), like=like)
            out = f(*xs, *theta)
            return host_scalar(self.to_host(out)) if scalar else _host_tree(self.to_host(out))

        return h

    def host_derivative(self, f: Callable[..., Any], theta: tuple, kind: str, *,
                        like: Any = None) -> Callable[..., Any] | None:
        """A derivative of `x ↦ f(x, *theta)` as a host function from this framework's autodiff,
        or None when the backend has none (the default: SciPy then uses its own finite
        differences, or the user's derivative).

        `kind` is one of `"value_and_grad"` (`x -> (float, grad)`), `"hessian"` (`x -> H`),
        `"hessp"` (`(x, p) -> H p`), `"jacobian"` (`x -> J`, 2-d), `"derivative"` and
        `"second_derivative"` (scalar `x -> float`, for `root_scalar`). NumPy in, float64
        NumPy out.
        """
        return None

    def synchronize(self, tree: Any) -> None:
        """Wait until the arrays of `tree` are computed and the framework's pending host
        callbacks (diagnostics records) have run: for timing and for reading diagnostics.
        Default: nothing to wait for (eager frameworks)."""
        return None

    def enable_float64(self) -> Any:
        """A context manager inside which this framework makes float64 arrays (JAX's 64-bit
        mode); the setting is restored on exit. Default: a no-op context."""
        import contextlib

        return contextlib.nullcontext()

    def flattens(self, x: Any) -> bool:
        """Whether `x`, neither an array nor a scalar, is a pytree node this backend's
        `tree_flatten` opens (an equinox module under JAX). The registry asks this to find the
        arrays inside such nodes without naming a framework. Default: False."""
        return False

    def __repr__(self) -> str:
        return f"<implicitdiff backend {self.name!r}>"


def is_host_array(x: Any) -> bool:
    """A NumPy array or scalar: the host format, a constant beside another framework's arrays."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, (np.ndarray, np.generic))


def _all_host(tree: Any) -> bool:
    return all(is_host_array(leaf) or isinstance(leaf, (bool, int, float, complex))
               for leaf in _tree.tree_flatten(tree)[0])


def _host_float(a: Any) -> Any:
    """Host data for `from_host`: Python numbers and lists as NumPy arrays."""
    import numpy as np

    return a if is_host_array(a) or hasattr(a, "dtype") else np.asarray(a)


def _host_tree(out: Any) -> Any:
    """NumPy leaves as float64 (complex kept: SciPy's complex step); other leaves unchanged."""
    import numpy as np

    def conv(a: Any) -> Any:
        if isinstance(a, (float, int)) and not isinstance(a, bool):
            return np.asarray(a, dtype=np.float64)
        if not is_host_array(a):
            return a
        a = np.asarray(a)
        return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a

    return _tree.tree_map(conv, out)


def host_scalar(out: Any) -> float:
    """A scalar function's host output (a NumPy array or number of size 1) as a Python float;
    `StructureError` for any other size. What SciPy is handed for `fun`."""
    import numpy as np

    a = np.asarray(out)
    if a.size != 1:
        raise StructureError(f"expected fun to return a scalar, got shape {a.shape}.")
    return float(a.reshape(()))


def convert_constants(bk: Backend, tree: Any, *like_from: Any) -> Any:
    """`tree` with its NumPy arrays converted to `bk`'s framework by `bk.from_host` (constants
    joining the call's arrays), unchanged when it has none that `bk` does not own.

    The dtype and device come from the first floating array of `bk` in `like_from` (default:
    in `tree`), looked up only when there is something to convert (the common call has none)."""
    leaves = _tree.tree_flatten(tree)[0]
    if not any(is_host_array(leaf) and not bk.owns(leaf) for leaf in leaves):
        return tree
    return bk.from_host(tree, like=first_float(bk, *(like_from or (tree,))))


def first_float(bk: Backend, *trees: Any) -> Any:
    """The first floating array of `bk`'s framework (not a NumPy constant) in `trees`, or
    None."""
    for tree in trees:
        for leaf in bk.tree_flatten(tree)[0]:
            if (bk.owns(leaf) and not is_host_array(leaf) and hasattr(leaf, "dtype")
                    and bk.is_float(leaf)):
                return leaf
    return None


def nan_where(bk: Backend, value: Any, ok: Any) -> Any:
    """Replace the entries of every floating leaf of `value` by NaN where `ok` is false.

    `ok` has the batch shape of the problem (a scalar for an unbatched one); it broadcasts
    against the leading dimensions of each leaf.
    """
    leaves, treedef = bk.tree_flatten(value)
    out = []
    for leaf in leaves:
        if not bk.is_float(leaf) or not hasattr(leaf, "dtype"):
            out.append(leaf)
            continue
        xp = bk.namespace(leaf, ok)
        mask = ok
        while mask.ndim < leaf.ndim:
            mask = mask[..., None]
        # made from the leaf, on its device (or sharding): a scalar cannot take a sharded JAX
        # array's device, and arrays of two devices must not meet (array-api-strict)
        nan = xp.full_like(leaf, float("nan"))
        out.append(xp.where(mask, leaf, nan))
    return bk.tree_unflatten(treedef, out)


# ---- the registry ------------------------------------------------------------------------------

def register_backend(name: str, backend: Backend | str, *, framework: str | None = None) -> None:
    """Register a backend for a framework.

    **Arguments:**

    - `name`: the backend's name, as `list_backends()` shows it.
    - `backend`: a `Backend` instance, or `"module:attribute"` naming one, imported on first use.
    - `framework`: the top-level module of the framework (`"cupy"`); the backend is only
      considered once that module is in `sys.modules`. Defaults to `backend.framework`.

    Third-party packages can instead declare an entry point in the `implicitdiff.backends` group,
    `name = "package.module:backend"`, with the entry point's name being the framework module.
    """
    if isinstance(backend, Backend):
        fw = framework or backend.framework
        if not fw:
            raise ImplicitDiffError(
                f"register_backend({name!r}): expected the framework's module name, got none. "
                "Pass framework='modname' or set the backend's `framework` attribute."
            )
        with _lock:
            _table[name] = (fw, backend)
            _loaded[name] = backend
        return
    if not isinstance(backend, str) or ":" not in backend:
        raise ImplicitDiffError(
            f"register_backend({name!r}): expected a Backend instance or 'module:attribute', "
            f"got {backend!r}."
        )
    if not framework:
        raise ImplicitDiffError(
            f"register_backend({name!r}, {backend!r}): expected framework='modname' (the module "
            "whose presence in sys.modules makes this backend eligible), got none."
        )
    with _lock:
        _table[name] = (framework, backend)
        _loaded.pop(name, None)


def _read_entry_points() -> None:
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _table:
            _table[ep.name] = (ep.name, ep.value)


def list_backends() -> dict[str, bool]:
    """The registered backends, each mapped to whether its framework is imported right now."""
    _read_entry_points()
    return {name: fw in sys.modules for name, (fw, _) in _table.items()}


def _load(name: str) -> Backend:
    if name in _loaded:
        return _loaded[name]
    _, spec = _table[name]
    if isinstance(spec, Backend):
        bk = spec
    else:
        mod, _, attr = spec.partition(":")
        try:
            bk = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise BackendNotFoundError(
                f"backend {name!r}: expected module {mod!r} to be importable, got {e}. "
                "Reinstall implicitdiff or the package that registered this backend."
            ) from e
    _loaded[name] = bk
    return bk


def _candidates(failures: list[str]) -> Iterator[Backend]:
    # Lazily, in table order: a leaf found by an earlier backend (numpy first) never loads a
    # later one, and a backend that cannot load is skipped (its error kept in `failures`), so
    # one broken backend does not break the others.
    _read_entry_points()
    for name, (fw, _) in list(_table.items()):
        if fw in sys.modules:
            try:
                bk = _load(name)
            except BackendNotFoundError as e:
                failures.append(str(e))
                continue
            yield bk


def backend_of_leaf(x: Any) -> Backend | None:
    """The backend owning one leaf; None for Python scalars and None."""
    if x is None or isinstance(x, (bool, int, float, complex)):
        return None
    failures: list[str] = []
    for bk in _candidates(failures):
        if bk.owns(x):
            return bk
    raise BackendNotFoundError(
        f"expected arrays of a registered framework ({', '.join(list_backends())}), got an "
        f"object of type {type(x).__module__}.{type(x).__qualname__}. Convert it to a NumPy, JAX "
        "or PyTorch array, or register a backend for it with idf.register_backend."
        + "".join(f" Also: {f}" for f in failures)
    )


def find_backend(*trees: Any) -> Backend | None:
    """Like `get_backend`, but None when the trees hold no arrays (only Python scalars).

    NumPy arrays beside the arrays of one other framework are that framework's constants: the
    other framework's backend is returned (the caller converts them with `convert_constants`),
    provided that backend can take them in (it implements `Backend.from_host`). Arrays of two
    frameworks other than NumPy raise `BackendNotFoundError`."""
    found: dict[str, tuple[Backend, str]] = {}
    host: dict[str, tuple[Backend, str]] = {}  # the backend owning NumPy arrays, if any
    for i, tree in enumerate(trees):
        for path, leaf in _generic_paths(tree, f"arg{i}"):
            if is_host_array(leaf):
                if not host:
                    bk = backend_of_leaf(leaf)
                    if bk is not None:
                        host[bk.name] = (bk, path)
                        found.setdefault(bk.name, (bk, path))  # order of first appearance
                continue
            bk = backend_of_leaf(leaf)
            if bk is not None and bk.name not in found:
                found[bk.name] = (bk, path)
    others = [name for name in found if name not in host]
    if len(others) == 1 and takes_constants(found[others[0]][0]):
        return found[others[0]][0]
    if len(found) > 1:
        desc = ", ".join(f"{name} at {path}" for name, (_, path) in found.items())
        raise BackendNotFoundError(
            f"expected the arrays of one framework in a call, got several: {desc}. Convert them "
            "to one framework first. (NumPy arrays may join the arrays of one framework as its "
            "constants when that framework's backend implements from_host.)"
        )
    return next(iter(found.values()))[0] if found else None


def takes_constants(bk: Backend) -> bool:
    """Whether `bk` converts NumPy arrays passed beside its own (it overrides `from_host`)."""
    return type(bk).from_host is not Backend.from_host


def get_backend(*trees: Any) -> Backend:
    """The backend for the arrays in `trees`.

    **Arguments:**

    - `trees`: pytrees of arrays (and Python scalars, which fit any backend).

    **Returns:** the `Backend` owning the arrays; the NumPy reference when there are only Python
    scalars. Raises `BackendNotFoundError` for an unknown array type or a mix of frameworks.
    """
    bk = find_backend(*trees)
    return bk if bk is not None else _load("numpy")


def _generic_paths(tree: Any, prefix: str) -> list[tuple[str, Any]]:
    # The core's pytree first. Only a leaf that is neither a scalar nor an array may be a node
    # of a framework's own pytrees (an equinox module, ...): then the loaded backends are asked
    # (`Backend.flattens`) and the first that opens it flattens the whole tree. (Tensors and
    # NumPy arrays never reach a framework's tree utilities, which torch.compile cannot trace.)
    paths = _tree.tree_leaves_with_path(tree, prefix)
    odd = [leaf for _, leaf in paths if not _plain_leaf(leaf)]
    if odd:
        for bk in _candidates([]):
            if any(bk.flattens(leaf) for leaf in odd):
                return bk.tree_leaves_with_path(tree, prefix)
    return paths


def backend_module(name: str) -> Any:
    """The module of the registered backend `name` (`implicitdiff_jax` for `"jax"`), imported
    (which imports its framework); None for an unknown name or a backend registered as an
    instance."""
    _read_entry_points()
    entry = _table.get(name)
    if entry is None or not isinstance(entry[1], str):
        return None
    return importlib.import_module(entry[1].partition(":")[0])


def backend_named(name: str) -> Backend:
    """The registered backend `name` (or the backend of the framework module `name`), importing
    its framework first: for callers that name a framework on purpose (the command line, the
    gallery's example arguments). Raises `BackendNotFoundError` for an unknown name."""
    _read_entry_points()
    if name not in _table:
        by_framework = [n for n, (fw, _) in _table.items() if fw == name]
        if not by_framework:
            raise BackendNotFoundError(
                f"expected the name of a registered backend ({', '.join(_table)}), got "
                f"{name!r}."
            )
        name = by_framework[0]
    importlib.import_module(_table[name][0])
    return _load(name)


def backend_names() -> list[str]:
    """The registered backends' names, built-ins first (the NumPy reference first of all)."""
    _read_entry_points()
    return list(_table)


def _plain_leaf(x: Any) -> bool:
    """A scalar, a string or an array (anything with a dtype and a shape): not a pytree node."""
    return x is None or isinstance(x, (bool, int, float, complex, str)) or (
        hasattr(x, "dtype") and hasattr(x, "shape"))
