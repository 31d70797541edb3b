"""JAX backend: lasso hypergradient, implicitdiff's `proximal_gradient` condition vs jaxopt's
`ProximalGradient(implicit_diff=True)`, unrolled autodiff and the closed form on the support.

    python benchmarks/bench_lasso.py               # the full run (about 15 s on 2 CPU cores)
    python benchmarks/bench_lasso.py --rounds 50   # a shorter one
    python benchmarks/bench_lasso.py --quick       # a smoke run (50 rounds)
    python benchmarks/bench_lasso.py --ablation    # the checks removed one by one

The problem. scikit-learn's bundled diabetes data (442 patients, 10 features, standardized; the
target standardized too), shuffled with a fixed seed and split 300 / 142 into training and
validation sets. The lasso on the training set, its strength λ tuned on the validation set:

    x*(λ) = argmin f(x) + λ‖x‖₁,   f(x) = (1/2m)‖Xx − y‖²   (scikit-learn's `Lasso` scaling),
    L(λ) = mean((X_v x*(λ) − y_v)²),

at λ = 0.1 λ_max (λ_max = ‖Xᵀy‖∞/m, the smallest λ with x* = 0), float64. Diabetes rather than
breast cancer (30 features): its XᵀX/m is far better conditioned (cond 5.5 on the support here;
breast cancer's is about 28 on its support at the same λ/λ_max and 1e5 in full), so proximal
gradient reaches the 1e-12 tolerance in about 240 iterations, not thousands, and the run stays
short.

What is timed is `jax.jit(jax.value_and_grad(L))(λ, data)`, the data being arguments of the
jitted function (not closed-over constants XLA could fold).

The contenders:

- implicitdiff: `idf.custom_root(cond.proximal_gradient(f, cond.prox_l1, step=1/L), tags=F.tags)`
  (no tags: ∂ₓF is not symmetric; the default `Auto()` picks `Dense` at n = 10) around the
  forward solver below; once with the default `on_failure="raise"` and once with
  `on_failure="nan"`. "raise" puts a never-taken `lax.cond` with a `jax.debug.callback` in the
  compiled code (the residual check of the forward solve and the check of the backward linear
  solve); the check declares no JAX effect, so the executable keeps JAX's C++ fast dispatch path
  (finding 1 in docs/benchmarks.md). "nan" checks the same things with no callback (a failure
  turns the output into NaN). A third row uses `solve=idf.GMRES(rtol=1e-6)` for the backward,
  a candidate for the equal-accuracy table; a fourth wraps jaxopt's own ISTA loop
  (the `ProximalGradient` of jaxopt's row; its `run` is only run, never differentiated) in
  `custom_root`, so that its forward is exactly jaxopt's.
- The forward solver of both: ISTA (proximal gradient, step 1/L, L = λ_max(XᵀX/m)) from x = 0
  in a `lax.while_loop`, stopped as jaxopt stops: ‖x_{k+1} − x_k‖/step ≤ tol = 1e-12 or
  maxiter = 10,000.
- jaxopt: `ProximalGradient(fun=f, prox=jaxopt.prox.prox_lasso, stepsize=1/L,
  acceleration=False, tol=1e-12, maxiter=10_000, implicit_diff=True)`, `.run(0, λ, (X, y))`
  differentiated with `jax.grad`: the same iteration and stopping rule, its own loop. Its
  implicit derivative uses jaxopt's default linear solver, `solve_normal_cg` (CG on the normal
  equations, tolerance 1e-5); a second row passes `implicit_diff_solve=solve_lu`.
- unrolled: the same ISTA iteration for exactly as many steps as the while loop took, in
  `lax.scan`, differentiated through by autodiff (through `cond.prox_l1`'s branches).
- closed form: the same forward solver, then dx_S/dλ = −m (X_SᵀX_S)⁻¹ sign(x_S), 0 off the
  support S, as a masked dense solve in JAX (no dynamic shapes: (I − D) + D (XᵀX/m) D with D the
  0/1 diagonal of S), attached to x* as a linear term in λ.
- forward only: `jax.jit(L)` with the same forward solver and no derivative, for scale.

The reference for the errors is computed apart in NumPy: scikit-learn's `Lasso` (tol 1e-14),
polished on its support and signs by the exact solve, then the closed form above (with x* on the
validation loss: dL/dλ = (2/m_v) (X_v x* − y_v)ᵀ X_v dx*/dλ). "max |dx/dλ|" is the largest entry
of `jax.jacrev(λ ↦ x*(λ))` for each contender (jaxopt PR #274 was about lasso Jacobians with
1e9-sized entries off the support).

Equal accuracy. For each jaxopt row, the cheapest implicitdiff row with the default
`on_failure` whose relative error of dL/dλ is no larger than jaxopt's (up to rounding: 1%, or
1e-15), its time and the paired ratio.

How it is timed (as in bench_jax.py). Every function is compiled and called 3 times first. Then,
for `--rounds` rounds, every function is called once, in an order shuffled each round, each call
timed on its own from dispatch to `jax.block_until_ready`, with the garbage collector off. Times
are the median and the interquartile range (IQR) over the rounds; ratios are the median over
rounds of the per-round ratio of two calls (paired, robust on a shared, noisy machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from bench_jax import (
    ABLATION_STEPS,
    environment,
    equal_accuracy,
    first_call,
    fmt_err,
    fmt_ratio,
    fmt_us,
    median_iqr,
    paired_ratio,
    table,
    time_interleaved,
)
from jax import lax

import implicitdiff as idf
import implicitdiff.conditions as cond

jax.config.update("jax_enable_x64", True)

try:
    import jaxopt
except ImportError:  # pragma: no cover - optional
    jaxopt = None
try:
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Lasso
except ImportError:  # pragma: no cover - needed
    load_diabetes = Lasso = None

M_TRAIN = 300
LAM_FRAC = 0.1
TOL = 1e-12
MAXITER = 10_000

IDF = "implicitdiff `proximal_gradient` + `prox_l1` (Auto → Dense)"
IDF_NAN = "implicitdiff, `on_failure='nan'` (no host callback)"
IDF_GMRES = "implicitdiff, `solve=GMRES(rtol=1e-6)`"
IDF_JAXOPT_FWD = "implicitdiff (Auto → Dense) around jaxopt's own ISTA loop"
EQUAL_CANDIDATES = [IDF, IDF_GMRES, IDF_JAXOPT_FWD]  # default on_failure: checks in the program
JAXOPT = "jaxopt `ProximalGradient` (implicit diff, default solve_normal_cg)"
JAXOPT_LU = "jaxopt `ProximalGradient`, `implicit_diff_solve=solve_lu`"
UNROLLED = "unrolled ISTA, {k} steps (lax.scan)"
CLOSED = "closed form on the support (masked solve, JAX)"
FORWARD = "forward only: `jit(L)`, no derivative"

Data = tuple[Any, Any, Any, Any]  # X, y, X_v, y_v


# ---- the problem -------------------------------------------------------------------------------

def make_data(seed: int = 0) -> tuple[Data, float, float]:
    """(X, y, X_v, y_v), λ and the step 1/L, from scikit-learn's diabetes data."""
    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    perm = np.random.default_rng(seed).permutation(X.shape[0])
    X, y = X[perm], y[perm]
    Xt, yt, Xv, yv = X[:M_TRAIN], y[:M_TRAIN], X[M_TRAIN:], y[M_TRAIN:]
    lam = LAM_FRAC * float(np.max(np.abs(Xt.T @ yt))) / M_TRAIN
    L = float(np.linalg.eigvalsh(Xt.T @ Xt / M_TRAIN)[-1])
    data = tuple(jnp.asarray(a) for a in (Xt, yt, Xv, yv))
    return data, lam, 1.0 / L


