"""The JAX backend against adversarial cases (issue 11, "no silently wrong derivative").

- Failures reach the caller as the library's own exception class: eagerly (a call, `jax.grad`,
  `jax.jvp`, `jax.vmap`, no `jit`) directly, and under `jit` through `idf.jax.catching`.
- The shape cache of host solvers is keyed on static arguments too.
- `idf.config.on_failure = "nan"` removes the failure callback from a jitted program.
- The user's arrays are not kept alive by JAX's caches after an eager call.
- Size-0 `x`, complex θ.

Oracles: closed forms and central finite differences, sharing no code with the library.
"""

from __future__ import annotations

import gc
import logging
import weakref

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("implicitdiff_jax")
import jax.numpy as jnp  # noqa: E402

import implicitdiff as idf  # noqa: E402
import implicitdiff_jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True)
def _quiet_callback_logs():
    # JAX logs the traceback of a callback that raised (the jit cases); the tests check the
    # exception, not the log.
    logger = logging.getLogger("jax")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def _M(n):
    return jnp.diag(jnp.arange(1.0, n + 1)) + 0.3 * jnp.triu(jnp.ones((n, n)), 1)


def _F_lin(x, t):
    return _M(x.shape[0]) @ x - t


@idf.custom_root(_F_lin, solve=idf.GMRES(maxiter=1, restart=1, rtol=1e-30))
def bwd_bad(t):
    """Forward right, backward linear solve cannot converge in one GMRES step."""
    return jnp.linalg.solve(_M(t.shape[0]), t)


@idf.custom_root(lambda x, t: x - t)
def fwd_bad(t):
    """The forward solver returns a point that is not a root."""
    return t + 1.0


T = jnp.arange(1.0, 5.0)
TB = jnp.stack([T, T + 1.0])


def _sum(f):
    return lambda s: jnp.sum(f(s))


EAGER = {
    "fwd call": (lambda: fwd_bad(T), idf.NonConvergenceError, "stopped far from the root"),
    "fwd grad": (lambda: jax.grad(_sum(fwd_bad))(T), idf.NonConvergenceError,
                 "stopped far from the root"),
    "fwd vmap": (lambda: jax.vmap(fwd_bad)(TB), idf.NonConvergenceError,
                 "stopped far from the root"),
    "fwd vmap grad": (lambda: jax.vmap(jax.grad(_sum(fwd_bad)))(TB), idf.NonConvergenceError,
                      "stopped far from the root"),
    "bwd grad": (lambda: jax.grad(_sum(bwd_bad))(T), idf.LinearSolveError, "vjp linear solve"),
    "bwd jvp": (lambda: jax.jvp(bwd_bad, (T,), (T,)), idf.LinearSolveError, "jvp linear solve"),
    "bwd vmap grad": (lambda: jax.vmap(jax.grad(_sum(bwd_bad)))(TB), idf.LinearSolveError,
                      "vjp linear solve"),
    "bwd grad of vmap": (lambda: jax.grad(lambda s: jnp.sum(jax.vmap(bwd_bad)(s)))(TB),
                         idf.LinearSolveError, "vjp linear solve"),
}

JITTED = {
    "fwd jit": (jax.jit(fwd_bad), T, idf.NonConvergenceError, "stopped far from the root"),
    "fwd jit grad": (jax.jit(jax.grad(_sum(fwd_bad))), T, idf.NonConvergenceError,
                     "stopped far from the root"),
    "fwd jit vmap": (jax.jit(jax.vmap(fwd_bad)), TB, idf.NonConvergenceError,
                     "stopped far from the root"),
    "bwd jit grad": (jax.jit(jax.grad(_sum(bwd_bad))), T, idf.LinearSolveError,
                     "vjp linear solve"),
    "bwd jit vmap grad": (jax.jit(jax.vmap(jax.grad(_sum(bwd_bad)))), TB, idf.LinearSolveError,
                          "vjp linear solve"),
}


@pytest.mark.parametrize("case", list(EAGER))
def test_eager_failures_raise_the_library_class(case):
    run, cls, msg = EAGER[case]
    with pytest.raises(cls, match=msg):
        jax.block_until_ready(run())


