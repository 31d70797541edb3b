"""The optimality conditions of the common problem classes, as conditions `F` for
`idf.custom_root`.

Each builder returns a `Condition`: a callable `F(x, *args)` with the structure tags of
$\\partial_x F$ in `F.tags`, to be passed on as
`idf.custom_root(F, tags=F.tags)`. Everything is written against the array API, so the same
condition runs on NumPy arrays (the reference, gradients by the complex step), JAX arrays and torch
tensors (gradients by the framework's autodiff).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import array_api_compat

from .. import _tree
from .._backend import get_backend
from .._errors import StructureError
from .._root import check_like, fixed_point_condition
from .._tags import Tag, positive_definite, symmetric
from ._grad import grad_x, vjp_x

_PD = positive_definite  # `least_squares` has an argument of this name

__all__ = [
    "Condition",
    "fixed_point",
    "kkt",
    "least_squares",
    "mirror_descent",
    "projected_gradient",
    "proximal_gradient",
    "stationarity",
]


class Condition:
    """An optimality condition $F(x, \\theta) = 0$ with the structure of $\\partial_x F$.

    Call it as `F(x, *args)`. Pass it to the decorator with its tags:
    `idf.custom_root(F, tags=F.tags)`.

    **Attributes:**

    - `tags`: a frozenset of `idf.symmetric` / `idf.positive_definite`, the structure of
      $\\partial_x F$ at a solution.
    - `__name__`: a readable name, used in error messages and diagnostics.
    - `blocks`: for a condition that returns a tuple of blocks, their names in order (`kkt`:
      `("stationarity", "equality", "complementarity")`, leaving out absent kinds), so a failed
      residual check can say which block is off; `None` for a condition of one block.
    """

    __slots__ = ("__name__", "_fn", "blocks", "tags")

    def __init__(self, fn: Callable[..., Any], name: str, tags: frozenset[Tag] = frozenset(),
                 blocks: tuple[str, ...] | None = None):
        self._fn = fn
        self.__name__ = name
        self.tags = frozenset(tags)
        self.blocks = blocks

    def __call__(self, x: Any, *args: Any) -> Any:
        return self._fn(x, *args)

    def __repr__(self) -> str:
        tags = ", ".join(sorted(t.name for t in self.tags))
        return f"<condition {self.__name__}" + (f" tags {{{tags}}}>" if tags else ">")


# ---- validation --------------------------------------------------------------------------------

def _name(fn: Any, default: str) -> str:
    return getattr(fn, "__name__", default)


def _callable(fn: Any, who: str, what: str) -> None:
    if not callable(fn):
        raise TypeError(f"{who}: expected {what} to be callable, got {type(fn).__name__}.")


def _optional_callable(fn: Any, who: str, what: str) -> None:
    if fn is not None:
        _callable(fn, who, what)


def _step(step: Any, who: str) -> float:
    value = float(step) if isinstance(step, numbers.Real) and not isinstance(step, bool) else None
    if value is None or not 0.0 < value < float("inf"):
        raise ValueError(f"{who}: expected step to be a positive finite number, got {step!r}.")
    return value


def _check_like(out: Any, x: Any, what: str) -> None:
    check_like(get_backend(x), out, x, what)


def _gradient(f: Callable[..., Any], grad: Callable[..., Any] | None, x: Any, args: tuple,
              who: str) -> Any:
    if grad is not None:
        g = grad(x, *args)
        _check_like(g, x, f"{who}: grad(x, ...)")
        return g
    g = grad_x(f, x, args, who=who)
    return g


def _sub(a: Any, b: Any) -> Any:
    """a - b leaf by leaf (pytrees of one structure)."""
    al, adef = _tree.tree_flatten(a)
    bl = _tree.tree_flatten(b)[0]
    return _tree.tree_unflatten(adef, [u - v for u, v in zip(al, bl)])


def _scale(a: Any, c: float) -> Any:
    """c * a leaf by leaf (`a` itself when c == 1, so the default step changes no bit)."""
    if c == 1.0:
        return a
    al, adef = _tree.tree_flatten(a)
    return _tree.tree_unflatten(adef, [c * u for u in al])


def _axpy(x: Any, step: float, g: Any) -> Any:
    """x - step * g leaf by leaf."""
    xl, xdef = _tree.tree_flatten(x)
    gl = _tree.tree_flatten(g)[0]
    return _tree.tree_unflatten(xdef, [u - step * v for u, v in zip(xl, gl)])


# ---- 1. stationarity ---------------------------------------------------------------------------

def stationarity(f: Callable[..., Any], *, strongly_convex: bool = False,
                 grad: Callable[..., Any] | None = None) -> Condition:
    """Stationarity of a smooth objective: $F(x, \\theta) = \\nabla_x f(x, \\theta)$.

    For $x^* = \\arg\\min_x f(x, \\theta)$ (or any stationary point).
    $\\partial_x F = \\nabla^2_{xx} f$ is symmetric, and positive definite when $f$ is strongly
    convex in $x$ (then the derivative uses conjugate gradients).

    The gradient comes from the framework of `x`: `jax.grad` for JAX arrays, `torch.func.grad`
    for torch tensors. NumPy has no autodiff: unless `grad` is given, the gradient is computed by
    the complex step (one complex evaluation of `f` per entry of `x`; `f` must be written with
    complex-safe NumPy), exact to rounding; the NumPy reference then differentiates that
    gradient by central differences (about 8 digits). A complex-safe `grad` gives exact second
    derivatives (the reference complex-steps it).

    **Arguments:**

    - `f`: the objective `f(x, *args) -> scalar`; `x` may be a pytree.
    - `strongly_convex`: (keyword) declare $f$ strongly convex in $x$, so $\\partial_x F$ is
      tagged positive definite.
    - `grad`: (keyword) optional `grad(x, *args) -> ∇ₓf` shaped like `x`, used instead of
      autodiff (any framework).

    **Returns:** a `Condition` `F(x, *args)` with `F.tags` = `{symmetric}` (plus
    `positive_definite` if `strongly_convex`).
    """
    who = f"stationarity({_name(f, 'f')})"
    _callable(f, "stationarity", "f")
    _optional_callable(grad, "stationarity", "grad")

    def F(x: Any, *args: Any) -> Any:
        return _gradient(f, grad, x, args, who)

    tags = {symmetric, positive_definite} if strongly_convex else {symmetric}
    return Condition(F, who, frozenset(tags))


# ---- 2. fixed point ----------------------------------------------------------------------------

def fixed_point(T: Callable[..., Any]) -> Condition:
    """A fixed point $x = T(x, \\theta)$: $F(x, \\theta) = T(x, \\theta) - x$, so
    $\\partial_x F = \\partial_x T - I$ (no structure assumed).

    **Arguments:**

    - `T`: the map `T(x, *args)`, returning a pytree like `x`.

    **Returns:** a `Condition` `F(x, *args)` with no tags.
    """
    _callable(T, "fixed_point", "T")
    return Condition(fixed_point_condition(T), f"fixed_point({_name(T, 'T')})")


# ---- 3. proximal gradient ----------------------------------------------------------------------

def proximal_gradient(f: Callable[..., Any], prox: Callable[..., Any], *, step: float = 1.0,
                      grad: Callable[..., Any] | None = None) -> Condition:
    """The fixed point of proximal gradient for $\\min_x f(x, \\theta_f) + g(x, \\theta_g)$, as
    the gradient mapping:

    $$F(x, \\theta_f, \\theta_g) = \\frac{1}{\\eta}\\Big(x - \\operatorname{prox}_{\\eta g}\\big(x
    - \\eta \\nabla_x f(x, \\theta_f), \\theta_g\\big)\\Big).$$

    $F(x^*) = 0$ for every $\\eta > 0$ exactly at the minimizers ($f$ convex and smooth, $g$
    convex). The factor $1/\\eta$ puts the residual in the units of a gradient, whatever the
    step: with $g = 0$, $F = \\nabla_x f$; without it, a small step would shrink the residual
    by $\\eta$ and let an inexact solution through the residual check. It changes no
    derivative ($-(\\partial_x F)^{-1}\\partial_\\theta F$ is invariant under a constant factor).
    With $D$ the Jacobian of the prox and $H = \\nabla^2 f$,
    $\\partial_x F = (I - D (I - \\eta H))/\\eta$: not symmetric, no tags. For the lasso, $D$
    is the 0/1 diagonal of the support $S$, and $\\partial_x F$ is $H_{SS}$ on the support and
    $I/\\eta$ off it: the derivative is the closed form on $S$ and exactly 0 off $S$.

    Calling convention: `F(x, theta_f, theta_g=None)`, so the decorated solver takes
    `(theta_f, theta_g)` (or only `theta_f` when the prox has no parameter). `theta_f` is the
    single argument of `f` after `x` (a pytree, e.g. `(X, y)`); `theta_g` is passed to the prox
    (e.g. the regularization strength, differentiable).

    **Arguments:**

    - `f`: the smooth part, `f(x, theta_f) -> scalar`.
    - `prox`: `prox(y, theta_g, step) -> x`, e.g. `prox_l1` (see the library in
      `implicitdiff.conditions`).
    - `step`: (keyword) $\\eta > 0$; any value gives the same solutions and derivatives, it
      changes the conditioning of $\\partial_x F$ (about $1/L$ is a good choice, $L$ the Lipschitz
      constant of $\\nabla f$). A very small step costs digits to rounding (about
      $\\epsilon |x| / \\eta$ in the residual and in $\\partial_x F$).
    - `grad`: (keyword) optional `grad(x, theta_f) -> ∇ₓf` instead of autodiff (for NumPy
      arrays, a complex-safe `grad` makes the reference exact; see `stationarity`).

    **Returns:** a `Condition` `F(x, theta_f, theta_g=None)` with no tags.
    """
    who = f"proximal_gradient({_name(f, 'f')}, {_name(prox, 'prox')})"
    _callable(f, "proximal_gradient", "f")
    _callable(prox, "proximal_gradient", "prox")
    _optional_callable(grad, "proximal_gradient", "grad")
    eta = _step(step, "proximal_gradient")

    step_ = _forward_backward(f, grad, eta, lambda y, theta_g: prox(y, theta_g, eta),
                              who, "prox(y, theta_g, step)")

    def F(x: Any, theta_f: Any = None, theta_g: Any = None) -> Any:
        return step_(x, theta_f, theta_g)

    return Condition(F, who)


def _forward_backward(f: Callable[..., Any], grad: Callable[..., Any] | None, eta: float,
                      backward: Callable[[Any, Any], Any], who: str,
                      label: str) -> Callable[..., Any]:
    """$F(x, \\theta_f, \\theta_b) = (x - \\text{backward}(x - \\eta \\nabla_x f(x, \\theta_f),
    \\theta_b)) / \\eta$: the gradient mapping of a forward-backward step (prox or projection),
    zero at its fixed points, in the units of $\\nabla f$ for every step."""

    def F(x: Any, theta_f: Any, theta_b: Any) -> Any:
        y = _axpy(x, eta, _gradient(f, grad, x, (theta_f,), who))
        p = backward(y, theta_b)
        _check_like(p, x, f"{who}: {label}")
        return _scale(_sub(x, p), 1.0 / eta)

    return F


# ---- 4. projected gradient ---------------------------------------------------------------------

def projected_gradient(f: Callable[..., Any], projection: Callable[..., Any], *,
                       step: float = 1.0, grad: Callable[..., Any] | None = None) -> Condition:
    """The fixed point of projected gradient for $\\min_{x \\in C(\\theta_C)} f(x, \\theta_f)$, as
    the projected-gradient mapping:

    $$F(x, \\theta_f, \\theta_C) = \\frac{1}{\\eta}\\Big(x - P_{C(\\theta_C)}\\big(x - \\eta
    \\nabla_x f(x, \\theta_f)\\big)\\Big).$$

    The special case of `proximal_gradient` with $g$ the indicator of $C$ (the residual is in
    the units of $\\nabla f$ whatever the step; the derivative does not depend on it).
    Calling convention `F(x, theta_f, theta_proj=None)`.

    **Arguments:**

    - `f`: the objective, `f(x, theta_f) -> scalar`.
    - `projection`: `projection(y, theta_proj) -> x`, e.g. `projection_simplex`,
      `projection_box`, `projection_l2_ball`, `projection_affine`, `projection_nonnegative`.
    - `step`: (keyword) $\\eta > 0$ (see `proximal_gradient`).
    - `grad`: (keyword) optional `grad(x, theta_f)` instead of autodiff.

    **Returns:** a `Condition` `F(x, theta_f, theta_proj=None)` with no tags.
    """
    who = f"projected_gradient({_name(f, 'f')}, {_name(projection, 'projection')})"
    _callable(f, "projected_gradient", "f")
    _callable(projection, "projected_gradient", "projection")
    _optional_callable(grad, "projected_gradient", "grad")
    eta = _step(step, "projected_gradient")

    step_ = _forward_backward(f, grad, eta, projection, who, "projection(y, theta_proj)")

    def F(x: Any, theta_f: Any = None, theta_proj: Any = None) -> Any:
        return step_(x, theta_f, theta_proj)

    return Condition(F, who)


# ---- 5. mirror descent (KL geometry on the simplex) --------------------------------------------

def mirror_descent(f: Callable[..., Any], *, step: float = 1.0,
                   grad: Callable[..., Any] | None = None) -> Condition:
    """The fixed point of mirror descent with the KL geometry (exponentiated gradient) on the
    simplex $\\{x \\ge 0, \\sum_i x_i = 1\\}$ along the last axis (a 2-d `x` lies in a product of
    simplices, one per row), as in Blondel et al. (2022):

    $$F(x, \\theta) = \\frac{1}{\\eta}\\Big(x - \\frac{x \\odot e^{-\\eta \\nabla_x f(x, \\theta)}}
    {\\sum_j x_j e^{-\\eta \\partial_j f(x, \\theta)}}\\Big).$$

    The factor $1/\\eta$ keeps the residual in the units of a gradient for every step (near a
    solution $F \\approx x \\odot (\\nabla f - \\bar g)$, $\\bar g = x^\\top \\nabla f$), so a small
    step does not shrink it; it changes no derivative.

    At a minimizer the gradient is constant ($= c$) on the support of $x$ and $\\ge c$ off it,
    so $F(x^*) = 0$. Off the support, $\\partial_x F$ has diagonal $(1 - e^{-\\eta(\\partial_i f -
    c)})/\\eta$: the Jacobian is invertible under strict complementarity ($\\partial_i f > c$ off
    the support), the usual requirement. The solver must return exact zeros off the support (as
    projected gradient does); mirror descent iterates only approach them. The exponent is shifted
    by the row minimum of the gradient (no overflow; the shift cancels exactly).

    **Arguments:**

    - `f`: the objective, `f(x, theta_f) -> scalar`.
    - `step`: (keyword) $\\eta > 0$.
    - `grad`: (keyword) optional `grad(x, theta_f)` instead of autodiff.

    **Returns:** a `Condition` `F(x, theta_f)` with no tags; `x` a single array.
    """
    who = f"mirror_descent({_name(f, 'f')})"
    _callable(f, "mirror_descent", "f")
    _optional_callable(grad, "mirror_descent", "grad")
    eta = _step(step, "mirror_descent")

    def F(x: Any, theta_f: Any = None) -> Any:
        xp = array_api_compat.array_namespace(x)
        g = _gradient(f, grad, x, (theta_f,), who)
        gr = xp.real(g) if xp.isdtype(g.dtype, "complex floating") else g
        shift = xp.min(gr, axis=-1, keepdims=True)
        w = x * xp.exp(-eta * (g - shift))
        out = x - w / xp.sum(w, axis=-1, keepdims=True)
        return out if eta == 1.0 else out * (1.0 / eta)

    return Condition(F, who)


# ---- 6. KKT conditions -------------------------------------------------------------------------

def kkt(f: Callable[..., Any], *, eq: Callable[..., Any] | None = None,
        ineq: Callable[..., Any] | None = None, grad: Callable[..., Any] | None = None
        ) -> Condition:
    """The Karush–Kuhn–Tucker conditions of

    $$\\min_z f(z, \\theta_f) \\quad\\text{s.t.}\\quad h(z, \\theta_h) = 0,\\;
    g(z, \\theta_g) \\le 0,$$

    with the Lagrangian $L = f + \\nu^\\top h + \\mu^\\top g$ (multipliers $\\mu \\ge 0$):

    $$F\\big((z, \\nu, \\mu), \\theta\\big) = \\big(\\nabla_z f + J_h^\\top \\nu
    + J_g^\\top \\mu,\\; h(z),\\; \\mu \\odot g(z)\\big).$$

    `x` is the tuple `(z, nu, mu)`, leaving out the multipliers of an absent kind: `(z, nu)` with
    only `eq`, `(z, mu)` with only `ineq`. The stationarity block is one gradient of the
    Lagrangian (autodiff, or the complex step for NumPy). Sign conventions: inequalities are
    $g \\le 0$ with $\\mu \\ge 0$; $\\nu$ has the sign of $+\\nu^\\top h$ in $L$.
    The complementary-slackness rows $\\mu_i g_i = 0$ make $\\partial_x F$ invertible under
    strict complementarity (exactly one of $\\mu_i$, $g_i$ is zero), LICQ and second-order
    sufficiency. With equalities only, $\\partial_x F$ is the symmetric (indefinite) KKT matrix
    and is tagged symmetric (MINRES); with inequalities it is not symmetric.

    Calling convention: `F(x, theta_f, theta_eq=None, theta_ineq=None)`; the decorated solver
    takes `(theta_f, theta_eq, theta_ineq)` (trailing ones may be left out).

    **Arguments:**

    - `f`: the objective, `f(z, theta_f) -> scalar`; `z` may be a pytree.
    - `eq`: (keyword) `h(z, theta_eq) -> array`, the equality constraints $h = 0$.
    - `ineq`: (keyword) `g(z, theta_ineq) -> array`, the inequality constraints $g \\le 0$.
    - `grad`: (keyword) optional `grad(z, theta_f) -> ∇_z f` for the objective; the constraint
      terms $J^\\top \\nu$ still come from autodiff / the complex step.

    **Returns:** a `Condition` `F(x, theta_f, theta_eq=None, theta_ineq=None)`, with
    `F.blocks` naming its output blocks (`"stationarity"`, `"equality"`, `"complementarity"`).
    """
    who = f"kkt({_name(f, 'f')})"
    _callable(f, "kkt", "f")
    _optional_callable(eq, "kkt", "eq")
    _optional_callable(ineq, "kkt", "ineq")
    _optional_callable(grad, "kkt", "grad")
    n_parts = 1 + (eq is not None) + (ineq is not None)

    def lagrangian(z: Any, nu: Any, mu: Any, theta_f: Any, theta_eq: Any, theta_ineq: Any
                   ) -> Any:
        out = 0.0 if grad is not None else f(z, theta_f)
        if eq is not None:
            h = eq(z, theta_eq)
            xp = array_api_compat.array_namespace(h)
            out = out + xp.sum(nu * h)
        if ineq is not None:
            g = ineq(z, theta_ineq)
            xp = array_api_compat.array_namespace(g)
            out = out + xp.sum(mu * g)
        return out

    def F(x: Any, theta_f: Any = None, theta_eq: Any = None, theta_ineq: Any = None) -> Any:
        if not (isinstance(x, tuple) and len(x) == n_parts):
            kinds = ("(z" + (", nu" if eq is not None else "") +
                     (", mu" if ineq is not None else "") + ")")
            got = (f"a tuple of length {len(x)}" if isinstance(x, tuple) else type(x).__name__)
            raise StructureError(f"{who}: expected x = {kinds}, got {got}.")
        z = x[0]
        nu = x[1] if eq is not None else None
        mu = x[-1] if ineq is not None else None
        thetas = (theta_f, theta_eq, theta_ineq)
        h = g = None
        if eq is not None:
            h = eq(z, theta_eq)
            _check_like(h, nu, f"{who}: h(z, theta_eq) against the multipliers nu")
        if ineq is not None:
            g = ineq(z, theta_ineq)
            _check_like(g, mu, f"{who}: g(z, theta_ineq) against the multipliers mu")
        if eq is None and ineq is None:
            stat = _gradient(f, grad, z, (theta_f,), who)
        else:
            stat = grad_x(lagrangian, z, (nu, mu, *thetas), who=who)
            if grad is not None:
                gf = grad(z, theta_f)
                _check_like(gf, z, f"{who}: grad(z, theta_f)")
                stat = _tree.tree_map(lambda a, b: a + b, stat, gf)
        out = [stat]
        if h is not None:
            out.append(h)
        if g is not None:
            out.append(mu * g)
        return tuple(out)

    tags = frozenset({symmetric}) if ineq is None else frozenset()
    blocks = ("stationarity", *(("equality",) if eq is not None else ()),
              *(("complementarity",) if ineq is not None else ()))
    return Condition(F, who, tags, blocks=blocks)


# ---- 7. least squares --------------------------------------------------------------------------

def least_squares(residual_fn: Callable[..., Any], *, positive_definite: bool = False,
                  jac: Callable[..., Any] | None = None) -> Condition:
    """The normal equations of nonlinear least squares $\\min_x \\tfrac12\\|r(x, \\theta)\\|^2$
    (what Gauss–Newton and Levenberg–Marquardt converge to):

    $$F(x, \\theta) = J_r(x, \\theta)^\\top r(x, \\theta), \\qquad J_r = \\partial_x r.$$

    $J_r^\\top r$ is one reverse-mode product (JAX, PyTorch); on NumPy arrays it is the
    complex-step gradient of $\\tfrac12\\|r\\|^2$ unless `jac` is given. The derivative uses the
    exact $\\partial_x F = J_r^\\top J_r + \\sum_i r_i \\nabla^2 r_i$ (the Hessian of
    $\\tfrac12\\|r\\|^2$, not its Gauss–Newton approximation, which would give a wrong derivative
    when the residual at the solution is not zero): symmetric; positive definite at a
    nondegenerate minimum (say so with `positive_definite=True`, e.g. for a linear residual with
    $J_r$ of full column rank).

    **Arguments:**

    - `residual_fn`: `r(x, *args) -> array` (any shape).
    - `positive_definite`: (keyword) tag $\\partial_x F$ positive definite.
    - `jac`: (keyword) optional `jac(x, *args) -> J_r` as a matrix of shape `(m, n)` for a vector
      `x` of shape `(n,)` and residual of shape `(m,)`, instead of autodiff.

    **Returns:** a `Condition` `F(x, *args)` tagged symmetric (and positive definite if asked).
    """
    who = f"least_squares({_name(residual_fn, 'residual_fn')})"
    _callable(residual_fn, "least_squares", "residual_fn")
    _optional_callable(jac, "least_squares", "jac")

    def F(x: Any, *args: Any) -> Any:
        if jac is not None:
            J = jac(x, *args)
            r = residual_fn(x, *args)
            out = J.T @ r
            _check_like(out, x, f"{who}: jac(x, ...)^T r")
            return out
        return vjp_x(residual_fn, x, args, who=who)

    tags = {symmetric, _PD} if positive_definite else {symmetric}
    return Condition(F, who, frozenset(tags))
