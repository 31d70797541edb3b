"""`idf.cvxpy.Layer` and `idf.conditions.cone_program`: LP, QP, SOCP and SDP layers in NumPy,
PyTorch and JAX, reverse and forward mode, against central finite differences of CVXPY
re-solved at tight tolerance (an oracle sharing no code with the library), a closed form, and
cvxpylayers where installed; batches; bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

cp = pytest.importorskip("cvxpy")

import implicitdiff as idf  # noqa: E402
import implicitdiff.cvxpy as icp  # noqa: E402

TIGHT = dict(tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, tol_ktratio=1e-9,
             max_iter=500)


# ---- problems ----------------------------------------------------------------------------------

def lp(rng):
    n, m = 4, 3
    x = cp.Variable(n)
    c, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    cons = [G @ x <= h, x <= 1, x >= -1]
    prob = cp.Problem(cp.Minimize(c @ x), cons)
    vals = (rng.normal(size=n), rng.normal(size=(m, n)), rng.uniform(0.2, 1.0, size=m))
    return prob, [c, G, h], [x], vals


def qp(rng):
    n, m, p = 6, 4, 2
    x = cp.Variable(n)
    q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    A, b = cp.Parameter((p, n)), cp.Parameter(p)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [G @ x <= h, A @ x == b])
    vals = (rng.normal(size=n), rng.normal(size=(m, n)), 0.1 * rng.normal(size=m),
            rng.normal(size=(p, n)), rng.normal(size=p))
    return prob, [q, G, h, A, b], [x], vals


def socp(rng):
    n = 4
    x = cp.Variable(n)
    q, F, g = cp.Parameter(n), cp.Parameter((n, n)), cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(q @ x), [cp.norm(F @ x + g, 2) <= 1.0])
    vals = (rng.normal(size=n), rng.normal(size=(n, n)) + 2 * np.eye(n), 0.1 * rng.normal(size=n))
    return prob, [q, F, g], [x], vals


def sdp(rng):
    d = 3
    X = cp.Variable((d, d), symmetric=True)
    C, A1, b1 = cp.Parameter((d, d)), cp.Parameter((d, d)), cp.Parameter()
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X) + 0.5 * cp.sum_squares(X)),
                      [X >> 0, cp.trace(A1 @ X) == b1])
    C0 = rng.normal(size=(d, d))
    A0 = rng.normal(size=(d, d))
    vals = (C0 + C0.T, np.eye(d) + 0.1 * (A0 + A0.T), np.array(1.0))
    return prob, [C, A1, b1], [X], vals


def sdp_linear(rng):
    d = 3
    X = cp.Variable((d, d), symmetric=True)
    C = cp.Parameter((d, d))
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X)), [X >> 0, cp.trace(X) == 1])
    C0 = rng.normal(size=(d, d))
    return prob, [C], [X], (C0 + C0.T,)


PROBLEMS = {"lp": lp, "qp": qp, "socp": socp, "sdp": sdp, "sdp_linear": sdp_linear}


def _psd_part(M):
    lam, V = np.linalg.eigh(M)
    return (V * np.maximum(lam, 0)) @ V.T


def sdp_exact(vals):
    """min tr(CX) + ½‖X‖² s.t. X ⪰ 0, tr(A X) = b: X = Π_PSD(νA − C) with ν the root of the
    scalar equation tr(A Π_PSD(νA − C)) = b (monotone in ν), by bisection to machine
    precision. Interior-point SDP solutions are accurate to about the square root of the solver's
    tolerance, too coarse for finite differences."""
    from scipy.optimize import brentq

    C, A, b = (np.asarray(v, dtype=float) for v in vals)
    C, A = (C + C.T) / 2, (A + A.T) / 2  # tr(CX) only sees the symmetric part (X symmetric)
    nu = brentq(lambda t: np.trace(A @ _psd_part(t * A - C)) - b, -1e3, 1e3, xtol=1e-15,
                rtol=4 * np.finfo(float).eps, maxiter=500)
    return [_psd_part(nu * A - C)]


def sdp_linear_exact(vals):
    """min tr(CX) s.t. X ⪰ 0, tr X = 1: X = v vᵀ, v the eigenvector of the least eigenvalue."""
    C = np.asarray(vals[0], dtype=float)
    _lam, V = np.linalg.eigh((C + C.T) / 2)
    return [np.outer(V[:, 0], V[:, 0])]


EXACT = {"sdp": sdp_exact, "sdp_linear": sdp_linear_exact}


def cvxpy_solution(prob, params, variables, vals, exact=None):
    """The variables at the solution: a closed form where there is one (the SDPs), else CVXPY
    itself at tight tolerance (the oracle)."""
    if exact is not None:
        return exact(vals)
    for p, v in zip(params, vals):
        p.value = np.asarray(v, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "may be inaccurate" near 1e-11
        prob.solve(solver=cp.CLARABEL, **TIGHT)
    assert prob.status in ("optimal", "optimal_inaccurate"), prob.status
    return [np.array(v.value, dtype=float) for v in variables]


def fd_directional(prob, params, variables, vals, dirs, weights, eps=1e-4, exact=None):
    """Central difference of sum_k <weights_k, var_k(θ + t·dir)> at t = 0."""
    def f(t):
        sol = cvxpy_solution(prob, params, variables,
                             [v + t * d for v, d in zip(vals, dirs)], exact)
        return sum(float(np.sum(w * s)) for w, s in zip(weights, sol))

    return (f(eps) - f(-eps)) / (2 * eps)


def setup(name, seed=0):
    rng = np.random.default_rng(seed)
    prob, params, variables, vals = PROBLEMS[name](rng)
    dirs = [rng.normal(size=np.shape(v)) for v in vals]
    weights = [rng.normal(size=v.shape) for v in variables]
    return prob, params, variables, vals, dirs, weights


def fd(name, prob, params, variables, vals, dirs, weights):
    return fd_directional(prob, params, variables, vals, dirs, weights, exact=EXACT.get(name))


def _x64(jnp):
    """JAX's 64-bit mode for a block (the backend's own switch, restored on exit)."""
    return idf.get_backend(jnp.zeros(1)).enable_float64()


# ---- forward values ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PROBLEMS))
def test_solution_matches_cvxpy(name):
    prob, params, variables, vals, _, _ = setup(name)
    layer = icp.Layer(prob, params, variables)
    out = layer(*vals)
    assert isinstance(out, tuple) and len(out) == len(variables)
    ref = cvxpy_solution(prob, params, variables, vals, EXACT.get(name))
    for a, r, v in zip(out, ref, variables):
        assert a.shape == v.shape
        np.testing.assert_allclose(a, r, atol=1e-7)


# ---- reverse and forward mode against finite differences --------------------------------------

def _check(ana, fd):
    assert abs(ana - fd) <= 2e-5 * max(1.0, abs(fd)), (ana, fd)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_numpy_vjp_jvp_vs_finite_differences(name):
    prob, params, variables, vals, dirs, weights = setup(name)
    layer = icp.Layer(prob, params, variables)
    fd_ = fd(name, prob, params, variables, vals, dirs, weights)
    _, vjp_fn = layer.vjp(*vals)
    grads = vjp_fn(*weights)
    ana = sum(float(np.sum(g * d)) for g, d in zip(grads, dirs))
    _check(ana, fd_)
    _, tangents = layer.jvp(vals, dirs)
    ana_f = sum(float(np.sum(w * t)) for w, t in zip(weights, tangents))
    _check(ana_f, fd_)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_torch_reverse_and_forward_vs_finite_differences(name):
    torch = pytest.importorskip("torch")
    prob, params, variables, vals, dirs, weights = setup(name)
    layer = icp.Layer(prob, params, variables)
    fd_ = fd(name, prob, params, variables, vals, dirs, weights)
    ts = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in vals]
    out = layer(*ts)
    assert all(isinstance(o, torch.Tensor) for o in out)
    loss = sum((torch.as_tensor(w) * o).sum() for w, o in zip(weights, out))
    grads = torch.autograd.grad(loss, ts)
    _check(sum(float((g * torch.as_tensor(d)).sum()) for g, d in zip(grads, dirs)), fd_)

    def f(*a):
        return sum((torch.as_tensor(w) * o).sum() for w, o in zip(weights, layer(*a)))

    prim = tuple(torch.tensor(v, dtype=torch.float64) for v in vals)
    tang = tuple(torch.tensor(d, dtype=torch.float64) for d in dirs)
    _, dout = torch.func.jvp(f, prim, tang)
    _check(float(dout), fd_)


@pytest.mark.parametrize("name", ["lp", "qp", "socp", "sdp"])
def test_jax_reverse_and_forward_vs_finite_differences(name):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    prob, params, variables, vals, dirs, weights = setup(name)
    layer = icp.Layer(prob, params, variables)
    fd_ = fd(name, prob, params, variables, vals, dirs, weights)
    with _x64(jnp):
        def f(*a):
            return sum(jnp.sum(jnp.asarray(w) * o) for w, o in zip(weights, layer(*a)))

        prim = tuple(jnp.asarray(v, dtype=jnp.float64) for v in vals)
        tang = tuple(jnp.asarray(d) for d in dirs)
        # one jit for both modes (one compilation: eager JAX compiles every small op)
        grads, dout = jax.jit(lambda *a: (jax.grad(f, argnums=tuple(range(len(a))))(*a),
                                          jax.jvp(f, a, tang)[1]))(*prim)
        _check(sum(float(jnp.sum(g * jnp.asarray(d))) for g, d in zip(grads, dirs)), fd_)
        _check(float(dout), fd_)


def test_exact_to_rounding_closed_form():
    """Equality-constrained QP: x* = -q + Aᵀ(AAᵀ)⁻¹(Aq + b); the Jacobian in q is -(I - Π) with
    Π the projection onto the row space of A. The layer's derivative agrees to ~1e-12, far below
    the solver's tolerance (the solution is polished before differentiating)."""
    rng = np.random.default_rng(3)
    n, p = 6, 2
    x = cp.Variable(n)
    q, A, b = cp.Parameter(n), cp.Parameter((p, n)), cp.Parameter(p)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [A @ x == b])
    qv, Av, bv = rng.normal(size=n), rng.normal(size=(p, n)), rng.normal(size=p)
    layer = icp.Layer(prob, [q, A, b], [x], solver_args=dict(tol_gap_abs=1e-6,
                                                            tol_gap_rel=1e-6, tol_feas=1e-6))
    (xs,), vjp_fn = layer.vjp(qv, Av, bv)
    M = np.linalg.solve(Av @ Av.T, Av)
    np.testing.assert_allclose(xs, -qv + Av.T @ np.linalg.solve(Av @ Av.T, Av @ qv + bv),
                               atol=1e-12)
    u = rng.normal(size=n)
    gq = vjp_fn(u)[0]
    np.testing.assert_allclose(gq, -(u - M.T @ (Av @ u)), atol=1e-11)


