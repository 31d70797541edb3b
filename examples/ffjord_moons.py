"""FFJORD, a continuous normalizing flow, on scikit-learn's two moons with `idf.ode.odeint`
(PyTorch or JAX, CPU), and a plot of the learned density.

    python examples/ffjord_moons.py                          # 600 Adam steps (about 10
                                                             # minutes on 2 shared cores);
                                                             # writes docs/img/ffjord_moons.png
    python examples/ffjord_moons.py --framework jax          # the same in JAX
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

In JAX (`--framework jax`) the model, the data, the minibatches and the solver settings are the
same; the initial weights and the noise are drawn from the same distributions by NumPy (not the
same numbers as torch's generator). The parameters are a pytree (a list of (W, b) per layer,
drawn as PyTorch's `nn.Linear` draws them), passed to `odeint` positionally, and Hutchinson's
estimator is one Jacobian-vector product (jax.jvp: (∂f/∂z)ε, then εᵀ of it; the same number as
the vector-Jacobian product's), the exact trace d of them. The training step (the loss and its
gradient through `odeint`, and Adam) is one `jax.jit`-compiled function. Both frameworks
differentiate with `grad="direct"` by default (`--grad` chooses): under JAX its reverse pass
stores the loop's carry for each of the `--max-steps` iterations and recomputes the steps that
ran, as fast here as `"checkpoint"`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from collections.abc import Callable
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
                   generator: torch.Generator | None = None, grad: str = "direct"
                   ) -> torch.Tensor:
    """log p(x) per point, (n,): integrate [x, 0] from t = 0 to 1 and add the base log density."""
    n, d = x.shape
    eps = (torch.randint(0, 2, (n, d), generator=generator, dtype=x.dtype) * 2 - 1
           if not exact else torch.zeros(n, d, dtype=x.dtype))
    y0 = torch.cat([x, torch.zeros(n, 1, dtype=x.dtype)], dim=-1)
    ts = torch.tensor([0.0, 1.0], dtype=x.dtype)
    params = list(field.parameters())
    y1 = ode.odeint(augmented(field, exact), y0, ts, eps, *params, method="dopri5",
                    rtol=tol, atol=tol, max_steps=10_000, grad=grad)[-1]
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


def plot(loglik: Callable[[np.ndarray], np.ndarray], x: np.ndarray, path: str, grid: int,
         title: str = "FFJORD density (idf.ode.odeint)") -> None:
    """The data's histogram beside the density exp(loglik) on a grid (`loglik`: the rows of an
    (n, 2) array to their log-likelihoods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = 2.5
    g = np.linspace(-lim, lim, grid)
    X, Y = np.meshgrid(g, g)
    pts = np.stack([X.ravel(), Y.ravel()], -1)
    dens = np.exp(loglik(pts)).reshape(grid, grid)
    fig, ax = plt.subplots(1, 2, figsize=(8, 4))
    ax[0].hist2d(x[:, 0], x[:, 1], bins=grid, range=[[-lim, lim], [-lim, lim]], cmap="viridis")
    ax[0].set_title("data (standardized two moons)")
    ax[1].pcolormesh(X, Y, dens, cmap="viridis", shading="auto")
    ax[1].set_title(title)
    for a_ in ax:
        a_.set_aspect("equal")
        a_.set_xticks([])
        a_.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- JAX --------------------------------------------------------------------------------------

Params = list  # [(W, b) per layer], W of shape (out, in) as in nn.Linear


def init_params(hidden: int, seed: int, dim: int = 2) -> Params:
    """The MLP's parameters for JAX, float32 NumPy: [(W1, b1), (W2, b2), (W3, b3)] with W of
    shape (out, in), drawn as PyTorch's `nn.Linear` draws them (uniform on ±1/√fan_in)."""
    rng = np.random.default_rng(seed)
    sizes = [dim + 1, hidden, hidden, dim]
    out = []
    for n_in, n_out in itertools.pairwise(sizes):
        lim = 1 / math.sqrt(n_in)
        out.append((rng.uniform(-lim, lim, (n_out, n_in)).astype(np.float32),
                    rng.uniform(-lim, lim, n_out).astype(np.float32)))
    return out


def params_of(field: Field) -> Params:
    """A PyTorch `Field`'s parameters as the JAX pytree (NumPy arrays, the module's dtype)."""
    lin = [m for m in field.net if isinstance(m, nn.Linear)]
    return [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()) for m in lin]


