"""Convolutional DEQ benchmark on scikit-learn's digits: implicitdiff's `DEQ` against torchdeq.

    python benchmarks/bench_deq_conv.py            # full run (under a minute on 2 CPU cores)
    python benchmarks/bench_deq_conv.py --quick    # fewer repeats, for a smoke test

The data: the first 64 images of `sklearn.datasets.load_digits()` (bundled with scikit-learn,
no download), 1×8×8, standardized by the global pixel mean and standard deviation, and their
digit labels.

The model (MDEQ-lite style, per sample, float32): state z of shape (64, C, 8, 8) with C = 32
(n = 2048 per sample), and

    f(z, x) = GroupNorm(8 groups, C)(relu(conv(z) + inj(x)))

with `conv` a 3×3 C→C convolution (padding 1) whose weight is rescaled once so that its operator
norm on zero-padded 8×8 maps is ρ (power iteration with `conv2d` / `conv_transpose2d`; ρ = 0.5
and 0.9), `inj` a 3×3 1→C convolution (the input injection), biases 0.1·N(0, 1), GroupNorm
affine at its defaults. The loss is the cross-entropy of a fixed random linear head on the
spatially pooled state, z.mean((2, 3)) @ Wₕᵀ + bₕ, for the digit labels; the gradient is with
respect to the cell's parameters (both convolutions, their biases, the GroupNorm affine).
GroupNorm divides by a per-group standard deviation, so ‖∂f/∂z‖₂ is not ρ: the first table
reports the achieved ‖∂f/∂z‖₂ at the fixed point (power iteration, per sample), the asymptotic
rate of plain fixed-point iteration and its number of steps to a relative residual of 1e-12.
At ρ = 0.9 ‖∂f/∂z‖₂ exceeds 1 (f is not a 2-norm contraction), but its spectral radius is below
1: plain iteration, Anderson and the Richardson (fixed-point) backward still converge.

Methods, the same cell module (float32) inside
   - implicitdiff `DEQ(cell, z_shape=(C, 8, 8), solver="anderson", backward=IFT(BiCGStab) |
     IFT(Richardson(omega=-1)) | Phantom(5))`,
   - torchdeq `get_deq(f_solver="anderson", ift=True, b_solver="fixed_point_iter")` (IFT) and
     `get_deq(f_solver="anderson", grad=5, tau=1.0)` (phantom gradient, 5 steps),
   - and both IFT layers with the fixed-point iteration as the forward solver (torchdeq's
     default `f_solver`; implicitdiff `solver="fixed_point_iteration"`, backward Richardson),
with the settings of `bench_deq.py` (its constants are imported): forward relative residual
‖f(z) − z‖ / ‖f(z)‖ ≤ 1e-4 per sample, at most 100 iterations, Anderson history of 5 differences
(implicitdiff `m=5`, torchdeq `m=6`); backward linear solves to 1e-5 relative, at most 100
iterations. torchdeq stops the whole batch when the worst sample meets the tolerance;
implicitdiff stops each sample on its own.

Reported, as in `bench_deq.py`: forward steps (per sample, mean / max), the number of batched
calls of f in the forward (counted by the cell; it includes the extra application of f that
torchdeq's IFT makes to attach the backward hook, implicitdiff's residual check where the
solver's own residual norm does not already prove it, and the 5 recorded steps of the phantom
modes), the largest relative residual, forward and backward times (medians of interleaved
repeats), ratio of the total to torchdeq in the same mode, peak memory of one forward + backward
(`bench_torch.peak_bytes`) and the gradient's relative error against the exact implicit
gradient in float64. The reference: the float64 copy of the cell iterated to a relative residual
below 1e-13, then the adjoint equation (I − ∂f/∂zᵀ) u = ∂L/∂z* solved by Richardson iteration
(vector-Jacobian products in float64) until its update is below 1e-14 relative (the first
table gives the final residual), u pulled back through ∂f/∂θ. It is checked against a dense solve for sample 0 (its 2048×2048 Jacobian from
`torch.func.jacrev`, `numpy.linalg.solve`); the first table gives their relative difference,
and the error of implicitdiff's IFT gradient when the forward is solved to 1e-6 instead of
1e-4: the IFT errors in the main table (~1e-3) come from the forward tolerance, not from the
backward.
The last column is the cost of one batched f call: the cell is cheap (small images), so the
solvers' own per-iteration work (Anderson's Gram matrices and mixing on 64 × 5 × 2048 histories,
bookkeeping) is a large part of the forward time, in both libraries.
torchdeq's IFT error can be lower only because its batch-wide stopping rule runs every sample
as many steps as the slowest one, so most samples end well below 1e-4.

The last table compares at equal accuracy (`bench_deq.equal_accuracy`): for each torchdeq
mode, the cheapest implicitdiff setting searched whose gradient error is at most torchdeq's.

Absolute times are for this machine only (CPU); compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from bench_deq import (
    BTOL,
    EQ_HEAD,
    MAXITER,
    TOL,
    count_vjps,
    equal_accuracy,
    equal_accuracy_candidates,
    rel_error,
    time_methods,
    torch_methods,
    torch_peers,
)
from torch import nn

import implicitdiff as idf

warnings.filterwarnings("ignore")

try:
    import torchdeq
except ImportError:  # pragma: no cover - optional
    torchdeq = None

B, C, S, K = 64, 32, 8, 10  # batch, channels, image side, classes
GROUPS = 8
RHOS = (0.5, 0.9)


# ---- data and model ----------------------------------------------------------------------------

def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = d.images.astype(np.float64)
    x = (imgs[:B] - imgs.mean()) / imgs.std()
    return torch.tensor(x)[:, None], torch.tensor(d.target[:B])


def conv_opnorm(w: torch.Tensor, iters: int = 200) -> float:
    """‖conv(·, w)‖₂ on zero-padded S×S maps (padding 1), by power iteration."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, w.shape[1], S, S, generator=g, dtype=w.dtype)
    for _ in range(iters):
        v = F.conv_transpose2d(F.conv2d(v, w, padding=1), w, padding=1)
        v = v / v.norm()
    return float(F.conv2d(v, w, padding=1).norm())


