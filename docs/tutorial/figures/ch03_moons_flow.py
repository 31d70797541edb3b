"""Tutorial chapter 3: a neural ODE classifier on two moons, and the flow it learned.

    python docs/tutorial/figures/ch03_moons_flow.py OUT_DIR     # writes ch03_moons_flow.png

The model and training of the chapter's full configuration (PyTorch, float64): 300 points of
`sklearn.datasets.make_moons(noise=0.1, random_state=0)`, standardized, 200 for training and
100 held out; the field f(t, y) = W2 tanh(W1 [y, t] + b1) (16 hidden units) integrated from
t = 0 to 1 by `odeint` (tsit5, rtol = atol = 1e-4, grad="direct"); a logistic regression on
y(1); 150 full-batch Adam steps with step 0.05.

Drawn: the decision regions in the input plane (a grid of points flowed to t = 1 and
classified), the trajectories of the held-out points, and where they end with the logistic
regression's line. The accuracy and the evaluations of f in the titles are measured here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

STEPS, HIDDEN = 150, 16


def main(out_dir: str) -> dict[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.datasets import make_moons

    from implicitdiff import ode

    torch.set_num_threads(1)
    X, labels = make_moons(300, noise=0.1, random_state=0)
    X = (X - X.mean(0)) / X.std(0)
    X_train, y_train = torch.tensor(X[:200]), torch.tensor(labels[:200], dtype=torch.float64)
    X_test, y_test = torch.tensor(X[200:]), torch.tensor(labels[200:], dtype=torch.float64)

    init = np.random.default_rng(1)
    W1 = torch.tensor(init.normal(size=(HIDDEN, 3)) / np.sqrt(3), requires_grad=True)
    b1 = torch.zeros(HIDDEN, dtype=torch.float64, requires_grad=True)
    W2 = torch.tensor(init.normal(size=(2, HIDDEN)) / np.sqrt(HIDDEN), requires_grad=True)
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def field(t, y, W1, b1, W2):
        return torch.tanh(torch.cat([y, t], dim=-1) @ W1.T + b1) @ W2.T

    def flow(x, ts=(0.0, 1.0)):
        return ode.odeint(field, x, torch.tensor(ts, dtype=torch.float64), W1, b1, W2,
                          rtol=1e-4, atol=1e-4, full_output=True)

    optimizer = torch.optim.Adam([W1, b1, W2, w, b], lr=0.05)
    nfe = []
    t0 = time.perf_counter()
    for _ in range(STEPS):
        sol = flow(X_train)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(sol.ys[-1] @ w + b, y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        nfe.append(float(sol.stats.nfe.double().mean()))
    seconds = time.perf_counter() - t0

    with torch.no_grad():
        times = tuple(np.linspace(0.0, 1.0, 21))
        path = flow(X_test, times).ys.numpy()                      # (21, 100, 2)
        z_test = torch.tensor(path[-1])
        accuracy = float(((z_test @ w + b > 0) == (y_test == 1)).double().mean())
        lo, hi = X.min(0) - 0.5, X.max(0) + 0.5
        g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], 120), np.linspace(lo[1], hi[1], 120))
        grid = torch.tensor(np.stack([g0.ravel(), g1.ravel()], 1))
        p_grid = torch.sigmoid(flow(grid).ys[-1] @ w + b).numpy().reshape(g0.shape)
        w_np, b_np = w.numpy(), float(b)

    colors = np.where(labels[200:] == 1, "tab:orange", "tab:blue")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    ax = axes[0]
    ax.contourf(g0, g1, p_grid, levels=[0, 0.5, 1], colors=["#cfe0f3", "#fde0c5"])
    ax.contour(g0, g1, p_grid, levels=[0.5], colors="k", linewidths=1)
    ax.scatter(X[:200, 0], X[:200, 1], c=np.where(labels[:200] == 1, "tab:orange", "tab:blue"),
               s=8)
    ax.set_title(f"decision regions and training points\n(held-out accuracy {accuracy:.2f})",
                 fontsize=10)
    ax = axes[1]
    for i in range(path.shape[1]):
        ax.plot(path[:, i, 0], path[:, i, 1], color=colors[i], lw=0.7, alpha=0.6)
    ax.scatter(path[0, :, 0], path[0, :, 1], c=colors, s=8, marker="o")
    ax.scatter(path[-1, :, 0], path[-1, :, 1], c=colors, s=14, marker="x")
    ax.set_title("held-out points flowing from t = 0 (o) to t = 1 (x)", fontsize=10)
    ax = axes[2]
    ax.scatter(path[-1, :, 0], path[-1, :, 1], c=colors, s=10)
    # the line w·z + b = 0, drawn across the end points' box
    center = -b_np * w_np / (w_np @ w_np)
    along = np.array([-w_np[1], w_np[0]]) / np.linalg.norm(w_np)
    half = 0.5 * np.linalg.norm(np.ptp(path[-1], axis=0))
    ends = center + np.outer([-half, half], along)
    ax.plot(ends[:, 0], ends[:, 1], "k-", lw=1)
    ax.set_title("y(1) and the logistic regression's line", fontsize=10)
    for ax in axes:
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle(f"{STEPS} Adam steps in {seconds:.1f} s (PyTorch); evaluations of f per point "
                 f"{nfe[0]:.0f} at the start, {nfe[-1]:.0f} at the end", fontsize=10)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "ch03_moons_flow.png", dpi=110)
    plt.close(fig)
    print(f"accuracy {accuracy:.3f}, loss {loss.item():.2e}, nfe {nfe[0]:.0f} -> {nfe[-1]:.0f}, "
          f"{seconds:.1f} s")
    return {"accuracy": accuracy, "seconds": seconds}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
