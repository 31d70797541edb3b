"""The pieces of `idf.qp` the end-to-end tests (tests/test_qp.py) do not reach directly: the
hand-written Jacobian of the KKT condition (`Derivatives.jacobian_x`, which every backend's dense
solver uses) and the hand-written products of the NumPy reference, against autodiff."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

import implicitdiff as idf
import implicitdiff.qp as qpm

torch = pytest.importorskip("torch")


def _point(seed: int = 0, B: int = 3, n: int = 4, p: int = 2, m: int = 5):
    rng = np.random.default_rng(seed)
    T = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    theta = (T(rng.standard_normal((n, n))), T(rng.standard_normal((B, n))),
             T(rng.standard_normal((B, p, n))), T(rng.standard_normal((B, p))),
             T(rng.standard_normal((B, m, n))), T(rng.standard_normal((B, m))))
    z = np.where(rng.random((B, m)) < 0.5, rng.uniform(0.1, 1.0, (B, m)), 0.0)
    w = (T(rng.standard_normal((B, n))), T(rng.standard_normal((B, p))), T(z),
         T(np.array([1.0, 0.0, 1.0])[:B]))
    return w, theta


def _flat(w, i):
    return torch.cat([w[0][i], w[1][i], w[2][i], w[3][i][None]])


def test_jacobian_x_is_the_autodiff_jacobian_of_the_condition():
    # a solved sample, a failed one (ok = 0) and one with a non-symmetric shared Q
    w, theta = _point()
    J = qpm._jacobian_x(w, *theta)
    n, p, m = w[0].shape[-1], w[1].shape[-1], w[2].shape[-1]
    for i in range(w[3].shape[0]):
        def F_i(flat, i=i):
            ww = [t.clone() for t in w]
            ww[0][i], ww[1][i], ww[2][i], ww[3][i] = (flat[:n], flat[n:n + p],
                                                       flat[n + p:n + p + m], flat[-1])
            return _flat(qpm.kkt_condition(tuple(ww), *theta), i)

        J_ad = torch.autograd.functional.jacobian(F_i, _flat(w, i))
        torch.testing.assert_close(J[i], J_ad, rtol=0, atol=1e-14)


def test_hand_written_products_match_the_jacobian():
    w, theta = _point(1)
    J = qpm._jacobian_x(w, *theta)
    rng = np.random.default_rng(5)
    v = tuple(torch.tensor(rng.standard_normal(t.shape)) for t in w)
    flat_v = torch.cat([v[0], v[1], v[2], v[3][:, None]], 1)
    jv = qpm._jvp_x(v, w, *theta)
    vj = qpm._vjp_x(v, w, *theta)
    torch.testing.assert_close(torch.cat([jv[0], jv[1], jv[2], jv[3][:, None]], 1),
                               (J @ flat_v[..., None])[..., 0], rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.cat([vj[0], vj[1], vj[2], vj[3][:, None]], 1),
                               (J.mT @ flat_v[..., None])[..., 0], rtol=0, atol=1e-13)
    # the products with the data: against autodiff of the condition in θ
    u = tuple(torch.tensor(rng.standard_normal(t.shape)) for t in w)
    th = tuple(t.clone().requires_grad_() for t in theta)
    r = qpm.kkt_condition(w, *th)
    g_ad = torch.autograd.grad(r[:3], th, u[:3])  # the ok row does not depend on θ
    for a, b in zip(qpm._vjp_args(u, w, *theta), g_ad):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    dth = tuple(torch.tensor(rng.standard_normal(t.shape)) for t in theta)
    _, jd = torch.func.jvp(lambda *t: qpm.kkt_condition(w, *t), theta, dth)
    for a, b in zip(qpm._jvp_args(dth, w, *theta), jd):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gradients_do_not_depend_on_the_given_matrix(monkeypatch):
    # the same gradient with the Jacobian handed to Dense and with Dense building it from
    # products: jacobian_x is only a shortcut
    from implicitdiff import _gallery

    args = [torch.tensor(a, requires_grad=True) for a in _gallery._qp_args()]
    c = torch.linspace(-1, 1, args[1].shape[0], dtype=torch.float64)
    g1 = torch.autograd.grad((c * idf.qp.solve_qp(*args)).sum(), args)
    monkeypatch.setattr(qpm, "_DERIVATIVES",
                        dataclasses.replace(qpm._DERIVATIVES, jacobian_x=None))
    monkeypatch.setattr(qpm, "_FUNCTIONS", {})
    g2 = torch.autograd.grad((c * idf.qp.solve_qp(*args)).sum(), args)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_matrix_reaches_the_dense_solver(monkeypatch):
    calls = []
    real = qpm._jacobian_x

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(qpm, "_DERIVATIVES",
                        dataclasses.replace(qpm._DERIVATIVES, jacobian_x=spy))
    monkeypatch.setattr(qpm, "_FUNCTIONS", {})
    # without the forward's factorization (`test_qp_factorization.py`), the configured solver
    monkeypatch.setattr(qpm, "publish", lambda f: None)
    from implicitdiff import _gallery

    args = [torch.tensor(a, requires_grad=True) for a in _gallery._qp_args()]
    idf.qp.solve_qp(*args).sum().backward()
    assert calls, "Dense built the KKT matrix from products instead of jacobian_x"


@pytest.mark.parametrize("solver", ["osqp", "clarabel", "proxsuite"])
def test_external_solvers_give_the_built_in_solution_and_gradient(solver):
    pytest.importorskip(solver)
    from implicitdiff import _gallery

    args = _gallery._qp_args()
    ref = idf.qp.solve_qp(*args, full_output=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the solver ran (no failure turned into a warning)
        sol = idf.qp.solve_qp(*args, solver=solver, full_output=True)
    assert int(sol.stats.iterations) > 0
    # polished on the same active set: equal to rounding, not to the solver's tolerance
    np.testing.assert_allclose(sol.x, ref.x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sol.z, ref.z, rtol=0, atol=1e-12)
    ta = [torch.tensor(a, requires_grad=True) for a in args]
    g_ref = torch.autograd.grad(idf.qp.solve_qp(*ta).sum(), ta)
    g = torch.autograd.grad(idf.qp.solve_qp(*ta, solver=solver).sum(), ta)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # an infeasible problem: the solver's own certificate, then on_failure
    G = np.vstack([args[4], np.eye(6)[:1], -np.eye(6)[:1]])
    h = np.concatenate([args[5], [-1.0, -1.0]])  # x0 <= -1 and x0 >= 1
    bad = idf.qp.solve_qp(args[0], args[1], args[2], args[3], G, h, solver=solver,
                          on_failure="nan", full_output=True)
    assert int(bad.stats.status) == idf.qp.PRIMAL_INFEASIBLE
    assert np.isnan(bad.x).all()


def test_unknown_solver_is_refused():
    from implicitdiff import _gallery

    args = _gallery._qp_args()
    with pytest.raises(ValueError, match="solver"):
        idf.qp.solve_qp(*args, solver="gurobi")


def _dense_active_solve(Q, q, A, b, G, h, active):
    """The oracle: the active-set KKT system with the active rows of G only, one sample at a
    time by `np.linalg.solve`."""
    out = []
    for k in range(q.shape[0]):
        S = np.nonzero(active[k])[0]
        n, p = q.shape[1], b.shape[1]
        C = np.concatenate([A[k], G[k][S]])
        K = np.block([[Q[k], C.T], [C, np.zeros((len(C), len(C)))]])
        w = np.linalg.solve(K, np.concatenate([-q[k], b[k], h[k][S]]))
        z = np.zeros(G.shape[1])
        z[S] = w[n + p:]
        out.append((w[:n], w[n:n + p], z))
    return [np.stack(a) for a in zip(*out)]


@pytest.mark.parametrize("p", [0, 3])
@pytest.mark.parametrize("reuse", [False, True])
def test_active_kkt_schur_solve_is_the_kkt_solution(p, reuse):
    # the polish's reduced solve (null space of A, Schur complement on the active rows, one
    # refinement step) against the whole system solved densely, active sets of different sizes
    from implicitdiff.qp import _ipm

    rng = np.random.default_rng(3)
    B, n, m = 4, 9, 12
    L = rng.standard_normal((B, n, n))
    Q = L @ np.swapaxes(L, 1, 2) / n + 0.1 * np.eye(n)
    q, A = rng.standard_normal((B, n)), rng.standard_normal((B, p, n))
    b = rng.standard_normal((B, p))
    G, h = rng.standard_normal((B, m, n)), rng.standard_normal((B, m))
    active = np.zeros((B, m), dtype=bool)  # 0, 2, 4 and 6 active rows (at most n - p)
    for k, size in enumerate((0, 2, 4, 6)):
        active[k, rng.choice(m, size, replace=False)] = True
    basis: dict = {}
    if reuse and p:
        _ipm.ipm(Q, q, A, b, G, h, tol=1e-8, maxiter=50, keep=basis)
        assert set(basis) == {"Y", "Z", "Rp", "Qz", "Gz"}
    fast = _ipm.ActiveKKT(Q, q, A, b, G, h, basis)
    assert fast.ok
    x, y, z, good = fast.solve(np.arange(B), active)
    xr, yr, zr = _dense_active_solve(Q, q, A, b, G, h, active)
    assert good.all()
    for got, ref in ((x, xr), (y, yr), (z, zr)):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    # a subset of the samples gives the same rows
    x2, _, z2, _ = fast.solve(np.array([1, 3]), active[[1, 3]])
    np.testing.assert_allclose(x2, x[[1, 3]], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(z2, z[[1, 3]], rtol=1e-13, atol=1e-13)


def test_active_kkt_declines_what_it_cannot_solve():
    # Q only semidefinite on the null space of A, or A rank-deficient: the full KKT solve serves
    from implicitdiff.qp import _ipm

    rng = np.random.default_rng(4)
    B, n, m = 2, 5, 4
    G, h = rng.standard_normal((B, m, n)), rng.standard_normal((B, m))
    q = rng.standard_normal((B, n))
    A = rng.standard_normal((B, 2, n))
    assert not _ipm.ActiveKKT(np.zeros((B, n, n)), q, A, np.zeros((B, 2)), G, h).ok  # an LP
    A[:, 1] = 2 * A[:, 0]
    assert not _ipm.ActiveKKT(np.eye(n)[None].repeat(B, 0), q, A, np.zeros((B, 2)), G, h).ok


def test_active_bounds_are_returned_exactly():
    """An active bound row (one nonzero entry: x_j >= l, x_j <= u, scaled) gives x_j equal to
    the bound exactly, so `x > 0` finds the support of a projection onto the simplex."""
    rng = np.random.default_rng(7)
    B, n = 16, 6
    v = rng.standard_normal((B, n))
    eye = np.eye(n)
    x = np.asarray(idf.qp.solve_qp(eye, -v, A=np.ones((1, n)), b=np.ones(1), G=-eye,
                                   h=np.zeros(n)))
    assert np.all(x >= 0) and np.any(x == 0)
    # against the sorted closed form of the projection onto the simplex (independent)
    u = -np.sort(-v, axis=1)
    k = np.arange(1, n + 1)
    size = np.array([k[row - (np.cumsum(row) - 1) / k > 0][-1] for row in u])
    tau = (np.take_along_axis(np.cumsum(u, axis=1), size[:, None] - 1, 1)[:, 0] - 1) / size
    want = np.maximum(v - tau[:, None], 0)
    np.testing.assert_array_equal(x > 0, want > 0)
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-14)
    # scaled bound rows, 3 x_j <= 1.5 and -2 x_j <= 0.5: the bounds 0.5 and -0.25 exactly
    G = np.vstack([3 * eye, -2 * eye])
    h = np.concatenate([np.full(n, 1.5), np.full(n, 0.5)])
    xb = np.asarray(idf.qp.solve_qp(eye, -3 * v, G=G, h=h))
    assert np.all(np.isin(xb[np.abs(3 * v) > 1], [0.5, -0.25]))
    np.testing.assert_allclose(xb, np.clip(3 * v, -0.25, 0.5), rtol=0, atol=1e-14)


def test_null_space_basis_from_the_householder_reflectors():
    """`_ipm.null_space_basis` (compact WY form of LAPACK's reflectors) against what it must
    be: [Y Z] orthogonal, Aᵀ = Y Rp, A Z = 0, Rp equal to NumPy's complete QR's; including rows
    already in place (e₁, a reflector that is the identity: tau = 0) and a rank-deficient A."""
    from implicitdiff.qp import _ipm

    rng = np.random.default_rng(11)
    A1 = rng.standard_normal((5, 4, 9))
    A2 = np.zeros((2, 3, 6))
    A2[:, 0, 0], A2[:, 1, 1] = 2.0, -3.0
    A2[:, 2] = rng.standard_normal((2, 6))
    _, tau = np.linalg.qr(np.swapaxes(A2, 1, 2), mode="raw")
    assert np.any(tau == 0)  # the case the WY form must leave out
    for A in (A1, A2):
        Y, Z, Rp = _ipm.null_space_basis(A)
        n, p = A.shape[2], A.shape[1]
        Qc = np.concatenate([Y, Z], axis=2)
        np.testing.assert_allclose(np.swapaxes(Qc, 1, 2) @ Qc, np.broadcast_to(np.eye(n), Qc.shape),
                                   atol=1e-14)
        np.testing.assert_allclose(Y @ Rp, np.swapaxes(A, 1, 2), atol=1e-14)
        np.testing.assert_allclose(A @ Z, 0, atol=1e-14)
        _, R = np.linalg.qr(np.swapaxes(A, 1, 2), mode="complete")
        np.testing.assert_allclose(Rp, R[:, :p], atol=1e-14)
    A3 = rng.standard_normal((2, 3, 7))
    A3[1, 2] = A3[1, 0] + A3[1, 1]  # sample 1: dependent rows
    assert _ipm.null_space_basis(A3) is None
