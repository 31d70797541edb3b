"""torch.compile compatibility of implicitdiff's `DEQ` against torchdeq: graphs, graph breaks,
where the breaks come from, and whether compiled gradients equal eager ones.

    python benchmarks/bench_compile.py               # full run (about 3 minutes on 2 CPU cores)
    python benchmarks/bench_compile.py --quick       # skip inductor (no C++ compiler needed; 2 min)
    python benchmarks/bench_compile.py --hidden 64   # a smaller cell

The model is the tanh cell of `bench_deq.py`, f(z, x) = tanh(W z + U x + b) (batch 64, hidden
256, float32, ‖W‖₂ = 0.5), without its call counter (an int attribute that Dynamo guards on,
which would add recompilations of its own). Forward: Anderson, relative tolerance 1e-4, history
5, at most 100 iterations, in both libraries; loss sum(z²).

For each library and backward mode (implicitdiff `IFT(BiCGStab)`, `Phantom(5)`, `JFB()`;
torchdeq `get_deq(ift=True, b_solver="fixed_point_iter")` and `get_deq(grad=5)`):

- graphs / breaks: `torch._dynamo.explain(loss)(x)` (forward and loss: `explain` only runs the
  function, and a `.backward()` inside it would itself be a graph break);
- fwd+bwd graphs: `torch.compile(loss, backend=counting)` then `.backward()` outside, where
  `counting` is AOTAutograd with forward and backward compilers that count the graphs they get
  (Dynamo graphs / AOT forward graphs / AOT backward graphs), then 2 more calls: graphs compiled
  by those (recompilations; 0 is what one wants);
- main break reasons: `explain`'s break reasons, deduplicated (reason, innermost user frame,
  count);
- grad rel. err: the gradient with respect to (W, U, b) of the compiled loss against the eager
  one on the same module, for backend="aot_eager" and backend="inductor" ("fail: ..." if it
  raises; in parentheses the time of the first, compiling, call, with Inductor's graph cache
  off).

implicitdiff runs the forward solve eagerly, one opaque call for Dynamo (`DEQ._solve` is
`torch.compiler.disable`d; before that, Phantom and JFB compiled 26 graphs and ran 62–116
compiled fragments per call, growing with the iterations). A second table shows how the graph
count follows the number of forward iterations (tolerance 1e-3 ... 1e-7).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from bench_deq import BTOL, MAXITER, TOL, Cell, make_data
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

import implicitdiff as idf

warnings.filterwarnings("ignore")
torch._logging.set_logs(dynamo=logging.ERROR)  # Dynamo's per-break warnings: we count them

try:
    import torchdeq
except ImportError:  # pragma: no cover - optional
    torchdeq = None


class QuietCell(Cell):
    """`bench_deq.Cell` without its call counter."""

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


# ---- the cases -------------------------------------------------------------------------------

def make_case(lib: str, mode: str, data, hidden: int, tol: float = TOL
              ) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """(loss(x), parameters) for one library and mode, on a fresh cell."""
    W, U, b, _ = data
    cell = QuietCell(W.float(), U.float(), b.float())
    params = [cell.W.weight, cell.U.weight, cell.U.bias]
    if lib == "implicitdiff":
        from implicitdiff_torch import DEQ, IFT, JFB, Phantom

        backward = {"IFT (BiCGStab)": IFT(idf.BiCGStab(rtol=BTOL, maxiter=MAXITER)),
                    "Phantom(5)": Phantom(5), "JFB": JFB()}[mode]
        deq = DEQ(cell, z_shape=(hidden,), solver="anderson",
                  solver_options={"tol": tol, "maxiter": MAXITER, "m": 5}, backward=backward)

        def loss(x):
            return (deq(x) ** 2).sum()

        loss.steps = lambda: int(deq.stats.steps.max())  # type: ignore[attr-defined]
        return loss, params
    kw = ({"ift": True, "b_solver": "fixed_point_iter", "b_tol": BTOL, "b_stop_mode": "rel",
           "b_max_iter": MAXITER} if mode.startswith("ift") else {"grad": 5, "tau": 1.0})
    layer = torchdeq.get_deq(f_solver="anderson", f_max_iter=MAXITER, f_tol=tol,
                             f_stop_mode="rel", **kw)
    info: dict = {}

    def loss(x):
        zs, inf = layer(lambda z: cell(z, x), torch.zeros(x.shape[0], hidden),
                        solver_kwargs={"m": 6})
        info["nstep"] = inf["nstep"]
        return (zs[-1] ** 2).sum()

    loss.steps = lambda: int(info["nstep"].max())  # type: ignore[attr-defined]
    return loss, params


# ---- measurements ----------------------------------------------------------------------------

_SHORT = [
    (r"Tensor\.item\(\)", "Tensor.item() (bool(tensor))"),
    (r"Data-dependent branching", "data-dependent branch"),
    (r"torch\.compiler\.disable", "compiler.disable'd fn"),
    (r"marked as skipped", "fn Dynamo skips"),
    (r"torch\.autograd\.grad", "torch.autograd.grad"),
    (r"register_hook|hook", "tensor hook"),
]


def short_reason(reason: str) -> str:
    first = reason.strip().splitlines()[0]
    for pat, short in _SHORT:
        if re.search(pat, first):
            return short
    return first[:40]


def user_frame(stack) -> str:
    """The innermost frame outside torch itself, as `file:function`."""
    for fs in reversed(stack or []):
        if f"{os.sep}torch{os.sep}" not in fs.filename:
            return f"{os.path.basename(fs.filename)}:{fs.name}"
    return "?"


def explain_counts(loss, x) -> tuple[int, int, str]:
    torch._dynamo.reset()
    e = torch._dynamo.explain(loss)(x)
    c = Counter((short_reason(r.reason), user_frame(r.user_stack)) for r in e.break_reasons)
    reasons = "; ".join(f"{r} @ {where}" + (f" ×{n}" if n > 1 else "")
                        for (r, where), n in c.most_common())
    return e.graph_count, e.graph_break_count, reasons or "-"


def zero(params) -> None:
    for p in params:
        p.grad = None


def fwd_bwd_counts(loss, x, params) -> tuple[str, int, int]:
    """Graphs that Dynamo and AOTAutograd compile for forward + backward; recompilations over
    two more calls; compiled graphs run by the last call (each switch between a compiled graph
    and eager Python is a graph break paid at run time)."""
    from functorch.compile import make_boxed_func

    torch._dynamo.reset()
    counters.clear()
    n = Counter()

    def fw(gm, _):
        n["fw"] += 1
        return make_boxed_func(gm.forward)

    def bw(gm, _):
        n["bw"] += 1
        return make_boxed_func(gm.forward)

    aot = aot_autograd(fw_compiler=fw, bw_compiler=bw)

    def counting(gm, example_inputs):
        n["dynamo"] += 1
        compiled = aot(gm, example_inputs)

        def run(*a):
            n["runs"] += 1
            return compiled(*a)

        return run

    f = torch.compile(loss, backend=counting)
    zero(params)
    f(x).backward()
    first = dict(n)
    for _ in range(2):
        zero(params)
        runs = n["runs"]
        f(x).backward()
    return (f"{first.get('dynamo', 0)} / {first.get('fw', 0)} / {first.get('bw', 0)}",
            n["dynamo"] - first.get("dynamo", 0), n["runs"] - runs)


def rel(a, b) -> float:
    num = sum(float((p - q).double().pow(2).sum()) for p, q in zip(a, b))
    den = sum(float(q.double().pow(2).sum()) for q in b)
    return (num / den) ** 0.5


def grad_error(loss, x, params, backend: str, eager) -> str:
    torch._dynamo.reset()
    if backend == "inductor":
        import torch._inductor.config as ic

        ic.fx_graph_cache = False  # compile times below are cold ones, not cache hits
    try:
        f = torch.compile(loss, backend=backend)
        zero(params)
        f(x).backward()
        return f"{rel([p.grad for p in params], eager):.1e}"
    except Exception as e:  # reported in the table
        return f"fail: {type(e).__name__}"


def eager_grads(loss, x, params):
    zero(params)
    loss(x).backward()  # also warms up one-time work (backend registry, entry points)
    return [p.grad.clone() for p in params]


# ---- the tables ------------------------------------------------------------------------------

def cases() -> list[tuple[str, str]]:
    out = [("implicitdiff", m) for m in ("IFT (BiCGStab)", "Phantom(5)", "JFB")]
    if torchdeq is not None:
        out += [("torchdeq", "ift (fixed_point_iter)"), ("torchdeq", "phantom (grad=5)")]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the inductor column")
    ap.add_argument("--hidden", type=int, default=256, help="hidden and input size (256)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (64)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import bench_deq

    bench_deq.H = bench_deq.D = args.hidden
    bench_deq.B = args.batch
    data = make_data(0.5)
    x = data[3].float()
    h = args.hidden
    from importlib.metadata import version

    tdv = version("torchdeq") if torchdeq is not None else "not installed"
    print(f"torch {torch.__version__}, torchdeq {tdv}, CPU; tanh cell batch {args.batch}, "
          f"hidden {h}, float32, Anderson tol {TOL}\n")
    print("| library | mode | fwd steps (max) | graphs (explain) | graph breaks (explain) "
          "| fwd+bwd graphs: Dynamo / AOT fw / AOT bw | recompiles (calls 2-3) "
          "| fwd graphs run per call | grad rel. err aot_eager | grad rel. err inductor "
          "| main break reasons |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for lib, mode in cases():
        loss, params = make_case(lib, mode, data, h)
        eager = eager_grads(loss, x, params)
        steps = loss.steps()
        g, nb, reasons = explain_counts(loss, x)
        fb, recompiles, runs = fwd_bwd_counts(loss, x, params)
        e_aot = grad_error(loss, x, params, "aot_eager", eager)
        t = time.perf_counter()
        e_ind = "skipped" if args.quick else grad_error(loss, x, params, "inductor", eager)
        if not args.quick and not e_ind.startswith("fail"):
            e_ind += f" ({time.perf_counter() - t:.0f} s)"
        print(f"| {lib} | {mode} | {steps} | {g} | {nb} | {fb} | {recompiles} | {runs} "
              f"| {e_aot} | {e_ind} | {reasons} |", flush=True)

    print("\nAgainst the number of forward iterations, Phantom(5) (torchdeq: grad=5): graphs "
          "compiled (explain) / compiled graphs run per forward+backward call\n")
    print("| Anderson tol | implicitdiff steps (max) | implicitdiff "
          "| torchdeq steps (max) | torchdeq |")
    print("|---|---|---|---|---|", flush=True)
    for tol in (1e-3, 1e-4, 1e-5, 1e-7):
        loss, params = make_case("implicitdiff", "Phantom(5)", data, h, tol)
        eager_grads(loss, x, params)
        steps = loss.steps()
        row = [f"{explain_counts(loss, x)[0]} / {fwd_bwd_counts(loss, x, params)[2]}"]
        if torchdeq is not None:
            loss, params = make_case("torchdeq", "phantom", data, h, tol)
            eager_grads(loss, x, params)
            row += [str(loss.steps()), f"{explain_counts(loss, x)[0]} / "
                    f"{fwd_bwd_counts(loss, x, params)[2]}"]
        else:
            row += ["n/a", "n/a"]
        print(f"| {tol:g} | {steps} | {row[0]} | {row[1]} | {row[2]} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
