"""`idf.ode.checkpointed`: the exact gradient of N steps with binomial checkpointing.

Oracles: backpropagation through the unrolled steps (PyTorch autograd, `jax.grad` of a
`fori_loop`), central finite differences (NumPy), the dynamic program for the optimal number of
recomputed steps, a simulation of the schedule on step indices, and the peak of live tensor
memory measured under a `TorchDispatchMode` (every tensor an operation creates, until its
storage is freed).
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any

import numpy as np
import pytest

import implicitdiff as idf
from implicitdiff.ode import _checkpoint as C

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy
jax.config.update("jax_enable_x64", True)

NS = [1, 2, 3, 7, 100, 1000]


def _rel(got: Any, want: Any) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


# ---- the schedule (pure Python) ------------------------------------------------------------------

@functools.cache
def _optimal(n: int, s: int) -> int:
    """Fewest steps evaluated to reverse n steps from a stored first state with s free slots
    (Griewank's dynamic program)."""
    if n <= 1:
        return 0
    if s == 0:
        return n * (n - 1) // 2
    return min(m + _optimal(n - m, s - 1) + _optimal(m, s) for m in range(1, n))


def test_binomial_split_is_optimal():
    for n in range(1, 61):
        for s in range(0, 7):
            assert C.reverse_cost(n, s) == _optimal(n, min(s, max(n - 1, 0))), (n, s)


@pytest.mark.parametrize("n,c", [(1, 0), (2, 1), (7, 0), (7, 1), (7, 3), (7, 6), (7, 9),
                                 (100, 2), (100, 7), (1000, 10), (10_000, 14)])
def test_plan_simulated_on_step_indices(n, c):
    # Run the plan on "states" that are step indices: every read must find the state the
    # macro starts from, every macro must end at its step, and each step is reversed once,
    # last first. The slots in use never exceed c.
    plan = C.Plan(n, min(c, max(n - 1, 0)))
    buf = {0: 0}
    pos = 0
    for e in range(plan.fwd_events):
        assert pos < plan.ev_pos[e] <= n
        pos = plan.ev_pos[e]
        buf[plan.ev_slot[e]] = pos
    assert plan.k == list(range(n - 1, -1, -1))
    for j, k in enumerate(plan.k):
        assert buf[plan.base[j]] == plan.start[j] <= k
        pos = plan.start[j]
        for e in range(plan.ev_begin[j], plan.ev_end[j]):
            assert pos < plan.ev_pos[e] <= k
            pos = plan.ev_pos[e]
            buf[plan.ev_slot[e]] = pos
    assert max(buf) <= plan.c and plan.peak_live <= plan.c
    assert plan.recomputed == C.reverse_cost(n, plan.c) - (plan.spine[-1] if plan.spine else 0)
    if n >= 2:
        # revolve's bound: with c + 1 states (y0 included) and r the least repetition number
        # with binom(c + 1 + r, r) >= n, no step is evaluated more than r times
        r = next(r for r in range(1, n + 1) if math.comb(plan.c + 1 + r, r) >= n)
        assert plan.recomputed + n <= r * n


# ---- PyTorch -------------------------------------------------------------------------------------

def _torch_f(y, a, w):
    return -a * torch.sin(y) + 0.3 * torch.tanh(y @ w)


def _torch_euler(k, y, args):
    p, = args
    return y + 0.01 * _torch_f(y, p["a"], p["w"])


def _torch_rk4(s, y, args):
    (t, dt), (p,) = s, args
    f = lambda z: _torch_f(z, p["a"], p["w"]) * torch.cos(t)  # noqa: E731
    k1 = f(y)
    k2 = f(y + dt / 2 * k1)
    k3 = f(y + dt / 2 * k2)
    k4 = f(y + dt * k3)
    return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _torch_problem(seed=0, batch=(4,)):
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randn(*batch, 3, generator=g, dtype=torch.float64, requires_grad=True)
    p = {"a": torch.tensor(1.3, dtype=torch.float64, requires_grad=True),
         "w": (0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64)).requires_grad_()}
    cot = torch.randn(*batch, 3, generator=g, dtype=torch.float64)
    return y0, p, cot


