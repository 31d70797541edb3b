"""A Neural ODE fit of spiral dynamics with `idf.ode.odeint`, in PyTorch or JAX, on CPU.

    python examples/ode_spiral.py                      # PyTorch, 600 iterations (a few minutes)
    python examples/ode_spiral.py --framework jax      # the same in JAX (one jit-compiled step)
    python examples/ode_spiral.py --quick              # a short run, for a smoke test

The data (generated here, as in torchdiffeq's `ode_demo`): the spiral y' = (y³) A, cubed
elementwise, with A = [[-0.1, 2], [-2, -0.1]] and y(0) = (2, 0), observed at `--data-size`
equally spaced times in [0, `--t-max`], solved by `odeint` at rtol = atol = 1e-10 in float64.

The model: a Neural ODE y' = W2 tanh(W1 y³ + b1) + b2 (50 hidden units, float32, as
`ode_demo`'s `ODEFunc`), trained with Adam on minibatches of `--batch-size` short pieces of
the trajectory: each piece starts at a random observation and runs `--batch-time` observations,
and the pieces of a minibatch are the samples of one batched `odeint` call (the field is
autonomous, so every piece starts at time 0), each with its own adaptive steps (Dormand–Prince
5(4), rtol = 1e-5, atol = 1e-6), differentiated with `grad="direct"` (pieces of a few steps
each, whose recorded steps cost little memory: the fastest mode here; `odeint`'s default is
`"checkpoint"`). The loss is the mean
absolute error along the pieces. At the end the whole trajectory is integrated from y(0) and
compared with the data ("fit error": the mean absolute error over all observations).

In JAX the training step (loss and gradient through `odeint`, and the Adam update) is one
`jax.jit`-compiled function; `max_steps` is kept small (`--max-steps`), since JAX's reverse mode
stores the loop's state for every one of its `max_steps` iterations (docs/neural-odes.md).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from implicitdiff import ode

A_TRUE = np.array([[-0.1, 2.0], [-2.0, -0.1]])
Y0_TRUE = np.array([2.0, 0.0])
RTOL, ATOL = 1e-5, 1e-6


def make_data(data_size: int, t_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Times (data_size,) and the true spiral (data_size, 2), float64, solved tightly."""
    t = np.linspace(0.0, t_max, data_size)
    ys = ode.odeint(lambda t_, y: (y ** 3) @ A_TRUE, Y0_TRUE, t, method="dopri5",
                    rtol=1e-10, atol=1e-10, max_steps=100_000)
    return t, np.asarray(ys)


def init_params(hidden: int, seed: int) -> list[np.ndarray]:
    """W1 (hidden, 2), b1, W2 (2, hidden), b2: Gaussian with standard deviation 0.1 and zero
    biases (ode_demo's initialization), float32."""
    rng = np.random.default_rng(seed)
    return [np.asarray(a, np.float32) for a in (0.1 * rng.standard_normal((hidden, 2)),
                                                np.zeros(hidden),
                                                0.1 * rng.standard_normal((2, hidden)),
                                                np.zeros(2))]


