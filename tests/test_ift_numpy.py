"""The implicit derivatives of the NumPy reference backend, against independent oracles.

Every derivative is checked against (i) the dense formula −A⁻¹B from hand-derived Jacobians and
(ii) fourth-order central finite differences of the whole solver map (tests/oracles.py, which
shares no code with implicitdiff), plus the dot-product test between JVP and VJP.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import (
    ContractionFamily,
    ConvexFamily,
    LinearFamily,
    central_fd,
    dense_ift,
    random_direction,
    rel_err,
    sigmoid,
    split_columns,
    vec,
)

import implicitdiff as idf
import implicitdiff_numpy

SPD = {idf.symmetric, idf.positive_definite}


def decorate(family, solve, **kw):
    tags = SPD if family.spd else None
    if family is ContractionFamily:
        return idf.custom_fixed_point(family.T, solve=solve, tags=tags, **kw)(family.solve)
    return idf.custom_root(family.F, solve=solve, tags=tags, **kw)(family.solve)


def _cases():
    general = [idf.Dense(), idf.GMRES(), idf.BiCGStab(), idf.Auto()]
    spd_only = [idf.Cholesky(), idf.CG(), idf.MINRES()]
    out = []
    for fam in (LinearFamily, ContractionFamily, ConvexFamily):
        for s in general + (spd_only if fam.spd else []):
            out.append(pytest.param(fam, s, id=f"{fam.__name__}-{type(s).__name__}"))
    return out


def _dot_scale(*pairs):
    return sum(float(np.linalg.norm(vec(a)) * np.linalg.norm(vec(b))) for a, b in pairs)


# ---- 1. three well-posed families, every applicable linear solver ---------------------------


@pytest.mark.parametrize("family,solve", _cases())
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 5))
def test_family_matches_oracles(family, solve, seed, n):
    rng = np.random.default_rng(seed)
    args = family.make(rng, n)
    fn = decorate(family, solve)
    x = fn(*args)
    assert isinstance(x, np.ndarray) and x.shape == (n,) and x.dtype == np.float64
    np.testing.assert_array_equal(x, family.solve(*args))

    A, Bs = family.jacobians(x, *args)
    J = dense_ift(A, Bs)
    v = random_direction(rng, args)
    u = rng.standard_normal(n)
    fd = central_fd(family.solve, args, v)

    # JVP: dense formula and finite differences.
    x1, x_dot = idf.jvp(fn, args, v)
    np.testing.assert_array_equal(x1, x)
    assert x_dot.shape == x.shape
    assert rel_err(x_dot, J @ vec(v)) <= 1e-9
    assert rel_err(x_dot, fd) <= 1e-6

    # VJP: dense formula, and finite differences through <Jᵀu, v> = <u, Jv>.
    x2, vjp_fn = idf.vjp(fn, *args)
    np.testing.assert_array_equal(x2, x)
    grads = vjp_fn(u)
    assert isinstance(grads, tuple) and len(grads) == len(args)
    for g, a in zip(grads, args):
        assert g.shape == a.shape and g.dtype == a.dtype
    assert rel_err(grads, J.T @ u) <= 1e-9
    assert abs(vec(grads) @ vec(v) - u @ vec(fd)) <= 1e-6 * _dot_scale((u, fd))

    # The dot-product test between the library's own JVP and VJP.
    lhs, rhs = u @ x_dot, vec(grads) @ vec(v)
    assert abs(lhs - rhs) <= 1e-10 * _dot_scale((u, x_dot), (grads, v))

    # idf.jacobian in every argument equals the dense formula's column block.
    for k, Jk in enumerate(split_columns(J, args)):
        Jnum = idf.jacobian(fn, argnums=k)(*args)
        assert Jnum.shape == Jk.shape
        assert rel_err(Jnum, Jk) <= 1e-9


# ---- 2. pytree x and pytree args -------------------------------------------------------------


def _T_dict(x, p, q):
    """The contraction family on x = {'u': (2,), 'w': (2, 2)}, args p = {'W', 'c'}, q = (U, θ)."""
    z = ContractionFamily.T(np.concatenate([x["u"], x["w"].ravel()]), q[1], p["W"], q[0],
                            p["c"])
    return {"u": z[:2], "w": z[2:].reshape(2, 2)}


@idf.custom_fixed_point(_T_dict, solve=idf.GMRES())
def dict_solver(p, q):
    z = ContractionFamily.solve(q[1], p["W"], q[0], p["c"])
    return {"w": z[2:].reshape(2, 2), "u": z[:2]}


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1))
def test_pytree_dict_x_and_nested_args(seed):
    rng = np.random.default_rng(seed)
    theta, W, U, c = ContractionFamily.make(rng, 6)
    p, q = {"W": W, "c": c}, (U, theta)
    x = dict_solver(p, q)
    assert set(x) == {"u", "w"} and x["u"].shape == (2,) and x["w"].shape == (2, 2)
    xv = np.concatenate([x["u"], x["w"].ravel()])
    A, (B_theta, B_W, B_U, B_c) = ContractionFamily.jacobians(xv, theta, W, U, c)
    J = dense_ift(A, [B_theta, B_W, B_U, B_c])  # columns: θ, W, U, c

    p_dot = {"W": rng.standard_normal(W.shape), "c": rng.standard_normal(c.shape)}
    q_dot = (rng.standard_normal(U.shape), rng.standard_normal(theta.shape))
    _, x_dot = idf.jvp(dict_solver, (p, q), (p_dot, q_dot))
    assert set(x_dot) == {"u", "w"} and x_dot["w"].shape == (2, 2)
    expect = J @ np.concatenate([q_dot[1], p_dot["W"].ravel(), q_dot[0].ravel(), p_dot["c"]])
    assert rel_err(np.concatenate([x_dot["u"], x_dot["w"].ravel()]), expect) <= 1e-9
    fd = central_fd(lambda p_, q_: dict_solver.solver(p_, q_), (p, q), (p_dot, q_dot))
    assert rel_err(x_dot, fd) <= 1e-6

    xbar = {"u": rng.standard_normal(2), "w": rng.standard_normal((2, 2))}
    _, vjp_fn = idf.vjp(dict_solver, p, q)
    pbar, qbar = vjp_fn(xbar)
    assert set(pbar) == {"W", "c"} and isinstance(qbar, tuple) and len(qbar) == 2
    assert pbar["W"].shape == W.shape and qbar[0].shape == U.shape
    g = J.T @ np.concatenate([xbar["u"], xbar["w"].ravel()])
    blocks = np.split(g, np.cumsum([theta.size, W.size, U.size]))
    assert rel_err(qbar[1], blocks[0]) <= 1e-9
    assert rel_err(pbar["W"], blocks[1].reshape(W.shape)) <= 1e-9
    assert rel_err(qbar[0], blocks[2].reshape(U.shape)) <= 1e-9
    assert rel_err(pbar["c"], blocks[3]) <= 1e-9


def _F_tuple(x, params):
    """The convex family with x = (x1 (2,), x2 (3,)), params = {'Q': Q, 'theta': (t1, t2)}."""
    r = ConvexFamily.F(np.concatenate(x), np.concatenate(params["theta"]), params["Q"])
    return r[:2], r[2:]


@idf.custom_root(_F_tuple, solve=idf.CG(), tags=SPD)
def tuple_solver(params):
    z = ConvexFamily.solve(np.concatenate(params["theta"]), params["Q"])
    return z[:2], z[2:]


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1))
def test_pytree_tuple_x_and_dict_arg(seed):
    rng = np.random.default_rng(seed)
    theta, Q = ConvexFamily.make(rng, 5)
    params = {"Q": Q, "theta": (theta[:2], theta[2:])}
    x = tuple_solver(params)
    assert isinstance(x, tuple) and [a.shape for a in x] == [(2,), (3,)]
    xv = np.concatenate(x)
    A, (B_theta, B_Q) = ConvexFamily.jacobians(xv, theta, Q)
    J = dense_ift(A, [B_theta, B_Q])

    dot = {"Q": rng.standard_normal(Q.shape), "theta": (rng.standard_normal(2),
                                                        rng.standard_normal(3))}
    _, x_dot = idf.jvp(tuple_solver, (params,), (dot,))
    assert isinstance(x_dot, tuple) and [a.shape for a in x_dot] == [(2,), (3,)]
    expect = J @ np.concatenate([*dot["theta"], dot["Q"].ravel()])
    assert rel_err(np.concatenate(x_dot), expect) <= 1e-9
    fd = central_fd(lambda prm: tuple_solver.solver(prm), (params,), (dot,))
    assert rel_err(x_dot, fd) <= 1e-6

    xbar = (rng.standard_normal(2), rng.standard_normal(3))
    _, vjp_fn = idf.vjp(tuple_solver, params)
    (gp,) = vjp_fn(xbar)
    assert set(gp) == {"Q", "theta"} and isinstance(gp["theta"], tuple)
    assert [a.shape for a in gp["theta"]] == [(2,), (3,)] and gp["Q"].shape == Q.shape
    g = J.T @ np.concatenate(xbar)
    assert rel_err(np.concatenate(gp["theta"]), g[:5]) <= 1e-9
    assert rel_err(gp["Q"], g[5:].reshape(Q.shape)) <= 1e-9


# ---- 3. derivative sources of the NumPy backend ------------------------------------------------


def ridge_F(x, lam, A, b):
    return A.T @ (A @ x - b) + lam * x


def ridge_solve(lam, A, b):
    return np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ b)


def ridge_closed_form(lam, A, b, x_bar, tangents):
    """Closed-form JVP and VJP of the ridge solution, derived by hand."""
    x = ridge_solve(lam, A, b)
    M = A.T @ A + lam * np.eye(A.shape[1])
    r = A @ x - b
    lam_d, A_d, b_d = tangents
    x_dot = -np.linalg.solve(M, A_d.T @ r + A.T @ (A_d @ x) - A.T @ b_d + lam_d * x)
    u = np.linalg.solve(M, x_bar)
    return x_dot, (-(x @ u), -(np.outer(r, u) + np.outer(A @ u, x)), A @ u)


def _ridge_data(seed=0):
    rng = np.random.default_rng(seed)
    A, b = rng.standard_normal((10, 4)), rng.standard_normal(10)
    tangents = (0.7, rng.standard_normal(A.shape), rng.standard_normal(b.shape))
    return (0.3, A, b), tangents, rng.standard_normal(4)


@pytest.mark.parametrize("solve", [idf.Dense(), idf.Cholesky(), idf.CG()])
def test_complex_step_is_default_and_exact(solve):
    args, tangents, x_bar = _ridge_data()
    fn = idf.custom_root(ridge_F, solve=solve, tags=SPD)(ridge_solve)
    x_dot_cf, grads_cf = ridge_closed_form(*args, x_bar, tangents)
    with idf.diagnostics() as d:
        _, x_dot = idf.jvp(fn, args, tangents)
    assert d.backward[-1].mode == "jvp"
    assert d.backward[-1].derivative_method == "complex-step"
    assert rel_err(x_dot, x_dot_cf) <= 1e-12
    with idf.diagnostics() as d:
        _, vjp_fn = idf.vjp(fn, *args)
        grads = vjp_fn(x_bar)
    assert d.backward[-1].mode == "vjp"
    assert d.backward[-1].derivative_method == "complex-step"
    assert isinstance(grads[0], float | np.floating)
    for g, g_cf in zip(grads, grads_cf):
        assert rel_err(g, g_cf) <= 1e-12
    J = idf.jacobian(fn, argnums=0)(*args)
    dx_dlam = ridge_closed_form(*args, x_bar, (1.0, 0 * args[1], 0 * args[2]))[0]
    assert J.shape == (4,) and rel_err(J, dx_dlam) <= 1e-12


def abs_F(x, theta, Q):
    """Not complex-safe: np.abs of a complex number drops the imaginary part's derivative."""
    return Q @ x + np.abs(x) * np.tanh(x) - theta


