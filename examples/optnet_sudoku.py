"""OptNet's 4×4 Sudoku (Amos & Kolter 2017, Sec. 5.2): learn the rules of Sudoku as the equality
constraints of a quadratic program, from puzzles and their solutions only. PyTorch or JAX, on CPU.

    python examples/optnet_sudoku.py --framework torch          # a few minutes on 2 CPU cores
    python examples/optnet_sudoku.py --framework jax
    python examples/optnet_sudoku.py --framework torch --epochs 3 --train 200 --test 50   # smoke

The data: every valid 4×4 Sudoku grid (all 288, enumerated by backtracking), and puzzles made
from random grids by hiding cells in random order for as long as the solution stays unique (4 to
6 clues left: minimal puzzles). A grid is one-hot encoded: x[(4r + c)·4 + v] = 1 when cell
(r, c) holds v, 4·4·4 = 64 variables; a puzzle is the same with hidden cells all zero. Held-out
puzzles are distinct from the training puzzles.

The layer, as in OptNet:

    x*(p; A, z0) = argmin_x  ½ ε ‖x‖² − pᵀx   s.t.  A x = A z0,  −x ≤ 0

with p the puzzle, ε = 0.1, and the learned parameters A (40 × 64, the rank of the true rules:
each cell, row, column and box holds each value once, 64 equations of rank 40), initialised
uniformly at random, and z0 = exp(log_z0) > 0, so b = A z0 keeps the problem strictly feasible
whatever A is. The loss is the mean squared error between x* and the solution's one-hot (OptNet's
choice); a held-out puzzle counts as solved when the argmax of x* in every cell is the solution's
value. The QP is `idf.qp.solve_qp`, batched over puzzles (A, b, Q, G, h shared); its derivatives
with respect to A and log_z0 come from the active-set KKT system.

Everything but the framework hooks (conversion, value-and-gradient, jit, per-run settings) is
written once: the layer, the loss and a small Adam use only operators and the array-API namespace
of their inputs.

Known limitation (docs/optimization-layers.md): once the rules are learned, x* is an integral
vertex where the active constraints (48 bounds, 40 equations, 64 variables) are linearly
dependent; `solve_qp` as of commit 11a600d does not polish such points and the run stops within
five epochs with a `NonConvergenceError`. The published figures (99/100 torch, 96/100 JAX after
20 epochs) were measured with a polish that keeps a linearly independent subset of the active
constraints, and `--tol 1e-12`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import array_api_compat
import numpy as np

import implicitdiff as idf

N = 4                       # the board is N × N, boxes 2 × 2
NX = N * N * N              # 64 one-hot variables
N_EQ = 40                   # rank of the true rules
EPS = 0.1                   # Q = ε I (OptNet's Qpenalty)


# ---- puzzles ---------------------------------------------------------------------------------

def all_grids() -> np.ndarray:
    """Every valid 4×4 Sudoku grid, (288, 4, 4) with values 0..3, by backtracking cell by cell."""
    grid, out = np.zeros((N, N), int), []

    def fits(r: int, c: int, v: int) -> bool:
        br, bc = 2 * (r // 2), 2 * (c // 2)
        return (v not in grid[r, :c] and v not in grid[:r, c]
                and v not in [grid[i, j] for i in range(br, r + 1) for j in range(bc, bc + 2)
                              if (i, j) < (r, c)])

    def fill(k: int) -> None:
        if k == N * N:
            out.append(grid.copy())
            return
        r, c = divmod(k, N)
        for v in range(N):
            if fits(r, c, v):
                grid[r, c] = v
                fill(k + 1)

    fill(0)
    return np.array(out)


def make_puzzles(n: int, rng: np.random.Generator, grids: np.ndarray,
                 exclude: set[bytes] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` puzzles and their solutions, one-hot, each (n, 64). A puzzle is a random grid with
    cells hidden in random order as long as only that grid fits the remaining clues; a puzzle
    whose clues are in `exclude` (the training set's) is drawn again."""
    flat = grids.reshape(len(grids), N * N)
    eye = np.eye(N)
    puzzles, solutions, seen = [], [], set(exclude or ())
    while len(puzzles) < n:
        sol = flat[rng.integers(len(flat))]
        shown = np.ones(N * N, bool)
        for cell in rng.permutation(N * N):
            shown[cell] = False
            if np.all(flat[:, shown] == sol[shown], axis=1).sum() > 1:
                shown[cell] = True                  # hiding it would allow a second solution
        p = (eye[sol] * shown[:, None]).reshape(NX)
        if p.tobytes() in seen:
            continue
        seen.add(p.tobytes())
        puzzles.append(p)
        solutions.append(eye[sol].reshape(NX))
    return np.array(puzzles), np.array(solutions)


