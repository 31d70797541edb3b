"""`implicitdiff.conditions`: the optimality conditions catalogue, on NumPy, JAX and PyTorch.

Oracles: scikit-learn's `Lasso` and the lasso's closed form on the support; the closed-form KKT
solve of an equality-constrained QP; the closed form of the simplex projection's Jacobian; the
closed forms of least squares and of a strongly convex stationarity problem (inverse Hessian);
central finite differences of whole solver maps; brute-force checks of the proximal operators.
The forward solvers are plain NumPy / SciPy / scikit-learn run on host arrays (the decorated
solver converts), so one solver serves every framework.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import Lasso

import implicitdiff as idf
import implicitdiff.conditions as cond
from implicitdiff._gallery import to_framework

# The catalogue's conditions take a complex-step gradient inside F, so on NumPy F itself is not
# complex-safe and central differences serve, with their DerivativeAccuracyWarning.
pytestmark = pytest.mark.filterwarnings("ignore:.*come from central differences:UserWarning")

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from frameworks import FRAMEWORKS, torch  # noqa: E402

# ---- helpers -----------------------------------------------------------------------------------

def to_np(tree):
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_np(t) for t in tree)
    if torch is not None and isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy()
    return np.asarray(tree)


def framework(tree):
    leaf = tree
    while isinstance(leaf, (tuple, list)):
        leaf = leaf[0]
    if isinstance(leaf, jax.Array):
        return "jax"
    if torch is not None and isinstance(leaf, torch.Tensor):
        return "torch"
    return "numpy"


def host(solve_np):
    """A solver written in NumPy, called with the arrays of any framework."""

    def solver(*args):
        return to_framework(solve_np(*to_np(args)), framework(args))

    solver.__name__ = solve_np.__name__
    return solver


def jacobian(fn, argnum, args):
    fn(*args)  # a concrete call first: JAX then knows the host solver's output shape
    if framework(args) == "jax":  # compiled once rather than dispatched op by op
        return to_np(jax.jit(jax.jacobian(fn, argnum))(*args))
    return to_np(idf.jacobian(fn, argnum)(*args))


def vjp(fn, args, u):
    fn(*args)
    if framework(args) == "jax":
        return to_np(jax.jit(lambda args, u: jax.vjp(fn, *args)[1](u))(args, jnp.asarray(u)))
    _, pullback = idf.vjp(fn, *args)
    return to_np(pullback(to_framework(u, framework(args))))


def rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def arrays(fw, *a):
    return to_framework(a, fw)


# ---- 1. lasso: proximal gradient vs scikit-learn and the closed form on the support ------------

def lasso_data():
    rng = np.random.default_rng(0)
    m, n = 40, 15
    X = rng.standard_normal((m, n))
    w = np.zeros(n)
    w[:5] = [2.0, -1.5, 1.0, 0.7, -0.4]
    y = X @ w + 0.1 * rng.standard_normal(m)
    lam = 0.1 * np.max(np.abs(X.T @ y))
    return X, y, lam


def sklearn_lasso(X, y, lam):
    """sklearn minimizes (1/(2m))‖y − Xw‖² + α‖w‖₁: α = λ/m for ½‖Xw − y‖² + λ‖w‖₁."""
    model = Lasso(alpha=lam / X.shape[0], fit_intercept=False, tol=1e-14, max_iter=100_000)
    return model.fit(X, y).coef_


def lasso_solve(data, lam):
    """scikit-learn, then the exact solution on its support and signs (active-set polish)."""
    X, y = data
    c = sklearn_lasso(X, y, float(lam))
    S = c != 0
    x = np.zeros_like(c)
    XS = X[:, S]
    x[S] = np.linalg.solve(XS.T @ XS, XS.T @ y - lam * np.sign(c[S]))
    return x


def lasso_f(x, data):
    X, y = data
    r = X @ x - y
    return 0.5 * (r * r).sum()


def lasso_grad(x, data):  # complex-safe: exact complex step in the NumPy reference
    X, y = data
    return X.T @ (X @ x - y)


def lasso_closed_form(X, y, lam, x):
    S = x != 0
    XS = X[:, S]
    G = XS.T @ XS
    d_lam = np.zeros_like(x)
    d_lam[S] = -np.linalg.solve(G, np.sign(x[S]))
    d_y = np.zeros((x.size, y.size))
    d_y[S] = np.linalg.solve(G, XS.T)
    return d_lam, d_y


@pytest.mark.parametrize("fw,with_grad", [(fw, False) for fw in FRAMEWORKS] +
                         [("numpy", True)])
def test_lasso_matches_sklearn_and_closed_form_on_support(fw, with_grad):
    X, y, lam = lasso_data()
    L = np.linalg.norm(X, 2) ** 2
    F = cond.proximal_gradient(lasso_f, cond.prox_l1, step=1 / L,
                               grad=lasso_grad if with_grad else None)
    assert F.tags == frozenset()
    lasso = idf.custom_root(F, tags=F.tags)(host(lasso_solve))
    data, lam_ = to_framework(((X, y), lam), fw)
    x = to_np(lasso(data, lam_))
    S = x != 0
    assert 2 <= S.sum() <= 10
    assert np.max(np.abs(x - sklearn_lasso(X, y, lam))) < 1e-8
    assert np.max(np.abs(to_np(F(*to_framework((x, (X, y), lam), fw))))) < 1e-12

    d_lam, d_y = lasso_closed_form(X, y, lam, x)
    J = jacobian(lasso, 1, (data, lam_))
    assert rel(J[S], d_lam[S]) < 1e-9
    assert np.all(J[~S] == 0.0) or np.max(np.abs(J[~S])) < 1e-13  # zero off the support
    assert np.max(np.abs(J)) <= 1.01 * np.max(np.abs(d_lam))  # no huge entries
    if fw != "numpy":  # reverse mode through the data (X, y)
        u = np.random.default_rng(1).standard_normal(x.size)
        (gX, gy), _ = vjp(lasso, (data, lam_), u)
        assert rel(gy, u @ d_y) < 1e-9
        assert np.all(np.isfinite(gX))


def test_lasso_hypergradient_of_validation_loss_jax():
    """A bilevel use: d/dλ of a validation loss, vs central differences of the whole map."""
    X, y, lam = lasso_data()
    F = cond.proximal_gradient(lasso_f, cond.prox_l1, step=1 / np.linalg.norm(X, 2) ** 2)
    lasso = idf.custom_root(F)(host(lasso_solve))
    Xv = jnp.asarray(np.random.default_rng(2).standard_normal((10, X.shape[1])))
    yv = Xv @ jnp.asarray(lasso_solve((X, y), lam)) + 0.3

    def val(lam):
        return jnp.sum((Xv @ lasso((jnp.asarray(X), jnp.asarray(y)), lam) - yv) ** 2)

    val(jnp.asarray(lam))
    g = jax.grad(val)(jnp.asarray(lam))
    h = 1e-4
    fd = (float(val(jnp.asarray(lam + h))) - float(val(jnp.asarray(lam - h)))) / (2 * h)
    assert abs(float(g) - fd) <= 1e-6 * max(1.0, abs(fd))


# ---- 2. multiclass SVM dual on a product of simplices -----------------------------------------

def svm_data():
    rng = np.random.default_rng(3)
    m, d, k = 8, 12, 3
    X = rng.standard_normal((m, d))
    Y = np.eye(k)[rng.integers(0, k, m)]
    return X, Y, 0.5


def svm_f(beta, theta):
    """Dual of the Crammer–Singer SVM: ½λ⁻¹‖Xᵀ(Y − β)‖² + ⟨β, Y⟩, β row-wise on the simplex."""
    X, Y, lam = theta
    K = X.T @ (Y - beta)
    return 0.5 / lam * (K * K).sum() + (beta * Y).sum()


def svm_solve(theta):
    X, Y, lam = theta
    eta = float(lam) / np.linalg.norm(X, 2) ** 2
    beta = np.full(Y.shape, 1.0 / Y.shape[1])
    for _ in range(4000):
        g = -X @ (X.T @ (Y - beta)) / lam + Y
        beta = cond.projection_simplex(beta - eta * g)
    return beta


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_svm_dual_mirror_descent_and_projected_gradient_agree(fw):
    X, Y, lam = svm_data()
    eta = lam / np.linalg.norm(X, 2) ** 2
    F_pg = cond.projected_gradient(svm_f, cond.projection_simplex, step=eta)
    F_md = cond.mirror_descent(svm_f, step=eta)
    pg = idf.custom_root(F_pg)(host(svm_solve))
    md = idf.custom_root(F_md)(host(svm_solve))
    theta = to_framework(((X, Y, lam),), fw)
    beta = to_np(pg(*theta))
    assert np.allclose(beta.sum(axis=1), 1.0) and np.min(beta) >= 0.0
    assert np.sum(beta == 0) > 0  # the solution is on the boundary: the interesting case
    assert np.max(np.abs(to_np(F_md(to_framework(beta, fw), *theta)))) < 1e-12

    u = np.random.default_rng(4).standard_normal(beta.shape)
    ((gX_pg, _, glam_pg),) = vjp(pg, theta, u)
    ((gX_md, _, glam_md),) = vjp(md, theta, u)
    tol = 1e-7 if fw == "numpy" else 1e-9  # the reference differentiates by central differences
    assert rel(glam_md, glam_pg) < tol
    assert rel(gX_md, gX_pg) < tol
    # and both are the derivative of the solution map (central differences in λ)
    h = 1e-5
    fd = (svm_solve((X, Y, lam + h)) - svm_solve((X, Y, lam - h))) / (2 * h)
    assert abs(float(glam_pg) - float(np.sum(u * fd))) < 1e-6 * max(1.0, abs(float(glam_pg)))


# ---- 3. KKT: an equality-constrained QP, and an inequality-constrained problem ---------------

def qp_data():
    rng = np.random.default_rng(5)
    n, p = 6, 2
    M = rng.standard_normal((n, n))
    Q = M @ M.T + np.eye(n)
    E = rng.standard_normal((p, n))
    return Q, E, rng.standard_normal(n), rng.standard_normal(p)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_kkt_equality_qp_matches_closed_form(fw):
    Q, E, c, d = qp_data()
    n, p = Q.shape[0], E.shape[0]
    Qf, Ef = to_framework((Q, E), fw)

    def f(z, c):
        return 0.5 * (z * (Qf @ z)).sum() + (c * z).sum()

    def h(z, d):
        return Ef @ z - d

    F = cond.kkt(f, eq=h)
    assert F.tags == frozenset({idf.symmetric})
    K = np.block([[Q, E.T], [E, np.zeros((p, p))]])

    def solve(c, d):
        sol = np.linalg.solve(K, np.concatenate([-c, d]))
        return sol[:n], sol[n:]

    qp = idf.custom_root(F, tags=F.tags)(host(solve))
    args = to_framework((c, d), fw)
    z, _ = to_np(qp(*args))
    Kinv = np.linalg.inv(K)
    Jc, Jd = jacobian(qp, 0, args), jacobian(qp, 1, args)
    assert rel(Jc[0], -Kinv[:n, :n]) < 1e-9 and rel(Jc[1], -Kinv[n:, :n]) < 1e-9
    assert rel(Jd[0], Kinv[:n, n:]) < 1e-9 and rel(Jd[1], Kinv[n:, n:]) < 1e-9
    assert np.max(np.abs(E @ z - d)) < 1e-12


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_kkt_inequality_projection_onto_simplex(fw):
    """min ½‖z − θ‖² s.t. Σz = 1, −z ≤ 0: z = the simplex projection, whose Jacobian on the
    support S is I − 11ᵀ/|S| (zero elsewhere)."""
    theta = np.array([0.9, -0.3, 0.45, 0.05, 1.2, -1.0])

    def f(z, theta):
        r = z - theta
        return 0.5 * (r * r).sum()

    def h(z, _):
        return z.sum(axis=0, keepdims=True) - 1.0

    def g(z, _):
        return -z

    F = cond.kkt(f, eq=h, ineq=g)
    assert F.tags == frozenset()

    def solve(theta):
        z = cond.projection_simplex(theta)
        S = z > 0
        tau = np.mean(theta[S] - z[S])
        mu = np.where(S, 0.0, z - theta + tau)
        return z, np.array([tau]), mu

    proj = idf.custom_root(F)(host(solve))
    (t,) = to_framework((theta,), fw)
    z, _, mu = to_np(proj(t))
    assert np.all(mu >= 0) and np.all(mu[z > 0] == 0) and np.all(mu[z == 0] > 0)
    S = z > 0
    ref = np.zeros((6, 6))
    ref[np.ix_(S, S)] = np.eye(S.sum()) - 1.0 / S.sum()
    Jz = jacobian(proj, 0, (t,))[0]
    assert np.max(np.abs(Jz - ref)) < 1e-10
    # the same Jacobian as autodiff through the sort-based projection itself
    Jproj = jax.jacobian(cond.projection_simplex)(jnp.asarray(theta))
    assert np.max(np.abs(Jz - np.asarray(Jproj))) < 1e-10


# ---- 4. least squares -------------------------------------------------------------------------

@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_least_squares_linear_matches_closed_form(fw):
    rng = np.random.default_rng(6)
    A, b = rng.standard_normal((12, 4)), rng.standard_normal(12)

    def r(x, A, b):
        return A @ x - b

    F = cond.least_squares(r, positive_definite=True)
    assert F.tags == frozenset({idf.symmetric, idf.positive_definite})
    ls = idf.custom_root(F, tags=F.tags)(host(lambda A, b: np.linalg.lstsq(A, b)[0]))
    args = to_framework((A, b), fw)
    assert rel(jacobian(ls, 1, args), np.linalg.pinv(A)) < 1e-9


def test_least_squares_nonlinear_uses_exact_hessian():
    """A residual that is not zero at the solution: the exact derivative needs the full Hessian
    JᵀJ + Σ rᵢ∇²rᵢ, not Gauss–Newton's JᵀJ. Checked against finite differences of the solver."""
    from scipy.optimize import least_squares as scipy_ls

    t = np.linspace(0.0, 1.0, 9)
    obs = 2.0 * np.exp(-1.3 * t) + 0.05 * np.cos(7 * t)

    def r(x, obs):
        xp = jnp if isinstance(x, jax.Array) else np
        return x[0] * xp.exp(x[1] * t) - obs

    def solve(obs):
        x = scipy_ls(lambda x: r(x, obs), np.array([1.0, -1.0]), xtol=1e-15, ftol=1e-15,
                     gtol=1e-15).x
        for _ in range(5):  # Newton polish on ∇½‖r‖² (exact Hessian, written by hand)
            e = np.exp(x[1] * t)
            res = x[0] * e - obs
            J = np.stack([e, x[0] * t * e], axis=1)
            c = res @ (t * e)
            H = J.T @ J + np.array([[0.0, c], [c, res @ (x[0] * t * t * e)]])
            x = x - np.linalg.solve(H, J.T @ res)
        return x

    F = cond.least_squares(r)
    for fw in ("numpy", "jax"):
        ls = idf.custom_root(F, tags=F.tags)(host(solve))
        (o,) = to_framework((obs,), fw)
        J = jacobian(ls, 0, (o,))
        h = 1e-6
        fd = np.stack([(solve(obs + h * e) - solve(obs - h * e)) / (2 * h)
                       for e in np.eye(obs.size)], axis=1)
        assert rel(J, fd) < 1e-6, fw


