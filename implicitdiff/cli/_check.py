"""`implicitdiff check`: implicit derivatives in every framework against fourth-order central
finite differences of the solver map and against the NumPy reference, on the gallery or on user
problems (MODULE:NAME)."""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    FRAMEWORKS,
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
    backend_status,
    installed_backends,
    to_numpy,
)


@dataclass(frozen=True)
class Constant:
    """Marks an example argument (or a pytree of them) that `check` passes to the solver but
    never perturbs nor differentiates: data held fixed elsewhere (a graph's adjacency, the data
    a CVXPY problem was built with), or an argument the solver's derivative is not wanted in.

    ```python
    cubic_args = (np.linspace(-1.0, 1.0, 5), Constant(np.eye(5)))
    ```

    Floating arrays inside are still converted to float64 arrays of each framework checked.

    **Arguments:**

    - `value`: the argument as the solver takes it.
    """

    value: Any


@dataclass
class Row:
    """One line of the `check` table.

    `status` is `"ok"`, `"FAIL"` or `"ERROR"`; `failed_against` names what a `FAIL` row
    disagrees with: `"FD"` (finite differences of the solver map, `err_fd` above `rtol`) and/or
    `"ref"` (the NumPy reference, `err_ref` above `ref_rtol`). `ref_trusted` is False where the
    NumPy reference itself failed or raised in this mode: `err_ref` is then shown as
    `ref bad` and does not count. `residual` and `iterations` come from `idf.diagnostics()`
    (None where a backend records none); `message` says why a row is not ok.
    """

    problem: str
    backend: str
    mode: str
    err_fd: float | None = None
    err_ref: float | None = None
    residual: float | None = None
    iterations: int | None = None
    status: str = "ok"
    message: str = ""
    failed_against: tuple[str, ...] = ()
    ref_trusted: bool = True

    @property
    def label(self) -> str:
        """The status as the table shows it: `ok`, `FAIL vs FD`, `FAIL vs ref`,
        `FAIL vs FD+ref` or `ERROR`."""
        if self.status == "FAIL" and self.failed_against:
            return "FAIL vs " + "+".join(self.failed_against)
        return self.status


class CheckReport(list):
    """The rows of a check (a `list` of `Row`), with `passed` (every row ok), `failed` (the
    rows that are not) and `summary()` (the table as text)."""

    @property
    def passed(self) -> bool:
        """True when every row is ok (and there is at least one)."""
        return bool(self) and all(r.status == "ok" for r in self)

    @property
    def failed(self) -> list[Row]:
        """The rows whose status is FAIL or ERROR."""
        return [r for r in self if r.status != "ok"]

    def summary(self) -> str:
        """The table, as `implicitdiff check` prints it, and one line per row not ok."""
        first = max([_COLUMNS[0][1]] + [len(r.problem) for r in self])
        lines = [_line([c for c, _ in _COLUMNS], first),
                 _line(["-" * w for w in [first] + [w for _, w in _COLUMNS[1:]]], first)]
        lines += [_line(_row_cells(r), first) for r in self]
        lines += [f"{r.label}: {r.problem} / {r.backend} / {r.mode}: {r.message}"
                  for r in self.failed]
        return "\n".join(lines)


@dataclass
class _Case:
    name: str
    solver: ImplicitFunction
    args: tuple  # NumPy (float64 floating leaves); Constant markers allowed
    argnums: Any = None  # positions of the positional arguments to perturb; None: all

    def __post_init__(self) -> None:
        self.args, self.perturb = _perturbation(self.args, self.argnums, self.name)
        self.solver = _x_only(self.solver)


