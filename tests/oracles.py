"""Independent oracles for the implicit derivatives: plain NumPy, no implicitdiff code at all.

- `central_fd`: fourth-order central finite differences of a whole solver map θ ↦ x*(θ) along
  one direction, each point computed by a high-accuracy forward solve (the solve is ~1e-15
  accurate, the step 1e-3, so the truncation error ~h⁴ and the rounding error ~1e-15/h both stay
  far below the 1e-6 the tests ask for).
- `dense_ift`: the dense formula J = −A⁻¹B from Jacobians derived by hand for each problem
  family below (`jacobians`), never from F itself.
- Problem families drawn well-posed: bounded condition numbers, contractions with ‖W‖₂ ≤ 0.5,
  strongly convex objectives with Q ≻ I.

This module must not import `implicitdiff` or `implicitdiff_numpy`: it is the yardstick they are
measured against, so it shares no code (pytrees included) with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# ---- a pytree of our own: tuples, lists, dicts (sorted keys), None; float leaves only ----------


def _is_float_leaf(leaf: Any) -> bool:
    if isinstance(leaf, (bool, int, np.integer, np.bool_)):
        return False
    if isinstance(leaf, float):
        return True
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and np.issubdtype(dtype, np.floating)


def _walk(tree: Any) -> list[Any]:
    if tree is None:
        return []
    if isinstance(tree, (tuple, list)):
        return [leaf for t in tree for leaf in _walk(t)]
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree, key=repr) for leaf in _walk(tree[k])]
    return [tree]


def _rebuild(tree: Any, it: Any) -> Any:
    if tree is None:
        return None
    if isinstance(tree, (tuple, list)):
        kids = [_rebuild(t, it) for t in tree]
        return type(tree)(kids) if type(tree) in (tuple, list) else type(tree)(*kids)
    if isinstance(tree, dict):
        built = {k: _rebuild(tree[k], it) for k in sorted(tree, key=repr)}
        return {k: built[k] for k in tree}
    return next(it)


def flatten(tree: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """The floating leaves of `tree` raveled (row-major) into one float64 vector, and the map back.

    Non-floating leaves (ints, bools, integer arrays) are not in the vector; `unflatten` puts the
    originals back. A Python float comes back as a Python float.
    """
    leaves = _walk(tree)
    fl = [leaf for leaf in leaves if _is_float_leaf(leaf)]
    vec = (np.concatenate([np.ravel(np.asarray(leaf, dtype=np.float64)) for leaf in fl])
           if fl else np.zeros(0))

    def unflatten(v: np.ndarray) -> Any:
        out, start = [], 0
        for leaf in leaves:
            if not _is_float_leaf(leaf):
                out.append(leaf)
                continue
            size = int(np.size(leaf))
            piece = np.asarray(v[start:start + size]).reshape(np.shape(leaf))
            out.append(float(piece) if isinstance(leaf, float) else piece.astype(leaf.dtype))
            start += size
        return _rebuild(tree, iter(out))

    return vec, unflatten


def vec(tree: Any) -> np.ndarray:
    """The floating leaves of `tree` as one float64 vector (None-valued leaves are skipped)."""
    return flatten(tree)[0]


def rel_err(a: Any, b: Any) -> float:
    """‖a − b‖ / ‖b‖ on the flattened trees (absolute when ‖b‖ is 0)."""
    va, vb = vec(a), vec(b)
    if va.shape != vb.shape:
        raise AssertionError(f"shapes differ: {va.shape} vs {vb.shape}")
    nb = float(np.linalg.norm(vb))
    return float(np.linalg.norm(va - vb)) / (nb if nb > 0 else 1.0)


# ---- the finite-difference oracle ----------------------------------------------------------


def central_fd(fun: Callable[..., Any], primals: tuple, direction: Any, *,
               h: float = 1e-3) -> Any:
    """The directional derivative of `fun(*primals)` along `direction` (a tree like `primals`),
    by the fourth-order central stencil (−f(2h) + 8f(h) − 8f(−h) + f(−2h)) / 12h.

    The step is `h` relative to the largest entry of the primals and of the direction. Returns a
    tree shaped like the output of `fun`.
    """
    p0, unflat = flatten(tuple(primals))
    d = vec(tuple(direction))
    if d.shape != p0.shape:
        raise AssertionError(f"direction has {d.size} floating entries, primals {p0.size}")
    step = h * max(1.0, float(np.max(np.abs(p0)))) / max(float(np.max(np.abs(d))), 1e-300)
    outs = {s: fun(*unflat(p0 + s * step * d)) for s in (-2, -1, 1, 2)}
    o = {s: vec(v) for s, v in outs.items()}
    deriv = (-o[2] + 8 * o[1] - 8 * o[-1] + o[-2]) / (12 * step)
    return flatten(outs[1])[1](deriv)


def random_direction(rng: np.random.Generator, tree: Any) -> Any:
    """A random tree like `tree` (standard normal on floating leaves, None elsewhere)."""
    v, unflat = flatten(tree)
    out = unflat(rng.standard_normal(v.shape))
    leaves = _walk(tree)
    got = _walk(out)
    return _rebuild(tree, iter([g if _is_float_leaf(leaf) else None
                                for leaf, g in zip(leaves, got)]))


# ---- the dense formula ---------------------------------------------------------------------


def dense_ift(A: np.ndarray, Bs: list[np.ndarray]) -> np.ndarray:
    """J = −A⁻¹ [B₁ … B_k]: the Jacobian of x* in all the (raveled, concatenated) parameters."""
    return -np.linalg.solve(A, np.concatenate(Bs, axis=1))


def _outer_rows(x: np.ndarray, n: int) -> np.ndarray:
    """∂(M x)/∂M for an n-row M raveled row-major: row i holds x in the columns of M's row i."""
    return np.kron(np.eye(n), x[None, :])


