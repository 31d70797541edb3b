"""Neural ODEs: `idf.ode.odeint` (PyTorch and JAX; `grad="direct"`, `"checkpoint"`,
`"backsolve"`) against torchdiffeq (`odeint`, `odeint_adjoint`), torchode and diffrax
(`RecursiveCheckpointAdjoint`, `BacksolveAdjoint`, `DirectAdjoint`): forward + backward time,
evaluations of the vector field forward and backward, memory, and gradient error against a tight
float64 reference; then peak memory against the number of steps.

    bash benchmarks/install_ode_peers.sh           # the peers: torchdiffeq 0.2.5, torchode
                                                   # 1.0.1, diffrax 0.7.2 (torch, jax pinned)
    python benchmarks/bench_ode.py                 # state 2 and 32, float64, the memory sweep
                                                   # (about 8-10 minutes on 2 shared cores)
    python benchmarks/bench_ode.py --quick         # smoke run (about a minute): state 2,
                                                   # 3 rounds, no JAX call counting, no
                                                   # cross-check, memory at 100 steps only
    python benchmarks/bench_ode.py --dim 32 --only torchdiffeq implicitdiff --no-memory
    python benchmarks/bench_ode.py --ffjord-only --quick   # FFJORD alone: PyTorch and JAX rows

Single-threaded: unless already set, the script sets OMP_NUM_THREADS, OPENBLAS_NUM_THREADS,
MKL_NUM_THREADS to 1 and XLA_FLAGS to one intra-op thread before importing torch and jax, and
calls `torch.set_num_threads(1)` (as docs/benchmarks.md reports the other benchmarks: on a shared
2-core machine, spinning OpenMP/BLAS threads make multi-threaded timings swing between rounds).

The problem (issue 13). A batch of `--batch` (256) initial states y0 ~ N(0, I) of dimension d
(`--dim`: 2 and 32) under the autonomous MLP vector field with one hidden layer of 64 units,

    f(t, y) = W2 tanh(W1 y + b1) + b2,   W1 ~ N(0, 1/d), b1 ~ N(0, 1/4), W2 ~ N(0, 2.25/64),
                                         b2 ~ N(0, 1/100),

integrated over t in [0, 1] (outputs at t = 0 and 1) by Dormand–Prince 5(4) (`dopri5`) with
rtol = atol = 1e-6 in float64. The loss is L = Σ_i w_iᵀ y_i(1) with w fixed and Gaussian; the
gradient is taken with respect to W1, b1, W2, b2 and y0.

The reference: `idf.ode.odeint(..., method="dopri5", rtol=1e-12, atol=1e-12, grad="direct")` in
PyTorch float64, 55-70 steps per sample. The full run checks it against an independent code,
torchdiffeq's `odeint` at the same tolerance, and prints their relative difference (about
1e-11). "y(1) err" and "grad err" are ‖x − x_ref‖ / ‖x_ref‖ over the whole batch (for the
gradient, the five gradients together).

The contenders, all `dopri5`, rtol = atol = 1e-6, float64, their defaults otherwise:

- implicitdiff `odeint` with `grad="direct"`, `"checkpoint"` and `"backsolve"`, in PyTorch and
  in JAX (inside `jax.jit(jax.value_and_grad)`, with `max_steps` twice the most steps a sample
  needs, as docs/neural-odes.md advises, since JAX's reverse mode through `"direct"` stores all
  `max_steps` iterations). Per-sample steps forward; its backsolve adjoint integrates the batch
  as one state. A mode that does not run in this checkout is detected at start-up (a gradient
  check on y' = -ky) and its rows say why. "backsolve without seminorm" calls the private
  `implicitdiff.ode._backsolve.backsolve(..., seminorm=False)` (`odeint` has no switch for it),
  for the issue's seminorm target.
- torchdiffeq 0.2.5 `odeint` (backpropagation through the solver) and `odeint_adjoint`
  (continuous adjoint), the latter also with `adjoint_options=dict(norm="seminorm")`. One step
  size for the whole batch; its error norm is the RMS over the whole batch's state.
- torchode 1.0.1: `AutoDiffAdjoint(Dopri5(term), IntegralController(atol, rtol, term=term))`
  (its README's controller), per-sample steps, called eagerly (no `torch.compile`, which would
  add minutes of compilation to every configuration here).
- diffrax 0.7.2: `diffeqsolve(ODETerm, Dopri5(), 0, 1, None, y0, stepsize_controller=
  PIDController(rtol, atol), saveat=SaveAt(t1=True), adjoint=...)` under `jax.vmap` over the
  batch (diffrax's Neural ODE example: per-sample steps), `jax.jit(jax.value_and_grad)`, with
  `RecursiveCheckpointAdjoint()` (its default), `BacksolveAdjoint()` and `DirectAdjoint()`,
  and the same `max_steps` as implicitdiff's JAX rows. Under `vmap` the backsolve adjoint
  carries one parameter cotangent per sample, so `BacksolveAdjoint` also runs on the batch as
  one (256, d) state (no `vmap`): the same adjoint as implicitdiff's and torchdiffeq's, and the
  row the target compares with. `--quick` leaves the `vmap` backsolve row out.

Columns. "fwd+bwd": median wall-clock time of one call of the loss and its gradient
(`torch.autograd.grad`; `jax.block_until_ready` of the jitted value and gradient). "× idf":
the median over rounds of the ratio to implicitdiff's `"direct"` call in the same framework and
round. "f calls fwd / bwd": how many times the vector field was called (each call evaluates the
whole batch; under diffrax's `vmap`, calls per sample are counted as batch-wide calls) during the
forward pass and during the backward pass: a Python counter in PyTorch; in JAX a
`jax.debug.callback` in a separately compiled, untimed copy (forward: the jitted loss; backward:
the jitted value and gradient minus the forward). Backpropagation through the solver's steps
("direct", torchdiffeq `odeint`, torchode) calls f 0 times backward: its backward cost is the
recorded VJPs, not evaluations; an adjoint's backward call is one evaluation and one VJP of f.
"NFE/sample": the method's own per-sample statistic (mean) where it reports one (implicitdiff
`stats.nfe`, torchode `n_f_evals`; diffrax: 7 + 6 × `num_steps`, approximately). "memory"
(PyTorch, "saved"): the bytes of the distinct tensors autograd saves for backward while the
forward runs (`torch.autograd.graph.saved_tensors_hooks`, as in bench_qp.py); tensors a method
keeps outside autograd (checkpoints stored on the autograd context, say) are not seen. (JAX,
"XLA temp"): `temp_size_in_bytes` of the compiled value-and-gradient program's memory analysis,
its peak scratch memory.

How it is timed: as bench_qp.py. Each callable is called once to warm up (and compile), then
the methods take turns for `--repeats` rounds in an order shuffled each round, so a load spike on
the shared machine hits all of them; a method whose warm call took longer than
`--cell-budget / repeats` gets fewer rounds (at least 3). Garbage collection is off during the
rounds.

Memory against steps (PyTorch; RK4 with fixed steps of 1/N, batch 16, d = 2, float64): per
gradient mode, the autograd-saved bytes of the forward pass and the peak bytes of all tensors
alive during forward + backward (`LiveBytes`, a `TorchDispatchMode` meter that sees every
allocation), for N = 100 and 1,000, and 10,000 for `"checkpoint"` (the issue's target: at most
2x from 100 to 10,000 steps; the meter costs about 10 µs per torch operation, so 10,000 steps of
the others would take minutes).

At equal gradient error (issue 15; `--no-equal` skips it): for each peer, the cheapest
implicitdiff setting, a gradient mode and rtol = atol on a ladder from 1e-6 to 1e-3, whose
gradient error (against the same reference) is at most the peer's. The ladder's errors are
measured once in PyTorch; per mode the loosest rung within the peer's error is a candidate (in
JAX its own error is checked, a rung tighter if needed); the peer and the candidates then take
turns in shuffled order, and the candidate with the lowest median per-round ratio to the peer
is the row's "ours".

FFJORD (`--no-ffjord` skips it, `--ffjord-only` runs it alone): examples/ffjord_moons.py's
model on 256 standardized two-moons points at rtol = atol = 1e-5, float64, the loss and gradient
of the mean negative log-likelihood with Hutchinson's estimator (a fixed Rademacher noise), its
error against implicitdiff `"direct"` at 1e-10 in PyTorch: in PyTorch implicitdiff's three modes
against torchdiffeq (`bench_ffjord`), then the same weights, data and noise in JAX, implicitdiff's
three modes against diffrax's `RecursiveCheckpointAdjoint` and `BacksolveAdjoint` (`vmap`, and
the batch as one state; `bench_ffjord_jax`).

Ends with the issue's targets, each "met", "MISSED" or "NOT MEASURED" (with the reason).
"""

