"""`idf.qp.solve_qp`: the forward solution and its derivatives in every framework, against
independent oracles (tests/qp_oracles.py: QPs with a known solution and active set, the closed-form
active-set KKT derivative; tests/oracles.py: central finite differences in a random direction).

Conventions fixed here:
- Q enters the QP symmetrically, so only the symmetric part of a gradient with respect to Q is
  determined by the QP. The derivative checks compare that part (equivalently: directions dQ are
  symmetric, and finite differences perturb Q symmetrically). One test,
  `test_grad_Q_convention_symmetric`, pins solve_qp's documented convention (only (Q + Qᵀ)/2
  enters, so the gradient is the symmetric sym(−u₁xᵀ), not −u₁xᵀ).
- NumPy inputs are differentiated through `idf.qp.qp_function` (the decorated solver behind
  solve_qp; idf.vjp/jvp with NumPy arrays differentiate decorated solvers, not compositions).
- The multiplier convention is the spec's: Qx + q + Aᵀy + Gᵀz = 0, z ≥ 0.
- Tolerances: the closed form (rel ≤ 1e-8, float64), finite differences (rel ≤ 1e-6: a fourth-order
  stencil with step 1e-3 on a solution polished to rounding), float32 (rel ≤ 1e-4).
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import central_fd
from qp_oracles import (
    NAMES,
    KnownQP,
    active_set_solve,
    kkt_jvp,
    kkt_vjp,
    make_qp,
    random_directions,
    rel,
    stack,
    sym,
)

import implicitdiff as idf

qp = pytest.importorskip("implicitdiff.qp")

TOL = 1e-8      # against the closed form, float64
FD_TOL = 1e-6   # against central finite differences
FWS = ["numpy", "jax", "torch"]

# (name, n, p, m, strongly active rows, rank of Q or None for full rank)
CASES = [
    ("eq+ineq", 5, 1, 4, 2, None),
    ("ineq", 4, 0, 5, 3, None),
    ("eq", 4, 2, 0, 0, None),
    ("unconstrained", 3, 0, 0, 0, None),
    ("psd", 5, 1, 4, 2, 3),
    ("lp", 3, 1, 4, 2, 0),
]
CASE_IDS = [c[0] for c in CASES]
# JAX compiles its eager ops per shape (seconds each): it runs the cases of distinct structure
# (equality + inequality, inequality only, equality only); NumPy and PyTorch run them all.
JAX_CASES = ("eq+ineq", "ineq", "eq")
FW_CASES = [pytest.param(fw, c, id=f"{c[0]}-{fw}") for c in CASES for fw in FWS
            if fw != "jax" or c[0] in JAX_CASES]


def case(name_or_tuple, seed=0) -> KnownQP:
    c = name_or_tuple if isinstance(name_or_tuple, tuple) else \
        next(c for c in CASES if c[0] == name_or_tuple)
    _, n, p, m, k, rank = c
    return make_qp(np.random.default_rng(seed), n, p, m, k, rank=rank)


# ---- framework plumbing (the framework follows the arrays) --------------------------------------

def fw_module(fw):
    """The framework's array module, or skip."""
    if fw == "jax":
        jax = pytest.importorskip("jax")
        pytest.importorskip("implicitdiff_jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return jnp
    if fw == "torch":
        torch = pytest.importorskip("torch")
        pytest.importorskip("implicitdiff_torch")
        return torch
    return np


def to_fw(fw, a):
    if a is None:
        return None
    if fw == "jax":
        return fw_module("jax").asarray(np.array(a))
    if fw == "torch":
        return fw_module("torch").as_tensor(np.array(a))
    return np.array(a)


def to_np(a):
    if a is None:
        return None
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def qp_args(P: KnownQP) -> tuple:
    """(Q, q, A, b, G, h) with None for an absent pair."""
    return (P.Q, P.q, P.A if P.p else None, P.b if P.p else None,
            P.G if P.m else None, P.h if P.m else None)


def solve(fw, args, **kw):
    return qp.solve_qp(*(to_fw(fw, a) for a in args), **kw)


def sol_np(sol) -> tuple:
    return to_np(sol.x), to_np(sol.y), to_np(sol.z)


def _rebuild(vals, present):
    it = iter(vals)
    return [next(it) if ok else None for ok in present]


def fw_grad(fw, args, cx, cy, cz, *, jit=True, **kw) -> list:
    """The gradient (NumPy arrays, None for absent inputs) of Σ⟨cx, x⟩ + ⟨cy, y⟩ + ⟨cz, z⟩.
    JAX: under jax.jit unless `jit=False` (test_jax_grad_and_jvp_eager covers the eager path)."""
    present = [a is not None for a in args]
    vals = [a for a in args if a is not None]
    p = args[2] is not None
    m = args[4] is not None
    if fw == "numpy":
        full, batch = _numpy_full(args)
        f = qp.qp_function(batch_dims=len(batch), **kw)
        (w, _), vjp_fn = idf.vjp(f, *full)
        cot = (np.asarray(cx, float), np.asarray(cy, float) if p else np.zeros(w[1].shape),
               np.asarray(cz, float) if m else np.zeros(w[2].shape), np.zeros(w[3].shape))
        gs = vjp_fn(cot)
        return [to_np(g) if a is not None else None for g, a in zip(gs, args)]
    if fw == "jax":
        jnp = fw_module("jax")
        g = _jax_transforms(tuple(present), tuple(sorted(kw.items())), jit)[0]
        gs = g(tuple(jnp.asarray(v) for v in vals), jnp.asarray(cx),
               jnp.asarray(cy) if p else None, jnp.asarray(cz) if m else None)
        return _rebuild([to_np(x) for x in gs], present)
    torch = fw_module("torch")
    ts = [torch.as_tensor(np.array(v)).requires_grad_(True) for v in vals]
    s = qp.solve_qp(*_rebuild(ts, present), full_output=True, **kw)
    loss = (torch.as_tensor(cx) * s.x).sum()
    if p:
        loss = loss + (torch.as_tensor(cy) * s.y).sum()
    if m:
        loss = loss + (torch.as_tensor(cz) * s.z).sum()
    gs = torch.autograd.grad(loss, ts, allow_unused=True)
    return _rebuild([np.zeros(np.shape(v)) if g is None else to_np(g) for g, v in zip(gs, vals)],
                    present)


@functools.cache
def _jax_transforms(present: tuple, kw: tuple, jit: bool):
    """(grad, jvp) of solve_qp for one pattern of present inputs, built once so that jax.jit's
    cache (by shape) is shared by every test: a fresh closure would compile again each time."""
    jax = pytest.importorskip("jax")
    jnp = fw_module("jax")
    opts = dict(kw)

    def loss(vals, cx, cy, cz):
        s = qp.solve_qp(*_rebuild(vals, present), full_output=True, **opts)
        out = jnp.sum(cx * s.x)
        if cy is not None:
            out = out + jnp.sum(cy * s.y)
        if cz is not None:
            out = out + jnp.sum(cz * s.z)
        return out

    def f(*v):
        s = qp.solve_qp(*_rebuild(v, present), full_output=True, **opts)
        return s.x, s.y, s.z

    def jv(vals, tans):
        return jax.jvp(f, vals, tans)[1]

    g = jax.grad(loss)
    return (jax.jit(g), jax.jit(jv)) if jit else (g, jv)


def _numpy_full(args):
    """NumPy inputs for `qp.qp_function` (every input required: zero-row A, b, G, h for an
    absent pair) and the broadcast batch shape."""
    Q, q, A, b, G, h = args
    n = np.shape(q)[-1]
    A, b = (np.zeros((0, n)), np.zeros(0)) if A is None else (A, b)
    G, h = (np.zeros((0, n)), np.zeros(0)) if G is None else (G, h)
    full = tuple(np.asarray(a, dtype=np.float64) for a in (Q, q, A, b, G, h))
    batch = np.broadcast_shapes(np.shape(Q)[:-2], np.shape(q)[:-1], np.shape(A)[:-2],
                                np.shape(b)[:-1], np.shape(G)[:-2], np.shape(h)[:-1])
    return full, batch


def fw_jvp(fw, args, tangents, *, jit=True, **kw) -> tuple:
    """(dx, dy, dz) along the tangents (NumPy arrays; None in the tangents where args is None).
    JAX: under jax.jit unless `jit=False`."""
    present = [a is not None for a in args]
    vals = [a for a in args if a is not None]
    tans = [t for a, t in zip(args, tangents) if a is not None]
    if fw == "numpy":
        full, batch = _numpy_full(args)
        tfull = tuple(np.zeros_like(f_) if a is None else np.asarray(t, dtype=np.float64)
                      for f_, a, t in zip(full, args, tangents))
        f = qp.qp_function(batch_dims=len(batch), **kw)
        _, (dot, _) = idf.jvp(f, full, tfull)
        return to_np(dot[0]), to_np(dot[1]), to_np(dot[2])
    if fw == "jax":
        jnp = fw_module("jax")
        jv = _jax_transforms(tuple(present), tuple(sorted(kw.items())), jit)[1]
        dot = jv(tuple(jnp.asarray(v) for v in vals), tuple(jnp.asarray(t) for t in tans))
        return tuple(to_np(d) for d in dot)
    torch = fw_module("torch")

    def f(*v):
        s = qp.solve_qp(*_rebuild(v, present), full_output=True, **kw)
        return s.x, s.y, s.z

    _, dot = torch.func.jvp(f, tuple(torch.as_tensor(np.array(v)) for v in vals),
                            tuple(torch.as_tensor(np.array(t)) for t in tans))
    return tuple(to_np(d) for d in dot)


def cotangents(rng, P: KnownQP):
    return (rng.standard_normal(P.x.shape), rng.standard_normal(P.y.shape),
            rng.standard_normal(P.z.shape))


def check_grads(got: list, want: dict, args, tol=TOL, what=""):
    """Per input: the symmetric part for Q, the whole array otherwise."""
    for name, g, a in zip(NAMES, got, args):
        if a is None:
            continue
        w = want[name]
        if name == "Q":
            g, w = sym(g), sym(w)
        assert g is not None and np.shape(g) == np.shape(w), (what, name, np.shape(g))
        assert np.all(np.isfinite(g)), (what, name, g)
        e = rel(g, w)
        assert e <= tol, \
            f"{what} gradient of {name}: rel err {e:.3e} > {tol:g}\n got {g}\n want {w}"


def check_tangents(got, want, P: KnownQP, tol=TOL, what=""):
    for name, g, w, size in zip("xyz", got, want, (P.n, P.p, P.m)):
        if size == 0:
            continue
        e = rel(g, w)
        assert e <= tol, f"{what} d{name}: rel err {e:.3e} > {tol:g}\n got {g}\n want {w}"


def batch_oracle_grads(Ps: list[KnownQP], cx, cy, cz, shared_Q=False) -> dict:
    gs = [kkt_vjp(P, cx[i], cy[i], cz[i]) for i, P in enumerate(Ps)]
    out = {k: np.stack([g[k] for g in gs]) for k in NAMES}
    if shared_Q:
        out["Q"] = out["Q"].sum(0)
    return out


# ---- the oracles themselves ---------------------------------------------------------------------

@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_oracle_matches_finite_differences_and_is_its_own_transpose(c):
    """The closed form is the derivative of the exact active-set solution (FD), its VJP the
    transpose of its JVP, and (x*, y*, z*) satisfies the KKT conditions."""
    rng = np.random.default_rng(1)
    P = case(c)
    assert np.allclose(P.Q @ P.x + P.q + P.A.T @ P.y + P.G.T @ P.z, 0, atol=1e-12)
    assert np.all(P.z >= 0) and np.all(P.G @ P.x <= P.h + 1e-12)
    assert np.allclose(P.A @ P.x, P.b) and np.allclose(P.z * (P.h - P.G @ P.x), 0, atol=1e-12)
    d = random_directions(rng, P)

    def f(*args):
        return np.concatenate(active_set_solve(*args, P.active))

    fd = central_fd(f, P.inputs(), d, h=1e-4)
    assert rel(fd, np.concatenate(kkt_jvp(P, *d))) <= 1e-8
    c_ = cotangents(rng, P)
    g = kkt_vjp(P, *c_)
    d2 = random_directions(rng, P, symmetric_Q=False)
    lhs = sum(float(np.sum(g[k] * dd)) for k, dd in zip(NAMES, d2))
    rhs = sum(float(ci @ di) for ci, di in zip(c_, kkt_jvp(P, *d2)))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(rhs))


