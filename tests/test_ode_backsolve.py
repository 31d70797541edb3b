"""`odeint(..., grad="backsolve")`: the continuous adjoint. Oracles: the closed form of an
exponential decay's parameter gradient, `grad="direct"` at a tight tolerance, the loud refusal of
a reverse-time-unstable problem (where a backsolve adjoint without the check returns a wrong
gradient silently), and the seminorm's saving of backward evaluations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import implicitdiff as idf
from implicitdiff import ode
from implicitdiff.ode._backsolve import AdjointStats, BacksolveUnsupportedError, backsolve

torch = pytest.importorskip("torch")
pytest.importorskip("implicitdiff_torch")

TIGHT = dict(rtol=1e-10, atol=1e-10)


def mlp_field(t, y, W1, b1, W2):
    return torch.tanh(y @ W1.T + b1) @ W2.T - 0.1 * y


def _mlp(seed=0, d=3, h=8, batch=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    params = (0.5 * r(h, d), 0.1 * r(h), 0.5 * r(d, h))
    return params, r(batch, d), r


def test_decay_rate_gradient_closed_form():
    # y' = -k y: y(t) = y0 exp(-k t); L = Σ_j c_j y(t_j): dL/dk = Σ_j -t_j c_j y(t_j),
    # dL/dy0 = Σ_j c_j exp(-k t_j)
    k = torch.tensor([[0.7], [2.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0], [-0.5]], dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    c = torch.tensor([[[0.3], [1.0]], [[-1.0], [2.0]], [[0.5], [0.25]]], dtype=torch.float64)
    ys = ode.odeint(lambda t, y, k: -k * y, y0, ts, k, grad="backsolve", **TIGHT)
    gk, gy0 = torch.autograd.grad((c * ys).sum(), (k, y0))
    e = torch.exp(-k.detach()[None] * ts[:, None, None])
    yt = y0.detach()[None] * e
    np.testing.assert_allclose(gk.numpy(), (-ts[:, None, None] * c * yt).sum(0).numpy(),
                               rtol=1e-8)
    np.testing.assert_allclose(gy0.numpy(), (c * e).sum(0).numpy(), rtol=1e-8)


def test_torch_matches_direct():
    params, y0, r = _mlp()
    params = tuple(p.requires_grad_() for p in params)
    y0.requires_grad_()
    ts = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    c = r(4, *y0.shape)
    grads = {}
    for mode in ("direct", "backsolve"):
        ys = ode.odeint(mlp_field, y0, ts, *params, grad=mode, **TIGHT)
        grads[mode] = torch.autograd.grad((c * ys).sum(), (y0, *params))
    for a, b in zip(grads["direct"], grads["backsolve"]):
        assert float((a - b).norm() / a.norm()) < 1e-8


def test_jax_matches_direct_under_jit():
    jax = pytest.importorskip("jax")
    pytest.importorskip("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    W = jnp.asarray(0.5 * rng.standard_normal((2, 2)))
    y0 = jnp.asarray(rng.standard_normal((4, 2)))
    ts = jnp.linspace(0.0, 1.0, 3)
    c = jnp.asarray(rng.standard_normal((3, 4, 2)))

    def loss(y0, W, grad):
        ys = ode.odeint(lambda t, y, W: jnp.tanh(y @ W.T) - 0.1 * y, y0, ts, W, grad=grad,
                        max_steps=256, **TIGHT)
        return jnp.sum(c * ys)

    ref = jax.grad(loss, argnums=(0, 1))(y0, W, "direct")
    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(y0, W, "backsolve")
    for a, b in zip(ref, got):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 1e-8


def test_unstable_reverse_time_is_refused():
    # y' = -k y with k = 40 on [0, 1]: backwards in time the flow grows like e^{40}, so the
    # backward reconstruction of y (and the adjoint built on it) is garbage: refused
    k = torch.tensor([[40.0], [1.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ys = ode.odeint(lambda t, y, k: -k * y, y0, ts, k, grad="backsolve", on_failure="raise")
    with pytest.raises(ode.ODEFailureError, match=r"drifted.*batch index \(0,\)") as ei:
        torch.autograd.grad(ys[-1].sum(), (k, y0))
    assert ei.value.status == "reconstruction"
    # "nan": that sample's y0 gradient and the shared k gradient are NaN; sample 1 keeps its own
    ys = ode.odeint(lambda t, y, k: -k * y, y0, ts, k, grad="backsolve", on_failure="nan")
    gk, gy0 = torch.autograd.grad(ys[-1].sum(), (k, y0))
    assert torch.isnan(gy0[0]).all() and torch.isnan(gk).all()
    np.testing.assert_allclose(float(gy0[1]), np.exp(-1.0), rtol=1e-5)


def test_seminorm_saves_backward_evaluations():
    # the neural ODE (state 2, hidden 64, batch 256, dopri5, 1e-6): leaving the
    # parameter integral out of the backward error control (torchdiffeq's mixed norm without
    # it) takes fewer backward steps, and the reconstruction stays within the tolerance
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    params = tuple(p.requires_grad_() for p in (r(64, 2) / 2**0.5, r(64), r(2, 64) / 8.0))
    y0 = r(256, 2)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    nfe, grads = {}, {}
    for semi in (True, False):
        st = AdjointStats()
        ys = backsolve(lambda t, y, W1, b1, W2: torch.tanh(y @ W1.T + b1) @ W2.T, y0, ts,
                       params, method="dopri5", rtol=1e-6, atol=1e-6, dt0=None,
                       max_steps=4096, on_failure="raise", full_output=False, seminorm=semi,
                       stats=st)
        grads[semi] = torch.autograd.grad(ys[-1].sum(), params)
        nfe[semi] = st.nfe_backward
        assert st.max_drift < 100.0
    assert nfe[True] <= 0.8 * nfe[False], nfe
    for a, b in zip(grads[True], grads[False]):  # both within the tolerance's reach
        assert float((a - b).norm() / b.norm()) < 1e-4


def test_forward_mode_is_forward_sensitivities():
    # forward mode of grad='backsolve' (and 'checkpoint'): the forward solve's own forward-mode
    # derivative, equal to grad='direct''s; refused, naming the fix, where it cannot be given
    import torch.autograd.forward_ad as fwAD

    k = torch.tensor([[0.7], [1.3]], dtype=torch.float64)
    y0 = torch.ones(2, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    v = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)

    def solve(k, grad):
        return ode.odeint(lambda t, y, k: -k * y, y0, ts, k, grad=grad, rtol=1e-9, atol=1e-9)

    _, want = torch.func.jvp(lambda k: solve(k, "direct"), (k,), (v,))
    exact = -ts[:, None, None] * torch.exp(-k * ts[:, None, None]) * v  # d/dk e^{-kt} v
    assert float((want - exact).abs().max()) < 1e-7
    for grad in ("backsolve", "checkpoint"):
        _, jv = torch.func.jvp(lambda k, g=grad: solve(k, g), (k,), (v,))
        torch.testing.assert_close(jv, want, rtol=1e-13, atol=1e-15)
        with fwAD.dual_level(), pytest.raises(ode.DerivativeNotSupportedError,
                                              match=r"torch\.func\.jvp"):
            solve(fwAD.make_dual(k, v), grad)
    assert issubclass(BacksolveUnsupportedError, idf.ImplicitDiffError)
    # one refusal for every gradient mode
    assert issubclass(BacksolveUnsupportedError, ode.DerivativeNotSupportedError)
    # second order through the adjoint: refused
    kk = k.clone().requires_grad_()
    (g,) = torch.autograd.grad(solve(kk, "backsolve").sum(), kk, create_graph=True)
    with pytest.raises(BacksolveUnsupportedError, match="second-order"):
        g.sum().backward()


def _decay_oracle(k, y0, ts, c):
    e = np.exp(-k[None] * ts[:, None, None])
    return (-ts[:, None, None] * c * y0[None] * e).sum(0), (c * e).sum(0)


def test_wrap_solver_scipy_on_the_host():
    # SciPy's solve_ivp (NumPy only) behind PyTorch tensors: forward and the adjoint both
    # through it, against the closed form
    from scipy.integrate import solve_ivp

    def scipy_solve(f, y0, ts, args):
        sol = solve_ivp(lambda t, y: f(t, y.reshape(y0.shape), *args).ravel(), (ts[0], ts[-1]),
                        y0.ravel(), t_eval=ts, method="DOP853", rtol=1e-11, atol=1e-11)
        return sol.y.T.reshape((len(ts), *y0.shape))

    solver = ode.wrap_solver(scipy_solve, rtol=1e-11, atol=1e-11, host=True)
    k = torch.tensor([[0.7], [2.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0], [-0.5]], dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    c = torch.tensor([[[0.3], [1.0]], [[-1.0], [2.0]], [[0.5], [0.25]]], dtype=torch.float64)
    ys = solver(lambda t, y, k: -k * y, y0, ts, k)
    gk, gy0 = torch.autograd.grad((c * ys).sum(), (k, y0))
    rk, ry0 = _decay_oracle(k.detach().numpy(), y0.detach().numpy(), ts.numpy(), c.numpy())
    np.testing.assert_allclose(gk.numpy(), rk, rtol=1e-8)
    np.testing.assert_allclose(gy0.numpy(), ry0, rtol=1e-8)
    # forward mode cannot pass through NumPy calls: refused, naming the fix
    with pytest.raises(BacksolveUnsupportedError, match="host=False"):
        torch.func.jvp(lambda kk: solver(lambda t, y, k: -k * y, y0.detach(), ts, kk),
                       (k.detach(),), (torch.ones_like(k),))


def test_wrap_solver_framework_solver_and_its_drift_check():
    # a third-party solver written in the framework (fixed-step RK4), forwards and backwards
    def rk4(f, y0, ts, args, steps=200):
        ys, y = [y0], y0
        for t0, t1 in itertools.pairwise(ts):
            h = (t1 - t0) / steps
            t = t0
            for _ in range(steps):
                k1 = f(t, y, *args)
                k2 = f(t + h / 2, y + h / 2 * k1, *args)
                k3 = f(t + h / 2, y + h / 2 * k2, *args)
                k4 = f(t + h, y + h * k3, *args)
                y, t = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
            ys.append(y)
        return torch.stack(ys)

    solver = ode.wrap_solver(rk4, rtol=1e-9, atol=1e-9)
    k = torch.tensor([[0.7], [2.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0], [-0.5]], dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    c = torch.tensor([[[0.0], [0.0]], [[1.0], [1.0]]], dtype=torch.float64)
    gk, gy0 = torch.autograd.grad((c * solver(lambda t, y, k: -k * y, y0, ts, k)).sum(),
                                  (k, y0))
    rk, ry0 = _decay_oracle(k.detach().numpy(), y0.detach().numpy(), ts.numpy(), c.numpy())
    np.testing.assert_allclose(gk.numpy(), rk, rtol=1e-7)
    np.testing.assert_allclose(gy0.numpy(), ry0, rtol=1e-7)
    # forward mode: the wrapped solver's own forward-mode derivative, against the closed form
    _, jv = torch.func.jvp(lambda kk: solver(lambda t, y, k: -k * y, y0.detach(), ts, kk),
                           (k.detach(),), (torch.ones_like(k),))
    exact = -ts[-1] * torch.exp(-k.detach() * ts[-1]) * y0.detach()
    torch.testing.assert_close(jv[-1], exact, rtol=1e-7, atol=1e-10)
    # the same solver on a reverse-time-unstable problem: refused, as with the built-in one
    stiff = torch.tensor([[40.0]], dtype=torch.float64, requires_grad=True)
    ys = solver(lambda t, y, k: -k * y, torch.ones(1, 1, dtype=torch.float64), ts, stiff,
                on_failure="raise")
    with pytest.raises(ode.ODEFailureError, match="drifted"):
        torch.autograd.grad(ys[-1].sum(), stiff)


def test_fallback_to_checkpointing_gives_the_exact_gradient():
    # the reverse-time-unstable problem again: with fallback="checkpoint" the drift is caught
    # and the gradient is the exact one of the discrete solution (grad="direct" to rounding)
    k = torch.tensor([[40.0], [1.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    c = torch.tensor([[[0.0], [0.0]], [[1.0], [2.0]], [[-1.0], [0.5]]], dtype=torch.float64)
    st = AdjointStats()
    ys = backsolve(lambda t, y, k: -k * y, y0, ts, (k,), method="tsit5", rtol=1e-6, atol=1e-6,
                   dt0=None, max_steps=4096, on_failure="raise", full_output=False,
                   fallback="checkpoint", stats=st)
    got = torch.autograd.grad((c * ys).sum(), (k, y0))
    ref_ys = ode.odeint(lambda t, y, k: -k * y, y0, ts, k)
    ref = torch.autograd.grad((c * ref_ys).sum(), (k, y0))
    assert st.fallbacks == 1
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="backsolve' only"):
        ode.odeint(lambda t, y, k: -k * y, y0, ts, k, fallback="checkpoint")


def test_odeint_passes_seminorm_and_stats():
    # the public switches reach the adjoint: the same counts as the lower-level call
    k = torch.tensor([[0.7], [2.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    counts = {}
    for semi in (True, False):
        st = ode.AdjointStats()
        ys = ode.odeint(lambda t, y, k: -k * y, y0, ts, k, grad="backsolve", seminorm=semi,
                        adjoint_stats=st)
        torch.autograd.grad(ys[-1].sum(), k)
        assert st.nfe_backward > 0 and st.accepted > 0 and st.max_drift < 100.0
        counts[semi] = st.nfe_backward
    assert counts[True] <= counts[False]
    with pytest.raises(ValueError, match="seminorm= applies to grad='backsolve' only"):
        ode.odeint(lambda t, y, k: -k * y, y0, ts, k, seminorm=False)
