"""Cone programs: projections onto the zero cone, the non-negative orthant, second-order cones
and the PSD cone, and the optimality condition of a cone program, written once against the
array API.

The cone program, in the form of Clarabel, SCS and CVXPY's conic solvers:

$$\\min_x\\ \\tfrac12 x^\\top P x + c^\\top x \\quad\\text{s.t.}\\quad A x + s = b,\\ s \\in K,$$

with $K$ a product of cones in the order zero cone $\\{0\\}^f$, non-negative orthant
$\\mathbb{R}^l_+$, second-order cones $\\{(t, u) : \\|u\\|_2 \\le t\\}$, PSD cones of symmetric
$d \\times d$ matrices (stored as their scaled triangle, "svec": off-diagonal entries times
$\\sqrt 2$, so the inner product is the trace inner product).

The condition (`cone_program`) has the unknown $z = (x, w)$, $w$ the Moreau variable of the dual
$y$ and the slack $s$: $y = \\Pi_{K^*}(w)$ and $s = \\Pi_{K^*}(w) - w$, so $y \\in K^*$,
$s \\in K$ and $y^\\top s = 0$ hold by construction (Moreau's decomposition). What is left:

$$F(x, w) = \\begin{pmatrix} P x + c + A^\\top \\Pi_{K^*}(w) \\\\
A x + \\Pi_{K^*}(w) - w - b \\end{pmatrix} = 0,$$

stationarity and primal feasibility. This is the residual map of Busseti, Moursi and Boyd
("Solution refinement at regular points of conic problems", 2019) and Agrawal et al.
("Differentiating through a cone program", 2019) with the homogenizing variable fixed to 1.
$\\partial_z F = \\begin{pmatrix} P & A^\\top D \\\\ A & D - I\\end{pmatrix}$ with
$D = \\partial \\Pi_{K^*}(w)$: nonsingular at a solution that is unique and strictly
complementary (what the implicit function theorem needs).

**Kinks.** $\\Pi_{K^*}$ is not differentiable where an eigenvalue of $w$ is zero (an entry of
the orthant part, $t \\pm \\|u\\|$ of a second-order block, an eigenvalue of a PSD block). There
the projections use one element of the generalized (Clarke) Jacobian, chosen the same way in
every cone: the derivative of $\\max(\\lambda, 0)$ is taken as 1 for $\\lambda > 0$ and 0 for
$\\lambda \\le 0$. So: orthant, $1$ where $w_i > 0$, else $0$; second-order block $(t, u)$,
$r = \\|u\\|$: the identity where $t - r > 0$, zero where $t + r \\le 0$, else
$\\tfrac12\\begin{pmatrix}1 & \\bar u^\\top\\\\ \\bar u & (1 + t/r) I - (t/r)\\bar u \\bar u^\\top
\\end{pmatrix}$, $\\bar u = u / r$; PSD block $W = V \\Lambda V^\\top$: $\\Delta \\mapsto
V (\\Gamma \\circ V^\\top \\Delta V) V^\\top$ with $\\Gamma_{ij}$ = 1 if
$\\lambda_i, \\lambda_j > 0$,
0 if both $\\le 0$, $(\\lambda_i^+ + \\lambda_j^+) / (|\\lambda_i| + |\\lambda_j|)$
otherwise (the divided difference of $\\max(\\cdot, 0)$, finite for repeated eigenvalues).
Deterministic and never NaN. At a strictly complementary solution no eigenvalue is zero and
this is the derivative.

**How the autodiff frameworks see that element.** The second-order and PSD projections are
written as $\\Pi(w_0) + J(w_0)(w - w_0)$ with $w_0$ a copy of $w$ that carries no derivative
(made through an integer cast, the one operation every array-API framework treats as constant);
the value is $\\Pi(w)$ (to rounding) and autodiff of it gives exactly $J(w_0)$, the element above,
instead of differentiating `eigh` (whose derivative is infinite at repeated eigenvalues). On NumPy,
`cone_program(...).derivatives` are the hand-written products with the same $J$.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

from .._errors import StructureError
from .._root import Derivatives
from ._conditions import Condition

__all__ = [
    "ConeProgram",
    "Cones",
    "cone_program",
    "projection_cone",
]


@dataclass(frozen=True)
class Cones:
    """The cone $K$ of a cone program: a product, in this order, of the zero cone
    $\\{0\\}^{\\text{zero}}$, the orthant $\\mathbb{R}_+^{\\text{nonnegative}}$, second-order cones
    of the sizes in `second_order` (each block $(t, u)$, $\\|u\\| \\le t$, of length $1 +
    \\dim u$), and PSD cones of the matrix sizes $d$ in `psd` (each block the $d(d+1)/2$ entries
    of a triangle, off-diagonal entries times $\\sqrt 2$).

    **Arguments:**

    - `zero`, `nonnegative`: sizes of the zero cone and of the orthant.
    - `second_order`: the lengths of the second-order blocks.
    - `psd`: the matrix sizes $d$ of the PSD blocks.
    - `psd_triangle`: the order of a PSD block's entries: `"upper"` (the upper triangle column
      by column: Clarabel) or `"lower"` (the lower triangle column by column: SCS).

    This is the layout of CVXPY's `ConeDims` and of Clarabel's and SCS's cones
    (`Cones.from_cvxpy(dims, psd_triangle=...)`).
    """

    zero: int = 0
    nonnegative: int = 0
    second_order: tuple[int, ...] = ()
    psd: tuple[int, ...] = ()
    psd_triangle: str = "upper"
    _plan: dict = field(default_factory=dict, init=False, repr=False, compare=False,
                        hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "second_order", tuple(int(d) for d in self.second_order))
        object.__setattr__(self, "psd", tuple(int(d) for d in self.psd))
        for name in ("zero", "nonnegative"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"Cones: expected {name} to be a non-negative int, got {v!r}.")
            object.__setattr__(self, name, int(v))
        if any(d < 1 for d in self.second_order):
            raise ValueError(f"Cones: expected second-order block lengths >= 1, got "
                             f"{self.second_order}.")
        if any(d < 1 for d in self.psd):
            raise ValueError(f"Cones: expected PSD matrix sizes >= 1, got {self.psd}.")
        if self.psd_triangle not in ("upper", "lower"):
            raise ValueError(f"Cones: expected psd_triangle 'upper' (Clarabel) or 'lower' "
                             f"(SCS), got {self.psd_triangle!r}.")

    @property
    def size(self) -> int:
        """The length $m$ of a vector of $K$."""
        return (self.zero + self.nonnegative + sum(self.second_order) +
                sum(d * (d + 1) // 2 for d in self.psd))

    @classmethod
    def from_cvxpy(cls, dims: Any, *, psd_triangle: str = "upper") -> Cones:
        """The cones of CVXPY's `ConeDims` (`problem.get_problem_data(...)[0]["dims"]`).
        Exponential and power cones are refused (`NotImplementedError`)."""
        for name, what in (("exp", "exponential"), ("p3d", "3-d power"),
                           ("pnd", "n-d power")):
            v = getattr(dims, name, 0)
            if (len(v) if isinstance(v, (list, tuple)) else int(v or 0)):
                raise NotImplementedError(f"Cones.from_cvxpy: the {what} cone is not supported.")
        return cls(zero=int(dims.zero), nonnegative=int(dims.nonneg),
                   second_order=tuple(dims.soc), psd=tuple(dims.psd), psd_triangle=psd_triangle)

    # -- index plan (NumPy, cached): how w splits into blocks of equal size ---------------------
    def plan(self) -> dict:
        """Index arrays for the vectorized projection (NumPy, built once)."""
        if self._plan:
            return self._plan
        m = self.size
        start = self.zero + self.nonnegative
        soc: dict[int, list[np.ndarray]] = {}
        for d in self.second_order:
            soc.setdefault(d, []).append(np.arange(start, start + d))
            start += d
        psd: dict[int, list[np.ndarray]] = {}
        for d in self.psd:
            t = d * (d + 1) // 2
            psd.setdefault(d, []).append(np.arange(start, start + t))
            start += t
        order = [np.arange(self.zero + self.nonnegative)]
        soc_groups = []
        for d, idx in soc.items():
            g = np.stack(idx)
            soc_groups.append((d, g))
            order.append(g.reshape(-1))
        psd_groups = []
        for d, idx in psd.items():
            g = np.stack(idx)
            full, scale_full, tri, scale_tri = _svec_maps(d, self.psd_triangle)
            psd_groups.append((d, g, full, scale_full, tri, scale_tri))
            order.append(g.reshape(-1))
        perm = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
        inv = np.empty(m, dtype=np.int64)
        inv[perm] = np.arange(m)
        self._plan.update(soc=soc_groups, psd=psd_groups, inv=inv)
        return self._plan


def _svec_maps(d: int, triangle: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For a PSD block of size d: `full` (d*d,) the svec index of each matrix entry (C order),
    `scale_full` the factor turning svec entries into matrix entries (1 or 1/sqrt 2), `tri`
    the C-order flat matrix index of each svec entry, `scale_tri` (1 or sqrt 2)."""
    if triangle == "upper":
        pairs = [(i, j) for j in range(d) for i in range(j + 1)]
    else:
        pairs = [(i, j) for j in range(d) for i in range(j, d)]
    full = np.empty(d * d, dtype=np.int64)
    scale_full = np.empty(d * d)
    tri = np.empty(len(pairs), dtype=np.int64)
    scale_tri = np.empty(len(pairs))
    for k, (i, j) in enumerate(pairs):
        full[i * d + j] = full[j * d + i] = k
        s = 1.0 if i == j else 1.0 / math.sqrt(2.0)
        scale_full[i * d + j] = scale_full[j * d + i] = s
        tri[k] = i * d + j
        scale_tri[k] = 1.0 if i == j else math.sqrt(2.0)
    return full, scale_full, tri, scale_tri


