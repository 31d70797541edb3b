"""examples/optnet_sudoku.py: its puzzles are valid and unique (checked by an independent
backtracking solver), and a reduced training run learns, in PyTorch and in JAX."""

from __future__ import annotations

import importlib.util
import itertools
import pathlib

import numpy as np
import pytest

import implicitdiff as idf

PATH = pathlib.Path(__file__).parents[1] / "examples" / "optnet_sudoku.py"


def _load():
    spec = importlib.util.spec_from_file_location("optnet_sudoku", PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ex = _load()


# ---- independent oracles: Sudoku's rules as sets, a backtracking solution counter -------------

def _valid(grid: np.ndarray) -> bool:
    """Every row, column and 2×2 box holds {0, 1, 2, 3}."""
    want = {0, 1, 2, 3}
    rows = all(set(grid[r]) == want for r in range(4))
    cols = all(set(grid[:, c]) == want for c in range(4))
    boxes = all(set(grid[r:r + 2, c:c + 2].ravel()) == want
                for r, c in itertools.product((0, 2), (0, 2)))
    return rows and cols and boxes


def _count_solutions(clues: np.ndarray, limit: int = 2) -> int:
    """Solutions of a 4×4 puzzle (-1 = hidden), counted by backtracking, up to `limit`."""
    g = clues.copy()

    def ok(r: int, c: int, v: int) -> bool:
        br, bc = 2 * (r // 2), 2 * (c // 2)
        return v not in g[r] and v not in g[:, c] and v not in g[br:br + 2, bc:bc + 2]

    def rec() -> int:
        empty = np.argwhere(g < 0)
        if len(empty) == 0:
            return 1
        r, c = empty[0]
        n = 0
        for v in range(4):
            if ok(r, c, v):
                g[r, c] = v
                n += rec()
                g[r, c] = -1
                if n >= limit:
                    break
        return n

    return rec()


def _decode(onehot: np.ndarray) -> np.ndarray:
    """(64,) one-hot, hidden cells all zero -> (4, 4) values, -1 where hidden."""
    cells = onehot.reshape(16, 4)
    return np.where(cells.sum(1) > 0, cells.argmax(1), -1).reshape(4, 4)


def test_all_grids_are_the_288_valid_grids():
    grids = ex.all_grids()
    assert grids.shape == (288, 4, 4)                  # the known number of 4×4 Sudoku grids
    assert len({g.tobytes() for g in grids}) == 288
    assert all(_valid(g) for g in grids)


def test_puzzles_unique_consistent_and_held_out_distinct():
    rng = np.random.default_rng(3)
    grids = ex.all_grids()
    P, S = ex.make_puzzles(40, rng, grids)
    Pt, St = ex.make_puzzles(20, rng, grids, exclude={p.tobytes() for p in P})
    for p, s in zip(np.concatenate([P, Pt]), np.concatenate([S, St])):
        sol, clues = _decode(s), _decode(p)
        assert _valid(sol)
        assert np.all((clues == sol) | (clues < 0))     # the clues are the solution's
        assert _count_solutions(clues) == 1              # and determine it
        assert 4 <= (clues >= 0).sum() <= 6              # a few clues only
    assert not {p.tobytes() for p in P} & {p.tobytes() for p in Pt}


def test_rules_matrix_holds_for_solutions_and_has_rank_40():
    R = ex.rules_matrix()
    _, S = ex.make_puzzles(10, np.random.default_rng(0), ex.all_grids())
    np.testing.assert_array_equal(R @ S.T, 1.0)
    assert np.linalg.matrix_rank(R) == ex.N_EQ == 40
    assert ex.rules_gap(R[[0, 5, 17, 40]]) < 1e-12
    assert ex.rules_gap(np.random.default_rng(0).uniform(size=(40, 64))) > 0.1


def test_solved_counts_only_fully_right_boards():
    _, S = ex.make_puzzles(3, np.random.default_rng(1), ex.all_grids())
    x = 0.5 * S + 0.1                                   # every cell's argmax right
    wrong = (int(S[1, :4].argmax()) + 1) % 4
    x[1, wrong] = 0.9                                   # puzzle 1, cell 0: a wrong value wins
    assert list(ex.solved(x, S)) == [True, False, True]
    assert ex.cells_right(x, S).sum() == 3 * 16 - 1


# ---- learning, in each framework ------------------------------------------------------------

CONFIG = ["--epochs", "3", "--train", "200", "--test", "50", "--batch", "50", "--seed", "0"]


def _check_learns(out: dict) -> None:
    losses, cells = out["losses"], out["test_cells"]
    # the training loss of the last epoch is at most a quarter of the untrained model's
    # (measured: 1.43 -> 0.26)
    assert losses[-1] < losses[0] / 4, losses
    # and held-out cells are right more often than before training (measured: 0.43 -> 0.52)
    assert cells[-1] > cells[0] + 0.05, cells
    assert out["test_solved"][-1] >= out["test_solved"][0]


def test_learns_torch(capsys):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    out = ex.main(["--framework", "torch", *CONFIG])
    _check_learns(out)
    assert torch.get_num_threads() == threads             # the run's one thread is undone
    assert "held-out puzzles solved exactly" in capsys.readouterr().out


def test_learns_jax(capsys):
    jax = pytest.importorskip("jax")
    x64 = jax.config.read("jax_enable_x64")
    out = ex.main(["--framework", "jax", *CONFIG])
    _check_learns(out)
    assert jax.config.read("jax_enable_x64") == x64      # the run's float64 is undone
    assert "held-out puzzles solved exactly" in capsys.readouterr().out


def test_torch_and_jax_agree_on_the_first_steps():
    """The same data, initial parameters and Adam: the two frameworks' runs are one run."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    cfg = ["--epochs", "1", "--train", "50", "--test", "20", "--batch", "25", "--seed", "1"]
    a = ex.main(["--framework", "torch", *cfg])
    b = ex.main(["--framework", "jax", *cfg])
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-8)


# ---- the layer with Sudoku's true rules -------------------------------------------------------

def _true_rules() -> np.ndarray:
    """40 linearly independent rows of the rules (a greedy basis)."""
    R, rows = ex.rules_matrix(), []
    for r in R:
        if np.linalg.matrix_rank(np.array([*rows, r])) > len(rows):
            rows.append(r)
    return np.array(rows)


def test_true_rules_solve_every_puzzle():
    """With A the rules and z0 uniform (b = 1), every puzzle's QP solves (its tight constraints
    are linearly dependent at the integral vertices: basic multipliers, flagged degenerate), and
    the solution's argmax is the puzzle's solution (what training should reach); the gradient
    with respect to the rules is finite."""
    torch = pytest.importorskip("torch")
    A = _true_rules()
    P, S = ex.make_puzzles(20, np.random.default_rng(0), ex.all_grids())
    sol = idf.qp.solve_qp(ex._Q, -P, A=A, b=A @ np.full(64, 0.25), G=ex._G, h=ex._H,
                          full_output=True)
    assert (np.asarray(sol.stats.status) == idf.qp.SOLVED).all()
    assert np.asarray(sol.stats.degenerate).any()
    assert np.max(np.asarray(sol.stats.dual_residual)) < 1e-10
    assert ex.solved(np.asarray(sol.x), S).all()
    At = torch.tensor(A, requires_grad=True)
    x = idf.qp.solve_qp(torch.tensor(ex._Q), -torch.tensor(P), A=At,
                        b=At @ torch.full((64,), 0.25, dtype=torch.float64),
                        G=torch.tensor(ex._G), h=torch.tensor(ex._H))
    (x * torch.tensor(S)).sum().backward()
    assert At.grad is not None and torch.isfinite(At.grad).all()
