"""Tutorial chapter 1: memory and time of one gradient against the number of solver iterations.

    python docs/tutorial/figures/ch01_memory_time.py OUT_DIR     # writes ch01_memory_time.png

The layer z* = tanh(W z* + x) (hidden 64, batch 32, float64, ||W||_2 = 0.9) and the loss
sum(sin z*); its gradient in W, with a forward pass of exactly K fixed-point iterations from
z = 0, computed two ways in each framework:

- unrolled: autodiff through the K iterations;
- implicit: `idf.custom_fixed_point` around the same K iterations (the iterations run without a
  tape; the backward pass is one BiCGStab solve per sample).

Memory, measured: in JAX the temporary buffers XLA allocates for the compiled gradient
(`memory_analysis().temp_size_in_bytes`); in PyTorch the peak of live tensor bytes during one
forward + backward pass (the `[memory]` events of `torch.profiler`). Time: the fastest of 5
calls of forward + backward (`time.perf_counter`), after a warm-up (and, in JAX, compilation);
PyTorch with one thread.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

# One XLA thread, as PyTorch gets one below: these problems are too small to gain from more,
# and on a shared CPU spinning threads only slow everyone down (a build may set its own flags).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")

KS = (25, 50, 100, 200, 400, 800)
N, BATCH, REPEATS = 64, 32, 5


def problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    W = rng.standard_normal((N, N))
    W *= 0.9 / np.linalg.norm(W, 2)
    return W, rng.standard_normal((BATCH, N))


def best_time(fn, repeats: int = REPEATS) -> float:
    """The fastest of `repeats` calls after a warm-up (on a shared machine the least
    disturbed one)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_jax(W_np: np.ndarray, x_np: np.ndarray) -> dict[str, list[tuple[float, float]]]:
    import jax
    import jax.numpy as jnp

    import implicitdiff as idf

    jax.config.update("jax_enable_x64", True)
    W, x = jnp.asarray(W_np), jnp.asarray(x_np)

    def T(z, W, x):
        return jnp.tanh(z @ W.T + x)

    def iterate(W, x, iterations):
        return jax.lax.fori_loop(0, iterations, lambda _, z: T(z, W, x), jnp.zeros_like(x))

    def loss(z):
        return jnp.sum(jnp.sin(z))

    implicit = idf.custom_fixed_point(T, solve=idf.BiCGStab(), batch_dims=1)(iterate)
    # K traced: one program for every K (the iterations are not differentiated)
    grad_implicit = jax.jit(jax.grad(lambda W, K: loss(implicit(W, x, iterations=K))))
    implicit_compiled = grad_implicit.lower(W, KS[0]).compile()
    implicit_bytes = implicit_compiled.memory_analysis().temp_size_in_bytes
    out: dict[str, list[tuple[float, float]]] = {"unrolled": [], "implicit": []}
    for K in KS:
        g_unrolled = jax.jit(jax.grad(lambda W, K=K: loss(iterate(W, x, K))))
        compiled = g_unrolled.lower(W).compile()
        t_u = best_time(lambda c=compiled: jax.block_until_ready(c(W)))
        t_i = best_time(lambda K=K: jax.block_until_ready(implicit_compiled(W, K)))
        out["unrolled"].append((compiled.memory_analysis().temp_size_in_bytes, t_u))
        out["implicit"].append((implicit_bytes, t_i))
    return out


def measure_torch(W_np: np.ndarray, x_np: np.ndarray) -> dict[str, list[tuple[float, float]]]:
    import torch
    import torch.profiler as tp

    import implicitdiff as idf

    torch.set_num_threads(1)  # small matrices: threads only add contention on a shared CPU
    weight, inputs = torch.tensor(W_np), torch.tensor(x_np)

    def f(z, weight, inputs):
        return torch.tanh(z @ weight.T + inputs)

    @idf.custom_fixed_point(f, solve=idf.BiCGStab(), batch_dims=1)
    def iterate_layer(weight, inputs, iterations=100):
        z = torch.zeros_like(inputs)
        for _ in range(iterations):
            z = f(z, weight, inputs)
        return z

    def unrolled(K):
        def step():
            w = weight.clone().requires_grad_()
            z = torch.zeros_like(inputs)
            for _ in range(K):
                z = f(z, w, inputs)
            torch.sin(z).sum().backward()
        return step

    def implicit(K):
        def step():
            w = weight.clone().requires_grad_()
            torch.sin(iterate_layer(w, inputs, iterations=K)).sum().backward()
        return step

    def peak_bytes(step) -> int:
        step()
        with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        return peak

    out: dict[str, list[tuple[float, float]]] = {"unrolled": [], "implicit": []}
    for K in KS:
        for name, make in (("unrolled", unrolled), ("implicit", implicit)):
            step = make(K)
            out[name].append((peak_bytes(step), best_time(step)))
    return out


def main(out_dir: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    W, x = problem()
    results = {"JAX": measure_jax(W, x), "PyTorch": measure_torch(W, x)}
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {("JAX", "unrolled"): ("C0", "o", "--"), ("JAX", "implicit"): ("C0", "o", "-"),
              ("PyTorch", "unrolled"): ("C3", "s", "--"), ("PyTorch", "implicit"): ("C3", "s", "-")}
    for fw, res in results.items():
        for method, rows in res.items():
            color, marker, ls = styles[fw, method]
            mem = [b / 2**20 for b, _ in rows]
            ms = [1e3 * t for _, t in rows]
            label = f"{fw}, {method}"
            ax_m.plot(KS, mem, color=color, marker=marker, ls=ls, label=label)
            ax_t.plot(KS, ms, color=color, marker=marker, ls=ls, label=label)
    ax_m.set_ylabel("memory of one gradient (MiB)")
    ax_m.set_title("memory (JAX: XLA temporaries; PyTorch: peak live tensors)", fontsize=9)
    ax_t.set_ylabel("time of one forward + backward (ms)")
    ax_t.set_title(f"time (fastest of {REPEATS} calls)", fontsize=9)
    for ax in (ax_m, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_xticks(KS, [str(k) for k in KS])
        ax.set_xlabel("solver iterations K")
        ax.grid(True, alpha=0.3)
        ax.set_yscale("log")
    ax_m.legend(fontsize=8)
    fig.suptitle(f"tanh layer z = tanh(Wz + x), hidden {N}, batch {BATCH}, float64; measured "
                 f"at build time on {platform.machine()}, {os.cpu_count()} CPUs", fontsize=9)
    fig.tight_layout()
    out = Path(out_dir) / "ch01_memory_time.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    for fw, res in results.items():
        for method, rows in res.items():
            print(fw, method, [(K, round(b / 2**20, 2), round(1e3 * t, 2))
                               for K, (b, t) in zip(KS, rows)])
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
