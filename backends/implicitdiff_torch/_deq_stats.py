"""The statistics of a PyTorch `DEQ`'s forward solve: `DEQStats`, the one of `implicitdiff.deq`
(the same fields and `summary()` in every framework; here the arrays are detached tensors)."""

from __future__ import annotations

from implicitdiff.deq import DEQStats as DEQStats

__all__ = ["DEQStats"]
