"""The reference linearization and transforms, for backends whose framework has no autodiff.

Written once against the array API (through the backend's `namespace`): the NumPy reference and
the array-api-strict backend both use it. Products with $\\partial_x F$ and
$\\partial_\\theta F$ come, in this order of preference, from user-supplied `idf.Derivatives`,
the complex step (exact to rounding for an `F` written with complex-safe operations), then
central differences; a probe in a random direction decides between the last two once per point.
Transposed products build the Jacobian column by column. Which source served is in
`Linearization.method` and in the diagnostics.

A backend built on it subclasses `ReferenceBackend` and provides `name`, `framework`, `owns`
(and, where the defaults do not fit, `is_float`, `namespace`, `ring_write`, ...).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _tree
from ._array import CENTRAL_DIFFERENCE, COMPLEX_STEP
from ._array import device as _device
from ._backend import Backend, Linearization
from ._errors import StructureError
from ._ift import implicit_jvp, implicit_vjp, ravel
from ._root import ImplicitFunction
from ._tags import symmetric

_CD_REL = 1e-6  # agreement required between complex step and central differences


def _shape(leaf: Any) -> tuple:
    return tuple(getattr(leaf, "shape", ()))


def _size(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _maxabs(xp: Any, tree: Any) -> float:
    """The largest absolute entry of the numeric leaves of `tree` (booleans and None skipped:
    a boolean is at most 1, below every scale this is compared with)."""
    out = 0.0
    for v in _tree.tree_flatten(tree)[0]:
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out = max(out, abs(float(v)))
            continue
        a = xp.asarray(v)
        if a.dtype == xp.bool or not _size(_shape(a)):
            continue
        out = max(out, float(xp.max(xp.abs(a))))
    return out


def _is_complex(xp: Any, v: Any) -> bool:
    dtype = getattr(v, "dtype", None)
    if dtype is None:
        return isinstance(v, complex)
    return bool(xp.isdtype(dtype, "complex floating"))


def _basis(xp: Any, j: int, size: int, dtype: Any, device: Any) -> Any:
    """The unit vector $e_j$ of length `size`."""
    return xp.astype(xp.arange(size, device=device) == j, dtype)


class ReferenceLinearization(Linearization):
    """Products with the Jacobians of `F` at `(x, args)` without autodiff.

    `backend` is the backend of the arrays: its namespace does the arithmetic and its
    `is_float` decides which leaves of `args` get a derivative.
    """

    def __init__(self, backend: ReferenceBackend, F: Callable[..., Any], x: Any, args: tuple, *,
                 derivatives: Any = None, tags: frozenset = frozenset(),
                 argnums: Sequence[int] | None = None):
        self.bk = backend
        self.F, self.x, self.args = F, x, args
        # the arguments derivatives are wanted for: the probe of ∂F/∂θ perturbs only those
        self.argnums = tuple(range(len(args))) if argnums is None else tuple(argnums)
        self._complex_x = False  # whether F needs a complex x when only θ is complex
        self.d = derivatives
        self.tags = tags
        self.x_leaves, self.x_def = _tree.tree_flatten(x)
        self.xp = backend.namespace(*self.x_leaves)
        self.device = _device(self.x_leaves[0])
        self._Fx = None
        self._jac_x: Any = None
        self.x_method = "user" if derivatives is not None and derivatives.jvp_x else None
        self.args_method = ("user" if derivatives is not None and
                            (derivatives.jvp_args or derivatives.vjp_args) else None)

    # ---- where the products come from ------------------------------------------------------
    @property
    def method(self) -> str:  # type: ignore[override]
        # Both rules use B (JVP, before the solve) or Bᵀ (VJP, after it, so after the record of
        # the solve): settle its source now so that a VJP's record names it too.
        self._resolve("args")
        xm = self.x_method or "not needed"
        am = self.args_method or "not needed"
        return xm if xm == am else f"x: {xm}; θ: {am}"

    def _F0(self) -> Any:
        if self._Fx is None:
            self._Fx = self.F(self.x, *self.args)
        return self._Fx

    def _as(self, v: Any, dtype: Any, shape: tuple) -> Any:
        """`v` (an array, or a Python or NumPy scalar) as an array of `dtype` and `shape`."""
        xp = self.xp
        return xp.reshape(xp.astype(xp.asarray(v, device=self.device), dtype, copy=False),
                          shape)

    def _cast_like_x(self, tree: Any) -> Any:
        leaves = _tree.tree_flatten(tree)[0]
        return _tree.tree_unflatten(
            self.x_def, [self._as(v, x.dtype, _shape(x)) for v, x in zip(leaves, self.x_leaves)])

    def _zeros_like_x(self) -> Any:
        return _tree.tree_map(self.xp.zeros_like, self.x)

    def _cs(self, xdir: Any, adir: tuple | None) -> Any | None:
        """Complex-step derivative of F along (xdir, adir); None where F is not complex-safe."""
        xp = self.xp
        scale = max(_maxabs(xp, xdir) if xdir is not None else 0.0,
                    _maxabs(xp, adir) if adir is not None else 0.0)
        if scale == 0.0:
            return self._zeros_like_x()
        h = COMPLEX_STEP / scale
        args = self.args if adir is None else _perturb_args(self.args, adir, 1j * h)
        if xdir is not None:
            out = self._eval_complex(_tree.tree_map(
                lambda a, v: xp.astype(a, xp.complex128) + 1j * h * v, self.x, xdir), args)
        else:
            # Only θ moves: try the real x (cheaper: real-by-complex products stay small);
            # an F that needs one dtype throughout (a fixed point's T - x) gets a complex x.
            out = None if self._complex_x else self._eval_complex(self.x, args)
            if out is None:
                out = self._eval_complex(
                    _tree.tree_map(lambda a: xp.astype(a, xp.complex128), self.x), args)
                self._complex_x = out is not None
        if out is None:
            return None
        return self._cast_like_x(_tree.tree_map(lambda v: xp.imag(v) / h, out))

    def _eval_complex(self, xs: Any, args: tuple) -> Any | None:
        """F at complex inputs; None if F fails there or drops the imaginary part."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", np.exceptions.ComplexWarning)
                out = self.F(xs, *args)
        except (TypeError, ValueError, np.exceptions.ComplexWarning):
            return None
        leaves = _tree.tree_flatten(out)[0]
        if not all(_is_complex(self.xp, v) for v in leaves):
            return None
        return out

    def _cd(self, xdir: Any, adir: tuple | None) -> Any:
        """Central differences of F along (xdir, adir)."""
        xp = self.xp
        scale = max(_maxabs(xp, xdir) if xdir is not None else 0.0,
                    _maxabs(xp, adir) if adir is not None else 0.0)
        if scale == 0.0:
            return self._zeros_like_x()
        ref = max(1.0, _maxabs(xp, self.x), _maxabs(xp, self.args) if adir is not None else 0.0)
        h = CENTRAL_DIFFERENCE * ref / scale

        def at(s: float) -> Any:
            xs = self.x if xdir is None else _tree.tree_map(
                lambda a, v: xp.astype(a, xp.float64) + s * v, self.x, xdir)
            args = self.args if adir is None else _perturb_args(self.args, adir, s)
            return self.F(xs, *args)

        def f64(v: Any) -> Any:
            return xp.astype(xp.asarray(v, device=self.device), xp.float64, copy=False)

        fp, fm = at(h), at(-h)
        return self._cast_like_x(
            _tree.tree_map(lambda p, m: (f64(p) - f64(m)) / (2 * h), fp, fm))

    def _probe(self, xdir: Any, adir: tuple | None) -> str:
        """Decide between complex step and central differences by trying both once."""
        cs = self._cs(xdir, adir)
        if cs is None:
            return "central-difference"
        cd = self._cd(xdir, adir)
        diff = _maxabs(self.xp, _tree.tree_map(lambda a, b: a - b, cs, cd))
        size = max(_maxabs(self.xp, cs), _maxabs(self.xp, cd), 1e-300)
        return "complex-step" if diff <= _CD_REL * size + 1e-12 else "central-difference"

    def _normal(self, rng: np.random.Generator, shape: tuple) -> Any:
        """Standard normal entries (float64) drawn on the host, as an array of the namespace."""
        return self.xp.asarray(rng.standard_normal(shape), device=self.device)

    def _resolve(self, which: str) -> str:
        """The source of products with ∂F/∂x (`which` "x") or ∂F/∂θ ("args"), probed once."""
        attr = "x_method" if which == "x" else "args_method"
        if getattr(self, attr) is None:
            rng = np.random.default_rng(0)
            if which == "x":
                probe_x = _tree.tree_map(lambda a: self._normal(rng, _shape(a)), self.x)
                setattr(self, attr, self._probe(probe_x, None))
            else:
                probe_a = self._random_arg_dir(rng)
                setattr(self, attr, self._probe(None, probe_a))
        return getattr(self, attr)

    def _directional(self, which: str, xdir: Any, adir: tuple | None) -> Any:
        attr = "x_method" if which == "x" else "args_method"
        if self._resolve(which) == "complex-step":
            out = self._cs(xdir, adir)
            if out is not None:
                return out
            setattr(self, attr, "central-difference")
        return self._cd(xdir, adir)

    # ---- products ----------------------------------------------------------------------------
    def A(self, v: Any) -> Any:
        if self.d is not None and self.d.jvp_x is not None:
            return self._cast_like_x(self.d.jvp_x(v, self.x, *self.args))
        if self._jac_x is not None:
            flat, unravel = ravel(self.bk, v)
            return unravel(self._jac_x @ flat)
        return self._directional("x", v, None)

    def jac_x(self) -> Any:
        """The dense $\\partial_x F$ on raveled x (cached)."""
        if self._jac_x is None:
            flat, unravel = ravel(self.bk, self.x)
            n = flat.shape[0]
            cols = [ravel(self.bk, self.A(unravel(_basis(self.xp, j, n, flat.dtype,
                                                               self.device))))[0]
                    for j in range(n)]
            self._jac_x = self.xp.stack(cols, axis=1)
        return self._jac_x

    def AT(self, u: Any) -> Any:
        if self.d is not None and self.d.vjp_x is not None:
            return self._cast_like_x(self.d.vjp_x(u, self.x, *self.args))
        if symmetric in self.tags:
            return self.A(u)
        flat, unravel = ravel(self.bk, u)
        return unravel(self.xp.matrix_transpose(self.jac_x()) @ flat)

    def B(self, args_dot: tuple) -> Any:
        if self.d is not None and self.d.jvp_args is not None:
            return self._cast_like_x(self.d.jvp_args(tuple(args_dot), self.x, *self.args))
        adir = self._float_dirs(args_dot)
        return self._directional("args", None, adir)

    def BT(self, u: Any, argnums: Sequence[int] | None = None) -> tuple:
        xp, bk = self.xp, self.bk
        wanted = range(len(self.args)) if argnums is None else argnums
        if self.d is not None and self.d.vjp_args is not None:
            full = tuple(self.d.vjp_args(u, self.x, *self.args))
            return tuple(self._grad_like(a, g) if i in wanted else None
                         for i, (a, g) in enumerate(zip(self.args, full)))
        uflat = ravel(bk, u)[0]
        out = []
        for i, arg in enumerate(self.args):
            if i not in wanted:
                out.append(None)
                continue
            leaves, treedef = _tree.tree_flatten(arg)
            grads = []
            for k, leaf in enumerate(leaves):
                if not bk.is_float(leaf):
                    grads.append(None)
                    continue
                shape = _shape(leaf)
                entries = []
                for j in range(_size(shape)):
                    e = xp.reshape(_basis(xp, j, _size(shape), xp.float64, self.device), shape)
                    leaf_dirs: list[Any] = [None] * len(leaves)
                    leaf_dirs[k] = e
                    if self.d is not None and self.d.jvp_args is not None:
                        # the user's JVP in θ, one basis direction at a time (zeros elsewhere)
                        leaf_dirs = [e if m == k else self._zero_tangent(lf)
                                     for m, lf in enumerate(leaves)]
                        t = tuple(_tree.tree_unflatten(treedef, leaf_dirs) if m == i else
                                  _tree.tree_map(self._zero_tangent, a)
                                  for m, a in enumerate(self.args))
                        col = ravel(bk, self.B(t))[0]
                    else:
                        adir = tuple(_tree.tree_unflatten(treedef, leaf_dirs) if m == i
                                     else None for m in range(len(self.args)))
                        col = ravel(bk, self._directional("args", None, adir))[0]
                    entries.append(col @ uflat)
                dtype = getattr(leaf, "dtype", xp.float64)
                wide = xp.result_type(dtype, xp.float64)
                g = (xp.reshape(xp.astype(xp.stack(entries), wide), shape) if entries else
                     xp.zeros(shape, dtype=wide, device=self.device))
                grads.append(bk.scalar_cotangent(g) if type(leaf) is float else
                             xp.astype(g, dtype, copy=False))
            out.append(_tree.tree_unflatten(treedef, grads))
        return tuple(out)

    # ---- directions in θ ---------------------------------------------------------------------
    def _zero_tangent(self, leaf: Any) -> Any:
        return (self.xp.zeros(_shape(leaf), dtype=self.xp.float64, device=self.device)
                if self.bk.is_float(leaf) else None)

    def _grad_like(self, arg: Any, g: Any) -> Any:
        leaves, treedef = _tree.tree_flatten(arg)
        gl = _tree.tree_flatten(g)[0] if g is not None else [None] * len(leaves)
        return _tree.tree_unflatten(treedef, [
            (self._as(gg, getattr(a, "dtype", self.xp.float64), _shape(a))
             if self.bk.is_float(a) and gg is not None else None) for a, gg in zip(leaves, gl)])

    def _float_dirs(self, args_dot: tuple) -> tuple:
        """Tangent directions for the floating leaves of args (None elsewhere)."""
        out = []
        for a, t in zip(self.args, args_dot):
            if t is None:
                out.append(None)
                continue
            al, adef = _tree.tree_flatten(a)
            tl = _tree.tree_flatten(t)[0]
            out.append(_tree.tree_unflatten(adef, [
                self._as(tt, self.xp.float64, _shape(tt))
                if self.bk.is_float(aa) and tt is not None else None
                for aa, tt in zip(al, tl)]))
        return tuple(out)

    def _random_arg_dir(self, rng: np.random.Generator) -> tuple:
        out: list[Any] = []
        for i, a in enumerate(self.args):
            if i not in self.argnums:
                out.append(None)
                continue
            al, adef = _tree.tree_flatten(a)
            out.append(_tree.tree_unflatten(adef, [
                self._normal(rng, _shape(aa)) if self.bk.is_float(aa) else None for aa in al]))
        return tuple(out)


