"""examples/ode_spiral.py and examples/ffjord_moons.py: their `--quick` configurations run
in-process and learn (the spiral's loss falls and its whole-trajectory fit improves, in PyTorch
and in JAX, with the same loss trajectory in both; FFJORD's test log-likelihood beats the base
density's, in PyTorch and in JAX), and FFJORD's log-likelihood of a known flow matches the
change-of-variables formula in closed form (in JAX also its gradient)."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


spiral = _load("ode_spiral")
ffjord = _load("ffjord_moons")


@pytest.fixture(scope="module")
def spiral_torch():
    return spiral.main(["--quick", "--silent"])


def test_spiral_data_is_the_cubic_spiral():
    # the generated data against an independent solver (SciPy's DOP853) of y' = (y^3) A
    from scipy.integrate import solve_ivp

    t, ys = spiral.make_data(50, 2.0)
    ref = solve_ivp(lambda t_, y: (y ** 3) @ spiral.A_TRUE, (0.0, 2.0), spiral.Y0_TRUE,
                    t_eval=t, method="DOP853", rtol=1e-12, atol=1e-12).y.T
    np.testing.assert_allclose(ys, ref, rtol=0, atol=1e-8)


def test_spiral_torch_learns(spiral_torch):
    out = spiral_torch
    losses = np.asarray(out["losses"])
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    first, last = losses[:5].mean(), losses[-10:].mean()
    assert last < first / 3, (first, last)
    # the whole trajectory, integrated from y(0), fits the data better than the untrained model
    assert out["fit_error"] < 0.5 * out["fit_error_before"], (out["fit_error_before"],
                                                               out["fit_error"])


def test_spiral_jax_matches_torch(spiral_torch):
    pytest.importorskip("jax")
    out = spiral.main(["--quick", "--silent", "--framework", "jax", "--iters", "15"])
    # the same data, initialization, minibatches and solver in float32: the same losses
    np.testing.assert_allclose(out["losses"], spiral_torch["losses"][:15], rtol=2e-3)


def test_ffjord_loglik_of_a_linear_flow_is_the_closed_form():
    # f(t, z) = B z: z(1) = e^B x and log p(x) = log N(e^B x; 0, I) + tr B (exactly, and the
    # Hutchinson estimate with Rademacher noise is exact for a diagonal B)
    B = np.array([[0.3, 0.0], [0.0, -0.7]], np.float32)

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.B = torch.nn.Parameter(torch.tensor(B))

        def forward(self, t, z):
            return z @ self.B.T

    field = Linear()
    x = np.random.default_rng(0).standard_normal((7, 2)).astype(np.float32)
    z1 = x @ np.diag(np.exp(np.diag(B))).T
    want = -0.5 * (z1 ** 2).sum(-1) - math.log(2 * math.pi) + np.trace(B)
    for exact in (True, False):
        got = ffjord.log_likelihood(field, torch.tensor(x), tol=1e-6, exact=exact,
                                    generator=torch.Generator().manual_seed(0))
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4)


def test_ffjord_quick_beats_the_base_density(tmp_path):
    out_png = tmp_path / "moons.png"
    out = ffjord.main(["--quick", "--silent", "--out", str(out_png)])
    assert np.all(np.isfinite(out["losses"]))
    # the base density gives the standardized data about -log(2 pi) - 1 = -2.84 nats
    assert abs(out["loglik_base"] - (-math.log(2 * math.pi) - 1)) < 0.1
    assert out["loglik"] > out["loglik_base"] + 0.1, (out["loglik_base"], out["loglik"])
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ffjord_jax_loglik_of_a_linear_flow_is_the_closed_form():
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp

    # f(t, z) = b * z (B = diag(b)): z(1) = e^b x and log p(x) = log N(e^b x; 0, I) + sum(b),
    # exactly, and so is the Hutchinson estimate (B diagonal); its gradient in b is
    # 1 - e^{2b} x^2 per point
    b = np.array([0.3, -0.7], np.float32)
    x = np.random.default_rng(0).standard_normal((7, 2)).astype(np.float32)
    eps = ffjord.rademacher(np.random.default_rng(1), x.shape)
    z1 = x * np.exp(b)
    want = -0.5 * (z1 ** 2).sum(-1) - math.log(2 * math.pi) + b.sum()
    want_grad = np.mean(1 - np.exp(2 * b) * x ** 2, 0)

    def field(b_, t, z):
        return b_ * z

    for exact in (True, False):
        got = ffjord.log_likelihood_jax(jnp.asarray(b), jnp.asarray(x), jnp.asarray(eps),
                                        tol=1e-6, exact=exact, field=field)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    for grad in ("direct", "checkpoint"):  # the example's training mode, and checkpoint
        def mean_loglik(b_, grad=grad):
            return jnp.mean(ffjord.log_likelihood_jax(
                b_, jnp.asarray(x), jnp.asarray(eps), tol=1e-6, exact=False, field=field,
                max_steps=64, grad=grad))

        g = jax.jit(jax.grad(mean_loglik))(jnp.asarray(b))
        np.testing.assert_allclose(np.asarray(g), want_grad, rtol=1e-4, atol=1e-4)


def test_ffjord_jax_quick_beats_the_base_density(tmp_path):
    pytest.importorskip("jax")
    out_png = tmp_path / "moons.png"
    out = ffjord.main(["--quick", "--silent", "--framework", "jax", "--out", str(out_png)])
    assert len(out["losses"]) == 40 and np.all(np.isfinite(out["losses"]))
    assert abs(out["loglik_base"] - (-math.log(2 * math.pi) - 1)) < 0.1
    assert out["loglik"] > out["loglik_base"] + 0.1, (out["loglik_base"], out["loglik"])
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
