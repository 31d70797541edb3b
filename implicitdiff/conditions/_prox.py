"""Proximal operators and projections, written once against the array API.

Conventions:

- a proximal operator is `prox(y, theta, step) -> x` with
  $x = \\operatorname{prox}_{\\eta g_\\theta}(y) = \\arg\\min_x \\tfrac12\\|x - y\\|^2 +
  \\eta\\, g_\\theta(x)$, $\\eta$ = `step`;
- a projection is `projection(y, theta) -> x` with $x = \\arg\\min_{x \\in C_\\theta}
  \\|x - y\\|$ (the prox of the indicator of $C_\\theta$, for any step).

A parameter left as `None` takes its default (1 for $\\lambda$, radii and sums): that is what
`proximal_gradient` / `projected_gradient` pass when the solver has no `theta_g`.

Every operator is differentiable in `y` and in `theta` (regularization strengths, bounds, radii,
constraint data) by the framework's autodiff. Where an operator is not differentiable (a kink:
$|y_i| = \\eta\\lambda$ for the soft threshold, $y_i$ on a bound of the box, ...), autodiff gets the
derivative of one branch chosen by a strict comparison (`where(|y| > t, ...)`); the result is the
Jacobian of the active set, 0 off it and never NaN or huge. Branches are chosen on the real part,
so on NumPy arrays the operators are complex-step safe: the complex step gives exactly the same
branch derivatives (see `docs/conditions.md`).
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from .._errors import StructureError

__all__ = [
    "projection_affine",
    "projection_box",
    "projection_l2_ball",
    "projection_nonnegative",
    "projection_simplex",
    "prox_box",
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_l1",
    "prox_l2_ball",
    "prox_none",
    "prox_nonnegative",
    "prox_simplex",
]


def _ns(*arrays: Any) -> Any:
    return array_api_compat.array_namespace(*[a for a in arrays if hasattr(a, "dtype")])


def _re(xp: Any, a: Any) -> Any:
    """The real part of a complex array (the NumPy complex step), `a` itself otherwise: branches
    are decided on it, values computed on `a`, so the complex step sees the branch's derivative."""
    if hasattr(a, "dtype") and xp.isdtype(a.dtype, "complex floating"):
        return xp.real(a)
    if isinstance(a, complex):
        return a.real
    return a


def _full(xp: Any, y: Any, v: Any) -> Any:
    """`v` broadcast to the shape of `y` (keeps `v` differentiable)."""
    return v + xp.zeros_like(y)


def _zeros(xp: Any, y: Any) -> Any:
    return xp.zeros_like(y)


# ---- projections -------------------------------------------------------------------------------

def projection_nonnegative(y: Any, theta: Any = None) -> Any:
    """Projection onto the non-negative orthant, $\\max(y, 0)$.

    **Arguments:**

    - `y`: an array.
    - `theta`: unused (the set has no parameter); pass `None`.

    **Returns:** $\\max(y, 0)$ elementwise, with derivative $1$ where $y_i > 0$ and $0$ elsewhere.
    """
    xp = _ns(y)
    return xp.where(_re(xp, y) > 0, y, _zeros(xp, y))


def projection_box(y: Any, theta: Any) -> Any:
    """Projection onto the box $\\{x : l \\le x \\le u\\}$, $\\min(\\max(y, l), u)$.

    **Arguments:**

    - `y`: an array.
    - `theta`: `(lower, upper)`, numbers or arrays broadcastable to `y` (differentiable).

    **Returns:** $y$ clipped to $[l, u]$; the derivative in $y_i$ is 1 strictly inside the box,
    0 at or beyond a bound, where the derivative in $l_i$ (or $u_i$) is 1.
    """
    lower, upper = _pair(theta, "projection_box", "(lower, upper)")
    xp = _ns(y)
    yr = _re(xp, y)
    lo, hi = _full(xp, y, lower), _full(xp, y, upper)
    out = xp.where(yr < _re(xp, lo), lo, y)
    return xp.where(_re(xp, out) > _re(xp, hi), hi, out)


def projection_l2_ball(y: Any, theta: Any = 1.0, *, axis: int = -1) -> Any:
    """Projection onto the Euclidean ball $\\{x : \\|x\\|_2 \\le r\\}$ (along `axis`, so a 2-d
    `y` is projected row by row onto a product of balls).

    **Arguments:**

    - `y`: an array.
    - `theta`: the radius $r > 0$ (number or array, differentiable).
    - `axis`: the axis the norm is taken over (default the last).

    **Returns:** $y$ if $\\|y\\| \\le r$, else $r\\, y / \\|y\\|$.
    """
    xp = _ns(y)
    r = 1.0 if theta is None else theta
    sq = xp.sum(y * y, axis=axis, keepdims=True)
    outside = _re(xp, sq) > _re(xp, r) ** 2
    safe = xp.where(outside, sq, xp.ones_like(sq))  # no sqrt(0) in the unused branch
    return xp.where(outside, y * (r / xp.sqrt(safe)), y)