# ---- solvers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["SCS", "ECOS"])
def test_other_solvers_agree(solver):
    if solver not in cp.installed_solvers():
        pytest.skip(f"{solver} not installed")
    prob, params, variables, vals, _dirs, weights = setup("socp")
    ref = icp.Layer(prob, params, variables)
    other = icp.Layer(prob, params, variables, solver=solver)
    np.testing.assert_allclose(other(*vals)[0], ref(*vals)[0], atol=1e-9)
    g_ref = ref.vjp(*vals)[1](*weights)
    g_oth = other.vjp(*vals)[1](*weights)
    for a, b in zip(g_oth, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-8)


def test_scs_sdp_lower_triangle():
    if "SCS" not in cp.installed_solvers():
        pytest.skip("SCS not installed")
    prob, params, variables, vals, _dirs, weights = setup("sdp")
    ref = icp.Layer(prob, params, variables)
    scs = icp.Layer(prob, params, variables, solver="SCS")
    assert scs.cones.psd_triangle == "lower"
    np.testing.assert_allclose(scs(*vals)[0], ref(*vals)[0], atol=1e-9)
    for a, b in zip(scs.vjp(*vals)[1](*weights), ref.vjp(*vals)[1](*weights)):
        np.testing.assert_allclose(a, b, atol=1e-8)


