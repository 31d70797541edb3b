"""`implicitdiff.ode.odeint` (issue 13, the forward engine and `grad="direct"`) on NumPy, JAX
(`jit`, `grad`, `jvp`, `vmap`, `hessian`) and PyTorch (autograd, double backward,
`torch.func.jvp`).

Oracles: the order conditions of the Butcher tableaus (rooted trees, written here), the matrix
exponential (SciPy's `expm`, `expm_frechet` for derivatives in the matrix), the closed form of
exponential decay $y = y_0 e^{-kt}$ and its derivatives, Riccati's blow-up $y' = y^2$, and each
sample solved alone.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
from frameworks import FRAMEWORKS

import implicitdiff as idf
import implicitdiff.ode as ode

# ---- frameworks ---------------------------------------------------------------------------------


class Framework:
    """Arrays in, NumPy out; `solve` under `jax.jit` for JAX."""

    def __init__(self, name: str):
        self.name = name
        if name == "jax":
            self.jax = pytest.importorskip("jax")
            pytest.importorskip("implicitdiff_jax")
            self.jax.config.update("jax_enable_x64", True)
        elif name == "torch":
            self.torch = pytest.importorskip("torch")
            pytest.importorskip("implicitdiff_torch")

    def asarray(self, a, dtype=np.float64):
        a = np.asarray(a, dtype=dtype)
        if self.name == "jax":
            return self.jax.numpy.asarray(a)
        if self.name == "torch":
            return self.torch.from_numpy(np.array(a, copy=True))
        return a

    def solve(self, f, y0, ts, *args, **kw):
        y0, ts = self.asarray(y0, np.asarray(y0).dtype), self.asarray(ts, np.asarray(ts).dtype)
        args = tuple(self.asarray(a, np.asarray(a).dtype) for a in args)
        if self.name == "jax":
            out = self.jax.jit(lambda y, t, *a: ode.odeint(f, y, t, *a, **kw))(y0, ts, *args)
        else:
            out = ode.odeint(f, y0, ts, *args, **kw)
        return to_np(out)


def to_np(tree):
    if isinstance(tree, tuple):
        return type(tree)(*(to_np(t) for t in tree)) if hasattr(tree, "_fields") else \
            tuple(to_np(t) for t in tree)
    if hasattr(tree, "detach"):
        tree = tree.detach()
    return np.asarray(tree)


@pytest.fixture(params=FRAMEWORKS)
def fw(request) -> Framework:
    return Framework(request.param)


def xp_of(a):
    return idf.get_backend(a).namespace(a)


def decay(t, y, k):
    """$y' = -k y$, a rate per sample (`k` of shape `(..., 1)`)."""
    return -k * y


def linear(t, y, A):
    """$y' = A y$ row by row."""
    return y @ A.T


# ---- tableaus: the order conditions -------------------------------------------------------------

@functools.cache
def rooted_trees(n: int) -> tuple:
    """The rooted trees with `n` vertices, each a sorted tuple of its root's subtrees."""
    if n == 1:
        return ((),)

    def forests(total: int, largest: int):
        if total == 0:
            yield ()
            return
        for m in range(min(total, largest), 0, -1):
            for tree in rooted_trees(m):
                for rest in forests(total - m, m):
                    yield (tree, *rest)

    return tuple(sorted({tuple(sorted(f)) for f in forests(n - 1, n - 1)}))


def tree_order(t) -> int:
    return 1 + sum(tree_order(c) for c in t)


def tree_density(t) -> int:
    """$\\gamma(t) = |t| \\prod \\gamma(\\text{children})$."""
    return tree_order(t) * math.prod(tree_density(c) for c in t)


def elementary(A: np.ndarray, t) -> np.ndarray:
    """$\\Phi_i(t)$: the product over the root's subtrees of $(A \\Phi(\\text{child}))_i$."""
    out = np.ones(A.shape[0])
    for c in t:
        out = out * (A @ elementary(A, c))
    return out


def order_defects(tab: ode.ButcherTableau, b: np.ndarray, n: int) -> list[float]:
    A = np.zeros((tab.stages, tab.stages))
    for i, row in enumerate(tab.a):
        A[i, :len(row)] = row
    return [abs(b @ elementary(A, t) - 1 / tree_density(t)) for t in rooted_trees(n)]


