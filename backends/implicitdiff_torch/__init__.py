"""The PyTorch backend of implicitdiff.

A solver decorated with `idf.custom_root` / `idf.custom_fixed_point`, called with tensors, runs
untraced (under `torch.no_grad()`) and returns $x^*$. When an argument requires grad, or a
`torch.func` transform or forward-mode AD is active, the call goes through a
`torch.autograd.Function` whose `backward` (VJP), `jvp` (forward mode) and `vmap` rules apply the
implicit function theorem, so `.backward()`, `torch.autograd.grad` (with `create_graph=True` too),
`torch.autograd.forward_ad` and `torch.func.{grad, vjp, jvp, jacrev, jacfwd, hessian, vmap}` work.
Under a `torch.func` transform or forward AD, tensors that `F` reads from its closure (closure
cells, defaults, globals, a bound method's `nn.Module`, `functools.partial`, a module whose
parameters `torch.func.functional_call` swapped) become inputs of the implicit function, so their
derivatives are right; one it cannot find is refused by name (`StructureError`). In eager
autograd, a closure over a tensor that requires grad is refused: pass it as an argument.
Complex tensors whose derivative is asked for are refused; on the `meta` device the forward and
the derivatives propagate shapes only. See `docs/torch.md`.
"""

from ._backend import TorchBackend as TorchBackend
from ._backend import TorchLinearization as TorchLinearization
from ._backend import backend as backend
from ._deq import DEQ as DEQ
from ._deq_correction import correction_states as correction_states
from ._deq_modes import IFT as IFT
from ._deq_modes import JFB as JFB
from ._deq_modes import Neumann as Neumann
from ._deq_modes import NeumannSolve as NeumannSolve
from ._deq_modes import Phantom as Phantom
from ._deq_regularizers import VariationalDropout as VariationalDropout
from ._deq_regularizers import jacobian_penalty as jacobian_penalty
from ._deq_stats import DEQStats as DEQStats

__all__ = ["TorchBackend", "TorchLinearization", "backend"]
__all__ += ["DEQ", "IFT", "JFB", "DEQStats", "Neumann", "NeumannSolve", "Phantom",
            "VariationalDropout", "correction_states", "jacobian_penalty"]
