"""The built-in problems of `implicitdiff check` (and the ridge layer of `implicitdiff demo`).

Each problem is written once, framework-neutrally: its condition and its forward solver use only
operators (`@`, `+`, `*`, `.T`) and the array-API namespace of their inputs
(`array_api_compat.array_namespace`), so the same decorated solver runs on NumPy arrays, JAX
arrays and torch tensors. `make_args(framework, dtype)` builds the example arguments from a fixed
NumPy random generator and converts them to the framework, importing it only then.

Like the rest of the core, this module never imports jax or torch at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from . import qp as _qp
from ._backend import _table, backend_named, backend_names
from ._linear_solve import CG, GMRES, BiCGStab
from ._root import ImplicitFunction, custom_fixed_point, custom_root
from ._tags import positive_definite, symmetric

__all__ = ["GALLERY", "Problem", "framework_name", "get_problem", "to_framework"]


# ---- converting example arguments to a framework ---------------------------------------------

def framework_name(framework: Any) -> str:
    """The registered backend named by `framework`: a name (`"jax"`), a module (`numpy`,
    `jax.numpy`, `torch`, `array_api_compat.torch`, ...) or an array-API namespace; the first
    dotted part of the module's name that names a backend or its framework."""
    if isinstance(framework, str):
        name = framework
    else:
        name = getattr(framework, "__name__", type(framework).__name__)
    names = backend_names()
    frameworks = {fw: n for n, (fw, _) in _table.items()}
    for part in name.split("."):
        if part in names:
            return part
        if part in frameworks:
            return frameworks[part]
    raise ValueError(
        f"expected a framework among {', '.join(names)} (a name or a module), got "
        f"{framework!r}."
    )


