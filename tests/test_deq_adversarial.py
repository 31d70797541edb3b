"""DEQ layers and their per-sample assumptions (issue 11, "no silently wrong derivative").

A DEQ solves one fixed point per sample. Two ways that assumption broke silently:

- a cell that couples the samples (batch normalization with batch statistics, `z - z.mean(0)`,
  running statistics updated at every solver iteration): the PyTorch `DEQ` refuses it with a
  `StructureError` naming the module (or, for a plain coupling, found by a one-time probe);
- `on_failure="nan"` with one failed sample (its input NaN, or its solve diverging): only that
  sample may be NaN, and the parameters' gradient must be that of the other samples alone
  (PyTorch `DEQ`, JAX `deq` and the equinox `DEQ`, with and without `jit`, every backward mode).

Oracles: the same layer run on the other samples alone (whose gradient the existing DEQ tests
check against a dense oracle and finite differences), central finite differences of the whole
layer, and a loop over the samples one at a time.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_cells import Cell  # noqa: E402

import implicitdiff as idf  # noqa: E402
from implicitdiff.backend import NonConvergenceError, StructureError  # noqa: E402
from implicitdiff_torch import DEQ, IFT, JFB, Neumann, Phantom  # noqa: E402

F64 = torch.float64
H, D, B = 8, 4, 5
TIGHT = {"tol": 1e-13, "maxiter": 300}


# ---- cells ----------------------------------------------------------------------------------

class NormCell(nn.Module):
    """tanh(0.5 norm(W z) + U x): `norm` per sample (LayerNorm, GroupNorm) or not (BatchNorm)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.inner = Cell(H, D, 0.5)
        self.norm = norm

    def forward(self, z, x):
        return torch.tanh(0.5 * self.norm(self.inner.W(z)) + self.inner.U(x))


class InstanceCell(nn.Module):
    """A cell with an InstanceNorm over 2 channels of 4 (per sample)."""

    def __init__(self, track: bool):
        super().__init__()
        self.inner = Cell(H, D, 0.5)
        self.norm = nn.InstanceNorm1d(2, track_running_stats=track)

    def forward(self, z, x):
        y = self.inner.W(z).reshape(z.shape[0], 2, H // 2)
        return torch.tanh(0.5 * self.norm(y).reshape(z.shape) + self.inner.U(x))


class MeanCell(nn.Module):
    """Couples the samples without any normalization module: z - z.mean(0)."""

    def __init__(self):
        super().__init__()
        self.inner = Cell(H, D, 0.5)

    def forward(self, z, x):
        return torch.tanh(self.inner.W(z - 0.5 * z.mean(0, keepdim=True)) + self.inner.U(x))


class ScaledCell(nn.Module):
    """(1 + 3|x_0|) W z + U x: linear, a contraction only where |x_0| is small, so plain
    fixed-point iteration diverges for a sample with a large x_0."""

    def __init__(self):
        super().__init__()
        self.inner = Cell(H, D, 0.5)

    def forward(self, z, x):
        return (1 + 3 * x[:, :1].abs()) * self.inner.W(z) + self.inner.U(x)


def xs(batch=B, seed=5):
    return torch.randn(batch, D, dtype=F64, generator=torch.Generator().manual_seed(seed))


def fd_agrees(cell, x, **kw):
    """The layer's gradient in x against central differences of the whole layer in a random
    direction (relative error < 1e-6)."""
    deq = DEQ(cell, z_shape=(H,), solver_options=TIGHT, **kw)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((deq(xx) ** 2).sum(), xx)
    v = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(9))
    eps = 1e-5
    with torch.no_grad():
        fd = ((deq(x + eps * v) ** 2).sum() - (deq(x - eps * v) ** 2).sum()) / (2 * eps)
    return abs(float(fd) - float((g * v).sum())) <= 1e-6 * abs(float(fd))


# ---- coupling: refused -------------------------------------------------------------------------

