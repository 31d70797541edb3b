"""`odeint`: explicit Runge–Kutta methods with per-sample adaptive steps, written once against the
array API, for NumPy, JAX and PyTorch.

The state is `y` of shape `(..., d)`: the leading axes index independent samples, each with its
own time, step size, accepted/rejected steps and status. Every loop iteration attempts one step
for every sample still running (`dt = 0` for the others, which leaves them unchanged); a sample's
step is clipped to its next output time, so each output time is hit by a step, never
interpolated. The error control is the mixed relative/absolute RMS norm of torchdiffeq and
diffrax with Hairer's PI step-size controller. The loop is the backend's `bounded_while_loop`,
so `grad="direct"` differentiates through the accepted steps in every framework (under JAX a
`lax.scan` of `max_steps` iterations, since `lax.while_loop` cannot be reverse-differentiated).

The step-size controller, the error estimate and the output times are constants for the
derivative (`Backend.stop_gradient`): `"direct"` gives the exact derivative of the discrete
solution on the step schedule it took, which is also what a replay of that schedule
(`make_step` and `StepSchedule`) reproduces, and what `grad="checkpoint"` differentiates by
replaying the loop itself (controller included) from checkpointed solver states.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .._array import all_finite
from .._array import device as _device
from .._backend import Backend, convert_constants, get_backend
from .._config import resolve_on_failure
from .._errors import NonConvergenceError, StructureError
from ._tableaus import ButcherTableau, tableau

SUCCESS = 0
"""Status: every output time reached."""
MAX_STEPS = 1
"""Status: `max_steps` steps (accepted and rejected) attempted before the last output time."""
DT_UNDERFLOW = 2
"""Status: the step size fell below the resolution of the time (a blow-up or stiffness)."""
NONFINITE = 3
"""Status: `f` returned NaN or inf (or the state overflowed) at every step size tried."""
REPLAY_MISMATCH = 4
"""Status (`grad="checkpoint"` only): the replay of the forward pass did not retrace it."""
STATUS_NAMES = {SUCCESS: "success", MAX_STEPS: "max_steps", DT_UNDERFLOW: "dt_underflow",
                NONFINITE: "nonfinite", REPLAY_MISMATCH: "replay_mismatch"}
"""The status codes of `ODEStats.status` by name."""

GRAD_MODES = ("direct", "checkpoint", "backsolve")
MIN_CHECKPOINTS = 16
"""The fewest solver states `grad="checkpoint"` stores (more for more than $2^{16}$ steps:
$\\lceil \\log_2 N \\rceil$): a few states of memory buy a backward pass without recomputation
for solves of up to 17 loop iterations."""

# Hairer's PI controller (Hairer, Nørsett & Wanner, Solving ODEs I, IV.2; DOPRI5's defaults)
_SAFETY, _BETA, _MIN_FACTOR, _MAX_FACTOR, _ERR_FLOOR = 0.9, 0.04, 0.2, 10.0, 1e-4


class ODEFailureError(NonConvergenceError):
    """`odeint` stopped before the last output time for at least one sample (`on_failure=
    "raise"`): `max_steps` reached, step-size underflow, or NaN/inf in the state.

    Carries `sample` (the index of the first failed sample in the batch, `()` unbatched),
    `t` (the time that sample reached), `status` (its name in `STATUS_NAMES`) and `failed`
    (how many samples failed). A subclass of `NonConvergenceError`.
    """

    def __init__(self, message: str, *, sample: tuple = (), t: float = float("nan"),
                 status: str = "", failed: int = 0):
        super().__init__(message)
        self.sample = sample
        self.t = t
        self.status = status
        self.failed = failed


class ODEStats(NamedTuple):
    """What `odeint` did, per sample: arrays of the input's framework with the batch shape
    `y0.shape[:-1]` (`()` unbatched), never differentiated. The same fields in every framework.

    - `accepted`: accepted steps (int32).
    - `rejected`: rejected steps (int32): error too large, or NaN/inf in the trial step.
    - `nfe`: evaluations of `f` this sample needed (int32): the first stage, the initial
      step-size selection (1, adaptive methods with `dt0=None`), and the new stages of every
      attempted step (6 for the FSAL methods dopri5 and tsit5, 4 for rk4, 1 for euler).
    - `status`: `SUCCESS` (0), `MAX_STEPS` (1), `DT_UNDERFLOW` (2), `NONFINITE` (3) or, with
      `grad="checkpoint"`, `REPLAY_MISMATCH` (4) (int32).
    - `t_final`: the time the sample reached (the last output time on success).
    """

    accepted: Any
    rejected: Any
    nfe: Any
    status: Any
    t_final: Any

    def summary(self) -> dict[str, float]:
        """Scalars for a logger: mean/max accepted steps, mean rejected steps, mean/max NFE,
        the fraction of samples that succeeded. Concrete arrays only (not under `jit`)."""
        import numpy as np

        acc, rej, nfe = (_host(a) for a in (self.accepted, self.rejected, self.nfe))
        return {"steps_mean": float(np.mean(acc)), "steps_max": int(np.max(acc)),
                "rejected_mean": float(np.mean(rej)), "nfe_mean": float(np.mean(nfe)),
                "nfe_max": int(np.max(nfe)),
                "success_frac": float(np.mean(_host(self.status) == SUCCESS))}


class ODESolution(NamedTuple):
    """`odeint(..., full_output=True)`: the solution `ys`, shape `(len(ts), *y0.shape)`, and
    the per-sample `ODEStats`."""

    ys: Any
    stats: ODEStats


class StepSchedule(NamedTuple):
    """The steps `integrate(..., record=True)` took, for replaying them exactly (checkpointing).

    Row `i` is loop iteration `i` for the whole batch: every sample attempted one step there,
    and `dt[i]` is zero for the samples that did not take (accept) one, so replaying
    `y = step(t[i], dt[i], y, args)` (see `make_step`) for `i = 0, 1, …` reproduces the forward
    states bit for bit (a zero step returns `y` unchanged).

    - `t`: `(N, ..., 1)` the start time of each sample's step.
    - `dt`: `(N, ..., 1)` its length, 0 where the sample stood still.
    - `out_step`: `(..., T)` int32: output `j` is the state after replaying rows
      `0..out_step[..., j]` (`-1` for `j = 0`: `y0`).
    - `iterations`: a 0-d int32 array, the number of loop iterations run (the rows after it
      are steps of length 0 for every sample).

    `N` is the number of loop iterations run (eager backends) or `max_steps` (JAX, whose rows
    after the loop stopped are zeros: steps of length 0).
    """

    t: Any
    dt: Any
    out_step: Any
    iterations: Any


class Integration(NamedTuple):
    """What `integrate` returns: `ys` batch first, `(..., T, d)`; the `ODEStats`; the
    `StepSchedule` (None unless `record=True`); `ts`, the output times as `integrate` used
    them (`y0`'s dtype and device, a constant of the autodiff)."""

    ys: Any
    stats: ODEStats
    schedule: StepSchedule | None
    ts: Any


def _host(a: Any) -> Any:
    """A NumPy copy of a framework array (detached, on the host), for `summary()`."""
    import numpy as np

    for attr in ("detach", "cpu"):
        if hasattr(a, attr):
            a = getattr(a, attr)()
    return np.asarray(a)


# ---- one Runge–Kutta step ----------------------------------------------------------------------

def _combo(coeffs: tuple[float, ...], ks: list[Any]) -> Any:
    """$\\sum_j c_j k_j$ over the nonzero coefficients; None when all are zero."""
    acc = None
    for c, k in zip(coeffs, ks):
        if c == 0:
            continue
        term = k if c == 1 else c * k
        acc = term if acc is None else acc + term
    return acc


def _rk_step(tab: ButcherTableau, fun: Callable[[Any, Any], Any], t: Any, dt: Any, y: Any,
             k1: Any) -> tuple[Any, Any, Any]:
    """One step of `tab` from `(t, y)` with length `dt` (shape `(..., 1)`) and first stage
    `k1 = fun(t, y)`: `(y_next, k_last, err)`. For an FSAL method `k_last = fun(t + dt,
    y_next)` (the next step's `k1`), else None; `err` the embedded error estimate, None for a
    fixed-step method."""
    ks = [k1]
    y_next = None
    for i in range(1, tab.stages):
        inc = _combo(tab.a[i], ks)
        yi = y if inc is None else y + dt * inc
        if tab.fsal and i == tab.stages - 1:
            y_next = yi  # the last stage is evaluated at the solution (a_s = b)
        ti = t + dt if tab.c[i] == 1 else t + tab.c[i] * dt
        ks.append(fun(ti, yi))
    if y_next is None:
        inc = _combo(tab.b, ks)
        y_next = y if inc is None else y + dt * inc
    err = None
    if tab.b_error is not None:
        e = _combo(tab.b_error, ks)
        err = dt * e if e is not None else 0 * y
    return y_next, (ks[-1] if tab.fsal else None), err


def _caller(f: Callable[..., Any], args: tuple, batched: bool) -> Callable[[Any, Any], Any]:
    """`(t, y) -> f(t, y, *args)` with `t` of shape `(..., 1)` handed to `f` as is (batched)
    or as a 0-d array (unbatched `y` of shape `(d,)`)."""
    if batched:
        return lambda t, y: f(t, y, *args)
    return lambda t, y: f(t[0], y, *args)


def make_step(f: Callable[..., Any], method: str | ButcherTableau = "tsit5"
              ) -> Callable[[Any, Any, Any, tuple], Any]:
    """The pure step function of `method` for the vector field `f`: `step(t, dt, y, args)
    -> y_next`, one Runge–Kutta step from `(t, y)` of length `dt`, every stage evaluated
    (`f(t, y, *args)` included: for FSAL methods this is the forward pass's reused last stage,
    so a replay is bit-for-bit the forward step).

    Shapes as in `StepSchedule`: `y` `(..., d)`, `t` and `dt` `(..., 1)` per sample (for an
    unbatched `y` of shape `(d,)`: shape `(1,)`), and `dt = 0` returns `y` unchanged. This is
    the hook checkpointing replays the recorded schedule with.
    """
    tab = tableau(method)

    def step(t: Any, dt: Any, y: Any, args: tuple) -> Any:
        fun = _caller(f, tuple(args), getattr(y, "ndim", 1) > 1)
        return _rk_step(tab, fun, t, dt, y, fun(t, y))[0]

    return step


# ---- the integrator ----------------------------------------------------------------------------

def tiny_of(xp: Any, dtype: Any) -> float:
    """The smallest normal number of `dtype`."""
    return float(xp.finfo(dtype).smallest_normal)


def _check_options(tab: ButcherTableau, rtol: Any, atol: Any, dt0: Any, max_steps: Any) -> None:
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"odeint: expected {name} a number >= 0, got {v!r}.")
    if tab.adaptive and not (rtol > 0 or atol > 0):
        raise ValueError("odeint: expected rtol > 0 or atol > 0 for an adaptive method, got "
                         "both 0.")
    if dt0 is not None and (isinstance(dt0, bool) or not isinstance(dt0, (int, float))
                            or not dt0 > 0):
        raise ValueError(f"odeint: expected dt0 a number > 0 or None, got {dt0!r}.")
    if not tab.adaptive and dt0 is None:
        raise ValueError(
            f"odeint: method {tab.name!r} takes fixed steps and needs their length: pass dt0= "
            "(steps of dt0, each clipped to the next output time), or choose an adaptive "
            "method ('tsit5', 'dopri5')."
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"odeint: expected max_steps a positive int, got {max_steps!r}.")