def to_framework(tree: Any, framework: Any, dtype: str = "float64", *, device: Any = None
                 ) -> Any:
    """Convert a pytree (tuples, lists, dicts) of NumPy arrays and Python numbers to `framework`.

    Floating leaves (float arrays and Python floats) become arrays of `dtype`; Python floats become
    0-d arrays. Integer and boolean leaves keep their dtype; Python ints and bools stay as they are.
    The framework is imported here, only when asked for, and the conversion is its backend's
    `from_host`.
    """
    name = framework_name(framework)
    bk = backend_named(name)

    def walk(t: Any) -> Any:
        if isinstance(t, dict):
            return {k: walk(v) for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            out = [walk(v) for v in t]
            if isinstance(t, list):
                return out
            return type(t)(*out) if hasattr(type(t), "_fields") else tuple(out)
        if t is None or isinstance(t, (bool, int, np.bool_)):
            return t
        if isinstance(t, (float, np.floating)):
            return bk.from_host(np.asarray(t, dtype=dtype), device=device)
        arr = np.asarray(t)
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(dtype)
        out_ = bk.from_host(arr, device=device)
        if np.issubdtype(arr.dtype, np.floating):
            _check_dtype(name, out_, dtype)
        return out_

    return walk(tree)


def _check_dtype(name: str, a: Any, dtype: str) -> None:
    got = str(getattr(a, "dtype", "")).rpartition(".")[2]
    if got != np.dtype(dtype).name:
        raise ValueError(
            f"expected {name} arrays of dtype {dtype}, got {got}. For JAX and float64, call "
            'jax.config.update("jax_enable_x64", True) before making the arrays.'
        )


def _eye(xp: Any, n: int, like: Any) -> Any:
    return xp.eye(n, dtype=like.dtype, device=array_api_compat.device(like))


def _rng() -> np.random.Generator:
    return np.random.default_rng(20240617)


# ---- the problems ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """A gallery problem: a decorated solver and a way to build example arguments for it.

    - `name`: short name, as `implicitdiff check` prints it.
    - `description`: one line.
    - `solver`: the decorated solver (`idf.ImplicitFunction`).
    - `numpy_args`: a function returning the example arguments as NumPy arrays.
    """

    name: str
    description: str
    solver: ImplicitFunction
    numpy_args: Callable[[], tuple]

    def make_args(self, framework: Any = "numpy", dtype: str = "float64", *,
                  device: Any = None) -> tuple:
        """The example arguments in `framework` (a name or a module), with floating leaves of
        `dtype`. For JAX and float64, `jax_enable_x64` must be on."""
        return to_framework(self.numpy_args(), framework, dtype, device=device)


# 1. Ridge regression: x*(λ, A, b) = argmin ½‖Ax − b‖² + ½λ‖x‖². ∂ₓF = AᵀA + λI, SPD.

def ridge_condition(x: Any, lam: Any, A: Any, b: Any) -> Any:
    """∇ of ½‖Ax − b‖² + ½λ‖x‖²."""
    return A.T @ (A @ x - b) + lam * x


@custom_root(ridge_condition, solve=CG(), tags={symmetric, positive_definite})
def ridge(lam: Any, A: Any, b: Any) -> Any:
    """Closed-form ridge regression: $(A^\\top A + \\lambda I)^{-1} A^\\top b$."""
    xp = array_api_compat.array_namespace(A, b)
    return xp.linalg.solve(A.T @ A + lam * _eye(xp, A.shape[1], A), A.T @ b)


def _ridge_args() -> tuple:
    rng = _rng()
    A = rng.standard_normal((24, 12))
    b = rng.standard_normal(24)
    return np.asarray(0.7), A, b


# 2. Contraction fixed point x = tanh(W x + U θ), ‖W‖₂ = 0.5, so T is a 0.5-contraction in x.

_FP_ITERATIONS = 60  # 0.5**60 ≈ 1e-18: far below 1e-14 from x0 = 0 (‖x*‖ ≤ √n)


def tanh_layer(x: Any, theta: Any, W: Any, U: Any) -> Any:
    """T(x, θ, W, U) = tanh(W x + U θ)."""
    xp = array_api_compat.array_namespace(x, theta)
    return xp.tanh(W @ x + U @ theta)


@custom_fixed_point(tanh_layer, solve=GMRES())
def fixed_point(theta: Any, W: Any, U: Any) -> Any:
    """Picard iteration, a fixed number of steps (a plain Python loop: any framework)."""
    xp = array_api_compat.array_namespace(theta, W)
    x = xp.zeros(W.shape[0], dtype=W.dtype, device=array_api_compat.device(W))
    for _ in range(_FP_ITERATIONS):
        x = tanh_layer(x, theta, W, U)
    return x


def _fixed_point_args() -> tuple:
    rng = _rng()
    n, p = 12, 5
    W = rng.standard_normal((n, n))
    W *= 0.5 / np.linalg.norm(W, 2)
    U = rng.standard_normal((n, p)) / np.sqrt(p)
    theta = rng.standard_normal(p)
    return theta, W, U


# 3. Strongly convex stationarity: x* = argmin ½xᵀQx + Σ softplus(x) − θᵀx, Q SPD.
#    F = ∇f = Qx + σ(x) − θ; ∂ₓF = Q + diag(σ'(x)) is SPD.

def _sigmoid(xp: Any, x: Any) -> Any:
    return 1.0 / (1.0 + xp.exp(-x))


def softplus_gradient(x: Any, theta: Any, Q: Any) -> Any:
    """∇ₓ of ½xᵀQx + Σ softplus(x) − θᵀx."""
    xp = array_api_compat.array_namespace(x, theta)
    return Q @ x + _sigmoid(xp, x) - theta


_NEWTON_ITERATIONS = 30


@custom_root(softplus_gradient, solve=CG(), tags={symmetric, positive_definite})
def stationary(theta: Any, Q: Any) -> Any:
    """Newton's method, a fixed number of steps, from x0 = 0."""
    xp = array_api_compat.array_namespace(theta, Q)
    n = Q.shape[0]
    eye = _eye(xp, n, Q)
    x = xp.zeros(n, dtype=Q.dtype, device=array_api_compat.device(Q))
    for _ in range(_NEWTON_ITERATIONS):
        s = _sigmoid(xp, x)
        H = Q + eye * (s * (1.0 - s))[None, :]
        x = x - xp.linalg.solve(H, softplus_gradient(x, theta, Q))
    return x


def _stationary_args() -> tuple:
    rng = _rng()
    n = 12
    L = rng.standard_normal((n, n)) / np.sqrt(n)
    Q = L @ L.T + 0.5 * np.eye(n)
    theta = 2.0 * rng.standard_normal(n)
    return theta, Q


# 4. A non-symmetric root problem: M x + 0.1 tanh(x) = θ, M = 2I + S with ‖S‖₂ = 0.8.
#    ∂ₓF = M + 0.1 diag(1 − tanh²x) is non-symmetric and well conditioned.

def nonsymmetric_condition(x: Any, theta: Any, M: Any) -> Any:
    """M x + 0.1 tanh(x) − θ."""
    xp = array_api_compat.array_namespace(x, theta)
    return M @ x + 0.1 * xp.tanh(x) - theta


@custom_root(nonsymmetric_condition, solve=BiCGStab())
def nonsymmetric(theta: Any, M: Any) -> Any:
    """Newton's method, a fixed number of steps, from x0 = 0."""
    xp = array_api_compat.array_namespace(theta, M)
    n = M.shape[0]
    eye = _eye(xp, n, M)
    x = xp.zeros(n, dtype=M.dtype, device=array_api_compat.device(M))
    for _ in range(_NEWTON_ITERATIONS):
        t = xp.tanh(x)
        J = M + eye * (0.1 * (1.0 - t * t))[None, :]
        x = x - xp.linalg.solve(J, nonsymmetric_condition(x, theta, M))
    return x


def _nonsymmetric_args() -> tuple:
    rng = _rng()
    n = 12
    S = rng.standard_normal((n, n))
    S *= 0.8 / np.linalg.norm(S, 2)
    M = 2.0 * np.eye(n) + S
    theta = rng.standard_normal(n)
    return theta, M


# 5. A quadratic program (`idf.qp`): x* = argmin ½xᵀQx + qᵀx s.t. Ax = b, Gx ≤ h, solved by the
#    built-in interior-point method; its condition is the active-set KKT system.

def _qp_args() -> tuple:
    rng = _rng()
    n, p, m = 6, 2, 8
    L = rng.standard_normal((n, n))
    Q = L @ L.T / n + 0.5 * np.eye(n)
    A = rng.standard_normal((p, n))
    G = rng.standard_normal((m, n))
    x_star = rng.standard_normal(n)
    y_star = rng.standard_normal(p)
    active = np.arange(m) < 3                      # three constraints active, five with slack
    z_star = np.where(active, rng.uniform(0.5, 1.5, m), 0.0)
    h = G @ x_star + np.where(active, 0.0, rng.uniform(0.5, 1.5, m))
    q = -(Q @ x_star + A.T @ y_star + G.T @ z_star)
    return Q, q, A, A @ x_star, G, h


GALLERY: dict[str, Problem] = {
    p.name: p for p in [
        Problem("ridge", "ridge regression, closed form; CG backward (symmetric PD)",
                ridge, _ridge_args),
        Problem("fixed_point", "x = tanh(Wx + Uθ), ‖W‖₂ = 0.5, Picard; GMRES backward",
                fixed_point, _fixed_point_args),
        Problem("stationary", "∇(½xᵀQx + Σ softplus(x) − θᵀx) = 0, Newton; CG backward",
                stationary, _stationary_args),
        Problem("nonsymmetric", "Mx + 0.1 tanh(x) = θ, M non-symmetric, Newton; BiCGStab "
                "backward", nonsymmetric, _nonsymmetric_args),
        Problem("qp", "idf.qp: QP with 2 equalities, 3 of 8 inequalities active; "
                "interior point, KKT backward (Dense)", _qp.qp_function(), _qp_args),
    ]
}
"""The built-in problems by name."""


def get_problem(name: str) -> Problem:
    """The gallery problem called `name`."""
    try:
        return GALLERY[name]
    except KeyError:
        raise KeyError(
            f"expected a gallery problem ({', '.join(GALLERY)}), got {name!r}."
        ) from None