# ---- helpers -------------------------------------------------------------------------------

def _ns(*arrays: Any) -> Any:
    return array_api_compat.array_namespace(*[a for a in arrays if hasattr(a, "dtype")])


def _device(a: Any) -> Any:
    return array_api_compat.device(a)


def _const(xp: Any, a: np.ndarray, like: Any) -> Any:
    """A NumPy index or factor array as a constant of `like`'s framework (and dtype, for
    floating factors)."""
    if np.issubdtype(a.dtype, np.integer):
        return xp.asarray(a, device=_device(like))
    return xp.asarray(a, dtype=like.dtype, device=_device(like))


def constant_copy(xp: Any, w: Any) -> Any:
    """A copy of the floating array `w` equal to it to within one rounding, that carries no
    derivative in any framework: the mantissa goes through an integer array (integer arrays have
    no derivative in JAX, PyTorch or the NumPy reference), the exponent too."""
    it = xp.int64 if w.dtype == xp.float64 else xp.int32
    nmant = 52 if w.dtype == xp.float64 else 23
    a = xp.abs(w)
    a = xp.where(a > 0, a, xp.ones_like(a))
    e = xp.astype(xp.floor(xp.log2(a)), it)
    s = xp.clip(nmant - e, -900 if nmant == 52 else -100, 900 if nmant == 52 else 100)
    sf = xp.astype(s, w.dtype)
    two = xp.asarray(2.0, dtype=w.dtype, device=_device(w))
    mant = xp.astype(w * xp.pow(two, sf), it)
    return xp.astype(mant, w.dtype) * xp.pow(two, -sf)