@pytest.mark.parametrize("case", list(EAGER))
def test_eager_failures_under_catching_are_unchanged(case):
    run, cls, msg = EAGER[case]
    with pytest.raises(cls, match=msg), implicitdiff_jax.catching():
        jax.block_until_ready(run())


@pytest.mark.parametrize("case", list(JITTED))
def test_jit_failures_without_catching_are_runtime_errors_with_the_message(case):
    f, arg, _, msg = JITTED[case]
    with pytest.raises(jax.errors.JaxRuntimeError, match=msg):
        jax.block_until_ready(f(arg))


@pytest.mark.parametrize("case", list(JITTED))
def test_jit_failures_under_catching_raise_the_library_class(case):
    f, arg, cls, msg = JITTED[case]
    with pytest.raises(cls, match=msg) as info, implicitdiff_jax.catching():
        jax.block_until_ready(f(arg))
    assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)
    assert str(info.value) in str(info.value.__cause__)  # the original message, whole

    wrapped = implicitdiff_jax.catching(f)  # the function form waits for the result itself
    with pytest.raises(cls, match=msg):
        wrapped(arg)


def test_catching_is_the_public_name_and_lets_other_errors_through():
    assert idf.jax.catching is implicitdiff_jax.catching
    assert implicitdiff_jax.catching.__doc__

    def other(x):
        jax.debug.callback(lambda _: (_ for _ in ()).throw(KeyError("not ours")), x)
        return x

    with pytest.raises(jax.errors.JaxRuntimeError, match="not ours"), \
            implicitdiff_jax.catching():
        jax.block_until_ready(jax.jit(other)(T))
    with pytest.raises(ValueError, match="plain"), implicitdiff_jax.catching():
        raise ValueError("plain")
    ok = implicitdiff_jax.catching(jax.jit(lambda t: 2 * t))
    np.testing.assert_allclose(ok(T), 2 * np.asarray(T))


def test_eager_vmap_warn_and_nan_per_element():
    @idf.custom_root(lambda x, t: x**3 + x - t, on_failure="warn")
    def cubic(t):
        x = t
        for _ in range(60):
            x = x - (x**3 + x - t) / (3 * x**2 + 1)
        return jnp.where(t > 5, x + 1.0, x)

    ts = jnp.array([1.0, 6.0])
    with pytest.warns(RuntimeWarning, match="stopped far"):
        jax.vmap(cubic)(ts)
    nan = idf.custom_root(lambda x, t: x**3 + x - t, on_failure="nan")(cubic.solver)
    out = jax.vmap(nan)(ts)
    assert np.isfinite(out[0]) and np.isnan(out[1])


# ---- host solvers: the result-shape cache and static arguments -------------------------------

def test_host_solver_shape_cache_is_keyed_on_static_arguments():
    def F(x, t, n):
        return x - jnp.full((n,), jnp.sum(t))

    @idf.custom_root(F)
    def host(t, n):
        return np.full((n,), np.sum(np.asarray(t)))  # NumPy: runs through pure_callback

    t = jnp.array([1.0, 2.0])
    assert host(t, 3).shape == (3,)
    # Before: the cached (3,) was reused for n=5 (a foreign TypeError inside jit).
    with pytest.raises(idf.StructureError, match="static arguments"):
        jax.jit(lambda t: host(t, 5))(t)
    assert host(t, 5).shape == (5,)  # a concrete call with n=5 teaches the shape
    out = jax.jit(lambda t: host(t, 5))(t)
    np.testing.assert_allclose(out, np.full(5, 3.0))
    g = jax.jit(jax.grad(lambda t: jnp.sum(host(t, 5))))(t)
    np.testing.assert_allclose(g, np.full(2, 5.0), rtol=1e-12)  # d/dt sum(full(5, t1+t2))
    out3 = jax.jit(lambda t: host(t, 3))(t)
    assert out3.shape == (3,)


