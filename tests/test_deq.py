"""The PyTorch DEQ layer (`implicitdiff_torch.DEQ`): exact gradients against a dense oracle and
finite differences, the size of the approximate backward modes' errors, higher order,
torch.func, failure reporting, warm starts, and the toolkit (spectral norm, variational dropout,
Jacobian regularization, correction states)."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_cells import Cell  # noqa: E402

import implicitdiff as idf  # noqa: E402
import implicitdiff.deq as idf_deq  # noqa: E402
from implicitdiff_torch import (  # noqa: E402
    DEQ,
    IFT,
    JFB,
    Neumann,
    NeumannSolve,
    Phantom,
    VariationalDropout,
    correction_states,
    jacobian_penalty,
)

F64 = torch.float64


def make(h=12, d=5, batch=6, rho=0.5, **kw):
    cell = Cell(h, d, rho).to(F64)
    x = torch.randn(batch, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    kw.setdefault("solver_options", dict(tol=1e-13, maxiter=200))
    return cell, DEQ(cell, z_shape=(h,), **kw), x


def loss_fn(z):
    return ((z - 0.3) ** 2).sum()


def dense_oracle(cell, x):
    """The exact implicit gradient of loss_fn, densely, with tanh' written out (no autograd):
    z* by 2000 plain iterations, (I - J)ᵀ u = z̄ with J = diag(1 - z²) W per sample."""
    W, U, b = (p.detach() for p in (cell.W.weight, cell.U.weight, cell.U.bias))
    z = torch.zeros(x.shape[0], W.shape[0], dtype=F64)
    for _ in range(2000):
        z = torch.tanh(z @ W.T + x @ U.T + b)
    d = 1 - z ** 2
    J = d[:, :, None] * W[None]
    A = torch.eye(W.shape[0], dtype=F64) - J
    u = torch.linalg.solve(A.mT, (2 * (z - 0.3))[..., None])[..., 0]
    v = d * u
    return {"W": v.T @ z, "U": v.T @ x, "b": v.sum(0), "x": v @ U}


def grads(deq, cell, x):
    cell.zero_grad()
    xr = x.clone().requires_grad_()
    loss_fn(deq(xr)).backward()
    return {"W": cell.W.weight.grad.clone(), "U": cell.U.weight.grad.clone(),
            "b": cell.U.bias.grad.clone(), "x": xr.grad.clone()}


def flat(g):
    return torch.cat([g[k].flatten() for k in ("W", "U", "b", "x")])


def rel(a, b):
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


# ---- exact gradients -------------------------------------------------------------------------

@pytest.mark.parametrize("solve", [idf.BiCGStab(), idf.Richardson(omega=-1.0, maxiter=500),
                                   idf.Dense()], ids=["bicgstab", "richardson", "dense"])
@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point_iteration"])
def test_exact_gradient_matches_dense_oracle(solver, solve):
    cell, deq, x = make(solver=solver, backward=IFT(solve))
    assert rel(grads(deq, cell, x), dense_oracle(cell, x)) < 1e-9
    assert bool(deq.stats.converged.all())


def test_exact_gradient_matches_finite_differences():
    cell, deq, x = make()
    g = grads(deq, cell, x)
    gen = torch.Generator().manual_seed(3)
    dW = torch.randn(cell.W.weight.shape, dtype=F64, generator=gen)
    dx = torch.randn(x.shape, dtype=F64, generator=gen)
    eps = 1e-5
    W0 = cell.W.weight.detach().clone()

    def L(s):
        with torch.no_grad():
            cell.W.weight.copy_(W0 + s * dW)
            return float(loss_fn(deq(x + s * dx)))

    fd = (L(eps) - L(-eps)) / (2 * eps)
    L(0.0)
    an = float((g["W"] * dW).sum() + (g["x"] * dx).sum())
    assert abs(fd - an) <= 1e-7 * max(1.0, abs(an))


def test_gradients_agree_with_numpy_reference_problem():
    # the same fixed point as an idf.custom_fixed_point on NumPy arrays (the reference backend)
    cell, deq, x = make(h=4, d=3, batch=1)
    W, U, b = (p.detach().numpy() for p in (cell.W.weight, cell.U.weight, cell.U.bias))
    xn = x.numpy()[0]

    def T(z, W, U, b, x):
        return np.tanh(W @ z + U @ x + b)

    @idf.custom_fixed_point(T, solve=idf.Dense())
    def fp(W, U, b, x):
        z = np.zeros(W.shape[0])
        for _ in range(500):
            z = T(z, W, U, b, x)
        return z

    z, vjp = idf.vjp(fp, W, U, b, xn)
    gW, gU, gb, gx = vjp(2 * (z - 0.3))
    g = grads(deq, cell, x)
    np.testing.assert_allclose(g["W"].numpy(), gW, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g["U"].numpy(), gU, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g["b"].numpy(), gb, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g["x"].numpy()[0], gx, rtol=1e-6, atol=1e-9)


# ---- approximate modes: documented error sizes ------------------------------------------------

@pytest.mark.parametrize("rho", [0.3, 0.5, 0.9])
def test_approximate_modes_error_sizes(rho):
    cell, deq, x = make(h=16, d=8, batch=8, rho=rho)
    exact = grads(deq, cell, x)
    assert rel(exact, dense_oracle(cell, x)) < 1e-9
    err = {}
    for mode in [JFB(), Neumann(2), Neumann(5), Neumann(10), Phantom(5), Phantom(10, 0.5)]:
        d = DEQ(cell, z_shape=(16,), backward=mode, solver_options=dict(tol=1e-13, maxiter=200))
        err[mode] = rel(grads(d, cell, x), exact)
    # documented in docs/deq.md: JFB ≲ ρ, Neumann(k) and Phantom(k) ≲ ρ^k, damped
    # Phantom(k, λ) ≲ (1 - λ + λρ)^k; all are approximations (error well above rounding)
    assert 1e-3 < err[JFB()] < rho
    for k in (2, 5, 10):
        assert err[Neumann(k)] < rho ** k
    assert err[Neumann(2)] > err[Neumann(5)] > err[Neumann(10)] > 1e-12
    assert abs(err[Phantom(5)] - err[Neumann(5)]) < 1e-6  # undamped phantom = Neumann
    assert err[Phantom(10, 0.5)] < (0.5 + 0.5 * rho) ** 10
    assert err[JFB()] == pytest.approx(
        rel(grads(DEQ(cell, z_shape=(16,), backward=Neumann(1),
                      solver_options=dict(tol=1e-13, maxiter=200)), cell, x), exact), rel=1e-6)


def test_neumann_solve_is_the_truncated_series_in_numpy():
    rng = np.random.default_rng(0)
    J = rng.standard_normal((5, 5))
    J *= 0.5 / np.linalg.norm(J, 2)
    b = rng.standard_normal(5)
    x, info = NeumannSolve(terms=4).solve(lambda v: J @ v - v, b)
    series = -(b + J @ b + J @ J @ b + J @ J @ J @ b)
    np.testing.assert_allclose(x, series, rtol=1e-12)
    assert bool(info.converged) and int(info.iterations) == 3
    with pytest.raises(ValueError, match="terms"):
        NeumannSolve(terms=0)


# ---- higher order and torch.func ---------------------------------------------------------------

def test_gradgradcheck_exact_mode():
    cell, deq, x = make(h=3, d=2, batch=2)
    names = [n for n, _ in deq.named_parameters()]
    base = {n: p.detach() for n, p in deq.named_parameters()}

    def fn(W, x):
        return torch.func.functional_call(deq, {**base, "f.W.weight": W}, (x,))

    inputs = (cell.W.weight.detach().clone().requires_grad_(), x.clone().requires_grad_())
    assert names == ["f.W.weight", "f.U.weight", "f.U.bias"]
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_torch_func_grad_over_functional_call():
    cell, deq, x = make()
    params = {n: p.detach() for n, p in deq.named_parameters()}
    g = torch.func.grad(lambda p, x: loss_fn(torch.func.functional_call(deq, p, (x,))),
                        argnums=(0, 1))(params, x)
    ref = dense_oracle(cell, x)
    assert torch.allclose(g[0]["f.W.weight"], ref["W"], rtol=1e-8, atol=1e-10)
    assert torch.allclose(g[1], ref["x"], rtol=1e-8, atol=1e-10)


def test_torch_func_grad_phantom_mode():
    cell, deq, x = make(backward=Phantom(30))
    params = {n: p.detach() for n, p in deq.named_parameters()}
    g = torch.func.grad(lambda p: loss_fn(torch.func.functional_call(deq, p, (x,))))(params)
    assert torch.allclose(g["f.W.weight"], dense_oracle(cell, x)["W"], rtol=1e-6, atol=1e-8)


# ---- failure ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backward", [IFT(), JFB(), Phantom(3)], ids=["ift", "jfb", "phantom"])
def test_divergent_layer_raises(backward):
    _cell, deq, x = make(rho=4.0, solver="fixed_point_iteration", backward=backward,
                        solver_options=dict(maxiter=30))
    with pytest.raises(idf.NonConvergenceError, match="DEQ"):
        deq(x.requires_grad_())
    assert not bool(deq.stats.converged.all())


def test_divergent_layer_nan_flags_statistics():
    _cell, deq, x = make(rho=4.0, solver="fixed_point_iteration", on_failure="nan",
                        solver_options=dict(maxiter=30))
    z = deq(x)
    bad = ~deq.stats.converged
    assert bool(bad.any())
    assert bool(torch.isnan(z[bad]).all())  # never a silently wrong value


def test_nonconverged_backward_solve_raises():
    _cell, deq, x = make(rho=0.9, backward=IFT(idf.Richardson(omega=-1.0, maxiter=2)))
    z = deq(x.requires_grad_())
    with pytest.raises(idf.LinearSolveError):
        loss_fn(z).backward()


# ---- warm start, statistics ------------------------------------------------------------------

def test_warm_start_reduces_steps():
    cell, deq, x = make(rho=0.8, warm_start=True, solver_options=dict(tol=1e-10, maxiter=200))
    deq(x)
    cold = int(deq.stats.steps.sum())
    assert not deq.stats.warm_started
    deq(x)  # the same problem again: already at the fixed point
    assert deq.stats.warm_started and int(deq.stats.steps.sum()) == 0
    with torch.no_grad():  # a small parameter update, as between training steps
        cell.U.bias.add_(1e-7)
    z = deq(x)
    assert deq.stats.warm_started
    assert int(deq.stats.steps.sum()) < cold / 2
    ref = DEQ(cell, z_shape=(12,), solver_options=dict(tol=1e-12, maxiter=200))(x)
    assert torch.allclose(z, ref, atol=1e-8)
    deq(x[:3])  # another batch size: cold start
    assert not deq.stats.warm_started
    s = deq.stats.summary()
    assert set(s) == {"steps_mean", "steps_max", "rel_residual_max", "converged_frac"}


# ---- toolkit ---------------------------------------------------------------------------------

def test_spectral_norm_parametrization():
    from torch.nn.utils.parametrizations import spectral_norm

    cell = Cell(8, 3, 1.5).to(F64)  # ‖W‖ = 1.5, normalized to 1 by spectral_norm
    spectral_norm(cell.W)
    cell.W.weight.data  # noqa: B018 - materialize the parametrization once
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    deq = DEQ(cell, z_shape=(8,), solver_options=dict(tol=1e-12, maxiter=200))
    loss_fn(deq(x)).backward()  # training mode: power iterations run inside f
    orig = cell.W.parametrizations.weight.original
    assert torch.isfinite(orig.grad).all()
    cell.eval()  # fixed u, v: compare with autograd through a long unrolled iteration
    cell.zero_grad()
    loss_fn(deq(x)).backward()
    g = orig.grad.clone()
    cell.zero_grad()
    z = torch.zeros(4, 8, dtype=F64)
    for _ in range(300):
        z = cell(z, x)
    loss_fn(z).backward()
    assert torch.allclose(g, orig.grad, rtol=1e-7, atol=1e-9)


def close_singular_values_cell(h=8, seed=0):
    """A cell whose W has its two top singular values 1.5 and 1.49, under spectral_norm: the
    power iteration converges slowly, so each of its steps changes σ noticeably."""
    from torch.nn.utils.parametrizations import spectral_norm

    cell = Cell(h, 3, 1.0).to(F64)
    g = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(h, h, generator=g, dtype=F64))[0]
    Q2 = torch.linalg.qr(torch.randn(h, h, generator=g, dtype=F64))[0]
    s = torch.linspace(1.5, 0.2, h, dtype=F64)
    s[1] = 1.49
    with torch.no_grad():
        cell.W.weight.copy_(Q1 @ torch.diag(s) @ Q2.T)
    spectral_norm(cell.W)
    return cell


def test_spectral_norm_training_mode_one_power_iteration_per_forward():
    """In training mode the power iteration runs once per DEQ forward pass (not at every
    solver iteration, where f would change under the solver and the residual check fails);
    the gradient is exact for the map with that pass's u, v, even when f is called again
    (here: a training-mode call that moves u, v) between forward and backward."""
    from torch.nn.utils.parametrizations import spectral_norm

    cell = close_singular_values_cell()
    sn = cell.W.parametrizations.weight[0]
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    deq = DEQ(cell, z_shape=(8,), solver_options=dict(tol=1e-12, maxiter=200))
    assert cell.training
    # the expected u, v: one power iteration from the current ones, on a copy
    ref = Cell(8, 3, 1.0).to(F64)
    spectral_norm(ref.W)
    ref.load_state_dict(cell.state_dict())
    ref.W.weight  # noqa: B018 - one power iteration (training mode)
    u1, v1 = ref.W.parametrizations.weight[0]._u.clone(), ref.W.parametrizations.weight[0]._v
    z = deq(x)  # would raise NonConvergenceError if f changed at every solver iteration
    assert bool(deq.stats.converged.all())
    torch.testing.assert_close(sn._u, u1, rtol=0, atol=0)
    torch.testing.assert_close(sn._v, v1, rtol=0, atol=0)
    cell(z.detach(), x)  # another training-mode call: moves u, v before backward
    assert not torch.equal(sn._u, u1)
    orig = cell.W.parametrizations.weight.original
    cell.zero_grad()
    loss_fn(z).backward()
    g = orig.grad.clone()
    # oracle: autograd through a long unrolled iteration of the map with the pass's u, v
    ref.eval()
    ref.zero_grad()
    zz = torch.zeros(4, 8, dtype=F64)
    for _ in range(600):
        zz = ref(zz, x)
    torch.testing.assert_close(z.detach(), zz.detach(), rtol=1e-10, atol=1e-12)
    loss_fn(zz).backward()
    torch.testing.assert_close(g, ref.W.parametrizations.weight.original.grad, rtol=1e-7,
                               atol=1e-9)
    assert torch.isfinite(cell.U.weight.grad).all()


def test_spectral_norm_training_mode_phantom_and_penalty():
    cell = close_singular_values_cell()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    deq = DEQ(cell, z_shape=(8,), backward=Phantom(3),
              solver_options=dict(tol=1e-12, maxiter=200))
    z = deq(x)
    (loss_fn(z) + deq.jacobian_penalty(x, z)).backward()
    assert torch.isfinite(cell.W.parametrizations.weight.original.grad).all()


class DropCell(Cell):
    def __init__(self, *a):
        super().__init__(*a)
        self.drop = VariationalDropout(0.3)

    def forward(self, z, x):
        return torch.tanh(self.W(self.drop(z)) + self.U(x))


def test_variational_dropout_fixed_across_iterations():
    torch.manual_seed(0)
    cell = DropCell(10, 4, 0.6).to(F64)
    x = torch.randn(5, 4, dtype=F64)
    deq = DEQ(cell, z_shape=(10,), solver_options=dict(tol=1e-12, maxiter=200))
    z = deq(x)  # converges: the mask is the same at every iteration
    assert bool(deq.stats.converged.all())
    mask = cell.drop.mask.clone()
    loss_fn(z).backward()
    g = cell.W.weight.grad.clone()
    cell.zero_grad()
    zz = torch.zeros(5, 10, dtype=F64)
    for _ in range(300):  # unrolled with the same mask
        zz = cell(zz, x)
    loss_fn(zz).backward()
    assert torch.equal(mask, cell.drop.mask)
    assert torch.allclose(g, cell.W.weight.grad, rtol=1e-7, atol=1e-9)
    deq(x)
    assert not torch.equal(mask, cell.drop.mask)  # a new mask per forward pass
    cell.eval()
    assert torch.equal(cell.drop(zz), zz)


def test_jacobian_penalty_estimates_frobenius_norm():
    cell, deq, x = make(h=10, d=4, batch=3)
    z = deq(x)
    gen = torch.Generator().manual_seed(0)
    est = jacobian_penalty(cell, z, x, n_samples=4000, generator=gen)
    zd = z.detach()
    d = 1 - cell(zd, x).detach() ** 2
    J = d[:, :, None] * cell.W.weight.detach()[None]
    exact = float((J ** 2).sum() / 3 / 10)
    assert float(est.detach()) == pytest.approx(exact, rel=0.05)
    cell.zero_grad()
    deq.jacobian_penalty(x, z).backward()
    assert cell.W.weight.grad.abs().sum() > 0


def test_correction_states():
    cell, deq, x = make()
    states = correction_states(deq, x, iterations=(1, 3, 30))
    assert [tuple(s.shape) for s in states] == [(6, 12)] * 3
    zstar = deq(x).detach()
    errs = [float((s.detach() - zstar).abs().max()) for s in states]
    assert errs[0] > errs[1] > errs[2]
    sum(loss_fn(s) for s in states).backward()
    assert cell.W.weight.grad.abs().sum() > 0


def test_bad_options():
    cell = Cell(3, 2, 0.5)
    with pytest.raises(ValueError, match="backward"):
        DEQ(cell, backward="exactish")
    with pytest.raises(ValueError, match="solver"):
        DEQ(cell, solver="newtonian")
    with pytest.raises(ValueError, match="damping"):
        Phantom(3, damping=0.0)
    deq = DEQ(lambda z, x: torch.cat([z, z], -1), z_shape=(3,))
    with pytest.raises(idf.StructureError, match="shape"):
        deq(torch.zeros(2, 3))


def test_float32_default_tolerances():
    cell = Cell(16, 4, 0.7)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    deq = DEQ(cell, z_shape=(16,))
    z = deq(x)
    loss_fn(z).backward()
    ref = dense_oracle(cell.double(), x.double())
    # the forward stops at the solver's default relative tolerance √ε ≈ 3.5e-4 (float32):
    # the gradient is that accurate, not more (docs/deq.md)
    err = (cell.W.weight.grad.double() - ref["W"]).norm() / ref["W"].norm()
    assert float(err) < 3e-3
    assert math.isfinite(deq.stats.summary()["rel_residual_max"])


class CountingCell(Cell):
    calls = 0

    def forward(self, z, x):
        type(self).calls += 1
        return super().forward(z, x)


@pytest.mark.parametrize("backward,extra", [(IFT(), 0), (Phantom(2), 2)],
                         ids=["ift", "phantom"])
@pytest.mark.parametrize("extra_step", [None, False], ids=["default", "no_extra_step"])
def test_forward_evaluates_f_once_per_step(backward, extra, extra_step):
    """The residual check uses the built-in solver's own max|f(z) - z| at the value it returns:
    one evaluation of f per step plus the initial one, plus the default extra steps,
    none after the solve. A solver the DEQ does not know gets the check by a fresh evaluation of
    f; both give the same statistic."""
    cell = CountingCell(12, 5, 0.5).to(F64)
    x = torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    opts = dict(tol=1e-12) if extra_step is None else dict(tol=1e-12, extra_step=extra_step)
    deq = DEQ(cell, z_shape=(12,), backward=backward, solver_options=opts)
    CountingCell.calls = 0
    with torch.no_grad():
        deq(x)
    # the default extra steps: one more call of f each
    final = idf_deq.EXTRA_STEPS if extra_step is None else 0
    # extra: the phantom steps
    assert CountingCell.calls == int(deq.stats.steps.max()) + 1 + final + extra
    mx = deq.stats.max_abs_residual
    with torch.no_grad():  # at z* (the phantom mode returns steps of f from it)
        z = DEQ(cell, z_shape=(12,), solver_options=opts)(x)
        want = (cell(z, x) - z).abs().amax(dim=-1)
    torch.testing.assert_close(deq.stats.max_abs_residual, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(mx, want, rtol=0, atol=1e-15)
    CountingCell.calls = 0

    def own_solver(T, z0, *args, **kw):
        return idf.solvers.anderson(T, z0, *args, **kw)

    # a custom solver gets no extra step by default: ask it for the built-in's
    deq2 = DEQ(cell, z_shape=(12,), backward=backward, solver=own_solver,
               solver_options=dict(tol=1e-12, extra_step=final))
    with torch.no_grad():
        deq2(x)
    assert CountingCell.calls == int(deq2.stats.steps.max()) + 2 + final + extra
    torch.testing.assert_close(deq2.stats.max_abs_residual, want, rtol=0, atol=1e-15)


def test_diagnostics_record_the_layers_residual_check():
    cell, deq, x = make()
    with idf.diagnostics() as d:
        deq(x)
    (rec,) = d.forward
    assert rec.function == "DEQ" and rec.ok
    np.testing.assert_allclose(rec.per_element, deq.stats.max_abs_residual.numpy())
    assert rec.residual_norm == pytest.approx(float(deq.stats.max_abs_residual.max()))
    jax = pytest.importorskip("jax")
    from jax.tree_util import Partial

    from implicitdiff_jax import deq as jdeq

    with jax.enable_x64(True):
        W = jax.numpy.asarray(cell.W.weight.detach().numpy())

        def f(p, z, x):
            return jax.numpy.tanh(z @ p.T + x)

        xj = jax.numpy.asarray(np.random.default_rng(0).standard_normal((3, 12)))
        with idf.diagnostics() as d:
            _, stats = jax.block_until_ready(jax.jit(lambda W, x: jdeq(Partial(f, W), x))(W, xj))
            jax.effects_barrier()
        (rec,) = d.forward
        assert rec.function == "deq" and rec.ok
        np.testing.assert_allclose(rec.per_element, np.asarray(stats.max_abs_residual))


def test_residual_check_is_on_max_abs_not_the_norm():
    """||r||_2 above residual_tol but max|r| within it: accepted."""
    # no extra step: it would take the 2-norm below 1e-3 too, with nothing left to tell apart
    # (Anderson accelerating from the first step: its last residuals spread across entries)
    _cell, deq, x = make(residual_tol=1e-3, solver_options=dict(tol=0.0, atol=2e-3,
                                                                  maxiter=200, extra_step=False,
                                                                  plain_rate=0))
    z = deq(x)
    rn, mx = deq.stats.residual_norm, deq.stats.max_abs_residual
    assert mx is not None and bool((mx <= 1e-3).all()) and bool((rn > 1e-3).any())
    assert torch.isfinite(z).all()


# ---- the example ----------------------------------------------------------------------------

def test_digits_example_smoke(capsys):
    pytest.importorskip("sklearn")
    path = pathlib.Path(__file__).parents[1] / "examples" / "deq_digits.py"
    spec = importlib.util.spec_from_file_location("deq_digits", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick"])
    assert out["deq"]["steps"] == 3
    assert 0.0 <= out["deq"]["test_acc"] <= 1.0
    assert len(out["memory"]) == 2
    assert "peak memory" in capsys.readouterr().out


# ---- JAX: the pure-function DEQ ---------------------------------------------------------------

def test_jax_deq_gradients_modes_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.tree_util import Partial

    from implicitdiff.deq import IFT, JFB, Neumann, Phantom
    from implicitdiff_jax import deq

    cell, _, x = make(h=12, d=5, batch=6)
    ref = dense_oracle(cell, x)
    with jax.enable_x64(True):
        params = {"W": jnp.asarray(cell.W.weight.detach().numpy()),
                  "U": jnp.asarray(cell.U.weight.detach().numpy()),
                  "b": jnp.asarray(cell.U.bias.detach().numpy())}
        xj = jnp.asarray(x.numpy())

        def f(p, z, x):
            return jnp.tanh(z @ p["W"].T + x @ p["U"].T + p["b"])

        def L(p, x, backward="ift", steps=5):
            mode = {"ift": IFT(), "neumann": Neumann(steps), "phantom": Phantom(steps),
                    "jfb": JFB()}[backward]
            z, _ = deq(Partial(f, p), x, z_shape=(12,), backward=mode,
                       solver_options=dict(tol=1e-13, maxiter=200))
            return jnp.sum((z - 0.3) ** 2)

        gW = ref["W"].numpy()
        g = jax.jit(jax.grad(L, argnums=(0, 1)))(params, xj)
        np.testing.assert_allclose(g[0]["W"], gW, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(g[1], ref["x"].numpy(), rtol=1e-8, atol=1e-10)

        def err(backward, steps=5):
            gg = jax.grad(L)(params, xj, backward, steps)["W"]
            return float(np.linalg.norm(gg - gW) / np.linalg.norm(gW))

        assert err("neumann") < 0.5 ** 5 and abs(err("phantom") - err("neumann")) < 1e-6
        assert 1e-3 < err("jfb") < 0.5
        z, stats = deq(Partial(f, params), xj, z_shape=(12,))
        assert z.shape == (6, 12) and bool(stats.converged.all())


@pytest.mark.parametrize("backward", ["ift", "phantom", "jfb"])
def test_jax_deq_residual_check_every_mode(backward):
    """The JAX deq checks the forward solve in every backward mode, from the solver's own
    max|f(z) - z|: a divergent layer raises or gives NaN samples, never a silent value."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.tree_util import Partial

    from implicitdiff_jax import deq

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        W = rng.standard_normal((8, 8))
        x = jnp.asarray(rng.standard_normal((4, 8)))

        def f(p, z, x):
            return jnp.tanh(z @ p["W"].T + x)

        good = {"W": jnp.asarray(0.5 * W / np.linalg.norm(W, 2))}
        _z, stats = deq(Partial(f, good), x, backward=backward,
                        solver_options=dict(tol=1e-12))
        z_star = deq(Partial(f, good), x, solver_options=dict(tol=1e-12))[0]
        want = np.max(np.abs(np.asarray(f(good, z_star, x) - z_star)), axis=-1)
        np.testing.assert_allclose(stats.max_abs_residual, want, rtol=0, atol=1e-15)
        bad = {"W": jnp.asarray(4.0 * W / np.linalg.norm(W, 2))}
        opts = dict(maxiter=5)
        with pytest.raises(idf.NonConvergenceError, match="deq"):
            deq(Partial(f, bad), x, backward=backward, solver="fixed_point_iteration",
                solver_options=opts)
        zn, stats = jax.jit(lambda p, x: deq(Partial(f, p), x, backward=backward,
                                             solver="fixed_point_iteration",
                                             solver_options=opts, on_failure="nan"))(bad, x)
        failed = ~np.asarray(stats.max_abs_residual <= 10 * np.sqrt(np.finfo(float).eps))
        assert failed.any() and np.isnan(np.asarray(zn)[failed]).all()
        with pytest.raises(ValueError, match="on_failure"):
            deq(Partial(f, good), x, on_failure="ignore")


