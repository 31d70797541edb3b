"""Adversarial linear systems for the backward solve: no solver returns a silently wrong answer.

A singular $A = \\partial_x F$ has no IFT derivative ($x^*$ is not locally unique), whatever a
Krylov method's minimum-norm answer to a consistent system says; a system with no solution has
no answer, whatever a least-squares method finds; MINRES on a non-symmetric $A$ answers with a
residual estimate that does not hold. Each must be refused (not converged, a breakdown: a
`SingularJacobianError` from the implicit rules), on every backend, while a merely
ill-conditioned $A$ (condition $10^8$) is still solved. Oracles: `numpy.linalg.solve` and
`numpy.linalg.pinv`, eigen-decompositions built by hand.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_conformance import Framework

import implicitdiff as idf

BACKENDS = ["numpy", "array_api_strict", "jax", "torch"]
AUTODIFF = ["numpy", "jax", "torch"]  # the implicit rules end to end


@pytest.fixture(params=BACKENDS, scope="module")
def fw(request) -> Framework:
    return Framework(request.param)


@pytest.fixture(params=AUTODIFF, scope="module")
def afw(request) -> Framework:
    return Framework(request.param)


def sym_with_eigs(seed: int, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """$Q\\,\\mathrm{diag}(s)\\,Q^\\top$ (symmetrized) and its eigenvectors $Q$."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(s), len(s))))
    A = (Q * s) @ Q.T
    return (A + A.T) / 2, Q