def _prepare(bk: Backend, y0: Any, ts: Any, args: tuple) -> tuple[Any, Any, Any]:
    """`y0` and `ts` (as `y0`'s dtype, on its device, a constant of the autodiff), checked."""
    y0, ts = convert_constants(bk, (y0, ts), y0, args)
    if not hasattr(y0, "dtype") or getattr(y0, "ndim", 0) < 1:
        raise StructureError(
            "odeint: expected y0 an array of shape (d,) or (..., d) (samples first, the state "
            f"last), got {type(y0).__name__} of shape {tuple(getattr(y0, 'shape', ()))}. "
            "Reshape the state to (..., d)."
        )
    xp = bk.namespace(y0)
    if not xp.isdtype(y0.dtype, "real floating"):
        raise StructureError(f"odeint: expected a real floating y0, got dtype {y0.dtype}. "
                             "Cast it to float32 or float64.")
    if not hasattr(ts, "dtype"):
        import numpy as np

        ts = np.asarray(ts, dtype=np.float64)
        ts = xp.asarray(bk.from_host(ts, like=y0) if not bk.owns(ts) else ts)
    if getattr(ts, "ndim", 0) != 1 or ts.shape[0] < 1:
        raise StructureError(
            "odeint: expected ts a 1-d array of output times (the first is the initial time), "
            f"got shape {tuple(getattr(ts, 'shape', ()))}."
        )
    ts = bk.stop_gradient(xp.asarray(xp.astype(ts, y0.dtype), device=_device(y0)))
    if ts.shape[0] > 1 and not bk.is_traced(ts):
        d = ts[1:] - ts[:-1]
        if not bool(xp.all(d > 0) | xp.all(d < 0)):
            raise ValueError(
                f"odeint: expected ts strictly increasing or strictly decreasing (in y0's dtype "
                f"{y0.dtype}), got {int(ts.shape[0])} times that are not. Sort the times and "
                "drop duplicates."
            )
    return xp, y0, ts