def f(x: Any, data: Any) -> Any:
    """The smooth part, (1/2m)‖Xx − y‖²."""
    X, y = data
    r = X @ x - y
    return 0.5 * jnp.sum(r * r) / X.shape[0]


def grad_f(x: Any, X: Any, y: Any) -> Any:
    return X.T @ (X @ x - y) / X.shape[0]


def ista_step(x: Any, lam: Any, X: Any, y: Any, eta: float) -> Any:
    return cond.prox_l1(x - eta * grad_f(x, X, y), lam, eta)


def ista_while(eta: float) -> Callable[..., Any]:
    """The forward solver: ISTA in a while loop, jaxopt's stopping rule. Returns (x, steps)."""

    def solve(data: Any, lam: Any) -> tuple[Any, Any]:
        X, y = data

        def cond_fun(s: Any) -> Any:
            _, err, k = s
            return (err > TOL) & (k < MAXITER)

        def body(s: Any) -> Any:
            x, _, k = s
            xn = ista_step(x, lam, X, y, eta)
            return xn, jnp.linalg.norm(xn - x) / eta, k + 1

        x0 = jnp.zeros(X.shape[1], X.dtype)
        x, _, k = lax.while_loop(cond_fun, body, (x0, jnp.asarray(jnp.inf, X.dtype), 0))
        return x, k

    return solve