# ---- 5. stationarity ---------------------------------------------------------------------------

def softplus_problem():
    rng = np.random.default_rng(7)
    n = 5
    M = rng.standard_normal((n, n))
    return M @ M.T / n + 0.5 * np.eye(n), rng.standard_normal(n)


@pytest.mark.parametrize("fw,with_grad", [(fw, False) for fw in FRAMEWORKS] + [("numpy", True)])
def test_stationarity_strongly_convex_matches_inverse_hessian(fw, with_grad):
    Q, theta = softplus_problem()
    Qf = to_framework(Q, fw)

    def f(x, theta):
        xp = jnp if isinstance(x, jax.Array) else (torch if framework(x) == "torch" else np)
        return 0.5 * (x * (Qf @ x)).sum() + xp.log(1 + xp.exp(x)).sum() - (theta * x).sum()

    def grad(x, theta):
        return Q @ x + 1 / (1 + np.exp(-x)) - theta

    def newton(theta):
        x = np.zeros_like(theta)
        for _ in range(30):
            s = 1 / (1 + np.exp(-x))
            x = x - np.linalg.solve(Q + np.diag(s * (1 - s)), grad(x, theta))
        return x

    F = cond.stationarity(f, strongly_convex=True, grad=grad if with_grad else None)
    assert F.tags == frozenset({idf.symmetric, idf.positive_definite})
    fn = idf.custom_root(F, tags=F.tags)(host(newton))
    (t,) = to_framework((theta,), fw)
    x = to_np(fn(t))
    s = 1 / (1 + np.exp(-x))
    ref = np.linalg.inv(Q + np.diag(s * (1 - s)))
    tol = 1e-12 if (fw != "numpy" or with_grad) else 1e-7
    assert rel(jacobian(fn, 0, (t,)), ref) < tol
    assert rel(to_np(F(*to_framework((x, theta), fw))), grad(x, theta)) < 1e-12 or \
        np.max(np.abs(to_np(F(*to_framework((x, theta), fw))))) < 1e-12


