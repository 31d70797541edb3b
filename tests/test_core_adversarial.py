"""Adversarial cases of the core (issue 11, "no silently wrong derivative"), on every backend.

- the default forward residual check is scale-aware: relative to the size of F's terms near x*,
  entry by entry, each leaf with its own dtype's tolerance (a low-curvature problem stopped
  early and a proximal-gradient fixed point with a small step are refused; an exact but badly
  scaled solution is accepted; a float64 leaf is not judged by a float32 leaf's tolerance);
  explicit `residual_tol` stays absolute; `idf.diagnostics()` reports the relative residual
  and the derivative's error bound;
- `idf.diagnostics()` blocks in two threads running one compiled function get their own records;
- a kink of F at x* (relu, abs) is refused by the autodiff backends (one documented choice),
  with no false alarm on smooth, strongly nonlinear F in float64 and float32 (hypothesis);
- a solver returning a tuple or dict where F takes an array: `StructureError`;
- `idf.config.on_failure` reaches every decorator, read at call (trace) time;
- size-0 x: an empty derivative.

Oracles are closed forms and NumPy computations that share no code with the library.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conformance import Framework

import implicitdiff as idf

BACKENDS = ["numpy", "array_api_strict", "jax", "torch"]
AUTODIFF = ["jax", "torch"]


@pytest.fixture(params=BACKENDS, scope="module")
def fw(request) -> Framework:
    return Framework(request.param)


@pytest.fixture(params=AUTODIFF, scope="module")
def ad(request) -> Framework:
    return Framework(request.param)


def grad_sum(fw: Framework, fn, theta):
    """d sum(x*(θ)) / dθ, with the framework's own reverse mode (NumPy: idf.vjp)."""
    if fw.name == "jax":
        jax = fw.jax
        xp: Any = fw.xp
        return fw.numpy(jax.jit(jax.grad(lambda t: xp.sum(fn(t))))(theta))
    if fw.name == "torch":
        t = theta.detach().clone().requires_grad_()
        fn(t).sum().backward()
        return fw.numpy(t.grad)
    x, pullback = idf.vjp(fn, theta)
    return fw.numpy(pullback(fw.xp.ones_like(x))[0])


def refused(fw: Framework, match: str, call) -> str:
    """Run `call`, expecting the library's refusal; return its message."""
    with pytest.raises(fw.errors) as e:
        call()
    msg = str(e.value)
    assert match in msg, msg
    return msg


# ---- 1. the forward residual check in relative units ----------------------------------------

CURV = 1e-5  # a low-curvature problem: F = CURV * (x^3 + x - θ)
THETA = np.array([1.0, 2.0, 0.5])


def cubic_root(theta):
    x = np.cbrt(theta)
    for _ in range(60):
        x = x - (x**3 + x - theta) / (3 * x**2 + 1)
    return x


def low_curvature_fn(fw: Framework, rel_error: float, **kw):
    def F(x, theta):
        return CURV * (x**3 + x - theta)

    @idf.custom_root(F, **kw)
    def solve(theta):
        # Newton iterations in the framework (traceable), then a stop "early" by rel_error
        x = theta * 0 + 1.0
        for _ in range(60):
            x = x - (x**3 + x - theta) / (3 * x**2 + 1)
        return x * (1 + rel_error)

    return solve


def test_low_curvature_stopped_early_is_refused(fw):
    """max|F| = 8e-8 passes an absolute 1.5e-7, but x* is 2e-3 off (the gradient 0.15%)."""
    fn = low_curvature_fn(fw, 2e-3)
    msg = refused(fw, "relative", lambda: grad_sum(fw, fn, fw.asarray(THETA)))
    assert "stopped far from the root" in msg


def test_low_curvature_tight_is_accepted_and_correct(fw):
    fn = low_curvature_fn(fw, 0.0)
    g = grad_sum(fw, fn, fw.asarray(THETA))
    x = cubic_root(THETA)
    np.testing.assert_allclose(g, 1 / (3 * x**2 + 1), rtol=1e-9)


def test_explicit_residual_tol_stays_absolute(fw):
    """The user's residual_tol is an absolute bound on max|F|, as before: the stopped-early
    solution passes it, and the record says so (no relative residual)."""
    fn = low_curvature_fn(fw, 2e-3, residual_tol=1e-6)
    with idf.diagnostics() as d:
        fw.run(fn, fw.asarray(THETA))
        fw.sync()
    rec = d.forward[-1]
    assert rec.ok and rec.residual_tol == 1e-6 and rec.relative_residual is None
    assert rec.residual_norm < 1e-6


