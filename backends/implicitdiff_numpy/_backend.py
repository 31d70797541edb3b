"""NumPy reference backend: dense Jacobians, explicit jvp/vjp, no autodiff."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from implicitdiff import _tree
from implicitdiff._backend import Backend, Linearization
from implicitdiff._errors import StructureError
from implicitdiff._ift import implicit_jvp, implicit_vjp, ravel
from implicitdiff._root import ImplicitFunction
from implicitdiff._tags import symmetric

_CS_H = 1e-30  # complex-step size, relative to the largest entry of the direction
_CD_REL = 1e-6  # agreement required between complex step and central differences


def _is_float_leaf(leaf: Any) -> bool:
    if isinstance(leaf, bool) or isinstance(leaf, (int, np.integer)):
        return False
    if type(leaf) is float:
        return True
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and np.issubdtype(dtype, np.floating)


def _maxabs(tree: Any) -> float:
    leaves = [np.asarray(v) for v in _tree.tree_flatten(tree)[0] if v is not None]
    return max((float(np.max(np.abs(v))) for v in leaves if v.size), default=0.0)


class NumpyLinearization(Linearization):
    """Products with the Jacobians of `F` at `(x, args)` without autodiff."""

    def __init__(self, F: Callable[..., Any], x: Any, args: tuple, *, derivatives: Any = None,
                 tags: frozenset = frozenset(), argnums: Sequence[int] | None = None):
        self.F, self.x, self.args = F, x, args
        # the arguments derivatives are wanted for: the probe of ∂F/∂θ perturbs only those
        self.argnums = tuple(range(len(args))) if argnums is None else tuple(argnums)
        self._complex_x = False  # whether F needs a complex x when only θ is complex
        self.d = derivatives
        self.tags = tags
        self.x_leaves, self.x_def = _tree.tree_flatten(x)
        self._Fx = None
        self._jac_x: np.ndarray | None = None
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

    def _cast_like_x(self, tree: Any) -> Any:
        leaves = _tree.tree_flatten(tree)[0]
        return _tree.tree_unflatten(
            self.x_def, [np.asarray(v, dtype=x.dtype).reshape(np.shape(x))
                         for v, x in zip(leaves, self.x_leaves)])

    def _cs(self, xdir: Any, adir: tuple | None) -> Any | None:
        """Complex-step derivative of F along (xdir, adir); None where F is not complex-safe."""
        scale = max(_maxabs(xdir) if xdir is not None else 0.0,
                    _maxabs(adir) if adir is not None else 0.0)
        if scale == 0.0:
            return _tree.tree_map(np.zeros_like, self.x)
        h = _CS_H / scale
        args = self.args if adir is None else _perturb_args(self.args, adir, 1j * h)
        if xdir is not None:
            out = self._eval_complex(_tree.tree_map(
                lambda a, v: a.astype(np.complex128) + 1j * h * v, self.x, xdir), args)
        else:
            # Only θ moves: try the real x (cheaper: real-by-complex products stay small);
            # an F that needs one dtype throughout (a fixed point's T - x) gets a complex x.
            out = None if self._complex_x else self._eval_complex(self.x, args)
            if out is None:
                out = self._eval_complex(
                    _tree.tree_map(lambda a: a.astype(np.complex128), self.x), args)
                self._complex_x = out is not None
        if out is None:
            return None
        return self._cast_like_x(_tree.tree_map(lambda v: np.imag(v) / h, out))

    def _eval_complex(self, xs: Any, args: tuple) -> Any | None:
        """F at complex inputs; None if F fails there or drops the imaginary part."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", np.exceptions.ComplexWarning)
                out = self.F(xs, *args)
        except (TypeError, ValueError, np.exceptions.ComplexWarning):
            return None
        leaves = _tree.tree_flatten(out)[0]
        if not all(np.iscomplexobj(v) for v in leaves):
            return None
        return out

    def _cd(self, xdir: Any, adir: tuple | None) -> Any:
        """Central differences of F along (xdir, adir)."""
        scale = max(_maxabs(xdir) if xdir is not None else 0.0,
                    _maxabs(adir) if adir is not None else 0.0)
        if scale == 0.0:
            return _tree.tree_map(np.zeros_like, self.x)
        ref = max(1.0, _maxabs(self.x), _maxabs(self.args) if adir is not None else 0.0)
        h = np.finfo(np.float64).eps ** (1 / 3) * ref / scale

        def at(s: float) -> Any:
            xs = self.x if xdir is None else _tree.tree_map(
                lambda a, v: a.astype(np.float64) + s * v, self.x, xdir)
            args = self.args if adir is None else _perturb_args(self.args, adir, s)
            return self.F(xs, *args)

        fp, fm = at(h), at(-h)
        return self._cast_like_x(
            _tree.tree_map(lambda p, m: (np.asarray(p, np.float64) - np.asarray(m, np.float64))
                           / (2 * h), fp, fm))

    def _probe(self, xdir: Any, adir: tuple | None) -> str:
        """Decide between complex step and central differences by trying both once."""
        cs = self._cs(xdir, adir)
        if cs is None:
            return "central-difference"
        cd = self._cd(xdir, adir)
        diff = _maxabs(_tree.tree_map(lambda a, b: a - b, cs, cd))
        size = max(_maxabs(cs), _maxabs(cd), 1e-300)
        return "complex-step" if diff <= _CD_REL * size + 1e-12 else "central-difference"

    def _resolve(self, which: str) -> str:
        """The source of products with ∂F/∂x (`which` "x") or ∂F/∂θ ("args"), probed once."""
        attr = "x_method" if which == "x" else "args_method"
        if getattr(self, attr) is None:
            rng = np.random.default_rng(0)
            if which == "x":
                probe_x = _tree.tree_map(lambda a: rng.standard_normal(np.shape(a)), self.x)
                setattr(self, attr, self._probe(probe_x, None))
            else:
                probe_a = _random_arg_dir(self.args, rng, self.argnums)
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
            flat, unravel = ravel(backend, v)
            return unravel(self._jac_x @ flat)
        return self._directional("x", v, None)

    def jac_x(self) -> np.ndarray:
        """The dense $\\partial_x F$ on raveled x (cached)."""
        if self._jac_x is None:
            flat, unravel = ravel(backend, self.x)
            n = flat.shape[0]
            cols = [ravel(backend, self.A(unravel(np.eye(n, dtype=flat.dtype)[j])))[0]
                    for j in range(n)]
            self._jac_x = np.stack(cols, axis=1)
        return self._jac_x

    def AT(self, u: Any) -> Any:
        if self.d is not None and self.d.vjp_x is not None:
            return self._cast_like_x(self.d.vjp_x(u, self.x, *self.args))
        if symmetric in self.tags:
            return self.A(u)
        flat, unravel = ravel(backend, u)
        return unravel(self.jac_x().T @ flat)

    def B(self, args_dot: tuple) -> Any:
        if self.d is not None and self.d.jvp_args is not None:
            return self._cast_like_x(self.d.jvp_args(tuple(args_dot), self.x, *self.args))
        adir = _float_dirs(self.args, args_dot)
        return self._directional("args", None, adir)

    def BT(self, u: Any, argnums: Sequence[int] | None = None) -> tuple:
        wanted = range(len(self.args)) if argnums is None else argnums
        if self.d is not None and self.d.vjp_args is not None:
            full = tuple(self.d.vjp_args(u, self.x, *self.args))
            return tuple(_grad_like(a, g) if i in wanted else None
                         for i, (a, g) in enumerate(zip(self.args, full)))
        uflat = ravel(backend, u)[0]
        out = []
        for i, arg in enumerate(self.args):
            if i not in wanted:
                out.append(None)
                continue
            leaves, treedef = _tree.tree_flatten(arg)
            grads = []
            for k, leaf in enumerate(leaves):
                if not _is_float_leaf(leaf):
                    grads.append(None)
                    continue
                g = np.zeros(np.shape(leaf), dtype=np.result_type(leaf, np.float64))
                gflat = g.reshape(-1)
                for j in range(gflat.size):
                    e = np.zeros(np.shape(leaf))
                    e.reshape(-1)[j] = 1.0
                    leaf_dirs: list[Any] = [None] * len(leaves)
                    leaf_dirs[k] = e
                    if self.d is not None and self.d.jvp_args is not None:
                        # the user's JVP in θ, one basis direction at a time (zeros elsewhere)
                        leaf_dirs = [e if m == k else (np.zeros(np.shape(lf)) if
                                                       _is_float_leaf(lf) else None)
                                     for m, lf in enumerate(leaves)]
                        t = tuple(_tree.tree_unflatten(treedef, leaf_dirs) if m == i else
                                  _tree.tree_map(_zero_tangent, a)
                                  for m, a in enumerate(self.args))
                        col = ravel(backend, self.B(t))[0]
                    else:
                        adir = tuple(_tree.tree_unflatten(treedef, leaf_dirs) if m == i
                                     else None for m in range(len(self.args)))
                        col = ravel(backend, self._directional("args", None, adir))[0]
                    gflat[j] = col @ uflat
                grads.append(np.float64(g) if type(leaf) is float else
                             g.astype(getattr(leaf, "dtype", np.float64)))
            out.append(_tree.tree_unflatten(treedef, grads))
        return tuple(out)