# ---- cvxpylayers -------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside cvxpylayers/diffcp
@pytest.mark.parametrize("name", ["lp", "qp", "socp", "sdp"])
def test_against_cvxpylayers(name):
    torch = pytest.importorskip("torch")
    cl = pytest.importorskip("cvxpylayers.torch")
    prob, params, variables, vals, _dirs, weights = setup(name)
    ours = icp.Layer(prob, params, variables)
    theirs = cl.CvxpyLayer(prob, parameters=params, variables=variables)

    def grads(layer):
        ts = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in vals]
        out = layer(*ts)
        loss = sum((torch.as_tensor(w) * o).sum() for w, o in zip(weights, out))
        return [o.detach().numpy() for o in out], [g.numpy() for g in
                                                   torch.autograd.grad(loss, ts)]

    (o1, g1), (o2, g2) = grads(ours), grads(theirs)
    for a, b in zip(o1, o2):
        np.testing.assert_allclose(a, b, atol=1e-4)
    for a, b in zip(g1, g2):  # cvxpylayers' gradients are accurate to its solver's tolerance
        np.testing.assert_allclose(a, b, atol=2e-3 * max(1.0, np.abs(b).max()))


# ---- batches ------------------------------------------------------------------------------------

def test_torch_batch_matches_samples():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    prob, params, variables, vals = qp(rng)
    layer = icp.Layer(prob, params, variables)
    B = 3
    qb = rng.normal(size=(B, *np.shape(vals[0])))
    hb = 0.1 * rng.normal(size=(B, *np.shape(vals[2])))
    q_t = torch.tensor(qb, requires_grad=True)
    G_t = torch.tensor(vals[1], requires_grad=True)  # shared by the batch
    h_t = torch.tensor(hb, requires_grad=True)
    rest = [torch.tensor(v) for v in vals[3:]]
    (xb,) = layer(q_t, G_t, h_t, *rest)
    assert xb.shape == (B, 6)
    W = torch.tensor(rng.normal(size=(B, 6)))
    gq, gG, gh = torch.autograd.grad((W * xb).sum(), (q_t, G_t, h_t))
    gG_sum = torch.zeros_like(gG)
    for k in range(B):
        qk = torch.tensor(qb[k], requires_grad=True)
        Gk = torch.tensor(vals[1], requires_grad=True)
        hk = torch.tensor(hb[k], requires_grad=True)
        (xk,) = layer(qk, Gk, hk, *rest)
        torch.testing.assert_close(xk, xb[k].detach(), atol=1e-10, rtol=0)
        a, bG, c = torch.autograd.grad((W[k] * xk).sum(), (qk, Gk, hk))
        torch.testing.assert_close(a, gq[k], atol=1e-9, rtol=0)
        torch.testing.assert_close(c, gh[k], atol=1e-9, rtol=0)
        gG_sum += bG
    torch.testing.assert_close(gG_sum, gG, atol=1e-9, rtol=0)


