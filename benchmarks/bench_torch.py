"""PyTorch backend benchmarks: a DEQ layer and a ridge hypergradient, against the alternatives.

    python benchmarks/bench_torch.py            # full run (about two minutes on 2 CPU cores)
    python benchmarks/bench_torch.py --equal    # only section 3, at equal gradient error
    python benchmarks/bench_torch.py --quick    # fewer repeats, for a smoke test

1. DEQ layer z = tanh(W z + U x + b): batch 64, hidden 256, input 256, ‖W‖₂ = 0.5, float32,
   loss sum(z²), gradient with respect to (W, U, b). Every method runs the same K forward
   fixed-point iterations (K = 30 and K = 300):

   - implicitdiff: `custom_fixed_point(T, solve=BiCGStab(), batch_dims=1)` around the loop;
   - torchdeq (IFT mode, fixed-point backward with K iterations), if installed;
   - torchopt `custom_root` (its default normal-equation CG), if installed;
   - unrolled autograd through the K iterations;
   - the floor: a hand-written fixed point plus a backward hook that iterates the adjoint
     equation K times (what a careful user writes by hand, no library).

   Time: median over interleaved repeats of forward + backward (methods take turns, so a load
   spike on a shared machine hits them alike). Peak memory: the largest sum of live tensor bytes
   allocated during one forward + backward, from the `[memory]` events of `torch.profiler` with
   `profile_memory=True` (CPU allocations of torch's allocator; Python objects not counted;
   tracemalloc cannot see torch's allocations). Gradient error: relative 2-norm error of
   (W, U, b) against the exact implicit gradient computed densely in float64 (per-sample
   Jacobians, `torch.linalg.solve`) at the float64 fixed point.

2. Ridge hypergradient (the JAX issue's problem, in torch): X ∈ ℝ^{200×100}, a validation set of
   the same size, scalar λ, float64, the gradient of the validation loss with respect to λ:
   autodiff through `torch.linalg.solve` (the floor), implicitdiff with CG (at its default
   tolerance and at torchopt's) and with Cholesky,
   torchopt with CG and with its dense `solve_inv`, unrolled gradient descent (300 steps); also
   implicitdiff's forward mode (`torch.func.jvp`) and `vmap(grad)` over 16 values of λ.

3. Equal gradient error (`--equal`, also part of the full run): for each peer (torchdeq's
   K + K fixed-point iterations, torchopt's default normal-equation CG, unrolled autograd through
   the K iterations), the cheapest implicitdiff setting whose gradient error is no larger than
   the peer's, its time and the ratio, on two problems with K = 30 forward iterations:

   - the DEQ layer of section 1 (float32; the forward converges to rounding in 30 iterations);
   - a slowly contracting one in float64 (‖W‖₂ = 1.2, inputs scaled by 0.3; 30 forward
     iterations leave a relative residual of 2e-9 to 4e-8 per sample, accepted with
     `residual_tol=1e-6`): here the default backward tolerance follows the forward's
     accuracy (0.1 times it per sample instead of 1e-12), the case of issue 15 item 3.

   The implicitdiff settings tried (all `custom_fixed_point(T, batch_dims=1, ...)`, every
   option not named at its default): `solve=` Auto (the default: for this batch of fixed
   points, the fixed-point iteration with a GMRES fallback), BiCGStab,
   Richardson(omega=-1) (the fixed-point backward), each at its default tolerance, the two
   iterative ones with `check_singular=False` (no uniqueness probe: what that safety check
   costs), Richardson at explicit tolerances (1e-5 and 1e-7 in float32, 1e-6 in float64), and
   in float64 both at rtol=1e-12, the default before the tolerance followed the forward. Every time is the median of
   interleaved repeats of all methods in one run; errors are against the exact implicit
   gradient at the float64 fixed point, the same reference for every method.

Absolute times are for this machine only (CPU); compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

import implicitdiff as idf

warnings.filterwarnings("ignore")  # torchopt's functorch deprecation warnings

try:
    import torchdeq
except ImportError:  # pragma: no cover - optional
    torchdeq = None
try:
    import torchopt
except ImportError:  # pragma: no cover - optional
    torchopt = None


# ---- timing and memory ---------------------------------------------------------------------

def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns."""
    for f in fns.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live tensor bytes allocated during `fn()`, from the profiler's memory events."""
    import torch.profiler as tp

    fn()  # warm-up outside the window
    with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ---- 1. the DEQ layer ----------------------------------------------------------------------

