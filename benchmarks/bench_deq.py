"""DEQ benchmarks: implicitdiff's `DEQ` against torchdeq, and its JAX `deq` against optimistix.

    python benchmarks/bench_deq.py            # full run (under 3 minutes on 2 CPU cores)
    python benchmarks/bench_deq.py --quick    # fewer repeats, for a smoke test

The model: z = tanh(W z + U x + b), batch 64, hidden 256, input 256, float32, ‖W‖₂ = ρ with
ρ = 0.5 and 0.9; loss sum(z²), gradient with respect to (W, U, b).

1. PyTorch. The same cell module (`nn.Linear`s) inside
   - implicitdiff `DEQ(cell, solver="anderson", backward=IFT(BiCGStab) | IFT(Richardson) |
     Phantom(5))`,
   - torchdeq `get_deq(f_solver="anderson", ift=True, b_solver="fixed_point_iter")` (IFT) and
     `get_deq(f_solver="anderson", grad=5, tau=1.0)` (phantom gradient, 5 steps);
   - and both IFT layers with the fixed-point iteration as the forward solver (torchdeq's
     default `f_solver`; implicitdiff `solver="fixed_point_iteration"`, backward Richardson).

   Equal forward settings: relative-residual tolerance ‖f(z) − z‖ / ‖f(z)‖ ≤ 1e-4 (the same
   definition in both libraries), at most 100 iterations, Anderson history of 5 differences
   (implicitdiff `m=5`; torchdeq `m=6`, which stores 6 iterates, i.e. 5 differences). Backward
   linear solves: relative tolerance 1e-5, at most 100 iterations. torchdeq stops the whole batch
   when the worst sample meets the tolerance; implicitdiff stops each sample on its own.

   Reported: forward and backward time (medians of interleaved repeats: the methods take turns,
   so a load spike on a shared machine hits them alike), the forward iterations (per-sample
   steps, mean/max, and the number of batched calls of f the forward made, counted by a
   wrapper), peak memory of one forward + backward (the largest sum of live tensor bytes, from
   the `[memory]` events of `torch.profiler`), and the gradient's relative error against the
   exact implicit gradient computed densely in float64.

   Then, at equal accuracy: for each torchdeq mode, the cheapest implicitdiff setting whose
   gradient error is at most torchdeq's, up to rounding (1%; the search: forward solver x
   forward tolerance x `extra_step` x exact backward solver and tolerance, see `EQ_FORWARD`,
   ...; the fixed-point forward and `Phantom(k)`, `EQ_PHANTOM`; and the layer's defaults),
   with its time, the calls of f and the vector-Jacobian products through them (counted by a
   hook on each recorded call), and the ratio.

2. Beyond first order (small float64 DEQ): Hessian-vector products by double backward against
   central differences of the gradient, and `torch.func.grad` / `torch.func.jacfwd`.

3. JAX. `implicitdiff_jax.deq` (Anderson, IFT with BiCGStab) against the same model written with
   `optimistix.fixed_point(fn, solver, z0, adjoint=optx.ImplicitAdjoint())` vmapped over the
   batch (per-sample problems: the default `AutoLinearSolver` then factors a 256×256 Jacobian per
   sample; unvmapped it would be one 16384×16384 system), with `FixedPointIteration` and
   `Newton`. `jax.jit(jax.value_and_grad(loss))` time (compiled, median of interleaved repeats)
   and gradient error against the same float64 reference; then the same equal-accuracy search
   as for PyTorch against each optimistix solver.

Absolute times are for this machine only (CPU); compare the ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from bench_torch import peak_bytes
from torch import nn

import implicitdiff as idf

warnings.filterwarnings("ignore")

try:
    import torchdeq
except ImportError:  # pragma: no cover - optional
    torchdeq = None

B, H, D = 64, 256, 256
TOL, MAXITER, BTOL = 1e-4, 100, 1e-5


# ---- measurement helpers -------------------------------------------------------------------

def rel_error(got, ref) -> float:
    num = sum(float(((torch.as_tensor(np.asarray(g)).double() - r) ** 2).sum())
              for g, r in zip(got, ref))
    den = sum(float((r ** 2).sum()) for r in ref)
    return (num / den) ** 0.5


# ---- the model and its exact gradient --------------------------------------------------------

def make_data(rho: float):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(H, H, generator=g, dtype=torch.float64)
    W = rho * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(H, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = 0.1 * torch.randn(H, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    return W, U, b, x


def exact_grads(W, U, b, x):
    """The exact implicit gradient of sum(z²) wrt (W, U, b) in float64, densely, per sample."""
    z = torch.zeros(B, H, dtype=torch.float64)
    for _ in range(1000):
        z = torch.tanh(z @ W.T + x @ U.T + b)
    d = 1 - z ** 2
    A = torch.eye(H, dtype=torch.float64) - d[:, :, None] * W[None]   # I - J per sample
    u = torch.linalg.solve(A.mT, (2 * z)[..., None])[..., 0]          # (I - J)ᵀ u = z̄
    v = d * u
    return v.T @ z, v.T @ x, v.sum(0)


def count_vjps(cell: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Count in `cell.vjps` each vector-Jacobian product taken through the recorded call `out`
    of `cell` (a hook that fires whenever a backward pass, or `torch.autograd.grad`, reaches
    `out`); returns `out`. Not under `torch.compile` (`bench_compile.py` counts its graphs)."""
    if out.requires_grad and not torch.compiler.is_compiling():
        def hook(grad):
            cell.vjps += 1

        try:
            out.register_hook(hook)
        except RuntimeError:  # under torch.func transforms: not counted
            pass
    return out


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x + b); counts its (batched) calls in `calls` and the
    vector-Jacobian products through them in `vjps`."""

    def __init__(self, W, U, b):
        super().__init__()
        self.W = nn.Linear(H, H, bias=False)
        self.U = nn.Linear(D, H)
        with torch.no_grad():
            self.W.weight.copy_(W)
            self.U.weight.copy_(U)
            self.U.bias.copy_(b)
        self.calls = 0
        self.vjps = 0

    def forward(self, z, x):
        self.calls += 1
        return count_vjps(self, torch.tanh(self.W(z) + self.U(x)))

    def grads(self):
        return self.W.weight.grad, self.U.weight.grad, self.U.bias.grad


# ---- 1. PyTorch: implicitdiff DEQ vs torchdeq -----------------------------------------------

FPI_OURS = "implicitdiff IFT (Richardson), forward fixed-point iteration"
FPI_PEER = "torchdeq IFT (fixed_point_iter), forward fixed-point iteration (its default)"


def torch_methods(make_cell, x, z_shape):
    """name -> (cell, forward() -> (z, stats-dict)) for implicitdiff's `DEQ` and torchdeq, each
    on a fresh `make_cell()` (a module `cell(z, x)` counting its calls in `cell.calls`, with
    `cell.grads()`), input `x`, per-sample state shape `z_shape`; the forward's iterations from
    the stats. The settings of the module docstring."""
    from implicitdiff_torch import DEQ, IFT, Phantom

    opts = {"tol": TOL, "maxiter": MAXITER, "m": 5}
    out = {}

    def idf_method(backward, solver="anderson"):
        cell = make_cell()
        o = opts if solver == "anderson" else {k: v for k, v in opts.items() if k != "m"}
        layer = DEQ(cell, z_shape=z_shape, solver=solver, solver_options=o,
                    backward=backward)

        def fwd():
            z = layer(x)
            s = layer.stats
            return z, {"steps_mean": float(s.steps.float().mean()),
                       "steps_max": int(s.steps.max()),
                       "rel_res": float(s.relative_residual.max())}

        return cell, fwd

    def tdeq_method(f_solver="anderson", **kw):
        cell = make_cell()
        layer = torchdeq.get_deq(f_solver=f_solver, f_max_iter=MAXITER, f_tol=TOL,
                                 f_stop_mode="rel", **kw)
        skw = {"m": 6} if f_solver == "anderson" else {}

        def fwd():
            zs, info = layer(lambda z: cell(z, x), torch.zeros(x.shape[0], *z_shape),
                             solver_kwargs=skw)
            return zs[-1], {"steps_mean": float(info["nstep"].float().mean()),
                            "steps_max": int(info["nstep"].max()),
                            "rel_res": float(info["rel_lowest"].max())}

        return cell, fwd

    out["implicitdiff IFT (BiCGStab)"] = idf_method(
        IFT(idf.BiCGStab(rtol=BTOL, maxiter=MAXITER)))
    out["implicitdiff IFT (Richardson)"] = idf_method(
        IFT(idf.Richardson(omega=-1.0, rtol=BTOL, maxiter=MAXITER)))
    if torchdeq is not None:
        out["torchdeq IFT (fixed_point_iter)"] = tdeq_method(
            ift=True, b_solver="fixed_point_iter", b_tol=BTOL, b_stop_mode="rel",
            b_max_iter=MAXITER)
    # torchdeq's default forward solver, the fixed-point iteration, against implicitdiff's
    out[FPI_OURS] = idf_method(IFT(idf.Richardson(omega=-1.0, rtol=BTOL, maxiter=MAXITER)),
                               solver="fixed_point_iteration")
    if torchdeq is not None:
        out[FPI_PEER] = tdeq_method(
            f_solver="fixed_point_iter", ift=True, b_solver="fixed_point_iter", b_tol=BTOL,
            b_stop_mode="rel", b_max_iter=MAXITER)
    out["implicitdiff Phantom(5)"] = idf_method(Phantom(5))
    if torchdeq is not None:
        out["torchdeq phantom (grad=5)"] = tdeq_method(grad=5, tau=1.0)
    return out


def time_methods(rho: float, methods, loss, ref, repeats: int) -> list[str]:
    """Time `methods` (from `torch_methods`) on the scalar `loss(z)`: forward and backward
    medians of interleaved repeats, iterations, peak memory, gradient error against `ref`;
    prints and returns the table rows."""
    def step(cell, fwd):
        for p in cell.parameters():
            p.grad = None
        cell.calls = 0
        t0 = time.perf_counter()
        z, st = fwd()
        t1 = time.perf_counter()
        calls = cell.calls
        loss(z).backward()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, st, calls

    for cell, fwd in methods.values():  # warm-up
        step(cell, fwd)
    tf: dict[str, list[float]] = {k: [] for k in methods}
    tb: dict[str, list[float]] = {k: [] for k in methods}
    info = {}
    for _ in range(repeats):
        for k, (cell, fwd) in methods.items():
            a, c, st, calls = step(cell, fwd)
            tf[k].append(a)
            tb[k].append(c)
            info[k] = (st, calls)
    med_f = {k: statistics.median(v) for k, v in tf.items()}
    med_b = {k: statistics.median(v) for k, v in tb.items()}
    lines = []
    for k, (cell, fwd) in methods.items():
        step(cell, fwd)
        err = rel_error(cell.grads(), ref)
        mem = peak_bytes(lambda cell=cell, fwd=fwd: step(cell, fwd)) / 2 ** 20
        st, calls = info[k]
        base = (FPI_PEER if "forward fixed-point" in k else
                "torchdeq IFT (fixed_point_iter)" if "IFT" in k else "torchdeq phantom (grad=5)")
        tot = med_f[k] + med_b[k]
        ratio = f"{tot / (med_f[base] + med_b[base]):.2f}" if base in med_f else "n/a"
        lines.append(
            f"| {rho} | {k} | {st['steps_mean']:.1f} / {st['steps_max']} | {calls} "
            f"| {st['rel_res']:.1e} | {med_f[k] * 1e3:.1f} | {med_b[k] * 1e3:.1f} "
            f"| {tot * 1e3:.1f} | {ratio} | {mem:.2f} | {err:.1e} |")
        print(lines[-1], flush=True)
    return lines


def bench_torch_deq(rho: float, repeats: int) -> list[str]:
    W, U, b, x = make_data(rho)
    methods = torch_methods(lambda: Cell(W, U, b), x.float(), (H,))
    return time_methods(rho, methods, lambda z: (z * z).sum(), exact_grads(W, U, b, x),
                        repeats)


# ---- 1b. equal accuracy: the cheapest implicitdiff setting at the peer's gradient error ---------

# The implicitdiff settings searched: a forward solver, Anderson (history 5) or the fixed-point
# iteration, to a relative tolerance, followed by `extra_step` plain steps, and an exact backward
# (the fixed-point iteration, or BiCGStab), both without the uniqueness probe (a second solve),
# to a relative tolerance; plus the layer's defaults, `DEQ(cell, z_shape=...)` and nothing else.
EQ_FORWARD = {"anderson": ((1e-3, 3e-4, 1e-4), (2, 3, 5)),       # tolerances, extra steps
              "fixed_point_iteration": ((1e-3, 3e-4, 1e-4, 1e-5), (1, 2, 3))}
EQ_BTOLS = (1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
EQ_BACKWARDS = {"Richardson": lambda rtol: idf.Richardson(omega=-1.0, rtol=rtol, maxiter=MAXITER,
                                                          check_singular=False),
                "BiCGStab": lambda rtol: idf.BiCGStab(rtol=rtol, maxiter=MAXITER,
                                                      check_singular=False)}
# and implicitdiff's approximate mode: the fixed-point forward to a relative tolerance, no extra
# step (the recorded ones follow), then `Phantom(k)` (k recorded steps, undamped like
# torchdeq's `tau=1.0`)
EQ_PHANTOM = ((1e-3, 3e-4, 1e-4), (2, 3, 4, 5))         # forward tolerances, recorded steps
DEFAULTS = "implicitdiff defaults: DEQ(cell)"


def equal_accuracy_candidates(make_cell, x, z_shape):
    """name -> (cell, forward() -> z) for the implicitdiff settings searched at equal accuracy
    (see `EQ_FORWARD`, `EQ_BTOLS`, `EQ_BACKWARDS`, `DEFAULTS`)."""
    from implicitdiff_torch import DEQ, IFT, Phantom

    out = {}

    def make(**kw):
        cell = make_cell()
        layer = DEQ(cell, z_shape=z_shape, **kw)
        return cell, lambda: layer(x)

    out[DEFAULTS] = make()
    for solver, (ftols, extras) in EQ_FORWARD.items():
        fixed_point = solver == "fixed_point_iteration"
        for ft in ftols:
            for k in extras:
                for name, solve in EQ_BACKWARDS.items():
                    for bt in EQ_BTOLS:
                        out[f"{'fixed-point forward, ' if fixed_point else ''}tol={ft:g}, "
                            f"extra_step={k}, IFT({name}(rtol={bt:g}, "
                            "check_singular=False))"] = make(
                            solver=solver,
                            solver_options={"tol": ft, "maxiter": MAXITER, "extra_step": k,
                                            **({} if fixed_point else {"m": 5})},
                            backward=IFT(solve(bt)))
    for ft in EQ_PHANTOM[0]:
        for k in EQ_PHANTOM[1]:
            out[f"fixed-point forward, tol={ft:g}, extra_step=0, Phantom({k})"] = make(
                solver="fixed_point_iteration",
                solver_options={"tol": ft, "maxiter": MAXITER, "extra_step": 0},
                backward=Phantom(k))
    return out


def within(err: float, peer_err: float) -> bool:
    """Whether a gradient error `err` is at most the peer's, up to rounding: 1% (the same
    mathematics, torchdeq's phantom gradient and `Phantom(5)` say, ties at float32 noise)."""
    return err <= 1.01 * peer_err


