"""JAX backend: ridge hypergradient against the floor, jaxopt, optimistix and unrolled autodiff.

    python benchmarks/bench_jax.py             # the full run (about 3 minutes on 2 CPU cores)
    python benchmarks/bench_jax.py --quick     # a smoke run (about 20 s), used by a test

The problem. Ridge regression on a training set, its hyperparameter λ tuned on a validation set:

    x*(λ) = argmin ½‖Xx − y‖² + ½λ‖x‖²,   F(x, λ, X, y) = Xᵀ(Xx − y) + λx = 0,
    L(λ) = mean((X_v x*(λ) − y_v)²),

X, X_v ∈ ℝ^{200×100} with entries N(0, 1/200), y, y_v ~ N(0, 1), λ = 0.1, float64
(cond(XᵀX + λI) ≈ 15). The data are arguments of the jitted function, not closed-over
constants (XLA would fold those: XᵀX would be computed at compile time, not per call). What is
timed is `jax.jit(jax.value_and_grad(L))(λ, data)` and, for forward mode, `jax.jit` of
`jax.jvp(L, (λ,), (1,))`.

The contenders, all with the same forward solver (`jnp.linalg.solve` on the normal equations)
unless said otherwise:

- floor: plain autodiff through `jnp.linalg.solve` (it reuses the LU factors in the backward
  pass, so it is the cheapest possible hypergradient here);
- implicitdiff `custom_root` with `idf.CG()` (default rtol 1e-12), `idf.CG(rtol=1e-5)`
  (jaxopt's default tolerance), 1e-6, 1e-8 and 1e-10, `idf.Dense()`, `idf.Cholesky()`; CG and
  Dense with `on_failure="nan"`, which puts no host callback in the compiled code; and CG(rtol
  1e-5) traced with the failure checks declaring their callback's JAX effect, as they did
  before (any effect in a jaxpr sends every call of its `jax.jit` through JAX's Python dispatch
  path: finding 1 in docs/benchmarks.md);
- jaxopt `implicit_diff.custom_root` with `linear_solve.solve_cg` (jax.scipy CG, tol 1e-5) and
  with `linear_solve.solve_lu`;
- optimistix `root_find(..., optx.Newton(rtol=1e-10, atol=1e-10), adjoint=ImplicitAdjoint())`:
  its own forward solver (Newton, which materializes the Jacobian and factors it);
- unrolled: 300 steps of gradient descent with step 1/L (L = λ_max(XᵀX) + λ) in `lax.scan`,
  differentiated by autodiff.

How it is timed. Every function is compiled and called 3 times first. Then, for `--rounds`
rounds, every function is called once, in an order shuffled each round, each call timed on its
own from dispatch to `jax.block_until_ready`, with the garbage collector off. Times are the median
and the interquartile range (IQR) over the rounds. Ratios are the median over rounds of the
per-round ratio of two calls (paired: both ran within a millisecond of each other, so a load
spike from other processes hits both), which is robust on a shared, noisy machine. Relative
errors are against the floor's hypergradient (exact up to rounding).

Equal accuracy. For each peer (jaxopt CG, jaxopt LU, optimistix), the cheapest implicitdiff
setting with the default `on_failure` (the checks compiled in, loud) whose relative error of
dL/dλ is no larger than the peer's, up to rounding (1%, or 1e-15 absolute), with its time and
the paired ratio.

The price of a loud check (full run only). `jit(x ↦ 2x)` with one check that passes, by each
way of failing loudly under jit: implicitdiff's check now and as it was (declaring its effect),
its AOT-compiled form, `equinox.error_if`, `checkify` (error returned; thrown after each call),
a NaN-and-flag read on the host after each call, and an XLA FFI handler written with ctypes.

vmap. `jax.jit(jax.vmap(jax.grad(L), in_axes=(0, None)))` over 16 values of λ, run in a child
process under a watchdog: jaxlib's batched LAPACK kernels (LU, triangular solve) can deadlock the
CPU thread pool when two of them run at once on a machine with few cores (see the findings). A
function whose call stalls is reported as such and the others are timed again without it.

Memory. For 10, 100 and 1000 forward iterations (gradient descent; `lax.fori_loop` inside the
implicitdiff and jaxopt solvers, `lax.scan` for unrolled autodiff), the hypergradient function
`jax.jit(jax.grad(L))` is compiled (not run) and `compiled.memory_analysis()` is read:
`temp_size_in_bytes` (XLA's scratch buffers: where a scan keeps what its backward pass needs,
the number that must stay flat) and the total `argument_size_in_bytes + output_size_in_bytes +
temp_size_in_bytes - alias_size_in_bytes` (the data, 316 KiB, included). jaxlib 0.10 on CPU
also reports `peak_memory_in_bytes`, but it equals the argument size there and is not used.
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing as mp
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import implicitdiff as idf

jax.config.update("jax_enable_x64", True)

try:
    from jaxopt import implicit_diff as jaxopt_implicit
    from jaxopt import linear_solve as jaxopt_linear
except ImportError:  # pragma: no cover - optional
    jaxopt_implicit = jaxopt_linear = None
try:
    import optimistix as optx
except ImportError:  # pragma: no cover - optional
    optx = None

TAGS = {idf.symmetric, idf.positive_definite}
M_ROWS, N_FEATURES, LAM = 200, 100, 0.1
UNROLL_STEPS = 300
VMAP_BATCH = 16
ITERATIONS = (10, 100, 1000)

FLOOR = "floor: autodiff through jnp.linalg.solve"
IDF_CG = "implicitdiff CG (rtol 1e-12, default)"
IDF_CG5 = "implicitdiff CG (rtol 1e-5)"
IDF_CG_NAN = "implicitdiff CG, on_failure='nan'"
IDF_CG5_NAN = "implicitdiff CG (rtol 1e-5), on_failure='nan'"
IDF_CG5_EFFECT = "implicitdiff CG (rtol 1e-5), check declaring its effect (before)"
IDF_CG6 = "implicitdiff CG (rtol 1e-6)"
IDF_CG8 = "implicitdiff CG (rtol 1e-8)"
IDF_CG10 = "implicitdiff CG (rtol 1e-10)"
IDF_DENSE = "implicitdiff Dense"
IDF_DENSE_NAN = "implicitdiff Dense, on_failure='nan'"
IDF_CHOL = "implicitdiff Cholesky"
JAXOPT_CG = "jaxopt CG (solve_cg, tol 1e-5)"
JAXOPT_LU = "jaxopt LU (solve_lu)"
OPTX = "optimistix Newton + ImplicitAdjoint"
UNROLLED = f"unrolled GD, {UNROLL_STEPS} steps (lax.scan)"

QUICK = [FLOOR, IDF_CG, IDF_CG5, IDF_CG_NAN, IDF_DENSE, JAXOPT_CG, JAXOPT_LU, UNROLLED]
# Equal accuracy: for each peer, the cheapest of these (all with the default on_failure, so the
# failure checks are in the program and raise) whose gradient error is no larger than the peer's.
EQUAL_CANDIDATES = [IDF_CG5, IDF_CG6, IDF_CG8, IDF_CG10, IDF_CG, IDF_DENSE, IDF_CHOL]
EQUAL_PEERS = [JAXOPT_CG, JAXOPT_LU, OPTX]
ROUNDING = 1e-15
"""Relative gradient errors this close count as equal: rounding (about 5 ε in float64)."""
VMAP = [FLOOR, IDF_CG, IDF_CG5, IDF_CG_NAN, IDF_CG5_NAN, IDF_DENSE, IDF_DENSE_NAN, IDF_CHOL,
        JAXOPT_CG, JAXOPT_LU]
VMAP_QUICK = [FLOOR, IDF_CG, IDF_CG_NAN, JAXOPT_CG]

Data = tuple[Any, Any, Any, Any, Any]  # X, y, X_v, y_v, λ_max(XᵀX)


# ---- the problem -------------------------------------------------------------------------------

def F(x: Any, lam: Any, X: Any, y: Any) -> Any:
    """Ridge optimality condition: the gradient of ½‖Xx − y‖² + ½λ‖x‖²."""
    return X.T @ (X @ x - y) + lam * x


def F_L0(x: Any, lam: Any, X: Any, y: Any, L0: Any) -> Any:
    """F with the gradient-descent solvers' extra argument λ_max(XᵀX), which it ignores."""
    return F(x, lam, X, y)


