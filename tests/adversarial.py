"""Adversarial problem families and the outcome classifier behind `tests/test_fuzz_adversarial.py`
and `benchmarks/bench_adversarial.py`.

Each family draws a problem $F(x^*, \\theta) = 0$ that is hard in one way: badly scaled (rows of
F and entries of x spanning many decades), ill-conditioned ($\\kappa(\\partial_x F)$ up to 1e13),
singular (no derivative exists: $x^*$ is not locally unique), stopped early (the solver returned
before convergence, including on low-curvature problems where the residual is small although $x$
is far from $x^*$) and mixed-dtype (a float32 leaf beside a float64 leaf). The truth is computed
here in NumPy from closed forms (an SVD built from known orthogonal factors, hand-derived
Jacobians): this module imports `implicitdiff` only to run it, never to compute an oracle.

One attempt runs a decorated solver on one backend and takes one vector-Jacobian product in a
random direction. `classify` sorts the outcome into the table of issue 11:

- **correct**: finite and within the accuracy the problem allows (float64: $10^{-8}$, or
  $100\\,\\kappa\\,\\epsilon$ where $\\kappa$ is the condition number; float32 leaves $10^{-3}$);
- **clear error**: an `ImplicitDiffError` subclass was raised, or NaN returned under
  `on_failure="nan"`;
- **warned**: a wrong (or NaN) number came with a warning from implicitdiff;
- **silent wrong**: a wrong number (or any finite number where no derivative exists) and no word;
- **crash**: any other exception type (a framework's own error, a `TypeError` in user code...).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OUTCOMES = ("correct", "clear error", "warned", "silent wrong", "crash")


@dataclass
class Case:
    """One drawn problem.

    `build(xp, asarray)` returns `(F, solver)` with F's constants already in the framework;
    `primals` are NumPy arrays (converted per backend with `dtypes`); the attempt differentiates
    `solver(*primals)` with respect to argument `argnum` along the output cotangent `u`; `truth`
    is $u^\\top \\partial x^*/\\partial\\theta_{argnum}$ (None where no derivative exists);
    `tol` the accuracy the problem allows (one per leaf of x when x is a tuple)."""

    family: str
    build: Callable[[Any, Callable[[Any], Any]], tuple[Callable, Callable]]
    primals: tuple
    u: Any
    truth: Any
    tol: float
    argnum: int = 0
    dtypes: tuple = ()
    info: dict = field(default_factory=dict)


def _orth(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


EPS64 = float(np.finfo(np.float64).eps)


# ---- families ---------------------------------------------------------------------------------


def scaled(rng: np.random.Generator, n: int = 6, decades: float = 8.0) -> Case:
    """$F(x, \\theta) = D(M_0 S^{-1} x - \\theta)$ with row scales $D$ and column scales $S$
    spanning `decades` decades each: $x^* = S M_0^{-1}\\theta$, $J = S M_0^{-1}$, whatever D."""
    m0 = _orth(rng, n) @ np.diag(rng.uniform(1.0, 3.0, n)) @ _orth(rng, n).T
    d = 10.0 ** rng.uniform(-decades, decades, n)
    s = 10.0 ** rng.uniform(-decades / 2, decades / 2, n)
    theta = rng.standard_normal(n)
    u = rng.standard_normal(n)
    minv = np.linalg.inv(m0)
    truth = (u * s) @ minv
    x_true = s * (minv @ theta)

    def build(xp, asarray):
        M, D = asarray(m0 / s[None, :]), asarray(d)

        def F(x, th):
            return D * (M @ x - th)

        def solver(th):
            # the exact answer computed the way a careful user would: in the scaled variables
            return asarray(x_true) + 0 * th

        return F, solver

    return Case("scaled", build, (theta,), u, truth, 1e-8, info={"decades": decades})


def ill_conditioned(rng: np.random.Generator, n: int = 6, log_cond: float = 8.0,
                    symmetric: bool = False) -> Case:
    """$F(x, \\theta) = A x - \\theta$, $A = U\\,\\mathrm{diag}(s)\\,V^\\top$ with
    $\\kappa(A) = 10^{\\text{log\\_cond}}$: $J = A^{-1} = V\\,\\mathrm{diag}(1/s)\\,U^\\top$."""
    U = _orth(rng, n)
    V = U if symmetric else _orth(rng, n)
    s = np.logspace(0, -log_cond, n)
    A = U @ np.diag(s) @ V.T
    theta = rng.standard_normal(n)
    u = rng.standard_normal(n)
    truth = u @ (V @ np.diag(1 / s) @ U.T)
    x_true = V @ ((U.T @ theta) / s)
    tol = max(1e-8, 100 * 10.0**log_cond * EPS64)

    def build(xp, asarray):
        Am = asarray(A)

        def F(x, th):
            return Am @ x - th

        def solver(th):
            return asarray(x_true) + 0 * th

        return F, solver

    return Case("ill-conditioned", build, (theta,), u, truth, tol,
                info={"log_cond": log_cond, "symmetric": symmetric})


def singular(rng: np.random.Generator, n: int = 6, symmetric: bool = True,
             rank_drop: int = 1) -> Case:
    """$F(x, \\theta) = A(x - \\theta)$ with $A$ singular: $x^* = \\theta$ solves it, but so does
    $\\theta + z$ for any $z$ in the null space, so no derivative exists and any finite answer
    returned without a word is silently wrong."""
    U = _orth(rng, n)
    V = U if symmetric else _orth(rng, n)
    s = rng.uniform(0.5, 2.0, n)
    s[n - rank_drop:] = 0.0
    A = U @ np.diag(s) @ V.T
    theta = rng.standard_normal(n)
    u = rng.standard_normal(n)

    def build(xp, asarray):
        Am = asarray(A)

        def F(x, th):
            return Am @ (x - th)

        def solver(th):
            return th + 0

        return F, solver

    return Case("singular", build, (theta,), u, None, 1e-8,
                info={"n": n, "symmetric": symmetric})


def stopped_early(rng: np.random.Generator, n: int = 6, steps: int = 3,
                  curvature: float = 1.0) -> Case:
    """$F(x, \\theta) = c\\,(x - \\tfrac12\\tanh(Wx) - \\theta)$, $\\|W\\|_2 = 0.9$, solved by
    `steps` fixed-point iterations from 0 (the truth: 400). $c$ (`curvature`) scales F: at
    $c = 10^{-6}$ the residual of an early stop is a millionth of its distance to $x^*$."""
    W = _orth(rng, n) @ np.diag(np.linspace(0.9, 0.3, n)) @ _orth(rng, n).T
    theta = rng.standard_normal(n)
    u = rng.standard_normal(n)
    x = np.zeros(n)
    for _ in range(400):
        x = 0.5 * np.tanh(W @ x) + theta
    Jx = np.eye(n) - 0.5 * (1 - np.tanh(W @ x) ** 2)[:, None] * W
    truth = np.linalg.solve(Jx.T, u)  # dx/dθ = Jx⁻¹ (F's θ-Jacobian is -c I, the c cancels)

    def build(xp, asarray):
        Wm = asarray(W)

        def F(x, th):
            return curvature * (x - 0.5 * xp.tanh(Wm @ x) - th)

        def solver(th):
            z = 0 * th
            for _ in range(steps):
                z = 0.5 * xp.tanh(Wm @ z) + th
            return z

        return F, solver

    return Case("stopped early", build, (theta,), u, truth, 1e-8,
                info={"steps": steps, "curvature": curvature})


def mixed_dtype(rng: np.random.Generator, n: int = 4, steps64: int = 30) -> Case:
    """x = (x32, x64), a float32 leaf and a float64 leaf, each solving its own contraction
    $x_k = \\tfrac12\\tanh(W x_k) + \\theta_k$; the float64 leaf gets `steps64` iterations
    (30 leave a residual near 1e-6: fine for float32, not for float64)."""
    W = _orth(rng, n) @ np.diag(np.linspace(0.6, 0.2, n)) @ _orth(rng, n).T
    th32 = rng.standard_normal(n).astype(np.float32)
    th64 = rng.standard_normal(n)
    u32 = rng.standard_normal(n).astype(np.float32)
    u64 = rng.standard_normal(n)

    def exact(theta):
        x = np.zeros(n)
        for _ in range(400):
            x = 0.5 * np.tanh(W @ x) + theta
        Jx = np.eye(n) - 0.5 * (1 - np.tanh(W @ x) ** 2)[:, None] * W
        return Jx

    truth = (np.linalg.solve(exact(th32.astype(np.float64)).T, u32.astype(np.float64)),
             np.linalg.solve(exact(th64).T, u64))

    def build(xp, asarray):
        W64 = asarray(W)
        W32 = asarray(W.astype(np.float32))

        def F(x, th32, th64):
            a, b = x
            return (a - 0.5 * xp.tanh(W32 @ a) - th32, b - 0.5 * xp.tanh(W64 @ b) - th64)

        def solver(th32, th64):
            a, b = 0 * th32, 0 * th64
            for _ in range(60):
                a = 0.5 * xp.tanh(W32 @ a) + th32
            for _ in range(steps64):
                b = 0.5 * xp.tanh(W64 @ b) + th64
            return (a, b)

        return F, solver

    return Case("mixed dtype", build, (th32, th64), (u32, u64), truth, 1e-8, argnum=-1,
                info={"steps64": steps64})


FAMILIES: dict[str, Callable[..., Case]] = {
    "scaled": scaled,
    "ill-conditioned": ill_conditioned,
    "singular": singular,
    "stopped early": stopped_early,
    "mixed dtype": mixed_dtype,
}


# ---- running one attempt on one backend -------------------------------------------------------


def framework(name: str) -> tuple[Any, Callable[[Any], Any], Callable[[Any], np.ndarray]]:
    """`(xp, asarray, to_numpy)` for "numpy", "jax" or "torch" (float64 kept)."""
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp, np.asarray, np.asarray
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return jnp, jnp.asarray, lambda a: np.asarray(a)
    import array_api_compat.torch as xp
    import torch

    return xp, torch.as_tensor, lambda a: a.detach().cpu().numpy()


def attempt(case: Case, fw: str) -> tuple[Any, list[warnings.WarningMessage]]:
    """Run the case's solver on `fw` and return ($u^\\top J$ as NumPy, the warnings raised)."""
    import implicitdiff as idf

    xp, asarray, to_numpy = framework(fw)
    F, solver = case.build(xp, asarray)
    f = idf.custom_root(F)(solver)
    primals = tuple(asarray(p) for p in case.primals)
    u = tuple(asarray(v) for v in case.u) if isinstance(case.u, tuple) else asarray(case.u)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, pullback = idf.vjp(f, *primals)
        g = pullback(u)
        if isinstance(case.u, tuple):  # mixed dtype: one cotangent per θ leaf, x = (x32, x64)
            out = tuple(to_numpy(gi) for gi in g)
        else:
            out = to_numpy(g[case.argnum])
    return out, list(caught)


