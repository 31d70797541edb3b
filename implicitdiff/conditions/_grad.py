"""Gradients and transposed Jacobian products of user functions, asked of the backend of the
arrays (`Backend.grad`, `Backend.residual_grad`: `jax.grad`, `torch.func.grad`, ...), and the
complex-step gradient that the NumPy reference's default uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _tree
from .._array import COMPLEX_STEP
from .._backend import convert_constants, get_backend
from .._errors import StructureError


def grad_x(f: Callable[..., Any], x: Any, args: tuple, *, who: str) -> Any:
    """$\\nabla_x f(x, *args)$ for a scalar-valued `f`, shaped like `x`: `Backend.grad` of the
    backend of `x` (NumPy arrays in `args` are converted to it as constants)."""
    bk = get_backend(x)
    return bk.grad(f, x, convert_constants(bk, args, x), who=who)


def vjp_x(fun: Callable[..., Any], x: Any, args: tuple, *, who: str) -> Any:
    """$J^\\top r$ with $r$ = `fun(x, *args)` and $J = \\partial_x$ `fun`: the gradient of
    $\\tfrac12\\|r\\|^2$, from `Backend.residual_grad` of the backend of `x`."""
    bk = get_backend(x)
    return bk.residual_grad(fun, x, convert_constants(bk, args, x),
                            who=who)


def _has_complex(tree: Any) -> bool:
    return any(np.iscomplexobj(leaf) for leaf in _tree.tree_flatten(tree)[0]
               if isinstance(leaf, (np.ndarray, np.generic, complex)))


def complex_step_grad(f: Callable[..., Any], x: Any, args: tuple, *, who: str) -> Any:
    """$\\nabla_x f$ on NumPy arrays by the complex step: entry $j$ is
    $\\operatorname{Im} f(x + i h e_j) / h$, one complex evaluation of `f` per entry of `x`,
    exact to rounding when `f` is written with complex-safe (analytic) NumPy operations.

    A complex-step gradient cannot itself be complex-stepped: when `x` or `args` are already
    complex (the NumPy reference probing $\\partial F$ by the complex step), this raises
    `TypeError`, and the reference falls back to central differences of this exact gradient.
    """
    if _has_complex(x) or _has_complex(args):
        raise TypeError(
            f"{who}: the complex-step gradient cannot run on complex inputs (a complex step "
            "of a complex step); pass a complex-safe grad= for exact second derivatives."
        )
    leaves, treedef = _tree.tree_flatten(x)
    grads = []
    for k, leaf in enumerate(leaves):
        a = np.asarray(leaf)
        g = np.zeros(a.shape, dtype=a.dtype)
        gflat = g.reshape(-1)
        for j in range(a.size):
            pert = a.astype(np.complex128)
            pert.reshape(-1)[j] += 1j * COMPLEX_STEP
            zs = list(leaves)
            zs[k] = pert
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", np.exceptions.ComplexWarning)
                    val = f(_tree.tree_unflatten(treedef, zs), *args)
            except (TypeError, np.exceptions.ComplexWarning) as e:
                raise StructureError(
                    f"{who}: with NumPy arrays the gradient of f comes from the complex step, "
                    f"but f failed on a complex x ({type(e).__name__}: {e}). Write f with "
                    "complex-safe NumPy (no abs/maximum/sign on x, no casts to float, x.T @ x "
                    "rather than vdot), or pass grad=, or use JAX or PyTorch arrays."
                ) from e
            if np.ndim(val) != 0:
                raise StructureError(
                    f"{who}: expected f to return a scalar, got shape {np.shape(val)}."
                )
            if not np.iscomplexobj(val):
                raise StructureError(
                    f"{who}: with NumPy arrays the gradient of f comes from the complex step, "
                    "but f dropped the imaginary part of a complex x (a cast to float, "
                    "np.real, ...). Write f with complex-safe NumPy, or pass grad=, or use JAX "
                    "or PyTorch arrays."
                )
            gflat[j] = np.imag(val) / COMPLEX_STEP
        grads.append(g)
    return _tree.tree_unflatten(treedef, grads)