def equal_accuracy(label: str, peers, candidates, loss, ref, repeats: int,
                   finalists: int = 3) -> list[str]:
    """For each peer (name -> (cell, forward() -> z), like `torch_methods`' values, forward
    returning z only): its time and gradient error, the cheapest candidate whose gradient error
    is at most the peer's, its time and error, and the ratio; and the defaults' row. Errors from
    one run each; the calls of f and vector-Jacobian products through them (`cell.calls`,
    `cell.vjps`) per pass, counted over the next three (the first pass of a `DEQ` also runs
    its one-time coupling check). The `finalists` quickest qualifying candidates per peer (by
    a median of those 3 runs) are then timed with the peers and the defaults: medians of
    `repeats` interleaved forward + backward passes."""
    def run(cell, fwd):
        for p in cell.parameters():
            p.grad = None
        t0 = time.perf_counter()
        loss(fwd()).backward()
        return time.perf_counter() - t0

    err, quick, ops = {}, {}, {}
    for k, (cell, fwd) in {**peers, **candidates}.items():
        cell.calls = cell.vjps = 0
        try:
            run(cell, fwd)
        except idf.ImplicitDiffError:  # e.g. a backward tolerance below float32's reach
            err[k] = math.inf
            continue
        err[k] = rel_error(cell.grads(), ref)
        cell.calls = cell.vjps = 0
        quick[k] = statistics.median(run(cell, fwd) for _ in range(3))
        ops[k] = f"{cell.calls / 3:g} / {cell.vjps / 3:g}"
    timed = {**peers, DEFAULTS: candidates[DEFAULTS]}
    for p in peers:
        ok = sorted((k for k in candidates if within(err[k], err[p])), key=lambda k: quick[k])
        timed.update((k, candidates[k]) for k in ok[:finalists])
    for cell, fwd in timed.values():  # warm-up
        run(cell, fwd)
    times: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(repeats):
        for k, (cell, fwd) in timed.items():
            times[k].append(run(cell, fwd))
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = []
    for p in peers:
        ok = [k for k in timed if k not in peers and within(err[k], err[p])]
        head = f"| {label} | {p} | {med[p] * 1e3:.1f} | {err[p]:.1e} | {ops[p]} |"
        if not ok:
            lines.append(f"{head} none of the settings searched | | | | |")
        else:
            best = min(ok, key=lambda k: med[k])
            lines.append(f"{head} {best} | {med[best] * 1e3:.1f} | {err[best]:.1e} "
                         f"| {ops[best]} | {med[best] / med[p]:.2f} |")
        print(lines[-1], flush=True)
        d = DEFAULTS
        lines.append(f"{head} {d} | {med[d] * 1e3:.1f} | {err[d]:.1e} | {ops[d]} "
                     f"| {med[d] / med[p]:.2f} "
                     f"{'(error within)' if within(err[d], err[p]) else '(error above)'} |")
        print(lines[-1], flush=True)
    return lines


