"""The linear solvers of `implicitdiff._linear_solve` against `numpy.linalg.solve`.

Matrices are drawn well-posed (bounded condition number): symmetric positive definite and
symmetric indefinite ones as $Q\\,\\mathrm{diag}(s)\\,Q^\\top$, non-symmetric ones as
$c\\,(I + \\delta E)$ with $\\|E\\|_2 = 1$, $\\delta < 1$. The NumPy reference backend runs the
solvers; the JAX and PyTorch backends, where installed, must give the same answers.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import implicitdiff as idf

# ---- problem families ---------------------------------------------------------------------------

SEEDS = st.integers(0, 2**32 - 1)
SIZES = st.integers(1, 40)
CONDS = st.floats(1.0, 100.0)


def sym_matrix(seed: int, n: int, cond: float, *, indefinite: bool = False,
               dtype: type = np.float64) -> np.ndarray:
    """$Q\\,\\mathrm{diag}(s)\\,Q^\\top$ with $|s| \\in [1, \\text{cond}]$, both ends attained;
    random signs (at least one of each when $n \\ge 2$) when `indefinite`."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.exp(rng.uniform(0.0, math.log(cond), n))
    s[0] = 1.0
    if n > 1:
        s[-1] = cond
    if indefinite:
        signs = rng.choice([-1.0, 1.0], n)
        if n > 1:
            signs[0], signs[-1] = 1.0, -1.0
        s = s * signs
    A = (Q * s) @ Q.T
    return ((A + A.T) / 2).astype(dtype)