def mlp_jax(params: Params, t: Any, z: Any) -> Any:
    """f(t, z) in JAX: the MLP of the concatenation (z, t), tanh between layers (`Field`'s)."""
    import jax.numpy as jnp

    h = jnp.concatenate([z, jnp.broadcast_to(t, (*z.shape[:-1], 1)).astype(z.dtype)], -1)
    for i, (W, b) in enumerate(params):
        h = h @ W.T + b
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def augmented_jax(field: Callable[..., Any] = mlp_jax, exact: bool = False
                  ) -> Callable[..., Any]:
    """The augmented vector field f(t, y, eps, params) for `odeint` in JAX, as `augmented`:
    state [z, Δ] (n, d + 1), Δ' = εᵀ(∂f/∂z)ε by one `jax.jvp` along the noise `eps` (n, d), or
    the exact trace (d `jax.jvp`s along the unit vectors) when `exact`. `field(params, t, z)`
    is the flow's field (default the MLP); `params`, any pytree, is differentiated."""
    import jax
    import jax.numpy as jnp

    def f(t: Any, y: Any, eps: Any, params: Any) -> Any:
        z = y[..., :-1]

        def g(z_: Any) -> Any:
            return field(params, t, z_)

        if exact:
            dz = g(z)
            d = z.shape[-1]
            tr = sum(jax.jvp(g, (z,), (jnp.zeros_like(z).at[..., i].set(1),))[1][..., i]
                     for i in range(d))
        else:
            dz, jv = jax.jvp(g, (z,), (eps,))
            tr = jnp.sum(jv * eps, -1)
        return jnp.concatenate([dz, tr[..., None]], -1)

    return f


def log_likelihood_jax(params: Any, x: Any, eps: Any = None, *, tol: float, exact: bool,
                       field: Callable[..., Any] = mlp_jax, max_steps: int = 1000,
                       grad: str = "direct") -> Any:
    """log p(x) per point (n,) in JAX, as `log_likelihood`: integrate [x, 0] from t = 0 to 1
    and add the base log density. `eps` (n, d): the Hutchinson noise (ignored when `exact`)."""
    import jax.numpy as jnp

    n, d = x.shape
    if exact or eps is None:
        eps = jnp.zeros_like(x)
    y0 = jnp.concatenate([x, jnp.zeros((n, 1), x.dtype)], -1)
    ts = jnp.asarray([0.0, 1.0], x.dtype)
    y1 = ode.odeint(augmented_jax(field, exact), y0, ts, eps, params, method="dopri5",
                    rtol=tol, atol=tol, max_steps=max_steps, grad=grad)[-1]
    z, delta = y1[:, :-1], y1[:, -1]
    return -0.5 * jnp.sum(z * z, -1) - 0.5 * d * math.log(2 * math.pi) + delta


