"""The `implicitdiff` command: `implicitdiff check` and `implicitdiff demo`.

`check` verifies implicit derivatives across frameworks against central finite differences and the
NumPy reference; `demo` tunes a ridge penalty by hypergradient descent in every installed
framework. Frameworks are imported only when a subcommand needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import array_api_compat
import numpy as np

from . import _gallery
from ._backend import _BUILTINS, Backend, _table, backend_named, find_backend, get_backend
from ._diagnostics import diagnostics
from ._linear_solve import Cholesky
from ._root import ImplicitFunction, custom_root
from ._tags import positive_definite, symmetric
from ._transforms import jvp as idf_jvp
from ._transforms import vjp as idf_vjp

FRAMEWORKS = tuple(_BUILTINS)  # the built-in backends (NumPy first), run by default when installed

_USER_FORMAT = """\
Problems. Each PROBLEM is either the name of a gallery problem (see --list) or MODULE:NAME:

  MODULE  an importable module (mypkg.layers; the current directory is on the path)
          or a path to a Python file (path/to/problem.py).
  NAME    an attribute of MODULE, one of
          (a) a solver decorated with idf.custom_root / idf.custom_fixed_point, with example
              arguments in a sibling attribute NAME_args of MODULE (or an attribute
              `example_args` of the solver): a tuple of NumPy arrays / floats, or a
              zero-argument function returning one;
          (b) a zero-argument function returning (solver, args), solver decorated as in (a).

  Arguments may be pytrees (tuples, lists, dicts). Floating arrays and Python floats are
  converted to float64 in each framework (floats become 0-d arrays) and perturbed; integer,
  boolean and other leaves are passed through unchanged and get no derivative. The solver must
  run on each backend checked (restrict them with --backends numpy).

Example module:

  import numpy as np, implicitdiff as idf
  def F(x, theta): return x ** 3 + x - theta
  @idf.custom_root(F)
  def cubic(theta):  # Newton's method
      x = 0 * theta
      for _ in range(50): x = x - F(x, theta) / (3 * x ** 2 + 1)
      return x
  cubic_args = (np.linspace(-1.0, 1.0, 5),)
