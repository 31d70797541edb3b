"""The reference backends' derivative sources under adversarial inputs (issue 11).

The NumPy reference (and array-api-strict, on the same core) is the oracle `implicitdiff check`
compares against, so it must give a correct derivative or fail loudly. Every expected value
here is a closed form or a Jacobian derived by hand (tests/oracles.py style): none comes from
implicitdiff.

- per-coordinate central-difference steps (x* spanning 1e6 .. 1e-3);
- a non-analytic F (`abs`) that fooled a probe scaled by the largest residual entry;
- an exact complex step at condition 1e8 (no false rejection, no warning);
- a kink of F at x* (abs, relu; in x and in θ): refused, not averaged;
- complex θ, a Python-float cotangent, negative `argnums`, a size-0 x.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
from oracles import rel_err

import implicitdiff as idf
import implicitdiff_numpy

array_api_strict = pytest.importorskip("array_api_strict")
import implicitdiff_array_api  # noqa: E402  (needs array_api_strict)


@contextlib.contextmanager
def _no_warnings():
    """A block in which any warning fails the test (pytest's filter is 'error' anyway)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---- per-coordinate steps ------------------------------------------------------------------

S = np.array([1e6, 1e3, 1.0, 1e-3])  # the scales of the coordinates of x*


def cubic_F(x, theta):
    """x + x³/s² − θ, cast to float (so the complex step cannot serve: differences do)."""
    x = x.astype(np.float64)
    return x + x**3 / S**2 - theta


def cubic_solve(theta):
    u = np.ones_like(theta)  # u = x/s solves u + u³ = θ/s by Newton
    for _ in range(60):
        u = u - (u + u**3 - theta / S) / (1 + 3 * u**2)
    return S * u


def test_per_coordinate_steps_jacobian():
    """dx_i/dθ_i = 1/(1 + 3 x_i²/s_i²) = 1/4 at x* = s: one step for all coordinates (scaled by
    the largest |x|) was tens of times wrong on the small ones."""
    fn = idf.custom_root(cubic_F, solve=idf.Dense())(cubic_solve)
    theta = 2 * S
    with pytest.warns(implicitdiff_numpy.DerivativeAccuracyWarning,
                      match="central differences.*estimated relative accuracy is"):
        J = idf.jacobian(fn, 0)(theta)
    np.testing.assert_allclose(np.diag(J), 0.25, rtol=1e-7)
    np.testing.assert_allclose(J - np.diag(np.diag(J)), 0.0, atol=1e-12)


def test_per_coordinate_steps_jvp_vjp():
    fn = idf.custom_root(cubic_F, solve=idf.Dense())(cubic_solve)
    theta = 2 * S
    rng = np.random.default_rng(1)
    t = rng.standard_normal(4) * S  # a tangent of the size of each coordinate
    with pytest.warns(UserWarning, match="central differences"):
        _, x_dot = idf.jvp(fn, (theta,), (t,))
    np.testing.assert_allclose(x_dot, 0.25 * t, rtol=1e-7)
    u = rng.standard_normal(4)
    with pytest.warns(UserWarning, match="central differences"):
        _, vjp_fn = idf.vjp(fn, theta)
        (g,) = vjp_fn(u)
    np.testing.assert_allclose(g, 0.25 * u, rtol=1e-7)


def test_per_coordinate_steps_array_api():
    xp = array_api_strict

    def F(x, theta):
        x = xp.asarray(x, dtype=xp.float64)  # refuses complex: differences serve
        return x + x**3 / xp.asarray(S) ** 2 - theta

    def solve(theta):
        return xp.asarray(cubic_solve(np.asarray(theta)))

    fn = idf.custom_root(F, solve=idf.Dense())(solve)
    with pytest.warns(implicitdiff_array_api.DerivativeAccuracyWarning,
                      match="central differences"):
        J = np.asarray(idf.jacobian(fn, 0)(xp.asarray(2 * S)))
    np.testing.assert_allclose(np.diag(J), 0.25, rtol=1e-7)


# ---- a non-analytic F that a probe scaled by the largest entry accepted --------------------

def abs_F(x, theta):
    """[1e6 (x0 − θ0), |x1| x1 − θ1]: |·| of a complex number is real, so the complex step
    gives ∂F1/∂x1 = |x1| where the derivative is 2|x1|."""
    return np.stack([1e6 * (x[0] - theta[0]), np.abs(x[1]) * x[1] - theta[1]])


def abs_solve(theta):
    return np.array([theta[0], np.sign(theta[1]) * np.sqrt(np.abs(theta[1]))])


def test_non_analytic_F_is_not_complex_stepped():
    fn = idf.custom_root(abs_F, solve=idf.Dense())(abs_solve)
    theta = np.array([1.0, 0.25])  # x* = (1, 0.5): dx1/dθ1 = 1/(2|x1|) = 1
    with pytest.warns(UserWarning, match="central differences"):
        with idf.diagnostics() as d:
            J = idf.jacobian(fn, 0)(theta)
    np.testing.assert_allclose(J, np.eye(2), rtol=1e-7, atol=1e-12)
    # θ enters linearly (the complex step is exact there); x through |x1|: differences
    assert d.backward[-1].derivative_method == "x: central-difference; θ: complex-step"


# ---- an exact complex step at condition 1e8 -----------------------------------------------

def _ill():
    rng = np.random.default_rng(7)
    Q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    M = Q @ np.diag([1.0, 1e-4, 1e-8]) @ Q.T
    x_star = np.array([0.3, -0.7, 1.1])
    g = x_star + 1e-3 * np.sin(1e3 * x_star)
    return M, x_star, M @ g


def test_condition_1e8_keeps_the_exact_complex_step():
    """F = M (x + 1e-3 sin(1e3 x)) − θ, cond(M) = 1e8, analytic: the complex step is exact and
    must serve (a wrong central difference, amplified by the condition, would be garbage)."""
    M, x_star, theta0 = _ill()

    def F(x, theta):
        return M @ (x + 1e-3 * np.sin(1e3 * x)) - theta

    fn = idf.custom_root(F, solve=idf.Dense())(lambda theta: x_star.copy())
    A = M @ np.diag(1 + np.cos(1e3 * x_star))  # ∂F/∂x by hand; ∂F/∂θ = −I
    J_oracle = np.linalg.inv(A)
    with _no_warnings(), idf.diagnostics() as d:
        J = idf.jacobian(fn, 0)(theta0)
    assert d.backward[-1].derivative_method == "complex-step"
    assert rel_err(J, J_oracle) <= 1e-6


# ---- a kink of F at x* ----------------------------------------------------------------------

KINKS = {
    # x* = 0 at θ = 0; one-sided derivatives dx*/dθ are 1/3 and 1: none exists
    "abs in x": (lambda x, t: 2 * x + np.abs(x) - t, lambda t: np.zeros_like(t)),
    # x* = 0 at θ = 0; one-sided 1/2 and 1
    "relu in x": (lambda x, t: x + np.maximum(x, 0) - t, lambda t: np.zeros_like(t)),
    # x* = |θ| at θ = 0: one-sided −1 and 1
    "abs in theta": (lambda x, t: x - np.abs(t), lambda t: np.abs(t)),
}


@pytest.mark.parametrize("kind", list(KINKS))
@pytest.mark.parametrize("transform", ["jvp", "vjp", "jacobian"])
def test_kink_at_x_star_is_refused(kind, transform):
    F, solve = KINKS[kind]
    fn = idf.custom_root(F, solve=idf.Dense())(solve)
    theta = np.zeros(2)
    with pytest.raises(idf.StructureError, match="kink"):
        if transform == "jvp":
            idf.jvp(fn, (theta,), (np.ones(2),))
        elif transform == "vjp":
            idf.vjp(fn, theta)[1](np.ones(2))
        else:
            idf.jacobian(fn, 0)(theta)


def test_kink_on_failure_nan_and_warn():
    F, solve = KINKS["abs in x"]
    theta = np.zeros(2)
    fn = idf.custom_root(F, solve=idf.Dense(), on_failure="nan")(solve)
    J = idf.jacobian(fn, 0)(theta)
    assert np.all(np.isnan(J))
    fn = idf.custom_root(F, solve=idf.Dense(), on_failure="warn")(solve)
    with pytest.warns(RuntimeWarning, match="kink"):  # as every on_failure="warn"
        idf.jvp(fn, (theta,), (np.ones(2),))


def test_kink_array_api():
    xp = array_api_strict

    def F(x, t):
        return 2 * x + xp.abs(x) - t

    fn = idf.custom_root(F, solve=idf.Dense())(lambda t: xp.zeros_like(t))
    with pytest.raises(idf.StructureError, match="kink"):
        idf.jacobian(fn, 0)(xp.zeros(2, dtype=xp.float64))


def test_smooth_F_near_but_not_at_a_kink_is_not_refused():
    """|x| away from 0 is smooth: no false kink (x* = θ/3 for θ > 0)."""
    F, _ = KINKS["abs in x"]
    fn = idf.custom_root(F, solve=idf.Dense())(lambda t: t / 3)
    theta = np.array([3.0, 0.03])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the complex step may or may not serve; not the point
        J = idf.jacobian(fn, 0)(theta)
    np.testing.assert_allclose(J, np.eye(2) / 3, rtol=1e-7, atol=1e-12)


# ---- complex θ -------------------------------------------------------------------------------

def _complex_fn():
    def F(x, z, c):
        return x - c * z.real

    return idf.custom_root(F, solve=idf.Dense())(lambda z, c: c * z.real)


def test_complex_theta_is_refused_not_none():
    fn = _complex_fn()
    z = np.array([1.0 + 2.0j, -0.5 + 0.1j])
    c = np.array([2.0, 3.0])
    with pytest.raises(idf.StructureError, match="complex"):
        idf.vjp(fn, z, c)[1](np.ones(2))
    with pytest.raises(idf.StructureError, match="complex"):
        idf.jvp(fn, (z, c), (np.ones(2, dtype=complex), np.zeros(2)))
    with pytest.raises(idf.StructureError, match="complex"):
        idf.jacobian(fn, 0)(z, c)


def test_complex_constant_outside_argnums_is_fine():
    fn = _complex_fn()
    z = np.array([1.0 + 2.0j, -0.5 + 0.1j])
    c = np.array([2.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `.real` breaks the complex step in z
        gz, gc = idf.vjp(fn, z, c, argnums=1)[1](np.ones(2))
        _, x_dot = idf.jvp(fn, (z, c), (None, np.ones(2)))
    assert gz is None
    np.testing.assert_allclose(gc, np.real(z), rtol=1e-7)
    np.testing.assert_allclose(x_dot, np.real(z), rtol=1e-7)


# ---- a Python-float cotangent --------------------------------------------------------------

def test_float_cotangent_for_a_scalar_x():
    def F(x, t):
        return x**3 + x - t

    @idf.custom_root(F, solve=idf.Dense())
    def cube(t):
        x = np.asarray(0.0)
        for _ in range(60):
            x = x - (x**3 + x - t) / (3 * x**2 + 1)
        return x

    _, vjp_fn = idf.vjp(cube, np.asarray(2.0))  # x* = 1
    for cot in (1.0, np.float64(1.0), 1):
        (g,) = vjp_fn(cot)
        np.testing.assert_allclose(g, 0.25, rtol=1e-12)


def test_float_cotangent_for_a_vector_x_is_a_structure_error():
    fn = idf.custom_root(lambda x, t: x - t, solve=idf.Dense())(lambda t: t.copy())
    _, vjp_fn = idf.vjp(fn, np.ones(3))
    with pytest.raises(idf.StructureError, match="cotangent"):
        vjp_fn(1.0)


# ---- negative argnums -----------------------------------------------------------------------

def _two_arg_fn():
    # x* = a·b (elementwise), 3 entries; a has 3 entries, b has 3 or 5 (then x* = a·b[:3])
    def F(x, a, b):
        return x - a * b[:3]

    return idf.custom_root(F, solve=idf.Dense())(lambda a, b: a * b[:3])


@pytest.mark.parametrize("nb", [3, 5])  # p <= n: JVP columns; p > n: VJP rows
def test_negative_argnums_jacobian(nb):
    fn = _two_arg_fn()
    a = np.array([1.0, 2.0, 3.0])
    b = np.arange(1.0, nb + 1.0)
    J_last = idf.jacobian(fn, -1)(a, b)
    J_oracle = np.zeros((3, nb))
    J_oracle[:, :3] = np.diag(a)
    np.testing.assert_allclose(J_last, J_oracle, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(idf.jacobian(fn, -2)(a, b), np.diag(b[:3]), rtol=1e-12)


def test_negative_argnums_vjp():
    fn = _two_arg_fn()
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    u = np.array([1.0, -1.0, 2.0])
    ga, gb = idf.vjp(fn, a, b, argnums=-1)[1](u)
    assert ga is None
    np.testing.assert_allclose(gb, a * u, rtol=1e-12)
    bk = idf.backend.get_backend((a, b))
    ga, gb = bk.vjp(fn, (a, b), (-1,))[1](u)
    assert ga is None
    np.testing.assert_allclose(gb, a * u, rtol=1e-12)
    with pytest.raises(idf.StructureError, match="argnums"):
        idf.jacobian(fn, -3)(a, b)


# ---- size-0 x --------------------------------------------------------------------------------

def test_size_zero_x():
    def F(x, t, s):
        return x - t * s

    fn = idf.custom_root(F, solve=idf.Dense())(lambda t, s: t * s)
    t, s = np.zeros(0), 2.0
    x, x_dot = idf.jvp(fn, (t, s), (np.zeros(0), 1.0))
    assert x.shape == (0,) and x_dot.shape == (0,)
    gt, gs = idf.vjp(fn, t, s)[1](np.zeros(0))
    assert gt.shape == (0,) and float(gs) == 0.0
    assert idf.jacobian(fn, 0)(t, s).shape == (0, 0)
    assert idf.jacobian(fn, 1)(t, s).shape == (0,)


def test_kink_accepted_with_kink_probe_false():
    """`kink_probe=False` (the decorator's switch for every backend) accepts the kink: the
    reference then differentiates with the average of F's one-sided slopes in x (3 and 1):
    dx*/dθ = 1/2 (the one-sided values are 1/3 and 1)."""
    F, solve = KINKS["abs in x"]
    fn = idf.custom_root(F, solve=idf.Dense(), kink_probe=False)(solve)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whichever source served
        J = idf.jacobian(fn, 0)(np.zeros(2))
    np.testing.assert_allclose(J, np.eye(2) / 2, rtol=1e-6)