def ridge_solve(lam: Any, X: Any, y: Any) -> Any:
    """The forward solver shared by the floor, implicitdiff and jaxopt: normal equations, LU."""
    n = X.shape[1]
    return jnp.linalg.solve(X.T @ X + lam * jnp.eye(n, dtype=X.dtype), X.T @ y)


def make_data(seed: int = 0, m: int = M_ROWS, n: int = N_FEATURES) -> Data:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, n)) / np.sqrt(m)
    Xv = rng.standard_normal((m, n)) / np.sqrt(m)
    y, yv = rng.standard_normal(m), rng.standard_normal(m)
    L0 = float(np.linalg.eigvalsh(X.T @ X)[-1])
    return (jnp.asarray(X), jnp.asarray(y), jnp.asarray(Xv), jnp.asarray(yv),
            jnp.asarray(L0))


def val_loss_with(solver: Callable[..., Any]) -> Callable[[Any, Data], Any]:
    """L(λ, data) for a solver `solver(lam, X, y, L0) -> x*`."""

    def val_loss(lam: Any, data: Data) -> Any:
        X, y, Xv, yv, L0 = data
        x = solver(lam, X, y, L0)
        return jnp.mean((Xv @ x - yv) ** 2)

    return val_loss


# ---- the contenders: solver(lam, X, y, L0) -> x* -----------------------------------------------

def _drop_L0(solver: Callable[..., Any]) -> Callable[..., Any]:
    return lambda lam, X, y, L0: solver(lam, X, y)


def idf_solver(solve: idf.AbstractLinearSolver, **kw: Any) -> Callable[..., Any]:
    return _drop_L0(idf.custom_root(F, solve=solve, tags=TAGS, **kw)(ridge_solve))


def with_effect(solver: Callable[..., Any]) -> Callable[..., Any]:
    """`solver` traced with the failure checks declaring their callback's JAX effect, as before
    (`implicitdiff_jax._backend.DECLARE_EFFECT`): the program loses jit's C++ fast dispatch."""
    from implicitdiff_jax import _backend as jb

    def solve(*args: Any) -> Any:
        jb.DECLARE_EFFECT = True
        try:
            return solver(*args)
        finally:
            jb.DECLARE_EFFECT = False

    return solve


def jaxopt_solver(solve: Callable[..., Any]) -> Callable[..., Any]:
    # jaxopt's decorated solver takes init_params first (never differentiated).
    fn = jaxopt_implicit.custom_root(F, solve=solve)(
        lambda init, lam, X, y: ridge_solve(lam, X, y))
    return lambda lam, X, y, L0: fn(None, lam, X, y)


def optx_solver(lam: Any, X: Any, y: Any, L0: Any) -> Any:
    sol = optx.root_find(lambda x, a: F(x, *a), optx.Newton(rtol=1e-10, atol=1e-10),
                         jnp.zeros(X.shape[1], X.dtype), (lam, X, y),
                         adjoint=optx.ImplicitAdjoint(), max_steps=64)
    return sol.value