"""


# ================================================================================================
# frameworks
# ================================================================================================

def backend_status(name: str) -> str | None:
    """None when framework `name` and its implicitdiff backend are importable; else why not."""
    if name not in FRAMEWORKS:
        return f"unknown framework (expected one of {', '.join(FRAMEWORKS)})"
    framework, spec = _table[name]
    if importlib.util.find_spec(framework) is None:
        return f"{framework} is not installed"
    # The backend first: importing a framework whose backend is unusable would make the core
    # consider that backend for every call.
    modname, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if modname:
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # a broken backend is reported, not fatal to the other frameworks
            return f"{modname} failed to import ({type(e).__name__}: {e})"
        if not isinstance(getattr(mod, attr, None), Backend):
            return f"{modname} does not expose a `{attr}`"
    try:
        importlib.import_module(framework)
    except ImportError as e:
        return f"{framework} failed to import ({e})"
    return None


def installed_backends() -> list[str]:
    """The frameworks whose framework and implicitdiff backend both import (numpy always)."""
    return [name for name in FRAMEWORKS if backend_status(name) is None]


def _select_backends(spec: str | None, out: TextIO) -> list[str] | None:
    """The frameworks to run: the requested ones (all must be usable) or every installed one."""
    if spec is None:
        chosen = []
        for name in FRAMEWORKS:
            why = backend_status(name)
            if why is None:
                chosen.append(name)
            else:
                print(f"note: skipping {name}: {why}", file=out)
        return chosen
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [(name, backend_status(name)) for name in chosen]
    bad = [(name, why) for name, why in bad if why is not None]
    if bad or not chosen:
        for name, why in bad:
            print(f"error: backend {name!r} is not usable: {why}", file=sys.stderr)
        if not chosen:
            print("error: --backends expects a comma-separated list such as numpy,jax,torch",
                  file=sys.stderr)
        return None
    return list(dict.fromkeys(chosen))


@contextlib.contextmanager
def _float64(frameworks: Sequence[str]) -> Iterator[None]:
    """float64 arrays in every framework of `frameworks` for the block (`Backend.enable_float64`:
    JAX's 64-bit mode), restored afterwards."""
    with contextlib.ExitStack() as stack:
        for name in frameworks:
            stack.enter_context(backend_named(name).enable_float64())
        yield


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """One BLAS thread for the block, when threadpoolctl is installed (scikit-learn brings it).

    The problems here are tiny (n ≤ 64), where a multithreaded BLAS only adds synchronization; on
    a busy machine it made the NumPy reference ten times slower.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy of an array of any registered framework (`Backend.to_host`)."""
    bk = find_backend(a)
    return np.asarray(a if bk is None else bk.to_host(a))


def _sync(framework: str, tree: Any) -> None:
    """Wait for asynchronous work (and the framework's diagnostics callbacks) to finish."""
    backend_named(framework).synchronize(tree)


def _reference() -> str:
    """The name of the NumPy reference backend (the owner of NumPy arrays)."""
    return get_backend(np.zeros(())).name


# ================================================================================================
# pytrees of arguments (None is a leaf here, so gradients with None line up with the arguments)
# ================================================================================================

def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [y for k in sorted(tree) for y in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [y for t in tree for y in _leaves(t)]
    return [tree]


def _rebuild(tree: Any, leaves: Sequence[Any]) -> Any:
    it = iter(leaves)

    def walk(t: Any) -> Any:
        if isinstance(t, dict):
            new = {k: walk(t[k]) for k in sorted(t)}
            return {k: new[k] for k in t}
        if isinstance(t, (list, tuple)):
            kids = [walk(c) for c in t]
            if isinstance(t, list):
                return kids
            return type(t)(*kids) if hasattr(type(t), "_fields") else tuple(kids)
        return next(it)

    return walk(tree)


def _is_floating_np(leaf: Any) -> bool:
    return isinstance(leaf, np.ndarray) and np.issubdtype(leaf.dtype, np.floating)


def _numpy_args(args: Any) -> Any:
    """User arguments as NumPy float64 (floating leaves), other leaves unchanged."""
    def conv(leaf: Any) -> Any:
        if isinstance(leaf, bool) or leaf is None:
            return leaf
        if isinstance(leaf, (float, np.floating)):
            return np.asarray(leaf, dtype=np.float64)
        if hasattr(leaf, "detach") or hasattr(leaf, "__array__"):
            arr = to_numpy(leaf)
            return arr.astype(np.float64) if np.issubdtype(arr.dtype, np.floating) else arr
        return leaf

    return _rebuild(args, [conv(leaf) for leaf in _leaves(args)])


def _to_framework(tree: Any, framework: str) -> Any:
    """Floating NumPy leaves to float64 arrays of `framework`; integer/bool arrays converted with
    their dtype; every other leaf unchanged."""
    leaves = _leaves(tree)
    out = [_gallery.to_framework(leaf, framework) if isinstance(leaf, (np.ndarray, np.generic))
           else leaf for leaf in leaves]
    return _rebuild(tree, out)


def _vec(tree: Any) -> np.ndarray:
    parts = [to_numpy(leaf).astype(np.float64).ravel() for leaf in _leaves(tree)
             if leaf is not None]
    return np.concatenate(parts) if parts else np.zeros(0)


# ================================================================================================
# implicitdiff check
# ================================================================================================

@dataclass
class Row:
    """One line of the `check` table."""

    problem: str
    backend: str
    mode: str
    err_fd: float | None = None
    err_ref: float | None = None
    residual: float | None = None
    iterations: int | None = None
    status: str = "ok"
    message: str = ""


@dataclass
class _Case:
    name: str
    solver: ImplicitFunction
    args: tuple  # NumPy (float64 floating leaves)


class _Runner:
    """JVP, VJP and the solver map of one problem in one framework, on the floating leaves."""

    def __init__(self, case: _Case, framework: str):
        self.case, self.fw = case, framework
        self.bk = backend_named(framework)
        self.np_leaves = _leaves(case.args)
        self.float_idx = [i for i, leaf in enumerate(self.np_leaves) if _is_floating_np(leaf)]
        self.args = _to_framework(case.args, framework)
        self.leaves = _leaves(self.args)

    def conv(self, tree: Any) -> Any:
        return _to_framework(tree, self.fw)

    def args_with(self, floats: Sequence[Any]) -> tuple:
        new = list(self.leaves)
        for i, v in zip(self.float_idx, floats):
            new[i] = v
        return _rebuild(self.args, new)

    def solve(self, floats: Sequence[Any]) -> Any:
        out = self.case.solver(*self.args_with(floats))
        return out[0] if self.case.solver.has_aux else out

    def floats(self) -> list[Any]:
        return [self.leaves[i] for i in self.float_idx]

    def jvp(self, v: Sequence[np.ndarray]) -> Any:
        f = self.case.solver
        if not self.bk.autodiff:  # the reference differentiates the decorated solver itself
            tangents = list(self._zero_tangents())
            for i, vi in zip(self.float_idx, v):
                tangents[i] = vi
            _, x_dot = idf_jvp(f, self.args, _rebuild(self.args, tangents))
            return x_dot[0] if f.has_aux else x_dot
        _, x_dot = idf_jvp(lambda *fl: self.solve(fl), tuple(self.floats()),
                           tuple(self.conv(list(v))))
        return x_dot

    def vjp(self, u: Any) -> list[Any]:
        """Cotangents of the floating leaves, in order."""
        if not self.bk.autodiff:
            _, vjp_fn = idf_vjp(self.case.solver, *self.args)
            grads = _leaves(tuple(vjp_fn(u)))
            return [grads[i] for i in self.float_idx]
        _, vjp_fn = idf_vjp(lambda *fl: self.solve(fl), *self.floats())
        ct = vjp_fn(self.conv(u))
        return list(ct) if isinstance(ct, (tuple, list)) else [ct]

    def _zero_tangents(self) -> list[Any]:
        out = []
        for leaf in self.leaves:
            shape = np.shape(leaf) if isinstance(leaf, np.ndarray) else ()
            out.append(np.zeros(shape) if shape else 0.0)
        return out


def _finite_difference(runner: _Runner, v: Sequence[np.ndarray], h: float) -> np.ndarray:
    """Fourth-order central difference of θ ↦ x*(θ) along v: error O(h⁴) + O(ε/h)."""
    base = [to_numpy(a) for a in runner.floats()]

    def x_at(s: float) -> np.ndarray:
        pert = runner.conv([b + s * vi for b, vi in zip(base, v)])
        out = runner.solve(pert)
        _sync(runner.fw, out)
        return _vec(out)

    return (8.0 * (x_at(h) - x_at(-h)) - (x_at(2 * h) - x_at(-2 * h))) / (12.0 * h)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(b))
    num = float(np.linalg.norm(a - b))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _records(d: Any) -> tuple[float | None, int | None]:
    res = [float(r.residual_norm) for r in d.forward]
    its = [int(np.max(to_numpy(r.iterations))) for r in d.backward
           if r.iterations is not None]
    return (max(res) if res else None), (max(its) if its else None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def check_problem(case: _Case, frameworks: Sequence[str], *, rtol: float, ref_rtol: float,
                  seed: int = 0, h: float = 1e-3,
                  emit: Callable[[Row], None] | None = None) -> list[Row]:
    """Check one problem in every framework of `frameworks`, in both modes."""
    rng = np.random.default_rng(seed)
    np_leaves = _leaves(case.args)
    fl = [np_leaves[i] for i in range(len(np_leaves)) if _is_floating_np(np_leaves[i])]
    # Direction: random, each leaf scaled to its argument's size, so that h is a relative step.
    v = []
    for a in fl:
        scale = float(np.sqrt(np.mean(a * a))) if a.size else 1.0
        v.append(np.asarray(rng.standard_normal(a.shape) * (scale if scale > 0 else 1.0)))
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        if emit is not None:
            emit(row)

    if not fl:
        for fw in frameworks:
            for mode in ("jvp", "vjp"):
                add(Row(case.name, fw, mode, status="ERROR",
                        message="no floating arguments to differentiate"))
        return rows

    # Finite differences of the solver map, once, with NumPy arrays: the oracle of every backend.
    # Then the cotangent direction (shaped like x) and the NumPy reference's JVP and VJP.
    ref_jvp = ref_vjp = None
    ref_error = ""
    ref = _reference()
    ref_runner = _Runner(case, ref)
    try:
        x_np = ref_runner.solve(ref_runner.floats())
        fd = _finite_difference(ref_runner, v, h)
    except Exception as e:
        for fw in frameworks:
            for mode in ("jvp", "vjp"):
                add(Row(case.name, fw, mode, status="ERROR",
                        message=f"forward solve with NumPy arrays: {_first_line(e)}"))
        return rows
    u = _rebuild(x_np, [np.asarray(rng.standard_normal(np.shape(leaf)))
                        for leaf in _leaves(x_np)])
    try:
        ref_jvp = _vec(ref_runner.jvp(v))
        ref_vjp = [to_numpy(g) for g in ref_runner.vjp(u)]
    except Exception as e:  # reported in the table, the other frameworks still run
        ref_error = _first_line(e)
    u_vec = _vec(u)

    for fw in frameworks:
        runner = ref_runner if fw == ref else _Runner(case, fw)
        for mode in ("jvp", "vjp"):
            row = Row(case.name, fw, mode)
            try:
                with diagnostics() as d:
                    if mode == "jvp":
                        out = runner.jvp(v)
                        _sync(fw, out)
                        got = _vec(out)
                    else:
                        cts = runner.vjp(u)
                        _sync(fw, cts)
                        got_ct = [to_numpy(g) for g in cts]
                row.residual, row.iterations = _records(d)
                if mode == "jvp":
                    row.err_fd = _rel(got, fd)
                    if fw != ref and ref_jvp is not None:
                        row.err_ref = _rel(got, ref_jvp)
                else:
                    lhs = float(u_vec @ fd)  # ⟨u, J v⟩ by finite differences
                    rhs = float(sum(np.sum(g * vi) for g, vi in zip(got_ct, v)))  # ⟨Jᵀu, v⟩
                    typical = float(np.linalg.norm(u_vec) * np.linalg.norm(fd)) / math.sqrt(
                        max(u_vec.size, 1))
                    den = max(abs(lhs), abs(rhs), typical)
                    row.err_fd = abs(lhs - rhs) / den if den > 0 else 0.0
                    if fw != ref and ref_vjp is not None:
                        row.err_ref = _rel(np.concatenate([g.ravel() for g in got_ct]),
                                           np.concatenate([g.ravel() for g in ref_vjp]))
            except Exception as e:
                row.status, row.message = "ERROR", _first_line(e)
                add(row)
                continue
            bad = []
            if not (row.err_fd is not None and row.err_fd <= rtol):
                bad.append(f"error vs finite differences {_fmt(row.err_fd)} > {rtol:g}")
            if fw != ref and ref_error:
                bad.append(f"NumPy reference failed: {ref_error}")
            elif row.err_ref is not None and not row.err_ref <= ref_rtol:
                bad.append(f"error vs NumPy reference {_fmt(row.err_ref)} > {ref_rtol:g}")
            if fw == ref and ref_error:
                row.status, row.message = "ERROR", ref_error
            elif bad:
                row.status, row.message = "FAIL", "; ".join(bad)
            add(row)
    return rows


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.1e}"


_COLUMNS = [("problem", 14), ("backend", 8), ("mode", 5), ("err vs FD", 10),
            ("err vs ref", 10), ("residual", 9), ("bwd iters", 9), ("status", 6)]


def _row_cells(row: Row) -> list[str]:
    ref = "(ref)" if row.backend == _reference() and row.status != "ERROR" else \
        _fmt(row.err_ref)
    return [row.problem, row.backend, row.mode, _fmt(row.err_fd), ref, _fmt(row.residual),
            "-" if row.iterations is None else str(row.iterations), row.status]


def _line(cells: Sequence[str], first: int = 14) -> str:
    widths = [first] + [w for _, w in _COLUMNS[1:]]
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def _import_module(spec: str) -> Any:
    if spec.endswith(".py") or os.sep in spec or (os.altsep and os.altsep in spec):
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise ValueError(f"expected a Python file at {spec!r}, got nothing there.")
        name = "_implicitdiff_user_" + os.path.splitext(os.path.basename(path))[0]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"could not load {spec!r} as a Python module.")
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = mod
        loader_spec.loader.exec_module(mod)
        return mod
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(spec)
    finally:
        if added:
            sys.path.remove(cwd)