def _x_only(fn: ImplicitFunction) -> ImplicitFunction:
    """`fn` returning x alone where it returns `(x, aux)`: aux gets no derivative, and an aux
    that is a host object (SciPy's `OptimizeResult`, from `implicit_function`) cannot cross
    JAX's `pure_callback`. The same condition and options; the caches start empty."""
    if not fn.has_aux:
        return fn
    inner = fn.solver

    def solver(*args: Any, **options: Any) -> Any:
        return inner(*args, **options)[0]

    new = copy.copy(fn)
    new.__dict__ = {k: v for k, v in fn.__dict__.items()
                    if not (k.startswith("_") and k not in ("_on_failure",))
                    or k.startswith("__")}
    new.solver, new.has_aux = solver, False
    spec: Any = fn.result_shape
    if callable(spec):
        def x_shape(*a: Any) -> Any:
            out: Any = spec(*a)
            return out[0]

        new.result_shape = x_shape
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        new.result_shape = spec[0]
    return new


def _perturbation(args: tuple, argnums: Any, name: str) -> tuple[tuple, list[bool]]:
    """The arguments without `Constant` markers (as NumPy float64 where floating) and, per leaf
    of them, whether `check` perturbs it: floating, in `argnums`, not inside a `Constant`."""
    args = tuple(args)
    if argnums is None:
        chosen = set(range(len(args)))
    else:
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in nums):
            raise ValueError(f"{name}: argnums: expected an int or a sequence of ints, got "
                             f"{argnums!r}.")
        bad = [i for i in nums if not -len(args) <= i < len(args)]
        if bad:
            raise ValueError(f"{name}: argnums: expected positions of the {len(args)} example "
                             f"argument(s), got {bad}.")
        chosen = {i % len(args) for i in nums}
    plain, mask = [], []
    for i, arg in enumerate(args):
        new = _numpy_args(_strip_constants(arg))
        inside = _constant_flags(arg, False)
        plain.append(new)
        mask += [(i in chosen) and not c and _is_floating_np(leaf)
                 for leaf, c in zip(_leaves(new), inside)]
    return tuple(plain), mask