def _zero_tangent(leaf: Any) -> Any:
    return np.zeros(np.shape(leaf)) if _is_float_leaf(leaf) else None


def _grad_like(arg: Any, g: Any) -> Any:
    leaves, treedef = _tree.tree_flatten(arg)
    gl = _tree.tree_flatten(g)[0] if g is not None else [None] * len(leaves)
    return _tree.tree_unflatten(treedef, [
        (np.asarray(gg, dtype=getattr(a, "dtype", np.float64)).reshape(np.shape(a))
         if _is_float_leaf(a) and gg is not None else None) for a, gg in zip(leaves, gl)])


def _float_dirs(args: tuple, args_dot: tuple) -> tuple:
    """Tangent directions for the floating leaves of args (None elsewhere)."""
    out = []
    for a, t in zip(args, args_dot):
        if t is None:
            out.append(None)
            continue
        al, adef = _tree.tree_flatten(a)
        tl = _tree.tree_flatten(t)[0]
        out.append(_tree.tree_unflatten(adef, [
            np.asarray(tt, dtype=np.float64) if _is_float_leaf(aa) and tt is not None else None
            for aa, tt in zip(al, tl)]))
    return tuple(out)


def _random_arg_dir(args: tuple, rng: np.random.Generator, argnums: Sequence[int]) -> tuple:
    out: list[Any] = []
    for i, a in enumerate(args):
        if i not in argnums:
            out.append(None)
            continue
        al, adef = _tree.tree_flatten(a)
        out.append(_tree.tree_unflatten(adef, [
            rng.standard_normal(np.shape(aa)) if _is_float_leaf(aa) else None for aa in al]))
    return tuple(out)


