"""QP layers: `idf.qp.solve_qp` (PyTorch and JAX) against qpth, cvxpylayers (PyTorch and JAX),
qpax and proxsuite's QPLayer: forward and forward + backward time, gradient error, layer
construction time and memory against solver iterations.

    bash benchmarks/install_qp_peers.sh            # the peers (qpth needs a patched sdist)
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/bench_qp.py
                                                   # n = 10, 50, 100, 200; float64 and float32
                                                   # (about 12 minutes on 2 cores)
    python benchmarks/bench_qp.py --quick          # smoke run: n = 10, 50, few repeats
    python benchmarks/bench_qp.py --n 100 --dtype float64
    python benchmarks/bench_qp.py --profile 100    # where implicitdiff's torch time goes
    python benchmarks/bench_qp.py --eq-tols        # without the equal-accuracy settings

Single-threaded BLAS and torch (the variables above, read at import) are what docs/benchmarks.md
reports: on a shared 2-core machine, spinning OpenMP/BLAS threads made multi-threaded timings
swing 10-50x between rounds.

The problems. A batch of `--batch` (32) random dense QPs per size n,

    min ½xᵀQx + qᵀx   s.t.   Ax = b,  Gx ≤ h,

with m = n inequalities and p = n/4 equalities: Q = LLᵀ + 0.1 I (L n×n Gaussian / √n), q
Gaussian, A and G Gaussian / √n (A has full row rank with probability one; its smallest singular
value is printed), a point x0 Gaussian, b = A x0 and h = G x0 + s with slack s uniform on
[0, 1], so x0 is strictly feasible and every problem has a unique solution. Every input is
batched (a different Q, q, A, b, G, h per sample). The loss is L = Σ_i w_iᵀ x_i with w fixed and
Gaussian; the gradient is taken with respect to all six inputs.

The reference, in NumPy float64, sharing no code with the contenders: Clarabel (tolerances
1e-12) finds the solution and its active set, then the solution is polished by solving the KKT
system on that active set exactly,

    K [x; y; z_S] = [−q; b; h_S],   K = [[Q, Aᵀ, G_Sᵀ], [A, 0, 0], [G_S, 0, 0]],

(z_S > 0 and h − Gx > 0 off S are checked; their smallest values, the strict complementarity
margin, are printed), and the gradient is the closed form of the active-set KKT derivative: with
u = K⁻¹ [w; 0; 0],

    ∂L/∂q = −u_x,  ∂L/∂b = u_y,  ∂L/∂h_S = u_z (0 off S),
    ∂L/∂Q = −u_x xᵀ,  ∂L/∂A = −(y u_xᵀ + u_y xᵀ),  ∂L/∂G_S = −(z_S u_xᵀ + u_z xᵀ) (0 off S).

Gradient error: ‖g − g_ref‖ / ‖g_ref‖ over the whole batch, once for (q, A, b, G, h) together and
once for the symmetric part of ∂L/∂Q (the only part a symmetric Q's perturbations see; peers
differ in whether they symmetrize). "x err" is the same for the forward solution.

The contenders, all with forward tolerance 1e-6 where they take one (`TOL`):

- implicitdiff, PyTorch: `idf.qp.solve_qp(Q, q, A, b, G, h, tol=1e-6)` (host interior point,
  polished on the active set; backward through the active-set KKT system).
- implicitdiff, JAX: the same call inside `jax.jit(jax.value_and_grad(L))`.
- qpth 0.0.18: `QPFunction(eps=1e-6, verbose=-1)(Q, q, G, h, A, b)`, its batched PDIPM (defaults
  otherwise: maxIter=20, notImprovedLim=3).
- cvxpylayers 1.2.0, PyTorch and JAX: a DPP problem with parameters F, q, A, b, G, h and objective
  ½‖Fx‖² + qᵀx, fed F = chol(Q)ᵀ computed inside the framework (so ∂L/∂Q flows through the
  Cholesky factor); its default diffcp backend with `solve_method="Clarabel"` (diffcp's own
  default, ECOS, is not installed by cvxpylayers) and Clarabel's tolerances tol_gap_abs =
  tol_gap_rel = tol_feas = 1e-6; diffcp's default derivative mode (LSQR) and thread pool. The JAX
  layer is called eagerly: cvxpylayers documents its diffcp path as not `jax.jit`-compatible.
- qpax 0.1.4: `jax.jit(jax.vmap(qpax.solve_qp_primal))` with `solver_tol=1e-6` and its default
  `target_kappa=1e-3`: qpax differentiates a relaxed (κ-smoothed) KKT system by design, so its
  gradient is that of a smoothed problem. Its default ("explicit") backend's ∂L/∂G scales the
  λ d_xᵀ term by λ twice (`qpax/explicit/diff_qp.py`, `optnet_derivatives`: `diag(lam) @ (...
  + outer(lam, dz))`; upstream pull request kevin-tracy/qpax#21, open), so a second row runs
  `backend="i"` (the implicit backend, which that pull request calls correct), up to n = 50 only
  (it took 14 s forward and 30 s forward + backward per call at n = 100).
- proxsuite 0.8.0 QPLayer: `proxsuite.torch.qplayer.QPFunction(eps=1e-6)(Q, q, A, b, G, l, h)`
  with l = −1e20 (proxsuite takes two-sided inequalities); defaults otherwise (maxIter=1000,
  eps_backward=1e-4, serial over the batch). Its backward builds the gradients in torch's default
  dtype (float32), whatever the input dtype.

How it is timed. Forward: the layer called on inputs that require grad (the graph is built, as in
training). Forward + backward: the layer and the gradient of L with respect to all six inputs
(`torch.autograd.grad`; `jax.value_and_grad` with `jax.block_until_ready`). Each callable is called
once to warm up (and, for JAX, compile), then the methods take turns for `--repeats` rounds in an
order shuffled each round (a load spike on a shared machine hits all of them); a method whose
warm-up call took longer than `--cell-budget / repeats` seconds gets fewer rounds (at least 3).
Times are medians of wall-clock time ("fwd+bwd CPU": of the process's CPU time, all threads, a
steadier figure on a loaded machine, but one that charges a method for threads it runs in
parallel); "× idf" is the median over rounds of the ratio of the method's fwd+bwd call to
implicitdiff's in the same framework and round (paired, so load from other processes on a shared
machine hits both).

Equal accuracy (`--eq-tols`): implicitdiff also runs, in the same shuffled rounds, at the
interior-point tolerances 1e-1, 1e-2 and 1e-4 besides 1e-6; after each configuration a table
gives, for each peer, the cheapest of implicitdiff's settings in the same framework (lowest
median fwd+bwd time) whose gradient error (the larger of the two columns) is no larger than the
peer's, with the paired ratio of the two; a summary of those rows, with the command, ends the
run (the rows of the summary table at the top of docs/benchmarks.md).

Also printed: layer construction time for an n = 100 problem (cvxpylayers' `CvxpyLayer` against
`idf.cvxpy.Layer`), and the bytes torch autograd saves for the backward of `idf.qp.solve_qp` (and
of qpth) against the solver's tolerance and iteration count, to show they do not grow with the
iterations.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import random
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

import implicitdiff as idf

try:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - optional
    jax = jnp = None

TOL = 1e-6
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
NAMES = ("Q", "q", "A", "b", "G", "h")

IDF_T = "implicitdiff `solve_qp` (torch)"
IDF_J = "implicitdiff `solve_qp` (JAX, jit)"
QPTH = "qpth `QPFunction` (torch)"
CVX_T = "cvxpylayers (torch, diffcp + Clarabel)"
CVX_J = "cvxpylayers (JAX, diffcp + Clarabel, eager)"
QPAX = "qpax `solve_qp_primal` (JAX, jit + vmap, κ=1e-3)"
QPAX_I = "qpax `solve_qp_primal(backend='i')` (JAX, jit + vmap, κ=1e-3)"
PROX = "proxsuite QPLayer (torch)"


def _import_error(mod: str) -> str | None:
    try:
        __import__(mod)
        return None
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"{type(e).__name__}: {e}".splitlines()[0]


# ---- the problems ------------------------------------------------------------------------------

def make_qps(n: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of feasible, strictly convex QPs (float64) and the loss weights w."""
    rng = np.random.default_rng([seed, n])
    p, m = max(1, n // 4), n
    L = rng.standard_normal((batch, n, n)) / np.sqrt(n)
    Q = L @ L.transpose(0, 2, 1) + 0.1 * np.eye(n)
    Q = 0.5 * (Q + Q.transpose(0, 2, 1))
    q = rng.standard_normal((batch, n))
    A = rng.standard_normal((batch, p, n)) / np.sqrt(n)
    G = rng.standard_normal((batch, m, n)) / np.sqrt(n)
    x0 = rng.standard_normal((batch, n))
    b = np.einsum("bpn,bn->bp", A, x0)
    h = np.einsum("bmn,bn->bm", G, x0) + rng.uniform(0.0, 1.0, (batch, m))
    w = rng.standard_normal((batch, n))
    return dict(Q=Q, q=q, A=A, b=b, G=G, h=h, w=w)


# ---- the reference: Clarabel, polished on the active set, closed-form gradient ----------------

def _clarabel_solve(Q, q, A, b, G, h) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import clarabel

    p, m = A.shape[0], G.shape[0]
    P = sp.triu(sp.csc_matrix(Q), format="csc")
    M = sp.csc_matrix(np.vstack([A, G]))
    s = clarabel.DefaultSettings()
    s.verbose = False
    s.tol_gap_abs = s.tol_gap_rel = s.tol_feas = s.tol_ktratio = 1e-12
    s.max_iter = 500
    sol = clarabel.DefaultSolver(P, q, M, np.concatenate([b, h]),
                                 [clarabel.ZeroConeT(p), clarabel.NonnegativeConeT(m)], s).solve()
    z = np.asarray(sol.z)
    return np.asarray(sol.x), z[:p], z[p:]


def reference(P: dict[str, np.ndarray]) -> dict[str, Any]:
    """Polished solution, multipliers, active sets and the closed-form gradient of L = Σ wᵀx."""
    B, n = P["q"].shape
    p, m = P["A"].shape[1], P["G"].shape[1]
    out = {k: np.zeros_like(P[k]) for k in NAMES}
    xs = np.zeros((B, n))
    n_active, z_min, slack_min, kkt_res = [], np.inf, np.inf, 0.0
    for i in range(B):
        Q, q, A, b, G, h, w = (P[k][i] for k in (*NAMES, "w"))
        x, y, z = _clarabel_solve(Q, q, A, b, G, h)
        S = z > 1e-7 * max(1.0, float(np.max(z)))
        GS = G[S]
        k = int(S.sum())
        K = np.zeros((n + p + k, n + p + k))
        K[:n, :n] = Q
        K[:n, n:n + p] = A.T
        K[n:n + p, :n] = A
        K[:n, n + p:] = GS.T
        K[n + p:, :n] = GS
        sol = np.linalg.solve(K, np.concatenate([-q, b, h[S]]))
        x, y, zS = sol[:n], sol[n:n + p], sol[n + p:]
        slack = h - G @ x
        if (k and zS.min() <= 0) or ((~S).any() and slack[~S].min() <= 0):
            raise RuntimeError(f"reference: the active set of sample {i} is wrong after "
                               f"polishing (min z_S {zS.min() if k else None}, min slack off S "
                               f"{slack[~S].min() if (~S).any() else None})")
        z_full = np.zeros(m)
        z_full[S] = zS
        kkt_res = max(kkt_res, float(np.max(np.abs(Q @ x + q + A.T @ y + G.T @ z_full))),
                      float(np.max(np.abs(A @ x - b))))
        z_min = min(z_min, float(zS.min()) if k else np.inf)
        slack_min = min(slack_min, float(slack[~S].min()) if (~S).any() else np.inf)
        n_active.append(k)
        u = np.linalg.solve(K, np.concatenate([w, np.zeros(p + k)]))  # K is symmetric
        ux, uy, uz = u[:n], u[n:n + p], u[n + p:]
        out["q"][i] = -ux
        out["b"][i] = uy
        out["h"][i, S] = uz
        out["Q"][i] = -np.outer(ux, x)
        out["A"][i] = -(np.outer(y, ux) + np.outer(uy, x))
        out["G"][i, S] = -(np.outer(zS, ux) + np.outer(uz, x))
        xs[i] = x
    return dict(x=xs, grads=out, n_active=np.array(n_active), z_min=z_min,
                slack_min=slack_min, kkt_res=kkt_res,
                A_smin=float(min(np.linalg.svd(P["A"], compute_uv=False)[:, -1])))


def sym(M: np.ndarray) -> np.ndarray:
    return 0.5 * (M + np.swapaxes(M, -1, -2))


def rel(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    num = sum(float(np.sum((np.asarray(g, np.float64) - r) ** 2)) for g, r in zip(got, ref))
    den = sum(float(np.sum(r ** 2)) for r in ref)
    return (num / den) ** 0.5


def errors(x: Any, grads: dict[str, Any] | None, ref: dict[str, Any]) -> tuple[float, ...]:
    """(x error, error of ∇(q, A, b, G, h), error of sym ∇Q); NaN where not available."""
    ex = rel([np.asarray(x)], [ref["x"]])
    if grads is None:
        return ex, float("nan"), float("nan")
    g = {k: (None if v is None else np.asarray(v, np.float64)) for k, v in grads.items()}
    rest = [k for k in NAMES[1:] if g.get(k) is not None]
    e_rest = rel([g[k] for k in rest], [ref["grads"][k] for k in rest]) if rest else float("nan")
    e_Q = (rel([sym(g["Q"])], [sym(ref["grads"]["Q"])]) if g.get("Q") is not None
           else float("nan"))
    return ex, e_rest, e_Q


# ---- the contenders ----------------------------------------------------------------------------
# Each builder takes the NumPy problem and a dtype name and returns (fwd, fwdbwd):
# fwd() -> x (computed), fwdbwd() -> (x, {name: gradient}).

def _torch_inputs(P: dict[str, np.ndarray], dtype: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    dt = getattr(torch, dtype)
    ins = [torch.tensor(P[k], dtype=dt, requires_grad=True) for k in NAMES]
    return ins, torch.tensor(P["w"], dtype=dt)


def _torch_pair(solve: Callable[..., torch.Tensor], P: dict[str, np.ndarray], dtype: str):
    ins, w = _torch_inputs(P, dtype)

    def fwd():
        return solve(*ins).detach()

    def fwdbwd():
        x = solve(*ins)
        gs = torch.autograd.grad((w * x).sum(), ins, allow_unused=True)
        return x.detach(), {k: (None if g is None else g.detach().numpy())
                            for k, g in zip(NAMES, gs)}

    return fwd, fwdbwd


def build_idf_torch(P, dtype, tol=TOL):
    return _torch_pair(lambda Q, q, A, b, G, h: idf.qp.solve_qp(Q, q, A, b, G, h, tol=tol),
                       P, dtype)


def build_qpth(P, dtype):
    from qpth.qp import QPFunction

    f = QPFunction(eps=TOL, verbose=-1)
    return _torch_pair(lambda Q, q, A, b, G, h: f(Q, q, G, h, A, b), P, dtype)


def build_proxsuite(P, dtype):
    from proxsuite.torch.qplayer import QPFunction

    f = QPFunction(eps=TOL)
    lo = torch.full(P["h"].shape, -1e20, dtype=getattr(torch, dtype))
    return _torch_pair(lambda Q, q, A, b, G, h: f(Q, q, A, b, G, lo, h)[0], P, dtype)


def cvxpy_problem(n: int, p: int, m: int):
    """The DPP problem cvxpylayers needs: parameters F, q, A, b, G, h; ½‖Fx‖² + qᵀx."""
    import cvxpy as cp

    x = cp.Variable(n)
    F, q = cp.Parameter((n, n)), cp.Parameter(n)
    A, b = cp.Parameter((p, n)), cp.Parameter(p)
    G, h = cp.Parameter((m, n)), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F @ x) + q @ x), [A @ x == b, G @ x <= h])
    return prob, [F, q, A, b, G, h], [x]


