"""The speed-ups of `idf.qp`: the reduced backward solve (`ReducedDense`, eliminating the
inactive multipliers' and the status's rows of the KKT matrix), the block-by-block Jacobian and
the interior point's Cholesky factorizations, against independent oracles: `np.linalg.solve` on
the whole matrix, the closed-form active-set derivative (tests/qp_oracles.py), `idf.Dense()`."""

from __future__ import annotations

import numpy as np
import pytest
from qp_oracles import kkt_vjp, make_qp, rel, stack

import implicitdiff as idf
import implicitdiff.qp as qp
from implicitdiff.qp import _ipm
from implicitdiff.qp._reduced import ReducedDense

torch = pytest.importorskip("torch")


def _product(M):
    def mv(v):
        return (M @ v[..., None])[..., 0]

    return mv


def _structured(rng, B=4, N=9, keep=5, transpose=False):
    """A batch of matrices whose unknowns >= keep with a nonzero diagonal have rows holding
    only that entry (columns, transposed); per element a random subset of them is coupled."""
    M = rng.standard_normal((B, N, N)) + N * np.eye(N)
    for e in range(B):
        diag = rng.random(N - keep) < 0.6           # eliminable: row = diagonal only
        for j in np.flatnonzero(diag) + keep:
            d = M[e, j, j]
            M[e, j, :] = 0.0
            M[e, j, j] = d
        for j in np.flatnonzero(~diag) + keep:      # kept: a zero diagonal, coupled row
            M[e, j, j] = 0.0
    return np.swapaxes(M, 1, 2).copy() if transpose else M


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("keep", [None, 5])
def test_reduced_dense_equals_the_whole_solve(transpose, keep):
    rng = np.random.default_rng(0)
    M = _structured(rng, transpose=transpose)
    b = rng.standard_normal(M.shape[:2])
    x, info = ReducedDense(keep=keep).solve(_product(M), b)
    assert np.all(np.asarray(info.converged))
    assert rel(x, np.linalg.solve(M, b[..., None])[..., 0]) <= 1e-13
    # torch, the transposed one as a view (the VJP's case)
    Mt = torch.tensor(np.swapaxes(M, 1, 2).copy()).mT
    xt, info = ReducedDense(keep=keep).solve(_product(Mt), torch.tensor(b))
    assert bool(info.converged.all())
    assert rel(xt.numpy(), np.linalg.solve(M, b[..., None])[..., 0]) <= 1e-13


def test_reduced_dense_without_the_structure_falls_back_to_the_whole_matrix():
    # keep=0 claims every unknown eliminable: wrong for a dense matrix; the residual check
    # sends those elements to Dense, and the answer is still the solve
    rng = np.random.default_rng(1)
    M = rng.standard_normal((3, 6, 6)) + 6 * np.eye(6)
    b = rng.standard_normal((3, 6))
    x, info = ReducedDense(keep=0).solve(_product(M), b)
    assert np.all(np.asarray(info.converged))
    assert rel(x, np.linalg.solve(M, b[..., None])[..., 0]) <= 1e-13


def test_reduced_dense_refuses_a_singular_kept_block():
    rng = np.random.default_rng(2)
    M = _structured(rng, B=2)
    M[1, :, 0] = M[1, :, 1]  # two equal columns among the kept unknowns: singular
    M[1, 5:, 0] = M[1, 5:, 1] = 0.0
    b = rng.standard_normal(M.shape[:2])
    _, info = ReducedDense(keep=5).solve(_product(M), b)
    conv, brk = np.asarray(info.converged), np.asarray(info.breakdown)
    assert conv[0] and not brk[0]
    assert brk[1] and not conv[1]


def _batch(seed=3, B=6, n=8, p=2, m=10, n_weak=0):
    rng = np.random.default_rng(seed)
    Ps = [make_qp(rng, n, p, m, n_active=int(rng.integers(1, 5)), n_weak=n_weak)
          for _ in range(B)]
    return Ps, stack(Ps)


def test_default_backward_matches_closed_form_and_dense():
    Ps, P = _batch()
    rng = np.random.default_rng(4)
    cx = rng.standard_normal(P.x.shape)
    ts = [torch.tensor(a, requires_grad=True) for a in P.inputs()]
    grads = {}
    for name, solve in (("reduced", None), ("dense", idf.Dense())):
        x = qp.solve_qp(*ts, solve=solve)
        grads[name] = [g.numpy() for g in torch.autograd.grad((x * torch.tensor(cx)).sum(), ts)]
    want = [kkt_vjp(Pi, cx[i], np.zeros(Pi.p), np.zeros(Pi.m)) for i, Pi in enumerate(Ps)]
    for k, name in enumerate(("Q", "q", "A", "b", "G", "h")):
        w = np.stack([wi[name] for wi in want])
        if name == "Q":
            w = (w + np.swapaxes(w, 1, 2)) / 2
        assert rel(grads["reduced"][k], w) <= 1e-8, name
        assert rel(grads["reduced"][k], grads["dense"][k]) <= 1e-10, name


