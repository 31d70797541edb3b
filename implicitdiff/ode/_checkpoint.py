"""The exact reverse-mode derivative of a fixed sequence of steps with binomial checkpointing,
written once for every backend.

`checkpointed(step, y0, schedule, args)` applies $N$ steps $y_{k+1} = \\phi_k(y_k, \\theta)$
(`step(s_k, y_k, args)`, $s_k$ the $k$-th entry of `schedule`) and is differentiable in `y0`
and `args` with the gradient of this discrete map itself, equal to backpropagation through all
$N$ steps up to rounding, without recording the steps' tape. The forward pass keeps $c$
checkpoints (default $\\lceil\\log_2 N\\rceil$); the backward pass recomputes the states it needs
from them by Griewank & Walther's binomial schedule ("revolve", ACM TOMS 26(1), 2000), which for
$c$ checkpoints recomputes the fewest steps possible: at most $r N$ step evaluations with $r$ the
smallest integer with $\\binom{c + 1 + r}{r} \\ge N$ (5 for $N = 10^4$ and the default $c = 14$;
4.5 N measured).
Each backend only registers the rule (`Backend.custom_vjp`): PyTorch as a
`torch.autograd.Function`, JAX as a `jax.custom_vjp`; `checkpointed_vjp` is the same rule as an
explicit reverse-mode transform, for the NumPy reference (with a hand-written `step_vjp`) and any
backend.

The times and step sizes in `schedule` were fixed by the forward solve: they are constants, not
differentiated (as in diffrax's `RecursiveCheckpointAdjoint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._backend import Backend, get_backend
from .._errors import ImplicitDiffError, StructureError

__all__ = [
    "CheckpointStats",
    "DerivativeNotSupportedError",
    "Plan",
    "binomial_split",
    "checkpointed",
    "checkpointed_vjp",
    "default_checkpoints",
    "reverse_cost",
    "spine",
]


class DerivativeNotSupportedError(ImplicitDiffError, NotImplementedError):
    """A derivative that a gradient mode cannot give: forward mode or second order through
    `checkpointed` (a hand-written reverse-mode rule), for instance. The message names the mode
    that gives it."""


def forward_ad_refusal(name: str) -> str:
    """Why a gradient mode whose forward-mode rule runs forward mode through its own steps
    refuses `torch.autograd.forward_ad` dual tensors (`grad="checkpoint"`, `"backsolve"`)."""
    return (f"{name}: forward mode through torch.autograd.forward_ad dual tensors is not given: "
            "the forward-mode rule runs forward mode through the steps itself, which does not "
            "nest inside a dual level. Use torch.func.jvp (or torch.func.jacfwd), which gives "
            "it, or odeint's grad='direct'.")


def vmap_refusal(name: str) -> str:
    """Why a hand-written rule (`grad="checkpoint"`, `"backsolve"`) refuses `torch.func.vmap`."""
    return (f"{name}: torch.func.vmap over this gradient mode is not given: its loops decide "
            "on values (steps taken, checkpoints placed), which a vmap rule cannot. Put the "
            "batch on the leading axes of y0 instead (each sample keeps its own steps, and "
            "is the same alone or in a batch), or use grad='direct' under vmap.")


def _unsupported(name: str) -> Callable[[str], ImplicitDiffError]:
    """The error a backend raises when asked for a derivative `checkpointed` does not give."""

    def make(kind: str) -> ImplicitDiffError:
        if kind == "forward_ad":
            return DerivativeNotSupportedError(forward_ad_refusal(name))
        if kind == "vmap":
            return DerivativeNotSupportedError(vmap_refusal(name))
        if kind == "forward":
            what, why = ("forward-mode derivative (jvp)",
                         "its derivative is a hand-written reverse-mode rule (custom vjp)")
        else:
            what, why = ("second-order derivative (double backward)",
                         "its backward pass runs one step's vjp at a time on recomputed states, "
                         "which is not recorded for differentiation")
        return DerivativeNotSupportedError(
            f"{name}: expected a reverse-mode (first-order) derivative, got a request for a "
            f"{what}: {why}. Differentiate through the steps directly (odeint's grad='direct', "
            "which records every step) for forward mode and higher order.")

    return make


# ---- the binomial schedule (pure Python: depends only on N and the number of checkpoints) -----

def default_checkpoints(n: int) -> int:
    """The default number of checkpoints for `n` steps: $\\lceil \\log_2 n \\rceil$ (0 for one
    step or none). Memory grows as $\\log_2 N$, recomputation stays below about $5N$ steps for
    $N \\le 10^4$."""
    return 0 if n <= 1 else math.ceil(math.log2(n))


def binomial_split(n: int, snaps: int) -> int:
    """Where revolve puts the next checkpoint: the number of steps $m$ ($1 \\le m < n$) to
    advance from a stored state before storing the next one, for a segment of `n` steps with
    `snaps` checkpoints (the one holding the segment's first state included, `snaps >= 2`).

    The rule of Griewank & Walther's `revolve` (Algorithm 799), which minimizes the number of
    recomputed steps; `reverse_cost` checks it against the dynamic program in the tests."""
    if n < 2 or snaps < 2:
        raise ValueError(f"binomial_split: expected n >= 2 and snaps >= 2, got {n}, {snaps}.")
    reps, rng = 0, 1
    while rng < n:  # rng = binom(snaps + reps, reps), the longest segment r sweeps reverse
        reps += 1
        rng = rng * (reps + snaps) // reps
    bino1 = rng * reps // (snaps + reps)
    bino2 = bino1 * snaps // (snaps + reps - 1)
    bino3 = bino2 * (snaps - 1) // (snaps + reps - 2) if snaps > 2 else 1
    bino4 = bino2 * (reps - 1) // snaps
    bino5 = 0 if snaps < 3 else (bino3 * (snaps - 2) // reps if snaps > 3 else 1)
    if n <= bino1 + bino3:
        m = bino4
    elif n >= rng - bino5:
        m = bino1
    else:
        m = n - bino2 - bino3
    return min(max(m, 1), n - 1)


def spine(n: int, checkpoints: int) -> list[int]:
    """The step indices whose states the forward pass stores (0 < p_1 < ... < p_k < n, at most
    `checkpoints` of them): the first advances of the binomial schedule, done while computing
    $y_N$, so that the backward pass starts from them."""
    out: list[int] = []
    i, s = 0, min(checkpoints, max(n - 1, 0))
    while n - i > 1 and s > 0:
        i += binomial_split(n - i, s + 1)
        out.append(i)
        s -= 1
    return out


def reverse_cost(n: int, checkpoints: int) -> int:
    """The number of steps the schedule evaluates outside the one-step vjps to reverse `n`
    steps from a stored first state with `checkpoints` free slots (the forward pass's own
    advances included): what `CheckpointStats` counts, computed without running a step."""
    if n <= 1:
        return 0
    s = min(checkpoints, n - 1)
    if s == 0:
        return n * (n - 1) // 2
    m = binomial_split(n, s + 1)
    return m + reverse_cost(n - m, s - 1) + reverse_cost(m, s)


# ---- statistics ---------------------------------------------------------------------------------

@dataclass
class CheckpointStats:
    """What `checkpointed` did, filled in as it runs (the forward pass when it is called, the
    backward pass when the framework runs it). The counts are those of the schedule (`Plan`)
    for all $N$ rows, whatever `n_steps`; under `jax.jit` they are taken once, at trace time
    (the schedule is static: they are the counts of every run).

    - `steps`: $N$. `checkpoints`: the number of checkpoint slots $c$.
    - `forward_steps`: step evaluations of the forward pass ($N$).
    - `stored`: states the forward pass stored (at most $c$).
    - `recomputed_steps`: step evaluations of the backward passes outside the one-step vjps.
    - `vjp_steps`: one-step vjps ($N$ per backward pass).
    - `peak_live`: the most checkpoint slots in use at once, forward and backward ($y_0$'s
      slot and the working state not counted): at most $c$.
    - `backward_passes`: backward passes run.
    """

    steps: int = 0
    checkpoints: int = 0
    forward_steps: int = 0
    stored: int = 0
    recomputed_steps: int = 0
    vjp_steps: int = 0
    peak_live: int = 0
    backward_passes: int = 0

    def summary(self) -> str:
        """One line: steps, checkpoints, evaluations and the peak of live checkpoints."""
        return (f"checkpointed: {self.steps} steps, {self.checkpoints} checkpoints "
                f"({self.stored} stored forward, peak {self.peak_live} live); "
                f"{self.forward_steps} forward steps, {self.recomputed_steps} recomputed and "
                f"{self.vjp_steps} one-step vjps in {self.backward_passes} backward pass(es)")


# ---- the sweeps ---------------------------------------------------------------------------------

def _num_steps(bk: Backend, schedule: Any) -> int:
    if isinstance(schedule, bool):
        raise StructureError("checkpointed: schedule: expected an int or arrays, got a bool.")
    if isinstance(schedule, int):
        if schedule < 0:
            raise StructureError(
                f"checkpointed: schedule: expected a number of steps >= 0, got {schedule}.")
        return schedule
    leaves = bk.tree_flatten(schedule)[0]
    lens = {int(leaf.shape[0]) for leaf in leaves
            if hasattr(leaf, "shape") and len(leaf.shape) > 0}
    if not leaves or len(lens) != 1 or any(not hasattr(leaf, "shape") or len(leaf.shape) == 0
                                             for leaf in leaves):
        shapes = [tuple(getattr(leaf, "shape", ())) for leaf in leaves]
        raise StructureError(
            "checkpointed: schedule: expected the number of steps N (an int) or a pytree of "
            f"arrays sharing a leading dimension N (the k-th rows go to step k), got leaves of "
            f"shapes {shapes}. Pass N, or stack each step's times and step sizes along axis 0.")
    return lens.pop()


class Plan:
    r"""The binomial schedule for `n` steps and `c` checkpoint slots as integer tables, so that
    one loop (traced once under JAX) runs it: pure Python, depends on `(n, c)` only.

    Slot 0 of the buffer holds $y_0$, slots $1..c$ the checkpoints. The forward pass advances
    from $y_0$ to $y_N$ and stores the states at `spine(n, c)`. The backward pass runs one
    "macro" per step, for $k = N-1, \ldots, 0$: read slot `base[j]` (the state at step
    `start[j]`), advance to step `k[j]` storing the states the schedule keeps on the way
    (events `ev_begin[j]:ev_end[j]` of the tables `ev_pos`, `ev_slot`), and take step k's vjp.
    The events of the forward pass come first in those tables (`0:fwd_events`).

    - `recomputed`: steps the backward pass evaluates outside the vjps.
    - `peak_live`: the most checkpoint slots in use at once ($\le c$; $y_0$ not counted).
    """

    def __init__(self, n: int, c: int):
        self.n, self.c = n, c
        self.spine = spine(n, c)
        ev: list[tuple[int, int]] = [(p, j + 1) for j, p in enumerate(self.spine)]
        self.fwd_events = len(ev)
        self.k: list[int] = []
        self.base: list[int] = []
        self.start: list[int] = []
        self.ev_begin: list[int] = []
        self.ev_end: list[int] = []
        pending: list[tuple[int, int]] = []
        chain: list[tuple[int, int]] = []  # where the pending stores' advance began

        def rev(i: int, n_: int, slot: int, s: int) -> None:
            while n_ > 1 and s > 0:
                m = binomial_split(n_, s + 1)
                if not pending:
                    chain[:] = [(i, slot)]
                pending.append((i + m, slot + 1))
                rev(i + m, n_ - m, slot + 1, s - 1)
                n_ = m
            for k in range(i + n_ - 1, i - 1, -1):
                st, b = chain[0] if pending else (i, slot)
                self.k.append(k)
                self.base.append(b)
                self.start.append(st)
                self.ev_begin.append(len(ev))
                ev.extend(pending)
                self.ev_end.append(len(ev))
                pending.clear()

        bounds = [0, *self.spine, n]
        for j in range(len(self.spine), -1, -1):
            rev(bounds[j], bounds[j + 1] - bounds[j], j, c - j)
        self.ev_pos = [p for p, _ in ev]
        self.ev_slot = [sl for _, sl in ev]
        self.recomputed = sum(k - st for k, st in zip(self.k, self.start))
        self.peak_live = max(self.ev_slot, default=0)


class _Sweep:
    """The user's step on flat leaves for one forward or backward pass, and the loops that
    run a `Plan`. Built inside the pass from that pass's arrays (under `jax.jit`, the backward
    pass's arrays are other tracers than the forward pass's)."""

    def __init__(self, bk: Backend, step: Callable[..., Any], plan: Plan, y_def: Any,
                 y_meta: list[tuple], args_leaves: list[Any], args_def: Any, diff: list[int],
                 theta: Sequence[Any], sched: Any, step_vjp: Callable[..., Any] | None,
                 stats: CheckpointStats, name: str, n_eff: Any = None):
        self.bk, self.step, self.plan, self.name = bk, step, plan, name
        self.n_eff = plan.n if n_eff is None else n_eff  # steps taken: an int or a traced int
        self.y_def, self.y_meta = y_def, y_meta
        self.args_leaves, self.args_def, self.diff = args_leaves, args_def, diff
        self.theta, self.sched, self.step_vjp, self.stats = tuple(theta), sched, step_vjp, stats
        self.sched_leaves, self.sched_def = (None, None) if isinstance(sched, int) else \
            bk.tree_flatten(sched)
        self._tables: dict[str, Any] = {}
        self._args: tuple | None = None
        self._single = y_def == bk.tree_flatten(0)[1]

    # ---- the user's step ------------------------------------------------------------------------
    def args(self, theta: Sequence[Any]) -> tuple:
        if theta is self.theta and self._args is not None:
            return self._args
        leaves = list(self.args_leaves)
        for i, t in zip(self.diff, theta):
            leaves[i] = t
        out = tuple(self.bk.tree_unflatten(self.args_def, leaves))
        if theta is self.theta:
            self._args = out
        return out

    def s_k(self, k: Any) -> Any:
        if self.sched_leaves is None:
            return k
        return self.bk.tree_unflatten(self.sched_def, [leaf[k] for leaf in self.sched_leaves])

    def phi(self, k: Any, y: Sequence[Any], theta: Sequence[Any]) -> tuple:
        """Step k on the state's leaves, checked: same structure, shapes and dtypes out as in."""
        if self._single:  # one array: no pytree round trip
            out = self.step(self.s_k(k), y[0], self.args(theta))
            shape, dtype = self.y_meta[0]
            if (getattr(out, "shape", None) is not None and tuple(out.shape) == shape
                    and str(out.dtype) == dtype):
                return (out,)
        else:
            out = self.step(self.s_k(k), self.bk.tree_unflatten(self.y_def, list(y)),
                            self.args(theta))
        leaves, out_def = self.bk.tree_flatten(out)
        got = [(tuple(getattr(a, "shape", ())), str(getattr(a, "dtype", type(a).__name__)))
               for a in leaves]
        if out_def != self.y_def or got != self.y_meta:
            raise StructureError(
                f"{self.name}: expected step(s_k, y, args) to return a state like y "
                f"(structure {self.y_def}, shapes and dtypes {self.y_meta}), got structure "
                f"{out_def} with {got}. Return the next state with y's shapes and dtypes (cast "
                "parameters to y's dtype).")
        return tuple(leaves)

    def vjp(self, k: Any, y: tuple, ybar: tuple, tbar: tuple) -> tuple[tuple, tuple]:
        """One step's vjp at $y_k$: the cotangent of $y_k$, and `tbar` plus step k's share of
        the parameters' cotangent."""
        if self.step_vjp is not None:
            yb, ab = self.step_vjp(self.s_k(k), self.bk.tree_unflatten(self.y_def, list(y)),
                                   self.args(self.theta),
                                   self.bk.tree_unflatten(self.y_def, list(ybar)))
            yb_leaves = self.bk.tree_flatten(yb)[0]
            ab_leaves = _leaves_like(self.bk, ab, self.args_def, len(self.args_leaves))
            tb: Sequence[Any] = [ab_leaves[i] for i in self.diff]
        else:
            _, pull = self.bk.loop_vjp(lambda yy, th: self.phi(k, yy, th), (y, self.theta))
            yb_, tb_ = pull(tuple(ybar))
            yb_leaves, tb = list(yb_), list(tb_) if tb_ is not None else [None] * len(self.diff)
        if len(yb_leaves) != len(y):
            raise StructureError(
                f"{self.name}: expected the step's vjp to return a cotangent like y "
                f"({len(y)} leaves), got {len(yb_leaves)} leaves.")
        return tuple(yb_leaves), tuple(a if b is None else a + b for a, b in zip(tbar, tb))

    # ---- the checkpoint buffer: per leaf of y, (c + 1, size) -------------------------------------
    def new_buffer(self, y0: tuple) -> list[Any]:
        buf = []
        for leaf in y0:
            xp = self.bk.namespace(leaf)
            row = xp.reshape(leaf, (-1,))
            hist = xp.zeros((self.plan.c + 1, row.shape[0]), dtype=row.dtype,
                            device=getattr(row, "device", None))
            buf.append(self.bk.ring_write(hist, 0, row, None, True))
        return buf

    def read(self, buf: Sequence[Any], slot: Any) -> tuple:
        xp = self.bk.namespace(buf[0])
        return tuple(xp.reshape(h[slot], shape) for h, (shape, _) in zip(buf, self.y_meta))

    def write(self, buf: Sequence[Any], slot: Any, y: tuple, mask: Any) -> list[Any]:
        """`buf` with slot `slot` set to `y` where `mask`: a Python bool (eager loops: nothing
        is written when False) or a traced flag."""
        if isinstance(mask, bool):
            if not mask:
                return list(buf)
            return [self.bk.ring_write(h, slot, self.bk.namespace(v).reshape(v, (-1,)), None,
                                       True) for h, v in zip(buf, y)]
        out = []
        for h, v in zip(buf, y):
            xp = self.bk.namespace(h)
            out.append(self.bk.ring_write(h, xp.reshape(slot, (1,)), xp.reshape(v, (-1,)),
                                          xp.reshape(mask, (1,)), False))
        return out

    _TABLES = ("k", "base", "start", "ev_begin", "ev_end", "ev_pos", "ev_slot")

    def make_tables(self, like: Any) -> None:
        """The plan's tables as integer arrays, for loops whose counters are traced (a backend
        with its own `while_loop`: JAX). Made before the loops, never inside a trace of one
        (an array made in one loop's trace and cached would leak into the next)."""
        if self._tables or type(self.bk).while_loop is Backend.while_loop:
            return  # Python loops: Python ints index the plan's lists
        xp = self.bk.namespace(like)
        for name in self._TABLES:
            self._tables[name] = xp.asarray([*getattr(self.plan, name), -1])

    def table(self, name: str, i: Any) -> Any:
        """Entry `i` of one of the plan's tables (-1 past its end): a Python int for a Python
        index (eager loops), else an entry of the table's array (traced loops)."""
        if isinstance(i, int):
            values: list[int] = getattr(self.plan, name)
            return values[i] if i < len(values) else -1
        return self._tables[name][i]

    # ---- the loops ------------------------------------------------------------------------------
    def _advance_cond(self, state: tuple) -> Any:
        return state[0] < state[1]

    def _advance_body(self, state: tuple) -> tuple:
        # one step, then the store the plan makes at the new step index (if any)
        p, end, y, buf, e, e_end = state
        y = self.phi(p, y, self.theta)
        p = p + 1
        if isinstance(e, int):  # eager loops: Python ints, a Python decision
            store = e < e_end and self.table("ev_pos", e) == p
            buf = self.write(buf, self.table("ev_slot", e), y, store)
            return p, end, y, tuple(buf), e + int(store), e_end
        xp = self.bk.namespace(e)
        flag = (e < e_end) & (self.table("ev_pos", xp.minimum(e, e_end)) == p)
        buf = self.write(buf, self.table("ev_slot", e), y, flag)
        return p, end, y, tuple(buf), e + xp.astype(flag, e.dtype), e_end

    def advance(self, p: Any, end: Any, y: tuple, buf: Sequence[Any], e: Any, e_end: Any
                ) -> tuple[tuple, list[Any]]:
        out = self.bk.while_loop(self._advance_cond, self._advance_body,
                                 (p, end, tuple(y), tuple(buf), e, e_end))
        return tuple(out[2]), list(out[3])

    def run(self, y: tuple) -> tuple:
        """$y_N$ from $y_0$ by the steps alone, storing nothing (the forward mode's pass; the
        number of steps a Python int)."""
        for k in range(int(self.n_eff)):
            y = self.phi(k, y, self.theta)
        return tuple(y)

    def forward(self, y0: tuple, states: Sequence[tuple] | None = None
                ) -> tuple[tuple, list[Any]]:
        """$y_N$, and the buffer with $y_0$ and the states at `spine(N, c)`. `states`: the
        states after steps $1..N$, already computed by the caller (eager, all $N$ steps
        taken): the buffer is filled from them and no step is run."""
        plan = self.plan
        self.stats.forward_steps += plan.n
        self.stats.stored += len(plan.spine)
        self.stats.peak_live = max(self.stats.peak_live, len(plan.spine))
        self.make_tables(y0[0])
        if states is not None:
            buf = self.new_buffer(y0)
            for slot, p in enumerate(plan.spine, start=1):
                buf = self.write(buf, slot, tuple(states[p - 1]), True)
            return tuple(states[plan.n - 1]), [tuple(buf)]
        yN, buf = self.advance(0, self.n_eff, y0, self.new_buffer(y0), 0, plan.fwd_events)
        return yN, [tuple(buf)]

    def _macro_cond(self, state: tuple) -> Any:
        return state[0] < self.plan.n

    def _skip_cond(self, state: tuple) -> Any:
        return state[0] < self.plan.n - self.n_eff

    def _skip_body(self, state: tuple) -> tuple:
        # a macro of a step not taken (k >= n_eff): no vjp, but the stores it makes at steps
        # before n_eff are made (later macros start from them); the advance stops at n_eff
        j, buf = state
        k = self.table("k", j)
        end = min(k, self.n_eff) if isinstance(k, int) and isinstance(self.n_eff, int) else \
            self.bk.namespace(k).minimum(k, self.n_eff)
        y = self.read(buf, self.table("base", j))
        _, buf = self.advance(self.table("start", j), end, y, buf, self.table("ev_begin", j),
                              self.table("ev_end", j))
        return j + 1, tuple(buf)

    def _macro_body(self, state: tuple) -> tuple:
        j, ybar, tbar, buf = state
        k = self.table("k", j)
        y = self.read(buf, self.table("base", j))
        y, buf = self.advance(self.table("start", j), k, y, buf, self.table("ev_begin", j),
                              self.table("ev_end", j))
        ybar, tbar = self.vjp(k, y, ybar, tbar)
        return j + 1, ybar, tbar, tuple(buf)

    def backward(self, y0: tuple, saved: list[Any], ybar: tuple) -> tuple[tuple, tuple]:
        """The cotangents of $y_0$ and of the differentiable leaves of `args` from that of
        $y_N$: the plan's macros in one loop. Takes the buffer out of `saved` (the caller's
        list: a second call, which finds it empty, runs the forward pass again, since the
        first one overwrote the buffer's slots)."""
        plan, stats = self.plan, self.stats
        self.make_tables(y0[0])
        if saved:
            buf = saved.pop()
        else:
            buf = self.advance(0, self.n_eff, y0, self.new_buffer(y0), 0, plan.fwd_events)[1]
            stats.recomputed_steps += plan.n
        stats.backward_passes += 1
        stats.recomputed_steps += plan.recomputed
        stats.vjp_steps += plan.n
        stats.peak_live = max(stats.peak_live, plan.peak_live)
        tbar = tuple(self.bk.namespace(t).zeros_like(t) for t in self.theta)
        # the macros of the steps not taken (k >= n_eff, the first ones) only store; then the
        # macros with a vjp
        if not (isinstance(self.n_eff, int) and self.n_eff == plan.n):
            buf = self.bk.while_loop(self._skip_cond, self._skip_body, (0, tuple(buf)))[1]
        out = self.bk.while_loop(self._macro_cond, self._macro_body,
                                 (plan.n - self.n_eff, tuple(ybar), tbar, tuple(buf)))
        return tuple(out[1]), tuple(out[2])