from __future__ import annotations

import os

for _k, _v in (("OMP_NUM_THREADS", "1"), ("OPENBLAS_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"),
               ("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")):
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Callable  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import implicitdiff as idf  # noqa: E402
from implicitdiff import ode  # noqa: E402

try:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - optional
    jax = jnp = None

torch.set_num_threads(1)

TOL = 1e-6
REF_TOL = 1e-12
HIDDEN = 64
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
NAMES = ("W1", "b1", "W2", "b2", "y0")

IDF_T = "implicitdiff `odeint` direct (torch)"
IDF_TC = "implicitdiff `odeint` checkpoint (torch)"
IDF_TB = "implicitdiff `odeint` backsolve (torch)"
IDF_TBN = "implicitdiff backsolve without seminorm (torch)"
TDQ = "torchdiffeq `odeint` (torch)"
TDQ_A = "torchdiffeq `odeint_adjoint` (torch)"
TDQ_AS = "torchdiffeq `odeint_adjoint`, seminorm (torch)"
TODE = "torchode `AutoDiffAdjoint` (torch)"
IDF_J = "implicitdiff `odeint` direct (JAX, jit)"
IDF_JC = "implicitdiff `odeint` checkpoint (JAX, jit)"
IDF_JB = "implicitdiff `odeint` backsolve (JAX, jit)"
DFX_R = "diffrax `RecursiveCheckpointAdjoint` (JAX, jit + vmap)"
DFX_B = "diffrax `BacksolveAdjoint` (JAX, jit + vmap)"
DFX_B1 = "diffrax `BacksolveAdjoint`, batch as one state (JAX, jit)"
DFX_D = "diffrax `DirectAdjoint` (JAX, jit + vmap)"


def _import_error(mod: str) -> str | None:
    try:
        __import__(mod)
        return None
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"{type(e).__name__}: {e}".splitlines()[0]


def _short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return msg[0][:160] if msg else type(e).__name__


# ---- the problem -------------------------------------------------------------------------------

def make_problem(d: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """MLP parameters, initial states and loss weights (float64 NumPy)."""
    rng = np.random.default_rng([seed, d])
    return dict(
        W1=rng.standard_normal((HIDDEN, d)) / np.sqrt(d),
        b1=0.5 * rng.standard_normal(HIDDEN),
        W2=1.5 * rng.standard_normal((d, HIDDEN)) / np.sqrt(HIDDEN),
        b2=0.1 * rng.standard_normal(d),
        y0=rng.standard_normal((batch, d)),
        w=rng.standard_normal((batch, d)),
    )


class Counter:
    """Calls of the vector field, by phase ("fwd" while the loss runs, "bwd" during backward)."""

    def __init__(self) -> None:
        self.phase = "fwd"
        self.calls = {"fwd": 0, "bwd": 0}

    def hit(self, n: int = 1) -> None:
        self.calls[self.phase] += n

    def reset(self) -> None:
        self.phase = "fwd"
        self.calls = {"fwd": 0, "bwd": 0}


def mlp_torch(y: torch.Tensor, W1, b1, W2, b2) -> torch.Tensor:
    return torch.tanh(y @ W1.T + b1) @ W2.T + b2


def mlp_np(y: np.ndarray, P: dict[str, np.ndarray]) -> np.ndarray:
    return np.tanh(y @ P["W1"].T + P["b1"]) @ P["W2"].T + P["b2"]


def check_ode_function(P: dict[str, np.ndarray]) -> None:
    """The three frameworks' vector fields agree (a guard against a typo in one of them)."""
    ref = mlp_np(P["y0"], P)
    t = mlp_torch(*(torch.tensor(P[k]) for k in ("y0", "W1", "b1", "W2", "b2"))).numpy()
    np.testing.assert_allclose(t, ref, rtol=1e-12, atol=1e-12)
    if jax is not None:
        j = np.asarray(mlp_jax(jnp.asarray(P["y0"]), *(jnp.asarray(P[k])
                                                      for k in ("W1", "b1", "W2", "b2"))))
        np.testing.assert_allclose(j, ref, rtol=1e-12, atol=1e-12)


def mlp_jax(y, W1, b1, W2, b2):
    return jnp.tanh(y @ W1.T + b1) @ W2.T + b2


# ---- the reference -----------------------------------------------------------------------------

def _torch_inputs(P: dict[str, np.ndarray]) -> tuple[list[torch.Tensor], torch.Tensor]:
    return ([torch.tensor(P[k], dtype=torch.float64, requires_grad=True) for k in NAMES],
            torch.tensor(P["w"], dtype=torch.float64))


def reference(P: dict[str, np.ndarray]) -> dict[str, Any]:
    """y(1) and ∇L by implicitdiff `"direct"` in torch float64 at rtol = atol = 1e-12."""
    ins, w = _torch_inputs(P)
    W1, b1, W2, b2, y0 = ins
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    t = time.perf_counter()
    sol = ode.odeint(lambda t_, y, *a: mlp_torch(y, *a), y0, ts, W1, b1, W2, b2,
                     method="dopri5", rtol=REF_TOL, atol=REF_TOL, max_steps=100_000,
                     grad="direct", full_output=True)
    y1 = sol.ys[-1]
    gs = torch.autograd.grad((w * y1).sum(), ins)
    steps = (sol.stats.accepted + sol.stats.rejected).numpy()
    return dict(y=y1.detach().numpy(), g=[g.numpy() for g in gs], steps_mean=float(steps.mean()),
                steps_max=int(steps.max()), seconds=time.perf_counter() - t)


def steps_needed(P: dict[str, np.ndarray]) -> int:
    """The most steps (accepted and rejected) a sample takes at the benchmark's tolerance."""
    ins, _ = _torch_inputs(P)
    with torch.no_grad():
        sol = ode.odeint(lambda t_, y, *a: mlp_torch(y, *a), ins[4], torch.tensor(TS_NP),
                         *ins[:4], method="dopri5", rtol=TOL, atol=TOL, full_output=True)
    return int((sol.stats.accepted + sol.stats.rejected).max())


def cross_check(P: dict[str, np.ndarray], ref: dict[str, Any]) -> str:
    """The reference against torchdiffeq's `odeint` at the same tolerance (independent code)."""
    if _import_error("torchdiffeq"):
        return "torchdiffeq not installed: reference not cross-checked"
    import torchdiffeq

    ins, w = _torch_inputs(P)
    W1, b1, W2, b2, y0 = ins
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y1 = torchdiffeq.odeint(lambda t_, y: mlp_torch(y, W1, b1, W2, b2), y0, ts,
                            method="dopri5", rtol=REF_TOL, atol=REF_TOL)[-1]
    gs = torch.autograd.grad((w * y1).sum(), ins)
    ey = rel([y1.detach().numpy()], [ref["y"]])
    eg = rel([g.numpy() for g in gs], ref["g"])
    return (f"reference cross-check: torchdiffeq `odeint` at rtol = atol = {REF_TOL:g} differs "
            f"from it by {ey:.1e} in y(1) and {eg:.1e} in the gradient")


def rel(got: list[Any], ref: list[np.ndarray]) -> float:
    num = sum(float(np.sum((np.asarray(g, np.float64) - r) ** 2)) for g, r in zip(got, ref))
    den = sum(float(np.sum(r ** 2)) for r in ref)
    return (num / den) ** 0.5


# ---- the contenders ----------------------------------------------------------------------------
# A builder takes (P, counter, ctx) and returns a dict:
#   fwdbwd() -> (y1, [gradients in NAMES order]); optional: per_sample_nfe (float),
#   saved_kib (float), temp_kib (float), calls (dict fwd/bwd), note (str).
# ctx carries the JAX max_steps and the "checkpoint" availability.

TS_NP = np.array([0.0, 1.0])


def _torch_fwdbwd(loss_and_y: Callable[[list[torch.Tensor]], tuple[torch.Tensor, Any]],
                  P: dict[str, np.ndarray], counter: Counter) -> dict[str, Any]:
    ins, w = _torch_inputs(P)

    def fwdbwd():
        counter.phase = "fwd"
        y1, _ = loss_and_y(ins)
        counter.phase = "bwd"
        gs = torch.autograd.grad((w * y1).sum(), ins)
        counter.phase = "fwd"
        return y1.detach(), [g.numpy() for g in gs]

    def saved() -> float:
        seen, nbytes = set(), 0

        def pack(t):
            nonlocal nbytes
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                nbytes += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y1, _ = loss_and_y(ins)
        del y1
        return nbytes / 1024

    def extra() -> Any:
        with torch.no_grad():
            return loss_and_y(ins)[1]

    return dict(fwdbwd=fwdbwd, saved=saved, extra=extra)


def build_idf_torch(P, counter, ctx, grad="direct", seminorm=True, tol=TOL):
    def f(t, y, *a):
        counter.hit()
        return mlp_torch(y, *a)

    ts = torch.tensor(TS_NP)
    if seminorm:
        solve = functools.partial(ode.odeint, grad=grad)
    else:  # odeint has no public switch for it: the private function behind "backsolve"
        from implicitdiff.ode._backsolve import backsolve

        def solve(f_, y0_, ts_, *args, **kw):
            return backsolve(f_, y0_, ts_, args, dt0=None, max_steps=4096, on_failure=None,
                             seminorm=False, **kw)

    def run(ins):
        W1, b1, W2, b2, y0 = ins
        sol = solve(f, y0, ts, W1, b1, W2, b2, method="dopri5", rtol=tol, atol=tol,
                    full_output=True)
        return sol.ys[-1], sol.stats

    out = _torch_fwdbwd(run, P, counter)
    out["nfe"] = lambda: float(out["extra"]().nfe.double().mean())
    return out


def build_idf_torch_ckpt(P, counter, ctx):
    return build_idf_torch(P, counter, ctx, grad="checkpoint")


def build_idf_torch_bs(P, counter, ctx):
    return build_idf_torch(P, counter, ctx, grad="backsolve")


def build_idf_torch_bs_nosemi(P, counter, ctx):
    return build_idf_torch(P, counter, ctx, grad="backsolve", seminorm=False)


class _Field(torch.nn.Module):
    def __init__(self, counter: Counter):
        super().__init__()
        self.counter = counter

    def forward(self, t, y):
        self.counter.hit()
        return mlp_torch(y, *self.params)


def build_torchdiffeq(P, counter, ctx, adjoint=False, seminorm=False):
    import torchdiffeq

    ts = torch.tensor(TS_NP)
    field = _Field(counter)

    def run(ins):
        W1, b1, W2, b2, y0 = ins
        field.params = (W1, b1, W2, b2)
        if adjoint:
            kw = dict(adjoint_options=dict(norm="seminorm")) if seminorm else {}
            ys = torchdiffeq.odeint_adjoint(field, y0, ts, method="dopri5", rtol=TOL, atol=TOL,
                                            adjoint_params=(W1, b1, W2, b2), **kw)
        else:
            ys = torchdiffeq.odeint(field, y0, ts, method="dopri5", rtol=TOL, atol=TOL)
        return ys[-1], None

    return _torch_fwdbwd(run, P, counter)


def build_tdq_adjoint(P, counter, ctx):
    return build_torchdiffeq(P, counter, ctx, adjoint=True)


def build_tdq_seminorm(P, counter, ctx):
    return build_torchdiffeq(P, counter, ctx, adjoint=True, seminorm=True)


def build_torchode(P, counter, ctx):
    import torchode as to

    params: list[Any] = [None]

    def f(t, y):
        counter.hit()
        return mlp_torch(y, *params[0])

    term = to.ODETerm(f)
    solver = to.AutoDiffAdjoint(to.Dopri5(term=term),
                                to.IntegralController(atol=TOL, rtol=TOL, term=term))
    B = P["y0"].shape[0]
    t_eval = torch.tensor(TS_NP).expand(B, -1)

    def run(ins):
        W1, b1, W2, b2, y0 = ins
        params[0] = (W1, b1, W2, b2)
        sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=t_eval))
        return sol.ys[:, -1], sol.stats

    out = _torch_fwdbwd(run, P, counter)
    out["nfe"] = lambda: float(out["extra"]()["n_f_evals"].double().mean())
    return out


