"""Adversarial cases for `implicitdiff.scipy` and the prox conditions (issue 11, "no silently
wrong derivative"): SciPy's `success=False` at a machine-precision residual, recompilation of
constrained `minimize` under `jax.jit`, `root_scalar` with an array-API `f`, KKT failures that
name their block, and the proximal-gradient residual at a small step.

Oracles: closed forms (ridge regression, the inverse Jacobian of a 2x2 root problem, the
derivative of a logarithm), and central finite differences of scikit-learn's ElasticNet fit at a
tight tolerance (its solution is affine in `y` on a fixed support, so the differences are exact
to rounding). None of them shares code with the library.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import array_api_compat
import numpy as np
import pytest

import implicitdiff as idf
import implicitdiff.conditions as cond
import implicitdiff.scipy as isc

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from frameworks import FRAMEWORKS, torch  # noqa: E402
from test_scipy import to_fw, to_np  # noqa: E402  (the drop-in tests' conversions)


def jac_of(fw, call, arg, np_args=None, index=0):
    """d call(arg) / d arg as NumPy (`call` returns the differentiable x), in framework fw; for
    NumPy `call(None, implicit=True)` returns the implicit function, differentiated in its
    argument `index` at `np_args` (default `(arg,)`)."""
    if fw == "jax":
        return np.asarray(jax.jacobian(call)(to_fw(arg, fw)))
    if fw == "torch":
        return to_np(torch.autograd.functional.jacobian(call, to_fw(arg, fw)))
    g = call(None, implicit=True)
    np_args = (np.asarray(arg, dtype=np.float64),) if np_args is None else np_args
    return np.asarray(idf.jacobian(g, index)(*np_args))


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(1e-300, float(np.max(np.abs(b)))))


def scipy_warnings(record, pattern):
    return [w for w in record if pattern in str(w.message)]


# ---- 1. BFGS "precision loss" at tol 1e-12: the residual decides, SciPy's flag only warns ------

def ridge(x, A, b):
    r = A @ x - b
    return 0.5 * (r * r).sum() + 0.5 * (x * x).sum()


def ridge_grad(x, A, b):  # complex-safe, for the NumPy reference
    return A.T @ (A @ x - b) + x


@pytest.fixture(scope="module")
def ridge_problem():
    rng = np.random.default_rng(0)
    rng.normal(size=(30, 5 + 1))  # skip 180 draws: this seed and scale lose precision in BFGS
    A, b = 10 * rng.normal(size=(30, 5)), 10 * rng.normal(size=30)
    H = A.T @ A + np.eye(5)
    return A, b, np.linalg.solve(H, A.T @ b), np.linalg.solve(H, A.T)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_bfgs_precision_loss_at_machine_precision_is_accepted(fw, ridge_problem):
    A, b, x_ref, J_ref = ridge_problem
    # torch's gradient rounds differently: SciPy still succeeds at 1e-12, loses precision at 1e-13
    kw: dict[str, Any] = dict(method="BFGS", tol=1e-13 if fw == "torch" else 1e-12,
              jac=ridge_grad if fw == "numpy" else None)
    Af = to_fw(A, fw)

    def call(b_, implicit=False):
        if implicit:
            return isc.implicit_function(isc.minimize, ridge, np.zeros(5), args=(A, b), **kw)
        return isc.minimize(ridge, to_fw(np.zeros(5), fw), args=(Af, b_), **kw).x

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = isc.minimize(ridge, to_fw(np.zeros(5), fw), args=(Af, to_fw(b, fw)), **kw)
        J = jac_of(fw, call, b, (A, b), 1)
    assert not res.success and "precision loss" in res.message  # the case is exercised
    assert rel(to_np(res.x), x_ref) < 1e-12
    assert rel(J, J_ref) < 1e-10
    assert scipy_warnings(record, "precision loss"), "SciPy's flag must still warn"


def test_bfgs_precision_loss_under_jit(ridge_problem):
    """Under `jax.jit` the decision runs in the host callback: the same acceptance and warning."""
    A, b, _, J_ref = ridge_problem
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        J = jax.jit(jax.jacobian(lambda b_: isc.minimize(
            ridge, jnp.zeros(5), args=(jnp.asarray(A), b_), method="BFGS", tol=1e-12).x))(
                jnp.asarray(b))
    assert rel(J, J_ref) < 1e-10
    assert scipy_warnings(record, "precision loss")


# ---- 2. hybr "xtol too small": the residual decides ---------------------------------------------

def hybr_fun(x, t):
    xp = array_api_compat.array_namespace(x, t)
    return xp.stack([xp.exp(x[0]) - t[0] * x[1], x[1] ** 3 + xp.sin(x[0]) - t[1]])


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_hybr_xtol_too_small_is_accepted(fw):
    t = np.array([20.0, 30.0])
    kw: dict[str, Any] = dict(method="hybr", options={"xtol": 1e-15})

    def call(t_, implicit=False):
        if implicit:
            return isc.implicit_function(isc.root, hybr_fun, np.ones(2), args=(t,), **kw)
        return isc.root(hybr_fun, to_fw(np.ones(2), fw), args=(t_,), **kw).x

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = isc.root(hybr_fun, to_fw(np.ones(2), fw), args=(to_fw(t, fw),), **kw)
        J = jac_of(fw, call, t)
    x = to_np(res.x)
    assert not res.success and res.status == 3  # "xtol=... is too small": the case is exercised
    Jx = np.array([[np.exp(x[0]), -t[0]], [np.cos(x[0]), 3 * x[1] ** 2]])
    Jt = np.array([[-x[1], 0.0], [0.0, -1.0]])
    assert np.max(np.abs(to_np(hybr_fun(x, t)))) < 1e-12
    assert rel(J, -np.linalg.solve(Jx, Jt)) < 1e-10
    assert scipy_warnings(record, "too small")


def test_scipy_failure_far_from_a_root_still_raises_with_both_messages():
    """The other side: SciPy's flag with a large residual is a loud failure naming both."""
    A, b = np.random.default_rng(5).normal(size=(8, 5)), np.ones(8)
    with pytest.raises(idf.NonConvergenceError, match=r"(?s)Maximum number.*residual"):
        isc.minimize(ridge, jnp.zeros(5), args=(jnp.asarray(A), jnp.asarray(b)),
                     method="BFGS", options={"maxiter": 1})


