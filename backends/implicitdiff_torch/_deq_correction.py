"""Fixed-point correction for PyTorch DEQs (Bai et al. 2022): `correction_states`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ._deq import DEQ

__all__ = ["correction_states"]


def correction_states(deq: DEQ, x: Any, *, iterations: Sequence[int] = (2, 4, 8),
                      grad_steps: int = 1, z0: torch.Tensor | None = None
                      ) -> list[torch.Tensor]:
    """States for a fixed-point correction loss (Bai et al. 2022, "Deep equilibrium optical
    flow estimation"): the iterates of plain fixed-point iteration on `deq.f` after each number
    of `iterations`, each followed by `grad_steps` recorded applications of `f` (a phantom
    gradient from that state). Apply the task loss to each, with weights growing toward the
    fixed point, and add it to the loss of the DEQ's output:

    ```python
    states = correction_states(deq, x, iterations=(2, 4, 8))
    loss = loss_fn(head(deq(x))) + sum(0.8 ** (len(states) - i) * loss_fn(head(s))
                                       for i, s in enumerate(states))
    ```

    The iterations run under `torch.no_grad()`; only the `grad_steps` per state are taped.
    Like the `DEQ`, it refuses modules of `deq.f` that couple the samples or would update
    running statistics at every iteration (`StructureError`)."""
    from ._deq import _refuse_coupling_modules

    _refuse_coupling_modules(deq.f)
    z0 = deq.initial_state(x) if z0 is None else z0
    batch, shape = z0.shape[0], tuple(z0.shape[1:])
    deq._shape = shape
    params = deq.params()
    if sorted(iterations) != list(iterations) or not iterations or iterations[0] < 0:
        raise ValueError(f"correction_states: expected non-negative increasing iterations, got "
                         f"{tuple(iterations)!r}.")
    z = z0.detach().reshape(batch, -1)
    out, done = [], 0
    for k in iterations:
        with torch.no_grad():
            for _ in range(k - done):
                z = deq._T(z, params, x)
        done = k
        s = z.detach()
        for _ in range(grad_steps):
            s = deq._T(s, params, x)
        out.append(s.reshape(batch, *shape))
    return out