def _torch_unrolled(step, y0, schedule, args, n):
    y = y0
    for k in range(n):
        s = k if isinstance(schedule, int) else tuple(leaf[k] for leaf in schedule)
        y = step(s, y, args)
    return y


@pytest.mark.parametrize("n", NS)
def test_torch_gradient_equals_backprop(n):
    y0, p, cot = _torch_problem()
    stats = C.CheckpointStats()
    yN = C.checkpointed(_torch_euler, y0, n, (p,), stats=stats)
    got = torch.autograd.grad((yN * cot).sum(), (y0, p["a"], p["w"]))
    ref_y = _torch_unrolled(_torch_euler, y0, n, (p,), n)
    want = torch.autograd.grad((ref_y * cot).sum(), (y0, p["a"], p["w"]))
    assert _rel(yN.detach(), ref_y.detach()) == 0.0  # the same operations forward
    for g_, w_ in zip(got, want):
        assert _rel(g_, w_) <= 1e-12
    plan = C.Plan(n, C.default_checkpoints(n))
    assert (stats.steps, stats.checkpoints) == (n, C.default_checkpoints(n))
    assert (stats.forward_steps, stats.vjp_steps, stats.backward_passes) == (n, n, 1)
    assert stats.recomputed_steps == plan.recomputed
    assert stats.stored == len(plan.spine) and stats.peak_live <= stats.checkpoints


@pytest.mark.parametrize("checkpoints", [0, 1, 2, 19, 50])
def test_torch_any_number_of_checkpoints(checkpoints):
    n = 20
    t = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    schedule = (t[:-1], t[1:] - t[:-1])  # (t_k, dt_k), per step
    y0, p, cot = _torch_problem(1)
    yN = C.checkpointed(_torch_rk4, y0, schedule, (p,), checkpoints=checkpoints)
    got = torch.autograd.grad((yN * cot).sum(), (y0, p["a"], p["w"]))
    ref = _torch_unrolled(_torch_rk4, y0, schedule, (p,), n)
    want = torch.autograd.grad((ref * cot).sum(), (y0, p["a"], p["w"]))
    for g_, w_ in zip(got, want):
        assert _rel(g_, w_) <= 1e-12


def test_torch_batch_with_per_sample_step_sizes():
    # a (N, batch) schedule: each sample its own dt; batched gradients equal the samples' own
    n, batch = 30, 5
    dt = torch.linspace(0.01, 0.05, batch, dtype=torch.float64).expand(n, batch)[..., None]
    t = torch.cumsum(dt, 0) - dt
    y0, p, cot = _torch_problem(2, batch=(batch,))
    yN = C.checkpointed(_torch_rk4, y0, (t, dt), (p,))
    got = torch.autograd.grad((yN * cot).sum(), (y0, p["a"], p["w"]))
    want = torch.autograd.grad(
        (_torch_unrolled(_torch_rk4, y0, (t, dt), (p,), n) * cot).sum(), (y0, p["a"], p["w"]))
    for g_, w_ in zip(got, want):
        assert _rel(g_, w_) <= 1e-12
    i = 3  # one sample alone
    y0_i = y0.detach()[i:i + 1].requires_grad_()
    yN_i = C.checkpointed(_torch_rk4, y0_i, (t[:, i:i + 1], dt[:, i:i + 1]), (p,))
    g_i = torch.autograd.grad((yN_i * cot[i:i + 1]).sum(), y0_i)[0]
    assert _rel(g_i, got[0][i:i + 1]) <= 1e-13


@pytest.mark.parametrize("taken", [0, 1, 9, 17, 30])
def test_torch_n_steps_skips_the_rows_after_it(taken):
    # the rows after n_steps hold NaN: never evaluated, forward or backward
    n = 30
    t = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    dt = (t[1:] - t[:-1]).clone()
    dt[taken:] = float("nan")
    y0, p, cot = _torch_problem(9)
    yN = C.checkpointed(_torch_rk4, y0, (t[:-1], dt), (p,), n_steps=torch.tensor(taken))
    got = torch.autograd.grad((yN * cot).sum(), (y0, p["a"], p["w"]), allow_unused=True)
    ref = _torch_unrolled(_torch_rk4, y0, (t[:-1], dt), (p,), taken)
    want = torch.autograd.grad((ref * cot).sum(), (y0, p["a"], p["w"]), allow_unused=True)
    for g_, w_ in zip(got, want):
        if w_ is None:  # no step taken: no dependence on the parameters
            assert g_ is None or not bool(g_.any())
        else:
            assert _rel(g_, w_) <= 1e-12
    with pytest.raises(idf.StructureError, match="n_steps"):
        C.checkpointed(_torch_rk4, y0, (t[:-1], dt), (p,), n_steps=n + 1)