B, H, D = 64, 256, 256


def T(z, W, U, b, x):
    return torch.tanh(z @ W.T + x @ U.T + b)


def deq_data(dtype=torch.float32, w_norm: float = 0.5, u_scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(H, H, generator=g, dtype=torch.float64)
    W = w_norm * W / torch.linalg.matrix_norm(W, 2)
    U = u_scale * torch.randn(H, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = 0.1 * torch.randn(H, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (W, U, b, x))


def exact_grads(W, U, b, x):
    """The exact implicit gradient of sum(z²) in float64, densely, per sample."""
    W, U, b, x = (t.double() for t in (W, U, b, x))
    z = torch.zeros(B, H, dtype=torch.float64)
    for _ in range(400):
        z = T(z, W, U, b, x)
    d = 1 - z ** 2                                     # tanh' at the fixed point
    J = d[:, :, None] * W[None]                        # ∂T/∂z per sample, (B, H, H)
    A = torch.eye(H, dtype=torch.float64) - J          # I - J
    u = torch.linalg.solve(A.mT, (2 * z)[..., None])[..., 0]   # (I - J)ᵀ u = z̄
    v = d * u                                          # tanh' ⊙ u
    return v.T @ z, v.T @ x, v.sum(0)


def rel_error(got, ref) -> float:
    num = sum(float(((g.double() - r) ** 2).sum()) for g, r in zip(got, ref))
    den = sum(float((r ** 2).sum()) for r in ref)
    return (num / den) ** 0.5


# ---- the methods: implicitdiff and its peers at K forward iterations -----------------------

def _params(data):
    return [p.clone().requires_grad_() for p in data[:3]]


def _loop(K: int):
    def loop(W, U, b, x):
        z = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype)
        for _ in range(K):
            z = T(z, W, U, b, x)
        return z
    return loop


def _implicit(data, K: int, **kw) -> Callable[[], tuple]:
    layer = idf.custom_fixed_point(T, batch_dims=1, **kw)(_loop(K))
    x = data[3]

    def run():
        W, U, b = _params(data)
        z = layer(W, U, b, x)
        (z * z).sum().backward()
        return W.grad, U.grad, b.grad
    return run


def _peer_methods(data, K: int) -> dict[str, Callable[[], tuple]]:
    """The peers at K forward iterations, in the dtype of `data`: "torchdeq" (K + K
    fixed-point iterations) and "torchopt" (its default CG) where installed, and "unrolled"
    (autograd through the K iterations)."""
    x = data[3]
    dt = x.dtype
    loop = _loop(K)
    out: dict[str, Callable[[], tuple]] = {}
    if torchdeq is not None:
        deq = torchdeq.get_deq(f_solver="fixed_point_iter", f_max_iter=K, f_tol=1e-30,
                               b_solver="fixed_point_iter", b_max_iter=K, b_tol=1e-30,
                               ift=True)

        def m_torchdeq():
            W, U, b = _params(data)
            zs, _ = deq(lambda z: T(z, W, U, b, x), torch.zeros(B, H, dtype=dt))
            (zs[-1] * zs[-1]).sum().backward()
            return W.grad, U.grad, b.grad

        out["torchdeq"] = m_torchdeq
    if torchopt is not None:
        def optimality(z, W, U, b, x):
            return T(z, W, U, b, x) - z

        @torchopt.diff.implicit.custom_root(optimality, argnums=(1, 2, 3))
        def topt(z0, W, U, b, x):
            with torch.no_grad():
                return loop(W, U, b, x)

        def m_torchopt():
            W, U, b = _params(data)
            z = topt(torch.zeros(B, H, dtype=dt), W, U, b, x)
            (z * z).sum().backward()
            return W.grad, U.grad, b.grad

        out["torchopt"] = m_torchopt

    def m_unrolled():
        W, U, b = _params(data)
        z = loop(W, U, b, x)
        (z * z).sum().backward()
        return W.grad, U.grad, b.grad

    out["unrolled"] = m_unrolled
    return out


def deq_methods(K: int, data) -> dict[str, Callable[[], tuple]]:
    x = data[3]
    loop = _loop(K)

    def m_floor():
        W, U, b = _params(data)
        with torch.no_grad():
            z = loop(W, U, b, x)
        z0 = z.requires_grad_()
        f0 = T(z0, W, U, b, x)

        def hook(grad):
            handle.remove()
            g = grad
            for _ in range(K):  # g = z̄ + Jᵀ g, the adjoint fixed point
                g = torch.autograd.grad(f0, z0, g, retain_graph=True)[0] + grad
            return g

        handle = f0.register_hook(hook)
        (f0 * f0).sum().backward()
        return W.grad, U.grad, b.grad

    out = {"implicitdiff": _implicit(data, K, solve=idf.BiCGStab()),
           # the two-vector fixed-point backward u <- J^T u - xbar (least memory)
           "implicitdiff Richardson": _implicit(data, K, solve=idf.Richardson(omega=-1.0))}
    out.update(_peer_methods(data, K))
    out["floor (hand-written)"] = m_floor
    return out


def bench_deq(repeats: int) -> list[str]:
    data = deq_data()
    ref = exact_grads(*data)
    lines = [
        "DEQ layer z = tanh(Wz + Ux + b): batch 64, hidden 256, ‖W‖₂ = 0.5, float32, "
        "grad of sum(z²) wrt (W, U, b)",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
        f"median of {repeats} interleaved repeats",
        "",
        "| method | K | fwd+bwd ms | × floor | × torchdeq | peak MiB | grad rel. err |",
        "|---|---|---|---|---|---|---|",
    ]
    for K in (30, 300):
        methods = deq_methods(K, data)
        times = interleaved_medians(methods, repeats if K == 30 else max(3, repeats // 3))
        floor = times["floor (hand-written)"]
        tdeq = times.get("torchdeq")
        for name, f in methods.items():
            err = rel_error(f(), ref)
            mem = peak_bytes(f) / 2 ** 20
            vs_deq = f"{times[name] / tdeq:.2f}" if tdeq else "n/a"
            lines.append(f"| {name} | {K} | {times[name] * 1e3:.1f} | {times[name] / floor:.2f} "
                         f"| {vs_deq} | {mem:.2f} | {err:.1e} |")
            print(lines[-1], flush=True)
    return lines


# ---- 3. equal gradient error -----------------------------------------------------------------

def equal_peers(data, K: int) -> dict[str, Callable[[], tuple]]:
    """`_peer_methods` under the names of the equal-accuracy tables."""
    names = {"torchdeq": f"torchdeq ({K}+{K} iterations)", "torchopt": "torchopt (default CG)",
             "unrolled": f"unrolled ({K} iterations)"}
    return {names[k]: m for k, m in _peer_methods(data, K).items()}


def equal_candidates(data, K: int, residual_tol: float | None
                     ) -> dict[str, Callable[[], tuple]]:
    """The implicitdiff settings tried, each `custom_fixed_point(T, batch_dims=1, ...)`."""
    f32 = data[3].dtype == torch.float32
    rich = {"omega": -1.0}
    nochk = {"check_singular": False}
    settings: list[tuple[str, dict]] = [
        ("default (Auto)", {}),
        ("BiCGStab()", {"solve": idf.BiCGStab()}),
        ("Richardson(omega=-1)", {"solve": idf.Richardson(**rich)}),
        ("BiCGStab(check_singular=False)", {"solve": idf.BiCGStab(**nochk)}),
        ("Richardson(omega=-1, check_singular=False)",
         {"solve": idf.Richardson(**rich, **nochk)}),
    ]
    # explicit tolerances: looser ones (cheaper where the peer is less accurate), and in
    # float64 the default before the tolerance followed the forward (1e-12)
    for r in ((1e-5, 1e-7) if f32 else (1e-6,)):
        settings += [(f"Richardson(omega=-1, rtol={r:g})",
                      {"solve": idf.Richardson(rtol=r, **rich)}),
                     (f"Richardson(omega=-1, rtol={r:g}, check_singular=False)",
                      {"solve": idf.Richardson(rtol=r, **rich, **nochk)})]
    if f32:
        settings += [("BiCGStab(rtol=1e-7)", {"solve": idf.BiCGStab(rtol=1e-7)})]
    else:
        settings += [("BiCGStab(rtol=1e-12), the old default",
                      {"solve": idf.BiCGStab(rtol=1e-12)}),
                     ("Richardson(omega=-1, rtol=1e-12), the old default",
                      {"solve": idf.Richardson(rtol=1e-12, **rich)})]
    return {f"implicitdiff {name}": _implicit(data, K, residual_tol=residual_tol, **kw)
            for name, kw in settings}


EQUAL_PROBLEMS = {
    "DEQ layer (section 1), float32": dict(dtype=torch.float32, w_norm=0.5, u_scale=1.0,
                                           residual_tol=None),
    "slow contraction (‖W‖₂ = 1.2, inputs × 0.3), float64":
        dict(dtype=torch.float64, w_norm=1.2, u_scale=0.3, residual_tol=1e-6),
}


def bench_equal(repeats: int, K: int = 30) -> tuple[list[str], list[str]]:
    """Each peer against the cheapest implicitdiff setting with a gradient error no larger.
    Returns the detail lines and the summary rows."""
    lines = ["", f"Equal gradient error: batch 64, hidden 256, K = {K} forward iterations, "
             f"median of {repeats} interleaved repeats", ""]
    summary = ["", "| peer | problem | peer ms | peer err | cheapest implicitdiff at <= err "
               "| ms | err | × peer |", "|---|---|---|---|---|---|---|---|"]
    for pname, cfg in EQUAL_PROBLEMS.items():
        data = deq_data(cfg["dtype"], cfg["w_norm"], cfg["u_scale"])
        ref = exact_grads(*data)
        peers = equal_peers(data, K)
        cands = equal_candidates(data, K, cfg["residual_tol"])
        with idf.diagnostics() as d:
            cands["implicitdiff BiCGStab()"]()
        rec = d.backward[-1]
        times = interleaved_medians({**peers, **cands}, repeats)
        errs = {k: rel_error(f(), ref) for k, f in {**peers, **cands}.items()}
        lines += [f"{pname}: default backward rtol per sample "
                  f"{float(torch.tensor(rec.rtol).min()):.1e} to "
                  f"{float(torch.tensor(rec.rtol).max()):.1e} ({rec.rtol_source}), "
                  f"forward relative residual up to "
                  f"{float(torch.tensor(rec.forward_residual).max()):.1e}"
                  if rec.forward_residual is not None else f"{pname}:",
                  "", "| method | ms | grad rel. err |", "|---|---|---|"]
        for k in {**peers, **cands}:
            lines.append(f"| {k} | {times[k] * 1e3:.1f} | {errs[k]:.2e} |")
            print(lines[-1], flush=True)
        lines.append("")
        for peer in peers:
            ok = [c for c in cands if errs[c] <= errs[peer]]
            if ok:
                best = min(ok, key=lambda c: times[c])
                label = best.removeprefix("implicitdiff ")
            else:  # none as accurate (a rounding floor): the cheapest of the most accurate
                floor = min(errs[c] for c in cands)
                best = min((c for c in cands if errs[c] <= 1.001 * floor),
                           key=lambda c: times[c])
                label = (f"none; closest: {best.removeprefix('implicitdiff ')} "
                         f"({errs[best] / errs[peer]:.2f}× the error)")
            summary.append(f"| {peer} | {pname} | {times[peer] * 1e3:.1f} | {errs[peer]:.2e} "
                           f"| {label} | {times[best] * 1e3:.1f} "
                           f"| {errs[best]:.2e} | {times[best] / times[peer]:.2f} |")
            print(summary[-1], flush=True)
    return lines, summary


# ---- 2. the ridge hypergradient ------------------------------------------------------------

def ridge_F(x, lam, X, y):
    return X.T @ (X @ x - y) + lam * x


def bench_ridge(repeats: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    n, p = 200, 100
    X, Xv = (torch.randn(n, p, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(p, generator=g, dtype=torch.float64)
    y = X @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    yv = Xv @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    lam0 = torch.tensor(10.0, dtype=torch.float64)

    def direct(lam, X, y):
        return torch.linalg.solve(X.T @ X + lam * torch.eye(p, dtype=X.dtype), X.T @ y)

    def val(xs):
        return ((Xv @ xs - yv) ** 2).mean()

    tags = {idf.symmetric, idf.positive_definite}
    ridge_cg = idf.custom_root(ridge_F, solve=idf.CG(), tags=tags)(direct)
    ridge_cg5 = idf.custom_root(ridge_F, solve=idf.CG(rtol=1e-5), tags=tags)(direct)
    ridge_dense = idf.custom_root(ridge_F, solve=idf.Cholesky(), tags=tags)(direct)

    def grad_of(solver):
        def run():
            lam = lam0.clone().requires_grad_()
            (g_,) = torch.autograd.grad(val(solver(lam, X, y)), lam)
            return g_
        return run

    methods: dict[str, Callable[[], object]] = {
        "floor: autograd through solve": grad_of(direct),
        "implicitdiff CG (default rtol 1e-12)": grad_of(ridge_cg),
        "implicitdiff CG (rtol 1e-5, torchopt's)": grad_of(ridge_cg5),
        "implicitdiff Cholesky (dense)": grad_of(ridge_dense),
    }
    if torchopt is not None:
        def topt(solve):
            @torchopt.diff.implicit.custom_root(ridge_F, argnums=1, solve=solve)
            def solver(x0, lam, X, y):
                with torch.no_grad():
                    return direct(lam, X, y)

            def run():
                lam = lam0.clone().requires_grad_()
                (g_,) = torch.autograd.grad(val(solver(torch.zeros(p, dtype=X.dtype), lam, X,
                                                       y)), lam)
                return g_
            return run

        methods["torchopt solve_cg (rtol 1e-5)"] = topt(torchopt.linear_solve.solve_cg())
        methods["torchopt solve_inv (dense)"] = topt(torchopt.linear_solve.solve_inv())

    def unrolled():
        lam = lam0.clone().requires_grad_()
        xs = torch.zeros(p, dtype=X.dtype)
        step = 1.0 / (torch.linalg.matrix_norm(X, 2) ** 2 + lam0)
        for _ in range(300):
            xs = xs - step * ridge_F(xs, lam, X, y)
        (g_,) = torch.autograd.grad(val(xs), lam)
        return g_

    methods["unrolled GD (300 steps)"] = unrolled
    methods["implicitdiff forward mode (jvp)"] = lambda: torch.func.jvp(
        lambda lam: val(ridge_cg(lam, X, y)), (lam0,), (torch.ones_like(lam0),))
    times = interleaved_medians(methods, repeats)
    ref = grad_of(direct)()
    floor = times["floor: autograd through solve"]
    lines = [
        "",
        "Ridge hypergradient: X ∈ ℝ^{200×100}, validation 200×100, float64, d val_loss / dλ",
        "",
        "| method | ms | × floor | |grad − floor's| |",
        "|---|---|---|---|",
    ]
    for name, t in times.items():
        out = methods[name]()
        val_ = out[1] if isinstance(out, tuple) else out
        lines.append(f"| {name} | {t * 1e3:.2f} | {t / floor:.2f} | "
                     f"{float((val_ - ref).abs()):.1e} |")
        print(lines[-1], flush=True)
    lams = torch.linspace(1.0, 20.0, 16, dtype=torch.float64)
    vg = {"implicitdiff CG vmap(grad), 16 λ": lambda: torch.func.vmap(
              torch.func.grad(lambda lam: val(ridge_cg(lam, X, y))))(lams),
          "floor vmap(grad), 16 λ": lambda: torch.func.vmap(
              torch.func.grad(lambda lam: val(direct(lam, X, y))))(lams)}
    tv = interleaved_medians(vg, max(3, repeats // 3))
    for name, t in tv.items():
        lines.append(f"| {name} | {t * 1e3:.2f} | {t / floor:.2f} | |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (a smoke test)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--equal", action="store_true",
                    help="only section 3, the comparison at equal gradient error")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 21)
    print("peers:", "torchdeq " + ("yes" if torchdeq else "not installed") + ",",
          "torchopt " + (torchopt.__version__ if torchopt else "not installed"))
    eq_lines, summary = bench_equal(max(3, repeats // 2))
    lines = eq_lines if args.equal else bench_deq(repeats) + bench_ridge(repeats) + eq_lines
    print("\n".join(lines + summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
