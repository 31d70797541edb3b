"""Tutorial chapter 2: the error of the approximate DEQ backward modes against their length.

    python docs/tutorial/figures/ch02_backward_modes.py OUT_DIR   # writes ch02_backward_modes.png

The layer of the chapter, f(z, x) = tanh(W z + U x + b) (hidden 64, input 16, batch 32,
float64; W symmetric with eigenvalues spread over [-0.9, 0.9]), and the same W scaled to
||W||_2 = 0.5. For each, the gradient of sum(z*^2) with respect to the cell's parameters from an
`implicitdiff_torch.DEQ` (Anderson to a relative residual of 1e-12) in the backward modes
`Neumann(k)`, `Phantom(k)` (damping 1), `Phantom(k, damping=0.5)` and `JFB()`, and its relative
2-norm error against the exact mode `IFT()`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from _ch02_data import HIDDEN, problem

KS = tuple(range(1, 21))


def errors(rho: float) -> dict[str, list[float]]:
    import torch
    from torch import nn

    from implicitdiff_torch import DEQ, IFT, JFB, Neumann, Phantom

    W, U, b, x = problem()
    W = W * (rho / np.linalg.norm(W, 2))

    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.tensor(W))
            self.U = nn.Parameter(torch.tensor(U))
            self.b = nn.Parameter(torch.tensor(b))

        def forward(self, z, x):
            return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)

    cell, inputs = Cell(), torch.tensor(x)

    def grad(backward) -> torch.Tensor:
        layer = DEQ(cell, z_shape=(HIDDEN,), backward=backward,
                    solver_options={"tol": 1e-12, "maxiter": 300})
        cell.zero_grad()
        layer(inputs).square().sum().backward()
        return torch.cat([p.grad.ravel() for p in cell.parameters()])

    exact = grad(IFT())

    def err(mode) -> float:
        return float((grad(mode) - exact).norm() / exact.norm())

    return {"Neumann(k)": [err(Neumann(k)) for k in KS],
            "Phantom(k)": [err(Phantom(k)) for k in KS],
            "Phantom(k, damping=0.5)": [err(Phantom(k, damping=0.5)) for k in KS],
            "JFB": [err(JFB())]}


def main(out_dir: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    torch.set_num_threads(1)  # small matrices: threads only add contention on a shared CPU
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for rho, color in ((0.9, "C0"), (0.5, "C1")):
        res = errors(rho)
        ax.semilogy(KS, res["Neumann(k)"], color=color, lw=2, label=f"Neumann(k), ρ = {rho}")
        ax.semilogy(KS, res["Phantom(k)"], color=color, ls="none", marker="x",
                    label=f"Phantom(k), ρ = {rho}")
        ax.semilogy(KS, res["Phantom(k, damping=0.5)"], color=color, ls=":",
                    label=f"Phantom(k, damping=0.5), ρ = {rho}")
        ax.semilogy([1], res["JFB"], color=color, marker="o", ls="none", markersize=8,
                    mfc="none", label=f"JFB, ρ = {rho}")
        ax.semilogy(KS, [rho**k for k in KS], color=color, lw=0.8, alpha=0.5, ls="--",
                    label=f"ρ^k, ρ = {rho}")
        print(rho, {name: [f"{e:.1e}" for e in errs[:10]] for name, errs in res.items()})
    ax.set_xlabel("k (Neumann terms, phantom steps)")
    ax.set_ylabel("relative error of the gradient vs IFT")
    ax.set_title(r"tanh layer, hidden 64, $\rho = \|W\|_2$", fontsize=9)
    ax.set_xticks(KS[::2])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(out_dir) / "ch02_backward_modes.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