def val_loss_with(solver: Callable[[Any, Any], Any]) -> Callable[[Any, Data], Any]:
    """L(λ, data) for `solver((X, y), lam) -> x*`."""

    def val_loss(lam: Any, data: Data) -> Any:
        X, y, Xv, yv = data
        x = solver((X, y), lam)
        return jnp.mean((Xv @ x - yv) ** 2)

    return val_loss


# ---- the contenders: solver((X, y), lam) -> x* -------------------------------------------------

def idf_solver(eta: float, **kw: Any) -> Callable[..., Any]:
    F = cond.proximal_gradient(f, cond.prox_l1, step=eta)
    forward = ista_while(eta)
    return idf.custom_root(F, tags=F.tags, **kw)(lambda data, lam: forward(data, lam)[0])


def jaxopt_solver(eta: float, **kw: Any) -> Callable[..., Any]:
    pg = jaxopt.ProximalGradient(fun=f, prox=jaxopt.prox.prox_lasso, stepsize=eta,
                                 acceleration=False, tol=TOL, maxiter=MAXITER,
                                 implicit_diff=True, **kw)

    def solve(data: Any, lam: Any) -> Any:
        return pg.run(jnp.zeros(data[0].shape[1], data[0].dtype), lam, data).params

    solve.pg = pg  # type: ignore[attr-defined]
    return solve


def idf_around_jaxopt(eta: float, **kw: Any) -> Callable[..., Any]:
    """implicitdiff's derivative around jaxopt's forward loop: the same solver object as
    jaxopt's row (`implicit_diff=True`, so `run` is its fast while loop; with False jaxopt
    runs a scan of maxiter steps, to be differentiable by unrolling). Inside `custom_root` it
    is only run, never differentiated (jaxopt's own rule is not used)."""
    F = cond.proximal_gradient(f, cond.prox_l1, step=eta)
    pg = jaxopt.ProximalGradient(fun=f, prox=jaxopt.prox.prox_lasso, stepsize=eta,
                                 acceleration=False, tol=TOL, maxiter=MAXITER,
                                 implicit_diff=True)

    def forward(data: Any, lam: Any) -> Any:
        return pg.run(jnp.zeros(data[0].shape[1], data[0].dtype), lam, data).params

    return idf.custom_root(F, tags=F.tags, **kw)(forward)


def unrolled_solver(eta: float, steps: int) -> Callable[..., Any]:
    def solve(data: Any, lam: Any) -> Any:
        X, y = data
        x, _ = lax.scan(lambda x, _: (ista_step(x, lam, X, y, eta), None),
                        jnp.zeros(X.shape[1], X.dtype), None, length=steps)
        return x

    return solve


def closed_form_solver(eta: float) -> Callable[..., Any]:
    """Forward solve, then x* + (λ − sg(λ)) dx*/dλ with dx*/dλ the closed form on the support."""
    forward = ista_while(eta)

    def solve(data: Any, lam: Any) -> Any:
        X = data[0]
        x = lax.stop_gradient(forward(data, lam)[0])
        d = (x != 0).astype(x.dtype)
        H = X.T @ X / X.shape[0]
        A = jnp.diag(1.0 - d) + d[:, None] * H * d[None, :]
        dx = jnp.linalg.solve(A, -d * jnp.sign(x))
        return x + (lam - lax.stop_gradient(lam)) * lax.stop_gradient(dx)

    return solve


def forward_solver(eta: float) -> Callable[..., Any]:
    forward = ista_while(eta)
    return lambda data, lam: forward(data, lam)[0]


# ---- the reference, in NumPy -------------------------------------------------------------------