def torch_peers(make_cell, x, z_shape):
    """torchdeq at the benchmark's settings (IFT with the Anderson and with the fixed-point
    forward, and phantom), forward returning z only."""
    if torchdeq is None:
        return {}
    ms = torch_methods(make_cell, x, z_shape)
    out = {}
    for k in ("torchdeq IFT (fixed_point_iter)", FPI_PEER, "torchdeq phantom (grad=5)"):
        cell, fwd = ms[k]
        out[k] = (cell, lambda fwd=fwd: fwd()[0])
    return out


def bench_torch_equal_accuracy(rho: float, repeats: int) -> list[str]:
    W, U, b, x = make_data(rho)
    xf = x.float()
    peers = torch_peers(lambda: Cell(W, U, b), xf, (H,))
    cands = equal_accuracy_candidates(lambda: Cell(W, U, b), xf, (H,))
    return equal_accuracy(f"dense, ρ = {rho}", peers, cands, lambda z: (z * z).sum(),
                          exact_grads(W, U, b, x), repeats)


EQ_HEAD = [
    "| problem | peer (settings of the table above) | peer ms | peer grad err | peer f calls "
    "/ VJPs | cheapest implicitdiff setting with grad err ≤ peer's | its ms | its grad err "
    "| its f calls / VJPs | × peer |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
EQ_HEAD_JAX = [
    "| problem | peer | peer ms | peer grad err | cheapest implicitdiff setting with grad err ≤ "
    "peer's | its ms | its grad err | × peer |",
    "|---|---|---|---|---|---|---|---|",
]


# ---- 2. beyond first order: second derivatives, torch.func, forward mode ----------------------

def bench_higher_order() -> list[str]:
    """On a small float64 DEQ (batch 3, hidden 8, input 4, ‖W‖₂ = 0.5, forward to 1e-12): the
    Hessian-vector product of sum(z²) in x, from double backward (`create_graph=True`), against
    central differences of the gradient; and whether `torch.func.grad` and `torch.func.jacfwd`
    (forward mode) run and agree with autograd."""
    from implicitdiff_torch import DEQ, IFT

    h, d, b = 8, 4, 3
    g = torch.Generator().manual_seed(0)
    W = torch.randn(h, h, generator=g, dtype=torch.float64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    cell = Cell.__new__(Cell)
    nn.Module.__init__(cell)
    cell.W = nn.Linear(h, h, bias=False).double()
    cell.U = nn.Linear(d, h).double()
    with torch.no_grad():
        cell.W.weight.copy_(W)
        cell.U.weight.copy_(torch.randn(h, d, generator=g, dtype=torch.float64))
        cell.U.bias.copy_(0.1 * torch.randn(h, generator=g, dtype=torch.float64))
    cell.calls = cell.vjps = 0
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, d, generator=g, dtype=torch.float64)

    def idf_loss(x):
        layer = DEQ(cell, z_shape=(h,), solver_options={"tol": 1e-12, "maxiter": 200},
                    backward=IFT(idf.BiCGStab(rtol=1e-12)))
        return (layer(x) ** 2).sum()

    def tdeq_loss(**kw):
        def loss(x):
            layer = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=500, f_tol=1e-12,
                                     **kw)
            zs, _ = layer(lambda z: cell(z, x), torch.zeros(b, h, dtype=torch.float64))
            return (zs[-1] ** 2).sum()
        return loss

    losses = {"implicitdiff DEQ, IFT": idf_loss}
    if torchdeq is not None:
        losses["torchdeq, ift=True"] = tdeq_loss(ift=True, b_solver="fixed_point_iter",
                                                 b_tol=1e-12, b_max_iter=500)
        losses["torchdeq, default (grad=1)"] = tdeq_loss()

    def grad(loss, x, create_graph=False):
        x = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(loss(x), x, create_graph=create_graph)
        return x, gx

    def short(e: Exception) -> str:
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:60]}..."

    lines = []
    for name, loss in losses.items():
        eps = 1e-5
        fd = (grad(loss, x + eps * v)[1] - grad(loss, x - eps * v)[1]) / (2 * eps)
        xx, gx = grad(loss, x, create_graph=True)
        try:
            (hv,) = torch.autograd.grad((gx * v).sum(), xx)
            hvp = f"{float((hv - fd).norm() / fd.norm()):.1e}"
        except Exception as e:
            hvp = short(e)
        ref = grad(loss, x)[1]
        cells = []
        for fn in (torch.func.grad, torch.func.jacfwd):
            try:
                out = fn(loss)(x)
                cells.append(f"runs, error {float((out - ref).norm() / ref.norm()):.0e}")
            except Exception as e:
                cells.append(short(e))
        lines.append(f"| {name} | {hvp} | {cells[0]} | {cells[1]} |")
        print(lines[-1], flush=True)
    return lines


