"""`idf.ode.steady_state`: the t → ∞ limit of an autonomous ODE, differentiated by the implicit
function theorem. Oracles: closed-form equilibria and their derivatives (first and second order),
and the refusal of a flow that has no steady state (a rotation)."""

from __future__ import annotations

import numpy as np
import pytest

import implicitdiff as idf
from implicitdiff.ode._steady import steady_state


def cubic(t, y, a, b):
    """y' = a - b y³ (stable): y* = (a / b)^(1/3)."""
    return a - b * y**3


def rotation(t, y):
    """A centre: every orbit is a circle, no steady state but the origin (never reached)."""
    return np.stack([y[..., 1], -y[..., 0]], axis=-1) if isinstance(y, np.ndarray) else \
        _stack_like(y)


def _stack_like(y):
    import array_api_compat

    xp = array_api_compat.array_namespace(y)
    return xp.stack([y[..., 1], -y[..., 0]], axis=-1)


A_VALS = np.array([[0.5], [2.0], [8.0]])  # three samples
B_VAL = 2.0


def _closed(a, b):
    y = (a / b) ** (1 / 3)
    dy_da = y / (3 * a)
    dy_db = -y / (3 * b)
    d2y_da2 = -2 * y / (9 * a**2)
    return y, dy_da, dy_db, d2y_da2


def test_numpy_value_and_batch():
    y = steady_state(cubic, np.ones((3, 1)), A_VALS, B_VAL)
    np.testing.assert_allclose(y, _closed(A_VALS, B_VAL)[0], rtol=1e-13)


def test_linear_system_against_the_dense_solve():
    rng = np.random.default_rng(0)
    d = 4
    M = rng.standard_normal((d, d))
    A = -(M @ M.T / d + 0.5 * np.eye(d))  # stable
    c = rng.standard_normal(d)
    y = steady_state(lambda t, y, A, c: A @ y + c if y.ndim == 1 else y @ A.T + c,
                     np.zeros(d), A, c)
    np.testing.assert_allclose(y, -np.linalg.solve(A, c), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", ["grad", "jvp", "hessian"])
def test_jax_derivatives_against_the_closed_form(mode):
    jax = pytest.importorskip("jax")
    pytest.importorskip("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    a, b = jnp.asarray(A_VALS), jnp.asarray(B_VAL)
    y_ref, dy_da, dy_db, d2 = _closed(A_VALS, B_VAL)

    def ss(a, b):  # a short scan: JAX compiles every one of odeint's max_steps iterations
        return steady_state(cubic, jnp.ones((3, 1)), a, b, max_steps=256)

    def total(a, b):
        return jnp.sum(ss(a, b))

    if mode == "grad":
        ga, gb = jax.jit(jax.grad(total, argnums=(0, 1)))(a, b)
        np.testing.assert_allclose(np.asarray(ga), dy_da, rtol=1e-10)
        np.testing.assert_allclose(float(gb), dy_db.sum(), rtol=1e-10)
    elif mode == "jvp":
        da = jnp.asarray(np.array([[1.0], [-2.0], [0.5]]))
        y, ydot = jax.jit(lambda a, da: jax.jvp(lambda a: ss(a, b), (a,), (da,)))(a, da)
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(ydot), dy_da * np.asarray(da), rtol=1e-10)
    else:
        H = jax.jit(jax.hessian(total))(a, b)  # (3, 1, 3, 1): diagonal (independent samples)
        np.testing.assert_allclose(np.asarray(H).reshape(3, 3), np.diag(d2.ravel()),
                                   rtol=1e-8, atol=1e-12)


def test_torch_grad_forward_and_double_backward():
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")
    a = torch.tensor(A_VALS, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(B_VAL, dtype=torch.float64, requires_grad=True)
    y_ref, dy_da, dy_db, d2 = _closed(A_VALS, B_VAL)
    y = steady_state(cubic, torch.ones(3, 1, dtype=torch.float64), a, b)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12)
    ga, gb = torch.autograd.grad(y.sum(), (a, b), create_graph=True)
    np.testing.assert_allclose(ga.detach().numpy(), dy_da, rtol=1e-10)
    np.testing.assert_allclose(float(gb.detach()), dy_db.sum(), rtol=1e-10)
    (gaa,) = torch.autograd.grad(ga.sum(), (a,))
    np.testing.assert_allclose(gaa.numpy(), d2, rtol=1e-8)
    da = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    _, ydot = torch.func.jvp(lambda a: steady_state(cubic, torch.ones(3, 1, dtype=torch.float64),
                                                    a, b.detach()), (a.detach(),), (da,))
    np.testing.assert_allclose(ydot.numpy(), dy_da * da.numpy(), rtol=1e-10)


def test_no_steady_state_is_refused_not_returned():
    y0 = np.array([[1.0, 0.0], [0.0, 0.0]])  # sample 1 sits at the origin, sample 0 circles
    with pytest.raises(idf.NonConvergenceError):
        steady_state(rotation, y0, horizon=1.0, max_horizons=3, on_failure="raise")
    y = steady_state(rotation, y0, horizon=1.0, max_horizons=3, on_failure="nan")
    assert np.isnan(y[0]).all() and np.all(y[1] == 0.0)


def test_bad_options():
    with pytest.raises(ValueError, match="horizon"):
        steady_state(cubic, np.ones(1), 1.0, 1.0, horizon=0.0)
    with pytest.raises(idf.StructureError, match="y0"):
        steady_state(cubic, np.float64(1.0), 1.0, 1.0)
