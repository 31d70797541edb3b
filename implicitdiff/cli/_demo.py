"""`implicitdiff demo`: tune a ridge penalty by hypergradient descent in every installed framework,
the hypergradient coming from `idf.custom_root` on the ridge optimality condition."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

from .. import _gallery
from .._array import one_blas_thread
from .._backend import backend_named
from .._linear_solve import Cholesky
from .._root import custom_root
from .._tags import positive_definite, symmetric
from .._transforms import vjp as idf_vjp
from ._common import _float64, _select_backends

# Ridge regression on the training data, in terms of its Gram matrix G = XᵀX/m and c = Xᵀy/m:
# w*(λ) = argmin ½wᵀGw − cᵀw + ½λ‖w‖², whose optimality condition is F = (G + λI)w − c = 0. The
# solver is a dense linear solve; the hypergradient dw*/dλ comes from F alone.

def ridge_condition(w: Any, lam: Any, G: Any, c: Any) -> Any:
    """∇ of ½wᵀGw − cᵀw + ½λ‖w‖²."""
    return G @ w - c + lam * w


@custom_root(ridge_condition, solve=Cholesky(), tags={symmetric, positive_definite})
def ridge_fit(lam: Any, G: Any, c: Any) -> Any:
    """Ridge regression weights $(G + \\lambda I)^{-1} c$, for any framework."""
    xp = array_api_compat.array_namespace(G, c)
    eye = xp.eye(G.shape[0], dtype=G.dtype, device=array_api_compat.device(G))
    return xp.linalg.solve(G + lam * eye, c)


def load_data(n_train: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's diabetes data (bundled, no download) with pairwise products of the features,
    split deterministically into train/validation, standardized with the training statistics and
    the target centered. `G = XᵀX/m` and `c = Xᵀy/m` on the training data."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    cols = [X]
    for i in range(X.shape[1]):
        for j in range(i, X.shape[1]):
            if i == j and np.unique(X[:, i]).size <= 2:
                continue  # the square of a binary feature repeats the feature
            cols.append((X[:, i] * X[:, j])[:, None])
    X = np.hstack(cols)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, va = perm[:n_train], perm[n_train:]
    mu, sd = X[tr].mean(axis=0), X[tr].std(axis=0)
    Xt, Xv = (X[tr] - mu) / sd, (X[va] - mu) / sd
    ym = y[tr].mean()
    m = len(tr)
    yt = y[tr] - ym
    return {"G": Xt.T @ Xt / m, "c": Xt.T @ yt / m, "X_val": Xv, "y_val": y[va] - ym,
            "X_train": Xt, "y_train": yt}


def _val_loss(xp_w: Any, X_val: Any, y_val: Any) -> Any:
    r = X_val @ xp_w - y_val
    return (r @ r) / r.shape[0]


def make_hypergradient(framework: str, data: dict[str, np.ndarray]
                       ) -> Callable[[float], tuple[float, float]]:
    """`s ↦ (L_val(w*(e^s)), dL_val/ds)`, the derivative through `ridge_fit` in `framework`:
    `idf.vjp` of `ridge_fit` in λ (the framework's own autodiff beneath, the implicit rule of
    `idf.custom_root` inside), the validation loss and the chain rule on the host."""
    bk = backend_named(framework)
    G, c = _gallery.to_framework((data["G"], data["c"]), framework)
    Xv, yv = data["X_val"], data["y_val"]

    def hyper(s: float) -> tuple[float, float]:
        lam_h = np.asarray(math.exp(s))
        lam = _gallery.to_framework(lam_h, framework)
        w, vjp_fn = idf_vjp(ridge_fit, lam, G, c, argnums=0)
        r = Xv @ np.asarray(bk.to_host(w)) - yv
        loss = float(r @ r) / r.shape[0]
        grad_w = 2.0 * (Xv.T @ r) / r.shape[0]  # chain rule by hand: dL/dw
        dlam = float(np.asarray(bk.to_host(vjp_fn(_gallery.to_framework(grad_w, framework))[0])))
        return loss, dlam * lam_h.item()

    return hyper


@dataclass
class DemoRun:
    """One framework's optimization: Adam on s = log λ (β₁ = 0.5, β₂ = 0.999), the same update
    for every framework, so that the runs differ only in where the hypergradient comes from."""

    framework: str
    hyper: Callable[[float], tuple[float, float]]
    s: float
    lr: float
    lam: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    _g: float = 0.0
    _m: float = 0.0
    _v: float = 0.0

    def evaluate(self) -> None:
        """Record λ and the validation loss at the current s; keep the hypergradient."""
        t0 = time.perf_counter()
        loss, self._g = self.hyper(self.s)
        self.seconds += time.perf_counter() - t0
        self.lam.append(math.exp(self.s))
        self.val_loss.append(loss)

    def step(self) -> None:
        """One Adam step on s with the hypergradient of the last `evaluate`."""
        b1, b2, eps, k = 0.5, 0.999, 1e-12, len(self.lam)
        g = self._g
        self._m = b1 * self._m + (1 - b1) * g
        self._v = b2 * self._v + (1 - b2) * g * g
        self.s -= self.lr * (self._m / (1 - b1 ** k)) / (math.sqrt(self._v / (1 - b2 ** k)) + eps)


def _plot(runs: Sequence[DemoRun], path: str, best: tuple[float, float]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    styles = [("-", "o", 7), ("--", "s", 4.5), (":", "^", 3), ("-.", "d", 3)]
    for i, run in enumerate(runs):
        ls, marker, ms = styles[i % len(styles)]
        steps = range(len(run.val_loss))
        every = max(1, len(run.val_loss) // 15)
        ax1.plot(steps, run.val_loss, ls, marker=marker, ms=ms, markevery=every,
                 label=run.framework, lw=1.6)
        ax2.plot(steps, run.lam, ls, marker=marker, ms=ms, markevery=every,
                 label=run.framework, lw=1.6)
    ax1.axhline(best[1], color="gray", lw=0.8, label="grid-search optimum")
    ax2.axhline(best[0], color="gray", lw=0.8, label="grid-search optimum")
    ax1.set(xlabel="step", ylabel="validation loss (MSE)",
            title="validation loss vs step")
    ax2.set(xlabel="step", ylabel="ridge penalty λ", yscale="log", title="λ vs step")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Hypergradient descent on the ridge penalty (diabetes data, "
                 "hypergradient by idf.custom_root)")
    fig.tight_layout()
    fig.savefig(path)


def _cmd_demo(ns: argparse.Namespace) -> int:
    out = sys.stdout
    t_start = time.perf_counter()
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        print(f"error: implicitdiff demo needs scikit-learn and matplotlib ({e}). Install them "
              "with: pip install 'implicitdiff[demo]'", file=sys.stderr)
        return 2
    if ns.steps < 1:
        print("error: --steps must be at least 1", file=sys.stderr)
        return 2
    frameworks = _select_backends(ns.backends, out)
    if frameworks is None:
        return 2
    data = load_data()
    m_train, p = data["X_train"].shape
    print(f"diabetes data: {m_train} training / {data['X_val'].shape[0]} validation samples, "
          f"{p} features (10 standardized + pairwise products)", file=out)
    print(f"tuning λ = exp(s) by Adam on s (lr {ns.lr:g}, {ns.steps} steps) from λ = "
          f"{ns.lam0:g}; hypergradient from idf.custom_root in: {', '.join(frameworks)}",
          file=out)
    every = max(1, ns.steps // 10)
    print(file=out)
    print(f"{'step':>5}" + "".join(f"  {fw + ' λ':>11}  {'val loss':>10}" for fw in frameworks),
          file=out, flush=True)
    with _float64(frameworks), one_blas_thread():
        runs = [DemoRun(fw, make_hypergradient(fw, data), math.log(ns.lam0), ns.lr)
                for fw in frameworks]
        for k in range(ns.steps + 1):
            for run in runs:
                run.evaluate()
                if k < ns.steps:
                    run.step()
            if k % every == 0 or k == ns.steps:
                print(f"{k:>5}" + "".join(f"  {r.lam[k]:>11.4e}  {r.val_loss[k]:>10.2f}"
                                          for r in runs), file=out, flush=True)
    # Where the optimum is, by brute force in closed form.
    G, c, Xv, yv = data["G"], data["c"], data["X_val"], data["y_val"]
    evals, evecs = np.linalg.eigh(G)
    Atb = evecs.T @ c
    grid = np.exp(np.linspace(math.log(1e-5), math.log(1e2), 401))
    gl = [float(_val_loss(evecs @ (Atb / (evals + lam)), Xv, yv)) for lam in grid]
    best = (float(grid[int(np.argmin(gl))]), float(min(gl)))
    print(file=out)
    print(f"{'framework':10s}  {'final λ':>11}  {'val RMSE':>9}  {'train RMSE':>10}  "
          f"{'time':>6}", file=out)
    for r in runs:
        lam = r.lam[-1]
        w = np.linalg.solve(G + lam * np.eye(p), c)
        train = float(np.sqrt(np.mean((data["X_train"] @ w - data["y_train"]) ** 2)))
        print(f"{r.framework:10s}  {lam:>11.4e}  {math.sqrt(r.val_loss[-1]):>9.3f}  "
              f"{train:>10.3f}  {r.seconds:>5.1f}s", file=out)
    print(f"{'start':10s}  {ns.lam0:>11.4e}  {math.sqrt(runs[0].val_loss[0]):>9.3f}", file=out)
    print(f"{'grid':10s}  {best[0]:>11.4e}  {math.sqrt(best[1]):>9.3f}   (401 values of λ in "
          "[1e-5, 1e2], for comparison)", file=out)
    status = 0
    if len(runs) > 1:
        ref = runs[0]
        diff = max(
            max(abs(a - b_) / abs(b_) for a, b_ in zip(r.lam, ref.lam))
            for r in runs[1:])
        diff_loss = max(
            max(abs(a - b_) / abs(b_) for a, b_ in zip(r.val_loss, ref.val_loss))
            for r in runs[1:])
        agree = diff <= ns.agree_rtol and diff_loss <= ns.agree_rtol
        print(f"\nframeworks {'agree' if agree else 'DISAGREE'}: largest relative difference "
              f"over all steps {diff:.1e} in λ, {diff_loss:.1e} in validation loss "
              f"(tolerance {ns.agree_rtol:g})", file=out)
        if not agree:
            status = 1
    else:
        print("\nonly one framework ran; install jax or torch (with their implicitdiff backends) "
              "to compare", file=out)
    _plot(runs, ns.out, best)
    print(f"wrote {ns.out}  ({time.perf_counter() - t_start:.1f}s in all)", file=out)
    return status