def test_host_solver_shape_cache_with_static_leaves_inside_a_pytree():
    def F(x, t, cfg):
        return x - jnp.full((cfg["n"],), jnp.sum(t))

    @idf.custom_root(F)
    def host(t, cfg):
        return np.full((cfg["n"],), np.sum(np.asarray(t)))

    t = jnp.array([1.0, 2.0])
    assert host(t, {"n": 2}).shape == (2,)
    assert host(t, {"n": 4}).shape == (4,)
    assert jax.jit(lambda t: host(t, {"n": 2}))(t).shape == (2,)
    assert jax.jit(lambda t: host(t, {"n": 4}))(t).shape == (4,)
    with pytest.raises(idf.StructureError, match="static arguments"):
        jax.jit(lambda t: host(t, {"n": 7}))(t)


# ---- idf.config.on_failure -------------------------------------------------------------------

def _ridge():
    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.normal(size=(20, 5)))
    b = jnp.asarray(rng.normal(size=20))

    @idf.custom_root(lambda x, lam, A, b: A.T @ (A @ x - b) + lam * x, solve=idf.CG(),
                     tags={idf.symmetric, idf.positive_definite})
    def ridge(lam, A, b):
        return jnp.linalg.solve(A.T @ A + lam * jnp.eye(A.shape[1]), A.T @ b)

    return ridge, A, b


def _counts(g, x):
    jaxpr = str(jax.make_jaxpr(g)(x))
    hlo = jax.jit(g).lower(x).as_text()
    return jaxpr.count("implicitdiff_failure_check"), hlo.count("callback")


def test_config_nan_removes_the_failure_callback_from_the_jitted_program():
    ridge, A, b = _ridge()
    loss = lambda lam: jnp.sum(ridge(lam, A, b) ** 2)  # noqa: E731
    with idf.config.override(on_failure="raise"):
        checks, callbacks = _counts(jax.grad(loss), 0.1)
        assert checks >= 2 and callbacks >= 2  # forward residual + backward solve
    with idf.config.override(on_failure="nan"):
        assert _counts(jax.grad(loss), 0.1) == (0, 0)
        assert _counts(loss, 0.1) == (0, 0)
        g = jax.jit(jax.grad(loss))(0.1)
    with idf.config.override(on_failure="raise"):
        assert abs(float(g) - float(jax.jit(jax.grad(loss))(0.1))) < 1e-12


def test_config_is_read_at_call_time():
    @idf.custom_root(lambda x, t: x - t)
    def bad(t):
        return t + 1.0

    with idf.config.override(on_failure="nan"):
        assert np.all(np.isnan(jax.jit(bad)(T)))
        assert np.all(np.isnan(bad(T)))
    with pytest.raises(idf.NonConvergenceError):
        bad(T)


def test_explicit_on_failure_beats_the_config():
    @idf.custom_root(lambda x, t: x - t, on_failure="raise")
    def bad(t):
        return t + 1.0

    with idf.config.override(on_failure="nan"), pytest.raises(idf.NonConvergenceError):
        bad(T)


# ---- memory: eager calls do not keep the user's arrays ---------------------------------------

@pytest.mark.parametrize("mode", ["call", "grad", "vmap"])
def test_eager_calls_do_not_keep_the_arguments_alive(mode):
    ridge, A, b = _ridge()
    A, b = jnp.array(A), jnp.array(b)
    refs = weakref.ref(A), weakref.ref(b)
    if mode == "call":
        ridge(0.1, A, b)
    elif mode == "grad":
        jax.grad(lambda lam, A_, b_: jnp.sum(ridge(lam, A_, b_)))(0.1, A, b)
    else:
        jax.vmap(ridge, in_axes=(0, None, None))(jnp.array([0.1, 0.2]), A, b)
    del A, b
    gc.collect()
    # Before: JAX's closure_convert cache kept the closure holding every call's arguments.
    assert all(r() is None for r in refs)


# ---- size 0 and complex ----------------------------------------------------------------------

def test_size_zero_x():
    @idf.custom_root(lambda x, t: x - 2.0 * t)
    def twice(t):
        return 2.0 * t

    t0 = jnp.zeros((0,))
    assert twice(t0).shape == (0,)
    assert jax.grad(lambda t: jnp.sum(twice(t)))(t0).shape == (0,)
    assert jax.jit(jax.grad(lambda t: jnp.sum(twice(t))))(t0).shape == (0,)
    _, tan = jax.jvp(twice, (t0,), (t0,))
    assert tan.shape == (0,)


