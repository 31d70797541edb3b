"""Deep equilibrium layers for PyTorch: `DEQ`, its backward modes, and the DEQ toolkit
(Jacobian regularization, variational dropout, fixed-point correction states).

A `DEQ` wraps any module `f(z, x)` and returns $z^* = f(z^*, x)$, found by one of
`implicitdiff.solvers` under `torch.no_grad()` (no tape: memory does not grow with the number of
solver iterations). Its derivative comes from the backward mode:

- `IFT(solve=...)` (default, **exact**): `idf.custom_fixed_point(..., batch_dims=1)`; the
  parameters of `f` are passed to it as a positional dict (through
  `torch.func.functional_call`), so they get their gradients by the implicit function theorem,
  as does `x`. Differentiable again (`create_graph=True`, `gradgradcheck`), composable with
  `torch.func`.
- `Neumann(terms=k)` (approximation): the same implicit rule with the linear solve replaced by
  $k$ terms of the Neumann series $(I - J)^{-\\top}\\bar z \\approx \\sum_{j<k} (J^\\top)^j \\bar z$
  (`NeumannSolve`, a core linear solver that runs a fixed number of steps).
- `Phantom(steps=k, damping=λ)` (approximation, Geng et al. 2021): backpropagation through
  $k$ damped steps $z \\leftarrow (1-\\lambda) z + \\lambda f(z, x)$ started at the detached $z^*$.
- `JFB()` (approximation, Fung et al. 2022): backpropagation through one application of $f$ at
  the detached $z^*$, i.e. $\\partial f/\\partial z \\approx 0$ in the implicit rule.

See `docs/deq.md` for the error of each approximation against the exact gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
from torch import nn

import implicitdiff as idf
from implicitdiff import solvers as _solvers
from implicitdiff._errors import NonConvergenceError, StructureError
from implicitdiff._linear_solve import AbstractLinearSolver, NeumannSolve

__all__ = [
    "DEQ",
    "IFT",
    "JFB",
    "DEQStats",
    "Neumann",
    "NeumannSolve",
    "Phantom",
    "VariationalDropout",
    "correction_states",
    "jacobian_penalty",
]


# ---- an approximate linear solve: k terms of the Neumann series --------------------------------

# ---- backward modes ------------------------------------------------------------------------

@dataclass(frozen=True)
class IFT:
    """Exact implicit gradient: solve $(I - J)^\\top u = \\bar z$ with `solve`.

    `solve`: a core linear solver; default `idf.BiCGStab()` (tolerance $10^{-6}$ relative in
    float32, $10^{-12}$ in float64). `idf.Richardson(omega=-1.0, maxiter=...)` is the classic
    DEQ fixed-point backward (least memory; needs a contraction). Exact up to the solve's
    tolerance; a solve that does not converge raises (per the layer's `on_failure`)."""

    solve: AbstractLinearSolver = field(default_factory=idf.BiCGStab)
    exact = True


@dataclass(frozen=True)
class Neumann:
    """Approximate: the implicit rule with $k$ = `terms` terms of the Neumann series
    (`NeumannSolve`). Relative error about $\\|J\\|^k$; `terms=1` equals `JFB`. Memory flat
    (no tape), differentiable again."""

    terms: int = 5
    exact = False

    @property
    def solve(self) -> NeumannSolve:
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


@dataclass(frozen=True)
class JFB:
    """Approximate (Jacobian-free backprop, Fung et al. 2022): backpropagate through one
    application of $f$ at the detached $z^*$, i.e. drop $\\partial f/\\partial z$ from the
    implicit rule. Relative error about $\\|J\\|$; the cheapest mode."""

    exact = False


_MODES = (IFT, Neumann, Phantom, JFB)


def _as_mode(backward: Any) -> Any:
    if isinstance(backward, _MODES):
        return backward
    if isinstance(backward, str):
        named = {"ift": IFT(), "exact": IFT(), "jfb": JFB(), "phantom": Phantom(),
                 "neumann": Neumann()}
        if backward.lower() in named:
            return named[backward.lower()]
    if isinstance(backward, AbstractLinearSolver):
        return IFT(solve=backward)
    raise ValueError(
        "DEQ: backward: expected IFT(...), Neumann(...), Phantom(...), JFB(), a linear solver "
        f"(exact IFT with it), or one of 'ift', 'neumann', 'phantom', 'jfb'; got {backward!r}."
    )


# ---- statistics -----------------------------------------------------------------------------

class DEQStats(NamedTuple):
    """The last forward solve of a `DEQ`, per sample (tensors of shape `(batch,)`, traces
    `(batch, maxiter)`), detached. `converged` is the forward solver's own criterion;
    `max_abs_residual` is $\\max|f(z^*, x) - z^*|$, the quantity `residual_tol` bounds."""

    steps: torch.Tensor
    converged: torch.Tensor
    residual_norm: torch.Tensor
    relative_residual: torch.Tensor
    trace: torch.Tensor
    relative_trace: torch.Tensor
    max_abs_residual: torch.Tensor | None
    warm_started: bool

    def summary(self) -> dict[str, float]:
        """Scalars for a logger: mean/max steps, max relative residual, converged fraction."""
        return {"steps_mean": float(self.steps.float().mean()),
                "steps_max": int(self.steps.max()),
                "rel_residual_max": float(self.relative_residual.max()),
                "converged_frac": float(self.converged.float().mean())}


_SOLVERS: dict[str, Callable[..., Any]] = {
    "anderson": _solvers.anderson,
    "broyden": _solvers.broyden,
    "fixed_point_iteration": _solvers.fixed_point_iteration,
    "fixed_point": _solvers.fixed_point_iteration,
}
_TRUSTED = frozenset(_SOLVERS.values())  # their max_abs_residual is that of their value


# ---- the module ------------------------------------------------------------------------------

class DEQ(nn.Module):
    """A deep equilibrium layer: $z^* = f(z^*, x)$ for any module `f(z, x) -> z'`.

    ```python
    cell = Cell(hidden)                               # any nn.Module f(z, x)
    deq = DEQ(cell, z_shape=(hidden,))                # Anderson forward, exact IFT backward
    z = deq(x)                                        # (batch, hidden); gradients reach cell
    loss(head(z)).backward()                          # and x, by the implicit function theorem
    print(deq.stats.summary())
    ```

    `f` must act sample by sample on a leading batch dimension (sample $i$ of its output depends
    on sample $i$ of `z` and `x` only); `z` may have any per-sample shape, the solver sees it
    flattened to `(batch, n)`. Stochastic layers inside `f` must be fixed across iterations:
    use `VariationalDropout`, not `nn.Dropout`. Parametrizations of submodules of `f`
    (`torch.nn.utils.parametrizations.spectral_norm`, `weight_norm`, ...) are evaluated once
    per forward pass: in training mode `spectral_norm`'s power iteration runs once, before the
    solve, and its vectors $u, v$ are then frozen for that pass (solve, residual check and
    backward), so $f$ is one fixed map; `parametrizations.weight.original` gets the exact
    implicit gradient.

    **Arguments:**

    - `f`: the module (or any callable whose parameters you pass with `params=`).
    - `z_shape`: per-sample shape of $z$; default: the shape of `x` (as `torch.zeros_like(x)`).
    - `solver`: `"anderson"` (default), `"broyden"`, `"fixed_point_iteration"`, or a callable
      `solver(T, z0, *args, **solver_options) -> SolverResult` like those of
      `implicitdiff.solvers`.
    - `solver_options`: keyword options of the solver (`tol`, `maxiter`, `m`, ...). Defaults:
      `maxiter=50` and the solver's own tolerance ($\\sqrt\\epsilon$ relative).
    - `backward`: `IFT(solve=...)` (default `IFT(idf.BiCGStab())`, exact), `Neumann(k)`,
      `Phantom(k, damping)`, `JFB()`, a linear solver (`IFT` with it) or one of the names
      `"ift"`, `"neumann"`, `"phantom"`, `"jfb"`.
    - `warm_start`: start from the last fixed point when the new $z_0$ has the same shape
      (default False). It is detached and only an initial guess: it never changes the
      gradient, and the forward residual check still applies.
    - `residual_tol`: the forward solve is accepted when $\\max|f(z^*, x) - z^*| \\le$
      `residual_tol` per sample; default $10\\sqrt\\epsilon$ of the dtype.
    - `on_failure`: `"raise"` (default), `"warn"` or `"nan"` (failed samples become NaN and
      contribute nothing to the exact gradient), for the forward solve and the backward solve.

    **Returns** (from `forward(x, z0=None)`): $z^*$ of shape `(batch, *z_shape)`.
    After each call `self.stats` holds a `DEQStats` of the forward solve.
    """

    def __init__(self, f: Callable[..., Any], *, z_shape: Sequence[int] | None = None,
                 solver: str | Callable[..., Any] = "anderson",
                 solver_options: dict[str, Any] | None = None, backward: Any = None,
                 warm_start: bool = False, residual_tol: float | None = None,
                 on_failure: str = "raise"):
        super().__init__()
        if not callable(f):
            raise TypeError(f"DEQ: expected a callable f(z, x), got {type(f).__name__}.")
        self.f = f
        self.z_shape = None if z_shape is None else tuple(int(d) for d in z_shape)
        if isinstance(solver, str):
            if solver not in _SOLVERS:
                raise ValueError(f"DEQ: solver: expected one of {sorted(_SOLVERS)} or a "
                                 f"callable, got {solver!r}.")
            solver = _SOLVERS[solver]
        if not callable(solver):
            raise TypeError(f"DEQ: solver: expected a callable, got {type(solver).__name__}.")
        self.solver = solver
        self.solver_options = {"maxiter": 50, **(solver_options or {})}
        self.backward_mode = _as_mode(IFT() if backward is None else backward)
        self.warm_start = bool(warm_start)
        self.residual_tol = residual_tol
        if on_failure not in ("raise", "warn", "nan"):
            raise ValueError(f"DEQ: on_failure: expected 'raise', 'warn' or 'nan', got "
                             f"{on_failure!r}.")
        self.on_failure = on_failure
        self.stats: DEQStats | None = None
        self._z_last: torch.Tensor | None = None
        self._own: dict | None = None
        self._layer = self._make_layer()

    # -- the map on flattened states ----------------------------------------------------------
    def _T(self, z: torch.Tensor, params: dict, x: Any) -> torch.Tensor:
        shape = self._shape
        zz = z.reshape(z.shape[0], *shape)
        if params is self._own or not isinstance(self.f, nn.Module):
            # the module's own parameters (the forward solve): call it as it is
            out = self.f(zz, x)
        else:
            with _frozen_parametrizations(self.f):
                out = torch.func.functional_call(self.f, params, (zz, x))
        if tuple(out.shape) != tuple(zz.shape):
            raise StructureError(
                f"DEQ: expected f(z, x) to return the shape of z, {tuple(zz.shape)}, got "
                f"{tuple(out.shape)}. f must map a state to a state of the same shape."
            )
        return out.reshape(z.shape)

    def _make_layer(self) -> idf.ImplicitFunction:
        mode = self.backward_mode
        solve = mode.solve if isinstance(mode, (IFT, Neumann)) else idf.BiCGStab()

        def T(z: torch.Tensor, params: dict, x: Any) -> torch.Tensor:
            return self._T(z, params, x)

        T.__name__ = "DEQ.f"
        self._T_named = T

        def deq_layer(params: dict, x: Any, *, z0: torch.Tensor) -> torch.Tensor:
            return self._solve(T, z0, params, x)

        deq_layer.__name__ = "DEQ"  # names the layer in error messages and diagnostics
        # the residual check is `_solve`'s (from the solver's own final residual, without
        # another evaluation of f); custom_fixed_point only checks finiteness
        return idf.custom_fixed_point(T, solve=solve, batch_dims=1, residual_tol=math.inf,
                                      on_failure=self.on_failure)(deq_layer)

    def _solve(self, T: Callable[..., Any], z0: torch.Tensor, params: dict, x: Any
               ) -> torch.Tensor:
        """The forward solve, untraced, and its residual check (per `on_failure`)."""
        own = self._own
        p = own if own is not None and len(params) == len(own) and all(
            params.get(k) is v for k, v in own.items()) else params
        with torch.no_grad():
            res = self.solver(T, z0, p, x, **self.solver_options)
            self._record(res)
            tol = self._residual_tol(res.value.dtype)
            if self.solver in _TRUSTED:
                # the built-in solvers return max|f(z) - z| at the value they return
                return self._accept(res.value, res.max_abs_residual, tol)
            return self._check(res.value, p, x)

    # Under torch.compile the forward solve runs eagerly, as one graph break: its loop stops on
    # data (`bool(tensor)` each iteration), where Dynamo would otherwise break, or recompile, at
    # every iteration. (The exact modes reach it through the backend's disabled `call`; this
    # covers Phantom and JFB, whose recorded steps stay compiled.)
    _solve = cast(Any, torch.compiler.disable(_solve))

    def _residual_tol(self, dtype: torch.dtype) -> float:
        if self.residual_tol is not None:
            return self.residual_tol
        return idf._root.default_residual_tol(torch.finfo(dtype).eps)

    def _record(self, res: Any, max_abs: torch.Tensor | None = None) -> None:
        self.stats = DEQStats(res.steps, res.converged, res.residual_norm,
                              res.relative_residual, res.trace, res.relative_trace, max_abs,
                              self._warm)

    # -- forward -----------------------------------------------------------------------------
    def params(self) -> dict[str, torch.Tensor]:
        """The parameters of `f` passed to the implicit layer (`dict(f.named_parameters())`)."""
        if isinstance(self.f, nn.Module):
            return dict(self.f.named_parameters())
        return {}

    def initial_state(self, x: Any) -> torch.Tensor:
        """Zeros of shape `(batch, *z_shape)` in the dtype and device of `x`."""
        leaf = x if isinstance(x, torch.Tensor) else _first_tensor(x)
        if self.z_shape is None:
            return torch.zeros_like(leaf)
        return leaf.new_zeros((leaf.shape[0], *self.z_shape))

    def forward(self, x: Any, z0: torch.Tensor | None = None) -> torch.Tensor:
        z0 = self.initial_state(x) if z0 is None else z0
        batch = z0.shape[0]
        self._shape = tuple(z0.shape[1:])
        self._warm = False
        z0f = z0.detach().reshape(batch, -1)
        if (self.warm_start and self._z_last is not None and self._z_last.shape == z0f.shape
                and self._z_last.dtype == z0f.dtype and self._z_last.device == z0f.device
                and bool(torch.isfinite(self._z_last).all())):
            z0f, self._warm = self._z_last, True
        _prepare_dropout(self.f, z0)
        snapshot = _step_parametrizations(self.f)
        params = {**self.params(), **snapshot}
        # with no parametrization state to pin, the forward solve calls f itself (the same
        # tensors as `params`, without functional_call's per-call cost)
        self._own = None if snapshot else params
        mode = self.backward_mode
        if isinstance(mode, (IFT, Neumann)):
            z = self._layer(params, x, z0=z0f)
        else:
            z = self._approximate(mode, params, x, z0f)
        if self.warm_start:
            self._z_last = z.detach().clone()
        return z.reshape(batch, *self._shape)

    def _approximate(self, mode: Any, params: dict, x: Any, z0: torch.Tensor) -> torch.Tensor:
        """Phantom / JFB: the forward solve untraced, then a few recorded steps of `f` from the
        detached fixed point. The forward residual check is the same as the exact mode's."""
        with torch.no_grad():
            zs = self._solve(self._T_named, z0, params, x)
        steps, lam = (1, 1.0) if isinstance(mode, JFB) else (mode.steps, mode.damping)
        z = zs.detach()
        for _ in range(steps):
            fz = self._T(z, params, x)
            z = fz if lam == 1.0 else (1 - lam) * z + lam * fz
        return z

    def _check(self, z: torch.Tensor, params: dict, x: Any) -> torch.Tensor:
        r = (self._T(z, params, x) - z).abs().amax(dim=-1)
        return self._accept(z, r, self._residual_tol(z.dtype))

    def _accept(self, z: torch.Tensor, r: torch.Tensor, tol: float) -> torch.Tensor:
        """The residual check of `z` given its $\\max|f(z, x) - z|$ per sample, `r`."""
        idf._root.record_forward(idf.get_backend(z), "DEQ", r, tol, batched=True)
        ok = torch.isfinite(r) & (r <= tol) & torch.isfinite(z).all(dim=-1)
        if self.stats is not None:
            self.stats = self.stats._replace(max_abs_residual=r)
        if self.on_failure == "nan":
            return torch.where(ok[:, None], z, torch.full_like(z, float("nan")))
        if not bool(ok.all()):
            bad = torch.nonzero(~ok).flatten().tolist()
            msg = (f"DEQ: the forward solve stopped far from the fixed point for samples "
                   f"{bad[:5]}{' ...' if len(bad) > 5 else ''}: max|f(z*, x) - z*| = "
                   f"{float(r.nan_to_num(float('inf')).max()):.3g}, expected at most "
                   f"residual_tol = {tol:.3g}. The gradient would be meaningless. Raise "
                   "maxiter, change the solver, make f more contractive (spectral norm, "
                   "Jacobian regularization), or pass a larger residual_tol.")
            if self.on_failure == "raise":
                raise NonConvergenceError(msg, residual_norm=float(r.max()), tolerance=tol)
            import warnings

            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return z

    # -- toolkit -------------------------------------------------------------------------------
    def jacobian_penalty(self, x: Any, z: torch.Tensor, n_samples: int = 1) -> torch.Tensor:
        """`jacobian_penalty(self.f, z, x, n_samples)`: Hutchinson's estimate of
        $\\|\\partial f/\\partial z\\|_F^2 / n$ at `z` (detached), differentiable in the
        parameters of `f` and in `x`."""
        if isinstance(self.f, nn.Module) and _parametrization_lists(self.f):
            module = self.f

            def f(zz: torch.Tensor, xx: Any) -> torch.Tensor:
                with _frozen_parametrizations(module):
                    return module(zz, xx)

            return jacobian_penalty(f, z, x, n_samples=n_samples)
        return jacobian_penalty(self.f, z, x, n_samples=n_samples)

    def extra_repr(self) -> str:
        name = getattr(self.solver, "__name__", type(self.solver).__name__)
        return (f"solver={name}, backward={self.backward_mode!r}, "
                f"warm_start={self.warm_start}")


# ---- parametrizations (spectral_norm, weight_norm, ...): one evaluation per forward pass -------

def _parametrization_lists(f: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(qualified name, ParametrizationList)` of every parametrized tensor inside `f`."""
    from torch.nn.utils import parametrize

    out = []
    for name, m in f.named_modules():
        if parametrize.is_parametrized(m):
            plists = cast(Any, m.parametrizations)  # a ModuleDict of ParametrizationLists
            for t, plist in plists.items():
                out.append((f"{name}.parametrizations.{t}" if name else f"parametrizations.{t}",
                            plist))
    return out


def _step_parametrizations(f: Any) -> dict[str, torch.Tensor]:
    """Once per forward pass: evaluate each parametrization of `f` in its own mode (in
    training mode `spectral_norm` runs its power iteration here, updating $u, v$ in place),
    then return a snapshot (clones) of the parametrizations' buffers. Passed to
    `functional_call` with the parameters, they pin the state the map uses in the solve, the
    residual check and the backward, even if `f` is called again (e.g. by a regularizer)
    before `backward()`."""
    if not isinstance(f, nn.Module):
        return {}
    lists = _parametrization_lists(f)
    if not lists:
        return {}
    snap: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for prefix, plist in lists:
            plist()  # the state update of a training-mode parametrization, once
            for bname, buf in plist.named_buffers():
                snap[f"{prefix}.{bname}"] = buf.detach().clone()
    return snap


@contextlib.contextmanager
def _frozen_parametrizations(f: nn.Module) -> Iterator[None]:
    """Evaluate the parametrizations of `f` as fixed functions of their parameters: their
    modules in eval mode (no power iteration: `spectral_norm` uses its current $u, v$)."""
    mods = [m for _, plist in _parametrization_lists(f) for m in plist.modules() if m.training]
    for m in mods:
        m.training = False
    try:
        yield
    finally:
        for m in mods:
            m.training = True


def _first_tensor(x: Any) -> torch.Tensor:
    from implicitdiff import _tree

    for leaf in _tree.tree_flatten(x)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise StructureError("DEQ: expected x to be, or contain, a tensor (its batch size and "
                         "dtype define z0); got none. Pass z0 explicitly.")


# ---- Jacobian regularization ----------------------------------------------------------------

def jacobian_penalty(f: Callable[..., Any], z: torch.Tensor, x: Any, *, n_samples: int = 1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Hutchinson's estimate of $\\|\\partial_z f(z, x)\\|_F^2 / n$ per sample, averaged over
    the batch (Bai, Koltun, Kolter 2021, "Stabilizing equilibrium models by Jacobian
    regularization"): $\\mathbb{E}_\\varepsilon \\|\\varepsilon^\\top J\\|^2 / n$ with
    $\\varepsilon \\sim N(0, I)$, `n_samples` probes, $n$ the per-sample size of $z$.

    Evaluated at `z.detach()`; the result is differentiable in the parameters of `f` and in
    `x` (`create_graph=True`), so add `weight * penalty` to the loss. It costs one
    application of `f` and one backward through it per probe."""
    zd = z.detach().requires_grad_()
    with torch.enable_grad():
        fz = f(zd, x)
        n = zd[0].numel()
        total = zd.new_zeros(())
        for _ in range(n_samples):
            eps = torch.randn(fz.shape, dtype=fz.dtype, device=fz.device, generator=generator)
            (g,) = torch.autograd.grad(fz, zd, eps, create_graph=True)
            total = total + (g * g).sum() / g.shape[0]
    return total / (n_samples * n)


# ---- variational dropout ---------------------------------------------------------------------

class VariationalDropout(nn.Module):
    """Dropout with one mask per forward pass of the `DEQ`, the same at every solver iteration
    (and in the backward), so the map $f$ stays deterministic while it is solved. In training
    mode the `DEQ` samples the mask before the solve (shape `(batch, *shape)` where `shape`
    is this layer's input shape without the batch; pass `shape=` when it differs from the
    state's); in eval mode it is the identity.

    Use it inside `f` in place of `nn.Dropout` (which would draw a new mask at each iteration:
    then $f$ has no fixed point)."""

    def __init__(self, p: float = 0.1, shape: Sequence[int] | None = None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"VariationalDropout: expected 0 <= p < 1, got {p!r}.")
        self.p = p
        self.shape = None if shape is None else tuple(shape)
        self.mask: torch.Tensor | None = None

    def reset(self, like: torch.Tensor) -> None:
        """Draw a new mask for inputs shaped like `like` (batch first)."""
        shape = (like.shape[0], *(self.shape or like.shape[1:]))
        keep = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - self.p)
        self.mask = keep / (1 - self.p)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return h
        if self.mask is None or self.mask.shape != h.shape:
            raise StructureError(
                f"VariationalDropout: no mask for an input of shape {tuple(h.shape)} (mask "
                f"{None if self.mask is None else tuple(self.mask.shape)}). Inside a DEQ the "
                "mask is drawn before each solve; elsewhere call .reset(like) first, or pass "
                "shape= when the input shape differs from the DEQ's state."
            )
        return h * self.mask


def _prepare_dropout(f: Any, z0: torch.Tensor) -> None:
    if isinstance(f, nn.Module):
        for m in f.modules():
            if isinstance(m, VariationalDropout):
                if m.training and m.p > 0:
                    m.reset(z0)
                else:
                    m.mask = None


# ---- fixed-point correction ------------------------------------------------------------------

def correction_states(deq: DEQ, x: Any, *, iterations: Sequence[int] = (2, 4, 8),
                      grad_steps: int = 1, z0: torch.Tensor | None = None
                      ) -> list[torch.Tensor]:
    """States for a fixed-point correction loss (Bai et al. 2022, "Deep equilibrium optical
    flow estimation"): the iterates of plain fixed-point iteration on `deq.f` after each number
    of `iterations`, each followed by `grad_steps` recorded applications of `f` (a phantom
    gradient from that state). Apply the task loss to each, with weights growing toward the
    fixed point, and add it to the loss of the DEQ's output:

    ```python
    states = correction_states(deq, x, iterations=(2, 4, 8))
    loss = loss_fn(head(deq(x))) + sum(0.8 ** (len(states) - i) * loss_fn(head(s))
                                       for i, s in enumerate(states))
    ```

    The iterations run under `torch.no_grad()`; only the `grad_steps` per state are taped."""
    z0 = deq.initial_state(x) if z0 is None else z0
    batch, shape = z0.shape[0], tuple(z0.shape[1:])
    deq._shape = shape
    params = deq.params()
    if sorted(iterations) != list(iterations) or not iterations or iterations[0] < 0:
        raise ValueError(f"correction_states: expected non-negative increasing iterations, got "
                         f"{tuple(iterations)!r}.")
    z = z0.detach().reshape(batch, -1)
    out, done = [], 0
    for k in iterations:
        with torch.no_grad():
            for _ in range(k - done):
                z = deq._T(z, params, x)
        done = k
        s = z.detach()
        for _ in range(grad_steps):
            s = deq._T(s, params, x)
        out.append(s.reshape(batch, *shape))
    return out