def make_params(rho: float) -> dict[str, torch.Tensor]:
    """The cell's parameters in float64 (the conv weight rescaled to operator norm rho), and the
    fixed head."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(C, C, 3, 3, generator=g, dtype=torch.float64)
    return {
        "conv.weight": rho * w / conv_opnorm(w),
        "conv.bias": 0.1 * torch.randn(C, generator=g, dtype=torch.float64),
        "inj.weight": torch.randn(C, 1, 3, 3, generator=g, dtype=torch.float64) / 3,
        "inj.bias": 0.1 * torch.randn(C, generator=g, dtype=torch.float64),
        "norm.weight": torch.ones(C, dtype=torch.float64),
        "norm.bias": torch.zeros(C, dtype=torch.float64),
        "head.weight": torch.randn(K, C, generator=g, dtype=torch.float64) / C ** 0.5,
        "head.bias": torch.zeros(K, dtype=torch.float64),
    }


class Cell(nn.Module):
    """f(z, x) = GroupNorm(relu(conv(z) + inj(x))); counts its (batched) calls and the
    vector-Jacobian products through them (`calls`, `vjps`)."""

    def __init__(self, params: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.inj = nn.Conv2d(1, C, 3, padding=1)
        self.norm = nn.GroupNorm(GROUPS, C)
        self.to(dtype)
        with torch.no_grad():
            for k, p in self.named_parameters():
                p.copy_(params[k])
        self.calls = 0
        self.vjps = 0

    def forward(self, z, x):
        self.calls += 1
        return count_vjps(self, self.norm(torch.relu(self.conv(z) + self.inj(x))))

    def grads(self):
        return [p.grad for p in self.parameters()]


def loss_fn(z, y, params):
    logits = z.mean((2, 3)) @ params["head.weight"].to(z.dtype).T + params["head.bias"].to(z.dtype)
    return F.cross_entropy(logits, y)


# ---- the exact gradient in float64 and the cell's contraction --------------------------------

def _rel_norm(a, b):
    return a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def reference(params, x, y):
    """The exact implicit gradient (float64) and diagnostics of the map at its fixed point."""
    cell = Cell(params, torch.float64)
    z = torch.zeros(B, C, S, S, dtype=torch.float64)
    hist = []
    with torch.no_grad():
        for _ in range(5000):
            fz = cell(z, x)
            r = float(_rel_norm(fz - z, fz).max())
            hist.append(r)
            z = fz
            if r < 1e-13:
                break
    steps_1e12 = next(i + 1 for i, r in enumerate(hist) if r < 1e-12)
    rate = (hist[-1] / hist[-11]) ** 0.1 if len(hist) > 11 else float("nan")

    zr = z.clone().requires_grad_()
    out = cell(zr, x)
    zl = z.clone().requires_grad_()
    (gz,) = torch.autograd.grad(loss_fn(zl, y, params), zl)

    def vjp(u):  # Jᵀu per sample
        return torch.autograd.grad(out, zr, u, retain_graph=True)[0]

    u = gz.clone()  # Richardson on u = gz + Jᵀu
    for _ in range(5000):
        u_new = gz + vjp(u)
        done = float(_rel_norm(u_new - u, u_new).max()) < 1e-14
        u = u_new
        if done:
            break
    adj_res = float(_rel_norm(u - vjp(u) - gz, gz).max())
    grads = torch.autograd.grad(out, list(cell.parameters()), u, retain_graph=True)

    # ‖J‖₂ per sample by power iteration on JᵀJ (jvp then vjp)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(z.shape, generator=g, dtype=torch.float64)
    for _ in range(100):
        v = v / v.flatten(1).norm(dim=1)[:, None, None, None]
        _, jv = torch.func.jvp(lambda q: cell(q, x), (z,), (v,))
        v = vjp(jv)
    jnorm = v.flatten(1).norm(dim=1) ** 0.5

    # dense check of the adjoint for sample 0
    def f0(q):
        return cell(q.reshape(1, C, S, S), x[:1]).reshape(-1)

    J0 = torch.func.jacrev(f0)(z[0].reshape(-1)).detach().numpy()
    u0 = np.linalg.solve(np.eye(J0.shape[0]) - J0.T, gz[0].reshape(-1).numpy())
    dense_diff = float(np.linalg.norm(u0 - u[0].reshape(-1).numpy()) / np.linalg.norm(u0))
    diag = {"jnorm_max": float(jnorm.max()), "jnorm_mean": float(jnorm.mean()),
            "rate": rate, "steps_1e12": steps_1e12, "adj_res": adj_res,
            "dense_diff": dense_diff}
    return [gr.detach() for gr in grads], diag


def tight_forward_error(params, x, y, ref, tol: float = 1e-6) -> float:
    """implicitdiff IFT (BiCGStab, backward as in the table) with the forward solved to `tol`:
    the gradient error that remains when the forward tolerance is not the limit."""
    from implicitdiff_torch import DEQ, IFT

    cell = Cell(params)
    layer = DEQ(cell, z_shape=(C, S, S), solver="anderson",
                solver_options={"tol": tol, "maxiter": MAXITER, "m": 5},
                backward=IFT(idf.BiCGStab(rtol=BTOL, maxiter=MAXITER)))
    loss_fn(layer(x.float()), y, params).backward()
    return rel_error(cell.grads(), ref)


def f_call_ms(params, x, calls: int = 41) -> float:
    """Median time of one batched call of the float32 cell (no autograd), in ms."""
    cell, xf = Cell(params), x.float()
    z = torch.zeros(B, C, S, S)
    times = []
    with torch.no_grad():
        z = cell(z, xf)
        for _ in range(calls):
            t = time.perf_counter()
            cell(z, xf)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


# ---- the table: bench_deq.py's methods and timing, on this cell ------------------------------

def bench(rho: float, params, x, y, ref, repeats: int) -> list[str]:
    ms = torch_methods(lambda: Cell(params), x.float(), (C, S, S))
    return time_methods(rho, ms, lambda z: loss_fn(z, y, params), ref, repeats)


def bench_equal_accuracy(rho: float, params, x, y, ref, repeats: int) -> list[str]:
    """`bench_deq.equal_accuracy` on this cell: for each torchdeq mode, the cheapest implicitdiff
    setting searched whose gradient error is at most torchdeq's."""
    make = lambda: Cell(params)  # noqa: E731
    xf = x.float()
    return equal_accuracy(f"conv, ρ = {rho}", torch_peers(make, xf, (C, S, S)),
                          equal_accuracy_candidates(make, xf, (C, S, S)),
                          lambda z: loss_fn(z, y, params), ref, repeats)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: robust on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 21
    from importlib.metadata import version
    tdv = version("torchdeq") if torchdeq is not None else "not installed"

    x, y = load_data()
    setups = {}
    print(f"Conv DEQ on sklearn digits: batch {B}, state {C}×{S}×{S} (n = {C * S * S} per "
          f"sample), f(z, x) = GroupNorm({GROUPS}, {C})(relu(conv3x3(z) + inj3x3(x))), float32; "
          "loss cross-entropy of a fixed linear head on pooled z; grad wrt the cell's "
          "parameters\n", flush=True)
    print("| ρ = ‖conv‖₂ | ‖∂f/∂z‖₂ at z* (max / mean over samples) | plain iteration rate "
          "| plain iteration steps to 1e-12 | reference adjoint residual | reference vs dense "
          "solve (sample 0) | grad rel. err, implicitdiff IFT (BiCGStab), forward tol 1e-6 "
          "| one f call, ms (float32, no grad) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for rho in RHOS:
        params = make_params(rho)
        ref, d = reference(params, x, y)
        setups[rho] = (params, ref)
        print(f"| {rho} | {d['jnorm_max']:.2f} / {d['jnorm_mean']:.2f} | {d['rate']:.2f} "
              f"| {d['steps_1e12']} | {d['adj_res']:.1e} | {d['dense_diff']:.1e} "
              f"| {tight_forward_error(params, x, y, ref):.1e} | {f_call_ms(params, x):.2f} |",
              flush=True)

    print(f"\nForward Anderson to relative residual {TOL:g} (history 5), at most {MAXITER} "
          f"iterations; backward solves to {BTOL:g} relative. torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU; torchdeq {tdv}; median of {repeats} "
          "interleaved repeats\n")
    print("| ρ | method | fwd steps mean / max | f calls (fwd) | max rel. residual | fwd ms "
          "| bwd ms | total ms | × torchdeq (same mode) | peak MiB | grad rel. err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for rho in RHOS:
        params, ref = setups[rho]
        bench(rho, params, x, y, ref, repeats)
    print("\nEqual accuracy: for each torchdeq mode, the cheapest implicitdiff setting searched "
          "(forward Anderson, history 5, or the fixed-point iteration: forward tol x extra steps "
          "x backward solver and rtol; the fixed-point forward and Phantom(k); or the layer's "
          "defaults) whose gradient error is at most torchdeq's (up to 1%); f calls / VJPs per "
          f"forward + backward pass; median of {repeats} "
          "interleaved forward + backward passes\n")
    print("\n".join(EQ_HEAD), flush=True)
    for rho in RHOS:
        params, ref = setups[rho]
        bench_equal_accuracy(rho, params, x, y, ref, repeats)


if __name__ == "__main__":
    sys.exit(main())