def nonsym_matrix(seed: int, n: int, delta: float, *, dtype: type = np.float64) -> np.ndarray:
    """$c\\,(I + \\delta E)$ with $\\|E\\|_2 = 1$, so the condition number is at most
    $(1+\\delta)/(1-\\delta)$."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.5, 5.0) * rng.choice([-1.0, 1.0])
    E = rng.standard_normal((n, n))
    E /= np.linalg.norm(E, 2)
    return (c * (np.eye(n) + delta * E)).astype(dtype)


def rhs(seed: int, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
    return np.random.default_rng(seed + 1).standard_normal(shape).astype(dtype)


def ops(A: np.ndarray):
    """matvec and rmatvec acting row-wise on `(..., n)` arrays."""
    return (lambda v: v @ A.T), (lambda u: u @ A)


def solve(solver: idf.AbstractLinearSolver, A: np.ndarray, b: np.ndarray, **kw):
    mv, rmv = ops(A)
    return solver.solve(mv, b, rmatvec=rmv, **kw)


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


ITERATIVE = [idf.CG, idf.MINRES, idf.GMRES, idf.BiCGStab, idf.NormalCG]
DIRECT = [idf.Dense, idf.Cholesky]
ALL = ITERATIVE + DIRECT

SPD_SOLVERS = [idf.CG(), idf.Cholesky(), idf.MINRES(), idf.GMRES(), idf.BiCGStab(),
               idf.NormalCG(), idf.Dense()]
NONSYM_SOLVERS = [idf.GMRES(), idf.BiCGStab(), idf.Dense(), idf.NormalCG()]


def check_accurate(solver, A, b, x, info, *, tol_err=1e-10):
    """≥ 10 correct digits, an honest `converged`, and the stopping rule respected."""
    ref = np.linalg.solve(A, b)
    assert x.shape == b.shape and x.dtype == b.dtype
    assert info.iterations.shape == info.residual_norm.shape == info.converged.shape == ()
    assert info.breakdown.shape == ()
    assert np.issubdtype(info.iterations.dtype, np.integer)
    assert info.converged.dtype == info.breakdown.dtype == np.bool_
    assert info.residual_norm.dtype == b.dtype
    assert bool(info.converged), info
    assert not bool(info.breakdown), info
    assert rel_err(x, ref) <= tol_err, (rel_err(x, ref), info)
    if isinstance(solver, idf.NormalCG):
        # NormalCG's residual is the normal-equation one, ‖Aᵀ(b − Ax)‖ ≤ rtol ‖Aᵀb‖.
        assert float(info.residual_norm) <= 1e-12 * np.linalg.norm(A.T @ b)
    elif isinstance(solver, (idf.Dense, idf.Cholesky)):
        assert int(info.iterations) == 0
        np.testing.assert_allclose(info.residual_norm, np.linalg.norm(A @ x - b),
                                   rtol=1e-12, atol=0)
        assert float(info.residual_norm) <= 1.5e-8 * np.linalg.norm(b)
    else:
        assert float(info.residual_norm) <= 1e-12 * np.linalg.norm(b)
        # The reported residual is honest: the true one is within a small factor of the bound.
        assert np.linalg.norm(b - A @ x) <= 10 * 1e-12 * np.linalg.norm(b)


# ---- accuracy on matching matrix classes --------------------------------------------------------

@pytest.mark.parametrize("solver", SPD_SOLVERS, ids=lambda s: type(s).__name__)
@given(seed=SEEDS, n=SIZES, cond=CONDS)
def test_spd(solver, seed, n, cond):
    A = sym_matrix(seed, n, cond)
    b = rhs(seed, (n,))
    x, info = solve(solver, A, b)
    check_accurate(solver, A, b, x, info)


# Restarted GMRES(30) may stagnate on indefinite systems larger than the restart length (it then
# reports non-convergence); full GMRES (restart >= n) is what must be exact.
INDEF_SOLVERS = [idf.MINRES(), idf.GMRES(restart=40), idf.Dense()]


@pytest.mark.parametrize("solver", INDEF_SOLVERS, ids=lambda s: type(s).__name__)
@given(seed=SEEDS, n=SIZES, cond=CONDS)
def test_symmetric_indefinite(solver, seed, n, cond):
    A = sym_matrix(seed, n, cond, indefinite=True)
    b = rhs(seed, (n,))
    x, info = solve(solver, A, b)
    check_accurate(solver, A, b, x, info)


@given(seed=SEEDS, n=st.integers(1, 30), cond=CONDS)
def test_symmetric_indefinite_gmres_default_restart(seed, n, cond):
    # n <= restart: the default GMRES is full GMRES.
    A = sym_matrix(seed, n, cond, indefinite=True)
    b = rhs(seed, (n,))
    x, info = solve(idf.GMRES(), A, b)
    check_accurate(idf.GMRES(), A, b, x, info)


@given(seed=SEEDS, n=SIZES, cond=CONDS)
def test_symmetric_indefinite_bicgstab_never_wrong(seed, n, cond):
    # BiCGStab has no convergence guarantee on indefinite systems, but what it reports as
    # converged must be right, and whatever it reports must be consistent.
    A = sym_matrix(seed, n, cond, indefinite=True)
    b = rhs(seed, (n,))
    x, info = solve(idf.BiCGStab(), A, b)
    assert not (bool(info.converged) and bool(info.breakdown))
    if bool(info.converged):
        check_accurate(idf.BiCGStab(), A, b, x, info)
    else:
        assert bool(info.breakdown) or int(info.iterations) == 10 * n


@pytest.mark.parametrize("seed", range(5))
def test_symmetric_indefinite_bicgstab_converges(seed):
    A = sym_matrix(seed, 25, 20.0, indefinite=True)
    b = rhs(seed, (25,))
    x, info = solve(idf.BiCGStab(), A, b)
    check_accurate(idf.BiCGStab(), A, b, x, info)


@pytest.mark.parametrize("solver", NONSYM_SOLVERS, ids=lambda s: type(s).__name__)
@given(seed=SEEDS, n=SIZES, delta=st.floats(0.0, 0.8))
def test_nonsymmetric(solver, seed, n, delta):
    A = nonsym_matrix(seed, n, delta)
    b = rhs(seed, (n,))
    x, info = solve(solver, A, b)
    check_accurate(solver, A, b, x, info)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_zero_rhs(cls):
    A = sym_matrix(0, 6, 10.0)
    b = np.zeros(6)
    x, info = solve(cls(), A, b)
    assert np.array_equal(x, np.zeros(6))
    assert bool(info.converged) and not bool(info.breakdown)
    assert int(info.iterations) == 0
    assert float(info.residual_norm) == 0.0


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_atol_stops_early(cls):
    A = sym_matrix(3, 30, 100.0)
    b = rhs(3, (30,))
    atol = 1e-3 * np.linalg.norm(b)
    # GMRES checks convergence once per restart cycle: short cycles show the early stop.
    kw = {"restart": 5} if cls is idf.GMRES else {}
    x, info = solve(cls(rtol=0.0, atol=atol, **kw), A, b)
    assert bool(info.converged)
    assert np.linalg.norm(b - A @ x) <= 2 * atol
    if cls in ITERATIVE and cls is not idf.NormalCG:
        _, full = solve(cls(**kw), A, b)
        assert int(info.iterations) < int(full.iterations)


# ---- diagnostics when maxiter is too small ------------------------------------------------------

def _true_residual(solver, A, b, x):
    r = b - A @ x
    return np.linalg.norm(A.T @ r) if isinstance(solver, idf.NormalCG) else np.linalg.norm(r)


@pytest.mark.parametrize(
    ("solver", "expected_iters"),
    [
        (idf.CG(maxiter=3), 3),
        (idf.MINRES(maxiter=3), 3),
        (idf.BiCGStab(maxiter=3), 3),
        (idf.NormalCG(maxiter=3), 3),
        (idf.GMRES(maxiter=10, restart=5), 10),  # two cycles of five
        (idf.GMRES(maxiter=7, restart=5), 10),  # maxiter is rounded up to whole cycles
        (idf.GMRES(maxiter=3, restart=4), 4),  # one cycle at least
    ],
    ids=["CG", "MINRES", "BiCGStab", "NormalCG", "GMRES-2x5", "GMRES-ceil", "GMRES-1cycle"],
)
@pytest.mark.parametrize("kind", ["spd", "other"])
@pytest.mark.parametrize("seed", range(2))
def test_maxiter_too_small(solver, expected_iters, seed, kind):
    n = 30
    if kind == "spd":
        A = sym_matrix(seed, n, 100.0)
    elif isinstance(solver, (idf.CG, idf.MINRES)):  # CG: another SPD; MINRES: indefinite
        A = sym_matrix(seed + 7, n, 100.0, indefinite=isinstance(solver, idf.MINRES))
    else:
        A = nonsym_matrix(seed, n, 0.95)
    b = rhs(seed, (n,))
    x, info = solve(solver, A, b)
    assert not bool(info.converged)
    assert not bool(info.breakdown)
    assert int(info.iterations) == expected_iters
    tol = 1e-12 * (np.linalg.norm(A.T @ b) if isinstance(solver, idf.NormalCG)
                   else np.linalg.norm(b))
    assert float(info.residual_norm) > tol
    true = _true_residual(solver, A, b, x)
    rn = float(info.residual_norm)
    assert 0.5 * true <= rn <= 2 * true, (rn, true)
    # Few iterations in float64: the recursive / estimated residual is in fact much closer.
    np.testing.assert_allclose(rn, true, rtol=1e-6)
    # The partial answer is a real improvement over x = 0.
    assert true < _true_residual(solver, A, b, np.zeros(n))


@pytest.mark.parametrize("cls", ITERATIVE, ids=lambda c: c.__name__)
def test_maxiter_one(cls):
    A = sym_matrix(1, 10, 50.0)
    b = rhs(1, (10,))
    solver = cls(maxiter=1, restart=1) if cls is idf.GMRES else cls(maxiter=1)
    _, info = solve(solver, A, b)
    assert int(info.iterations) == 1
    assert not bool(info.converged)


# ---- batches ------------------------------------------------------------------------------------

BATCH_SOLVERS = [idf.CG(), idf.MINRES(), idf.GMRES(restart=5), idf.BiCGStab(), idf.NormalCG(),
                 idf.Dense(), idf.Cholesky()]


def _batch_problem(n: int = 20):
    # Per-element difficulty: the identity (one step), growing condition numbers, and a zero
    # right-hand side (zero steps).
    conds = [1.0, 3.0, 30.0, 100.0, 10.0]
    As = np.stack([sym_matrix(10 + i, n, c) for i, c in enumerate(conds)])
    bs = np.stack([rhs(20 + i, (n,)) for i in range(len(conds))])
    bs[4] = 0.0
    return As, bs


def _batch_ops(As):
    return (lambda V: (As @ V[..., None])[..., 0],
            lambda U: (np.swapaxes(As, -1, -2) @ U[..., None])[..., 0])


@pytest.mark.parametrize("solver", BATCH_SOLVERS, ids=lambda s: type(s).__name__)
def test_batch_matches_unbatched(solver):
    As, bs = _batch_problem()
    mv, rmv = _batch_ops(As)
    X, info = solver.solve(mv, bs, rmatvec=rmv)
    B = bs.shape[0]
    assert X.shape == bs.shape
    for field_ in info:
        assert field_.shape == (B,)
    assert info.converged.all(), info
    assert not info.breakdown.any()
    for i in range(B):
        mvi, rmvi = _batch_ops(As[i])
        xi, infoi = solver.solve(mvi, bs[i], rmatvec=rmvi)
        np.testing.assert_allclose(X[i], xi, rtol=1e-12, atol=1e-300)
        assert int(info.iterations[i]) == int(infoi.iterations)
        assert bool(info.converged[i]) == bool(infoi.converged)
        np.testing.assert_allclose(info.residual_norm[i], infoi.residual_norm,
                                   rtol=1e-6, atol=1e-14 * np.linalg.norm(bs[i]) + 1e-300)
        if bs[i].any():
            assert rel_err(X[i], np.linalg.solve(As[i], bs[i])) <= 1e-10
        else:
            assert np.array_equal(X[i], np.zeros_like(X[i]))
    if not isinstance(solver, (idf.Dense, idf.Cholesky)):
        # Per-element stopping: the easy elements stop early, the zero one at once.
        assert len(set(info.iterations.tolist())) >= 3, info.iterations
        assert int(info.iterations[4]) == 0
        assert int(info.iterations[0]) < int(info.iterations[3])
    else:
        assert (info.iterations == 0).all()


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_batch_shape_two_dims(cls):
    n = 8
    A = sym_matrix(4, n, 10.0)
    b = rhs(4, (2, 3, n))
    X, info = solve(cls(), A, b)
    assert X.shape == (2, 3, n)
    for field_ in info:
        assert field_.shape == (2, 3)
    assert info.converged.all()
    np.testing.assert_allclose(X, np.linalg.solve(A, b[..., None])[..., 0], rtol=1e-10)


def test_batch_failure_is_per_element():
    # One element is singular: only that element is flagged, the others are solved.
    n = 6
    As = np.stack([sym_matrix(5, n, 10.0), np.zeros((n, n)), sym_matrix(6, n, 5.0)])
    bs = rhs(5, (3, n))
    mv, _ = _batch_ops(As)
    for solver in (idf.CG(), idf.Dense()):
        X, info = solver.solve(mv, bs)
        assert info.converged.tolist() == [True, False, True], (solver, info)
        assert bool(info.breakdown[1])
        for i in (0, 2):
            assert rel_err(X[i], np.linalg.solve(As[i], bs[i])) <= 1e-10


# ---- breakdown and honesty ----------------------------------------------------------------------

@given(seed=SEEDS, n=st.integers(2, 40), cond=CONDS)
def test_cg_indefinite_never_wrong(seed, n, cond):
    A = sym_matrix(seed, n, cond, indefinite=True)
    b = rhs(seed, (n,))
    x, info = solve(idf.CG(), A, b)
    assert not (bool(info.converged) and bool(info.breakdown))
    if bool(info.converged):
        check_accurate(idf.CG(), A, b, x, info)
    else:
        assert bool(info.breakdown) or int(info.iterations) == 10 * n
    assert np.isfinite(x).all()


@pytest.mark.parametrize(
    "A",
    [np.diag([1.0, -1.0]), -2.0 * np.eye(3), np.zeros((3, 3))],
    ids=["zero-curvature", "negative-definite", "zero"],
)
def test_cg_breakdown_flagged(A):
    b = np.ones(A.shape[0])
    x, info = solve(idf.CG(), A, b)
    assert bool(info.breakdown)
    assert not bool(info.converged)
    assert int(info.iterations) == 0
    assert np.isfinite(x).all()


@pytest.mark.parametrize("cls", DIRECT, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "A",
    [
        np.ones((3, 3)),  # exactly singular: LU / Cholesky fail or give garbage
        np.zeros((4, 4)),
        sym_matrix(7, 6, 10.0) @ np.diag([1, 1, 1, 1, 1, 0.0]) @ sym_matrix(7, 6, 10.0),
    ],
    ids=["ones", "zeros", "rank-deficient"],
)
def test_direct_singular(cls, A):
    b = rhs(8, (A.shape[0],))
    x, info = solve(cls(), A, b)
    assert not bool(info.converged)
    assert bool(info.breakdown)
    assert x.shape == b.shape


def test_direct_nearly_singular():
    # Numerically singular (cond ~ 1e17), no LinAlgError: the residual check catches it.
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    A = (Q * np.r_[np.ones(7), 1e-17]) @ Q.T
    _, info = solve(idf.Dense(), A, rng.standard_normal(8))
    assert bool(info.breakdown) and not bool(info.converged)


@pytest.mark.parametrize("n", [1, 2, 10])
def test_cholesky_indefinite(n):
    A = sym_matrix(9, n, 10.0, indefinite=True) if n > 1 else -np.eye(1)
    b = rhs(9, (n,))
    x, info = solve(idf.Cholesky(), A, b)
    assert bool(info.breakdown)
    assert not bool(info.converged)
    # The dense LU on the same matrix is fine.
    x, info = solve(idf.Dense(), A, b)
    check_accurate(idf.Dense(), A, b, x, info)


# Not NormalCG: its documented tolerance is on the normal-equation residual ‖Aᵀ(b − Ax)‖, which a
# least-squares solution of a singular system does make small (it is meant for non-singular A).
@pytest.mark.parametrize("cls", [idf.MINRES, idf.GMRES, idf.BiCGStab], ids=lambda c: c.__name__)
def test_krylov_singular_inconsistent_not_converged(cls):
    # b has a component outside the range of A: no x solves it, none may be reported.
    A = sym_matrix(11, 10, 10.0)
    w, V = np.linalg.eigh(A)
    w[0] = 0.0
    A = (V * w) @ V.T
    A = (A + A.T) / 2
    b = rhs(11, (10,)) + V[:, 0]
    _, info = solve(cls(), A, b)
    assert not bool(info.converged), info




@pytest.mark.parametrize(
    "cls",
    [*ITERATIVE, idf.Dense, idf.Cholesky],
    ids=lambda c: c.__name__,
)
def test_nan_operator_flagged(cls):
    # Never silent: a NaN operator is not converged, and the info says why (a breakdown, or a
    # NaN residual where the right-hand side itself is NaN, as Aᵀb is for NormalCG).
    def mv(v):
        return v * np.nan

    b = np.ones(4)
    _, info = cls().solve(mv, b, rmatvec=mv)
    assert not bool(info.converged)
    assert bool(info.breakdown) or not np.isfinite(info.residual_norm)
    if cls is not idf.NormalCG:
        assert bool(info.breakdown)


# ---- ridge, x0, preconditioners -----------------------------------------------------------------

@pytest.mark.parametrize("cls", [*ALL, idf.Auto], ids=lambda c: c.__name__)
@pytest.mark.parametrize("ridge", [0.5, 3.0])
def test_ridge(cls, ridge):
    n = 12
    A = sym_matrix(12, n, 50.0)
    b = rhs(12, (n,))
    x, info = solve(cls(ridge=ridge), A, b)
    assert bool(info.converged)
    assert rel_err(x, np.linalg.solve(A + ridge * np.eye(n), b)) <= 1e-10
    if cls is idf.Auto:  # the iterative branch must not add the ridge twice either
        x, info = solve(idf.Auto(ridge=ridge, dense_max=4), A, b,
                        tags=frozenset({idf.symmetric, idf.positive_definite}))
        assert rel_err(x, np.linalg.solve(A + ridge * np.eye(n), b)) <= 1e-10


@pytest.mark.parametrize("cls", [idf.Dense, idf.Cholesky, idf.CG, idf.MINRES],
                         ids=lambda c: c.__name__)
def test_ridge_regularizes_singular(cls):
    # A positive semi-definite, singular: the ridge makes it solvable.
    A = np.ones((5, 5))
    b = rhs(13, (5,))
    _, info = solve(cls(), A, b)
    assert not bool(info.converged)
    x, info = solve(cls(ridge=1e-3), A, b)
    assert bool(info.converged)
    assert rel_err(x, np.linalg.solve(A + 1e-3 * np.eye(5), b)) <= 1e-9


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_exact_x0_takes_no_iterations(cls):
    n = 15
    A = sym_matrix(14, n, 30.0)
    x_true = rhs(14, (n,))
    b = A @ x_true
    x, info = solve(cls(), A, b, x0=x_true)
    assert int(info.iterations) == 0
    assert bool(info.converged)
    assert rel_err(x, x_true) <= 1e-10
    if cls in ITERATIVE:
        assert np.array_equal(x, x_true)  # returned untouched


@pytest.mark.parametrize("cls", ITERATIVE, ids=lambda c: c.__name__)
def test_good_x0_saves_iterations(cls):
    n = 30
    A = sym_matrix(15, n, 100.0)
    b = rhs(15, (n,))
    ref = np.linalg.solve(A, b)
    solver = cls(restart=5) if cls is idf.GMRES else cls()
    _, cold = solve(solver, A, b)
    x, warm = solve(solver, A, b, x0=ref + 1e-6 * rhs(16, (n,)))
    assert bool(warm.converged)
    assert int(warm.iterations) < int(cold.iterations)
    assert rel_err(x, ref) <= 1e-10


def test_x0_batched_per_element():
    n = 10
    A = sym_matrix(17, n, 20.0)
    b = rhs(17, (3, n))
    ref = np.linalg.solve(A, b[..., None])[..., 0]
    x0 = np.zeros_like(b)
    x0[1] = ref[1]
    x, info = solve(idf.CG(), A, b, x0=x0)
    assert int(info.iterations[1]) == 0
    assert int(info.iterations[0]) > 0 and int(info.iterations[2]) > 0
    np.testing.assert_allclose(x, ref, rtol=1e-10)


def _badly_scaled(seed: int, n: int):
    d = np.logspace(-2, 2, n)
    np.random.default_rng(seed).shuffle(d)
    S = sym_matrix(seed, n, 10.0)
    A = d[:, None] * S * d[None, :]
    diag = np.diag(A).copy()
    return A, diag


@pytest.mark.parametrize("seed", range(3))
def test_cg_jacobi_preconditioner(seed):
    n = 40
    A, diag = _badly_scaled(seed, n)
    b = rhs(seed, (n,))
    ref = np.linalg.solve(A, b)
    _, plain = solve(idf.CG(), A, b)
    x, pre = solve(idf.CG(preconditioner=lambda v: v / diag), A, b)
    assert bool(pre.converged)
    assert int(pre.iterations) < int(plain.iterations), (pre, plain)
    assert rel_err(x, ref) <= 1e-6  # cond(A) ~ 1e9: the answer itself has ~ 7 digits
    assert np.linalg.norm(b - A @ x) <= 10 * 1e-12 * np.linalg.norm(b)


@pytest.mark.parametrize("cls", [idf.MINRES, idf.GMRES, idf.BiCGStab], ids=lambda c: c.__name__)
def test_other_preconditioned(cls):
    n = 40
    A, diag = _badly_scaled(0, n)
    b = rhs(0, (n,))
    solver = cls(preconditioner=lambda v: v / diag)
    x, info = solve(solver, A, b)
    assert bool(info.converged), info
    assert not bool(info.breakdown)
    assert rel_err(x, np.linalg.solve(A, b)) <= 1e-6
    _, plain = solve(cls(), A, b)
    assert int(info.iterations) < int(plain.iterations) or not bool(plain.converged)


# ---- errors -------------------------------------------------------------------------------------

def test_normal_cg_needs_rmatvec():
    A = sym_matrix(0, 4, 2.0)
    with pytest.raises(idf.StructureError, match="rmatvec"):
        idf.NormalCG().solve(lambda v: v @ A.T, np.ones(4))


@pytest.mark.parametrize("cls", [*ALL, idf.Auto], ids=lambda c: c.__name__)
def test_scalar_rhs_rejected(cls):
    with pytest.raises(idf.StructureError, match=r"shape \(n,\)"):
        cls().solve(lambda v: 2 * v, np.asarray(1.0), rmatvec=lambda u: 2 * u)
    with pytest.raises(idf.StructureError):
        cls().solve(lambda v: 2 * v, np.float64(1.0), rmatvec=lambda u: 2 * u)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_x0_shape_mismatch(cls):
    with pytest.raises(idf.StructureError, match="x0"):
        cls().solve(lambda v: 2 * v, np.ones(3), x0=np.ones(4), rmatvec=lambda u: 2 * u)


@pytest.mark.parametrize("cls", [*ALL, idf.Auto], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rtol": -1e-3}, "rtol >= 0"),
        ({"rtol": float("nan")}, "rtol >= 0"),
        ({"atol": -1.0}, "atol >= 0"),
        ({"ridge": -0.1}, "ridge >= 0"),
    ],
)
def test_bad_common_options(cls, kwargs, match):
    with pytest.raises(ValueError, match=match) as exc:
        cls(**kwargs)
    assert cls.__name__ in str(exc.value)


@pytest.mark.parametrize("cls", [*ITERATIVE, idf.Auto], ids=lambda c: c.__name__)
@pytest.mark.parametrize("maxiter", [0, -3, 2.5])
def test_bad_maxiter(cls, maxiter):
    with pytest.raises(ValueError, match=r"maxiter a positive int") as exc:
        cls(maxiter=maxiter)
    assert cls.__name__ in str(exc.value) and repr(maxiter) in str(exc.value)


@pytest.mark.parametrize("restart", [0, -1, 2.0])
def test_bad_gmres_restart(restart):
    with pytest.raises(ValueError, match=r"GMRES: expected restart a positive int"):
        idf.GMRES(restart=restart)


# ---- Auto ---------------------------------------------------------------------------------------

SPD = frozenset({idf.symmetric, idf.positive_definite})
SYM = frozenset({idf.symmetric})
NONE: frozenset = frozenset()


@pytest.mark.parametrize(
    ("n", "tags", "expected"),
    [
        (1, SPD, idf.Cholesky), (256, SPD, idf.Cholesky), (10, SYM, idf.Dense),
        (10, NONE, idf.Dense), (256, NONE, idf.Dense),
        (257, SPD, idf.CG), (257, SYM, idf.MINRES), (257, NONE, idf.GMRES),
        (10**6, SPD, idf.CG), (10**6, SYM, idf.MINRES), (10**6, NONE, idf.GMRES),
    ],
)
def test_auto_select(n, tags, expected):
    chosen = idf.Auto().select(n, tags)
    assert type(chosen) is expected


def test_auto_never_normal_cg_and_passes_options():
    auto = idf.Auto(rtol=1e-5, atol=1e-9, maxiter=7, ridge=0.25, dense_max=3)
    for tags in (SPD, SYM, NONE):
        for n in (1, 3, 4, 1000):
            chosen = auto.select(n, tags)
            assert not isinstance(chosen, idf.NormalCG)
            assert (chosen.rtol, chosen.atol, chosen.ridge) == (1e-5, 1e-9, 0.25)
            if n > 3:
                assert chosen.maxiter == 7
    assert auto.select(4, SPD) == idf.CG(rtol=1e-5, atol=1e-9, maxiter=7, ridge=0.25)
    assert auto.select(3, SPD) == idf.Cholesky(rtol=1e-5, atol=1e-9, ridge=0.25)


@pytest.mark.parametrize("tags", [SPD, SYM, NONE], ids=["spd", "sym", "none"])
@pytest.mark.parametrize("dense_max", [256, 4])
def test_auto_solves(tags, dense_max):
    n = 20
    A = sym_matrix(18, n, 50.0) if tags else nonsym_matrix(18, n, 0.5)
    b = rhs(18, (n,))
    auto = idf.Auto(dense_max=dense_max)
    x, info = solve(auto, A, b, tags=tags)
    check_accurate(auto.select(n, tags), A, b, x, info)


# ---- dataclass properties -----------------------------------------------------------------------

def _jacobi(v):
    return v / 2.0


@pytest.mark.parametrize("cls", [*ALL, idf.Auto], ids=lambda c: c.__name__)
def test_frozen_hashable(cls):
    a, b = cls(), cls()
    assert a == b and hash(a) == hash(b)
    c = cls(rtol=1e-3)
    assert c != a
    assert c == cls(rtol=1e-3) and hash(c) == hash(cls(rtol=1e-3))
    assert len({a, b, c}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.rtol = 1.0  # type: ignore[misc]
    assert isinstance(a, idf.AbstractLinearSolver)
    assert cls(ridge=0.1) != cls()


@pytest.mark.parametrize("cls", [idf.CG, idf.MINRES, idf.GMRES, idf.BiCGStab],
                         ids=lambda c: c.__name__)
def test_preconditioner_field_hashable(cls):
    a = cls(preconditioner=_jacobi)
    assert a == cls(preconditioner=_jacobi) and hash(a) == hash(cls(preconditioner=_jacobi))
    assert a != cls()


def test_solvers_of_different_classes_differ():
    assert idf.CG() != idf.MINRES()
    assert idf.Dense() != idf.Cholesky()
    assert idf.GMRES(restart=10) != idf.GMRES()


# ---- float32 ------------------------------------------------------------------------------------

F32_SOLVERS = [idf.CG(), idf.MINRES(), idf.GMRES(), idf.BiCGStab(), idf.NormalCG(), idf.Dense(),
               idf.Cholesky()]


@pytest.mark.parametrize("solver", F32_SOLVERS, ids=lambda s: type(s).__name__)
@given(seed=SEEDS, n=SIZES, cond=st.floats(1.0, 10.0))
def test_float32(solver, seed, n, cond):
    A64 = sym_matrix(seed, n, cond)
    A = A64.astype(np.float32)
    b = rhs(seed, (n,), np.float32)
    x, info = solve(solver, A, b)
    assert x.dtype == np.float32
    assert info.residual_norm.dtype == np.float32
    assert bool(info.converged), info
    ref = np.linalg.solve(A.astype(np.float64), b.astype(np.float64))
    assert rel_err(x.astype(np.float64), ref) <= 1e-4


@pytest.mark.parametrize("solver", NONSYM_SOLVERS, ids=lambda s: type(s).__name__)
@given(seed=SEEDS, n=SIZES, delta=st.floats(0.0, 0.8))
def test_float32_nonsymmetric(solver, seed, n, delta):
    A = nonsym_matrix(seed, n, delta, dtype=np.float32)
    b = rhs(seed, (n,), np.float32)
    x, info = solve(solver, A, b)
    assert x.dtype == np.float32
    assert bool(info.converged), info
    ref = np.linalg.solve(A.astype(np.float64), b.astype(np.float64))
    assert rel_err(x.astype(np.float64), ref) <= 1e-4


# ---- other frameworks ---------------------------------------------------------------------------

# GMRES with a short restart: two cycles or more (the restart logic runs compiled), and its
# Arnoldi cycle, unrolled in Python, traces O(restart²) operations into `lax.while_loop`, which
# at the default restart of 30 takes tens of seconds to compile.
FRAMEWORK_SOLVERS = [idf.CG(), idf.MINRES(), idf.GMRES(restart=6), idf.BiCGStab(), idf.Dense(),
                     idf.Cholesky(), idf.NormalCG()]


def _backend_module(name: str):
    mod = pytest.importorskip(name)
    if not hasattr(mod, "backend"):
        pytest.skip(f"{name} does not expose a backend yet")
    return mod


def _same_iterations_up_to_rounding(its, its_numpy):
    # Per-element stopping in the other framework too. A different matmul may round an element's
    # residual to the other side of the tolerance: one iteration more or less.
    assert its.shape == its_numpy.shape
    assert np.abs(its.astype(int) - its_numpy.astype(int)).max() <= 1, (its, its_numpy)
    assert int(its[4]) == 0 and int(its[0]) == 1
    assert len(set(its.tolist())) >= 3


def _framework_problem():
    n = 12
    A = sym_matrix(19, n, 50.0)
    b = rhs(19, (n,))
    return A, b, np.linalg.solve(A, b)


@pytest.mark.parametrize("solver", FRAMEWORK_SOLVERS, ids=lambda s: type(s).__name__)
def test_jax(solver):
    jax = pytest.importorskip("jax")
    _backend_module("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    A, b, ref = _framework_problem()
    jA, jb = jnp.asarray(A), jnp.asarray(b)
    assert jb.dtype == jnp.float64

    def run(b):
        return solver.solve(lambda v: v @ jA.T, b, rmatvec=lambda u: u @ jA)

    x, info = run(jb)
    assert isinstance(x, jax.Array) and x.dtype == jnp.float64
    assert bool(info.converged) and not bool(info.breakdown)
    assert rel_err(np.asarray(x), ref) <= 1e-10
    x_jit, info_jit = jax.jit(run)(jb)
    assert bool(info_jit.converged)
    assert rel_err(np.asarray(x_jit), ref) <= 1e-10
    np.testing.assert_allclose(np.asarray(x_jit), np.asarray(x), rtol=1e-10, atol=0)
    x_np, _ = solve(solver, A, b)
    np.testing.assert_allclose(np.asarray(x), x_np, rtol=1e-10, atol=0)


def test_jax_jit_cg_closure():
    jax = pytest.importorskip("jax")
    _backend_module("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    A, b, ref = _framework_problem()
    jA = jnp.asarray(A)
    f = jax.jit(lambda b: idf.CG().solve(lambda v: jA @ v, b)[0])
    assert rel_err(np.asarray(f(jnp.asarray(b))), ref) <= 1e-10


def test_jax_batched_per_element():
    jax = pytest.importorskip("jax")
    _backend_module("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    As, bs = _batch_problem()
    jAs = jnp.asarray(As)

    def run(bs):
        return idf.CG().solve(lambda V: (jAs @ V[..., None])[..., 0], bs)

    X, info = jax.jit(run)(jnp.asarray(bs))
    Xn, infon = idf.CG().solve(_batch_ops(As)[0], bs)
    np.testing.assert_allclose(np.asarray(X), Xn, rtol=1e-10, atol=1e-300)
    _same_iterations_up_to_rounding(np.asarray(info.iterations), infon.iterations)


@pytest.mark.parametrize("solver", FRAMEWORK_SOLVERS, ids=lambda s: type(s).__name__)
def test_torch(solver):
    torch = pytest.importorskip("torch")
    _backend_module("implicitdiff_torch")

    A, b, ref = _framework_problem()
    tA, tb = torch.from_numpy(A), torch.from_numpy(b)
    assert tb.dtype == torch.float64
    x, info = solver.solve(lambda v: v @ tA.T, tb, rmatvec=lambda u: u @ tA)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float64
    assert bool(info.converged) and not bool(info.breakdown)
    assert rel_err(x.detach().numpy(), ref) <= 1e-10
    x_np, _ = solve(solver, A, b)
    np.testing.assert_allclose(x.detach().numpy(), x_np, rtol=1e-10, atol=0)


def test_torch_batched_per_element():
    torch = pytest.importorskip("torch")
    _backend_module("implicitdiff_torch")

    As, bs = _batch_problem()
    tAs = torch.from_numpy(As)
    X, info = idf.CG().solve(lambda V: (tAs @ V[..., None])[..., 0], torch.from_numpy(bs))
    Xn, infon = idf.CG().solve(_batch_ops(As)[0], bs)
    np.testing.assert_allclose(X.numpy(), Xn, rtol=1e-10, atol=1e-300)
    _same_iterations_up_to_rounding(info.iterations.numpy(), infon.iterations)


def test_richardson_fixed_point_backward_and_divergence():
    rng = np.random.default_rng(7)
    n = 30
    J = rng.standard_normal((n, n))
    J *= 0.6 / np.linalg.norm(J, 2)  # a contraction's Jacobian
    A = J - np.eye(n)  # dF/dx for F = T - x
    b = rng.standard_normal(n)
    x, info = idf.Richardson(omega=-1.0).solve(lambda v: A @ v, b)
    assert bool(info.converged) and not bool(info.breakdown)
    assert rel_err(x, np.linalg.solve(A, b)) <= 1e-10
    assert 0 < int(info.iterations) < 200
    # expansive: ||I - omega A|| > 1 makes it diverge, which is reported, never "converged"
    x, info = idf.Richardson(omega=-1.0, maxiter=500).solve(lambda v: (3 * J - np.eye(n)) @ v, b)
    assert not bool(info.converged)
    # batched, per-element stopping
    B = np.stack([b, 0 * b, 2 * b])
    X, info = idf.Richardson(omega=-1.0).solve(lambda V: V @ A.T, B)
    assert info.converged.all() and int(info.iterations[1]) == 0
    np.testing.assert_allclose(X[2], 2 * X[0], rtol=1e-9)
    with pytest.raises(ValueError, match="omega"):
        idf.Richardson(omega=0.0)


@pytest.mark.parametrize("check_singular", [False, True])
def test_richardson_reports_the_true_residual(check_singular):
    """Richardson's answer check reuses the residual its iteration computed (no second
    product): the reported residual is ‖b − A x‖ of the answer returned, computed here
    independently, for converged elements, an element stopped by `maxiter`, and a diverging
    one; only the converged one is reported converged."""
    rng = np.random.default_rng(21)
    n = 25
    J = rng.standard_normal((n, n))
    J *= 0.7 / np.linalg.norm(J, 2)
    slow = 0.995 * J / 0.7                                # contracts too slowly for maxiter
    grow = 1.5 * J / 0.7                                  # expansive: diverges
    mats = np.stack([J - np.eye(n), slow - np.eye(n), grow - np.eye(n)])
    B = rng.standard_normal((3, n))
    solver = idf.Richardson(omega=-1.0, maxiter=40, check_singular=check_singular)
    X, info = solver.solve(lambda V: np.einsum("bij,bj->bi", mats, V), B)
    true = np.linalg.norm(B - np.einsum("bij,bj->bi", mats, X), axis=-1)
    np.testing.assert_allclose(info.residual_norm, true, rtol=1e-12)
    assert info.converged.tolist() == [True, False, False]
    assert rel_err(X[0], np.linalg.solve(mats[0], B[0])) <= 1e-9