def nonsym_singular(seed: int, n: int, k: int) -> np.ndarray:
    """A non-symmetric matrix of rank $n - k$: $U\\,\\mathrm{diag}(s)\\,V^\\top$, $s_i \\in [1, 10]$
    and $k$ zeros."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = rng.uniform(1.0, 10.0, n)
    s[rng.choice(n, k, replace=False)] = 0.0
    return (U * s) @ V.T


def run_solve(fw: Framework, solver, A: np.ndarray, b: np.ndarray, tags=frozenset()):
    M = fw.asarray(A)
    x, info = fw.run(lambda b: solver.solve(lambda v: v @ M.T, b, rmatvec=lambda u: u @ M,
                                            tags=tags), fw.asarray(b))
    return fw.numpy(x), type(info)(*(fw.numpy(i) for i in info))


def refused(info) -> bool:
    """Not converged and reported as a breakdown, for every batch element."""
    return bool(np.all(~np.asarray(info.converged))) and bool(np.all(info.breakdown))


KRYLOV = [idf.CG(), idf.MINRES(), idf.GMRES(restart=8), idf.BiCGStab(), idf.NormalCG(),
          idf.Richardson(omega=0.15, maxiter=2000)]
ALL = [*KRYLOV, idf.Dense(), idf.Cholesky()]


def _id(s) -> str:
    return type(s).__name__


# ---- singular, consistent: the minimum-norm answer is refused ---------------------------------

@pytest.mark.parametrize("solver", ALL, ids=_id)
def test_singular_consistent_refused(fw, solver):
    """$A$ symmetric positive semi-definite with one zero eigenvalue, $b \\in$ range(A): every
    Krylov method would converge to the minimum-norm solution; every solver refuses."""
    n = 24
    s = np.random.default_rng(1).uniform(1.0, 5.0, n)
    s[3] = 0.0
    A, _ = sym_with_eigs(1, s)
    b = A @ np.random.default_rng(2).standard_normal(n)
    _, info = run_solve(fw, solver, A, b)
    assert refused(info), info


@pytest.mark.parametrize("solver", [idf.CG(check_singular=False), idf.MINRES(check_singular=False),
                                    idf.NormalCG(least_squares=True)], ids=_id)
def test_singular_min_norm_only_when_asked(solver):
    """Opting out (`check_singular=False`, `least_squares=True`) gives the minimum-norm
    solution $A^+ b$, explicitly."""
    n = 24
    s = np.random.default_rng(1).uniform(1.0, 5.0, n)
    s[3] = 0.0
    A, _ = sym_with_eigs(1, s)
    b = A @ np.random.default_rng(2).standard_normal(n)
    x, info = solver.solve(lambda v: v @ A.T, b, rmatvec=lambda u: u @ A)
    assert bool(info.converged)
    np.testing.assert_allclose(x, np.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-10)


def test_singular_nonsymmetric_refused(fw):
    A = nonsym_singular(3, 20, 1)
    b = A @ np.random.default_rng(4).standard_normal(20)
    for solver in (idf.GMRES(), idf.BiCGStab(), idf.NormalCG(), idf.Dense(),
                   idf.Auto(dense_max=1)):
        _, info = run_solve(fw, solver, A, b)
        assert refused(info) or not bool(np.any(info.converged)), (solver, info)
        assert not bool(np.any(info.converged)), (solver, info)


def test_gauge_mode_refused():
    """The commonest singular Jacobian: F invariant under x -> x + c·1 (a graph Laplacian), the
    null vector constant, which a smooth probe vector would nearly miss."""
    n = 300
    L = np.diag(np.full(n, 2.0)) - np.eye(n, k=1) - np.eye(n, k=-1)
    L[0, 0] = L[-1, -1] = 1.0
    b = L @ np.random.default_rng(5).standard_normal(n)
    for solver in (idf.CG(), idf.MINRES(), idf.Auto(), idf.Dense()):
        _, info = solver.solve(lambda v: v @ L.T, b,
                               tags=frozenset({idf.symmetric, idf.positive_definite}))
        assert refused(info), (solver, info)


# ---- Auto at n = 300 through the implicit rules (issue: derivative 0 instead of 1) ------------

N_AUTO = 300


def _auto_problem(afw: Framework):
    s = np.random.default_rng(6).uniform(1.0, 10.0, N_AUTO)
    s[7] = 0.0
    A, Q = sym_with_eigs(6, s)
    M = afw.asarray(A)

    def F(x, theta):  # ∂F/∂x = A, singular: x* = θ + null(A) is not locally unique
        return M @ x - M @ theta

    return F, Q


def _expect_singular(afw: Framework, fn):
    errors = afw.errors
    with pytest.raises(errors) as e:
        fn()
    msg = str(e.value)
    if not isinstance(e.value, idf.SingularJacobianError):  # JAX: raised in a host callback
        assert "SingularJacobianError" in msg or "broke down" in msg, msg
    assert "singular" in msg and "ridge" in msg
    return msg


@pytest.mark.parametrize("tags", [None, frozenset({idf.symmetric}),
                                  frozenset({idf.symmetric, idf.positive_definite})],
                         ids=["gmres", "minres", "cg"])
def test_auto_n300_singular_refused(afw, tags):
    F, Q = _auto_problem(afw)
    fn = idf.custom_root(F, tags=tags)(lambda theta: theta * 1.0)
    theta = afw.asarray(np.random.default_rng(7).standard_normal(N_AUTO))
    direction = afw.asarray(Q[:, 7] + 0.1)   # along the null direction, and more
    # jvp: A ẋ = A θ̇ is consistent, its minimum-norm answer is refused by the uniqueness probe
    msg = _expect_singular(afw, lambda: idf.jvp(fn, (theta,), (direction,)))
    assert "jvp" in msg
    # vjp: Aᵀu = x̄ with x̄ outside the range: no solution; the solve stops at a least-squares
    # point or diverges (MINRES), a breakdown either way (maxiter only keeps the test short)
    fn = idf.custom_root(F, tags=tags, solve=idf.Auto(maxiter=400))(lambda theta: theta * 1.0)
    _expect_singular(afw, lambda: idf.vjp(fn, theta)[1](direction))
    _expect_singular(afw, lambda: idf.vjp(fn, theta)[1](afw.asarray(np.ones(N_AUTO))))


def test_auto_n300_singular_on_failure_nan_and_ridge():
    F, _ = _auto_problem(Framework("numpy"))
    theta = np.random.default_rng(7).standard_normal(N_AUTO)
    fn = idf.custom_root(F, on_failure="nan")(lambda theta: theta * 1.0)
    _, xd = idf.jvp(fn, (theta,), (np.ones(N_AUTO),))
    assert np.isnan(xd).all()
    with pytest.warns(RuntimeWarning, match="singular"):
        idf.jvp(idf.custom_root(F, on_failure="warn")(lambda t: t * 1.0), (theta,),
                (np.ones(N_AUTO),))
    # the remedy the message names: a ridge
    fn = idf.custom_root(F, solve=idf.Auto(ridge=1e-6))(lambda theta: theta * 1.0)
    _, xd = idf.jvp(fn, (theta,), (np.ones(N_AUTO),))
    assert np.isfinite(xd).all()


# ---- a system with no solution: NormalCG's least-squares answer -------------------------------

def test_normal_cg_inconsistent_refused(fw):
    n = 20
    s = np.random.default_rng(8).uniform(1.0, 10.0, n)
    s[0] = 0.0
    A, Q = sym_with_eigs(8, s)
    b = np.random.default_rng(9).standard_normal(n) + Q[:, 0]
    _, info = run_solve(fw, idf.NormalCG(), A, b)
    assert refused(info), info
    # asked for, explicitly: the minimum-norm least-squares solution
    x, info = run_solve(fw, idf.NormalCG(least_squares=True), A, b)
    assert bool(info.converged)
    np.testing.assert_allclose(x, np.linalg.pinv(A) @ b, rtol=1e-8)


@pytest.mark.parametrize("solver", [idf.MINRES(), idf.GMRES(), idf.BiCGStab(), idf.CG(),
                                    idf.Dense(), idf.Richardson(omega=0.15, maxiter=300)],
                         ids=_id)
def test_inconsistent_never_converged(solver):
    n = 20
    s = np.random.default_rng(8).uniform(1.0, 10.0, n)
    s[0] = 0.0
    A, Q = sym_with_eigs(8, s)
    b = np.random.default_rng(9).standard_normal(n) + Q[:, 0]
    _, info = solver.solve(lambda v: v @ A.T, b)
    assert not bool(info.converged)


# ---- MINRES (and CG) on a non-symmetric A: refused on every backend ----------------------------

@pytest.mark.parametrize("skew", [1e-3, 0.3], ids=["slightly", "strongly"])
@pytest.mark.parametrize("cls", [idf.MINRES, idf.CG], ids=lambda c: c.__name__)
def test_symmetric_solver_nonsymmetric_matrix(fw, cls, skew):
    n = 16
    A, _ = sym_with_eigs(10, np.random.default_rng(10).uniform(1.0, 4.0, n))
    K = np.random.default_rng(11).standard_normal((n, n))
    A = A + skew * (K - K.T)
    b = np.random.default_rng(12).standard_normal((2, n))
    _, info = run_solve(fw, cls(), A, b)
    assert refused(info), info
    assert bool(np.all(info.not_symmetric))


def test_minres_symmetric_tag_still_structure_error():
    """With the `symmetric` tag, the refusal stays the tag's StructureError."""
    n = 8
    K = np.random.default_rng(13).standard_normal((n, n))
    A = 4 * np.eye(n) + 0.3 * (K - K.T)
    fn = idf.custom_root(lambda x, t: A @ x - t, solve=idf.MINRES(),
                         tags={idf.symmetric})(lambda t: np.linalg.solve(A, t))
    with pytest.raises(idf.StructureError, match="symmetric"):
        idf.jvp(fn, (np.ones(n),), (np.ones(n),))


