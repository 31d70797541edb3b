"""The decorators: `custom_root`, `custom_fixed_point`, and the function object they return."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _tree
from ._array import all_finite
from ._backend import Backend, convert_constants, find_backend, get_backend
from ._config import resolve_on_failure
from ._diagnostics import ForwardRecord
from ._errors import NonConvergenceError, StructureError
from ._ift import _NO_KINK_PROBE, _check_options, no_kink_probe
from ._linear_solve import AbstractLinearSolver, Auto
from ._tags import as_tags, fixed_point_form


@dataclass(frozen=True)
class Derivatives:
    """Hand-written products with the Jacobians of `F`, for the NumPy reference backend (the
    autodiff backends take them from the framework and ignore these).

    Each is optional; what is missing comes from the complex step, then central differences.

    - `jvp_x(v, x, *args)`: $\\partial_x F\\, v$, shaped like `x`.
    - `vjp_x(u, x, *args)`: $\\partial_x F^\\top u$, shaped like `x`.
    - `jvp_args(args_dot, x, *args)`: $\\partial_\\theta F\\, \\dot\\theta$, `args_dot` a tuple.
    - `vjp_args(u, x, *args)`: $\\partial_\\theta F^\\top u$, a tuple like `args`.
    - `jacobian_x(x, *args)`: the matrix $\\partial_x F$ on the raveled `x` (its leaves in
      tree order, each flattened after the `batch_dims` batch dimensions), shape
      `(*batch, n, n)`. Unlike the products, **every** backend uses it, written with the
      backend's namespace: the dense linear solvers (`Dense`, `Cholesky`) of a first-order
      derivative take $A$ from it instead of building it from n products (for structured
      conditions, such as `idf.qp`'s KKT condition, where that is much cheaper). It must
      equal $\\partial_x F$: nothing checks it but the tests that should.
    """

    jvp_x: Callable[..., Any] | None = None
    vjp_x: Callable[..., Any] | None = None
    jvp_args: Callable[..., Any] | None = None
    vjp_args: Callable[..., Any] | None = None
    jacobian_x: Callable[..., Any] | None = None


def default_residual_tol(dtype_eps: float, *, floor: float = 0.0) -> float:
    """The default forward residual tolerance, $\\max(\\text{floor}, 10\\sqrt{\\epsilon})$ with
    $\\epsilon$ the machine epsilon of a dtype: $10\\sqrt{\\epsilon}$ for `custom_root` and the
    layers, where `custom_root`'s default check applies it to the residual *relative* to the size
    of F's terms, leaf by leaf with each leaf's dtype (see `residual_scales`); the SciPy drop-ins
    pass `floor=1e-4`, so the check accepts what SciPy's default stopping tolerances (e.g.
    `gtol=1e-5` for BFGS) deliver."""
    return max(floor, 10.0 * math.sqrt(dtype_eps))


def solve_argument(who: str, solve: AbstractLinearSolver | None,
                   linear_solver: Any = None) -> AbstractLinearSolver:
    """The backward linear solver from `solve=`, or from `linear_solver=`, its old name in
    `implicitdiff.scipy` and `solvers.newton` (deprecated: a `DeprecationWarning`, removed in
    the next release); `Auto()` when neither is given. Giving both is a `TypeError`. A value
    that is not a linear solver is returned as is, for the caller's own check to report."""
    if linear_solver is None:
        return Auto() if solve is None else solve
    if solve is not None:
        raise TypeError(f"{who}: got both solve= and linear_solver= (its old name); pass "
                        "solve= only.")
    if isinstance(linear_solver, AbstractLinearSolver):
        warnings.warn(f"{who}: linear_solver= is deprecated and will be removed in the next "
                      "release; pass solve= (the same linear solver).", DeprecationWarning,
                      stacklevel=3)
    return linear_solver


