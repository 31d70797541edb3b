"""Regularizers for PyTorch DEQs: the Jacobian penalty (`jacobian_penalty`) and variational
dropout (`VariationalDropout`, one mask per forward pass of the `DEQ`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from implicitdiff.backend import StructureError

__all__ = ["VariationalDropout", "jacobian_penalty"]


# ---- Jacobian regularization ----------------------------------------------------------------

def jacobian_penalty(f: Callable[..., Any], z: torch.Tensor, x: Any, *, n_samples: int = 1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Hutchinson's estimate of $\\|\\partial_z f(z, x)\\|_F^2 / n$ per sample, averaged over
    the batch (Bai, Koltun, Kolter 2021, "Stabilizing equilibrium models by Jacobian
    regularization"): $\\mathbb{E}_\\varepsilon \\|\\varepsilon^\\top J\\|^2 / n$ with
    $\\varepsilon \\sim N(0, I)$, `n_samples` probes, $n$ the per-sample size of $z$.

    Evaluated at `z.detach()`; the result is differentiable in the parameters of `f` and in
    `x` (`create_graph=True`), so add `weight * penalty` to the loss. It costs one
    application of `f` and one backward through it per probe."""
    zd = z.detach().requires_grad_()
    with torch.enable_grad():
        fz = f(zd, x)
        n = zd[0].numel()
        total = zd.new_zeros(())
        for _ in range(n_samples):
            eps = torch.randn(fz.shape, dtype=fz.dtype, device=fz.device, generator=generator)
            (g,) = torch.autograd.grad(fz, zd, eps, create_graph=True)
            total = total + (g * g).sum() / g.shape[0]
    return total / (n_samples * n)


# ---- variational dropout ---------------------------------------------------------------------

class VariationalDropout(nn.Module):
    """Dropout with one mask per forward pass of the `DEQ`, the same at every solver iteration
    (and in the backward), so the map $f$ stays deterministic while it is solved. In training
    mode the `DEQ` samples the mask before the solve (shape `(batch, *shape)` where `shape`
    is this layer's input shape without the batch; pass `shape=` when it differs from the
    state's); in eval mode it is the identity.

    Use it inside `f` in place of `nn.Dropout` (which would draw a new mask at each iteration:
    then $f$ has no fixed point)."""

    def __init__(self, p: float = 0.1, shape: Sequence[int] | None = None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"VariationalDropout: expected 0 <= p < 1, got {p!r}.")
        self.p = p
        self.shape = None if shape is None else tuple(shape)
        self.mask: torch.Tensor | None = None

    def reset(self, like: torch.Tensor) -> None:
        """Draw a new mask for inputs shaped like `like` (batch first)."""
        shape = (like.shape[0], *(self.shape or like.shape[1:]))
        keep = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - self.p)
        self.mask = keep / (1 - self.p)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return h
        if self.mask is None or self.mask.shape != h.shape:
            raise StructureError(
                f"VariationalDropout: no mask for an input of shape {tuple(h.shape)} (mask "
                f"{None if self.mask is None else tuple(self.mask.shape)}). Inside a DEQ the "
                "mask is drawn before each solve; elsewhere call .reset(like) first, or pass "
                "shape= when the input shape differs from the DEQ's state."
            )
        return h * self.mask


def _prepare_dropout(f: Any, z0: torch.Tensor) -> None:
    if isinstance(f, nn.Module):
        for m in f.modules():
            if isinstance(m, VariationalDropout):
                if m.training and m.p > 0:
                    m.reset(z0)
                else:
                    m.mask = None