def test_fixed_point_condition():
    W = np.array([[0.2, -0.1], [0.3, 0.1]])

    def T(x, b):
        return np.tanh(W @ x + b)

    F = cond.fixed_point(T)
    assert F.tags == frozenset() and "fixed_point" in repr(F)

    def solve(b):
        x = np.zeros(2)
        for _ in range(100):
            x = T(x, b)
        return x

    fn = idf.custom_root(F)(solve)
    b = np.array([0.5, -0.2])
    x = fn(b)
    D = np.diag(1 - np.tanh(W @ x + b) ** 2)
    assert rel(idf.jacobian(fn, 0)(b), np.linalg.solve(np.eye(2) - D @ W, D)) < 1e-12


# ---- 6. the proximal operators and projections ------------------------------------------------

def _objective(prox_g, x, y, eta):
    return 0.5 * np.sum((x - y) ** 2) + eta * prox_g(x)


PROXES = {
    "l1": (cond.prox_l1, 0.4, lambda x: 0.4 * np.abs(x).sum()),
    "elastic_net": (cond.prox_elastic_net, (0.4, 0.3),
                    lambda x: 0.4 * np.abs(x).sum() + 0.15 * np.sum(x * x)),
    "group_lasso": (cond.prox_group_lasso, 0.5,
                    lambda x: 0.5 * np.linalg.norm(x, axis=-1).sum()),
}


