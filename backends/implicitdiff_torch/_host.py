"""The PyTorch backend's host side: NumPy conversion (constants take the device, and floating ones
the dtype, of the tensors they join: torch does not promote in `@`), and host functions for
SciPy from `torch.func.grad_and_value`, `torch.func.hessian`, `torch.func.jacfwd`, on tensors of
the dtype and device of the call's reference tensor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.func
from torch._C import _functorch as _ft  # pyright: ignore

from implicitdiff import backend as core
from implicitdiff.backend import host_scalar


def _dtype(like: Any) -> torch.dtype:
    if isinstance(like, torch.Tensor) and like.is_floating_point():
        return like.dtype
    return torch.float64


def _device(like: Any) -> Any:
    return like.device if isinstance(like, torch.Tensor) else None


def physical(t: torch.Tensor) -> torch.Tensor:
    """The tensor under every `torch.func` wrapper (under `vmap`, all batch elements at once):
    what a failure check looks at, below the transforms, to decide and to report."""
    while _ft.is_functorch_wrapped_tensor(t):
        t = _ft.get_unwrapped(t)
    return t


def to_host_leaf(a: Any) -> Any:
    """One leaf on the host: a tensor detached, on the CPU, as NumPy."""
    if isinstance(a, torch.Tensor):
        return physical(a).detach().cpu().numpy()
    return np.asarray(a) if hasattr(a, "dtype") else a


def from_host_leaves(leaves: list, like: Any = None, device: Any = None) -> list:
    """NumPy leaves as tensors on `device` (else `like`'s), floating ones cast to `like`'s
    floating dtype (torch does not promote in `@`); other leaves unchanged."""
    dev = device if device is not None else _device(like)
    cast = isinstance(like, torch.Tensor) and like.is_floating_point()

    def conv(a: Any) -> Any:
        if isinstance(a, (np.ndarray, np.generic)):
            t = torch.as_tensor(np.array(a), device=dev)
            return t.to(like.dtype) if cast and t.is_floating_point() else t
        return a

    return [conv(a) for a in leaves]


def host_array(x: Any, like: Any = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.array(x), device=_device(like))
    return t.to(dtype=_dtype(like))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def _np_tree(out: Any) -> Any:
    def conv(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        return np.asarray(a, dtype=np.float64) if hasattr(a, "dtype") or isinstance(
            a, (float, int)) else a

    return core.tree_map(conv, out)


def host_function(f: Callable[..., Any], theta: tuple, like: Any, scalar: bool
                  ) -> Callable[..., Any]:
    dtype, device = _dtype(like), _device(like)

    def t(x: Any) -> torch.Tensor:
        return torch.as_tensor(np.array(x), dtype=dtype, device=device)

    def h(x: Any, *extra: Any) -> Any:
        with torch.no_grad():
            out = f(t(x), *[t(e) for e in extra], *theta)
        return host_scalar(to_host_leaf(out)) if scalar else _np_tree(out)

    return h


def host_derivative(f: Callable[..., Any], theta: tuple, kind: str, like: Any
                    ) -> Callable[..., Any] | None:
    dtype, device = _dtype(like), _device(like)
    func = torch.func

    def t(x: Any) -> torch.Tensor:
        return torch.as_tensor(np.array(x), dtype=dtype, device=device)

    if kind == "value_and_grad":
        gv = func.grad_and_value(lambda x: f(x, *theta))

        def vg(x: Any) -> tuple[float, np.ndarray]:
            g, v = gv(t(x))
            return float(v), _np(g)

        return vg
    if kind == "hessian":
        H = func.hessian(lambda x: f(x, *theta))
        return lambda x: _np(H(t(x)))
    if kind == "hessp":
        grad = func.grad(lambda x: f(x, *theta))
        return lambda x, p: _np(func.jvp(grad, (t(x),), (t(p),))[1])
    if kind == "jacobian":
        J = func.jacfwd(lambda x: f(x, *theta))
        return lambda x: np.atleast_2d(_np(J(t(x))))
    if kind in ("derivative", "second_derivative"):
        d = func.grad(lambda x: f(x, *theta))
        if kind == "second_derivative":
            d = func.grad(d)
        return lambda x: float(d(t(x)))
    raise ValueError(f"host_derivative: unknown kind {kind!r}.")