ETA, LAM1, LAM2 = 1e-6, 0.05, 0.1


def elastic_net_data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 5))
    y = rng.standard_normal(20)
    H = X.T @ X + LAM2 * np.eye(5)
    L = np.linalg.norm(H, 2)
    w = np.zeros(5)
    for _ in range(20000):  # proximal gradient with step 1/L, to full precision
        z = w - (H @ w - X.T @ y) / L
        w = np.sign(z) * np.maximum(np.abs(z) - LAM1 / L, 0)
    S = w != 0
    # d w / d λ2 on the support: H_SS dw_S = -w_S
    dw = np.zeros(5)
    dw[S] = -np.linalg.solve(H[np.ix_(S, S)], w[S])
    return X, y, w, dw


def elastic_net_fn(fw: Framework, w_returned):
    """The fixed point of a proximal-gradient step with a small step ETA: F = ETA * (gradient
    mapping) on the support, so max|F| is tiny however far w is from the solution."""
    X, y, _, _ = elastic_net_data()
    xp: Any = fw.xp
    Xa, ya = fw.asarray(X), fw.asarray(y)

    def F(w, lam2):
        z = w - ETA * (Xa.T @ (Xa @ w - ya) + lam2[0] * w)
        return w - xp.sign(z) * xp.maximum(xp.abs(z) - ETA * LAM1, 0.0)

    @idf.custom_root(F)
    def solve(lam2):
        return fw.asarray(w_returned) + 0 * lam2[0]

    return solve


def test_prox_gradient_small_step_loose_is_refused(fw):
    """w 0.8% off the solution (an sklearn fit at tol 1e-2) passes an absolute check
    (max|F| ~ 1e-8) with a 1% gradient error; relative to F's terms it is refused."""
    _, _, w, _ = elastic_net_data()
    fn = elastic_net_fn(fw, w * (1 + 8e-3 * np.array([1, -1, 1, -1, 1])))
    refused(fw, "relative", lambda: grad_sum(fw, fn, fw.asarray([LAM2])))


def test_prox_gradient_small_step_exact_is_accepted(ad):
    _, _, w, dw = elastic_net_data()
    fn = elastic_net_fn(ad, w)
    g = grad_sum(ad, fn, ad.asarray([LAM2]))
    np.testing.assert_allclose(g, [dw.sum()], rtol=1e-8)


SCALE = 3.5e10


def badly_scaled_data():
    rng = np.random.default_rng(3)
    M = 0.15 * rng.standard_normal((4, 4))
    theta = rng.standard_normal(4)
    return M, theta


def test_exact_badly_scaled_solution_is_accepted(fw):
    """Scalings near 3.5e10 (Sinkhorn's, with a small ε): the exact solution's residual is
    ~1e-5 in absolute terms (refused before) and 1e-16 relative to F's terms."""
    M, theta = badly_scaled_data()
    xp: Any = fw.xp
    Ma, eye = fw.asarray(M), fw.asarray(np.eye(4))

    def F(x, t):
        return x - (Ma @ x + SCALE * t)

    @idf.custom_root(F)
    def solve(t):
        return xp.linalg.solve(eye - Ma, (SCALE * t)[:, None])[:, 0]

    with idf.diagnostics() as d:
        g = grad_sum(fw, solve, fw.asarray(theta))
        fw.sync()
    want = SCALE * np.linalg.inv(np.eye(4) - M).sum(axis=0)
    np.testing.assert_allclose(g, want, rtol=1e-8)
    rec = d.forward[-1]
    assert rec.ok and rec.relative_residual is not None and rec.relative_residual < 1e-12


def test_mixed_dtype_leaves_each_use_their_own_tolerance(ad):
    """x = (float32 leaf, float64 leaf): the float64 leaf, 1e-4 off, was judged by the float32
    leaf's tolerance (3.5e-3) and passed with a 1.5e-4 gradient error; now by its own."""
    xp: Any = ad.xp
    b_exact = cubic_root(np.array([2.0]))

    def F(x, t):
        a, b = x
        return (a - xp.astype(t[:1], a.dtype), b**3 + b - t[1:])

    def make(err):
        @idf.custom_root(F)
        def solve(t):
            return (xp.astype(t[:1], xp.float32), ad.asarray(b_exact) * (1 + err) + 0 * t[1:])
        return solve

    def grad(fn):
        if ad.name == "jax":
            jax = ad.jax
            f = jax.jit(jax.grad(lambda t: xp.sum(xp.astype(fn(t)[0], xp.float64))
                                 + xp.sum(fn(t)[1])))
            return ad.numpy(f(ad.asarray([0.5, 2.0])))
        t = ad.asarray([0.5, 2.0]).requires_grad_()
        a, b = fn(t)
        (a.double().sum() + b.sum()).backward()
        return ad.numpy(t.grad)

    refused(ad, "relative", lambda: grad(make(1e-4)))
    g = grad(make(0.0))
    np.testing.assert_allclose(g, [1.0, (1 / (3 * b_exact**2 + 1))[0]], rtol=1e-10)