# ---- the JAX digits example and the convergence tutorial (smoke) ------------------------------

def _load_example(name):
    path = pathlib.Path(__file__).parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_digits_jax_example_smoke(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("jax")
    out = _load_example("deq_digits_jax").main(["--quick"])
    assert out["steps"] == 3
    assert 0.0 <= out["test_acc"] <= 1.0
    assert "DEQ (JAX) test accuracy" in capsys.readouterr().out


def test_convergence_example_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "conv.png"
    out = _load_example("convergence").main(["--quick", "--rho", "0.5", "--out", str(png)])
    assert png.stat().st_size > 1000
    assert all(bool(r.converged) for r in out["results"].values())
    assert out["jacobian_error"] < 1e-10


class _NonIsolatedCell(nn.Module):
    """f(z, x) = W z + U x with W = diag(1, 0.5, 0.3, -0.2) and U's first row 0: z_0 is a fixed
    point whatever its value (I - J singular), so dz*/dW_0j does not exist; a loss on the other
    components makes the backward system consistent, which a Krylov solve answers silently."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.diag(torch.tensor([1.0, 0.5, 0.3, -0.2], dtype=F64)))
        U = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
        U[0] = 0
        self.U = nn.Parameter(U)

    def forward(self, z, x):
        return z @ self.W.T + x @ self.U.T


def test_default_ift_refuses_a_non_isolated_fixed_point():
    """The default IFT() keeps the uniqueness probe: a consistent singular (I - J)^T is refused
    (SingularJacobianError), where the probe turned off returns one of many 'gradients'."""
    cell = _NonIsolatedCell()
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    z = DEQ(cell, z_shape=(4,))(x)
    with pytest.raises(idf.SingularJacobianError):
        torch.autograd.grad(z[:, 1:].pow(2).sum(), cell.W)
    z = DEQ(cell, z_shape=(4,), backward=IFT(idf.BiCGStab(check_singular=False)))(x)
    g = torch.autograd.grad(z[:, 1:].pow(2).sum(), cell.W)[0]
    assert torch.isfinite(g).all()  # answered without a word: why the default keeps the probe


class _ExpandingCell(nn.Module):
    """f(z, x) = W z + U x with W symmetric, eigenvalues in [-0.4, 0.4] and one at 1.6: the
    fixed point exists and is unique (I - W invertible) but f is not a contraction, so the
    fixed-point backward alone diverges."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=g))
        s = torch.linspace(-0.4, 0.4, 6, dtype=F64)
        s[0] = 1.6
        self.W = nn.Parameter((Q * s) @ Q.T)
        self.U = nn.Parameter(torch.randn(6, 3, dtype=F64, generator=g))

    def forward(self, z, x):
        return z @ self.W.T + x @ self.U.T


def test_default_ift_falls_back_where_f_does_not_contract():
    """The default backward (the fixed-point iteration, BiCGStab where it diverges) gives the
    closed-form gradient of a non-contracting linear cell, z* = (I - W)^-1 U x; the fixed-point
    iteration alone fails loudly there."""
    cell = _ExpandingCell()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    opts = {"maxiter": 200, "tol": 1e-12}
    z = DEQ(cell, z_shape=(6,), solver_options=opts)(x)
    gW, gU = torch.autograd.grad(z.pow(2).sum(), [cell.W, cell.U])
    # closed form: L = sum |(I - W)^-1 U x_i|^2; dL/dU = M^T 2 z x^T, dL/dW = M^T 2 z z^T
    M = torch.linalg.inv(torch.eye(6, dtype=F64) - cell.W.detach())
    zs = x @ (M @ cell.U.detach()).T
    V = 2 * zs @ M                                   # rows: (I - W)^-T 2 z_i
    torch.testing.assert_close(gW, V.T @ zs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gU, V.T @ x, rtol=1e-7, atol=1e-9)
    z = DEQ(cell, z_shape=(6,), solver_options=opts,
            backward=IFT(idf.Richardson(omega=-1.0, maxiter=500)))(x)
    with pytest.raises(idf.ImplicitDiffError):
        torch.autograd.grad(z.pow(2).sum(), [cell.W, cell.U])