def abs_solve(theta, Q):
    x = np.zeros_like(theta)
    for _ in range(60):
        d = np.sign(x) * np.tanh(x) + np.abs(x) / np.cosh(x) ** 2
        step = np.linalg.solve(Q + np.diag(d), abs_F(x, theta, Q))
        x = x - step
        if np.max(np.abs(step)) <= 1e-15:
            break
    return x


def test_not_complex_safe_falls_back_to_central_differences():
    rng = np.random.default_rng(3)
    theta, Q = ConvexFamily.make(rng, 4)
    fn = idf.custom_root(abs_F, solve=idf.Dense())(abs_solve)
    x = fn(theta, Q)
    assert np.min(np.abs(x)) > 1e-2  # away from the kink of |x|
    A = Q + np.diag(np.sign(x) * np.tanh(x) + np.abs(x) / np.cosh(x) ** 2)
    J = dense_ift(A, [-np.eye(4), np.kron(np.eye(4), x[None, :])])
    v = random_direction(rng, (theta, Q))
    with pytest.warns(implicitdiff_numpy.DerivativeAccuracyWarning,
                      match="central differences.*estimated relative accuracy"):
        with idf.diagnostics() as d:
            _, x_dot = idf.jvp(fn, (theta, Q), v)
    assert "central-difference" in d.backward[-1].derivative_method
    assert "complex-step" not in d.backward[-1].derivative_method.split(";")[0]
    assert rel_err(x_dot, J @ vec(v)) <= 1e-6
    assert rel_err(x_dot, central_fd(abs_solve, (theta, Q), v)) <= 1e-6
    u = rng.standard_normal(4)
    with pytest.warns(implicitdiff_numpy.DerivativeAccuracyWarning):
        _, vjp_fn = idf.vjp(fn, theta, Q)
        g = vjp_fn(u)
    assert rel_err(g, J.T @ u) <= 1e-6