@pytest.mark.parametrize("name", sorted(PROXES))
def test_prox_minimizes_its_objective_brute_force(name):
    prox, theta, g = PROXES[name]
    rng = np.random.default_rng(8)
    y = rng.standard_normal((4, 3))
    y[0] *= 0.1  # a group (and entries) set to zero
    eta = 0.7
    x = prox(y, theta, eta)
    best = _objective(g, x, y, eta)
    for _ in range(2000):
        scale = 10.0 ** rng.uniform(-6, 0)
        cand = x + scale * rng.standard_normal(x.shape)
        assert _objective(g, cand, y, eta) >= best - 1e-14
    for _ in range(200):  # coordinates set to zero are a candidate too
        cand = np.where(rng.random(x.shape) < 0.5, 0.0, x)
        assert _objective(g, cand, y, eta) >= best - 1e-14


def test_prox_known_formulas():
    rng = np.random.default_rng(9)
    y = 2 * rng.standard_normal(20)
    assert np.allclose(cond.prox_l1(y, 0.5, 2.0), np.sign(y) * np.maximum(np.abs(y) - 1, 0),
                       rtol=0, atol=1e-15)
    assert np.allclose(cond.prox_elastic_net(y, (0.5, 1.0), 2.0),
                       np.sign(y) * np.maximum(np.abs(y) - 1, 0) / 3, rtol=0, atol=1e-15)
    assert np.array_equal(cond.projection_nonnegative(y), np.maximum(y, 0))
    assert np.array_equal(cond.prox_nonnegative(y, None, 3.0), np.maximum(y, 0))
    assert np.array_equal(cond.projection_box(y, (-0.5, 1.0)), np.clip(y, -0.5, 1.0))
    lo, hi = -np.abs(rng.standard_normal(20)), np.abs(rng.standard_normal(20))
    assert np.array_equal(cond.prox_box(y, (lo, hi), 1.0), np.clip(y, lo, hi))
    ball = cond.projection_l2_ball(y, 1.5)
    assert np.isclose(np.linalg.norm(ball), 1.5) and np.allclose(ball, y * 1.5 / np.linalg.norm(y))
    assert np.array_equal(cond.prox_l2_ball(0.1 * y / np.linalg.norm(y), 1.5),
                          0.1 * y / np.linalg.norm(y))
    v = y.reshape(4, 5)
    gl = cond.prox_group_lasso(v, 0.5, 2.0)
    nrm = np.linalg.norm(v, axis=1, keepdims=True)
    assert np.allclose(gl, np.maximum(0, 1 - 1.0 / nrm) * v, rtol=0, atol=1e-15)
    assert cond.prox_none(y) is y