def test_minres_nonsymmetric_untagged_through_ift():
    n = 8
    K = np.random.default_rng(13).standard_normal((n, n))
    A = 4 * np.eye(n) + 0.3 * (K - K.T)
    fn = idf.custom_root(lambda x, t: A @ x - t, solve=idf.MINRES())(
        lambda t: np.linalg.solve(A, t))
    with pytest.raises(idf.SingularJacobianError, match="MINRES"):
        idf.jvp(fn, (np.ones(n),), (np.ones(n),))


# ---- nearly singular but fine: condition 1e8 is still solved -----------------------------------

@pytest.mark.parametrize("solver", [idf.CG(), idf.MINRES(), idf.GMRES(), idf.BiCGStab(),
                                    idf.Dense(), idf.Cholesky(), idf.Auto(dense_max=1)],
                         ids=_id)
@pytest.mark.parametrize("seed", range(3))
def test_condition_1e8_solved(solver, seed):
    n = 120
    s = np.random.default_rng(seed).uniform(1.0, 10.0, n)
    s[seed] = 1e-7                                   # condition number 1e8
    A, _ = sym_with_eigs(seed + 20, s)
    b = np.random.default_rng(seed + 30).standard_normal(n)
    x, info = solver.solve(lambda v: v @ A.T, b,
                           tags=frozenset({idf.symmetric, idf.positive_definite}))
    assert bool(info.converged) and not bool(info.breakdown), info
    ref = np.linalg.solve(A, b)
    assert np.linalg.norm(x - ref) <= 1e-6 * np.linalg.norm(ref)


def test_condition_1e8_solved_on_backends(fw):
    n = 60
    s = np.random.default_rng(40).uniform(1.0, 10.0, n)
    s[5] = 1e-7
    A, _ = sym_with_eigs(40, s)
    b = np.random.default_rng(41).standard_normal((2, n))
    ref = np.linalg.solve(A, b[..., None])[..., 0]
    for solver in (idf.MINRES(), idf.BiCGStab(), idf.Dense()):
        x, info = run_solve(fw, solver, A, b)
        assert np.all(info.converged), (solver, info)
        assert np.linalg.norm(x - ref) <= 1e-6 * np.linalg.norm(ref), solver


# ---- batches and float32: checked per element ----------------------------------------------------

@pytest.mark.parametrize("solver", [idf.CG(), idf.MINRES(), idf.GMRES(restart=6), idf.Dense()],
                         ids=_id)
def test_batch_singular_element_alone(fw, solver):
    n = 12
    good, _ = sym_with_eigs(14, np.random.default_rng(14).uniform(1.0, 5.0, n))
    s = np.random.default_rng(15).uniform(1.0, 5.0, n)
    s[2] = 0.0
    bad, _ = sym_with_eigs(15, s)
    As = np.stack([good, bad, 2 * good])
    b = np.einsum("bij,bj->bi", As, np.random.default_rng(16).standard_normal((3, n)))
    M = fw.asarray(As)

    def mv(V):
        return (M @ V[..., None])[..., 0]

    x, info = fw.run(lambda b: solver.solve(mv, b), fw.asarray(b))
    conv, brk = fw.numpy(info.converged), fw.numpy(info.breakdown)
    np.testing.assert_array_equal(conv, [True, False, True])
    np.testing.assert_array_equal(brk, [False, True, False])
    x = fw.numpy(x)
    for i in (0, 2):
        np.testing.assert_allclose(x[i], np.linalg.solve(As[i], b[i]), rtol=1e-9)