def test_jax_and_numpy_batch():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(6)
    prob, params, variables, vals = socp(rng)
    layer = icp.Layer(prob, params, variables)
    qb = rng.normal(size=(2, 4))
    W = rng.normal(size=(2, 4))
    (xn,), vjp_fn = layer.vjp(qb, *vals[1:])  # NumPy: a batch, F shared by the batch
    gq, gF, _gg = vjp_fn(W)
    gF_sum = np.zeros_like(gF)
    for k in range(2):  # the batch is the samples, one by one
        (xk,), vk = layer.vjp(qb[k], *vals[1:])
        np.testing.assert_allclose(xn[k], xk, atol=1e-10)
        a, bF, _c = vk(W[k])
        np.testing.assert_allclose(gq[k], a, atol=1e-9)
        gF_sum += bF
    np.testing.assert_allclose(gF, gF_sum, atol=1e-9)
    with _x64(jnp):
        rest = tuple(map(jnp.asarray, vals[1:]))

        def f(q, F):
            (x,) = layer(q, F, rest[1])
            return jnp.sum(jnp.asarray(W) * x), x

        (_, xj), (gqj, gFj) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
            jnp.asarray(qb), rest[0])
        np.testing.assert_allclose(np.asarray(xj), xn, atol=1e-10)
        np.testing.assert_allclose(np.asarray(gqj), gq, atol=1e-9)
        np.testing.assert_allclose(np.asarray(gFj), gF, atol=1e-9)


# ---- failures -----------------------------------------------------------------------------------