def _simplex_bisection(y, s):
    lo, hi = np.min(y) - s, np.max(y)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(y - mid, 0).sum() > s else (lo, mid)
    return np.maximum(y - 0.5 * (lo + hi), 0)


def test_projections_brute_force():
    rng = np.random.default_rng(10)
    for _ in range(50):
        y = 2 * rng.standard_normal(7)
        s = float(rng.uniform(0.5, 3))
        p = cond.projection_simplex(y, s)
        assert np.allclose(p, _simplex_bisection(y, s), rtol=0, atol=1e-12)
        assert np.isclose(p.sum(), s) and np.all(p >= 0)
        # no feasible point is closer (random points of the simplex)
        w = rng.dirichlet(np.ones(7), 300) * s
        assert np.all(np.linalg.norm(w - y, axis=1) >= np.linalg.norm(p - y) - 1e-12)
    Y = rng.standard_normal((5, 4))
    assert np.allclose(cond.projection_simplex(Y), [_simplex_bisection(r, 1.0) for r in Y])
    assert np.allclose(cond.prox_simplex(Y, 2.0, 5.0), [_simplex_bisection(r, 2.0) for r in Y])
    C, d, y = rng.standard_normal((2, 5)), rng.standard_normal(2), rng.standard_normal(5)
    p = cond.projection_affine(y, (C, d))
    assert np.allclose(C @ p, d, rtol=0, atol=1e-12)
    assert np.allclose((y - p) - C.T @ np.linalg.lstsq(C.T, y - p)[0], 0, atol=1e-12)