# ---- problem families ----------------------------------------------------------------------


class LinearFamily:
    """A(θ) x = b(θ) with A(θ) = A0 + θ₀ A1, b(θ) = b0 + θ₁ b1; cond(A(θ)) ≤ 7.

    A0 = U diag(s) Vᵀ (non-symmetric) with s in [1, 3], ‖A1‖₂ = 1 and |θ₀| ≤ 0.5.
    Arguments: (theta (2,), A0 (n, n), A1 (n, n), b0 (n,), b1 (n,)).
    """

    spd = False

    @staticmethod
    def make(rng: np.random.Generator, n: int) -> tuple:
        U = np.linalg.qr(rng.standard_normal((n, n)))[0]
        V = np.linalg.qr(rng.standard_normal((n, n)))[0]
        A0 = U @ np.diag(rng.uniform(1.0, 3.0, n)) @ V.T
        A1 = rng.standard_normal((n, n))
        A1 /= np.linalg.norm(A1, 2)
        theta = rng.uniform(-0.5, 0.5, 2)
        return theta, A0, A1, rng.standard_normal(n), rng.standard_normal(n)

    @staticmethod
    def F(x, theta, A0, A1, b0, b1):
        return (A0 + theta[0] * A1) @ x - (b0 + theta[1] * b1)

    @staticmethod
    def solve(theta, A0, A1, b0, b1):
        return np.linalg.solve(A0 + theta[0] * A1, b0 + theta[1] * b1)

    @staticmethod
    def jacobians(x, theta, A0, A1, b0, b1):
        n = x.shape[0]
        A = A0 + theta[0] * A1
        B_theta = np.stack([A1 @ x, -b1], axis=1)
        return A, [B_theta, _outer_rows(x, n), theta[0] * _outer_rows(x, n), -np.eye(n),
                   -theta[1] * np.eye(n)]


class ContractionFamily:
    """x = T(x, θ) = tanh(W x + U θ + c) with ‖W‖₂ ≤ 0.5 (a contraction: tanh is 1-Lipschitz).

    Arguments: (theta (p,), W (n, n), U (n, p), c (n,)). F = T − x, A = D W − I with
    D = diag(1 − tanh²(W x + U θ + c)).
    """

    spd = False
    p = 3

    @classmethod
    def make(cls, rng: np.random.Generator, n: int) -> tuple:
        W = rng.standard_normal((n, n))
        W *= rng.uniform(0.1, 0.5) / np.linalg.norm(W, 2)
        U = rng.standard_normal((n, cls.p)) / np.sqrt(cls.p)
        return rng.standard_normal(cls.p), W, U, 0.5 * rng.standard_normal(n)

    @staticmethod
    def T(x, theta, W, U, c):
        return np.tanh(W @ x + U @ theta + c)

    @classmethod
    def F(cls, x, theta, W, U, c):
        return cls.T(x, theta, W, U, c) - x

    @classmethod
    def solve(cls, theta, W, U, c):
        x = np.zeros(W.shape[0])
        for _ in range(300):
            x_new = cls.T(x, theta, W, U, c)
            done = np.max(np.abs(x_new - x)) <= 1e-15
            x = x_new
            if done:
                break
        return x

    @staticmethod
    def jacobians(x, theta, W, U, c):
        n = x.shape[0]
        d = 1.0 - np.tanh(W @ x + U @ theta + c) ** 2
        D = np.diag(d)
        return D @ W - np.eye(n), [D @ U, D @ _outer_rows(x, n), D @ _outer_rows(theta, n), D]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class ConvexFamily:
    """Stationarity of f(x, θ) = ½xᵀQx + Σᵢ log(1 + exp(xᵢ)) − θᵀx, Q SPD with spectrum in
    [1, 4]: F = ∇ₓf = Q x + σ(x) − θ, A = Q + diag(σ(x)(1 − σ(x))) (symmetric positive definite).

    Arguments: (theta (n,), Q (n, n)).
    """

    spd = True

    @staticmethod
    def make(rng: np.random.Generator, n: int) -> tuple:
        V = np.linalg.qr(rng.standard_normal((n, n)))[0]
        Q = V @ np.diag(rng.uniform(1.0, 4.0, n)) @ V.T
        return 2.0 * rng.standard_normal(n), (Q + Q.T) / 2

    @staticmethod
    def F(x, theta, Q):
        return Q @ x + sigmoid(x) - theta

    @classmethod
    def solve(cls, theta, Q):
        """Newton's method to full precision (Q may be non-symmetric when perturbed by FD)."""
        x = np.zeros(Q.shape[0])
        for _ in range(60):
            s = sigmoid(x)
            step = np.linalg.solve(Q + np.diag(s * (1 - s)), cls.F(x, theta, Q))
            x = x - step
            if np.max(np.abs(step)) <= 1e-15 * max(1.0, float(np.max(np.abs(x)))):
                break
        return x

    @staticmethod
    def jacobians(x, theta, Q):
        n, s = x.shape[0], sigmoid(x)
        return Q + np.diag(s * (1 - s)), [-np.eye(n), _outer_rows(x, n)]


def split_columns(J: np.ndarray, args: tuple) -> list[np.ndarray]:
    """The column blocks of J belonging to each floating argument, reshaped to
    `x.shape + arg.shape` (for a vector x); None for non-floating arguments."""
    out, start = [], 0
    for a in args:
        if not _is_float_leaf(a):
            out.append(None)
            continue
        size = int(np.size(a))
        out.append(J[:, start:start + size].reshape((J.shape[0], *np.shape(a))))
        start += size
    return out
