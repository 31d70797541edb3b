"""The PyTorch backward of `idf.qp.solve_qp` reuses the forward's factorization
(`implicitdiff._factored`, `implicitdiff.qp._factorization`): the polish's `ActiveKKT` answers
the derivative's linear solve, checked against the backward's own operator, with the configured
solver taking over wherever it is not trusted.

Oracles: the dense Jacobian of the condition (`M @ out == rhs`), the closed-form active-set
derivative (tests/qp_oracles.py), and the same derivative with the factorization withheld
(the configured solver's path, what every other framework runs)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qp_oracles import kkt_vjp, make_qp, rel, stack, sym

import implicitdiff as idf
import implicitdiff.qp as qp
from implicitdiff import _factored
from implicitdiff.qp._factorization import KKTFactorization
from implicitdiff.qp._reduced import ReducedDense

torch = pytest.importorskip("torch")

NAMES = ("Q", "q", "A", "b", "G", "h")


def _host(args, keep):
    eps = float(np.finfo(np.float64).eps)
    return qp._host_solve(*args, tol=1e-9, maxiter=100, check_eps=eps, keep=keep)


def _batch(rng, B=5, n=7, p=2, m=6):
    Ps = [make_qp(rng, n, p, m, int(rng.integers(0, min(m, n - p) + 1))) for _ in range(B)]
    return Ps, stack(Ps)


def _factorization(args):
    keep: dict = {}
    w, _ = _host(args, keep)
    data = keep["fast"].data
    B = data[1].shape[0]
    flat = (*(np.reshape(a, (B, -1)) for a in w[:3]), np.reshape(w[3], (B,)))
    return KKTFactorization(keep["fast"], flat), w, data


def test_the_factorization_solves_the_jacobian_both_ways():
    """`M out = rhs` and `Mᵀ out = rhs` with M the dense Jacobian of the condition, at solved
    samples, at a failed (infeasible) one and at one with a weakly active row."""
    rng = np.random.default_rng(0)
    Ps = [make_qp(rng, 7, 2, 6, k) for k in (0, 2, 4, 3)]
    Ps.append(make_qp(rng, 7, 2, 6, 2, n_weak=1))
    S = stack(Ps)
    h = S.h.copy()
    G = S.G.copy()
    # sample 3 infeasible: two rows that contradict each other
    G[3, 0], G[3, 1] = np.eye(7)[0], -np.eye(7)[0]
    h[3, 0], h[3, 1] = -1.0, -1.0
    args = (S.Q, S.q, S.A, S.b, G, h)
    fac, w, data = _factorization(args)
    ok = np.asarray(w[3])
    assert ok[3] == 0 and ok[[0, 1, 2, 4]].all()
    M = np.asarray(qp._jacobian_x(tuple(np.asarray(a) for a in w), *data))
    N = M.shape[-1]
    rhs = rng.standard_normal((len(Ps), N))
    for transpose in (False, True):
        out, trusted, size = fac.solve(rhs, transpose)
        assert trusted.all()
        Mt = np.swapaxes(M, 1, 2) if transpose else M
        back = (Mt @ out[:, :, None])[:, :, 0]
        for i in range(len(Ps)):
            assert rel(back[i], rhs[i]) <= 1e-11, (transpose, i)
            assert size[i] >= np.max(np.abs(rhs[i]))
    assert fac.solve(rhs[:, :-1], True) is None  # not this problem's layout


def _grads(args, cx, on_failure=None, dtype=torch.float64):
    ts = [torch.tensor(np.asarray(a), dtype=dtype, requires_grad=True) for a in args]
    kw = {} if on_failure is None else {"on_failure": on_failure}
    x = qp.solve_qp(*ts, **kw)
    c = torch.tensor(cx, dtype=dtype)
    loss = torch.where(torch.isfinite(x), x * c, torch.zeros_like(x)).sum()
    return [g.detach().numpy().astype(np.float64) for g in torch.autograd.grad(loss, ts)]


@pytest.fixture
def fallbacks(monkeypatch):
    """Counts the configured solver's solves (the path without the factorization)."""
    calls = []
    real = ReducedDense.solve

    def spy(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(ReducedDense, "solve", spy)
    return calls


def _without(monkeypatch):
    monkeypatch.setattr(qp, "publish", lambda f: None)


def test_the_backward_reuses_the_forward_and_matches_the_oracle(fallbacks, monkeypatch):
    rng = np.random.default_rng(1)
    Ps, S = _batch(rng, B=6)
    cx = rng.standard_normal((6, 7))
    got = _grads(S.inputs(), cx)
    assert not fallbacks, "the factorization was not used"
    want = [kkt_vjp(P, cx[i], np.zeros(2), np.zeros(6)) for i, P in enumerate(Ps)]
    for k, name in enumerate(NAMES):
        w = np.stack([wi[name] for wi in want])
        g, w = (sym(got[k]), sym(w)) if name == "Q" else (got[k], w)
        assert rel(g, w) <= 1e-10, name
    _without(monkeypatch)
    ref = _grads(S.inputs(), cx)
    assert fallbacks, "the configured solver did not run without the factorization"
    for k, name in enumerate(NAMES):
        assert rel(got[k], ref[k]) <= 1e-11, name


@pytest.mark.parametrize("case", ["float32", "shared_Q", "batch_2x3", "single", "no_equality",
                                  "no_inequality", "infeasible_nan"])
def test_the_same_gradient_as_the_configured_solver(case, fallbacks, monkeypatch):
    rng = np.random.default_rng(2)
    B, n, p, m = 6, 6, 2, 5
    dtype = torch.float32 if case == "float32" else torch.float64
    if case == "no_equality":
        p = 0
    if case == "no_inequality":
        m = 0
    Q0 = make_qp(rng, n, p, m, 0).Q if case == "shared_Q" else None
    Ps = [make_qp(rng, n, p, m, int(rng.integers(0, min(m, n - p) + 1)), Q=Q0)
          for _ in range(B)]
    S = stack(Ps)
    args = [S.Q, S.q, S.A, S.b, S.G, S.h]
    cx = rng.standard_normal((B, n))
    on_failure = None
    if case == "shared_Q":
        args[0] = Q0
    if case == "batch_2x3":
        args = [a.reshape((2, 3, *a.shape[1:])) for a in args]
        cx = cx.reshape(2, 3, n)
    if case == "single":
        args = [a[0] for a in args]
        cx = cx[0]
    if case == "infeasible_nan":
        G, h = S.G.copy(), S.h.copy()
        G[[1, 4], 0], G[[1, 4], 1] = np.eye(n)[0], -np.eye(n)[0]
        h[[1, 4], 0], h[[1, 4], 1] = -1.0, -1.0
        args[4], args[5] = G, h
        on_failure = "nan"
    got = _grads(args, cx, on_failure, dtype)
    used = not fallbacks
    fallbacks.clear()
    _without(monkeypatch)
    ref = _grads(args, cx, on_failure, dtype)
    assert fallbacks
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    for k, name in enumerate(NAMES):
        assert np.all(np.isfinite(got[k])), name
    # relative to the whole gradient (a block whose exact value is zero is rounding on both
    # sides)
    flat = [np.concatenate([np.ravel(g) for g in gs]) for gs in (got, ref)]
    assert rel(flat[0], flat[1]) <= tol, (case, rel(flat[0], flat[1]))
    # without inequality rows there is no Schur complement to reuse: nothing is published
    assert used == (case != "no_inequality"), case


def test_a_nearly_dependent_active_set_is_decided_by_the_configured_solver(fallbacks,
                                                                           monkeypatch):
    """Two active rows at an angle of 1e-9: the probe's error is far past 1e-8, the
    configured solver takes over, and the outcome (a gradient or a refusal) is the one it gives
    without the factorization."""
    n = 4
    Q, q = np.eye(n), np.array([-5.0, 1.0, 0.5, -0.3])
    G = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1e-9, 0.0, 0.0]])
    h = np.array([-1.0, -1.0])
    A, b = np.zeros((0, n)), np.zeros(0)
    cx = np.array([1.0, -2.0, 0.5, 0.25])

    def outcome():
        try:
            return _grads((Q, q, A, b, G, h), cx)
        except idf.ImplicitDiffError as e:
            return type(e)

    got = outcome()
    _without(monkeypatch)
    ref = outcome()
    if isinstance(ref, type):
        assert got is ref
    else:
        assert not isinstance(got, type)
        for k, name in enumerate(NAMES):
            assert rel(got[k], ref[k]) <= 1e-8, name


