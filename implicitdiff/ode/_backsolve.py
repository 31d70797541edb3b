"""`odeint(..., grad="backsolve")`: the continuous adjoint (Chen et al. 2018), integrated backwards
in time by the same solver, with seminorm error control (Kidger et al. 2021) and a check of the
reconstructed forward trajectory, written once for every framework.

With $a(t) = \\partial L / \\partial y(t)$, the adjoint state solves, backwards from the last
output time,

$$\\dot y = f(t, y, \\theta), \\qquad \\dot a = -a^\\top \\partial_y f, \\qquad
\\dot g = -a^\\top \\partial_\\theta f,$$

with $a$ jumping by $\\bar y_k$ at each output time $t_k$ and $g(t_{T-1}) = 0$; then
$\\partial L/\\partial y_0 = a(t_0)$ and $\\partial L/\\partial \\theta = g(t_0)$. The right-hand
side costs one vjp of $f$. The backward pass integrates $y$ again, backwards: on a problem whose
reverse-time flow is unstable, that reconstruction drifts away from the forward trajectory and the
gradient is wrong. Each segment's reconstructed state is compared with the forward's stored one
(`drift_tol`, in units of the tolerance): a drift beyond it is a failure (`on_failure`), never a
silently wrong gradient.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._backend import Backend, get_backend
from .._config import resolve_on_failure
from .._errors import ImplicitDiffError, StructureError
from ._checkpoint import DerivativeNotSupportedError, forward_ad_refusal, vmap_refusal
from ._solver import (
    SUCCESS,
    ODEFailureError,
    ODESolution,
    ODEStats,
    _finish,
    _prepare,
    checkpoint_vjp,
    integrate,
    lift_closure,
)

# The backward pass's step-size controller: the plain integral controller (beta = 0) of
# torchdiffeq and diffrax, not the forward pass's PI controller (beta = 0.04), whose memory
# term damps the step's growth. On the benchmark's neural ODE (docs/benchmarks.md) it takes
# 6 backward steps instead of 8 (torchdiffeq's seminorm count); with so few steps the
# gradient's error depends on where they fall (FFJORD at 1e-5: 3.7e-5 with beta = 0, 8e-6
# with 0.02, 3.4e-6 with 0.04), within the tolerance's reach either way.
_ADJOINT_BETA = 0.0


class BacksolveUnsupportedError(DerivativeNotSupportedError):
    """A derivative `grad="backsolve"` does not give: second order (the adjoint is a
    reverse-mode rule), forward mode through a host solver or through PyTorch's
    `forward_ad` dual tensors (`torch.func.jvp` gives it). Use `grad="direct"` there. A
    `DerivativeNotSupportedError`, like the same refusal of `grad="checkpoint"`: one
    `except` catches both."""


def _unsupported(kind: str) -> ImplicitDiffError:
    if kind == "forward_ad":
        return BacksolveUnsupportedError(forward_ad_refusal("odeint(grad='backsolve')"))
    if kind == "vmap":
        return BacksolveUnsupportedError(vmap_refusal("odeint(grad='backsolve')"))
    if kind == "forward":
        return BacksolveUnsupportedError(
            "odeint(grad='backsolve'): a forward-mode derivative (jvp) was asked for, which "
            "this rule does not give here: in JAX a hand-written reverse-mode rule "
            "(jax.custom_vjp) cannot carry a forward-mode one, and through a host solver "
            "(wrap_solver(..., host=True)) the NumPy calls carry no tangents. Use "
            "grad='direct' (every derivative, every framework), or in PyTorch torch.func.jvp "
            "with a framework solver (host=False).")
    return BacksolveUnsupportedError(
        "odeint(grad='backsolve'): a second-order derivative was asked for, but the "
        "continuous adjoint is a reverse-mode rule (its backward pass is a solve, not "
        "differentiable again here). Use grad='direct' for higher derivatives.")


@dataclass
class AdjointStats:
    """What the backward passes of `grad="backsolve"` did (filled in eagerly: PyTorch, and JAX
    outside `jit`): `nfe_backward` (evaluations of the augmented right-hand side, each one
    evaluation of f and one vjp), `accepted`/`rejected` backward steps, `max_drift`, the
    largest reconstruction drift seen (units of the tolerance), and `fallbacks`, the backward
    passes redone by checkpointing (`fallback="checkpoint"`)."""

    nfe_backward: int = 0
    accepted: int = 0
    rejected: int = 0
    max_drift: float = 0.0
    fallbacks: int = 0


def _drift_error(drift_tol: float) -> Callable[..., ODEFailureError]:
    def make(drift: Any, t: Any) -> ODEFailureError:
        import numpy as np

        d = np.asarray(drift).reshape(-1)
        tt = np.asarray(t).reshape(-1)
        bad = np.flatnonzero(~(d <= drift_tol))
        i = int(bad[0]) if len(bad) else 0
        shape = np.asarray(drift).shape
        sample = tuple(int(v) for v in np.unravel_index(i, shape)) if shape else ()
        return ODEFailureError(
            f"odeint(grad='backsolve'): the backward pass's reconstruction of y drifted from the "
            f"forward trajectory by {d[i]:.3g} (in units of rtol, atol; limit {drift_tol:g}) "
            f"for {len(bad)} sample(s), first at batch index {sample}, at t = {float(tt[0]):.6g}: "
            "the flow is unstable backwards in time, and the adjoint gradient would be wrong. "
            "Use grad='checkpoint' (exact, O(log N) memory) or grad='direct', or tighten "
            "rtol/atol.", sample=sample, t=float(tt[0]), status="reconstruction",
            failed=len(bad))
    return make


class _BuiltIn:
    """The built-in integrator (`integrate`): per-sample steps forward, statistics, seminorm."""

    def __init__(self, opts: dict):
        self.opts = opts
        self.max_steps = opts["max_steps"]
        self.rtol, self.atol = opts["rtol"], opts["atol"]

    def forward(self, bk: Backend, xp: Any, f: Callable[..., Any], y0: Any, ts: Any,
                args: tuple, on_failure: str) -> tuple[Any, tuple | None]:
        # the adjoint never differentiates through these steps: the backend's plain loop
        res = integrate(f, y0, ts, args, differentiable=False, **self.opts)
        return _finish(bk, res.ys, res, on_failure, self.max_steps), tuple(res.stats)

    def segment(self, aug: Callable[..., Any], s0: Any, seg: Any,
                norm: Callable[[Any], Any]) -> tuple[Any, Any, Any]:
        # the plain integral controller (`_ADJOINT_BETA`)
        res = integrate(aug, s0, seg, (), error_norm=norm, pi_beta=_ADJOINT_BETA,
                        differentiable=False, **self.opts)
        return res.ys[-1], res.stats.status == SUCCESS, res.stats


class _External:
    """A user's solver `solve(f, y0, ts, args) -> ys` (time first), forward and backward; with
    `host`, called with NumPy arrays (SciPy's `solve_ivp`, a C library), `f` converting."""

    def __init__(self, solve: Callable[..., Any], host: bool, rtol: float, atol: float,
                 name: str):
        self.solve, self.host, self.rtol, self.atol, self.name = solve, host, rtol, atol, name

    def _call(self, bk: Backend, fun: Callable[..., Any], y0: Any, ts: Any,
              args: tuple) -> Any:
        if not self.host:
            return self.solve(fun, y0, ts, args)
        if bk.is_traced((y0, ts, args)):
            raise StructureError(
                f"{self.name}: a host solver (host=True) was called inside a traced function "
                "(jax.jit, vmap, grad of a jitted function): its NumPy calls need concrete "
                "values. Call it eagerly, or wrap a JAX solver (diffrax) with host=False.")

        def fun_host(t: Any, y: Any, *a: Any) -> Any:
            out = fun(bk.from_host(t, like=y0), bk.from_host(y, like=y0), *args)
            return bk.to_host(bk.stop_gradient(out))

        ys = self.solve(fun_host, bk.to_host(y0), bk.to_host(ts), ())
        return bk.from_host(ys, like=y0)

    def forward(self, bk: Backend, xp: Any, f: Callable[..., Any], y0: Any, ts: Any,
                args: tuple, on_failure: str) -> tuple[Any, tuple | None]:
        ys = self._call(bk, f, y0, ts, args)
        want = (int(ts.shape[0]), *y0.shape)
        if tuple(ys.shape) != want:
            raise StructureError(f"{self.name}: expected the solver to return ys of shape "
                                 f"(len(ts), *y0.shape) = {want} (time first), got "
                                 f"{tuple(ys.shape)}.")
        ok = xp.all(xp.isfinite(ys), axis=(0, ys.ndim - 1)) if ys.ndim > 2 else \
            xp.all(xp.isfinite(ys))
        ys = bk.handle_failure(ys, ok, on_failure, _external_error(self.name), ok)
        return ys, None

    def segment(self, aug: Callable[..., Any], s0: Any, seg: Any,
                norm: Callable[[Any], Any]) -> tuple[Any, Any, Any]:
        bk = get_backend(s0)
        xp = bk.namespace(s0)
        end = self._call(bk, aug, s0, seg, ())[-1]
        return end, xp.all(xp.isfinite(end)), None


def _external_error(name: str) -> Callable[..., ODEFailureError]:
    def make(ok: Any) -> ODEFailureError:
        import numpy as np

        o = np.asarray(ok)
        bad = np.flatnonzero(~o.reshape(-1))
        sample = tuple(int(v) for v in np.unravel_index(int(bad[0]), o.shape)) \
            if o.shape and len(bad) else ()
        return ODEFailureError(f"{name}: the solver returned NaN or inf for {len(bad)} "
                               f"sample(s), first at batch index {sample}. Check the solver's "
                               "status and tolerances.", sample=sample, status="nonfinite",
                               failed=len(bad))
    return make


def backsolve(f: Callable[..., Any], y0: Any, ts: Any, args: tuple, *, method: Any,
              rtol: float, atol: float, dt0: float | None, max_steps: int,
              on_failure: str | None, full_output: bool, seminorm: bool = True,
              drift_tol: float = 100.0, stats: AdjointStats | None = None,
              integrator: Any = None, fallback: str | None = None) -> Any:
    """`odeint` with `grad="backsolve"` (see the module docstring); arguments as `odeint`'s,
    and `seminorm` (the backward step-size control measures $y$ and $a$ only, not the
    parameter integral $g$), `drift_tol`, `stats` (an `AdjointStats` to fill in),
    `integrator` (default the built-in one; `wrap_solver` passes the user's), `fallback`
    (`"checkpoint"`: where the reconstruction drifts, the gradient is taken again by
    `grad="checkpoint"`, eagerly; built-in integrator only)."""
    on_failure = resolve_on_failure(on_failure, "odeint")
    bk = get_backend(y0, ts, args)
    xp, y0, ts = _prepare(bk, y0, ts, args)
    f, args = lift_closure(bk, xp, f, y0, ts, tuple(args),
                           "odeint(grad='backsolve')" if integrator is None else "wrap_solver")
    batch = tuple(y0.shape[:-1])
    d = int(y0.shape[-1])
    T = int(ts.shape[0])
    leaves, treedef = bk.tree_flatten(tuple(args))
    diff = [i for i, leaf in enumerate(leaves) if hasattr(leaf, "dtype") and bk.is_float(leaf)]
    integ = integrator if integrator is not None else _BuiltIn(
        dict(method=method, rtol=rtol, atol=atol, dt0=dt0, max_steps=max_steps))
    if fallback not in (None, "checkpoint"):
        raise ValueError(f"odeint: fallback: expected None or 'checkpoint', got {fallback!r}.")
    if fallback is not None and (not isinstance(integ, _BuiltIn) or bk.is_traced((y0, args))):
        raise StructureError(
            "odeint: fallback='checkpoint' decides eagerly, after the backward pass, whether "
            "to take the gradient again: it needs the built-in integrator and concrete values "
            "(not jax.jit or wrap_solver). Use grad='checkpoint' directly there.")

    def rebuild(theta: tuple) -> tuple:
        full = list(leaves)
        for i, v in zip(diff, theta):
            full[i] = v
        return tuple(bk.tree_unflatten(treedef, full))

    def fwd(y0_: Any, theta: tuple) -> tuple[Any, list]:
        ys_t, st = integ.forward(bk, xp, f, y0_, ts, rebuild(theta), on_failure)
        # the residual is a copy: an output that is also a residual would be marked
        # non-differentiable by an autograd.Function
        return (ys_t, st), [xp.asarray(ys_t, copy=True)]

    def bwd(primals: tuple, saved: list, out_bar: Any) -> tuple:
        _, theta = primals
        ys_t = saved[0]
        ybar = out_bar[0]
        if ybar is None:
            ybar = xp.zeros_like(ys_t)
        a0bar, gbar, drifted = _adjoint(bk, xp, f, ts, ys_t, ybar, theta, rebuild, batch, d,
                                        T, integ, seminorm, drift_tol,
                                        on_failure if fallback is None else "nan", stats)
        if fallback is not None and bool(drifted):
            # the exact gradient of the discrete forward solution instead, replayed from the
            # inputs (eager: `drifted` is a value here)
            y0bar, args_bar = checkpoint_vjp(f, primals[0], ts, rebuild(theta), ybar,
                                             integ.opts)
            flat = bk.tree_flatten(tuple(args_bar))[0] if args_bar else []
            gfull = [flat[i] if i < len(flat) else None for i in diff]
            if stats is not None:
                stats.fallbacks += 1
            return (y0bar, tuple(xp.zeros_like(t) if g_ is None else g_
                                 for g_, t in zip(gfull, theta)))
        return (a0bar, tuple(gbar))

    def jvp(primals: tuple, tangents: tuple) -> Any:
        # forward mode: forward sensitivities, the forward-mode derivative of the forward
        # solve itself (no adjoint, nothing stored)
        def run(y0_: Any, theta: tuple) -> Any:
            ys_t, st = integ.forward(bk, xp, f, y0_, ts, rebuild(theta), on_failure)
            return ys_t if st is None else (ys_t, st)  # an external solver has no stats

        dot = bk.jvp(run, (primals[0], tuple(primals[1])),
                     (tangents[0], tuple(tangents[1])))[1]
        return dot if isinstance(dot, tuple) else (dot, None)

    theta0 = tuple(leaves[i] for i in diff)
    host = isinstance(integ, _External) and integ.host
    ys, st = bk.custom_vjp(fwd, bwd, (y0, theta0), unsupported=_unsupported,
                           jvp=None if host else jvp)
    if not full_output or st is None:
        return ys
    return ODESolution(ys, ODEStats(*st))


def _adjoint(bk: Backend, xp: Any, f: Callable[..., Any], ts: Any, ys_t: Any, ybar: Any,
             theta: tuple, rebuild: Callable[[tuple], tuple], batch: tuple, d: int, T: int,
             integ: Any, seminorm: bool, drift_tol: float, on_failure: str,
             stats: AdjointStats | None) -> tuple[Any, list, Any]:
    """The backward pass, and whether the reconstruction drifted anywhere: the augmented
    state $(y, a, g)$ of the whole batch as one vector (one step size for the batch: the
    adjoint of the batch is one ODE), from $t_{T-1}$ to
    $t_0$ segment by segment, $a$ jumping by $\\bar y_k$ and $y$ reset to the forward's stored
    state at each output time (after the drift check)."""
    nb = math.prod(batch)
    n = nb * d
    sizes = [int(xp.reshape(t, (-1,)).shape[0]) for t in theta]
    shapes = [tuple(t.shape) for t in theta]
    P = sum(sizes)
    dtype = ys_t.dtype

    def unpack_theta(g: Any) -> list:
        out, o = [], 0
        for s, sh in zip(sizes, shapes):
            out.append(xp.reshape(g[o:o + s], sh))
            o += s
        return out

    counter = [0]

    def aug(t: Any, s: Any, *_: Any) -> Any:
        counter[0] += 1
        y = xp.reshape(s[:n], (*batch, d))
        a = xp.reshape(s[n:2 * n], (*batch, d))
        tb = xp.zeros((*batch, 1), dtype=dtype) + t if batch else t

        def field(y_: Any, *th: Any) -> Any:
            return f(tb, y_, *rebuild(th))

        out, vjp_fn = bk.loop_vjp(field, (y, *theta))
        cts = vjp_fn(a)
        ay = cts[0]
        parts = [xp.reshape(out, (-1,)), -xp.reshape(ay, (-1,))]
        for c, th in zip(cts[1:], theta):
            parts.append(-xp.reshape(xp.zeros_like(th) if c is None else c, (-1,)))
        return xp.concat(parts)

    def rms(v: Any) -> Any:
        return xp.sqrt(xp.mean(v * v, axis=-1, keepdims=True)) if v.shape[-1] else \
            xp.zeros((*v.shape[:-1], 1), dtype=v.dtype)

    bounds = [2 * n + o for o in itertools.accumulate([0, *sizes])]

    def norm(e: Any) -> Any:
        # torchdiffeq's mixed norm: the largest RMS of the parts (y, a, and g per parameter
        # leaf, as torchdiffeq measures each parameter tensor on its own); the seminorm
        # (Kidger et al. 2021) leaves out g, which no other component depends on
        parts = [rms(e[..., :n]), rms(e[..., n:2 * n])]
        if not seminorm:
            parts.extend(rms(e[..., lo:hi]) for lo, hi in itertools.pairwise(bounds))
        return functools.reduce(xp.maximum, parts)

    a = ybar[T - 1]
    g = xp.zeros((P,), dtype=dtype)
    y = ys_t[T - 1]
    drifted = xp.asarray(False)
    for k in range(T - 1, 0, -1):
        s0 = xp.concat([xp.reshape(y, (-1,)), xp.reshape(a, (-1,)), g])
        end, ok_solve, st = integ.segment(aug, s0, xp.stack([ts[k], ts[k - 1]]), norm)
        y_rec = xp.reshape(end[:n], (*batch, d))
        a = xp.reshape(end[n:2 * n], (*batch, d))
        g = end[2 * n:]
        y_fwd = ys_t[k - 1]
        scale = integ.atol + integ.rtol * xp.abs(y_fwd)
        drift = xp.max(xp.abs(y_rec - y_fwd) / scale, axis=-1)
        drift = xp.where(ok_solve, drift, xp.full_like(drift, float("inf")))
        if stats is not None and not bk.is_traced(drift):
            if st is not None:
                stats.accepted += int(st.accepted)
                stats.rejected += int(st.rejected)
            stats.max_drift = max(stats.max_drift, float(xp.max(drift)))
        fine = drift <= drift_tol
        drifted = drifted | ~xp.all(fine)
        a, g = _refuse(bk, xp, a, g, fine, on_failure, _drift_error(drift_tol), drift,
                       xp.zeros_like(drift) + ts[k - 1])
        a = a + ybar[k - 1]
        y = y_fwd
    if stats is not None:
        stats.nfe_backward += counter[0]
    return a, unpack_theta(g), drifted


def wrap_solver(solve: Callable[..., Any], *, rtol: float = 1e-6, atol: float = 1e-6,
                host: bool = False, drift_tol: float = 100.0,
                name: str = "wrap_solver") -> Callable[..., Any]:
    """Any ODE solver as a differentiable `odeint`, its gradient the continuous adjoint run
    through the same solver backwards in time.

    ```python
    import numpy as np
    from scipy.integrate import solve_ivp
    from implicitdiff import ode

    def scipy_solve(f, y0, ts, args):       # host arrays in, ys (len(ts), *y0.shape) out
        sol = solve_ivp(lambda t, y: f(t, y.reshape(y0.shape), *args).ravel(),
                        (ts[0], ts[-1]), y0.ravel(), t_eval=ts, rtol=1e-10, atol=1e-10)
        return sol.y.T.reshape((len(ts), *y0.shape))

    odeint_scipy = ode.wrap_solver(scipy_solve, rtol=1e-10, atol=1e-10, host=True)
    ys = odeint_scipy(lambda t, y, k: -k * y, np.ones(2), np.array([0.0, 1.0]), 0.5)
    np.testing.assert_allclose(ys[-1], np.exp(-0.5), rtol=1e-8)
    ```

    **Arguments:**

    - `solve`: `solve(f, y0, ts, args) -> ys`, with `f(t, y, *args)`, `ys` of shape
      `(len(ts), *y0.shape)` (time first, `ys[0] = y0`). The forward pass calls it with the
      user's `f` and `y0`; the backward pass with the augmented adjoint system, a 1-d state
      $(y, a, g)$ (the batch flattened into it), from each output time to the one before it
      (`ts` decreasing), so it must integrate backwards in time too.
    - `rtol`, `atol`: the tolerances `solve` works to; the reconstruction check measures the
      drift in these units (`drift_tol`, as in `odeint(grad="backsolve")`).
    - `host`: `solve` takes NumPy arrays (SciPy, a C library): the state, the times and `f`'s
      values are converted (PyTorch, and JAX outside `jit`).
    - `name`: used in error messages.

    **Returns:** `odeint_like(f, y0, ts, *args, on_failure=None) -> ys`, differentiable in
    `y0` and `args` in reverse mode (PyTorch autograd, `jax.grad`): the same continuous adjoint
    as `grad="backsolve"`, without the seminorm (the external solver measures its own error)
    and with the same check of the reconstructed trajectory. A sample with NaN or inf in its
    solution is a failure (`on_failure`).
    """
    integ = _External(solve, host, rtol, atol, name)

    def odeint_like(f: Callable[..., Any], y0: Any, ts: Any, *args: Any,
                    on_failure: str | None = None) -> Any:
        return backsolve(f, y0, ts, tuple(args), method=None, rtol=rtol, atol=atol, dt0=None,
                         max_steps=0, on_failure=on_failure, full_output=False,
                         seminorm=False, drift_tol=drift_tol, integrator=integ)

    odeint_like.__name__ = name
    return odeint_like


def _refuse(bk: Backend, xp: Any, a: Any, g: Any, fine: Any, on_failure: str,
            make_error: Callable[..., ODEFailureError], *data: Any) -> tuple[Any, Any]:
    """`on_failure` where the reconstruction drifted: raise or warn (naming the first such
    sample), or NaN for those samples' $a$ and for the shared $g$ (every sample adds to it)."""
    a = bk.handle_failure(a, fine, on_failure, make_error, *data)
    if on_failure == "nan":
        g = xp.where(xp.all(fine), g, xp.full_like(g, float("nan")))
    return a, g
