"""`implicitdiff.scipy`: SciPy's solvers as differentiable drop-ins, on NumPy, JAX and PyTorch.

Oracles: closed forms (the active-set formula of box-constrained least squares, the KKT solve of
an equality-constrained QP, the pseudo-inverse of linear least squares, the inverse Jacobian of
small root and fixed-point problems, $d\\sqrt[3]{t}/dt$) and central finite differences of whole
`minimize` calls. NumPy derivatives go through `implicit_function` + `idf.jacobian` (the NumPy
reference), JAX through `jax.jacobian` (also under `jit` and `vmap`), PyTorch through
`torch.autograd.functional.jacobian`.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

import implicitdiff as idf
import implicitdiff.scipy as isc

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from frameworks import FRAMEWORKS, HAVE_TORCH, torch  # noqa: E402

# ---- helpers -----------------------------------------------------------------------------------

def to_fw(a, fw):
    if fw == "jax":
        return jnp.asarray(a)
    if fw == "torch":
        return torch.as_tensor(np.array(a), dtype=torch.float64)
    return np.asarray(a, dtype=np.float64)


def to_np(a):
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def jacobian(fw, drop_in, pos, args, i, **kw):
    """d(drop_in(*pos, args=args, **kw).x) / d args[i], as NumPy, in framework `fw`."""
    key = "root" if drop_in is isc.root_scalar else "x"
    args = tuple(to_fw(a, fw) for a in args)

    def out(r):
        if drop_in is isc.fixed_point:
            return r
        return getattr(r, key) if key == "root" else r.x

    if fw == "numpy":
        g = isc.implicit_function(drop_in, *pos, args=args, **kw)
        return np.asarray(idf.jacobian(g, i)(*args))
    if fw == "jax":
        def f(t):
            a = list(args)
            a[i] = t
            return out(drop_in(*pos, args=tuple(a), **kw))

        return np.asarray(jax.jacobian(f)(args[i]))

    def ft(t):
        a = list(args)
        a[i] = t
        return out(drop_in(*pos, args=tuple(a), **kw))

    return to_np(torch.autograd.functional.jacobian(ft, args[i]))


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


# ---- minimize: box-constrained least squares (L-BFGS-B) vs the active-set formula --------------

def box_ls(x, A, b):
    r = A @ x - b
    return 0.5 * (r * r).sum()


def box_ls_grad(x, A, b):  # complex-safe, for the NumPy reference
    return A.T @ (A @ x - b)


@pytest.fixture(scope="module")
def box_problem():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(20, 6))
    b = 2.0 * rng.normal(size=20)
    lo, hi = np.zeros(6), np.full(6, 0.5)
    return A, b, lo, hi


LBFGSB = dict(method="L-BFGS-B", options={"ftol": 1e-16, "gtol": 1e-12, "maxiter": 5000},
              residual_tol=1e-7)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_box_least_squares_lbfgsb_active_set(fw, box_problem):
    A, b, lo, hi = box_problem
    bounds = list(zip(lo, hi))
    kw = dict(LBFGSB, bounds=bounds, jac=box_ls_grad if fw == "numpy" else None)
    res = isc.minimize(box_ls, to_fw(np.full(6, 0.25), fw), args=(to_fw(A, fw), to_fw(b, fw)),
                       **kw)
    x = to_np(res.x)
    free = (x > lo + 1e-9) & (x < hi - 1e-9)
    assert 0 < free.sum() < 6, "the problem must have both active and free variables"
    # the active-set formula: dx_F/db = (A_F^T A_F)^{-1} A_F^T, dx_C/db = 0
    AF = A[:, free]
    expected = np.zeros((6, 20))
    expected[free] = np.linalg.solve(AF.T @ AF, AF.T)
    J = jacobian(fw, isc.minimize, (box_ls, to_fw(np.full(6, 0.25), fw)), (A, b), 1, **kw)
    assert rel(J, expected) < 1e-8
    assert res.success and isinstance(res.message, str) and res.nit > 0


# ---- minimize: logistic regression vs finite differences of the hyperparameter -----------------

def logreg(w, lam, X, y):
    """Written once with array-API operations: runs on NumPy (complex-safe), JAX and torch."""
    xp = array_api_compat.array_namespace(w)
    z = -y * (X @ w)
    return xp.mean(xp.log1p(xp.exp(z))) + 0.5 * lam * xp.sum(w * w)


def logreg_grad(w, lam, X, y):  # complex-safe, for the NumPy reference
    z = -y * (X @ w)
    s = 1.0 / (1.0 + np.exp(-z))
    return X.T @ (-y * s) / X.shape[0] + lam * w


@pytest.fixture(scope="module")
def logreg_problem():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 5))
    y = np.sign(X @ rng.normal(size=5) + 0.5 * rng.normal(size=40))
    return X, y


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_logistic_regression_vs_finite_differences(fw, logreg_problem):
    X, y = logreg_problem
    lam = 0.1
    kw = dict(LBFGSB, jac=logreg_grad if fw == "numpy" else None)

    def solve(lam_):
        return isc.minimize(logreg, np.zeros(5), args=(lam_, X, y), jac=logreg_grad,
                            **LBFGSB).x

    h = 1e-4
    fd = (solve(lam + h) - solve(lam - h)) / (2 * h)
    J = jacobian(fw, isc.minimize, (logreg, to_fw(np.zeros(5), fw)), (lam, X, y), 0, **kw)
    assert rel(J, fd) < 1e-6
    # the closed form at the solution: dw/dλ = -H^{-1} w
    w = solve(lam)
    p = 1.0 / (1.0 + np.exp(-y * (X @ w)))
    H = (X.T * (p * (1 - p))) @ X / X.shape[0] + lam * np.eye(5)
    assert rel(J, -np.linalg.solve(H, w)) < 1e-8


# ---- minimize with constraints: equality-constrained QP vs the closed-form KKT solve -----------

def qp_obj(x, Q, q):
    return 0.5 * x @ (Q @ x) + q @ x


def qp_grad(x, Q, q):
    return Q @ x + q


def qp_eq(x, E, d):
    return E @ x - d


@pytest.fixture(scope="module")
def qp_problem():
    rng = np.random.default_rng(3)
    M = rng.normal(size=(5, 5))
    Q = M @ M.T + np.eye(5)
    q = rng.normal(size=5)
    E = rng.normal(size=(2, 5))
    d = rng.normal(size=2)
    K = np.block([[Q, E.T], [E, np.zeros((2, 2))]])
    Kinv = np.linalg.inv(K)
    x = (Kinv @ np.concatenate([-q, d]))[:5]
    return Q, q, E, d, x, -Kinv[:5, :5], Kinv[:5, 5:]


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_equality_constrained_qp_vs_kkt(fw, qp_problem):
    Q, q, E, d, x_ref, dx_dq, dx_dd = qp_problem
    cons = [{"type": "eq", "fun": qp_eq, "args": (to_fw(E, fw), to_fw(d, fw))}]
    kw = dict(method="SLSQP", constraints=cons, tol=1e-12, residual_tol=1e-7,
              jac=qp_grad if fw == "numpy" else None)
    res = isc.minimize(qp_obj, to_fw(np.zeros(5), fw), args=(to_fw(Q, fw), to_fw(q, fw)), **kw)
    assert rel(to_np(res.x), x_ref) < 1e-9
    if fw == "numpy":  # the constrained implicit function takes (args, eq_args, ineq_args)
        g = isc.implicit_function(isc.minimize, qp_obj, np.zeros(5), args=(Q, q), **kw)
        thetas = ((Q, q), ((E, d),), ())
        # the KKT condition takes the constraint's Jacobian by the complex step, so it is not
        # complex-safe itself: the reference says it serves central differences (checked below
        # against the closed form all the same)
        with pytest.warns(idf.DerivativeAccuracyWarning):
            _, vjp_fn = idf.vjp(g, *thetas)
            J_q = np.stack([vjp_fn((np.eye(5)[i], np.zeros(1 * 2)))[0][1] for i in range(5)])
            J_d = np.stack([vjp_fn((np.eye(5)[i], np.zeros(2)))[1][0][1] for i in range(5)])
    elif fw == "jax":
        def f(q_, d_):
            c = [{"type": "eq", "fun": qp_eq, "args": (jnp.asarray(E), d_)}]
            return isc.minimize(qp_obj, jnp.zeros(5), args=(jnp.asarray(Q), q_),
                                **dict(kw, constraints=c)).x

        J_q, J_d = jax.jacobian(f, argnums=(0, 1))(jnp.asarray(q), jnp.asarray(d))
    else:
        def f(q_, d_):
            c = [{"type": "eq", "fun": qp_eq, "args": (to_fw(E, fw), d_)}]
            return isc.minimize(qp_obj, torch.zeros(5, dtype=torch.float64),
                                args=(to_fw(Q, fw), q_), **dict(kw, constraints=c)).x

        J_q, J_d = torch.autograd.functional.jacobian(f, (to_fw(q, fw), to_fw(d, fw)))
    assert rel(to_np(J_q), dx_dq) < 1e-8
    assert rel(to_np(J_d), dx_dd) < 1e-8


def test_inequality_constraints_recover_multipliers(qp_problem):
    """An active and an inactive inequality: the multipliers come out of the least-squares fit and
    the derivative matches the KKT solve restricted to the active constraint."""
    Q, q, E, _, _, _, _ = qp_problem
    x_free = np.linalg.solve(Q, -q)
    a_act, a_in = E[0], E[1]
    c_act = a_act @ x_free - 1.0  # cut the unconstrained optimum: active
    c_in = a_in @ x_free + 10.0  # far away: inactive
    cons = [{"type": "ineq", "fun": lambda x, c: c - jnp.asarray(a_act) @ x, "args": (c_act,)},
            {"type": "ineq", "fun": lambda x, c: c - jnp.asarray(a_in) @ x, "args": (c_in,)}]
    res = isc.minimize(qp_obj, jnp.zeros(5), args=(jnp.asarray(Q), jnp.asarray(q)),
                       method="SLSQP", constraints=cons, tol=1e-12, residual_tol=1e-7)
    (mu,) = res.kkt_multipliers
    assert mu[0] > 1e-3 and mu[1] == 0.0
    np.testing.assert_allclose(np.asarray(mu), res.multipliers, atol=1e-6)  # SciPy's own
    K = np.block([[Q, a_act[:, None]], [a_act[None, :], np.zeros((1, 1))]])
    expected = -np.linalg.inv(K)[:5, :5]
    J = jax.jacobian(lambda q_: isc.minimize(
        qp_obj, jnp.zeros(5), args=(jnp.asarray(Q), q_), method="SLSQP", constraints=cons,
        tol=1e-12, residual_tol=1e-7).x)(jnp.asarray(q))
    assert rel(J, expected) < 1e-8


# ---- root, least_squares, fixed_point, root_scalar vs closed forms -----------------------------

def root_fun(x, t):
    return x + 0.3 * x * x * x - t


def root_closed(t):
    x = np.array([np.roots([0.3, 0, 1, -ti])[np.isreal(np.roots([0.3, 0, 1, -ti]))].real[0]
                  for ti in t])
    return x, np.diag(1.0 / (1.0 + 0.9 * x * x))


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_root_vs_closed_form(fw):
    t = np.array([0.5, -1.0, 2.0])
    x_ref, J_ref = root_closed(t)
    kw = dict(tol=1e-12, residual_tol=1e-9)
    res = isc.root(root_fun, to_fw(np.zeros(3), fw), args=(to_fw(t, fw),), **kw)
    assert res.success and rel(to_np(res.x), x_ref) < 1e-10
    J = jacobian(fw, isc.root, (root_fun, to_fw(np.zeros(3), fw)), (t,), 0, **kw)
    assert rel(J, J_ref) < 1e-8


def lsq_res(x, A, b):
    return A @ x - b


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_least_squares_vs_pseudo_inverse(fw):
    rng = np.random.default_rng(4)
    A, b = rng.normal(size=(9, 4)), rng.normal(size=9)
    kw = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15, residual_tol=1e-9)
    if fw == "numpy":
        kw["jac"] = lambda x, A, b: A
    res = isc.least_squares(lsq_res, to_fw(np.zeros(4), fw), args=(to_fw(A, fw), to_fw(b, fw)),
                            **kw)
    assert rel(to_np(res.x), np.linalg.lstsq(A, b, rcond=None)[0]) < 1e-10
    J = jacobian(fw, isc.least_squares, (lsq_res, to_fw(np.zeros(4), fw)), (A, b), 1, **kw)
    assert rel(J, np.linalg.pinv(A)) < 1e-8


def fp_map(x, a):
    xp = array_api_compat.array_namespace(x)
    return 0.5 * xp.cos(x) + a


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_fixed_point_vs_closed_form(fw):
    a = np.array([0.1, 0.7, -0.4])
    kw = dict(xtol=1e-14, residual_tol=1e-10)
    x = isc.fixed_point(fp_map, to_fw(np.zeros(3), fw), args=(to_fw(a, fw),), **kw)
    x = to_np(x)
    assert np.max(np.abs(x - 0.5 * np.cos(x) - a)) < 1e-12
    J = jacobian(fw, isc.fixed_point, (fp_map, to_fw(np.zeros(3), fw)), (a,), 0, **kw)
    assert rel(J, np.diag(1.0 / (1.0 + 0.5 * np.sin(x)))) < 1e-9


def cube(x, t):
    return x * x * x - t


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("how", ["bracket", "newton"])
def test_root_scalar_vs_closed_form(fw, how):
    t = 2.0
    kw = (dict(bracket=[0.0, 3.0], method="brentq", xtol=1e-15) if how == "bracket" else
          dict(x0=to_fw(1.0, fw), method="newton", fprime=(lambda x, t: 3 * x * x)
               if fw == "numpy" else None, xtol=1e-15))
    kw["residual_tol"] = 1e-10
    r = isc.root_scalar(cube, args=(to_fw(t, fw),), **kw)
    assert r.converged and abs(float(to_np(r.root)) - t ** (1 / 3)) < 1e-12
    J = jacobian(fw, isc.root_scalar, (cube,), (t,), 0, **kw)
    assert abs(float(J) - t ** (-2 / 3) / 3) < 1e-10


# ---- JAX: jit and vmap; torch and NumPy agree with JAX ----------------------------------------

def test_dropins_under_jit_and_vmap(box_problem):
    A, b, lo, hi = box_problem
    Aj = jnp.asarray(A)
    kw = dict(LBFGSB, bounds=list(zip(lo, hi)))

    def x_of(b_):
        return isc.minimize(box_ls, jnp.full(6, 0.25), args=(Aj, b_), **kw).x

    bs = jnp.stack([jnp.asarray(b), jnp.asarray(b) * 0.9, jnp.asarray(b) * 1.1])
    eager = np.stack([np.asarray(jax.jacobian(x_of)(bi)) for bi in bs])
    batched = jax.jit(jax.vmap(jax.jacobian(x_of)))(bs)
    assert rel(batched, eager) < 1e-10
    xs = jax.jit(jax.vmap(x_of))(bs)
    assert rel(xs[0], np.asarray(x_of(bs[0]))) < 1e-10
    # under jit the result holds the array fields
    # (an OptimizeResult is not a pytree: return its fields as a dict from a jitted function)
    res = jax.jit(lambda b_: dict(isc.minimize(box_ls, jnp.full(6, 0.25), args=(Aj, b_),
                                               **kw)))(bs[0])
    assert bool(res["success"]) and int(res["nit"]) > 0 and "message" not in res
    # root and root_scalar under jit(vmap(grad))
    g = jax.jit(jax.vmap(jax.grad(lambda t: isc.root_scalar(
        cube, args=(t,), bracket=[0.0, 3.0], xtol=1e-15, residual_tol=1e-10).root)))
    ts = jnp.array([1.0, 2.0, 3.0])
    assert rel(g(ts), ts ** (-2 / 3) / 3) < 1e-10
    jr = jax.jit(jax.vmap(jax.jacobian(lambda t: isc.root(
        root_fun, jnp.zeros(3), args=(t,), tol=1e-12, residual_tol=1e-9).x)))
    T = jnp.array([[0.5, -1.0, 2.0], [0.1, 0.2, 0.3]])
    assert rel(jr(T)[0], root_closed(np.asarray(T[0]))[1]) < 1e-8


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_frameworks_agree_on_logistic_hypergradient(logreg_problem):
    X, y = logreg_problem

    def val(fw):
        return jacobian(fw, isc.minimize, (logreg, to_fw(np.zeros(5), fw)), (0.3, X, y), 0,
                        **dict(LBFGSB, jac=logreg_grad if fw == "numpy" else None))

    J = {fw: val(fw) for fw in FRAMEWORKS}
    assert rel(J["jax"], J["torch"]) < 1e-8
    assert rel(J["jax"], J["numpy"]) < 1e-8


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_nonconverged_scipy_run_raises_with_scipys_message(fw, logreg_problem):
    X, y = logreg_problem
    args = (to_fw(0.1, fw), to_fw(X, fw), to_fw(y, fw))
    with pytest.raises(idf.NonConvergenceError, match="Maximum number of iterations"):
        isc.minimize(logreg, to_fw(np.zeros(5), fw), args=args, method="BFGS",
                     options={"maxiter": 1})
    with pytest.raises(idf.NonConvergenceError, match="Failed to converge"):
        isc.fixed_point(fp_map, to_fw(np.zeros(3), fw), args=(to_fw(np.ones(3), fw),),
                        maxiter=2)
    with pytest.warns(RuntimeWarning, match="Maximum number of iterations"):
        isc.minimize(logreg, to_fw(np.zeros(5), fw), args=args, method="BFGS",
                     options={"maxiter": 1}, on_failure="warn", residual_tol=1e3)
    res = isc.minimize(logreg, to_fw(np.zeros(5), fw), args=args, method="BFGS",
                       options={"maxiter": 1}, on_failure="nan")
    assert np.all(np.isnan(to_np(res.x))) and not res.success


def test_nonconverged_under_jit_carries_scipys_message(logreg_problem):
    X, y = logreg_problem
    f = jax.jit(lambda lam: isc.minimize(logreg, jnp.zeros(5), args=(lam, X, y),
                                         method="BFGS", options={"maxiter": 1}).x)
    with pytest.raises(Exception, match="Maximum number of iterations"):
        jax.block_until_ready(f(0.1))


def test_residual_above_tolerance_raises(logreg_problem):
    X, y = logreg_problem
    with pytest.raises(idf.NonConvergenceError, match="residual_tol"):
        isc.minimize(logreg, jnp.zeros(5), args=(0.1, X, y), method="BFGS",
                     options={"gtol": 1e-2}, residual_tol=1e-10)


def test_constraint_violation_at_returned_x_raises(qp_problem):
    Q, q, E, d, *_ = qp_problem
    cons = [{"type": "eq", "fun": qp_eq, "args": (jnp.asarray(E), jnp.asarray(d))}]
    # BFGS ignores constraints (SciPy warns and reports success): the returned x violates them
    with pytest.warns(RuntimeWarning, match="cannot handle constraints"), \
            pytest.raises(idf.NonConvergenceError, match="violates the constraints"):
        isc.minimize(qp_obj, jnp.zeros(5), args=(jnp.asarray(Q), jnp.asarray(q)),
                     method="BFGS", constraints=cons)


def test_mismatched_args_raise(logreg_problem):
    X, y = logreg_problem
    with pytest.raises(idf.StructureError, match=r"called as fun\(x, \*args\) with 2 args"):
        isc.minimize(logreg, np.zeros(5), args=(X, y))
    with pytest.raises(idf.StructureError, match="constraints"):
        isc.minimize(qp_obj, np.zeros(5), args=(np.eye(5), np.ones(5)),
                     constraints=[{"type": "eq", "fun": qp_eq, "args": (np.ones((1, 5)),)}])
    with pytest.raises(idf.StructureError, match="with 0 args"):
        isc.root(root_fun, np.zeros(3))
    with pytest.raises(ValueError, match="on_failure"):
        isc.root(root_fun, np.zeros(3), args=(np.ones(3),), on_failure="ignore")


# ---- any host solver: scikit-learn's Ridge (a C/Cython solver) through wrap_solver -------------

def ridge_F(w, alpha, X, y):
    return X.T @ (X @ w - y) + alpha * w


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_wrap_solver_with_a_non_scipy_solver(fw):
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(30, 4)), rng.normal(size=30)

    @isc.wrap_solver(ridge_F, tags={idf.symmetric, idf.positive_definite},
                     result_shape=jax.ShapeDtypeStruct((4,), jnp.float64))
    def ridge(alpha, X, y):
        m = Ridge(alpha=float(alpha), fit_intercept=False, solver="cholesky").fit(X, y)
        return m.coef_.astype(np.float64)

    M = X.T @ X + 0.5 * np.eye(4)
    w = np.linalg.solve(M, X.T @ y)
    expected = -np.linalg.solve(M, w)
    args = (to_fw(0.5, fw), to_fw(X, fw), to_fw(y, fw))
    if fw == "numpy":
        J = idf.jacobian(ridge, 0)(*args)
    elif fw == "jax":
        J = jax.jit(jax.jacobian(ridge))(*args)
    else:
        J = torch.autograd.functional.jacobian(lambda a: ridge(a, *args[1:]), args[0])
    assert rel(to_np(J), expected) < 1e-9


def test_import_does_not_pull_frameworks():
    import subprocess
    import sys

    code = ("import sys, implicitdiff.scipy; "
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