def classify(case: Case, fw: str) -> tuple[str, str]:
    """`(outcome, detail)` of one attempt; the outcome is one of `OUTCOMES`."""
    import implicitdiff as idf

    try:
        got, caught = attempt(case, fw)
    except idf.ImplicitDiffError as e:
        return "clear error", f"{type(e).__name__}: {str(e)[:120]}"
    except Exception as e:  # a foreign exception type is the finding
        return "crash", f"{type(e).__name__}: {str(e)[:200]}"
    warned = any(_from_library(w) for w in caught)
    errs = _errors(case, got)
    if errs is not None and all(e <= tol for e, tol in errs):
        return "correct", f"error {max(e for e, _ in errs):.1e}"
    nan = _all_nan(got)
    if nan and not warned:
        return "clear error", "NaN returned"
    if warned:
        return "warned", "; ".join(str(w.message)[:80] for w in caught if _from_library(w))
    detail = ("a finite answer where no derivative exists" if case.truth is None
              else f"error {max(e for e, _ in errs):.1e}" if errs else "")
    return "silent wrong", detail


def _from_library(w: warnings.WarningMessage) -> bool:
    """A warning implicitdiff gave: its own class, or the RuntimeWarning that `on_failure="warn"`
    (and the derivative-source notices) raise; not NumPy's "invalid value encountered"."""
    if w.category.__module__.split(".")[0].startswith("implicitdiff"):
        return True
    return issubclass(w.category, RuntimeWarning) and "encountered" not in str(w.message)


def _leaves(a: Any) -> list[np.ndarray]:
    return [np.asarray(v, dtype=np.float64) for v in (a if isinstance(a, tuple) else (a,))]


def _all_nan(got: Any) -> bool:
    return all(np.isnan(v).any() for v in _leaves(got))


def _errors(case: Case, got: Any) -> list[tuple[float, float]] | None:
    if case.truth is None:
        return None
    out = []
    primals = case.primals if isinstance(case.truth, tuple) else (case.primals[case.argnum],)
    for g, t, p in zip(_leaves(got), _leaves(case.truth), primals):
        if g.shape != t.shape or not np.all(np.isfinite(g)):
            return [(np.inf, case.tol)]
        tol = 1e-3 if np.asarray(p).dtype == np.float32 else case.tol
        out.append((float(np.linalg.norm(g - t) / max(np.linalg.norm(t), 1e-300)), tol))
    return out