@pytest.mark.parametrize("make_norm, state", [
    (lambda: nn.BatchNorm1d(H), "in training mode"),
    (lambda: nn.BatchNorm1d(H, track_running_stats=False).eval(), "without running statistics"),
    (lambda: nn.SyncBatchNorm(H), "in training mode"),
])
def test_batch_statistics_refused(make_norm, state):
    cell = NormCell(make_norm()).to(F64)
    before = {k: v.clone() for k, v in cell.state_dict().items()}
    deq = DEQ(cell, z_shape=(H,), solver_options=TIGHT)
    with pytest.raises(StructureError) as e:
        deq(xs())
    msg = str(e.value)
    assert "f.norm" in msg and state in msg
    assert "one fixed point per sample" in msg and "GroupNorm" in msg and "eval" in msg
    # refused before f ran: the running statistics are untouched
    for k, v in cell.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batchnorm_eval_mode_is_per_sample_and_exact():
    cell = NormCell(nn.BatchNorm1d(H)).to(F64)
    with torch.no_grad():
        cell.norm.running_mean.uniform_(-0.5, 0.5)
        cell.norm.running_var.uniform_(0.5, 2.0)
    cell.eval()
    assert fd_agrees(cell, xs())


@pytest.mark.parametrize("norm", [nn.LayerNorm(H), nn.GroupNorm(2, H)])
def test_per_sample_normalizations_pass(norm):
    assert fd_agrees(NormCell(norm).to(F64), xs())


def test_running_statistics_updated_per_iteration_refused():
    cell = InstanceCell(track=True).to(F64)
    with pytest.raises(StructureError, match=r"f\.norm \(InstanceNorm1d\) in training mode "
                                             r"updates its running statistics"):
        DEQ(cell, z_shape=(H,), solver_options=TIGHT)(xs())
    assert float(cell.norm.running_mean.abs().max()) == 0.0   # untouched
    cell.eval()   # frozen statistics: fine
    DEQ(cell, z_shape=(H,), solver_options=TIGHT)(xs())
    assert fd_agrees(InstanceCell(track=False).to(F64), xs())   # no running statistics: fine


def test_coupling_cell_found_by_the_probe():
    deq = DEQ(MeanCell().to(F64), z_shape=(H,), solver_options=TIGHT)
    with torch.no_grad():
        deq(xs())   # no derivative recorded: nothing to spoil, no probe
    with pytest.raises(StructureError, match="couples the samples of the batch"):
        deq(xs())


def test_coupling_probe_runs_once_and_costs_one_application():
    calls = []

    class Counting(Cell):
        def forward(self, z, x):
            calls.append(z.shape[0])
            return super().forward(z, x)

    deq = DEQ(Counting(H, D, 0.5).to(F64), z_shape=(H,), solver_options=TIGHT)
    deq(xs())
    first = len(calls)
    calls.clear()
    deq(xs())
    assert first == len(calls) + 1   # the probe: one application of f, first call only


def test_coupling_probe_single_sample_and_eval_batchnorm_in_phantom():
    # batch of one: nothing to couple, no probe; the step modes get the same checks
    deq = DEQ(MeanCell().to(F64), z_shape=(H,), solver_options=TIGHT, backward=Phantom(3))
    deq(xs(batch=1))
    with pytest.raises(StructureError):
        DEQ(NormCell(nn.BatchNorm1d(H)).to(F64), z_shape=(H,), backward=JFB())(xs())


# ---- on_failure="nan": one failed sample spoils nothing else ---------------------------------

MODES = [IFT(), Neumann(5), Phantom(3), JFB()]


def failing_case(kind):
    """(cell, x, solver): sample 0 fails, by a NaN input or a diverging solve."""
    x = xs()
    if kind == "nan-input":
        x[0, 1] = float("nan")
        return Cell(H, D, 0.5).to(F64), x, "anderson"
    x = 0.05 * x
    x[0, 0] = 5.0
    return ScaledCell().to(F64), x, "fixed_point_iteration"


def grads(deq, x):
    xx = x.clone().requires_grad_(True)
    z = deq(xx)
    loss = torch.nan_to_num(z - 0.3, nan=0.0).square().sum()
    params = list(deq.parameters())
    return z, torch.autograd.grad(loss, [*params, xx])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("kind", ["nan-input", "failed-solve"])
