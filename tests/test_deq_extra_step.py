"""The forward solvers' `extra_step` (plain steps z <- T(z) after the last iteration, kept per
element where they do not increase the residual) and the DEQ layers' defaults built on it: the
values against the closed form of a linear map, the statistics against a fresh evaluation, the
per-element rejection, JAX under `jit` against NumPy, and the DEQ gradient against the dense
float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest

from implicitdiff.deq import EXTRA_STEPS, forward_options
from implicitdiff.solvers import anderson, broyden, fixed_point_iteration


def linear_problem(n: int = 6, batch: int = 3, scale: float = 0.5, seed: int = 0):
    """T(z) = A_i z + c_i per element, ‖A_i‖₂ = `scale`; the fixed points in closed form."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((batch, n, n))
    A = scale * A / np.linalg.norm(A, 2, axis=(1, 2))[:, None, None]
    c = rng.standard_normal((batch, n))
    zstar = np.linalg.solve(np.eye(n) - A, c[..., None])[..., 0]

    def T(z, A, c):
        return np.einsum("bij,bj->bi", A, z) + c

    return T, A, c, zstar


@pytest.mark.parametrize("solver", [anderson, fixed_point_iteration, broyden])
@pytest.mark.parametrize("k", [1, 2])
def test_extra_steps_are_plain_steps_from_the_last_iterate(solver, k):
    """On a 2-norm contraction every plain step lowers the residual, so each is kept: the value
    is T applied k times to the value without them (NumPy, float64), the error to the closed
    form shrinks, and the statistics are those of the value returned."""
    T, A, c, zstar = linear_problem()
    z0 = np.zeros_like(c)
    base = solver(T, z0, A, c, tol=1e-4)
    res = solver(T, z0, A, c, tol=1e-4, extra_step=k)
    want = base.value
    for _ in range(k):
        want = T(want, A, c)
    np.testing.assert_allclose(res.value, want, rtol=0, atol=1e-14)
    r = T(res.value, A, c) - res.value
    np.testing.assert_allclose(res.max_abs_residual, np.abs(r).max(-1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.residual_norm, np.linalg.norm(r, axis=-1), rtol=1e-12)
    np.testing.assert_array_equal(res.steps, base.steps)      # not counted as iterations
    np.testing.assert_array_equal(np.isnan(res.trace), np.isnan(base.trace))
    err_base = np.linalg.norm(base.value - zstar, axis=-1)
    err = np.linalg.norm(res.value - zstar, axis=-1)
    # each step multiplies the error by A (‖A‖₂ = 0.5)
    assert np.all(err <= 0.5 ** k * err_base * (1 + 1e-9))


def test_extra_step_is_refused_where_it_increases_the_residual():
    """Element 1 has a map that expands (an eigenvalue -1.6): Anderson still converges (on a
    linear map it is a Krylov method), but the plain step would multiply the residual by up to
    1.6. It keeps its last iterate there; the contractive elements take the step."""
    n = 4
    T, A, c, _ = linear_problem(n=n, batch=3)
    A = A.copy()
    A[1] = np.diag([-1.6, 0.2, 0.1, -0.1])
    zstar1 = np.linalg.solve(np.eye(n) - A[1], c[1])
    z0 = np.zeros_like(c)
    # accelerated from the first step (plain_rate=0), as a Krylov method on this linear map
    base = anderson(T, z0, A, c, tol=1e-6, m=5, maxiter=50, plain_rate=0)
    res = anderson(T, z0, A, c, tol=1e-6, m=5, maxiter=50, extra_step=1, plain_rate=0)
    assert bool(base.converged.all()) and bool(res.converged.all())
    np.testing.assert_allclose(base.value[1], zstar1, rtol=1e-5)
    r_plain = T(base.value, A, c) - base.value
    r_next = T(base.value + r_plain, A, c) - (base.value + r_plain)
    grows = np.linalg.norm(r_next, axis=-1) > np.linalg.norm(r_plain, axis=-1)
    assert grows[1] and not grows[0] and not grows[2]
    np.testing.assert_array_equal(res.value[1], base.value[1])              # refused
    np.testing.assert_allclose(res.value[[0, 2]], (base.value + r_plain)[[0, 2]], atol=1e-14)
    r = T(res.value, A, c) - res.value
    np.testing.assert_allclose(res.max_abs_residual, np.abs(r).max(-1), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_extra_step_rejects_what_is_not_a_count(bad):
    T, A, c, _ = linear_problem()
    with pytest.raises(ValueError, match="extra_step"):
        anderson(T, np.zeros_like(c), A, c, extra_step=bad)


def test_extra_step_under_jax_jit_matches_numpy():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    T, A, c, _ = linear_problem()
    want = anderson(T, np.zeros_like(c), A, c, tol=1e-4, extra_step=2)
    with jax.enable_x64(True):
        def Tj(z, A, c):
            return jnp.einsum("bij,bj->bi", A, z) + c

        got = jax.jit(lambda A, c: anderson(Tj, jnp.zeros_like(c), A, c, tol=1e-4,
                                            extra_step=2))(jnp.asarray(A), jnp.asarray(c))
        np.testing.assert_allclose(np.asarray(got.value), want.value, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(got.max_abs_residual), want.max_abs_residual,
                                   rtol=1e-9, atol=1e-15)


def test_forward_options_defaults_and_user_wins():
    assert forward_options(anderson) == {"maxiter": 50, "extra_step": EXTRA_STEPS}
    assert forward_options(anderson, {"extra_step": 0, "tol": 1e-3}) == {
        "maxiter": 50, "extra_step": 0, "tol": 1e-3}

    def own(T, z0, *args, **kw):
        return anderson(T, z0, *args, **kw)

    assert forward_options(own) == {"maxiter": 50}      # a custom solver: no extra keyword


def test_torch_deq_default_extra_steps_shrink_the_gradient_error():
    """The PyTorch DEQ's default extra steps at a loose forward tolerance: the gradient against
    the dense float64 oracle is several times more accurate than without them (each step
    divides the error of z* by about 1/‖J‖ on this cell, ‖W‖₂ = 0.5)."""
    torch = pytest.importorskip("torch")
    from torch_cells import Cell

    import implicitdiff as idf
    from implicitdiff_torch import DEQ, IFT

    f64 = torch.float64
    h, d, batch = 16, 5, 6
    cell = Cell(h, d, 0.5).to(f64)
    x = torch.randn(batch, d, dtype=f64, generator=torch.Generator().manual_seed(1))
    W, U, b = (p.detach() for p in (cell.W.weight, cell.U.weight, cell.U.bias))
    z = torch.zeros(batch, h, dtype=f64)
    for _ in range(2000):
        z = torch.tanh(z @ W.T + x @ U.T + b)
    dz = 1 - z ** 2
    A = torch.eye(h, dtype=f64) - dz[:, :, None] * W[None]
    u = torch.linalg.solve(A.mT, (2 * z)[..., None])[..., 0]
    ref = (dz * u).T @ z                                   # d sum(z²) / dW

    def grad_error(**opts):
        cell.zero_grad()
        layer = DEQ(cell, z_shape=(h,), solver_options=dict(tol=1e-4, **opts),
                    backward=IFT(idf.BiCGStab(rtol=1e-12)), residual_tol=1e-2)
        (layer(x) ** 2).sum().backward()
        return float((cell.W.weight.grad - ref).norm() / ref.norm())

    e0 = grad_error(extra_step=0)
    e_default = grad_error()
    assert e0 < 1e-3                        # the tolerance's own accuracy
    assert e_default < e0 / 10              # three steps: at least ten times closer