def _strip_constants(t: Any) -> Any:
    if isinstance(t, Constant):
        return _strip_constants(t.value)
    if isinstance(t, dict):
        return {k: _strip_constants(v) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        kids = [_strip_constants(c) for c in t]
        if isinstance(t, list):
            return kids
        return type(t)(*kids) if hasattr(type(t), "_fields") else tuple(kids)
    return t


def _constant_flags(t: Any, inside: bool) -> list[bool]:
    """Per leaf, in `_leaves` order: whether it sits inside a `Constant`."""
    if isinstance(t, Constant):
        return _constant_flags(t.value, True)
    if isinstance(t, dict):
        return [f for k in sorted(t) for f in _constant_flags(t[k], inside)]
    if isinstance(t, (list, tuple)):
        return [f for c in t for f in _constant_flags(c, inside)]
    return [inside]


class _Runner:
    """JVP, VJP and the solver map of one problem in one framework, on the perturbed leaves."""

    def __init__(self, case: _Case, framework: str):
        self.case, self.fw = case, framework
        self.bk = backend_named(framework)
        self.float_idx = [i for i, p in enumerate(case.perturb) if p]
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
        """Cotangents of the perturbed leaves, in order."""
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


def _finite_difference(runner: _Runner, v: Sequence[np.ndarray], h: float
                       ) -> tuple[np.ndarray, Callable[[], np.ndarray | None]]:
    """Fourth-order central difference of θ ↦ x*(θ) along v (error O(h⁴) + O(solver error / h)),
    and a function giving, on demand, its difference from the same formula at step 2h: an
    estimate of how far the finite difference itself is off (truncation, or a solver whose
    error at the perturbed points, divided by h, is not small). The two extra solves (at ±4h)
    run only when a row fails; None when they raise."""
    base = [to_numpy(a) for a in runner.floats()]

    def x_at(s: float) -> np.ndarray:
        pert = runner.conv([b + s * vi for b, vi in zip(base, v)])
        out = runner.solve(pert)
        _sync(runner.fw, out)
        return _vec(out)

    xs = {k: x_at(k * h) for k in (-2, -1, 1, 2)}
    fd = (8.0 * (xs[1] - xs[-1]) - (xs[2] - xs[-2])) / (12.0 * h)
    cache: list[np.ndarray | None] = []

    def spread() -> np.ndarray | None:
        if not cache:
            try:
                x4, xm4 = x_at(4 * h), x_at(-4 * h)
                fd2 = (8.0 * (xs[2] - xs[-2]) - (x4 - xm4)) / (24.0 * h)
                cache.append(fd - fd2)
            except Exception:  # the estimate is optional: the row's verdict stands without it
                cache.append(None)
        return cache[0]

    return fd, spread


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


@dataclass
class _Oracle:
    """What every backend of one problem is compared with: finite differences of the solver map
    (with NumPy arrays when the solver runs on them, else per framework) and the NumPy
    reference's JVP and VJP (None where it raised or is wrong)."""

    v: list[np.ndarray]
    u: Any = None                    # the cotangent, shaped like x (NumPy)
    fd: np.ndarray | None = None     # finite differences with NumPy arrays
    spread: Callable[[], np.ndarray | None] | None = None  # fd at h minus fd at 2h, on demand
    numpy_error: str = ""            # the forward solve with NumPy arrays raised
    ref: dict[str, Any] = field(default_factory=dict)       # mode -> reference product
    ref_error: dict[str, str] = field(default_factory=dict)  # mode -> why not trusted


def _vjp_pairing(u_vec: np.ndarray, fd: np.ndarray, cts: Sequence[np.ndarray],
                 v: Sequence[np.ndarray]) -> float:
    """The dot-product test: |⟨u, fd⟩ − ⟨Jᵀu, v⟩| relative to the size of the pairing."""
    lhs = float(u_vec @ fd)  # ⟨u, J v⟩ by finite differences
    rhs = float(sum(np.sum(g * vi) for g, vi in zip(cts, v)))  # ⟨Jᵀu, v⟩
    typical = float(np.linalg.norm(u_vec) * np.linalg.norm(fd)) / math.sqrt(max(u_vec.size, 1))
    den = max(abs(lhs), abs(rhs), typical)
    return abs(lhs - rhs) / den if den > 0 else 0.0


def check_problem(case: _Case, frameworks: Sequence[str], *, rtol: float, ref_rtol: float,
                  seed: int = 0, h: float = 1e-3,
                  emit: Callable[[Row], None] | None = None) -> list[Row]:
    """Check one problem in every framework of `frameworks`, in both modes.

    **Arguments:**

    - `case`: the problem (`load_problem`'s result).
    - `frameworks`: backend names (`"numpy"`, `"jax"`, `"torch"`).
    - `rtol`, `ref_rtol`: the tolerances against finite differences and the NumPy reference.
    - `seed`: of the random direction and cotangent.
    - `h`: the finite-difference step along the direction (each argument's direction is scaled
      to that argument's root-mean-square size, so `h` is relative).
    - `emit`: called with each row as soon as it is computed.

    **Returns:** the rows, two per framework (jvp, vjp).
    """
    rng = np.random.default_rng(seed)
    np_leaves = _leaves(case.args)
    fl = [np_leaves[i] for i, p in enumerate(case.perturb) if p]
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
                        message="no floating argument to perturb (argnums and Constant leave "
                                "none)"))
        return rows

    # Finite differences of the solver map, once, with NumPy arrays: the oracle of every backend
    # (when the solver runs on NumPy arrays; else each framework's own). Then the cotangent
    # (shaped like x) and the NumPy reference's JVP and VJP.
    oracle = _Oracle(v)
    ref = _reference()
    ref_runner = _Runner(case, ref)
    try:
        x_np = ref_runner.solve(ref_runner.floats())
        oracle.u = _cotangent(rng, x_np)
    except Exception as e:
        oracle.numpy_error = f"forward solve with NumPy arrays: {_first_line(e)}"
    if not oracle.numpy_error:
        try:
            oracle.fd, oracle.spread = _finite_difference(ref_runner, v, h)
        except Exception as e:
            oracle.numpy_error = _perturbed_failure(e)
    if not oracle.numpy_error:
        for mode in ("jvp", "vjp"):
            try:
                if mode == "jvp":
                    oracle.ref[mode] = _vec(ref_runner.jvp(v))
                else:
                    oracle.ref[mode] = [to_numpy(g) for g in ref_runner.vjp(oracle.u)]
            except Exception as e:  # reported on NumPy's rows; the other frameworks still run
                oracle.ref_error[mode] = _first_line(e)
    rng_u = rng  # for a cotangent drawn from the first framework's x when NumPy cannot solve

    for fw in frameworks:
        if fw == ref and oracle.numpy_error:
            for mode in ("jvp", "vjp"):
                add(Row(case.name, fw, mode, status="ERROR", message=oracle.numpy_error))
            continue
        runner = ref_runner if fw == ref else _Runner(case, fw)
        fd, spread = oracle.fd, oracle.spread
        try:
            # One concrete call first: a host solver under JAX then knows its output's shape
            # (no result_shape needed), and a failing forward solve is reported as such.
            x = runner.solve(runner.floats())
            _sync(fw, x)
            if oracle.u is None:
                oracle.u = _cotangent(rng_u, _rebuild(x, [to_numpy(a) for a in _leaves(x)]))
        except Exception as e:
            for mode in ("jvp", "vjp"):
                add(Row(case.name, fw, mode, status="ERROR",
                        message=f"forward solve with {fw} arrays: {_first_line(e)}"))
            continue
        if fd is None:
            try:
                fd, spread = _finite_difference(runner, v, h)
            except Exception as e:
                for mode in ("jvp", "vjp"):
                    add(Row(case.name, fw, mode, status="ERROR", message=_perturbed_failure(e)))
                continue
        for mode in ("jvp", "vjp"):
            add(_check_mode(case, runner, fw, mode, oracle, fd, spread, rtol, ref_rtol, ref))
    return rows