@pytest.mark.parametrize("solver", [idf.CG(), idf.MINRES(), idf.GMRES(), idf.BiCGStab(),
                                    idf.Dense()], ids=_id)
def test_float32(solver):
    n = 30
    s = np.random.default_rng(17).uniform(1.0, 5.0, n)
    A, _ = sym_with_eigs(17, s)
    A = A.astype(np.float32)
    b = np.random.default_rng(18).standard_normal((2, n)).astype(np.float32)
    x, info = solver.solve(lambda v: v @ A.T, b)
    assert x.dtype == np.float32 and np.all(info.converged), info
    ref = np.linalg.solve(A.astype(np.float64), b.astype(np.float64)[..., None])[..., 0]
    assert np.linalg.norm(x - ref) <= 1e-4 * np.linalg.norm(ref)
    s[4] = 0.0
    A, _ = sym_with_eigs(17, s)
    A = A.astype(np.float32)
    _, info = solver.solve(lambda v: v @ A.T, (b @ A.T).astype(np.float32))
    assert refused(info), info


def near_breakdown_problem():
    """A well-conditioned non-symmetric A (indefinite symmetric part diag(±1), skew part
    random; condition number 16), float32, and, in row 0, a b with ⟨b, Ab⟩ = 5e-5 ‖b‖²:
    BiCGStab's first step is then about 2e4 times b."""
    rng = np.random.default_rng(0)
    n = 8
    S = 0.3 * rng.standard_normal((n, n))
    A = (np.diag([1.0, -1.0] * (n // 2)) + S - S.T).astype(np.float32)
    b0 = rng.standard_normal(n)
    b0[1::2] *= np.sqrt((b0[0::2] @ b0[0::2]) / (b0[1::2] @ b0[1::2]) * (1 - 1e-4))
    b = np.stack([b0, rng.standard_normal(n)]).astype(np.float32)
    return A, b


def test_bicgstab_rounding_drift_is_refined_not_refused(fw):
    """After the near-breakdown the rounding of that huge step stays in x (float32): the
    recurrence converges while the true residual stays near 4e-3 relative. The answer check
    corrects once from the true residual (a second solve, A d = b - Ax) and accepts the
    answer; before, this system was refused as a breakdown ("dF/dx looks singular"), as a
    float32 DEQ's backward was in training (examples/deq_digits.py)."""
    A, b = near_breakdown_problem()
    A64 = A.astype(np.float64)
    ref = np.linalg.solve(A64, b.astype(np.float64).T).T
    if fw.name == "numpy":
        # the drift itself, so that this test can fail: the bare iteration's true residual
        from implicitdiff._backend import get_backend
        bk = get_backend(b)
        xr, inf = idf.BiCGStab()._solve(bk, bk.namespace(b), lambda v: v @ A.T, b, None, None,
                                        frozenset())
        assert bool(inf.converged[0])
        assert np.linalg.norm(b[0] - A @ xr[0]) > 1e-3 * np.linalg.norm(b[0])
    for solver in (idf.BiCGStab(), idf.BiCGStab(check_singular=False)):
        x, info = run_solve(fw, solver, A, b)
        assert np.all(info.converged) and not np.any(info.breakdown), info
        assert x.dtype == np.float32
        assert np.linalg.norm(x - ref) <= 1e-5 * np.linalg.norm(ref)
        # the residual reported is the true one of the answer returned (9.9e-3 before the
        # correction), up to the rounding of its float32 product: the frameworks sum in
        # different orders, and at this level (4e-7) their values differ by up to 50%
        true = np.linalg.norm(b.astype(np.float64) - x.astype(np.float64) @ A64.T, axis=-1)
        rounding = np.finfo(np.float32).eps * (np.linalg.norm(A64, 2) * np.linalg.norm(x[0])
                                               + np.linalg.norm(b[0]))
        assert abs(float(info.residual_norm[0]) - true[0]) <= rounding, (info, true)


def test_richardson_fallback_drift_is_refined(fw):
    """Richardson hands the system to its BiCGStab fallback almost from zero (one step of
    omega = 1e-8), which meets the same near-breakdown: the fallback's answer, whose true
    residual its recurrence no longer sees, is corrected once from the true residual (before,
    element 0 ended not converged, its error 3e-3)."""
    A, b = near_breakdown_problem()
    ref = np.linalg.solve(A.astype(np.float64), b.astype(np.float64).T).T
    for check in (True, False):
        solver = idf.Richardson(omega=1e-8, maxiter=1, fallback=idf.BiCGStab(),
                                check_singular=check)
        x, info = run_solve(fw, solver, A, b)
        assert np.all(info.converged) and not np.any(info.breakdown), info
        assert np.linalg.norm(x - ref) <= 1e-5 * np.linalg.norm(ref)


def test_rounding_drift_refined_through_the_implicit_rule(afw):
    """The same system as the Jacobian of a root, F(x, θ) = A x - θ, differentiated in float32
    with BiCGStab: the cotangent's pullback is A⁻ᵀ ḡ, not an error."""
    A, b = near_breakdown_problem()
    An = afw.asarray(A)
    Ainv = np.linalg.inv(A.astype(np.float64))

    def F(x, theta):
        return x @ An.T - theta

    @idf.custom_root(F, solve=idf.BiCGStab())
    def root(theta):
        return theta @ afw.asarray(Ainv.T.astype(np.float32))

    # the cotangent b[0]: the backward solve Aᵀ u = b[0] meets ⟨b, Aᵀb⟩ = ⟨b, Ab⟩ ≈ 0
    _, vjp_fn = idf.vjp(root, afw.asarray(b[1]))
    (got,) = vjp_fn(afw.asarray(b[0]))
    want = Ainv.T @ b[0].astype(np.float64)
    assert np.linalg.norm(afw.numpy(got) - want) <= 1e-5 * np.linalg.norm(want)


# ---- size 0 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", [*ALL, idf.Auto(), idf.NeumannSolve()], ids=_id)
def test_size_zero(fw, solver):
    for shape in [(0,), (3, 0)]:
        x, info = fw.run(lambda b: solver.solve(lambda v: 2.0 * v, b, rmatvec=lambda v: 2.0 * v),
                         fw.asarray(np.zeros(shape)))
        x = fw.numpy(x)
        assert x.shape == shape
        assert all(fw.numpy(i).shape == shape[:-1] for i in info)
        assert np.all(fw.numpy(info.converged)) and not np.any(fw.numpy(info.breakdown))


def test_size_zero_through_ift():
    fn = idf.custom_root(lambda x, t: x - t[:0])(lambda t: t[:0] * 1.0)
    theta = np.ones(3)
    x, xd = idf.jvp(fn, (theta,), (np.ones(3),))
    assert x.shape == xd.shape == (0,)
    (g,) = idf.vjp(fn, theta)[1](np.zeros(0))
    np.testing.assert_array_equal(g, np.zeros(3))


# ---- NeumannSolve: the true residual of its answer ---------------------------------------------

def test_neumann_reports_true_residual_and_divergence():
    rng = np.random.default_rng(19)
    J = rng.standard_normal((6, 6))
    J *= 0.5 / np.linalg.norm(J, 2)
    b = rng.standard_normal(6)
    x, info = idf.NeumannSolve(terms=4).solve(lambda v: J @ v - v, b)
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - (J @ x - x)), rtol=1e-12)
    assert bool(info.converged)
    _, info = idf.NeumannSolve(terms=4, rtol=1e-12).solve(lambda v: J @ v - v, b)
    assert not bool(info.converged)           # an explicit tolerance is enforced
    _, info = idf.NeumannSolve(terms=30).solve(lambda v: 5 * J @ v - v, b)
    assert bool(info.breakdown) and not bool(info.converged)   # not a contraction: diverged


# ---- a family: random singular and ill-conditioned matrices, silent wrong answers = 0 ----------

FAMILY = [idf.CG(), idf.MINRES(), idf.GMRES(), idf.BiCGStab(), idf.NormalCG(), idf.Dense(),
          idf.Auto(dense_max=1)]


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 60), k=st.integers(1, 3),
       symmetric=st.booleans(), consistent=st.booleans())
