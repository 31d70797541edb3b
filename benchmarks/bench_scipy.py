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
differentiation by hand after Newton's method in NumPy, checked against finite differences with a
tight solve).
Then a second table at equal gradient error: for each alternative, the cheapest implicit setting
(L-BFGS-B `gtol` from a sweep, jitted) whose error is no larger than the alternative's.

    python benchmarks/bench_scipy.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def _newton_reference(Xtr, ytr, Xva, yva, lam: float) -> float:
    """dL_val/dλ in float64 NumPy: w* by Newton's method (quadratic convergence, to round-off),
    then the implicit function theorem by hand."""
    n, d = Xtr.shape
    c = np.exp(lam)
    w = np.zeros(d)
    for _ in range(100):
        z = ytr * (Xtr @ w)
        s = 1.0 / (1.0 + np.exp(z))                      # σ(-z)
        g = -(Xtr.T @ (ytr * s)) / n + c * w
        H = (Xtr.T * (s * (1 - s))) @ Xtr / n + c * np.eye(d)
        step = np.linalg.solve(H, g)
        w = w - step
        if np.linalg.norm(step) <= 1e-15 * max(1.0, np.linalg.norm(w)):
            break
    zv = yva * (Xva @ w)
    grad_val = -(Xva.T @ (yva / (1.0 + np.exp(zv)))) / Xva.shape[0]
    return float(-grad_val @ np.linalg.solve(H, c * w))


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

    def loose(gtol):  # the forward at gtol; its residual check follows it
        return {"options": {"ftol": min(1e-14, gtol * 1e-6), "gtol": gtol, "maxiter": 20000},
                "residual_tol": max(1e-7, 100 * gtol)}

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
    # reference, sharing no code with the library: Newton's method to machine precision in
    # NumPy, then the closed form dL/dλ = -∇L_val(w)ᵀ H⁻¹ (e^λ w); cross-checked by finite
    # differences of tight implicitdiff solves
    ref = _newton_reference(np.asarray(Xtr), np.asarray(ytr), np.asarray(Xva), np.asarray(yva),
                            opts.lam)
    tight = {"options": {"ftol": 1e-16, "gtol": 1e-11, "maxiter": 20000}, "residual_tol": 1e-9}
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
    for K in (100, 300, 1000, 5000):
        fn = make_unrolled(K, step)
        t, n, g = timed(lambda fn=fn: fn(lam))
        rows.append((f"unrolled GD in JAX, K={K} (step 1/L)", t, 0, g))

    # equal accuracy: the cheapest jitted implicit setting no less accurate than each alternative
    sweep = []
    for gtol in (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11):
        fn = jax.jit(jax.grad(lambda l_, gtol=gtol: val_loss(solve(l_, **loose(gtol)))))
        t, _, g = timed(lambda fn=fn: fn(lam))
        sweep.append((f"L-BFGS-B gtol={gtol:g}", t, abs(g - ref) / abs(ref)))
    # L-BFGS-B stops near |∇| ~ 4e-10 whatever gtol says; a trust region with exact Hessians
    # from jax goes further
    for gtol in (1e-8, 1e-12):
        kw = {"method": "trust-exact", "options": {"gtol": gtol, "maxiter": 1000},
              "residual_tol": max(1e-8, 100 * gtol)}
        fn = jax.jit(jax.grad(lambda l_, kw=kw: val_loss(solve(l_, **kw))))
        t, _, g = timed(lambda fn=fn: fn(lam))
        sweep.append((f"trust-exact gtol={gtol:g}", t, abs(g - ref) / abs(ref)))

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
    print("\nimplicit sweep (setting, s, error): "
          + ", ".join(f"({a}, {b:.4f}, {c:.1e})" for a, b, c in sweep))
    print("\n## At equal gradient error: the cheapest implicit setting (jitted) whose error is "
          "no larger\n")
    print("| alternative | its time (s) | its error | implicit setting | time (s) | error "
          "| ratio (implicit / alternative) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name, t, _, g in rows[2:]:
        if "eager" in name:
            continue
        err = abs(g - ref) / abs(ref)
        ok = [s_ for s_ in sweep if s_[2] <= err]
        if not ok:
            print(f"| {name} | {t:.4f} | {err:.1e} | none of the sweep is as accurate | | | |")
            continue
        setting, t_us, e_us = min(ok, key=lambda s_: s_[1])
        print(f"| {name} | {t:.4f} | {err:.1e} | {setting} | {t_us:.4f} | {e_us:.1e} "
              f"| {t_us / t:.2f} |")


if __name__ == "__main__":
    main()