def _leaves_like(bk: Backend, tree: Any, treedef: Any, n: int) -> list[Any]:
    """The leaves of a cotangent shaped like `args` (None, or None at leaves, for none)."""
    if tree is None:
        return [None] * n
    leaves = bk.tree_flatten(tree)[0]
    if len(leaves) == n:
        return leaves
    # None entries are empty subtrees: align by flattening leaf by leaf with the args' structure
    out: list[Any] = []
    template = bk.tree_unflatten(treedef, list(range(n)))
    _align(tree, template, out)
    if len(out) != n:
        raise StructureError(
            f"step_vjp: expected a cotangent like args ({n} leaves), got {len(leaves)} leaves.")
    return out


def _align(ct: Any, template: Any, out: list[Any]) -> None:
    if isinstance(template, int) and not isinstance(template, bool):
        out.append(ct)
        return
    if isinstance(template, dict):
        for k in sorted(template):
            _align(None if ct is None else ct.get(k), template[k], out)
        return
    if isinstance(template, (tuple, list)):
        for j, t in enumerate(template):
            _align(None if ct is None else ct[j], t, out)


# ---- the public functions -----------------------------------------------------------------------

def _steps_taken(n_steps: Any, n: int, name: str) -> Any:
    """`n_steps` as a Python int where its value is known (checked to be in [0, N]), or the
    traced integer array itself (under `jax.jit`); N when None."""
    if n_steps is None:
        return n
    if isinstance(n_steps, bool) or not (isinstance(n_steps, int) or hasattr(n_steps, "dtype")):
        raise StructureError(f"{name}: n_steps: expected an int or a 0-d integer array, got "
                             f"{type(n_steps).__name__}.")
    try:
        value = int(n_steps)
    except TypeError:  # a traced array (JAX under jit): its value comes at run time
        return n_steps
    if not 0 <= value <= n:
        raise StructureError(f"{name}: n_steps: expected 0 <= n_steps <= N = {n} (the rows of "
                             f"the schedule stepped), got {value}.")
    return value