def _perturb_args(args: tuple, adir: tuple, step: complex | float) -> tuple:
    out = []
    for a, d in zip(args, adir):
        if d is None:
            out.append(a)
            continue
        al, adef = _tree.tree_flatten(a)
        # None inside d flattens to nothing: realign by position among floating leaves.
        dl_full = _realign(al, d)
        out.append(_tree.tree_unflatten(adef, [
            aa if dd is None else (aa + step * dd) for aa, dd in zip(al, dl_full)]))
    return tuple(out)


def _realign(leaves: list, d: Any) -> list:
    """The direction's leaves aligned with `leaves` (None-valued leaves vanish on flattening)."""
    def walk(tree: Any) -> list:
        node = _tree._children(tree)
        if node is None:
            return [tree]
        kind, _, kids = node
        if kind == "none":
            return [None]
        return [y for k in kids for y in walk(k)]

    full = walk(d)
    if len(full) != len(leaves):  # pragma: no cover - guarded by _float_dirs
        raise StructureError("direction does not match the arguments' structure")
    return full


class ReferenceBackend(Backend):
    """A backend for a framework without autodiff: `ReferenceLinearization` for the products,
    and `jvp`/`vjp`/`jacobian` that apply the implicit rule of a decorated solver.

    Subclasses set `name`, `framework`, `owns`, and `display_name` (the framework's name in
    messages).
    """

    display_name: str = ""
    linearization_class: type[ReferenceLinearization] = ReferenceLinearization

    def scalar_cotangent(self, g: Any) -> Any:
        """The cotangent of a Python float argument, from the 0-d array `g`."""
        return g

    def linearize(self, F, x, args, *, derivatives=None, tags=frozenset(), argnums=None):
        return self.linearization_class(self, F, x, tuple(args), derivatives=derivatives,
                                        tags=tags, argnums=argnums)

    def call(self, fn: ImplicitFunction, args: tuple, options: dict) -> Any:
        x, aux = fn.run_solver(args, options)
        x = fn.check(self, x, args)
        return (x, aux) if fn.has_aux else x

    # ---- transforms (the implicit rule of a decorated solver) ------------------------------
    def _need_implicit(self, f: Any, what: str) -> tuple[ImplicitFunction, dict]:
        """The decorated solver and its keyword options; `functools.partial(solver, tol=...)`
        (keywords only) passes options."""
        options: dict = {}
        if isinstance(f, functools.partial) and not f.args and isinstance(f.func,
                                                                          ImplicitFunction):
            f, options = f.func, dict(f.keywords)
        if not isinstance(f, ImplicitFunction):
            fw = self.display_name or self.framework
            raise TypeError(
                f"idf.{what} with {fw} arrays: expected a solver decorated with "
                f"idf.custom_root or idf.custom_fixed_point, got {f!r}. {fw} has no autodiff, "
                f"so compositions cannot be differentiated here; call idf.{what} on the decorated "
                "solver and apply the chain rule yourself, or pass JAX/PyTorch arrays."
            )
        return f, options

    def _rule_kwargs(self, f: ImplicitFunction) -> dict:
        return dict(solve=f.solve, tags=f.tags, derivatives=f.derivatives,
                    on_failure=f.on_failure, backend=self, name=f.name,
                    batch_dims=f.batch_dims)

    def _primal(self, f: ImplicitFunction, primals: tuple, options: dict) -> tuple[Any, Any]:
        x, aux = f.run_solver(primals, options)
        return f.check(self, x, primals), aux

    def jvp(self, f, primals, tangents):
        f, options = self._need_implicit(f, "jvp")
        x, aux = self._primal(f, primals, options)
        x_dot = implicit_jvp(f.F, x, primals, tangents, **self._rule_kwargs(f))
        return ((x, aux), (x_dot, None)) if f.has_aux else (x, x_dot)

    def vjp(self, f, primals, argnums):
        f, options = self._need_implicit(f, "vjp")
        x, aux = self._primal(f, primals, options)
        lin = self.linearize(f.F, x, primals, derivatives=f.derivatives, tags=f.tags,
                             argnums=argnums)

        def vjp_fn(cotangent: Any) -> tuple:
            return implicit_vjp(f.F, x, primals, cotangent, argnums=argnums, linearization=lin,
                                **self._rule_kwargs(f))

        return ((x, aux) if f.has_aux else x), vjp_fn

    def jacobian(self, f, primals, argnums):
        f, options = self._need_implicit(f, "jacobian")
        if not -len(primals) <= argnums < len(primals):
            raise StructureError(f"jacobian: argnums {argnums} out of range for "
                                 f"{len(primals)} primals.")
        arg = primals[argnums]
        if not self.is_float(arg):
            raise StructureError(
                f"jacobian: expected argument {argnums} to be a floating array or float, got "
                f"{type(arg).__name__}. For pytree arguments use idf.jvp/idf.vjp."
            )
        x, _ = self._primal(f, primals, options)
        lin = self.linearize(f.F, x, primals, derivatives=f.derivatives, tags=f.tags,
                             argnums=(argnums % len(primals),))
        if f.derivatives is None or f.derivatives.jvp_x is None:
            lin.jac_x()  # many solves with one A: build it once (n products), not per solve
        xp, dev = lin.xp, lin.device
        shape = _shape(arg)
        p = _size(shape)
        xflat, unravel = ravel(self, x)
        n = xflat.shape[0]
        kw = self._rule_kwargs(f)
        if p <= n:
            cols = []
            for j in range(p):
                e = xp.reshape(_basis(xp, j, p, xp.float64, dev), shape)
                t = tuple(e if i == argnums % len(primals) else None
                          for i in range(len(primals)))
                cols.append(ravel(self, implicit_jvp(f.F, x, primals, t, linearization=lin,
                                                     **kw))[0])
            J = xp.stack(cols, axis=-1)  # (n, p)
        else:
            rows = []
            for i in range(n):
                e = _basis(xp, i, n, xflat.dtype, dev)
                g = implicit_vjp(f.F, x, primals, unravel(e), argnums=(argnums,),
                                 linearization=lin, **kw)[argnums]
                rows.append(xp.reshape(xp.asarray(g, device=dev), (-1,)))
            J = xp.stack(rows, axis=0)
        xl, xdef = _tree.tree_flatten(x)
        out, start = [], 0
        for leaf in xl:
            size = _size(_shape(leaf))
            out.append(xp.reshape(J[start:start + size, ...], _shape(leaf) + shape))
            start += size
        return _tree.tree_unflatten(xdef, out)
