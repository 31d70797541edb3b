"""What a vector field reads from its closure (an `nn.Module`'s parameters, a captured tensor or
tracer) gets its derivative in every gradient mode, or the call is refused: the hand-written
rules of `grad="checkpoint"` and `"backsolve"` return cotangents for their inputs only, and
before `Backend.lift_closure` a closed-over parameter got a silently wrong (PyTorch autograd),
silently zero (`torch.func.grad` through backsolve) or crashing gradient. The oracle is
`grad="direct"` (autodiff through the steps, which sees any closure) and the closed form of
y' = -k y. Also: `jax.grad` of a jitted loss through the hand-written rules, and the default
mode's forward-only calls running one plain pass."""

from __future__ import annotations

import numpy as np
import pytest

import implicitdiff as idf
from implicitdiff import ode

MODES = ("checkpoint", "backsolve")


@pytest.mark.parametrize("mode", MODES)
def test_torch_module_closure_gets_the_direct_gradient(mode):
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 2)).double()
    y0 = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    c = torch.randn(3, 5, 2, dtype=torch.float64)
    grads = {}
    for m in ("direct", mode):
        net.zero_grad()
        ys = ode.odeint(lambda t, y: net(y), y0, ts, grad=m, rtol=1e-9, atol=1e-9)
        gy0, = torch.autograd.grad((c * ys).sum(), y0, retain_graph=True)
        (c * ys).sum().backward()
        grads[m] = [gy0] + [p.grad.clone() for p in net.parameters()]
    tol = 1e-10 if mode == "checkpoint" else 1e-5  # backsolve: tolerance-consistent
    for a, b in zip(grads[mode], grads["direct"]):
        assert float((a - b).norm() / b.norm()) <= tol


@pytest.mark.parametrize("mode", MODES)
def test_torch_func_grad_of_a_closed_over_rate(mode):
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")
    y0 = torch.ones(2, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    k = torch.tensor([[0.5], [2.0]], dtype=torch.float64)

    def loss(q):
        return ode.odeint(lambda t, y: -q * y, y0, ts, grad=mode, rtol=1e-10,
                          atol=1e-10)[-1].sum()

    torch.testing.assert_close(torch.func.grad(loss)(k), -torch.exp(-k), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_torch_closure_it_cannot_find_is_refused(mode):
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")

    class Hidden:  # no __dict__: the closure walk cannot look inside
        __slots__ = ("k",)

    box = Hidden()
    box.k = torch.tensor([[0.5], [2.0]], dtype=torch.float64, requires_grad=True)
    f = lambda t, y: -box.k * y  # noqa: E731
    y0 = torch.ones(2, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(idf.StructureError, match="not one of its arguments"):
        ode.odeint(f, y0, ts, grad=mode)

    def under_transform(q):  # a tensor torch.func.grad wraps, in the same hiding place
        hidden = Hidden()
        hidden.k = q
        return ode.odeint(lambda t, y: -hidden.k * y, y0, ts, grad=mode)[-1].sum()

    with pytest.raises(idf.StructureError, match="not one of its arguments"):
        torch.func.grad(under_transform)(box.k.detach())
    # without a derivative to take (no_grad), nothing is refused
    with torch.no_grad():
        ys = ode.odeint(f, y0, ts, grad=mode, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ys[-1], torch.exp(-box.k.detach()), rtol=1e-7, atol=0)
    # grad="direct" differentiates through whatever f reads
    ys = ode.odeint(f, y0, ts, grad="direct", rtol=1e-10, atol=1e-10)
    g, = torch.autograd.grad(ys[-1].sum(), box.k)
    torch.testing.assert_close(g, -torch.exp(-box.k.detach()), rtol=1e-7, atol=0)


def test_torch_checkpointed_step_closure():
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    h, n = 0.01, 50
    yN = ode.checkpointed(lambda k, y, args: y - h * a * torch.sin(y), y0, n)
    got = torch.autograd.grad(yN.sum(), (a, y0))
    y = y0
    for _ in range(n):
        y = y - h * a * torch.sin(y)
    want = torch.autograd.grad(y.sum(), (a, y0))
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
def test_jax_closed_over_tracer_and_grad_of_jit(mode):
    jax = pytest.importorskip("jax")
    pytest.importorskip("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    y0 = jnp.ones((2, 1))
    ts = jnp.array([0.0, 0.5, 1.0])
    k = jnp.array([[0.5], [2.0]])
    exact = -jnp.exp(-k)

    def closure_loss(q):  # the rate read from the closure, not passed as an argument
        return ode.odeint(lambda t, y: -q * y, y0, ts, grad=mode, rtol=1e-10, atol=1e-10,
                          max_steps=200)[-1].sum()

    @jax.jit
    def arg_loss(q):
        return ode.odeint(lambda t, y, q: -q * y, y0, ts, q, grad=mode, rtol=1e-10,
                          atol=1e-10, max_steps=200)[-1].sum()

    for grad_fn in (jax.grad(closure_loss), jax.jit(jax.grad(closure_loss)),
                    jax.grad(jax.jit(closure_loss)),  # grad of a jitted function: the rule's
                    jax.grad(arg_loss)):              # fwd/bwd traced after jit's trace ended
        np.testing.assert_allclose(np.asarray(grad_fn(k)), np.asarray(exact), rtol=1e-6)


def test_default_is_checkpoint_and_forward_only_calls_run_once():
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")
    calls = [0]

    def f(t, y, k):
        calls[0] += 1
        return -k * y

    y0 = torch.ones(3, 1, dtype=torch.float64)
    ts = torch.linspace(0.0, 5.0, 3, dtype=torch.float64)
    k = torch.tensor([[0.5], [2.0], [9.0]], dtype=torch.float64)
    counts = {}
    for label, kk, mode in (("no grad", k, None), ("direct", k.clone().requires_grad_(), "direct"),
                            ("default", k.clone().requires_grad_(), None)):
        calls[0] = 0
        kw = {} if mode is None else {"grad": mode}
        sol = ode.odeint(f, y0, ts, kk, rtol=1e-10, atol=1e-10, full_output=True, **kw)
        counts[label] = calls[0]
        if kk.requires_grad:
            g, = torch.autograd.grad(sol.ys[-1].sum(), kk)
            torch.testing.assert_close(g, -5.0 * torch.exp(-5.0 * k), rtol=1e-7, atol=1e-10)
    # more than MIN_CHECKPOINTS + 1 loop iterations: the default's forward pass with a
    # gradient to take runs the loop twice (count, then place the checkpoints); with none to
    # take, once, like "direct", plus lift_closure's one trial evaluation (grad mode is on: a
    # closed-over tensor could require grad)
    assert int(sol.stats.accepted.max()) > ode.MIN_CHECKPOINTS + 1
    assert counts["no grad"] == counts["direct"] + 1
    assert counts["default"] > 1.5 * counts["direct"]
    # NumPy (no autodiff): the default is one pass, like "direct"
    numpy_calls = []
    for kw in ({}, {"grad": "direct"}):
        calls[0] = 0
        ode.odeint(f, np.ones((3, 1)), np.linspace(0.0, 5.0, 3), k.numpy(), rtol=1e-10,
                   atol=1e-10, **kw)
        numpy_calls.append(calls[0])
    assert numpy_calls[0] == numpy_calls[1], numpy_calls