def test_family_singular_never_converges(seed, n, k, symmetric, consistent):
    """Rank n − k, symmetric or not, with a consistent or an inconsistent right-hand side: no
    solver may report convergence (the answer would be silently wrong)."""
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    if symmetric:
        s = rng.uniform(1.0, 10.0, n) * rng.choice([-1.0, 1.0], n)
        s[rng.choice(n, k, replace=False)] = 0.0
        A, _ = sym_with_eigs(seed, s)
    else:
        A = nonsym_singular(seed, n, k)
    b = rng.standard_normal(n)
    if consistent:
        b = A @ b
    silent = []
    for solver in FAMILY:
        _, info = solver.solve(lambda v: v @ A.T, b, rmatvec=lambda u: u @ A)
        if bool(info.converged):
            silent.append(type(solver).__name__)
    assert silent == []


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 60),
       log_cond=st.floats(0.0, 8.0), symmetric=st.booleans())
def test_family_ill_conditioned_never_wrong(seed, n, log_cond, symmetric):
    """Non-singular with condition up to 1e8 (one small singular value): a converged answer is
    accurate to cond·1e-12 relative, and up to condition 1e6 no solver meant for the matrix
    refuses it."""
    rng = np.random.default_rng(seed)
    cond = 10.0 ** log_cond
    if symmetric:
        s = rng.uniform(1.0, 10.0, n)
        s[0] = 10.0 / cond
        A, _ = sym_with_eigs(seed, s)
        solvers = [idf.CG(), idf.MINRES(), idf.GMRES(), idf.Dense()]
    else:
        U, _ = np.linalg.qr(rng.standard_normal((n, n)))
        s = rng.uniform(1.0, 10.0, n)
        s[0] = 10.0 / cond
        A = (U * s) @ U.T + 0.05 * rng.standard_normal((n, n)) * (s.min() / 10)
        solvers = [idf.GMRES(), idf.Dense()]
    b = rng.standard_normal(n)
    ref = np.linalg.solve(A, b)
    kappa = np.linalg.cond(A)
    for solver in solvers:
        x, info = solver.solve(lambda v: v @ A.T, b)
        if bool(info.converged):
            err = np.linalg.norm(x - ref) / np.linalg.norm(ref)
            assert err <= max(1e-10, 1e-11 * kappa), (solver, err, kappa)
        else:
            assert kappa > 1e6, (solver, info, kappa)