class _Problem:
    """What both sweeps share: the step, the structures, the split of `args`."""

    def __init__(self, bk: Backend, step: Callable[..., Any], y0: Any, schedule: Any,
                 args: tuple, checkpoints: int | None, step_vjp: Callable[..., Any] | None,
                 stats: CheckpointStats | None, name: str, n_steps: Any = None):
        if not callable(step):
            raise StructureError(f"{name}: expected step a function (s_k, y, args) -> y_next, "
                                 f"got {type(step).__name__}.")
        self.bk, self.step, self.step_vjp, self.name = bk, step, step_vjp, name
        self.n = _num_steps(bk, schedule)
        if checkpoints is None:
            c = default_checkpoints(self.n)
        elif isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 0:
            raise StructureError(f"{name}: checkpoints: expected an int >= 0 (or None for "
                                 f"ceil(log2 N)), got {checkpoints!r}.")
        else:
            c = checkpoints
        self.c = min(c, max(self.n - 1, 0))
        self.stats = stats if stats is not None else CheckpointStats()
        self.stats.steps, self.stats.checkpoints = self.n, self.c
        y_leaves, self.y_def = bk.tree_flatten(y0)
        for j, leaf in enumerate(y_leaves):
            if not (hasattr(leaf, "dtype") and bk.is_float(leaf)):
                raise StructureError(
                    f"{name}: y0: expected floating arrays, got {type(leaf).__name__} "
                    f"{getattr(leaf, 'dtype', '')} at leaf {j}. Pass the state as floating "
                    "arrays of the framework.")
        self.y0 = tuple(y_leaves)
        self.y_meta = [(tuple(a.shape), str(a.dtype)) for a in y_leaves]
        self.args_leaves, self.args_def = bk.tree_flatten(tuple(args))
        self.diff = [i for i, a in enumerate(self.args_leaves)
                     if hasattr(a, "dtype") and bk.is_float(a)]
        self.plan = Plan(self.n, self.c)
        self.n_eff = _steps_taken(n_steps, self.n, name)

    def sweep(self, theta: Sequence[Any], sched: Any, n_eff: Any = None) -> _Sweep:
        return _Sweep(self.bk, self.step, self.plan, self.y_def, self.y_meta,
                      self.args_leaves, self.args_def, self.diff, theta, sched, self.step_vjp,
                      self.stats, self.name, self.n_eff if n_eff is None else n_eff)

    def args_cotangent(self, tbar: Sequence[Any] | None) -> tuple:
        leaves: list[Any] = [None] * len(self.args_leaves)
        for i, t in zip(self.diff, tbar or [None] * len(self.diff)):
            leaves[i] = t
        return tuple(self.bk.tree_unflatten(self.args_def, leaves))