def rules_matrix() -> np.ndarray:
    """The true rules as equations R x = 1 (64 × 64, rank 40): each cell holds one value; each
    row, column and box holds each value once."""
    idx = np.arange(NX).reshape(N, N, N)    # [row, col, value]
    groups = ([idx[r, c, :] for r in range(N) for c in range(N)]
              + [idx[r, :, v] for r in range(N) for v in range(N)]
              + [idx[:, c, v] for c in range(N) for v in range(N)]
              + [idx[2 * br:2 * br + 2, 2 * bc:2 * bc + 2, v].ravel()
                 for br in range(2) for bc in range(2) for v in range(N)])
    R = np.zeros((len(groups), NX))
    for i, g in enumerate(groups):
        R[i, g] = 1.0
    return R


def rules_gap(A: np.ndarray) -> float:
    """How far the learned rows are from the true rules: ‖(I − P)Aᵀ‖_F / ‖A‖_F, with P the
    projection on the row space of the true rules (0 when every learned equation is a
    combination of Sudoku's rules)."""
    U, s, _ = np.linalg.svd(rules_matrix().T, full_matrices=False)
    U = U[:, s > 1e-9 * s[0]]
    At = A.T - U @ (U.T @ A.T)
    return float(np.linalg.norm(At) / np.linalg.norm(A))


# ---- the model, the loss, Adam: written once for every framework ------------------------------

_Q = EPS * np.eye(NX)               # NumPy arrays beside framework arrays are constants
_G, _H = -np.eye(NX), np.zeros(NX)


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """OptNet's initialisation: A uniform on [0, 1), z0 = exp(0) = 1."""
    return {"A": rng.uniform(size=(N_EQ, NX)), "log_z0": np.zeros(NX)}


def layer(params: dict[str, Any], puzzles: Any, tol: float | None = None) -> Any:
    """x* for a batch of puzzles (B, 64) -> (B, 64): one batched `solve_qp`."""
    xp = array_api_compat.array_namespace(puzzles)
    A = params["A"]
    b = A @ xp.exp(params["log_z0"])
    return idf.qp.solve_qp(_Q, -puzzles, A=A, b=b, G=_G, h=_H, tol=tol)


def loss_fn(params: dict[str, Any], puzzles: Any, solutions: Any, tol: float | None = None
            ) -> Any:
    """OptNet's loss: the mean squared error between x* and the solution's one-hot."""
    xp = array_api_compat.array_namespace(puzzles)
    return xp.mean((layer(params, puzzles, tol) - solutions) ** 2)


def solved(x: np.ndarray, solutions: np.ndarray) -> np.ndarray:
    """Per puzzle: is the argmax of every cell the solution's value?"""
    return np.all(cells_right(x, solutions), axis=1)


def cells_right(x: np.ndarray, solutions: np.ndarray) -> np.ndarray:
    """Per puzzle and cell: is the argmax the solution's value? (B, 16)"""
    return x.reshape(-1, N * N, N).argmax(-1) == solutions.reshape(-1, N * N, N).argmax(-1)


def adam_init(params: dict[str, Any]) -> dict[str, Any]:
    return {"m": {k: 0 * v for k, v in params.items()}, "v": {k: 0 * v for k, v in params.items()},
            "t": 0}