# ---- forward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fw,c", FW_CASES)
def test_forward_known_active_set(fw, c):
    fw_module(fw)
    P = case(c)
    sol = solve(fw, qp_args(P), full_output=True)
    x, y, z = sol_np(sol)
    assert x.dtype == np.float64 and x.shape == (P.n,)
    assert rel(x, P.x) <= TOL, (x, P.x)
    if P.p:
        assert rel(y, P.y) <= TOL, (y, P.y)
    if P.m:
        assert rel(z, P.z) <= TOL, (z, P.z)
        assert np.all(z >= 0)
        assert np.array_equal(np.asarray(sol.stats.active), P.active), sol.stats.active
    st_ = sol.stats
    assert int(np.asarray(st_.status)) == qp.SOLVED
    assert not bool(np.asarray(st_.degenerate))
    assert int(np.asarray(st_.iterations)) >= 0
    for f in ("primal_residual", "dual_residual", "gap"):
        assert np.isfinite(np.asarray(getattr(st_, f))).all()
    assert isinstance(st_.summary(), str) and st_.summary()
    # x alone without full_output
    x2 = to_np(solve(fw, qp_args(P)))
    assert rel(x2, P.x) <= TOL


def test_status_codes():
    assert (qp.SOLVED, qp.PRIMAL_INFEASIBLE, qp.DUAL_INFEASIBLE, qp.MAX_ITER) == (0, 1, 2, 3)


@pytest.mark.parametrize("fw", FWS)
def test_forward_batched_broadcast(fw):
    """Q shared (n, n) with the rest batched (B, ...), and A/G shared with q/b/h batched."""
    fw_module(fw)
    rng = np.random.default_rng(3)
    Q = make_qp(rng, 5, 1, 4, 1).Q
    Ps = [make_qp(rng, 5, 1, 4, k, Q=Q) for k in (0, 1, 2, 1)]
    B = stack(Ps)
    sol = solve(fw, (Q, B.q, B.A, B.b, B.G, B.h), full_output=True)
    assert to_np(sol.x).shape == (4, 5)
    assert rel(sol_np(sol), (B.x, B.y, B.z)) <= TOL
    assert np.asarray(sol.stats.status).shape == (4,)
    assert np.array_equal(np.asarray(sol.stats.active), B.active)
    # shared A, G, b: only q and h batched (h broadcasting against G's rows)
    P0 = Ps[0]
    qs = np.stack([P0.q + 0.01 * rng.standard_normal(5) for _ in range(4)])
    sol = solve(fw, (P0.Q, qs, P0.A, P0.b, P0.G, P0.h), full_output=True)
    for i in range(4):
        x = active_set_solve(P0.Q, qs[i], P0.A, P0.b, P0.G, P0.h, P0.active)[0]
        assert rel(to_np(sol.x)[i], x) <= TOL


# ---- derivatives against the closed form --------------------------------------------------------

@pytest.mark.parametrize("fw,c", FW_CASES)
def test_grad_matches_closed_form(fw, c):
    fw_module(fw)
    rng = np.random.default_rng(4)
    P = case(c)
    cx, cy, cz = cotangents(rng, P)
    got = fw_grad(fw, qp_args(P), cx, cy, cz)
    check_grads(got, kkt_vjp(P, cx, cy, cz), qp_args(P), what=fw)