def test_user_derivatives_are_used():
    args, tangents, x_bar = _ridge_data(1)
    calls = {"jvp_x": 0, "vjp_x": 0, "jvp_args": 0, "vjp_args": 0}

    def jvp_x(v, x, lam, A, b):
        calls["jvp_x"] += 1
        return A.T @ (A @ v) + lam * v

    def vjp_x(u, x, lam, A, b):
        calls["vjp_x"] += 1
        return A.T @ (A @ u) + lam * u

    def jvp_args(args_dot, x, lam, A, b):
        calls["jvp_args"] += 1
        lam_d, A_d, b_d = args_dot
        return A_d.T @ (A @ x - b) + A.T @ (A_d @ x - b_d) + lam_d * x

    def vjp_args(u, x, lam, A, b):
        calls["vjp_args"] += 1
        return x @ u, np.outer(A @ x - b, u) + np.outer(A @ u, x), -(A @ u)

    derivs = idf.Derivatives(jvp_x=jvp_x, vjp_x=vjp_x, jvp_args=jvp_args, vjp_args=vjp_args)

    def F_real_only(x, lam, A, b):  # would break both complex step and finite differences
        if np.iscomplexobj(x) or np.iscomplexobj(A) or not np.array_equal(x, fn.solver(lam, A, b)):
            raise AssertionError("F was differentiated numerically despite user derivatives")
        return ridge_F(x, lam, A, b)

    fn = idf.custom_root(F_real_only, solve=idf.Dense(), derivatives=derivs)(ridge_solve)
    x_dot_cf, grads_cf = ridge_closed_form(*args, x_bar, tangents)
    with idf.diagnostics() as d:
        _, x_dot = idf.jvp(fn, args, tangents)
        _, vjp_fn = idf.vjp(fn, *args)
        grads = vjp_fn(x_bar)
    assert [r.derivative_method for r in d.backward] == ["user", "user"]
    assert all(calls[k] > 0 for k in calls), calls
    assert rel_err(x_dot, x_dot_cf) <= 1e-12
    for g, g_cf in zip(grads, grads_cf):
        assert rel_err(g, g_cf) <= 1e-12


