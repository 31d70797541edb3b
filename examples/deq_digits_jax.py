"""A deep equilibrium classifier on scikit-learn's digits (8×8 images), in JAX, on CPU.

    python examples/deq_digits_jax.py            # train (about a minute on 2 CPU cores)
    python examples/deq_digits_jax.py --quick    # a few steps, for a smoke test

The JAX twin of `examples/deq_digits.py`: an encoder u = Ux + b, an equilibrium layer
z* = tanh(0.9 W z* / ‖W‖₂ + u) (`implicitdiff_jax.deq`: Anderson forward, exact implicit
backward with BiCGStab) and a linear head, trained with a small hand-written Adam (plain JAX, no
optax). ‖W‖₂ is computed exactly (`jnp.linalg.norm(W, 2)`), so f is a contraction for every
parameter value and one fixed map during each solve. The whole training step is one `jax.jit`.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from implicitdiff_jax import deq

GAMMA = 0.9


def init_params(key: Any, hidden: int = 96, d_in: int = 64, n_cls: int = 10) -> dict:
    """PyTorch's `nn.Linear` initialization: U(-1/√fan_in, 1/√fan_in)."""
    ks = jax.random.split(key, 6)

    def unif(k: Any, shape: tuple[int, ...], fan_in: int) -> Any:
        b = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(k, shape, jnp.float32, -b, b)

    return {"enc_W": unif(ks[0], (hidden, d_in), d_in), "enc_b": unif(ks[1], (hidden,), d_in),
            "W": unif(ks[2], (hidden, hidden), hidden),
            "head_W": unif(ks[3], (n_cls, hidden), hidden),
            "head_b": unif(ks[4], (n_cls,), hidden)}


def cell(W: Any, z: Any, u: Any) -> Any:
    """f(z, u) = tanh(γ W z / ‖W‖₂ + u), row by row."""
    return jnp.tanh(GAMMA * z @ (W / jnp.linalg.norm(W, 2)).T + u)


def forward(params: dict, x: Any, solver_options: dict) -> tuple[Any, Any]:
    u = x @ params["enc_W"].T + params["enc_b"]
    z, stats = deq(Partial(cell, params["W"]), u, solver="anderson",
                   solver_options=solver_options, backward="ift")
    return z @ params["head_W"].T + params["head_b"], stats


def loss_fn(params: dict, x: Any, y: Any, solver_options: dict) -> tuple[Any, Any]:
    logits, stats = forward(params, x, solver_options)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), stats


# ---- a tiny Adam ---------------------------------------------------------------------------

def adam_init(params: dict) -> dict:
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return {"m": zeros, "v": zeros, "t": jnp.zeros((), jnp.int32)}


def adam_update(params: dict, grads: dict, state: dict, lr: Any, b1: float = 0.9,
                b2: float = 0.999, eps: float = 1e-8) -> tuple[dict, dict]:
    t = state["t"] + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    # cast back: with jax_enable_x64 on, the bias corrections are float64 and would promote
    # float32 parameters (and so the whole DEQ) to float64
    new = jax.tree_util.tree_map(
        lambda p, m, v: (p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps)).astype(p.dtype),
        params, m, v)
    return new, {"m": m, "v": v, "t": t}


# ---- data and training ---------------------------------------------------------------------

def load_digits(seed: int = 0) -> tuple[np.ndarray, ...]:
    """The split and standardization of `examples/deq_digits.py`."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    X, y = _load(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=seed,
                                          stratify=y)
    mean, std = Xtr.mean(0), Xtr.std(0) + 0.1
    f = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return f(Xtr), ytr.astype(np.int32), f(Xte), yte.astype(np.int32)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    args = ap.parse_args(argv)
    Xtr, ytr, Xte, yte = load_digits()
    hidden = 16 if args.quick else args.hidden
    epochs, max_steps = (1, 3) if args.quick else (args.epochs, None)
    opts = {"m": 5, "tol": 1e-4, "maxiter": 40}
    print(f"digits: {Xtr.shape[0]} train / {Xte.shape[0]} test, hidden {hidden}, "
          f"jax {jax.__version__} ({jax.default_backend()})")

    params = init_params(jax.random.PRNGKey(0), hidden)
    state = adam_init(params)
    n_batches = math.ceil(Xtr.shape[0] / args.batch)

    @jax.jit
    def step(params: dict, state: dict, x: Any, y: Any, lr: Any) -> tuple:
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, opts)
        params, state = adam_update(params, g, state, lr)
        return params, state, loss, stats.steps

    @jax.jit
    def predict(params: dict, x: Any) -> Any:
        return jnp.argmax(forward(params, x, opts)[0], axis=1)

    def accuracy(params: dict) -> float:
        return float(np.mean(np.asarray(predict(params, Xte)) == yte))

    rng = np.random.default_rng(0)
    t0, n_steps = time.perf_counter(), 0
    for epoch in range(epochs):
        lr = 0.5 * args.lr * (1 + math.cos(math.pi * epoch / epochs))  # cosine, per epoch
        perm = rng.permutation(Xtr.shape[0])
        total, solver_steps = 0.0, []
        for i in range(n_batches):
            # the last, partial batch is dropped: one shape, one compilation
            idx = perm[i * args.batch:(i + 1) * args.batch]
            if idx.size < args.batch:
                continue
            params, state, loss, steps = step(params, state, Xtr[idx], ytr[idx], lr)
            total += float(loss) * idx.size
            solver_steps.append(np.asarray(steps))
            n_steps += 1
            if max_steps is not None and n_steps >= max_steps:
                break
        s = np.concatenate(solver_steps)
        print(f"[DEQ jax] epoch {epoch + 1:2d}  loss {total / (len(solver_steps) * args.batch):.4f}"
              f"  test acc {accuracy(params):.4f}  solver steps {s.mean():.1f} (max {s.max()})",
              flush=True)
    acc, secs = accuracy(params), time.perf_counter() - t0
    print(f"\nDEQ (JAX) test accuracy {acc:.4f} ({secs:.1f} s, {n_steps} steps)")
    return {"test_acc": acc, "seconds": secs, "steps": n_steps}


if __name__ == "__main__":
    main()
