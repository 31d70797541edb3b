"""Deep equilibrium layers, written once for every framework: the backward modes, the solver
registry and the statistics.

The layers themselves are thin: `implicitdiff_torch.DEQ` (an `nn.Module`),
`implicitdiff_jax.deq` (a pure function) and `implicitdiff_jax.DEQ` (an `equinox.Module`) all
take a cell `f(z, x)`, a forward solver named here (`SOLVERS`) or any callable like those of
`implicitdiff.solvers`, and one of the backward modes below; they report a `DEQStats` with
`summary()`. The exact modes go through `idf.custom_fixed_point` with the mode's linear solver;
the step modes record `mode.unroll(f, z*)`.

- `IFT(solve=...)` (default, **exact**): solve $(I - J)^\\top u = \\bar z$ with a core linear
  solver, $J = \\partial f/\\partial z$ at $z^*$.
- `Neumann(terms=k)` (approximation): the same implicit rule with $k$ terms of the Neumann
  series $(I - J)^{-\\top}\\bar z \\approx \\sum_{j<k} (J^\\top)^j \\bar z$ (`NeumannSolve`).
- `Phantom(steps=k, damping=λ)` (approximation, Geng et al. 2021): backpropagation through $k$
  damped steps $z \\leftarrow (1-\\lambda) z + \\lambda f(z, x)$ from the detached $z^*$.
- `JFB()` (approximation, Fung et al. 2022): backpropagation through one application of $f$ at
  the detached $z^*$, i.e. $\\partial f/\\partial z \\approx 0$ in the implicit rule.

See `docs/deq.md` for the error of each approximation against the exact gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import solvers as _solvers
from ._array import all_finite
from ._linear_solve import AbstractLinearSolver, BiCGStab, NeumannSolve, Richardson

__all__ = [
    "IFT",
    "JFB",
    "SOLVERS",
    "BackwardMode",
    "DEQStats",
    "Neumann",
    "NeumannSolve",
    "Phantom",
    "as_backward",
    "as_solver",
    "check_fixed_point",
    "default_backward_solver",
    "forward_options",
    "is_builtin_solver",
    "samples_finite",
    "zero_failed_samples",
]


# ---- backward modes ------------------------------------------------------------------------------

def default_backward_solver() -> AbstractLinearSolver:
    """The linear solver of `IFT()`: `idf.Richardson(omega=-1.0, fallback=idf.BiCGStab())`
    (see `IFT`)."""
    return Richardson(omega=-1.0, fallback=BiCGStab())


@dataclass(frozen=True)
class IFT:
    """Exact implicit gradient: solve $(I - J)^\\top u = \\bar z$ with `solve`.

    `solve`: a core linear solver; default `default_backward_solver()`,
    `idf.Richardson(omega=-1.0, fallback=idf.BiCGStab())`: the fixed-point backward
    $u \\leftarrow J^\\top u + \\bar z$ (one vector-Jacobian product a step, the cheapest
    per step), which hands a sample whose iteration is slow or diverges ($f$ not a contraction
    at $z^*$) to BiCGStab from where it stopped; at the core's default tolerance, which follows
    the forward's accuracy; with the uniqueness probe, a second solve that refuses a singular
    or numerically singular $I - J$ at $z^*$, where the gradient does not exist or the solve's
    residual does not bound its error. Pass `check_singular=False` to the solver to skip the
    probe (about half the backward's cost) where $f$ is known to contract. `idf.BiCGStab()`
    (the default until this release) or `idf.GMRES()` solve any non-singular system from the
    start.
    Exact up to the solve's tolerance; a solve that does not converge, or whose true residual
    misses the tolerance, raises (per the layer's `on_failure`)."""

    solve: AbstractLinearSolver = field(default_factory=default_backward_solver)
    exact = True

    def __post_init__(self) -> None:
        if not isinstance(self.solve, AbstractLinearSolver):
            raise TypeError(f"IFT: solve: expected a linear solver such as idf.BiCGStab(), got "
                            f"{type(self.solve).__name__}.")


@dataclass(frozen=True)
class Neumann:
    """Approximate: the implicit rule with $k$ = `terms` terms of the Neumann series
    (`NeumannSolve`). Relative error about $\\|J\\|^k$; `terms=1` equals `JFB`. Memory flat
    (no tape), differentiable again."""

    terms: int = 5
    exact = False

    def __post_init__(self) -> None:
        if isinstance(self.terms, bool) or not isinstance(self.terms, int) or self.terms < 1:
            raise ValueError(f"Neumann: expected terms a positive int, got {self.terms!r}.")

    @property
    def solve(self) -> NeumannSolve:
        """The linear solver of the implicit rule: `NeumannSolve(terms)`."""
        return NeumannSolve(terms=self.terms)


@dataclass(frozen=True)
class Phantom:
    """Approximate (Geng et al. 2021, "phantom gradients"): backpropagate through `steps`
    damped iterations $z \\leftarrow (1-\\lambda) z + \\lambda f(z, x)$ ($\\lambda$ = `damping`)
    from the detached $z^*$. With `damping=1` this is `Neumann(steps)` with the Jacobians
    taken along the (nearly constant) trajectory. Memory grows with `steps` (a tape of `steps`
    applications of `f`), not with the forward solver's iterations."""

    steps: int = 5
    damping: float = 1.0
    exact = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Phantom: expected steps a positive int, got {self.steps!r}.")
        if not 0 < self.damping <= 1:
            raise ValueError(f"Phantom: expected 0 < damping <= 1, got {self.damping!r}.")

    def unroll(self, f: Callable[[Any], Any], z: Any) -> Any:
        """`steps` damped steps of `f` from `z` (the detached fixed point), recorded by the
        framework's autodiff."""
        lam = self.damping
        for _ in range(self.steps):
            fz = f(z)
            z = fz if lam == 1.0 else (1 - lam) * z + lam * fz
        return z


@dataclass(frozen=True)
class JFB:
    """Approximate (Jacobian-free backprop, Fung et al. 2022): backpropagate through one
    application of $f$ at the detached $z^*$, i.e. drop $\\partial f/\\partial z$ from the
    implicit rule. Relative error about $\\|J\\|$; the cheapest mode."""

    exact = False

    def unroll(self, f: Callable[[Any], Any], z: Any) -> Any:
        """One application of `f` at `z` (the detached fixed point)."""
        return f(z)


BackwardMode = IFT | Neumann | Phantom | JFB
"""The type of a DEQ backward mode: `IFT`, `Neumann`, `Phantom` or `JFB` (what `backward=`
accepts, besides the modes' names)."""
_MODES = (IFT, Neumann, Phantom, JFB)
_NAMED: dict[str, Callable[[], Any]] = {"ift": IFT, "exact": IFT, "neumann": Neumann,
                                        "phantom": Phantom, "jfb": JFB}


def as_backward(backward: Any, who: str = "DEQ", *, solve: Any = None, steps: Any = None,
                damping: Any = None) -> BackwardMode:
    """The backward mode from what a layer was given: a mode object (returned as it is), a
    linear solver (exact `IFT` with it), one of the names `"ift"`, `"neumann"`, `"phantom"`,
    `"jfb"` (the mode with its defaults), or None (`IFT()`).

    `solve`, `steps`, `damping` are the JAX layers' former spelling of the mode's options
    (`backward="ift", solve=...`, `backward="phantom", steps=..., damping=...`): still
    accepted for one release, with a `DeprecationWarning`."""
    if solve is not None or steps is not None or damping is not None:
        return _legacy_backward(backward, who, solve, steps, damping)
    if backward is None:
        return IFT()
    if isinstance(backward, _MODES):
        return backward
    if isinstance(backward, str) and backward.lower() in _NAMED:
        return _NAMED[backward.lower()]()
    if isinstance(backward, AbstractLinearSolver):
        return IFT(solve=backward)
    raise ValueError(
        f"{who}: backward: expected one of IFT(...), Neumann(...), Phantom(...), JFB(), a linear "
        f"solver (exact IFT with it), or the names 'ift', 'neumann', 'phantom', 'jfb'; got "
        f"{backward!r}."
    )


def _legacy_backward(backward: Any, who: str, solve: Any, steps: Any, damping: Any
                     ) -> BackwardMode:
    import warnings

    name = "ift" if backward is None else backward
    if not (isinstance(name, str) and name.lower() in _NAMED):
        raise ValueError(f"{who}: solve=, steps=, damping= go with a backward name ('ift', "
                         f"'neumann', 'phantom', 'jfb'); got backward={backward!r}. Give the "
                         "options to the backward object instead, e.g. Phantom(steps=5).")
    name = name.lower()
    if solve is not None:
        if not isinstance(solve, AbstractLinearSolver):
            raise TypeError(f"{who}: solve: expected a linear solver such as idf.BiCGStab() or "
                            f"idf.Richardson(...), got {type(solve).__name__}.")
        if name not in ("ift", "exact"):
            raise ValueError(f"{who}: solve: a linear solver is used only by backward='ift', "
                             f"got backward={backward!r}. Drop solve= or use IFT(solve).")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ValueError(f"{who}: steps: expected a positive int, got {steps!r}.")
    if damping is not None and (not isinstance(damping, (int, float)) or not 0 < damping <= 1):
        raise ValueError(f"{who}: damping: expected a number with 0 < damping <= 1, got "
                         f"{damping!r}.")
    k = 5 if steps is None else steps
    mode: BackwardMode = {"ift": IFT(solve) if solve is not None else IFT(),
                          "exact": IFT(solve) if solve is not None else IFT(),
                          "neumann": Neumann(k),
                          "phantom": Phantom(k, 1.0 if damping is None else float(damping)),
                          "jfb": JFB()}[name]
    warnings.warn(f"{who}: solve=, steps= and damping= are deprecated; pass the backward mode "
                  f"as an object: backward={mode!r} (from implicitdiff.deq).",
                  DeprecationWarning, stacklevel=4)
    return mode


# ---- forward solvers ---------------------------------------------------------------------------

SOLVERS: dict[str, Callable[..., Any]] = {
    "anderson": _solvers.anderson,
    "broyden": _solvers.broyden,
    "fixed_point_iteration": _solvers.fixed_point_iteration,
    "fixed_point": _solvers.fixed_point_iteration,
}
"""The forward solvers a layer accepts by name; each returns a `SolverResult`."""


def as_solver(solver: str | Callable[..., Any], who: str = "DEQ") -> Callable[..., Any]:
    """The forward solver from a name in `SOLVERS` or a callable
    `solver(T, z0, *args, **options) -> SolverResult`."""
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(f"{who}: solver: expected one of {sorted(SOLVERS)} or a callable "
                             f"like those of implicitdiff.solvers, got {solver!r}.")
        return SOLVERS[solver]
    if not callable(solver):
        raise TypeError(f"{who}: solver: expected a name ({sorted(SOLVERS)}) or a callable "
                        f"solver(T, z0, *args, **options), got {type(solver).__name__}.")
    return solver


EXTRA_STEPS = 3
"""The layers' default `extra_step` for the built-in solvers (see `forward_options`)."""


def forward_options(solver: Callable[..., Any], options: Any = None) -> dict[str, Any]:
    """The keywords a layer passes to its forward solver: the layers' defaults under the
    user's `options` (which win). The defaults: `maxiter=50`, and for the built-in fixed-point
    solvers of `SOLVERS` `extra_step=EXTRA_STEPS` (3): after the last iteration three plain
    steps $z \\leftarrow f(z, x)$ (three more batched calls of `f`), each kept per sample where
    it does not increase the residual, which leave the returned $z^*$, and so the implicit
    gradient computed there, far closer to the exact one than the tolerance asked (on the
    benchmark DEQ each step divides the gradient error by 3 to 5; see `docs/deq.md`). A custom
    solver gets only `maxiter=50`."""
    defaults: dict[str, Any] = {"maxiter": 50}
    if is_builtin_solver(solver):
        defaults["extra_step"] = EXTRA_STEPS
    return {**defaults, **(options or {})}


def is_builtin_solver(solver: Callable[..., Any]) -> bool:
    """Whether `solver` is one of `SOLVERS`, whose `max_abs_residual` is that of the value they
    return (the layer's residual check then evaluates nothing)."""
    return any(solver is s for s in SOLVERS.values())


# ---- the forward residual check and failed samples ---------------------------------------------
# A DEQ solves one fixed point per sample. With on_failure="nan" a failed sample must not reach
# the others: its output is NaN, and it contributes nothing to the gradient. Two things would
# let it leak into what the batch shares (the parameters): its input x (NaN there makes every
# Jacobian product of f NaN in that row, and 0 * NaN = NaN in B^T u), and its z* (the same in
# the approximate modes' recorded steps). The layers therefore solve and differentiate the failed
# samples at zero (x by `zero_failed_samples` before the solve, z* by the backend's per-element
# rule or, in the step modes, before the steps) and make them NaN afterwards (`nan_where`,
# whose cotangent there is zero).

def _batched_float_leaves(bk: Any, tree: Any, batch: int) -> list[Any]:
    return [leaf for leaf in bk.tree_flatten(tree)[0]
            if hasattr(leaf, "dtype") and hasattr(leaf, "shape") and bk.owns(leaf)
            and bk.is_float(leaf) and len(leaf.shape) >= 1 and leaf.shape[0] == batch]


def samples_finite(bk: Any, tree: Any, batch: int) -> Any:
    """Per sample, `(batch,)` booleans: whether every floating leaf of `tree` (a layer's input)
    whose leading dimension is the batch is finite in that sample. All true when no leaf is."""
    leaves = _batched_float_leaves(bk, tree, batch)
    if not leaves:
        return None
    ok = None
    for leaf in leaves:
        xp = bk.namespace(leaf)
        fin = all_finite(xp, xp.reshape(leaf, (batch, -1)))
        ok = fin if ok is None else ok & fin
    return ok


def zero_failed_samples(bk: Any, tree: Any, ok: Any, batch: int) -> Any:
    """`tree` with zeros in the samples where `ok` is false, in every floating leaf whose
    leading dimension is the batch (a `where`: differentiable, no cotangent reaches the zeroed
    samples). `ok` None: `tree` itself."""
    if ok is None:
        return tree
    leaves, treedef = bk.tree_flatten(tree)
    keep = {id(leaf) for leaf in _batched_float_leaves(bk, tree, batch)}
    out = []
    for leaf in leaves:
        if id(leaf) in keep:
            xp = bk.namespace(leaf, ok)
            mask = xp.reshape(ok, (batch,) + (1,) * (len(leaf.shape) - 1))
            leaf = xp.where(mask, leaf, xp.zeros_like(leaf))
        out.append(leaf)
    return bk.tree_unflatten(treedef, out)


def check_fixed_point(bk: Any, z: Any, rmax: Any, tol: float, on_failure: str, who: str, *,
                      inputs_ok: Any = None, with_residual: bool = False) -> Any:
    r"""The layers' forward residual check, per sample: `z` `(batch, n)` is accepted where it is
    finite and $\max|f(z, x) - z|$ = `rmax` `(batch,)` is at most `tol`, and where `inputs_ok`
    (`samples_finite` of the layer's input; None: all) is true. Records it in
    `idf.diagnostics()` (function `who`) and applies `on_failure` through the backend (`"raise"`
    and `"warn"` name the failed samples; `"nan"` makes only them NaN). Returns `z`, or
    `(z, rmax)` with `with_residual` (`rmax` NaN in the samples whose input is not finite)."""
    from ._root import record_forward

    xp = bk.namespace(z)
    ok = all_finite(xp, z) & (rmax <= tol)   # a NaN residual fails too
    if inputs_ok is not None:
        rmax = xp.where(inputs_ok, rmax, xp.full_like(rmax, float("nan")))
        ok = ok & inputs_ok
    record_forward(bk, who, rmax, tol, batched=True)
    z = bk.handle_failure(z, ok, on_failure, _not_a_fixed_point(who, tol), rmax, ok)
    return (z, rmax) if with_residual else z


def _not_a_fixed_point(who: str, tol: float) -> Callable[..., Any]:
    def make(rmax: Any, ok: Any) -> Any:
        import numpy as np

        from ._errors import NonConvergenceError

        bad = np.flatnonzero(~np.asarray(ok, dtype=bool)).tolist()
        worst = float(np.max(np.nan_to_num(np.asarray(rmax, dtype=np.float64), nan=np.inf)))
        msg = (f"{who}: the forward solve stopped far from the fixed point for samples "
               f"{bad[:5]}{' ...' if len(bad) > 5 else ''}: max|f(z*, x) - z*| = {worst:.3g}, "
               f"expected at most residual_tol = {tol:.3g}. The gradient would be meaningless. "
               "Raise maxiter, change the solver, make f more contractive (spectral norm, "
               "Jacobian regularization), or pass a larger residual_tol. (A residual of inf "
               "or nan: the state or the input x of those samples is not finite; "
               "on_failure='nan' makes only them NaN.)")
        return NonConvergenceError(msg, residual_norm=float(np.max(np.asarray(rmax))),
                                   tolerance=tol)

    return make


# ---- statistics --------------------------------------------------------------------------------

class DEQStats(NamedTuple):
    """The forward solve of a DEQ layer, per sample (arrays of the layer's framework, shape
    `(batch,)`; traces `(batch, maxiter)`), never differentiated. The same fields in every
    framework.

    - `steps`, `converged`, `residual_norm`, `relative_residual`, `trace`, `relative_trace`:
      the forward solver's `SolverResult` (`converged` is its own criterion).
    - `max_abs_residual`: $\\max|f(z^*, x) - z^*|$, the quantity `residual_tol` bounds.
    - `warm_started`: whether the solve started from a previous fixed point (`z0=`, or the
      PyTorch layer's `warm_start=True`).
    """

    steps: Any
    converged: Any
    residual_norm: Any
    relative_residual: Any
    trace: Any
    relative_trace: Any
    max_abs_residual: Any
    warm_started: bool

    def summary(self) -> dict[str, float]:
        """Scalars for a logger: mean/max steps, max relative residual, converged fraction.
        Concrete arrays only (not under `jit`)."""
        import numpy as np

        return {"steps_mean": float(np.mean(_host(self.steps))),
                "steps_max": int(np.max(_host(self.steps))),
                "rel_residual_max": float(np.max(_host(self.relative_residual))),
                "converged_frac": float(np.mean(_host(self.converged)))}


def _host(a: Any) -> Any:
    """A NumPy copy of a framework array (detached, on the host) for `summary()`."""
    import numpy as np

    for attr in ("detach", "cpu"):  # torch tensors: off the tape, off the device
        if hasattr(a, attr):
            a = getattr(a, attr)()
    return np.asarray(a, dtype=np.float64)