@pytest.mark.parametrize("fw", [f for f in FRAMEWORKS if f != "numpy"])
def test_operators_agree_across_frameworks_with_autodiff_jacobians(fw):
    """Values equal NumPy's; the Jacobians (framework autodiff) equal the NumPy complex step."""
    rng = np.random.default_rng(11)
    y = rng.standard_normal(6)
    C_np, d_np = rng.standard_normal((2, 6)), rng.standard_normal(2)
    aff = {"C": C_np, "d": d_np}  # the affine set's data, in the framework being tested
    ops = [
        (lambda y, t: cond.prox_l1(y, t, 0.5), 0.4),
        (lambda y, t: cond.prox_elastic_net(y, (t, 0.3), 0.5), 0.4),
        (lambda y, t: cond.prox_group_lasso(y.reshape(3, 2), t, 0.5).reshape(6), 0.5),
        (lambda y, t: cond.projection_box(y, (-t, t)), 0.6),
        (lambda y, t: cond.projection_l2_ball(y, t), 1.0),
        (lambda y, t: cond.projection_simplex(y, t), 1.2),
        (lambda y, t: cond.projection_nonnegative(y * t), 1.0),
        (lambda y, t: cond.projection_affine(y, (aff["C"] * t, aff["d"])), 1.1),
    ]
    for i, (op, t) in enumerate(ops):
        aff.update(C=C_np, d=d_np)
        ref = op(y, t)
        # NumPy reference Jacobians by the complex step (the operators are complex-step safe)
        h = 1e-30
        Jy = np.stack([np.imag(op(y + 1j * h * e, t)) / h for e in np.eye(6)], axis=1)
        Jt = np.imag(op(y.astype(complex), t + 1j * h)) / h
        aff.update(zip("Cd", to_framework((C_np, d_np), fw)))
        yf, tf = to_framework((y, t), fw)
        assert np.allclose(to_np(op(yf, tf)), ref, rtol=0, atol=1e-14), i
        if fw == "jax":
            Jy_f, Jt_f = jax.jacobian(op, argnums=(0, 1))(yf, tf)
        else:
            Jy_f, Jt_f = torch.func.jacrev(op, argnums=(0, 1))(yf, tf)
        assert np.allclose(to_np(Jy_f), Jy, rtol=0, atol=1e-12), i
        assert np.allclose(to_np(Jt_f), Jt, rtol=0, atol=1e-12), i


