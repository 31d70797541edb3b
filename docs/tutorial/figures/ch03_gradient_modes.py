"""Tutorial chapter 3: what each gradient mode of `odeint` costs against the number of steps.

    python docs/tutorial/figures/ch03_gradient_modes.py OUT_DIR    # writes ch03_gradient_modes.png

The problem: a batch of 16 states in the plane, the field y' = W2 tanh(W1 y + b1) (32 hidden
units, float64), integrated over [0, 1] by RK4 with N fixed steps (dt0 = 1/N), and the loss
sum(y(1)²); its gradient in (W1, b1, W2) by `odeint(grad=...)`, for "direct", "checkpoint" and
"backsolve", in PyTorch (one thread).

Measured, per mode and N:

- peak memory: the most bytes of tensors alive at once during one forward and backward pass,
  counted from the moment torch creates them until their storage is freed (a
  `TorchDispatchMode` sees every tensor the operations create: the tape, checkpoints, the
  backward pass's own);
- evaluations of f beyond those of the forward solve (`stats.nfe`), by a counter in the field;
- time: the faster of 2 forward + backward passes, without the memory meter.

The three gradients are also compared (checkpoint = direct to rounding; backsolve, whose backward
pass integrates the adjoint with the same fixed steps, to the method's error).
"""

from __future__ import annotations

import sys
import time
import weakref
from pathlib import Path

import numpy as np

NS = (8, 16, 32, 64, 128)
MODES = ("direct", "checkpoint", "backsolve")
BATCH, HIDDEN = 16, 32


class LiveBytes:
    """The peak of the bytes of tensors alive at once, among those torch operations create
    inside `with meter.mode:` (each counted from its creation until its storage is freed)."""

    def __init__(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        meter = self
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        meter.track(t.untyped_storage())
                meter.peak = max(meter.peak, meter.now)
                return out

        self.mode = Mode()

    def track(self, storage) -> None:
        key = storage.data_ptr()
        if key and key not in self.live:
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            weakref.finalize(storage, self.free, key)

    def free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def main(out_dir: str) -> dict[str, dict[str, list[float]]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from implicitdiff import ode

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    params = [torch.tensor(a, requires_grad=True) for a in (
        rng.normal(size=(HIDDEN, 2)), np.zeros(HIDDEN), rng.normal(size=(2, HIDDEN)) / HIDDEN)]
    y0 = torch.tensor(rng.normal(size=(BATCH, 2)))
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    calls = [0]

    def field(t, y, W1, b1, W2):
        calls[0] += 1
        return torch.tanh(y @ W1.T + b1) @ W2.T

    def gradient(mode: str, n: int) -> tuple[int, tuple[torch.Tensor, ...]]:
        sol = ode.odeint(field, y0, ts, *params, method="rk4", dt0=1.0 / n, max_steps=n + 1,
                         grad=mode, full_output=True)
        return int(sol.stats.nfe.max()), torch.autograd.grad(sol.ys[-1].square().sum(), params)

    out: dict[str, dict[str, list[float]]] = {m: {"kib": [], "extra": [], "ms": []}
                                              for m in MODES}
    t_start = time.perf_counter()
    for n in NS:
        grads = {}
        for mode in MODES:
            meter = LiveBytes()
            calls[0] = 0
            with meter.mode:
                nfe, grads[mode] = gradient(mode, n)
            out[mode]["kib"].append(meter.peak / 1024)
            out[mode]["extra"].append(calls[0] - nfe)     # beyond the forward solve's
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                gradient(mode, n)
                best = min(best, time.perf_counter() - t0)
            out[mode]["ms"].append(1e3 * best)
        for a, b in zip(grads["checkpoint"], grads["direct"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for a, b in zip(grads["backsolve"], grads["direct"]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    seconds = time.perf_counter() - t_start

    colors = {"direct": "tab:red", "checkpoint": "tab:blue", "backsolve": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("kib", "peak memory, forward + backward (KiB)"),
              ("extra", "evaluations of f beyond the forward solve"),
              ("ms", "time, forward + backward (ms)"))
    for ax, (key, label) in zip(axes, panels):
        for mode in MODES:
            values = np.maximum(np.asarray(out[mode][key], float), 0.5 if key == "extra" else 0)
            ax.loglog(NS, values, "o-", color=colors[mode], label=f'grad="{mode}"')
        ax.set_xlabel("RK4 steps N")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].annotate('"direct": 0 (drawn at 0.5)', (NS[0], 0.5), textcoords="offset points",
                     xytext=(0, 8), fontsize=8, color=colors["direct"])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"odeint's gradient modes, PyTorch, batch {BATCH}, state 2, MLP field with "
                 f"{HIDDEN} hidden units (measured in {seconds:.1f} s on {torch.__version__})",
                 fontsize=10)
    fig.tight_layout()
    path = Path(out_dir) / "ch03_gradient_modes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    for mode in MODES:
        print(mode, {k: [round(x, 1) for x in v] for k, v in out[mode].items()})
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
