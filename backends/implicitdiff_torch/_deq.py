"""Deep equilibrium layers for PyTorch: the `DEQ` module.

A `DEQ` wraps any module `f(z, x)` and returns $z^* = f(z^*, x)$, found by one of
`implicitdiff.solvers` under `torch.no_grad()` (no tape: memory does not grow with the number of
solver iterations). Its derivative comes from the backward mode (`IFT`, `Neumann`, `Phantom`,
`JFB`; see `_deq_modes.py` and `docs/deq.md`).

The toolkit sits beside it, one concern a module: the backward modes (`_deq_modes.py`), the
statistics (`_deq_stats.py`), parametrizations of `f` (`_deq_parametrizations.py`), the
Jacobian penalty and variational dropout (`_deq_regularizers.py`), and the fixed-point
correction states (`_deq_correction.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

import implicitdiff as idf
from implicitdiff.backend import (
    StructureError,
    check_on_failure,
    default_residual_tol,
    get_backend,
    nan_where,
    resolve_on_failure,
    tree_flatten,
    tree_map,
)
from implicitdiff.deq import (
    as_solver,
    check_fixed_point,
    default_backward_solver,
    forward_options,
    is_builtin_solver,
    samples_finite,
    zero_failed_samples,
)

# The toolkit lives in its own modules; its names stay importable from here too (a model saved
# whole with `torch.save` refers to its backward mode as `implicitdiff_torch._deq.IFT`, ...).
from ._deq_correction import correction_states as correction_states
from ._deq_modes import IFT as IFT
from ._deq_modes import JFB as JFB
from ._deq_modes import Neumann as Neumann
from ._deq_modes import NeumannSolve as NeumannSolve
from ._deq_modes import Phantom as Phantom
from ._deq_modes import _as_mode
from ._deq_parametrizations import (
    _frozen_parametrizations,
    _parametrization_lists,
    _step_parametrizations,
)
from ._deq_regularizers import VariationalDropout as VariationalDropout
from ._deq_regularizers import _prepare_dropout
from ._deq_regularizers import jacobian_penalty as jacobian_penalty
from ._deq_stats import DEQStats as DEQStats
from ._function import _transforms_active

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
    flattened to `(batch, n)`. A `DEQ` solves one fixed point per sample, so a module that
    couples the samples is refused with a `StructureError` naming it: `nn.BatchNorm*` /
    `SyncBatchNorm` in training mode or without running statistics (batch statistics; use
    `GroupNorm` / `LayerNorm`, or eval mode), and any module in training mode with running
    statistics (`InstanceNorm(track_running_stats=True)`, ...: they would be updated at every
    solver iteration), checked at each forward; and, once (the first forward in grad mode with
    a batch of two or more, outside `torch.func` transforms: one more application of `f` and
    one backward through it), a cell whose output for one sample depends on the state of
    another (such as `z - z.mean(0)`). Stochastic layers inside `f` must be fixed across iterations:
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
    - `solver_options`: keyword options of the solver (`tol`, `maxiter`, `m`, `extra_step`,
      ...). Defaults: `maxiter=50`, the solver's own tolerance ($\\sqrt\\epsilon$ relative),
      and for the named solvers `extra_step=3` (three plain steps $z \\leftarrow f(z, x)$
      after the last iteration: three more batched calls of `f`, a far more accurate $z^*$ and
      gradient; `implicitdiff.deq.forward_options`).
    - `backward`: `IFT(solve=...)` (default `IFT()`, exact: the fixed-point iteration
      `idf.Richardson(omega=-1.0, fallback=idf.BiCGStab())`, with the uniqueness probe),
      `Neumann(k)`,
      `Phantom(k, damping)`, `JFB()`, a linear solver (`IFT` with it) or one of the names
      `"ift"`, `"neumann"`, `"phantom"`, `"jfb"`.
    - `warm_start`: start from the last fixed point when the new $z_0$ has the same shape
      (default False). It is detached and only an initial guess: it never changes the
      gradient, and the forward residual check still applies.
    - `residual_tol`: the forward solve is accepted when $\\max|f(z^*, x) - z^*| \\le$
      `residual_tol` per sample; default $10\\sqrt\\epsilon$ of the dtype.
    - `on_failure`: `"raise"`, `"warn"` or `"nan"`, for the forward solve and the backward
      solve; `None` (default): `idf.config.on_failure` when the layer is called. With `"nan"`
      a failed sample (its solve failed, or its input `x` is not finite) is NaN in the output,
      reported in `stats` and `idf.diagnostics()`, and contributes nothing to the gradient
      (in every backward mode): the other samples' outputs and the parameters' gradient are
      those of the batch without it.

    **Returns** (from `forward(x, z0=None)`): $z^*$ of shape `(batch, *z_shape)`.
    After each call `self.stats` holds a `DEQStats` of the forward solve.
    """

    def __init__(self, f: Callable[..., Any], *, z_shape: Sequence[int] | None = None,
                 solver: str | Callable[..., Any] = "anderson",
                 solver_options: dict[str, Any] | None = None, backward: Any = None,
                 warm_start: bool = False, residual_tol: float | None = None,
                 on_failure: str | None = None):
        super().__init__()
        if not callable(f):
            raise TypeError(f"DEQ: expected a callable f(z, x), got {type(f).__name__}.")
        self.f = f
        self.z_shape = None if z_shape is None else tuple(int(d) for d in z_shape)
        self.solver = as_solver(solver, "DEQ")
        self.solver_options = forward_options(self.solver, solver_options)
        self.backward_mode = _as_mode(IFT() if backward is None else backward)
        self.warm_start = bool(warm_start)
        self.residual_tol = residual_tol
        if on_failure is not None:
            check_on_failure(on_failure, "DEQ")
        self.on_failure = on_failure
        self.stats: DEQStats | None = None
        self._z_last: torch.Tensor | None = None
        self._own: dict | None = None
        self._probed = False
        self._make_layer()

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

    def _make_layer(self) -> None:
        def T(z: torch.Tensor, params: dict, x: Any) -> torch.Tensor:
            return self._T(z, params, x)

        T.__name__ = "DEQ.f"
        self._T_named = T
        self._layers: dict[str, idf.ImplicitFunction] = {}

    def _layer(self, on_failure: str) -> idf.ImplicitFunction:
        """The implicit layer for `on_failure` (resolved at the call; one per value, so that
        its backward applies the value its forward did)."""
        if on_failure in self._layers:
            return self._layers[on_failure]
        mode = self.backward_mode
        solve = mode.solve if isinstance(mode, (IFT, Neumann)) else default_backward_solver()
        T = self._T_named

        def deq_layer(params: dict, x: Any, *, z0: torch.Tensor, inputs_ok: torch.Tensor
                      ) -> torch.Tensor:
            return self._solve(T, z0, params, x, inputs_ok)

        deq_layer.__name__ = "DEQ"  # names the layer in error messages and diagnostics
        # the residual check is `_solve`'s (from the solver's own final residual, without
        # another evaluation of f); custom_fixed_point only checks finiteness, and with
        # on_failure="nan" its backward drops the failed samples (they contribute nothing).
        # No kink probe: a cell is a network whose ReLU switches take the framework's
        # convention, and the probe's five more evaluations of f nearly doubled a backward
        layer = idf.custom_fixed_point(T, solve=solve, batch_dims=1, residual_tol=math.inf,
                                       on_failure=on_failure, kink_probe=False)(deq_layer)
        self._layers[on_failure] = layer
        return layer

    def _solve(self, T: Callable[..., Any], z0: torch.Tensor, params: dict, x: Any,
               inputs_ok: torch.Tensor) -> torch.Tensor:
        """The forward solve, untraced, and its residual check (per `on_failure`); the
        samples where `inputs_ok` is false (`x` not finite) fail too."""
        own = self._own
        p = own if own is not None and len(params) == len(own) and all(
            params.get(k) is v for k, v in own.items()) else params
        with torch.no_grad():
            res = self.solver(T, z0, p, x, **self.solver_options)
            self._record(res)
            tol = self._residual_tol(res.value.dtype)
            if is_builtin_solver(self.solver):
                # the built-in solvers return max|f(z) - z| at the value they return
                return self._accept(res.value, res.max_abs_residual, tol, inputs_ok)
            return self._check(res.value, p, x, inputs_ok)

    # Under torch.compile the forward solve runs eagerly, as one graph break: its loop stops on
    # data (`bool(tensor)` each iteration), where Dynamo would otherwise break, or recompile, at
    # every iteration. (The exact modes reach it through the backend's disabled `call`; this
    # covers Phantom and JFB, whose recorded steps stay compiled.)
    _solve = cast(Any, torch.compiler.disable(_solve))

    def _residual_tol(self, dtype: torch.dtype) -> float:
        if self.residual_tol is not None:
            return self.residual_tol
        return default_residual_tol(torch.finfo(dtype).eps)

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
        self._on_failure = on_failure = resolve_on_failure(self.on_failure, "DEQ: on_failure")
        _refuse_coupling_modules(self.f)
        # samples whose input is not finite fail; with "nan" they are solved at x = 0 (then
        # made NaN), so that nothing of theirs reaches the samples and parameters they share
        bk = get_backend(z0)
        inputs_ok = samples_finite(bk, x, batch)
        if on_failure == "nan":
            x = zero_failed_samples(bk, x, inputs_ok, batch)
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
        if (not self._probed and batch > 1 and torch.is_grad_enabled()
                and not _transforms_active()):
            # once, at the first call that records a gradient (no derivative, nothing to spoil)
            self._probed = True
            _probe_coupling(self._T, z0f, params, x)
        mode = self.backward_mode
        if isinstance(mode, (IFT, Neumann)):
            z = self._layer(on_failure)(params, x, z0=z0f, inputs_ok=inputs_ok)
        else:
            z = self._approximate(mode, params, x, z0f, inputs_ok)
        if self.warm_start:
            self._z_last = z.detach().clone()
        return z.reshape(batch, *self._shape)

    def _approximate(self, mode: Any, params: dict, x: Any, z0: torch.Tensor,
                     inputs_ok: torch.Tensor) -> torch.Tensor:
        """Phantom / JFB: the forward solve untraced, then a few recorded steps of `f` from the
        detached fixed point. The forward residual check is the same as the exact mode's; with
        `on_failure="nan"` the steps start from zero in the failed samples, which are NaN in
        the output (and get no cotangent: nothing of theirs reaches the parameters)."""
        with torch.no_grad():
            zs = self._solve(self._T_named, z0, params, x, inputs_ok)
        zs = zs.detach()
        if self._on_failure != "nan":
            return mode.unroll(lambda z: self._T(z, params, x), zs)
        bk = get_backend(zs)
        ok = samples_finite(bk, zs, zs.shape[0])
        z = mode.unroll(lambda z: self._T(z, params, x),
                        zero_failed_samples(bk, zs, ok, zs.shape[0]))
        return nan_where(bk, z, ok)

    def _check(self, z: torch.Tensor, params: dict, x: Any, inputs_ok: torch.Tensor
               ) -> torch.Tensor:
        r = (self._T(z, params, x) - z).abs().amax(dim=-1)
        return self._accept(z, r, self._residual_tol(z.dtype), inputs_ok)

    def _accept(self, z: torch.Tensor, r: torch.Tensor, tol: float, inputs_ok: torch.Tensor
                ) -> torch.Tensor:
        """The residual check of `z` given its $\\max|f(z, x) - z|$ per sample, `r`."""
        z, r = check_fixed_point(get_backend(z), z, r, tol, self._on_failure, "DEQ",
                                 inputs_ok=inputs_ok, with_residual=True)
        if self.stats is not None:
            converged = self.stats.converged
            if inputs_ok is not None:   # a sample with a non-finite input did not converge
                converged = converged & inputs_ok
            self.stats = self.stats._replace(max_abs_residual=r, converged=converged)
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

    # -- copies and pickles ----------------------------------------------------------------
    # The implicit layer and the map `_T_named` are closures over this module: a copy
    # (`copy.deepcopy`, `torch.save` + `torch.load`) builds its own instead of keeping the
    # original's, so that it solves with its own parameters and records its own stats.
    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        for name in ("_layers", "_T_named", "_own"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._own = None
        # models saved before these attributes existed
        self.__dict__.setdefault("_probed", False)
        self._make_layer()

    def extra_repr(self) -> str:
        name = getattr(self.solver, "__name__", type(self.solver).__name__)
        return (f"solver={name}, backward={self.backward_mode!r}, "
                f"warm_start={self.warm_start}")


# ---- one fixed point per sample: modules and cells that couple the samples --------------------

_WHY = ("A DEQ solves one fixed point per sample (the solver and the backward linear solve "
        "stop per sample, and the implicit gradient takes df/dz block diagonal over the "
        "batch)")


def _refuse_coupling_modules(f: Any) -> None:
    """Refuse, with a `StructureError` naming the module, what couples the samples or changes
    at every solver iteration: batch normalization using batch statistics (training mode, or no
    running statistics), and any module in training mode whose running statistics it would
    update (once per application of `f`, i.e. per solver iteration). Cheap: a walk over the
    modules, at every forward."""
    if not isinstance(f, nn.Module):
        return
    for name, m in f.named_modules():
        path = f"f.{name}" if name else "f"
        kind = type(m).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training or m.running_mean is None:
                state = ("in training mode" if m.training else
                         "without running statistics (track_running_stats=False)")
                raise StructureError(
                    f"DEQ: {path} ({kind}) {state} normalizes with the statistics of the "
                    f"batch, so sample i of f(z, x) depends on every sample of z. {_WHY}, so "
                    "the gradient would be wrong; its running statistics would also be "
                    "updated at every solver iteration. Expected f to act sample by sample. "
                    "Use a per-sample normalization (nn.GroupNorm, nn.LayerNorm), or "
                    "batch normalization in eval mode with running statistics (frozen "
                    "statistics: module.eval()), or move it out of the cell.")
            continue
        stats = [b for b in ("running_mean", "running_var")
                 if isinstance(getattr(m, b, None), torch.Tensor)]
        if m.training and stats and getattr(m, "track_running_stats", True):
            raise StructureError(
                f"DEQ: {path} ({kind}) in training mode updates its running statistics "
                f"({', '.join(stats)}) each time f is applied, i.e. at every solver "
                "iteration (tens of times a forward pass), so after a forward they describe "
                f"the solver's iterates, not the batch. {_WHY}. Expected f without state "
                "that changes while it is solved. Use track_running_stats=False (for "
                "InstanceNorm: per-sample statistics, nothing kept), put the module in eval "
                "mode (frozen statistics), or move it out of the cell.")


def _probe_coupling(T: Callable[..., Any], z0: torch.Tensor, params: dict, x: Any) -> None:
    """Once per layer: refuse a cell whose output for one sample depends on the state of
    another (such as `z - z.mean(0)`, or a normalization over the batch). One application of
    the map `T(z, params, x)` (`f` on flattened states, its parametrizations frozen) at `z0`
    and one backward through it with a cotangent that is zero on the even samples: the gradient
    of the even samples of `z` is then exactly zero when `f` acts sample by sample (every
    product with a zero row is zero), and not when an odd sample's output reads an even
    sample's state."""
    z = z0.detach().clone().requires_grad_(True)
    xd = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)
    with torch.enable_grad():
        out = T(z, {k: v.detach() for k, v in params.items()}, xd)
    if not out.requires_grad:
        return  # f ignores z, or is not differentiable in it: nothing to probe
    batch = z.shape[0]
    odd = (torch.arange(batch, device=z.device) % 2 == 1).reshape(batch, *([1] * (z.ndim - 1)))
    ramp = torch.arange(out.numel(), device=z.device, dtype=out.dtype).reshape(out.shape)
    cot = torch.where(odd, torch.cos(1.618 * ramp) + 1.5, torch.zeros_like(out))
    (g,) = torch.autograd.grad(out, z, cot, allow_unused=True)
    if g is None:
        return
    leak = torch.nan_to_num(g[~odd.reshape(batch)], nan=0.0, posinf=0.0, neginf=0.0)
    if bool((leak != 0).any()):
        worst = float(leak.abs().max())
        raise StructureError(
            f"DEQ: f couples the samples of the batch: the output of an odd-numbered sample "
            f"depends on the state z of an even-numbered one (a probe on the first call found "
            f"d f(z, x)[odd] / d z[even] of size {worst:.3g}, expected exactly 0). {_WHY}, "
            "so the gradient would be wrong. Expected f to act sample by sample (sample i of "
            "f(z, x) depending on sample i of z and x only). Remove the reduction over the "
            "batch dimension (z.mean(0), batch statistics, attention across the batch), or "
            "use a per-sample normalization (nn.GroupNorm, nn.LayerNorm).")


def _first_tensor(x: Any) -> torch.Tensor:
    for leaf in tree_flatten(x)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise StructureError("DEQ: expected x to be, or contain, a tensor (its batch size and "
                         "dtype define z0); got none. Pass z0 explicitly.")
