"""The JAX backend: forward, reverse and higher-order implicit derivatives under every transform.

Oracles: closed forms (ridge), central finite differences, the dot-product test, and the NumPy
reference backend.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("implicitdiff_jax")
import jax.numpy as jnp  # noqa: E402

import implicitdiff as idf  # noqa: E402

jax.config.update("jax_enable_x64", True)

SOLVERS = [idf.Dense(), idf.Cholesky(), idf.CG(), idf.MINRES(), idf.GMRES(), idf.BiCGStab(),
           idf.NormalCG(), idf.Auto()]


def ridge_F(x, lam, A, b):
    return A.T @ (A @ x - b) + lam * x


def make_ridge(solve=idf.CG(), **kw):
    @idf.custom_root(ridge_F, solve=solve, tags={idf.symmetric, idf.positive_definite}, **kw)
    def ridge(lam, A, b):
        return jnp.linalg.solve(A.T @ A + lam * jnp.eye(A.shape[1]), A.T @ b)

    return ridge


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.standard_normal((12, 5)))
    b = jnp.asarray(rng.standard_normal(12))
    return A, b


def closed_form(lam, A, b):
    H = A.T @ A + lam * jnp.eye(A.shape[1])
    x = jnp.linalg.solve(H, A.T @ b)
    dx_dlam = -jnp.linalg.solve(H, x)
    dx_db = jnp.linalg.solve(H, A.T)
    return x, dx_dlam, dx_db


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("solve", SOLVERS, ids=lambda s: type(s).__name__)
def test_ridge_closed_form_every_solver(data, solve):
    A, b = data
    ridge = make_ridge(solve)
    x, dlam, db = closed_form(0.3, A, b)
    assert rel(ridge(0.3, A, b), x) < 1e-12
    # reverse mode in λ and in b from one pullback (one trace and compile, not two)
    jac_lam, jac_b = jax.jacobian(ridge, argnums=(0, 2))(0.3, A, b)
    assert rel(jac_lam, dlam) < 1e-8
    assert rel(jac_b, db) < 1e-8
    assert rel(jax.jacfwd(ridge, argnums=2)(0.3, A, b), db) < 1e-8
    assert rel(jax.jit(jax.jacrev(ridge, argnums=0))(0.3, A, b), dlam) < 1e-8


def test_cg_default_tolerance_gives_ten_digits(data):
    A, b = data
    ridge = make_ridge(idf.CG())
    _, dlam, _ = closed_form(0.01, A, b)
    assert rel(jax.jacrev(ridge)(0.01, A, b), dlam) < 1e-10


def test_gradient_wrt_matrix_matches_autodiff_through_solve(data):
    A, b = data
    ridge = make_ridge()

    def direct(A):
        return jnp.linalg.solve(A.T @ A + 0.2 * jnp.eye(5), A.T @ b)

    g = jax.grad(lambda A: jnp.sum(ridge(0.2, A, b) ** 2))(A)
    g_ref = jax.grad(lambda A: jnp.sum(direct(A) ** 2))(A)
    assert rel(g, g_ref) < 1e-9


def test_jvp_vjp_dot_product(data):
    A, b = data
    ridge = make_ridge(idf.GMRES())
    rng = np.random.default_rng(1)
    primals = (0.4, A, b)
    tangents = (0.7, jnp.asarray(rng.standard_normal(A.shape)),
                jnp.asarray(rng.standard_normal(12)))
    u = jnp.asarray(rng.standard_normal(5))
    _, Jv = jax.jvp(ridge, primals, tangents)
    _, pullback = jax.vjp(ridge, *primals)
    JTu = pullback(u)
    lhs = float(u @ Jv)
    rhs = sum(float(jnp.vdot(g, t)) for g, t in zip(JTu, tangents))
    assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), 1.0)


def test_hessian_matches_finite_differences_of_gradient(data):
    A, b = data
    ridge = make_ridge()

    def val(lam):
        return jnp.sum(ridge(lam, A, b) ** 2)

    h = jax.hessian(val)(0.5)
    g = jax.grad(val)
    eps = 1e-5
    fd = (g(0.5 + eps) - g(0.5 - eps)) / (2 * eps)
    assert rel(h, fd) < 1e-6
    assert rel(jax.jacfwd(jax.jacrev(val))(0.5), h) < 1e-10
    # the same second derivative, from the closed form of x(λ) = H(λ)^{-1} A^T b
    H = A.T @ A + 0.5 * jnp.eye(5)
    x = jnp.linalg.solve(H, A.T @ b)
    dx = -jnp.linalg.solve(H, x)
    d2x = 2 * jnp.linalg.solve(H, jnp.linalg.solve(H, x))
    assert rel(h, 2 * (dx @ dx + x @ d2x)) < 1e-9


def test_linearize_and_jit_vmap_grad(data):
    A, b = data
    ridge = make_ridge()
    _, f_lin = jax.linearize(lambda lam: ridge(lam, A, b), 0.3)
    _, dlam, _ = closed_form(0.3, A, b)
    assert rel(f_lin(1.0), dlam) < 1e-9
    lams = jnp.linspace(0.1, 2.0, 16)

    def val(lam):
        return jnp.sum(ridge(lam, A, b))

    batched = jax.jit(jax.vmap(jax.grad(val)))(lams)
    loop = jnp.stack([jax.grad(val)(lam) for lam in lams])
    assert rel(batched, loop) < 1e-12
    values = jax.vmap(lambda lam: ridge(lam, A, b))(lams)
    assert values.shape == (16, 5)


@pytest.mark.timeout(120)
def test_vmap_grad_finishes_under_timeout(data):
    A, b = data
    ridge = make_ridge(idf.GMRES())
    lams = jnp.linspace(0.1, 2.0, 32)
    out = jax.jit(jax.vmap(jax.grad(lambda lam: jnp.sum(ridge(lam, A, b)))))(lams)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("dtype,tol,iters", [("float64", 1e-8, 60), ("float32", 1e-3, 30)])
def test_fixed_point_and_float32(dtype, tol, iters):
    rng = np.random.default_rng(2)
    W = rng.standard_normal((6, 6))
    W = 0.5 * W / np.linalg.norm(W, 2)
    U = rng.standard_normal((6, 3))
    dtype = jnp.dtype(dtype)

    def T(z, W, U, theta):
        return jnp.tanh(W @ z + U @ theta)

    def run(W, U, theta, iters):
        z = jnp.zeros(W.shape[0], dtype=W.dtype)
        for _ in range(iters):
            z = T(z, W, U, theta)
        return z

    fp = idf.custom_fixed_point(T)(lambda W, U, theta: run(W, U, theta, iters))
    Wj, Uj = jnp.asarray(W, dtype), jnp.asarray(U, dtype)
    th = jnp.asarray([0.3, -0.2, 0.5], dtype)
    g = jax.grad(lambda th: jnp.sum(fp(Wj, Uj, th)))(th)
    assert g.dtype == dtype
    # oracle: unrolled autodiff through many iterations converges to the implicit gradient
    g_unrolled = jax.grad(lambda th: jnp.sum(run(Wj, Uj, th, 200)))(th)
    assert rel(g, g_unrolled) < tol


def test_keyword_options_are_static_and_not_differentiated(data):
    A, b = data
    calls = []

    @idf.custom_root(ridge_F, tags={idf.symmetric, idf.positive_definite})
    def ridge(lam, A, b, *, iters=3, scale=1.0):
        calls.append((iters, scale))
        x = jnp.zeros(A.shape[1])
        H = A.T @ A + lam * jnp.eye(A.shape[1])
        for _ in range(iters):  # iterative refinement: exact after a few steps
            x = x + jnp.linalg.solve(H, A.T @ b - H @ x)
        return x * scale

    g = jax.grad(lambda lam: jnp.sum(ridge(lam, A, b, iters=4, scale=1.0)))(0.3)
    _, dlam, _ = closed_form(0.3, A, b)
    assert rel(g, jnp.sum(dlam)) < 1e-9
    assert all(c == (4, 1.0) for c in calls)


def test_pytrees_and_integer_arguments():
    def F(x, theta, k):
        return {"a": x["a"] - k * theta["w"] ** 2, "b": x["b"] - jnp.sin(theta["v"])}

    @idf.custom_root(F)
    def solve(theta, k):
        return {"a": k * theta["w"] ** 2, "b": jnp.sin(theta["v"])}

    theta = {"w": jnp.array([1.0, 2.0]), "v": jnp.array(0.5)}

    def total(th, k):
        out = solve(th, k)
        return jnp.sum(out["a"]) + out["b"]

    for k in (3, jnp.array(3)):
        g = jax.grad(total)(theta, k)
        assert rel(g["w"], 6 * theta["w"]) < 1e-12
        assert rel(g["v"], jnp.cos(0.5)) < 1e-12
    # an integer array argument gets a float0 cotangent, not a crash
    _, pullback = jax.vjp(solve, theta, jnp.array(3))
    _, gk = pullback({"a": jnp.ones(2), "b": jnp.array(1.0)})
    assert gk.dtype == jax.dtypes.float0


def test_equinox_module_argument():
    eqx = pytest.importorskip("equinox")

    class Layer(eqx.Module):
        W: jax.Array
        c: jax.Array

    def F(x, layer):
        return x - 0.5 * jnp.tanh(layer.W @ x + layer.c)

    @idf.custom_root(F)
    def solve(layer):
        x = jnp.zeros(layer.c.shape)
        for _ in range(80):
            x = 0.5 * jnp.tanh(layer.W @ x + layer.c)
        return x

    rng = np.random.default_rng(3)
    layer = Layer(jnp.asarray(rng.standard_normal((4, 4)) * 0.3),
                  jnp.asarray(rng.standard_normal(4)))
    g = jax.grad(lambda L: jnp.sum(solve(L)))(layer)
    eps = 1e-6
    dc = jnp.zeros(4).at[1].set(eps)
    fd = (jnp.sum(solve(Layer(layer.W, layer.c + dc)))
          - jnp.sum(solve(Layer(layer.W, layer.c - dc)))) / (2 * eps)
    assert abs(float(g.c[1] - fd)) < 1e-7


def test_closure_over_traced_values_gets_correct_gradient(data):
    A, b = data

    def loss_implicit(A):
        def F(x, lam):  # closes over the traced A
            return A.T @ (A @ x - b) + lam * x

        @idf.custom_root(F, tags={idf.symmetric, idf.positive_definite})
        def ridge(lam):
            return jnp.linalg.solve(A.T @ A + lam * jnp.eye(A.shape[1]), A.T @ b)

        return jnp.sum(ridge(0.1) ** 2)

    def loss_direct(A):
        return jnp.sum(jnp.linalg.solve(A.T @ A + 0.1 * jnp.eye(A.shape[1]), A.T @ b) ** 2)

    g_ref = jax.grad(loss_direct)(A)
    assert rel(jax.grad(loss_implicit)(A), g_ref) < 1e-9
    assert rel(jax.jit(jax.grad(loss_implicit))(A), g_ref) < 1e-9
    assert rel(jax.jacfwd(loss_implicit)(A), g_ref) < 1e-9


def test_external_numpy_solver_under_jit_and_vmap(data):
    A, b = data

    @idf.custom_root(ridge_F, tags={idf.symmetric, idf.positive_definite})
    def ridge_np(lam, A, b):
        A, b = np.asarray(A), np.asarray(b)
        return np.linalg.solve(A.T @ A + float(lam) * np.eye(A.shape[1]), A.T @ b)

    _, dlam, _ = closed_form(0.3, A, b)
    # without a result_shape, the shape must come from a concrete call first
    with pytest.raises(idf.StructureError, match="result_shape"):
        jax.jit(lambda lam: ridge_np(lam, A, b))(0.3)
    ridge_np(0.3, A, b)  # concrete call: caches the output shape
    assert rel(jax.jit(jax.jacrev(ridge_np))(0.3, A, b), dlam) < 1e-9
    lams = jnp.array([0.1, 0.3, 1.0])
    vals = jax.jit(jax.vmap(lambda lam: ridge_np(lam, A, b)))(lams)
    for lam, v in zip(lams, vals):
        assert rel(v, closed_form(lam, A, b)[0]) < 1e-12

    @idf.custom_root(ridge_F, result_shape=jax.ShapeDtypeStruct((5,), jnp.float64))
    def ridge_np2(lam, A, b):
        return ridge_np.solver(lam, A, b)

    g = jax.jit(jax.vmap(jax.grad(lambda lam: jnp.sum(ridge_np2(lam, A, b)))))(lams)
    assert rel(g[1], jnp.sum(dlam)) < 1e-9


def test_nonconverged_forward_raises_eagerly_and_under_jit(data):
    A, b = data

    @idf.custom_root(ridge_F)
    def bad(lam, A, b):
        return jnp.zeros(A.shape[1]) + lam

    with pytest.raises(idf.NonConvergenceError, match="residual_tol"):
        bad(0.1, A, b)
    with pytest.raises(Exception, match="stopped far from the root"):
        jax.block_until_ready(jax.jit(lambda lam: bad(lam, A, b))(0.1))
    with pytest.raises(Exception, match="stopped far from the root"):
        jax.block_until_ready(jax.jit(jax.grad(lambda lam: jnp.sum(bad(lam, A, b))))(0.1))

    warn = idf.custom_root(ridge_F, on_failure="warn")(bad.solver)
    with pytest.warns(RuntimeWarning, match="stopped far"):
        warn(0.1, A, b)


def test_one_failed_vmap_element_does_not_kill_the_batch():
    def F(x, t):
        return x**3 + x - t

    @idf.custom_root(F, on_failure="nan")
    def cubic(t):
        x = t
        for _ in range(60):
            x = x - (x**3 + x - t) / (3 * x**2 + 1)
        return jnp.where(t > 5, x + 1.0, x)  # element with t > 5 is wrong

    ts = jnp.array([1.0, 2.0, 6.0, 0.5])
    vals = jax.jit(jax.vmap(cubic))(ts)
    grads = jax.jit(jax.vmap(jax.grad(cubic)))(ts)
    good = np.array([True, True, False, True])
    assert np.all(np.isfinite(vals[good])) and np.all(np.isnan(vals[~good]))
    assert np.all(np.isnan(grads[~good]))
    x = vals[good]
    assert rel(grads[good], 1 / (3 * x**2 + 1)) < 1e-12


def test_singular_jacobian_is_reported():
    def F(x, t):  # dF/dx = 3(x - t)^2 = 0 at the root
        return (x - t) ** 3

    @idf.custom_root(F, solve=idf.Dense())
    def solve(t):
        return t

    # The derivative rule runs inside JAX's machinery, so the error reaches Python wrapped in
    # a JaxRuntimeError that carries the message.
    with pytest.raises((idf.SingularJacobianError, jax.errors.JaxRuntimeError), match="ridge"):
        jax.grad(lambda t: jnp.sum(solve(t)))(jnp.array([1.0, 2.0]))
    with pytest.raises(Exception, match="ridge"):
        jax.block_until_ready(jax.jit(jax.grad(lambda t: jnp.sum(solve(t))))(jnp.array([1.0, 2.0])))


def test_linear_solve_failure_nan_marks_only_failed_elements():
    def F(x, t):
        return x - t

    @idf.custom_root(F, solve=idf.CG(maxiter=1, rtol=1e-14), on_failure="nan")
    def ident(t):
        return t

    g = jax.grad(lambda t: jnp.sum(ident(t)))(jnp.array([1.0, 2.0]))
    assert np.all(np.isfinite(g))  # A = I: CG converges in one step


def test_checkify_composes(data):
    from jax.experimental import checkify

    A, b = data
    ridge = make_ridge()
    err, g = checkify.checkify(jax.grad(lambda lam: jnp.sum(ridge(lam, A, b))))(0.3)
    err.throw()
    _, dlam, _ = closed_form(0.3, A, b)
    assert rel(g, jnp.sum(dlam)) < 1e-9


def test_agrees_with_numpy_reference(data):
    A, b = data
    ridge = make_ridge(idf.Dense())
    An, bn = np.asarray(A), np.asarray(b)
    u = np.random.default_rng(5).standard_normal(5)
    _, pull_np = idf.vjp(ridge, 0.3, An, bn)
    _, pull_jx = idf.vjp(ridge, 0.3, A, b)
    for g_np, g_jx in zip(pull_np(u), pull_jx(jnp.asarray(u))):
        assert rel(g_jx, g_np) < 1e-10
    _, t_np = idf.jvp(ridge, (0.3, An, bn), (1.0, 0 * An, bn))
    _, t_jx = idf.jvp(ridge, (0.3, A, b), (1.0, 0 * A, b))
    assert rel(t_jx, t_np) < 1e-10
    assert rel(idf.jacobian(ridge)(0.3, A, b), idf.jacobian(ridge)(0.3, An, bn)) < 1e-10


def test_diagnostics_under_jit(data):
    A, b = data
    ridge = make_ridge(idf.CG())
    with idf.diagnostics() as d:
        f = jax.jit(jax.grad(lambda lam: jnp.sum(ridge(lam, A, b))))
        jax.block_until_ready(f(0.3))
    assert d.forward and d.forward[-1].ok
    assert d.backward and d.backward[-1].mode == "vjp" and int(d.backward[-1].iterations) > 0


def test_no_warnings_on_plain_use(data):
    A, b = data
    ridge = make_ridge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.grad(lambda lam: jnp.sum(ridge(lam, A, b)))(0.3)


def test_has_aux_passes_non_array_values_through():
    def F(x, t):
        return x - t**2

    @idf.custom_root(F, has_aux=True)
    def f(t):
        return t**2, {"msg": "info", "n": 3, "arr": t * 0}

    t = jnp.array([1.0, 2.0])
    _, aux = f(t)
    assert aux["msg"] == "info" and aux["n"] == 3 and aux["arr"].shape == (2,)
    assert rel(jax.grad(lambda t: jnp.sum(f(t)[0]))(t), 2 * t) < 1e-12
    assert jax.jit(lambda t: f(t)[1]["arr"])(t).shape == (2,)


def test_raise_under_vmap_reports_the_failed_elements():
    def F(x, t):
        return x**3 + x - t

    @idf.custom_root(F)
    def cubic(t):
        x = t
        for _ in range(60):
            x = x - (x**3 + x - t) / (3 * x**2 + 1)
        return jnp.where(t > 5, x + 1.0, x)

    good = jax.jit(jax.vmap(cubic))(jnp.array([1.0, 2.0]))
    assert np.all(np.isfinite(good))
    with pytest.raises(Exception, match="stopped far from the root"):
        jax.block_until_ready(jax.jit(jax.vmap(cubic))(jnp.array([1.0, 6.0, 2.0])))
    with pytest.warns(RuntimeWarning, match="stopped far"):
        warn = idf.custom_root(F, on_failure="warn")(cubic.solver)
        jax.block_until_ready(jax.jit(jax.vmap(warn))(jnp.array([1.0, 6.0])))


@pytest.mark.timeout(120)
def test_vmap_grad_dense_does_not_deadlock():
    # Two batched LU factorizations running side by side (the forward solve and the Dense
    # backward) once deadlocked XLA:CPU's thread pool; the backward now waits for x*.
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.standard_normal((200, 100)))
    y = jnp.asarray(rng.standard_normal(200))
    lams = jnp.asarray(np.geomspace(0.01, 10, 16))
    for solve in (idf.Dense(), idf.Cholesky()):
        ridge = make_ridge(solve)

        def loss(lam, ridge=ridge):
            return jnp.sum(ridge(lam, X, y) ** 2)

        f = jax.jit(jax.vmap(jax.grad(loss)))
        for _ in range(100):
            out = jax.block_until_ready(f(lams))
        assert np.all(np.isfinite(out))
