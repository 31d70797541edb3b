"""`custom_root(..., batch_dims=1, on_failure="nan")`: a batch element whose forward solve
failed is NaN, and it spoils neither the other elements nor the gradient of the arguments the
batch shares, in every framework (the same semantics in JAX as in PyTorch). Oracle: the same
solver on the good elements alone."""

from __future__ import annotations

import numpy as np
import pytest

import implicitdiff as idf

A_NP = np.array([np.nan, 0.5, 2.0, -1.0])  # element 0: a NaN input, the solve fails there
W0 = 1.3


def F(x, a, w):  # x^3 + w x - a = 0 per element; w shared by the batch
    return x**3 + w * x - a


def newton(xp):
    def solve(a, w):
        x = a * 0
        for _ in range(40):
            x = x - (x**3 + w * x - a) / (3 * x**2 + w)
        return x
    return solve


def closed_form_grad(a, w):
    # d/dw sum_i x_i = sum_i -x_i / (3 x_i^2 + w); d/da_i x_i = 1 / (3 x_i^2 + w)
    x = np.array([np.roots([1, 0, w, -ai])[np.argmin(np.abs(np.roots([1, 0, w, -ai]).imag))].real
                  for ai in a])
    return float(np.sum(-x / (3 * x**2 + w))), 1 / (3 * x**2 + w)


def test_jax_failed_element_spoils_nothing():
    jax = pytest.importorskip("jax")
    pytest.importorskip("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    solver = idf.custom_root(F, solve=idf.CG(), batch_dims=1, on_failure="nan")(newton(jnp))

    def loss(a, w):
        return jnp.sum(jnp.nan_to_num(solver(a, w)))

    a = jnp.asarray(A_NP)
    x = solver(a, W0)
    assert bool(jnp.isnan(x[0])) and bool(jnp.all(jnp.isfinite(x[1:])))
    want_w, want_a = closed_form_grad(A_NP[1:], W0)
    for grad in (jax.grad(loss, argnums=(0, 1)), jax.jit(jax.grad(loss, argnums=(0, 1)))):
        ga, gw = grad(a, W0)
        assert np.isfinite(float(gw))
        np.testing.assert_allclose(float(gw), want_w, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(ga[1:]), want_a, rtol=1e-10)
        assert float(ga[0]) == 0.0  # the failed element's input gets no gradient
    # forward mode: the shared argument's tangent reaches the good elements only
    _, x_dot = jax.jvp(lambda w: solver(a, w), (W0,), (1.0,))
    assert float(x_dot[0]) == 0.0 and bool(jnp.all(jnp.isfinite(x_dot)))


def test_torch_failed_element_spoils_nothing():
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")
    solver = idf.custom_root(F, solve=idf.CG(), batch_dims=1, on_failure="nan")(newton(torch))
    a = torch.tensor(A_NP, requires_grad=True)
    w = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
    x = solver(a, w)
    assert torch.isnan(x[0]) and torch.isfinite(x[1:]).all()
    ga, gw = torch.autograd.grad(torch.nan_to_num(x).sum(), (a, w))
    want_w, want_a = closed_form_grad(A_NP[1:], W0)
    np.testing.assert_allclose(float(gw), want_w, rtol=1e-10)
    np.testing.assert_allclose(ga[1:].numpy(), want_a, rtol=1e-10)
    assert float(ga[0]) == 0.0


def test_numpy_reference_failed_element_spoils_nothing():
    solver = idf.custom_root(F, solve=idf.CG(), batch_dims=1, on_failure="nan")(newton(np))
    x, vjp_fn = idf.vjp(solver, A_NP, np.float64(W0))
    assert np.isnan(x[0]) and np.all(np.isfinite(x[1:]))
    ga, gw = vjp_fn(np.ones_like(x))  # a cotangent on the failed element too: it adds nothing
    want_w, want_a = closed_form_grad(A_NP[1:], W0)
    np.testing.assert_allclose(float(gw), want_w, rtol=1e-10)
    np.testing.assert_allclose(ga[1:], want_a, rtol=1e-10)
    assert ga[0] == 0.0
    _, x_dot = idf.jvp(solver, (A_NP, np.float64(W0)), (np.zeros(4), np.float64(1.0)))
    assert x_dot[0] == 0.0 and np.all(np.isfinite(x_dot))