class ImplicitFunction:
    """A solver decorated with `custom_root` or `custom_fixed_point`.

    Call it like the solver: `fn(*args, **options)`. Positional arguments are $\\theta$: they are
    passed to `F` and differentiated; keyword options go to the solver only. The attributes
    `F`, `solver`, `solve`, `tags`, `has_aux`, `residual_tol`, `on_failure`, `derivatives`,
    `result_shape`, `batch_dims`, `kink_probe` hold the configuration. `on_failure` reads
    `idf.config.on_failure` when the decorator was given `None` (at each access: the backends
    read it when the function is called, or traced).
    """

    def __init__(self, solver: Callable[..., Any], F: Callable[..., Any], *,
                 solve: AbstractLinearSolver, tags: frozenset, has_aux: bool,
                 residual_tol: float | None, on_failure: str | None,
                 derivatives: Derivatives | None, result_shape: Any = None,
                 batch_dims: int = 0, kink_probe: bool = True):
        if not callable(solver):
            raise TypeError(f"expected a callable solver to decorate, got {type(solver).__name__}.")
        self.solver = solver
        self.F = F
        self.solve = solve
        self.tags = tags
        self.has_aux = has_aux
        self.residual_tol = residual_tol
        self._on_failure = on_failure
        self.derivatives = derivatives
        self.result_shape = result_shape
        self.batch_dims = batch_dims
        self.kink_probe = kink_probe
        if not kink_probe:
            no_kink_probe(F)
        functools.update_wrapper(self, solver)

    def __setstate__(self, state: dict) -> None:
        # unpickled by value: the condition is marked again where the probe is off
        self.__dict__.update(state)
        if not state.get("kink_probe", True):
            no_kink_probe(self.F)

    @property
    def on_failure(self) -> str:
        """What a failed forward or backward solve does: the decorator's `on_failure`, or
        `idf.config.on_failure` when that was None (read now, so a change of the config
        reaches every decorated solver at its next call or trace)."""
        return resolve_on_failure(self._on_failure, f"{self.name}: on_failure")

    @on_failure.setter
    def on_failure(self, value: str | None) -> None:
        if value is not None:
            resolve_on_failure(value, "on_failure")  # validates
        self._on_failure = value

    def __reduce__(self) -> Any:
        # A decorated module-level solver pickles by reference, as the function it replaces
        # would (process pools, torch.save of a model holding it): by value, pickle would look
        # the wrapped solver up by its name and find this object instead. Anything else (a
        # closure, a solver made at run time) pickles by value as before.
        if _is_global(self):
            return str(self.__dict__["__qualname__"])  # set by update_wrapper
        return object.__reduce__(self)

    @property
    def name(self) -> str:
        return getattr(self.solver, "__name__", type(self.solver).__name__)

    def __call__(self, *args: Any, **options: Any) -> Any:
        bk = find_backend(args, options)
        if bk is None:
            # Only Python scalars were passed: the arrays, if any, live in closures. The
            # solver's output tells which framework they belong to.
            bk = get_backend(self.run_solver(args, options)[0])
        # NumPy arrays beside another framework's arrays are constants of that framework
        args = convert_constants(bk, args, args, options)
        if self.kink_probe:
            return bk.call(self, args, options)
        # the rules see `kink_probe=False` through the context where they run inside the call
        # (JAX traces its derivative rule there); see `_ift.kink_probe_default`
        token = _NO_KINK_PROBE.set(True)
        try:
            return bk.call(self, args, options)
        finally:
            _NO_KINK_PROBE.reset(token)

    def __repr__(self) -> str:
        return f"<implicit function {self.name} (condition {getattr(self.F, '__name__', 'F')})>"

    # -- shared by every backend: run the solver and check the result --------------------------
    def run_solver(self, args: tuple, options: dict) -> tuple[Any, Any]:
        """Call the solver; split `(x, aux)` when `has_aux`."""
        out = self.solver(*args, **options)
        if self.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise StructureError(
                    f"{self.name}: has_aux=True expects the solver to return (x, aux), got "
                    f"{type(out).__name__}. Return a pair or set has_aux=False."
                )
            return out
        self._check_output_structure(out, args)
        return out, None

    def _check_output_structure(self, out: Any, args: tuple) -> None:
        """A solver returning a container (tuple, list, dict) where `F` takes one array (a
        forgotten `has_aux=True`, or a stats dict returned beside x) would make `F` fail with a
        `TypeError` deep inside the user's code. Once per output structure: when `F` rejects the
        container (any exception) but takes one of its first array leaves alone, raise
        `StructureError` naming the mismatch. Any other outcome leaves the call as it was."""
        if not isinstance(out, (tuple, list, dict)):
            return
        treedef = _tree.tree_flatten(out)[1]
        seen = self.__dict__.setdefault("_structures_ok", set())
        try:
            if treedef in seen:
                return
        except TypeError:  # an unhashable node: check every time
            pass
        try:
            self.F(out, *args)
        except Exception as e:  # any failure of F on the container
            taken = None
            for path, leaf in _tree.tree_leaves_with_path(out, "x")[:4]:
                if not (hasattr(leaf, "dtype") and hasattr(leaf, "shape")):
                    continue
                try:
                    self.F(leaf, *args)
                except Exception:  # F does not take this leaf either
                    continue
                taken = path
                break
            if taken is None:  # F takes no leaf alone either: not a structure mismatch
                return
            paths = [p for p, _ in _tree.tree_leaves_with_path(out, "x")]
            what = (f"a dict with keys {sorted(map(repr, out))}" if isinstance(out, dict) else
                    f"a {type(out).__name__} of {len(out)}")
            raise StructureError(
                f"{self.name}: the solver returned {what} (leaves {', '.join(paths[:6])}), but "
                f"F does not take that structure as x: F raised {type(e).__name__}: {e}. F "
                f"takes a single array (it accepts {taken}). Expected the solver to return "
                "x in the structure F takes: return only x, or, to return extra outputs, pass "
                "has_aux=True and return (x, aux)."
            ) from e
        else:
            try:
                seen.add(treedef)
            except TypeError:
                pass

    def check(self, bk: Backend, x: Any, args: tuple, F: Callable[..., Any] | None = None) -> Any:
        """Check x's structure, F's output structure, and the residual; apply `on_failure`.

        `F` replaces `self.F` (the JAX backend passes its closure-converted condition)."""
        xs = bk.tree_leaves_with_path(x, "x")
        for path, leaf in xs:
            if type(leaf) is float or not bk.is_float(leaf):
                raise StructureError(
                    f"{self.name}: expected the solver to return floating arrays, got "
                    f"{type(leaf).__name__} {getattr(leaf, 'dtype', '')} at {path}. Return "
                    "arrays of a real floating dtype (float32/float64)."
                )
        xp = bk.namespace(*[leaf for _, leaf in xs])
        k = self.batch_dims
        _batch_shape(self.name, xs, k)  # validates the batch dimensions
        if self.residual_tol == math.inf:
            # no residual check: F is not evaluated; x must still be finite
            return self._check_finite(bk, xp, x, xs, k)
        r = (F or self.F)(x, *args)
        check_like(bk, r, x, f"{self.name}: F(x, *args)")
        xls, rls = [leaf for _, leaf in xs], bk.tree_flatten(r)[0]
        # with batch_dims = k, one residual and one finiteness flag per batch element
        res_l = [_row_max(xp, rl, k) for rl in rls]
        res, finite = _combine(xp, res_l, xp.maximum), _combine(
            xp, [_rows_finite(xp, xl, k) for xl in xls], lambda a, b: a & b)
        name = self.name
        if self.residual_tol is not None:  # the user's tolerance: absolute, as given
            tol = self.residual_tol
            ok = finite & (res <= tol)
            record_forward(bk, name, res, tol, batched=bool(k))
            return bk.handle_failure(x, ok, self.on_failure, _forward_error(name, tol), res,
                                     finite)
        # The default: relative to the size of F's terms near x*, leaf by leaf, each leaf with
        # the tolerance of its own dtype (see `residual_scales`).
        tols = [default_residual_tol(float(xp.finfo(xl.dtype).eps)) for xl in xls]
        jvp: Callable[[Any], Any] | None = None
        d = self.derivatives
        if F is None and d is not None and d.jvp_x is not None:  # the user's ∂F/∂x·v
            jvp_x = d.jvp_x

            def jvp_user(v: Any) -> Any:
                return jvp_x(v, x, *args)

            jvp = jvp_user
        scales = residual_scales(bk, F or self.F, x, args, r, k, fallback=self.F, jvp=jvp)
        rel = q = None
        for rl, tl, sl in zip(rls, tols, scales):
            rel_l = _row_max(xp, rl / sl, k)
            q_l = rel_l / tl  # accepted where <= 1
            rel = rel_l if rel is None else xp.maximum(rel, rel_l)
            q = q_l if q is None else xp.maximum(q, q_l)
        assert rel is not None and q is not None
        ok = finite & (q <= 1)
        tol = min(tols)
        record_forward(bk, name, res, tol, batched=bool(k), relative=rel, normalized=q)
        return bk.handle_failure(x, ok, self.on_failure, _relative_forward_error(name, tols),
                                 res, finite, rel, q)

    def _check_finite(self, bk: Backend, xp: Any, x: Any, xs: list, k: int) -> Any:
        """The check with `residual_tol=math.inf`: only finiteness of x, per batch element. No
        residual, so no forward record (a caller that checks the residual its own way, like
        the DEQ layers, records it with `record_forward`)."""
        finite = None
        for _, xl in xs:
            f = _rows_finite(xp, xl, k)
            finite = f if finite is None else finite & f
        assert finite is not None
        name = self.name
        return bk.handle_failure(x, finite, self.on_failure, _forward_error(name, math.inf),
                                 xp.zeros_like(finite, dtype=xs[0][1].dtype), finite)