# ---- 4. integer arguments and keyword options --------------------------------------------------


def int_F(x, theta, Q, k, mask):
    return Q @ x + sigmoid(x) - k * np.where(mask, theta, 0.0)


def test_integer_and_bool_arguments_get_no_gradient():
    rng = np.random.default_rng(4)
    theta, Q = ConvexFamily.make(rng, 4)
    k, mask = 3, np.array([True, False, True, True])
    seen = {}

    @idf.custom_root(int_F, tags=SPD)
    def solver(theta, Q, k, mask, *, x0=None, note="none"):
        seen["options"] = (x0, note)
        return ConvexFamily.solve(k * np.where(mask, theta, 0.0), Q)

    args = (theta, Q, k, mask)
    x = solver(*args)
    A, (_, B_Q) = ConvexFamily.jacobians(x, k * np.where(mask, theta, 0.0), Q)
    J = dense_ift(A, [-k * np.diag(mask.astype(float)), B_Q])

    _, vjp_fn = idf.vjp(solver, *args)
    u = rng.standard_normal(4)
    g_theta, g_Q, g_k, g_mask = vjp_fn(u)
    assert g_k is None and g_mask is None
    assert rel_err((g_theta, g_Q), J.T @ u) <= 1e-9

    v = (rng.standard_normal(4), rng.standard_normal((4, 4)))
    _, x_dot = idf.jvp(solver, args, (*v, None, None))
    assert rel_err(x_dot, J @ vec(v)) <= 1e-9
    assert rel_err(x_dot, central_fd(lambda t, q: solver.solver(t, q, k, mask), (theta, Q),
                                     v)) <= 1e-6
    J_theta = idf.jacobian(solver, argnums=0)(*args)
    assert rel_err(J_theta, J[:, :4]) <= 1e-9
    with pytest.raises(idf.StructureError, match="argument 2"):
        idf.jacobian(solver, argnums=2)(*args)

    # An integer array (indices) and a Python bool are fine too.
    idx = np.array([0, 2])

    def scale_of(idx, double):
        s = np.ones(4)
        s[idx] = 2.0 if double else 3.0
        return s

    def idx_F(x, theta, idx, double):
        return x - scale_of(idx, double) * theta

    f_idx = idf.custom_root(idx_F)(lambda theta, idx, double: scale_of(idx, double) * theta)
    for double in (True, False):
        _, vjp_fn = idf.vjp(f_idx, theta, idx, double)
        g_theta, g_idx, g_double = vjp_fn(u)
        assert g_idx is None and g_double is None
        np.testing.assert_allclose(g_theta, scale_of(idx, double) * u, rtol=1e-12)
        _, x_dot = idf.jvp(f_idx, (theta, idx, double), (np.ones(4), None, None))
        np.testing.assert_allclose(x_dot, scale_of(idx, double), rtol=1e-12)