def adam_update(params: dict[str, Any], grads: dict[str, Any], state: dict[str, Any], lr: float,
                b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One Adam step (Kingma & Ba), operators only: the same code for torch and JAX arrays."""
    t = state["t"] + 1
    m = {k: b1 * state["m"][k] + (1 - b1) * grads[k] for k in params}
    v = {k: b2 * state["v"][k] + (1 - b2) * grads[k] ** 2 for k in params}
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    new = {k: params[k] - lr * (m[k] / c1) / ((v[k] / c2) ** 0.5 + eps) for k in params}
    return new, {"m": m, "v": v, "t": t}


# ---- the framework hooks ----------------------------------------------------------------------

class Framework:
    """Conversion to and from the framework, its value-and-gradient, its jit."""

    name: str

    def asarray(self, a: np.ndarray) -> Any:
        raise NotImplementedError

    def value_and_grad(self, f: Callable[..., Any]) -> Callable[..., tuple[Any, dict]]:
        raise NotImplementedError

    def jit(self, f: Callable[..., Any]) -> Callable[..., Any]:
        return f

    def context(self) -> contextlib.AbstractContextManager:
        """Settings for the run (entered around all of it)."""
        return contextlib.nullcontext()


class Torch(Framework):
    name = "torch"

    def __init__(self) -> None:
        import torch
        self.torch = torch

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """One intra-op thread for this run (the backward's small per-sample solves lose to
        thread synchronization on a busy machine), restored afterwards."""
        n = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        try:
            yield
        finally:
            self.torch.set_num_threads(n)

    def asarray(self, a: np.ndarray) -> Any:
        return self.torch.as_tensor(np.asarray(a), dtype=self.torch.float64)

    def value_and_grad(self, f: Callable[..., Any]) -> Callable[..., tuple[Any, dict]]:
        torch = self.torch

        def vg(params: dict, *args: Any) -> tuple[Any, dict]:
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            loss = f(leaves, *args)
            grads = torch.autograd.grad(loss, list(leaves.values()))
            return loss.detach(), dict(zip(leaves, grads))

        return vg

    def no_grad(self, f: Callable[..., Any]) -> Callable[..., Any]:
        return self.torch.no_grad()(f)


class Jax(Framework):
    name = "jax"

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp
        self.jax, self.jnp = jax, jnp

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """float64 for this run, restored afterwards. The global flag, not the thread-local
        `jax.enable_x64` context: the solver's host callback may run on another thread."""
        old = bool(self.jax.config.read("jax_enable_x64"))
        self.jax.config.update("jax_enable_x64", True)
        try:
            yield
        finally:
            self.jax.config.update("jax_enable_x64", old)

    def asarray(self, a: np.ndarray) -> Any:
        return self.jnp.asarray(np.asarray(a), dtype=self.jnp.float64)

    def value_and_grad(self, f: Callable[..., Any]) -> Callable[..., tuple[Any, dict]]:
        return self.jax.value_and_grad(f)

    def jit(self, f: Callable[..., Any]) -> Callable[..., Any]:
        return self.jax.jit(f)


FRAMEWORKS = {"torch": Torch, "jax": Jax}


# ---- training ---------------------------------------------------------------------------------

def batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    perm = rng.permutation(n)
    for i in range(0, n, size):
        yield perm[i:i + size]


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """One BLAS thread, when threadpoolctl is installed: the host solve factors a batch of small
    (168 × 168) KKT matrices, where a multithreaded BLAS only adds synchronization (on a busy
    2-core machine it made each step about 100 times slower)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--framework", choices=sorted(FRAMEWORKS), default="torch")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--train", type=int, default=1000, help="training puzzles")
    ap.add_argument("--test", type=int, default=100, help="held-out puzzles")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.1, help="Adam's step (OptNet's 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=None,
                    help="solve_qp's interior-point tolerance (default: the library's)")
    args = ap.parse_args(argv)

    fw = FRAMEWORKS[args.framework]()
    rng = np.random.default_rng(args.seed)
    grids = all_grids()
    Ptr, Str = make_puzzles(args.train, rng, grids)
    Pte, Ste = make_puzzles(args.test, rng, grids, exclude={p.tobytes() for p in Ptr})
    clues = Pte.reshape(-1, N * N, N).sum((1, 2))
    print(f"OptNet 4×4 Sudoku ({fw.name}): {args.train} training and {args.test} held-out "
          f"puzzles ({clues.mean():.1f} clues of 16 on average), {N_EQ} learned equations, "
          f"batch {args.batch}, Adam lr {args.lr}")

    with fw.context(), one_blas_thread():
        params = {k: fw.asarray(v) for k, v in init_params(rng).items()}
        state = adam_init(params)
        vg = fw.jit(fw.value_and_grad(functools.partial(loss_fn, tol=args.tol)))
        forward = fw.jit(functools.partial(layer, tol=args.tol))
        if isinstance(fw, Torch):
            forward = fw.no_grad(forward)

        def evaluate(params: dict) -> tuple[float, int, float]:
            """Held-out loss, puzzles solved exactly, fraction of cells right."""
            x = np.asarray(forward(params, fw.asarray(Pte)))
            return (float(np.mean((x - Ste) ** 2)), int(solved(x, Ste).sum()),
                    float(cells_right(x, Ste).mean()))

        def train_loss(params: dict) -> float:
            x = np.asarray(forward(params, fw.asarray(Ptr)))
            return float(np.mean((x - Str) ** 2))

        _, ok, cells = evaluate(params)
        losses, test_solved, test_cells = [train_loss(params)], [ok], [cells]
        print(f"epoch  0  train loss {losses[0]:.4f}  held-out solved {ok}/{args.test}, "
              f"cells right {cells:.3f}")
        train_time = 0.0
        for epoch in range(1, args.epochs + 1):
            t0, total = time.perf_counter(), 0.0
            for idx in batches(args.train, args.batch, rng):
                loss, grads = vg(params, fw.asarray(Ptr[idx]), fw.asarray(Str[idx]))
                params, state = adam_update(params, grads, state, args.lr)
                total += float(loss) * idx.size
            train_time += time.perf_counter() - t0
            losses.append(total / args.train)
            test_loss, ok, cells = evaluate(params)
            test_solved.append(ok)
            test_cells.append(cells)
            print(f"epoch {epoch:2d}  train loss {losses[-1]:.4f}  held-out loss {test_loss:.4f}"
                  f"  solved {ok}/{args.test}, cells right {cells:.3f}  ({train_time:.1f} s "
                  "training)", flush=True)
        gap = rules_gap(np.asarray(params["A"]))

    print(f"\n{fw.name}: {test_solved[-1]}/{args.test} held-out puzzles solved exactly after "
          f"{args.epochs} epochs ({test_solved[0]}/{args.test} untrained); training "
          f"{train_time:.1f} s on CPU; learned equations' distance to the rules' row space "
          f"{gap:.1e}")
    return {"losses": losses, "test_solved": test_solved, "test_cells": test_cells,
            "n_test": args.test,
            "train_time": train_time, "rules_gap": gap}


if __name__ == "__main__":
    main()