@pytest.mark.parametrize("fw,c", FW_CASES)
def test_jvp_matches_closed_form(fw, c):
    fw_module(fw)
    rng = np.random.default_rng(5)
    P = case(c)
    d = random_directions(rng, P)
    got = fw_jvp(fw, qp_args(P), d)
    check_tangents(got, kkt_jvp(P, *d), P, what=fw)


@pytest.mark.parametrize("fw", FWS)
def test_jvp_each_input_separately(fw):
    """One input at a time (the others' tangents zero): each block of the derivative."""
    fw_module(fw)
    rng = np.random.default_rng(6)
    P = case("eq+ineq")
    d = random_directions(rng, P)
    for i, name in enumerate(NAMES):
        di = tuple(t if j == i else np.zeros_like(t) for j, t in enumerate(d))
        check_tangents(fw_jvp(fw, qp_args(P), di), kkt_jvp(P, *di), P, what=f"{fw} d{name}")


@pytest.mark.parametrize("fw", FWS)
def test_grad_Q_convention_symmetric(fw):
    """The documented convention (solve_qp's docstring): only (Q + Qᵀ)/2 enters the objective,
    so the gradient of Q is symmetric: sym(−u₁xᵀ), the whole matrix, not just its symmetric
    part."""
    fw_module(fw)
    rng = np.random.default_rng(7)
    P = case("eq+ineq")
    cx, cy, cz = cotangents(rng, P)
    got = fw_grad(fw, qp_args(P), cx, cy, cz)[0]
    want = sym(kkt_vjp(P, cx, cy, cz)["Q"])
    assert rel(got, want) <= TOL, (got, want, "symmetric part err", rel(sym(got), want))


def test_grad_agrees_across_frameworks():
    """numpy, jax and torch give the same gradient on the same problem (where installed)."""
    rng = np.random.default_rng(8)
    P = case("eq+ineq")
    cx, cy, cz = cotangents(rng, P)
    ref = fw_grad("numpy", qp_args(P), cx, cy, cz)
    for fw in ("jax", "torch"):
        try:
            fw_module(fw)
        except pytest.skip.Exception:
            continue
        got = fw_grad(fw, qp_args(P), cx, cy, cz)
        for name, g, r in zip(NAMES, got, ref):
            assert rel(sym(g) if name == "Q" else g, sym(r) if name == "Q" else r) <= 1e-10, \
                (fw, name)


# ---- JAX transforms ----------------------------------------------------------------------------

def test_jax_grad_and_jvp_eager():
    """jax.grad and jax.jvp without jit (the other JAX tests jit them)."""
    fw_module("jax")
    rng = np.random.default_rng(9)
    P = case("eq+ineq")
    cx, cy, cz = cotangents(rng, P)
    got = fw_grad("jax", qp_args(P), cx, cy, cz, jit=False)
    check_grads(got, kkt_vjp(P, cx, cy, cz), qp_args(P), what="eager jax.grad")
    d = random_directions(rng, P)
    check_tangents(fw_jvp("jax", qp_args(P), d, jit=False), kkt_jvp(P, *d), P, what="eager jvp")


def _oracle_jac(P: KnownQP, i: int) -> np.ndarray:
    """∂x/∂(input i), (n, *input.shape), column by column from the closed-form JVP (symmetric
    basis directions for Q are not used: Q is skipped by the callers)."""
    a = P.inputs()[i]
    cols = []
    for j in range(a.size):
        d = [np.zeros_like(t) for t in P.inputs()]
        d[i].flat[j] = 1.0
        cols.append(kkt_jvp(P, *d)[0])
    return np.stack(cols, -1).reshape(P.n, *a.shape)


def _oracle_jac_Q(P: KnownQP) -> np.ndarray:
    """∂x/∂Q entry by entry for the map Q ↦ x*((Q + Qᵀ)/2) (only the symmetric part enters):
    the column of Q_ij is the closed-form JVP along sym(E_ij)."""
    cols = []
    for j in range(P.n * P.n):
        E = np.zeros(P.n * P.n)
        E[j] = 1.0
        d = [sym(E.reshape(P.n, P.n))] + [np.zeros_like(t) for t in P.inputs()[1:]]
        cols.append(kkt_jvp(P, *d)[0])
    return np.stack(cols, -1).reshape(P.n, P.n, P.n)


@pytest.mark.parametrize("argnum", [0, 1, 4, 5], ids=["Q", "q", "G", "h"])
def test_numpy_jacobian(argnum):
    """idf.jacobian of idf.qp.qp_function (the NumPy route the docstring gives) against the
    closed form; the output is the (x, y, z, ok) tuple, x is compared."""
    P = case("eq+ineq")
    J = idf.jacobian(qp.qp_function(), argnums=argnum)(*P.inputs())
    Jx = J[0] if isinstance(J, (tuple, list)) else J
    Jx = Jx[0] if isinstance(Jx, (tuple, list)) else Jx
    want = _oracle_jac_Q(P) if argnum == 0 else _oracle_jac(P, argnum)
    assert rel(to_np(Jx), want) <= TOL


def test_jax_jacfwd_jacrev_and_jit():
    jax = pytest.importorskip("jax")
    jnp = fw_module("jax")
    P = case("eq+ineq")
    Q, q, A, b, G, h = (jnp.asarray(a) for a in P.inputs())
    Jq, Jh = jax.jit(jax.jacfwd(lambda q_, h_: qp.solve_qp(Q, q_, A, b, G, h_),
                                argnums=(0, 1)))(q, h)
    assert rel(to_np(Jq), _oracle_jac(P, 1)) <= TOL
    assert rel(to_np(Jh), _oracle_jac(P, 5)) <= TOL
    JA, JG = jax.jit(jax.jacrev(lambda A_, G_: qp.solve_qp(Q, q, A_, b, G_, h),
                                argnums=(0, 1)))(A, G)
    assert rel(to_np(JA), _oracle_jac(P, 2)) <= TOL
    assert rel(to_np(JG), _oracle_jac(P, 4)) <= TOL
    # a jitted forward with full_output: stats are JAX arrays there
    sol = jax.jit(lambda *a: qp.solve_qp(*a, full_output=True))(Q, q, A, b, G, h)
    assert rel(to_np(sol.x), P.x) <= TOL and rel(to_np(sol.z), P.z) <= TOL
    assert int(sol.stats.status) == qp.SOLVED


def test_jax_vmap_forward_and_grad():
    jax = pytest.importorskip("jax")
    jnp = fw_module("jax")
    rng = np.random.default_rng(10)
    Ps, _ = _batch(rng, False)
    B = stack(Ps)
    args = tuple(jnp.asarray(a) for a in B.inputs())
    xs = jax.vmap(lambda *a: qp.solve_qp(*a))(*args)
    assert rel(to_np(xs), B.x) <= TOL
    cx, cy, cz = (rng.standard_normal(a.shape) for a in (B.x, B.y, B.z))

    def loss(Q, q, A, b, G, h, cx, cy, cz):
        s = qp.solve_qp(Q, q, A, b, G, h, full_output=True)
        return jnp.sum(cx * s.x) + jnp.sum(cy * s.y) + jnp.sum(cz * s.z)

    g = jax.jit(jax.vmap(jax.grad(loss, argnums=tuple(range(6)))))(
        *args, *map(jnp.asarray, (cx, cy, cz)))
    want = batch_oracle_grads(Ps, cx, cy, cz)
    check_grads([to_np(t) for t in g], want, B.inputs(), what="vmap(grad)")


# ---- PyTorch transforms ------------------------------------------------------------------------

def test_torch_forward_ad_matches_closed_form():
    torch = fw_module("torch")
    import torch.autograd.forward_ad as fwAD

    rng = np.random.default_rng(11)
    P = case("eq+ineq")
    d = random_directions(rng, P)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(torch.as_tensor(np.array(a)), torch.as_tensor(np.array(t)))
                 for a, t in zip(P.inputs(), d)]
        s = qp.solve_qp(*duals, full_output=True)
        got = tuple(to_np(fwAD.unpack_dual(v).tangent) for v in (s.x, s.y, s.z))
    check_tangents(got, kkt_jvp(P, *d), P, what="forward_ad")