def test_scipy_flag_follows_the_process_wide_on_failure():
    """`on_failure=None` takes `idf.config.on_failure` at call time."""
    kw: dict[str, Any] = dict(method="BFGS", options={"maxiter": 1})
    args = (jnp.asarray(np.random.default_rng(5).normal(size=(8, 5))), jnp.ones(8))
    with idf.config.override(on_failure="nan"):
        res = isc.minimize(ridge, jnp.zeros(5), args=args, **kw)
    assert np.all(np.isnan(np.asarray(res.x)))
    with idf.config.override(on_failure="warn"), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        isc.root(hybr_fun, jnp.ones(2), args=(jnp.array([20.0, 30.0]),), method="hybr",
                 options={"maxfev": 2})
    assert scipy_warnings(rec, "maxfev")  # SciPy's message (the core's check warns too)


# ---- 3. minimize(..., constraints=...) under jax.jit: compiled once -----------------------------

class _Compiles(logging.Handler):
    def __init__(self, ignore):
        super().__init__(logging.DEBUG)
        self.n = 0
        self.ignore = ignore

    def emit(self, record):
        msg = record.getMessage()
        if "Compiling" in msg and not (self.ignore and self.ignore in msg):
            self.n += 1


def count_compilations(fn, inputs, ignore=None):
    """The number of XLA compilations while calling fn on each input (after one warm-up),
    leaving out those whose log line contains `ignore`."""
    jax.block_until_ready(fn(inputs[0]))
    handler = _Compiles(ignore)
    logger = logging.getLogger("jax")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            for a in inputs[1:]:
                jax.block_until_ready(fn(a))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return handler.n


def qp_obj(x, Q, q):
    return 0.5 * x @ (Q @ x) + q @ x


def qp_eq(x, E, d):
    return E @ x - d


def qp_ineq(x, c):
    return c - jnp.sum(x)


@pytest.mark.parametrize("how", ["jit", "jit-grad", "eager"])
def test_constrained_minimize_does_not_recompile(how):
    rng = np.random.default_rng(3)
    M = rng.normal(size=(5, 5))
    Q = jnp.asarray(M @ M.T + np.eye(5))
    E, d = jnp.asarray(rng.normal(size=(2, 5))), jnp.asarray(rng.normal(size=2))
    cons = [{"type": "eq", "fun": qp_eq, "args": (E, d)},
            {"type": "ineq", "fun": qp_ineq, "args": (0.5,)}]

    def sol(q):
        return isc.minimize(qp_obj, jnp.zeros(5), args=(Q, q), method="SLSQP",
                            constraints=cons, tol=1e-12, residual_tol=1e-5).x

    fn = {"jit": jax.jit(sol), "jit-grad": jax.jit(jax.grad(lambda q: sol(q).sum())),
          "eager": sol}[how]
    qs = [jnp.ones(5) + 0.1 * jnp.asarray(rng.normal(size=5)) for _ in range(4)]
    # eagerly, the JAX backend's external-solver path compiles a fresh `jax.pure_callback` at
    # each call (backends/implicitdiff_jax, not the drop-ins): counted apart
    ignore = "jit(pure_callback)" if how == "eager" else None
    assert count_compilations(fn, qs, ignore) == 0