def rademacher(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """±1 with probability 1/2 each, float32."""
    return (rng.integers(0, 2, shape) * 2 - 1).astype(np.float32)


# ---- training -----------------------------------------------------------------------------------

def _minibatch(rng: np.random.Generator, train_x: np.ndarray, mu: np.ndarray, sd: np.ndarray,
               batch: int) -> np.ndarray:
    """`batch` standardized training points without replacement, float32."""
    return ((train_x[rng.choice(len(train_x), batch, replace=False)] - mu) / sd
            ).astype(np.float32)


def _report(it: int, a: argparse.Namespace, losses: list[float], t0: float) -> None:
    every = max(1, a.iters // 10)
    if not a.silent and (it % every == 0 or it == a.iters - 1):
        print(f"iter {it:5d}  -log p {losses[-1]:.3f}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)


def _train_torch(train_x: np.ndarray, mu: np.ndarray, sd: np.ndarray, a: argparse.Namespace
                 ) -> dict[str, Any]:
    torch.manual_seed(a.seed)
    torch.set_default_dtype(torch.float32)
    field = Field(a.hidden)
    opt = torch.optim.Adam(field.parameters(), lr=a.lr)
    rng = np.random.default_rng(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for it in range(a.iters):
        xb = torch.tensor(_minibatch(rng, train_x, mu, sd, a.batch))
        loss = -log_likelihood(field, xb, tol=a.tol, exact=False, generator=gen,
                               grad=a.grad).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        _report(it, a, losses, t0)
    seconds = time.perf_counter() - t0
    return dict(losses=losses, seconds=seconds, loglik=lambda x: evaluate(field, x, a.tol),
                threads=f"{torch.get_num_threads()} torch threads")


def _train_jax(train_x: np.ndarray, mu: np.ndarray, sd: np.ndarray, a: argparse.Namespace
               ) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    tm = jax.tree_util.tree_map

    def loss_fn(params: Params, x: Any, eps: Any) -> Any:
        return -jnp.mean(log_likelihood_jax(params, x, eps, tol=a.tol, exact=False,
                                            max_steps=a.max_steps, grad=a.grad))

    b1, b2, tiny = 0.9, 0.999, 1e-8

    @jax.jit
    def train_step(params: Params, m: Params, v: Params, k: Any, x: Any, eps: Any) -> Any:
        # Adam (Kingma & Ba), written out: the same update as torch.optim.Adam
        loss, g = jax.value_and_grad(loss_fn)(params, x, eps)
        m = tm(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g)
        v = tm(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v, g)
        c1, c2 = 1 - b1 ** k, 1 - b2 ** k
        params = tm(lambda p, mi, vi: p - a.lr * (mi / c1) / (jnp.sqrt(vi / c2) + tiny),
                    params, m, v)
        return params, m, v, loss

    params = tm(jnp.asarray, init_params(a.hidden, a.seed))
    m = tm(jnp.zeros_like, params)
    v = tm(jnp.zeros_like, params)
    rng = np.random.default_rng(a.seed)
    noise = np.random.default_rng([a.seed, 1])
    losses: list[float] = []
    t0 = time.perf_counter()
    for it in range(a.iters):
        xb = _minibatch(rng, train_x, mu, sd, a.batch)
        params, m, v, loss = train_step(params, m, v, jnp.float32(it + 1), jnp.asarray(xb),
                                        jnp.asarray(rademacher(noise, xb.shape)))
        losses.append(float(loss))
        if it == 0:
            first = time.perf_counter() - t0
        _report(it, a, losses, t0)
    seconds = time.perf_counter() - t0
    chunk = 2048
    ll = jax.jit(lambda p, x: log_likelihood_jax(p, x, tol=a.tol, exact=True, max_steps=10_000))

    def loglik(x: np.ndarray) -> np.ndarray:
        # exact trace, in chunks padded to one shape (one compilation)
        out = []
        for i in range(0, len(x), chunk):
            xi = x[i:i + chunk].astype(np.float32)
            pad = np.zeros((chunk - len(xi), xi.shape[1]), np.float32)
            out.append(np.asarray(ll(params, jnp.asarray(np.concatenate([xi, pad]))))[:len(xi)])
        return np.concatenate(out)

    return dict(losses=losses, seconds=seconds, loglik=loglik,
                threads=f"JAX {jax.__version__}; the first step, which compiles, "
                f"took {first:.1f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the flow; returns the losses, the training time (s), the test mean
    log-likelihood of the base density and of the flow, and the plot's path (or None)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--framework", choices=("torch", "jax"), default="torch")
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 40 steps of 128 points, hidden 32, tol 1e-4, 40x40 plot")
    ap.add_argument("--iters", type=int, default=None, help="Adam steps (default 600; quick 40)")
    ap.add_argument("--batch", type=int, default=None, help="points per step (default 256)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden units (default 64)")
    ap.add_argument("--tol", type=float, default=None,
                    help="odeint's rtol = atol (default 1e-5; quick 1e-4)")
    ap.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 5e-3)")
    ap.add_argument("--grad", choices=("direct", "checkpoint", "backsolve"), default=None,
                    help="odeint's gradient mode in training (default direct)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="odeint's max_steps per sample in training under JAX (default 1000)")
    ap.add_argument("--grid", type=int, default=None, help="plot resolution (default 100)")
    ap.add_argument("--out", default="docs/img/ffjord_moons.png",
                    help="where to save the density plot ('' for none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--silent", action="store_true", help="print nothing")
    a = ap.parse_args(argv)
    q = a.quick
    a.iters = a.iters or (40 if q else 600)
    a.batch = a.batch or (128 if q else 256)
    a.hidden = a.hidden or (32 if q else 64)
    a.tol = a.tol or (1e-4 if q else 1e-5)
    a.lr = a.lr or 5e-3
    grid = a.grid or (40 if q else 100)
    a.grad = a.grad or "direct"
    a.max_steps = a.max_steps or 1000
    train_x = make_data(20_000, a.seed)
    mu, sd = train_x.mean(0), train_x.std(0)
    test_x = ((make_data(2_000 if not q else 500, a.seed + 1) - mu) / sd).astype(np.float32)
    train = _train_jax if a.framework == "jax" else _train_torch
    tr = train(train_x, mu, sd, a)
    seconds, losses = tr["seconds"], tr["losses"]
    ll = float(np.mean(tr["loglik"](test_x)))
    ll_base = base_log_likelihood(test_x)
    out: dict[str, Any] = dict(losses=losses, seconds=seconds, loglik=ll, loglik_base=ll_base,
                               plot=None)
    if not a.silent:
        print(f"training ({a.framework}, grad={a.grad!r}): {seconds:.1f} s for {a.iters} steps "
              f"of {a.batch} points ({1e3 * seconds / a.iters:.0f} ms per step) on this CPU "
              f"({tr['threads']})")
        print(f"test mean log-likelihood (standardized coordinates, exact trace): base density "
              f"{ll_base:.3f}, FFJORD {ll:.3f}")
    if a.out:
        name = "JAX" if a.framework == "jax" else "PyTorch"
        plot(tr["loglik"], ((train_x[:5000] - mu) / sd), a.out, grid,
             title=f"FFJORD density (idf.ode.odeint, {name})")
        out["plot"] = a.out
        if not a.silent:
            print(f"density plot: {a.out}")
    return out


if __name__ == "__main__":
    main()