def gd_step(lam: Any, L0: Any) -> Any:
    # 1/L with L = λ_max(XᵀX) + λ: the step is a solver setting, not differentiated.
    return 1.0 / (L0 + lax.stop_gradient(lam))


def unrolled_solver(steps: int) -> Callable[..., Any]:
    """Gradient descent in `lax.scan`, differentiated through by autodiff."""

    def solve(lam: Any, X: Any, y: Any, L0: Any) -> Any:
        eta = gd_step(lam, L0)

        def body(x: Any, _: Any) -> tuple[Any, None]:
            return x - eta * F(x, lam, X, y), None

        x, _ = lax.scan(body, jnp.zeros(X.shape[1], X.dtype), None, length=steps)
        return x

    return solve


def fori_gd(steps: int) -> Callable[..., Any]:
    """Gradient descent in `lax.fori_loop`: the forward solver of the implicit methods in the
    memory sweep (never differentiated through, so nothing is stored per iteration)."""

    def solve(lam: Any, X: Any, y: Any, L0: Any) -> Any:
        eta = gd_step(lam, L0)
        return lax.fori_loop(0, steps, lambda i, x: x - eta * F(x, lam, X, y),
                             jnp.zeros(X.shape[1], X.dtype))

    return solve


def idf_fori(k: int, solve: idf.AbstractLinearSolver) -> Callable[..., Any]:
    # residual_tol=inf: 10 steps of GD do not converge; only memory is looked at here.
    return idf.custom_root(F_L0, solve=solve, tags=TAGS, residual_tol=math.inf)(fori_gd(k))


def jaxopt_fori(k: int) -> Callable[..., Any]:
    gd = fori_gd(k)
    fn = jaxopt_implicit.custom_root(F_L0, solve=jaxopt_linear.solve_cg)(
        lambda init, lam, X, y, L0: gd(lam, X, y, L0))
    return lambda lam, X, y, L0: fn(None, lam, X, y, L0)


def contenders(names: list[str] | None = None) -> dict[str, Callable[..., Any]]:
    """name -> solver(lam, X, y, L0), for the libraries that are installed."""
    makers: dict[str, Callable[[], Callable[..., Any]]] = {
        FLOOR: lambda: _drop_L0(ridge_solve),
        IDF_CG: lambda: idf_solver(idf.CG()),
        IDF_CG5: lambda: idf_solver(idf.CG(rtol=1e-5)),
        IDF_CG_NAN: lambda: idf_solver(idf.CG(), on_failure="nan"),
        IDF_CG5_NAN: lambda: idf_solver(idf.CG(rtol=1e-5), on_failure="nan"),
        IDF_CG5_EFFECT: lambda: with_effect(idf_solver(idf.CG(rtol=1e-5))),
        IDF_CG6: lambda: idf_solver(idf.CG(rtol=1e-6)),
        IDF_CG8: lambda: idf_solver(idf.CG(rtol=1e-8)),
        IDF_CG10: lambda: idf_solver(idf.CG(rtol=1e-10)),
        IDF_DENSE: lambda: idf_solver(idf.Dense()),
        IDF_DENSE_NAN: lambda: idf_solver(idf.Dense(), on_failure="nan"),
        IDF_CHOL: lambda: idf_solver(idf.Cholesky()),
    }
    if jaxopt_implicit is not None:
        makers[JAXOPT_CG] = lambda: jaxopt_solver(jaxopt_linear.solve_cg)
        makers[JAXOPT_LU] = lambda: jaxopt_solver(jaxopt_linear.solve_lu)
    if optx is not None:
        makers[OPTX] = lambda: optx_solver
    makers[UNROLLED] = lambda: unrolled_solver(UNROLL_STEPS)
    wanted = list(makers) if names is None else [n for n in names if n in makers]
    return {n: makers[n]() for n in wanted}


# ---- timing ------------------------------------------------------------------------------------

