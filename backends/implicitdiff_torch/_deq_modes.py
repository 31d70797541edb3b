"""The backward modes of the PyTorch `DEQ`: those of `implicitdiff.deq`, written once for every
framework (`IFT`, `Neumann`, `Phantom`, `JFB`; see that module and `docs/deq.md`).

Kept as a module so that models saved whole with `torch.save` before the modes moved to the core
still load.
"""

from __future__ import annotations

from implicitdiff.deq import IFT as IFT
from implicitdiff.deq import JFB as JFB
from implicitdiff.deq import Neumann as Neumann
from implicitdiff.deq import NeumannSolve as NeumannSolve
from implicitdiff.deq import Phantom as Phantom
from implicitdiff.deq import as_backward as _as_mode

__all__ = ["IFT", "JFB", "Neumann", "NeumannSolve", "Phantom", "_as_mode"]