def test_torch_pytree_state_and_retain_graph():
    def step(k, y, args):
        (pos, vel), (a,) = y, args
        return (pos + 0.05 * vel, vel - 0.05 * a * torch.sin(pos))

    g = torch.Generator().manual_seed(3)
    pos = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    vel = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    stats = C.CheckpointStats()
    out = C.checkpointed(step, (pos, vel), 40, (a,), stats=stats)
    loss = (out[0] ** 2).sum() + out[1].sum()
    first = torch.autograd.grad(loss, (pos, vel, a), retain_graph=True)
    second = torch.autograd.grad(loss, (pos, vel, a))  # the buffer was consumed: recomputed
    ref = _torch_unrolled(step, (pos, vel), 40, (a,), 40)
    want = torch.autograd.grad((ref[0] ** 2).sum() + ref[1].sum(), (pos, vel, a))
    for f_, s_, w_ in zip(first, second, want):
        assert _rel(f_, w_) <= 1e-12 and _rel(s_, w_) <= 1e-12
    assert stats.backward_passes == 2 and stats.vjp_steps == 80


def test_torch_func_grad_and_the_explicit_vjp():
    n = 25
    y0, p, cot = _torch_problem(4)
    y0d, ad, wd = y0.detach(), p["a"].detach(), p["w"].detach()

    def loss(fn, y, a, w):
        return (fn(y, {"a": a, "w": w}) * cot).sum()

    ckpt = lambda y, q: C.checkpointed(_torch_euler, y, n, (q,))  # noqa: E731
    unrolled = lambda y, q: _torch_unrolled(_torch_euler, y, n, (q,), n)  # noqa: E731
    got = torch.func.grad(functools.partial(loss, ckpt), argnums=(0, 1, 2))(y0d, ad, wd)
    want = torch.func.grad(functools.partial(loss, unrolled), argnums=(0, 1, 2))(y0d, ad, wd)
    for g_, w_ in zip(got, want):
        assert _rel(g_, w_) <= 1e-12
    yN, vjp_fn = C.checkpointed_vjp(_torch_euler, y0, n, (p,))
    assert not yN.requires_grad  # nothing recorded
    y0_bar, (p_bar,) = vjp_fn(cot)
    for g_, w_ in zip((y0_bar, p_bar["a"], p_bar["w"]), want):
        assert _rel(g_, w_) <= 1e-12


def test_torch_second_order_raises_forward_mode_is_given():
    y0, p, _ = _torch_problem(5)
    yN = C.checkpointed(_torch_euler, y0, 10, (p,))
    (ga,) = torch.autograd.grad(yN.sum(), p["a"], create_graph=True)  # first order: fine
    want = torch.autograd.grad(_torch_unrolled(_torch_euler, y0, 10, (p,), 10).sum(), p["a"])
    assert _rel(ga.detach(), want[0]) <= 1e-12
    with pytest.raises(C.DerivativeNotSupportedError, match="second-order"):
        ga.backward()

    def loss(a):
        return C.checkpointed(_torch_euler, y0.detach(), 10, ({"a": a, "w": p["w"]},)).sum()

    a0 = p["a"].detach()
    with pytest.raises(C.DerivativeNotSupportedError, match="second-order"):
        torch.func.grad(torch.func.grad(loss))(a0)
    # forward mode (torch.func.jvp) is given: the steps' own forward mode, against
    # backpropagation through the unrolled steps (the dot-product test, one direction)
    _, jv = torch.func.jvp(loss, (a0,), (torch.ones_like(a0),))
    a1 = a0.clone().requires_grad_()
    (g_unrolled,) = torch.autograd.grad(
        _torch_unrolled(_torch_euler, y0.detach(), 10, ({"a": a1, "w": p["w"]},), 10).sum(), a1)
    assert _rel(jv.detach(), g_unrolled) <= 1e-12
    # dual tensors of torch.autograd.forward_ad: refused, naming torch.func.jvp
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(C.DerivativeNotSupportedError, match=r"torch\.func\.jvp"):
        loss(fwAD.make_dual(a0, torch.ones_like(a0)))