class _Loop(NamedTuple):
    """The integrator as a loop (see `_setup`): `state` the initial loop state (a dict),
    `cond(s)`, `body(s, fun) -> (s_next, rec)` (one loop iteration with the vector field `fun`,
    `rec` the schedule row with `record=True`), `fun` the field with the given `args`, and
    `finish(s, outs) -> Integration`."""

    bk: Backend
    xp: Any
    state: dict
    cond: Callable[[dict], Any]
    body: Callable[..., tuple]  # (s, fun, lean=False)
    fun: Callable[[Any, Any], Any]
    finish: Callable[[dict, Any], Integration]
    batched: bool
    adaptive: bool


def integrate(f: Callable[..., Any], y0: Any, ts: Any, args: tuple = (), *,
              method: str | ButcherTableau = "tsit5", rtol: float = 1e-6, atol: float = 1e-6,
              dt0: float | None = None, max_steps: int = 4096,
              record: bool = False,
              error_norm: Callable[[Any], Any] | None = None,
              pi_beta: float | None = None, differentiable: bool = True) -> Integration:
    """The integrator behind `odeint`, without its failure policy: `ys` batch first
    (`(..., T, d)`, NaN at the outputs a failed sample never reached), the `ODEStats`, and
    with `record=True` the `StepSchedule` for an exact replay. Arguments as in `odeint`;
    `error_norm`: the norm of the scaled error estimate, `(..., d) -> (..., 1)` (default the
    RMS over the state; the adjoint passes a seminorm that leaves its parameter integrals
    unmeasured); `pi_beta`: the step-size controller's memory $\\beta$ (default 0.04, Hairer's
    PI controller; 0 is the plain integral controller of torchdiffeq and diffrax, which the
    adjoint's backward pass uses); `differentiable=False`: the loop is the backend's plain
    `while_loop` (`lax.while_loop` under JAX: no scan of `max_steps` iterations, nothing kept
    for reverse mode), for a solve no one differentiates through its steps (the adjoint's
    passes, checkpointing's first pass; forward mode still works)."""
    loop = _setup(f, y0, ts, args, method=method, rtol=rtol, atol=atol, dt0=dt0,
                  max_steps=max_steps, record=record, error_norm=error_norm, pi_beta=pi_beta)
    if isinstance(loop, Integration):
        return loop
    fun = loop.fun
    if not differentiable and not record:
        return loop.finish(_plain_loop(loop.bk, loop.cond, lambda st: loop.body(st, fun)[0],
                                       loop.state, max_steps), None)
    s, outs = loop.bk.bounded_while_loop(loop.cond, lambda st: loop.body(st, fun), loop.state,
                                         max_steps)
    return loop.finish(s, outs)


def _plain_loop(bk: Backend, cond: Callable[[Any], Any], body: Callable[[Any], Any],
                init: Any, max_steps: int) -> Any:
    """`while cond(s): s = body(s)` by the backend's `while_loop` where it is the framework's
    own (`lax.while_loop`); a Python loop's backend runs `bounded_while_loop`, whose predicate
    it makes safe under its own transforms (`torch.func.vmap`)."""
    if type(bk).while_loop is Backend.while_loop:
        return bk.bounded_while_loop(cond, lambda s: (body(s), None), init, max_steps)[0]
    return bk.while_loop(cond, body, init)