CLARABEL_ARGS = dict(solve_method="Clarabel", tol_gap_abs=TOL, tol_gap_rel=TOL, tol_feas=TOL)
_layers: dict[tuple[str, int], Any] = {}


def _cvx_layer(kind: str, n: int, p: int, m: int):
    if (kind, n) not in _layers:
        prob, params, vars_ = cvxpy_problem(n, p, m)
        if kind == "torch":
            from cvxpylayers.torch import CvxpyLayer
        else:
            from cvxpylayers.jax import CvxpyLayer
        _layers[kind, n] = CvxpyLayer(prob, parameters=params, variables=vars_)
    return _layers[kind, n]


def build_cvx_torch(P, dtype):
    n = P["q"].shape[1]
    layer = _cvx_layer("torch", n, P["A"].shape[1], P["G"].shape[1])

    def solve(Q, q, A, b, G, h):
        F = torch.linalg.cholesky(Q).mT
        return layer(F, q, A, b, G, h, solver_args=dict(CLARABEL_ARGS))[0]

    return _torch_pair(solve, P, dtype)


def _jax_inputs(P, dtype):
    return [jnp.asarray(P[k], dtype=dtype) for k in NAMES], jnp.asarray(P["w"], dtype=dtype)


def _jax_pair(solve, P, dtype, jit: bool = True):
    ins, w = _jax_inputs(P, dtype)

    def loss(*a):
        x = solve(*a)
        return jnp.sum(w * x), x

    vg = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)
    f = jax.jit(solve) if jit else solve
    vg = jax.jit(vg) if jit else vg

    def fwd():
        return jax.block_until_ready(f(*ins))

    def fwdbwd():
        (_, x), gs = jax.block_until_ready(vg(*ins))
        return x, dict(zip(NAMES, gs))

    return fwd, fwdbwd


