"""External QP solvers for `solve_qp(solver=...)`, run on the host one sample at a time:
OSQP, Clarabel and ProxQP (proxsuite), each where installed. Each returns the solution in the
convention of `_ipm` (Qx + q + Aᵀy + Gᵀz = 0, z ≥ 0) and a status; `solve_qp` then polishes the
answer on its active set and differentiates it as it does the built-in solver's."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import numpy as np

from .._errors import StructureError
from ._ipm import DUAL_INFEASIBLE, MAX_ITER, PRIMAL_INFEASIBLE, SOLVED

EXTERNAL = {"osqp": "osqp", "clarabel": "clarabel", "proxsuite": "proxsuite"}
"""The external solvers by name, with the module each needs."""


def _module(name: str):
    try:
        return importlib.import_module(EXTERNAL[name])
    except ImportError:
        raise StructureError(
            f"solve_qp: solver={name!r} needs the {EXTERNAL[name]!r} package, which is not "
            f"installed. Install it (pip install {EXTERNAL[name]}) or use solver='ipm', the "
            "built-in interior-point method.") from None


def _osqp(mod, Q, q, A, b, G, h, tol, maxiter):
    import scipy.sparse as sp

    p = len(b)
    m_ = mod.OSQP()
    m_.setup(P=sp.csc_matrix(np.triu(Q)), q=q, A=sp.csc_matrix(np.vstack([A, G])),
             l=np.concatenate([b, np.full(len(h), -np.inf)]), u=np.concatenate([b, h]),
             eps_abs=tol, eps_rel=tol, max_iter=max(maxiter, 4000) * 10,
             verbose=False)
    r = m_.solve()
    status = {"solved": SOLVED, "primal infeasible": PRIMAL_INFEASIBLE,
              "dual infeasible": DUAL_INFEASIBLE}.get(str(r.info.status), MAX_ITER)
    y = np.asarray(r.y, dtype=float) if r.y is not None else np.zeros(p + len(h))
    return np.asarray(r.x, dtype=float), y[:p], y[p:], status, int(r.info.iter)


def _clarabel(mod, Q, q, A, b, G, h, tol, maxiter):
    import scipy.sparse as sp

    p = len(b)
    st = mod.DefaultSettings()
    st.verbose = False
    st.tol_gap_abs = st.tol_gap_rel = st.tol_feas = tol
    st.max_iter = maxiter
    cones = ([mod.ZeroConeT(p)] if p else []) + ([mod.NonnegativeConeT(len(h))] if len(h) else [])
    s = mod.DefaultSolver(sp.csc_matrix(np.triu(Q)), q, sp.csc_matrix(np.vstack([A, G])),
                          np.concatenate([b, h]), cones, st).solve()
    status = {"Solved": SOLVED, "PrimalInfeasible": PRIMAL_INFEASIBLE,
              "DualInfeasible": DUAL_INFEASIBLE}.get(str(s.status), MAX_ITER)
    z = np.asarray(s.z, dtype=float)
    return np.asarray(s.x, dtype=float), z[:p], z[p:], status, int(s.iterations)


def _proxsuite(mod, Q, q, A, b, G, h, tol, maxiter):
    r = mod.proxqp.dense.solve(Q, q, A if len(b) else None, b if len(b) else None,
                               G if len(h) else None, np.full(len(h), -1e20) if len(h) else None,
                               h if len(h) else None, eps_abs=tol, max_iter=max(maxiter, 1000))
    name = str(r.info.status).rsplit(".", 1)[-1]
    status = {"PROXQP_SOLVED": SOLVED, "PROXQP_PRIMAL_INFEASIBLE": PRIMAL_INFEASIBLE,
              "PROXQP_DUAL_INFEASIBLE": DUAL_INFEASIBLE}.get(name, MAX_ITER)
    return (np.asarray(r.x, dtype=float), np.asarray(r.y, dtype=float).reshape(len(b)),
            np.asarray(r.z, dtype=float).reshape(len(h)), status, int(r.info.iter))


_RUN: dict[str, Callable] = {"osqp": _osqp, "clarabel": _clarabel, "proxsuite": _proxsuite}


def solve_external(name: str, Q, q, A, b, G, h, *, tol: float, maxiter: int):
    """Solve the batch (NumPy, float64, leading dimension B) with the named solver, sample by
    sample. Returns `(x, y, z, s, iterations, status)` with `s = h - Gx`."""
    mod = _module(name)
    B, n = q.shape
    p, m = b.shape[1], h.shape[1]
    x, y, z = np.zeros((B, n)), np.zeros((B, p)), np.zeros((B, m))
    status, its = np.full(B, MAX_ITER), np.zeros(B, dtype=np.int64)
    for k in range(B):
        try:
            with warnings.catch_warnings():  # the solvers' own API deprecation notices
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                out = _RUN[name](mod, Q[k], q[k], A[k], b[k], G[k], h[k], tol, maxiter)
        except Exception as e:  # the solver's own failure: this sample is not solved
            warnings.warn(f"solve_qp: solver={name!r} failed on sample {k}: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
            continue
        x[k], y[k], z[k], status[k], its[k] = out
    bad = ~np.isfinite(x).all(1) | ~np.isfinite(y).all(1) | ~np.isfinite(z).all(1)
    status[bad & (status == SOLVED)] = MAX_ITER
    x, y, z = (np.where(np.isfinite(a), a, 0.0) for a in (x, y, z))
    z = np.maximum(z, 0.0)
    s = h - (G @ x[..., None])[..., 0]
    return x, y, z, s, its, status