def test_diagnostics_report_the_derivative_error_bound(fw):
    """derivative_error_bound ≈ ||A⁻¹F(x*)||/||x*|| (+ the backward solve's residual): ~2e-3
    for x* 2e-3 off (let through by an explicit residual_tol), and at rounding level for the
    exact root; the actual gradient error is of its order (here ≤ 2x: the derivative
    1/(3x²+1) changes by 6x²/(3x²+1) times the relative change of x)."""
    x_exact = cubic_root(THETA)
    want = 1 / (3 * x_exact**2 + 1)
    for err, lo, hi in ((2e-3, 1e-3, 4e-3), (0.0, 0.0, 1e-12)):
        fn = low_curvature_fn(fw, err, residual_tol=1.0)
        with idf.diagnostics() as d:
            g = grad_sum(fw, fn, fw.asarray(THETA))
            fw.sync()
        bounds = [np.max(r.derivative_error_bound) for r in d.backward]
        assert bounds and all(lo <= b <= hi for b in bounds), bounds
        assert np.max(np.abs(g - want) / want) <= 2 * max(bounds) + 1e-12


# ---- 2. diagnostics in threads ------------------------------------------------------------------

def test_diagnostics_blocks_in_two_threads_get_their_own_records():
    """One function compiled inside a block in thread 0, then called in threads 0 and 1, each
    inside its own block: each block gets exactly its own five forward and backward records
    (thread 1's went to thread 0's block as well before)."""
    fwj = Framework("jax")
    jax, jnp = fwj.jax, cast(Any, fwj.xp)

    def F(x, t):
        return x - 0.5 * jnp.tanh(x) - t

    @idf.custom_root(F)
    def solve(t):
        x = t
        for _ in range(80):
            x = 0.5 * jnp.tanh(x) + t
        return x

    f = jax.jit(jax.grad(lambda t: jnp.sum(solve(t))))
    got: dict[int, tuple] = {}
    compiled, barrier = threading.Event(), threading.Barrier(2)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with idf.diagnostics() as d:
                if i == 0:
                    f(jnp.ones(3)).block_until_ready()
                    jax.effects_barrier()
                    d.forward.clear()
                    d.backward.clear()
                    compiled.set()
                else:
                    compiled.wait()
                barrier.wait()
                for _ in range(5):
                    f(jnp.ones(3) * (i + 2)).block_until_ready()
                jax.effects_barrier()
                barrier.wait()
            got[i] = (len(d.forward), len(d.backward),
                      {round(float(r.residual_norm), 20) for r in d.forward})
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert got[0][:2] == (5, 5) and got[1][:2] == (5, 5), got


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_diagnostics_eager_threads_get_their_own_records(name):
    fwk = Framework(name)
    xp: Any = fwk.xp

    def F(x, t):
        return x - 0.5 * xp.tanh(x) - t

    @idf.custom_root(F)
    def solve(t):
        x = t
        for _ in range(80):
            x = 0.5 * xp.tanh(x) + t
        return x

    got: dict[int, int] = {}
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        with idf.diagnostics() as d:
            barrier.wait()
            for _ in range(3 + i):
                grad_sum(fwk, solve, fwk.asarray(np.ones(3)))
            barrier.wait()
        got[i] = len(d.backward)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {0: 3, 1: 4}


# ---- 3. kinks at x* -----------------------------------------------------------------------------

def kink_fn(fw: Framework, kind: str, **kw):
    xp: Any = fw.xp

    def F(x, t):
        g = xp.maximum(x, 0 * x) if kind == "relu" else 0.5 * xp.abs(x)
        return x + g - t

    @idf.custom_root(F, **kw)
    def solve(t):
        # x* = 0 at t = 0 (the switch), θ/2 or θ (relu), θ/1.5 or 2θ (abs) on either side
        return 0 * t

    return solve