def test_rooted_tree_counts():
    # OEIS A000081: 1, 1, 2, 4, 9, 20
    assert [len(rooted_trees(n)) for n in range(1, 7)] == [1, 1, 2, 4, 9, 20]


@pytest.mark.parametrize("name", sorted(ode.TABLEAUS))
def test_tableau_order_conditions(name):
    tab = ode.TABLEAUS[name]
    assert len(tab.a) == len(tab.b) == tab.stages
    assert tab.c[0] == 0
    for i, row in enumerate(tab.a):  # the row-sum condition c_i = sum_j a_ij
        assert len(row) == i
        assert abs(sum(row) - tab.c[i]) < 1e-14
    b = np.array(tab.b)
    for n in range(1, tab.order + 1):
        assert max(order_defects(tab, b, n)) < 1e-13, (name, n)
    assert max(order_defects(tab, b, tab.order + 1)) > 1e-4  # exactly this order, not more
    if tab.adaptive:
        bhat = b - np.array(tab.b_error)
        for n in range(1, tab.error_order + 1):
            assert max(order_defects(tab, bhat, n)) < 1e-13, (name, n)
        assert max(order_defects(tab, bhat, tab.error_order + 1)) > 1e-5
    if tab.fsal:  # the last stage is the solution, at c = 1
        assert tab.c[-1] == 1 and tab.a[-1] == tab.b[:-1] and tab.b[-1] == 0


# ---- convergence order, empirically --------------------------------------------------------------

ROT = np.array([[-0.1, 1.0], [-1.0, -0.1]])


def rot_exact(ts, y0):
    return np.stack([scipy.linalg.expm(ROT * t) @ y0 for t in ts])


@pytest.mark.parametrize("name", sorted(ode.TABLEAUS))
def test_convergence_order(name):
    """Fixed steps h = 1/N: the error at t = 1 falls as h^p (`make_step` for the adaptive
    methods, `odeint(dt0=h)` for the fixed-step ones)."""
    tab = ode.TABLEAUS[name]
    y0 = np.array([1.0, 0.5])
    exact = rot_exact([1.0], y0)[0]
    ns = (8, 16, 32) if tab.order >= 4 else (64, 128, 256)
    errs = []
    for n in ns:
        if tab.adaptive:
            step = ode.make_step(linear, tab)
            y, h = y0, 1.0 / n
            for i in range(n):
                y = step(np.array([i * h]), np.array([h]), y, (ROT,))
        else:
            y = ode.odeint(linear, y0, np.array([0.0, 1.0]), ROT, method=name, dt0=1.0 / n)[-1]
        errs.append(np.linalg.norm(y - exact))
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(np.abs(rates - tab.order) < 0.3), (name, rates)


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_error_follows_tolerance(method):
    """Adaptive: tighter rtol = atol, smaller error, within a modest factor of the tolerance."""
    y0 = np.array([1.0, 0.5])
    ts = np.linspace(0, 5, 6)
    exact = rot_exact(ts, y0)
    errs = []
    for tol in (1e-4, 1e-7, 1e-10):
        sol = ode.odeint(linear, y0, ts, ROT, method=method, rtol=tol, atol=tol,
                         full_output=True)
        errs.append(np.abs(sol.ys - exact).max())
        assert errs[-1] < 50 * tol
        assert int(sol.stats.status) == ode.SUCCESS
    assert errs[0] > errs[1] > errs[2]


# ---- values against closed forms, every framework -----------------------------------------------

def test_linear_values(fw):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 3)) * 0.5 - 0.5 * np.eye(3)
    y0 = rng.standard_normal((4, 3))
    ts = np.array([0.0, 0.3, 1.0, 2.5])
    ys = fw.solve(linear, y0, ts, A, rtol=1e-10, atol=1e-12)
    exact = np.stack([y0 @ scipy.linalg.expm(A * t).T for t in ts])
    assert ys.shape == (4, 4, 3)
    np.testing.assert_array_equal(ys[0], y0)
    np.testing.assert_allclose(ys, exact, rtol=0, atol=2e-9)