def _setup(f: Callable[..., Any], y0: Any, ts: Any, args: tuple, *,
           method: str | ButcherTableau, rtol: float, atol: float, dt0: float | None,
           max_steps: int, record: bool = False,
           error_norm: Callable[[Any], Any] | None = None,
           pi_beta: float | None = None) -> _Loop | Integration:
    """`integrate`'s loop, before it runs: the initial state (the first stage `f(t0, y0)` and
    the initial step size computed), the loop body and the summary of its final state; or the
    `Integration` itself when there is nothing to integrate (one output time)."""
    tab = tableau(method)
    _check_options(tab, rtol, atol, dt0, max_steps)
    bk = get_backend(y0, ts, args)
    xp, y0, ts = _prepare(bk, y0, ts, args)
    dtype, dev = y0.dtype, _device(y0)
    batch = tuple(y0.shape[:-1])
    T = int(ts.shape[0])
    fun = _caller(f, tuple(args), len(batch) > 0)
    i32 = xp.int32

    made: dict = {}

    def full(value: Any, dt: Any = dtype) -> Any:
        # a constant of shape (..., 1); those of the loop body are made once, before the loop
        # (`const`), never inside a trace of it
        return xp.full((*batch, 1), value, dtype=dt, device=dev)

    def const(value: Any, dt: Any = dtype) -> Any:
        return made[(value, str(dt))]

    tiny = tiny_of(xp, dtype)
    for value, dt in ((1e-10, dtype), (_MIN_FACTOR, dtype), (1.0, dtype), (_ERR_FLOOR, dtype),
                      (tiny, dtype), (NONFINITE, i32), (DT_UNDERFLOW, i32), (MAX_STEPS, i32)):
        made[(value, str(dt))] = full(value, dt)

    t0 = full(0.0) + ts[0]
    k1 = fun(t0, y0)
    if tuple(getattr(k1, "shape", ())) != tuple(y0.shape) or getattr(k1, "dtype", None) != dtype:
        raise StructureError(
            f"odeint: expected f(t, y, *args) to return an array shaped like y "
            f"{tuple(y0.shape)} with dtype {dtype}, got shape "
            f"{tuple(getattr(k1, 'shape', ()))} and dtype {getattr(k1, 'dtype', None)}. f must "
            "map (..., d) to (..., d) row by row."
        )
    zeros_i = full(0, i32)
    ys0 = xp.full((*batch, T, y0.shape[-1]), float("nan"), dtype=dtype, device=dev)
    at_t = xp.reshape(xp.arange(T, dtype=i32, device=dev), (T,))
    ys0 = xp.where(xp.reshape(at_t == 0, (T, 1)), y0[..., None, :], ys0)
    if T == 1:
        stats = ODEStats(zeros_i[..., 0], zeros_i[..., 0], zeros_i[..., 0] + 1,
                         zeros_i[..., 0], t0[..., 0])
        sched = StepSchedule(xp.zeros((0, *batch, 1), dtype=dtype, device=dev),
                             xp.zeros((0, *batch, 1), dtype=dtype, device=dev),
                             full(-1, i32), xp.zeros((), dtype=i32, device=dev)) \
            if record else None
        return Integration(ys0, stats, sched, ts)

    eps = float(xp.finfo(dtype).eps)
    direction = xp.where(ts[-1] > ts[0], xp.ones_like(ts[0]), -xp.ones_like(ts[0]))
    q = tab.error_order + 1
    beta = _BETA if pi_beta is None else float(pi_beta)
    expo = 1.0 / q - 0.75 * beta

    def rms(a: Any) -> Any:
        if error_norm is not None:
            return error_norm(a)
        return xp.sqrt(xp.mean(a * a, axis=-1, keepdims=True))

    def finite(a: Any) -> Any:  # per row, (..., d) -> (..., 1)
        return all_finite(xp, a, keepdims=True)

    nfe0 = 1
    y0d, k1d = bk.stop_gradient(y0), bk.stop_gradient(k1)
    if dt0 is not None:
        dt_init = direction * float(dt0) + full(0.0)
    else:
        # Hairer, Nørsett & Wanner, Solving ODEs I, II.4: the initial step, per sample
        sc = atol + rtol * xp.abs(y0d)
        d0, d1 = rms(y0d / sc), rms(k1d / sc)
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = xp.where(small, full(1e-6), 0.01 * d0 / xp.where(small, xp.ones_like(d1), d1))
        y1 = y0d + direction * h0 * k1d
        f1 = bk.stop_gradient(fun(t0 + direction * h0, y1))
        d2 = rms((f1 - k1d) / sc) / h0
        dm = xp.maximum(d1, d2)
        h1 = xp.where(dm <= 1e-15, xp.maximum(full(1e-6), h0 * 1e-3),
                      (0.01 / xp.where(dm <= 1e-15, xp.ones_like(dm), dm)) ** (1.0 / tab.order))
        h = xp.minimum(100 * h0, h1)
        dt_init = direction * xp.where(xp.isfinite(h), h, full(1e-6))
        nfe0 = 2
    ok0 = finite(y0d) & finite(k1d)
    state = dict(
        k=xp.zeros((), dtype=i32, device=dev), t=t0, dt=dt_init, y=y0,
        idx=full(1, i32), ys=ys0, acc=zeros_i, rej=zeros_i, nfe=zeros_i + nfe0,
        status=xp.where(ok0, zeros_i, zeros_i + NONFINITE), active=ok0,
        prev=full(_ERR_FLOOR), bad=~ok0,
    )
    if tab.fsal:
        state["k1"] = k1
    if record:
        state["out_step"] = xp.full((*batch, T), -1, dtype=i32, device=dev)
    new_evals = tab.stages - 1 if tab.fsal else tab.stages

    def cond(s: dict) -> Any:
        return xp.any(s["active"])

    def body(s: dict, fun: Callable[[Any, Any], Any], lean: bool = False) -> tuple[dict, Any]:
        # lean: a replay's iteration, which keeps only what decides the steps (the attempts
        # in `acc`), not the counts and status that only report
        active, t, y, dtp, idx = s["active"], s["t"], s["y"], s["dt"], s["idx"]
        t_out = xp.reshape(xp.take(ts, xp.reshape(xp.minimum(idx, T - 1), (-1,)), axis=0),
                           idx.shape)
        rem = t_out - t
        hit = xp.abs(rem) <= xp.abs(dtp) * (1 + 64 * eps)
        dt = xp.where(active, xp.where(hit, rem, dtp), xp.zeros_like(dtp))
        k1 = s["k1"] if tab.fsal else fun(t, y)
        y_new, k_last, err = _rk_step(tab, fun, t, dt, y, k1)
        ynd = bk.stop_gradient(y_new)
        fin = finite(ynd)
        if err is not None:
            scale = atol + rtol * xp.maximum(xp.abs(bk.stop_gradient(y)), xp.abs(ynd))
            errn = rms(bk.stop_gradient(err) / scale)
            fin = fin & xp.isfinite(errn)
            good = fin & (errn <= 1)
        else:
            errn = None
            good = fin
        accept = active & good
        t_new = xp.where(accept, t + dt, t)
        wrote = accept & hit
        sel = (at_t == idx) & wrote  # (..., T)
        out = dict(s)
        out["k"] = s["k"] + 1
        out["t"] = t_new
        out["y"] = xp.where(accept, y_new, y)
        if tab.fsal:
            out["k1"] = xp.where(accept, k_last, k1)
        out["ys"] = xp.where(sel[..., None], y_new[..., None, :], s["ys"])
        if record:
            out["out_step"] = xp.where(sel, s["k"] + xp.zeros_like(s["out_step"]),
                                       s["out_step"])
        idx = idx + xp.astype(wrote, i32)
        out["idx"] = idx
        one_i = xp.astype(active, i32)
        if lean:
            out["acc"] = s["acc"] + one_i
        else:
            out["nfe"] = s["nfe"] + new_evals * one_i
            out["acc"] = s["acc"] + xp.astype(accept, i32)
            out["rej"] = s["rej"] + xp.astype(active & ~good, i32)
        still = active & (idx < T)
        status = s["status"]
        if errn is not None:
            e = xp.where(fin, xp.maximum(errn, const(1e-10)), xp.ones_like(errn))
            grow = xp.clip(_SAFETY * e ** (-expo) * s["prev"] ** beta, _MIN_FACTOR, _MAX_FACTOR)
            shrink = xp.where(fin, xp.maximum(const(_MIN_FACTOR), _SAFETY * e ** (-expo)),
                              const(_MIN_FACTOR))
            adt, adtp = xp.abs(dt), xp.abs(dtp)
            # a step clipped to an output time does not shrink the next one
            mag_acc = xp.where(hit, xp.maximum(adt * grow, adtp * xp.minimum(grow, const(1.0))),
                               adt * grow)
            mag = xp.where(accept, mag_acc, xp.where(active, adt * shrink, adtp))
            new_dt = direction * mag
            out["prev"] = xp.where(accept, xp.maximum(errn, const(_ERR_FLOOR)), s["prev"])
            t_next_out = xp.reshape(
                xp.take(ts, xp.reshape(xp.minimum(idx, T - 1), (-1,)), axis=0), idx.shape)
            min_dt = 16 * eps * xp.maximum(xp.maximum(xp.abs(t_new), xp.abs(t_next_out)),
                                           const(tiny))
            under = still & (mag < min_dt)
            if not lean:
                bad = xp.where(active, ~fin, s["bad"])
                out["bad"] = bad
                status = xp.where(under, xp.where(bad, const(NONFINITE, i32),
                                                  const(DT_UNDERFLOW, i32)), status)
            still = still & ~under
        else:
            new_dt = dtp
            blown = active & ~fin
            if not lean:
                status = xp.where(blown, const(NONFINITE, i32), status)
            still = still & ~blown
        out["dt"] = new_dt
        over = still & ((out["acc"] if lean else out["acc"] + out["rej"]) >= max_steps)
        if not lean:
            out["status"] = xp.where(over, const(MAX_STEPS, i32), status)
        out["active"] = still & ~over
        rec = (t, xp.where(accept, dt, xp.zeros_like(dt))) if record else None
        return out, rec

    def finish(s: dict, outs: Any) -> Integration:
        status = xp.where(s["active"], full(MAX_STEPS, i32), s["status"])
        stats = ODEStats(s["acc"][..., 0], s["rej"][..., 0], s["nfe"][..., 0], status[..., 0],
                         s["t"][..., 0])
        sched = None
        if record:
            if outs is None:
                empty = xp.zeros((0, *batch, 1), dtype=dtype, device=dev)
                outs = (empty, empty)
            sched = StepSchedule(outs[0], outs[1], s["out_step"], s["k"])
        return Integration(s["ys"], stats, sched, ts)

    return _Loop(bk, xp, state, cond, body, fun, finish, len(batch) > 0,
                 tab.b_error is not None)