def sample_batch(rng: np.random.Generator, ys: np.ndarray, batch_size: int, batch_time: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Starting states (batch_size, 2) and the true pieces (batch_time, batch_size, 2)."""
    s = rng.choice(len(ys) - batch_time, batch_size, replace=False)
    return ys[s].astype(np.float32), np.stack([ys[s + i] for i in range(batch_time)]
                                              ).astype(np.float32)


def _train_torch(t: np.ndarray, ys: np.ndarray, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    def field(t_, y, W1, b1, W2, b2):
        return torch.tanh((y ** 3) @ W1.T + b1) @ W2.T + b2

    params = [torch.tensor(p, requires_grad=True) for p in init_params(a.hidden, a.seed)]
    opt = torch.optim.Adam(params, lr=a.lr)
    ts_piece = torch.tensor(t[:a.batch_time], dtype=torch.float32)
    rng = np.random.default_rng(a.seed)
    losses = []
    t0 = time.perf_counter()
    for it in range(a.iters):
        y0, truth = (torch.from_numpy(x) for x in sample_batch(rng, ys, a.batch_size,
                                                                a.batch_time))
        pred = ode.odeint(field, y0, ts_piece, *params, method="dopri5", rtol=RTOL, atol=ATOL,
                          grad="direct")
        loss = (pred - truth).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        _report(it, a, losses)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        full = ode.odeint(field, torch.tensor(Y0_TRUE, dtype=torch.float32),
                          torch.tensor(t, dtype=torch.float32), *params, method="dopri5",
                          rtol=RTOL, atol=ATOL, max_steps=100_000).numpy()
    return dict(losses=losses, seconds=seconds, full=full)


def _train_jax(t: np.ndarray, ys: np.ndarray, a: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    def field(t_, y, W1, b1, W2, b2):
        return jnp.tanh((y ** 3) @ W1.T + b1) @ W2.T + b2

    ts_piece = jnp.asarray(t[:a.batch_time], dtype=jnp.float32)

    def loss_fn(params, y0, truth):
        pred = ode.odeint(field, y0, ts_piece, *params, method="dopri5", rtol=RTOL, atol=ATOL,
                          max_steps=a.max_steps, grad="direct")
        return jnp.mean(jnp.abs(pred - truth))

    b1_, b2_, eps = 0.9, 0.999, 1e-8

    @jax.jit
    def train_step(params, m, v, k, y0, truth):
        # Adam (Kingma & Ba), written out: the same update as torch.optim.Adam
        loss, g = jax.value_and_grad(loss_fn)(params, y0, truth)
        m = [b1_ * mi + (1 - b1_) * gi for mi, gi in zip(m, g)]
        v = [b2_ * vi + (1 - b2_) * gi * gi for vi, gi in zip(v, g)]
        c1, c2 = 1 - b1_ ** k, 1 - b2_ ** k
        params = [p - a.lr * (mi / c1) / (jnp.sqrt(vi / c2) + eps)
                  for p, mi, vi in zip(params, m, v)]
        return params, m, v, loss

    params = [jnp.asarray(p) for p in init_params(a.hidden, a.seed)]
    m = [jnp.zeros_like(p) for p in params]
    v = [jnp.zeros_like(p) for p in params]
    rng = np.random.default_rng(a.seed)
    losses = []
    t0 = time.perf_counter()
    for it in range(a.iters):
        y0, truth = sample_batch(rng, ys, a.batch_size, a.batch_time)
        params, m, v, loss = train_step(params, m, v, jnp.float32(it + 1), jnp.asarray(y0),
                                        jnp.asarray(truth))
        losses.append(float(loss))
        _report(it, a, losses)
    seconds = time.perf_counter() - t0
    full = np.asarray(ode.odeint(field, jnp.asarray(Y0_TRUE, dtype=jnp.float32),
                                 jnp.asarray(t, dtype=jnp.float32), *params, method="dopri5",
                                 rtol=RTOL, atol=ATOL, max_steps=100_000))
    return dict(losses=losses, seconds=seconds, full=full)


def _report(it: int, a: argparse.Namespace, losses: list[float]) -> None:
    every = max(1, a.iters // 10)
    if not a.silent and (it % every == 0 or it == a.iters - 1):
        print(f"iter {it:5d}  loss {losses[-1]:.4f}  (mean of the last {min(every, len(losses))}:"
              f" {np.mean(losses[-every:]):.4f})", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the Neural ODE; returns the losses, the training time in seconds, the fit error of
    the whole trajectory before and after training, and the predicted trajectory."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--framework", choices=("torch", "jax"), default="torch")
    ap.add_argument("--quick", action="store_true",
                    help="a short run (60 iterations, 250 observations on [0, 6.25])")
    ap.add_argument("--iters", type=int, default=None, help="Adam steps (default 600; quick 60)")
    ap.add_argument("--data-size", type=int, default=None, help="observations (default 1000)")
    ap.add_argument("--t-max", type=float, default=None, help="last observation (default 25)")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--batch-time", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--max-steps", type=int, default=64,
                    help="odeint's max_steps per piece under JAX (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--silent", action="store_true", help="print nothing")
    a = ap.parse_args(argv)
    a.iters = a.iters or (60 if a.quick else 600)
    a.data_size = a.data_size or (250 if a.quick else 1000)
    a.t_max = a.t_max or (6.25 if a.quick else 25.0)
    t, ys = make_data(a.data_size, a.t_max)
    if not a.silent:
        print(f"Neural ODE on the spiral, {a.framework}: {a.data_size} observations on [0, "
              f"{a.t_max:g}], {a.iters} Adam steps (lr {a.lr:g}) on {a.batch_size} pieces of "
              f"{a.batch_time} observations, dopri5 at rtol {RTOL:g}, atol {ATOL:g}, float32.")
    train = _train_jax if a.framework == "jax" else _train_torch
    zero = init_params(a.hidden, a.seed)
    # the untrained model's trajectory: the fit error to beat
    before = ode.odeint(lambda t_, y, W1, b1, W2, b2: np.tanh((y ** 3) @ W1.T + b1) @ W2.T + b2,
                        Y0_TRUE, t, *(z.astype(np.float64) for z in zero), method="dopri5",
                        rtol=RTOL, atol=ATOL, max_steps=100_000)
    out = train(t, ys, a)
    out["fit_error_before"] = float(np.mean(np.abs(np.asarray(before) - ys)))
    out["fit_error"] = float(np.mean(np.abs(out["full"] - ys)))
    if not a.silent:
        first, last = np.mean(out["losses"][:5]), np.mean(out["losses"][-5:])
        print(f"training: {out['seconds']:.1f} s ({1e3 * out['seconds'] / a.iters:.0f} ms per "
              f"step, first step included); loss {first:.4f} -> {last:.4f} (means of the first "
              f"and last 5 steps)")
        print(f"fit error of the whole trajectory (mean |y - y_true| over {a.data_size} "
              f"observations): {out['fit_error_before']:.4f} untrained -> "
              f"{out['fit_error']:.4f} trained")
    return out


if __name__ == "__main__":
    main()