def test_torch_nan_isolates_failed_sample(mode, kind):
    cell, x, solver = failing_case(kind)
    deq = DEQ(cell, z_shape=(H,), solver=solver, solver_options=TIGHT, backward=mode,
              on_failure="nan")
    z, g = grads(deq, x)
    assert torch.isnan(z[0]).all() and torch.isfinite(z[1:]).all()
    assert deq.stats is not None and deq.stats.converged.tolist() == [False] + [True] * (B - 1)
    # oracle: the same layer on the other samples alone
    alone = DEQ(cell, z_shape=(H,), solver=solver, solver_options=TIGHT, backward=mode)
    z2, g2 = grads(alone, x[1:])
    torch.testing.assert_close(z[1:], z2, rtol=1e-10, atol=1e-12)
    for a, b in zip(g[:-1], g2[:-1]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(g[-1][1:], g2[-1], rtol=1e-8, atol=1e-11)
    assert (g[-1][0] == 0).all()   # the failed sample's input gets no gradient


def test_torch_nan_isolation_matches_per_sample_loop_and_fd():
    cell, x, _ = failing_case("nan-input")
    deq = DEQ(cell, z_shape=(H,), solver_options=TIGHT, on_failure="nan")
    _, g = grads(deq, x)
    # a loop over the good samples one at a time: the gradients add up
    total = [torch.zeros_like(p) for p in deq.parameters()]
    one = DEQ(cell, z_shape=(H,), solver_options=TIGHT)
    for i in range(1, B):
        _, gi = grads(one, x[i:i + 1])
        total = [t + gg for t, gg in zip(total, gi[:-1])]
    for a, b in zip(g[:-1], total):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    # finite differences of the loss in the parameter W, with the NaN sample in the batch
    W = cell.W.weight
    v = torch.randn(W.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    eps = 1e-5

    def loss():
        with torch.no_grad():
            return float(torch.nan_to_num(deq(x) - 0.3, nan=0.0).square().sum())

    with torch.no_grad():
        W += eps * v
    lp = loss()
    with torch.no_grad():
        W -= 2 * eps * v
    lm = loss()
    with torch.no_grad():
        W += eps * v
    fd = (lp - lm) / (2 * eps)
    assert abs(fd - float((g[0] * v).sum())) <= 1e-6 * abs(fd)


def test_torch_raise_names_the_nan_input_sample():
    cell, x, _ = failing_case("nan-input")
    with pytest.raises(NonConvergenceError, match=r"samples \[0\]"):
        DEQ(cell, z_shape=(H,), solver_options=TIGHT)(x)


def test_torch_on_failure_default_is_read_at_call():
    cell, x, _ = failing_case("nan-input")
    deq = DEQ(cell, z_shape=(H,), solver_options=TIGHT)   # on_failure=None
    assert deq.on_failure is None
    with idf.config.override(on_failure="nan"):
        z, g = grads(deq, x)
    assert torch.isnan(z[0]).all() and all(torch.isfinite(t).all() for t in g)
    with pytest.raises(NonConvergenceError):
        deq(x)   # back to the process default, "raise"
    saved = copy.deepcopy(deq)   # a copy builds its own layers
    with idf.config.override(on_failure="nan"):
        assert torch.isnan(saved(x)[0]).all()


# ---- JAX: deq and the equinox DEQ ----------------------------------------------------------

def _jax_setup():
    jax = pytest.importorskip("jax")
    eqx = pytest.importorskip("equinox")
    return jax, eqx


@pytest.fixture
def x64():
    jax, _ = _jax_setup()
    with jax.enable_x64(True):
        yield


def _jax_cell(scale):
    _, eqx = _jax_setup()
    import jax.numpy as jnp

    class ECell(eqx.Module):
        W: Any
        U: Any
        b: Any

        def __call__(self, z, x):
            if scale:
                return (1 + 3 * jnp.abs(x[:, :1])) * (z @ self.W.T) + x @ self.U.T + self.b
            return jnp.tanh(z @ self.W.T + x @ self.U.T + self.b)

    c = Cell(H, D, 0.5)
    arr = lambda t: jnp.asarray(t.detach().numpy(), dtype=jnp.float64)  # noqa: E731
    return ECell(arr(c.W.weight), arr(c.U.weight), arr(c.U.bias))


# every form and mode once; the two mechanisms (the implicit rule's, the recorded steps') in
# every form, with and without jit (each case compiles: about 10 s)
JAX_CASES = [(mode, "nan-input", form, jit) for mode in ("ift", "phantom")
             for form in ("deq", "equinox") for jit in (False, True)]
JAX_CASES += [(mode, "failed-solve", "deq", True) for mode in ("ift", "phantom")]
JAX_CASES += [("neumann", "failed-solve", "equinox", True), ("jfb", "nan-input", "deq", False)]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode, kind, form, jit", JAX_CASES,
                         ids=["-".join(map(str, c)) for c in JAX_CASES])
def test_jax_nan_isolates_failed_sample(mode, kind, form, jit):
    _, eqx = _jax_setup()
    import jax.numpy as jnp

    from implicitdiff.deq import as_backward
    from implicitdiff_jax import DEQ as JDEQ
    from implicitdiff_jax import deq as jdeq

    x = xs().numpy()
    solver = "anderson"
    if kind == "nan-input":
        x[0, 1] = np.nan
    else:
        x = 0.05 * x
        x[0, 0] = 5.0
        solver = "fixed_point_iteration"
    x = jnp.asarray(x)
    cell = _jax_cell(kind == "failed-solve")
    backward = as_backward(mode)

    def loss(cell, x, on_failure):
        if form == "deq":
            z, stats = jdeq(cell, x, z_shape=(H,), solver=solver, solver_options=TIGHT,
                            backward=backward, on_failure=on_failure)
        else:
            z, stats = JDEQ(cell, z_shape=(H,), solver=solver, solver_options=TIGHT,
                            backward=backward, on_failure=on_failure)(x)
        return jnp.sum(jnp.nan_to_num(z - 0.3, nan=0.0) ** 2), (z, stats.converged)

    def both(cell, x, on_failure):
        (_, aux), (gc, gx) = eqx.filter_value_and_grad(
            lambda cx: loss(cx[0], cx[1], on_failure), has_aux=True)((cell, x))
        return aux, gc, gx

    run = eqx.filter_jit(both) if jit else both
    (z, conv), gc, gx = run(cell, x, "nan")
    z = np.asarray(z)
    assert np.isnan(z[0]).all() and np.isfinite(z[1:]).all()
    assert np.asarray(conv).tolist() == [False] + [True] * (B - 1)
    (z2, _), gc2, gx2 = run(cell, x[1:], "raise")
    np.testing.assert_allclose(z[1:], z2, rtol=1e-10, atol=1e-12)
    for name in ("W", "U", "b"):
        a, b = np.asarray(getattr(gc, name)), np.asarray(getattr(gc2, name))
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11, err_msg=name)
    np.testing.assert_allclose(np.asarray(gx)[1:], np.asarray(gx2), rtol=1e-8, atol=1e-11)
    assert (np.asarray(gx)[0] == 0).all()