class _Replay(NamedTuple):
    """The forward pass as a replayable map (see `_replay`)."""

    res: Integration            # the first pass's (no tape) outputs and statistics
    step: Callable[..., Any]    # (k, state, args) -> state: one loop iteration
    state0: tuple               # the initial loop state, floating leaves (live y0, first stage)
    n_rows: int                 # loop iterations to plan for (max_steps when traced)
    iterations: Any             # the loop iterations the first pass ran
    outputs: Callable[[tuple], tuple]  # final state -> (ys batch first, output index reached)
    index: Any                  # the first pass's output index reached, per sample
    states: list[tuple] | None  # the first pass's states after each iteration (short solves)


def _replay(bk: Backend, xp: Any, f: Callable[..., Any], y0: Any, ts: Any, args: tuple,
            opts: dict) -> _Replay | Integration:
    """Run the integrator once without a tape, and build the map that replays its loop
    iterations from the solver's state: the state (time, step size, the controller's last
    error, the next output index, whether the sample still runs, its attempts so far, `y`,
    the FSAL stage and the output buffer `ys`) as floating arrays, one iteration of the
    integrator's own loop body (`_setup`) as the step. The controller's decisions are
    recomputed, not stored, so nothing grows with the number of steps beyond the
    checkpointed states. The `Integration` itself when there is nothing to integrate (one
    output time)."""
    loop = _setup(f, y0, ts, tuple(args), record=False, **opts)
    if isinstance(loop, Integration):
        return loop
    leaves, treedef = bk.tree_flatten(tuple(args))
    consts = bk.tree_unflatten(treedef, [bk.stop_gradient(v) if hasattr(v, "dtype") else v
                                         for v in leaves])
    fun1 = _caller(f, tuple(consts), loop.batched)
    first = {k: bk.stop_gradient(v) for k, v in loop.state.items()}
    i32, dtype = xp.int32, y0.dtype
    # a fixed-step method keeps its step size and error memory: constants, not state
    varying = ("t", "dt", "y", "ys", "prev", "k1") if loop.adaptive else ("t", "y", "ys", "k1")
    keys = [k for k in varying if k in loop.state]
    fixed = {k: first[k] for k in ("dt", "prev") if k not in keys}
    zero_i = xp.zeros_like(loop.state["acc"])  # made here, outside every loop's trace
    no = zero_i > 0
    k0 = loop.state["k"]

    def encode(s: dict) -> tuple:  # `acc`: the attempts (a lean iteration counts them there)
        return (*(s[k] for k in keys), xp.astype(s["idx"], dtype),
                xp.astype(s["active"], dtype), xp.astype(s["acc"] + s["rej"], dtype))

    # online checkpointing: the first pass keeps its first loop states (encoded as the replay
    # stores them); a solve of at most `keep` iterations (most adaptive solves) then needs no
    # second pass, since every state the replay would store is among them. Eager loops only
    # (a traced loop's body runs once, on tracers).
    keep = MIN_CHECKPOINTS + 1
    kept: list[Any] = []

    def body1(st: dict) -> dict:
        out = loop.body(st, fun1)[0]
        if len(kept) < keep:
            kept.append(encode(out))
        elif kept[-1] is not None:  # too long a solve: the two-pass path, nothing kept
            kept[:] = [None] * (keep + 1)
        return out

    # not differentiated (every input a constant here): the backend's plain while loop
    s1 = _plain_loop(bk, loop.cond, body1, first, opts["max_steps"])
    res = loop.finish(s1, None)
    n_rows = opts["max_steps"] if bk.is_traced(s1["k"]) else int(s1["k"])
    states = kept if (0 < len(kept) == n_rows <= keep and kept[-1] is not None
                      and not bk.is_traced(kept[0][0])) else None

    def decode(x: tuple) -> dict:
        s = dict(zip(keys, x[:len(keys)]), **fixed)
        for k in ("t", "dt", "prev"):  # the controller's: constants of the derivative, as in
            s[k] = bk.stop_gradient(s[k])  # "direct" (no cotangent computed through them)
        idx, active, tries = x[len(keys):]
        # the counts and status only report; `acc + rej` (the attempts) bounds the loop
        s.update(k=k0, idx=xp.astype(idx, i32), active=active > 0.5,
                 acc=xp.astype(tries, i32), rej=zero_i, nfe=zero_i, status=zero_i, bad=no)
        return s

    def step(k: Any, state: tuple, a: tuple) -> tuple:
        return encode(loop.body(decode(state), _caller(f, tuple(a), loop.batched), True)[0])

    def outputs(state: tuple) -> tuple:
        s = decode(state)
        return s["ys"], s["idx"]

    return _Replay(res, step, encode(loop.state), n_rows, s1["k"], outputs, s1["idx"], states)