# ---- 3. JAX: implicitdiff_jax.deq vs optimistix ---------------------------------------------

def _jax_problem(rho: float) -> tuple:
    """The dense DEQ of `make_data(rho)` in JAX (float32): `(ref, params, x, f, fn)` with `ref`
    the exact gradients, `params` the dict of W, U, b, `f(p, z, x)` the batched layer
    (implicitdiff's form) and `fn(z, (p, x_i))` one sample's (optimistix's form)."""
    import jax.numpy as jnp

    W, U, b, x = make_data(rho)
    ref = exact_grads(W, U, b, x)
    params = {"W": jnp.asarray(W.float().numpy()), "U": jnp.asarray(U.float().numpy()),
              "b": jnp.asarray(b.float().numpy())}

    def f(p, z, x):
        return jnp.tanh(z @ p["W"].T + x @ p["U"].T + p["b"])

    def fn(z, args):
        p, xi = args
        return jnp.tanh(p["W"] @ z + p["U"] @ xi + p["b"])

    return ref, params, jnp.asarray(x.float().numpy()), f, fn


def _jax_medians(jitted: dict, args: tuple, repeats: int) -> dict[str, float]:
    """Median wall time of each jitted function over `repeats` rounds of one call each."""
    import jax

    times: dict[str, list[float]] = {k: [] for k in jitted}
    for _ in range(repeats):
        for k, g in jitted.items():
            t = time.perf_counter()
            jax.block_until_ready(g(*args))
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_jax(rho: float, repeats: int) -> list[str]:
    import jax
    import jax.numpy as jnp
    import optimistix as optx
    from jax.tree_util import Partial

    from implicitdiff.deq import IFT
    from implicitdiff_jax import deq

    ref, params, xj, f, fn = _jax_problem(rho)

    def loss_idf(p, x):
        z, stats = deq(Partial(f, p), x, z_shape=(H,),
                       solver_options={"tol": TOL, "maxiter": MAXITER, "m": 5},
                       backward=IFT(idf.BiCGStab(rtol=BTOL, maxiter=MAXITER)))
        return (z * z).sum(), stats.steps

    def optx_loss(solver):
        def one(p, xi):
            sol = optx.fixed_point(fn, solver, jnp.zeros(H, xj.dtype), args=(p, xi),
                                   max_steps=MAXITER, adjoint=optx.ImplicitAdjoint(),
                                   throw=False)
            return sol.value, sol.stats["num_steps"]

        def loss(p, x):
            z, steps = jax.vmap(one, in_axes=(None, 0))(p, x)
            return (z * z).sum(), steps

        return loss

    fns = {
        "implicitdiff deq (Anderson, IFT BiCGStab)": loss_idf,
        "optimistix FixedPointIteration + ImplicitAdjoint":
            optx_loss(optx.FixedPointIteration(rtol=TOL, atol=TOL)),
        "optimistix Newton + ImplicitAdjoint": optx_loss(optx.Newton(rtol=TOL, atol=TOL)),
    }
    jitted = {k: jax.jit(jax.value_and_grad(v, has_aux=True)) for k, v in fns.items()}
    results, compile_s = {}, {}
    for k, g in jitted.items():
        t = time.perf_counter()
        results[k] = jax.block_until_ready(g(params, xj))
        compile_s[k] = time.perf_counter() - t
    med = _jax_medians(jitted, (params, xj), repeats)
    base = med["implicitdiff deq (Anderson, IFT BiCGStab)"]
    lines = []
    for k in jitted:
        (_, steps), grads = results[k]
        err = rel_error([grads["W"], grads["U"], grads["b"]], ref)
        steps = np.asarray(steps)
        lines.append(f"| {rho} | {k} | {steps.mean():.1f} / {steps.max()} | "
                     f"{med[k] * 1e3:.1f} | {med[k] / base:.2f} | {compile_s[k]:.1f} | "
                     f"{err:.1e} |")
        print(lines[-1], flush=True)
    return lines


