"""The reference linearization and transforms, for backends whose framework has no autodiff.

Written once against the array API (through the backend's `namespace`): the NumPy reference and
the array-api-strict backend both use it. Products with $\\partial_x F$ and
$\\partial_\\theta F$ come, in this order of preference, from user-supplied `idf.Derivatives`,
the complex step (exact to rounding for an `F` written with complex-safe operations), then
central differences; a probe in a random direction decides between the last two once per point.
Transposed products build the Jacobian column by column. Which source served is in
`Linearization.method` and in the diagnostics.

Central differences take one step per coordinate, $h_i = \\epsilon^{1/3} s_i$ with
$s_i = |z_i|$ ($1$ for a zero), refined where their own error estimate (Richardson's, from the
steps $h$, $h/2$, $h/4$) says the step was too large or too small; they serve with a
`DerivativeAccuracyWarning` that states their estimated accuracy. The same stencil detects a
kink of `F` at the point (one-sided slopes that differ by the same amount at every step): there
the derivative does not exist, and the linearization refuses (`on_failure`).

A backend built on it subclasses `ReferenceBackend` and provides `name`, `framework`, `owns`
(and, where the defaults do not fit, `is_float`, `namespace`, `ring_write`, ...).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _tree
from ._array import CENTRAL_DIFFERENCE, COMPLEX_STEP
from ._array import device as _device
from ._array import size as _size
from ._backend import Backend, Linearization
from ._config import resolve_on_failure
from ._errors import StructureError
from ._ift import implicit_jvp, implicit_vjp, kink_probe_on, ravel
from ._linear_solve import _probe_vector
from ._root import ImplicitFunction, drop_failed
from ._tags import symmetric

_EPS = float(np.finfo(np.float64).eps)
_PROBE_TOL = 30.0  # complex step vs differences: agreement within this many of their error
_KINK_SAME = 0.25  # one-sided slope jumps equal to this fraction at h, h/2, h/4: a kink
_TARGET = 1e-11  # relative accuracy at which central differences stop refining their step


def _signs(xp: Any, a: Any) -> Any:
    """A fixed pseudo-random pattern of ±1 shaped like `a` (the signs of the uniqueness probe's
    hash vector; all ones for a scalar)."""
    if len(a.shape) == 0:
        return xp.ones_like(a)
    v = _probe_vector(xp, a)
    return xp.where(v >= 0, xp.ones_like(a), -xp.ones_like(a))


class DerivativeAccuracyWarning(UserWarning):
    """A product with $\\partial_x F$ or $\\partial_\\theta F$ came from a less accurate source
    than the complex step (central differences): the message states the estimated accuracy."""


def _shape(leaf: Any) -> tuple:
    return tuple(getattr(leaf, "shape", ()))


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


class _Stencil(NamedTuple):
    """Central differences along one direction at steps h, h/2, h/4 (flat float64 vectors)."""

    value: Any  # Richardson's (4 c(h/2) - c(h)) / 3
    err: Any  # its estimated error, per component
    cs: tuple  # c(h), c(h/2), c(h/4)
    spread: Any  # |c(h) - c(h/2)| + |c(h/2) - c(h/4)| + rounding: the differences' own error
    trunc: float  # max |c(h) - c(h/2)|
    rnd: float  # max rounding estimate of c(h)
    rel: float  # norm-wise relative error estimate of `value`
    kink: bool


class ReferenceLinearization(Linearization):
    """Products with the Jacobians of `F` at `(x, args)` without autodiff.

    `backend` is the backend of the arrays: its namespace does the arithmetic and its
    `is_float` decides which leaves of `args` get a derivative. `on_failure` decides what a kink
    of `F` at the point does ("raise" a `StructureError`, "warn", or NaN products); None is the
    process-wide `idf.config.on_failure`; `kink_probe=False` accepts a kink (None: as the
    decorated solver being called says, `kink_probe=False` there). `name` names `F` in
    messages.
    """

    accuracy_warning: type[UserWarning] = DerivativeAccuracyWarning
    """The warning issued when central differences serve (adapters re-export it)."""

    def __init__(self, backend: ReferenceBackend, F: Callable[..., Any], x: Any, args: tuple, *,
                 derivatives: Any = None, tags: frozenset = frozenset(),
                 argnums: Sequence[int] | None = None, on_failure: str | None = None,
                 name: str | None = None, kink_probe: bool | None = None):
        self.bk = backend
        self.F, self.x, self.args = F, x, args
        # the arguments derivatives are wanted for: the probe of ∂F/∂θ perturbs only those
        self.argnums = (tuple(range(len(args))) if argnums is None else
                        tuple(_norm_argnums(argnums, len(args), "argnums")))
        self._complex_x = False  # whether F needs a complex x when only θ is complex
        self.d = derivatives
        self.tags = tags
        self.on_failure = on_failure
        self.kink_probe = kink_probe
        self.name = name or str(getattr(F, "__name__", "F"))
        self.x_leaves, self.x_def = _tree.tree_flatten(x)
        self.xp = backend.namespace(*self.x_leaves)
        self.device = _device(self.x_leaves[0])
        self.n = sum(_size(_shape(leaf)) for leaf in self.x_leaves)
        self._Fx = None
        self._F0flat: Any = None
        self._mags: Any = None
        self._jac_x: Any = None
        self._kinked = False
        self._warned: set[str] = set()
        self.x_method = "user" if derivatives is not None and derivatives.jvp_x else None
        self.args_method = ("user" if derivatives is not None and
                            (derivatives.jvp_args or derivatives.vjp_args) else None)
        if self.n == 0:  # no unknowns: every product is empty, nothing to probe
            self.x_method = self.x_method or "not needed"
            self.args_method = self.args_method or "not needed"

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

    def _flat(self, tree: Any) -> Any:
        """The leaves of `tree` (structured like x) as one float64 vector."""
        xp = self.xp
        parts = [xp.reshape(xp.astype(xp.asarray(v, device=self.device), xp.float64,
                                      copy=False), (-1,))
                 for v in _tree.tree_flatten(tree)[0]]
        if not parts:
            return xp.zeros((0,), dtype=xp.float64, device=self.device)
        return xp.concat(parts) if len(parts) > 1 else parts[0]

    def _unflat(self, v: Any) -> Any:
        """The inverse of `_flat`, in x's dtypes."""
        out, start = [], 0
        for leaf in self.x_leaves:
            size = _size(_shape(leaf))
            out.append(self._as(v[start:start + size], leaf.dtype, _shape(leaf)))
            start += size
        return _tree.tree_unflatten(self.x_def, out)

    # ---- the complex step ----------------------------------------------------------------------
    def _cs(self, xdir: Any, adir: tuple | None, cast: bool = True) -> Any | None:
        """Complex-step derivative of F along (xdir, adir); None where F is not complex-safe.
        `cast`: in x's dtypes (else float64, for comparing with central differences)."""
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
        d = _tree.tree_map(lambda v: xp.imag(v) / h, out)
        return self._cast_like_x(d) if cast else d

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

    # ---- central differences -------------------------------------------------------------------
    def _at(self, xdir: Any, adir: tuple | None, s: float) -> Any:
        """F at (x + s xdir, args + s adir), as a flat float64 vector."""
        xp = self.xp
        # x in float64 even where only θ moves: a float32 θ becomes float64 when perturbed, and
        # an F that needs one dtype throughout (a fixed point's T(x) - x) must see both alike
        xs = _tree.tree_map(lambda a: xp.astype(a, xp.float64), self.x) if xdir is None else \
            _tree.tree_map(lambda a, v: xp.astype(a, xp.float64) + s * v, self.x, xdir)
        args = self.args if adir is None else _perturb_args(self.args, adir, s)
        return self._flat(self.F(xs, *args))

    def _f0(self) -> Any:
        """F at x* as one float64 vector, evaluated as `_at` evaluates F (x in float64), so the
        stencils' differences against it see no rounding of a lower precision."""
        if self._F0flat is None:
            xp = self.xp
            low = any(v.dtype != xp.float64 for v in _tree.tree_flatten(self.x)[0])
            self._F0flat = self._flat(self._F0() if not low else self.F(
                _tree.tree_map(lambda a: xp.astype(a, xp.float64), self.x), *self.args))
        return self._F0flat

    def _stencil(self, xdir: Any, adir: tuple | None, h: float) -> _Stencil:
        """Central differences at h, h/2, h/4, Richardson's extrapolation, its error estimate
        and the kink test (six evaluations of F)."""
        xp = self.xp
        f0 = self._f0()
        fp = [self._at(xdir, adir, h * t) for t in (1.0, 0.5, 0.25)]
        fm = [self._at(xdir, adir, -h * t) for t in (1.0, 0.5, 0.25)]
        steps = (h, h / 2, h / 4)
        c = tuple((p - m) / (2 * hh) for p, m, hh in zip(fp, fm, steps))
        # the rounding of one evaluation of F: eps times the size of the terms it adds up
        # (`_magnitudes`; |F| alone misses the cancellation of A x against b)
        e = _EPS * (self._magnitudes() + xp.maximum(xp.abs(fp[0]), xp.abs(fm[0])))
        value = (4 * c[1] - c[0]) / 3
        other = (4 * c[2] - c[1]) / 3
        err = xp.abs(value - other) + 3 * e / h
        spread = xp.abs(c[0] - c[1]) + xp.abs(c[1] - c[2]) + e / steps[2]
        # The jump of the one-sided slopes, (f(+h) - 2 f0 + f(-h)) / h: about h F'' where F is
        # smooth (halves with h), the jump itself at a kink (the same at every step).
        D = [(p - 2 * f0 + m) / hh for p, m, hh in zip(fp, fm, steps)]
        noise = 64 * e / steps[2]
        kink = ((xp.abs(D[2]) > noise) & (xp.abs(D[2]) > 1e-6 * xp.abs(value))
                & (xp.abs(D[0] - D[1]) <= _KINK_SAME * xp.abs(D[1]))
                & (xp.abs(D[1] - D[2]) <= _KINK_SAME * xp.abs(D[2])))
        size = _vmax(xp, xp.abs(value))
        emax = _vmax(xp, err)
        return _Stencil(value, err, c, spread, _vmax(xp, xp.abs(c[0] - c[1])),
                        _vmax(xp, 3 * e / h), emax / size if size > 0 else (0.0 if emax == 0
                                                                          else math.inf),
                        bool(xp.any(kink)) if _size(_shape(kink)) else False)

    def _cd(self, which: str, xdir: Any, adir: tuple | None, h: float, hmax: float) -> Any:
        """Central differences of F along (xdir, adir) from the step `h` (at most `hmax`), the
        step refined while its error estimate says it was too large or too small. A flat
        float64 vector; a kink at the point goes to `_on_kink`."""
        best = st = self._stencil(xdir, adir, h)
        kink = st.kink
        for _ in range(3):
            if best.rel <= _TARGET:
                break
            if best.trunc > 3 * best.rnd:  # truncation: a smaller step
                ratio = (best.rnd / (2 * best.trunc)) ** (1 / 3) if best.rnd > 0 else 0.1
                h_new = h * min(max(ratio, 1e-3), 0.5)
            else:  # rounding: a larger one (the error falls like 1/h)
                h_new = min(h * min(max(best.rel / _TARGET, 2.0), 1e4), hmax)
            if not h_new > 0 or h_new == h:
                break
            st = self._stencil(xdir, adir, h_new)
            kink = kink or st.kink
            if not st.rel < best.rel:
                break
            best, h = st, h_new
        if kink:
            self._on_kink(which)
        self._accuracy[which] = max(self._accuracy.get(which, 0.0), best.rel)
        return best.value

    @functools.cached_property
    def _accuracy(self) -> dict[str, float]:
        return {}

    def _on_kink(self, which: str) -> None:
        """A kink of F at the point along a probed direction: the derivative does not exist."""
        if not _kink_probe_wanted(self.F, self.kink_probe):
            return
        what = "x" if which == "x" else "the arguments θ"
        msg = (
            f"{self.name}: F has a kink at the point (x*, θ) in {what}: its one-sided slopes "
            "along a probed direction differ by the same amount at every step (as |t| or "
            "max(t, 0) at t = 0), so dF/d" + ("x" if which == "x" else "θ") + " and the "
            "implicit derivative dx*/dθ do not exist there; central differences would return "
            "the average of the one-sided slopes, a number that is no derivative. Expected F "
            "differentiable at x*. Move θ off the kink, smooth F there (e.g. sqrt(t² + δ²) for "
            "|t|), pass idf.Derivatives with the one-sided derivative you mean, or accept the "
            "average with kink_probe=False."
        )
        on_failure = resolve_on_failure(self.on_failure, self.name)
        if on_failure == "raise":
            raise StructureError(msg)
        if on_failure == "warn":
            if "kink" not in self._warned:
                self._warned.add("kink")
                warnings.warn(msg, RuntimeWarning, stacklevel=5)
            return
        self._kinked = True

    def _nan_if_kinked(self, v: Any) -> Any:
        return v * math.nan if self._kinked else v

    def _scales(self, leaf: Any) -> Any:
        """Per-coordinate scales $s_i = |z_i|$, 1 where $z_i = 0$ (float64, like the leaf)."""
        xp = self.xp
        a = xp.abs(xp.astype(xp.asarray(leaf, device=self.device), xp.float64))
        return xp.where(a > 0, a, xp.ones_like(a))

    def _cd_grouped(self, which: str, base: list, dirs: list, build: Callable) -> Any:
        """Central differences of F along a direction given leaf by leaf (`dirs`, None for no
        motion, beside the point's leaves `base`), with per-coordinate steps: the coordinates
        are grouped by the decade of |direction| / scale, and each group gets its own step
        $h = \\epsilon^{1/3} / \\max_i(|d_i| / s_i)$ (every coordinate moves by at most
        $\\epsilon^{1/3} s_i$, at least a tenth of it). `build(masked dirs)` makes the
        (xdir, adir) pair. A flat float64 vector."""
        xp = self.xp
        total = xp.zeros((self.n,), dtype=xp.float64, device=self.device)
        groups: list[tuple[Any, Any]] = []  # (|d|/s, decade) per leaf
        decades: set[int] = set()
        big = 1.0
        for b, d in zip(base, dirs):
            if d is None:
                groups.append((None, None))
                continue
            big = max(big, _maxabs(xp, b))
            u = xp.abs(d) / self._scales(b)
            dec = xp.floor(xp.log10(xp.where(u > 0, u, xp.ones_like(u))))
            dec = xp.where(u > 0, dec, xp.full_like(dec, -10000.0))
            groups.append((u, dec))
            if _size(_shape(u)):
                lo, hi = float(xp.min(dec)), float(xp.max(dec))
                for g in range(int(max(lo, -400)), int(hi) + 1):
                    if g not in decades and bool(xp.any(dec == g)):
                        decades.add(g)
        for g in sorted(decades):
            masked, umax, dmax = [], 0.0, 0.0
            for d, (u, dec) in zip(dirs, groups):
                if d is None:
                    masked.append(None)
                    continue
                m = xp.where(dec == g, d, xp.zeros_like(d))
                masked.append(m)
                if _size(_shape(m)):
                    umax = max(umax, float(xp.max(xp.where(dec == g, u, xp.zeros_like(u)))))
                    dmax = max(dmax, float(xp.max(xp.abs(m))))
            if umax == 0.0:
                continue
            xdir, adir = build(masked)
            total = total + self._cd(which, xdir, adir, CENTRAL_DIFFERENCE / umax,
                                     CENTRAL_DIFFERENCE * big / dmax)
        return total

    def _cd_x(self, xdir: Any) -> Any:
        """$\\partial_x F\\,v$ by central differences with per-coordinate steps (flat)."""
        xp = self.xp
        leaves = [xp.astype(xp.asarray(v, device=self.device), xp.float64, copy=False)
                  for v in _tree.tree_flatten(xdir)[0]]
        return self._cd_grouped("x", self.x_leaves, leaves,
                                lambda m: (_tree.tree_unflatten(self.x_def, m), None))

    def _cd_args(self, adir: tuple) -> Any:
        """$\\partial_\\theta F\\,\\dot\\theta$ by central differences with per-coordinate steps."""
        base, dirs, where = [], [], []
        for i, (a, d) in enumerate(zip(self.args, adir)):
            if d is None:
                continue
            al = _tree.tree_flatten(a)[0]
            for k, (aa, dd) in enumerate(zip(al, _realign(al, d))):
                if dd is not None:
                    base.append(aa)
                    dirs.append(self.xp.asarray(dd, device=self.device))
                    where.append((i, k))

        def build(masked: list) -> tuple:
            out: list[Any] = []
            for i, a in enumerate(self.args):
                al, adef = _tree.tree_flatten(a)
                mine = {k: m for (j, k), m in zip(where, masked) if j == i}
                if not mine:
                    out.append(None)
                    continue
                out.append(_tree.tree_unflatten(adef, [mine.get(k) for k in range(len(al))]))
            return None, tuple(out)

        return self._cd_grouped("args", base, dirs, build)

    # ---- the probe -----------------------------------------------------------------------------
    def _probe(self, which: str, xdir: Any, adir: tuple | None, h: float) -> str:
        """Decide between complex step and central differences by trying both once along a
        direction scaled per coordinate. The complex step serves where, in every component of
        F, it agrees with one of the differences at h, h/2, h/4 within a multiple of their own
        spread (truncation and rounding, estimated per component, never relative to the
        largest entry)."""
        xp = self.xp
        # a power-of-two step and a direction whose steps land on floating-point numbers: the
        # differences then see exactly the direction the complex step sees
        h = 2.0 ** math.floor(math.log2(h))
        if xdir is not None:
            xdir = _tree.tree_map(lambda z, d: self._quantize(z, d, h), self.x, xdir)
        if adir is not None:
            adir = tuple(None if d is None else _tree.tree_unflatten(
                _tree.tree_flatten(a)[1],
                [None if dd is None else self._quantize(aa, dd, h)
                 for aa, dd in zip(_tree.tree_flatten(a)[0],
                                   _realign(_tree.tree_flatten(a)[0], d))])
                for a, d in zip(self.args, adir))
        cs = self._cs(xdir, adir, cast=False)  # float64: a float32 x must not round it here
        st = self._stencil(xdir, adir, h)
        if st.kink:
            self._on_kink(which)
        if cs is None:
            self._why[which] = ("F is not complex-safe (it failed at complex inputs or "
                                "returned a real residual)")
            self._accuracy[which] = st.rel
            return "central-difference"
        csf = self._flat(cs)
        gap = xp.abs(csf - st.cs[0])
        for c in st.cs[1:]:
            gap = xp.minimum(gap, xp.abs(csf - c))
        tol = _PROBE_TOL * st.spread + 8 * _EPS * xp.abs(csf)
        bad = gap > tol
        if _size(_shape(bad)) and bool(xp.any(bad)):
            k = int(xp.argmax(xp.where(bad, gap / xp.where(tol > 0, tol, xp.ones_like(tol)),
                                       xp.zeros_like(gap))))
            self._why[which] = (
                f"the complex step disagreed with central differences in entry {k} of F's "
                f"raveled residual ({float(csf[k]):.6g} against {float(st.value[k]):.6g}, "
                f"beyond their error {float(tol[k]):.2g}): F is not complex-analytic (abs, "
                "conj, real, comparisons, ...)")
            self._accuracy[which] = st.rel
            return "central-difference"
        return "complex-step"

    def _magnitudes(self) -> Any:
        """The size of the terms F adds up, per component: $|F|$ plus the slopes of F along
        x itself and along the floating arguments themselves (rough differences at 0.1%),
        which are the size of terms such as $A x$ and $b$ in $A x - b$, and along the same
        directions with fixed pseudo-random signs, which are about the size of the terms
        inside $A x$ where they cancel (an $A x \\approx b$ of 1 from terms of 700: the
        rounding of F is that of the terms; flat float64)."""
        if self._mags is None:
            xp = self.xp
            m = xp.abs(self._f0())
            adir = tuple(_tree.tree_unflatten(_tree.tree_flatten(a)[1], [
                xp.astype(xp.asarray(aa, device=self.device), xp.float64)
                if self.bk.is_float(aa) else None for aa in _tree.tree_flatten(a)[0]])
                for a in self.args)
            xdir = _tree.tree_map(lambda a: xp.astype(a, xp.float64), self.x)

            def signed(d: Any) -> Any:
                return None if d is None else d * _signs(xp, d)

            sx = _tree.tree_map(signed, xdir)
            sa = tuple(_tree.tree_unflatten(_tree.tree_flatten(a)[1], [
                signed(aa) for aa in _tree.tree_flatten(a)[0]]) for a in adir)
            for xd, ad in ((xdir, None), (None, adir), (sx, None), (None, sa)):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        d = (self._at(xd, ad, 1e-3) - self._at(xd, ad, -1e-3)) / 2e-3
                    m = m + xp.where(xp.isfinite(d), xp.abs(d), xp.zeros_like(d))
                except (ArithmeticError, ValueError, TypeError):
                    pass  # F undefined there: |F| alone
            self._mags = m
        return self._mags

    def _quantize(self, z: Any, d: Any, h: float) -> Any:
        """`d` rounded so that `h d` is a multiple of 8 ulps of `z` (`h` a power of two): the
        points z ± h d, z ± h d/2, z ± h d/4 are then exact (short of a binade crossing)."""
        xp = self.xp
        za = xp.abs(xp.astype(xp.asarray(z, device=self.device), xp.float64))
        q = 8 * (xp.nextafter(za, xp.full_like(za, math.inf)) - za)
        ok = za > 0
        qs = xp.where(ok, q, xp.ones_like(q))
        return xp.where(ok, xp.round(h * d / qs) * qs / h, d)

    @functools.cached_property
    def _why(self) -> dict[str, str]:
        return {}

    def _normal(self, rng: np.random.Generator, shape: tuple) -> Any:
        """Standard normal entries (float64) drawn on the host, as an array of the namespace."""
        return self.xp.asarray(rng.standard_normal(shape), device=self.device)

    def _resolve(self, which: str) -> str:
        """The source of products with ∂F/∂x (`which` "x") or ∂F/∂θ ("args"), probed once in
        a random direction $s \\odot g$ ($g$ standard normal, $s$ the coordinates' scales)."""
        attr = "x_method" if which == "x" else "args_method"
        if getattr(self, attr) is None:
            rng = np.random.default_rng(0)
            xp = self.xp
            if which == "x":
                g = [self._normal(rng, _shape(a)) for a in self.x_leaves]
                probe_x = _tree.tree_unflatten(
                    self.x_def, [gg * self._scales(a) for gg, a in zip(g, self.x_leaves)])
                gmax = max([_maxabs(xp, gg) for gg in g] + [0.0])
                method = ("complex-step" if gmax == 0.0 else
                          self._probe("x", probe_x, None, CENTRAL_DIFFERENCE / gmax))
            else:
                probe_a, gmax = self._random_arg_dir(rng)
                method = ("complex-step" if gmax == 0.0 else
                          self._probe("args", None, probe_a, CENTRAL_DIFFERENCE / gmax))
            setattr(self, attr, method)
            if method == "central-difference":
                self._warn_cd(which)
        return getattr(self, attr)

    def _warn_cd(self, which: str) -> None:
        if which in self._warned:
            return
        self._warned.add(which)
        what = "dF/dx" if which == "x" else "dF/dθ"
        acc = self._accuracy.get(which, math.nan)
        warnings.warn(
            f"{self.name}: the products with {what} come from central differences, not the "
            f"complex step, because {self._why.get(which, 'the complex step did not apply')}. "
            f"Their estimated relative accuracy is {acc:.1g} (the complex step's is about "
            "1e-15); the implicit derivative can lose more by the condition of dF/dx. For full "
            "accuracy write F with complex-safe operations (docs/numpy-reference.md) or pass "
            "idf.Derivatives.",
            self.accuracy_warning, stacklevel=6)

    def _directional(self, which: str, xdir: Any, adir: tuple | None) -> Any:
        attr = "x_method" if which == "x" else "args_method"
        if self._resolve(which) == "complex-step":
            out = self._cs(xdir, adir)
            if out is not None:
                return _tree.tree_map(self._nan_if_kinked, out)
            setattr(self, attr, "central-difference")
            self._why[which] = "F failed at complex inputs in a later product"
            self._warn_cd(which)
        flat = self._cd_x(xdir) if which == "x" else self._cd_args(adir) if adir else None
        if flat is None:
            return self._zeros_like_x()
        return self._unflat(self._nan_if_kinked(flat))

    # ---- products ----------------------------------------------------------------------------
    def A(self, v: Any) -> Any:
        if self.d is not None and self.d.jvp_x is not None:
            return self._cast_like_x(self.d.jvp_x(v, self.x, *self.args))
        if self._jac_x is None and self.n and self._resolve("x") == "central-difference":
            self.jac_x()  # one Jacobian, so that A and Aᵀ are exact transposes of each other
        if self._jac_x is not None:
            flat, unravel = ravel(self.bk, v)
            return unravel(self._jac_x @ flat)
        return self._directional("x", v, None)

    def jac_x(self) -> Any:
        """The dense $\\partial_x F$ on raveled x (cached)."""
        if self._jac_x is None:
            xp = self.xp
            n = self.n
            if n == 0:
                dtype = xp.result_type(*[leaf.dtype for leaf in self.x_leaves])
                self._jac_x = xp.zeros((0, 0), dtype=dtype, device=self.device)
                return self._jac_x
            flat, unravel = ravel(self.bk, self.x)
            cols = [ravel(self.bk, self._directional(
                "x", unravel(_basis(xp, j, n, flat.dtype, self.device)), None))[0]
                for j in range(n)]
            self._jac_x = xp.stack(cols, axis=1)
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
        if self.n == 0:
            return self._zeros_like_x()
        return self._directional("args", None, adir)

    def BT(self, u: Any, argnums: Sequence[int] | None = None) -> tuple:
        xp, bk = self.xp, self.bk
        wanted = (range(len(self.args)) if argnums is None else
                  _norm_argnums(argnums, len(self.args), "argnums"))
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
                    _refuse_complex(xp, leaf, f"argument {i}", "vjp")
                    grads.append(None)
                    continue
                shape = _shape(leaf)
                entries = []
                for j in range(_size(shape) if self.n else 0):
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
        """Tangent directions for the floating leaves of args (None elsewhere); a nonzero
        tangent on a complex leaf is refused (see `_refuse_complex`)."""
        xp = self.xp
        out = []
        for i, (a, t) in enumerate(zip(self.args, args_dot)):
            if t is None:
                out.append(None)
                continue
            al, adef = _tree.tree_flatten(a)
            tl = _tree.tree_flatten(t)[0]
            for aa, tt in zip(al, tl):
                if tt is not None and not self.bk.is_float(aa) and _maxabs(xp, tt) > 0:
                    _refuse_complex(xp, aa, f"argument {i}", "jvp")
            out.append(_tree.tree_unflatten(adef, [
                self._as(tt, xp.float64, _shape(tt))
                if self.bk.is_float(aa) and tt is not None else None
                for aa, tt in zip(al, tl)]))
        return tuple(out)

    def _random_arg_dir(self, rng: np.random.Generator) -> tuple[tuple, float]:
        """A random direction $s \\odot g$ in the floating leaves of the wanted arguments, and
        the largest $|g|$ (0 when there is nothing to move)."""
        out: list[Any] = []
        gmax = 0.0
        for i, a in enumerate(self.args):
            if i not in self.argnums:
                out.append(None)
                continue
            al, adef = _tree.tree_flatten(a)
            dirs = []
            for aa in al:
                if not self.bk.is_float(aa):
                    dirs.append(None)
                    continue
                g = self._normal(rng, _shape(aa))
                gmax = max(gmax, _maxabs(self.xp, g))
                dirs.append(g * self._scales(aa))
            out.append(_tree.tree_unflatten(adef, dirs))
        return tuple(out), gmax


