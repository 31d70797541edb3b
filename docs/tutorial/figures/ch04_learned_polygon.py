"""Tutorial chapter 4: a polygon learned from projections onto it, through `idf.qp.solve_qp`.

    python docs/tutorial/figures/ch04_learned_polygon.py OUT_DIR   # writes ch04_learned_polygon.png

The chapter's full configuration (PyTorch, float64): the true polygon {x : G x <= h} has four
sides (normals at angles 0.3, 1.9, 3.4, 4.6 rad, offsets 1.0, 0.6, 0.9, 0.7); the model is the
projection layer argmin ½‖x − v‖² s.t. G x <= h with six learned half-planes started as a regular
hexagon; each of 150 Adam steps (step 0.05) draws 64 points uniformly in [-2, 2]² and fits the
true projections (mean squared distance).

Drawn: the true polygon, the starting hexagon, the learned polygon with each learned half-plane's
boundary line (dashed where the side is never active on a fresh sample of 2,000 points), a few
points with their learned projections; and the loss per step. Every number is measured here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

STEPS, BATCH, SIDES = 150, 64, 6
ANGLES = np.array([0.3, 1.9, 3.4, 4.6])
H_TRUE = np.array([1.0, 0.6, 0.9, 0.7])


def polygon(G: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The vertices, in order, of the bounded polygon {x : G x <= h} (pairwise intersections of
    the boundary lines that satisfy every inequality)."""
    points = []
    for i in range(len(G)):
        for j in range(i + 1, len(G)):
            M = np.stack([G[i], G[j]])
            if abs(np.linalg.det(M)) < 1e-12:
                continue
            p = np.linalg.solve(M, [h[i], h[j]])
            if np.all(G @ p <= h + 1e-9):
                points.append(p)
    P = np.array(points)
    c = P.mean(0)
    return P[np.argsort(np.arctan2(P[:, 1] - c[1], P[:, 0] - c[0]))]


def main(out_dir: str) -> dict[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import implicitdiff as idf

    torch.set_num_threads(1)
    G_true = np.stack([np.cos(ANGLES), np.sin(ANGLES)], 1)
    start = np.linspace(0, 2 * np.pi, SIDES, endpoint=False)
    G0, h0 = np.stack([np.cos(start), np.sin(start)], 1), np.ones(SIDES)
    G = torch.tensor(G0, requires_grad=True)
    h = torch.tensor(h0, requires_grad=True)
    eye = torch.eye(2, dtype=torch.float64)
    optimizer = torch.optim.Adam([G, h], lr=0.05)
    rng = np.random.default_rng(0)
    losses = []
    t0 = time.perf_counter()
    for _ in range(STEPS):
        V = rng.uniform(-2, 2, size=(BATCH, 2))
        target = idf.qp.solve_qp(np.eye(2), -V, G=G_true, h=H_TRUE)
        x = idf.qp.solve_qp(eye, -torch.tensor(V), G=G, h=h)
        loss = (x - torch.tensor(target)).square().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0

    G_fit, h_fit = G.detach().numpy(), h.detach().numpy()
    V = np.random.default_rng(1).uniform(-2, 2, size=(2000, 2))
    sol = idf.qp.solve_qp(np.eye(2), -V, G=G_fit, h=h_fit, full_output=True)
    ever_active = sol.stats.active.any(0)

    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.8),
                                      gridspec_kw={"width_ratios": [1.15, 1]})
    for P, style, label in ((polygon(G_true, H_TRUE), dict(color="k", lw=2.5), "true polygon"),
                            (polygon(G0, h0), dict(color="0.6", lw=1, ls=":"), "start"),
                            (polygon(G_fit, h_fit), dict(color="tab:red", lw=1.5),
                             "learned")):
        closed = np.vstack([P, P[:1]])
        ax.plot(closed[:, 0], closed[:, 1], label=label, **style)
    s = np.linspace(-4, 4, 2)
    for g, c, active in zip(G_fit, h_fit, ever_active):
        n = g / np.linalg.norm(g)
        p0 = n * c / np.linalg.norm(g)
        line = p0 + np.outer(s, [-n[1], n[0]])
        ax.plot(line[:, 0], line[:, 1], color="tab:red", lw=0.7, alpha=0.6,
                ls="-" if active else "--")
    show = V[:25]
    proj = sol.x[:25]
    for a, b in zip(show, proj):
        ax.annotate("", b, a, arrowprops=dict(arrowstyle="->", color="tab:blue", lw=0.6))
    ax.scatter(show[:, 0], show[:, 1], s=6, color="tab:blue")
    ax.set_xlim(-2.2, 2.2)
    ax.set_ylim(-2.2, 2.2)
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"{int(ever_active.sum())} of {SIDES} learned sides ever active "
                 f"(dashed: never)", fontsize=10)
    ax_loss.semilogy(np.arange(1, STEPS + 1), losses)
    ax_loss.set_xlabel("Adam step")
    ax_loss.set_ylabel("mean squared distance to the true projection")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.set_title(f"loss {losses[0]:.1e} -> {losses[-1]:.1e} in {seconds:.1f} s (PyTorch)",
                      fontsize=10)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "ch04_learned_polygon.png", dpi=110)
    plt.close(fig)
    print(f"loss {losses[0]:.2e} -> {losses[-1]:.2e}, {int(ever_active.sum())} sides active, "
          f"{seconds:.1f} s")
    return {"loss": losses[-1], "active": float(ever_active.sum())}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
