"""JAX: `on_failure="raise"` (the default) stays loud under every compiled transform, and costs
no fast dispatch.

The failure check declares no JAX effect (any effect takes `jax.jit`'s executable off the C++
fast dispatch path); what keeps it in the program is its own DCE rule and the side-effect flag of
its callback in XLA. These tests check both halves: a failed check raises wherever the checked
value is used (jit, grad, jvp, vmap, remat, scan, while, cond, nested jit, AOT compilation), and a
passing program has no effects and is dispatched without Python's `ExecuteReplicated`.

Oracles: the closed form dx/dt = 1 / (3x² + 1) of x³ + x = t, and the ridge closed form.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("implicitdiff_jax")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import implicitdiff as idf  # noqa: E402

jax.config.update("jax_enable_x64", True)


def F(x, t):
    return x**3 + x - t


def newton(t, steps):
    x = jnp.zeros_like(t)
    for _ in range(steps):
        x = x - (x**3 + x - t) / (3 * x**2 + 1)
    return x


good = idf.custom_root(F)(lambda t: newton(t, 40))
bad = idf.custom_root(F)(lambda t: newton(t, 1))  # one Newton step: far from the root


def closed_form(t):
    x = np.asarray(newton(jnp.asarray(t), 60))
    return 1.0 / (3 * x**2 + 1)


def loss(solver):
    return lambda t: jnp.sum(solver(t) ** 2)


T = jnp.asarray(1.5)
TS = jnp.asarray([0.5, 1.5, 2.5])

# Each transform of a solver, compiled: the checked value is used in every one of them.
TRANSFORMS = {
    "jit": lambda s: jax.jit(s),
    "jit(grad)": lambda s: jax.jit(jax.grad(s)),
    "jit(jvp)": lambda s: jax.jit(lambda t: jax.jvp(s, (t,), (jnp.ones_like(t),))[1]),
    "jit(vmap(grad))": lambda s: (lambda t: jax.jit(jax.vmap(jax.grad(s)))(jnp.stack([t, t]))),
    "jit(grad(checkpoint))": lambda s: jax.jit(jax.grad(jax.checkpoint(s))),
    "jit(grad(scan))": lambda s: jax.jit(jax.grad(
        lambda t: lax.scan(lambda c, _: (c + s(t), None), 0.0 * t, None, length=3)[0])),
    "jit(while)": lambda s: jax.jit(
        lambda t: lax.fori_loop(0, jnp.asarray(2), lambda i, c: c + s(t), 0.0 * t)),
    "jit(cond)": lambda s: jax.jit(lambda t: lax.cond(t > 0, s, lambda t: t, t)),
    "jit(grad(jit))": lambda s: jax.jit(jax.grad(jax.jit(s))),
    "AOT compiled grad": lambda s: (lambda t: jax.jit(jax.grad(s)).lower(t).compile()(t)),
}


@pytest.mark.parametrize("name", [n for n in TRANSFORMS if n != "jit"])  # jit: test_jax
def test_a_failed_forward_check_raises_under(name):
    f = TRANSFORMS[name](bad)
    with pytest.raises(idf.NonConvergenceError, match="stopped far from the root"):
        idf.jax.catching(f)(T)


@pytest.mark.parametrize("name", ["jit(vmap(grad))", "jit(grad(scan))"])
def test_the_same_programs_are_right_when_the_solve_converged(name):
    f = TRANSFORMS[name](good)
    out = np.asarray(jax.block_until_ready(f(T)))
    want = {"jit(grad(scan))": 3 * closed_form(1.5)}.get(name, closed_form(1.5))
    np.testing.assert_allclose(out, want, rtol=1e-12)


def _ridge(solve):
    rng = np.random.default_rng(0)
    A, b = jnp.asarray(rng.normal(size=(20, 5))), jnp.asarray(rng.normal(size=20))

    @idf.custom_root(lambda x, lam, A, b: A.T @ (A @ x - b) + lam * x, solve=solve,
                     tags={idf.symmetric, idf.positive_definite})
    def ridge(lam, A, b):
        return jnp.linalg.solve(A.T @ A + lam * jnp.eye(A.shape[1]), A.T @ b)

    return (lambda lam: ridge(lam, A, b)), A, b


@pytest.mark.parametrize("name", ["jit(grad)", "jit(jvp)"])
def test_a_failed_backward_solve_raises_under(name):
    ridge, _, _ = _ridge(idf.CG(maxiter=1))  # one CG step cannot solve a 5x5 system
    f = TRANSFORMS[name](lambda lam: jnp.sum(ridge(lam) ** 2))
    with pytest.raises(idf.LinearSolveError, match="did not converge"):
        idf.jax.catching(f)(jnp.asarray(0.1))


def test_warn_under_jit_still_warns_and_returns_the_value():
    warn = idf.custom_root(F, on_failure="warn")(lambda t: newton(t, 1))
    with pytest.warns(RuntimeWarning, match="stopped far from the root"):
        out = jax.block_until_ready(jax.jit(warn)(T))
    np.testing.assert_allclose(out, newton(T, 1), rtol=1e-15)  # as computed, not NaN


def test_a_passing_program_has_no_effects_but_keeps_its_checks():
    # No effect in the jaxpr (any effect disables jax.jit's C++ dispatch); the checks are
    # still there, and their callbacks still in the compiled program.
    g = jax.grad(loss(good))
    jaxpr = jax.make_jaxpr(g)(T)
    assert not jaxpr.effects
    assert str(jaxpr).count("implicitdiff_failure_check") >= 2  # forward + backward solve
    ridge, _, _ = _ridge(idf.CG())
    g2 = jax.grad(lambda lam: jnp.sum(ridge(lam) ** 2))
    assert not jax.make_jaxpr(g2)(0.1).effects
    assert jax.jit(g2).lower(0.1).as_text().count("callback") >= 2


def test_jit_dispatches_a_checked_program_on_the_fast_path(monkeypatch):
    # The Python dispatch path of a jitted call goes through ExecuteReplicated.__call__; the
    # C++ fast path does not. A program with an effect (here a debug callback of the user's)
    # takes the Python path on every call, the checked implicitdiff program only on its first.
    pxla = pytest.importorskip("jax._src.interpreters.pxla")
    cls = getattr(pxla, "ExecuteReplicated", None)
    if cls is None:
        pytest.skip("this JAX has no ExecuteReplicated")
    calls = []
    orig = cls.__call__

    def counted(self, *args):
        calls.append(1)
        return orig(self, *args)

    monkeypatch.setattr(cls, "__call__", counted)

    def run(f):
        for _ in range(3):
            jax.block_until_ready(f(T))  # compile, and the first calls fill the C++ cache
        calls.clear()
        for _ in range(5):
            jax.block_until_ready(f(T))
        return len(calls)

    def with_effect(t):
        jax.debug.callback(lambda *_: None, t)
        return 2 * t

    assert run(jax.jit(with_effect)) == 5  # the probe sees the Python path
    g = jax.jit(jax.grad(good))
    assert run(g) == 0
    np.testing.assert_allclose(g(T), closed_form(1.5), rtol=1e-12)  # and it is right


def test_a_failure_in_a_loop_never_waited_on_surfaces_when_the_result_is_read():
    # A training loop that feeds each result into the next call and blocks only at the end:
    # the failed call's error travels with its output into the later calls.
    step = jax.jit(lambda t, k: lax.cond(k == 3, lambda t: t - 0.01 * jax.grad(bad)(t),
                                         lambda t: t - 0.01 * jax.grad(good)(t), t))
    t = T
    with pytest.raises(idf.NonConvergenceError, match="stopped far from the root"):
        with idf.jax.catching():
            for k in range(6):
                t = step(t, k)
            float(t)


def test_a_failure_on_the_fast_path_is_caught_as_the_library_error():
    # The first calls of a jitted function take the Python path (JaxRuntimeError); later ones
    # jit's C++ fast path, which reports a failed callback as a ValueError. `catching` maps both.
    def solver(t):
        return jnp.where(t > 5, newton(t, 1), newton(t, 40))  # wrong for t > 5

    g = jax.jit(jax.grad(idf.custom_root(F)(solver)))
    for _ in range(3):
        np.testing.assert_allclose(g(T), closed_form(1.5), rtol=1e-12)
    with pytest.raises(idf.NonConvergenceError, match="stopped far from the root"):
        idf.jax.catching(g)(jnp.asarray(6.0))