def projection_simplex(y: Any, theta: Any = 1.0) -> Any:
    """Projection onto the simplex $\\{x : x \\ge 0, \\sum_i x_i = s\\}$ along the last axis
    (a 2-d `y` is projected row by row onto a product of simplices).

    Sort-based (Held et al. 1974; Duchi et al. 2008): with $u$ the entries of $y$ sorted in
    decreasing order, $\\tau = \\max_k \\big(\\sum_{i \\le k} u_i - s\\big)/k$ and
    $x = \\max(y - \\tau, 0)$. The maximum is attained at $k = |\\operatorname{supp} x|$, so
    autodiff gives the Jacobian of the support $S$:
    $\\partial x_S / \\partial y_S = I - \\mathbf 1 \\mathbf 1^\\top / |S|$, zero off $S$.

    **Arguments:**

    - `y`: an array of shape `(..., n)`.
    - `theta`: the sum $s > 0$ (default 1; differentiable).

    **Returns:** the projection, shaped like `y`.
    """
    xp = _ns(y)
    theta = 1.0 if theta is None else theta
    n = y.shape[-1]
    order = xp.argsort(_re(xp, y), axis=-1, descending=True)
    u = xp.take_along_axis(y, order, axis=-1)
    css = xp.cumulative_sum(u, axis=-1) - theta
    real_dtype = _re(xp, u).dtype
    k = xp.arange(1, n + 1, dtype=real_dtype, device=array_api_compat.device(y))
    ratios = css / k
    j = xp.argmax(_re(xp, ratios), axis=-1, keepdims=True)
    tau = xp.take_along_axis(ratios, j, axis=-1)
    z = y - tau
    return xp.where(_re(xp, z) > 0, z, _zeros(xp, z))


def projection_affine(y: Any, theta: Any) -> Any:
    """Projection onto the affine set $\\{x : Cx = d\\}$,
    $x = y - C^\\top (C C^\\top)^{-1} (C y - d)$ ($C$ of full row rank).

    **Arguments:**

    - `y`: a vector of shape `(n,)`.
    - `theta`: `(C, d)` with `C` of shape `(m, n)`, `m <= n`, and `d` of shape `(m,)`
      (both differentiable).

    **Returns:** the projection, shape `(n,)`. Smooth in `y`, `C` and `d`.
    """
    C, d = _pair(theta, "projection_affine", "(C, d)")
    if getattr(y, "ndim", None) != 1 or getattr(C, "ndim", None) != 2 or C.shape[1] != y.shape[0]:
        raise StructureError(
            f"projection_affine: expected y of shape (n,) and C of shape (m, n), got y "
            f"{tuple(getattr(y, 'shape', ()))} and C {tuple(getattr(C, 'shape', ()))}."
        )
    if tuple(getattr(d, "shape", ())) != (C.shape[0],):
        raise StructureError(
            f"projection_affine: expected d of shape ({C.shape[0]},) like the rows of C, got "
            f"{tuple(getattr(d, 'shape', ()))}."
        )
    xp = _ns(y, C, d)
    return y - C.T @ xp.linalg.solve(C @ C.T, C @ y - d)


# ---- proximal operators ------------------------------------------------------------------------

def prox_none(y: Any, theta: Any = None, step: Any = 1.0) -> Any:
    """The proximal operator of $g = 0$: the identity (proximal gradient is then plain
    gradient descent)."""
    return y


