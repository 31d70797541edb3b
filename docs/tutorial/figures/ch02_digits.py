"""Tutorial chapter 2: the DEQ digits classifier, trained in JAX and in PyTorch.

    python docs/tutorial/figures/ch02_digits.py OUT_DIR     # writes ch02_digits.png

The models and the training of the chapter's last section, run in full (6 epochs): scikit-learn's
digits split 75/25 (stratified, seed 0) and standardized; a linear encoder, one equilibrium layer
z* = tanh(0.9 W z* / ||W||_F + u) of width 64 (Anderson, m = 5, relative tolerance 1e-4, at
most 40 iterations; exact implicit backward) and a linear head; Adam (learning rate 5e-3),
batches of 64, float32. The test accuracy after each epoch is measured and plotted, with the
final values in the legend.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np

# One XLA thread, as PyTorch gets one below: these problems are too small to gain from more,
# and on a shared CPU spinning threads only slow everyone down (a build may set its own flags).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")

EPOCHS, HIDDEN = 6, 64


def data() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = X_train.mean(0), X_train.std(0) + 0.1
    return (X_train - mean) / std, (X_test - mean) / std, y_train, y_test


def train_jax(X_train, X_test, y_train, y_test) -> list[float]:
    import jax
    import jax.numpy as jnp
    from jax.tree_util import Partial

    from implicitdiff_jax import deq

    def init(key, hidden=HIDDEN):
        ks = jax.random.split(key, 5)

        def unif(k, shape, fan_in):
            return jax.random.uniform(k, shape, jnp.float32, -1, 1) / math.sqrt(fan_in)

        return {"enc_W": unif(ks[0], (hidden, 64), 64), "enc_b": unif(ks[1], (hidden,), 64),
                "W": unif(ks[2], (hidden, hidden), hidden),
                "head_W": unif(ks[3], (10, hidden), hidden),
                "head_b": unif(ks[4], (10,), hidden)}

    def digit_cell(W, z, u):
        return jnp.tanh(z @ W.T + u)

    def logits_and_stats(p, images):
        u = images @ p["enc_W"].T + p["enc_b"]
        W = 0.9 * p["W"] / jnp.linalg.norm(p["W"])
        z, stats = deq(Partial(digit_cell, W), u, solver="anderson",
                       solver_options={"m": 5, "tol": 1e-4, "maxiter": 40})
        return z @ p["head_W"].T + p["head_b"], stats

    def cross_entropy(p, images, labels):
        logits, stats = logits_and_stats(p, images)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1)), stats

    @jax.jit
    def train_step(p, adam, images, labels, lr=5e-3, b1=0.9, b2=0.999):
        (value, stats), g = jax.value_and_grad(cross_entropy, has_aux=True)(p, images, labels)
        t = adam["t"] + 1
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, adam["m"], g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, adam["v"], g)
        p = jax.tree_util.tree_map(
            lambda p, m, v: (p - lr * m / (1 - b1**t) / (jnp.sqrt(v / (1 - b2**t)) + 1e-8)
                             ).astype(p.dtype), p, m, v)
        return p, {"m": m, "v": v, "t": t}, value, stats.steps

    @jax.jit
    def predict(p, images):
        return jnp.argmax(logits_and_stats(p, images)[0], axis=1)

    p = init(jax.random.PRNGKey(0))
    adam = {"m": jax.tree_util.tree_map(jnp.zeros_like, p),
            "v": jax.tree_util.tree_map(jnp.zeros_like, p), "t": jnp.zeros((), jnp.int32)}
    Xtr, ytr = X_train.astype(np.float32), y_train.astype(np.int32)
    Xte = X_test.astype(np.float32)
    order = np.random.default_rng(0)
    accuracies = []
    for _ in range(EPOCHS):
        perm = order.permutation(len(Xtr))
        for i in range(0, len(Xtr) - 63, 64):
            idx = perm[i:i + 64]
            p, adam, _, _ = train_step(p, adam, Xtr[idx], ytr[idx])
        accuracies.append(float(np.mean(np.asarray(predict(p, Xte)) == y_test)))
    return accuracies


def train_torch(X_train, X_test, y_train, y_test) -> list[float]:
    import torch
    from torch import nn

    from implicitdiff_torch import DEQ

    torch.set_num_threads(1)  # small matrices: threads only add contention on a shared CPU

    class DigitCell(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.W = nn.Linear(hidden, hidden, bias=False)

        def forward(self, z, u):
            W = self.W.weight
            return torch.tanh(0.9 * z @ (W / W.norm()).T + u)

    class DEQClassifier(nn.Module):
        def __init__(self, hidden=HIDDEN):
            super().__init__()
            self.enc = nn.Linear(64, hidden)
            self.deq = DEQ(DigitCell(hidden), z_shape=(hidden,), solver="anderson",
                           solver_options={"m": 5, "tol": 1e-4, "maxiter": 40})
            self.head = nn.Linear(hidden, 10)

        def forward(self, images):
            return self.head(self.deq(self.enc(images)))

    torch.manual_seed(0)
    model = DEQClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    Xtr, ytr = torch.tensor(X_train, dtype=torch.float32), torch.tensor(y_train)
    Xte, yte = torch.tensor(X_test, dtype=torch.float32), torch.tensor(y_test)
    shuffle = torch.Generator().manual_seed(0)
    accuracies = []
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(Xtr), generator=shuffle)
        for i in range(0, len(Xtr), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracies.append(float((model(Xte).argmax(1) == yte).float().mean()))
    return accuracies


def main(out_dir: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = data()
    results, seconds = {}, {}
    for name, train in (("JAX", train_jax), ("PyTorch", train_torch)):
        t0 = time.perf_counter()
        results[name] = train(*d)
        seconds[name] = time.perf_counter() - t0
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    epochs = np.arange(1, EPOCHS + 1)
    for (name, acc), marker in zip(results.items(), ("o", "s")):
        ax.plot(epochs, 100 * np.asarray(acc), marker=marker,
                label=f"{name}: {100 * acc[-1]:.1f}% after {EPOCHS} epochs "
                      f"({seconds[name]:.0f} s to train)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"DEQ on scikit-learn's digits ({len(d[0])} train / {len(d[1])} test), "
                 f"width {HIDDEN}", fontsize=9)
    ax.set_xticks(epochs)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(out_dir) / "ch02_digits.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    for name, acc in results.items():
        print(name, [f"{a:.3f}" for a in acc], f"{seconds[name]:.1f} s")
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
