"""The forward solvers of `implicitdiff.solvers` (fixed-point iteration, Anderson, Broyden,
Newton) on NumPy, JAX (under `jit` and `vmap`) and PyTorch.

Problems are drawn well-posed: contractions $z = \\tanh(Wz + Ux)$ with $\\|W\\|_2 < 1$, and
non-contractive maps $z = 2\\tanh(Wz) + b$ with a known root $z^*$ at which fixed-point iteration
is unstable ($\\rho(\\partial T) > 1$) while the Jacobian of $T - z$ is well conditioned.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest

import implicitdiff as idf
from implicitdiff.solvers import (
    SolverResult,
    anderson,
    broyden,
    fixed_point_iteration,
    newton,
)

FRAMEWORKS = ["numpy", "jax", "torch"]


# ---- frameworks ---------------------------------------------------------------------------------

class Framework:
    """Arrays in, NumPy out, and `run` (under `jax.jit` for JAX, `torch.no_grad` for torch)."""

    def __init__(self, name: str):
        self.name = name
        if name == "jax":
            jax = pytest.importorskip("jax")
            pytest.importorskip("implicitdiff_jax")
            jax.config.update("jax_enable_x64", True)
            self.jax = jax
        elif name == "torch":
            self.torch = pytest.importorskip("torch")
            pytest.importorskip("implicitdiff_torch")

    def asarray(self, a: np.ndarray):
        if self.name == "jax":
            return self.jax.numpy.asarray(a)
        if self.name == "torch":
            return self.torch.from_numpy(np.ascontiguousarray(a))
        return a

    def run(self, solver, fun, z0, *args, **kw) -> SolverResult:
        args = tuple(self.asarray(a) for a in args)
        z0 = self.asarray(z0)
        if self.name == "jax":
            out = self.jax.jit(lambda z, *a: solver(fun, z, *a, **kw))(z0, *args)
        elif self.name == "torch":
            with self.torch.no_grad():
                out = solver(fun, z0, *args, **kw)
        else:
            out = solver(fun, z0, *args, **kw)
        return SolverResult(*(np.asarray(o) for o in out))


@pytest.fixture(params=FRAMEWORKS)
def fw(request) -> Framework:
    return Framework(request.param)


def _xp(z):
    return idf.get_backend(z).namespace(z)


# ---- problems -----------------------------------------------------------------------------------

def tanh_layer(z, W, U, x):
    """$T(z) = \\tanh(W z + U x)$, row by row."""
    return _xp(z).tanh(z @ W.T + x @ U.T)


def tanh_residual(z, W, U, x):
    return tanh_layer(z, W, U, x) - z


def contraction(seed: int, n: int = 12, batch: tuple = (4,), rho: float = 0.9):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W *= rho / np.linalg.norm(W, 2)
    U = rng.standard_normal((n, 3))
    x = rng.standard_normal((*batch, 3))
    return np.zeros((*batch, n)), W, U, x


def reference_fixed_point(W, U, x):
    z = np.zeros((*x.shape[:-1], W.shape[0]))
    for _ in range(2000):
        z = np.tanh(z @ W.T + x @ U.T)
    return z


def unstable_map(z, W, b):
    """$T(z) = b - 3 W^\\top \\tanh(Wz)$: $z - T(z)$ is the gradient of the strictly convex
    $\\frac12\\|z\\|^2 + 3\\sum \\log\\cosh(Wz) - b^\\top z$, so the root is unique; the Jacobian
    of $T$, $-3 W^\\top D W$, has eigenvalues down to about $-3$ near 0: fixed-point iteration
    oscillates away from the root."""
    return b - 3 * (_xp(z).tanh(z @ W.T) @ W)


def unstable_problem(seed: int, n: int = 8, batch: int = 3):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W /= np.linalg.norm(W, 2)
    zstar = 0.1 * rng.standard_normal((batch, n))
    b = zstar + 3 * (np.tanh(zstar @ W.T) @ W)
    return zstar, W, b


SOLVERS = {
    "fixed_point_iteration": (fixed_point_iteration, tanh_layer, {}),
    "anderson": (anderson, tanh_layer, {}),
    "broyden": (broyden, tanh_layer, {}),
    "newton": (newton, tanh_residual, {}),
    "newton-gmres": (newton, tanh_residual, {"solve": idf.GMRES(rtol=1e-10)}),
    "newton-fixed-point": (newton, tanh_layer, {"fixed_point": True}),
}


def true_residual(fun, value, *args, fixed_point=True):
    r = fun(value, *args)
    return np.linalg.norm(r - value if fixed_point else r, axis=-1)


# ---- convergence --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SOLVERS))
def test_contraction_converges(fw, name):
    solver, fun, kw = SOLVERS[name]
    z0, W, U, x = contraction(0)
    tol = 1e-10
    res = fw.run(solver, fun, z0, W, U, x, tol=tol, maxiter=300, **kw)
    assert res.value.shape == z0.shape
    assert res.converged.shape == res.steps.shape == res.residual_norm.shape == (4,)
    assert res.converged.all(), res
    assert res.steps.dtype == np.int32 and (res.steps > 0).all()
    # the reported residual is the true one, and within tolerance
    r = true_residual(tanh_layer, res.value, W, U, x)
    np.testing.assert_allclose(res.residual_norm, r, rtol=1e-6, atol=1e-15)
    root = fun is tanh_residual
    scale = np.linalg.norm(tanh_residual(z0, W, U, x) if root else
                           tanh_layer(res.value, W, U, x), axis=-1)
    assert (r <= tol * scale * (1 + 1e-6)).all()
    np.testing.assert_allclose(res.relative_residual, r / scale, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(res.value, reference_fixed_point(W, U, x), atol=1e-8)
    if fw.name != "numpy":  # the frameworks agree with NumPy, step for step
        ref = solver(fun, z0, W, U, x, tol=tol, maxiter=300, **kw)
        np.testing.assert_allclose(res.value, ref.value, atol=1e-12)
        assert np.abs(res.steps.astype(int) - ref.steps).max() <= 1
        np.testing.assert_array_equal(res.converged, ref.converged)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_traces(name):
    solver, fun, kw = SOLVERS[name]
    z0, W, U, x = contraction(1)
    maxiter = 60
    res = solver(fun, z0, W, U, x, tol=1e-10, maxiter=maxiter, **kw)
    assert res.trace.shape == res.relative_trace.shape == (4, maxiter)
    for i in range(4):
        k = int(res.steps[i])
        assert np.isfinite(res.trace[i, :k]).all() and np.isnan(res.trace[i, k:]).all()
        assert np.isfinite(res.relative_trace[i, :k]).all()
        assert np.isnan(res.relative_trace[i, k:]).all()
        assert res.trace[i, k - 1] == res.residual_norm[i]
        assert res.relative_trace[i, k - 1] == res.relative_residual[i]


def test_damping_and_anderson_faster_than_plain():
    z0, W, U, x = contraction(2, rho=0.95)
    plain = fixed_point_iteration(tanh_layer, z0, W, U, x, tol=1e-10, maxiter=1000)
    damped = fixed_point_iteration(tanh_layer, z0, W, U, x, tol=1e-10, maxiter=1000,
                                   damping=0.8)
    # accelerating from the first step (this map contracts by 0.1-0.5 a step: by default
    # Anderson would take plain steps for most of the batch)
    acc = anderson(tanh_layer, z0, W, U, x, tol=1e-10, maxiter=1000, plain_rate=0)
    assert plain.converged.all() and damped.converged.all() and acc.converged.all()
    assert (acc.steps < plain.steps).all()


def test_anderson_takes_plain_steps_while_the_iteration_contracts_fast(fw):
    """An element whose every step shrinks its residual by at least `plain_rate` never
    accelerates: its iterates are those of the fixed-point iteration, exactly (the eager loop
    skips the least-squares step; traced, a zero history gives gamma = 0). Here the whole batch
    (the map contracts by at most 0.3 a step)."""
    rng = np.random.default_rng(3)
    n = 12
    W = rng.standard_normal((n, n))
    W *= 0.3 / np.linalg.norm(W, 2)
    b = rng.standard_normal((5, n))
    c = np.full((5, 1), 1.0)
    z0 = np.zeros((5, n))
    plain = fw.run(fixed_point_iteration, graded_map, z0, W, c, b, tol=1e-12, maxiter=200)
    ratios = plain.trace[:, 1:] / plain.trace[:, :-1]
    assert np.nanmax(ratios) < 0.5 and plain.converged.all()
    res = fw.run(anderson, graded_map, z0, W, c, b, tol=1e-12, maxiter=200)
    np.testing.assert_array_equal(res.steps, plain.steps)
    np.testing.assert_array_equal(res.value, plain.value)
    np.testing.assert_array_equal(res.trace, plain.trace)
    # accelerating from the start takes fewer steps, other iterates
    acc = fw.run(anderson, graded_map, z0, W, c, b, tol=1e-12, maxiter=200, plain_rate=0)
    assert acc.converged.all() and (acc.steps < plain.steps).all()


@pytest.mark.parametrize("plain_rate", [0.0, 0.5, 0.95])
def test_anderson_switching_per_element_matches_each_alone(fw, plain_rate):
    """Each element switches to accelerated steps at its own first slow step (contraction
    factors 0.05 to 0.97: some never switch, some at once): every element's steps and value
    are those of its unbatched solve, and a slow element still converges in fewer steps than
    the plain iteration."""
    z0, W, c, b = graded_problem()
    res = fw.run(anderson, graded_map, z0, W, c, b, tol=1e-10, maxiter=400,
                 plain_rate=plain_rate)
    assert res.converged.all()
    for i in range(4):
        one = fw.run(anderson, graded_map, z0[i:i + 1], W, c[i:i + 1], b[i:i + 1], tol=1e-10,
                     maxiter=400, plain_rate=plain_rate)
        np.testing.assert_array_equal(one.steps, res.steps[i:i + 1])
        np.testing.assert_allclose(one.value, res.value[i:i + 1], rtol=0, atol=1e-12)
    plain = fw.run(fixed_point_iteration, graded_map, z0, W, c, b, tol=1e-10, maxiter=400)
    if plain_rate < 0.9:
        assert res.steps[3] < plain.steps[3]  # c = 0.97: accelerated


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True])
def test_anderson_rejects_a_plain_rate_outside_0_1(bad):
    z0, W, c, b = graded_problem()
    with pytest.raises(ValueError, match="plain_rate"):
        anderson(graded_map, z0, W, c, b, plain_rate=bad)


# ---- non-contractive problems -------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["broyden", "newton", "newton-autodiff"])
def test_non_contractive_root(fw, name, seed):
    zstar, W, b = unstable_problem(seed)
    z0 = np.zeros_like(zstar)
    if name == "broyden":
        res = fw.run(broyden, unstable_map, z0, W, b, tol=1e-12, maxiter=200)
    else:
        if name == "newton-autodiff" and fw.name == "numpy":
            pytest.skip("NumPy arrays have no forward-mode autodiff")
        kw = {"jvp": "autodiff"} if name == "newton-autodiff" else {}
        res = fw.run(newton, unstable_map, z0, W, b, fixed_point=True, tol=1e-12, **kw)
    assert res.converged.all(), res
    np.testing.assert_allclose(res.value, zstar, atol=1e-9)
    # fixed-point iteration diverges from the same start (and says so)
    fpi = fw.run(fixed_point_iteration, unstable_map, z0, W, b, tol=1e-12, maxiter=200)
    assert not fpi.converged.any()
    assert np.isfinite(fpi.value).all()


def test_newton_root_of_nonlinear_system():
    # z0^2 + z1^2 = 4, z0 = z1  ->  root (sqrt 2, sqrt 2); batch of starting points
    def F(z, c):
        xp = _xp(z)
        return xp.stack([z[..., 0] ** 2 + z[..., 1] ** 2 - c, z[..., 0] - z[..., 1]], axis=-1)

    z0 = np.array([[1.0, 0.5], [10.0, 3.0], [0.3, 2.0]])
    res = newton(F, z0, 4.0, tol=1e-14)
    assert res.converged.all()
    np.testing.assert_allclose(res.value, np.sqrt(2.0), rtol=1e-12)


def test_broyden_root_mode():
    # F(z) = z^3 + z - c, elementwise: Jacobian 3z^2 + 1 >= 1, so h0 = +1 fits
    def F(z, c):
        return z ** 3 + z - c

    c = np.array([[0.5, 1.0, 2.0], [-1.0, 3.0, 0.1]])
    res = broyden(F, np.zeros_like(c), c, fixed_point=False, h0=1.0, tol=1e-12)
    assert res.converged.all(), res
    np.testing.assert_allclose(F(res.value, c), 0.0, atol=1e-11)
    np.testing.assert_allclose(res.relative_residual,
                               np.linalg.norm(F(res.value, c), axis=-1)
                               / np.linalg.norm(c, axis=-1), rtol=1e-6)


# ---- batches: per-sample stopping ---------------------------------------------------------------

def graded_map(z, W, c, b):
    """$T(z) = c \\tanh(Wz) + b$ with a per-sample contraction factor c."""
    return c * _xp(z).tanh(z @ W.T) + b


def graded_problem(n: int = 10):
    rng = np.random.default_rng(5)
    W = rng.standard_normal((n, n))
    W /= np.linalg.norm(W, 2)
    c = np.array([[0.05], [0.5], [0.9], [0.97]])
    b = rng.standard_normal((4, n))
    return np.zeros((4, n)), W, c, b


@pytest.mark.parametrize("name", ["fixed_point_iteration", "anderson", "broyden", "newton"])
def test_per_sample_stopping(fw, name):
    solver = SOLVERS[name][0]
    kw = {"fixed_point": True} if name == "newton" else {}
    z0, W, c, b = graded_problem()
    res = fw.run(solver, graded_map, z0, W, c, b, tol=1e-10, maxiter=400, **kw)
    assert res.converged.all()
    if name != "newton":
        assert len(set(res.steps.tolist())) >= 3, res.steps
        assert res.steps[0] < res.steps[-1]
    # a converged element is frozen: more iterations for the others do not move it ...
    longer = fw.run(solver, graded_map, z0, W, c, b, tol=1e-10, maxiter=800, **kw)
    np.testing.assert_array_equal(longer.value, res.value)
    np.testing.assert_array_equal(longer.steps, res.steps)
    # ... and its value is the one of an unbatched solve of that element
    for i in (0, 3):  # the fastest and the slowest
        one = fw.run(solver, graded_map, z0[i], W, c[i], b[i], tol=1e-10, maxiter=400, **kw)
        assert one.steps.shape == () and bool(one.converged)
        assert abs(int(one.steps) - int(res.steps[i])) <= 1
        np.testing.assert_allclose(one.value, res.value[i], rtol=0, atol=1e-9)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy's own, loud
def test_anderson_overflowing_element_stops_not_converged(fw):
    """An element whose residual overflows (its map scales by 1e300) stops at its last finite
    iterate, reported not converged; the other elements of the batch converge as they do
    without it (Anderson's least-squares step is not guarded: its coefficients are bounded by
    sqrt(m) |g| / lambda, so only such an element can make them non-finite)."""
    z0, W, c, b = graded_problem()
    c = c.copy()
    c[2] = 1e300
    res = fw.run(anderson, graded_map, z0, W, c, b, tol=1e-10, maxiter=400)
    assert not bool(res.converged[2]) and np.isfinite(res.value[2]).all()
    keep = [0, 1, 3]
    alone = fw.run(anderson, graded_map, z0[keep], W, c[keep], b[keep], tol=1e-10, maxiter=400)
    assert res.converged[keep].all()
    np.testing.assert_array_equal(res.steps[keep], alone.steps)
    np.testing.assert_allclose(res.value[keep], alone.value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", ["fixed_point_iteration", "anderson", "broyden"])
def test_element_whose_map_turns_non_finite_fails_alone_without_warnings(fw, name, bad):
    """One element's map returns inf (or NaN) at the third call: that element is reported not
    converged at its last finite iterate (Broyden's line search may step back and converge),
    the others converge as without it, and nothing warns (the suite turns warnings into
    errors: NumPy's "invalid value encountered" from inf * 0 in a frozen element's history
    used to escape Anderson's products)."""
    if fw.name == "jax":
        pytest.skip("under jit the map is traced once: a count of its calls cannot spoil one")
    z0, W, c, b = graded_problem()
    calls = [0]

    def spoiled(z, W, c, b):
        out = graded_map(z, W, c, b)
        calls[0] += 1
        if calls[0] == 3:
            xp = _xp(out)
            row = xp.reshape(xp.arange(out.shape[0]), (-1, 1)) == 2
            out = xp.where(row, xp.full_like(out, bad), out)
        return out

    solver = SOLVERS[name][0]
    res = fw.run(solver, spoiled, z0, W, c, b, tol=1e-10, maxiter=400)
    assert np.isfinite(res.value).all()
    keep = [0, 1, 3]
    assert res.converged[keep].all()
    if name != "broyden":
        assert not bool(res.converged[2])
    alone = fw.run(solver, graded_map, z0[keep], W, c[keep], b[keep], tol=1e-10, maxiter=400)
    np.testing.assert_allclose(res.value[keep], alone.value, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_eager_fast_paths_match_traced_jax(name):
    """NumPy and PyTorch run the loops eagerly, skipping masked selects while every element is
    running and writing histories in place; JAX traces them (no shortcut). Same iterates."""
    solver = SOLVERS[name][0]
    z0, W, c, b = graded_problem()
    runs = {f: Framework(f).run(solver, graded_map, z0, W, c, b, tol=1e-10, maxiter=400)
            for f in FRAMEWORKS}
    assert len(set(runs["numpy"].steps.tolist())) >= 3  # elements stop at different steps
    for f in ("numpy", "torch"):
        np.testing.assert_array_equal(runs[f].steps, runs["jax"].steps)
        np.testing.assert_allclose(runs[f].value, runs["jax"].value, rtol=0, atol=1e-13)
        np.testing.assert_allclose(runs[f].trace, runs["jax"].trace, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("maxiter", [400, 3])
@pytest.mark.parametrize("name", ["fixed_point_iteration", "anderson", "broyden", "newton"])
def test_torch_without_shortcuts_matches(monkeypatch, name, maxiter):
    """On accelerators the torch backend does not look at masks (`known_all` is False: no host
    synchronization); the solvers then take their masked paths, with the same iterates,
    statistics and traces. With `maxiter=3` every element is still going when the loop ends:
    the eager shortcut's traces and counts are written then, and must match too."""
    torch = pytest.importorskip("torch")
    from implicitdiff_torch import TorchBackend

    assert not TorchBackend().known_all(torch.ones(3, dtype=torch.bool, device="meta"))
    solver = SOLVERS[name][0]
    kw = {"fixed_point": True} if name == "newton" else {}
    z0, W, c, b = graded_problem()
    fw = Framework("torch")
    fast = fw.run(solver, graded_map, z0, W, c, b, tol=1e-10, maxiter=maxiter, **kw)
    monkeypatch.setattr(TorchBackend, "known_all", lambda self, mask: False)
    masked = fw.run(solver, graded_map, z0, W, c, b, tol=1e-10, maxiter=maxiter, **kw)
    np.testing.assert_array_equal(masked.steps, fast.steps)
    np.testing.assert_array_equal(masked.converged, fast.converged)
    np.testing.assert_allclose(masked.value, fast.value, rtol=0, atol=1e-13)
    for field in ("trace", "relative_trace"):
        got, want = getattr(fast, field), getattr(masked, field)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(fast.relative_residual, masked.relative_residual, rtol=1e-8,
                               atol=1e-14)
    if maxiter == 3 and name != "newton":  # (Newton converges within 3 steps here)
        assert (fast.steps == 3).all() and not fast.converged.any()


def test_eager_loop_looks_once_a_step_while_every_element_goes_on():
    """Eagerly, while no element has converged or failed, the solvers' loop synchronizes with
    the host once a step (one `known_all` look covers "every step good, none converged"); the
    step count, the traces and the loop's condition need no look of their own. Counted as
    torch's host reads (`aten._local_scalar_dense`) for the fixed-point iteration, whose steps
    look at nothing else: one per step plus a constant."""
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Count.reads += 1
            return func(*args, **(kwargs or {}))

    z0, W, c, b = graded_problem()
    c = np.full_like(c, 0.9)  # every element slow: none stops within the counted steps
    args = [torch.from_numpy(a) for a in (W, c, b)]
    reads = {}
    for maxiter in (5, 25):
        Count.reads = 0
        with torch.no_grad(), Count():
            res = fixed_point_iteration(graded_map, torch.from_numpy(z0), *args, tol=1e-12,
                                        maxiter=maxiter)
        assert (res.steps == maxiter).all()
        reads[maxiter] = Count.reads
    assert reads[25] - reads[5] == 20  # one look per step (the loop before: two)


@pytest.mark.parametrize("everyone", [True, False])
@pytest.mark.parametrize("int_slot", [True, False])
def test_ring_write_backends_agree(fw, everyone, int_slot):
    rng = np.random.default_rng(0)
    hist = rng.standard_normal((2, 3, 4, 5))  # batch (2, 3), m = 4 slots, n = 5
    row = rng.standard_normal((2, 3, 5))
    slot = 2 if int_slot else rng.integers(0, 4, size=(2, 3, 1)).astype(np.int32)
    mask = np.ones((2, 3, 1), bool) if everyone else rng.random((2, 3, 1)) < 0.5
    want = hist.copy()
    for i in range(2):
        for j in range(3):
            if mask[i, j, 0]:
                want[i, j, slot if int_slot else slot[i, j, 0]] = row[i, j]
    h = fw.asarray(hist.copy())
    bk = idf.get_backend(h)
    a = lambda v: v if isinstance(v, int) else fw.asarray(v)  # noqa: E731
    got = bk.ring_write(h, a(slot), a(row), a(mask), everyone)
    np.testing.assert_array_equal(np.asarray(got), want)
    # the functional default (what JAX runs) agrees too
    base = idf.Backend.ring_write(bk, fw.asarray(hist.copy()), a(slot), a(row), a(mask),
                                  everyone)
    np.testing.assert_array_equal(np.asarray(base), want)


@pytest.mark.parametrize("flags", [[False, False, False], [False, True, False]])
def test_when_any_runs_the_work_only_where_some_entry_may_be_true(fw, flags):
    """`Backend.when_any(mask, fn, otherwise)`: `fn()` when some entry of the mask is true,
    `otherwise()` when none is, on every backend, eagerly without calling `fn` at all, and in
    JAX under `jit` (a `lax.cond`: decided at run time) and `vmap` (both run, the same
    answer)."""
    mask = np.array(flags)[:, None]
    x = np.arange(3.0)[:, None]
    calls = [0]

    def work(bk, m, v):
        def fn():
            calls[0] += 1
            return bk.namespace(v).where(m, -v, v)   # unchanged where the mask is false
        return bk.when_any(m, fn, lambda: v)

    want = np.where(mask, -x, x)
    m, v = fw.asarray(mask), fw.asarray(x)
    bk = idf.get_backend(v)
    got = work(bk, m, v)
    np.testing.assert_array_equal(np.asarray(got), want)
    if fw.name != "jax":
        assert calls[0] == int(any(flags))
    if fw.name == "jax":
        import jax

        got = jax.jit(lambda m, v: work(bk, m, v))(m, v)
        np.testing.assert_array_equal(np.asarray(got), want)
        batched = jax.vmap(lambda m, v: work(bk, m, v))(m[None], v[None])
        np.testing.assert_array_equal(np.asarray(batched)[0], want)
    if fw.name == "torch":   # under torch.func.vmap the mask is not known as one bool: fn runs
        import torch

        calls[0] = 0
        got = torch.func.vmap(lambda m, v: work(bk, m, v))(m[None], v[None])
        np.testing.assert_array_equal(got[0].numpy(), want)
        assert calls[0] == 1


def test_torch_solver_on_the_tape_is_differentiable():
    """Run with grad enabled (unrolled differentiation through Anderson's iterations), the
    history is not written in place: backward works and approaches the implicit gradient."""
    torch = pytest.importorskip("torch")
    z0, W, U, x = (torch.from_numpy(a) for a in contraction(2, rho=0.5))
    W.requires_grad_()
    res = anderson(tanh_layer, z0, W, U, x, tol=1e-12, maxiter=100)
    (res.value ** 2).sum().backward()
    unrolled = W.grad.clone()
    W.grad = None
    fp = idf.custom_fixed_point(tanh_layer)(
        lambda W, U, x: anderson(tanh_layer, z0, W, U, x, tol=1e-12).value)
    (fp(W, U, x) ** 2).sum().backward()
    torch.testing.assert_close(unrolled, W.grad, rtol=1e-6, atol=1e-9)


def test_several_batch_dims():
    z0, W, U, x = contraction(3, batch=(2, 3))
    res = anderson(tanh_layer, z0, W, U, x, tol=1e-10)
    assert res.value.shape == (2, 3, 12) and res.steps.shape == (2, 3)
    assert res.trace.shape == (2, 3, 100)
    flat = anderson(tanh_layer, z0.reshape(6, 12), W, U, x.reshape(6, 3), tol=1e-10)
    np.testing.assert_allclose(res.value.reshape(6, 12), flat.value, atol=1e-14)


# ---- safeguards ---------------------------------------------------------------------------------

def constant_map(z, c):
    return c + 0 * z


def rank_one_map(z, u, b):
    """$T(z) = 0.9\\,(u^\\top z)\\,u + b$: every residual difference is parallel to u."""
    return 0.9 * (z @ u)[..., None] * u + b


def identity_plus(z, s):
    return z + s


@pytest.mark.parametrize("m", [1, 12])
def test_anderson_singular_history_never_nan(fw, m):
    rng = np.random.default_rng(7)
    n = 3
    z0 = rng.standard_normal((2, n))
    c = rng.standard_normal((2, n))
    # T constant: the residual vanishes after one step
    res = fw.run(anderson, constant_map, z0, c, m=m, tol=1e-12)
    assert np.isfinite(res.value).all() and res.converged.all()
    np.testing.assert_allclose(res.value, c, atol=1e-14)
    # linear, rank one: the history spans one direction, the Gram matrix is singular
    u = rng.standard_normal(n)
    u /= np.linalg.norm(u)
    res = fw.run(anderson, rank_one_map, z0, u, c, m=m, tol=1e-12, maxiter=50)
    assert np.isfinite(res.value).all() and np.isfinite(res.trace[..., :1]).all()
    assert res.converged.all()
    # already at the fixed point: zero residual, stops at once
    zs = res.value
    res = fw.run(anderson, rank_one_map, zs, u, c, m=m, tol=1e-12)
    assert res.converged.all() and (res.steps <= 1).all()
    # no fixed point (T = z + s): Delta g = 0 at every step
    res = fw.run(anderson, identity_plus, z0, c, m=m, tol=1e-12, maxiter=30)
    assert np.isfinite(res.value).all() and not res.converged.any()
    assert (res.steps == 30).all()


def nan_map(z, c):
    """$z + c$ (no fixed point) inside the unit box, NaN outside."""
    xp = _xp(z)
    return xp.where(xp.abs(z) < 1, z + c, xp.full_like(z, float("nan")))


@pytest.mark.parametrize("name", ["fixed_point_iteration", "anderson", "broyden", "newton"])
def test_divergence_is_reported(fw, name):
    solver = SOLVERS[name][0]
    kw = {"fixed_point": True} if name == "newton" else {}
    z0 = np.full((2, 3), 0.1)
    s = np.ones((2, 3))
    # no fixed point at all
    res = fw.run(solver, identity_plus, z0, s, tol=1e-10, maxiter=40, **kw)
    assert not res.converged.any()
    assert np.isfinite(res.value).all()
    # NaN on the way: the element stops, not converged, with its last finite iterate
    res = fw.run(solver, nan_map, z0, 0.3 * s, tol=1e-10, maxiter=40, **kw)
    assert not res.converged.any()
    assert np.isfinite(res.value).all() and np.isfinite(res.residual_norm).all()
    assert (np.abs(res.value) < 1).all()
    assert (res.steps < 40).all()  # stopped at the NaN, not at maxiter


def test_errors():
    z0, W, U, x = contraction(0)
    with pytest.raises(idf.StructureError, match="shape"):
        anderson(lambda z, W: z[..., :3], z0, W)
    with pytest.raises(idf.StructureError, match=r"\(n,\)"):
        anderson(tanh_layer, np.float64(0.0), W, U, x)
    with pytest.raises(idf.StructureError, match="real floating"):
        anderson(tanh_layer, np.zeros(3, dtype=np.int64), W, U, x)
    with pytest.raises(ValueError, match="maxiter"):
        fixed_point_iteration(tanh_layer, z0, W, U, x, maxiter=0)
    with pytest.raises(ValueError, match="damping"):
        fixed_point_iteration(tanh_layer, z0, W, U, x, damping=1.5)
    with pytest.raises(ValueError, match="m a positive"):
        anderson(tanh_layer, z0, W, U, x, m=0)
    with pytest.raises(ValueError, match="jvp"):
        newton(tanh_residual, z0, W, U, x, jvp="forward")
    with pytest.raises(TypeError, match="linear solver"):
        newton(tanh_residual, z0, W, U, x, linear_solver="dense")


# ---- frameworks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fixed_point_iteration", "anderson", "broyden", "newton"])
def test_jax_vmap_and_jit(name):
    jax = pytest.importorskip("jax")
    pytest.importorskip("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    solver, fun, kw = SOLVERS[name]
    z0, W, U, x = (jnp.asarray(a) for a in contraction(6))

    def one(z, x):  # an unbatched solve, vmapped over the batch
        return solver(fun, z, W, U, x, tol=1e-11, **kw)

    batched = jax.jit(lambda z, x: solver(fun, z, W, U, x, tol=1e-11, **kw))(z0, x)
    mapped = jax.jit(jax.vmap(one))(z0, x)
    assert mapped.steps.shape == (4,) and mapped.trace.shape == batched.trace.shape
    np.testing.assert_allclose(mapped.value, batched.value, atol=1e-12)
    assert np.abs(np.asarray(mapped.steps) - np.asarray(batched.steps)).max() <= 1
    assert bool(mapped.converged.all())


def test_core_imports_no_framework():
    code = ("import sys, implicitdiff.solvers; "
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules, sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- as the solver of custom_fixed_point --------------------------------------------------------

def _fd_check(loss, params: list[np.ndarray], grads: list[np.ndarray], seed: int = 0,
              eps: float = 1e-6, rtol: float = 1e-6):
    """Central differences of `loss` in a random direction against <grads, direction>."""
    rng = np.random.default_rng(seed)
    dirs = [rng.standard_normal(p.shape) for p in params]
    plus = loss(*[p + eps * d for p, d in zip(params, dirs)])
    minus = loss(*[p - eps * d for p, d in zip(params, dirs)])
    fd = (plus - minus) / (2 * eps)
    an = sum(float(np.sum(g * d)) for g, d in zip(grads, dirs))
    assert abs(fd - an) <= rtol * max(1.0, abs(fd)), (fd, an)


LAYER_SOLVERS = {
    "anderson": functools.partial(anderson, tanh_layer),
    "broyden": functools.partial(broyden, tanh_layer),
    "newton": functools.partial(newton, tanh_layer, fixed_point=True),
}


def _np_loss(solve, W, U, x):
    z = solve(np.zeros((x.shape[0], W.shape[0])), W, U, x, tol=1e-13).value
    return float(np.sum(np.sin(z)))


@pytest.mark.parametrize("name", list(LAYER_SOLVERS))
def test_custom_fixed_point_numpy(name):
    solve = LAYER_SOLVERS[name]
    _, W, U, x = contraction(8, batch=(3,))

    @idf.custom_fixed_point(tanh_layer)
    def layer(W, U, x):
        return solve(np.zeros((x.shape[0], W.shape[0])), W, U, x, tol=1e-13).value

    z, vjp_fn = idf.vjp(layer, W, U, x)
    gW, gU, gx = vjp_fn(np.cos(z))
    _fd_check(lambda W, U, x: _np_loss(solve, W, U, x), [W, U, x], [gW, gU, gx])


@pytest.mark.parametrize("name", list(LAYER_SOLVERS))
def test_custom_fixed_point_jax(name):
    jax = pytest.importorskip("jax")
    pytest.importorskip("implicitdiff_jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    solve = LAYER_SOLVERS[name]
    _, W, U, x = contraction(8, batch=(3,))

    @idf.custom_fixed_point(tanh_layer)
    def layer(W, U, x):
        return solve(jnp.zeros((x.shape[0], W.shape[0])), W, U, x, tol=1e-13).value

    def loss(W, U, x):
        return jnp.sum(jnp.sin(layer(W, U, x)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(jnp.asarray(a) for a in (W, U, x)))
    _fd_check(lambda W, U, x: _np_loss(solve, W, U, x), [W, U, x],
              [np.asarray(g) for g in grads])


@pytest.mark.parametrize("name", list(LAYER_SOLVERS))
def test_custom_fixed_point_torch(name):
    torch = pytest.importorskip("torch")
    pytest.importorskip("implicitdiff_torch")
    solve = LAYER_SOLVERS[name]
    _, W, U, x = contraction(8, batch=(3,))

    @idf.custom_fixed_point(tanh_layer)
    def layer(W, U, x):
        return solve(torch.zeros(x.shape[0], W.shape[0], dtype=W.dtype), W, U, x,
                     tol=1e-13).value

    tW, tU, tx = (torch.from_numpy(a).requires_grad_() for a in (W, U, x))
    torch.sin(layer(tW, tU, tx)).sum().backward()
    _fd_check(lambda W, U, x: _np_loss(solve, W, U, x), [W, U, x],
              [t.grad.numpy() for t in (tW, tU, tx)])