def _is_global(obj: Any) -> bool:
    """Whether `obj` is what its `__module__` and `__qualname__` name."""
    import sys

    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(qualname, str)) or "<locals>" in qualname:
        return False
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


def _row_max(xp: Any, a: Any, k: int) -> Any:
    """$\\max|a|$ over the dimensions after the first `k` (one per batch element); 0 for a leaf
    with no entries (a sum over nothing, so the result keeps `a`'s device)."""
    axes = tuple(range(k, a.ndim))
    if not axes:
        return xp.abs(a)
    if not math.prod(tuple(a.shape)):
        return xp.sum(xp.abs(a), axis=axes)
    return xp.max(xp.abs(a), axis=axes)


def _rows_finite(xp: Any, a: Any, k: int) -> Any:
    """Per batch element (the first `k` axes), whether every entry of `a` is finite."""
    axes = tuple(range(k, a.ndim))
    return all_finite(xp, a, axis=axes) if axes else xp.isfinite(a)


def _combine(xp: Any, parts: list, op: Callable[[Any, Any], Any]) -> Any:
    out = None
    for p in parts:
        out = p if out is None else op(out, p)
    assert out is not None  # x has at least one leaf
    return out


def drop_failed(bk: Backend, F: Callable[..., Any], x: Any, k: int
                ) -> tuple[Callable[..., Any], Any, Any]:
    """With `batch_dims = k > 0` and `on_failure="nan"`: the batch elements whose forward solve
    failed (x* NaN there) leave the derivative, so that they cannot spoil the gradient of the
    arguments the batch shares. Returns `(F_kept, x_kept, ok)`: on a failed element the
    condition becomes $F(x) = x$ at $x = 0$ (identity Jacobian, no dependence on $\\theta$,
    so its tangent is 0 and it adds nothing to a cotangent), elsewhere $F$ and $x^*$ as they
    are; `ok` the per-element flag (shape: the batch)."""
    leaves, treedef = bk.tree_flatten(x)
    xp = bk.namespace(*leaves)
    ok = _combine(xp, [_rows_finite(xp, leaf, k) for leaf in leaves],
                  lambda a, b: a & b)

    def keep(leaf: Any, kept: Any, other: Any) -> Any:
        return xp.where(_expand(xp, ok, leaf, k), kept, other)

    x_kept = bk.tree_unflatten(treedef, [keep(leaf, leaf, xp.zeros_like(leaf))
                                         for leaf in leaves])

    def F_kept(z: Any, *args: Any) -> Any:
        r = F(z, *args)
        r_leaves, r_def = bk.tree_flatten(r)
        return bk.tree_unflatten(r_def, [keep(rl, rl, zl) for rl, zl
                                         in zip(r_leaves, bk.tree_flatten(z)[0])])

    F_kept.__name__ = getattr(F, "__name__", "F")
    return F_kept, x_kept, ok