# ---- 7. kinks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fw", [f for f in FRAMEWORKS if f != "numpy"])
def test_prox_at_a_kink_gets_the_branch_derivative_never_nan(fw):
    grad = jax.jacobian if fw == "jax" else torch.func.jacrev
    y, t = to_framework((np.array([0.5, -0.5, 0.2, 1.0]), 0.5), fw)
    # |y| = t exactly: the strict comparisons pick the zero branch
    J = to_np(grad(lambda y: cond.prox_l1(y, t, 1.0))(y))
    assert np.array_equal(J, np.diag([0.0, 0.0, 0.0, 1.0]))
    Jt = to_np(grad(lambda t: cond.prox_l1(y, t, 1.0))(t))
    assert np.array_equal(Jt, [0.0, 0.0, 0.0, -1.0])
    zero = to_framework(np.zeros((2, 3)), fw)
    for op in (lambda v: cond.prox_group_lasso(v, t, 1.0),
               lambda v: cond.projection_l2_ball(v, t)):
        Jz = to_np(grad(op)(zero))
        assert np.all(np.isfinite(Jz))
    assert np.array_equal(to_np(grad(lambda v: cond.prox_group_lasso(v, t, 1.0))(zero)), 0 * Jz)


def test_lasso_at_a_kink_as_documented():
    """x* = soft(θ, λ) = argmin ½‖x − θ‖² + λ‖x‖₁ with θ₀ = λ exactly (the kink): dx*/dθ does
    not exist there. The NumPy reference sees the one-sided slopes of F differ by the same
    amount at every step and refuses (StructureError naming the kink); with kink_probe=False
    it returns the average of the one-sided slopes, 0.5. docs/conditions.md says so."""
    lam = 0.5

    def f(x, theta):
        r = x - theta
        return 0.5 * (r * r).sum()

    F = cond.proximal_gradient(f, cond.prox_l1, grad=lambda x, th: x - th)
    solve = host(lambda theta, lam: cond.prox_l1(theta, lam, 1.0))
    theta = np.array([0.5, 1.0, -0.2])
    with pytest.raises(idf.StructureError, match="kink"):
        idf.jacobian(idf.custom_root(F)(solve), 0)(theta, lam)
    fn = idf.custom_root(F, kink_probe=False)(solve)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # central differences serve
        J_np = idf.jacobian(fn, 0)(theta, lam)
    assert np.allclose(np.diag(J_np), [0.5, 1.0, 0.0], atol=1e-8)