def load_problem(spec: str) -> _Case:
    """A gallery name or MODULE:NAME (see `implicitdiff check --help`) as a problem to check."""
    if ":" not in spec:
        prob = _gallery.get_problem(spec)
        return _Case(prob.name, prob.solver, _numpy_args(prob.numpy_args()))
    modname, _, attr = spec.rpartition(":")
    if not modname or not attr:
        raise ValueError(f"expected MODULE:NAME, got {spec!r}.")
    mod = _import_module(modname)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{spec}: expected {modname} to define {attr!r}, got no such "
                             "attribute.")
        obj = getattr(obj, part)
    if isinstance(obj, ImplicitFunction):
        solver = obj
        args = getattr(mod, f"{attr.split('.')[-1]}_args", None)
        if args is None:
            args = getattr(obj, "example_args", None)
        if args is None:
            raise ValueError(
                f"{spec}: expected example arguments for the decorated solver {attr!r}: a "
                f"tuple `{attr.split('.')[-1]}_args` in {modname} (or an attribute "
                f"`{attr}.example_args`), got neither."
            )
        if callable(args):
            args = args()
    elif callable(obj):
        made = obj()
        if not (isinstance(made, tuple) and len(made) == 2):
            raise ValueError(f"{spec}: expected the function to return (solver, args), got "
                             f"{type(made).__name__}.")
        solver, args = made
    else:
        raise ValueError(f"{spec}: expected a decorated solver or a function returning "
                         f"(solver, args), got {type(obj).__name__}.")
    if not isinstance(solver, ImplicitFunction):
        raise ValueError(f"{spec}: expected a solver decorated with idf.custom_root or "
                         f"idf.custom_fixed_point, got {solver!r}.")
    if not isinstance(args, (tuple, list)):
        raise ValueError(f"{spec}: expected the example arguments as a tuple, got "
                         f"{type(args).__name__}.")
    return _Case(spec, solver, _numpy_args(tuple(args)))


