"""`odeint(..., grad="checkpoint")`: the forward pass's steps replayed by binomial
checkpointing. Its values and gradients must equal `grad="direct"` (the same discrete solution)
to rounding, in PyTorch and under `jax.jit`, batched and unbatched, and a failed sample keeps the
failure policy."""

from __future__ import annotations

import numpy as np
import pytest

from implicitdiff import ode


def test_torch_checkpoint_equals_direct():
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")
    g = torch.Generator().manual_seed(0)
    W = (0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()

    def f(t, y, W, b):
        return torch.tanh(y @ W.T + b) - 0.2 * y * torch.cos(t)

    ts = torch.tensor([0.0, 0.3, 0.7, 1.5], dtype=torch.float64)
    # a short solve (its states stored as the first pass computes them) and a long one (more
    # loop iterations than MIN_CHECKPOINTS + 1: the first pass, then a checkpointed replay)
    iterations = set()
    for y0, tol in ((torch.randn(6, 3, generator=g, dtype=torch.float64).requires_grad_(), 1e-7),
                    (torch.randn(3, generator=g, dtype=torch.float64).requires_grad_(), 1e-7),
                    (torch.randn(6, 3, generator=g, dtype=torch.float64).requires_grad_(), 1e-10)):
        c = torch.randn(4, *y0.shape, generator=g, dtype=torch.float64)
        out = {}
        for mode in ("direct", "checkpoint"):
            sol = ode.odeint(f, y0, ts, W, b, grad=mode, rtol=tol, atol=tol, full_output=True)
            ys = sol.ys
            iterations.add(int((sol.stats.accepted + sol.stats.rejected).max())
                           > ode.MIN_CHECKPOINTS + 1)
            out[mode] = (ys, torch.autograd.grad((c * ys).sum(), (y0, W, b)))
        torch.testing.assert_close(out["checkpoint"][0], out["direct"][0], rtol=0, atol=0)
        for x, y in zip(out["checkpoint"][1], out["direct"][1]):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert iterations == {True, False}  # both paths ran


def test_jax_checkpoint_equals_direct_under_jit():
    jax = pytest.importorskip("jax")
    pytest.importorskip("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    W = jnp.asarray(0.5 * rng.standard_normal((2, 2)))
    y0 = jnp.asarray(rng.standard_normal((5, 2)))
    ts = jnp.array([0.0, 0.5, 1.0])
    c = jnp.asarray(rng.standard_normal((3, 5, 2)))

    def loss(y0, W, mode):
        ys = ode.odeint(lambda t, y, W: jnp.tanh(y @ W.T), y0, ts, W, grad=mode,
                        max_steps=64)
        return jnp.sum(c * ys)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    for a, b in zip(grad(y0, W, "checkpoint"), grad(y0, W, "direct")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_checkpoint_keeps_the_failure_policy():
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")
    k = torch.tensor([[1.0], [1.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0], [np.nan]], dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ys = ode.odeint(lambda t, y, k: -k * y, y0, ts, k, grad="checkpoint", on_failure="nan")
    assert torch.isnan(ys[:, 1]).all() and torch.isfinite(ys[:, 0]).all()
    with pytest.raises(ode.ODEFailureError):
        ode.odeint(lambda t, y, k: -k * y, y0, ts, k, grad="checkpoint", on_failure="raise")


def test_checkpoint_replay_that_does_not_retrace_is_loud():
    # A vector field that is not a pure function (here: different after its first pass) would
    # make the replay take other steps than the forward pass: the samples whose replay did not
    # reach the first pass's outputs fail with status REPLAY_MISMATCH (raise, or NaN for those
    # samples only), never a silently different trajectory. A solve of more loop iterations
    # than the first pass keeps (MIN_CHECKPOINTS + 1) is replayed; a shorter one is not (its
    # states are stored as the first pass computes them): tolerances tight enough for ~40
    # steps here.
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")
    import implicitdiff as idf

    calls = {"n": 0, "first": None}

    def stiffer_later(t, y, k):
        calls["n"] += 1
        scale = 1.0 if calls["first"] is None or calls["n"] <= calls["first"] else 40.0
        return -scale * k * y

    k = torch.tensor([[1.0], [1.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ode.odeint(lambda t, y, k: -k * y, y0, ts, k, grad="direct")  # the pure field is fine
    tol = dict(rtol=1e-11, atol=1e-11)
    res = ode.integrate(stiffer_later, y0, ts, (k.detach(),), **tol)
    assert int(res.stats.accepted.max()) > ode.MIN_CHECKPOINTS + 1  # the two-pass path
    calls["first"] = int(res.stats.nfe.max())  # evaluations of one forward pass
    calls["n"] = 0
    with pytest.raises(ode.ODEFailureError, match="replay_mismatch"):
        ode.odeint(stiffer_later, y0, ts, k, grad="checkpoint", **tol)
    calls["n"] = 0
    with idf.config.override(on_failure="nan"):
        sol = ode.odeint(stiffer_later, y0, ts, k, grad="checkpoint", full_output=True, **tol)
    assert (sol.stats.status == ode.REPLAY_MISMATCH).all()
    assert torch.isnan(sol.ys[-1]).all()


@pytest.mark.parametrize("mode", ["checkpoint", "backsolve"])
def test_jax_forward_mode_is_refused_by_name_reverse_and_hessian_still_work(mode):
    # JAX's custom_vjp cannot carry a forward-mode rule: jvp, jacfwd (also under jit and
    # vmap) are refused up front with the typed error naming grad="direct" (JAX's own
    # TypeError comes late, at lowering, under jit); grad and jax.hessian (forward over
    # reverse) are unaffected, and equal grad="direct"'s.
    jax = pytest.importorskip("jax")
    pytest.importorskip("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    ts = jnp.array([0.0, 0.5, 1.0])
    y0 = jnp.array([1.0, -0.5])

    def final(k, grad=mode):
        return ode.odeint(lambda t, y, k: -k * y, y0, ts, k, grad=grad, rtol=1e-9,
                          atol=1e-9)[-1]

    k = jnp.array([0.3, 0.7])
    attempts = {
        "jvp": lambda: jax.jvp(final, (k,), (k,)),
        "jit(jvp)": lambda: jax.jit(lambda q: jax.jvp(final, (q,), (q,)))(k),
        "jacfwd": lambda: jax.jacfwd(final)(k),
        "jvp(vmap)": lambda: jax.jvp(jax.vmap(final), (k[:, None] * jnp.ones(2),),
                                     (jnp.ones((2, 2)),)),
        "vmap(jvp)": lambda: jax.vmap(lambda q: jax.jvp(final, (q,), (q,)))(
            jnp.stack([k, 2 * k])),
    }
    for name, attempt in attempts.items():
        with pytest.raises(ode.DerivativeNotSupportedError, match="grad='direct'"):
            attempt()
            pytest.fail(f"{name} was not refused")
    loss = lambda q, grad=mode: jnp.sum(final(q, grad) ** 2)  # noqa: E731
    exact = -2 * jnp.exp(-2 * k) * y0 ** 2  # d/dk of (y0 e^{-k})^2
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(k)), np.asarray(exact), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss))(k)), np.asarray(exact),
                               rtol=1e-6)
    if mode == "checkpoint":  # the backsolve adjoint is not differentiable again
        np.testing.assert_allclose(np.asarray(jax.hessian(loss)(k)),
                                   np.asarray(jax.hessian(lambda q: loss(q, "direct"))(k)),
                                   rtol=1e-10, atol=1e-14)