def _infeasible_batch():
    x = cp.Variable(2)
    h = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x <= h[0], x >= h[1]])
    hb = np.array([[1.0, -1.0], [-1.0, 1.0], [2.0, 0.5]])  # sample 1: x <= -1 and x >= 1
    return prob, h, x, hb


def test_infeasible_sample_raise_names_it():
    prob, h, x, hb = _infeasible_batch()
    layer = icp.Layer(prob, [h], [x], on_failure="raise")
    with pytest.raises(idf.NonConvergenceError, match=r"batch element 1.*infeasible"):
        layer(hb)


def test_infeasible_sample_nan_only_that_sample():
    torch = pytest.importorskip("torch")
    prob, h, x, hb = _infeasible_batch()
    layer = icp.Layer(prob, [h], [x], on_failure="nan")
    (xb,) = layer(hb)
    assert np.all(np.isnan(xb[1]))
    assert np.all(np.isfinite(xb[[0, 2]]))
    np.testing.assert_allclose(xb[2], [0.5, 0.5], atol=1e-9)
    ht = torch.tensor(hb, requires_grad=True)
    (xt,) = layer(ht)
    xt[[0, 2]].sum().backward()
    assert torch.isfinite(ht.grad[[0, 2]]).all()


def test_not_dpp():
    x = cp.Variable(2)
    a, b = cp.Parameter(pos=True), cp.Parameter(pos=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + (a * b) * cp.sum(x) ** 2 / 2 + a * b
                                  * x[0]), [x >= -1])
    assert not prob.is_dpp()
    with pytest.raises(idf.StructureError, match="not DPP"):
        icp.Layer(prob, [a, b], [x])


def test_wrong_shape_names_parameter():
    prob, params, variables, vals, _, _ = setup("qp")
    layer = icp.Layer(prob, params, variables)
    bad = list(vals)
    bad[1] = np.zeros((3, 6))
    with pytest.raises(idf.StructureError, match=r"param.*shape \(3, 6\), expected \(4, 6\)"):
        layer(*bad)
    with pytest.raises(idf.StructureError, match="expected 5 parameter values"):
        layer(*vals[:2])
    bad = [np.stack([v, v]) for v in vals]
    bad[0] = np.stack([vals[0]] * 3)
    with pytest.raises(idf.StructureError, match="batch size"):
        layer(*bad)


def test_unsupported_cone():
    x = cp.Variable(2)
    q = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(q @ x + cp.sum(cp.exp(x))))
    with pytest.raises(icp.UnsupportedConeError, match="exponential cone") as e:
        icp.Layer(prob, [q], [x])
    assert isinstance(e.value, NotImplementedError)
    assert isinstance(e.value, idf.ImplicitDiffError)


def test_ecos_refuses_psd():
    if "ECOS" not in cp.installed_solvers():
        pytest.skip("ECOS not installed")
    prob, params, variables, _, _, _ = setup("sdp")
    with pytest.raises(icp.UnsupportedConeError, match="ECOS"):
        icp.Layer(prob, params, variables, solver="ECOS")


def test_parameters_and_variables_not_in_problem():
    prob, params, variables, _, _, _ = setup("qp")
    stranger = cp.Parameter(3, name="stranger")
    with pytest.raises(idf.StructureError, match=r"stranger.*not a parameter of the problem"):
        icp.Layer(prob, [*params, stranger], variables)
    with pytest.raises(idf.StructureError, match="are not in parameters="):
        icp.Layer(prob, params[:-1], variables)
    y = cp.Variable(2, name="outsider")
    with pytest.raises(idf.StructureError, match=r"outsider.*not a variable of the problem"):
        icp.Layer(prob, params, [y])
    with pytest.raises(ValueError, match="solver"):
        icp.Layer(prob, params, variables, solver="NOPE")
    with pytest.raises(TypeError, match=r"cvxpy\.Problem"):
        icp.Layer("not a problem", params, variables)


# ---- the condition on its own ---------------------------------------------------------------