def test_torch_func_grad_and_vmap():
    torch = fw_module("torch")
    rng = np.random.default_rng(12)
    Ps, _ = _batch(rng, False)
    B = stack(Ps)
    cx = rng.standard_normal(B.x.shape)

    def loss(Q, q, A, b, G, h, c):
        return (qp.solve_qp(Q, q, A, b, G, h) * c).sum()

    ts = [torch.as_tensor(np.array(a)) for a in B.inputs()]
    g = torch.func.vmap(torch.func.grad(loss, argnums=tuple(range(6))))(*ts, torch.as_tensor(cx))
    want = batch_oracle_grads(Ps, cx, np.zeros(B.y.shape), np.zeros(B.z.shape))
    check_grads([to_np(t) for t in g], want, B.inputs(), what="torch.func.vmap(grad)")


# ---- batched problems, finite differences ----------------------------------------------------

def _batch(rng, shared_Q: bool, B=4):
    Q = make_qp(rng, 5, 1, 4, 1).Q if shared_Q else None
    Ps = [make_qp(rng, 5, 1, 4, k, Q=Q) for k in (0, 1, 2, 1)[:B]]
    S = stack(Ps)
    return Ps, ((Q if shared_Q else S.Q), S.q, S.A, S.b, S.G, S.h)


@pytest.mark.parametrize("fw", FWS)
@pytest.mark.parametrize("shared_Q", [False, True], ids=["per-sample-Q", "shared-Q"])
def test_batched_grad_matches_closed_form(fw, shared_Q):
    fw_module(fw)
    rng = np.random.default_rng(13)
    Ps, args = _batch(rng, shared_Q)
    S = stack(Ps)
    cx, cy, cz = cotangents(rng, S)
    got = fw_grad(fw, args, cx, cy, cz)
    check_grads(got, batch_oracle_grads(Ps, cx, cy, cz, shared_Q=shared_Q), args, what=fw)
    d = [rng.standard_normal(np.shape(a)) for a in args]
    d[0] = sym(d[0])
    got_t = fw_jvp(fw, args, d)
    want_t = [np.stack(t) for t in zip(*[
        kkt_jvp(P, *((t if (j == 0 and shared_Q) else t[i]) for j, t in enumerate(d)))
        for i, P in enumerate(Ps)])]
    check_tangents(got_t, want_t, Ps[0], what=f"{fw} batched jvp")


def _fd_check(fw, args, rng, which=None):
    """Central FD of (x, y, z) of the library's own forward along a random direction (Q
    symmetric) in the inputs `which` (all by default) against the JVP and the gradient."""
    which = range(6) if which is None else which
    d = [rng.standard_normal(np.shape(a)) if (a is not None and i in which) else
         (np.zeros(np.shape(a)) if a is not None else None) for i, a in enumerate(args)]
    d[0] = sym(d[0])
    present = [a is not None for a in args]

    def f(*v):
        s = qp.solve_qp(*_rebuild(v, present), full_output=True)
        return np.concatenate([np.ravel(s.x), np.ravel(s.y), np.ravel(s.z)])

    vals = tuple(a for a in args if a is not None)
    fd = central_fd(f, vals, tuple(t for t in d if t is not None))
    got = fw_jvp(fw, args, d)
    jv = np.concatenate([np.ravel(g) for g in got])
    e = rel(jv, fd)
    assert e <= FD_TOL, f"{fw} JVP vs FD (inputs {list(which)}): rel err {e:.3e}"
    # ⟨grad, d⟩ for a random cotangent
    c = rng.standard_normal(fd.shape)
    n_x = np.size(args[1])
    n_y = 0 if args[2] is None else np.size(args[3])
    cx = c[:n_x].reshape(np.shape(args[1]))
    cy = c[n_x:n_x + n_y].reshape(np.shape(args[3])) if n_y else None
    cz = c[n_x + n_y:].reshape(np.shape(args[5])) if args[4] is not None else None
    g = fw_grad(fw, args, cx, cy, cz)
    lhs = sum(float(np.sum(gi * di)) for gi, di in zip(g, d) if gi is not None)
    assert abs(lhs - c @ fd) <= FD_TOL * max(1.0, float(np.linalg.norm(c) * np.linalg.norm(fd))), \
        (fw, lhs, c @ fd)


@pytest.mark.parametrize("fw", FWS)
@pytest.mark.parametrize("which", [(i,) for i in range(6)] + [tuple(range(6))],
                         ids=[*NAMES, "all"])
def test_finite_differences_each_input(fw, which):
    fw_module(fw)
    rng = np.random.default_rng(14)
    P = case("eq+ineq")
    _fd_check(fw, qp_args(P), rng, which)


@pytest.mark.parametrize("fw", FWS)
@pytest.mark.parametrize("shared_Q", [False, True], ids=["per-sample-Q", "shared-Q"])
def test_finite_differences_batched(fw, shared_Q):
    fw_module(fw)
    rng = np.random.default_rng(15)
    _, args = _batch(rng, shared_Q)
    _fd_check(fw, args, rng)


# ---- second order -----------------------------------------------------------------------------

