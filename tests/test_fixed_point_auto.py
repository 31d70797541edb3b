"""The decorators' default `Auto()` on fixed points: a batch solved by the fixed-point iteration.

`custom_fixed_point(T, batch_dims=1)` with nothing else set. Where the batch's total size
exceeds `Auto.dense_max`, the backward solve is `Richardson(omega=-1.0, fallback=GMRES())`,
not one materialized and factored Jacobian per element; an unbatched problem keeps `Dense`.
Oracles, in NumPy float64 and sharing no code with the library: the per-sample dense formula
$\\bar\\theta = -B_i^\\top (I - J_i)^{-\\top} \\bar z_i$ for a tanh cell, the closed form of a
linear cell, and, for a fixed point that is not isolated, the refusal the probe owes.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import implicitdiff as idf
from implicitdiff._tags import fixed_point_form

B, N, D = 8, 40, 3          # 8 × 40 = 320 > 256: the fixed-point iteration


def _tanh_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((N, N))
    W *= 0.6 / np.linalg.norm(W, 2)
    U = rng.standard_normal((N, D))
    x = rng.standard_normal((B, D))
    return W, U, x


def _tanh_oracle(W, U, x):
    """dL/dW and dL/dU of L = sum(z*²), z*_i = tanh(W z*_i + U x_i), per sample densely."""
    z = np.zeros((x.shape[0], N))
    for _ in range(2000):
        z = np.tanh(z @ W.T + x @ U.T)
    gW, gU = np.zeros_like(W), np.zeros_like(U)
    for zi, xi in zip(z, x):
        d = 1 - zi ** 2
        u = np.linalg.solve((np.eye(N) - d[:, None] * W).T, 2 * zi)
        v = d * u
        gW += np.outer(v, zi)
        gU += np.outer(v, xi)
    return gW, gU


def _linear_data(top: float, seed: int = 3):
    """W symmetric with eigenvalues in [-0.4, 0.4] and one at `top`; U x orthogonal to that
    eigenvector (so z* = (I - W)^+ U x exists when top = 1)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    s = np.linspace(-0.4, 0.4, N)
    s[0] = top
    W = (Q * s) @ Q.T
    U = rng.standard_normal((N, D))
    U -= np.outer(Q[:, 0], Q[:, 0] @ U)
    x = rng.standard_normal((B, D))
    return W, U, x


def _frameworks():
    out = []
    for name in ("jax", "torch"):
        try:
            __import__(name)
        except ImportError:  # pragma: no cover - optional
            continue
        out.append(name)
    return out


def _grads(fw: str, T, W, U, x, forward):
    """dL/dW, dL/dU of L = sum(z*²) through `custom_fixed_point(T, batch_dims=...)` with the
    default `solve`, and the backward's diagnostics record."""
    batch_dims = 1 if x.ndim == 2 else 0
    if fw == "jax":
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        solver = idf.custom_fixed_point(T(jnp), batch_dims=batch_dims)(forward(jnp))
        with idf.diagnostics() as d:
            g = jax.grad(lambda W, U: jnp.sum(solver(W, U, jnp.asarray(x)) ** 2),
                         argnums=(0, 1))(jnp.asarray(W), jnp.asarray(U))
            jax.effects_barrier()
        return [np.asarray(a) for a in g], d.backward[-1]
    import torch

    solver = idf.custom_fixed_point(T(torch), batch_dims=batch_dims)(forward(torch))
    tW, tU = (torch.tensor(a, requires_grad=True) for a in (W, U))
    with idf.diagnostics() as d:
        (solver(tW, tU, torch.tensor(x)) ** 2).sum().backward()
    return [tW.grad.numpy(), tU.grad.numpy()], d.backward[-1]


def _tanh(xp):
    def T(z, W, U, x):
        return xp.tanh(z @ W.T + x @ U.T)
    return T


def _tanh_loop(xp):
    T = _tanh(xp)

    def forward(W, U, x):
        z = xp.zeros((*x.shape[:-1], N), dtype=W.dtype)
        for _ in range(200):
            z = T(z, W, U, x)
        return z
    return forward