def _jax_build(make_loss: Callable[[Callable], Callable], P: dict[str, np.ndarray],
               nfe: Callable[[Any], float], per_sample_callback: bool) -> dict[str, Any]:
    """`make_loss(field)` -> loss(W1, b1, W2, b2, y0) -> (L, (y1, stats)); `field(y, *params)`
    is the vector field (counted in a separate compile when counting is on). Under `vmap`
    (`per_sample_callback`) the counting callback runs once per sample of a batched call."""
    ins = [jnp.asarray(P[k]) for k in NAMES]
    loss = make_loss(mlp_jax)
    vg = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True))

    def fwdbwd():
        (_, (y1, _)), gs = jax.block_until_ready(vg(*ins))
        return y1, [np.asarray(g) for g in gs]

    out: dict[str, Any] = dict(fwdbwd=fwdbwd)

    def temp() -> float:
        ma = vg.lower(*ins).compile().memory_analysis()
        return float(ma.temp_size_in_bytes) / 1024 if ma is not None else float("nan")

    out["temp"] = temp
    out["nfe"] = lambda: nfe(jax.jit(loss)(*ins)[1][1])

    def calls() -> dict[str, int]:
        n = [0]
        B = P["y0"].shape[0]

        def bump(y):
            n[0] += 1

        def counted(y, *a):
            jax.debug.callback(bump, y)
            return mlp_jax(y, *a)

        cl = make_loss(counted)
        jax.block_until_ready(jax.jit(cl)(*ins))
        jax.effects_barrier()
        n_f, n[0] = n[0], 0
        jax.block_until_ready(jax.jit(jax.value_and_grad(cl, argnums=tuple(range(5)),
                                                         has_aux=True))(*ins))
        jax.effects_barrier()
        per = B if per_sample_callback else 1
        return {"fwd": round(n_f / per), "bwd": round((n[0] - n_f) / per)}

    out["calls"] = calls
    return out


def build_idf_jax(P, counter, ctx, grad="direct", tol=TOL):
    w = jnp.asarray(P["w"])
    ts = jnp.asarray(TS_NP)
    ms = ctx["max_steps"]

    def make_loss(field):
        def loss(W1, b1, W2, b2, y0):
            sol = ode.odeint(lambda t, y, *a: field(y, *a), y0, ts, W1, b1, W2, b2,
                             method="dopri5", rtol=tol, atol=tol, max_steps=ms, grad=grad,
                             full_output=True)
            y1 = sol.ys[-1]
            return jnp.sum(w * y1), (y1, sol.stats)
        return loss

    return _jax_build(make_loss, P, lambda st: float(np.mean(np.asarray(st.nfe))),
                      per_sample_callback=False)


def build_idf_jax_ckpt(P, counter, ctx):
    return build_idf_jax(P, counter, ctx, grad="checkpoint")


def build_idf_jax_bs(P, counter, ctx):
    return build_idf_jax(P, counter, ctx, grad="backsolve")


def build_diffrax(P, counter, ctx, adjoint="recursive"):
    import diffrax

    w = jnp.asarray(P["w"])
    ms = ctx["max_steps"]
    adj = {"recursive": diffrax.RecursiveCheckpointAdjoint,
           "backsolve": diffrax.BacksolveAdjoint,
           "direct": diffrax.DirectAdjoint}[adjoint]()

    def make_loss(field):
        term = diffrax.ODETerm(lambda t, y, a: field(y, *a))

        def one(y0, W1, b1, W2, b2):
            sol = diffrax.diffeqsolve(term, diffrax.Dopri5(), 0.0, 1.0, None, y0,
                                      args=(W1, b1, W2, b2),
                                      stepsize_controller=diffrax.PIDController(rtol=TOL,
                                                                                atol=TOL),
                                      saveat=diffrax.SaveAt(t1=True), adjoint=adj,
                                      max_steps=ms)
            return sol.ys[-1], sol.stats["num_steps"]

        batched = jax.vmap(one, in_axes=(0, None, None, None, None))

        def loss(W1, b1, W2, b2, y0):
            y1, steps = batched(y0, W1, b1, W2, b2)
            return jnp.sum(w * y1), (y1, steps)
        return loss

    return _jax_build(make_loss, P, lambda steps: float(np.mean(7 + 6 * np.asarray(steps))),
                      per_sample_callback=True)