def checkpointed(step: Callable[..., Any], y0: Any, schedule: Any, args: tuple = (), *,
                 checkpoints: int | None = None, n_steps: Any = None,
                 stats: CheckpointStats | None = None, name: str = "checkpointed",
                 _states: Sequence[Any] | None = None, _lift: bool = True) -> Any:
    """$y_N$ after `N` steps $y_{k+1}$ = `step(s_k, y_k, args)`, differentiable in `y0` and
    `args` with the exact gradient of these steps (backpropagation through them, to rounding),
    in $O(c)$ memory: binomial checkpointing (revolve).

    The forward pass stores `checkpoints` states $c$ (default $\\lceil \\log_2 N \\rceil$) while it
    computes $y_N$, recording no tape; the backward pass recomputes the other states from them
    in Griewank & Walther's binomial schedule (the fewest recomputed steps for $c$ checkpoints:
    at most $rN$ with $\\binom{c+1+r}{r} \\ge N$) and runs one step's vjp
    (`Backend.loop_vjp`) at a time, accumulating the cotangent of `args`. The checkpoints live
    in one buffer of $c + 1$ states ($y_0$ included), allocated once: memory is that buffer,
    the working state and one step's tape, whatever $N$.

    Registered with the framework of the arrays (`Backend.custom_vjp`): PyTorch autograd
    (`backward`, `torch.autograd.grad`, `retain_graph`; `torch.func.grad`/`vjp` too) and
    `jax.grad`/`jax.vjp` (`jit` and `vmap` as well: the forward and backward passes are one
    loop each, traced once whatever $N$). Forward mode under PyTorch (`torch.func.jvp`) runs
    the steps' own forward mode (no checkpoints needed); second order and
    `torch.autograd.forward_ad` dual tensors raise `DerivativeNotSupportedError`. Under JAX,
    `jax.hessian` (forward over reverse) is exact (JAX differentiates both loops in forward
    mode), `jax.jvp` raises `DerivativeNotSupportedError` (a `custom_vjp` has no forward
    mode) and
    reverse over reverse JAX's `ValueError` (reverse mode through `lax.while_loop`). On NumPy
    arrays it only computes $y_N$; `checkpointed_vjp` with `step_vjp=` is the reverse mode
    there.

    **Arguments:**

    - `step`: `(s_k, y, args) -> y_next`, with `y_next` shaped like `y` (a pytree of floating
      arrays of one framework; leading batch dimensions welcome). Written with the framework's
      or array-API operations.
    - `y0`: the initial state (a pytree of floating arrays).
    - `schedule`: the number of steps `N` (then `s_k` is the step index `k`), or a pytree of
      arrays with leading dimension `N` (then `s_k` is its `k`-th slice, e.g. `(t[k], dt[k])`;
      per-sample step sizes as `(N, batch)` arrays). Constants: no gradient flows to it.
    - `args`: a tuple of pytrees passed to `step` as one tuple; its floating leaves are
      differentiated, the others (ints, strings) passed through.
    - `checkpoints`: (keyword) the number of checkpoint slots $c \\ge 0$; `None` is
      $\\lceil\\log_2 N\\rceil$. `0` keeps only $y_0$ and recomputes $N(N-1)/2$ steps; $N-1$ or
      more stores every state.
    - `n_steps`: (keyword) the number of leading rows of `schedule` to step (an int or a 0-d
      integer array, traced under `jax.jit`: an adaptive solver's accepted steps within
      `max_steps` rows); the other rows are skipped, as steps that leave $y$ unchanged (the
      replay of zero-length steps), and cost nothing. The schedule's layout is that of $N$
      rows. Default: all $N$.
    - `stats`: (keyword) a `CheckpointStats` to fill in (counts of the forward and backward
      passes; the counts of the plan for all $N$ rows).
    - `name`: (keyword) the name used in error messages.

    **Returns:** $y_N$ (the state after `n_steps` steps), shaped like `y0`.
    """
    # `_states` (private, `odeint(grad="checkpoint")`'s online checkpointing): the states
    # after steps 1..N, as tuples of y's leaves, computed by the caller with the same step on
    # the same inputs, outside the autodiff; the forward pass then stores them instead of
    # recomputing them (eager backends, every row a step taken). `_lift` (private): False
    # where the caller has lifted the closure already (`odeint`'s replay)
    bk = get_backend(y0, args, schedule if not isinstance(schedule, int) else None)
    prob = _Problem(bk, step, y0, schedule, tuple(args), checkpoints, None, stats, name,
                    n_steps)
    if _states is not None and not (len(_states) == prob.n and prob.n_eff == prob.n):
        _states = None
    if prob.n == 0 or (isinstance(prob.n_eff, int) and prob.n_eff == 0):
        return y0
    if _lift:  # what `step` reads from its closure and may need a derivative: an argument
        n_args = len(tuple(args))
        s0 = prob.sweep([], schedule).s_k(0)
        g, values = bk.lift_closure(
            step, (s0, bk.tree_unflatten(prob.y_def, list(prob.y0)), tuple(args)), name=name)
        if values:
            def lifted(s_k: Any, y: Any, a: tuple) -> Any:
                return g(s_k, y, tuple(a[:n_args]), a[n_args])

            args = (*tuple(args), values)
            prob = _Problem(bk, lifted, y0, schedule, args, checkpoints, None, stats, name,
                            n_steps)
    theta = [prob.args_leaves[i] for i in prob.diff]
    int_sched = isinstance(schedule, int)
    sched_leaves, sched_def = ([], None) if int_sched else bk.tree_flatten(schedule)

    def as_sched(s: Sequence[Any]) -> Any:
        return schedule if int_sched else bk.tree_unflatten(sched_def, list(s))

    # a traced n_steps travels as an input (no gradient), like the schedule
    traced = () if isinstance(prob.n_eff, int) else (prob.n_eff,)

    # the first pass's states travel as inputs (no gradient), not in fwd's closure: under a
    # torch.func transform they are tensors of its level, which the Function's forward may
    # only receive as inputs
    states_in = () if _states is None else tuple(tuple(st) for st in _states)

    def fwd(y0_: tuple, theta_: tuple, sched_: tuple, n_: tuple, st_: tuple
            ) -> tuple[tuple, list]:
        return prob.sweep(theta_, as_sched(sched_), *n_).forward(
            tuple(y0_), list(st_) if _states is not None else None)

    def bwd(primals: tuple, saved: list, ybar: tuple) -> tuple:
        y0_, theta_, sched_, n_, _ = primals
        y0bar, tbar = prob.sweep(theta_, as_sched(sched_), *n_).backward(
            tuple(y0_), saved, tuple(ybar))
        return (tuple(y0bar), tuple(tbar), None, None, None)

    def jvp(primals: tuple, tangents: tuple) -> tuple:
        # forward mode needs no checkpoints: the steps' own forward-mode derivative, one step
        # at a time (memory that of one step, whatever N)
        y0_, theta_, sched_, n_, _ = primals

        def steps(y: tuple, th: tuple) -> tuple:
            return prob.sweep(th, as_sched(sched_), *n_).run(tuple(y))

        return bk.jvp(steps, (tuple(y0_), tuple(theta_)),
                      (tuple(tangents[0]), tuple(tangents[1])))[1]

    yN = bk.custom_vjp(fwd, bwd, (prob.y0, tuple(theta), tuple(sched_leaves), traced,
                                  states_in), unsupported=_unsupported(name), jvp=jvp)
    return bk.tree_unflatten(prob.y_def, list(yN))