def test_unbatched_and_backwards(fw):
    """`y0` of shape (d,) (then `t` is 0-d in `f`), and decreasing output times."""
    def osc(t, y, w):
        xp = xp_of(y)
        assert t.ndim == 0
        return xp.stack([y[1], -w * w * y[0] + 0 * t])

    ts = np.array([2.0, 1.0, 0.0])
    y0 = np.array([np.cos(4.0), -2 * np.sin(4.0)])  # y = cos(2t) at t = 2
    ys = fw.solve(osc, y0, ts, np.asarray(2.0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ys[:, 0], np.cos(2 * ts), atol=1e-8)
    np.testing.assert_allclose(ys[:, 1], -2 * np.sin(2 * ts), atol=1e-8)


def test_float32(fw):
    k = np.array([[0.5], [2.0], [20.0]], dtype=np.float32)
    y0 = np.ones((3, 2), dtype=np.float32)
    ts = np.linspace(0, 1, 4).astype(np.float32)
    sol = fw.solve(decay, y0, ts, k, rtol=1e-5, atol=1e-6, full_output=True)
    assert sol.ys.dtype == np.float32
    exact = np.broadcast_to(np.exp(-k[None] * ts[:, None, None]), sol.ys.shape)
    np.testing.assert_allclose(sol.ys, exact, atol=2e-5)
    assert np.all(sol.stats.status == 0) and np.all(sol.stats.accepted > 0)


# ---- per-sample steps ----------------------------------------------------------------------------

def stiff_mix(t, y, k):
    """$y' = -k (y - \\cos t)$ with a rate per sample: the step size follows $k$."""
    xp = xp_of(y)
    return -k * (y - xp.cos(t))


def test_per_sample_batch_independence():
    """A batch of 256 with rates spread over 1..1000: each sample's outputs and step counts
    are those it gets alone (to rounding; here, exactly: every operation is row by row)."""
    rng = np.random.default_rng(1)
    k = np.logspace(0, 3, 256)[rng.permutation(256)][:, None]
    y0 = rng.standard_normal((256, 2))
    ts = np.linspace(0, 1, 5)
    sol = ode.odeint(stiff_mix, y0, ts, k, full_output=True)
    acc = sol.stats.accepted
    assert acc.max() > 5 * acc.min()  # the samples really took different steps
    for i in (int(np.argmin(k)), int(np.argmax(k)), 3, 77, 128, 200):
        alone = ode.odeint(stiff_mix, y0[i:i + 1], ts, k[i:i + 1], full_output=True)
        np.testing.assert_allclose(sol.ys[:, i], alone.ys[:, 0], rtol=1e-12, atol=1e-14)
        for field in ("accepted", "rejected", "nfe"):
            assert getattr(sol.stats, field)[i] == getattr(alone.stats, field)[0]


@pytest.mark.parametrize("name", ["jax", "torch"])
def test_per_sample_batch_independence_frameworks(name):
    fw = Framework(name)
    k = np.logspace(0, 3, 64)[::-1, None].copy()
    y0 = np.ones((64, 2))
    ts = np.linspace(0, 1, 3)
    if name == "jax":
        run = fw.jax.jit(lambda y, kk: ode.odeint(stiff_mix, y, fw.asarray(ts), kk,
                                                  max_steps=512, full_output=True))
    else:
        def run(y, kk):
            return ode.odeint(stiff_mix, y, fw.asarray(ts), kk, full_output=True)
    sol = to_np(run(fw.asarray(y0), fw.asarray(k)))
    for i in (0, 40, 63):
        alone = to_np(run(fw.asarray(y0[i:i + 1]), fw.asarray(k[i:i + 1])))
        np.testing.assert_allclose(sol.ys[:, i], alone.ys[:, 0], rtol=1e-12, atol=1e-14)
        assert sol.stats.accepted[i] == alone.stats.accepted[0]
    assert sol.stats.accepted[0] > 5 * sol.stats.accepted[63]


def test_output_times_hit_and_nfe_honest():
    """Every output time is the end of a step; NFE is the number of calls of f (unbatched);
    each FSAL step costs 6 new evaluations (plus 2 at the start)."""
    calls = [0]

    def counted(t, y, k):
        calls[0] += 1
        return -k * y

    ts = np.array([0.0, 1e-3, 0.5, 0.50001, 3.0])
    sol = ode.odeint(counted, np.array([1.0]), ts, 3.0, full_output=True, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sol.ys[:, 0], np.exp(-3.0 * ts), rtol=1e-7)
    assert float(sol.stats.t_final) == 3.0
    st = sol.stats
    assert int(st.nfe) == calls[0] == 2 + 6 * (int(st.accepted) + int(st.rejected))


# ---- derivatives: grad="direct" -----------------------------------------------------------------

T_END = 1.5


def test_jax_direct_gradients_decay():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    jax.config.update("jax_enable_x64", True)
    ts = jnp.array([0.0, 0.5, T_END])
    y0 = jnp.array([[1.0], [2.0], [-0.5]])

    def loss(k, y0):  # max_steps near the need: JAX's reverse mode stores max_steps steps
        return jnp.sum(ode.odeint(decay, y0, ts, k, rtol=1e-11, atol=1e-12, max_steps=400,
                                  grad="direct")[-1])

    k = jnp.array([[0.3], [1.0], [4.0]])
    v = jnp.array([[1.0], [-2.0], [0.5]])

    @jax.jit  # one program (one compilation): reverse, forward, forward over reverse
    def derivatives(k, y0):
        gk, gy = jax.grad(loss, argnums=(0, 1))(k, y0)
        jv = jax.jvp(lambda q: loss(q, y0), (k,), (v,))[1]
        hv = jax.jvp(jax.grad(lambda q: loss(q, y0)), (k,), (v,))[1]
        return gk, gy, jv, hv

    gk, gy, jv, hv = derivatives(k, y0)
    e = np.exp(-np.asarray(k) * T_END)
    np.testing.assert_allclose(gk, -T_END * np.asarray(y0) * e, rtol=1e-8)
    np.testing.assert_allclose(gy, e, rtol=1e-8)
    # forward mode: the dot-product test against reverse mode
    np.testing.assert_allclose(jv, jnp.sum(gk * v), rtol=1e-10)
    # second order, forward over reverse: d²y/dk² = T² y0 e^{-kT} (the Hessian is diagonal)
    np.testing.assert_allclose(hv, T_END ** 2 * np.asarray(y0) * e * np.asarray(v), rtol=1e-6)
    batched = jax.jit(jax.vmap(lambda kk: loss(kk, y0)))(jnp.stack([k, 2 * k]))
    np.testing.assert_allclose(batched, [np.sum(np.asarray(y0) * np.exp(-c * np.asarray(k)
                                                                        * T_END))
                                         for c in (1, 2)], rtol=1e-9)


def test_torch_direct_gradients_decay():
    torch = pytest.importorskip("torch")
    ts = torch.tensor([0.0, 0.5, T_END], dtype=torch.float64)
    y0 = torch.tensor([[1.0], [2.0], [-0.5]], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([[0.3], [1.0], [4.0]], dtype=torch.float64, requires_grad=True)

    def loss(k, y0):
        return ode.odeint(decay, y0, ts, k, rtol=1e-10, atol=1e-12, grad="direct")[-1].sum()

    gk, gy = torch.autograd.grad(loss(k, y0), (k, y0), create_graph=True)
    e = torch.exp(-k * T_END).detach()
    torch.testing.assert_close(gk.detach(), -T_END * y0.detach() * e, rtol=1e-8, atol=0)
    torch.testing.assert_close(gy.detach(), e, rtol=1e-8, atol=0)
    # double backward: d²/dk² of the sum, per sample
    (hk,) = torch.autograd.grad(gk.sum(), k)
    torch.testing.assert_close(hk, T_END ** 2 * y0.detach() * e, rtol=1e-6, atol=0)
    # forward mode (torch.func.jvp) against reverse mode
    v = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    _, jv = torch.func.jvp(lambda kk: loss(kk, y0.detach()), (k.detach(),), (v,))
    torch.testing.assert_close(jv, (gk.detach() * v).sum(), rtol=1e-10, atol=0)


def test_torch_func_vmap_matches_batch_axes():
    """`torch.func.vmap` over odeint (the loop runs while any element runs; each element's
    result is its own) equals the batch axes, values and per-element gradients."""
    torch = pytest.importorskip("torch")
    ts = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    k = torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64)

    def one(kk, grad="direct"):
        return ode.odeint(decay, torch.ones(1, dtype=torch.float64), ts, kk, grad=grad)[-1, 0]

    batched = ode.odeint(decay, torch.ones(3, 1, dtype=torch.float64), ts, k[:, None])[-1, :, 0]
    torch.testing.assert_close(torch.func.vmap(one)(k), batched, rtol=0, atol=0)
    # the default, grad="checkpoint": vmap of the values alone takes no derivative (one plain
    # pass); vmap of its gradient is refused by name (its loops decide on values)
    torch.testing.assert_close(torch.func.vmap(lambda q: one(q, "checkpoint"))(k), batched,
                               rtol=0, atol=0)
    for mode in ("checkpoint", "backsolve"):
        with pytest.raises(ode.DerivativeNotSupportedError, match="vmap"):
            torch.func.vmap(torch.func.grad(functools.partial(one, grad=mode)))(k)
    g = torch.func.vmap(torch.func.grad(one))(k)
    kk = k[:, None].clone().requires_grad_(True)
    ref = torch.autograd.grad(ode.odeint(decay, torch.ones(3, 1, dtype=torch.float64), ts,
                                         kk)[-1].sum(), kk)[0][:, 0]
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-15)