def build_dfx_backsolve(P, counter, ctx):
    return build_diffrax(P, counter, ctx, adjoint="backsolve")


def build_dfx_backsolve_one(P, counter, ctx):
    """diffrax's `BacksolveAdjoint` on the whole batch as one (256, d) state: one step size for
    the batch, the parameters' adjoint integrated once (as implicitdiff's and torchdiffeq's
    adjoints do), instead of once per sample under `vmap`."""
    import diffrax

    w = jnp.asarray(P["w"])

    def make_loss(field):
        term = diffrax.ODETerm(lambda t, y, a: field(y, *a))

        def loss(W1, b1, W2, b2, y0):
            sol = diffrax.diffeqsolve(term, diffrax.Dopri5(), 0.0, 1.0, None, y0,
                                      args=(W1, b1, W2, b2),
                                      stepsize_controller=diffrax.PIDController(rtol=TOL,
                                                                                atol=TOL),
                                      saveat=diffrax.SaveAt(t1=True),
                                      adjoint=diffrax.BacksolveAdjoint(),
                                      max_steps=ctx["max_steps"])
            y1 = sol.ys[-1]
            return jnp.sum(w * y1), (y1, sol.stats["num_steps"])
        return loss

    return _jax_build(make_loss, P, lambda steps: float(7 + 6 * np.asarray(steps)),
                      per_sample_callback=False)


def build_dfx_direct(P, counter, ctx):
    return build_diffrax(P, counter, ctx, adjoint="direct")


# name, framework, builder, module whose import it needs
CONTENDERS: list[tuple[str, str, Callable, str]] = [
    (IDF_T, "torch", build_idf_torch, "implicitdiff"),
    (IDF_TC, "torch", build_idf_torch_ckpt, "implicitdiff"),
    (IDF_TB, "torch", build_idf_torch_bs, "implicitdiff"),
    (IDF_TBN, "torch", build_idf_torch_bs_nosemi, "implicitdiff.ode._backsolve"),
    (TDQ, "torch", build_torchdiffeq, "torchdiffeq"),
    (TDQ_A, "torch", build_tdq_adjoint, "torchdiffeq"),
    (TDQ_AS, "torch", build_tdq_seminorm, "torchdiffeq"),
    (TODE, "torch", build_torchode, "torchode"),
    (IDF_J, "jax", build_idf_jax, "jax"),
    (IDF_JC, "jax", build_idf_jax_ckpt, "jax"),
    (IDF_JB, "jax", build_idf_jax_bs, "jax"),
    (DFX_R, "jax", build_diffrax, "diffrax"),
    (DFX_B, "jax", build_dfx_backsolve, "diffrax"),
    (DFX_B1, "jax", build_dfx_backsolve_one, "diffrax"),
    (DFX_D, "jax", build_dfx_direct, "diffrax"),
]
# not in --quick (a minute): the slowest compile and the slowest row, no target uses it
QUICK_SKIP = (DFX_B,)
MODE_ROWS = {IDF_TC: "checkpoint", IDF_JC: "checkpoint", IDF_TB: "backsolve",
             IDF_TBN: "backsolve", IDF_JB: "backsolve"}


def mode_available(grad: str) -> tuple[bool, str]:
    """Whether `odeint(..., grad=grad)` runs and differentiates here (torch, y' = -ky, whose
    gradient is -e^{-k}), and why not."""
    try:
        k = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
        ys = ode.odeint(lambda t, y, k_: -k_ * y, torch.ones(2, 1, dtype=torch.float64),
                        torch.tensor([0.0, 1.0], dtype=torch.float64), k, grad=grad,
                        rtol=1e-8, atol=1e-8)
        (g,) = torch.autograd.grad(ys[-1].sum(), k)
        if not torch.allclose(g, -torch.exp(-k.detach()), rtol=1e-5):
            return False, f"grad={grad!r} gives a wrong gradient on y' = -ky ({g.tolist()})"
        return True, "available"
    except Exception as e:
        return False, _short(e).rstrip(".")


# ---- timing ------------------------------------------------------------------------------------

def bench_config(d: int, batch: int, repeats: int, budget: float, seed: int,
                 only: list[str] | None, modes: dict[str, tuple[bool, str]],
                 quick: bool = False, equal: bool = True) -> dict[str, Any]:
    """Times, calls, memory and errors of every contender for state dimension d."""
    P = make_problem(d, batch, seed)
    check_ode_function(P)
    load = os.getloadavg()[0]
    ref = reference(P)
    xcheck = None if quick else cross_check(P, ref)
    ctx: dict[str, Any] = dict(max_steps=max(16, 2 * steps_needed(P)))
    res: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable] = {}
    for name, fw, build, mod in CONTENDERS:
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        if quick and name in QUICK_SKIP:
            continue
        r: dict[str, Any] = dict(framework=fw)
        res[name] = r
        err = _import_error(mod)
        if fw == "jax" and jax is None:
            err = "jax not installed"
        if err:
            r["error"] = f"not importable: {err}"
            continue
        if name in MODE_ROWS and not modes[MODE_ROWS[name]][0]:
            r["error"] = f"grad={MODE_ROWS[name]!r} not available: {modes[MODE_ROWS[name]][1]}"
            continue
        counter = Counter()
        try:
            b = build(P, counter, ctx)
            t = time.perf_counter()
            y1, g = b["fwdbwd"]()
            r["first"] = time.perf_counter() - t
            r["calls"] = dict(counter.calls)
            r["y_err"], r["g_err"] = rel([y1], [ref["y"]]), rel(g, ref["g"])
            t = time.perf_counter()
            b["fwdbwd"]()
            r["warm"] = time.perf_counter() - t
            if "nfe" in b:
                r["nfe"] = b["nfe"]()
            if "saved" in b:
                r["saved"] = b["saved"]()
            if "temp" in b:
                r["temp"] = b["temp"]()
            if fw == "jax":
                r["calls"] = None if quick else b["calls"]()
        except Exception as e:  # report any failure and go on
            r["error"] = _short(e)
            if os.environ.get("BENCH_ODE_TRACE"):
                traceback.print_exc()
            continue
        r["reps"] = max(3, min(repeats, int(budget / max(r["warm"], 1e-9))))
        print(f"[d={d}] {name}: first call {r['first']:.2f} s, warm {r['warm'] * 1e3:.1f} ms",
              file=sys.stderr, flush=True)
        r["t"] = []
        fns[name] = b["fwdbwd"]
    rng = random.Random(seed)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for rnd in range(repeats):
            order = [k for k in fns if rnd < res[k]["reps"]]
            rng.shuffle(order)
            for k in order:
                t = time.perf_counter()
                fns[k]()
                res[k]["t"].append(time.perf_counter() - t)
            gc.collect()
    finally:
        if gc_was:
            gc.enable()
    for r in res.values():
        if r.get("t"):
            r["med"] = statistics.median(r["t"])
    eq = equal_accuracy(P, ref, ctx, res, fns, modes, repeats, budget, seed) if equal else None
    return dict(d=d, ref=ref, xcheck=xcheck, res=res, max_steps=ctx["max_steps"],
                load=(load, os.getloadavg()[0]), equal=eq)


# ---- equal accuracy (issue 15) -----------------------------------------------------------------
# For each peer: the cheapest implicitdiff setting (gradient mode x tolerance) whose gradient
# error is no larger than the peer's, timed side by side with the peer.

EQ_TOLS = (1e-6, 1.5e-6, 2e-6, 3e-6, 5e-6, 7e-6, 1e-5, 2e-5, 5e-5, 1e-4, 3e-4, 1e-3)
EQ_PEERS = (TDQ, TDQ_A, TDQ_AS, TODE, DFX_R, DFX_B, DFX_B1, DFX_D)
EQ_MODES = ("direct", "checkpoint", "backsolve")