def _replayed(bk: Backend, xp: Any, f: Callable[..., Any], y0: Any, ts: Any, args: tuple,
              opts: dict, name: str) -> tuple[Any, Integration]:
    """`grad="checkpoint"`'s outputs (batch first, before the failure policy) and the first
    pass's `Integration`: the forward pass once without a tape, then its loop iterations
    replayed by `checkpointed` (binomial checkpointing of the solver's state), whose gradient
    is exactly that of `"direct"`. A sample whose replay did not reach the outputs the first
    pass reached (a vector field that is not a pure function of its inputs, or two compiled
    passes that rounded differently) gets status `REPLAY_MISMATCH`: a failure for the policy,
    never a silently different trajectory."""
    from ._checkpoint import checkpointed, default_checkpoints

    rp = _replay(bk, xp, f, y0, ts, args, opts)
    if isinstance(rp, Integration):  # one output time: y0 itself
        return rp.ys, rp
    # at least MIN_CHECKPOINTS solver states: a solve of up to that many loop iterations (most
    # adaptive solves) is replayed once, without recomputation; more steps, ceil(log2 N)
    c = max(default_checkpoints(rp.n_rows), MIN_CHECKPOINTS)
    final = checkpointed(rp.step, rp.state0, rp.n_rows, tuple(args), n_steps=rp.iterations,
                         checkpoints=c, name=name, _states=rp.states, _lift=False) \
        if rp.n_rows else rp.state0
    ys, index = rp.outputs(final)
    same = index == rp.index
    stats = rp.res.stats._replace(status=xp.where(same[..., 0], rp.res.stats.status,
                                                  xp.full_like(rp.res.stats.status,
                                                               REPLAY_MISMATCH)))
    return ys, rp.res._replace(stats=stats)


def lift_closure(bk: Backend, xp: Any, f: Callable[..., Any], y0: Any, ts: Any, args: tuple,
                 name: str) -> tuple[Callable[..., Any], tuple]:
    """`f` and `args` with what `f` reads from its closure and a derivative may be asked of
    (a module's parameters, a captured tracer) made one more argument (`Backend.lift_closure`):
    the hand-written rules of `"checkpoint"` and `"backsolve"` return cotangents for their
    inputs only. A trial evaluation at `(ts[0], y0)` refuses a closure it cannot lift."""
    t0 = xp.zeros((*y0.shape[:-1], 1), dtype=y0.dtype) + ts[0] if y0.ndim > 1 else ts[0]
    g, values = bk.lift_closure(f, (t0, y0, *args), name=name)
    return (g, (*args, values)) if values else (f, tuple(args))


def _odeint_checkpoint(f: Callable[..., Any], y0: Any, ts: Any, args: tuple, *, method: Any,
                       rtol: float, atol: float, dt0: float | None, max_steps: int,
                       on_failure: str, full_output: bool) -> Any:
    """`grad="checkpoint"` (see `_replayed`), after the failure policy, time first."""
    bk = get_backend(y0, ts, args)
    xp, y0, ts = _prepare(bk, y0, ts, args)
    f, args = lift_closure(bk, xp, f, y0, ts, args, "odeint(grad='checkpoint')")
    if not bk.may_differentiate((y0, args)):  # no derivative to save for: one plain pass
        return _odeint_direct(f, y0, ts, args, method=method, rtol=rtol, atol=atol, dt0=dt0,
                              max_steps=max_steps, on_failure=on_failure,
                              full_output=full_output)
    ys, res = _replayed(bk, xp, f, y0, ts, args, dict(method=method, rtol=rtol, atol=atol,
                                                      dt0=dt0, max_steps=max_steps),
                        "odeint(grad='checkpoint')")
    ys = _finish(bk, ys, res, on_failure, max_steps)
    return ODESolution(ys, res.stats) if full_output else ys