def _expand(xp: Any, m: Any, leaf: Any, k: int) -> Any:
    """A per-batch-element value `m` (shape: the batch) broadcastable against `leaf`."""
    return xp.reshape(m, (*tuple(m.shape), *([1] * (leaf.ndim - k)))) if k else m


def residual_scales(bk: Backend, F: Callable[..., Any], x: Any, args: tuple, r: Any, k: int = 0,
                    *, fallback: Callable[..., Any] | None = None,
                    jvp: Callable[[Any], Any] | None = None) -> list:
    """The size of the terms of $F$ near $x^*$, entry by entry of the residual (a list, one
    array per leaf, shaped like it): $|\\partial_x F\\, d|_i$ with $d = x^* + \\max|x^*|$ (per
    leaf and batch element; 1 where a leaf of $x^*$ is zero), at least `ROW_FLOOR` times the
    largest in its leaf, from one evaluation of `F` by a forward difference. A residual
    relative to it is, to first order, the relative error of $x^*$ when $\\partial_x F$ is
    well conditioned: $F(x^* + \\delta) \\approx \\partial_x F\\,\\delta$; entry by entry,
    so rows of very different scales (a proximal step's fixed point: a small step size on the
    support, 1 off it) are each measured in their own units. The step keeps every entry's
    sign (a positive $x^*$ stays in `F`'s domain). Where a leaf's estimate is zero or not
    finite, 1 (absolute units, as an explicit `residual_tol`).

    `r` is $F(x^*, \\theta)$. `fallback` is called instead of `F` when `F` returns `r` itself
    whatever its input (a backend handing over an already computed residual). `jvp`, when
    given, is $v \\mapsto \\partial_x F\\, v$ (the user's `Derivatives.jvp_x`), used instead of
    the difference."""
    # NumPy's warnings off: a non-finite x* (refused anyway) must not warn here
    with np.errstate(all="ignore"):
        return _scales(bk, F, x, args, r, k, fallback, jvp)