def equal_accuracy(P: dict[str, np.ndarray], ref: dict[str, Any], ctx: dict[str, Any],
                   res: dict[str, dict[str, Any]], fns: dict[str, Callable],
                   modes: dict[str, tuple[bool, str]], repeats: int, budget: float,
                   seed: int) -> list[dict[str, Any]]:
    """Per peer that ran: for each gradient mode, the loosest tolerance of `EQ_TOLS` (rtol =
    atol) whose implicitdiff gradient error (same reference) is at most the peer's, found on the
    ladder in PyTorch (one call per rung; the JAX code is the same algorithm, and its own error
    is checked: a rung above the peer's error moves one rung tighter); then the peer and these
    candidates take turns for `repeats` rounds (shuffled), and the cheapest candidate by the
    median per-round ratio to the peer is "ours at equal error"."""
    avail = [g for g in EQ_MODES if g == "direct" or modes[g][0]]
    ladder: dict[tuple[str, float], float] = {}
    for g in avail:
        for tol in EQ_TOLS:
            b = build_idf_torch(P, Counter(), ctx, grad=g, tol=tol)
            ladder[(g, tol)] = rel(b["fwdbwd"]()[1], ref["g"])
    built: dict[tuple[str, str, float], dict[str, Any]] = {}

    def candidate(fw: str, g: str, tol: float) -> dict[str, Any]:
        key = (fw, g, tol)
        if key not in built:
            build = build_idf_torch if fw == "torch" else build_idf_jax
            b = build(P, Counter(), ctx, grad=g, tol=tol)
            t = time.perf_counter()
            _, gr = b["fwdbwd"]()
            first = time.perf_counter() - t
            t = time.perf_counter()
            b["fwdbwd"]()
            built[key] = dict(fn=b["fwdbwd"], err=rel(gr, ref["g"]), first=first,
                              warm=time.perf_counter() - t)
        return built[key]

    out = []
    rng = random.Random(seed + 1)
    for peer in EQ_PEERS:
        pr = res.get(peer)
        if not pr or not pr.get("t") or peer not in fns:
            continue
        fw, perr = pr["framework"], pr["g_err"]
        cands: dict[str, tuple[float, dict[str, Any]]] = {}
        for g in avail:
            ok = [tol for tol in EQ_TOLS if ladder[(g, tol)] <= perr]
            if not ok:
                continue
            # the loosest rung within the peer's error; tighter ones if the framework's own
            # error (JAX) lands above it
            for tol in sorted((t for t in EQ_TOLS if t <= max(ok)), reverse=True):
                if ladder[(g, tol)] > perr:
                    continue
                c = candidate(fw, g, tol)
                if c["err"] <= perr:
                    cands[g] = (tol, c)
                    break
        if not cands:
            out.append(dict(peer=peer, framework=fw, peer_err=perr, cands={}))
            continue
        times: dict[str, list[float]] = {k: [] for k in ("peer", *cands)}
        slowest = max([pr["warm"], *(c["warm"] for _, c in cands.values())])
        reps = max(3, min(repeats, int(budget / max(slowest, 1e-9))))
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for _ in range(reps):
                order = list(times)
                rng.shuffle(order)
                for k in order:
                    fn = fns[peer] if k == "peer" else cands[k][1]["fn"]
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
                gc.collect()
        finally:
            if gc_was:
                gc.enable()
        rows = {g: dict(tol=tol, err=c["err"], med=statistics.median(times[g]),
                        ratio=paired_ratio(times[g], times["peer"]))
                for g, (tol, c) in cands.items()}
        best = min(rows, key=lambda g: rows[g]["ratio"])
        out.append(dict(peer=peer, framework=fw, peer_err=perr,
                        peer_med=statistics.median(times["peer"]), cands=rows, best=best,
                        rounds=reps))
    return out


def equal_table(eq: list[dict[str, Any]]) -> str:
    rows = []
    for e in eq:
        if not e["cands"]:
            rows.append([e["peer"], "—", fmt_e(e["peer_err"]),
                         f"none: no rung of {EQ_TOLS[0]:g}..{EQ_TOLS[-1]:g} is as accurate",
                         "—", "—", "—", "—"])
            continue
        b = e["cands"][e["best"]]
        others = "; ".join(f"`{g}` {c['tol']:g}: {fmt_ms(c['med'])} ms, {c['ratio']:.2f}×"
                           for g, c in e["cands"].items() if g != e["best"])
        rows.append([e["peer"], fmt_ms(e["peer_med"]), fmt_e(e["peer_err"]),
                     f"`{e['best']}`, rtol = atol = {b['tol']:g}", fmt_ms(b["med"]),
                     fmt_e(b["err"]), f"{b['ratio']:.2f}×",
                     (others or "—") + f" ({e['rounds']} rounds)"])
    return table(["peer (its defaults, rtol = atol = 1e-6)", "peer ms", "peer grad err",
                  "cheapest implicitdiff at ≤ that error", "ms", "grad err", "× peer",
                  "the other modes at ≤ that error"], rows)


# ---- memory against steps ----------------------------------------------------------------------

def saved_kib(fn: Callable[[], Any]) -> float:
    seen, nbytes = set(), 0

    def pack(t):
        nonlocal nbytes
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            nbytes += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return nbytes / 1024