def frechet_directional(A, E, y0, w, t):
    """$\\frac{d}{d\\epsilon} w^\\top e^{(A + \\epsilon E) t} y_0$ (SciPy's expm_frechet)."""
    return float(w @ scipy.linalg.expm_frechet(A * t, E * t, compute_expm=False) @ y0)


@pytest.mark.parametrize("name", ["jax", "torch"])
def test_direct_gradient_linear_matrix(name):
    """The derivative of $w^\\top y(T)$ in the matrix $A$ of $y' = Ay$: reverse mode against
    SciPy's Fréchet derivative of expm in a random direction, forward mode likewise."""
    fw = Framework(name)
    rng = np.random.default_rng(2)
    A = rng.standard_normal((3, 3)) * 0.4 - 0.3 * np.eye(3)
    E = rng.standard_normal((3, 3))
    y0, w = rng.standard_normal(3), rng.standard_normal(3)
    oracle = frechet_directional(A, E, y0, w, T_END)
    ts = np.array([0.0, T_END])
    if name == "jax":
        jax, jnp = fw.jax, fw.jax.numpy

        def loss(A):
            return jnp.dot(jnp.asarray(w), ode.odeint(linear, jnp.asarray(y0), jnp.asarray(ts),
                                                     A, rtol=1e-11, atol=1e-12,
                                                     max_steps=300)[-1])

        g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(A)))
        jv = None  # forward mode under JAX: test_jax_direct_gradients_decay (compile time)
    else:
        torch = fw.torch

        def loss(A):
            y = ode.odeint(linear, torch.from_numpy(y0), torch.from_numpy(ts), A, rtol=1e-11,
                           atol=1e-12)
            return (torch.from_numpy(w) * y[-1]).sum()

        At = torch.from_numpy(A.copy()).requires_grad_(True)
        g = torch.autograd.grad(loss(At), At)[0].numpy()
        jv = float(torch.func.jvp(loss, (torch.from_numpy(A),), (torch.from_numpy(E),))[1])
    assert abs(np.sum(g * E) - oracle) <= 1e-8 * (1 + abs(oracle))
    if jv is not None:
        assert abs(jv - oracle) <= 1e-8 * (1 + abs(oracle))