def test_keyword_options_reach_solver_not_F():
    rng = np.random.default_rng(5)
    theta, Q = ConvexFamily.make(rng, 3)
    got = {}

    def F(x, *args, **kwargs):
        got.setdefault("F_calls", []).append((len(args), kwargs))
        return ConvexFamily.F(x, *args)

    @idf.custom_root(F, tags=SPD)
    def solver(theta, Q, *, x0=None, maxiter=60):
        got["options"] = (x0, maxiter)
        return ConvexFamily.solve(theta, Q)

    x = solver(theta, Q, x0=np.ones(3), maxiter=7)
    assert got["options"][1] == 7 and np.array_equal(got["options"][0], np.ones(3))
    # F sees the arguments and no option (the default residual check evaluates it twice:
    # the residual and the size of its terms)
    assert got["F_calls"] and all(c == (2, {}) for c in got["F_calls"])
    np.testing.assert_allclose(ConvexFamily.F(x, theta, Q), 0, atol=1e-12)
    # The rule applied to the same point, without options, needs none either.
    x_dot = idf.implicit_jvp(F, x, (theta, Q), (np.ones(3), None), tags=SPD)
    A, _ = ConvexFamily.jacobians(x, theta, Q)
    assert rel_err(x_dot, np.linalg.solve(A, np.ones(3))) <= 1e-10