# ---- 4. root_scalar hands arrays (never Python floats or NumPy scalars) to an array-API f -------

def strict_exp(x, t):
    if not (isinstance(x, np.ndarray) or array_api_compat.is_array_api_strict_namespace(
            array_api_compat.array_namespace(x))):
        raise AssertionError(f"f received {type(x).__name__}, not an array")
    xp = array_api_compat.array_namespace(x, t)
    return xp.exp(x) - t


def strict_exp_prime(x, t):
    strict_exp(x, t)
    xp = array_api_compat.array_namespace(x)
    return xp.exp(x)


@pytest.mark.parametrize("kw", [
    dict(bracket=[0.0, 3.0], method="brentq"),
    dict(x0=1.0, method="newton", fprime=strict_exp_prime),
    dict(x0=1.0, x1=1.5, method="secant"),
    dict(x0=1.0, method="halley", fprime=strict_exp_prime, fprime2=strict_exp_prime),
], ids=["brentq", "newton", "secant", "halley"])
def test_root_scalar_gives_an_array_api_f_arrays(kw):
    t = np.asarray(2.0)
    r = isc.root_scalar(strict_exp, args=(t,), xtol=1e-15, **kw)
    assert abs(float(r.root) - np.log(2.0)) < 1e-12
    g = isc.implicit_function(isc.root_scalar, strict_exp, args=(t,), xtol=1e-15, **kw)
    J = idf.jacobian(g, 0)(t)
    assert abs(float(np.asarray(J)) - 0.5) < 1e-10  # d log(t)/dt at t = 2


def test_root_scalar_on_array_api_strict():
    xps = pytest.importorskip("array_api_strict")
    t = xps.asarray(2.0, dtype=xps.float64)
    r = isc.root_scalar(strict_exp, args=(t,), bracket=[0.0, 3.0], xtol=1e-15)
    assert array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(r.root))
    assert r.root.shape == () and abs(float(r.root) - np.log(2.0)) < 1e-12
    g = isc.implicit_function(isc.root_scalar, strict_exp, args=(t,), bracket=[0.0, 3.0],
                              xtol=1e-15)
    assert abs(float(idf.jacobian(g, 0)(t)) - 0.5) < 1e-10


# ---- 5. a failed KKT residual check names its block ---------------------------------------------

def fake_method(x_out):
    """A `minimize` method (SciPy's callable form) that returns `x_out` and reports success."""
    def method(fun, x0, args=(), **kwargs):
        import scipy.optimize

        f = fun(np.asarray(x_out), *args)
        return scipy.optimize.OptimizeResult(x=np.asarray(x_out, dtype=np.float64),
                                             fun=float(np.asarray(f[0] if isinstance(f, tuple)
                                                                  else f)),
                                             success=True, status=0, message="fake", nit=1,
                                             nfev=1)

    return method


def sq2(x, c):
    return 0.5 * ((x - c) * (x - c)).sum()


@pytest.mark.parametrize("fw", ["numpy", "jax"])
@pytest.mark.parametrize("block", ["stationarity", "equality", "complementarity"])
def test_failed_kkt_check_names_the_block(fw, block):
    # min ½‖x - c‖²; eq: x0 + x1 = 1 (solution (0, 1) for c = (0, 1)); ineq: x0 <= 1 with c=(2, 0)
    if block == "complementarity":
        c = np.array([2.0, 0.0])
        cons = [{"type": "ineq", "fun": lambda x: 1.0 - x[0:1]}]
        x_out = [1.0 - 1e-8, 0.0]  # feasible, active: mu = 1 fits stationarity, mu*g = -1e-8
    else:
        c = np.array([0.0, 1.0])
        cons = [{"type": "eq", "fun": lambda x: x[0:1] + x[1:2] - 1.0}]
        x_out = ([1e-8, 1.0 - 1e-8] if block == "stationarity" else  # feasible, off optimum
                 [0.0, 1.0 + 1e-8])  # infeasible by 1e-8
    with pytest.raises(idf.NonConvergenceError, match=f"the {block} block is off"):
        isc.minimize(sq2, to_fw(np.zeros(2), fw), args=(to_fw(c, fw),),
                     method=fake_method(x_out), constraints=cons, residual_tol=1e-10)


# ---- 6. proximal gradient at a small step: the residual is in gradient units --------------------