def _kink_probe_wanted(F: Callable[..., Any], kink_probe: bool | None) -> bool:
    """Whether a kink is refused: `kink_probe` when given, else not while a solver decorated
    with `kink_probe=False` runs or for its condition `F` (the marks the IFT rules read)."""
    return kink_probe_on(F, kink_probe)


def _vmax(xp: Any, v: Any) -> float:
    """The largest entry of the vector `v` (0 for an empty one)."""
    return float(xp.max(v)) if _size(_shape(v)) else 0.0


def _norm_argnums(argnums: Sequence[int], n: int, what: str) -> tuple[int, ...]:
    """`argnums` with negative entries counted from the end, as Python indexes; a
    `StructureError` for one out of range."""
    bad = [int(i) for i in argnums if not -n <= int(i) < n]
    if bad:
        raise StructureError(
            f"{what} {bad[0] if len(bad) == 1 else bad} out of range for {n} primals: "
            f"expected integers in [-{n}, {n}) (negative ones count from the end).")
    return tuple(int(i) % n for i in argnums)


def _refuse_complex(xp: Any, leaf: Any, where: str, what: str) -> None:
    """A `StructureError` for a derivative asked of a complex leaf (the reference does not
    differentiate complex parameters: that would be a silent None)."""
    if _is_complex(xp, leaf) or isinstance(leaf, complex):
        raise StructureError(
            f"{what}: {where} has a complex leaf (dtype {getattr(leaf, 'dtype', 'complex')}), "
            "and the reference backends differentiate real floating parameters only: a "
            "derivative with respect to it would be silently missing. Pass the real and "
            "imaginary parts as separate real arguments, or leave it out of the "
            "differentiation (argnums without it, a None tangent).")


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

    def linearize(self, F, x, args, *, derivatives=None, tags=frozenset(), argnums=None,
                  on_failure=None, name=None, kink_probe=None):
        return self.linearization_class(self, F, x, tuple(args), derivatives=derivatives,
                                        tags=tags, argnums=argnums, on_failure=on_failure,
                                        name=name, kink_probe=kink_probe)

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

    def _kept(self, f: ImplicitFunction, x: Any) -> tuple[Any, Any]:
        """The condition and the point to differentiate at: with `batch_dims` and
        `on_failure="nan"`, the failed elements leave the derivative (`drop_failed`), so one
        of them cannot spoil the gradient of what the batch shares (hand-written `Derivatives`
        know nothing of that: there the condition is kept as it is)."""
        if (f.batch_dims and f.derivatives is None
                and resolve_on_failure(f.on_failure, f.name) == "nan"):
            F, x_kept, _ = drop_failed(self, f.F, x, f.batch_dims)
            return F, x_kept
        return f.F, x

    def _lin(self, f: ImplicitFunction, x: Any, primals: tuple, argnums: Any,
             F: Any = None) -> Any:
        return self.linearize(F or f.F, x, primals, derivatives=f.derivatives, tags=f.tags,
                              argnums=argnums, on_failure=f.on_failure, name=f.name,
                              kink_probe=getattr(f, "kink_probe", None))

    def _cotangent(self, x: Any, cotangent: Any) -> Any:
        """The cotangent with its Python and NumPy scalar leaves made arrays of the dtype of
        the leaves of `x` (a float is the cotangent of a 0-d x); shapes are checked later."""
        xl, xdef = _tree.tree_flatten(x)
        cl, cdef = _tree.tree_flatten(cotangent)
        if cdef != xdef:
            return cotangent
        xp = self.namespace(*xl)
        out = [xp.asarray(c, dtype=leaf.dtype, device=_device(leaf))
               if isinstance(c, (int, float, np.generic)) and not isinstance(c, bool) else c
               for c, leaf in zip(cl, xl)]
        return _tree.tree_unflatten(xdef, out)

    def jvp(self, f, primals, tangents):
        f, options = self._need_implicit(f, "jvp")
        x, aux = self._primal(f, primals, options)
        F, x_lin = self._kept(f, x)
        lin = self._lin(f, x_lin, primals, None, F)
        x_dot = implicit_jvp(F, x_lin, primals, tangents, linearization=lin,
                             **self._rule_kwargs(f))
        return ((x, aux), (x_dot, None)) if f.has_aux else (x, x_dot)

    def vjp(self, f, primals, argnums):
        f, options = self._need_implicit(f, "vjp")
        if argnums is not None:
            argnums = _norm_argnums(argnums, len(primals), "vjp: argnums")
        x, aux = self._primal(f, primals, options)
        F, x_lin = self._kept(f, x)
        lin = self._lin(f, x_lin, primals, argnums, F)

        def vjp_fn(cotangent: Any) -> tuple:
            return implicit_vjp(F, x_lin, primals, self._cotangent(x, cotangent),
                                argnums=argnums, linearization=lin, **self._rule_kwargs(f))

        return ((x, aux) if f.has_aux else x), vjp_fn

    def jacobian(self, f, primals, argnums):
        f, options = self._need_implicit(f, "jacobian")
        argnums = _norm_argnums((argnums,), len(primals), "jacobian: argnums")[0]
        arg = primals[argnums]
        if not self.is_float(arg):
            _refuse_complex(self.namespace(*_tree.tree_flatten(primals)[0]), arg,
                            f"argument {argnums}", "jacobian")
            raise StructureError(
                f"jacobian: expected argument {argnums} to be a floating array or float, got "
                f"{type(arg).__name__}. For pytree arguments use idf.jvp/idf.vjp."
            )
        x, _ = self._primal(f, primals, options)
        lin = self._lin(f, x, primals, (argnums,))
        if f.derivatives is None or f.derivatives.jvp_x is None:
            lin.jac_x()  # many solves with one A: build it once (n products), not per solve
        xp, dev = lin.xp, lin.device
        shape = _shape(arg)
        p = _size(shape)
        xflat, unravel = ravel(self, x)
        n = xflat.shape[0]
        kw = self._rule_kwargs(f)
        wide = xp.result_type(xflat.dtype, xp.float64)
        if n == 0 or p == 0:
            J = xp.zeros((n, p), dtype=wide, device=dev)
        elif p <= n:
            cols = []
            for j in range(p):
                e = xp.reshape(_basis(xp, j, p, xp.float64, dev), shape)
                t = tuple(e if i == argnums else None for i in range(len(primals)))
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
