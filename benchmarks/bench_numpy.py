"""NumPy reference: backward (VJP) vs forward time on ridge regression.

    python benchmarks/bench_numpy.py

Ridge regression, the condition being the gradient of ½‖Xx − y‖² + ½λ‖x‖²:

    F(x, λ, X, y) = Xᵀ(Xx − y) + λx,        forward: x* = np.linalg.solve(XᵀX + λI, Xᵀy),

with X of shape (m, n), m = 2n, entries N(0, 1/m), y ~ N(0, 1), λ = 0.1. The spectrum of XᵀX then
fills roughly [(1 − 1/√2)², (1 + 1/√2)²] ≈ [0.09, 2.9] whatever n, so cond(XᵀX + λI) ≈ 16 and
CG needs about the same number of iterations at every size: the growth with n below is the cost
of the products, not of worse conditioning.

For each n and each linear solver (`idf.Dense()`, `idf.CG()`) it times the reverse-mode derivative
with respect to λ alone, `idf.vjp(ridge, lam, X, y, argnums=0)` then `vjp_fn(x̄)`, against the
forward solve, with the products with ∂F/∂x and ∂F/∂θ taken from

- "complex step": the NumPy reference's default (one complex evaluation of F per product), or
- "user": hand-written products passed as `idf.Derivatives(jvp_x=..., vjp_x=..., jvp_args=...,
  vjp_args=...)`.

What is timed:

- forward: the undecorated solver (forming XᵀX, Xᵀy, and the LU solve), median of the runs.
- VJP: the call `vjp_fn(x̄)` on a fresh `idf.vjp` (so every run pays the one-off probe that picks
  complex step or central differences, the materialization of A for `Dense`, the linear solve
  with Aᵀ and the product with ∂F/∂λᵀ). The decorated solver returns the cached forward solution
  inside the timing loop, so a run does not pay the forward solve again.

Every configuration is warmed up once on a small problem; cells estimated under a second get one
more untimed warm-up run at their own size. The number of runs adapts to the cost (at most
`--repeats`, about `--run-budget` seconds per cell). A cell whose single run is estimated (from
the measured cost of one product times the number of products) above `--max-cell` seconds is
skipped and the estimate is printed instead. Relative error is against the closed form
dλ = −x̄ᵀ(XᵀX + λI)⁻¹x*. Absolute times depend on the machine; compare ratios.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import implicitdiff as idf

TAGS = {idf.symmetric, idf.positive_definite}


# ---- the problem -------------------------------------------------------------------------------

def F(x: Any, lam: Any, X: Any, y: Any) -> Any:
    """Ridge optimality condition, complex-safe (the complex step applies)."""
    return X.T @ (X @ x - y) + lam * x


def solve_ridge(lam: float, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The forward solver: normal equations, LU."""
    n = X.shape[1]
    return np.linalg.solve(X.T @ X + lam * np.eye(n), X.T @ y)


def _jvp_x(v, x, lam, X, y):
    return X.T @ (X @ v) + lam * v


def _jvp_args(args_dot, x, lam, X, y):
    # ∂F/∂λ·λ̇ + ∂F/∂X·Ẋ + ∂F/∂y·ẏ
    lam_dot, X_dot, y_dot = args_dot
    out = np.zeros_like(x)
    if lam_dot is not None:
        out = out + lam_dot * x
    if X_dot is not None:
        out = out + X_dot.T @ (X @ x - y) + X.T @ (X_dot @ x)
    if y_dot is not None:
        out = out - X.T @ y_dot
    return out


def _vjp_args(u, x, lam, X, y):
    # (∂F/∂λᵀu, ∂F/∂Xᵀu, ∂F/∂yᵀu). The core passes no argnums here, so the m×n cotangent of X
    # is computed even though only λ is asked for (see "Observations" in docs/benchmarks.md).
    Xu = X @ u
    return (u @ x, np.outer(X @ x - y, u) + np.outer(Xu, x), -Xu)