# ---- Richardson with a fallback: the fixed-point backward that never gets stuck ----------------

def _expanding_fixed_point(n: int = 20):
    """$A = J - I$ for a symmetric $J$ with eigenvalues in $[-0.5, 0.5]$ and one at 1.8: the
    iteration $u \\leftarrow J u - b$ contracts on every right-hand side orthogonal to the
    expanding direction $q$ and diverges on the others, while $A$ is well conditioned."""
    s = np.random.default_rng(30).uniform(-0.5, 0.5, n)
    s[0] = 1.8
    J, Q = sym_with_eigs(31, s)
    q = Q[:, 0]
    b0 = np.random.default_rng(32).standard_normal(n)
    b0 -= (b0 @ q) * q                                   # no component along q
    b1 = np.random.default_rng(33).standard_normal(n)
    return J - np.eye(n), np.stack([b0, b1])


@pytest.mark.parametrize("fallback", [idf.BiCGStab(), idf.GMRES(restart=8)], ids=_id)
def test_richardson_fallback_takes_over_where_it_diverges(fw, fallback):
    """Element 0 contracts: the fallback never runs for it (the iterations are plain
    Richardson's). Element 1 diverges: plain Richardson fails, with the fallback it converges
    to the dense answer. The uniqueness probe (on) does not refuse the well-conditioned A."""
    A, B = _expanding_fixed_point()
    ref = np.linalg.solve(A, B.T).T
    plain = idf.Richardson(omega=-1.0, rtol=1e-8, maxiter=300)
    _, info_plain = run_solve(fw, plain, A, B)
    assert info_plain.converged.tolist() == [True, False]
    x, info = run_solve(fw, replace(plain, fallback=fallback), A, B)
    assert info.converged.tolist() == [True, True], info
    assert int(info.iterations[0]) == int(info_plain.iterations[0])
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-8)
    # its reported residual is the true one, also where the fallback answered
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(B - x @ A.T, axis=-1),
                               rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize("fallback", [idf.BiCGStab(), idf.GMRES()], ids=_id)
def test_richardson_fallback_takes_over_where_it_is_slow(fallback):
    """`RICHARDSON_MIN_GAIN` on the two spectra of fixed points: a real one close to 1 (J
    symmetric, eigenvalues in [0, 0.98]: Richardson's rate 0.98) is handed to the Krylov method
    at the first check and costs a tenth of plain Richardson's products; contracting ones (a
    random J scaled to spectral radius 0.5, a symmetric one in [-0.6, 0.6]) never are: the same
    products and iterations as plain Richardson. Every answer to the dense one's accuracy."""
    n, rng = 60, np.random.default_rng(40)
    G = rng.standard_normal((n, n))
    cases = {"slow": sym_with_eigs(41, rng.uniform(0.0, 0.98, n))[0],
             "disk": 0.5 * G / np.abs(np.linalg.eigvals(G)).max(),
             "real": sym_with_eigs(42, rng.uniform(-0.6, 0.6, n))[0]}
    b = rng.standard_normal(n)
    for name, J in cases.items():
        A = J - np.eye(n)
        ref = np.linalg.solve(A, b)
        out = {}
        for fb in (None, fallback):
            calls = [0]

            def mv(v, A=A, calls=calls):
                calls[0] += 1
                return A @ v

            solver = idf.Richardson(omega=-1.0, rtol=1e-10, maxiter=5000, fallback=fb,
                                    check_singular=False)
            x, info = solver.solve(mv, b)
            assert bool(info.converged), (name, fb, info)
            assert np.linalg.norm(x - ref) <= 1e-8 * np.linalg.norm(ref), (name, fb)
            out[fb is None] = (calls[0], int(info.iterations))
        if name == "slow":
            assert out[False][0] <= out[True][0] / 10, out
        else:
            assert out[False] == out[True], (name, out)