def run_check(problems: Sequence[str | _Case] = (), frameworks: Sequence[str] = ("numpy",), *,
              rtol: float = 1e-6, ref_rtol: float = 1e-8, seed: int = 0,
              out: TextIO | None = None) -> list[Row]:
    """Run `implicitdiff check` on `problems` (gallery names, MODULE:NAME, or loaded problems;
    default the gallery) in `frameworks`; print the table to `out` (default stdout); return its
    rows."""
    out = sys.stdout if out is None else out
    cases = [p if isinstance(p, _Case) else load_problem(p) for p in problems] if problems else [
        _Case(p.name, p.solver, _numpy_args(p.numpy_args())) for p in _gallery.GALLERY.values()]
    print(f"implicitdiff check: {len(cases)} problem(s) on {', '.join(frameworks)}; float64; "
          f"tolerance {rtol:g} vs finite differences, {ref_rtol:g} vs the NumPy reference",
          file=out)
    print(file=out)
    first = max([_COLUMNS[0][1]] + [len(c.name) for c in cases])
    print(_line([c for c, _ in _COLUMNS], first), file=out)
    print(_line(["-" * w for w in [first] + [w for _, w in _COLUMNS[1:]]], first), file=out)

    def emit(row: Row) -> None:
        print(_line(_row_cells(row), first), file=out, flush=True)

    rows: list[Row] = []
    with _float64(frameworks), _one_blas_thread():
        for case in cases:
            rows += check_problem(case, frameworks, rtol=rtol, ref_rtol=ref_rtol, seed=seed,
                                  emit=emit)
    print(file=out)
    failed = [r for r in rows if r.status != "ok"]
    for r in failed:
        print(f"{r.status}: {r.problem} / {r.backend} / {r.mode}: {r.message}", file=out)
    if failed:
        print(f"{len(failed)} of {len(rows)} checks failed.", file=out)
    else:
        print(f"all {len(rows)} checks passed.", file=out)
    return rows