def test_projection_cone_is_a_projection():
    """Π_K(w) lies in K, w - Π_K(w) in the polar cone, and they are orthogonal (Moreau)."""
    cones = idf.conditions.Cones(zero=1, nonnegative=3, second_order=(3, 4), psd=(3,))
    rng = np.random.default_rng(9)
    w = rng.normal(size=(5, cones.size))
    p = idf.conditions.projection_cone(w, cones)
    r = p - w  # = Π_{K°}(-w)... -r ∈ polar, so r ∈ K* = K (zero part: free)
    np.testing.assert_allclose(np.sum(p * r, axis=-1), 0, atol=1e-12)
    np.testing.assert_allclose(p[:, 0], 0)
    assert np.all(p[:, 1:4] >= 0) and np.all(r[:, 1:4] >= -1e-15)
    for blk in (p[:, 4:7], p[:, 7:11], r[:, 4:7], r[:, 7:11]):
        assert np.all(blk[:, 0] + 1e-12 >= np.linalg.norm(blk[:, 1:], axis=-1))
    tri = p[:, 11:]
    for v in tri:  # upper triangle, column by column, off-diagonal × √2
        s = 1 / np.sqrt(2)
        M = np.array([[v[0], s * v[1], s * v[3]], [s * v[1], v[2], s * v[4]],
                      [s * v[3], s * v[4], v[5]]])
        assert np.linalg.eigvalsh(M).min() >= -1e-12


def test_projection_derivative_never_nan_at_repeated_eigenvalues():
    """At w = 0 (every eigenvalue zero, a kink) and at a PSD block with repeated eigenvalues the
    autodiff derivative is the documented element: finite, deterministic."""
    torch = pytest.importorskip("torch")
    cones = idf.conditions.Cones(second_order=(3,), psd=(3,))
    w = torch.zeros(cones.size, dtype=torch.float64, requires_grad=True)
    J = torch.autograd.functional.jacobian(lambda v: idf.conditions.projection_cone(v, cones), w)
    assert torch.isfinite(J).all() and float(J.abs().max()) == 0.0
    # identity matrix block: eigenvalue 1 three times, all positive: the Jacobian is I there
    eye = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    w2 = torch.cat([torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), eye]).requires_grad_()
    J2 = torch.autograd.functional.jacobian(
        lambda v: idf.conditions.projection_cone(v, cones), w2)
    torch.testing.assert_close(J2[3:, 3:], torch.eye(6, dtype=torch.float64))
    _, jv = torch.func.jvp(lambda v: idf.conditions.projection_cone(v, cones), (w2.detach(),),
                           (torch.ones_like(w2),))
    assert torch.isfinite(jv).all()


def test_condition_products_agree():
    """The hand-written products (`F.derivatives`) and `jacobian_x` are the Jacobian of F that
    torch's autodiff takes, batched or not, with and without P; jvp/vjp pass the dot test."""
    torch = pytest.importorskip("torch")
    cones = idf.conditions.Cones(zero=2, nonnegative=3, second_order=(3, 4), psd=(3, 2))
    F = idf.conditions.cone_program(cones)
    d = F.derivatives
    rng = np.random.default_rng(11)
    n, m = 5, cones.size
    for batch in ((), (2,)):
        x = rng.normal(size=(*batch, n))
        w = rng.normal(size=(*batch, m))
        A, b, c = rng.normal(size=(m, n)), rng.normal(size=m), rng.normal(size=n)
        P0 = rng.normal(size=(n, n))
        for P in (None, P0 @ P0.T):
            args = (A, b, c) if P is None else (A, b, c, P)
            targs = tuple(torch.tensor(a) for a in args)

            def flat(v, targs=targs):
                return torch.cat(F((v[..., :n], v[..., n:]), *targs), -1)

            zs = np.concatenate([x, w], -1).reshape(-1, n + m)
            Jref = np.stack([torch.autograd.functional.jacobian(flat, torch.tensor(z)).numpy()
                             for z in zs]).reshape(*batch, n + m, n + m)
            np.testing.assert_allclose(d.jacobian_x((x, w), *args), Jref, atol=1e-13)
            v = (rng.normal(size=x.shape), rng.normal(size=w.shape))
            u = (rng.normal(size=x.shape), rng.normal(size=w.shape))
            Jv = np.concatenate(d.jvp_x(v, (x, w), *args), -1)
            np.testing.assert_allclose(
                Jv, np.einsum("...ij,...j->...i", Jref, np.concatenate(v, -1)), atol=1e-12)
            JTu = np.concatenate(d.vjp_x(u, (x, w), *args), -1)
            np.testing.assert_allclose(
                JTu, np.einsum("...ji,...j->...i", Jref, np.concatenate(u, -1)), atol=1e-12)
            dargs = tuple(rng.normal(size=np.shape(a)) for a in args)
            lhs = sum(float(np.sum(p * q)) for p, q in zip(d.jvp_args(dargs, (x, w), *args), u))
            rhs = sum(float(np.sum(p * q)) for p, q in zip(d.vjp_args(u, (x, w), *args), dargs))
            assert abs(lhs - rhs) <= 1e-11 * max(1.0, abs(lhs))