USER = idf.Derivatives(jvp_x=_jvp_x, vjp_x=_jvp_x, jvp_args=_jvp_args, vjp_args=_vjp_args)


@dataclass
class Problem:
    n: int
    lam: float
    X: np.ndarray
    y: np.ndarray
    x: np.ndarray
    xbar: np.ndarray
    dlam_ref: float


def make_problem(n: int, m_over_n: int, lam: float, seed: int) -> Problem:
    rng = np.random.default_rng([seed, n])
    m = m_over_n * n
    X = rng.standard_normal((m, n)) / math.sqrt(m)
    y = rng.standard_normal(m)
    xbar = rng.standard_normal(n)
    H = X.T @ X + lam * np.eye(n)
    x = np.linalg.solve(H, X.T @ y)
    # dλ = −x̄ᵀ H⁻¹ x* (H symmetric): the closed form the gradients are checked against.
    dlam_ref = float(-(np.linalg.solve(H, xbar) @ x))
    return Problem(n, lam, X, y, x, xbar, dlam_ref)


def decorated(solver: idf.AbstractLinearSolver, derivatives: idf.Derivatives | None,
              prob: Problem) -> idf.ImplicitFunction:
    """`custom_root` around the forward solver, returning the cached x* for `prob`'s inputs."""

    @idf.custom_root(F, solve=solver, tags=TAGS, derivatives=derivatives)
    def ridge(lam, X, y):
        if lam == prob.lam and X is prob.X and y is prob.y:
            return prob.x.copy()
        return solve_ridge(lam, X, y)

    return ridge


# ---- timing ------------------------------------------------------------------------------------