def _perturbed_failure(e: BaseException) -> str:
    return (f"the forward solve at the example arguments worked, at the perturbed ones (the "
            f"finite differences) it raised {_first_line(e)} -- if the solver takes some of "
            "its data from elsewhere (a factorization, a graph, a CVXPY problem built once) "
            "rather than from these arguments, hold those fixed: argnums= / --argnums, or "
            "wrap them in implicitdiff.cli.Constant")


def _cotangent(rng: np.random.Generator, x: Any) -> Any:
    return _rebuild(x, [np.asarray(rng.standard_normal(np.shape(leaf))) for leaf in _leaves(x)])


def _check_mode(case: _Case, runner: _Runner, fw: str, mode: str, oracle: _Oracle,
                fd: np.ndarray, spread: Any, rtol: float, ref_rtol: float, ref: str) -> Row:
    row = Row(case.name, fw, mode)
    if fw == ref and mode in oracle.ref_error:
        row.status, row.message = "ERROR", oracle.ref_error[mode]
        return row
    try:
        with diagnostics() as d:
            if mode == "jvp":
                out = runner.jvp(oracle.v)
                _sync(fw, out)
                got: Any = _vec(out)
            else:
                cts = runner.vjp(oracle.u)
                _sync(fw, cts)
                got = [to_numpy(g) for g in cts]
        row.residual, row.iterations = _records(d)
        if mode == "jvp":
            row.err_fd = _rel(got, fd)
        else:
            row.err_fd = _vjp_pairing(_vec(oracle.u), fd, got, oracle.v)
        if fw != ref and mode in oracle.ref:
            if mode == "jvp":
                row.err_ref = _rel(got, oracle.ref[mode])
            else:
                row.err_ref = _rel(np.concatenate([g.ravel() for g in got]),
                                   np.concatenate([g.ravel() for g in oracle.ref[mode]]))
    except Exception as e:
        row.status, row.message = "ERROR", _first_line(e)
        return row
    # The reference counts only where it passed its own comparison with finite differences:
    # a wrong hand-written `Derivatives` (used by NumPy only) must not fail the other rows.
    if fw != ref:
        if mode in oracle.ref_error or oracle.numpy_error:
            row.ref_trusted = False
            why = oracle.ref_error.get(mode) or oracle.numpy_error
            row.message = f"not compared with the NumPy reference ({why})"
        elif oracle.fd is not None and not _rel_ok(oracle, mode, oracle.fd, rtol):
            row.ref_trusted = False
            row.message = ("not compared with the NumPy reference: its own derivative fails "
                           "against finite differences")
    against = []
    if not (row.err_fd is not None and row.err_fd <= rtol):
        against.append("FD")
    if row.ref_trusted and row.err_ref is not None and not row.err_ref <= ref_rtol:
        against.append("ref")
    if against:
        why = []
        if "FD" in against:
            why.append(f"error vs finite differences {_fmt(row.err_fd)} > {rtol:g}")
            unsure = _fd_uncertainty(mode, fd, spread, oracle)
            if unsure > rtol:
                why.append(
                    f"the finite differences themselves are uncertain to about {_fmt(unsure)} "
                    "(those at steps h and 2h differ by that): the solver's error at the "
                    "perturbed points divided by the step, or truncation. Tighten the solver's "
                    "tolerance, or change the step (--step / step=), before trusting this row")
        if "ref" in against:
            why.append(f"error vs NumPy reference {_fmt(row.err_ref)} > {ref_rtol:g}")
        row.status, row.failed_against = "FAIL", tuple(against)
        row.message = "; ".join(why + ([row.message] if row.message else []))
    return row