def test_bad_input_raises():
    y0, p, _ = _torch_problem(6)
    with pytest.raises(idf.StructureError, match="return a state like y"):
        C.checkpointed(lambda k, y, a: y[..., :2], y0, 3, (p,))
    with pytest.raises(idf.StructureError, match="checkpoints: expected an int >= 0"):
        C.checkpointed(_torch_euler, y0, 3, (p,), checkpoints=-1)
    with pytest.raises(idf.StructureError, match="leading dimension N"):
        C.checkpointed(_torch_rk4, y0, (torch.zeros(3), torch.zeros(4)), (p,))
    with pytest.raises(idf.StructureError, match="step_vjp="):
        C.checkpointed_vjp(lambda k, y, a: y, np.zeros(3), 3)
    assert issubclass(C.DerivativeNotSupportedError, idf.ImplicitDiffError)


# ---- memory: the peak of live tensors, measured --------------------------------------------------

class _LiveBytes:
    """Peak bytes of the tensors torch operations create inside the block, each counted from
    its creation until its storage is freed (a `TorchDispatchMode`: sees every allocation of
    the forward pass, of autograd's saved tensors and of the backward pass)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        owner = self
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        owner._track(t.untyped_storage())
                owner.peak = max(owner.peak, owner.now)
                return out

        self.mode = Mode()

    def _track(self, storage: Any) -> None:
        key = storage.data_ptr()
        if key and key not in self.live:
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            weakref.finalize(storage, self._free, key)  # the storage's one Python object

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def _cheap_step(k, y, args):
    ha, = args
    return y + ha * torch.sin(y)


def _peak_states(n: int, mode: str, stats: Any = None) -> float:
    y0, p, cot = _torch_problem(7, batch=(32,))
    ha = (0.01 * p["a"]).detach().requires_grad_()
    meter = _LiveBytes()
    with meter.mode:
        if mode == "checkpoint":
            yN = C.checkpointed(_cheap_step, y0, n, (ha,), stats=stats)
        else:
            yN = _torch_unrolled(_cheap_step, y0, n, (ha,), n)
        torch.autograd.grad((yN * cot).sum(), (y0, ha))
    return meter.peak / (y0.numel() * y0.element_size())  # in states


def test_checkpoint_memory_grows_logarithmically():
    # The "must show": peak memory of "checkpoint" at most 2x from 100 to 10,000 steps,
    # measured: every tensor the forward and backward passes create, while it lives.
    s100, s10k = C.CheckpointStats(), C.CheckpointStats()
    small = _peak_states(100, "checkpoint", s100)
    large = _peak_states(10_000, "checkpoint", s10k)
    assert large <= 2 * small, (small, large)
    # the meter sees memory that grows: backprop through the unrolled steps, 100 -> 1,000
    direct_small, direct_large = _peak_states(100, "direct"), _peak_states(1000, "direct")
    assert direct_large >= 5 * direct_small and direct_small >= 2 * small, (
        direct_small, direct_large, small)
    # and the schedule's own count of live checkpoints: ceil(log2 N), 7 -> 14
    assert (s100.peak_live, s10k.peak_live) == (7, 14)


def _odeint_peak_states(n: int) -> tuple[float, Any]:
    from implicitdiff import ode

    g = torch.Generator().manual_seed(3)
    y0 = torch.randn(16, 2, generator=g, dtype=torch.float64, requires_grad=True)
    W = (0.5 * torch.randn(2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    meter = _LiveBytes()
    with meter.mode:
        ys = ode.odeint(lambda t, y, W: torch.tanh(y @ W.T), y0, ts, W, method="rk4",
                        dt0=1.0 / n, max_steps=n + 10, grad="checkpoint")
        grads = torch.autograd.grad(ys[-1].sum(), (y0, W))
    return meter.peak / (y0.numel() * y0.element_size()), grads


def test_odeint_checkpoint_memory_flat_in_steps():
    # Issue 13's target for odeint(grad="checkpoint") itself: the solver's decisions are
    # replayed from checkpointed solver states, nothing is stored per step (a stored step
    # schedule grew 10x from 100 to 1,000 steps). Measured: 260 states at both (16 checkpoint
    # slots, ode.MIN_CHECKPOINTS, up to 2^16 steps; ceil(log2 N) beyond).
    small, g_small = _odeint_peak_states(100)
    large, g_large = _odeint_peak_states(1000)
    assert large <= 1.5 * small, (small, large)
    # the gradients are those of the discretization (RK4 at h and h/10 agree to O(h^4))
    for a, b in zip(g_small, g_large):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# ---- JAX -----------------------------------------------------------------------------------------

def _jax_step(s, y, args):
    (t, dt), (p,) = s, args
    return y + dt * (-p["a"] * jnp.sin(y) + 0.3 * jnp.tanh(y @ p["w"]) * jnp.cos(t))


def _jax_problem(n, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    y0 = jax.random.normal(k1, (4, 3))
    p = {"a": jnp.asarray(1.3), "w": 0.5 * jax.random.normal(k2, (3, 3))}
    cot = jax.random.normal(k3, (4, 3))
    t = jnp.linspace(0.0, 1.0, n + 1)
    return y0, p, cot, (t[:-1], t[1:] - t[:-1])


@pytest.mark.parametrize("n", NS)
def test_jax_gradient_equals_backprop(n):
    y0, p, cot, sched = _jax_problem(n)

    def loss(y, q):
        return jnp.sum(cot * C.checkpointed(_jax_step, y, sched, (q,)))

    def loss_unrolled(y, q):
        body = lambda k, z: _jax_step((sched[0][k], sched[1][k]), z, (q,))  # noqa: E731
        return jnp.sum(cot * jax.lax.fori_loop(0, n, body, y))

    # compiled (the forward and backward passes are one loop each, traced once whatever n),
    # and for one n eagerly
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(y0, p)
    want = jax.jit(jax.grad(loss_unrolled, argnums=(0, 1)))(y0, p)
    for g_, w_ in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert _rel(g_, w_) <= 1e-12
    if n == 7:
        got_eager = jax.grad(loss, argnums=(0, 1))(y0, p)
        for g_, w_ in zip(jax.tree_util.tree_leaves(got_eager), jax.tree_util.tree_leaves(want)):
            assert _rel(g_, w_) <= 1e-12


def _jax_temp_states(n: int, mode: str) -> float:
    def step(k, y, args):
        ha, = args
        return y + ha * jnp.sin(y)

    y0, ha = jnp.ones((32, 3)), jnp.asarray(0.01)
    if mode == "checkpoint":
        loss = lambda y, a: jnp.sum(C.checkpointed(step, y, n, (a,)))  # noqa: E731
    else:
        loss = lambda y, a: jnp.sum(jax.lax.fori_loop(  # noqa: E731
            0, n, lambda k, z: step(k, z, (a,)), y))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(y0, ha).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (y0.size * y0.dtype.itemsize)


def test_jax_compiled_memory_grows_logarithmically():
    # XLA's own memory analysis of the compiled gradient (temporaries, in states)
    small, large = _jax_temp_states(100, "checkpoint"), _jax_temp_states(10_000, "checkpoint")
    assert large <= 2 * small, (small, large)
    direct_small, direct_large = _jax_temp_states(100, "direct"), _jax_temp_states(1000, "direct")
    assert direct_large >= 5 * direct_small and direct_small >= 2 * small


def test_jax_n_steps_traced_under_jit():
    # an adaptive solver's accepted steps: a traced count within a fixed number of rows
    n = 40
    y0, p, cot, (t, dt) = _jax_problem(n, seed=2)

    def loss(y, q, taken):
        dt_ = jnp.where(jnp.arange(n) < taken, dt, jnp.nan)  # rows after it: never stepped
        return jnp.sum(cot * C.checkpointed(_jax_step, y, (t, dt_), (q,), n_steps=taken))

    def loss_unrolled(y, q, taken):
        body = lambda k, z: _jax_step((t[k], dt[k]), z, (q,))  # noqa: E731
        return jnp.sum(cot * jax.lax.fori_loop(0, taken, body, y))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for taken in (0, 13, 40):
        got = grad(y0, p, jnp.asarray(taken))
        want = jax.grad(loss_unrolled, argnums=(0, 1))(y0, p, taken)
        for g_, w_ in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert (not np.any(w_) and not np.any(g_)) or _rel(g_, w_) <= 1e-12


def test_jax_hessian_forward_over_reverse():
    # jax.hessian (jacfwd of jacrev) differentiates the rule's forward and backward loops in
    # forward mode: exact. Reverse over reverse meets lax.while_loop: JAX's own ValueError.
    y0, p, cot, sched = _jax_problem(20, seed=1)

    def loss(fn, a):
        return jnp.sum(cot * fn(y0, {"a": a, "w": p["w"]}))

    ckpt = lambda y, q: C.checkpointed(_jax_step, y, sched, (q,))  # noqa: E731

    def unrolled(y, q):
        body = lambda k, z: _jax_step((sched[0][k], sched[1][k]), z, (q,))  # noqa: E731
        return jax.lax.fori_loop(0, 20, body, y)  # static bounds: a scan, differentiable

    got = jax.jit(jax.hessian(functools.partial(loss, ckpt)))(p["a"])
    want = jax.jit(jax.hessian(functools.partial(loss, unrolled)))(p["a"])
    assert _rel(got, want) <= 1e-12
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        jax.grad(jax.grad(functools.partial(loss, ckpt)))(p["a"])


def test_jax_forward_mode_is_a_clear_error():
    y0, p, _, sched = _jax_problem(5)
    with pytest.raises(C.DerivativeNotSupportedError, match="forward-mode derivative"):
        jax.jvp(lambda y: C.checkpointed(_jax_step, y, sched, (p,)), (y0,), (y0,))
    with pytest.raises(C.DerivativeNotSupportedError, match="forward-mode derivative"):
        jax.jit(lambda y: jax.jvp(lambda z: C.checkpointed(_jax_step, z, sched, (p,)),
                                  (y,), (y,)))(y0)


# ---- NumPy: the explicit vjp with a hand-written step vjp ----------------------------------------

def test_numpy_reference_against_finite_differences():
    n, h = 50, 0.02

    def step(k, y, args):
        a, = args
        return y + h * (-a * np.sin(y))

    def step_vjp(k, y, args, ybar):
        a, = args
        return ybar * (1.0 - h * a * np.cos(y)), (np.sum(ybar * (-h * np.sin(y))),)

    rng = np.random.default_rng(0)
    y0, a, cot = rng.standard_normal((3, 4)), np.float64(0.7), rng.standard_normal((3, 4))
    a = np.asarray(a)
    stats = C.CheckpointStats()
    yN, vjp_fn = C.checkpointed_vjp(step, y0, n, (a,), step_vjp=step_vjp, stats=stats)
    y0_bar, (a_bar,) = vjp_fn(cot)

    def loss(y, a_):
        return float(np.sum(cot * _np_unrolled(step, y, (a_,), n)))

    eps = 1e-6
    d = rng.standard_normal((3, 4))
    fd_y = (loss(y0 + eps * d, a) - loss(y0 - eps * d, a)) / (2 * eps)
    fd_a = (loss(y0, a + eps) - loss(y0, a - eps)) / (2 * eps)
    assert abs(np.sum(y0_bar * d) - fd_y) <= 1e-8 * max(1.0, abs(fd_y))
    assert abs(a_bar - fd_a) <= 1e-8 * max(1.0, abs(fd_a))
    assert np.array_equal(yN, _np_unrolled(step, y0, (a,), n))
    assert stats.vjp_steps == n and C.checkpointed(step, y0, n, (a,)).shape == y0.shape


def _np_unrolled(step, y, args, n):
    for k in range(n):
        y = step(k, y, args)
    return y