# ---- 8. bad input ------------------------------------------------------------------------------

def test_bad_input_errors():
    f = lasso_f
    for step in (-1.0, 0.0, float("inf"), "1", True):
        with pytest.raises(ValueError, match="step"):
            cond.proximal_gradient(f, cond.prox_l1, step=step)
    with pytest.raises(ValueError, match="positive"):
        cond.projected_gradient(f, cond.projection_simplex, step=-0.1)
    with pytest.raises(ValueError, match="positive"):
        cond.mirror_descent(f, step=0)
    with pytest.raises(TypeError, match="callable"):
        cond.stationarity(3.0)
    with pytest.raises(TypeError, match="prox"):
        cond.proximal_gradient(f, "l1")
    with pytest.raises(TypeError, match="eq"):
        cond.kkt(f, eq=np.zeros(2))

    # a prox that changes the shape
    F = cond.proximal_gradient(lambda x, _: (x * x).sum(), lambda y, t, s: y[:-1])
    with pytest.raises(idf.StructureError, match="shape"):
        F(np.ones(3), None, None)
    # KKT: x of the wrong form, multipliers shaped unlike the constraints
    F = cond.kkt(lambda z, _: (z * z).sum(), eq=lambda z, _: z[:2] - 1.0)
    with pytest.raises(idf.StructureError, match=r"x = \(z, nu\)"):
        F(np.ones(3))
    with pytest.raises(idf.StructureError, match="shape"):
        F((np.ones(3), np.ones(3)))
    # operators
    with pytest.raises(idf.StructureError, match=r"\(lower, upper\)"):
        cond.projection_box(np.ones(3), 1.0)
    with pytest.raises(idf.StructureError, match="C of shape"):
        cond.projection_affine(np.ones(3), (np.ones((2, 4)), np.ones(2)))
    with pytest.raises(idf.StructureError, match="d of shape"):
        cond.projection_affine(np.ones(3), (np.ones((2, 3)), np.ones(3)))
    # NumPy without autodiff: f must be complex-safe, else a clear error
    F = cond.stationarity(lambda x: float(np.sum(x ** 2)))
    with pytest.raises(idf.StructureError, match="complex-safe"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F(np.ones(3))
    F = cond.stationarity(lambda x: np.sum(x ** 2)[None])
    with pytest.raises(idf.StructureError, match="scalar"):
        F(np.ones(3))


def test_core_import_stays_framework_free():
    import subprocess
    import sys

    code = ("import sys, implicitdiff.conditions, numpy as np; "
            "import implicitdiff.conditions as c; c.prox_l1(np.ones(3), 0.5); "
            "c.stationarity(lambda x: (x*x).sum())(np.ones(2)); "
            "print('jax' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]
