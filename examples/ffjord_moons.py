"""FFJORD, a continuous normalizing flow, on scikit-learn's two moons with `idf.ode.odeint`
(PyTorch, CPU), and a plot of the learned density.

    python examples/ffjord_moons.py                          # 600 Adam steps (about 10
                                                             # minutes on 2 shared cores);
                                                             # writes docs/img/ffjord_moons.png
    python examples/ffjord_moons.py --quick --out /tmp/m.png # a short run, for a smoke test

The model (Grathwohl et al., "FFJORD", ICLR 2019). A data point x is carried to z = z(1) by
z' = f(t, z, θ), z(0) = x, with f an MLP of (z, t) (`--hidden` units, two hidden layers, tanh).
The change of variables in continuous time gives

    log p(x) = log N(z(1); 0, I) + ∫₀¹ tr(∂f/∂z)(t, z(t)) dt,

so `odeint` integrates the augmented state [z, Δ] with Δ' = tr(∂f/∂z), Δ(0) = 0, row by row
(each data point its own sample with its own adaptive steps; dopri5, rtol = atol = `--tol`).
During training the trace is Hutchinson's estimator εᵀ(∂f/∂z)ε with ε Rademacher, one ε per
data point, fixed during the solve (passed to the field as an argument that does not require
grad), computed by one vector-Jacobian product with `create_graph=True`, so `grad="direct"`
differentiates through it. Evaluation (the test log-likelihood and the plot) uses the exact trace
(d = 2: two vector-Jacobian products).

The data: `sklearn.datasets.make_moons(noise=0.05)`, standardized (zero mean, unit variance per
coordinate, from the training set), generated here (no download); the base density N(0, I)
itself gives the standardized data a mean log-likelihood of about -log(2π) - 1 ≈ -2.84, the
number the flow has to beat. Training: Adam on fresh minibatches of `--batch` points.
Printed: the training time, the test mean log-likelihood (per point, in the standardized
coordinates) of the base density and of the flow; saved: the flow's density on a grid beside a
histogram of the data (matplotlib, `--out`).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from implicitdiff import ode


class Field(nn.Module):
    """f(t, z): an MLP of the concatenation (z, t), two hidden layers with tanh."""

    def __init__(self, hidden: int = 64, dim: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, dim))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, t.expand(*z.shape[:-1], 1)], dim=-1))


def augmented(field: Field, exact: bool = False):
    """The augmented vector field for `odeint`: state [z, Δ] of shape (n, d + 1), Δ' = tr ∂f/∂z
    (Hutchinson's εᵀ(∂f/∂z)ε with the noise argument `eps` (n, d); exact when `exact`).
    `params` are the module's parameters, passed positionally so odeint differentiates them
    (torch.func.functional_call)."""
    names = [n for n, _ in field.named_parameters()]

    def f(t: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, *params: torch.Tensor
          ) -> torch.Tensor:
        with torch.enable_grad():
            z = y[..., :-1]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = torch.func.functional_call(field, dict(zip(names, params)), (t, z))
            if exact:  # for evaluation (no graph beyond this call): d VJPs with unit vectors
                tr = sum(torch.autograd.grad(dz[..., i].sum(), z, retain_graph=True)[0][..., i]
                         for i in range(z.shape[-1]))
            else:
                (vjp,) = torch.autograd.grad(dz, z, eps, create_graph=True)
                tr = (vjp * eps).sum(-1)
        return torch.cat([dz, tr.unsqueeze(-1)], dim=-1)

    return f


def log_likelihood(field: Field, x: torch.Tensor, *, tol: float, exact: bool,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(x) per point, (n,): integrate [x, 0] from t = 0 to 1 and add the base log density."""
    n, d = x.shape
    eps = (torch.randint(0, 2, (n, d), generator=generator, dtype=x.dtype) * 2 - 1
           if not exact else torch.zeros(n, d, dtype=x.dtype))
    y0 = torch.cat([x, torch.zeros(n, 1, dtype=x.dtype)], dim=-1)
    ts = torch.tensor([0.0, 1.0], dtype=x.dtype)
    params = list(field.parameters())
    y1 = ode.odeint(augmented(field, exact), y0, ts, eps, *params, method="dopri5",
                    rtol=tol, atol=tol, max_steps=10_000)[-1]
    z, delta = y1[:, :-1], y1[:, -1]
    base = -0.5 * (z * z).sum(-1) - 0.5 * d * math.log(2 * math.pi)
    return base + delta


def base_log_likelihood(x: np.ndarray) -> float:
    """Mean log N(x; 0, I): the base density alone, what the flow has to beat."""
    d = x.shape[1]
    return float(np.mean(-0.5 * (x * x).sum(-1) - 0.5 * d * math.log(2 * math.pi)))


def make_data(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    return make_moons(n_samples=n, noise=0.05, random_state=seed)[0]


def evaluate(field: Field, x: np.ndarray, tol: float, chunk: int = 2048) -> np.ndarray:
    """Exact-trace log-likelihoods of the rows of x, in chunks, without recording a graph."""
    out = []
    for i in range(0, len(x), chunk):
        xi = torch.tensor(x[i:i + chunk], dtype=torch.float32)
        with torch.no_grad():
            out.append(log_likelihood(field, xi, tol=tol, exact=True).numpy())
    return np.concatenate(out)


def plot(field: Field, x: np.ndarray, path: str, grid: int, tol: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = 2.5
    g = np.linspace(-lim, lim, grid)
    X, Y = np.meshgrid(g, g)
    pts = np.stack([X.ravel(), Y.ravel()], -1)
    dens = np.exp(evaluate(field, pts, tol)).reshape(grid, grid)
    fig, ax = plt.subplots(1, 2, figsize=(8, 4))
    ax[0].hist2d(x[:, 0], x[:, 1], bins=grid, range=[[-lim, lim], [-lim, lim]], cmap="viridis")
    ax[0].set_title("data (standardized two moons)")
    ax[1].pcolormesh(X, Y, dens, cmap="viridis", shading="auto")
    ax[1].set_title("FFJORD density (idf.ode.odeint)")
    for a_ in ax:
        a_.set_aspect("equal")
        a_.set_xticks([])
        a_.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the flow; returns the losses, the training time (s), the test mean
    log-likelihood of the base density and of the flow, and the plot's path (or None)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 40 steps of 128 points, hidden 32, tol 1e-4, 40x40 plot")
    ap.add_argument("--iters", type=int, default=None, help="Adam steps (default 600; quick 40)")
    ap.add_argument("--batch", type=int, default=None, help="points per step (default 256)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden units (default 64)")
    ap.add_argument("--tol", type=float, default=None,
                    help="odeint's rtol = atol (default 1e-5; quick 1e-4)")
    ap.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 5e-3)")
    ap.add_argument("--grid", type=int, default=None, help="plot resolution (default 100)")
    ap.add_argument("--out", default="docs/img/ffjord_moons.png",
                    help="where to save the density plot ('' for none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--silent", action="store_true", help="print nothing")
    a = ap.parse_args(argv)
    q = a.quick
    iters = a.iters or (40 if q else 600)
    batch = a.batch or (128 if q else 256)
    hidden = a.hidden or (32 if q else 64)
    tol = a.tol or (1e-4 if q else 1e-5)
    lr = a.lr or 5e-3
    grid = a.grid or (40 if q else 100)
    torch.manual_seed(a.seed)
    torch.set_default_dtype(torch.float32)
    train_x = make_data(20_000, a.seed)
    mu, sd = train_x.mean(0), train_x.std(0)
    test_x = ((make_data(2_000 if not q else 500, a.seed + 1) - mu) / sd).astype(np.float32)
    field = Field(hidden)
    opt = torch.optim.Adam(field.parameters(), lr=lr)
    rng = np.random.default_rng(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    losses = []
    every = max(1, iters // 10)
    t0 = time.perf_counter()
    for it in range(iters):
        xb = torch.tensor(((train_x[rng.choice(len(train_x), batch, replace=False)] - mu) / sd)
                          .astype(np.float32))
        loss = -log_likelihood(field, xb, tol=tol, exact=False, generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not a.silent and (it % every == 0 or it == iters - 1):
            print(f"iter {it:5d}  -log p {losses[-1]:.3f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    seconds = time.perf_counter() - t0
    ll = float(np.mean(evaluate(field, test_x, tol)))
    ll_base = base_log_likelihood(test_x)
    out: dict[str, Any] = dict(losses=losses, seconds=seconds, loglik=ll, loglik_base=ll_base,
                               plot=None)
    if not a.silent:
        print(f"training: {seconds:.1f} s for {iters} steps of {batch} points "
              f"({1e3 * seconds / iters:.0f} ms per step) on this CPU "
              f"({torch.get_num_threads()} torch threads)")
        print(f"test mean log-likelihood (standardized coordinates, exact trace): base density "
              f"{ll_base:.3f}, FFJORD {ll:.3f}")
    if a.out:
        plot(field, ((train_x[:5000] - mu) / sd), a.out, grid, tol)
        out["plot"] = a.out
        if not a.silent:
            print(f"density plot: {a.out}")
    return out


if __name__ == "__main__":
    main()