def _scales(bk: Backend, F: Callable[..., Any], x: Any, args: tuple, r: Any, k: int,
            fallback: Callable[..., Any] | None, jvp: Callable[[Any], Any] | None) -> list:
    xls, xdef = bk.tree_flatten(x)
    xp = bk.namespace(*xls)
    eps = max(float(xp.finfo(xl.dtype).eps) for xl in xls)
    h = math.sqrt(eps)
    ds = []
    for xl in xls:
        m = _row_max(xp, xl, k)
        m = xp.where(m > 0, m, xp.ones_like(m))
        ds.append(xl + _expand(xp, m, xl, k))
    rls = bk.tree_flatten(r)[0]
    if jvp is not None:
        prods = [xp.asarray(p) for p in bk.tree_flatten(jvp(bk.tree_unflatten(xdef, ds)))[0]]
    else:
        xh = bk.tree_unflatten(xdef, [xl + h * d for xl, d in zip(xls, ds)])
        rpl = bk.tree_flatten(F(xh, *args))[0]
        if fallback is not None and all(a is b for a, b in zip(rpl, rls)):
            rpl = bk.tree_flatten(fallback(xh, *args))[0]
        prods = [(a - b) / h for a, b in zip(rpl, rls)]
    out = []
    for p, b in zip(prods, rls):
        ad = xp.abs(xp.reshape(p, tuple(b.shape)))
        big = _row_max(xp, ad, k)
        good = xp.isfinite(big) & (big > 0)
        big = xp.where(good, big, xp.ones_like(big))
        floor = ROW_FLOOR * _expand(xp, big, ad, k)
        ad = xp.where(xp.isfinite(ad), ad, floor)  # an entry that overflowed: the floor
        out.append(xp.where(_expand(xp, good, ad, k), xp.maximum(ad, floor),
                            xp.ones_like(ad)))
    return out


ROW_FLOOR = 1e-3
"""An entry's scale in `residual_scales` is at least this fraction of the largest in its leaf
(an entry of $\\partial_x F\\, d$ that cancels to near zero must not make its residual look
large)."""


def record_forward(bk: Backend, name: str, res: Any, tol: float, *, batched: bool,
                   relative: Any = None, normalized: Any = None) -> None:
    """Hand the active `idf.diagnostics()` collectors the record of a forward residual check:
    `res` is $\\max|F(x^*, \\theta)|$, one per batch element when `batched`. With the default
    (relative) check, `relative` is the residual relative to the size of F's terms and
    `normalized` that relative residual over each leaf's tolerance (accepted where <= 1)."""
    if relative is None:
        bk.record(lambda r_: ForwardRecord(name, float(np.max(r_)), float(tol),
                                           bool(np.all(r_ <= tol)),
                                           np.asarray(r_) if batched else None), res)
        return
    bk.record(lambda r_, rel_, q_: ForwardRecord(
        name, float(np.max(r_)), float(tol), bool(np.all(np.asarray(q_) <= 1)),
        np.asarray(r_) if batched else None, float(np.max(rel_))), res, relative, normalized)


