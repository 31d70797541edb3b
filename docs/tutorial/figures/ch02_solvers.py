"""Tutorial chapter 2: residual against iteration for the forward solvers, JAX and PyTorch.

    python docs/tutorial/figures/ch02_solvers.py OUT_DIR     # writes ch02_solvers.png

The layer of the chapter, f(z, x) = tanh(W z + U x + b) (hidden 64, input 16, batch 32,
float64; W symmetric with eigenvalues spread over [-0.9, 0.9]). `fixed_point_iteration`,
`anderson` (m = 5) and `broyden` of `implicitdiff.solvers` run from z = 0 to a relative
residual of 1e-10 in each framework; the figure plots the `trace` (the residual
||f(z_k) - z_k|| after each iteration) of the slowest sample of the batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from _ch02_data import BATCH, HIDDEN, problem

# One XLA thread, as PyTorch gets one below: these problems are too small to gain from more,
# and on a shared CPU spinning threads only slow everyone down (a build may set its own flags).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")

OPTIONS = {"tol": 1e-10, "maxiter": 300}
NAMES = ("fixed-point iteration", "Anderson (m=5)", "Broyden")


def traces_jax(W, U, b, x) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    from implicitdiff import solvers

    jax.config.update("jax_enable_x64", True)
    W, U, b, x = (jnp.asarray(a) for a in (W, U, b, x))

    def f(z, x):
        return jnp.tanh(z @ W.T + x @ U.T + b)

    @jax.jit
    def run(x):
        z0 = jnp.zeros((BATCH, HIDDEN))
        return {"fixed-point iteration": solvers.fixed_point_iteration(f, z0, x, **OPTIONS),
                "Anderson (m=5)": solvers.anderson(f, z0, x, m=5, **OPTIONS),
                "Broyden": solvers.broyden(f, z0, x, **OPTIONS)}

    return {name: _slowest(np.asarray(r.steps), np.asarray(r.trace))
            for name, r in run(x).items()}


def traces_torch(W, U, b, x) -> dict[str, np.ndarray]:
    import torch

    from implicitdiff import solvers

    torch.set_num_threads(1)
    W, U, b, x = (torch.tensor(a) for a in (W, U, b, x))

    def f(z, x):
        return torch.tanh(z @ W.T + x @ U.T + b)

    z0 = torch.zeros(BATCH, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        runs = {"fixed-point iteration": solvers.fixed_point_iteration(f, z0, x, **OPTIONS),
                "Anderson (m=5)": solvers.anderson(f, z0, x, m=5, **OPTIONS),
                "Broyden": solvers.broyden(f, z0, x, **OPTIONS)}
    return {name: _slowest(r.steps.numpy(), r.trace.numpy()) for name, r in runs.items()}


def _slowest(steps: np.ndarray, trace: np.ndarray) -> np.ndarray:
    row = trace[int(np.argmax(steps))]
    return row[np.isfinite(row)]


def main(out_dir: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = problem()
    results = {"JAX": traces_jax(*data), "PyTorch": traces_torch(*data)}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, name in enumerate(NAMES):
        tj, tt = results["JAX"][name], results["PyTorch"][name]
        ax.semilogy(np.arange(1, len(tj) + 1), tj, color=f"C{i}", lw=2,
                    label=f"{name}: {len(tj)} iterations (JAX)")
        ax.semilogy(np.arange(1, len(tt) + 1), tt, color=f"C{i}", ls="none", marker="x",
                    markersize=4, label=f"{name}: {len(tt)} iterations (PyTorch)")
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"residual $\|f(z_k, x) - z_k\|_2$ (slowest sample)")
    ax.set_title("tanh layer, hidden 64, W symmetric with eigenvalues in [-0.9, 0.9]",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_dir) / "ch02_solvers.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    for fw, res in results.items():
        print(fw, {name: len(res[name]) for name in NAMES})
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