def test_several_variables_attributes_and_scalars():
    """Variables with attributes (nonneg, PSD), a scalar variable and a scalar parameter."""
    torch = pytest.importorskip("torch")
    x, t, Y = cp.Variable(3, nonneg=True), cp.Variable(), cp.Variable((2, 2), PSD=True)
    q, s, M = cp.Parameter(3), cp.Parameter(), cp.Parameter((2, 2))
    prob = cp.Problem(cp.Minimize(q @ x + 0.5 * cp.sum_squares(x) + t + cp.trace(M @ Y)
                                  + cp.sum_squares(Y)), [t >= s, cp.sum(x) <= 2,
                                                         cp.trace(Y) == 1])
    layer = icp.Layer(prob, [q, s, M], [x, t, Y])
    vals = (np.array([-0.5, 0.3, -0.2]), 0.3, np.array([[1.0, 0.2], [0.2, -0.5]]))
    out = layer(*vals)
    ref = cvxpy_solution(prob, [q, s, M], [x, t, Y], vals)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r, atol=1e-7)
    ts = [torch.tensor(np.asarray(v, dtype=float), requires_grad=True) for v in vals]
    o = layer(*ts)
    gq, gs, _ = torch.autograd.grad(o[0].sum() + o[1] + o[2][0, 1], ts)
    assert float(gs) == pytest.approx(1.0, abs=1e-9)  # t* = s
    # x* = max(0, -q) here (the sum constraint inactive): d sum(x)/dq = -1 where x > 0
    np.testing.assert_allclose(gq.numpy(), [-1.0, 0.0, -1.0], atol=1e-9)


def test_inaccurate_solution_is_refused_without_polish():
    """Without the Newton polish, an SDP solved to Clarabel's default tolerances leaves the
    condition's residual near 1e-6 (interior-point SDP accuracy): the core's residual check
    refuses it instead of returning a derivative accurate to the solver's tolerance only."""
    prob, params, variables, vals, _, _ = setup("sdp")
    loose = icp.Layer(prob, params, variables, refine=False, on_failure="raise",
                      solver_args=dict(tol_gap_abs=1e-8, tol_gap_rel=1e-8, tol_feas=1e-8))
    with pytest.raises(idf.NonConvergenceError, match="stopped far from the root"):
        loose(*vals)
    polished = icp.Layer(prob, params, variables,
                         solver_args=dict(tol_gap_abs=1e-8, tol_gap_rel=1e-8, tol_feas=1e-8))
    np.testing.assert_allclose(polished(*vals)[0], sdp_exact(vals)[0], atol=1e-12)


def test_implicitdiff_check_takes_a_layer(capsys):
    # `implicitdiff check` on a CVXPY layer: its cone-program solver and data at one sample
    from implicitdiff.cli._check import _Case, run_check

    n, m = 5, 3
    x = cp.Variable(n)
    q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [G @ x <= h])
    layer = icp.Layer(prob, parameters=[q, G, h], variables=[x])
    rng = np.random.default_rng(3)
    solver, args = layer.check_problem(rng.normal(size=n), rng.normal(size=(m, n)),
                                       rng.uniform(0.1, 1.0, m))
    rows = run_check([_Case("cvxpy-qp", solver, args)], ["numpy"])
    assert {r.mode for r in rows} == {"jvp", "vjp"}
    assert all(r.status == "ok" for r in rows), capsys.readouterr().out
    with pytest.raises(idf.StructureError, match="one sample"):
        layer.check_problem(rng.normal(size=(2, n)), rng.normal(size=(m, n)),
                            rng.uniform(0.1, 1.0, m))