# ---- the step schedule: an exact replay (the hook for checkpointing) ----------------------------

def test_schedule_replays_forward_exactly():
    rng = np.random.default_rng(3)
    k = np.logspace(0, 2, 8)[:, None]
    y0 = rng.standard_normal((8, 2))
    ts = np.array([0.0, 0.2, 1.0])
    res = ode.integrate(stiff_mix, y0, ts, (k,), record=True)
    sched = res.schedule
    assert sched.t.shape[1:] == (8, 1) and sched.dt.shape == sched.t.shape
    assert sched.out_step.shape == (8, 3)
    step = ode.make_step(stiff_mix, "tsit5")
    y = y0
    states = []
    for i in range(sched.t.shape[0]):
        y = step(sched.t[i], sched.dt[i], y, (k,))
        states.append(y)
    states = np.stack(states)
    for j in range(1, 3):
        got = states[sched.out_step[:, j], np.arange(8)]
        np.testing.assert_array_equal(got, res.ys[:, j])  # bit for bit
    # accepted steps per sample = rows with a nonzero step
    np.testing.assert_array_equal((sched.dt[..., 0] != 0).sum(0), res.stats.accepted)
    assert int(sched.iterations) == sched.t.shape[0] == int(
        (res.stats.accepted + res.stats.rejected).max())