def build_idf_jax(P, dtype, tol=TOL):
    return _jax_pair(lambda Q, q, A, b, G, h: idf.qp.solve_qp(Q, q, A, b, G, h, tol=tol), P, dtype)


def build_qpax(P, dtype, backend="e"):
    import qpax

    def one(Q, q, A, b, G, h):
        return qpax.solve_qp_primal(Q, q, A, b, G, h, solver_tol=TOL, backend=backend)

    return _jax_pair(jax.vmap(one), P, dtype)


QPAX_I_MAX_N = 50


def build_qpax_i(P, dtype):
    return build_qpax(P, dtype, backend="i")


def build_cvx_jax(P, dtype):
    n = P["q"].shape[1]
    layer = _cvx_layer("jax", n, P["A"].shape[1], P["G"].shape[1])

    def solve(Q, q, A, b, G, h):
        F = jnp.swapaxes(jnp.linalg.cholesky(Q), -1, -2)
        return layer(F, q, A, b, G, h, solver_args=dict(CLARABEL_ARGS))[0]

    return _jax_pair(solve, P, dtype, jit=False)


# name, framework, builder, module whose import it needs
CONTENDERS: list[tuple[str, str, Callable, str]] = [
    (IDF_T, "torch", build_idf_torch, "implicitdiff"),
    (QPTH, "torch", build_qpth, "qpth.qp"),
    (CVX_T, "torch", build_cvx_torch, "cvxpylayers.torch"),
    (PROX, "torch", build_proxsuite, "proxsuite.torch.qplayer"),
    (IDF_J, "jax", build_idf_jax, "jax"),
    (QPAX, "jax", build_qpax, "qpax"),
    (QPAX_I, "jax", build_qpax_i, "qpax"),
    (CVX_J, "jax", build_cvx_jax, "cvxpylayers.jax"),
]