@pytest.mark.parametrize("kind", ["relu", "abs"])
def test_kink_at_root_is_refused(ad, kind):
    """F = x + relu(x) − θ at θ = 0: the one-sided derivatives are 1/2 and 1, autodiff gave 1
    (relu'(0) = 0) and the NumPy reference 2/3. With abs both sides differ from autodiff's 1
    and the central difference agrees with it: only the second difference sees it."""
    fn = kink_fn(ad, kind)
    theta = ad.asarray(np.array([0.0, 0.0, 0.0]))
    msg = refused(ad, "not differentiable at x*", lambda: grad_sum(ad, fn, theta))
    assert "kink" in msg and "kink_probe=False" in msg


@pytest.mark.parametrize("kind", ["relu", "abs"])
def test_kink_in_one_entry_is_refused(ad, kind):
    theta = ad.asarray(np.array([1.0, -2.0, 0.0, 0.5, 3.0]))  # x*_2 = 0 at the switch
    xp: Any = ad.xp

    @idf.custom_root(lambda x, t: x + (xp.maximum(x, 0 * x) if kind == "relu" else
                                       0.5 * xp.abs(x)) - t)
    def solve(t):
        return xp.where(t > 0, t / (2.0 if kind == "relu" else 1.5),
                        t / (1.0 if kind == "relu" else 0.5))

    refused(ad, "not differentiable at x*", lambda: grad_sum(ad, solve, theta))


def test_kink_off_the_root_is_not_refused(ad):
    """The same F away from the switch is smooth at x*: the derivative is 1/2 (x* > 0)."""
    xp: Any = ad.xp

    @idf.custom_root(lambda x, t: x + xp.maximum(x, 0 * x) - t)
    def solve(t):
        return t / 2

    g = grad_sum(ad, solve, ad.asarray(np.array([1.0, 0.3, 2.0])))
    np.testing.assert_allclose(g, 0.5, rtol=1e-12)


def test_kink_probe_second_step_only_where_the_first_is_beyond_tolerance(ad):
    """The probe's step 4h (two evaluations of F) only tells a kink from a smooth F where the
    step h shows a mismatch beyond tolerance: eagerly, a smooth F is evaluated three times by
    the probe (F(x*), F(x* ± hv)), a kink five times and refused; under `jax.jit` (values not
    known) both steps always run."""
    xp: Any = ad.xp
    calls = [0]

    def make(kink: bool):
        def F(x, t):
            calls[0] += 1
            return x + (xp.maximum(x, 0 * x) if kink else 0.5 * xp.tanh(x)) - t

        @idf.custom_root(F, solve=idf.Dense())
        def solve(t):
            return 0 * t if kink else t / 1.5    # x* = 0: the switch / tanh's linear part
        return solve

    theta = ad.asarray(np.zeros(3))
    counts = {}
    for kink in (False, True):
        calls[0] = 0
        if kink:
            refused(ad, "not differentiable at x*", lambda: grad_sum(ad, make(True), theta))
        else:
            np.testing.assert_allclose(grad_sum(ad, make(False), theta), 1 / 1.5, rtol=1e-9)
        counts[kink] = calls[0]
    # (the other evaluations of F, by the rule's own linearization, are the same in both)
    if ad.name == "torch":
        assert counts[True] - counts[False] == 2, counts


def test_kink_probe_policies(ad):
    theta = ad.asarray(np.zeros(3))
    # kink_probe=False: the framework's own choice, as before (maximum splits the tie: 2/3)
    g = grad_sum(ad, kink_fn(ad, "relu", kink_probe=False), theta)
    np.testing.assert_allclose(g, 2 / 3)
    # on_failure="nan": NaN gradient
    g = grad_sum(ad, kink_fn(ad, "relu", on_failure="nan"), theta)
    assert np.all(np.isnan(g))
    # on_failure="warn": the number, with a warning naming the kink
    if ad.name == "torch":  # (JAX warns from a host callback)
        with pytest.warns(RuntimeWarning, match="kink"):
            grad_sum(ad, kink_fn(ad, "relu", on_failure="warn"), theta)