# ---- 5. has_aux ----------------------------------------------------------------------------


def test_has_aux_passes_aux_through():
    rng = np.random.default_rng(6)
    args = ConvexFamily.make(rng, 4)

    @idf.custom_root(ConvexFamily.F, tags=SPD, has_aux=True)
    def solver(theta, Q):
        return ConvexFamily.solve(theta, Q), {"iterations": 7, "note": "aux"}

    x, aux = solver(*args)
    assert aux == {"iterations": 7, "note": "aux"}
    J = dense_ift(*ConvexFamily.jacobians(x, *args))
    v = random_direction(rng, args)
    (x1, aux1), (x_dot, aux_dot) = idf.jvp(solver, args, v)
    assert aux1 == aux and aux_dot is None
    np.testing.assert_array_equal(x1, x)
    assert rel_err(x_dot, J @ vec(v)) <= 1e-9
    (x2, aux2), vjp_fn = idf.vjp(solver, *args)
    assert aux2 == aux
    np.testing.assert_array_equal(x2, x)
    u = rng.standard_normal(4)
    assert rel_err(vjp_fn(u), J.T @ u) <= 1e-9
    with pytest.raises(idf.StructureError, match=r"\(x, aux\)"):
        idf.custom_root(ConvexFamily.F, has_aux=True)(ConvexFamily.solve)(*args)


# ---- 6. custom_fixed_point equals custom_root with F = T − x -------------------------------


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 5))
def test_fixed_point_equals_root_of_T_minus_x(seed, n):
    rng = np.random.default_rng(seed)
    args = ContractionFamily.make(rng, n)
    fp = idf.custom_fixed_point(ContractionFamily.T, solve=idf.Dense())(ContractionFamily.solve)
    root = idf.custom_root(lambda x, *a: ContractionFamily.T(x, *a) - x,
                           solve=idf.Dense())(ContractionFamily.solve)
    v = random_direction(rng, args)
    u = rng.standard_normal(n)
    _, d_fp = idf.jvp(fp, args, v)
    _, d_root = idf.jvp(root, args, v)
    assert rel_err(d_fp, d_root) <= 1e-13
    g_fp = idf.vjp(fp, *args)[1](u)
    g_root = idf.vjp(root, *args)[1](u)
    assert rel_err(g_fp, g_root) <= 1e-13
    np.testing.assert_allclose(idf.jacobian(fp, argnums=0)(*args),
                               idf.jacobian(root, argnums=0)(*args), rtol=1e-12, atol=1e-15)