@pytest.fixture(scope="module")
def enet_problem():
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    n, p = 60, 12
    X = rng.normal(size=(n, p))
    w0 = np.zeros(p)
    w0[:4] = [2.0, -1.5, 1.0, 0.5]
    y = X @ w0 + 0.3 * rng.normal(size=n)
    lam = (0.1, 0.1)  # sklearn: alpha = lam1 + lam2, l1_ratio = lam1 / alpha

    def fit(y_, tol):
        m = sklearn.ElasticNet(alpha=lam[0] + lam[1], l1_ratio=lam[0] / (lam[0] + lam[1]),
                               fit_intercept=False, tol=tol, max_iter=100_000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return m.fit(X, np.asarray(y_)).coef_.astype(np.float64)

    v = rng.normal(size=n)
    h = 1e-3  # the fit is affine in y on its support: central differences are exact to rounding
    fd = (fit(y + h * v, 1e-15) - fit(y - h * v, 1e-15)) / (2 * h)
    return X, y, lam, fit, v, fd


def enet_f(w, data):
    X, y = data
    r = X @ w - y
    return 0.5 * (r * r).sum() / X.shape[0]


def enet_grad(w, data):  # complex-safe, for the NumPy reference
    X, y = data
    return X.T @ (X @ w - y) / X.shape[0]


def enet_fn(enet_problem, step, tol, fw):
    X, _, lam, fit, _, _ = enet_problem
    F = cond.proximal_gradient(enet_f, cond.prox_elastic_net, step=step,
                               grad=enet_grad if fw == "numpy" else None)
    Xf = to_fw(X, fw)

    def Fy(w, y_):
        return F(w, (Xf, y_), lam)

    shape = jax.ShapeDtypeStruct((X.shape[1],), jnp.float64) if fw == "jax" else None
    return isc.wrap_solver(Fy, tags=F.tags, result_shape=shape)(lambda y_: fit(y_, tol))


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_elastic_net_small_step_loose_fit_is_refused(fw, enet_problem):
    y = enet_problem[1]
    fn = enet_fn(enet_problem, 1e-4, 1e-2, fw)
    with pytest.raises(idf.NonConvergenceError, match="residual_tol"):
        fn(to_fw(y, fw))


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_elastic_net_small_step_tight_fit_matches_finite_differences(fw, enet_problem):
    _, y, _, _, v, fd = enet_problem
    # NumPy: at step 1e-3 the reference's complex-step probe of dF/dθ falls back to central
    # differences (loud: a DerivativeAccuracyWarning, 6 digits); 1e-2 is still 100x below 1
    fn = enet_fn(enet_problem, 1e-2 if fw == "numpy" else 1e-3, 1e-12, fw)
    if fw == "jax":
        J = np.asarray(jax.jacobian(fn)(jnp.asarray(y))) @ v
    elif fw == "torch":
        J = to_np(torch.autograd.functional.jacobian(fn, to_fw(y, fw))) @ v
    else:
        J = idf.jvp(fn, (y,), (v,))[1]
    assert rel(to_np(J), fd) < 1e-8


@pytest.mark.parametrize("step", [1.0, 1e-3])
def test_proximal_gradient_residual_is_in_gradient_units(step):
    """F = (x - prox(x - η∇f))/η: off the optimum by δ in a smooth problem, |F| ≈ |∇f|, whatever
    the step; the derivative does not depend on the step."""
    H = np.diag([1.0, 2.0, 3.0])
    b = np.array([1.0, -2.0, 0.5])
    F = cond.proximal_gradient(lambda x, th: 0.5 * x @ (H @ x) - th @ x, cond.prox_none,
                               step=step, grad=lambda x, th: H @ x - th)
    x_star = np.linalg.solve(H, b)
    delta = np.array([1e-6, 0.0, 0.0])
    np.testing.assert_allclose(F(x_star + delta, b), H @ delta, rtol=1e-6, atol=1e-15)
    Fp = cond.projected_gradient(lambda x, th: 0.5 * x @ (H @ x) - th @ x,
                                 cond.projection_box, step=step)
    np.testing.assert_allclose(Fp(x_star + delta, b, (-10.0, 10.0)), H @ delta, rtol=1e-6,
                               atol=1e-15)


def test_kkt_condition_names_its_blocks():
    def h(z, _):
        return z[:1] - 1.0

    assert cond.kkt(sq2, eq=h, ineq=h).blocks == ("stationarity", "equality", "complementarity")
    assert cond.kkt(sq2, ineq=h).blocks == ("stationarity", "complementarity")
    assert cond.stationarity(sq2).blocks is None


def test_scipy_failure_with_constraints_names_the_block_and_scipys_message():
    def obj(x, c):
        return jnp.sum(jnp.exp(x) * c) + 0.5 * jnp.sum(x * x)

    cons = [{"type": "eq", "fun": lambda x: jnp.sum(x)[None] - 1.0},
            {"type": "ineq", "fun": lambda x: -0.1 - x[0:2]}]
    with pytest.raises(idf.NonConvergenceError,
                       match=r"(?s)Iteration limit.*the stationarity block is off"):
        isc.minimize(obj, jnp.zeros(4), args=(jnp.array([1.0, 2.0, 0.5, 1.5]),),
                     method="SLSQP", constraints=cons, options={"maxiter": 2},
                     residual_tol=1e-9)