def checkpointed_vjp(step: Callable[..., Any], y0: Any, schedule: Any, args: tuple = (), *,
                     checkpoints: int | None = None, n_steps: Any = None,
                     step_vjp: Callable[..., Any] | None = None,
                     stats: CheckpointStats | None = None, name: str = "checkpointed_vjp"
                     ) -> tuple[Any, Callable[[Any], tuple[Any, tuple]]]:
    """`checkpointed` as an explicit reverse-mode transform: `(y_N, vjp_fn)`, with
    `vjp_fn(y_N_bar) -> (y0_bar, args_bar)` (`args_bar` a tuple like `args`, None at leaves
    that get no gradient). The same forward and backward sweeps, not registered with any
    framework: the NumPy reference, and a check of the registrations.

    **Arguments:** as `checkpointed`, and

    - `step_vjp`: (keyword) `(s_k, y, args, y_next_bar) -> (y_bar, args_bar)`, one step's vjp
      written by hand (`args_bar` like `args`, None for no gradient). Required for NumPy arrays
      (no autodiff); by default `Backend.vjp` of `step` (JAX, PyTorch).

    **Returns:** `(y_N, vjp_fn)`. `vjp_fn` may be called more than once (the stored states are
    recomputed after the first call).
    """
    bk = get_backend(y0, args, schedule if not isinstance(schedule, int) else None)
    if step_vjp is None and not bk.autodiff:
        raise StructureError(
            f"{name}: expected step_vjp= (a hand-written vjp of one step) for arrays of the "
            f"backend {bk.name!r}, which has no automatic differentiation; got none. Pass "
            "step_vjp=(s_k, y, args, y_next_bar) -> (y_bar, args_bar).")
    prob = _Problem(bk, step, y0, schedule, tuple(args), checkpoints, step_vjp, stats, name,
                    n_steps)
    # not recorded by the framework's autodiff (PyTorch records under grad mode otherwise)
    theta = [bk.stop_gradient(prob.args_leaves[i]) for i in prob.diff]
    y0_ = tuple(bk.stop_gradient(leaf) for leaf in prob.y0)
    if prob.n == 0:
        return y0, lambda ybar: (ybar, prob.args_cotangent(None))
    yN, saved = prob.sweep(theta, schedule).forward(y0_)

    def vjp_fn(ybar: Any) -> tuple[Any, tuple]:
        leaves, d = bk.tree_flatten(ybar)
        if d != prob.y_def:
            raise StructureError(f"{name}: expected a cotangent structured like y0 "
                                 f"({prob.y_def}), got {d}.")
        y0bar, tbar = prob.sweep(theta, schedule).backward(y0_, saved, tuple(leaves))
        return bk.tree_unflatten(prob.y_def, list(y0bar)), prob.args_cotangent(tbar)

    return bk.tree_unflatten(prob.y_def, list(yN)), vjp_fn