def _real_x_of_complex_t(t):  # x^3 + x = |t|^2 + Re(t^2), by Newton: the direct solve
    r = jnp.abs(t) ** 2 + jnp.real(t**2)
    x = jnp.ones_like(r)
    for _ in range(80):
        x = x - (x**3 + x - r) / (3 * x**2 + 1)
    return x


@idf.custom_root(lambda x, t: x**3 + x - (jnp.abs(t) ** 2 + jnp.real(t**2)), solve=idf.Dense())
def real_of_complex(t):
    return _real_x_of_complex_t(t)


def test_complex_theta_real_x_follows_the_jax_convention():
    # Not holomorphic in t. JAX's convention: the JVP is the R-linear derivative; the gradient
    # of a real loss L is dL/dRe(t) - i dL/dIm(t). Oracle: central differences of the direct
    # solve, in real and imaginary directions.
    t = jnp.array([1.0 + 2.0j, 0.3 - 1.0j])
    d = jnp.array([0.3 - 0.7j, -0.2 + 0.5j])
    w = jnp.array([0.7, -1.3])
    h = 1e-6

    def fd(direction):
        plus = _real_x_of_complex_t(t + h * direction)
        minus = _real_x_of_complex_t(t - h * direction)
        return (plus - minus) / (2 * h)

    _, tan = jax.jvp(real_of_complex, (t,), (d,))
    np.testing.assert_allclose(tan, fd(d), rtol=1e-8, atol=1e-9)
    expected = np.array([float(w @ fd(e)) - 1j * float(w @ fd(1j * e))
                         for e in np.eye(2, dtype=complex)])
    for g in (jax.grad(lambda s: w @ real_of_complex(s))(t),
              jax.jit(jax.grad(lambda s: w @ real_of_complex(s)))(t)):
        np.testing.assert_allclose(g, expected, rtol=1e-8, atol=1e-9)


def test_complex_x_is_refused_with_a_structure_error():
    @idf.custom_root(lambda x, t: x * x - t)
    def csqrt(t):
        return jnp.sqrt(t)

    t = jnp.array([1.0 + 2.0j])
    with pytest.raises(idf.StructureError, match="complex"):
        csqrt(t)
    with pytest.raises(idf.StructureError, match="complex"):
        jax.jit(jax.jvp, static_argnums=0)(csqrt, (t,), (t,))


def test_eager_transformed_calls_warn_once(monkeypatch):
    from implicitdiff_jax import _backend

    monkeypatch.setattr(_backend, "EAGER_WARN_AFTER", 3)
    monkeypatch.setattr(_backend, "_eager_warned", False)
    ridge, A, b = _ridge()
    grad = jax.grad(lambda lam: jnp.sum(ridge(lam, A, b)))
    jitted = jax.jit(grad)
    for _ in range(5):  # under jit: traced once, never counted
        jitted(0.1)
    ridge(0.1, A, b)  # no transform: not counted
    grad(0.1)
    grad(0.2)
    with pytest.warns(RuntimeWarning, match="outside jax.jit"):
        grad(0.3)
    grad(0.4)  # once per process: no second warning (warnings are errors in this suite)


# ---- argnums ---------------------------------------------------------------------------------

def test_implicit_vjp_negative_argnums_count_from_the_end():
    def F(x, a, b):
        return x - a * b

    a, b = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])
    x, ct = a * b, jnp.array([1.0, -2.0])
    # x = a*b: d<ct, x>/da = ct*b, d/db = ct*a. Before: argnums=(-1,) gave (None, None).
    ga, gb = idf.implicit_vjp(F, x, (a, b), ct, argnums=(-1,))
    assert ga is None
    np.testing.assert_allclose(gb, ct * a, rtol=1e-12)
    ga, gb = idf.implicit_vjp(F, x, (a, b), ct, argnums=(-2,))
    assert gb is None
    np.testing.assert_allclose(ga, ct * b, rtol=1e-12)
    for bad in [(2,), (-3,)]:
        with pytest.raises(idf.StructureError, match="argnums"):
            idf.implicit_vjp(F, x, (a, b), ct, argnums=bad)