def _take(xp: Any, a: Any, idx: Any) -> Any:
    """`a[..., idx]` for an integer array `idx` of any shape (result `(..., *idx.shape)`)."""
    flat = xp.take(a, xp.reshape(idx, (-1,)), axis=a.ndim - 1)
    return xp.reshape(flat, (*a.shape[:-1], *idx.shape))


# ---- the blocks: value and Jacobian at w0 ------------------------------------------------------

def _soc_parts(xp: Any, v0: Any) -> tuple[Any, Callable[[Any], Any]]:
    """Projection of second-order blocks `v0` (..., k, d) and the product with the chosen
    Jacobian element at `v0`."""
    t = v0[..., :1]
    u = v0[..., 1:]
    r = xp.sqrt(xp.sum(u * u, axis=-1, keepdims=True))
    inside = (t - r) > 0
    polar = (t + r) <= 0
    r_safe = xp.where(r > 0, r, xp.ones_like(r))
    ub = u / r_safe
    half = 0.5 * (t + r)
    mid = xp.concat([half, half * ub], axis=-1)
    zero = xp.zeros_like(v0)
    value = xp.where(inside, v0, xp.where(polar, zero, mid))
    ratio = t / r_safe

    def jac(dv: Any) -> Any:
        dt, du = dv[..., :1], dv[..., 1:]
        ud = xp.sum(ub * du, axis=-1, keepdims=True)
        jt = 0.5 * (dt + ud)
        ju = 0.5 * (ub * dt + (1.0 + ratio) * du - ratio * ub * ud)
        jm = xp.concat([jt, ju], axis=-1)
        return xp.where(inside, dv, xp.where(polar, xp.zeros_like(dv), jm))

    return value, jac