def test_torch_gradcheck_gradgradcheck():
    torch = fw_module("torch")
    P = make_qp(np.random.default_rng(16), 3, 1, 3, 1)

    def f(Qr, q, A, b, G, h):
        s = qp.solve_qp((Qr + Qr.mT) / 2, q, A, b, G, h, full_output=True)
        return s.x, s.y, s.z

    ts = tuple(torch.as_tensor(np.array(a)).requires_grad_(True) for a in P.inputs())
    assert torch.autograd.gradcheck(f, ts, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradgradcheck(f, ts, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_jax_hessian_closed_form_and_fd():
    """jax.hessian (under jit) of c·x + ½‖x‖² in (t, q), Q(t) = Q + t·Q1 (Q1 symmetric): the
    q-block against the closed form Jqᵀ Jq (x is affine in q on the active set), the t-column (a
    genuinely second-order term: x depends nonlinearly on Q) against central differences of the
    jitted gradient, and the gradient in t against the closed form."""
    jax = pytest.importorskip("jax")
    jnp = fw_module("jax")
    rng = np.random.default_rng(18)
    P = case("eq+ineq")
    Q1 = jnp.asarray(sym(rng.standard_normal((P.n, P.n))))
    Q, q, A, b, G, h = (jnp.asarray(a) for a in P.inputs())
    c = jnp.asarray(rng.standard_normal(P.n))

    def loss(t, q_):
        x = qp.solve_qp(Q + t * Q1, q_, A, b, G, h)
        return jnp.sum(c * x) + 0.5 * jnp.sum(x ** 2)

    t0 = jnp.asarray(0.0)
    H = jax.jit(jax.hessian(loss, argnums=(0, 1)))(t0, q)
    Jq = _oracle_jac(P, 1)
    assert rel(to_np(H[1][1]), Jq.T @ Jq) <= TOL
    gr = jax.jit(jax.grad(loss, argnums=(0, 1)))
    eps = 1e-4
    gp, gm = gr(t0 + eps, q), gr(t0 - eps, q)
    fd_tt = (float(gp[0]) - float(gm[0])) / (2 * eps)
    fd_qt = (to_np(gp[1]) - to_np(gm[1])) / (2 * eps)
    assert abs(float(H[0][0]) - fd_tt) <= FD_TOL * max(1.0, abs(fd_tt)), (float(H[0][0]), fd_tt)
    assert rel(to_np(H[1][0]), fd_qt) <= FD_TOL
    assert rel(to_np(H[0][1]), fd_qt) <= FD_TOL            # symmetry of the Hessian
    g_t = float(gr(t0, q)[0])
    dx = kkt_jvp(P, to_np(Q1), *(np.zeros_like(a) for a in P.inputs()[1:]))[0]
    assert abs(g_t - (to_np(c) + P.x) @ dx) <= TOL * max(1.0, abs(g_t))


# ---- failures: infeasible, unbounded ---------------------------------------------------------

def _with_box_rows(P: KnownQP, rng) -> KnownQP:
    """P with two inactive rows e₀ᵀx ≤ x₀* + s, −e₀ᵀx ≤ −x₀* + s prepended (slack s ≥ 0.1)."""
    n = P.n
    rows = np.zeros((2, n))
    rows[0, 0], rows[1, 0] = 1.0, -1.0
    s = rng.uniform(0.1, 1.0, 2)
    h = np.array([P.x[0] + s[0], -P.x[0] + s[1]])
    return KnownQP(P.Q, P.q, P.A, P.b, np.vstack([rows, P.G]), np.concatenate([h, P.h]), P.x,
                   P.y, np.concatenate([np.zeros(2), P.z]),
                   np.concatenate([np.zeros(2, bool), P.active]),
                   np.concatenate([np.zeros(2, bool), P.weak]))


def _infeasible_batch(B=256, every=10, seed=19, shared_Q=True):
    """B QPs (n=3, p=1, m=4); samples i % every == 3 infeasible (x₀ ≤ −1 and −x₀ ≤ −1)."""
    rng = np.random.default_rng(seed)
    Q = make_qp(rng, 3, 1, 2, 1).Q if shared_Q else None
    Ps = [_with_box_rows(make_qp(rng, 3, 1, 2, int(rng.integers(0, 3)), Q=Q), rng)
          for _ in range(B)]
    S = stack(Ps)
    bad = np.arange(B) % every == 3
    h = S.h.copy()
    h[bad, 0] = -1.0
    h[bad, 1] = -1.0
    return Ps, (Q if shared_Q else S.Q, S.q, S.A, S.b, S.G, h), bad


@pytest.mark.parametrize("fw", FWS)
def test_infeasible_batch_nan(fw):
    fw_module(fw)
    Ps, args, bad = _infeasible_batch()
    sol = solve(fw, args, full_output=True, on_failure="nan")
    x, y, z = sol_np(sol)
    status = np.asarray(sol.stats.status)
    assert np.all(status[bad] == qp.PRIMAL_INFEASIBLE), status[bad]
    assert np.all(status[~bad] == qp.SOLVED), np.flatnonzero(status[~bad] != qp.SOLVED)
    assert np.all(np.isnan(x[bad])) and np.all(np.isnan(y[bad])) and np.all(np.isnan(z[bad]))
    good = np.flatnonzero(~bad)
    S = stack([Ps[i] for i in good])
    assert rel(x[good], S.x) <= TOL and rel(y[good], S.y) <= TOL and rel(z[good], S.z) <= TOL
    assert "1" in sol.stats.summary() or "infeasible" in sol.stats.summary().lower()


def test_infeasible_batch_equals_individual_solves():
    _, args, bad = _infeasible_batch()
    xb = qp.solve_qp(*args, on_failure="nan")
    for i in np.flatnonzero(~bad)[::4]:
        xi = qp.solve_qp(*(a if (j == 0 and a.ndim == 2) else a[i] for j, a in enumerate(args)))
        assert rel(xb[i], xi) <= TOL, i


@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_infeasible_batch_masked_gradients(fw):
    """A loss masked to the finite samples: the feasible samples' gradients are exact, the
    shared Q's gradient finite (the sum of the feasible samples'), the failed samples' zero."""
    mod = fw_module(fw)
    Ps, args, bad = _infeasible_batch()
    rng = np.random.default_rng(20)
    cx = rng.standard_normal((len(Ps), 3))
    good = np.flatnonzero(~bad)
    if fw == "torch":
        ts = [mod.as_tensor(np.array(a)).requires_grad_(True) for a in args]
        x = qp.solve_qp(*ts, on_failure="nan")
        ok = mod.isfinite(x)
        loss = mod.where(ok, x * mod.as_tensor(cx), mod.zeros_like(x)).sum()
        gs = [to_np(g) for g in mod.autograd.grad(loss, ts)]
    else:
        jax = pytest.importorskip("jax")

        def loss(*a):
            x = qp.solve_qp(*a, on_failure="nan")
            return mod.sum(mod.where(mod.isfinite(x), x * cx, 0.0))

        g = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
        gs = [to_np(v) for v in g(*map(mod.asarray, args))]
    for name, g in zip(NAMES, gs):
        assert np.all(np.isfinite(g)), (fw, name, np.argwhere(~np.isfinite(g))[:5])
    want = [kkt_vjp(Ps[i], cx[i], np.zeros(1), np.zeros(4)) for i in good]
    for k, name in enumerate(NAMES[1:], start=1):
        w = np.stack([wi[name] for wi in want])
        assert rel(gs[k][good], w) <= TOL, (fw, name)
        assert np.all(gs[k][bad] == 0), (fw, name)
    wQ = sum(sym(wi["Q"]) for wi in want)
    assert rel(sym(gs[0]), wQ) <= TOL, (fw, "shared Q")
    # the same as each sample's own solve (a few samples), relative to the sample's whole
    # gradient (a block whose exact value is zero, as dL/dq at a vertex, is rounding on both
    # sides: exactly 0 from the reduced backward solve, ~1e-17 from the full one)
    for i in good[::50]:
        one = [a if (j == 0 and np.ndim(a) == 2) else a[i] for j, a in enumerate(args)]
        gi = fw_grad(fw, tuple(one), cx[i], np.zeros(1), np.zeros(4))
        got = np.concatenate([np.ravel(gs[k][i]) for k in range(1, 6)])
        ref = np.concatenate([np.ravel(gi[k]) for k in range(1, 6)])
        assert rel(got, ref) <= TOL, (fw, i)


def test_infeasible_raise_names_failed_indices():
    _, args, bad = _infeasible_batch(B=8, every=4)        # samples 3 and 7 fail
    assert list(np.flatnonzero(bad)) == [3, 7]
    with pytest.raises(idf.NonConvergenceError) as ei:
        qp.solve_qp(*args, on_failure="raise")
    msg = str(ei.value)
    assert re.search(r"\b3\b", msg) and re.search(r"\b7\b", msg), msg
    assert "infeasible" in msg.lower() or "PRIMAL_INFEASIBLE" in msg, msg
    # the 256 batch: at least the first failed index is named
    _, args, bad = _infeasible_batch()
    with pytest.raises(idf.NonConvergenceError) as ei:
        qp.solve_qp(*args, on_failure="raise")
    assert re.search(rf"\b{np.flatnonzero(bad)[0]}\b", str(ei.value)), str(ei.value)


def test_on_failure_default_from_config_and_warn():
    _, args, bad = _infeasible_batch(B=8, every=4)
    with idf.config.override(on_failure="raise"):
        with pytest.raises(idf.NonConvergenceError):
            qp.solve_qp(*args)
    with idf.config.override(on_failure="nan"):
        x = qp.solve_qp(*args)
        assert np.all(np.isnan(x[bad])) and np.all(np.isfinite(x[~bad]))
    with pytest.warns(Warning):
        qp.solve_qp(*args, on_failure="warn")


def _robust_infeasible(seed=0, n=3):
    """An infeasible QP whose infeasibility survives any small perturbation: x ≤ 0 row-wise
    and Σx ≥ 1 (perturbed), with one equality row and two far, loose rows. The loosened rows
    and the equality pin x completely (full column rank), so the closest feasible problem's
    solution is the least-squares point of the shifted constraints whatever Q and q are."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((n, n))
    Q = L @ L.T / n + 0.5 * np.eye(n)
    q = rng.standard_normal(n)
    A, b = rng.standard_normal((1, n)), rng.standard_normal(1)
    G = np.vstack([np.eye(n), -np.ones((1, n)), rng.standard_normal((2, n))])
    G[: n + 1] += 0.1 * rng.standard_normal((n + 1, n))
    h = np.concatenate([np.zeros(n), [-1.0], [50.0, 50.0]])
    return Q, q, A, b, G, h


def _least_squares_point(A, b, G, h):
    """The oracle (SciPy, no code shared with idf.qp): the minimizer of
    ‖Ax − b‖² + ‖(Gx − h)₊‖², unique here."""
    from scipy.optimize import least_squares

    r = lambda x: np.concatenate([A @ x - b, np.maximum(G @ x - h, 0.0)])  # noqa: E731
    x0 = np.linalg.lstsq(np.vstack([A, G]), np.concatenate([b, h]), rcond=None)[0]
    x = least_squares(r, x0, xtol=1e-15, ftol=1e-15, gtol=1e-15, method="lm").x
    # to rounding: the least-squares solution on the rows the minimizer violates
    V = G @ x - h > 1e-9
    return np.linalg.lstsq(np.vstack([A, G[V]]), np.concatenate([b, h[V]]), rcond=None)[0]


@pytest.mark.parametrize("fw", FWS)
def test_closest_feasible_problem_value(fw):
    fw_module(fw)
    Q, q, A, b, G, h = _robust_infeasible()
    ref = _least_squares_point(A, b, G, h)
    sol = solve(fw, (Q, q, A, b, G, h), infeasible="closest", full_output=True)
    assert int(np.asarray(sol.stats.status)) == qp.CLOSEST
    np.testing.assert_allclose(to_np(sol.x), ref, rtol=1e-9, atol=1e-9)
    assert list(np.asarray(sol.stats.violated)) == [True] * 4 + [False] * 2
    # without the option the same problem fails
    with pytest.raises(idf.NonConvergenceError, match="primal infeasible"):
        solve(fw, (Q, q, A, b, G, h), on_failure="raise")


@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_closest_feasible_problem_gradient(fw):
    # the whole map θ ↦ x*(closest problem), shift included, against central finite differences
    # of the independent least-squares oracle in a random direction of (A, b, G, h), and zero
    # in (Q, q) (the loosened rows pin x)
    fw_module(fw)
    Q, q, A, b, G, h = _robust_infeasible(seed=1)
    rng = np.random.default_rng(2)
    dA, db, dG, dh = (rng.standard_normal(a.shape) for a in (A, b, G, h))
    c = rng.standard_normal(Q.shape[0])
    ref = central_fd(lambda *t: c @ _least_squares_point(*t), (A, b, G, h), (dA, db, dG, dh),
                     h=1e-5)
    g = fw_grad(fw, (Q, q, A, b, G, h), c, np.zeros(1), np.zeros(len(h)), infeasible="closest")
    got = sum(float(np.sum(gi * di)) for gi, di in zip(g[2:], (dA, db, dG, dh)))
    assert abs(got - float(ref)) <= 1e-8 * max(1.0, abs(float(ref))), (got, float(ref))
    assert np.abs(g[0]).max() < 1e-9 and np.abs(g[1]).max() < 1e-9


@pytest.mark.parametrize("fw", FWS)
def test_crowded_active_set_takes_basic_multipliers(fw):
    # the closest problem of `_robust_infeasible(1)` ends with three tight inequality rows and
    # the equality, four rows in ℝ³: the polish accepted that set (its residual test passes on
    # a consistent singular system), so the backward met a singular KKT matrix (refused in JAX
    # on some CPUs, answered by rounding elsewhere). The basic multipliers (NNLS) keep an
    # independent set: at most n rows, of full rank, the same x*, degenerate flagged.
    fw_module(fw)
    Q, q, A, b, G, h = _robust_infeasible(seed=1)
    sol = solve(fw, (Q, q, A, b, G, h), infeasible="closest", full_output=True)
    active = np.asarray(sol.stats.active)
    rows = np.vstack([A, G[active]])
    assert len(rows) <= len(q) and np.linalg.matrix_rank(rows) == len(rows), active
    assert bool(np.asarray(sol.stats.degenerate))
    x = to_np(sol.x)
    np.testing.assert_allclose(x, _least_squares_point(A, b, G, h), rtol=1e-9, atol=1e-12)
    z = to_np(sol.z)
    assert np.all(z[~active] == 0) and np.all(z >= 0)


def _pair_closed_form(Q, q, A, b, h, g):
    """An equality row and the contradictory pair gᵀx ≤ h₀, −gᵀx ≤ h₁ (h₀ + h₁ < 0): the
    least-squares shift splits the gap, so the closest problem is the QP with the equalities
    Ax = b, gᵀx = (h₀ − h₁)/2, solved densely."""
    n = len(q)
    C = np.vstack([A, g[None]])
    d = np.concatenate([b, [(h[0] - h[1]) / 2]])
    K = np.block([[Q, C.T], [C, np.zeros((len(C), len(C)))]])
    return np.linalg.solve(K, np.concatenate([-q, d]))[:n]


@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_closest_pair_through_the_objective(fw):
    # here the shifted problem leaves x free along the pair's face, so Q and q matter: value and
    # gradient in (Q, q, A, b, h) against the closed form (G is held: a contradictory pair of
    # parallel rows is infeasible only while they stay parallel, so no derivative in G exists)
    fw_module(fw)
    rng = np.random.default_rng(5)
    n = 4
    L = rng.standard_normal((n, n))
    Q, q = L @ L.T / n + 0.5 * np.eye(n), rng.standard_normal(n)
    A, b, g = rng.standard_normal((1, n)), rng.standard_normal(1), rng.standard_normal(n)
    G = np.vstack([g, -g, rng.standard_normal((2, n))])
    h = np.array([-0.5, -0.7, 50.0, 50.0])
    ref = _pair_closed_form(Q, q, A, b, h, g)
    sol = solve(fw, (Q, q, A, b, G, h), infeasible="closest", full_output=True)
    assert int(np.asarray(sol.stats.status)) == qp.CLOSEST
    np.testing.assert_allclose(to_np(sol.x), ref, rtol=1e-9, atol=1e-10)
    c = rng.standard_normal(n)
    dQ, dq, dA, db, dh = (rng.standard_normal(a.shape) for a in (Q, q, A, b, h))
    dQ = dQ + dQ.T
    ref_d = central_fd(lambda Q_, q_, A_, b_, h_: c @ _pair_closed_form(Q_, q_, A_, b_, h_, g),
                       (Q, q, A, b, h), (dQ, dq, dA, db, dh), h=1e-5)
    gr = fw_grad(fw, (Q, q, A, b, G, h), c, np.zeros(1), np.zeros(len(h)),
                 infeasible="closest")
    got = sum(float(np.sum(gi * di)) for gi, di in zip([gr[0], gr[1], gr[2], gr[3], gr[5]],
                                                        (dQ, dq, dA, db, dh)))
    assert abs(got - float(ref_d)) <= 1e-8 * max(1.0, abs(float(ref_d))), (got, float(ref_d))


@pytest.mark.parametrize("fw", ["numpy", "torch"])
def test_closest_in_a_batch_leaves_feasible_samples_alone(fw):
    fw_module(fw)
    _, args, bad = _infeasible_batch(B=16, every=4)
    sol = solve(fw, args, infeasible="closest", full_output=True, on_failure="raise")
    plain = solve(fw, args, full_output=True, on_failure="nan")
    status = np.asarray(sol.stats.status)
    assert np.all(status[bad] == qp.CLOSEST) and np.all(status[~bad] == qp.SOLVED)
    x, xp_ = to_np(sol.x), to_np(plain.x)
    np.testing.assert_array_equal(x[~bad], xp_[~bad])
    # the infeasible samples' pair x0 <= -1, -x0 <= -1 is split: x0 = 0 on the shifted face
    np.testing.assert_allclose(x[bad][:, 0], 0.0, atol=1e-9)
    assert "closest" in sol.stats.summary()


def test_closest_refuses_unbounded_and_unknown_values():
    with pytest.raises(ValueError, match="'fail' or 'closest'"):
        qp.solve_qp(np.eye(2), np.ones(2), infeasible="nearest")
    # an unbounded problem is not infeasible: it still fails
    Q = np.zeros((2, 2))
    with pytest.raises(idf.NonConvergenceError, match="unbounded"):
        qp.solve_qp(Q, np.ones(2), G=-np.eye(2)[:1], h=np.zeros(1), infeasible="closest",
                    on_failure="raise")


def _unbounded_batch():
    """Sample 0: a good QP. 1: Q = 0, q ≠ 0, no active constraint in the way (LP along −q).
    2: Q PSD (x₂ free direction), q₂ = 1, constraints only on x₀."""
    rng = np.random.default_rng(21)
    P = make_qp(rng, 3, 0, 2, 1)
    Q = np.stack([P.Q, np.zeros((3, 3)), np.diag([1.0, 1.0, 0.0])])
    q = np.stack([P.q, np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])])
    G = np.stack([P.G, np.array([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]),
                  np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])])
    h = np.stack([P.h, np.ones(2), np.ones(2)])
    return P, (Q, q, None, None, G, h)


@pytest.mark.parametrize("fw", FWS)
def test_unbounded(fw):
    fw_module(fw)
    P, args = _unbounded_batch()
    sol = solve(fw, args, full_output=True, on_failure="nan")
    st_ = np.asarray(sol.stats.status)
    assert list(st_) == [qp.SOLVED, qp.DUAL_INFEASIBLE, qp.DUAL_INFEASIBLE], st_
    x = to_np(sol.x)
    assert rel(x[0], P.x) <= TOL and np.all(np.isnan(x[1:]))
    with pytest.raises(idf.NonConvergenceError) as ei:
        solve(fw, args, on_failure="raise")
    assert re.search(r"\b1\b", str(ei.value)) and re.search(r"\b2\b", str(ei.value)), ei.value
    if fw == "jax":
        return  # a new shape: seconds of compiling for what numpy and torch check
    # unconstrained Q = 0 alone
    with pytest.raises(idf.NonConvergenceError):
        solve(fw, (np.zeros((2, 2)), np.ones(2), None, None, None, None), on_failure="raise")


# ---- degenerate points -----------------------------------------------------------------------

def _degenerate_batch():
    rng = np.random.default_rng(22)
    Ps = [make_qp(rng, 5, 1, 4, 1, n_weak=w) for w in (0, 1, 0, 0)]
    return Ps, stack(Ps)


@pytest.mark.parametrize("fw", FWS)
def test_degenerate_point(fw):
    """Sample 1 has a tight row with zero multiplier: finite derivatives equal to the closed form
    with that row inactive; stats.degenerate flags that sample only."""
    fw_module(fw)
    rng = np.random.default_rng(23)
    Ps, B = _degenerate_batch()
    args = B.inputs()
    sol = solve(fw, args, full_output=True)
    assert list(np.asarray(sol.stats.degenerate)) == [False, True, False, False]
    assert rel(sol_np(sol), (B.x, B.y, B.z)) <= TOL
    cx, cy, cz = cotangents(rng, B)
    got = fw_grad(fw, args, cx, cy, cz)
    check_grads(got, batch_oracle_grads(Ps, cx, cy, cz), args, what=f"{fw} degenerate")
    d = [rng.standard_normal(a.shape) for a in args]
    d[0] = sym(d[0])
    want_t = [np.stack(t) for t in zip(*[kkt_jvp(P, *(t[i] for t in d))
                                         for i, P in enumerate(Ps)])]
    got_t = fw_jvp(fw, args, d)
    for g in got_t:
        assert np.all(np.isfinite(g))
    check_tangents(got_t, want_t, Ps[0], what=f"{fw} degenerate jvp")


def test_degenerate_one_sided_fd():
    """At the degenerate point, moving the weakly active row's h outwards leaves x unchanged
    (one-sided FD), which is what treating the row as inactive gives."""
    Ps, _ = _degenerate_batch()
    P = Ps[1]
    j = int(np.flatnonzero(P.weak)[0])
    dh = np.zeros(P.m)
    dh[j] = 1.0
    jv = fw_jvp("numpy", P.inputs(),
                tuple(np.zeros_like(a) if i != 5 else dh for i, a in enumerate(P.inputs())))[0]
    eps = 1e-4
    x1 = qp.solve_qp(*P.inputs()[:5], P.h + eps * dh)
    assert np.allclose(jv, 0, atol=1e-10) and np.allclose((x1 - P.x) / eps, 0, atol=1e-7)


# ---- external solvers ----------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["osqp", "clarabel", "proxsuite"])
def test_external_solver_against_closed_form(solver):
    """The external solvers, polished: exact x, y, z and derivative on known-active-set QPs, and
    the degenerate batch handled as with the built-in solver."""
    pytest.importorskip(solver)
    rng = np.random.default_rng(24)
    for name in ("eq+ineq", "ineq"):
        P = case(name)
        sol = qp.solve_qp(*qp_args(P), solver=solver, full_output=True)
        assert rel(sol_np(sol)[0], P.x) <= TOL and rel(sol.z, P.z) <= TOL, (solver, name)
        assert np.array_equal(sol.stats.active, P.active)
        cx, cy, cz = cotangents(rng, P)
        got = fw_grad("numpy", qp_args(P), cx, cy, cz, solver=solver)
        check_grads(got, kkt_vjp(P, cx, cy, cz), qp_args(P), what=solver)
    Ps, B = _degenerate_batch()
    sol = qp.solve_qp(*B.inputs(), solver=solver, full_output=True)
    assert list(np.asarray(sol.stats.degenerate)) == [False, True, False, False], solver
    assert rel(sol_np(sol), (B.x, B.y, B.z)) <= TOL
    cx, cy, cz = cotangents(rng, B)
    got = fw_grad("numpy", B.inputs(), cx, cy, cz, solver=solver)
    check_grads(got, batch_oracle_grads(Ps, cx, cy, cz), B.inputs(), what=f"{solver} degenerate")


# ---- float32 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fw", FWS)
def test_float32(fw):
    mod = fw_module(fw)
    P = case("eq+ineq")
    args32 = [np.asarray(a, np.float32) for a in P.inputs()]
    sol = solve(fw, args32, full_output=True)
    for v in (sol.x, sol.y, sol.z):
        assert str(v.dtype).endswith("float32"), v.dtype
    assert rel(sol_np(sol), (P.x, P.y, P.z)) <= 1e-4
    if fw == "torch":
        ts = [mod.as_tensor(a).requires_grad_(True) for a in args32]
        qp.solve_qp(*ts).sum().backward()
        for t in ts:
            assert t.grad.dtype == mod.float32
        want = kkt_vjp(P, np.ones(P.n), np.zeros(P.p), np.zeros(P.m))
        assert rel(to_np(ts[1].grad), want["q"]) <= 1e-4


# ---- bad input -------------------------------------------------------------------------------

def _bad_inputs():
    P = case("eq+ineq")
    Q, q, A, b, G, h = P.inputs()
    n = P.n
    ev, V = np.linalg.eigh(Q)
    ev[0] = -0.5                                  # one negative eigenvalue: indefinite
    indef = (V * ev) @ V.T
    indef = (indef + indef.T) / 2
    Qb = np.stack([Q, Q, indef])
    return [
        # (id, args, options, regexes that must all appear in the message)
        ("Q-shape", (np.ones((n, n + 1)), q, A, b, G, h), {}, "Q"),
        ("q-shape", (Q, np.ones(n + 1), A, b, G, h), {}, "q"),
        ("A-shape", (Q, q, np.ones((1, n + 1)), b, G, h), {}, "A"),
        ("b-shape", (Q, q, A, np.ones(2), G, h), {}, "b"),
        ("G-shape", (Q, q, A, b, np.ones((4, n - 1)), h), {}, "G"),
        ("h-shape", (Q, q, A, b, G, np.ones(3)), {}, "h"),
        ("A-without-b", (Q, q, A, None, G, h), {}, "b"),
        ("b-without-A", (Q, q, None, b, G, h), {}, "A"),
        ("G-without-h", (Q, q, A, b, G, None), {}, "h"),
        ("Q-indefinite", (indef, q, A, b, G, h), {}, "Q"),
        ("Q-int", (np.eye(n, dtype=np.int64), q, A, b, G, h), {}, "Q"),
        ("batch-mismatch", (Q, np.ones((3, n)), A, np.ones((2, 1)), G, h), {}, "(b|q)"),
        ("Q-indefinite-sample-2", (Qb, np.stack([q] * 3), A, b, G, h), {}, ["Q", "2"]),
    ]


# option values: a ValueError (the library's convention for options, as `on_failure` everywhere)
BAD_OPTIONS = [("on_failure", "sometimes"), ("infeasible", "ignore"), ("solver", "simplex"),
               ("tol", -1.0), ("maxiter", 0)]


BAD = _bad_inputs()


@pytest.mark.parametrize("args,kw,name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(args, kw, name):
    with pytest.raises((idf.ImplicitDiffError, ValueError, TypeError)) as ei:
        qp.solve_qp(*args, **kw)
    msg = str(ei.value)
    assert isinstance(ei.value, idf.ImplicitDiffError), (type(ei.value), msg)
    for pat in ([name] if isinstance(name, str) else name):
        assert re.search(rf"\b{pat}\b", msg), (pat, msg)


@pytest.mark.parametrize("opt,value", BAD_OPTIONS, ids=[o for o, _ in BAD_OPTIONS])
def test_bad_option(opt, value):
    P = case("eq+ineq")
    with pytest.raises(ValueError, match=rf"\b{opt}\b"):
        qp.solve_qp(*P.inputs(), **{opt: value})


@pytest.mark.parametrize("fw", ["jax", "torch"])
def test_bad_input_frameworks(fw):
    fw_module(fw)
    P = case("eq+ineq")
    Q, q, A, b, G, h = P.inputs()
    with pytest.raises(idf.ImplicitDiffError, match=r"\bq\b"):
        solve(fw, (Q, np.ones(P.n + 1), A, b, G, h))
    ns = Q.copy()
    ns[0, 1] += 0.5
    # a non-symmetric Q is its symmetric part: the objective sees nothing else
    np.testing.assert_allclose(to_np(solve(fw, (ns, q, A, b, G, h))),
                               to_np(solve(fw, ((ns + ns.T) / 2, q, A, b, G, h))),
                               rtol=1e-12, atol=1e-12)


def test_nonsymmetric_Q_is_its_symmetric_part():
    # solved and differentiated as (Q + Qᵀ)/2; the gradient with respect to Q is symmetric
    torch = pytest.importorskip("torch")
    P = case("eq+ineq")
    Q, q, A, b, G, h = P.inputs()
    rng = np.random.default_rng(11)
    ns = Q + 0.3 * rng.standard_normal(Q.shape)
    sym = (ns + ns.T) / 2
    if np.linalg.eigvalsh(sym)[0] <= 0:
        sym += (1e-3 - np.linalg.eigvalsh(sym)[0]) * np.eye(len(sym))
        ns = sym + (ns - ns.T) / 2
    x_ns = qp.solve_qp(ns, q, A, b, G, h)
    x_sym = qp.solve_qp(sym, q, A, b, G, h)
    np.testing.assert_allclose(x_ns, x_sym, rtol=1e-12, atol=1e-12)
    Qt = torch.tensor(ns, requires_grad=True)
    c = torch.tensor(rng.standard_normal(len(q)))
    (c * qp.solve_qp(Qt, *(torch.tensor(a) for a in (q, A, b, G, h)))).sum().backward()
    torch.testing.assert_close(Qt.grad, Qt.grad.T, rtol=0, atol=1e-13)


# ---- hypothesis: well-posed, possibly badly scaled ---------------------------------------------

@st.composite
def qp_draws(draw):
    n = draw(st.integers(2, 6))
    p = draw(st.integers(0, min(2, n - 1)))
    m = draw(st.integers(0, 5))
    k = draw(st.integers(0, min(m, n - p)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    scaled = draw(st.booleans())
    # a singular PSD Q (rank n − 1) where the active constraints make the KKT matrix regular
    rank = n - 1 if (p + k >= 1 and draw(st.booleans())) else None
    return n, p, m, k, seed, scaled, rank


@settings(max_examples=20)
@given(qp_draws())
def test_hypothesis_well_posed_qps(draw):
    """Random well-posed QPs (Q positive definite, or singular PSD with a regular KKT matrix;
    badly scaled half the time: variables, rows and objective scaled by 10^[-3, 3]).
    Derivatives are compared in natural units (directions and cotangents scaled with the
    problem) so that the comparison is as strict for small entries as for large ones.
    Well-scaled: must match (rel 1e-8). Badly scaled: match (rel 1e-6) or raise an
    ImplicitDiffError; never a silently wrong number."""
    n, p, m, k, seed, scaled, rank = draw
    rng = np.random.default_rng(seed)
    kw = {}
    if scaled:
        kw = dict(var_scale=10 ** rng.uniform(-3, 3, n), row_scale_A=10 ** rng.uniform(-3, 3, p),
                  row_scale_G=10 ** rng.uniform(-3, 3, m), obj_scale=10 ** rng.uniform(-3, 3))
    P = make_qp(rng, n, p, m, k, rank=rank, **kw)
    D = np.ones(n) if P.D is None else P.D
    RA = np.ones(p) if P.RA is None else P.RA
    RG = np.ones(m) if P.RG is None else P.RG
    c = P.c
    tol = 1e-6 if scaled else TOL
    args = qp_args(P)
    try:
        sol = qp.solve_qp(*args, full_output=True)
        # natural units: x̃ = x / D, ỹ = y R_A / c, z̃ = z R_G / c
        assert rel(sol.x / D, P.x / D) <= tol, (sol.x, P.x)
        if p:
            assert rel(sol.y * RA, P.y * RA) <= tol, (sol.y, P.y)
        if m:
            assert rel(sol.z * RG, P.z * RG) <= tol, (sol.z, P.z)
            assert np.array_equal(np.asarray(sol.stats.active), P.active)
        cx = rng.standard_normal(n) / D
        cy = rng.standard_normal(p) * RA / c
        cz = rng.standard_normal(m) * RG / c
        got = fw_grad("numpy", args, cx, cy, cz)
        want = kkt_vjp(P, cx, cy, cz)
        # directions in natural units: δQ = c D⁻¹ δQ̃ D⁻¹, δq = c D⁻¹ δq̃, δA = R_A δÃ D⁻¹, ...
        d = {"Q": c * sym(rng.standard_normal((n, n))) / D[:, None] / D[None, :],
             "q": c * rng.standard_normal(n) / D,
             "A": RA[:, None] * rng.standard_normal((p, n)) / D[None, :],
             "b": RA * rng.standard_normal(p),
             "G": RG[:, None] * rng.standard_normal((m, n)) / D[None, :],
             "h": RG * rng.standard_normal(m)}
        for name, g, a in zip(NAMES, got, args):
            if a is None:
                continue
            gd, wd = float(np.sum(g * d[name])), float(np.sum(want[name] * d[name]))
            scale = np.sqrt(sum(float(np.sum((want[k_] * d[k_]) ** 2)) for k_ in NAMES)) + 1e-300
            assert abs(gd - wd) <= tol * max(scale, abs(wd)), (name, gd, wd)
        dirs = tuple(d[k_] if a is not None else None for k_, a in zip(NAMES, args))
        got_t = fw_jvp("numpy", args, dirs)
        want_t = kkt_jvp(P, *(d[k_] for k_ in NAMES))
        check_tangents((got_t[0] / D, got_t[1] * RA / c, got_t[2] * RG / c),
                       (want_t[0] / D, want_t[1] * RA / c, want_t[2] * RG / c), P, tol=tol,
                       what="hypothesis jvp")
    except idf.ImplicitDiffError:
        if not scaled:
            raise