def test_schedule_jax_rows():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    res = jax.jit(lambda y0: ode.integrate(decay, y0, jnp.array([0.0, 1.0]), (jnp.array(
        [[1.0], [30.0]]),), max_steps=64, record=True))(jnp.ones((2, 1)))
    assert res.schedule.t.shape == (64, 2, 1)
    np.testing.assert_array_equal(np.sum(np.asarray(res.schedule.dt) != 0, axis=0)[:, 0],
                                  res.stats.accepted)
    np.testing.assert_allclose(np.sum(np.asarray(res.schedule.dt), axis=0)[:, 0], 1.0,
                               rtol=1e-14)
    n = int(res.schedule.iterations)
    assert n == int(np.max(res.stats.accepted + res.stats.rejected)) < 64
    assert not np.any(np.asarray(res.schedule.dt)[n:])


# ---- failures, per sample -----------------------------------------------------------------------

def riccati(t, y, c):
    """$y' = c y^2$: from $y_0 = 1$, $c = 1$ it blows up at $t = 1$; $c = -1$ decays."""
    return c * y * y


RIC_Y0 = np.ones((3, 1))
RIC_C = np.array([[-1.0], [1.0], [-0.5]])
RIC_TS = np.array([0.0, 0.5, 2.0])


def test_underflow_nan_per_sample(fw):
    sol = fw.solve(riccati, RIC_Y0, RIC_TS, RIC_C, on_failure="nan", full_output=True)
    status = sol.stats.status
    assert status.tolist() == [0, ode.DT_UNDERFLOW, 0]
    assert np.all(np.isnan(sol.ys[:, 1]))
    exact = 1 / (1 - RIC_C[None] * RIC_TS[:, None, None])
    np.testing.assert_allclose(sol.ys[:, [0, 2]], exact[:, [0, 2]], rtol=1e-5)
    assert abs(float(sol.stats.t_final[1]) - 1.0) < 1e-3


def test_underflow_raise_names_sample_and_time():
    with pytest.raises(ode.ODEFailureError) as info:
        ode.odeint(riccati, RIC_Y0, RIC_TS, RIC_C, on_failure="raise")
    err = info.value
    assert isinstance(err, idf.NonConvergenceError)
    assert err.sample == (1,) and err.status == "dt_underflow" and err.failed == 1
    assert abs(err.t - 1.0) < 1e-3
    msg = str(err)
    assert "sample 1" in msg and "blows up" in msg and "t = 1" in msg


def test_warn_keeps_values():
    with pytest.warns(RuntimeWarning, match="sample 1"):
        ys = ode.odeint(riccati, RIC_Y0, RIC_TS, RIC_C, on_failure="warn")
    assert np.isfinite(ys[1, 1, 0]) and np.isnan(ys[2, 1, 0])  # reached t = 0.5, not t = 2