def _psd_parts(xp: Any, v0: Any, full: Any, scale_full: Any, tri: Any, scale_tri: Any, d: int
               ) -> tuple[Any, Callable[[Any], Any]]:
    """Projection of PSD blocks `v0` (..., k, t) (svec) and the product with the chosen Jacobian
    element (divided differences of max(λ, 0) in the eigenbasis)."""

    def smat(v: Any) -> Any:
        return xp.reshape(_take(xp, v, full) * scale_full, (*v.shape[:-1], d, d))

    def svec(M: Any) -> Any:
        return _take(xp, xp.reshape(M, (*M.shape[:-2], d * d)), tri) * scale_tri

    W = smat(v0)
    lam, V = xp.linalg.eigh(W)
    pos = lam > 0
    lp = xp.where(pos, lam, xp.zeros_like(lam))
    Vt = xp.matrix_transpose(V)
    value = svec(xp.matmul(V * lp[..., None, :], Vt))
    pi, pj = pos[..., :, None], pos[..., None, :]
    num = lp[..., :, None] + lp[..., None, :]
    den = xp.abs(lam)[..., :, None] + xp.abs(lam)[..., None, :]
    mixed = pi != pj
    den = xp.where(mixed, den, xp.ones_like(den))
    gamma = xp.where(pi & pj, xp.ones_like(den), xp.where(mixed, num / den, xp.zeros_like(den)))

    def jac(dv: Any) -> Any:
        D = smat(dv)
        return svec(xp.matmul(V, xp.matmul(gamma * xp.matmul(Vt, xp.matmul(D, V)), Vt)))

    return value, jac


def _parts(cones: Cones, xp: Any, w0: Any) -> tuple[Any, Callable[[Any], Any]]:
    """$\\Pi_{K^*}(w_0)$ and $v \\mapsto J v$ with $J$ the chosen element of
    $\\partial \\Pi_{K^*}(w_0)$, on the last axis of `w0`."""
    plan = cones.plan()
    f, l = cones.zero, cones.nonnegative
    zf = w0[..., :f]
    nn = w0[..., f:f + l]
    pos = nn > 0
    pieces = [zf, xp.where(pos, nn, xp.zeros_like(nn))]
    jacs: list[Callable[[Any], Any]] = []
    for _, g in plan["soc"]:
        val, jac_s = _soc_parts(xp, _take(xp, w0, _const(xp, g, w0)))
        pieces.append(xp.reshape(val, (*w0.shape[:-1], -1)))
        jacs.append(jac_s)
    for d, g, full, sf, tri, st in plan["psd"]:
        val, jac_p = _psd_parts(xp, _take(xp, w0, _const(xp, g, w0)), _const(xp, full, w0),
                                _const(xp, sf, w0), _const(xp, tri, w0), _const(xp, st, w0), d)
        pieces.append(xp.reshape(val, (*w0.shape[:-1], -1)))
        jacs.append(jac_p)
    inv = _const(xp, plan["inv"], w0)
    groups = [g for _, g in plan["soc"]] + [p[1] for p in plan["psd"]]

    def assemble(ps: list) -> Any:
        cat = xp.concat(ps, axis=-1)
        if not groups:  # no second-order or PSD block: already in order
            return cat
        return xp.take(cat, inv, axis=cat.ndim - 1)

    value = assemble(pieces)

    def jac(v: Any) -> Any:
        if tuple(v.shape[:-1]) != tuple(w0.shape[:-1]):  # extra leading axes (columns of J)
            v = v + xp.zeros((*w0.shape[:-1], 1), dtype=v.dtype, device=_device(v))
        ps = [v[..., :f], xp.where(pos, v[..., f:f + l], xp.zeros_like(v[..., f:f + l]))]
        for g, jc in zip(groups, jacs):
            ps.append(xp.reshape(jc(_take(xp, v, _const(xp, g, v))), (*v.shape[:-1], -1)))
        return assemble(ps)

    return value, jac