def test_richardson_fallback_refuses_a_singular_system_and_bad_arguments():
    """A consistent singular system is still refused with the fallback (the probe runs the
    same hybrid); the fallback must be a method for any non-singular A."""
    n = 24
    s = np.random.default_rng(1).uniform(-0.5, 0.5, n)
    s[3] = 1.0                                            # J has eigenvalue 1: A = J - I singular
    J, _ = sym_with_eigs(1, s)
    A = J - np.eye(n)
    b = A @ np.random.default_rng(2).standard_normal(n)
    _, info = idf.Richardson(omega=-1.0, fallback=idf.BiCGStab()).solve(lambda v: A @ v, b)
    assert not bool(info.converged) and bool(info.breakdown)
    for bad in (idf.CG(), idf.Dense(), "bicgstab"):
        with pytest.raises(TypeError, match="fallback"):
            idf.Richardson(omega=-1.0, fallback=bad)


# ---- the uniqueness probe in two stages --------------------------------------------------------

TWO_STAGE = [idf.CG(rtol=1e-5), idf.MINRES(rtol=1e-5), idf.GMRES(rtol=1e-5),
             idf.BiCGStab(rtol=1e-5)]


@pytest.mark.parametrize("solver", TWO_STAGE, ids=_id)
def test_probe_first_with_the_answer_then_tight_only_where_flagged(monkeypatch, solver):
    """The first probe runs in the answer's loop (one `_solve` call in all; GMRES, whose basis
    would double, in a loop of its own); only where it shows a possible singularity, a
    condition of 1e4 at rtol 1e-5 (its error beyond the threshold, a direction A nearly
    annihilates), the tight probe runs (one more call) and clears the non-singular A: solved,
    to cond·rtol. Condition 1e5 is refused, as before the two stages (and a singular A:
    `test_singular_consistent_refused`)."""
    n = 50
    b = np.random.default_rng(4).standard_normal(n)
    calls: list[tuple] = []
    inner = type(solver)._solve

    def spy(self, bk, xp, matvec, rhs, *rest):
        calls.append(tuple(rhs.shape))
        return inner(self, bk, xp, matvec, rhs, *rest)

    monkeypatch.setattr(type(solver), "_solve", spy)
    for log_cond, n_calls, solved in ((0.5, 1, True), (4.0, 2, True), (5.0, 2, False)):
        A, _ = sym_with_eigs(3, np.logspace(0, -log_cond, n))
        calls.clear()
        x, info = solver.solve(lambda v, A=A: v @ A.T, b)
        stacked = not isinstance(solver, idf.GMRES)       # GMRES: its basis would double
        assert calls[0] == ((2, n) if stacked else (n,)), calls  # the answer and the probe
        if not (log_cond == 5.0 and len(calls) == 1):     # GMRES: not converged, no probe
            assert len(calls) == n_calls + (not stacked), (log_cond, calls)
        assert bool(info.converged) == solved, (log_cond, info)
        if solved:
            ref = np.linalg.solve(A, b)
            err = np.linalg.norm(x - ref) / np.linalg.norm(ref)
            assert err <= 10 ** log_cond * 1e-5, (log_cond, err)


@pytest.mark.parametrize("solver", TWO_STAGE, ids=_id)
def test_probe_stages_per_batch_element(fw, solver):
    """A batch of a well-conditioned, a condition-1e3 and a singular system: the tight probe
    runs on the flagged elements only (the others' right-hand side is 0), each element gets its
    own verdict, on every backend (under `jax.jit` both stages always run)."""
    n = 30
    good, _ = sym_with_eigs(5, np.random.default_rng(5).uniform(1.0, 3.0, n))
    ill, _ = sym_with_eigs(6, np.logspace(0, -3, n))
    s = np.random.default_rng(7).uniform(1.0, 3.0, n)
    s[4] = 0.0
    bad, _ = sym_with_eigs(7, s)
    As = np.stack([good, ill, bad])
    b = np.einsum("bij,bj->bi", As, np.random.default_rng(8).standard_normal((3, n)))
    M = fw.asarray(As)
    x, info = fw.run(lambda b: solver.solve(lambda V: (M @ V[..., None])[..., 0], b),
                     fw.asarray(b))
    np.testing.assert_array_equal(fw.numpy(info.converged), [True, True, False])
    np.testing.assert_array_equal(fw.numpy(info.breakdown), [False, False, True])
    x = fw.numpy(x)
    for i, kappa in ((0, 3.0), (1, 1e3)):
        ref = np.linalg.solve(As[i], b[i])
        assert np.linalg.norm(x[i] - ref) <= 10 * kappa * 1e-5 * np.linalg.norm(ref), i