def reference(data: Data, lam: float) -> dict[str, Any]:
    """x*, dx*/dλ and dL/dλ from scikit-learn's Lasso polished on its support, closed form."""
    X, y, Xv, yv = (np.asarray(a) for a in data)
    m = X.shape[0]
    c = Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=1_000_000).fit(X, y).coef_
    S = c != 0
    XS = X[:, S]
    G = XS.T @ XS / m
    x = np.zeros_like(c)
    x[S] = np.linalg.solve(G, XS.T @ y / m - lam * np.sign(c[S]))
    assert np.array_equal(np.sign(x), np.sign(c)), "polish changed the signs"
    dx = np.zeros_like(x)
    dx[S] = -np.linalg.solve(G, np.sign(x[S]))  # = −m (X_SᵀX_S)⁻¹ sign(x_S)
    r = Xv @ x - yv
    return dict(x=x, dx=dx, S=S, loss=float(np.mean(r * r)),
                grad=float(2.0 / Xv.shape[0] * r @ (Xv @ dx)),
                cond_S=float(np.linalg.cond(G)))


# ---- the benchmark -----------------------------------------------------------------------------

def run(rounds: int, seed: int) -> int:
    t_start = time.perf_counter()
    data, lam_f, eta = make_data(seed)
    ref = reference(data, lam_f)
    lam = jnp.asarray(lam_f)
    X, y = data[0], data[1]

    x_fw, steps = jax.jit(ista_while(eta))((X, y), lam)
    steps = int(steps)
    x_fw = np.asarray(x_fw)
    resid = float(np.max(np.abs(np.asarray(
        cond.proximal_gradient(f, cond.prox_l1, step=eta)(jnp.asarray(x_fw), (X, y), lam)))))

    solvers: dict[str, Callable[..., Any]] = {
        IDF: idf_solver(eta),
        IDF_NAN: idf_solver(eta, on_failure="nan"),
        IDF_GMRES: idf_solver(eta, solve=idf.GMRES(rtol=1e-6)),
    }
    jaxopt_steps = None
    if jaxopt is not None:
        solvers[JAXOPT] = jaxopt_solver(eta)
        solvers[JAXOPT_LU] = jaxopt_solver(eta, implicit_diff_solve=jaxopt.linear_solve.solve_lu)
        solvers[IDF_JAXOPT_FWD] = idf_around_jaxopt(eta)
        pg = solvers[JAXOPT].pg  # type: ignore[attr-defined]
        jaxopt_steps = int(jax.jit(lambda d, l_: pg.run(jnp.zeros(X.shape[1]), l_, d).state
                                   .iter_num)((X, y), lam))
    unrolled = UNROLLED.format(k=steps)
    solvers[unrolled] = unrolled_solver(eta, steps)
    solvers[CLOSED] = closed_form_solver(eta)

    fns: dict[str, Callable[..., Any]] = {}
    compile_s: dict[str, float] = {}
    grads: dict[str, float] = {}
    dxmax: dict[str, float] = {}
    dxerr: dict[str, float] = {}
    for name, s in solvers.items():
        fns[name] = jax.jit(jax.value_and_grad(val_loss_with(s)))
        compile_s[name], (_, g) = first_call(fns[name], (lam, data))
        grads[name] = float(g)
        J = np.asarray(jax.jit(jax.jacrev(lambda l_, d, s=s: s(d, l_), argnums=0))(
            lam, (X, y)))
        dxmax[name] = float(np.max(np.abs(J)))
        dxerr[name] = float(np.max(np.abs(J - ref["dx"])) / np.max(np.abs(ref["dx"])))
    fns[FORWARD] = jax.jit(val_loss_with(forward_solver(eta)))
    compile_s[FORWARD], _ = first_call(fns[FORWARD], (lam, data))

    t = time_interleaved(fns, (lam, data), rounds, seed=seed)

    errors = {k: abs(g - ref["grad"]) / abs(ref["grad"]) for k, g in grads.items()}
    rows = []
    for name in fns:
        med, iqr = median_iqr(t[name])
        g_err = errors.get(name)
        rows.append([name, fmt_us(med), fmt_us(iqr), fmt_ratio(paired_ratio(t, name, JAXOPT)),
                     fmt_err(g_err), fmt_err(dxerr.get(name)),
                     f"{dxmax[name]:.3g}" if name in dxmax else "—",
                     f"{compile_s[name]:.2f}"])
    rows.append(["reference: sklearn `Lasso` + closed form (NumPy, untimed)", "", "", "", "",
                 "", f"{np.max(np.abs(ref['dx'])):.3g}", ""])

    S = ref["S"]
    print(f"# JAX: lasso hypergradient\n\n{environment(('jaxopt', 'scikit-learn'))}.\n")
    print(f"Diabetes (scikit-learn), standardized, {M_TRAIN} training / "
          f"{data[2].shape[0]} validation rows, n = {X.shape[1]}; λ = {LAM_FRAC} λ_max = "
          f"{lam_f:.6g}; support {int(S.sum())} of {S.size} features, cond(X_SᵀX_S) = "
          f"{ref['cond_S']:.1f}; step 1/L = {eta:.4g}. Forward: ISTA took {steps} steps to "
          f"‖Δx‖/step ≤ {TOL:g} (jaxopt: {jaxopt_steps}); max|F(x*)| = {resid:.1e}, "
          f"max|x* − x_ref| = {np.max(np.abs(x_fw - ref['x'])):.1e}, same support as the "
          f"reference: {bool(np.array_equal(x_fw != 0, S))}. dL/dλ (reference) = "
          f"{ref['grad']:.12g}. {rounds} timed calls per function, interleaved; ratios are "
          "medians of per-round paired ratios.\n")
    print("## jit(value_and_grad(L))\n")
    print(table(["method", "median (µs)", "IQR (µs)", "/ jaxopt", "rel. error of dL/dλ",
                 "rel. error of dx/dλ", "max abs dx/dλ", "first call (s)"], rows) + "\n")
    eq_table, _ = equal_accuracy(t, errors, EQUAL_CANDIDATES, [JAXOPT, JAXOPT_LU])
    print("## At equal gradient error\n")
    print("For each jaxopt row, the cheapest implicitdiff row with the default "
          "on_failure='raise' whose relative error of dL/dλ is no larger (up to rounding: 1%, "
          "or 1e-15).\n")
    print(eq_table + "\n")
    print(f"Total run time {time.perf_counter() - t_start:.0f} s.")
    return 0


