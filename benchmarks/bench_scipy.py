"""Hypergradient of L2-regularized logistic regression on scikit-learn's breast-cancer data.

The outer objective is the validation loss $L_{val}(w^*(\\lambda))$ with
$w^*(\\lambda) = \\arg\\min_w L_{train}(w) + \\tfrac{e^\\lambda}{2}\\|w\\|^2$ (30 features plus
an intercept, standardized). The hypergradient $dL_{val}/d\\lambda$ is computed three ways:

1. `implicitdiff.scipy.minimize` (L-BFGS-B, gradients from `jax.grad`) + `jax.grad` through `.x`
   (implicit differentiation: one solve, one linear system with the Hessian), under `jax.jit`
   (SciPy runs in a `pure_callback`) and eagerly (the eager JAX path re-traces and compiles
   the implicit rule on every call: the difference is that overhead, not SciPy);
2. central finite differences over $\\lambda$ (two SciPy solves, same tolerance), jitted and
   eager;
3. unrolled gradient descent in JAX (`jax.lax.scan` of K steps, reverse mode through them), for
   several K.

Prints a markdown table: seconds (median of repeats, after a warm-up call that compiles), SciPy
solver calls, the hypergradient and its relative error against a reference (implicit
differentiation at a tight tolerance, checked against finite differences with a tight solve).

    python benchmarks/bench_scipy.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lam", type=float, default=-2.0, help="log of the L2 strength")
    opts = p.parse_args()

    import jax
    import jax.numpy as jnp
    from sklearn.datasets import load_breast_cancer

    jax.config.update("jax_enable_x64", True)
    import implicitdiff.scipy as isc

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    X = np.hstack([X, np.ones((X.shape[0], 1))])
    y = 2.0 * y - 1.0
    rng = np.random.default_rng(0)
    perm = rng.permutation(X.shape[0])
    tr, va = perm[:380], perm[380:]
    Xtr, ytr, Xva, yva = (jnp.asarray(a) for a in (X[tr], y[tr], X[va], y[va]))
    d = X.shape[1]

    def train_loss(w, lam, X, y):
        return jnp.mean(jnp.logaddexp(0.0, -y * (X @ w))) + 0.5 * jnp.exp(lam) * (w @ w)

    def val_loss(w):
        return jnp.mean(jnp.logaddexp(0.0, -yva * (Xva @ w)))

    w0 = jnp.zeros(d)
    opt = dict(method="L-BFGS-B", options={"ftol": 1e-14, "gtol": 1e-9, "maxiter": 10000},
               residual_tol=1e-7)

    # count SciPy solves on the host (under jit the Python wrapper runs only when tracing)
    import scipy.optimize

    calls = {"n": 0}
    scipy_minimize = scipy.optimize.minimize

    def counting_minimize(*a, **kw):
        calls["n"] += 1
        return scipy_minimize(*a, **kw)

    scipy.optimize.minimize = counting_minimize

    def solve(lam, **kw):
        return isc.minimize(train_loss, w0, args=(lam, Xtr, ytr), **{**opt, **kw}).x

    def hyper_implicit(lam):
        return jax.grad(lambda l_: val_loss(solve(l_)))(lam)

    def hyper_fd(lam, h=1e-4):
        return (val_loss(solve(lam + h)) - val_loss(solve(lam - h))) / (2 * h)

    def make_unrolled(K, step):
        def outer(lam):
            def body(w, _):
                return w - step * jax.grad(train_loss)(w, lam, Xtr, ytr), None

            w, _ = jax.lax.scan(body, w0, None, length=K)
            return val_loss(w)

        return jax.jit(jax.grad(outer))

    lam = jnp.asarray(opts.lam)
    # reference: implicit at a tighter tolerance, cross-checked by finite differences
    tight = {"options": {"ftol": 1e-16, "gtol": 1e-11, "maxiter": 20000}, "residual_tol": 1e-9}
    ref = float(jax.grad(lambda l_: val_loss(solve(l_, **tight)))(lam))
    fd_tight = float((val_loss(solve(lam + 1e-5, **tight)) -
                      val_loss(solve(lam - 1e-5, **tight))) / 2e-5)

    # the Lipschitz constant of the training gradient bounds a safe GD step
    L = float(np.linalg.norm(np.asarray(Xtr), 2) ** 2 / (4 * Xtr.shape[0]) + np.exp(opts.lam))
    step = 1.0 / L

    def timed(fn):
        fn()  # warm-up (compiles)
        ts, out, n_calls = [], None, 0
        for _ in range(opts.repeats):
            calls["n"] = 0
            t = time.perf_counter()
            out = float(jax.block_until_ready(fn()))
            ts.append(time.perf_counter() - t)
            n_calls = calls["n"]
        return float(np.median(ts)), n_calls, out

    rows = []
    impl_jit = jax.jit(hyper_implicit)
    fd_jit = jax.jit(hyper_fd)
    t, n, g = timed(lambda: impl_jit(lam))
    rows.append(("implicitdiff.scipy.minimize + jax.grad, jitted", t, n, g))
    t, n, g = timed(lambda: hyper_implicit(lam))
    rows.append(("implicitdiff.scipy.minimize + jax.grad, eager", t, n, g))
    t, n, g = timed(lambda: fd_jit(lam))
    rows.append(("central finite differences (h=1e-4), jitted", t, n, g))
    t, n, g = timed(lambda: hyper_fd(lam))
    rows.append(("central finite differences (h=1e-4), eager", t, n, g))
    t_impl = rows[0][1]
    for K in (100, 1000, 5000):
        fn = make_unrolled(K, step)
        t, n, g = timed(lambda fn=fn: fn(lam))
        rows.append((f"unrolled GD in JAX, K={K} (step 1/L)", t, 0, g))

    print(f"# bench_scipy: breast cancer (n_train={len(tr)}, d={d}), log λ = {opts.lam}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}, jax {jax.__version__}, repeats {opts.repeats}")
    print(f"# reference dL/dλ = {ref:.12g} (finite differences at a tight solve: "
          f"{fd_tight:.12g})\n")
    print("| method | time (s) | ratio to implicit | SciPy solves | dL_val/dλ | rel. error |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, n, g in rows:
        err = abs(g - ref) / abs(ref)
        print(f"| {name} | {t:.4f} | {t / t_impl:.2f} | {n} | {g:.10f} | {err:.1e} |")


if __name__ == "__main__":
    main()