def _perturb_args(args: tuple, adir: tuple, step: complex | float) -> tuple:
    out = []
    for a, d in zip(args, adir):
        if d is None:
            out.append(a)
            continue
        al, adef = _tree.tree_flatten(a)
        dl = _tree.tree_flatten(d)[0] if d is not None else [None] * len(al)
        # None inside d flattens to nothing: realign by position among floating leaves.
        dl_full = _realign(al, d)
        out.append(_tree.tree_unflatten(adef, [
            aa if dd is None else (aa + step * dd) for aa, dd in zip(al, dl_full)]))
        del dl
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


class NumpyBackend(Backend):
    """The reference backend for NumPy arrays (and Python scalars)."""

    name = "numpy"
    framework = "numpy"
    linalg_errors = (np.linalg.LinAlgError,)

    def owns(self, x: Any) -> bool:
        return isinstance(x, (np.ndarray, np.generic))

    def is_float(self, x: Any) -> bool:
        return _is_float_leaf(x)

    def ring_write(self, hist: Any, slot: Any, row: Any, mask: Any, everyone: bool) -> Any:
        # in place: a write of one row per batch element, not a select over the whole buffer
        if isinstance(slot, int):
            hist[..., slot, :] = row if everyone else np.where(mask, row, hist[..., slot, :])
            return hist
        idx = np.broadcast_to(slot.astype(np.intp)[..., None], (*row.shape[:-1], 1, row.shape[-1]))
        new = row[..., None, :]
        if not everyone:
            new = np.where(mask[..., None], new, np.take_along_axis(hist, idx, axis=-2))
        np.put_along_axis(hist, idx, new, axis=-2)
        return hist

    def solve_triangular(self, L: Any, b: Any, *, lower: bool) -> Any:
        try:
            from scipy.linalg import solve_triangular
        except ImportError:  # pragma: no cover - scipy is optional
            return super().solve_triangular(L, b, lower=lower)
        if L.ndim == 2:
            return solve_triangular(L, b.T, lower=lower, check_finite=False).T
        return super().solve_triangular(L, b, lower=lower)

    def linearize(self, F, x, args, *, derivatives=None, tags=frozenset(), argnums=None):
        return NumpyLinearization(F, x, tuple(args), derivatives=derivatives, tags=tags,
                                  argnums=argnums)

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
            raise TypeError(
                f"idf.{what} with NumPy arrays: expected a solver decorated with "
                f"idf.custom_root or idf.custom_fixed_point, got {f!r}. NumPy has no autodiff, "
                f"so compositions cannot be differentiated here; call idf.{what} on the decorated "
                "solver and apply the chain rule yourself, or pass JAX/PyTorch arrays."
            )
        return f, options

    def _rule_kwargs(self, f: ImplicitFunction) -> dict:
        return dict(solve=f.solve, tags=f.tags, derivatives=f.derivatives,
                    on_failure=f.on_failure, backend=self, name=f.name)

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
        if not _is_float_leaf(arg):
            raise StructureError(
                f"jacobian: expected argument {argnums} to be a floating array or float, got "
                f"{type(arg).__name__}. For pytree arguments use idf.jvp/idf.vjp."
            )
        x, _ = self._primal(f, primals, options)
        lin = self.linearize(f.F, x, primals, derivatives=f.derivatives, tags=f.tags,
                             argnums=(argnums % len(primals),))
        if f.derivatives is None or f.derivatives.jvp_x is None:
            lin.jac_x()  # many solves with one A: build it once (n products), not per solve
        shape = np.shape(arg)
        p = int(np.prod(shape))
        xflat, unravel = ravel(self, x)
        n = xflat.shape[0]
        kw = self._rule_kwargs(f)
        if p <= n:
            cols = []
            for j in range(p):
                e = np.zeros(p)
                e[j] = 1.0
                t = tuple(e.reshape(shape) if i == argnums % len(primals) else None
                          for i in range(len(primals)))
                cols.append(ravel(self, implicit_jvp(f.F, x, primals, t, linearization=lin,
                                                     **kw))[0])
            J = np.stack(cols, axis=-1)  # (n, p)
        else:
            rows = []
            for i in range(n):
                e = np.zeros(n, dtype=xflat.dtype)
                e[i] = 1.0
                g = implicit_vjp(f.F, x, primals, unravel(e), argnums=(argnums,),
                                 linearization=lin, **kw)[argnums]
                rows.append(np.reshape(np.asarray(g), (-1,)))
            J = np.stack(rows, axis=0)
        xl, xdef = _tree.tree_flatten(x)
        out, start = [], 0
        for leaf in xl:
            size = int(np.prod(np.shape(leaf)))
            out.append(J[start:start + size].reshape(np.shape(leaf) + shape))
            start += size
        return _tree.tree_unflatten(xdef, out)


backend = NumpyBackend()