def _fd_uncertainty(mode: str, fd: np.ndarray, spread_fn: Any, oracle: _Oracle) -> float:
    """How far the finite differences may be off, in the units of the row's error (0 where
    unknown)."""
    spread = spread_fn() if spread_fn is not None else None
    if spread is None:
        return 0.0
    if mode == "jvp":
        return _rel(fd + spread, fd)
    u = _vec(oracle.u)
    typical = float(np.linalg.norm(u) * np.linalg.norm(fd)) / math.sqrt(max(u.size, 1))
    den = max(abs(float(u @ fd)), typical)
    return abs(float(u @ spread)) / den if den > 0 else 0.0


def _rel_ok(oracle: _Oracle, mode: str, fd: np.ndarray, rtol: float) -> bool:
    """Whether the NumPy reference's product (computed, but its row not shown) passes the
    finite-difference comparison."""
    got = oracle.ref[mode]
    err = _rel(got, fd) if mode == "jvp" else _vjp_pairing(_vec(oracle.u), fd, got, oracle.v)
    return err <= rtol


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.1e}"


_COLUMNS = [("problem", 14), ("backend", 8), ("mode", 5), ("err vs FD", 10),
            ("err vs ref", 10), ("residual", 9), ("bwd iters", 9), ("status", 6)]


def _row_cells(row: Row) -> list[str]:
    if row.backend == _reference() and row.status != "ERROR":
        ref = "(ref)"
    elif not row.ref_trusted:
        ref = "ref bad"
    else:
        ref = _fmt(row.err_ref)
    return [row.problem, row.backend, row.mode, _fmt(row.err_fd), ref, _fmt(row.residual),
            "-" if row.iterations is None else str(row.iterations), row.label]


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


_NOT_DECORATED = (
    "{spec}: {what} is not a decorated solver: `implicitdiff check` compares the derivative "
    "that implicitdiff gives a solver with finite differences, so the solver must carry its "
    "condition. Decorate it (`@idf.custom_root(F)` or `@idf.custom_fixed_point(T)`, "
    "`@implicitdiff.scipy.wrap_solver(F)` for a host solver, "
    "`implicitdiff.scipy.implicit_function(isc.minimize, ...)` for a SciPy drop-in call), or "
    "point NAME at a zero-argument function returning (decorated solver, example args)."
)