def test_nonfinite_per_sample(fw):
    """`f` is NaN past t = 0.3 for sample 0 only."""
    def sick(t, y, c):
        xp = xp_of(y)
        return -y * xp.sqrt(c - t)

    c = np.array([[0.3], [5.0]])
    with np.errstate(invalid="ignore"):  # NumPy's own warning for sqrt of a negative number
        sol = fw.solve(sick, np.ones((2, 1)), np.array([0.0, 0.2, 1.0]), c, on_failure="nan",
                       full_output=True)
    assert sol.stats.status.tolist() == [ode.NONFINITE, 0]
    assert np.all(np.isnan(sol.ys[:, 0])) and np.all(np.isfinite(sol.ys[:, 1]))
    assert 0.2 < float(sol.stats.t_final[0]) <= 0.3
    with pytest.raises(ode.ODEFailureError, match="NaN or inf"), np.errstate(invalid="ignore"):
        ode.odeint(sick, np.ones((2, 1)), np.array([0.0, 1.0]), c, on_failure="raise")


def test_max_steps_per_sample(fw):
    k = np.array([[1.0], [1000.0]])
    sol = fw.solve(decay, np.ones((2, 1)), np.array([0.0, 1.0]), k, max_steps=30,
                   on_failure="nan", full_output=True)
    assert sol.stats.status.tolist() == [0, ode.MAX_STEPS]
    assert int(sol.stats.accepted[1]) + int(sol.stats.rejected[1]) == 30
    assert np.isnan(sol.ys[-1, 1, 0])
    np.testing.assert_allclose(sol.ys[-1, 0, 0], np.exp(-1.0), rtol=1e-5)


def test_fixed_step_nonfinite():
    with np.errstate(over="ignore", invalid="ignore"):
        sol = ode.odeint(riccati, np.ones((2, 1)), np.array([0.0, 2.0]),
                         np.array([[1.0], [-1.0]]), method="rk4", dt0=0.01, on_failure="nan",
                         full_output=True)
    assert sol.stats.status.tolist() == [ode.NONFINITE, 0]
    np.testing.assert_allclose(sol.ys[-1, 1, 0], 1 / 3, rtol=1e-8)


def test_jax_failure_raise_under_jit():
    jax = pytest.importorskip("jax")
    from implicitdiff_jax import catching

    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    run = jax.jit(lambda c: ode.odeint(riccati, jnp.ones((3, 1)), jnp.asarray(RIC_TS), c,
                                       on_failure="raise"))
    with pytest.raises(ode.ODEFailureError, match="sample 1"), catching():
        jax.block_until_ready(run(jnp.asarray(RIC_C)))


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_input():
    y0, ts = np.ones((2, 1)), np.array([0.0, 1.0])
    with pytest.raises(ValueError, match="dt0"):
        ode.odeint(decay, y0, ts, 1.0, method="rk4")
    with pytest.raises(ValueError, match="checkpoint"):
        ode.odeint(decay, y0, ts, 1.0, grad="adjoint")
    with pytest.raises(ValueError, match="method"):
        ode.odeint(decay, y0, ts, 1.0, method="rk45")
    with pytest.raises(ValueError, match="strictly"):
        ode.odeint(decay, y0, np.array([0.0, 1.0, 0.5]), 1.0)
    with pytest.raises(idf.StructureError, match="shaped like y"):
        ode.odeint(lambda t, y: y[..., :1] * 0 + np.ones((2, 2)), y0, ts)
    with pytest.raises(idf.StructureError, match="real floating"):
        ode.odeint(decay, np.ones((2, 1), dtype=int), ts, 1.0)
    with pytest.raises(ValueError, match="max_steps"):
        ode.odeint(decay, y0, ts, 1.0, max_steps=0)


def test_single_output_time_and_summary():
    sol = ode.odeint(decay, np.ones((2, 1)), np.array([0.5]), 1.0, full_output=True)
    assert sol.ys.shape == (1, 2, 1)
    s = ode.odeint(decay, np.ones((4, 1)), np.array([0.0, 1.0]), np.ones((4, 1)),
                   full_output=True).stats.summary()
    assert set(s) == {"steps_mean", "steps_max", "rejected_mean", "nfe_mean", "nfe_max",
                      "success_frac"}
    assert s["success_frac"] == 1.0


def test_no_warnings_on_clean_solve():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ode.odeint(decay, np.ones((2, 1)), np.linspace(0, 1, 3), np.ones((2, 1)))