def ablation(rounds: int, seed: int) -> int:
    """Where the rest of the time goes: implicitdiff around jaxopt's own loop with the checks
    the defaults promise removed one by one (none of these settings is a recommendation)."""
    data, lam_f, eta = make_data(seed)
    lam = jnp.asarray(lam_f)
    solvers: dict[str, Callable[..., Any]] = {
        f"{IDF_JAXOPT_FWD}, {what}": idf_around_jaxopt(eta, solve=idf.Dense(**skw), **kw)
        for what, skw, kw in ABLATION_STEPS}
    solvers[JAXOPT] = jaxopt_solver(eta)
    solvers[JAXOPT_LU] = jaxopt_solver(eta, implicit_diff_solve=jaxopt.linear_solve.solve_lu)
    fns = {k: jax.jit(jax.value_and_grad(val_loss_with(s))) for k, s in solvers.items()}
    t = time_interleaved(fns, (lam, data), rounds, seed=seed)
    rows = [[k, fmt_us(median_iqr(t[k])[0]), fmt_ratio(paired_ratio(t, k, JAXOPT)),
             fmt_ratio(paired_ratio(t, k, JAXOPT_LU))] for k in fns]
    print(f"# JAX: lasso hypergradient, ablation\n\n{environment(('jaxopt',))}.\n")
    print(table(["method (Dense backward)", "median (µs)", "/ jaxopt", "/ jaxopt LU"], rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None,
                   help="timed calls per function (default 500; --quick 50)")
    p.add_argument("--quick", action="store_true", help="smoke run: 50 rounds")
    p.add_argument("--ablation", action="store_true",
                   help="only the ablation: the checks removed one by one (needs jaxopt)")
    p.add_argument("--seed", type=int, default=0, help="the train/validation shuffle")
    args = p.parse_args(argv)
    if load_diabetes is None:
        print("scikit-learn is needed (pip install scikit-learn).")
        return 1
    rounds = args.rounds or (50 if args.quick else 500)
    if args.ablation:
        return ablation(rounds, args.seed)
    return run(rounds, args.seed)


if __name__ == "__main__":
    sys.exit(main())