def _required_positional(fn: Any) -> int | None:
    """How many arguments `fn` needs (None where its signature cannot be read)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return sum(1 for p in sig.parameters.values()
               if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def load_problem(spec: str, *, argnums: Any = None) -> _Case:
    """A gallery name or `MODULE:NAME` (see `implicitdiff check --help` and docs/cli.md) as a
    problem to check.

    **Arguments:**

    - `spec`: a gallery problem's name, or `MODULE:NAME` (MODULE an importable module or a
      Python file's path; it is imported, so its code runs).
    - `argnums`: positions of the positional arguments to perturb (default every floating one;
      `Constant` in the example arguments also keeps an argument fixed).

    **Returns:** the problem, for `run_check` / `check_problem`.
    """
    if ":" not in spec:
        prob = _gallery.get_problem(spec)
        return _Case(prob.name, prob.solver, _numpy_args(prob.numpy_args()), argnums)
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
        need = _required_positional(obj)
        if need:  # a solver itself, not a factory: undecorated
            raise ValueError(_NOT_DECORATED.format(
                spec=spec, what=f"{attr!r} (a function of {need} argument(s))"))
        made = obj()
        if not (isinstance(made, tuple) and len(made) == 2):
            raise ValueError(f"{spec}: expected the zero-argument function {attr!r} to return "
                             f"(decorated solver, example args), got {type(made).__name__}.")
        solver, args = made
        if not isinstance(solver, ImplicitFunction):
            raise ValueError(_NOT_DECORATED.format(
                spec=spec, what=f"the solver {attr}() returned ({_describe(solver)})"))
    else:
        raise ValueError(f"{spec}: expected a decorated solver or a zero-argument function "
                         f"returning (solver, args), got {type(obj).__name__}.")
    if not isinstance(args, (tuple, list)):
        raise ValueError(f"{spec}: expected the example arguments as a tuple, got "
                         f"{type(args).__name__}.")
    return _Case(spec, solver, _numpy_args(tuple(args)), argnums)


def _describe(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return f"{type(obj).__name__} {name}" if name else type(obj).__name__


def run_check(problems: Sequence[str | _Case] = (), frameworks: Sequence[str] = ("numpy",), *,
              rtol: float = 1e-6, ref_rtol: float = 1e-8, seed: int = 0, step: float = 1e-3,
              argnums: Any = None, out: TextIO | None = None) -> CheckReport:
    """Run `implicitdiff check` on `problems` (gallery names, `MODULE:NAME`, or loaded
    problems; default the gallery) in `frameworks`, in float64; print the table to `out`
    (default stdout).

    **Arguments:** `rtol`, `ref_rtol`, `seed`, `step` and `argnums` as in `check` (`argnums`
    applies to the problems given by name).

    **Returns:** a `CheckReport`, the rows.
    """
    out = sys.stdout if out is None else out
    cases = [p if isinstance(p, _Case) else load_problem(p, argnums=argnums)
             for p in problems] if problems else [
        _Case(p.name, p.solver, _numpy_args(p.numpy_args())) for p in _gallery.GALLERY.values()]
    print(f"implicitdiff check: {len(cases)} problem(s) on {', '.join(frameworks)}; float64; "
          f"finite-difference step {step:g}; tolerance {rtol:g} vs finite differences (FD), "
          f"{ref_rtol:g} vs the NumPy reference (ref)", file=out)
    print(file=out)
    first = max([_COLUMNS[0][1]] + [len(c.name) for c in cases])
    print(_line([c for c, _ in _COLUMNS], first), file=out)
    print(_line(["-" * w for w in [first] + [w for _, w in _COLUMNS[1:]]], first), file=out)

    def emit(row: Row) -> None:
        print(_line(_row_cells(row), first), file=out, flush=True)

    rows = CheckReport()
    with _float64(frameworks), one_blas_thread():
        for case in cases:
            rows += check_problem(case, frameworks, rtol=rtol, ref_rtol=ref_rtol, seed=seed,
                                  h=step, emit=emit)
    print(file=out)
    for r in rows:
        if r.status != "ok":
            print(f"{r.label}: {r.problem} / {r.backend} / {r.mode}: {r.message}", file=out)
        elif r.message:  # a row that passes with a note (the reference not compared)
            print(f"note: {r.problem} / {r.backend} / {r.mode}: {r.message}", file=out)
    if rows.failed:
        print(f"{len(rows.failed)} of {len(rows)} checks failed.", file=out)
    else:
        print(f"all {len(rows)} checks passed.", file=out)
    return rows


def check(solver: ImplicitFunction, *args: Any, argnums: Any = None,
          backends: Sequence[str] | str | None = None, step: float = 1e-3, rtol: float = 1e-6,
          ref_rtol: float = 1e-8, seed: int = 0, name: str | None = None,
          out: TextIO | None = None) -> CheckReport:
    """Check the implicit derivatives of a decorated solver at `args` in every framework: the
    Python form of `implicitdiff check`.

    ```python
    from implicitdiff.cli import check, Constant

    report = check(ridge, 0.5, Constant(X), y, argnums=(0, 2), backends="numpy,jax")
    assert report.passed
    ```

    For each backend and mode (jvp, vjp), in float64: the JVP in a random direction $v$ and the
    VJP of a random cotangent $u$ against a fourth-order central finite difference of the
    solver map along $v$, and against the NumPy reference's JVP/VJP (only where the reference
    itself passes against finite differences: a wrong hand-written `idf.Derivatives`, which
    only the NumPy reference uses, fails NumPy's rows and leaves the others compared with
    finite differences alone). Each framework's solver is called once with concrete arrays
    before it is differentiated, so a host solver under JAX needs no `result_shape`.

    **Arguments:**

    - `solver`: decorated with `idf.custom_root` / `idf.custom_fixed_point` /
      `implicitdiff.scipy.wrap_solver`, or returned by `implicitdiff.scipy.implicit_function`.
    - `args`: example arguments, NumPy arrays and Python numbers in pytrees. Floating leaves
      become float64 arrays of each framework; integer, boolean and other leaves are passed
      unchanged. A `Constant(value)` is passed (converted) but not perturbed.
    - `argnums`: an int or ints, the positions in `args` to perturb (default: every one). Leaves
      outside them are held fixed, like `Constant`.
    - `backends`: framework names, a list or a comma-separated string (default: every
      installed one).
    - `step`: the finite-difference step along $v$, whose leaves are scaled to each argument's
      root-mean-square size, so the step is relative (default $10^{-3}$; truncation error
      $O(\\text{step}^4)$, rounding and solver error divided by the step).
    - `rtol`, `ref_rtol`: the tolerances against finite differences and the NumPy reference.
    - `seed`: of the random direction and cotangent.
    - `name`: the problem's name in the table (default the solver's).
    - `out`: where the table goes (default stdout).

    **Returns:** a `CheckReport`: the rows (`Row`), with `passed`, `failed` and `summary()`.
    """
    if not isinstance(solver, ImplicitFunction):
        raise TypeError(_NOT_DECORATED.format(spec="check", what=_describe(solver)))
    if isinstance(backends, str):
        backends = [b.strip() for b in backends.split(",") if b.strip()]
    if backends is None:
        frameworks = installed_backends()
    else:
        frameworks = list(dict.fromkeys(backends))
        bad = [(b, backend_status(b)) for b in frameworks]
        bad = [f"{b} ({why})" for b, why in bad if why is not None]
        if bad or not frameworks:
            raise ValueError(f"check: backends: expected installed frameworks from "
                             f"{', '.join(FRAMEWORKS)}, got {', '.join(bad) or 'none'}.")
    if not step > 0:
        raise ValueError(f"check: step: expected a positive number, got {step!r}.")
    case = _Case(name or getattr(solver, "__name__", "solver"), solver, _numpy_args(args),
                 argnums)
    return run_check([case], frameworks, rtol=rtol, ref_rtol=ref_rtol, seed=seed, step=step,
                     out=out)


def _parse_argnums(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--argnums: expected comma-separated integers such as 0,2, got "
                         f"{text!r}.") from None


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
        argnums = _parse_argnums(ns.argnums)
        cases = [load_problem(p, argnums=argnums) for p in ns.problems]
    except (ValueError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except Exception as e:  # the user's module failed to import
        print(f"error: could not load the problem: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    rows = run_check(cases, frameworks, rtol=ns.rtol, ref_rtol=ns.ref_rtol, seed=ns.seed,
                     step=ns.step, out=out)
    return 0 if rows.passed else 1