def median_time(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def runs_for(estimate: float, repeats: int, run_budget: float) -> int:
    return max(1, min(repeats, int(run_budget // max(estimate, 1e-9))))


@dataclass
class Cell:
    n: int
    solver: str
    source: str
    forward: float
    vjp: float | None = None
    estimate: float | None = None
    iterations: int | None = None
    rel_error: float | None = None
    runs: int = 0


def one_vjp(prob: Problem, fn: idf.ImplicitFunction) -> tuple[float, Any, idf.BackwardRecord]:
    """Time `vjp_fn(x̄)` on a fresh linearization; return (seconds, dλ, backward record)."""
    _x, vjp_fn = idf.vjp(fn, prob.lam, prob.X, prob.y, argnums=0)
    with idf.diagnostics() as d:
        t0 = time.perf_counter()
        grads = vjp_fn(prob.xbar)
        t = time.perf_counter() - t0
    rec = d.backward[-1]
    if not bool(np.all(rec.converged)):
        raise RuntimeError(f"backward solve did not converge: {rec}")
    return t, grads[0], rec


def product_cost(prob: Problem, derivatives: idf.Derivatives | None) -> tuple[float, float]:
    """(seconds of the one-off work: the backend's probes and one product with ∂F/∂λᵀ; seconds
    per product with ∂F/∂x), through the backend's own linearization, as the solvers see it."""
    bk = idf.get_backend(prob.x)
    lin = bk.linearize(F, prob.x, (prob.lam, prob.X, prob.y), derivatives=derivatives,
                       tags=frozenset(TAGS))
    v = np.random.default_rng(1).standard_normal(prob.n)
    first = median_time(lambda: lin.A(v), 1)
    one = median_time(lambda: lin.A(v), 1)
    per = one if one > 0.05 else median_time(lambda: lin.A(v), 5)
    bt = median_time(lambda: lin.BT(v, (0,)), 1)
    return max(first - per, 0.0) + bt, per


def estimate(solver: str, n: int, cost: tuple[float, float], cg_iters: int) -> float:
    # Dense materializes A with n products; CG uses one per iteration. Plus the probe.
    probe, per = cost
    return probe + (n if solver == "Dense" else cg_iters + 1) * per


SOLVERS: dict[str, idf.AbstractLinearSolver] = {"CG": idf.CG(), "Dense": idf.Dense()}
SOURCES: dict[str, idf.Derivatives | None] = {"user": USER, "complex step": None}


def bench_size(prob: Problem, forward: float, args: argparse.Namespace,
               cg_iters_guess: int) -> list[Cell]:
    costs = {source: product_cost(prob, d) for source, d in SOURCES.items()}
    cells = []
    cg_iters = cg_iters_guess
    # CG with user derivatives first: always cheap, and its iteration count sizes the estimates.
    for solver in ("CG", "Dense"):
        for source in ("user", "complex step"):
            cell = Cell(prob.n, solver, source, forward)
            est = estimate(solver, prob.n, costs[source], cg_iters)
            cell.estimate = est
            if est > args.max_cell:
                cells.append(cell)
                print(f"  n={prob.n:5d} {solver:5s} {source:12s}: skipped, estimated {est:.0f} s",
                      flush=True)
                continue
            fn = decorated(SOLVERS[solver], SOURCES[source], prob)
            if est < 1.0:
                one_vjp(prob, fn)  # warm-up at this size (the small problem warmed up the rest)
            t, g, rec = one_vjp(prob, fn)
            times = [t]
            # The number of runs follows the measured time of the first (estimates can be off).
            for _ in range(runs_for(t, args.repeats, args.run_budget) - 1):
                t, g, rec = one_vjp(prob, fn)
                times.append(t)
            _check_source(source, rec.derivative_method)
            cell.vjp = statistics.median(times)
            cell.runs = len(times)
            cell.rel_error = abs(float(g) - prob.dlam_ref) / abs(prob.dlam_ref)
            if solver == "CG":
                cell.iterations = int(np.max(rec.iterations))
                if source == "user":
                    cg_iters = cell.iterations  # sizes the complex-step estimate
            cells.append(cell)
            print(f"  n={prob.n:5d} {solver:5s} {source:12s}: VJP {cell.vjp:.4g} s "
                  f"(estimated {est:.3g} s, {cell.runs} run(s))", flush=True)
    return cells


def _check_source(source: str, method: str) -> None:
    # The record names where the products with ∂F/∂x came from; make sure the row's label holds
    # (the reference silently falls back to central differences when F is not complex-safe).
    # The record reads "complex-step" when ∂F/∂x and ∂F/∂θ share a source, else "x: …; θ: …".
    ok = method == "user" if source == "user" else (
        method == "complex-step" or method.startswith("x: complex-step"))
    if not ok:
        raise RuntimeError(f"expected products by {source}, the backend reports {method!r}")


# ---- report ------------------------------------------------------------------------------------

def _git_revision() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, check=True,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "implicitdiff", "backends"],
                               cwd=here, check=True, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")


def header() -> str:
    lines = [
        f"python {platform.python_version()}, numpy {np.__version__}, implicitdiff "
        f"{idf.__version__} (git {_git_revision()}), {platform.machine()} {platform.system()}",
        f"CPUs: os.cpu_count()={os.cpu_count()}, usable="
        f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}",
    ]
    if hasattr(os, "getloadavg"):
        lines.append("load average (1, 5, 15 min) at start: "
                     + ", ".join(f"{a:.2f}" for a in os.getloadavg()))
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OPENBLAS", "OMP_", "MKL_", "BLIS"))}
    lines.append("env: " + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "(none)"))
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        lines.append("threadpoolctl: not installed")
    else:
        for info in threadpool_info():
            lines.append("threadpool: " + ", ".join(
                f"{k}={info.get(k)}" for k in ("user_api", "internal_api", "version",
                                                 "num_threads", "threading_layer",
                                                 "architecture") if info.get(k) is not None))
    return "\n".join(lines)


def fmt_s(t: float) -> str:
    return f"{t:.3g}"


def table(cells: list[Cell]) -> str:
    out = ["| n | solver | derivatives | forward (s) | VJP (s) | VJP / forward | CG iterations "
           "| rel. error | runs |",
           "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in cells:
        if c.vjp is None:
            est = c.estimate or float("nan")
            out.append(f"| {c.n} | `{c.solver}` | {c.source} | {fmt_s(c.forward)} | "
                       f"skipped (est. ~{est:.0f}) | ~{est / c.forward:.0f} (est.) | – | – | 0 |")
            continue
        its = str(c.iterations) if c.iterations is not None else "–"
        out.append(f"| {c.n} | `{c.solver}` | {c.source} | {fmt_s(c.forward)} | {fmt_s(c.vjp)} "
                   f"| {c.vjp / c.forward:.3g} | {its} | {c.rel_error:.1e} | {c.runs} |")
    return "\n".join(out)


def slope(ns: list[int], ts: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def growth(cells: list[Cell], forwards: dict[int, float]) -> str:
    ns = sorted(forwards)
    lines = []
    if len(ns) >= 2:
        lines.append(f"- forward: time ∝ n^{slope(ns, [forwards[n] for n in ns]):.2f} "
                     f"(n = {', '.join(map(str, ns))})")
    for solver in SOLVERS:
        for source in SOURCES:
            pts = [(c.n, c.vjp) for c in cells
                   if c.solver == solver and c.source == source and c.vjp is not None]
            if len(pts) >= 2:
                p = slope([n for n, _ in pts], [t for _, t in pts])
                lines.append(f"- VJP `{solver}`, {source}: time ∝ n^{p:.2f} "
                             f"(log-log fit over n = {', '.join(str(n) for n, _ in pts)})")
            else:
                lines.append(f"- VJP `{solver}`, {source}: fewer than two measured sizes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 5000])
    ap.add_argument("--m-over-n", type=int, default=2, help="rows of X per unknown (default 2)")
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="most timed runs per cell")
    ap.add_argument("--run-budget", type=float, default=20.0,
                    help="about this many seconds of timed runs per cell (at least one run)")
    ap.add_argument("--max-cell", type=float, default=180.0,
                    help="skip a cell whose single VJP is estimated above this (seconds)")
    args = ap.parse_args(argv)

    print(header(), flush=True)
    print(f"ridge: X (m, n) with m = {args.m_over_n}n, entries N(0, 1/m); λ = {args.lam}; "
          f"VJP w.r.t. λ only (argnums=0)", flush=True)
    t_start = time.perf_counter()

    # Warm-up: every configuration once on a small problem (BLAS threads, code paths).
    small = make_problem(64, args.m_over_n, args.lam, args.seed)
    solve_ridge(small.lam, small.X, small.y)
    for solver in SOLVERS.values():
        for derivs in SOURCES.values():
            one_vjp(small, decorated(solver, derivs, small))

    cells: list[Cell] = []
    forwards: dict[int, float] = {}
    cg_iters = 100  # guess for the first size's estimates; replaced by measured counts
    for n in args.sizes:
        t0 = time.perf_counter()
        prob = make_problem(n, args.m_over_n, args.lam, args.seed)
        # One untimed warm-up run, which also sizes the number of timed runs.
        t_one = median_time(lambda p=prob: solve_ridge(p.lam, p.X, p.y), 1)
        runs = runs_for(t_one, args.repeats, args.run_budget / 2)
        forward = median_time(lambda p=prob: solve_ridge(p.lam, p.X, p.y), runs)
        forwards[n] = forward
        print(f"n={n} (m={args.m_over_n * n}): forward {forward:.4g} s "
              f"(median of {runs}); setup {time.perf_counter() - t0:.1f} s", flush=True)
        new = bench_size(prob, forward, args, cg_iters)
        cg_iters = next((c.iterations for c in new
                         if c.solver == "CG" and c.source == "user" and c.iterations), cg_iters)
        cells.extend(new)
        del prob

    print()
    print(table(cells))
    print()
    print("Growth of the backward time with n:")
    print(growth(cells, forwards))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