def projection_cone(w: Any, cones: Cones, *, dual: bool = False) -> Any:
    """Projection onto the cone $K$ described by `cones` (or onto its dual $K^*$ with
    `dual=True`), on the last axis of `w` (leading axes are a batch).

    $K$ is self-dual except for its zero cone, whose dual is the whole space: with `dual=True`
    the zero-cone entries are kept, without they become 0. Differentiable by every framework's
    autodiff, with the generalized-Jacobian element described in this module (deterministic,
    never NaN, the derivative wherever $\\Pi$ is differentiable).

    **Arguments:**

    - `w`: an array with last axis of length `cones.size`.
    - `cones`: a `Cones`.
    - `dual`: project onto $K^*$ instead of $K$.

    **Returns:** the projection, shaped like `w`.
    """
    if not isinstance(cones, Cones):
        raise TypeError(f"projection_cone: expected cones to be an idf.conditions.Cones, got "
                        f"{type(cones).__name__}.")
    xp = _ns(w)
    if w.shape[-1] != cones.size:
        raise StructureError(f"projection_cone: expected the last axis of w to have length "
                             f"{cones.size} (cones.size), got shape {tuple(w.shape)}.")
    y = _frozen_projection(cones, xp, w)
    if dual or not cones.zero:
        return y
    return xp.concat([xp.zeros_like(w[..., :cones.zero]), y[..., cones.zero:]], axis=-1)


def _frozen_projection(cones: Cones, xp: Any, w: Any) -> Any:
    """$\\Pi_{K^*}(w)$ as $\\Pi(w_0) + J(w_0)(w - w_0)$, $w_0$ a derivative-free copy of $w$."""
    if not cones.second_order and not cones.psd:  # the orthant's `where` differentiates as is
        return _parts(cones, xp, w)[0]
    w0 = constant_copy(xp, w)
    value, jac = _parts(cones, xp, w0)
    return value + jac(w - w0)


# ---- the condition ------------------------------------------------------------------------------

def _matvec(xp: Any, M: Any, v: Any) -> Any:
    return xp.matmul(M, v[..., None])[..., 0]


def _rmatvec(xp: Any, M: Any, v: Any) -> Any:
    return xp.matmul(xp.matrix_transpose(M), v[..., None])[..., 0]


class ConeProgram(Condition):
    """The optimality condition of a cone program (see `cone_program`). A `Condition` with the
    cones (`cones`) and hand-written products for the NumPy reference (`derivatives`, an
    `idf.Derivatives`; JAX and PyTorch differentiate the condition themselves)."""

    __slots__ = ("cones", "derivatives")

    def __init__(self, fn: Callable[..., Any], name: str, cones: Cones,
                 derivatives: Derivatives):
        super().__init__(fn, name, blocks=("stationarity", "primal"))
        self.cones = cones
        self.derivatives = derivatives