def bench_jax_equal_accuracy(rho: float, repeats: int) -> list[str]:
    """JAX at equal accuracy: for each optimistix peer (the settings of `bench_jax`), the
    cheapest `implicitdiff_jax.deq` setting searched (forward tol x extra steps x fixed-point
    backward rtol, or the defaults) whose gradient error is at most the peer's; times are
    medians of `repeats` interleaved calls of the jitted value-and-grad."""
    import jax
    import jax.numpy as jnp
    import optimistix as optx
    from jax.tree_util import Partial

    from implicitdiff.deq import IFT
    from implicitdiff_jax import deq

    ref, params, xj, f, fn = _jax_problem(rho)

    def idf_loss(**kw):
        def loss(p, x):
            z, _ = deq(Partial(f, p), x, z_shape=(H,), **kw)
            return (z * z).sum()
        return loss

    def optx_loss(solver):
        def loss(p, x):
            def one(xi):
                return optx.fixed_point(fn, solver, jnp.zeros(H, xj.dtype), args=(p, xi),
                                        max_steps=MAXITER, adjoint=optx.ImplicitAdjoint(),
                                        throw=False).value
            z = jax.vmap(one)(x)
            return (z * z).sum()
        return loss

    peers = {"optimistix FixedPointIteration + ImplicitAdjoint":
             optx_loss(optx.FixedPointIteration(rtol=TOL, atol=TOL)),
             "optimistix Newton + ImplicitAdjoint": optx_loss(optx.Newton(rtol=TOL, atol=TOL))}
    cands = {DEFAULTS.replace("DEQ(cell)", "deq(f, x)"): idf_loss()}
    for ft in (1e-4, 1e-5):
        for k in (1, 3):
            for bt in (1e-5, 1e-6):
                cands[f"tol={ft:g}, extra_step={k}, IFT(Richardson(rtol={bt:g}, "
                      "check_singular=False))"] = idf_loss(
                    solver_options={"tol": ft, "maxiter": MAXITER, "m": 5, "extra_step": k},
                    backward=IFT(idf.Richardson(omega=-1.0, rtol=bt, maxiter=MAXITER,
                                                check_singular=False)))
    for ft in (1e-5, 1e-6):  # towards Newton's error: a backward near float32's limit
        cands[f"tol={ft:g}, extra_step=3, IFT(Richardson(rtol=1e-07, check_singular=False))"] = \
            idf_loss(solver_options={"tol": ft, "maxiter": MAXITER, "m": 5, "extra_step": 3},
                     backward=IFT(idf.Richardson(omega=-1.0, rtol=1e-7, maxiter=MAXITER,
                                                 check_singular=False)))
    jitted = {k: jax.jit(jax.grad(v)) for k, v in {**peers, **cands}.items()}
    err = {}
    for k, g in list(jitted.items()):
        try:
            gr = jax.block_until_ready(g(params, xj))
        except Exception:  # a setting whose solve raised (under jit, wrapped by JAX)
            err[k] = math.inf
            del jitted[k]
            continue
        err[k] = rel_error([gr["W"], gr["U"], gr["b"]], ref)
    med = _jax_medians(jitted, (params, xj), repeats)
    lines = []
    dflt = next(iter(cands))
    for p in peers:
        ok = [k for k in cands if k in jitted and within(err[k], err[p])]
        best = min(ok, key=lambda k: med[k]) if ok else None
        for name in ([best] if best else []) + [dflt]:
            note = "" if name != dflt else (" (error within)" if within(err[name], err[p])
                                            else " (error above)")
            lines.append(f"| JAX dense, ρ = {rho} | {p} | {med[p] * 1e3:.1f} | {err[p]:.1e} "
                         f"| {name} | {med[name] * 1e3:.2f} | {err[name]:.1e} "
                         f"| {med[name] / med[p]:.3f}{note} |")
            print(lines[-1], flush=True)
        if not ok:
            print(f"| JAX dense, ρ = {rho} | {p} | none of the settings searched |", flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: robust on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rt, rj = (3, 3) if args.quick else (11, 11)
    from importlib.metadata import version
    tdv = version("torchdeq") if torchdeq is not None else "not installed"
    head = [
        "DEQ z = tanh(Wz + Ux + b): batch 64, hidden 256, float32, grad of sum(z²) wrt "
        "(W, U, b); forward Anderson to relative residual 1e-4 (history 5), backward solves to "
        "1e-5 relative",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; torchdeq "
        f"{tdv}; median of {rt} interleaved "
        "repeats",
        "",
        "| ρ | method | fwd steps mean / max | f calls (fwd) | max rel. residual | fwd ms "
        "| bwd ms | total ms | × torchdeq (same mode) | peak MiB | grad rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(head), flush=True)
    for rho in (0.5, 0.9):
        bench_torch_deq(rho, rt)
    print("\nEqual accuracy: for each peer, the cheapest implicitdiff setting searched "
          "(forward Anderson, history 5, or the fixed-point iteration: forward tol x extra steps "
          "x backward solver and rtol; the fixed-point forward and Phantom(k); or the layer's "
          "defaults) whose gradient error is at most the peer's (up to 1%); f calls / VJPs per "
          "forward + backward pass; median of "
          f"{rt} interleaved forward + backward passes\n")
    print("\n".join(EQ_HEAD), flush=True)
    for rho in (0.5, 0.9):
        bench_torch_equal_accuracy(rho, rt)
    print("\nSecond derivatives and torch.func (float64, batch 3, hidden 8, ‖W‖₂ = 0.5; HVP of "
          "sum(z²) in x by double backward vs central differences of the gradient)\n")
    print("| method | HVP rel. error | torch.func.grad | torch.func.jacfwd (forward mode) |")
    print("|---|---|---|---|", flush=True)
    bench_higher_order()
    try:
        import jax
        import optimistix  # noqa: F401
    except ImportError:  # pragma: no cover - optional
        print("\n(JAX / optimistix not installed: JAX part skipped)")
        return
    print("", flush=True)
    print(f"JAX {jax.__version__}, jit(value_and_grad), median of {rj} interleaved repeats "
          "(compile time excluded, shown separately)\n")
    print("| ρ | method | steps mean / max | ms | × implicitdiff | compile s | grad rel. err |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for rho in (0.5, 0.9):
        bench_jax(rho, rj)
    print("\nJAX at equal accuracy (the cheapest setting searched whose gradient error is at "
          f"most the peer's; jit(grad), median of {rj} interleaved calls)\n")
    print("\n".join(EQ_HEAD_JAX), flush=True)
    for rho in (0.5, 0.9):
        bench_jax_equal_accuracy(rho, rj)


if __name__ == "__main__":
    sys.exit(main())