def test_only_first_order_outside_transforms(fallbacks):
    """Double backward and torch.func transforms keep the configured solver (the host answer
    is not differentiable); their first derivatives equal the reused path's."""
    rng = np.random.default_rng(3)
    _, S = _batch(rng, B=3, n=5, p=1, m=4)
    ts = [torch.tensor(a, requires_grad=True) for a in S.inputs()]
    c = torch.tensor(rng.standard_normal((3, 5)))
    g1 = torch.autograd.grad((qp.solve_qp(*ts) * c).sum(), ts)
    assert not fallbacks
    g2 = torch.autograd.grad((qp.solve_qp(*ts) * c).sum(), ts, create_graph=True)
    assert fallbacks
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b.detach(), rtol=1e-11, atol=1e-13)
    fallbacks.clear()
    gq = torch.func.grad(lambda q: (qp.solve_qp(ts[0].detach(), q, *[t.detach() for t in ts[2:]])
                                    * c).sum())(ts[1].detach())
    torch.testing.assert_close(gq, g1[1], rtol=1e-11, atol=1e-13)


def test_publish_without_a_listener_does_nothing():
    _factored.publish(object())  # no adapter listening: a no-op
    with _factored.capture() as got:
        _factored.publish("f")
        with _factored.capture() as inner:
            _factored.publish("g")
    assert got == ["f"] and inner == ["g"]