def _with_failed_elements(name: str, res: Any, ok: Any) -> str:
    """`name`, and with batch_dims > 0 (`res` per element) the elements where `ok` is false."""
    if not np.ndim(res):
        return name
    bad = np.argwhere(~np.asarray(ok))
    shown = ", ".join(str(tuple(int(i) for i in b)) for b in bad[:5])
    return name + f" (batch elements {shown}{', ...' if len(bad) > 5 else ''})"


def _not_finite(name: str) -> str:
    return (f"{name}: the solver returned NaN or inf. Expected a finite root x* of F. "
            "Check the solver's inputs and its convergence.")


def _forward_error(name: str, tol: float) -> Callable[..., NonConvergenceError]:
    """A maker of the `NonConvergenceError` of a failed forward residual check of `name`,
    `make(res, finite)` from the residual(s) and finiteness flag(s), for `handle_failure`."""

    def make(res: Any, finite: Any) -> NonConvergenceError:
        res_f = float(np.max(np.asarray(res)))
        name_ = _with_failed_elements(name, res, np.asarray(finite) & (np.asarray(res) <= tol))
        if not bool(np.all(np.asarray(finite))):
            msg = _not_finite(name_)
        else:
            msg = (f"{name_}: the forward solve stopped far from the root: max|F(x*, θ)| = "
                   f"{res_f:.3g}, expected at most residual_tol = {tol:.3g}. The derivative "
                   "would be meaningless. Tighten the solver's tolerance or raise its iteration "
                   "limit; or, if this accuracy is enough, pass a larger residual_tol.")
        return NonConvergenceError(msg, residual_norm=res_f, tolerance=tol)

    return make


def _relative_forward_error(name: str, tols: list[float]) -> Callable[..., NonConvergenceError]:
    """The maker of the `NonConvergenceError` of a failed default (relative) residual check,
    `make(res, finite, rel, q)`: absolute residual(s), finiteness flag(s), residual(s) relative
    to the size of F's terms, and those over the tolerance (failed where > 1)."""
    tol = min(tols)

    def make(res: Any, finite: Any, rel: Any, q: Any) -> NonConvergenceError:
        res_f = float(np.max(np.asarray(res)))
        rel_f = float(np.max(np.asarray(rel)))
        name_ = _with_failed_elements(name, res, np.asarray(finite) & (np.asarray(q) <= 1))
        if not bool(np.all(np.asarray(finite))):
            msg = _not_finite(name_)
        else:
            tol_txt = (f"{tol:.3g}" if len(set(tols)) == 1 else
                       "10·sqrt(eps) of each leaf's dtype: " +
                       ", ".join(f"{t:.3g}" for t in tols))
            msg = (f"{name_}: the forward solve stopped far from the root: max|F(x*, θ)| = "
                   f"{res_f:.3g}, which is {rel_f:.3g} relative to the size of F's terms near "
                   f"x* (max|dF/dx·d|, d ~ x*), expected at most residual_tol = {tol_txt} "
                   "(relative: to first order, the relative error of x*). The derivative would "
                   "be meaningless. Tighten the solver's tolerance or raise its iteration "
                   "limit; or, if this accuracy is enough, pass residual_tol= (then an "
                   "absolute bound on max|F|).")
        return NonConvergenceError(msg, residual_norm=res_f, tolerance=tol)

    return make


def check_like(bk: Backend, r: Any, x: Any, what: str) -> None:
    """Raise StructureError unless `r` has the structure, shapes and dtypes of `x`."""
    xdef = bk.tree_flatten(x)[1]
    rl, rdef = bk.tree_flatten(r)
    if xdef != rdef:
        raise StructureError(
            f"{what}: expected a residual with the structure of x ({xdef}), got {rdef}"
            f"{_first_difference(bk, x, r)}. F must return a residual shaped like x."
        )
    for (path, a), b in zip(bk.tree_leaves_with_path(x, "x"), rl):
        shape = tuple(getattr(b, "shape", ()))
        if shape != tuple(a.shape):
            raise StructureError(
                f"{what}: at {path} expected shape {tuple(a.shape)} like x, got {shape}. F must "
                "return a residual shaped like x."
            )
        if getattr(b, "dtype", None) != a.dtype:
            raise StructureError(
                f"{what}: at {path} expected dtype {a.dtype} like x, got "
                f"{getattr(b, 'dtype', type(b).__name__)}. Cast the residual (or the solver's "
                "output) so both have one dtype."
            )


