"""Chapter 5 figure: the iMAML meta-gradient against unrolled and first-order ones, in memory and
accuracy, as the number of inner steps grows.

    python docs/tutorial/figures/ch05_imaml_memory.py OUT_DIR   # writes ch05_imaml_memory.png

The model is that of ch05_imaml.py (imported from it). On one batch of 5 tasks at the initial
parameters, the same bilevel problem is differentiated three ways:

- implicit (iMAML): `idf.custom_root` on the stationarity of support MSE + λ/2‖φ − θ‖²;
- unrolled: k steps of gradient descent on that same inner objective, from φ = θ, differentiated
  through (this is MAML's way, applied to iMAML's inner problem, so both tend to one meta-gradient);
- first order: the query gradient at the k-th iterate, used as the meta-gradient.

Left: the temporary buffers of each compiled meta-gradient (XLA's `memory_analysis()`). Right:
the relative error of each against the implicit one. Every number is measured by this run.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ch05_imaml import (
    P,
    gd_step,
    imaml_loss,
    init_params,
    maml_loss_at,
    sample_tasks,
)

KS = (10, 30, 100, 300)
KS_FIRST_ORDER = (10, 300)


def unrolled_loss(theta, xs, ys, xq, yq, k):
    phi0 = jnp.broadcast_to(theta, (xs.shape[0], P))
    phi = jax.lax.fori_loop(0, k, lambda i, phi: gd_step(phi, theta, xs, ys), phi0)
    return maml_loss_at(phi, xq, yq)[0]


def first_order_grad(theta, xs, ys, xq, yq, k):
    phi0 = jnp.broadcast_to(theta, (xs.shape[0], P))
    phi = jax.lax.fori_loop(0, k, lambda i, phi: gd_step(phi, theta, xs, ys), phi0)
    phi = jax.lax.stop_gradient(phi)
    return jax.grad(lambda phi: maml_loss_at(phi, xq, yq)[0])(phi).sum(0)


def compiled(fn, *args):
    c = jax.jit(fn).lower(*args).compile()
    return c, c.memory_analysis().temp_size_in_bytes / 2**20


def main(out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    theta = init_params()
    batch = sample_tasks(np.random.default_rng(1), 5)

    c, mem_implicit = compiled(jax.grad(lambda th, *b: imaml_loss(th, *b)[0]), theta, *batch)
    g_implicit = c(theta, *batch)
    assert bool(jnp.all(jnp.isfinite(g_implicit)))

    def rel(g):
        return float(jnp.linalg.norm(g - g_implicit) / jnp.linalg.norm(g_implicit))

    mem_u, err_u, mem_f, err_f = [], [], [], []
    for k in KS:
        c, mib = compiled(jax.grad(lambda th, *b, k=k: unrolled_loss(th, *b, k)), theta, *batch)
        mem_u.append(mib)
        err_u.append(rel(c(theta, *batch)))
    for k in KS_FIRST_ORDER:
        c, mib = compiled(lambda th, *b, k=k: first_order_grad(th, *b, k), theta, *batch)
        mem_f.append(mib)
        err_f.append(rel(c(theta, *batch)))

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    ax[0].loglog(KS, mem_u, "o-", color="C1", label="unrolled (MAML-style) through k steps")
    ax[0].loglog(KS_FIRST_ORDER, mem_f, "s-", color="C2", label="first order")
    ax[0].axhline(mem_implicit, color="C0", label="implicit (iMAML): Anderson + MINRES")
    ax[0].set_xlabel("inner gradient steps k")
    ax[0].set_ylabel("temporary memory of the compiled meta-gradient (MiB)")
    ax[0].set_title("memory of one meta-gradient, 5 tasks, 1761 parameters")
    ax[0].legend(fontsize=8)
    ax[1].loglog(KS, err_u, "o-", color="C1", label="unrolled through k steps")
    ax[1].loglog(KS_FIRST_ORDER, err_f, "s-", color="C2", label="first order")
    ax[1].set_xlabel("inner gradient steps k")
    ax[1].set_ylabel("relative error against the implicit meta-gradient")
    ax[1].set_title("the same bilevel problem: λ = 10")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "ch05_imaml_memory.png", dpi=110)
    print(f"implicit: {mem_implicit:.2f} MiB")
    # what the chapter says of this run
    assert mem_u[-1] > 10 * mem_implicit and all(b > 2 * a for a, b in itertools.pairwise(mem_u))
    assert max(mem_f) < mem_implicit and min(err_f) > 0.5
    assert mem_u[0] > mem_implicit and 0.15 < (mem_u[1] - mem_u[0]) / (KS[1] - KS[0]) < 0.3
    assert 1e-2 < err_u[1] < 1e-1 and 5e-4 < err_u[2] < 5e-3 and err_u[3] < 1e-7
    assert 25 < mem_u[3] / mem_implicit < 35
    for k, mu, eu in zip(KS, mem_u, err_u):
        print(f"k={k:5d}  unrolled {mu:7.2f} MiB, error {eu:.1e}")
    for k, mf, ef in zip(KS_FIRST_ORDER, mem_f, err_f):
        print(f"k={k:5d}  first order {mf:5.2f} MiB, error {ef:.1e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
