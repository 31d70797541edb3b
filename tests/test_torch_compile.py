"""`torch.compile` of a model containing the PyTorch `DEQ`: the compiled model (backend
"aot_eager": Dynamo + AOTAutograd, no C++ compiler needed) returns the eager output and the eager
gradients (parameters of the cell, of the layers around the DEQ, and the input) in each backward
mode, and the number of graphs Dynamo compiles is a small constant, independent of the number of
forward iterations (the forward solve runs eagerly, as one graph break)."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_cells import Cell  # noqa: E402

import implicitdiff as idf  # noqa: E402
from implicitdiff_torch import DEQ, IFT, JFB, Phantom  # noqa: E402

F64 = torch.float64

try:
    _DYNAMO = bool(torch._dynamo.is_dynamo_supported())
except Exception:  # any failure means: no torch.compile here
    _DYNAMO = False

pytestmark = pytest.mark.skipif(
    not _DYNAMO, reason="torch.compile (Dynamo) is not supported on this Python / platform")

MODES = {
    "ift": lambda: IFT(idf.BiCGStab()),
    "phantom": lambda: Phantom(5),
    "jfb": JFB,
}


class Model(nn.Module):
    """Linear -> relu -> DEQ -> Linear -> mean square: compiled code on both sides of the DEQ."""

    def __init__(self, mode: str, tol: float = 1e-12, residual_tol: float | None = None,
                 h: int = 12, d: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.inp = nn.Linear(5, d)
        self.head = nn.Linear(h, 1)
        with torch.no_grad():
            for p in (*self.inp.parameters(), *self.head.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) / 2)
        self.deq = DEQ(Cell(h, d, 0.5), z_shape=(h,), backward=MODES[mode](),
                       solver_options={"tol": tol, "maxiter": 200}, residual_tol=residual_tol)
        self.to(F64)

    def forward(self, x):
        z = self.deq(torch.relu(self.inp(x)))
        return self.head(z).pow(2).mean()


def data() -> torch.Tensor:
    return torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Value and gradients (parameters and input) of one forward + backward of `fn`."""
    model.zero_grad(set_to_none=True)
    x = data().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's graph-break chatter
        out = fn(x)
        out.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    grads["x"] = x.grad.clone()
    return out.detach(), grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["ift", "phantom"])  # JFB: the path of Phantom
def test_compiled_model_gives_eager_output_and_gradients(mode):
    model = Model(mode)
    out, eager = run(model, model)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):  # the first call compiles, the second runs the cached graphs
        cout, got = run(model, compiled)
        torch.testing.assert_close(cout, out, rtol=1e-10, atol=1e-12)
        assert got.keys() == eager.keys()
        for k in eager:
            torch.testing.assert_close(got[k], eager[k], rtol=1e-9, atol=1e-12, msg=k)
    assert model.deq.stats is not None and bool(model.deq.stats.converged.all())


def graphs_compiled(mode: str, tol: float) -> tuple[int, int]:
    """(graphs Dynamo hands the backend, forward steps) for one forward + backward."""
    torch._dynamo.reset()
    model = Model(mode, tol=tol, residual_tol=1e-2)  # a loose tol passes the residual check
    run(model, model)  # eager first: one-time work (backend lookup) is not counted
    n = Counter()

    def counting(gm, example_inputs):
        n["graphs"] += 1
        return gm.forward

    run(model, torch.compile(model, backend=counting))
    return n["graphs"], int(model.deq.stats.steps.max())


def _assert_constant_graph_count(mode: str) -> None:
    few, steps_few = graphs_compiled(mode, tol=1e-3)
    # before the DEQ / after it (and, for Phantom and JFB, the recorded steps of f): a handful
    # of graphs, whatever the number of solver iterations
    assert few <= 5, f"{few} graphs for {steps_few} forward steps"
    many, steps_many = graphs_compiled(mode, tol=1e-12)
    assert steps_many > steps_few + 5  # the two solves differ in their number of iterations
    assert many == few, f"{many} graphs for {steps_many} steps, {few} for {steps_few}"


def test_ift_graph_count_is_a_small_constant():
    _assert_constant_graph_count("ift")


def test_phantom_graph_count_is_a_small_constant():
    _assert_constant_graph_count("phantom")  # JFB takes the same path