# ---- Richardson's probe: its own loop, stopped by its known error ------------------------------

@pytest.mark.parametrize("fallback", [None, idf.GMRES()], ids=_id)
def test_richardson_probe_stops_where_its_error_decides(fw, fallback):
    """Richardson's uniqueness probe runs in a loop of its own and stops each element as soon
    as its error ‖z − w‖ is `PROBE_NEAR` (0.9) times the threshold (3e-3/√n): on a batch of
    fixed points contracting at 0.5, the answer at rtol 1e-12 takes about 40 products, the
    probe about log2(√n/2.7e-3) ≈ 11, and every answer is the dense one's. A singular element (J has
    eigenvalue 1, the right-hand side consistent) never gets near w: refused, with and without
    the fallback, on every backend."""
    n = 40
    rng = np.random.default_rng(50)
    Js = []
    for _ in range(3):
        G = rng.standard_normal((n, n))
        Js.append(0.5 * G / np.abs(np.linalg.eigvals(G)).max())
    s = rng.uniform(-0.5, 0.5, n)
    s[7] = 1.0
    Js.append(sym_with_eigs(51, s)[0])
    As = np.stack(Js) - np.eye(n)
    B = np.einsum("bij,bj->bi", As, rng.standard_normal((4, n)))   # consistent everywhere
    solver = idf.Richardson(omega=-1.0, rtol=1e-12, maxiter=400, fallback=fallback)
    M = fw.asarray(As)
    x, info = fw.run(lambda b: solver.solve(lambda V: (M @ V[..., None])[..., 0], b),
                     fw.asarray(B))
    np.testing.assert_array_equal(fw.numpy(info.converged), [True, True, True, False])
    np.testing.assert_array_equal(fw.numpy(info.breakdown), [False, False, False, True])
    x = fw.numpy(x)
    for i in range(3):
        ref = np.linalg.solve(As[i], B[i])
        assert np.linalg.norm(x[i] - ref) <= 1e-10 * np.linalg.norm(ref), i
    # the products of the answer and of the probe (NumPy: the calls can be counted)
    calls: list[int] = []

    def mv(V):
        calls.append(1)
        return (As[:3] @ V[..., None])[..., 0]

    _, info = solver.solve(mv, B[:3])
    answer = int(np.max(info.iterations))
    assert answer >= 35, answer
    probe = len(calls) - answer - 2      # the probe's A w and the true residual's A x aside
    assert 8 <= probe <= 20, (answer, probe)


def test_richardson_masked_path_matches_the_eager_shortcuts():
    """On accelerators the torch backend does not look at masks (`known_all` is False): Richardson
    then takes its masked path, the one compiled JAX runs. On a batch whose elements stop at
    different steps (contractions at different rates), one diverging (handed to the fallback)
    and one singular (refused by the probe), both paths give the same iterates, counts and
    verdicts."""
    torch = pytest.importorskip("torch")
    from implicitdiff_torch import TorchBackend

    n = 30
    rng = np.random.default_rng(60)
    Js = []
    for rate in (0.2, 0.5, 0.8):
        G = rng.standard_normal((n, n))
        Js.append(rate * G / np.abs(np.linalg.eigvals(G)).max())
    s = rng.uniform(-0.5, 0.5, n)
    s[0] = 1.8                                            # diverges: handed over
    Js.append(sym_with_eigs(61, s)[0])
    s = rng.uniform(-0.5, 0.5, n)
    s[3] = 1.0                                            # singular, consistent: refused
    Js.append(sym_with_eigs(62, s)[0])
    As = np.stack(Js) - np.eye(n)
    B = np.einsum("bij,bj->bi", As, rng.standard_normal((5, n)))
    M, b = torch.from_numpy(As), torch.from_numpy(B)
    solver = idf.Richardson(omega=-1.0, rtol=1e-10, maxiter=500, fallback=idf.GMRES())

    def run():
        return solver.solve(lambda V: (M @ V[..., None])[..., 0], b)

    x1, info1 = run()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TorchBackend, "known_all", lambda self, mask: False)
        x2, info2 = run()
    np.testing.assert_array_equal(info1.converged.numpy(), [True, True, True, True, False])
    for f in ("converged", "breakdown", "iterations"):
        np.testing.assert_array_equal(getattr(info1, f).numpy(), getattr(info2, f).numpy())
    np.testing.assert_allclose(x2.numpy(), x1.numpy(), rtol=0, atol=1e-12)
    ref = np.linalg.solve(As[:4], B[:4, :, None])[..., 0]
    np.testing.assert_allclose(x1.numpy()[:4], ref, rtol=1e-7, atol=1e-9)