def time_interleaved(fns: dict[str, Callable[..., Any]], args: tuple, rounds: int,
                     seed: int = 0, warmup: int = 3,
                     before_call: Callable[[str], None] | None = None
                     ) -> dict[str, np.ndarray]:
    """Per-call wall times (s), `rounds` per function, calls interleaved in a shuffled order."""
    for k, f in fns.items():
        for _ in range(warmup):
            if before_call is not None:
                before_call(k)
            jax.block_until_ready(f(*args))
    rnd = random.Random(seed)
    names = list(fns)
    times = {k: np.empty(rounds) for k in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            rnd.shuffle(names)
            for k in names:
                f = fns[k]
                if before_call is not None:
                    before_call(k)
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[k][r] = time.perf_counter() - t0
    finally:
        if gc_was:
            gc.enable()
    return times


def median_iqr(t: np.ndarray) -> tuple[float, float]:
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return float(med), float(q3 - q1)


def paired_ratio(times: dict[Any, np.ndarray], a: Any, b: Any) -> float | None:
    """Median over rounds of time(a) / time(b), both measured in the same round."""
    if a not in times or b not in times:
        return None
    return float(np.median(times[a] / times[b]))


def first_call(f: Callable[..., Any], args: tuple) -> tuple[float, Any]:
    """Seconds for the first call (trace, compile, run) and its output."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    return time.perf_counter() - t0, out


def rel_err(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


# ---- formatting --------------------------------------------------------------------------------

def fmt_us(s: float) -> str:
    return f"{s * 1e6:,.0f}"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None or not math.isfinite(r) else f"{r:.2f}×"


def fmt_err(e: float | None) -> str:
    if e is None:
        return "—"
    return "0 (exact)" if e == 0 else f"{e:.1e}"


def fmt_bytes(b: float) -> str:
    return f"{b / 1024:,.1f} KiB" if b < 1024 ** 2 else f"{b / 1024 ** 2:,.2f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---- one λ: reverse and forward mode -----------------------------------------------------------

def bench_single(data: Data, rounds: int, names: list[str] | None) -> dict[str, Any]:
    """Reverse and forward mode at one λ, every contender, all in one interleaved group."""
    lam = jnp.asarray(LAM)
    solvers = contenders(names)
    rev: dict[str, Callable[..., Any]] = {}
    fwd: dict[str, Callable[..., Any]] = {}
    for name, s in solvers.items():
        L = val_loss_with(s)
        rev[name] = jax.jit(jax.value_and_grad(L))

        def jvp(lam_: Any, data_: Data, L: Callable[..., Any] = L) -> Any:
            return jax.jvp(lambda l_: L(l_, data_), (lam_,), (jnp.ones_like(lam_),))

        fwd[name] = jax.jit(jvp)

    compile_s, grads, tangents, unsupported = {}, {}, {}, {}
    for name in list(rev):
        compile_s[name], (_, grads[name]) = first_call(rev[name], (lam, data))
        try:
            _, (_, tangents[name]) = first_call(fwd[name], (lam, data))
        except TypeError as e:  # jaxopt: custom_vjp functions have no forward mode
            unsupported[name] = f"TypeError: {str(e).splitlines()[0][:60]}"
            del fwd[name]

    flat = {f"rev|{k}": f for k, f in rev.items()} | {f"fwd|{k}": f for k, f in fwd.items()}
    t = {tuple(k.split("|", 1)): v
         for k, v in time_interleaved(flat, (lam, data), rounds).items()}
    g_ref, tan_ref = grads[FLOOR], tangents.get(FLOOR)

    rows = []
    for name in rev:
        med, iqr = median_iqr(t[("rev", name)])
        rows.append([
            name, fmt_us(med), fmt_us(iqr),
            fmt_ratio(paired_ratio(t, ("rev", name), ("rev", FLOOR))),
            fmt_ratio(paired_ratio(t, ("rev", name), ("rev", JAXOPT_CG))),
            fmt_ratio(paired_ratio(t, ("rev", name), ("rev", JAXOPT_LU))),
            fmt_err(rel_err(grads[name], g_ref)), f"{compile_s[name]:.2f}",
        ])
    rev_table = table(["method", "median (µs)", "IQR (µs)", "/ floor", "/ jaxopt CG",
                       "/ jaxopt LU", "rel. error of dL/dλ", "first call (s)"], rows)
    rows = []
    for name in rev:
        if name in unsupported:
            rows.append([name, "not supported", "", "", "", f"jax.jvp raises {unsupported[name]}"])
            continue
        med, iqr = median_iqr(t[("fwd", name)])
        rows.append([name, fmt_us(med), fmt_us(iqr),
                     fmt_ratio(paired_ratio(t, ("fwd", name), ("rev", name))),
                     fmt_ratio(paired_ratio(t, ("fwd", name), ("fwd", FLOOR))),
                     fmt_err(rel_err(tangents[name], tan_ref))])
    fwd_table = table(["method", "jvp median (µs)", "IQR (µs)", "jvp / own reverse",
                       "/ floor's jvp", "rel. error of dL/dλ"], rows)
    return dict(rev_table=rev_table, fwd_table=fwd_table, times=t, grads=grads, g_ref=g_ref)


# ---- equal accuracy ----------------------------------------------------------------------------

def no_less_accurate(err: float, peer_err: float) -> bool:
    """`err` no larger than `peer_err`, up to rounding (1%, or `ROUNDING` absolute)."""
    return err <= peer_err * 1.01 + ROUNDING


def equal_accuracy(times: dict[Any, np.ndarray], errors: dict[str, float],
                   candidates: list[str], peers: list[str], key: Callable[[str], Any] = str
                   ) -> tuple[str, list[dict[str, Any]]]:
    """For each peer: the cheapest candidate (paired ratio against the peer) whose gradient
    error is no larger than the peer's. `key(name)` is the name's key in `times`. Returns the
    table and its rows as dicts (peer, their time and error, ours, our time and error, ratio)."""
    rows, out = [], []
    for peer in peers:
        if key(peer) not in times or peer not in errors:
            continue
        pe = errors[peer]
        ok = [c for c in candidates
              if key(c) in times and c in errors and no_less_accurate(errors[c], pe)]
        p_med = median_iqr(times[key(peer)])[0]
        if not ok:
            rows.append([peer, fmt_us(p_med), fmt_err(pe), "none as accurate", "", "", "—"])
            out.append(dict(peer=peer, ratio=None))
            continue
        best = min(ok, key=lambda c: paired_ratio(times, key(c), key(peer)) or math.inf)
        r = paired_ratio(times, key(best), key(peer))
        rows.append([peer, fmt_us(p_med), fmt_err(pe), best,
                     fmt_us(median_iqr(times[key(best)])[0]), fmt_err(errors[best]),
                     fmt_ratio(r)])
        out.append(dict(peer=peer, ours=best, ratio=r, peer_err=pe, err=errors[best]))
    return table(["peer", "peer (µs)", "peer's rel. error", "cheapest implicitdiff setting "
                  "as accurate", "ours (µs)", "our rel. error", "ours / peer"], rows), out


# ---- what a loud check costs under jit ----------------------------------------------------------

def _ffi_check() -> Callable[[Any, Any], Any] | None:
    """`check(ok, data)`: a runtime error raised by an XLA FFI handler (a ctypes function, no
    host callback of JAX's) inside a never-taken `lax.cond`, or None where it cannot be set up.
    A measured alternative to the callback, not what implicitdiff uses: it needs the XLA FFI C
    structures spelled out in ctypes (below, for XLA FFI API 0.x), and runs on CPU only."""
    import ctypes as c

    ffi = getattr(jax, "ffi", None)
    if ffi is None or not hasattr(ffi, "pycapsule"):
        return None
    from jax.extend.core import Primitive
    from jax.interpreters import mlir
    from jax.interpreters import partial_eval as pe

    class Ext(c.Structure):
        _fields_ = [("struct_size", c.c_size_t), ("type", c.c_int), ("next", c.c_void_p)]

    class Version(c.Structure):
        _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.c_void_p),
                    ("major", c.c_int), ("minor", c.c_int)]

    class Metadata(c.Structure):
        _fields_ = [("struct_size", c.c_size_t), ("api_version", Version),
                    ("traits", c.c_uint32), ("state_type_id", c.c_int64)]

    class MetadataExt(c.Structure):
        _fields_ = [("base", Ext), ("metadata", c.POINTER(Metadata))]

    class ErrorArgs(c.Structure):
        _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.c_void_p),
                    ("message", c.c_char_p), ("errc", c.c_int)]

    class Api(c.Structure):
        _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.c_void_p),
                    ("api_version", Version), ("internal_api", c.c_void_p),
                    ("error_create", c.CFUNCTYPE(c.c_void_p, c.POINTER(ErrorArgs)))]

    class Frame(c.Structure):
        _fields_ = [("struct_size", c.c_size_t), ("extension_start", c.POINTER(Ext)),
                    ("api", c.POINTER(Api))]

    def handler(frame_p: Any) -> Any:
        fr = frame_p.contents
        if fr.extension_start and fr.extension_start.contents.type == 1:  # metadata query
            md = c.cast(fr.extension_start, c.POINTER(MetadataExt)).contents.metadata.contents
            md.api_version.struct_size = c.sizeof(Version)
            md.api_version.major, md.api_version.minor = 0, 1
            return None
        args = ErrorArgs(c.sizeof(ErrorArgs), None, b"check failed", 9)
        return fr.api.contents.error_create(c.byref(args))

    keep = c.CFUNCTYPE(c.c_void_p, c.POINTER(Frame))(handler)
    try:
        ffi.register_ffi_target("bench_failure_check", ffi.pycapsule(keep), platform="cpu")
    except Exception:  # pragma: no cover - depends on the jaxlib
        return None
    call_p, check_p = Primitive("bench_ffi_fail"), Primitive("bench_ffi_check")
    for p in (call_p, check_p):
        p.multiple_results = True
        p.def_abstract_eval(lambda *a, **k: [])
        pe.dce_rules[p] = lambda used, eqn: ([True] * len(eqn.invars), eqn)
    check_p.def_impl(lambda ok, *d: [])
    mlir.register_lowering(call_p, ffi.ffi_lowering("bench_failure_check",
                                                    has_side_effect=True))

    def fail(*d: Any) -> None:
        call_p.bind(*d)

    def lowered(ok: Any, *d: Any) -> list:
        lax.cond(jnp.all(ok), lambda *_: None, fail, *d)
        return []

    mlir.register_lowering(check_p, mlir.lower_fun(lowered, multiple_results=True))

    def check(ok: Any, data: Any) -> Any:
        check_p.bind(ok, data)
        return data

    check.keep = keep  # type: ignore[attr-defined]  # the ctypes function must stay alive
    return check


def bench_failure_modes(rounds: int) -> dict[str, Any]:
    """Per-call time of `jit(x ↦ 2x)` with one check `all(2x < 10)` (it passes) by each way of
    failing loudly under jit, and whether it is loud (raises when the check fails)."""
    import equinox as eqx
    from jax.experimental import checkify

    from implicitdiff_jax import _backend as jb

    def plain(x: Any) -> Any:
        return 2 * x

    def report(ok: Any, *d: Any) -> None:
        if not np.all(ok):
            raise ValueError("check failed")

    def ours(x: Any) -> Any:
        y = 2 * x
        jb._failure_check(report)(jnp.all(y < 10), y)
        return y

    def with_effect(x: Any) -> Any:
        jb.DECLARE_EFFECT = True
        try:
            return ours(x)
        finally:
            jb.DECLARE_EFFECT = False

    def equinox(x: Any) -> Any:
        y = 2 * x
        return eqx.error_if(y, jnp.any(y >= 10), "check failed")

    def checkified(x: Any) -> Any:
        y = 2 * x
        checkify.check(jnp.all(y < 10), "check failed")
        return y

    def flagged(x: Any) -> Any:
        y = 2 * x
        ok = jnp.all(y < 10)
        return jnp.where(ok, y, jnp.nan), ok

    ck, fl = jax.jit(checkify.checkify(checkified)), jax.jit(flagged)

    def checkify_throw(x: Any) -> Any:
        err, y = ck(x)
        err.throw()  # reads the error flag on the host: waits for the result
        return y

    def flag_raise(x: Any) -> Any:
        y, ok = fl(x)
        if not bool(ok):  # the boundary: a host read of the flag, then raise
            raise ValueError("check failed")
        return y

    x = jnp.ones(100)
    aot = jax.jit(ours).lower(x).compile()
    fns: dict[str, Callable[..., Any]] = {
        "no check": jax.jit(plain),
        "implicitdiff's check: cond + debug callback, no JAX effect (now)": jax.jit(ours),
        "the same check declaring the callback's effect (before)": jax.jit(with_effect),
        "the same check (now), AOT: jit(f).lower(x).compile()": aot,
        "equinox.error_if (pure_callback in a cond)": jax.jit(equinox),
        "checkify.checkify, error returned (not raised)": ck,
        "checkify.checkify + err.throw() after each call": checkify_throw,
        "NaN + flag, flag read on the host after each call": flag_raise,
    }
    ffi_check = _ffi_check()
    if ffi_check is not None:
        fns["XLA FFI handler (ctypes) in a cond, no host callback"] = jax.jit(
            lambda x: ffi_check(jnp.all(2 * x < 10), 2 * x))
    t = time_interleaved(fns, (x,), rounds)
    loud = {}
    for name, f in fns.items():  # does it raise when the check fails?
        if name == "no check":
            loud[name] = "—"
            continue
        try:
            if name.startswith("the same check (now), AOT"):
                out = jax.jit(ours).lower(x).compile()(x * 10)
            else:
                out = f(x * 10)
            jax.block_until_ready(out)
            loud[name] = "no: returns the error" if "returned" in name else "no"
        except Exception:
            loud[name] = "yes"
    rows = [[name, fmt_us(median_iqr(t[name])[0]),
             fmt_ratio(paired_ratio(t, name, "no check")), loud[name]] for name in fns]
    return dict(table=table(["mechanism", "median (µs)", "/ no check", "raises on failure"],
                            rows), times=t)


# The ablation's steps (also bench_lasso.py's): a label, the linear solver's options and the
# implicit function's options, each step dropping one more check the defaults promise.
ABLATION_STEPS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("defaults", {}, {}),
    ("check_singular=False", {"check_singular": False}, {}),
    ("+ kink_probe=False", {"check_singular": False}, {"kink_probe": False}),
    ("+ residual_tol=inf", {"check_singular": False},
     {"kink_probe": False, "residual_tol": math.inf})]


def bench_ablation(data: Data, rounds: int) -> str:
    """Where the rest of the gap to jaxopt goes: CG(rtol=1e-5) and Dense with the default
    `on_failure`, then without the linear solver's uniqueness probe (`check_singular=False`),
    then also without the kink probe, then also without the forward residual check. Each step
    drops a check the defaults promise; none of these settings is a recommendation."""
    lam = jnp.asarray(LAM)
    solvers: dict[str, Callable[..., Any]] = {}
    makers: list[tuple[str, Callable[..., Any]]] = [
        ("CG(rtol=1e-5)", lambda **k: idf.CG(rtol=1e-5, **k)),
        ("Dense()", lambda **k: idf.Dense(**k))]
    for label, make in makers:
        for what, skw, kw in ABLATION_STEPS:
            solvers[f"{label}, {what}"] = idf_solver(make(**skw), **kw)
    solvers.update(contenders([JAXOPT_CG, JAXOPT_LU]))
    fns = {k: jax.jit(jax.value_and_grad(val_loss_with(s))) for k, s in solvers.items()}
    t = time_interleaved(fns, (lam, data), rounds)
    rows = [[k, fmt_us(median_iqr(t[k])[0]), fmt_ratio(paired_ratio(t, k, JAXOPT_CG)),
             fmt_ratio(paired_ratio(t, k, JAXOPT_LU))] for k in fns]
    return table(["implicitdiff, default on_failure", "median (µs)", "/ jaxopt CG",
                  "/ jaxopt LU"], rows)


# ---- vmap, in a child process under a watchdog -------------------------------------------------

def _vmap_child(names: list[str], rounds: int, seed: int, current: Any, beat: Any,
                conn: Any) -> None:
    """Compile and time jit(vmap(grad)) for `names`; report through `conn`. `current` holds the
    index of the function being called, `beat` counts calls (the parent's watchdog reads both)."""
    data = make_data(seed)
    lams = jnp.asarray(np.geomspace(0.01, 10.0, VMAP_BATCH))
    solvers = contenders(names)
    index = {k: i for i, k in enumerate(names)}

    def before(k: str) -> None:
        current.value = index[k]
        beat.value += 1

    fns, compile_s, grads = {}, {}, {}
    for k, s in solvers.items():
        fns[k] = jax.jit(jax.vmap(jax.grad(val_loss_with(s)), in_axes=(0, None)))
        before(k)
        compile_s[k], g = first_call(fns[k], (lams, data))
        grads[k] = np.asarray(g)
    times = time_interleaved(fns, (lams, data), rounds, seed=1, before_call=before)
    conn.send(dict(times=times, compile_s=compile_s, grads=grads))
    conn.close()


def run_vmap(names: list[str], rounds: int, seed: int, stall_s: float = 15.0,
             attempts: int = 4) -> dict[str, Any]:
    """`_vmap_child` in a fresh process; a function whose call makes no progress for `stall_s`
    seconds is recorded as stalled, the child killed, and the rest timed again without it."""
    ctx = mp.get_context("spawn")
    stalled: list[str] = []
    names = [n for n in names if n in contenders(names)]
    for _ in range(attempts):
        current, beat = ctx.Value("i", -1), ctx.Value("l", 0)
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_vmap_child, args=(names, rounds, seed, current, beat, child),
                           daemon=True)
        proc.start()
        child.close()
        last, last_change = -1, time.monotonic()
        while True:
            if parent.poll(0.5):
                out = parent.recv()
                proc.join(30)
                return dict(out, stalled=stalled)
            if not proc.is_alive():
                raise RuntimeError(f"the vmap benchmark process died (exit code {proc.exitcode})")
            if beat.value != last:
                last, last_change = beat.value, time.monotonic()
            elif time.monotonic() - last_change > stall_s and current.value >= 0:
                culprit = names[current.value]
                proc.kill()
                proc.join()
                stalled.append(culprit)
                names = [n for n in names if n != culprit]
                print(f"  [vmap] a call of {culprit!r} made no progress for {stall_s:.0f} s: "
                      "killed; timing the others again without it", file=sys.stderr)
                break
    raise RuntimeError(f"the vmap benchmark stalled {attempts} times: {stalled}")


def bench_vmap(names: list[str], rounds: int, seed: int) -> dict[str, Any]:
    out = run_vmap(names, rounds, seed)
    t, grads, compile_s = out["times"], out["grads"], out["compile_s"]
    rows = []
    for k in [*t, *out["stalled"]]:
        if k in out["stalled"]:
            rows.append([k, "stalled", "", "", "", "", "", "jaxlib deadlock, see findings"])
            continue
        med, iqr = median_iqr(t[k])
        rows.append([k, fmt_us(med), fmt_us(iqr), fmt_ratio(paired_ratio(t, k, FLOOR)),
                     fmt_ratio(paired_ratio(t, k, JAXOPT_CG)),
                     fmt_ratio(paired_ratio(t, k, JAXOPT_LU)),
                     fmt_err(rel_err(grads[k], grads[FLOOR])), f"{compile_s[k]:.2f}"])
    return dict(out, table=table(["method", "median (µs)", "IQR (µs)", "/ floor", "/ jaxopt CG",
                                  "/ jaxopt LU", "max rel. error", "first call (s)"], rows))


# ---- memory against forward iterations ---------------------------------------------------------

def bench_memory(data: Data, iterations: tuple[int, ...]) -> dict[str, Any]:
    lam = jnp.asarray(LAM)
    methods: dict[str, Callable[[int], Callable[..., Any]]] = {
        "implicitdiff CG, GD in fori_loop": lambda k: idf_fori(k, idf.CG()),
        "implicitdiff Dense, GD in fori_loop": lambda k: idf_fori(k, idf.Dense()),
    }
    if jaxopt_implicit is not None:
        methods["jaxopt CG, GD in fori_loop"] = jaxopt_fori
    methods["unrolled: GD in lax.scan, autodiff"] = unrolled_solver
    stats: dict[str, dict[int, Any]] = {}
    for name, make in methods.items():
        stats[name] = {}
        for k in iterations:
            g = jax.jit(jax.grad(val_loss_with(make(k))))
            stats[name][k] = g.lower(lam, data).compile().memory_analysis()

    def total(st: Any) -> float:
        # What XLA allocates for one call: arguments, outputs and scratch, less what is shared.
        return float(st.argument_size_in_bytes + st.output_size_in_bytes
                     + st.temp_size_in_bytes - st.alias_size_in_bytes)

    rows, growth = [], {}
    for name in methods:
        temp = [float(stats[name][k].temp_size_in_bytes) for k in iterations]
        tot = [total(stats[name][k]) for k in iterations]
        growth[name] = temp[-1] / temp[0]
        rows.append([name, *[fmt_bytes(b) for b in temp], f"{growth[name]:.2f}×",
                     *[fmt_bytes(b) for b in tot], f"{tot[-1] / tot[0]:.2f}×"])
    last, first = iterations[-1], iterations[0]
    hdr = (["forward solver → hypergradient"] + [f"temp, {k} it." for k in iterations]
           + [f"temp {last} / {first}"] + [f"total, {k} it." for k in iterations]
           + [f"total {last} / {first}"])
    return dict(table=table(hdr, rows), growth=growth)


# ---- targets -----------------------------------------------------------------------------------

def targets(single: dict[str, Any], mem: dict[str, Any], iterations: tuple[int, ...]
            ) -> tuple[str, list[tuple[str, bool | None]]]:
    t, grads, g_ref = single["times"], single["grads"], single["g_ref"]
    out: list[tuple[str, str, bool | None]] = []

    def ratio_target(what: str, a: tuple[str, str], b: tuple[str, str], bound: float,
                     at_most: bool = True) -> None:
        v = paired_ratio(t, a, b)
        ok = None if v is None else (v <= bound if at_most else v >= bound)
        out.append((what, fmt_ratio(v), ok))

    for row in single.get("equal", []):
        if row["peer"] in (JAXOPT_CG, JAXOPT_LU):
            v = row["ratio"]
            out.append((f"at equal gradient error, default on_failure: ≤ 1.0× {row['peer']}",
                        fmt_ratio(v) + (f" ({row['ours']})" if v is not None else ""),
                        None if v is None else v <= 1.0))
    ratio_target("implicitdiff CG (default rtol 1e-12) ≤ 1.0× jaxopt CG",
                 ("rev", IDF_CG), ("rev", JAXOPT_CG), 1.0)
    ratio_target("  at jaxopt's tolerance: implicitdiff CG(rtol=1e-5) ≤ 1.0× jaxopt CG",
                 ("rev", IDF_CG5), ("rev", JAXOPT_CG), 1.0)
    ratio_target("  at jaxopt's tolerance, without host callbacks (on_failure='nan')",
                 ("rev", IDF_CG5_NAN), ("rev", JAXOPT_CG), 1.0)
    ratio_target("implicitdiff CG within 1.15× of the floor", ("rev", IDF_CG), ("rev", FLOOR),
                 1.15)
    ratio_target("  best implicitdiff CG variant: rtol 1e-5, on_failure='nan'",
                 ("rev", IDF_CG5_NAN), ("rev", FLOOR), 1.15)
    ratio_target("implicitdiff Dense ≤ 1.0× jaxopt LU", ("rev", IDF_DENSE), ("rev", JAXOPT_LU),
                 1.0)
    ratio_target("  without host callbacks (on_failure='nan')", ("rev", IDF_DENSE_NAN),
                 ("rev", JAXOPT_LU), 1.0)
    ratio_target(f"implicitdiff CG ≥ 10× faster than unrolled ({UNROLL_STEPS} steps)",
                 ("rev", UNROLLED), ("rev", IDF_CG), 10.0, at_most=False)
    ratio_target(f"  for scale, the floor's speed-up over unrolled ({UNROLL_STEPS} steps)",
                 ("rev", UNROLLED), ("rev", FLOOR), 10.0, at_most=False)
    ratio_target("forward mode (jvp) ≤ 1.5× reverse mode, implicitdiff CG",
                 ("fwd", IDF_CG), ("rev", IDF_CG), 1.5)
    ratio_target("forward mode (jvp) ≤ 1.5× reverse mode, implicitdiff Dense",
                 ("fwd", IDF_DENSE), ("rev", IDF_DENSE), 1.5)
    if IDF_CG in grads:
        e = rel_err(grads[IDF_CG], g_ref)
        out.append(("implicitdiff CG: ≥ 10 correct digits (rel. error ≤ 1e-10)", fmt_err(e),
                    e <= 1e-10))
    if JAXOPT_CG in grads:
        out.append(("  for comparison, jaxopt CG's rel. error (about 6 digits expected)",
                    fmt_err(rel_err(grads[JAXOPT_CG], g_ref)), None))
    for name, g in mem["growth"].items():
        first, last = iterations[0], iterations[-1]
        if name.startswith("implicitdiff"):
            out.append((f"{name}: scratch memory flat from {first} to {last} iterations",
                        f"{g:.2f}×", g <= 1.01))
        elif name.startswith("unrolled"):
            out.append((f"{name}: scratch memory grows from {first} to {last} iterations",
                        f"{g:.2f}×", g > 2.0))
    # Indented rows are diagnostics (what the number is with one handicap removed), not targets
    # of the issue: their bound is shown but they are not counted.
    def status(what: str, ok: bool | None) -> str:
        if ok is None:
            return "—"
        if what.startswith("  "):
            return "(diagnostic: within bound)" if ok else "(diagnostic: outside bound)"
        return "met" if ok else "**missed**"

    rows = [[("↳ " + what.strip()) if what.startswith("  ") else what, val, status(what, ok)]
            for what, val, ok in out]
    counted = [(w, ok) for w, _, ok in out if not w.startswith("  ")]
    return table(["target", "measured", "status"], rows), counted


# ---- main --------------------------------------------------------------------------------------

def environment(packages: tuple[str, ...] = ("jaxopt", "optimistix")) -> str:
    """One line: JAX, its device, implicitdiff, the compared `packages`, Python and the load."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(mod: str) -> str:
        try:
            return version(mod)
        except PackageNotFoundError:
            return "not installed"

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    dev = jax.devices()[0]
    return (f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), implicitdiff "
            f"{idf.__version__}, {', '.join(f'{p} {ver(p)}' for p in packages)}; "
            f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPU "
            f"cores, load average {load:.1f} at start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: fewer contenders and rounds (about 20 s)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed calls per function (default 400; --quick 20)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rounds = args.rounds or (20 if args.quick else 400)
    names = QUICK if args.quick else None
    t_start = time.perf_counter()

    data = make_data(args.seed)
    print(f"# JAX: ridge hypergradient{' (--quick)' if args.quick else ''}\n\n{environment()}.\n")
    print(f"X, X_v ∈ ℝ^{{{M_ROWS}×{N_FEATURES}}}, λ = {LAM}, float64; {rounds} timed calls per "
          "function, interleaved; ratios are medians of per-round paired ratios.\n")

    single = bench_single(data, rounds, names)
    print("## Reverse mode: jit(value_and_grad(L))\n")
    print(single["rev_table"] + "\n")
    errors = {k: rel_err(g, single["g_ref"]) for k, g in single["grads"].items()}
    eq_table, single["equal"] = equal_accuracy(single["times"], errors, EQUAL_CANDIDATES,
                                               EQUAL_PEERS, key=lambda k: ("rev", k))
    print("## At equal gradient error: jit(value_and_grad(L))\n")
    print("For each peer, the cheapest implicitdiff setting (default on_failure='raise': the "
          "checks are in the program) whose relative error of dL/dλ is no larger than the "
          f"peer's (up to rounding: 1%, or {ROUNDING:g}).\n")
    print(eq_table + "\n")
    print("## Forward mode: jit(jvp(L))\n")
    print(single["fwd_table"] + "\n")

    vm = bench_vmap(VMAP_QUICK if args.quick else VMAP, max(rounds // 2, 10), args.seed)
    print(f"## jit(vmap(grad(L))) over {VMAP_BATCH} values of λ\n")
    print(vm["table"] + "\n")

    if not args.quick:
        fm = bench_failure_modes(max(rounds * 5, 200))
        print("## What a loud check costs under jit: jit(x ↦ 2x), x ∈ ℝ¹⁰⁰, one check\n")
        print(fm["table"] + "\n")
        print("## Where the rest of the gap goes: checks removed one by one (ablation)\n")
        print(bench_ablation(data, rounds) + "\n")

    mem = bench_memory(data, ITERATIONS)
    print("## Compiled memory of jit(grad(L)) against forward iterations\n")
    print(mem["table"] + "\n")

    tgt_table, status = targets(single, mem, ITERATIONS)
    print("## Targets\n")
    print(tgt_table + "\n")
    missed = [w.strip() for w, ok in status if ok is False]
    print(f"{sum(ok is True for _, ok in status)} target(s) met, {len(missed)} missed"
          f"{': ' + '; '.join(missed) if missed else ''}. "
          f"Total run time {time.perf_counter() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
