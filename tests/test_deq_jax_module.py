"""`implicitdiff_jax.DEQ`, the equinox module form of `deq`.

Oracles: the dense implicit-function-theorem gradient computed by hand in NumPy (per sample,
$u = (I - J)^{-\\top}\\bar z$, $J = \\mathrm{diag}(1 - z^2) W$, at a fixed point found by plain
NumPy iteration), and the pure function `deq` on the same parameters. Everything runs in
float64 inside `jax.enable_x64(True)` (the flag is not changed for other test modules).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
import jax.numpy as jnp  # noqa: E402
from jax.tree_util import Partial  # noqa: E402

import implicitdiff as idf  # noqa: E402
from implicitdiff.deq import IFT, Phantom  # noqa: E402
from implicitdiff_jax import DEQ, deq  # noqa: E402

H, D, B = 6, 4, 3          # hidden, input, batch
RHO = 0.5                  # spectral norm of W: ||J|| <= RHO (tanh' <= 1)
TIGHT = {"tol": 1e-13, "maxiter": 200}


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


class Cell(eqx.Module):
    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(z @ self.W.T + x @ self.U.T + self.b)


def data(seed=0, batch=B):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((H, H))
    W *= RHO / np.linalg.norm(W, 2)
    U = rng.standard_normal((H, D)) / np.sqrt(D)
    b = 0.1 * rng.standard_normal(H)
    x = rng.standard_normal((batch, D))
    return W, U, b, x


def oracle(W, U, b, x):
    """Gradients of L = sum((z* - 0.3)^2) w.r.t. W, U, b, x by the dense IFT, sample by sample."""
    gW, gU, gb, gx = np.zeros_like(W), np.zeros_like(U), np.zeros_like(b), np.zeros_like(x)
    for i, xi in enumerate(x):
        z = np.zeros(H)
        for _ in range(2000):
            z = np.tanh(W @ z + U @ xi + b)
        assert np.abs(np.tanh(W @ z + U @ xi + b) - z).max() < 1e-15
        dz = 1 - z**2                               # tanh'(a) at the fixed point
        J = dz[:, None] * W                         # df/dz
        u = np.linalg.solve((np.eye(H) - J).T, 2 * (z - 0.3))
        v = dz * u                                  # dL/da, a = Wz + Ux + b
        gW += np.outer(v, z)
        gU += np.outer(v, xi)
        gb += v
        gx[i] = U.T @ v
    return {"W": gW, "U": gU, "b": gb, "x": gx}


def model_of(W, U, b, **kw):
    kw.setdefault("solver_options", TIGHT)
    return DEQ(Cell(jnp.asarray(W), jnp.asarray(U), jnp.asarray(b)), z_shape=(H,), **kw)


def loss(model, x, z0=None):
    z, _ = model(x, z0)
    return jnp.sum((z - 0.3) ** 2)


grad = eqx.filter_jit(eqx.filter_grad(loss))
forward = eqx.filter_jit(lambda model, x, z0=None: model(x, z0))


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_gradients_match_dense_ift_and_pure_deq():
    W, U, b, x = data()
    ref = oracle(W, U, b, x)
    model, xj = model_of(W, U, b), jnp.asarray(x)

    def loss_aux(mx):
        z, stats = mx[0](mx[1])
        return jnp.sum((z - 0.3) ** 2), (z, stats)

    (val, (z, stats)), (g, gx) = eqx.filter_jit(
        eqx.filter_value_and_grad(loss_aux, has_aux=True))((model, xj))
    assert isinstance(g, DEQ) and g.f.W.dtype == jnp.float64
    for k in "WUb":
        np.testing.assert_allclose(getattr(g.f, k), ref[k], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gx, ref["x"], rtol=1e-9, atol=1e-12)
    assert z.shape == (B, H) and stats.steps.shape == (B,) and bool(stats.converged.all())

    # the pure function on the same parameters: the same algorithm, the same numbers
    def f(p, z, x):
        return jnp.tanh(z @ p["W"].T + x @ p["U"].T + p["b"])

    def pure_loss(p, x):
        z, _ = deq(Partial(f, p), x, z_shape=(H,), solver_options=TIGHT)
        return jnp.sum((z - 0.3) ** 2)

    params = {"W": model.f.W, "U": model.f.U, "b": model.f.b}
    pval, pg = jax.jit(jax.value_and_grad(pure_loss))(params, xj)
    np.testing.assert_allclose(val, pval, rtol=1e-13)
    for k in "WUb":
        np.testing.assert_allclose(getattr(g.f, k), pg[k], rtol=1e-10, atol=1e-13)


def test_jit_and_vmap():
    W, U, b, x = data()
    model, xj = model_of(W, U, b), jnp.asarray(x)
    # jax.jit (not only eqx.filter_jit) of the layer and of its gradient, vmapped over an
    # extra leading axis of batches
    xs = np.stack([data(seed=s)[3] for s in (1, 2)])                      # (2, B, D)
    zs, gs = jax.jit(jax.vmap(lambda m, x: (m(x)[0], eqx.filter_grad(loss)(m, x)),
                              in_axes=(None, 0)))(model, xs)
    for i in range(2):
        np.testing.assert_allclose(zs[i], forward(model, xs[i])[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(gs.f.W[i], oracle(W, U, b, xs[i])["W"], rtol=1e-9,
                                   atol=1e-12)

    # an ensemble of two models (vmapped parameters) on one batch
    W2, U2, b2, _ = data(seed=3)
    stacked = jax.tree_util.tree_map(lambda p, q: jnp.stack([p, q]), model,
                                     model_of(W2, U2, b2))
    ge = jax.jit(jax.vmap(eqx.filter_grad(loss), in_axes=(0, None)))(stacked, xj)
    for i, (Wi, Ui, bi) in enumerate([(W, U, b), (W2, U2, b2)]):
        np.testing.assert_allclose(ge.f.U[i], oracle(Wi, Ui, bi, x)["U"], rtol=1e-9,
                                   atol=1e-12)


def test_approximate_modes_error_sizes():
    """Relative errors of the W, U, b gradient against the exact one; measured (seed 0):
    neumann(5) = phantom(5) 6.2e-4, phantom(5, damping=0.5) 5.6e-2, jfb 1.9e-1 (exact with
    Richardson: 1e-12). The forward solver is plain iteration here (cheaper to compile)."""
    W, U, b, x = data()
    ref = oracle(W, U, b, x)
    exact = np.concatenate([ref[k].ravel() for k in "WUb"])
    xj = jnp.asarray(x)

    def err(**kw):
        g = grad(model_of(W, U, b, solver="fixed_point_iteration", **kw), xj)
        return rel(np.concatenate([np.ravel(getattr(g.f, k)) for k in "WUb"]), exact)

    e = {"neumann": err(backward="neumann"), "phantom": err(backward="phantom"),
         "damped": err(backward=Phantom(5, damping=0.5)), "jfb": err(backward="jfb"),
         "richardson": err(backward=IFT(idf.Richardson(omega=-1.0, maxiter=200)))}
    assert e["richardson"] < 1e-10
    assert e["neumann"] < RHO**5 and abs(e["phantom"] - e["neumann"]) < 1e-6
    assert e["damped"] < (1 - 0.5 + 0.5 * RHO) ** 5
    assert 1e-3 < e["jfb"] < RHO
    assert e["neumann"] < e["damped"] < e["jfb"]


def test_warm_start():
    W, U, b, x = data()
    xj = jnp.asarray(x)
    zeros = jnp.zeros((B, H))                    # an array, not None: one compilation each
    model = model_of(W, U, b, solver_options={"tol": 1e-10, "maxiter": 100})
    z, cold = forward(model, xj, zeros)
    _, again = forward(model, xj, z)                          # the same problem: nothing to do
    assert int(again.steps.max()) == 0 and int(cold.steps.min()) >= 5

    # after a small parameter step, starting from the old fixed point takes fewer steps
    # (measured: 5, 7, 6 against 7, 9, 9 per sample)
    moved = eqx.tree_at(lambda m: m.f.W, model, model.f.W * (1 + 1e-3))
    _, cold2 = forward(moved, xj, zeros)
    _, warm2 = forward(moved, xj, z)
    assert bool((warm2.steps < cold2.steps).all())

    # only an initial guess: the gradient is the exact one either way
    g_cold = grad(model, xj, zeros)
    g_warm = grad(model, xj, z)
    np.testing.assert_allclose(g_warm.f.W, g_cold.f.W, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("kw, exc, match", [
    ({"f": 3.0}, TypeError, "expected a callable f"),
    ({"solver": "newtonn"}, ValueError, "solver: expected one of"),
    ({"solver": 5}, TypeError, "solver: expected a name"),
    ({"backward": "exact-ish"}, ValueError, "backward: expected one of"),
    ({"backward": 3}, ValueError, "backward: expected one of"),
    ({"solve": "bicgstab"}, TypeError, "solve: expected a linear solver"),
    ({"solve": idf.BiCGStab(), "backward": "jfb"}, ValueError, "used only by backward='ift'"),
    ({"steps": 0}, ValueError, "steps: expected a positive int"),
    ({"damping": 0.0}, ValueError, "damping: expected"),
    ({"on_failure": "ignore"}, ValueError, "on_failure: expected one of"),
    ({"solver_options": [("tol", 1e-6)]}, TypeError, "solver_options: expected a dict"),
    ({"solver_options": {"m": [5]}}, TypeError, "expected a hashable value"),
    ({"z_shape": 6}, TypeError, "z_shape: expected a sequence of ints"),
    ({"residual_tol": -1.0}, ValueError, "residual_tol: expected"),
])
def test_bad_arguments_raise_at_construction(kw, exc, match):
    W, U, b, _ = data()
    kw = {"f": Cell(jnp.asarray(W), jnp.asarray(U), jnp.asarray(b)), **kw}
    with pytest.raises(exc, match=match):
        DEQ(**kw)


def test_equinox_is_optional(monkeypatch):
    code = ("import sys, implicitdiff_jax; assert 'equinox' not in sys.modules; "
            "implicitdiff_jax.deq")
    subprocess.run([sys.executable, "-c", code], check=True)
    import implicitdiff_jax

    monkeypatch.setitem(sys.modules, "equinox", None)     # `import equinox` now fails
    with pytest.raises(ImportError, match=r"expected equinox installed.*pip install equinox"):
        implicitdiff_jax.DEQ  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'DEQQ'"):
        implicitdiff_jax.DEQQ  # noqa: B018


def test_one_backward_api_with_torch():
    """The backward modes are the objects of implicitdiff.deq in JAX as in PyTorch: a linear
    solver means IFT with it (as torch's DEQ always accepted), names give the defaults."""
    from implicitdiff.deq import JFB, Neumann

    W, U, b, _ = data()
    cell = Cell(jnp.asarray(W), jnp.asarray(U), jnp.asarray(b))
    assert DEQ(cell, backward=idf.BiCGStab(rtol=1e-9)).backward == IFT(idf.BiCGStab(rtol=1e-9))
    assert DEQ(cell).backward == IFT()
    assert DEQ(cell, backward="neumann").backward == Neumann(5)
    assert DEQ(cell, backward=JFB()).backward == JFB()
    pytest.importorskip("torch")
    from implicitdiff_torch import IFT as TorchIFT
    from implicitdiff_torch import DEQStats as TorchStats

    assert TorchIFT is IFT
    from implicitdiff_jax import DEQStats

    assert TorchStats is DEQStats


def test_former_spellings_warn_and_agree():
    """deq(f, params, x) with f(params, z, x), and solve=/steps=/damping=, keep working for one
    release with a DeprecationWarning, and give the numbers of the new spelling."""
    W, U, b, x = data()
    xj = jnp.asarray(x)
    p = {"W": jnp.asarray(W), "U": jnp.asarray(U), "b": jnp.asarray(b)}

    def f(p, z, x):
        return jnp.tanh(z @ p["W"].T + x @ p["U"].T + p["b"])

    new, _ = deq(Partial(f, p), xj, z_shape=(H,), backward=Phantom(3, damping=0.5))
    with pytest.warns(DeprecationWarning, match="Partial"):
        with pytest.warns(DeprecationWarning, match="Phantom"):
            old, _ = deq(f, p, xj, z_shape=(H,), backward="phantom", steps=3, damping=0.5)
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    with pytest.warns(DeprecationWarning, match="backward=IFT"):
        model = DEQ(Cell(p["W"], p["U"], p["b"]), solve=idf.Richardson(omega=-1.0))
    assert model.backward == IFT(idf.Richardson(omega=-1.0))