def _first_difference(bk: Backend, x: Any, r: Any) -> str:
    """Where the leaves of `r` first depart from those of `x`, by key path ("" if only the node
    types differ, e.g. a list for a tuple)."""
    xp = [p for p, _ in bk.tree_leaves_with_path(x, "x")]
    rp = [p for p, _ in bk.tree_leaves_with_path(r, "x")]
    for a, b in zip(xp, rp):
        if a != b:
            return f": x has a leaf at {a} where the residual has one at {b}"
    if len(xp) > len(rp):
        return f": the residual lacks the leaf at {xp[len(rp)]}"
    if len(rp) > len(xp):
        return f": the residual has an extra leaf at {rp[len(xp)]}"
    return ""


def _batch_shape(name: str, xs: list, k: int) -> tuple:
    """The common leading `k` dimensions of the leaves of x (batch_dims = k)."""
    if not k:
        return ()
    batch = None
    for path, leaf in xs:
        shape = tuple(leaf.shape)
        if len(shape) < k or (batch is not None and shape[:k] != batch):
            raise StructureError(
                f"{name}: batch_dims={k} expects every leaf of x to share its first {k} "
                f"dimensions (the batch), got shape {shape} at {path}"
                + (f" where other leaves have batch shape {batch}" if batch is not None else "")
                + ". Give every leaf the batch dimensions, or lower batch_dims."
            )
        batch = shape[:k]
    return batch or ()


def _validate(F: Any, solve: Any, on_failure: str | None, residual_tol: Any, has_aux: Any,
              batch_dims: Any = 0, kink_probe: Any = True) -> None:
    if not callable(F):
        raise TypeError(f"expected the condition F to be callable, got {type(F).__name__}.")
    _check_options(solve, on_failure)
    if not isinstance(kink_probe, bool):
        raise TypeError(f"kink_probe: expected a bool, got {kink_probe!r}.")
    if residual_tol is not None and not (isinstance(residual_tol, (int, float)) and
                                         residual_tol > 0):
        raise ValueError(f"residual_tol: expected a positive number or None, got "
                         f"{residual_tol!r}.")
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux: expected a bool, got {has_aux!r}.")
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
        raise ValueError(f"batch_dims: expected a non-negative int, got {batch_dims!r}.")


def custom_root(F: Callable[..., Any], *, solve: AbstractLinearSolver = Auto(),
                tags: Any = None, has_aux: bool = False, residual_tol: float | None = None,
                on_failure: str | None = None, derivatives: Derivatives | None = None,
                result_shape: Any = None, batch_dims: int = 0, kink_probe: bool = True
                ) -> Callable[[Callable[..., Any]], ImplicitFunction]:
    """Decorate a solver whose output $x^*$ satisfies $F(x^*, \\theta) = 0$.

    ```python
    @idf.custom_root(F, solve=idf.CG(), tags={idf.symmetric, idf.positive_definite})
    def ridge(lam, A, b):
        return np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ b)
    ```

    **Arguments:**

    - `F`: the condition `F(x, *args) -> residual` with the residual shaped like `x`; `x` and
      `args` may be pytrees.
    - `solve`: linear solver for $A = \\partial_x F$ in the derivative (default `Auto()`).
    - `tags`: structure of $A$: `{idf.symmetric}`, `{idf.symmetric, idf.positive_definite}`.
    - `has_aux`: the solver returns `(x, aux)`; aux is passed through and gets no gradient.
    - `residual_tol`: `None` (default): the forward solve is accepted when, in every leaf,
      $\\max|F(x^*, \\theta)|$ relative to the size of $F$'s terms near $x^*$
      ($\\max|\\partial_x F\\, d|$ with $d \\sim x^*$, one more evaluation of `F`) is at most
      $10\\sqrt{\\epsilon}$ of that leaf's dtype: to first order, x* has that relative
      error, however F is scaled (see docs/failures.md). A number: an absolute bound,
      $\\max|F(x^*, \\theta)| \\le$ `residual_tol`. `math.inf` skips the check: F is then not
      evaluated after the solve; x must still be finite.
    - `on_failure`: what a failed forward or backward solve does: `"raise"`, `"warn"`, or
      `"nan"` (the failed output, or failed batch elements, become NaN); `None` (default):
      `idf.config.on_failure`, read when the solver is called (traced, under `jax.jit`).
    - `derivatives`: optional `idf.Derivatives` with hand-written products (NumPy reference).
    - `result_shape`: for a host solver (NumPy, SciPy, C) called with JAX arrays under `jit`,
      `vmap` or `grad`: the output's `jax.ShapeDtypeStruct` pytree (`(x, aux)` with
      `has_aux`), or a function of the arguments returning it. Without it the shape is taken
      from an earlier call with concrete arguments of the same shapes.
    - `batch_dims`: the first `batch_dims` dimensions of every leaf of `x` index independent
      problems (element $i$ of $F$ depends on element $i$ of $x$ only; arguments may be batched
      or shared). The forward residual check and `on_failure` then apply per element (with
      `"nan"` only the failed elements become NaN), diagnostics are per element, and backends
      that support it (PyTorch) solve the linear systems per element, each stopping on its own.
      Derivatives are those of the whole batch: shared arguments get the sum of the per-element
      gradients; with `"nan"` a failed element adds nothing to them (its tangent is 0, and it
      spoils neither the others nor the shared arguments' gradient, in every backend; not with
      hand-written `Derivatives` on NumPy). Default 0.
    - `kink_probe`: (autodiff backends) once per derivative, compare $\\partial_x F\\, v$ with
      central differences of `F` in a random direction $v$ (five more evaluations of `F`)
      and refuse the derivative (`StructureError`, or per `on_failure`) where they disagree:
      `F` has a kink at $x^*$ (`abs`, `relu`, `max` exactly at a switch), where the derivative
      does not exist, or its autodiff derivative is wrong. Default True; False skips it.

    **Returns:** a decorator turning `solver(*args, **options) -> x` into an `ImplicitFunction`
    with the same call signature, differentiable in `args` by the implicit function theorem.
    """
    _validate(F, solve, on_failure, residual_tol, has_aux, batch_dims, kink_probe)
    tags_ = as_tags(tags)

    def decorate(solver: Callable[..., Any]) -> ImplicitFunction:
        return ImplicitFunction(solver, F, solve=solve, tags=tags_, has_aux=has_aux,
                                residual_tol=residual_tol, on_failure=on_failure,
                                derivatives=derivatives, result_shape=result_shape,
                                batch_dims=batch_dims, kink_probe=kink_probe)

    return decorate