def checkpoint_vjp(f: Callable[..., Any], y0: Any, ts: Any, args: tuple, ybar: Any,
                   opts: dict) -> tuple[Any, tuple]:
    """The `grad="checkpoint"` gradient as an explicit pullback, for eager use (the backsolve
    adjoint's fallback): `(y0_bar, args_bar)` for the cotangent `ybar` of the time-first
    outputs. `args_bar` is a tuple like `args` (None where no gradient)."""
    bk = get_backend(y0, ts, args)
    xp, y0, ts = _prepare(bk, y0, ts, args)
    nb = ybar.ndim - 2
    ybar_b = xp.permute_dims(ybar, (*range(1, nb + 1), 0, nb + 1))  # batch first

    def outputs(y0_: Any, *a: Any) -> Any:
        ys, _ = _replayed(bk, xp, f, y0_, ts, a, opts, "odeint(grad='backsolve') fallback")
        return ys

    ys, vjp_fn = bk.vjp(outputs, (y0, *args), None)
    # the outputs not reached are NaN and have no gradient
    bars = vjp_fn(xp.where(xp.isnan(ys), xp.zeros_like(ybar_b), ybar_b))
    return bars[0], tuple(bars[1:])


def _finish(bk: Backend, ys: Any, res: Integration, on_failure: str, max_steps: int) -> Any:
    """The outputs `ys` (batch first, `(..., T, d)`) after the failure policy, time first."""
    xp = bk.namespace(ys)
    ys = bk.handle_failure(ys, res.stats.status == SUCCESS, on_failure, _make_error(max_steps),
                           res.stats.status, res.stats.t_final, res.ts[0], res.ts[-1])
    nb = ys.ndim - 2
    return xp.permute_dims(ys, (nb, *range(nb), nb + 1))


def _make_error(max_steps: int) -> Callable[..., ODEFailureError]:
    def make(status: Any, t_final: Any, t_start: Any, t_end: Any) -> ODEFailureError:
        import numpy as np

        t_start, t_end = float(np.asarray(t_start)), float(np.asarray(t_end))
        status, t_final = np.asarray(status), np.asarray(t_final, dtype=np.float64)
        bad = np.argwhere(status != SUCCESS)
        where: tuple[int, ...] = tuple(int(i) for i in bad[0]) if bad.size else ()
        code = int(status[where]) if bad.size or status.ndim == 0 else SUCCESS
        t = float(t_final[where])
        n_failed = int(np.sum(status != SUCCESS))
        label = str(where) if len(where) != 1 else str(where[0])
        who = (f"sample {label} (of {status.size} in the batch; {n_failed} failed)"
               if status.ndim else "the solve")
        reason, fix = {
            MAX_STEPS: (
                f"max_steps = {max_steps} steps (accepted and rejected) were not enough",
                "Raise max_steps, loosen rtol/atol, or shorten the time span; many rejected "
                "steps (ODEStats.rejected) mean a stiff problem, too hard for an explicit "
                "method."),
            DT_UNDERFLOW: (
                "the step size fell below the resolution of t",
                "The solution probably blows up near this time (a finite-time singularity) or "
                "the problem is too stiff for an explicit method: check f and the time span, "
                "or loosen rtol/atol."),
            NONFINITE: (
                "f returned NaN or inf (or the state overflowed) at every step size tried",
                "Check f at this time and state (NaN inputs or parameters, log or sqrt of a "
                "negative number, overflow), or stop before this time."),
            REPLAY_MISMATCH: (
                "grad='checkpoint' replayed the forward pass and did not retrace it (f is not "
                "a pure function of (t, y, *args), or two compiled passes rounded differently "
                "and the step-size controller decided otherwise)",
                "Make f deterministic (no state kept between calls, no randomness), or use "
                "grad='direct' or grad='backsolve'."),
        }.get(code, ("it failed", ""))
        return ODEFailureError(
            f"odeint: {who} stopped at t = {t:.6g} of [{t_start:.6g}, {t_end:.6g}]: {reason} "
            f"(status {STATUS_NAMES.get(code, code)!r}). {fix} on_failure='nan' returns NaN "
            "for the failed samples only.",
            sample=where, t=t, status=STATUS_NAMES.get(code, str(code)), failed=n_failed,
        )

    return make