def cone_program(cones: Cones) -> ConeProgram:
    """The optimality condition of the cone program
    $\\min_x \\tfrac12 x^\\top P x + c^\\top x$ s.t. $A x + s = b$, $s \\in K$:

    $$F\\big((x, w), A, b, c, P\\big) = \\big(P x + c + A^\\top \\Pi_{K^*}(w),\\
    A x + \\Pi_{K^*}(w) - w - b\\big),$$

    with the dual $y = \\Pi_{K^*}(w)$ and the slack $s = y - w$ (see the module's notes for the
    mathematics and the generalized-Jacobian element used at kinks).

    ```python
    F = idf.conditions.cone_program(idf.conditions.Cones(nonnegative=m))

    @idf.custom_root(F, derivatives=F.derivatives, kink_probe=False)
    def solve_lp(A, b, c):
        ...  # any conic solver: x, the dual y and the slack s
        return x, y - s
    ```

    **Arguments:**

    - `cones`: the `Cones` of $K$.

    **Returns:** a `ConeProgram` condition `F(z, A, b, c, P=None)`: `z = (x, w)`, `A` of shape
    `(..., m, n)`, `b` `(..., m)`, `c` `(..., n)`, `P` `(..., n, n)` symmetric (None or left
    out: a linear objective). Leading axes are a batch (use `batch_dims`). `F.derivatives`
    holds hand-written products for the NumPy reference; pass `kink_probe=False` to the
    decorator (the condition has kinks by design, handled as documented).
    """
    if not isinstance(cones, Cones):
        raise TypeError(f"cone_program: expected cones to be an idf.conditions.Cones, got "
                        f"{type(cones).__name__}.")

    def F(z: Any, A: Any, b: Any, c: Any, P: Any = None) -> Any:
        x, w = _unpack(z)
        xp = _ns(x, w, A)
        y = _frozen_projection(cones, xp, w)
        r1 = c + _rmatvec(xp, A, y)
        if P is not None:
            r1 = r1 + _matvec(xp, P, x)
        r2 = _matvec(xp, A, x) + y - w - b
        return (r1, r2)

    # ---- the NumPy reference: products with the same Jacobian element (array API, so the
    # core's residual scaling may call them with any framework's arrays) ----------------------
    def jvp_x(v: Any, z: Any, A: Any, b: Any, c: Any, P: Any = None) -> Any:
        x, w = _unpack(z)
        dx, dw = _unpack(v)
        xp = _ns(x, w, A)
        _, jac = _parts(cones, xp, w)
        dy = jac(dw)
        r1 = _rmatvec(xp, A, dy)
        if P is not None:
            r1 = r1 + _matvec(xp, P, dx)
        return (_like(xp, r1, x), _like(xp, _matvec(xp, A, dx) + dy - dw, w))

    def vjp_x(u: Any, z: Any, A: Any, b: Any, c: Any, P: Any = None) -> Any:
        x, w = _unpack(z)
        u1, u2 = _unpack(u)
        xp = _ns(x, w, A)
        _, jac = _parts(cones, xp, w)
        gx = _rmatvec(xp, A, u2)
        if P is not None:
            gx = gx + _rmatvec(xp, P, u1)
        gw = jac(_matvec(xp, A, u1) + u2) - u2
        return (_like(xp, gx, x), _like(xp, gw, w))

    def jvp_args(args_dot: Any, z: Any, A: Any, b: Any, c: Any, P: Any = None) -> Any:
        x, w = _unpack(z)
        xp = _ns(x, w, A)
        y = _parts(cones, xp, w)[0]
        dA, db, dc, *rest = tuple(args_dot) + (None,) * (4 - len(args_dot))
        dP = rest[0] if rest else None
        r1 = xp.zeros_like(x)
        r2 = xp.zeros_like(w)
        if dA is not None:
            r1 = r1 + _rmatvec(xp, dA, y)
            r2 = r2 + _matvec(xp, dA, x)
        if dc is not None:
            r1 = r1 + dc
        if dP is not None and P is not None:
            r1 = r1 + _matvec(xp, dP, x)
        if db is not None:
            r2 = r2 - db
        return (_like(xp, r1, x), _like(xp, r2, w))

    def vjp_args(u: Any, z: Any, A: Any, b: Any, c: Any, P: Any = None) -> Any:
        x, w = _unpack(z)
        u1, u2 = _unpack(u)
        xp = _ns(x, w, A)
        y = _parts(cones, xp, w)[0]
        gA = y[..., :, None] * u1[..., None, :] + u2[..., :, None] * x[..., None, :]
        out = [_sum_to(xp, gA, A), _sum_to(xp, -u2, b), _sum_to(xp, u1, c)]
        if P is not None:
            out.append(_sum_to(xp, u1[..., :, None] * x[..., None, :], P))
        return tuple(out)

    def jacobian_x(z: Any, A: Any, b: Any, c: Any, P: Any = None) -> Any:
        # [[P, Aᵀ D], [A, D - I]] on the raveled (x, w), D the chosen element of ∂Π_{K*}(w)
        # (symmetric); every backend's dense linear solvers take A from here
        x, w = _unpack(z)
        xp = _ns(x, w, A)
        n, m = x.shape[-1], w.shape[-1]
        batch = tuple(w.shape[:-1])
        _, jac = _parts(cones, xp, w)
        eye = xp.eye(m, dtype=w.dtype, device=_device(w))
        cols = jac(xp.reshape(eye, (m, *([1] * len(batch)), m)))  # (m, *batch, m): J e_i
        D = xp.permute_dims(cols, (*range(1, len(batch) + 1), len(batch) + 1, 0))
        A_ = A + xp.zeros((*batch, 1, 1), dtype=A.dtype, device=_device(A)) if batch else A
        At = xp.matrix_transpose(A_)
        top_left = (P if P is not None else
                    xp.zeros((*batch, n, n), dtype=w.dtype, device=_device(w)))
        if tuple(top_left.shape[:-2]) != batch:
            top_left = top_left + xp.zeros((*batch, 1, 1), dtype=w.dtype, device=_device(w))
        top = xp.concat([top_left, xp.matmul(At, D)], axis=-1)
        bottom = xp.concat([A_, D - eye], axis=-1)
        return xp.concat([top, bottom], axis=-2)

    d = Derivatives(jvp_x=jvp_x, vjp_x=vjp_x, jvp_args=jvp_args, vjp_args=vjp_args,
                    jacobian_x=jacobian_x)
    return ConeProgram(F, "cone_program", cones, d)