def test_weakly_active_rows_keep_the_documented_derivative():
    # a weakly active constraint is held inactive: the closed form on the strongly active set
    Ps, P = _batch(seed=5, B=3, n_weak=1)
    rng = np.random.default_rng(6)
    cx = rng.standard_normal(P.x.shape)
    ts = [torch.tensor(a, requires_grad=True) for a in P.inputs()]
    sol = qp.solve_qp(*ts, full_output=True)
    assert bool(np.all(np.asarray(sol.stats.degenerate)))
    g = torch.autograd.grad((sol.x * torch.tensor(cx)).sum(), ts)
    want = [kkt_vjp(Pi, cx[i], np.zeros(Pi.p), np.zeros(Pi.m)) for i, Pi in enumerate(Ps)]
    for k, name in enumerate(("q", "A", "b", "G", "h"), start=1):
        assert rel(g[k].numpy(), np.stack([wi[name] for wi in want])) <= 1e-8, name


def test_a_non_unique_solution_still_raises():
    # Q singular on the feasible directions (x2 free between two slack bounds): x* is not
    # unique, the active-set KKT matrix is singular, and so is the reduced one: the backward
    # refuses, in a batch beside a regular sample
    Q = np.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]])
    q = np.array([[1.0, 0.0], [1.0, 0.0]])
    G = np.array([[[0.0, 1.0], [0.0, -1.0]]] * 2)
    h = np.full((2, 2), 10.0)
    A, b = np.zeros((2, 0, 2)), np.zeros((2, 0))
    ts = [torch.tensor(a, requires_grad=True) for a in (Q, q, A, b, G, h)]
    x = qp.solve_qp(*ts)
    with pytest.raises(idf.SingularJacobianError):
        torch.autograd.grad(x.sum(), ts)
    x = qp.solve_qp(*ts, on_failure="nan")
    g = torch.autograd.grad(x.sum(), ts)[1]
    assert bool(torch.isnan(g[0]).all()) and bool(torch.isfinite(g[1]).all())


def test_jacobian_blocks_written_in_place_equal_the_concatenation():
    jnp = pytest.importorskip("jax.numpy")
    import jax

    jax.config.update("jax_enable_x64", True)
    _, P = _batch(seed=8, B=3)
    ok = np.array([1.0, 0.0, 1.0])
    w = (P.x * ok[:, None], P.y * ok[:, None], P.z * ok[:, None], ok)
    M_np = qp._jacobian_x(w, *P.inputs())                      # in place
    M_jax = np.asarray(qp._jacobian_x(tuple(map(jnp.asarray, w)),
                                      *map(jnp.asarray, P.inputs())))  # concatenated
    assert np.max(np.abs(M_np - M_jax)) <= 1e-14 * np.max(np.abs(M_np))  # rounding (XLA)
    # the rows the reduction eliminates hold only their diagonal, exactly, either way: the
    # inactive multipliers' (and every row of the failed sample) and the status row
    n, p = P.x.shape[-1], P.y.shape[-1]
    N = M_np.shape[-1]
    for M in (M_np, M_jax):
        for e in range(3):
            rows = [n + p + i for i in np.flatnonzero(w[2][e] == 0)] + [N - 1]
            off = M[e][rows] - np.diag(np.diag(M[e]))[rows]
            assert np.all(off == 0) and np.all(np.diag(M[e])[rows] != 0), e


def test_cholesky_factor_solves_and_falls_back():
    rng = np.random.default_rng(9)
    X = rng.standard_normal((4, 6, 12))
    H = X @ np.swapaxes(X, 1, 2) + np.eye(6)
    r = rng.standard_normal((4, 6))
    want = np.linalg.solve(H, r[..., None])[..., 0]
    assert rel(_ipm._factor(H, spd=True)(r), want) <= 1e-13
    H[2] = -H[2]  # not positive definite: the LU path for the batch
    want = np.linalg.solve(H, r[..., None])[..., 0]
    assert rel(_ipm._factor(H, spd=True)(r), want) <= 1e-13