# Equal accuracy: implicitdiff's settings tried besides the default-tolerance rows above (the
# interior point's tolerance; the polish makes every one exact once it finds the active set,
# and a sample whose polish fails is solved again at 1e-13, so looser is not always faster).
EQ_TOLS = (1e-1, 1e-2, 1e-4)


def idf_setting(fw: str, tol: float) -> str:
    """The contender name of implicitdiff at interior-point tolerance `tol`."""
    base = IDF_T if fw == "torch" else IDF_J
    return base if tol == TOL else f"{base[:-1]}, tol={tol:g})"


def equal_accuracy_contenders(tols: tuple[float, ...]) -> list[tuple[str, str, Callable, str]]:
    """The extra implicitdiff rows of the equal-accuracy comparison, one per framework and
    tolerance."""
    out = []
    for t in tols:
        if t == TOL:
            continue
        out.append((idf_setting("torch", t), "torch", functools.partial(build_idf_torch, tol=t),
                    "implicitdiff"))
        out.append((idf_setting("jax", t), "jax", functools.partial(build_idf_jax, tol=t),
                    "jax"))
    return out


# ---- timing ------------------------------------------------------------------------------------

def _short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return msg[0][:160] if msg else type(e).__name__


def bench_config(n: int, dtype: str, batch: int, repeats: int, budget: float, seed: int,
                 only: list[str] | None, eq_tols: tuple[float, ...] = ()) -> dict[str, Any]:
    """Times and errors of every contender on one batch of size-n QPs in one dtype, and of
    implicitdiff at the tolerances `eq_tols` (for the equal-accuracy table)."""
    P = make_qps(n, batch, seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    ref = reference(P)
    t_ref = time.perf_counter() - t0
    res: dict[str, dict[str, Any]] = {}
    fns: dict[str, tuple[Callable, Callable]] = {}
    for name, fw, build, mod in CONTENDERS + equal_accuracy_contenders(eq_tols):
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        r: dict[str, Any] = dict(framework=fw)
        res[name] = r
        err = _import_error(mod)
        if fw == "jax" and jax is None:
            err = "jax not installed"
        if name.startswith("implicitdiff") and not hasattr(idf, "qp"):
            err = "implicitdiff has no `qp` module yet"
        if err:
            r["error"] = f"not importable: {err}"
            continue
        if name == QPAX_I and n > QPAX_I_MAX_N:
            r["error"] = (f"skipped at n > {QPAX_I_MAX_N}: 14 s forward, 30 s forward + backward "
                          "per call at n = 100 in a trial run here")
            continue
        try:
            fwd, fwdbwd = build(P, dtype)
            t = time.perf_counter()
            fwd()
            r["first_fwd"] = time.perf_counter() - t
            t = time.perf_counter()
            x, g = fwdbwd()
            r["first_fwdbwd"] = time.perf_counter() - t
            r["x_err"], r["g_err"], r["gQ_err"] = errors(x, g, ref)
            t = time.perf_counter()
            fwdbwd()
            r["warm"] = time.perf_counter() - t
        except Exception as e:  # report any peer failure and go on
            r["error"] = _short(e)
            if os.environ.get("BENCH_QP_TRACE"):
                traceback.print_exc()
            continue
        r["reps"] = max(3, min(repeats, int(budget / max(r["warm"], 1e-9))))
        print(f"[n={n} {dtype}] {name}: first fwd {r['first_fwd']:.2f} s, first fwd+bwd "
              f"{r['first_fwdbwd']:.2f} s, warm fwd+bwd {r['warm']:.2f} s", file=sys.stderr,
              flush=True)
        r["t_fwd"], r["t_fwdbwd"], r["c_fwdbwd"] = [], [], []
        fns[name] = (fwd, fwdbwd)
    rng = random.Random(seed)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for rnd in range(repeats):
            order = [k for k in fns if rnd < res[k]["reps"]]
            rng.shuffle(order)
            for k in order:
                fwd, fwdbwd = fns[k]
                t = time.perf_counter()
                fwd()
                res[k]["t_fwd"].append(time.perf_counter() - t)
                t, c = time.perf_counter(), time.process_time()
                fwdbwd()
                res[k]["t_fwdbwd"].append(time.perf_counter() - t)
                res[k]["c_fwdbwd"].append(time.process_time() - c)
            gc.collect()
    finally:
        if gc_was:
            gc.enable()
    for r in res.values():
        if "t_fwd" in r:
            r["fwd"] = statistics.median(r["t_fwd"])
            r["fwdbwd"] = statistics.median(r["t_fwdbwd"])
            r["cpu"] = statistics.median(r["c_fwdbwd"])
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return dict(n=n, dtype=dtype, ref=ref, t_ref=t_ref, res=res, load=(load, load_end))


# ---- construction time and memory ---------------------------------------------------------------

def _construction_time(layer_class: Any, n: int, p: int, m: int) -> str:
    """Median of 3 (and the first) times to build the cvxpy problem and `layer_class` on it."""
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        prob, params, vars_ = cvxpy_problem(n, p, m)
        layer_class(prob, parameters=params, variables=vars_)
        ts.append(time.perf_counter() - t)
    return f"{statistics.median(ts):.3f} (first {ts[0]:.3f})"


def bench_construction(n: int = 100) -> list[list[str]]:
    """Seconds to build a layer for the n = 100 problem shape (problem building included)."""
    p, m = n // 4, n
    rows = []
    for kind in ("torch", "jax"):
        name = f"cvxpylayers `CvxpyLayer` ({kind})"
        err = _import_error(f"cvxpylayers.{kind}")
        if err:
            rows.append([name, f"not importable: {err}"])
            continue
        mod = __import__(f"cvxpylayers.{kind}", fromlist=["CvxpyLayer"])
        rows.append([name, _construction_time(mod.CvxpyLayer, n, p, m)])
    name = "implicitdiff `idf.cvxpy.Layer`"
    try:
        import implicitdiff.cvxpy as icvx

        rows.append([name, _construction_time(icvx.Layer, n, p, m)])
    except ImportError as e:
        rows.append([name, f"not available yet ({_short(e)})"])
    except Exception as e:
        rows.append([name, f"failed: {_short(e)}"])
    return rows


def saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[int, int]:
    """(count, bytes) of the tensors torch autograd saves for backward while `fn` runs."""
    count, nbytes, seen = 0, 0, set()

    def pack(t):
        nonlocal count, nbytes
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            count += 1
            nbytes += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = fn()
    del x
    return count, nbytes


def bench_memory(n: int, batch: int, seed: int) -> list[list[str]]:
    """Autograd-saved bytes of idf (torch) and qpth against the forward solver's iterations."""
    P = make_qps(n, batch, seed)
    ins, _ = _torch_inputs(P, "float64")
    rows = []
    if hasattr(idf, "qp"):
        for tol in (1e-2, 1e-4, 1e-6, 1e-8, 1e-10):
            try:
                sol = idf.qp.solve_qp(*ins, tol=tol, full_output=True)
                its = np.asarray(sol.stats.iterations)
                c, nb = saved_bytes(lambda tol=tol: idf.qp.solve_qp(*ins, tol=tol))
                rows.append([IDF_T, f"tol={tol:g}", f"{its.mean():.1f} (max {its.max()})",
                             str(c), f"{nb / 1024:,.1f}"])
            except Exception as e:
                rows.append([IDF_T, f"tol={tol:g}", f"failed: {_short(e)}", "", ""])
    if _import_error("qpth.qp") is None:
        from qpth.qp import QPFunction

        for it in (5, 10, 20, 40):
            f = QPFunction(eps=1e-12, verbose=-1, maxIter=it, notImprovedLim=it)
            Q, q, A, b, G, h = ins
            c, nb = saved_bytes(lambda f=f, Q=Q, q=q, A=A, b=b, G=G, h=h: f(Q, q, G, h, A, b))
            rows.append([QPTH, f"maxIter={it}, eps=1e-12", f"≤ {it}", str(c), f"{nb / 1024:,.1f}"])
    return rows


def profile_idf(n: int, batch: int, seed: int, runs: int = 5, top: int = 15) -> None:
    """Where implicitdiff's torch fwd+bwd spends its time: wall and process CPU time of the
    forward call and of `torch.autograd.grad`, then a cProfile of one fwd+bwd by own time."""
    import cProfile
    import io
    import pstats

    P = make_qps(n, batch, seed)
    ins, w = _torch_inputs(P, "float64")

    def once():
        t0, c0 = time.perf_counter(), time.process_time()
        x = idf.qp.solve_qp(*ins, tol=TOL)
        t1, c1 = time.perf_counter(), time.process_time()
        torch.autograd.grad((w * x).sum(), ins)
        t2, c2 = time.perf_counter(), time.process_time()
        return t1 - t0, t2 - t1, c1 - c0, c2 - c1

    once()
    ts = np.array([once() for _ in range(runs)])
    med = np.median(ts, axis=0)
    its = np.asarray(idf.qp.solve_qp(*ins, tol=TOL, full_output=True).stats.iterations)
    print(f"## Profile: implicitdiff `solve_qp` (torch), n = {n}, batch {batch}, float64, tol "
          f"{TOL:g}\n")
    print(f"Interior-point iterations: mean {its.mean():.1f}, max {its.max()}. Median of {runs} "
          f"runs: forward {med[0] * 1e3:,.0f} ms wall ({med[2] * 1e3:,.0f} ms CPU), backward "
          f"{med[1] * 1e3:,.0f} ms wall ({med[3] * 1e3:,.0f} ms CPU); load average "
          f"{os.getloadavg()[0]:.1f}.\n")
    pr = cProfile.Profile()
    pr.enable()
    x = idf.qp.solve_qp(*ins, tol=TOL)
    torch.autograd.grad((w * x).sum(), ins)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    print("```\n" + "\n".join(ln for ln in buf.getvalue().splitlines() if ln.strip()) + "\n```\n")


# ---- output ------------------------------------------------------------------------------------

def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_ms(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1e3:,.1f}" if s * 1e3 < 1000 else f"{s * 1e3:,.0f}"


def fmt_e(e: float | None) -> str:
    return "—" if e is None or not np.isfinite(e) else f"{e:.1e}"


def paired_ratio(t: list[float], t_base: list[float]) -> float:
    """Median over rounds of the per-round ratio (both ran in round i as their i-th call)."""
    return statistics.median(a / b for a, b in zip(t, t_base))


def config_table(c: dict[str, Any]) -> str:
    res = c["res"]
    base = {"torch": res.get(IDF_T, {}), "jax": res.get(IDF_J, {})}
    rows = []
    for name, r in res.items():
        if "error" in r:
            rows.append([name, "—", "—", "—", "—", "—", "—", "—", "—", r["error"]])
            continue
        b = base[r["framework"]]
        ratio = (f"{paired_ratio(r['t_fwdbwd'], b['t_fwdbwd']):.2f}×" if "t_fwdbwd" in b
                 else "—")
        rows.append([name, fmt_ms(r["fwd"]), fmt_ms(r["fwdbwd"]),
                     fmt_ms(max(r["fwdbwd"] - r["fwd"], 0.0)), fmt_ms(r["cpu"]), ratio,
                     fmt_e(r["x_err"]), fmt_e(r["g_err"]), fmt_e(r["gQ_err"]),
                     f"{len(r['t_fwdbwd'])} runs; first call {r['first_fwdbwd']:.2f} s"])
    return table(["method", "fwd (ms)", "fwd+bwd (ms)", "bwd ≈ (ms)", "fwd+bwd CPU (ms)",
                  "fwd+bwd × idf",
                  "x err", "∇(q,A,b,G,h) err", "sym ∇Q err", "notes"], rows)


def grad_error(r: dict[str, Any]) -> float:
    """One gradient error per method: the larger of its two (q, A, b, G, h and sym Q)."""
    return max(r["g_err"], r["gQ_err"])


def equal_accuracy_rows(c: dict[str, Any], command: str) -> list[list[str]]:
    """Per peer: its time and gradient error, and the cheapest implicitdiff setting (same
    framework, median fwd+bwd) whose gradient error is no larger, with the paired ratio."""
    res = c["res"]
    rows = []
    for name, r in res.items():
        if name.startswith("implicitdiff") or "t_fwdbwd" not in r:
            continue
        e_peer = grad_error(r)
        ours = [(k, v) for k, v in res.items()
                if k.startswith("implicitdiff") and v["framework"] == r["framework"]
                and "t_fwdbwd" in v and grad_error(v) <= e_peer]
        problem = f"n = {c['n']}, {c['dtype']}"
        if not ours:
            rows.append([name, problem, fmt_ms(r["fwdbwd"]), fmt_e(e_peer),
                         "none at or below this error", "—", "—", "—", command])
            continue
        k, v = min(ours, key=lambda kv: kv[1]["fwdbwd"])
        ratio = paired_ratio(v["t_fwdbwd"], r["t_fwdbwd"])
        setting = "tol=" + (k.split("tol=")[1][:-1] if "tol=" in k else f"{TOL:g}")
        rows.append([name, problem, fmt_ms(r["fwdbwd"]), fmt_e(e_peer),
                     f"{k.split(' (')[0]} ({r['framework']}) {setting}", fmt_ms(v["fwdbwd"]),
                     fmt_e(grad_error(v)), f"{ratio:.2f}×", command])
    return rows


EQ_HEADER = ["peer", "problem", "peer fwd+bwd (ms)", "peer gradient error",
             "cheapest implicitdiff at ≤ that error", "its fwd+bwd (ms)", "its gradient error",
             "ratio (ours / peer)", "command"]


def environment() -> str:
    def ver(mod: str) -> str:
        try:
            return version(mod)
        except PackageNotFoundError:
            return "not installed"

    pk = ("torch", "jax", "numpy", "qpth", "cvxpylayers", "cvxpy", "diffcp", "clarabel", "qpax",
          "proxsuite")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"implicitdiff {idf.__version__}; {', '.join(f'{p} {ver(p)}' for p in pk)}; Python "
            f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch threads {torch.get_num_threads()}, "
            f"{', '.join(f'{k}={os.environ[k]}' for k in THREAD_VARS if k in os.environ) or 'no thread variables set'}, "
            f"load average {load:.1f} at start")


