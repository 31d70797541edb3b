"""The statistics of a PyTorch `DEQ`'s forward solve: `DEQStats`."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DEQStats"]


class DEQStats(NamedTuple):
    """The last forward solve of a `DEQ`, per sample (tensors of shape `(batch,)`, traces
    `(batch, maxiter)`), detached. `converged` is the forward solver's own criterion;
    `max_abs_residual` is $\\max|f(z^*, x) - z^*|$, the quantity `residual_tol` bounds."""

    steps: torch.Tensor
    converged: torch.Tensor
    residual_norm: torch.Tensor
    relative_residual: torch.Tensor
    trace: torch.Tensor
    relative_trace: torch.Tensor
    max_abs_residual: torch.Tensor | None
    warm_started: bool

    def summary(self) -> dict[str, float]:
        """Scalars for a logger: mean/max steps, max relative residual, converged fraction."""
        return {"steps_mean": float(self.steps.float().mean()),
                "steps_max": int(self.steps.max()),
                "rel_residual_max": float(self.relative_residual.max()),
                "converged_frac": float(self.converged.float().mean())}