@st.composite
def _draws(draw):
    n = draw(st.integers(2, 7))
    p = draw(st.integers(0, min(2, n - 1)))
    m = draw(st.integers(1, 6))
    B = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    scaled = draw(st.booleans())
    return n, p, m, B, seed, scaled


@settings(max_examples=15, deadline=None)
@given(_draws())
def test_hypothesis_reuse_equals_the_configured_solver(draw):
    """Random batches of well-posed QPs, badly scaled half the time (variables, rows and the
    objective scaled by 10^[-3, 3]): the gradient with the forward's factorization equals the
    configured solver's (and, well scaled, the closed form), or both paths refuse alike."""
    n, p, m, B, seed, scaled = draw
    rng = np.random.default_rng(seed)
    Ps = []
    for _ in range(B):
        kw = {}
        if scaled:
            kw = dict(var_scale=10 ** rng.uniform(-3, 3, n),
                      row_scale_A=10 ** rng.uniform(-3, 3, p),
                      row_scale_G=10 ** rng.uniform(-3, 3, m),
                      obj_scale=10 ** rng.uniform(-3, 3))
        P = make_qp(rng, n, p, m, int(rng.integers(0, min(m, n - p) + 1)), **kw)
        Ps.append(P)
    S = stack(Ps)
    D = np.stack([np.ones(n) if P.D is None else P.D for P in Ps])
    cx = rng.standard_normal((B, n)) / D

    def outcome(reuse):
        publish = qp.publish
        if not reuse:
            qp.publish = lambda f: None
        try:
            return _grads(S.inputs(), cx)
        except idf.ImplicitDiffError as e:
            return type(e)
        finally:
            qp.publish = publish

    got, ref = outcome(True), outcome(False)
    if isinstance(ref, type) or isinstance(got, type):
        assert got is ref and scaled, (got, ref)
        return
    tol = 1e-6 if scaled else 1e-9
    want = [kkt_vjp(P, cx[i], np.zeros(p), np.zeros(m)) for i, P in enumerate(Ps)]

    def sample(gs, i):  # one sample's whole gradient (∂L/∂Q symmetrized)
        return np.concatenate([np.ravel(sym(g[i]) if name == "Q" else g[i])
                               for name, g in zip(NAMES, gs)])

    for i in range(B):
        assert rel(sample(got, i), sample(ref, i)) <= tol, i
        if not scaled:
            assert rel(sample(got, i), sample([np.stack([w[k] for w in want]) for k in NAMES],
                                              i)) <= 1e-8, i


def test_diagnostics_record_the_reused_solve(fallbacks):
    """Inside `idf.diagnostics()` the reused solve is recorded like any backward solve
    (converged, a residual at rounding, a finite error bound); the bound's own solve, with A
    rather than Aᵀ, is the configured solver's, and the gradient is unchanged."""
    rng = np.random.default_rng(4)
    _, S = _batch(rng, B=4, n=6, p=1, m=5)
    cx = rng.standard_normal((4, 6))
    plain = _grads(S.inputs(), cx)
    assert not fallbacks
    with idf.diagnostics() as d:
        got = _grads(S.inputs(), cx)
    (rec,) = d.backward
    assert np.all(rec.converged)
    assert np.all(np.asarray(rec.residual_norm) <= 1e-12)
    bound = np.asarray(rec.derivative_error_bound)
    assert np.all(np.isfinite(bound)) and np.all(bound < 1e-8)
    assert len(fallbacks) == 1  # the error bound's solve with A (x_error), not the derivative's
    for a, b in zip(got, plain):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.max(np.abs(b)))
