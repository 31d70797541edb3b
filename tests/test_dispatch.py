"""One dispatch: NumPy arrays beside JAX or torch arrays are constants of that framework, in
`custom_root`, the transforms, the conditions and the SciPy drop-ins; two differentiable
frameworks in one call are an error; `solve=` is the one name of the backward linear solver
(the old `linear_solver=` warns); the core names no framework.

The oracle is the same call with every array in the framework (and, for the values, the closed
form of ridge regression's derivative): mixing must change nothing but the inputs' type.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from frameworks import HAVE_TORCH, torch  # noqa: E402

import implicitdiff as idf  # noqa: E402
import implicitdiff.conditions as cond  # noqa: E402
import implicitdiff.scipy as isc  # noqa: E402

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")

RNG = np.random.default_rng(7)
A_NP = RNG.standard_normal((8, 4))
B_NP = RNG.standard_normal(8)
LAM = 0.7


def F(x, lam, A, b):
    return A.T @ (A @ x - b) + lam * x


@idf.custom_root(F, solve=idf.CG(rtol=1e-12), tags={idf.symmetric, idf.positive_definite})
def ridge(lam, A, b):
    import array_api_compat

    xp = array_api_compat.array_namespace(A)
    n = A.shape[1]
    return xp.linalg.solve(A.T @ A + lam * xp.eye(n, dtype=A.dtype), A.T @ b)


def dx_dlam_np(lam, A, b):
    """Closed form: x = M⁻¹Aᵀb, M = AᵀA + λI ⇒ dx/dλ = −M⁻¹x."""
    M = A.T @ A + lam * np.eye(A.shape[1])
    x = np.linalg.solve(M, A.T @ b)
    return -np.linalg.solve(M, x)


def to_np(a):
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


# ---- custom_root: a JAX or torch λ with NumPy A, b ----------------------------------------------

def test_custom_root_jax_lambda_numpy_data_grad_jvp_vjp():
    lam = jnp.asarray(LAM)
    Aj, bj = jnp.asarray(A_NP), jnp.asarray(B_NP)
    x_mix = ridge(lam, A_NP, B_NP)
    x_all = ridge(lam, Aj, bj)
    assert isinstance(x_mix, jax.Array)
    np.testing.assert_allclose(x_mix, x_all, rtol=1e-12)
    g_mix = jax.grad(lambda l: jnp.sum(ridge(l, A_NP, B_NP)))(lam)
    g_all = jax.grad(lambda l: jnp.sum(ridge(l, Aj, bj)))(lam)
    np.testing.assert_allclose(g_mix, g_all, rtol=1e-10)
    np.testing.assert_allclose(g_mix, np.sum(dx_dlam_np(LAM, A_NP, B_NP)), rtol=1e-8)
    # jvp / vjp: JAX's own and idf's (the NumPy primals are constants: no tangent, cotangent None)
    _, xdot = jax.jvp(lambda l: ridge(l, A_NP, B_NP), (lam,), (jnp.asarray(1.0),))
    np.testing.assert_allclose(xdot, dx_dlam_np(LAM, A_NP, B_NP), rtol=1e-8)
    _, xdot2 = idf.jvp(ridge, (lam, A_NP, B_NP), (1.0, np.ones_like(A_NP), np.ones_like(B_NP)))
    np.testing.assert_allclose(xdot2, xdot, rtol=1e-12)
    u = np.arange(4.0)
    _, vjp_fn = idf.vjp(ridge, lam, A_NP, B_NP)
    dlam, dA, db = vjp_fn(jnp.asarray(u))
    assert dA is None and db is None
    np.testing.assert_allclose(dlam, u @ dx_dlam_np(LAM, A_NP, B_NP), rtol=1e-8)
    _, vjp_all = idf.vjp(ridge, lam, Aj, bj)
    np.testing.assert_allclose(dlam, vjp_all(jnp.asarray(u))[0], rtol=1e-10)
    J = idf.jacobian(ridge, 0)(lam, A_NP, B_NP)
    np.testing.assert_allclose(J, dx_dlam_np(LAM, A_NP, B_NP), rtol=1e-8)
    with pytest.raises(idf.StructureError, match="constant"):
        idf.jacobian(ridge, 1)(lam, A_NP, B_NP)


def test_custom_root_jax_mixed_under_jit():
    g = jax.jit(jax.grad(lambda l: jnp.sum(ridge(l, A_NP, B_NP))))(jnp.asarray(LAM))
    np.testing.assert_allclose(g, np.sum(dx_dlam_np(LAM, A_NP, B_NP)), rtol=1e-8)


@needs_torch
def test_custom_root_torch_lambda_numpy_data_grad_jvp_vjp():
    assert torch is not None
    At, bt = torch.asarray(A_NP), torch.asarray(B_NP)
    lam = torch.tensor(LAM, dtype=torch.float64, requires_grad=True)
    x_mix = ridge(lam, A_NP, B_NP)
    assert isinstance(x_mix, torch.Tensor)
    np.testing.assert_allclose(to_np(x_mix), to_np(ridge(lam, At, bt)), rtol=1e-12)
    x_mix.sum().backward()
    g_mix = lam.grad.clone()
    lam.grad = None
    ridge(lam, At, bt).sum().backward()
    np.testing.assert_allclose(to_np(g_mix), to_np(lam.grad), rtol=1e-10)
    np.testing.assert_allclose(to_np(g_mix), np.sum(dx_dlam_np(LAM, A_NP, B_NP)), rtol=1e-8)
    lam0 = torch.tensor(LAM, dtype=torch.float64)
    _, xdot = idf.jvp(ridge, (lam0, A_NP, B_NP),
                      (torch.tensor(1.0, dtype=torch.float64), A_NP, B_NP))
    np.testing.assert_allclose(to_np(xdot), dx_dlam_np(LAM, A_NP, B_NP), rtol=1e-8)
    _, xdot_t = torch.func.jvp(lambda l: ridge(l, A_NP, B_NP), (lam0,),
                               (torch.tensor(1.0, dtype=torch.float64),))
    np.testing.assert_allclose(to_np(xdot_t), to_np(xdot), rtol=1e-10)
    u = torch.arange(4.0, dtype=torch.float64)
    _, vjp_fn = idf.vjp(ridge, lam0, A_NP, B_NP)
    dlam, dA, db = vjp_fn(u)
    assert dA is None and db is None
    np.testing.assert_allclose(to_np(dlam), to_np(u) @ dx_dlam_np(LAM, A_NP, B_NP), rtol=1e-8)


@needs_torch
def test_custom_root_torch_float32_numpy_constants_take_the_tensor_dtype():
    assert torch is not None
    lam = torch.tensor(LAM, dtype=torch.float32, requires_grad=True)

    @idf.custom_root(F, residual_tol=1e-3)
    def ridge32(lam, A, b):
        n = A.shape[1]
        return torch.linalg.solve(A.T @ A + lam * torch.eye(n), A.T @ b)

    x = ridge32(lam, A_NP, B_NP)
    assert x.dtype == torch.float32
    x.sum().backward()
    np.testing.assert_allclose(float(lam.grad), np.sum(dx_dlam_np(LAM, A_NP, B_NP)), rtol=1e-3)


@needs_torch
def test_two_differentiable_frameworks_are_an_error():
    assert torch is not None
    with pytest.raises(idf.BackendNotFoundError, match="several"):
        ridge(jnp.asarray(LAM), torch.asarray(A_NP), B_NP)
    with pytest.raises(idf.BackendNotFoundError, match="several"):
        idf.get_backend((jnp.ones(2), torch.ones(2), np.ones(2)))


def test_get_backend_numpy_alone_and_beside_jax():
    assert idf.get_backend((np.ones(2), 1.0)).name == "numpy"
    assert idf.get_backend((np.ones(2), jnp.ones(2))).name == "jax"


# ---- the conditions -----------------------------------------------------------------------------

def _half_sq_loss(x, A, b):
    r = A @ x - b
    return 0.5 * (r @ r)


@pytest.mark.parametrize("fw", ["jax", *(["torch"] if HAVE_TORCH else [])])
def test_conditions_take_numpy_constants(fw):
    conv = jnp.asarray if fw == "jax" else torch.asarray
    x = conv(RNG.standard_normal(4))
    for condition in (cond.stationarity(_half_sq_loss),
                      cond.least_squares(lambda x, A, b: A @ x - b)):
        mixed = condition(x, A_NP, B_NP)
        whole = condition(x, conv(A_NP), conv(B_NP))
        np.testing.assert_allclose(to_np(mixed), to_np(whole), rtol=1e-12)
        np.testing.assert_allclose(to_np(mixed), A_NP.T @ (A_NP @ to_np(x) - B_NP), rtol=1e-10)


# ---- the SciPy drop-ins: solve= is the name, linear_solver= warns -------------------------------

def _quad(x, lam, A, b):
    r = A @ x - b
    return 0.5 * (r @ r) + 0.5 * lam * (x @ x)


def test_scipy_solve_keyword_and_deprecated_linear_solver():
    lam = jnp.asarray(LAM)

    def xstar(l, **kw):
        return isc.minimize(_quad, np.zeros(4), args=(l, A_NP, B_NP), method="BFGS",
                            tol=1e-12, **kw).x

    g_new = jax.grad(lambda l: jnp.sum(xstar(l, solve=idf.CG(rtol=1e-12))))(lam)
    np.testing.assert_allclose(g_new, np.sum(dx_dlam_np(LAM, A_NP, B_NP)), rtol=1e-6)
    with pytest.warns(DeprecationWarning, match="solve="):
        g_old = jax.grad(lambda l: jnp.sum(xstar(l, linear_solver=idf.CG(rtol=1e-12))))(lam)
    np.testing.assert_allclose(g_old, g_new, rtol=1e-12)
    with pytest.raises(TypeError, match="both"):
        xstar(lam, solve=idf.CG(), linear_solver=idf.CG())


@pytest.mark.parametrize("drop_in", ["root", "fixed_point", "root_scalar", "least_squares",
                                     "wrap_solver"])
def test_every_drop_in_warns_on_linear_solver(drop_in):
    lam = 0.5
    with pytest.warns(DeprecationWarning, match="linear_solver"):
        if drop_in == "root":
            isc.root(lambda x, t: x - t, np.zeros(2), args=(np.ones(2),),
                     linear_solver=idf.Dense())
        elif drop_in == "fixed_point":
            isc.fixed_point(lambda x, t: 0.5 * x + t, np.zeros(2), args=(np.ones(2),),
                            linear_solver=idf.Dense())
        elif drop_in == "root_scalar":
            isc.root_scalar(lambda x, t: x - t, args=(lam,), bracket=(-2.0, 2.0),
                            linear_solver=idf.Dense())
        elif drop_in == "least_squares":
            isc.least_squares(lambda x, t: x - t, np.zeros(2), args=(np.ones(2),),
                              linear_solver=idf.Dense())
        else:
            isc.wrap_solver(lambda x, t: x - t, linear_solver=idf.Dense())(lambda t: t)


def test_scipy_drop_in_jax_theta_numpy_data_matches_all_jax():
    lam = jnp.asarray(LAM)

    def loss(l, A, b):
        return jnp.sum(isc.minimize(_quad, np.zeros(4), args=(l, A, b), method="BFGS",
                                    tol=1e-12).x)

    g_mix = jax.grad(loss)(lam, A_NP, B_NP)
    g_all = jax.grad(loss)(lam, jnp.asarray(A_NP), jnp.asarray(B_NP))
    np.testing.assert_allclose(g_mix, g_all, rtol=1e-8)


# ---- newton: solve= ------------------------------------------------------------------------------

def test_newton_solve_keyword_and_deprecated_linear_solver():
    from implicitdiff.solvers import newton

    def G(z, t):
        return z ** 3 + z - t

    t = np.linspace(-1.0, 1.0, 3)
    new = newton(G, np.zeros(3), t, solve=idf.Dense(), tol=1e-12)
    with pytest.warns(DeprecationWarning, match="solve="):
        old = newton(G, np.zeros(3), t, linear_solver=idf.Dense(), tol=1e-12)
    np.testing.assert_array_equal(new.value, old.value)
    with pytest.raises(TypeError, match="both"):
        newton(G, np.zeros(3), t, solve=idf.Dense(), linear_solver=idf.Dense())


# ---- one residual tolerance formula ----------------------------------------------------------

def test_one_default_residual_tol():
    from implicitdiff._root import default_residual_tol

    eps = float(np.finfo(np.float64).eps)
    assert default_residual_tol(eps) == 10 * np.sqrt(eps)
    assert default_residual_tol(eps, floor=1e-4) == 1e-4
    eps32 = float(np.finfo(np.float32).eps)
    assert default_residual_tol(eps32, floor=1e-4) == 10 * np.sqrt(eps32)


# ---- the core names no framework ---------------------------------------------------------------

def test_core_does_not_branch_on_framework_names():
    root = Path(idf.__file__).parent
    name = r"""["'](jax|torch)["']"""
    pattern = re.compile(rf"(==|!=|\bin\b)\s*\(?\s*{name}|{name}\s*(==|!=|\bin\b|\bnot in\b)")
    hits = []
    for path in root.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_equinox_style_nodes_are_flattened_by_the_backend_hook():
    # a pytree node registered with jax.tree_util only: the registry asks the backends
    # (Backend.flattens) and finds the JAX arrays inside it
    @jax.tree_util.register_pytree_node_class
    class Box:
        def __init__(self, a):
            self.a = a

        def tree_flatten(self):
            return (self.a,), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(*children)

    assert idf.get_backend((Box(jnp.ones(2)),)).name == "jax"


def test_core_import_stays_framework_free():
    code = ("import sys, implicitdiff, implicitdiff.scipy, implicitdiff.conditions; "
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