def _unpack(z: Any) -> tuple[Any, Any]:
    if not (isinstance(z, (tuple, list)) and len(z) == 2):
        raise StructureError(f"cone_program: expected z = (x, w), a pair of arrays, got "
                             f"{type(z).__name__}.")
    return z[0], z[1]


def _like(xp: Any, a: Any, x: Any) -> Any:
    """`a` broadcast to the shape of `x` (a product that a shared argument left unbatched)."""
    if tuple(a.shape) != tuple(x.shape):
        a = a + xp.zeros_like(x)
    return a


def _sum_to(xp: Any, g: Any, like: Any) -> Any:
    """`g` summed over the leading axes it has beyond `like`'s (a shared argument of a batch)."""
    extra = g.ndim - like.ndim
    if extra > 0:
        g = xp.sum(g, axis=tuple(range(extra)))
    return g


def newton_refine(F: ConeProgram, x: np.ndarray, w: np.ndarray, A: np.ndarray, b: np.ndarray,
                  c: np.ndarray, P: np.ndarray | None, *, steps: int = 8
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Semismooth Newton on the condition `F` (a `cone_program`; NumPy, one problem, dense
    steps with `F.derivatives.jacobian_x`): refines a conic solver's answer, accurate to its
    tolerance, to the rounding level. A step is kept only where it lowers $\\max|F|$.
    Returns `(x, w, max|F|)`."""
    n = x.shape[0]
    args = (A, b, c) if P is None else (A, b, c, P)
    jacobian_x = F.derivatives.jacobian_x
    assert jacobian_x is not None

    def resid(x_: np.ndarray, w_: np.ndarray) -> np.ndarray:
        return np.concatenate(F((x_, w_), *args))

    r = resid(x, w)
    best = float(np.max(np.abs(r), initial=0.0))
    for _ in range(steps):
        if not np.isfinite(best) or best == 0.0:
            break
        try:
            step = np.linalg.solve(jacobian_x((x, w), *args), -r)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(step)):
            break
        xn, wn = x + step[:n], w + step[n:]
        rn = resid(xn, wn)
        new = float(np.max(np.abs(rn), initial=0.0))
        if not new < best:
            break
        x, w, r, best = xn, wn, rn, new
    return x, w, best