class LiveBytes:
    """Peak bytes of the tensors torch operations create inside `with meter.mode:`, each counted
    from its creation until its storage is freed (a `TorchDispatchMode`: it sees every
    allocation of the forward pass, of autograd's saved tensors, of tensors a method keeps
    outside autograd, and of the backward pass; the same meter as tests/test_ode_checkpoint.py)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        owner = self
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        owner._track(t.untyped_storage())
                owner.peak = max(owner.peak, owner.now)
                return out

        self.mode = Mode()

    def _track(self, storage: Any) -> None:
        key = storage.data_ptr()
        if key and key not in self.live:
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def bench_memory(steps: dict[str, list[int]], batch: int = 16, d: int = 2,
                 seed: int = 0) -> list[list[str]]:
    """Per gradient mode (the keys of `steps`) and number of RK4 steps: the autograd-saved KiB of the
    forward pass and the peak live KiB of forward + backward (`LiveBytes`)."""
    P = make_problem(d, batch, seed)
    ins, w = _torch_inputs(P)
    W1, b1, W2, b2, y0 = ins
    ts = torch.tensor(TS_NP)
    state = y0.numel() * y0.element_size()
    rows = []
    for grad, ns in steps.items():
        for n in ns:
            def run(grad=grad, n=n):
                return ode.odeint(lambda t, y, *a: mlp_torch(y, *a), y0, ts, W1, b1, W2, b2,
                                  method="rk4", dt0=1.0 / n, max_steps=n + 10, grad=grad)
            try:
                t = time.perf_counter()
                kib = saved_kib(run)
                meter = LiveBytes()
                with meter.mode:
                    torch.autograd.grad((w * run()[-1]).sum(), ins)
                rows.append([f"`{grad}`", f"{n:,}", f"{kib:,.1f}",
                             f"{meter.peak / 1024:,.1f}", f"{meter.peak / state:,.0f}",
                             f"{time.perf_counter() - t:.1f}"])
            except Exception as e:
                rows.append([f"`{grad}`", f"{n:,}", f"failed: {_short(e)}", "", "", ""])
    return rows


# ---- output ------------------------------------------------------------------------------------

def _time_rounds(res: dict[str, dict[str, Any]], repeats: int, seed: int) -> None:
    """`repeats` rounds of one call of every entry of `res` that has a callable `fn`, in an
    order shuffled each round, each call's wall time appended to the entry's list `t`."""
    rng = random.Random(seed)
    for _ in range(repeats):
        order = [k for k in res if "fn" in res[k]]
        rng.shuffle(order)
        for k in order:
            t = time.perf_counter()
            res[k]["fn"]()
            res[k]["t"].append(time.perf_counter() - t)


# ---- FFJORD --------------------------------------------------------------------------------------

def _ffjord_module() -> Any:
    """examples/ffjord_moons.py (its `Field`, `augmented`, `augmented_jax`, `params_of` and
    `make_data`): the benchmark runs the example's own model."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                        "ffjord_moons.py")
    spec = importlib.util.spec_from_file_location("ffjord_moons", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_ffjord(batch: int = 256, hidden: int = 64, tol: float = 1e-5, repeats: int = 5,
                 seed: int = 0, scale: float = 2.5) -> tuple[list[list[str]], dict[str, Any]]:
    """FFJORD (examples/ffjord_moons.py's field: an MLP of (z, t), two hidden layers of
    `hidden`, tanh; state [z, Δ], Δ' = Hutchinson's εᵀ(∂f/∂z)ε with a fixed Rademacher ε, one
    vector-Jacobian product with create_graph per evaluation) on `batch` standardized two-moons
    points, t in [0, 1], dopri5 at rtol = atol = `tol`, float64, the field at its PyTorch
    initialization (seeded) with every weight matrix times `scale` (a flow as curved as a
    trained one: about 10 accepted steps instead of 3). Loss: the mean negative log-likelihood; gradient in the field's
    parameters. Error: against implicitdiff `"direct"` at 1e-10."""
    ff = _ffjord_module()
    torch.manual_seed(seed)
    field = ff.Field(hidden).double()
    with torch.no_grad():
        for name, w in field.named_parameters():
            if name.endswith("weight"):
                w.mul_(scale)
    params = tuple(field.parameters())
    x = ff.make_data(batch, seed)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randint(0, 2, x.shape, generator=g, dtype=torch.float64) * 2 - 1
    y0 = torch.cat([x, torch.zeros(batch, 1, dtype=torch.float64)], -1)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    counter = Counter()
    aug = ff.augmented(field)

    def f(t, y, e, *p):
        counter.hit()
        return aug(t, y, e, *p)

    def nll(y1: torch.Tensor) -> torch.Tensor:
        z, delta = y1[:, :-1], y1[:, -1]
        return -(-0.5 * (z * z).sum(-1) - np.log(2 * np.pi) + delta).mean()

    def fwd_bwd(solve: Callable[[], torch.Tensor]) -> Callable[[], Any]:
        # the loss and its gradient, the field's calls counted by phase
        def run():
            counter.phase = "fwd"
            loss = nll(solve()[-1])
            counter.phase = "bwd"
            gs = torch.autograd.grad(loss, params)
            counter.phase = "fwd"
            return float(loss.detach()), [gg.numpy() for gg in gs]
        return run

    def idf_run(grad: str, rtol: float = tol) -> Callable[[], Any]:
        return fwd_bwd(lambda: ode.odeint(f, y0, ts, eps, *params, method="dopri5", rtol=rtol,
                                          atol=rtol, max_steps=20_000, grad=grad))

    class TdqField(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.field = field

        def forward(self, t, y):
            counter.hit()
            return aug(t.reshape(1), y, eps, *self.field.parameters())

    def tdq_run(adjoint: bool) -> Callable[[], Any]:
        import torchdiffeq

        module = TdqField()
        if adjoint:
            return fwd_bwd(lambda: torchdiffeq.odeint_adjoint(
                module, y0, ts, method="dopri5", rtol=tol, atol=tol, adjoint_params=params))
        return fwd_bwd(lambda: torchdiffeq.odeint(module, y0, ts, method="dopri5", rtol=tol,
                                                  atol=tol))

    t0 = time.perf_counter()
    ref_loss, ref_g = idf_run("direct", 1e-10)()
    ref_s = time.perf_counter() - t0
    contenders: dict[str, Callable[[], Callable[[], Any]]] = {
        'implicitdiff `odeint` direct': lambda: idf_run("direct"),
        'implicitdiff `odeint` checkpoint': lambda: idf_run("checkpoint"),
        'implicitdiff `odeint` backsolve': lambda: idf_run("backsolve"),
        "torchdiffeq `odeint`": lambda: tdq_run(False),
        "torchdiffeq `odeint_adjoint`": lambda: tdq_run(True),
    }
    res: dict[str, dict[str, Any]] = {}
    for name, make in contenders.items():
        r: dict[str, Any] = {}
        res[name] = r
        if "torchdiffeq" in name and _import_error("torchdiffeq"):
            r["error"] = "not importable"
            continue
        try:
            fn = make()
            counter.reset()
            _, gs = fn()
            r["calls"] = dict(counter.calls)
            r["g_err"] = rel(gs, ref_g)
            r["fn"] = fn
            r["t"] = []
        except Exception as e:  # report any failure and go on
            r["error"] = _short(e)
    _time_rounds(res, repeats, seed)
    base = res.get("torchdiffeq `odeint_adjoint`", {})
    rows = []
    for name, r in res.items():
        if "error" in r:
            rows.append([name, "—", "—", "—", "—", "—", r["error"]])
            continue
        med = statistics.median(r["t"])
        ratio = (f"{paired_ratio(r['t'], base['t']):.2f}×" if base.get("t") else "—")
        rows.append([name, fmt_ms(med), ratio, f"{r['calls']['fwd']:,}",
                     f"{r['calls']['bwd']:,}", fmt_e(r["g_err"]), ""])
    problem = dict(params=ff.params_of(field), x=x.numpy(), eps=eps.numpy(), ref_g=ref_g,
                   ref_loss=ref_loss, tol=tol)
    info = dict(ref_seconds=ref_s, ref_loss=ref_loss, res=res, problem=problem)
    return rows, info


FF_IDF_J = "implicitdiff `odeint` {} (JAX, jit)"
FF_DFX_R = "diffrax `RecursiveCheckpointAdjoint` (JAX, jit + vmap)"
FF_DFX_B = "diffrax `BacksolveAdjoint` (JAX, jit + vmap)"
FF_DFX_B1 = "diffrax `BacksolveAdjoint`, batch as one state (JAX, jit)"


def bench_ffjord_jax(problem: dict[str, Any], repeats: int = 5, seed: int = 0,
                     count_calls: bool = True) -> tuple[list[list[str]], dict[str, Any]]:
    """The FFJORD problem of `bench_ffjord` (the same field weights, data, Hutchinson noise,
    tolerance and reference gradient: `problem`) in JAX, float64: implicitdiff `odeint`
    (examples/ffjord_moons.py's `augmented_jax`: Hutchinson's estimate by one `jax.jvp`) with
    `grad="direct"`, `"checkpoint"`, `"backsolve"` against diffrax `diffeqsolve(ODETerm,
    Dopri5(), 0, 1, None, y0, stepsize_controller=PIDController(rtol, atol), saveat=SaveAt(
    t1=True))` with `RecursiveCheckpointAdjoint()` (its default) and `BacksolveAdjoint()`, under
    `jax.vmap` over the batch (diffrax's continuous normalizing flow example: per-sample steps),
    and `BacksolveAdjoint()` on the batch as one (batch, 3) state. Each is
    `jax.jit(jax.value_and_grad)` of the mean negative log-likelihood in the field's
    parameters, `max_steps` twice the most steps a sample needs (as the JAX rows above), warmed
    up (compiled) once and then timed in rounds of shuffled order. f calls (whole-batch calls,
    per-sample calls divided by the batch under `vmap`) are counted with `jax.debug.callback` in
    a separately compiled copy when `count_calls`."""
    import diffrax

    ff = _ffjord_module()
    tm = jax.tree_util.tree_map
    params = tm(jnp.asarray, problem["params"])
    x, eps = jnp.asarray(problem["x"]), jnp.asarray(problem["eps"])
    tol, n, d = problem["tol"], *problem["x"].shape
    y0 = jnp.concatenate([x, jnp.zeros((n, 1), x.dtype)], -1)
    ts = jnp.asarray([0.0, 1.0])
    sol = ode.odeint(ff.augmented_jax(), y0, ts, eps, params, method="dopri5", rtol=tol,
                     atol=tol, max_steps=10_000, full_output=True)
    need = int(np.max(np.asarray(sol.stats.accepted + sol.stats.rejected)))
    ms = max(16, 2 * need)

    def nll(y1: Any) -> Any:
        z, delta = y1[..., :-1], y1[..., -1]
        return -jnp.mean(-0.5 * jnp.sum(z * z, -1) - 0.5 * d * np.log(2 * np.pi) + delta)

    def idf_loss(grad: str) -> Callable[[Callable], Callable]:
        def make(aug: Callable) -> Callable:
            def loss(p: Any) -> Any:
                return nll(ode.odeint(aug, y0, ts, eps, p, method="dopri5", rtol=tol, atol=tol,
                                      max_steps=ms, grad=grad)[-1])
            return loss
        return make

    def dfx_loss(adjoint: Any, one_state: bool) -> Callable[[Callable], Callable]:
        def make(aug: Callable) -> Callable:
            term = diffrax.ODETerm(lambda t, y, a: aug(t, y, *a))

            def solve(y0_: Any, e: Any, p: Any) -> Any:
                return diffrax.diffeqsolve(
                    term, diffrax.Dopri5(), 0.0, 1.0, None, y0_, args=(e, p),
                    stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                    saveat=diffrax.SaveAt(t1=True), adjoint=adjoint, max_steps=ms).ys[-1]

            batched = solve if one_state else jax.vmap(solve, in_axes=(0, 0, None))

            def loss(p: Any) -> Any:
                return nll(batched(y0, eps, p))
            return loss
        return make

    contenders: dict[str, tuple[Callable[[Callable], Callable], str, bool]] = {
        FF_IDF_J.format("direct"): (idf_loss("direct"), "jax", False),
        FF_IDF_J.format("checkpoint"): (idf_loss("checkpoint"), "jax", False),
        FF_IDF_J.format("backsolve"): (idf_loss("backsolve"), "jax", False),
        FF_DFX_R: (dfx_loss(diffrax.RecursiveCheckpointAdjoint(), False), "diffrax", True),
        FF_DFX_B: (dfx_loss(diffrax.BacksolveAdjoint(), False), "diffrax", True),
        FF_DFX_B1: (dfx_loss(diffrax.BacksolveAdjoint(), True), "diffrax", False),
    }
    res: dict[str, dict[str, Any]] = {}
    for name, (make, mod, per_sample) in contenders.items():
        r: dict[str, Any] = {}
        res[name] = r
        if _import_error(mod):
            r["error"] = f"not importable: {_import_error(mod)}"
            continue
        try:
            vg = jax.jit(jax.value_and_grad(make(ff.augmented_jax())))

            def fn(vg: Callable = vg) -> Any:
                return jax.block_until_ready(vg(params))

            t = time.perf_counter()
            _, g = fn()
            r["first"] = time.perf_counter() - t
            r["g_err"] = rel(jax.tree_util.tree_leaves(g), problem["ref_g"])
            r["calls"] = _jax_calls(make, ff, params, B=n if per_sample else 1) \
                if count_calls else None
            r["fn"], r["t"] = fn, []
            print(f"[ffjord] {name}: first call {r['first']:.2f} s", file=sys.stderr,
                  flush=True)
        except Exception as e:  # report any failure and go on
            r["error"] = _short(e)
            if os.environ.get("BENCH_ODE_TRACE"):
                traceback.print_exc()
    _time_rounds(res, repeats, seed)
    base = res.get(FF_DFX_R, {})
    rows = []
    for name, r in res.items():
        if "error" in r:
            rows.append([name, "—", "—", "—", "—", "—", r["error"]])
            continue
        ratio = f"{paired_ratio(r['t'], base['t']):.2f}×" if base.get("t") else "—"
        calls = r["calls"]
        rows.append([name, fmt_ms(statistics.median(r["t"])), ratio,
                     f"{calls['fwd']:,}" if calls else "—", f"{calls['bwd']:,}" if calls else "—",
                     fmt_e(r["g_err"]), f"first call (compile) {r['first']:.1f} s"])
    return rows, dict(max_steps=ms, steps_needed=need, res=res)


def _jax_calls(make: Callable[[Callable], Callable], ff: Any, params: Any, B: int
               ) -> dict[str, int]:
    """Whole-batch calls of FFJORD's field in the forward pass and in the backward pass, by a
    `jax.debug.callback` in separately compiled copies (per-sample calls under `vmap` divided by
    the batch `B`)."""
    n = [0]

    def bump(_: Any) -> None:
        n[0] += 1

    aug = ff.augmented_jax()

    def counted(t: Any, y: Any, e: Any, p: Any) -> Any:
        jax.debug.callback(bump, y)
        return aug(t, y, e, p)

    loss = make(counted)
    jax.block_until_ready(jax.jit(loss)(params))
    jax.effects_barrier()
    n_f, n[0] = n[0], 0
    jax.block_until_ready(jax.jit(jax.value_and_grad(loss))(params))
    jax.effects_barrier()
    return {"fwd": round(n_f / B), "bwd": round((n[0] - n_f) / B)}


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_ms(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1e3:,.1f}" if s * 1e3 < 1000 else f"{s * 1e3:,.0f}"


def fmt_e(e: float | None) -> str:
    return "—" if e is None or not np.isfinite(e) else f"{e:.1e}"


def paired_ratio(t: list[float], t_base: list[float]) -> float:
    """Median over rounds of the per-round ratio."""
    return statistics.median(a / b for a, b in zip(t, t_base))


def config_table(c: dict[str, Any]) -> str:
    res = c["res"]
    base = {"torch": res.get(IDF_T, {}), "jax": res.get(IDF_J, {})}
    rows = []
    for name, r in res.items():
        if "error" in r:
            rows.append([name] + ["—"] * 8 + [r["error"]])
            continue
        b = base[r["framework"]]
        ratio = f"{paired_ratio(r['t'], b['t']):.2f}×" if b.get("t") else "—"
        calls = r.get("calls")
        mem = (f"{r['saved']:,.0f} (saved)" if "saved" in r
               else f"{r['temp']:,.0f} (XLA temp)" if "temp" in r else "—")
        rows.append([name, fmt_ms(r["med"]), ratio,
                     str(calls["fwd"]) if calls else "—", str(calls["bwd"]) if calls else "—",
                     f"{r['nfe']:.1f}" if "nfe" in r else "—", mem,
                     fmt_e(r["y_err"]), fmt_e(r["g_err"]),
                     f"{len(r['t'])} runs; first call {r['first']:.2f} s"])
    return table(["method", "fwd+bwd (ms)", "× idf", "f calls fwd", "f calls bwd",
                  "NFE/sample", "memory (KiB)", "y(1) err", "grad err", "notes"], rows)


def _git_state() -> str:
    """The checkout's commit, and whether implicitdiff/ or backends/ have local changes (the ODE
    modes change quickly: a table says which code it measured)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "implicitdiff", "backends"],
                               cwd=root, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (", with local changes to the library" if dirty.strip() else "")


def environment() -> str:
    def ver(mod: str) -> str:
        try:
            return version(mod)
        except PackageNotFoundError:
            return "not installed"

    pk = ("torch", "jax", "numpy", "torchdiffeq", "torchode", "diffrax", "equinox")
    return (f"implicitdiff {idf.__version__} ({_git_state()}); {', '.join(f'{p} {ver(p)}' for p in pk)}; Python "
            f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch threads {torch.get_num_threads()}, "
            f"{', '.join(f'{k}={os.environ[k]}' for k in THREAD_VARS if k in os.environ)}, "
            f"load average {os.getloadavg()[0]:.1f} at start")


def _ratio_row(label: str, r: dict[str, Any], p: dict[str, Any], lim: float,
               check_err: bool = False) -> list[str]:
    if not (r.get("t") and p.get("t")):
        return [label, r.get("error") or p.get("error") or "not run", "NOT MEASURED"]
    ratio = paired_ratio(r["t"], p["t"])
    ok = ratio <= lim
    text = f"{ratio:.2f}×"
    if check_err:
        ok = ok and r["g_err"] <= p["g_err"]
        text += f"; grad error {r['g_err']:.1e} vs {p['g_err']:.1e}"
    return [label, text, "met" if ok else "MISSED"]


def targets(configs: list[dict[str, Any]], memory: list[list[str]] | None,
            modes: dict[str, tuple[bool, str]]) -> str:
    rows = []
    for c in configs:
        res, d = c["res"], c["d"]
        adj = res.get(TDQ_A, {})
        for name in (IDF_TB, IDF_TC, IDF_T):
            rows.append(_ratio_row(f"{name} fwd+bwd ≤ 0.8× torchdiffeq `odeint_adjoint`, grad "
                                   f"error no larger (d = {d})", res.get(name, {}), adj, 0.8,
                                   check_err=True))
        on, off = res.get(IDF_TB, {}), res.get(IDF_TBN, {})
        sem = res.get(TDQ_AS, {})
        ctxt = ""
        if adj.get("calls") and sem.get("calls") and adj["calls"]["bwd"]:
            cut = 1 - sem["calls"]["bwd"] / adj["calls"]["bwd"]
            ctxt = (f"; torchdiffeq's own seminorm: {adj['calls']['bwd']} → "
                    f"{sem['calls']['bwd']} ({cut:.0%} fewer)")
        label = (f"implicitdiff backsolve: ≥ 30% fewer backward f calls with seminorm than "
                 f"without (d = {d})")
        if on.get("calls") and off.get("calls") and off["calls"]["bwd"]:
            cut = 1 - on["calls"]["bwd"] / off["calls"]["bwd"]
            rows.append([label, f"{off['calls']['bwd']} → {on['calls']['bwd']} ({cut:.0%} "
                         f"fewer){ctxt}", "met" if cut >= 0.3 else "MISSED"])
        else:
            rows.append([label, (on.get("error") or off.get("error") or "not run") + ctxt,
                         "NOT MEASURED"])
        for idf_name, peer in ((IDF_J, DFX_D), (IDF_JC, DFX_R), (IDF_JB, DFX_B1)):
            rows.append(_ratio_row(f"{idf_name} within 1.2× of {peer} (d = {d})",
                                   res.get(idf_name, {}), res.get(peer, {}), 1.2))
    label = "`checkpoint` peak memory (live, fwd+bwd) ≤ 2× from 100 to 10,000 steps"
    ck = {int(r[1].replace(",", "")): r[3] for r in (memory or []) if r[0] == "`checkpoint`"}
    lo, hi = ck.get(100), ck.get(10_000)
    try:
        g = float(hi.replace(",", "")) / float(lo.replace(",", ""))  # type: ignore[union-attr]
        rows.append([label, f"{g:.2f}× ({lo} → {hi} KiB)", "met" if g <= 2 else "MISSED"])
    except (AttributeError, ValueError):
        why = ("not run" if modes["checkpoint"][0] else modes["checkpoint"][1])
        rows.append([label, f"{why}; 100 steps: {lo}, 10,000 steps: {hi}", "NOT MEASURED"])
    return table(["target", "measured", "status"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: d = 2, 3 rounds, no JAX call counting, no cross-check, "
                        "memory sweep at 100 and 1,000 steps")
    p.add_argument("--dim", type=int, nargs="+", default=None, help="state sizes (default 2 32)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; quick 3)")
    p.add_argument("--cell-budget", type=float, default=10.0,
                   help="seconds of timed calls per method and configuration, beyond which a "
                        "slow method gets fewer rounds (at least 3)")
    p.add_argument("--only", nargs="+", default=None,
                   help="substrings of the contender names to run (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the memory-against-steps sweep")
    p.add_argument("--no-ffjord", action="store_true", help="skip the FFJORD comparison")
    p.add_argument("--ffjord-only", action="store_true",
                   help="only the FFJORD comparison (no state-dimension configurations, memory "
                        "sweep or targets)")
    p.add_argument("--no-equal", action="store_true",
                   help="skip the equal-accuracy comparison (issue 15)")
    a = p.parse_args(argv)
    dims = a.dim or ([2] if a.quick else [2, 32])
    repeats = a.repeats or (3 if a.quick else 7)
    t_start = time.perf_counter()
    modes = {g: mode_available(g) for g in ("checkpoint", "backsolve")}
    print(f"# Neural ODEs\n\n{environment()}.\n")
    print(f"Batch {a.batch}, MLP vector field (hidden {HIDDEN}), t in [0, 1], dopri5, rtol = "
          f"atol = {TOL:g}, float64; gradient of L = Σ wᵀy(1) in (W1, b1, W2, b2, y0). "
          + "; ".join(f"`grad={g!r}`: {w}" for g, (_, w) in modes.items()) + f". {repeats} timed rounds (fewer for methods slower than "
          f"{a.cell_budget:g} s / {repeats}); times are medians in milliseconds; \"× idf\" is the "
          "median per-round ratio to implicitdiff's `\"direct\"` in the same framework; errors "
          f"are relative, against implicitdiff `\"direct\"` at rtol = atol = {REF_TOL:g}.\n")
    configs = []
    for d in [] if a.ffjord_only else dims:
        c = bench_config(d, a.batch, repeats, a.cell_budget, a.seed, a.only, modes,
                         quick=a.quick, equal=not a.no_equal)
        configs.append(c)
        ref = c["ref"]
        print(f"## State dimension {d}\n")
        print(f"Reference: {ref['steps_mean']:.1f} steps per sample (max {ref['steps_max']}), "
              f"{ref['seconds']:.1f} s. "
              + (c["xcheck"] + ". " if c["xcheck"] else "")
              + f"JAX `max_steps` = {c['max_steps']}. Load average {c['load'][0]:.1f} before, "
              f"{c['load'][1]:.1f} after.\n")
        print(config_table(c) + "\n", flush=True)
        if c["equal"]:
            print(f"### At equal gradient error (d = {d})\n")
            print("For each peer above, the cheapest implicitdiff setting (`grad` mode and "
                  "rtol = atol on the ladder "
                  + ", ".join(f"{t:g}" for t in EQ_TOLS) + ") whose gradient error is at most "
                  "the peer's, in the peer's framework, timed side by side with the peer "
                  "(rounds in shuffled order; \"× peer\" the median per-round ratio).\n")
            print(equal_table(c["equal"]) + "\n", flush=True)
    memory = None
    if not (a.no_memory or a.ffjord_only):
        # the meter costs ~10 µs per torch operation: 10,000 steps only where the target needs it
        steps = {g: [100] if a.quick else [100, 1000] for g in ("direct", "checkpoint",
                                                               "backsolve")
                 if g == "direct" or modes[g][0]}
        if "checkpoint" in steps and not a.quick:
            steps["checkpoint"].append(10_000)
        memory = bench_memory(steps)
        print("## Memory against steps: RK4 with fixed steps, batch 16, d = 2, float64\n")
        print("\"saved\": the bytes autograd saves during the forward pass; \"peak live\": the "
              "peak of the bytes of all tensors alive during forward + backward (a "
              "`TorchDispatchMode` meter), also in units of one state y (batch × d).\n")
        print(table(["grad", "steps", "saved KiB", "peak live KiB (fwd+bwd)",
                     "peak live (states)", "seconds"], memory) + "\n")
    if not a.no_ffjord:
        rows, info = bench_ffjord(repeats=3 if a.quick else 5, seed=a.seed)
        print("## FFJORD (examples/ffjord_moons.py's model), batch 256, two moons, dopri5, "
              "rtol = atol = 1e-5, float64\n")
        print("The field at its seeded PyTorch initialization; Hutchinson's trace estimator "
              "with a fixed noise (one vector-Jacobian product with create_graph per "
              "evaluation); loss: the mean negative log-likelihood, gradient in the field's "
              f"parameters; error against implicitdiff `\"direct\"` at 1e-10 "
              f"({info['ref_seconds']:.1f} s). f calls are those of the whole batch; "
              "\"× adjoint\" is the median per-round ratio to torchdiffeq's "
              "`odeint_adjoint`.\n")
        print(table(["method", "fwd+bwd ms", "× adjoint", "f calls fwd", "f calls bwd",
                     "grad err", "notes"], rows) + "\n", flush=True)
        if jax is None or _import_error("diffrax"):
            print(f"FFJORD in JAX not run: "
                  f"{'jax not installed' if jax is None else _import_error('diffrax')}.\n")
        else:
            jrows, jinfo = bench_ffjord_jax(info["problem"], repeats=3 if a.quick else 5,
                                            seed=a.seed, count_calls=not a.quick)
            print("### FFJORD in JAX: the same problem against diffrax\n")
            print("The same field weights, data, noise, tolerance and reference in JAX "
                  "(float64, `jax.jit(jax.value_and_grad)`, timed after a compiling warm-up "
                  "call); Hutchinson's estimate by one `jax.jvp` per evaluation "
                  "(examples/ffjord_moons.py's `augmented_jax`). diffrax: `Dopri5`, "
                  "`PIDController(rtol, atol)`, under `jax.vmap` over the batch (per-sample "
                  "steps, as its continuous normalizing flow example) or on the batch as one "
                  f"state. `max_steps` = {jinfo['max_steps']} for all (twice the "
                  f"{jinfo['steps_needed']} steps the longest sample takes). "
                  "\"× diffrax\" is the median per-round ratio to diffrax's "
                  "`RecursiveCheckpointAdjoint` (its default); f calls are whole-batch calls "
                  + ("(not counted in --quick). " if a.quick else
                     "(under `vmap`, per-sample calls divided by the batch). ")
                  + "Under `vmap`, diffrax's `BacksolveAdjoint` controls each sample's adjoint "
                  "(1/batch of the mean's) and its parameter cotangent with the absolute "
                  "tolerance as they stand: a coarser gradient for the mean loss than for the "
                  "sum.\n")
            print(table(["method", "fwd+bwd ms", "× diffrax", "f calls fwd", "f calls bwd",
                         "grad err", "notes"], jrows) + "\n", flush=True)
    if a.ffjord_only:
        print(f"Total run time {time.perf_counter() - t_start:.0f} s; load average "
              f"{os.getloadavg()[0]:.1f} at the end.")
        return 0
    print("## Targets\n")
    print(targets(configs, memory, modes) + "\n")
    print(f"Total run time {time.perf_counter() - t_start:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f} at the end.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