def odeint(f: Callable[..., Any], y0: Any, ts: Any, *args: Any,
           method: str | ButcherTableau = "tsit5", rtol: float = 1e-6, atol: float = 1e-6,
           dt0: float | None = None, max_steps: int = 4096, grad: str = "checkpoint",
           on_failure: str | None = None, full_output: bool = False,
           fallback: str | None = None, seminorm: bool = True,
           adjoint_stats: Any = None) -> Any:
    """Solve $y' = f(t, y, \\theta)$, $y(t_0) = y_0$, at the output times `ts`, by an explicit
    Runge–Kutta method with per-sample adaptive steps.

    Each sample (the leading axes of `y0`) has its own time, step size, accepted and rejected
    steps: a sample's result is the same alone or in a batch. Steps are clipped to the next
    output time, so every output is the end of a step (no interpolation). Adaptive methods
    accept a step when the RMS over the state of $\\mathrm{err}_i / (\\mathrm{atol} +
    \\mathrm{rtol}\\max(|y_i|, |y^{\\text{next}}_i|))$ is at most 1, with Hairer's PI
    step-size controller.

    **Arguments:**

    - `f`: the vector field, `f(t, y, *args) -> dy/dt` shaped like `y`, row by row (sample `i`
      of the output depends on sample `i` of `y` only). `t` broadcasts against `y`: shape
      `(..., 1)` (one time per sample) for a batched `y`, a 0-d array for `y` of shape `(d,)`.
    - `y0`: the initial state, `(d,)` or `(..., d)` (samples first), real floating.
    - `ts`: the output times, a 1-d array (or sequence), strictly increasing or decreasing;
      `ts[0]` is the initial time. Not differentiated.
    - `args`: positional, passed to `f`; the differentiated parameters $\\theta$.
    - `method`: `"tsit5"` (default) or `"dopri5"` (adaptive, 5th order with a 4th-order error
      estimate), `"rk4"` or `"euler"` (fixed steps of `dt0`), or a `ButcherTableau`.
    - `rtol`, `atol`: (keyword) the relative and absolute tolerances (default `1e-6`).
    - `dt0`: (keyword) the first step size (adaptive methods; default: Hairer's automatic
      choice, per sample), or the step size of a fixed-step method (required there: steps of
      `dt0`, each clipped to the next output time).
    - `max_steps`: (keyword) the most steps, accepted and rejected, per sample (default 4096).
      Under JAX the loop is a `lax.scan` of `max_steps` iterations (skipped once every sample
      is done), and reverse mode stores the loop's state for every one of them: keep it near
      what the problem needs.
    - `grad`: (keyword) how derivatives are taken. `"checkpoint"` (the default): the exact
      derivative of the discrete solution (equal to `"direct"` to rounding) with binomial
      checkpointing (`checkpointed`): the forward pass records no tape, the backward pass
      replays the integrator's loop (steps and step-size decisions) from
      $\\max(16, \\lceil\\log_2 N\\rceil)$ stored solver states (`MIN_CHECKPOINTS`), nothing
      stored per step; forward mode (PyTorch's `torch.func.jvp`) through the steps' own
      forward mode; `jax.jvp`, second order in PyTorch and `torch.func.vmap` of a gradient
      refused (`DerivativeNotSupportedError`); one plain pass where no derivative can be asked
      for. `"direct"`: the framework's autodiff through the accepted steps (the step-size
      controller is a constant, so this is the exact derivative of the discrete solution),
      every derivative in every framework, memory growing with the steps. `"backsolve"`: the
      continuous adjoint (Chen et al. 2018), integrated backwards in time by the same method
      and tolerances with seminorm error control, memory independent of the number of steps;
      forward mode (PyTorch's `torch.func.jvp`) through the forward solve's own forward mode,
      second order refused (`BacksolveUnsupportedError`), and a backward reconstruction of `y`
      that drifts from the forward trajectory (a flow unstable backwards in time) is a failure
      handled by `on_failure`, never a silently wrong gradient.
      In `"checkpoint"` and `"backsolve"`, arrays `f` reads from its closure (a module's
      parameters, a captured tensor or tracer) are differentiated like `args`
      (`Backend.lift_closure`); one it cannot find raises a `StructureError`.
    - `on_failure`: (keyword) what a sample that stopped early does (`max_steps` reached,
      step-size underflow, NaN/inf): `"raise"` an `ODEFailureError` naming the sample and the
      time it reached, `"warn"`, or `"nan"` (that sample's outputs are NaN; the others are
      kept). Default: `idf.config.on_failure`.
    - `full_output`: (keyword) return an `ODESolution(ys, stats)` with per-sample `ODEStats`.
    - `fallback`: (keyword, `grad="backsolve"` only) `"checkpoint"`: where the backward
      reconstruction drifts, take the gradient again with `grad="checkpoint"` (exact) instead
      of failing; eager calls only (PyTorch, JAX outside `jit`).
    - `seminorm`: (keyword, `grad="backsolve"` only) the backward step-size control leaves
      out the parameter integral (default True; False measures every part, torchdiffeq's
      mixed norm).
    - `adjoint_stats`: (keyword, `grad="backsolve"` only) an `ode.AdjointStats` the backward
      passes fill in (evaluations, steps, largest drift, fallbacks; eager calls).

    **Returns:** `ys` of shape `(len(ts), *y0.shape)`, time first (`ys[0]` is `y0`); an
    `ODESolution` with `full_output=True`.
    """
    if grad not in GRAD_MODES:
        raise ValueError(f"odeint: expected grad one of {GRAD_MODES}, got {grad!r}.")
    if grad == "backsolve":
        from ._backsolve import backsolve

        return backsolve(f, y0, ts, tuple(args), method=method, rtol=rtol, atol=atol, dt0=dt0,
                         max_steps=max_steps, on_failure=on_failure, full_output=full_output,
                         fallback=fallback, seminorm=seminorm, stats=adjoint_stats)
    for name, given in (("fallback", fallback is not None), ("seminorm", seminorm is not True),
                        ("adjoint_stats", adjoint_stats is not None)):
        if given:
            raise ValueError(f"odeint: {name}= applies to grad='backsolve' only, got grad="
                             f"{grad!r}.")
    on_failure = resolve_on_failure(on_failure, "odeint")
    if grad == "checkpoint":
        return _odeint_checkpoint(f, y0, ts, tuple(args), method=method, rtol=rtol, atol=atol,
                                  dt0=dt0, max_steps=max_steps, on_failure=on_failure,
                                  full_output=full_output)
    return _odeint_direct(f, y0, ts, args, method=method, rtol=rtol, atol=atol, dt0=dt0,
                          max_steps=max_steps, on_failure=on_failure, full_output=full_output)


def _odeint_direct(f: Callable[..., Any], y0: Any, ts: Any, args: tuple, *, method: Any,
                   rtol: float, atol: float, dt0: float | None, max_steps: int,
                   on_failure: str, full_output: bool) -> Any:
    """`grad="direct"` (and `"checkpoint"` where no derivative can be asked for): the
    integrator's pass, its steps recorded by the framework's autodiff, after the failure
    policy, time first."""
    res = integrate(f, y0, ts, args, method=method, rtol=rtol, atol=atol, dt0=dt0,
                    max_steps=max_steps)
    ys = _finish(get_backend(res.ys), res.ys, res, on_failure, max_steps)
    return ODESolution(ys, res.stats) if full_output else ys