def prox_l1(y: Any, theta: Any = 1.0, step: Any = 1.0) -> Any:
    """Soft thresholding, the proximal operator of $g(x) = \\lambda \\|x\\|_1$:
    $\\operatorname{prox}_{\\eta g}(y)_i = \\operatorname{sign}(y_i)
    \\max(|y_i| - \\eta\\lambda, 0)$.

    Written as `where(y > t, y - t, where(y < -t, y + t, 0))` with $t = \\eta\\lambda$, so
    autodiff gives $\\partial x_i/\\partial y_i = 1$ and
    $\\partial x_i / \\partial \\lambda = -\\eta\\,
    \\operatorname{sign}(y_i)$ where $|y_i| > t$, and 0 elsewhere (at the kink $|y_i| = t$ too).

    **Arguments:**

    - `y`: an array.
    - `theta`: $\\lambda \\ge 0$, a number or an array broadcastable to `y` (per-coordinate
      weights); differentiable.
    - `step`: $\\eta > 0$.

    **Returns:** the soft-thresholded array.
    """
    xp = _ns(y)
    t = (1.0 if theta is None else theta) * step
    yr, tr = _re(xp, y), _re(xp, t)
    # two strict comparisons, no sign(): each branch is linear in (y, t), the kink gets 0
    return xp.where(yr > tr, y - t, xp.where(yr < -tr, y + t, _zeros(xp, y)))


def prox_elastic_net(y: Any, theta: Any, step: Any = 1.0) -> Any:
    """The proximal operator of $g(x) = \\lambda_1 \\|x\\|_1 + \\tfrac{\\lambda_2}{2}\\|x\\|_2^2$:
    $\\operatorname{prox}_{\\eta g}(y) = \\operatorname{soft}(y, \\eta\\lambda_1) / (1 +
    \\eta\\lambda_2)$.

    **Arguments:**

    - `y`: an array.
    - `theta`: `(lam1, lam2)`, both $\\ge 0$ (differentiable).
    - `step`: $\\eta > 0$.

    **Returns:** the proximal point.
    """
    lam1, lam2 = _pair(theta, "prox_elastic_net", "(lam1, lam2)")
    return prox_l1(y, lam1, step) / (1 + step * lam2)


def prox_group_lasso(y: Any, theta: Any = 1.0, step: Any = 1.0, *, axis: int = -1) -> Any:
    """Block soft thresholding, the proximal operator of $g(x) = \\lambda \\sum_G \\|x_G\\|_2$
    with the groups $G$ the slices along `axis`: for `y` of shape `(n_groups, group_size)` and
    `axis=-1`, one group per row; a 1-d `y` is a single group.
    $\\operatorname{prox}_{\\eta g}(y)_G = \\max(0, 1 - \\eta\\lambda/\\|y_G\\|)\\, y_G$.

    The norm is never evaluated at 0 in a branch that is used or differentiated (no NaN
    gradients for groups set to zero). For unequal groups, pad them or make `x` a tuple of groups
    with one call per group in your own `prox`.

    **Arguments:**

    - `y`: an array.
    - `theta`: $\\lambda \\ge 0$ (a number, or an array broadcastable to one value per group).
    - `step`: $\\eta > 0$.
    - `axis`: the axis within a group (default the last).

    **Returns:** the proximal point, shaped like `y`.
    """
    xp = _ns(y)
    t = (1.0 if theta is None else theta) * step
    sq = xp.sum(y * y, axis=axis, keepdims=True)
    active = _re(xp, sq) > _re(xp, t) ** 2
    safe = xp.where(active, sq, xp.ones_like(sq))
    return xp.where(active, y * (1 - t / xp.sqrt(safe)), _zeros(xp, y))


def prox_nonnegative(y: Any, theta: Any = None, step: Any = 1.0) -> Any:
    """The proximal operator of the indicator of $\\{x \\ge 0\\}$: `projection_nonnegative`
    (`theta` and `step` unused)."""
    return projection_nonnegative(y)


def prox_box(y: Any, theta: Any, step: Any = 1.0) -> Any:
    """The proximal operator of the indicator of the box $[l, u]$, `theta = (lower, upper)`:
    `projection_box` (`step` unused)."""
    return projection_box(y, theta)


def prox_l2_ball(y: Any, theta: Any = 1.0, step: Any = 1.0) -> Any:
    """The proximal operator of the indicator of $\\{\\|x\\|_2 \\le r\\}$ (last axis), `theta`
    the radius: `projection_l2_ball` (`step` unused)."""
    return projection_l2_ball(y, theta)


def prox_simplex(y: Any, theta: Any = 1.0, step: Any = 1.0) -> Any:
    """The proximal operator of the indicator of the simplex of sum $s$ = `theta` (last axis):
    `projection_simplex` (`step` unused)."""
    return projection_simplex(y, theta)


def _pair(theta: Any, who: str, what: str) -> tuple[Any, Any]:
    if not (isinstance(theta, (tuple, list)) and len(theta) == 2):
        raise StructureError(
            f"{who}: expected theta = {what}, a pair, got {type(theta).__name__}"
            + (f" of length {len(theta)}" if isinstance(theta, (tuple, list)) else "") + "."
        )
    return theta[0], theta[1]