@pytest.mark.usefixtures("x64")
def test_jax_on_failure_default_is_read_at_call():
    _jax_setup()
    import jax.numpy as jnp

    from implicitdiff_jax import DEQ as JDEQ
    from implicitdiff_jax import deq as jdeq

    x = xs().numpy()
    x[0, 1] = np.nan
    cell = _jax_cell(False)
    model = JDEQ(cell, z_shape=(H,), solver_options=TIGHT)
    assert model.on_failure is None
    with idf.config.override(on_failure="nan"):
        z, _ = model(jnp.asarray(x))
        z2, _ = jdeq(cell, x, z_shape=(H,), solver_options=TIGHT)   # NumPy input too
    for zz in (z, z2):
        assert np.isnan(np.asarray(zz)[0]).all() and np.isfinite(np.asarray(zz)[1:]).all()
    with pytest.raises(NonConvergenceError, match=r"samples \[0\]"):
        model(jnp.asarray(x))


def test_correction_states_refuse_batch_statistics():
    from implicitdiff_torch import correction_states

    deq = DEQ(NormCell(nn.BatchNorm1d(H)).to(F64), z_shape=(H,))
    with pytest.raises(StructureError, match=r"f\.norm \(BatchNorm1d\)"):
        correction_states(deq, xs())
    deq.eval()
    assert len(correction_states(deq, xs(), iterations=(1, 2))) == 2