def _cmd_check(ns: argparse.Namespace) -> int:
    out = sys.stdout
    if ns.list:
        for p in _gallery.GALLERY.values():
            print(f"{p.name:14s}{p.description}", file=out)
        return 0
    frameworks = _select_backends(ns.backends, out)
    if frameworks is None:
        return 2
    try:
        cases = [load_problem(p) for p in ns.problems]
    except (ValueError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except Exception as e:  # the user's module failed to import
        print(f"error: could not load the problem: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    rows = run_check(cases, frameworks, rtol=ns.rtol, ref_rtol=ns.ref_rtol, seed=ns.seed,
                     out=out)
    return 0 if all(r.status == "ok" for r in rows) else 1


# ================================================================================================
# implicitdiff demo
# ================================================================================================

# Ridge regression on the training data, in terms of its Gram matrix G = XᵀX/m and c = Xᵀy/m:
# w*(λ) = argmin ½wᵀGw − cᵀw + ½λ‖w‖², whose optimality condition is F = (G + λI)w − c = 0. The
# solver is a dense linear solve; the hypergradient dw*/dλ comes from F alone.

def ridge_condition(w: Any, lam: Any, G: Any, c: Any) -> Any:
    """∇ of ½wᵀGw − cᵀw + ½λ‖w‖²."""
    return G @ w - c + lam * w


@custom_root(ridge_condition, solve=Cholesky(), tags={symmetric, positive_definite})
def ridge_fit(lam: Any, G: Any, c: Any) -> Any:
    """Ridge regression weights $(G + \\lambda I)^{-1} c$, for any framework."""
    xp = array_api_compat.array_namespace(G, c)
    eye = xp.eye(G.shape[0], dtype=G.dtype, device=array_api_compat.device(G))
    return xp.linalg.solve(G + lam * eye, c)


def load_data(n_train: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's diabetes data (bundled, no download) with pairwise products of the features,
    split deterministically into train/validation, standardized with the training statistics and
    the target centered. `G = XᵀX/m` and `c = Xᵀy/m` on the training data."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    cols = [X]
    for i in range(X.shape[1]):
        for j in range(i, X.shape[1]):
            if i == j and np.unique(X[:, i]).size <= 2:
                continue  # the square of a binary feature repeats the feature
            cols.append((X[:, i] * X[:, j])[:, None])
    X = np.hstack(cols)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, va = perm[:n_train], perm[n_train:]
    mu, sd = X[tr].mean(axis=0), X[tr].std(axis=0)
    Xt, Xv = (X[tr] - mu) / sd, (X[va] - mu) / sd
    ym = y[tr].mean()
    m = len(tr)
    yt = y[tr] - ym
    return {"G": Xt.T @ Xt / m, "c": Xt.T @ yt / m, "X_val": Xv, "y_val": y[va] - ym,
            "X_train": Xt, "y_train": yt}


def _val_loss(xp_w: Any, X_val: Any, y_val: Any) -> Any:
    r = X_val @ xp_w - y_val
    return (r @ r) / r.shape[0]


def make_hypergradient(framework: str, data: dict[str, np.ndarray]
                       ) -> Callable[[float], tuple[float, float]]:
    """`s ↦ (L_val(w*(e^s)), dL_val/ds)`, the derivative through `ridge_fit` in `framework`:
    `idf.vjp` of `ridge_fit` in λ (the framework's own autodiff beneath, the implicit rule of
    `idf.custom_root` inside), the validation loss and the chain rule on the host."""
    bk = backend_named(framework)
    G, c = _gallery.to_framework((data["G"], data["c"]), framework)
    Xv, yv = data["X_val"], data["y_val"]

    def hyper(s: float) -> tuple[float, float]:
        lam_h = np.asarray(math.exp(s))
        lam = _gallery.to_framework(lam_h, framework)
        w, vjp_fn = idf_vjp(ridge_fit, lam, G, c, argnums=0)
        r = Xv @ np.asarray(bk.to_host(w)) - yv
        loss = float(r @ r) / r.shape[0]
        grad_w = 2.0 * (Xv.T @ r) / r.shape[0]  # chain rule by hand: dL/dw
        dlam = float(np.asarray(bk.to_host(vjp_fn(_gallery.to_framework(grad_w, framework))[0])))
        return loss, dlam * lam_h.item()

    return hyper


@dataclass
class DemoRun:
    """One framework's optimization: Adam on s = log λ (β₁ = 0.5, β₂ = 0.999), the same update
    for every framework, so that the runs differ only in where the hypergradient comes from."""

    framework: str
    hyper: Callable[[float], tuple[float, float]]
    s: float
    lr: float
    lam: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    _g: float = 0.0
    _m: float = 0.0
    _v: float = 0.0

    def evaluate(self) -> None:
        """Record λ and the validation loss at the current s; keep the hypergradient."""
        t0 = time.perf_counter()
        loss, self._g = self.hyper(self.s)
        self.seconds += time.perf_counter() - t0
        self.lam.append(math.exp(self.s))
        self.val_loss.append(loss)

    def step(self) -> None:
        """One Adam step on s with the hypergradient of the last `evaluate`."""
        b1, b2, eps, k = 0.5, 0.999, 1e-12, len(self.lam)
        g = self._g
        self._m = b1 * self._m + (1 - b1) * g
        self._v = b2 * self._v + (1 - b2) * g * g
        self.s -= self.lr * (self._m / (1 - b1 ** k)) / (math.sqrt(self._v / (1 - b2 ** k)) + eps)


def _plot(runs: Sequence[DemoRun], path: str, best: tuple[float, float]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    styles = [("-", "o", 7), ("--", "s", 4.5), (":", "^", 3), ("-.", "d", 3)]
    for i, run in enumerate(runs):
        ls, marker, ms = styles[i % len(styles)]
        steps = range(len(run.val_loss))
        every = max(1, len(run.val_loss) // 15)
        ax1.plot(steps, run.val_loss, ls, marker=marker, ms=ms, markevery=every,
                 label=run.framework, lw=1.6)
        ax2.plot(steps, run.lam, ls, marker=marker, ms=ms, markevery=every,
                 label=run.framework, lw=1.6)
    ax1.axhline(best[1], color="gray", lw=0.8, label="grid-search optimum")
    ax2.axhline(best[0], color="gray", lw=0.8, label="grid-search optimum")
    ax1.set(xlabel="step", ylabel="validation loss (MSE)",
            title="validation loss vs step")
    ax2.set(xlabel="step", ylabel="ridge penalty λ", yscale="log", title="λ vs step")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Hypergradient descent on the ridge penalty (diabetes data, "
                 "hypergradient by idf.custom_root)")
    fig.tight_layout()
    fig.savefig(path)


def _cmd_demo(ns: argparse.Namespace) -> int:
    out = sys.stdout
    t_start = time.perf_counter()
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        print(f"error: implicitdiff demo needs scikit-learn and matplotlib ({e}). Install them "
              "with: pip install 'implicitdiff[demo]'", file=sys.stderr)
        return 2
    if ns.steps < 1:
        print("error: --steps must be at least 1", file=sys.stderr)
        return 2
    frameworks = _select_backends(ns.backends, out)
    if frameworks is None:
        return 2
    data = load_data()
    m_train, p = data["X_train"].shape
    print(f"diabetes data: {m_train} training / {data['X_val'].shape[0]} validation samples, "
          f"{p} features (10 standardized + pairwise products)", file=out)
    print(f"tuning λ = exp(s) by Adam on s (lr {ns.lr:g}, {ns.steps} steps) from λ = "
          f"{ns.lam0:g}; hypergradient from idf.custom_root in: {', '.join(frameworks)}",
          file=out)
    every = max(1, ns.steps // 10)
    print(file=out)
    print(f"{'step':>5}" + "".join(f"  {fw + ' λ':>11}  {'val loss':>10}" for fw in frameworks),
          file=out, flush=True)
    with _float64(frameworks), _one_blas_thread():
        runs = [DemoRun(fw, make_hypergradient(fw, data), math.log(ns.lam0), ns.lr)
                for fw in frameworks]
        for k in range(ns.steps + 1):
            for run in runs:
                run.evaluate()
                if k < ns.steps:
                    run.step()
            if k % every == 0 or k == ns.steps:
                print(f"{k:>5}" + "".join(f"  {r.lam[k]:>11.4e}  {r.val_loss[k]:>10.2f}"
                                          for r in runs), file=out, flush=True)
    # Where the optimum is, by brute force in closed form.
    G, c, Xv, yv = data["G"], data["c"], data["X_val"], data["y_val"]
    evals, evecs = np.linalg.eigh(G)
    Atb = evecs.T @ c
    grid = np.exp(np.linspace(math.log(1e-5), math.log(1e2), 401))
    gl = [float(_val_loss(evecs @ (Atb / (evals + lam)), Xv, yv)) for lam in grid]
    best = (float(grid[int(np.argmin(gl))]), float(min(gl)))
    print(file=out)
    print(f"{'framework':10s}  {'final λ':>11}  {'val RMSE':>9}  {'train RMSE':>10}  "
          f"{'time':>6}", file=out)
    for r in runs:
        lam = r.lam[-1]
        w = np.linalg.solve(G + lam * np.eye(p), c)
        train = float(np.sqrt(np.mean((data["X_train"] @ w - data["y_train"]) ** 2)))
        print(f"{r.framework:10s}  {lam:>11.4e}  {math.sqrt(r.val_loss[-1]):>9.3f}  "
              f"{train:>10.3f}  {r.seconds:>5.1f}s", file=out)
    print(f"{'start':10s}  {ns.lam0:>11.4e}  {math.sqrt(runs[0].val_loss[0]):>9.3f}", file=out)
    print(f"{'grid':10s}  {best[0]:>11.4e}  {math.sqrt(best[1]):>9.3f}   (401 values of λ in "
          "[1e-5, 1e2], for comparison)", file=out)
    status = 0
    if len(runs) > 1:
        ref = runs[0]
        diff = max(
            max(abs(a - b_) / abs(b_) for a, b_ in zip(r.lam, ref.lam))
            for r in runs[1:])
        diff_loss = max(
            max(abs(a - b_) / abs(b_) for a, b_ in zip(r.val_loss, ref.val_loss))
            for r in runs[1:])
        agree = diff <= ns.agree_rtol and diff_loss <= ns.agree_rtol
        print(f"\nframeworks {'agree' if agree else 'DISAGREE'}: largest relative difference "
              f"over all steps {diff:.1e} in λ, {diff_loss:.1e} in validation loss "
              f"(tolerance {ns.agree_rtol:g})", file=out)
        if not agree:
            status = 1
    else:
        print("\nonly one framework ran; install jax or torch (with their implicitdiff backends) "
              "to compare", file=out)
    _plot(runs, ns.out, best)
    print(f"wrote {ns.out}  ({time.perf_counter() - t_start:.1f}s in all)", file=out)
    return status


# ================================================================================================
# the parser
# ================================================================================================

def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return x


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `implicitdiff` command."""
    parser = argparse.ArgumentParser(
        prog="implicitdiff",
        description="implicitdiff: implicit differentiation through any solver. "
                    "Cross-framework gradient checks and a demo.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"implicitdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    backends_help = ("comma-separated frameworks to run, from numpy,jax,torch (default: every "
                     "installed one; a framework counts as installed when it imports and so does "
                     "its implicitdiff backend)")

    check = sub.add_parser(
        "check", help="check implicit derivatives against finite differences and the NumPy "
                      "reference, in every framework",
        description=textwrap.fill(
                    "For each problem, backend and mode (jvp, vjp), in float64: the JVP in a "
                    "random direction v and the VJP of a random cotangent u, compared with "
                    "fourth-order central finite differences of the solver map θ ↦ x*(θ) along v "
                    "(JVP: ‖Jv − fd‖/‖fd‖; VJP: the dot-product test ⟨u, fd⟩ vs ⟨Jᵀu, v⟩) and "
                    "with the NumPy reference's JVP/VJP. Prints a table with the forward "
                    "residual and the backward linear-solve iterations (from "
                    "idf.diagnostics(); '-' where a backend records none). Exit status 0 when "
                    "every check passes, 1 when one fails, 2 on a usage error.", width=88),
        epilog=_USER_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("problems", nargs="*", metavar="PROBLEM",
                       help="gallery problem names or MODULE:NAME (below); default: the gallery")
    check.add_argument("--backends", metavar="LIST", help=backends_help)
    check.add_argument("--rtol", type=_positive_float, default=1e-6,
                       help="tolerance of the relative error vs finite differences "
                            "(default 1e-6)")
    check.add_argument("--ref-rtol", type=_positive_float, default=1e-8,
                       help="tolerance of the relative error vs the NumPy reference "
                            "(default 1e-8)")
    check.add_argument("--seed", type=int, default=0,
                       help="seed of the random directions (default 0)")
    check.add_argument("--list", action="store_true", help="list the gallery problems and exit")
    check.set_defaults(func=_cmd_check)

    demo = sub.add_parser(
        "demo", help="tune a ridge penalty by hypergradient descent in every installed framework",
        description="Tunes the ridge penalty λ of a linear regression (scikit-learn's bundled "
                    "diabetes data with pairwise feature products; standardized; fixed "
                    "train/validation split) by Adam on s = log λ, the hypergradient of the "
                    "validation loss coming from idf.custom_root on the ridge optimality "
                    "condition. Runs in every installed framework (idf.vjp of the ridge solver "
                    "in the framework's arrays, the chain rule on the host), prints progress, "
                    "the final λ and validation RMSE per "
                    "framework, checks that the frameworks agree (exit status 1 if not) and "
                    "writes a plot of validation loss vs step.")
    demo.add_argument("--steps", type=int, default=60, help="optimization steps (default 60)")
    demo.add_argument("--out", default="implicitdiff-demo.png",
                      help="PNG file for the plot (default implicitdiff-demo.png)")
    demo.add_argument("--backends", metavar="LIST", help=backends_help)
    demo.add_argument("--lr", type=_positive_float, default=0.3,
                      help="Adam step size in log λ (default 0.3)")
    demo.add_argument("--lam0", type=_positive_float, default=1e-4,
                      help="initial ridge penalty (default 1e-4)")
    demo.add_argument("--agree-rtol", type=_positive_float, default=1e-6,
                      help="largest relative difference allowed between frameworks "
                           "(default 1e-6)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `implicitdiff` command with `argv` (default `sys.argv[1:]`); return the exit
    status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    return int(ns.func(ns))