def _linear(xp):
    def T(z, W, U, x):
        return z @ W.T + x @ U.T
    return T


def _linear_solve(xp):
    def forward(W, U, x):   # the minimum-norm z* = (I - W)^+ U x, batch as columns
        M = xp.eye(N, dtype=W.dtype) - W
        return (xp.linalg.pinv(M) @ (U @ x.T)).T
    return forward


def test_auto_picks_the_fixed_point_iteration_for_a_batch():
    tags = frozenset({fixed_point_form})
    auto = idf.Auto(rtol=1e-7, maxiter=50, check_singular=False)
    chosen = auto.select(N, tags, batch=B)
    assert chosen == idf.Richardson(omega=-1.0, rtol=1e-7, maxiter=50, check_singular=False,
                                    fallback=idf.GMRES())
    assert type(auto.select(N, tags)) is idf.Dense                  # unbatched: 40 <= 256
    assert type(auto.select(N, tags, batch=6)) is idf.Dense         # 240 <= 256
    assert type(auto.select(300, tags)) is idf.Richardson           # beyond dense_max
    assert type(auto.select(N, tags | {idf.symmetric}, batch=B)) is idf.Dense  # tags win
    assert type(auto.select(N, frozenset(), batch=B)) is idf.Dense  # not a fixed point
    with pytest.raises(idf.StructureError, match="tags"):
        idf.custom_root(lambda x: x, tags={"_fixed_point"})
    # the tag travels with a pickled solver: it pickles as itself
    assert pickle.loads(pickle.dumps(tags)) == tags
    assert pickle.loads(pickle.dumps(fixed_point_form)) is fixed_point_form


@pytest.mark.parametrize("fw", _frameworks())
def test_batched_fixed_point_default_gradient(fw):
    """A contracting tanh cell: the default gradient equals the dense per-sample formula, and
    the backward ran the fixed-point iteration; the same cell unbatched keeps Dense."""
    W, U, x = _tanh_data()
    (gW, gU), rec = _grads(fw, _tanh, W, U, x, _tanh_loop)
    rW, rU = _tanh_oracle(W, U, x)
    np.testing.assert_allclose(gW, rW, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(gU, rU, rtol=1e-7, atol=1e-9)
    assert rec.solver.startswith("Richardson"), rec.solver
    (gW1, _), rec1 = _grads(fw, _tanh, W, U, x[0], _tanh_loop)
    np.testing.assert_allclose(gW1, _tanh_oracle(W, U, x[:1])[0], rtol=1e-9, atol=1e-11)
    assert rec1.solver.startswith("Dense"), rec1.solver


@pytest.mark.parametrize("fw", _frameworks())
def test_batched_fixed_point_default_where_t_does_not_contract(fw):
    """A linear cell with an eigenvalue 1.6: the iteration diverges and GMRES takes over; the
    gradient is the closed form, sum_i 2 (I - W)^-T z_i (z_i, x_i)."""
    W, U, x = _linear_data(1.6)
    (gW, gU), rec = _grads(fw, _linear, W, U, x, _linear_solve)
    Minv = np.linalg.inv(np.eye(N) - W)
    z = x @ (Minv @ U).T
    V = 2 * z @ Minv
    np.testing.assert_allclose(gW, V.T @ z, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(gU, V.T @ x, rtol=1e-7, atol=1e-9)
    assert rec.solver.startswith("Richardson"), rec.solver


@pytest.mark.parametrize("fw", _frameworks())
def test_batched_fixed_point_default_refuses_a_non_isolated_one(fw):
    """An eigenvalue exactly 1 (I - W singular, z* one of a line of fixed points): the default
    refuses the derivative (the uniqueness probe), where an unchecked solve answers."""
    W, U, x = _linear_data(1.0)
    errors: tuple[type[BaseException], ...] = (idf.SingularJacobianError,)
    if fw == "jax":
        import jax
        errors += (jax.errors.JaxRuntimeError,)
    with pytest.raises(errors, match=r"[Ss]ingular"):
        _grads(fw, _linear, W, U, x, _linear_solve)
