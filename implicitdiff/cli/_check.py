"""`implicitdiff check`: implicit derivatives in every framework against fourth-order central
finite differences of the solver map and against the NumPy reference, on the gallery or on user
problems (MODULE:NAME)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from .. import _gallery
from .._array import one_blas_thread
from .._backend import backend_named
from .._diagnostics import diagnostics
from .._root import ImplicitFunction
from .._transforms import jvp as idf_jvp
from .._transforms import vjp as idf_vjp
from ._common import (
    _float64,
    _is_floating_np,
    _leaves,
    _numpy_args,
    _rebuild,
    _reference,
    _select_backends,
    _sync,
    _to_framework,
    _vec,
    to_numpy,
)


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
    with _float64(frameworks), one_blas_thread():
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