@pytest.mark.parametrize("x_dtype", [np.float32, np.float64])
def test_float32_fixed_point_against_the_dense_formula(x_dtype):
    # float32 data (and a float32 or float64 x*): the reference's differences perturb θ in
    # float64, so F = T(x) − x once saw a float64 T(x) beside a float32 x and raised a
    # StructureError; and the complex step, rounded to float32 before its comparison with
    # central differences, was refused with a DerivativeAccuracyWarning. Oracle: the implicit
    # function theorem by hand in float64, dx/dθ = (I − D W)⁻¹ D with D = diag(1 − x²).
    rng = np.random.default_rng(3)
    n = 5
    W = (0.3 * rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    th = rng.standard_normal(n).astype(np.float32)

    def T(x, W, th):
        return np.tanh(W @ x + th)

    @idf.custom_fixed_point(T)
    def fp(W, th):
        x = np.zeros(n, x_dtype)
        for _ in range(200):
            x = np.tanh(W @ x + th)
        return x

    u = rng.standard_normal(n).astype(x_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no accuracy warning, no dtype error
        x, pull = idf.vjp(fp, W, th)
        gW, gth = pull(u)
    assert x.dtype == x_dtype and gth.dtype == np.float32 and gW.dtype == np.float32
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    D = np.diag(1.0 - x64 ** 2)
    lam = np.linalg.solve((np.eye(n) - D @ W64).T, u.astype(np.float64))  # uᵀ (I − DW)⁻¹
    g_th = D @ lam
    g_W = np.outer(g_th, x64)
    tol = 1e-5 if x_dtype == np.float32 else 1e-6  # x* itself has float32 data's rounding
    assert rel_err(gth, g_th) < tol and rel_err(gW, g_W) < tol

# ---- 7. diagnostics ------------------------------------------------------------------------


def test_diagnostics_record_forward_and_backward():
    rng = np.random.default_rng(7)
    args = ConvexFamily.make(rng, 5)
    fn = decorate(ConvexFamily, idf.CG())
    with idf.diagnostics() as d:
        x = fn(*args)
    assert len(d.forward) == 1 and d.backward == []
    rec = d.forward[0]
    assert rec.function == "solve" and rec.ok
    assert rec.residual_norm == pytest.approx(np.max(np.abs(ConvexFamily.F(x, *args))), abs=0)
    assert rec.residual_norm <= 1e-13
    assert rec.residual_tol == pytest.approx(10 * math.sqrt(np.finfo(np.float64).eps))

    with idf.diagnostics() as d:
        _, vjp_fn = idf.vjp(fn, *args)
        vjp_fn(np.ones(5))
        idf.jvp(fn, args, random_direction(rng, args))
    assert [r.mode for r in d.backward] == ["vjp", "jvp"]
    assert len(d.forward) == 2 and all(r.ok for r in d.forward)
    for r in d.backward:
        assert "CG" in r.solver and r.function == "solve"
        assert 1 <= int(r.iterations) <= 50
        assert bool(r.converged) and float(r.residual_norm) <= 1e-10

    fn_dense = decorate(ConvexFamily, idf.Dense())
    with idf.diagnostics() as outer, idf.diagnostics() as inner:
        idf.jvp(fn_dense, args, random_direction(rng, args))
    assert len(outer.backward) == len(inner.backward) == 1
    assert int(inner.backward[0].iterations) == 0 and "Dense" in inner.backward[0].solver

    # A forward solve that did not converge, with on_failure="warn", is recorded as not ok.
    loose = idf.custom_root(ConvexFamily.F, on_failure="warn")(lambda theta, Q: 0 * theta)
    with idf.diagnostics() as d, pytest.warns(RuntimeWarning, match="far from the root"):
        loose(*args)
    assert not d.forward[0].ok and d.forward[0].residual_norm > 1e-3


def test_keyword_options_through_partial_in_numpy_transforms():
    import functools

    def F(x, t):
        return x**3 + x - t

    @idf.custom_root(F)
    def cubic(t, *, iters=3):
        x = t
        for _ in range(iters):
            x = x - (x**3 + x - t) / (3 * x**2 + 1)
        return x

    with pytest.raises(idf.NonConvergenceError):
        idf.jvp(cubic, (np.array(2.0),), (np.array(1.0),))
    x, x_dot = idf.jvp(functools.partial(cubic, iters=50), (np.array(2.0),), (np.array(1.0),))
    assert abs(x_dot - 1 / (3 * x**2 + 1)) < 1e-12
    _, pullback = idf.vjp(functools.partial(cubic, iters=50), np.array(2.0))
    assert abs(pullback(np.array(1.0))[0] - 1 / (3 * x**2 + 1)) < 1e-12


def test_user_jvp_args_alone_also_serves_the_vjp():
    def F(x, th):
        return x - np.sin(th)

    calls = []

    def jvp_args(t, x, th):
        calls.append(1)
        return -np.cos(th) * t[0]

    @idf.custom_root(F, derivatives=idf.Derivatives(jvp_args=jvp_args))
    def s(th):
        return np.sin(th)

    th = np.array([0.3, 1.0])
    _, pullback = idf.vjp(s, th)
    np.testing.assert_allclose(pullback(np.ones(2))[0], np.cos(th), rtol=1e-12)
    assert calls