def targets(configs: list[dict[str, Any]], construction: list[list[str]]) -> str:
    rows = []
    for c in configs:
        if c["n"] != 100 or c["dtype"] != "float64":
            continue
        res = c["res"]
        it = res.get(IDF_T, {})
        for peer, lim in ((QPTH, 0.5), (CVX_T, 0.1)):
            pr = res.get(peer, {})
            if "t_fwdbwd" in it and "t_fwdbwd" in pr:
                r = paired_ratio(it["t_fwdbwd"], pr["t_fwdbwd"])
                rows.append([f"idf torch fwd+bwd ≤ {lim}× {peer.split(' (')[0]} (n=100, f64)",
                             f"{r:.3f}×", "met" if r <= lim else "MISSED"])
        for name in (IDF_T, IDF_J):
            r = res.get(name, {})
            if "g_err" in r:
                e = max(r["g_err"], r["gQ_err"])
                rows.append([f"{name}: gradient rel. error ≤ 1e-8 (n=100, f64)", f"{e:.1e}",
                             "met" if e <= 1e-8 else "MISSED"])
    for name, val in construction:
        if name.startswith("implicitdiff") and val[:1].isdigit():
            s = float(val.split()[0])
            rows.append(["`idf.cvxpy.Layer` construction ≤ 1 s (n=100)", f"{s:.3f} s",
                         "met" if s <= 1 else "MISSED"])
    return table(["target", "measured", "status"], rows) if rows else "(n = 100, float64 not run)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: n = 10, 50; 3 repeats")
    p.add_argument("--n", type=int, nargs="+", default=None, help="sizes (default 10 50 100 200)")
    p.add_argument("--dtype", choices=("float64", "float32", "both"), default="both")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; quick 3)")
    p.add_argument("--cell-budget", type=float, default=20.0,
                   help="seconds of timed fwd+bwd calls per method and configuration, beyond "
                        "which a slow method gets fewer rounds (at least 3)")
    p.add_argument("--only", nargs="+", default=None,
                   help="substrings of the contender names to run (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-extras", action="store_true",
                   help="skip the construction and memory tables")
    p.add_argument("--eq-tols", type=float, nargs="*", default=list(EQ_TOLS),
                   help="implicitdiff tolerances tried for the equal-accuracy table besides "
                        f"{TOL:g} (default {' '.join(f'{t:g}' for t in EQ_TOLS)}; none: skip)")
    p.add_argument("--profile", type=int, default=None, metavar="N",
                   help="only profile implicitdiff's torch fwd+bwd at size N and exit")
    a = p.parse_args(argv)
    if a.profile:
        profile_idf(a.profile, a.batch, a.seed)
        return 0
    sizes = a.n or ([10, 50] if a.quick else [10, 50, 100, 200])
    repeats = a.repeats or (3 if a.quick else 7)
    dtypes = ["float64", "float32"] if a.dtype == "both" else [a.dtype]
    t_start = time.perf_counter()
    print(f"# QP layers\n\n{environment()}.\n")
    print(f"Batch {a.batch}; m_ineq = n, m_eq = n/4; forward tolerance {TOL:g}; {repeats} "
          f"timed rounds (fewer for methods slower than {a.cell_budget:g} s / {repeats}); "
          "times are medians in milliseconds; \"× idf\" is the median per-round ratio to "
          "implicitdiff's fwd+bwd in the same framework; errors are relative, against the float64 active-set KKT "
          "reference.\n")
    configs = []
    eq_all: list[list[str]] = []
    command = "python benchmarks/bench_qp.py " + shlex.join(argv if argv is not None
                                                            else sys.argv[1:])
    for dtype in dtypes:
        for n in sizes:
            c = bench_config(n, dtype, a.batch, repeats, a.cell_budget, a.seed, a.only,
                             tuple(a.eq_tols))
            configs.append(c)
            ref = c["ref"]
            print(f"## n = {n}, {dtype}\n")
            print(f"Reference: {ref['n_active'].mean():.1f} active inequalities per sample "
                  f"(min {ref['n_active'].min()}, max {ref['n_active'].max()}) of {n}; strict "
                  f"complementarity margin: min z_S = {ref['z_min']:.1e}, min slack off S = "
                  f"{ref['slack_min']:.1e}; KKT residual {ref['kkt_res']:.1e}; smallest singular "
                  f"value of A {ref['A_smin']:.2f}; {c['t_ref']:.1f} s. Load average "
                  f"{c['load'][0]:.1f} before, {c['load'][1]:.1f} after.\n")
            print(config_table(c) + "\n", flush=True)
            eq = equal_accuracy_rows(c, command)
            eq_all += eq
            if eq:
                print(f"Equal accuracy, n = {n}, {dtype}: per peer, the cheapest implicitdiff "
                      "setting (interior-point tolerance) whose gradient error is no larger "
                      "than the peer's.\n")
                print(table(EQ_HEADER[:-1], [r[:-1] for r in eq]) + "\n", flush=True)
    construction: list[list[str]] = []
    if not a.no_extras:
        construction = bench_construction(100)
        print("## Layer construction, n = 100 (s; median of 3, problem building included)\n")
        print(table(["layer", "seconds"], construction) + "\n")
        print(f"## Memory against iterations: autograd-saved tensors, n = 50, batch {a.batch}, "
              "float64\n")
        print(table(["method", "setting", "solver iterations (mean)", "saved tensors",
                     "saved KiB"], bench_memory(50, a.batch, a.seed)) + "\n")
    if eq_all:
        print("## Equal accuracy: summary\n")
        print(table(EQ_HEADER, eq_all) + "\n")
    print("## Targets\n")
    print(targets(configs, construction) + "\n")
    print(f"Total run time {time.perf_counter() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