def test_kink_probe_off_in_the_functional_rule(ad):
    """implicit_jvp's own switch."""
    xp: Any = ad.xp

    def F(x, t):
        return x + xp.maximum(x, 0 * x) - t

    x = ad.asarray(np.zeros(3))
    t = ad.asarray(np.zeros(3))
    with pytest.raises(idf.StructureError, match="kink"):
        idf.implicit_jvp(F, x, (t,), (ad.asarray(np.ones(3)),))
    x_dot = idf.implicit_jvp(F, x, (t,), (ad.asarray(np.ones(3)),), kink_probe=False)
    np.testing.assert_allclose(ad.numpy(x_dot), 2 / 3)


SMOOTH = ["tanh", "exp", "cubic", "softplus"]


def smooth_problem(kind: str, n: int, seed: int, strength: float):
    """A smooth, strongly nonlinear F at its root, in NumPy: (F written against xp, x*, θ)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n)) / np.sqrt(n)
    W = strength * W / max(np.linalg.norm(W, 2), 1e-12)

    def F(xp, x, t, Wa):
        if kind == "tanh":  # x = 0.9 tanh(W x + t) / ||W||: a contraction, curvature ~strength
            return x - 0.9 * xp.tanh(Wa @ x + t) / strength
        if kind == "exp":
            return xp.exp(strength * x) - 1 - t + 0.1 * (Wa @ x)
        if kind == "cubic":
            return strength * x**3 + x - t + 0.1 * (Wa @ x)
        return xp.log(1 + xp.exp(strength * x)) / strength + x - t

    t = rng.uniform(-1, 1, n)
    x = np.zeros(n)
    for _ in range(200):  # Newton on the NumPy F with a finite-difference-free Jacobian
        h = 1e-7
        r = F(np, x, t, W)
        J = np.stack([(F(np, x + h * e, t, W) - r) / h for e in np.eye(n)], axis=1)
        x = x - np.linalg.solve(J, r)
    for _ in range(5):
        r = F(np, x, t, W)
        J = np.stack([(F(np, x + 1e-6 * e, t, W) - F(np, x - 1e-6 * e, t, W)) / 2e-6
                      for e in np.eye(n)], axis=1)
        x = x - np.linalg.solve(J, r)
    return F, x, t, W


@settings(max_examples=12)
@given(kind=st.sampled_from(SMOOTH), n=st.integers(1, 6), seed=st.integers(0, 2**16),
       strength=st.floats(0.5, 8.0), dtype=st.sampled_from(["float64", "float32"]))
def test_no_kink_alarm_on_smooth_strongly_nonlinear_F(ad, kind, n, seed, strength, dtype):
    """Smooth F with curvature up to 8 on the scale of x* (tanh, exp, cubic, softplus), in
    float64 and float32: the probe never refuses."""
    F, x, t, W = smooth_problem(kind, n, seed, strength)
    if not np.all(np.isfinite(x)) or np.max(np.abs(F(np, x, t, W))) > 1e-10:
        return  # Newton did not converge on this draw: not a root to probe at
    xp: Any = ad.xp
    dt = getattr(xp, dtype)
    xa, ta, Wa = (xp.astype(ad.asarray(a), dt) for a in (x, t, W))

    def G(x_, t_):
        return F(xp, x_, t_, Wa)

    x_dot = idf.implicit_jvp(G, xa, (ta,), (xp.ones_like(ta),), solve=idf.Dense(),
                             on_failure="raise")
    assert np.all(np.isfinite(ad.numpy(x_dot)))


def test_singular_cubic_is_left_to_the_solve(ad):
    """F = (x − θ)^3: dF/dx = 0 at the root, and F's central difference departs from A v by
    h² v³ (all of it, A v being 0); that mismatch shrinks with the step, so it is no kink: the
    singular Jacobian is reported by the solve."""
    def F(x, t):
        return (x - t) ** 3

    x = ad.asarray(np.array([1.0, 2.0]))
    with pytest.raises(idf.SingularJacobianError):
        idf.implicit_jvp(F, x, (x,), (ad.asarray(np.ones(2)),), solve=idf.Dense())


# ---- 4. solver output structure ----------------------------------------------------------------

@pytest.mark.parametrize("shape", ["tuple", "dict"])
def test_solver_returning_a_container_for_an_array_F(fw, shape):
    xp: Any = fw.xp
    A = fw.asarray(2 * np.eye(3))

    def F(x, t):
        return A @ x - t

    @idf.custom_root(F)
    def solve(t):
        x = t / 2
        return (x, xp.sum(t)) if shape == "tuple" else {"x": x, "iterations": xp.sum(t)}

    with pytest.raises(idf.StructureError) as e:
        solve(fw.asarray(np.ones(3)))
    msg = str(e.value)
    assert "has_aux=True" in msg and "F does not take that structure" in msg
    assert ("a tuple of 2" if shape == "tuple" else "a dict with keys") in msg


def test_pytree_x_that_F_takes_is_unchanged(fw):
    """A tuple x that F does take: no error; the structure is probed on the first call only."""
    calls: list[int] = []

    def F(x, t):
        calls.append(1)
        return (x[0] - t, x[1] - 2 * t)

    @idf.custom_root(F)
    def solve(t):
        return (t * 1.0, 2 * t)

    counts = []
    for _ in range(3):
        before = len(calls)
        x = solve(fw.asarray(np.ones(2)))
        np.testing.assert_allclose(fw.numpy(x[1]), 2.0)
        counts.append(len(calls) - before)
    if fw.name != "jax":  # (JAX traces F a varying number of times)
        assert counts[0] == counts[1] + 1 and counts[1] == counts[2]


# ---- 5. idf.config.on_failure reaches every decorator -----------------------------------------

@pytest.mark.parametrize("name", ["numpy", "jax", "torch"])
def test_config_on_failure_reaches_decorators(name):
    fwk = Framework(name)

    def F(x, t):
        return x - t

    @idf.custom_root(F)
    def far(t):
        return t + 0.1

    @idf.custom_fixed_point(lambda x, t: t + 0 * x)
    def far_fp(t):
        return t + 0.1

    # (JAX reads the config when it traces: each run is a new jit of a new function)
    for fn in (far, far_fp):
        assert fn.on_failure == idf.config.on_failure
        with idf.config.override(on_failure="nan"):
            assert fn.on_failure == "nan"
            x = fwk.run(lambda t: fn(t), fwk.asarray(np.ones(3)))  # noqa: B023
            assert np.all(np.isnan(np.asarray(fwk.numpy(x), dtype=float)))
        with pytest.raises(fwk.errors):  # back to "raise"
            fwk.run(lambda t: fn(t), fwk.asarray(np.ones(3)))  # noqa: B023
    # an explicit on_failure wins over the config
    explicit = idf.custom_root(F, on_failure="raise")(lambda t: t + 0.1)
    with idf.config.override(on_failure="nan"), pytest.raises(fwk.errors):
        fwk.run(lambda t: explicit(t), fwk.asarray(np.ones(3)))


def test_config_on_failure_in_the_functional_rules():
    """implicit_jvp with on_failure=None takes the config (here: a failed linear solve)."""
    A = np.array([[1.0, 0.0], [0.0, 0.0]])  # singular

    def F(x, t):
        return A @ x - t

    with idf.config.override(on_failure="nan"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x_dot = idf.implicit_jvp(F, np.zeros(2), (np.zeros(2),), (np.ones(2),),
                                 solve=idf.GMRES(maxiter=5))
    assert np.all(np.isnan(np.asarray(x_dot)))


# ---- 6. size-0 x -------------------------------------------------------------------------------

def test_size_zero_x(fw):
    def F(x, t):
        return x - t

    @idf.custom_root(F)
    def solve(t):
        return t * 1.0

    theta = fw.asarray(np.zeros(0))
    g = grad_sum(fw, solve, theta)
    assert g.shape == (0,)
    _, x_dot = fw.run(lambda t, dt: idf.jvp(solve, (t,), (dt,)), theta, fw.asarray(np.zeros(0)))
    assert fw.numpy(x_dot).shape == (0,)


def test_size_zero_leaf_beside_others(fw):
    """One empty leaf in a tuple x: the other leaf's derivative is unchanged."""
    def F(x, t):
        return (x[0] - 2 * t, x[1] * 1.0)

    @idf.custom_root(F)
    def solve(t):
        return (2 * t, t[:0] * 1.0)

    x, pullback = fw.run(lambda t: idf.vjp(solve, t), fw.asarray(np.ones(3))) \
        if fw.name != "jax" else idf.vjp(solve, fw.asarray(np.ones(3)))
    xp: Any = fw.xp
    (g,) = pullback((xp.ones_like(x[0]), xp.ones_like(x[1])))
    np.testing.assert_allclose(fw.numpy(g), 2.0)


def test_math_inf_residual_tol_still_skips_F(fw):
    calls = []

    def F(x, t):
        calls.append(1)
        return x - t

    fn = idf.custom_root(F, residual_tol=math.inf)(lambda t: t * 1.0)
    fn(fw.asarray(np.ones(2)))
    assert calls == [] or fw.name == "jax"