def fixed_point_condition(T: Callable[..., Any]) -> Callable[..., Any]:
    """$F(x, \\theta) = T(x, \\theta) - x$, leaf by leaf, for any backend."""

    def F(x: Any, *args: Any) -> Any:
        bk = get_backend(x)
        t = T(x, *args)
        check_like(bk, t, x, f"{getattr(T, '__name__', 'T')}(x, *args)")
        tl, tdef = bk.tree_flatten(t)
        xl, _ = bk.tree_flatten(x)
        return bk.tree_unflatten(tdef, [a - b for a, b in zip(tl, xl)])

    F.__name__ = f"fixed_point({getattr(T, '__name__', 'T')})"
    return F


def custom_fixed_point(T: Callable[..., Any], *, solve: AbstractLinearSolver = Auto(),
                       tags: Any = None, has_aux: bool = False,
                       residual_tol: float | None = None, on_failure: str | None = None,
                       derivatives: Derivatives | None = None, result_shape: Any = None,
                       batch_dims: int = 0, kink_probe: bool = True
                       ) -> Callable[[Callable[..., Any]], ImplicitFunction]:
    """Decorate a solver whose output satisfies $x^* = T(x^*, \\theta)$.

    The same as `custom_root` with $F = T - x$, so $A = \\partial_x T - I$. All options as in
    `custom_root`; `derivatives`, if given, are products with the Jacobians of $F = T - x$.
    The default `solve=Auto()` knows $A$ is a fixed point's: for a batch (`batch_dims`) whose
    total size exceeds its `dense_max` (256) it solves by the fixed-point iteration with a
    GMRES fallback, `Richardson(omega=-1.0, fallback=GMRES())`, instead of materializing the
    Jacobian of every element (see `Auto`).
    """
    if not callable(T):
        raise TypeError(f"expected the map T to be callable, got {type(T).__name__}.")
    tags = as_tags(tags) | {fixed_point_form}
    return custom_root(fixed_point_condition(T), solve=solve, tags=tags, has_aux=has_aux,
                       residual_tol=residual_tol, on_failure=on_failure, derivatives=derivatives,
                       result_shape=result_shape, batch_dims=batch_dims, kink_probe=kink_probe)
